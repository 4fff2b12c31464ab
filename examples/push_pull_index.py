"""Share a DMin index on the Hugging Face Hub, pull it back, and check that both give the same rankings.

An index is a dataset repository: a manifest, safetensors shards of sketches, the fixed noise, an optional HNSW
graph and a generated dataset card. Pushing is one commit; pulling verifies every file against the manifest's
sha256, and exact search never downloads the HNSW graph.

Usage:
    python examples/push_pull_index.py --index my_index --repo-id my-org/my-index [--private]
    python examples/push_pull_index.py --index my_index --repo-id my-org/my-index --endpoint http://localhost:8000
"""

from __future__ import annotations

import argparse
import tempfile


# heavy libraries (torch, diffusers, ...) are imported where they are used, so that `--help` answers at once


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Push a DMin index to the Hub, pull it back and compare results.")
    parser.add_argument("--index", required=True, help="Local folder of the index to push.")
    parser.add_argument("--repo-id", required=True, help="Target dataset repository, e.g. my-org/my-index.")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one).")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint (default: huggingface.co).")
    parser.add_argument("--num-queries", type=int, default=4, help="Stored rows used as queries in the check.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import numpy as np

    from diffusers_dmin import GradientIndex

    local = GradientIndex.from_pretrained(args.index)
    commit = local.push_to_hub(args.repo_id, private=args.private or None, token=args.token, endpoint=args.endpoint)
    print(f"pushed {len(local)} rows to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")

    with tempfile.TemporaryDirectory() as cache_dir:
        pulled = GradientIndex.from_pretrained(
            args.repo_id, token=args.token, endpoint=args.endpoint, cache_dir=cache_dir
        )
        queries = local.get_sketches(local.ids[: args.num_queries])
        before = local.search(queries, top_k=5)
        after = pulled.search(queries, top_k=5)
        identical = all(
            np.array_equal(a.sample_ids, b.sample_ids) and np.array_equal(a.scores, b.scores)
            for a, b in zip(before, after)
        )
    print(f"pulled {len(pulled)} rows; identical top-5 for {len(before)} queries: {identical}")
    return {"rows": len(pulled), "identical": identical}


if __name__ == "__main__":
    main()
