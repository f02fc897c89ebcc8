# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: -all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 06 · R1-Zero and the "aha moment", grown from a model that started as random weights
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/deepseek-from-scratch/deepseek-from-scratch/blob/main/chapters/06_r1zero.ipynb)
# [![Binder](https://mybinder.org/badge_logo.svg)](https://mybinder.org/v2/gh/deepseek-from-scratch/deepseek-from-scratch/main?labpath=chapters%2F06_r1zero.ipynb)
#
# **What you will build.** DeepSeek-R1-Zero in miniature: reinforcement learning with nothing but rule rewards,
# applied straight to a pretrained base model with no supervised fine-tuning, and the instruments to watch what it does.
#
# 1. `dslib.r1zero`, the measures that chapters 07-09 reuse: pass@1 averaged over $k$ samples (as R1 reports it),
#    cons@k (majority vote), the unbiased pass@k for $k = 1..64$, response length, the reflection rate counted **per
#    response** and **per problem**, format and truncation rates, and accuracy by difficulty (section 2);
# 2. an aha-moment finder: code that scans transcripts for a wrong value, a " wait ", a recomputation and a right answer
#    (section 3);
# 3. the R1-Zero run, with GRPO checkpoints every few steps written before any evaluation, and an exact resume
#    (section 4); R1's Figures 2 and 3 in miniature (section 5);
# 4. the honest questions: did the base model already reflect (section 6)? Where does the behaviour come from: the
#    same recipe on a corpus where plain steps are common (section 7)? What does RL add, by pass@k and by difficulty
#    (section 8)? An explorer over the saved checkpoints (section 9) and the claims ledger (section 10).
#
# **What you need.** Chapter 05 (GRPO: `dslib.grpo`, the rollout engine `dslib.sampling`, the rule rewards
# `dslib.rewards`) and the course's cached base models (`python -m dslib.pretrained` builds them: about 10 minutes on
# one CPU thread, once). **How long.** About 4-5 minutes at `small` scale on 2 CPU cores once the base models are
# cached; `full` scale (one GPU) runs longer RL and larger evaluations.
#
# **Papers.** DeepSeek-R1 (arXiv 2501.12948), section 2.2: the template (Table 1), the rule rewards, the training
# curves (Figures 2 and 3) and the "aha moment" (Table 3); DeepSeekMath (arXiv 2402.03300), section 5.2.2: RL improves
# Maj@K, not Pass@K; Dr. GRPO ("Understanding R1-Zero-like training", arXiv 2503.20783), section 2: base models already
# reflect.

# %%
# Set-up. Where dslib is missing (as on Colab), fetch the course from its repository and install dslib from it; the
# chapters also read small data files from its assets/ folder.
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

# DSLIB_REPOSITORY: where to clone from instead (a fork, a local clone); the tests use it
REPOSITORY = os.environ.get("DSLIB_REPOSITORY", "https://github.com/deepseek-from-scratch/deepseek-from-scratch")
if importlib.util.find_spec("dslib") is None:
    clone = Path.home() / "deepseek-from-scratch"
    if not clone.exists():
        subprocess.run(["git", "clone", "--depth", "1", REPOSITORY, str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(clone)], check=True)
    sys.path.insert(0, str(clone))
    os.chdir(clone / "chapters")

import copy
import html
import shutil
import time
from itertools import combinations

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import HTML, display

import dslib
from dslib.book import Ledger, build_dir, run_solutions
from dslib.explore import explore
from dslib.grpo import GRPOConfig, GRPOTrainer
from dslib.pretrained import STEPS_MIX, STEPS_RECIPE, base_model, base_world
from dslib.world import R1_ZERO_TEMPLATE, corpus_stats, prompt

# One CPU thread at small scale: the models are tiny, and one thread is far less disturbed by other programs on a
# shared machine than two that wait for each other.
device = dslib.setup(seed=0, threads=dslib.sized(small=1, full=None))
SCALE = dslib.scale()
CHAPTER_START = time.time()
world = base_world()
tok = world.tokenizer

# %% [markdown]
# ## The idea: reinforcement learning straight from the base model
#
# DeepSeek-R1-Zero (R1 paper, section 2.2) took DeepSeek-V3-Base and ran GRPO on it with **no supervised fine-tuning
# first**. The only signals were two rules: is the final answer right (math answers checked, code run against tests),
# and is the output in the format of the template below. Over thousands of RL steps the model's answers grew steadily
# longer (Figure 3: from hundreds to thousands of tokens), AIME 2024 pass@1 (averaged over 16 samples per question) rose
# from 15.6% to 71.0%, with cons@64 reaching 86.7% (Table 2; Figure 2 plots the climb), and the model began to stop,
# re-evaluate and correct itself mid-solution: the paper's "aha moment" (Table 3: "Wait, wait. Wait. That's an aha
# moment I can flag here."). Nobody taught it to; the paper calls it an emergent behaviour.
#
# Our miniature is the same pipeline end to end, with every part small enough to watch:

# %%
def draw_pipeline():
    """The chapter's map: from random weights to R1-Zero, and what is measured along the way."""
    fig, ax = plt.subplots(figsize=(12, 3.6))
    ax.set_xlim(0, 12)
    ax.set_ylim(0, 3.6)
    ax.axis("off")

    def box(x, y, w, h, text, color):
        ax.add_patch(plt.Rectangle((x, y), w, h, facecolor=color, edgecolor="#333333", lw=1.2, zorder=2))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9, zorder=3)

    def arrow(x0, y0, x1, y1, text=""):
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", lw=1.4, color="#333333"))
        if text:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.12, text, ha="center", fontsize=8, color="#555555")

    box(0.1, 2.3, 1.7, 0.9, "random\nweights", "#eeeeee")
    box(2.4, 2.3, 2.2, 0.9, "pretrain on the\narithmetic corpus\n(chapter 00 recipe)", "#dbe9f6")
    box(5.2, 2.3, 1.7, 0.9, "base model\n(cached)", "#dbe9f6")
    arrow(1.8, 2.75, 2.4, 2.75)
    arrow(4.6, 2.75, 5.2, 2.75)
    # the RL loop
    box(7.6, 2.5, 1.9, 0.8, "prompt\nQ:07+35-12 <think>", "#fdebd0")
    box(10.0, 2.5, 1.9, 0.8, "G = 8 samples\n(chapter 05 engine)", "#fdebd0")
    box(10.0, 1.2, 1.9, 0.8, "rule rewards\naccuracy + 0.1 format", "#fdebd0")
    box(7.6, 1.2, 1.9, 0.8, "group advantages\nGRPO update", "#fdebd0")
    arrow(6.9, 2.75, 7.6, 2.9, "R1-Zero")
    arrow(9.5, 2.9, 10.0, 2.9)
    arrow(10.95, 2.5, 10.95, 2.0)
    arrow(10.0, 1.6, 9.5, 1.6)
    arrow(8.55, 2.0, 8.55, 2.5)
    ax.text(9.75, 2.25, "x steps", ha="center", fontsize=8, color="#555555")
    box(7.6, 0.05, 4.3, 0.85, "every N steps: write a checkpoint, then measure\npass@1, cons@k, length, reflection",
        "#d5f5e3")
    arrow(8.55, 1.2, 8.55, 0.9)
    box(2.4, 0.1, 4.5, 1.4, "the questions: did the base already reflect?\nwhich corpus makes reflection win?\n"
        "what does RL add (pass@k, difficulty)?", "#f5eef8")
    arrow(7.6, 0.45, 6.9, 0.6)
    ax.set_title("R1-Zero in miniature: the pipeline of this chapter", fontsize=11)
    plt.tight_layout()
    plt.show()


draw_pipeline()

