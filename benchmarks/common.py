"""Shared helpers for the benchmark scripts: machine info, timing, peak memory in a subprocess, JSON output."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


RESULTS_DIR = Path(__file__).resolve().parent / "results"


def machine_info() -> dict[str, Any]:
    import torch

    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_average_at_start": load,
    }


def timeit(fn: Callable[[], Any], repeat: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median, min and max wall time of `fn()` over `repeat` runs after `warmup` runs, in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeat": repeat}


def peak_extra_memory(code_setup: str, code_run: str, timeout: float = 1800) -> dict[str, float]:
    """Peak resident memory added by `code_run` after `code_setup`, measured in a fresh Python process (MiB).

    Both snippets run in the same subprocess; the high-water mark is reset after the setup, so the result is the
    extra memory the measured code needed on top of its inputs (Linux only: reads /proc/self/status).
    """
    script = (
        "import json, re\n"
        "def _status(key):\n"
        "    return int(re.search(key + r':\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024\n"
        + code_setup
        # reset the high-water mark to the current RSS (Linux >= 4.0), so import-time peaks do not hide the run's
        + "\nopen('/proc/self/clear_refs', 'w').write('5')\nbase = _status('VmRSS')\n"
        + code_run
        + "\npeak = _status('VmHWM')\n"
        + "print(json.dumps({'baseline_mib': base, 'peak_mib': peak, 'extra_mib': peak - base}))\n"
    )
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run([sys.executable, f.name], capture_output=True, text=True, timeout=timeout)
    finally:
        os.unlink(f.name)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"exit {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write `benchmarks/results/<name>.json` atomically and return its path."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"machine": machine_info(), **data}, indent=2, default=float) + "\n")
    os.replace(tmp, path)
    return path
