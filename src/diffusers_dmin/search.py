"""Exact and HNSW search over sketch rows, behind one interface. The only module that imports hnswlib.

Both backends take queries as float32 `(num_queries, dim)` matrices of flattened `(T, K)` sketches and return
`(positions, scores)`: row positions (int64, into the concatenation of the row blocks) and inner products (float32),
best first. `largest=False` returns the most negative inner products first (opponents).

- [`ExactSearch`] multiplies the queries with every row, chunk by chunk, straight from the (memory-mapped) row blocks:
  float16/bfloat16 chunks are widened into a small float32 buffer that stays in cache, products accumulate in float32,
  and a running top-k is merged across chunks and blocks. Rows are ranked by score, and rows with bit-identical
  scores (duplicate training images) by position, lowest first ([`ranking_keys`]): the result does not depend on the
  thread count, and top-k lists of disjoint row sets merge into exactly the top-k of their union (how
  [`~diffusers_dmin.distributed.DistributedSearch`] merges the ranks' results).
- [`HNSWSearch`] wraps an hnswlib graph in inner-product space (`M`, `ef_construction`, `ef`); hnswlib's distance is
  `1 - <a, b>`, which is turned back into the inner product. It can hold folded rows (a divisor of the stored K) to
  keep the graph small; candidates can then be re-scored exactly with [`ExactSearch.score`].
"""

from __future__ import annotations

import contextlib
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .constants import DEFAULT_HNSW_EF, DEFAULT_HNSW_EF_CONSTRUCTION, DEFAULT_HNSW_M
from .errors import (
    ConfigError,
    DMinError,
    IndexCorruptError,
    IndexMismatchError,
    NonFiniteGradientError,
    check_choice,
    check_int,
    require,
)
from .hnsw_file import MAX_M, validate_hnsw_file
from .logging import get_logger, tqdm
from .sketch import fold_sketch
from .storage import TORCH_DTYPES, commit_temp, temp_path


logger = get_logger(__name__)

__all__ = [
    "SearchBackend",
    "ExactSearch",
    "HNSWSearch",
    "rows_as_tensor",
    "prepare_queries",
    "check_search_dim",
    "expand_queries",
    "rescore",
    "ranking_keys",
    "from_ranking_keys",
    "approximate_search",
    "QUERY_FIX",
]

QUERY_FIX = (
    "Compute the queries with the index's spec: a `GradientSketcher` on the same model and adapter, with "
    "`index.config`; or build a new index for this model."
)

# Float32 bytes of one widened chunk: small enough to stay in cache between the cast and the product.
_CHUNK_BYTES = 8 * 2**20
# Rows whose scores are kept before each top-k merge.
_SUPER_ROWS = 2**16
# Multiply-adds below which one more search thread costs more (thread hand-off) than it saves.
_MIN_WORK_PER_THREAD = 2**23
# A ranking key holds the row position in its low 32 bits (see `ranking_keys`).
_POSITION_MASK = 2**32 - 1
MAX_ROWS = _POSITION_MASK


_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of search threads (grown on demand)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < workers:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="dmin-search")
        return _pool


@contextlib.contextmanager
def single_threaded_torch() -> Iterator[None]:
    """Run the current thread's torch ops single-threaded, restoring the setting after.

    Small tensor ops (a few queries) gain nothing from intra-op threads, and on a busy machine every OpenMP region
    can stall until all its threads get a core; the search keeps its own threads instead.
    """
    previous = torch.get_num_threads()
    if previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def rows_as_tensor(block: np.ndarray, dtype: str) -> torch.Tensor:
    r"""
    A zero-copy `(n, T*K)` torch view of an `(n, T, K)` row block in its storage dtype.

    Args:
        block (`np.ndarray` of shape `(n, T, K)`): float16 or float32 values, or uint16 raw bits when
            `dtype="bfloat16"` (numpy has no bfloat16). Must be writeable (memory-map with `mode="c"`).
        dtype (`str`): `"float16"`, `"bfloat16"` or `"float32"`.
    """
    check_choice(dtype, "dtype", tuple(TORCH_DTYPES))
    tensor = torch.from_numpy(block).reshape(len(block), -1)
    if dtype == "bfloat16":
        tensor = tensor.view(torch.bfloat16)
    if tensor.dtype != TORCH_DTYPES[dtype]:
        raise ConfigError(f"A row block of numpy dtype {block.dtype} cannot hold {dtype} values.")
    return tensor


