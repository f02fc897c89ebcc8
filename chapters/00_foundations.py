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
# 5. a base model of about 0.8M parameters pretrained on the world, its held-out accuracy (greedy and sampled), the
#    multi-step schedule against cosine, and `Transformer.to_hf` / `from_hf`, which take it to and from Hugging Face
#    transformers as a Llama model with the world's tokenizer (section 5);
# 6. an explorer for the world's knobs (section 6) and the claims ledger (section 7).
#
# **What you need.** This is the first chapter: Python, a little PyTorch (modules, tensors, `loss.backward()`) and the
# course's dependencies, which the set-up cell installs where they are missing (as on Colab). Nothing from other
# chapters. **How long.** The chapter is budgeted at about 3 minutes at `small` scale on 2 CPU cores, most of it the
# pretraining runs of section 5, which print their own time. Reading it with care takes longer: sections 2-4 are
# the library that every later chapter imports, and each piece is checked against a slow reference right after it is
# built.
#
# **Why it matters for DeepSeek.** Each later chapter changes one piece of what is built here. Chapter 02 keeps the
# SwiGLU block as its expert and uses the trainer's `after_step` hook for V3's balancing bias; chapter 03 replaces the
# attention and its KV cache with MLA and reuses the RoPE functions; chapter 04 assembles a V3-mini from those parts;
# chapters 05-08 prompt the model with this world's problems, grade its answers with this world's checker and train
# with this trainer. A bug here would surface in every chapter, which is why this one checks so much.
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

# DSLIB_REPOSITORY: where to clone from instead (a fork, a local clone); the tests use it
REPOSITORY = os.environ.get("DSLIB_REPOSITORY", "https://github.com/deepseek-from-scratch/deepseek-from-scratch")
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
from dslib.book import Ledger, run_solutions
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
# AIME, and the 32B student beats QwQ-32B-Preview, a reasoning model of the same size. Chapter 08 rebuilds this step.

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
# Each chapter rebuilds one idea from the list above, in the order in which the papers build on each other. The
# table reads the chapter column of the papers' file, so a paper that two chapters share (R1) appears twice.

# %%
COURSE = [
    ("00", "the family, the arithmetic world, a DeepSeek LLM transformer"),
    ("01", "scaling laws"),
    ("02", "Mixture-of-Experts (with V2/V3 load balancing)"),
    ("03", "Multi-head Latent Attention (MLA)"),
    ("04", "multi-token prediction and a V3-mini"),
    ("05", "GRPO"),
    ("06", "R1-Zero and the aha moment"),
    ("07", "DeepSeek-R1's four stages and language consistency"),
    ("08", "distillation"),
]
FALLBACK = {"00": "the whole family (overview)", "08": "DeepSeek-R1 (2501.12948), its distilled models"}
width = max(len(topic) for _, topic in COURSE) + 2
print(f"{'ch':<4}{'topic':<{width}}papers")
for number, topic in COURSE:
    rebuilt = [f"{p['key']} ({p['arxiv']})" for p in papers if number in (p["chapter"] or "").split(";")]
    print(f"{number:<4}{topic:<{width}}{', '.join(rebuilt) or FALLBACK.get(number, '-')}")

# %% [markdown]
# The order is also the order of the code: a chapter imports only from the chapters before it. What the miniature
# keeps from the papers is the equations, the shapes of the tensors and the training recipes; what it drops is the
# scale (a million parameters, not hundreds of billions) and the data (a synthetic world, not trillions of tokens of
# web text). The next section builds that world.
#
# ## 2. The arithmetic world
#
# DeepSeek-R1-Zero was trained on problems whose answers a rule can check (maths with a final answer, code with tests).
# Our miniature needs the same: problems that a ~1M-parameter model can partly learn on a CPU, answers that a
# few lines of code verify, and a pretraining corpus that already contains, rarely and unreliably, the behaviours that
# reinforcement learning will later amplify: writing out steps, slipping, and stopping to say "wait" and recheck.
#
# Why verifiable answers? R1-Zero's rewards are rules, not a learned reward model (R1 paper, section 2.2.2): an
# *accuracy* reward that checks the final answer, and a *format* reward that checks the reasoning sits between
# `<think>` tags. A rule can only check what has one right answer, so every problem of our world has exactly one,
# computed by the world itself. A document of the corpus looks like this (the spaces matter; each tag is one token):
#
# ```
# Q:07+35-12 <think>07+35=42 42-12=30</think> <answer> 30 </answer>
# ```
#
# The design follows a pre-study of what such a world needs:
#
# - **Problems** are chains of 2-4 numbers joined by `+` and `-` (1-3 operations), every number and every intermediate
#   result in 0..99, written zero-padded (`07+35-12`). Zero-padding gives every number the same number of characters,
#   so every worked step has the same layout and a long chain stays harder to answer at once than step by step. That
#   gap is what RL needs: if a bare answer were as good as worked steps, there would be nothing for it to amplify.
# - **Held-out problems** (400, with 3-4 numbers) are fixed by their own seed, so every chapter evaluates on the same
#   problems, and none of them ever appears in the corpus.
# - **Solution styles** in the corpus: a bare answer (58%), plain steps (8%, a fifth of them with an uncorrected slip),
#   guess-then-verify (26%: a quick guess, right 30% of the time, then " wait " and the full computation), slip-then-fix
#   (3%: a wrong step, " wait ", the step redone) and a slip left in (5%).
# - **Two surface languages** for the reasoning: symbols (`07+35=42`) and words (`07 plus 35 is 42`), and some
#   solutions that switch part-way. Chapter 07 uses them to show R1's language mixing and its language-consistency
#   reward.
#
# Two shares follow from the mix by arithmetic, and they are worth knowing before you look at the corpus. A document
# reflects (contains " wait ") when it is guess-then-verify or slip-then-fix: at most $26\% + 3\% = 29\%$ of the
# corpus. Its final answer is wrong only for a slip left in, or for the fifth of plain-step solutions that carry one:
# at most $5\% + 0.2 \times 8\% = 6.6\%$, so at least 93.4% of the corpus ends in a right answer. (A slip is dropped
# when no wrong value fits in range, which moves both shares a little toward "right, no slip".) The corpus is not a
# teacher that is always right; it is a record of a careless student who sometimes checks the work.
#
# The module starts with its configuration, which validates itself. The fields come in four groups: the difficulty
# (`max_value`, the operand counts, `ops`), the held-out set (`n_heldout`, its own operand counts and `heldout_seed`),
# the corpus (`n_docs`, `seed`, `mix` and the rates that shape each style), and the language knobs. Chapter 07 turns
# on `prompt_en_rate` to state some problems in words; at its default of 0 the world is this chapter's.

# %%
#| default_exp world

# %%
#| export
"""The arithmetic world: problems with verifiable answers, worked solutions in R1-Zero's format, the pretraining corpus,
the tokenizer and packed batches (chapter 00)."""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from dslib.checkpoint import atomic_write_text

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
# A `ValueError` at construction, naming the field, beats a world that quietly builds something else: a config with
# `max_operands=1` would give problems with nothing to compute, and the first symptom would be a strange training
# curve minutes later.
#
# A problem is its operands and operators; its intermediate values follow. `sample_problem` draws each next operand so
# that the running value stays in range: after a running value $v$, the next operand of a `+` is drawn from
# $0..(99 - v)$ and that of a `-` from $0..v$. Drawing whole chains and rejecting those that leave the range would be
# slower, and would make long chains rarer than short ones. `Problem` is frozen (immutable and hashable), so it can be
# a dictionary key and can be shared between chapters without being changed by accident. Its `language` field says how
# the problem is *stated*; the default world states every problem in symbols.

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
# The reference is Python's own parser, run on the problem's text. Two details make it work: Python 3 refuses integer
# literals with a leading zero (`07`), so the check strips the padding first, and `eval` is safe here only because the
# text comes from our own generator inside a test. Model output is another matter: the answer checker below parses it
# and never evaluates it.
#
# ### Worked solutions
#
# A step is written in symbols or in words. A document is a problem plus a solution in R1-Zero's format; the prompt is
# the problem followed by an opened `<think>` tag, so a model continues with its reasoning. DeepSeek-R1's own template
# (its Table 1) wraps the question in a paragraph of instructions; at 128 tokens of context our models cannot afford it,
# so `r1_zero_prompt` keeps it for reference and `prompt` is the compact form every chapter uses.
#
# Ending the prompt with `<think>` does two jobs. At generation time it forces the model to start with reasoning (or
# to close the tag at once, which is how a bare answer looks: `<think></think> <answer> 42 </answer>`). At training
# time it marks where the *response* begins: the loss is computed only after it (see "Packed batches" below). A
# `Document` keeps the parts apart: `prompt`, `completion` (the think text, the closing tag and the answer) and `text`
# (both), with `correct` and `reflects` as the two facts that the later chapters' measures are built on.

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
#
# Three helpers write them. `_slipped_chain` picks a wrong value for step `at` and recomputes every later value from
# it, trying up to 20 offsets; it gives up (returns None) when none keeps the chain in 0..99. `_steps` renders the
# steps from a list of values, one language per step, and with `fix_at` it writes the slipped step, " wait ", the same
# step with the true value, and then continues from the true value. `make_document` chooses the style's ingredients
# and hands them to `_steps`.
#
# One design choice in guess-then-verify deserves attention: the " wait " and the full computation follow the guess
# *always*, also when the guess was right. So in the corpus, writing " wait " is a reliable road to a careful
# computation, whatever came before it. That is what chapter 06's RL can find and amplify; a corpus in which " wait "
# only followed wrong guesses would teach a different lesson.

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

# %% [markdown]
# `make_document` first settles the language of the reasoning, then the style. Left to the config (`language=None`),
# a problem in symbols gets words with probability `en_rate` (10%), a switch part-way with `switch_rate` (5%) and
# symbols otherwise; a worded problem gets words with probability `en_prompt_consistency` $= c$, and the remaining
# $1 - c$ splits 2:1 between symbols and a switch. A switch needs two steps at least, so a one-operation problem falls
# back to a single language. Then, in order: a bare answer has no reasoning at all; guess-then-verify draws a guess
# (the true answer 30% of the time, else a value within 12 of it); every other style may carry a slip, and only
# slip-then-fix repairs it.

# %%
#| export
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
# Read the table of one problem in every style and language: the WRONG rows are the slips left in (and plain steps
# when they drew a slip), and every right row that reflects has " wait " in its think text. The last line is R1's
# full template around the same problem; count its characters against the 128-token context to see why the compact
# prompt is used instead.
#
# ### The tokenizer
#
# Characters, plus special tokens that are single ids: padding, begin and end of document, the four tags, and " wait "
# (with its spaces, so that deciding to reflect is one decision for the model). Encoding the whole corpus one character
# at a time in Python would take seconds, so `encode_many` swaps each special for a private-use character and maps code
# points through one NumPy lookup table. Any character outside the vocabulary is an error that names it.
#
# Why characters, when DeepSeek LLM uses a byte-level BPE vocabulary of about 100k entries (section 2.1)? Two reasons.
# Arithmetic is about digits, and DeepSeek's tokenizer too splits numbers into single digits; at character level that
# happens by itself. And a vocabulary of $8 + 96 = 104$ tokens (the specials, then newline and the 95 printable ASCII
# characters) keeps the embedding and output matrices tiny, so almost all of a 0.8M-parameter model is transformer
# blocks.
#
# The first cell holds the vocabulary; the second the class. Ids 0-7 are the specials, in the order of
# `SPECIAL_TOKENS` (so `<pad>` is 0), and ids 8 onward are the characters.

