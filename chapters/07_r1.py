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
# # Chapter 07 · DeepSeek-R1's four stages: language mixing, and reasoning a reader can follow
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/deepseek-from-scratch/deepseek-from-scratch/blob/main/chapters/07_r1.ipynb)
# [![Binder](https://mybinder.org/badge_logo.svg)](https://mybinder.org/v2/gh/deepseek-from-scratch/deepseek-from-scratch/main?labpath=chapters%2F07_r1.ipynb)
#
# **What you will build.** R1-Zero reasons, but the R1 paper calls its output hard to read and prone to mixing
# languages. DeepSeek-R1 fixes that with four stages. In this chapter you build them, in miniature, and measure what
# each one does:
#
# 1. a **bilingual world**: every problem can be stated in symbols (`07+35-12`) or in words (`07 plus 35 minus 12`),
#    and the base model's corpus mostly reasons in the problem's language (section 1);
# 2. `dslib.r1`'s **language measures**: the share of the reasoning in the prompt's language, a mixing flag, and R1's
#    **language-consistency reward**; and a **readability** measure, four checks a reader would make (section 2);
# 3. the **four stages**, each a function that takes a model and returns a checkpointed one: cold start, reasoning RL
#    with the consistency reward, rejection sampling plus non-reasoning data with SFT of the *base* model, and RL for
#    all scenarios (section 3);
# 4. the experiments: R1-Zero's language drift (section 4), R1 against R1-Zero stage by stage (section 5), how fast RL
#    climbs with and without the cold start (section 6), an ablation that leaves out one stage at a time (section 7),
#    an explorer (section 8) and the claims ledger (section 9).
#
# **What you need.** Chapters 05 (GRPO) and 06 (the R1-Zero measures, `dslib.r1zero`), and the course's cached models:
# `python -m dslib.pretrained` builds them once (the bilingual base model and this chapter's study take about 25
# minutes on one CPU thread; the chapter builds them itself when they are missing). **How long.** About 2-3 minutes at
# `small` scale on 2 CPU cores once the models are cached.
#
# **Papers.** DeepSeek-R1 (arXiv 2501.12948), section 2.3: cold start (2.3.1), reasoning-oriented RL with the
# language-consistency reward (2.3.2), rejection sampling and supervised fine-tuning with non-reasoning data (2.3.3),
# and reinforcement learning for all scenarios (2.3.4); `PAPERS.md` section 6.

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
import time
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import HTML, display

import dslib
from dslib.book import Ledger, run_solutions
from dslib.diagram import Diagram
from dslib.checkpoint import load_checkpoint
from dslib.explore import explore
from dslib.pretrained import (BILINGUAL_RECIPE, R1_RECIPE, base_model, base_world, r1_model, r1_model_info,
                              r1_runs_path)
from dslib.r1zero import problems_with_ops, sample_k
from dslib.rewards import accuracy_reward
from dslib.world import parse_answer, prompt

device = dslib.setup(seed=0, threads=dslib.sized(small=1, full=None))
SCALE = dslib.scale()
CHAPTER_START = time.time()
SIZES = dslib.sized(
    small={"eval_problems": 100, "k": 4, "curve_problems": 50, "curve_k": 2, "easy_problems": 60},
    full={"eval_problems": 400, "k": 16, "curve_problems": 200, "curve_k": 8, "easy_problems": 400},
)
world = base_world(BILINGUAL_RECIPE)
tok = world.tokenizer

# %% [markdown]
# ## The idea: four stages, because RL alone is not enough
#
# R1-Zero (chapter 06) showed that rule rewards alone teach a base model to reason. The R1 paper lists what it did
# not fix (section 2.3): the outputs were hard to read, and they **mixed languages**, "particularly when RL prompts
# involve multiple languages". DeepSeek-R1 is the answer, four stages in a row:
#
# 1. **Cold start** (2.3.1). Before any RL, fine-tune the base model on "thousands" of long chain-of-thought examples
#    collected to be readable. The aim is a better starting point for RL and a readable output pattern.
# 2. **Reasoning-oriented RL** (2.3.2). GRPO as for R1-Zero, plus a **language-consistency reward**: "the proportion
#    of target language words in the CoT", added to the accuracy reward. The paper says the reward "results in a slight
#    degradation in the model's performance" but makes the output "more readable".
# 3. **Rejection sampling and SFT** (2.3.3). Sample the stage-2 model, keep only right answers "and filter out
#    chain-of-thought with mixed languages, long paragraphs, and code blocks": about 600k reasoning samples. Add about
#    200k non-reasoning samples (writing, factual QA). Then fine-tune **DeepSeek-V3-Base**, not the stage-2 model, on
#    all 800k for two epochs.
# 4. **RL for all scenarios** (2.3.4). A second RL stage: the rule rewards for reasoning, reward models for
#    helpfulness and harmlessness for everything else.
#
# Our miniature keeps the structure and swaps each ingredient for one this world has. The diagram is the chapter's map.

# %%
def draw_stages():
    """R1's four stages, as this chapter builds them, with R1-Zero beside them for comparison."""
    d = Diagram(13, 4.2, "DeepSeek-R1's pipeline in miniature (R1 paper, section 2.3)")

    d.box(0.1, 1.6, 1.7, 1.0, "bilingual\nbase model\n(cached)", "model")
    d.box(2.4, 2.9, 2.1, 1.0, "1. cold start\nSFT on 1,000 readable\nsingle-language solutions", "stage")
    d.box(5.1, 2.9, 2.1, 1.0, "2. reasoning RL\nGRPO: accuracy + format\n+ language consistency", "stage")
    d.box(7.8, 2.9, 2.3, 1.0, "3. rejection sampling\nkeep right, readable,\none-language samples\n+ bare easy answers",
        "stage")
    d.box(10.7, 2.9, 2.2, 1.0, "4. RL, all scenarios\nrules + language\n+ brevity on easy ones", "stage")
    d.arrow(1.8, 2.4, 2.4, 3.3)
    d.arrow(4.5, 3.4, 5.1, 3.4)
    d.arrow(7.2, 3.4, 7.8, 3.4, "sample")
    d.arrow(10.1, 3.4, 10.7, 3.4)
    d.box(7.8, 1.45, 2.3, 0.8, "SFT of the *base*\nmodel on the kept data", "stage")
    d.arrow(8.95, 2.9, 8.95, 2.25)
    d.arrow(1.8, 1.85, 7.8, 1.85, "the base model again (as R1 took V3-Base)", dy=-0.25)
    d.arrow(10.1, 1.85, 11.8, 2.9)
    d.box(2.4, 0.15, 4.8, 0.8, "R1-Zero: GRPO with accuracy + format only, straight from the base", "baseline")
    d.arrow(1.0, 1.6, 2.4, 0.55)
    d.box(7.8, 0.15, 5.1, 0.8, "measured on problems in both languages: accuracy, language,\nmixing, readability, length",
        "measure")
    d.show()


draw_stages()

