"""The FAISS backend and recall calibration through `GradientIndex`: build, search, save/load, Hub, append."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffusers_dmin.config import DMinConfig
from diffusers_dmin.constants import FAISS_NAME, MANIFEST_NAME
from diffusers_dmin.errors import ConfigError, IndexCorruptError
from diffusers_dmin.index import GradientIndex


pytest.importorskip("faiss")

pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

T, K, N = 2, 64, 12000
REPO = "tester/faiss-dmin-index"


def _sketches(n, seed=0, clusters=150):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, T, K, generator=torch.Generator().manual_seed(99))
    x = centres[torch.randint(0, clusters, (n,), generator=g)] + 0.6 * torch.randn(n, T, K, generator=g)
    return torch.nn.functional.normalize(x, dim=-1)


def _index(n=N):
    index = GradientIndex.from_sketches(_sketches(n), config=DMinConfig(num_timesteps=T, sketch_dim=K))
    index.set_progress_bar_config(disable=True)
    return index


@pytest.fixture(scope="module")
def built():
    index = _index()
    index.build_faiss(sketch_dim=16, codec="pq", pq_m=8)
    return index


def _recall(found, truth):
    return np.mean([len(set(a.sample_ids) & set(b.sample_ids)) / len(b.sample_ids) for a, b in zip(found, truth)])


def test_faiss_search_recall_and_exact_scores(built):
    queries = _sketches(60, seed=5)
    exact = built.search(queries, top_k=10)
    found = built.search(queries, top_k=10, backend="faiss")
    assert _recall(found, exact) >= 0.9
    # every returned score is the exact score of that row
    for result, query in zip(found, queries):
        expected = built.get_sketches(result.sample_ids).float().reshape(10, -1) @ query.reshape(-1)
        np.testing.assert_allclose(result.scores, expected.numpy(), rtol=1e-5, atol=1e-5)
    assert built.faiss_params["codec"] == "pq" and built.faiss_params["sketch_dim"] == 16
    with pytest.raises(ConfigError, match="backend"):
        built.search(queries, top_k=10, backend="annoy")


def test_auto_backend_prefers_faiss_when_built(built):
    queries = _sketches(5, seed=6)
    auto = built.search(queries, top_k=10, exact=False)
    faiss = built.search(queries, top_k=10, backend="faiss")
    for a, b in zip(auto, faiss):
        np.testing.assert_array_equal(a.sample_ids, b.sample_ids)


def test_save_load_round_trip_with_calibration(tmp_path, built):
    calibration = built.calibrate(backend="faiss", target=0.95, top_k=10, num_queries=100, seed=1)
    assert calibration.parameter == "nprobe" and calibration.reached
    assert built.faiss_params["nprobe"] == calibration.value
    assert built.faiss_params["num_candidates"] == calibration.num_candidates
    built.save_pretrained(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / MANIFEST_NAME).read_text())
    entry = manifest["faiss"]
    assert entry["name"] == FAISS_NAME and len(entry["sha256"]) == 64 and entry["num_rows"] == N
    assert entry["calibration"]["value"] == calibration.value
    assert entry["nprobe"] == calibration.value and entry["num_candidates"] == calibration.num_candidates
    loaded = GradientIndex.from_pretrained(tmp_path / "idx")
    assert loaded.faiss_params == built.faiss_params
    assert loaded.calibration("faiss") == calibration
    queries = _sketches(8, seed=7)
    for a, b in zip(loaded.search(queries, 10, backend="faiss"), built.search(queries, 10, backend="faiss")):
        np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
        np.testing.assert_array_equal(a.scores, b.scores)


def test_manifests_without_faiss_still_load_and_build_on_first_use(tmp_path):
    index = _index(3000)
    index.save_pretrained(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / MANIFEST_NAME).read_text())
    assert manifest.get("faiss") is None
    manifest.pop("faiss", None)  # a manifest written before the FAISS backend existed
    (tmp_path / "idx" / MANIFEST_NAME).write_text(json.dumps(manifest))
    loaded = GradientIndex.from_pretrained(tmp_path / "idx")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.faiss_params is None
    results = loaded.search(_sketches(3, seed=8), top_k=5, backend="faiss")  # built on first use
    assert len(results) == 3 and loaded.faiss_params is not None


def test_tampered_faiss_file_is_refused(tmp_path, built):
    built.save_pretrained(tmp_path / "idx")
    path = tmp_path / "idx" / FAISS_NAME
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    loaded = GradientIndex.from_pretrained(tmp_path / "idx")
    with pytest.raises(IndexCorruptError, match="checksum"):
        loaded.search(_sketches(1), top_k=5, backend="faiss")
    assert loaded.search(_sketches(1), top_k=5)[0].sample_ids.shape == (5,)  # exact search is unaffected


def test_crafted_manifest_entry_is_refused(tmp_path, built):
    built.save_pretrained(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / MANIFEST_NAME).read_text())
    for key, bad in (("codec", "flat"), ("nlist", 0), ("num_rows", N + 1), ("sketch_dim", 7), ("name", "../x")):
        broken = {**manifest, "faiss": {**manifest["faiss"], key: bad}}
        (tmp_path / "idx" / MANIFEST_NAME).write_text(json.dumps(broken))
        with pytest.raises(IndexCorruptError):
            GradientIndex.from_pretrained(tmp_path / "idx")


def test_append_extends_the_faiss_index(tmp_path):
    index = _index(8000)
    index.build_faiss(sketch_dim=16, codec="sq8")
    index.save_pretrained(tmp_path / "idx")
    loaded = GradientIndex.from_pretrained(tmp_path / "idx")
    loaded.set_progress_bar_config(disable=True)
    extra = _sketches(500, seed=9)
    loaded.add(extra)
    found = loaded.search(extra[:3], top_k=1, backend="faiss")
    assert [int(r.sample_ids[0]) for r in found] == [8000, 8001, 8002]
    loaded.save_pretrained(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / MANIFEST_NAME).read_text())
    assert manifest["faiss"]["num_rows"] == 8500


def test_hnsw_calibration_is_stored_and_applied(tmp_path):
    index = _index(3000)
    index.build_hnsw(sketch_dim=16, M=4, ef_construction=10, num_threads=1)
    calibration = index.calibrate(backend="hnsw", target=0.9, top_k=10, num_queries=100, noise=0.5)
    assert calibration.parameter == "ef" and calibration.reached
    assert index.hnsw_params["ef"] == calibration.value
    index.save_pretrained(tmp_path / "idx")
    loaded = GradientIndex.from_pretrained(tmp_path / "idx")
    assert loaded.hnsw_params["ef"] == calibration.value and loaded.calibration("hnsw") == calibration


def test_push_and_pull_carry_the_faiss_files_lazily(fake_hub, built):
    built.push_to_hub(REPO)
    pulled = GradientIndex.from_pretrained(REPO)
    assert fake_hub.count("GET", rf"/resolve/[^/]+/{FAISS_NAME}") == 0  # exact search needs no FAISS file
    queries = _sketches(4, seed=10)
    for a, b in zip(pulled.search(queries, 10, backend="faiss"), built.search(queries, 10, backend="faiss")):
        np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
    assert fake_hub.count("GET", rf"/resolve/[^/]+/{FAISS_NAME}") == 1


def test_the_command_refuses_faiss_with_a_distributed_search(tmp_path, capsys):
    import PIL.Image

    from diffusers_dmin.cli import main as dmin

    _index(300).save_pretrained(tmp_path / "idx")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "query.png")
    code = dmin(["search", str(tmp_path / "idx"), "--pipeline", str(tmp_path), "--image", str(tmp_path / "query.png"),
                 "--backend", "faiss", "--distributed"])  # fmt: skip
    assert code == 2
    assert "`--backend faiss` cannot be combined with a distributed search" in capsys.readouterr().err
