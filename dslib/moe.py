# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/02_moe.py (chapter 02).
# Edit the chapter, then run the export again.

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


DISPATCH = ("auto", "loop", "grouped")


def _per_expert(a: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a (M, K) in blocks by expert (offs: the blocks' cumulative ends), w (E, N, K) -> (M, N): block e times w[e]^T."""
    return F.grouped_mm(a, w.transpose(1, 2), offs=offs)


def _weight_grads(g: torch.Tensor, a: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """g (M, N), a (M, K) in the same blocks -> (E, N, K): block e of g transposed times block e of a."""
    return F.grouped_mm(g.t(), a, offs=offs)


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
