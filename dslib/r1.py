# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/07_r1.py (chapter 07).
# Edit the chapter, then run the export again.

"""DeepSeek-R1's four stages on the arithmetic world (arXiv 2501.12948, section 2.3): the language measures and R1's
language-consistency reward, a readability measure, the four stages (cold start, reasoning RL, rejection sampling with
non-reasoning data, RL for all scenarios) as checkpointed functions, and the pipeline with stage ablations (chapter 07)."""

from __future__ import annotations

import copy
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from dslib.checkpoint import atomic_write_text, load_checkpoint
from dslib.grpo import GRPOConfig, GRPOTrainer
from dslib.r1zero import Samples, measure, sample_k
from dslib.rewards import Rewards, accuracy_reward, format_reward
from dslib.train import TrainConfig, Trainer
from dslib.world import LANGUAGES, PackedData, Problem, prompt


# The language marks of a reasoning step: its operator and its equals sign, in symbols or in words. Every step has
# exactly two, in either language ("07+35=42": "+" and "="; "07 plus 35 is 42": "plus" and "is"), so a share of marks
# is a share of half-steps, whichever language they are written in. Numbers and " wait " belong to neither language.
_MARK_RE = re.compile(r"(?<![A-Za-z])(plus|minus|is)(?![A-Za-z])|([+\-=])", re.ASCII)


def reasoning_of(completion: object) -> str:
    """The reasoning of a completion: the text before its first </think> (all of it when the tag is missing); "" for
    anything that is not a string."""
    if not isinstance(completion, str):
        return ""
    return completion.split("</think>", 1)[0]


def language_marks(completion: object) -> dict[str, int]:
    """How many language marks of each language the reasoning holds: {"sym": n, "en": m}. Never raises."""
    counts = {"sym": 0, "en": 0}
    for m in _MARK_RE.finditer(reasoning_of(completion)):
        counts["en" if m.group(1) else "sym"] += 1
    return counts


def language_share(completion: object, language: str) -> float | None:
    """The share of the reasoning's language marks that are in `language` (in [0, 1]); None when it has none (a bare
    answer, an empty or unparseable reasoning)."""
    if language not in LANGUAGES:
        raise ValueError(f"language={language!r} is invalid: one of {LANGUAGES}")
    c = language_marks(completion)
    total = c["sym"] + c["en"]
    return None if total == 0 else c[language] / total


def reasoning_language(completion: object) -> str:
    """"sym", "en", "mixed" (marks of both languages) or "none" (no reasoning marks at all)."""
    c = language_marks(completion)
    if c["sym"] and c["en"]:
        return "mixed"
    return "sym" if c["sym"] else "en" if c["en"] else "none"


def mixes(completion: object) -> bool:
    """Does the reasoning use both languages? (R1's "language mixing", within one response.)"""
    return reasoning_language(completion) == "mixed"


def language_consistency_reward(completion: object, problem: Problem) -> float:
    """DeepSeek-R1's language-consistency reward (section 2.3.2): the share of the reasoning's words that are in the
    target language, here the language the problem is stated in. A reasoning without any language mark (a bare
    answer) has nothing in the wrong language and scores 1. Always in [0, 1]; never raises."""
    try:
        share = language_share(completion, problem.language)
    except Exception:
        return 0.0
    return 1.0 if share is None else float(share)


_NUM = r"[0-9]{1,6}"
_STEP = rf"{_NUM}(?:[+\-]{_NUM}={_NUM}| (?:plus|minus) {_NUM} is {_NUM})"
_STEP_RE = re.compile(_STEP, re.ASCII)
_THINK_RE = re.compile(rf"(?:{_NUM} wait )?{_STEP}(?:(?: | wait ){_STEP})*", re.ASCII)
READABILITY_CHECKS = ("format", "one_language", "parses", "no_repeats")


def readability(completion: object, problem: Problem | None = None) -> dict[str, bool]:
    """The chapter's readability measure, four checks a reader would make:

    - format: the tags are closed and in order, and nothing follows </answer> (dslib.rewards.format_reward);
    - one_language: the reasoning does not mix symbols and words;
    - parses: the reasoning is empty, or is made of whole steps ("07+35=42" or "07 plus 35 is 42") joined by spaces or
      " wait ", optionally after a first guess ("42 wait ..."), with nothing else in it;
    - no_repeats: no step is written twice (a " wait " followed by the same step again checks nothing).

    Never raises: anything that is not a string fails every check."""
    if not isinstance(completion, str):
        return dict.fromkeys(READABILITY_CHECKS, False)
    think = reasoning_of(completion)
    steps = _STEP_RE.findall(think)
    return {"format": format_reward(completion) == 1.0,
            "one_language": not mixes(completion),
            "parses": think == "" or _THINK_RE.fullmatch(think) is not None,
            "no_repeats": len(steps) == len(set(steps))}


