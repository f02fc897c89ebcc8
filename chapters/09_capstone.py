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
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 09 · The capstone: DeepSeek-V3-mini to R1 to distilled students, in one command
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/deepseek-from-scratch/deepseek-from-scratch/blob/main/chapters/09_capstone.ipynb)
# [![Binder](https://mybinder.org/badge_logo.svg)](https://mybinder.org/v2/gh/deepseek-from-scratch/deepseek-from-scratch/main?labpath=chapters%2F09_capstone.ipynb)
#
# **What you will build.** Nothing new, and that is the point. Every piece of DeepSeek's story is now in `dslib`, and
# this chapter runs all of them as one pipeline, from random weights to a report card:
#
# 1. **DeepSeek-V3-mini**, pretrained from scratch on the arithmetic world's bilingual corpus: Multi-head Latent
#    Attention, DeepSeekMoE with auxiliary-loss-free balancing, and Multi-Token Prediction (chapters 00, 02-04);
# 2. **R1-Zero** grown from it by GRPO with rule rewards alone (chapters 05-06), and **R1** by its four stages: cold
#    start, reasoning RL with a language reward, rejection-sampling SFT, RL for all scenarios (chapter 07);
# 3. **dense students** of two sizes, each pretrained alone (its own base), then distilled from R1's samples or grown
#    by its own RL, R1's Table 6 (chapter 08);
# 4. every model **evaluated** on the same held-out problems and **exported** as a transformers folder, and a
#    **report card** that sets the papers' claims next to this run's numbers.
#
# The command is `python -m dslib capstone`. In this chapter you run its `tiny` preset (seconds; nothing is learnt)
# to see every file it writes, stop a run with `SIGKILL` and check that it resumes to the same weights bit for bit,
# meet the errors it gives, and learn how to run the `small` preset on a laptop and `full` on a GPU.
#
# **What you need.** Chapters 00-08: this chapter explains the plumbing, the earlier ones the ideas. `transformers`
# (installed on Colab; `pip install -e ".[dev]"` elsewhere) for the exported folders. **How long.** About a minute
# on 2 CPU cores; the `small` run you start yourself takes about 12 minutes there, `full` about an hour on a GPU.
#
# **Papers.** DeepSeek-V3 (arXiv 2412.19437), sections 2.1-2.2 (the architecture) and 5.4.3 (MTP as a draft);
# DeepSeek-R1 (arXiv 2501.12948), sections 2.2-2.4 (R1-Zero, the four stages, distillation) and 4.1 (distillation
# against RL, Table 6); DeepSeekMath (arXiv 2402.03300), section 4 (GRPO). `PAPERS.md` sections 4-6 hold their
# numbers.

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

import html
import json
import math
import re
import tempfile
import time
from dataclasses import replace

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import HTML, Image, Markdown, display
from safetensors.torch import load_file

import dslib
from dslib import capstone
from dslib.book import Ledger, run_solutions
from dslib.capstone import PRESETS, STAGES, CapstoneError, claims, load_model, model_names
from dslib.diagram import Diagram
from dslib.explore import explore
from dslib.train import complete
from dslib.world import World, WorldConfig

THREADS = 1  # the tiny runs: one CPU thread, so that the run here and the run in a subprocess compute alike
device = dslib.setup(seed=0, threads=THREADS)
SCALE = dslib.scale()
CHAPTER_START = time.time()
WORK = Path(tempfile.mkdtemp(prefix="dslib-capstone-"))  # every run of this chapter goes here
TINY = PRESETS["tiny"]
print(f"runs of this chapter go to {WORK}; the tiny preset at any scale, on the CPU")

# %% [markdown]
# `dslib.capstone` is hand-written plumbing, like `dslib.book`: it imports what the chapters exported and chains it,
# so this chapter exports nothing and reads the module instead of building it.
#
# ## The idea: one command, every chapter
#
# The diagram is the whole course. Each box is a stage of the command, and the label says which chapter built it.
# Everything starts from the same random seed and the same corpus. R1-Zero and R1 both start from the pretrained
# V3-mini, as DeepSeek's did from V3-Base. The students start from their own bases, pretrained alone, just as
# Qwen2.5 and Llama 3 were when DeepSeek distilled R1 into them.

# %%
def draw_pipeline():
    """The capstone's stages and what flows between them; (ch NN) names the chapter that built each stage."""
    d = Diagram(14.6, 5.6, "python -m dslib capstone: the whole course as one pipeline")
    d.box(0.1, 4.3, 1.9, 0.9, "arithmetic world:\nbilingual corpus\n(ch 00)", "baseline")
    d.box(2.6, 4.3, 2.5, 0.9, "pretrain V3-mini from\nrandom weights: MLA, MoE,\nbias balancing, MTP (ch 02-04)",
          "stage")
    d.box(5.7, 4.3, 2.6, 0.9, "R1-Zero: GRPO from the\nbase, rule rewards only\n(ch 05-06)", "stage")
    d.ax.text(8.55, 3.72, "R1: four stages from the same base (ch 07)", ha="center", fontsize=9, weight="bold")
    r1 = (("cold start: SFT\non readable CoT", 5.7), ("reasoning RL +\nlanguage reward", 7.45),
          ("rejection sampling,\nSFT of the base", 9.2), ("RL for all\nscenarios", 10.95))
    for text, x in r1:
        d.box(x, 2.55, 1.55, 0.95, text, "stage", fontsize=8)
    for (_, x0), (_, x1) in zip(r1, r1[1:]):
        d.arrow(x0 + 1.55, 3.02, x1, 3.02)
    d.box(2.6, 0.75, 2.5, 0.9, "student base, per size:\ndense GQA, pretrained\nalone on the corpus (ch 00)",
          "model")
    d.box(5.7, 1.3, 2.9, 0.75, "distil: SFT on R1's kept samples\n+ non-reasoning data (ch 08)", "stage")
    d.box(5.7, 0.15, 2.9, 0.75, "RL alone: GRPO on the student\nitself (ch 08, R1's Table 6)", "baseline")
    d.box(12.75, 2.45, 1.75, 1.15, "eval: every model\non the same\nheld-out problems;\nhf/ export", "measure")
    d.box(12.75, 0.3, 1.75, 1.1, "report card:\nreport.md, .html,\nmetrics.json, PNGs", "measure")
    d.arrow(2.0, 4.75, 2.6, 4.75, "text")
    d.arrow(5.1, 4.75, 5.7, 4.75, "base")
    d.arrow(3.85, 4.3, 6.3, 3.5, "base")
    d.arrow(1.05, 4.3, 2.6, 1.2)
    d.arrow(5.1, 1.35, 5.7, 1.65)
    d.arrow(5.1, 1.05, 5.7, 0.55)
    d.arrow(11.5, 2.55, 8.0, 2.05, "R1's samples", dy=0.1)
    d.arrow(8.3, 4.75, 13.6, 3.6, "R1-Zero")
    d.arrow(12.5, 3.02, 12.75, 3.02)
    d.arrow(8.6, 1.5, 12.95, 2.45)
    d.arrow(8.6, 0.5, 12.95, 2.45)
    d.arrow(13.62, 2.45, 13.62, 1.4)
    d.show()


