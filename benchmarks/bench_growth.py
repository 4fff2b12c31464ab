"""Growth benchmark: exact, hnswlib and FAISS (IVF-PQ / IVF-SQ8, re-scored) search as the index grows to 10^6 rows.

Per N (10^4, 10^5, 10^6; `--quick`: 10^4, 10^5) the script writes a real index folder with the library's storage
API (float16 shards + manifest), then measures each backend in its own fresh process (so peak memory is that
backend's alone) and writes `benchmarks/results/bench_growth.json` (`bench_growth_quick.json`) and a PNG of each
measure against N.

Rows: T=10 timesteps x K=512 buckets, float16 (10,240 bytes per row; 10^6 rows = 10.2 GB of shards). The paper's
10 x 4,096 float16 would be 81,920 bytes per row (81.9 GB at 10^6): the JSON records both. Rows are clustered like
sketches of related training images: N/100 random centres, each row a centre plus Gaussian noise (`--spread`),
unit-norm per timestep. Queries are *fresh* rows from the same clusters (not in the index); the approximate
backends are calibrated (`ef`, `nprobe`, re-scored candidates) to recall@10 >= 0.95 on *other* queries (noisy copies
of index rows, `calibration.held_out_queries`) and their recall is then measured on the fresh queries.

Backends, all at the same coarse dimension for the approximate ones (rows folded to 64 buckets per timestep,
T x 64 = 640 dims; both then re-score candidates exactly at full K from the shards):

- exact: `GradientIndex.search(exact=True)` over the memory-mapped shards (1 query and a batch of 256).
- hnswlib: graph over the folded rows (M=16, ef_construction=100), candidates re-scored exactly.
- faiss-pq / faiss-sq8: `FaissIVFSearch` (nlist ~ sqrt(N), PQ with 80 bytes/row, or SQ8 with 640 bytes/row).

Memory: peak anonymous RSS (`RssAnon`, the process's own memory) is sampled every 5 ms; file-backed RSS (`RssFile`:
pages of memory-mapped shards, i.e. page cache that the kernel can drop) is reported separately. "Fits in 24 GiB"
uses the backend's own memory per row as measured here.

Run `nice -n 10 python benchmarks/bench_growth.py` (about an hour on 2 busy cores) or `--quick` (a few minutes).
Benchmark data go to `--root` (default: a temp folder) and are deleted afterwards unless `--keep`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, write_results  # noqa: E402


T, K = 10, 512
COARSE_K = 64  # T x 64 = 640 coarse dims for hnswlib and FAISS
PAPER_K = 4096
TOP_K = 10
TARGET = 0.95
NUM_EVAL = 256
NUM_CALIBRATION = 200
CAL_NOISE = 1.0  # a noisy copy as far from its row as a fresh row is from its cluster neighbours
HNSW_M, HNSW_EF_CONSTRUCTION = 16, 100
GIB = 2**30
BUDGET = 24 * GIB
CHUNK = 25_000


# ---------------------------------------------------------------------------------------------- memory sampling


def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


class PeakMemory:
    """Samples RssAnon and RssFile every 5 ms in a thread; peaks in bytes."""

    def __init__(self):
        self.peak_anon = self.peak_file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            s = _status()
            self.peak_anon = max(self.peak_anon, s["RssAnon"])
            self.peak_file = max(self.peak_file, s["RssFile"])
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        s = _status()
        self.peak_anon = max(self.peak_anon, s["RssAnon"])
        self.peak_file = max(self.peak_file, s["RssFile"])

    def as_dict(self) -> dict[str, float]:
        return {"peak_rss_anon_mib": self.peak_anon / 2**20, "peak_rss_file_mib": self.peak_file / 2**20}


# ---------------------------------------------------------------------------------------------- data


def _rows(centres: np.ndarray, n: int, seed: int, spread: float) -> np.ndarray:
    """(n, T, K) float32 rows around random centres, unit-norm per timestep."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, T, K), dtype=np.float32)
    x *= spread
    x += centres[rng.integers(0, len(centres), n)]
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    return x


