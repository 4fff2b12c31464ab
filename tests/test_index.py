"""GradientIndex: building, searching, compatibility checks, save/load, append, corruption (index.py)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from diffusers_dmin.config import DMinConfig, SketchSpec
from diffusers_dmin.constants import HNSW_NAME, MANIFEST_NAME, NOISE_NAME, README_NAME
from diffusers_dmin.errors import ConfigError, DatasetError, IndexCorruptError, IndexMismatchError, IndexNotFoundError
from diffusers_dmin.index import GradientIndex
from diffusers_dmin.outputs import InfluenceResult
from diffusers_dmin.sketch import fold_sketch
from diffusers_dmin.storage import sha256_file


T, K = 3, 64


def _config(**changes):
    return DMinConfig(**{"num_timesteps": T, "sketch_dim": K, "seed": 0, **changes})


def _spec(config=None, **changes):
    fields = dict(
        config=config or _config(),
        family="unet2d",
        target="epsilon",
        timesteps=(999, 500, 1),
        latent_shape=(1, 8, 8),
        param_names=("mid.attn.to_q.weight", "mid.attn.to_k.weight"),
        input_dim=2048,
        param_fingerprint="0123456789abcdef",
    )
    fields.update(changes)
    return SketchSpec(**fields)


def _sketches(n, seed=0, k=K, clusters=None):
    """Per-timestep unit vectors, like DMin sketches of normalised gradients; optionally clustered."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, T, k, generator=g)
    if clusters is not None:
        centres = torch.randn(clusters, T, k, generator=torch.Generator().manual_seed(1234))
        x = 0.5 * x + centres[torch.randint(0, clusters, (n,), generator=g)]
    return torch.nn.functional.normalize(x, dim=-1)


def _brute_force(index_rows32, queries, top_k, largest=True):
    scores = queries.reshape(len(queries), -1).double() @ index_rows32.reshape(len(index_rows32), -1).double().T
    values, positions = torch.topk(scores, top_k, dim=1, largest=largest)
    return positions.numpy(), values.numpy()


def _assert_same_results(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.sample_ids, y.sample_ids)
        np.testing.assert_array_equal(x.scores, y.scores)


@pytest.fixture
def index():
    return GradientIndex.from_sketches(_sketches(300), spec=_spec(), noise=torch.randn(1, 8, 8), dataset_id="org/d")


def test_search_equals_numpy_brute_force(index):
    queries = _sketches(4, seed=1)
    stored = index.get_sketches(np.arange(300))  # float16 rows as float32
    torch.testing.assert_close(stored, _sketches(300).half().float(), rtol=0, atol=0)
    results = index.search(queries, top_k=7)
    positions, scores = _brute_force(stored, queries, 7)
    assert all(isinstance(r, InfluenceResult) for r in results)
    for result, p, s in zip(results, positions, scores):
        np.testing.assert_array_equal(result.sample_ids, p)  # ids are 0..N-1 here
        np.testing.assert_allclose(result.scores, s, rtol=1e-5, atol=1e-5)
        assert result.sample_ids.dtype == np.int64 and result.scores.dtype == np.float32
    opponents = index.search(queries, top_k=7, largest=False)
    positions, scores = _brute_force(stored, queries, 7, largest=False)
    np.testing.assert_array_equal(opponents[0].sample_ids, positions[0])
    assert np.all(np.diff(opponents[0].scores) >= 0) and opponents[0].scores[0] < 0
    assert index.search(queries[:1], top_k=1000)[0].sample_ids.shape == (300,)  # capped at N


def test_self_retrieval_and_custom_ids():
    sketches = _sketches(50)
    ids = np.arange(1000, 1050)
    index = GradientIndex.from_sketches(sketches, ids, config=_config(dtype="float32"))
    results = index.search(sketches, top_k=1)
    assert [int(r.sample_ids[0]) for r in results] == ids.tolist()
    np.testing.assert_allclose([r.scores[0] for r in results], T, rtol=1e-5)  # T unit vectors: <x, x> = T


