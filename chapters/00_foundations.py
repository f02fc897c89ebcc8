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
# # Chapter 00 · The DeepSeek family, the arithmetic world, and a DeepSeek LLM transformer
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/deepseek-from-scratch/deepseek-from-scratch/blob/main/chapters/00_foundations.ipynb)
# [![Binder](https://mybinder.org/badge_logo.svg)](https://mybinder.org/v2/gh/deepseek-from-scratch/deepseek-from-scratch/main?labpath=chapters%2F00_foundations.ipynb)
#
# **What you will build.** Everything that the later chapters stand on:
#
# 1. a map of the DeepSeek papers and their published results (section 1);
# 2. `dslib.world`, a synthetic arithmetic world with verifiable answers, written in DeepSeek-R1-Zero's
#    `<think> … </think> <answer> … </answer>` format, whose pretraining corpus mixes several solution styles, slips and
#    reflections: the raw material of R1-Zero's "aha moment" in chapter 06 (section 2);
# 3. `dslib.transformer`, the DeepSeek LLM architecture (pre-norm RMSNorm, RoPE, SwiGLU, grouped-query attention)
#    with a KV cache (section 3);
# 4. `dslib.train`, a trainer with DeepSeek LLM's multi-step learning-rate schedule, atomic checkpoints and exact
#    resume (section 4);
# 5. a base model of about 1M parameters pretrained on the world, and its held-out accuracy (section 5).
#
# **Papers.** DeepSeek LLM (arXiv 2401.02954), section 2 (architecture, hyperparameters, the multi-step schedule);
# DeepSeek-R1 (arXiv 2501.12948), section 2.2 (the R1-Zero template and rule-based rewards).
#
# Cells that start with `#| export` are saved into `dslib` by `python -m dslib.book export`; later chapters import them.

# %%
# Set-up. Where dslib is missing (as on Colab), fetch the course from its repository and install dslib from it; the
# chapters also read small data files from its assets/ folder.
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

REPOSITORY = "https://github.com/deepseek-from-scratch/deepseek-from-scratch"
if importlib.util.find_spec("dslib") is None:
    clone = Path.home() / "deepseek-from-scratch"
    if not clone.exists():
        subprocess.run(["git", "clone", "--depth", "1", REPOSITORY, str(clone)], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(clone)], check=True)
    sys.path.insert(0, str(clone))
    os.chdir(clone / "chapters")

import time

import matplotlib.pyplot as plt
import numpy as np
import torch

import dslib
from dslib.book import Ledger
from dslib.explore import explore

device = dslib.setup(seed=0)
SCALE = dslib.scale()
CHAPTER_START = time.time()

# %% [markdown]
# ## 1. The DeepSeek family
#
# DeepSeek-AI published ten papers between January 2024 and January 2025. Taken together they describe a complete,
# openly documented recipe for a frontier language model: how to size it, how to make it sparse, how to shrink its
# memory, how to train it cheaply, and how to teach it to reason. This course rebuilds the core ideas in miniature.
# The models are small enough to train on an ordinary CPU in minutes, but they use the same equations as the papers.
#
# The papers fall into four lines.
#
# **Base models.** These are the pre-trained language models that everything else starts from.
# - *DeepSeek LLM* (arXiv 2401.02954) fits scaling laws for the learning rate and batch size, and for how to split a
#   compute budget between model size and data. It replaces the cosine learning-rate schedule with a multi-step
#   schedule, whose first stage can be reused when training continues. The models are dense 7B and 67B transformers
#   trained on 2T tokens.
# - *DeepSeekMoE* (arXiv 2401.06066) cuts each expert into many small *fine-grained* experts. It adds *shared* experts
#   that every token uses, which frees the routed experts to specialise.
# - *DeepSeek-V2* (arXiv 2405.04434) introduces Multi-head Latent Attention (MLA). MLA caches one small latent vector
#   per token instead of full keys and values. V2 also routes each token to a limited number of devices. Against
#   DeepSeek 67B it reports 42.5% lower training cost and a 93.3% smaller KV cache, with 236B parameters of which 21B
#   are active per token.
# - *DeepSeek-V3* (arXiv 2412.19437) scales the design to 671B parameters (37B active) and 14.8T tokens. It balances
#   the experts without an auxiliary loss, adds a multi-token prediction (MTP) objective and trains in FP8.
#
# **Reasoning.**
# - *DeepSeekMath* (arXiv 2402.03300) introduces Group Relative Policy Optimization (GRPO). GRPO is PPO without the
#   value network: the baseline for an answer is the mean reward of a group of answers sampled for the same question.
# - *DeepSeek-R1* (arXiv 2501.12948) applies GRPO at scale to DeepSeek-V3-Base.
#
# **Code and multimodal.** DeepSeek-Coder (arXiv 2401.14196), DeepSeek-Coder-V2 (arXiv 2406.11931), DeepSeek-VL
# (arXiv 2403.05525) and DeepSeek-VL2 (arXiv 2412.10302) apply the same base models to code and images. The course
# does not rebuild them.
#
# *A note on dates.* The result tables in `assets/` were transcribed from a survey slide deck that reproduces them.
# That deck dates DeepSeek-V2 to January 2024. The paper's arXiv id, 2405.04434, says May 2024, because an arXiv id
# begins with the year and month of submission. Every date below is read off the arXiv id.

# %% [markdown]
# Two small helpers read the tables. `asset(name)` finds the course's `assets/` folder from wherever the notebook runs.
# `read_table(path)` returns the header and one dictionary per row, with numbers already converted to `float`.

# %%
import csv
import re
from datetime import date
from pathlib import Path

import matplotlib.pyplot as plt


def asset(name):
    """Path of `name` in the course's assets/ folder: walk up from the cwd to the folder holding book.toml."""
    here = Path.cwd().resolve()
    for folder in (here, *here.parents):
        if (folder / "book.toml").exists():
            return folder / "assets" / name
    return Path("..") / "assets" / name


