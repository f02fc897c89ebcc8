# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/04_v3.py (chapter 04).
# Edit the chapter, then run the export again.

"""DeepSeek-V3 in miniature (arXiv 2412.19437): a validated configuration with the reference names and the published
full-size configurations of V3 and V2, parameter and FLOP counting without allocating weights, and `DeepSeekV3`: MLA
in every layer, dense SwiGLU in the first layers and DeepSeekMoE after them, optional multi-token prediction, and a
loader for Hugging Face transformers' DeepseekV3 checkpoints (chapter 04)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from dslib.mla import MLA, MLAConfig, MLACache
from dslib.moe import MoE, MoEConfig
from dslib.mtp import MTPModule, mtp_hidden
from dslib.transformer import RMSNorm, SwiGLU, Transformer, document_causal_mask, forward_inputs, rope_cos_sin


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def config_kwargs(d: dict, known: set[str]) -> dict:
    """The keyword arguments a config.json dict gives V3Config (the `known` field names; the rest is ignored).
    Features this implementation does not have are refused rather than silently ignored."""
    if d.get("rope_interleave", True) is not True:
        raise ValueError("rope_interleave=False is not supported: dslib rotates interleaved pairs, as V3 does")
    scaling = d.get("rope_scaling") or d.get("rope_parameters") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) not in ("default", None):
        raise ValueError(f"RoPE scaling {scaling} is not supported (only the default RoPE)")
    kw = {k: v for k, v in d.items() if k in known}
    if "rope_theta" not in kw and "rope_theta" in scaling:
        kw["rope_theta"] = scaling["rope_theta"]
    return kw


def _invalid(c, name: str, allowed: str) -> ValueError:
    return ValueError(f"V3Config.{name}={getattr(c, name)!r} is invalid: {allowed}")


def check_v3_config(c) -> None:
    """Validate a V3Config's fields (a ValueError naming the field), then build its MLA and MoE configurations, whose
    own checks catch shapes those modules refuse (an odd RoPE width, more experts per token than experts, ...)."""
    for name in ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                 "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group", "max_position_embeddings"):
        if not _positive_int(getattr(c, name)):
            raise _invalid(c, name, "a positive int is required")
    for name in ("n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
        value = getattr(c, name)
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
            raise _invalid(c, name, "an int >= 0 is required")
    if c.q_lora_rank is not None and not _positive_int(c.q_lora_rank):
        raise _invalid(c, "q_lora_rank", "None (no query compression) or a positive int is required")
    if c.first_k_dense_replace > c.num_hidden_layers:
        raise _invalid(c, "first_k_dense_replace", f"at most num_hidden_layers={c.num_hidden_layers}")
    for name in ("routed_scaling_factor", "rope_theta", "rms_norm_eps", "initializer_range"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise _invalid(c, name, "a positive number is required")
    for name in ("aux_loss_alpha", "bias_update_speed"):
        value = getattr(c, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise _invalid(c, name, "a number >= 0 is required")
    c.mla_config()  # MLA's own checks (even RoPE width, latent ranks <= hidden size)
    if c.n_moe_layers or c.num_nextn_predict_layers:
        c.moe_config()  # the router's checks (top-k <= experts, groups divide the experts, ...)


# The released configurations (their config.json files), as V3Config's keyword arguments.
DEEPSEEK_V3 = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                   num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_shared_experts=1,
                   n_routed_experts=256, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                   norm_topk_prob=True, scoring_func="sigmoid", first_k_dense_replace=3, num_nextn_predict_layers=1,
                   max_position_embeddings=163840)
DEEPSEEK_V2 = dict(vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
                   num_hidden_layers=60, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_shared_experts=2,
                   n_routed_experts=160, num_experts_per_tok=6, n_group=8, topk_group=3, routed_scaling_factor=16.0,
                   norm_topk_prob=False, scoring_func="softmax", first_k_dense_replace=1, aux_loss_alpha=0.003,
                   bias_update_speed=0.0, num_nextn_predict_layers=0, max_position_embeddings=163840)


@dataclass
class V3Config:
    """DeepSeek-V3's configuration, with the field names of its released config.json (as read by Hugging Face
    transformers), so a reader can hold it next to the official files; the table above says what each field means.
    The defaults are V3-mini, this chapter's model. Attention is MLA (dslib.mla) in every layer; the feed-forward
    layers are dense for the first `first_k_dense_replace`, DeepSeekMoE (dslib.moe) after."""

    vocab_size: int = 104
    hidden_size: int = 64
    intermediate_size: int = 192
    moe_intermediate_size: int = 32
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    q_lora_rank: int | None = None
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    n_shared_experts: int = 1
    n_routed_experts: int = 16
    num_experts_per_tok: int = 4
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    first_k_dense_replace: int = 1
    aux_loss_alpha: float = 0.0001
    bias_update_speed: float = 0.001
    num_nextn_predict_layers: int = 0
    max_position_embeddings: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        check_v3_config(self)  # defined in the cell above

    @property
    def n_moe_layers(self) -> int:
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def max_seq_len(self) -> int:
        """dslib's name for the context length (the generation loop reads it)."""
        return self.max_position_embeddings

    def mla_config(self) -> MLAConfig:
        return MLAConfig(d_model=self.hidden_size, n_head=self.num_attention_heads, q_lora_rank=self.q_lora_rank or 0,
                         kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
                         qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim,
                         rope_theta=self.rope_theta, norm_eps=self.rms_norm_eps)

    def moe_config(self) -> MoEConfig:
        return MoEConfig(d_model=self.hidden_size, moe_intermediate_size=self.moe_intermediate_size,
                         n_routed_experts=self.n_routed_experts, num_experts_per_tok=self.num_experts_per_tok,
                         n_shared_experts=self.n_shared_experts, scoring_func=self.scoring_func,
                         n_group=self.n_group, topk_group=self.topk_group, norm_topk_prob=self.norm_topk_prob,
                         routed_scaling_factor=self.routed_scaling_factor, seq_aux_alpha=self.aux_loss_alpha,
                         init_std=self.initializer_range)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "V3Config":
        """Build from a dict such as a Hugging Face config.json: known fields are read, the rest is ignored;
        features this implementation does not have are refused (config_kwargs, above)."""
        return cls(**config_kwargs(d, {f.name for f in fields(cls)}))

    @classmethod
    def deepseek_v3(cls) -> "V3Config":
        """DeepSeek-V3 (671B total, 37B activated), from its released config.json (MTP: one module)."""
        return cls(**DEEPSEEK_V3)

    @classmethod
    def deepseek_v2(cls) -> "V3Config":
        """DeepSeek-V2 (236B total, 21B activated), from its released config.json: softmax affinities, no bias, no
        MTP. V2 ranks groups by their best expert (group_limited_greedy), where dslib's router uses V3's top-2 sum;
        counting is unaffected."""
        return cls(**DEEPSEEK_V2)


