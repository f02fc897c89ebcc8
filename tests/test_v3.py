"""dslib.v3: the configuration, counting, the assembled model, and parity with transformers' DeepseekV3."""

import json
import math

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


# --- Released configurations, and checkpoints in both directions (transformers' DeepseekV2 / DeepseekV3) ---------

from dslib.moe import MoETransformer, moe_layers  # noqa: E402
from dslib.transformer import Transformer, TransformerConfig  # noqa: E402
from dslib.v3 import RELEASED, released_config, released_config_dict  # noqa: E402


def test_four_headline_pairs_from_the_released_configs():
    """Total and activated parameters as each paper states them: V2 and V3 leave the input embedding out of the
    activated count, DeepSeekMoE counts it (2.8B with it; 2.6B without)."""
    conventions = {"DeepSeek-V3": (671, 37, False, 0), "DeepSeek-V2": (236, 21, False, 0),
                   "DeepSeek-V2-Lite": (15.7, 2.4, False, 1), "DeepSeekMoE-16B": (16.4, 2.8, True, 1)}
    def as_published(count: int, published: float, digits: int) -> bool:  # rounded, or (V2-Lite's 2.45B) truncated
        scale = 10 ** digits
        return published in (round(count / 1e9, digits), math.floor(count / 1e9 * scale) / scale)

    for name, (total, active, with_embedding, digits) in conventions.items():
        t, a = count_params(released_config(name), active_embedding=with_embedding)
        assert as_published(t, total, digits) and as_published(a, active, digits), name
    _, moe_without = count_params(released_config("DeepSeekMoE-16B"))
    assert round(moe_without / 1e9, 1) == 2.6


def test_released_configs_read_as_they_are():
    with pytest.warns(UserWarning, match="quantization_config"):
        v3 = V3Config.from_dict(released_config_dict("DeepSeek-V3"))
    assert v3.topk_method == "noaux_tc" and v3.rope_scaling["factor"] == 40 and v3.rope_scaling["mscale_all_dim"] == 1
    v2, lite = released_config("DeepSeek-V2"), released_config("DeepSeek-V2-Lite")
    assert v2.topk_method == "group_limited_greedy" and v2.scoring_func == "softmax" and not v2.norm_topk_prob
    assert v2.rope_scaling["mscale_all_dim"] == 0.707 and (v2.n_group, v2.topk_group) == (8, 3)
    assert lite.topk_method == "greedy" and lite.q_lora_rank is None and lite.n_routed_experts == 64
    assert set(RELEASED) == {"DeepSeek-V3", "DeepSeek-V2", "DeepSeek-V2-Lite", "DeepSeekMoE-16B"}
    with pytest.raises(ValueError, match="unknown released model"):
        released_config("DeepSeek-V4")


@pytest.mark.parametrize("make", [
    lambda: MoETransformer(released_config("DeepSeekMoE-16B").__class__(
        vocab_size=50, d_model=32, n_layer=3, n_head=4, n_kv_head=2, intermediate_size=48, moe_intermediate_size=8,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1)),
    lambda: Transformer(TransformerConfig(vocab_size=50, d_model=32, n_layer=2, n_head=4, n_kv_head=1))])
def test_count_covers_standard_attention(make):
    model = make()
    total, active = count_params(model.config, active_embedding=True)
    assert total == model.num_params()
    if isinstance(model, MoETransformer):
        assert active == model.num_activated_params()
    else:
        assert active == total


