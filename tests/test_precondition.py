"""QueryPreconditioner: the damped inverse against a direct solve, centring, and the file's checks."""

import json
import struct

import pytest
import torch

from diffusers_dmin.errors import ConfigError, IndexCorruptError
from diffusers_dmin.precondition import QueryPreconditioner


def _rows(n=40, t=2, k=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, t, k, generator=generator) + 0.5


@pytest.mark.parametrize("center", [False, True])
def test_fit_matches_direct_solve_and_streams(center):
    x = _rows()
    pre = QueryPreconditioner.fit([x[:15], x[15:]], damping=0.1, center=center)
    q = _rows(3, seed=1)
    x64, q64 = x.double(), q.double()
    mu = x64.mean(0)
    expected = []
    for t in range(2):
        xt = x64[:, t] - mu[t] if center else x64[:, t]
        sigma = xt.T @ xt / len(x)
        lam = 0.1 * sigma.trace() / 8
        qt = q64[:, t] - mu[t] if center else q64[:, t]
        expected.append(torch.linalg.solve(sigma + lam * torch.eye(8, dtype=torch.float64), qt.T).T)
    torch.testing.assert_close(pre.apply(q).double(), torch.stack(expected, 1), rtol=1e-4, atol=1e-5)
    assert pre.num_rows == 40 and pre.centered == center
    # scores of the preconditioned query against uncentred rows rank like fully centred scores
    if center:
        full = torch.einsum("qtk,ntk->qn", pre.apply(q).double(), x64 - mu)
        half = torch.einsum("qtk,ntk->qn", pre.apply(q).double(), x64)
        torch.testing.assert_close(full - full[:, :1], half - half[:, :1], rtol=1e-6, atol=1e-8)


def test_large_damping_tends_to_plain_scores():
    x, q = _rows(), _rows(3, seed=1)
    pre = QueryPreconditioner.fit([x], damping=1e6)
    scale = pre.lambdas[0].item()
    torch.testing.assert_close(pre.apply(q)[:, 0] * scale, q[:, 0], rtol=1e-3, atol=1e-4)


def test_validation():
    with pytest.raises(ConfigError, match="damping"):
        QueryPreconditioner.fit([_rows()], damping=0)
    with pytest.raises(ConfigError, match="empty"):
        QueryPreconditioner.fit([], damping=0.1)
    pre = QueryPreconditioner.fit([_rows()], damping=0.1)
    with pytest.raises(ConfigError, match="do not match"):
        pre.apply(torch.zeros(1, 2, 4))


def test_file_round_trip_and_corruption(tmp_path):
    pre = QueryPreconditioner.fit([_rows()], damping=0.1, center=True)
    path = pre.save(tmp_path / "p.safetensors")
    back = QueryPreconditioner.load(path, num_timesteps=2, sketch_dim=8)
    torch.testing.assert_close(back.inverse, pre.inverse)
    torch.testing.assert_close(back.mean, pre.mean)
    assert back.damping == 0.1 and back.num_rows == 40
    with pytest.raises(IndexCorruptError, match="expected F32"):
        QueryPreconditioner.load(path, num_timesteps=2, sketch_dim=4)
    # a header that claims more data than the file holds is refused before safetensors parses it
    data = path.read_bytes()
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    header["inverse"]["data_offsets"][1] += 4
    text = json.dumps(header).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + length :])
    with pytest.raises(IndexCorruptError, match="data offsets"):
        QueryPreconditioner.load(bad, num_timesteps=2, sketch_dim=8)
    # non-finite values
    nan = QueryPreconditioner(pre.inverse * float("nan"), None, pre.lambdas, 0.1, 40)
    nan.save(tmp_path / "nan.safetensors")
    with pytest.raises(IndexCorruptError, match="NaN"):
        QueryPreconditioner.load(tmp_path / "nan.safetensors", num_timesteps=2, sketch_dim=8)


# ---------------------------------------------------------------------------------------------- in the index


def _index(n=30, t=2, k=16):
    import numpy as np

    from diffusers_dmin import DMinConfig, GradientIndex

    rows = _rows(n, t, k)
    return GradientIndex.from_sketches(
        rows, ids=np.arange(100, 100 + n), config=DMinConfig(num_timesteps=t, sketch_dim=k, dtype="float32")
    ), rows