def _attention_params(c: V3Config) -> int:
    h, d = c.num_attention_heads, c.hidden_size
    if c.q_lora_rank:
        q = d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim  # W^DQ, its norm, W^UQ and W^QR
    else:
        q = d * h * c.qk_head_dim
    kv = d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank  # W^DKV and W^KR, the latent's norm
    kv += c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)  # W^UK and W^UV
    return q + kv + h * c.v_head_dim * d  # W^O


def count_params(config: V3Config, mtp: bool = False) -> tuple[int, int]:
    """(total, activated) parameters of a DeepSeekV3 with this configuration, counted from the shapes without
    allocating anything. Activated: what one token computes with (the attention, the dense FFNs, the shared experts,
    `num_experts_per_tok` routed experts and the router in every MoE layer, the norms and the output head), without the
    input embedding, which is a table look-up. MTP modules are left out unless mtp=True, as in V3's "671B total, 37B
    activated" (they add 14B to the released checkpoint's 685B, 11.5B of them unique)."""
    c, d = config, config.hidden_size
    attn, norms = _attention_params(c), 2 * d
    expert = 3 * d * c.moe_intermediate_size  # one SwiGLU expert: gate, up, down
    router = c.n_routed_experts * d
    dense_layer = attn + norms + 3 * d * c.intermediate_size
    moe_total = attn + norms + router + (c.n_shared_experts + c.n_routed_experts) * expert
    moe_active = attn + norms + router + (c.n_shared_experts + c.num_experts_per_tok) * expert
    embed = c.vocab_size * d
    head = 0 if c.tie_word_embeddings else c.vocab_size * d
    total = c.first_k_dense_replace * dense_layer + c.n_moe_layers * moe_total + embed + head + d
    active = c.first_k_dense_replace * dense_layer + c.n_moe_layers * moe_active + (head or embed) + d
    if mtp and c.num_nextn_predict_layers:
        per_module = 3 * d + 2 * d * d  # enorm, hnorm, the head's norm, M_k
        total += c.num_nextn_predict_layers * (per_module + moe_total)
        active += c.num_nextn_predict_layers * (per_module + moe_active)
    return total, active


