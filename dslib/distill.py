# GENERATED FILE: do not edit. Written by `python -m dslib.book export` from chapters/08_distill.py (chapter 08).
# Edit the chapter, then run the export again.

"""Distillation (DeepSeek-R1, arXiv 2501.12948, sections 2.4 and 4.1): teacher data by rejection sampling, FLOP
counts of sampling and training, sequence-level distillation (SFT on the teacher's texts) and logit distillation (KL
to the teacher's next-token distribution at a temperature, Hinton et al. 2015), at the scale of the arithmetic world
(chapter 08)."""

from __future__ import annotations

import copy
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dslib.r1 import R1Config, Trainers, keep_sample, reasoning_language, sft
from dslib.r1zero import sample_k
from dslib.rewards import style_of
from dslib.train import lr_at, param_groups
from dslib.transformer import TransformerConfig
from dslib.world import LANGUAGES, PackedData, Problem, prompt


@dataclass
class TeacherData:
    """The distillation set: `texts` (prompt + completion, distinct) kept from `sampled` teacher completions of
    `problems` fresh problems; `kept_samples` completions passed the filter, from `kept_problems` problems; `styles`
    and `languages` count the kept completions by style (bare, steps, reflects) and reasoning language;
    `prompt_tokens` and `new_tokens` are the tokens the teacher read and wrote for every sample (the FLOP count)."""

    texts: list[str]
    sampled: int
    problems: int
    kept_samples: int
    kept_problems: int
    styles: dict[str, int] = field(default_factory=dict)
    languages: dict[str, int] = field(default_factory=dict)
    prompt_tokens: list[int] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)

    @property
    def acceptance(self) -> float:
        """The share of sampled completions that passed the filter."""
        return self.kept_samples / self.sampled if self.sampled else 0.0


def fresh_problems(world, n: int, seed: int = 0) -> list[Problem]:
    """n fresh training problems (never held-out ones), each stated in symbols or in words at random."""
    rng = random.Random(f"distill-{seed}")
    return [world.sample_problem(rng).in_language(rng.choice(LANGUAGES)) for _ in range(n)]


def teacher_data(teacher: torch.nn.Module, world, problems: Sequence[Problem], k: int, *, seed: int = 0,
                 max_new_tokens: int = 96) -> TeacherData:
    """Rejection sampling: k teacher samples of each problem, kept when right, readable and in the problem's language
    (dslib.r1.keep_sample); the kept texts are deduplicated."""
    s = sample_k(teacher, world, problems, k, max_new_tokens=max_new_tokens, seed=seed)
    seen, texts, styles, langs = set(), [], Counter(), Counter()
    kept_samples, kept_problems = 0, 0
    for p, row in zip(problems, s.texts):
        good = [t for t in row if keep_sample(t, p)]
        kept_samples += len(good)
        kept_problems += bool(good)
        for t in good:
            styles[style_of(t)] += 1
            langs[reasoning_language(t)] += 1
            text = prompt(p) + t
            if text not in seen:
                seen.add(text)
                texts.append(text)
    plen = [len(world.tokenizer.encode(prompt(p), bos=True)) for p in problems for _ in range(k)]
    return TeacherData(texts=texts, sampled=len(problems) * k, problems=len(problems), kept_samples=kept_samples,
                       kept_problems=kept_problems, styles=dict(styles), languages=dict(langs), prompt_tokens=plen,
                       new_tokens=s.lengths.flatten().tolist())


def linear_params(config: TransformerConfig) -> int:
    """Parameters in the matrix multiplications of one forward token: per layer q and o (d x d each), k and v
    (d x n_kv_head * head_dim each) and the SwiGLU MLP (3 x d x intermediate_size); plus the output head d x V."""
    d, hd = config.d_model, config.d_model // config.n_head
    per_layer = 2 * d * d + 2 * d * config.n_kv_head * hd + 3 * d * config.intermediate_size
    return config.n_layer * per_layer + d * config.vocab_size


def token_flops(config: TransformerConfig, context: int) -> float:
    """FLOPs of one token's forward pass attending to `context` positions: 2 P_lin + 4 L d context."""
    return 2.0 * linear_params(config) + 4.0 * config.n_layer * config.d_model * context


def sequence_flops(config: TransformerConfig, n: int) -> float:
    """FLOPs of a causal forward pass over n tokens: the sum of token_flops(c) for c = 1..n (closed form)."""
    return 2.0 * linear_params(config) * n + 4.0 * config.n_layer * config.d_model * n * (n + 1) / 2


