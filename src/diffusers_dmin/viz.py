"""Grids of a query image next to its most influential training images, with ids and scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageOps
import torch

from .errors import ConfigError


__all__ = ["to_pil", "make_row", "make_grid"]

_CAPTION_HEIGHT = 24
_PAD = 4


def to_pil(image: Any) -> PIL.Image.Image:
    """Convert a PIL image, an `(H, W[, C])` array in [0, 1] or 0..255, or a `(C, H, W)` tensor in [0, 1] to RGB."""
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    if isinstance(image, torch.Tensor):
        array = image.detach().float().cpu().numpy()
        if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
            array = array.transpose(1, 2, 0)
        elif array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] > 4:
            array = array.transpose(1, 2, 0)
    elif isinstance(image, np.ndarray):
        array = image
    else:
        raise ConfigError(
            f"Cannot draw an image of type {type(image).__name__}; pass a PIL image, a numpy array or a tensor."
        )
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise ConfigError(f"Cannot draw an array of shape {array.shape}; expected (H, W), (H, W, C) or (C, H, W).")
    if array.dtype != np.uint8:
        array = np.asarray(array, dtype=np.float32)
        scale = 255.0 if array.size and float(np.nanmax(array)) <= 1.0 + 1e-6 else 1.0
        array = np.clip(np.round(array * scale), 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(array).convert("RGB")


def _tile(image: PIL.Image.Image, caption: str, size: int) -> PIL.Image.Image:
    thumb = PIL.ImageOps.contain(
        image, (size, size), method=PIL.Image.NEAREST if max(image.size) < size else PIL.Image.BICUBIC
    )
    tile = PIL.Image.new("RGB", (size, size + _CAPTION_HEIGHT), "white")
    tile.paste(thumb, ((size - thumb.width) // 2, (size - thumb.height) // 2))
    draw = PIL.ImageDraw.Draw(tile)
    for line_no, line in enumerate(caption.split("\n")[:2]):
        draw.text((2, size + 1 + 11 * line_no), line, fill="black")
    return tile


def make_row(
    query: Any | None,
    images: Sequence[Any],
    scores: Sequence[float],
    sample_ids: Sequence[Any],
    *,
    thumb_size: int = 64,
    query_caption: str = "query",
) -> PIL.Image.Image:
    """One row: the query (when given), then each training image captioned with its id and score."""
    if not (len(images) == len(scores) == len(sample_ids)):
        raise ConfigError(
            f"`images`, `scores` and `sample_ids` must have the same length, but have {len(images)}, {len(scores)} "
            f"and {len(sample_ids)}."
        )
    tiles = [] if query is None else [_tile(to_pil(query), query_caption, thumb_size)]
    tiles += [
        _tile(to_pil(im), f"#{sid}\n{float(sc):+.3f}", thumb_size) for im, sc, sid in zip(images, scores, sample_ids)
    ]
    if not tiles:
        raise ConfigError("Nothing to draw: give a query or at least one training image.")
    row = PIL.Image.new(
        "RGB", (len(tiles) * (thumb_size + _PAD) + _PAD, thumb_size + _CAPTION_HEIGHT + 2 * _PAD), "white"
    )
    for i, tile in enumerate(tiles):
        row.paste(tile, (_PAD + i * (thumb_size + _PAD), _PAD))
    if query is not None:  # a separator after the query
        x = _PAD + thumb_size + _PAD // 2
        PIL.ImageDraw.Draw(row).line([(x, 0), (x, row.height)], fill=(200, 0, 0), width=1)
    return row


def make_grid(rows: Sequence[PIL.Image.Image]) -> PIL.Image.Image:
    """Stack rows (e.g. from [`make_row`]) vertically, left-aligned."""
    if not rows:
        raise ConfigError("`rows` is empty; there is nothing to draw.")
    grid = PIL.Image.new("RGB", (max(r.width for r in rows), sum(r.height for r in rows)), "white")
    y = 0
    for row in rows:
        grid.paste(row, (0, y))
        y += row.height
    return grid