def test_save_load_round_trip_gives_identical_results(tmp_path, index):
    queries = _sketches(5, seed=2)
    before = index.search(queries, top_k=10)
    index.save_pretrained(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == sorted(
        [MANIFEST_NAME, NOISE_NAME, README_NAME, "shards"]
    )
    loaded = GradientIndex.from_pretrained(tmp_path / "idx")
    assert len(loaded) == 300 and loaded.config == index.config and loaded.spec == index.spec
    assert loaded.metadata.dataset_id == "org/d"
    torch.testing.assert_close(loaded.noise, index.noise)
    _assert_same_results(loaded.search(queries, top_k=10), before)
    _assert_same_results(
        loaded.search(queries, top_k=10, largest=False), index.search(queries, top_k=10, largest=False)
    )


def test_hnsw_round_trip_and_rescoring(tmp_path):
    sketches = _sketches(2000, clusters=40)
    index = GradientIndex.from_sketches(sketches, config=_config())
    index.set_progress_bar_config(disable=True)
    queries = _sketches(8, seed=3, clusters=40)
    exact = index.search(queries, top_k=10)
    approx = index.search(queries, top_k=10, exact=False)  # builds the graph (paper defaults)
    recall = np.mean([len(set(a.sample_ids) & set(b.sample_ids)) / 10 for a, b in zip(exact, approx)])
    assert recall >= 0.95
    for a, b in zip(exact, approx):  # re-scored candidates carry exact scores
        common = np.intersect1d(a.sample_ids, b.sample_ids)
        score_a = dict(zip(a.sample_ids.tolist(), a.scores.tolist()))
        score_b = dict(zip(b.sample_ids.tolist(), b.scores.tolist()))
        np.testing.assert_allclose([score_a[i] for i in common], [score_b[i] for i in common], rtol=1e-5, atol=1e-5)
    raw = index.search(queries, top_k=10, exact=False, rescore=False)
    assert raw[0].scores.dtype == np.float32

    index.save_pretrained(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / MANIFEST_NAME).read_text())
    assert manifest["hnsw"]["M"] == 16 and manifest["hnsw"]["ef_construction"] == 200 and manifest["hnsw"]["ef"] == 100
    assert manifest["hnsw"]["sha256"] == sha256_file(tmp_path / "idx" / HNSW_NAME)
    loaded = GradientIndex.from_pretrained(tmp_path / "idx", load_hnsw=True)
    _assert_same_results(loaded.search(queries, top_k=10, exact=False), approx)
    _assert_same_results(loaded.search(queries, top_k=10, exact=False, rescore=False), raw)


def test_hnsw_at_folded_dim_with_exact_rescoring():
    sketches = _sketches(1500, clusters=30)
    index = GradientIndex.from_sketches(sketches, config=_config())
    index.set_progress_bar_config(disable=True)
    index.build_hnsw(sketch_dim=16, ef=200)  # graph of T*16 floats instead of T*64
    queries = _sketches(6, seed=4, clusters=30)
    exact = index.search(queries, top_k=5)
    approx = index.search(queries, top_k=5, exact=False)
    assert np.mean([len(set(a.sample_ids) & set(b.sample_ids)) / 5 for a, b in zip(exact, approx)]) >= 0.9
    with pytest.raises(ConfigError, match="rescore=True"):
        index.search(queries, top_k=5, exact=False, rescore=False)
    folded = index.search(queries, top_k=5, exact=False, rescore=False, sketch_dim=16)
    assert folded[0].sample_ids.shape == (5,)