# %% [markdown]
# **The template.** R1-Zero's prompt (R1, Table 1) is an instruction that fixes only the *structure* of the answer:
#
# > A conversation between User and Assistant. [...] The reasoning process and answer are enclosed within
# > `<think> </think>` and `<answer> </answer>` tags, respectively [...] User: *prompt*. Assistant:
#
# Our base model has a context of 96 tokens and never read English instructions, so the instruction sentence would be
# noise to it; its pretraining corpus taught it the structure instead. We keep what the template fixes (the user's
# question, then the assistant's reasoning inside `<think> </think>`, then the answer inside `<answer> </answer>`) and
# drop the words. The prompt ends with an opened `<think>`, as R1-Zero's completions begin:

# %%
example = world.heldout[0]
print("R1's template, verbatim (dslib.world.R1_ZERO_TEMPLATE):\n ", R1_ZERO_TEMPLATE.format(prompt=example.text))
n_tokens = len(tok.encode(prompt(example), bos=True))
print(f"\nrendered for the arithmetic world ({n_tokens} tokens):\n  {prompt(example)!r}")
print(f"the verbatim template would take {len(tok.encode(R1_ZERO_TEMPLATE.format(prompt=example.text)))} tokens "
      f"of a 96-token context")

# %% [markdown]
# **The rewards** are R1-Zero's two rules (section 2.2.2), with the weights of chapter 05:
#
# $$r(o) = \underbrace{\mathbb 1[\text{the } \langle answer\rangle \text{ of } o \text{ is right}]}_{\text{accuracy}}
# + 0.1\cdot\underbrace{\mathbb 1[o \text{ is } \dots\langle/think\rangle\ \langle answer\rangle\, N\,
# \langle/answer\rangle]}_{\text{format}}$$
#
# and the optimiser is chapter 05's GRPO, unchanged: $G = 8$ samples per prompt, advantages
# $\hat A_i = (r_i - \mathrm{mean}\,\mathbf r)/\mathrm{std}\,\mathbf r$, the clipped objective with one update per
# batch, $\beta = 0$. (The R1 paper's January text gives no R1-Zero hyperparameters; these are the pre-study's, which
# chapter 05 adopted.) What this chapter adds is the **measurement**.

# %% [markdown]
# ## 2. Measures: `dslib.r1zero`
#
# R1 reports **pass@1** as the mean accuracy over $k$ sampled responses per question (16 for AIME), and **cons@64**
# as the accuracy of the majority answer of 64 samples. Code-generation papers report **pass@k**, the chance that at
# least one of $k$ samples is right, estimated without bias from $n \ge k$ samples of which $c$ are right
# (Chen et al. 2021):
#
# $$\text{pass@}k = \mathbb E_{\text{problems}}\left[1 - \binom{n-c}{k}\Big/\binom{n}{k}\right].$$
#
# Plugging the sample accuracy into $1-(1-\hat p)^k$ instead is biased upward for small $n$; the binomial form counts
# the subsets of size $k$ exactly. DeepSeekMath (section 5.2.2) used the pair to ask *what RL adds*: it raised Maj@K
# (majority voting) but not Pass@K, i.e. it made the model's distribution more reliable, not more capable. We will ask
# the same of our miniature.
#
# Two more measures are easy to get wrong:
#
# - **reflection per response** (the share of all completions that contain " wait ") and **per problem** (the share of
#   problems where at least one of the $k$ completions does). With $k = 16$ the second is far larger than the first;
#   numbers of one kind are often compared with numbers of the other. We report both, and every figure says which.
# - **truncation**: a completion that hits the length limit before `</answer>` gets no accuracy reward. If lengths grow
#   under RL, truncation can silently cap the reward; we log it at every step.
#
# First the sampler: $k$ completions of each problem with chapter 05's batched engine, and what they contain.

# %%
#| default_exp r1zero
# %%
#| export
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

# %% [markdown]
# `Samples` keeps the raw texts: every measure below is a function of them, so a number can always be traced back to
# the completions that produced it. Truncation is read from the engine (the last token is not `</answer>`), not guessed
# from the length. Samples are drawn in chunks of 512 rows; chapter 05's engine drops the rows that have finished from
# the batch, so a chunk of mostly short answers does not pay for its longest one.
#
# A first look at what the base model writes: eight samples of one held-out problem.

# %%
base = base_model(seed=0, device=device)
peek = sample_k(base, world, world.heldout[:1], 8, seed=1)
for text, ok, n, cut in zip(peek.texts[0], peek.correct[0], peek.lengths[0], peek.truncated[0]):
    print(f"{'right' if ok else 'wrong'} {n:>2} tokens{' (truncated)' if cut else ''}: {text}")

# %% [markdown]
# Next the estimators. Checked below against the slow, obvious definition: enumerate every subset of size $k$ of the
# $n$ samples and count those with a right one.
# %%
#| export
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

# %%
def pass_at_k_bruteforce(outcomes: list[bool], k: int) -> float:
    subsets = list(combinations(range(len(outcomes)), k))
    return sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)


rng_check = np.random.default_rng(0)
passk_errors = []
for _ in range(60):
    n = int(rng_check.integers(1, 11))
    outcomes = list(rng_check.random(n) < rng_check.random())
    for k in range(1, n + 1):
        passk_errors.append(abs(pass_at_k(n, sum(outcomes), k) - pass_at_k_bruteforce(outcomes, k)))
passk_error = max(passk_errors)
naive = 1 - (1 - 2 / 8) ** 4  # plugging p = c/n into 1 - (1 - p)^k
print(f"pass@k vs brute force over {len(passk_errors)} (n, c, k) cases: max error {passk_error:.1e}")
print(f"n = 8 samples, c = 2 right, k = 4: unbiased {pass_at_k(8, 2, 4):.3f}, brute force "
      f"{pass_at_k_bruteforce([True, True] + [False] * 6, 4):.3f}, the plug-in 1-(1-c/n)^k {naive:.3f} (biased)")

# cons@k: majority vote; a tie holding the right answer scores 1/m; unanswered samples do not vote.
cons_cases = {"clear majority": ([[7, 7, 3]], [7], 1.0), "wrong majority": ([[3, 3, 7]], [7], 0.0),
              "two-way tie": ([[7, 3, None, None]], [7], 0.5), "three-way tie": ([[1, 2, 7]], [7], 1 / 3),
              "no answers": ([[None, None]], [7], 0.0), "two problems": ([[7, 7], [1, 2]], [7, 2], 0.75)}
cons_ok = all(abs(cons_at_k(a, t) - want) < 1e-12 for a, t, want in cons_cases.values())
for name, (a, t, want) in cons_cases.items():
    print(f"cons@k {name:<15} answers {a} truth {t}: {cons_at_k(a, t):.3f} (want {want:.3f})")

# %% [markdown]
# ## 3. The aha moment, found by code
#
# R1's Table 3 shows one transcript, picked by hand. A claim about a behaviour needs a definition that code can apply
# to thousands of transcripts. In this world a self-correction looks like this: before the first " wait " the
# reasoning has reached a **wrong value** (a guessed answer that is not the answer, or a step whose result is wrong for
# its own operands); after it the model **recomputes** (at least one step) and the **final answer is right**.
#
# ```
# Q:83-29+07 <think>59 wait 83-29=54 54+07=61</think> <answer> 61 </answer>      guess 59 wrong -> fixed
# Q:83-29+07 <think>83-29=56 wait 83-29=54 54+07=61</think> <answer> 61 </answer>  step 83-29=56 wrong -> fixed
# ```
#
# A right guess followed by a check is reflection but not a correction; a wrong value followed by a wrong answer is a
# failed correction. `find_aha` keeps only the real thing, and it is tested below on handmade transcripts, including
# hostile ones. The rule is deliberately conservative: it reads only the first " wait ", and a completion whose text
# before it does not parse as a guess or a step is not counted. It can therefore miss some corrections, but every one it
# reports is a transcript you can read and check, as the explorer in section 9 lets you do.
# %%
#| export
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

# %%
from dslib.world import Problem  # a handmade problem for the checks

