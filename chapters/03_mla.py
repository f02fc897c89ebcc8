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
# # Chapter 03 · Multi-head Latent Attention: a small KV cache without losing quality
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/deepseek-from-scratch/deepseek-from-scratch/blob/main/chapters/03_mla.ipynb)
# [![Binder](https://mybinder.org/badge_logo.svg)](https://mybinder.org/v2/gh/deepseek-from-scratch/deepseek-from-scratch/main?labpath=chapters%2F03_mla.ipynb)
#
# **What you will build.** The attention layer of DeepSeek-V2 and V3, and the arithmetic that motivates it:
#
# 1. the KV-cache accounting of multi-head, grouped-query, multi-query and multi-head latent attention (the paper's
#    Table 1), as a function, checked against the paper's own numbers (section 1);
# 2. `dslib.mla`: `MLAConfig`, the `MLA` layer (query compression, joint key-value compression, decoupled RoPE), a
#    cache `MLACache` that keeps only the latent vectors, two ways to decode from it (*naive*: decompress keys and
#    values; *absorbed*: fold the up-projections into the query and the output and attend in the latent space), and
#    `MLATransformer`, a small language model that trains with `dslib.train` unchanged (section 2);
# 3. a race of MHA, GQA, MQA and MLA at equal parameter counts on the arithmetic world (section 3);
# 4. decoding at growing context lengths: time per token and cache memory (section 4);
# 5. the cache of the real models, DeepSeek-V2 and V3 against DeepSeek 67B and LLaMA-2-70B, and where the paper's
#    "93.3% smaller" comes from (section 5);
# 6. YaRN, the change of RoPE's rotation speeds that takes V2 and V3 from 4K to 128K tokens, as `MLAConfig`'s
#    `rope_scaling` reads it from the released `config.json` files (section 6).
#
# **Why it matters for DeepSeek.** Every attention layer of DeepSeek-V2 (60 of them) and of DeepSeek-V3 (61) is MLA.
# Both models accept contexts of 128k tokens, and MLA is what keeps the cache of such a context small enough to hold
# many sequences on one GPU. Chapter 04 builds its DeepSeek-V3-mini from `dslib.mla`'s `MLA` and `MLACache` as they
# are written here.
#
# **What you need.** Chapter 00: the DeepSeek LLM transformer (`dslib.transformer`: RMSNorm, SwiGLU, RoPE, grouped-query
# attention and its `KVCache`), the arithmetic world and the `Trainer`. A little linear algebra: a product of matrices
# can be grouped either way, $(AB)C = A(BC)$, and the rank of $AB$ is at most the inner dimension. **How long.** The
# chapter is sized to run in under 3 minutes at `small` scale on 2 CPU cores.
#
# **Papers.** DeepSeek-V2 (arXiv 2405.04434), section 2.1 (MLA) and Appendix C (its full formulas); Appendix D (the
# ablations of the attention kinds); section 3.1.4 (long context), with YaRN (arXiv 2309.00071). Names follow
# DeepSeek-V3's reference code (`inference/model.py`), so that you can hold `dslib.mla` next to it.
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

import math
import time

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch

import dslib
from dslib.book import Ledger, run_solutions
from dslib.explore import explore
from dslib.train import TrainConfig, Trainer
from dslib.transformer import KVCache, Transformer, TransformerConfig, rope_cos_sin
from dslib.world import PackedData, World

# One CPU thread at small scale: this chapter's models are so small that a second thread hardly helps, and a single
# thread is much less disturbed by other programs on a shared machine (threads that wait for each other stall).
device = dslib.setup(seed=0, threads=dslib.sized(small=1, full=None))
SCALE = dslib.scale()
CHAPTER_START = time.time()

# %% [markdown]
# ## 1. The problem: the KV cache
#
# A decoder generates one token at a time. To produce token $t$, every layer needs the keys and values of all tokens
# before it, and since they never change, an inference engine keeps them: the **KV cache**. Standard multi-head
# attention (MHA), as V2 writes it in section 2.1.1 (eqs. 1-8), maps the hidden state $h_t \in \mathbb R^d$ of token $t$
# to a query, a key and a value of $n_h d_h$ numbers each, cuts them into $n_h$ heads of $d_h$, and lets head $i$ of
# token $t$ average the values of tokens $j \le t$:
#
# $$q_t = W^Q h_t,\quad k_t = W^K h_t,\quad v_t = W^V h_t,\qquad
#   o_{t,i} = \sum_{j \le t} \mathrm{softmax}_j\Big(\frac{q_{t,i}^\top k_{j,i}}{\sqrt{d_h}}\Big)\, v_{j,i},\qquad
#   u_t = W^O [o_{t,1}; \dots; o_{t,n_h}].$$
#
# Causality is why a cache works: $k_j$ and $v_j$ depend only on token $j$ and the tokens before it, so they are the
# same at every later step. Each layer stores a key and a value of $d_h$ numbers for each of its $n_h$ heads, so
# $2 n_h d_h$ numbers per token per layer; chapter 00's `KVCache` holds them as two tensors of shape
# `(b, n_kv_head, max_len, head_dim)` per layer. Two things follow.
#
# - **Memory.** The cache grows with the context and the batch. DeepSeek 67B (95 layers, 8 key-value heads of 128)
#   keeps 194,560 numbers per token: 380 KiB in BF16, so about 12 GiB for one sequence of 32k tokens. The cache, not the
#   weights, decides how many sequences fit on a GPU at once, and so the throughput.
# - **Time.** Every decoding step reads the whole cache once and does little arithmetic with it. On a GPU, decoding is
#   usually bound by memory bandwidth, and there a smaller cache is a faster step (section 4 looks at when that holds).
#
# Grouped-query attention (GQA) lets $n_h / n_g$ query heads share one key-value head, and multi-query attention (MQA)
# shares a single one among all heads. In the formula above, GQA replaces $k_{j,i}$ and $v_{j,i}$ by
# $k_{j,g(i)}$ and $v_{j,g(i)}$, where $g(i) = \lfloor i\, n_g / n_h \rfloor$ is the group of head $i$; MQA is the case
# $n_g = 1$, MHA the case $n_g = n_h$. The queries keep all $n_h$ heads, so the layer still computes $n_h$ different
# attention patterns; what it loses is the number of different keys and values they can look at. Both shrink the
# cache, and both cost quality: V2's Appendix D.1 trains 7B dense models with the three kinds (same data, parameters
# matched by the number of layers) and finds MHA clearly ahead of GQA and MQA on hard benchmarks. DeepSeek-V2 proposes
# a fourth kind, **Multi-head Latent Attention (MLA)**, and sums up the trade-off in its Table 1 (section 2.1.4):
#
# | attention | KV cache per token | capability (the paper's words) |
# |---|---|---|
# | MHA | $2 n_h d_h l$ | strong |
# | GQA | $2 n_g d_h l$ | moderate |
# | MQA | $2 d_h l$ | weak |
# | MLA | $(d_c + d_h^R)\, l \approx \tfrac92 d_h l$ | stronger |
#
# with $l$ layers, $n_g$ groups, and MLA's latent width $d_c$ and RoPE width $d_h^R$. V2 sets $d_c = 4 d_h$ and
# $d_h^R = d_h / 2$, so MLA caches as much as GQA with 2.25 groups, "while achieving stronger performance than MHA".
#
# The accounting is the first piece of `dslib.mla`.

# %%
#| default_exp mla

# %%
#| export
"""Multi-head Latent Attention (MLA) of DeepSeek-V2 (arXiv 2405.04434, section 2.1 and Appendix C): low-rank joint
key-value compression with decoupled RoPE, a cache of the latent vectors only, naive and weight-absorbed inference, a
small MLA language model, and the KV-cache accounting of the paper's Table 1 (chapter 03)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from dslib.transformer import RMSNorm, SwiGLU, Transformer, apply_rope, forward_inputs, rope_cos_sin

ATTENTION_KINDS = ("MHA", "GQA", "MQA", "MLA")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def kv_cache_elements(kind: str, *, n_head: int | None = None, head_dim: int | None = None,
                      n_kv_head: int | None = None, kv_lora_rank: int | None = None,
                      qk_rope_head_dim: int | None = None) -> int:
    """Elements cached per token per layer, DeepSeek-V2's Table 1 (section 2.1.4):
    MHA 2 n_h d_h; GQA 2 n_g d_h; MQA 2 d_h; MLA d_c + d_h^R.

    n_head is n_h, head_dim d_h, n_kv_head the number of groups n_g, kv_lora_rank d_c and qk_rope_head_dim d_h^R.
    Each kind reads only the arguments its formula needs, and raises ValueError naming a missing or bad one."""
    needs = {"MHA": ("n_head", "head_dim"), "GQA": ("n_kv_head", "head_dim"), "MQA": ("head_dim",),
             "MLA": ("kv_lora_rank", "qk_rope_head_dim")}
    if kind not in needs:
        raise ValueError(f"kind={kind!r} is invalid: one of {ATTENTION_KINDS} is required")
    given = dict(n_head=n_head, head_dim=head_dim, n_kv_head=n_kv_head, kv_lora_rank=kv_lora_rank,
                 qk_rope_head_dim=qk_rope_head_dim)
    for name in needs[kind]:
        if not _is_positive_int(given[name]):
            raise ValueError(f"{name}={given[name]!r} is invalid: the {kind} cache needs it as a positive int")
    if kind == "MHA":
        return 2 * n_head * head_dim
    if kind == "GQA":
        return 2 * n_kv_head * head_dim
    if kind == "MQA":
        return 2 * head_dim
    return kv_lora_rank + qk_rope_head_dim


def bytes_per_element(dtype: torch.dtype | float) -> float:
    """Bytes per cached element: a torch.dtype (torch.bfloat16: 2) or a number of bits (6: 0.75, a quantised cache)."""
    if isinstance(dtype, torch.dtype):
        return float(torch.empty((), dtype=dtype).element_size())
    if isinstance(dtype, (int, float)) and not isinstance(dtype, bool) and dtype > 0:
        return dtype / 8
    raise ValueError(f"dtype={dtype!r} is invalid: a torch.dtype or a positive number of bits is required")


def kv_cache_bytes(kind: str, *, n_layer: int = 1, tokens: int = 1, batch_size: int = 1,
                   dtype: torch.dtype | float = torch.bfloat16, **shape) -> float:
    """Bytes of the KV cache of `batch_size` sequences of `tokens` tokens through `n_layer` layers:
    kv_cache_elements(kind, **shape) * n_layer * tokens * batch_size * bytes_per_element(dtype)."""
    for name, value in (("n_layer", n_layer), ("tokens", tokens), ("batch_size", batch_size)):
        if not _is_positive_int(value):
            raise ValueError(f"{name}={value!r} is invalid: a positive int is required")
    return kv_cache_elements(kind, **shape) * n_layer * tokens * batch_size * bytes_per_element(dtype)

# %% [markdown]
# Checked against the paper's own numbers: DeepSeek-V2 and V3 have $n_h = d_h = 128$, $d_c = 512$ and $d_h^R = 64$,
# so MLA caches 576 numbers per token per layer where MHA of the same shape would cache 32,768; and that is GQA with
# $576 / (2 \cdot 128) = 2.25$ groups. The same cell recomputes the DeepSeek 67B figures quoted above (380 KiB per
# token, about 12 GiB for 32k tokens) from the GQA formula. These are identities of arithmetic, so the asserts are
# exact. The last lines feed the function bad shapes: each kind asks only for the arguments its formula reads, and a
# missing or non-positive one is an error that names it, not a silent default that would make a wrong table look
# right.

# %%
V2 = dict(n_head=128, head_dim=128, kv_lora_rank=512, qk_rope_head_dim=64)
per_layer = {kind: kv_cache_elements(kind, n_kv_head=8, **V2) for kind in ("MHA", "GQA", "MQA", "MLA")}
print("elements per token per layer at V2's shape (GQA with 8 groups):", per_layer)
assert per_layer["MHA"] == 32_768 and per_layer["MLA"] == 576 and per_layer["MQA"] == 256
groups_equivalent = per_layer["MLA"] / (2 * V2["head_dim"])
assert groups_equivalent == 2.25
print(f"MLA = GQA with {groups_equivalent} groups; {per_layer['MHA'] / per_layer['MLA']:.1f}x smaller than MHA")
# DeepSeek 67B (GQA: 95 layers, 8 KV heads of 128) in BF16: the 380 KiB per token and 12 GiB per 32k-token sequence.
kib_67b = kv_cache_bytes("GQA", n_kv_head=8, head_dim=128, n_layer=95) / 2**10
gib_67b_32k = kv_cache_bytes("GQA", n_kv_head=8, head_dim=128, n_layer=95, tokens=32_768) / 2**30
print(f"DeepSeek 67B: {kib_67b:.0f} KiB per token, {gib_67b_32k:.1f} GiB for 32k tokens (BF16)")
assert kib_67b == 380 and round(gib_67b_32k, 1) == 11.9
for bad in (dict(kind="MLA", kv_lora_rank=512), dict(kind="GQA", head_dim=128, n_kv_head=0), dict(kind="MHSA")):
    try:
        kv_cache_elements(**bad)
    except ValueError as e:
        print("ValueError:", e)

# %% [markdown]
# A picture of Table 1 for a small shape, 8 heads of 8 numbers, one layer. Each square is one cached number of one
# token: MHA keeps a key and a value per head, GQA per group, MQA one pair. MLA keeps a latent of $4 d_h$ numbers and
# one RoPE key of $d_h / 2$, from which every head's key and value are re-created.

# %%
def cache_picture(n_head: int = 8, head_dim: int = 8, groups: int = 2) -> None:
    roles = {"key": "tab:blue", "value": "tab:orange", "latent $c^{KV}$": "tab:green", "RoPE key $k^R$": "tab:purple"}
    rows = {
        "MHA": [("key", head_dim)] * n_head + [("value", head_dim)] * n_head,
        f"GQA ({groups} groups)": [("key", head_dim)] * groups + [("value", head_dim)] * groups,
        "MQA": [("key", head_dim), ("value", head_dim)],
        "MLA": [("latent $c^{KV}$", 4 * head_dim), ("RoPE key $k^R$", head_dim // 2)],
    }
    fig, ax = plt.subplots(figsize=(10, 2.8))
    for y, (name, segments) in enumerate(rows.items()):
        x = 0.0
        for role, n in segments:
            for i in range(n):
                ax.add_patch(plt.Rectangle((x + i, -y), 1, 0.7, facecolor=roles[role], edgecolor="white", lw=0.4))
            x += n + 0.6
        total = sum(n for _, n in segments)
        ax.text(-2, -y + 0.35, name, ha="right", va="center", fontsize=9)
        ax.text(x + 1, -y + 0.35, f"{total} numbers", va="center", fontsize=9)
    ax.set_xlim(-16, 2 * n_head * (head_dim + 0.6) + 14)
    ax.set_ylim(-len(rows) + 0.8, 1.3)
    ax.axis("off")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c, label=r) for r, c in roles.items()], ncol=4,
              loc="lower center", fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.12))
    ax.set_title(f"What one layer caches per token: {n_head} heads of {head_dim} (one square per number)", fontsize=10)
    fig.tight_layout()
    plt.show()


cache_picture()

# %% [markdown]
# ## 2. Multi-head Latent Attention, equation by equation
#
# MLA replaces the per-head keys and values by one **latent vector** per token, $c^{KV}_t$ of $d_c$ numbers, from which
# every head's key and value are re-created by up-projections. V2 calls this *low-rank key-value joint compression*
# (section 2.1.2, eqs. 9-11):
#
# $$c^{KV}_t = W^{DKV} h_t,\qquad k^C_t = W^{UK} c^{KV}_t,\qquad v^C_t = W^{UV} c^{KV}_t,$$
#
# with a down-projection $W^{DKV} \in \mathbb R^{d_c \times d}$ and up-projections
# $W^{UK}, W^{UV} \in \mathbb R^{n_h d_h \times d_c}$, and $d_c \ll n_h d_h$ (V2: 512 against 16,384). Read it as a
# constraint on MHA: the key projection is now $W^K = W^{UK} W^{DKV}$, a product whose rank is at most $d_c$, and the
# value projection $W^V = W^{UV} W^{DKV}$ shares the same right factor. *Low-rank* is that bound; *joint* is the shared
# $W^{DKV}$: keys and values of all heads are read out of one $d_c$-dimensional summary of the token. Keeping both
# factors, instead of multiplying them out, is what saves the cache: store $c^{KV}_t$, and any head's key and value can
# be rebuilt from it.
#
# Queries get the same treatment (eqs. 12-13, to save activation memory in training; it does not touch the cache), and
# position enters through extra, decoupled dimensions (section 2.1.3, eqs. 14-19; the next paragraphs say why). The
# whole layer, for a hidden state $h_t \in \mathbb R^d$ (V2, sections 2.1.2-2.1.3 and Appendix C):
#
# $$c^{Q}_t = W^{DQ} h_t,\qquad q^{C}_t = W^{UQ} c^{Q}_t,\qquad q^{R}_t = \mathrm{RoPE}(W^{QR} c^{Q}_t)$$
# $$\boxed{c^{KV}_t = W^{DKV} h_t},\qquad k^{C}_t = W^{UK} c^{KV}_t,\qquad v^{C}_t = W^{UV} c^{KV}_t,
#   \qquad \boxed{k^{R}_t = \mathrm{RoPE}(W^{KR} h_t)}$$
# $$q_{t,i} = [q^{C}_{t,i}; q^{R}_{t,i}],\qquad k_{t,i} = [k^{C}_{t,i}; k^{R}_t],\qquad
#   o_{t,i} = \sum_{j\le t} \mathrm{softmax}_j\Big(\frac{q_{t,i}^\top k_{j,i}}{\sqrt{d_h + d_h^R}}\Big)\, v^{C}_{j,i},
#   \qquad u_t = W^{O}[o_{t,1}; \dots; o_{t,n_h}]$$
#
# Only the boxed vectors are cached: $d_c + d_h^R$ numbers per token per layer. The paper also puts an RMSNorm on each
# latent, $c^Q_t$ and $c^{KV}_t$ (section 3.1.2), as the reference code does.
#
# **Why the decoupled RoPE key.** RoPE (chapter 00) rotates each pair of a query's and a key's features by an angle
# proportional to the token's position: $\mathrm{RoPE}_t(x) = R_t x$ with $R_t$ a block-diagonal rotation. Rotations
# are orthogonal and compose, $R_t^\top R_j = R_{j-t}$, so a score sees only the offset between the two tokens:
#
# $$(R_t q)^\top (R_j k) = q^\top R_{j-t}\, k.$$
#
# Now suppose MLA had rotated the decompressed key $k^C_{j,i} = W^{UK}_i c^{KV}_j$ and the query
# $q^C_{t,i} = W^{UQ}_i c^Q_t$ directly. A score would read
#
# $$q_{t,i}^\top k_{j,i} = c^{Q\top}_t \big(W^{UQ\top}_i\, R_{j-t}\, W^{UK}_i\big)\, c^{KV}_j .$$
#
# The matrix in brackets changes with the offset $j - t$: the rotation sits between $W^{UQ}_i$ and $W^{UK}_i$, and
# matrix products do not commute, so $W^{UK}_i$ can no longer be moved onto the query side once for all cached tokens
# (next paragraph). Decoding would have to decompress every cached key at every step. So MLA leaves $k^C$ and $q^C$
# unrotated and carries position in a few extra dimensions (eqs. 14-17): a query part $q^R_{t,i}$ per head and **one**
# key part $k^R_t$ of $d_h^R$ numbers shared by all heads. The score splits into a position-free part and a RoPE part:
#
# $$q_{t,i}^\top k_{j,i} = q^{C\top}_{t,i}\, k^C_{j,i} + q^{R\top}_{t,i}\, k^R_j .$$
#
# Only the second term sees positions, and it involves no up-projection. One RoPE key per head would multiply that part
# of the cache by $n_h$ (at V2's shape, $128 \cdot 64 = 8{,}192$ numbers instead of 64, more than the 576 of the whole
# MLA cache). The softmax scale becomes $1/\sqrt{d_h + d_h^R}$ because queries and keys are now $d_h + d_h^R$ wide.
#
# **Weight absorption, an identity of matrix products.** Since $k^C$ and $v^C$ are linear in $c^{KV}$, a head's score
# and output can be computed without ever making them. Regroup the products (associativity, then linearity of the sum):
#
# $$q^{C\top}_{t,i}\, k^C_{j,i} = q^{C\top}_{t,i} \big(W^{UK}_i c^{KV}_j\big)
#   = \underbrace{\big(W^{UK\top}_i q^{C}_{t,i}\big)^\top}_{\text{a query in the latent space}} c^{KV}_j,\qquad
#   o_{t,i} = \sum_j p_{t,j,i}\, W^{UV}_i c^{KV}_j = W^{UV}_i \Big(\sum_j p_{t,j,i}\, c^{KV}_j\Big),$$
#
# where $p_{t,j,i}$ are head $i$'s softmax weights. Nothing is approximated: the two sides are equal for any weights,
# and in floating point they differ only by rounding. What changes is the cost. On the left, every cached token $j$ is
# multiplied by $W^{UK}_i$ and $W^{UV}_i$ at every step, $d_c (d_h + d_h^v)$ multiply-adds per head, a cost that grows
# with the context. On the right, the query is multiplied by $W^{UK\top}_i$ once per step ($d_h d_c$ per head, whatever
# the context) and the weighted sum of latents by $W^{UV}_i$ once per step; the cached tokens are only read.
#
# $W^{UK}$ joins the query side and $W^{UV}$ the output side. (Section 2.1.2 says $W^{UK}$ can be absorbed into $W^Q$,
# written $W^{UQ}$ in Appendix C, and $W^{UV}$ into $W^O$, so that keys and values need never be computed during
# inference.) One could go further and store the products $W^{UQ\top}_i W^{UK}_i$ and $W^O_i W^{UV}_i$ as single
# matrices; the reference code does not, and neither does `dslib.mla`: it applies $W^{UK}_i$ and $W^{UV}_i$ in turn,
# which keeps one set of weights for training and decoding (and at V2's shape each merged matrix would hold more
# numbers than its two factors together: $W^{UQ\top}_i W^{UK}_i$ is $d'_c \times d_c = 1536 \times 512$ per head,
# against $128 \cdot (1536 + 512)$ for the factors). Decoding then attends directly
# to the cached latents: it is multi-query attention in which every head shares one key $[c^{KV}_j; k^R_j]$ of
# $d_c + d_h^R$ numbers and one value $c^{KV}_j$ of $d_c$ numbers. That is the `absorb` path of DeepSeek's reference
# code, and what fast MLA kernels compute. In shapes: the latent query is `(b, h, t, d_c)`, the cache `(b, s, d_c)`,
# the scores `(b, h, t, s)`, the attended latent `(b, h, t, d_c)`, and $W^{UV}$ brings it back to `(b, h, t, d_v)`.
#
# **The names.** dslib uses DeepSeek-V3's reference names. The reference code stacks some of the paper's matrices:
#
# | paper | shape | reference code / dslib |
# |---|---|---|
# | $W^{DQ}$, RMSNorm, $[W^{UQ}; W^{QR}]$ per head | $d'_c \times d$, $n_h(d_h + d_h^R) \times d'_c$ | `wq_a`, `q_norm`, `wq_b` (`q_lora_rank` $= d'_c$) |
# | without query compression: $[W^{Q}; W^{QR}]$ per head | $n_h(d_h + d_h^R) \times d$ | `wq` (`q_lora_rank = 0`) |
# | $[W^{DKV}; W^{KR}]$, RMSNorm | $(d_c + d_h^R) \times d$ | `wkv_a`, `kv_norm` (`kv_lora_rank` $= d_c$) |
# | $[W^{UK}; W^{UV}]$ per head | $n_h(d_h + d_h^v) \times d_c$ | `wkv_b` (`qk_nope_head_dim` $= d_h$, `v_head_dim`) |
# | $W^{O}$ | $d \times n_h d_h^v$ | `wo` |
#
# with `qk_rope_head_dim` $= d_h^R$. The paper uses one $d_h$ for keys and values; the code allows a separate value
# width. The configuration validates itself.

# %% [markdown]
# The same equations as a data-flow picture. The two quantities outlined in bold (boxed in the equations), $c^{KV}_t$
# and $k^R_t$, are all that the cache keeps; everything else is recomputed from them, or, on the absorbed path of the
# next sections, never formed at all.

# %%
from dslib.diagram import Diagram


def draw_mla():
    """MLA's data flow (V2, section 2.1 and Appendix C), with what the cache keeps outlined in bold."""
    d = Diagram(13.6, 4.8, "Multi-head Latent Attention: what is computed, and what is cached (bold)")
    d.box(0.1, 2.0, 1.0, 1.0, "h_t\n(d)", "baseline")
    # queries
    d.box(1.6, 3.7, 1.4, 0.8, "c^Q = W^DQ h_t\n(d'_c)", "stage")
    d.box(3.5, 3.95, 2.1, 0.6, "q^C = W^UQ c^Q  (n_h x d_h)", "stage", fontsize=7.5)
    d.box(3.5, 3.2, 2.1, 0.6, "q^R = RoPE(W^QR c^Q)  (n_h x d^R_h)", "stage", fontsize=7.5)
    # keys and values from the latent
    d.box(1.6, 2.05, 1.7, 0.9, "c^KV = W^DKV h_t\n(d_c): cached", "measure", bold=True)
    d.box(3.8, 2.4, 1.8, 0.55, "k^C = W^UK c^KV", "stage", fontsize=7.5)
    d.box(3.8, 1.75, 1.8, 0.55, "v^C = W^UV c^KV", "stage", fontsize=7.5)
    # decoupled RoPE key
    d.box(1.6, 0.4, 1.7, 0.9, "k^R = RoPE(W^KR h_t)\n(d^R_h): cached,\none for all heads", "measure", fontsize=7.5,
          bold=True)
    # attention
    d.box(6.4, 1.6, 3.2, 2.2, "per head i:\nq = [q^C_i; q^R_i], k = [k^C_i; k^R]\n\nsoftmax(q . k / sqrt(d_h + d^R_h))\n"
          "weights the values v^C_i", "stage")
    d.box(10.2, 2.2, 1.5, 1.0, "u_t = W^O [o_1; ...; o_n_h]", "measure", fontsize=7.5)
    for x0, y0, x1, y1 in ((1.1, 2.8, 1.6, 4.1), (1.1, 2.5, 1.6, 2.5), (1.1, 2.2, 1.6, 0.85), (3.0, 4.25, 3.5, 4.25),
                           (3.0, 3.9, 3.5, 3.5), (3.3, 2.65, 3.8, 2.65), (3.3, 2.3, 3.8, 2.0), (5.6, 4.2, 6.4, 3.5),
                           (5.6, 3.5, 6.4, 3.2), (5.6, 2.65, 6.4, 2.75), (5.6, 2.0, 6.4, 2.2), (3.3, 0.85, 6.4, 1.8),
                           (9.6, 2.7, 10.2, 2.7)):
        d.arrow(x0, y0, x1, y1)
    d.box(6.4, 0.15, 7.1, 1.0, "absorbed path (decoding): W^UK folds into the query and W^UV into W^O, so each step\n"
          "attends to the cached c^KV directly and never rebuilds k^C or v^C (an identity of matrix products)",
          "question", fontsize=7.5)
    d.show()