def test_append_keeps_old_shards_byte_identical(tmp_path, index):
    folder = tmp_path / "idx"
    index.save_pretrained(folder)
    old_shard = folder / "shards" / "sketches-00000.safetensors"
    old_bytes, old_mtime = old_shard.read_bytes(), old_shard.stat().st_mtime_ns

    loaded = GradientIndex.from_pretrained(folder)
    loaded.add(_sketches(20, seed=9))  # ids continue after the largest: 300..319
    loaded.add(_sketches(5, seed=10), ids=[5000, 5001, 5002, 5003, 5004])
    with pytest.raises(ConfigError, match="already in the index"):
        loaded.add(_sketches(2, seed=11), ids=[7, 8000])
    assert len(loaded) == 325 and loaded.ids[-6:].tolist() == [319, 5000, 5001, 5002, 5003, 5004]
    loaded.save_pretrained(folder)

    assert old_shard.read_bytes() == old_bytes and old_shard.stat().st_mtime_ns == old_mtime
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert [s["name"] for s in manifest["shards"]] == [f"shards/sketches-{i:05d}.safetensors" for i in range(3)]
    assert manifest["num_rows"] == 325
    reloaded = GradientIndex.from_pretrained(folder)
    queries = torch.cat([_sketches(20, seed=9)[:2], _sketches(5, seed=10)[:1]])
    _assert_same_results(reloaded.search(queries, top_k=5), loaded.search(queries, top_k=5))
    assert [int(r.sample_ids[0]) for r in reloaded.search(queries, top_k=1)] == [300, 301, 5000]


def test_append_extends_a_saved_hnsw_graph(tmp_path):
    index = GradientIndex.from_sketches(_sketches(400, clusters=10), config=_config())
    index.set_progress_bar_config(disable=True)
    index.build_hnsw()
    index.save_pretrained(tmp_path / "idx")
    loaded = GradientIndex.from_pretrained(tmp_path / "idx")
    loaded.set_progress_bar_config(disable=True)
    new = _sketches(30, seed=5, clusters=10)
    loaded.add(new)  # the graph is not loaded yet: extended on first approximate search
    assert [int(r.sample_ids[0]) for r in loaded.search(new[:3], top_k=1, exact=False)] == [400, 401, 402]
    loaded.add(_sketches(3, seed=6))  # now the graph is in memory: extended at once
    loaded.save_pretrained(tmp_path / "idx")
    assert json.loads((tmp_path / "idx" / MANIFEST_NAME).read_text())["hnsw"]["num_rows"] == 433


def _crash_on_manifest_write(monkeypatch, when):
    """Make `GradientIndex` saves raise (like a killed process) at the manifest writes for which `when` is true."""
    import diffusers_dmin.folder as index_module

    real = index_module.write_manifest

    def write_or_crash(folder, manifest, **kwargs):
        if when(manifest):
            raise KeyboardInterrupt("killed")
        return real(folder, manifest, **kwargs)

    monkeypatch.setattr(index_module, "write_manifest", write_or_crash)


def test_saving_another_index_over_a_folder_never_leaves_a_stale_manifest(tmp_path, monkeypatch):
    folder = tmp_path / "idx"
    GradientIndex.from_sketches(_sketches(50), config=_config()).save_pretrained(folder)
    other = GradientIndex.from_sketches(_sketches(80, seed=3), config=_config())
    with monkeypatch.context() as patch:
        _crash_on_manifest_write(patch, lambda manifest: True)
        with pytest.raises(KeyboardInterrupt):
            other.save_pretrained(folder)
    # killed before the new manifest: the old index is untouched and loadable (issue 11, finding 4; this used to
    # assert that the folder had no index at all, because the old manifest was deleted first)
    old = GradientIndex.from_pretrained(folder)
    assert len(old) == 50
    assert not list(folder.glob(".*.tmp")) and not list((folder / "shards").glob(".*.tmp"))
    other.save_pretrained(folder)  # the next save replaces it and removes the orphan shards of the killed one
    listed = {s["name"] for s in json.loads((folder / MANIFEST_NAME).read_text())["shards"]}
    assert {f"shards/{p.name}" for p in (folder / "shards").iterdir()} == listed
    assert len(GradientIndex.from_pretrained(folder)) == 80
    GradientIndex.from_sketches(_sketches(50), config=_config()).save_pretrained(tmp_path / "idx2")
    other.save_pretrained(tmp_path / "idx2", max_shard_rows=40)  # replaces the index there and removes its shards
    loaded = GradientIndex.from_pretrained(tmp_path / "idx2")
    assert len(loaded) == 80
    listed = {s["name"] for s in json.loads((tmp_path / "idx2" / MANIFEST_NAME).read_text())["shards"]}
    assert {f"shards/{p.name}" for p in (tmp_path / "idx2" / "shards").iterdir()} == listed
    _assert_same_results(loaded.search(_sketches(3, seed=9), top_k=5), other.search(_sketches(3, seed=9), top_k=5))


