"""The capstone: the whole course as one command, `python -m dslib capstone` (hand-written orchestration).

No new idea lives here: every stage calls what a chapter built and exported. The pipeline is

    pretrain    DeepSeek-V3-mini from random weights (MLA, DeepSeekMoE with auxiliary-loss-free balancing, MTP) on the
                arithmetic world's bilingual corpus (chapters 00, 02-04)
    r1_zero     GRPO with rule rewards only, from the pretrained base (chapters 05-06)
    r1          R1's four stages from the same base: cold start, reasoning RL, rejection-sampling SFT, RL for all
                scenarios (chapter 07)
    students    for each student size: a dense model pretrained alone on the same corpus (its own base), the same
                model distilled from R1's samples, and the base grown by its own GRPO run (R1's Table 6; chapter 08)
    eval        every model on the same held-out problems (greedy accuracy, pass@1, cons@k, length, reflection,
                language mixing), each exported as a transformers folder and checked there by greedy decoding
    report      report.md and report.html (the report card), metrics.json, the plots

Everything goes into one folder (`--out`):

    run.json            what this run is (preset, seed, stages done): a folder holding another run is refused
    stages/<stage>/     the checkpoints of each stage (every `checkpoint_every` steps and at its end, written atomically
                        before any evaluation); `--resume` continues from them, and a finished stage is loaded
    heldout.jsonl       the exact prompts the models were evaluated on, with their answers
    metrics.json        per stage: its figures; `eval`: per model, its measures
    hf/<name>/          a transformers folder per evaluated model (AutoModelForCausalLM + AutoTokenizer)
    *.png, report.md, report.html

On a Linux or macOS CPU with two cores or more the run has two workers (`--workers 2`, the default there): a second process trains
what needs no other stage's result, the students' own runs (each student's base and its RL), and then r1_zero once
pretraining is done, while the first process pretrains, runs R1 and distils. The threads are shared evenly, and each
part computes what it would compute alone, so the metrics equal those of `--workers 1` with the same threads per
process. Small models use a second core poorly, so on 2 cores this takes about a fifth off the time.

Under `torchrun --nproc_per_node N`, the training stages run data-parallel (dslib.distributed): every process takes
1/N of each batch and of each GRPO step's prompts, the gradients are averaged, and the first process alone writes.

A run is deterministic: on the same machine, the same preset and seed give the same metrics, whether or not the run
was interrupted and resumed (every trainer resumes its optimizer, RNG, step and logs, and every batch and rollout is a
pure function of the step).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import html
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dslib.checkpoint import CheckpointError

__all__ = ["Preset", "PRESETS", "STAGES", "CapstoneError", "run", "main", "model_names", "load_model",
           "heldout_problems", "evaluate_model", "hf_greedy_accuracy", "claims", "report_markdown", "report_html"]

STAGES = ("pretrain", "r1_zero", "r1", "students", "eval", "report")
_NEEDS = {"pretrain": (), "r1_zero": ("pretrain",), "r1": ("pretrain",), "students": ("r1",),
          "eval": ("pretrain", "r1_zero", "r1", "students"), "report": ("eval",)}
RUN_FILE = "run.json"
FORMAT = 1  # bump when what a preset produces changes, so an old run folder is not resumed by new code


class CapstoneError(RuntimeError):
    """A capstone run that cannot go on: a bad option, an --out folder that holds another run, a missing or corrupt
    checkpoint. The message names the problem; nothing was overwritten."""


# ---------------------------------------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------------------------------------

_BILINGUAL = {"prompt_en_rate": 0.5, "en_rate": 0.03, "switch_rate": 0.03}  # dslib.pretrained.BILINGUAL_WORLD


@dataclass(frozen=True)
class Preset:
    """Every size of a capstone run. `model`: V3Config fields of V3-mini; `students`: TransformerConfig fields per
    student size; `r1_zero`, `student_rl`: GRPOConfig fields; `r1`: R1Config fields; `distill`: DistillConfig fields."""

    name: str
    world: dict = field(default_factory=lambda: dict(_BILINGUAL))
    seq_len: int = 128
    model: dict = field(default_factory=dict)
    pretrain_steps: int = 2400
    batch: int = 20
    lr: float = 3e-3
    warmup_steps: int = 100
    mtp_lambda: tuple[float, float] = (0.3, 0.1)  # V3: 0.3 for the first 10T of 14.8T tokens, then 0.1
    r1_zero: dict = field(default_factory=lambda: {"steps": 40})
    r1: dict = field(default_factory=dict)
    students: dict = field(default_factory=dict)
    student_steps: int = 2400
    distill_problems: int = 600
    distill_k: int = 2
    distill: dict = field(default_factory=lambda: {"steps": 200})
    distill_non_reasoning: int = 100  # bare answers to one-operation problems, as R1's 800k set held 200k
    student_rl: dict = field(default_factory=lambda: {"steps": 30})
    eval_problems: int = 100  # per language: the held-out set is these problems in symbols and in words
    eval_k: int = 4
    hf_check: int = 0  # held-out prompts decoded by transformers per model (0: all)
    checkpoint_every: int = 200  # pretraining steps between checkpoints (GRPO: every 10 steps)
    max_new_tokens: int = 96

    def capped(self, max_steps: int | None) -> "Preset":
        """The same models with every training stage cut to at most max_steps steps and every sampled set to at most
        16 problems (4 per language held out): a smoke test of a preset (shapes, configs, devices), not a run that
        learns."""
        if max_steps is None:
            return self
        cap = lambda n: max(1, min(n, max_steps))  # noqa: E731
        few = lambda n: max(1, min(n, 16))  # noqa: E731
        r1 = dict(self.r1)
        r1.update(cold_start_examples=min(r1.get("cold_start_examples", 1000), 64), sft_batch=4,
                  rejection_problems=few(r1.get("rejection_problems", 800)),
                  non_reasoning=max(48, min(r1.get("non_reasoning", 200), 64)))
        for key in ("cold_start_steps", "sft_steps"):
            r1[key] = cap(r1.get(key, 300 if key == "cold_start_steps" else 200))

        def grpo(d: dict, steps: int) -> dict:  # few steps of few rollouts
            return {**d, "steps": cap(d.get("steps", steps)), "prompts_per_step": min(d.get("prompts_per_step", 32), 8),
                    "group_size": min(d.get("group_size", 8), 4)}

        r1["rl"], r1["final_rl"] = grpo(r1.get("rl", {}), 60), grpo(r1.get("final_rl", {}), 30)
        return replace(self, pretrain_steps=cap(self.pretrain_steps), student_steps=cap(self.student_steps),
                       warmup_steps=min(self.warmup_steps, cap(self.pretrain_steps) - 1), r1=r1,
                       r1_zero=grpo(self.r1_zero, 40),
                       distill={**self.distill, "steps": cap(self.distill.get("steps", 300)), "batch": 4},
                       student_rl=grpo(self.student_rl, 30),
                       checkpoint_every=cap(self.checkpoint_every), distill_problems=few(self.distill_problems),
                       distill_non_reasoning=max(48, min(self.distill_non_reasoning, 64)),
                       eval_problems=min(self.eval_problems, 4), hf_check=4)


_V3_MINI = dict(hidden_size=96, intermediate_size=256, moe_intermediate_size=48, num_hidden_layers=4,
                num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, num_nextn_predict_layers=1)
_STUDENTS = {"S": dict(d_model=48, n_layer=3, n_head=4, n_kv_head=1), "M": dict(d_model=64, n_layer=3, n_head=4,
                                                                                 n_kv_head=2)}

PRESETS: dict[str, Preset] = {
    # A laptop CPU in about a quarter of an hour (2 cores).
    "small": Preset(
        name="small", model=_V3_MINI, pretrain_steps=2000, batch=20,
        r1_zero={"steps": 60},
        r1={"cold_start_examples": 400, "cold_start_steps": 60, "rl": {"steps": 40, "max_new_tokens": 96},
            "rejection_problems": 300, "rejection_k": 2, "non_reasoning": 80, "sft_steps": 120,
            "final_rl": {"steps": 10}},
        students=_STUDENTS, student_steps=2400, distill_problems=1200, distill_k=2, distill={"steps": 300},
        student_rl={"steps": 20, "max_new_tokens": 96}, eval_problems=100, eval_k=4, hf_check=0),
    # One GPU (a free Colab T4 within the hour; faster on a bigger card): wider models, longer runs.
    "full": Preset(
        name="full", model={**_V3_MINI, "hidden_size": 256, "intermediate_size": 683, "moe_intermediate_size": 96,
                            "num_hidden_layers": 6, "num_attention_heads": 8, "kv_lora_rank": 64,
                            "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
                            "n_routed_experts": 32, "num_experts_per_tok": 6, "n_group": 4, "topk_group": 2},
        pretrain_steps=6000, batch=64, lr=2e-3, warmup_steps=200, r1_zero={"steps": 150, "prompts_per_step": 64},
        r1={"rl": {"steps": 100, "max_new_tokens": 96, "prompts_per_step": 64}, "final_rl": {"steps": 40}},
        students={"S": dict(d_model=96, n_layer=4, n_head=4, n_kv_head=1),
                  "M": dict(d_model=160, n_layer=4, n_head=4, n_kv_head=2)},
        student_steps=4000, distill_problems=2000, distill_k=4, distill={"steps": 600, "batch": 32},
        student_rl={"steps": 100, "max_new_tokens": 96}, eval_problems=200, eval_k=8, hf_check=200,
        checkpoint_every=500),
    # Seconds, for the tests and for chapter 09's first run: every stage runs, nothing is learnt.
    "tiny": Preset(
        name="tiny", model={**_V3_MINI, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
                            "num_hidden_layers": 2, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2,
                            "topk_group": 1},
        pretrain_steps=30, batch=8, warmup_steps=5, r1_zero={"steps": 3, "prompts_per_step": 8, "group_size": 4},
        r1={"cold_start_examples": 40, "cold_start_steps": 5, "sft_batch": 8,
            "rl": {"steps": 2, "prompts_per_step": 8, "group_size": 4, "max_new_tokens": 48},
            "rejection_problems": 16, "rejection_k": 2, "non_reasoning": 48, "sft_steps": 5, "final_rl": {"steps": 2}},
        students={"S": dict(d_model=16, n_layer=1, n_head=2, n_kv_head=1)}, student_steps=10, distill_problems=16,
        distill_k=2, distill={"steps": 5, "batch": 8},
        student_rl={"steps": 2, "prompts_per_step": 8, "group_size": 4, "max_new_tokens": 48}, eval_problems=8,
        eval_k=2, hf_check=4, checkpoint_every=10, max_new_tokens=48, distill_non_reasoning=48),
}


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks: the world, the models, loading and saving
# ---------------------------------------------------------------------------------------------------------------------

def _world(preset: Preset):
    from dslib.world import World, WorldConfig

    return World(WorldConfig(**preset.world))


def heldout_problems(preset: Preset, world) -> list:
    """The held-out problems of a run: the world's first eval_problems held-out problems, in symbols, then in words."""
    from dslib.r1 import bilingual

    return bilingual(world.heldout[:preset.eval_problems])