# %% [markdown]
# What stands in for what:
#
# | R1 | this chapter |
# |---|---|
# | DeepSeek-V3-Base, trained on Chinese and English | a 0.46M-parameter model pretrained on arithmetic stated in symbols or in words |
# | a prompt in Chinese, a CoT that drifts into English | a problem in words, reasoning that drifts into symbols |
# | "thousands" of readable long-CoT cold-start examples | 1,000 worked solutions with a check (" wait "), wholly in the problem's language |
# | the share of target-language words in the CoT | the share of the reasoning's operators and equals signs written in the problem's language |
# | 600k rejection-sampled + 200k non-reasoning samples | one kept sample per problem from 800 problems x 4 samples + 200 bare answers to one-step problems |
# | helpfulness and harmlessness reward models | a brevity reward on one-step problems (a bare right answer is the helpful reply) |

# %% [markdown]
# ## 1. The bilingual world
#
# Chapter 00's world already writes reasoning in two surface languages: symbols (`07+35=42`) and words
# (`07 plus 35 is 42`). So far every *problem* was stated in symbols, so the language of the reasoning had nothing to
# be consistent with. Chapter 07 adds the missing half: `WorldConfig(prompt_en_rate=0.5)` states half the problems in
# words, and a worked solution of a worded problem reasons in words with probability `en_prompt_consistency` (0.8);
# the rest switch to symbols or mix. Problems in symbols mostly reason in symbols, with a few in words or switching
# part-way (the cell below counts each share in this corpus). The base model of this chapter is pretrained on that
# corpus with chapter 00's recipe; its context is 128 tokens, which must hold the longest document (worded problems
# with worded solutions are the longest; the cell below prints the length).

# %%
print(world)
docs = world.corpus()[:20_000]
for d in docs[:6]:
    print(f"  [{d.problem.language} prompt, {d.style}, reasoning {d.language}] {d.text}")
mix = Counter((d.problem.language, d.language) for d in docs if d.style != "bare")
for lang in ("sym", "en"):
    n = sum(v for (p, _), v in mix.items() if p == lang)
    print(f"worked solutions of problems in {lang}: " + ", ".join(
        f"{r} {mix[(lang, r)] / n:.0%}" for r in ("sym", "en", "mixed")))
longest = max(len(tok.encode(d.text, bos=True, eos=True)) for d in world.corpus())
print(f"longest document: {longest} tokens (the context is {BILINGUAL_RECIPE.seq_len})")

# %% [markdown]
# The held-out problems are chapter 00's, in both languages: `dslib.r1.bilingual(problems)` returns each one in
# symbols, then the same one in words. No held-out problem occurs in the corpus in either language.

# %% [markdown]
# ## 2. Measuring language and readability
#
# R1's reward counts target-language words. Our reasoning is made of numbers, which belong to both languages, and of
# the marks that join them: the operator and the equals sign of each step (`+ - =` in symbols, `plus minus is` in
# words). Every step has exactly two marks in either language, so **the share of marks in the prompt's language is the
# share of half-steps written in it**, whichever language they use. That is `language_share`; the reward is that share
# with the prompt's language as the target, and a response **mixes** when marks of both languages appear in it.

# %%
#| default_exp r1

# %%
#| export
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

# %%
#| export
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

# %% [markdown]
# **Checked against a slow, obvious reference.** The reference splits the reasoning into whitespace-separated words,
# and then walks through each word character by character: a whole word `plus`, `minus` or `is` is a mark in words,
# and each `+`, `-` or `=` inside a word is a mark in symbols. The regular expression must agree with it on every
# transcript the world can write, in all three languages and every style, and on a few hostile strings.

# %%
from dslib.r1 import (language_consistency_reward, language_marks, language_share, mixes,  # noqa: E402
                      reasoning_language, reasoning_of)


def marks_reference(text: str) -> dict[str, int]:
    counts = {"sym": 0, "en": 0}
    for word in text.split("</think>", 1)[0].split():
        if word in ("plus", "minus", "is"):
            counts["en"] += 1
        else:
            counts["sym"] += sum(ch in "+-=" for ch in word)
    return counts


rng = np.random.default_rng(0)
checked = 0
for d in world.corpus()[:3000]:
    for lang in ("sym", "en", "mixed"):
        doc = world.document(d.problem, d.style, language=lang)
        assert language_marks(doc.completion) == marks_reference(doc.completion), doc.completion
        checked += 1
hostile = ["", "</think>", "07 plus35 is", "thesis minus 3", "7+-=3 wait is", "07+35=42</think> plus 07"]
print(f"regular expression = word-by-word reference on {checked} world transcripts")
for h in hostile:
    print(f"  {h!r:30} marks {language_marks(h)} (reference {marks_reference(h)})  language {reasoning_language(h)}")

# %% [markdown]
# On the world's own transcripts the two agree everywhere. On hostile strings they can differ, and the printout shows
# where: the regular expression reads `plus35` as the word *plus* glued to a number (a character-level model can
# write that), while a split on spaces sees one unknown word. Neither counts `thesis` as *is*, and marks after
# `</think>` are not reasoning. The measures never raise, whatever the input.
#
# The reward on four handmade responses to a problem stated in words, and what the mixing flag says:

# %%
en_problem = world.heldout[0].in_language("en")
f = en_problem.fmt
v = en_problem.values
o = en_problem.operands
handmade = {
    "words throughout": f"{f(o[0])} plus {f(o[1])} is {f(v[1])}",
    "symbols throughout": f"{f(o[0])}+{f(o[1])}={f(v[1])}",
    "switches half-way": f"{f(o[0])} plus {f(o[1])} is {f(v[1])} {f(v[1])}-{f(o[2])}={f(v[2])}",
    "bare answer": "",
}
print(f"problem in words: {prompt(en_problem)!r}")
for name, think in handmade.items():
    c = think + f"</think> <answer> {f(en_problem.answer)} </answer>"
    print(f"  {name:<20} consistency {language_consistency_reward(c, en_problem):.2f}  mixes {mixes(c)!s:<5}  "
          f"{c}")

# %% [markdown]
# A bare answer scores 1: it writes nothing in the wrong language. That is a choice, and it matters: a reward of 0
# for bare answers would push the model toward reasoning whether or not reasoning helps, which is not what R1's reward
# is for.
#
# ### Readability, made checkable
#
# "Readable" has no formula in the paper. R1 filtered out mixed languages, long paragraphs and code blocks, and gave
# its outputs a fixed layout with a summary. Ours is four checks a reader of this world would make:
#
# - **format**: the tags are closed and in order, and nothing follows `</answer>` (chapter 05's format rule);
# - **one language**: the reasoning does not mix symbols and words;
# - **parses**: the reasoning is whole steps joined by spaces or " wait ", optionally after a first guess, and nothing
#   else (no half-written step, no stray characters);
# - **no repeats**: no step is written twice. A model that writes `53+23=76 wait 53+23=76` "checks" nothing: the
#   second step is the first one again.

# %%
#| export
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

# %%
from dslib.r1 import READABILITY_CHECKS, bilingual, measure_r1, readability, readable  # noqa: E402