def test_killed_while_saving_a_grown_hnsw_graph_leaves_a_usable_index(tmp_path, monkeypatch):
    folder = tmp_path / "idx"
    index = GradientIndex.from_sketches(_sketches(200, clusters=10), config=_config())
    index.set_progress_bar_config(disable=True)
    index.build_hnsw()
    index.save_pretrained(folder)
    index.add(_sketches(20, seed=4, clusters=10))  # extends the graph in memory
    with monkeypatch.context() as patch:
        _crash_on_manifest_write(patch, lambda manifest: manifest.hnsw is not None)
        with pytest.raises(KeyboardInterrupt):
            index.save_pretrained(folder)  # killed after hnsw.bin was replaced, before the final manifest
    loaded = GradientIndex.from_pretrained(folder)
    loaded.set_progress_bar_config(disable=True)
    assert len(loaded) == 220 and json.loads((folder / MANIFEST_NAME).read_text())["hnsw"] is None
    queries = _sketches(3, seed=8, clusters=10)
    _assert_same_results(loaded.search(queries, top_k=5, exact=False), index.search(queries, top_k=5, exact=False))


@pytest.mark.parametrize("damage", ["flip-byte", "truncate-manifest", "missing-shard", "shard-shape"])
def test_damaged_index_raises_and_never_returns_results(tmp_path, index, damage):
    folder = tmp_path / "idx"
    index.save_pretrained(folder, max_shard_rows=100)
    shard = folder / "shards" / "sketches-00001.safetensors"
    if damage == "flip-byte":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x40
        shard.write_bytes(bytes(data))
        expected = "failed its checksum"
    elif damage == "truncate-manifest":
        text = (folder / MANIFEST_NAME).read_text()
        (folder / MANIFEST_NAME).write_text(text[: len(text) // 3])
        expected = "not valid JSON"
    elif damage == "missing-shard":
        shard.unlink()
        expected = "missing"
    else:  # a valid shard of another shape swapped in, with a manifest updated to its checksum
        other = GradientIndex.from_sketches(_sketches(100, k=32), config=DMinConfig(num_timesteps=T, sketch_dim=32))
        other.save_pretrained(tmp_path / "other")
        shard.write_bytes((tmp_path / "other" / "shards" / "sketches-00000.safetensors").read_bytes())
        manifest = json.loads((folder / MANIFEST_NAME).read_text())
        manifest["shards"][1].update(sha256=sha256_file(shard), num_bytes=shard.stat().st_size)
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
        expected = "expects"
    with pytest.raises(IndexCorruptError, match=expected):
        GradientIndex.from_pretrained(folder)


def test_tampered_hnsw_graph_raises(tmp_path, index):
    index.set_progress_bar_config(disable=True)
    index.build_hnsw()
    index.save_pretrained(tmp_path / "idx")
    graph = tmp_path / "idx" / HNSW_NAME
    data = bytearray(graph.read_bytes())
    data[100] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="hnsw.bin failed its checksum"):
        GradientIndex.from_pretrained(tmp_path / "idx", load_hnsw=True)
    loaded = GradientIndex.from_pretrained(tmp_path / "idx")
    queries = _sketches(2, seed=1)
    _assert_same_results(loaded.search(queries), index.search(queries))  # exact search never reads hnsw.bin
    with pytest.raises(IndexCorruptError, match="expected sha256"):
        loaded.search(queries, exact=False)


def test_absent_hnsw_graph_is_rebuilt(tmp_path, index, caplog):
    index.set_progress_bar_config(disable=True)
    index.build_hnsw()
    index.save_pretrained(tmp_path / "idx")
    (tmp_path / "idx" / HNSW_NAME).unlink()
    loaded = GradientIndex.from_pretrained(tmp_path / "idx")
    loaded.set_progress_bar_config(disable=True)
    with caplog.at_level(logging.WARNING, logger="diffusers_dmin"):
        results = loaded.search(_sketches(2, seed=1), exact=False)
    assert len(results) == 2 and "rebuilding" in caplog.text


def test_mismatched_queries_raise_index_mismatch(index):
    queries = _sketches(2, seed=1)
    index.check_compatible(_spec())
    index.check_compatible(_spec(config=_config(dtype="float32", sketch_dim=4 * K)))  # dtype and foldable K are fine
    with pytest.raises(IndexMismatchError) as err:
        index.search(queries, spec=_spec(param_fingerprint="ffffffffffffffff", config=_config(seed=1)))
    assert set(err.value.differences) == {"param_fingerprint", "config.seed"}
    assert "param_fingerprint" in str(err.value) and "config.seed" in str(err.value)
    with pytest.raises(IndexMismatchError, match="param_names"):
        index.check_compatible(_spec(param_names=("other.weight",)))
    with pytest.raises(IndexMismatchError, match="sketch_dim"):
        index.check_compatible(_spec(config=_config(sketch_dim=48)))
    with pytest.raises(IndexMismatchError, match="num_timesteps"):
        index.search(torch.randn(2, T + 1, K))
    with pytest.raises(IndexMismatchError, match="sketch_dim"):
        index.search(torch.randn(2, T, 48))
    with pytest.raises(ConfigError, match=r"queries\[None\]"):
        index.search(torch.randn(T, K))
    with pytest.raises(IndexMismatchError, match="new sketches"):
        index.add(torch.randn(2, T, 32))


def test_queries_fold_to_the_index_dimension_and_sketch_dim_folds_both_sides(index):
    big = torch.nn.functional.normalize(torch.randn(3, T, 4 * K), dim=-1)
    torch.testing.assert_close(
        torch.tensor(np.stack([r.scores for r in index.search(big, top_k=5)])),
        torch.tensor(np.stack([r.scores for r in index.search(fold_sketch(big, K), top_k=5)])),
    )
    small = fold_sketch(big, 16)
    with pytest.raises(IndexMismatchError, match="sketch_dim=16"):
        index.search(small)
    results = index.search(small, top_k=5, sketch_dim=16)
    rows = fold_sketch(index.get_sketches(index.ids), 16)
    positions, scores = _brute_force(rows, small, 5)
    for result, p, s in zip(results, positions, scores):
        np.testing.assert_array_equal(result.sample_ids, p)
        np.testing.assert_allclose(result.scores, s, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match="divisor"):
        index.search(small, sketch_dim=24)


def test_index_from_a_config_only_checks_the_config(caplog):
    index = GradientIndex.from_sketches(_sketches(10), config=_config())
    assert index.spec is None and "unspecified" in repr(index)
    with caplog.at_level(logging.WARNING, logger="diffusers_dmin"):
        index.check_compatible(_spec())  # model identity unknown: config only, with a warning
    assert "config only" in caplog.text
    with pytest.raises(IndexMismatchError, match="config.timestep_spacing"):
        index.check_compatible(_config(timestep_spacing="uniform"))
    with pytest.raises(ConfigError, match="spec=|config="):
        GradientIndex.from_sketches(_sketches(2))
    with pytest.raises(ConfigError, match="differs from `spec.config`"):
        GradientIndex.from_sketches(_sketches(2), config=_config(seed=3), spec=_spec())
    with pytest.raises(ConfigError, match="valid names"):
        GradientIndex.from_sketches(_sketches(2), config=_config(), model_id="x")


def test_attach_dataset_fills_samples():
    datasets = pytest.importorskip("datasets")
    sketches = _sketches(20)
    ids = np.arange(100, 120)
    data = datasets.Dataset.from_dict({"id": ids[::-1].tolist(), "text": [f"row {i}" for i in ids[::-1]]})
    index = GradientIndex.from_sketches(sketches, ids, config=_config(), id_column="id")
    result = index.attach_dataset(data).search(sketches[:2], top_k=3)
    assert result[0].samples[0] == {"id": 100, "text": "row 100"}
    assert [s["id"] for s in result[1].samples] == result[1].sample_ids.tolist()
    by_position = GradientIndex.from_sketches(sketches, config=_config()).attach_dataset(data)
    assert by_position.search(sketches[:1], top_k=1)[0].samples == [data[0]]
    with pytest.raises(DatasetError, match="not a column"):
        index.attach_dataset(data, id_column="nope")
    short = GradientIndex.from_sketches(sketches, config=_config()).attach_dataset(data.select(range(5)))
    with pytest.raises(DatasetError, match="no row"):
        short.search(sketches[10:11], top_k=1)


def test_dataset_card_and_custom_card(tmp_path, index):
    index.save_pretrained(tmp_path / "idx")
    card = (tmp_path / "idx" / README_NAME).read_text()
    assert card.startswith("---\n") and "- dmin" in card and "- data-attribution" in card
    assert "membership" in card and "GradientIndex.from_pretrained(" in card and "org/d" in card
    (tmp_path / "idx" / README_NAME).write_text("my own card")
    GradientIndex.from_pretrained(tmp_path / "idx").save_pretrained(tmp_path / "idx")
    assert (tmp_path / "idx" / README_NAME).read_text() == "my own card"
    GradientIndex.from_pretrained(tmp_path / "idx").save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / README_NAME).read_text() == "my own card"