def _centres(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((max(10, n // 100), T, K), dtype=np.float32)


def task_generate(folder: Path, n: int, spread: float) -> dict[str, Any]:
    from diffusers_dmin import DMinConfig
    from diffusers_dmin.storage import Manifest, write_manifest, write_shards

    folder.mkdir(parents=True, exist_ok=True)
    centres = _centres(n, seed=0)
    start_time = time.perf_counter()
    shards = []
    with PeakMemory() as memory:
        for number, start in enumerate(range(0, n, CHUNK)):
            rows = _rows(centres, min(CHUNK, n - start), seed=1 + number, spread=spread)
            shards += write_shards(
                folder, rows, np.arange(start, start + len(rows)), "float16", start_index=len(shards)
            )
        write_manifest(
            folder, Manifest(config=DMinConfig(num_timesteps=T, sketch_dim=K, dtype="float16"), shards=shards)
        )
    seconds = time.perf_counter() - start_time
    eval_queries = _rows(centres, NUM_EVAL, seed=10**6, spread=spread).reshape(NUM_EVAL, -1)
    np.save(folder / "bench_eval_queries.npy", eval_queries)
    return {
        "write_s": seconds,
        "shard_bytes": sum(s.num_bytes for s in shards),
        "num_shards": len(shards),
        **memory.as_dict(),
    }


def _open_rows(folder: Path):
    from diffusers_dmin.search import ExactSearch
    from diffusers_dmin.storage import iter_shards, read_manifest

    manifest = read_manifest(folder)
    return ExactSearch([shard.sketches for shard in iter_shards(folder, manifest)], manifest.dtype)


def _latencies(fn, queries: torch.Tensor) -> dict[str, float]:
    fn(queries[:1])  # warm-up
    times = []
    for q in queries:
        start = time.perf_counter()
        fn(q[None])
        times.append((time.perf_counter() - start) * 1e3)
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p99_ms": float(np.percentile(times, 99)),
        "mean_ms": float(np.mean(times)),
        "num_queries": len(times),
    }


def task_exact(folder: Path, n: int) -> dict[str, Any]:
    from diffusers_dmin.calibration import held_out_queries
    from diffusers_dmin.index import GradientIndex

    result: dict[str, Any] = {}
    eval_queries = torch.from_numpy(np.load(folder / "bench_eval_queries.npy"))
    with PeakMemory() as memory:
        start = time.perf_counter()
        index = GradientIndex.from_pretrained(folder)  # verifies every shard's sha256 and finiteness
        result["open_s"] = time.perf_counter() - start
        one = eval_queries[:1].reshape(1, T, K)
        times = []
        for _ in range(4):
            start = time.perf_counter()
            index.search(one, top_k=TOP_K)
            times.append(time.perf_counter() - start)
        result["one_query_first_s"] = times[0]
        result["one_query_warm_s"] = float(np.median(times[1:]))
        start = time.perf_counter()
        found = index.search(eval_queries.reshape(NUM_EVAL, T, K), top_k=TOP_K)
        result["batch_256_s"] = time.perf_counter() - start
        result["batch_256_per_query_ms"] = result["batch_256_s"] / NUM_EVAL * 1e3
    result.update(memory.as_dict())
    rows = _open_rows(folder)
    truth = np.stack([r.sample_ids for r in found])  # ids are row positions here
    np.save(folder / "bench_eval_truth.npy", truth)
    positions, queries = held_out_queries(rows, NUM_CALIBRATION, noise=CAL_NOISE, seed=1)
    np.save(folder / "bench_calibration_queries.npy", queries.numpy())
    np.save(folder / "bench_calibration_truth.npy", rows.search(queries, TOP_K)[0])
    return result


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    from diffusers_dmin.calibration import recall_at_k

    return recall_at_k(found, truth)


def _load_queries(folder: Path):
    return (
        torch.from_numpy(np.load(folder / "bench_eval_queries.npy")),
        np.load(folder / "bench_eval_truth.npy"),
        torch.from_numpy(np.load(folder / "bench_calibration_queries.npy")),
        np.load(folder / "bench_calibration_truth.npy"),
    )


def _fold(flat: torch.Tensor) -> torch.Tensor:
    from diffusers_dmin.sketch import fold_sketch

    return fold_sketch(flat.reshape(len(flat), T, K), COARSE_K).reshape(len(flat), -1)


def task_hnsw(folder: Path, n: int) -> dict[str, Any]:
    from diffusers_dmin.calibration import calibrate_recall
    from diffusers_dmin.search import HNSWSearch, rescore

    rows = _open_rows(folder)
    eval_q, eval_truth, cal_q, cal_truth = _load_queries(folder)
    result: dict[str, Any] = {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "coarse_dim": T * COARSE_K}
    with PeakMemory() as memory:
        start = time.perf_counter()
        graph = HNSWSearch(
            T * COARSE_K, max_elements=n, M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, num_threads=os.cpu_count()
        )
        graph.add_rows(rows, progress=False)
        result["build_s"] = time.perf_counter() - start
    result["build_" + "peak_rss_anon_mib"] = memory.peak_anon / 2**20
    path = folder / "bench_hnsw.bin"
    graph.save(path)
    result["index_bytes"] = path.stat().st_size
    path.unlink()
    result["index_bytes_per_row"] = result["index_bytes"] / n
    cal_coarse, eval_coarse = _fold(cal_q), _fold(eval_q)

    def search(queries: torch.Tensor, coarse: torch.Tensor, ef: int) -> np.ndarray:
        graph.ef = ef
        candidates, _ = graph.search(coarse, max(TOP_K, ef))
        return rescore(rows, queries, candidates, TOP_K)[0]

    start = time.perf_counter()
    calibration = calibrate_recall(
        lambda ef: search(cal_q, cal_coarse, ef),
        cal_truth,
        parameter="ef",
        target=TARGET,
        low=TOP_K,
        high=min(n, 4096),
        noise=CAL_NOISE,
        seed=1,
    )
    result["calibration_s"] = time.perf_counter() - start
    result["calibration"] = calibration.to_dict()
    ef = calibration.value
    result["recall_at_10"] = _recall(search(eval_q, eval_coarse, ef), eval_truth)
    result["recall_at_10_default_ef_100"] = _recall(search(eval_q, eval_coarse, 100), eval_truth)
    with PeakMemory() as memory:
        result["latency"] = _latencies(lambda q: search(q, _fold(q), ef), eval_q)
    result.update(memory.as_dict())
    return result


def task_faiss(folder: Path, n: int, codec: str, nlist: int | None = None) -> dict[str, Any]:
    from diffusers_dmin.faiss_backend import FaissIVFSearch

    rows = _open_rows(folder)
    eval_q, eval_truth, cal_q, cal_truth = _load_queries(folder)
    with PeakMemory() as memory:
        start = time.perf_counter()
        ivf = FaissIVFSearch.from_rows(rows, sketch_dim=COARSE_K, codec=codec, nlist=nlist, progress=False)
        result: dict[str, Any] = {"build_s": time.perf_counter() - start}
    result.update(
        build_peak_rss_anon_mib=memory.peak_anon / 2**20,
        nlist=ivf.nlist,
        pq_m=ivf.pq_m,
        code_size=ivf.code_size,
        coarse_dim=ivf.dim,
        index_bytes=ivf.memory_bytes(),
        index_bytes_per_row=ivf.memory_bytes() / n,
    )
    path = folder / f"bench_faiss_{codec}.safetensors"
    result["file_bytes"] = ivf.save(path)
    path.unlink()
    result["recall_at_10_defaults"] = _recall(ivf.search_rescored(rows, eval_q, TOP_K)[0], eval_truth)
    start = time.perf_counter()
    calibration = ivf.calibrate(rows, cal_q, top_k=TOP_K, target=TARGET, truth=cal_truth, noise=CAL_NOISE, seed=1)
    result["calibration_s"] = time.perf_counter() - start
    result["calibration"] = calibration.to_dict()
    result["recall_at_10"] = _recall(ivf.search_rescored(rows, eval_q, TOP_K)[0], eval_truth)
    with PeakMemory() as memory:
        result["latency"] = _latencies(lambda q: ivf.search_rescored(rows, q, TOP_K), eval_q)
    result.update(memory.as_dict())
    return result


TASKS = {
    "generate": lambda a: task_generate(Path(a.folder), a.n, a.spread),
    "exact": lambda a: task_exact(Path(a.folder), a.n),
    "hnsw": lambda a: task_hnsw(Path(a.folder), a.n),
    "faiss-pq": lambda a: task_faiss(Path(a.folder), a.n, "pq", a.nlist),
    "faiss-sq8": lambda a: task_faiss(Path(a.folder), a.n, "sq8", a.nlist),
}


def run_task(
    task: str, folder: Path, n: int, spread: float, timeout: float, nlist: int | None = None
) -> dict[str, Any]:
    """Run one task in a fresh process; returns its JSON (or an error record)."""
    cmd = [sys.executable, __file__, "--worker", task, "--folder", str(folder), "--n", str(n), "--spread", str(spread)]
    cmd += [] if nlist is None else ["--nlist", str(nlist)]
    print(f"[{time.strftime('%H:%M:%S')}] N={n:>9,} {task} ...", flush=True)
    start = time.perf_counter()
    try:
        env = {**os.environ, "DMIN_DISABLE_PROGRESS_BARS": "1"}
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    wall = time.perf_counter() - start
    if out.returncode != 0:
        tail = out.stderr.strip().splitlines()[-3:]
        print("   failed:", *tail, sep="\n   ", flush=True)
        return {"error": " | ".join(tail) or f"exit {out.returncode}"}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = wall
    print(f"   done in {wall:.1f} s: {json.dumps(_headline(result))}", flush=True)
    return result


def _headline(r: dict[str, Any]) -> dict[str, Any]:
    keys = ("recall_at_10", "build_s", "one_query_warm_s", "batch_256_s", "peak_rss_anon_mib", "index_bytes")
    out = {k: round(r[k], 4) if isinstance(r[k], float) else r[k] for k in keys if k in r}
    if "latency" in r:
        out["p50_ms"] = round(r["latency"]["p50_ms"], 2)
    return out


def _fits(bytes_per_row: float) -> int:
    return int(BUDGET // bytes_per_row)


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Targets and the largest N each backend holds in 24 GiB (from the largest N measured)."""
    sizes = sorted(int(n) for n in results["per_n"])
    largest = results["per_n"][str(sizes[-1])]
    summary: dict[str, Any] = {"targets_at_largest_n": {"n": sizes[-1]}}
    targets = summary["targets_at_largest_n"]
    pq = largest.get("faiss-pq", {})
    hnsw = largest.get("hnsw", {})
    if "recall_at_10" in pq:
        targets["faiss_pq_recall_at_10"] = pq["recall_at_10"]
        targets["faiss_pq_recall_target_0.95_met"] = pq["recall_at_10"] >= 0.95
        targets["faiss_pq_p50_ms"] = pq["latency"]["p50_ms"]
        targets["faiss_pq_p50_under_10_ms_met"] = pq["latency"]["p50_ms"] < 10
    hnsw_n = max((n for n in sizes if "index_bytes" in results["per_n"][str(n)].get("hnsw", {})), default=None)
    if hnsw_n is not None and "index_bytes" in results["per_n"][str(hnsw_n)].get("faiss-pq", {}):
        at = results["per_n"][str(hnsw_n)]
        ratio = at["faiss-pq"]["index_bytes"] / at["hnsw"]["index_bytes"]
        targets["memory_ratio_faiss_pq_over_hnsw"] = {"n": hnsw_n, "ratio": ratio, "target_1_8_met": ratio <= 1 / 8}
        targets["memory_ratio_faiss_pq_over_hnsw"]["recalls"] = [
            at["faiss-pq"].get("recall_at_10"),
            at["hnsw"].get("recall_at_10"),
        ]
    anon = [results["per_n"][str(n)].get("exact", {}).get("peak_rss_anon_mib") for n in sizes]
    targets["exact_peak_rss_anon_mib_by_n"] = dict(zip(map(str, sizes), anon))
    per_row_hnsw = hnsw.get("index_bytes_per_row") or (
        results["per_n"][str(hnsw_n)]["hnsw"]["index_bytes_per_row"] if hnsw_n else None
    )
    fits = {}
    row_bytes = T * K * 2
    fits["exact (memory-mapped shards; RAM is page cache, disk-bound)"] = (
        "no RAM limit: disk-bound (10,240 B/row here)"
    )
    if per_row_hnsw:
        graph_per_row = per_row_hnsw - T * COARSE_K * 4  # links + label per row
        fits[f"hnswlib at {T}x{COARSE_K} (measured {per_row_hnsw:.0f} B/row)"] = _fits(per_row_hnsw)
        fits[f"hnswlib at {T}x{K} full K (computed {T * K * 4 + graph_per_row:.0f} B/row)"] = _fits(
            T * K * 4 + graph_per_row
        )
        fits[f"hnswlib at the paper's {T}x{PAPER_K} (computed {T * PAPER_K * 4 + graph_per_row:.0f} B/row)"] = _fits(
            T * PAPER_K * 4 + graph_per_row
        )
    for codec in ("faiss-pq", "faiss-sq8"):
        per_row = largest.get(codec, {}).get("index_bytes_per_row")
        if per_row:
            fits[f"{codec} at {T}x{COARSE_K} (measured {per_row:.1f} B/row incl. centroids)"] = _fits(per_row)
    summary["largest_n_in_24_gib"] = fits
    summary["row_bytes"] = {
        "this_benchmark_10x512_float16": row_bytes,
        "paper_10x4096_float16": T * PAPER_K * 2,
        "paper_shape_disk_at_1e6_gb": T * PAPER_K * 2 * 1e6 / 1e9,
    }
    return summary


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted(int(n) for n in results["per_n"])
    per_n = [results["per_n"][str(n)] for n in sizes]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5))
    backends = ("hnsw", "faiss-pq", "faiss-sq8")

    def series(ax, backend, getter, label=None, **kw):
        xs, ys = [], []
        for n, r in zip(sizes, per_n):
            try:
                value = getter(r[backend])
            except (KeyError, TypeError):
                continue
            xs.append(n)
            ys.append(value)
        if xs:
            ax.plot(xs, ys, marker="o", label=label or backend, **kw)

    ax = axes[0, 0]
    series(ax, "exact", lambda r: r["one_query_warm_s"] * 1e3, "exact, 1 query")
    series(ax, "exact", lambda r: r["batch_256_per_query_ms"], "exact, 256 queries (per query)")
    for b in backends:
        series(ax, b, lambda r: r["latency"]["p50_ms"], f"{b} p50 (re-scored)")
        series(ax, b, lambda r: r["latency"]["p99_ms"], f"{b} p99", linestyle=":")
    ax.set(title="Search latency per query (ms)", yscale="log")
    ax = axes[0, 1]
    for b in backends:
        series(ax, b, lambda r: r["recall_at_10"], f"{b} (calibrated to 0.95)")
    ax.axhline(0.95, color="gray", linestyle="--", linewidth=1)
    ax.set(title="recall@10 vs exact (fresh queries)")
    ax = axes[0, 2]
    series(ax, "exact", lambda r: r["peak_rss_anon_mib"], "exact: anonymous RSS")
    series(ax, "exact", lambda r: r["peak_rss_file_mib"], "exact: file-backed RSS (page cache)", linestyle=":")
    for b in backends:
        series(ax, b, lambda r: r["build_peak_rss_anon_mib"], f"{b}: build, anonymous RSS")
    ax.set(title="Peak RSS (MiB)", yscale="log")
    ax = axes[1, 0]
    series(ax, "generate", lambda r: r["shard_bytes"] / 2**20, "shards (float16, 10x512)")
    for b in backends:
        series(ax, b, lambda r: r["index_bytes"] / 2**20, f"{b} index in memory")
    ax.set(title="Bytes (MiB)", yscale="log")
    ax = axes[1, 1]
    for b in backends:
        series(ax, b, lambda r: r["build_s"], b)
    series(ax, "generate", lambda r: r["write_s"], "writing the shards")
    ax.set(title="Build time (s)", yscale="log")
    ax = axes[1, 2]
    series(ax, "hnsw", lambda r: r["calibration"]["value"], "hnsw: calibrated ef")
    series(ax, "faiss-pq", lambda r: r["calibration"]["value"], "faiss-pq: calibrated nprobe")
    series(ax, "faiss-pq", lambda r: r["calibration"]["num_candidates"], "faiss-pq: re-scored candidates")
    series(ax, "faiss-sq8", lambda r: r["calibration"]["num_candidates"], "faiss-sq8: re-scored candidates")
    ax.set(title="Calibrated search width (recall@10 >= 0.95)", yscale="log")
    for ax in axes.flat:
        ax.set_xscale("log")
        ax.set_xlabel("N rows")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    load = results["machine"]["load_average_at_start"] if "machine" in results else None
    fig.suptitle(f"Growth: T x K = {T} x {K} float16 rows, 2 shared cores (load at start {load})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 1e4, 1e5 only (a few minutes)")
    parser.add_argument("--sizes", type=str, default=None, help="comma-separated N, e.g. 1e4,1e5,1e6")
    parser.add_argument("--backends", type=str, default="exact,hnsw,faiss-pq,faiss-sq8")
    parser.add_argument("--hnsw-max-n", type=float, default=1e6, help="largest N at which the hnswlib graph is built")
    parser.add_argument("--spread", type=float, default=1.0, help="noise around the cluster centres")
    parser.add_argument("--root", type=str, default=None, help="where the benchmark indices go (deleted after)")
    parser.add_argument("--keep", action="store_true", help="keep the benchmark indices")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per task")
    parser.add_argument("--nlist", type=int, default=None, help="FAISS lists (default: a power of two near sqrt(N))")
    parser.add_argument("--worker", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = TASKS[args.worker](args)
        print(json.dumps(result, default=float))
        return result

    sizes = (
        [int(float(s)) for s in args.sizes.split(",")]
        if args.sizes
        else ([10**4, 10**5] if args.quick else [10**4, 10**5, 10**6])
    )
    backends = args.backends.split(",")
    name = "bench_growth_quick" if args.quick else "bench_growth"
    root = Path(args.root or tempfile.mkdtemp(prefix="dmin-growth-"))
    root.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": "nice -n 10 python benchmarks/bench_growth.py" + (" --quick" if args.quick else ""),
        "argv": sys.argv[1:] if argv is None else argv,
        "setup": {
            "row_shape": [T, K],
            "dtype": "float16",
            "coarse_dim": T * COARSE_K,
            "top_k": TOP_K,
            "recall_target": TARGET,
            "hnsw": {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION},
            "spread": args.spread,
            "clusters": "N/100 random centres",
            "eval_queries": f"{NUM_EVAL} fresh rows from the same clusters (not in the index)",
            "calibration_queries": f"{NUM_CALIBRATION} noisy copies (noise {CAL_NOISE}) of rows sampled from the index",
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "niceness": os.nice(0),
        },
        "per_n": {},
    }
    start_load = os.getloadavg()
    try:
        for n in sizes:
            folder = root / f"n{n}"
            per_n: dict[str, Any] = {}
            results["per_n"][str(n)] = per_n
            per_n["generate"] = run_task("generate", folder, n, args.spread, args.timeout)
            for backend in backends:
                if backend == "hnsw" and n > args.hnsw_max_n:
                    per_n[backend] = {"skipped": f"N > --hnsw-max-n {args.hnsw_max_n:g}"}
                    continue
                per_n[backend] = run_task(backend, folder, n, args.spread, args.timeout, args.nlist)
                per_n[backend]["load_average_after"] = os.getloadavg()
            per_n["disk_bytes"] = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
            if not args.keep:
                shutil.rmtree(folder)
            results["summary"] = summarise(results)
            results["load_average"] = {"start": start_load, "end": os.getloadavg()}
            path = write_results(name, results)  # after every N, so a long run leaves partial results
            plot(json.loads(path.read_text()), RESULTS_DIR / f"{name}.png")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(f"Wrote {path} and {RESULTS_DIR / (name + '.png')}")
    print(json.dumps(results["summary"], indent=2, default=float))
    return results


if __name__ == "__main__":
    main()