def flops_per_token(config: V3Config, seq_len: int) -> int:
    """Training FLOPs per token (forward and backward, 3 x the forward's 2 FLOPs per multiply-add): 6 x the activated
    matrix parameters, plus attention's scores and weighted sums over a context of seq_len (DeepSeek LLM's M counts
    this term without the causal halving; so does this). The router and norms are included in the parameters."""
    _, active = count_params(config)
    c = config
    attention = 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * seq_len * c.num_hidden_layers
    return 6 * active + 3 * attention


class V3Block(nn.Module):
    """A DeepSeek-V3 decoder layer: x + MLA(RMSNorm(x)), then + FFN(RMSNorm(x)), where the FFN is a SwiGLU in the
    first `first_k_dense_replace` layers and a DeepSeekMoE layer in the others."""

    def __init__(self, c: V3Config, layer: int, moe: bool):
        super().__init__()
        self.attn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.attn = MLA(c.mla_config(), layer)
        self.ffn_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.ffn = MoE(c.moe_config()) if moe else SwiGLU(c.hidden_size, c.intermediate_size)

    def forward(self, x, cos, sin, mask, cache=None, mode="naive"):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, mode)
        return x + self.ffn(self.ffn_norm(x))


def read_hf_config(directory: str | Path) -> dict:
    """A transformers DeepseekV3 folder's config.json, as a dict (its model_type checked)."""
    cfg_path = Path(directory) / "config.json"
    if not cfg_path.exists():
        raise FileNotFoundError(f"{cfg_path} is missing: from_hf needs a checkpoint folder with config.json")
    raw = json.loads(cfg_path.read_text())
    if raw.get("model_type") not in ("deepseek_v3", None):
        raise ValueError(f"{cfg_path}: model_type {raw.get('model_type')!r} is not deepseek_v3")
    return raw


