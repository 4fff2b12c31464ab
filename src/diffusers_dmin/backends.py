"""Search dispatch of an index: picks the backend (exact rows, HNSW graph or FAISS IVF index) for a call, applies the
per-call settings (`k`, `ef`, `nprobe`, re-scoring) and calibrates the approximate backends; plus the comparison of a
query's spec with the index's. [`GradientIndex`] keeps the state (rows, graph, IVF index) and calls these; the public
methods that build, calibrate and describe the approximate backends are [`ApproximateSearchMixin`]'s.

Sits above [`search`] (the backends themselves), [`graph`] and [`ivf`] (their lifecycles).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

from .calibration import RecallCalibration, held_out_queries
from .config import DMinConfig, SketchSpec
from .errors import ConfigError, IndexMismatchError, check_int
from .graph import IndexGraph
from .ivf import IndexIVF
from .logging import get_logger
from .search import (
    QUERY_FIX,
    ExactSearch,
    approximate_search,
    check_search_dim,
    expand_queries,
    prepare_queries,
    single_threaded_torch,
)


logger = get_logger(__name__)

__all__ = ["ApproximateSearchMixin", "check_backend", "check_query_spec", "calibrate_backend", "search_backend"]

_BACKENDS = ("exact", "hnsw", "faiss")


def check_backend(backend: Any, choices: tuple[str, ...] = ("hnsw", "faiss")) -> str:
    """`backend` if it is one of `choices`, else [`ConfigError`] naming them."""
    if backend not in choices:
        names = ", ".join(repr(c) for c in choices[:-1]) + f" or {choices[-1]!r}"
        raise ConfigError(f"`backend` must be {names}, but is {backend!r}.")
    return backend


def check_query_spec(
    index_spec: SketchSpec | None,
    index_config: DMinConfig,
    spec: SketchSpec | DMinConfig,
    *,
    warned: set[str],
) -> None:
    """[`GradientIndex.check_compatible`]: raise [`IndexMismatchError`] naming every field in which `spec` differs
    from the index's `index_spec` (or `index_config` for an unspecified index). Warns once per index (`warned`: the
    index's set of warnings given) about an unspecified index or one without a whole-model fingerprint."""
    ignore = ("dtype", "sketch_dim")
    if isinstance(spec, SketchSpec):
        if index_spec is not None:
            differences = index_spec.differences(spec)
            if index_spec.model_fingerprint is None:
                warn_once(warned, "weak_fingerprint")
        else:
            warn_once(warned, "unspecified")
            differences = {f"config.{k}": v for k, v in index_config.differences(spec.config, ignore=ignore).items()}
        query_config = spec.config
    elif isinstance(spec, DMinConfig):
        differences = {f"config.{k}": v for k, v in index_config.differences(spec, ignore=ignore).items()}
        query_config = spec
    else:
        raise ConfigError(f"`spec` must be a SketchSpec or a DMinConfig, but is {type(spec).__name__}.")
    k, kq = index_config.sketch_dim, query_config.sketch_dim
    if k % kq and kq % k:
        differences["config.sketch_dim"] = (k, kq)
    if differences:
        raise IndexMismatchError.from_differences(differences, what="queries", fix=QUERY_FIX)


_WARNINGS = {
    "weak_fingerprint": (
        "This index was written before diffusers_dmin recorded a fingerprint of the whole model: only the selected "
        "parameters are compared with the queries' model, so a different base model under the same adapter, or "
        "changed unselected weights, go unnoticed. Rebuild the index to get the full check."
    ),
    "unspecified": (
        "This index was created from a config only (its spec is unspecified): queries are checked against the "
        "config, not against the model, adapter or parameters. Build indices with `spec=sketcher.spec`."
    ),
}


def warn_once(warned: set[str], key: str) -> None:
    """Log the warning `key` unless `warned` (one index's record) already holds it."""
    if key not in warned:
        logger.warning(_WARNINGS[key])
        warned.add(key)