def train_flops(config: TransformerConfig, n: int) -> float:
    """Forward and backward over n tokens: three forwards."""
    return 3.0 * sequence_flops(config, n)


def generation_flops(config: TransformerConfig, prompt_len: int, new_tokens: int) -> float:
    """Sampling new_tokens after a prompt with a KV cache: a prefill of the prompt (which yields the first new token)
    plus new_tokens - 1 single-token steps, the j-th attending to prompt_len + j positions."""
    if new_tokens <= 0:
        return 0.0
    steps = new_tokens - 1
    # sum_{j=1..steps} token_flops(prompt_len + j), in closed form
    decode = 2.0 * linear_params(config) * steps + 4.0 * config.n_layer * config.d_model * (
        steps * prompt_len + steps * (steps + 1) / 2)
    return sequence_flops(config, prompt_len) + decode


def packed_train_flops(config: TransformerConfig, data: PackedData, steps: int) -> float:
    """Training FLOPs of `steps` steps over PackedData batches: attention stays inside each document, so each
    document of n tokens costs train_flops(n)."""
    total = 0.0
    for step in range(steps):
        seg = data.batch(step)["segments"]
        for row in seg:
            counts = torch.bincount(row[row > 0])
            total += sum(train_flops(config, int(n)) for n in counts[1:] if n > 0)
    return total


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
            temperature: float = 2.0) -> torch.Tensor:
    """Logit distillation (Hinton et al. 2015): tau^2 KL(softmax(teacher / tau) || softmax(student / tau)), summed
    over the vocabulary and averaged over the positions where mask is true. logits (b, t, V), mask (b, t)."""
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} is invalid: a positive number is required")
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (b, t)
    m = mask.float()
    return temperature ** 2 * (kl * m).sum() / m.sum().clamp(min=1.0)


@dataclass(frozen=True)
class DistillConfig:
    """Distillation training: steps of `batch` packed rows of `seq_len` tokens, AdamW at `lr` with warm-up and cosine
    decay (chapter 00's schedule); `temperature` for logit distillation."""

    steps: int = 300
    batch: int = 16
    lr: float = 1e-3
    seq_len: int = 128
    temperature: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DistillConfig.{name}={v!r} is invalid: a positive int is required")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"DistillConfig.{name}={getattr(self, name)!r} is invalid: a positive number is "
                                 f"required")

    def r1_config(self) -> R1Config:
        return R1Config(sft_batch=self.batch, sft_lr=self.lr, seq_len=self.seq_len, seed=self.seed)


def distill_sft(student: torch.nn.Module, texts: Sequence[str], world, config: DistillConfig,
                checkpoint_dir=None, progress: bool = True, trainers: Trainers = Trainers()) -> torch.nn.Module:
    """Sequence-level distillation, as R1 did: SFT of (a copy of) the student on the teacher's texts; `trainers`
    builds the Trainer (chapter 07's dslib.r1.Trainers: this process by default, data-parallel in the capstone)."""
    return sft(copy.deepcopy(student), texts, world, config.r1_config(), config.steps, checkpoint_dir, progress,
               trainers)


def distill_logits(student: torch.nn.Module, teacher: torch.nn.Module, texts: Sequence[str], world,
                   config: DistillConfig, progress: bool = True) -> tuple[torch.nn.Module, list[float]]:
    """Logit distillation: train (a copy of) the student on the same packed batches as distill_sft, with kd_loss
    against the teacher's logits on the completion tokens. Returns the student and the loss of every step."""
    model = copy.deepcopy(student).train()
    teacher = teacher.eval()
    data = PackedData(list(texts), world.tokenizer, config.seq_len, config.batch, seed=config.seed)
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=config.lr, betas=(0.9, 0.95))
    warmup = min(10, config.steps - 1)
    losses = []
    for step in tqdm(range(config.steps), desc="logit distillation", disable=not progress):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, config.steps, config.lr, warmup, "cosine")
        b = data.batch(step, next(model.parameters()).device)
        kw = {"positions": b["positions"], "segments": b["segments"]}
        with torch.no_grad():
            t_logits = teacher(b["input_ids"], **kw)
        loss = kd_loss(model(b["input_ids"], **kw), t_logits, b["loss_mask"], config.temperature)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"logit distillation: the loss is {float(loss)} at step {step}; lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    return model.eval(), losses
