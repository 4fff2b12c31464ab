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
from diffusers_dmin.constants import MANIFEST_NAME
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
    return (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )


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


# ------------------------------------------------------------------------------------------------ finding 6


def _rewrite_shard_with_nan(folder: Path) -> None:
    """Put a NaN into row 2 of the first shard and recompute the manifest's sha256, as a crafted index would."""
    import hashlib

    from safetensors.torch import load_file, save_file

    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    info = manifest["shards"][0]
    tensors = load_file(folder / info["name"])
    tensors["sketches"][2, 0, 3] = float("nan")
    save_file(tensors, folder / info["name"], metadata={"format": "pt"})
    data = (folder / info["name"]).read_bytes()
    info["sha256"], info["num_bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_nan_rows_are_refused_on_load(tmp_path):
    from diffusers_dmin.errors import IndexCorruptError

    _index(20).save_pretrained(tmp_path / "idx")
    _rewrite_shard_with_nan(tmp_path / "idx")
    with pytest.raises(IndexCorruptError, match=r"NaN or infinite values in rows \[2\]"):
        GradientIndex.from_pretrained(tmp_path / "idx")


@pytest.mark.parametrize(
    "field, value",
    [("noise", [1, 2]), ("hnsw", "hnsw.bin"), ("shards", {"a": 1}), ("spec", 3), ("config", [])],
)
def test_malformed_manifest_fields_are_index_corrupt_errors(tmp_path, field, value):
    from diffusers_dmin.errors import IndexCorruptError

    _index(5, noise_seed=1, hnsw=True).save_pretrained(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / MANIFEST_NAME).read_text())
    manifest[field] = value
    (tmp_path / "idx" / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(IndexCorruptError, match="not a valid DMin manifest"):
        GradientIndex.from_pretrained(tmp_path / "idx")


def test_deeply_nested_and_oversized_manifests_are_index_corrupt_errors(tmp_path, monkeypatch):
    import diffusers_dmin.storage as storage
    from diffusers_dmin.errors import IndexCorruptError

    folder = tmp_path / "idx"
    _index(5).save_pretrained(folder)
    text = (folder / MANIFEST_NAME).read_text()
    (folder / MANIFEST_NAME).write_text(text[:-2] + ', "extra_nest": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(IndexCorruptError, match="nests JSON too deeply"):
        GradientIndex.from_pretrained(folder)
    (folder / MANIFEST_NAME).write_text(text + " " * 20_000)  # valid JSON, but bigger than the limit below
    monkeypatch.setattr(storage, "MAX_MANIFEST_BYTES", 10_000, raising=False)
    with pytest.raises(IndexCorruptError, match="more than the 10000"):
        GradientIndex.from_pretrained(folder)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        _index(10, noise_seed=1, hnsw=True).save_pretrained(tmp_path / "idx")
    finally:
        os.umask(old)
    modes = {
        p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
        for p in (tmp_path / "idx").rglob("*")
        if p.is_file()
    }
    assert set(modes.values()) == {0o666 & ~umask}, modes


def test_next_save_removes_orphans_of_a_killed_save(tmp_path):
    folder = tmp_path / "idx"
    index = _index(10)
    index.save_pretrained(folder)
    (folder / "shards" / "sketches-00007.safetensors").write_bytes(b"half a shard")  # killed mid-save
    (folder / "shards" / ".sketches-00008.safetensors.a1b2c3d4.tmp").write_bytes(b"temp")
    (folder / ".dmin_index.json.Zx9_Qw12.tmp").write_bytes(b"{")
    (folder / "shards" / "sketches-from-r0-00000.safetensors").write_bytes(b"a build's, not ours")
    index.add(torch.randn(3, T, K))
    index.save_pretrained(folder)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    listed = [s["name"] for s in json.loads((folder / MANIFEST_NAME).read_text())["shards"]]
    assert names == sorted([MANIFEST_NAME, "README.md", *listed, "shards/sketches-from-r0-00000.safetensors"])
    assert len(GradientIndex.from_pretrained(folder)) == 13


@pytest.mark.parametrize("n", [1, 7, 64, 100])
@pytest.mark.parametrize("reload", [False, True])
def test_approximate_search_on_small_indices(tmp_path, n, reload):
    index = _index(n)
    exact = index.search(torch.randn(3, T, K, generator=torch.Generator().manual_seed(1)), top_k=10)
    if reload:
        index.build_hnsw(num_threads=1)
        index.save_pretrained(tmp_path / "idx")
        index = GradientIndex.from_pretrained(tmp_path / "idx", load_hnsw=True)
    queries = torch.randn(3, T, K, generator=torch.Generator().manual_seed(1))
    _same(index.search(queries, top_k=10, exact=False), exact)  # every row is a candidate: exact results
    for kwargs in ({"rescore": False}, {"largest": False}, {"top_k": 64, "rescore": False}):
        results = index.search(queries, exact=False, **{"top_k": 10, **kwargs})
        assert all(len(r.sample_ids) == min(n, kwargs.get("top_k", 10)) for r in results)


def test_zero_queries_is_a_config_error():
    from diffusers_dmin.errors import ConfigError

    with pytest.raises(ConfigError, match="holds no sketches"):
        _index(5).search(torch.zeros(0, T, K))


def test_saving_over_an_unreadable_manifest_keeps_its_shards(tmp_path):
    """A manifest this version cannot read (newer format, damage) may list shards: the orphan cleanup spares them."""
    folder = tmp_path / "idx"
    _index(10).save_pretrained(folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["format_version"] = 999
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    _index(4, seed=2).save_pretrained(folder)
    assert (folder / manifest["shards"][0]["name"]).is_file()
    assert len(GradientIndex.from_pretrained(folder)) == 4