def _spread(model, bias: bool) -> None:
    """Random router and expert weights wide enough that routing choices depend on them (and a random bias)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".gate.weight" in name or "experts" in name:
                p.normal_(0, 0.3)
        for name, b in model.named_buffers():
            if "e_score_correction_bias" in name and bias:
                b.normal_(0, 0.1)


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 0.707, "mscale_all_dim": 0.707}
CASES = {
    "v2-group-limited": dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2,
                             norm_topk_prob=False, routed_scaling_factor=16.0, q_lora_rank=24),
    "v2-lite-greedy": dict(scoring_func="softmax", topk_method="greedy", n_group=1, topk_group=1,
                           norm_topk_prob=False, routed_scaling_factor=1.0),
    "v3-bias": dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
                    routed_scaling_factor=2.5),
    "v3-yarn": dict(scoring_func="sigmoid", topk_method="noaux_tc", n_group=4, topk_group=2, norm_topk_prob=True,
                    routed_scaling_factor=2.5, rope_scaling=YARN),
    "v2-yarn": dict(scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=2,
                    norm_topk_prob=False, routed_scaling_factor=16.0, rope_scaling=YARN),
}


def _mini(case: str) -> V3Config:
    return V3Config(vocab_size=V, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                    num_hidden_layers=3, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
                    num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, qk_rope_head_dim=8,
                    qk_nope_head_dim=16, v_head_dim=16, max_position_embeddings=64,
                    bias_update_speed=0.0 if "v2" in case else 0.001, **CASES[case])


@pytest.mark.parametrize("case", sorted(CASES))
def test_to_hf_then_transformers_and_back(tmp_path, case):
    """dslib -> to_hf -> transformers' AutoModelForCausalLM, and that folder -> from_hf -> dslib: the same logits
    (float32, within 1e-4), at positions past YaRN's original context (48 > 16) where it is on."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    ours = DeepSeekV3(_mini(case)).eval()
    _spread(ours, bias="v3" in case)
    ours.to_hf(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == ("deepseek_v2" if "v2" in case else "deepseek_v3")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    back = DeepSeekV3.from_hf(tmp_path / "hf").eval()
    x = torch.randint(0, V, (2, 48))
    with torch.no_grad():
        logits = ours(x)
        assert (ref(x).logits - logits).abs().max() < 1e-4
        assert (back(x) - logits).abs().max() < 1e-6
    if case == "v2-group-limited":  # the group limit changes choices here: V3's rule would give other logits
        for layer in moe_layers(back):
            layer.gate.config.topk_method = "noaux_tc"
        with torch.no_grad():
            assert (back(x) - logits).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["v2-group-limited", "v2-lite-greedy", "v3-yarn"])
def test_transformers_checkpoint_loads_into_dslib(tmp_path, case):
    """The other direction: a model built by transformers from its own config, saved with save_pretrained."""
    transformers = pytest.importorskip("transformers")
    kw = {k: v for k, v in _mini(case).to_dict().items() if k not in ("bias_update_speed", "rope_scaling")}
    kw["num_key_value_heads"] = kw["num_attention_heads"]
    if CASES[case].get("rope_scaling"):
        kw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **YARN}
        del kw["rope_parameters"]["type"]
    cls = transformers.DeepseekV2Config if "v2" in case else transformers.DeepseekV3Config
    torch.manual_seed(1)
    ref = transformers.AutoModelForCausalLM.from_config(cls(**kw)).eval()
    _spread(ref, bias="v3" in case)
    ref.save_pretrained(tmp_path)
    ours = DeepSeekV3.from_hf(tmp_path).eval()
    assert ours.config.topk_method == CASES[case]["topk_method"]
    x = torch.randint(0, V, (2, 48))
    with torch.no_grad():
        assert (ref(x).logits - ours(x)).abs().max() < 1e-4


def test_checkpoint_errors_name_the_field_or_tensor(tmp_path):
    torch.manual_seed(0)
    DeepSeekV3(_mini("v3-bias")).to_hf(tmp_path)
    good = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**good, "model_type": "deepseek_v2",
                                                      "topk_method": "group_max"}))
    with pytest.raises(ValueError, match="topk_method"):
        DeepSeekV3.from_hf(tmp_path)
    broken = {**good, "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}
    (tmp_path / "config.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        DeepSeekV3.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**good, "kv_lora_rank": 12}))
    with pytest.raises(ValueError, match="kv_a_proj|wkv_a"):
        DeepSeekV3.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**good, "num_hidden_layers": 4}))
    with pytest.raises(ValueError, match="missing.*layers.3"):
        DeepSeekV3.from_hf(tmp_path)
    with pytest.raises(ValueError, match="norm_topk_prob"):
        DeepSeekV3(_mini("v2-lite-greedy").__class__(**{**_mini("v2-lite-greedy").to_dict(),
                                                         "norm_topk_prob": True})).to_hf(tmp_path / "x")
