"""One entry point for every benchmark table: the attribution-quality experiments of issue 7, the methods side by
side of issue 12 (`methods`: `digits_methods`, `sd_lora_lds`, then `methods_report`) and, with `--speed`, the speed
benchmarks (`bench_sketch`, `bench_gradients`, `bench_pipeline`, `bench_search`, in their --quick form).

    python -m benchmarks.run_all --quick              # every quality table at reduced size, about 27 min on 2 CPU cores
    python -m benchmarks.run_all                      # full size (about 2.5 hours on 2 CPU cores)
    python -m benchmarks.run_all --quick --speed      # plus the speed benchmarks' quick runs
    python -m benchmarks.run_all --quick --only fidelity detection
    python -m benchmarks.run_all --quick --only methods   # issue 12's methods tables alone
    python -m benchmarks.run_all --speed --only      # the speed benchmarks alone

Quality results go to `benchmarks/results/quality/` (`<experiment>_<quick|full>.{json,md,png}`) and a summary
`run_all_<quick|full>.md` with every table, the command and the wall time of each experiment. The digits
experiments share one process and one cache of retrained models (`--cache-dir` keeps it across runs; by default
it lives in a temporary folder, so every run is timed cold). The tiny SD pipeline of the detection experiment is
loaded from the committed checkpoint unless `--retrain-sd` is given (about 15 minutes more). The `methods` part
writes each runner's own files (`methods_digits_<mode>_seed0`, `methods_sd_<mode>_seed0`, `methods_<mode>`) with
the wall time of each runner; its digits models and LoRA fine-tunes live in the same cache (sub-folders). A run with
`--only` writes its summary to `run_all_<mode>_only_<parts>.json`, leaving the whole suite's summary alone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path


EXPERIMENTS = ("fidelity", "ablations", "counterfactual", "thickness", "detection", "methods")
SPEED = ("bench_sketch", "bench_gradients", "bench_pipeline", "bench_search")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="reduced sizes (about 27 minutes on 2 CPU cores: 18.7 + 8.1 for the methods part, measured)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared machine)")
    parser.add_argument(
        "--only", nargs="*", choices=EXPERIMENTS, default=None, help="run only these (none: with --speed, speed only)"
    )
    parser.add_argument("--speed", action="store_true", help="also run the speed benchmarks (--quick variants)")
    parser.add_argument("--retrain-sd", action="store_true", help="retrain the tiny SD pipeline first")
    parser.add_argument("--cache-dir", type=Path, default=None, help="keep retrained digits models here")
    args = parser.parse_args(argv)

    from benchmarks.quality import (
        ablations,
        counterfactual,
        detection,
        digits_methods,
        fidelity,
        methods_report,
        sd_lora_lds,
        thickness,
    )
    from benchmarks.quality.common import RESULTS_DIR, log, mode_name, set_threads, write_json, write_markdown
    from benchmarks.quality.digits_context import DigitsContext, recipe_for

    set_threads(args.threads)
    mode = mode_name(args.quick)
    selected = EXPERIMENTS if args.only is None else args.only
    command = "python -m benchmarks.run_all" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    wall: dict[str, float] = {}
    sections: list[str] = []
    start_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dmin-quality-") as tmp:
        cache = args.cache_dir or Path(tmp)
        ctx = DigitsContext(recipe_for(args.quick, 0), cache_dir=cache)

        def record(name: str, result: dict, markdown: str, plot) -> None:
            result["command"] = command
            write_json(f"{name}_{mode}", result)
            write_markdown(f"{name}_{mode}", markdown)
            plot(result, f"{name}_{mode}")
            sections.append(f"## {name} ({wall[name.split('_')[0]]:.0f} s)\n\n{markdown}\n")

        for name in selected:
            log(f"=== {name} ({mode}) ===")
            start = time.perf_counter()
            if name == "fidelity":
                result = fidelity.run(args.quick)
                wall[name] = time.perf_counter() - start
                record("fidelity", result, fidelity.markdown(result, command), fidelity.plot)
            elif name == "ablations":
                result = ablations.run_digits(args.quick, ctx=ctx)
                wall[name] = time.perf_counter() - start
                record("ablations_digits", result, ablations.digits_markdown(result, command), ablations.plot_digits)
            elif name == "counterfactual":
                result = counterfactual.run(args.quick, contexts={0: ctx})
                wall[name] = time.perf_counter() - start
                record("counterfactual", result, counterfactual.markdown(result, command), counterfactual.plot)
            elif name == "thickness":
                result = thickness.run(args.quick, ctx=ctx)
                wall[name] = time.perf_counter() - start
                record("thickness", result, thickness.markdown(result, command), thickness.plot)
            elif name == "detection":
                result = detection.run(args.quick, retrain=args.retrain_sd)
                wall[name] = time.perf_counter() - start
                record("detection", result, detection.markdown(result, command), detection.plot)
            elif name == "methods":
                common = ["--threads", str(args.threads)] + (["--quick"] if args.quick else [])
                for part, runner, argv_part in (
                    ("methods_digits", digits_methods, common + ["--cache-dir", str(cache)]),
                    ("methods_sd", sd_lora_lds, common + ["--cache-dir", str(cache / "sd_lora")]),
                ):
                    part_start = time.perf_counter()
                    log(f"--- {part}: {runner.__name__} {' '.join(argv_part)} ---")
                    runner.main(argv_part)
                    wall[part] = time.perf_counter() - part_start
                part_start = time.perf_counter()
                methods_report.main(["--quick"] if args.quick else [])
                wall["methods_report"] = time.perf_counter() - part_start
                wall[name] = time.perf_counter() - start
                report = RESULTS_DIR / f"methods_{mode}.md"
                parts = ", ".join(f"{p} {wall[p]:.0f} s" for p in ("methods_digits", "methods_sd", "methods_report"))
                sections.append(f"## methods ({wall[name]:.0f} s: {parts})\n\n{report.read_text()}\n")
            log(f"=== {name} done in {wall[name]:.0f} s ===")

    if args.speed:
        for bench in SPEED:
            start = time.perf_counter()
            cmd = [sys.executable, "-m", f"benchmarks.{bench}", "--quick"]
            if bench != "bench_search":
                cmd += ["--threads", str(args.threads)]
            log("running " + " ".join(cmd[1:]))
            subprocess.run(cmd, check=True, cwd=Path(__file__).resolve().parents[1])
            wall[bench] = time.perf_counter() - start

    total = time.perf_counter() - start_all
    summary = {"command": command, "mode": mode, "wall_seconds": wall, "total_seconds": total}
    write_json(
        f"run_all_{mode}" if args.only is None else f"run_all_{mode}_only_{'_'.join(selected) or 'speed'}", summary
    )
    header = (
        f"# run_all ({mode})\n\nCommand: `{command}`; total wall time {total:.0f} s ({total / 60:.1f} min); "
        + ", ".join(f"{k} {v:.0f} s" for k, v in wall.items())
        + f". Results: `{RESULTS_DIR.relative_to(Path(__file__).resolve().parents[1])}`.\n\n"
    )
    if args.only is None:
        write_markdown(f"run_all_{mode}", header + "\n".join(sections))
    log(f"run_all {mode}: {total:.0f} s")
    return summary


if __name__ == "__main__":
    main()
