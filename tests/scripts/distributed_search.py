"""Run `DistributedSearch` scenarios in every process of a torch.distributed job (for tests/test_distributed_search.py).

    accelerate launch --multi_gpu --num_processes 2 tests/scripts/distributed_search.py --plan plan.json --out DIR

The plan (JSON) holds `searches`: a list of {"index": folder, "queries": file.npy, "kwargs": {...}, "all_ranks":
whether every rank passes the queries (else only rank 0), "index_of_rank": {"1": another folder for rank 1},
"new_group": search through a new process group passed as `group=`}, and optionally `cli`: a list of `dmin` argvs run in every
process. Each process writes DIR/<n>-rank<r>.npz (sample ids and scores) for search n, or DIR/<n>-rank<r>.err
(the error), and DIR/cli<n>-rank<r>.out / .errout / .code for command n. `--stall-rank R --stall-seconds S --stall-search N` makes
rank R sleep S seconds before search N (a process that stalls); `--timeout` is the search's timeout.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plan", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--timeout", type=float, default=60.0)
    parser.add_argument("--stall-rank", type=int, default=None)
    parser.add_argument("--stall-seconds", type=float, default=0.0)
    parser.add_argument("--stall-search", type=int, default=0)
    args = parser.parse_args(argv)

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from diffusers_dmin.distributed import DistributedSearch
    from diffusers_dmin.errors import DistributedSearchError

    plan = json.loads(Path(args.plan).read_text())
    out = Path(args.out)
    rank = int(os.environ.get("RANK", "0"))
    opened: dict[str, DistributedSearch] = {}
    code = 0
    for number, item in enumerate(plan.get("searches", [])):
        folder = item.get("index_of_rank", {}).get(str(rank), item["index"])
        try:
            if item.get("new_group"):  # an explicit process group (a new gloo group of every process)
                import torch.distributed as dist

                search = DistributedSearch(folder, group=dist.new_group(backend="gloo"), timeout=args.timeout)
            elif folder not in opened:
                opened[folder] = search = DistributedSearch(folder, timeout=args.timeout)
            else:
                search = opened[folder]
            if number == args.stall_search and rank == args.stall_rank:
                time.sleep(args.stall_seconds)
            queries = np.load(item["queries"]) if rank == 0 or item.get("all_ranks") else None
            results = search.search(queries, **item.get("kwargs", {}))
            np.savez(
                out / f"{number}-rank{rank}.npz",
                ids=np.stack([r.sample_ids for r in results]),
                scores=np.stack([r.scores for r in results]),
            )
        except DistributedSearchError as err:
            (out / f"{number}-rank{rank}.err").write_text(str(err))
            code = 3
            if item.get("stop_on_error"):
                return code
    if plan.get("cli"):
        from diffusers_dmin.cli import main as dmin

        for number, command in enumerate(plan["cli"]):
            stdout, stderr = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
                result = dmin(command)
            (out / f"cli{number}-rank{rank}.out").write_text(stdout.getvalue())
            (out / f"cli{number}-rank{rank}.errout").write_text(stderr.getvalue())
            (out / f"cli{number}-rank{rank}.code").write_text(str(result))
    for search in opened.values():
        search.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
