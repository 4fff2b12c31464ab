"""Metrics of the quality benchmarks: detection rate, score fidelity, LDS, removal effects, stroke thickness."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


# ---------------------------------------------------------------------------------------------- rankings


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the `k` largest scores of each row, best first (ties broken by index)."""
    scores = np.asarray(scores)
    order = np.argsort(-scores, axis=1, kind="stable")
    return order[:, :k]


def detection_rate(retrieved_labels: np.ndarray, query_labels: Sequence) -> np.ndarray:
    r"""
    The paper's detection rate per query (paper.md §4.3): the share of a query's top-k retrieved training samples
    whose label (subset, or digit class) equals the query's label.

    Args:
        retrieved_labels: `(Q, k)` labels of the retrieved samples, best first.
        query_labels: `(Q,)` label of each query.

    Returns:
        `(Q,)` float shares in `[0, 1]`.
    """
    retrieved = np.asarray(retrieved_labels)
    query = np.asarray(query_labels).reshape(-1, 1)
    return (retrieved == query).mean(axis=1)


def detection_table(
    rankings: np.ndarray, train_labels: np.ndarray, query_labels: Sequence, ks: Sequence[int], groups: Sequence
) -> dict:
    r"""
    Detection rates of one method at several k, per group (subset) and on average.

    Args:
        rankings: `(Q, >= max(ks))` training-row positions, best first.
        train_labels: `(N,)` label of each training row.
        query_labels: `(Q,)` label of each query.
        ks: the k values.
        groups: the groups to report (the average is the mean of the per-group means: every subset counts once).

    Returns:
        `{"k=5": {"per_group": {group: rate}, "mean": macro average, "per_query": [...]}, ...}`
    """
    train_labels = np.asarray(train_labels)
    query_labels = np.asarray(query_labels)
    out = {}
    for k in ks:
        per_query = detection_rate(train_labels[rankings[:, :k]], query_labels)
        per_group = {g: float(per_query[query_labels == g].mean()) for g in groups if (query_labels == g).any()}
        out[f"k={k}"] = {
            "per_group": per_group,
            "mean": float(np.mean(list(per_group.values()))),
            "per_query": per_query.tolist(),
        }
    return out


# ---------------------------------------------------------------------------------------------- fidelity


def _rank(values: np.ndarray) -> np.ndarray:
    """Average ranks along the last axis (ties share their mean rank), as Spearman's rho needs."""
    from scipy.stats import rankdata

    return rankdata(values, axis=-1)


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row of `a` with the same row of `b`."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    denom = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    return np.where(denom > 0, (a * b).sum(-1) / np.where(denom > 0, denom, 1.0), np.nan)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return pearson_rows(_rank(np.asarray(a)), _rank(np.asarray(b)))


def topk_overlap(a: np.ndarray, b: np.ndarray, k: int = 10) -> np.ndarray:
    """|top-k(a) ∩ top-k(b)| / k for each row."""
    ta, tb = top_k(a, k), top_k(b, k)
    return np.array([len(set(x) & set(y)) / k for x, y in zip(ta, tb)])


def fidelity(approx: np.ndarray, exact: np.ndarray, k: int = 10) -> dict:
    """Mean over queries (rows) of Pearson, Spearman and top-k overlap between approximate and exact scores."""
    return {
        "pearson": float(np.nanmean(pearson_rows(approx, exact))),
        "spearman": float(np.nanmean(spearman_rows(approx, exact))),
        f"top{k}_overlap": float(np.mean(topk_overlap(approx, exact, k))),
    }


# ---------------------------------------------------------------------------------------------- counterfactuals


def lds(predicted: np.ndarray, actual: np.ndarray) -> np.ndarray:
    r"""
    Linear datamodeling score per query (Park et al. 2023, TRAK): the Spearman correlation, over M training subsets,
    between the attribution's prediction for each subset and the measured outcome.

    Args:
        predicted: `(Q, M)` predicted outcomes (e.g. minus the summed influence of the subset's samples).
        actual: `(Q, M)` measured outcomes (the query's loss after training on each subset).
    """
    return spearman_rows(predicted, actual)


def subset_predictions(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """`(Q, M)` predicted loss of each query for each subset: minus the summed scores of the included samples.

    DMin's score is a gradient alignment: a positive score means training on the sample lowers the query's loss.
    """
    return -(np.asarray(scores, dtype=np.float64) @ np.asarray(masks, dtype=np.float64).T)


# ---------------------------------------------------------------------------------------------- thickness


def stroke_thickness(images: torch.Tensor | np.ndarray, upsample: int = 4, threshold: float = 0.5) -> np.ndarray:
    r"""
    A simple stroke-thickness metric for white-on-black digits: the mean local stroke width along the skeleton.

    Each image (`(n, 1, h, w)` or `(n, h, w)` in `[0, 1]`) is upsampled `upsample` times (bilinear) and thresholded
    at `threshold`; the local width at a skeleton pixel (scikit-image `skeletonize`) is twice its Euclidean distance
    to the background (`scipy.ndimage.distance_transform_edt`). The result is the mean width over the skeleton, in
    pixels of the original image. Images with no ink get thickness 0.
    """
    from scipy.ndimage import distance_transform_edt
    from skimage.morphology import skeletonize

    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.dim() == 3:
        x = x[:, None]
    big = torch.nn.functional.interpolate(x, scale_factor=upsample, mode="bilinear", align_corners=False)[:, 0]
    out = np.zeros(len(big))
    for i, image in enumerate(big.numpy()):
        ink = image > threshold
        if not ink.any():
            continue
        skeleton = skeletonize(ink)
        distance = distance_transform_edt(np.pad(ink, 1))[1:-1, 1:-1]
        out[i] = 2.0 * distance[skeleton].mean() / upsample
    return out


# ---------------------------------------------------------------------------------------------- summaries


def summary(values: Sequence[float]) -> dict:
    """mean, sample std, standard error and count."""
    values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if values.size == 0:
        return {"mean": None, "std": None, "sem": None, "n": 0}
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    return {"mean": float(values.mean()), "std": std, "sem": std / np.sqrt(values.size), "n": int(values.size)}