examples = {
    "clean, with a check": "42 wait 07+35=42 42-12=30</think> <answer> 30 </answer>",
    "mixed": "07+35=42 42 minus 12 is 30</think> <answer> 30 </answer>",
    "a hollow wait": "07+35=42 wait 07+35=42 42-12=30</think> <answer> 30 </answer>",
    "half a step": "07+35=42 42-1</think> <answer> 30 </answer>",
    "text after the answer": "07+35=42 42-12=30</think> <answer> 30 </answer> 30",
    "bare answer": "</think> <answer> 30 </answer>",
}
rows = "".join(f"<tr><td>{html.escape(n)}</td><td><code>{html.escape(t)}</code></td>"
               + "".join(f"<td>{'✓' if ok else '✗'}</td>" for ok in readability(t).values())
               + f"<td><b>{'yes' if readable(t) else 'no'}</b></td></tr>" for n, t in examples.items())
display(HTML("<table><tr><th>case</th><th>completion</th>" + "".join(f"<th>{c}</th>" for c in READABILITY_CHECKS)
             + f"<th>readable</th></tr>{rows}</table>"))
assert [readable(t) for t in examples.values()] == [True, False, False, False, False, True]

# %% [markdown]
# ## 3. The four stages
#
# Each stage is a function that takes a model and returns a new one (the input is never modified), checkpointed into
# a folder: run it again with the same folder and a finished stage is loaded in a second instead of trained again.
# The SFT stages use chapter 00's `Trainer` (loss on the completion only, packed rows); the RL stages use chapter 05's
# `GRPOTrainer`, with a checkpoint every 10 steps. One config holds every stage's knobs. Every stage takes `trainers`,
# the pair of functions that build its trainers: here they train in this process; the capstone (chapter 09) passes a
# pair that trains data-parallel on several processes, and the stages stay as they are.

# %%
#| export
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

# %% [markdown]
# **Who builds the trainers.** Each stage asks a `Trainers` pair for its trainer instead of building one itself: the
# default pair trains in this process, and the capstone's pair trains the same stage on several processes.

# %%
#| export
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

# %% [markdown]
# **Stage 1, the cold start.** R1's cold-start data were long chains of thought, made readable (a fixed layout, a
# summary) and kept only when right. Ours come from the world's own writer: fresh training problems of two or three
# operations, in either language, each solved in a *reflecting* style (a guess then a check, or a slip caught with
# " wait ") written wholly in the problem's language, and kept only when right and readable.

# %%
#| export
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

# %% [markdown]
# **Stage 2, reasoning RL**, is chapter 05's GRPO with R1's rewards. The language-consistency reward joins accuracy
# and format with weight $\lambda$ (0.2 here; R1 gives no weight, only that it sums the two rewards directly):
#
# $$r(o) = \mathbb 1[\text{right}] + 0.1\cdot\mathbb 1[\text{format}] + \lambda\cdot
# \frac{\#\text{marks in the prompt's language}}{\#\text{marks}}.$$
#
# A right answer reasoned in the wrong language thus earns $1.1$, the same answer in the right language $1.1 +
# \lambda$: the reward prefers consistency but never more than it prefers a right answer.
#
# **Stage 4** adds this world's helpfulness. R1 judged helpfulness with a reward model on the final summary; the
# helpful reply to `Q:07+35` is `42`, not a paragraph. The brevity reward pays a *right* answer to a one-operation
# problem $1 - (\text{reasoning characters})/32$ (at least 0), and is 0 for every longer problem and every wrong answer,
# so it can only shorten easy answers, never buy a wrong one.

# %%
#| export
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

# %% [markdown]
# **Stage 3, rejection sampling.** Sample the stage-2 model on fresh problems in both languages, keep the samples a
# careful editor would keep (right, readable, every mark in the problem's language; one per problem, so no problem
# dominates), add the non-reasoning data (bare answers to one-operation problems: R1's 200k writing and QA samples
# taught it when *not* to think at length), and fine-tune the **base** model on the lot. Starting again from the base
# rather than from the RL model is R1's choice: the data carry what RL found, without RL's drift.

# %%
#| export
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

# %% [markdown]
# **The pipeline** chains the stages, and leaves any of them out for the ablation of section 7. Each stage's folder is
# nested in its parent's and named by what it did (`cold_start/reasoning_rl/rejection_sft/...`; a stage-2 run without
# the consistency reward is `reasoning_rl-nolang`), so variants that share their first stages share their folders and
# nothing is trained twice. Leaving out all four is R1-Zero: stage 2 without the consistency reward, straight from
# the base model.

# %%
#| export
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

# %% [markdown]
# **The rejection filter, checked.** On the stage-2 model's own samples (section 5 loads it), the filter must keep
# exactly the samples that a slow, one-condition-at-a-time reference keeps, and nothing it keeps may be wrong, mixed or
# in the other language. We check that once the models are loaded, below.
#
# ## 4. R1-Zero's language drift
#
# The study's models are cached like the base models: `r1_model()` trains the whole study once (R1, R1-Zero, and R1
# with each stage left out) and stores every stage's checkpoint; `run_r1` with the cache's folder then *loads* each
# variant instead of training it. A fresh machine builds it here, with progress bars.

# %%
from dslib.r1 import R1Config, SKIPPABLE, keep_sample, run_r1  # noqa: E402

t0 = time.time()
base = base_model(0, recipe=BILINGUAL_RECIPE)
r1_model(0)  # builds the study on a machine that does not have it yet
RUNS = r1_runs_path(0)
CONFIG = R1_RECIPE.config(0)
study_info = r1_model_info(0)
VARIANTS = {"R1": (), "R1-Zero": SKIPPABLE, **{f"without {s}": (s,) for s in SKIPPABLE}}
runs = {name: run_r1(base, world, CONFIG, RUNS, skip=skip, progress=False) for name, skip in VARIANTS.items()}
print(f"loaded {len(runs)} variants from {RUNS} in {time.time() - t0:.0f} s "
      f"(the study took {study_info.get('build_seconds', float('nan')):.0f} s to build: "
      f"{study_info.get('variant_seconds')})")
r1zero = runs["R1-Zero"]["final"]
stage_models = {"base": base, "R1-Zero": r1zero, **{f"{i + 1}. {s}": runs["R1"]["models"][s]
                                                   for i, s in enumerate(("cold_start", "reasoning_rl",
                                                                          "rejection_sft", "all_scenarios_rl"))}}

# %% [markdown]
# Every model is measured on the same held-out problems, each asked in symbols and in words, with the same sampling
# seed, $k$ samples per prompt at temperature 1:

# %%
EVAL = bilingual(world.heldout[:SIZES["eval_problems"]])
K = SIZES["k"]
MAX_NEW = CONFIG.grpo_config(2).max_new_tokens


def evaluate(model, problems=EVAL, k=K, seed=1):
    samples = sample_k(model, world, problems, k, max_new_tokens=MAX_NEW, seed=seed)
    return samples, measure_r1(samples)