p_check = Problem((83, 29, 7), ("-", "+"))  # 83-29+07 = 61
aha_cases = {
    "guess wrong, fixed": ("59 wait 83-29=54 54+07=61</think> <answer> 61 </answer>", "guess"),
    "step wrong, fixed": ("83-29=56 wait 83-29=54 54+07=61</think> <answer> 61 </answer>", "step"),
    "in words": ("83 minus 29 is 56 wait 83 minus 29 is 54 54 plus 07 is 61</think> <answer> 61 </answer>", "step"),
    "guess right, checked": ("61 wait 83-29=54 54+07=61</think> <answer> 61 </answer>", None),
    "guess wrong, still wrong": ("59 wait 83-29=55 55+07=62</think> <answer> 62 </answer>", None),
    "guess wrong, no recompute": ("59 wait 61</think> <answer> 61 </answer>", None),
    "no wait": ("83-29=54 54+07=61</think> <answer> 61 </answer>", None),
    "bare": ("</think> <answer> 61 </answer>", None),
    "no answer": ("59 wait 83-29=54 54+07=61", None),
    "not text": (None, None),
}
aha_ok = True
for name, (text, kind) in aha_cases.items():
    found = find_aha(text, p_check)
    aha_ok &= (found.kind if found else None) == kind
    print(f"{name:<26} -> {found.kind + f' ({found.first} where {found.should_be} was right)' if found else None}")
print("every case as intended:", aha_ok)

# %% [markdown]
# All the measures in one function, so that every chapter from here on reports the same numbers the same way, and a
# sampler of fresh problems by number of operations (for accuracy by difficulty, including one operation more than
# anything the model was trained on).
# %%
#| export
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

# %% [markdown]
# Finally the run itself: R1-Zero's rewards, chapter 05's trainer, and an evaluation hooked to every checkpoint. The
# evaluation runs **after** the checkpoint is written, so a crash while measuring never costs training; and it is
# seeded by the step, so a resumed run measures exactly what an uninterrupted one would. `time_to_double` turns the
# training log into "the time to the aha": the first step at which the reflection rate has doubled.
# %%
#| export
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

# %% [markdown]
# ## 4. Epoch 0: what the base model already does
#
# Before any RL, the control that Dr. GRPO (section 2) and oat-zero ran on real base models: does the base model
# already reflect? We sample $k$ completions of each evaluation problem (held-out problems, never trained on) and
# measure everything at once. `SIZES` holds every size of this chapter, small and full.

# %%
SIZES = dslib.sized(
    small=dict(rl_steps=40, every=5, curve_problems=100, curve_k=4, final_problems=100, final_k=64,
               ops_problems=50, ops_k=4, steps_mix_rl=30),
    full=dict(rl_steps=300, every=10, curve_problems=400, curve_k=8, final_problems=400, final_k=64,
              ops_problems=200, ops_k=16, steps_mix_rl=200))
final_problems = world.heldout[:SIZES["final_problems"]]
curve_problems = world.heldout[:SIZES["curve_problems"]]
t0 = time.time()
base_samples = sample_k(base, world, final_problems, SIZES["final_k"], seed=1)
base_m = measure(base_samples)
K = SIZES["final_k"]


def show_measures(rows: dict[str, dict]) -> None:
    """One line per model: the chapter's measures side by side."""
    print(f"{'':<10}{'pass@1':>8}{f'cons@{K}':>9}{f'pass@{K}':>9}{'length':>8}{'refl/resp':>10}{'refl/prob':>10}"
          f"{'aha/resp':>9}{'format':>8}{'trunc':>7}")
    for name, m in rows.items():
        print(f"{name:<10}{m['pass@1']:>8.1%}{m['cons@k']:>9.1%}{m['pass@k']:>9.1%}{m['length']:>8.1f}"
              f"{m['reflection_response']:>10.1%}{m['reflection_problem']:>10.1%}{m['aha_response']:>9.1%}"
              f"{m['format']:>8.1%}{m['truncated']:>7.1%}")


print(f"{len(final_problems)} held-out problems x {K} samples at T = 1 ({time.time() - t0:.0f} s)")
show_measures({"base": base_m})
print("by style:", ", ".join(f"{s} {v['share']:.0%} of completions ({v['accuracy']:.0%} right)"
                             for s, v in base_m["by_style"].items()))

# %% [markdown]
# Read the two reflection columns together. Per response counts completions; per problem counts problems with at least
# one reflecting completion among their $k$ samples, so with $k = 64$ it comes close to 100% as soon as the model
# reflects at all on most problems. They answer different questions ("how often does it reflect?" against "can it
# reflect on this problem?"), and only the first can show RL's effect here. The `aha/resp` column is the share of
# completions that *correct* a wrong value after " wait " and end right. A base model can do this before a single RL
# step when its corpus holds "guess, wait, recompute" solutions whose guesses are mostly wrong (`WORLD.md`; chapter 00
# builds that corpus): the checks at the end assert that ours does. So the question for RL is not *whether* the
# behaviour appears but **how often and when**. The by-style line shows where the pressure will come from: compare the
# accuracy of the reflecting completions with that of the bare ones.

# %% [markdown]
# ## 5. R1-Zero: GRPO with rule rewards, checkpointed, measured as it goes
#
# `run_r1zero` is chapter 05's `GRPOTrainer` with R1-Zero's two rules, plus the measurement. Every `every` steps (and at
# step 0 and at the end) it writes a checkpoint (model, optimizer, RNG states, step, the log so far) into a folder
# under a temporary name and renames it, and only then samples the evaluation problems and measures: if an
# evaluation crashes, no training is lost, and `resume=True` continues from the latest checkpoint. The checkpoints stay
# on disk; the explorer in section 9 reads them.

# %%
RUNS = build_dir() / "runs" / "06"
shutil.rmtree(RUNS, ignore_errors=True)  # a fresh run each time the chapter runs
policy = copy.deepcopy(base)
t0 = time.time()
R1Z_CONFIG = GRPOConfig(steps=SIZES["rl_steps"], seed=0, log_kl=True)  # log_kl: plot the KL to the base (beta = 0)
r1z = run_r1zero(policy, world, R1Z_CONFIG, eval_problems=curve_problems,
                 eval_k=SIZES["curve_k"], checkpoint_dir=RUNS / "r1zero", checkpoint_every=SIZES["every"],
                 ref_model=base)
rl_seconds = time.time() - t0
hist, evals = r1z.history, r1z.evals
train_seconds = float(np.sum(hist["seconds"]))
print(f"{SIZES['rl_steps']} GRPO steps in {rl_seconds:.0f} s ({train_seconds:.0f} s training, "
      f"{train_seconds / SIZES['rl_steps']:.2f} s per step; the rest is {len(evals)} evaluations of "
      f"{SIZES['curve_problems']} x {SIZES['curve_k']} samples)")
print(f"checkpoints: {[p.name for _, p in r1z.checkpoints()]}")

# %% [markdown]
# Each checkpoint is a folder `step-NNNNNN/` with three files: `model.safetensors` (the weights), `config.json` (the
# model's config) and `trainer.safetensors` (Adam's moments, the random generators' states, and, as JSON metadata, the
# step, the config, the training log and the evaluations so far). Nothing is pickled, so loading one never runs code.
#
# **Resume gives the same numbers.** A checkpoint is only useful if continuing from it is indistinguishable from
# never having stopped. We load the checkpoint of step `every` into a fresh trainer, run the next steps, and compare
# their logged numbers with the uninterrupted run's.

# %%
check_model = copy.deepcopy(base)
resumed = GRPOTrainer(check_model, world, R1Z_CONFIG, ref_model=base)
resumed.resume(RUNS / "r1zero" / f"step-{SIZES['every']:06d}")
resumed.fit(steps=2, progress=False)
keys = [k for k in hist if k != "seconds"]
span = slice(SIZES["every"], SIZES["every"] + 2)
resume_diff = max(abs(a - b) for k in keys for a, b in zip(resumed.history[k][span], hist[k][span])
                  if not (np.isnan(a) and np.isnan(b)))
