"""Search backends: exact chunked search against numpy brute force, HNSW recall and scores (search.py)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from diffusers_dmin.errors import ConfigError
from diffusers_dmin.search import ExactSearch, HNSWSearch, expand_queries, from_ranking_keys, ranking_keys, rescore
from diffusers_dmin.sketch import fold_sketch


def _unit_rows(n, t, k, seed):
    x = np.random.default_rng(seed).standard_normal((n, t, k)).astype(np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _brute_force(rows32, queries, top_k, largest=True):
    scores = queries.reshape(len(queries), -1).astype(np.float64) @ rows32.reshape(len(rows32), -1).T.astype(
        np.float64
    )
    order = np.argsort(-scores if largest else scores, axis=1, kind="stable")[:, :top_k]
    return order, np.take_along_axis(scores, order, axis=1)


def _storage(rows, dtype):
    if dtype == "bfloat16":
        bits = torch.from_numpy(rows).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
        return bits, torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    stored = rows.astype(dtype)
    return stored, stored.astype(np.float32)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("largest", [True, False])
def test_exact_search_equals_numpy_brute_force(dtype, largest):
    rows = _unit_rows(1000, 3, 40, seed=0)
    stored, rows32 = _storage(rows, dtype)
    blocks = [stored[:350], stored[350:351], stored[351:]]  # uneven blocks, one of a single row
    search = ExactSearch(blocks, dtype, chunk_bytes=4 * 120 * 37)  # 37 rows per chunk: many chunk boundaries
    queries = _unit_rows(7, 3, 40, seed=1).reshape(7, -1)
    positions, scores = search.search(torch.from_numpy(queries), top_k=25, largest=largest)
    expected_positions, expected_scores = _brute_force(rows32, queries, 25, largest)
    np.testing.assert_array_equal(positions, expected_positions)
    np.testing.assert_allclose(scores, expected_scores, rtol=1e-5, atol=1e-5)
    assert positions.dtype == np.int64 and scores.dtype == np.float32
    assert np.all(np.diff(scores, axis=1) <= 0) if largest else np.all(np.diff(scores, axis=1) >= 0)


def test_exact_search_does_not_depend_on_the_thread_count():
    rows = _unit_rows(3000, 2, 32, seed=11).astype(np.float16)
    queries = _unit_rows(5, 2, 32, seed=12).reshape(5, -1)
    results = [
        ExactSearch([rows[:1000], rows[1000:]], "float16", chunk_bytes=4 * 64 * 50, num_threads=n).search(queries, 20)
        for n in (1, 2, 3)
    ]
    for positions, scores in results[1:]:
        np.testing.assert_array_equal(positions, results[0][0])
        np.testing.assert_array_equal(scores, results[0][1])
    assert torch.get_num_threads() >= 1


def test_exact_search_top_k_larger_than_rows_and_validation():
    rows = _unit_rows(5, 1, 8, seed=0)
    search = ExactSearch([rows], "float32")
    positions, _ = search.search(rows.reshape(5, -1), top_k=50)
    assert positions.shape == (5, 5)
    np.testing.assert_array_equal(positions[:, 0], np.arange(5))
    with pytest.raises(ConfigError, match="top_k"):
        search.search(rows.reshape(5, -1), top_k=0)
    with pytest.raises(ConfigError, match=r"\(num_queries, 8\)"):
        search.search(rows, top_k=1)


def test_gather_and_score():
    rows = _unit_rows(50, 2, 16, seed=3).astype(np.float16)
    search = ExactSearch([rows[:20], rows[20:]], "float16")
    gathered = search.gather([49, 0, 20, 19])
    np.testing.assert_array_equal(gathered.numpy(), rows[[49, 0, 20, 19]].reshape(4, -1).astype(np.float32))
    queries = torch.from_numpy(_unit_rows(2, 2, 16, seed=4).reshape(2, -1))
    candidates = np.array([[3, 30, 7], [49, 0, 3]])
    expected = np.einsum("qd,qmd->qm", queries.numpy(), rows[candidates].reshape(2, 3, -1).astype(np.float32))
    np.testing.assert_allclose(search.score(queries, candidates), expected, rtol=1e-6, atol=1e-6)
    positions, scores = rescore(search, queries, candidates, top_k=2)
    order = np.argsort(-expected, axis=1)[:, :2]
    np.testing.assert_array_equal(positions, np.take_along_axis(candidates, order, axis=1))


def test_folded_search_by_query_expansion_equals_folding_both_sides():
    rows = torch.from_numpy(_unit_rows(200, 2, 64, seed=5))
    queries = torch.from_numpy(_unit_rows(3, 2, 64, seed=6))
    folded_rows, folded_queries = fold_sketch(rows, 16), fold_sketch(queries, 16)
    expected = folded_queries.reshape(3, -1) @ folded_rows.reshape(200, -1).T
    expanded = expand_queries(folded_queries, 64).reshape(3, -1)
    torch.testing.assert_close(expanded @ rows.reshape(200, -1).T, expected, rtol=1e-5, atol=1e-5)
    positions, scores = ExactSearch([rows.numpy()], "float32").search(expanded, top_k=10)
    np.testing.assert_array_equal(positions, torch.topk(expected, 10).indices.numpy())
    # iter_rows folds rows the way fold_sketch does (used to build folded HNSW graphs)
    start, batch = next(ExactSearch([rows.numpy()], "float32").iter_rows(0, batch_rows=7, sketch_dim=16))
    torch.testing.assert_close(batch, folded_rows[:7].reshape(7, -1))


@pytest.mark.parametrize(
    "dim, ef, minimum",
    [
        # At the paper's defaults (M=16, ef_construction=200, ef=100) recall on i.i.d. random vectors falls with
        # the dimension (about 0.98 at 32-d, 0.84 at 64-d on 20k rows): random data has no neighbourhood structure.
        (32, 100, 0.95),
        # `ef` is the knob: at 64-d, ef=400 recovers it.
        (64, 400, 0.95),
    ],
)
def test_hnsw_recall_at_10_against_exact_on_20k_random_vectors(dim, ef, minimum):
    rows = _unit_rows(20_000, 1, dim, seed=0).reshape(20_000, dim)
    queries = _unit_rows(200, 1, dim, seed=1).reshape(200, dim)
    start = time.perf_counter()
    hnsw = HNSWSearch(dim, max_elements=len(rows), ef=ef)
    hnsw.add(rows, np.arange(len(rows)))
    build_s = time.perf_counter() - start
    positions, scores = hnsw.search(queries, top_k=10)
    exact_positions, _ = ExactSearch([rows[:, None, :]], "float32").search(queries, top_k=10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(positions, exact_positions)])
    assert recall >= minimum, f"recall@10 = {recall:.3f} (build {build_s:.1f} s)"
    # hnswlib's "ip" distance is 1 - <a, b>: scores are turned back into inner products, best first
    expected = np.einsum("qd,qkd->qk", queries, rows[positions])
    np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_hnsw_opponents_save_and_load(tmp_path):
    rows = _unit_rows(2000, 2, 16, seed=7).reshape(2000, -1)
    exact = ExactSearch([rows.reshape(2000, 2, 16)], "float32")
    hnsw = HNSWSearch(32, max_elements=10, num_threads=1)  # grows on add
    hnsw.add_rows(exact, progress=False)
    assert hnsw.num_rows == 2000 and (hnsw.M, hnsw.ef_construction, hnsw.ef) == (16, 200, 100)
    queries = _unit_rows(5, 2, 16, seed=8).reshape(5, -1)
    positions, scores = hnsw.search(queries, top_k=10, largest=False)
    exact_positions, exact_scores = exact.search(queries, top_k=10, largest=False)
    assert np.all(np.diff(scores, axis=1) >= -1e-6)  # most negative first
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(positions, exact_positions)]) >= 0.9
    assert np.all(scores[:, 0] < 0)

    hnsw.save(tmp_path / "hnsw.bin")
    loaded = HNSWSearch.load(tmp_path / "hnsw.bin", 32, max_elements=2000, ef=100)
    assert loaded.ef == 100 and loaded.num_rows == 2000
    again, again_scores = loaded.search(queries, top_k=10, largest=False)
    np.testing.assert_array_equal(again, positions)
    np.testing.assert_array_equal(again_scores, scores)


def test_ranking_keys_round_trip_and_order_scores_then_lower_position():
    scores = torch.tensor(
        [1.5, -0.0, 0.0, -2.25, float("inf"), -float("inf"), 1.5, 3e-41, -3e-41], dtype=torch.float32
    )
    positions = torch.tensor([7, 1, 2, 0, 4, 5, 3, 8, 9], dtype=torch.int64)
    keys = ranking_keys(scores, positions)
    back_scores, back_positions = from_ranking_keys(keys)
    assert torch.equal(back_positions, positions)
    assert torch.equal(back_scores.view(torch.int32), scores.view(torch.int32))  # bit for bit (signed zeros too)
    order = torch.argsort(keys, descending=True).tolist()
    # inf, the two 1.5 (position 3 before 7), subnormal, +0, -0, -subnormal, -2.25, -inf
    assert positions[order].tolist() == [4, 3, 7, 8, 2, 1, 9, 0, 5]


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_exactly_tied_rows_rank_by_position_whatever_the_threads_and_chunks(dtype):
    # small integers: every product and sum is exact, so equal rows give bit-identical scores in any chunk
    rng = np.random.default_rng(5)
    distinct = rng.integers(-2, 3, size=(6, 2, 8)).astype(dtype)
    rows = distinct[rng.integers(0, 6, size=500)]  # ~80 copies of each of 6 rows
    queries = rng.integers(-2, 3, size=(4, 16)).astype(np.float32)
    scores = queries @ rows.reshape(500, -1).astype(np.float32).T
    expected = np.stack([np.lexsort((np.arange(500), -row))[:150] for row in scores])  # by score, then position
    for threads, chunk_rows, split in ((1, 1000, 500), (2, 7, 250), (3, 33, 1), (2, 64, 499)):
        search = ExactSearch([rows[:split], rows[split:]] if split < 500 else [rows], dtype,
                             chunk_bytes=4 * 16 * chunk_rows, num_threads=threads)  # fmt: skip
        positions, found = search.search(queries, top_k=150)
        np.testing.assert_array_equal(positions, expected)
        np.testing.assert_array_equal(found, np.take_along_axis(scores, expected, axis=1))


def test_ties_in_some_queries_only_rank_by_position_and_the_others_by_score():
    # 500 distinct rows: the base-5 digits of the row number (minus 2). Query 0 reads the first digit (100 rows per
    # value: ties across the top-150 cut); query 1 reads the whole number (no ties). All arithmetic is exact.
    digits = np.stack([(np.arange(500) // 5**d) % 5 - 2 for d in range(4)], axis=1).astype(np.float32)
    rows = np.zeros((500, 2, 8), dtype=np.float32)
    rows[:, 0, :4] = digits
    rows = rows[np.random.default_rng(0).permutation(500)]
    queries = np.zeros((2, 16), dtype=np.float32)
    queries[0, 0] = 1.0
    queries[1, :4] = [1, 5, 25, 125]
    scores = queries @ rows.reshape(500, -1).T
    expected = np.stack([np.lexsort((np.arange(500), -row))[:150] for row in scores])
    for threads, chunk_rows in ((1, 1000), (2, 7), (3, 61)):
        search = ExactSearch([rows[:123], rows[123:]], "float32", chunk_bytes=4 * 16 * chunk_rows, num_threads=threads)
        positions, found = search.search(queries, top_k=150)
        np.testing.assert_array_equal(positions, expected)
        np.testing.assert_array_equal(found, np.take_along_axis(scores, expected, axis=1))
