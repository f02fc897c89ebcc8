"""Data-parallel training for the capstone: several processes (`torchrun --nproc_per_node N -m dslib capstone ...`),
each with a copy of the model and a slice of every batch, kept in step by averaging their gradients.

Hand-written, like dslib.capstone (no chapter owns it). It is DDP's arithmetic without the DDP wrapper: after
backward, one all-reduce of the flattened gradients (a parameter no token reached on one process, an idle expert,
counts as a zero gradient there), divided by the number of processes. The wrapper is not used because the chapters'
objectives reach past the model's forward: MTP's modules, MoE's balance losses and the routing bias, which the
auxiliary-loss-free update changes outside autograd. So:

- `ShardedBatches` gives each process its rows of the global batch of a step (the same batch one process would see);
- `token_share` weighs each process's token-mean loss by its share of the global batch's counted tokens, so that
  the mean over the processes is the global batch's token mean, and `global_mean_loss` makes the logged loss that
  mean while each process back-propagates its own part;
- `average_gradients` (Trainer's and GRPOTrainer's `after_backward`) makes every process take the same step;
- `gather_routing` gives each MoE layer the routing of the whole global batch, so that the balancing bias, updated
  from the expert loads, moves the same way on every process, as it would in one;
- `DataParallelGRPO` splits each GRPO step's prompts (whole groups) across the processes: each samples, scores and
  back-propagates its own groups, and the logged statistics are averaged.

With equal slices and the token weights, the mean of the processes' losses is the global batch's loss for every
objective the capstone trains (next-token and MTP token means; the sequence-wise balance loss and GRPO's "grpo" and
"dr_grpo" losses, means over rows), so two processes follow one process's loss curve up to float rounding;
tests/test_distributed.py checks it with the gloo backend on the CPU. (GRPO's "dapo" token mean would need the same
weighting; the capstone does not use it.)
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable

import torch
import torch.distributed as dist

from dslib.grpo import GRPOTrainer

__all__ = ["Group", "from_env", "ShardedBatches", "average_gradients", "broadcast_parameters", "global_mean_loss",
           "gather_routing", "mean_floats", "token_share", "DataParallelGRPO"]


@dataclass(frozen=True)
class Group:
    """This process's place among the data-parallel processes (torch.distributed's default group)."""

    rank: int
    world_size: int

    @property
    def main(self) -> bool:
        """Whether this process writes files and prints (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()


def from_env(device: torch.device) -> Group | None:
    """The group torchrun describes in the environment (WORLD_SIZE, RANK), joined with the gloo backend on the CPU and
    NCCL on CUDA; None for a single process. On CUDA each process takes the GPU of its LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1, but this PyTorch has no torch.distributed")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(hours=6))
    return Group(dist.get_rank(), dist.get_world_size())


class ShardedBatches:
    """This process's rows of data.batch(step): rows rank*b/n ... (rank+1)*b/n - 1 of every tensor, for a global
    batch of b rows split across n processes (b must divide by n)."""

    def __init__(self, data, group: Group):
        self.data, self.group = data, group
        rows = getattr(data, "batch_size", None)
        if rows is not None and rows % group.world_size:
            raise ValueError(f"a batch of {rows} rows does not split across {group.world_size} processes: choose a "
                             f"batch size that is a multiple of the number of processes")

    def batch(self, step: int) -> dict[str, torch.Tensor]:
        full = self.data.batch(step)
        rows = next(iter(full.values())).shape[0]
        if rows % self.group.world_size:
            raise ValueError(f"step {step}: a batch of {rows} rows does not split across {self.group.world_size} "
                             f"processes")
        per = rows // self.group.world_size
        lo = self.group.rank * per
        return {k: v[lo:lo + per] for k, v in full.items()}


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def average_gradients(model: torch.nn.Module, group: Group) -> None:
    """Replace every gradient by its mean over the processes, in one all-reduce; a missing gradient (a parameter
    this process's tokens did not reach) counts as zero and is filled in."""
    params = _trainable(model)
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params])
    dist.all_reduce(flat)
    flat /= group.world_size
    at = 0
    for p in params:
        g = flat[at:at + p.numel()].view_as(p).to(p.dtype)
        at += p.numel()
        if p.grad is None:
            p.grad = g.clone()
        else:
            p.grad.copy_(g)


