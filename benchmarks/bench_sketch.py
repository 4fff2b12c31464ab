"""Sketch throughput and extra memory: ours (on the fly and with cached tables) vs the official DMin recipe
(materialised randperm + gather + sign + reshape-sum) vs a dense Gaussian JL projection (TRAK's basic projector).

Each method sketches one D-dimensional float32 gradient to K numbers; times are medians over repeats, measured side
by side in one run; the extra memory is the peak RSS a method adds on top of the gradient, measured in a fresh
process (so it includes the method's state: the official permutation/sign vectors, the dense matrix, our tables).

    python benchmarks/bench_sketch.py            # D in {1e6, 1e7, 1e8}, K in {2^12, 2^16}
    python benchmarks/bench_sketch.py --quick    # D in {1e6, 1e7}
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from benchmarks.common import peak_extra_memory, timeit, write_results
from diffusers_dmin.sketch import OPORPSketch


DENSE_MATRIX_LIMIT_BYTES = 2 * 2**30  # materialise the dense projection only below this size
DENSE_TIME_LIMIT_S = 120.0  # skip the chunked dense projection when one call would take longer


def official_state(dim: int, k: int, seed: int = 42):
    """The official DimReducer state: a padded randperm and +-1 signs (int64 and int8)."""
    padded = -(-dim // k) * k
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(padded, generator=generator)
    signs = (torch.randint(0, 2, (padded,), generator=generator) * 2 - 1).to(torch.int8)
    return perm, signs


def official_sketch(grad: torch.Tensor, perm: torch.Tensor, signs: torch.Tensor, k: int) -> torch.Tensor:
    padded = torch.nn.functional.pad(grad, (0, perm.numel() - grad.shape[-1]))
    return (padded[:, perm] * signs).reshape(grad.shape[0], k, -1).sum(-1)


def dense_chunked(grad: torch.Tensor, k: int, seed: int = 0, block: int = 2**16) -> torch.Tensor:
    """Dense Gaussian projection regenerated block by block from a seed (when the matrix does not fit)."""
    out = torch.zeros(grad.shape[0], k)
    generator = torch.Generator().manual_seed(seed)
    for start in range(0, grad.shape[1], block):
        rows = min(block, grad.shape[1] - start)
        out += grad[:, start : start + rows] @ torch.randn(rows, k, generator=generator)
    return out / math.sqrt(k)


SETUP = """
import torch, math
import sys
sys.path.insert(0, {root!r})
from diffusers_dmin.sketch import OPORPSketch
from benchmarks.bench_sketch import official_state, official_sketch, dense_chunked
torch.set_num_threads({threads})
dim, k = {dim}, {k}
grad = torch.randn(1, dim)
"""

RUNS = {
    "ours_on_the_fly": "out = OPORPSketch(dim, k, seed=0, table_budget_bytes=0)(grad)",
    "ours_tables": "s = OPORPSketch(dim, k, seed=0, table_budget_bytes=1 << 40); s(grad); out = s(grad)",
    "official": "perm, signs = official_state(dim, k); out = official_sketch(grad, perm, signs, k)",
    "dense_matrix": "m = torch.randn(dim, k) / math.sqrt(k); out = grad @ m",
    "dense_chunked": "out = dense_chunked(grad, k)",
}


def bench(dim: int, k: int, repeat: int, root: str) -> dict:
    grad = torch.randn(1, dim)
    row: dict = {"D": dim, "K": k}

    ours = OPORPSketch(dim, k, seed=0, table_budget_bytes=0)
    row["ours_on_the_fly"] = timeit(lambda: ours(grad), repeat=repeat)

    tabled = OPORPSketch(dim, k, seed=0, table_budget_bytes=1 << 40)
    start = time.perf_counter()
    tabled(grad)
    row["ours_tables"] = {**timeit(lambda: tabled(grad), repeat=repeat), "table_build_s": time.perf_counter() - start}
    row["ours_tables"]["table_mib"] = tabled.table_bytes / 2**20
    torch.testing.assert_close(tabled(grad), ours(grad), rtol=1e-4, atol=1e-4)

    start = time.perf_counter()
    perm, signs = official_state(dim, k)
    state_s = time.perf_counter() - start
    row["official"] = {
        **timeit(lambda: official_sketch(grad, perm, signs, k), repeat=repeat),
        "state_build_s": state_s,
    }
    row["official"]["state_mib"] = (perm.numel() * 8 + signs.numel()) / 2**20

    if dim * k * 4 <= DENSE_MATRIX_LIMIT_BYTES:
        start = time.perf_counter()
        matrix = torch.randn(dim, k) / math.sqrt(k)
        build = time.perf_counter() - start
        row["dense_matrix"] = {**timeit(lambda: grad @ matrix, repeat=repeat), "matrix_build_s": build}
        row["dense_matrix"]["matrix_mib"] = dim * k * 4 / 2**20
        dense = "dense_matrix"
    else:
        probe = 2**16
        start = time.perf_counter()
        dense_chunked(grad[:, :probe], k)
        estimate = (time.perf_counter() - start) * dim / probe
        if estimate <= DENSE_TIME_LIMIT_S:
            row["dense_chunked"] = timeit(lambda: dense_chunked(grad, k), repeat=1, warmup=0)
            dense = "dense_chunked"
        else:
            row["dense_chunked"] = {"skipped": f"one call would take about {estimate:.0f} s", "estimate_s": estimate}
            dense = None

    methods = ["ours_on_the_fly", "ours_tables", "official"] + ([dense] if dense else [])
    for method in methods:
        setup = SETUP.format(root=root, threads=torch.get_num_threads(), dim=dim, k=k)
        row[method]["memory"] = peak_extra_memory(setup, RUNS[method])

    base = row["official"]["median_s"]
    row["ratios"] = {
        "on_the_fly_time_over_official": row["ours_on_the_fly"]["median_s"] / base,
        "official_time_over_tables": base / row["ours_tables"]["median_s"],
    }
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="D in {1e6, 1e7} only, 3 repeats")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from pathlib import Path

    root = str(Path(__file__).resolve().parent.parent)
    dims = [10**6, 10**7] if args.quick else [10**6, 10**7, 10**8]
    rows = []
    for dim in dims:
        for k in (2**12, 2**16):
            row = bench(dim, k, repeat=3 if (args.quick or dim >= 10**8) else 5, root=root)
            rows.append(row)
            mem = {
                m: row[m]["memory"].get("extra_mib") for m in row if isinstance(row[m], dict) and "memory" in row[m]
            }
            print(
                f"D={dim:.0e} K={k}: ours {row['ours_on_the_fly']['median_s']:.3f}s (tables "
                f"{row['ours_tables']['median_s']:.4f}s), official {row['official']['median_s']:.3f}s; extra MiB {mem}",
                flush=True,
            )
    targets = {
        "on_the_fly_at_most_2x_official_at_1e7": all(
            r["ratios"]["on_the_fly_time_over_official"] <= 2.0 for r in rows if r["D"] == 10**7
        ),
        "tables_at_least_4x_faster_than_official_at_1e7": all(
            r["ratios"]["official_time_over_tables"] >= 4.0 for r in rows if r["D"] == 10**7
        ),
        # RSS high-water marks; they include what glibc keeps in its heap after the chunk temporaries are freed
        "on_the_fly_extra_memory_independent_of_D": max(
            r["ours_on_the_fly"]["memory"].get("extra_mib", 1e9) for r in rows if r["D"] == max(dims)
        )
        <= 1.5 * max(r["ours_on_the_fly"]["memory"].get("extra_mib", 0) for r in rows if r["D"] == min(dims)),
        "on_the_fly_extra_memory_under_4_mib": all(
            r["ours_on_the_fly"]["memory"].get("extra_mib", 1e9) < 4 for r in rows
        ),
    }
    path = write_results("bench_sketch_quick" if args.quick else "bench_sketch", {"rows": rows, "targets": targets})
    print(f"targets: {targets}\nwrote {path}")


if __name__ == "__main__":
    main()