# %%
def read_table(path, text_columns=()):
    """Read a CSV file into (header, rows): each row a dict, numbers as float, empty cells as None.
    Columns named in `text_columns` stay strings (an arXiv id such as 2401.06066 is a name, not a number)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = []
        for record in reader:
            row = {}
            for column, cell in zip(header, record):
                if cell == "":
                    row[column] = None
                elif column in text_columns:
                    row[column] = cell
                else:
                    try:
                        row[column] = float(cell)
                    except ValueError:
                        row[column] = cell
            rows.append(row)
    return header, rows


# %%
_, papers = read_table(asset("deepseek_papers.csv"), text_columns={"arxiv", "chapter", "year_month"})
for p in papers:
    print(f"{p['year_month']}  {p['key']:<18} arXiv {p['arxiv']}  {p['line']:<10}  {p['introduced']}")

# %% [markdown]
# The timeline puts each paper on its own line of work, marked with the chapter of this course that rebuilds it. The
# base line builds up step by step: dense models, then sparse experts, then cheaper attention, then cheaper training.
# The reasoning line takes GRPO from DeepSeekMath and, a year later, runs it on top of V3.

# %%
LINE_COLOURS = {"base": "tab:blue", "reasoning": "tab:red", "code": "tab:green", "multimodal": "tab:purple"}
LANES = list(LINE_COLOURS)

fig, ax = plt.subplots(figsize=(10, 3.5))
stacked = {}  # papers that share a lane and a month are stacked a little apart
for p in papers:
    year, month = map(int, p["year_month"].split("-"))
    when, lane = date(year, month, 15), LANES.index(p["line"])
    k = stacked.get((lane, when), 0)
    stacked[(lane, when)] = k + 1
    y = lane - 0.3 * k
    ax.scatter(when, y, s=60, color=LINE_COLOURS[p["line"]], zorder=3)
    where = "ch " + p["chapter"].replace(";", " & ") if p["chapter"] else "not rebuilt"
    ax.annotate(f"{p['key']} ({where})", (when, y), xytext=(7, 0), textcoords="offset points",
                va="center", fontsize=8)
ax.set_yticks(range(len(LANES)), LANES)
ax.set_ylim(-0.6, len(LANES) - 0.4)
ax.set_xlim(date(2023, 12, 1), date(2025, 5, 1))
ax.grid(axis="x", alpha=0.3)
ax.set_xlabel("arXiv submission month (marker at mid-month)")
ax.set_title("The DeepSeek papers by line of work, with the course chapter that rebuilds each")
fig.tight_layout()
plt.show()

# %% [markdown]
# ### Why R1 mattered
#
# Two results made this family famous well beyond the research community.
#
# **Reasoning can grow out of reinforcement learning alone.** DeepSeek-R1-Zero starts from DeepSeek-V3-Base and is
# trained only with GRPO. There is no supervised fine-tuning and no learned reward model. The rewards are two simple
# rules: is the final answer correct, and is the reasoning written inside `<think>` tags? During training its AIME 2024
# pass@1 rose from 15.6% to 71.0% (86.7% with a majority vote over 64 samples), on a par with OpenAI-o1-0912. Its
# answers grew longer without being told to, and it learned to stop and re-check its own work, which the paper calls
# the "aha moment". R1-Zero was hard to read and mixed languages, so DeepSeek-R1 adds four stages:
# 1. a small cold-start SFT;
# 2. reasoning RL with a language-consistency reward;
# 3. rejection sampling and a second SFT;
# 4. a final round of RL.
#
# The paper reports R1 as comparable to OpenAI-o1-1217 on reasoning tasks. Chapters 05-07 rebuild GRPO, the aha
# moment and this pipeline.
#
# **Frontier quality does not need a frontier budget.** V3, R1's base model, reports 2.788M H800 GPU-hours for its full
# training run on a cluster of 2,048 H800 GPUs. That count leaves out earlier research and ablations. The low cost rests
# on the ideas above: sparse experts (37B of 671B parameters active per token), MLA's small cache, and FP8 arithmetic.
#
# The chart shows the R1 paper's Table 4 on the maths and code rows, plus GPQA Diamond (graduate-level science
# questions). Every score is a percentage, and Codeforces is shown as a percentile.

# %%
header, frontier = read_table(asset("r1_vs_frontier.csv"))
models = header[3:]  # the model columns, in the order the paper prints them
wanted = [("AIME 2024", "Pass@1"), ("MATH-500", "Pass@1"), ("Codeforces", "Percentile"),
          ("LiveCodeBench", "Pass@1-COT"), ("GPQA Diamond", "Pass@1")]
rows = [next(r for r in frontier if (r["benchmark"], r["metric"]) == w) for w in wanted]
colours = {"Claude-3.5-Sonnet-1022": "#c7c7c7", "GPT-4o-0513": "#8c8c8c", "DeepSeek-V3": "#9ecae1",
           "OpenAI-o1-mini": "#fdd0a2", "OpenAI-o1-1217": "#e6550d", "DeepSeek-R1": "#08519c"}

fig, ax = plt.subplots(figsize=(10, 3.5))
width = 0.8 / len(models)
for j, model in enumerate(models):
    xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(rows))]
    ys = [r[model] if r[model] is not None else float("nan") for r in rows]  # nan: no bar
    ax.bar(xs, ys, width, label=model, color=colours[model])
ax.set_xticks(range(len(rows)), [f"{b}\n({m})" for b, m in wanted])
ax.set_ylabel("score (%)")
ax.set_ylim(0, 100)
ax.grid(axis="y", alpha=0.3)
ax.set_title("DeepSeek-R1 against other models on maths, code and science (R1 paper, Table 4)")
ax.legend(fontsize=8, bbox_to_anchor=(1.01, 1), loc="upper left")
fig.tight_layout()
plt.show()

# %% [markdown]
# ### Distillation: small models learn from R1's reasoning
#
# The R1 paper also fine-tunes open Qwen and Llama models, from 1.5B to 70B parameters, on about 800k samples
# written by R1. This is plain SFT, with no RL. The chart plots the R1 paper's Table 5 against model size. The dashed
# lines are the comparison models from that table, and the solid black line is R1 itself, the teacher (from Table 4).
# Even the 1.5B student beats GPT-4o-0513 on both benchmarks. From 14B upward the students beat OpenAI-o1-mini on
# AIME, and the 32B student beats QwQ-32B-Preview, a reasoning model of the same size. Chapter 07 rebuilds this step.

# %%
_, distilled = read_table(asset("r1_distilled.csv"))
teacher = {r["benchmark"]: r["DeepSeek-R1"] for r in frontier if r["metric"] == "Pass@1"}


def size_in_billions(name):
    """Parameter count read from a model name: 'DeepSeek-R1-Distill-Qwen-1.5B' -> 1.5."""
    return float(re.search(r"-(\d+(?:\.\d+)?)B\b", name).group(1))


students = [r for r in distilled if r["kind"] == "distilled"]
references = [r for r in distilled if r["kind"] == "reference"]
for r in students:
    print(f"{r['model']:<32} {size_in_billions(r['model']):>5g}B  AIME {r['aime2024_pass1']:.1f}  "
          f"MATH-500 {r['math500_pass1']:.1f}")

# %%
ref_colours = dict(zip([r["model"] for r in references], ["tab:gray", "tab:purple", "tab:orange", "tab:olive"]))
panels = [("aime2024_pass1", "AIME 2024", "AIME 2024 pass@1 (%)"), ("math500_pass1", "MATH-500", "MATH-500 pass@1 (%)")]
sizes = sorted({size_in_billions(r["model"]) for r in students})
size_labels = [f"{s:g}B" if i % 2 == 0 else f"\n{s:g}B" for i, s in enumerate(sizes)]  # two rows: 7B and 8B are close

fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
for ax, (column, benchmark, label) in zip(axes, panels):
    for family, marker in [("Qwen", "o"), ("Llama", "s")]:
        pts = sorted((size_in_billions(r["model"]), r[column]) for r in students if f"-{family}-" in r["model"])
        ax.plot(*zip(*pts), marker=marker, color="tab:blue" if family == "Qwen" else "tab:green",
                label=f"R1-Distill-{family}")
    for r in references:
        ax.axhline(r[column], ls="--", lw=1, color=ref_colours[r["model"]], label=r["model"])
    ax.axhline(teacher[benchmark], color="black", lw=1.5, label="DeepSeek-R1 (teacher)")
    ax.set_xscale("log")
    ax.set_xticks(sizes, size_labels)
    ax.minorticks_off()
    ax.set_xlabel("student size (parameters, log scale)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
handles, labels = axes[0].get_legend_handles_labels()
fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(0.8, 0.5))
fig.suptitle("Models distilled from DeepSeek-R1, against model size (R1 paper, Table 5)")
fig.tight_layout(rect=(0, 0, 0.8, 1))
plt.show()

# %% [markdown]
# ### The course map
#
# Each chapter rebuilds one idea from the list above, in the order in which the papers build on each other.

# %%
COURSE = [
    ("00", "the family, the arithmetic world, a DeepSeek LLM transformer"),
    ("01", "scaling laws"),
    ("02", "Mixture-of-Experts (with V2/V3 load balancing)"),
    ("03", "Multi-head Latent Attention (MLA)"),
    ("04", "multi-token prediction and a V3-mini"),
    ("05", "GRPO"),
    ("06", "R1-Zero's aha moment and the R1 pipeline"),
    ("07", "distillation"),
    ("08", "capstone"),
]
FALLBACK = {"00": "the whole family (overview)", "08": "all of the above"}
width = max(len(topic) for _, topic in COURSE) + 2
print(f"{'ch':<4}{'topic':<{width}}papers")
for number, topic in COURSE:
    rebuilt = [f"{p['key']} ({p['arxiv']})" for p in papers if number in (p["chapter"] or "").split(";")]
    print(f"{number:<4}{topic:<{width}}{', '.join(rebuilt) or FALLBACK.get(number, '-')}")

# %% [markdown]
# ## 2. The arithmetic world
#
# DeepSeek-R1-Zero was trained on problems whose answers a rule can check (maths with a final answer, code with tests).
# Our miniature needs the same: problems that a ~1M-parameter model can partly learn in a minute on a CPU, answers that a
# few lines of code verify, and a pretraining corpus that already contains, rarely and unreliably, the behaviours that
# reinforcement learning will later amplify: writing out steps, slipping, and stopping to say "wait" and recheck.
#
# The design follows a pre-study, measured before the course was written, of what such a world needs:
#
# - **Problems** are chains of 2-4 numbers joined by `+` and `-` (1-3 operations), every number and every intermediate
#   result in 0..99, written zero-padded (`07+35-12`). Zero-padding matters: with unpadded numbers a bare answer was as
#   good as step-by-step work, and nothing grew under RL.
# - **Held-out problems** (400, with 3-4 numbers) are fixed by their own seed, so every chapter evaluates on the same
#   problems, and none of them ever appears in the corpus.
# - **Solution styles** in the corpus: a bare answer (58%), plain steps (8%, a fifth of them with an uncorrected slip),
#   guess-then-verify (26%: a quick guess, right 30% of the time, then " wait " and the full computation), slip-then-fix
#   (3%: a wrong step, " wait ", the step redone) and a slip left in (5%).
# - **Two surface languages** for the reasoning: symbols (`07+35=42`) and words (`07 plus 35 is 42`), and some
#   solutions that switch part-way. Chapter 06 uses them to show R1's language mixing and its language-consistency
#   reward.
#
# The module starts with its configuration, which validates itself.

# %%
#| default_exp world

# %%
#| export
"""The arithmetic world: problems with verifiable answers, worked solutions in R1-Zero's format, the pretraining corpus,
the tokenizer and packed batches (chapter 00)."""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch

STYLES = ("bare", "steps", "guess_verify", "slip_fix", "slip")
LANGUAGES = ("sym", "en")

# %%
#| export
def _check(ok: bool, name: str, value, allowed: str) -> None:
    if not ok:
        raise ValueError(f"WorldConfig.{name}={value!r} is invalid: {allowed}")


@dataclass
class WorldConfig:
    """The arithmetic world: difficulty, corpus mix and seeds (by default, the recipe of the course's pre-study).

    Problems are chains of 2-4 numbers (1-3 operations) joined by + and -, every number and every intermediate result in
    0..max_value, written zero-padded to the width of max_value ("07+35-12"). Held-out problems are longer (3-4 numbers)
    and never appear in the corpus.
    """

    max_value: int = 99
    min_operands: int = 2
    max_operands: int = 4
    ops: str = "+-"
    heldout_min_operands: int = 3
    heldout_max_operands: int = 4
    n_heldout: int = 400
    heldout_seed: int = 2024  # fixed: every chapter evaluates on the same held-out problems
    n_docs: int = 150_000
    seed: int = 0  # the corpus seed
    # The share of each solution style in the pretraining corpus.
    mix: dict[str, float] = field(default_factory=lambda: {
        "bare": 0.58, "steps": 0.08, "guess_verify": 0.26, "slip_fix": 0.03, "slip": 0.05})
    steps_slip_rate: float = 0.2  # share of "steps" solutions that carry one uncorrected slip
    guess_right_rate: float = 0.3  # how often the quick guess of "guess_verify" is right
    en_rate: float = 0.1  # share of worked solutions whose reasoning is written in words ("en") instead of symbols
    switch_rate: float = 0.05  # share of worked solutions that switch language part-way through
    # Chapter 07's bilingual world: problems can be stated in words ("07 plus 35"), and a solution then mostly reasons
    # in words too. At the defaults every problem is in symbols and the corpus is exactly chapter 00's.
    prompt_en_rate: float = 0.0  # share of problems stated in words
    en_prompt_consistency: float = 0.8  # share of worked solutions to a worded problem that reason in words

    def __post_init__(self) -> None:
        _check(isinstance(self.max_value, int) and 9 <= self.max_value <= 9999, "max_value", self.max_value,
               "an int in 9..9999")
        _check(isinstance(self.min_operands, int) and self.min_operands >= 2, "min_operands", self.min_operands,
               "an int >= 2")
        _check(isinstance(self.max_operands, int) and self.max_operands >= self.min_operands, "max_operands",
               self.max_operands, f"an int >= min_operands ({self.min_operands})")
        _check(isinstance(self.ops, str) and len(self.ops) > 0 and set(self.ops) <= set("+-")
               and len(set(self.ops)) == len(self.ops), "ops", self.ops, "a non-empty subset of '+-'")
        _check(isinstance(self.heldout_min_operands, int) and self.heldout_min_operands >= 2, "heldout_min_operands",
               self.heldout_min_operands, "an int >= 2")
        _check(isinstance(self.heldout_max_operands, int) and self.heldout_max_operands >= self.heldout_min_operands,
               "heldout_max_operands", self.heldout_max_operands,
               f"an int >= heldout_min_operands ({self.heldout_min_operands})")
        for name in ("n_heldout", "n_docs", "seed", "heldout_seed"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, name, v, "a non-negative int")
        _check(isinstance(self.mix, dict) and set(self.mix) <= set(STYLES) and len(self.mix) > 0, "mix", self.mix,
               f"a dict whose keys are among {STYLES}")
        _check(all(isinstance(w, (int, float)) and w >= 0 for w in self.mix.values()) and sum(self.mix.values()) > 0,
               "mix", self.mix, "non-negative weights with a positive sum")
        for name in ("steps_slip_rate", "guess_right_rate", "en_rate", "switch_rate", "prompt_en_rate",
                     "en_prompt_consistency"):
            v = getattr(self, name)
            _check(isinstance(v, (int, float)) and 0.0 <= v <= 1.0, name, v, "a number in [0, 1]")
        _check(self.en_rate + self.switch_rate <= 1.0, "switch_rate", self.switch_rate,
               f"en_rate + switch_rate must be <= 1 (en_rate is {self.en_rate})")

    @property
    def width(self) -> int:
        """Digits per number: every number is zero-padded to this width."""
        return len(str(self.max_value))

# %%
# A bad config names the field, the value and what is allowed.
try:
    WorldConfig(max_operands=1)
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# A problem is its operands and operators; its intermediate values follow. `sample_problem` draws each next operand so
# that the running value stays in range.

# %%
#| export
@dataclass(frozen=True)
class Problem:
    """A chain like 07+35-12: operands, operators, and every intermediate value (values[-1] is the answer).
    language: how the problem is stated, in symbols ("sym": 07+35-12) or in words ("en": 07 plus 35 minus 12)."""

    operands: tuple[int, ...]
    ops: tuple[str, ...]
    width: int = 2
    language: str = "sym"

    def __post_init__(self) -> None:
        if self.language not in LANGUAGES:
            raise ValueError(f"Problem.language={self.language!r} is invalid: one of {LANGUAGES}")

    @property
    def values(self) -> tuple[int, ...]:
        out, cur = [self.operands[0]], self.operands[0]
        for op, x in zip(self.ops, self.operands[1:]):
            cur = cur + x if op == "+" else cur - x
            out.append(cur)
        return tuple(out)

    @property
    def answer(self) -> int:
        return self.values[-1]

    @property
    def text(self) -> str:
        s = self.fmt(self.operands[0])
        for op, x in zip(self.ops, self.operands[1:]):
            s += (op if self.language == "sym" else WORDS[op]) + self.fmt(x)
        return s

    def fmt(self, n: int) -> str:
        return f"{n:0{self.width}d}"

    def in_language(self, language: str) -> "Problem":
        """The same problem, stated in `language`."""
        return Problem(self.operands, self.ops, self.width, language)


def sample_problem(rng: random.Random, cfg: WorldConfig, n_operands: int) -> Problem:
    """A random chain of n_operands numbers whose every intermediate stays in 0..max_value."""
    m = cfg.max_value
    cur = rng.randint(0, m)
    operands, ops = [cur], []
    for _ in range(n_operands - 1):
        op = rng.choice(cfg.ops)
        x = rng.randint(0, m - cur) if op == "+" else rng.randint(0, cur)
        cur = cur + x if op == "+" else cur - x
        operands.append(x)
        ops.append(op)
    # Only a bilingual world draws the language, so the default world's random stream is chapter 00's.
    language = "en" if cfg.prompt_en_rate > 0 and rng.random() < cfg.prompt_en_rate else "sym"
    return Problem(tuple(operands), tuple(ops), cfg.width, language)

# %%
rng = random.Random(0)
p = sample_problem(rng, WorldConfig(), 4)
print(p.text, "=", p.answer, "  intermediates:", p.values)
# Check against Python's own arithmetic on the text (a slow, obvious reference; the world itself never evaluates text).
for _ in range(2000):
    q = sample_problem(rng, WorldConfig(), rng.randint(2, 4))
    assert eval(q.text.replace("+0", "+").replace("-0", "-").lstrip("0") or "0") == q.answer
    assert all(0 <= v <= 99 for v in q.values)
print("2000 random problems: answers match, every intermediate in 0..99")

# %% [markdown]
# ### Worked solutions
#
# A step is written in symbols or in words. A document is a problem plus a solution in R1-Zero's format; the prompt is
# the problem followed by an opened `<think>` tag, so a model continues with its reasoning. DeepSeek-R1's own template
# (its Table 1) wraps the question in a paragraph of instructions; at 128 tokens of context our models cannot afford it,
# so `r1_zero_prompt` keeps it for reference and `prompt` is the compact form every chapter uses.

# %%
#| export
WORDS = {"+": " plus ", "-": " minus ", "=": " is "}


def render_step(a: str, op: str, b: str, result: str, language: str) -> str:
    """One step of worked reasoning, in symbols ("07+35=42") or in words ("07 plus 35 is 42")."""
    if language == "sym":
        return f"{a}{op}{b}={result}"
    return f"{a}{WORDS[op]}{b}{WORDS['=']}{result}"


@dataclass(frozen=True)
class Document:
    """One worked solution: the problem, how it was written, and the text in R1-Zero's format."""

    problem: Problem
    style: str
    language: str  # "sym", "en" or "mixed" ("sym" for a bare answer, which has no reasoning text)
    think: str
    answer: int

    @property
    def prompt(self) -> str:
        return prompt(self.problem)

    @property
    def completion(self) -> str:
        return f"{self.think}</think> <answer> {self.problem.fmt(self.answer)} </answer>"

    @property
    def text(self) -> str:
        return self.prompt + self.completion

    @property
    def correct(self) -> bool:
        return self.answer == self.problem.answer

    @property
    def reflects(self) -> bool:
        return " wait " in self.think


def prompt(problem: Problem) -> str:
    """The compact R1-Zero prompt: the question, then an opened think tag for the model to continue."""
    return f"Q:{problem.text} <think>"


R1_ZERO_TEMPLATE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., <think> "
    "reasoning process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)


def r1_zero_prompt(problem: Problem) -> str:
    """DeepSeek-R1's Table 1 template, verbatim, around a problem (too long for a 128-token model; shown for reference)."""
    return R1_ZERO_TEMPLATE.format(prompt=problem.text)

# %% [markdown]
# The styles. A slip changes one intermediate result by 1-9 and, when it is left in, the later steps build on the wrong
# value, so the final answer is wrong but the chain is internally consistent, as a careless human's would be. A fixed
# slip is followed by " wait " and the step redone right.

# %%
#| export
def _slipped_chain(problem: Problem, at: int, rng: random.Random, max_value: int) -> list[int] | None:
    """The chain's values when step `at` (1-based) gets a wrong result and later steps build on it; None if no slip
    keeps every later value in range."""
    vals = list(problem.values)
    for _ in range(20):
        delta = rng.choice((-1, 1)) * rng.randint(1, 9)
        wrong = vals[at] + delta
        if not 0 <= wrong <= max_value:
            continue
        out, cur = vals[:at] + [wrong], wrong
        ok = True
        for op, x in zip(problem.ops[at:], problem.operands[at + 1:]):
            cur = cur + x if op == "+" else cur - x
            if not 0 <= cur <= max_value:
                ok = False
                break
            out.append(cur)
        if ok:
            return out
    return None


def _steps(problem: Problem, values: Sequence[int], languages: Sequence[str], fix_at: int | None = None) -> str:
    """Render the chain's steps from `values` (possibly slipped). With fix_at, step fix_at is followed by " wait " and
    the same step redone right, and later steps continue from the right value."""
    f = problem.fmt
    parts, prev = [], values[0]
    true = problem.values
    for i, (op, x) in enumerate(zip(problem.ops, problem.operands[1:]), start=1):
        lang = languages[i - 1]
        if fix_at == i:
            parts.append(render_step(f(prev), op, f(x), f(values[i]), lang) + " wait "
                         + render_step(f(prev), op, f(x), f(true[i]), lang))
            values = list(true)
        else:
            parts.append(render_step(f(prev), op, f(x), f(values[i]), lang))
        prev = values[i]
    return " ".join(parts)


def make_document(problem: Problem, style: str, rng: random.Random, cfg: WorldConfig,
                  language: str | None = None) -> Document:
    """Write a solution of `problem` in `style` (one of STYLES). language: "sym", "en", "mixed" or None to draw it
    from the config's en_rate and switch_rate."""
    if style not in STYLES:
        raise ValueError(f"style {style!r} is not one of {STYLES}")
    n_steps = len(problem.ops)
    if language is None and problem.language == "en":  # a worded problem: mostly words, the rest split 2:1
        u, c = rng.random(), cfg.en_prompt_consistency
        language = "en" if u < c else "mixed" if u < c + (1 - c) / 3 else "sym"
    elif language is None:
        u = rng.random()
        language = "en" if u < cfg.en_rate else "mixed" if u < cfg.en_rate + cfg.switch_rate else "sym"
    if language not in ("sym", "en", "mixed"):
        raise ValueError(f"language {language!r} is not one of ('sym', 'en', 'mixed')")
    if language == "mixed" and n_steps < 2:
        language = rng.choice(LANGUAGES)
    if language == "mixed":
        first = rng.choice(LANGUAGES)
        other = "en" if first == "sym" else "sym"
        cut = rng.randint(1, n_steps - 1)
        languages = [first] * cut + [other] * (n_steps - cut)
    else:
        languages = [language] * n_steps
    true = list(problem.values)
    if style == "bare":
        return Document(problem, style, "sym", "", problem.answer)
    if style == "guess_verify":
        guess = problem.answer
        if rng.random() >= cfg.guess_right_rate:
            while guess == problem.answer:
                guess = min(cfg.max_value, max(0, problem.answer + rng.randint(-12, 12)))
        think = problem.fmt(guess) + " wait " + _steps(problem, true, languages)
        return Document(problem, style, language, think, problem.answer)
    slip = style in ("slip", "slip_fix") or (style == "steps" and rng.random() < cfg.steps_slip_rate)
    values, at = true, None
    if slip:
        at = rng.randint(1, n_steps)
        slipped = _slipped_chain(problem, at, rng, cfg.max_value)
        if slipped is None:  # no slip fits in range here: write the solution without one
            at = None
        else:
            values = slipped
    if style == "slip_fix" and at is not None:
        return Document(problem, style, language, _steps(problem, values, languages, fix_at=at), problem.answer)
    return Document(problem, style, language, _steps(problem, values, languages), values[-1])

# %%
cfg = WorldConfig()
rng = random.Random(1)
p = Problem((48, 19, 17, 14), ("+", "+", "+"))
for style in STYLES:
    for language in ("sym", "en", "mixed"):
        if style == "bare" and language != "sym":
            continue
        d = make_document(p, style, rng, cfg, language)
        print(f"{style:>12} {language:>5} {'right' if d.correct else 'WRONG'}: {d.text}")
print()
print(r1_zero_prompt(p))

# %% [markdown]
# ### The tokenizer
#
# Characters, plus special tokens that are single ids: padding, begin and end of document, the four tags, and " wait "
# (with its spaces, so that deciding to reflect is one decision for the model). Encoding the whole corpus one character
# at a time in Python would take seconds, so `encode_many` swaps each special for a private-use character and maps code
# points through one NumPy lookup table. Any character outside the vocabulary is an error that names it.

# %%
#| export
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<think>", "</think>", "<answer>", "</answer>", " wait ")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # newline and printable ASCII
_PRIVATE = 0xE000  # specials are swapped for private-use code points while encoding
_PRIVATE_RE = re.compile("[\ue000-\uf8ff]")


class Tokenizer:
    """Character-level tokenizer with single-token specials: <pad> <bos> <eos>, the think and answer tags, and " wait "
    (spaces included, so that the reflection word is one decision for the model)."""

    def __init__(self, specials: Sequence[str] = SPECIAL_TOKENS, chars: str = CHARS):
        self.specials = tuple(specials)
        self.chars = chars
        self.itos = list(self.specials) + list(chars)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        n = len(self.specials)
        self._lut = np.full(_PRIVATE + n, -1, dtype=np.int64)  # code point -> id
        for i, ch in enumerate(chars):
            self._lut[ord(ch)] = n + i
        self._lut[_PRIVATE:_PRIVATE + n] = np.arange(n)
        self._swap = sorted(((s, chr(_PRIVATE + i)) for i, s in enumerate(self.specials)), key=lambda p: -len(p[0]))

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def __len__(self) -> int:
        return self.vocab_size

    def id(self, token: str) -> int:
        """The id of a special token or a single character."""
        if token not in self.stoi:
            raise ValueError(f"{token!r} is not a token of this tokenizer")
        return self.stoi[token]

    pad_id = property(lambda self: self.stoi["<pad>"])
    bos_id = property(lambda self: self.stoi["<bos>"])
    eos_id = property(lambda self: self.stoi["<eos>"])

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return self.encode_many([text], bos=bos, eos=eos)[0].tolist()

    def encode_many(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[np.ndarray]:
        """Encode many texts at once (fast: one NumPy lookup over all of them). Raises ValueError naming the text,
        the position and the character that is not in the vocabulary."""
        swapped = []
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"can only encode str, got {type(t).__name__}")
            for a, b in self._swap:
                t = t.replace(a, b)
            swapped.append(t)
        joined = "".join(swapped)
        cps = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = self._lut[np.minimum(cps, len(self._lut) - 1)]
        if (ids < 0).any() or (cps >= len(self._lut)).any() or any(_PRIVATE_RE.search(t) for t in texts):
            for k, t in enumerate(texts):
                pos = self._first_unknown(t)
                if pos is not None:
                    raise ValueError(f"text {k}: character {t[pos]!r} (U+{ord(t[pos]):04X}) at position {pos} is not in "
                                     f"the vocabulary (newline, printable ASCII and the special tokens)")
        out, start = [], 0
        for t in swapped:
            piece = ids[start:start + len(t)]
            start += len(t)
            if bos or eos:
                piece = np.concatenate([[self.bos_id] if bos else [], piece, [self.eos_id] if eos else []]).astype(np.int64)
            out.append(piece)
        return out

    def _first_unknown(self, text: str) -> int | None:
        pos = 0
        while pos < len(text):
            special = next((s for s, _ in self._swap if text.startswith(s, pos)), None)
            if special is not None:
                pos += len(special)
            elif text[pos] in self.stoi:
                pos += 1
            else:
                return pos
        return None

    def decode(self, ids: Iterable[int], skip: Sequence[str] = ("<pad>", "<bos>", "<eos>")) -> str:
        skip_ids = {self.stoi[s] for s in skip}
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):
                raise ValueError(f"token id {i} is outside the vocabulary (0..{len(self.itos) - 1})")
            if i not in skip_ids:
                out.append(self.itos[i])
        return "".join(out)

