"""dslib: the package that the chapters of *DeepSeek from Scratch* write.

Most modules are generated from the chapters (`python -m dslib.book export`); each says which chapter owns it.
This file is hand-written plumbing: seeding, device and thread set-up, and the scale switch (DESIGN.md, "Scale").
"""

from __future__ import annotations

import os
import random
from typing import Any, TypeVar

__version__ = "0.1.0"
__all__ = ["setup", "scale", "sized", "SCALES"]

SCALES = ("small", "full")
T = TypeVar("T")


def scale() -> str:
    """The scale that experiments run at: "small" (CI, a laptop CPU) or "full" (one GPU).

    `DSLIB_SCALE` decides when it is set; otherwise "full" where CUDA is available and "small" elsewhere.
    """
    value = os.environ.get("DSLIB_SCALE", "").strip().lower()
    if value:
        if value not in SCALES:
            raise ValueError(f"DSLIB_SCALE={value!r} is not a scale; use one of {SCALES}")
        return value
    import torch

    return "full" if torch.cuda.is_available() else "small"


def sized(small: T, full: T) -> T:
    """Pick the value for the current scale: `sized(small=200, full=5000)`."""
    return small if scale() == "small" else full


def setup(seed: int = 0, threads: int | None = None, device: str | None = None, quiet: bool = False) -> Any:
    """Seed Python, NumPy and PyTorch, set the number of CPU threads, and choose the device.

    threads: CPU threads for PyTorch (default: all cores, at most 8).
    device: "cpu", "cuda", "mps" or None for the best available (CUDA, then CPU; MPS only when asked, since its
        numerics differ from the CPU's).
    Returns the `torch.device` that experiments should use.
    """
    import numpy as np
    import torch

    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if threads is None:
        threads = min(os.cpu_count() or 1, 8)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available")
    dev = torch.device(device)
    if not quiet:
        print(f"dslib {__version__}: seed {seed}, device {dev}, {threads} CPU threads, scale {scale()!r}, "
              f"torch {torch.__version__}")
    return dev
