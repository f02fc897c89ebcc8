"""Checkpoint files: hand-written plumbing (no chapter teaches it).

A checkpoint is a folder:
- `model.safetensors`: the weights, with the step in its metadata;
- `config.json`: the model's config (enough to rebuild the model with no code from the checkpoint);
- `trainer.safetensors`: optimizer tensors and RNG states, with a JSON of everything else (optimizer scalars, the
  step, the training config, the loss history) in its metadata.

Every file is written to a temporary name and renamed into place, so a crash never leaves a half-written file under
the real name. Loading reads tensors and JSON only: it never unpickles, so a checkpoint cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import tempfile
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

__all__ = ["CheckpointError", "StepCheckpoints", "save_checkpoint", "load_checkpoint", "read_config", "read_trainer_state", "rng_state", "set_rng_state",
           "atomic_write_text", "interrupts_deferred"]

MODEL_FILE, CONFIG_FILE, TRAINER_FILE = "model.safetensors", "config.json", "trainer.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, corrupt or does not fit the model it is loaded into."""


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to path through a temporary file and a rename."""
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    _atomic(Path(path), write)


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and PyTorch's (CPU and CUDA) generators, as tensors and JSON."""
    state = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"torch_cuda_{i}"] = s
    np_state = np.random.get_state()
    py_state = random.getstate()
    meta = {"numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
            "python": [py_state[0], list(py_state[1]), py_state[2]]}
    state["numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    return {"tensors": state, "meta": meta}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
        if states:
            torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, pid, k = name.split(".", 2)
            state.setdefault(int(pid), {})[k] = t
    for name, v in meta["scalars"].items():
        pid, k = name.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(directory: str | Path, model: torch.nn.Module, model_config: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None, trainer_state: dict[str, Any] | None = None,
                    step: int = 0) -> Path:
    """Save weights, config and (optionally) the optimizer, RNG states and trainer state (JSON-able) to a folder."""
    d = Path(directory)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    _atomic(d / MODEL_FILE, lambda tmp: save_file(weights, tmp, metadata={"step": str(step)}))
    atomic_write_text(d / CONFIG_FILE, json.dumps(model_config, indent=2) + "\n")
    if optimizer is not None:
        tensors, opt_meta = _flatten_optimizer(optimizer)
        rng = rng_state()
        tensors.update({f"rng.{k}": v for k, v in rng["tensors"].items()})
        meta = {"step": step, "optimizer": opt_meta, "rng": rng["meta"], "trainer": trainer_state or {}}
        _atomic(d / TRAINER_FILE, lambda tmp: save_file(tensors, tmp, metadata={"json": json.dumps(meta)}))
    return d


def _load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.exists():
        raise CheckpointError(f"{path}: file is missing (is this a checkpoint folder written by dslib?)")
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    return tensors, meta


def read_config(directory: str | Path) -> dict[str, Any]:
    """The model config saved beside the weights."""
    path = Path(directory) / CONFIG_FILE
    if not path.exists():
        raise CheckpointError(f"{path}: file is missing (is this a checkpoint folder written by dslib?)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt JSON ({e})") from None


def read_trainer_state(directory: str | Path) -> dict[str, Any]:
    """The trainer state saved in a checkpoint (step, config, history, ...), without loading anything into a model."""
    path = Path(directory) / TRAINER_FILE
    _, meta = _load_safetensors(path)
    return {"step": _trainer_meta(path, meta)["step"], **_trainer_meta(path, meta)["trainer"]}


def _trainer_meta(path: Path, meta: dict[str, str]) -> dict[str, Any]:
    try:
        out = json.loads(meta["json"])
        int(out["step"]), out["optimizer"], out["rng"], out["trainer"]
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: trainer state metadata is missing or corrupt ({e!r})") from None
    return out


def load_checkpoint(directory: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True) -> dict[str, Any]:
    """Load weights into `model` (and the optimizer and RNG states when an optimizer is given). Returns the trainer
    state saved with it (with "step"). Every file is read and checked before anything is loaded, so a CheckpointError
    (naming the file: missing, corrupt, of another shape, or a torn pair from an interrupted save) leaves the model and
    optimizer as they were."""
    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d}: no checkpoint folder here")
    weights, wmeta = _load_safetensors(d / MODEL_FILE)
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"{d / MODEL_FILE}: does not fit this model (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
    for k, v in weights.items():
        if v.shape != own[k].shape:
            raise CheckpointError(f"{d / MODEL_FILE}: {k} has shape {tuple(v.shape)}, the model expects "
                                  f"{tuple(own[k].shape)}")
    step = int(wmeta.get("step", 0))
    if optimizer is None:
        model.load_state_dict(weights)
        return {"step": step}
    tensors, tmeta = _load_safetensors(d / TRAINER_FILE)
    meta = _trainer_meta(d / TRAINER_FILE, tmeta)
    if meta["step"] != step:
        raise CheckpointError(f"{d / TRAINER_FILE}: holds the trainer state of step {meta['step']}, but "
                              f"{MODEL_FILE} holds the weights of step {step} (a save was interrupted between the two "
                              f"files)")
    model.load_state_dict(weights)
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    if restore_rng:
        set_rng_state({k[4:]: v for k, v in tensors.items() if k.startswith("rng.")}, meta["rng"])
    return {"step": step, **meta["trainer"]}