# %%
tok = Tokenizer()


def encode_slow(text: str) -> list[int]:
    """The obvious reference: scan left to right, preferring a special token where one starts."""
    out, i = [], 0
    while i < len(text):
        s = next((s for s in sorted(tok.specials, key=len, reverse=True) if text.startswith(s, i)), None)
        out.append(tok.stoi[s] if s else tok.stoi[text[i]])
        i += len(s) if s else 1
    return out


sample_texts = [make_document(sample_problem(rng, cfg, 4), s, rng, cfg).text for s in STYLES * 40]
assert all(tok.encode(t) == encode_slow(t) for t in sample_texts)
assert all(tok.decode(tok.encode(t)) == t for t in sample_texts)
print(f"vocabulary: {tok.vocab_size} tokens; fast encoder == slow reference on {len(sample_texts)} documents")
print(tok.encode("Q:07+35 <think>42 wait 07+35=42</think>"))
try:
    tok.encode("Q:7×6 <think>")
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# ### The answer checker
#
# Rewards in chapters 05-07 depend on reading the model's answer, and model output is data: it is parsed, never
# evaluated. `parse_answer` accepts only an integer inside the first `<answer> … </answer>`, and returns None, rather
# than raising, for anything else.

# %%
#| export
_ANSWER_RE = re.compile(r"<answer>[ \t]*([+-]?[0-9]{1,12})[ \t]*</answer>", re.ASCII)


