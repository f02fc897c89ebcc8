"""dslib.v3: the configuration, counting, the assembled model, and parity with transformers' DeepseekV3."""

import json

import pytest
import torch

from dslib.moe import Experts
from dslib.v3 import DeepSeekV3, V3Config, count_params, flops_per_token, hf_to_dslib

V = 104


def tiny(**kw) -> V3Config:
    base = dict(vocab_size=V, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=3,
                num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
                n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=48)
    return V3Config(**{**base, **kw})


def test_published_counts():
    total, active = count_params(V3Config.deepseek_v3())
    assert round(total / 1e9) == 671 and round(active / 1e9) == 37
    v2_total, v2_active = count_params(V3Config.deepseek_v2())
    assert round(v2_total / 1e9) == 236 and round(v2_active / 1e9) == 21
    # The released V3 checkpoint: 671B + the MTP module (11.5-11.6B unique) + its own embedding and head copies.
    with_mtp = count_params(V3Config.deepseek_v3(), mtp=True)[0]
    embed = 129280 * 7168
    assert 11.4e9 < with_mtp - total < 11.7e9
    assert 684e9 < with_mtp + 2 * embed < 685.5e9  # published as 685B


@pytest.mark.parametrize("kw", [dict(), dict(q_lora_rank=16), dict(first_k_dense_replace=3),
                                dict(n_shared_experts=0, num_nextn_predict_layers=2), dict(tie_word_embeddings=True)])
def test_count_equals_allocated(kw):
    c = tiny(**kw)
    m = DeepSeekV3(c)
    total, active = count_params(c)
    assert total == m.num_params()
    assert count_params(c, mtp=True)[0] == m.num_params(mtp=True)
    unused = c.n_moe_layers * (c.n_routed_experts - c.num_experts_per_tok) * 3 * c.hidden_size \
        * c.moe_intermediate_size
    embed = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size
    assert active == total - unused - embed


def test_flops_formula_matches_the_counter():
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    c = tiny()
    m = DeepSeekV3(c)
    for module in m.modules():  # the counter sees per-expert matrix products, not grouped_mm
        if isinstance(module, Experts):
            module.dispatch = "loop"
    x = torch.randint(0, V, (2, 48))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(m(x).flatten(0, 1), x.flatten()).backward()
    # The counter does not see the fused attention kernel on the CPU: compare the matrix products, 6 x activated.
    attention = flops_per_token(c, 48) - 6 * count_params(c)[1]
    assert attention == 3 * 2 * c.num_attention_heads * (c.qk_head_dim + c.v_head_dim) * 48 * c.num_hidden_layers
    ratio = counter.get_total_flops() / x.numel() / (6 * count_params(c)[1])
    assert 0.97 < ratio < 1.03


@pytest.mark.parametrize("field,value,words", [
    ("num_experts_per_tok", 9, "num_experts_per_tok"),
    ("n_group", 3, "n_group"),
    ("topk_group", 3, "topk_group"),
    ("first_k_dense_replace", 4, "first_k_dense_replace"),
    ("qk_rope_head_dim", 5, "qk_rope_head_dim"),
    ("hidden_size", 0, "hidden_size"),
    ("aux_loss_alpha", -1.0, "aux_loss_alpha"),
])
def test_bad_config_names_the_field(field, value, words):
    with pytest.raises(ValueError, match=words):
        tiny(**{field: value})


@pytest.mark.parametrize("mode", ["absorb", "naive"])
def test_cache_equals_full_forward(mode):
    torch.manual_seed(0)
    m = DeepSeekV3(tiny(), mode=mode).eval()
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        full = m(ids)
        cache = m.new_cache(2, 20)
        parts = [m(ids[:, :7], cache=cache), m(ids[:, 7:9], cache=cache)]
        parts += [m(ids[:, i:i + 1], cache=cache) for i in range(9, 20)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-4


def test_packed_rows_match_documents_alone():
    torch.manual_seed(0)
    m = DeepSeekV3(tiny()).eval()
    a, b = torch.randint(0, V, (1, 9)), torch.randint(0, V, (1, 7))
    row = torch.cat([a, b], 1)
    segments = torch.tensor([[1] * 9 + [2] * 7])
    positions = torch.tensor([list(range(9)) + list(range(7))])
    with torch.no_grad():
        packed = m(row, positions=positions, segments=segments)
        assert (packed[:, :9] - m(a)).abs().max() < 1e-5
        assert (packed[:, 9:] - m(b)).abs().max() < 1e-5


def test_model_trains_with_dslib_trainer():
    from dslib.train import TrainConfig, Trainer
    from dslib.world import PackedData, World
    w = World(n_docs=300)
    data = PackedData([d.text for d in w.corpus()], w.tokenizer, 96, 4, seed=0)
    torch.manual_seed(0)
    m = DeepSeekV3(tiny(max_position_embeddings=96))
    h = Trainer(m, data, TrainConfig(steps=12, lr=3e-3, warmup_steps=2, eval_every=0)).fit(progress=False)
    assert h["loss"][-1] < h["loss"][0]


def test_from_hf_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        DeepSeekV3.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="deepseek_v3"):
        DeepSeekV3.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "rope_interleave": False}))
    with pytest.raises(ValueError, match="rope_interleave"):
        DeepSeekV3.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "vocab_size": V}))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        DeepSeekV3.from_hf(tmp_path)


def test_hf_mapping_rejects_unknown_tensors():
    with pytest.raises(ValueError, match="unknown tensor"):
        hf_to_dslib({"model.something.weight": torch.zeros(1)}, tiny())


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_parity_with_transformers(tmp_path, q_lora_rank):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.DeepseekV3Config(
        vocab_size=V, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1, q_lora_rank=q_lora_rank,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=64)
    torch.manual_seed(0)
    ref = transformers.DeepseekV3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "mlp.gate.weight" in name or "experts" in name:
                p.normal_(0, 0.3)
        for name, b in ref.named_buffers():
            if "e_score_correction_bias" in name:
                b.normal_(0, 0.1)
    ref.save_pretrained(tmp_path)
    ours = DeepSeekV3.from_hf(tmp_path).eval()
    assert ours.config.n_group == 4 and ours.config.routed_scaling_factor == 2.5
    x = torch.randint(0, V, (2, 40))
    with torch.no_grad():
        assert (ref(x).logits - ours(x)).abs().max() < 1e-4