t0 = time.time()
results = {name: evaluate(m) for name, m in stage_models.items()}
print(f"{len(results)} models x {len(EVAL)} prompts x {K} samples in {time.time() - t0:.0f} s")
base_m, r1z_m = results["base"][1], results["R1-Zero"][1]
for name in ("base", "R1-Zero"):
    m = results[name][1]
    for lang in ("sym", "en"):
        b = m["by_language"][lang]
        print(f"{name:>8}, problems in {lang:>3}: pass@1 {b['pass@1']:6.1%}   reasoning in the prompt's language "
              f"{b['prompt_language_share']:6.1%}   responses that mix {b['mixing']:5.1%}   readable "
              f"{b['readable']:6.1%}")

# %%
def reasoning_languages(samples, lang):
    """Shares of reasoning written in symbols, words, mixed, or none (bare), for the problems in `lang`."""
    rows = [t for p, row in zip(samples.problems, samples.texts) if p.language == lang for t in row]
    c = Counter(reasoning_language(t) for t in rows)
    return {k: c[k] / len(rows) for k in ("sym", "en", "mixed", "none")}


fig, axes = plt.subplots(1, 2, figsize=(12, 3.6), sharey=True)
colors = {"sym": "#5b8ff9", "en": "#f6bd16", "mixed": "#e8684a", "none": "#cccccc"}
for ax, lang in zip(axes, ("sym", "en")):
    names = ["base", "R1-Zero", "4. all_scenarios_rl"]
    shares = [reasoning_languages(results[n][0], lang) for n in names]
    left = np.zeros(len(names))
    for key in ("sym", "en", "mixed", "none"):
        vals = np.array([s[key] for s in shares])
        ax.barh(["base", "R1-Zero", "R1"], vals, left=left, color=colors[key],
                label={"sym": "symbols", "en": "words", "mixed": "mixed", "none": "bare (no reasoning)"}[key])
        left += vals
    ax.set_title(f"problems stated in {'symbols' if lang == 'sym' else 'words'}: the language of the reasoning")
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
axes[1].legend(fontsize=8, loc="lower right")
plt.tight_layout()
plt.show()
en_drift = base_m["by_language"]["en"]["prompt_language_share"] - r1z_m["by_language"]["en"]["prompt_language_share"]
print(f"on problems in words, accuracy-only RL moved the reasoning {en_drift:+.0%} away from the prompt's language "
      f"(share in words {base_m['by_language']['en']['prompt_language_share']:.0%} -> "
      f"{r1z_m['by_language']['en']['prompt_language_share']:.0%}); on problems in symbols the share went "
      f"{base_m['by_language']['sym']['prompt_language_share']:.0%} -> "
      f"{r1z_m['by_language']['sym']['prompt_language_share']:.0%}")

# %% [markdown]
# Read the right panel from the top. The base model reasons about a problem in words mostly in words, as its corpus
# did (the printed share). Accuracy-only RL does not care which language a right answer is reasoned in: it pushes
# toward whichever route is right more often. Which route that is, the base model's two pass@1 numbers say. If it is
# right more often on problems in symbols, and R1-Zero's reasoning on worded problems has moved into symbols, the
# drift has gone where the accuracy is. A likely reason the symbols are stronger: a step in words spreads the same
# digits over twice as many characters, and our small model copies and adds them less reliably at that distance.
# (The explorer of section 8 shows such slips.)
#
# This is R1's language mixing, seen from the side. In R1 the prompt was Chinese and the chain of thought drifted
# into English, often *within* a response. Compare the two measures printed above: the prompt-language share, and
# the share of responses that mix within themselves. Where the first collapses and the second stays small, the
# switch is wholesale, one language per response, and a mixing flag alone would have missed it. That is why we report
# both.
#
# ## 5. R1 against R1-Zero, stage by stage
#
# The same measures for every stage of R1, beside the base model and R1-Zero. Read the table one column at a time
# (cons@k is the majority vote of the $k$ samples; "in prompt's language" is over responses that reason at all):

# %%
def stage_table(results: dict) -> None:
    cols = [("pass@1", "pass@1", "{:.1%}"), ("sym pass@1", ("sym", "pass@1"), "{:.1%}"),
            ("en pass@1", ("en", "pass@1"), "{:.1%}"), (f"cons@{K}", "cons@k", "{:.1%}"),
            ("length", "length", "{:.1f}"), ("reflects", "reflection_response", "{:.0%}"),
            ("en: in prompt's language", ("en", "prompt_language_share"), "{:.0%}"), ("mixing", "mixing", "{:.1%}"),
            ("readable", "readable", "{:.1%}")]
    get = lambda m, key: m["by_language"][key[0]][key[1]] if isinstance(key, tuple) else m[key]
    head = "".join(f"<th>{c}</th>" for c, _, _ in cols)
    body = "".join(f"<tr><td style='text-align:left'>{html.escape(name)}</td>"
                   + "".join(f"<td>{fmt.format(get(m, key))}</td>" for _, key, fmt in cols) + "</tr>"
                   for name, (_, m) in results.items())
    display(HTML(f"<table><tr><th></th>{head}</tr>{body}</table>"))


stage_table(results)
s_m = {i: results[name][1] for i, name in enumerate(list(stage_models)[2:], start=1)}
r1_m = s_m[4]
print(f"R1 (stage 4) vs R1-Zero: pass@1 {r1_m['pass@1']:.1%} vs {r1z_m['pass@1']:.1%}; on problems in symbols "
      f"{r1_m['by_language']['sym']['pass@1']:.1%} vs {r1z_m['by_language']['sym']['pass@1']:.1%}, in words "
      f"{r1_m['by_language']['en']['pass@1']:.1%} vs {r1z_m['by_language']['en']['pass@1']:.1%}")
print(f"readable: base {base_m['readable']:.1%}, R1-Zero {r1z_m['readable']:.1%}, stages 1-4 "
      + ", ".join(f"{s_m[i]['readable']:.1%}" for i in range(1, 5)))
print("stage 1's failed checks: " + ", ".join(f"{c} {1 - s_m[1]['check_' + c]:.1%}" for c in READABILITY_CHECKS))
print(f"stage 3 kept {runs['R1']['rejection']['kept']} of {runs['R1']['rejection']['problems']} problems "
      f"({runs['R1']['rejection']['sampled']} samples) and added {runs['R1']['rejection']['non_reasoning']} bare "
      f"answers")

# %% [markdown]
# What to look for, stage by stage. The numbers are in the table; the lines printed above and below name the ones
# that matter.
#
# - **1. cold start.** A thousand readable solutions in the problem's language set both the language and the style.
#   Compare the "reflects" and "en: in prompt's language" columns of the cold start with the base model's. If its
#   readability is *lower* than the base's, the failed checks printed above say why. A `no_repeats` failure is a
#   hollow `wait`: the model copied the look of the slip-fix examples ("slip, wait, redo") without the slip, and
#   repeats the step it just wrote.
# - **2. reasoning RL** with the consistency reward. Read the language column: does it hold while accuracy rises?
#   A hollow wait costs tokens and wins nothing, so RL should remove it; the `no_repeats` line below follows it.
# - **3. rejection sampling + SFT of the base.** The kept data are right, readable and single-language by
#   construction. The new model inherits stage 2's behaviour without running RL on the base. Compare its accuracy
#   and readability with stage 2's.
# - **4. RL for all scenarios** polishes stage 3 with the same rules plus brevity on easy problems. That part is
#   measured below, because every held-out problem has three operations or more.
#
# The lines printed above compare R1 with R1-Zero per language, and that split is the chapter's main finding. On
# problems in symbols both models reason in the same language, so consistency should cost nothing there. On problems
# in words R1 keeps the prompt's language, and whatever accuracy it loses there is the price of that choice. The
# price can only be as large as the model's weakness in words, which is a property of the base model, not of the
# method. R1 reports "a slight degradation"; its base model was strong in both of its languages.