# %%
#| export
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<think>", "</think>", "<answer>", "</answer>", " wait ")
CHARS = "\n" + "".join(chr(c) for c in range(32, 127))  # newline and printable ASCII
_PRIVATE = 0xE000  # specials are swapped for private-use code points while encoding
_PRIVATE_RE = re.compile("[\ue000-\uf8ff]")

# %% [markdown]
# The class inherits one method from a small mixin: `to_hf`, which writes the tokenizer's files for Hugging Face
# transformers. It is built in section 5 ("Take the model anywhere"), next to the model's own export.

# %%
#| export
class HFTokenizerFiles:
    """Tokenizer's export for Hugging Face transformers (the work is done by write_hf_tokenizer, section 5)."""

    def to_hf(self, directory: str | Path, model_max_length: int | None = None) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into directory, so that
        transformers.AutoTokenizer.from_pretrained(directory) gives this tokenizer's ids (see write_hf_tokenizer)."""
        return write_hf_tokenizer(self, directory, model_max_length)

# %% [markdown]
# The fast path has two pitfalls, and the class handles both. Specials are swapped longest first, so that no shorter
# special can match inside a longer one. And a text that already contains a private-use character would be read as a
# special token; such a text is refused along with any other character outside the vocabulary, and the slow scan
# `_first_unknown` runs only then, to name the text, the position and the character.

# %%
#| export
class Tokenizer(HFTokenizerFiles):
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
# `encode_slow` is the definition of the tokenizer in six lines: scan left to right and take a special token wherever
# one starts. The fast encoder must agree with it on every document, and decoding must give the text back. In the
# printed ids, look for the single id of " wait " (7) and of `<think>` (3) among the character ids. The `×` sign is
# refused with its code point, which is the error you want when a new world adds an operator and forgets the
# vocabulary.
#
# ### The answer checker
#
# Rewards in chapters 05-07 depend on reading the model's answer, and model output is data: it is parsed, never
# evaluated. `parse_answer` accepts only an integer inside the first `<answer> … </answer>`, and returns None, rather
# than raising, for anything else.
#
# Each rule of the pattern closes a door that RL would otherwise find. Under a reward that pays for a right answer, a
# policy is pushed toward anything the checker accepts, so the checker must accept exactly the answers we mean:
#
# - `re.ASCII` makes `[0-9]` mean the ten ASCII digits, since Python's `int()` also accepts other scripts' digits;
# - at most 12 digits, with optional spaces or tabs around them, and nothing else inside the tags;
# - only the *first* answer tag counts: a model that writes several answers, hoping one is right, is graded on the
#   first, and if the first holds something that is not an integer, the answer is None even when a later tag is fine.
#
# R1 made the same choice at scale: rule-based rewards, because a neural reward model "may suffer from reward
# hacking" (R1 paper, section 2.2.2).

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
# The cases are the ways a completion can go wrong: spaces inside the number, code, scientific notation, another
# script's digits, two answers, no tags, and not a string at all. The assert requires the expected value for each,
# and none may raise, which is what a reward function needs: one odd completion in a batch of a thousand must not
# crash a run.
#
# ### The world: held-out problems, the corpus, a validation set
#
# `World` ties it together. Everything is a pure function of the config. The held-out set depends only on the
# difficulty and `heldout_seed`, so changing the corpus mix or its seed never changes what chapters are evaluated on.
#
# Three choices make that hold. Each random stream is seeded by a string that names its purpose (`"heldout-2024"`,
# `"corpus-0"`): Python seeds a `random.Random` from a string by hashing its bytes, the same way on every machine, and
# each purpose gets its own stream. The held-out problems are drawn first and kept in a set, and `sample_problem`
# redraws any training problem that matches one in operands and operators, in either language, so no held-out problem
# reaches the corpus, not even stated in words. And the corpus is built once, on first use, and cached, since the
# default 150,000 documents take a moment to write.
#
# The validation documents are solutions of the *held-out* problems, in the corpus's mix of styles. Their loss
# measures what the held-out accuracy measures, the model on problems it has never seen, but with a smooth number
# that moves at every step, where accuracy needs a whole decoding pass.

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

# %% [markdown]
# `corpus_stats` summarises any list of documents: the shares of styles, languages and chain lengths, how many
# reflect, how many end in a right answer, and their lengths in characters. The explorer of section 6 uses it on
# freshly drawn corpora.

# %%
#| export
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

# %% [markdown]
# The three asserts are the promises of the class docstring: the held-out set has its 400 problems and none of them
# is in the corpus; another corpus seed leaves the held-out problems as they are; and two builds of the same config
# give the same texts. The plot below shows the corpus itself. Compare its bars with the mix (bare 58%, steps 8%,
# guess-then-verify 26%, slip-then-fix 3%, slip 5%) and the printed reflection and correctness rates with the bounds
# worked out at the start of this section.

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
# Documents are short (the histogram above prints their mean length in tokens), far shorter than a row of 96 tokens,
# so one row holds several. Packing them wastes little compute on padding, but a document must not attend to its
# neighbours, and its positions restart at 0 (exercise 2 asks why, under RoPE, that is a choice and not a
# necessity): each batch carries segment ids (for a block-diagonal causal mask) and per-document positions (for
# RoPE). The loss is on the response only (everything after `<think>`), as in the pre-study: the model learns to
# solve, not to pose problems. A batch is a pure function of the step, which is what makes resuming exact.
#
# One packed row, drawn small (two documents and padding; a real row is 97 tokens wide):
#
# ```
# token     <bos> Q : 0 7 + 3 5 <think> ... <eos>  <bos> Q : ... <eos>  <pad> <pad>
# segment     1   1 1 1 1 1 1 1    1    ...   1      2   2 2 ...   2      0     0
# position    0   1 2 3 4 5 6 7    8    ...         0   1 2 ...         0     0
# response    .   . . . . . . .    .    x x   x      .   . . ... x      .     .
# ```
#
# The row is $t+1$ tokens wide because the inputs are its first $t$ tokens and the targets its last $t$ (the same row
# shifted by one). The loss of a batch is the mean cross-entropy over the positions $i$ whose mask $m_i$ is on:
#
# $$\mathcal{L} = \frac{\sum_{i} m_i \,\bigl(-\log p_\theta(x_{i+1} \mid x_{\le i})\bigr)}{\sum_i m_i}, \qquad
# m_i = [\mathrm{seg}_{i+1} = \mathrm{seg}_i] \cdot [\mathrm{seg}_{i+1} > 0] \cdot [x_{i+1} \in \text{response}].$$
#
# The first factor drops the step from one document's `<eos>` to the next one's `<bos>`, which no model can predict;
# the second drops padding; the third drops the prompt. Packing is greedy and whole-document: documents are taken in
# an order drawn from the seed, and a new row starts when the next one does not fit, so a document never spans two
# rows. The constructor does it for all 150,000 documents at once with NumPy index arithmetic instead of a Python loop
# per token: `local` is each token's position within its document, `where` its flat index in the rows array.

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

# %% [markdown]
# `rows_to_batch` turns raw rows ($t+1$ wide) into the tensors the model and the loss read, each $(b, t)$: inputs and
# targets shifted by one, positions and segments of the inputs, and the loss mask of the equation above. Keeping it a
# separate function lets evaluation (`all_batches`) and training (`batch`) share it.

# %%
#| export
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
# The reference does by hand, with loops, what the constructor does with index arithmetic: it cuts each raw row into
# its documents by segment id, checks that every document it finds is one of the inputs, that positions count 0, 1,
# 2, ... inside each, and it rebuilds the loss mask from "the target comes after the document's `<think>`". A
# disagreement anywhere in the 8 rows would fail the assert. The last assert builds a second `PackedData` from the
# same texts and seed and asks for batch 5 directly: the same batch, without replaying steps 0-4, which is what exact
# resume rests on.

# %% [markdown]
# ## 3. The DeepSeek LLM transformer
#
# DeepSeek LLM (arXiv 2401.02954, section 2.2) follows LLaMA's design closely: a decoder-only transformer with
# pre-normalisation by RMSNorm, SwiGLU feed-forward layers (hidden width about 8/3 of the model width), and Rotary
# Position Embedding. The 67B model replaces multi-head attention by grouped-query attention (64 query heads sharing 8
# key-value heads) to shrink the KV cache at inference. We build exactly that, small, with a KV cache for decoding.
#
# A layer (a `Block`) is two residual branches, each behind its own RMSNorm. For the hidden states $x$ of shape
# $(b, t, d)$ (batch, positions, model width):
#
# $$h = x + \mathrm{Attention}\bigl(\mathrm{RMSNorm}_1(x)\bigr), \qquad
# y = h + \mathrm{SwiGLU}\bigl(\mathrm{RMSNorm}_2(h)\bigr).$$
#
# "Pre-norm" means the norm sits at the entrance of each branch, not after the sum, so the residual stream $x \to h
# \to y$ is never normalised inside the stack: each layer adds to it. A final RMSNorm comes before the output head. The
# model is then: embed the tokens, apply $n_{layer}$ blocks, normalise, project to the vocabulary.
#
# | | DeepSeek LLM 7B | DeepSeek LLM 67B | this chapter (`small`) |
# |---|---|---|---|
# | layers | 30 | 95 | 4 |
# | width $d$ | 4096 | 8192 | 128 |
# | query heads / KV heads | 32 / 32 (MHA) | 64 / 8 (GQA) | 4 / 4 (MHA) |
# | training tokens | 2T | 2T | about 1.2M |
#
# (The paper's numbers are from its Table 2.) The configuration validates itself. Names follow DeepSeek's reference
# code where it has them. Two of its rules come from the parts below: the head dimension $d / n_{head}$ must be even,
# because RoPE rotates features in pairs, and $n_{kv\_head}$ must divide $n_{head}$, because each KV head serves an
# equal group of query heads. The default feed-forward width is $\tfrac83 d$ rounded up to a multiple of 32 (352 for
# $d = 128$). Why $\tfrac83$: SwiGLU has three matrices where the classic feed-forward block has two, and
# $3 \cdot d \cdot \tfrac83 d = 8d^2 = 2 \cdot d \cdot 4d$, the same parameter count as the classic block of width
# $4d$ (an identity).

# %% [markdown]
# The whole model on one page. Data flows left to right; the dashed frame is one `Block`, repeated $n_{layer}$ times;
# the lines above the boxes are the residual stream, which each branch adds to and no norm touches.

# %%
from dslib.diagram import Diagram


