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
# # Chapter 02 · Mixture-of-Experts: DeepSeekMoE, and how V2 and V3 balance it
#
# [![Open in Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/deepseek-from-scratch/deepseek-from-scratch/blob/main/chapters/02_moe.ipynb)
# [![Binder](https://mybinder.org/badge_logo.svg)](https://mybinder.org/v2/gh/deepseek-from-scratch/deepseek-from-scratch/main?labpath=chapters%2F02_moe.ipynb)
#
# **What you will build.** The feed-forward layer of DeepSeek-V2 and V3, and the machinery that keeps it balanced:
#
# 1. `dslib.moe`: `MoEConfig`; a router (`Router`) with softmax gating (GShard, DeepSeekMoE) and V3's sigmoid gating,
#    group-limited routing and V3's selection bias; stacked SwiGLU experts (`Experts`) whose dispatch sorts tokens by
#    expert; the `MoE` layer with always-active shared experts, laid out like transformers' `DeepseekV3MoE` so that a
#    checkpoint maps onto it; each piece checked against a slow loop (section 2);
# 2. balancing: DeepSeekMoE's expert- and device-level losses, V3's sequence-wise loss, the auxiliary-loss-free bias
#    `update_bias` (Wang et al., adopted by V3), and the load metrics MaxVio and routing entropy (section 3);
# 3. `MoETransformer`, a small language model whose feed-forward blocks are MoE layers and which trains with
#    `dslib.train` unchanged (section 4);
# 4. experiments on the arithmetic world: dense vs GShard-style top-2 vs DeepSeekMoE at equal activated and total
#    parameters; no balancing vs an auxiliary loss vs the bias; disabling top experts and the shared expert; where the
#    tokens go (sections 5-7), an explorer (section 8) and a claims ledger (section 9).
#
# **What you need.** Chapter 00: its decoder (`dslib.transformer.Transformer`, with `SwiGLU`, `RMSNorm` and
# `Attention`), its trainer (`dslib.train.Trainer`, whose `loss_fn` and `after_step` hooks this chapter uses) and the
# arithmetic world (`dslib.world`). Chapter 01 is not needed. The hand-written backward of section 2 reads more easily
# if you have met `torch.autograd.Function` before, but the chapter explains each line of it. **How long.** The chapter
# is budgeted at about 3 minutes at `small` scale on 2 CPU cores; most of that is the ten short training runs of
# section 5 (five models, two seeds).
#
# **Papers.** DeepSeekMoE (arXiv 2401.06066), sections 3-4; DeepSeek-V2 (arXiv 2405.04434), section 2.2 (device-limited
# routing, balance losses); DeepSeek-V3 (arXiv 2412.19437), section 2.1.2 (sigmoid gating, auxiliary-loss-free
# balancing, the sequence-wise loss). Auxiliary-loss-free balancing and its measure MaxVio were introduced by Wang et
# al., "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts" (arXiv 2408.15664); V3 adopts the method
# and cites that paper. Names follow DeepSeek-V3's reference configuration and transformers' DeepseekV3.
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

import matplotlib.pyplot as plt
import numpy as np
import torch
from tqdm.auto import tqdm

import dslib
from dslib.book import Ledger, run_solutions
from dslib.explore import explore
from dslib.train import TrainConfig, Trainer, evaluate_loss
from dslib.transformer import SwiGLU, Transformer, TransformerConfig
from dslib.world import PackedData, World

# One CPU thread at small scale: the models are tiny, and one thread is much less disturbed by other programs on a
# shared machine.
device = dslib.setup(seed=0, threads=dslib.sized(small=1, full=None))
SCALE = dslib.scale()
CHAPTER_START = time.time()

# %% [markdown]
# ## 1. The idea: many small experts, a few always on
#
# A transformer's feed-forward network (FFN) holds most of its parameters. A **Mixture-of-Experts** (MoE) layer keeps
# $N$ FFNs, the *experts*, and lets a router send each token to only $K$ of them: the model has $N$ FFNs' worth of
# parameters and spends $K$ FFNs' worth of computation per token. GShard (2020) used $K = 2$ of $N$ experts. For a token
# $u_t$ with affinities $s_{i,t} = \mathrm{Softmax}_i(u_t^\top e_i)$ (each expert $i$ has a learned centroid $e_i$):
#
# $$h_t = \sum_{i=1}^{N} g_{i,t}\,\mathrm{FFN}_i(u_t) + u_t,\qquad g_{i,t} = s_{i,t}\ \text{if}\ s_{i,t} \in
#   \mathrm{Topk}(\{s_{j,t}\}, K),\ \text{else}\ 0.$$
#
# DeepSeekMoE (arXiv 2401.06066, section 3) changes two things.
#
# - **Fine-grained experts.** Split each expert into $m$ experts of $1/m$ the width and route to $mK$ of the $mN$: the
#   same parameters and the same computation, but far more ways to combine experts. With $N = 16$, $K = 2$, $m = 4$:
#   $\binom{16}{2} = 120$ combinations become $\binom{64}{8} \approx 4.4 \times 10^9$. Each expert can be narrower in
#   what it knows.
# - **Shared experts.** $K_s$ experts see every token, so knowledge that every token needs (the common part) is not
#   copied into every routed expert. The router then picks $mK - K_s$ of the $mN - K_s$ routed experts:
#
# $$h_t = u_t + \sum_{i=1}^{K_s} \mathrm{FFN}^{(s)}_i(u_t) + \sum_{i=1}^{mN-K_s} g_{i,t}\,\mathrm{FFN}^{(r)}_i(u_t).$$
#
# The 2B model of the paper has 1 shared and 63 routed experts of a quarter of a standard FFN, 1 + 7 active: its Pile
# loss is 1.808 against GShard's 1.867 at the same size and computation. DeepSeek-V2 (236B, 2 shared + 160 routed, 6
# active) and V3 (671B, 1 shared + 256 routed, 8 active) keep the design and change the routing, as we will see.

# %%
def combinations(n: int, k: int) -> int:
    return math.comb(n, k)


combos = {"GShard, 2 of 16": combinations(16, 2), "DeepSeekMoE, 8 of 64 (m = 4)": combinations(64, 8),
          "DeepSeekMoE 2B, 7 of 63 routed": combinations(63, 7), "DeepSeek-V3, 8 of 256 routed": combinations(256, 8)}
for name, n in combos.items():
    print(f"{name:<32} {n:>22,} combinations")
assert combos["GShard, 2 of 16"] == 120 and round(combos["DeepSeekMoE, 8 of 64 (m = 4)"] / 1e9, 1) == 4.4

# %% [markdown]
# The count is an identity, not a measure of quality: it says how many different teams of experts a token can be
# given, not that the model will use them well. The paper's argument is that a narrow expert can hold a narrower piece
# of knowledge, and a token assembles what it needs from several of them. Whether that pays is an empirical question,
# which DeepSeekMoE answers with its Pile losses and section 5 asks again at toy scale.
#
# Why this matters for DeepSeek: V3 has 671B parameters but spends about 37B per token, a ratio of roughly 18 to 1.
# Every later chapter that trains a DeepSeek-shaped model (chapter 04's V3-mini, and through it the rest of the course)
# uses the layer built here.
#
# ## 2. Build: router, experts, dispatch
#
# `MoEConfig` uses the names of DeepSeek-V3's configuration: `n_routed_experts`, `num_experts_per_tok` ($K_r$),
# `n_shared_experts`, `moe_intermediate_size` (one expert's width), `scoring_func`, `n_group` and `topk_group`,
# `norm_topk_prob`, `routed_scaling_factor`. The three alphas are the balance losses of section 3. For scale, V3's
# reference configuration (`config_671B.json`) sets 256 routed experts of width 2048, 8 chosen per token, 1 shared
# expert, sigmoid scoring, `n_group` = 8 and `topk_group` = 4, normalised weights and a scaling factor of 2.5. The
# defaults here are a small sigmoid-gated layer (width 64, 8 experts, 2 chosen) with the other features switched off.
#
# The first exported cell opens the module `dslib.moe`: its docstring, its imports (the module builds on chapter 00's
# `dslib.transformer` and `dslib.train`) and the two scoring functions.

# %%
#| default_exp moe

# %%
#| export
"""DeepSeekMoE (arXiv 2401.06066) and the routing and balancing of DeepSeek-V2 (arXiv 2405.04434, section 2.2) and
DeepSeek-V3 (arXiv 2412.19437, section 2.1.2): fine-grained routed experts plus always-active shared experts, softmax or
sigmoid gating with group-limited top-k routing, the expert-, device- and sequence-level balance losses, the
auxiliary-loss-free bias, load metrics, sorted dispatch, and a small MoE language model (chapter 02)."""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from dslib.train import batch_loss
from dslib.transformer import Attention, RMSNorm, SwiGLU, Transformer, TransformerConfig

SCORING_FUNCS = ("softmax", "sigmoid")
# How a group of experts is scored (config.json's `topk_method`): V3's sum of its two best biased affinities, V2's
# best affinity, or no groups at all (V2-Lite).
TOPK_METHODS = ("noaux_tc", "group_limited_greedy", "greedy")


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1

# %% [markdown]
# Then `MoEConfig`. It is checked when it is built, because a bad MoE configuration often fails far from its cause: a
# group count that does not divide the experts breaks a `view` deep inside the router, and too few experts in the kept
# groups makes `topk` raise on the first batch. The one rule that is not obvious: the `topk_group` kept groups must
# hold at least $K_r$ experts between them, or a token cannot find $K_r$ experts to choose.

# %%
#| export
@dataclass
class MoEConfig:
    """One MoE layer, with DeepSeek-V3's reference names.

    d_model: hidden size. moe_intermediate_size: the width of one routed expert (a SwiGLU). n_routed_experts routed
    experts, of which num_experts_per_tok are chosen per token (K_r); n_shared_experts shared experts always run, as one
    SwiGLU of width n_shared_experts * moe_intermediate_size (0: none). scoring_func: "softmax" (GShard, DeepSeekMoE,
    V2) or "sigmoid" (V3). Group-limited routing: the experts form n_group equal groups, and only the topk_group best
    groups are searched; topk_method says how a group scores: "noaux_tc" (V3's node-limited routing: the sum of its
    two best biased affinities), "group_limited_greedy" (V2's device-limited routing: its best affinity) or "greedy"
    (no group limit, whatever n_group says: V2-Lite). norm_topk_prob: divide the chosen affinities by their
    sum; the gating weights are then multiplied by routed_scaling_factor. Balance: aux_loss_alpha (DeepSeekMoE's
    expert-level alpha_1), device_loss_alpha (alpha_2, over n_devices equal groups of experts), seq_aux_alpha (V3's
    complementary sequence-wise alpha). init_std: the normal initialisation of the router and the experts."""

    d_model: int = 64
    moe_intermediate_size: int = 32
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 0
    scoring_func: str = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    aux_loss_alpha: float = 0.0
    n_devices: int = 1
    device_loss_alpha: float = 0.0
    seq_aux_alpha: float = 0.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str):
            raise ValueError(f"MoEConfig.{name}={getattr(self, name)!r} is invalid: {allowed}")

        for name in ("d_model", "moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group",
                     "topk_group", "n_devices"):
            if not _is_positive_int(getattr(self, name)):
                bad(name, "a positive int is required")
        n = self.n_routed_experts
        if not isinstance(self.n_shared_experts, int) or isinstance(self.n_shared_experts, bool) \
                or self.n_shared_experts < 0:
            bad("n_shared_experts", "a non-negative int is required")
        if self.scoring_func not in SCORING_FUNCS:
            bad("scoring_func", f"one of {SCORING_FUNCS} is required")
        if self.topk_method not in TOPK_METHODS:
            bad("topk_method", f"one of {TOPK_METHODS} is required")
        if self.num_experts_per_tok > n:
            bad("num_experts_per_tok", f"at most n_routed_experts={n} is allowed")
        if n % self.n_group:
            bad("n_group", f"a divisor of n_routed_experts={n} is required")
        if self.topk_group > self.n_group:
            bad("topk_group", f"at most n_group={self.n_group} is allowed")
        if self.topk_group * (n // self.n_group) < self.num_experts_per_tok:
            bad("topk_group", f"topk_group x experts per group ({n // self.n_group}) must be at least "
                              f"num_experts_per_tok={self.num_experts_per_tok}")
        if n % self.n_devices:
            bad("n_devices", f"a divisor of n_routed_experts={n} is required")
        if not isinstance(self.norm_topk_prob, bool):
            bad("norm_topk_prob", "a bool is required")
        for name in ("aux_loss_alpha", "device_loss_alpha", "seq_aux_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                bad(name, "a non-negative number is required")
        for name in ("routed_scaling_factor", "init_std"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                bad(name, "a positive number is required")

    @property
    def experts_per_group(self) -> int:
        return self.n_routed_experts // self.n_group

    def to_dict(self) -> dict:
        return asdict(self)

# %% [markdown]
# A bad configuration fails at once, with the field, its value and what is allowed:

# %%
config_errors = {}
for bad in (dict(n_routed_experts=8, num_experts_per_tok=9), dict(n_routed_experts=10, n_group=4),
            dict(n_routed_experts=8, n_group=2, topk_group=3), dict(n_routed_experts=8, n_group=4, topk_group=1,
                                                                   num_experts_per_tok=3),
            dict(scoring_func="relu"), dict(topk_method="group_max")):
    try:
        MoEConfig(**bad)
    except ValueError as e:
        config_errors[str(bad)] = str(e)
        print("ValueError:", e)
assert len(config_errors) == 6

# %% [markdown]
# ### The router
#
# The router scores every routed expert for every token, then chooses. Two scoring functions:
#
# - **softmax** (GShard, DeepSeekMoE, V2): $s_{i,t} = \mathrm{Softmax}_i(u_t^\top e_i)$;
# - **sigmoid** (V3, eq. 15): $s_{i,t} = \sigma(u_t^\top e_i)$, each expert scored on its own.
#
# V3 chooses with a **bias** $b_i$ added to the affinities, and weights with the affinities alone (eq. 16, 13):
#
# $$g'_{i,t} = s_{i,t}\ \text{if}\ s_{i,t} + b_i \in \mathrm{Topk}(\{s_{j,t} + b_j\}, K_r),\ \text{else}\ 0;\qquad
#   g_{i,t} = \frac{g'_{i,t}}{\sum_j g'_{j,t}}\ (\texttt{norm\_topk\_prob}),$$
#
# and the reference code multiplies $g$ by `routed_scaling_factor` (2.5 in V3). The bias is how V3 balances the load
# without a loss (section 3); it changes which experts a token visits but never how much their outputs weigh.
#
# **Group-limited routing.** In V2 and V3 the experts of a layer sit on different devices (V3: nodes), and a token sent
# to many of them costs communication. Both split the experts into `n_group` = 8 groups, keep the `topk_group` best
# groups and mask the rest; they differ in how a group scores, and the released config.json names the rule in
# `topk_method`. For a group $G$ of experts:
#
# $$\text{V2 (\texttt{group\_limited\_greedy})}:\ \mathrm{score}_G = \max_{i \in G} s_{i,t};\qquad
#   \text{V3 (\texttt{noaux\_tc})}:\ \mathrm{score}_G = \sum_{\text{the 2 largest } i \in G} (s_{i,t} + b_i).$$
#
# V2's device-limited routing (section 2.2.2) picks the $M$ devices that hold the single best experts, then the top
# $K$ among their experts only ($M = 3$ of 8 devices; "$M \ge 3$ is about as good as unlimited"). V3's node-limited
# routing keeps 4 of 8 nodes by the sum of their two best biased affinities: "two" is $K_r / M = 8 / 4$, because if a
# token's 8 experts are to come from 4 nodes, each kept node should offer about two good ones. A group with one strong
# expert and nothing else wins under V2's rule and can lose under V3's. V2-Lite, on one device, routes `greedy`: the
# top $K$ of all experts, no groups. The masked experts get $-\infty$, so the final `topk` cannot pick them.
# Affinities are computed in float32, as in transformers' `DeepseekV3TopkRouter`.
#
# **Shapes.** For $N$ tokens of width $d$ and $E$ routed experts: the input `x` is (N, d), the centroids `weight`
# (E, d), the affinities `scores` (N, E) in float32; the result holds `indices` (N, $K_r$) and `weights` (N, $K_r$).
# The bias `e_score_correction_bias` (E,) is a buffer, not a parameter: the optimizer never sees it (so no learning
# rate or weight decay touches it), yet it is saved in the `state_dict` under the name V3's checkpoints use.
#
# **Where the router's gradient comes from.** `topk` returns indices, which carry no gradient. The router learns only
# through `weights = scores.gather(1, indices)`: the language-model loss reaches the centroids $e_i$ of the *chosen*
# experts through their gating weights, and the balance losses of section 3 reach every $e_i$ through $P_i$. That is
# why the choice uses `scores.detach()`: adding the bias must never open a gradient path of its own. One more
# difference between the two gatings: with softmax and `norm_topk_prob=False` (GShard, DeepSeekMoE) a token's weights
# sum to less than 1, and a token unsure of its experts gets a smaller routed output; with sigmoid the affinities do
# not compete, so V3 normalises the chosen ones to sum to 1 before scaling.

# %%
#| export
@dataclass
class Routing:
    """What a router decided for N tokens: the chosen experts `indices` (N, k), their gating weights `weights` (N, k)
    and every affinity `scores` (N, E) (softmax or sigmoid of the logits, without the bias)."""

    indices: torch.Tensor
    weights: torch.Tensor
    scores: torch.Tensor


class Router(nn.Module):
    """Top-k gating of DeepSeekMoE (softmax) and DeepSeek-V3 (sigmoid), as in transformers' DeepseekV3TopkRouter.

    s_{i,t} = Softmax_i(u_t^T e_i) or sigmoid(u_t^T e_i), in float32 (V3, eq. 15). Selection uses s_{i,t} + b_i, with b_i
    the auxiliary-loss-free bias `e_score_correction_bias` (V3, eq. 16). With n_group > 1, only the topk_group best
    groups are searched, a group scoring as the sum of its top-2 biased affinities (topk_method "noaux_tc": V3's
    node-limited routing, as in its reference code) or as its best affinity ("group_limited_greedy": V2's
    device-limited routing); "greedy" searches every expert. Gating weights come from the unbiased s_{i,t} of the
    chosen experts, divided by their sum when norm_topk_prob (V3, eq. 13), then multiplied by routed_scaling_factor.

    `disabled_top` (default 0) is an ablation knob (DeepSeekMoE, section 4.5): it removes each token's disabled_top
    best experts from the choice, which then takes the next k."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.d_model))  # e_i, one row per expert
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32))
        self.disabled_top = 0
        nn.init.normal_(self.weight, std=config.init_std)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Affinities s (N, E) of tokens x (N, d), in float32."""
        logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.config.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def select(self, scores: torch.Tensor) -> torch.Tensor:
        """The chosen experts (N, k) for affinities (N, E): top-k of scores + bias within the topk_group best groups."""
        c = self.config
        choice = scores.detach() + self.e_score_correction_bias  # the bias steers the choice, never the weights
        if c.n_group > 1 and c.topk_method != "greedy":
            by_group = choice.view(-1, c.n_group, c.experts_per_group)
            if c.topk_method == "noaux_tc":  # V3: the sum of the group's two best
                group_scores = by_group.topk(min(2, c.experts_per_group), dim=-1).values.sum(dim=-1)  # (N, n_group)
            else:  # group_limited_greedy, V2: the group's best
                group_scores = by_group.max(dim=-1).values
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(c.topk_group, dim=-1).indices, True)
            choice = choice.masked_fill(~keep.repeat_interleave(c.experts_per_group, dim=1), float("-inf"))
        k, r = c.num_experts_per_tok, self.disabled_top
        if r:
            if r + k > (c.topk_group * c.experts_per_group if c.topk_method != "greedy" else c.n_routed_experts):
                raise ValueError(f"disabled_top={r} leaves fewer than {k} experts to choose from")
            return choice.topk(k + r, dim=-1).indices[:, r:]
        return choice.topk(k, dim=-1).indices

    def forward(self, x: torch.Tensor) -> Routing:
        """x (N, d) -> Routing(indices (N, k), weights (N, k) float32, scores (N, E) float32)."""
        c = self.config
        scores = self.scores(x)
        indices = self.select(scores)
        weights = scores.gather(1, indices)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return Routing(indices, weights * c.routed_scaling_factor, scores)



# %% [markdown]
# **Check against a slow router.** One token at a time, in float64, straight from the equations: the affinities, the
# biased scores, each group's score (its two best summed, or its best), the kept groups, the top $K_r$ among their
# experts, and the weights. Random weights and a random bias, both scoring functions, without groups and with each of
# the three rules. The router must choose the same
# experts and give the same weights; the bias must change the choice but leave the weights as the unbiased affinities;
# every normalised token's weights must sum to `routed_scaling_factor`.

# %%
def route_reference(router: Router, x: torch.Tensor) -> tuple[list[set[int]], list[dict[int, float]]]:
    """For each token of x (N, d): the set of chosen experts and their gating weights, by a loop in float64."""
    c = router.config
    W, b = router.weight.detach().double(), router.e_score_correction_bias.double()
    chosen, weights = [], []
    for u in x.double():
        logits = W @ u
        s = torch.sigmoid(logits) if c.scoring_func == "sigmoid" else torch.softmax(logits, dim=0)
        biased = (s + b).tolist()
        allowed = list(range(c.n_routed_experts))
        if c.n_group > 1 and c.topk_method != "greedy":
            size = c.experts_per_group
            top_two = c.topk_method == "noaux_tc"  # V3 sums a group's two best; V2 takes its best
            group_score = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:2]) if top_two
                           else max(biased[g * size:(g + 1) * size]) for g in range(c.n_group)]
            best = sorted(range(c.n_group), key=lambda g: -group_score[g])[:c.topk_group]
            allowed = [i for g in best for i in range(g * size, (g + 1) * size)]
        top = sorted(allowed, key=lambda i: -biased[i])[:c.num_experts_per_tok]
        total = sum(float(s[i]) for i in top) if c.norm_topk_prob else 1.0
        chosen.append(set(top))
        weights.append({i: float(s[i]) / total * c.routed_scaling_factor for i in top})
    return chosen, weights


