"""Unit tests of dslib.mla: config checks, the layer against a per-head loop, absorbed == naive == uncached, RoPE
positions across cached steps, packed rows, cache bytes against Table 1, the real configurations, training, and YaRN
(the rope_scaling of the released V2/V3 configs) against transformers."""

from __future__ import annotations

import math

import pytest
import torch

from dslib.mla import (MLA, MODES, MLACache, MLAConfig, MLATransformer, MLATransformerConfig, bytes_per_element,
                       check_rope_scaling, kv_cache_bytes, kv_cache_elements, rope_frequencies, scaled_rope_cos_sin,
                       yarn_correction_range, yarn_mscale, yarn_softmax_factor)
from dslib.train import TrainConfig, Trainer
from dslib.transformer import KVCache, TransformerConfig, rope_cos_sin
from dslib.world import PackedData, World

V = 40


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(q_lora_rank: int = 0, seed: int = 0, n_layer: int = 2, init_std: float = 0.1, max_seq_len: int = 64,
         **kwargs) -> MLATransformer:
    torch.manual_seed(seed)
    shape = dict(d_model=32, n_head=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    shape.update(kwargs)
    config = MLATransformerConfig(vocab_size=V, n_layer=n_layer, q_lora_rank=q_lora_rank, init_std=init_std,
                                  max_seq_len=max_seq_len, **shape)
    return MLATransformer(config).eval()


def tokens(b: int, t: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# Config


@pytest.mark.parametrize("kwargs, field", [
    (dict(qk_rope_head_dim=7), "qk_rope_head_dim"),  # odd: RoPE rotates pairs
    (dict(qk_rope_head_dim=0), "qk_rope_head_dim"),
    (dict(d_model=64, kv_lora_rank=128), "kv_lora_rank"),  # a latent wider than the hidden state
    (dict(d_model=64, q_lora_rank=96), "q_lora_rank"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank=-1), "q_lora_rank"),
    (dict(d_model=0), "d_model"),
    (dict(n_head=-2), "n_head"),
    (dict(qk_nope_head_dim=0), "qk_nope_head_dim"),
    (dict(v_head_dim=0), "v_head_dim"),
    (dict(d_model=64.0), "d_model"),
    (dict(rope_theta=0.0), "rope_theta"),
    (dict(norm_eps=-1e-6), "norm_eps"),
])
def test_config_validation_names_the_field(kwargs: dict, field: str):
    with pytest.raises(ValueError, match=rf"MLAConfig\.{field}="):
        MLAConfig(**kwargs)


@pytest.mark.parametrize("kwargs, field", [
    (dict(vocab_size=0), "vocab_size"), (dict(n_layer=0), "n_layer"), (dict(max_seq_len=-1), "max_seq_len"),
    (dict(intermediate_size=0), "intermediate_size"), (dict(init_std=0), "init_std"),
    (dict(qk_rope_head_dim=5), "qk_rope_head_dim"),
])
def test_model_config_validation_names_the_field(kwargs: dict, field: str):
    kwargs = {"vocab_size": V, **kwargs}
    with pytest.raises(ValueError, match=rf"MLATransformerConfig\.{field}="):
        MLATransformerConfig(**kwargs)


def test_config_defaults_and_round_trip():
    c = MLAConfig(q_lora_rank=None)
    assert c.q_lora_rank == 0 and c.qk_head_dim == c.qk_nope_head_dim + c.qk_rope_head_dim
    assert c.cache_elements == c.kv_lora_rank + c.qk_rope_head_dim
    m = MLATransformerConfig(vocab_size=V, d_model=96)
    assert m.intermediate_size % 32 == 0 and m.intermediate_size >= 8 * 96 / 3
    assert MLATransformerConfig(**m.to_dict()) == m


def test_mode_is_checked():
    model = tiny()
    with pytest.raises(ValueError, match="mode"):
        model.mode = "fast"
    with pytest.raises(ValueError, match="mode"):
        MLATransformer(model.config, mode="absorbed")


# ---------------------------------------------------------------------------------------------------------------------
# The layer against a per-head loop written from the equations


def per_head_loop(attn: MLA, x: torch.Tensor) -> torch.Tensor:
    """Causal MLA in float64, one token and one head at a time (DeepSeek-V2, Appendix C)."""
    c = attn.c
    dn, dr, dv, dc, h = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank, c.n_head
    W = {k: p.detach().double() for k, p in attn.named_parameters()}
    up = W["wkv_b.weight"].view(h, dn + dv, dc)
    q_all = (W["wq_b.weight"] if c.q_lora_rank else W["wq.weight"]).view(h, dn + dr, -1)
    w_o = W["wo.weight"].view(-1, h, dv)

    def rms(v, g):
        return v / torch.sqrt((v * v).mean() + c.norm_eps) * g

    def rope(v, pos):
        angles = pos * c.rope_theta ** (-torch.arange(0, dr, 2, dtype=torch.float64) / dr)
        return torch.view_as_real(torch.view_as_complex(v.reshape(-1, 2).contiguous()) * torch.exp(1j * angles)) \
            .flatten()

    xs = x.double()
    out = torch.zeros(*x.shape[:2], c.d_model, dtype=torch.float64)
    for b in range(x.shape[0]):
        ckv = [rms(W["wkv_a.weight"][:dc] @ xs[b, j], W["kv_norm.weight"]) for j in range(x.shape[1])]
        kr = [rope(W["wkv_a.weight"][dc:] @ xs[b, j], j) for j in range(x.shape[1])]
        for t in range(x.shape[1]):
            cq = rms(W["wq_a.weight"] @ xs[b, t], W["q_norm.weight"]) if c.q_lora_rank else xs[b, t]
            for i in range(h):
                q = torch.cat([q_all[i, :dn] @ cq, rope(q_all[i, dn:] @ cq, t)])
                s = torch.stack([q @ torch.cat([up[i, :dn] @ ckv[j], kr[j]]) for j in range(t + 1)])
                p = torch.softmax(s / math.sqrt(dn + dr), 0)
                out[b, t] += w_o[:, i] @ sum(p[j] * (up[i, dn:] @ ckv[j]) for j in range(t + 1))
    return out.float()


@pytest.mark.parametrize("q_lora_rank", [0, 24])
@pytest.mark.parametrize("mode", MODES)
def test_layer_matches_per_head_loop(q_lora_rank: int, mode: str):
    torch.manual_seed(0)
    c = MLAConfig(d_model=32, n_head=4, q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8,
                  qk_rope_head_dim=4, v_head_dim=10)
    attn = MLA(c)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 6, 32)
    cos, sin = rope_cos_sin(torch.arange(6).expand(2, 6), 4)
    with torch.no_grad():
        got = attn(x, cos, sin, mode=mode)
    torch.testing.assert_close(got, per_head_loop(attn, x), rtol=1e-4, atol=1e-5)