draw_mla()

# %% [markdown]
# One field of the configuration needs code before the configuration itself: `rope_scaling`. Every released
# DeepSeek-V2 and V3 `config.json` carries a **YaRN** block in it, which changes RoPE's rotation speeds so that a
# model trained on 4K-token sequences can read 128K. Section 6 explains what YaRN does and checks these functions
# against a slow reference; until then every model in this chapter has `rope_scaling=None`, plain RoPE, for which the
# functions below reduce exactly to chapter 00's `rope_cos_sin`. First the block itself: the validator accepts the
# released files' spelling (`"type": "yarn"`) and transformers' (`"rope_type"`), fills in YaRN's defaults, and
# returns one normalised dict, or `None` for plain RoPE.

# %%
#| export
ROPE_TYPES = ("default", "yarn")
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.0}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_rope_scaling(rope_scaling: dict | None) -> dict | None:
    """Validate a config.json rope_scaling block (YaRN, arXiv 2309.00071, as DeepSeek-V2/V3 configure it).
    None, {} or a 'default' block -> None (plain RoPE). A YaRN block (key 'rope_type', or the older 'type', equal to
    'yarn') -> a normalised dict: rope_type='yarn', factor, original_max_position_embeddings, beta_fast (default 32),
    beta_slow (default 1), mscale (default 1.0), mscale_all_dim (default 0.0: not set), plus attention_factor and
    truncate only if given. Other keys (rope_theta, ...) are ignored. Raises ValueError naming the missing or bad
    field, or the unknown rope type."""
    if rope_scaling is None:
        return None
    if not isinstance(rope_scaling, dict):
        raise ValueError(f"rope_scaling={rope_scaling!r} is invalid: None or a dict (a config.json rope_scaling "
                         f"block) is required")
    if not rope_scaling:
        return None
    kinds = {key: rope_scaling[key] for key in ("rope_type", "type") if rope_scaling.get(key) is not None}
    if len(set(kinds.values())) > 1:
        raise ValueError(f"rope_scaling['rope_type']={kinds['rope_type']!r} and rope_scaling['type']="
                         f"{kinds['type']!r} disagree: give one rope type")
    if not kinds:
        raise ValueError(f"rope_scaling['rope_type'] is missing (or the older key 'type'): one of {ROPE_TYPES} is "
                         f"required")
    kind = next(iter(kinds.values()))
    if kind == "default":
        return None
    if kind != "yarn":
        raise ValueError(f"rope_scaling['rope_type']={kind!r} is invalid: one of {ROPE_TYPES} is supported")

    def bad(name: str, allowed: str) -> ValueError:
        return ValueError(f"rope_scaling[{name!r}]={rope_scaling[name]!r} is invalid: {allowed}")

    for name in ("factor", "original_max_position_embeddings"):
        if rope_scaling.get(name) is None:
            raise ValueError(f"rope_scaling[{name!r}] is missing: a YaRN block needs factor and "
                             f"original_max_position_embeddings (DeepSeek-V2/V3: 40 and 4096)")
    out = {"rope_type": "yarn"}
    if not (_is_number(rope_scaling["factor"]) and rope_scaling["factor"] > 0):
        raise bad("factor", "a positive number is required")
    out["factor"] = float(rope_scaling["factor"])
    if not _is_positive_int(rope_scaling["original_max_position_embeddings"]):
        raise bad("original_max_position_embeddings", "a positive int is required")
    out["original_max_position_embeddings"] = rope_scaling["original_max_position_embeddings"]
    for name, default in YARN_DEFAULTS.items():
        value = rope_scaling.get(name)
        if value is None:
            value = default
        elif not (_is_number(value) and (value >= 0 if name == "mscale_all_dim" else value > 0)):
            raise bad(name, "a number >= 0 (0: not set) is required" if name == "mscale_all_dim"
                      else "a positive number is required")
        out[name] = float(value)
    if not out["beta_fast"] > out["beta_slow"]:
        raise ValueError(f"rope_scaling['beta_fast']={out['beta_fast']!r} is invalid: it must exceed "
                         f"beta_slow={out['beta_slow']!r} (pairs turning more than beta_fast times are kept)")
    if rope_scaling.get("attention_factor") is not None:
        if not (_is_number(rope_scaling["attention_factor"]) and rope_scaling["attention_factor"] > 0):
            raise bad("attention_factor", "a positive number is required")
        out["attention_factor"] = float(rope_scaling["attention_factor"])
    if rope_scaling.get("truncate") is not None:
        if not isinstance(rope_scaling["truncate"], bool):
            raise bad("truncate", "True or False is required")
        out["truncate"] = rope_scaling["truncate"]
    return out

# %% [markdown]
# Then the frequencies. RoPE turns pair $i$ of a $d$-wide RoPE vector by $\theta_i = \theta^{-2i/d}$ radians per
# position. YaRN keeps the fast pairs as they are, divides the slow ones by the extension factor $s$, and blends the
# pairs in between along a linear ramp; it also returns a factor for cos and sin, and one for the softmax scale. The
# formulas are spelled out in section 6.

# %%
#| export
def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention factor 0.1 mscale ln(s) + 1 for a scale s > 1, else 1 (YaRN, arXiv 2309.00071, section 3.4;
    DeepSeek-V2, section 3.1.4, writes it 0.0707 ln s + 1: mscale 0.707)."""
    return 0.1 * mscale * math.log(scale) + 1.0 if scale > 1 else 1.0


def yarn_correction_range(dim: int, theta: float, rope_scaling: dict) -> tuple[float, float]:
    """The ramp's ends (low, high), as pair indices: pair i turns L theta^(-2i/dim) / (2 pi) times in the original
    context L, and low, high are the pairs that turn beta_fast and beta_slow times, floored and ceiled when truncate
    (default True), clamped to [0, dim - 1]; high gets +0.001 when they are equal."""
    rs = check_rope_scaling(rope_scaling)
    if rs is None:
        raise ValueError("rope_scaling=None has no correction range: a YaRN block is required")

    def pair_turning(turns: float) -> float:  # the (fractional) pair index that turns `turns` times in L
        return dim * math.log(rs["original_max_position_embeddings"] / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair_turning(rs["beta_fast"]), pair_turning(rs["beta_slow"])
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    return low, (high + 0.001 if low == high else high)


def rope_frequencies(dim: int, theta: float, rope_scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """RoPE's inverse frequencies inv_freq (dim/2,) float32, and the attention factor that multiplies cos and sin.
    Without scaling: theta^(-2i/dim), exactly as dslib.transformer.rope_cos_sin, and 1.0. YaRN (arXiv 2309.00071,
    DeepSeek-V2 section 3.1.4): inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp), ramp_i = clamp((i - low)
    / (high - low), 0, 1) over the yarn_correction_range; the factor is attention_factor if given, else
    yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim) when both are set, else yarn_mscale(factor)."""
    if not (_is_positive_int(dim) and dim % 2 == 0):
        raise ValueError(f"dim={dim!r} is invalid: a positive even int is required (RoPE rotates pairs)")
    if not (_is_number(theta) and theta > 0):
        raise ValueError(f"theta={theta!r} is invalid: a positive number is required")
    inv_freq = theta ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,): rope_cos_sin's
    rs = check_rope_scaling(rope_scaling)
    if rs is None:
        return inv_freq, 1.0
    if not theta > 1:
        raise ValueError(f"theta={theta!r} is invalid: YaRN needs theta > 1 (it divides by ln theta)")
    low, high = yarn_correction_range(dim, theta, rs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)  # 0: kept, 1: divided
    inv_freq = inv_freq / rs["factor"] * ramp + inv_freq * (1 - ramp)
    if "attention_factor" in rs:
        factor = rs["attention_factor"]
    elif rs["mscale"] and rs["mscale_all_dim"]:
        factor = yarn_mscale(rs["factor"], rs["mscale"]) / yarn_mscale(rs["factor"], rs["mscale_all_dim"])
    else:
        factor = yarn_mscale(rs["factor"])
    return inv_freq, float(factor)


def scaled_rope_cos_sin(positions: torch.Tensor, dim: int, theta: float,
                        rope_scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (..., t, dim/2) of integer positions (..., t), like dslib.transformer.rope_cos_sin, with YaRN's
    frequencies and its factor on both; rope_scaling None gives rope_cos_sin's result exactly."""
    if check_rope_scaling(rope_scaling) is None:
        return rope_cos_sin(positions, dim, theta)
    inv_freq, factor = rope_frequencies(dim, theta, rope_scaling)
    angles = positions.float()[..., None] * inv_freq.to(positions.device)  # (..., t, dim/2)
    return angles.cos() * factor, angles.sin() * factor


