"""Index-build throughput by torch thread setting, on an idle and on a loaded machine; cost of partial-shard flushes.

Writes `benchmarks/results/bench_threads.json` with:

- **threads**: samples/s of `GradientIndex.build` for the quickstart's DDPM (examples/checkpoints/ddpm-digits, its
  1,797 digits at 8x8, batch 64, T=10, K=4096) and the tiny Stable Diffusion pipeline with a LoRA (bundled digits at
  16x16 with captions, batch 8, T=10, K=4096), for torch intra-op threads 1 and 2 (2 is torch's own default on a
  2-core machine: one per core), 1 intra-op + 1 inter-op thread, the library's default policy, and two processes of one
  thread each
  (`accelerate launch --multi_gpu --num_processes 2`, gloo on the CPU); each once on the machine as it is ("as is":
  other users' jobs may run; the load average is recorded with every row) and once under a CPU load that this script
  starts and stops itself (`--load` busy-loop processes, 2 by default, each bounded in time). Every measurement runs
  in a fresh process; after the first gradient micro-batch (warm-up: vmap tracing, allocator) the build's progress
  is clocked for `--seconds` seconds of wall time (at least 3 micro-batches, about 40 s at most), so slow variants cost
  bounded time: samples/s = (sample, timestep) pairs done / T / seconds, shard writes and image loading included.
- **flush**: whole builds (`--flush-rows` digits of the DDPM, 1 thread, the machine as is) with partial-shard flushes off (the
  behaviour before they existed), at the default bound, and after every batch, interleaved in one process.

    python benchmarks/bench_threads.py              # ~15 minutes on 2 busy cores
    python benchmarks/bench_threads.py --quick      # fewer variants, ~4 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "examples" / "checkpoints" / "ddpm-digits"
T, K = 10, 4096
MODELS = {"ddpm-digits": {"batch_size": 64}, "tiny-sd-lora": {"batch_size": 8}}
# name -> (intra-op threads for the sketcher: None = library default, 0 = torch's own; inter-op threads; processes)
SETTINGS = {
    "1 thread": (1, None, 1),
    "2 threads": (2, None, 1),
    "1 intra-op + 1 inter-op thread": (1, 1, 1),
    "library default": (None, None, 1),
    "2 processes x 1 thread": (1, None, 2),
}
_MAX_SECONDS = 40.0


class _Stop(Exception):
    pass


def _setup(model: str, rows: int | None = None):
    from diffusers_dmin import DMinConfig
    from diffusers_dmin.data import load_digits

    if model == "ddpm-digits":
        from diffusers import DDPMPipeline

        pipe = DDPMPipeline.from_pretrained(CHECKPOINT)
        dataset = load_digits(image_size=pipe.unet.config.sample_size)
        prompt_column = None
    else:
        from diffusers_dmin.testing import add_tiny_lora, tiny_sd_pipeline

        pipe = tiny_sd_pipeline(seed=0)
        add_tiny_lora(pipe.unet, seed=1)
        dataset = load_digits(16, split="train[:512]")
        prompt_column = "text"
    pipe.set_progress_bar_config(disable=True)
    if rows is not None:
        dataset = dataset.select(range(min(rows, len(dataset))))
    return pipe, dataset, prompt_column, DMinConfig(num_timesteps=T, sketch_dim=K)


def worker(args: argparse.Namespace) -> None:
    """One clocked build in this process (or in each process of an `accelerate launch`)."""
    import torch

    if args.interop:
        torch.set_num_interop_threads(args.interop)
    from accelerate import PartialState

    from diffusers_dmin import GradientIndex, GradientSketcher

    pipe, dataset, prompt_column, config = _setup(args.model)
    state = PartialState(cpu=True)
    marks: list[tuple[float, int]] = []  # (time, pairs) after each gradient micro-batch
    real = GradientSketcher._gradient_rows

    def clocked(self, pairs, sink):
        out = real(self, pairs, sink)
        marks.append((time.perf_counter(), len(pairs["pairs"])))
        if len(marks) >= 4 and (
            marks[-1][0] - marks[0][0] >= args.seconds or marks[-1][0] - marks[0][0] > _MAX_SECONDS
        ):
            raise _Stop
        return out

    GradientSketcher._gradient_rows = clocked
    state.wait_for_everyone()
    load_start = os.getloadavg()
    try:
        GradientIndex.build(
            pipe, dataset, config, args.output_dir, prompt_column=prompt_column, id_column="id",
            batch_size=MODELS[args.model]["batch_size"], resume=False, progress=False,
            sketcher_kwargs={} if args.threads is None else {"num_threads": args.threads},
        )  # fmt: skip
    except _Stop:
        pass
    seconds = marks[-1][0] - marks[0][0]
    pairs = sum(n for _, n in marks[1:])
    result = {
        "samples_per_s": pairs / T / seconds,
        "seconds_clocked": seconds,
        "micro_batches": len(marks) - 1,
        "torch_threads_after": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
    }
    Path(f"{args.result}.{state.process_index}").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _accelerate() -> str:
    """The `accelerate` launcher next to this interpreter (a venv not on PATH), else the one on PATH."""
    local = Path(sys.executable).parent / "accelerate"
    return str(local) if local.exists() else (shutil.which("accelerate") or "accelerate")


def _busy_loops(count: int, seconds: float) -> list[subprocess.Popen]:
    code = f"import time\nend = time.monotonic() + {seconds}\nwhile time.monotonic() < end:\n    pass\n"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(count)]


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()


def _measure(model: str, setting: str, load: int, seconds: float, scratch: Path) -> dict:
    threads, interop, processes = SETTINGS[setting]
    out, result = scratch / "idx", scratch / "result"
    shutil.rmtree(out, ignore_errors=True)
    for old in scratch.glob("result.*"):
        old.unlink()
    script = [str(Path(__file__).resolve()), "--worker", "--model", model, "--seconds", str(seconds)]
    script += ["--output-dir", str(out), "--result", str(result)]
    script += [] if threads is None else ["--threads", str(threads)]
    script += [] if interop is None else ["--interop", str(interop)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "DMIN_NUM_THREADS")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    if processes == 1:
        command = [sys.executable, *script]
    else:
        env["OMP_NUM_THREADS"] = "1"
        command = [
            _accelerate(), "launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--num_cpu_threads_per_process", "1", "--main_process_port", str(_free_port()), *script,
        ]  # fmt: skip
    busy = _busy_loops(load, 600) if load else []
    try:
        time.sleep(1.0 if load else 0.0)
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    finally:
        _stop(busy)
    if done.returncode != 0:
        raise RuntimeError(f"{model} / {setting} failed:\n{done.stderr[-3000:]}")
    parts = [json.loads(p.read_text()) for p in sorted(scratch.glob("result.*"))]
    row = {
        "model": model,
        "setting": setting,
        "background_busy_loops": load,
        "samples_per_s": sum(p["samples_per_s"] for p in parts),
        "processes": len(parts),
        "intra_op_threads": "library default" if threads is None else ("torch default" if threads == 0 else threads),
        "inter_op_threads": parts[0]["interop_threads"],
        "caller_threads_after_build": parts[0]["torch_threads_after"],
        "seconds_clocked": max(p["seconds_clocked"] for p in parts),
        "load_average_start": parts[0]["load_average_start"],
        "load_average_end": parts[0]["load_average_end"],
    }
    print(json.dumps(row), flush=True)
    return row


def flush_cost(rounds: int, rows: int, scratch: Path) -> dict:
    """Whole builds with partial-shard flushes off / default / after every batch, interleaved (1 thread)."""
    import torch

    import diffusers_dmin.build as build_module
    from diffusers_dmin import GradientIndex

    torch.set_num_threads(1)
    pipe, dataset, _, config = _setup("ddpm-digits", rows=rows)
    default = (build_module._FLUSH_ROWS, build_module._FLUSH_SECONDS)
    variants = {"off (before)": (10**12, float("inf")), "default": default, "every batch": (1, 0.0)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    loads = []
    for _ in range(rounds + 1):  # the first round warms up and is dropped
        for name, (rows, seconds) in variants.items():
            build_module._FLUSH_ROWS, build_module._FLUSH_SECONDS = rows, seconds
            loads.append(os.getloadavg())
            start = time.perf_counter()
            GradientIndex.build(
                pipe, dataset, config, scratch / "flush", prompt_column=None, id_column="id", batch_size=64,
                resume=False, progress=False,
            )  # fmt: skip
            times[name].append(time.perf_counter() - start)
    build_module._FLUSH_ROWS, build_module._FLUSH_SECONDS = default
    result = {
        "rows": len(dataset),
        "batch_size": 64,
        "shard_rows": build_module.default_shard_rows(64, config),
        "default_bound": {"rows": default[0], "seconds": default[1]},
        "load_averages": loads,
    }
    for name, seconds in times.items():
        median = statistics.median(seconds[1:])
        result[name] = {"samples_per_s": len(dataset) / median, "median_s": median, "all_s": seconds}
    result["default_vs_off"] = result["default"]["samples_per_s"] / result["off (before)"]["samples_per_s"]
    result["every_batch_vs_off"] = result["every batch"]["samples_per_s"] / result["off (before)"]["samples_per_s"]
    print(json.dumps(result, indent=1), flush=True)
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="Fewer variants and shorter clocks.")
    parser.add_argument("--seconds", type=float, default=None, help="Clocked seconds per variant (default 8).")
    parser.add_argument("--load", type=int, default=2, help="Busy-loop processes of the loaded runs (default 2).")
    parser.add_argument("--skip", nargs="*", default=[], choices=["threads", "flush"])
    parser.add_argument("--settings", nargs="*", default=None, choices=list(SETTINGS), help="Variants (default: all).")
    parser.add_argument("--flush-rows", type=int, default=512, help="Digits per build of the flush comparison.")
    parser.add_argument("--flush-rounds", type=int, default=None, help="Rounds of the flush comparison (default 3).")
    parser.add_argument("--results-name", default="bench_threads", help="benchmarks/results/<name>.json")
    parser.add_argument("--note", default=None, help="Free text stored in the JSON (e.g. what else ran meanwhile).")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--interop", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import write_results

    seconds = args.seconds or (6.0 if args.quick else 8.0)
    settings = args.settings or list(SETTINGS)
    if args.quick and args.settings is None:
        settings = ["1 thread", "2 threads", "library default"]
    results: dict = {
        "command": "python benchmarks/bench_threads.py " + shlex.join(sys.argv[1:]),
        "T": T,
        "K": K,
        "dtype": "float16",
        "models": {
            "ddpm-digits": "examples/checkpoints/ddpm-digits (UNet2DModel, 8x8), 1,797 digits, batch 64",
            "tiny-sd-lora": "diffusers_dmin.testing.tiny_sd_pipeline + LoRA r=4, 16x16 captioned digits, batch 8",
        },
        "clocked_seconds_per_variant": seconds,
        "background_load": f"{args.load} busy-loop processes (python while-loops) started before and killed after "
        "each loaded measurement",
        "load_average_at_start": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    if args.note:
        results["note"] = args.note
    with tempfile.TemporaryDirectory(prefix="bench-threads-") as tmp:
        scratch = Path(tmp)
        if "threads" not in args.skip:
            rows = []
            for model in MODELS:
                for setting in settings:
                    for load in (0, args.load):
                        rows.append(_measure(model, setting, load, seconds, scratch))
                        results["threads"] = rows
                        write_results(args.results_name, results)  # so far, should a later variant fail
        if "flush" not in args.skip:
            rounds = args.flush_rounds or (1 if args.quick else 3)
            results["flush"] = flush_cost(rounds, args.flush_rows, scratch)
    results["load_average_at_end"] = os.getloadavg()
    path = write_results(args.results_name, results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