def search_backend(
    rows: ExactSearch,
    graph: IndexGraph,
    ivf: IndexIVF,
    queries: torch.Tensor | np.ndarray,
    top_k: int,
    *,
    exact: bool,
    backend: str | None,
    largest: bool,
    search_dim: int | None,
    rescore: bool,
    ef: int | None,
    nprobe: int | None,
    progress: bool,
    config: DMinConfig,
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[Any, Any]:
    """[`GradientIndex.search`] after its spec check: fold the queries (to multiples of the noise draws an index of
    `config` keeps in separate blocks), apply `transform` to them (the query preconditioner), pick the backend
    (`backend`, else exact, else FAISS when the index has one, else HNSW) and search. Returns `(positions, scores)`,
    one row per query."""
    check_int(top_k, "top_k")
    with single_threaded_torch():
        folded = prepare_queries(
            queries, num_timesteps=rows.num_timesteps, sketch_dim=rows.sketch_dim, search_dim=search_dim
        )  # (q, T, k_s)
        draws = config.num_noise_draws if config.noise_draws == "separate" else 1
        if folded.shape[-1] % draws:
            raise ConfigError(
                f"This index keeps {draws} noise draws in separate blocks (`noise_draws='separate'`), so a search "
                f"may fold its sketches only to multiples of {draws} buckets, not to sketch_dim={folded.shape[-1]}."
            )
        if transform is not None:
            folded = transform(folded)
        full = expand_queries(folded, rows.sketch_dim).reshape(len(folded), -1)
    if backend is None:
        backend = "exact" if exact else ("faiss" if ivf.params is not None else "hnsw")
    else:
        check_backend(backend, _BACKENDS)
    if backend == "hnsw":
        check_int(ef, "ef", optional=True)
    if backend == "faiss":
        if not rescore:
            raise ConfigError("The FAISS backend always re-scores its candidates exactly; drop `rescore=False`.")
        check_int(nprobe, "nprobe", optional=True)
        index = ivf.get(rows, progress=progress)
        with single_threaded_torch():
            return index.search_rescored(rows, full, top_k, largest=largest, nprobe=nprobe)
    # with re-scoring, candidates covering every row (small indices) are just exact search
    if backend == "exact" or (rescore and max(int(top_k), ef or graph.params["ef"]) >= rows.num_rows):
        return rows.search(full, top_k, largest=largest)
    hnsw = graph.get(rows, folded.shape[-1], progress=progress)
    graph_ef = hnsw.ef
    hnsw.ef = graph_ef if ef is None else ef
    try:
        return approximate_search(
            hnsw, rows, folded, top_k, largest=largest, rescore_candidates=rescore, num_candidates=hnsw.ef
        )
    finally:
        hnsw.ef = graph_ef


def calibrate_backend(
    rows: ExactSearch,
    graph: IndexGraph,
    ivf: IndexIVF,
    *,
    backend: str,
    target: float,
    top_k: int,
    queries: torch.Tensor | np.ndarray | None,
    num_queries: int,
    noise: float,
    seed: int,
    confidence: float | None,
    max_candidates: int,
    progress: bool,
) -> RecallCalibration:
    """[`GradientIndex.calibrate`] after its checks: held-out queries (given, or noisy copies of sampled rows), then
    [`IndexIVF.calibrate`] or [`IndexGraph.calibrate`] (which keep the result for the manifest)."""
    if queries is None:
        _, flat = held_out_queries(rows, num_queries, noise=noise, seed=seed)
        used_noise: float | None = float(noise)
    else:
        with single_threaded_torch():
            folded = prepare_queries(queries, num_timesteps=rows.num_timesteps, sketch_dim=rows.sketch_dim)
            flat = expand_queries(folded, rows.sketch_dim).reshape(len(folded), -1)
        used_noise = None
    options = {"top_k": top_k, "target": target, "noise": used_noise, "seed": seed, "confidence": confidence}
    if backend == "faiss":
        return ivf.calibrate(rows, flat, max_candidates=max_candidates, **options)
    return graph.calibrate(rows, flat, progress=progress, **options)


# ---------------------------------------------------------------------------------------------- the facade's methods


class ApproximateSearchMixin:
    """The approximate backends of [`GradientIndex`]: build the HNSW graph or the FAISS IVF index over the rows,
    calibrate either to a recall target, and read their parameters. The class keeps the state these methods act on:
    `_graph` ([`~graph.IndexGraph`]) and `_ivf` ([`~ivf.IndexIVF`]), and provides `sketch_dim`, `_exact_search()` (the
    rows), `_check_nonempty()` and `_progress_enabled()`."""

    _graph: IndexGraph
    _ivf: IndexIVF

    @property
    def hnsw_params(self) -> dict[str, int]:
        """`M`, `ef_construction` and `ef` of the HNSW graph (the paper's 16, 200, 100 unless built otherwise)."""
        return dict(self._graph.params)

    @property
    def faiss_params(self) -> dict[str, Any] | None:
        """`codec`, `sketch_dim`, `nlist`, `pq_m`, `nprobe` and `num_candidates` of the FAISS index (None: none)."""
        return self._ivf.params

    def calibration(self, backend: Literal["hnsw", "faiss"]) -> RecallCalibration | None:
        """The recall calibration stored for `backend` (see [`calibrate`]), or None."""
        return self._graph.calibration if check_backend(backend) == "hnsw" else self._ivf.calibration

    def build_hnsw(
        self,
        *,
        M: int | None = None,
        ef_construction: int | None = None,
        ef: int | None = None,
        sketch_dim: int | None = None,
        num_threads: int = -1,
        seed: int = 0,
    ) -> None:
        r"""
        Build the HNSW graph (hnswlib, inner product; [`~graph.IndexGraph`]) over all rows, replacing any existing
        one. `search(exact=False)` builds one with the defaults on first use; saves write it as `hnsw.bin`.

        Args:
            M (`int`, *optional*, defaults to 16): Graph degree.
            ef_construction (`int`, *optional*, defaults to 200): Candidate list size while building.
            ef (`int`, *optional*, defaults to 100): Candidate list size while searching.
            sketch_dim (`int`, *optional*): Build the graph on rows folded to this divisor of K (smaller graph and
                faster build; searches then re-score the candidates exactly at full K by default).
            num_threads (`int`, *optional*, defaults to -1): Build threads (-1: all cores; 1 is reproducible).
            seed (`int`, *optional*, defaults to 0): hnswlib's random seed.
        """
        self._check_nonempty()
        k = check_search_dim(sketch_dim, self.sketch_dim) if sketch_dim is not None else self.sketch_dim
        self._graph.build(
            self._exact_search(),
            k,
            M=M,
            ef_construction=ef_construction,
            ef=ef,
            num_threads=num_threads,
            seed=seed,
            progress=self._progress_enabled(),
        )

    def build_faiss(
        self,
        *,
        codec: Literal["pq", "sq8", "sq4"] = "pq",
        sketch_dim: int | None = None,
        nlist: int | None = None,
        pq_m: int | None = None,
        nprobe: int | None = None,
        num_candidates: int | None = None,
        num_train: int | None = None,
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        r"""
        Build a FAISS IVF index (optional extra: `pip install "diffusers-dmin[faiss]"`) over all rows, replacing any
        existing one ([`~faiss_backend.FaissIVFSearch`]); saved as `faiss_ivf.safetensors` (arrays we write and
        validate; FAISS never parses a file). [`calibrate`] sets `nprobe` and the candidate count for a recall target.

        Args:
            codec (`str`, *optional*, defaults to `"pq"`): `"pq"` (`pq_m` bytes per row), `"sq8"` (one byte per
                coarse dimension) or `"sq4"`.
            sketch_dim (`int`, *optional*): Coarse buckets per timestep (a divisor of K); defaults to the largest
                with T x sketch_dim <= 1,024 (at most 32,768, the dimension limit of engines such as Milvus).
            nlist (`int`, *optional*): Inverted lists; defaults to a power of two near sqrt(rows).
            pq_m (`int`, *optional*): PQ sub-quantizers (divides T x sketch_dim); defaults to 16-dim sub-vectors.
            nprobe (`int`, *optional*, defaults to 16), num_candidates (`int`, *optional*, defaults to 100): Lists
                probed and candidates re-scored per query.
            num_train (`int`, *optional*): Training rows (seeded sample); defaults to 64 per list.
            seed (`int`, *optional*, defaults to 0): Seed of the training sample and k-means.
            device (`str`, *optional*, defaults to `"cpu"`): `"cpu"`, `"cuda"` or `"auto"` (GPU when torch sees one
                and faiss has GPU support).
        """
        self._check_nonempty()
        if sketch_dim is not None:
            sketch_dim = check_search_dim(sketch_dim, self.sketch_dim)
        options = {"nprobe": nprobe, "num_candidates": num_candidates}
        self._ivf.build(
            self._exact_search(),
            progress=self._progress_enabled(),
            device=device,
            codec=codec,
            sketch_dim=sketch_dim,
            nlist=nlist,
            pq_m=pq_m,
            num_train=num_train,
            seed=seed,
            **{key: value for key, value in options.items() if value is not None},
        )

    def calibrate(
        self,
        *,
        backend: Literal["hnsw", "faiss"] = "faiss",
        target: float = 0.95,
        top_k: int = 10,
        queries: torch.Tensor | np.ndarray | None = None,
        num_queries: int = 200,
        noise: float = 0.25,
        seed: int = 0,
        confidence: float | None = 0.95,
        max_candidates: int = 1024,
    ) -> RecallCalibration:
        r"""
        Calibrate the approximate search to a recall target: the smallest `ef` (HNSW) or `nprobe` and candidate
        count (FAISS) whose recall@`top_k` against exact search on held-out queries reaches `target` (its lower
        confidence bound). Applied now, stored in the manifest by the next save or push; the backend is built first
        when the index has none ([`~backends.calibrate_backend`]).

        Args:
            backend (`str`, *optional*, defaults to `"faiss"`): `"faiss"` or `"hnsw"`.
            target (`float`, *optional*, defaults to 0.95): Requested recall@`top_k`.
            top_k (`int`, *optional*, defaults to 10): The k of recall@k.
            queries (`torch.Tensor` of shape `(n, T, K)`, *optional*): Real held-out query sketches; by default
                `num_queries` rows are sampled (seeded by `seed`) and queried as copies with relative noise `noise`.
            confidence (`float`, *optional*, defaults to 0.95): See
                [`~diffusers_dmin.calibration.calibrate_recall`]; `None` compares the mean recall itself.
            max_candidates (`int`, *optional*, defaults to 1024): FAISS only: most candidates re-scored per query.

        Returns:
            [`~diffusers_dmin.calibration.RecallCalibration`]: `reached=False` when even the widest search misses.
        """
        check_backend(backend)
        self._check_nonempty()
        return calibrate_backend(
            self._exact_search(),
            self._graph,
            self._ivf,
            backend=backend,
            target=target,
            top_k=top_k,
            queries=queries,
            num_queries=num_queries,
            noise=noise,
            seed=seed,
            confidence=confidence,
            max_candidates=max_candidates,
            progress=self._progress_enabled(),
        )