router_errors = {}
torch.manual_seed(0)
for scoring in SCORING_FUNCS:
    for n_group, topk_group, method in ((1, 1, "noaux_tc"), (4, 2, "greedy"), (4, 2, "group_limited_greedy"),
                                        (4, 2, "noaux_tc")):  # V3's rule last: the cell below uses it
        cfg = MoEConfig(d_model=16, n_routed_experts=16, num_experts_per_tok=4, scoring_func=scoring, n_group=n_group,
                        topk_group=topk_group, topk_method=method, norm_topk_prob=scoring == "sigmoid",
                        routed_scaling_factor=2.5, init_std=0.5)
        router = Router(cfg)
        router.e_score_correction_bias.normal_(0, 0.05)
        x = torch.randn(64, 16)
        with torch.no_grad():
            r = router(x)
        chosen, weights = route_reference(router, x)
        same_choice = all(set(row) == ch for row, ch in zip(r.indices.tolist(), chosen))
        err = max(abs(w - weights[t][i]) for t, (row, ws) in enumerate(zip(r.indices.tolist(), r.weights.tolist()))
                  for i, w in zip(row, ws))
        router_errors[(scoring, n_group, method)] = err
        print(f"{scoring:>7}, {n_group} group(s), {method:>20}: same experts {same_choice}, "
              f"max |weight - loop| = {err:.1e}")
        assert same_choice and err < 1e-6

# The bias changes the choice, not the weights; group limiting never leaves the kept groups.
router.e_score_correction_bias.zero_()
with torch.no_grad():
    before = router(x)
    router.e_score_correction_bias[3] = 2.0  # more than two sigmoid affinities can sum to: every token picks expert 3
    after = router(x)
moved = (before.indices != after.indices).any(dim=1).float().mean().item()
weights_are_unbiased = torch.allclose(after.weights, 2.5 * after.scores.gather(1, after.indices)
                                      / after.scores.gather(1, after.indices).sum(1, keepdim=True))