def yarn_softmax_factor(rope_scaling: dict | None) -> float:
    """The multiplier of MLA's softmax scale 1/sqrt(d_h + d_h^R): yarn_mscale(factor, mscale_all_dim) ** 2 when
    mscale_all_dim is set (DeepSeek's reference code, transformers' DeepseekV2/V3), else 1."""
    rs = check_rope_scaling(rope_scaling)
    if rs is None or not rs["mscale_all_dim"]:
        return 1.0
    return yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2

# %%
#| export
@dataclass
class MLAConfig:
    """The shape of an MLA layer, with DeepSeek-V3's reference names (DeepSeek-V2, arXiv 2405.04434, section 2.1):
    d_model is d (the hidden size), n_head n_h, q_lora_rank d'_c (0 or None: no query compression), kv_lora_rank d_c,
    qk_nope_head_dim d_h, qk_rope_head_dim d_h^R (even: RoPE rotates pairs), v_head_dim the per-head value width.
    V2 and V3 use n_h = 128, d_h = v = 128, d_c = 512, d'_c = 1536, d_h^R = 64. rope_scaling: None (plain RoPE) or a
    config.json rope_scaling block, YaRN in V2 and V3 (factor 40 from 4096 positions); stored normalised by
    check_rope_scaling."""

    d_model: int = 128
    n_head: int = 4
    q_lora_rank: int | None = 0
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    rope_scaling: dict | None = None

    def _invalid(self, name: str, allowed: str) -> ValueError:
        return ValueError(f"{type(self).__name__}.{name}={getattr(self, name)!r} is invalid: {allowed}")

    def __post_init__(self) -> None:
        for name in ("d_model", "n_head", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
            if not _is_positive_int(getattr(self, name)):
                raise self._invalid(name, "a positive int is required")
        if self.q_lora_rank is None:
            self.q_lora_rank = 0
        if not (self.q_lora_rank == 0 or _is_positive_int(self.q_lora_rank)):
            raise self._invalid("q_lora_rank", "0 or None (no query compression) or a positive int is required")
        if self.qk_rope_head_dim % 2:
            raise self._invalid("qk_rope_head_dim", "an even number is required: RoPE rotates pairs of features")
        for name in ("kv_lora_rank", "q_lora_rank"):
            if getattr(self, name) > self.d_model:
                raise self._invalid(name, f"at most d_model={self.d_model} is allowed: the latent compresses the "
                                          f"hidden state, and a wider one cannot hold more (its rank is <= d_model)")
        for name in ("rope_theta", "norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise self._invalid(name, "a positive number is required")
        try:
            self.rope_scaling = check_rope_scaling(self.rope_scaling)
        except ValueError as err:
            raise self._invalid("rope_scaling", str(err)) from None
        if self.rope_scaling is not None and not self.rope_theta > 1:
            raise self._invalid("rope_theta", "a number > 1 is required with YaRN (it divides by ln rope_theta)")

    @property
    def qk_head_dim(self) -> int:
        """Width of a query or key head: d_h + d_h^R."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_elements(self) -> int:
        """Elements cached per token per layer: d_c + d_h^R (V2, Table 1)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["rope_scaling"] is None:  # so a config without YaRN (and any key hashed from it) reads as it did before
            del d["rope_scaling"]
        return d


@dataclass(kw_only=True)
class MLATransformerConfig(MLAConfig):
    """A small decoder-only LM with MLA attention: the DeepSeek LLM block of dslib.transformer (pre-norm RMSNorm,
    SwiGLU) with MLA in place of GQA, as in DeepSeek-V2's dense layers. All fields are keyword-only."""

    vocab_size: int
    n_layer: int = 4
    intermediate_size: int | None = None  # None: 8/3 d_model rounded up to a multiple of 32
    max_seq_len: int = 128
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_layer", "max_seq_len"):
            if not _is_positive_int(getattr(self, name)):
                raise self._invalid(name, "a positive int is required")
        super().__post_init__()
        if self.intermediate_size is None:
            self.intermediate_size = 32 * math.ceil(8 * self.d_model / 3 / 32)
        if not _is_positive_int(self.intermediate_size):
            raise self._invalid("intermediate_size", "a positive int is required")
        if isinstance(self.init_std, bool) or not isinstance(self.init_std, (int, float)) or not self.init_std > 0:
            raise self._invalid("init_std", "a positive number is required")

# %%
for bad in (dict(qk_rope_head_dim=7), dict(d_model=64, kv_lora_rank=128), dict(n_head=0), dict(v_head_dim=-4),
            dict(q_lora_rank=-1)):
    try:
        MLAConfig(**bad)
    except ValueError as e:
        print("ValueError:", e)
try:
    MLATransformerConfig(vocab_size=0)
except ValueError as e:
    print("ValueError:", e)

# %% [markdown]
# The cache keeps, per layer, the two boxed vectors of every past token, and nothing else: `kv` holds $c^{KV}$
# (after its RMSNorm) and `pe` holds $k^R$ (after RoPE), the reference code's `kv_cache` and `pe_cache`. Because $k^R$
# is stored already rotated, its position is fixed when it is written: the tokens fed to a cached model must carry the
# positions that follow the cache's filled `length`, which is what the model's default positions do. The cache holds
# no per-head tensor at all; `nbytes` is therefore $b \cdot$ `max_len` $\cdot\, l\, (d_c + d_h^R)$ times the bytes
# per number, Table 1's formula, which a check below confirms on the allocated tensors.

# %%
#| export
class MLACache:
    """The MLA cache: per layer, the latent c^KV_t (kv_lora_rank numbers) and the shared RoPE key k^R_t
    (qk_rope_head_dim numbers) of each past token, the only vectors V2's Appendix C caches. Preallocated to max_len:
    kv[layer] is (b, max_len, kv_lora_rank), pe[layer] is (b, max_len, qk_rope_head_dim). `length` is how many
    positions are filled; the model advances it after each forward. Both decoding modes read the same cache."""

    def __init__(self, config: MLATransformerConfig, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.max_len = max_len or config.max_seq_len
        self.kv = [torch.zeros(batch_size, self.max_len, config.kv_lora_rank, device=device, dtype=dtype)
                   for _ in range(config.n_layer)]
        self.pe = [torch.zeros(batch_size, self.max_len, config.qk_rope_head_dim, device=device, dtype=dtype)
                   for _ in range(config.n_layer)]
        self.length = 0

    def update(self, layer: int, kv: torch.Tensor, pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write kv (b, t, kv_lora_rank) and pe (b, t, qk_rope_head_dim) after the filled positions; return all the
        latents and RoPE keys so far."""
        t = kv.shape[1]
        if self.length + t > self.max_len:
            raise ValueError(f"MLA cache is full: {self.length} positions + {t} new > max_len {self.max_len}")
        self.kv[layer][:, self.length:self.length + t] = kv
        self.pe[layer][:, self.length:self.length + t] = pe
        return self.kv[layer][:, :self.length + t], self.pe[layer][:, :self.length + t]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kv + self.pe)

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only the batch rows `rows` (indices, in order): a decoder drops the rows that have finished."""
        self.kv = [t[rows] for t in self.kv]
        self.pe = [t[rows] for t in self.pe]

# %% [markdown]
# The layer. `forward` computes the queries and the two cached vectors, writes them to the cache when there is one,
# and then attends in one of two ways:
#
# - `mode="naive"` decompresses every cached latent into per-head keys $[k^C_{j,i}; k^R_j]$ and values $v^C_{j,i}$ and
#   runs ordinary attention (PyTorch's fused `scaled_dot_product_attention`). Training uses it.
# - `mode="absorb"` folds $W^{UK}$ into the query and $W^{UV}$ into the output and attends to the latents themselves. A
#   single decoding step is two batched matrix products against the cache; a longer chunk of queries goes through the
#   fused attention kernel, with the latents as one key and value shared by all heads (MQA in the latent space), so
#   that no $t \times s$ score matrix is made per head.
#
# Both paths end in the same place, per-head outputs of shape `(b, h, t, d_v)` that `wo` ($W^O$) mixes back to
# `(b, t, d)`. First, two helpers for the fused kernel: `_allowed` builds the causal mask of $t$ new queries that follow
# $s - t$ cached keys (query $k$ may see keys up to $s - t + k$, a lower triangle shifted right), and `_attend` calls
# `scaled_dot_product_attention` after padding keys and values to one width, since MLA's query-key width
# $d_h + d_h^R$ and its value width differ (and in the absorbed path the value is the $d_c$-wide latent).

# %%
#| export
MODES = ("naive", "absorb")


def _allowed(mask: torch.Tensor | None, t: int, s: int, device: torch.device) -> torch.Tensor | None:
    """The attention mask of t queries that follow s - t earlier keys: `mask` when given, else causal (None when every
    key is visible, as for a single new token)."""
    if mask is not None:
        return mask
    if t == 1:
        return None
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(s - t)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
            scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v with PyTorch's fused kernel, causal when no mask is given. Keys and values of different
    widths are zero-padded to the same width first (zeros change neither the scores nor the output), since the fused
    CPU kernel handles only equal widths and would fall back to a slow one."""
    e, ev = q.shape[-1], v.shape[-1]
    if ev < e:
        v = F.pad(v, (0, e - ev))
    elif ev > e:
        q, k = F.pad(q, (0, ev - e)), F.pad(k, (0, ev - e))
    t, s = q.shape[-2], k.shape[-2]
    if mask is None and t == s:
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=_allowed(mask, t, s, q.device), scale=scale)
    return y[..., :ev]

# %% [markdown]
# The layer itself. `queries` and `latents` compute the right-hand sides of the boxed equations (RoPE applied to the
# $d_h^R$ parts only), `up_projections` cuts $W^{UK}_i$ and $W^{UV}_i$ out of the stacked `wkv_b` weight as views (no
# copy), and `forward` chooses the path. The comments give each tensor's shape; $s$ is the number of keys, cached plus
# new.

# %%
#| export
class MLA(nn.Module):
    """Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, section 2.1 and Appendix C).

    Queries: c^Q = RMSNorm(W^DQ h) (wq_a, q_norm), [q^C; q^R] = W^UQ, W^QR c^Q (wq_b), or directly from h (wq) when
    q_lora_rank is 0. Keys and values: [c^KV; k^R] = [W^DKV; W^KR] h (wkv_a), c^KV <- RMSNorm(c^KV) (kv_norm),
    k^R <- RoPE(k^R), one RoPE key shared by all heads; [k^C_i; v^C_i] = [W^UK_i; W^UV_i] c^KV (wkv_b).
    Per head q_i = [q^C_i; q^R_i], k_i = [k^C_i; k^R]; o_i = softmax(q_i . k_i / sqrt(d_h + d_h^R)) v^C_i; u = W^O o
    (wo). RoPE rotates interleaved pairs, as the reference code does. Only c^KV and k^R are cached (MLACache). With
    YaRN (c.rope_scaling), the softmax scale is multiplied by yarn_softmax_factor, and the caller's cos and sin are
    scaled_rope_cos_sin's.

    mode "naive" decompresses k^C and v^C per head; mode "absorb" attends in the latent space: scores
    (W^UK_i^T q^C_i) . c^KV + q^R_i . k^R and output W^O [W^UV_i (p_i . c^KV)]_i. Both give the same result."""

    def __init__(self, c: MLAConfig, layer: int = 0):
        super().__init__()
        self.c, self.layer = c, layer
        h, qk_head_dim = c.n_head, c.qk_nope_head_dim + c.qk_rope_head_dim
        if c.q_lora_rank:
            self.wq_a = nn.Linear(c.d_model, c.q_lora_rank, bias=False)  # W^DQ
            self.q_norm = RMSNorm(c.q_lora_rank, c.norm_eps)
            self.wq_b = nn.Linear(c.q_lora_rank, h * qk_head_dim, bias=False)  # [W^UQ_i; W^QR_i] per head
        else:
            self.wq = nn.Linear(c.d_model, h * qk_head_dim, bias=False)  # [W^Q_i; W^QR_i] per head
        self.wkv_a = nn.Linear(c.d_model, c.kv_lora_rank + c.qk_rope_head_dim, bias=False)  # [W^DKV; W^KR]
        self.kv_norm = RMSNorm(c.kv_lora_rank, c.norm_eps)
        self.wkv_b = nn.Linear(c.kv_lora_rank, h * (c.qk_nope_head_dim + c.v_head_dim), bias=False)  # [W^UK_i; W^UV_i]
        self.wo = nn.Linear(h * c.v_head_dim, c.d_model, bias=False)  # W^O
        self.softmax_scale = qk_head_dim ** -0.5 * yarn_softmax_factor(c.rope_scaling)  # x 1.0 without YaRN

    def queries(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, t, d) -> q^C (b, h, t, d_h) and q^R = RoPE(W^QR c^Q) (b, h, t, d_h^R)."""
        c = self.c
        q = self.wq_b(self.q_norm(self.wq_a(x))) if c.q_lora_rank else self.wq(x)
        q = rearrange(q, "b t (h d) -> b h t d", h=c.n_head)
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin)

    def latents(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (b, t, d) -> the cached vectors: c^KV (b, t, d_c) after RMSNorm, k^R (b, t, d_h^R) after RoPE."""
        c = self.c
        kv, k_pe = self.wkv_a(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        return self.kv_norm(kv), apply_rope(k_pe[:, None], cos, sin)[:, 0]

    def up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """W^UK (h, d_h, d_c) and W^UV (h, d_v, d_c): views of wkv_b's weight, head by head."""
        c = self.c
        w = self.wkv_b.weight.view(c.n_head, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return w[:, :c.qk_nope_head_dim], w[:, c.qk_nope_head_dim:]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor | None = None,
                cache: MLACache | None = None, mode: str = "naive") -> torch.Tensor:
        """x (b, t, d) -> (b, t, d). cos, sin (b, t, d_h^R / 2): RoPE angles of the t positions. mask (b, 1, t, s)
        bool, True where attention is allowed (None: causal). cache: an MLACache that receives c^KV and k^R of the t
        positions (the model advances its length). mode: "naive" or "absorb"."""
        c = self.c
        q_nope, q_pe = self.queries(x, cos, sin)  # (b, h, t, d_h), (b, h, t, d_h^R)
        kv, k_pe = self.latents(x, cos, sin)  # (b, t, d_c), (b, t, d_h^R)
        if cache is not None:
            kv, k_pe = cache.update(self.layer, kv, k_pe)  # (b, s, d_c), (b, s, d_h^R): s = past + t
        if mode == "naive":
            k_nope, v = rearrange(self.wkv_b(kv), "b s (h d) -> b h s d", h=c.n_head).split(
                [c.qk_nope_head_dim, c.v_head_dim], dim=-1)  # k^C (b, h, s, d_h), v^C (b, h, s, d_v)
            q = torch.cat([q_nope, q_pe], dim=-1)  # q_i = [q^C_i; q^R_i]
            k = torch.cat([k_nope, k_pe[:, None].expand(-1, c.n_head, -1, -1)], dim=-1)  # k_i = [k^C_i; k^R]
            y = _attend(q, k, v, mask, self.softmax_scale)  # (b, h, t, d_v)
        elif mode == "absorb":
            w_uk, w_uv = self.up_projections()
            q_lat = torch.einsum("bhtd,hdc->bhtc", q_nope, w_uk)  # W^UK_i^T q^C_i: (b, h, t, d_c)
            if x.shape[1] == 1:  # one decoding step: scores against the latents, two batched matrix products
                # The scores are laid out (b, s, h), the cache times the queries: on a CPU, this attention step ran
                # 1.03-1.18x faster than with the same multiply-adds laid out (b, h, s), the queries times the cache.
                q_lat1, q_pe1 = q_lat[:, :, 0].transpose(1, 2), q_pe[:, :, 0].transpose(1, 2)  # (b, d_c or d_h^R, h)
                scores = (kv @ q_lat1 + k_pe @ q_pe1) * self.softmax_scale  # c^KV_j . q_lat + k^R_j . q^R: (b, s, h)
                if mask is not None:  # (b, 1, 1, s) -> (b, s, 1)
                    scores = scores.masked_fill(~mask.squeeze(2).transpose(1, 2), float("-inf"))
                probs = scores.float().softmax(dim=1).type_as(scores)
                o_lat = (probs.transpose(1, 2) @ kv)[:, :, None]  # sum_j p_j c^KV_j: (b, h, 1, d_c)
            else:  # a chunk: the same attention as MQA with key [c^KV; k^R] and value c^KV shared by the heads
                k = torch.cat([kv, k_pe], dim=-1)[:, None].expand(-1, c.n_head, -1, -1)  # (b, h, s, d_c + d_h^R)
                o_lat = _attend(torch.cat([q_lat, q_pe], dim=-1), k, kv[:, None].expand(-1, c.n_head, -1, -1), mask,
                                self.softmax_scale)  # (b, h, t, d_c)
            y = torch.einsum("bhtc,hdc->bhtd", o_lat, w_uv)  # W^UV_i o_lat_i: (b, h, t, d_v)
        else:
            raise ValueError(f"mode={mode!r} is invalid: one of {MODES} is required")
        return self.wo(rearrange(y, "b h t d -> b t (h d)"))

# %% [markdown]
# **Check against the equations.** A slow reference computes MLA token by token and head by head, straight from the
# formulas above: the paper's matrices are cut out of the layer's stacked weights, RMSNorm is written out, and RoPE is
# multiplication by $e^{i\theta}$ of complex pairs (independent of `apply_rope`). Both modes must match it, with and
# without query compression.
#
# Why this is the right check: the reference shares nothing with the layer but its weights, so an error in the layer's
# reshapes, splits or einsum strings cannot cancel against the same error in the reference. The test shape is chosen
# to expose the usual mistakes. All widths differ ($d_h = 8$, $d_h^R = 4$, $d_v = 6$, $d_c = 16$), so taking the value
# rows of `wkv_b` for key rows, or the RoPE part of a query for its position-free part, gives wrong numbers rather
# than a lucky match. Every weight, the RMSNorm gains included, is random, so a forgotten norm or gain shows. Seven
# positions make the RoPE angles and the causal mask matter. The reference runs in float64, so what remains is the
# layer's float32 rounding, which the tolerance of $10^{-5}$ allows for; an error of logic would be of the size of the
# outputs themselves.

# %%
def mla_reference(attn: MLA, x: torch.Tensor) -> torch.Tensor:
    """Causal MLA of x (b, t, d), one token and one head at a time, in float64, from V2's Appendix C."""
    c = attn.c
    dn, dr, dv, dc, h = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, c.kv_lora_rank, c.n_head
    W = {name: p.detach().double() for name, p in attn.named_parameters()}
    W_DKV, W_KR = W["wkv_a.weight"][:dc], W["wkv_a.weight"][dc:]  # (d_c, d), (d_h^R, d)
    W_UK = W["wkv_b.weight"].view(h, dn + dv, dc)[:, :dn]  # (h, d_h, d_c)
    W_UV = W["wkv_b.weight"].view(h, dn + dv, dc)[:, dn:]  # (h, d_v, d_c)
    W_Qall = (W["wq_b.weight"] if c.q_lora_rank else W["wq.weight"]).view(h, dn + dr, -1)
    W_UQ, W_QR = W_Qall[:, :dn], W_Qall[:, dn:]  # per head, from c^Q (or from h without query compression)
    W_O = W["wo.weight"].view(-1, h, dv)  # (d, h, d_v)

    def rms(v, g):
        return v / torch.sqrt((v * v).mean() + c.norm_eps) * g

    def rope(v, pos):  # rotate pairs (v[2k], v[2k+1]) by pos * theta^(-2k / d_h^R)
        angles = pos * c.rope_theta ** (-torch.arange(0, dr, 2, dtype=torch.float64) / dr)
        z = torch.view_as_complex(v.reshape(-1, 2).contiguous()) * torch.exp(1j * angles)
        return torch.view_as_real(z).flatten()

    xs = x.double()
    out = torch.zeros(x.shape[0], x.shape[1], c.d_model, dtype=torch.float64)
    for b in range(x.shape[0]):
        c_KV = [rms(W_DKV @ xs[b, j], W["kv_norm.weight"]) for j in range(x.shape[1])]  # cached
        k_R = [rope(W_KR @ xs[b, j], j) for j in range(x.shape[1])]  # cached
        for t in range(x.shape[1]):
            c_Q = rms(W["wq_a.weight"] @ xs[b, t], W["q_norm.weight"]) if c.q_lora_rank else xs[b, t]
            for i in range(h):
                q = torch.cat([W_UQ[i] @ c_Q, rope(W_QR[i] @ c_Q, t)])  # q_{t,i} = [q^C; q^R]
                keys = [torch.cat([W_UK[i] @ c_KV[j], k_R[j]]) for j in range(t + 1)]  # k_{j,i} = [k^C; k^R]
                p = torch.softmax(torch.stack([q @ k for k in keys]) / math.sqrt(dn + dr), dim=0)
                o = sum(p[j] * (W_UV[i] @ c_KV[j]) for j in range(t + 1))  # sum_j p_j v^C_{j,i}
                out[b, t] += W_O[:, i] @ o
    return out.float()


reference_errors = {}
for q_lora_rank in (0, 24):
    torch.manual_seed(0)
    cfg = MLAConfig(d_model=32, n_head=4, q_lora_rank=q_lora_rank, kv_lora_rank=16, qk_nope_head_dim=8,
                    qk_rope_head_dim=4, v_head_dim=6)
    attn = MLA(cfg)
    for p in attn.parameters():  # random weights (the norms' gains too), so that nothing hides behind a 1
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 7, 32)
    cos, sin = rope_cos_sin(torch.arange(7).expand(2, 7), cfg.qk_rope_head_dim)
    slow = mla_reference(attn, x)
    with torch.no_grad():
        for mode in MODES:
            err = (attn(x, cos, sin, mode=mode) - slow).abs().max().item()
            reference_errors[(q_lora_rank, mode)] = err
            print(f"q_lora_rank={q_lora_rank:2d}, mode {mode:>6}: max |layer - per-head loop| = {err:.1e}")
assert max(reference_errors.values()) < 1e-5, reference_errors

# %% [markdown]
# The model: DeepSeek LLM's block from `dslib.transformer` (RMSNorm, SwiGLU) with MLA in place of grouped-query
# attention. `forward` has the signature of `dslib.transformer.Transformer`, `(input_ids, positions, segments,
# attn_mask, cache)`, so `dslib.train.Trainer` and `PackedData`'s packed rows work with it unchanged. Training, and any
# call without a cache, uses the naive path; with a cache, `model.mode` ("absorb" by default, or "naive") decides.

# %%
#| export
class MLABlock(nn.Module):
    """Pre-norm block: x + MLA(RMSNorm(x)), then + SwiGLU(RMSNorm(x))."""

    def __init__(self, c: MLATransformerConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = MLA(c, layer)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = SwiGLU(c.d_model, c.intermediate_size)

    def forward(self, x, cos, sin, mask, cache=None, mode="naive"):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, mode)
        return x + self.mlp(self.mlp_norm(x))


class MLATransformer(nn.Module):
    """A decoder-only LM with MLA attention. forward(input_ids (b, t)) -> logits (b, t, vocab), with the signature of
    dslib.transformer.Transformer. mode ("absorb" or "naive") chooses how a cached forward attends; without a cache
    (training) the naive path runs."""

    def __init__(self, config: MLATransformerConfig, mode: str = "absorb"):
        super().__init__()
        self.config = config
        self.mode = mode
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(MLABlock(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init)

    @property
    def mode(self) -> str:
        return self._mode

    @mode.setter
    def mode(self, value: str) -> None:
        if value not in MODES:
            raise ValueError(f"mode={value!r} is invalid: one of {MODES} is required")
        self._mode = value

    def _init(self, m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=self.config.init_std)

    def num_params(self, embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n if embeddings else n - self.embed.weight.numel() - self.lm_head.weight.numel()

    def new_cache(self, batch_size: int, max_len: int | None = None) -> MLACache:
        """An empty MLACache for this model, on its device and in its dtype."""
        w = self.embed.weight
        return MLACache(self.config, batch_size, max_len, w.device, w.dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                segments: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                cache: MLACache | None = None, logits_to_keep: int = 0) -> torch.Tensor:
        """input_ids (b, t) -> logits (b, t, vocab).
        positions (b, t): RoPE positions (default 0..t-1, or following the cache's filled part).
        segments (b, t): document ids of packed rows; attention stays within a document (document_causal_mask).
        attn_mask (b, 1, t, past + t) bool, True where attention is allowed (default: causal).
        cache: an MLACache to decode incrementally; it is advanced by t.
        logits_to_keep: as in dslib.transformer.Transformer.forward (k > 0: the output head on the last k positions)."""
        c = self.config
        positions, attn_mask = forward_inputs(input_ids, positions, segments, attn_mask, cache, c.max_seq_len)
        cos, sin = scaled_rope_cos_sin(positions, c.qk_rope_head_dim, c.rope_theta, c.rope_scaling)
        mode = self.mode if cache is not None else "naive"
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, attn_mask, cache, mode)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.lm_head(self.norm(x[:, -logits_to_keep:] if logits_to_keep > 0 else x))

    # Decoding is chapter 00's loop unchanged: it asks the model for a cache through new_cache, so it gets an MLACache.
    generate = Transformer.generate

# %% [markdown]
# **Checks of the model.**
#
# 1. *Equivalence*: decoding with the cache, absorbed or naive, gives the logits of one full forward pass without a
#    cache. We prefill 8 tokens, add a chunk of 4 (queries after cached keys, with the causal offset), then decode one
#    token at a time, so the RoPE positions of the cached keys and of each new query must line up. The three ways of
#    feeding tokens reach three different code paths of the absorbed mode (the fused kernel with a causal mask, the
#    same with the mask shifted by the cached length, and the two-product single step), and an off-by-one in a
#    position or a mask changes the logits.
# 2. *Packed rows*: a row holding two documents, with positions restarting and the document mask, gives each document
#    the logits it gets alone. `Trainer` packs documents this way, so without this check the race of section 3 could
#    train on attention that leaks across documents.
# 3. *Generation*: greedy decoding through `generate` picks the same tokens in both modes, the end-to-end form of
#    check 1.
# 4. *Cache bytes*: the bytes actually allocated by `dslib.transformer.KVCache` (MHA, GQA, MQA) and by `MLACache` equal
#    the Table 1 formula, so the accounting of sections 1 and 5 describes tensors that exist, not only a formula.

# %%
world = World(n_docs=dslib.sized(small=40_000, full=150_000))
tok = world.tokenizer
V = tok.vocab_size

equivalence_errors = {}
for q_lora_rank in (0, 32):
    torch.manual_seed(0)
    cfg = MLATransformerConfig(vocab_size=V, d_model=64, n_layer=2, n_head=4, q_lora_rank=q_lora_rank,
                               kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, init_std=0.1)
    model = MLATransformer(cfg).eval()
    ids = torch.randint(0, V, (3, 24))
    with torch.no_grad():
        full = model(ids)  # no cache: the naive path over the whole sequence
        for mode in MODES:
            model.mode = mode
            cache = model.new_cache(batch_size=3, max_len=24)
            parts = [model(ids[:, :8], cache=cache), model(ids[:, 8:12], cache=cache)]
            parts += [model(ids[:, i:i + 1], cache=cache) for i in range(12, 24)]
            equivalence_errors[(q_lora_rank, mode)] = (torch.cat(parts, 1) - full).abs().max().item()
    print(f"q_lora_rank={q_lora_rank:2d}: max |cached - full| naive {equivalence_errors[(q_lora_rank, 'naive')]:.1e}, "
          f"absorbed {equivalence_errors[(q_lora_rank, 'absorb')]:.1e} (logits of size {full.abs().max():.1f})")
assert max(equivalence_errors.values()) < 1e-4, equivalence_errors

# Packed rows: two documents in one row against each alone.
d1, d2 = torch.randint(0, V, (1, 9)), torch.randint(0, V, (1, 13))
with torch.no_grad():
    packed = model(torch.cat([d1, d2], 1), positions=torch.tensor([list(range(9)) + list(range(13))]),
                   segments=torch.tensor([[1] * 9 + [2] * 13]))
    alone = torch.cat([model(d1), model(d2)], 1)
packed_error = (packed - alone).abs().max().item()
print(f"packed row of two documents vs each alone: max |difference| = {packed_error:.1e}")
assert packed_error < 1e-5

# Generation: greedy decoding gives the same tokens in both modes.
prompt_ids = torch.tensor([tok.encode(p, bos=True) for p in world.prompts(world.heldout[:4])][:1] * 2)
model.mode = "naive"
naive_tokens = model.generate(prompt_ids, 12)
model.mode = "absorb"
assert torch.equal(naive_tokens, model.generate(prompt_ids, 12))

# %%
# Measured cache bytes against the formula: 3 layers, batch 2, 50 positions, 8 heads of 16.
measured = {}
for kind, n_kv in (("MHA", 8), ("GQA", 2), ("MQA", 1)):
    c = TransformerConfig(vocab_size=V, d_model=128, n_layer=3, n_head=8, n_kv_head=n_kv)
    measured[kind] = KVCache(c, batch_size=2, max_len=50).nbytes()
c = MLATransformerConfig(vocab_size=V, d_model=128, n_layer=3, n_head=8, kv_lora_rank=64, qk_nope_head_dim=16,
                         qk_rope_head_dim=8, v_head_dim=16)
measured["MLA"] = MLACache(c, batch_size=2, max_len=50).nbytes()
shape = dict(n_head=8, head_dim=16, n_kv_head=2, kv_lora_rank=64, qk_rope_head_dim=8)
for kind, nbytes in measured.items():
    formula = kv_cache_bytes(kind, n_layer=3, tokens=50, batch_size=2, dtype=torch.float32, **shape)
    print(f"{kind}: {nbytes:>7,} bytes allocated, formula {formula:>9,.0f}")
    assert nbytes == formula
assert MLACache(c, 2, 50, dtype=torch.bfloat16).nbytes() == measured["MLA"] // 2

# %% [markdown]
# ## 3. Experiment: four kinds of attention on the arithmetic world
#
# What does the smaller cache cost in quality? The paper's evidence comes from benchmarks of large models, not from
# loss. In Appendix D.1, dense 7B models with MHA beat the same models with GQA and MQA on hard benchmarks. In Appendix
# D.2, MoE models with MLA score better than the same models with MHA, at about 16B and about 250B parameters. Table 1
# calls MLA "stronger". We can ask a much smaller question. On our arithmetic world, with the same number of
# parameters, do the four kinds reach different held-out losses?
#
# Every model has the same width, depth and number of heads; only the attention differs. MLA takes V2's proportions,
# $d_c = 4 d_h$ and $d_h^R = d_h / 2$, so its cache equals GQA with 2.25 groups, and no query compression (as in
# DeepSeek-V2-Lite). The attention kinds differ in parameters, so each model's SwiGLU width is set to bring its total
# to MHA's. (V2's Appendix D matched its dense models' parameters through their depth instead.) A fifth contender,
# *MLA wide RoPE*, gives the decoupled RoPE key a full head's width, $d_h^R = d_h$. Our task is mostly about positions
# (lining up digits, copying numbers), and MLA carries position only in this narrow channel, shared by all heads.
#
# Short runs on this world are noisy. Expect held-out loss to sit on a plateau near 1.0 and then drop when a model
# starts to do the arithmetic; when that drop begins can vary from run to run, with the initial weights and the order
# of the data. So we report two numbers per run: the final loss, and the mean of the held-out loss over the run, which
# also counts how early a model learned and is steadier. Two seeds each at `small` scale (three at `full`), the same
# data order for every kind within a seed.

# %%
RACE = dslib.sized(small=dict(d_model=64, n_layer=2, n_head=4, steps=300, batch=16, seeds=(0, 1)),
                   full=dict(d_model=256, n_layer=6, n_head=8, steps=3000, batch=64, seeds=(0, 1, 2)))
SEQ_LEN = 96
d, H = RACE["d_model"], RACE["n_head"]
dh = d // H
KINDS = ("MHA", "GQA", "MQA", "MLA")
CONTENDERS = KINDS + ("MLA wide RoPE",)


def race_model(kind: str, intermediate_size: int | None = None) -> torch.nn.Module:
    if kind.startswith("MLA"):
        rope = dh if kind == "MLA wide RoPE" else dh // 2
        return MLATransformer(MLATransformerConfig(
            vocab_size=V, d_model=d, n_layer=RACE["n_layer"], n_head=H, kv_lora_rank=4 * dh, qk_nope_head_dim=dh,
            qk_rope_head_dim=rope, v_head_dim=dh, intermediate_size=intermediate_size, max_seq_len=128))
    n_kv = {"MHA": H, "GQA": 2, "MQA": 1}[kind]
    return Transformer(TransformerConfig(vocab_size=V, d_model=d, n_layer=RACE["n_layer"], n_head=H, n_kv_head=n_kv,
                                         intermediate_size=intermediate_size, max_seq_len=128))


def matched_width(kind: str) -> int:
    """The SwiGLU width that brings `kind`'s parameter count closest to MHA's."""
    target, model = race_model("MHA").num_params(), race_model(kind)
    default = model.layers[0].mlp.up_proj.out_features
    return default + round((target - model.num_params()) / (3 * d * RACE["n_layer"]))


widths = {kind: matched_width(kind) for kind in CONTENDERS}
race_cache = {"MHA": kv_cache_elements("MHA", n_head=H, head_dim=dh),
              "GQA": kv_cache_elements("GQA", n_kv_head=2, head_dim=dh),
              "MQA": kv_cache_elements("MQA", head_dim=dh),
              "MLA": kv_cache_elements("MLA", kv_lora_rank=4 * dh, qk_rope_head_dim=dh // 2),
              "MLA wide RoPE": kv_cache_elements("MLA", kv_lora_rank=4 * dh, qk_rope_head_dim=dh)}
race_params = {kind: race_model(kind, widths[kind]).num_params() for kind in CONTENDERS}
for kind in CONTENDERS:
    print(f"{kind:<14}: {race_params[kind]:,} parameters (SwiGLU width {widths[kind]}), "
          f"{race_cache[kind]} cached elements per token per layer")

data = {seed: PackedData([doc.text for doc in world.corpus()], tok, SEQ_LEN, RACE["batch"], seed=seed)
        for seed in RACE["seeds"]}
valid = PackedData([doc.text for doc in world.validation()], tok, SEQ_LEN, 64, seed=0).all_batches()
print(f"{RACE['steps']} steps x {RACE['batch']} rows x {SEQ_LEN} tokens = "
      f"{RACE['steps'] * RACE['batch'] * SEQ_LEN / 1e6:.2f}M tokens per run, "
      f"{len(CONTENDERS) * len(RACE['seeds'])} runs")

# %%
race = {}
t0 = time.time()
for seed in RACE["seeds"]:
    for kind in CONTENDERS:
        torch.manual_seed(seed)
        m = race_model(kind, widths[kind])
        tr = Trainer(m, data[seed], TrainConfig(steps=RACE["steps"], lr=3e-3, warmup_steps=30, schedule="cosine",
                                                eval_every=RACE["steps"] // 5, seed=seed),
                     eval_batches=valid, device=device)
        race[(kind, seed)] = tr.fit(progress=False)
race_seconds = time.time() - t0
final_loss = {k: np.array([race[(k, s)]["eval_loss"][-1] for s in RACE["seeds"]]) for k in CONTENDERS}
mean_loss = {k: np.array([np.mean(race[(k, s)]["eval_loss"][1:]) for s in RACE["seeds"]]) for k in CONTENDERS}
print(f"{race_seconds:.0f} s for {len(race)} runs. Held-out loss, nats per response token (seeds "
      f"{', '.join(map(str, RACE['seeds']))}):")
print(f"{'':<14}{'final':>8}   {'per seed':<16}{'mean over run':>14}   {'per seed':<16}{'cache':>6}")
for k in CONTENDERS:
    print(f"{k:<14}{final_loss[k].mean():>8.3f}   {' '.join(f'{v:.3f}' for v in final_loss[k]):<16}"
          f"{mean_loss[k].mean():>14.3f}   {' '.join(f'{v:.3f}' for v in mean_loss[k]):<16}{race_cache[k]:>6}")

# %%
colours = {"MHA": "tab:blue", "GQA": "tab:orange", "MQA": "tab:red", "MLA": "tab:green", "MLA wide RoPE": "tab:purple"}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for kind in CONTENDERS:
    for s in RACE["seeds"]:
        h = race[(kind, s)]
        axes[0].plot(h["eval_step"][1:], h["eval_loss"][1:], "o-", ms=3, lw=1, color=colours[kind], alpha=0.75,
                     ls="-" if s == RACE["seeds"][0] else "--", label=kind if s == RACE["seeds"][0] else None)
    axes[1].scatter(mean_loss[kind], final_loss[kind], color=colours[kind], s=30 + race_cache[kind], alpha=0.8,
                    label=f"{kind} ({race_cache[kind]} cached)")
axes[0].set_xlabel("step")
axes[0].set_ylabel("held-out loss (nats per response token)")
axes[0].set_title("Held-out loss during training (solid: seed 0, dashed: seed 1)", fontsize=10)
axes[0].legend(fontsize=8)
axes[1].set_xlabel("mean held-out loss over the run")
axes[1].set_ylabel("final held-out loss")
axes[1].set_title("Each run (marker area: cache per token)", fontsize=10)
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# Read the race with the noise in mind. The two seeds of one kind can differ as much as two kinds do, and another
# machine will give other numbers. Within a seed, every kind sees the same batches, so compare kinds seed by seed, and
# trust the mean over the run more than the final point. Three questions to put to the table and the plot:
#
# - *Does every kind learn?* Each curve should leave the plateau near 1.0 (the checks at the end assert a final loss
#   below 1.2 for every run). How far apart do the kinds end, against the spread between two seeds of one kind?
# - *Where does MLA with V2's proportions sit against MHA*, in the mean over the run (how early it learned) and at the
#   end? The next cell prints the gap seed by seed; a gap smaller than the seed-to-seed spread is no gap.
# - *Does the wide RoPE key change MLA's place?* It costs $d_h / 2$ more cached numbers per token per layer. Our task is
#   mostly about positions, and MLA carries position only in that one narrow key shared by all heads. If widening it
#   brings MLA level with MHA in every seed, the position channel is what held it back here; if it does not, look at
#   the latent width instead (exercise 4).
#
# Whatever the race shows, it can neither confirm nor refute the paper. The paper compares benchmark scores of MoE
# models with 16B and 250B parameters, $n_h = 128$ heads and $d_h^R = 64$; this race compares the held-out loss of
# models with the parameter counts printed above, 4 heads (8 at `full` scale) and a RoPE key of $d_h / 2$ numbers.
# The miniature reproduces the cache arithmetic exactly, as an identity; the quality claim it can only probe, and the
# ledger of section 8 records what this run found.

# %%
for s_ in RACE["seeds"]:
    order = sorted(CONTENDERS, key=lambda k: race[(k, s_)]["eval_loss"][-1])
    print(f"seed {s_}, final held-out loss, best first: " + ", ".join(
        f"{k} {race[(k, s_)]['eval_loss'][-1]:.3f}" for k in order))
gap = mean_loss["MLA"] - mean_loss["MHA"]
gap_wide = mean_loss["MLA wide RoPE"] - mean_loss["MHA"]
print(f"mean over the run, MLA minus MHA per seed: {', '.join(f'{g:+.3f}' for g in gap)}; "
      f"MLA wide RoPE minus MHA: {', '.join(f'{g:+.3f}' for g in gap_wide)}")

# %% [markdown]
# ## 4. Decoding at growing context lengths
#
# Now the cache's other cost, time. We take one model shape, width 256 with 8 heads of 32 in 2 layers, and build it
# with MHA, with GQA (2 key-value heads) and with MLA ($d_c = 128$, $d_h^R = 16$: V2's proportions). For each, a
# prefill of random tokens fills the cache up to a context length, then we time single-token decoding steps, and
# repeat at longer contexts. MLA decodes from one and the same cache in both modes. Each point is the fastest of a few
# steps (four at `small` scale), the one least disturbed by whatever else the machine runs.
#
# **What to expect, before any timing.** Per cached token and per layer, one decoding step costs, in multiply-adds and
# in numbers read from the cache:
#
# | attention | multiply-adds | numbers read | at this shape |
# |---|---|---|---|
# | MHA | $2 n_h d_h$ | $2 n_h d_h$ | 512 and 512 |
# | GQA | $2 n_h d_h$ | $2 n_g d_h$ | 512 and 128 |
# | MLA naive | $d_c\, n_h (d_h + d_h^v) + n_h (d_h + d_h^R + d_h^v)$ | $d_c + d_h^R$ | 66,176 and 144 |
# | MLA absorbed | $n_h (2 d_c + d_h^R)$ | $d_c + d_h^R$ | 2,176 and 144 |
#
# (Absorbed: a score against the latent, $d_c$, plus one against the RoPE key, $d_h^R$, plus the weighted sum of
# latents, $d_c$, for each of the $n_h$ heads.) Every row grows linearly with the context; they differ in slope. A step
# whose time follows the second column is compute-bound, one that follows the third is memory-bound, and which one a
# machine is depends on its ratio of arithmetic speed to memory bandwidth. That is why the timings below are something
# to look at on your own hardware, not a verdict on MLA.

# %%
DECODE = dslib.sized(small=dict(batch=4, contexts=(256, 512, 1024, 2048, 4096), steps=4),
                     full=dict(batch=8, contexts=(256, 512, 1024, 2048, 4096, 8192, 16384), steps=5))
D_DEC, H_DEC, L_DEC = 256, 8, 2
max_ctx = max(DECODE["contexts"])
torch.manual_seed(0)
dec_models = {
    "MHA": Transformer(TransformerConfig(vocab_size=V, d_model=D_DEC, n_layer=L_DEC, n_head=H_DEC,
                                         max_seq_len=max_ctx + 64)),
    "GQA": Transformer(TransformerConfig(vocab_size=V, d_model=D_DEC, n_layer=L_DEC, n_head=H_DEC, n_kv_head=2,
                                         max_seq_len=max_ctx + 64)),
    "MLA": MLATransformer(MLATransformerConfig(vocab_size=V, d_model=D_DEC, n_layer=L_DEC, n_head=H_DEC,
                                               kv_lora_rank=128, qk_nope_head_dim=32, qk_rope_head_dim=16,
                                               v_head_dim=32, max_seq_len=max_ctx + 64)),
}
prefix = torch.randint(0, V, (DECODE["batch"], max_ctx), generator=torch.Generator().manual_seed(0))
step_tokens = torch.randint(0, V, (DECODE["batch"], 1), generator=torch.Generator().manual_seed(1)).to(device)


def sync() -> None:
    """Wait for the GPU to finish (its calls return before the work is done), so that timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, cache, n: int) -> float:
    """Seconds of one decoding step at the cache's current length: the fastest of n steps after a warm-up (the least
    disturbed by whatever else the machine runs). Each step's own cache entry is dropped again."""
    start_len, times = cache.length, []
    for _ in range(n + 1):
        cache.length = start_len
        sync()
        t0 = time.perf_counter()
        model(step_tokens, cache=cache)
        sync()
        times.append(time.perf_counter() - t0)
    cache.length = start_len
    return min(times[1:])


decode_ms, cache_mib = {}, {}
t0 = time.time()
with torch.no_grad():
    for name, model in dec_models.items():
        model.to(device).eval()
        if isinstance(model, MLATransformer):
            cache = model.new_cache(DECODE["batch"], max_ctx + 8)
        else:
            cache = KVCache(model.config, DECODE["batch"], max_ctx + 8, device=device)
        filled = 0
        for ctx in DECODE["contexts"]:
            if isinstance(model, MLATransformer):
                model.mode = "naive"  # prefill through the fused kernel; the cache is the same in both modes
            model(prefix[:, filled:ctx].to(device), cache=cache)
            filled = ctx
            for mode in (("naive", "absorb") if isinstance(model, MLATransformer) else (None,)):
                label = name if mode is None else f"MLA {'absorbed' if mode == 'absorb' else 'naive'}"
                if mode is not None:
                    model.mode = mode
                decode_ms.setdefault(label, []).append(1000 * time_steps(model, cache, DECODE["steps"]))
                # the bytes a cache of exactly ctx positions holds (ours is preallocated a little longer)
                cache_mib.setdefault(label, []).append(cache.nbytes() * ctx / cache.max_len / 2**20)
decode_seconds = time.time() - t0
print(f"batch {DECODE['batch']}, {decode_seconds:.0f} s; ms per decoding step (the whole batch):")
print("context " + "".join(f"{ctx:>9}" for ctx in DECODE["contexts"]))
for label, ms in decode_ms.items():
    print(f"{label:<13}" + "".join(f"{v:9.1f}" for v in ms) + f"   cache at {max_ctx}: {cache_mib[label][-1]:.1f} MiB")

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
styles = {"MHA": ("tab:blue", "o-"), "GQA": ("tab:orange", "s-"), "MLA naive": ("tab:green", "^--"),
          "MLA absorbed": ("tab:green", "v-")}
for label, ms in decode_ms.items():
    colour, style = styles[label]
    axes[0].plot(DECODE["contexts"], ms, style, color=colour, label=label)
    axes[1].plot(DECODE["contexts"], cache_mib[label], style, color=colour, label=label)
for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(DECODE["contexts"], [f"{c:,}" for c in DECODE["contexts"]])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    low, high = ax.get_ylim()  # label the log axis at 1, 2, 5, 10, ... in plain numbers
    ax.set_yticks([v * 10.0 ** e for e in range(-2, 6) for v in (1, 2, 5) if low <= v * 10.0 ** e <= high])
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("context length (tokens)")
    ax.legend()
axes[0].set_ylabel("ms per decoding step")
n_threads = torch.get_num_threads()
where = f"{n_threads} CPU thread{'s' if n_threads > 1 else ''}" if device.type == "cpu" else device.type.upper()
axes[0].set_title(f"Decoding time, batch {DECODE['batch']}, {where}")
axes[1].set_ylabel("KV cache (MiB, float32)")
axes[1].set_title("Cache memory (both MLA modes share one cache)")
fig.tight_layout()
plt.show()

# %% [markdown]
# What to look for in the curves, and why. *Naive* MLA re-creates the keys and values of every cached token at every
# step, about 30 times the multiply-adds of the absorbed path at this shape (an identity of the table above, asserted
# in the checks), so its step time should grow fastest with the context. *Absorbed* MLA reads only the latents: about
# four times MHA's multiply-adds per cached token (4.25 at V2's proportions), but 3.6 times fewer numbers, because
# every head reads the same $d_c + d_h^R$ numbers instead of its own $2 d_h$. On a GPU, decoding is usually bound by
# memory bandwidth, and the fewer bytes should win at long contexts. A CPU has much less arithmetic to spare for each
# byte it reads, so there the two effects pull against each other and either can win at this small width; the ratio
# printed below at the longest context says which did on your machine. With more heads the byte saving grows
# ($n_h / 2.25$ against MHA at V2's proportions) while the extra arithmetic stays at about four times;
# `benchmarks/mla_decode.py` measures 16 heads, batch 8.
#
# GQA reads the fewest numbers here. When it decodes, `dslib.transformer.Attention` folds each group's query heads into
# the rows of its one key-value head, so the cache is read in place rather than copied once per query head. What a
# step also pays, whatever the context, is fixed work: the projections, the feed-forward block, the output head and
# Python's own overhead. Where the curves run flat at short contexts, that fixed work is what they show, and only the
# slopes at long contexts compare the caches.

# %%
mla_dec = dec_models["MLA"].config
per_token_cost = {  # multiply-adds and cached elements read, per cached token per layer, at one decoding step
    "MHA": (2 * H_DEC * (D_DEC // H_DEC), kv_cache_elements("MHA", n_head=H_DEC, head_dim=D_DEC // H_DEC)),
    "MLA naive": (mla_dec.kv_lora_rank * H_DEC * (mla_dec.qk_nope_head_dim + mla_dec.v_head_dim)
                  + H_DEC * (mla_dec.qk_head_dim + mla_dec.v_head_dim), mla_dec.cache_elements),
    "MLA absorbed": (H_DEC * (2 * mla_dec.kv_lora_rank + mla_dec.qk_rope_head_dim), mla_dec.cache_elements),
}
for label, (macs, elements) in per_token_cost.items():
    print(f"{label:<13} {macs:>7,} multiply-adds, {elements:>4} cached numbers read per token per layer; "
          f"{decode_ms[label][-1]:6.1f} ms per step at {max_ctx}")
speed_absorbed_vs_mha = decode_ms["MHA"][-1] / decode_ms["MLA absorbed"][-1]
speed_absorbed_vs_naive = decode_ms["MLA naive"][-1] / decode_ms["MLA absorbed"][-1]
cache_ratio_dec = cache_mib["MHA"][-1] / cache_mib["MLA absorbed"][-1]
print(f"at {max_ctx} tokens: absorbed MLA is {speed_absorbed_vs_naive:.1f}x faster than naive MLA and "
      f"{speed_absorbed_vs_mha:.2f}x MHA's speed, with a {cache_ratio_dec:.2f}x smaller cache")

# %% [markdown]
# ## 5. The real configurations
#
# Back to the models the paper compares. DeepSeek-V2 (60 layers) and V3 (61 layers) use MLA with $d_c = 512$ and
# $d_h^R = 64$; DeepSeek 67B (95 layers) and LLaMA-2-70B (80 layers) use GQA with 8 key-value heads of 128. For scale,
# we add V2's shape with MHA (128 heads of 128), the cache MLA replaces.
#
# Table 1 counts elements per token for the whole model, the per-layer count times $l$. For the two models of the
# paper's headline, in BF16 (2 bytes per element):
#
# $$\text{67B: } 2 \cdot 8 \cdot 128 \cdot 95 = 194{,}560 \text{ elements} = 389{,}120 \text{ B},\qquad
#   \text{V2: } (512 + 64) \cdot 60 = 34{,}560 \text{ elements} = 69{,}120 \text{ B}.$$
#
# The ratio is $34{,}560 / 194{,}560 = 0.178$, a cache 82.2% smaller. The abstract says 93.3%, and the cell below
# finds which number format for V2's cache makes that true.

# %%
REAL = {
    "DeepSeek 67B": dict(kind="GQA", n_layer=95, n_kv_head=8, head_dim=128),
    "LLaMA-2-70B": dict(kind="GQA", n_layer=80, n_kv_head=8, head_dim=128),
    "V2 shape with MHA": dict(kind="MHA", n_layer=60, n_head=128, head_dim=128),
    "DeepSeek-V2": dict(kind="MLA", n_layer=60, kv_lora_rank=512, qk_rope_head_dim=64),
    "DeepSeek-V3": dict(kind="MLA", n_layer=61, kv_lora_rank=512, qk_rope_head_dim=64),
}
real = {}
print(f"{'model':<18} {'kind':<4} {'layers':>6} {'per layer':>10} {'per token':>10} {'KiB/token':>10} "
      f"{'GiB at 128k':>12}  (BF16)")
for name, spec in REAL.items():
    spec = dict(spec)
    kind, n_layer = spec.pop("kind"), spec.pop("n_layer")
    per_layer_elems = kv_cache_elements(kind, **spec)
    kib = kv_cache_bytes(kind, n_layer=n_layer, **spec) / 2**10
    gib_128k = kv_cache_bytes(kind, n_layer=n_layer, tokens=128 * 1024, **spec) / 2**30
    real[name] = dict(kind=kind, n_layer=n_layer, per_layer=per_layer_elems, per_token=per_layer_elems * n_layer,
                      kib=kib, gib_128k=gib_128k, spec=spec)
    print(f"{name:<18} {kind:<4} {n_layer:>6} {per_layer_elems:>10,} {per_layer_elems * n_layer:>10,} {kib:>10.1f} "
          f"{gib_128k:>12.2f}")

# The paper's "-93.3% KV cache" of V2 against DeepSeek 67B.
bf16_67b = kv_cache_bytes("GQA", n_layer=95, n_kv_head=8, head_dim=128, dtype=torch.bfloat16)
v2_bf16 = kv_cache_bytes("MLA", n_layer=60, kv_lora_rank=512, qk_rope_head_dim=64, dtype=torch.bfloat16)
v2_6bit = kv_cache_bytes("MLA", n_layer=60, kv_lora_rank=512, qk_rope_head_dim=64, dtype=6)
saving_bf16, saving_6bit = 1 - v2_bf16 / bf16_67b, 1 - v2_6bit / bf16_67b
bits_for_933 = (1 - 0.933) * bf16_67b * 8 / real["DeepSeek-V2"]["per_token"]
print(f"\nV2 vs 67B, both BF16: {saving_bf16:.1%} smaller; V2 cache at 6 bits per element: {saving_6bit:.1%} smaller; "
      f"93.3% needs {bits_for_933:.2f} bits per V2 element")
print(f"MLA at V2's shape = GQA with {real['DeepSeek-V2']['per_layer'] / (2 * 128)} groups; "
      f"{real['V2 shape with MHA']['per_layer'] / real['DeepSeek-V2']['per_layer']:.1f}x smaller than MHA")
assert real["DeepSeek-V2"]["per_layer"] == 576 and real["V2 shape with MHA"]["per_layer"] == 32_768
assert round(saving_6bit, 3) == 0.933 and 0.81 < saving_bf16 < 0.83

# %% [markdown]
# Two things to read off. First, MLA's 576 numbers per layer are 57 times fewer than MHA's 32,768 at the same shape,
# and fewer than GQA with 8 groups (2,048): MLA's cache is that of GQA with 2.25 groups. Second, the headline of the
# paper's abstract, that V2 "reduces the KV cache by 93.3%" against DeepSeek 67B, is not the architecture alone. In
# BF16, V2's cache (60 layers of 576) is 82.2% smaller than 67B's (95 layers of 2,048). The paper serves V2 with its KV
# cache quantised to about 6 bits per element on average, and 6-bit V2 against BF16 67B gives 93.3%. Both numbers are
# true; they answer different questions.

# %%
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
names = list(real)
bar_colours = ["tab:orange", "tab:orange", "tab:blue", "tab:green", "tab:green"]
kibs = [real[n]["kib"] for n in names]
axes[0].barh(names, kibs, color=bar_colours)
axes[0].barh(["DeepSeek-V2 (6-bit cache)"], [v2_6bit / 2**10], color="tab:green", hatch="//", alpha=0.6)
for y, v in enumerate(kibs + [v2_6bit / 2**10]):
    axes[0].text(v * 1.1, y, f"{v:,.1f}", va="center", fontsize=8)
axes[0].set_xscale("log")
axes[0].set_xlim(10, 3e4)
axes[0].invert_yaxis()
axes[0].set_xlabel("KV cache per token (KiB, BF16 unless noted, log scale)")
axes[0].set_title("KV cache per token of the real models")
contexts = np.array([1, 2, 4, 8, 16, 32, 64, 128]) * 1024
for n, colour, style in zip(names, bar_colours, ["o-", "s--", "^-", "v-", "d--"]):
    axes[1].plot(contexts / 1024, real[n]["kib"] * contexts / 2**20, style, color=colour, label=n, ms=4)
axes[1].axhline(80, color="gray", ls=":", lw=1)
axes[1].text(1, 95, "80 GiB: one H100's memory", fontsize=8, color="gray")
axes[1].set_xscale("log", base=2)
axes[1].set_yscale("log")
axes[1].set_xlabel("context length (k tokens)")
axes[1].set_ylabel("KV cache of one sequence (GiB, BF16)")
axes[1].set_title("Cache of one sequence against context")
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 6. Past the original context: YaRN
#
# DeepSeek-V2 and V3 were pretrained on sequences of 4K tokens, yet both accept 128K. What stretches them is
# **YaRN** (Peng et al., arXiv 2309.00071), a change of RoPE's rotation speeds plus a short fine-tuning. V2's section
# 3.1.4 applies it "specifically ... to the decoupled shared key $k^R_t$ as it is responsible for carrying RoPE", with
# scale $s = 40$, $\alpha = 1$, $\beta = 32$ and a target length of 160K ($40 \times 4096 = 163{,}840$), then trains
# 1000 steps at 32K tokens (batch 576) and shows "Needle In A Haystack" results up to 128K (its Figure 4). V3 (section
# 4.3) goes 4K to 32K to 128K in two phases of 1000 steps with the same $s$, $\alpha$, $\beta$. The released
# `config.json` files say the same in the reference code's names: `"rope_scaling": {"type": "yarn", "factor": 40,
# "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1, "mscale": ..., "mscale_all_dim": ...}`,
# with both `mscale` values 0.707 in V2 and 1.0 in V3. `MLAConfig(rope_scaling=...)` takes that block as it is.
#
# **What goes wrong past 4K.** RoPE turns pair $i$ of the $d = d_h^R$ RoPE features by $\theta_i = \theta^{-2i/d}$
# radians per position (chapter 00), a wavelength of $\lambda_i = 2\pi/\theta_i$ tokens. Within the original context
# $L$, pair $i$ turns $r_i = L / \lambda_i$ times. Fast pairs ($r_i \gg 1$) have met every angle of their circle many
# times over during pretraining; a longer context shows them nothing new. Slow pairs ($r_i < 1$) never completed a turn:
# at position $40L$ they reach angles the model never saw, and that, not the length as such, is what breaks a RoPE
# model past its training length. Dividing every $\theta_i$ by $s$ (position interpolation) keeps all angles in range
# but blurs the fast pairs, which tell neighbouring tokens apart.
#
# **YaRN's answer**, the paper's "NTK-by-parts" interpolation with a temperature: keep the pairs that turn more than
# $\beta$ times in $L$, divide by $s$ those that turn fewer than $\alpha$ times, and blend in between. The released code
# (YaRN's, DeepSeek's reference and transformers') writes the blend as a ramp over the pair index. The boundary pairs
# are where $r_i$ equals $\beta$ (`beta_fast`) and $\alpha$ (`beta_slow`), rounded outward:
#
# $$i(r) = \frac{d \,\ln\!\big(L / (2\pi r)\big)}{2 \ln \theta},\qquad
#   \text{low} = \lfloor i(\beta_{fast}) \rfloor,\quad \text{high} = \lceil i(\beta_{slow}) \rceil,\qquad
#   \gamma_i = \mathrm{clamp}\Big(\frac{i - \text{low}}{\text{high} - \text{low}}, 0, 1\Big),\qquad
#   \theta'_i = (1 - \gamma_i)\,\theta_i + \gamma_i\, \frac{\theta_i}{s}.$$
#
# A longer context also flattens attention: the softmax spreads over more keys. YaRN sharpens it again by a factor
# $\sqrt{1/t} = 0.1 \ln s + 1$ on queries and keys, which multiplies the logits by its square. V2 "adjusts" it to
# $\sqrt t = 0.0707 \ln s + 1$, "due to our distinct attention mechanism"; that is `mscale_all_dim` = 0.707, since
# `yarn_mscale(s, m)` is $0.1\, m \ln s + 1$. In MLA only the $d_h^R$ RoPE features pass through cos and sin, so
# scaling those would sharpen only the RoPE part of each score. The reference code instead leaves cos and sin alone
# (their factor is `yarn_mscale(s, mscale) / yarn_mscale(s, mscale_all_dim)`, 1 when the two are equal) and
# multiplies the whole softmax scale $1/\sqrt{d_h + d_h^R}$ by `yarn_mscale(s, mscale_all_dim)` squared:
# `yarn_softmax_factor`. (DeepSeek's reference code switches YaRN on only when it is set up for sequences longer than
# `original_seq_len`; transformers and `dslib` switch it on whenever the block is present.)
#
# **Check against a slow reference.** The cell below writes $\theta'_i$ out pair by pair in Python floats (float64)
# and compares `rope_frequencies` with it for V2's and V3's blocks, a block with a smaller context and no rounding,
# and a narrow RoPE width; then the factors against the closed forms, and plain RoPE against `rope_cos_sin`.
# (`tests/test_mla.py` also checks the functions against transformers' YaRN for DeepSeek-V2/V3 configurations.)

# %%
import json
from importlib.resources import files

# The released config.json files, as transcribed in dslib/configs/ (chapter 04 reads them too).
released = {name: json.loads((files("dslib") / "configs" / f"deepseek-{name}.json").read_text())
            for name in ("v2", "v3")}
V2_YARN, V3_YARN = released["v2"]["rope_scaling"], released["v3"]["rope_scaling"]
for name, raw in released.items():  # (not `d`: section 3's model width keeps that name)
    print(f"{name}: rope_theta {raw['rope_theta']}, qk_rope_head_dim {raw['qk_rope_head_dim']}, "
          f"max_position_embeddings {raw['max_position_embeddings']:,}, rope_scaling {raw['rope_scaling']}")


def yarn_reference(dim: int, theta: float, block: dict) -> list[float]:
    """YaRN's rotation speeds theta'_i, one pair at a time in Python floats, from the formulas above."""
    s, L = block["factor"], block["original_max_position_embeddings"]
    low = dim * math.log(L / (2 * math.pi * block.get("beta_fast", 32))) / (2 * math.log(theta))
    high = dim * math.log(L / (2 * math.pi * block.get("beta_slow", 1))) / (2 * math.log(theta))
    if block.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    speeds = []
    for i in range(dim // 2):
        gamma = min(max((i - low) / (high - low if high != low else 0.001), 0.0), 1.0)
        theta_i = theta ** (-2 * i / dim)
        speeds.append((1 - gamma) * theta_i + gamma * theta_i / s)
    return speeds


yarn_errors = {}
for name, dim, block in (("V2", 64, V2_YARN), ("V3", 64, V3_YARN), ("V3, d^R = 8", 8, V3_YARN),
                         ("L = 512, s = 8, no rounding", 32, {**V3_YARN, "factor": 8,
                                                              "original_max_position_embeddings": 512,
                                                              "truncate": False})):
    ours, _ = rope_frequencies(dim, 10000.0, block)
    slow = torch.tensor(yarn_reference(dim, 10000.0, block), dtype=torch.float64)
    yarn_errors[name] = ((ours.double() - slow).abs() / slow).max().item()
    print(f"{name:<28} max relative |rope_frequencies - per-pair loop| = {yarn_errors[name]:.1e}")
assert max(yarn_errors.values()) < 1e-6, yarn_errors

v2_sqrt_t = 0.0707 * math.log(40) + 1  # V2, section 3.1.4
factors = {name: (rope_frequencies(64, 10000.0, b)[1], yarn_softmax_factor(b))
           for name, b in (("V2", V2_YARN), ("V3", V3_YARN), ("YaRN without mscale", {"type": "yarn", "factor": 40,
                                                                        "original_max_position_embeddings": 4096}))}
for name, (cos_factor, softmax_factor) in factors.items():
    print(f"{name:<20} factor on cos and sin {cos_factor:.4f}, on the softmax scale {softmax_factor:.4f}")
print(f"V2's sqrt(t) = 0.0707 ln 40 + 1 = {v2_sqrt_t:.4f}, squared {v2_sqrt_t ** 2:.4f}")
assert abs(factors["V2"][1] - v2_sqrt_t ** 2) < 1e-12 and factors["V2"][0] == factors["V3"][0] == 1.0
assert abs(factors["YaRN without mscale"][0] - (0.1 * math.log(40) + 1)) < 1e-12

long_positions = torch.arange(2 * 4096).expand(2, -1)
plain_is_exact = all(torch.equal(a, b) for none in (None, {}, {"rope_type": "default", "rope_theta": 1e4})
                     for a, b in zip(scaled_rope_cos_sin(long_positions, 64, 1e4, none),
                                     rope_cos_sin(long_positions, 64, 1e4)))
print(f"without scaling, scaled_rope_cos_sin == rope_cos_sin bit for bit: {plain_is_exact}")
assert plain_is_exact

# %% [markdown]
# A block with a field missing, or a rope type that `dslib` does not implement, is refused with the field's name:

# %%
for bad in ({"type": "yarn", "original_max_position_embeddings": 4096}, {"type": "yarn", "factor": 40},
            {"type": "linear", "factor": 4}, {**V3_YARN, "beta_fast": 0.5}):
    try:
        MLAConfig(rope_scaling=bad)
    except ValueError as e:
        print("ValueError:", e)

# %% [markdown]
# **The frequencies of DeepSeek-V3.** V3's RoPE key has $d_h^R = 64$ features, 32 pairs, $\theta = 10{,}000$, and its
# block says $s = 40$ from $L = 4096$. The left panel shows each pair's wavelength before and after YaRN, with the two
# boundary pairs; the right panel what a context of $sL = 163{,}840$ tokens shows each pair: the share of its circle
# that those positions reach but the first $L$ positions of pretraining never did (0 where pretraining already went
# round, or where the angles stay within the pretrained range).

# %%
DIM_R, THETA_R = released["v3"]["qk_rope_head_dim"], float(released["v3"]["rope_theta"])
L0, S0 = V3_YARN["original_max_position_embeddings"], V3_YARN["factor"]
inv_plain, _ = rope_frequencies(DIM_R, THETA_R)
inv_yarn, _ = rope_frequencies(DIM_R, THETA_R, V3_YARN)
low_r, high_r = yarn_correction_range(DIM_R, THETA_R, V3_YARN)
pairs = np.arange(DIM_R // 2)


def circle_swept(inv_freq: torch.Tensor, n_positions: int) -> np.ndarray:
    """Per pair, the share of the circle that the angles of positions 0 .. n_positions - 1 sweep (at most 1)."""
    return np.minimum(inv_freq.double().numpy() * (n_positions - 1) / (2 * np.pi), 1.0)


seen_in_training = circle_swept(inv_plain, L0)  # pretraining: plain RoPE, L0 positions
unseen = {"plain RoPE": np.clip(circle_swept(inv_plain, int(S0 * L0)) - seen_in_training, 0, None),
          "YaRN": np.clip(circle_swept(inv_yarn, int(S0 * L0)) - seen_in_training, 0, None)}

fig, axes = plt.subplots(1, 2, figsize=(12, 3.9))
ax = axes[0]
ax.axvspan(-0.5, low_r, color="tab:blue", alpha=0.08)
ax.axvspan(low_r, high_r, color="tab:purple", alpha=0.08)
ax.axvspan(high_r, DIM_R // 2 - 0.5, color="tab:green", alpha=0.08)
ax.semilogy(pairs, 2 * np.pi / inv_plain.numpy(), "o-", ms=3, color="tab:gray", label="plain RoPE")
ax.semilogy(pairs, 2 * np.pi / inv_yarn.numpy(), "s-", ms=3, color="tab:green", label=f"YaRN, s = {S0:g}")
for y, text in ((L0, f"original context {L0:,}"), (S0 * L0, f"s x original = {S0 * L0:,.0f}")):
    ax.axhline(y, color="black", ls=":", lw=1)
    ax.text(0, y * 1.4, text, fontsize=8)
for x, text in ((low_r, f"pair {low_r}: {V3_YARN['beta_fast']} turns in {L0:,}\n(beta_fast)"),
                (high_r, f"pair {high_r}: {V3_YARN['beta_slow']} turn in {L0:,}\n(beta_slow)")):
    ax.axvline(x, color="tab:purple", ls="--", lw=1)
    ax.text(x + 0.3, 3, text, fontsize=7.5, color="tab:purple")
ax.text(1, 2e6, "kept", fontsize=8, color="tab:blue")
ax.text(high_r + 1, 2e6, f"divided by {S0:g}", fontsize=8, color="tab:green")
ax.set_xlabel(f"RoPE pair i ({DIM_R} features, {DIM_R // 2} pairs)")
ax.set_ylabel("wavelength 2 pi / theta_i (tokens)")
ax.set_title("DeepSeek-V3's RoPE key, before and after YaRN", fontsize=10)
ax.legend(loc="lower right", bbox_to_anchor=(1, 0.13), fontsize=8)
width = 0.4
axes[1].bar(pairs - width / 2, unseen["plain RoPE"], width, color="tab:gray", label="plain RoPE")
axes[1].bar(pairs + width / 2, unseen["YaRN"], width, color="tab:green", label="YaRN")
axes[1].axvline(low_r, color="tab:purple", ls="--", lw=1)
axes[1].axvline(high_r, color="tab:purple", ls="--", lw=1)
axes[1].text(1, 0.5, f"largest share: plain RoPE {unseen['plain RoPE'].max():.1%},\n"
             f"YaRN {unseen['YaRN'].max():.3%} (too small to see)", fontsize=8)
axes[1].set_xlabel("RoPE pair i")
axes[1].set_ylabel("share of the circle")
axes[1].set_title(f"Angles at {S0 * L0:,.0f} positions that {L0:,} positions never reached", fontsize=10)
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# The same in numbers: the largest angle that the slowest and the fastest pair reach within the original context and
# within $s$ times it, with and without YaRN, and how many pairs each region holds. Pairs up to `low` have a ramp of 0,
# so their speeds must be the plain ones bit for bit; pairs from `high` on have a ramp of 1, so theirs must be exactly
# the plain ones divided by $s$.

# %%
last_trained, last_extended = L0 - 1, int(S0 * L0) - 1  # the last position of each context
angle_table = {}
for name, i in (("slowest", DIM_R // 2 - 1), ("fastest", 0)):
    angle_table[name] = dict(pair=i, trained=inv_plain[i].item() * last_trained,
                             plain=inv_plain[i].item() * last_extended, yarn=inv_yarn[i].item() * last_extended)
    a = angle_table[name]
    print(f"{name} pair ({i}): largest angle {a['trained']:,.3f} rad within {L0:,} positions; at {last_extended + 1:,} "
          f"positions {a['plain']:,.3f} rad with plain RoPE, {a['yarn']:,.3f} rad with YaRN "
          f"({a['yarn'] / a['trained']:.5f} x the trained one)")
kept_exact = torch.equal(inv_yarn[:low_r + 1], inv_plain[:low_r + 1])
divided_exact = torch.equal(inv_yarn[high_r:], inv_plain[high_r:] / S0)
region_sizes = dict(kept=low_r + 1, ramp=high_r - low_r - 1, divided=DIM_R // 2 - high_r)
never_turned = int((seen_in_training < 1).sum())
print(f"pairs kept 0-{low_r}: {region_sizes['kept']} (speeds unchanged bit for bit: {kept_exact}); "
      f"on the ramp: {region_sizes['ramp']}; divided by {S0:g} from pair {high_r}: {region_sizes['divided']} "
      f"(exactly: {divided_exact})")
print(f"{never_turned} pairs never complete a turn in {L0:,} positions; the largest unseen share of a circle at "
      f"{last_extended + 1:,} positions is {unseen['plain RoPE'].max():.1%} with plain RoPE, "
      f"{unseen['YaRN'].max():.4%} with YaRN")
assert kept_exact and divided_exact
assert unseen["plain RoPE"].max() > 0.5 and unseen["YaRN"].max() < 1e-3
assert abs(angle_table["fastest"]["yarn"] - angle_table["fastest"]["plain"]) < 1e-6 * angle_table["fastest"]["plain"]

# %% [markdown]
# Read the two panels with the numbers. The pairs that never complete a turn within 4K are the ones YaRN divides by
# $s$: at 40 times the context, a slowest pair divided by 40 ends where it ended in pretraining (the ratio printed
# above, a hair over 1 because the last position of a context is $sL - 1$, not $s(L - 1)$). Plain RoPE instead takes
# those pairs round most of a circle they never saw. The fast pairs left of `low` keep their exact speeds: they had
# seen every angle anyway, and they keep telling neighbouring tokens apart as sharply as before. What interpolation
# costs is visible too: position $p$ now turns a divided pair as far as position $p/40$ did in pretraining, so two
# tokens 40 positions apart are as close on those pairs as two neighbours used to be. That, and the ramp pairs whose
# speeds match no pretrained pair, is what V2's 1000 steps at 32K and V3's two phases teach the model.
#
# **An MLA model past its original context.** YaRN lives entirely in cos and sin and in the softmax scale, so the
# cached vectors of section 2 are unchanged in kind: $k^R$ is still stored already rotated, now by YaRN's angles. The
# check of section 2, run past a (toy) original context: a small random MLA model with `rope_scaling` = YaRN, $s = 4$
# from $L = 32$, fed 128 tokens, first a prefill, then a chunk that crosses position 32, then one token at a time up to
# $4L$, against one uncached forward. The same weights without `rope_scaling` give the comparison with plain RoPE.

# %%
TOY_YARN = {"rope_type": "yarn", "factor": 4, "original_max_position_embeddings": 32, "mscale": 1.0,
            "mscale_all_dim": 1.0}
T_LONG = int(TOY_YARN["factor"] * TOY_YARN["original_max_position_embeddings"])
long_ids = torch.randint(0, V, (2, T_LONG), generator=torch.Generator().manual_seed(0))
past_errors, past_logits, past_scale = {}, {}, {}
for name, scaling in (("plain RoPE", None), ("YaRN", TOY_YARN)):
    torch.manual_seed(0)  # the same weights for both: rope_scaling changes no parameter
    cfg = MLATransformerConfig(vocab_size=V, d_model=64, n_layer=2, n_head=4, q_lora_rank=32, kv_lora_rank=32,
                               qk_nope_head_dim=16, qk_rope_head_dim=16, v_head_dim=16, init_std=0.1,
                               max_seq_len=T_LONG, rope_scaling=scaling)
    model_long = MLATransformer(cfg).eval()
    past_scale[name] = model_long.layers[0].attn.softmax_scale * math.sqrt(cfg.qk_head_dim)
    with torch.no_grad():
        past_logits[name] = model_long(long_ids)  # no cache: the naive path over all 128 positions
        for mode in MODES:
            model_long.mode = mode
            cache = model_long.new_cache(batch_size=2, max_len=T_LONG)
            parts = [model_long(long_ids[:, :24], cache=cache), model_long(long_ids[:, 24:40], cache=cache)]
            parts += [model_long(long_ids[:, i:i + 1], cache=cache) for i in range(40, T_LONG)]
            past_errors[(name, mode)] = (torch.cat(parts, 1) - past_logits[name]).abs().max().item()
    print(f"{name:<10} softmax scale x sqrt(d_h + d_h^R) = {past_scale[name]:.4f}; max |cached - uncached| over "
          f"{T_LONG} positions: naive {past_errors[(name, 'naive')]:.1e}, absorbed {past_errors[(name, 'absorb')]:.1e}")
L_toy = TOY_YARN["original_max_position_embeddings"]
yarn_shift = {span: (past_logits["YaRN"][:, sl] - past_logits["plain RoPE"][:, sl]).abs().max().item()
              for span, sl in (("inside", slice(0, L_toy)), ("past", slice(L_toy, T_LONG)))}
print(f"YaRN against plain RoPE, same weights: max |logit difference| {yarn_shift['inside']:.3f} at positions < "
      f"{L_toy}, {yarn_shift['past']:.3f} past them (logits of size {past_logits['YaRN'].abs().max():.2f})")
assert max(past_errors.values()) < 1e-4, past_errors
assert abs(past_scale["YaRN"] - yarn_softmax_factor(TOY_YARN)) < 1e-9 and abs(past_scale["plain RoPE"] - 1) < 1e-12
assert yarn_shift["inside"] > 0 and yarn_shift["past"] > 0

# %% [markdown]
# Two things to take from the cell. The cache keeps working past the original context: with YaRN on, the naive and
# the absorbed decode match the uncached forward to float32 rounding, as the errors printed above show, across the
# chunk that straddles position 32 and the single steps up to 128. And YaRN is not a switch that matters only past $L$:
# with the same weights, the logits move inside the original context as well, since the divided pairs turn more
# slowly at every position and the softmax scale grows by the squared factor at every position (the printed
# differences say by how much for this random model). A released model is therefore fine-tuned with YaRN on, and it
# is the YaRN block in its `config.json`, not the pretraining one, that a faithful reimplementation has to apply.

# %% [markdown]
# ## 7. Explore the cache
#
# Move the shape of a model: heads, head width, GQA groups, MLA's latent and RoPE widths, layers, context and the
# number format. The bars show the cache of one sequence for each kind of attention. (Where no widget front end runs,
# as in CI, the explorer shows its defaults: DeepSeek-V2's shape at 32k tokens in BF16.)

# %%
FORMATS = {"bf16": torch.bfloat16, "fp8": 8, "fp32": torch.float32, "6-bit": 6, "4-bit": 4}


def show_cache(n_head=128, head_dim=128, gqa_groups=8, kv_lora_rank=512, qk_rope_head_dim=64, n_layer=60,
               context=32_768, dtype="bf16"):
    shape = dict(n_head=n_head, head_dim=head_dim, n_kv_head=min(gqa_groups, n_head), kv_lora_rank=kv_lora_rank,
                 qk_rope_head_dim=qk_rope_head_dim)
    gib = {kind: kv_cache_bytes(kind, n_layer=n_layer, tokens=context, dtype=FORMATS[dtype], **shape) / 2**30
           for kind in KINDS}
    fig, ax = plt.subplots(figsize=(7, 2.6))
    bars = ax.bar(list(gib), list(gib.values()), color=[colours[k] for k in gib])
    for bar, kind in zip(bars, gib):
        elements = kv_cache_elements(kind, **shape)
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{gib[kind]:.2f} GiB\n{elements:,}/layer",
                ha="center", va="bottom", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylim(min(gib.values()) / 3, max(gib.values()) * 8)
    ax.set_ylabel("GiB per sequence (log scale)")
    groups = (kv_lora_rank + qk_rope_head_dim) / (2 * head_dim)
    ax.set_title(f"{n_layer} layers, {context:,} tokens, {dtype}: MLA is {gib['MHA'] / gib['MLA']:.1f}x smaller "
                 f"than MHA, = GQA with {groups:.2f} groups", fontsize=9)
    plt.show()


explore(show_cache, n_head=(8, 248, 8), head_dim=(32, 224, 32), gqa_groups=(1, 15, 1), kv_lora_rank=(64, 960, 64),
        qk_rope_head_dim=(16, 112, 16), n_layer=(4, 116, 4), context=[32_768, 4096, 8192, 16_384, 65_536, 131_072],
        dtype=list(FORMATS))

# %% [markdown]
# ## 8. Claims ledger
#
# What the paper claims next to what this chapter measured. The rows are of two sorts. The cache sizes, the 2.25
# groups and the equality of the absorbed and naive paths are identities: they hold by construction, and a row that
# failed would mean a bug. The quality and speed rows are measurements of this run's small models; each is judged by
# the condition written in the cell, and the speed-up of a whole serving system is marked not comparable, since
# nothing here resembles it.

# %%
mha_final, mla_final = final_loss["MHA"].mean(), final_loss["MLA"].mean()
wide_final = final_loss["MLA wide RoPE"].mean()
race_text = ", ".join(f"{k} {final_loss[k].mean():.3f}" for k in KINDS)
mla_holds = bool(mla_final <= mha_final)
order_holds = bool(final_loss["MHA"].mean() < final_loss["GQA"].mean() < final_loss["MQA"].mean())
max_equivalence = max(max(equivalence_errors.values()), max(reference_errors.values()))

ledger = Ledger("03")
ledger.add("MLA caches d_c + d_h^R numbers per token per layer",
           "576 against 32,768 for MHA at n_h = d_h = 128, d_c = 512, d_h^R = 64 (V2, Table 1)",
           f"{per_layer['MLA']:,} against {per_layer['MHA']:,} (formula); allocated bytes of all four caches == "
           f"formula", per_layer["MLA"] == 576 and per_layer["MHA"] == 32_768)
ledger.add("MLA's cache equals GQA with 2.25 groups", "2.25 groups (V2, section 2.1.4)",
           f"{groups_equivalent} groups", groups_equivalent == 2.25)
ledger.add("V2 reduces the KV cache by 93.3% against DeepSeek 67B", "-93.3% (V2, abstract)",
           f"-{saving_6bit:.1%} with V2's cache at 6 bits per element against 67B in BF16; -{saving_bf16:.1%} "
           f"with both in BF16", round(saving_6bit, 3) == 0.933,
           "the 93.3% includes V2's KV-cache quantisation (about 6 bits per element); MLA alone gives 82%")
ledger.add("W^UK and W^UV can be absorbed: attention runs on the latents, keys and values are never formed",
           "the same output (V2, section 2.1.2)",
           f"absorbed == naive == uncached forward, max error {max_equivalence:.0e} (float32)",
           max_equivalence < 1e-4)
ledger.add("Absorption makes decoding cheaper than decompressing the cache",
           "no need to compute keys and values during inference (V2, section 2.1.2)",
           f"absorbed {speed_absorbed_vs_naive:.0f}x faster than naive at {max_ctx} tokens ({device.type.upper()}, "
           f"batch {DECODE['batch']})", speed_absorbed_vs_naive > 1)
ledger.add("A smaller cache speeds up generation",
           "5.76x maximum throughput of V2 against 67B (8 H800 GPUs, FP8 weights, 6-bit cache)",
           f"absorbed MLA {speed_absorbed_vs_mha:.2f}x MHA's decoding speed with a {cache_ratio_dec:.1f}x smaller "
           f"cache ({device.type.upper()}, {L_DEC} layers, {H_DEC} heads)", None,
           "not comparable: the paper measures a whole serving system on GPUs; here one small model, and absorbed "
           "MLA does about 4x MHA's arithmetic per cached token, which a CPU feels; see benchmarks/mla_decode.py")
ledger.add("MLA is at least as good as MHA", "'stronger' than MHA (V2, Table 1; Appendix D.2: benchmarks of MoE "
           "models of about 16B and 250B parameters)",
           f"final held-out loss MLA {mla_final:.3f} vs MHA {mha_final:.3f}; MLA wide RoPE {wide_final:.3f} "
           f"({len(RACE['seeds'])} seeds, {race_params['MHA'] / 1e3:.0f}k parameters)", mla_holds,
           "" if mla_holds else "a tiny model, 0.5M tokens, loss instead of benchmarks, on a task about positions: "
           "MLA carries position only in a narrow RoPE key shared by all heads (8 numbers here)")
ledger.add("Sharing key-value heads costs quality: MHA > GQA > MQA",
           "MHA ahead of GQA and MQA on hard benchmarks (V2, Appendix D.1, 7B dense models)",
           f"final held-out loss {race_text}", order_holds,
           "" if order_holds else "the differences are within the noise of two short runs per kind")
past_error = max(past_errors.values())
ledger.add("YaRN extends the context from 4K to 128K (s = 40, alpha = 1, beta = 32)",
           "NIAH good up to 128K after 1000 steps at 32K (V2, section 3.1.4 and Figure 4; V3, section 4.3)",
           f"the mechanism only, V3's RoPE key: at {S0 * L0:,.0f} positions plain RoPE reaches up to "
           f"{unseen['plain RoPE'].max():.0%} of a circle its slow pairs never saw in {L0:,}, YaRN "
           f"{unseen['YaRN'].max():.2%}; pairs 0-{low_r} keep their speeds exactly", None,
           "not comparable: no long-context fine-tuning or needle test here; the chapter checks the frequencies "
           "against a per-pair loop (and the tests against transformers), not the quality")
ledger.add("V2 adjusts YaRN's attention factor to sqrt(t) = 0.0707 ln s + 1", "0.0707 ln 40 + 1 (V2, section 3.1.4)",
           f"mscale_all_dim 0.707 of V2's config.json: softmax scale x {factors['V2'][1]:.4f} = "
           f"({v2_sqrt_t:.4f})^2; cos and sin x {factors['V2'][0]:g}", abs(factors["V2"][1] - v2_sqrt_t ** 2) < 1e-12)
ledger.add("YaRN is applied to the decoupled shared key k^R, which carries RoPE", "V2, section 3.1.4",
           f"rope_scaling changes only cos and sin of the d_h^R features and the softmax scale; absorbed and naive "
           f"decode == uncached forward up to {T_LONG} positions, {TOY_YARN['factor']:g}x a toy original context, "
           f"max error {past_error:.0e}", past_error < 1e-4)
ledger.show()
saved_to = ledger.save()  # _build/ledger/03.json: `python -m dslib.book ledger` prints every chapter's rows

# %% [markdown]
# ## What you learned
#
# - **The KV cache is the cost of decoding.** MHA keeps $2 n_h d_h$ numbers per token per layer; GQA and MQA shrink it
#   by letting query heads share key-value heads, and V2's Table 1 (here `kv_cache_elements`, checked against the
#   paper's numbers and against the bytes the caches allocate) puts the four kinds side by side.
# - **MLA caches a summary, not the keys.** A latent $c^{KV}_t$ of $d_c$ numbers per token, from which low-rank
#   up-projections rebuild every head's key and value (V2, eqs. 9-11), plus one RoPE key $k^R_t$ shared by all heads:
#   $d_c + d_h^R = 576$ numbers at V2's shape, the cache of GQA with 2.25 groups.
# - **Decoupled RoPE** exists because a position-dependent rotation between $W^{UQ}_i$ and $W^{UK}_i$ would stop the
#   up-projection from moving onto the query; the score splits into a position-free part and a small RoPE part.
# - **Absorption is associativity.** Move $W^{UK}_i$ onto the query and $W^{UV}_i$ past the weighted sum, and decoding
#   becomes multi-query attention over the latents, with the same output as the naive path up to rounding (checked
#   against a per-head loop from Appendix C).
# - **Reading a headline.** V2's "93.3% smaller" than DeepSeek 67B is 82.2% from the architecture in BF16 and the rest
#   from a cache of about 6 bits per element.
# - **YaRN stretches RoPE, not the cache.** Past the 4K of pretraining, the slow RoPE pairs would meet angles they
#   never saw; YaRN divides them by $s = 40$, keeps the fast ones, ramps between, and sharpens the softmax
#   (`mscale_all_dim`). In MLA it touches only the decoupled $k^R$ and $q^R$ and the softmax scale, so the cache and
#   both decoding paths work unchanged past the original context.
# - **What the miniature can and cannot say.** The cache arithmetic is reproduced exactly; the quality and speed of
#   MLA at this size are measured, and the ledger records where they agree with the paper and where they cannot.
#
# **Next.** Chapter 04 assembles DeepSeek-V3-mini: MLA in every layer (this chapter's `MLA` and `MLACache`),
# DeepSeekMoE from chapter 02, and the one piece of V3 still missing, multi-token prediction (V3, section 2.2), used
# also as a draft for speculative decoding.
#
# ## Exercises
#
# Difficulty: ★ (a few minutes), ★★ (an experiment), ★★★ (a small project).
#
# 1. ★ **A cache budget.** Say 40 GiB of a GPU are left for the cache once the weights are loaded. How many sequences
#    of 32k tokens fit with DeepSeek-V3's MLA cache (61 layers) in BF16? How many with the same shape and MHA
#    (128 heads of 128)? And how many key-value groups could a GQA model of 61 layers, heads of 128, have and still
#    fit as many sequences as MLA?
#
#    <details><summary>Hint</summary><code>kv_cache_bytes(kind, n_layer=61, tokens=32_768, ...)</code> gives the
#    bytes of one sequence; divide the budget by it and round down.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    budget = 40 * 2**30
#    one_sequence = {
#        "MLA": kv_cache_bytes("MLA", n_layer=61, tokens=32_768, kv_lora_rank=512, qk_rope_head_dim=64),
#        "MHA": kv_cache_bytes("MHA", n_layer=61, tokens=32_768, n_head=128, head_dim=128),
#        **{f"GQA {g}": kv_cache_bytes("GQA", n_layer=61, tokens=32_768, n_kv_head=g, head_dim=128)
#           for g in (1, 2, 3)},
#    }
#    for name, nbytes in one_sequence.items():
#        print(f"{name:<6} {nbytes / 2**30:7.2f} GiB per sequence, {int(budget // nbytes)} sequences")
#    ```
#    MLA needs 2.14 GiB per sequence, so 18 fit. MHA at the same shape needs 122 GiB for one sequence: none fits, and
#    the model could not serve a single 32k context from this budget. GQA fits at least 18 with 2 groups (20
#    sequences) but not with 3 (13): the 2.25 groups of section 1, rounded down. All of this is Table 1's arithmetic;
#    which quality each choice buys is the question of section 3.
#    </details>
#
# 2. ★★ **Break the decoupling.** Write a variant of `MLA` that applies RoPE to $q^C$ and $k^C$ after decompression (and
#    drops $q^R$, $k^R$). The naive path still works. Try to write its absorbed path, and find where the
#    position-dependent rotation gets in the way.
#
#    <details><summary>Hint</summary>Set <code>qk_rope_head_dim</code> aside and rotate <code>k_nope</code> in the naive
#    branch of <code>forward</code> with <code>apply_rope(k_nope, cos_k, sin_k)</code>, where the key angles come from
#    the positions of all <code>s</code> keys, not of the <code>t</code> new tokens. Then write the score
#    $(R_t W^{UQ}_i c^Q_t)^\top (R_j W^{UK}_i c^{KV}_j)$ and try to pull $W^{UK}_i$ out of it.</details>
#    <details><summary>Solution</summary>
#
#    The naive path needs only the angles of every cached position, since it rebuilds the keys anyway:
#
#    ```python
#    class RotatedMLA(MLA):
#        """RoPE on the decompressed keys and queries; no decoupled part (naive path only)."""
#
#        def forward(self, x, cos, sin, mask=None, cache=None, mode="naive"):
#            c = self.c
#            q_nope, _ = self.queries(x, cos, sin)  # ignore q^R
#            kv, _ = self.latents(x, cos, sin)  # ignore k^R
#            if cache is not None:
#                kv, _ = cache.update(self.layer, kv, torch.zeros_like(kv[..., :c.qk_rope_head_dim]))
#            s, t = kv.shape[1], x.shape[1]  # keys so far, new tokens (positions 0..s-1: no packed rows)
#            pos = torch.arange(s, device=x.device).expand(x.shape[0], s)
#            cos_k, sin_k = rope_cos_sin(pos, c.qk_nope_head_dim, c.rope_theta)
#            cos_q, sin_q = cos_k[:, s - t:], sin_k[:, s - t:]
#            k_nope, v = rearrange(self.wkv_b(kv), "b s (h d) -> b h s d", h=c.n_head).split(
#                [c.qk_nope_head_dim, c.v_head_dim], dim=-1)
#            q, k = apply_rope(q_nope, cos_q, sin_q), apply_rope(k_nope, cos_k, sin_k)
#            y = _attend(q, k, v, mask, c.qk_nope_head_dim ** -0.5)
#            return self.wo(rearrange(y, "b h t d -> b t (h d)"))
#    ```
#
#    (`rearrange` is einops', and `_attend` is the helper of section 2.) To try it in a model, swap the class of each
#    layer's attention, `for blk in model.layers: blk.attn.__class__ = RotatedMLA`; the RoPE weights stay, unused. The
#    cached-versus-full check of section 2 should pass for it: the naive path rebuilds every key, so rotating them is
#    no obstacle. For the absorbed path, write the score as
#    $c^{Q\top}_t \big(W^{UQ\top}_i R_{j-t} W^{UK}_i\big) c^{KV}_j$. An absorbed query would be the row vector
#    $c^{Q\top}_t W^{UQ\top}_i R_{j-t} W^{UK}_i$, and it is a different vector for every cached $j$, since $R_{j-t}$
#    changes with $j$ and does not commute with $W^{UK}_i$. Computing it for every $j$ costs more than rebuilding
#    $W^{UK}_i c^{KV}_j$, which is the naive path. That is V2's argument in section 2.1.3.
#    </details>
#
# 3. ★★ **The position channel.** Rerun the race with `qk_rope_head_dim` of 4, 8, 16 and 32 at three seeds. Does the
#    width of the shared RoPE key explain MLA's place? What does it cost in cache?
#
#    <details><summary>Hint</summary><code>race_model</code> hard-codes two RoPE widths; build the model yourself with
#    <code>MLATransformerConfig(..., qk_rope_head_dim=r)</code> and train it with the same <code>Trainer</code> call as
#    section 3. The cache cost is
#    <code>kv_cache_elements("MLA", kv_lora_rank=4 * dh, qk_rope_head_dim=r)</code>.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    seeds = (0, 1, 2)
#    data_by_seed = {seed: PackedData([doc.text for doc in world.corpus()], tok, SEQ_LEN, RACE["batch"], seed=seed)
#                    for seed in seeds}
#    rope_runs = {}
#    for r in (4, 8, 16, 32):
#        for seed in seeds:
#            torch.manual_seed(seed)
#            model_r = MLATransformer(MLATransformerConfig(
#                vocab_size=V, d_model=d, n_layer=RACE["n_layer"], n_head=H, kv_lora_rank=4 * dh,
#                qk_nope_head_dim=dh, qk_rope_head_dim=r, v_head_dim=dh, max_seq_len=128))
#            tr = Trainer(model_r, data_by_seed[seed], TrainConfig(
#                steps=RACE["steps"], lr=3e-3, warmup_steps=30, schedule="cosine", eval_every=RACE["steps"] // 5,
#                seed=seed), eval_batches=valid, device=device)
#            rope_runs[(r, seed)] = np.mean(tr.fit(progress=False)["eval_loss"][1:])
#        print(r, kv_cache_elements("MLA", kv_lora_rank=4 * dh, qk_rope_head_dim=r),
#              np.mean([rope_runs[(r, s)] for s in seeds]))
#    ```
#    A RoPE width of `r` adds `r` numbers per token per layer to the latent's $4 d_h$, a small cost next to MHA's
#    $2 n_h d_h$. Compare the mean losses with MHA's over the same seeds (`mean_loss["MHA"]`): if the loss falls
#    steadily with `r` and reaches MHA's, the narrow position channel explains MLA's place on this positional task;
#    if it is flat, it does not. The parameter counts differ slightly between widths (`wq` and `wkv_a` grow with
#    `r`); for a strict comparison, adjust `intermediate_size` as `matched_width` does.
#    </details>
#
# 4. ★★ **The latent width.** Sweep `kv_lora_rank` (8, 16, 32, 64) and plot final held-out loss against cached elements
#    per token, next to GQA and MQA. Where does MLA stop paying for itself?
#
#    <details><summary>Hint</summary>The same loop as exercise 3, varying <code>kv_lora_rank</code> with
#    <code>qk_rope_head_dim=dh // 2</code>; the x axis is <code>kv_lora_rank + dh // 2</code>, and the points of GQA
#    and MQA are <code>race_cache</code> and <code>final_loss</code> from section 3.</details>
#    <details><summary>Solution</summary>
#
#    Train each width as in exercise 3 and keep each run's final held-out loss, then plot:
#
#    ```python
#    ranks, final = (8, 16, 32, 64), {}
#    for rank in ranks:
#        for seed in RACE["seeds"]:
#            torch.manual_seed(seed)
#            model_k = MLATransformer(MLATransformerConfig(
#                vocab_size=V, d_model=d, n_layer=RACE["n_layer"], n_head=H, kv_lora_rank=rank,
#                qk_nope_head_dim=dh, qk_rope_head_dim=dh // 2, v_head_dim=dh, max_seq_len=128))
#            data_k = PackedData([doc.text for doc in world.corpus()], tok, SEQ_LEN, RACE["batch"], seed=seed)
#            tr = Trainer(model_k, data_k, TrainConfig(
#                steps=RACE["steps"], lr=3e-3, warmup_steps=30, schedule="cosine", eval_every=RACE["steps"] // 5,
#                seed=seed), eval_batches=valid, device=device)
#            final[(rank, seed)] = tr.fit(progress=False)["eval_loss"][-1]
#    plt.plot([r + dh // 2 for r in ranks], [np.mean([final[(r, s)] for s in RACE["seeds"]]) for r in ranks],
#             "o-", color=colours["MLA"], label="MLA")
#    for k in ("MHA", "GQA", "MQA"):
#        plt.scatter(race_cache[k], final_loss[k].mean(), color=colours[k], label=k)
#    plt.xscale("log"); plt.xlabel("cached elements per token per layer"); plt.ylabel("final held-out loss")
#    plt.legend(); plt.show()
#    ```
#    MLA pays for itself where its curve lies below the line joining MQA, GQA and MHA: at the same cache, a lower
#    loss. Note that `kv_lora_rank` must stay at most `d_model` (the config refuses more: a latent cannot carry more
#    rank than the hidden state it compresses), and that MQA's cache at this shape, $2 d_h$, equals MLA's with
#    $d_c = 1.5\, d_h$.
#    </details>
#
# 5. ★★ **Quantise the cache.** Store `MLACache.kv` in 8 bits per number (absmax scaling per token) and measure the
#    logit error against float32. How many bits does V2 need for its 93.3%, and what would 4 bits give?
#
#    <details><summary>Hint</summary>After a prefill, replace each <code>cache.kv[layer][:, :cache.length]</code> by
#    its round trip through int8: divide by <code>amax / 127</code> per token, round, multiply back. Then decode the
#    next token with the cache and compare with the uncached logits. For the bytes, <code>kv_cache_bytes</code> takes a
#    number of bits as <code>dtype</code>.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    def fake_quant(x, bits):
#        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / (2 ** (bits - 1) - 1)
#        return (x / scale).round() * scale
#
#    mla = m.eval()  # the last model the race trained (MLA wide RoPE, last seed)
#    ids = torch.randint(0, V, (2, 24), device=device)
#    with torch.no_grad():
#        full = mla(ids)[:, -1]
#        for bits in (8, 6, 4):
#            cache = mla.new_cache(batch_size=2, max_len=24)
#            mla(ids[:, :23], cache=cache)
#            cache.kv = [fake_quant(t, bits) for t in cache.kv]
#            err = (mla(ids[:, 23:], cache=cache)[:, -1] - full).abs().max().item()
#            v2 = kv_cache_bytes("MLA", n_layer=60, kv_lora_rank=512, qk_rope_head_dim=64, dtype=bits)
#            saving = 1 - v2 / bf16_67b
#            print(f"{bits} bits: max logit error {err:.1e}; V2's cache would be {saving:.1%} smaller than 67B's")
#    ```
#    The savings are arithmetic: 6 bits give 93.3% (`bits_for_933` in section 5 is the exact break-even), 8 bits
#    91.1%, 4 bits 95.6%. The errors are this model's; expect each 2 bits removed to make them about 4 times larger,
#    since the rounding step doubles with every bit. (A real 6-bit cache also stores the per-token scales; this sketch
#    ignores their bytes, and leaves `pe` unquantised.)
#    </details>
#
# 6. ★★★ **Roofline.** From the table of multiply-adds and numbers read in section 4, compute the arithmetic per byte
#    of MHA and of absorbed MLA. Measure your machine's matrix-multiply speed and memory bandwidth, predict the head
#    count at which absorbed MLA overtakes MHA, and check it with `python benchmarks/mla_decode.py --n-head ...`.
#
#    <details><summary>Hint</summary>Per cached token, MHA does $2 n_h d_h$ multiply-adds on $2 n_h d_h$ numbers, one
#    per number whatever $n_h$. Absorbed MLA does $n_h (2 d_c + d_h^R)$ on $d_c + d_h^R$ numbers, so its intensity grows
#    with $n_h$. Time a large <code>torch.mm</code> for the first machine number and a large <code>tensor.clone()</code>
#    for the second.</details>
#    <details><summary>Solution</summary>
#
#    With $F$ multiply-adds per second and $B$ bytes per second, a step's time per cached token is roughly the larger of
#    (multiply-adds)$/F$ and (bytes)$/B$. In float32 (4 bytes), MHA does $2 n_h d_h$ multiply-adds on $8 n_h d_h$ bytes,
#    0.25 per byte at any head count; absorbed MLA at V2's proportions ($d_c = 4 d_h$, $d_h^R = d_h / 2$) does
#    $8.5\, n_h d_h$ on $18 d_h$ bytes, $0.47\, n_h$ per byte. MHA is memory-bound wherever $F > B/4$, nearly
#    everywhere, so its time is $8 n_h d_h / B$. Absorbed MLA is faster when both of its terms are below that: its bytes
#    term $18 d_h / B$ is, for every $n_h \ge 3$; its arithmetic term $8.5\, n_h d_h / F$ is when $F > 1.06\, B$,
#    whatever $n_h$. So this simple model predicts a machine property more than a head count: where arithmetic clearly
#    outruns memory (GPUs), absorbed MLA wins from 3 heads on; where $F$ is close to $B$, it loses at every head
#    count. Real kernels reach only part of $F$ on these small, oddly shaped products, and every step has fixed work,
#    so a measured crossover, if there is one, lies at more heads than the model says. Run the benchmark at
#    `--n-head 4`, `8`, `16` and `32` and compare.
#    </details>
#
# 7. ★ **Where YaRN's boundaries fall.** Keep V3's RoPE key (64 features) and $s = 40$. How many pairs does YaRN keep,
#    ramp and divide if pretraining had used 32K tokens instead of 4K? And at 4K with $\theta = 500{,}000$ (Llama 3's
#    base)? Compare each time with the number of pairs that never complete a turn in pretraining.
#
#    <details><summary>Hint</summary><code>yarn_correction_range(64, theta, {**V3_YARN,
#    "original_max_position_embeddings": L})</code> gives (low, high): pairs up to low are kept, pairs from high on are
#    divided. A pair never completes a turn when <code>inv_freq * (L - 1) &lt; 2 pi</code>.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    for L, theta in ((4096, 1e4), (32_768, 1e4), (4096, 5e5)):
#        low, high = yarn_correction_range(64, theta, {**V3_YARN, "original_max_position_embeddings": L})
#        inv, _ = rope_frequencies(64, theta)
#        never = int((inv * (L - 1) < 2 * math.pi).sum())
#        print(f"L {L:>6,}, theta {theta:>9,.0f}: kept {low + 1}, ramp {high - low - 1}, divided {32 - high}; "
#              f"{never} pairs never turn")
#    ```
#    V3 as released: 11 kept, 12 on the ramp, 9 divided, and 9 pairs never turn. With 32K of pretraining: 18, 12, 2,
#    and 2; with $\theta = 500{,}000$ at 4K: 8, 8, 16, and 16. The divided pairs are exactly those that never complete a
#    turn, because `high` is the pair that turns once ($\beta_{slow} = 1$), rounded up. A longer pretraining context
#    leaves YaRN less to divide; a larger base slows every pair, so more of them need it.
#    </details>
#
# ## Checks
#
# The chapter's key measurements, asserted (this is what the test suite checks).

# %%
assert max(reference_errors.values()) < 1e-5 and max(equivalence_errors.values()) < 1e-4
assert packed_error < 1e-5
# Arithmetic on the published shapes (identities, which guard the formulas' code, not measurements).
assert per_layer["MLA"] == 576 and per_layer["MHA"] == 32_768 and groups_equivalent == 2.25
assert round(saving_6bit, 3) == 0.933 and 0.81 < saving_bf16 < 0.83
# Measured: the bytes the caches allocate equal the formula.
assert all(measured[k] == kv_cache_bytes(k, n_layer=3, tokens=50, batch_size=2, dtype=torch.float32, **shape)
           for k in KINDS)
assert abs(cache_ratio_dec - kv_cache_elements("MHA", n_head=H_DEC, head_dim=D_DEC // H_DEC)
           / mla_dec.cache_elements) < 1e-9
# YaRN: the frequencies match a per-pair loop, the slow pairs stay in their pretrained range at 40x the context
# (and leave it without YaRN), the fast ones keep their speeds, and the cache still decodes exactly past the
# original context.
assert max(yarn_errors.values()) < 1e-6 and plain_is_exact and kept_exact and divided_exact
assert unseen["plain RoPE"].max() > 0.5 and unseen["YaRN"].max() < 1e-3
assert max(past_errors.values()) < 1e-4 and abs(factors["V2"][1] - v2_sqrt_t ** 2) < 1e-12
# Decoding work per cached token, counted from the configs (arithmetic, not a timing: timings belong to benchmarks/):
# naive MLA re-creates keys and values.
assert per_token_cost["MLA naive"][0] > 25 * per_token_cost["MLA absorbed"][0]
assert per_token_cost["MLA absorbed"][1] * 3.5 < per_token_cost["MHA"][1]
# Every kind learns (the loss falls from above 4 to below 1.2 on every seed), nothing leaks the answer (the loss
# stays above 0.3, where a model that sees the future would fall far lower), and MLA ends within 20% of MHA.
for k in CONTENDERS:
    assert 0.3 < final_loss[k].max() < 1.2 and race[(k, RACE["seeds"][0])]["eval_loss"][0] > 4, (k, final_loss[k])
assert mla_final < 1.2 * mha_final, (mla_final, mha_final)
print(f"chapter 03 checks passed; {time.time() - CHAPTER_START:.0f} s since set-up")

# %% [markdown]
# The worked solutions that take seconds run here as well, so that the test suite checks them with the chapter:
# exercises 1, 2 (it defines the class only), 5 and 7. Exercise 3 trains models, and is left to the reader.

# %%
solution_seconds = run_solutions("03", globals(), (1, 2, 5, 7))
print("worked solutions run:", ", ".join(f"exercise {n} ({t:.1f} s)" for n, t in solution_seconds.items()))
