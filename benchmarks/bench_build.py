"""Index-build throughput, overhead and memory on the tiny Stable Diffusion pipeline with a LoRA (T=10, K=4096).

Writes `benchmarks/results/bench_build.json` with:

- **samples/s** of `GradientIndex.build` over N captioned digits: one process with 1 and with 2 torch threads, and two
  processes (`accelerate launch --multi_gpu --num_processes 2`, which on a machine without GPUs runs on the gloo CPU
  backend; OMP_NUM_THREADS=1 per process). Each runs in a fresh process; the clock covers the `build` call only
  (both processes start it together), from reading the first image to the verified manifest. Rounds are interleaved
  so that load from other users of the machine hits every variant alike; the median is reported.
- **overhead of sketching + writing** over plain forward+backward passes of the same (sample, timestep) pairs: the
  build against a loop that reads and preprocesses the same images, encodes them (VAE `mode()`, text encoder) in the
  same batches and computes the same per-pair gradients with the same engine (torch.func vmap), then drops them.
  The difference is what the build adds: sketching, normalising, storage conversion, shard writes, checksums, manifest.
  Target: at most 15%. The one-backward-per-pair loop an official-style implementation runs is reported alongside.
- **peak RSS** added by a build of N and of 4N rows (fresh processes; `peak_extra_memory`). Target: within 10%.

    python benchmarks/bench_build.py            # N=256
    python benchmarks/bench_build.py --quick    # N=128, fewer rounds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
T, K, BATCH, SHARD_ROWS = 10, 4096, 8, 64


def _setup(rows: int):
    import torch

    from diffusers_dmin import DMinConfig
    from diffusers_dmin.data import load_digits
    from diffusers_dmin.testing import add_tiny_lora, tiny_sd_pipeline

    pipe = tiny_sd_pipeline(seed=0)
    add_tiny_lora(pipe.unet, seed=1)
    pipe.set_progress_bar_config(disable=True)
    dataset = load_digits(16, split=f"train[:{rows}]")
    torch.manual_seed(0)
    return pipe, dataset, DMinConfig(num_timesteps=T, sketch_dim=K)


def worker(args: argparse.Namespace) -> None:
    """One build in this process (or in each process of an `accelerate launch`); the main process writes JSON."""
    import torch

    torch.set_num_threads(args.threads)
    from accelerate import PartialState

    from diffusers_dmin import GradientIndex

    pipe, dataset, config = _setup(args.rows)
    state = PartialState(cpu=True)
    state.wait_for_everyone()
    start = time.perf_counter()
    index = GradientIndex.build(
        pipe,
        dataset,
        config,
        args.output_dir,
        batch_size=BATCH,
        max_shard_rows=SHARD_ROWS,
        resume=False,
        progress=False,
    )
    seconds = time.perf_counter() - start
    if state.is_main_process:
        Path(args.result).write_text(json.dumps({"rows": len(index), "seconds": seconds}))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_build(rows: int, threads: int, processes: int, scratch: Path) -> float:
    """Seconds of one build in fresh process(es)."""
    out, result = scratch / f"idx-{processes}-{threads}", scratch / "result.json"
    shutil.rmtree(out, ignore_errors=True)
    result.unlink(missing_ok=True)
    script = [str(Path(__file__).resolve()), "--worker", "--rows", str(rows), "--threads", str(threads)]
    script += ["--output-dir", str(out), "--result", str(result)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    if processes == 1:
        command = [sys.executable, *script]
    else:
        command = [
            shutil.which("accelerate") or "accelerate", "launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", str(threads), "--main_process_port", str(_free_port()), *script,
        ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"build failed ({' '.join(command[:4])} ...):\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())["seconds"]


def throughput(rows: int, rounds: int, scratch: Path) -> dict:
    variants = {"1 process, 1 thread": (1, 1), "1 process, 2 threads": (2, 1), "2 processes, 1 thread each": (1, 2)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (threads, processes) in variants.items():
            times[name].append(_run_build(rows, threads, processes, scratch))
    result = {}
    for name, seconds in times.items():
        median = statistics.median(seconds)
        result[name] = {"samples_per_s": rows / median, "median_s": median, "all_s": seconds}
    base = result["1 process, 1 thread"]["samples_per_s"]
    result["speedup_2_processes_vs_1"] = result["2 processes, 1 thread each"]["samples_per_s"] / base
    return result


def overhead(rows: int, rounds: int, scratch: Path) -> dict:
    """Build vs. the same gradient work without sketching or writing, interleaved, in this process (1 thread)."""
    import torch

    from diffusers_dmin import GradientIndex, GradientSketcher
    from diffusers_dmin.objectives import prepare_images

    torch.set_num_threads(1)
    pipe, dataset, config = _setup(rows)
    sketcher = GradientSketcher.from_pipeline(pipe, config)
    adapter = sketcher.adapter
    images, prompts = dataset["image"], dataset["text"]

    def plain(engine: str) -> None:
        for start in range(0, rows, BATCH):
            pixels = torch.cat(
                [
                    prepare_images(im, adapter.resolution, adapter.image_channels)
                    for im in images[start : start + BATCH]
                ]
            )
            x0, cond, _ = sketcher._inputs(pixels, prompts[start : start + BATCH], None)
            size = sketcher._pairs_per_batch() if engine == "vmap" else 1
            with torch.enable_grad(), sketcher._eval_mode():
                for pairs in sketcher._pair_batches(x0, cond, size):
                    if engine == "vmap":
                        sketcher._vmap_gradients(pairs)
                    else:
                        sketcher._loop_gradients(pairs)

    def build() -> None:
        GradientIndex.build(
            pipe,
            dataset,
            config,
            scratch / "overhead-idx",
            batch_size=BATCH,
            max_shard_rows=SHARD_ROWS,
            resume=False,
            progress=False,
        )

    def clock(fn, *fn_args) -> float:
        start = time.perf_counter()
        fn(*fn_args)
        return time.perf_counter() - start

    build()  # warm-up (vmap tracing caches, allocator)
    plain("vmap")
    builds, plains, loops = [], [], []
    for _ in range(rounds):
        builds.append(clock(build))
        plains.append(clock(plain, "vmap"))
    for _ in range(max(1, rounds // 2)):
        loops.append(clock(plain, "loop"))
    # pairwise ratios are robust to load changes between rounds; the median of them is the estimate
    ratios = [b / p for b, p in zip(builds, plains)]
    return {
        "build_s": builds,
        "forward_backward_vmap_s": plains,
        "forward_backward_loop_s": loops,
        "overhead_vs_vmap_forward_backward": statistics.median(ratios) - 1.0,
        "overhead_vs_vmap_forward_backward_min_ratio": min(ratios) - 1.0,
        "build_vs_official_style_loop": statistics.median(builds) / statistics.median(loops),
        "target_overhead": 0.15,
        "meets_target": statistics.median(ratios) - 1.0 <= 0.15,
    }


def memory(rows: int, scratch: Path) -> dict:
    setup = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import torch; torch.set_num_threads(1)\n"
        "from benchmarks.bench_build import _setup, BATCH, SHARD_ROWS\n"
        "from diffusers_dmin import GradientIndex\n"
        "pipe, dataset, config = _setup({rows})\n"
        "GradientIndex.build(pipe, dataset.select(range(16)), config, {warm!r}, batch_size=BATCH, progress=False)\n"
    )
    run = (
        "GradientIndex.build(pipe, dataset, config, {out!r}, batch_size=BATCH, max_shard_rows=SHARD_ROWS, resume=False, "
        "progress=False)\n"
    )
    result = {}
    for n in (rows, 4 * rows):
        code_setup = setup.format(rows=n, warm=str(scratch / f"warm-{n}"))
        result[str(n)] = _peak(code_setup, run.format(out=str(scratch / f"mem-{n}")))
    small, large = result[str(rows)]["peak_mib"], result[str(4 * rows)]["peak_mib"]
    result["peak_rss_ratio_4N_vs_N"] = large / small
    result["extra_mib_4N_minus_N"] = result[str(4 * rows)]["extra_mib"] - result[str(rows)]["extra_mib"]
    result["target"] = "peak RSS at 4N within 10% of N"
    result["meets_target"] = large / small <= 1.10
    return result


def _peak(setup: str, run: str) -> dict:
    from benchmarks.common import peak_extra_memory

    env_threads = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        return peak_extra_memory(setup, run, timeout=3600)
    finally:
        if env_threads is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = env_threads


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N=128 and fewer rounds.")
    parser.add_argument("--rows", type=int, default=None, help="N (default 256, quick 128).")
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "overhead", "memory"])
    parser.add_argument("--note", default=None, help="Free text stored in the JSON (e.g. what else ran meanwhile).")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import write_results

    rows = args.rows or (128 if args.quick else 256)
    rounds = 2 if args.quick else 3
    results: dict = {
        "pipeline": "tiny StableDiffusionPipeline + LoRA r=4 on to_q/to_k/to_v/to_out (params='auto' -> LoRA)",
        "dataset": "bundled digits, 16x16 grey -> RGB, captions 'a handwritten digit N'",
        "T": T,
        "K": K,
        "dtype": "float16",
        "batch_size": BATCH,
        "shard_rows": SHARD_ROWS,
        "rows": rows,
        "load_average_at_start": os.getloadavg(),
    }
    if args.note:
        results["note"] = args.note
    with tempfile.TemporaryDirectory(prefix="bench-build-") as tmp:
        scratch = Path(tmp)
        if "overhead" not in args.skip:
            results["overhead"] = overhead(rows, rounds + 1, scratch)
            print(json.dumps(results["overhead"], indent=1), flush=True)
        if "throughput" not in args.skip:
            results["throughput"] = throughput(rows, rounds, scratch)
            print(json.dumps(results["throughput"], indent=1), flush=True)
        if "memory" not in args.skip:
            results["peak_rss"] = memory(rows, scratch)
            print(json.dumps(results["peak_rss"], indent=1), flush=True)
    results["load_average_at_end"] = os.getloadavg()
    path = write_results("bench_build", results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