def parse_answer(text: object) -> int | None:
    """The integer inside the first <answer> ... </answer> of a model's output, or None. Never evaluates anything and
    never raises: a missing tag, a non-integer answer or a non-string input all give None."""
    if not isinstance(text, str):
        return None
    m = _ANSWER_RE.search(text)
    if m is None:
        return None
    inner_start = text.find("<answer>")
    if inner_start != m.start():  # the first answer tag holds something else: it is the one that counts
        return None
    return int(m.group(1))


def is_correct(text: object, answer: int) -> bool:
    """Does the first <answer> of `text` equal `answer`?"""
    got = parse_answer(text)
    return got is not None and got == answer

# %%
cases = {
    "</think> <answer> 42 </answer>": 42,
    "5 wait 07+35=42</think> <answer>42</answer>": 42,
    "<answer> 4 2 </answer>": None,
    "<answer> __import__('os').system('ls') </answer>": None,
    "<answer> 1e3 </answer>": None,
    "<answer> ٤٢ </answer>": None,  # Arabic-Indic digits: int() would accept them; the checker does not
    "<answer> 12 </answer> <answer> 13 </answer>": 12,
    "no tags at all": None,
    None: None,
}
for text, expected in cases.items():
    assert parse_answer(text) == expected, (text, parse_answer(text))
print("checker: all", len(cases), "cases as expected")

# %% [markdown]
# ### The world: held-out problems, the corpus, a validation set
#
# `World` ties it together. Everything is a pure function of the config. The held-out set depends only on the
# difficulty and `heldout_seed`, so changing the corpus mix or its seed never changes what chapters are evaluated on.

# %%
#| export
class World:
    """The arithmetic world: held-out problems, the pretraining corpus, a validation corpus and the tokenizer.

    Everything is a pure function of the config: the same config gives the same problems and texts on any machine.
    The held-out problems depend only on the difficulty and `heldout_seed`, never on the corpus seed or mix, so every
    chapter evaluates on the same problems; no held-out problem occurs in the corpus.
    """

    def __init__(self, config: WorldConfig | None = None, **overrides):
        if config is None:
            config = WorldConfig(**overrides)
        elif overrides:
            config = WorldConfig(**{**asdict(config), **overrides})
        self.config = config
        self.tokenizer = Tokenizer()
        self._heldout: list[Problem] | None = None
        self._corpus: list[Document] | None = None
        self._banned: set[tuple] | None = None

    def __repr__(self) -> str:
        c = self.config
        return (f"World({c.min_operands}-{c.max_operands} numbers in 0..{c.max_value}, ops {c.ops!r}, "
                f"{c.n_docs} documents, {c.n_heldout} held-out problems, seed {c.seed})")

    @property
    def heldout(self) -> list[Problem]:
        """The held-out problems, fixed by `heldout_seed` and the difficulty."""
        if self._heldout is None:
            c = self.config
            rng = random.Random(f"heldout-{c.heldout_seed}")
            seen: dict[str, Problem] = {}
            for _ in range(50 * c.n_heldout + 1000):
                if len(seen) == c.n_heldout:
                    break
                p = sample_problem(rng, c, rng.randint(c.heldout_min_operands, c.heldout_max_operands))
                seen.setdefault(p.text, p)
            if len(seen) < c.n_heldout:
                raise ValueError(f"WorldConfig.n_heldout={c.n_heldout} is invalid: only {len(seen)} distinct held-out "
                                 f"problems exist at this difficulty")
            self._heldout = list(seen.values())
        return self._heldout

    def sample_problem(self, rng: random.Random, n_operands: int | None = None) -> Problem:
        """A random training problem (never one of the held-out problems)."""
        c = self.config
        if self._banned is None:
            self._banned = {(p.operands, p.ops) for p in self.heldout}  # in either language
        banned = self._banned
        for _ in range(1000):
            k = n_operands if n_operands is not None else rng.randint(c.min_operands, c.max_operands)
            p = sample_problem(rng, c, k)
            if (p.operands, p.ops) not in banned:
                return p
        raise ValueError("could not draw a training problem outside the held-out set: the world is too small")

    def document(self, problem: Problem, style: str, rng: random.Random | None = None,
                 language: str | None = None) -> Document:
        return make_document(problem, style, rng or random.Random(0), self.config, language)

    def corpus(self) -> list[Document]:
        """The pretraining corpus: n_docs documents, styles drawn by the mix (cached after the first call)."""
        if self._corpus is None:
            c = self.config
            rng = random.Random(f"corpus-{c.seed}")
            styles = list(c.mix)
            weights = [c.mix[s] for s in styles]
            picks = rng.choices(styles, weights=weights, k=c.n_docs)
            self._corpus = [make_document(self.sample_problem(rng), s, rng, c) for s in picks]
        return self._corpus

    def validation(self, n: int | None = None) -> list[Document]:
        """Documents on the held-out problems, styles drawn by the mix: the held-out loss is measured on these."""
        c = self.config
        rng = random.Random(f"validation-{c.heldout_seed}-{c.seed}")
        styles = list(c.mix)
        problems = self.heldout if n is None else [self.heldout[i % len(self.heldout)] for i in range(n)]
        picks = rng.choices(styles, weights=[c.mix[s] for s in styles], k=len(problems))
        return [make_document(p, s, rng, c) for p, s in zip(problems, picks)]

    def prompts(self, problems: Sequence[Problem] | None = None) -> list[str]:
        """The prompts of problems (default: the held-out ones)."""
        return [prompt(p) for p in (self.heldout if problems is None else problems)]

    def grade(self, completions: Sequence[str], problems: Sequence[Problem] | None = None) -> list[bool]:
        """Is each completion's answer right? (Safe on any string: see parse_answer.)"""
        problems = self.heldout if problems is None else problems
        if len(completions) != len(problems):
            raise ValueError(f"{len(completions)} completions for {len(problems)} problems")
        return [is_correct(c, p.answer) for c, p in zip(completions, problems)]


def corpus_stats(docs: Sequence[Document]) -> dict:
    """Shares of styles and languages, reflection and correctness rates, and lengths in characters."""
    n = len(docs)
    if n == 0:
        raise ValueError("corpus_stats needs at least one document")
    lengths = np.array([len(d.text) for d in docs])
    count = lambda key: {k: sum(1 for d in docs if key(d) == k) / n for k in sorted({key(d) for d in docs})}
    return {
        "documents": n,
        "style": count(lambda d: d.style),
        "language": count(lambda d: d.language),
        "n_operands": count(lambda d: len(d.problem.operands)),
        "reflection_rate": sum(d.reflects for d in docs) / n,
        "correct_rate": sum(d.correct for d in docs) / n,
        "mean_chars": float(lengths.mean()),
        "max_chars": int(lengths.max()),
    }

# %%
t0 = time.time()
world = World()
corpus = world.corpus()
print(world, f"built in {time.time() - t0:.1f} s")
heldout_texts = {p.text for p in world.heldout}
assert len(heldout_texts) == 400 and not heldout_texts & {d.problem.text for d in corpus}
assert [p.text for p in World(seed=7, n_docs=10).heldout] == [p.text for p in world.heldout]
assert [d.text for d in World(n_docs=500).corpus()] == [d.text for d in World(n_docs=500).corpus()]
print("held-out: 400 problems, none in the corpus; the same for any corpus seed; the corpus is deterministic")
for d in corpus[:8]:
    print(f"{d.style:>12}: {d.text}")

# %%
stats = corpus_stats(corpus)
token_lengths = np.array([len(x) + 2 for x in world.tokenizer.encode_many([d.text for d in corpus])])
fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
axes[0].bar(stats["style"].keys(), stats["style"].values(), color="tab:blue")
axes[0].set_title("solution styles")
axes[0].tick_params(axis="x", rotation=30)
axes[1].bar(stats["language"].keys(), stats["language"].values(), color="tab:green")
axes[1].set_title("language of the reasoning")
axes[2].hist(token_lengths, bins=range(0, token_lengths.max() + 4, 3), color="tab:gray")
axes[2].set_title(f"tokens per document (mean {token_lengths.mean():.1f})")
for ax in axes[:2]:
    ax.set_ylabel("share of documents")
fig.tight_layout()
plt.show()
print(f"reflection (' wait ') in {stats['reflection_rate']:.1%} of documents; final answer right in "
      f"{stats['correct_rate']:.1%}; longest document {token_lengths.max()} tokens")

# %% [markdown]
# ### Packed batches
#
# Documents average about 31 tokens, so a row of 96 tokens holds several. Packing them wastes little compute on
# padding, but a document must not attend to its neighbours, and its positions must restart at 0: each batch carries
# segment ids (for a block-diagonal causal mask) and per-document positions (for RoPE). The loss is on the response
# only (everything after `<think>`), as in the pre-study: the model learns to solve, not to pose problems. A batch is
# a pure function of the step, which is what makes resuming exact.

