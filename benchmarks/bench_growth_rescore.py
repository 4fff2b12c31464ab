"""Where FAISS's re-scored latency goes at 10^6 rows: exact re-scoring of 100 candidates per query, on its own.

Needs an index folder kept by `bench_growth.py --keep --root ROOT` (ROOT/n1000000). Candidates are each fresh query's
true top-10 plus 90 random rows (random positions in the memory-mapped shards, as IVF candidates are); the same
candidates are then re-scored again with their pages cached. Writes `benchmarks/results/bench_growth_rescore.json`.

Run `nice -n 10 python benchmarks/bench_growth_rescore.py ROOT/n1000000`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_results  # noqa: E402
from diffusers_dmin.search import ExactSearch, rescore  # noqa: E402
from diffusers_dmin.storage import iter_shards, read_manifest  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    folder = Path((argv if argv is not None else sys.argv[1:])[0])
    manifest = read_manifest(folder)
    rows = ExactSearch([s.sketches for s in iter_shards(folder, manifest)], manifest.dtype)
    queries = torch.from_numpy(np.load(folder / "bench_eval_queries.npy"))
    truth = np.load(folder / "bench_eval_truth.npy")
    rng = np.random.default_rng(0)
    candidates = [np.concatenate([truth[i], rng.integers(0, rows.num_rows, 90)]) for i in range(len(queries))]

    def latency() -> dict[str, float]:
        times = []
        for i in range(len(queries)):
            start = time.perf_counter()
            rescore(rows, queries[i : i + 1], candidates[i][None], 10)
            times.append((time.perf_counter() - start) * 1e3)
        return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}

    result = {"num_rows": rows.num_rows, "first_pass": latency()}
    result["again_cached"] = latency()
    print(result)
    write_results(
        "bench_growth_rescore", {"command": "python benchmarks/bench_growth_rescore.py ROOT/n1000000", **result}
    )
    return result


if __name__ == "__main__":
    main()