def test_bfloat16_index_and_copy_to_another_folder(tmp_path):
    sketches = _sketches(64)
    index = GradientIndex.from_sketches(sketches, config=_config(dtype="bfloat16"))
    torch.testing.assert_close(index.get_sketches([3]), sketches[3:4].bfloat16().float(), rtol=0, atol=0)
    index.save_pretrained(tmp_path / "a")
    loaded = GradientIndex.from_pretrained(tmp_path / "a")
    loaded.save_pretrained(tmp_path / "b")  # copies the verified shards
    assert (tmp_path / "a" / "shards" / "sketches-00000.safetensors").read_bytes() == (
        tmp_path / "b" / "shards" / "sketches-00000.safetensors"
    ).read_bytes()
    _assert_same_results(
        GradientIndex.from_pretrained(tmp_path / "b").search(sketches[:4]), index.search(sketches[:4])
    )


def test_not_an_index(tmp_path):
    with pytest.raises(IndexNotFoundError, match=MANIFEST_NAME):
        GradientIndex.from_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="no rows"):
        GradientIndex(config=_config()).search(_sketches(1))


def test_index_owns_its_rows_and_validates_top_k():
    sketches = _sketches(10).half()  # already in the storage dtype: must still be copied
    index = GradientIndex.from_sketches(sketches, config=_config())
    before = index.get_sketches([0]).clone()
    sketches.zero_()
    torch.testing.assert_close(index.get_sketches([0]), before, rtol=0, atol=0)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match="top_k"):
            index.search(_sketches(1), top_k=bad, exact=False)