print(f"steps {SIZES['every'] + 1}-{SIZES['every'] + 2} after resuming: largest difference over {len(keys)} logged "
      f"numbers {resume_diff:.1e}")

# %% [markdown]
# **R1's Figures 2 and 3 in miniature.** Top row: what R1 plots, measured on held-out problems at each checkpoint
# (pass@1 over the samples, the majority vote, the mean response length) and the reflection rate, both per response
# and per problem. Bottom row: what the training batches say at every step (reward, the k3 KL to the base model,
# the entropy estimate, the share of groups whose rewards are all equal, and truncation).

# %%
def smooth(x, k=5):
    x = np.asarray(x, dtype=float)
    k = min(k, len(x))
    return np.arange(k, len(x) + 1), np.convolve(x, np.ones(k) / k, mode="valid")


ev_steps = [e["step"] for e in evals]
fig, axes = plt.subplots(2, 4, figsize=(15, 6.2))
ax = axes[0, 0]
ax.plot(ev_steps, [e["pass@1"] for e in evals], "o-", label="pass@1")
ax.plot(ev_steps, [e["cons@k"] for e in evals], "s--", label=f"cons@{SIZES['curve_k']}")
ax.set_title("held-out accuracy (R1 Figure 2)")
ax.legend(fontsize=8)
axes[0, 1].plot(ev_steps, [e["length"] for e in evals], "o-", color="C2")
axes[0, 1].set_title("mean response length, tokens (Figure 3)")
ax = axes[0, 2]
ax.plot(ev_steps, [e["reflection_response"] for e in evals], "o-", label="per response")
ax.plot(ev_steps, [e["reflection_problem"] for e in evals], "s--", label="per problem (any of k)")
ax.plot(ev_steps, [e["aha_response"] for e in evals], "^:", label="corrections per response")
ax.set_title("reflection (' wait ')")
ax.legend(fontsize=8)
ax = axes[0, 3]
for st in ("bare", "steps", "reflects"):
    ax.plot(ev_steps, [e["by_style"][st]["share"] for e in evals], "o-", label=st)
ax.set_title("share of each style")
ax.legend(fontsize=8)
for ax, key, title in zip(axes[1], ("reward", "kl", "entropy", "all_equal"),
                          ("training reward", "k3 KL to the base", "entropy (nats per token)",
                           "all-equal groups (line), truncated (x)")):
    ax.plot(hist["step"], hist[key], lw=0.7, alpha=0.5)
    ax.plot(*smooth(hist[key]), lw=2)
    ax.set_title(title, fontsize=10)
axes[1, 3].plot(hist["step"], hist["truncated"], "x", color="C3", ms=4)
for ax in axes.flat:
    ax.set_xlabel("GRPO step")
plt.suptitle("R1-Zero on the course's base model: held-out measures (top), training batches (bottom)")
plt.tight_layout()
plt.show()
aha_step, aha_seconds = time_to_double(hist["reflection"], hist["seconds"])
e0, e1 = evals[0], evals[-1]
print(f"held-out, step 0 -> {e1['step']}: pass@1 {e0['pass@1']:.1%} -> {e1['pass@1']:.1%}, length {e0['length']:.1f} "
      f"-> {e1['length']:.1f} tokens, reflection per response {e0['reflection_response']:.1%} -> "
      f"{e1['reflection_response']:.1%}")
print(f"time to the aha: the training batches' reflection rate (3-step mean) first doubles at step {aha_step}, after "
      f"{aha_seconds:.0f} s of RL" if aha_step else "the training batches' reflection rate never doubled in this run")
print(f"truncated completions: at most {max(hist['truncated']):.1%} of a training batch; all-equal groups: first 5 "
      f"steps {np.mean(hist['all_equal'][:5]):.0%}, last 5 steps {np.mean(hist['all_equal'][-5:]):.0%}")

# %% [markdown]
# **The time to the aha** is measured on the training batches, because they are logged at every step (the held-out
# evaluations come every few steps): the first step at which the 3-step moving average of the reflection rate reaches
# twice its value over the first three steps, and the seconds of RL until then. It is a property of this recipe on this
# base model, not a constant: a lower learning rate, or a corpus where the reflective route is rarer, moves it.
#
# In R1 these curves take thousands of steps on a 671B model; here a few dozen steps on 0.46M parameters. The shapes
# to look for: accuracy rises while the length rises with it (the model does not learn to answer faster; it learns to
# write the longer, checked route), the reflecting style takes over the batch, and the entropy falls as the policy
# commits to it. Two of chapter 05's warnings show up as numbers: as accuracy climbs, more groups score all-equal and
# stop contributing gradient; and truncation stays near zero here, because 64 new tokens are enough for the longest
# reflective solution of a held-out problem (if it were not, lengths would hit a wall and rewards would silently drop).

# %% [markdown]
# ## 6. The aha moment, and what RL changed about it
#
# The same evaluation as for the base model in section 4, on the R1-Zero model at the end of the run:

# %%
t0 = time.time()
r1z_samples = sample_k(policy, world, final_problems, K, seed=1)
r1z_m = measure(r1z_samples)
print(f"{len(final_problems)} held-out problems x {K} samples ({time.time() - t0:.0f} s)")
show_measures({"base": base_m, "R1-Zero": r1z_m})
pass1_gain = r1z_m["pass@1"] - base_m["pass@1"]
length_ratio = r1z_m["length"] / base_m["length"]
reflection_ratio = r1z_m["reflection_response"] / base_m["reflection_response"]
print(f"pass@1 {pass1_gain:+.1%} points; length x{length_ratio:.2f}; reflection per response x{reflection_ratio:.2f} "
      f"(per problem: {base_m['reflection_problem']:.0%} -> {r1z_m['reflection_problem']:.0%})")

# %% [markdown]
# Now the search. `find_aha` runs over every sampled completion of the trained model; we take the problem where the
# trained model corrects itself most often *and* the base model is usually wrong, and put its transcripts beside the
# base model's transcripts of the same problem. Reflection is highlighted in yellow; the answer is green when right and
# red when wrong.

# %%
def highlight(text: str, problem) -> str:
    """A completion as HTML: ' wait ' in yellow, the answer green (right) or red (wrong), a found aha underlined."""
    right = parse_answer(text) == problem.answer
    body = html.escape(text).replace(" wait ", ' <b style="background:#ffe680">wait</b> ')
    colour = "#c8f7c5" if right else "#f7c5c5"
    body = body.replace("&lt;answer&gt;", f'<span style="background:{colour}">&lt;answer&gt;', 1)
    body = body.replace("&lt;/answer&gt;", "&lt;/answer&gt;</span>", 1) if "&lt;answer&gt;" in body else body
    if find_aha(text, problem):
        body = f'<u title="a self-correction (find_aha)">{body}</u>'
    return f'<code style="white-space:pre">{body}</code>'


def side_by_side(problem, columns: dict[str, list[str]], n: int = 4) -> None:
    """Transcripts of one problem from several models, one column each."""
    head = "<tr>" + "".join(f"<th style='text-align:left'>{html.escape(name)}</th>" for name in columns) + "</tr>"
    rows = "".join("<tr>" + "".join(f"<td style='text-align:left'>{highlight(texts[i], problem)}</td>"
                                     for texts in columns.values()) + "</tr>" for i in range(n))
    display(HTML(f"<p><b>{html.escape(prompt(problem))}</b> (answer {problem.answer})</p><table>{head}{rows}</table>"))