@contextlib.contextmanager
def interrupts_deferred():
    """Hold Ctrl-C (SIGINT) back until the block ends, then raise KeyboardInterrupt: a trainer wraps the part of a step
    that changes its state (the optimizer step, the step counter, the log), so a checkpoint saved on Ctrl-C never holds
    weights of one step with the counter of another. Outside the main thread (where signals cannot be handled) the
    block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


class StepCheckpoints:
    """Numbered checkpoints for a trainer: `checkpoint_dir/step-NNNNNN/`, each a full `save_checkpoint` folder written
    under a temporary name and renamed, so a crash never leaves a torn one; older steps are kept (an explorer can read
    them). A mixin: the trainer has `model`, `optimizer`, `config` (a dataclass), `step`, `history`, `evals` and
    `checkpoint_dir` (a Path or None). `run_steps` is the plumbing of a trainer's `fit` (progress bar, checkpoints,
    evaluations after them, Ctrl-C); the trainer supplies `train_step()`. Used by dslib.grpo.GRPOTrainer."""

    def checkpoint_and_evaluate(self, on_checkpoint: Callable | None) -> None:
        """Save (when there is a folder), then evaluate: a crash in the evaluation loses no training."""
        path = self.save() if self.checkpoint_dir is not None else None
        if on_checkpoint is not None and not any(e["step"] == self.step for e in self.evals):
            out = on_checkpoint(self, path)
            if out is not None:
                self.evals.append({"step": self.step, **out})

    def run_steps(self, until: int, postfix: Callable[[dict], dict], desc: str, progress: bool = True,
                  on_checkpoint: Callable | None = None) -> dict[str, list]:
        """Call self.train_step() until self.step reaches `until`, with a progress bar (postfix(record) gives its
        live figures). on_checkpoint(trainer, folder) runs at step 0, every checkpoint_every steps and at the end,
        right after the checkpoint is written (folder is None without a checkpoint_dir); a dict it returns joins
        `evals` (and the next checkpoint). On Ctrl-C the state is saved before the interrupt goes on. Returns the
        history."""
        bar = tqdm(total=until, initial=self.step, desc=desc, disable=not progress, leave=True)
        try:
            if self.step == 0 or (on_checkpoint is not None and not any(e["step"] == self.step for e in self.evals)):
                self.checkpoint_and_evaluate(on_checkpoint)
            while self.step < until:
                with interrupts_deferred():  # Ctrl-C ends the step first, so the saved state is one step's
                    rec = self.train_step()
                bar.update(1)
                bar.set_postfix(**postfix(rec))
                if self.step % self.checkpoint_every == 0 or self.step == until:
                    self.checkpoint_and_evaluate(on_checkpoint)
        except KeyboardInterrupt:
            if self.checkpoint_dir is not None:
                self.save()
                print(f"interrupted at step {self.step}: saved to {self.checkpoint_dir}; resume() then fit() again")
            raise
        finally:
            bar.close()
        return self.history

    def checkpoints(self) -> list[tuple[int, Path]]:
        """The complete checkpoints in checkpoint_dir, as (step, folder), oldest first."""
        if self.checkpoint_dir is None or not self.checkpoint_dir.is_dir():
            return []
        found = [(int(d.name[5:]), d) for d in self.checkpoint_dir.glob("step-*")
                 if d.is_dir() and d.name[5:].isdigit() and (d / TRAINER_FILE).exists()]
        return sorted(found)

    def save(self) -> Path:
        """Write the checkpoint of the current step (model, optimizer, RNG states, step, config, history, evals)."""
        if self.checkpoint_dir is None:
            raise ValueError(f"this {type(self).__name__} has no checkpoint_dir")
        final = self.checkpoint_dir / f"step-{self.step:06d}"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=self.checkpoint_dir))
        try:
            state = {"history": self.history, "evals": self.evals, "config": asdict(self.config)}
            cfg = self.model.config.to_dict() if hasattr(self.model, "config") else {}
            save_checkpoint(tmp, self.model, cfg, self.optimizer, state, step=self.step)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return final

    def resume(self, path: str | Path | None = None) -> bool:
        """Continue from a checkpoint folder (default: the latest in checkpoint_dir). Returns whether one was loaded.
        A checkpoint saved with another config is refused (CheckpointError), before anything is loaded."""
        if path is None:
            found = self.checkpoints()
            if not found:
                return False
            path = found[-1][1]
        saved = read_trainer_state(path)
        if saved.get("config") != json.loads(json.dumps(asdict(self.config))):
            raise CheckpointError(f"{path}: saved with another {type(self.config).__name__} ({saved.get('config')}); "
                                  f"resume with the same config or use a new checkpoint_dir")
        state = load_checkpoint(path, self.model, self.optimizer)
        self.step, self.history, self.evals = state["step"], state["history"], state["evals"]
        self.model.eval()
        return True