draw_pipeline()

# %% [markdown]
# Why each stage is there, in the papers' own reasons:
#
# - **Pretraining V3-mini** (V3, sections 2.1-2.2). MLA shrinks the KV cache, DeepSeekMoE buys parameters without
#   buying FLOPs, the bias-based balancing keeps the experts evenly loaded without an auxiliary loss that fights the
#   language-model loss, and MTP densifies the training signal and later serves as a speculative draft. The report
#   card shows the expert load (MaxVio) and the share of MTP drafts that the main model accepts.
# - **R1-Zero** (R1, section 2.2). GRPO (DeepSeekMath, section 4) needs no value model: the advantage of a sample is
#   its reward against its group's mean and spread. The rewards are rules (is the answer right, is the format kept),
#   so nothing can be reward-hacked. R1-Zero shows that reasoning can be grown by RL alone, and it shows its flaws:
#   poor readability and mixed languages.
# - **R1's four stages** (R1, section 2.3). A **cold start** of thousands of readable long-CoT examples fixes the
#   readability, and gives RL a better place to start. **Reasoning RL** adds a **language-consistency reward**, the
#   share of the reasoning in the prompt's language, which costs a little accuracy and buys readable answers.
#   **Rejection sampling** collects about 600k right, readable reasoning samples from that model, plus about 200k
#   non-reasoning ones (writing, factual QA, translation), and fine-tunes the *base* model again on all 800k. A last
#   round of **RL for all scenarios** aligns it for helpfulness and harmlessness while keeping the reasoning. The
#   arithmetic world has no writing or harmlessness, so our stage 4 rewards brevity on easy problems instead
#   (chapter 07).
# - **Distillation** (R1, sections 2.4 and 4.1). The 800k samples, SFT only, made small Qwen and Llama models strong
#   reasoners. RL on a small model itself did much worse: R1-Zero-Qwen-32B, after more than 10k RL steps, reached
#   47.0% AIME pass@1, and R1-Distill-Qwen-32B 72.6% (Table 6). Hence two students per size, distilled and RL-only,
#   from the same base.
#
# One run tests all of these at once. The claims of the report card are the ones chapters 02-08 tested one by one,
# now on models that share a single history.
#
# ## 1. The run folder
#
# Everything a run makes goes into one folder, `--out`. The module's docstring lists it:
#
# | path | what it holds |
# |---|---|
# | `run.json` | what this run is: preset, seed, a hash of both, the stages done, seconds per stage, and per session where it ran and when each part ran (`timeline`). A folder that holds another run is refused |
# | `stages/<stage>/` | the checkpoints of each stage (every `checkpoint_every` steps and at its end, written atomically), `final/` (the model) and `done.json` (its figures). `--resume` continues from them |
# | `heldout.jsonl` | the exact prompts every model was evaluated on, with their answers and languages |
# | `metrics.json` | per stage its figures; `eval`: per model its measures; the preset in full |
# | `hf/<name>/` | one transformers folder per evaluated model (`AutoModelForCausalLM` and `AutoTokenizer`) |
# | `*.png`, `report.md`, `report.html` | the report card and its plots |
#
# Here is a whole run of the `tiny` preset. Its V3-mini is small enough to train in seconds and every stage is cut
# to a handful of steps, so **the tiny preset learns nothing**: its accuracies are near zero and its report card is
# not evidence about any paper. It checks the plumbing: every stage runs, every file is written, and every number in
# the report is read from the run. The command prints one line as each stage starts and one as it ends; the
# progress bars are off here.

# %%
t0 = time.time()
RUN_A = WORK / "tiny"
backend = matplotlib.get_backend()  # the report's plots switch matplotlib to Agg; the notebook's plots come back
metrics = capstone.run(RUN_A, "tiny", progress=False, threads=THREADS, device="cpu")
matplotlib.use(backend)
tiny_seconds = time.time() - t0
names = model_names(TINY)
print(f"\nthe tiny run took {tiny_seconds:.1f} s; its folder holds:")
for p in sorted(RUN_A.iterdir()):
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    print(f"  {p.name + ('/' if p.is_dir() else ''):<16} {size / 1024:>8.1f} KiB")
print("metrics.json:", {k: sorted(v) if isinstance(v, dict) else v for k, v in metrics.items()
                        if k in ("stages", "eval", "heldout")})
heldout = [json.loads(line) for line in (RUN_A / "heldout.jsonl").read_text().splitlines()]
print(f"heldout.jsonl: {len(heldout)} lines, the first three:")
for row in heldout[:3]:
    print("  ", json.dumps(row))

