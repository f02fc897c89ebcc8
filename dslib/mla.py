# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/03_mla.py (chapter 03).
# Edit the chapter, then run the export again.

"""Multi-head Latent Attention (MLA) of DeepSeek-V2 (arXiv 2405.04434, section 2.1 and Appendix C): low-rank joint
key-value compression with decoupled RoPE, a cache of the latent vectors only, naive and weight-absorbed inference, a
small MLA language model, and the KV-cache accounting of the paper's Table 1 (chapter 03)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from dslib.transformer import RMSNorm, SwiGLU, Transformer, apply_rope, forward_inputs, rope_cos_sin

ATTENTION_KINDS = ("MHA", "GQA", "MQA", "MLA")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def kv_cache_elements(kind: str, *, n_head: int | None = None, head_dim: int | None = None,
                      n_kv_head: int | None = None, kv_lora_rank: int | None = None,
                      qk_rope_head_dim: int | None = None) -> int:
    """Elements cached per token per layer, DeepSeek-V2's Table 1 (section 2.1.4):
    MHA 2 n_h d_h; GQA 2 n_g d_h; MQA 2 d_h; MLA d_c + d_h^R.

    n_head is n_h, head_dim d_h, n_kv_head the number of groups n_g, kv_lora_rank d_c and qk_rope_head_dim d_h^R.
    Each kind reads only the arguments its formula needs, and raises ValueError naming a missing or bad one."""
    needs = {"MHA": ("n_head", "head_dim"), "GQA": ("n_kv_head", "head_dim"), "MQA": ("head_dim",),
             "MLA": ("kv_lora_rank", "qk_rope_head_dim")}
    if kind not in needs:
        raise ValueError(f"kind={kind!r} is invalid: one of {ATTENTION_KINDS} is required")
    given = dict(n_head=n_head, head_dim=head_dim, n_kv_head=n_kv_head, kv_lora_rank=kv_lora_rank,
                 qk_rope_head_dim=qk_rope_head_dim)
    for name in needs[kind]:
        if not _is_positive_int(given[name]):
            raise ValueError(f"{name}={given[name]!r} is invalid: the {kind} cache needs it as a positive int")
    if kind == "MHA":
        return 2 * n_head * head_dim
    if kind == "GQA":
        return 2 * n_kv_head * head_dim
    if kind == "MQA":
        return 2 * head_dim
    return kv_lora_rank + qk_rope_head_dim


def bytes_per_element(dtype: torch.dtype | float) -> float:
    """Bytes per cached element: a torch.dtype (torch.bfloat16: 2) or a number of bits (6: 0.75, a quantised cache)."""
    if isinstance(dtype, torch.dtype):
        return float(torch.empty((), dtype=dtype).element_size())
    if isinstance(dtype, (int, float)) and not isinstance(dtype, bool) and dtype > 0:
        return dtype / 8
    raise ValueError(f"dtype={dtype!r} is invalid: a torch.dtype or a positive number of bits is required")


def kv_cache_bytes(kind: str, *, n_layer: int = 1, tokens: int = 1, batch_size: int = 1,
                   dtype: torch.dtype | float = torch.bfloat16, **shape) -> float:
    """Bytes of the KV cache of `batch_size` sequences of `tokens` tokens through `n_layer` layers:
    kv_cache_elements(kind, **shape) * n_layer * tokens * batch_size * bytes_per_element(dtype)."""
    for name, value in (("n_layer", n_layer), ("tokens", tokens), ("batch_size", batch_size)):
        if not _is_positive_int(value):
            raise ValueError(f"{name}={value!r} is invalid: a positive int is required")
    return kv_cache_elements(kind, **shape) * n_layer * tokens * batch_size * bytes_per_element(dtype)


ROPE_TYPES = ("default", "yarn")
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_rope_scaling(rope_scaling: dict | None) -> dict | None:
    """Validate a config.json rope_scaling block (YaRN, arXiv 2309.00071, as DeepSeek-V2/V3 configure it).
    None, {} or a 'default' block -> None (plain RoPE). A YaRN block (key 'rope_type', or the older 'type', equal to
    'yarn') -> a normalised dict: rope_type='yarn', factor, original_max_position_embeddings, beta_fast (default 32),
    beta_slow (default 1), mscale (default 1.0), mscale_all_dim (default 0.0: not set), plus attention_factor and
    truncate only if given. Other keys (rope_theta, ...) are ignored. Raises ValueError naming the missing or bad
    field, or the unknown rope type."""
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling={rope_scaling!r} is invalid: None or a dict (a config.json rope_scaling "
                         f"block) is required")
    if not rope_scaling:
        return None
    kinds = {key: rope_scaling[key] for key in ("rope_type", "type") if rope_scaling.get(key) is not None}
    if len(set(kinds.values())) > 1:
        raise ValueError(f"rope_scaling['rope_type']={kinds['rope_type']!r} and rope_scaling['type']="
                         f"{kinds['type']!r} disagree: give one rope type")
    if not kinds:
        raise ValueError(f"rope_scaling['rope_type'] is missing (or the older key 'type'): one of {ROPE_TYPES} is "
                         f"required")
    kind = next(iter(kinds.values()))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(f"rope_scaling['rope_type']={kind!r} is invalid: one of {ROPE_TYPES} is supported")

    def bad(name: str, allowed: str) -> ValueError:
        return ValueError(f"rope_scaling[{name!r}]={rope_scaling[name]!r} is invalid: {allowed}")

    for name in ("factor", "original_max_position_embeddings"):
        if rope_scaling.get(name) is None:
            raise ValueError(f"rope_scaling[{name!r}] is missing: a YaRN block needs factor and "
                             f"original_max_position_embeddings (DeepSeek-V2/V3: 40 and 4096)")
    out = {"rope_type": "yarn"}
    if not (_is_number(rope_scaling["factor"]) and rope_scaling["factor"] > 0):
        raise bad("factor", "a positive number is required")
    out["factor"] = float(rope_scaling["factor"])
    if not _is_positive_int(rope_scaling["original_max_position_embeddings"]):
        raise bad("original_max_position_embeddings", "a positive int is required")
    out["original_max_position_embeddings"] = rope_scaling["original_max_position_embeddings"]
    for name, default in YARN_DEFAULTS.items():
        value = rope_scaling.get(name)
        if value is None:
            value = default
        elif not (_is_number(value) and (value >= 0 if name == "mscale_all_dim" else value > 0)):
            raise bad(name, "a number >= 0 (0: not set) is required" if name == "mscale_all_dim"
                      else "a positive number is required")
        out[name] = float(value)
    if not out["beta_fast"] > out["beta_slow"]:
        raise ValueError(f"rope_scaling['beta_fast']={out['beta_fast']!r} is invalid: it must exceed "
                         f"beta_slow={out['beta_slow']!r} (pairs turning more than beta_fast times are kept)")
    if rope_scaling.get("attention_factor") is not None:
        if not (_is_number(rope_scaling["attention_factor"]) and rope_scaling["attention_factor"] > 0):
            raise bad("attention_factor", "a positive number is required")
        out["attention_factor"] = float(rope_scaling["attention_factor"])
    if rope_scaling.get("truncate") is not None:
        if not isinstance(rope_scaling["truncate"], bool):
            raise bad("truncate", "True or False is required")
        out["truncate"] = rope_scaling["truncate"]
    return out


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention factor 0.1 mscale ln(s) + 1 for a scale s > 1, else 1 (YaRN, arXiv 2309.00071, section 3.4;
    DeepSeek-V2, section 3.1.4, writes it 0.0707 ln s + 1: mscale 0.707)."""
    return 0.1 * mscale * math.log(scale) + 1.0 if scale > 1 else 1.0