def test_one_rope_key_is_shared_by_all_heads():
    c = MLAConfig(d_model=32, n_head=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)
    attn = MLA(c)
    assert attn.wkv_a.weight.shape == (16 + 4, 32)  # [W^DKV; W^KR]: one d_h^R key, not one per head
    assert attn.wkv_b.weight.shape == (4 * (8 + 8), 16)
    assert attn.softmax_scale == pytest.approx(1 / math.sqrt(8 + 4))


# ---------------------------------------------------------------------------------------------------------------------
# Equivalences: absorbed == naive == full forward without a cache


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_absorbed_equals_naive_equals_uncached(q_lora_rank: int):
    model = tiny(q_lora_rank=q_lora_rank)
    x = tokens(3, 20)
    with torch.no_grad():
        full = model(x)
        got = {}
        for mode in MODES:
            model.mode = mode
            cache = model.new_cache(3, 20)
            parts = [model(x[:, :7], cache=cache), model(x[:, 7:10], cache=cache)]  # prefill, then a chunk
            parts += [model(x[:, i:i + 1], cache=cache) for i in range(10, 20)]  # then single tokens
            assert cache.length == 20
            got[mode] = torch.cat(parts, 1)
    torch.testing.assert_close(got["naive"], full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["absorb"], full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["absorb"], got["naive"], rtol=1e-5, atol=1e-5)