def test_index_search_with_preconditioner_matches_manual_scores():
    index, rows = _index()
    queries = _rows(4, 2, 16, seed=3)
    pre = index.fit_preconditioner(damping=0.5, center=True)
    expected = torch.einsum("qtk,ntk->qn", pre.apply(queries), rows)
    results = index.search(queries, top_k=5, precondition=True)
    for q, result in enumerate(results):
        top = torch.topk(expected[q], 5)
        assert list(result.sample_ids) == [100 + int(i) for i in top.indices]
        torch.testing.assert_close(torch.from_numpy(result.scores), top.values, rtol=1e-4, atol=1e-4)
    # plain search is unchanged, and HNSW with re-scoring gives the same preconditioned ranking
    plain = index.search(queries, top_k=5)
    assert [list(r.sample_ids) for r in plain] != [list(r.sample_ids) for r in results]
    index.build_hnsw(M=8, ef_construction=50, num_threads=1)
    approx = index.search(queries, top_k=5, exact=False, precondition=True, ef=12)  # < 30 rows: the graph runs
    overlap = [len(set(a.sample_ids) & set(b.sample_ids)) for a, b in zip(approx, results)]
    assert sum(overlap) >= 0.8 * 5 * len(queries)  # approximate, but over the preconditioned query
    for q, result in enumerate(approx):  # re-scored exactly with the preconditioned query
        expected_scores = expected[q, torch.as_tensor(result.sample_ids.astype("int64") - 100)]
        torch.testing.assert_close(torch.from_numpy(result.scores), expected_scores, rtol=1e-4, atol=1e-4)


def test_folded_preconditioner_and_errors():
    index, rows = _index()
    queries = _rows(2, 2, 16, seed=4)
    with pytest.raises(ConfigError, match="fit_preconditioner"):
        index.search(queries, precondition=True)
    index.fit_preconditioner(damping=1.0, sketch_dim=8)
    with pytest.raises(ConfigError, match="sketch_dim=8"):
        index.search(queries, precondition=True)
    from diffusers_dmin.sketch import fold_sketch

    expected = torch.einsum("qtk,ntk->qn", index.preconditioner.apply(fold_sketch(queries, 8)), fold_sketch(rows, 8))
    found = index.search(queries, top_k=3, sketch_dim=8, precondition=True)
    assert [int(i) - 100 for i in found[0].sample_ids] == torch.topk(expected[0], 3).indices.tolist()
    # new rows make the fitted preconditioner stale: it is dropped
    index.add(_rows(2, 2, 16, seed=9), ids=[1, 2])
    assert index.preconditioner is None


def test_saved_with_the_index_and_old_indices_load(tmp_path):
    from diffusers_dmin import GradientIndex
    from diffusers_dmin.storage import read_manifest

    index, _ = _index()
    index.save_pretrained(tmp_path / "old")
    assert "preconditioner" not in (tmp_path / "old" / "dmin_index.json").read_text()  # unchanged manifests
    assert GradientIndex.from_pretrained(tmp_path / "old").preconditioner is None

    pre = index.fit_preconditioner(damping=0.5)
    index.save_pretrained(tmp_path / "new")
    manifest = read_manifest(tmp_path / "new")
    assert manifest.preconditioner.name == "preconditioner.safetensors" and manifest.preconditioner.shape == (2, 16)
    queries = _rows(3, 2, 16, seed=5)
    loaded = GradientIndex.from_pretrained(tmp_path / "new")
    torch.testing.assert_close(loaded.preconditioner.inverse, pre.inverse)
    a = loaded.search(queries, top_k=4, precondition=True)
    b = index.search(queries, top_k=4, precondition=True)
    assert [list(r.sample_ids) for r in a] == [list(r.sample_ids) for r in b]
    # saving the loaded index elsewhere carries the file along
    loaded.save_pretrained(tmp_path / "copy")
    assert read_manifest(tmp_path / "copy").preconditioner.sha256 == manifest.preconditioner.sha256

    # a tampered file fails its sha256 check before it is parsed
    path = tmp_path / "new" / "preconditioner.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError):
        GradientIndex.from_pretrained(tmp_path / "new").search(queries, precondition=True)
