"""Exact search before and after ranking ties by row position (ranking keys): latency side by side, interleaved.

The version before is `src/diffusers_dmin/search.py` at commit fa205da (read with `git show`), the version after is
the working tree's. Rows: 65,536 x (4 x 256) float16 in two blocks, top-10, one thread; random rows (no ties: the
float top-k is kept) and all-identical rows (every query ties across the cut: every group falls back to ranking keys,
the worst case). Both versions must return the same positions and score bits on the random rows. Median of 9,
interleaved (the machine is shared). Results: `benchmarks/results/bench_ranking_keys.json`.

    nice -n 10 python benchmarks/bench_ranking_keys.py
"""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import diffusers_dmin.search as after


BEFORE = "fa205da"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_ranking_keys.json"


def _before_module():
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{BEFORE}:src/diffusers_dmin/search.py"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location("diffusers_dmin._search_before", f.name)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    os.unlink(f.name)
    return module


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import machine_info

    torch.set_num_threads(1)
    before = _before_module()
    info = machine_info()
    rng = np.random.default_rng(0)
    results = {}
    for kind in ("random", "identical"):
        rows = rng.standard_normal((65536, 4, 256)).astype(np.float16)
        if kind == "identical":
            rows[:] = rows[0]
        for num_queries in (1, 256):
            queries = rng.standard_normal((num_queries, 1024)).astype(np.float32)
            searches = {
                "before": before.ExactSearch([rows[:32768], rows[32768:]], "float16"),
                "after": after.ExactSearch([rows[:32768], rows[32768:]], "float16"),
            }
            outputs = {name: search.search(queries, 10) for name, search in searches.items()}
            times = {name: [] for name in searches}
            for _ in range(9):
                for name, search in searches.items():
                    start = time.perf_counter()
                    search.search(queries, 10)
                    times[name].append(time.perf_counter() - start)
            entry = {f"{name}_median_s": statistics.median(values) for name, values in times.items()}
            if kind == "random":
                entry["identical_results"] = bool(
                    np.array_equal(outputs["before"][0], outputs["after"][0])
                    and outputs["before"][1].tobytes() == outputs["after"][1].tobytes()
                )
            results[f"{kind} rows, {num_queries} queries"] = entry
            print(kind, num_queries, entry, flush=True)
    data = {
        "benchmark": "bench_ranking_keys",
        "command": "nice -n 10 python benchmarks/bench_ranking_keys.py",
        "before": BEFORE,
        "machine": info,
        "load_average_at_end": os.getloadavg(),
        "results": results,
    }
    RESULTS.write_text(json.dumps(data, indent=2) + "\n")
    print(f"Wrote {RESULTS}")


if __name__ == "__main__":
    main()
