"""Saves never lose an index and never commit a damaged file (issue 11, findings 4 and 6)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_dmin.config import DMinConfig
from diffusers_dmin.constants import HNSW_NAME, MANIFEST_NAME
from diffusers_dmin.index import GradientIndex
from diffusers_dmin.search import HNSWSearch


T, K = 2, 16


def _index(n, seed=0, noise_seed=None, hnsw=False):
    sketches = torch.randn(n, T, K, generator=torch.Generator().manual_seed(seed))
    noise = None if noise_seed is None else torch.randn(1, 4, 4, generator=torch.Generator().manual_seed(noise_seed))
    index = GradientIndex.from_sketches(sketches, config=DMinConfig(num_timesteps=T, sketch_dim=K), noise=noise)
    index.set_progress_bar_config(disable=True)
    if hnsw:
        index.build_hnsw(M=4, ef_construction=20, num_threads=1)
    return index


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.sample_ids, y.sample_ids)
        np.testing.assert_array_equal(x.scores, y.scores)


def _temp_files(folder: Path):
    return sorted(p.name for p in folder.rglob(".*.tmp"))


@pytest.mark.parametrize("same_index", [False, True])
def test_truncated_graph_write_never_commits(tmp_path, monkeypatch, same_index):
    """hnswlib reports no write error: a graph truncated by a full disk must not be committed with its sha256."""
    folder = tmp_path / "idx"
    old = _index(60, noise_seed=1, hnsw=True)
    old.save_pretrained(folder)
    before = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    queries = torch.randn(3, T, K, generator=torch.Generator().manual_seed(5))
    expected = old.search(queries, top_k=5, exact=False, rescore=False)
    if same_index:  # a grown graph of the same index
        new = GradientIndex.from_pretrained(folder, load_hnsw=True)
        new.set_progress_bar_config(disable=True)
        new.add(torch.randn(30, T, K, generator=torch.Generator().manual_seed(9)))
    else:  # a different index, other noise
        new = _index(90, seed=3, noise_seed=2, hnsw=True)
    real_save = HNSWSearch.save

    def full_disk_save(self, path, *args, **kwargs):
        real_save(self, path, *args, **kwargs)
        with open(path, "r+b") as f:  # the disk filled up during the write: the tail is missing
            f.truncate(os.path.getsize(path) - 100)

    monkeypatch.setattr(HNSWSearch, "save", full_disk_save)
    with pytest.raises(OSError, match="Is the disk full"):
        new.save_pretrained(folder)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before  # the old index is untouched: no file replaced, no temp file or new shard left
    loaded = GradientIndex.from_pretrained(folder, load_hnsw=True)
    assert len(loaded) == 60
    _same(loaded.search(queries, top_k=5, exact=False, rescore=False), expected)


def _tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True).returncode == 0


def test_real_full_disk_keeps_the_old_index(tmp_path):
    """On a 1 MiB tmpfs: saving a bigger, different index fails cleanly and the old one stays loadable."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "1m"):
        pytest.skip("needs root and tmpfs to simulate a full disk")
    try:
        folder = disk / "idx"
        old = _index(100, noise_seed=1, hnsw=True)
        old.save_pretrained(folder)
        queries = torch.randn(2, T, K, generator=torch.Generator().manual_seed(5))
        big = _index(9000, seed=4, noise_seed=2, hnsw=True)  # ~0.6 MB of shards + a graph: does not fit next to it
        with pytest.raises(OSError) as err:
            big.save_pretrained(folder)
        assert "Traceback" not in str(err.value)
        loaded = GradientIndex.from_pretrained(folder, load_hnsw=True)
        assert len(loaded) == 100
        _same(loaded.search(queries, top_k=5), old.search(queries, top_k=5))
        assert _temp_files(folder) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)  # lazy: memory maps may still be open