max_groups = max(len(set(g)) for g in (after.indices // cfg.experts_per_group).tolist())
print(f"bias +2 on expert 3: {moved:.0%} of tokens changed experts, expert 3 chosen by "
      f"{(after.indices == 3).any(1).float().mean():.0%}; weights still from the unbiased affinities: "
      f"{weights_are_unbiased}; at most {max_groups} of {cfg.n_group} groups used per token")
assert moved > 0.5 and weights_are_unbiased and (after.indices == 3).any(1).all() and max_groups <= cfg.topk_group
assert torch.allclose(after.weights.sum(1), torch.full((64,), 2.5))

# %% [markdown]
# Why these checks are the right ones. The reference loop uses Python's `sorted` and float64, and shares no code with
# the router, so an agreement is unlikely to be a shared bug. Comparing the *sets* of chosen experts, not the index
# tensors, avoids a false alarm: `topk` may return the same experts in another order. The bias test pushes one expert
# far above the others and asks two questions at once, whether the choice moved and whether the weights stayed with
# the unbiased affinities. That is the property that lets V3 balance without changing the function the layer computes
# for a given choice. The last assertion is an identity: normalised weights times the scaling factor must sum to 2.5.
#
# ### The experts and the dispatch
#
# Every expert is a SwiGLU, $\mathrm{FFN}_i(u) = W^{down}_i(\mathrm{silu}(W^{gate}_i u) \odot W^{up}_i u)$. The
# experts' weights are stacked, `gate_proj` and `up_proj` of shape (E, I, d) and `down_proj` (E, d, I), as in
# transformers' `DeepseekV3Experts` (which fuses gate and up into one `gate_up_proj`): slice $i$ of each is the weight
# of an `nn.Linear`, so a checkpoint's per-expert matrices `experts.{i}.gate_proj.weight` map by `torch.stack`.
#
# Computing a token's experts one token at a time is hopeless: $K_r$ tiny matrix-vector products per token. The
# dispatch works on all the tokens at once:
#
# 1. flatten the $N \times K_r$ (token, expert) pairs and sort them by expert (`argsort`): each expert's tokens become
#    one contiguous block;
# 2. gather the tokens in that order (`index_select`) and run each expert once on its block: one matrix product per
#    expert (`dispatch="loop"`), or one grouped product for all (`F.grouped_mm`, `dispatch="grouped"`);
# 3. multiply by the gating weights and add each row back to its token (`index_add`).
#
# The grouped dispatch is written for speed, with its backward by hand (`ExpertProducts`, below). It does the
# same arithmetic in a cheaper order:
#
# - gate and up are one product of width $2I$ (their weights side by side), so each block of tokens is read once and
#   its gradient comes out of one product instead of two that are then added;
# - the gating weight multiplies the expert's hidden activation (width $I$) before the down projection rather than its
#   output (width $d$): $g\,W^{down}h = W^{down}(g\,h)$, the same product on half as many numbers;
# - the backward computes exactly the gradients autograd would (the loop dispatch is the check), but it keeps no
#   intermediate that it does not need, and adds nothing up twice.
#
# What it cannot change is the size of each product: an expert sees about $NK_r/E$ tokens (384 at the benchmark's
# shape) and an inner width of $I = 128$ for its down projection, and matrix products that small usually reach a
# smaller share of a processor's peak than the dense layer's one big product. `benchmarks/moe_dispatch.py` measures
# how much.
#
# No token is dropped: an expert takes however many tokens choose it (GShard's capacity limit, and V2's token dropping,
# are not needed at this scale; V3 drops none either).
#
# **The sort, on a small case.** Two tokens, $K_r = 2$, three experts, `indices = [[2, 0], [0, 1]]`. Flattened, the
# pairs are `[2, 0, 0, 1]` (pair $p$ is token $p // 2$). A stable `argsort` gives `order = [1, 2, 3, 0]`, so
# `token = order // 2 = [0, 1, 1, 0]`, `counts = [2, 1, 1]` and the cumulative ends `offs = [2, 3, 4]`: rows 0-1 of the
# gathered tokens go to expert 0, row 2 to expert 1, row 3 to expert 2. "Stable" keeps the pairs of one expert in
# token order, so the blocks, and the order in which `index_add` sums each token's outputs, never depend on how the
# sort breaks ties.
#
# The code comes in three parts. First, two helpers around `F.grouped_mm`, which multiplies each block of rows by its
# own matrix in one call; `offs` (int32) holds the blocks' cumulative ends, as in the example. `_per_expert` is the
# forward product, block $e$ of `a` (M, K) times `w[e]`$^\top$, giving (M, N). `_weight_grads` is the product a
# weight's gradient needs, block $e$ of `g` transposed times block $e$ of `a`, giving one (N, K) matrix per expert:
# there the blocks split the dimension that is summed over.

# %%
#| export
DISPATCH = ("auto", "loop", "grouped")


def _per_expert(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a (M, K) in blocks by expert (offs: the blocks' cumulative ends), w (E, N, K) -> (M, N): block e times w[e]^T."""
    return F.grouped_mm(a, w.transpose(1, 2), offs=offs)


def _weight_grads(g: torch.Tensor, a: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """g (M, N), a (M, K) in the same blocks -> (E, N, K): block e of g transposed times block e of a."""
    return F.grouped_mm(g.t(), a, offs=offs)

# %% [markdown]
# Second, `ExpertProducts`, the grouped products with a forward and a backward written by hand. Write $t(p)$ for the
# token of pair $p$, $e$ for its expert and $w_p$ for its gating weight. The forward computes, in one product of width
# $2I$,
#
# $$z_p = W^{gu}_e x_{t(p)} = \begin{bmatrix} a_p \\ b_p \end{bmatrix},\qquad h_p = \mathrm{silu}(a_p) \odot b_p,
#   \qquad y_t = \sum_{p:\,t(p) = t} W^{down}_e\,(w_p h_p),$$
#
# with $W^{gu}_e$ the gate and up weights stacked, (2I, d). The backward is the chain rule on these three lines,
# given the gradient $\bar y_t$ of the loss with respect to each output (a bar marks a gradient):
#
# $$\bar W^{down}_e = \sum_{p \in e} \bar y_{t(p)} (w_p h_p)^\top,\qquad \bar r_p = W^{down\top}_e \bar y_{t(p)},
#   \qquad \bar w_p = \bar r_p^\top h_p,\qquad \bar h_p = w_p \bar r_p,$$
#
# $$\bar b_p = \bar h_p \odot \mathrm{silu}(a_p),\qquad \bar a_p = \bar h_p \odot b_p \odot \mathrm{silu}'(a_p),\qquad
#   \bar W^{gu}_e = \sum_{p \in e} \bar z_p\, x_{t(p)}^\top,\qquad
#   \bar x_t = \sum_{p:\,t(p) = t} W^{gu\top}_e \bar z_p,$$
#
# where $\bar r_p$ is the gradient of the weighted hidden activation $w_p h_p$ and
# $\mathrm{silu}'(a) = \sigma(a)\,(1 + a\,(1 - \sigma(a)))$ (`aten.silu_backward` computes it). In the code, `g_out`,
# `g_down`, `g_hw`, `g_weight`, `g_h`, `g_gu`, `g_w_gu`, `g_xs` and `g_x` are $\bar y_{t(p)}$, $\bar W^{down}$,
# $\bar r$, $\bar w$, $\bar h$, $\bar z$, $\bar W^{gu}$, the per-pair $\bar x$ and $\bar x$. The $\bar w_p$ line matters
# most for DeepSeek: it is the gradient that flows back through the gating weights into the router, the only way the
# language-model loss teaches the router which experts to choose.
#
# Two pitfalls the code steps around. The order of the in-place products matters: $\bar w$ is computed from `g_hw`
# before `g_hw.mul_` turns it into $\bar h$, and $\bar b$ is written from `g_h` before `g_h.mul_` multiplies it by
# $b_p$ for $\bar a$. And `backward` returns one gradient per input of `forward`, seven in all, with `None` for the
# integer inputs `token` and `offs`.

# %%
#| export
class ExpertProducts(torch.autograd.Function):
    """The routed experts on pairs sorted by expert, forward and backward by hand (the grouped dispatch).

    forward(x (N, d), token (P,), weight (P,), offs (E,), gate, up (E, I, d), down (E, d, I)) -> (N, d): pair p runs
    token[p] through its expert (the block of pairs that offs assigns it) and adds weight[p] times the result to that
    token. Gate and up run as one product of width 2I; the weight scales the hidden activation, not the output."""

    @staticmethod
    def forward(ctx, x, token, weight, offs, gate, up, down):
        i = down.shape[2]
        w_gu = torch.cat([gate, up], dim=1)  # (E, 2I, d): one product for gate and up
        xs = x.to(down.dtype).index_select(0, token)  # (P, d)
        gu = _per_expert(xs, w_gu, offs)  # (P, 2I)
        # each half copied out once: silu and its backward run about 3x slower on a strided half than on a copy
        gate_x, up_x = gu[:, :i].contiguous(), gu[:, i:].contiguous()
        act = F.silu(gate_x)
        h = act * up_x  # silu(gate x) * up x
        hw = h * weight[:, None].to(h.dtype)
        out = x.new_zeros(x.shape, dtype=down.dtype).index_add_(0, token, _per_expert(hw, down, offs))
        ctx.save_for_backward(token, weight, offs, w_gu, down, xs, gate_x, up_x, act, h, hw)
        ctx.x_dtype = x.dtype
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        token, weight, offs, w_gu, down, xs, gate_x, up_x, act, h, hw = ctx.saved_tensors
        i = down.shape[2]
        g_out = grad.to(down.dtype).index_select(0, token)  # (P, d): each pair's share of the gradient
        g_down = _weight_grads(g_out, hw, offs)  # (E, d, I)
        g_hw = _per_expert(g_out, down.transpose(1, 2), offs)  # (P, I)
        g_weight = (g_hw * h).sum(dim=1).to(weight.dtype)
        g_h = g_hw.mul_(weight[:, None].to(g_hw.dtype))
        g_gu = g_h.new_empty(g_h.shape[0], 2 * i)
        torch.mul(g_h, act, out=g_gu[:, i:])  # d/d(up x)
        torch.ops.aten.silu_backward(g_h.mul_(up_x), gate_x, grad_input=g_gu[:, :i])  # d/d(gate x)
        g_w_gu = _weight_grads(g_gu, xs, offs)  # (E, 2I, d)
        g_xs = _per_expert(g_gu, w_gu.transpose(1, 2), offs)  # (P, d)
        g_x = grad.new_zeros(grad.shape, dtype=down.dtype).index_add_(0, token, g_xs)
        return g_x.to(ctx.x_dtype), None, g_weight, None, g_w_gu[:, :i], g_w_gu[:, i:], g_down

# %% [markdown]
# Third, the `Experts` module, which owns the stacked weights and does the sort of the example above. `dispatch`
# chooses the products. The `"loop"` path slices the sorted tokens into one block per expert and runs an ordinary
# SwiGLU on each, so autograd does the backward: it works on any device and dtype and is the reference for the hand
# backward. Its `counts.tolist()` copies the counts to the host, which on a GPU waits for the router to finish. The
# `"grouped"` path hands everything to `ExpertProducts`, with autocast off so that the products run in the weights'
# dtype. `"auto"` takes the grouped path only on the CPU, with a PyTorch that has `F.grouped_mm` and autocast off, and
# the loop everywhere else. `expert(e, x)` runs one expert alone, for a per-token reference such as the benchmark's.

# %%
#| export
class Experts(nn.Module):
    """E routed SwiGLU experts, stacked: gate_proj, up_proj (E, I, d) and down_proj (E, d, I). Slice e of each is the
    weight of an nn.Linear, so expert e computes down_e(silu(gate_e x) * up_e x).

    forward sorts the (token, expert) pairs by expert and runs each expert once on its contiguous block of tokens; the
    weighted outputs go back to their tokens with index_add. No token is dropped. `dispatch` chooses the products:
    "loop" (one per expert, on autograd, any device and dtype), "grouped" (ExpertProducts: F.grouped_mm with gate and up
    fused, backward by hand) or "auto" (grouped on the CPU when PyTorch has F.grouped_mm, autocast is off and
    torch.compile is not tracing, where it measured fastest; the loop elsewhere)."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        e, i, d = config.n_routed_experts, config.moe_intermediate_size, config.d_model
        self.n_experts = e
        self.gate_proj = nn.Parameter(torch.empty(e, i, d))
        self.up_proj = nn.Parameter(torch.empty(e, i, d))
        self.down_proj = nn.Parameter(torch.empty(e, d, i))
        self.dispatch = "auto"  # "loop": a product per expert; "grouped": ExpertProducts; "auto": grouped on CPU
        for p in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(p, std=config.init_std)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e alone on x (..., d)."""
        return F.linear(F.silu(F.linear(x, self.gate_proj[e])) * F.linear(x, self.up_proj[e]), self.down_proj[e])

    def _grouped(self, x: torch.Tensor) -> bool:
        if self.dispatch not in DISPATCH:
            raise ValueError(f"Experts.dispatch={self.dispatch!r} is invalid: one of {DISPATCH} is required")
        if self.dispatch == "grouped" and not hasattr(F, "grouped_mm"):
            raise ValueError("Experts.dispatch='grouped' needs torch.nn.functional.grouped_mm (PyTorch 2.10 or later)")
        return self.dispatch == "grouped" or (self.dispatch == "auto" and x.device.type == "cpu"
                                              and hasattr(F, "grouped_mm") and not torch.is_autocast_enabled("cpu")
                                              and not torch.compiler.is_compiling())

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, d), indices and weights (N, k) -> sum_j weights[:, j] * expert_{indices[:, j]}(x): (N, d)."""
        n, k = indices.shape
        flat = indices.reshape(-1)  # (N k,): pair p is token p // k, choice p % k
        order = flat.argsort(stable=True)  # pairs sorted by expert
        counts = torch.bincount(flat, minlength=self.n_experts)  # tokens per expert
        token = order // k
        weight = weights.reshape(-1)[order]  # each sorted pair's gating weight
        if self._grouped(x):
            with torch.autocast(x.device.type, enabled=False):
                return ExpertProducts.apply(x, token, weight, counts.cumsum(0).to(torch.int32), self.gate_proj,
                                            self.up_proj, self.down_proj)
        xs = x.index_select(0, token)  # (N k, d): each token once per chosen expert, grouped by expert
        gate, up, down = self.gate_proj.unbind(0), self.up_proj.unbind(0), self.down_proj.unbind(0)
        ys = torch.cat([F.linear(F.silu(F.linear(chunk, gate[e])) * F.linear(chunk, up[e]), down[e])
                        for e, chunk in enumerate(xs.split(counts.tolist()))])
        ys = ys * weight[:, None].to(ys.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))

# %% [markdown]
# **Check against a per-token loop**: the output of both dispatches and the gradients they give the expert weights.

# %%
def experts_reference(experts: Experts, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{indices[t, j]}(x[t]), one token and one expert at a time, in float64."""
    g, u, dn = (p.detach().double() for p in (experts.gate_proj, experts.up_proj, experts.down_proj))
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for e, w in zip(indices[t].tolist(), weights[t].tolist()):
            h = x[t].double()
            out[t] += w * (dn[e] @ (torch.nn.functional.silu(g[e] @ h) * (u[e] @ h)))
    return out


torch.manual_seed(0)
cfg = MoEConfig(d_model=24, moe_intermediate_size=12, n_routed_experts=10, num_experts_per_tok=3, init_std=0.3)
router, experts = Router(cfg), Experts(cfg)
x = torch.randn(80, 24)
with torch.no_grad():
    r = router(x)
slow = experts_reference(experts, x, r.indices, r.weights)
dispatch_errors, grads = {}, {}
for mode in ("loop", "grouped") if hasattr(torch.nn.functional, "grouped_mm") else ("loop",):
    experts.dispatch = mode
    experts.zero_grad()
    y = experts(x, r.indices, r.weights)
    (y * torch.linspace(-1, 1, 24)).sum().backward()
    grads[mode] = [p.grad.clone() for p in experts.parameters()]
    dispatch_errors[mode] = (y.double() - slow).abs().max().item()
    print(f"dispatch {mode:>7}: max |output - per-token loop| = {dispatch_errors[mode]:.1e}")
experts.dispatch = "auto"
assert max(dispatch_errors.values()) < 1e-5
if "grouped" in grads:
    grad_gap = max((a - b).abs().max().item() for a, b in zip(grads["loop"], grads["grouped"]))
    print(f"gradients of the two dispatches differ by at most {grad_gap:.1e}")
    assert grad_gap < 1e-5

# %% [markdown]
# ## 3. Balance: losses, a bias, and how to measure it
#
# Left alone, a router collapses: the experts that are chosen early get trained, so they get chosen more, and the rest
# starve. With experts spread over devices, an overloaded expert also stalls the others. Three remedies, in the order
# the papers introduced them.
#
# **DeepSeekMoE's balance losses** (section 3.3), added to the language-model loss. With $T$ tokens, $N'$ routed experts
# and $K'$ chosen per token,
#
# $$\mathcal L_{ExpBal} = \alpha_1 \sum_{i=1}^{N'} f_i P_i,\qquad f_i = \frac{N'}{K'T}\sum_{t=1}^{T}
#   \mathbb 1(\text{token } t \text{ chooses } i),\qquad P_i = \frac1T \sum_{t=1}^{T} s_{i,t}.$$
#
# $f_i$ is expert $i$'s share of the load, scaled so that a perfect balance gives $f_i = 1$; it carries no gradient, so
# the loss pushes down the affinities of the experts that are over-used: as the paper writes it, the gradient with
# respect to one affinity is $\partial \mathcal L_{ExpBal} / \partial s_{i,t} = \alpha_1 f_i / T$, largest for the
# busiest expert. When both the load and the mean affinity are uniform ($f_i = 1$, $P_i = 1/N'$), $\sum_i f_i P_i = 1$
# by construction, a handy reference value for the printed losses. The **device-level** loss
# $\mathcal L_{DevBal} = \alpha_2 \sum_{i=1}^{D} f'_i P'_i$ does the same per device ($f'_i$ the mean of its experts'
# $f_j$, $P'_i$ their sum) and lets experts within a device be unbalanced. The 2B model uses $\alpha_1 = 0.01$; V2 uses
# $\alpha_1 = 0.003$, $\alpha_2 = 0.05$ (and a communication loss, not built here).
#
# A loss is a compromise: its gradient fights the language-model loss. **Auxiliary-loss-free balancing** drops it. It
# was introduced by Wang et al. (arXiv 2408.15664), and DeepSeek-V3 adopts it (section 2.1.2, citing that paper). The
# bias $b_i$ of the router moves after each training step: down by $\gamma$ for an expert that took more than the mean
# load $\bar c$ of the batch, up by $\gamma$ for one that took less,
#
# $$b_i \leftarrow b_i + \gamma\,\mathrm{sign}(\bar c - c_i),$$
#
# with $c_i$ the number of tokens expert $i$ received (V3: $\gamma = 0.001$ for the first 14.3T tokens, then 0). Since
# $b_i$ only steers the choice, the gating weights, and so the model's function, stay those of the affinities. Only the
# sign of the imbalance is used, so every expert off the mean moves by the same step whatever the size of its excess.
# The scale of $\gamma$ must be read against the affinities: with softmax over 31 experts a typical affinity is about
# $1/31 \approx 0.03$, so 10 steps of $\gamma = 0.001$ shift an expert by a third of a typical score and 30 steps by a
# whole one (arithmetic, not a measurement). V3 keeps a tiny **complementary sequence-wise loss**, $\alpha = 0.0001$,
# the same $\sum f_i P_i$ computed within each sequence, with affinities normalised per token (eq. 17-20), against
# extreme imbalance inside one sequence:
#
# $$\mathcal L_{Bal} = \alpha \sum_{i=1}^{N_r} f_i P_i,\qquad f_i = \frac{N_r}{K_r T} \sum_{t=1}^{T}
#   \mathbb 1\big(s_{i,t} \in \mathrm{Topk}(\{s_{j,t}\}, K_r)\big),\qquad P_i = \frac1T \sum_{t=1}^{T}
#   \frac{s_{i,t}}{\sum_{j} s_{j,t}},$$
#
# with $T$ now the length of one sequence. Two details of the code below. It counts the experts the router actually
# chose, bias included, where eq. 18 writes the top-K of the affinities; the two differ only where the bias changed a
# choice. And a "sequence" is a row of the batch: in the packed rows of this course a row holds several documents.
#
# **Measuring balance.** The load of expert $i$ is the number of tokens it gets. Wang et al. (arXiv 2408.15664) measure
# balance by the **maximal violation**,
#
# $$\mathrm{MaxVio} = \frac{\max_i c_i - \bar c}{\bar c},$$
#
# 0 for a perfect balance (computed over one training batch it is their $\mathrm{MaxVio}_{batch}$, which is what section
# 6 records). Its largest value is an identity: if one expert receives every token, $c_i = T$ and $\bar c = TK/E$, so
# MaxVio $= E/K - 1$, which is $31/7 - 1 \approx 3.4$ for section 5's DeepSeekMoE. We also report the **routing
# entropy** of the load shares, $\log E$ when balanced.

# %%
#| export
def expert_load(indices: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Tokens routed to each expert: a float tensor (n_experts,) counting the rows of indices (N, k) that name it."""
    return torch.bincount(indices.reshape(-1), minlength=n_experts).float()


def max_violation(load: torch.Tensor) -> float:
    """MaxVio = max_i load_i / mean load - 1 (Wang et al., arXiv 2408.15664, the loss-free balancing paper that V3
    adopts): 0 for a perfect balance."""
    load = load.float()
    return float(load.max() / load.mean().clamp(min=1e-12) - 1)


def routing_entropy(load: torch.Tensor) -> float:
    """Entropy in nats of the share of tokens each expert gets (load / sum): log(E) when balanced, 0 when one expert
    takes every token."""
    p = load.float() / load.float().sum().clamp(min=1e-12)
    return float(-(p * p.clamp(min=1e-30).log()).sum())


def _affinity_shares(scores: torch.Tensor) -> torch.Tensor:
    """s_{i,t} / sum_j s_{j,t}: the softmax's own values; sigmoid affinities normalised as in V3's eq. 20."""
    return scores / scores.sum(dim=-1, keepdim=True)


def expert_balance_loss(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """DeepSeekMoE's expert-level balance loss without its alpha_1 (arXiv 2401.06066, eq. 12-14): sum_i f_i P_i with
    f_i = N' / (K' T) sum_t 1(token t chooses expert i) and P_i = 1/T sum_t s_{i,t}; N' routed experts, K' chosen per
    token, T tokens. scores (T, N'), indices (T, K'). f_i = 1 for every expert under a perfect balance."""
    t, k = indices.shape
    n = scores.shape[-1]
    f = expert_load(indices, n) * n / (k * t)  # no gradient flows through the counts
    return (f * _affinity_shares(scores).mean(dim=0)).sum()


def device_balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_devices: int) -> torch.Tensor:
    """DeepSeekMoE's device-level balance loss without its alpha_2 (eq. 15-17): the experts form n_devices equal groups
    E_i (contiguous, as expert parallelism places them); sum_i f'_i P'_i with f'_i the mean of f_j over E_i and P'_i the
    sum of P_j over E_i."""
    t, k = indices.shape
    n = scores.shape[-1]
    f = expert_load(indices, n) * n / (k * t)
    p = _affinity_shares(scores).mean(dim=0)
    return (f.view(n_devices, -1).mean(dim=1) * p.view(n_devices, -1).sum(dim=1)).sum()


def sequence_balance_loss(scores: torch.Tensor, indices: torch.Tensor, n_sequences: int) -> torch.Tensor:
    """DeepSeek-V3's complementary sequence-wise balance loss without its alpha (arXiv 2412.19437, eq. 17-20): the
    expert-level loss computed within each sequence (f_i and P_i over that sequence's T tokens, with normalised
    affinities), averaged over the n_sequences sequences. scores (n_sequences T, N_r), indices (n_sequences T, K_r),
    sequence by sequence."""
    n = scores.shape[-1]
    k = indices.shape[-1]
    s = _affinity_shares(scores).view(n_sequences, -1, n)  # (B, T, N_r)
    t = s.shape[1]
    onehot = torch.zeros(n_sequences, t * k, n, device=scores.device).scatter_(
        2, indices.view(n_sequences, t * k, 1), 1.0)
    f = onehot.sum(dim=1) * n / (k * t)  # (B, N_r)
    return (f * s.mean(dim=1)).sum(dim=1).mean()



# %% [markdown]
# **Check against a hand computation.** Four tokens, four experts, two chosen per token. The affinities (rows) and the
# choices:
#
# | token | $s_1$ | $s_2$ | $s_3$ | $s_4$ | chooses |
# |---|---|---|---|---|---|
# | 1 | .40 | .30 | .20 | .10 | 1, 2 |
# | 2 | .10 | .20 | .30 | .40 | 4, 3 |
# | 3 | .40 | .40 | .10 | .10 | 1, 2 |
# | 4 | .25 | .25 | .25 | .25 | 1, 3 |
#
# Loads 3, 2, 2, 1, so $f = \frac{4}{2 \cdot 4}(3, 2, 2, 1) = (1.5, 1, 1, 0.5)$ and $P = (1.15, 1.15, .85, .85)/4$:
# $\sum f_i P_i = 1.0375$. Devices {1, 2} and {3, 4}: $f' = (1.25, 0.75)$, $P' = (.575, .425)$, again $1.0375$. As two
# sequences of two tokens: the first has $f = (1, 1, 1, 1)$ and $P = (.25, .25, .25, .25)$, so 1; the second
# $f = (2, 1, 1, 0)$ and $P = (.325, .325, .175, .175)$, so 1.15; the mean is 1.075. MaxVio is $3 / 2 - 1 = 0.5$.

# %%
hand_scores = torch.tensor([[.4, .3, .2, .1], [.1, .2, .3, .4], [.4, .4, .1, .1], [.25, .25, .25, .25]])
hand_indices = torch.tensor([[0, 1], [3, 2], [0, 1], [0, 2]])
hand = {"expert": expert_balance_loss(hand_scores, hand_indices).item(),
        "device": device_balance_loss(hand_scores, hand_indices, n_devices=2).item(),
        "sequence": sequence_balance_loss(hand_scores, hand_indices, n_sequences=2).item(),
        "MaxVio": max_violation(expert_load(hand_indices, 4))}
print({k: round(v, 6) for k, v in hand.items()})
assert abs(hand["expert"] - 1.0375) < 1e-6 and abs(hand["device"] - 1.0375) < 1e-6
assert abs(hand["sequence"] - 1.075) < 1e-6 and abs(hand["MaxVio"] - 0.5) < 1e-9
assert abs(routing_entropy(torch.ones(8)) - math.log(8)) < 1e-6 and routing_entropy(torch.tensor([5., 0, 0])) == 0

# %% [markdown]
# The example is small enough to catch the usual slips: the scale $N'/(K'T)$ of $f_i$, a sequence-wise loss that
# averages over the wrong axis, or a MaxVio that divides by the total load instead of the mean. One agreement is an
# identity of this example, not of the losses: the device-level loss equals the expert-level one here only because the
# two experts of each device have the same $P_i$.
#
# ### The MoE layer
#
# The layer puts the pieces together: route, dispatch to the routed experts, add the shared experts (one SwiGLU of
# $K_s$ times an expert's width, as the reference code does), and compute the balance losses the config asks for. It
# keeps the last forward's routing and loss, so that a training loop can read them (`moe_aux_loss`) and move the bias
# (`update_bias`), and it has the submodules and parameter names of transformers' `DeepseekV3MoE`. It implements V3's
# eq. 12 without the residual, which the transformer block adds:
#
# $$h'_t = u_t + \sum_{i=1}^{N_s} \mathrm{FFN}^{(s)}_i(u_t) + \sum_{i=1}^{N_r} g_{i,t}\, \mathrm{FFN}^{(r)}_i(u_t).$$
#
# The input may be (b, t, d) or (N, d); the layer flattens it to (N, d) tokens, because routing treats every token on
# its own. Three things to keep in mind when you train with it:
#
# - `aux_loss` is rebuilt by every forward, on that forward's graph. `moe_batch_loss` adds it to the language-model
#   loss, so the balance losses only count when the trainer uses `loss_fn=moe_batch_loss`.
# - `update_bias` reads the routing of the *last* forward. Call it once per optimizer step, after the step; with
#   gradient accumulation it would see only the last micro-batch.
# - For the sequence-wise loss each of the $b$ rows of a (b, t, d) input is one sequence.

# %% [markdown]
# Before the code, the layer and its dispatch as a picture. Top: what happens to one token. Bottom: how the layer
# does it for all $N$ tokens at once, without a loop over tokens.

# %%
from dslib.diagram import Diagram


def draw_moe_layer():
    """The DeepSeekMoE layer with V3's routing (top) and the sorted dispatch that computes it (bottom)."""
    d = Diagram(13.6, 4.6, "DeepSeekMoE with V3's routing (V3, eqs. 12-16), and the sorted dispatch")
    d.box(0.1, 2.9, 1.1, 1.0, "token u_t\n(d)", "baseline")
    d.box(1.6, 2.9, 2.5, 1.0, "router: s_i = sigmoid(u_t . e_i)\nchoose top K_r of s_i + b_i\n(b_i: the loss-free bias)",
          "stage")
    for i, (label, chosen) in enumerate((("expert 1", True), ("expert 2", False), ("expert 3", True),
                                         ("...", False), ("expert N_r", True))):
        d.box(4.6 + 0.95 * i, 3.35, 0.85, 0.55, label, "stage" if chosen else "baseline", fontsize=7.5)
    d.ax.text(6.95, 3.1, "K_r routed experts chosen (coloured); weights g_i from s_i, not s_i + b_i", fontsize=7.5,
              color="#555555", ha="center")
    d.box(4.6, 2.3, 4.6, 0.55, "shared expert(s): every token, no router", "model", fontsize=7.5)
    d.box(9.8, 2.6, 3.7, 1.3, "h_t = u_t + shared(u_t)\n+ sum over chosen i of g_i FFN_i(u_t)\n(the block adds u_t)",
          "measure")
    d.arrow(1.2, 3.4, 1.6, 3.4)
    d.arrow(4.1, 3.55, 4.6, 3.6)
    d.arrow(1.2, 3.05, 4.6, 2.55)
    d.arrow(9.35, 3.6, 9.8, 3.4)
    d.arrow(9.2, 2.55, 9.8, 2.9)
    y, h = 0.2, 1.1
    steps = (("N x K_r (token, expert)\npairs, flattened", "baseline", 2.3),
             ("argsort by expert:\neach expert's pairs\nbecome one block", "stage", 2.2),
             ("gather the tokens\nin that order\n(index_select)", "stage", 2.0),
             ("one product per block\n(grouped_mm): gate+up,\nsilu, x g, down", "stage", 2.5),
             ("index_add each row\nback to its token", "measure", 2.1))
    x = 0.1
    for i, (text, kind, w) in enumerate(steps):
        d.box(x, y, w, h, text, kind, fontsize=8)
        if i:
            d.arrow(x - 0.35, y + h / 2, x, y + h / 2)
        x += w + 0.35
    d.ax.text(6.8, 1.5, "the dispatch, for all N tokens at once (section 2)", fontsize=8, color="#555555", ha="center")
    d.show()


draw_moe_layer()

# %%
#| export
class MoE(nn.Module):
    """The DeepSeekMoE layer (arXiv 2401.06066, eq. 9-11; DeepSeek-V3, eq. 12-16):
    h'_t = u_t + sum_{i <= N_s} FFN^(s)_i(u_t) + sum_{i <= N_r} g_{i,t} FFN^(r)_i(u_t); here without the residual u_t,
    which the block adds. The N_s shared experts run as one SwiGLU of N_s times an expert's width.

    Submodules, named as in transformers' DeepseekV3MoE: gate (Router), experts (Experts), shared_experts (SwiGLU or
    None). After each forward: `routing` (Routing of the N tokens, detached) and `aux_loss`, the sum of the balance
    losses the config's alphas ask for (a zero tensor when all are 0), on the autograd graph. `shared_disabled` (default
    False) is an ablation knob that skips the shared experts."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.experts = Experts(config)
        self.shared_experts = (SwiGLU(config.d_model, config.n_shared_experts * config.moe_intermediate_size)
                               if config.n_shared_experts else None)
        if self.shared_experts is not None:
            for p in self.shared_experts.parameters():
                nn.init.normal_(p, std=config.init_std)
        self.shared_disabled = False
        self.routing: Routing | None = None
        self.aux_loss = torch.zeros(())

    def __deepcopy__(self, memo: dict) -> "MoE":
        """A copy with a zero aux_loss: the last one lies on its forward's autograd graph, which deepcopy refuses."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update({k: copy.deepcopy(v, memo) for k, v in self.__dict__.items() if k != "aux_loss"})
        new.__dict__["aux_loss"] = torch.zeros(())
        return new

    def balance_loss(self, scores: torch.Tensor, indices: torch.Tensor, n_sequences: int) -> torch.Tensor:
        """alpha_1 L_ExpBal + alpha_2 L_DevBal + alpha L_Bal (sequence-wise) for one forward's routing."""
        c = self.config
        loss = scores.new_zeros(())
        if c.aux_loss_alpha:
            loss = loss + c.aux_loss_alpha * expert_balance_loss(scores, indices)
        if c.device_loss_alpha:
            loss = loss + c.device_loss_alpha * device_balance_loss(scores, indices, c.n_devices)
        if c.seq_aux_alpha:
            loss = loss + c.seq_aux_alpha * sequence_balance_loss(scores, indices, n_sequences)
        return loss

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., d) -> (..., d): routed plus shared experts. With x (b, t, d), each of the b rows is a sequence for
        the sequence-wise loss; x (N, d) is one sequence."""
        c = self.config
        if x.shape[-1] != c.d_model:
            raise ValueError(f"MoE input has {x.shape[-1]} features, the config's d_model is {c.d_model}")
        h = x.reshape(-1, c.d_model)  # (N, d)
        r = self.gate(h)
        y = self.experts(h, r.indices, r.weights)
        if self.shared_experts is not None and not self.shared_disabled:
            y = y + self.shared_experts(h)
        n_sequences = math.prod(x.shape[:-2]) if x.dim() >= 3 else 1
        self.aux_loss = self.balance_loss(r.scores, r.indices, n_sequences)
        self.routing = Routing(r.indices.detach(), r.weights.detach(), r.scores.detach())
        return y.reshape(x.shape)


def moe_layers(model: nn.Module) -> list[MoE]:
    """Every MoE inside model (the model itself included), in module order."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def moe_aux_loss(model: nn.Module) -> torch.Tensor:
    """The sum of aux_loss over every MoE in model after its last forward (a zero tensor when there is none)."""
    losses = [m.aux_loss for m in moe_layers(model)]
    if not losses:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else "cpu")
    return torch.stack([l.to(losses[0].device) for l in losses]).sum()


def moe_batch_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """dslib.train.batch_loss plus the balance losses of the forward: a loss_fn for dslib.train.Trainer."""
    return batch_loss(model, batch) + moe_aux_loss(model)


@torch.no_grad()
def update_bias(model: nn.Module, gamma: float) -> None:
    """DeepSeek-V3's auxiliary-loss-free balancing (section 2.1.2): for every MoE in model, b_i += gamma * sign(mean
    load - load_i) from its last forward's routing: an overloaded expert's bias falls by gamma, an underloaded one's
    rises. For Trainer(..., after_step=lambda tr, batch: update_bias(tr.model, gamma))."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not gamma >= 0:
        raise ValueError(f"gamma={gamma!r} is invalid: a non-negative number is required")
    for m in moe_layers(model):
        if m.routing is None:
            raise ValueError("update_bias needs a forward pass first: an MoE layer has no routing yet")
        load = expert_load(m.routing.indices, m.config.n_routed_experts)
        m.gate.e_score_correction_bias += gamma * torch.sign(load.mean() - load).to(m.gate.e_score_correction_bias)

# %% [markdown]
# **Check against transformers.** With the same weights (the fused `gate_up_proj` is our gate and up stacked), V3's
# sigmoid gating with groups, a bias and a scaling factor of 2.5 must give transformers' `DeepseekV3MoE` output, in each
# of its expert implementations. (Skipped where transformers is not installed; the unit tests do the same.)

# %%
torch.manual_seed(0)
v3_like = MoEConfig(d_model=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                    n_shared_experts=2, scoring_func="sigmoid", n_group=4, topk_group=2, norm_topk_prob=True,
                    routed_scaling_factor=2.5, init_std=0.3)
ours = MoE(v3_like)
ours.gate.e_score_correction_bias.normal_(0, 0.1)
x = torch.randn(3, 7, 32)
hf_errors = {}
if importlib.util.find_spec("transformers") is not None:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_config = DeepseekV3Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                                 n_shared_experts=2, n_group=4, topk_group=2, norm_topk_prob=True,
                                 routed_scaling_factor=2.5)
    hf_config._experts_implementation = "eager"
    hf = DeepseekV3MoE(hf_config)
    state = {"gate.weight": ours.gate.weight, "gate.e_score_correction_bias": ours.gate.e_score_correction_bias,
             "experts.gate_up_proj": torch.cat([ours.experts.gate_proj, ours.experts.up_proj], dim=1),
             "experts.down_proj": ours.experts.down_proj,
             **{f"shared_experts.{k}": v for k, v in ours.shared_experts.state_dict().items()}}
    hf.load_state_dict(state, strict=True)
    with torch.no_grad():
        mine = ours(x)
        for impl in ("eager", "grouped_mm", "batched_mm"):
            hf_config._experts_implementation = impl
            hf_errors[impl] = (hf(x) - mine).abs().max().item()
    print("max |ours - transformers' DeepseekV3MoE|:", {k: f"{v:.1e}" for k, v in hf_errors.items()})
    assert max(hf_errors.values()) < 1e-5
else:
    print("transformers is not installed: comparison skipped")

# The losses the layer keeps: zero without alphas; with them, the hand formulas on its own routing.
ours.config.aux_loss_alpha, ours.config.seq_aux_alpha = 0.01, 0.0001
y = ours(x)
r = ours.routing
expected = 0.01 * expert_balance_loss(r.scores, r.indices) + 0.0001 * sequence_balance_loss(r.scores, r.indices, 3)
print(f"aux_loss {ours.aux_loss.item():.6f} (by the formulas {expected.item():.6f}), requires grad: "
      f"{ours.aux_loss.requires_grad}")
assert abs(ours.aux_loss.item() - expected.item()) < 1e-7 and ours.aux_loss.requires_grad
ours.config.aux_loss_alpha, ours.config.seq_aux_alpha = 0.0, 0.0

# update_bias: the over-loaded experts' bias goes down by gamma, the under-loaded ones' up.
load = expert_load(r.indices, 16)
bias_before = ours.gate.e_score_correction_bias.clone()
update_bias(ours, gamma=0.01)
step = ours.gate.e_score_correction_bias - bias_before
assert torch.allclose(step[load > load.mean()], torch.tensor(-0.01)) and torch.allclose(
    step[load < load.mean()], torch.tensor(0.01))
print(f"load {load.int().tolist()}; bias step {[round(v, 2) for v in step.tolist()]}")

# %% [markdown]
# What the cell above establishes. Agreement with `DeepseekV3MoE` on random weights, with groups, a bias and a scaling
# factor, checks every convention a checkpoint depends on at once: which half of `gate_up_proj` is the gate, the group
# score, where the bias enters, and when the weights are normalised and scaled. Any one of them wrong would almost
# surely move the output by far more than $10^{-5}$. The last two checks are about training rather than inference: the
# stored `aux_loss` is the formula applied to the layer's own routing and still has a graph, so it can be
# backpropagated, and `update_bias` moves each bias by exactly $\pm\gamma$ in the right direction.
#
# **V2's routing, against transformers' `DeepseekV2Moe`.** The same layer with V2's settings: softmax affinities, no
# bias, no normalisation, a scaling factor of 16, and groups scored by their best expert (`group_limited_greedy`), or
# no groups (`greedy`, V2-Lite). The router weights are spread wide (standard deviation 0.3), so that group limiting
# really changes choices; the cell also counts the tokens for which V2's rule and V3's rule, on the same affinities,
# choose different experts. The outputs are scaled by 16, so the agreement is measured relative to their size.

# %%
v2_errors, v2_vs_v3 = {}, None
x_v2 = torch.randn(8, 32, 32)  # 256 tokens
if importlib.util.find_spec("transformers") is not None:
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe

    for method, groups, kept in (("group_limited_greedy", 4, 2), ("greedy", 1, 1)):
        v2_like = MoEConfig(d_model=32, moe_intermediate_size=16, n_routed_experts=16, num_experts_per_tok=4,
                            n_shared_experts=2, scoring_func="softmax", n_group=groups, topk_group=kept,
                            topk_method=method, norm_topk_prob=False, routed_scaling_factor=16.0, init_std=0.3)
        ours_v2 = MoE(v2_like)
        hf_v2_config = DeepseekV2Config(hidden_size=32, moe_intermediate_size=16, n_routed_experts=16,
                                        num_experts_per_tok=4, n_shared_experts=2, n_group=groups, topk_group=kept,
                                        topk_method=method, routed_scaling_factor=16.0)
        hf_v2_config._experts_implementation = "eager"
        hf_v2 = DeepseekV2Moe(hf_v2_config)
        hf_v2.load_state_dict({"gate.weight": ours_v2.gate.weight, "experts.down_proj": ours_v2.experts.down_proj,
                               "experts.gate_up_proj": torch.cat([ours_v2.experts.gate_proj,
                                                                  ours_v2.experts.up_proj], dim=1),
                               **{f"shared_experts.{k}": v for k, v in ours_v2.shared_experts.state_dict().items()}},
                              strict=True)
        with torch.no_grad():
            mine_v2 = ours_v2(x_v2)
            v2_errors[method] = ((hf_v2(x_v2) - mine_v2).abs().max() / mine_v2.abs().max()).item()
            if method == "group_limited_greedy":  # the same affinities, routed by V3's rule instead
                tokens = x_v2.view(-1, 32)
                by_v2 = ours_v2.gate(tokens).indices.sort(dim=1).values
                v2_like.topk_method = "noaux_tc"
                by_v3 = ours_v2.gate(tokens).indices.sort(dim=1).values
                v2_like.topk_method = method
                v2_vs_v3 = (by_v2 != by_v3).any(dim=1).float().mean().item()
    print("max |ours - transformers' DeepseekV2Moe| / max |output|:", {k: f"{v:.1e}" for k, v in v2_errors.items()})
    print(f"V2's rule and V3's rule choose different experts for {v2_vs_v3:.0%} of {len(tokens)} tokens")
    assert max(v2_errors.values()) < 1e-6 and v2_vs_v3 > 0
else:
    print("transformers is not installed: comparison skipped")

# %% [markdown]
# ## 4. A small MoE language model
#
# Chapter 00's decoder with the SwiGLU of each block replaced by an MoE layer (after the first
# `first_k_dense_replace` blocks, which stay dense, as V3's first three). `MoETransformer` subclasses
# `dslib.transformer.Transformer` and only builds other blocks, so `forward(input_ids, positions, segments, attn_mask,
# cache)`, the KV cache and `generate` are chapter 00's, and `dslib.train.Trainer` trains it with
# `loss_fn=moe_batch_loss` (the language-model loss plus every layer's balance loss) and, for V3's balancing,
# `after_step=lambda tr, batch: update_bias(tr.model, gamma)`.

# %%
#| export
_MOE_FIELDS = ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_shared_experts", "scoring_func",
               "n_group", "topk_group", "topk_method", "norm_topk_prob", "routed_scaling_factor", "aux_loss_alpha", "n_devices",
               "device_loss_alpha", "seq_aux_alpha")


@dataclass
class MoETransformerConfig(TransformerConfig):
    """chapter 00's decoder (TransformerConfig) whose feed-forward blocks are MoE layers, after the first
    first_k_dense_replace layers, which keep a dense SwiGLU of intermediate_size (V3: 3 dense layers). The MoE fields
    are MoEConfig's."""

    moe_intermediate_size: int = 32
    n_routed_experts: int = 8
    num_experts_per_tok: int = 2
    n_shared_experts: int = 0
    scoring_func: str = "sigmoid"
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    aux_loss_alpha: float = 0.0
    n_devices: int = 1
    device_loss_alpha: float = 0.0
    seq_aux_alpha: float = 0.0
    first_k_dense_replace: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.moe_config()  # validates the MoE fields
        v = self.first_k_dense_replace
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= self.n_layer:
            raise ValueError(f"MoETransformerConfig.first_k_dense_replace={v!r} is invalid: an int in "
                             f"[0, n_layer={self.n_layer}] is required")

    def moe_config(self) -> MoEConfig:
        return MoEConfig(d_model=self.d_model, init_std=self.init_std, **{k: getattr(self, k) for k in _MOE_FIELDS})


class MoEBlock(nn.Module):
    """Pre-norm block: x + Attention(RMSNorm(x)), then + MoE(RMSNorm(x)) (a dense SwiGLU in the first
    first_k_dense_replace layers)."""

    def __init__(self, c: MoETransformerConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(c.d_model, c.norm_eps)
        self.attn = Attention(c, layer)
        self.mlp_norm = RMSNorm(c.d_model, c.norm_eps)
        self.mlp = SwiGLU(c.d_model, c.intermediate_size) if layer < c.first_k_dense_replace else MoE(c.moe_config())

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class MoETransformer(Transformer):
    """chapter 00's decoder-only LM with MoE feed-forward blocks. forward, new_cache (a KVCache), generate and
    num_params are Transformer's; train it with loss_fn=moe_batch_loss so that the balance losses count."""

    def __init__(self, config: MoETransformerConfig):
        nn.Module.__init__(self)
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(MoEBlock(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.apply(self._init)  # nn.Linear and nn.Embedding; the MoE layers initialise their own stacked weights

    def num_activated_params(self, embeddings: bool = True) -> int:
        """Parameters one token uses: the routed experts it does not choose do not count."""
        c = self.config
        idle = (c.n_routed_experts - c.num_experts_per_tok) * 3 * c.d_model * c.moe_intermediate_size
        return self.num_params(embeddings) - idle * (c.n_layer - c.first_k_dense_replace)

# %% [markdown]
# `num_activated_params` subtracts, in every MoE layer, the experts a token does not choose; each expert is a SwiGLU
# with three matrices of $d \times I$:
#
# $$P_{act} = P - (n_{layer} - k_{dense})\,(N_r - K_r)\cdot 3\,d\,I,$$
#
# so the router and the shared experts count as active, which they are. This is the count behind V3's "37B of 671B".
#
# The check below builds a two-layer model with one dense and one MoE layer (with group-limited routing) and decodes
# with the KV cache, one token at a time after a prompt of 12. The cached logits must equal those of one full forward.
# That holds only because the routing of a token depends on that token alone. With a capacity limit, as in GShard, a
# token could be dropped in a full forward but kept when it is decoded alone, and the two would differ.

# %%
# The arithmetic world with single-digit numbers (every number and intermediate result in 0..9): short runs get past
# learning the format and into the arithmetic itself, where what the feed-forward layers store starts to matter.
world = World(n_docs=dslib.sized(small=40_000, full=150_000), max_value=dslib.sized(small=9, full=99))
tok = world.tokenizer
V = tok.vocab_size
torch.manual_seed(0)
check_model = MoETransformer(MoETransformerConfig(
    vocab_size=V, d_model=32, n_layer=2, n_head=4, moe_intermediate_size=16, n_routed_experts=8,
    num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, init_std=0.1)).eval()
ids = torch.randint(0, V, (2, 20))
with torch.no_grad():
    full = check_model(ids)
    cache = check_model.new_cache(2, 20)
    parts = [check_model(ids[:, :12], cache=cache)] + [check_model(ids[:, i:i + 1], cache=cache) for i in range(12, 20)]
model_cache_error = (torch.cat(parts, 1) - full).abs().max().item()
print(f"{check_model.num_params():,} parameters, {check_model.num_activated_params():,} activated per token; "
      f"cached decoding vs one forward: max |difference| = {model_cache_error:.1e}")
assert model_cache_error < 1e-5 and len(moe_layers(check_model)) == 1

# %% [markdown]
# ## 5. Experiment: dense vs GShard vs DeepSeekMoE on the arithmetic world
#
# Five small language models, identical except for their feed-forward blocks, at **equal activated parameters** (every
# token passes through a feed-forward width of $2W$) and, for the MoE models, **equal total parameters** ($8W$ of
# expert width per layer):
#
# | model | feed-forward per layer | active per token | balancing |
# |---|---|---|---|
# | dense | one SwiGLU of width $2W$ | all | none needed |
# | GShard top-2 | 8 experts of width $W$, softmax, top 2 | 2 of 8 | $\alpha_1 = 0.01$ |
# | DeepSeekMoE | 1 shared + 31 routed experts of width $W/4$ ($m = 4$), softmax, top 7 | 1 + 7 of 32 | $\alpha_1 = 0.01$ |
# | DeepSeekMoE, no balancing | the same | the same | none |
# | DeepSeekMoE, loss-free bias | the same | the same | the bias (Wang et al., V3), $\gamma = 0.001$ |
#
# The budget is arithmetic. A SwiGLU of width $I$ has $3dI$ parameters. The dense model has $3d \cdot 2W = 6dW$ per
# layer. GShard has $8 \cdot 3dW = 24dW$ in total and uses $2 \cdot 3dW = 6dW$ per token; DeepSeekMoE has
# $32 \cdot 3d \cdot W/4 = 24dW$ and uses $(1 + 7) \cdot 3d \cdot W/4 = 6dW$. Only the routers differ, $E \times d$ per
# layer, and the cell below asserts exactly that. So the MoE models hold four times the dense model's feed-forward
# parameters at the same computation per token.
#
# The first three answer DeepSeekMoE's question (section 5); the last three, which share the architecture, V3's
# question about balancing (section 6). All use softmax gating without normalisation, as DeepSeekMoE does, so that only
# the balancing differs between the last three. (V3's own gating, sigmoid with normalisation, is the one checked
# against transformers above; exercise 2 reruns the balancing race with it.) Every run sees the same batches for a
# given seed; two seeds each at `small` scale, three at `full`. The held-out loss is measured on documents about the
# world's held-out problems. At small scale the world has single-digit numbers (`max_value=9`). With the default
# two-digit world, runs this short can stay on a plateau of held-out loss near 1.0, where a model has learned the
# format but not yet the sums; on a plateau, differences in the feed-forward layers have nothing to show.

# %%
EXP = dslib.sized(small=dict(d_model=64, n_layer=2, n_head=4, width=64, steps=180, batch=16, lr=3e-3, seeds=(0, 1)),
                  full=dict(d_model=256, n_layer=4, n_head=8, width=256, steps=3000, batch=64, lr=1e-3,
                            seeds=(0, 1, 2)))
SEQ_LEN, ALPHA1, GAMMA = 96, 0.01, 1e-3
W = EXP["width"]
base = dict(vocab_size=V, d_model=EXP["d_model"], n_layer=EXP["n_layer"], n_head=EXP["n_head"], max_seq_len=128)
softmax_gating = dict(scoring_func="softmax", norm_topk_prob=False)
fine = dict(moe_intermediate_size=W // 4, n_routed_experts=31, num_experts_per_tok=7, n_shared_experts=1)
ARMS = {
    "dense": lambda: Transformer(TransformerConfig(**base, intermediate_size=2 * W)),
    "GShard top-2": lambda: MoETransformer(MoETransformerConfig(
        **base, **softmax_gating, moe_intermediate_size=W, n_routed_experts=8, num_experts_per_tok=2,
        aux_loss_alpha=ALPHA1)),
    "DeepSeekMoE": lambda: MoETransformer(MoETransformerConfig(**base, **softmax_gating, **fine,
                                                               aux_loss_alpha=ALPHA1)),
    "DeepSeekMoE, no balancing": lambda: MoETransformer(MoETransformerConfig(**base, **softmax_gating, **fine)),
    "DeepSeekMoE, loss-free bias": lambda: MoETransformer(MoETransformerConfig(**base, **softmax_gating, **fine)),
}
COMPUTE_RACE = ("dense", "GShard top-2", "DeepSeekMoE")
BALANCE_RACE = ("DeepSeekMoE, no balancing", "DeepSeekMoE", "DeepSeekMoE, loss-free bias")
sizes = {}
for arm, make in ARMS.items():
    m = make()
    sizes[arm] = (m.num_params(embeddings=False), getattr(m, "num_activated_params", m.num_params)(embeddings=False))
    print(f"{arm:<28} {sizes[arm][0]:>8,} parameters without embeddings, {sizes[arm][1]:>7,} activated per token")
# Equal expert parameters, total and activated; the models differ only by their routers (E x d per layer).
router_params = {"dense": 0, "GShard top-2": 8, "DeepSeekMoE": 31}
for arm in COMPUTE_RACE:
    assert sizes[arm][1] - router_params[arm] * EXP["d_model"] * EXP["n_layer"] == sizes["dense"][1]
assert sizes["GShard top-2"][0] - sizes["GShard top-2"][1] == sizes["DeepSeekMoE"][0] - sizes["DeepSeekMoE"][1]

data = {seed: PackedData([doc.text for doc in world.corpus()], tok, SEQ_LEN, EXP["batch"], seed=seed)
        for seed in EXP["seeds"]}
valid = PackedData([doc.text for doc in world.validation()], tok, SEQ_LEN, 64, seed=0).all_batches()
print(f"{EXP['steps']} steps x {EXP['batch']} rows x {SEQ_LEN} tokens per run, {len(ARMS) * len(EXP['seeds'])} runs")

# %% [markdown]
# `train_arm` trains one model with chapter 00's `Trainer`: AdamW, warm-up then cosine, and a held-out evaluation at the
# start and after every quarter of the run. Two hooks make it an MoE run. `loss_fn=moe_batch_loss` adds the balance
# losses the arm's config asks for (the dense model has none, and `moe_aux_loss` gives zero). `after_step` runs after
# each optimizer step: it records the batch's MaxVio, averaged over the MoE layers, and then, for the loss-free arm,
# moves the bias. The MaxVio comes from the routing that step's forward stored, so it describes the choices the model
# trained with in that step, made with the bias as it stood before the update.

# %%
def train_arm(arm: str, seed: int) -> dict:
    """Train one arm on seed's batches; record each step's MaxVio (mean over the MoE layers) before any bias update."""
    torch.manual_seed(seed)
    model = ARMS[arm]()
    maxvio: list[float] = []

    def after_step(trainer, batch):
        layers = moe_layers(trainer.model)
        if layers:
            maxvio.append(float(np.mean([max_violation(expert_load(l.routing.indices, l.config.n_routed_experts))
                                         for l in layers])))
        if arm == "DeepSeekMoE, loss-free bias":
            update_bias(trainer.model, GAMMA)

    trainer = Trainer(model, data[seed], TrainConfig(steps=EXP["steps"], lr=EXP["lr"], warmup_steps=EXP["steps"] // 10,
                                                     schedule="cosine", eval_every=EXP["steps"] // 4, seed=seed),
                      eval_batches=valid, device=device, loss_fn=moe_batch_loss, after_step=after_step)
    history = trainer.fit(progress=False)
    return dict(model=model.eval(), history=history, maxvio=np.array(maxvio))


runs = {}
t0 = time.time()
for seed in EXP["seeds"]:
    for arm in tqdm(ARMS, desc=f"seed {seed}"):
        runs[(arm, seed)] = train_arm(arm, seed)
train_seconds = time.time() - t0
final = {a: np.array([runs[(a, s)]["history"]["eval_loss"][-1] for s in EXP["seeds"]]) for a in ARMS}
mean_run = {a: np.array([np.mean(runs[(a, s)]["history"]["eval_loss"][1:]) for s in EXP["seeds"]]) for a in ARMS}
print(f"{train_seconds:.0f} s for {len(runs)} runs. Held-out loss (nats per response token):")
print(f"{'':<28}{'final':>7}   {'per seed':<14}{'mean over run':>14}   per seed")
for a in ARMS:
    print(f"{a:<28}{final[a].mean():>7.3f}   {' '.join(f'{v:.3f}' for v in final[a]):<14}{mean_run[a].mean():>14.3f}   "
          f"{' '.join(f'{v:.3f}' for v in mean_run[a])}")

# %% [markdown]
# The table prints two numbers per run: the final held-out loss, and its mean over the evaluations after step 0, which
# is less sensitive to where one short run happens to end. The plot below shows the held-out curves of the first three
# models (left) and each run's two numbers (right). Look for two things: whether the MoE curves separate from the dense
# one, and whether the seeds of one model lie closer to each other than to another model's.

# %%
colours = {"dense": "tab:gray", "GShard top-2": "tab:orange", "DeepSeekMoE": "tab:blue",
           "DeepSeekMoE, no balancing": "tab:red", "DeepSeekMoE, loss-free bias": "tab:green"}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for arm in COMPUTE_RACE:
    for s in EXP["seeds"]:
        h = runs[(arm, s)]["history"]
        axes[0].plot(h["eval_step"][1:], h["eval_loss"][1:], marker="o", ms=3, lw=1, color=colours[arm],
                     ls="-" if s == EXP["seeds"][0] else "--", label=arm if s == EXP["seeds"][0] else None)
    axes[1].scatter(mean_run[arm], final[arm], color=colours[arm], s=40, label=arm)
axes[0].set_xlabel("step")
axes[0].set_ylabel("held-out loss (nats per response token)")
axes[0].set_title("Equal activated parameters (solid: seed 0, dashed: seed 1)", fontsize=10)
axes[0].legend(fontsize=8)
axes[1].set_xlabel("mean held-out loss over the run")
axes[1].set_ylabel("final held-out loss")
axes[1].set_title("Each run", fontsize=10)
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()
ds_vs_gshard = final["DeepSeekMoE"] - final["GShard top-2"]  # per seed: negative when DeepSeekMoE is better
moe_vs_dense = np.minimum(final["DeepSeekMoE"], final["GShard top-2"]) - final["dense"]
print(f"final loss, DeepSeekMoE minus GShard per seed: {', '.join(f'{v:+.3f}' for v in ds_vs_gshard)}; "
      f"best MoE minus dense: {', '.join(f'{v:+.3f}' for v in moe_vs_dense)}")

# %% [markdown]
# Read this with the size of the runs in mind: at `small` scale, a few hundred steps of models of a few hundred
# thousand parameters. The printout above says, seed by seed, which model ended lower, and section 9 records whether
# each ordering held on every seed. The paper's gap between DeepSeekMoE and GShard (Pile loss 1.808 against 1.867 for
# 2B models after 100B tokens) is 0.06 nats. Compare any gap here with the difference between two seeds of the same
# model, which section 9 prints as the seed-to-seed noise: only an ordering that holds on every seed counts.
#
# What to look for. If both MoE models end below the dense one on every seed, the extra parameters pay even at this
# size: the dense model has a quarter of their feed-forward parameters to store sums in, at the same computation per
# token. If DeepSeekMoE against GShard changes sign from one seed to the other, that comparison is inside the noise of
# these runs, and the ledger says so instead of counting it as a reproduction.

# %% [markdown]
# ## 6. Experiment: no balancing vs the auxiliary loss vs the loss-free bias
#
# The three DeepSeekMoE runs that differ only in balancing. Two papers make the claim under test. Wang et al. (arXiv
# 2408.15664), who introduced the bias, report that it gives both a lower MaxVio and a lower perplexity than training
# with an auxiliary loss. DeepSeek-V3 adopts the bias, and its ablation (section 4.5.2) reports that models trained
# with it do better on most benchmarks than the same models trained with an auxiliary loss alone. The measure of
# balance here is each training batch's MaxVio, averaged over the MoE layers. The loss arm uses DeepSeekMoE's
# $\alpha_1 = 0.01$ and the bias arm V3's $\gamma = 0.001$, so the comparison inherits both papers' settings, not a
# tuned pair.

# %%
def smooth(v: np.ndarray, k: int = 10) -> np.ndarray:
    return np.convolve(v, np.ones(k) / k, mode="valid")


half = EXP["steps"] // 2
maxvio_late = {a: np.array([runs[(a, s)]["maxvio"][half:].mean() for s in EXP["seeds"]]) for a in BALANCE_RACE}
maxvio_all = {a: np.array([runs[(a, s)]["maxvio"].mean() for s in EXP["seeds"]]) for a in BALANCE_RACE}
fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
for arm in BALANCE_RACE:
    for s in EXP["seeds"]:
        axes[0].plot(smooth(runs[(arm, s)]["maxvio"]), color=colours[arm], lw=1,
                     ls="-" if s == EXP["seeds"][0] else "--", label=arm if s == EXP["seeds"][0] else None)
axes[0].set_xlabel("step")
axes[0].set_ylabel("MaxVio of the batch (10-step mean)")
axes[0].set_title("Load imbalance during training", fontsize=10)
axes[0].legend(fontsize=8)
for i, arm in enumerate(BALANCE_RACE):
    axes[1].scatter(maxvio_late[arm], final[arm], color=colours[arm], s=40, label=arm)
axes[1].set_xlabel(f"mean MaxVio over the last {EXP['steps'] - half} steps")
axes[1].set_ylabel("final held-out loss")
axes[1].set_title("Balance against quality (one point per seed)", fontsize=10)
axes[1].legend(fontsize=8)
fig.tight_layout()
plt.show()
print(f"{'':<28}{'MaxVio, 2nd half':>17}{'MaxVio, all':>13}{'final loss':>12}")
for a in BALANCE_RACE:
    print(f"{a:<28}{maxvio_late[a].mean():>17.2f}{maxvio_all[a].mean():>13.2f}{final[a].mean():>12.3f}   "
          f"(per seed: MaxVio {' '.join(f'{v:.2f}' for v in maxvio_late[a])}, loss "
          f"{' '.join(f'{v:.3f}' for v in final[a])})")

# %% [markdown]
# How to read it. MaxVio is bounded by $31/7 - 1 \approx 3.4$ here (one expert taking every token), so a curve near 1
# means the busiest expert receives twice the mean load. Without balancing, a MaxVio that climbs early in training and
# stays high is the self-reinforcing collapse of section 3. If the bias works, its curve should start with the others
# and fall as the biases accumulate, since it needs some steps of $\gamma$ before it can move affinities of about 0.03.
# The right panel is the trade-off both papers discuss: a balancing method is better only if its point lies lower
# (better loss) at no worse MaxVio. With two seeds and a few hundred steps at `small` scale, read a difference in final
# loss against the seed-to-seed noise before calling it a cost.
#
# ## 7. Specialisation: what breaks when experts are taken away
#
# **Redundancy.** DeepSeekMoE argues (section 4.5) that its experts are more specialised: each knows things the others
# do not. Its test: disable each token's best routed experts, let the router pick the next best in their place, and
# watch the loss. If experts are redundant, a stand-in does the job and the loss hardly moves; if they are specialised,
# it rises. In the paper's figure, the loss of DeepSeekMoE rises faster than that of GShard×1.5 as the share of
# disabled top experts grows. We disable about the same share of routed experts in our two models (1 and 2 of
# GShard's 8, that is 12.5% and 25%; 4 and 8 of DeepSeekMoE's 31, about 13% and 26%) with the router's `disabled_top`.
# The paper compares against GShard×1.5, a GShard with 1.5 times the expert parameters and computation; ours is the
# plain GShard of section 5. Note what `disabled_top` does to GShard: with 1 disabled, each token keeps its second
# expert and gets its third in place of its first; with 2, both of its experts are stand-ins.
#
# **The shared expert.** DeepSeekMoE's test (section 4.5) disables the shared expert of the 2B model *and activates one
# more routed expert*, so the computation stays the same; the Pile loss rises from 1.808 to 2.414. We run that test on
# the trained models (`shared_disabled`, and one more routed expert per token through the router's
# `num_experts_per_tok`), and beside it the shared expert switched off alone, which also takes away an eighth of the
# activated feed-forward width. The gap between the two bars is what the extra routed expert wins back; the gap
# between the paper's bar and the intact model is what the routed experts cannot replace.

# %%
@torch.no_grad()
def loss_with(model: torch.nn.Module, disabled_top: int = 0, shared_off: bool = False, extra_routed: int = 0) -> float:
    """Held-out loss with each token's disabled_top best routed experts taken away, the shared expert off, and/or
    extra_routed more routed experts per token; the model is restored afterwards."""
    layers = moe_layers(model)
    for l in layers:
        l.gate.disabled_top, l.shared_disabled = disabled_top, shared_off
        l.config.num_experts_per_tok += extra_routed  # the router reads K_r from its config at every forward
    try:
        return evaluate_loss(model, valid)
    finally:
        for l in layers:
            l.gate.disabled_top, l.shared_disabled = 0, False
            l.config.num_experts_per_tok -= extra_routed


DISABLED = {"GShard top-2": (0, 1, 2), "DeepSeekMoE": (0, 4, 8)}
ROUTED = {"GShard top-2": 8, "DeepSeekMoE": 31}
ablation = {(a, s): [loss_with(runs[(a, s)]["model"], r) for r in DISABLED[a]] for a in DISABLED for s in EXP["seeds"]}
rise = {a: np.array([[ablation[(a, s)][j] - ablation[(a, s)][0] for j in (1, 2)] for s in EXP["seeds"]])
        for a in DISABLED}  # (seeds, 2): loss increase at the two shares
shared_off = np.array([loss_with(runs[("DeepSeekMoE", s)]["model"], shared_off=True) for s in EXP["seeds"]])
shared_swapped = np.array([loss_with(runs[("DeepSeekMoE", s)]["model"], shared_off=True, extra_routed=1)
                           for s in EXP["seeds"]])  # the paper's test: equal computation
shared_on = np.array([ablation[("DeepSeekMoE", s)][0] for s in EXP["seeds"]])
fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
for a in DISABLED:
    for s in EXP["seeds"]:
        shares = [r / ROUTED[a] for r in DISABLED[a]]
        axes[0].plot(shares, ablation[(a, s)], marker="o", color=colours[a], ls="-" if s == EXP["seeds"][0] else "--",
                     label=a if s == EXP["seeds"][0] else None)
axes[0].set_xlabel("share of routed experts disabled (each token's best ones)")
axes[0].set_ylabel("held-out loss")
axes[0].set_title("Disabling top routed experts", fontsize=10)
axes[0].legend(fontsize=8)
bars = {"intact": (shared_on, "tab:blue"), "off, +1 routed": (shared_swapped, "tab:purple"),
        "off": (shared_off, "tab:red")}
axes[1].bar([f"{k}\nseed {s}" for k in bars for s in EXP["seeds"]], [v for k in bars for v in bars[k][0]],
            color=[bars[k][1] for k in bars for _ in EXP["seeds"]])
axes[1].tick_params(axis="x", labelsize=7)
axes[1].set_ylabel("held-out loss")
axes[1].set_title("DeepSeekMoE without its shared expert", fontsize=10)
fig.tight_layout()
plt.show()
for a in DISABLED:
    print(f"{a:<14} loss rise when disabling {DISABLED[a][1]} / {DISABLED[a][2]} of {ROUTED[a]} top experts: "
          + "; ".join(f"seed {s}: {r[0]:+.3f} / {r[1]:+.3f}" for s, r in zip(EXP["seeds"], rise[a])))
print("shared expert: intact -> off with one more routed expert (the paper's test) -> off alone: " + "; ".join(
    f"seed {s}: {a:.3f} -> {b:.3f} -> {c:.3f}" for s, a, b, c in zip(EXP["seeds"], shared_on, shared_swapped,
                                                                      shared_off)))

# %% [markdown]
# What to look for. On the left, a steeper rise for DeepSeekMoE than for GShard at the same share would match the
# paper's reading that its experts are less interchangeable; the per-seed numbers printed below the plot say whether
# that held on both seeds. On the right, the shared-expert ablation: the purple bars are the paper's test at equal
# computation, the red ones the shared expert removed with nothing in its place. If the purple bars stand clearly
# above the blue ones, the routed experts cannot stand in for the shared one, which is the paper's reading of its
# 1.808 to 2.414; if they sit near the blue ones, in this small world they can.
#
# ### Where the tokens go
#
# Which experts does each kind of token visit? We route the held-out documents through the first seed's DeepSeekMoE
# and count, for each kind of token (digits, the operators + - =, the tags, the reflection word " wait ", letters of the
# worded solutions, and the rest), the share of its choices that lands on each expert. If experts specialise by kind,
# the rows differ; a number for it is the mutual information between a choice's token kind $k$ and its expert $e$,
#
# $$I(k; e) = \sum_{k, e} p(k, e) \log \frac{p(k, e)}{p(k)\,p(e)},$$
#
# in nats, where $p(k, e)$ is the share of all (token, choice) pairs with kind $k$ and expert $e$. It is 0 when the
# expert a token visits says nothing about its kind. Estimated from finitely many tokens it is never exactly 0, so we
# compute it again with the kinds shuffled among the tokens: that value is what chance alone gives, and the real one
# means something only well above it (the checks ask for three times). Padding is left out.

# %%
KIND_OF = {}
for i in range(V):
    t = tok.decode([i], skip=())
    KIND_OF[i] = ("digit" if t.isdigit() else "operator" if t in "+-=" and t else "tag" if t.startswith("<")
                  else "reflection" if t == " wait " else "letter" if t.isalpha() and t != "Q" else "other")
KINDS = ("digit", "operator", "tag", "reflection", "letter", "other")


@torch.no_grad()
def routes_by_kind(model: torch.nn.Module) -> tuple[list[np.ndarray], list[float], list[float]]:
    """Per MoE layer: the (kinds, experts) share matrix, and the mutual information (nats) between token kind and
    chosen expert, real and with the kinds shuffled."""
    kinds_all, per_layer = [], [[] for _ in moe_layers(model)]
    for b in valid:
        model(b["input_ids"], positions=b["positions"], segments=b["segments"])
        real = (b["segments"] > 0).reshape(-1)
        kinds_all.append(np.array([KINDS.index(KIND_OF[i]) for i in b["input_ids"].reshape(-1).tolist()])[real.numpy()])
        for j, l in enumerate(moe_layers(model)):
            per_layer[j].append(l.routing.indices[real].numpy())
    kinds = np.concatenate(kinds_all)
    shares, mi, mi_shuffled = [], [], []
    rng = np.random.default_rng(0)
    for chunks in per_layer:
        idx = np.concatenate(chunks)  # (tokens, k)
        n_e = int(moe_layers(model)[0].config.n_routed_experts)

        def joint(kk):
            m = np.zeros((len(KINDS), n_e))
            np.add.at(m, (np.repeat(kk, idx.shape[1]), idx.reshape(-1)), 1)
            return m

        def info(m):
            p = m / m.sum()
            outer = p.sum(1, keepdims=True) * p.sum(0, keepdims=True)
            nz = p > 0
            return float((p[nz] * np.log(p[nz] / outer[nz])).sum())

        m = joint(kinds)
        shares.append(m / m.sum(1, keepdims=True).clip(min=1))
        mi.append(info(m))
        mi_shuffled.append(info(joint(rng.permutation(kinds))))
    return shares, mi, mi_shuffled


kind_shares, kind_mi, kind_mi_shuffled = routes_by_kind(runs[("DeepSeekMoE", EXP["seeds"][0])]["model"])
fig, axes = plt.subplots(1, len(kind_shares), figsize=(5.5 * len(kind_shares), 2.8), squeeze=False)
for j, (ax, m) in enumerate(zip(axes[0], kind_shares)):
    im = ax.imshow(m, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(KINDS)), KINDS)
    ax.set_xlabel("routed expert")
    ax.set_title(f"MoE layer {j}: share of each kind's choices (MI {kind_mi[j]:.2f} nats, shuffled "
                 f"{kind_mi_shuffled[j]:.3f})", fontsize=9)
    fig.colorbar(im, ax=ax)
fig.tight_layout()
plt.show()

# %% [markdown]
# A kind that routes to a few bright cells in its row has experts of its own; a row spread evenly over all 31 experts
# has none. Digits are the kind to watch: in this world they carry the sums, which is the knowledge the feed-forward
# layers must store.
#
# ## 8. Explore
#
# **Routes of one problem.** Pick a model, a layer and a held-out document: the heatmap shows, for each token, the
# gating weight of every routed expert it chose. Try the model without balancing first: a few rows lit across the whole
# document are experts that take almost every token, the collapse that MaxVio counts. Then compare the same document
# under the loss-free bias, and look at whether the digits of one problem share experts with each other.

# %%
explore_docs = world.validation()[:40]


@torch.no_grad()
def show_routes(model="DeepSeekMoE", layer=0, document=0):
    net = runs[(model, EXP["seeds"][0])]["model"]
    ids = torch.tensor([tok.encode(explore_docs[document].text, bos=True)])
    net(ids)
    lay = moe_layers(net)[min(layer, len(moe_layers(net)) - 1)]
    grid = torch.zeros(lay.config.n_routed_experts, ids.shape[1])
    grid.scatter_(0, lay.routing.indices.T, lay.routing.weights.T.float())
    fig, ax = plt.subplots(figsize=(min(16, 2 + 0.28 * ids.shape[1]), 3.2))
    ax.imshow(grid.numpy(), aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xticks(range(ids.shape[1]), [repr(tok.decode([i], skip=()))[1:-1] for i in ids[0].tolist()],
                  rotation=90, fontsize=7)
    ax.set_ylabel("routed expert")
    ax.set_title(f"{model}, MoE layer {layer}: gating weight of each chosen expert", fontsize=10)
    fig.tight_layout()
    plt.show()


explore(show_routes, model=["DeepSeekMoE", "GShard top-2", "DeepSeekMoE, no balancing",
                            "DeepSeekMoE, loss-free bias"], layer=list(range(EXP["n_layer"])),
        document=(0, len(explore_docs) - 1, 1))

# %% [markdown]
# **Replay balancing.** We record the router inputs of the first MoE layer of the model trained *without* balancing, on
# the held-out documents, and replay balancing on them with the experts' centroids frozen: the loss-free bias, moved by
# $\pm\gamma$ after each step, against a per-expert offset of the logits trained by plain gradient descent (learning
# rate 1) on the expert-level loss with weight $\alpha$. Each step routes the same tokens; the curves show MaxVio.
#
# The replay isolates the two control rules from everything else in training: the tokens and the centroids do not
# change, so any fall in MaxVio is the rule's own doing. The bias has a fixed step and moves every expert off the mean
# at once. The loss moves the offsets along its gradient, which through the softmax is, for expert $j$,
# $\frac{\alpha}{T} \sum_t s_{j,t} \big(f_j - \sum_i f_i s_{i,t}\big)$: it shrinks as the loads approach balance. Slide
# $\gamma$ up and watch whether the bias gets faster and, at some value, starts to jitter: a fixed step keeps pushing
# every expert that is off the mean, so it can hover around balance instead of settling.

# %%
with torch.no_grad():
    recorder = runs[("DeepSeekMoE, no balancing", EXP["seeds"][0])]["model"]
    first_moe = moe_layers(recorder)[0]
    captured = []
    hook = first_moe.gate.register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach()))
    for b in valid:
        recorder(b["input_ids"], positions=b["positions"], segments=b["segments"])
    hook.remove()
    recorded_logits = torch.cat(captured) @ first_moe.gate.weight.detach().T  # (tokens, experts)
K_RECORDED = first_moe.config.num_experts_per_tok


def replay(logits: torch.Tensor, gamma: float = 0.0, alpha: float = 0.0, steps: int = 200) -> np.ndarray:
    """MaxVio per step when balancing the recorded logits with the bias (gamma) and the loss (alpha, SGD, lr 1)."""
    bias = torch.zeros(logits.shape[1])
    offset = torch.zeros(logits.shape[1], requires_grad=True)
    out = []
    for _ in range(steps):
        scores = (logits + offset).softmax(dim=-1)
        indices = (scores.detach() + bias).topk(K_RECORDED, dim=-1).indices
        load = expert_load(indices, logits.shape[1])
        out.append(max_violation(load))
        bias += gamma * torch.sign(load.mean() - load)
        if alpha:
            loss = alpha * expert_balance_loss(scores, indices)
            (grad,) = torch.autograd.grad(loss, offset)
            with torch.no_grad():
                offset -= grad
    return np.array(out)


def show_replay(gamma=0.002, alpha=0.05):
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot(replay(recorded_logits), color=colours["DeepSeekMoE, no balancing"], label="no balancing")
    ax.plot(replay(recorded_logits, gamma=gamma), color=colours["DeepSeekMoE, loss-free bias"],
            label=f"bias, gamma {gamma:g}")
    ax.plot(replay(recorded_logits, alpha=alpha), color=colours["DeepSeekMoE"], label=f"loss, alpha {alpha:g}")
    ax.set_xlabel("replay step")
    ax.set_ylabel("MaxVio")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Balancing replayed on {recorded_logits.shape[0]:,} recorded tokens, {recorded_logits.shape[1]} "
                 f"experts", fontsize=10)
    ax.legend(fontsize=8)
    plt.show()


replay_start = max_violation(expert_load((recorded_logits.softmax(-1)).topk(K_RECORDED, -1).indices,
                                         recorded_logits.shape[1]))
replay_bias_end = replay(recorded_logits, gamma=0.002)[-20:].mean()
explore(show_replay, gamma=(0.0, 0.004, 0.0005), alpha=(0.0, 0.1, 0.01))
print(f"replay: MaxVio {replay_start:.2f} without balancing, {replay_bias_end:.2f} over the last 20 of 200 bias steps")

# %% [markdown]
# ### The speed of the dispatch
#
# `benchmarks/moe_dispatch.py` measures the layer at a DeepSeek-like shape (64 routed experts, top 6, width 256, expert
# width 128, 4096 tokens) against a dense SwiGLU with the same activated computation and against transformers'
# `DeepseekV3MoE`. Here a quick version of its first comparison, forward and backward, the fastest of three tries each
# (timings on a shared machine can move by tens of percent; the benchmark alternates its contenders over more rounds).
#
# The dense SwiGLU of width $6 \times 128$ does the same multiply-adds per token as 6 experts of width 128, so a ratio
# of 1 would mean the dispatch costs nothing. Above 1, the difference is the router, the sort, the gathers and the
# smaller products of section 2. The ratio is a property of this machine and this PyTorch, not of the method.

# %%
def fastest(fn, tries: int = 3) -> float:
    fn()
    best = float("inf")
    for _ in range(tries):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


torch.manual_seed(0)
bench_cfg = MoEConfig(d_model=256, moe_intermediate_size=128, n_routed_experts=64, num_experts_per_tok=6,
                      scoring_func="sigmoid", routed_scaling_factor=2.5)
bench_moe, bench_dense = MoE(bench_cfg).to(device), SwiGLU(256, 6 * 128).to(device)
bench_x = torch.randn(4096, 256, device=device, requires_grad=True)
speed = {}
for name, layer in (("MoE", bench_moe), ("dense", bench_dense)):
    speed[(name, "forward")] = fastest(lambda: layer(bench_x.detach()))
    speed[(name, "forward+backward")] = fastest(lambda: layer(bench_x).square().mean().backward())
moe_over_dense = {p: speed[("MoE", p)] / speed[("dense", p)] for p in ("forward", "forward+backward")}
print("MoE layer time / dense SwiGLU of the same activated width: "
      + ", ".join(f"{p} {r:.2f}x" for p, r in moe_over_dense.items()))

# %% [markdown]
# ## 9. Claims ledger
#
# What the papers claim next to what this chapter measured. Each row's verdict comes from a rule written in the cell
# (on every seed, with a margin where the row says "better"), not from reading the plots. A row that fails carries a
# note on why the miniature may differ from the paper: most often, runs of a few hundred steps, where differences
# between methods can be smaller than differences between seeds. The first and last rows are identities and checks of
# the code, not experiments.

# %%
seeds_text = f"{len(EXP['seeds'])} seeds, {EXP['steps']} steps"
ds_beats_gshard = bool((ds_vs_gshard < 0).all())
moe_beats_dense = bool((moe_vs_dense < 0).all())
shared_matters = bool((shared_swapped > 1.1 * shared_on).all())  # the paper's rise is 34%; we ask for 10%
less_redundant = bool((rise["DeepSeekMoE"] > rise["GShard top-2"]).all())
collapse = bool((maxvio_late["DeepSeekMoE, no balancing"] > 1.5 * np.maximum(
    maxvio_late["DeepSeekMoE"], maxvio_late["DeepSeekMoE, loss-free bias"])).all())
# "Better" needs a margin: a MaxVio at least 10% lower, and a lower final loss, on every seed.
bias_balances_better = bool((maxvio_late["DeepSeekMoE, loss-free bias"] < 0.9 * maxvio_late["DeepSeekMoE"]).all())
bias_no_worse = bool((final["DeepSeekMoE, loss-free bias"] < final["DeepSeekMoE"]).all())
noise = float(np.abs(np.diff(np.stack([final[a] for a in ARMS]), axis=1)).mean()) if len(EXP["seeds"]) > 1 else 0.0

ledger = Ledger("02")
ledger.add("Fine-grained experts give many more expert combinations",
           "C(16,2) = 120 vs C(64,8) = 4.4e9 (DeepSeekMoE, section 3.1)",
           f"{combos['GShard, 2 of 16']:,} vs {combos['DeepSeekMoE, 8 of 64 (m = 4)']:.2e}",
           combos["GShard, 2 of 16"] == 120 and round(combos["DeepSeekMoE, 8 of 64 (m = 4)"] / 1e9, 1) == 4.4)
ledger.add("DeepSeekMoE beats GShard at equal total and activated parameters",
           "Pile loss 1.808 vs 1.867 (2B models, 100B tokens)",
           f"final held-out loss {final['DeepSeekMoE'].mean():.3f} vs {final['GShard top-2'].mean():.3f}; per seed "
           f"{', '.join(f'{v:+.3f}' for v in ds_vs_gshard)} ({seeds_text})", ds_beats_gshard,
           "" if ds_beats_gshard else f"not on every seed: the gap is within the seed-to-seed noise of these short "
           f"runs (about {noise:.3f} between seeds); the paper's gap needs 100B tokens")
ledger.add("An MoE layer beats the dense FFN of the same activated size",
           "the premise of MoE; DeepSeekMoE 2B (0.3B activated) reaches Dense x16's Pile loss, 1.808 vs 1.806",
           f"best MoE minus dense (width 2W), final loss per seed: {', '.join(f'{v:+.3f}' for v in moe_vs_dense)}",
           moe_beats_dense, "" if moe_beats_dense else "not on every seed at this size and length of training")
swap_rise = shared_swapped / shared_on - 1
ledger.add("The shared expert carries knowledge the routed experts lack",
           "disabling it and activating one more routed expert: Pile loss 1.808 -> 2.414 (+34%)",
           "held-out loss, the same test: " + "; ".join(f"{a:.3f} -> {b:.3f}" for a, b in zip(shared_on,
                                                                                        shared_swapped))
           + " (off alone: " + ", ".join(f"{c:.3f}" for c in shared_off) + ")",
           shared_matters, "" if shared_matters else
           f"the loss changed by {swap_rise.min():+.0%} to {swap_rise.max():+.0%}, under the +10% this row asks and far "
           f"from the paper's 34%: with 1 of 8 active experts shared, one more of the 31 routed experts stands in for "
           f"much of it in so small and short a run")
ledger.add("Fine-grained experts are less redundant: disabling top experts hurts DeepSeekMoE more",
           "loss rises faster than GShard x1.5's (DeepSeekMoE, section 4.5; a figure only)",
           f"rise at 1/8 and 1/4 of routed experts: DeepSeekMoE "
           f"{', '.join('/'.join(f'{v:+.2f}' for v in r) for r in rise['DeepSeekMoE'])}; GShard "
           f"{', '.join('/'.join(f'{v:+.2f}' for v in r) for r in rise['GShard top-2'])} (per seed)",
           less_redundant, "" if less_redundant else "not at every share and seed")
ledger.add("Without balancing the routing collapses onto a few experts",
           "routing collapse (DeepSeekMoE, section 3.3)",
           f"MaxVio, 2nd half of training: none {maxvio_late['DeepSeekMoE, no balancing'].mean():.2f}, loss "
           f"{maxvio_late['DeepSeekMoE'].mean():.2f}, bias {maxvio_late['DeepSeekMoE, loss-free bias'].mean():.2f}",
           collapse, "" if collapse else "the imbalance without balancing was less than 1.5x the balanced runs'")
ledger.add("The loss-free bias balances better than the auxiliary loss",
           "lower MaxVio (Wang et al., arXiv 2408.15664; adopted by V3 with gamma = 0.001, section 2.1.2)",
           f"MaxVio bias {maxvio_late['DeepSeekMoE, loss-free bias'].mean():.2f} vs loss (alpha1 = {ALPHA1}) "
           f"{maxvio_late['DeepSeekMoE'].mean():.2f}; per seed "
           f"{' '.join(f'{v:.2f}' for v in maxvio_late['DeepSeekMoE, loss-free bias'])} vs "
           f"{' '.join(f'{v:.2f}' for v in maxvio_late['DeepSeekMoE'])}", bias_balances_better,
           "" if bias_balances_better else "not better by 10% on every seed (softmax gating, a few hundred steps): "
           "compare the two MaxVio values, and the no-balancing row above")
ledger.add("... without the quality cost of the loss",
           "better model quality than with the auxiliary loss (Wang et al.; V3, sections 2.1.2 and 4.5.2)",
           f"final held-out loss bias {' '.join(f'{v:.3f}' for v in final['DeepSeekMoE, loss-free bias'])} vs loss "
           f"{' '.join(f'{v:.3f}' for v in final['DeepSeekMoE'])} (per seed); no balancing "
           f"{' '.join(f'{v:.3f}' for v in final['DeepSeekMoE, no balancing'])}", bias_no_worse,
           "" if bias_no_worse else f"not lower on every seed; the differences are within the seed-to-seed noise "
           f"({noise:.3f})")
ledger.add("The bias chooses experts but does not weigh them", "V3, eq. 16: g'_{i,t} = s_{i,t}",
           f"a bias moved {moved:.0%} of tokens to other experts; weights equal the unbiased affinities: "
           f"{weights_are_unbiased}", bool(weights_are_unbiased and moved > 0.5))
ledger.show()
saved_to = ledger.save()  # _build/ledger/02.json: `python -m dslib.book ledger` prints every chapter's rows

# %% [markdown]
# ## What you learned
#
# - An MoE layer decouples parameters from computation: $N$ experts stored, $K$ used per token. DeepSeekMoE splits the
#   experts finer ($mN$ of width $1/m$, $mK$ active) and isolates shared experts that every token passes through.
# - The router scores experts with softmax (GShard, DeepSeekMoE, V2) or sigmoid (V3), chooses with top-k, optionally
#   within the best groups first (V2's devices, V3's nodes), and learns only through the gating weights of the
#   experts it chose.
# - A fast dispatch sorts (token, expert) pairs by expert so that each expert runs once on a contiguous block, and a
#   hand-written backward can do the same arithmetic as autograd with fewer intermediates; a slow loop is the check.
# - Routing left alone can collapse. DeepSeekMoE and V2 add balance losses $\alpha \sum_i f_i P_i$ at the expert and
#   device level; the auxiliary-loss-free bias of Wang et al., adopted by V3, steers only the choice, by
#   $\pm\gamma$ per step, and V3 keeps a tiny sequence-wise loss beside it. MaxVio measures the result.
# - How to read a toy reproduction: equal activated and total parameters by construction, every ordering checked on
#   every seed, and a claims ledger that says where the miniature agrees with the papers and where it cannot tell.
#
# **Next.** Chapter 03 turns to the other half of a DeepSeek block, attention: Multi-head Latent Attention (MLA), V2's
# way to shrink the KV cache by caching, per token, one compressed latent and one small rotary key instead of every
# head's keys and values. Chapter 04 then puts MLA and this chapter's `MoE` together, with multi-token prediction, into
# a small DeepSeek-V3.
#
# ## Exercises
#
# Difficulty: ★ (a few minutes), ★★ (an experiment), ★★★ (a small project). Run them after the whole chapter: several
# reuse its names (`ARMS`, `train_arm`, `runs`, `base`, `fine`, `softmax_gating`, `valid`), and some add entries to
# `ARMS` and `runs`.
#
# 1. ★★ **Granularity.** Rerun section 5's DeepSeekMoE with $m = 2$ (16 experts of $W/2$: 1 shared + 15 routed, top 3)
#    and $m = 8$ (64 of $W/8$: 1 shared + 63 routed, top 15), at the same total and activated parameters. Plot the
#    final loss against $m$. Where does the extra combinatorial freedom stop paying at this size?
#
#    <details><summary>Hint</summary>With $m$, there are $8m$ experts of width $W/m$, one of them shared, and $2m$
#    active. Add a maker to `ARMS` and call `train_arm(arm, seed)` for each seed.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    for m in (2, 8):
#        arm = f"DeepSeekMoE, m = {m}"
#        ARMS[arm] = lambda m=m: MoETransformer(MoETransformerConfig(
#            **base, **softmax_gating, moe_intermediate_size=W // m, n_routed_experts=8 * m - 1,
#            num_experts_per_tok=2 * m - 1, n_shared_experts=1, aux_loss_alpha=ALPHA1))
#        for s in EXP["seeds"]:
#            runs[(arm, s)] = train_arm(arm, s)
#    grain = {m: [runs[(a, s)]["history"]["eval_loss"][-1] for s in EXP["seeds"]]
#             for m, a in ((2, "DeepSeekMoE, m = 2"), (4, "DeepSeekMoE"), (8, "DeepSeekMoE, m = 8"))}
#    for m, v in grain.items():
#        plt.scatter([m] * len(v), v)
#    plt.xscale("log", base=2); plt.xlabel("m"); plt.ylabel("final held-out loss"); plt.show()
#    ```
#    The `m=m` default freezes each maker's $m$ (a plain closure would see the last one). GShard top-2 is the $m = 1$
#    end without a shared expert. At `small` scale $W/8$ is 8 hidden units: if $m = 8$ ends no better than $m = 4$ on
#    both seeds, the experts have become too narrow to hold a useful piece each, or the runs too short to train 63 of
#    them, since each expert sees about $15/63$ of the tokens. Read the seeds' spread before the trend.
#    </details>
#
# 2. ★★ **V3's gating.** Repeat the balancing race with `scoring_func="sigmoid"` and `norm_topk_prob=True`. Sigmoid
#    affinities lie around 0.5, not $1/E$: what $\gamma$ does the bias need now?
#
#    <details><summary>Hint</summary>`train_arm` moves the bias only for the arm named "DeepSeekMoE, loss-free bias",
#    and it reads the global `GAMMA` at every step. Swap that arm's maker for a sigmoid one, and try two values of
#    `GAMMA`. For the size of $\gamma$, compare how far apart two experts' affinities are for the same gap in
#    logits.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    sigmoid_gating = dict(scoring_func="sigmoid", norm_topk_prob=True)
#    saved = dict(ARMS)
#    ARMS["DeepSeekMoE, no balancing"] = lambda: MoETransformer(MoETransformerConfig(**base, **sigmoid_gating, **fine))
#    ARMS["DeepSeekMoE, loss-free bias"] = ARMS["DeepSeekMoE, no balancing"]
#    none = [train_arm("DeepSeekMoE, no balancing", s)["maxvio"][half:].mean() for s in EXP["seeds"]]
#    biased = {}
#    for GAMMA in (1e-3, 1e-2):  # a module-level loop: it sets the global that train_arm reads
#        biased[GAMMA] = [train_arm("DeepSeekMoE, loss-free bias", s)["maxvio"][half:].mean() for s in EXP["seeds"]]
#    ARMS.update(saved)
#    GAMMA = 1e-3
#    print("no balancing", none, "bias", biased)
#    ```
#    Near initialisation the logits are small. A logit gap $\delta$ becomes a softmax gap of about $\delta / E$ (the
#    softmax's slope is about $p \approx 1/E$) but a sigmoid gap of about $\delta / 4$ ($\sigma'(0) = 1/4$). With
#    $E = 31$ the sigmoid gaps are about 8 times wider, so for the bias to move tokens as fast, expect it to need a
#    $\gamma$ about 8 times larger, near 0.01. If `biased[1e-3]` stays close to `none` and `biased[1e-2]` does not, that
#    is the reason. V3's own $\gamma = 0.001$ comes with far longer training, where a small step has time to add up.
#    </details>
#
# 3. ★★ **Device-limited routing.** Split the experts into 4 groups, keep the best 2 per token (V2's $M = 2$ of 4
#    devices) and add a device-level loss (`n_devices=4, device_loss_alpha=0.05`). How much does limiting the groups
#    cost in loss? Measure the load per device as well as per expert.
#
#    <details><summary>Hint</summary>Section 5's 31 routed experts cannot be split into 4 groups (`MoEConfig` raises:
#    `n_group` must divide `n_routed_experts`). Use 32 routed experts of $W/4$, top 8 and no shared expert: the same
#    total and activated parameters. A device's load is the sum of its experts' loads, `load.view(4, -1).sum(1)`.
#    </details>
#    <details><summary>Solution</summary>
#
#    ```python
#    flat32 = dict(moe_intermediate_size=W // 4, n_routed_experts=32, num_experts_per_tok=8, n_shared_experts=0,
#                  aux_loss_alpha=ALPHA1, n_devices=4, device_loss_alpha=0.05)
#    ARMS["32 routed"] = lambda: MoETransformer(MoETransformerConfig(**base, **softmax_gating, **flat32))
#    ARMS["32 routed, 2 of 4 groups"] = lambda: MoETransformer(MoETransformerConfig(
#        **base, **softmax_gating, **flat32, n_group=4, topk_group=2))
#    b = valid[0]
#    for arm in ("32 routed", "32 routed, 2 of 4 groups"):
#        run = train_arm(arm, 0)
#        with torch.no_grad():
#            run["model"](b["input_ids"], positions=b["positions"], segments=b["segments"])
#        layer = moe_layers(run["model"])[0]
#        load = expert_load(layer.routing.indices[(b["segments"] > 0).reshape(-1)], 32)
#        print(f"{arm:<26} final loss {run['history']['eval_loss'][-1]:.3f}, MaxVio per expert "
#              f"{max_violation(load):.2f}, per device {max_violation(load.view(4, -1).sum(1)):.2f}")
#    ```
#    Both arms carry the same losses, so they differ only in the group limit. The device-level MaxVio should be well
#    below the expert-level one, since a device sums 8 experts' loads: that is why V2 can afford a device-level loss
#    that lets experts within a device stay unbalanced. V2 reports that $M \ge 3$ of 8 devices is about as good as
#    no limit; with 2 of 4 groups each token can still reach half the experts, so a cost within the seed-to-seed
#    noise would agree with it.
#    </details>
#
# 4. ★★ **The sequence-wise loss.** Pack rows that hold a single kind of document (only worded solutions, say) and
#    measure MaxVio inside each row with and without `seq_aux_alpha=0.0001`. When does V3 need it?
#
#    <details><summary>Hint</summary>`Document.language` is "en" for a solution reasoned in words. Reshape a layer's
#    `routing.indices` to (rows, t, k) and compute `max_violation(expert_load(...))` per row, on the tokens whose
#    `segments` are above 0.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    en_rows = PackedData([d.text for d in world.corpus() if d.language == "en"], tok, SEQ_LEN, 16).all_batches()[:8]
#
#    @torch.no_grad()
#    def row_maxvio(model, batches) -> float:
#        """The mean over rows of the MaxVio inside each row (real tokens only), first MoE layer."""
#        layer, out = moe_layers(model)[0], []
#        for b in batches:
#            model(b["input_ids"], positions=b["positions"], segments=b["segments"])
#            idx = layer.routing.indices.view(*b["input_ids"].shape, -1)  # (rows, t, k)
#            for row, seg in zip(idx, b["segments"]):
#                out.append(max_violation(expert_load(row[seg > 0], layer.config.n_routed_experts)))
#        return float(np.mean(out))
#
#    saved = dict(ARMS)
#    ARMS["DeepSeekMoE, loss-free bias"] = lambda: MoETransformer(MoETransformerConfig(
#        **base, **softmax_gating, **fine, seq_aux_alpha=1e-4))
#    with_seq = train_arm("DeepSeekMoE, loss-free bias", EXP["seeds"][0])["model"]
#    ARMS.update(saved)
#    without = runs[("DeepSeekMoE, loss-free bias", EXP["seeds"][0])]["model"]
#    for name, rows in (("mixed rows", valid[:8]), ("worded rows", en_rows)):
#        print(f"{name:<12} MaxVio inside a row: without {row_maxvio(without, rows):.2f}, "
#              f"with {row_maxvio(with_seq, rows):.2f}")
#    ```
#    A row of 96 tokens gives each of 31 experts about 22 choices on average, so even a random routing has a MaxVio
#    well above 0 inside a row: compare the two rows of the printout with each other, not with 0. The bias balances
#    the whole batch, so a batch can be balanced while a row of one kind piles onto a few experts; that is what
#    worded rows should show if experts specialise by kind. V3 keeps the loss as a guard against that *extreme*
#    case, with $\alpha = 10^{-4}$ so small that it barely constrains normal training; its section 4.5.3 argues that
#    balancing per batch rather than per sequence is what leaves experts free to specialise by domain. Expect a
#    small effect in so short a run.
#    </details>
#
# 5. ★★ **How many routed experts make up for the shared one?** Section 7 replaces the shared expert by one more routed
#    expert, at equal computation. Replace it by 0, 1, 2 and 3 more routed experts and plot the held-out loss against
#    the activated feed-forward width. Where does the curve cross the intact model's loss, if it does?
#
#    <details><summary>Hint</summary>`loss_with(model, shared_off=True, extra_routed=k)` from section 7 does each
#    point; the activated width is (1 + 7 + k) expert widths with the shared expert, (7 + k) without it.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    extra = (0, 1, 2, 3)
#    for s in EXP["seeds"]:
#        model = runs[("DeepSeekMoE", s)]["model"]
#        losses = [loss_with(model, shared_off=True, extra_routed=k) for k in extra]
#        plt.plot([7 + k for k in extra], losses, marker="o", label=f"shared off, seed {s}")
#        plt.axhline(loss_with(model), ls=":", color="gray")
#    plt.xlabel("activated routed experts per token"); plt.ylabel("held-out loss"); plt.legend(); plt.show()
#    ```
#    Each added routed expert costs what the shared one cost, so the point at $k = 1$ is the paper's test and the
#    points after it spend more computation than the intact model. If the curve reaches the dotted line only at
#    $k \ge 2$, the shared expert is worth more than a routed one of the same size: it holds what every token needs,
#    which no single routed expert, chosen per token, holds as well. If it reaches it at $k = 1$, this small world's
#    routed experts can absorb that common part.
#    </details>
#
# 6. ★ **The router's gradient through the dispatch.** Section 2's check compares the gradients of the two dispatches
#    for the expert weights only. Extend it to the gradients of the input and of the router's centroids, which the
#    grouped path computes with `g_x` and `g_weight`.
#
#    <details><summary>Hint</summary>Let the router run inside the graph (no `torch.no_grad`), so that the gating
#    weights carry a gradient back to `router.weight`. Skip the grouped path where `F.grouped_mm` is missing.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    torch.manual_seed(0)
#    probe_cfg = MoEConfig(d_model=24, moe_intermediate_size=12, n_routed_experts=10, num_experts_per_tok=3,
#                          init_std=0.3)
#    probe_router, probe_experts = Router(probe_cfg), Experts(probe_cfg)
#    probe_x = torch.randn(80, 24, requires_grad=True)
#    probe = {}
#    for mode in ("loop", "grouped"):
#        probe_experts.dispatch = mode
#        probe_x.grad = probe_router.weight.grad = None
#        r6 = probe_router(probe_x)
#        (probe_experts(probe_x, r6.indices, r6.weights) * torch.linspace(-1, 1, 24)).sum().backward()
#        probe[mode] = (probe_x.grad.clone(), probe_router.weight.grad.clone())
#    print([(a - b).abs().max().item() for a, b in zip(probe["loop"], probe["grouped"])])
#    ```
#    Both differences should be at float32 rounding, below the $10^{-5}$ of the chapter's other checks. This is the
#    check that matters for training: a wrong `g_weight` would leave outputs and expert gradients exact while teaching
#    the router the wrong choices, a bug that would show only as a worse model.
#    </details>
#
# 7. ★★★ **Load a checkpoint.** Write `from_hf(moe, state_dict)` that copies transformers' `DeepseekV3MoE` weights
#    into an `MoE`: the fused `gate_up_proj` of recent releases, and the per-expert `experts.{i}.gate_proj.weight`
#    tensors of older ones and of DeepSeek's own checkpoints.
#
#    <details><summary>Hint</summary>Section 2's comparison with transformers builds the fused tensor as
#    `torch.cat([gate_proj, up_proj], dim=1)`: undo that with a slice at `moe_intermediate_size`. Per-expert weights
#    are `nn.Linear` weights, (I, d) for gate and up and (d, I) for down, so `torch.stack` over the experts gives our
#    shapes. The shared experts' names already match.</details>
#    <details><summary>Solution</summary>
#
#    ```python
#    def from_hf(moe: MoE, state: dict[str, torch.Tensor]) -> MoE:
#        """Copy a DeepseekV3MoE state dict, with fused or per-expert experts, into moe."""
#        i, n = moe.config.moe_intermediate_size, moe.config.n_routed_experts
#        if "experts.gate_up_proj" in state:  # (E, 2I, d), gate first
#            gate, up = state["experts.gate_up_proj"][:, :i], state["experts.gate_up_proj"][:, i:]
#            down = state["experts.down_proj"]
#        else:
#            gate, up, down = (torch.stack([state[f"experts.{e}.{name}.weight"] for e in range(n)])
#                              for name in ("gate_proj", "up_proj", "down_proj"))
#        moe.load_state_dict({"gate.weight": state["gate.weight"],
#                             "gate.e_score_correction_bias": state["gate.e_score_correction_bias"],
#                             "experts.gate_proj": gate, "experts.up_proj": up, "experts.down_proj": down,
#                             **{k: v for k, v in state.items() if k.startswith("shared_experts.")}}, strict=True)
#        return moe
#
#    if hf_errors:  # transformers is installed: `hf` and `ours` exist
#        probe_in = torch.randn(3, 7, 32)
#        with torch.no_grad():
#            print((from_hf(MoE(v3_like), hf.state_dict())(probe_in) - hf(probe_in)).abs().max().item())
#    ```
#    `strict=True` makes a missing or misnamed tensor an error instead of a silently random expert. For the
#    per-expert layout, build a test dictionary from `ours` (`experts.{e}.gate_proj.weight` set to
#    `ours.experts.gate_proj[e]`, and so on) and check that `from_hf` gives back `ours`' output.
#    </details>
#
# ## Checks
#
# The chapter's key measurements, asserted (this is what the test suite checks), and the closing summary.

# %%
assert max(router_errors.values()) < 1e-6 and max(dispatch_errors.values()) < 1e-5
assert not hf_errors or max(hf_errors.values()) < 1e-5
assert abs(hand["expert"] - 1.0375) < 1e-6 and abs(hand["sequence"] - 1.075) < 1e-6 and model_cache_error < 1e-5
assert len(config_errors) == 6 and weights_are_unbiased
# Every model learned: from about 4.6 nats to well below it.
for (arm, s), run in runs.items():
    assert run["history"]["eval_loss"][0] > 4 and run["history"]["eval_loss"][-1] < 1.3, (arm, s)
# Without balancing the load collapses; both remedies cut the imbalance by at least a third, on every seed.
for a in ("DeepSeekMoE", "DeepSeekMoE, loss-free bias"):
    assert (maxvio_late[a] < 0.67 * maxvio_late["DeepSeekMoE, no balancing"]).all(), (a, maxvio_late)
# The shared expert matters at equal compute (off, one more routed expert: the paper's test), and routing depends on
# the kind of token.
assert (shared_swapped > shared_on + 0.01).all(), (shared_on, shared_swapped)
assert min(kind_mi) > 3 * max(kind_mi_shuffled), (kind_mi, kind_mi_shuffled)
assert replay_bias_end < 0.5 * replay_start
print(f"Summary: DeepSeekMoE vs GShard final loss {final['DeepSeekMoE'].mean():.3f} vs "
      f"{final['GShard top-2'].mean():.3f} (dense {final['dense'].mean():.3f}); shared expert off "
      f"{shared_on.mean():.3f} -> {shared_off.mean():.3f}; MaxVio none / loss / bias "
      f"{maxvio_late['DeepSeekMoE, no balancing'].mean():.2f} / {maxvio_late['DeepSeekMoE'].mean():.2f} / "
      f"{maxvio_late['DeepSeekMoE, loss-free bias'].mean():.2f}; final loss loss / bias "
      f"{final['DeepSeekMoE'].mean():.3f} / {final['DeepSeekMoE, loss-free bias'].mean():.3f}; MoE layer "
      f"{moe_over_dense['forward']:.2f}x / {moe_over_dense['forward+backward']:.2f}x the dense layer's time (forward / "
      f"with backward; benchmarks/moe_dispatch.py for the comparison with transformers)")
print(f"chapter 02 checks passed; {time.time() - CHAPTER_START:.0f} s since set-up")

# %% [markdown]
# The worked solutions that take seconds run here as well, so that the test suite checks them with the chapter:
# exercises 5, 6 (where PyTorch has `F.grouped_mm`) and 7. The others train models, and are left to
# the reader.

# %%
solution_seconds = run_solutions("02", globals(), (5, 6, 7) if hasattr(F, "grouped_mm") else (5, 7))
print("worked solutions run:", ", ".join(f"exercise {n} ({t:.1f} s)" for n, t in solution_seconds.items()))
