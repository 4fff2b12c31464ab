"""Build a tiny DMin index over the bundled digits; run by the subprocess tests, also under `accelerate launch`.

    python tests/scripts/build_tiny.py --output-dir idx --rows 24
    accelerate launch --multi_gpu --num_processes 2 tests/scripts/build_tiny.py --output-dir idx --rows 24

`--slow SECONDS` sleeps after each shard write and `--slow-batch SECONDS` before each gradient batch, so that a test can
kill the build while it runs; `--progress FILE` appends the number of rows of each computed batch to FILE (one line
per batch, written before the build goes on); `--flush-rows N` sets how many rows of an unfinished shard are computed
before they are flushed to a partial file.
"""

from __future__ import annotations

import argparse
import json
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--pipeline", choices=["ddpm", "sd-lora"], default="ddpm")
    parser.add_argument("--rows", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--shard-rows", type=int, default=4)
    parser.add_argument("--num-timesteps", type=int, default=2)
    parser.add_argument("--sketch-dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--slow", type=float, default=0.0)
    parser.add_argument("--slow-batch", type=float, default=0.0)
    parser.add_argument("--progress", default=None)
    parser.add_argument("--flush-rows", type=int, default=None)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--result", default=None, help="Write a JSON summary here (main process).")
    return parser.parse_args(argv)


def tiny_pipeline(name: str):
    from diffusers_dmin.testing import add_tiny_lora, tiny_ddpm_pipeline, tiny_sd_pipeline

    if name == "ddpm":
        return tiny_ddpm_pipeline(seed=0)
    pipe = tiny_sd_pipeline(seed=0)
    add_tiny_lora(pipe.unet, seed=1)
    return pipe


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    import diffusers_dmin.build as build_module

    saved = {name: getattr(build_module, name) for name in ("write_shard", "_sketch_batch", "_FLUSH_ROWS")}
    try:
        if args.slow:

            def slow_write(*a, **k):
                info = saved["write_shard"](*a, **k)
                time.sleep(args.slow)
                return info

            build_module.write_shard = slow_write
        if args.slow_batch or args.progress:

            def watched_batch(sketcher, batch, on_error):
                time.sleep(args.slow_batch)  # before the work: a kill during the sleep finds the progress file exact
                out = saved["_sketch_batch"](sketcher, batch, on_error)
                if args.progress:
                    with open(args.progress, "a") as f:
                        f.write(f"{len(batch.ids)}\n")
                return out

            build_module._sketch_batch = watched_batch
        if args.flush_rows is not None:
            build_module._FLUSH_ROWS = args.flush_rows
        return _build(args)
    finally:  # a test may call main() in its own process
        for name, value in saved.items():
            setattr(build_module, name, value)


def _build(args: argparse.Namespace) -> dict:
    from diffusers_dmin import DMinConfig, GradientIndex
    from diffusers_dmin.data import load_digits

    pipe = tiny_pipeline(args.pipeline)
    dataset = load_digits(16, split=f"train[:{args.rows}]")
    config = DMinConfig(num_timesteps=args.num_timesteps, sketch_dim=args.sketch_dim, dtype="float32")
    start = time.perf_counter()
    index = GradientIndex.build(
        pipe,
        dataset,
        config,
        args.output_dir,
        prompt_column="text" if args.pipeline == "sd-lora" else None,
        id_column="id",
        batch_size=args.batch_size,
        max_shard_rows=args.shard_rows,
        resume=not args.overwrite,
        progress=False,
    )
    seconds = time.perf_counter() - start
    from accelerate import PartialState

    state = PartialState()
    summary = {"rows": len(index), "seconds": seconds, "num_processes": state.num_processes}
    if args.result and state.is_main_process:
        with open(args.result, "w") as f:
            json.dump(summary, f)
    return summary


if __name__ == "__main__":
    main()