# %%
print("hollow waits (failed no_repeats): " + ", ".join(f"{name} {1 - results[name][1]['check_no_repeats']:.1%}"
                                                       for name in stage_models))

# %%
EASY = problems_with_ops(world, 1, SIZES["easy_problems"], seed=7)
EASY = [p.in_language(("sym", "en")[i % 2]) for i, p in enumerate(EASY)]
easy = {}
for name in ("base", "R1-Zero", "3. rejection_sft", "4. all_scenarios_rl"):
    _, m = evaluate(stage_models[name], EASY, k=K, seed=2)
    bare = m["by_style"]["bare"]
    worked = [m["by_style"][st] for st in ("steps", "reflects") if m["by_style"][st]["share"] > 0]
    worked_acc = sum(w["share"] * w["accuracy"] for w in worked) / max(1e-9, sum(w["share"] for w in worked))
    easy[name] = {"pass@1": m["pass@1"], "bare": bare["share"], "length": m["length"],
                  "bare_acc": bare["accuracy"], "worked_acc": worked_acc}
    print(f"one-operation problems, {name:<20} pass@1 {m['pass@1']:6.1%}   bare answers {bare['share']:6.1%} "
          f"(right {bare['accuracy']:6.1%})   worked answers right {worked_acc:6.1%}   mean length "
          f"{m['length']:5.1f} tokens")
e3, e4 = easy["3. rejection_sft"], easy["4. all_scenarios_rl"]
brief = e4["bare"] > e3["bare"] or e4["length"] < e3["length"]
print(f"stage 4 {'shortened' if brief else 'lengthened'} easy answers: bare {e3['bare']:.0%} -> {e4['bare']:.0%}, "
      f"length {e3['length']:.1f} -> {e4['length']:.1f} tokens, pass@1 {e3['pass@1']:.0%} -> {e4['pass@1']:.0%}")

# %% [markdown]
# On one-operation problems the helpful reply is the answer itself. The stage-3 data include bare answers to easy
# problems, and stage 4's brevity reward pays for them. Whether the preference took is a question of arithmetic,
# and the printout has the numbers for it. A bare right answer earns $1.1 + 0.2$. A worked one of about 16
# characters earns $1.1 + 0.1$. Bare answers therefore pay in expectation only if they are right almost as often as
# worked ones. Compare the stage-3 model's accuracy of bare answers with that of its worked answers: if the gap is
# much larger than the 0.1 of brevity it could win, RL takes the accuracy, and easy answers get *longer*. Then the
# brevity preference has lost to the accuracy reward, which is what a reward designer must check before trusting a
# weight. (Exercise 2 raises the weight.)
#
# ## 6. Does the cold start speed up RL?
#
# R1's reason for the cold start is partly speed: RL from a readable, reasoning start should climb faster than RL from
# the base. We compare two stage-2 runs with the same rewards (accuracy, format, consistency), the same GRPO seed and
# the same problems at every step. The only difference is the start: the cold-start model, or the base model (the
# ablation "without cold_start"). R1-Zero (the same run without the consistency reward) is the third line. Every
# saved checkpoint is loaded and measured here.

# %%
CURVE = bilingual(world.heldout[SIZES["eval_problems"]:SIZES["eval_problems"] + SIZES["curve_problems"]])
curve_runs = {"R1 stage 2 (from the cold start)": runs["R1"], "stage 2 from the base": runs["without cold_start"],
              "R1-Zero (no consistency reward)": runs["R1-Zero"]}
curves = {}
t0 = time.time()
for name, run in curve_runs.items():
    tr = run["trainers"]["reasoning_rl"]
    pts = []
    for step, folder in tr.checkpoints():
        m = copy.deepcopy(base)
        load_checkpoint(folder, m)
        _, r = evaluate(m.eval(), CURVE, k=SIZES["curve_k"], seed=3)
        pts.append((step, r))
    curves[name] = pts
print(f"{sum(len(v) for v in curves.values())} checkpoints measured in {time.time() - t0:.0f} s")

fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
for name, pts in curves.items():
    steps = [s for s, _ in pts]
    for ax, lang in zip(axes[:2], ("sym", "en")):
        ax.plot(steps, [r["by_language"][lang]["pass@1"] for _, r in pts], "o-", label=name)
    axes[2].plot(steps, [r["by_language"]["en"]["prompt_language_share"] for _, r in pts], "o-", label=name)
axes[0].set_title("pass@1, problems in symbols")
axes[1].set_title("pass@1, problems in words")
axes[2].set_title("problems in words: reasoning in words")
for ax in axes:
    ax.set_xlabel("stage-2 GRPO step")
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()


def steps_to(pts, lang, target):
    """The first checkpoint step whose pass@1 on `lang` reaches target, or None."""
    return next((s for s, r in pts if r["by_language"][lang]["pass@1"] >= target), None)


target = 0.9 * curves["R1-Zero (no consistency reward)"][-1][1]["by_language"]["sym"]["pass@1"]
reach = {name: steps_to(pts, "sym", target) for name, pts in curves.items()}
for name, at in reach.items():
    last = curves[name][-1][1]["by_language"]["en"]["prompt_language_share"]
    print(f"{name:<34} reaches {target:.0%} pass@1 on problems in symbols (90% of R1-Zero's last) "
          + (f"at step {at}" if at is not None else f"not within {CONFIG.grpo_config(2).steps} steps")
          + f"; worded problems reasoned in words at the end: {last:.0%}")

# %% [markdown]
# The cold start shifts the curve up before RL begins: its step-0 point is the cold-start model, not the base. How
# much sooner it reaches R1-Zero's level is printed above, in checkpoint steps of 10. The yardstick is the problems
# in symbols, because there the three runs compete on equal terms. Part of the head start is simply the higher
# starting point; R1's claim is about both, a better start and a faster climb.
#
# On problems in words, the right panel shows the other effect, and the printed end points measure it. R1-Zero's
# reasoning leaves words as its accuracy rises. Stage 2 from the base has the consistency reward against the drift.
# Compare its curve with R1-Zero's in the middle of the run, and its end point with R1-Zero's: a reward that slows
# the drift but ends near R1-Zero's level has lost to the accuracy reward. Exercise 1 does the arithmetic: with
# $\lambda = 0.2$, a right answer in symbols ($1.1$) still beats a wrong one in words ($0.3$), so the drift pays
# whenever symbols are right more than 20 points more often. From the cold start there is almost nothing to hold
# back, because words are already the habit and the model rarely samples anything else.

# %%
def share_at(name, step):
    return next(r["by_language"]["en"]["prompt_language_share"] for s_, r in curves[name] if s_ == step)


