"""FAISS IVF search over folded sketches, re-scored exactly from the shards. The only module that imports faiss.

Two stages:

1. **Coarse**: an inverted-file index (IVF, `nlist` k-means lists, inner-product metric) over the rows *folded* to
   `sketch_dim` buckets per timestep (T * `sketch_dim` dims, e.g. 10 x 64 = 640 for the paper's 10 x 4,096, far
   below vector engines' limits such as Milvus's 32,768), with compressed codes: product quantisation (`"pq"`,
   `pq_m` bytes per row) or scalar quantisation (`"sq8"`: one byte per dim, `"sq4"`: half a byte). A query probes
   the `nprobe` nearest lists and returns `num_candidates` candidate rows.
2. **Exact**: the candidates are re-scored at full K from the (memory-mapped) shards with
   [`~diffusers_dmin.search.ExactSearch.score`], so every returned score is the exact inner product.

Persisting: FAISS's own file format is parsed by C++ code that trusts its input, so it is never used. What we train
is written by us as safetensors (`"centroids"`, `"pq_centroids"` or `"sq_trained"`, `"list_offsets"`, `"ids"`,
`"codes"`); [`FaissIVFSearch.load`] checks the file's sha256 and every tensor's dtype, shape and range against the
parameters the manifest records (and that every row position appears exactly once), then rebuilds the FAISS index
in memory from those arrays (`IndexIVFPQ` / `IndexIVFScalarQuantizer` with the stored quantizer, codebooks and
inverted lists). No byte of the file reaches FAISS unchecked.

The search runs on CPU, or on a GPU (`device="cuda"`) when torch sees one and the installed faiss has GPU support
(`faiss-gpu`); `device="auto"` picks the GPU when both hold.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .calibration import RecallCalibration, calibrate_recall, smallest_reaching
from .constants import (
    DEFAULT_FAISS_CANDIDATES,
    DEFAULT_FAISS_NPROBE,
    FAISS_CODECS,
    MAX_FAISS_COARSE_DIM,
    MAX_FAISS_NLIST,
)
from .errors import ConfigError, DMinError, IndexCorruptError, MissingDependencyError
from .logging import get_logger, tqdm
from .search import ExactSearch, SearchBackend, _as_query_matrix, _check_top_k, single_threaded_torch
from .sketch import fold_sketch
from .storage import FaissInfo, _parse_header, commit_temp, stage_bytes, verify_file


logger = get_logger(__name__)

__all__ = [
    "FaissIVFSearch",
    "require_faiss",
    "default_coarse_sketch_dim",
    "default_nlist",
    "default_pq_m",
    "CODECS",
    "MAX_COARSE_DIM",
]

CODECS = FAISS_CODECS
# Largest coarse dimension we build by default (the hard limit is the common engine limit, Milvus's 32,768).
DEFAULT_COARSE_DIM = 1024
MAX_COARSE_DIM = MAX_FAISS_COARSE_DIM
DEFAULT_NPROBE = DEFAULT_FAISS_NPROBE
DEFAULT_NUM_CANDIDATES = DEFAULT_FAISS_CANDIDATES
DEFAULT_MAX_CANDIDATES = 1024
PQ_NBITS = 8  # 256 centroids per sub-quantizer: every code byte is a valid centroid index
_MAX_NLIST = MAX_FAISS_NLIST
# float32 bytes of candidate rows gathered at once for exact re-scoring
_RESCORE_BYTES = 256 * 2**20
# training rows per list (k-means) and per PQ centroid: FAISS warns below 39 and subsamples above 256
_TRAIN_PER_LIST = 64
_MIN_TRAIN_PQ = 39 * 2**PQ_NBITS
_TENSOR_TAGS = {"F32": np.dtype(np.float32), "I64": np.dtype(np.int64), "U8": np.dtype(np.uint8)}


def require_faiss():
    """Import faiss, or raise [`MissingDependencyError`] with the install command."""
    try:
        import faiss
    except ImportError as err:
        raise MissingDependencyError(
            "The FAISS search backend needs `faiss`, which is not installed. Install it with `pip install "
            '"diffusers-dmin[faiss]"` (faiss-cpu), or search with `exact=True` or the HNSW backend.'
        ) from err
    return faiss


def default_coarse_sketch_dim(num_timesteps: int, sketch_dim: int, max_dim: int = DEFAULT_COARSE_DIM) -> int:
    """The largest divisor k of `sketch_dim` with `num_timesteps * k <= max_dim` (at least 1)."""
    best = 1
    for k in range(1, sketch_dim + 1):
        if sketch_dim % k == 0 and num_timesteps * k <= max_dim:
            best = k
    return best


def default_nlist(num_rows: int) -> int:
    """A power of two near sqrt(num_rows), with at least 39 training rows per list (FAISS's minimum)."""
    nlist = 2 ** max(0, round(math.log2(max(1.0, math.sqrt(num_rows)))))
    while nlist > 1 and nlist * 39 > num_rows:
        nlist //= 2
    return nlist


def default_pq_m(dim: int) -> int:
    """Sub-quantizers for PQ: the largest divisor of `dim` giving sub-vectors of at least 16 dims (1 byte each).

    Shorter sub-vectors train far slower in FAISS (measured: 8-dim sub-vectors of 640 dims, 45 s for 9,984 rows;
    16-dim, 6 s).
    """
    for m in range(max(1, dim // 16), 0, -1):
        if dim % m == 0:
            return m
    return 1


def _code_size(codec: str, dim: int, pq_m: int) -> int:
    return {"pq": pq_m * PQ_NBITS // 8, "sq8": dim, "sq4": (dim + 1) // 2}[codec]


def _check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"`{name}` must be an integer >= {minimum}, but is {value!r}.")
    if maximum is not None and value > maximum:
        raise ConfigError(f"`{name}` must be at most {maximum}, but is {value!r}.")
    return int(value)


def _resolve_device(device: str) -> str:
    faiss = require_faiss()
    has_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if device == "auto":
        return "cuda" if torch.cuda.is_available() and has_gpu else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("`device='cuda'` was requested, but torch sees no CUDA device. Use `device='cpu'`.")
        if not has_gpu:
            raise MissingDependencyError(
                "`device='cuda'` needs a faiss build with GPU support (e.g. `conda install -c pytorch faiss-gpu`); "
                "the installed faiss is CPU-only. Use `device='cpu'` or `device='auto'`."
            )
        return "cuda"
    if device != "cpu":
        raise ConfigError(f"`device` must be 'cpu', 'cuda' or 'auto', but is {device!r}.")
    return "cpu"


class FaissIVFSearch(SearchBackend):
    r"""
    Approximate inner-product search with a FAISS IVF index (PQ or SQ codes) over folded sketches; labels are row
    positions. Use [`search_rescored`] for the two-stage search with exact scores.

    Args:
        num_timesteps (`int`): T.
        sketch_dim (`int`): Buckets per timestep in the coarse index (a divisor of the stored K); the coarse
            dimension is `num_timesteps * sketch_dim` (at most 32,768).
        nlist (`int`): Number of inverted lists (k-means centroids).
        codec (`str`, *optional*, defaults to `"pq"`): `"pq"` (product quantisation, `pq_m` bytes per row),
            `"sq8"` (one byte per dimension) or `"sq4"` (half a byte).
        pq_m (`int`, *optional*): PQ sub-quantizers (must divide the coarse dimension); defaults to
            [`default_pq_m`]. Ignored for SQ.
        nprobe (`int`, *optional*, defaults to 16): Lists probed per query (capped at `nlist`).
        num_candidates (`int`, *optional*, defaults to 100): Candidates re-scored exactly per query in
            [`search_rescored`] (at least `top_k`).
        device (`str`, *optional*, defaults to `"cpu"`): `"cpu"`, `"cuda"` or `"auto"` (see the module docstring).

    Examples:
    ```py
    >>> import numpy as np
    >>> from diffusers_dmin.search import ExactSearch
    >>> from diffusers_dmin.faiss_backend import FaissIVFSearch
    >>> rows = ExactSearch([np.random.default_rng(0).standard_normal((20000, 2, 32)).astype(np.float16)])
    >>> ivf = FaissIVFSearch.from_rows(rows, sketch_dim=16, nlist=64, codec="sq8")
    >>> positions, scores = ivf.search_rescored(rows, rows.gather([5, 7]), top_k=3)
    >>> positions[:, 0].tolist()
    [5, 7]
    ```
    """

    def __init__(
        self,
        num_timesteps: int,
        sketch_dim: int,
        *,
        nlist: int,
        codec: Literal["pq", "sq8", "sq4"] = "pq",
        pq_m: int | None = None,
        nprobe: int = DEFAULT_NPROBE,
        num_candidates: int = DEFAULT_NUM_CANDIDATES,
        device: str = "cpu",
    ):
        faiss = require_faiss()
        self.num_timesteps = _check_int("num_timesteps", num_timesteps, 1)
        self.sketch_dim = _check_int("sketch_dim", sketch_dim, 1)
        dim = self.num_timesteps * self.sketch_dim
        if dim > MAX_COARSE_DIM:
            raise ConfigError(
                f"The coarse dimension num_timesteps * sketch_dim = {dim} exceeds {MAX_COARSE_DIM}; fold further, "
                f"e.g. `sketch_dim={default_coarse_sketch_dim(self.num_timesteps, self.sketch_dim)}`."
            )
        self.nlist = _check_int("nlist", nlist, 1, _MAX_NLIST)
        if codec not in CODECS:
            raise ConfigError(f"`codec` must be one of {CODECS}, but is {codec!r}.")
        self.codec = codec
        self.pq_m = default_pq_m(dim) if pq_m is None else _check_int("pq_m", pq_m, 1, dim)
        if codec == "pq" and dim % self.pq_m:
            raise ConfigError(
                f"`pq_m={self.pq_m}` must divide the coarse dimension {dim}; e.g. `pq_m={default_pq_m(dim)}`."
            )
        if codec != "pq":
            self.pq_m = 0
        self.nprobe = _check_int("nprobe", nprobe, 1)
        self.num_candidates = _check_int("num_candidates", num_candidates, 1)
        self.device = _resolve_device(device)
        self._dim = dim
        quantizer = faiss.IndexFlatIP(dim)
        if codec == "pq":
            index = faiss.IndexIVFPQ(quantizer, dim, self.nlist, self.pq_m, PQ_NBITS, faiss.METRIC_INNER_PRODUCT)
        else:
            qtype = faiss.ScalarQuantizer.QT_8bit if codec == "sq8" else faiss.ScalarQuantizer.QT_4bit
            index = faiss.IndexIVFScalarQuantizer(quantizer, dim, self.nlist, qtype, faiss.METRIC_INNER_PRODUCT)
        index.own_fields = False  # `self._quantizer` keeps the quantizer alive
        self._quantizer, self._index = quantizer, index
        self._gpu_index = None
        self.code_size = _code_size(codec, dim, self.pq_m)
        if int(index.code_size) != self.code_size:  # our layout assumption vs. this faiss build
            raise DMinError(f"faiss reports code size {index.code_size} for {codec}, expected {self.code_size}.")

    # ------------------------------------------------------------------------------------------ properties

    @property
    def num_rows(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return self._dim

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def memory_bytes(self) -> int:
        """Bytes held by the coarse index: codes and ids (8 each) per row, plus centroids and codebooks."""
        tables = self.nlist * self._dim * 4
        tables += self._dim * 256 * 4 if self.codec == "pq" else 2 * self._dim * 4
        return self.num_rows * (self.code_size + 8) + tables

    # ------------------------------------------------------------------------------------------ building

    @classmethod
    def from_rows(
        cls,
        rows: ExactSearch,
        *,
        sketch_dim: int | None = None,
        nlist: int | None = None,
        codec: Literal["pq", "sq8", "sq4"] = "pq",
        pq_m: int | None = None,
        nprobe: int = DEFAULT_NPROBE,
        num_candidates: int = DEFAULT_NUM_CANDIDATES,
        num_train: int | None = None,
        seed: int = 0,
        device: str = "cpu",
        progress: bool = True,
    ) -> FaissIVFSearch:
        r"""
        Train the IVF quantizer and codes on a seeded sample of `rows` (folded), then add every row.

        Args:
            rows (`ExactSearch`): The index's rows.
            sketch_dim (`int`, *optional*): Coarse buckets per timestep, a divisor of the stored K; defaults to
                [`default_coarse_sketch_dim`] (T * sketch_dim <= 1,024).
            nlist (`int`, *optional*): Lists; defaults to [`default_nlist`] of the row count.
            num_train (`int`, *optional*): Training rows; defaults to `64 * nlist` (at least 9,984 for PQ), capped
                at the row count.
            seed (`int`, *optional*, defaults to 0): Seed of the training sample and of k-means.
            Other arguments: see the class.
        """
        k = default_coarse_sketch_dim(rows.num_timesteps, rows.sketch_dim) if sketch_dim is None else sketch_dim
        k = _check_int("sketch_dim", k, 1)
        if rows.sketch_dim % k:
            raise ConfigError(
                f"`sketch_dim={k}` must divide the stored sketch_dim {rows.sketch_dim}, e.g. "
                f"{default_coarse_sketch_dim(rows.num_timesteps, rows.sketch_dim)}."
            )
        if rows.num_rows < 1:
            raise ConfigError("The FAISS index needs at least one row to train on; add sketches first.")
        nlist = default_nlist(rows.num_rows) if nlist is None else nlist
        nlist = _check_int("nlist", nlist, 1, _MAX_NLIST)
        if nlist > rows.num_rows:
            raise ConfigError(f"`nlist={nlist}` exceeds the {rows.num_rows} rows; use at most {rows.num_rows}.")
        ivf = cls(
            rows.num_timesteps,
            k,
            nlist=nlist,
            codec=codec,
            pq_m=pq_m,
            nprobe=nprobe,
            num_candidates=num_candidates,
            device=device,
        )
        ivf.train(rows, num_train=num_train, seed=seed)
        ivf.add_rows(rows, progress=progress)
        return ivf

    def train(self, rows: ExactSearch, *, num_train: int | None = None, seed: int = 0) -> None:
        """Train the coarse quantizer (k-means) and the codes on `num_train` seeded rows of `rows`, folded."""
        self._check_rows(rows)
        if num_train is None:
            num_train = max(_TRAIN_PER_LIST * self.nlist, _MIN_TRAIN_PQ if self.codec == "pq" else 0)
        num_train = min(_check_int("num_train", num_train, 1), rows.num_rows)
        if num_train < self.nlist:
            raise ConfigError(f"`num_train={num_train}` must be at least `nlist={self.nlist}`.")
        if self.codec == "pq" and num_train < 2**PQ_NBITS:
            raise ConfigError(
                f"PQ codes need at least {2**PQ_NBITS} training rows (one per centroid), but only {num_train} are "
                "used; use `codec='sq8'` for small indices, or raise `num_train`."
            )
        rng = np.random.default_rng(seed)
        positions = np.sort(rng.choice(rows.num_rows, size=num_train, replace=False))
        sample = np.empty((num_train, self._dim), dtype=np.float32)
        with single_threaded_torch():
            for s in range(0, num_train, 4096):
                batch = rows.gather(positions[s : s + 4096])
                sample[s : s + len(batch)] = self._fold(batch, rows.sketch_dim).numpy()
        self._index.cp.seed = int(seed) % 2**31
        # FAISS prints an unconditional warning to stderr below 39 rows per centroid; we log it instead
        self._index.cp.min_points_per_centroid = 1
        if num_train < 39 * self.nlist or (self.codec == "pq" and num_train < _MIN_TRAIN_PQ):
            logger.info(
                f"Training on {num_train} rows: fewer than FAISS's recommended 39 per centroid (nlist={self.nlist}"
                + (f", 256 per PQ sub-quantizer: {_MIN_TRAIN_PQ}" if self.codec == "pq" else "")
                + "); the codes are coarser, and re-scoring keeps the returned scores exact."
            )
        if self.codec == "pq":
            self._index.pq.cp.seed = int(seed) % 2**31
            self._index.pq.cp.min_points_per_centroid = 1
        logger.info(f"Training IVF-{self.codec} (nlist={self.nlist}, dim={self._dim}) on {num_train} rows.")
        self._index.train(sample)
        self._gpu_index = None

    def add_rows(
        self, rows: ExactSearch, *, start: int | None = None, batch_rows: int = 16384, progress: bool = True
    ) -> None:
        """Add rows `start ..` of `rows` (default: those not in the index yet), folded, with positions as labels."""
        if not self.is_trained:
            raise ConfigError("Train the FAISS index (`train(rows)`) before adding rows.")
        self._check_rows(rows)
        start = self.num_rows if start is None else start
        if start != self.num_rows:
            raise ConfigError(f"Rows must be added in order: the index holds {self.num_rows}, not {start}.")
        total = rows.num_rows - start
        if total <= 0:
            return
        with tqdm(total=total, desc=f"Adding rows to IVF-{self.codec}", unit="rows", disable=not progress) as bar:
            for position, batch in rows.iter_rows(start, batch_rows=batch_rows, sketch_dim=self.sketch_dim):
                labels = np.arange(position, position + len(batch), dtype=np.int64)
                self._index.add_with_ids(batch.numpy(), labels)
                bar.update(len(batch))
        self._gpu_index = None

    def _check_rows(self, rows: ExactSearch) -> None:
        if rows.num_timesteps != self.num_timesteps or rows.sketch_dim % self.sketch_dim:
            raise ConfigError(
                f"The FAISS index holds T={self.num_timesteps} x {self.sketch_dim} folded rows, which rows of "
                f"T={rows.num_timesteps} x K={rows.sketch_dim} cannot fill (K must be a multiple of {self.sketch_dim})."
            )

    def _fold(self, flat: torch.Tensor, sketch_dim: int) -> torch.Tensor:
        """Fold flat `(n, T*K)` float32 rows to `(n, T*k)` (k = the coarse sketch_dim)."""
        n = len(flat)
        return fold_sketch(flat.reshape(n, self.num_timesteps, sketch_dim), self.sketch_dim).reshape(n, -1)

    # ------------------------------------------------------------------------------------------ searching

    def _searcher(self):
        if self.device == "cpu":
            return self._index
        if self._gpu_index is None:
            faiss = require_faiss()
            self._gpu_resources = faiss.StandardGpuResources()
            try:
                self._gpu_index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, self._index)
            except RuntimeError as err:
                raise ConfigError(
                    f"faiss could not move the IVF-{self.codec} index to the GPU ({err}); use `device='cpu'`."
                ) from err
        return self._gpu_index

    def search(
        self,
        queries: torch.Tensor | np.ndarray,
        top_k: int,
        *,
        largest: bool = True,
        nprobe: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        r"""
        Coarse search: approximate (code) scores of the folded `queries` `(num_queries, T * sketch_dim)`.

        Returns positions and approximate scores; a position is -1 where the probed lists held fewer than `top_k`
        rows (raise `nprobe`, or use [`search_rescored`], which does).
        """
        q = _as_query_matrix(queries, self._dim).numpy()
        if not largest:
            q = -q
        k = _check_top_k(top_k, self.num_rows)
        nprobe = self.nprobe if nprobe is None else _check_int("nprobe", nprobe, 1)
        index = self._searcher()
        self._set_nprobe(index, min(nprobe, self.nlist))
        scores, labels = index.search(np.ascontiguousarray(q), k)
        if not largest:
            scores = -scores
        return labels.astype(np.int64), scores.astype(np.float32)

    @staticmethod
    def _set_nprobe(index, nprobe: int) -> None:
        index.nprobe = int(nprobe)

    def search_rescored(
        self,
        rows: ExactSearch,
        queries: torch.Tensor | np.ndarray,
        top_k: int,
        *,
        largest: bool = True,
        nprobe: int | None = None,
        num_candidates: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        r"""
        Two-stage search: coarse candidates from the IVF index, then exact scores at full K from `rows`.

        Args:
            rows (`ExactSearch`): The rows the index was built from (the shards).
            queries (`torch.Tensor` of shape `(num_queries, rows.dim)`): Flattened full-K queries; folded here.
            top_k (`int`): Results per query.
            largest (`bool`, *optional*, defaults to `True`): `False` returns the most negative scores first.
            nprobe (`int`, *optional*): Lists probed for this call (default: `self.nprobe`). Raised automatically
                for queries whose probed lists hold fewer than `top_k` rows.
            num_candidates (`int`, *optional*): Candidates re-scored per query (default: `self.num_candidates`,
                at least `top_k`).

        Returns:
            `tuple[np.ndarray, np.ndarray]`: Positions (int64) and exact float32 scores, `(num_queries, k)` with
            `k = min(top_k, num_rows)`, best first.

        With `largest=False` (opponents) the coarse stage probes the lists nearest to `-query`; the most negative
        rows are usually spread over many lists, so recall is lower than for `largest=True`: calibrate, or use
        exact search for opponents.
        """
        self._check_rows(rows)
        full = _as_query_matrix(queries, rows.dim)
        k = _check_top_k(top_k, min(self.num_rows, rows.num_rows))
        if self.num_rows < rows.num_rows:
            raise ConfigError(
                f"The FAISS index holds {self.num_rows} of the {rows.num_rows} rows; add the rest with "
                "`add_rows(rows)` first."
            )
        m = max(k, self.num_candidates if num_candidates is None else _check_int("num_candidates", num_candidates, 1))
        m = min(m, self.num_rows)
        nprobe = self.nprobe if nprobe is None else _check_int("nprobe", nprobe, 1)
        with single_threaded_torch():
            coarse = self._fold(full, rows.sketch_dim)
        candidates, _ = self.search(coarse, m, largest=largest, nprobe=nprobe)
        # probed lists holding fewer than k rows: probe more lists for those queries (all lists hold every row)
        short = np.flatnonzero((candidates >= 0).sum(axis=1) < k)
        while len(short) and nprobe < self.nlist:
            nprobe = min(self.nlist, 2 * nprobe)
            more, _ = self.search(coarse[torch.from_numpy(short)], m, largest=largest, nprobe=nprobe)
            candidates[short] = more
            short = short[(more >= 0).sum(axis=1) < k]
        valid = candidates >= 0
        filled = np.where(valid, candidates, candidates[:, :1])
        # re-score a few queries at a time: the gathered float32 rows stay within _RESCORE_BYTES
        step = max(1, _RESCORE_BYTES // (4 * rows.dim * filled.shape[1]))
        positions = np.empty((len(full), k), dtype=np.int64)
        scores = np.empty((len(full), k), dtype=np.float32)
        for s in range(0, len(full), step):
            exact = torch.from_numpy(rows.score(full[s : s + step], filled[s : s + step]))
            signed = exact if largest else -exact
            signed[torch.from_numpy(~valid[s : s + step])] = -torch.inf
            best, order = torch.topk(signed, k, dim=1)
            positions[s : s + step] = np.take_along_axis(filled[s : s + step], order.numpy(), axis=1)
            scores[s : s + step] = (best if largest else -best).numpy()
        return positions, scores

    def calibrate(
        self,
        rows: ExactSearch,
        queries: torch.Tensor | np.ndarray,
        *,
        top_k: int = 10,
        target: float = 0.95,
        max_candidates: int = DEFAULT_MAX_CANDIDATES,
        noise: float | None = None,
        seed: int = 0,
        truth: np.ndarray | None = None,
        confidence: float | None = 0.95,
    ) -> RecallCalibration:
        r"""
        Set `nprobe` and `num_candidates` to the smallest values whose recall@`top_k` against exact search on
        `queries` reaches `target` (see [`~diffusers_dmin.calibration.calibrate_recall`]).

        First the smallest `nprobe` reaching the target while re-scoring `max_candidates` candidates, then, at that
        `nprobe`, the smallest number of candidates that still reaches it. Both are applied to this index and
        returned (with `parameter="nprobe"`) for the manifest. When the target is out of reach even at
        `nprobe=nlist`, the largest values are applied and the result says `reached=False`.

        Args:
            rows (`ExactSearch`): The rows the index was built from.
            queries (`torch.Tensor` of shape `(num_queries, rows.dim)`): Held-out queries, e.g. from
                [`~diffusers_dmin.calibration.held_out_queries`].
            max_candidates (`int`, *optional*, defaults to 1024): Most candidates re-scored per query.
            noise (`float`, *optional*), seed (`int`, *optional*, defaults to 0): How the queries were made
                (recorded in the result).
            truth (`np.ndarray` of shape `(num_queries, top_k)`, *optional*): Exact top-k positions of `queries`
                when already known; computed with `rows.search` otherwise.
            confidence (`float`, *optional*, defaults to 0.95): See
                [`~diffusers_dmin.calibration.calibrate_recall`]: the lower confidence bound of the recall must
                reach `target`.
        """
        full = _as_query_matrix(queries, rows.dim)
        k = _check_top_k(top_k, self.num_rows)
        high = min(self.num_rows, max(k, _check_int("max_candidates", max_candidates, 1)))
        if truth is None:
            truth, _ = rows.search(full, k)
        elif np.shape(truth) != (len(full), k):
            raise ConfigError(f"`truth` must have shape ({len(full)}, {k}), but has shape {np.shape(truth)}.")
        first = calibrate_recall(
            lambda v: self.search_rescored(rows, full, k, nprobe=v, num_candidates=high)[0],
            truth,
            parameter="nprobe",
            target=target,
            high=self.nlist,
            noise=noise,
            seed=seed,
            confidence=confidence,
        )
        num_candidates, candidates_curve, bounds = high, {high: first.recall}, {high: first.recall_lower_bound}
        if first.reached:
            num_candidates, candidates_curve, bounds = smallest_reaching(
                lambda c: self.search_rescored(rows, full, k, nprobe=first.value, num_candidates=c)[0],
                truth,
                target=target,
                low=k,
                high=high,
                name="num_candidates",
                confidence=confidence,
            )
        self.nprobe, self.num_candidates = first.value, num_candidates
        return dataclasses.replace(
            first,
            recall=candidates_curve[num_candidates],
            recall_lower_bound=bounds[num_candidates],
            num_candidates=num_candidates,
            candidates_curve=tuple(sorted(candidates_curve.items())),
        )

    # ------------------------------------------------------------------------------------------ persisting

    def state_arrays(self) -> dict[str, np.ndarray]:
        """The trained state as plain arrays: what [`save`] writes and [`load`] rebuilds the index from."""
        faiss = require_faiss()
        if not self.is_trained:
            raise ConfigError("The FAISS index is not trained; nothing to save.")
        arrays: dict[str, np.ndarray] = {
            "centroids": self._quantizer.reconstruct_n(0, self.nlist).astype(np.float32).reshape(self.nlist, self._dim)
        }
        if self.codec == "pq":
            ksub = 2**PQ_NBITS
            arrays["pq_centroids"] = faiss.vector_to_array(self._index.pq.centroids).reshape(
                self.pq_m, ksub, self._dim // self.pq_m
            )
        else:
            arrays["sq_trained"] = faiss.vector_to_array(self._index.sq.trained).astype(np.float32)
        invlists = self._index.invlists
        sizes = np.array([invlists.list_size(i) for i in range(self.nlist)], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        ids = np.empty(int(offsets[-1]), dtype=np.int64)
        codes = np.empty((int(offsets[-1]), self.code_size), dtype=np.uint8)
        for i in np.flatnonzero(sizes):
            n = int(sizes[i])
            ids[offsets[i] : offsets[i + 1]] = faiss.rev_swig_ptr(invlists.get_ids(int(i)), n)
            codes[offsets[i] : offsets[i + 1]] = faiss.rev_swig_ptr(
                invlists.get_codes(int(i)), n * self.code_size
            ).reshape(n, self.code_size)
        arrays.update(list_offsets=offsets, ids=ids, codes=codes)
        return arrays

    def stage(self, path: str | os.PathLike) -> Path:
        """Write the trained state to a checked temp file next to `path` (the caller renames it); returns it."""
        from safetensors.numpy import save as save_bytes

        data = save_bytes(self.state_arrays(), metadata={"format": "dmin-faiss-ivf"})
        return stage_bytes(path, data)

    def save(self, path: str | os.PathLike) -> int:
        """Write the trained state as a safetensors file, atomically; returns its size in bytes."""
        path = Path(path)
        tmp = self.stage(path)
        try:
            size = tmp.stat().st_size
            commit_temp(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return size

    def info(self, name: str, sha256: str, num_bytes: int, calibration: RecallCalibration | None = None) -> FaissInfo:
        """The manifest entry of this index saved as `name` (see [`~diffusers_dmin.storage.FaissInfo`])."""
        return FaissInfo(
            name=name,
            sha256=sha256,
            num_bytes=num_bytes,
            num_rows=self.num_rows,
            sketch_dim=self.sketch_dim,
            nlist=self.nlist,
            codec=self.codec,
            pq_m=self.pq_m,
            nprobe=self.nprobe,
            num_candidates=self.num_candidates,
            calibration=calibration,
        )

    @classmethod
    def load_info(
        cls, path: str | os.PathLike, info: FaissInfo, num_timesteps: int, *, device: str = "cpu"
    ) -> FaissIVFSearch:
        """[`load`] with the parameters of a manifest entry (its sha256 and size checked first)."""
        return cls.load(
            path,
            num_timesteps=num_timesteps,
            sketch_dim=info.sketch_dim,
            num_rows=info.num_rows,
            nlist=info.nlist,
            codec=info.codec,
            pq_m=info.pq_m,
            sha256=info.sha256,
            num_bytes=info.num_bytes,
            nprobe=info.nprobe,
            num_candidates=info.num_candidates,
            device=device,
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        *,
        num_timesteps: int,
        sketch_dim: int,
        num_rows: int,
        nlist: int,
        codec: str,
        pq_m: int,
        sha256: str | None = None,
        num_bytes: int | None = None,
        nprobe: int = DEFAULT_NPROBE,
        num_candidates: int = DEFAULT_NUM_CANDIDATES,
        device: str = "cpu",
    ) -> FaissIVFSearch:
        r"""
        Rebuild an index saved by [`save`], after checking the file completely against the manifest's values.

        The sha256 and size are checked first (when given), then the safetensors header: exactly the expected
        tensors, each of the dtype and shape the parameters imply, inside the file; then the values: finite
        centroids and codebooks, list offsets from 0 to `num_rows` without decreasing, and ids that hold every
        row position in `[0, num_rows)` exactly once. Only then are the arrays handed to FAISS (copied into a
        freshly constructed index; FAISS never parses the file).

        Raises:
            [`IndexCorruptError`]: Any check fails.
        """
        path = Path(path)
        if sha256 is not None:
            verify_file(path.parent, path.name, sha256, num_bytes, "FAISS index")
        ivf = cls(
            num_timesteps,
            sketch_dim,
            nlist=nlist,
            codec=codec,
            pq_m=pq_m if codec == "pq" else None,
            nprobe=nprobe,
            num_candidates=num_candidates,
            device=device,
        )
        num_rows = _check_int("num_rows", num_rows, 0)
        arrays = _read_checked(path, ivf._expected_tensors(num_rows))
        ivf._check_values(path, arrays, num_rows)
        ivf._restore(arrays)
        return ivf

    def _expected_tensors(self, num_rows: int) -> dict[str, tuple[str, tuple[int, ...]]]:
        expected = {"centroids": ("F32", (self.nlist, self._dim))}
        if self.codec == "pq":
            expected["pq_centroids"] = ("F32", (self.pq_m, 2**PQ_NBITS, self._dim // self.pq_m))
        else:
            expected["sq_trained"] = ("F32", (2 * self._dim,))
        expected["list_offsets"] = ("I64", (self.nlist + 1,))
        expected["ids"] = ("I64", (num_rows,))
        expected["codes"] = ("U8", (num_rows, self.code_size))
        return expected

    def _check_values(self, path: Path, arrays: Mapping[str, np.ndarray], num_rows: int) -> None:
        for key in ("centroids", "pq_centroids", "sq_trained"):
            if key in arrays and not np.isfinite(arrays[key]).all():
                raise IndexCorruptError(f"The FAISS index {path} holds NaN or infinite values in {key!r}.")
        offsets = arrays["list_offsets"]
        if offsets[0] != 0 or offsets[-1] != num_rows or (np.diff(offsets) < 0).any():
            raise IndexCorruptError(
                f"The FAISS index {path} has list offsets that do not run from 0 to {num_rows} without decreasing."
            )
        ids = arrays["ids"]
        if num_rows and (ids.min() < 0 or ids.max() >= num_rows or (np.bincount(ids, minlength=num_rows) != 1).any()):
            raise IndexCorruptError(
                f"The FAISS index {path} does not hold every row position in [0, {num_rows}) exactly once."
            )

    def _restore(self, arrays: Mapping[str, np.ndarray]) -> None:
        faiss = require_faiss()
        self._quantizer.reset()
        self._quantizer.add(np.ascontiguousarray(arrays["centroids"]))
        if self.codec == "pq":
            faiss.copy_array_to_vector(np.ascontiguousarray(arrays["pq_centroids"]).ravel(), self._index.pq.centroids)
            self._index.pq.sync_transposed_centroids()
        else:
            faiss.copy_array_to_vector(np.ascontiguousarray(arrays["sq_trained"]), self._index.sq.trained)
        self._index.is_trained = True
        if self.codec == "pq":
            self._index.precompute_table()
        offsets, ids, codes = arrays["list_offsets"], arrays["ids"], arrays["codes"]
        invlists = self._index.invlists
        for i in range(self.nlist):
            s, e = int(offsets[i]), int(offsets[i + 1])
            if e > s:
                list_ids = np.ascontiguousarray(ids[s:e])
                list_codes = np.ascontiguousarray(codes[s:e])
                invlists.add_entries(i, e - s, faiss.swig_ptr(list_ids), faiss.swig_ptr(list_codes))
        self._index.ntotal = int(offsets[-1])
        self._gpu_index = None


def _read_checked(path: Path, expected: Mapping[str, tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """Read the tensors of a safetensors file written by [`FaissIVFSearch.save`], checking the header first."""
    if not path.is_file():
        raise IndexCorruptError(f"No FAISS index file at {path}.")
    header, data_start, size = _parse_header(path, "FAISS index")
    keys = sorted(k for k in header if k != "__metadata__")
    if keys != sorted(expected):
        raise IndexCorruptError(
            f"The FAISS index {path} holds tensors {keys}, but the manifest's parameters imply {sorted(expected)}."
        )
    spans = []
    arrays = {}
    for key, (tag, shape) in expected.items():
        entry = header[key]
        if not isinstance(entry, dict) or entry.get("dtype") != tag or entry.get("shape") != list(shape):
            got = (entry.get("dtype"), entry.get("shape")) if isinstance(entry, dict) else entry
            raise IndexCorruptError(
                f"Tensor {key!r} of the FAISS index {path} is {got}, but the manifest's parameters imply "
                f"{tag} {list(shape)}. Re-download the index with `force_download=True`, or rebuild the FAISS index."
            )
        offsets = entry.get("data_offsets")
        dtype = _TENSOR_TAGS[tag]
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            and 0 <= offsets[0]
            and offsets[1] - offsets[0] == nbytes
            and data_start + offsets[1] <= size
        ):
            raise IndexCorruptError(f"Tensor {key!r} of the FAISS index {path} has invalid data offsets {offsets!r}.")
        spans.append((offsets[0], offsets[1]))
        count = int(np.prod(shape, dtype=np.int64))
        with open(path, "rb") as f:
            f.seek(data_start + offsets[0])
            arrays[key] = np.fromfile(f, dtype=dtype.newbyteorder("<"), count=count).astype(dtype).reshape(shape)
        if arrays[key].size != count:
            raise IndexCorruptError(f"Tensor {key!r} of the FAISS index {path} is truncated.")
    spans.sort()
    if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
        raise IndexCorruptError(f"Tensors of the FAISS index {path} overlap.")
    return arrays
