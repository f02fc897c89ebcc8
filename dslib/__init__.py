"""dslib: the package that the chapters of *DeepSeek from Scratch* write.

Most modules are generated from the chapters (`python -m dslib.book export`); each says which chapter owns it.
This file is hand-written plumbing: seeding, device and thread set-up, the allocator, and the scale switch
(DESIGN.md, "Scale").
"""

from __future__ import annotations

import os
import random
from typing import Any, TypeVar

__version__ = "0.1.0"
__all__ = ["setup", "scale", "sized", "keep_freed_memory", "freed_memory_kept", "SCALES"]

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


# glibc's mallopt parameters (malloc.h): M_TRIM_THRESHOLD and M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP = {"mmap_threshold": 32 << 20, "trim_threshold": 1 << 30}
_kept = False


def keep_freed_memory() -> bool:
    """Let the process reuse the CPU memory that PyTorch frees, instead of handing it back to the system at once.

    By default glibc serves each large block (an activation of a few MB) with a fresh mapping and unmaps it when the
    tensor is freed, so the next step's tensors fault their pages in again; on a virtual machine that costs as much as
    the arithmetic (the MoE layer's training step spent a fifth of its time there: benchmarks/moe_dispatch.py). This
    asks glibc (mallopt) to serve blocks of up to 32 MB from the heap and to keep up to 1 GB of freed heap for reuse,
    what jemalloc and tcmalloc, which PyTorch's CPU tuning guide recommends, do on their own. The cost: up to that much
    freed memory stays with the process. A no-op returning False where the C library is not glibc (macOS, Windows,
    musl); True once applied."""
    global _kept
    if _kept:
        return True
    import ctypes
    import ctypes.util
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        _kept = bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP["mmap_threshold"])) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, _KEEP["trim_threshold"]))
    except (OSError, AttributeError):
        return False
    return _kept


def freed_memory_kept() -> bool:
    """Whether keep_freed_memory has been applied in this process (it stays for the process's life)."""
    return _kept


def setup(seed: int = 0, threads: int | None = None, device: str | None = None, quiet: bool = False,
          keep_memory: bool = True) -> Any:
    """Seed Python, NumPy and PyTorch, set the number of CPU threads, and choose the device.

    threads: CPU threads for PyTorch (default: all cores, at most 8).
    keep_memory: let freed CPU memory be reused (keep_freed_memory: glibc only; faster steps, a larger footprint;
        once applied, it stays for the process).
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
    if keep_memory:
        keep_freed_memory()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available")
    dev = torch.device(device)
    if not quiet:
        print(f"dslib {__version__}: seed {seed}, device {dev}, {threads} CPU threads, scale {scale()!r}, "
              f"torch {torch.__version__}")
    return dev
