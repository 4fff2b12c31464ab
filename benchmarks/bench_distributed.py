"""Distributed exact search: one process vs two (gloo on the CPU), on one index, measured side by side.

Builds (once, in a temporary folder unless `--index-dir` is given) an index of clustered unit-norm rows, float16,
`--rows` x T x K (default 131,072 x 4 x 256: 256 MiB of shards), then runs, each in fresh processes:

- `1 process, 1 thread` and `1 process, 2 threads`: `GradientIndex.from_pretrained(folder).search(...)` (the
  single-process reference);
- `2 processes, 1 thread each`: [`DistributedSearch`], the two processes started with the environment `torchrun` /
  `accelerate launch` set (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

Per configuration: time to open the index (after the imports: reading the manifest, verifying the sha256 of the
shards a process maps, mapping them; for two processes also the rendezvous, which waits for the slower one), median
latency of an exact top-10 search for 1 query and for 256 queries (after one warm-up search, each repeat started
together on every process, taken on rank 0, so it includes the broadcast and the merge), and per process its memory
after the searches: `RssAnon` (private memory), `RssFile` (pages of the memory-mapped shards it touched) and `VmHWM`
(peak resident). The two-process results are checked to equal the one-process results bit for bit.

This machine has 2 CPU cores shared with other jobs: two processes cannot compute faster than one process with two
threads here; what splitting buys on one machine is per-process memory and verification time. The load average is
recorded with the results. Results: `benchmarks/results/bench_distributed.json`.

    nice -n 10 python benchmarks/bench_distributed.py            # ~5 minutes on 2 busy cores
    python benchmarks/bench_distributed.py --rows 16384 --repeat 2  # quick check
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


RESULTS = Path(__file__).resolve().parent / "results" / "bench_distributed.json"
TOP_K = 10


def _status() -> dict[str, float]:
    text = open("/proc/self/status").read()
    return {key: int(re.search(key + r":\s+(\d+)", text).group(1)) / 1024 for key in ("RssAnon", "RssFile", "VmHWM")}


def worker(args: argparse.Namespace) -> None:
    """One process of a configuration: open, search, report (JSON on stdout, results to --out)."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    rank = int(os.environ.get("RANK", "0"))
    import torch.distributed as dist

    from diffusers_dmin import GradientIndex
    from diffusers_dmin.distributed import DistributedSearch

    queries = np.load(Path(args.index_dir) / "queries.npy")
    start = time.perf_counter()  # imports done: opening is reading, verifying and mapping (plus the rendezvous)
    if args.distributed:
        index = DistributedSearch(args.index_dir, timeout=600)

        def search(q):
            return index.search(q if rank == 0 else None, top_k=TOP_K)

        def sync():
            dist.barrier()

    else:
        index = GradientIndex.from_pretrained(args.index_dir)

        def search(q):
            return index.search(q, top_k=TOP_K)

        def sync():
            pass

    open_s = time.perf_counter() - start
    report = {"rank": rank, "open_s": open_s, "threads": args.threads}
    for name, q in (("1_query", queries[:1]), ("256_queries", queries)):
        sync()
        results = search(q)  # warm-up: pages in, buffers allocated
        times = []
        for _ in range(args.repeat):
            sync()
            t0 = time.perf_counter()
            results = search(q)
            times.append(time.perf_counter() - t0)
        report[name] = {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}
        if rank == 0:
            np.savez(
                Path(args.out) / f"{name}.npz",
                ids=np.stack([r.sample_ids for r in results]),
                scores=np.stack([r.scores for r in results]),
            )
    report["memory_mib"] = _status()
    if args.distributed:
        report["local_rows"] = index.num_local_rows
        report["local_shards"] = len(index.shards)
        index.close()
    print(json.dumps(report))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(index_dir: Path, out: Path, *, processes: int, threads: int, repeat: int) -> list[dict]:
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    command = [sys.executable, __file__, "--worker", "--index-dir", str(index_dir), "--out", str(out)]
    command += ["--threads", str(threads), "--repeat", str(repeat)] + (["--distributed"] if processes > 1 else [])
    started = []
    for rank in range(processes):
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        if processes > 1:
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(processes),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )
        started.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports = []
    for process in started:
        stdout, stderr = process.communicate(timeout=3600)
        if process.returncode != 0:
            raise RuntimeError(f"worker failed ({process.returncode}):\n{stderr[-3000:]}")
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    return reports


