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
# # Chapter 05 · GRPO: reinforcement learning without a critic
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/deepseek-from-scratch/deepseek-from-scratch/blob/main/chapters/05_grpo.ipynb)
# [![Binder](https://mybinder.org/badge_logo.svg)](https://mybinder.org/v2/gh/deepseek-from-scratch/deepseek-from-scratch/main?labpath=chapters%2F05_grpo.ipynb)
#
# **What you will build.** The reinforcement-learning algorithm behind DeepSeekMath and DeepSeek-R1, and the machinery
# it needs:
#
# 1. `dslib.sampling`: a batched, KV-cached rollout engine for any dslib model: prompts of different lengths in one
#    batch, temperature and top-p, stop tokens, a maximum length, a seed; it returns the tokens, the sampling policy's
#    per-token log-probabilities and the completion masks (section 1);
# 2. `dslib.rewards`: rule-based rewards on the arithmetic world: accuracy and format, never evaluated, never raising
#    (section 2);
# 3. `dslib.grpo`: group advantages, the k3 KL estimator, the clipped objective with the normalisations of GRPO, Dr.
#    GRPO and DAPO, and a GRPO trainer with a frozen reference model (section 3);
# 4. experiments: k3 against the exact KL (section 4); the paper's unified view of SFT, RFT, DPO, PPO and GRPO as
#    gradient coefficients (section 5); GRPO on the course's base model, a short run whose reward, length and
#    reflection curves you read (section 6); Dr. GRPO's length bias (section 7); groups whose rewards are all equal
#    (section 8); the memory a critic would cost (section 9); an explorer of advantages and the clipped objective
#    (section 10), and the claims ledger (section 11).
#
# **What you need.** Chapter 00 (the arithmetic world, its character-level tokenizer, the dense `Transformer` with its
# KV cache, and the recipe of the base model) and chapter 03 (`MLATransformer`, which the rollout engine is checked
# on). The RL side is built here from nothing: no earlier chapter has trained a policy. The base model is cached:
# `python -m dslib.pretrained` builds it once (a few minutes on one CPU thread), and this chapter builds it itself
# when it is missing. **How long.** The chapter is sized to run within its 3-minute budget at `small` scale on 2 CPU
# cores once the base model is cached; `full` scale (one GPU) trains for 200 GRPO steps instead of 24.
#
# **Why it matters for DeepSeek.** DeepSeekMath introduced GRPO; DeepSeek-R1-Zero and DeepSeek-R1 are trained with
# it. The three modules of this chapter are what chapters 06 (R1-Zero), 07 (R1) and 08 (distillation) import: every
# RL run of the later chapters is a `GRPOTrainer`.
#
# **Papers.** DeepSeekMath (arXiv 2402.03300), section 4 (GRPO, equations 1-4 and Algorithm 1) and section 5.2.1 (the
# unified paradigm); the critiques Dr. GRPO ("Understanding R1-Zero-like training", arXiv 2503.20783) and DAPO
# (arXiv 2503.14476). The full R1-Zero run, with its "aha moment", is chapter 06's; this chapter keeps its runs short.
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

import copy
import math
import time

import matplotlib.pyplot as plt
import numpy as np
import torch

import dslib
from dslib.book import Ledger, run_solutions
from dslib.explore import explore
from dslib.mla import MLATransformer, MLATransformerConfig
from dslib.pretrained import base_model, base_model_info, base_world
from dslib.transformer import Transformer, TransformerConfig
from dslib.world import prompt

# One CPU thread at small scale: the models are tiny, and one thread is far less disturbed by other programs on a
# shared machine than two that wait for each other.
device = dslib.setup(seed=0, threads=dslib.sized(small=1, full=None))
SCALE = dslib.scale()
CHAPTER_START = time.time()

# %% [markdown]
# ## GRPO in one page
#
# PPO (Schulman et al. 2017), as used for language models, maximises for each question $q$ and sampled output $o$
#
# $$\mathcal{J}_{PPO}(\theta) = \mathbb{E}\Big[\frac{1}{|o|}\sum_{t=1}^{|o|} \min\Big(\frac{\pi_\theta(o_t\mid q,
# o_{<t})}{\pi_{\theta_{old}}(o_t\mid q, o_{<t})} A_t,\ \mathrm{clip}\Big(\frac{\pi_\theta}{\pi_{\theta_{old}}},
# 1-\varepsilon, 1+\varepsilon\Big) A_t\Big)\Big] \qquad \text{(DeepSeekMath, eq. 1)}$$
#
# where the advantage $A_t$ comes from generalised advantage estimation with a learned **value model** (the critic),
# usually as large as the policy. DeepSeekMath's Group Relative Policy Optimization drops the critic. For each question
# it samples a group of $G$ outputs $\{o_1, \dots, o_G\}$ from $\pi_{\theta_{old}}$, scores them, and uses the
# group itself as the baseline:
#
# $$\hat A_{i,t} = \tilde r_i = \frac{r_i - \mathrm{mean}(\mathbf r)}{\mathrm{std}(\mathbf r)} \qquad
# \text{(outcome supervision, section 4.1.2)}$$
#
# $$\mathcal{J}_{GRPO}(\theta) = \mathbb{E}\Big[\frac{1}{G}\sum_{i=1}^{G}\frac{1}{|o_i|}\sum_{t=1}^{|o_i|}\Big\{\min
# \big(\rho_{i,t}\hat A_{i,t},\ \mathrm{clip}(\rho_{i,t}, 1-\varepsilon, 1+\varepsilon)\hat A_{i,t}\big) - \beta\,
# \mathbb{D}_{KL}[\pi_\theta\|\pi_{ref}]\Big\}\Big] \qquad \text{(eq. 3)}$$
#
# with $\rho_{i,t} = \pi_\theta(o_{i,t}\mid q, o_{i,<t}) / \pi_{\theta_{old}}(o_{i,t}\mid q, o_{i,<t})$ and the KL
# penalty added to the loss per token (not folded into the reward, as PPO for RLHF does), with the unbiased estimator
#
# $$\mathbb{D}_{KL}[\pi_\theta\|\pi_{ref}] = \frac{\pi_{ref}(o_{i,t}\mid\cdot)}{\pi_\theta(o_{i,t}\mid\cdot)} - \log
# \frac{\pi_{ref}(o_{i,t}\mid\cdot)}{\pi_\theta(o_{i,t}\mid\cdot)} - 1 \qquad \text{(eq. 4, Schulman's "k3")}.$$
#
# DeepSeekMath trained with $G = 64$, learning rate $10^{-6}$, $\beta = 0.04$, one policy update per batch of
# rollouts ($\mu = 1$), batches of 1,024 outputs, and 144k chain-of-thought questions (section 4.2).
#
# Three policies appear in eq. 3, and keeping them apart is most of the work of implementing it:
#
# | symbol | what it is | where this chapter's code gets it |
# |---|---|---|
# | $\pi_\theta$ | the policy being trained | `rollout_logprobs(model, rollout)`, with gradients |
# | $\pi_{\theta_{old}}$ | the policy that sampled this batch | the sampler's `Rollout.logprobs` (with $\mu = 1$: $\pi_\theta$'s, detached) |
# | $\pi_{ref}$ | a frozen copy of the starting model | the same function on the copy, without gradients |
#
# Only $\pi_\theta$ receives gradients. $\pi_{\theta_{old}}$ enters through the ratio $\rho$, which keeps several
# updates on one batch close to the sampler; $\pi_{ref}$ enters only through the KL term, which keeps the whole run
# close to where it started. With $\mu = 1$, $\pi_\theta$ and $\pi_{\theta_{old}}$ are equal in value when the
# gradient is taken (section 6 shows what that does to the logged loss).
#
# Everything here needs three pieces: fast sampling with log-probabilities, rewards, and the loss. We build them in that
# order.

# %% [markdown]
# The two algorithms side by side, as DeepSeekMath's Figure 4 draws them: PPO needs a **value model** (trained, as
# large as the policy) to turn one reward into per-token advantages through GAE; GRPO samples a **group** of outputs
# and lets the group's own rewards be the baseline. Trained models are orange, frozen ones blue.

# %%
def draw_ppo_vs_grpo():
    """DeepSeekMath Figure 4, redrawn: PPO's four models against GRPO's three (no value model)."""
    fig, axes = plt.subplots(2, 1, figsize=(12, 4.6))
    trained, frozen, data = "#fdebd0", "#dbe9f6", "#ffffff"

    def box(ax, x, y, text, color, w=1.5, h=0.6):
        ax.add_patch(plt.Rectangle((x, y), w, h, facecolor=color, edgecolor="#333333", lw=1.1))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)

    def arrow(ax, x0, y0, x1, y1):
        ax.annotate("", xy=(x1, y1), xytext=(x0, y0), arrowprops=dict(arrowstyle="->", lw=1.2, color="#333333"))

    for ax, name in zip(axes, ("PPO", "GRPO")):
        ax.set_xlim(0, 12.5)
        ax.set_ylim(-0.1, 2.2)
        ax.axis("off")
        ax.text(0.05, 2.1, name, fontsize=12, weight="bold", va="top")
        box(ax, 0.2, 0.75, "q", data, w=0.6)
        box(ax, 1.3, 0.75, "policy model", trained)
        arrow(ax, 0.8, 1.05, 1.3, 1.05)
        arrow(ax, 2.8, 1.05, 3.4, 1.05)
    ax = axes[0]
    box(ax, 3.4, 0.75, "o", data, w=0.6)
    for y, text, color in ((1.5, "reference model", frozen), (0.75, "reward model", frozen),
                           (0.0, "value model", trained)):
        box(ax, 4.6, y, text, color)
        arrow(ax, 4.0, 1.05, 4.6, y + 0.3)
    box(ax, 6.7, 0.75, "r (minus KL\nper token)", data, w=1.3)
    box(ax, 6.7, 0.0, "v", data, w=1.3)
    arrow(ax, 6.1, 1.8, 6.7, 1.25)
    arrow(ax, 6.1, 1.05, 6.7, 1.05)
    arrow(ax, 6.1, 0.3, 6.7, 0.3)
    box(ax, 8.6, 0.4, "GAE", data, w=1.0)
    arrow(ax, 8.0, 1.05, 8.6, 0.8)
    arrow(ax, 8.0, 0.3, 8.6, 0.6)
    box(ax, 10.2, 0.4, "A (per token)", data)
    arrow(ax, 9.6, 0.7, 10.2, 0.7)
    ax = axes[1]
    box(ax, 3.4, 0.75, "o1 ... oG", data, w=1.0)
    for y, text in ((1.5, "reference model"), (0.75, "reward model\n(here: rules)")):
        box(ax, 5.0, y, text, frozen)
        arrow(ax, 4.4, 1.05, 5.0, y + 0.3)
    box(ax, 7.1, 0.75, "r1 ... rG", data, w=1.2)
    arrow(ax, 6.5, 1.05, 7.1, 1.05)
    ax.text(7.0, 1.8, "KL added to the loss, not to r", fontsize=8, color="#555555", va="center")
    arrow(ax, 6.5, 1.8, 6.95, 1.8)
    box(ax, 8.9, 0.75, "group\ncomputation", data, w=1.3)
    arrow(ax, 8.3, 1.05, 8.9, 1.05)
    box(ax, 10.8, 0.75, "A1 ... AG", data)
    arrow(ax, 10.2, 1.05, 10.8, 1.05)
    plt.tight_layout()
    plt.show()


draw_ppo_vs_grpo()

# %% [markdown]
# ## 1. The rollout engine: `dslib.sampling`
#
# GRPO spends most of its time generating. Chapter 00's `Transformer.generate` continues prompts of **equal** length;
# GRPO's batch holds prompts of different lengths (07+35 is shorter than 07+35-12+04). The engine left-pads them so that
# every prompt ends in the same column, and keeps the padding invisible with what `Transformer.forward` already
# accepts: explicit **positions** (RoPE counts only real tokens, so a padded row rotates exactly as it would alone) and
# an explicit boolean **attention mask** (no query sees a padding key; a padding query sees only itself, so no softmax
# row is empty). The KV cache then needs nothing new: the prompt is one prefill, each new token one step.
#
# The engine returns, for every sampled token, the log-probability under the distribution it was **actually drawn
# from** (after temperature and top-p). GRPO needs exactly this for $\pi_{\theta_{old}}$ in the ratio. With top-p of 1
# it equals what a teacher-forced forward pass at the same temperature gives, which we check below.
#
# **Why left padding.** Take two prompts of 7 and 4 tokens. Padded on the right, row 0's next token goes in column 7
# and row 1's in column 4: every step would write to a different column in every row. Padded on the left, both
# prompts end in column 6, the logits that predict the first new token are column 6 of every row, and step $i$ writes
# column $7 + i$ everywhere. The price is that a padded row no longer starts at column 0, so the engine passes what the
# model would otherwise infer from the column:
#
# | column | 0 | 1 | 2 | 3 | 4 | 5 | 6 |
# |---|---|---|---|---|---|---|---|
# | row 0 (7 tokens): position | 0 | 1 | 2 | 3 | 4 | 5 | 6 |
# | row 1 (4 tokens): position | pad (0) | pad (0) | pad (0) | 0 | 1 | 2 | 3 |
#
# RoPE rotates by position, not by column, so row 1's tokens get the rotations they would get alone; the attention
# mask hides the three pad keys from every real query, so no real token ever mixes in a pad's value.
#
# **Why a KV cache.** A decoder's keys and values at a position depend only on the tokens up to it, so they never
# change once computed. The cache keeps them per layer (chapter 00's `KVCache` holds a (b, n_kv_head, max_len,
# head_dim) tensor each for keys and values; MLA's cache of chapter 03 holds the latent and the shared RoPE key
# instead), so the engine runs one *prefill* over the $P$ prompt columns and then the model on one new token per row
# per step. A GRPO step samples $32 \times 8 = 256$ rows, and the cache turns each of their steps from a pass over the
# whole sequence into a pass over one token.

# %%
#| default_exp grpo

# %% [markdown]
# The first export is the record a rollout returns. Its shapes: $b$ rows (prompts $\times$ $G$, one row per
# completion), $P$ prompt columns and $N$ completion columns, where $N$ is the number of steps the longest row ran.
# Two masks say which entries are real: `prompt_mask` (b, P) is False on the left padding, `mask` (b, N) is True from
# the first new token up to and including the stop token. Every later sum over tokens is a sum under `mask`.

