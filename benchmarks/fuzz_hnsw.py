"""Fuzz the `hnsw.bin` validator: random header and body mutations must never crash hnswlib (issue 11, finding 1).

Each case mutates a saved graph (one or two of: a header field set to a boundary, nearby or random value; random byte
flips; a random 32-bit word, often a small integer that looks like a count or an id; a level-list size; a truncation
or extension). `validate_hnsw_file` runs on it in this process and may only raise `IndexCorruptError`. Every file it
ACCEPTS is then loaded by hnswlib itself in child processes (many files per child), searched, extended with
`add_items` and searched again; no child may end by a signal. With `--raw N`, N of the rejected files are also loaded
by hnswlib without validation (one child each) to show what the validator prevents.

    python benchmarks/fuzz_hnsw.py --cases 5000            # exit status 1 on any failure
    python benchmarks/fuzz_hnsw.py --cases 300 --raw 100   # also count crashes of unvalidated hnswlib
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


HEADER = struct.Struct("<QQQQQQiIQQQdQ")
FIELDS = [
    (0, "<Q"), (8, "<Q"), (16, "<Q"), (24, "<Q"), (32, "<Q"), (40, "<Q"), (48, "<i"), (52, "<I"), (56, "<Q"),
    (64, "<Q"), (72, "<Q"), (80, "<d"), (88, "<Q"),
]  # fmt: skip
# (rows, M, dim, ef_construction) of the base graphs
BASES = [(60, 4, 6, 20), (200, 3, 4, 10), (1, 2, 4, 5), (33, 8, 3, 40)]
BATCH = 64

CHILD = r"""
import sys, numpy as np, hnswlib
dim, n = int(sys.argv[1]), int(sys.argv[2])
rng = np.random.default_rng(0)
for path in sys.argv[3:]:
    print(path, flush=True)
    index = hnswlib.Index(space="ip", dim=dim)
    try:
        index.load_index(path, max_elements=n + 8)
        index.set_num_threads(1)
        index.set_ef(10)
        q = rng.standard_normal((4, dim)).astype(np.float32)
        k = min(3, index.element_count)
        if k:
            index.knn_query(q, k=k)
        index.add_items(rng.standard_normal((8, dim)).astype(np.float32), np.arange(n, n + 8))
        index.knn_query(q, k=min(5, index.element_count))
        index.save_index(path + ".resaved")
    except (RuntimeError, ValueError, MemoryError) as err:
        print("error", err, flush=True)