def read_safetensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in a folder, by name."""
    from safetensors import safe_open

    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {directory}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k)
    return tensors


class CachesAndMTP:
    """DeepSeekV3's latent caches and its MTP methods (they use its config, embed, rope, lm_head and mtp modules)."""

    def _cache(self, n_layer: int, batch_size: int, max_len: int | None) -> MLACache:
        w, c = self.embed.weight, self.config
        shape = SimpleNamespace(n_layer=n_layer, kv_lora_rank=c.kv_lora_rank, qk_rope_head_dim=c.qk_rope_head_dim,
                                max_seq_len=c.max_position_embeddings)
        return MLACache(shape, batch_size, max_len, w.device, w.dtype)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> MLACache:
        """An empty latent cache (dslib.mla.MLACache) for the main layers."""
        return self._cache(self.config.num_hidden_layers, batch_size, max_len)

    def new_mtp_cache(self, batch_size: int, max_len: int | None = None) -> MLACache:
        """An empty latent cache for the MTP modules' blocks (used by speculative decoding)."""
        return self._cache(max(1, len(self.mtp)), batch_size, max_len)

    def mtp_logits(self, input_ids: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor | None = None,
                   segments: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The MTP modules' predictions over a whole sequence: [logits^1 (b, t-1, vocab), ..., logits^D]; logits^k at
        position i predicts token t_{i+k+1}."""
        b, t = input_ids.shape
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand(b, t)
        mask = document_causal_mask(segments) if segments is not None else None
        cos, sin = self.rope(positions)
        hs = mtp_hidden(self.mtp, self.embed, input_ids, hidden, cos, sin, mask)
        return [self.lm_head(module.norm(h)) for module, h in zip(self.mtp, hs)]

    @torch.no_grad()
    def mtp_draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, cache: MLACache) -> int:
        """Feed MTP module 1 the new positions (hidden states h_j with the tokens t_{j+1} after them), cached, and
        return its greedy guess for the token after the last of them (one sequence)."""
        n = next_ids.shape[1]
        positions = torch.arange(cache.length, cache.length + n, device=next_ids.device)[None]
        cos, sin = self.rope(positions)
        h = self.mtp[0](hidden, self.embed(next_ids), cos, sin, None, cache, mode=self.mode)
        cache.length += n
        return int(self.lm_head(self.mtp[0].norm(h[:, -1])).argmax(-1))


class DeepSeekV3(CachesAndMTP, nn.Module):
    """DeepSeek-V3 (arXiv 2412.19437, section 2): MLA in every layer, dense then DeepSeekMoE feed-forward layers, and
    D MTP modules (dslib.mtp) sharing the embedding and output head. forward has dslib.transformer.Transformer's
    signature, so training, packing and generation work unchanged; mode ("absorb"/"naive"): how a cached forward
    attends."""

    def __init__(self, config: V3Config, mode: str = "absorb"):
        super().__init__()
        c = self.config = config
        self.mode = mode
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(V3Block(c, i, moe=i >= c.first_k_dense_replace)
                                    for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        # MTP blocks are MoE layers, as in V3; module k (1-based) writes layer k - 1 of new_mtp_cache().
        self.mtp = nn.ModuleList(MTPModule(c.hidden_size, V3Block(c, k, moe=True), c.rms_norm_eps)
                                 for k in range(c.num_nextn_predict_layers))
        self.apply(self._init)
        if c.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight

    def _init(self, m: nn.Module) -> None:  # normal(0, initializer_range) for every matrix
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.initializer_range)

    def num_params(self, embeddings: bool = True, mtp: bool = False) -> int:
        n = sum(p.numel() for name, p in self.named_parameters() if mtp or not name.startswith("mtp."))
        return n if embeddings else n - self.embed.weight.numel() - self.lm_head.weight.numel()

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The RoPE angles (cos, sin) of positions (b, t) for the decoupled keys and queries."""
        return rope_cos_sin(positions, self.config.qk_rope_head_dim, self.config.rope_theta)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                cache: MLACache | None = None, return_hidden: bool = False, logits_to_keep: int = 0):
        """input_ids (b, t) -> logits (b, t, vocab); with return_hidden, (logits, h) where h (b, t, d) is the last
        layer's output before the final norm: the h^0 that MTP module 1 reads.
        positions, segments, attn_mask, cache and logits_to_keep as in dslib.transformer.Transformer.forward (h is
        always every position's)."""
        positions, attn_mask = forward_inputs(input_ids, positions, segments, attn_mask, cache,
                                              self.config.max_position_embeddings)
        cos, sin = self.rope(positions)
        mode = self.mode if cache is not None else "naive"
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, cache, mode)
        if cache is not None:
            cache.length += input_ids.shape[1]
        logits = self.lm_head(self.norm(x[:, -logits_to_keep:] if logits_to_keep > 0 else x))
        return (logits, x) if return_hidden else logits

    # Decoding is chapter 00's loop unchanged: it asks the model for a cache through new_cache.
    generate = Transformer.generate

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in ("naive", "absorb"):
            raise ValueError(f"mode={value!r} is invalid: 'naive' or 'absorb' is required")
        self._mode = value

    @classmethod
    def from_hf(cls, directory: str | Path, mode: str = "absorb") -> "DeepSeekV3":
        """Load a Hugging Face transformers DeepseekV3 checkpoint (config.json and *.safetensors, one tensor per
        expert, the layout the released weights use) into dslib, without transformers and without unpickling.
        Names are mapped one to one; per-expert matrices are stacked. MTP weights (layer num_hidden_layers onward,
        which transformers does not load either) are not read: the model comes without MTP."""
        config = V3Config.from_dict({**read_hf_config(directory), "num_nextn_predict_layers": 0})
        tensors, model = read_safetensors(directory), cls(config, mode=mode)
        missing, unexpected = model.load_state_dict(hf_to_dslib(tensors, config), strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory}: the checkpoint does not match its config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        return model