def yarn_correction_range(dim: int, theta: float, rope_scaling: dict) -> tuple[float, float]:
    """The ramp's ends (low, high), as pair indices: pair i turns L theta^(-2i/dim) / (2 pi) times in the original
    context L, and low, high are the pairs that turn beta_fast and beta_slow times, floored and ceiled when truncate
    (default True), clamped to [0, dim - 1]; high gets +0.001 when they are equal."""
    rs = check_rope_scaling(rope_scaling)
    if rs is None:
        raise ValueError("rope_scaling=None has no correction range: a YaRN block is required")

    def pair_turning(turns: float) -> float:  # the (fractional) pair index that turns `turns` times in L
        return dim * math.log(rs["original_max_position_embeddings"] / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_turning(rs["beta_fast"]), pair_turning(rs["beta_slow"])
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    return low, (high + 0.001 if low == high else high)


def rope_frequencies(dim: int, theta: float, rope_scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies inv_freq (dim/2,) float32, and the attention factor that multiplies cos and sin.
    Without scaling: theta^(-2i/dim), exactly as dslib.transformer.rope_cos_sin, and 1.0. YaRN (arXiv 2309.00071,
    DeepSeek-V2 section 3.1.4): inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp), ramp_i = clamp((i - low)
    / (high - low), 0, 1) over the yarn_correction_range; the factor is attention_factor if given, else
    yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) when both are set, else yarn_mscale(factor)."""
    if not (_is_positive_int(dim) and dim % 2 == 0):
        raise ValueError(f"dim={dim!r} is invalid: a positive even int is required (RoPE rotates pairs)")
    if not (_is_number(theta) and theta > 0):
        raise ValueError(f"theta={theta!r} is invalid: a positive number is required")
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,): rope_cos_sin's
    rs = check_rope_scaling(rope_scaling)
    if rs is None:
        return inv_freq, 1.0
    if not theta > 1:
        raise ValueError(f"theta={theta!r} is invalid: YaRN needs theta > 1 (it divides by ln theta)")
    low, high = yarn_correction_range(dim, theta, rs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # 0: kept, 1: divided
    inv_freq = inv_freq / rs["factor"] * ramp + inv_freq * (1 - ramp)
    if "attention_factor" in rs:
        factor = rs["attention_factor"]
    elif rs["mscale"] and rs["mscale_all_dim"]:
        factor = yarn_mscale(rs["factor"], rs["mscale"]) / yarn_mscale(rs["factor"], rs["mscale_all_dim"])
    else:
        factor = yarn_mscale(rs["factor"])
    return inv_freq, float(factor)


def scaled_rope_cos_sin(positions: torch.Tensor, dim: int, theta: float,
                        rope_scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (..., t, dim/2) of integer positions (..., t), like dslib.transformer.rope_cos_sin, with YaRN's
    frequencies and its factor on both; rope_scaling None gives rope_cos_sin's result exactly."""
    if check_rope_scaling(rope_scaling) is None:
        return rope_cos_sin(positions, dim, theta)
    inv_freq, factor = rope_frequencies(dim, theta, rope_scaling)
    angles = positions.float()[..., None] * inv_freq.to(positions.device)  # (..., t, dim/2)
    return angles.cos() * factor, angles.sin() * factor