# %%
#| export
class PackedData:
    """Documents packed into fixed-length rows for pretraining, as a pure function of (seed, step).

    Each document is <bos> text <eos>; whole documents are packed greedily, in an order drawn from the seed, into rows of
    seq_len + 1 tokens (a document never spans two rows; the rest of a row is <pad>). A batch holds, per row: input_ids
    and targets (shifted by one), positions that restart at 0 in each document (for RoPE), segments (1, 2, ... per
    document, 0 for padding: attention stays inside a document), and loss_mask, true where the target is a response
    token (after <think>) of the same document.

    The rows are packed once; epoch e visits them in an order drawn from (seed, e). Since attention and positions are
    per document, which documents share a row changes nothing in the loss, so a fresh row order per epoch is as good as
    repacking. batch(step) never depends on history: a resumed run sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, docs: Sequence[str], tokenizer: Tokenizer, seq_len: int, batch_size: int, seed: int = 0,
                 response_after: str = "<think>"):
        if not isinstance(seq_len, int) or not isinstance(batch_size, int) or seq_len < 2 or batch_size < 1:
            raise ValueError(f"seq_len must be an int >= 2 and batch_size an int >= 1, got {seq_len!r} and "
                             f"{batch_size!r}")
        if len(docs) == 0:
            raise ValueError("PackedData needs at least one document")
        self.tokenizer, self.seq_len, self.batch_size, self.seed = tokenizer, seq_len, batch_size, seed
        encoded = tokenizer.encode_many(list(docs), bos=True, eos=True)
        lengths = np.array([len(d) for d in encoded])
        too_long = np.flatnonzero(lengths > seq_len + 1)
        if len(too_long):
            i = int(too_long[0])
            raise ValueError(f"document {i} has {lengths[i]} tokens with <bos> and <eos>, more than a row of "
                             f"seq_len + 1 = {seq_len + 1}: raise seq_len")
        order = np.random.default_rng([seed, 0]).permutation(len(encoded))
        width = seq_len + 1
        row_of = np.empty(len(order), np.int64)
        offset = np.empty(len(order), np.int64)
        row, used = 0, 0
        for k, i in enumerate(order):  # greedy: start a new row when the document does not fit
            if used + lengths[i] > width:
                row, used = row + 1, 0
            row_of[k], offset[k] = row, used
            used += lengths[i]
        lens = lengths[order]
        flat = np.concatenate([encoded[i] for i in order])
        local = np.arange(len(flat)) - np.repeat(np.cumsum(lens) - lens, lens)  # position within its document
        where = np.repeat(row_of * width + offset, lens) + local  # flat index into the (rows, width) arrays
        # The response is every token after the first `response_after` token of its document.
        marker = tokenizer.id(response_after)
        first = np.minimum.reduceat(np.where(flat == marker, local, width), np.cumsum(lens) - lens)
        shape = (row + 1, width)
        self.rows = {"tokens": np.full(shape, tokenizer.pad_id, np.int64), "segments": np.zeros(shape, np.int64),
                     "positions": np.zeros(shape, np.int64), "response": np.zeros(shape, bool)}
        self.rows["tokens"].flat[where] = flat
        self.rows["segments"].flat[where] = np.repeat(np.arange(len(order)) - np.searchsorted(row_of, row_of) + 1, lens)
        self.rows["positions"].flat[where] = local
        self.rows["response"].flat[where] = local > np.repeat(first, lens)
        if shape[0] < batch_size:
            raise ValueError(f"the documents pack into {shape[0]} rows, fewer than batch_size {batch_size}")
        self.n_documents = len(encoded)

    @property
    def rows_per_epoch(self) -> int:
        return len(self.rows["tokens"])

    @property
    def steps_per_epoch(self) -> int:
        return self.rows_per_epoch // self.batch_size

    @property
    def tokens_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def epoch_rows(self, epoch: int) -> dict[str, np.ndarray]:
        """All packed rows (seq_len + 1 wide) in the order epoch `epoch` visits them."""
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(self.rows_per_epoch)
        return {k: a[order] for k, a in self.rows.items()}

    def batch(self, step: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The batch for optimizer step `step` (0-based): batch_size rows; an epoch's leftover rows are skipped."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = np.random.default_rng([self.seed, epoch, 1]).permutation(self.rows_per_epoch)
        pick = order[k * self.batch_size:(k + 1) * self.batch_size]
        return rows_to_batch({name: a[pick] for name, a in self.rows.items()}, device)

    def all_batches(self, device: torch.device | str = "cpu") -> list[dict[str, torch.Tensor]]:
        """Every row once, in packing order, in batches (the last one may be smaller): for evaluation."""
        n = self.rows_per_epoch
        return [rows_to_batch({k: a[s:s + self.batch_size] for k, a in self.rows.items()}, device)
                for s in range(0, n, self.batch_size)]


def rows_to_batch(rows: dict[str, np.ndarray], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    t = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in rows.items()}
    seg = t["segments"]
    return {
        "input_ids": t["tokens"][:, :-1],
        "targets": t["tokens"][:, 1:],
        "positions": t["positions"][:, :-1],
        "segments": seg[:, :-1],
        "loss_mask": (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] > 0) & t["response"][:, 1:],
    }

# %%
small = [d.text for d in World(n_docs=300).corpus()]
packed = PackedData(small, tok, seq_len=96, batch_size=8, seed=0)
b = packed.batch(0)
# Reference: walk the raw rows of epoch 0 (seq_len + 1 wide; batch 0 is their first 8), rebuild each document from its
# segment id, and recompute positions and the loss mask by hand.
rows = packed.epoch_rows(0)
think = tok.id("<think>")
rebuilt, want = [], np.zeros((8, 96), dtype=bool)
for r in range(8):
    for s in range(1, rows["segments"][r].max() + 1):
        idx = np.flatnonzero(rows["segments"][r] == s)  # where document s lies in row r
        doc = rows["tokens"][r, idx]
        rebuilt.append(tok.decode(doc))
        assert (b["positions"][r, idx[idx < 96]].numpy() == np.arange(len(idx))[idx < 96]).all()
        first_response = idx[0] + list(doc).index(think) + 1
        for i in idx[:-1]:  # input i predicts token i + 1 of the same document
            want[r, i] = i + 1 >= first_response
assert set(rebuilt) <= set(small) and np.array_equal(want, b["loss_mask"].numpy())
assert torch.equal(packed.batch(5)["input_ids"], PackedData(small, tok, 96, 8, seed=0).batch(5)["input_ids"])
print(f"{len(rebuilt)} documents rebuilt from batch 0; positions restart per document; loss mask == reference; "
      f"batch(step) is deterministic. {packed.rows_per_epoch} rows per epoch, {len(rebuilt) / 8:.1f} documents per row")

# %% [markdown]
# ## 3. The DeepSeek LLM transformer
#
# DeepSeek LLM (arXiv 2401.02954, section 2.2) "mostly follows the design of LLaMA": a decoder-only transformer with
# pre-normalisation by RMSNorm, SwiGLU feed-forward layers (hidden width about 8/3 of the model width), and Rotary
# Position Embedding. The 67B model replaces multi-head attention by grouped-query attention (64 query heads sharing 8
# key-value heads) to shrink the KV cache at inference. We build exactly that, small, with a KV cache for decoding.
#
# The configuration validates itself. Names follow DeepSeek's reference code where it has them.

# %%
#| export transformer
"""The DeepSeek LLM transformer: RMSNorm, RoPE, SwiGLU, grouped-query attention and a KV cache (chapter 00)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class TransformerConfig:
    """A DeepSeek LLM-style decoder (arXiv 2401.02954, section 2.2: the LLaMA architecture): pre-norm RMSNorm, RoPE,
    SwiGLU feed-forward, multi-head attention with optional grouped KV heads (GQA, as in DeepSeek 67B)."""

    vocab_size: int
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # None: as many KV heads as query heads (MHA); fewer: GQA; 1: MQA
    intermediate_size: int | None = None  # None: 8/3 d_model rounded up to a multiple of 32
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layer", "n_head", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TransformerConfig.{name}={v!r} is invalid: a positive int is required")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not isinstance(self.n_kv_head, int) or self.n_kv_head < 1 or self.n_head % self.n_kv_head:
            raise ValueError(f"TransformerConfig.n_kv_head={self.n_kv_head!r} is invalid: a positive divisor of "
                             f"n_head={self.n_head} is required")
        if self.d_model % self.n_head:
            raise ValueError(f"TransformerConfig.d_model={self.d_model} is invalid: it must be divisible by "
                             f"n_head={self.n_head}")
        if self.head_dim % 2:
            raise ValueError(f"TransformerConfig.d_model={self.d_model} is invalid: the head dimension "
                             f"d_model/n_head={self.head_dim} must be even for RoPE")
        if self.intermediate_size is None:
            self.intermediate_size = 32 * math.ceil(8 * self.d_model / 3 / 32)
        if not isinstance(self.intermediate_size, int) or self.intermediate_size < 1:
            raise ValueError(f"TransformerConfig.intermediate_size={self.intermediate_size!r} is invalid: a positive "
                             f"int is required")
        for name in ("rope_theta", "norm_eps", "init_std"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"TransformerConfig.{name}={v!r} is invalid: a positive number is required")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

# %%
for bad in (dict(d_model=100, n_head=3), dict(n_head=4, n_kv_head=3), dict(d_model=12, n_head=4)):
    try:
        TransformerConfig(vocab_size=100, **bad)
    except ValueError as e:
        print("ValueError:", e)

# %% [markdown]
# **RMSNorm** rescales each vector by its root mean square (no mean subtraction, no bias):
# $\mathrm{RMSNorm}(x) = x / \sqrt{\tfrac1d\sum_i x_i^2 + \epsilon} \odot g$.
#
# **RoPE** rotates each pair of query and key features by an angle proportional to the position,
# $\theta_{p,i} = p\cdot\mathrm{base}^{-2i/d}$. Because a rotation by $a$ followed by the inverse of a rotation by $b$
# is a rotation by $a-b$, the dot product of a rotated query and key depends only on their distance. We rotate
# interleaved pairs $(x_{2i}, x_{2i+1})$, as RoFormer and DeepSeek's reference code do.

# %%
#| export transformer
class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotation angles pos * theta^(-2i/dim), i < dim/2, for integer positions (..., t).
    Returns two tensors of shape (..., t, dim/2)."""
    inv_freq = theta ** (-torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32) / dim)
    angles = positions.float()[..., None] * inv_freq
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x (b, h, t, d) by the angles in cos, sin (b, t, d/2) (RoFormer)."""
    x1, x2 = x.float()[..., 0::2], x.float()[..., 1::2]  # (b, h, t, d/2)
    cos, sin = cos[:, None], sin[:, None]  # (b, 1, t, d/2): broadcast over heads
    out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (b, h, t, d/2, 2)
    return out.flatten(-2).type_as(x)

# %%
x = torch.randn(2, 5, 16)
norm = RMSNorm(16)
ref = x / torch.sqrt((x ** 2).mean(-1, keepdim=True) + 1e-6)
assert torch.allclose(norm(x), ref, atol=1e-6)

# RoPE against its definition as complex multiplication: pair (a, b) -> (a + ib) * exp(i * angle).
q = torch.randn(1, 2, 7, 8)
pos = torch.arange(7)[None]
cos, sin = rope_cos_sin(pos, 8)
z = torch.view_as_complex(q.reshape(1, 2, 7, 4, 2).contiguous())
angles = pos[0, :, None].float() * 10000 ** (-torch.arange(0, 8, 2).float() / 8)
ref = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)).flatten(-2)
assert torch.allclose(apply_rope(q, cos, sin), ref, atol=1e-5)

# Relative positions: <RoPE(q, m), RoPE(k, n)> depends only on m - n.
qv, kv = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
def score(m, n):
    cm, sm = rope_cos_sin(torch.tensor([[m]]), 8)
    cn, sn = rope_cos_sin(torch.tensor([[n]]), 8)
    return (apply_rope(qv, cm, sm) * apply_rope(kv, cn, sn)).sum().item()
print(f"score(5, 2) = {score(5, 2):.5f}, score(40, 37) = {score(40, 37):.5f}, score(5, 3) = {score(5, 3):.5f}")
assert abs(score(5, 2) - score(40, 37)) < 1e-4
print("RMSNorm == formula; RoPE == complex rotation; RoPE scores depend on distance only")

# %% [markdown]
# **SwiGLU**: $\mathrm{FFN}(x) = W_2(\mathrm{SiLU}(W_1 x) \odot W_3 x)$. **Attention** with $n_{kv}$ key-value heads:
# each serves $n_{head}/n_{kv}$ query heads (GQA; $n_{kv} = n_{head}$ is MHA, $n_{kv}=1$ MQA). During decoding the
# keys and values of past positions do not change, so a **KV cache** keeps them: each new token costs one row of
# attention instead of recomputing the whole prefix. Its size per token, $2\,n_{layer} n_{kv} d_{head}$ numbers, is
# what GQA shrinks, and what MLA (chapter 03) shrinks much further.