# %%
#| export sampling
"""Batched, KV-cached generation for dslib models: prompts of different lengths, temperature and top-p, stop tokens,
the sampling policy's per-token log-probabilities and completion masks (chapter 05)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass
class Rollout:
    """A batch of generated completions, left-padded prompts first.

    prompt_ids (b, P): prompts, left-padded with pad_id to the longest; prompt_mask (b, P) is True on real tokens.
    tokens (b, N): the completions; after a stop token (which is kept) the row holds pad_id.
    logprobs (b, N): log-probability of each completion token under the distribution it was sampled from (after
        temperature and top-p; 0 for greedy decoding); 0 where mask is False.
    mask (b, N): True on completion tokens (up to and including the stop token).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    tokens: torch.Tensor
    logprobs: torch.Tensor
    mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        """Completion lengths in tokens (b,)."""
        return self.mask.sum(-1)

    def truncated(self, stop_ids: Sequence[int]) -> torch.Tensor:
        """(b,) bool: the completion ends without a stop token (it hit the length limit)."""
        last = self.tokens.gather(1, (self.lengths - 1).clamp(min=0)[:, None])[:, 0]
        return ~torch.isin(last, torch.as_tensor(list(stop_ids), dtype=last.dtype, device=last.device))

    @property
    def sequences(self) -> torch.Tensor:
        """Prompt and completion side by side (b, P + N)."""
        return torch.cat([self.prompt_ids, self.tokens], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        """True on the real tokens of `sequences` (b, P + N)."""
        return torch.cat([self.prompt_mask, self.mask], dim=1)

    def texts(self, tokenizer) -> list[str]:
        """The completions as text (pads dropped, the stop token kept)."""
        return [tokenizer.decode(row[m].tolist()) for row, m in zip(self.tokens, self.mask)]

# %% [markdown]
# Five helpers, each small enough to check by eye. `left_pad` right-aligns the prompts. `padded_attention` builds the
# boolean mask (b, 1, t, past + t) that `Transformer.forward` accepts: causal, and blind to pad keys; on its own it
# would leave a pad query with no key at all, and a softmax over nothing but $-\infty$ is NaN, so each pad query is
# allowed to see itself. `positions_of` counts real tokens only (the table above). `context_limit` reads the model's
# maximum length, so that a long prompt cannot silently overflow the cache. `top_p_filter` is nucleus sampling: it
# keeps the smallest set $V_p$ of most likely tokens whose probability reaches $p$, and the token is then drawn from
#
# $$\pi_p(v) = \frac{\pi(v)}{\sum_{u \in V_p}\pi(u)} \quad (v \in V_p), \qquad \pi(v) = \mathrm{softmax}(z / T)_v,$$
#
# with $z$ the logits and $T$ the temperature. The log-probability the engine records is $\log\pi_p(v)$.

# %%
#| export sampling
def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists of different lengths -> (ids (b, P), mask (b, P)), right-aligned: every prompt ends at column P-1."""
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("left_pad needs at least one prompt, and every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long)
        mask[i, width - len(p):] = True
    return ids.to(device), mask.to(device)


def padded_attention(valid: torch.Tensor, past: int = 0, valid_past: torch.Tensor | None = None) -> torch.Tensor:
    """The boolean attention mask (b, 1, t, past + t) for a chunk of t tokens after `past` cached ones, where
    valid (b, t) and valid_past (b, past) mark real tokens: a query sees earlier-or-equal real keys only. A padding
    query sees itself only (so no row of the softmax is empty; padding outputs are never read)."""
    b, t = valid.shape
    keys = valid if valid_past is None else torch.cat([valid_past, valid], dim=1)  # (b, past + t)
    causal = torch.ones(t, past + t, dtype=torch.bool, device=valid.device).tril(past)
    allowed = causal[None] & keys[:, None, :]
    diag = torch.zeros(t, past + t, dtype=torch.bool, device=valid.device)
    diag[torch.arange(t), past + torch.arange(t)] = True
    return (allowed | (diag[None] & ~valid[:, :, None]))[:, None]


def positions_of(valid: torch.Tensor, start: torch.Tensor | int = 0) -> torch.Tensor:
    """RoPE positions of real tokens counted from `start` (b,) or an int; padding gets position 0."""
    pos = valid.long().cumsum(-1) - 1
    if isinstance(start, torch.Tensor):
        pos = pos + start[:, None]
    else:
        pos = pos + start
    return torch.where(valid, pos, torch.zeros_like(pos))


def context_limit(model: torch.nn.Module, default: int) -> int:
    """The longest sequence a model takes: its config's max_seq_len (Transformer, MLATransformer) or
    max_position_embeddings (DeepSeek-V3's name), else `default`."""
    config = getattr(model, "config", None)
    for name in ("max_seq_len", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return default


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of tokens whose probability reaches top_p (the
    most likely token always stays); the others get -inf."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
    drop_sorted = before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))

# %% [markdown]
# The sampling loop. A finished row keeps stepping (the batch moves together) but writes padding and drops out of the
# completion mask; the loop ends when every row has stopped or the length runs out.
#
# In order: one prefill over the padded prompts (the output head on the last column only, `logits_to_keep=1`); then,
# per step, the next token of every row from $\pi_p$ with a seeded `torch.Generator` (the same seed gives the same
# rollout, which the trainer's exact resume relies on), its log-probability, and a stop test. Rows that have stopped
# leave the batch and the cache once a quarter of the rows is idle, so a batch of short answers does not pay for its
# longest one; the random draw still covers all $b$ rows, so every live row receives the same random numbers either
# way.
#
# **A pitfall this avoids.** With `top_p` below 1, $\pi_p$ is not the model's softmax: a teacher-forced pass gives
# $\log\pi(v)$, the sampler $\log\pi_p(v) \ge \log\pi(v)$, and their ratio is not 1 even before any update. That
# is why the engine records what it sampled from, and why the trainer samples with `top_p = 1`: then sampler and
# teacher-forced pass describe the same distribution.

# %% [markdown]
# Two small helpers keep the engine's cell about sampling: one checks the sampling arguments (a clear error naming the
# bad one), the other turns the stop tokens and stop sequences into tensors on the model's device.

# %%
#| export sampling
def _check_sampling(max_new_tokens: int, temperature: float, top_p: float) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: a positive int is required")
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} is invalid: a non-negative number is required")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p!r} is invalid: a number in (0, 1] is required")


def _stop_tensors(stop_ids: Sequence[int], stop_sequences: Sequence[Sequence[int]],
                  device: torch.device) -> tuple[torch.Tensor, list[torch.Tensor]]:
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    sequences = [torch.as_tensor(list(q), dtype=torch.long, device=device) for q in stop_sequences]
    if any(len(q) == 0 for q in sequences):
        raise ValueError("stop_sequences must not contain an empty sequence")
    return stops, sequences

# %%
#| export sampling
@torch.no_grad()
def generate(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
             temperature: float = 1.0, top_p: float = 1.0, stop_ids: Sequence[int] = (),
             stop_sequences: Sequence[Sequence[int]] = (), pad_id: int = 0, seed: int | None = 0,
             generator: torch.Generator | None = None, drop_finished: bool = True) -> Rollout:
    """Sample completions of token-id prompts of different lengths, in one batch, with a KV cache.

    The model is any dslib LM with `forward(input_ids, positions, segments, attn_mask, cache)` and
    `new_cache(batch_size, max_len)` (Transformer, MLATransformer). Prompts are left-padded; padding is kept out of
    attention by an explicit mask and out of RoPE by explicit positions, so every row computes what it would alone.

    temperature 0 is greedy, else softmax(logits / temperature) within the top_p nucleus. A row ends after a token of
    stop_ids, or once its completion ends with one of stop_sequences (token-id lists); both are kept. max_new_tokens is
    capped by the model's max_seq_len. seed: a fresh generator (same seed, same rollout), or pass `generator`.
    drop_finished: stopped rows leave the batch and the cache (when it has `select_rows`); the samples are the same.
    Returns a Rollout whose logprobs are those of the distribution sampled from (with top_p = 1, a teacher-forced
    forward pass's at the same temperature: what GRPO's ratio pi_theta / pi_theta_old needs).
    """
    _check_sampling(max_new_tokens, temperature, top_p)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    ids, valid = left_pad(prompts, pad_id, device)
    b, width = ids.shape
    limit = context_limit(model, width + max_new_tokens)
    n_new = min(max_new_tokens, limit - width)
    if n_new < 1:
        raise ValueError(f"the longest prompt has {width} tokens: no room to generate within max_seq_len={limit}")
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(0 if seed is None else seed)
    stops, sequences = _stop_tensors(stop_ids, stop_sequences, device)
    prompt_len = valid.sum(-1)  # (b,)

    cache = model.new_cache(b, width + n_new)
    can_drop = drop_finished and hasattr(cache, "select_rows")
    rows = torch.arange(b, device=device)  # the rows of the batch that the cache still holds
    # The prefill needs the output head at the last position only (dslib models take logits_to_keep).
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    logits = model(ids, positions=positions_of(valid), attn_mask=padded_attention(valid), cache=cache, **keep)[:, -1]
    key_valid = torch.cat([valid, torch.ones(b, n_new, dtype=torch.bool, device=device)], dim=1)
    tokens = torch.full((b, n_new), pad_id, dtype=torch.long, device=device)
    logprobs = torch.zeros(b, n_new, device=device)
    mask = torch.zeros(b, n_new, dtype=torch.bool, device=device)
    done = torch.zeros(b, dtype=torch.bool, device=device)
    steps = 0
    for i in range(n_new):
        logits = logits.float()
        if temperature == 0:
            nxt = logits.argmax(-1)
            lp = torch.zeros(b, device=device)
        else:
            logp = top_p_filter(logits / temperature, top_p).log_softmax(-1)
            nxt = torch.multinomial(logp.exp(), 1, generator=generator)[:, 0]
            lp = logp.gather(-1, nxt[:, None])[:, 0]
        live = ~done
        tokens[:, i] = torch.where(live, nxt, torch.full_like(nxt, pad_id))
        logprobs[:, i] = torch.where(live, lp, torch.zeros_like(lp))
        mask[:, i] = live
        steps = i + 1
        if len(stops):
            done = done | (live & torch.isin(nxt, stops))
        for q in sequences:  # the completion now ends with the sequence
            if i + 1 >= len(q):
                done = done | (live & (tokens[:, i + 1 - len(q):i + 1] == q).all(-1))
        if bool(done.all()) or i + 1 == n_new:
            break
        # Rows that have finished leave the batch (their cache rows too) once a quarter of it is idle; sampling still
        # draws for all b rows, so every live row gets the same random numbers as without dropping.
        live_rows = ~done[rows]
        if can_drop and int(live_rows.sum()) <= 0.75 * len(rows):
            rows = rows[live_rows]
            cache.select_rows(torch.nonzero(live_rows)[:, 0])
        past = width + i
        out = model(tokens[rows, i:i + 1], positions=(prompt_len[rows] + i)[:, None],
                    attn_mask=key_valid[rows][:, None, None, :past + 1], cache=cache)[:, -1]
        logits = out if len(rows) == b else torch.zeros(b, out.shape[-1], device=device, dtype=out.dtype).index_copy_(
            0, rows, out)
    model.train(was_training)
    return Rollout(ids, valid, tokens[:, :steps], logprobs[:, :steps], mask[:, :steps])

# %% [markdown]
# The teacher-forced side: one forward pass over prompt and completion gives $\log\pi_\theta(o_t\mid q, o_{<t})$ for
# every completion token at once, with gradients. GRPO calls it for the policy being trained and for the reference.
#
# Two details decide whether these numbers are the right ones. The logits at column $j$ predict the token in column
# $j + 1$, so the logits for the $N$ completion tokens are columns $P - 1$ to $P + N - 2$: the slice `width - 1:-1`.
# And the policy that was sampled is $\mathrm{softmax}(z / T)$, so the log-probabilities are taken at the same
# temperature; at $T = 1$ on one side and $T \ne 1$ on the other, the ratio $\rho$ would differ from 1 before any
# update. `rollout_logprobs` adds bucketing: rows sorted by completion length and run in chunks, each cut to its own
# longest completion, which changes the cost but not the numbers.

# %%
#| export sampling
def sequence_logprobs(model: torch.nn.Module, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor,
                      tokens: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Teacher-forced log-probabilities (b, N) of completion tokens after left-padded prompts, in one forward pass
    (with gradients when enabled): log softmax(logits / temperature) at each completion token, 0 where mask is False.
    This is log pi_theta(o_t | q, o_<t) of GRPO's objective (DeepSeekMath, eq. 3)."""
    ids = torch.cat([prompt_ids, tokens], dim=1)
    valid = torch.cat([prompt_mask, mask], dim=1)
    logits = model(ids, positions=positions_of(valid), attn_mask=padded_attention(valid))
    width = prompt_ids.shape[1]
    logits = logits[:, width - 1:-1].float()  # the logits that predict each completion token
    if temperature > 0 and temperature != 1:
        logits = logits / temperature
    lp = logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    return lp.masked_fill(~mask, 0.0)


def rollout_logprobs(model: torch.nn.Module, rollout: Rollout, temperature: float = 1.0,
                     bucket: int | None = 64) -> torch.Tensor:
    """`sequence_logprobs` of a Rollout's completions under `model` (the new policy, or the reference model).

    bucket: rows are sorted by completion length and run in chunks of this many, each cut to its longest completion,
    so that short completions do not pay for the longest one's padding (the result is the same, and differentiable;
    None runs one pass)."""
    b, n = rollout.tokens.shape
    if bucket is None or b <= bucket:
        return sequence_logprobs(model, rollout.prompt_ids, rollout.prompt_mask, rollout.tokens, rollout.mask,
                                 temperature)
    order = rollout.lengths.argsort()
    pieces = []
    for s in range(0, b, bucket):
        rows = order[s:s + bucket]
        width = max(1, int(rollout.lengths[rows].max()))
        lp = sequence_logprobs(model, rollout.prompt_ids[rows], rollout.prompt_mask[rows],
                               rollout.tokens[rows, :width], rollout.mask[rows, :width], temperature)
        pieces.append(F.pad(lp, (0, n - width)))
    return torch.cat(pieces)[order.argsort()]

# %% [markdown]
# And the slow, obvious reference: the same sampling without a cache, running the whole sequence again at every step.

# %%
#| export sampling
@torch.no_grad()
def generate_uncached(model: torch.nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                      temperature: float = 1.0, stop_ids: Sequence[int] = (), pad_id: int = 0,
                      seed: int | None = 0) -> Rollout:
    """The slow, obvious reference: the same sampling, but every step runs the whole sequence again (no KV cache).
    Given the same seed it draws the same tokens as `generate` (top_p = 1), up to float rounding."""
    device = next(model.parameters()).device
    model.eval()
    ids, valid = left_pad(prompts, pad_id, device)
    b, width = ids.shape
    n_new = min(max_new_tokens, context_limit(model, width + max_new_tokens) - width)
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else seed)
    stops = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    seq, seq_valid = ids, valid
    toks, lps, masks = [], [], []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    for i in range(n_new):
        logits = model(seq, positions=positions_of(seq_valid), attn_mask=padded_attention(seq_valid))[:, -1].float()
        if temperature == 0:
            nxt, lp = logits.argmax(-1), torch.zeros(b, device=device)
        else:
            logp = (logits / temperature).log_softmax(-1)
            nxt = torch.multinomial(logp.exp(), 1, generator=gen)[:, 0]
            lp = logp.gather(-1, nxt[:, None])[:, 0]
        live = ~done
        toks.append(torch.where(live, nxt, torch.full_like(nxt, pad_id)))
        lps.append(torch.where(live, lp, torch.zeros_like(lp)))
        masks.append(live)
        if len(stops):
            done = done | (live & torch.isin(nxt, stops))
        seq = torch.cat([seq, toks[-1][:, None]], dim=1)
        seq_valid = torch.cat([seq_valid, torch.ones_like(live)[:, None]], dim=1)  # a pad after a stop is harmless
        if bool(done.all()):
            break
    return Rollout(ids, valid, torch.stack(toks, 1), torch.stack(lps, 1), torch.stack(masks, 1))