# %% [markdown]
# The report card is Markdown, written from `metrics.json` and nothing else, so it can be read on GitHub, in an
# editor or here (`report.html` is the same page for a browser). Its plots sit next to it; two of them follow: the
# pretraining curves, and the run's timeline, which says which process ran what and when.
#
# The timeline has two rows because a CPU run has **two workers** when the machine has two cores or more. Models
# this small use a second core poorly: their matrix products are too small to split well across threads. So two
# processes of one thread each can get more done than one process of two (`benchmarks/capstone_workers.py` measures
# it on your machine). The second worker takes what needs no other
# stage's result: each student's own base and its RL run, and then R1-Zero, as soon as pretraining has finished. The
# first worker meanwhile pretrains V3-mini, runs R1 and distils the students. Each part is seeded on its own and
# runs on the same number of threads either way, so `--workers 1` gives the same weights, bit for bit; the test suite
# checks that on this preset.

# %%
report_md = (RUN_A / "report.md").read_text(encoding="utf-8")
display(Markdown("\n".join(line for line in report_md.splitlines() if not line.startswith("!["))))
display(Image(filename=str(RUN_A / "pretraining.png")))
spans = json.loads((RUN_A / "run.json").read_text())["sessions"][-1].get("timeline", [])
for w in sorted({s["worker"] for s in spans}):
    print(f"worker {w}: " + ", ".join(f"{s['what']} {s['start']:.1f}-{s['end']:.1f} s" for s in spans
                                      if s["worker"] == w))
if (RUN_A / "timeline.png").is_file():
    display(Image(filename=str(RUN_A / "timeline.png")))

# %% [markdown]
# What did this run do? The sentences below are computed from its numbers. Two comparisons go beyond the report:
# whether an RL stage moved the weights at all (its final weights against its starting point), and how many of
# R1's samples survived the rejection filter to become distillation data.

# %%
def final_folder(run: Path, name: str) -> Path:
    """Where a model of the report (base, r1_zero, r1, student-S-distill, ...) keeps its final weights."""
    own = {"base": "pretrain", "r1_zero": "r1_zero", "r1": "r1"}
    if name in own:
        return run / "stages" / own[name] / "final"
    _, size, kind = name.split("-")
    return run / "stages" / "students" / size / kind / "final"


def same_weights(a: Path, b: Path) -> bool:
    """True when two saved models hold the same tensors, bit for bit."""
    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


ev, pre = metrics["eval"], metrics["stages"]["pretrain"]
zero, td = metrics["stages"]["r1_zero"], metrics["stages"]["students"]["teacher_data"]
vocab = World(WorldConfig(**TINY.world)).tokenizer.vocab_size
best = max(names, key=lambda n: ev[n]["greedy_accuracy"])
unmoved = {n: same_weights(final_folder(RUN_A, n), final_folder(RUN_A, base))
           for n, base in [("r1_zero", "base")] + [(f"student-{s}-rl", f"student-{s}-base") for s in TINY.students]}
equal_groups = float(np.mean(zero["all_equal"]))
text = [f"The tiny run took {tiny_seconds:.0f} s. Its V3-mini has {pre['parameters']:,} parameters "
        f"({pre['parameters_mtp']:,} with the MTP module). After {pre['steps']} steps its held-out loss is "
        f"{pre['heldout_loss']:.2f} nats per token, against ln {vocab} = {math.log(vocab):.2f} for a uniform guess "
        f"over the {vocab} tokens: it has learnt which characters are common, not arithmetic."]
text.append("Every model's greedy accuracy is zero, as expected." if ev[best]["greedy_accuracy"] == 0 else
            f"The best greedy accuracy is {ev[best]['greedy_accuracy']:.0%} ({best}), on "
            f"{metrics['heldout']} problems: chance-level at this size.")
if unmoved["r1_zero"]:
    text.append(f"R1-Zero's final weights are bit for bit the base's. In {equal_groups:.0%} of its GRPO groups every "
                "sample got the same reward, and a group of equal rewards has zero advantage for every sample, so "
                "there was nothing to push. RL can only amplify an answer that the model sometimes gets right.")
else:
    text.append(f"R1-Zero's weights moved: {1 - equal_groups:.0%} of its GRPO groups had rewards that differed.")
text.append(f"R1's rejection sampling for the students kept {td['reasoning_texts']} texts (acceptance "
            f"{td['acceptance']:.0%}), so the distillation set is {td['reasoning_texts']} reasoning texts and "
            f"{td['non_reasoning_texts']} non-reasoning ones"
            + (": the distilled students learnt from the non-reasoning part alone." if td["reasoning_texts"] == 0
               else "."))
display(Markdown(" ".join(text)))

# %% [markdown]
# Each `hf/<name>/` folder is a plain transformers model. The eval stage already decoded each export greedily
# (`hf_greedy_accuracy` in the table). Here we check the stronger property that chapter 04 checked for V3-mini:
# transformers writes the *same text* as dslib, token for token, on held-out prompts in both languages. Without
# transformers installed, the folders are written all the same and this check is skipped.

# %%
HAVE_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
hf_prompts = [r["prompt"] for r in heldout if r["language"] == "sym"][:4] + \
             [r["prompt"] for r in heldout if r["language"] == "en"][:4]
tok = World(WorldConfig(**TINY.world)).tokenizer
t0 = time.time()
hf_agree = {}
for name in names if HAVE_TRANSFORMERS else []:
    import transformers

    ours = complete(load_model(final_folder(RUN_A, name)), tok, hf_prompts, max_new_tokens=TINY.max_new_tokens)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(RUN_A / "hf" / name).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(RUN_A / "hf" / name)
    agree = 0
    for text_in, mine in zip(hf_prompts, ours):
        ids = hf_tok(text_in, return_tensors="pt").input_ids
        out = hf_model.generate(ids, max_new_tokens=TINY.max_new_tokens, max_length=None, do_sample=False,
                                eos_token_id=hf_tok.convert_tokens_to_ids("</answer>"),
                                pad_token_id=hf_tok.pad_token_id)
        agree += hf_tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True) == mine.replace("<eos>", "")
    hf_agree[name] = agree
