"""dslib.setup: seeds, threads, the device, bad input, and the allocator setting (keep_freed_memory), each
allocator case in a fresh process, since the setting stays for a process's life."""

from __future__ import annotations

import os
import platform
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import dslib

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def test_setup_seeds_every_generator_and_sets_the_threads():
    threads = torch.get_num_threads()
    try:
        draws = []
        for _ in range(2):
            device = dslib.setup(seed=3, threads=1, quiet=True)
            draws.append((random.random(), float(np.random.rand()), float(torch.rand(()))))
            assert torch.get_num_threads() == 1
        assert draws[0] == draws[1] and device.type in ("cpu", "cuda")
        dslib.setup(seed=4, threads=1, quiet=True)
        assert random.random() != draws[0][0]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("kwargs, message", [({"seed": -1}, "seed must be a non-negative int"),
                                             ({"seed": 1.5}, "seed must be a non-negative int"),
                                             ({"threads": 0}, "threads must be >= 1")])
def test_setup_names_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        dslib.setup(quiet=True, **kwargs)


_FAULTS = textwrap.dedent("""
    import ctypes, json, resource, sys
    import dslib
    dslib.setup(quiet=True, keep_memory=sys.argv[1] == "keep")
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    n = 8 << 20
    def step():  # three blocks of 8 MB, written, then freed: one training step's activations, in miniature
        blocks = [libc.malloc(n) for _ in range(3)]
        for b in blocks:
            libc.memset(b, 1, n)
        for b in blocks:
            libc.free(b)
    step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    print(json.dumps({"kept": dslib.freed_memory_kept(), "faults": faults}))
""")


def _faults(mode: str) -> dict:
    import json

    out = subprocess.run([sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="keep_freed_memory tunes glibc's allocator; elsewhere it is a no-op")
def test_kept_memory_is_reused_without_faulting_its_pages_in_again():
    """The system's default hands 8 MB blocks back when they are freed, so each step faults about 6,000 pages in
    again (24 MB); with keep_freed_memory (setup's default) the freed blocks are reused and the steps fault almost
    none."""
    system, kept = _faults("system"), _faults("keep")
    assert not system["kept"] and kept["kept"]
    pages = 3 * (8 << 20) // os.sysconf("SC_PAGE_SIZE")
    assert system["faults"] > pages / 2, system
    assert kept["faults"] < pages / 20, kept


def test_keep_freed_memory_is_idempotent_and_reports_where_it_does_nothing():
    applied = dslib.keep_freed_memory()
    assert applied == GLIBC and dslib.freed_memory_kept() == applied
    assert dslib.keep_freed_memory() == applied
