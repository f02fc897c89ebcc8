"""Unit tests of dslib.moe (chapter 02): config validation, routing, dispatch, balance losses, the bias update, the
MoE language model, and equality with transformers' DeepseekV3MoE."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from dslib.moe import (MoE, MoEConfig, MoETransformer, MoETransformerConfig, Router, device_balance_loss,
                       expert_balance_loss, expert_load, max_violation, moe_aux_loss, moe_batch_loss, moe_layers,
                       routing_entropy, sequence_balance_loss, update_bias)
from dslib.transformer import SwiGLU


def _experts_reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Routed experts one token at a time, in float64."""
    ex, r = moe.experts, moe.routing
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for e, w in zip(r.indices[t].tolist(), r.weights[t].tolist()):
            h = x[t].double()
            out[t] += w * (ex.down_proj[e].double() @ (F.silu(ex.gate_proj[e].double() @ h)
                                                       * (ex.up_proj[e].double() @ h)))
    return out


@pytest.mark.parametrize("bad, field", [
    (dict(n_routed_experts=4, num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(n_routed_experts=6, n_group=4), "n_group"),
    (dict(n_routed_experts=8, n_group=2, topk_group=3), "topk_group"),
    (dict(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3), "topk_group"),
    (dict(scoring_func="tanh"), "scoring_func"),
    (dict(topk_method="group_max"), "topk_method"),
    (dict(n_shared_experts=-1), "n_shared_experts"),
    (dict(n_routed_experts=8, n_devices=3), "n_devices"),
    (dict(aux_loss_alpha=-0.1), "aux_loss_alpha"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(d_model=0), "d_model"),
])
def test_bad_config_names_field_and_value(bad, field):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}="):
        MoEConfig(**bad)


def test_config_to_dict_round_trip():
    c = MoEConfig(n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2)
    assert MoEConfig(**c.to_dict()) == c
    mc = MoETransformerConfig(vocab_size=50, d_model=32, n_layer=2, n_head=4, n_routed_experts=8, n_group=2)
    assert MoETransformerConfig(**mc.to_dict()) == mc
    with pytest.raises(ValueError, match="first_k_dense_replace"):
        MoETransformerConfig(vocab_size=50, n_layer=2, first_k_dense_replace=3)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        MoETransformerConfig(vocab_size=50, n_routed_experts=4, num_experts_per_tok=5)


def test_module_layout_matches_reference_names():
    c = MoEConfig(d_model=16, moe_intermediate_size=8, n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=2)
    m = MoE(c)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["gate.weight"] == (6, 16) and shapes["gate.e_score_correction_bias"] == (6,)
    assert m.gate.e_score_correction_bias.dtype == torch.float32
    assert shapes["experts.gate_proj"] == (6, 8, 16) and shapes["experts.up_proj"] == (6, 8, 16)
    assert shapes["experts.down_proj"] == (6, 16, 8)
    assert isinstance(m.shared_experts, SwiGLU) and shapes["shared_experts.gate_proj.weight"] == (16, 16)
    assert MoE(MoEConfig(n_shared_experts=0)).shared_experts is None


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
def test_bias_changes_choice_not_weights(scoring):
    torch.manual_seed(0)
    c = MoEConfig(d_model=8, n_routed_experts=8, num_experts_per_tok=2, scoring_func=scoring, norm_topk_prob=True,
                  init_std=0.5)
    router = Router(c)
    x = torch.randn(50, 8)
    with torch.no_grad():
        before = router(x)
        router.e_score_correction_bias[5] = 3.0
        after = router(x)
    assert (after.indices == 5).any(1).all() and not torch.equal(before.indices, after.indices)
    assert torch.equal(before.scores, after.scores)
    chosen = after.scores.gather(1, after.indices)
    torch.testing.assert_close(after.weights, chosen / chosen.sum(1, keepdim=True))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_group=st.sampled_from([2, 4, 8]), scoring=st.sampled_from(["softmax", "sigmoid"]))