def yarn_softmax_factor(rope_scaling: dict | None) -> float:
    """The multiplier of MLA's softmax scale 1/sqrt(d_h + d_h^R): yarn_mscale(factor, mscale_all_dim) ** 2 when
    mscale_all_dim is set (DeepSeek's reference code, transformers' DeepseekV2/V3), else 1."""
    rs = check_rope_scaling(rope_scaling)
    if rs is None or not rs["mscale_all_dim"]:
        return 1.0
    return yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2


@dataclass
class MLAConfig:
    """The shape of an MLA layer, with DeepSeek-V3's reference names (DeepSeek-V2, arXiv 2405.04434, section 2.1):
    d_model is d (the hidden size), n_head n_h, q_lora_rank d'_c (0 or None: no query compression), kv_lora_rank d_c,
    qk_nope_head_dim d_h, qk_rope_head_dim d_h^R (even: RoPE rotates pairs), v_head_dim the per-head value width.
    V2 and V3 use n_h = 128, d_h = v = 128, d_c = 512, d'_c = 1536, d_h^R = 64. rope_scaling: None (plain RoPE) or a
    config.json rope_scaling block, YaRN in V2 and V3 (factor 40 from 4096 positions); stored normalised by
    check_rope_scaling."""

    d_model: int = 128
    n_head: int = 4
    q_lora_rank: int | None = 0
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    rope_scaling: dict | None = None

    def _invalid(self, name: str, allowed: str) -> ValueError:
        return ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r} is invalid: {allowed}")

    def __post_init__(self) -> None:
        for name in ("d_model", "n_head", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if not _is_positive_int(getattr(self, name)):
                raise self._invalid(name, "a positive int is required")
        if self.q_lora_rank is None:
            self.q_lora_rank = 0
        if not (self.q_lora_rank == 0 or _is_positive_int(self.q_lora_rank)):
            raise self._invalid("q_lora_rank", "0 or None (no query compression) or a positive int is required")
        if self.qk_rope_head_dim % 2:
            raise self._invalid("qk_rope_head_dim", "an even number is required: RoPE rotates pairs of features")
        for name in ("kv_lora_rank", "q_lora_rank"):
            if getattr(self, name) > self.d_model:
                raise self._invalid(name, f"at most d_model={self.d_model} is allowed: the latent compresses the "
                                          f"hidden state, and a wider one cannot hold more (its rank is <= d_model)")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise self._invalid(name, "a positive number is required")
        try:
            self.rope_scaling = check_rope_scaling(self.rope_scaling)
        except ValueError as err:
            raise self._invalid("rope_scaling", str(err)) from None
        if self.rope_scaling is not None and not self.rope_theta > 1:
            raise self._invalid("rope_theta", "a number > 1 is required with YaRN (it divides by ln rope_theta)")

    @property
    def qk_head_dim(self) -> int:
        """Width of a query or key head: d_h + d_h^R."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_elements(self) -> int:
        """Elements cached per token per layer: d_c + d_h^R (V2, Table 1)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["rope_scaling"] is None:  # so a config without YaRN (and any key hashed from it) reads as it did before
            del d["rope_scaling"]
        return d


@dataclass(kw_only=True)
class MLATransformerConfig(MLAConfig):
    """A small decoder-only LM with MLA attention: the DeepSeek LLM block of dslib.transformer (pre-norm RMSNorm,
    SwiGLU) with MLA in place of GQA, as in DeepSeek-V2's dense layers. All fields are keyword-only."""

    vocab_size: int
    n_layer: int = 4
    intermediate_size: int | None = None  # None: 8/3 d_model rounded up to a multiple of 32
    max_seq_len: int = 128
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "max_seq_len"):
            if not _is_positive_int(getattr(self, name)):
                raise self._invalid(name, "a positive int is required")
        super().__post_init__()
        if self.intermediate_size is None:
            self.intermediate_size = 32 * math.ceil(8 * self.d_model / 3 / 32)
        if not _is_positive_int(self.intermediate_size):
            raise self._invalid("intermediate_size", "a positive int is required")
        if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float)) or not self.init_std > 0:
            raise self._invalid("init_std", "a positive number is required")


