# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/00_foundations.py (chapter 00).
# Edit the chapter, then run the export again.

"""The DeepSeek LLM transformer: RMSNorm, RoPE, SwiGLU, grouped-query attention and a KV cache (chapter 00)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from dslib.checkpoint import atomic_write_text


@dataclass
class TransformerConfig:
    """A DeepSeek LLM-style decoder (arXiv 2401.02954, section 2.2: the LLaMA architecture): pre-norm RMSNorm, RoPE,
    SwiGLU feed-forward, multi-head attention with optional grouped KV heads (GQA, as in DeepSeek 67B)."""

    vocab_size: int
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: as many KV heads as query heads (MHA); fewer: GQA; 1: MQA
    intermediate_size: int | None = None  # None: 8/3 d_model rounded up to a multiple of 32
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TransformerConfig.{name}={v!r} is invalid: a positive int is required")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not isinstance(self.n_kv_head, int) or self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"TransformerConfig.n_kv_head={self.n_kv_head!r} is invalid: a positive divisor of "
                             f"n_head={self.n_head} is required")
        if self.d_model % self.n_head:
            raise ValueError(f"TransformerConfig.d_model={self.d_model} is invalid: it must be divisible by "
                             f"n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"TransformerConfig.d_model={self.d_model} is invalid: the head dimension "
                             f"d_model/n_head={self.head_dim} must be even for RoPE")
        if self.intermediate_size is None:
            self.intermediate_size = 32 * math.ceil(8 * self.d_model / 3 / 32)
        if not isinstance(self.intermediate_size, int) or self.intermediate_size < 1:
            raise ValueError(f"TransformerConfig.intermediate_size={self.intermediate_size!r} is invalid: a positive "
                             f"int is required")
        for name in ("rope_theta", "norm_eps", "init_std"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"TransformerConfig.{name}={v!r} is invalid: a positive number is required")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles pos * theta^(-2i/dim), i < dim/2, for integer positions (..., t).
    Returns two tensors of shape (..., t, dim/2)."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (b, h, t, d) by the angles in cos, sin (b, t, d/2) (RoFormer)."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]  # (b, h, t, d/2)
    cos, sin = cos[:, None], sin[:, None]  # (b, 1, t, d/2): broadcast over heads
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (b, h, t, d/2, 2)
    return out.flatten(-2).type_as(x)


class SwiGLU(nn.Module):
    """The feed-forward block: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class KVCache:
    """Keys and values of past positions for every layer, preallocated to max_len: (b, n_kv_head, max_len, head_dim).
    `length` is how many positions are filled; the model advances it after each forward."""

    def __init__(self, config: TransformerConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.max_len = max_len or config.max_seq_len
        shape = (batch_size, config.n_kv_head, self.max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (b, h_kv, t, d) after the filled positions; return all keys and values so far."""
        t = k.shape[2]
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache is full: {self.length} positions + {t} new > max_len {self.max_len}")
        self.k[layer][:, :, self.length:self.length + t] = k
        self.v[layer][:, :, self.length:self.length + t] = v
        return self.k[layer][:, :, :self.length + t], self.v[layer][:, :, :self.length + t]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (indices, in order): a decoder drops the rows that have finished."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]


class Attention(nn.Module):
    """Multi-head attention with RoPE and optional grouped KV heads (each KV head serves n_head / n_kv_head queries)."""

    def __init__(self, c: TransformerConfig, layer: int):
        super().__init__()
        self.c, self.layer = c, layer
        self.q_proj = nn.Linear(c.d_model, c.n_head * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        c = self.c
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=c.n_head)
        k = rearrange(self.k_proj(x), "b t (h d) -> b h t d", h=c.n_kv_head)
        v = rearrange(self.v_proj(x), "b t (h d) -> b h t d", h=c.n_kv_head)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (b, h_kv, past + t, d)
        g = c.n_head // c.n_kv_head
        if g > 1 and cache is not None and (mask is None or mask.shape[1] == 1):
            # GQA with a cache: fold each group's g query heads into the rows of its one KV head, so the cache is read
            # as it is instead of being copied g times per step. Rows are ordered (query head in group, position).
            b, _, t, dh = q.shape
            if mask is not None:
                mask = mask[:, :, None].expand(-1, -1, g, -1, -1).reshape(mask.shape[0], 1, g * t, mask.shape[-1])
            y = F.scaled_dot_product_attention(q.reshape(b, c.n_kv_head, g * t, dh), k, v, attn_mask=mask)
            y = y.reshape(b, c.n_head, t, dh)
        else:
            if g > 1:  # GQA without a cache (training): repeat each KV head for its group of query heads
                k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and cache is None)
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)"))


class Block(nn.Module):
    def __init__(self, c: TransformerConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c, layer)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = SwiGLU(c.d_model, c.intermediate_size)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


def document_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """Attention mask for packed rows (b, t) of segment ids: position i sees j when j <= i and both lie in the same
    document. Returns a bool tensor (b, 1, t, t), True where attention is allowed."""
    t = segments.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


def forward_inputs(input_ids: torch.Tensor, positions: torch.Tensor | None, segments: torch.Tensor | None,
                   attn_mask: torch.Tensor | None, cache, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What every dslib language model's forward does before its layers: (positions, attn_mask) for input_ids (b, t).
    segments turn into document_causal_mask; a sequence longer than max_seq_len without a cache is refused; positions
    default to 0..t-1 after the cache's filled part; a chunk of t > 1 tokens after cached ones gets the causal mask
    that lets query i see keys 0 .. past + i."""
    b, t = input_ids.shape
    if segments is not None:
        attn_mask = document_causal_mask(segments)
    past = cache.length if cache is not None else 0
    if past + t > max_seq_len and cache is None:
        raise ValueError(f"sequence of {t} tokens is longer than max_seq_len={max_seq_len}")
    if positions is None:
        positions = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
    if cache is not None and attn_mask is None and t > 1:
        attn_mask = torch.ones(t, past + t, dtype=torch.bool, device=input_ids.device).tril(past)[None, None]
    return positions, attn_mask


class LlamaFolder:
    """Transformer's door to Hugging Face transformers, where DeepSeek LLM's architecture is Llama's (the work is done
    by write_llama and read_llama, section 5)."""

    def to_hf(self, directory: str | Path, tokenizer=None) -> Path:
        """Write a folder that transformers loads as a LlamaForCausalLM (and, given the world's tokenizer, with
        AutoTokenizer): config.json, model.safetensors, generation_config.json, the tokenizer files (see write_llama)."""
        return write_llama(self, directory, tokenizer)

    @classmethod
    def from_hf(cls, directory: str | Path) -> "Transformer":
        """Read a transformers Llama folder with json and safetensors only, into a float32 Transformer (see
        read_llama)."""
        return read_llama(directory, cls)


class Transformer(LlamaFolder, nn.Module):
    """The dense decoder-only LM. forward(input_ids (b, t)) -> logits (b, t, vocab)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.init_std)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.weight.numel() - self.lm_head.weight.numel()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """input_ids (b, t) -> logits (b, t, vocab).
        positions (b, t): RoPE positions (default 0..t-1, or following the cache's filled part).
        segments (b, t): document ids of packed rows; attention stays within a document (document_causal_mask).
        attn_mask (b, 1, t, past + t) bool, True where attention is allowed (default: causal).
        cache: a KVCache to decode incrementally; it is advanced by t.
        logits_to_keep: k > 0 computes the output head on the last k positions only, (b, k, vocab) (a prefill needs the
            last one); 0 keeps every position (transformers' name for the same option)."""
        c = self.config
        positions, attn_mask = forward_inputs(input_ids, positions, segments, attn_mask, cache, c.max_seq_len)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.lm_head(self.norm(x[:, -logits_to_keep:] if logits_to_keep > 0 else x))

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KVCache for this model, on its device and in its dtype."""
        w = self.embed.weight
        return KVCache(self.config, batch_size, max_len, w.device, w.dtype)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 stop_id: int | None = None, pad_id: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue equal-length prompts (b, t0) with a KV cache: greedy when temperature is 0, else sampled.
        Rows that emit stop_id are padded with pad_id afterwards. Returns (b, t0 + n) with n <= max_new_tokens."""
        if max_new_tokens < 0 or temperature < 0:
            raise ValueError("max_new_tokens and temperature must be non-negative")
        b, t0 = input_ids.shape
        max_new_tokens = min(max_new_tokens, self.config.max_seq_len - t0)
        if max_new_tokens <= 0:
            return input_ids
        cache = self.new_cache(b, t0 + max_new_tokens)  # a model with another cache overrides new_cache
        logits = self(input_ids, cache=cache)[:, -1]
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        out = [input_ids]
        for i in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial(F.softmax(logits.float() / temperature, -1), 1, generator=generator)[:, 0]
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out.append(nxt[:, None])
            if stop_id is not None:
                done |= nxt == stop_id
                if bool(done.all()):
                    break
            if i + 1 < max_new_tokens:
                logits = self(nxt[:, None], cache=cache)[:, -1]
        return torch.cat(out, dim=1)


HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json")  # what to_hf writes
_LLAMA_LAYER = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
                **{f"attn.{p}": f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
                **{f"mlp.{p}": f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}}


def llama_names(n_layer: int) -> dict[str, str]:
    """Transformer's parameter names -> transformers LlamaForCausalLM's tensor names, for n_layer layers."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    for i in range(n_layer):
        for ours, theirs in _LLAMA_LAYER.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def rope_halves_order(head_dim: int) -> torch.Tensor:
    """Llama's feature j of a head is our feature order[j]: order = 0, 2, 4, ..., d-2, 1, 3, ..., d-1. Our pairs
    (x[2i], x[2i+1]) become Llama's halves (x[i], x[i + d/2]), rotated by the same angle."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def permute_rope_rows(w: torch.Tensor, n_heads: int, to_llama: bool) -> torch.Tensor:
    """Reorder the output rows of a q_proj or k_proj weight (n_heads * head_dim, d_model) inside each head: from our
    interleaved RoPE layout to Llama's halves (to_llama), or back. Scores q.k do not change: q and k move alike."""
    order = rope_halves_order(w.shape[0] // n_heads)
    if not to_llama:
        order = torch.argsort(order)  # the inverse permutation
    return rearrange(rearrange(w, "(h d) m -> h d m", h=n_heads)[:, order], "h d m -> (h d) m")


def llama_config(c: TransformerConfig, dtype: torch.dtype = torch.float32, tokenizer=None) -> dict:
    """config.json of the transformers Llama model that computes what a Transformer with config c computes. rope_theta
    is written twice, in rope_parameters (transformers 5) and at the top level (older versions)."""
    dtype_name = str(dtype).removeprefix("torch.")
    ids = {} if tokenizer is None else {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                                        "pad_token_id": tokenizer.pad_id}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
            "hidden_size": c.d_model, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
            "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "initializer_range": c.init_std,
            "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "tie_word_embeddings": False, "torch_dtype": dtype_name, "dtype": dtype_name, "use_cache": True, **ids}


def config_from_llama(raw: dict, where: str = "config.json") -> tuple[TransformerConfig, bool]:
    """(TransformerConfig, tie_word_embeddings) from a Llama config.json. What Transformer cannot compute (another
    model_type, RoPE scaling, biases, another activation, heads narrower or wider than hidden_size / heads) is refused
    with a ValueError naming the field; fields Llama has defaults for take Llama's defaults."""
    def refuse(field: str, why: str) -> ValueError:
        return ValueError(f"{where}: {field}={raw.get(field)!r} is not supported: {why}")

    if raw.get("model_type") != "llama":
        raise refuse("model_type", "Transformer.from_hf reads Llama folders (DeepSeek LLM's architecture) only")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if field not in raw:
            raise ValueError(f"{where}: the field {field!r} is missing (a Llama config.json needs it)")
    if raw.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", "dslib's SwiGLU uses silu")
    for field in ("attention_bias", "mlp_bias"):
        if raw.get(field, False):
            raise refuse(field, "dslib's projections have no bias")
    rope = raw.get("rope_parameters") or {}
    for field, value in (("rope_scaling", raw.get("rope_scaling") or {}), ("rope_parameters", rope)):
        if value.get("rope_type", value.get("type", "default")) != "default":
            raise refuse(field, "dslib's RoPE has no scaling (rope_type 'default' only)")
    if rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise refuse("partial_rotary_factor", "dslib's RoPE rotates every feature of a head")
    heads = raw["num_attention_heads"]
    if raw.get("head_dim") is not None and raw["head_dim"] * heads != raw["hidden_size"]:
        raise refuse("head_dim", f"dslib's heads split hidden_size={raw['hidden_size']} evenly into {heads}")
    try:
        config = TransformerConfig(
            vocab_size=raw["vocab_size"], d_model=raw["hidden_size"], n_layer=raw["num_hidden_layers"], n_head=heads,
            n_kv_head=raw.get("num_key_value_heads") or heads, intermediate_size=raw["intermediate_size"],
            max_seq_len=raw.get("max_position_embeddings", 2048),
            rope_theta=rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
            norm_eps=raw.get("rms_norm_eps", 1e-6), init_std=raw.get("initializer_range", 0.02))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    return config, bool(raw.get("tie_word_embeddings", False))


def llama_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A dense Transformer's weights under LlamaForCausalLM's names, q_proj and k_proj rows permuted per head to
    Llama's RoPE layout (permute_rope_rows), as contiguous CPU tensors."""
    c, state = model.config, model.state_dict()
    names = llama_names(c.n_layer)
    extra = [k for k in state if k not in names]
    if extra or len(state) != len(names):
        raise TypeError(f"to_hf writes a dense Transformer as Llama; {type(model).__name__} has {extra[:1] or 'fewer'} "
                        f"tensors that a Llama model has no place for")
    out = {}
    for ours, theirs in names.items():
        w = state[ours].detach().to("cpu")
        if ours.endswith(("q_proj.weight", "k_proj.weight")):
            w = permute_rope_rows(w, c.n_head if ".q_proj" in ours else c.n_kv_head, to_llama=True)
        out[theirs] = w.clone().contiguous()  # a copy: save_file refuses tensors that share memory
    return out


def write_hf_folder(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor], generation: dict,
                    tokenizer=None, model_max_length: int | None = None) -> Path:
    """Write a transformers folder: config.json, generation_config.json, model.safetensors and, with a tokenizer, its
    files. Everything is written into a hidden temporary folder beside `directory`, which then replaces it, so an
    interrupted export never leaves a folder that looks complete. An existing folder is replaced only when it is
    empty or holds nothing but files that to_hf writes (HF_FILES). Used by every to_hf of dslib."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder: to_hf writes a folder")
    if directory.is_dir():
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in HF_FILES)
        if foreign:
            raise FileExistsError(f"{directory} holds {foreign[0]!r}, which to_hf did not write: to_hf replaces the "
                                  f"whole folder, so it writes into a new, an empty or an earlier to_hf folder only")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},  # copies: save_file
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})  # refuses tensors sharing memory
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.to_hf(tmp, model_max_length=model_max_length)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private to its owner
        if directory.exists():  # move the old folder aside, the new one in, then delete the old one
            old = tmp.with_suffix(".old")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def hf_generation_config(max_length: int, tokenizer=None) -> dict:
    """generation_config.json: greedy up to max_length; with a tokenizer, its ids, stopping where the course's
    `complete` stops too (after </answer>, when there is one)."""
    generation = {"max_length": max_length, "do_sample": False}
    if tokenizer is not None:
        stops = [tokenizer.eos_id] + [tokenizer.stoi[s] for s in ("</answer>",) if s in tokenizer.stoi]
        generation.update(bos_token_id=tokenizer.bos_id, eos_token_id=stops, pad_token_id=tokenizer.pad_id)
    return generation


def write_llama(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Transformer.to_hf: a transformers Llama folder (write_hf_folder, above) of `model`, with the tokenizer's files
    and token ids when one is given."""
    c = model.config
    if tokenizer is not None and tokenizer.vocab_size != c.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model's vocab_size is {c.vocab_size}")
    tensors = llama_state_dict(model)
    dtype = next(iter(tensors.values())).dtype
    return write_hf_folder(directory, llama_config(c, dtype, tokenizer), tensors,
                           hf_generation_config(c.max_seq_len, tokenizer), tokenizer, model_max_length=c.max_seq_len)


def read_safetensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in a folder (one file, or the shards of a large model), by name, read
    without unpickling anything. A name stored twice, or a folder without tensors, is an error."""
    from safetensors import safe_open

    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if name in tensors:
                    raise ValueError(f"{directory}: tensor {name!r} is stored twice (again in {f.name})")
                tensors[name] = st.get_tensor(name)
    if not tensors:
        raise FileNotFoundError(f"no *.safetensors file with tensors in {directory}")
    return tensors


def read_llama(directory: str | Path, cls: type | None = None) -> "Transformer":
    """Transformer.from_hf: read a transformers Llama folder (config.json and every *.safetensors file in it) with
    json and safetensors only (no transformers, nothing unpickled), into a float32 Transformer. Raises ValueError
    naming the field that Transformer cannot represent (config_from_llama) or the tensor that does not fit the config
    (missing, unexpected, wrong shape). With tie_word_embeddings, the output head is a copy of the embedding."""
    cls = Transformer if cls is None else cls
    if cls.__init__ is not Transformer.__init__:
        raise TypeError(f"{cls.__name__}.from_hf: a Llama folder holds a dense Transformer, not a {cls.__name__}")
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: from_hf needs a Llama folder with config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    config, tied = config_from_llama(raw, str(path))
    tensors = read_safetensors(directory)
    names = llama_names(config.n_layer)
    if tied and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # one matrix in Llama, two copies in dslib
    theirs = set(names.values())
    unexpected = sorted(k for k in tensors if k not in theirs and not k.endswith("rotary_emb.inv_freq"))
    missing = [k for k in names.values() if k not in tensors]
    if missing:
        raise ValueError(f"{directory}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise ValueError(f"{directory}: tensor {unexpected[0]!r} is not part of the Llama model that config.json "
                         f"describes ({len(unexpected)} unexpected in all)")
    model = cls(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state = {}
    for ours, name in names.items():
        w = tensors[name]
        if w.shape != shapes[ours]:
            raise ValueError(f"{directory}: tensor {name!r} has shape {tuple(w.shape)}, but config.json implies "
                             f"{tuple(shapes[ours])}")
        if ours.endswith(("q_proj.weight", "k_proj.weight")):
            w = permute_rope_rows(w, config.n_head if ".q_proj" in ours else config.n_kv_head, to_llama=False)
        state[ours] = w
    model.load_state_dict(state)  # copies into the float32 parameters
    return model