mid = CONFIG.grpo_config(2).steps // 3 // 10 * 10 or 10
end = CONFIG.grpo_config(2).steps
slowed = share_at("stage 2 from the base", mid) - share_at("R1-Zero (no consistency reward)", mid)
held = share_at("stage 2 from the base", end)
print(f"problems in words, reasoned in words at step {mid}: stage 2 from the base "
      f"{share_at('stage 2 from the base', mid):.0%}, R1-Zero {share_at('R1-Zero (no consistency reward)', mid):.0%} "
      f"({'slowed' if slowed > 0 else 'not slowed'} by the reward); at step {end}: {held:.0%} vs "
      f"{share_at('R1-Zero (no consistency reward)', end):.0%}, from the cold start "
      f"{share_at('R1 stage 2 (from the cold start)', end):.0%}")

# %% [markdown]
# ## 7. What each stage adds: the ablation
#
# Leave out one stage at a time and measure the final model. (Without stage 4, the final model is stage 3's; without
# the language reward, both RL stages run on accuracy and format only.)

# %%
ablation = {"R1 (all four stages)": results["4. all_scenarios_rl"]}
for s in SKIPPABLE:
    ablation[f"without {s}"] = (None, evaluate(runs[f"without {s}"]["final"])[1])
ablation["R1-Zero (none of them)"] = results["R1-Zero"]
stage_table(ablation)
abl = {name: m for name, (_, m) in ablation.items()}
nolang = abl["without language"]
print(f"without the language reward: reasoning in words on worded problems "
      f"{nolang['by_language']['en']['prompt_language_share']:.0%} (R1: "
      f"{r1_m['by_language']['en']['prompt_language_share']:.0%}), pass@1 on them "
      f"{nolang['by_language']['en']['pass@1']:.1%} (R1: {r1_m['by_language']['en']['pass@1']:.1%})")

# %% [markdown]
# The ablation separates the stages' jobs; read each row against R1's.
#
# - **Without the cold start**, stage 2 starts from the base, and only the consistency reward stands against the
#   drift (section 6 followed it through stage 2). Then the rejection filter keeps only samples in the prompt's
#   language, and stage 3 fine-tunes the base on them: compare the "en: in prompt's language" column here with the
#   end of that stage-2 curve to see how much of the language the filter restores.
# - **Without the language reward**, only the cold start holds it. If that column still reads close to 100%, then in
#   this miniature the cold start alone does the job, and the reward is a safeguard.
# - **Without the rejection SFT**, stage 4 continues from the stage-2 model; compare accuracy and readability to see
#   what rebuilding from the base on filtered data added, or cost.
# - **Without stage 4**, the final model is stage 3's. Stage 4's own target, brevity on easy problems, is measured
#   in section 5, not in this table of three- and four-operation problems.
#
# ## 8. Explorer: one problem after each stage
#
# Pick a held-out problem and its language, and see four samples from every stage side by side. Reasoning in the
# prompt's language is blue, in the other language red; the answer is green when right.

# %%
def highlight(text: str, problem) -> str:
    out = html.escape(text)
    other = "en" if problem.language == "sym" else "sym"
    for tag in ("&lt;/think&gt;", "&lt;answer&gt;", "&lt;/answer&gt;"):
        out = out.replace(tag, f"<span style='color:#999'>{tag}</span>")
    think = html.escape(reasoning_of(text))
    lang = reasoning_language(text)
    color = {"none": "#999", problem.language: "#1f5fbf", other: "#c0392b", "mixed": "#c0392b"}[lang]
    out = out.replace(think, f"<span style='color:{color}'>{think}</span>", 1) if think else out
    ok = "#1e8449" if accuracy_reward(text, problem) else "#c0392b"
    return f"<span style='border-left:4px solid {ok};padding-left:4px'>{out}</span>"


def show_problem(problem=0, language="en", samples=4):
    p = world.heldout[problem].in_language(language)
    cols = {}
    for name, m in stage_models.items():
        s = sample_k(m, world, [p], samples, max_new_tokens=MAX_NEW, seed=11)
        cols[name] = s.texts[0]
    head = "".join(f"<th style='text-align:left'>{html.escape(n)}</th>" for n in cols)
    rows = "".join("<tr>" + "".join(f"<td style='text-align:left;vertical-align:top'>{highlight(t[i], p)}</td>"
                                    for t in cols.values()) + "</tr>" for i in range(samples))
    display(HTML(f"<p><b>{html.escape(prompt(p))}</b> (answer {p.answer})</p><table>{head}{rows}</table>"))


explore(show_problem, problem=(0, SIZES["eval_problems"] - 1, 1), language=["en", "sym"], samples=(1, 8, 1))

# %% [markdown]
# ## 9. Claims ledger
#
# R1's claims about its four stages, next to what this chapter measured in this run. "holds" compares the direction of
# a claim with our measurement; the notes say by how much, and why, where the miniature differs.

# %%
gap_en = r1z_m["by_language"]["en"]["pass@1"] - r1_m["by_language"]["en"]["pass@1"]
gap_sym = r1z_m["by_language"]["sym"]["pass@1"] - r1_m["by_language"]["sym"]["pass@1"]
weak_en = base_m["by_language"]["sym"]["pass@1"] - base_m["by_language"]["en"]["pass@1"]
fast = reach["R1 stage 2 (from the cold start)"]
slow = reach["stage 2 from the base"]
sft_keep = s_m[3]["pass@1"] - s_m[2]["pass@1"]
ledger = Ledger("07")
ledger.add("Accuracy-only RL mixes languages", "R1-Zero 'struggles with ... language mixing' (R1, section 2.3)",
           f"problems in words: reasoning in words {base_m['by_language']['en']['prompt_language_share']:.0%} -> "
           f"{r1z_m['by_language']['en']['prompt_language_share']:.0%}; responses that mix within themselves "
           f"{r1z_m['by_language']['en']['mixing']:.1%}", bool(en_drift > 0.3),
           "a wholesale switch to the stronger language more than mixing within a response")
ledger.add("The consistency reward removes the mixing", "R1, section 2.3.2",
           f"stage 2 from the base with the reward: worded problems reasoned in words at step {end} {held:.0%} "
           f"(R1-Zero {share_at('R1-Zero (no consistency reward)', end):.0%}; at step {mid} {slowed * 100:+.0f} "
           f"points against R1-Zero)", bool(held > 0.9),
           "" if held > 0.9 else "it slows the drift but does not stop it: at weight 0.2 a right answer in symbols "
           "still pays more than a wrong one in words (exercise 1); the cold start keeps the language here")
ledger.add("R1's pipeline keeps the prompt's language", "R1, sections 2.3.1-2.3.3 (readable cold start, "
           "consistency reward, filtered SFT data)",
           f"R1: worded problems reasoned in words {r1_m['by_language']['en']['prompt_language_share']:.0%}, "
           f"responses that mix {r1_m['mixing']:.1%}; without the reward "
           f"{nolang['by_language']['en']['prompt_language_share']:.0%}, without the cold start "
           f"{abl['without cold_start']['by_language']['en']['prompt_language_share']:.0%}",
           bool(r1_m["by_language"]["en"]["prompt_language_share"] > 0.9))