aha_counts = [sum(find_aha(t, p) is not None for t in row) for row, p in zip(r1z_samples.texts, final_problems)]
# The most telling problem: where R1-Zero corrects itself often and the base model is usually wrong.
best = int(np.argmax(np.array(aha_counts) - base_samples.correct.sum(1)))
found = [find_aha(t, final_problems[best]) for t in r1z_samples.texts[best]]
example_aha = next(a for a in found if a is not None)
print(f"self-corrections found by code: {sum(aha_counts)} of {K * len(final_problems)} R1-Zero completions "
      f"({r1z_m['aha_response']:.0%}), {sum(c > 0 for c in aha_counts)} of {len(final_problems)} problems; "
      f"base model: {base_m['aha_response']:.0%} of completions")
print(f"problem {prompt(final_problems[best])!r}: the first one found wrote {example_aha.first} where "
      f"{example_aha.should_be} was right ({example_aha.kind}), then after ' wait ': {example_aha.after!r}")
order = sorted(range(K), key=lambda j: found[j] is None)  # corrections first
side_by_side(final_problems[best], {"base model (step 0)": base_samples.texts[best],
                                    f"R1-Zero (step {SIZES['rl_steps']})": [r1z_samples.texts[best][j] for j in order]})

# %% [markdown]
# **How often, and when.** The base model corrected itself too (section 4). What RL changed is the *rate*, and *where*
# it happens: below, the reflection rate per response by the number of operations in the problem, and the share of
# reflecting completions whose first value was wrong (where a " wait " does real work) before and after.

# %%
def reflection_by_ops(samples):
    ops = np.array([len(p.ops) for p in samples.problems])
    refl = np.array([[reflects(t) for t in row] for row in samples.texts])
    return {int(n): float(refl[ops == n].mean()) for n in sorted(set(ops.tolist()))}


def useful_share(samples):
    """Among reflecting completions: the share whose value before ' wait ' was wrong and which ended right."""
    pairs = [(t, p) for row, p in zip(samples.texts, samples.problems) for t in row if reflects(t)]
    return sum(find_aha(t, p) is not None for t, p in pairs) / max(1, len(pairs))


when = {name: reflection_by_ops(s) for name, s in (("base", base_samples), ("R1-Zero", r1z_samples))}
useful = {name: useful_share(s) for name, s in (("base", base_samples), ("R1-Zero", r1z_samples))}
for name in when:
    print(f"{name:<8} reflection by operations: " + ", ".join(f"{n} ops {v:.0%}" for n, v in when[name].items())
          + f"; reflecting completions that correct a wrong value: {useful[name]:.0%}")
rate_gain = r1z_m["reflection_response"] - base_m["reflection_response"]
print(f"the reflection rate moved by {rate_gain:+.0%} points; the share of reflections that correct something by "
      f"{useful['R1-Zero'] - useful['base']:+.0%} points: RL changed "
      + ("mostly how often the model reflects" if abs(rate_gain) > 2 * abs(useful["R1-Zero"] - useful["base"])
         else "how often and how usefully the model reflects, in comparable measure"))

# %% [markdown]
# Read the two lines against each other. If RL had taught the model *to* correct itself, the second number (the
# share of reflections that do real work) would carry the change; if RL taught the model to **choose** the route that
# ends in a careful recomputation, because that route earns the reward, the first number carries it. The printed
# verdict says which this run shows. Either way the behaviour was there at step 0: RL selected and amplified it, which
# is the aha moment in miniature, stated as far as the numbers allow.

# %% [markdown]
# ## 7. Where it comes from: the same recipe on another corpus
#
# If RL only selects, the corpus decides what it can select. The course caches a second base model, trained exactly
# like the first (same model, same steps, same seed) on a corpus where **plain step-by-step** solutions are common and
# the reflective style is rare (`dslib.pretrained.STEPS_RECIPE`; the pre-study's "12% guess-verify beside 27% careless
# plain steps", `WORLD.md`). We run the same R1-Zero recipe on it, measured on the same held-out problems with the same
# samples per checkpoint.

# %%
print(f"{'corpus share':<24}" + "".join(f"{s:>14}" for s in world.config.mix))
for name, mix in (("reflective mix (base)", world.config.mix), ("steps mix", STEPS_MIX)):
    print(f"{name:<24}" + "".join(f"{mix.get(s, 0):>14.0%}" for s in world.config.mix))
steps_world = base_world(STEPS_RECIPE)
same_heldout = [p.text for p in steps_world.heldout] == [p.text for p in world.heldout]
steps_base = base_model(seed=0, device=device, recipe=STEPS_RECIPE)
t0 = time.time()
steps_run = run_r1zero(copy.deepcopy(steps_base), steps_world,
                       GRPOConfig(steps=SIZES["steps_mix_rl"], seed=0), eval_problems=curve_problems,
                       eval_k=SIZES["curve_k"], checkpoint_every=SIZES["every"], ref_model=steps_base)
print(f"R1-Zero on the steps-mix base: {SIZES['steps_mix_rl']} steps in {time.time() - t0:.0f} s "
      f"(same held-out problems: {same_heldout})")
mix_runs = {"reflective mix": evals, "steps mix": steps_run.evals}
at = {name: next(e for e in ev if e["step"] == SIZES["steps_mix_rl"]) for name, ev in mix_runs.items()}
T = SIZES["steps_mix_rl"]
print(f"\n{'base corpus':<16}{'style':<10}{'share, step 0':>15}{'right, step 0':>15}{f'share, step {T}':>15}"
      f"{f'right, step {T}':>15}")
for name, ev in mix_runs.items():
    for st in ("bare", "steps", "reflects"):
        a, b = ev[0]["by_style"][st], at[name]["by_style"][st]
        print(f"{name:<16}{st:<10}{a['share']:>15.0%}{a['accuracy']:>15.0%}{b['share']:>15.0%}{b['accuracy']:>15.0%}")

# %%
fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
for name, ev in mix_runs.items():
    st = [e["step"] for e in ev]
    axes[0].plot(st, [e["reflection_response"] for e in ev], "o-", label=name)
    axes[1].plot(st, [e["by_style"]["steps"]["share"] for e in ev], "o-", label=name)
    axes[2].plot(st, [e["pass@1"] for e in ev], "o-", label=name)
    axes[3].plot(st, [e["length"] for e in ev], "o-", label=name)
for ax, title in zip(axes, ("reflection per response", "share of plain steps", "held-out pass@1",
                            "mean length (tokens)")):
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("GRPO step")
    ax.legend(fontsize=8)
plt.suptitle("The same R1-Zero recipe on two base models that differ only in their pretraining corpus")
plt.tight_layout()
plt.show()
mix_refl = {name: (ev[0]["reflection_response"], at[name]["reflection_response"]) for name, ev in mix_runs.items()}
mix_acc = {name: (ev[0]["pass@1"], at[name]["pass@1"]) for name, ev in mix_runs.items()}
mix_steps = {name: (ev[0]["by_style"]["steps"]["share"], at[name]["by_style"]["steps"]["share"])
             for name, ev in mix_runs.items()}
for name in mix_runs:
    (r0, r1), (a0, a1), (s0, s1) = mix_refl[name], mix_acc[name], mix_steps[name]
    print(f"{name}: after {T} steps, reflection {r0:.0%} -> {r1:.0%} ({'up' if r1 > r0 else 'down'}), plain steps "
          f"{s0:.0%} -> {s1:.0%}, pass@1 {a0:.0%} -> {a1:.0%}")

# %% [markdown]
# The accuracy-by-style table is the explanation. RL moves probability toward whichever style is **reliable for this
# model**, and the corpus decides which one that is. In the reflective mix, plain steps are rare and careless, while
# "guess, wait, recompute" ends in a careful full computation: that route is the reliable one, so RL amplifies it and
# the reflection rate climbs. In the steps mix, plain step-by-step is common, practised, and (compare its accuracy
# column) a reliable route of its own; whichever route is both reliable and already frequent gains, and the printed
# lines above say which routes grew in each. The pre-study (`WORLD.md`) saw reflection *fall* in a steps-heavy mix
# (10% to 3%); whether it falls within a few dozen steps here depends on the run (the reflective route is reliable in
# this mix too, only rare), and the ledger reports what this run did. Reflection, on its own, is not the objective:
# it is one route to the reward, and it takes over where the corpus made it the common reliable route. This is the
# miniature's version of Dr. GRPO's finding that "aha" behaviour is already present in base models and that RL
# amplifies what is there. Exercise 5 reruns the contrast with other seeds.