def test_group_limit_never_leaves_top_groups(seed, n_group, scoring):
    torch.manual_seed(seed)
    topk_group = max(1, n_group // 2)
    c = MoEConfig(d_model=8, n_routed_experts=16, num_experts_per_tok=2, scoring_func=scoring, n_group=n_group,
                  topk_group=topk_group, init_std=1.0)
    router = Router(c)
    router.e_score_correction_bias.normal_(0, 0.1)
    x = torch.randn(30, 8)
    with torch.no_grad():
        r = router(x)
    biased = (r.scores + router.e_score_correction_bias).view(30, n_group, -1)
    group_score = biased.topk(2, dim=-1).values.sum(-1)
    kept = group_score.topk(topk_group, dim=-1).indices
    for t in range(30):
        assert set((r.indices[t] // (16 // n_group)).tolist()) <= set(kept[t].tolist())


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), scale=st.floats(0.5, 4.0), k=st.integers(1, 6))
def test_normalised_weights_sum_to_scaling_factor(seed, scale, k):
    torch.manual_seed(seed)
    c = MoEConfig(d_model=8, n_routed_experts=12, num_experts_per_tok=k, scoring_func="sigmoid", norm_topk_prob=True,
                  routed_scaling_factor=scale, init_std=0.5)
    with torch.no_grad():
        r = Router(c)(torch.randn(20, 8))
    torch.testing.assert_close(r.weights.sum(1), torch.full((20,), scale))


@pytest.mark.parametrize("dispatch", ["loop", "grouped"])
def test_dispatch_matches_per_token_loop(dispatch):
    if dispatch == "grouped" and not hasattr(F, "grouped_mm"):
        pytest.skip("no grouped_mm in this PyTorch")
    torch.manual_seed(0)
    c = MoEConfig(d_model=16, moe_intermediate_size=8, n_routed_experts=12, num_experts_per_tok=3, init_std=0.3,
                  scoring_func="softmax", norm_topk_prob=False)
    m = MoE(c)
    m.experts.dispatch = dispatch
    x = torch.randn(70, 16)
    with torch.no_grad():
        y = m(x)
    assert (y.double() - _experts_reference(m, x)).abs().max() < 1e-5


@pytest.mark.skipif(not hasattr(F, "grouped_mm"), reason="no grouped_mm in this PyTorch")
def test_grouped_backward_matches_autograd_loop():
    """ExpertProducts' hand-written backward against autograd through the loop dispatch: the gradients of the input,
    of the gating weights (so of the router) and of every expert weight, with an expert that gets no token."""
    torch.manual_seed(1)
    c = MoEConfig(d_model=16, moe_intermediate_size=8, n_routed_experts=12, num_experts_per_tok=3, init_std=0.3,
                  scoring_func="sigmoid", routed_scaling_factor=2.5)
    m = MoE(c)
    m.gate.e_score_correction_bias[5] = -10.0  # expert 5 is never chosen: an empty block
    x = torch.randn(70, 16)
    probe = torch.randn(70, 16)
    grads = {}
    for dispatch in ("loop", "grouped"):
        m.zero_grad()
        m.experts.dispatch = dispatch
        xg = x.clone().requires_grad_(True)
        y = m(xg)
        (y * probe).sum().backward()
        grads[dispatch] = [y.detach(), xg.grad] + [p.grad.clone() for p in m.parameters()]
    assert not (m.routing.indices == 5).any()
    assert grads["grouped"][2].abs().sum() > 0  # the router weight did get a gradient
    for a, b in zip(grads["loop"], grads["grouped"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_auto_dispatch_uses_the_loop_under_autocast():
    m = MoE(MoEConfig(d_model=16, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2))
    x = torch.randn(10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not m.experts._grouped(x)
        y = m(x)
    assert torch.isfinite(y.float()).all()
    assert m.experts._grouped(x) == hasattr(F, "grouped_mm")


def test_balance_losses_against_hand_computation():
    s = torch.tensor([[.4, .3, .2, .1], [.1, .2, .3, .4], [.4, .4, .1, .1], [.25, .25, .25, .25]])
    i = torch.tensor([[0, 1], [3, 2], [0, 1], [0, 2]])
    # f = 4 / (2 * 4) * (3, 2, 2, 1); P = (1.15, 1.15, .85, .85) / 4
    assert expert_balance_loss(s, i).item() == pytest.approx(1.0375)
    # devices {0, 1}, {2, 3}: f' = (1.25, 0.75), P' = (.575, .425)
    assert device_balance_loss(s, i, 2).item() == pytest.approx(1.0375)
    # devices {0}, {1}, {2}, {3}: the expert-level loss
    assert device_balance_loss(s, i, 4).item() == pytest.approx(1.0375)
    # two sequences of two tokens: 1.0 and 2 * .325 + .325 + .175 = 1.15
    assert sequence_balance_loss(s, i, 2).item() == pytest.approx(1.075)
    # one sequence: the expert-level loss
    assert sequence_balance_loss(s, i, 1).item() == pytest.approx(1.0375)
    # sigmoid affinities are normalised per token first
    assert expert_balance_loss(2 * s, i).item() == pytest.approx(1.0375)
    load = expert_load(i, 4)
    assert load.tolist() == [3, 2, 2, 1] and max_violation(load) == pytest.approx(0.5)
    assert routing_entropy(torch.ones(8)) == pytest.approx(math.log(8))
    assert routing_entropy(torch.tensor([4.0, 0.0])) == pytest.approx(0.0)


def test_aux_loss_from_config_and_sum_over_model():
    torch.manual_seed(0)
    cfg = MoETransformerConfig(vocab_size=40, d_model=16, n_layer=3, n_head=2, moe_intermediate_size=8,
                               n_routed_experts=8, num_experts_per_tok=2, n_devices=2, first_k_dense_replace=1)
    model = MoETransformer(cfg)
    ids = torch.randint(0, 40, (2, 10))
    model(ids)
    assert len(moe_layers(model)) == 2 and moe_aux_loss(model).item() == 0.0
    assert moe_aux_loss(torch.nn.Linear(2, 2)).item() == 0.0
    c = MoEConfig(d_model=16, n_routed_experts=8, num_experts_per_tok=2, n_devices=2, aux_loss_alpha=0.01,
                  device_loss_alpha=0.05, seq_aux_alpha=0.001, scoring_func="softmax")
    m = MoE(c)
    x = torch.randn(3, 5, 16)
    m(x)
    r = m.routing
    want = (0.01 * expert_balance_loss(r.scores, r.indices) + 0.05 * device_balance_loss(r.scores, r.indices, 2)
            + 0.001 * sequence_balance_loss(r.scores, r.indices, 3))
    assert m.aux_loss.item() == pytest.approx(want.item(), rel=1e-6)
    m.aux_loss.backward()
    assert m.gate.weight.grad is not None and m.gate.weight.grad.abs().sum() > 0
    outer = torch.nn.Sequential(m)
    assert moe_aux_loss(outer).item() == pytest.approx(want.item(), rel=1e-6)


def test_update_bias_sign():
    torch.manual_seed(0)
    m = MoE(MoEConfig(d_model=8, n_routed_experts=8, num_experts_per_tok=2, init_std=1.0))
    with pytest.raises(ValueError, match="forward"):
        update_bias(m, 0.1)
    m(torch.randn(40, 8))
    load = expert_load(m.routing.indices, 8)
    update_bias(m, 0.1)
    b = m.gate.e_score_correction_bias
    assert torch.all(b[load > load.mean()] == -0.1) and torch.all(b[load < load.mean()] == 0.1)
    assert torch.all(b[load == load.mean()] == 0.0)
    with pytest.raises(ValueError, match="gamma"):
        update_bias(m, -1.0)


def test_bias_updates_balance_a_skewed_router():
    torch.manual_seed(0)
    m = MoE(MoEConfig(d_model=8, n_routed_experts=8, num_experts_per_tok=2, init_std=1.0))
    with torch.no_grad():
        m.gate.weight[0] += 2.0  # expert 0 is attractive to many tokens
    x = torch.randn(400, 8)
    with torch.no_grad():
        m(x)
        start = max_violation(expert_load(m.routing.indices, 8))
        for _ in range(300):
            m(x)
            update_bias(m, 0.01)
        m(x)
    assert max_violation(expert_load(m.routing.indices, 8)) < 0.5 * start


def test_moe_transformer_trains_and_decodes():
    from dslib.train import TrainConfig, Trainer

    torch.manual_seed(0)
    cfg = MoETransformerConfig(vocab_size=30, d_model=16, n_layer=2, n_head=2, moe_intermediate_size=8,
                               n_routed_experts=6, num_experts_per_tok=2, n_shared_experts=1, aux_loss_alpha=0.01,
                               init_std=0.1)
    model = MoETransformer(cfg)
    ids = torch.randint(0, 30, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 12)
        parts = [model(ids[:, :5], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(5, 12)]
    assert (torch.cat(parts, 1) - full).abs().max() < 1e-5
    assert model.generate(ids[:, :4], 3).shape == (2, 7)
    idle = 4 * 3 * 16 * 8 * 2
    assert model.num_params() - model.num_activated_params() == idle

    class Data:
        def batch(self, step):
            g = torch.Generator().manual_seed(step)
            x = torch.randint(0, 30, (4, 9), generator=g)
            return {"input_ids": x[:, :-1], "targets": x[:, 1:], "positions": torch.arange(8).expand(4, 8),
                    "segments": torch.ones(4, 8, dtype=torch.long), "loss_mask": torch.ones(4, 8, dtype=torch.bool)}

    gamma = 0.01
    tr = Trainer(model, Data(), TrainConfig(steps=3, warmup_steps=0, eval_every=0), loss_fn=moe_batch_loss,
                 after_step=lambda t, b: update_bias(t.model, gamma))
    tr.fit(progress=False)
    assert all(layer.gate.e_score_correction_bias.abs().max() > 0 for layer in moe_layers(model))


def test_sigmoid_gating_matches_transformers():
    pytest.importorskip("transformers")
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    torch.manual_seed(0)
    c = MoEConfig(d_model=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2,
                  scoring_func="sigmoid", n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
                  init_std=0.3)
    ours = MoE(c)
    ours.gate.e_score_correction_bias.normal_(0, 0.1)
    hc = DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                          n_shared_experts=2, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5)
    hc._experts_implementation = "eager"
    hf = DeepseekV3MoE(hc)
    state = {"gate.weight": ours.gate.weight, "gate.e_score_correction_bias": ours.gate.e_score_correction_bias,
             "experts.gate_up_proj": torch.cat([ours.experts.gate_proj, ours.experts.up_proj], dim=1),
             "experts.down_proj": ours.experts.down_proj,
             **{f"shared_experts.{k}": v for k, v in ours.shared_experts.state_dict().items()}}
    hf.load_state_dict(state, strict=True)
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert (hf(x) - ours(x)).abs().max() < 1e-5
        _, hf_weights, hf_indices = hf.gate(x)
    order = ours.routing.indices.sort(1)
    hf_order = hf_indices.sort(1)
    assert torch.equal(order.values, hf_order.values)
    torch.testing.assert_close(ours.routing.weights.gather(1, order.indices), hf_weights.gather(1, hf_order.indices))


@pytest.mark.parametrize("method, n_group, topk_group", [("group_limited_greedy", 4, 2), ("group_limited_greedy", 8, 3),
                                                         ("greedy", 1, 1), ("greedy", 4, 1)])
def test_v2_routing_matches_transformers(method, n_group, topk_group):
    """V2's group-limited greedy routing (a group scores as its best expert) and V2-Lite's greedy routing, against
    transformers' DeepseekV2Moe, on spread router weights (so that the group limit changes choices)."""
    pytest.importorskip("transformers")
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    torch.manual_seed(1)
    c = MoEConfig(d_model=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4, n_shared_experts=2,
                  scoring_func="softmax", n_group=n_group, topk_group=topk_group, topk_method=method,
                  norm_topk_prob=False, routed_scaling_factor=1.0, init_std=0.3)
    ours = MoE(c)
    hc = DeepseekV2Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                          n_shared_experts=2, n_group=n_group, topk_group=topk_group, topk_method=method,
                          routed_scaling_factor=1.0)
    hc._experts_implementation = "eager"
    hf = DeepseekV2Moe(hc)
    hf.load_state_dict({"gate.weight": ours.gate.weight, "experts.down_proj": ours.experts.down_proj,
                        "experts.gate_up_proj": torch.cat([ours.experts.gate_proj, ours.experts.up_proj], dim=1),
                        **{f"shared_experts.{k}": v for k, v in ours.shared_experts.state_dict().items()}}, strict=True)
    x = torch.randn(4, 16, 32)
    with torch.no_grad():
        assert (hf(x) - ours(x)).abs().max() < 1e-5
        _, hf_weights, hf_indices = hf.gate(x)
    assert torch.equal(ours.routing.indices.sort(1).values, hf_indices.sort(1).values)
    if method == "group_limited_greedy":  # the rule matters: V3's top-2 sum routes some tokens elsewhere
        c.topk_method = "noaux_tc"
        with torch.no_grad():
            v3_choice = ours.gate(x.view(-1, 32)).indices.sort(1).values
        assert (v3_choice != hf_indices.sort(1).values).any()


def test_greedy_ignores_groups():
    torch.manual_seed(0)
    grouped = MoEConfig(d_model=8, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=1,
                        topk_method="greedy", scoring_func="softmax", init_std=1.0)
    router = Router(grouped)
    x = torch.randn(50, 8)
    with torch.no_grad():
        r = router(x)
    assert torch.equal(r.indices.sort(1).values, r.scores.topk(4, dim=1).indices.sort(1).values)
    assert max(len(set(g)) for g in (r.indices // 4).tolist()) > 1  # one kept group would allow only one


def test_a_layer_that_has_just_trained_can_be_deep_copied():
    """The last forward's aux_loss lies on its autograd graph; deepcopy refuses such tensors, so MoE leaves it out."""
    import copy

    cfg = MoEConfig(d_model=8, moe_intermediate_size=4, n_routed_experts=4, num_experts_per_tok=2, n_group=1,
                    topk_group=1, aux_loss_alpha=0.01)
    layer = MoE(cfg)
    y = layer(torch.randn(2, 3, 8))
    (y.square().mean() + layer.aux_loss).backward()
    assert layer.aux_loss.grad_fn is not None
    twin = copy.deepcopy(layer)
    assert twin.aux_loss.grad_fn is None and float(twin.aux_loss) == 0.0
    assert torch.equal(twin.routing.indices, layer.routing.indices)
    x = torch.randn(5, 8)
    assert torch.equal(twin(x), layer(x))
    assert twin.gate.weight.data_ptr() != layer.gate.weight.data_ptr()  # a copy, not a view


def test_torch_compile_of_an_moe_layer_matches_eager():
    """Under torch.compile, "auto" dispatch takes the per-expert products (the grouped products' CPU kernel takes
    float32, which the compiler's shape checks refuse), and the compiled layer computes what the eager one does."""
    torch.manual_seed(0)
    m = MoE(MoEConfig(d_model=16, moe_intermediate_size=8, n_routed_experts=4, num_experts_per_tok=2))
    x = torch.randn(2, 8, 16)
    torch.testing.assert_close(torch.compile(m)(x), m(x), atol=1e-5, rtol=1e-5)