@torch.no_grad()
def broadcast_parameters(model: torch.nn.Module, group: Group) -> None:
    """Make every process's parameters and buffers (the routing bias among them) rank 0's."""
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


def global_mean_loss(loss_fn: Callable, group: Group) -> Callable:
    """loss_fn(model, batch), whose value becomes the mean over the processes (the global batch's loss: what the
    Trainer logs and checks for NaN on every process alike) while its gradient stays this process's own."""

    def fn(model, batch):
        loss = loss_fn(model, batch)
        total = loss.detach().clone().float()
        dist.all_reduce(total)
        return loss + (total / group.world_size - loss.detach()).to(loss.dtype)

    return fn


def token_share(mask: torch.Tensor, group: Group) -> torch.Tensor:
    """n_local * world_size / n_global for a loss mask: the weight that turns this process's token mean into its part
    of the global batch's token mean (the processes' slices hold different numbers of counted tokens, so the plain
    mean of their means would weigh tokens unequally)."""
    local = mask.sum().to(torch.float64)
    total = local.clone()
    dist.all_reduce(total)
    return (local * group.world_size / total.clamp(min=1)).float()


@torch.no_grad()
def gather_routing(model: torch.nn.Module, group: Group) -> None:
    """Give each MoE layer the routing of the whole global batch (the processes' expert choices, concatenated in rank
    order), so that update_bias and the load statistics see what one process with the whole batch would see."""
    from dslib.moe import moe_layers

    for m in moe_layers(model):
        r = m.routing
        if r is None:
            continue
        parts = [torch.empty_like(r.indices) for _ in range(group.world_size)]
        dist.all_gather(parts, r.indices.contiguous())
        m.routing = type(r)(torch.cat(parts), r.weights, r.scores)


def mean_floats(values: dict[str, float], group: Group) -> dict[str, float]:
    """The mean over the processes of each value (a NaN on one process, such as the length of right answers where it
    had none, is left out of that value's mean)."""
    keys = sorted(values)
    x = torch.tensor([[float(values[k]), 1.0] for k in keys], dtype=torch.float64)
    bad = torch.isnan(x[:, 0])
    x[bad] = 0.0
    dist.all_reduce(x)
    return {k: (float(s / n) if n > 0 else math.nan) for k, (s, n) in zip(keys, x.tolist())}


class DataParallelGRPO(GRPOTrainer):
    """GRPOTrainer whose step's prompts are split across the processes: rank r takes prompts r, r + n, ... (whole
    groups, so advantages need nothing from other processes), samples them with its own seed, and the gradients
    are averaged before the step. The logged record is the mean of the processes' records. prompts_per_step
    must divide by the number of processes."""

    def __init__(self, *args, group: Group, **kwargs):
        super().__init__(*args, after_backward=lambda m: average_gradients(m, group), **kwargs)
        self.group = group
        if self.config.prompts_per_step % group.world_size:
            raise ValueError(f"prompts_per_step={self.config.prompts_per_step} does not split across "
                             f"{group.world_size} processes")
        broadcast_parameters(self.model, group)

    def problems(self, step: int):
        return super().problems(step)[self.group.rank::self.group.world_size]

    def rollout(self, problems, seed: int):
        return super().rollout(problems, seed * self.group.world_size + self.group.rank)

    def train_step(self) -> dict[str, float]:
        rec = super().train_step()
        numbers = {k: v for k, v in rec.items() if k not in ("step", "seconds")}
        rec = {**rec, **mean_floats(numbers, self.group)}
        for k, v in rec.items():
            self.history[k][-1] = v
        return rec