def draw_deepseek_llm():
    """The DeepSeek LLM decoder as this section builds it: embedding, n_layer pre-norm blocks, final norm, head."""
    d = Diagram(13.6, 3.4, "The DeepSeek LLM transformer (arXiv 2401.02954, section 2.2): a LLaMA-style decoder")
    y, h = 0.9, 1.1
    d.box(0.1, y, 1.2, h, "token ids\n(b, T)", "baseline")
    d.box(1.6, y, 1.1, h, "embedding\n(V, d)", "model")
    d.box(3.1, y, 1.0, h, "RMSNorm", "stage")
    d.box(4.4, y, 2.0, h, "attention\nRoPE on q and k\nGQA: n_kv KV heads\nKV cache when decoding", "stage")
    d.box(6.7, y + 0.35, 0.4, 0.4, "+", "measure", fontsize=10)
    d.box(7.4, y, 1.0, h, "RMSNorm", "stage")
    d.box(8.7, y, 1.7, h, "SwiGLU\nW_down(silu(W_gate x)\n* W_up x)", "stage")
    d.box(10.7, y + 0.35, 0.4, 0.4, "+", "measure", fontsize=10)
    d.box(11.4, y, 2.1, h, "RMSNorm, then the\noutput head (d, V):\nlogits (b, T, V)", "model")
    mid = y + h / 2
    for x0, x1 in ((1.3, 1.6), (2.7, 3.1), (4.1, 4.4), (6.4, 6.7), (7.1, 7.4), (8.4, 8.7), (10.4, 10.7),
                   (11.1, 11.4)):
        d.arrow(x0, mid, x1, mid)
    for x0, x1 in ((2.9, 6.9), (7.25, 10.9)):  # the residual stream skips each branch
        d.ax.plot([x0, x0, x1], [mid, 2.45, 2.45], color="#333333", lw=1.3)
        d.arrow(x1, 2.45, x1, y + 0.75)
    d.ax.text(4.9, 2.55, "residual: x + Attention(RMSNorm(x))", fontsize=7.5, color="#555555", ha="center")
    d.ax.text(9.1, 2.55, "residual: h + SwiGLU(RMSNorm(h))", fontsize=7.5, color="#555555", ha="center")
    d.ax.add_patch(plt.Rectangle((2.85, 0.55), 8.45, 2.35, fill=False, ls="--", lw=1.0, ec="#777777"))
    d.ax.text(7.1, 0.63, "one Block, repeated n_layer times (pre-norm: each branch normalises its own input)",
              fontsize=7.5, color="#555555", ha="center")
    d.show()


draw_deepseek_llm()

# %%
#| export transformer
"""The DeepSeek LLM transformer: RMSNorm, RoPE, SwiGLU, grouped-query attention and a KV cache (chapter 00)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from dslib.checkpoint import atomic_write_text


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
# **RMSNorm** (Zhang and Sennrich, 2019) rescales each vector by its root mean square, with no mean subtraction and no
# bias, then multiplies by a learned gain $g$ (initialised to ones):
#
# $$\mathrm{RMSNorm}(x) = \frac{x}{\sqrt{\tfrac1d\sum_{i=1}^{d} x_i^2 + \epsilon}} \odot g .$$
#
# Against LayerNorm it drops the mean subtraction and the bias: one statistic per vector instead of two, and no bias
# parameters. It keeps what a pre-norm block needs, an input to each branch at a fixed scale. The class computes in
# float32 whatever the input's dtype: a mean of squares over $d$ features is where bfloat16's short mantissa would
# lose the most, and under CUDA autocast (section 4) the activations arrive in bfloat16.
#
# **RoPE** (Rotary Position Embedding, from the RoFormer paper) encodes positions by rotating the queries and keys, not
# by adding a vector to the embeddings. The head dimension $d_h$ is cut into $d_h/2$ pairs, and pair $i$ of the vector
# at position $p$ is rotated by the angle $p\,\omega_i$:
#
# $$\begin{pmatrix} x'_{2i} \\ x'_{2i+1} \end{pmatrix} =
# \begin{pmatrix} \cos p\omega_i & -\sin p\omega_i \\ \sin p\omega_i & \cos p\omega_i \end{pmatrix}
# \begin{pmatrix} x_{2i} \\ x_{2i+1} \end{pmatrix}, \qquad \omega_i = \mathrm{base}^{-2i/d_h},\ \ i = 0, \dots,
# d_h/2 - 1 .$$
#
# Because a rotation by $a$ followed by the inverse of a rotation by $b$ is a rotation by $a-b$, the dot product of a
# rotated query at position $m$ and a rotated key at position $n$ is
# $\langle R_m q, R_n k \rangle = \langle q, R_{n-m} k \rangle$: it depends only on their distance. The frequencies
# fall geometrically: with base 10000 and $d_h = 32$ (our heads), pair 0 turns by one radian per position and the last
# pair by $10000^{-30/32} \approx 1.8 \times 10^{-4}$ radians, so some pairs resolve neighbours and others barely move
# across the whole context.
#
# Shapes: `rope_cos_sin` turns positions $(b, t)$ into cos and sin of shape $(b, t, d_h/2)$, computed once per forward
# and shared by every layer and head; `apply_rope` takes queries or keys $(b, h, t, d_h)$. The positions come from the
# batch, and for packed rows they restart at 0 in each document, so a document's attention scores are the same
# whichever documents share its row.
#
# We rotate interleaved pairs $(x_{2i}, x_{2i+1})$, as RoFormer and DeepSeek's reference code do. The pitfall: the
# Llama code in transformers rotates the two *halves* of the head instead, pairing $x_i$ with $x_{i + d_h/2}$. Both are
# RoPE, but the same weights give different outputs under the two conventions, so moving weights between them needs a
# permutation of the query and key projections.

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
# Each check uses an independent definition. RMSNorm is compared with its formula written out. RoPE is compared with
# its complex form: a pair $(a, b)$ read as the complex number $a + ib$ and multiplied by $e^{i p \omega_i}$, which is
# the same rotation written another way, computed by different code. The relative-position property is tested on
# scores: the pairs (5, 2) and (40, 37) are both 3 apart and must score the same, while (5, 3), 2 apart, differs.
#
# **SwiGLU** (Shazeer, 2020) is a gated feed-forward block. With $W_1$ = `gate_proj`, $W_3$ = `up_proj` (both
# $d \to d_{ff}$) and $W_2$ = `down_proj` ($d_{ff} \to d$):
#
# $$\mathrm{FFN}(x) = W_2\bigl(\mathrm{SiLU}(W_1 x) \odot W_3 x\bigr), \qquad \mathrm{SiLU}(z) = z\,\sigma(z).$$
#
# One branch decides, feature by feature, how much of the other passes. The layer names are the ones transformers uses
# for Llama and DeepSeek models, so a checkpoint maps onto them name for name. Chapter 02's experts are this same
# block, many of them, each narrow.
#
# **Attention** with $n_{kv}$ key-value heads: each serves $g = n_{head}/n_{kv}$ query heads (GQA; $n_{kv} = n_{head}$
# is MHA, $n_{kv}=1$ MQA). Query head $j$ reads KV head $\lfloor j / g \rfloor$, and for each head
#
# $$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{Q K^\top}{\sqrt{d_h}} + M\right) V,$$
#
# where $M$ is 0 where attention is allowed and $-\infty$ where it is not (the causal and document mask). During
# decoding the keys and values of past positions do not change, so a **KV cache** keeps them: each new token costs one
# row of attention instead of recomputing the whole prefix. Its size per token, $2\,n_{layer} n_{kv} d_{head}$ numbers
# (DeepSeek-V2, Table 1, writes it $2 n_g d_h l$ for GQA), is what GQA shrinks, and what MLA (chapter 03) shrinks much
# further.
#
# The code comes in three cells. The first holds `SwiGLU` and the `KVCache`. The cache is allocated once at its full
# length, $(b, n_{kv}, \text{max\_len}, d_h)$ per layer, and filled in place. Growing it with `torch.cat` at every step
# would copy the whole cache each time. `update` writes at offset `length` in every layer, and the model, not the
# layer, advances `length` once per forward, after all layers have written. `select_rows` lets a decoder drop rows
# that have finished.

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

# %% [markdown]
# The second cell is attention and the block. `Attention.forward` projects $x$ $(b, t, d)$ to queries
# $(b, n_{head}, t, d_h)$ and keys and values $(b, n_{kv}, t, d_h)$, rotates queries and keys with RoPE, appends keys
# and values to the cache when there is one, and calls PyTorch's `scaled_dot_product_attention`. GQA takes one of two
# paths:
#
# - **training, no cache**: each KV head is repeated for its $g$ query heads (`repeat_interleave` keeps the order
#   $\lfloor j/g \rfloor$), and attention runs as plain multi-head attention;
# - **decoding with a cache**: repeating would copy the whole cache $g$ times per step. Instead the $g$ query heads of
#   a group are folded into extra *rows* of one query tensor of shape $(b, n_{kv}, g\,t, d_h)$, which reads its KV
#   head as it is. The query heads of a group are adjacent (head $j = \lfloor j/g \rfloor g + r$), so a reshape does it,
#   and the mask is expanded to the same $g\,t$ rows.
#
# `Block` is the pre-norm layer of the equation at the top of this section, in two lines.

# %%
#| export transformer
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

# %% [markdown]
# The third cell builds the masks. `document_causal_mask` allows position $i$ to see position $j$ when $j \le i$ and
# both carry the same segment id: a block-diagonal causal mask, one block per document. `forward_inputs` is the
# preamble that every dslib language model runs before its layers (chapter 03's MLA model and chapter 04's V3-mini
# call it too). It picks the positions (from the batch, or $0..t-1$ after the cache's filled part) and the mask. The
# least obvious case is a chunk of $t > 1$ new tokens after `past` cached ones: query $i$ of the chunk may see keys
# $0 .. \text{past} + i$, which is a lower-triangular matrix of shape $(t, \text{past} + t)$ shifted right by `past`
# (`tril(past)`).

# %%
#| export transformer
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

# %% [markdown]
# The reference spells attention out as its definition: for every row, head and query position, a softmax over the
# scaled dot products with the keys at positions $0..i$, and the weighted sum of the values, reading KV head
# $\lfloor h/2 \rfloor$ for query head $h$. It shares the projections with the module but none of its reshapes, its
# GQA path or PyTorch's fused kernel, so an error in any of those (a wrong head order, a missing scale, a mask off by
# one) shows up as a mismatch.

# %%
# The document mask: two documents packed in one row of 6 positions.
print(document_causal_mask(torch.tensor([[1, 1, 1, 2, 2, 0]]))[0, 0].int())

# %% [markdown]
# Read the matrix by rows: row $i$ marks the positions that position $i$ may attend to. Rows 0-2 form the first
# document's lower triangle and rows 3-4 the second's; neither sees the other. The last row is padding (segment 0),
# and it sees only itself. That matters: a row with no allowed position would be a softmax over nothing but
# $-\infty$, which gives NaN, and a NaN in a forward pass spreads to the loss even where the mask is off. Padding
# attends to padding, harmlessly, and its loss is masked out.
#
# The model: embedding, blocks, a final RMSNorm and an untied output head (DeepSeek LLM does not tie them).
# `generate` decodes with the cache: one forward over the prompt (prefill), then one token at a time.
#
# Three details of the class. Every linear and embedding weight starts from $\mathcal{N}(0, 0.02^2)$, the usual choice
# for small models; DeepSeek LLM initialises with a standard deviation of 0.006 at its scale (section 2.3).
# `logits_to_keep` computes the output head on the last $k$ positions only, which is all a prefill needs: the head is
# a $(d, V)$ matrix applied at every position, wasted on all but the last. And `generate` at temperature $T > 0$
# samples the next token from
#
# $$p(x) = \mathrm{softmax}(z / T)_x,$$
#
# with $z$ the logits, so $T = 1$ samples the model's own distribution and $T \to 0$ approaches greedy decoding
# (`temperature=0` takes the argmax directly). A row that has emitted `stop_id` is filled with `pad_id` from then on,
# and decoding ends early when every row has stopped. `generate` asks for its cache through `new_cache`, so a model
# with a different cache (chapter 03's MLA) inherits the same decoding loop by overriding that one method.
#
# The class also inherits two methods from a small mixin, `to_hf` and `from_hf`, which write and read the folders
# that Hugging Face transformers loads as a Llama model. Section 5 builds them ("Take the model anywhere"), once there
# is a trained model worth taking.

# %%
#| export transformer
class LlamaFolder:
    """Transformer's door to Hugging Face transformers, where DeepSeek LLM's architecture is Llama's (the work is done
    by write_llama and read_llama, section 5)."""

    def to_hf(self, directory: str | Path, tokenizer=None) -> Path:
        """Write a folder that transformers loads as a LlamaForCausalLM (and, given the world's tokenizer, with
        AutoTokenizer): config.json, model.safetensors, generation_config.json, the tokenizer files (see write_llama)."""
        return write_llama(self, directory, tokenizer)

    @classmethod
    def from_hf(cls, directory: str | Path) -> "Transformer":
        """Read a transformers Llama folder with json and safetensors only, into a float32 Transformer (see
        read_llama)."""
        return read_llama(directory, cls)

# %%
#| export transformer
class Transformer(LlamaFolder, nn.Module):
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
# A full forward pass over 20 tokens is the reference for what a cache must reproduce: the same logits at every
# position. The cached run feeds the sequence in three kinds of piece (a prefill of 8, a chunk of 4, then single
# tokens), so it exercises every path of `forward_inputs`: no past, a chunk after a past (the shifted `tril` mask),
# and one token after a past (no mask needed: a single query may see everything cached). The model uses GQA
# ($n_{kv} = 2$ for 4 heads), so the folded decoding path of `Attention` is checked too. Errors of order $10^{-6}$ are
# float32 rounding; a bug in a position or a mask gives errors of order 1.

# %% [markdown]
# ## 4. The trainer
#
# DeepSeek LLM trains with AdamW ($\beta_1 = 0.9$, $\beta_2 = 0.95$, weight decay 0.1), gradient clipping at 1.0, and
# a **multi-step learning-rate schedule**: after 2000 warm-up steps, the peak rate until 80% of the training tokens,
# then 31.6% of the peak until 90%, then 10%. The paper reports about the same final loss as a cosine schedule, with
# one practical gain: the first stage (80% of training) can be reused when you decide to train longer, because nothing
# in it depends on the total length. (A cosine schedule's every step does.)
#
# For step $s$ of $S$, peak rate $\eta$ and $w$ warm-up steps, `lr_at` computes
#
# $$\eta_{\text{multi-step}}(s) = \begin{cases} \eta\,(s+1)/w & s < w \\ \eta & s < 0.8\,S \\
# 0.316\,\eta & s < 0.9\,S \\ 0.1\,\eta & \text{otherwise} \end{cases} \qquad
# \eta_{\text{cosine}}(s) = \eta\Bigl(r + (1 - r)\,\tfrac12\bigl(1 + \cos \pi u\bigr)\Bigr),\ \
# u = \frac{s - w}{S - 1 - w},$$
#
# with the same warm-up for cosine and its floor $r = 0.1$, so both schedules end at 10% of the peak. The two drops are
# equal in log space: $0.316 \approx 1/\sqrt{10}$, and $0.316^2 \approx 0.1$. The stage boundaries count from step
# 0, warm-up included, as the paper's "80% of the training tokens" does.
#
# `TrainConfig` holds DeepSeek LLM's optimizer settings as defaults (AdamW, $\beta = (0.9, 0.95)$, weight decay 0.1,
# clipping at 1.0). The peak learning rate is not theirs: DeepSeek LLM 67B trains at $3.2 \times 10^{-4}$, and small
# models tolerate, and need, much larger rates; this chapter uses $3 \times 10^{-3}$. Chapter 01 fits how the best
# rate shrinks with compute, the paper's Eq. 1.

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

from dslib.checkpoint import (CheckpointError, interrupts_deferred, load_checkpoint, read_trainer_state,
                              save_checkpoint)


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
# The asserts pin the schedule at its edges, where off-by-one errors live: the last warm-up step is at the peak, step
# 799 of 1000 still at the peak and step 800 at 0.316, step 899 at 0.316 and step 900 at 0.1; cosine starts at the
# peak after warm-up and ends at 0.1. In the plot, the multi-step curve holds the peak for most of the run, while
# cosine is down to about half of it by the middle; look for the effect of that difference in the loss curves of
# section 5.
#
# The trainer itself. Three properties matter for a course whose runs are stopped and restarted:
#
# - **Checkpoints are atomic and complete**: weights (safetensors), the model config (JSON), the optimizer's moments,
#   every random generator's state and the loss history, each written to a temporary file and renamed into place. A
#   crash mid-save leaves the previous checkpoint whole. Loading never unpickles, so a checkpoint cannot run code.
# - **Resume is exact**: the batch of step $s$ is a function of $s$ (`PackedData.batch`), so a run stopped at step
#   100 and resumed produces, bit for bit, the losses of a run that never stopped.
# - **A NaN or infinite loss stops the run** with an error naming the step, before the bad update reaches the weights.
#
# The first cell holds the loss functions. `masked_lm_loss` is the masked mean of the equation in "Packed batches",
# computed in float32. `evaluate_loss` weights each batch by its number of response tokens, so its result is a mean
# per token over the whole held-out set, not a mean of batch means (the two differ when batches hold different numbers
# of response tokens). `param_groups` applies weight decay to every matrix (the projections and the embeddings) and
# not to the RMSNorm gains: decaying a gain pulls it toward 0, which would shrink the branch it scales.

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

# %% [markdown]
# The second cell is the `Trainer`. Its `fit` loop does, for each step $s$: set the learning rate to `lr_at(s)`; fetch
# `data.batch(s)`; compute the loss (under bfloat16 autocast on CUDA, in float32 elsewhere); stop with
# `NonFiniteLossError` if it is not finite; backpropagate; clip the gradient to norm 1.0,
#
# $$g \leftarrow g \cdot \min\bigl(1, \; c / \lVert g \rVert_2\bigr), \qquad c = 1.0 ;$$
#
# take the AdamW step; run the `after_step` hook; record the step, the loss and the learning rate; evaluate and save
# when their intervals come round. The order is deliberate. The finiteness check comes before `backward`, so a bad
# loss never touches the weights or the optimizer's moments. The learning rate is a function of the step alone, so a
# resumed run needs no scheduler state. `resume` refuses a checkpoint written with a different `TrainConfig`, since
# continuing a run under another schedule would not be the run that was saved. A Ctrl-C saves the state before it
# stops the run, and the next `fit()` continues from there.

# %% [markdown]
# Checkpointing comes first, as a small mixin that `Trainer` inherits: `state()` is what a checkpoint stores besides
# the weights and the optimizer (the step, the history, the config), `save()` writes it atomically, and `resume()`
# reads it back after checking that the run would continue under the same `TrainConfig`.

# %%
#| export train
class TrainerCheckpoints:
    """Trainer's checkpoint methods (they use its model, optimizer, config, checkpoint_dir, step and history)."""

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

