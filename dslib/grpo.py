# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/05_grpo.py (chapter 05).
# Edit the chapter, then run the export again.

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


def k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi_theta || pi_ref) per sampled token (DeepSeekMath, eq. 4):
    pi_ref/pi_theta - log(pi_ref/pi_theta) - 1. Unbiased for tokens drawn from pi_theta, and never negative
    (x - log x - 1 >= 0)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1


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