# %% [markdown]
# ## 8. What RL adds: pass@k and difficulty
#
# DeepSeekMath (section 5.2.2) found that RL raised Maj@K but not Pass@K: "RL enhances the model's overall performance
# by rendering the output distribution more robust", i.e. it boosts the right answers already in the top-K rather than
# adding new ability. The test: pass@k for $k = 1..64$ from the 64 samples per problem of sections 4 and 6. If RL only
# sharpens the distribution, the trained curve starts far above the base one and the base catches up as $k$ grows.

# %%
ks = [k for k in (1, 2, 4, 8, 16, 32, 64) if k <= K]
curves = {"base": pass_at_k_curve(base_samples.correct, ks), "R1-Zero": pass_at_k_curve(r1z_samples.correct, ks)}
truths = [p.answer for p in final_problems]
maj = {}  # Maj@k: the majority vote of each problem's first k samples
for name, smp in (("base", base_samples), ("R1-Zero", r1z_samples)):
    answers = smp.answers
    maj[name] = np.array([cons_at_k([row[:k] for row in answers], truths) for k in ks])
ops_levels = (1, 2, 3, 4)
max_train_ops = world.config.max_operands - 1
by_ops = {name: {} for name in ("base", "R1-Zero")}
for n_ops in ops_levels:
    problems = problems_with_ops(world, n_ops, SIZES["ops_problems"], seed=1)
    for name, model in (("base", base), ("R1-Zero", policy)):
        by_ops[name][n_ops] = measure(sample_k(model, world, problems, SIZES["ops_k"], seed=7))["pass@1"]
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for i, (name, c) in enumerate(curves.items()):
    axes[0].plot(ks, c, "o-", color=f"C{i}", label=f"{name}: pass@k")
    axes[0].plot(ks, maj[name], "s--", color=f"C{i}", label=f"{name}: Maj@k")
axes[0].set_xscale("log", base=2)
axes[0].set_xlabel("k (samples)")
axes[0].set_title("pass@k (unbiased) and Maj@k, held-out")
axes[0].legend()
width = 0.38
for i, name in enumerate(by_ops):
    axes[1].bar(np.array(ops_levels) + (i - 0.5) * width, [by_ops[name][n] for n in ops_levels], width, label=name)
axes[1].axvspan(max_train_ops + 0.5, max(ops_levels) + 0.5, color="#eeeeee", zorder=0)
axes[1].text(max(ops_levels), 0.95, "harder than\nany training", ha="center", va="top", fontsize=8)
axes[1].set_xticks(ops_levels)
axes[1].set_xlabel("operations in the problem")
axes[1].set_title("pass@1 by difficulty")
axes[1].set_ylim(0, 1)
axes[1].legend()
plt.tight_layout()
plt.show()
gap = curves["R1-Zero"] - curves["base"]
print("pass@k, base vs R1-Zero: " + ", ".join(f"k={k}: {a:.0%} vs {b:.0%}" for k, a, b in
                                              zip(ks, curves["base"], curves["R1-Zero"])))
maj_gap = maj["R1-Zero"] - maj["base"]
print(f"the pass@k gap shrinks from {gap[0]:+.0%} at k=1 to {gap[-1]:+.0%} at k={ks[-1]}")
print("Maj@k, base vs R1-Zero: " + ", ".join(f"k={k}: {a:.0%} vs {b:.0%}" for k, a, b in
                                             zip(ks, maj["base"], maj["R1-Zero"])))
maj_k = next(k for k in ks if k >= 4)  # a small voting budget, where majority voting is not yet saturated
maj_small = float(maj_gap[ks.index(maj_k)])
ops_gain = {n: by_ops["R1-Zero"][n] - by_ops["base"][n] for n in ops_levels}
print("pass@1 by operations, base -> R1-Zero: " + ", ".join(
    f"{n}: {by_ops['base'][n]:.0%} -> {by_ops['R1-Zero'][n]:.0%}" for n in ops_levels))
partly = [n for n in ops_levels if 0.15 <= by_ops["base"][n] <= 0.75]
print(f"largest gain at {max(ops_gain, key=ops_gain.get)} operations; levels where the base is partly competent "
      f"(15-75% pass@1): {partly}")

# %% [markdown]
# Three readings, all from the numbers above. The pass@k gap is the DeepSeekMath picture if it is large at $k = 1$ and
# closes at large $k$: sampling the base model many times finds nearly every answer that R1-Zero finds, so RL mostly
# moved probability onto answers the base could already produce. Maj@k is where the miniature can differ from the
# paper: with a small voting budget RL's sharper distribution wins the vote far more often, but when the base model's
# right answer is already its most common one (its reflective completions are reliable, its bare guesses scatter over
# many wrong values), a large vote recovers it without any RL. Read the dashed lines at small and at large $k$. And the
# difficulty bars show where RL helps: not where the base is already good (little headroom) nor where it is hopeless
# (nothing to amplify; the level right of the grey line is harder than anything in pretraining or RL), but in between,
# where the base succeeds sometimes.

# %% [markdown]
# ## 9. Explorer: one problem across the saved checkpoints
#
# Numbers summarise; transcripts show. The explorer puts the two together for any held-out problem and any saved step:
# watch the bare guesses thin out, the " wait " spread, and the answer turn green. Problems with three operations show
# the change most clearly, because there the bare guess is almost always wrong.
#
# The run left a checkpoint every few steps under `_build/runs/06/r1zero/`. Move the slider to load one and sample a
# problem eight times (the same random numbers at every checkpoint, so the changes you see are the model's). Reflection
# is yellow, the answer green or red, a self-correction underlined.

# %%
_loaded = {}


def model_at(step: int):
    """The policy saved at `step` (loaded once, then kept)."""
    if step not in _loaded:
        m = copy.deepcopy(base)
        GRPOTrainer(m, world, R1Z_CONFIG, ref_model=base).resume(
            RUNS / "r1zero" / f"step-{step:06d}")
        _loaded[step] = m
    return _loaded[step]