class MLACache:
    """The MLA cache: per layer, the latent c^KV_t (kv_lora_rank numbers) and the shared RoPE key k^R_t
    (qk_rope_head_dim numbers) of each past token, the only vectors V2's Appendix C caches. Preallocated to max_len:
    kv[layer] is (b, max_len, kv_lora_rank), pe[layer] is (b, max_len, qk_rope_head_dim). `length` is how many
    positions are filled; the model advances it after each forward. Both decoding modes read the same cache."""

    def __init__(self, config: MLATransformerConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.max_len = max_len or config.max_seq_len
        self.kv = [torch.zeros(batch_size, self.max_len, config.kv_lora_rank, device=device, dtype=dtype)
                   for _ in range(config.n_layer)]
        self.pe = [torch.zeros(batch_size, self.max_len, config.qk_rope_head_dim, device=device, dtype=dtype)
                   for _ in range(config.n_layer)]
        self.length = 0

    def update(self, layer: int, kv: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write kv (b, t, kv_lora_rank) and pe (b, t, qk_rope_head_dim) after the filled positions; return all the
        latents and RoPE keys so far."""
        t = kv.shape[1]
        if self.length + t > self.max_len:
            raise ValueError(f"MLA cache is full: {self.length} positions + {t} new > max_len {self.max_len}")
        self.kv[layer][:, self.length:self.length + t] = kv
        self.pe[layer][:, self.length:self.length + t] = pe
        return self.kv[layer][:, :self.length + t], self.pe[layer][:, :self.length + t]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv + self.pe)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (indices, in order): a decoder drops the rows that have finished."""
        self.kv = [t[rows] for t in self.kv]
        self.pe = [t[rows] for t in self.pe]


MODES = ("naive", "absorb")


def _allowed(mask: torch.Tensor | None, t: int, s: int, device: torch.device) -> torch.Tensor | None:
    """The attention mask of t queries that follow s - t earlier keys: `mask` when given, else causal (None when every
    key is visible, as for a single new token)."""
    if mask is not None:
        return mask
    if t == 1:
        return None
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(s - t)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v with PyTorch's fused kernel, causal when no mask is given. Keys and values of different
    widths are zero-padded to the same width first (zeros change neither the scores nor the output), since the fused
    CPU kernel handles only equal widths and would fall back to a slow one."""
    e, ev = q.shape[-1], v.shape[-1]
    if ev < e:
        v = F.pad(v, (0, e - ev))
    elif ev > e:
        q, k = F.pad(q, (0, ev - e)), F.pad(k, (0, ev - e))
    t, s = q.shape[-2], k.shape[-2]
    if mask is None and t == s:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_allowed(mask, t, s, q.device), scale=scale)
    return y[..., :ev]


class MLA(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, section 2.1 and Appendix C).

    Queries: c^Q = RMSNorm(W^DQ h) (wq_a, q_norm), [q^C; q^R] = W^UQ, W^QR c^Q (wq_b), or directly from h (wq) when
    q_lora_rank is 0. Keys and values: [c^KV; k^R] = [W^DKV; W^KR] h (wkv_a), c^KV <- RMSNorm(c^KV) (kv_norm),
    k^R <- RoPE(k^R), one RoPE key shared by all heads; [k^C_i; v^C_i] = [W^UK_i; W^UV_i] c^KV (wkv_b).
    Per head q_i = [q^C_i; q^R_i], k_i = [k^C_i; k^R]; o_i = softmax(q_i . k_i / sqrt(d_h + d_h^R)) v^C_i; u = W^O o
    (wo). RoPE rotates interleaved pairs, as the reference code does. Only c^KV and k^R are cached (MLACache). With
    YaRN (c.rope_scaling), the softmax scale is multiplied by yarn_softmax_factor, and the caller's cos and sin are
    scaled_rope_cos_sin's.

    mode "naive" decompresses k^C and v^C per head; mode "absorb" attends in the latent space: scores
    (W^UK_i^T q^C_i) . c^KV + q^R_i . k^R and output W^O [W^UV_i (p_i . c^KV)]_i. Both give the same result."""

    def __init__(self, c: MLAConfig, layer: int = 0):
        super().__init__()
        self.c, self.layer = c, layer
        h, qk_head_dim = c.n_head, c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank:
            self.wq_a = nn.Linear(c.d_model, c.q_lora_rank, bias=False)  # W^DQ
            self.q_norm = RMSNorm(c.q_lora_rank, c.norm_eps)
            self.wq_b = nn.Linear(c.q_lora_rank, h * qk_head_dim, bias=False)  # [W^UQ_i; W^QR_i] per head
        else:
            self.wq = nn.Linear(c.d_model, h * qk_head_dim, bias=False)  # [W^Q_i; W^QR_i] per head
        self.wkv_a = nn.Linear(c.d_model, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)  # [W^DKV; W^KR]
        self.kv_norm = RMSNorm(c.kv_lora_rank, c.norm_eps)
        self.wkv_b = nn.Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), bias=False)  # [W^UK_i; W^UV_i]
        self.wo = nn.Linear(h * c.v_head_dim, c.d_model, bias=False)  # W^O
        self.softmax_scale = qk_head_dim ** -0.5 * yarn_softmax_factor(c.rope_scaling)  # x 1.0 without YaRN

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, t, d) -> q^C (b, h, t, d_h) and q^R = RoPE(W^QR c^Q) (b, h, t, d_h^R)."""
        c = self.c
        q = self.wq_b(self.q_norm(self.wq_a(x))) if c.q_lora_rank else self.wq(x)
        q = rearrange(q, "b t (h d) -> b h t d", h=c.n_head)
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, t, d) -> the cached vectors: c^KV (b, t, d_c) after RMSNorm, k^R (b, t, d_h^R) after RoPE."""
        c = self.c
        kv, k_pe = self.wkv_a(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        return self.kv_norm(kv), apply_rope(k_pe[:, None], cos, sin)[:, 0]

    def up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W^UK (h, d_h, d_c) and W^UV (h, d_v, d_c): views of wkv_b's weight, head by head."""
        c = self.c
        w = self.wkv_b.weight.view(c.n_head, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return w[:, :c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: MLACache | None = None, mode: str = "naive") -> torch.Tensor:
        """x (b, t, d) -> (b, t, d). cos, sin (b, t, d_h^R / 2): RoPE angles of the t positions. mask (b, 1, t, s)
        bool, True where attention is allowed (None: causal). cache: an MLACache that receives c^KV and k^R of the t
        positions (the model advances its length). mode: "naive" or "absorb"."""
        c = self.c
        q_nope, q_pe = self.queries(x, cos, sin)  # (b, h, t, d_h), (b, h, t, d_h^R)
        kv, k_pe = self.latents(x, cos, sin)  # (b, t, d_c), (b, t, d_h^R)
        if cache is not None:
            kv, k_pe = cache.update(self.layer, kv, k_pe)  # (b, s, d_c), (b, s, d_h^R): s = past + t
        if mode == "naive":
            k_nope, v = rearrange(self.wkv_b(kv), "b s (h d) -> b h s d", h=c.n_head).split(
                [c.qk_nope_head_dim, c.v_head_dim], dim=-1)  # k^C (b, h, s, d_h), v^C (b, h, s, d_v)
            q = torch.cat([q_nope, q_pe], dim=-1)  # q_i = [q^C_i; q^R_i]
            k = torch.cat([k_nope, k_pe[:, None].expand(-1, c.n_head, -1, -1)], dim=-1)  # k_i = [k^C_i; k^R]
            y = _attend(q, k, v, mask, self.softmax_scale)  # (b, h, t, d_v)
        elif mode == "absorb":
            w_uk, w_uv = self.up_projections()
            q_lat = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # W^UK_i^T q^C_i: (b, h, t, d_c)
            if x.shape[1] == 1:  # one decoding step: scores against the latents, two batched matrix products
                # The scores are laid out (b, s, h), the cache times the queries: on a CPU, this attention step ran
                # 1.03-1.18x faster than with the same multiply-adds laid out (b, h, s), the queries times the cache.
                q_lat1, q_pe1 = q_lat[:, :, 0].transpose(1, 2), q_pe[:, :, 0].transpose(1, 2)  # (b, d_c or d_h^R, h)
                scores = (kv @ q_lat1 + k_pe @ q_pe1) * self.softmax_scale  # c^KV_j . q_lat + k^R_j . q^R: (b, s, h)
                if mask is not None:  # (b, 1, 1, s) -> (b, s, 1)
                    scores = scores.masked_fill(~mask.squeeze(2).transpose(1, 2), float("-inf"))
                probs = scores.float().softmax(dim=1).type_as(scores)
                o_lat = (probs.transpose(1, 2) @ kv)[:, :, None]  # sum_j p_j c^KV_j: (b, h, 1, d_c)
            else:  # a chunk: the same attention as MQA with key [c^KV; k^R] and value c^KV shared by the heads
                k = torch.cat([kv, k_pe], dim=-1)[:, None].expand(-1, c.n_head, -1, -1)  # (b, h, s, d_c + d_h^R)
                o_lat = _attend(torch.cat([q_lat, q_pe], dim=-1), k, kv[:, None].expand(-1, c.n_head, -1, -1), mask,
                                self.softmax_scale)  # (b, h, t, d_c)
            y = torch.einsum("bhtc,hdc->bhtd", o_lat, w_uv)  # W^UV_i o_lat_i: (b, h, t, d_v)
        else:
            raise ValueError(f"mode={mode!r} is invalid: one of {MODES} is required")
        return self.wo(rearrange(y, "b h t d -> b t (h d)"))


class MLABlock(nn.Module):
    """Pre-norm block: x + MLA(RMSNorm(x)), then + SwiGLU(RMSNorm(x))."""

    def __init__(self, c: MLATransformerConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = MLA(c, layer)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = SwiGLU(c.d_model, c.intermediate_size)

    def forward(self, x, cos, sin, mask, cache=None, mode="naive"):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, mode)
        return x + self.mlp(self.mlp_norm(x))


class MLATransformer(nn.Module):
    """A decoder-only LM with MLA attention. forward(input_ids (b, t)) -> logits (b, t, vocab), with the signature of
    dslib.transformer.Transformer. mode ("absorb" or "naive") chooses how a cached forward attends; without a cache
    (training) the naive path runs."""

    def __init__(self, config: MLATransformerConfig, mode: str = "absorb"):
        super().__init__()
        self.config = config
        self.mode = mode
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(MLABlock(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode={value!r} is invalid: one of {MODES} is required")
        self._mode = value

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.init_std)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.weight.numel() - self.lm_head.weight.numel()

    def new_cache(self, batch_size: int, max_len: int | None = None) -> MLACache:
        """An empty MLACache for this model, on its device and in its dtype."""
        w = self.embed.weight
        return MLACache(self.config, batch_size, max_len, w.device, w.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                cache: MLACache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """input_ids (b, t) -> logits (b, t, vocab).
        positions (b, t): RoPE positions (default 0..t-1, or following the cache's filled part).
        segments (b, t): document ids of packed rows; attention stays within a document (document_causal_mask).
        attn_mask (b, 1, t, past + t) bool, True where attention is allowed (default: causal).
        cache: an MLACache to decode incrementally; it is advanced by t.
        logits_to_keep: as in dslib.transformer.Transformer.forward (k > 0: the output head on the last k positions)."""
        c = self.config
        positions, attn_mask = forward_inputs(input_ids, positions, segments, attn_mask, cache, c.max_seq_len)
        cos, sin = scaled_rope_cos_sin(positions, c.qk_rope_head_dim, c.rope_theta, c.rope_scaling)
        mode = self.mode if cache is not None else "naive"
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, cache, mode)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.lm_head(self.norm(x[:, -logits_to_keep:] if logits_to_keep > 0 else x))

    # Decoding is chapter 00's loop unchanged: it asks the model for a cache through new_cache, so it gets an MLACache.
    generate = Transformer.generate
