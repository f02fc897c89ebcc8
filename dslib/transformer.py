# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/00_foundations.py (chapter 00).
# Edit the chapter, then run the export again.

"""The DeepSeek LLM transformer: RMSNorm, RoPE, SwiGLU, grouped-query attention and a KV cache (chapter 00)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


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


class Transformer(nn.Module):
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
