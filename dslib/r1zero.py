# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/06_r1zero.py (chapter 06).
# Edit the chapter, then run the export again.

"""R1-Zero on the arithmetic world (DeepSeek-R1, arXiv 2501.12948, section 2.2): the measures that later chapters
reuse (pass@1 over k samples, cons@k, the unbiased pass@k, length, reflection per response and per problem, format,
truncation, accuracy by difficulty), the aha-moment finder, and the R1-Zero run with checkpoints (chapter 06)."""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from dslib.grpo import GRPOConfig, GRPOTrainer
from dslib.rewards import Rewards, format_reward, reflects, style_of
from dslib.sampling import generate
from dslib.world import Problem, parse_answer, prompt


@dataclass
class Samples:
    """k sampled completions of each of P problems (row i holds problem i's samples).

    texts[i][j]: the j-th completion of problem i; lengths (P, k): its length in tokens; truncated (P, k): it hit the
    length limit without closing </answer> (such a completion gets no accuracy reward: a silent failure to watch)."""

    problems: list[Problem]
    texts: list[list[str]]
    lengths: np.ndarray
    truncated: np.ndarray

    @property
    def k(self) -> int:
        return len(self.texts[0]) if self.texts else 0

    @cached_property
    def answers(self) -> list[list[int | None]]:
        """The parsed <answer> of every completion (None when there is none)."""
        return [[parse_answer(t) for t in row] for row in self.texts]

    @property
    def correct(self) -> np.ndarray:
        """(P, k) bool: is each completion's answer right?"""
        return np.array([[a == p.answer for a in row] for row, p in zip(self.answers, self.problems)], dtype=bool)


