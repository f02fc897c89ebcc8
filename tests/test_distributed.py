"""Data-parallel training (dslib.distributed) with the gloo backend and 2 processes on the CPU: the pieces, one at a
time, and the capstone under torchrun, whose pretraining must follow one process's loss curve with the same global
batch, and whose R1 and distillation stages follow it wherever they train on the same data."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dslib import capstone
from dslib.capstone import PRESETS, CapstoneError

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="this PyTorch has no torch.distributed with gloo")


def _sft_problem(world):
    """A small model, 24 of R1's cold-start texts packed in rows of 128 tokens, 4 rows a step, and a 3-step TrainConfig."""
    from dslib.r1 import cold_start_data
    from dslib.train import TrainConfig
    from dslib.transformer import Transformer, TransformerConfig
    from dslib.world import PackedData

    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=16, n_layer=1, n_head=2))
    data = PackedData(cold_start_data(world, 24, seed=0), world.tokenizer, 128, 4, seed=0)
    return model, data, TrainConfig(steps=3, lr=1e-2, warmup_steps=1, eval_every=0, seed=0)


def _pieces(rank: int, world: int, init: str, out: str) -> None:
    """Runs in each of the 2 processes: every helper of dslib.distributed, results written to out/rank<r>.json."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    from dslib import distributed as dd
    from dslib.grpo import GRPOConfig
    from dslib.moe import expert_load, moe_layers
    from dslib.v3 import DeepSeekV3

    g = dd.Group(rank, world)
    res = {}
    # average_gradients: a gradient that only rank 0 has (rank 1's is None) is averaged as if rank 1's were zero.
    lin = torch.nn.Linear(3, 2)
    torch.manual_seed(rank)  # different weights on purpose: broadcast_parameters makes them rank 0's
    torch.nn.init.normal_(lin.weight)
    dd.broadcast_parameters(lin, g)
    res["weight"] = lin.weight.flatten().tolist()
    lin.weight.grad = torch.full_like(lin.weight, float(rank + 1))
    lin.bias.grad = torch.ones_like(lin.bias) if rank == 0 else None
    dd.average_gradients(lin, g)
    res["weight_grad"] = lin.weight.grad.flatten().tolist()
    res["bias_grad"] = lin.bias.grad.tolist()
    # token_share: 3 tokens here, 1 there -> 1.5 and 0.5.
    res["share"] = float(dd.token_share(torch.tensor([1, 1, 1, 0]) if rank == 0 else torch.tensor([0, 1, 0, 0]), g))
    # global_mean_loss: the value is the mean of the processes', the gradient this process's own.
    w = torch.tensor(2.0, requires_grad=True)
    loss = dd.global_mean_loss(lambda m, b: w * (rank + 1), g)(None, None)
    loss.backward()
    res["mean_loss"], res["own_grad"] = loss.item(), w.grad.item()
    res["means"] = dd.mean_floats({"a": float(rank), "b": float("nan") if rank == 0 else 4.0}, g)
    # gather_routing: each MoE layer then holds both processes' expert choices.
    torch.manual_seed(0)
    cfg = capstone.v3_config(PRESETS["tiny"], 64)
    model = DeepSeekV3(cfg).eval()
    torch.manual_seed(10 + rank)
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 16)))
    ran = [m for m in moe_layers(model) if m.routing is not None]  # the main model's layers (MTP's did not run)
    own = [expert_load(m.routing.indices, cfg.n_routed_experts).tolist() for m in ran]
    dd.gather_routing(model, g)
    res["own_load"] = own
    res["gathered_load"] = [expert_load(m.routing.indices, cfg.n_routed_experts).tolist() for m in ran]
    # DataParallelGRPO: each process takes every other prompt; after two steps the weights are still identical.
    world_ = capstone._world(PRESETS["tiny"])
    policy = DeepSeekV3(cfg.__class__(**{**cfg.to_dict(), "vocab_size": world_.tokenizer.vocab_size}))
    tr = dd.DataParallelGRPO(policy, world_, GRPOConfig(steps=2, prompts_per_step=4, group_size=2,
                                                        max_new_tokens=8, seed=3), group=g)
    res["problems"] = [repr(p) for p in tr.problems(0)]
    tr.fit(progress=False)
    res["policy"] = [float(p.detach().double().sum()) for p in tr.model.parameters()]
    res["reward_logged"] = tr.history["reward"]
    # The capstone's trainers for R1's stages and the distillation: the SFT trainer takes this process's rows.
    ctx = capstone._Run(Path(out, "run"), PRESETS["tiny"], 0, torch.device("cpu"), False, False, g)
    sft = ctx.trainers().sft(*_sft_problem(world_), None)
    res["sft_rows"] = sft.data.batch(0)["input_ids"].shape[0]
    sft.fit(progress=False)
    res["sft_loss"] = sft.history["loss"]
    res["sft_weights"] = [float(p.detach().double().sum()) for p in sft.model.parameters()]
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))
    dist.destroy_process_group()


def test_pieces_on_two_processes(tmp_path):
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.start_processes(_pieces, args=(2, init, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["weight"] == r1["weight"]  # broadcast from rank 0
    assert r0["weight_grad"] == r1["weight_grad"] == [1.5] * 6  # (1 + 2) / 2
    assert r0["bias_grad"] == r1["bias_grad"] == [0.5, 0.5]  # (1 + 0) / 2, filled in on rank 1
    assert (r0["share"], r1["share"]) == (1.5, 0.5)
    assert r0["mean_loss"] == r1["mean_loss"] == pytest.approx(3.0)  # (2*1 + 2*2) / 2
    assert (r0["own_grad"], r1["own_grad"]) == (1.0, 2.0)
    assert r0["means"]["a"] == pytest.approx(0.5) and r0["means"]["b"] == pytest.approx(4.0)
    for own0, own1, gathered in zip(r0["own_load"], r1["own_load"], r0["gathered_load"]):
        assert gathered == [a + b for a, b in zip(own0, own1)]
    assert r0["gathered_load"] == r1["gathered_load"] and r0["own_load"] != r1["own_load"]
    # R1's and the distillation's SFT: 2 of the 4 rows on each process, one process's loss curve and weights.
    from dslib.r1 import local_sft_trainer

    alone = local_sft_trainer(*_sft_problem(capstone._world(PRESETS["tiny"])), None)
    assert alone.data.batch(0)["input_ids"].shape[0] == 4 and r0["sft_rows"] == r1["sft_rows"] == 2
    alone.fit(progress=False)
    assert r0["sft_loss"] == r1["sft_loss"] == pytest.approx(alone.history["loss"], abs=1e-5)
    assert r0["sft_weights"] == r1["sft_weights"] == pytest.approx(
        [float(p.double().sum()) for p in alone.model.parameters()], abs=1e-4)
    # The prompts are split without overlap, and the processes' models stay identical through the updates.
    from dslib.grpo import GRPOConfig, GRPOTrainer
    from dslib.transformer import Transformer, TransformerConfig

    world = capstone._world(PRESETS["tiny"])
    one = GRPOTrainer(Transformer(TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=8, n_layer=1,
                                                    n_head=2)), world, GRPOConfig(prompts_per_step=4, seed=3))
    assert sorted(r0["problems"] + r1["problems"]) == sorted(repr(p) for p in one.problems(0))
    assert r0["problems"] != r1["problems"]
    assert r0["policy"] == r1["policy"]
    assert r0["reward_logged"] == r1["reward_logged"] and len(r0["reward_logged"]) == 2


def _run(args: list[str], torchrun: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] \
        if torchrun else [sys.executable]
    return subprocess.run([*launcher, "-m", "dslib", "capstone", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)


def test_capstone_under_torchrun_follows_one_process(tmp_path):
    """Pretraining V3-mini on 2 processes (4 rows each) gives one process's loss curve (8 rows) and the same
    model; R1-Zero's GRPO then runs with its prompts split across the processes."""
    common = ["--preset", "tiny", "--quiet", "--threads", "1", "--stages", "pretrain,r1_zero"]
    one = _run([*common, "--out", str(tmp_path / "one")], torchrun=False)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run([*common, "--out", str(tmp_path / "two")], torchrun=True)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("[pretrain] starting") == 1  # the first process speaks for both
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert b["run"]["processes"] == 2 and a["run"]["processes"] == 1
    pa, pb = a["stages"]["pretrain"], b["stages"]["pretrain"]
    assert len(pa["loss"]) == len(pb["loss"]) == PRESETS["tiny"].pretrain_steps
    assert pb["loss"] == pytest.approx(pa["loss"], abs=1e-4)
    assert pb["eval_loss"] == pytest.approx(pa["eval_loss"], abs=1e-4)
    assert pb["maxvio"] == pytest.approx(pa["maxvio"], abs=1e-3)  # the bias moved by the global loads
    from safetensors.torch import load_file

    wa, wb = (load_file(str(tmp_path / d / "stages/pretrain/final/model.safetensors")) for d in ("one", "two"))
    assert wa.keys() == wb.keys()
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 1e-3
    assert len(b["stages"]["r1_zero"]["reward"]) == PRESETS["tiny"].r1_zero["steps"]
    # Only the first process wrote checkpoints: one set, as for a single process.
    assert sorted(p.name for p in (tmp_path / "two/stages/r1_zero/grpo").iterdir()) == \
        sorted(p.name for p in (tmp_path / "one/stages/r1_zero/grpo").iterdir())


