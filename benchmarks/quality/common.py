"""Shared plumbing of the quality benchmarks: threads, result files, markdown tables, plots, timers."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine_info


RESULTS_DIR = Path(__file__).resolve().parents[1] / "results" / "quality"
CHECKPOINT_DIR = RESULTS_DIR / "checkpoints"


def set_threads(threads: int) -> None:
    """Pin torch (and the BLAS/OpenMP pools) to `threads` threads; 1 is fastest on a busy 2-core machine."""
    import torch

    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set in this process
        pass


CACHE_ENV = "DMIN_BENCHMARK_CACHE"


def user_cache_dir(name: str) -> Path:
    """A per-user cache folder for an experiment's reusable artefacts: `$DMIN_BENCHMARK_CACHE/<name>` if that variable is
    set, else `$XDG_CACHE_HOME/diffusers_dmin/benchmarks/<name>` (`~/.cache/...` without XDG_CACHE_HOME)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root).expanduser() / name
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "diffusers_dmin" / "benchmarks" / name


def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags every experiment takes: --quick, --threads, --seed, --out-tag."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced size (part of run_all --quick, < 20 min total)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=None, help="keep retrained digits models here (reused)")
    return parser


def mode_name(quick: bool) -> str:
    return "quick" if quick else "full"


def command_line() -> str:
    """The command that is running, as a user would type it."""
    argv = list(sys.argv)
    if argv and argv[0].endswith(".py"):
        module = Path(argv[0]).resolve().relative_to(Path(__file__).resolve().parents[2]).with_suffix("")
        argv[0] = "python -m " + ".".join(module.parts)
    return " ".join(argv)


def to_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def write_json(name: str, data: dict[str, Any]) -> Path:
    """Write `benchmarks/results/quality/<name>.json` atomically (with machine info) and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    payload = {"machine": machine_info(), **to_jsonable(data)}
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def write_markdown(name: str, text: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(text.rstrip() + "\n")
    return path


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        if not np.isfinite(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def mean_std(values: Sequence[float], digits: int = 3) -> str:
    """`mean ± std` (sample std over the values; `±0` for a single value)."""
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if values.size == 0:
        return "-"
    std = values.std(ddof=1) if values.size > 1 else 0.0
    return f"{values.mean():.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 3) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(fmt(cell, digits) for cell in row) + " |")
    return "\n".join(lines)


@contextmanager
def timer(store: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of the block to `store[key]` (seconds)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        store[key] = store.get(key, 0.0) + time.perf_counter() - start


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def save_plot(fig: Any, name: str) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def pyplot():
    """matplotlib with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
