"""Image conversion in one place: reading a dataset's image values ([`decode_image`]) and turning images, arrays and
tensors into RGB PIL images for display ([`to_pil`]). Model-input preprocessing (resize, center crop, channels, the
`[0, 1]` tensor a training script feeds) is [`~objectives.prepare_images`]; videos are [`video`].
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image

from .errors import ConfigError


__all__ = ["decode_image", "to_pil"]


def decode_image(value: Any, image_root: str | os.PathLike | None = None) -> PIL.Image.Image | np.ndarray:
    r"""
    Turn one value of an image column into a PIL image (or an array in `[0, 1]`), the way a build reads it.

    Args:
        value: A PIL image; a `datasets.Image` value (`{"bytes": ..., "path": ...}`); a path (relative paths are
            resolved against `image_root`); or an `(H, W[, C])` array (uint8 values are divided by 255).
        image_root (`str` or `os.PathLike`, *optional*): Folder for relative paths (default: the working directory).

    Raises:
        `OSError`, `ValueError`: The image cannot be read (a missing or corrupt file, a missing value).
    """
    if value is None:
        raise ValueError("the image is missing (None)")
    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, (str, os.PathLike)):
        return _open_image(resolve_path(value, image_root))
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return _open_image(io.BytesIO(value["bytes"]))
        path = value.get("path")
        if path is None:
            raise ValueError("the image has neither bytes nor a path")
        if "://" in path:  # remote files (hf://...) need datasets' resolver
            import datasets

            return datasets.Image().decode_example(dict(value))
        return _open_image(resolve_path(path, image_root))
    array = np.asarray(value)
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    return array


def resolve_path(path: str | os.PathLike, image_root: str | os.PathLike | None) -> Path:
    candidate = Path(path)
    if not candidate.is_absolute() and image_root is not None:
        candidate = Path(image_root) / candidate
    return candidate


def _open_image(source: Any) -> PIL.Image.Image:
    image = PIL.Image.open(source)
    image.load()  # decode now, so that a truncated file fails here, with its row id
    return image


def to_pil(image: Any) -> PIL.Image.Image:
    """Convert a PIL image, an `(H, W[, C])` array in [0, 1] or 0..255, or a `(C, H, W)` tensor in [0, 1] to RGB; a
    video (a list of such frames, an `(F, H, W, C)` array or an `(F, C, H, W)` tensor) to its first frame."""
    if (isinstance(image, (list, tuple)) and image) or getattr(image, "ndim", 0) == 4:
        return to_pil(image[0])
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    if type(image).__module__.startswith("torch"):
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