def readable(completion: object, problem: Problem | None = None) -> bool:
    """Does the completion pass every readability check?"""
    return all(readability(completion, problem).values())


def measure_r1(samples: Samples) -> dict:
    """chapter 06's `measure`, plus the language and readability measures, overall and by the prompt's language
    ("by_language"): consistency (mean language-consistency reward), mixing (share of responses that mix),
    prompt_language_share (share of reasoning marks in the prompt's language, over responses that have marks),
    readable (share passing all four checks) and each check's pass rate ("check_<name>")."""
    out = measure(samples)
    flat = [(t, p) for p, row in zip(samples.problems, samples.texts) for t in row]
    ok = samples.correct.flatten()

    def stats(items, right):
        shares = [language_share(t, p.language) for t, p in items]
        shares = [s for s in shares if s is not None]
        checks = [readability(t, p) for t, p in items]
        return {"n": len(items), "pass@1": float(np.mean(right)),
                "consistency": float(np.mean([language_consistency_reward(t, p) for t, p in items])),
                "mixing": float(np.mean([mixes(t) for t, _ in items])),
                "prompt_language_share": float(np.mean(shares)) if shares else float("nan"),
                "readable": float(np.mean([all(c.values()) for c in checks])),
                **{f"check_{k}": float(np.mean([c[k] for c in checks])) for k in READABILITY_CHECKS}}

    out.update(stats(flat, ok))
    out["by_language"] = {}
    for lang in LANGUAGES:
        idx = [i for i, (_, p) in enumerate(flat) if p.language == lang]
        if idx:
            out["by_language"][lang] = stats([flat[i] for i in idx], ok[idx])
    return out


def bilingual(problems: Sequence[Problem]) -> list[Problem]:
    """Each problem in both languages: all of them in symbols first, then the same problems in words."""
    return [p.in_language(lang) for lang in LANGUAGES for p in problems]


