"""Recall calibration: the smallest `ef` (HNSW) or `nprobe` (FAISS IVF) that reaches a requested recall@k.

A fixed default search width gives very different recall on different data (e.g. 0.65 recall@10 for HNSW with
`ef=100` on unclustered rows, near 1.0 on clustered ones). [`calibrate_recall`] measures recall@k of an approximate
search against exact search on held-out queries and returns the smallest parameter value that reaches the target,
as a [`RecallCalibration`] that is stored in the index manifest and applied at search time.

Held-out queries come from [`held_out_queries`]: rows sampled from the index itself (seeded), each queried as a
noisy copy of itself (relative noise `noise`, so the query is not the row and the remaining neighbours matter), or
real held-out query sketches passed by the caller.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .errors import ConfigError
from .logging import get_logger


logger = get_logger(__name__)

__all__ = ["RecallCalibration", "recall_at_k", "held_out_queries", "calibrate_recall"]

_PARAMETERS = ("ef", "nprobe")


@dataclass(frozen=True)
class RecallCalibration:
    r"""
    The result of [`calibrate_recall`]: which search width reaches which recall@k on held-out queries.

    Args:
        parameter (`str`): `"ef"` (HNSW candidate list) or `"nprobe"` (FAISS IVF lists probed).
        value (`int`): The smallest value found that reaches `target` (the largest value tried when `reached` is
            `False`).
        recall (`float`): Mean recall@`top_k` measured at `value`.
        target (`float`): The requested recall@`top_k`.
        top_k (`int`): The k of recall@k.
        num_queries (`int`): Number of held-out queries measured.
        noise (`float`, *optional*): Relative noise of the held-out queries (`None`: real queries were given).
        seed (`int`): Seed of the held-out sample.
        reached (`bool`): Whether `recall >= target`.
        curve (`tuple[tuple[int, float], ...]`): Every `(value, recall)` measured, by value.
        num_candidates (`int`, *optional*): FAISS only: candidates re-scored exactly per query, calibrated after
            `nprobe` (the smallest count that keeps the target at that `nprobe`). For HNSW, `ef` is the count.
        candidates_curve (`tuple[tuple[int, float], ...]`): Every `(num_candidates, recall)` measured.
        confidence (`float`, *optional*): Confidence of the lower bound that had to reach `target` (`None`: the
            mean recall had to).
        recall_lower_bound (`float`, *optional*): That bound at the chosen values.
    """

    parameter: str
    value: int
    recall: float
    target: float
    top_k: int
    num_queries: int
    noise: float | None
    seed: int
    reached: bool
    curve: tuple[tuple[int, float], ...] = ()
    num_candidates: int | None = None
    candidates_curve: tuple[tuple[int, float], ...] = ()
    confidence: float | None = None
    recall_lower_bound: float | None = None

    def __post_init__(self):
        if self.parameter not in _PARAMETERS:
            raise ConfigError(f"`parameter` must be one of {_PARAMETERS}, but is {self.parameter!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "parameter": self.parameter,
            "value": self.value,
            "recall": self.recall,
            "target": self.target,
            "top_k": self.top_k,
            "num_queries": self.num_queries,
            "noise": self.noise,
            "seed": self.seed,
            "reached": self.reached,
            "curve": [[int(v), float(r)] for v, r in self.curve],
            "num_candidates": self.num_candidates,
            "candidates_curve": [[int(v), float(r)] for v, r in self.candidates_curve],
            "confidence": self.confidence,
            "recall_lower_bound": self.recall_lower_bound,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecallCalibration:
        """Parse a manifest entry; raises `ValueError` naming the bad field (the manifest is untrusted)."""

        def number(key: str, kind: type, minimum: float, maximum: float | None = None):
            value = data.get(key)
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if kind is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            if not ok or not (minimum <= value <= (maximum if maximum is not None else float("inf"))):
                raise ValueError(
                    f"calibration.{key} must be a {kind.__name__} in [{minimum}, {maximum}], got {value!r}"
                )
            return kind(value)

        if not isinstance(data, Mapping):
            raise ValueError(f"calibration must be an object, got {type(data).__name__}")
        parameter = data.get("parameter")
        if parameter not in _PARAMETERS:
            raise ValueError(f"calibration.parameter must be one of {_PARAMETERS}, got {parameter!r}")
        noise = data.get("noise")
        if noise is not None:
            noise = number("noise", float, 0.0, 1e6)
        reached = data.get("reached")
        if not isinstance(reached, bool):
            raise ValueError(f"calibration.reached must be a boolean, got {reached!r}")
        confidence = data.get("confidence")
        if confidence is not None:
            confidence = number("confidence", float, 0.5, 1.0)
        bound = data.get("recall_lower_bound")
        if bound is not None:
            bound = number("recall_lower_bound", float, -1.0, 1.0)
        num_candidates = data.get("num_candidates")
        if num_candidates is not None:
            num_candidates = number("num_candidates", int, 1, 2**31)
        return cls(
            parameter=parameter,
            value=number("value", int, 1, 2**31),
            recall=number("recall", float, 0.0, 1.0),
            target=number("target", float, 0.0, 1.0),
            top_k=number("top_k", int, 1, 2**31),
            num_queries=number("num_queries", int, 1, 2**31),
            noise=noise,
            seed=number("seed", int, 0, 2**63),
            reached=reached,
            curve=_parse_curve(data.get("curve", []), "curve"),
            num_candidates=num_candidates,
            candidates_curve=_parse_curve(data.get("candidates_curve", []), "candidates_curve"),
            confidence=confidence,
            recall_lower_bound=bound,
        )


def _parse_curve(curve: Any, name: str) -> tuple[tuple[int, float], ...]:
    if not isinstance(curve, list) or len(curve) > 4096:
        raise ValueError(f"calibration.{name} must be a list of at most 4096 [value, recall] pairs")
    parsed = []
    for item in curve:
        if not (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], int)
            and not isinstance(item[0], bool)
            and item[0] >= 1
            and isinstance(item[1], (int, float))
            and not isinstance(item[1], bool)
            and 0.0 <= item[1] <= 1.0
        ):
            raise ValueError(f"calibration.{name} holds an invalid entry {item!r}")
        parsed.append((int(item[0]), float(item[1])))
    return tuple(parsed)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    r"""
    Mean fraction of each row of `truth` (exact top-k positions) found in the same row of `found`.

    Args:
        found (`np.ndarray` of shape `(num_queries, m)`): Positions returned by the approximate search (-1 = none).
        truth (`np.ndarray` of shape `(num_queries, k)`): Exact top-k positions.
    """
    found, truth = np.asarray(found), np.asarray(truth)
    if found.ndim != 2 or truth.ndim != 2 or len(found) != len(truth):
        raise ConfigError(f"`found` {found.shape} and `truth` {truth.shape} must be 2-D with the same number of rows.")
    if truth.shape[1] == 0:
        return 1.0
    hits = [len(np.intersect1d(f[f >= 0], t)) / len(t) for f, t in zip(found, truth)]
    return float(np.mean(hits))


def held_out_queries(
    rows: Any, num_queries: int = 200, *, noise: float = 0.25, seed: int = 0
) -> tuple[np.ndarray, torch.Tensor]:
    r"""
    Noisy copies of rows sampled from an index, to measure recall on.

    Args:
        rows ([`~diffusers_dmin.search.ExactSearch`]): The index's rows.
        num_queries (`int`, *optional*, defaults to 200): Rows to sample (all rows when fewer).
        noise (`float`, *optional*, defaults to 0.25): Gaussian noise added to each sampled row, with norm about
            `noise` times the row's norm (0 queries the rows themselves).
        seed (`int`, *optional*, defaults to 0): Seed of the sample and of the noise.

    Returns:
        `tuple[np.ndarray, torch.Tensor]`: The sampled row positions `(m,)` and the float32 queries `(m, T*K)`.
    """
    if not isinstance(num_queries, int) or isinstance(num_queries, bool) or num_queries < 1:
        raise ConfigError(f"`num_queries` must be a positive integer, but is {num_queries!r}.")
    if not isinstance(noise, (int, float)) or isinstance(noise, bool) or not 0 <= noise < 1e6:
        raise ConfigError(f"`noise` must be a float >= 0 (e.g. 0.25), but is {noise!r}.")
    rng = np.random.default_rng(seed)
    count = min(num_queries, rows.num_rows)
    positions = np.sort(rng.choice(rows.num_rows, size=count, replace=False)).astype(np.int64)
    queries = rows.gather(positions)
    if noise:
        generator = torch.Generator().manual_seed(int(seed))
        scale = noise * queries.norm(dim=1, keepdim=True) / queries.shape[1] ** 0.5
        queries = queries + scale * torch.randn(queries.shape, generator=generator)
    return positions, queries


def _recall_bound(found: np.ndarray, truth: np.ndarray, z: float) -> tuple[float, float]:
    """Mean recall@k over the queries and its one-sided lower confidence bound `mean - z * standard error`."""
    per_query = np.array([len(np.intersect1d(f[f >= 0], t)) / len(t) for f, t in zip(found, truth)])
    if len(per_query) < 2:
        return float(per_query.mean()), float(per_query.mean())
    error = per_query.std(ddof=1) / np.sqrt(len(per_query))
    return float(per_query.mean()), float(per_query.mean() - z * error)


def _z(confidence: float | None) -> float:
    if confidence is None:
        return 0.0
    if not isinstance(confidence, float) or not 0.5 <= confidence < 1:
        raise ConfigError(f"`confidence` must be a float in [0.5, 1) or None, e.g. 0.95, but is {confidence!r}.")
    return statistics.NormalDist().inv_cdf(confidence)


def smallest_reaching(
    search_at: Callable[[int], np.ndarray],
    truth: np.ndarray,
    *,
    target: float,
    low: int,
    high: int,
    name: str,
    confidence: float | None = 0.95,
) -> tuple[int, dict[int, float], dict[int, float]]:
    """Doubling then bisection (see [`calibrate_recall`]): the value found, and `{value: mean recall}` and
    `{value: lower confidence bound}` of every value measured."""
    z = _z(confidence)
    curve: dict[int, float] = {}
    bounds: dict[int, float] = {}

    def measure(value: int) -> float:
        if value not in curve:
            curve[value], bounds[value] = _recall_bound(np.asarray(search_at(value)), truth, z)
            logger.info(f"{name}={value}: recall@{truth.shape[1]} = {curve[value]:.4f} (bound {bounds[value]:.4f})")
        return bounds[value]

    missed, value = low - 1, low
    while measure(value) < target and value < high:
        missed, value = value, min(high, 2 * value)
    if bounds[value] >= target:
        passed = value
        while passed - missed > 1:
            middle = (missed + passed) // 2
            if measure(middle) >= target:
                passed = middle
            else:
                missed = middle
        value = passed
    return value, curve, bounds


def calibrate_recall(
    search_at: Callable[[int], np.ndarray],
    truth: np.ndarray,
    *,
    parameter: str,
    target: float = 0.95,
    low: int = 1,
    high: int,
    noise: float | None = None,
    seed: int = 0,
    confidence: float | None = 0.95,
) -> RecallCalibration:
    r"""
    Find the smallest value `v` in `[low, high]` for which `search_at(v)` reaches recall@k `target` against `truth`.

    Values are tried doubling from `low` until the target is reached (or `high`), then bisected between the last
    value that missed and the first that reached it. Recall is assumed to grow with the value (it does for `ef` and
    `nprobe` up to ties), so the result is the smallest such value up to that assumption.

    "Reaches" means the one-sided lower confidence bound of the mean recall over the held-out queries (mean minus
    z standard errors, z from `confidence`) is at least `target`, so that the recall holds on queries not used
    to calibrate: picking the smallest value whose sample mean just touches the target gave 0.937-0.949 on fresh
    queries for a 0.95 target in `benchmarks/bench_growth.py`. `confidence=None` compares the mean itself.

    Args:
        search_at (`Callable[[int], np.ndarray]`): Runs the approximate search with the given `ef`/`nprobe` on the
            held-out queries and returns positions `(num_queries, >= k)`.
        truth (`np.ndarray` of shape `(num_queries, k)`): Exact top-k positions of the same queries.
        parameter (`str`): `"ef"` or `"nprobe"`, recorded in the result.
        target (`float`, *optional*, defaults to 0.95): Requested recall@k, in (0, 1].
        low (`int`, *optional*, defaults to 1), high (`int`): Range of values to try.
        noise (`float`, *optional*), seed (`int`, *optional*, defaults to 0): How the queries were made (recorded).
        confidence (`float`, *optional*, defaults to 0.95): One-sided confidence of the bound compared to `target`.

    Returns:
        [`RecallCalibration`]: `reached=False` (with a logged warning) when even `high` misses the target.
    """
    if parameter not in _PARAMETERS:
        raise ConfigError(f"`parameter` must be one of {_PARAMETERS}, but is {parameter!r}.")
    if not isinstance(target, (int, float)) or isinstance(target, bool) or not 0 < target <= 1:
        raise ConfigError(f"`target` must be a recall in (0, 1], e.g. 0.95, but is {target!r}.")
    if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high):
        raise ConfigError(f"`low` and `high` must be integers with 1 <= low <= high, but are {low!r}, {high!r}.")
    truth = np.asarray(truth)
    value, curve, bounds = smallest_reaching(
        search_at, truth, target=target, low=low, high=high, name=parameter, confidence=confidence
    )
    reached = bounds[value] >= target
    if not reached:
        logger.warning(
            f"Recall@{truth.shape[1]} {curve[value]:.3f} at the largest {parameter}={value} is below the target "
            f"{target}; searching with {parameter}={value}. Re-score more candidates or use exact search."
        )
    return RecallCalibration(
        parameter=parameter,
        value=int(value),
        recall=float(curve[value]),
        target=float(target),
        top_k=int(truth.shape[1]),
        num_queries=int(len(truth)),
        noise=None if noise is None else float(noise),
        seed=int(seed),
        reached=bool(reached),
        curve=tuple(sorted(curve.items())),
        confidence=confidence,
        recall_lower_bound=float(bounds[value]),
    )