print("DONE", flush=True)
"""


def build_bases(folder: Path) -> list[dict]:
    import hnswlib  # directly: importing diffusers_dmin.search would import torch (slow)

    bases = []
    for number, (n, m, dim, efc) in enumerate(BASES):
        graph = hnswlib.Index(space="ip", dim=dim)
        graph.init_index(max_elements=n, M=m, ef_construction=efc, random_seed=number)
        graph.set_num_threads(1)
        graph.add_items(np.random.default_rng(number).standard_normal((n, dim)).astype(np.float32), np.arange(n))
        path = folder / f"base{number}.bin"
        graph.save_index(str(path))
        bases.append({"n": n, "M": m, "dim": dim, "efc": efc, "data": path.read_bytes()})
    return bases


def mutate(data: bytes, base: dict, rng: random.Random) -> tuple[bytes, str]:
    out = bytearray(data)
    what = []
    for _ in range(rng.choice((1, 1, 1, 2))):
        kind = rng.choice(("header", "header", "flip", "word", "word", "levels", "size"))
        if kind == "header" or len(out) < HEADER.size + 8:
            offset, fmt = rng.choice(FIELDS)
            if len(out) < offset + struct.calcsize(fmt):
                continue
            (current,) = struct.unpack_from(fmt, out, offset)
            if fmt == "<d":
                value = rng.choice((0.0, -1.0, 1e300, float("nan"), float("inf"), current * 2, current + 1e-6, 50.0))
            else:
                bits = 8 * struct.calcsize(fmt)
                low, high = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if fmt == "<i" else (0, 2**bits - 1)
                value = rng.choice(
                    (
                        0, 1, 2, low, high, current + 1, current - 1, current + 4, current - 4, current * 2,
                        current + 64, base["n"], base["n"] + 1, base["n"] - 1, 30_000_000, rng.randint(low, high),
                    )
                )  # fmt: skip
                value = min(max(value, low), high)
            struct.pack_into(fmt, out, offset, value)
            what.append(f"header@{offset}={value!r}")
        elif kind == "flip":
            for _ in range(rng.randint(1, 8)):
                position = rng.randrange(HEADER.size, len(out))
                out[position] ^= 1 << rng.randrange(8)
            what.append("flip")
        elif kind == "word":
            position = rng.randrange(HEADER.size, len(out) - 3) & ~3
            value = rng.choice((rng.randrange(2 * base["n"] + 4), rng.randrange(2**32), rng.randrange(2**16)))
            struct.pack_into("<I", out, position, value)
            what.append(f"word@{position}={value}")
        elif kind == "levels":
            start = HEADER.size + base["n"] * (4 * (2 * base["M"] + 1) + 4 * base["dim"] + 8)
            if start + 4 <= len(out):
                position = start + 4 * rng.randrange(max(1, (len(out) - start) // 4))
                value = rng.choice((0, 4 * (base["M"] + 1), 8 * (base["M"] + 1), 3, rng.randrange(2**32)))
                struct.pack_into("<I", out, min(position, len(out) - 4), value)
                what.append(f"levels@{position}={value}")
        else:
            if rng.random() < 0.5:
                cut = rng.randrange(0, len(out))
                del out[cut:]
                what.append(f"truncate={cut}")
            else:
                extra = rng.randrange(1, 64)
                out += bytes(rng.randrange(256) for _ in range(extra))
                what.append(f"extend={extra}")
    return bytes(out), ";".join(what)


def run_children(files: list[tuple[str, dict]], batch: int, timeout: float) -> list[str]:
    """Load files with hnswlib in child processes; describe every child that ended by a signal or hung."""
    failures = []
    env = dict(os.environ, OMP_NUM_THREADS="1")
    groups: dict[tuple[int, int], list[str]] = {}
    for path, base in files:
        groups.setdefault((base["dim"], base["n"]), []).append(path)
    for (dim, n), paths in groups.items():
        for start in range(0, len(paths), batch):
            chunk = paths[start : start + batch]
            try:
                proc = subprocess.run(
                    [sys.executable, "-c", CHILD, str(dim), str(n), *chunk],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                )
            except subprocess.TimeoutExpired as err:
                out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
                last = [line for line in out.splitlines() if line.startswith("/")][-1:]
                failures.append(f"hang (no exit after {timeout} s) at {last}")
                continue
            if proc.returncode < 0 or "DONE" not in proc.stdout:
                last = [line for line in proc.stdout.splitlines() if line.startswith("/")][-1:]
                reason = signal.Signals(-proc.returncode).name if proc.returncode < 0 else f"exit {proc.returncode}"
                failures.append(f"{reason} at {last} {proc.stderr[-300:]}")
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--raw", type=int, default=0, help="also load this many REJECTED files without validation")
    args = parser.parse_args(argv)

    from diffusers_dmin.errors import IndexCorruptError
    from diffusers_dmin.hnsw_file import validate_hnsw_file

    rng = random.Random(args.seed)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dmin-fuzz-") as tmp:
        folder = Path(tmp)
        bases = build_bases(folder)
        # the honest bases must pass (else the fuzzer proves nothing)
        for number, base in enumerate(bases):
            validate_hnsw_file(folder / f"base{number}.bin", dim=base["dim"], num_rows=base["n"], M=base["M"],
                               ef_construction=base["efc"])  # fmt: skip
        accepted, rejected, bugs = [], [], []
        unchanged = 0
        for case in range(args.cases):
            base = rng.choice(bases)
            data, what = mutate(base["data"], base, rng)
            if data == base["data"]:
                unchanged += 1
            path = folder / f"case{case}.bin"
            path.write_bytes(data)
            try:
                validate_hnsw_file(path, dim=base["dim"], num_rows=base["n"], M=base["M"], ef_construction=base["efc"])
            except IndexCorruptError:
                rejected.append((str(path), base))
                continue
            except Exception as err:  # noqa: BLE001 - any other exception is a validator bug
                bugs.append(f"case {case} ({what}): {type(err).__name__}: {err}")
                continue
            accepted.append((str(path), base))
        validate_s = time.perf_counter() - start
        crashes = run_children(accepted, BATCH, timeout=120)
        raw_failures: list[str] = []
        if args.raw:
            sample = rng.sample(rejected, min(args.raw, len(rejected)))
            raw_failures = run_children(sample, 1, timeout=10)
    result = {
        "cases": args.cases,
        "seed": args.seed,
        "rejected_by_validator": len(rejected),
        "accepted_and_loaded_by_hnswlib": len(accepted),
        "unchanged_files": unchanged,
        "validator_exceptions_other_than_IndexCorruptError": bugs[:20],
        "children_ended_by_signal_or_hung": crashes[:20],
        "seconds": round(time.perf_counter() - start, 1),
        "validate_seconds": round(validate_s, 1),
    }
    if args.raw:
        result["rejected_loaded_by_hnswlib_without_validation"] = min(args.raw, len(rejected))
        result["of_which_killed_by_a_signal"] = sum("SIG" in f for f in raw_failures)
        result["of_which_hung"] = sum(f.startswith("hang") for f in raw_failures)
        result["of_which_other_exit"] = sum(f.startswith("exit") for f in raw_failures)
    print(json.dumps(result, indent=2))
    return 1 if bugs or crashes else 0


if __name__ == "__main__":
    sys.exit(main())
