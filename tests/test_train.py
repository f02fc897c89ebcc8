"""Unit tests of dslib.train and dslib.checkpoint: schedules, the loss, the trainer, checkpoints and exact resume."""

from __future__ import annotations

import math
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from dslib.checkpoint import CheckpointError, load_checkpoint, read_config
from dslib.train import (NonFiniteLossError, TrainConfig, Trainer, batch_loss, complete, evaluate_accuracy,
                         evaluate_loss, lr_at, masked_lm_loss, param_groups)
from dslib.transformer import Transformer, TransformerConfig
from dslib.world import PackedData, World

SEQ = 96
CFG = TrainConfig(steps=20, lr=3e-3, warmup_steps=3, eval_every=5, seed=0)


@pytest.fixture(scope="module")
def world() -> World:
    return World(n_docs=200, n_heldout=40)


@pytest.fixture(scope="module")
def data(world: World) -> PackedData:
    return PackedData([d.text for d in world.corpus()], world.tokenizer, SEQ, 4, seed=0)


@pytest.fixture(scope="module")
def eval_batches(world: World) -> list:
    return PackedData([d.text for d in world.validation(16)], world.tokenizer, SEQ, 2, seed=0).all_batches()


def build(world: World, seed: int = 0, d_model: int = 32, n_layer: int = 2) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=d_model, n_layer=n_layer,
                                         n_head=4, n_kv_head=2, max_seq_len=SEQ))


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(world, data, eval_batches, tmp_path_factory):
    """A 20-step run without interruption: its history and final weights."""
    model = build(world)
    tr = Trainer(model, data, CFG, eval_batches=eval_batches, checkpoint_dir=tmp_path_factory.mktemp("full"))
    history = tr.fit(progress=False)
    return history, weights(model)


# ---------------------------------------------------------------------------------------------------------------------
# Learning-rate schedules and config


def test_lr_multistep():
    total, warm, peak = 100, 10, 2.0
    for s in range(warm):
        assert lr_at(s, total, peak, warm) == pytest.approx(peak * (s + 1) / warm)
    assert lr_at(warm - 1, total, peak, warm) == pytest.approx(peak)
    for s in range(warm, 80):
        assert lr_at(s, total, peak, warm) == peak
    for s in range(80, 90):
        assert lr_at(s, total, peak, warm) == pytest.approx(0.316 * peak)
    for s in range(90, 100):
        assert lr_at(s, total, peak, warm) == pytest.approx(0.1 * peak)
    assert lr_at(0, 100, 1.0) == 1.0  # no warm-up


def test_lr_cosine():
    total, warm, peak = 111, 10, 1.0  # steps 10..110 decay; the midpoint is step 60
    assert lr_at(warm, total, peak, warm, "cosine") == pytest.approx(peak)
    assert lr_at(total - 1, total, peak, warm, "cosine") == pytest.approx(0.1 * peak)  # the last step
    assert lr_at(60, total, peak, warm, "cosine") == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(total - 1, total, peak, warm, "cosine", final_ratio=0.0) == pytest.approx(0.0, abs=1e-12)
    values = [lr_at(s, total, peak, warm, "cosine") for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert lr_at(3, total, peak, warm, "cosine") == pytest.approx(0.4)  # the same warm-up


def test_lr_bad_schedule_after_warmup():
    with pytest.raises(ValueError, match="linear"):
        lr_at(50, 100, 1.0, 10, "linear")
    with pytest.raises(ValueError, match="linear"):
        lr_at(0, 100, 1.0, 0, "linear")


def test_lr_bad_schedule_during_warmup():
    with pytest.raises(ValueError):
        lr_at(0, 100, 1.0, 10, "linear")


@pytest.mark.parametrize("kwargs, field", [
    (dict(steps=0), "steps"),
    (dict(steps=-3), "steps"),
    (dict(steps=10, warmup_steps=10), "warmup_steps"),
    (dict(steps=10, warmup_steps=-1), "warmup_steps"),
    (dict(schedule="linear"), "schedule"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(grad_clip=-1.0), "grad_clip"),
    (dict(lr=0.0), "lr"),
    (dict(betas=(0.9, 1.0)), "betas"),
    (dict(eval_every=-1), "eval_every"),
    (dict(checkpoint_every=-2), "checkpoint_every"),
])
def test_train_config_validation(kwargs: dict, field: str):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field}="):
        TrainConfig(**kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Loss


def test_masked_lm_loss_by_hand():
    logits = torch.tensor([[[1.0, 2.0, 0.5], [0.0, 0.0, 3.0], [2.0, -1.0, 0.0]]])
    targets = torch.tensor([[1, 0, 2]])
    mask = torch.tensor([[True, False, True]])

    def nll(row, t):
        return -(row[t] - math.log(sum(math.exp(v) for v in row)))

    want = (nll([1.0, 2.0, 0.5], 1) + nll([2.0, -1.0, 0.0], 2)) / 2
    assert float(masked_lm_loss(logits, targets, mask)) == pytest.approx(want, rel=1e-6)
    # the masked position does not count, whatever its logits
    logits2 = logits.clone()
    logits2[0, 1] = torch.tensor([50.0, -50.0, 0.0])
    assert float(masked_lm_loss(logits2, targets, mask)) == pytest.approx(want, rel=1e-6)
    assert float(masked_lm_loss(logits, targets, torch.zeros_like(mask))) == 0.0


def test_evaluate_loss_is_token_weighted(world, eval_batches):
    model = build(world)
    assert len(eval_batches) >= 2
    with torch.no_grad():
        per = [float(batch_loss(model, b)) for b in eval_batches]
    n = [float(b["loss_mask"].sum()) for b in eval_batches]
    assert len(set(n)) > 1  # unequal batches: a plain mean of the batch losses would differ
    want = sum(p * k for p, k in zip(per, n)) / sum(n)
    assert want != pytest.approx(sum(per) / len(per), rel=1e-6)
    model.train()
    assert evaluate_loss(model, eval_batches) == pytest.approx(want, rel=1e-5)
    assert model.training  # restored


def test_param_groups_decay_matrices_only(world):
    model = build(world)
    decay, rest = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in rest["params"])
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and exact resume