ledger.add("...at a slight cost in accuracy", "'a slight degradation in the model's performance' (R1, section 2.3.2)",
           f"R1 vs R1-Zero pass@1: problems in symbols {-gap_sym * 100:+.1f} points, in words {-gap_en * 100:+.1f} "
           f"points", bool(gap_en < 0.05),
           "" if gap_en < 0.05 else f"not slight here: reasoning in words, the model reaches "
           f"{r1_m['by_language']['en']['pass@1']:.0%} on worded problems; R1-Zero reaches "
           f"{r1z_m['by_language']['en']['pass@1']:.0%} on them by reasoning in symbols (the base model: "
           f"{weak_en * 100:.0f} points weaker in words)")
ledger.add("The cold start speeds up RL", "R1, section 2.3.1 ('better performance', a readable start)",
           f"stage 2 reaches 90% of R1-Zero's pass@1 on symbol problems at step {fast} from the cold start, "
           f"{slow} from the base", bool(fast is not None and (slow is None or fast < slow)),
           "" if fast is not None else "neither run reached the target")
ledger.add("Rejection-sampled SFT of the base keeps the accuracy", "R1, section 2.3.3",
           f"pass@1 stage 2 {s_m[2]['pass@1']:.1%} -> stage 3 {s_m[3]['pass@1']:.1%}; readable "
           f"{s_m[2]['readable']:.1%} -> {s_m[3]['readable']:.1%}", bool(sft_keep > -0.03))
ledger.add("RL for all scenarios serves the user's preference", "rewards for helpfulness (R1, section 2.3.4); "
           "here brevity on easy problems", f"one-operation problems, stage 3 -> 4: bare answers {e3['bare']:.0%} -> "
           f"{e4['bare']:.0%}, length {e3['length']:.1f} -> {e4['length']:.1f} tokens, pass@1 {e3['pass@1']:.0%} -> "
           f"{e4['pass@1']:.0%}", bool(brief),
           "" if brief else f"accuracy won: bare answers were right {e3['bare_acc']:.0%} of the time, worked ones "
           f"{e3['worked_acc']:.0%}, more than the brevity bonus could make up")
ledger.add("R1 is more readable than R1-Zero", "R1-Zero has 'poor readability' (R1, section 2.3)",
           f"readable: R1-Zero {r1z_m['readable']:.1%}, R1 {r1_m['readable']:.1%}",
           bool(r1_m["readable"] > r1z_m["readable"] + 0.01),
           "" if r1_m["readable"] > r1z_m["readable"] + 0.01 else "our R1-Zero is already readable by these checks: "
           "its corpus was clean text; its one flaw is the language")
ledger.add("The final model matches R1-Zero's accuracy", "R1 performs on par with OpenAI-o1-1217 (R1, Table 4)",
           f"pass@1 R1 {r1_m['pass@1']:.1%} vs R1-Zero {r1z_m['pass@1']:.1%}",
           bool(r1_m["pass@1"] >= r1z_m["pass@1"] - 0.02),
           "" if r1_m["pass@1"] >= r1z_m["pass@1"] - 0.02 else "lower overall, because of the worded problems "
           "(the cost row above)")
ledger.show()
saved_to = ledger.save()

# %% [markdown]
# ## What this chapter measured
#
# R1's four stages, rebuilt on a bilingual arithmetic world. Accuracy-only RL (R1-Zero) moves the reasoning of
# problems stated in words out of words, toward the language the model computes in best. From the base model, the
# consistency reward slows that drift. The cold start holds the language through RL, and the rejection filter
# restores it when RL started from the base (or keeps it, where the reward held it). On problems in symbols, R1 and
# R1-Zero end level, and the rejection-sampled SFT of the base model keeps stage 2's accuracy. Each of these sentences
# is asserted in the checks below, so a run where one fails does not pass. Three things vary with the base model and
# the weights: whether the reward *stops* the drift on its own, what keeping the language costs on worded problems,
# and whether stage 4's brevity preference took. They are in the ledger above and in this run's record below.

# %%
closing = {
    "base: pass@1 sym / en": f"{base_m['by_language']['sym']['pass@1']:.1%} / {base_m['by_language']['en']['pass@1']:.1%}",
    "R1-Zero: pass@1 sym / en": f"{r1z_m['by_language']['sym']['pass@1']:.1%} / "
                                f"{r1z_m['by_language']['en']['pass@1']:.1%}",
    "R1: pass@1 sym / en": f"{r1_m['by_language']['sym']['pass@1']:.1%} / {r1_m['by_language']['en']['pass@1']:.1%}",
    "worded problems reasoned in words: base / R1-Zero / R1":
        f"{base_m['by_language']['en']['prompt_language_share']:.0%} / "
        f"{r1z_m['by_language']['en']['prompt_language_share']:.0%} / "
        f"{r1_m['by_language']['en']['prompt_language_share']:.0%}",
    "readable: base / R1-Zero / R1": f"{base_m['readable']:.1%} / {r1z_m['readable']:.1%} / {r1_m['readable']:.1%}",
    "steps to 90% of R1-Zero (symbols): cold start / base": f"{fast} / {slow}",
    f"stage 2 from the base, worded problems in words at step {mid} / {end}":
        f"{share_at('stage 2 from the base', mid):.0%} / {held:.0%} (R1-Zero "
        f"{share_at('R1-Zero (no consistency reward)', mid):.0%} / "
        f"{share_at('R1-Zero (no consistency reward)', end):.0%})",
    "easy problems, bare answers: stage 3 -> stage 4":
        f"{easy['3. rejection_sft']['bare']:.0%} -> {easy['4. all_scenarios_rl']['bare']:.0%}",
    "chapter time so far (s)": f"{time.time() - CHAPTER_START:.0f}",
}
for k, v in closing.items():
    print(f"{k:<56} {v}")