def test_batches_that_do_not_split_are_refused(monkeypatch, tmp_path):
    from dslib.distributed import Group, ShardedBatches

    monkeypatch.setenv("WORLD_SIZE", "3")  # the tiny preset's batch of 8 rows cannot split in 3
    with pytest.raises(CapstoneError, match="3 processes: batch 8, .* do not split evenly"):
        capstone.run(tmp_path / "out", "tiny", progress=False)
    assert not (tmp_path / "out").exists()  # refused before anything was written

    class Data:
        batch_size = 6

    with pytest.raises(ValueError, match="6 rows does not split across 4"):
        ShardedBatches(Data(), Group(0, 4))


def _loss_curve(folder: Path) -> list[float]:
    from dslib.checkpoint import read_trainer_state

    return read_trainer_state(folder)["history"]["loss"]


def test_r1_and_the_distillation_under_torchrun_follow_one_process(tmp_path):
    """R1's four stages and the students' stage under torchrun, resumed into a copy of a one-process run that has
    forgotten them (the teacher's samples kept, so both runs distil the same texts). Every SFT on the same data follows
    one process's loss curve: R1's cold start, each student's own base, its distillation. The RL stages run with their
    prompts split (other samples, so their curves are not compared), and only the first process writes."""
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--preset", "tiny", "--quiet", "--threads", "1"]
    ran = _run([*common, "--stages", "pretrain,r1,students", "--out", str(one)], torchrun=False)
    assert ran.returncode == 0, ran.stderr[-3000:]
    shutil.copytree(one, two)
    record = json.loads((two / "run.json").read_text())
    record["stages_done"] = [s for s in record["stages_done"] if s not in ("r1", "students")]
    (two / "run.json").write_text(json.dumps(record))
    shutil.rmtree(two / "stages/r1")
    for child in (two / "stages/students").iterdir():
        if child.name != "teacher_data.json":
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    ran = _run([*common, "--stages", "r1,students", "--resume", "--out", str(two)], torchrun=True)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.count("[r1] starting") == 1 and ran.stdout.count("[students] starting") == 1
    record = json.loads((two / "run.json").read_text())
    assert {"r1", "students"} <= set(record["stages_done"]) and record["sessions"][-1]["processes"] == 2

    cold = "stages/r1/stages/cold_start"
    assert len(_loss_curve(two / cold)) == PRESETS["tiny"].r1["cold_start_steps"]
    assert _loss_curve(two / cold) == pytest.approx(_loss_curve(one / cold), abs=1e-4)
    for size in PRESETS["tiny"].students:
        for part in ("base/train", "distill/train"):
            a, b = _loss_curve(one / f"stages/students/{size}/{part}"), _loss_curve(two / f"stages/students/{size}/{part}")
            assert len(a) > 1 and b == pytest.approx(a, abs=1e-4), (size, part)
        assert (two / f"stages/students/{size}/rl/done.json").exists()
    rejection = two / cold / "reasoning_rl/rejection_sft"
    assert json.loads((rejection / "rejection.json").read_text())["non_reasoning"] == PRESETS["tiny"].r1["non_reasoning"]
    metrics = json.loads((two / "metrics.json").read_text())
    assert len(metrics["stages"]["r1"]["stages"]["reasoning_rl"]["reward"]) == PRESETS["tiny"].r1["rl"]["steps"]
    # Only the first process wrote checkpoints: the same files as one process wrote.
    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    assert files(two / "stages/r1") == files(one / "stages/r1")
    assert files(two / "stages/students") == files(one / "stages/students")