def test_training_lowers_the_loss(uninterrupted):
    history, _ = uninterrupted
    assert history["step"] == list(range(1, 21))
    assert len(history["loss"]) == 20 and all(math.isfinite(x) for x in history["loss"])
    assert history["eval_step"] == [0, 5, 10, 15, 20]
    assert history["eval_loss"][-1] < history["eval_loss"][0]
    assert history["lr"] == [lr_at(s, 20, CFG.lr, 3) for s in range(20)]


def test_after_backward_sees_the_gradients_before_clipping(world, data):
    """The hook runs once per step between backward and clipping: what it does to the gradients is what the step
    uses (zeroed gradients leave AdamW only its weight decay, which spares the norm weights)."""
    calls = []

    def hook(model):
        calls.append(sum(float(p.grad.norm()) for p in model.parameters() if p.grad is not None))
        for p in model.parameters():
            p.grad = torch.zeros_like(p)

    model = build(world)
    before = weights(model)
    Trainer(model, data, TrainConfig(steps=3, lr=3e-3, warmup_steps=0, eval_every=0), after_backward=hook).fit(
        progress=False)
    assert len(calls) == 3 and all(c > 0 for c in calls)
    after = weights(model)
    norms = [k for k in before if k.endswith("norm.weight")]
    assert norms and all(torch.equal(before[k], after[k]) for k in norms)


def test_checkpoint_round_trip(world, data, tmp_path):
    model = build(world)
    Trainer(model, data, TrainConfig(steps=4, warmup_steps=1), checkpoint_dir=tmp_path).fit(progress=False)
    fresh = Transformer(TransformerConfig(**read_config(tmp_path)))
    assert fresh.config == model.config
    assert not same_weights(weights(fresh), weights(model))
    state = load_checkpoint(tmp_path, fresh)
    assert state["step"] == 4
    x = data.batch(0)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(x["input_ids"]), fresh(x["input_ids"]))
    assert same_weights(weights(fresh), weights(model))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "trainer.safetensors"]


def test_exact_resume(world, data, eval_batches, uninterrupted, tmp_path):
    history, final = uninterrupted
    first = Trainer(build(world), data, CFG, eval_batches=eval_batches, checkpoint_dir=tmp_path)
    first.fit(until=9, progress=False)
    assert first.step == 9
    model = build(world, seed=123)  # a different initialisation: everything must come from the checkpoint
    second = Trainer(model, data, CFG, eval_batches=eval_batches, checkpoint_dir=tmp_path)
    assert second.resume()
    assert second.step == 9
    resumed = second.fit(progress=False)
    assert resumed["loss"] == history["loss"]
    assert resumed["lr"] == history["lr"]
    assert resumed["step"] == history["step"]
    assert resumed["eval_step"] == history["eval_step"]
    assert resumed["eval_loss"] == history["eval_loss"]
    assert same_weights(weights(model), final)


def test_resume_without_checkpoint_returns_false(world, data, tmp_path):
    assert Trainer(build(world), data, CFG, checkpoint_dir=tmp_path / "empty").resume() is False
    assert Trainer(build(world), data, CFG).resume() is False
    with pytest.raises(ValueError):
        Trainer(build(world), data, CFG).save()


