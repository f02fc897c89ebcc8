"""Unit tests of dslib.grpo: group advantages, the k3 estimator's properties, every loss type against a hand
computation (values and gradients), clip-higher, all-equal groups give no gradient, config checks and a trainer step."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dslib.grpo import GRPOConfig, GRPOTrainer, evaluate_policy, group_advantages, grpo_loss, k3_kl
from dslib.transformer import Transformer, TransformerConfig
from dslib.world import World


pytestmark = pytest.mark.usefixtures("one_thread")


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.1, 1.1, 0.1, 0.1])
    a = group_advantages(r, 4)
    std = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)  # unbiased
    assert torch.allclose(a[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4))
    assert torch.allclose(group_advantages(r, 4, scale="none"), torch.tensor([.75, -.25, -.25, -.25, .5, .5, -.5, -.5]))
    assert (group_advantages(torch.full((8,), 1.1), 4) == 0).all()
    assert (group_advantages(torch.ones(8), 4) == 0).all() and (group_advantages(torch.ones(8), 4, "none") == 0).all()
    with pytest.raises(ValueError):
        group_advantages(r, 3)
    with pytest.raises(ValueError):
        group_advantages(r, 4, scale="batch")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=8, max_size=8))
def test_group_advantages_centred(rewards):
    a = group_advantages(torch.tensor(rewards), 4).view(2, 4)
    assert torch.allclose(a.sum(-1), torch.zeros(2), atol=1e-3)


def test_k3_properties():
    torch.manual_seed(0)
    for _ in range(5):
        p, q = torch.randn(6).softmax(0), torch.randn(6).softmax(0)  # policy p, reference q
        exact = float((p * (p / q).log()).sum())
        k3 = k3_kl(p.log(), q.log())
        assert (k3 >= 0).all()
        assert abs(float((p * k3).sum()) - exact) < 1e-5  # unbiased: its expectation under p is KL(p || q)
    assert float(k3_kl(torch.tensor([-1.0]), torch.tensor([-1.0]))) == 0.0


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(4, 5, generator=g) * 0.3 - 1).requires_grad_(True)
    old = lp.detach() + torch.randn(4, 5, generator=g) * 0.3
    ref = lp.detach() + torch.randn(4, 5, generator=g) * 0.3
    adv = torch.tensor([1.0, -0.5, 0.7, -1.2])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    return lp, old, ref, adv, mask


def _by_hand(lp, old, ref, adv, mask, eps, eps_high, beta, loss_type, L):
    total_seq = []
    tokens_sum, n_tokens = 0.0, 0
    for i in range(lp.shape[0]):
        terms = []
        for t in range(lp.shape[1]):
            if not mask[i, t]:
                continue
            ratio = torch.exp(lp[i, t] - old[i, t])
            clipped = torch.clamp(ratio, 1 - eps, 1 + eps_high)
            obj = torch.minimum(ratio * adv[i], clipped * adv[i])
            kl = torch.exp(ref[i, t] - lp[i, t]) - (ref[i, t] - lp[i, t]) - 1
            terms.append(-(obj - beta * kl))
        total_seq.append(sum(terms) / len(terms))
        tokens_sum = tokens_sum + sum(terms)
        n_tokens += len(terms)
    if loss_type == "grpo":
        return sum(total_seq) / len(total_seq)
    if loss_type == "dr_grpo":
        return tokens_sum / (lp.shape[0] * L)
    return tokens_sum / n_tokens


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("eps_high", [None, 0.28])
def test_loss_types_against_hand_computation(loss_type, eps_high):
    lp, old, ref, adv, mask = _batch()
    loss = grpo_loss(lp, old, ref, adv, mask, epsilon=0.2, epsilon_high=eps_high, beta=0.04, loss_type=loss_type,
                     max_completion_length=8)
    (grad,) = torch.autograd.grad(loss, lp)
    lp2 = lp.detach().clone().requires_grad_(True)
    want = _by_hand(lp2, old, ref, adv, mask, 0.2, 0.2 if eps_high is None else eps_high, 0.04, loss_type, 8)
    (want_grad,) = torch.autograd.grad(want, lp2)
    assert torch.allclose(loss, want, atol=1e-6) and torch.allclose(grad, want_grad, atol=1e-6)
    assert (grad[~mask] == 0).all()


def test_gradient_coefficient_on_policy():
    """At ratio 1 the gradient on each token's log-prob is -(A + beta (pi_ref/pi - 1)) / (G |o_i|) for "grpo":
    DeepSeekMath's gradient coefficient (section 5.2.1), and exactly -A / (G |o_i|) with beta 0."""
    lp, _, ref, adv, mask = _batch()
    loss = grpo_loss(lp, lp.detach(), ref, adv, mask, beta=0.04)
    (grad,) = torch.autograd.grad(loss, lp)
    coef = adv[:, None] + 0.04 * (torch.exp(ref - lp.detach()) - 1)
    want = -coef / mask.sum(-1, keepdim=True) / lp.shape[0] * mask
    assert torch.allclose(grad, want, atol=1e-6)


