"""Search dispatch of an index: picks the backend (exact rows, HNSW graph or FAISS IVF index) for a call, applies the
per-call settings (`k`, `ef`, `nprobe`, re-scoring) and calibrates the approximate backends; plus the comparison of a
query's spec with the index's. [`GradientIndex`] keeps the state (rows, graph, IVF index) and calls these.

Sits above [`search`] (the backends themselves), [`graph`] and [`ivf`] (their lifecycles).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .calibration import RecallCalibration, held_out_queries
from .config import DMinConfig, SketchSpec
from .errors import ConfigError, IndexMismatchError, check_int
from .graph import IndexGraph
from .ivf import IndexIVF
from .logging import get_logger
from .search import QUERY_FIX, ExactSearch, approximate_search, expand_queries, prepare_queries, single_threaded_torch


logger = get_logger(__name__)

__all__ = ["check_backend", "check_query_spec", "calibrate_backend", "search_backend"]

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
