"""Baseline attributions: random, pixel-space cosine similarity, SSIM (scikit-image).

Each returns a `(Q, N)` score matrix (larger = more influential) for `Q` query images against `N` training images,
both float tensors `(n, C, H, W)` in `[0, 1]`, so every method goes through the same ranking and metric code.
"""

from __future__ import annotations

import numpy as np
import torch


def random_scores(num_queries: int, num_train: int, seed: int = 0) -> np.ndarray:
    """I.i.d. uniform scores: a uniformly random ranking per query."""
    return np.random.default_rng(seed).random((num_queries, num_train))


def pixel_cosine_scores(queries: torch.Tensor, train: torch.Tensor) -> np.ndarray:
    """Cosine similarity of the flattened pixel vectors (values in [0, 1])."""
    q = torch.nn.functional.normalize(queries.flatten(1).double(), dim=1)
    t = torch.nn.functional.normalize(train.flatten(1).double(), dim=1)
    return (q @ t.T).numpy()


def ssim_scores(queries: torch.Tensor, train: torch.Tensor) -> np.ndarray:
    """Structural similarity (`skimage.metrics.structural_similarity`, data range 1, 7x7 window, channels averaged)."""
    from skimage.metrics import structural_similarity

    q = queries.permute(0, 2, 3, 1).double().numpy()
    t = train.permute(0, 2, 3, 1).double().numpy()
    win = min(7, q.shape[1], q.shape[2])
    win -= 1 - win % 2  # odd
    out = np.empty((len(q), len(t)))
    for i, a in enumerate(q):
        for j, b in enumerate(t):
            out[i, j] = structural_similarity(a, b, data_range=1.0, channel_axis=2, win_size=win)
    return out