# %% [markdown]
# **Next.** Chapter 08 distils the R1 model of this chapter (`dslib.pretrained.r1_model()`) into small dense students
# by SFT on its samples alone, as R1's distilled models were made, and asks whether distillation beats RL on the small
# model itself.
#
# ## Exercises
#
# Difficulty: ★ (a few minutes), ★★ (an experiment), ★★★ (a small project).
#
# 1. ★ **The price of words.** With the weights of section 3 (accuracy 1, format 0.1, consistency $\lambda = 0.2$), a
#    worded problem that the model gets right with probability $a_w$ reasoning in words and $a_s$ reasoning in symbols:
#    which language has the larger expected reward? Estimate $a_w$ and $a_s$ after RL from this chapter's models.
#
#    <details><summary>Hint</summary>Reasoning in words earns $a_w + 0.1 + 0.2$ in expectation, in symbols $a_s + 0.1$.
#    R1-Zero reasons in symbols on worded problems; R1 reasons in words.</details>
#    <details><summary>Solution</summary>
#
#    Words win when $a_w + 0.2 > a_s$. Take $a_s$ from R1-Zero and $a_w$ from R1:
#    `r1z_m["by_language"]["en"]["pass@1"] - r1_m["by_language"]["en"]["pass@1"]`. If that gap is above 0.2, symbols
#    have the larger expected reward even with the consistency reward, and yet R1's stage 2 stays in words. That is
#    the cold start's doing: after it the model almost never samples symbols for a worded problem, so GRPO has no
#    symbol samples to compare and reinforce. The reward decides between what the model samples; the cold start
#    decides what it samples.
#    </details>
#
# 2. ★★ **A stronger consistency reward.** Run stage 2 from the base model (no cold start) with `language_weight=1.0`
#    and compare its reasoning-in-words share and pass@1 on worded problems with the ablation "without cold_start".
#
#    <details><summary>Hint</summary>`reasoning_rl(base, world, R1Config(language_weight=1.0), progress=True)`
#    returns a trainer; measure `trainer.model` with `evaluate`.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    strong = reasoning_rl(base, world, R1Config(language_weight=1.0))
#    _, m = evaluate(strong.model)
#    print(m["by_language"]["en"]["prompt_language_share"], m["by_language"]["en"]["pass@1"])
#    ```
#    With $\lambda = 1$ a right answer in symbols (1.1) and a wrong one in words (1.3) compete, and a wrong answer in
#    words wins. Expect the share in words to rise toward 100% and accuracy on worded problems to fall below the
#    $\lambda = 0.2$ run: a reward that outweighs correctness buys consistency with correctness.
#    </details>
#
# 3. ★★ **What the filter throws away.** Rejection-sample the stage-2 model yourself and count why samples are
#    rejected: wrong, unreadable (which check), or in the other language.
#
#    <details><summary>Hint</summary>`rejection_sample` keeps the first good sample per problem; call `sample_k` on
#    the same problems and classify every sample with `accuracy_reward`, `readability` and
#    `language_consistency_reward`.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    import random
#    rng = random.Random(0)
#    probs = [world.sample_problem(rng).in_language(("sym", "en")[i % 2]) for i in range(200)]
#    s = sample_k(runs["R1"]["models"]["reasoning_rl"], world, probs, 4, max_new_tokens=MAX_NEW)
#    why = Counter()
#    for p, row in zip(probs, s.texts):
#        for t in row:
#            why["wrong" if not accuracy_reward(t, p) else "unreadable" if not readable(t) else
#                "other language" if language_consistency_reward(t, p) < 1 else "kept"] += 1
#    print(why)
#    ```
#    Most rejections are wrong answers on worded problems; the language filter removes few, because stage 2 already
#    keeps the language.
#    </details>
#
# 4. ★★★ **Close the gap in words.** The cost of consistency here is the model's weakness in words. Make the base
#    model stronger in words (a larger `prompt_en_rate` or `en_prompt_consistency` in `BILINGUAL_WORLD`, or more
#    pretraining steps) and rerun the study. Does the cost row of the ledger turn "slight"?
#
#    <details><summary>Hint</summary>Build a `BaseRecipe(world={...}, seq_len=128)` and an `R1Recipe(base=...)`, then
#    `r1_model(recipe=...)`: the cache keys on the recipe, so nothing is overwritten.</details>
#    <details><summary>Solution</summary>
#
#    The cost is the gap between R1-Zero on worded problems (reasoning in symbols) and R1 (reasoning in words). The
#    gap shrinks as the base model's pass@1 in words approaches its pass@1 in symbols, because then RL has less to
#    gain by switching. In the limit of equal skill, accuracy-only RL has no reason to drift at all, and the
#    consistency reward costs nothing. R1's "slight degradation" sits close to that end.
#    </details>
#
# 5. ★★ **A weight that wins.** Rerun stage 4 from the stage-3 model with `brevity_weight=1.0` and measure the
#    one-operation problems of section 5 again. Does the share of bare answers rise, and what happens to pass@1?
#
#    <details><summary>Hint</summary>`all_scenarios_rl(runs["R1"]["models"]["rejection_sft"], world,
#    R1Config(brevity_weight=1.0))` returns a trainer; pass `trainer.model` to `evaluate(..., EASY, ...)`.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    from dslib.r1 import all_scenarios_rl
#    tr = all_scenarios_rl(runs["R1"]["models"]["rejection_sft"], world, R1Config(brevity_weight=1.0))
#    _, m = evaluate(tr.model, EASY, k=K, seed=2)
#    print(m["by_style"]["bare"], m["pass@1"])
#    ```
#    With weight 1 a bare right answer earns 2.1 and a worked right one about 1.6, so bare answers pay as soon as
#    they are right at least three quarters as often as worked ones. Expect more bare answers, and a pass@1 that
#    falls toward the bare answers' accuracy: the reward buys brevity with correctness, exactly the trade a
#    helpfulness reward model can hide.
#    </details>
#
# ## Checks
#
# The chapter's key measurements, asserted (this is what the test suite checks). Each fails when the effect it guards
# is absent.

# %%
# The rejection filter against a one-condition-at-a-time reference, on the stage-2 model's samples.
stage2_samples = results["2. reasoning_rl"][0]
for p, row in zip(stage2_samples.problems, stage2_samples.texts):
    other = "en" if p.language == "sym" else "sym"
    for t in row:
        ref = parse_answer(t) == p.answer and all(readability(t).values()) and language_marks(t)[other] == 0
        assert keep_sample(t, p) == ref, (t, p)
        if keep_sample(t, p):
            assert not mixes(t) and language_consistency_reward(t, p) == 1.0
print("rejection filter = reference on", sum(len(r) for r in stage2_samples.texts), "stage-2 samples")
assert en_drift > 0.3, en_drift  # accuracy-only RL leaves the language of worded problems
assert r1_m["by_language"]["en"]["prompt_language_share"] > 0.9  # R1 keeps it
assert r1z_m["pass@1"] > base_m["pass@1"] + 0.2  # RL works (chapter 06's effect, on the bilingual base)
assert abs(gap_sym) < 0.1, gap_sym  # on problems in symbols, R1 and R1-Zero are on par
assert sft_keep > -0.05, sft_keep  # rejection-sampled SFT of the base keeps stage 2's accuracy
assert s_m[1]["pass@1"] > base_m["pass@1"] + 0.05  # stage 1, the cold-start SFT, raises pass@1 before RL
assert slowed > 0.1, slowed  # the consistency reward slows the drift of stage 2 from the base
assert share_at("R1 stage 2 (from the cold start)", end) > 0.9  # the cold start holds the language through RL
no_cs = abl["without cold_start"]["by_language"]["en"]["prompt_language_share"]
# The rejection filter restores what stage 2 from the base lost (when the reward held the language, it keeps it).
assert no_cs > min(held + 0.3, 0.9), (no_cs, held)
print(f"chapter 07 checks passed; {time.time() - CHAPTER_START:.0f} s since set-up")

# %% [markdown]
# The worked solutions that take seconds run here as well, so that the test suite checks them with the chapter:
# exercise 3. The others run RL stages, and are left to the reader.

# %%
solution_seconds = run_solutions("07", globals(), (3,))
print("worked solutions run:", ", ".join(f"exercise {n} ({t:.1f} s)" for n, t in solution_seconds.items()))
