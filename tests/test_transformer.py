"""Unit tests of dslib.transformer: config checks, RMSNorm, RoPE, attention, the KV cache and generation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dslib.transformer import (KVCache, RMSNorm, Transformer, TransformerConfig, apply_rope, document_causal_mask,
                               rope_cos_sin)

V = 40


def tiny(n_head: int = 4, n_kv_head: int | None = None, d_model: int = 32, n_layer: int = 2, seed: int = 0,
         init_std: float = 0.2, max_seq_len: int = 64) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(TransformerConfig(vocab_size=V, d_model=d_model, n_layer=n_layer, n_head=n_head,
                                          n_kv_head=n_kv_head, max_seq_len=max_seq_len, init_std=init_std))
    return model.eval()


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("kwargs, field", [
    (dict(d_model=30, n_head=4), "d_model"),
    (dict(d_model=12, n_head=4), "d_model"),  # head dim 3 is odd
    (dict(d_model=32, n_head=4, n_kv_head=3), "n_kv_head"),
    (dict(d_model=32, n_head=4, n_kv_head=0), "n_kv_head"),
    (dict(d_model=32, n_head=4, n_kv_head=8), "n_kv_head"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(d_model=0), "d_model"),
    (dict(d_model=-32), "d_model"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_head=0), "n_head"),
    (dict(max_seq_len=0), "max_seq_len"),
    (dict(intermediate_size=0), "intermediate_size"),
    (dict(norm_eps=0.0), "norm_eps"),
    (dict(rope_theta=-1.0), "rope_theta"),
    (dict(init_std=0), "init_std"),
    (dict(d_model=32.0), "d_model"),
])
def test_config_validation_names_the_field(kwargs: dict, field: str):
    kwargs = {"vocab_size": V, **kwargs}
    with pytest.raises(ValueError, match=rf"TransformerConfig\.{field}="):
        TransformerConfig(**kwargs)


def test_config_defaults():
    c = TransformerConfig(vocab_size=V, d_model=48, n_head=4)
    assert c.n_kv_head == 4 and c.head_dim == 12
    assert c.intermediate_size % 32 == 0 and c.intermediate_size >= 8 * 48 / 3
    assert TransformerConfig(**c.to_dict()) == c


# ---------------------------------------------------------------------------------------------------------------------
# RMSNorm and RoPE


def test_rmsnorm_formula():
    torch.manual_seed(0)
    norm = RMSNorm(16, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(16))
    x = torch.randn(3, 5, 16) * 7
    want = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    torch.testing.assert_close(norm(x), want, rtol=1e-5, atol=1e-5)
    # a float16 input is normalised in float32: no overflow of x**2 for large values
    big = torch.full((1, 16), 300.0)
    torch.testing.assert_close(norm(big.half()).float(), norm.weight.detach()[None], rtol=2e-3, atol=2e-3)


def test_apply_rope_is_complex_multiplication():
    torch.manual_seed(0)
    b, h, t, d, theta = 2, 3, 7, 8, 10000.0
    x = torch.randn(b, h, t, d)
    positions = torch.randint(0, 100, (b, t))
    cos, sin = rope_cos_sin(positions, d, theta)
    assert cos.shape == sin.shape == (b, t, d // 2)
    got = apply_rope(x, cos, sin)
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = positions.double()[..., None] * freqs  # (b, t, d/2)
    z = torch.view_as_complex(x.double().reshape(b, h, t, d // 2, 2).contiguous())
    rotated = z * torch.polar(torch.ones_like(angles), angles)[:, None]
    want = torch.view_as_real(rotated).reshape(b, h, t, d)
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    # position 0 is the identity; a rotation keeps the norm of each pair
    cos0, sin0 = rope_cos_sin(torch.zeros(1, 1, dtype=torch.long), d)
    torch.testing.assert_close(apply_rope(x[:1, :, :1], cos0, sin0), x[:1, :, :1])
    torch.testing.assert_close(got.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def test_rope_dot_products_depend_only_on_relative_position():
    torch.manual_seed(0)
    d = 16
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def score(m: int, n: int) -> float:
        cq, sq = rope_cos_sin(torch.tensor([[m]]), d)
        ck, sk = rope_cos_sin(torch.tensor([[n]]), d)
        return float((apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum())

    base = score(5, 2)
    for m, n in [(3, 0), (13, 10), (40, 37), (103, 100)]:
        assert score(m, n) == pytest.approx(base, rel=1e-4, abs=1e-5)
    assert abs(score(5, 1) - base) > 1e-3  # a different offset gives a different score


# ---------------------------------------------------------------------------------------------------------------------
# Attention against a naive loop


def naive_attention(attn, x: torch.Tensor) -> torch.Tensor:
    """Causal attention of one layer, head by head, with RoPE as complex rotation and explicit softmax."""
    c = attn.c
    b, t, _ = x.shape
    d, g = c.head_dim, c.n_head // c.n_kv_head
    q = attn.q_proj(x).view(b, t, c.n_head, d)
    k = attn.k_proj(x).view(b, t, c.n_kv_head, d)
    v = attn.v_proj(x).view(b, t, c.n_kv_head, d)
    freqs = c.rope_theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(t, d // 2, dtype=torch.float64), torch.arange(t, dtype=torch.float64)[:, None] * freqs)

    def rope(y):  # (b, t, d)
        return torch.view_as_real(torch.view_as_complex(y.double().reshape(b, t, d // 2, 2).contiguous()) * rot) \
            .reshape(b, t, d)

    heads = []
    for h in range(c.n_head):
        kv = h // g
        qh, kh, vh = rope(q[:, :, h]), rope(k[:, :, kv]), v[:, :, kv].double()
        scores = qh @ kh.transpose(1, 2) / math.sqrt(d)
        scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
        heads.append(torch.softmax(scores, -1) @ vh)
    return attn.o_proj(torch.cat(heads, -1).float())


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_matches_naive_loop(n_kv_head: int):
    model = tiny(n_head=4, n_kv_head=n_kv_head, d_model=32)
    attn = model.layers[0].attn
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(3))
    pos = torch.arange(9).expand(2, 9)
    cos, sin = rope_cos_sin(pos, 8)
    with torch.no_grad():
        got = attn(x, cos, sin, None)
        want = naive_attention(attn, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_document_causal_mask():
    seg = torch.tensor([[1, 1, 2, 2, 2, 0]])
    m = document_causal_mask(seg)
    assert m.shape == (1, 1, 6, 6) and m.dtype == torch.bool
    want = torch.zeros(6, 6, dtype=torch.bool)
    for i in range(6):
        for j in range(i + 1):
            want[i, j] = seg[0, i] == seg[0, j]
    assert torch.equal(m[0, 0], want)


# ---------------------------------------------------------------------------------------------------------------------
# KV cache


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
def test_cached_decoding_equals_full_forward(n_kv_head: int):
    model = tiny(n_head=4, n_kv_head=n_kv_head)
    x = tokens(3, 20)
    with torch.no_grad():
        full = model(x)
        cache = KVCache(model.config, batch_size=3, max_len=20)
        parts = [model(x[:, :7], cache=cache)]  # prefill a chunk
        assert cache.length == 7
        parts.append(model(x[:, 7:10], cache=cache))  # a second chunk after cached positions
        for i in range(10, 20):  # then single tokens
            parts.append(model(x[:, i:i + 1], cache=cache))
        assert cache.length == 20
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_kv_cache_overflow_raises():
    model = tiny()
    cache = KVCache(model.config, batch_size=1, max_len=8)
    with torch.no_grad():
        model(tokens(1, 6), cache=cache)
        with pytest.raises(ValueError, match="max_len"):
            model(tokens(1, 3), cache=cache)
        cache2 = KVCache(model.config, batch_size=1, max_len=4)
        with pytest.raises(ValueError):
            model(tokens(1, 5), cache=cache2)


@pytest.mark.parametrize("n_layer, b, n_head, n_kv, max_len, d_model", [(2, 3, 4, 2, 10, 32), (1, 1, 4, 1, 64, 16),
                                                                       (2, 2, 2, 2, 7, 32)])
def test_kv_cache_nbytes(n_layer, b, n_head, n_kv, max_len, d_model):
    c = TransformerConfig(vocab_size=V, d_model=d_model, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv)
    cache = KVCache(c, batch_size=b, max_len=max_len)
    assert cache.nbytes() == 2 * n_layer * b * n_kv * max_len * c.head_dim * 4
    half = KVCache(c, batch_size=b, max_len=max_len, dtype=torch.float16)
    assert half.nbytes() == cache.nbytes() // 2
    assert KVCache(c, batch_size=1).max_len == c.max_seq_len


def test_shifting_all_positions_does_not_change_logits():
    model = tiny()
    x = tokens(2, 10)
    with torch.no_grad():
        a = model(x)
        b = model(x, positions=torch.arange(10, 20).expand(2, 10))
        c = model(x, positions=torch.arange(10).flip(0).expand(2, 10))  # not a shift: must differ
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3)


def test_packed_row_equals_documents_alone():
    model = tiny()
    d1, d2 = tokens(1, 7, seed=5), tokens(1, 11, seed=6)
    row = torch.cat([d1, d2], 1)
    segments = torch.tensor([[1] * 7 + [2] * 11])
    positions = torch.tensor([list(range(7)) + list(range(11))])
    with torch.no_grad():
        packed = model(row, positions=positions, segments=segments)
        alone1, alone2 = model(d1), model(d2)
        unmasked = model(row, positions=positions)
    torch.testing.assert_close(packed[:, :7], alone1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed[:, 7:], alone2, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unmasked[:, 7:], alone2, atol=1e-3)  # without segments the second document sees the first


def test_forward_rejects_too_long_sequences():
    model = tiny(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 17))


# ---------------------------------------------------------------------------------------------------------------------
# Generation


def manual_greedy(model: Transformer, x: torch.Tensor, n: int) -> torch.Tensor:
    with torch.no_grad():
        for _ in range(n):
            nxt = model(x)[:, -1].argmax(-1)
            x = torch.cat([x, nxt[:, None]], 1)
    return x


@pytest.mark.parametrize("n_kv_head", [4, 1])
def test_greedy_generate_equals_manual_loop(n_kv_head: int):
    model = tiny(n_kv_head=n_kv_head)
    x = tokens(3, 5)
    out = model.generate(x, 15)
    assert out.shape == (3, 20)
    assert torch.equal(out, manual_greedy(model, x, 15))
    assert torch.equal(model.generate(x, 0), x)


def test_generate_stops_at_max_seq_len():
    model = tiny(max_seq_len=12)
    x = tokens(2, 5)
    out = model.generate(x, 50)
    assert out.shape == (2, 12)
    assert torch.equal(out, manual_greedy(model, x, 7))


def test_generate_stop_id_pads_finished_rows():
    model = tiny(seed=4)
    x = tokens(4, 3, seed=9)
    free = model.generate(x, 20)
    gen = free[:, 3:]
    stop = int(gen[0, 2])  # a token that row 0 emits
    pad = V - 1 if stop != V - 1 else V - 2
    out = model.generate(x, 20, stop_id=stop, pad_id=pad)
    firsts = []
    for r in range(4):
        hits = (gen[r] == stop).nonzero().flatten().tolist()
        firsts.append(hits[0] if hits else None)
    n = max(firsts) + 1 if all(f is not None for f in firsts) else 20
    assert out.shape == (4, 3 + n)
    for r, f in enumerate(firsts):
        row = out[r, 3:].tolist()
        if f is None:
            assert row == gen[r, :n].tolist()
        else:
            assert row[:f + 1] == gen[r, :f + 1].tolist()  # up to and including the stop token
            assert row[f + 1:] == [pad] * (n - f - 1)
    assert firsts[0] is not None and firsts[0] <= 2


def test_generate_stops_early_when_all_rows_finish():
    model = tiny(seed=4)
    x = tokens(1, 3, seed=9)
    first = int(model.generate(x, 1)[0, -1])
    out = model.generate(x, 20, stop_id=first)
    assert out.shape == (1, 4) and int(out[0, -1]) == first


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = tiny()
    x = tokens(4, 4)

    def sample(seed: int, temperature: float = 1.0) -> torch.Tensor:
        return model.generate(x, 16, temperature=temperature, generator=torch.Generator().manual_seed(seed))

    a, b, c = sample(0), sample(0), sample(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, model.generate(x, 16))  # sampling at temperature 1 is not greedy
    assert torch.equal(sample(3, temperature=1e-6), model.generate(x, 16))  # a tiny temperature is greedy


def test_generate_rejects_negative_arguments():
    model = tiny()
    with pytest.raises(ValueError):
        model.generate(tokens(1, 3), -1)
    with pytest.raises(ValueError):
        model.generate(tokens(1, 3), 3, temperature=-0.5)


def test_num_params():
    model = tiny(n_kv_head=2)
    c = model.config
    per_layer = (2 * c.d_model  # norms
                 + c.d_model * c.n_head * c.head_dim * 2  # q, o
                 + c.d_model * c.n_kv_head * c.head_dim * 2  # k, v
                 + 3 * c.d_model * c.intermediate_size)
    total = 2 * V * c.d_model + c.n_layer * per_layer + c.d_model
    assert model.num_params() == total
    assert model.num_params(embeddings=False) == total - 2 * V * c.d_model