# %%
#| export train
class Trainer(TrainerCheckpoints):
    """AdamW with warm-up and DeepSeek LLM's multi-step schedule (or cosine), gradient clipping, a progress bar,
    periodic held-out evaluation, atomic checkpoints and exact resume.

    data.batch(step) must give the batch of step `step` as a pure function of the step (world.PackedData does), so that
    a run resumed from a checkpoint sees the same batches, and produces the same losses, as an uninterrupted one.

    Hooks: after_step(trainer, batch) runs after each optimizer step (chapter 02 moves the MoE routing bias there);
    after_backward(model) between backward and clipping (data-parallel training averages gradients there)."""

    def __init__(self, model: torch.nn.Module, data, config: TrainConfig, eval_batches: Sequence[dict] = (),
                 checkpoint_dir: str | Path | None = None, device: torch.device | str = "cpu",
                 loss_fn: Callable = batch_loss, after_step: Callable | None = None,
                 after_backward: Callable | None = None):
        self.model, self.data, self.config = model.to(device), data, config
        self.eval_batches, self.device, self.loss_fn = list(eval_batches), torch.device(device), loss_fn
        self.after_step, self.after_backward = after_step, after_backward
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)
        self.step, self.history = 0, {"step": [], "loss": [], "lr": [], "eval_step": [], "eval_loss": []}

    def lr(self, step: int) -> float:
        return lr_at(step, self.config.steps, self.config.lr, self.config.warmup_steps, self.config.schedule)

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
                if self.after_backward is not None:
                    self.after_backward(self.model)
                if c.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
                with interrupts_deferred():  # Ctrl-C waits for the update: a saved state is always one step's
                    self.optimizer.step()
                    if self.after_step is not None:
                        self.after_step(self, batch)
                    self.step += 1
                    for key, value in (("step", self.step), ("loss", loss.item()), ("lr", lr)):
                        self.history[key].append(value)
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
#
# Why group by length instead of padding? A batch of prompts of different lengths would need padding, and padding on
# the left shifts the positions that RoPE sees, while padding on the right puts pad tokens between a prompt and its
# continuation; both need extra masks to be right. Our held-out prompts come in few lengths: with `<bos>`, a problem
# of $n$ numbers is $3n + 4$ tokens (`Q:`, $2n$ digits, $n - 1$ operators, a space, `<think>`), so the held-out set
# of 3-4 numbers has exactly two lengths, 13 and 16 tokens, and decodes in two batches of at most `batch_size`. The
# generator is seeded once per call, so sampled completions are repeatable. `evaluate_accuracy` is what the later
# chapters call: decode, grade with `world.grade`, and return the accuracy with the completions, so that a chapter can
# look at what the model wrote and not only at the score.

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
# corpus. At `small` scale this is $500 \times 24 \times 96 \approx 1.2$M tokens (the cell prints its time and
# throughput); at `full` scale, a wider and deeper model on many more tokens. Chapters 05-06 start reinforcement
# learning from a model pretrained the same way, longer (`dslib.pretrained` builds and caches it).
#
# Where do the 0.8M parameters sit? Per layer, attention has $4d^2 = 65{,}536$ (the four projections; no GQA here) and
# SwiGLU $3 \cdot d \cdot 352 = 135{,}168$, about 0.2M per layer and 0.8M for four. The embedding and the output head
# add only $2 \times 104 \times 128 = 26{,}624$: the vocabulary is tiny. (The printed count is the exact one.)
#
# The cell builds the training data (the packed corpus), the validation batches (the held-out problems' documents),
# the model and the trainer, with a held-out evaluation and a checkpoint every 100 steps and the multi-step
# schedule over 500 steps: peak until step 400, 31.6% until step 450, 10% to the end.

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
# What to look for in the plot. The training loss is per batch and noisy; the held-out points are the smooth signal.
# The dotted line is the learning rate: watch the loss right after the cuts at steps 400 and 450. A drop in the loss
# soon after a cut is the usual sign that the peak rate was keeping the weights bouncing around a lower point that a
# smaller step can reach. The held-out loss is in nats per response token. Many response tokens follow from the
# prompt (the tags, the operands copied into each step), so what is left to learn sits mostly on the digits of the
# results and the answer.
#
# Now the question that matters for the rest of the course: how many held-out problems does the base model solve? We
# decode greedily (always the most likely token) and by sampling at temperature 1, as reinforcement learning will.
# `style_of` sorts the completions into three kinds by their text: a completion that closes `</think>` at once is a
# bare answer, one that contains " wait " reflects, and anything else is plain steps.

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
# Read the printout with two questions. First, how far apart are greedy and sampled accuracy, and why? Greedy decoding
# takes the most likely token at every step, and right after `<think>` that decides the style: the corpus is 58% bare
# answers, so if the greedy styles line shows mostly `bare`, greedy accuracy is the accuracy of answering at once.
# Sampling at temperature 1 draws the styles in about their corpus shares. The two numbers measure different things,
# and the later chapters report both. Second, how does accuracy differ by style? If bare answers are the weakest route
# and worked solutions (plain steps and "guess, wait, recompute") the strongest, then the behaviour that reinforcement
# learning can amplify is already in the base model, at low probability and executed unreliably. That is the starting
# point of chapters 05 and 06: RL does not invent reasoning here, it can only choose more often the routes that work.
#
# ### Multi-step against cosine
#
# DeepSeek LLM reports that the multi-step schedule reaches about the same final loss as cosine (section 2.3, its
# Figure 1). We compare both on a smaller model with everything else equal: the same initial weights (the seed is set
# before each model is built), the same data and batch order (one `PackedData`, seed 1), the same peak rate, warm-up
# and number of steps. Only `schedule` changes, so any gap in the final held-out loss is the schedule's. At `small`
# scale this is a short run. Expect cosine to be ahead halfway, when its rate is already lower, and the multi-step
# schedule to do its catching up in its last 20%: compare the curves at the end, not in the middle.

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
# The printed line gives the relative gap, multi-step over cosine minus one. The ledger below counts the claim as
# reproduced when the gap is within 2%. The paper's runs are 2T tokens long, and their schedule's last two stages
# are each more than a hundred thousand times longer than our whole run, so a larger gap here would say more about
# our run's length than about the schedule. The one property of multi-step that does not depend on the run is the
# reuse of its first stage; exercise 5 checks it.