print(f"transformers and dslib decode alike ({len(hf_prompts)} prompts, {TINY.max_new_tokens} new tokens at most, "
      f"{time.time() - t0:.0f} s):" if HAVE_TRANSFORMERS else "transformers is not installed: the check is skipped")
for name in hf_agree:
    kind = type(transformers.AutoConfig.from_pretrained(RUN_A / "hf" / name)).__name__
    print(f"  {name:<18} {hf_agree[name]}/{len(hf_prompts)}  ({kind})")

# %% [markdown]
# ## 2. Stopped and resumed
#
# A quarter of an hour on a laptop, an hour on Colab: long enough for a lid to close or a session to drop. Every
# trainer in the pipeline checkpoints its model, its optimizer, its RNG state, its step and its logs, and every batch
# and rollout is a pure function of the step. So a run that dies mid-stage should continue with `--resume` to
# *exactly* the weights it would have reached, not merely to similar ones.
#
# The test is harsh on purpose. We start the tiny preset's first two stages, `pretrain,r1_zero`, in a separate
# process, as a reader would from a terminal. As soon as the pretraining writes its first checkpoint we kill the
# process with `SIGKILL`: no handler runs and nothing is tidied up, as in a power cut. Then we run the same command
# with `--resume` and compare the final weights of both stages, tensor by tensor, with those of the uninterrupted
# run of section 1.

