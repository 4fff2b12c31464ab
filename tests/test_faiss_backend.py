"""FAISS IVF backend (faiss_backend.py) and recall calibration (calibration.py).

Recall against exact search on clustered rows, exact re-scored scores, the safetensors round trip, crafted files
refused before faiss sees a byte, and calibration of nprobe / ef to a requested recall@k on held-out rows.
"""

from __future__ import annotations

import json
import struct
import sys

import numpy as np
import pytest
import torch

from diffusers_dmin.calibration import RecallCalibration, calibrate_recall, held_out_queries, recall_at_k
from diffusers_dmin.errors import ConfigError, IndexCorruptError, MissingDependencyError
from diffusers_dmin.search import ExactSearch, HNSWSearch, rescore
from diffusers_dmin.storage import sha256_file


faiss = pytest.importorskip("faiss")

from diffusers_dmin.faiss_backend import (  # noqa: E402
    FaissIVFSearch,
    default_coarse_sketch_dim,
    default_nlist,
    default_pq_m,
    require_faiss,
)


T, K, N = 2, 64, 12000


def _clustered_rows(n=N, t=T, k=K, clusters=150, spread=0.6, seed=0):
    """Rows near one of `clusters` centres (like sketches of related training images), float16 (n, t, k)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, t * k))
    rows = centres[rng.integers(0, clusters, n)] + spread * rng.standard_normal((n, t * k))
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows.astype(np.float16).reshape(n, t, k)


@pytest.fixture(scope="module")
def rows():
    return ExactSearch([_clustered_rows()[:5000], _clustered_rows()[5000:]], "float16")  # two blocks


@pytest.fixture(scope="module")
def built(rows):
    return {
        codec: FaissIVFSearch.from_rows(rows, sketch_dim=16, codec=codec, pq_m=8, seed=0, progress=False)
        for codec in ("pq", "sq8", "sq4")
    }


@pytest.fixture(scope="module")
def held_out(rows):
    positions, queries = held_out_queries(rows, 100, noise=0.25, seed=1)
    truth, truth_scores = rows.search(queries, 10)
    return positions, queries, truth, truth_scores


def test_missing_faiss_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    with pytest.raises(MissingDependencyError, match=r'pip install "diffusers-dmin\[faiss\]"'):
        require_faiss()
    with pytest.raises(MissingDependencyError):
        FaissIVFSearch(T, 16, nlist=4)


@pytest.mark.parametrize("codec", ["pq", "sq8", "sq4"])
def test_recall_against_exact_on_clustered_rows(rows, built, held_out, codec):
    _, queries, truth, truth_scores = held_out
    ivf = built[codec]
    assert ivf.num_rows == N and ivf.dim == T * 16 and ivf.nlist == default_nlist(N)
    positions, scores = ivf.search_rescored(rows, queries, 10)
    assert positions.shape == (100, 10) and positions.dtype == np.int64 and scores.dtype == np.float32
    assert recall_at_k(positions, truth) >= 0.9
    # the coarse stage alone (approximate code scores, no re-scoring) finds fewer true neighbours than both stages
    coarse = ivf._fold(queries, K)
    coarse_positions, _ = ivf.search(coarse, 10)
    assert recall_at_k(coarse_positions, truth) <= recall_at_k(positions, truth)


@pytest.mark.parametrize("codec", ["pq", "sq8"])
@pytest.mark.parametrize("largest", [True, False])
def test_rescored_scores_are_the_exact_scores_of_the_returned_rows(rows, built, held_out, codec, largest):
    _, queries, _, _ = held_out
    positions, scores = built[codec].search_rescored(rows, queries, 10, largest=largest)
    np.testing.assert_array_equal(scores, rows.score(queries, positions))  # same exact kernel, bit for bit
    assert np.all(np.diff(scores, axis=1) <= 0) if largest else np.all(np.diff(scores, axis=1) >= 0)
    assert all(len(set(row)) == 10 for row in positions.tolist())
    # equals `search.rescore` of the same candidates: the exact top-10 among them
    candidates, _ = built[codec].search(built[codec]._fold(queries, K), 100, largest=largest)
    expected, _ = rescore(rows, queries, candidates, 10, largest=largest)
    np.testing.assert_array_equal(np.sort(positions, axis=1), np.sort(expected, axis=1))


def test_queries_find_their_own_rows(rows, built, held_out):
    positions, _, _, _ = held_out
    found, _ = built["pq"].search_rescored(rows, rows.gather(positions), 1)
    np.testing.assert_array_equal(found[:, 0], positions)


def test_probed_lists_smaller_than_top_k_probe_more(rows):
    ivf = FaissIVFSearch.from_rows(rows, sketch_dim=16, nlist=256, codec="sq8", nprobe=1, progress=False)
    queries = rows.gather([0, 1, 2])
    coarse, _ = ivf.search(ivf._fold(queries, K), 200)
    assert (coarse < 0).any()  # one list of ~47 rows cannot fill 200
    positions, scores = ivf.search_rescored(rows, queries, 200, num_candidates=200)
    assert (positions >= 0).all() and np.isfinite(scores).all()
    assert all(len(set(row)) == 200 for row in positions.tolist())


@pytest.mark.parametrize("codec", ["pq", "sq8", "sq4"])
def test_safetensors_round_trip(tmp_path, rows, built, held_out, codec):
    _, queries, _, _ = held_out
    ivf = built[codec]
    path = tmp_path / "faiss.safetensors"
    num_bytes = ivf.save(path)
    assert num_bytes == path.stat().st_size
    assert not list(tmp_path.glob(".*tmp*"))  # written through a temp file
    loaded = FaissIVFSearch.load(
        path,
        num_timesteps=T,
        sketch_dim=16,
        num_rows=N,
        nlist=ivf.nlist,
        codec=codec,
        pq_m=ivf.pq_m,
        sha256=sha256_file(path),
        num_bytes=num_bytes,
    )
    for key, value in ivf.state_arrays().items():
        np.testing.assert_array_equal(loaded.state_arrays()[key], value)
    for a, b in zip(ivf.search_rescored(rows, queries, 10), loaded.search_rescored(rows, queries, 10)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(ivf.search(ivf._fold(queries, K), 10), loaded.search(loaded._fold(queries, K), 10)):
        np.testing.assert_array_equal(a, b)  # the rebuilt codes and tables give the same approximate scores


def test_rows_appended_after_loading_are_searchable(tmp_path, rows):
    first = ExactSearch([_clustered_rows()[:8000]], "float16")
    ivf = FaissIVFSearch.from_rows(first, sketch_dim=16, codec="sq8", progress=False)
    ivf.save(tmp_path / "f.safetensors")
    loaded = FaissIVFSearch.load(
        tmp_path / "f.safetensors", num_timesteps=T, sketch_dim=16, num_rows=8000, nlist=ivf.nlist, codec="sq8", pq_m=0
    )
    with pytest.raises(ConfigError, match="add the rest"):
        loaded.search_rescored(rows, rows.gather([9000]), 1)
    loaded.add_rows(rows, progress=False)
    assert loaded.num_rows == N
    found, _ = loaded.search_rescored(rows, rows.gather([9000, 11999]), 1)
    assert found[:, 0].tolist() == [9000, 11999]


# ------------------------------------------------------------------------------------ untrusted files


def _write_safetensors(path, tensors, header_patch=None):
    """A safetensors file built by hand (so a test can craft any header)."""
    header, blobs, offset = {}, [], 0
    tags = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8"}
    for key, array in tensors.items():
        data = np.ascontiguousarray(array).tobytes()
        header[key] = {
            "dtype": tags[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(data)],
        }
        blobs.append(data)
        offset += len(data)
    if header_patch:
        header_patch(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


@pytest.fixture
def restore_calls(monkeypatch):
    """Records every hand-over of arrays to faiss; crafted files must be refused before any."""
    calls = []
    original = FaissIVFSearch._restore

    def spy(self, arrays):
        calls.append(arrays)
        return original(self, arrays)

    monkeypatch.setattr(FaissIVFSearch, "_restore", spy)
    return calls


def _load(path, ivf, **kwargs):
    params = dict(num_timesteps=T, sketch_dim=16, num_rows=N, nlist=ivf.nlist, codec=ivf.codec, pq_m=ivf.pq_m)
    params.update(kwargs)
    # the crafted file comes with a matching sha256: whoever wrote the file also wrote the manifest
    return FaissIVFSearch.load(path, sha256=sha256_file(path), num_bytes=path.stat().st_size, **params)


def _crafts():
    def duplicate_id(a):
        a["ids"][1] = a["ids"][0]

    def id_out_of_range(a):
        a["ids"][0] = N + 5

    def negative_id(a):
        a["ids"][0] = -1

    def offsets_past_rows(a):
        a["list_offsets"][-1] = N + 1

    def offsets_decreasing(a):
        a["list_offsets"][3], a["list_offsets"][4] = a["list_offsets"][4] + 1, a["list_offsets"][3]

    def nan_centroid(a):
        a["centroids"][0, 0] = np.nan

    def inf_codebook(a):
        a["pq_centroids"][0, 0, 0] = np.inf

    def codes_too_short(a):
        a["codes"] = a["codes"][:, :-1].copy()

    def fewer_rows(a):
        a["ids"], a["codes"] = a["ids"][:-1].copy(), a["codes"][:-1].copy()

    def extra_tensor(a):
        a["extra"] = np.zeros(3, np.float32)

    def missing_tensor(a):
        del a["pq_centroids"]

    def ids_as_float(a):
        a["ids"] = a["ids"].astype(np.float32)

    return [
        duplicate_id,
        id_out_of_range,
        negative_id,
        offsets_past_rows,
        offsets_decreasing,
        nan_centroid,
        inf_codebook,
        codes_too_short,
        fewer_rows,
        extra_tensor,
        missing_tensor,
        ids_as_float,
    ]


@pytest.mark.parametrize("craft", _crafts(), ids=lambda f: f.__name__)
def test_crafted_arrays_are_refused_before_faiss_sees_them(tmp_path, built, restore_calls, craft):
    ivf = built["pq"]
    arrays = {k: v.copy() for k, v in ivf.state_arrays().items()}
    craft(arrays)
    path = tmp_path / "faiss.safetensors"
    _write_safetensors(path, arrays)
    with pytest.raises(IndexCorruptError):
        _load(path, ivf)
    assert restore_calls == []


def _header_crafts():
    def offsets_beyond_file(h):
        h["codes"]["data_offsets"][1] += 10**9

    def overlapping(h):
        h["ids"]["data_offsets"] = list(h["centroids"]["data_offsets"][:1]) + [
            h["centroids"]["data_offsets"][0] + h["ids"]["data_offsets"][1] - h["ids"]["data_offsets"][0]
        ]

    def shape_lies(h):
        h["codes"]["shape"] = [N * 2, h["codes"]["shape"][1]]

    def negative_offset(h):
        h["ids"]["data_offsets"] = [-8, h["ids"]["data_offsets"][1] - h["ids"]["data_offsets"][0] - 8]

    def offsets_not_ints(h):
        h["ids"]["data_offsets"] = ["0", "8"]

    return [offsets_beyond_file, overlapping, shape_lies, negative_offset, offsets_not_ints]


@pytest.mark.parametrize("craft", _header_crafts(), ids=lambda f: f.__name__)
def test_crafted_headers_are_refused_before_faiss_sees_them(tmp_path, built, restore_calls, craft):
    ivf = built["pq"]
    path = tmp_path / "faiss.safetensors"
    _write_safetensors(path, ivf.state_arrays(), header_patch=craft)
    with pytest.raises(IndexCorruptError):
        _load(path, ivf)
    assert restore_calls == []


def test_damaged_or_mismatched_files_are_refused(tmp_path, built, restore_calls):
    ivf = built["sq8"]
    path = tmp_path / "faiss.safetensors"
    ivf.save(path)
    sha = sha256_file(path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    params = dict(num_timesteps=T, sketch_dim=16, num_rows=N, nlist=ivf.nlist, codec="sq8", pq_m=0)
    with pytest.raises(IndexCorruptError, match="checksum"):
        FaissIVFSearch.load(path, sha256=sha, num_bytes=len(data), **params)
    ivf.save(path)
    for wrong in (dict(nlist=ivf.nlist * 2), dict(codec="sq4"), dict(num_rows=N - 1), dict(sketch_dim=8)):
        with pytest.raises(IndexCorruptError):
            _load(path, ivf, **{**params, **wrong})
    path.write_bytes(b"\xff" * 8 + b"{}")
    with pytest.raises(IndexCorruptError):
        _load(path, ivf, **params)
    assert restore_calls == []


# ------------------------------------------------------------------------------------ arguments


def test_bad_arguments_name_the_argument(rows):
    with pytest.raises(ConfigError, match="codec"):
        FaissIVFSearch(T, 16, nlist=4, codec="flat")
    with pytest.raises(ConfigError, match="pq_m"):
        FaissIVFSearch(T, 16, nlist=4, codec="pq", pq_m=5)
    with pytest.raises(ConfigError, match="32768"):
        FaissIVFSearch(10, 4096, nlist=4)
    with pytest.raises(ConfigError, match="sketch_dim"):
        FaissIVFSearch.from_rows(rows, sketch_dim=24, progress=False)
    with pytest.raises(ConfigError, match="nlist"):
        FaissIVFSearch.from_rows(rows, nlist=N + 1, progress=False)
    with pytest.raises(ConfigError, match="device"):
        FaissIVFSearch(T, 16, nlist=4, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA"):
            FaissIVFSearch(T, 16, nlist=4, device="cuda")
    assert FaissIVFSearch(T, 16, nlist=4, device="auto").device in ("cpu", "cuda")


def test_default_coarse_dimension_fits_engine_limits():
    assert default_coarse_sketch_dim(10, 4096) == 64  # the paper's 10 x 4,096 -> 640 coarse dims
    assert default_coarse_sketch_dim(10, 4096, max_dim=32768) == 2048
    assert default_coarse_sketch_dim(3, 100) == 100
    assert default_nlist(10**6) == 1024 and default_nlist(100) == 2
    assert default_pq_m(640) == 40 and default_pq_m(32) == 2 and default_pq_m(7) == 1


# ------------------------------------------------------------------------------------ calibration


def test_calibrated_nprobe_and_candidates_reach_the_target_on_fresh_held_out_rows(rows):
    ivf = FaissIVFSearch.from_rows(
        rows, sketch_dim=16, codec="pq", pq_m=8, nprobe=1, num_candidates=12, progress=False
    )
    _, queries = held_out_queries(rows, 150, noise=0.4, seed=2)
    truth, _ = rows.search(queries, 10)
    assert recall_at_k(ivf.search_rescored(rows, queries, 10)[0], truth) < 0.9  # these settings miss
    calibration = ivf.calibrate(
        rows, queries, top_k=10, target=0.95, max_candidates=400, noise=0.4, seed=2, confidence=None
    )
    assert calibration.reached and calibration.recall >= 0.95 and calibration.parameter == "nprobe"
    assert (ivf.nprobe, ivf.num_candidates) == (calibration.value, calibration.num_candidates)
    curve, candidates_curve = dict(calibration.curve), dict(calibration.candidates_curve)
    # the smallest nprobe reaching the target with 400 candidates, then the fewest candidates at that nprobe
    assert curve[calibration.value] >= 0.95 and (calibration.value == 1 or curve[calibration.value - 1] < 0.95)
    assert candidates_curve[calibration.num_candidates] >= 0.95
    assert candidates_curve[calibration.num_candidates - 1] < 0.95
    found, _ = ivf.search_rescored(rows, queries, 10)
    assert recall_at_k(found, truth) == calibration.recall
    # other held-out rows (another seed), not used to calibrate
    _, fresh = held_out_queries(rows, 150, noise=0.4, seed=3)
    fresh_truth, _ = rows.search(fresh, 10)
    assert recall_at_k(ivf.search_rescored(rows, fresh, 10)[0], fresh_truth) >= 0.92
    assert RecallCalibration.from_dict(json.loads(json.dumps(calibration.to_dict()))) == calibration


def test_calibration_with_an_unreachable_target_applies_the_widest_search(rows):
    ivf = FaissIVFSearch.from_rows(rows, sketch_dim=4, codec="pq", pq_m=2, nprobe=1, progress=False)
    _, queries = held_out_queries(rows, 50, noise=0.4, seed=2)
    calibration = ivf.calibrate(rows, queries, top_k=10, target=1.0, max_candidates=12)
    assert not calibration.reached and calibration.recall < 1.0
    assert (ivf.nprobe, ivf.num_candidates) == (ivf.nlist, 12)


def test_calibrated_ef_reaches_the_target_for_hnsw():
    rng = np.random.default_rng(4)
    blocks = rng.standard_normal((3000, 2, 16)).astype(np.float16)  # unclustered: hard for HNSW
    rows = ExactSearch([blocks], "float16")
    graph = HNSWSearch(rows.dim, max_elements=rows.num_rows, M=4, ef_construction=10, num_threads=1)
    graph.add_rows(rows, progress=False)
    positions, queries = held_out_queries(rows, 100, noise=0.5, seed=0)
    truth, _ = rows.search(queries, 10)

    def search_at(ef):
        graph.ef = ef
        candidates, _ = graph.search(queries, max(10, ef))
        return rescore(rows, queries, candidates, 10)[0]

    calibration = calibrate_recall(
        search_at, truth, parameter="ef", target=0.9, low=10, high=rows.num_rows, confidence=None
    )
    assert calibration.reached and calibration.value > 10 and calibration.recall >= 0.9
    assert dict(calibration.curve)[calibration.value - 1] < 0.9
    # with a confidence bound (the default), the mean recall must clear the target by its standard error
    bounded = calibrate_recall(search_at, truth, parameter="ef", target=0.9, low=10, high=rows.num_rows)
    per_query = [len(set(f) & set(t)) / 10 for f, t in zip(search_at(bounded.value), truth)]
    error = np.std(per_query, ddof=1) / np.sqrt(len(per_query))
    assert bounded.confidence == 0.95 and bounded.value >= calibration.value
    assert bounded.recall_lower_bound == pytest.approx(np.mean(per_query) - 1.6448536 * error, abs=1e-6)
    assert bounded.recall_lower_bound >= 0.9 and bounded.recall > bounded.recall_lower_bound


def test_unreachable_target_is_reported_not_hidden():
    truth = np.arange(20).reshape(2, 10)
    calibration = calibrate_recall(lambda v: truth[:, :5], truth, parameter="nprobe", target=0.9, high=8)
    assert not calibration.reached and calibration.value == 8 and calibration.recall == 0.5
    assert [v for v, _ in calibration.curve] == [1, 2, 4, 8]


def test_calibration_arguments_and_manifest_entries_are_checked():
    truth = np.zeros((1, 10), dtype=np.int64)
    with pytest.raises(ConfigError, match="target"):
        calibrate_recall(lambda v: truth, truth, parameter="ef", target=1.5, high=4)
    with pytest.raises(ConfigError, match="parameter"):
        calibrate_recall(lambda v: truth, truth, parameter="k", high=4)
    good = RecallCalibration("nprobe", 8, 0.96, 0.95, 10, 100, 0.25, 0, True, ((4, 0.9), (8, 0.96))).to_dict()
    assert RecallCalibration.from_dict(good).value == 8
    for key, bad in (("value", 0), ("recall", 1.5), ("parameter", "M"), ("reached", "yes"), ("curve", [[1, 2.0]])):
        with pytest.raises(ValueError, match=key):
            RecallCalibration.from_dict({**good, key: bad})


def test_rescoring_in_query_batches_gives_the_same_results(rows, built, held_out, monkeypatch):
    import diffusers_dmin.faiss_backend as faiss_backend

    _, queries, _, _ = held_out
    expected = built["sq8"].search_rescored(rows, queries, 10)
    monkeypatch.setattr(faiss_backend, "_RESCORE_BYTES", 4 * rows.dim * 100 * 7)  # 7 queries per batch
    positions, scores = built["sq8"].search_rescored(rows, queries, 10)
    np.testing.assert_array_equal(positions, expected[0])
    np.testing.assert_allclose(scores, expected[1], rtol=1e-5, atol=1e-6)  # other BLAS blocking: rounding only