def test_clip_and_stats():
    lp, old, ref, adv, mask = _batch()
    _, stats = grpo_loss(lp, old, ref, adv, mask, return_stats=True)
    ratio = torch.exp(lp.detach() - old)
    a = adv[:, None]
    clipped = (((ratio < 0.8) & (a < 0)) | ((ratio > 1.2) & (a > 0))) & mask
    assert abs(stats["clip_frac"] - float(clipped.sum() / mask.sum())) < 1e-6
    assert stats["kl"] >= 0
    # Tokens clipped on their side give no gradient.
    (grad,) = torch.autograd.grad(grpo_loss(lp, old, None, adv, mask, beta=0.0), lp)
    assert (grad[clipped] == 0).all() and (grad[mask & ~clipped] != 0).all()


def test_all_equal_groups_give_no_gradient():
    lp, _, ref, _, mask = _batch()
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.1, 0.1]), 2)
    for loss_type in ("grpo", "dr_grpo", "dapo"):
        (grad,) = torch.autograd.grad(grpo_loss(lp, lp.detach(), ref, adv, mask, beta=0.0, loss_type=loss_type), lp)
        assert (grad == 0).all()


def test_bad_arguments():
    lp, old, ref, adv, mask = _batch()
    with pytest.raises(ValueError):
        grpo_loss(lp, old, ref, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError):
        grpo_loss(lp, old, None, adv, mask, beta=0.1)
    for bad in (dict(group_size=1), dict(loss_type="x"), dict(scale="batch"), dict(temperature=0), dict(mu=0),
                dict(beta=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GRPOConfig(**bad)


def test_trainer_step_runs_and_logs():
    world = World(n_docs=10)
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=32, n_layer=1, n_head=2,
                                          max_seq_len=48))
    before = [p.detach().clone() for p in model.parameters()]
    tr = GRPOTrainer(model, world, GRPOConfig(steps=2, prompts_per_step=4, group_size=4, max_new_tokens=12, beta=0.02))
    h = tr.fit(progress=False)
    assert h["step"] == [1, 2] and all(0 <= x <= 1 for x in h["all_equal"])
    for key in ("reward", "reward_accuracy", "reward_format", "length", "kl", "clip_frac", "loss", "reflection"):
        assert len(h[key]) == 2 and all(math.isfinite(x) for x in h[key]), key
    assert tr.problems(0) == tr.problems(0) and tr.problems(0) != tr.problems(1)
    held = {p.text for p in world.heldout}
    assert not any(p.text in held for p in tr.problems(0))
    ev = evaluate_policy(model, world, world.heldout[:8], max_new_tokens=12)
    assert 0 <= ev["accuracy"] <= 1 and len(ev["texts"]) == 8
    # The reference model is frozen.
    assert all(not p.requires_grad for p in tr.ref.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, tr.ref.parameters()))


def _tiny_trainer(checkpoint_dir=None, steps=6, **overrides) -> GRPOTrainer:
    world = World(n_docs=10)
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=32, n_layer=1, n_head=2,
                                          max_seq_len=48))
    config = GRPOConfig(**{"steps": steps, "prompts_per_step": 4, "group_size": 4, "max_new_tokens": 12, "lr": 3e-3,
                           **overrides})
    return GRPOTrainer(model, world, config, checkpoint_dir=checkpoint_dir, checkpoint_every=2)