# %%
env = {**os.environ, "PYTHONPATH": os.pathsep.join(
    p for p in (str(Path(dslib.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")) if p)}
RUN_B = WORK / "interrupted"
command = [sys.executable, "-m", "dslib", "capstone", "--preset", "tiny", "--out", str(RUN_B), "--stages",
           "pretrain,r1_zero", "--device", "cpu", "--quiet", "--threads", str(THREADS)]
print("$ python -m dslib capstone " + " ".join(command[4:]))
t0 = time.time()
proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
checkpoint = RUN_B / "stages" / "pretrain" / "train" / "trainer.safetensors"
while not checkpoint.exists() and proc.poll() is None and time.time() - t0 < 180:
    time.sleep(0.02)
alive = proc.poll() is None
proc.kill()  # SIGKILL on Linux and macOS
killed_out, _ = proc.communicate(timeout=60)
stopped_mid_stage = alive and not (RUN_B / "stages" / "pretrain" / "done.json").exists()
record = json.loads((RUN_B / "run.json").read_text())
print(f"killed after {time.time() - t0:.1f} s (exit status {proc.returncode}); stopped inside the pretraining: "
      f"{stopped_mid_stage}; stages done: {record['stages_done']}")
print("what it had printed:", killed_out.strip() or "(nothing)")

t0 = time.time()
print("\n$ python -m dslib capstone " + " ".join(command[4:] + ["--resume"]))
resumed = subprocess.run(command + ["--resume"], capture_output=True, text=True, env=env, timeout=600)
print(resumed.stdout.strip())
assert resumed.returncode == 0, resumed.stderr[-3000:]
found = re.search(r"pretrain: resumed at step (\d+)", resumed.stdout)
resumed_at = int(found.group(1)) if found else None
resume_equal = {stage: same_weights(RUN_A / "stages" / stage / "final", RUN_B / "stages" / stage / "final")
                for stage in ("pretrain", "r1_zero")}
# R1-Zero's comparison tests the resume only where its weights moved from the base (see section 1).
resume_checked = {s: v for s, v in resume_equal.items() if s != "r1_zero" or not unmoved["r1_zero"]}
n_tensors = {stage: len(load_file(str(RUN_A / "stages" / stage / "final" / "model.safetensors")))
             for stage in resume_equal}
done_a, done_b = (json.loads((r / "stages" / "pretrain" / "done.json").read_text()) for r in (RUN_A, RUN_B))
print(f"\nresumed in {time.time() - t0:.1f} s")
for stage, same in resume_equal.items():
    print(f"  {stage:<9} final weights equal to the uninterrupted run's: {same} ({n_tensors[stage]} tensors)"
          + ("" if stage in resume_checked else "; not a test: these weights never moved from the base's"))
print(f"  held-out loss after pretraining: {done_a['heldout_loss']!r} (uninterrupted) vs {done_b['heldout_loss']!r}"
      f" (killed and resumed)")

# %%
display(Markdown(
    (f"The run was killed at its step-{resumed_at} checkpoint and resumed from it. " if resumed_at else "")
    + (f"The final weights of {' and '.join(resume_checked)} equal the uninterrupted run's in every tensor, so the "
       "interruption left no trace. " if all(resume_checked.values()) else
       f"**The resumed weights differ** from the uninterrupted run's for "
       f"{', '.join(s for s, v in resume_checked.items() if not v)}: the resume is not exact on this machine. ")
    + ("" if len(resume_checked) == len(resume_equal) else
       "R1-Zero's weights equal too, but that tests nothing here: they never moved from the base's. ")
    + "That holds because the data order, the dropout-free forward passes, the rollouts' random draws and the "
      "optimizer's moments are all restored or recomputed from the step. A run that recomputed any of them from the "
      "clock, or from a global RNG that the checkpoint did not save, would drift, a little at first and then more."))

# %% [markdown]
# Two details make a killed run safe. Each checkpoint is written to a temporary file and renamed into place, and a
# rename is atomic, so a kill leaves either the old checkpoint or the new one, never half of one. And a stage counts
# as done only once its `done.json` exists, which is written after its `final/` model, so a stage that was killed
# while saving its result is simply run again.
#
# ## 3. Errors a reader meets
#
# A long run must not destroy an earlier one by accident. Nor should it start a quarter of an hour of work that is
# bound to fail at the last stage. So `capstone.run` checks its options and its `--out` folder before it writes
# anything. Each refusal is a `CapstoneError` whose message names what is wrong and what to do; on the command line
# it is printed after `error:`, with exit status 2.

# %%
refusals = {}
attempts = {
    "an --out that holds a run, without --resume": lambda: capstone.run(RUN_A, "tiny", device="cpu"),
    "an unknown stage": lambda: capstone.run(WORK / "never", "tiny", stages=["pretrain", "polish"], device="cpu"),
    "a stage without the one it needs": lambda: capstone.run(WORK / "never", "tiny", stages=["r1"], device="cpu"),
    "--resume with another seed": lambda: capstone.run(RUN_A, "tiny", seed=1, resume=True, device="cpu"),
}
stamp = (RUN_A / "run.json").read_text()
for what, attempt in attempts.items():
    try:
        attempt()
    except CapstoneError as err:
        refusals[what] = str(err)
        print(f"{what}:\n  error: {err}\n")
refused_cleanly = not (WORK / "never").exists() and (RUN_A / "run.json").read_text() == stamp
print(f"all {len(attempts)} refused: {len(refusals) == len(attempts)}; nothing written or changed: {refused_cleanly}")

# %% [markdown]
# The second and third are caught before any folder is made. The first and fourth protect a run that exists:
# `run.json` holds a hash of the preset and the seed. `--resume` continues only the run with the same hash, so a
# changed preset cannot continue from checkpoints made by another one. Other refusals you may meet: a `--out` that
# holds files but no run, a checkpoint torn by a full disk (named, and left as it was), `--device cuda` without CUDA,
# and `--max-steps 0`.
#
# ## 4. Running `small` on a laptop and `full` on a GPU
#
# **On a laptop** (any recent CPU; the preset is sized for about 12 minutes on 2 cores, with two workers):
#
# ```bash
# pip install -e ".[dev]"                                   # once, in the course repository
# python -m dslib capstone --preset small --out runs/small  # the whole pipeline
# python -m dslib capstone --preset small --out runs/small --resume   # after Ctrl-C, a crash, a closed lid
# ```
#
# It prints `[stage] starting`, a progress bar while that stage trains, and `[stage] done in N s: ...` with the
# stage's headline figures: the held-out loss, MaxVio and MTP acceptance after pretraining; R1-Zero's training
# accuracy from its first to its last step; how many problems R1's rejection sampling kept; the distillation set's
# size; each model's greedy accuracy; how many claims hold. The last line says where the report card is:
# `runs/small/report.md` (and `report.html` for a browser), with `metrics.json` beside it. `--stages pretrain,r1_zero`
# runs a prefix of the pipeline, and a later `--resume` adds the rest.
#
# **On Colab** (Runtime, then Change runtime type, then a GPU), in a notebook cell:
#
# ```bash
# !git clone --depth 1 https://github.com/deepseek-from-scratch/deepseek-from-scratch
# !pip install -q -e deepseek-from-scratch
# !python -m dslib capstone --preset full --out /content/run
# ```
#
# `full` widens V3-mini (to over ten million parameters) and the students, and trains everything for longer. A free
# T4 runs it within the hour. Colab's sessions end without warning, so for a run you want to keep, use
# `--out /content/drive/MyDrive/capstone-run` after mounting Drive, and rerun with `--resume` in a new session.
#
# **More than one GPU (or CPU process).** `torchrun --nproc_per_node 4 -m dslib capstone --preset full --out runs/f`
# trains data-parallel: each process holds the whole model and takes a quarter of every batch (and of every GRPO
# step's prompts), and their gradients are averaged before each update (`dslib.distributed`). The global batch is
# the preset's, so the loss curve is one process's; the test suite checks that with 2 CPU processes, to float
# rounding. Every training stage runs on every process: pretraining, R1-Zero, R1's four stages (each process draws
# the same rejection samples, since they are seeded by the config alone), the students' pretraining, distillation
# and RL. The teacher's samples, the evaluation and the report run on the first, and it alone writes to `--out`. The
# batches and the GRPO prompts per step must divide by the number of processes (the command says which does not).
#
# **Workers.** On a CPU the run has two workers by default (`--workers 2`; on a GPU and under `torchrun`, one): the
# second runs the students' own bases and RL runs, then R1-Zero, beside the first, and `timeline.png` shows who ran
# what. `--threads N` is the run's whole budget of threads, shared evenly by the workers. `--workers 1` runs one stage
# after another; with the same threads per worker it gives the same weights.
#
# **Compiling.** `--compile` runs the losses of the fixed-shape training stages (pretraining, SFT, distillation)
# through `torch.compile` (inductor by default; `--compile aot_eager` and the other backends too). The rollouts and
# the evaluation stay eager, since their shapes change at every token. Compiling costs time at the start of each
# stage, so it is meant for long runs on a GPU (the `full` preset); time it on your machine with `--max-steps`
# before a long run. The test suite checks that a compiled pretraining follows the eager run's loss curve.
#
# **The smoke test.** `--max-steps 2` cuts every training stage to two steps and every sampled set to at most 16
# problems. It takes seconds, learns nothing, and runs every shape, config and device transfer of the preset. So
# `python -m dslib capstone --preset full --max-steps 2 --out /tmp/smoke` finds a problem with the GPU, the driver or
# a library version before an hour is spent, not at the hour's last stage. The test suite runs exactly this on the
# CPU.
#
# **Showing your run here.** Set the environment variable `DSLIB_CAPSTONE_RUN` to a finished run's folder, before
# starting Jupyter, or in a cell with `os.environ["DSLIB_CAPSTONE_RUN"] = "runs/small"` before the next one. The
# chapter then shows that run's report card and uses its claims in the ledger and the explorer below.

# %%
CARD_RUN, card = RUN_A, metrics  # the run whose report card, claims and models the rest of the chapter shows
chosen = os.environ.get("DSLIB_CAPSTONE_RUN", "").strip()
if chosen:
    folder = Path(chosen).expanduser()
    if not (folder / "metrics.json").is_file():
        raise FileNotFoundError(f"DSLIB_CAPSTONE_RUN={chosen!r} has no metrics.json: name a capstone run's --out "
                                f"folder, or unset the variable")
    card = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    if not card.get("eval") or not (folder / "report.md").is_file():
        raise ValueError(f"DSLIB_CAPSTONE_RUN={chosen!r} is not finished (stages done: "
                         f"{card.get('run', {}).get('stages_done')}): continue it with --resume, then rerun this cell")
    CARD_RUN = folder
    shown = (folder / "report.md").read_text(encoding="utf-8")
    display(Markdown("\n".join(line for line in shown.splitlines() if not line.startswith("!["))))
    if (folder / "models.png").is_file():
        display(Image(filename=str(folder / "models.png")))
CARD_PRESET = card["run"]["preset"]
card_claims = claims(card)
held = [c for c in card_claims if c["holds"]]
if CARD_RUN == RUN_A:
    display(Markdown("No finished run is named by `DSLIB_CAPSTONE_RUN`, so the rest of the chapter uses the tiny run "
                     "of section 1. Run `python -m dslib capstone --preset small --out runs/small` in a terminal "
                     "(or `full` on a GPU), then set `DSLIB_CAPSTONE_RUN=runs/small` and run the chapter again to "
                     "see a run that learns."))
else:
    display(Markdown(
        f"This is the **{CARD_PRESET}** run in `{CARD_RUN}`: {len(held)} of its {len(card_claims)} claims hold "
        + (f"({', '.join(c['claim'] for c in held)}). " if held else ". ")
        + (f"Those that do not: {', '.join(c['claim'] for c in card_claims if not c['holds'])}. The ledger below "
           "lists each with its numbers." if len(held) < len(card_claims) else "")))

# %% [markdown]
# ## 5. Explorer: every model on one held-out problem
#
# Pick a held-out problem and its language. The table shows each model's greedy completion, green when its answer
# is right. With the tiny run expect no green row: a few dozen steps of pretraining teach which tokens are common,
# not arithmetic. With a small or full run, compare R1-Zero's reasoning with R1's on a problem in words (chapter 07
# found R1-Zero reasoning in symbols there, and R1 in the prompt's language), and each distilled student with its
# teacher. Without a widget front end it shows the first problem.

# %%
explore_tok = World(WorldConfig(**card["preset"]["world"])).tokenizer
explore_rows = [json.loads(line) for line in (CARD_RUN / "heldout.jsonl").read_text().splitlines()]
explore_names = [n for n in capstone.model_names_from(card) if n in card["eval"]]
_loaded: dict[str, torch.nn.Module] = {}


def show_completions(problem=0, language="sym"):
    """Every model's greedy completion of one held-out problem, as a table."""
    rows = [r for r in explore_rows if r["language"] == language]
    row = rows[min(problem, len(rows) - 1)]
    right = f"<answer> {row['answer']} </answer>"
    cells = []
    for name in explore_names:
        if name not in _loaded:
            _loaded[name] = load_model(final_folder(CARD_RUN, name))
        text_out = complete(_loaded[name], explore_tok, [row["prompt"]],
                            max_new_tokens=card["preset"]["max_new_tokens"])[0]
        colour = "#1e8449" if right in text_out else "#c0392b"
        cells.append(f"<tr><td>{html.escape(name)}</td><td style='text-align:left;color:{colour}'>"
                     f"{html.escape(text_out)}</td></tr>")
    display(HTML(f"<p><b>{html.escape(row['prompt'])}</b> (answer {html.escape(row['answer'])})</p>"
                 f"<table><tr><th>model</th><th style='text-align:left'>greedy completion</th></tr>"
                 f"{''.join(cells)}</table>"))


explore(show_completions, problem=(0, len(explore_rows) // 2 - 1, 1), language=["sym", "en"])

# %% [markdown]
# And any measure of the report card, model by model: the same numbers as the table, drawn.

# %%
MEASURES = ["greedy_accuracy", "pass@1", "cons@k", "mean_length", "reflection_rate", "language_mixing",
            "language_consistency", "hf_greedy_accuracy"]
# The static view draws pass@1, or the mean length where every pass@1 is zero (the tiny run): bars you can see.
FIRST_MEASURE = "pass@1" if any(card["eval"][n]["pass@1"] > 0 for n in explore_names) else "mean_length"


def draw_measure(measure=FIRST_MEASURE):
    """One measure of every model of the run, as bars."""
    values = [card["eval"][n].get(measure, float("nan")) for n in explore_names]
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(explore_names)), 3.2))
    ax.bar(range(len(values)), values, color=["#5b8cc0" if n.startswith("student") else "#d98b3a"
                                              for n in explore_names])
    ax.set_xticks(range(len(values)), explore_names, rotation=30, ha="right")
    ax.set(ylabel=measure, title=f"{measure}, {CARD_PRESET} run: V3-mini family (orange), students (blue)")
    plt.tight_layout()
    plt.show()


explore(draw_measure, measure=MEASURES)

# %% [markdown]
# ## 6. Claims ledger
#
# The report card's claims, judged on the run this chapter has (the tiny run, or `DSLIB_CAPSTONE_RUN`'s), and then
# the pipeline's own promises, measured in this chapter. A "yes" from the tiny run means nothing about the papers,
# since nothing was learnt; the notes say so.

# %%
ledger = Ledger("09")
for c in card_claims:
    note = ("tiny preset: nothing is learnt, so this row checks the plumbing, not the paper"
            if CARD_PRESET == "tiny" else "" if c["holds"] else f"not reproduced by this {CARD_PRESET} run")
    ledger.add(c["claim"], c["paper"], f"{c['ours']} ({CARD_PRESET})", c["holds"], note)
ledger.add("A run killed mid-stage resumes to the same weights", "capstone: every trainer saves optimizer, RNG, "
           "step and logs", f"SIGKILL {'inside' if stopped_mid_stage else 'NOT inside'} pretraining, --resume: "
           + ", ".join(f"{s} {('equal' if v else 'different') if s in resume_checked else 'not tested (unmoved)'}"
                       for s, v in resume_equal.items()),
           bool(stopped_mid_stage and all(resume_checked.values())))
ledger.add("Every model is exported and decodes in transformers as in dslib", "to_hf (chapters 00 and 04)",
           f"{sum(hf_agree.values())}/{len(hf_prompts) * len(names)} greedy completions identical, "
           f"{len(names)} models" if HAVE_TRANSFORMERS else "not checked (no transformers)",
           sum(hf_agree.values()) == len(hf_prompts) * len(names) if HAVE_TRANSFORMERS else None)
ledger.add("Bad options and busy folders are refused before anything is written", "DESIGN.md, Conventions",
           f"{len(refusals)}/{len(attempts)} refused, nothing written: {refused_cleanly}",
           len(refusals) == len(attempts) and refused_cleanly)
ledger.show()
saved_to = ledger.save()

# %% [markdown]
# ## What this chapter measured
#
# The capstone is the course's claims, run end to end. One command trains V3-mini from random weights, grows
# R1-Zero and R1 from it, distils R1 into students that were pretrained alone, and grades them all on the same
# problems, with every model also a transformers folder. This chapter ran it at its smallest size. It checked that
# the folder holds what the report promises and that a killed run resumes to the same weights, and it watched the
# refusals that protect a finished run. The numbers of this session:

# %%
closing = {
    "tiny run: seconds, models evaluated, held-out problems": f"{tiny_seconds:.0f} s, {len(ev)}, {metrics['heldout']}",
    "tiny run: best greedy accuracy (nothing is learnt)": f"{ev[best]['greedy_accuracy']:.0%} ({best})",
    "V3-mini (tiny): parameters, with MTP; held-out loss": f"{pre['parameters']:,}, {pre['parameters_mtp']:,}; "
                                                          f"{pre['heldout_loss']:.3f}",
    "RL stages whose weights did not move": ", ".join(n for n, v in unmoved.items() if v) or "none",
    "killed inside pretraining, resumed at step": f"{stopped_mid_stage}, {resumed_at}",
    "resumed weights equal the uninterrupted run's": ", ".join(f"{s} {v if s in resume_checked else 'not tested'}"
                                                       for s, v in resume_equal.items()),
    "transformers decodes as dslib": f"{sum(hf_agree.values())}/{len(hf_prompts) * len(names)}"
                                     if HAVE_TRANSFORMERS else "not checked (no transformers)",
    "refusals raised, nothing written": f"{len(refusals)}/{len(attempts)}, {refused_cleanly}",
    f"claims that hold in the {CARD_PRESET} run": f"{len(held)} of {len(card_claims)}",
    "chapter time so far (s)": f"{time.time() - CHAPTER_START:.0f}",
}
for k_, v in closing.items():
    print(f"{k_:<58} {v}")

# %% [markdown]
# ## What comes next
#
# The course ends here, and the pipeline is yours. Some directions, each a real question about DeepSeek's recipe:
#
# - **Scale it.** `full` on a GPU, then your own `Preset` (`dataclasses.replace(PRESETS["full"], ...)`): where
#   does R1-Zero's aha moment first appear as V3-mini grows, and does distillation's lead over RL shrink or grow with
#   the student's size?
# - **Ablate it.** `dslib.r1.run_r1(skip=...)` leaves out any of R1's stages (chapter 07); in the preset's `model`,
#   `bias_update_speed=0.0` with an `aux_loss_alpha` swaps the bias balancing for DeepSeekMoE's auxiliary loss
#   (chapter 02). Run each through the capstone's eval to see what each piece is worth on one scoreboard.
# - **Read the real thing.** The `hf/` folders load with the same classes as DeepSeek's released checkpoints
#   (`DeepseekV3ForCausalLM` for V3-mini), and `dslib.v3.released_config` holds V3's and V2's configurations. The
#   gap between V3-mini and V3's 671B parameters is one of size, not of kind.
# - **The critiques.** `PAPERS.md` section 7 holds Dr. GRPO's and DAPO's changes to GRPO (no length or std bias,
#   clip-higher, dynamic sampling). Each is a few lines in `dslib.grpo`, and the capstone's report card shows what
#   it does to R1-Zero; `dslib.book` does the bookkeeping of a chapter you write about it.
#
# ## Exercises
#
# Difficulty: ★ (a few minutes), ★★ (an experiment), ★★★ (a small project).
#
# 1. ★ **A third student.** Add a student size "L" to the tiny preset with `dataclasses.replace`, and count the
#    parameters of each student size. Which models would the run evaluate?
#
#    <details><summary>Hint</summary>`Preset.students` maps a size to TransformerConfig fields;
#    `capstone.student_config(preset, size, vocab_size)` builds the config, and `model_names(preset)` lists the
#    models.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    from dslib.transformer import Transformer
#
#    three = replace(TINY, students={**TINY.students, "L": dict(d_model=32, n_layer=2, n_head=2, n_kv_head=1)})
#    student_params = {s: Transformer(capstone.student_config(three, s, vocab)).num_params() for s in three.students}
#    print(student_params, model_names(three))
#    ```
#    Three more models appear, `student-L-base`, `-distill` and `-rl`; `capstone.run(out, three)` trains and grades
#    them with the rest, since `run` takes a Preset as well as a name. The teacher's data is sampled once and shared
#    by every size.
#    </details>
#
# 2. ★ **Your own claim.** Write a function over `metrics.json` in the format of `capstone.claims` (claim, paper,
#    ours, holds) that checks two things: every student is smaller than its teacher, and the distillation set holds
#    non-reasoning data.
#
#    <details><summary>Hint</summary>`metrics["eval"][name]["parameters"]`, and `metrics["stages"]["students"]
#    ["teacher_data"]`.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    def my_claims(m):
#        ev_, data_ = m["eval"], m["stages"]["students"]["teacher_data"]
#        students_ = [n for n in ev_ if n.startswith("student-")]
#        return [
#            {"claim": "Every student is smaller than its teacher", "paper": "R1, section 2.4",
#             "ours": ", ".join(f"{n} {ev_[n]['parameters']:,}" for n in students_)
#                     + f" vs R1 {ev_['r1']['parameters']:,}",
#             "holds": all(ev_[n]["parameters"] < ev_["r1"]["parameters"] for n in students_)},
#            {"claim": "The distillation set holds non-reasoning data",
#             "paper": "R1, section 2.3.3: about 200k of 800k",
#             "ours": f"{data_['non_reasoning_texts']} of {data_['texts']}", "holds": data_["non_reasoning_texts"] > 0},
#        ]
#
#    mine = my_claims(json.loads((RUN_A / "metrics.json").read_text()))
#    for c in mine:
#        print(c)
#    ```
#    A claim is only as good as the number it reads: these two are properties of the recipe, true at any size, so they
#    hold even in the tiny run. The paper's claims about accuracy need a run that learns.
#    </details>
#
# 3. ★★ **A pipeline in two calls.** The folder of section 2 holds `pretrain` and `r1_zero`. Run only the `r1` stage
#    into it with `--resume`. Why does that call need `--resume`, and where does R1 get its base model? Are its
#    weights the uninterrupted run's?
#
#    <details><summary>Hint</summary>`capstone.run(RUN_B, "tiny", stages=["r1"], resume=True, ...)`; a stage's needs
#    are checked against `run.json`'s `stages_done`.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    later = capstone.run(RUN_B, "tiny", stages=["r1"], resume=True, device="cpu", progress=False, threads=THREADS)
#    matplotlib.use(backend)
#    r1_same = same_weights(RUN_A / "stages" / "r1" / "final", RUN_B / "stages" / "r1" / "final")
#    print(later["run"]["stages_done"], "r1 equal to the uninterrupted run's:", r1_same)
#    ```
#    Without `--resume` the folder is refused, since it holds a run. With it, `r1` may run alone because its only
#    need, `pretrain`, is in `stages_done`. The stage loads the base from `stages/pretrain/final`, the finished
#    stage's saved model, instead of training it again. R1 starts from the base, not from R1-Zero, so `r1_zero` is
#    not needed. Its weights equal the uninterrupted run's when the stage is a pure function of its inputs (the base,
#    the preset, the seed), which is what the printed comparison tests.
#    </details>
#
# 4. ★★ **Why non-reasoning data?** The students' distillation set is R1's kept samples *plus* bare answers to
#    one-operation problems, as R1's 800k held about 200k non-reasoning samples. What would a student distilled from
#    reasoning alone do on an easy question? And what happened in the tiny run, where the teacher kept nothing?
#
#    <details><summary>Hint</summary>Look at `teacher_data` in `metrics.json`, and at what `stage_students` does when
#    the set is empty.</details>
#    <details><summary>Solution</summary>
#
#    R1 added the non-reasoning data (writing, factual QA, self-cognition, translation, from V3's own SFT pipeline) so
#    that the final model stays a general assistant. For simple queries it answers directly, without a chain of
#    thought (section 2.3.3). In the arithmetic world the analogue is a bare `</think> <answer> 7 </answer>` for
#    "Q:3+4". A student that saw only long reasoning learns to think at length on everything, which costs tokens on
#    easy problems (chapter 07's brevity reward fights the same habit). In the tiny run the teacher, which has learnt
#    nothing, passes no sample through the filter. The non-reasoning texts are then the whole distillation set, and
#    without them `stage_students` would stop with a `CapstoneError` ("no distillation data").
#    </details>
#
# ## Checks
#
# The chapter's key measurements, asserted (this is what the test suite checks), after the worked solutions that take
# seconds (exercises 1-3) have run. Each assert fails when the effect it guards is absent.

# %%
solution_seconds = run_solutions("09", globals(), (1, 2, 3))
print("worked solutions run:", ", ".join(f"exercise {n} ({t:.1f} s)" for n, t in solution_seconds.items()))
assert sorted(metrics["eval"]) == sorted(names) and metrics["run"]["stages_done"] == list(STAGES)
report_md = (RUN_A / "report.md").read_text(encoding="utf-8")
for name in names:  # every model evaluated, exported and in the report
    assert (RUN_A / "hf" / name / "config.json").is_file() and f"| {name} |" in report_md, name
for f in ("run.json", "heldout.jsonl", "metrics.json", "report.md", "report.html", "pretraining.png", "models.png",
          "timeline.png"):
    assert (RUN_A / f).is_file(), f
if metrics["run"]["sessions"][-1]["workers"] == 2:  # the second worker ran what needs no other stage, and only that
    assert {s["what"] for s in spans if s["worker"] == 2} == {"r1_zero", "students' own runs"}, spans
assert len(heldout) == metrics["heldout"] == 2 * TINY.eval_problems
assert stopped_mid_stage and resumed_at is not None and resumed_at < TINY.pretrain_steps  # killed inside the stage
assert "pretrain" in resume_checked and all(resume_checked.values()), resume_equal  # resumed to the same weights
assert not HAVE_TRANSFORMERS or sum(hf_agree.values()) == len(hf_prompts) * len(names), hf_agree  # decodes alike
assert len(refusals) == len(attempts) and refused_cleanly, refusals
assert "pass --resume" in refusals["an --out that holds a run, without --resume"]
assert "polish not among" in refusals["an unknown stage"]
assert set(solution_seconds) == {1, 2, 3} and set(student_params) == {"S", "L"} and len(mine) == 2
assert "r1" in later["run"]["stages_done"]
print(f"chapter 09 checks passed; {time.time() - CHAPTER_START:.0f} s since set-up")