# %% [markdown]
# ### Checkpoints, resume and the NaN guard
#
# A run stopped half-way and resumed from its checkpoint must produce the same losses as one that never stopped. We
# check this bit for bit on a tiny model, then corrupt a checkpoint and poison a loss to see the errors.
#
# Bit-for-bit equality, not closeness, is the right test, and it is reachable. Nothing in a training step is random
# once the batch is fixed (there is no dropout), the batch of step $s$ is `data.batch(s)`, and the checkpoint restores
# the weights, the optimizer's moments and step count, and the history. On the same machine the same operations in the
# same order give the same floats, so any difference at all means some state was not saved or not restored. A
# tolerance would hide exactly that bug, an optimizer moment reset to zero, say, whose effect on the loss is small.
#
# `tiny_run` builds a fresh one-layer model and trainer over a folder and resumes from it when a checkpoint is there.
# Three runs follow: 30 steps straight through; 17 steps into a second folder (`fit(until=17)` saves at the end);
# then a fresh model and trainer on that folder, which must resume at step 17 and finish. The folders are temporary
# and removed at the end of the cell.

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
# The two error checks are tests of the failure paths. A checkpoint whose weights file is garbage must be refused with
# a `CheckpointError`, not loaded half-way, and loading never unpickles, so a checkpoint file cannot run code. The
# poisoned loss multiplies a real loss by NaN: the trainer must raise `NonFiniteLossError` at step 0, and the weights
# must be exactly the ones it started with, since the check runs before `backward`. Both flags go to the checks at the
# end of the chapter.

# %% [markdown]
# ### Take the model anywhere: a Llama folder for transformers
#
# A checkpoint that only dslib can read keeps the model in this course. DeepSeek LLM is the LLaMA architecture
# (section 2.2 of its paper), so our `Transformer` is, tensor for tensor, a `LlamaForCausalLM` of Hugging Face
# transformers. `Transformer.to_hf(folder, tokenizer)` writes the folder that transformers loads with
# `AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`; `Transformer.from_hf(folder)` reads one
# back, with json and safetensors only, so it needs no transformers and runs no code from the folder. The folder:
#
# | file | what it holds |
# |---|---|
# | `config.json` | `model_type: llama`, `hidden_size` ($d$), `intermediate_size`, `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads` (GQA), `head_dim`, `max_position_embeddings`, `rms_norm_eps`, `rope_theta`, untied embeddings, no biases, silu |
# | `model.safetensors` | the weights under Llama's names: `model.embed_tokens`, per layer `input_layernorm`, `self_attn.{q,k,v,o}_proj`, `post_attention_layernorm`, `mlp.{gate,up,down}_proj`, then `model.norm` and `lm_head` |
# | `generation_config.json` | the token ids, greedy decoding, and where to stop: after `<eos>` or `</answer>` (the course's `complete` stops at `</answer>`) |
# | `tokenizer.json` (+ two small JSON files) | the world's tokenizer for the `tokenizers` library: one piece per character, each special token one id, `<bos>` put in front |
#
# The names map one to one (`attn_norm` is `input_layernorm`, `mlp_norm` is `post_attention_layernorm`, `embed` is
# `model.embed_tokens`), and every matrix keeps its shape. One thing does not carry over by renaming: the RoPE layout.
# Section 3 rotates interleaved pairs $(x_{2i}, x_{2i+1})$; Llama's `rotate_half` pairs $x_i$ with $x_{i + d_h/2}$,
# by the same angle $p\,\omega_i$. So the export reorders, inside each head, the output rows of `q_proj` and `k_proj`:
# Llama's feature $j$ is our feature $2j$ for $j < d_h/2$, and our feature $2(j - d_h/2) + 1$ after that. The scores
# do not change, because $q \cdot k$ is a sum over features and the same permutation $P$ moves both:
# $(Pq)\cdot(Pk) = q \cdot k$. The values, `o_proj` and everything else stay as they are. `from_hf` applies the
# inverse permutation.