@torch.no_grad()
def sample_k(model: torch.nn.Module, world, problems: Sequence[Problem], k: int, *, temperature: float = 1.0,
             max_new_tokens: int = 64, seed: int = 0, batch_size: int = 512) -> Samples:
    """Sample k completions of each problem's prompt with the batched engine (chapter 05), batch_size rows at a time.
    The same seed gives the same samples."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k={k!r} is invalid: a positive int is required")
    if len(problems) == 0:
        raise ValueError("sample_k needs at least one problem")
    tok = world.tokenizer
    stop = tok.id("</answer>")
    prompts = [tok.encode(prompt(p), bos=True) for p in problems for _ in range(k)]
    texts, lengths, truncated = [], [], []
    for s in range(0, len(prompts), batch_size):
        r = generate(model, prompts[s:s + batch_size], max_new_tokens, temperature=temperature, stop_ids=[stop],
                     pad_id=tok.pad_id, seed=seed * 1_000_003 + s)
        texts += r.texts(tok)
        lengths += r.lengths.tolist()
        truncated += r.truncated([stop]).tolist()
    P = len(problems)
    return Samples(list(problems), [texts[i * k:(i + 1) * k] for i in range(P)],
                   np.array(lengths).reshape(P, k), np.array(truncated, dtype=bool).reshape(P, k))


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c are right (Chen et al. 2021, the Codex paper):
    1 - C(n - c, k) / C(n, k), the chance that k samples drawn without replacement from the n hold a right one.
    Computed as a product, which stays exact in floating point for large n."""
    if not (isinstance(n, (int, np.integer)) and isinstance(c, (int, np.integer)) and isinstance(k, (int, np.integer))):
        raise ValueError(f"pass_at_k(n={n!r}, c={c!r}, k={k!r}): ints are required")
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k(n={n}, c={c}, k={k}) is invalid: 0 <= c <= n and 1 <= k <= n are required")
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_curve(correct: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """Mean pass@k over problems for each k in ks, from a (P, n) table of right/wrong samples."""
    correct = np.asarray(correct, dtype=bool)
    n = correct.shape[1]
    counts = correct.sum(1)
    return np.array([np.mean([pass_at_k(n, int(c), int(k)) for c in counts]) for k in ks])


def cons_at_k(answers: Sequence[Sequence[int | None]], truths: Sequence[int]) -> float:
    """cons@k (majority voting, "maj@k"; R1 reports cons@64): per problem, the most frequent parsed answer among its
    k samples is the prediction. Completions without an answer do not vote; a problem with no vote scores 0.
    Ties: every tied answer is equally likely to be chosen, so a tie of m answers that holds the right one scores 1/m
    (the expected score of a random tie-break; no hidden preference for the first sample)."""
    if len(answers) != len(truths) or len(answers) == 0:
        raise ValueError(f"cons_at_k needs one row of answers per truth ({len(answers)} rows, {len(truths)} truths)")
    total = 0.0
    for row, truth in zip(answers, truths):
        votes = Counter(a for a in row if a is not None)
        if not votes:
            continue
        top = max(votes.values())
        winners = [a for a, v in votes.items() if v == top]
        total += (truth in winners) / len(winners)
    return total / len(answers)


_NUM = r"[0-9]{1,6}"
_STEP_RE = re.compile(rf"({_NUM}) ?(\+|-| plus | minus ) ?({_NUM}) ?(=| is ) ?({_NUM})", re.ASCII)
_GUESS_RE = re.compile(rf"\s*({_NUM})\s*", re.ASCII)


@dataclass(frozen=True)
class Aha:
    """A self-correction found in one completion: before " wait " the reasoning reached `first` where `should_be` was
    right; after it, the reasoning recomputed (at least one step) and the stated answer `final` is right."""

    kind: str  # "guess" (a bare number before " wait ") or "step" (a wrong step before it)
    first: int
    should_be: int
    final: int
    before: str
    after: str


def find_aha(completion: object, problem: Problem) -> Aha | None:
    """The aha moment, found by rule: the first " wait " of the reasoning follows a wrong value (a guessed answer that
    is not the answer, or a step whose result is wrong for its own operands), the text after it holds at least one
    step, and the final answer is right. Anything else (no " wait ", a right value before it, nothing recomputed, a
    wrong or missing final answer, text that does not parse) gives None. Never raises on any input."""
    if not isinstance(completion, str) or not reflects(completion):
        return None
    think = completion.split("</think>", 1)[0]
    before, after = think.split(" wait ", 1)
    final = parse_answer(completion)
    if final is None or final != problem.answer or not _STEP_RE.search(after):
        return None
    guess = _GUESS_RE.fullmatch(before)
    if guess:
        first, should_be, kind = int(guess.group(1)), problem.answer, "guess"
    else:
        steps = list(_STEP_RE.finditer(before))
        if not steps or before[steps[-1].end():].strip():
            return None
        a, op, b, _, c = steps[-1].groups()
        first, should_be, kind = int(c), int(a) + int(b) if op.strip() in ("+", "plus") else int(a) - int(b), "step"
    if first == should_be:
        return None
    return Aha(kind, first, should_be, final, before, after)


def measure(samples: Samples) -> dict:
    """The chapter's measures of k samples per problem, as a JSON-able dict:

    pass@1 (the mean over all samples: R1's pass@1 with k samples), cons@k (majority vote), pass@k (unbiased, at k =
    the number of samples), length (tokens; also of right and of wrong completions), reflection_response (share of
    completions with " wait "), reflection_problem (share of problems where at least one of the k completions has it:
    a larger number, often quoted as if it were the first), aha_response (share of completions that fix a wrong value
    after " wait ", see find_aha), format (share with R1-Zero's tags in order), truncated (share that hit the length
    limit), by_style (share and accuracy of bare, steps and reflecting completions) and by_ops (pass@1 by number of
    operations)."""
    correct = samples.correct
    flat = [t for row in samples.texts for t in row]
    probs = [p for p, row in zip(samples.problems, samples.texts) for _ in row]
    ok = correct.flatten()
    refl = np.array([reflects(t) for t in flat])
    lengths = samples.lengths.flatten().astype(float)
    styles = [style_of(t) for t in flat]
    by_style = {}
    for st in ("bare", "steps", "reflects"):
        idx = [i for i, x in enumerate(styles) if x == st]
        by_style[st] = {"share": len(idx) / len(flat), "accuracy": float(np.mean(ok[idx])) if idx else float("nan")}
    ops = np.array([len(p.ops) for p in samples.problems])
    k = samples.k
    return {
        "k": k, "problems": len(samples.problems),
        "pass@1": float(correct.mean()),
        "cons@k": cons_at_k(samples.answers, [p.answer for p in samples.problems]),
        "pass@k": float(pass_at_k_curve(correct, [k])[0]),
        "length": float(lengths.mean()),
        "length_right": float(lengths[ok].mean()) if ok.any() else float("nan"),
        "length_wrong": float(lengths[~ok].mean()) if (~ok).any() else float("nan"),
        "reflection_response": float(refl.mean()),
        "reflection_problem": float(refl.reshape(-1, k).any(1).mean()),
        "aha_response": float(np.mean([find_aha(t, p) is not None for t, p in zip(flat, probs)])),
        "format": float(np.mean([format_reward(t) for t in flat])),
        "truncated": float(samples.truncated.mean()),
        "by_style": by_style,
        "by_ops": {int(n): float(correct[ops == n].mean()) for n in sorted(set(ops.tolist()))},
    }


def problems_with_ops(world, n_ops: int, n: int, seed: int = 0) -> list[Problem]:
    """n distinct fresh problems with n_ops operations (never held-out ones), the same for the same seed; n_ops may lie
    outside the training range (the corpus and GRPO draw 1..max_operands - 1 operations), to test generalisation."""
    rng = random.Random(f"ops-{n_ops}-{seed}")
    seen: dict[str, Problem] = {}
    for _ in range(50 * n + 100):
        if len(seen) == n:
            break
        p = world.sample_problem(rng, n_operands=n_ops + 1)
        seen.setdefault(p.text, p)
    return list(seen.values())


def r1zero_rewards() -> Rewards:
    """DeepSeek-R1-Zero's rule rewards (section 2.2.2): accuracy (1 for the right answer) + format (0.1 for the
    think and answer tags); no neural reward model, so nothing to hack but the rules."""
    return Rewards()


def run_r1zero(model: torch.nn.Module, world, config: GRPOConfig, *, eval_problems: Sequence[Problem],
               eval_k: int = 4, checkpoint_dir: str | Path | None = None, checkpoint_every: int = 10,
               resume: bool = False, progress: bool = True, ref_model: torch.nn.Module | None = None) -> GRPOTrainer:
    """R1-Zero: GRPO on `model` (trained in place) with the rule rewards only. At step 0, every checkpoint_every steps
    and at the end, the checkpoint is written first and then `measure` runs on eval_k samples of each eval problem
    (seeded by the step, so a resumed run measures the same); the results are `trainer.evals`. With resume, the run
    continues from the latest checkpoint in checkpoint_dir."""
    trainer = GRPOTrainer(model, world, config, rewards=r1zero_rewards(), ref_model=ref_model,
                          checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
    if resume:
        trainer.resume()

    def evaluate(tr: GRPOTrainer, path) -> dict:
        m = measure(sample_k(tr.model, world, eval_problems, eval_k, max_new_tokens=config.max_new_tokens,
                             seed=10_000 + tr.step))
        m["seconds"] = float(sum(tr.history.get("seconds", [])))
        return m

    trainer.fit(progress=progress, on_checkpoint=evaluate)
    return trainer


def time_to_double(values: Sequence[float], seconds: Sequence[float],
                   window: int = 3) -> tuple[int | None, float | None]:
    """The first step (1-based) at which the moving average (over `window` steps) of a per-step rate reaches twice its
    first window's mean, with the seconds spent until then; (None, None) if it never does."""
    v = np.asarray(values, dtype=float)
    if len(v) < window:
        return None, None
    avg = np.convolve(v, np.ones(window) / window, mode="valid")
    hit = np.nonzero(avg >= 2 * avg[0])[0]
    if len(hit) == 0:
        return None, None
    step = int(hit[0]) + window
    return step, float(np.sum(seconds[:step]))