def build_index(index_dir: Path, rows: int, num_timesteps: int, sketch_dim: int, shard_rows: int) -> dict:
    import numpy as np
    import torch

    from diffusers_dmin import DMinConfig, GradientIndex

    generator = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(1024, num_timesteps, sketch_dim, generator=generator), dim=-1)
    index = GradientIndex(DMinConfig(num_timesteps=num_timesteps, sketch_dim=sketch_dim, dtype="float16"))
    index.set_progress_bar_config(disable=True)
    block = 16384
    for start in range(0, rows, block):
        n = min(block, rows - start)
        which = torch.randint(0, len(centres), (n,), generator=generator)
        noise = torch.randn(n, num_timesteps, sketch_dim, generator=generator)
        index.add(torch.nn.functional.normalize(centres[which] + 0.5 * noise / sketch_dim**0.5, dim=-1))
    start = time.perf_counter()
    index.save_pretrained(index_dir, max_shard_rows=shard_rows)
    saved_s = time.perf_counter() - start
    which = torch.randint(0, len(centres), (256,), generator=generator)
    queries = torch.nn.functional.normalize(
        centres[which] + 0.5 * torch.randn(256, num_timesteps, sketch_dim, generator=generator) / sketch_dim**0.5,
        dim=-1,
    )
    np.save(index_dir / "queries.npy", queries.numpy())
    shard_bytes = sum(p.stat().st_size for p in (index_dir / "shards").glob("*.safetensors"))
    return {"save_s": saved_s, "shard_bytes": shard_bytes, "num_shards": len(list((index_dir / "shards").iterdir()))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=131072)
    parser.add_argument("--num-timesteps", type=int, default=4)
    parser.add_argument("--sketch-dim", type=int, default=256)
    parser.add_argument("--shard-rows", type=int, default=8192)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--index-dir", default=None, help="Keep (or reuse) the index here instead of a temp folder.")
    parser.add_argument("--output", default=str(RESULTS))
    # worker mode (internal)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return

    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import machine_info

    temp = None
    if args.index_dir is None:
        temp = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
        index_dir = temp / "index"
    else:
        index_dir = Path(args.index_dir)
    try:
        info = machine_info()
        if not (index_dir / "queries.npy").is_file():
            built = build_index(index_dir, args.rows, args.num_timesteps, args.sketch_dim, args.shard_rows)
        else:
            built = {"reused": str(index_dir)}
        work = index_dir.parent / "runs"
        configurations = {
            "1 process, 1 thread": dict(processes=1, threads=1),
            "1 process, 2 threads": dict(processes=1, threads=2),
            "2 processes, 1 thread each": dict(processes=2, threads=1),
        }
        runs = {}
        for name, setting in configurations.items():
            out = work / name.replace(" ", "_").replace(",", "")
            reports = _run(index_dir, out, repeat=args.repeat, **setting)
            runs[name] = {"setting": setting, "processes": reports, "out": out}
            summary = {key: reports[0][key]["median_s"] for key in ("1_query", "256_queries")}
            print(f"{name}: open {reports[0]['open_s']:.2f} s, median {summary}", flush=True)
        identical = {}
        reference = runs["1 process, 1 thread"]["out"]
        for name, run in runs.items():
            same = True
            for part in ("1_query", "256_queries"):
                a, b = np.load(reference / f"{part}.npz"), np.load(run["out"] / f"{part}.npz")
                same &= bool(np.array_equal(a["ids"], b["ids"]) and a["scores"].tobytes() == b["scores"].tobytes())
            identical[name] = same
        result = {
            "benchmark": "bench_distributed",
            "command": "nice -n 10 python benchmarks/bench_distributed.py " + " ".join(argv or sys.argv[1:]),
            "machine": info,
            "load_average_at_end": os.getloadavg(),
            "index": {
                "rows": args.rows,
                "num_timesteps": args.num_timesteps,
                "sketch_dim": args.sketch_dim,
                "dtype": "float16",
                "max_shard_rows": args.shard_rows,
                **built,
            },
            "top_k": TOP_K,
            "repeat": args.repeat,
            "configurations": {
                name: {"setting": run["setting"], "processes": run["processes"]} for name, run in runs.items()
            },
            "identical_to_1_process_1_thread": identical,
            "notes": (
                "2 CPU cores shared with other jobs (see the load averages). Latency is taken on rank 0 after a "
                "barrier, so the 2-process figure includes the query broadcast and the merge. RssFile counts the "
                "pages of the memory-mapped shards a process touched; RssAnon its private memory."
            ),
        }
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
        print(f"Wrote {args.output}; identical: {identical}")
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