# %%
def draw_rope_layouts(d_h: int = 8):
    """One head's query features in our interleaved RoPE layout and in Llama's halves; arrows: where each row goes."""
    d = Diagram(12.0, 3.0, f"q_proj and k_proj rows of one head (d_h = {d_h}): interleaved pairs -> Llama's halves")
    w, gap, x0 = 1.0, 0.25, 1.9
    for j in range(d_h):
        ours = f"x{j}\nangle ω{j // 2}"
        d.box(x0 + j * (w + gap), 1.9, w, 0.7, ours, "model" if j % 2 == 0 else "stage")
        src = 2 * j if j < d_h // 2 else 2 * (j - d_h // 2) + 1  # Llama's feature j is our feature src
        d.box(x0 + j * (w + gap), 0.2, w, 0.7, f"x{src}\nangle ω{src // 2}", "model" if j < d_h // 2 else "stage")
        d.arrow(x0 + src * (w + gap) + w / 2, 1.9, x0 + j * (w + gap) + w / 2, 0.9)
    d.ax.text(0.1, 2.25, "dslib\n(pairs 2i, 2i+1)", fontsize=8, va="center")
    d.ax.text(0.1, 0.55, "Llama\n(pairs i, i+d/2)", fontsize=8, va="center")
    d.show()


draw_rope_layouts()

# %% [markdown]
# The top row is one head of our queries: a blue and an orange box side by side are a pair, rotated together by the
# angle of frequency $\omega_i$. The bottom row is the same head as Llama stores it: all first members of the pairs
# (blue), then all second members (orange), so pair $i$ sits at positions $i$ and $i + d_h/2$. With GQA the same
# reordering runs over the `n_kv_head` heads of `k_proj`. Before the code, four small pieces: the table of names, the
# permutation (`rope_halves_order`), and the two translations of the configuration.

# %%
#| export transformer
HF_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json")  # what to_hf writes
_LLAMA_LAYER = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
                **{f"attn.{p}": f"self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
                **{f"mlp.{p}": f"mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}}


def llama_names(n_layer: int) -> dict[str, str]:
    """Transformer's parameter names -> transformers LlamaForCausalLM's tensor names, for n_layer layers."""
    names = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    for i in range(n_layer):
        for ours, theirs in _LLAMA_LAYER.items():
            names[f"layers.{i}.{ours}.weight"] = f"model.layers.{i}.{theirs}.weight"
    return names


def rope_halves_order(head_dim: int) -> torch.Tensor:
    """Llama's feature j of a head is our feature order[j]: order = 0, 2, 4, ..., d-2, 1, 3, ..., d-1. Our pairs
    (x[2i], x[2i+1]) become Llama's halves (x[i], x[i + d/2]), rotated by the same angle."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def permute_rope_rows(w: torch.Tensor, n_heads: int, to_llama: bool) -> torch.Tensor:
    """Reorder the output rows of a q_proj or k_proj weight (n_heads * head_dim, d_model) inside each head: from our
    interleaved RoPE layout to Llama's halves (to_llama), or back. Scores q.k do not change: q and k move alike."""
    order = rope_halves_order(w.shape[0] // n_heads)
    if not to_llama:
        order = torch.argsort(order)  # the inverse permutation
    return rearrange(rearrange(w, "(h d) m -> h d m", h=n_heads)[:, order], "h d m -> (h d) m")

# %%
# The permutation against Llama's rotation written from its definition: rotate_half(x) = (-x[d/2:], x[:d/2]), and
# x' = x cos + rotate_half(x) sin with each angle used twice. Rotating in our layout and then reordering must equal
# reordering and then rotating the Llama way.
q = torch.randn(2, 3, 7, 8)  # (b, h, t, d_h)
cos, sin = rope_cos_sin(torch.arange(7).expand(2, 7), 8)  # (b, t, d_h/2)
order = rope_halves_order(8)
ql = q[..., order]  # the same queries in Llama's layout
rotate_half = torch.cat([-ql[..., 4:], ql[..., :4]], dim=-1)
llama = ql * torch.cat([cos, cos], -1)[:, None] + rotate_half * torch.cat([sin, sin], -1)[:, None]
assert torch.allclose(apply_rope(q, cos, sin)[..., order], llama, atol=1e-6)
w = torch.randn(3 * 8, 16)  # a q_proj of 3 heads
assert torch.equal(permute_rope_rows(permute_rope_rows(w, 3, to_llama=True), 3, to_llama=False), w)
print("Llama row j = our row", order.tolist(), "; rotations agree; the permutation inverts")

# %%
#| export transformer
def llama_config(c: TransformerConfig, dtype: torch.dtype = torch.float32, tokenizer=None) -> dict:
    """config.json of the transformers Llama model that computes what a Transformer with config c computes. rope_theta
    is written twice, in rope_parameters (transformers 5) and at the top level (older versions)."""
    dtype_name = str(dtype).removeprefix("torch.")
    ids = {} if tokenizer is None else {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id,
                                        "pad_token_id": tokenizer.pad_id}
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
            "hidden_size": c.d_model, "intermediate_size": c.intermediate_size, "num_hidden_layers": c.n_layer,
            "num_attention_heads": c.n_head, "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
            "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "initializer_range": c.init_std,
            "rope_theta": c.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
            "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "tie_word_embeddings": False, "torch_dtype": dtype_name, "dtype": dtype_name, "use_cache": True, **ids}


def config_from_llama(raw: dict, where: str = "config.json") -> tuple[TransformerConfig, bool]:
    """(TransformerConfig, tie_word_embeddings) from a Llama config.json. What Transformer cannot compute (another
    model_type, RoPE scaling, biases, another activation, heads narrower or wider than hidden_size / heads) is refused
    with a ValueError naming the field; fields Llama has defaults for take Llama's defaults."""
    def refuse(field: str, why: str) -> ValueError:
        return ValueError(f"{where}: {field}={raw.get(field)!r} is not supported: {why}")

    if raw.get("model_type") != "llama":
        raise refuse("model_type", "Transformer.from_hf reads Llama folders (DeepSeek LLM's architecture) only")
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if field not in raw:
            raise ValueError(f"{where}: the field {field!r} is missing (a Llama config.json needs it)")
    if raw.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", "dslib's SwiGLU uses silu")
    for field in ("attention_bias", "mlp_bias"):
        if raw.get(field, False):
            raise refuse(field, "dslib's projections have no bias")
    rope = raw.get("rope_parameters") or {}
    for field, value in (("rope_scaling", raw.get("rope_scaling") or {}), ("rope_parameters", rope)):
        if value.get("rope_type", value.get("type", "default")) != "default":
            raise refuse(field, "dslib's RoPE has no scaling (rope_type 'default' only)")
    if rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) != 1.0:
        raise refuse("partial_rotary_factor", "dslib's RoPE rotates every feature of a head")
    heads = raw["num_attention_heads"]
    if raw.get("head_dim") is not None and raw["head_dim"] * heads != raw["hidden_size"]:
        raise refuse("head_dim", f"dslib's heads split hidden_size={raw['hidden_size']} evenly into {heads}")
    try:
        config = TransformerConfig(
            vocab_size=raw["vocab_size"], d_model=raw["hidden_size"], n_layer=raw["num_hidden_layers"], n_head=heads,
            n_kv_head=raw.get("num_key_value_heads") or heads, intermediate_size=raw["intermediate_size"],
            max_seq_len=raw.get("max_position_embeddings", 2048),
            rope_theta=rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
            norm_eps=raw.get("rms_norm_eps", 1e-6), init_std=raw.get("initializer_range", 0.02))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    return config, bool(raw.get("tie_word_embeddings", False))

# %% [markdown]
# `config_from_llama` refuses, with the field in the message, everything a Llama folder can say that our `Transformer`
# cannot compute: another `model_type`, RoPE scaling (YaRN, `llama3`, linear), biases, an activation other than silu,
# partial rotary embeddings, a `head_dim` that does not split `hidden_size` evenly. Loading a model that computes
# something else would be a silent wrong answer. Fields that Llama has defaults for (`num_key_value_heads`,
# `rms_norm_eps`, `rope_theta`, `max_position_embeddings`) take Llama's defaults. A folder with
# `tie_word_embeddings` (one matrix for the embedding and the head) is accepted: our model keeps two matrices, so the
# head becomes a copy of the embedding, which computes the same logits.
#
# Writing is where a crash does harm, so `write_hf_folder` (chapter 04's V3 export uses it too) writes the whole
# folder into a hidden temporary folder beside the target and renames it into place at the end: an interrupted
# export leaves the old folder (at worst moved aside to a hidden sibling) or nothing, never a folder with new weights
# and an old config. It refuses to replace a folder that holds files it did not write.

# %%
#| export transformer
def llama_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A dense Transformer's weights under LlamaForCausalLM's names, q_proj and k_proj rows permuted per head to
    Llama's RoPE layout (permute_rope_rows), as contiguous CPU tensors."""
    c, state = model.config, model.state_dict()
    names = llama_names(c.n_layer)
    extra = [k for k in state if k not in names]
    if extra or len(state) != len(names):
        raise TypeError(f"to_hf writes a dense Transformer as Llama; {type(model).__name__} has {extra[:1] or 'fewer'} "
                        f"tensors that a Llama model has no place for")
    out = {}
    for ours, theirs in names.items():
        w = state[ours].detach().to("cpu")
        if ours.endswith(("q_proj.weight", "k_proj.weight")):
            w = permute_rope_rows(w, c.n_head if ".q_proj" in ours else c.n_kv_head, to_llama=True)
        out[theirs] = w.clone().contiguous()  # a copy: save_file refuses tensors that share memory
    return out


def write_hf_folder(directory: str | Path, config: dict, tensors: dict[str, torch.Tensor], generation: dict,
                    tokenizer=None, model_max_length: int | None = None) -> Path:
    """Write a transformers folder: config.json, generation_config.json, model.safetensors and, with a tokenizer, its
    files. Everything is written into a hidden temporary folder beside `directory`, which then replaces it, so an
    interrupted export never leaves a folder that looks complete. An existing folder is replaced only when it is
    empty or holds nothing but files that to_hf writes (HF_FILES). Used by every to_hf of dslib."""
    from safetensors.torch import save_file

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder: to_hf writes a folder")
    if directory.is_dir():
        foreign = sorted(p.name for p in directory.iterdir() if p.name not in HF_FILES)
        if foreign:
            raise FileExistsError(f"{directory} holds {foreign[0]!r}, which to_hf did not write: to_hf replaces the "
                                  f"whole folder, so it writes into a new, an empty or an earlier to_hf folder only")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()},  # copies: save_file
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})  # refuses tensors sharing memory
        atomic_write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        atomic_write_text(tmp / "generation_config.json", json.dumps(generation, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.to_hf(tmp, model_max_length=model_max_length)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private to its owner
        if directory.exists():  # move the old folder aside, the new one in, then delete the old one
            old = tmp.with_suffix(".old")
            os.replace(directory, old)
            os.replace(tmp, directory)
            shutil.rmtree(old)
        else:
            os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def hf_generation_config(max_length: int, tokenizer=None) -> dict:
    """generation_config.json: greedy up to max_length; with a tokenizer, its ids, stopping where the course's
    `complete` stops too (after </answer>, when there is one)."""
    generation = {"max_length": max_length, "do_sample": False}
    if tokenizer is not None:
        stops = [tokenizer.eos_id] + [tokenizer.stoi[s] for s in ("</answer>",) if s in tokenizer.stoi]
        generation.update(bos_token_id=tokenizer.bos_id, eos_token_id=stops, pad_token_id=tokenizer.pad_id)
    return generation


def write_llama(model: nn.Module, directory: str | Path, tokenizer=None) -> Path:
    """Transformer.to_hf: a transformers Llama folder (write_hf_folder, above) of `model`, with the tokenizer's files
    and token ids when one is given."""
    c = model.config
    if tokenizer is not None and tokenizer.vocab_size != c.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens, the model's vocab_size is {c.vocab_size}")
    tensors = llama_state_dict(model)
    dtype = next(iter(tensors.values())).dtype
    return write_hf_folder(directory, llama_config(c, dtype, tokenizer), tensors,
                           hf_generation_config(c.max_seq_len, tokenizer), tokenizer, model_max_length=c.max_seq_len)

# %% [markdown]
# Reading checks the tensors against the config before it loads any: every name that a Llama model of that config
# has must be there, nothing else may be (a leftover layer, a quantisation scale), and each shape must be the one the
# config implies, with the tensor named in the error. Then the rows of `q_proj` and `k_proj` go back to our layout.

# %%
#| export transformer
def read_safetensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in a folder (one file, or the shards of a large model), by name, read
    without unpickling anything. A name stored twice, or a folder without tensors, is an error."""
    from safetensors import safe_open

    directory = Path(directory)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for name in st.keys():
                if name in tensors:
                    raise ValueError(f"{directory}: tensor {name!r} is stored twice (again in {f.name})")
                tensors[name] = st.get_tensor(name)
    if not tensors:
        raise FileNotFoundError(f"no *.safetensors file with tensors in {directory}")
    return tensors


def read_llama(directory: str | Path, cls: type | None = None) -> "Transformer":
    """Transformer.from_hf: read a transformers Llama folder (config.json and every *.safetensors file in it) with
    json and safetensors only (no transformers, nothing unpickled), into a float32 Transformer. Raises ValueError
    naming the field that Transformer cannot represent (config_from_llama) or the tensor that does not fit the config
    (missing, unexpected, wrong shape). With tie_word_embeddings, the output head is a copy of the embedding."""
    cls = Transformer if cls is None else cls
    if cls.__init__ is not Transformer.__init__:
        raise TypeError(f"{cls.__name__}.from_hf: a Llama folder holds a dense Transformer, not a {cls.__name__}")
    directory = Path(directory)
    path = directory / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: from_hf needs a Llama folder with config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    config, tied = config_from_llama(raw, str(path))
    tensors = read_safetensors(directory)
    names = llama_names(config.n_layer)
    if tied and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # one matrix in Llama, two copies in dslib
    theirs = set(names.values())
    unexpected = sorted(k for k in tensors if k not in theirs and not k.endswith("rotary_emb.inv_freq"))
    missing = [k for k in names.values() if k not in tensors]
    if missing:
        raise ValueError(f"{directory}: tensor {missing[0]!r} is missing ({len(missing)} missing in all)")
    if unexpected:
        raise ValueError(f"{directory}: tensor {unexpected[0]!r} is not part of the Llama model that config.json "
                         f"describes ({len(unexpected)} unexpected in all)")
    model = cls(config)
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    state = {}
    for ours, name in names.items():
        w = tensors[name]
        if w.shape != shapes[ours]:
            raise ValueError(f"{directory}: tensor {name!r} has shape {tuple(w.shape)}, but config.json implies "
                             f"{tuple(shapes[ours])}")
        if ours.endswith(("q_proj.weight", "k_proj.weight")):
            w = permute_rope_rows(w, config.n_head if ".q_proj" in ours else config.n_kv_head, to_llama=False)
        state[ours] = w
    model.load_state_dict(state)  # copies into the float32 parameters
    return model

# %% [markdown]
# The tokenizer travels too. The `tokenizers` library builds one from parts: a `WordLevel` model over our 104 ids, a
# pre-tokenizer that cuts the text into single characters, and the eight specials as *added tokens*, which the
# library finds in the text before cutting it, the longest match first where two start at the same place, as our
# `encode` does. A post-processor puts `<bos>` in front, so `tok(prompt)` is `encode(prompt, bos=True)`, the way every
# chapter encodes a prompt (`add_special_tokens=False` gives `encode(prompt)`). Only `<pad>`, `<bos>` and `<eos>` are
# marked special, so `skip_special_tokens=True` drops what our `decode` drops and keeps the tags and " wait ", which
# are part of the text. A character outside the vocabulary is an error there as here, since `WordLevel` is given no
# unknown token to fall back on. The function lives in `dslib.world`, beside the tokenizer.

# %%
#| export
def write_hf_tokenizer(tokenizer: Tokenizer, directory: str | Path, model_max_length: int | None = None) -> Path:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into directory, so that
    transformers.AutoTokenizer.from_pretrained(directory) gives the ids of `tokenizer`: a WordLevel model over the same
    vocabulary, one piece per character, every special token an added token matched before the characters are split,
    and a post-processor that puts <bos> in front (tok(text) is tokenizer.encode(text, bos=True), as the course
    encodes prompts; add_special_tokens=False gives encode(text)). <pad>, <bos> and <eos> are marked special, so
    skip_special_tokens drops them as decode does; the tags and " wait " are not. A character outside the vocabulary
    is an error there too (WordLevel has no unknown token). Each file is written to a temporary name and renamed."""
    try:
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError as e:
        raise ImportError("Tokenizer.to_hf needs the `tokenizers` package (it comes with transformers): "
                          "pip install tokenizers") from e
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a folder: Tokenizer.to_hf writes files into a folder")
    roles = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
    marked = {role: s for role, s in roles.items() if s in tokenizer.specials}  # the tokens decode skips
    hf = HFTokenizer(models.WordLevel(dict(tokenizer.stoi), unk_token=None))
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # every character its own piece
    hf.decoder = decoders.Fuse()  # decoding joins the pieces with nothing between them
    hf.add_tokens([AddedToken(s, normalized=False, special=False)
                   for s in tokenizer.specials if s not in marked.values()])
    hf.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in marked.values()])
    if "bos_token" in marked:
        hf.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos>:1 $B:1", special_tokens=[("<bos>", tokenizer.bos_id)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **marked, "clean_up_tokenization_spaces": False,
              "padding_side": "left"}  # left: a batch of prompts ends at the same column, as generation needs
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    atomic_write_text(directory / "tokenizer.json", hf.to_str(pretty=True))
    atomic_write_text(directory / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    atomic_write_text(directory / "special_tokens_map.json", json.dumps(marked, indent=2) + "\n")
    return directory

# %% [markdown]
# Now the round trip on section 5's base model. `to_hf` writes the folder (with the world's tokenizer) into a
# temporary folder, and `from_hf` reads it back: the weights must come back bit for bit, since the two permutations
# undo each other and nothing is rounded on the way.

# %%
import json

export_dir = Path(tempfile.mkdtemp(prefix="ch00-llama-")) / "deepseek-llm-mini"  # removed at the end of this section
model.to_hf(export_dir, tokenizer=world.tokenizer)
reloaded = Transformer.from_hf(export_dir).eval()  # float32, on the CPU
llama_round_trip = all(torch.equal(p.detach().cpu(), q) for p, q in zip(model.state_dict().values(),
                                                                         reloaded.state_dict().values()))
print("files:", ", ".join(sorted(p.name for p in export_dir.iterdir())))
print(f"{reloaded.num_params():,} parameters read back; identical to the trained model's: {llama_round_trip}")
print(json.dumps({k: json.loads((export_dir / "config.json").read_text())[k]
                  for k in ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                            "num_key_value_heads", "head_dim", "rope_parameters")}))