def test_masked_decoding_step_equals_naive_and_ignores_hidden_keys():
    """A single decoding step with an attention mask (left padding: some cached keys hidden) gives the same logits in
    both modes, and what sits behind the mask does not change them."""
    model = tiny()
    x = tokens(3, 12, seed=8)
    mask = torch.ones(3, 1, 12, 12, dtype=torch.bool).tril()
    mask[1, ..., :4] = False  # row 1: its first 4 positions are padding
    mask[1, 0, :4, :4] = torch.eye(4, dtype=torch.bool)  # each padding position sees itself, as left_pad's mask does
    got = {}
    with torch.no_grad():
        for mode in MODES:
            model.mode = mode
            cache = model.new_cache(3, 12)
            model(x[:, :11], attn_mask=mask[:, :, :11, :11], cache=cache)
            got[mode] = model(x[:, 11:], attn_mask=mask[:, :, 11:], cache=cache)
            cache.kv[0][1, :4].normal_()  # change what the mask hides in the first layer: the step must not see it
            cache.pe[0][1, :4].normal_()
            cache.length = 11
            torch.testing.assert_close(model(x[:, 11:], attn_mask=mask[:, :, 11:], cache=cache), got[mode], rtol=0,
                                       atol=0)
    torch.testing.assert_close(got["absorb"], got["naive"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got["absorb"][1], got["absorb"][0])


def test_rope_positions_follow_the_cache():
    """Prefill then single tokens equals a full forward, also when positions start later (a shifted sequence): the
    cached RoPE keys keep their positions and each new query gets the next one."""
    model = tiny()
    x = tokens(2, 16, seed=4)
    start = 37
    pos = torch.arange(start, start + 16).expand(2, 16)
    with torch.no_grad():
        full = model(x, positions=pos)
        for mode in MODES:
            model.mode = mode
            cache = model.new_cache(2, 16)
            parts = [model(x[:, :5], positions=pos[:, :5], cache=cache)]
            parts += [model(x[:, i:i + 1], positions=pos[:, i:i + 1], cache=cache) for i in range(5, 16)]
            torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
        # default positions continue from the cache's length
        cache = model.new_cache(2, 16)
        parts = [model(x[:, :5], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(5, 16)]
        torch.testing.assert_close(torch.cat(parts, 1), model(x), rtol=1e-5, atol=1e-5)
        # RoPE is relative: shifting every position leaves the logits unchanged; reversing them does not
        torch.testing.assert_close(full, model(x), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(model(x, positions=torch.arange(16).flip(0).expand(2, 16)), full, atol=1e-3)


def test_packed_row_equals_documents_alone():
    model = tiny()
    d1, d2 = tokens(1, 7, seed=5), tokens(1, 11, seed=6)
    segments = torch.tensor([[1] * 7 + [2] * 11])
    positions = torch.tensor([list(range(7)) + list(range(11))])
    with torch.no_grad():
        packed = model(torch.cat([d1, d2], 1), positions=positions, segments=segments)
        alone = torch.cat([model(d1), model(d2)], 1)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)


def test_generate_is_the_same_in_both_modes():
    model = tiny(init_std=0.3)
    prompt = tokens(2, 5, seed=7)
    out = {}
    for mode in MODES:
        model.mode = mode
        out[mode] = model.generate(prompt, 10)
    assert out["naive"].shape == (2, 15) and torch.equal(out["naive"], out["absorb"])
    sampled = model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == (2, 15)


def test_cache_overflow_raises():
    model = tiny()
    cache = model.new_cache(1, 8)
    with torch.no_grad():
        model(tokens(1, 6), cache=cache)
        with pytest.raises(ValueError, match="max_len"):
            model(tokens(1, 3), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(tokens(1, 65))


# ---------------------------------------------------------------------------------------------------------------------
# Cache bytes and Table 1


@pytest.mark.parametrize("n_layer, b, max_len", [(1, 1, 1), (3, 2, 50), (2, 5, 17)])
def test_cache_bytes_equal_the_formula(n_layer: int, b: int, max_len: int):
    shape = dict(n_head=8, head_dim=16, kv_lora_rank=64, qk_rope_head_dim=8)
    for kind, n_kv in (("MHA", 8), ("GQA", 2), ("MQA", 1)):
        c = TransformerConfig(vocab_size=V, d_model=128, n_layer=n_layer, n_head=8, n_kv_head=n_kv)
        for dtype in (torch.float32, torch.bfloat16):
            got = KVCache(c, batch_size=b, max_len=max_len, dtype=dtype).nbytes()
            assert got == kv_cache_bytes(kind, n_layer=n_layer, tokens=max_len, batch_size=b, dtype=dtype,
                                         n_kv_head=n_kv, **shape)
    c = MLATransformerConfig(vocab_size=V, d_model=128, n_layer=n_layer, n_head=8, kv_lora_rank=64,
                             qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)
    for dtype in (torch.float32, torch.bfloat16):
        got = MLACache(c, batch_size=b, max_len=max_len, dtype=dtype).nbytes()
        assert got == kv_cache_bytes("MLA", n_layer=n_layer, tokens=max_len, batch_size=b, dtype=dtype, **shape)
        assert got == n_layer * b * max_len * c.cache_elements * bytes_per_element(dtype)


def test_table_1_at_the_real_configurations():
    v2 = dict(n_head=128, head_dim=128, kv_lora_rank=512, qk_rope_head_dim=64)
    assert kv_cache_elements("MLA", **v2) == 576  # V2 and V3
    assert kv_cache_elements("MHA", **v2) == 32_768
    assert kv_cache_elements("MLA", **v2) / (2 * 128) == 2.25  # = GQA with 2.25 groups
    # DeepSeek 67B: GQA, 95 layers, 8 KV heads of 128: 194,560 elements = 380 KiB per token in BF16
    assert kv_cache_elements("GQA", n_kv_head=8, head_dim=128) * 95 == 194_560
    assert kv_cache_bytes("GQA", n_layer=95, n_kv_head=8, head_dim=128) == 380 * 1024
    # LLaMA-2-70B: 80 layers, 8 KV heads of 128
    assert kv_cache_bytes("GQA", n_layer=80, n_kv_head=8, head_dim=128, dtype=torch.float16) == 320 * 1024
    # V2's -93.3% against 67B holds only with a ~6-bit V2 cache; in BF16 it is about 82%
    v2_60 = dict(n_layer=60, kv_lora_rank=512, qk_rope_head_dim=64)
    base = kv_cache_bytes("GQA", n_layer=95, n_kv_head=8, head_dim=128)
    assert round(1 - kv_cache_bytes("MLA", dtype=6, **v2_60) / base, 3) == 0.933
    assert round(1 - kv_cache_bytes("MLA", **v2_60) / base, 3) == 0.822
    assert kv_cache_elements("MQA", head_dim=128) == 256


@pytest.mark.parametrize("call, name", [
    (dict(kind="MLA", kv_lora_rank=512), "qk_rope_head_dim"),
    (dict(kind="GQA", head_dim=128), "n_kv_head"),
    (dict(kind="MHA", n_head=0, head_dim=128), "n_head"),
    (dict(kind="gqa", head_dim=128, n_kv_head=8), "kind"),
])
def test_accounting_errors_name_the_argument(call: dict, name: str):
    with pytest.raises(ValueError, match=rf"^{name}="):
        kv_cache_elements(**call)


def test_bytes_arguments_are_checked():
    with pytest.raises(ValueError, match="dtype"):
        bytes_per_element("bf16")
    with pytest.raises(ValueError, match="tokens"):
        kv_cache_bytes("MQA", head_dim=8, tokens=0)
    assert bytes_per_element(torch.bfloat16) == 2 and bytes_per_element(6) == 0.75


# ---------------------------------------------------------------------------------------------------------------------
# Training with dslib.train


def test_trains_with_the_trainer_and_loss_falls():
    world = World(n_docs=200, n_heldout=40)
    data = PackedData([d.text for d in world.corpus()], world.tokenizer, 96, 4, seed=0)
    valid = PackedData([d.text for d in world.validation(16)], world.tokenizer, 96, 4, seed=0).all_batches()
    torch.manual_seed(0)
    model = MLATransformer(MLATransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=32, n_layer=2,
                                                n_head=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                                v_head_dim=8, q_lora_rank=16, max_seq_len=96))
    history = Trainer(model, data, TrainConfig(steps=30, lr=3e-3, warmup_steps=3, eval_every=10),
                      eval_batches=valid).fit(progress=False)
    assert all(math.isfinite(x) for x in history["loss"])
    assert history["eval_loss"][-1] < 0.8 * history["eval_loss"][0]
    assert sum(history["loss"][-5:]) < 0.8 * sum(history["loss"][:5])


# ---------------------------------------------------------------------------------------------------------------------
# YaRN: rope_scaling as the released DeepSeek-V2/V3 config.json files write it

V2_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
           "mscale": 0.707, "mscale_all_dim": 0.707}
V3_YARN = {**V2_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}
MIXED_YARN = {**V2_YARN, "mscale": 1.0, "mscale_all_dim": 0.707}  # cos and sin get a factor != 1
YARN_BLOCKS = {"V2": V2_YARN, "V3": V3_YARN, "mixed": MIXED_YARN,
               "no mscale": {"rope_type": "yarn", "factor": 8, "original_max_position_embeddings": 512},
               "no rounding": {**V3_YARN, "factor": 4, "original_max_position_embeddings": 256, "truncate": False},
               "attention_factor": {**V3_YARN, "factor": 16, "attention_factor": 1.3}}


def test_rope_scaling_blocks_match_the_released_configs():
    """The blocks above are the ones dslib/configs/ transcribes from the released config.json files."""
    import json
    from pathlib import Path

    import dslib
    folder = Path(dslib.__file__).parent / "configs"
    for name, block in (("deepseek-v2.json", V2_YARN), ("deepseek-v3.json", V3_YARN)):
        assert json.loads((folder / name).read_text())["rope_scaling"] == block


def _hf_config(block: dict, dim: int, kind: str = "v3", key: str = "rope_scaling", theta: float = 10000.0):
    transformers = pytest.importorskip("transformers")
    cls = transformers.DeepseekV3Config if kind == "v3" else transformers.DeepseekV2Config
    return cls(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=None,
               kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=dim, v_head_dim=8, num_hidden_layers=1,
               max_position_embeddings=40 * block["original_max_position_embeddings"], rope_theta=theta,
               **{key: dict(block)})


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", list(YARN_BLOCKS))
@pytest.mark.parametrize("dim", [64, 8])
@pytest.mark.parametrize("kind, key", [("v3", "rope_scaling"), ("v2", "rope_parameters")])
def test_rope_frequencies_match_transformers_yarn(name: str, dim: int, kind: str, key: str):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    block = YARN_BLOCKS[name]
    hf_config = _hf_config(block, dim, kind, key)
    assert hf_config.rope_parameters["rope_type"] == "yarn"
    hf_inv_freq, hf_factor = ROPE_INIT_FUNCTIONS["yarn"](hf_config, "cpu")
    inv_freq, factor = rope_frequencies(dim, 10000.0, block)
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (dim // 2,)
    torch.testing.assert_close(inv_freq, hf_inv_freq.float(), rtol=1e-6, atol=1e-6)
    assert factor == pytest.approx(hf_factor, abs=1e-6)
    if name == "mixed":
        assert factor != pytest.approx(1.0)
    if name in ("V2", "V3"):
        assert factor == 1.0  # mscale == mscale_all_dim: cos and sin unscaled, the softmax scale carries it


def test_scaled_rope_cos_sin_without_scaling_is_rope_cos_sin_exactly():
    positions = torch.arange(3 * 4096).view(3, 4096)
    for none in (None, {}, {"rope_type": "default"}, {"type": "default", "rope_theta": 10000.0}):
        for dim, theta in ((64, 10000.0), (8, 500.0)):
            for got, want in zip(scaled_rope_cos_sin(positions, dim, theta, none), rope_cos_sin(positions, dim, theta)):
                assert torch.equal(got, want)
        inv_freq, factor = rope_frequencies(64, 10000.0, none)
        angles = positions.float()[..., None] * inv_freq
        assert factor == 1.0 and torch.equal(angles.cos(), rope_cos_sin(positions, 64, 10000.0)[0])


def test_scaled_rope_cos_sin_uses_yarn_frequencies_and_factor():
    positions = torch.arange(100).expand(2, 100)
    inv_freq, factor = rope_frequencies(16, 10000.0, MIXED_YARN)
    cos, sin = scaled_rope_cos_sin(positions, 16, 10000.0, MIXED_YARN)
    angles = positions.double()[..., None] * inv_freq.double()
    assert cos.shape == (2, 100, 8) and factor != 1.0
    torch.testing.assert_close(cos.double(), angles.cos() * factor, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sin.double(), angles.sin() * factor, rtol=1e-5, atol=1e-5)


def test_yarn_frequencies_keep_fast_pairs_and_divide_slow_ones():
    plain, _ = rope_frequencies(64, 10000.0)
    yarn, _ = rope_frequencies(64, 10000.0, V3_YARN)
    low, high = yarn_correction_range(64, 10000.0, V3_YARN)
    assert (low, high) == (10, 23)  # V3: pairs 0-10 kept, 23-31 divided by 40
    assert torch.equal(yarn[:low + 1], plain[:low + 1]) and torch.equal(yarn[high:], plain[high:] / 40)
    assert ((yarn[low + 1:high] < plain[low + 1:high]) & (yarn[low + 1:high] > plain[low + 1:high] / 40)).all()


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name", ["V2", "V3", "mixed", "no mscale"])
def test_yarn_softmax_factor_matches_transformers_attention(name: str):
    pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    block = YARN_BLOCKS[name]
    hf_config = _hf_config(block, 8)
    attn = DeepseekV3Attention(hf_config, layer_idx=0)
    qk_head_dim = hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim
    assert yarn_softmax_factor(block) == pytest.approx(attn.scaling / qk_head_dim ** -0.5, rel=1e-12)
    ours = MLA(MLAConfig(d_model=32, n_head=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
                         v_head_dim=8, rope_scaling=block))
    assert ours.softmax_scale == pytest.approx(attn.scaling, rel=1e-12)


def test_yarn_factors_closed_forms():
    assert yarn_mscale(1.0) == 1.0 and yarn_mscale(0.5, 2.0) == 1.0
    assert yarn_mscale(40, 0.707) == pytest.approx(0.0707 * math.log(40) + 1)  # V2, section 3.1.4
    assert yarn_softmax_factor(V2_YARN) == pytest.approx((0.0707 * math.log(40) + 1) ** 2)
    assert yarn_softmax_factor(V3_YARN) == pytest.approx((0.1 * math.log(40) + 1) ** 2)
    assert yarn_softmax_factor(None) == 1.0 and yarn_softmax_factor(YARN_BLOCKS["no mscale"]) == 1.0
    assert rope_frequencies(64, 10000.0, YARN_BLOCKS["no mscale"])[1] == pytest.approx(0.1 * math.log(8) + 1)
    assert rope_frequencies(64, 10000.0, YARN_BLOCKS["attention_factor"])[1] == 1.3


def test_check_rope_scaling_normalises():
    assert check_rope_scaling(None) is None and check_rope_scaling({}) is None
    assert check_rope_scaling({"rope_type": "default", "rope_theta": 10000.0}) is None
    assert check_rope_scaling({"type": "default"}) is None
    old, new = check_rope_scaling(V3_YARN), check_rope_scaling({**V3_YARN, "rope_type": "yarn", "rope_theta": 1e4})
    assert old == new == {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                          "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert check_rope_scaling(old) == old  # idempotent: a stored config validates again
    defaults = check_rope_scaling({"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 64})
    assert (defaults["beta_fast"], defaults["beta_slow"], defaults["mscale"], defaults["mscale_all_dim"]) == \
        (32.0, 1.0, 1.0, 0.0)
    assert "attention_factor" not in defaults and "truncate" not in defaults
    extra = check_rope_scaling({**V3_YARN, "attention_factor": 1.2, "truncate": False})
    assert extra["attention_factor"] == 1.2 and extra["truncate"] is False


@pytest.mark.parametrize("block, field", [
    ({"type": "yarn", "original_max_position_embeddings": 4096}, "factor"),
    ({"type": "yarn", "factor": 40}, "original_max_position_embeddings"),
    ({"rope_type": "linear", "factor": 4}, "rope_type"),
    ({"type": "dynamic", "factor": 4}, "rope_type"),
    ({"factor": 40, "original_max_position_embeddings": 4096}, "rope_type"),
    ({**V3_YARN, "rope_type": "default"}, "rope_type"),  # 'type' and 'rope_type' disagree
    ({**V3_YARN, "factor": 0}, "factor"),
    ({**V3_YARN, "factor": "40"}, "factor"),
    ({**V3_YARN, "original_max_position_embeddings": 4096.5}, "original_max_position_embeddings"),
    ({**V3_YARN, "original_max_position_embeddings": -1}, "original_max_position_embeddings"),
    ({**V3_YARN, "beta_fast": -32}, "beta_fast"),
    ({**V3_YARN, "beta_fast": 1, "beta_slow": 2}, "beta_fast"),
    ({**V3_YARN, "mscale": 0}, "mscale"),
    ({**V3_YARN, "mscale_all_dim": -1}, "mscale_all_dim"),
    ({**V3_YARN, "attention_factor": -1.0}, "attention_factor"),
    ({**V3_YARN, "truncate": "yes"}, "truncate"),
    ("yarn", "rope_scaling"),
])
def test_check_rope_scaling_names_the_field(block, field: str):
    with pytest.raises(ValueError, match=field):
        check_rope_scaling(block)
    with pytest.raises(ValueError, match=rf"MLAConfig\.rope_scaling=.*{field}"):
        MLAConfig(rope_scaling=block)


def test_config_stores_rope_scaling_normalised_and_round_trips():
    c = MLATransformerConfig(vocab_size=V, rope_scaling=V2_YARN)
    assert c.rope_scaling == check_rope_scaling(V2_YARN) and c.rope_scaling["rope_type"] == "yarn"
    assert MLATransformerConfig(**c.to_dict()) == c
    plain = MLATransformerConfig(vocab_size=V, rope_scaling={"rope_type": "default"})
    assert plain.rope_scaling is None and "rope_scaling" not in plain.to_dict()  # configs without YaRN read as before
    with pytest.raises(ValueError, match=r"MLAConfig\.rope_theta="):
        MLAConfig(rope_theta=0.5, rope_scaling=V3_YARN)


def test_without_rope_scaling_the_model_is_bit_for_bit_unchanged():
    plain, default = tiny(), tiny(rope_scaling={"rope_type": "default"})
    assert plain.layers[0].attn.softmax_scale == (8 + 4) ** -0.5
    x = tokens(2, 20)
    with torch.no_grad():
        assert torch.equal(plain(x), default(x))


@pytest.mark.parametrize("q_lora_rank", [0, 16])
def test_yarn_absorbed_decode_equals_naive_forward_past_the_original_context(q_lora_rank: int):
    """A model with YaRN from an original context of 16, run to 64 positions: the cached decode (prefill, a chunk
    across position 16, then single tokens), absorbed and naive, equals the uncached forward; and YaRN changes it."""
    block = {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 16, "mscale": 1.0,
             "mscale_all_dim": 0.707}
    model = tiny(q_lora_rank=q_lora_rank, qk_rope_head_dim=8, rope_scaling=block)
    assert model.layers[0].attn.softmax_scale == pytest.approx((8 + 8) ** -0.5 * yarn_softmax_factor(block))
    x = tokens(2, 64, seed=3)
    with torch.no_grad():
        full = model(x)
        for mode in MODES:
            model.mode = mode
            cache = model.new_cache(2, 64)
            parts = [model(x[:, :10], cache=cache), model(x[:, 10:24], cache=cache)]
            parts += [model(x[:, i:i + 1], cache=cache) for i in range(24, 64)]
            torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)
        plain = tiny(q_lora_rank=q_lora_rank, qk_rope_head_dim=8)  # the same weights, plain RoPE
        assert not torch.allclose(plain(x)[:, 16:], full[:, 16:], atol=1e-3)


def test_yarn_layer_matches_per_head_loop_with_yarn_angles():
    """The layer with YaRN's cos and sin and softmax factor against the per-head loop, whose RoPE and scale are
    replaced by YaRN's (float64): the frequencies and the scale enter where they should."""
    torch.manual_seed(0)
    block = {**MIXED_YARN, "original_max_position_embeddings": 4}
    c = MLAConfig(d_model=32, n_head=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=6,
                  rope_scaling=block)
    attn = MLA(c)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 12, 32)
    cos, sin = scaled_rope_cos_sin(torch.arange(12).expand(1, 12), 8, c.rope_theta, block)
    with torch.no_grad():
        got = attn(x, cos, sin, mode="absorb")
    inv_freq, factor = rope_frequencies(8, c.rope_theta, block)
    # the loop's plain RoPE and softmax, at YaRN's frequencies: rotate by the YaRN angles, scale q^R and k^R by the
    # factor on cos and sin, and the scores by the softmax factor
    want = _per_head_loop_yarn(attn, x, inv_freq.double(), factor, yarn_softmax_factor(block))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _per_head_loop_yarn(attn: MLA, x: torch.Tensor, inv_freq: torch.Tensor, factor: float,
                        softmax_factor: float) -> torch.Tensor:
    c = attn.c
    dn, dr, dv, dc, h = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank, c.n_head
    W = {k: p.detach().double() for k, p in attn.named_parameters()}
    up = W["wkv_b.weight"].view(h, dn + dv, dc)
    q_all = W["wq.weight"].view(h, dn + dr, -1)
    w_o = W["wo.weight"].view(-1, h, dv)

    def rms(v, g):
        return v / torch.sqrt((v * v).mean() + c.norm_eps) * g

    def rope(v, pos):
        z = torch.view_as_complex(v.reshape(-1, 2).contiguous()) * torch.exp(1j * pos * inv_freq) * factor
        return torch.view_as_real(z).flatten()

    xs = x.double()[0]
    out = torch.zeros(1, x.shape[1], c.d_model, dtype=torch.float64)
    ckv = [rms(W["wkv_a.weight"][:dc] @ xs[j], W["kv_norm.weight"]) for j in range(x.shape[1])]
    kr = [rope(W["wkv_a.weight"][dc:] @ xs[j], j) for j in range(x.shape[1])]
    for t in range(x.shape[1]):
        for i in range(h):
            q = torch.cat([q_all[i, :dn] @ xs[t], rope(q_all[i, dn:] @ xs[t], t)])
            s = torch.stack([q @ torch.cat([up[i, :dn] @ ckv[j], kr[j]]) for j in range(t + 1)])
            p = torch.softmax(s * softmax_factor / math.sqrt(dn + dr), 0)
            out[0, t] += w_o[:, i] @ sum(p[j] * (up[i, dn:] @ ckv[j]) for j in range(t + 1))
    return out.float()
