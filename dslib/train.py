# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/00_foundations.py (chapter 00).
# Edit the chapter, then run the export again.

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