# %%
#| export transformer
class SwiGLU(nn.Module):
    """The feed-forward block: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class KVCache:
    """Keys and values of past positions for every layer, preallocated to max_len: (b, n_kv_head, max_len, head_dim).
    `length` is how many positions are filled; the model advances it after each forward."""

    def __init__(self, config: TransformerConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.max_len = max_len or config.max_seq_len
        shape = (batch_size, config.n_kv_head, self.max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (b, h_kv, t, d) after the filled positions; return all keys and values so far."""
        t = k.shape[2]
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache is full: {self.length} positions + {t} new > max_len {self.max_len}")
        self.k[layer][:, :, self.length:self.length + t] = k
        self.v[layer][:, :, self.length:self.length + t] = v
        return self.k[layer][:, :, :self.length + t], self.v[layer][:, :, :self.length + t]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (indices, in order): a decoder drops the rows that have finished."""
        self.k = [t[rows] for t in self.k]
        self.v = [t[rows] for t in self.v]


class Attention(nn.Module):
    """Multi-head attention with RoPE and optional grouped KV heads (each KV head serves n_head / n_kv_head queries)."""

    def __init__(self, c: TransformerConfig, layer: int):
        super().__init__()
        self.c, self.layer = c, layer
        self.q_proj = nn.Linear(c.d_model, c.n_head * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_head * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_head * c.head_dim, c.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None,
                cache: KVCache | None = None) -> torch.Tensor:
        c = self.c
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=c.n_head)
        k = rearrange(self.k_proj(x), "b t (h d) -> b h t d", h=c.n_kv_head)
        v = rearrange(self.v_proj(x), "b t (h d) -> b h t d", h=c.n_kv_head)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (b, h_kv, past + t, d)
        g = c.n_head // c.n_kv_head
        if g > 1 and cache is not None and (mask is None or mask.shape[1] == 1):
            # GQA with a cache: fold each group's g query heads into the rows of its one KV head, so the cache is read
            # as it is instead of being copied g times per step. Rows are ordered (query head in group, position).
            b, _, t, dh = q.shape
            if mask is not None:
                mask = mask[:, :, None].expand(-1, -1, g, -1, -1).reshape(mask.shape[0], 1, g * t, mask.shape[-1])
            y = F.scaled_dot_product_attention(q.reshape(b, c.n_kv_head, g * t, dh), k, v, attn_mask=mask)
            y = y.reshape(b, c.n_head, t, dh)
        else:
            if g > 1:  # GQA without a cache (training): repeat each KV head for its group of query heads
                k, v = k.repeat_interleave(g, dim=1), v.repeat_interleave(g, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and cache is None)
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)"))


class Block(nn.Module):
    def __init__(self, c: TransformerConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c, layer)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = SwiGLU(c.d_model, c.intermediate_size)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


def document_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """Attention mask for packed rows (b, t) of segment ids: position i sees j when j <= i and both lie in the same
    document. Returns a bool tensor (b, 1, t, t), True where attention is allowed."""
    t = segments.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    return ((segments[:, :, None] == segments[:, None, :]) & causal)[:, None]


def forward_inputs(input_ids: torch.Tensor, positions: torch.Tensor | None, segments: torch.Tensor | None,
                   attn_mask: torch.Tensor | None, cache, max_seq_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What every dslib language model's forward does before its layers: (positions, attn_mask) for input_ids (b, t).
    segments turn into document_causal_mask; a sequence longer than max_seq_len without a cache is refused; positions
    default to 0..t-1 after the cache's filled part; a chunk of t > 1 tokens after cached ones gets the causal mask
    that lets query i see keys 0 .. past + i."""
    b, t = input_ids.shape
    if segments is not None:
        attn_mask = document_causal_mask(segments)
    past = cache.length if cache is not None else 0
    if past + t > max_seq_len and cache is None:
        raise ValueError(f"sequence of {t} tokens is longer than max_seq_len={max_seq_len}")
    if positions is None:
        positions = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
    if cache is not None and attn_mask is None and t > 1:
        attn_mask = torch.ones(t, past + t, dtype=torch.bool, device=input_ids.device).tril(past)[None, None]
    return positions, attn_mask

# %%
# Attention against a slow loop over heads and positions (GQA: 4 query heads share 2 KV heads).
c = TransformerConfig(vocab_size=50, d_model=32, n_head=4, n_kv_head=2, max_seq_len=16)
attn = Attention(c, 0)
x = torch.randn(2, 6, 32)
pos = torch.arange(6).expand(2, 6)
cos, sin = rope_cos_sin(pos, c.head_dim)
fast = attn(x, cos, sin, None)
qh = apply_rope(attn.q_proj(x).view(2, 6, 4, 8).transpose(1, 2), cos, sin)
kh = apply_rope(attn.k_proj(x).view(2, 6, 2, 8).transpose(1, 2), cos, sin)
vh = attn.v_proj(x).view(2, 6, 2, 8).transpose(1, 2)
out = torch.zeros(2, 6, 4, 8)
for bi in range(2):
    for h in range(4):
        g = h // 2  # the KV head of query head h
        for i in range(6):
            w = torch.softmax(torch.stack([qh[bi, h, i] @ kh[bi, g, j] / 8 ** 0.5 for j in range(i + 1)]), 0)
            out[bi, i, h] = sum(w[j] * vh[bi, g, j] for j in range(i + 1))
slow = attn.o_proj(out.reshape(2, 6, 32))
assert torch.allclose(fast, slow, atol=1e-5)
print("attention (GQA, causal) == per-head loop, max error", f"{(fast - slow).abs().max():.1e}")

# %%
# The document mask: two documents packed in one row of 6 positions.
print(document_causal_mask(torch.tensor([[1, 1, 1, 2, 2, 0]]))[0, 0].int())

# %% [markdown]
# The model: embedding, blocks, a final RMSNorm and an untied output head (DeepSeek LLM does not tie them).
# `generate` decodes with the cache: one forward over the prompt (prefill), then one token at a time.

# %%
#| export transformer
class Transformer(nn.Module):
    """The dense decoder-only LM. forward(input_ids (b, t)) -> logits (b, t, vocab)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init)

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.init_std)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.weight.numel() - self.lm_head.weight.numel()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """input_ids (b, t) -> logits (b, t, vocab).
        positions (b, t): RoPE positions (default 0..t-1, or following the cache's filled part).
        segments (b, t): document ids of packed rows; attention stays within a document (document_causal_mask).
        attn_mask (b, 1, t, past + t) bool, True where attention is allowed (default: causal).
        cache: a KVCache to decode incrementally; it is advanced by t.
        logits_to_keep: k > 0 computes the output head on the last k positions only, (b, k, vocab) (a prefill needs the
            last one); 0 keeps every position (transformers' name for the same option)."""
        c = self.config
        positions, attn_mask = forward_inputs(input_ids, positions, segments, attn_mask, cache, c.max_seq_len)
        cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_theta)
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, cache)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.lm_head(self.norm(x[:, -logits_to_keep:] if logits_to_keep > 0 else x))

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        """An empty KVCache for this model, on its device and in its dtype."""
        w = self.embed.weight
        return KVCache(self.config, batch_size, max_len, w.device, w.dtype)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 stop_id: int | None = None, pad_id: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue equal-length prompts (b, t0) with a KV cache: greedy when temperature is 0, else sampled.
        Rows that emit stop_id are padded with pad_id afterwards. Returns (b, t0 + n) with n <= max_new_tokens."""
        if max_new_tokens < 0 or temperature < 0:
            raise ValueError("max_new_tokens and temperature must be non-negative")
        b, t0 = input_ids.shape
        max_new_tokens = min(max_new_tokens, self.config.max_seq_len - t0)
        if max_new_tokens <= 0:
            return input_ids
        cache = self.new_cache(b, t0 + max_new_tokens)  # a model with another cache overrides new_cache
        logits = self(input_ids, cache=cache)[:, -1]
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        out = [input_ids]
        for i in range(max_new_tokens):
            if temperature == 0:
                nxt = logits.argmax(-1)
            else:
                nxt = torch.multinomial(F.softmax(logits.float() / temperature, -1), 1, generator=generator)[:, 0]
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            out.append(nxt[:, None])
            if stop_id is not None:
                done |= nxt == stop_id
                if bool(done.all()):
                    break
            if i + 1 < max_new_tokens:
                logits = self(nxt[:, None], cache=cache)[:, -1]
        return torch.cat(out, dim=1)

# %%
# Cached decoding must give the same logits as a full forward pass over the whole sequence.
torch.manual_seed(0)
c = TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=64, n_layer=2, n_head=4, n_kv_head=2)
m = Transformer(c).eval()
ids = torch.randint(0, c.vocab_size, (3, 20))
with torch.no_grad():
    full = m(ids)
    cache = KVCache(c, batch_size=3)
    steps = [m(ids[:, :8], cache=cache)]  # prefill 8 tokens, then a chunk of 4, then one at a time
    steps.append(m(ids[:, 8:12], cache=cache))
    steps += [m(ids[:, i:i + 1], cache=cache) for i in range(12, 20)]
cached = torch.cat(steps, dim=1)
print(f"cached vs full forward: max |difference| = {(cached - full).abs().max():.2e}; cache {cache.nbytes()} bytes")
assert torch.allclose(cached, full, atol=1e-5)

# %% [markdown]
# ## 4. The trainer
#
# DeepSeek LLM trains with AdamW ($\beta_1 = 0.9$, $\beta_2 = 0.95$, weight decay 0.1), gradient clipping at 1.0, and
# a **multi-step learning-rate schedule**: after 2000 warm-up steps, the peak rate until 80% of the training tokens,
# then 31.6% of the peak until 90%, then 10%. The paper reports the same final loss as a cosine schedule, with one
# practical gain: the first stage (80% of training) can be reused when you decide to train longer, because nothing in
# it depends on the total length. (A cosine schedule's every step does.)

# %%
#| export train
"""The trainer: AdamW, DeepSeek LLM's multi-step schedule (or cosine), clipping, evaluation, atomic checkpoints
and exact resume (chapter 00)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dslib.checkpoint import CheckpointError, load_checkpoint, read_trainer_state, save_checkpoint


