"""How many torch intra-op threads the gradient work uses, and setting them for a while without leaking the change.

A gradient sketch on the CPU is many small forward and backward passes. With torch's default intra-op threads (one
per core) every one of their operators is an OpenMP parallel region, and on a machine whose cores are also busy with
other work each region waits until all of its threads got a core: measured on a 2-core machine with other jobs
running, index building fell from 14-24 samples/s with one thread to 0.7-1.4 samples/s with two
(`benchmarks/bench_threads.py`, `benchmarks/results/bench_threads.json`). On an idle machine the second thread
gained little for these model sizes. So on the CPU the gradient work runs on **one intra-op thread** by default;
accelerators (CUDA, MPS, ...) keep torch's setting, which only affects their host-side work.

The choice, first match wins:

1. an explicit `num_threads` (`GradientSketcher(num_threads=...)`, `GradientIndex.build(...,
   sketcher_kwargs={"num_threads": ...})`, `dmin build/search --threads N`);
2. the environment variable `DMIN_NUM_THREADS` (a positive integer, or `0` / `torch` for torch's own setting);
3. the default: 1 on the CPU, torch's setting elsewhere.

The threads are set only while the gradients are computed and the caller's `torch.get_num_threads()` comes back
afterwards (also after an error): a library must not change process-wide state for good. `torch.set_num_threads` is
process-wide, so other Python threads running torch at the same moment see the same setting.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import torch

from .errors import ConfigError


__all__ = ["NUM_THREADS_ENV", "resolve_num_threads", "torch_threads"]

NUM_THREADS_ENV = "DMIN_NUM_THREADS"
_TORCH_DEFAULT = ("0", "torch", "default")


def _check(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(
            f"`{name}` must be a positive integer (threads), 0 (keep torch's setting) or None (the default policy), "
            f"but is {value!r}."
        )
    return value or None


def resolve_num_threads(num_threads: int | None, device: torch.device | str | None) -> int | None:
    r"""
    The intra-op thread count for gradient work on `device`, or `None` to keep torch's current setting.

    Args:
        num_threads (`int`, *optional*): An explicit choice; `0` keeps torch's setting. `None` reads
            `DMIN_NUM_THREADS`, then applies the default (1 thread on the CPU, torch's setting on accelerators).
        device (`torch.device` or `str`, *optional*): Where the model runs.
    """
    explicit = _check(num_threads, "num_threads")
    if explicit is not None or num_threads == 0:
        return explicit
    value = os.environ.get(NUM_THREADS_ENV, "").strip().lower()
    if value:
        if value in _TORCH_DEFAULT:
            return None
        try:
            return _check(int(value), NUM_THREADS_ENV)
        except ValueError:
            raise ConfigError(
                f"{NUM_THREADS_ENV}={value!r} is not a number of threads; set a positive integer, or 0 to keep "
                "torch's setting."
            ) from None
    if device is None or torch.device(device).type == "cpu":
        return 1
    return None


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with `torch.set_num_threads(num_threads)` (nothing when `None` or already so), then restore."""
    previous = torch.get_num_threads()
    if num_threads is None or num_threads == previous:
        yield
        return
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