# %% [markdown]
# The real test is code that no one here wrote. transformers loads the folder as a `LlamaForCausalLM` and the
# tokenizer as a fast tokenizer, and three things must agree with dslib: the token ids of validation documents, the
# logits on them (float32 on the CPU for both, so only rounding may differ), and greedy decoding of held-out prompts,
# which transformers' `generate` does with its own KV cache and left padding, and dslib's `complete` with ours. The
# cell also loads the same weights *without* the RoPE permutation, to measure what forgetting it costs.
# (Skipped where transformers is not installed.)

# %%
hf_checked = importlib.util.find_spec("transformers") is not None
if hf_checked:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_model = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(export_dir)
    docs = [d.text for d in world.validation()[:32]]
    hf_same_ids = all(hf_tok(t)["input_ids"] == world.tokenizer.encode(t, bos=True) for t in docs)
    ids = hf_tok(docs, padding=True, padding_side="right", return_tensors="pt")["input_ids"]  # causal: pads are last
    with torch.no_grad():
        ours_logits, hf_logits = reloaded(ids), hf_model(ids).logits
        hf_logit_diff = (ours_logits - hf_logits).abs().max().item()
        heads = {"q_proj": reloaded.config.n_head, "k_proj": reloaded.config.n_kv_head}
        unpermuted = {k: permute_rope_rows(w, heads[k.split(".")[-2]], to_llama=False)
                      if k.split(".")[-2] in heads else w for k, w in hf_model.state_dict().items()}
        wrong = AutoModelForCausalLM.from_config(hf_model.config).eval()
        wrong.load_state_dict(unpermuted)
        unpermuted_diff = (ours_logits - wrong(ids).logits).abs().max().item()
    problems = world.heldout[:24]
    ours_text = complete(reloaded, world.tokenizer, world.prompts(problems))  # dslib's greedy decoding
    enc = hf_tok(world.prompts(problems), padding=True, return_tensors="pt")  # left-padded
    out = hf_model.generate(**enc, do_sample=False, max_new_tokens=64,
                            eos_token_id=hf_tok.convert_tokens_to_ids("</answer>"))  # complete stops there only
    hf_text = hf_tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    hf_same_text = hf_text == ours_text
    print(f"AutoTokenizer ids == dslib's on {len(docs)} documents: {hf_same_ids}")
    print(f"max |logit difference|, dslib vs LlamaForCausalLM, {ids.numel()} positions: {hf_logit_diff:.1e} "
          f"(without the RoPE permutation: {unpermuted_diff:.2f})")
    print(f"greedy text, transformers' generate == dslib's complete on {len(problems)} held-out prompts: "
          f"{hf_same_text}")
    print("for example:", repr(world.prompts(problems)[0] + hf_text[0]))
    assert hf_same_ids and hf_logit_diff < 1e-4 and hf_same_text
else:
    print("transformers is not installed: the comparison is skipped (pip install transformers)")

# %% [markdown]
# What to read in the printout: the logit difference with the permutation against the one without. The first is
# float32 rounding between two implementations that add the same numbers in different orders; the second is what a
# loader that only renames tensors would give, a model that runs without an error and computes something else. Greedy
# decoding is the stricter test of the two in one sense: a single flipped argmax in 24 completions of up to 64 tokens
# would make the texts differ.
#
# Last, a folder that Transformer cannot represent. A config that asks for YaRN RoPE scaling (DeepSeek-V3's released
# checkpoints do) must be refused by name, not loaded with plain RoPE; the unit tests try the other refusals (another
# `model_type`, a missing field, a missing tensor, a tensor of the wrong shape).