def test_resume_refuses_a_different_train_config(world, data, tmp_path):
    Trainer(build(world), data, CFG, checkpoint_dir=tmp_path).fit(until=2, progress=False)
    other = TrainConfig(**{**CFG.__dict__, "lr": 1e-3})
    with pytest.raises(CheckpointError, match="TrainConfig"):
        Trainer(build(world), data, other, checkpoint_dir=tmp_path).resume()


def test_refused_resume_leaves_the_model_alone(world, data, tmp_path):
    Trainer(build(world), data, CFG, checkpoint_dir=tmp_path).fit(until=2, progress=False)
    model = build(world, seed=7)
    before = weights(model)
    other = TrainConfig(**{**CFG.__dict__, "lr": 1e-3})
    with pytest.raises(CheckpointError):
        Trainer(model, data, other, checkpoint_dir=tmp_path).resume()
    assert same_weights(weights(model), before)


def test_keyboard_interrupt_saves_and_resumes(world, data, eval_batches, uninterrupted, tmp_path):
    calls = []

    def interrupting(model, batch):
        calls.append(1)
        if len(calls) == 6:  # the loss of step 5 (0-based)
            raise KeyboardInterrupt
        return batch_loss(model, batch)

    tr = Trainer(build(world), data, CFG, eval_batches=eval_batches, checkpoint_dir=tmp_path, loss_fn=interrupting)
    with pytest.raises(KeyboardInterrupt):
        tr.fit(progress=False)
    assert tr.step == 5
    assert load_checkpoint(tmp_path, build(world))["step"] == 5
    again = Trainer(build(world, seed=5), data, CFG, eval_batches=eval_batches, checkpoint_dir=tmp_path)
    assert again.resume() and again.step == 5
    assert again.history["loss"] == uninterrupted[0]["loss"][:5]
    assert again.fit(progress=False)["loss"] == uninterrupted[0]["loss"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_stops_without_updating(world, data, tmp_path, bad: float):
    calls, snapshot = [], {}

    def poisoned(model, batch):
        calls.append(1)
        loss = batch_loss(model, batch)
        if len(calls) == 4:  # step 3
            snapshot.update(weights(model))
            return loss * bad
        return loss

    model = build(world)
    cfg = TrainConfig(steps=10, warmup_steps=1, checkpoint_every=2)
    tr = Trainer(model, data, cfg, checkpoint_dir=tmp_path, loss_fn=poisoned)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        tr.fit(progress=False)
    assert tr.step == 3 and len(tr.history["loss"]) == 3
    assert same_weights(weights(model), snapshot)
    assert load_checkpoint(tmp_path, build(world))["step"] == 2  # the last good checkpoint is intact


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoint errors


@pytest.fixture
def saved(world, data, tmp_path) -> Path:
    d = tmp_path / "ckpt"
    Trainer(build(world), data, TrainConfig(steps=3, warmup_steps=1), checkpoint_dir=d).fit(progress=False)
    return d


def trainer_for(world, data, d: Path) -> Trainer:
    return Trainer(build(world), data, TrainConfig(steps=3, warmup_steps=1), checkpoint_dir=d)


def test_load_missing_folder(world, tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere", build(world))


def test_load_folder_without_weights(world, saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(saved, build(world))


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "tiny"])
@pytest.mark.parametrize("name", ["model.safetensors", "trainer.safetensors"])
def test_load_corrupt_files(world, data, saved, damage: str, name: str):
    path = saved / name
    raw = path.read_bytes()
    path.write_bytes({"garbage": bytes(range(256)) * 40, "truncated": raw[: len(raw) // 2], "empty": b"",
                      "tiny": b"\x08\x00"}[damage])
    tr = trainer_for(world, data, saved)
    with pytest.raises(CheckpointError, match=name):
        load_checkpoint(saved, tr.model, tr.optimizer)


def test_load_corrupt_config(saved):
    (saved / "config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="config.json"):
        read_config(saved)
    (saved / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        read_config(saved)


def test_load_missing_trainer_state(world, data, saved):
    (saved / "trainer.safetensors").unlink()
    load_checkpoint(saved, build(world))  # weights alone still load
    tr = trainer_for(world, data, saved)
    with pytest.raises(CheckpointError, match="trainer.safetensors"):
        tr.resume()


@pytest.mark.parametrize("kwargs", [dict(d_model=16), dict(n_layer=1), dict(n_layer=3)])
def test_load_into_a_model_that_does_not_fit(world, saved, kwargs):
    model = build(world, **kwargs)
    before = weights(model)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(saved, model)
    assert same_weights(weights(model), before)


def make_torn(world, data, tmp_path) -> Path:
    """A folder whose trainer.safetensors is from step 2 while the weights are from step 4."""
    d = tmp_path / "torn"
    cfg = TrainConfig(steps=4, warmup_steps=1, checkpoint_every=2)
    tr = Trainer(build(world), data, cfg, checkpoint_dir=d)
    tr.fit(until=2, progress=False)
    old = (d / "trainer.safetensors").read_bytes()
    tr.fit(progress=False)
    (d / "trainer.safetensors").write_bytes(old)
    return d


def test_load_torn_pair(world, data, tmp_path):
    d = make_torn(world, data, tmp_path)
    tr = Trainer(build(world), data, TrainConfig(steps=4, warmup_steps=1, checkpoint_every=2), checkpoint_dir=d)
    with pytest.raises(CheckpointError, match=r"trainer\.safetensors.*step 2.*step 4"):
        tr.resume()


def test_torn_pair_error_names_the_file(world, data, tmp_path):
    d = make_torn(world, data, tmp_path)
    tr = Trainer(build(world), data, TrainConfig(steps=4, warmup_steps=1, checkpoint_every=2), checkpoint_dir=d)
    with pytest.raises(CheckpointError) as e:
        tr.resume()
    assert "trainer.safetensors" in str(e.value) or "model.safetensors" in str(e.value)


def test_loading_never_unpickles(world, data, saved, monkeypatch):
    assert {p.suffix for p in saved.iterdir()} == {".safetensors", ".json"}
    assert not [p for p in saved.iterdir() if p.name.startswith(".")]  # no temporary files left behind

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    tr = trainer_for(world, data, saved)
    assert tr.resume() and tr.step == 3


# ---------------------------------------------------------------------------------------------------------------------
# Evaluation


def test_evaluate_accuracy_on_untrained_model(world):
    model = build(world)
    problems = world.heldout[:6]
    acc, completions = evaluate_accuracy(model, world, problems, max_new_tokens=12)
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    assert len(completions) == len(problems) and all(isinstance(c, str) for c in completions)
    assert acc == sum(world.grade(completions, problems)) / len(problems)
    # each completion is the greedy continuation of its own prompt, whatever the batching by length
    tok = world.tokenizer
    for p, c in zip(problems, completions):
        x = torch.tensor([tok.encode(world.prompts([p])[0], bos=True)])
        y = model.generate(x, 12, stop_id=tok.id("</answer>"), pad_id=tok.pad_id)
        assert c == tok.decode(y[0, x.shape[1]:].tolist())


class Oracle(torch.nn.Module):
    """A stand-in model that reads the prompt and writes the right (or a wrong) answer."""

    def __init__(self, tokenizer, wrong: bool = False):
        super().__init__()
        self.tok, self.wrong = tokenizer, wrong

    def generate(self, x, max_new_tokens, temperature=0.0, stop_id=None, pad_id=0, generator=None):
        rows = []
        for r in x.tolist():
            q = self.tok.decode(r).removeprefix("Q:").removesuffix(" <think>")
            nums, ops = [int(n) for n in q.replace("-", "+").split("+")], [c for c in q if c in "+-"]
            ans = nums[0]
            for op, n in zip(ops, nums[1:]):
                ans = ans + n if op == "+" else ans - n
            rows.append(self.tok.encode(f"</think> <answer> {ans + self.wrong} </answer>"))
        width = max(map(len, rows))
        rows = [row + [pad_id] * (width - len(row)) for row in rows]
        return torch.cat([x, torch.tensor(rows)], 1)


def test_evaluate_accuracy_keeps_completions_in_problem_order(world):
    problems = world.heldout[:30]
    assert len({len(p.operands) for p in problems}) > 1  # prompts of different lengths are batched apart
    acc, completions = evaluate_accuracy(Oracle(world.tokenizer), world, problems, batch_size=4)
    assert acc == 1.0
    assert [int(c.split()[-2]) for c in completions] == [p.answer for p in problems]
    assert evaluate_accuracy(Oracle(world.tokenizer, wrong=True), world, problems)[0] == 0.0
    assert complete(Oracle(world.tokenizer), world.tokenizer, []) == []


def test_ctrl_c_waits_for_the_end_of_the_update():
    """interrupts_deferred holds SIGINT until its block ends, so a state saved on Ctrl-C is never half a step."""
    import os
    import signal

    from dslib.checkpoint import interrupts_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("the rest of the block ran")
    assert done == ["the rest of the block ran"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    with interrupts_deferred():
        done.append("no signal, no interrupt")
    assert len(done) == 2