_HF_ATTENTION = {"q_proj": "wq", "q_a_proj": "wq_a", "q_a_layernorm": "q_norm", "q_b_proj": "wq_b",
                 "kv_a_proj_with_mqa": "wkv_a", "kv_a_layernorm": "kv_norm", "kv_b_proj": "wkv_b", "o_proj": "wo"}


def hf_to_dslib(tensors: dict[str, torch.Tensor], config: V3Config) -> dict[str, torch.Tensor]:
    """Rename a transformers DeepseekV3ForCausalLM state dict to DeepSeekV3's names; stack per-expert weights
    (mlp.experts.{e}.gate_proj.weight, ...) into the MoE layer's (n_routed_experts, ...) tensors."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, w in tensors.items():
        parts = name.split(".")
        if name == "model.embed_tokens.weight":
            out["embed.weight"] = w
        elif name == "model.norm.weight":
            out["norm.weight"] = w
        elif name == "lm_head.weight":
            out["lm_head.weight"] = w
        elif parts[:2] == ["model", "layers"]:
            i = int(parts[2])
            if i >= config.num_hidden_layers:
                continue  # an MTP layer: not loaded
            rest = parts[3:]
            p = f"layers.{i}."
            if rest[0] == "input_layernorm":
                out[p + "attn_norm.weight"] = w
            elif rest[0] == "post_attention_layernorm":
                out[p + "ffn_norm.weight"] = w
            elif rest[0] == "self_attn":
                out[p + "attn." + _HF_ATTENTION[rest[1]] + "." + rest[2]] = w
            elif rest[0] == "mlp" and rest[1] == "experts" and rest[2].isdigit():
                experts.setdefault((i, rest[3]), {})[int(rest[2])] = w
            elif rest[0] == "mlp" and rest[1] == "experts":  # transformers' fused layout (gate_up_proj, down_proj)
                if rest[2] == "gate_up_proj":
                    gate, up = w.chunk(2, dim=1)
                    out[p + "ffn.experts.gate_proj"], out[p + "ffn.experts.up_proj"] = gate, up
                else:
                    out[p + "ffn.experts." + rest[2]] = w
            elif rest[0] == "mlp":
                out[p + "ffn." + ".".join(rest[1:])] = w
            else:
                raise ValueError(f"unknown tensor {name} in a DeepseekV3 checkpoint")
        else:
            raise ValueError(f"unknown tensor {name} in a DeepseekV3 checkpoint")
    for (i, proj), per_expert in experts.items():
        if sorted(per_expert) != list(range(config.n_routed_experts)):
            raise ValueError(f"layer {i}: {proj} has experts {sorted(per_expert)[:5]}..., "
                             f"not 0..{config.n_routed_experts - 1}")
        out[f"layers.{i}.ffn.experts.{proj}"] = torch.stack([per_expert[e] for e in range(config.n_routed_experts)])
    return out