# %%
raw = json.loads((export_dir / "config.json").read_text())
(export_dir / "config.json").write_text(json.dumps({**raw, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
try:
    Transformer.from_hf(export_dir)
except ValueError as e:
    print("ValueError:", str(e).replace(str(export_dir), "<folder>"))
shutil.rmtree(export_dir.parent)

# %% [markdown]
# ## 6. Explore the world
#
# Move the knobs of the world: the longest chain, how often plain steps slip, how much of the corpus reflects
# (guess-then-verify and slip-then-fix together), how much reasoning is written in words, and the seed. The explorer
# samples a fresh corpus and shows its style shares and a few documents. (Where no widget front end runs, as in CI, it
# shows the defaults.)
#
# The reflection slider keeps the corpus's proportions inside each group: the reflecting share is split 26:3 between
# guess-then-verify and slip-then-fix, the rest 58:8:5 between bare, steps and slip, so at the default of 0.29 the mix
# is the chapter's. Things to try: set the reflection share to 0 and see " wait " disappear; set the slip rate to 1 and
# watch the share of right answers fall by about four fifths of the plain steps' share (6.4 points at the default
# mix); move the words rate and read the language column of the documents. A world you like can be pretrained with
# the cells of section 5: build the same `World` as the first lines of `show_world` do.

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
# What the papers claim next to what this chapter measured. Three rows: the schedule comparison of section 5; the KV
# cache arithmetic of GQA, which is an identity (per token, $2 \times 4 \text{ layers} \times n_{kv} \times 32$
# dimensions $\times$ 4 bytes in float32, so 4096 bytes for MHA, 2048 for 2 KV heads, 1024 for one) and is measured
# here by allocating the caches; and the base model's accuracy against the course's pre-study, which trained longer
# (3.95M tokens). For DeepSeek LLM 67B the same formula gives $2 \times 95 \times 8 \times 128 = 194{,}560$ numbers
# per token, an eighth of what 64 full KV heads would need.

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
           "" if abs(rel) < 0.02 else
           f"{'multi-step' if rel < 0 else 'cosine'} ended {abs(rel):.1%} lower in a run of {SCHED['steps']} steps; "
           "the paper compares them over 2T tokens")
ledger.add("GQA shrinks the KV cache by n_head / n_kv_head",
           "67B: 64 heads, 8 KV heads = 8x smaller (DeepSeek LLM, Table 2)",
           f"4 heads: {kv[4]} B/token MHA, {kv[2]} GQA-2, {kv[1]} MQA ({kv[4] / kv[2]:.0f}x, {kv[4] / kv[1]:.0f}x)",
           kv[4] / kv[2] == 2 and kv[4] / kv[1] == 4)
ledger.add("A tiny model pretrained on the world solves some held-out problems, not all",
           "course pre-study: greedy 5-11%, sampled 18-26% (3.95M tokens)",
           f"greedy {greedy_acc:.1%}, sampled {sampled_acc:.1%} ({MAIN['steps'] * MAIN['batch'] * SEQ_LEN / 1e6:.1f}M tokens)",
           0.04 < greedy_acc < 0.9 and 0.015 < sampled_acc < 0.9,
           "" if sampled_acc >= 0.18 else "fewer tokens than the pre-study: sampled accuracy is below its range")
ledger.show()
saved_to = ledger.save()  # _build/ledger/00.json: `python -m dslib.book ledger` prints every chapter's rows

# %% [markdown]
# ## What you learned
#
# - **The family.** Ten DeepSeek papers in four lines of work; the base line builds dense models, then sparse experts,
#   cheaper attention and cheaper training, and the reasoning line takes GRPO from DeepSeekMath to R1.
# - **A world for rule rewards.** `dslib.world` writes problems with one checkable answer, a corpus of solutions in
#   R1-Zero's format whose styles, slips and reflections are set by a mix, a character tokenizer with " wait " as one
#   token, a checker that parses and never evaluates, and packed batches whose loss covers the responses only.
# - **The DeepSeek LLM decoder.** `dslib.transformer`: pre-norm blocks of RMSNorm, attention with RoPE and grouped KV
#   heads, and SwiGLU; a preallocated KV cache whose size per token, $2 n_{layer} n_{kv} d_h$, is what GQA (and later
#   MLA) shrinks; decoding that reproduces a full forward pass.
# - **Training that can be stopped.** `dslib.train`: AdamW with DeepSeek LLM's settings and its multi-step schedule,
#   a NaN guard that acts before the update, atomic checkpoints, and a resume that is exact because a batch is a
#   function of its step.
# - **How to read a base model.** Greedy against sampled accuracy, and accuracy by style: the two measurements that
#   say whether a 0.8M-parameter model has something for RL to amplify.
# - **A model that travels.** `to_hf` and `from_hf` write and read transformers' Llama folders: names that map one to
#   one, a per-head permutation of the query and key rows between two RoPE layouts, the world's tokenizer rebuilt from
#   `tokenizers`' parts, and refusals, by name, of every config or tensor that the model cannot represent.
#
# **Next.** Chapter 01 asks how big a model should be for a given compute budget, and at which learning rate and
# batch size to train it: DeepSeek LLM's scaling laws (section 3), rebuilt as IsoFLOP sweeps of this chapter's
# transformer on this chapter's world.
#
# ## Exercises
#
# Difficulty: ★ (a few minutes), ★★ (an experiment), ★★★ (a small project).
#
# 1. ★ **The KV cache of DeepSeek LLM 67B.** With 95 layers, 64 query heads of dimension 128 and 8 KV heads (its
#    Table 2), how many bytes does one token's cache take in bfloat16, and how many would full multi-head attention
#    take? What does a 4096-token context cost per sequence? Check your arithmetic with `KVCache`.
#
#    <details><summary>Hint</summary>Per token, $2 n_{layer} n_{kv} d_h$ numbers of 2 bytes each. A `KVCache` with
#    `batch_size=1, max_len=1` holds exactly one token, and it needs only a `TransformerConfig`, not a model.</details>
#    <details><summary>Solution</summary>
#
#    $2 \times 95 \times 8 \times 128 \times 2 = 389{,}120$ bytes per token with GQA, and $2 \times 95 \times 64
#    \times 128 \times 2 = 3{,}112{,}960$ with MHA, 8 times more. For 4096 tokens: 1.48 GiB against 11.9 GiB per
#    sequence. This is the inference cost that the paper's choice of GQA for 67B targets (section 2.2): with long
#    contexts and many sequences decoded at once, the cache, not the weights, fills the accelerator's memory.
#
#    ```python
#    c67 = TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=8192, n_layer=95, n_head=64, n_kv_head=8)
#    for n_kv in (8, 64):
#        c = TransformerConfig(**{**c67.to_dict(), "n_kv_head": n_kv})
#        per_token = KVCache(c, batch_size=1, max_len=1, dtype=torch.bfloat16).nbytes()
#        print(n_kv, per_token, f"{per_token * 4096 / 2**30:.2f} GiB for 4096 tokens")
#    ```
#    </details>
#
# 2. ★ **Do packed positions need to restart?** Shift every position of a packed batch by 40 and compare the loss of
#    an untrained model on the original batch and on the shifted one. Explain what you see.
#
#    <details><summary>Hint</summary>`batch_loss(model, batch)` reads `batch["positions"]`; build the shifted batch
#    with `dict(b, positions=b["positions"] + 40)`. Recall what a RoPE score depends on, and where attention may
#    look.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    b = packed.batch(0)
#    torch.manual_seed(0)
#    m = Transformer(TransformerConfig(vocab_size=tok.vocab_size, d_model=64, n_layer=2, n_head=4)).eval()
#    with torch.no_grad():
#        print(batch_loss(m, b).item(), batch_loss(m, dict(b, positions=b["positions"] + 40)).item())
#    ```
#    The two losses should agree to float32 rounding. RoPE scores depend only on the distance between query and key,
#    and the document mask keeps every query inside its own document, so shifting all of a document's positions by
#    the same amount changes no score. Restarting at 0 is still the right choice: it makes training match generation,
#    where every prompt starts at position 0, and keeps the angles small, where float32 rounds least. With learned
#    absolute position embeddings the shift would change everything.
#    </details>
#
# 3. ★★ **Reliable plain steps.** Change the corpus mix so that plain steps are common and reliable (`steps` 30%,
#    `guess_verify` 10%, no slips in plain steps) and pretrain again. How does the accuracy by style change, and what
#    would that mean for chapter 06?
#
#    <details><summary>Hint</summary>`World(mix={...}, steps_slip_rate=0.0)` keeps the held-out problems (they depend
#    only on the difficulty and `heldout_seed`); reuse section 5's `config`, `SEQ_LEN` and `MAIN`, and `style_of`
#    to sort the completions.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    w3 = World(mix={"bare": 0.52, "steps": 0.30, "guess_verify": 0.10, "slip_fix": 0.03, "slip": 0.05},
#               steps_slip_rate=0.0)
#    d3 = PackedData([d.text for d in w3.corpus()], w3.tokenizer, SEQ_LEN, MAIN["batch"], seed=0)
#    torch.manual_seed(0)
#    m3 = Transformer(config)
#    Trainer(m3, d3, TrainConfig(steps=MAIN["steps"], lr=3e-3, warmup_steps=50), device=device).fit()
#    acc3, out3 = evaluate_accuracy(m3, w3, temperature=1.0, seed=0, device=device)
#    for s in ("bare", "steps", "reflects"):
#        oks = [ok for c, ok in zip(out3, w3.grade(out3)) if style_of(c) == s]
#        share, acc = len(oks) / len(out3), np.mean(oks) if oks else float("nan")
#        print(f"{s:>8}: {share:.1%} of completions, accuracy {acc:.1%}")
#    ```
#    Compare each line with section 5's. If plain steps are now about as accurate as reflecting solutions and three
#    times as common, RL has a route to careful work that does not pass through " wait ", and nothing pushes it to
#    reflect more: GRPO raises the probability of what already earns reward, and the more common of two reliable
#    routes gets the larger share of that push. The default mix makes reflection the main reliable route on purpose;
#    chapter 06 comes back to this.
#    </details>
#
# 4. ★★ **What a smaller cache costs.** Train the schedule comparison's model with `n_kv_head=2` (GQA) and
#    `n_kv_head=1` (MQA) next to the default 4, and compare the held-out loss with the cache size.
#
#    <details><summary>Hint</summary>Copy the loop of "Multi-step against cosine" with the multi-step schedule only,
#    and vary `n_kv_head` in the `TransformerConfig`. Run two seeds per setting before you trust a small
#    difference.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    for n_kv in (4, 2, 1):
#        torch.manual_seed(1)
#        c = TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=SCHED["d_model"],
#                              n_layer=SCHED["n_layer"], n_head=SCHED["n_head"], n_kv_head=n_kv, max_seq_len=128)
#        tr = Trainer(Transformer(c), sched_data, TrainConfig(steps=SCHED["steps"], lr=3e-3, warmup_steps=40,
#                     eval_every=SCHED["steps"] // 8), eval_batches=valid, device=device)
#        h = tr.fit(progress=False)
#        print(n_kv, tr.model.num_params(), KVCache(c, 1, max_len=1).nbytes(), f"{h['eval_loss'][-1]:.4f}")
#    ```
#    The cache halves with each halving of `n_kv_head`, by construction. The loss is the experiment, with one
#    confound to keep in mind: fewer KV heads also means smaller `k_proj` and `v_proj`, so the model has fewer
#    parameters. The gap between seeds tells you how large a difference must be to mean anything. Chapter 03
#    asks the same question of MLA, which shrinks the cache further.
#    </details>
#
# 5. ★★★ **Reuse the first stage.** DeepSeek LLM's argument for the multi-step schedule is that its first stage can be
#    reused when you decide to train longer. Show it: train a tiny model for the first 40 steps of a 50-step run,
#    continue it as a 100-step run, and compare with a 100-step run from scratch. Then show why cosine cannot do this.
#
#    <details><summary>Hint</summary>`Trainer.resume` refuses a checkpoint saved under another `TrainConfig`, so move
#    the state by hand: `load_state_dict` for the model and the optimizer, and set `trainer.step`. For cosine,
#    compare `lr_at(s, 50, ...)` with `lr_at(s, 100, ...)`.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    tiny_data = PackedData(small, world.tokenizer, SEQ_LEN, 4, seed=0)
#    def tiny_trainer(steps):
#        torch.manual_seed(3)
#        m = Transformer(TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=32, n_layer=1, n_head=2))
#        return Trainer(m, tiny_data, TrainConfig(steps=steps, lr=3e-3, warmup_steps=5))
#
#    straight100 = tiny_trainer(100).fit(progress=False)["loss"]
#    short = tiny_trainer(50)
#    short.fit(until=40, progress=False)  # steps 0-39 of a 50-step run: warm-up, then the peak
#    longer = tiny_trainer(100)
#    longer.model.load_state_dict(short.model.state_dict())
#    longer.optimizer.load_state_dict(short.optimizer.state_dict())
#    longer.step = 40
#    print("reused:", longer.fit(progress=False)["loss"] == straight100[40:])
#    print("cosine:", [lr_at(s, 50, 1.0, 5, "cosine") == lr_at(s, 100, 1.0, 5, "cosine") for s in (10, 20, 39)])
#    ```
#    Under the multi-step schedule, steps 0-39 have the same learning rate in both runs ($s/50 < 0.8$ and
#    $s/100 < 0.8$), and the batch of each step is the same, so the continued run should match the straight one loss
#    for loss. Under cosine, every step after warm-up already depends on the total length, so the first 40 steps of a
#    50-step run are not the first 40 steps of a 100-step run, and the comparison prints False.
#    </details>
#
# 6. ★★ **A longer comparison.** Re-run the schedule comparison for 4x the steps. Does the gap between multi-step and
#    cosine shrink?
#
#    <details><summary>Hint</summary>Multiply `steps` in the `TrainConfig` of the comparison loop by 4, and keep
#    everything else, the seed included. Expect about 4 times the run time.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    longer_final = {}
#    for schedule in ("multistep", "cosine"):
#        torch.manual_seed(1)
#        m = Transformer(TransformerConfig(vocab_size=world.tokenizer.vocab_size, d_model=SCHED["d_model"],
#                                          n_layer=SCHED["n_layer"], n_head=SCHED["n_head"], max_seq_len=128))
#        tr = Trainer(m, sched_data, TrainConfig(steps=4 * SCHED["steps"], lr=3e-3, warmup_steps=40,
#                                                schedule=schedule, eval_every=SCHED["steps"] // 2),
#                     eval_batches=valid, device=device)
#        longer_final[schedule] = tr.fit()["eval_loss"][-1]
#    print(longer_final, f"{longer_final['multistep'] / longer_final['cosine'] - 1:+.1%}")
#    ```
#    Compare the relative gap with the printed `rel` of the short run. If it shrinks, the short run, not the
#    schedule, made most of the difference.
#    </details>
#
# 7. ★★ **Three-digit numbers.** Make a harder world (`max_value=999`) and see what the tokenizer and the model make
#    of it.
#
#    <details><summary>Hint</summary>Every number is now three character tokens, so documents are longer: measure
#    them before packing. `PackedData` raises a `ValueError` naming the first document longer than a row, and
#    `evaluate_accuracy` passes `max_new_tokens` on to `complete`.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    w999 = World(max_value=999, n_docs=20_000)
#    n_tok = np.array([len(x) + 2 for x in w999.tokenizer.encode_many([d.text for d in w999.corpus()])])
#    print(n_tok.mean(), n_tok.max())
#    seq = int(n_tok.max())  # a row of seq + 1 tokens holds the longest document
#    d999 = PackedData([d.text for d in w999.corpus()], w999.tokenizer, seq, MAIN["batch"], seed=0)
#    torch.manual_seed(0)
#    m999 = Transformer(TransformerConfig(vocab_size=w999.tokenizer.vocab_size, d_model=128, n_layer=4, n_head=4,
#                                         max_seq_len=seq + 32))
#    Trainer(m999, d999, TrainConfig(steps=MAIN["steps"], lr=3e-3, warmup_steps=50), device=device).fit()
#    print(evaluate_accuracy(m999, w999, temperature=1.0, max_new_tokens=seq, device=device)[0])
#    ```
#    The vocabulary does not change (digits are digits), but each number costs three tokens and each worked step
#    grows by three to five tokens, so fewer documents fit in a row and each step of training sees fewer
#    problems. A bare answer now has to produce three digits without writing anything down. Expect the held-out
#    accuracy to fall at the same number of steps, and the gap between bare answers and worked solutions to grow,
#    which is the gap that RL feeds on.
#    </details>
#
# ## Checks
#
# The chapter's key measurements, asserted (this is what the test suite checks). Each fails when the effect it guards
# is absent: the held-out loss ends below 0.7 nats per response token and started above it (an untrained model's
# loss is near $\ln 104 \approx 4.6$); the base model solves more than 4% of the held-out problems greedily and
# more than 1.5% sampled (a uniform guess among the 100 answers is right 1% of the time), but fewer than 90%, leaving room for RL to improve; each of the three
# styles makes at least 5% of its sampled completions; the schedule comparison
# gives finite losses within 20% of each other (a loose guard against a broken schedule; the ledger holds the 2%
# claim); the resume and NaN-guard tests of section 5 passed; and the Llama export came back bit for bit and, where
# transformers is installed, gave its ids, logits (within $10^{-4}$) and greedy text.

# %%
assert history["eval_loss"][-1] < 0.7 < history["eval_loss"][0], history["eval_loss"]
assert 0.04 < greedy_acc < 0.9 and 0.015 < sampled_acc < 0.9, (greedy_acc, sampled_acc)
assert all(len(by_style.get(s, ())) >= 0.05 * len(right) for s in ("bare", "steps", "reflects")), by_style.keys()
assert all(np.isfinite(list(final.values()))) and abs(rel) < 0.2, final
assert resume_exact and nan_guard_fired
assert llama_round_trip and (not hf_checked or (hf_same_ids and hf_logit_diff < 1e-4 and hf_same_text))
print(f"chapter 00 checks passed; {time.time() - CHAPTER_START:.0f} s since set-up")

# %% [markdown]
# The worked solutions that take seconds run here as well, so that the test suite checks them with the chapter:
# exercises 1 and 2. The others train models, and are left to the reader.

# %%
solution_seconds = run_solutions("00", globals(), (1, 2))
print("worked solutions run:", ", ".join(f"exercise {n} ({t:.1f} s)" for n, t in solution_seconds.items()))