# %% [markdown]
# **Checks.** On a small random model of each family the course has so far (chapter 00's dense `Transformer` and chapter
# 03's `MLATransformer`), with prompts of four lengths in one batch: (a) the engine's log-probabilities equal a
# teacher-forced pass, (b) each padded row equals that row decoded alone with no padding at all, (c) the cached engine
# draws the very same tokens as the uncached reference with the same seed.
#
# Each check guards one thing GRPO depends on. (a) is the ratio: with $\mu > 1$ the trainer divides by the engine's
# log-probabilities, and if they differ from a teacher-forced pass, $\rho \ne 1$ at $\theta = \theta_{old}$ and the
# clip acts on an error. (b) is the padding: a mistake in the positions or the mask shows up as a row that computes
# something other than it would alone, which a comparison between two padded runs would not catch. (c) is the cache.
# The models are random with a large initialisation (`init_std=0.3`), so that their distributions are not flat and an
# error cannot hide in near-uniform probabilities. Look for errors at the level of float32 rounding
# (around $10^{-6}$); the final checks require below $10^{-4}$.

# %%
def small_models(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    dense = Transformer(TransformerConfig(vocab_size=40, d_model=32, n_layer=2, n_head=4, n_kv_head=2, max_seq_len=48,
                                          init_std=0.3))
    mla = MLATransformer(MLATransformerConfig(vocab_size=40, d_model=32, n_layer=2, n_head=4, kv_lora_rank=16,
                                              qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, max_seq_len=48,
                                              init_std=0.3))
    return {"Transformer": dense.eval(), "MLATransformer": mla.eval()}


toy_prompts = [[1, 5, 6, 7, 8, 9, 10], [1, 4], [1, 3, 3, 3], [1, 9, 8, 20, 21]]
engine_errors = {}
for name, m in small_models().items():
    r = generate(m, toy_prompts, 24, temperature=0.8, stop_ids=[2], seed=1)
    with torch.no_grad():
        teacher = rollout_logprobs(m, r, temperature=0.8)
    alone_err = 0.0
    with torch.no_grad():
        for i, p in enumerate(toy_prompts):  # each row alone: no padding, positions from 0, default causal mask
            n = int(r.mask[i].sum())
            lp = (m(torch.tensor([p + r.tokens[i, :n].tolist()]))[0] / 0.8).log_softmax(-1)[len(p) - 1:len(p) - 1 + n]
            err = (lp.gather(-1, r.tokens[i, :n, None])[:, 0] - r.logprobs[i, :n]).abs().max()
            alone_err = max(alone_err, float(err))
    u = generate_uncached(m, toy_prompts, 24, temperature=0.8, stop_ids=[2], seed=1)
    engine_errors[name] = {"teacher-forced": float((teacher - r.logprobs).abs().max()), "alone": alone_err,
                           "same tokens as uncached": bool(torch.equal(u.tokens, r.tokens))}
    print(f"{name:>15}: completion lengths {r.lengths.tolist()}; max |log p| error vs teacher-forced "
          f"{engine_errors[name]['teacher-forced']:.1e}, vs each row alone {alone_err:.1e}; same tokens as the "
          f"uncached reference: {engine_errors[name]['same tokens as uncached']}")

# %% [markdown]
# How much faster is the cache? On GRPO's own workload (32 prompts x 8 samples, 64 new tokens, the base model's shape),
# a side-by-side run is in `benchmarks/rollout.py` (speeds are not asserted in chapters). Here we only count the work:
# the uncached loop runs the whole sequence every step, so it processes about $P\cdot n + n^2/2$ token positions per
# row against the engine's $P + n$. Step $i$ of the uncached loop runs $P + i$ positions, so over $n$ steps
#
# $$\sum_{i=1}^{n} (P + i) = P n + \frac{n(n+1)}{2} \quad\text{against}\quad P + n,$$
#
# an identity, not a timing. The gap grows with the length of the completion, which is why it matters more for
# DeepSeek-R1 (chains of "hundreds to thousands" of tokens) than here, and why the cache's size per token, the subject
# of chapter 03's MLA, is a cost of RL as much as of serving.

# %%
P_avg, n_new = 14, 64
work_ratio = (P_avg * n_new + n_new * (n_new + 1) / 2) / (P_avg + n_new)
print(f"token positions processed per row, uncached / cached: {work_ratio:.1f}x (prompt {P_avg}, {n_new} new tokens)")

# %% [markdown]
# ## 2. Rewards: `dslib.rewards`
#
# DeepSeek-R1-Zero is trained with two rule-based rewards (R1, section 2.2.2): **accuracy** (is the final answer right,
# checked by rules) and **format** (is the reasoning inside the think tags and the answer inside the answer tags). No
# neural reward model, so nothing to hack but the rules. Two safety properties matter when a policy writes the input: the
# answer is parsed with a regular expression and compared as an integer (never `eval`), and a reward never raises on any
# string, because one exception would stop a training run. Weights: 1 for a correct answer and 0.1 for the format, the
# pre-study's recipe. The reward of completion $o_i$ of problem $q$ is
#
# $$r_i = 1.0 \cdot \mathbb 1[\text{the first } \texttt{<answer>} \text{ of } o_i \text{ equals } q\text{'s answer}]
# + 0.1 \cdot \mathbb 1[o_i \text{ is } \textit{reasoning}\ \texttt{</think> <answer> N </answer>}],$$
#
# so it takes one of four values: 0, 0.1, 1 or 1.1. Only differences inside a group reach the gradient (section 3), so
# the format term matters where the group disagrees about the format, and the accuracy term dominates where it
# disagrees about the answer. The prompt ends with `<think>`, so the format asks the model to close the think tag, give
# one integer in the answer tags, and stop; the engine stops at `</answer>`, a single token in this world.

# %%
#| export rewards
"""Rule-based rewards on the arithmetic world: accuracy (the <answer> parsed safely and checked) and format (the think
and answer tags), combined with weights; room for more parts (chapter 05)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

from dslib.world import Problem, parse_answer

# A completion of a prompt that ends at <think>: reasoning without tags, then "</think> <answer> N </answer>" and
# nothing after it. DeepSeek-R1's format reward asks for the same two tag pairs (arXiv 2501.12948, section 2.2.2).
_FORMAT_RE = re.compile(r"(?:(?!<think>|</think>|<answer>|</answer>).)*</think> <answer> [0-9]{1,12} </answer>",
                        re.ASCII | re.DOTALL)


def accuracy_reward(completion: object, problem: Problem) -> float:
    """1.0 when the first <answer> of the completion equals the problem's answer, else 0.0. The answer is parsed with
    a regular expression (dslib.world.parse_answer), never evaluated; any input, of any type, gives 0.0 or 1.0."""
    try:
        got = parse_answer(completion)
        return 1.0 if got is not None and got == problem.answer else 0.0
    except Exception:  # never raise: a reward is a number for every string
        return 0.0


def format_reward(completion: object, problem: Problem | None = None) -> float:
    """1.0 when the completion is `reasoning</think> <answer> N </answer>` with no other tags (the prompt opened
    <think>), else 0.0. Never raises."""
    if not isinstance(completion, str):
        return 0.0
    try:
        return 1.0 if _FORMAT_RE.fullmatch(completion) else 0.0
    except Exception:
        return 0.0


def reflects(completion: object) -> bool:
    """Does the reasoning contain the reflection token " wait "? (The aha moment's marker in this world.)"""
    return isinstance(completion, str) and " wait " in completion.split("</think>", 1)[0]


def style_of(completion: object) -> str:
    """"bare" (an empty think), "reflects" (" wait " in the think) or "steps" (other reasoning)."""
    if not isinstance(completion, str) or completion.startswith("</think>"):
        return "bare"
    return "reflects" if reflects(completion) else "steps"

# %% [markdown]
# `reflects` and `style_of` are not rewards: they are the measures that the trainer logs and section 6 reads, since
# this world's transcripts come in three styles (an empty think, plain steps, and a guess followed by " wait " and a
# recomputation). Next, `Rewards` turns named parts into one number per completion. A part that raises scores 0
# rather than stopping the run, and a new part (chapter 07's language consistency) is one more entry in a dict, with
# no change to the trainer.

# %%
#| export rewards
RewardPart = Callable[[object, Problem], float]


@dataclass
class Rewards:
    """A weighted sum of rule-based reward parts: reward = sum_k weight_k * part_k(completion, problem).

    By default DeepSeek-R1-Zero's two rules (arXiv 2501.12948, section 2.2.2) with the pre-study's weights: 1 for a
    correct answer, 0.1 for the format. `parts` maps a name to (function, weight); add one (chapter 06 adds language
    consistency) without touching the trainer."""

    parts: dict[str, tuple[RewardPart, float]] = field(default_factory=lambda: {
        "accuracy": (accuracy_reward, 1.0), "format": (format_reward, 0.1)})

    def __post_init__(self) -> None:
        if not isinstance(self.parts, dict) or not self.parts:
            raise ValueError(f"Rewards.parts={self.parts!r} is invalid: a non-empty dict name -> (fn, weight)")
        for name, value in self.parts.items():
            if not (isinstance(value, tuple) and len(value) == 2 and callable(value[0])
                    and isinstance(value[1], (int, float))):
                raise ValueError(f"Rewards.parts[{name!r}]={value!r} is invalid: a (function, weight) pair")

    def score(self, completions: Sequence[str], problems: Sequence[Problem]) -> dict[str, list[float]]:
        """Each part's value per completion, and "total", the weighted sum."""
        if len(completions) != len(problems):
            raise ValueError(f"{len(completions)} completions for {len(problems)} problems")
        out: dict[str, list[float]] = {}
        total = [0.0] * len(completions)
        for name, (fn, weight) in self.parts.items():
            vals = []
            for c, p in zip(completions, problems):
                try:
                    v = float(fn(c, p))
                except Exception:  # a part that raises scores 0: rewards never stop training
                    v = 0.0
                vals.append(v)
            out[name] = vals
            total = [t + weight * v for t, v in zip(total, vals)]
        out["total"] = total
        return out

# %% [markdown]
# **Check** against the world's own documents: every style of worked solution is well formatted, and the accuracy
# reward agrees with the document's own `correct` flag (slips leave wrong answers). A few hostile strings score 0
# without raising; `tests/test_rewards.py` fuzzes many more with hypothesis.
#
# The world is the right referee because it wrote the documents: it knows each one's answer and whether a slip
# corrupted it, independently of any regular expression. The hostile strings are what a policy under RL pressure can
# produce: code in the answer tags (never evaluated, so it parses as no number), an overflowing float, control
# characters, a doubled closing tag, a thousand opening tags. Look for `True`, and for 0 on the first three (the final
# checks assert both); a doubled closing tag fails the format rule, though the number inside it can still be right.

# %%
import random as _random

world = base_world()
rng = _random.Random(0)
docs = [world.document(world.sample_problem(rng), s, rng) for s in ("bare", "steps", "guess_verify", "slip_fix", "slip")
        for _ in range(200)]
reward_agree = all(accuracy_reward(d.completion, d.problem) == float(d.correct) and format_reward(d.completion) == 1.0
                   for d in docs)
hostile = ["</think> <answer> __import__('os').system('ls') </answer>", "<answer> 1e999 </answer>", "\x00" * 50,
           "</think> <answer> 30 </answer></answer>", "<answer>" * 1000, ""]
hostile_scores = Rewards().score(hostile, [docs[0].problem] * len(hostile))["total"]
print(f"{len(docs)} documents: rewards agree with the world's grading: {reward_agree}; hostile strings score "
      f"{hostile_scores}")

# %% [markdown]
# ## 3. The objective: `dslib.grpo`
#
# Four pieces, in the order the trainer uses them: rewards become **advantages** within each group, the **k3
# estimator** measures the distance to the reference per token, the **loss** combines the clipped ratio and the KL
# with one of three normalisations, and the **trainer** runs Algorithm 1 around them. The option names follow TRL's
# `GRPOConfig` where it has the same option, so a reader can carry a setting from one to the other: `loss_type`
# ("grpo", "dr_grpo", "dapo"), `epsilon` and `epsilon_high`, `beta`, and for the advantages `scale` ("group" or
# "none"), TRL's `scale_rewards`. Two differ in name only: our `group_size` is TRL's `num_generations`, our `mu` its
# `num_iterations`.
#
# **Advantages.** With outcome supervision every token of completion $i$ shares one advantage (DeepSeekMath, section
# 4.1.2). For a group of $G$ rewards $r_1, \dots, r_G$:
#
# $$\hat A_{i,t} = \frac{r_i - \bar r}{s + \epsilon_A}, \qquad \bar r = \frac1G\sum_{j=1}^G r_j, \qquad
# s = \sqrt{\frac{1}{G-1}\sum_{j=1}^G (r_j - \bar r)^2}\quad (\texttt{scale="group"}),$$
#
# with $\epsilon_A = 10^{-4}$ so that a group of nearly equal rewards does not divide by zero. Dr. GRPO (section 3.1)
# points out that dividing by the group's std up-weights questions whose rewards barely differ (too easy or too hard)
# and its fix (section 3.2) keeps only the centring, $\hat A_{i,t} = r_i - \bar r$ (`scale="none"`). A group whose
# rewards are all equal has $\hat A = 0$ either way: it teaches nothing.
#
# The layout is a convention the trainer and the function share: the $b = \text{prompts} \times G$ rewards arrive as
# one vector (b,), and rows $gG$ to $gG + G - 1$ are the $G$ completions of prompt $g$, so `view(-1, G)` recovers the
# groups. The std is the unbiased one ($G - 1$ in the denominator), as `torch.std` computes it; with $G = 8$ this makes
# the advantages a factor $\sqrt{7/8} \approx 0.94$ of those with $G$ in the denominator, the same factor for every
# group. All-equal groups are set to exactly 0, because the mean of equal floats can differ from them by a rounding
# error, and that error divided by $s + \epsilon_A \approx 10^{-4}$ would be a small advantage that is not there.

# %%
#| export
"""Group Relative Policy Optimization (DeepSeekMath, arXiv 2402.03300, section 4): group advantages, the clipped
objective with the k3 KL estimator, the loss normalisations of GRPO, Dr. GRPO and DAPO, and a GRPO trainer (chapter 05)."""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from dslib.checkpoint import StepCheckpoints
from dslib.rewards import Rewards, accuracy_reward, reflects, style_of
from dslib.sampling import Rollout, generate, rollout_logprobs
from dslib.world import Problem, prompt

LOSS_TYPES = ("grpo", "dr_grpo", "dapo")
SCALES = ("group", "none")


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4) -> torch.Tensor:
    """Outcome-supervised advantages (DeepSeekMath, section 4.1.2): rewards (n,) laid out as n / group_size groups of
    consecutive completions of one prompt; A_i = (r_i - mean(group)) / (std(group) + eps).

    scale "group": divide by the group's standard deviation (the unbiased estimate, n - 1 in the denominator, as
    torch.std and common GRPO code compute it); "none": Dr. GRPO's mean-only form (arXiv 2503.20783, section 3.2),
    which does not up-weight groups whose rewards barely differ. A group whose rewards are all equal gets A = 0."""
    if scale not in SCALES:
        raise ValueError(f"scale={scale!r} is invalid: one of {SCALES} is required")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size={group_size!r} is invalid: an int >= 2 is required")
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.dim() != 1 or r.numel() % group_size:
        raise ValueError(f"rewards of shape {tuple(r.shape)} do not split into groups of {group_size}")
    g = r.view(-1, group_size)
    centred = g - g.mean(-1, keepdim=True)
    if scale == "group":
        centred = centred / (g.std(-1, keepdim=True) + eps)
    # All-equal groups get exactly 0 (float rounding of the mean, divided by a tiny std, would leave noise).
    equal = (g == g[:, :1]).all(-1, keepdim=True)
    return torch.where(equal, torch.zeros_like(centred), centred).flatten()

# %% [markdown]
# **The KL estimator.** For tokens drawn from $\pi_\theta$, with $x = \pi_{ref}/\pi_\theta$: $k_1 = -\log x$ is unbiased
# but often negative, $k_2 = (\log x)^2/2$ is never negative but biased, and $k_3 = x - \log x - 1$ is both unbiased
# (since $\mathbb E[x] = 1$, $\mathbb E[k_3] = \mathbb E[k_1]$) and never negative ($x - 1 \ge \log x$).
#
# Both properties take one line each. At a fixed context, with $o \sim \pi_\theta$:
#
# $$\mathbb E[x] = \sum_o \pi_\theta(o)\,\frac{\pi_{ref}(o)}{\pi_\theta(o)} = \sum_o \pi_{ref}(o) = 1, \qquad
# \mathbb E[k_1] = \sum_o \pi_\theta(o)\log\frac{\pi_\theta(o)}{\pi_{ref}(o)}
# = \mathbb{D}_{KL}[\pi_\theta\|\pi_{ref}],$$
#
# so $\mathbb E[k_3] = \mathbb E[x] - 1 + \mathbb E[k_1] = \mathbb D_{KL}$: unbiased. And $\log x \le x - 1$ for
# every $x > 0$ (the logarithm is concave and $x - 1$ is its tangent at $x = 1$), so every single sample of $k_3$ is
# $\ge 0$, with equality only where $\pi_\theta = \pi_{ref}$. This is what DeepSeekMath means by "guaranteed to be
# positive" (eq. 4). $k_3 = k_1 + (x - 1)$ adds to $k_1$ a term with mean zero that moves against it, so it also has
# a smaller variance when the two policies are close; section 4 measures all three.
#
# In code, both arguments are per-token log-probabilities (b, N), and $\log x$ = `ref_logprobs - logprobs`; working
# in logs avoids dividing two small probabilities. Differentiated through `logprobs` as part of the loss, $\beta k_3$
# contributes $\beta(1 - \pi_{ref}/\pi_\theta)$ to each token's gradient coefficient: the
# $\beta(\pi_{ref}/\pi_\theta - 1)$ term of GRPO's row in the unified view of section 5, with the sign of a loss. A
# short calculation with the same sums shows that, in expectation over $o \sim \pi_\theta$, this gradient is the
# gradient of $\mathbb D_{KL}[\pi_{ref}\|\pi_\theta]$, the KL in the other direction: the value is an unbiased
# estimate of one KL, the gradient pulls along another. Both vanish at $\pi_\theta = \pi_{ref}$, and near it they
# agree to first order.

# %%
#| export
def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per sampled token (DeepSeekMath, eq. 4):
    pi_ref/pi_theta - log(pi_ref/pi_theta) - 1. Unbiased for tokens drawn from pi_theta, and never negative
    (x - log x - 1 >= 0)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1

# %% [markdown]
# **The loss.** The same per-token terms, averaged three ways. DeepSeekMath's $\frac1G\sum_i\frac1{|o_i|}\sum_t$
# ("grpo") gives each *completion* the same weight, so a token of a long completion weighs less than a token of a short
# one. Dr. GRPO (section 3.1) shows why that is a bias: for a wrong answer ($A<0$) a longer completion is penalised less
# per token, so wrong answers drift longer; its fix divides the token sum by a constant, (completions x the maximum
# length) ("dr_grpo"). DAPO (section 3.3) divides by the number of tokens in the batch ("dapo"), and raises the upper
# clip (`epsilon_high`, "clip-higher") so that unlikely tokens can grow.
#
# Written out, with the per-token term $\ell_{i,t} = -\min\big(\rho_{i,t}\hat A_i,\ \mathrm{clip}(\rho_{i,t},
# 1-\varepsilon, 1+\varepsilon_{high})\hat A_i\big) + \beta\, k_3(i,t)$ over the $n$ completions of the batch:
#
# $$\mathcal L_{grpo} = \frac1n\sum_{i=1}^n\frac{1}{|o_i|}\sum_{t=1}^{|o_i|}\ell_{i,t}, \qquad
# \mathcal L_{dr\_grpo} = \frac{1}{n\,L_{max}}\sum_{i=1}^n\sum_{t=1}^{|o_i|}\ell_{i,t}, \qquad
# \mathcal L_{dapo} = \frac{1}{\sum_i |o_i|}\sum_{i=1}^n\sum_{t=1}^{|o_i|}\ell_{i,t}.$$
#
# The first is eq. 3 with the sign flipped (a loss to minimise), and $L_{max}$ is `max_completion_length` (the
# trainer passes `max_new_tokens`). Our "dapo" divides by the tokens of the one batch it sees; TRL distinguishes
# "bnpo" (the tokens of the local batch) from "dapo" (the tokens of the whole accumulated batch, across processes),
# and with one process and no accumulation the two are this formula.
#
# **Why the clip is one-sided.** The `min` picks the clipped term only where clipping *lowers* the objective: for
# $\hat A > 0$ once $\rho > 1 + \varepsilon_{high}$, for $\hat A < 0$ once $\rho < 1 - \varepsilon$. There the
# term is constant in $\theta$ and gives no gradient, so a token cannot be pushed further in the direction it has
# already moved on this batch; in the other direction it is never clipped. The clip fraction the loss reports counts
# exactly those tokens. DAPO's clip-higher ($\varepsilon_{high} = 0.28$ against $\varepsilon = 0.2$, section 3.1)
# widens the room on the side where a token's probability grows, which matters most for tokens that start unlikely.
# The explorer of section 10 draws the per-token objective against $\rho$.

# %%
#| export
def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, *, epsilon: float = 0.2, epsilon_high: float | None = None,
              beta: float = 0.04, loss_type: str = "grpo", max_completion_length: int | None = None,
              return_stats: bool = False):
    """The negated GRPO objective (DeepSeekMath, eq. 3), to minimise.

    Per token: ratio = pi_theta / pi_old = exp(logprobs - old_logprobs); the clipped surrogate
    min(ratio A, clip(ratio, 1 - epsilon, 1 + epsilon_high) A) minus beta * k3(pi_theta, pi_ref). logprobs,
    old_logprobs, ref_logprobs and mask are (b, N); advantages is (b,) (one per completion, shared by its tokens).
    epsilon_high: DAPO's clip-higher (arXiv 2503.14476, section 3.1); None uses epsilon on both sides.

    loss_type decides how token terms are averaged:
    - "grpo": DeepSeekMath's 1/G sum_i 1/|o_i| sum_t: the token mean per completion, then the mean over completions;
    - "dr_grpo": the token sum divided by (completions x max_completion_length) (Dr. GRPO, arXiv 2503.20783): every
      token weighs the same, whatever the length of its completion (default max_completion_length: N);
    - "dapo": the token sum divided by the number of tokens in the batch (DAPO's token-level loss, section 3.3).
    With return_stats, also returns a dict: clip fraction, mean k3 KL, mean ratio."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is invalid: one of {LOSS_TYPES} is required")
    if not epsilon >= 0 or (epsilon_high is not None and not epsilon_high >= 0):
        raise ValueError(f"epsilon={epsilon!r} and epsilon_high={epsilon_high!r} must be non-negative")
    if beta != 0 and ref_logprobs is None:
        raise ValueError(f"beta={beta} needs ref_logprobs")
    eps_high = epsilon if epsilon_high is None else epsilon_high
    m = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)[:, None]
    ratio = torch.exp(logprobs - old_logprobs)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - epsilon, 1 + eps_high) * adv)
    per_token = -surrogate
    kl = k3_kl(logprobs, ref_logprobs) if ref_logprobs is not None else torch.zeros_like(logprobs)
    if beta != 0:
        per_token = per_token + beta * kl
    if loss_type == "grpo":
        loss = ((per_token * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    elif loss_type == "dr_grpo":
        length = mask.shape[-1] if max_completion_length is None else max_completion_length
        loss = (per_token * m).sum() / (mask.shape[0] * length)
    else:
        loss = (per_token * m).sum() / m.sum().clamp(min=1)
    if not return_stats:
        return loss
    with torch.no_grad():
        n = m.sum().clamp(min=1)
        clipped = ((ratio < 1 - epsilon) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))
        stats = {"clip_frac": float((clipped.to(m.dtype) * m).sum() / n), "kl": float((kl * m).sum() / n),
                 "ratio": float((ratio * m).sum() / n)}
    return loss, stats

# %% [markdown]
# **Check** against a slow, obvious loop over sequences and tokens, for each loss type, values and gradients (the
# tests repeat this with clip-higher and more).

# %%
def loss_by_hand(lp, old, ref, adv, mask, eps, beta, loss_type, max_len):
    seq_means, token_sum, n_tokens = [], 0.0, 0
    for i in range(lp.shape[0]):
        terms = []
        for t in range(lp.shape[1]):
            if mask[i, t]:
                ratio = torch.exp(lp[i, t] - old[i, t])
                obj = torch.minimum(ratio * adv[i], torch.clamp(ratio, 1 - eps, 1 + eps) * adv[i])
                kl = torch.exp(ref[i, t] - lp[i, t]) - (ref[i, t] - lp[i, t]) - 1
                terms.append(-(obj - beta * kl))
        seq_means.append(sum(terms) / len(terms))
        token_sum, n_tokens = token_sum + sum(terms), n_tokens + len(terms)
    return {"grpo": sum(seq_means) / len(seq_means), "dr_grpo": token_sum / (lp.shape[0] * max_len),
            "dapo": token_sum / n_tokens}[loss_type]


g = torch.Generator().manual_seed(0)
lp0 = torch.randn(4, 6, generator=g) * 0.3 - 1
old, ref = lp0 + torch.randn(4, 6, generator=g) * 0.3, lp0 + torch.randn(4, 6, generator=g) * 0.3
adv = torch.tensor([1.0, -0.5, 0.7, -1.2])
mask = torch.arange(6)[None] < torch.tensor([3, 6, 1, 5])[:, None]
loss_errors = {}
for loss_type in LOSS_TYPES:
    a, b = lp0.clone().requires_grad_(True), lp0.clone().requires_grad_(True)
    fast = grpo_loss(a, old, ref, adv, mask, epsilon=0.2, beta=0.04, loss_type=loss_type, max_completion_length=8)
    slow = loss_by_hand(b, old, ref, adv, mask, 0.2, 0.04, loss_type, 8)
    fast.backward()
    slow.backward()
    loss_errors[loss_type] = max(float((fast - slow).abs()), float((a.grad - b.grad).abs().max()))
    print(f"{loss_type:>8}: loss {fast.item():+.5f} (by hand {slow.item():+.5f}); max gradient error "
          f"{float((a.grad - b.grad).abs().max()):.1e}")

# %% [markdown]
# **The trainer.** Algorithm 1 of DeepSeekMath with the reward model replaced by rules (so there is no reward model to
# retrain either): per step, sample problems, roll out $G$ completions each from the current policy (which is
# $\pi_{\theta_{old}}$ for this batch), score, compute advantages, take $\mu$ gradient steps. The reference model is a
# frozen copy of the start. Its docstring explains a puzzle you will see in the logs: the loss sits near zero while
# the policy learns. `step_record` gathers what each step logs; the checkpoint plumbing (numbered `step-NNNNNN/`
# folders, written atomically, resumed exactly: chapter 06 runs RL long enough to need it) is `dslib.checkpoint`'s
# `StepCheckpoints`, so the trainer's cell holds only the algorithm and its loop.
#
# One step of `train_step`, with the shapes for the default configuration (32 problems, $G = 8$, so $b = 256$ rows):
#
# 1. `problems(step)`: 32 training problems, a pure function of (seed, step);
# 2. `rollout`: each prompt repeated $G$ times, one batched `generate` call; `Rollout` tensors (256, N), with
#    $N \le 64$;
# 3. `Rewards.score` on the decoded texts: rewards (256,), then `group_advantages`: (256,);
# 4. the reference's log-probabilities (256, N), without gradients, when $\beta > 0$ or `log_kl` asks for them;
# 5. $\mu$ times: the policy's log-probabilities (256, N) with gradients, `grpo_loss`, backward, gradient clipping
#    to norm 1, an Adam step;
# 6. `step_record`: one dict of floats appended to `history`.
#
# DeepSeekMath's Algorithm 1 has an outer loop around this one: every so often it resets $\pi_{ref}$ to the current
# policy and retrains the reward model on fresh samples (iterative RL, section 4.1.4). Rules need no retraining, and
# this chapter's runs are short, so the reference stays the starting model throughout.

# %%
#| export
@dataclass
class GRPOConfig:
    """GRPO hyperparameters. Defaults: the pre-study's recipe on the arithmetic world (32 prompts x G = 8, 64 new
    tokens, Adam 2e-4, clip 0.2, one update per batch, beta 0); DeepSeekMath used G = 64, lr 1e-6, beta 0.04, mu = 1."""

    steps: int = 40
    prompts_per_step: int = 32
    group_size: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    lr: float = 2e-4
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    mu: int = 1  # policy updates per batch of rollouts (DeepSeekMath's inner iterations)
    loss_type: str = "grpo"
    scale: str = "group"
    grad_clip: float = 1.0
    seed: int = 0
    log_kl: bool = False  # with beta = 0, still run the reference model to log the KL (one more forward pass)

    def __post_init__(self) -> None:
        def bad(name, allowed):
            raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")
        for name in ("steps", "prompts_per_step", "max_new_tokens", "mu"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, "a positive int is required")
        if not isinstance(self.group_size, int) or self.group_size < 2:
            bad("group_size", "an int >= 2 is required (advantages compare completions within a group)")
        if not self.temperature > 0:
            bad("temperature", "a positive number is required (GRPO samples)")
        if not self.lr > 0:
            bad("lr", "a positive number is required")
        if not self.epsilon >= 0:
            bad("epsilon", "a non-negative number is required")
        if self.epsilon_high is not None and not self.epsilon_high >= 0:
            bad("epsilon_high", "None or a non-negative number is required")
        if not self.beta >= 0:
            bad("beta", "a non-negative number is required")
        if self.loss_type not in LOSS_TYPES:
            bad("loss_type", f"one of {LOSS_TYPES} is required")
        if self.scale not in SCALES:
            bad("scale", f"one of {SCALES} is required")
        if not self.grad_clip >= 0:
            bad("grad_clip", "a non-negative number is required")
        if not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", "a non-negative int is required")
        if not isinstance(self.log_kl, bool):
            bad("log_kl", "True or False is required")

# %% [markdown]
# The defaults differ from DeepSeekMath's in three places, each for the size of the model rather than the method: a
# learning rate of $2 \times 10^{-4}$ instead of $10^{-6}$ (a 0.46M-parameter model trained for a few dozen steps,
# not a 7B one), $G = 8$ instead of 64, and $\beta = 0$. With $\beta = 0$ the reference is not needed for the loss
# at all; `log_kl=True` still runs it, one extra forward pass per step, so that the KL can be watched.
#
# Next, what a step logs. Most entries are plain means over the batch; three need a word. `entropy` is the mean of
# $-\log\pi$ over the sampled tokens, a one-sample estimate of the policy's per-token entropy. `truncated` counts
# completions that hit the length limit before `</answer>` (they cannot score accuracy). `all_equal` is the share of
# groups whose rewards are all the same, which get $\hat A = 0$ and contribute nothing to the gradient.

# %%
#| export
def step_record(step: int, rewards: torch.Tensor, scores: dict, roll: Rollout, texts: list[str], group_size: int,
                stop_id: int, stats: dict, kl_logged: bool, loss: torch.Tensor, grad_norm: torch.Tensor,
                seconds: float) -> dict[str, float]:
    """What GRPOTrainer logs about one step (see its docstring for each entry)."""
    lengths = roll.lengths.float()
    right = torch.tensor(scores["accuracy"], device=lengths.device) > 0
    groups = rewards.view(-1, group_size)
    return {"step": step, "reward": float(rewards.mean()),
            **{f"reward_{k}": sum(v) / len(v) for k, v in scores.items() if k != "total"},
            "accuracy": float(right.float().mean()), "length": float(lengths.mean()),
            "length_right": float(lengths[right].mean()) if right.any() else float("nan"),
            "length_wrong": float(lengths[~right].mean()) if (~right).any() else float("nan"),
            "reflection": sum(reflects(t) for t in texts) / len(texts),
            "truncated": float(roll.truncated([stop_id]).float().mean()),
            "entropy": float(-(roll.logprobs * roll.mask).sum() / roll.mask.sum().clamp(min=1)),
            "all_equal": float((groups.max(-1).values == groups.min(-1).values).float().mean()),
            "kl": stats["kl"] if kl_logged else float("nan"), "clip_frac": stats["clip_frac"],
            "loss": float(loss.detach()), "grad_norm": float(grad_norm), "seconds": seconds}

# %% [markdown]
# The trainer itself. Read `train_step` first: it is the six steps above. Two lines in it carry the method's subtlety.
# `old = lp.detach() if c.mu == 1 else roll.logprobs` makes the ratio exactly 1 when there is one update per batch
# (TRL does the same), and otherwise compares each later update with the sampler. The rollout's seed,
# `c.seed * 1_000_003 + self.step`, like the problems, depends only on (seed, step); together with the optimizer and
# RNG states saved in each checkpoint, this is what lets `resume()` continue to the same numbers as an uninterrupted
# run. `fit` checkpoints at step 0, every `checkpoint_every` steps, at the end, and on Ctrl-C; each checkpoint is
# written before the optional evaluation `on_checkpoint` runs, so an evaluation that crashes loses no training.

# %% [markdown]
# Three things the trainer does that its code does not make obvious:
#
# - **Why the logged loss sits near zero while the policy learns.** In the first update on a batch,
#   $\pi_\theta = \pi_{old}$, so every ratio is 1 and the loss is $-\mathrm{mean}(\hat A)$ (per completion for
#   `"grpo"`), and group advantages have mean 0 in every group. Its gradient is not zero: it is
#   $-\mathrm{mean}_i\, \hat A_i \nabla \log \pi(o_i)$, which raises the probability of above-average completions and
#   lowers that of the others. The loss's value says nothing about progress; the reward does. With $\mu = 1$ the old
#   log-probabilities are the current ones, detached (so the ratio is exactly 1, as TRL does).
# - **What `history` records, per step:** the reward and each of its parts, accuracy, response length (tokens; all,
#   right and wrong), reflection rate, truncation rate (completions that hit `max_new_tokens` without closing
#   `</answer>`: they score no accuracy), entropy (the mean of $-\log\pi$ over sampled tokens, a Monte Carlo estimate
#   of the per-token entropy), the share of groups whose rewards are all equal (they get $\hat A = 0$ and give no
#   gradient), the k3 KL to the reference, the clip fraction, the loss, the gradient norm and the seconds.
# - **Checkpoints.** With `checkpoint_dir`, `fit` writes `step-NNNNNN/` folders (model, optimizer, RNG states, step,
#   history and evaluations; each written under a temporary name and renamed, so a crash never leaves a torn one) at
#   step 0, every `checkpoint_every` steps, at the end and on Ctrl-C. `resume()` continues from the latest one, to the
#   same numbers as a run that was never stopped (problems and rollout seeds are pure functions of (seed, step)).

# %%
#| export
class GRPOTrainer(StepCheckpoints):
    """GRPO (DeepSeekMath, Algorithm 1) on the arithmetic world, with no value model: each step samples
    `group_size` completions of `prompts_per_step` training problems from the current policy (pi_old for this batch),
    scores them with the rule-based rewards, turns the rewards into group advantages and takes `mu` gradient steps on
    the clipped objective; a frozen copy of the starting model is pi_ref (for the KL term when beta > 0, and for
    logging the KL when config.log_kl). The text above the class explains the logged loss, the history and the
    checkpoints."""

    def __init__(self, model: torch.nn.Module, world, config: GRPOConfig | None = None, rewards: Rewards | None = None,
                 ref_model: torch.nn.Module | None = None, checkpoint_dir: str | Path | None = None,
                 checkpoint_every: int = 10, after_backward: Callable | None = None):
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={checkpoint_every!r} is invalid: a positive int is required")
        self.after_backward = after_backward  # (model): between backward and clipping, as Trainer's
        self.model, self.world = model.requires_grad_(True), world  # the policy trains, whatever it was copied from
        self.config = config or GRPOConfig()
        self.rewards = rewards or Rewards()
        self.ref = ref_model if ref_model is not None else copy.deepcopy(model)
        self.ref.eval().requires_grad_(False)
        self.device = next(model.parameters()).device
        self.optimizer = torch.optim.Adam(model.parameters(), lr=self.config.lr)
        self.tokenizer = world.tokenizer
        self.stop_id = self.tokenizer.id("</answer>")
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.step = 0
        self.history: dict[str, list] = {}
        self.evals: list[dict] = []  # what on_checkpoint returned, with its step

    def problems(self, step: int) -> list[Problem]:
        """The training problems of a step: a pure function of (seed, step), never a held-out problem."""
        rng = random.Random(f"grpo-{self.config.seed}-{step}")
        return [self.world.sample_problem(rng) for _ in range(self.config.prompts_per_step)]

    def rollout(self, problems: Sequence[Problem], seed: int) -> tuple[Rollout, list[str]]:
        c = self.config
        prompts = [self.tokenizer.encode(prompt(p), bos=True) for p in problems for _ in range(c.group_size)]
        r = generate(self.model, prompts, c.max_new_tokens, temperature=c.temperature, stop_ids=[self.stop_id],
                     pad_id=self.tokenizer.pad_id, seed=seed)
        return r, r.texts(self.tokenizer)

    def train_step(self) -> dict[str, float]:
        c = self.config
        t0 = time.time()
        problems = self.problems(self.step)
        roll, texts = self.rollout(problems, seed=c.seed * 1_000_003 + self.step)
        expanded = [p for p in problems for _ in range(c.group_size)]
        scores = self.rewards.score(texts, expanded)
        rewards = torch.tensor(scores["total"], device=self.device)
        adv = group_advantages(rewards, c.group_size, c.scale).to(self.device)
        ref_lp = None
        if c.beta > 0 or c.log_kl:
            with torch.no_grad():
                ref_lp = rollout_logprobs(self.ref, roll, c.temperature)
        self.model.train()
        for _ in range(c.mu):
            lp = rollout_logprobs(self.model, roll, c.temperature)
            old = lp.detach() if c.mu == 1 else roll.logprobs
            loss, stats = grpo_loss(lp, old, ref_lp, adv, roll.mask, epsilon=c.epsilon,
                                    epsilon_high=c.epsilon_high, beta=c.beta, loss_type=c.loss_type,
                                    max_completion_length=c.max_new_tokens, return_stats=True)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.after_backward is not None:
                self.after_backward(self.model)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                       c.grad_clip if c.grad_clip > 0 else float("inf"))
            self.optimizer.step()
        self.model.eval()
        rec = step_record(self.step + 1, rewards, scores, roll, texts, c.group_size, self.stop_id, stats,
                          ref_lp is not None, loss, grad_norm, time.time() - t0)
        for k, v in rec.items():
            self.history.setdefault(k, []).append(v)
        self.step += 1
        return rec

    def fit(self, steps: int | None = None, progress: bool = True, on_checkpoint: Callable | None = None
            ) -> dict[str, list]:
        """Run `steps` more GRPO steps (default: up to config.steps) and return the history. The loop's plumbing
        (progress bar, checkpoints, on_checkpoint evaluations, Ctrl-C) is StepCheckpoints.run_steps."""
        until = self.config.steps if steps is None else self.step + steps
        return self.run_steps(until, lambda r: dict(reward=f"{r['reward']:.2f}", acc=f"{r['accuracy']:.2f}",
                                                    len=f"{r['length']:.1f}"), "GRPO", progress, on_checkpoint)

# %% [markdown]
# Finally an evaluation helper: accuracy, length, reflection rate and accuracy by style on the held-out problems, with
# the batched engine (greedy or sampled).

# %%
#| export
@torch.no_grad()
def evaluate_policy(model: torch.nn.Module, world, problems: Sequence[Problem] | None = None,
                    temperature: float = 1.0, seed: int = 0, max_new_tokens: int = 64,
                    batch_size: int = 400) -> dict:
    """Accuracy, mean response length (tokens), reflection rate and accuracy by style on problems (default: the
    world's held-out set), sampled at `temperature` (0: greedy) with the batched engine."""
    problems = world.heldout if problems is None else list(problems)
    tok = world.tokenizer
    texts, lengths = [], []
    for s in range(0, len(problems), batch_size):
        chunk = problems[s:s + batch_size]
        r = generate(model, [tok.encode(prompt(p), bos=True) for p in chunk], max_new_tokens,
                     temperature=temperature, stop_ids=[tok.id("</answer>")], pad_id=tok.pad_id, seed=seed + s)
        texts += r.texts(tok)
        lengths += r.lengths.tolist()
    right = [accuracy_reward(t, p) > 0 for t, p in zip(texts, problems)]
    styles = [style_of(t) for t in texts]
    by_style = {}
    for st in ("bare", "steps", "reflects"):
        idx = [i for i, x in enumerate(styles) if x == st]
        by_style[st] = {"share": len(idx) / len(texts), "accuracy": sum(right[i] for i in idx) / max(1, len(idx))}
    n = len(texts)
    return {"accuracy": sum(right) / n, "length": sum(lengths) / n, "reflection": sum(reflects(t) for t in texts) / n,
            "by_style": by_style, "texts": texts, "right": right}

# %% [markdown]
# ## 4. Experiment: k3 is an unbiased, never negative estimate of KL
#
# Random categorical distributions over 8 outcomes, policy $p$ and reference $q$ at growing distances. For each pair we
# compute the exact $\mathrm{KL}(p\|q)$, and the three estimators on 4,000 samples from $p$.
#
# Sample means carry sampling noise, so the bias of $k_3$ is measured without it: `E_k3` is the exact expectation
# $\sum_o p(o)\,k_3(o)$, which section 3's derivation says equals the KL up to float rounding. The sample means show
# the rest: how far $k_2$ sits from the diagonal as the distributions move apart, how often a single $k_1$ sample is
# negative (a per-token penalty that *rewards* moving away from the reference), and the smallest single $k_3$ sample.

# %%
def kl_estimators(n_pairs: int = 40, n_samples: int = 4000, seed: int = 0) -> dict[str, np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for k in range(n_pairs):
        spread = 0.2 + 2.0 * k / n_pairs
        p = (torch.randn(8, generator=g) * spread).softmax(0)
        q = (torch.randn(8, generator=g) * spread).softmax(0)
        exact = float((p * (p / q).log()).sum())
        x = torch.multinomial(p, n_samples, replacement=True, generator=g)
        lp, lq = p.log()[x], q.log()[x]
        k1 = lp - lq
        k2 = 0.5 * (lq - lp) ** 2
        k3 = k3_kl(lp, lq)
        exp_k3 = float((p * k3_kl(p.log(), q.log())).sum())  # exact expectation of k3 under p
        rows.append((exact, float(k1.mean()), float(k2.mean()), float(k3.mean()), exp_k3,
                     float((k1 < 0).float().mean()), float(k3.min()), float(k1.std()), float(k3.std())))
    cols = ("exact", "k1", "k2", "k3", "E_k3", "k1_negative", "k3_min", "k1_std", "k3_std")
    return {c: np.array(v) for c, v in zip(cols, zip(*rows))}


kl = kl_estimators()
k3_bias = float(np.abs(kl["E_k3"] - kl["exact"]).max())
k2_bias = float(np.mean(kl["k2"] - kl["exact"]))
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
lim = kl["exact"].max() * 1.1
for name, marker in (("k1", "x"), ("k2", "^"), ("k3", "o")):
    axes[0].scatter(kl["exact"], kl[name], s=14, marker=marker, label=name)
axes[0].plot([0, lim], [0, lim], color="gray", lw=0.8)
axes[0].set_xlabel("exact KL(p || q)")
axes[0].set_ylabel("estimate (mean of 4,000 samples)")
axes[0].legend()
axes[0].set_title("k1 and k3 are unbiased; k2 is not")
axes[1].scatter(kl["exact"], kl["k1_negative"], s=14, label="share of k1 samples < 0")
axes[1].scatter(kl["exact"], kl["k3_min"], s=14, label="smallest k3 sample")
axes[1].set_xlabel("exact KL(p || q)")
axes[1].legend()
axes[1].set_title("single-sample values: k3 is never negative")
plt.tight_layout()
plt.show()
print(f"max |E[k3] - KL| over {len(kl['exact'])} pairs: {k3_bias:.1e}; k2's mean bias {k2_bias:+.3f}; k3 samples "
      f">= 0: {bool((kl['k3_min'] >= 0).all())}; k1 samples negative in up to {kl['k1_negative'].max():.0%}; "
      f"std of k3 / std of k1 (mean): {np.mean(kl['k3_std'] / kl['k1_std']):.2f}")

# %% [markdown]
# What to read in the printout. The first number is an identity checked in floating point: anything above about
# $10^{-6}$ would mean `k3_kl` is not eq. 4's estimator (swapping its two arguments is the easy mistake). The last
# number compares the spreads of the two unbiased estimators: below 1, $k_3$ reaches the same mean with less noise per
# token. It is an average over all 40 pairs; the variance argument of section 3 is about pairs that are close, which
# is where an RL run with a KL penalty stays.

# %% [markdown]
# ## 5. Experiment: the unified view (DeepSeekMath, section 5.2.1)
#
# The paper writes the gradient of every method it compares as one sum,
#
# $$\nabla_\theta\mathcal J = \mathbb E_{(q,o)\sim\mathcal D}\Big[\frac{1}{|o|}\sum_t GC_{\mathcal A}(q, o, t,
# \pi_{rf})\,\nabla_\theta\log\pi_\theta(o_t\mid q, o_{<t})\Big],$$
#
# so methods differ in three things only: the **data source** $\mathcal D$ (fixed human data, samples of the SFT model,
# samples of the current policy), the **reward function** $\pi_{rf}$ (none, a rule, a reward model) and the **gradient
# coefficient** $GC$:
#
# | method | data | gradient coefficient |
# |---|---|---|
# | SFT | human demonstrations | 1 |
# | RFT | samples of the SFT model | 1 if correct, else 0 |
# | online RFT | samples of the policy | 1 if correct, else 0 |
# | DPO | pairs sampled from the SFT model | $\sigma(\beta\log\frac{\pi(o^-)}{\pi_{ref}(o^-)} - \beta\log\frac{\pi(o^+)}{\pi_{ref}(o^+)})$, $\pm$ |
# | PPO | samples of the policy | $A_t$ (from a critic) |
# | GRPO | samples of the policy | $\hat A_{i,t} + \beta(\frac{\pi_{ref}}{\pi_\theta} - 1)$ |
#
# A toy problem makes them concrete: one question, a policy over 6 one-token answers (2 of them correct), a policy
# that has already drifted from its reference. For each method we compute the **expected** gradient coefficient each
# answer receives (data probability x coefficient) and the first-order change of $P(\text{correct})$ after a unit
# step along the expected gradient of the logits. For GRPO we do not use the formula: we sample groups, run
# `grpo_loss` and read the gradient off autograd, and check it against the formula.

# %%
K, correct = 6, torch.tensor([0, 1, 0, 0, 1, 0], dtype=torch.bool)
logits_ref = torch.tensor([1.0, 0.2, 0.8, 0.0, -0.5, 0.4])
logits_pi = logits_ref + torch.tensor([0.3, 0.4, -0.2, 0.1, 0.0, -0.3])
pi, pi_ref = logits_pi.softmax(0), logits_ref.softmax(0)
r = correct.float()
BETA_TOY = 0.04


def expected_coefficients() -> dict[str, torch.Tensor]:
    """Expected gradient coefficient on each answer: sum over the data of P(data) x GC."""
    coef = {}
    human = torch.zeros(K)
    human[1] = 1.0  # a human writes answer 1, a correct one
    coef["SFT"] = human
    coef["RFT"] = pi_ref * r  # samples of the SFT (reference) model, kept when correct
    coef["online RFT"] = pi * r
    # DPO: pairs (o+, o-) drawn from the reference model, one correct and one wrong.
    dpo = torch.zeros(K)
    lr_ratio = (pi / pi_ref).log()
    for i in range(K):
        for j in range(K):
            if correct[i] and not correct[j]:
                w = pi_ref[i] * pi_ref[j]
                s = torch.sigmoid(0.1 * lr_ratio[j] - 0.1 * lr_ratio[i])
                dpo[i] += w * s
                dpo[j] -= w * s
    coef["DPO"] = dpo
    value = (pi * r).sum()  # a perfect critic: V(q) = E_pi[r]
    coef["PPO (ideal critic)"] = pi * (r - value)
    return coef


coefs = expected_coefficients()

# GRPO from autograd: G samples per group, many groups, the loss's gradient on each sampled token's log-prob.
G_TOY, N_GROUPS = 8, 4000
gen = torch.Generator().manual_seed(0)
samples = torch.multinomial(pi, G_TOY * N_GROUPS, replacement=True, generator=gen)
lp = pi.log()[samples].clone().requires_grad_(True)
adv_toy = group_advantages(r[samples], G_TOY)
loss = grpo_loss(lp[:, None], lp.detach()[:, None], pi_ref.log()[samples][:, None], adv_toy,
                 torch.ones(len(samples), 1, dtype=torch.bool), beta=BETA_TOY)
(grad_lp,) = torch.autograd.grad(loss, lp)
gc_autograd = -grad_lp * len(samples)  # one token per output, mean over outputs: GC = -N dL/dlogp
gc_formula = adv_toy + BETA_TOY * (pi_ref[samples] / pi[samples] - 1)
gc_error = float((gc_autograd - gc_formula).abs().max())
grpo_coef = torch.zeros(K).index_add_(0, samples, gc_autograd) / len(samples)
coefs["GRPO"] = grpo_coef


def p_correct_change(c: torch.Tensor) -> float:
    """d P(correct) along the logit gradient sum_o c_o (e_o - pi) (the gradient of log-softmax)."""
    g_logits = c - pi * c.sum()
    jac = torch.diag(pi) - pi[:, None] * pi[None, :]  # d pi / d logits
    return float((jac @ g_logits)[correct].sum())


fig, ax = plt.subplots(figsize=(10, 3.4))
width = 0.13
for k, (name, c) in enumerate(coefs.items()):
    ax.bar(np.arange(K) + (k - 2.5) * width, c.numpy(), width, label=f"{name}: dP(correct) {p_correct_change(c):+.3f}")
ax.axhline(0, color="gray", lw=0.6)
ax.set_xticks(range(K), [f"answer {i}\n{'correct' if correct[i] else 'wrong'}\npi={pi[i]:.2f}" for i in range(K)])
ax.set_ylabel("expected gradient coefficient")
ax.set_title("One toy question, six methods: who pushes which answer up or down")
ax.legend(fontsize=7, ncol=2)
plt.tight_layout()
plt.show()
print(f"GRPO coefficient from autograd vs the paper's formula A + beta (pi_ref/pi - 1): max error {gc_error:.1e}")
print(f"GRPO's expected coefficients vs an ideal critic's (r - E[r]): correlation "
      f"{float(np.corrcoef(coefs['GRPO'].numpy(), coefs['PPO (ideal critic)'].numpy())[0, 1]):.3f}")

# %% [markdown]
# What the picture shows, by construction of the coefficients: SFT and RFT only ever push up (their coefficients are
# 1 or 0); online RFT too, but on the policy's own samples. DPO, PPO and GRPO can also push **down** on wrong
# answers, because their coefficients are negative there.
#
# GRPO's group mean is meant as a sampled stand-in for the critic's baseline $\mathbb E_\pi[r]$. Without the std
# scaling the relation is exact in expectation: for a fixed output $o_i$, averaging over the other $G - 1$ samples of
# its group,
#
# $$\mathbb E\big[r_i - \bar r\big] = r_i - \frac{r_i + (G-1)\,\mathbb E_\pi[r]}{G} = \frac{G-1}{G}\big(r_i -
# \mathbb E_\pi[r]\big),$$
#
# the ideal critic's advantage shrunk by a constant (the group mean includes $o_i$ itself). The std scaling changes the
# size per question, and $\beta$ adds a pull toward the reference, so with both the relation is no longer exact: the
# correlation printed under the plot says how close GRPO's expected coefficients stay to the ideal critic's here. A
# value near 1 would mean the group does a critic's job on this question, without a critic to train.

# %% [markdown]
# ## 6. Experiment: GRPO on the course's base model
#
# The base model is pretrained by chapter 00's recipe, longer (width 96, 4 layers, 2,400 steps of 20 packed rows,
# about 4M tokens, loss on the responses only); `dslib.pretrained.base_model()` builds it once (a few minutes on two
# cores) and loads it from the local cache afterwards. Chapter 06 starts from the same model.
#
# Before RL, as the pre-study advises, we measure what the base model can do, greedy and sampled, and **by style**:
# RL can only amplify a route that already works.

# %%
policy = base_model(seed=0, device=device)
info = base_model_info(0)
print(f"base model: {policy.num_params():,} parameters, held-out loss {info.get('heldout_loss', float('nan')):.3f}, "
      f"built in {info.get('build_seconds', float('nan')):.0f} s on first use")
t0 = time.time()
base_greedy = evaluate_policy(policy, world, temperature=0.0)
base_sampled = evaluate_policy(policy, world, temperature=1.0, seed=0)
print(f"held-out accuracy: greedy {base_greedy['accuracy']:.1%}, sampled (T=1) {base_sampled['accuracy']:.1%}; "
      f"sampled mean length {base_sampled['length']:.1f} tokens, reflection rate {base_sampled['reflection']:.1%} "
      f"({time.time() - t0:.1f} s)")
for s, v in base_sampled["by_style"].items():
    print(f"  sampled, {s:>8}: {v['share']:5.1%} of completions, accuracy {v['accuracy']:.1%}")
print("greedy styles:", {s: f"{v['share']:.0%}" for s, v in base_greedy["by_style"].items()})

# %% [markdown]
# Two things to read in this printout. Greedy decoding follows the corpus's most common style, and in this world's
# corpus that is "bare" (an empty think, the answer at once): the greedy style line shows whether the base model does
# the same. Then compare the accuracy by style among sampled completions. GRPO can only reinforce what it samples, so
# the route it can find is the one that is both sampled often enough to appear in groups and right more often than
# the others. If the reflective completions (a guess, " wait ", a recomputation) are right far more often than the
# bare ones, a group with one reflective right answer and seven bare wrong ones gives the reflective tokens a large
# positive advantage, and that is the route the run below should move toward.
#
# Now GRPO with the pre-study's recipe: 32 problems x G = 8 completions per step, at most 64 new tokens, reward 1 for
# a correct answer + 0.1 for the format, group-std advantages, clip 0.2, one update per batch, Adam at 2e-4,
# $\beta = 0$ (`log_kl=True` runs the reference model anyway, to log the KL). Training problems are drawn fresh each
# step and never from the held-out set.

# %%
RL = dslib.sized(small=dict(steps=24), full=dict(steps=200))
grpo_model = copy.deepcopy(policy)
trainer = GRPOTrainer(grpo_model, world, GRPOConfig(steps=RL["steps"], loss_type="grpo", seed=0, log_kl=True))
t0 = time.time()
hist = trainer.fit()
grpo_seconds = time.time() - t0
after = evaluate_policy(grpo_model, world, temperature=1.0, seed=0)
after_greedy = evaluate_policy(grpo_model, world, temperature=0.0)
print(f"{RL['steps']} GRPO steps in {grpo_seconds:.0f} s ({grpo_seconds / RL['steps']:.2f} s per step)")
print(f"held-out accuracy (T=1): {base_sampled['accuracy']:.1%} -> {after['accuracy']:.1%}; greedy "
      f"{base_greedy['accuracy']:.1%} -> {after_greedy['accuracy']:.1%}; length {base_sampled['length']:.1f} -> "
      f"{after['length']:.1f} tokens; reflection {base_sampled['reflection']:.1%} -> {after['reflection']:.1%}")

# %%
def smooth(x, k=5):
    x = np.asarray(x, dtype=float)
    return np.convolve(x, np.ones(k) / k, mode="valid"), np.arange(k, len(x) + 1)


fig, axes = plt.subplots(2, 3, figsize=(12, 6))
panels = [("reward", "reward (training batch)"), ("accuracy", "accuracy (training batch)"),
          ("length", "response length (tokens)"), ("reflection", "share with ' wait '"),
          ("all_equal", "groups with all-equal rewards"), ("loss", "loss (orange), k3 KL to the reference (green)")]
for ax, (key, title) in zip(axes.flat, panels):
    ax.plot(hist["step"], hist[key], lw=0.8, alpha=0.5)
    y, x = smooth(hist[key])
    ax.plot(x, y, lw=2)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("GRPO step")
axes.flat[5].plot(hist["step"], hist["kl"], lw=1, label="k3 KL to reference")
axes.flat[5].legend(fontsize=8)
plt.suptitle("GRPO on the base model (32 prompts x G = 8 per step)")
plt.tight_layout()
plt.show()
first, last = np.mean(hist["reward"][:5]), np.mean(hist["reward"][-5:])
print(f"training reward: first 5 steps {first:.3f}, last 5 steps {last:.3f}; loss: mean |loss| "
      f"{np.mean(np.abs(hist['loss'])):.4f}, while the gradient norm averages {np.mean(hist['grad_norm']):.3f}; clip "
      f"fraction max {max(hist['clip_frac']):.3f}; KL to reference {hist['kl'][-1]:.3f} at the end")

# %% [markdown]
# Read the curves together. If the policy moves toward the guess-wait-recompute route, the reward, the response length
# and the share of " wait " rise together, since that route is longer than a bare answer (chapter 06 runs this longer
# and looks at it as R1-Zero's "aha moment"). If the reward rises while the share of " wait " does not, the policy has
# found another route; the accuracy by style in `after["by_style"]` says which.
#
# Two curves behave as they do by construction. The **loss stays near zero**: with one update per batch,
# $\pi_\theta = \pi_{\theta_{old}}$ when the gradient is taken, every ratio is 1, and the loss is minus the mean
# advantage, which group normalisation makes (almost) zero. Its gradient, $-\frac1G\sum_i \hat A_i\nabla\log\pi(o_i)$
# (averaged per completion over its tokens), is not zero. For the same reason the **clip never activates** with
# $\mu = 1$; the final checks assert both. The share of groups with all-equal rewards is the curve to watch for
# waste: those groups give no gradient (section 8), and as the policy gets more problems right, more groups are all
# right. The KL to the reference (logged, not penalised, since $\beta = 0$) says how far the policy has moved; section
# 4's estimator keeps every per-token value of it non-negative.

# %% [markdown]
# ## 7. Experiment: Dr. GRPO's length bias
#
# The same run with `loss_type="dr_grpo"` (the token sum divided by a constant), same seed, same problems. Dr. GRPO
# predicts that under "grpo" **wrong** answers get longer (a long wrong answer is penalised less per token), while
# "dr_grpo" removes that pull. (Its logged loss is not zero by construction: dividing by a constant weighs each
# completion's advantage by its length, so the loss is minus the within-group covariance of advantage and length over
# the maximum length. Adam makes the overall scale of the gradient irrelevant, so the learning rate needs no change.)
#
# Where the bias comes from, in one line. At $\rho = 1$ and $\beta = 0$, the gradient of $\mathcal L_{grpo}$ with
# respect to the log-probability of one token of completion $i$ is $-\hat A_i / (n\,|o_i|)$, and that of
# $\mathcal L_{dr\_grpo}$ is $-\hat A_i / (n\,L_{max})$. Under "grpo" a wrong answer's push-down is shared among its
# tokens, so each token of a long wrong answer is lowered less than each token of a short one, and long wrong answers
# lose probability more slowly; right answers, for the same reason, gain more per token when they are short. Under
# "dr_grpo" every token of every completion has the same weight.
#
# Here the effect competes with a larger one: if the policy moves to the longer reflective style, right and wrong
# answers both grow, under either loss. So compare the two runs with each other, not with the base model: the claim
# is that wrong answers end longer under "grpo" than under "dr_grpo".

# %%
dr_model = copy.deepcopy(policy)
dr_trainer = GRPOTrainer(dr_model, world, GRPOConfig(steps=RL["steps"], loss_type="dr_grpo", seed=0))
dr_hist = dr_trainer.fit()
dr_after = evaluate_policy(dr_model, world, temperature=1.0, seed=0)


def wrong_length(ev: dict) -> float:
    lengths = [len(world.tokenizer.encode(t)) for t, ok in zip(ev["texts"], ev["right"]) if not ok]
    return float(np.mean(lengths)) if lengths else float("nan")


wrong_len = {"base": wrong_length(base_sampled), "grpo": wrong_length(after), "dr_grpo": wrong_length(dr_after)}
right_len = {k: float(np.mean([len(world.tokenizer.encode(t)) for t, ok in zip(ev["texts"], ev["right"]) if ok]))
             for k, ev in (("base", base_sampled), ("grpo", after), ("dr_grpo", dr_after))}
late = slice(-10, None)
train_wrong = {"grpo": float(np.nanmean(hist["length_wrong"][late])),
               "dr_grpo": float(np.nanmean(dr_hist["length_wrong"][late]))}
fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
for name, h in (("grpo", hist), ("dr_grpo", dr_hist)):
    y, x = smooth(h["length_wrong"])
    axes[0].plot(x, y, label=f"{name}: wrong answers")
    y, x = smooth(h["length_right"])
    axes[0].plot(x, y, ls="--", label=f"{name}: right answers")
    y, x = smooth(h["accuracy"])
    axes[1].plot(x, y, label=name)
axes[0].set_title("response length (tokens, training batch)")
axes[1].set_title("accuracy (training batch)")
for ax in axes:
    ax.set_xlabel("GRPO step")
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()
print(f"held-out (T=1) accuracy: grpo {after['accuracy']:.1%}, dr_grpo {dr_after['accuracy']:.1%}")
print("held-out length of wrong answers (tokens): " + ", ".join(f"{k} {v:.1f}" for k, v in wrong_len.items())
      + "; of right answers: " + ", ".join(f"{k} {v:.1f}" for k, v in right_len.items()))
print("training batches, last 10 steps, wrong answers: " + ", ".join(f"{k} {v:.1f}" for k, v in train_wrong.items()))

# %% [markdown]
# If the two runs do not separate in this many steps, the mechanism is still there, and it can be isolated from
# training noise: the weight that one token of a wrong answer ($A = -1$) gets in the gradient, as a function of its
# completion's length, from autograd on `grpo_loss`. By the line above the "grpo" curve is $1/|o|$ and the "dr_grpo"
# curve flat at $1/L_{max}$, so the ratio printed below for 8 against 56 tokens is $56/8 = 7$ by construction: the
# plot checks the implementation against that identity, it does not discover it.

# %%
lengths_axis = np.arange(1, 65)
token_weight = {}
for loss_type in ("grpo", "dr_grpo"):
    m = torch.arange(64)[None] < torch.tensor(lengths_axis)[:, None]
    lp_w = torch.zeros(len(lengths_axis), 64, requires_grad=True)
    l_w = grpo_loss(lp_w, lp_w.detach(), None, -torch.ones(len(lengths_axis)), m, beta=0.0, loss_type=loss_type,
                    max_completion_length=64)
    (gw,) = torch.autograd.grad(l_w, lp_w)
    token_weight[loss_type] = (gw[:, 0] * len(lengths_axis)).numpy()  # push-down on each token, per completion
fig, ax = plt.subplots(figsize=(6, 3))
for k, v in token_weight.items():
    ax.plot(lengths_axis, v, label=k)
ax.set_xlabel("length of the wrong completion (tokens)")
ax.set_ylabel("gradient on each token's log p")
ax.set_yscale("log")
ax.legend()
ax.set_title("per-token penalty of a wrong answer")
plt.tight_layout()
plt.show()
bias_ratio = float(token_weight["grpo"][7] / token_weight["grpo"][55])
print(f"under grpo a token of an 8-token wrong answer is pushed down {bias_ratio:.0f}x harder than one of a 56-token "
      f"wrong answer; under dr_grpo the ratio is {token_weight['dr_grpo'][7] / token_weight['dr_grpo'][55]:.0f}x")

# %% [markdown]
# ## 8. Groups whose rewards are all equal give no gradient
#
# If all $G$ completions of a question score the same (all right, or all wrong), every advantage in the group is 0,
# and so is the group's gradient, whatever the loss type. Measured on one real batch: the gradient of the loss of the
# all-equal groups alone, and of the whole batch with those groups removed, against the whole batch.
#
# With $\beta = 0$ every token term of such a group is $-\min(\rho \cdot 0, \mathrm{clip}(\rho) \cdot 0) = 0$
# whatever $\theta$ is, so the first gradient is exactly zero, not merely small. The second comparison needs one
# correction: "dapo" divides by the number of tokens in the rows it is given, so the loss over the remaining rows is
# rescaled by their share of the batch's tokens before it is compared with the full batch's. (With $\beta > 0$ the
# all-equal groups would still contribute their KL term: they teach nothing about the reward, but they still hold the
# policy near the reference.)

# %%
probe = GRPOTrainer(copy.deepcopy(grpo_model), world, GRPOConfig(seed=1))
probs = probe.problems(0)
roll, texts = probe.rollout(probs, seed=123)
rw = torch.tensor(probe.rewards.score(texts, [p for p in probs for _ in range(8)])["total"])
adv_b = group_advantages(rw, 8)
equal = (rw.view(-1, 8).max(-1).values == rw.view(-1, 8).min(-1).values).repeat_interleave(8)


def grad_of(rows: torch.Tensor) -> torch.Tensor:
    probe.model.zero_grad()
    lp_b = rollout_logprobs(probe.model, roll)
    m = roll.mask & rows[:, None]
    grpo_loss(lp_b, roll.logprobs, None, adv_b, m, beta=0.0, loss_type="dapo").backward()
    return torch.cat([p.grad.flatten() for p in probe.model.parameters()])


g_all, g_equal, g_rest = grad_of(torch.ones_like(equal)), grad_of(equal), grad_of(~equal)
n_tok = roll.mask.sum()
g_rest_scaled = g_rest * roll.mask[~equal].sum() / n_tok  # dapo divides by the tokens of the rows kept
equal_grad_norm = float(g_equal.norm())
rest_error = float((g_all - g_rest_scaled).norm() / g_all.norm())
print(f"{int(equal.sum()) // 8} of {len(probs)} groups have all-equal rewards; the gradient of their loss has norm "
      f"{equal_grad_norm:.1e}; the batch's gradient without them differs from the full one by {rest_error:.1e} "
      f"(relative)")
all_equal_start, all_equal_end = np.mean(hist["all_equal"][:5]), np.mean(hist["all_equal"][-5:])
print(f"share of all-equal groups during the GRPO run: first 5 steps {all_equal_start:.0%}, last 5 steps "
      f"{all_equal_end:.0%}")

# %% [markdown]
# Read the two printed shares against each other. Every all-equal group is $G$ rollouts that were paid for and teach
# nothing; if the share is higher in the last steps than in the first, the run wastes more of each step as it
# improves, because a group of a solved problem is all right. DAPO's **dynamic sampling** (section 3.2) over-samples
# and keeps only groups with mixed rewards, $0 < \#\text{correct} < G$; exercise 3 asks you to add it.
#
# ## 9. No critic: the memory it saves
#
# PPO trains a value model next to the policy, usually initialised from the reward model and as large as the policy;
# GRPO does not. We count the training state of both on our model, in float32 with Adam (weights, gradients and two
# moments for each trained model; weights only for frozen ones), by building the models and counting their tensors.
# The critic is the same transformer with a one-number head.
#
# The answer is nearly fixed by that bookkeeping. With $P$ the policy's parameters and a critic of about the same size,
# GRPO holds $4P$ (the trained policy) $+ P$ (the frozen reference), PPO $4P + 4P + P$: a ratio of about $5/9 \approx
# 56\%$, a little higher because the critic's one-number head is smaller than the vocabulary head it replaces. Rule
# rewards need no reward model in either column; with a neural reward model, both would add one frozen copy. The
# memory is not the whole saving: PPO also runs the critic forward and backward on every token of every rollout, and
# has a second model's training to keep stable.

# %%
def trained_bytes(m: torch.nn.Module) -> int:
    n = sum(p.numel() * p.element_size() for p in m.parameters())
    return 4 * n  # weights, gradients, Adam's two moments


def frozen_bytes(m: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


critic = copy.deepcopy(policy)
critic.lm_head = torch.nn.Linear(policy.config.d_model, 1, bias=False)  # the value head
memory = {
    "GRPO": trained_bytes(policy) + frozen_bytes(trainer.ref),  # policy + frozen reference (rule rewards: no RM)
    "PPO": trained_bytes(policy) + trained_bytes(critic) + frozen_bytes(trainer.ref),  # + the trained critic
}
memory_ratio = memory["GRPO"] / memory["PPO"]
print(f"training state: GRPO {memory['GRPO'] / 1e6:.2f} MB, PPO {memory['PPO'] / 1e6:.2f} MB: GRPO needs "
      f"{memory_ratio:.0%} of PPO's ({critic.num_params():,} critic parameters vs {policy.num_params():,} policy)")

# %% [markdown]
# ## 10. Explorer: advantages and the clipped objective
#
# Type the $G$ rewards of a group: the advantages under each scaling. The sliders set $\varepsilon$ (and DAPO's upper
# $\varepsilon_{high}$) and $\beta$: the per-token objective as a function of the ratio $\pi_\theta/\pi_{old}$ for a
# positive and a negative advantage, with the k3 penalty when $\pi_{ref} = \pi_{old}$.
#
# Things to try: seven right answers and one wrong (`1, 1, 1, 1, 1, 1, 1, 0`), where the std scaling gives the lone
# wrong answer a large negative advantage; all equal rewards, where both bars vanish; $\varepsilon_{high} >
# \varepsilon$, where the flat part of the $A = +1$ curve moves right while the $A = -1$ curve keeps its clip at
# $1 - \varepsilon$; and a large $\beta$, which bends both curves down away from ratio 1.

# %%
def show_objective(rewards="1, 0, 0, 1, 0, 0, 0, 0", epsilon=0.2, epsilon_high=0.2, beta=0.04):
    try:
        rs = torch.tensor([float(x) for x in rewards.replace(";", ",").split(",") if x.strip()])
    except ValueError:
        print("type numbers separated by commas")
        return
    if len(rs) < 2:
        print("a group needs at least 2 rewards")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    a_group, a_none = group_advantages(rs, len(rs)), group_advantages(rs, len(rs), scale="none")
    x = np.arange(len(rs))
    axes[0].bar(x - 0.2, a_group.numpy(), 0.4, label="group std (GRPO)")
    axes[0].bar(x + 0.2, a_none.numpy(), 0.4, label="mean only (Dr. GRPO)")
    axes[0].set_xticks(x, [f"{v:g}" for v in rs.tolist()])
    axes[0].set_xlabel("reward of each completion")
    axes[0].set_title("advantages")
    axes[0].legend(fontsize=8)
    ratio = torch.linspace(0.2, 2.0, 200)
    lp_r = ratio.log()
    for a in (1.0, -1.0):
        surrogate = torch.minimum(ratio * a, ratio.clamp(1 - epsilon, 1 + epsilon_high) * a)
        objective = surrogate - beta * k3_kl(lp_r, torch.zeros(200))
        axes[1].plot(ratio, objective, label=f"A = {a:+.0f}")
    axes[1].axvline(1, color="gray", lw=0.6)
    axes[1].set_xlabel("ratio pi_theta / pi_old")
    axes[1].set_title(f"per-token objective (eps {epsilon}, eps_high {epsilon_high}, beta {beta})")
    axes[1].legend(fontsize=8)
    plt.tight_layout()
    plt.show()


explore(show_objective, rewards="1, 0, 0, 1, 0, 0, 0, 0", epsilon=(0.05, 0.5, 0.05), epsilon_high=(0.05, 0.5, 0.05),
        beta=(0.0, 0.5, 0.02))

# %% [markdown]
# ## 11. Claims ledger
#
# What the papers claim next to what this chapter measured.

# %%
length_bias_holds = bool(wrong_len["grpo"] > wrong_len["dr_grpo"] and train_wrong["grpo"] > train_wrong["dr_grpo"])
ledger = Ledger("05")
ledger.add("GRPO needs no value model: it saves the critic's memory and compute",
           "'obviates the need for additional value function approximation ... significantly reducing training "
           "resources' (DeepSeekMath, section 4.1)",
           f"training state (float32, Adam) {memory['GRPO'] / 1e6:.2f} MB vs PPO's {memory['PPO'] / 1e6:.2f} MB "
           f"({memory_ratio:.0%}), counted from the models' tensors", None,
           "arithmetic on the two set-ups' tensors (no critic, no critic's Adam state), not a measured saving")
ledger.add("The group mean is a baseline like a critic's value",
           "the group's average reward replaces the value function as the baseline (section 4.1.1)",
           f"toy problem: GRPO's expected gradient coefficients correlate "
           f"{float(np.corrcoef(coefs['GRPO'].numpy(), coefs['PPO (ideal critic)'].numpy())[0, 1]):.3f} with a "
           f"perfect critic's", None, "a toy with one-token answers; shows the principle, not a quality comparison")
ledger.add("k3 is an unbiased, never negative KL estimator", "eq. 4 'guaranteed to be positive', unbiased",
           f"max |E[k3] - KL| {k3_bias:.0e} on 40 pairs; no negative sample; k1 negative in up to "
           f"{kl['k1_negative'].max():.0%} of samples", bool(k3_bias < 1e-5 and (kl["k3_min"] >= 0).all()))
ledger.add("GRPO raises the reward of outcome-supervised RL",
           "GSM8K 82.9% -> 88.2%, MATH 46.8% -> 51.7% (DeepSeekMath-Instruct -> RL, Table 5)",
           f"held-out accuracy (T=1) {base_sampled['accuracy']:.1%} -> {after['accuracy']:.1%} in {RL['steps']} steps "
           f"({grpo_seconds:.0f} s); training reward {first:.2f} -> {last:.2f}",
           bool(after["accuracy"] > base_sampled["accuracy"] + 0.1),
           "a 0.46M-parameter model on synthetic arithmetic, not the paper's benchmarks")
ledger.add("GRPO's per-sequence normalisation lengthens wrong answers; dr_grpo removes the bias",
           "response length of incorrect answers keeps growing under GRPO, not under Dr. GRPO (Dr. GRPO, Figure 5)",
           f"wrong answers, held-out: grpo {wrong_len['grpo']:.1f} vs dr_grpo {wrong_len['dr_grpo']:.1f} tokens "
           f"(base {wrong_len['base']:.1f}); training batches: {train_wrong['grpo']:.1f} vs "
           f"{train_wrong['dr_grpo']:.1f}; per-token push-down of a wrong answer {bias_ratio:.0f}x weaker at 56 "
           f"tokens than at 8 under grpo, equal under dr_grpo", length_bias_holds,
           ("wrong answers lengthen under both (the shift to the longer reflective style); "
            if min(wrong_len["grpo"], wrong_len["dr_grpo"]) > wrong_len["base"] else "")
           + "the claim is about the difference"
           + ("" if length_bias_holds else f": not reproduced in {RL['steps']} short steps, where the choice of style "
              "dominates lengths; the mechanism (the per-token weights) is there"))
ledger.add("Groups with all-equal rewards give no gradient",
           "zero advantage -> no gradient; their share grows as accuracy rises (DAPO, section 3.2)",
           f"gradient norm of the all-equal groups' loss {equal_grad_norm:.0e}; their share {all_equal_start:.0%} -> "
           f"{all_equal_end:.0%} over the run", bool(equal_grad_norm < 1e-6 and all_equal_end > all_equal_start))
ledger.show()
saved_to = ledger.save()  # _build/ledger/05.json: `python -m dslib.book ledger` prints every chapter's rows

# %% [markdown]
# ## What this chapter measured
#
# GRPO is PPO with the critic replaced by the group: sample $G$ answers, score them by rules, and push each answer's
# tokens up or down by how much better it did than its siblings. What you built and checked:
#
# - a rollout engine whose padded, cached, batched rows compute what each row would alone, and whose log-probabilities
#   are those of the distribution it sampled from (section 1);
# - rule rewards that parse, never evaluate, and never raise (section 2);
# - group advantages, the k3 estimator (unbiased and never negative, by two one-line identities), and the clipped loss
#   with GRPO's, Dr. GRPO's and DAPO's normalisations, each against a slow loop (sections 3 and 4);
# - a trainer that runs DeepSeekMath's Algorithm 1 with rules in place of the reward model, with numbered
#   checkpoints and an exact resume (which chapter 06 uses).
#
# Some things hold by construction, and the checks assert them: the logged loss is near zero and the clip never acts
# with one update per batch, groups that all agree give no gradient, and "grpo" weighs a token of a wrong answer by
# $1/|o|$. The rest is measured, and the table below is this run's: whether the policy moved from bare guesses toward
# the "guess, wait, recompute" route, whether the reward, the length and the reflection rate rose together, whether
# wrong answers ended longer under "grpo" than under "dr_grpo", and how the share of all-equal groups changed.

# %%
closing = {
    "engine: max |log p - teacher-forced|": f"{max(e['teacher-forced'] for e in engine_errors.values()):.1e}",
    "base model accuracy, greedy / sampled": f"{base_greedy['accuracy']:.1%} / {base_sampled['accuracy']:.1%}",
    "base model accuracy of bare / steps / reflects (sampled)":
        " / ".join(f"{base_sampled['by_style'][s]['accuracy']:.0%}" for s in ("bare", "steps", "reflects")),
    f"after {RL['steps']} GRPO steps, accuracy greedy / sampled":
        f"{after_greedy['accuracy']:.1%} / {after['accuracy']:.1%}",
    "length (tokens) and reflection, base -> GRPO": f"{base_sampled['length']:.1f} -> {after['length']:.1f}, "
                                                    f"{base_sampled['reflection']:.0%} -> {after['reflection']:.0%}",
    "seconds per GRPO step (32 x 8 rollouts)": f"{grpo_seconds / RL['steps']:.2f}",
    "wrong-answer length, grpo vs dr_grpo (held-out)": f"{wrong_len['grpo']:.1f} vs {wrong_len['dr_grpo']:.1f}",
    "all-equal groups, first -> last 5 steps": f"{all_equal_start:.0%} -> {all_equal_end:.0%}",
    "training state, GRPO / PPO": f"{memory_ratio:.0%}",
}
for k, v in closing.items():
    print(f"{k:<58} {v}")

# %% [markdown]
# **Next.** Chapter 06 runs this trainer as DeepSeek-R1-Zero did: RL straight from the base model with rule rewards
# only, long enough to checkpoint, and with the instruments to look for the "aha moment": pass@k and cons@k, the
# reflection rate per response and per problem, and code that finds a wrong guess corrected after " wait ". It also
# asks where the behaviour comes from, by running the same recipe on a base model whose corpus favours plain steps.
#
# ## Exercises
#
# Difficulty: ★ (a few minutes), ★★ (an experiment), ★★★ (a small project).
#
# 1. ★★ **More updates per batch.** Set `mu=4`: the inner loop of DeepSeekMath's Algorithm 1, which the paper ran
#    with $\mu = 1$. Now the ratio moves away from 1: log the clip fraction and the loss. Does the reward rise faster
#    per rollout? Per second?
#
#    <details><summary>Hint</summary>With mu > 1 the trainer compares against the sampler's log-probabilities
#    (`roll.logprobs`), so the second to fourth updates see ratios other than 1 and the clip can act. The history
#    keeps the loss and clip fraction of the last of the four updates.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    t4 = GRPOTrainer(copy.deepcopy(policy), world, GRPOConfig(steps=RL["steps"], mu=4, seed=0))
#    h4 = t4.fit()
#    print(max(h4["clip_frac"]), np.mean(h4["loss"]), np.mean(h4["reward"][-5:]))
#    plt.plot(np.cumsum(hist["seconds"]), hist["reward"], label="mu = 1")
#    plt.plot(np.cumsum(h4["seconds"]), h4["reward"], label="mu = 4")
#    plt.xlabel("seconds")
#    plt.legend()
#    plt.show()
#    ```
#    Expect a clip fraction above 0 and a loss away from 0: after the first update $\pi_\theta \ne \pi_{\theta_{old}}$,
#    and the clip starts to hold back the tokens that have already moved by more than $\varepsilon$. Each batch of
#    rollouts is used four times, so the reward per rollout can rise faster; each step costs three more forward and
#    backward passes, so read the plot against seconds before calling it faster. Rollouts dominate a step's cost when
#    completions are long, which is when reusing them pays most.
#    </details>
#
# 2. ★★ **The KL anchor.** Rerun section 6 with `beta=0.04` (DeepSeekMath's value) and `beta=0.2`. Plot the k3 KL
#    and the held-out accuracy. Suppose $\beta = 0.02$ makes no visible difference to the reward curve: what does the
#    KL you measure say about why?
#
#    <details><summary>Hint</summary>The penalty per token is beta times k3; compare it with the size of an advantage
#    (about 1).</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    runs = {}
#    for b in (0.04, 0.2):
#        t = GRPOTrainer(copy.deepcopy(policy), world, GRPOConfig(steps=RL["steps"], beta=b, seed=0))
#        runs[b] = (t.fit(), evaluate_policy(t.model, world, temperature=1.0, seed=0))
#    plt.plot(hist["step"], hist["kl"], label=f"beta 0: accuracy {after['accuracy']:.0%}")
#    for b, (h, ev) in runs.items():
#        plt.plot(h["step"], h["kl"], label=f"beta {b}: accuracy {ev['accuracy']:.0%}")
#    plt.ylabel("k3 KL to the reference")
#    plt.legend()
#    plt.show()
#    ```
#    The KL term's gradient coefficient is $\beta(\pi_{ref}/\pi_\theta - 1)$ against an advantage of order 1. If the
#    KL at the end of section 6 is of order 0.1 per token, the ratio $\pi_{ref}/\pi_\theta$ is typically within a few
#    tens of percent of 1, and $\beta = 0.02$ contributes a coefficient of order 0.01: too small to change the
#    direction of the update, which is what "no visible difference" means. A large $\beta$ should keep the KL curve
#    lower and slow the rise of the reward, trading progress for staying near the reference.
#    </details>
#
# 3. ★★★ **Dynamic sampling.** Add DAPO's dynamic sampling to `GRPOTrainer`: sample more problems than needed, drop
#    the groups with all-equal rewards, and fill the batch with the others. Compare the accuracy per second.
#
#    <details><summary>Hint</summary>Subclass `GRPOTrainer` and override `train_step`; a `Rollout` is a dataclass of
#    tensors whose first dimension is the row, so a subset of rows is a new `Rollout` of each field indexed by the
#    rows. `fit` reads `reward`, `accuracy` and `length` from the dict that `train_step` returns.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    class DynamicGRPO(GRPOTrainer):
#        def train_step(self):
#            c, G = self.config, self.config.group_size
#            t0 = time.time()
#            problems = self.problems(self.step) + self.problems(10**6 + self.step)  # twice the prompts
#            roll, texts = self.rollout(problems, seed=c.seed * 1_000_003 + self.step)
#            scores = self.rewards.score(texts, [p for p in problems for _ in range(G)])
#            rewards = torch.tensor(scores["total"], device=self.device)
#            groups = rewards.view(-1, G)
#            keep = torch.nonzero(groups.max(-1).values > groups.min(-1).values)[:c.prompts_per_step, 0]
#            rows = (keep[:, None] * G + torch.arange(G, device=self.device)).flatten()
#            sub = Rollout(roll.prompt_ids[rows], roll.prompt_mask[rows], roll.tokens[rows], roll.logprobs[rows],
#                          roll.mask[rows])
#            adv = group_advantages(rewards[rows], G, c.scale)
#            lp = rollout_logprobs(self.model, sub, c.temperature)
#            loss = grpo_loss(lp, lp.detach(), None, adv, sub.mask, epsilon=c.epsilon, beta=0.0,
#                             loss_type=c.loss_type, max_completion_length=c.max_new_tokens)
#            self.optimizer.zero_grad(set_to_none=True)
#            loss.backward()
#            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
#            self.optimizer.step()
#            self.step += 1
#            rec = {"step": self.step, "reward": float(rewards.mean()), "accuracy": float(np.mean(scores["accuracy"])),
#                   "length": float(roll.lengths.float().mean()), "kept_groups": len(keep),
#                   "seconds": time.time() - t0}
#            for k, v in rec.items():
#                self.history.setdefault(k, []).append(v)
#            return rec
#
#
#    hd = DynamicGRPO(copy.deepcopy(policy), world, GRPOConfig(steps=RL["steps"], seed=0)).fit()
#    plt.plot(np.cumsum(hist["seconds"]), hist["accuracy"], label="GRPO")
#    plt.plot(np.cumsum(hd["seconds"]), hd["accuracy"], label="with dynamic sampling")
#    plt.xlabel("seconds")
#    plt.legend()
#    plt.show()
#    ```
#    `problems(10**6 + step)` draws a second, different set of training problems for the same step, so the run stays a
#    pure function of (seed, step). Rollouts now cost about twice as much, but every kept group has a non-zero
#    advantage; `hd["kept_groups"]` shows how many of the 64 groups qualified. Expect dynamic sampling to pay per
#    second only once the share of all-equal groups is large (section 8), and to cost time while it is small.
#    </details>
#
# 4. ★ **Mean-only advantages.** Train with `scale="none"`. Which groups lose weight compared with the std-scaled
#    form?
#
#    <details><summary>Hint</summary>Compute `group_advantages` of a group with one correct answer out of eight, and of
#    one with four out of eight, under both scales.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    one, half = torch.tensor([1.0] + [0.0] * 7), torch.tensor([1.0] * 4 + [0.0] * 4)
#    for r in (one, half):
#        print(group_advantages(r, 8)[0].item(), group_advantages(r, 8, scale="none")[0].item())
#    h_none = GRPOTrainer(copy.deepcopy(policy), world, GRPOConfig(steps=RL["steps"], scale="none", seed=0)).fit()
#    ```
#    Dividing by the std inflates groups whose rewards barely differ (one right out of eight: std 0.35, so the right
#    answer's advantage grows from 0.875 to about 2.5), while a balanced group (std 0.53) grows less (0.5 to about
#    0.94). Mean-only advantages (Dr. GRPO) stop up-weighting the nearly solved and the nearly hopeless questions. With
#    Adam the overall scale does not matter, so what changes in training is the *relative* weight of those questions.
#    </details>
#
# 5. ★★ **A reward hack.** Add a reward part that pays 0.5 for any completion containing " wait ". Train, and measure
#    accuracy and the share of " wait ". What does this say about rewards written as rules?
#
#    <details><summary>Hint</summary>`Rewards(parts={**Rewards().parts, "wait": (lambda c, p: float(reflects(c)),
#    0.5)})`, passed to `GRPOTrainer(..., rewards=...)`.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    hacked = Rewards(parts={**Rewards().parts, "wait": (lambda c, p: float(reflects(c)), 0.5)})
#    th = GRPOTrainer(copy.deepcopy(policy), world, GRPOConfig(steps=RL["steps"], seed=0), rewards=hacked)
#    hh = th.fit()
#    ev = evaluate_policy(th.model, world, temperature=1.0, seed=0)
#    print(f"accuracy {ev['accuracy']:.1%} (rule rewards: {after['accuracy']:.1%}); ' wait ' {ev['reflection']:.0%} "
#          f"({after['reflection']:.0%}); accuracy of reflective completions "
#          f"{ev['by_style']['reflects']['accuracy']:.0%} ({after['by_style']['reflects']['accuracy']:.0%})")
#    ```
#    Expect the share of " wait " to rise faster than under the rule rewards, with nothing to tie it to being right: a
#    completion can say " wait " and still answer wrongly, and it is paid for it. In this world the bonus can point the
#    same way as accuracy (the reflective style ends in a full recomputation), so the hack can look harmless; the
#    telling number is the accuracy of the reflective completions, which falls if the policy learns to say " wait "
#    without doing the recomputation. A rule pays for exactly what it checks; R1 kept to accuracy and format for this
#    reason, and declined a neural reward model because it can be hacked at scale.
#    </details>
#
# 6. ★ **Left padding by hand.** Pad the prompts `[1, 5, 6]` and `[1, 4]`, and predict, before printing them, the
#    positions and row 1's attention mask.
#
#    <details><summary>Hint</summary>Positions count real tokens only, and a pad query may see itself only.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    ids, valid = left_pad([[1, 5, 6], [1, 4]], pad_id=0)
#    print(ids)
#    print(positions_of(valid))
#    print(padded_attention(valid)[1, 0].int())
#    ```
#    `ids` is `[[1, 5, 6], [0, 1, 4]]` and the positions `[[0, 1, 2], [0, 0, 1]]`: row 1's pad gets position 0 (never
#    used) and its real tokens 0 and 1, as they would alone. Row 1's mask, queries down and keys across, is
#    `[[1, 0, 0], [0, 1, 0], [0, 1, 1]]`: the pad query sees only itself, and no real query sees the pad. With right
#    padding instead, row 1's first new token would have to go in column 2 while row 0's goes in column 3.
#    </details>
#
# 7. ★ **k3 by hand.** A token has probability 0.5 under the policy and 0.25 under the reference. Compute $k_1$, $k_3$
#    and the gradient of $k_3$ with respect to the token's log-probability, then check them with `k3_kl`.
#
#    <details><summary>Hint</summary>$x = \pi_{ref}/\pi_\theta = 0.5$; section 3 gives the gradient as
#    $1 - x$.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    lp_token = torch.tensor([math.log(0.5)], requires_grad=True)
#    k = k3_kl(lp_token, torch.tensor([math.log(0.25)]))
#    k.backward()
#    print(k.item(), lp_token.grad.item())
#    ```
#    $k_1 = -\log 0.5 \approx 0.693$, $k_3 = 0.5 - \log 0.5 - 1 \approx 0.193$, and the gradient is $1 - 0.5 = 0.5$:
#    positive, so a loss with $+\beta k_3$ lowers the log-probability of a token the policy likes twice as much as the
#    reference does. A single $k_3$ sample is smaller than the $k_1$ sample here; what they share is the mean over
#    tokens drawn from the policy, not each value.
#    </details>
#
# ## Checks
#
# The chapter's key measurements, asserted (this is what the test suite checks).

# %%
for name, e in engine_errors.items():
    assert e["teacher-forced"] < 1e-4 and e["alone"] < 1e-4 and e["same tokens as uncached"], (name, e)
assert reward_agree and all(s == 0.0 for s in hostile_scores[:3])
assert max(loss_errors.values()) < 1e-5, loss_errors
assert k3_bias < 1e-5 and (kl["k3_min"] >= 0).all() and (kl["k1_negative"] > 0.05).any() and k2_bias > 0
assert gc_error < 1e-5
# GRPO must raise sampled accuracy by 25 points and the reward by 0.15 within the budget: the effect the chapter
# is about, with a margin for seeds and thread counts.
assert after["accuracy"] > base_sampled["accuracy"] + 0.25, (base_sampled["accuracy"], after["accuracy"])
assert last > first + 0.15, (first, last)
assert abs(np.mean(hist["loss"])) < 0.05 and max(hist["clip_frac"]) == 0.0  # mu = 1: loss near 0, no clipping
assert equal_grad_norm < 1e-6 and rest_error < 1e-4
assert bias_ratio > 5 and abs(token_weight["dr_grpo"][7] / token_weight["dr_grpo"][55] - 1) < 1e-6
assert memory_ratio < 0.6  # arithmetic (an identity of the set-ups' tensor counts), a guard on the counting code
print(f"chapter 05 checks passed; {time.time() - CHAPTER_START:.0f} s since set-up")

# %% [markdown]
# The worked solutions that take seconds run here as well, so that the test suite checks them with the chapter:
# exercises 6 and 7. The others run GRPO, and are left to the reader.

# %%
solution_seconds = run_solutions("05", globals(), (6, 7))
print("worked solutions run:", ", ".join(f"exercise {n} ({t:.1f} s)" for n, t in solution_seconds.items()))