@dataclass(frozen=True)
class R1Config:
    """R1's four stages at miniature scale (the defaults take about 4 minutes on one CPU thread in all).

    Stage 1, cold start: `cold_start_examples` readable, single-language worked solutions (reflecting styles, in the
    problem's language, right answers), SFT for `cold_start_steps` steps of `sft_batch` packed rows at `sft_lr`.
    Stage 2, reasoning RL: GRPO (`rl`: GRPOConfig fields) with accuracy 1 + format 0.1 + language consistency
    `language_weight`.
    Stage 3, rejection sampling: `rejection_k` samples of each of `rejection_problems` fresh problems from the stage-2
    model; kept when right, readable and wholly in the problem's language (one per problem); plus `non_reasoning`
    bare answers to one-operation problems; SFT of the **base** model on them for `sft_steps` steps.
    Stage 4, RL for all scenarios: GRPO (`final_rl` overrides of `rl`) with the stage-2 rewards plus `brevity_weight`
    times the brevity reward on one-operation problems.
    """

    cold_start_examples: int = 1000
    cold_start_steps: int = 300
    sft_batch: int = 16
    sft_lr: float = 1e-3
    seq_len: int = 128
    rl: dict[str, Any] = field(default_factory=lambda: {"steps": 60, "max_new_tokens": 96})
    language_weight: float = 0.2
    rejection_problems: int = 800
    rejection_k: int = 4
    non_reasoning: int = 200
    sft_steps: int = 200
    final_rl: dict[str, Any] = field(default_factory=lambda: {"steps": 30})
    brevity_weight: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("cold_start_examples", "cold_start_steps", "sft_batch", "seq_len", "rejection_problems",
                     "rejection_k", "sft_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"R1Config.{name}={v!r} is invalid: a positive int is required")
        for name in ("non_reasoning", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"R1Config.{name}={v!r} is invalid: a non-negative int is required")
        if not (isinstance(self.sft_lr, (int, float)) and self.sft_lr > 0):
            raise ValueError(f"R1Config.sft_lr={self.sft_lr!r} is invalid: a positive number is required")
        for name in ("language_weight", "brevity_weight"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise ValueError(f"R1Config.{name}={v!r} is invalid: a non-negative number is required")
        for name in ("rl", "final_rl"):
            v = getattr(self, name)
            if not isinstance(v, dict) or "seed" in v:
                raise ValueError(f"R1Config.{name}={v!r} is invalid: a dict of GRPOConfig fields without 'seed'")
        self.grpo_config(2), self.grpo_config(4)  # validates the GRPO fields (ValueError naming the field)

    def grpo_config(self, stage: int) -> GRPOConfig:
        """The GRPO config of stage 2 or 4 (the seed is the config's seed + the stage)."""
        fields = {"log_kl": False, **self.rl, **(self.final_rl if stage == 4 else {})}
        return GRPOConfig(**{**fields, "seed": self.seed + stage})

    def sft_config(self, steps: int) -> TrainConfig:
        return TrainConfig(steps=steps, lr=self.sft_lr, warmup_steps=min(10, steps - 1), schedule="cosine",
                           eval_every=0, seed=self.seed)


def _path(p) -> Path | None:
    return None if p is None else Path(p)


def local_sft_trainer(model, data, config: TrainConfig, checkpoint_dir: Path | None) -> Trainer:
    """A Trainer in this process, on the model's device, resumed from checkpoint_dir when that holds a checkpoint."""
    trainer = Trainer(model, data, config, checkpoint_dir=checkpoint_dir, device=next(model.parameters()).device)
    if checkpoint_dir is not None:
        trainer.resume()
    return trainer


def local_grpo_trainer(model, world, config: GRPOConfig, rewards: Rewards, checkpoint_dir: Path | None,
                       checkpoint_every: int) -> GRPOTrainer:
    """A GRPOTrainer in this process, resumed from checkpoint_dir when that holds a checkpoint."""
    trainer = GRPOTrainer(model, world, config, rewards=rewards, checkpoint_dir=checkpoint_dir,
                          checkpoint_every=checkpoint_every)
    if checkpoint_dir is not None:
        trainer.resume()
    return trainer


@dataclass(frozen=True)
class Trainers:
    """How the stages build their trainers: `sft(model, data, train_config, checkpoint_dir)` -> a Trainer and
    `grpo(model, world, grpo_config, rewards, checkpoint_dir, checkpoint_every)` -> a GRPOTrainer, each resumed from
    checkpoint_dir when that holds a checkpoint. The default trains in this process."""

    sft: Callable[..., Trainer] = local_sft_trainer
    grpo: Callable[..., GRPOTrainer] = local_grpo_trainer


def sft(model: torch.nn.Module, texts: Sequence[str], world, config: R1Config, steps: int,
        checkpoint_dir: Path | None = None, progress: bool = True, trainers: Trainers = Trainers()) -> torch.nn.Module:
    """Supervised fine-tuning of `model` in place on prompt + completion texts (loss on the completion only), packed
    into rows of config.seq_len, config.sft_batch rows per step at config.sft_lr with cosine decay; with dslib.train's
    checkpoints: a checkpoint_dir that holds a finished run is loaded instead of trained again. Returns the model."""
    data = PackedData(list(texts), world.tokenizer, config.seq_len, config.sft_batch, seed=config.seed)
    trainer = trainers.sft(model, data, config.sft_config(steps), checkpoint_dir)
    if trainer.step < steps:
        trainer.fit(progress=progress)
    return model.eval()


def cold_start_data(world, n: int, seed: int = 0) -> list[str]:
    """n readable long worked solutions for the cold start: fresh training problems (two or more operations) in
    either language, each written in a reflecting style (guess then verify, or a slip caught with " wait ") wholly in
    the problem's language, with a right answer. The texts are prompt + completion, ready for SFT."""
    rng = random.Random(f"cold-start-{seed}")
    out = []
    while len(out) < n:
        p = world.sample_problem(rng)
        if len(p.ops) < 2:
            continue
        p = p.in_language(rng.choice(LANGUAGES))
        d = world.document(p, rng.choice(("guess_verify", "slip_fix")), rng, language=p.language)
        if d.correct and readable(d.completion, p):
            out.append(prompt(p) + d.completion)
    return out


def cold_start(base: torch.nn.Module, world, config: R1Config, checkpoint_dir: str | Path | None = None,
               progress: bool = True, trainers: Trainers = Trainers()) -> torch.nn.Module:
    """Stage 1: SFT of a copy of the base model on cold_start_data. Returns the new model; `base` is unchanged."""
    texts = cold_start_data(world, config.cold_start_examples, config.seed)
    return sft(copy.deepcopy(base), texts, world, config, config.cold_start_steps, _path(checkpoint_dir), progress,
               trainers)


def brevity_reward(completion: object, problem: Problem) -> float:
    """This world's stand-in for helpfulness on easy questions: on a one-operation problem, a right answer scores
    1 - (reasoning characters) / 32, at least 0 (a bare right answer scores 1); a wrong answer and every longer
    problem score 0. Never raises."""
    try:
        if len(problem.ops) != 1 or accuracy_reward(completion, problem) != 1.0:
            return 0.0
        return max(0.0, 1.0 - len(reasoning_of(completion)) / 32)
    except Exception:
        return 0.0


def r1_rewards(language_weight: float, brevity_weight: float = 0.0) -> Rewards:
    """R1's rule rewards: accuracy 1 + format 0.1 (R1-Zero's), + language consistency with language_weight (stages 2
    and 4), + brevity on easy problems with brevity_weight (stage 4). A zero weight leaves the part out."""
    parts = {"accuracy": (accuracy_reward, 1.0), "format": (format_reward, 0.1)}
    if language_weight > 0:
        parts["language"] = (language_consistency_reward, float(language_weight))
    if brevity_weight > 0:
        parts["brevity"] = (brevity_reward, float(brevity_weight))
    return Rewards(parts)


def _grpo(model, world, config: GRPOConfig, rewards: Rewards, checkpoint_dir, progress: bool, on_checkpoint,
          checkpoint_every: int, trainers: Trainers) -> GRPOTrainer:
    trainer = trainers.grpo(copy.deepcopy(model), world, config, rewards, _path(checkpoint_dir), checkpoint_every)
    trainer.fit(progress=progress, on_checkpoint=on_checkpoint)
    trainer.model.eval()
    return trainer


def reasoning_rl(model: torch.nn.Module, world, config: R1Config, checkpoint_dir: str | Path | None = None,
                 progress: bool = True, *, on_checkpoint=None, checkpoint_every: int = 10,
                 trainers: Trainers = Trainers()) -> GRPOTrainer:
    """Stage 2: GRPO on a copy of `model` with accuracy + format + language consistency (config.language_weight; 0
    gives R1-Zero's rewards). Checkpoints every checkpoint_every steps and resumes from checkpoint_dir. Returns the
    trainer: its .model is the stage-2 model, .history the log."""
    return _grpo(model, world, config.grpo_config(2), r1_rewards(config.language_weight), checkpoint_dir, progress,
                 on_checkpoint, checkpoint_every, trainers)


def all_scenarios_rl(model: torch.nn.Module, world, config: R1Config, checkpoint_dir: str | Path | None = None,
                     progress: bool = True, *, on_checkpoint=None, checkpoint_every: int = 10,
                     trainers: Trainers = Trainers()) -> GRPOTrainer:
    """Stage 4: GRPO on a copy of `model` with the rule rewards, language consistency and brevity on easy problems."""
    return _grpo(model, world, config.grpo_config(4), r1_rewards(config.language_weight, config.brevity_weight),
                 checkpoint_dir, progress, on_checkpoint, checkpoint_every, trainers)


def keep_sample(completion: str, problem: Problem) -> bool:
    """The rejection filter: the answer is right, the completion is readable, and every language mark of its
    reasoning is in the problem's language (a bare answer has none and is kept when right)."""
    return (accuracy_reward(completion, problem) == 1.0 and readable(completion, problem)
            and language_consistency_reward(completion, problem) == 1.0)


def non_reasoning_texts(world, n: int, rng: random.Random) -> list[str]:
    """R1's non-reasoning data in this world: n bare answers (an empty thought) to one-operation problems, each in a
    language drawn by rng."""
    out = []
    while len(out) < n:
        p = world.sample_problem(rng, n_operands=2).in_language(rng.choice(LANGUAGES))
        out.append(prompt(p) + f"</think> <answer> {p.fmt(p.answer)} </answer>")
    return out


def rejection_sample(model: torch.nn.Module, world, config: R1Config) -> tuple[list[str], dict]:
    """Stage 3's data: sample `model` on fresh problems (either language), keep the first completion of each problem
    that passes keep_sample, and add bare answers to one-operation problems (the non-reasoning data). Returns the SFT
    texts (prompt + completion) and counts of what was sampled and kept."""
    rng = random.Random(f"rejection-{config.seed}")
    problems = [world.sample_problem(rng).in_language(rng.choice(LANGUAGES)) for _ in range(config.rejection_problems)]
    s = sample_k(model, world, problems, config.rejection_k, max_new_tokens=config.grpo_config(2).max_new_tokens,
                 seed=config.seed + 3)
    kept = []
    for p, row in zip(problems, s.texts):
        good = [t for t in row if keep_sample(t, p)]
        if good:
            kept.append(prompt(p) + good[0])
    easy = non_reasoning_texts(world, config.non_reasoning, rng)
    info = {"sampled": len(problems) * config.rejection_k, "problems": len(problems), "kept": len(kept),
            "non_reasoning": len(easy)}
    return kept + easy, info


def rejection_sft(base: torch.nn.Module, rl_model: torch.nn.Module, world, config: R1Config,
                  checkpoint_dir: str | Path | None = None, progress: bool = True,
                  trainers: Trainers = Trainers()) -> tuple[torch.nn.Module, dict]:
    """Stage 3: rejection-sample the stage-2 model, then SFT a copy of the **base** model on what was kept, as R1
    did. Returns the new model and the data counts (saved beside the checkpoint, so a finished stage loads both).
    Sampling is seeded by the config alone, so processes that train data-parallel all draw the same data."""
    folder = _path(checkpoint_dir)
    model = copy.deepcopy(base)
    if folder is not None and (folder / "rejection.json").exists() and (folder / "model.safetensors").exists():
        load_checkpoint(folder, model)
        return model.eval(), json.loads((folder / "rejection.json").read_text(encoding="utf-8"))
    texts, info = rejection_sample(rl_model, world, config)
    model = sft(model, texts, world, config, config.sft_steps, folder, progress, trainers)
    if folder is not None:
        atomic_write_text(folder / "rejection.json", json.dumps(info) + "\n")
    return model, info


STAGES = ("cold_start", "reasoning_rl", "rejection_sft", "all_scenarios_rl")
SKIPPABLE = ("cold_start", "language", "rejection_sft", "all_scenarios_rl")


def run_r1(base: torch.nn.Module, world, config: R1Config, checkpoint_dir: str | Path | None = None, *,
           skip: Sequence[str] = (), progress: bool = True, trainers: Trainers = Trainers()) -> dict[str, Any]:
    """The four stages in order, their trainers built by `trainers`. skip: what to leave out, for the ablation ("cold_start": stage 2 starts from the
    base model; "language": stages 2 and 4 without the consistency reward; "rejection_sft": stage 4 starts from the
    stage-2 model; "all_scenarios_rl": the stage-3 model is final). Skipping all four is R1-Zero.

    Each stage is checkpointed in a folder nested in its parent's (checkpoint_dir/cold_start/reasoning_rl/...), so
    runs that share their first stages share those folders: a finished stage is loaded, never run again. Returns
    {"models": {stage: model}, "final": the last model, "trainers": {stage: GRPOTrainer}, "rejection": stage 3's
    counts (when it ran), "folders": {stage: folder} (when checkpoint_dir is given)}."""
    bad = [s for s in skip if s not in SKIPPABLE]
    if isinstance(skip, str) or bad:
        raise ValueError(f"skip={skip!r} is invalid: a sequence of names from {SKIPPABLE}")
    if "language" in skip:
        config = R1Config(**{**asdict(config), "language_weight": 0.0})
    suffix = "" if config.language_weight > 0 else "-nolang"
    folder = _path(checkpoint_dir)
    models, made, folders, out = {}, {}, {}, {}

    def enter(stage: str, name: str) -> Path | None:
        nonlocal folder
        if folder is None:
            return None
        folder = folders[stage] = folder / name
        return folder

    start = base
    if "cold_start" not in skip:
        start = models["cold_start"] = cold_start(base, world, config, enter("cold_start", "cold_start"), progress,
                                                  trainers)
    tr = made["reasoning_rl"] = reasoning_rl(start, world, config, enter("reasoning_rl", "reasoning_rl" + suffix),
                                             progress, trainers=trainers)
    last = models["reasoning_rl"] = tr.model
    if "rejection_sft" not in skip:
        last, out["rejection"] = rejection_sft(base, tr.model, world, config,
                                               enter("rejection_sft", "rejection_sft"), progress, trainers)
        models["rejection_sft"] = last
    if "all_scenarios_rl" not in skip:
        tr4 = made["all_scenarios_rl"] = all_scenarios_rl(
            last, world, config, enter("all_scenarios_rl", "all_scenarios_rl" + suffix), progress, trainers=trainers)
        last = models["all_scenarios_rl"] = tr4.model
    return {**out, "models": models, "final": last, "trainers": made, "folders": folders}
