"""Item 2: fidelity of the compression, on the committed digits DDPM (`examples/checkpoints/ddpm-digits`).

Reference: the exact DMin score `sum_t <g_t(q), g_t(i)>` of per-timestep L2-normalised, *uncompressed* gradients
(`GradientSketcher.full_gradients`) between generated digits q and training digits i. Compared against it, per K in
{2^8, ..., 2^16}:

- **DMin sketch** (`OPORPSketch`, the library's compression) of the same normalised gradients;
- **dense Gaussian JL** at equal K (TRAK-style: `P` with i.i.d. N(0, 1/K) entries, generated block-wise from a seed
  and never stored whole);
- and, once, the **uncompressed but unnormalised** gradients (`normalize="none"`, the paper's ablation).

Metrics per query, averaged over queries: Pearson and Spearman correlation of the N scores, and the overlap of the
top-10 sets. Timings: seconds per gradient row (one sample at one timestep) for each compression, side by side, and
for computing the gradients themselves.

Usage:
    python -m benchmarks.quality.fidelity --quick --threads 1
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from diffusers_dmin import DMinConfig, GradientSketcher
from diffusers_dmin.sketch import OPORPSketch

from .ablations import BASE
from .common import (
    base_parser,
    command_line,
    log,
    markdown_table,
    mode_name,
    pyplot,
    save_plot,
    set_threads,
    write_json,
    write_markdown,
)
from .data import digits
from .metrics import fidelity


CHECKPOINT = Path(__file__).resolve().parents[2] / "examples" / "checkpoints" / "ddpm-digits"
KS = (2**8, 2**10, 2**12, 2**14, 2**16)


def load_digits_ddpm():
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    ddpm = DDPMPipeline.from_pretrained(CHECKPOINT, local_files_only=True)
    ddpm.unet.eval()
    pipe = DDIMPipeline(unet=ddpm.unet, scheduler=DDIMScheduler.from_config(ddpm.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


class GaussianJL:
    """Dense Gaussian projection `x -> x P`, P (D, K) with N(0, 1/K) entries, generated in row blocks from a seed."""

    def __init__(self, input_dim: int, sketch_dim: int, seed: int = 0, block_rows: int = 8192):
        self.input_dim, self.sketch_dim, self.seed, self.block_rows = input_dim, sketch_dim, seed, block_rows

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.input_dim)
        out = torch.zeros(rows.shape[0], self.sketch_dim)
        scale = 1.0 / self.sketch_dim**0.5
        for b, start in enumerate(range(0, self.input_dim, self.block_rows)):
            stop = min(start + self.block_rows, self.input_dim)
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + b)
            block = torch.randn(stop - start, self.sketch_dim, generator=generator).mul_(scale)
            out.addmm_(rows[:, start:stop], block)
        return out.reshape(*x.shape[:-1], self.sketch_dim)


def run(quick: bool, seed: int = 0, params: str = "attention", jl_max_k: int | None = None) -> dict:
    num_train = 300 if quick else 1797
    num_queries = 16 if quick else 32
    jl_max_k = jl_max_k or (2**12 if quick else 2**14)
    chunk = 64
    pipe = load_digits_ddpm()
    images, labels = digits(16)
    order = np.random.default_rng(seed).permutation(len(images))[:num_train]
    train = images[torch.from_numpy(order)]
    queries = torch.from_numpy(
        pipe(batch_size=num_queries, generator=torch.Generator().manual_seed(seed + 500), output_type="np").images
    ).permute(0, 3, 1, 2)

    config = DMinConfig(**{**BASE, "params": params, "sketch_dim": 4096})
    normed = GradientSketcher.from_pipeline(pipe, config)
    raw = GradientSketcher.from_pipeline(pipe, config.replace(normalize="none"))
    dim, num_t = normed.input_dim, len(normed.timesteps)
    sketches = {k: OPORPSketch(dim, k, config.seed) for k in KS}
    projections = {k: GaussianJL(dim, k, seed) for k in KS if k <= jl_max_k}
    log(f"fidelity: D={dim:,} ({params}), T={num_t}, N={num_train}, Q={num_queries}, JL up to K={jl_max_k}")

    timings = {"gradient_dense": 0.0, "gradient_sketched_K4096": 0.0}
    timings.update({f"sketch_K{k}": 0.0 for k in sketches})
    timings.update({f"jl_K{k}": 0.0 for k in projections})

    def compress(dense: torch.Tensor, count_time: bool) -> dict:
        out = {}
        for k, sk in sketches.items():
            start = time.perf_counter()
            out[("sketch", k)] = sk(dense)
            if count_time:
                timings[f"sketch_K{k}"] += time.perf_counter() - start
        for k, jl in projections.items():
            start = time.perf_counter()
            out[("jl", k)] = jl(dense)
            if count_time:
                timings[f"jl_K{k}"] += time.perf_counter() - start
        return out

    q_dense = normed.full_gradients(images=queries)  # (Q, T, D)
    q_raw = raw.full_gradients(images=queries)
    q_comp = compress(q_dense, count_time=False)
    scores = {"exact": np.zeros((num_queries, num_train)), "unnormalised": np.zeros((num_queries, num_train))}
    for key in q_comp:
        scores[key] = np.zeros((num_queries, num_train))
    check = None
    for start in range(0, num_train, chunk):
        batch = train[start : start + chunk]
        t0 = time.perf_counter()
        dense = normed.full_gradients(images=batch)
        timings["gradient_dense"] += time.perf_counter() - t0
        raw_dense = raw.full_gradients(images=batch)
        cols = slice(start, start + len(batch))
        scores["exact"][:, cols] = torch.einsum("qtd,ntd->qn", q_dense, dense).numpy()
        scores["unnormalised"][:, cols] = torch.einsum("qtd,ntd->qn", q_raw, raw_dense).numpy()
        for key, value in compress(dense, count_time=True).items():
            scores[key][:, cols] = torch.einsum("qtk,ntk->qn", q_comp[key], value).numpy()
        if check is None:  # the library's own sketched gradients equal sketching the dense ones
            t0 = time.perf_counter()
            library = GradientSketcher.from_pipeline(pipe, config)(images=batch)
            timings["gradient_sketched_K4096"] = time.perf_counter() - t0
            check = float((library - sketches[4096](dense)).abs().max())
        log(f"fidelity: {min(start + chunk, num_train)}/{num_train} training digits")
    rows = num_train * num_t
    per_row = {k: v / rows for k, v in timings.items() if k != "gradient_sketched_K4096"}
    per_row["gradient_sketched_K4096"] = timings["gradient_sketched_K4096"] / (min(chunk, num_train) * num_t)
    results = {"unnormalised (uncompressed)": fidelity(scores["unnormalised"], scores["exact"])}
    table = {}
    for (kind, k), value in ((key, v) for key, v in scores.items() if isinstance(key, tuple)):
        table.setdefault(k, {})[kind] = fidelity(value, scores["exact"])
    return {
        "checkpoint": str(CHECKPOINT.relative_to(Path(__file__).resolve().parents[2])),
        "config": config.to_dict(),
        "input_dim": dim,
        "timesteps": list(normed.timesteps),
        "num_train": num_train,
        "num_queries": num_queries,
        "by_k": {str(k): table[k] for k in sorted(table)},
        "other": results,
        "library_vs_dense_sketch_max_abs_diff": check,
        "seconds_per_row": per_row,
        "jl_max_k": jl_max_k,
    }


def markdown(result: dict, command: str) -> str:
    header = ["K", "D/K", "sketch Pearson", "sketch Spearman", "sketch top-10", "JL Pearson", "JL Spearman"]
    header += ["JL top-10", "sketch ms/row", "JL ms/row"]
    rows = []
    dim = result["input_dim"]
    timing = result["seconds_per_row"]
    for k, entry in result["by_k"].items():
        sk, jl = entry["sketch"], entry.get("jl", {})
        rows.append(
            [
                f"2^{int(np.log2(int(k)))}",
                f"{dim / int(k):.1f}",
                sk["pearson"],
                sk["spearman"],
                sk["top10_overlap"],
                jl.get("pearson"),
                jl.get("spearman"),
                jl.get("top10_overlap"),
                1000 * timing[f"sketch_K{k}"],
                1000 * timing[f"jl_K{k}"] if f"jl_K{k}" in timing else None,
            ]
        )
    un = result["other"]["unnormalised (uncompressed)"]
    return (
        f"Committed digits DDPM, params `{result['config']['params']}` (D = {dim:,}), T = {len(result['timesteps'])} "
        f"{result['config']['timestep_spacing']} timesteps, N = {result['num_train']} training digits, "
        f"Q = {result['num_queries']} generated digits. Reference: exact scores of normalised, uncompressed "
        "gradients.\n\n"
        f"Command: `{command}`\n\n"
        + markdown_table(header, rows)
        + f"\n\nUncompressed but unnormalised gradients vs the reference: Pearson {un['pearson']:.3f}, Spearman "
        f"{un['spearman']:.3f}, top-10 overlap {un['top10_overlap']:.3f}.\n"
        f"Computing the gradients: {1000 * timing['gradient_dense']:.2f} ms per row dense, "
        f"{1000 * timing['gradient_sketched_K4096']:.2f} ms per row sketched by the library at K=4096 "
        f"(library vs sketching the dense gradient: max |diff| {result['library_vs_dense_sketch_max_abs_diff']:.2e})."
    )


def plot(result: dict, name: str) -> None:
    plt = pyplot()
    ks = [int(k) for k in result["by_k"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, metric in zip(axes, ("pearson", "spearman", "top10_overlap")):
        for kind, style in (("sketch", "o-"), ("jl", "s--")):
            points = [(k, result["by_k"][str(k)][kind][metric]) for k in ks if kind in result["by_k"][str(k)]]
            if points:
                ax.plot(*zip(*points), style, label="DMin sketch" if kind == "sketch" else "dense Gaussian JL")
        ax.axhline(result["other"]["unnormalised (uncompressed)"][metric], color="gray", ls=":", label="unnormalised")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K")
        ax.set_title(metric)
        ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Fidelity vs exact normalised scores (D={result['input_dim']:,})")
    save_plot(fig, name)


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--params", default="attention", help="'attention' or 'all'")
    parser.add_argument("--jl-max-k", type=int, default=None, help="largest K for the dense JL projection")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    result = run(args.quick, args.seed, args.params, args.jl_max_k)
    result["command"] = command_line()
    suffix = "" if args.params == "attention" else f"_{args.params}"
    name = f"fidelity{suffix}_{mode_name(args.quick)}"
    write_json(name, result)
    write_markdown(name, markdown(result, result["command"]))
    plot(result, name)
    return result


if __name__ == "__main__":
    main()