def check_search_dim(search_dim: object, sketch_dim: int) -> int:
    """`search_dim` (a search's `sketch_dim=`) must be a positive divisor of the stored `sketch_dim`; returns it."""
    k = sketch_dim
    if not isinstance(search_dim, int) or isinstance(search_dim, bool) or search_dim < 1 or k % search_dim:
        divisors = [d for d in (k // 16, k // 8, k // 4, k // 2) if d >= 1 and k % d == 0]
        raise ConfigError(
            f"`sketch_dim={search_dim!r}` must be a positive divisor of the stored sketch_dim {k}, e.g. {divisors}."
        )
    return search_dim


def prepare_queries(
    queries: torch.Tensor | np.ndarray, *, num_timesteps: int, sketch_dim: int, search_dim: int | None = None
) -> torch.Tensor:
    r"""
    Check query sketches against an index's shape and fold them to the search dimension.

    Args:
        queries (`torch.Tensor` or `np.ndarray` of shape `(num_queries, T, K_q)`): Float query sketches; `K_q` must be
            a multiple of the search dimension.
        num_timesteps (`int`): The index's T.
        sketch_dim (`int`): The index's stored K.
        search_dim (`int`, *optional*): Search at this divisor of K (both sides folded); defaults to K.

    Returns:
        `torch.Tensor`: float32 `(num_queries, T, search_dim)` on the CPU. Expand it back to K with
        [`expand_queries`] to score it against unfolded rows.

    Raises:
        [`ConfigError`]: Not a float tensor of shape `(q, T, K)`, or no queries.
        [`NonFiniteGradientError`]: A query holds NaN or infinite values.
        [`IndexMismatchError`]: T differs, or `K_q` is not a multiple of the search dimension.
    """
    if isinstance(queries, np.ndarray):
        queries = torch.from_numpy(queries if queries.flags.writeable else queries.copy())
    if not isinstance(queries, torch.Tensor) or not queries.is_floating_point():
        raise ConfigError(
            f"`queries` must be a float torch.Tensor or numpy array of shape (num_queries, T, K), but is "
            f"{type(queries).__name__}{'' if not isinstance(queries, torch.Tensor) else f' of dtype {queries.dtype}'}."
        )
    if queries.ndim != 3:
        raise ConfigError(
            f"`queries` must have shape (num_queries, T, K), but has shape {tuple(queries.shape)}. For a single "
            "(T, K) sketch pass `queries[None]`."
        )
    if len(queries) == 0:
        raise ConfigError(
            f"`queries` holds no sketches (shape {tuple(queries.shape)}); pass at least one (num_queries >= 1)."
        )
    queries = queries.detach().to("cpu", torch.float32)
    finite = torch.isfinite(queries.reshape(len(queries), -1)).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        raise NonFiniteGradientError(f"`queries` {bad} hold NaN or infinite values.", positions=bad)
    _, t, kq = queries.shape
    k = sketch_dim
    if t != num_timesteps:
        raise IndexMismatchError.from_differences({"num_timesteps": (num_timesteps, t)}, what="queries", fix=QUERY_FIX)
    k_search = k if search_dim is None else check_search_dim(search_dim, k)
    if kq < k_search or kq % k_search:
        if search_dim is None and k % kq == 0:
            fix = (
                f"The queries are folded to {kq}, a divisor of the index's {k}: pass `sketch_dim={kq}` to search "
                "at that dimension (the rows are folded too)."
            )
        else:
            fix = f"Compute the queries at sketch_dim={k_search} or a multiple of it (sketches fold exactly)."
        raise IndexMismatchError.from_differences({"config.sketch_dim": (k_search, kq)}, what="queries", fix=fix)
    return fold_sketch(queries, k_search)


def expand_queries(queries: torch.Tensor, sketch_dim: int) -> torch.Tensor:
    r"""
    Repeat each bucket of `(..., k)` folded sketches `sketch_dim // k` times, giving `(..., sketch_dim)`.

    Folding is linear: `<fold(q), fold(r)> = <expand(fold(q)), r>`, so a search at a folded dimension can run on
    the unfolded rows without folding them.
    """
    k = queries.shape[-1]
    if sketch_dim % k:
        raise ConfigError(f"Cannot expand sketches of dimension {k} to {sketch_dim}: {k} does not divide it.")
    return queries if k == sketch_dim else queries.repeat_interleave(sketch_dim // k, dim=-1)


def ranking_keys(scores: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    r"""
    Pack float32 scores and row positions into int64 keys that order rows as exact search ranks them.

    A larger key means a higher score; for bit-identical scores, the lower position. The score's bits sit in the high
    32 bits (remapped so that integer order is float order; +0.0 ranks above -0.0), `MAX_ROWS - position` in the low
    32 bits, so keys are unique and `torch.topk` over them has no ties to break arbitrarily. [`from_ranking_keys`]
    recovers both exactly.

    Args:
        scores (`torch.Tensor`, float32): Scores (finite, or +-inf).
        positions (`torch.Tensor`, int64, the same shape or broadcastable to it): Row positions in `[0, MAX_ROWS)`.

    Returns:
        `torch.Tensor`: int64 keys of the shape of `scores`.
    """
    bits = scores.contiguous().view(torch.int32)
    ordered = bits >> 31  # in place from here on: one pass per step over a tensor of the scores' size
    ordered &= 0x7FFFFFFF
    ordered ^= bits  # negative floats: all but the sign bit flipped
    keys = ordered.to(torch.int64)
    keys <<= 32
    keys |= _POSITION_MASK - positions
    return keys


def from_ranking_keys(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The `(scores, positions)` packed by [`ranking_keys`]: float32 scores (bit for bit) and int64 positions."""
    positions = _POSITION_MASK - (keys & _POSITION_MASK)
    ordered = (keys >> 32).to(torch.int32)
    scores = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(torch.float32)
    return scores, positions


def _top_keys(scores: torch.Tensor, offset: int, k: int) -> torch.Tensor:
    """Ranking keys of the top `k` rows of `(n, num_queries)` scores (row i has position `offset + i`), unsorted."""
    positions = torch.arange(offset, offset + len(scores), dtype=torch.int64)[:, None]
    if k == len(scores):
        return ranking_keys(scores, positions)
    top, rows = torch.topk(scores, k + 1, dim=0)
    keys = ranking_keys(top[:k], rows[:k] + offset)
    tied = torch.nonzero(top[k] >= top[k - 1]).flatten()  # queries whose k-th score ties with the next row's
    if len(tied):  # there the float top-k kept arbitrary tied rows: rank those queries' rows by key instead
        keys[:, tied] = torch.topk(ranking_keys(scores[:, tied], positions), k, dim=0, sorted=False).values
    return keys


def _as_query_matrix(queries: torch.Tensor | np.ndarray, dim: int) -> torch.Tensor:
    tensor = torch.as_tensor(queries)
    if tensor.ndim != 2 or tensor.shape[1] != dim:
        raise ConfigError(f"Queries must have shape (num_queries, {dim}), but have shape {tuple(tensor.shape)}.")
    return tensor.detach().to("cpu", torch.float32).contiguous()


class SearchBackend(ABC):
    r"""
    One search interface: `search(queries, top_k, largest=True) -> (positions, scores)`.

    A backend holds `num_rows` rows of length `dim` (flattened `(T, k)` sketches, k the stored K or a divisor of it)
    and answers float32 `(num_queries, dim)` queries with row positions (int64, into the index's row order) and
    float32 inner products, best first. An exact backend ([`ExactSearch`]; a sharded multi-process one) returns the
    final answer; an approximate one ([`HNSWSearch`]; FAISS) sets `exact = False`, and its results are candidates
    that [`approximate_search`] re-scores exactly with [`rescore`] against an [`ExactSearch`] of the rows.
    """

    #: Whether `search` returns exact inner products over every row (approximate backends return candidates).
    exact: bool = True

    @property
    @abstractmethod
    def num_rows(self) -> int:
        """Number of searchable rows."""

    @property
    @abstractmethod
    def dim(self) -> int:
        """Length of one flattened row (`T * K`)."""

    @abstractmethod
    def search(
        self, queries: torch.Tensor | np.ndarray, top_k: int, *, largest: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        r"""
        Args:
            queries (`torch.Tensor` or `np.ndarray` of shape `(num_queries, dim)`): Flattened query sketches.
            top_k (`int`): Results per query (at most `num_rows`).
            largest (`bool`, *optional*, defaults to `True`): `False` returns the most negative scores first.

        Returns:
            `tuple[np.ndarray, np.ndarray]`: Row positions (int64) and scores (float32), both
            `(num_queries, min(top_k, num_rows))`, best first.
        """


class ExactSearch(SearchBackend):
    r"""
    Exact inner-product search by chunked matrix products over row blocks (e.g. memory-mapped shards).

    Args:
        blocks (`list[np.ndarray]`): Row blocks of shape `(n_i, T, K)` in the storage dtype (see [`rows_as_tensor`]);
            positions count rows across the blocks in order.
        dtype (`str`, *optional*, defaults to `"float16"`): Storage dtype of the blocks.
        chunk_bytes (`int`, *optional*): Float32 bytes of a widened chunk (default 8 MiB, small enough to stay in
            cache between the cast and the product).
        num_threads (`int`, *optional*): Worker threads, each running torch single-threaded on its own run of chunks;
            defaults to `torch.get_num_threads()`. Results do not depend on it: rows with bit-identical scores rank
            by position, lowest first.

    Examples:
    ```py
    >>> import numpy as np
    >>> from diffusers_dmin.search import ExactSearch
    >>> rows = np.random.default_rng(0).standard_normal((100, 2, 8)).astype(np.float16)
    >>> positions, scores = ExactSearch([rows]).search(rows[:3].reshape(3, -1).astype(np.float32), top_k=5)
    >>> positions[:, 0].tolist()
    [0, 1, 2]
    ```
    """

    def __init__(
        self,
        blocks: Sequence[np.ndarray],
        dtype: str = "float16",
        *,
        chunk_bytes: int = _CHUNK_BYTES,
        num_threads: int | None = None,
    ):
        if not blocks:
            raise ConfigError("`ExactSearch` needs at least one row block.")
        shapes = {tuple(block.shape[1:]) for block in blocks}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2:
            raise ConfigError(f"All row blocks must have shape (n, T, K) with the same (T, K); got {sorted(shapes)}.")
        if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
            raise ConfigError(f"`num_threads` must be a positive integer or None, but is {num_threads!r}.")
        if sum(len(block) for block in blocks) > MAX_ROWS:
            raise ConfigError(f"`ExactSearch` ranks at most {MAX_ROWS:,} rows; split the index between processes.")
        self.num_timesteps, self.sketch_dim = next(iter(shapes))
        self.dtype = dtype
        self.num_threads = num_threads
        self._tensors = [rows_as_tensor(block, dtype) for block in blocks]
        self._starts = np.cumsum([0] + [len(t) for t in self._tensors])
        self._dim = self.num_timesteps * self.sketch_dim
        # float32 rows are multiplied in place (no widening), in bigger chunks
        budget = chunk_bytes if dtype != "float32" else 4 * chunk_bytes
        self.chunk_rows = max(1, min(_SUPER_ROWS, budget // (4 * self._dim)))
        # Chunk boundaries are fixed from each block's start, so a row's score never depends on the thread count.
        self._chunk_list = [
            (b, c, min(len(rows), c + self.chunk_rows))
            for b, rows in enumerate(self._tensors)
            for c in range(0, len(rows), self.chunk_rows)
        ]
        self._views = [self._tensors[b][s:e] for b, s, e in self._chunk_list]

    @property
    def num_rows(self) -> int:
        return int(self._starts[-1])

    @property
    def dim(self) -> int:
        return self._dim

    def _groups(self, chunks: Sequence[int]) -> Iterator[list[int]]:
        """Runs of consecutive chunks of one block, at most `_SUPER_ROWS` rows each (one top-k per run)."""
        group: list[int] = []
        rows = 0
        for i in chunks:
            block, start, end = self._chunk_list[i]
            if group and (self._chunk_list[group[-1]][0] != block or rows + end - start > _SUPER_ROWS):
                yield group
                group, rows = [], 0
            group.append(i)
            rows += end - start
        if group:
            yield group

    def _scan(self, chunks: Sequence[int], qt: torch.Tensor, k: int) -> torch.Tensor:
        """Ranking keys of the top `k'` rows per query over `chunks`, `(k', num_queries)` unsorted; torch runs
        single-threaded."""
        num_queries = qt.shape[1]
        widened = None if self.dtype == "float32" else torch.empty((self.chunk_rows, self._dim), dtype=torch.float32)
        best = torch.empty((0, num_queries), dtype=torch.int64)
        with single_threaded_torch(), torch.no_grad():
            for group in self._groups(chunks):
                block, first, _ = self._chunk_list[group[0]]
                last = self._chunk_list[group[-1]][2]
                scores = torch.empty((last - first, num_queries), dtype=torch.float32)
                for i in group:
                    _, s, e = self._chunk_list[i]
                    chunk = self._views[i]
                    if widened is not None:
                        buffer = widened[: e - s]
                        buffer.copy_(chunk)
                        chunk = buffer
                    # a row's float32 score depends on its chunk's shape and alignment (BLAS kernels), which are
                    # fixed by the block: the same row block always gives the same bits
                    torch.mm(chunk, qt, out=scores[s - first : e - first])
                best = torch.cat([best, _top_keys(scores, int(self._starts[block]) + first, min(k, len(scores)))])
                if len(best) > k:
                    best = torch.topk(best, k, dim=0, sorted=False).values
        return best

    def search(
        self, queries: torch.Tensor | np.ndarray, top_k: int, *, largest: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        q = _as_query_matrix(queries, self._dim)
        if not largest:
            q = -q
        k = _check_top_k(top_k, self.num_rows)
        qt = q.T.contiguous()
        work = self.num_rows * self._dim * len(q)
        workers = min(
            self.num_threads or torch.get_num_threads(), len(self._chunk_list), max(1, work // _MIN_WORK_PER_THREAD)
        )
        if workers <= 1:
            parts = [self._scan(range(len(self._chunk_list)), qt, k)]
        else:
            # Contiguous runs of whole chunks per worker thread. Each worker runs torch single-threaded, so busy
            # cores on a shared machine slow the search down gracefully instead of stalling OpenMP barriers.
            bounds = np.linspace(0, len(self._chunk_list), workers + 1).astype(int)
            groups = [range(bounds[i], bounds[i + 1]) for i in range(workers)]
            futures = [_thread_pool(workers - 1).submit(self._scan, group, qt, k) for group in groups[1:]]
            parts = [self._scan(groups[0], qt, k)] + [future.result() for future in futures]
        best_scores, best_positions = from_ranking_keys(torch.topk(torch.cat(parts), k, dim=0).values)
        if not largest:
            best_scores = -best_scores
        return best_positions.T.contiguous().numpy(), best_scores.T.contiguous().numpy()

    def gather(self, positions: np.ndarray | Sequence[int]) -> torch.Tensor:
        """Rows at `positions` as a float32 `(m, T*K)` tensor, in the given order."""
        positions = np.asarray(positions, dtype=np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= self.num_rows):
            raise ConfigError(
                f"Row positions must lie in [0, {self.num_rows}), got {positions.min()}..{positions.max()}."
            )
        out = torch.empty((len(positions), self._dim), dtype=torch.float32)
        block_of = np.searchsorted(self._starts, positions, side="right") - 1
        for b in np.unique(block_of):
            where = np.nonzero(block_of == b)[0]
            local = torch.from_numpy(positions[where] - self._starts[b])
            out[torch.from_numpy(where)] = self._tensors[b].index_select(0, local).float()
        return out

    def score(self, queries: torch.Tensor | np.ndarray, positions: np.ndarray) -> np.ndarray:
        r"""
        Exact scores of the rows at `positions` for each query.

        Args:
            queries (`torch.Tensor` of shape `(num_queries, dim)`): Flattened queries.
            positions (`np.ndarray` of shape `(num_queries, m)`): Row positions per query.

        Returns:
            `np.ndarray` of shape `(num_queries, m)`: float32 inner products.
        """
        q = _as_query_matrix(queries, self._dim)
        positions = np.asarray(positions, dtype=np.int64)
        unique, inverse = np.unique(positions, return_inverse=True)
        with torch.no_grad():
            table = torch.mm(q, self.gather(unique).T)  # (num_queries, len(unique))
        inverse = torch.from_numpy(inverse.reshape(positions.shape))
        return torch.gather(table, 1, inverse).numpy()

    def iter_rows(self, start: int = 0, *, batch_rows: int = 4096, sketch_dim: int | None = None) -> Iterator:
        r"""
        Yield `(position, rows)` for consecutive batches from row `start` on: float32 `(b, T*k)` rows, folded to
        `sketch_dim` buckets per timestep when given (see [`fold_sketch`]).
        """
        k = sketch_dim or self.sketch_dim
        for block_start, rows in zip(self._starts, self._tensors):
            block_end = block_start + len(rows)
            for s in range(max(start, int(block_start)), int(block_end), batch_rows):
                e = min(int(block_end), s + batch_rows)
                batch = rows[s - block_start : e - block_start].float()
                if k != self.sketch_dim:
                    batch = fold_sketch(batch.reshape(e - s, self.num_timesteps, self.sketch_dim), k)
                yield s, batch.reshape(e - s, -1).contiguous()


class IdPositions:
    """Row positions of sample ids: `ids` sorted once, then looked up by binary search."""

    def __init__(self, ids: np.ndarray):
        self.ids = ids
        self.order = np.argsort(ids, kind="stable")
        self.sorted = ids[self.order]

    def __call__(self, sample_ids: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        """The positions of `sample_ids` (any integer array-like); [`ConfigError`] names the ids that are absent."""
        if isinstance(sample_ids, torch.Tensor):
            sample_ids = sample_ids.cpu().numpy()
        wanted = np.asarray(sample_ids, dtype=np.int64).reshape(-1)
        slots = np.searchsorted(self.sorted, wanted)
        slots = np.minimum(slots, len(self.sorted) - 1) if len(self.sorted) else slots
        if not len(self.sorted) or np.any(self.sorted[slots] != wanted):
            missing = wanted[~np.isin(wanted, self.ids)]
            raise ConfigError(f"The sample ids {missing[:10].tolist()} are not in the index.")
        return self.order[slots]


def _check_top_k(top_k: int, num_rows: int) -> int:
    check_int(top_k, "top_k")
    if num_rows < 1:
        raise ConfigError("The index holds no rows; add sketches with `index.add(...)` before searching.")
    return int(min(top_k, num_rows))


class HNSWSearch(SearchBackend):
    r"""
    Approximate inner-product search with an hnswlib graph whose labels are row positions.

    Args:
        dim (`int`): Length of a flattened row in the graph (`T * k`, with k the stored K or a divisor of it).
        max_elements (`int`): Capacity; grown automatically by [`add`].
        M (`int`, *optional*, defaults to 16): Graph degree.
        ef_construction (`int`, *optional*, defaults to 200): Candidate list size while building.
        ef (`int`, *optional*, defaults to 100): Candidate list size while searching (raised to `top_k` when
            smaller); not stored by hnswlib, so it is set again after loading.
        num_threads (`int`, *optional*, defaults to -1): Threads for building and batched queries (-1: all cores).
            Builds with more than one thread are not bit-for-bit reproducible.
        seed (`int`, *optional*, defaults to 0): hnswlib's random seed for the level assignment.

    Examples:
    ```py
    >>> import numpy as np
    >>> from diffusers_dmin.search import HNSWSearch
    >>> rows = np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32)
    >>> hnsw = HNSWSearch(16, max_elements=1000)
    >>> hnsw.add(rows, np.arange(1000))
    >>> hnsw.search(rows[:1], top_k=3)[0].shape
    (1, 3)
    ```
    """

    exact = False

    def __init__(
        self,
        dim: int,
        *,
        max_elements: int,
        M: int = DEFAULT_HNSW_M,
        ef_construction: int = DEFAULT_HNSW_EF_CONSTRUCTION,
        ef: int = DEFAULT_HNSW_EF,
        num_threads: int = -1,
        seed: int = 0,
        _load_from: str | os.PathLike | None = None,
    ):
        hnswlib = require("hnswlib", "Approximate search (`exact=False`)", "pip install hnswlib")
        for name, value, minimum in (("M", M, 2), ("ef_construction", ef_construction, 1), ("ef", ef, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ConfigError(f"`{name}` must be an integer >= {minimum}, but is {value!r}.")
        if M > MAX_M:
            raise ConfigError(f"`M` must be at most {MAX_M} (hnswlib stores 2 M in 16 bits), but is {M}.")
        self._index = hnswlib.Index(space="ip", dim=int(dim))
        if _load_from is not None:
            try:
                self._index.load_index(str(_load_from), max_elements=max(1, int(max_elements)))
            except (RuntimeError, ValueError, MemoryError) as err:
                raise IndexCorruptError(
                    f"hnswlib could not read {_load_from} ({err}). Delete the file to rebuild the graph, or "
                    "re-download the index with `force_download=True`."
                ) from err
        else:
            self._index.init_index(
                max_elements=max(1, int(max_elements)), M=M, ef_construction=ef_construction, random_seed=seed
            )
        self._index.set_num_threads((os.cpu_count() or 1) if num_threads == -1 else num_threads)
        self.ef = ef

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        dim: int,
        *,
        max_elements: int,
        ef: int = DEFAULT_HNSW_EF,
        num_threads: int = -1,
        num_rows: int | None = None,
        M: int | None = None,
        ef_construction: int | None = None,
    ) -> HNSWSearch:
        r"""
        Load a graph saved by [`save`] after validating the whole file.

        hnswlib trusts its input (a crafted file makes it read and write out of bounds), so the file is first checked
        with [`~diffusers_dmin.hnsw_file.validate_hnsw_file`] against `dim` and, when given, the expected row count,
        `M` and `ef_construction` (pass the manifest's values). Verify the file's sha256 too.

        Raises:
            [`IndexCorruptError`]: The file fails a check, or hnswlib cannot read it.
        """
        header = validate_hnsw_file(path, dim=int(dim), num_rows=num_rows, M=M, ef_construction=ef_construction)
        # hnswlib allocates max(max_elements, cur_element_count) rows; never let the file's own count decide
        max_elements = max(int(max_elements), header.cur_element_count, 1)
        return cls(dim, max_elements=max_elements, M=header.M_, ef=ef, num_threads=num_threads, _load_from=path)

    @property
    def num_rows(self) -> int:
        return int(self._index.element_count)

    @property
    def dim(self) -> int:
        return int(self._index.dim)

    @property
    def M(self) -> int:
        return int(self._index.M)

    @property
    def ef_construction(self) -> int:
        return int(self._index.ef_construction)

    def add(self, vectors: torch.Tensor | np.ndarray, positions: np.ndarray) -> None:
        """Insert float32 `(n, dim)` rows with their row positions as labels (growing the capacity as needed)."""
        vectors = _as_query_matrix(vectors, self.dim).numpy()
        needed = self.num_rows + len(vectors)
        if needed > self._index.max_elements:
            self._index.resize_index(max(needed, int(self._index.max_elements * 1.5)))
        self._index.add_items(vectors, np.asarray(positions, dtype=np.int64))

    def add_rows(
        self, rows: ExactSearch, *, start: int | None = None, batch_rows: int = 4096, progress: bool = True
    ) -> None:
        """Insert the rows `start ..` (default: those not in the graph yet) of `rows`, folded to the graph's K."""
        start = self.num_rows if start is None else start
        total = rows.num_rows - start
        if total <= 0:
            return
        sketch_dim = self.dim // rows.num_timesteps
        if sketch_dim * rows.num_timesteps != self.dim or rows.sketch_dim % sketch_dim:
            raise ConfigError(
                f"The HNSW graph has dimension {self.dim}, which is not T={rows.num_timesteps} times a divisor of the "
                f"stored sketch_dim {rows.sketch_dim}."
            )
        self.resize(rows.num_rows)
        with tqdm(total=total, desc="Building HNSW graph", unit="rows", disable=not progress) as bar:
            for position, batch in rows.iter_rows(start, batch_rows=batch_rows, sketch_dim=sketch_dim):
                self._index.add_items(batch.numpy(), np.arange(position, position + len(batch), dtype=np.int64))
                bar.update(len(batch))

    def resize(self, max_elements: int) -> None:
        if max_elements > self._index.max_elements:
            self._index.resize_index(int(max_elements))

    def search(
        self, queries: torch.Tensor | np.ndarray, top_k: int, *, largest: bool = True
    ) -> tuple[np.ndarray, np.ndarray]:
        q = _as_query_matrix(queries, self.dim).numpy()
        if not largest:
            q = -q
        k = _check_top_k(top_k, self.num_rows)
        self._index.set_ef(max(self.ef, k))
        try:
            try:
                labels, distances = self._index.knn_query(q, k=k)
            except RuntimeError:
                if self.num_rows > 4096 or max(self.ef, k) >= self.num_rows:
                    raise
                # few rows (k close to all of them): explore the whole graph before giving up
                self._index.set_ef(max(self.ef, k, self.num_rows))
                labels, distances = self._index.knn_query(q, k=k)
        except RuntimeError as err:
            raise DMinError(
                f"hnswlib could not return {k} neighbours ({err}); raise `ef` or search with `exact=True`."
            ) from err
        scores = (1.0 - distances).astype(np.float32)  # hnswlib "ip" distance is 1 - <a, b>
        if not largest:
            scores = -scores
        return labels.astype(np.int64), scores

    def save(self, path: str | os.PathLike, *, atomic: bool = True) -> None:
        """Save the graph; atomically (temp file in the same folder, fsync, rename) unless `atomic=False`.

        hnswlib does not report write errors (a full disk gives a truncated file): callers that keep the file should
        check it with [`~diffusers_dmin.hnsw_file.validate_hnsw_file`] before trusting it, as `GradientIndex` does.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # the file records the capacity; store the exact row count (what a validated file must hold)
        if self._index.max_elements != max(1, self.num_rows):
            self._index.resize_index(max(1, self.num_rows))
        if not atomic:
            self._index.save_index(str(path))
            return
        tmp = temp_path(path)  # the one atomic-write protocol (storage): temp file, fsync, rename, fsync folder
        try:
            self._index.save_index(str(tmp))
            commit_temp(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def rescore(
    exact: ExactSearch,
    queries: torch.Tensor | np.ndarray,
    candidates: np.ndarray,
    top_k: int,
    *,
    largest: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    r"""
    Re-score candidate rows exactly and keep the best `top_k` per query.

    Args:
        exact (`ExactSearch`): The rows.
        queries (`torch.Tensor` of shape `(num_queries, exact.dim)`): Flattened queries at the rows' dimension.
        candidates (`np.ndarray` of shape `(num_queries, m)`): Candidate positions, e.g. from [`HNSWSearch`].
        top_k (`int`): Results per query (at most `m`).
        largest (`bool`, *optional*, defaults to `True`): `False` keeps the most negative scores.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: Positions and exact scores, `(num_queries, min(top_k, m))`, best first.
    """
    scores = torch.from_numpy(exact.score(queries, candidates))
    k = min(int(top_k), candidates.shape[1])
    best, order = torch.topk(scores if largest else -scores, k, dim=1)
    positions = np.take_along_axis(candidates, order.numpy(), axis=1)
    return positions, (best if largest else -best).numpy()


def approximate_search(
    backend: SearchBackend,
    rows: ExactSearch,
    queries: torch.Tensor,
    top_k: int,
    *,
    largest: bool = True,
    rescore_candidates: bool = True,
    num_candidates: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    r"""
    Search an approximate backend and (by default) re-score its candidates exactly.

    Args:
        backend (`SearchBackend`): An approximate backend (e.g. [`HNSWSearch`]) over the rows folded to
            `backend.dim // T`, a divisor of the search dimension.
        rows (`ExactSearch`): The stored rows (for the exact re-scoring).
        queries (`torch.Tensor` of shape `(num_queries, T, k_search)`): Queries folded to the search dimension
            ([`prepare_queries`]).
        top_k (`int`): Results per query.
        largest (`bool`, *optional*, defaults to `True`): `False` returns the most negative scores first.
        rescore_candidates (`bool`, *optional*, defaults to `True`): Re-score `max(top_k, num_candidates)`
            candidates exactly at the search dimension; `False` returns the backend's own scores (its dimension must
            then equal the search dimension).
        num_candidates (`int`, *optional*): Candidates to re-score (HNSW: its `ef`); defaults to `top_k`.

    Returns:
        `tuple[np.ndarray, np.ndarray]`: Positions and scores, `(num_queries, top_k)`, best first.
    """
    num_queries, num_timesteps, k_search = queries.shape
    k_graph = backend.dim // num_timesteps
    if k_search % k_graph:
        raise ConfigError(
            f"The HNSW graph holds sketches folded to {k_graph}, which cannot serve a search at sketch_dim="
            f"{k_search}. Use `exact=True`, or rebuild it with `index.build_hnsw(sketch_dim={k_search})`."
        )
    if not rescore_candidates and k_graph != k_search:
        raise ConfigError(
            f"`rescore=False` returns the graph's scores, computed at sketch_dim={k_graph}, but the search is at "
            f"sketch_dim={k_search}. Pass `sketch_dim={k_graph}` or `rescore=True`."
        )
    with single_threaded_torch():
        backend_queries = fold_sketch(queries, k_graph).reshape(num_queries, -1)
        if not rescore_candidates:
            return backend.search(backend_queries, top_k, largest=largest)
        candidates, _ = backend.search(backend_queries, max(int(top_k), num_candidates or 0), largest=largest)
        full = expand_queries(queries, rows.sketch_dim).reshape(num_queries, -1)
        return rescore(rows, full, candidates, top_k, largest=largest)