def v3_config(preset: Preset, vocab_size: int):
    from dslib.v3 import V3Config

    return V3Config(**{**preset.model, "vocab_size": vocab_size, "max_position_embeddings": preset.seq_len})


def student_config(preset: Preset, size: str, vocab_size: int):
    from dslib.transformer import TransformerConfig

    return TransformerConfig(**{**preset.students[size], "vocab_size": vocab_size, "max_seq_len": preset.seq_len})


def load_model(folder: str | Path, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A model saved by a stage (dslib.checkpoint folder): DeepSeekV3 or Transformer, from its config.json."""
    from dslib.checkpoint import CheckpointError, load_checkpoint, read_config
    from dslib.transformer import Transformer, TransformerConfig
    from dslib.v3 import DeepSeekV3, V3Config

    folder = Path(folder)
    try:
        cfg = read_config(folder)
        model = DeepSeekV3(V3Config.from_dict(cfg)) if "kv_lora_rank" in cfg else Transformer(TransformerConfig(**cfg))
        load_checkpoint(folder, model)
    except (CheckpointError, TypeError, ValueError) as e:
        raise CapstoneError(f"{folder}: the saved model cannot be loaded ({e}); run the stage again without "
                            f"--resume into a new --out") from None
    return model.to(device).eval()


def _save_final(folder: Path, model: torch.nn.Module, summary: dict) -> None:
    """A stage's result: its model (final/) and its summary (done.json), the summary written last, so a stage counts
    as done only when both are complete."""
    from dslib.checkpoint import atomic_write_text, save_checkpoint

    tmp = folder / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(tmp, model, model.config.to_dict())
    shutil.rmtree(folder / "final", ignore_errors=True)
    os.replace(tmp, folder / "final")
    atomic_write_text(folder / "done.json", json.dumps(summary, indent=1, default=_json_default) + "\n")


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"not JSON-able: {type(x).__name__}")


def _done(folder: Path) -> dict | None:
    path = folder / "done.json"
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise CapstoneError(f"{path}: corrupt ({e}); this stage's record cannot be read") from None


def _say(msg: str) -> None:
    print(msg, flush=True)


# ---------------------------------------------------------------------------------------------------------------------
# Stage 1: pretraining V3-mini
# ---------------------------------------------------------------------------------------------------------------------

class _PretrainObjective:
    """The loss of V3-mini's pretraining: next-token loss + lambda/D sum_k L^k (MTP, V3 eq. 25) + the complementary
    sequence-wise balance loss; lambda follows V3's schedule (the first two thirds of the steps, then the second)."""

    def __init__(self, steps: int, lams: tuple[float, float], loss: Callable, group=None):
        self.steps, self.lams, self.trainer, self.group = steps, lams, None, group
        self.loss = loss  # dslib.mtp.mtp_loss, or the run's compiled copy of it

    def __call__(self, model, batch):
        from dslib.moe import moe_aux_loss
        from dslib.mtp import mtp_targets

        lam = self.lams[0] if self.trainer.step < 2 * self.steps / 3 else self.lams[1]
        total, main, depths = self.loss(model, batch, lam)
        if self.group is not None:  # data-parallel: each token mean weighed by this process's share of the tokens
            from dslib.distributed import token_share

            share = lambda mask: token_share(mask, self.group)  # noqa: E731
            main = main * share(batch["loss_mask"])
            total = main + (lam / max(1, len(depths))) * sum(
                d * share(mtp_targets(batch, k)[1]) for k, d in enumerate(depths, start=1))
        self.main_loss = main.detach()  # the next-token loss alone (with several processes: this one's part)
        return total + moe_aux_loss(model)


def _balance(model) -> dict:
    """Expert load of the last forward, per MoE layer: the loads and MaxVio (max load / mean load - 1)."""
    from dslib.moe import expert_load, max_violation, moe_layers

    loads = [expert_load(m.routing.indices, m.config.n_routed_experts) for m in moe_layers(model)
             if m.routing is not None]
    return {"max_vio": [max_violation(l) for l in loads], "load": [l.tolist() for l in loads]}


def stage_pretrain(ctx: "_Run") -> dict:
    from dslib.distributed import gather_routing
    from dslib.moe import update_bias
    from dslib.train import TrainConfig
    from dslib.v3 import DeepSeekV3
    from dslib.world import PackedData

    p, world, folder = ctx.preset, ctx.world, ctx.stage_dir("pretrain")
    tok = world.tokenizer
    data = PackedData([d.text for d in world.corpus()], tok, p.seq_len, p.batch, seed=ctx.seed)
    valid = PackedData([d.text for d in world.validation()], tok, p.seq_len, 64, seed=ctx.seed).all_batches()[:4]
    torch.manual_seed(ctx.seed)
    model = DeepSeekV3(v3_config(p, tok.vocab_size))
    from dslib.mtp import mtp_loss

    objective = _PretrainObjective(p.pretrain_steps, p.mtp_lambda, ctx.compiled(mtp_loss), ctx.group)

    def after_step(tr, batch):
        main = objective.main_loss.clone()
        if ctx.group is not None:
            torch.distributed.all_reduce(main)
            main /= ctx.group.world_size
            gather_routing(tr.model, ctx.group)  # the bias moves by the global batch's loads, on every process
        tr.history.setdefault("main_loss", []).append(float(main))
        update_bias(tr.model, tr.model.config.bias_update_speed)
        if tr.step % 10 == 0:
            b = _balance(tr.model)
            tr.history.setdefault("maxvio_step", []).append(tr.step + 1)
            tr.history.setdefault("maxvio", []).append(float(np.mean(b["max_vio"])))

    cfg = TrainConfig(steps=p.pretrain_steps, lr=p.lr, warmup_steps=p.warmup_steps, schedule="cosine",
                      eval_every=max(1, p.pretrain_steps // 10), checkpoint_every=p.checkpoint_every, seed=ctx.seed)
    tr = ctx.trainer(model, data, cfg, eval_batches=valid, checkpoint_dir=folder / "train", loss_fn=objective,
                     after_step=after_step)
    objective.trainer = tr
    ctx.resume_stage(tr, "pretrain")
    t0 = time.time()
    start = tr.step
    with ctx.autocast():
        hist = tr.fit(progress=ctx.progress)
    seconds = time.time() - t0
    if not ctx.main:
        return {}
    tokens = (p.pretrain_steps - start) * p.batch * p.seq_len
    model.eval()
    acceptance = _mtp_acceptance(model, world, heldout_problems(p, world)[:20], p.max_new_tokens)
    with torch.no_grad():
        b = valid[0]
        model(*(b[k].to(ctx.device) for k in ("input_ids",)), positions=b["positions"].to(ctx.device),
              segments=b["segments"].to(ctx.device))
    balance = _balance(model)
    tps = tokens / seconds if seconds > 0 and tokens else None
    summary = {"steps": p.pretrain_steps, "parameters": model.num_params(),
               "parameters_mtp": model.num_params(mtp=True),
               **_throughput(tps, model.config, p.seq_len, ctx.device),
               "final_train_loss": hist["loss"][-1], "heldout_loss": hist["eval_loss"][-1],
               "loss": hist["loss"], "main_loss": hist.get("main_loss", []), "eval_step": hist["eval_step"], "eval_loss": hist["eval_loss"],
               "maxvio_step": hist.get("maxvio_step", []), "maxvio": hist.get("maxvio", []),
               "final_max_vio": float(np.mean(balance["max_vio"])), "final_load": balance["load"],
               "mtp_acceptance": acceptance, "seconds_this_session": seconds}
    _save_final(folder, model, summary)
    return summary


# Dense bf16 tensor-core peaks (TFLOP/s) of common GPUs, from their vendors' data sheets: for model FLOPs utilisation.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10G": 125.0, "T4": 65.0,
               "V100": 125.0}


def _throughput(tokens_per_second: float | None, config, seq_len: int, device: torch.device) -> dict:
    """Pretraining throughput: tokens/s, model FLOP/s from dslib.v3.flops_per_token (the main model, MTP not
    counted), MFU where the GPU's peak is known, and peak memory on CUDA."""
    from dslib.v3 import flops_per_token

    out: dict[str, Any] = {"tokens_per_second": tokens_per_second}
    if tokens_per_second:
        out["model_tflops"] = tokens_per_second * flops_per_token(config, seq_len) / 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        out["gpu"] = name
        out["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak and tokens_per_second:
            out["mfu"] = out["model_tflops"] / peak
    return out


@torch.no_grad()
def _mtp_acceptance(model, world, problems, max_new_tokens: int) -> float:
    """Share of MTP drafts the main model accepted in greedy speculative decoding of the prompts (V3 section 5.4.3)."""
    from dslib.mtp import speculative_generate
    from dslib.world import prompt

    if not len(model.mtp):
        return float("nan")
    tok = world.tokenizer
    drafted = accepted = 0
    for pr in problems:
        x = torch.tensor([tok.encode(prompt(pr), bos=True)], device=next(model.parameters()).device)
        _, stats = speculative_generate(model, x, max_new_tokens, stop_id=tok.id("</answer>"))
        drafted, accepted = drafted + stats.drafted, accepted + stats.accepted
    return accepted / max(1, drafted)


# ---------------------------------------------------------------------------------------------------------------------
# Stages 2-4: R1-Zero, R1, the students
# ---------------------------------------------------------------------------------------------------------------------

def _grpo_summary(hist: dict) -> dict:
    keep = ("accuracy", "length", "reflection", "reward", "all_equal", "seconds")
    return {k: hist.get(k, []) for k in keep}


def _run_grpo(ctx: "_Run", model, folder: Path, fields: dict, rewards=None, what: str = "GRPO"):
    from dslib.grpo import GRPOConfig

    config = GRPOConfig(**{"log_kl": False, **fields, "seed": ctx.seed})
    # Under torchrun each process samples its share of the prompts.
    tr = ctx.trainers(what).grpo(copy.deepcopy(model), ctx.world, config, rewards, folder, 10)
    with ctx.autocast():
        tr.fit(progress=ctx.progress)
    return tr


def stage_r1_zero(ctx: "_Run") -> dict:
    from dslib.r1zero import r1zero_rewards

    folder = ctx.stage_dir("r1_zero")
    base = ctx.model("base")
    t0 = time.time()
    tr = _run_grpo(ctx, base, folder / "grpo", {**ctx.preset.r1_zero, "max_new_tokens": ctx.preset.max_new_tokens},
                   r1zero_rewards(), "r1_zero")
    if not ctx.main:
        return {}
    summary = {"steps": tr.config.steps, **_grpo_summary(tr.history), "seconds_this_session": time.time() - t0}
    _save_final(folder, tr.model, summary)
    return summary


def stage_r1(ctx: "_Run") -> dict:
    from dslib.r1 import R1Config, run_r1

    p, folder = ctx.preset, ctx.stage_dir("r1")
    r1 = dict(p.r1)
    r1["rl"] = {"max_new_tokens": p.max_new_tokens, **r1.get("rl", {})}
    config = R1Config(**{**r1, "seq_len": p.seq_len, "seed": ctx.seed})
    t0 = time.time()
    with ctx.autocast():  # under torchrun every process trains its share; the first one alone writes
        out = run_r1(ctx.model("base"), ctx.world, config, folder / "stages", progress=ctx.progress,
                     trainers=ctx.trainers())
    if not ctx.main:
        return {}
    summary = {"rejection": out.get("rejection", {}), "seconds_this_session": time.time() - t0,
               "stages": {k: _grpo_summary(t.history) for k, t in out["trainers"].items()}}
    _save_final(folder, out["final"], summary)
    return summary


def _non_reasoning(world, n: int, seed: int) -> list[str]:
    """R1's non-reasoning data in this world: bare answers to one-operation problems, in either language."""
    import random

    from dslib.r1 import non_reasoning_texts

    return non_reasoning_texts(world, n, random.Random(f"non-reasoning-{seed}"))


def _student_own(ctx: "_Run", size: str) -> None:
    """A student's runs that need no teacher: its own base (the dense model pretrained alone on the same corpus) and
    that base grown by its own GRPO run with R1-Zero's rewards (R1's Table 6). A part already done is skipped; each
    part's done.json records the seconds it took. In a two-worker run the second process does this while the first
    pretrains V3-mini."""
    from dslib.r1zero import r1zero_rewards
    from dslib.train import TrainConfig
    from dslib.transformer import Transformer
    from dslib.world import PackedData

    p, world = ctx.preset, ctx.world
    sub, name = ctx.stage_dir("students") / size, f"student-{size}"
    base_dir, rl_dir = sub / "base", sub / "rl"
    if _done(base_dir) is None:
        t0 = time.time()
        corpus = PackedData([d.text for d in world.corpus()], world.tokenizer, p.seq_len, p.batch, seed=ctx.seed)
        torch.manual_seed(ctx.seed)
        model = Transformer(student_config(p, size, world.tokenizer.vocab_size))
        cfg = TrainConfig(steps=p.student_steps, lr=p.lr, warmup_steps=min(p.warmup_steps, p.student_steps - 1),
                          schedule="cosine", eval_every=0, checkpoint_every=p.checkpoint_every, seed=ctx.seed)
        tr = ctx.trainer(model, corpus, cfg, checkpoint_dir=base_dir / "train")
        ctx.resume_stage(tr, f"{name}-base")
        with ctx.autocast():
            hist = tr.fit(progress=ctx.progress)
        if ctx.main:
            _save_final(base_dir, model.eval(), {"steps": p.student_steps, "parameters": model.num_params(),
                                                 "final_train_loss": hist["loss"][-1], "seconds": time.time() - t0})
        ctx.sync()
    if _done(rl_dir) is None:
        t0 = time.time()
        tr = _run_grpo(ctx, load_model(base_dir / "final", ctx.device), rl_dir / "grpo",
                       {"max_new_tokens": p.max_new_tokens, **p.student_rl}, r1zero_rewards(), f"{name}-rl")
        if ctx.main:
            _save_final(rl_dir, tr.model, {"steps": tr.config.steps, **_grpo_summary(tr.history),
                                           "seconds": time.time() - t0})
    ctx.sync()


def stage_students(ctx: "_Run") -> dict:
    from dslib.distill import DistillConfig, distill_sft, fresh_problems, teacher_data

    p, world, folder = ctx.preset, ctx.world, ctx.stage_dir("students")
    summary: dict[str, Any] = {"sizes": {}}
    t0 = time.time()
    cache = folder / "teacher_data.json"
    if ctx.main and not cache.exists():  # the teacher's samples are drawn once, by the first process
        td = teacher_data(ctx.model("r1"), world, fresh_problems(world, p.distill_problems, ctx.seed), p.distill_k,
                          seed=ctx.seed, max_new_tokens=p.max_new_tokens)
        easy = _non_reasoning(world, p.distill_non_reasoning, ctx.seed)
        data = {"texts": td.texts + easy, "reasoning_texts": len(td.texts), "non_reasoning_texts": len(easy),
                "acceptance": td.acceptance, "kept_problems": td.kept_problems, "problems": td.problems,
                "styles": td.styles, "languages": td.languages}
        from dslib.checkpoint import atomic_write_text
        atomic_write_text(cache, json.dumps(data) + "\n")
    ctx.sync()
    data = json.loads(cache.read_text(encoding="utf-8"))
    summary["teacher_data"] = {k: v for k, v in data.items() if k != "texts"} | {"texts": len(data["texts"])}
    if not data["texts"]:
        raise CapstoneError("no distillation data: the R1 teacher kept no sample (none right, readable and in the "
                            "prompt's language) and the preset asks for no non-reasoning data")
    summary["teacher_data"]["seconds_this_session"] = time.time() - t0
    for size in p.students:
        sub = folder / size
        _student_own(ctx, size)  # its base and its RL (done already where the second worker ran them)
        # Distilled: SFT of its base on the teacher's kept samples.
        dist_dir = sub / "distill"
        if _done(dist_dir) is None:
            t_part = time.time()
            dc = DistillConfig(**{**p.distill, "seq_len": p.seq_len, "seed": ctx.seed})
            with ctx.autocast():
                student = distill_sft(load_model(sub / "base" / "final", ctx.device), data["texts"], world, dc,
                                      dist_dir / "train", progress=ctx.progress, trainers=ctx.trainers())
            if ctx.main:
                _save_final(dist_dir, student, {"steps": dc.steps, "texts": len(data["texts"]),
                                                "seconds": time.time() - t_part})
            ctx.sync()
        parts = {part: _done(sub / part) or {} for part in ("base", "distill", "rl")}
        summary["sizes"][size] = {"parameters": parts["base"]["parameters"], "rl": parts["rl"],
                                  # what each part took when it ran (in this session or an earlier one)
                                  "seconds": {part: d.get("seconds") for part, d in parts.items()}}
    summary["seconds_this_session"] = time.time() - t0
    if ctx.main:
        from dslib.checkpoint import atomic_write_text
        atomic_write_text(folder / "done.json", json.dumps(summary, default=_json_default) + "\n")
    return summary


# ---------------------------------------------------------------------------------------------------------------------
# Stage 5: evaluation, and the transformers exports
# ---------------------------------------------------------------------------------------------------------------------

def model_names(preset: Preset | dict) -> list[str]:
    """The evaluated models, in the report's order (of a Preset, or of a preset as metrics.json records it)."""
    names = ["base", "r1_zero", "r1"]
    for size in (preset.students if isinstance(preset, Preset) else preset.get("students", {})):
        names += [f"student-{size}-base", f"student-{size}-distill", f"student-{size}-rl"]
    return names


@torch.no_grad()
def evaluate_model(model, world, problems, k: int, max_new_tokens: int, seed: int = 0) -> dict:
    """The report's measures on the held-out problems: greedy accuracy, and from k samples at temperature 1: pass@1,
    cons@k, mean length (tokens), reflection rate (share of responses with " wait "), language mixing (share of
    responses whose reasoning mixes symbols and words), and language consistency with the prompt."""
    from dslib.r1 import measure_r1
    from dslib.r1zero import sample_k
    from dslib.train import evaluate_accuracy

    greedy, _ = evaluate_accuracy(model, world, problems, max_new_tokens=max_new_tokens,
                                  device=next(model.parameters()).device)
    m = measure_r1(sample_k(model, world, problems, k, max_new_tokens=max_new_tokens, seed=seed))
    return {"greedy_accuracy": greedy, "pass@1": m["pass@1"], "cons@k": m["cons@k"], "k": k,
            "mean_length": m["length"], "reflection_rate": m["reflection_response"],
            "language_mixing": m["mixing"], "language_consistency": m["consistency"],
            "by_language": {lang: v["pass@1"] for lang, v in m.get("by_language", {}).items()}}


def hf_greedy_accuracy(folder: Path, world, problems, max_new_tokens: int, batch_size: int = 64) -> dict:
    """Load an exported folder with transformers' AutoModelForCausalLM and AutoTokenizer, decode the prompts greedily
    (left-padded batches) and grade them: the check that the exported model is the model that was evaluated."""
    import transformers

    from dslib.world import prompt

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(folder)
    hf_tok.padding_side = "left"
    stop = hf_tok.convert_tokens_to_ids("</answer>")
    texts = []
    with torch.no_grad():
        for s in range(0, len(problems), batch_size):
            enc = hf_tok([prompt(q) for q in problems[s:s + batch_size]], return_tensors="pt", padding=True)
            out = hf_model.generate(**enc, max_new_tokens=max_new_tokens, max_length=None, do_sample=False,
                                    eos_token_id=stop, pad_token_id=hf_tok.pad_token_id)
            texts += hf_tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
    right = world.grade(texts, problems)
    return {"hf_greedy_accuracy": sum(right) / len(right), "hf_checked": len(right)}


def stage_eval(ctx: "_Run") -> dict:
    from dslib.checkpoint import atomic_write_text
    from dslib.world import prompt

    p, world = ctx.preset, ctx.world
    problems = heldout_problems(p, world)
    lines = "".join(json.dumps({"prompt": prompt(q), "answer": q.fmt(q.answer), "language": q.language}) + "\n"
                    for q in problems)
    atomic_write_text(ctx.out / "heldout.jsonl", lines)
    partial = ctx.stage_dir("eval") / "partial.json"  # the models evaluated before an interruption
    results, done = {}, json.loads(partial.read_text(encoding="utf-8")) if partial.exists() else {}
    # transformers decodes all of them, or hf_check spread evenly over both languages
    checked = problems if p.hf_check == 0 else problems[::max(1, len(problems) // p.hf_check)][:p.hf_check]
    for name in ctx.progress_iter(model_names(p), "evaluate"):
        if name in done:
            results[name] = done[name]
            continue
        model = ctx.model(name)
        r = evaluate_model(model, world, problems, p.eval_k, p.max_new_tokens, seed=ctx.seed)
        folder = model.to("cpu").to_hf(ctx.out / "hf" / name, tokenizer=world.tokenizer)
        if importlib.util.find_spec("transformers") is not None:
            r.update(hf_greedy_accuracy(folder, world, checked, p.max_new_tokens))
        else:  # the folders are written all the same; checking them needs transformers
            r.update(hf_greedy_accuracy=float("nan"), hf_checked=0)
        r["parameters"] = model.num_params()
        results[name] = r
        atomic_write_text(partial, json.dumps(results, default=_json_default))
    atomic_write_text(ctx.stage_dir("eval") / "done.json", json.dumps(results, indent=1, default=_json_default) + "\n")
    return results


# ---------------------------------------------------------------------------------------------------------------------
# Stage 6: the report card
# ---------------------------------------------------------------------------------------------------------------------

def claims(metrics: dict) -> list[dict]:
    """The paper claims this run can test, each judged on this run's numbers: claim, paper, ours, holds."""
    ev = metrics.get("eval", {})
    out = []

    def add(claim, paper, ours, holds):
        out.append({"claim": claim, "paper": paper, "ours": ours, "holds": bool(holds)})

    if "base" in ev and "r1_zero" in ev:
        b, z = ev["base"], ev["r1_zero"]
        add("RL with rule rewards alone lifts accuracy (R1-Zero)", "R1, Table 2: AIME pass@1 15.6% -> 71.0%",
            f"greedy {b['greedy_accuracy']:.1%} -> {z['greedy_accuracy']:.1%}, pass@1 {b['pass@1']:.1%} -> "
            f"{z['pass@1']:.1%}", z["greedy_accuracy"] >= b["greedy_accuracy"] + 0.15)
        add("Responses grow longer under RL (R1-Zero)", "R1, Figure 3", f"{b['mean_length']:.1f} -> "
            f"{z['mean_length']:.1f} tokens", z["mean_length"] > b["mean_length"])
        add("Reflection rises under RL (the aha moment)", "R1, section 2.2.4",
            f"{b['reflection_rate']:.1%} -> {z['reflection_rate']:.1%}", z["reflection_rate"] > b["reflection_rate"])
    if "r1" in ev and "r1_zero" in ev:
        r, z = ev["r1"], ev["r1_zero"]
        add("R1 mixes languages less than R1-Zero", "R1, section 2.3.2",
            f"mixing {z['language_mixing']:.1%} (R1-Zero) vs {r['language_mixing']:.1%} (R1)",
            r["language_mixing"] < z["language_mixing"])
        add("R1 is at least as accurate as R1-Zero", "R1, Table 4", f"pass@1 {z['pass@1']:.1%} (R1-Zero) vs "
            f"{r['pass@1']:.1%} (R1)", r["pass@1"] >= z["pass@1"])
    for size in metrics.get("preset", {}).get("students", {}):
        names = [f"student-{size}-{s}" for s in ("base", "distill", "rl")]
        if all(n in ev for n in names):
            b, d, rl = (ev[n] for n in names)
            add(f"Distillation beats the student's own base ({size})", "R1, Table 5",
                f"greedy {b['greedy_accuracy']:.1%} -> {d['greedy_accuracy']:.1%}",
                d["greedy_accuracy"] > b["greedy_accuracy"])
            add(f"Distillation beats RL on the small model itself ({size})", "R1, Table 6",
                f"pass@1 distill {d['pass@1']:.1%} vs RL {rl['pass@1']:.1%}", d["pass@1"] > rl["pass@1"])
    pre = metrics.get("stages", {}).get("pretrain")
    if pre:
        mv = pre.get("maxvio", [])
        if len(mv) >= 2:
            first = float(np.mean(mv[:max(1, len(mv) // 10)]))
            add("Auxiliary-loss-free balancing lowers MaxVio during training", "Wang et al. 2024 (arXiv 2408.15664), "
                "Figure 3", f"MaxVio {first:.2f} (first tenth) -> {pre['final_max_vio']:.2f} (end)",
                pre["final_max_vio"] < first)
        if not math.isnan(pre.get("mtp_acceptance", float("nan"))):
            add("The MTP module's drafts are mostly accepted", "V3, section 5.4.3: 85-90%",
                f"{pre['mtp_acceptance']:.1%}", pre["mtp_acceptance"] >= 0.85)
    return out


def _plots(metrics: dict, out: Path) -> list[str]:
    from matplotlib.figure import Figure  # no pyplot: the caller's backend and open figures are left alone

    written = []
    stages, ev = metrics.get("stages", {}), metrics.get("eval", {})

    def subplots(n=1, figsize=(13, 3.4)):
        fig = Figure(figsize=figsize)
        ax = fig.subplots(1, n)
        return fig, ax

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        written.append(name)

    pre = stages.get("pretrain")
    if pre:
        fig, ax = subplots(3)
        loss = np.array(pre.get("main_loss") or pre["loss"])
        w = max(1, len(loss) // 50)
        ax[0].plot(np.convolve(loss, np.ones(w) / w, mode="valid"),
                   label="train (smoothed)" if pre.get("main_loss") else "train objective, with MTP (smoothed)")
        ax[0].plot(pre["eval_step"], pre["eval_loss"], "o-", label="held-out")
        ax[0].set(xlabel="step", ylabel="loss (nats / response token)", title="Pretraining V3-mini")
        ax[0].legend()
        if pre.get("maxvio"):
            ax[1].plot(pre["maxvio_step"], pre["maxvio"])
        ax[1].set(xlabel="step", ylabel="MaxVio (mean over MoE layers)", title="Expert balance")
        load = np.array(pre["final_load"])
        if load.size:
            im = ax[2].imshow(load / load.mean(axis=1, keepdims=True), aspect="auto", cmap="viridis")
            fig.colorbar(im, ax=ax[2], label="load / mean")
        ax[2].set(xlabel="expert", ylabel="MoE layer", title=f"Expert load (MTP acceptance "
                                                             f"{pre.get('mtp_acceptance', float('nan')):.0%})")
        save(fig, "pretraining.png")
    z = stages.get("r1_zero")
    if z and z.get("accuracy"):
        fig, ax = subplots(3)
        for a, key, label in zip(ax, ("accuracy", "length", "reflection"),
                                 ("accuracy (training rollouts)", "mean length (tokens)", "share with ' wait '")):
            a.plot(range(1, len(z[key]) + 1), z[key])
            a.set(xlabel="GRPO step", ylabel=label, title=f"R1-Zero: {key}")
        save(fig, "r1_zero.png")
    if ev:
        names = [n for n in model_names_from(metrics) if n in ev]
        fig, ax = subplots(1, figsize=(max(6, 1.2 * len(names)), 3.6))
        x = np.arange(len(names))
        for i, (key, label) in enumerate((("greedy_accuracy", "greedy"), ("pass@1", "pass@1"), ("cons@k", "cons@k"))):
            ax.bar(x + (i - 1) * 0.27, [ev[n][key] for n in names], 0.27, label=label)
        ax.set_xticks(x, names, rotation=30, ha="right")
        ax.set(ylabel="held-out accuracy", ylim=(0, 1), title="Every model on the same held-out problems")
        ax.legend()
        save(fig, "models.png")
    sessions = metrics.get("run", {}).get("sessions", [])
    spans = sessions[-1].get("timeline", []) if sessions else []
    if spans:  # who ran what, when, in the last session
        fig, ax = subplots(1, figsize=(11, 2.2))
        colours, longest = {}, max(s["end"] for s in spans)
        for s in spans:
            c = colours.setdefault(s["what"].split("'")[0], f"C{len(colours)}")
            ax.barh(s["worker"], s["end"] - s["start"], left=s["start"], color=c, edgecolor="k", height=0.6)
            ax.text((s["start"] + s["end"]) / 2, s["worker"], s["what"], ha="center", va="center", fontsize=8,
                    rotation=90 if s["end"] - s["start"] < 0.06 * longest else 0)
        workers = sorted({s["worker"] for s in spans})
        ax.set_yticks(workers, [f"worker {w}" for w in workers])
        ax.set_ylim(max(workers) + 0.6, 0.4)
        ax.set(xlabel="seconds since the session started", title="Who ran what, when (the last session)")
        save(fig, "timeline.png")
    return written


def model_names_from(metrics: dict) -> list[str]:
    """model_names of the preset recorded in metrics.json."""
    return model_names(metrics.get("preset", {}))


def _fmt(v) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.1%}" if 0 <= v <= 1 else f"{v:.1f}"
    return str(v)


def report_markdown(metrics: dict, plots: Sequence[str]) -> str:
    """The report card as Markdown, every figure read from metrics."""
    ev, stages, info = metrics.get("eval", {}), metrics.get("stages", {}), metrics.get("run", {})
    workers = (info.get("sessions") or [{}])[-1].get("workers", 1)
    lines = ["# DeepSeek from Scratch: capstone report card", "",
             f"Preset `{info.get('preset')}`, seed {info.get('seed')}, device {info.get('device')}, "
             + (f"2 workers of {info.get('threads')} CPU thread(s) each" if workers == 2 else
                f"{info.get('threads')} CPU threads")
             + f", torch {info.get('torch')}, dslib {info.get('dslib')}.", ""]
    pre = stages.get("pretrain")
    if pre:
        tps = pre.get("tokens_per_second")
        lines += ["## Pretraining V3-mini", "",
                  f"{pre['parameters']:,} parameters ({pre['parameters_mtp']:,} with the MTP module), "
                  f"{pre['steps']} steps: held-out loss {pre['heldout_loss']:.3f}, MaxVio at the end "
                  f"{pre['final_max_vio']:.2f}, MTP acceptance {_fmt(pre['mtp_acceptance'])}"
                  + (f", {tps:,.0f} tokens/s ({pre.get('model_tflops', 0):.3f} model TFLOP/s"
                     + (f", MFU {pre['mfu']:.1%}" if 'mfu' in pre else "")
                     + (f", peak memory {pre['peak_memory_gib']:.1f} GiB on {pre['gpu']}" if 'gpu' in pre else "")
                     + ")." if tps else "."), ""]
    if ev:
        keys = ("greedy_accuracy", "pass@1", "cons@k", "mean_length", "reflection_rate", "language_mixing",
                "hf_greedy_accuracy")
        lines += ["## Every model on the held-out problems", "",
                  f"{metrics.get('heldout', 0)} problems (`heldout.jsonl`), k = {next(iter(ev.values()))['k']} "
                  f"samples at temperature 1 for pass@1 and cons@k; `hf_greedy_accuracy` decodes the exported "
                  f"transformers folder `hf/<name>/`.", "",
                  "| model | parameters | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
        for n in model_names_from(metrics):
            if n in ev:
                lines.append(f"| {n} | {ev[n].get('parameters', 0):,} | "
                             + " | ".join(_fmt(ev[n].get(k, float('nan'))) for k in keys) + " |")
        lines.append("")
    cl = claims(metrics)
    if cl:
        lines += ["## The paper's claims in this run", "", "| claim | paper | ours | holds |", "|---|---|---|---|"]
        lines += [f"| {c['claim']} | {c['paper']} | {c['ours']} | {'yes' if c['holds'] else 'no'} |" for c in cl]
        lines.append("")
    times = metrics.get("seconds", {})
    if times:
        wall = info.get("wall_seconds")
        lines += ["## Time", ""]
        if wall is not None:
            lines += [f"Wall clock up to this report, every session: {wall:.0f} s ({wall / 60:.1f} min; a killed "
                      f"session counts up to the last stage it finished)."
                      + (" r1_zero and the students' own runs (each base and its RL) ran in a second worker, beside "
                         "the other stages (`timeline.png`)." if workers == 2 else ""), ""]
        lines += ["| stage | seconds (every session) |", "|---|---|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in times.items()] + [""]
        st = metrics.get("stages", {}).get("students", {})
        parts = [("the teacher's samples", st.get("teacher_data", {}).get("seconds_this_session"))]
        parts += [(f"student {size}: {part}", t) for size, d in st.get("sizes", {}).items()
                  for part, t in d.get("seconds", {}).items()]
        if any(t is not None for _, t in parts):
            lines += ["The students stage by part (seconds, when each part ran):", "", "| part | seconds |",
                      "|---|---|"]
            lines += [f"| {part} | {t:.0f} |" for part, t in parts if t is not None] + [""]
    for pl in plots:
        lines += [f"![{pl}]({pl})", ""]
    return "\n".join(lines)


def report_html(markdown: str) -> str:
    """The report card as one HTML page (headings, tables, images and paragraphs: all that report_markdown writes)."""
    body, table = [], []

    def cells(row):
        return [html.escape(c.strip()) for c in row.strip().strip("|").split("|")]

    def flush():
        if table:
            head, rows = cells(table[0]), [cells(r) for r in table[2:]]
            body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in head) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows) + "</table>")
            table.clear()

    for line in markdown.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        flush()
        if line.startswith("## "):
            body.append(f"<h2>{html.escape(line[3:])}</h2>")
        elif line.startswith("# "):
            body.append(f"<h1>{html.escape(line[2:])}</h1>")
        elif m := re.fullmatch(r"!\[(.*)\]\((.*)\)", line):
            body.append(f'<img alt="{html.escape(m[1])}" src="{html.escape(m[2])}">')
        elif line.strip():
            text = re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(line))
            body.append(f"<p>{text}</p>")
    flush()
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}table{border-collapse:collapse;"
             "margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;text-align:left}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>Capstone report card</title><style>{style}"
            f"</style></head><body>{''.join(body)}</body></html>\n")


def stage_report(ctx: "_Run") -> dict:
    from dslib.checkpoint import atomic_write_text

    metrics = ctx.metrics()
    plots = _plots(metrics, ctx.out)
    md = report_markdown(metrics, plots)
    atomic_write_text(ctx.out / "report.md", md)
    atomic_write_text(ctx.out / "report.html", report_html(md))
    return {"plots": plots, "claims": claims(metrics)}


# Stages that every process runs under torchrun (data-parallel training); the others run on the first process alone.
_DATA_PARALLEL = ("pretrain", "r1_zero", "r1", "students")
_STAGE_FNS: dict[str, Callable] = {"pretrain": stage_pretrain, "r1_zero": stage_r1_zero, "r1": stage_r1,
                                   "students": stage_students, "eval": stage_eval, "report": stage_report}


# ---------------------------------------------------------------------------------------------------------------------
# Two workers on a CPU: what needs no other stage's result runs beside the stages that do
# ---------------------------------------------------------------------------------------------------------------------

# The second worker's jobs, in the order it runs them: the students' own runs (each student's base and its RL need no
# teacher), then the r1_zero stage (once pretraining is done), while the first process pretrains, runs R1 and distils.
_SECOND_JOBS = ("students", "r1_zero")


def _die_with_parent() -> None:
    """End this process when the process that started it dies (a crash or a kill of the run): on Linux at once
    (prctl's PR_SET_PDEATHSIG); elsewhere a thread checks the parent every second."""
    import ctypes
    import ctypes.util
    import threading

    parent = os.getppid()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        if libc.prctl(1, signal.SIGKILL) == 0:  # PR_SET_PDEATHSIG
            if os.getppid() != parent:  # the parent died before the request took effect
                os._exit(1)
            return
    except (OSError, AttributeError):
        pass

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _second_worker(conn, out: str, preset: Preset, seed: int, compile: str | None, threads: int,
                   jobs: tuple[str, ...]) -> None:
    """The second process of a two-worker run. Each finished job is reported through conn as (job, start, end, line);
    a failure as ("error", message, traceback). It runs r1_zero after the first process sends "pretrain done"."""
    import traceback

    from dslib import keep_freed_memory

    os.setpgrp()  # a Ctrl-C in the terminal reaches the first process, which passes it on once
    _die_with_parent()
    torch.set_num_threads(threads)
    keep_freed_memory()
    try:
        ctx = _Run(Path(out), preset, seed, torch.device("cpu"), progress=False, resume=True, compile=compile)
        if "students" in jobs:
            t0 = time.time()
            for size in preset.students:
                _student_own(ctx, size)
            conn.send(("students", t0, time.time(), _own_line(ctx)))
        if "r1_zero" in jobs:
            if conn.recv() != "pretrain done":
                return
            t0 = time.time()
            result = stage_r1_zero(ctx)
            conn.send(("r1_zero", t0, time.time(), _one_line("r1_zero", result)))
    except (KeyboardInterrupt, EOFError, BrokenPipeError):  # stopped by the first process, or it is gone
        return
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the first process, which raises it
        conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc(), isinstance(e, CapstoneError)))


def _own_line(ctx: "_Run") -> str:
    """One line on the students' own runs: each base's final training loss and its RL's last training accuracy."""
    parts = []
    for size in ctx.preset.students:
        base, rl = (_done(ctx.stage_dir("students") / size / part) or {} for part in ("base", "rl"))
        acc = rl.get("accuracy") or [float("nan")]
        parts.append(f"student {size}: base loss {base.get('final_train_loss', float('nan')):.3f}, RL accuracy "
                     f"{acc[0]:.1%} -> {acc[-1]:.1%}")
    return "; ".join(parts)


class _SecondWorker:
    """The first process's handle on the second worker: start it, tell it when pretraining is done, wait for its jobs,
    and stop it (Ctrl-C, an error) so that it saves its checkpoints as a run on its own would."""

    def __init__(self, out: Path, preset: Preset, seed: int, compile: str | None, threads: int,
                 jobs: Sequence[str]):
        import multiprocessing

        mp = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked PyTorch thread pools
        self.conn, child = mp.Pipe()
        self.jobs, self.finished = tuple(jobs), {}
        self.process = mp.Process(target=_second_worker, name="capstone-second-worker", daemon=True,
                                  args=(child, str(out), preset, seed, compile, threads, self.jobs))
        self.process.start()
        child.close()
        self.told = False

    def pretrain_done(self) -> None:
        if "r1_zero" in self.jobs and not self.told:
            self.conn.send("pretrain done")
            self.told = True

    def _receive(self) -> None:
        try:
            msg = self.conn.recv()
        except EOFError:
            self.process.join(5)
            missing = [j for j in self.jobs if j not in self.finished]
            raise CapstoneError(f"the second worker ended (exit code {self.process.exitcode}) before it finished "
                                f"{', '.join(missing)}; its checkpoints are kept: continue with --resume") from None
        if msg[0] == "error":
            _, message, trace, known = msg
            if known:
                raise CapstoneError(message)
            raise RuntimeError(f"the second worker failed: {message}\n--- its traceback ---\n{trace}")
        self.finished[msg[0]] = msg[1:]

    def wait(self, job: str) -> tuple[float, float, str]:
        """Block until the second worker has finished job: (its start, its end (time.time()), a one-line summary)."""
        while job not in self.finished:
            self._receive()
        return self.finished[job]

    def ready(self) -> list[str]:
        """The jobs finished so far, without blocking."""
        while len(self.finished) < len(self.jobs) and self.conn.poll():
            self._receive()
        return list(self.finished)

    def stop(self) -> None:
        """Interrupt the worker as Ctrl-C would (its trainers save their checkpoints) and wait for it."""
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGINT)
            self.process.join(120)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(10)
        self.conn.close()

    def close(self) -> None:
        self.process.join(60)
        self.conn.close()


# ---------------------------------------------------------------------------------------------------------------------
# The run: its folder, resume, and the command line
# ---------------------------------------------------------------------------------------------------------------------

class _Run:
    """One capstone run in its folder: the preset, the world, the device, and where each stage's files are."""

    def __init__(self, out: Path, preset: Preset, seed: int, device: torch.device, progress: bool, resume: bool,
                 group=None, compile: str | None = None):
        self.out, self.preset, self.seed, self.device = out, preset, seed, device
        self.compile = compile  # a torch.compile backend for the fixed-shape losses, or None
        self.group = group  # dslib.distributed.Group under torchrun, else None
        self.main = group is None or group.main
        self.progress, self.resume = progress and self.main, resume
        self.world = _world(preset)
        self.seconds: dict[str, float] = {}

    def sync(self) -> None:
        """Wait for every process (a no-op for one): the first process writes, the others then read."""
        if self.group is not None:
            self.group.barrier()

    def trainer(self, model, data, config, **kwargs):
        """dslib.train.Trainer on this run's device; under torchrun, data-parallel: this process's rows of each batch,
        the global batch's loss logged, the gradients averaged before the step (dslib.distributed). The default loss
        is the next-token loss, compiled when the run asks for it."""
        from dslib.train import Trainer, batch_loss

        loss = self.compiled(batch_loss)
        if self.group is None:
            kwargs.setdefault("loss_fn", loss)
            return Trainer(model, data, config, device=self.device, **kwargs)
        from dslib import distributed as dd

        g = self.group
        dd.broadcast_parameters(model.to(self.device), g)
        if "loss_fn" not in kwargs:  # the next-token loss, weighed by this process's share of the counted tokens
            kwargs["loss_fn"] = lambda m, b: loss(m, b) * dd.token_share(b["loss_mask"], g)
        kwargs["loss_fn"] = dd.global_mean_loss(kwargs["loss_fn"], g)
        return Trainer(model, dd.ShardedBatches(data, g), config, device=self.device,
                       after_backward=lambda m: dd.average_gradients(m, g), **kwargs)

    def compiled(self, fn: Callable) -> Callable:
        """fn (a loss of the model and a batch) under torch.compile with the run's backend; fn itself when the run
        does not compile. Only fixed-shape training losses are compiled: rollouts and evaluation stay eager."""
        return fn if not self.compile else torch.compile(fn, backend=self.compile)

    def trainers(self, what: str | None = None):
        """dslib.r1.Trainers for R1's stages and the distillation: this run's device, resumed from their
        checkpoints, data-parallel under torchrun (self.trainer; DataParallelGRPO) with the first process writing."""
        from dslib.distributed import DataParallelGRPO
        from dslib.grpo import GRPOTrainer
        from dslib.r1 import Trainers

        def sft(model, data, config, checkpoint_dir):
            tr = self.trainer(model, data, config, checkpoint_dir=checkpoint_dir)
            self.resume_stage(tr, what or "/".join(Path(checkpoint_dir or ".").parts[-2:]))
            return tr

        def grpo(model, world, config, rewards, checkpoint_dir, checkpoint_every):
            cls, extra = (GRPOTrainer, {}) if self.group is None else (DataParallelGRPO, {"group": self.group})
            tr = cls(model.to(self.device), world, config, rewards=rewards, checkpoint_dir=checkpoint_dir,
                     checkpoint_every=checkpoint_every, **extra)
            self.resume_stage(tr, what or "/".join(Path(checkpoint_dir or ".").parts[-2:]))
            return tr

        return Trainers(sft=sft, grpo=grpo)

    def stage_dir(self, stage: str) -> Path:
        d = self.out / "stages" / stage
        d.mkdir(parents=True, exist_ok=True)
        return d

    def resume_stage(self, trainer, what: str) -> bool:
        """Continue trainer from its last checkpoint, if any; only the first process writes checkpoints."""
        resumed = trainer.resume()
        if resumed and self.main:
            _say(f"{what}: resumed at step {trainer.step}")
        if not self.main:
            trainer.checkpoint_dir = None
        return resumed

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def progress_iter(self, items, desc):
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, disable=not self.progress)

    def model(self, name: str) -> torch.nn.Module:
        """A finished stage's model, by its report name."""
        folders = {"base": "pretrain", "r1_zero": "r1_zero", "r1": "r1"}
        if name in folders:
            path = self.out / "stages" / folders[name] / "final"
        else:
            _, size, kind = name.split("-")
            path = self.out / "stages" / "students" / size / kind / "final"
        if not (path.parent / "done.json").exists():
            raise CapstoneError(f"model {name!r} is not in {self.out} yet: run its stage first")
        return load_model(path, self.device)

    def metrics(self) -> dict:
        stages = {s: _done(self.out / "stages" / s) for s in STAGES[:4]}
        ev = _done(self.out / "stages" / "eval")
        run_info = json.loads((self.out / RUN_FILE).read_text(encoding="utf-8"))
        heldout = self.out / "heldout.jsonl"
        return {"run": run_info, "preset": asdict(self.preset), "stages": {k: v for k, v in stages.items() if v},
                "eval": ev or {}, "seconds": run_info.get("seconds", {}),
                "heldout": sum(1 for _ in heldout.open()) if heldout.exists() else 0}


def _run_record(preset: Preset, seed: int, device: torch.device, group=None) -> dict:
    ident = json.dumps({"format": FORMAT, "preset": asdict(preset), "seed": seed}, sort_keys=True, default=list)
    return {"format": FORMAT, "preset": preset.name, "seed": seed,
            "id": hashlib.sha256(ident.encode()).hexdigest()[:16],
            "device": str(device), "processes": 1 if group is None else group.world_size,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "dslib": __import__("dslib").__version__, "stages_done": [], "seconds": {}}


def _prepare_out(out: Path, record: dict, resume: bool) -> dict:
    """Check --out before anything is written: a new folder, an empty one, or (with resume) this same run."""
    if out.exists() and not out.is_dir():
        raise CapstoneError(f"--out {out} exists and is not a folder")
    existing = out / RUN_FILE
    if existing.exists():
        try:
            old = json.loads(existing.read_text(encoding="utf-8"))
            old["id"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CapstoneError(f"{existing}: corrupt ({e}); this folder's run cannot be resumed") from None
        if not resume:
            raise CapstoneError(f"--out {out} holds a capstone run already; pass --resume to continue it, or choose "
                                f"another --out (nothing was overwritten)")
        if old["id"] != record["id"]:
            raise CapstoneError(f"--out {out} holds another run (preset {old.get('preset')!r}, seed {old.get('seed')}"
                                f"); --resume continues a run with the same preset and seed")
        return old
    if out.is_dir() and any(out.iterdir()):
        raise CapstoneError(f"--out {out} is not empty and holds no capstone run; choose a new or empty folder")
    if resume:
        raise CapstoneError(f"--resume: {out} holds no capstone run to resume (no {RUN_FILE})")
    return record


def _claim_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise CapstoneError(f"--out {out} cannot be written ({e.strerror or e})") from None


def _save_record(out: Path, record: dict) -> None:
    from dslib.checkpoint import atomic_write_text

    atomic_write_text(out / RUN_FILE, json.dumps(record, indent=1) + "\n")


def run(out: str | Path, preset: str | Preset = "small", *, seed: int = 0, stages: Sequence[str] | None = None,
        resume: bool = False, device: str | None = None, max_steps: int | None = None, progress: bool = True,
        threads: int | None = None, compile: str | None = None, workers: int | None = None) -> dict:
    """Run the capstone (or the stages named) into `out` and return metrics.json's content.

    preset: "small" (a CPU), "full" (one GPU), "tiny" (seconds: tests), or a Preset. max_steps caps every training
    stage (to smoke-test a preset). resume: continue the run in `out` (same preset and seed). compile: a
    torch.compile backend ("inductor", ...) for the losses of the fixed-shape training stages, or None (eager).
    threads: CPU threads for the whole run (default: PyTorch's), shared evenly by its workers. workers: 2 runs the
    students' own runs and then r1_zero in a second process beside pretrain, r1 and the distillation (CPU only, Linux
    or macOS; the default there with 2 cores or more, in one process); 1 runs every stage in turn."""
    if isinstance(preset, str):
        if preset not in PRESETS:
            raise CapstoneError(f"--preset {preset!r} is not one of {sorted(PRESETS)}")
        preset = PRESETS[preset]
    if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
        raise CapstoneError(f"--max-steps {max_steps!r} is invalid: a positive int is required")
    preset = preset.capped(max_steps)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise CapstoneError(f"--seed {seed!r} is invalid: a non-negative int is required")
    if compile is not None and compile not in torch.compiler.list_backends(exclude_tags=()):
        raise CapstoneError(f"--compile {compile!r} is not a torch.compile backend here: one of "
                            f"{', '.join(torch.compiler.list_backends(exclude_tags=()))}")
    stages = list(STAGES if not stages else stages)
    bad = [s for s in stages if s not in STAGES]
    if bad:
        raise CapstoneError(f"--stages: {', '.join(bad)} not among {', '.join(STAGES)}")
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise CapstoneError(f"--device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CapstoneError("--device cuda: CUDA is not available on this machine")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise CapstoneError(f"--threads {threads!r} is invalid: a positive int is required")
    torchrun = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if workers is None:
        two_cores = (os.cpu_count() or 1) >= 2
        workers = 2 if dev.type == "cpu" and not torchrun and two_cores and os.name == "posix" else 1
    if workers not in (1, 2) or isinstance(workers, bool):
        raise CapstoneError(f"--workers {workers!r} is invalid: 1 or 2")
    if workers == 2 and (dev.type != "cpu" or torchrun or os.name != "posix"):
        raise CapstoneError("--workers 2 runs two processes side by side on the CPU of a Linux or macOS machine; on a "
                            "GPU, under torchrun or on Windows, use --workers 1")
    group = _join_processes(dev, preset)
    if group is not None and dev.type == "cuda":
        dev = torch.device("cuda", torch.cuda.current_device())
    previous_threads = torch.get_num_threads()
    # Each worker gets an equal share of the threads, whether or not the second one has work left: the same
    # arithmetic in an uninterrupted run and in a resumed one.
    torch.set_num_threads(max(1, (threads or previous_threads) // workers))
    from dslib import keep_freed_memory

    keep_freed_memory()  # freed activations are reused, not unmapped and faulted in again at every step
    out = Path(out).expanduser()
    try:
        return _run(out, preset, seed, stages, resume, dev, progress, group, compile, workers)
    except CheckpointError as e:
        raise CapstoneError(f"{e}; nothing was overwritten (start again into a new --out, or remove the damaged "
                            f"stage folder and --resume)") from None
    finally:
        torch.set_num_threads(previous_threads)
        if group is not None:
            import torch.distributed as dist

            dist.destroy_process_group()


def _join_processes(dev: torch.device, preset: Preset):
    """Under torchrun (WORLD_SIZE > 1): check that the preset's batches split across the processes, then join them
    (dslib.distributed). None for one process."""
    n = int(os.environ.get("WORLD_SIZE", "1"))
    if n <= 1:
        return None
    from dslib.distill import DistillConfig
    from dslib.grpo import GRPOConfig
    from dslib.r1 import R1Config

    prompts = GRPOConfig.prompts_per_step
    r1_rl = preset.r1.get("rl", {})
    sizes = {"batch": preset.batch, "r1_zero prompts_per_step": preset.r1_zero.get("prompts_per_step", prompts),
             "r1 sft_batch": preset.r1.get("sft_batch", R1Config.sft_batch),
             "r1 rl prompts_per_step": r1_rl.get("prompts_per_step", prompts),
             "r1 final_rl prompts_per_step": preset.r1.get("final_rl", {}).get(
                 "prompts_per_step", r1_rl.get("prompts_per_step", prompts)),
             "distill batch": preset.distill.get("batch", DistillConfig.batch),
             "student_rl prompts_per_step": preset.student_rl.get("prompts_per_step", prompts)}
    bad = [f"{k} {v}" for k, v in sizes.items() if v % n]
    if bad:
        raise CapstoneError(f"{n} processes: {', '.join(bad)} do not split evenly across them (data parallelism "
                            f"gives each process an equal share); use a number of processes that divides them")
    from dslib.distributed import from_env

    return from_env(dev)


def _run(out: Path, preset: Preset, seed: int, stages: list[str], resume: bool, dev: torch.device,
         progress: bool, group=None, compile: str | None = None, workers: int = 1) -> dict:
    started = time.time()
    ctx = _Run(out, preset, seed, dev, progress, resume, group, compile)
    if ctx.main:  # under torchrun, the first process checks and writes the folder; the others follow it
        fresh = _run_record(preset, seed, dev, group)
        record = _prepare_out(out, fresh, resume)
        session = {**{k: fresh[k] for k in ("device", "processes", "threads", "torch", "dslib")}, "compile": compile,
                   "workers": workers}
        record["sessions"] = record.get("sessions", []) + [session]  # each start or resume, where it ran
        for stage in stages:
            missing = [n for n in _NEEDS[stage] if n not in record["stages_done"] and n not in stages]
            if missing:
                raise CapstoneError(f"stage {stage!r} needs {', '.join(missing)} first: add it to --stages (or run "
                                    f"it into this --out, then --resume)")
        _claim_out(out)
        _save_record(out, record)
    ctx.sync()
    if not ctx.main:
        record = json.loads((out / RUN_FILE).read_text(encoding="utf-8"))
    wall_before = record.get("wall_seconds", 0.0)
    timeline = record["sessions"][-1].setdefault("timeline", []) if ctx.main else []

    def save_record() -> None:  # with this session's wall clock so far
        record["wall_seconds"] = wall_before + time.time() - started
        _save_record(out, record)

    def finished(what: str, start: float, line: str, worker: int = 1, end: float | None = None) -> None:
        """The first process records a finished stage (or the second worker's part of one) and when it ran."""
        end = time.time() if end is None else end
        timeline.append({"what": what, "worker": worker, "start": start - started, "end": end - started})
        if what in STAGES:
            record["seconds"][what] = record["seconds"].get(what, 0.0) + end - start
            if what not in record["stages_done"]:  # in the pipeline's order, whichever worker finished first
                record["stages_done"] = [s for s in STAGES if s in record["stages_done"] or s == what]
        save_record()
        _say(f"[{what}] done in {end - start:.0f} s{' in the second worker' if worker == 2 else ''}: {line}")
        if what not in STAGES:
            return
        from dslib.checkpoint import atomic_write_text

        atomic_write_text(out / "metrics.json", json.dumps(ctx.metrics(), indent=1, default=_json_default) + "\n")

    second = None
    jobs = [j for j in _SECOND_JOBS if j in stages and j not in record["stages_done"]]
    if workers == 2 and jobs and any(s in stages and s not in record["stages_done"] for s in ("pretrain", "r1")):
        second = _SecondWorker(out, preset, seed, compile, torch.get_num_threads(), jobs)
        _say(f"[{' and '.join(jobs)}] in a second worker, beside the other stages "
             f"({torch.get_num_threads()} thread(s) each)")

    def collect_r1_zero(block: bool) -> None:
        if second is not None and "r1_zero" in second.jobs and "r1_zero" not in record["stages_done"] \
                and (block or "r1_zero" in second.ready()):
            start, end, line = second.wait("r1_zero")
            finished("r1_zero", start, line, worker=2, end=end)

    try:
        for stage in STAGES:
            if stage not in stages:
                continue
            if stage in record["stages_done"] and stage != "report":
                if ctx.main:
                    _say(f"[{stage}] done earlier: loaded")
                if stage == "pretrain" and second is not None:
                    second.pretrain_done()
                continue
            if second is not None and stage in second.jobs:
                if stage == "students":  # its own runs are the second worker's; the distillation is ours
                    start, end, line = second.wait("students")
                    finished("students' own runs", start, line, worker=2, end=end)
                else:  # r1_zero: collected when it is done
                    continue
            if stage == "eval":
                collect_r1_zero(block=True)
            if ctx.main:
                _say(f"[{stage}] starting")
            t0 = time.time()
            if ctx.main or stage in _DATA_PARALLEL:
                result = _STAGE_FNS[stage](ctx)
            ctx.sync()
            if ctx.main:
                finished(stage, t0, _one_line(stage, result))
            if stage == "pretrain" and second is not None:
                second.pretrain_done()
            collect_r1_zero(block=False)
        collect_r1_zero(block=True)
    except BaseException:
        if second is not None:
            second.stop()
        if ctx.main:  # the time of an interrupted session counts too (a killed one's, up to its last stage)
            save_record()
        raise
    if second is not None:
        second.close()
    return ctx.metrics() if ctx.main else {}


def _one_line(stage: str, r: dict) -> str:
    if stage == "pretrain":
        return (f"held-out loss {r['heldout_loss']:.3f}, MaxVio {r['final_max_vio']:.2f}, MTP acceptance "
                f"{r['mtp_acceptance']:.1%}")
    if stage in ("r1_zero",):
        acc = r.get("accuracy") or [float("nan")]
        return f"training accuracy {acc[0]:.1%} -> {acc[-1]:.1%}"
    if stage == "r1":
        rej = r["rejection"]
        return f"rejection sampling kept {rej.get('kept', 0)} of {rej.get('problems', 0)} problems"
    if stage == "students":
        td = r["teacher_data"]
        return (f"{len(r['sizes'])} student sizes, {td['texts']} distillation texts ({td['reasoning_texts']} kept from "
                f"the teacher's samples, acceptance {td['acceptance']:.1%})")
    if stage == "eval":
        return ", ".join(f"{n} {v['greedy_accuracy']:.0%}" for n, v in r.items())
    if stage == "report":
        held = sum(c["holds"] for c in r["claims"])
        return f"{held} of {len(r['claims'])} claims hold; report.md and report.html written"
    return ""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dslib capstone",
        description="The whole course in one command: pretrain DeepSeek-V3-mini from random weights, grow R1-Zero "
                    "and R1 with GRPO, distil R1 into two dense students (each also pretrained alone and grown by "
                    "its own RL), evaluate every model on the same held-out problems, export each as a transformers "
                    "folder, and write a report card.",
        epilog="Examples: `python -m dslib capstone` (small on a CPU, full on a GPU); "
               "`python -m dslib capstone --out runs/a --resume` after an interruption; "
               "`torchrun --nproc_per_node 4 -m dslib capstone --preset full` on 4 GPUs (data-parallel: the same "
               "global batch, split across the processes).")
    import dslib

    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="model and run sizes: small (a laptop CPU, about 12 minutes on 2 cores), full (one GPU), "
                        f"tiny (seconds, nothing is learnt: a smoke test). Default: dslib.scale(), now "
                        f"{dslib.scale()!r}")
    p.add_argument("--out", default="capstone-run", help="the run's folder (default: capstone-run); a folder that "
                   "holds another run is refused")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoints "
                   "(same preset and seed); finished stages are loaded, not run again")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)} "
                   "(a stage needs the earlier ones, run now or earlier in --out)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: CUDA when available)")
    p.add_argument("--seed", type=int, default=0, help="the seed of every stage (default 0)")
    p.add_argument("--max-steps", type=int, default=None, help="cap every training stage at this many steps (a "
                   "quick check that a preset runs on this machine)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for the run, shared evenly by its workers "
                   "(default: PyTorch's)")
    p.add_argument("--workers", type=int, default=None, choices=(1, 2),
                   help="2: a second process trains the students' own bases and RL runs, then R1-Zero, beside "
                        "pretraining, R1 and the distillation (on 2 cores this takes about a fifth off the time); "
                        "1: one stage after another. Default: 2 on a Linux or macOS CPU with 2 cores or more, 1 on a "
                        "GPU, under torchrun or on Windows")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the losses of the stages that train on fixed shapes (pretraining, SFT, "
                        "distillation; not the GRPO rollouts), with BACKEND (default inductor). Meant for long runs "
                        "on a GPU; compiling costs time at the start of each stage, so time it first with --max-steps")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import dslib

    preset = args.preset or dslib.scale()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(os.getpid(), signal.SIGINT))  # handled as Ctrl-C
    try:
        run(args.out, preset, seed=args.seed, stages=stages, resume=args.resume, device=args.device,
            max_steps=args.max_steps, progress=not args.quiet, threads=args.threads, compile=args.compile,
            workers=args.workers)
    except CapstoneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted: the checkpoints in {args.out} are saved; continue with --resume", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, the first process speaks for all
        print(f"report card: {Path(args.out) / 'report.md'} (and report.html); metrics: "
              f"{Path(args.out) / 'metrics.json'}")
    return 0