def show_checkpoint(step=SIZES["rl_steps"] // 2, problem=0, samples=8):
    step = int(round(step / SIZES["every"]) * SIZES["every"])
    p = final_problems[problem]
    s = sample_k(model_at(step), world, [p], samples, seed=99)
    m = measure(s)
    display(HTML(f"<p>checkpoint <b>step {step}</b>: {m['pass@1']:.0%} right, {m['reflection_response']:.0%} "
                 f"reflect, {m['aha_response']:.0%} correct a wrong value</p>"))
    side_by_side(p, {f"step {step}": s.texts[0]}, n=samples)


explore(show_checkpoint, step=(0, SIZES["rl_steps"], SIZES["every"]), problem=(0, len(final_problems) - 1, 1),
        samples=(2, 16, 2))

# %% [markdown]
# ## 10. Claims ledger
#
# The paper's claims next to what this chapter measured in this run. Targets for the miniature were set before the
# runs (`+25` points of pass@1, length at least 1.5x, reflection at least 2x per response); where one is missed, the
# row says by how much.

# %%
def missed(value: float, target: float, unit: str) -> str:
    return "" if value >= target else f"missed by {target - value:.2f}{unit}"


refl_up = mix_refl["reflective mix"][1] > mix_refl["reflective mix"][0] + 0.3
steps_win = mix_steps["steps mix"][1] > mix_steps["steps mix"][0] + 0.2
refl_gap = mix_refl["reflective mix"][1] - mix_refl["steps mix"][1]
steps_mix_change = mix_refl["steps mix"][1] - mix_refl["steps mix"][0]
ledger = Ledger("06")
ledger.add("RL alone, from a base model, raises pass@1",
           "AIME 2024 pass@1 15.6% -> 71.0% (R1, Figure 2 and Table 2)",
           f"held-out pass@1 ({K} samples) {base_m['pass@1']:.1%} -> {r1z_m['pass@1']:.1%} ({pass1_gain * 100:+.1f} "
           f"points) in {SIZES['rl_steps']} steps; target +25", bool(pass1_gain >= 0.25),
           missed(pass1_gain * 100, 25, " points") or "a 0.46M-parameter model on synthetic arithmetic")
ledger.add("Responses grow longer under RL", "average length grows steadily with RL steps (R1, Figure 3)",
           f"mean length {base_m['length']:.1f} -> {r1z_m['length']:.1f} tokens (x{length_ratio:.2f}); target x1.5",
           bool(length_ratio >= 1.5), missed(length_ratio, 1.5, "x") or
           (f"truncation {r1z_m['truncated']:.1%}: the length limit did not cap the growth" if r1z_m["truncated"] < 0.01
            else f"truncation {r1z_m['truncated']:.1%}: the length limit may cap the growth"))
ledger.add("Reflection emerges: the 'aha moment'",
           "'the model learns to rethink ... an aha moment' (R1, section 2.2.4, Table 3)",
           f"' wait ' per response {base_m['reflection_response']:.0%} -> {r1z_m['reflection_response']:.0%} "
           f"(x{reflection_ratio:.2f}; per problem {base_m['reflection_problem']:.0%} -> "
           f"{r1z_m['reflection_problem']:.0%}); self-corrections found by code {base_m['aha_response']:.0%} -> "
           f"{r1z_m['aha_response']:.0%} of responses; target x2 per response", bool(reflection_ratio >= 2),
           (missed(reflection_ratio, 2, "x") + "; " if reflection_ratio < 2 else "") +
           ("not emergent here: the base model already reflects and corrects itself (section 4)"
            if base_m["aha_response"] > 0.05 else "the base model barely corrected itself: closer to emergence"))
ledger.add("Base models already reflect before RL", "DeepSeek-V3-Base already says 'aha'/'wait' (Dr. GRPO, section 2)",
           f"step 0: {base_m['reflection_response']:.0%} of responses reflect, {base_m['aha_response']:.0%} correct a "
           f"wrong value", bool(base_m["aha_response"] > 0.05))
ledger.add(f"Majority voting beats pass@1", "AIME cons@64 86.7% vs pass@1 71.0% (R1, Table 2)",
           f"cons@{K} {r1z_m['cons@k']:.1%} vs pass@1 {r1z_m['pass@1']:.1%} (base: {base_m['cons@k']:.1%} vs "
           f"{base_m['pass@1']:.1%})", bool(r1z_m["cons@k"] > r1z_m["pass@1"]))
ledger.add("RL does not improve Pass@K at large K", "DeepSeekMath, section 5.2.2 and Figure 7",
           f"pass@1 gap {gap[0] * 100:+.0f} points, pass@{ks[-1]} gap {gap[-1] * 100:+.0f} points",
           bool(gap[-1] < 0.05 and gap[0] > 0.2), "at large k the base catches up: RL sharpened the distribution")
ledger.add("RL improves Maj@K", "DeepSeekMath, section 5.2.2 and Figure 7 (Maj@K up after RL)",
           f"Maj@{maj_k} {maj['base'][ks.index(maj_k)]:.0%} -> {maj['R1-Zero'][ks.index(maj_k)]:.0%}; Maj@{ks[-1]} "
           f"{maj['base'][-1]:.0%} -> {maj['R1-Zero'][-1]:.0%}", bool(maj_small > 0.05 and maj_gap[-1] > 0.02),
           "" if maj_gap[-1] > 0.02 else f"holds at small K only: at K={ks[-1]} the base's majority answer is already "
           f"right on {maj['base'][-1]:.0%} of problems (gap {maj_gap[-1] * 100:+.0f} points)")
ledger.add("RL amplifies the route the corpus made common and reliable",
           "RL amplifies behaviour the base already has (Dr. GRPO; the pre-study's two mixes, WORLD.md)",
           f"after {T} steps: reflective mix, reflection {mix_refl['reflective mix'][0]:.0%} -> "
           f"{mix_refl['reflective mix'][1]:.0%}; steps mix, plain steps {mix_steps['steps mix'][0]:.0%} -> "
           f"{mix_steps['steps mix'][1]:.0%} and reflection {mix_refl['steps mix'][1]:.0%} "
           f"({refl_gap * 100:.0f} points below the reflective mix)", bool(refl_up and steps_win and refl_gap > 0.3))
ledger.add("In a steps-heavy mix, reflection falls under RL", "pre-study: wait rate 10% -> 3% (WORLD.md)",
           f"steps mix, reflection {mix_refl['steps mix'][0]:.0%} -> {mix_refl['steps mix'][1]:.0%} in {T} steps",
           bool(steps_mix_change < 0),
           "" if steps_mix_change < 0 else f"it rose by {steps_mix_change * 100:.0f} points in this run: the "
           "reflective route is reliable in this mix too, only rare, and plain steps took the batch instead")
ledger.show()
saved_to = ledger.save()

# %% [markdown]
# How to read the rows. "holds" compares the *direction* of a paper's claim with our measurement, never the size: a
# 0.46M-parameter model on two-digit arithmetic is not AIME, and its numbers are not comparable with the paper's. The
# notes carry what the yes or no hides. The reflection row holds by its target and yet the note says "not emergent":
# both are true, and the difference is the point of sections 4 and 7. `python -m dslib.book ledger` prints this table
# next to every other chapter's.

# %% [markdown]
# ## What this chapter measured
#
# R1-Zero is GRPO with two rules and no supervised start. On the course's 0.46M-parameter base model it lifts held-out
# accuracy within the short run of section 5, lengthens answers and drives the reflective style through the batch: the
# miniature of R1's Figures 2 and 3. Looked at honestly, the "aha" was already in the base model: it reflected and
# corrected itself at step 0 because its corpus contained that route and the route was reliable. RL changed how often
# the model takes it; on a corpus where plain steps are the common reliable route, the same recipe makes plain steps
# take over instead, and reflection stays far below. And RL sharpened rather than extended: the base model, sampled
# often enough, finds most of what the trained one finds. Each of these sentences is asserted in the checks below, so a
# run where one fails does not pass. The figures, as measured in this run:

# %%
closing = {
    "pass@k estimator vs brute force, max error": f"{passk_error:.1e}",
    f"base: pass@1 / cons@{K} / pass@{K}": f"{base_m['pass@1']:.1%} / {base_m['cons@k']:.1%} / {base_m['pass@k']:.1%}",
    f"R1-Zero ({SIZES['rl_steps']} steps): pass@1 / cons@{K} / pass@{K}":
        f"{r1z_m['pass@1']:.1%} / {r1z_m['cons@k']:.1%} / {r1z_m['pass@k']:.1%}",
    "mean length, base -> R1-Zero (tokens)": f"{base_m['length']:.1f} -> {r1z_m['length']:.1f} (x{length_ratio:.2f})",
    "reflection per response, base -> R1-Zero": f"{base_m['reflection_response']:.1%} -> "
                                                f"{r1z_m['reflection_response']:.1%} (x{reflection_ratio:.2f})",
    "reflection per problem (any of k), base -> R1-Zero": f"{base_m['reflection_problem']:.1%} -> "
                                                          f"{r1z_m['reflection_problem']:.1%}",
    "self-corrections per response, base -> R1-Zero": f"{base_m['aha_response']:.1%} -> {r1z_m['aha_response']:.1%}",
    "time to the aha (training reflection doubles)": f"step {aha_step}, {aha_seconds:.0f} s" if aha_step else "never",
    "seconds per GRPO step": f"{train_seconds / SIZES['rl_steps']:.2f}",
    "resume: largest difference in the logged numbers": f"{resume_diff:.1e}",
    f"steps mix, reflection / plain steps, step 0 -> {T}":
        f"{mix_refl['steps mix'][0]:.0%} -> {mix_refl['steps mix'][1]:.0%} / "
        f"{mix_steps['steps mix'][0]:.0%} -> {mix_steps['steps mix'][1]:.0%}",
    "pass@1 by operations, base -> R1-Zero": ", ".join(f"{n}: {by_ops['base'][n]:.0%} -> {by_ops['R1-Zero'][n]:.0%}"
                                                       for n in ops_levels),
}
for k, v in closing.items():
    print(f"{k:<52} {v}")

# %% [markdown]
# **Next.** R1-Zero's reasoning works but is hard to read, and with two surface languages it drifts between them.
# Chapter 07 builds DeepSeek-R1's four stages (cold start, reasoning RL with a language-consistency reward, rejection
# sampling, RL for all scenarios) from `dslib.pretrained.r1zero_model()`, this chapter's recipe run for 100 steps and
# cached like the base model.
#
# ## Exercises
#
# Difficulty: ★ (a few minutes), ★★ (an experiment), ★★★ (a small project).
#
# 1. ★ **Per response or per problem?** With the base model's reflection rate per response $r$, and if reflection
#    were independent across samples, what reflection rate per problem would $k = 64$ samples give? Compare with the
#    measured number.
#
#    <details><summary>Hint</summary>A problem has no reflecting sample with probability $(1-r)^k$.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    independent = 1 - (1 - base_m["reflection_response"]) ** K
#    print(f"if independent: {independent:.4f}; measured per problem: {base_m['reflection_problem']:.4f}")
#    ```
#    For $r = 0.3$ and $k = 64$ it is $1 - 0.7^{64}$, within $10^{-9}$ of 1. The two numbers measure different
#    things; a per-problem rate near 100% says almost nothing about how often the model reflects. A measured rate below the
#    formula's means problems differ (the model reflects more on some than on others): its samples are independent
#    within a problem, not identically distributed across problems.
#    </details>
#
# 2. ★★ **A longer leash.** Lower `max_new_tokens` to 24 in the `GRPOConfig` of section 5 and rerun. Plot the
#    truncation rate and the held-out pass@1.
#
#    <details><summary>Hint</summary>The reflective route on a 3-operation problem is about 30 tokens.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    short = run_r1zero(copy.deepcopy(base), world, GRPOConfig(steps=20, max_new_tokens=24, seed=0),
#                       eval_problems=curve_problems, eval_k=4, checkpoint_every=5, ref_model=base)
#    print([round(x, 2) for x in short.history["truncated"]], [round(e["pass@1"], 2) for e in short.evals])
#    ```
#    Truncated completions score no accuracy, so the long route stops paying on the longer problems: reflection can
#    no longer win there, and the run settles on shorter styles. This is why R1 and DAPO watch the length limit
#    (DAPO's overlong filtering).
#    </details>
#
# 3. ★★ **Reward only the answer.** Set the format weight to 0 (`Rewards(parts={"accuracy": (accuracy_reward,
#    1.0)})`, passed to `GRPOTrainer`) and compare the format rate and pass@1 after 30 steps with this chapter's run.
#
#    <details><summary>Hint</summary>Look at `measure(...)["format"]` of the base model first.</details>
#    <details><summary>Solution</summary>
#
#    If the base model already writes the format in nearly every completion (the format column of section 4), the
#    format reward is almost constant inside a group and gives almost no advantage, so removing it changes little. It matters when a base
#    model does not know the format yet, as R1-Zero's template had to teach V3-Base.
#    </details>
#
# 4. ★★★ **Dynamic sampling against the stall.** The share of all-equal groups grows as accuracy rises (section
#    5). Subclass `GRPOTrainer` so that `problems(step)` over-samples and `train_step` keeps only groups with mixed
#    rewards (DAPO, section 3.2). Does the held-out pass@1 keep rising after step 30?
#
#    <details><summary>Hint</summary>Roll out 2x the prompts, score them, keep the first 32 groups whose rewards are
#    not all equal, and compute the loss on those rows only.</details>
#    <details><summary>Solution</summary>
#
#    Override `train_step`: call `self.rollout` on twice the problems, compute `group_advantages`, select the rows of
#    groups with `rewards.view(-1, G).std(-1) > 0`, and build a smaller `Rollout` from those rows (index every field)
#    before `rollout_logprobs` and `grpo_loss`. The rollouts cost twice as much, but every group now carries gradient;
#    per second, the gain is largest late in training, when most groups are all-equal.
#    </details>
#
# 5. ★★ **Seeds.** Rerun section 7 with `GRPOConfig(steps=SIZES["steps_mix_rl"], seed=1)` and `seed=2`, and plot
#    the reflection rate and the share of plain steps of each run beside this chapter's.
#
#    <details><summary>Hint</summary>Only the GRPO seed changes: the problems of each step and the sampling noise;
#    the base model is the same.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    for seed in (1, 2):
#        run = run_r1zero(copy.deepcopy(steps_base), steps_world, GRPOConfig(steps=SIZES["steps_mix_rl"], seed=seed),
#                         eval_problems=curve_problems, eval_k=SIZES["curve_k"], checkpoint_every=SIZES["every"],
#                         ref_model=steps_base)
#        print(seed, [(e["step"], round(e["reflection_response"], 2), round(e["by_style"]["steps"]["share"], 2))
#                     for e in run.evals])
#    ```
#    Compare the runs: if the share of plain steps grows in each while the reflection rate moves by a few points in
#    either direction, then in this mix both routes are reliable and which one gains early is decided by frequency and
#    noise; the robust claim is the contrast with the reflective mix, where reflection takes over the batch. One seed
#    is an anecdote: the chapter's checks assert only what holds with margin.
#    </details>
#
# ## Checks
#
# The chapter's key measurements, asserted (this is what the test suite checks). Each fails when the effect it guards
# is absent.

# %%
assert passk_error < 1e-9 and cons_ok and aha_ok
assert resume_diff == 0.0, resume_diff  # resuming continues to identical numbers
assert len(r1z.checkpoints()) == len(evals) == SIZES["rl_steps"] // SIZES["every"] + 1
# R1-Zero's three effects, with margin (the pre-study's seeds: +30 to +50 points, x1.7-1.9 length, x3 reflection).
assert pass1_gain > 0.25, (base_m["pass@1"], r1z_m["pass@1"])
assert length_ratio > 1.4 and reflection_ratio > 2, (length_ratio, reflection_ratio)
assert base_m["aha_response"] > 0.05  # the base model already corrects itself (the epoch-0 control)
assert r1z_m["cons@k"] > r1z_m["pass@1"] and base_m["cons@k"] > base_m["pass@1"]
assert gap[0] > 0.2 and gap[-1] < gap[0] / 2, gap  # RL sharpens: the base catches up at large k
assert maj_small > 0.2, maj  # a small vote gains from RL
assert refl_up and steps_win and refl_gap > 0.3  # the corpus decides which route RL amplifies
assert mix_acc["steps mix"][1] > mix_acc["steps mix"][0] + 0.15  # and accuracy rises either way
assert base_m["by_style"]["reflects"]["accuracy"] > base_m["by_style"]["bare"]["accuracy"] + 0.3  # the reliable route
assert same_heldout and max(hist["truncated"]) < 0.05
print(f"chapter 06 checks passed; {time.time() - CHAPTER_START:.0f} s since set-up")

# %% [markdown]
# The worked solution that takes seconds runs here as well, so that the test suite checks it with the chapter:
# exercise 1. The others run GRPO or are proofs, and are left to the reader.

# %%
solution_seconds = run_solutions("06", globals(), (1,))
print("worked solutions run:", ", ".join(f"exercise {n} ({t:.1f} s)" for n, t in solution_seconds.items()))