def _weights_sum(trainer, path):
    return {"weights": float(sum(p.detach().double().sum() for p in trainer.model.parameters())),
            "saved": path is not None and path.is_dir()}


def _no_seconds(history) -> str:
    """The log without its timings, as JSON text (so that NaN, for a batch with no right answer, compares equal)."""
    return json.dumps({k: v for k, v in history.items() if k != "seconds"}, sort_keys=True)


def test_stopped_and_resumed_run_logs_the_same_numbers(tmp_path):
    full = _tiny_trainer(tmp_path / "full")
    full.fit(progress=False, on_checkpoint=_weights_sum)
    assert [s for s, _ in full.checkpoints()] == [0, 2, 4, 6]
    assert [e["step"] for e in full.evals] == [0, 2, 4, 6] and all(e["saved"] for e in full.evals)

    part = _tiny_trainer(tmp_path / "part")
    part.fit(steps=3, progress=False, on_checkpoint=_weights_sum)  # stops at step 3 (and checkpoints there)
    again = _tiny_trainer(tmp_path / "part")
    assert again.resume() and again.step == 3
    again.fit(progress=False, on_checkpoint=_weights_sum)
    assert _no_seconds(again.history) == _no_seconds(full.history)
    assert [e for e in again.evals if e["step"] != 3] == full.evals
    assert all(torch.equal(a, b) for a, b in zip(again.model.state_dict().values(), full.model.state_dict().values()))
    assert not [p for p in (tmp_path / "part").iterdir() if p.name.startswith(".")]  # no temporary folder left


def test_interrupted_evaluation_loses_nothing(tmp_path):
    """Ctrl-C during an evaluation: the checkpoint was written first, and the missing evaluation runs on resume."""
    def interrupt_at_4(trainer, path):
        if trainer.step == 4:
            raise KeyboardInterrupt
        return _weights_sum(trainer, path)

    first = _tiny_trainer(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        first.fit(progress=False, on_checkpoint=interrupt_at_4)
    assert [s for s, _ in first.checkpoints()][-1] == 4 and [e["step"] for e in first.evals] == [0, 2]
    second = _tiny_trainer(tmp_path / "run")
    assert second.resume() and second.step == 4 and [e["step"] for e in second.evals] == [0, 2]
    second.fit(progress=False, on_checkpoint=_weights_sum)
    assert [e["step"] for e in second.evals] == [0, 2, 4, 6]
    reference = _tiny_trainer(tmp_path / "reference")
    reference.fit(progress=False, on_checkpoint=_weights_sum)
    assert _no_seconds(second.history) == _no_seconds(reference.history) and second.evals == reference.evals


def test_resume_refuses_another_config(tmp_path):
    from dslib.checkpoint import CheckpointError

    _tiny_trainer(tmp_path / "run", steps=2).fit(progress=False)
    other = _tiny_trainer(tmp_path / "run", steps=2, lr=1e-3)
    with pytest.raises(CheckpointError, match="another GRPOConfig"):
        other.resume()
    assert not _tiny_trainer(tmp_path / "empty").resume()  # nothing to resume from: False, not an error
    with pytest.raises(ValueError, match="checkpoint_every"):
        GRPOTrainer(other.model, other.world, other.config, checkpoint_every=0)


def test_one_update_ratio_is_exactly_one_and_kl_is_optional():
    tr = _tiny_trainer(steps=2, log_kl=False)
    calls = []
    tr.ref.register_forward_hook(lambda *a: calls.append(1))
    h = tr.fit(progress=False)
    assert not calls and all(math.isnan(x) for x in h["kl"])  # beta = 0 and no KL asked: the reference never runs
    assert h["clip_frac"] == [0.0, 0.0]  # mu = 1: old log-probs are the current ones, detached
    assert all(0 <= x <= 1 for x in h["truncated"]) and all(x >= 0 for x in h["entropy"])
    frozen = copy.deepcopy(tr.ref)  # a copy of a frozen model trains when it becomes a policy
    GRPOTrainer(frozen, tr.world, tr.config)
    assert all(p.requires_grad for p in frozen.parameters())