def lr_at(step: int, total_steps: int, peak_lr: float, warmup_steps: int = 0, schedule: str = "multistep",
          final_ratio: float = 0.1) -> float:
    """The learning rate for optimizer step `step` (0-based) of `total_steps`.

    Both schedules warm up linearly over warmup_steps. "multistep" is DeepSeek LLM's (arXiv 2401.02954, section 2.3):
    the peak until 80% of training, 31.6% of it until 90%, then 10%. "cosine" decays from the peak to
    final_ratio x peak (10%, the same end point) over the steps after warm-up.
    """
    if schedule not in ("multistep", "cosine"):
        raise ValueError(f"schedule {schedule!r} is not one of ('multistep', 'cosine')")
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "multistep":
        frac = step / total_steps
        return peak_lr * (1.0 if frac < 0.8 else 0.316 if frac < 0.9 else 0.1)
    progress = (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)  # 0 after warm-up .. 1 at the last step
    return peak_lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class TrainConfig:
    """Pretraining hyperparameters. AdamW's betas and weight decay are DeepSeek LLM's (0.9, 0.95, 0.1)."""

    steps: int = 1000
    lr: float = 3e-3
    warmup_steps: int = 100
    schedule: str = "multistep"  # or "cosine"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 200  # held-out loss every this many steps (0: only at the end)
    checkpoint_every: int = 0  # save every this many steps when a checkpoint folder is given (0: only at the end)
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(name, allowed):
            raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")
        if not isinstance(self.steps, int) or self.steps < 1:
            bad("steps", "a positive int is required")
        if not self.lr > 0:
            bad("lr", "a positive number is required")
        if not isinstance(self.warmup_steps, int) or not 0 <= self.warmup_steps < self.steps:
            bad("warmup_steps", f"an int in [0, steps={self.steps}) is required")
        if self.schedule not in ("multistep", "cosine"):
            bad("schedule", "'multistep' or 'cosine' is required")
        if self.weight_decay < 0 or self.grad_clip < 0:
            bad("weight_decay" if self.weight_decay < 0 else "grad_clip", "a non-negative number is required")
        if not (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas)):
            bad("betas", "two numbers in [0, 1) are required")
        self.betas = tuple(self.betas)
        for name in ("eval_every", "checkpoint_every", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                bad(name, "a non-negative int is required")

# %%
total = 1000
steps = np.arange(total)
multi = [lr_at(s, total, 1.0, 50, "multistep") for s in steps]
cos_ = [lr_at(s, total, 1.0, 50, "cosine") for s in steps]
assert multi[799] == 1.0 and multi[800] == 0.316 and multi[899] == 0.316 and multi[900] == 0.1 and multi[49] == 1.0
assert abs(cos_[50] - 1.0) < 1e-9 and abs(cos_[-1] - 0.1) < 1e-4
fig, ax = plt.subplots(figsize=(7, 2.8))
ax.plot(steps, multi, label="multi-step (DeepSeek LLM)")
ax.plot(steps, cos_, label="cosine", ls="--")
ax.axvline(800, color="gray", lw=0.5)
ax.axvline(900, color="gray", lw=0.5)
ax.set_xlabel("step (of 1000)")
ax.set_ylabel("lr / peak")
ax.legend()
ax.set_title("Learning-rate schedules: both warm up, both end at 10% of the peak")
plt.show()

# %% [markdown]
# The trainer itself. Three properties matter for a course whose runs are stopped and restarted:
#
# - **Checkpoints are atomic and complete**: weights (safetensors), the model config (JSON), the optimizer's moments,
#   every random generator's state and the loss history, each written to a temporary file and renamed into place. A
#   crash mid-save leaves the previous checkpoint whole. Loading never unpickles, so a checkpoint cannot run code.
# - **Resume is exact**: the batch of step $s$ is a function of $s$ (`PackedData.batch`), so a run stopped at step
#   100 and resumed produces, bit for bit, the losses of a run that never stopped.
# - **A NaN or infinite loss stops the run** with an error naming the step, before the bad update reaches the weights.

# %%
#| export train
class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def masked_lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the positions where mask is true. logits (b, t, V), targets and mask (b, t)."""
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
    m = mask.flatten().float()
    return (losses * m).sum() / m.sum().clamp(min=1.0)


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The loss of a packed batch (world.PackedData): attention stays inside each document."""
    logits = model(batch["input_ids"], positions=batch["positions"], segments=batch["segments"])
    return masked_lm_loss(logits, batch["targets"], batch["loss_mask"])


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> float:
    """Token-weighted mean loss over batches, in nats per response token."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0.0
    for b in batches:
        b = {k: v.to(device) for k, v in b.items()}
        n = float(b["loss_mask"].sum())
        total += float(batch_loss(model, b)) * n
        count += n
    model.train(was_training)
    return total / max(count, 1.0)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not on norms' gains)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


class Trainer:
    """AdamW with warm-up and DeepSeek LLM's multi-step schedule (or cosine), gradient clipping, a progress bar,
    periodic held-out evaluation, atomic checkpoints and exact resume.

    data.batch(step) must give the batch of step `step` as a pure function of the step (world.PackedData does), so that
    a run resumed from a checkpoint sees the same batches, and produces the same losses, as an uninterrupted one.

    after_step(trainer, batch), when given, runs after each optimizer step (chapter 02 moves the MoE routing bias there).
    """

    def __init__(self, model: torch.nn.Module, data, config: TrainConfig, eval_batches: Sequence[dict] = (),
                 checkpoint_dir: str | Path | None = None, device: torch.device | str = "cpu",
                 loss_fn: Callable = batch_loss, after_step: Callable | None = None):
        self.model, self.data, self.config = model.to(device), data, config
        self.eval_batches, self.device, self.loss_fn = list(eval_batches), torch.device(device), loss_fn
        self.after_step = after_step
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                           betas=config.betas)
        self.step = 0
        self.history: dict[str, list] = {"step": [], "loss": [], "lr": [], "eval_step": [], "eval_loss": []}

    def lr(self, step: int) -> float:
        c = self.config
        return lr_at(step, c.steps, c.lr, c.warmup_steps, c.schedule)

    def state(self) -> dict:
        return {"step": self.step, "history": self.history, "config": asdict(self.config)}

    def save(self) -> Path:
        """Write a checkpoint of everything needed to continue exactly (model, optimizer, RNG, step, history)."""
        if self.checkpoint_dir is None:
            raise ValueError("this Trainer has no checkpoint_dir")
        cfg = self.model.config.to_dict() if hasattr(self.model, "config") else {}
        return save_checkpoint(self.checkpoint_dir, self.model, cfg, self.optimizer, self.state(), step=self.step)

    def resume(self) -> bool:
        """Continue from checkpoint_dir when it holds a checkpoint; returns whether it did."""
        if self.checkpoint_dir is None or not (self.checkpoint_dir / "model.safetensors").exists():
            return False
        saved = read_trainer_state(self.checkpoint_dir)["config"]  # check before anything is loaded
        saved = TrainConfig(**{**saved, "betas": tuple(saved["betas"])})
        if saved != self.config:
            raise CheckpointError(f"{self.checkpoint_dir}: saved with a different TrainConfig ({saved}); "
                                  f"resume with the same config or use a new folder")
        state = load_checkpoint(self.checkpoint_dir, self.model, self.optimizer)
        self.step, self.history = state["step"], state["history"]
        return True

    def evaluate(self) -> float:
        loss = evaluate_loss(self.model, self.eval_batches)
        self.history["eval_step"].append(self.step)
        self.history["eval_loss"].append(loss)
        return loss

    def fit(self, until: int | None = None, progress: bool = True) -> dict[str, list]:
        """Train from the current step to `until` (default: config.steps). Returns the history. On KeyboardInterrupt
        the state is saved (when there is a checkpoint folder) before the interrupt goes on; a NaN or infinite loss
        raises NonFiniteLossError without saving the bad state."""
        c = self.config
        until = c.steps if until is None else min(until, c.steps)
        self.model.train()
        bar = tqdm(total=until, initial=self.step, desc="train", disable=not progress, leave=True)
        if self.step == 0 and self.eval_batches and not self.history["eval_step"]:
            self.evaluate()  # the loss before training, as the curve's first point
        try:
            while self.step < until:
                lr = self.lr(self.step)
                for g in self.optimizer.param_groups:
                    g["lr"] = lr
                batch = {k: v.to(self.device) for k, v in self.data.batch(self.step).items()}
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
                    loss = self.loss_fn(self.model, batch)  # bf16 autocast on CUDA (full scale), fp32 elsewhere
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"loss is {loss.item()} at step {self.step} (lr {lr:.2e}); the weights were not updated. "
                        f"Lower the learning rate or check the data; the last checkpoint, if any, is intact.")
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if c.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
                self.optimizer.step()
                if self.after_step is not None:
                    self.after_step(self, batch)
                self.step += 1
                self.history["step"].append(self.step)
                self.history["loss"].append(loss.item())
                self.history["lr"].append(lr)
                bar.update(1)
                if self.step % 10 == 0 or self.step == until:
                    bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}")
                if self.eval_batches and c.eval_every and self.step % c.eval_every == 0:
                    bar.set_postfix(loss=f"{loss.item():.3f}", eval=f"{self.evaluate():.3f}")
                if self.checkpoint_dir is not None and c.checkpoint_every and self.step % c.checkpoint_every == 0:
                    self.save()
        except KeyboardInterrupt:
            if self.checkpoint_dir is not None:
                self.save()
                print(f"interrupted at step {self.step}: saved to {self.checkpoint_dir}; fit() again to resume")
            raise
        finally:
            bar.close()
        if self.step == c.steps and self.eval_batches and (not self.history["eval_step"]
                                                           or self.history["eval_step"][-1] != self.step):
            self.evaluate()
        if self.checkpoint_dir is not None:
            self.save()
        return self.history

# %% [markdown]
# Finally, evaluation by generation: prompts of equal length are decoded together with the KV cache, and the
# world's checker grades the answers.

# %%
#| export train
@torch.no_grad()
def complete(model: torch.nn.Module, tokenizer, prompts: Sequence[str], max_new_tokens: int = 64,
             temperature: float = 0.0, stop: str = "</answer>", seed: int = 0, batch_size: int = 256,
             device: torch.device | str = "cpu", progress: bool = False) -> list[str]:
    """Continue each prompt (KV-cached; greedy at temperature 0) until `stop` or max_new_tokens; returns the
    completions as text (the stop token included). Prompts are batched by length, so none needs padding."""
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    encoded = [tokenizer.encode(p, bos=True) for p in prompts]
    by_len: dict[int, list[int]] = {}
    for i, e in enumerate(encoded):
        by_len.setdefault(len(e), []).append(i)
    out: list[str] = [""] * len(prompts)
    stop_id = tokenizer.id(stop)
    chunks = [idx[s:s + batch_size] for _, idx in sorted(by_len.items()) for s in range(0, len(idx), batch_size)]
    for idx in tqdm(chunks, desc="generate", disable=not progress):
        x = torch.tensor([encoded[i] for i in idx], device=device)
        y = model.generate(x, max_new_tokens, temperature=temperature, stop_id=stop_id, pad_id=tokenizer.pad_id,
                           generator=gen)
        for row, i in zip(y[:, x.shape[1]:].tolist(), idx):
            out[i] = tokenizer.decode(row)
    return out


def evaluate_accuracy(model: torch.nn.Module, world, problems: Sequence | None = None, temperature: float = 0.0,
                      **kwargs) -> tuple[float, list[str]]:
    """Share of problems (default: the world's held-out set) whose completion's <answer> is right, and the completions.
    `world` supplies tokenizer, prompts(problems) and grade(completions, problems)."""
    problems = world.heldout if problems is None else problems
    completions = complete(model, world.tokenizer, world.prompts(problems), temperature=temperature, **kwargs)
    right = world.grade(completions, problems)
    return sum(right) / max(1, len(right)), completions

# %% [markdown]
# ## 5. Experiment: pretrain a base model on the world
#
# A DeepSeek LLM-style model of about 0.8M parameters (width 128, 4 layers, 4 heads) trained on packed rows of the
# corpus. At `small` scale this is about 1.2M tokens, a minute on two CPU cores; at `full` scale, a wider and deeper
# model on many more tokens. Chapters 05-06 start reinforcement learning from a model pretrained the same way, longer.

# %%
import shutil
import tempfile
from pathlib import Path

from dslib.book import build_dir

MAIN = dslib.sized(small=dict(d_model=128, n_layer=4, n_head=4, steps=500, batch=24),
                   full=dict(d_model=256, n_layer=6, n_head=8, steps=4000, batch=64))
SEQ_LEN = 96

torch.manual_seed(0)
data = PackedData([d.text for d in corpus], world.tokenizer, SEQ_LEN, MAIN["batch"], seed=0)
valid = PackedData([d.text for d in world.validation()], world.tokenizer, SEQ_LEN, 64, seed=0).all_batches()
config = TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=MAIN["d_model"], n_layer=MAIN["n_layer"],
                           n_head=MAIN["n_head"], max_seq_len=128)
model = Transformer(config)
print(f"{model.num_params():,} parameters; {MAIN['steps']} steps x {MAIN['batch']} rows x {SEQ_LEN} tokens = "
      f"{MAIN['steps'] * MAIN['batch'] * SEQ_LEN / 1e6:.2f}M tokens")

# Checkpoints go to _build/runs/00/base every 100 steps (and on Ctrl-C). Interrupted? `trainer.fit()` continues; in a
# new kernel, build the same Trainer and call `trainer.resume()` first. Running this cell starts afresh.
run_dir = build_dir() / "runs" / "00" / "base"
shutil.rmtree(run_dir, ignore_errors=True)
trainer = Trainer(model, data, TrainConfig(steps=MAIN["steps"], lr=3e-3, warmup_steps=50, schedule="multistep",
                                           eval_every=100, checkpoint_every=100), eval_batches=valid,
                  checkpoint_dir=run_dir, device=device)
t0 = time.time()
history = trainer.fit()
train_seconds = time.time() - t0
print(f"{train_seconds:.0f} s, {MAIN['steps'] * MAIN['batch'] * SEQ_LEN / train_seconds:,.0f} tokens/s; "
      f"held-out loss {history['eval_loss'][-1]:.3f} nats per response token")

# %%
fig, ax = plt.subplots(figsize=(8, 3.2))
ax.plot(history["step"], history["loss"], lw=0.6, alpha=0.6, label="training loss (per batch)")
ax.plot(history["eval_step"], history["eval_loss"], "o-", label="held-out loss")
ax.set_yscale("log")
ax.set_xlabel("step")
ax.set_ylabel("loss (nats per response token)")
ax2 = ax.twinx()
ax2.plot(history["step"], history["lr"], color="gray", lw=0.8, ls=":")
ax2.set_ylabel("learning rate", color="gray")
ax.legend(loc="upper center")
ax.set_title("Pretraining on the arithmetic world (multi-step schedule)")
plt.show()

# %% [markdown]
# Now the question that matters for the rest of the course: how many held-out problems does the base model solve? We
# decode greedily (always the most likely token) and by sampling at temperature 1, as reinforcement learning will.

# %%
model.to(device)
t0 = time.time()
greedy_acc, greedy_out = evaluate_accuracy(model, world, temperature=0.0, device=device)
sampled_acc, sampled_out = evaluate_accuracy(model, world, temperature=1.0, seed=0, device=device)
print(f"held-out accuracy: greedy {greedy_acc:.1%}, sampled (T=1) {sampled_acc:.1%}  "
      f"({2 * len(world.heldout)} completions in {time.time() - t0:.1f} s)")


def style_of(completion: str) -> str:
    if completion.startswith("</think>"):
        return "bare"
    return "reflects" if " wait " in completion else "steps"


right = world.grade(sampled_out)
by_style = {}
for c, ok in zip(sampled_out, right):
    by_style.setdefault(style_of(c), []).append(ok)
for s, oks in sorted(by_style.items()):
    print(f"  sampled, {s:>8}: {len(oks) / len(right):5.1%} of completions, accuracy {np.mean(oks):.1%}")
print("greedy styles:", {s: sum(style_of(c) == s for c in greedy_out) for s in ("bare", "steps", "reflects")})
for p, c, ok in list(zip(world.heldout, sampled_out, right))[:6]:
    print(f"{'right' if ok else 'wrong'} ({p.answer:02d}): {prompt(p)}{c}")

# %% [markdown]
# Two things to take from this (the pre-study saw the same): greedy decoding almost always picks the bare
# answer, the single most common style, so greedy and sampled accuracy differ and both are worth reporting; and the
# model has learned every style of the corpus, including "guess, wait, recompute", but executes them unreliably. There
# is room to improve, and the behaviours that reinforcement learning will amplify are already there, at low
# probability. That is the starting point of chapters 05 and 06.
#
# ### Multi-step against cosine
#
# DeepSeek LLM reports that the multi-step schedule reaches the same final loss as cosine. We compare both on a smaller
# model with everything else equal.

# %%
SCHED = dslib.sized(small=dict(d_model=64, n_layer=4, n_head=4, steps=400, batch=16),
                    full=dict(d_model=128, n_layer=4, n_head=4, steps=3000, batch=32))
sched_data = PackedData([d.text for d in corpus], world.tokenizer, SEQ_LEN, SCHED["batch"], seed=1)
curves = {}
for schedule in ("multistep", "cosine"):
    torch.manual_seed(1)
    m = Transformer(TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=SCHED["d_model"],
                                      n_layer=SCHED["n_layer"], n_head=SCHED["n_head"], max_seq_len=128))
    tr = Trainer(m, sched_data, TrainConfig(steps=SCHED["steps"], lr=3e-3, warmup_steps=40, schedule=schedule,
                                            eval_every=SCHED["steps"] // 8), eval_batches=valid, device=device)
    curves[schedule] = tr.fit()
final = {s: h["eval_loss"][-1] for s, h in curves.items()}
rel = final["multistep"] / final["cosine"] - 1
print(f"final held-out loss: multi-step {final['multistep']:.4f}, cosine {final['cosine']:.4f} ({rel:+.1%})")

fig, axes = plt.subplots(1, 2, figsize=(10, 3))
for s, h in curves.items():
    axes[0].plot(h["eval_step"], h["eval_loss"], "o-", label=s)
    axes[1].plot(h["step"], h["lr"], label=s)
axes[0].set_ylabel("held-out loss")
axes[0].set_yscale("log")
axes[1].set_ylabel("learning rate")
for ax in axes:
    ax.set_xlabel("step")
    ax.legend()
fig.suptitle("Multi-step vs cosine, same model, data and steps")
fig.tight_layout()
plt.show()

# %% [markdown]
# ### Checkpoints, resume and the NaN guard
#
# A run stopped half-way and resumed from its checkpoint must produce the same losses as one that never stopped. We
# check this bit for bit on a tiny model, then corrupt a checkpoint and poison a loss to see the errors.

# %%
def tiny_run(until: int | None, folder: Path, steps: int = 30) -> list[float]:
    torch.manual_seed(3)
    m = Transformer(TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=32, n_layer=1, n_head=2))
    tr = Trainer(m, PackedData(small, world.tokenizer, SEQ_LEN, 4, seed=0),
                 TrainConfig(steps=steps, lr=3e-3, warmup_steps=5, checkpoint_every=5), checkpoint_dir=folder)
    tr.resume()
    return tr.fit(until=until, progress=False)["loss"]


scratch = Path(tempfile.mkdtemp(prefix="ch00-resume-"))  # removed at the end of this cell
straight = tiny_run(None, scratch / "straight")
tiny_run(17, scratch / "stopped")  # stops at step 17 (a checkpoint is written at the end of fit)
resumed = tiny_run(None, scratch / "stopped")  # a fresh model and trainer, resumed from the folder
resume_exact = resumed == straight
print(f"stopped at 17 and resumed: {len(resumed)} losses, identical to the uninterrupted run: {resume_exact}")

(scratch / "stopped" / "model.safetensors").write_bytes(b"not a safetensors file")
try:
    tiny_run(None, scratch / "stopped")
except CheckpointError as e:
    print("CheckpointError:", str(e).replace(str(scratch), "<run folder>"))

nan_guard_fired = False
m = Transformer(TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=32, n_layer=1, n_head=2))
poisoned = lambda model, batch: batch_loss(model, batch) * float("nan")  # a loss gone bad
before = [p.detach().clone() for p in m.parameters()]
try:
    Trainer(m, PackedData(small, world.tokenizer, SEQ_LEN, 4), TrainConfig(steps=5, warmup_steps=1),
            loss_fn=poisoned).fit(progress=False)
except NonFiniteLossError as e:
    nan_guard_fired = all(torch.equal(a, p) for a, p in zip(before, m.parameters()))  # and no update was made
    print("NonFiniteLossError:", e)
shutil.rmtree(scratch)

# %% [markdown]
# ## 6. Explore the world
#
# Move the knobs of the world: the longest chain, how often plain steps slip, how much of the corpus reflects
# (guess-then-verify and slip-then-fix together), how much reasoning is written in words, and the seed. The explorer
# samples a fresh corpus and shows its style shares and a few documents. (Where no widget front end runs, as in CI, it
# shows the defaults.)

# %%
def show_world(max_operands=4, slip_rate=0.2, reflection_share=0.29, words_rate=0.1, seed=0):
    rest = 1.0 - reflection_share
    mix = {"bare": 0.58 / 0.71 * rest, "steps": 0.08 / 0.71 * rest, "slip": 0.05 / 0.71 * rest,
           "guess_verify": 26 / 29 * reflection_share, "slip_fix": 3 / 29 * reflection_share}
    w = World(n_docs=400, max_operands=max_operands, steps_slip_rate=slip_rate, mix=mix,
              en_rate=words_rate, switch_rate=min(0.05, 1 - words_rate), seed=seed)
    docs = w.corpus()
    st = corpus_stats(docs)
    fig, ax = plt.subplots(figsize=(7, 2.4))
    ax.bar(st["style"].keys(), st["style"].values())
    ax.set_ylabel("share")
    ax.set_title(f"400 documents: reflection {st['reflection_rate']:.0%}, answer right {st['correct_rate']:.0%}")
    plt.show()
    for d in docs[:8]:
        print(f"{d.style:>12} {d.language:>5} {'right' if d.correct else 'WRONG'}: {d.text}")


explore(show_world, max_operands=(2, 4, 1), slip_rate=(0.0, 1.0, 0.05), reflection_share=(0.0, 1.0, 0.01),
        words_rate=(0.0, 0.95, 0.05), seed=(0, 20, 1))

# %% [markdown]
# ## 7. Claims ledger
#
# What the papers claim next to what this chapter measured.

# %%
kv = {}
for n_kv in (4, 2, 1):
    c = TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=128, n_layer=4, n_head=4, n_kv_head=n_kv)
    kv[n_kv] = KVCache(c, batch_size=1, max_len=1).nbytes()
ledger = Ledger("00")
ledger.add("The multi-step schedule reaches the same final loss as cosine",
           "about the same (DeepSeek LLM, sec. 2.3)",
           f"{final['multistep']:.3f} vs {final['cosine']:.3f} nats ({rel:+.1%}), {SCHED['steps']} steps",
           abs(rel) < 0.02,
           "" if abs(rel) < 0.02 else "a short run: cosine decays from the start, multi-step holds the peak; the paper "
                                       "trains for 2T tokens")
ledger.add("GQA shrinks the KV cache by n_head / n_kv_head",
           "67B: 64 heads, 8 KV heads = 8x smaller (DeepSeek LLM, Table 2)",
           f"4 heads: {kv[4]} B/token MHA, {kv[2]} GQA-2, {kv[1]} MQA ({kv[4] / kv[2]:.0f}x, {kv[4] / kv[1]:.0f}x)",
           kv[4] / kv[2] == 2 and kv[4] / kv[1] == 4)
ledger.add("A tiny model pretrained on the world solves some held-out problems, not all",
           "course pre-study: greedy 5-11%, sampled 18-26% (3.95M tokens)",
           f"greedy {greedy_acc:.1%}, sampled {sampled_acc:.1%} ({MAIN['steps'] * MAIN['batch'] * SEQ_LEN / 1e6:.1f}M tokens)",
           0 < greedy_acc < 0.9 and 0 < sampled_acc < 0.9,
           "fewer tokens than the pre-study: sampled accuracy is lower")
ledger.show()
saved_to = ledger.save()  # _build/ledger/00.json: `python -m dslib.book ledger` prints every chapter's rows

# %% [markdown]
# ## Exercises
#
# 1. Change the corpus mix so that plain steps are common and reliable (say `steps` 30%, `guess_verify` 10%) and pretrain
#    again. How does the accuracy by style change? (The pre-study found that RL then favours plain steps over
#    reflection: keep this in mind for chapter 06.)
# 2. Train with `n_kv_head=1` (MQA) and `n_kv_head=2`. How much held-out loss does the smaller cache cost?
# 3. Re-run the schedule comparison for 4x the steps. Does the gap between multi-step and cosine close?
# 4. Make a harder world (`max_value=999`) and see what the tokenizer and the model make of three-digit numbers.
#
# ## Checks
#
# The chapter's key measurements, asserted (this is what the test suite checks).

# %%
assert history["eval_loss"][-1] < 0.7 < history["eval_loss"][0], history["eval_loss"]
assert 0.0 < greedy_acc < 0.9 and 0.0 < sampled_acc < 0.9, (greedy_acc, sampled_acc)
assert {"bare", "steps", "reflects"} <= set(by_style), by_style.keys()
assert all(np.isfinite(list(final.values()))) and abs(rel) < 0.2, final
assert resume_exact and nan_guard_fired
print(f"chapter 00 checks passed; {time.time() - CHAPTER_START:.0f} s since set-up")
