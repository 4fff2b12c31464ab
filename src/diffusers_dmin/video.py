"""Reading training videos (and video queries) for video families, the way a build reads images.

A video family's adapter has `num_frames` set (e.g. CogVideoX); for such a pipeline, `GradientIndex.build`, `dmin
build` and `dmin search` read the image column as a video per row. [`decode_video`] turns one value into its frames,
[`prepare_video`] resizes and center-crops every frame exactly like a training image ([`prepare_images`]) and checks
the frame count. Only what Pillow reads is supported: frames as images or arrays, an animated GIF (or animated
WebP/PNG), or a folder of frame images; there is no video decoder (mp4 and the like: extract the frames first, e.g.
`ffmpeg -i clip.mp4 clip/%04d.png`).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageSequence
import torch

from .errors import ConfigError
from .images import decode_image
from .objectives import prepare_images


__all__ = ["decode_video", "prepare_video"]

_DIGITS = re.compile(r"(\d+)")


def decode_video(value: Any, image_root: str | os.PathLike | None = None) -> list[PIL.Image.Image | np.ndarray]:
    r"""
    Turn one value of a video column into its frames (PIL images, or arrays in `[0, 1]`), the way a build reads it.

    Args:
        value: One of
            - a list of frames, each anything [`~images.decode_image`] reads (PIL images, `datasets.Image` values such
              as a `List(Image())` column holds, paths, `(H, W[, C])` arrays);
            - an `(F, H, W[, C])` array or nested list (integer values are taken as 0..255 and divided by 255);
            - a path to an animated image file (GIF, animated WebP/PNG: every frame) or to a folder of frame images
              (every image file in it, in natural name order: `2.png` before `10.png`); relative paths are resolved
              against `image_root`;
            - a `datasets.Image` value (`{"bytes": ..., "path": ...}`) or an opened PIL image of an animated file.
        image_root (`str` or `os.PathLike`, *optional*): Folder for relative paths (default: the working directory).

    Raises:
        `OSError`, `ValueError`: The video cannot be read (a missing or corrupt file, an empty folder, a missing value).
    """
    if value is None:
        raise ValueError("the video is missing (None)")
    if isinstance(value, (str, os.PathLike)):
        path = Path(value)
        if not path.is_absolute() and image_root is not None:
            path = Path(image_root) / path
        return _frame_folder(path) if path.is_dir() else _animated_frames(path)
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            return _animated_frames(io.BytesIO(value["bytes"]))
        if value.get("path") is None:
            raise ValueError("the video has neither bytes nor a path")
        return decode_video(value["path"], image_root)
    if isinstance(value, PIL.Image.Image):
        return _frames_of(value)
    if isinstance(value, (list, tuple)) and not _is_numeric(value):
        return [decode_image(frame, image_root) for frame in value]
    array = np.asarray(value)
    if array.ndim not in (3, 4) or array.dtype.kind not in "uif" or 0 in array.shape:
        raise ValueError(
            f"a video array must be (F, H, W, C) or (F, H, W) numbers, but has shape {array.shape} ({array.dtype})"
        )
    array = array.astype(np.float32) / 255.0 if array.dtype.kind in "ui" else array.astype(np.float32)
    return list(array)


def prepare_video(
    frames: Sequence[Any],
    resolution: tuple[int, int] | int,
    channels: int,
    num_frames: int,
    *,
    source: str = "the video",
) -> torch.Tensor:
    """
    Check the frame count, then resize (shorter side) and center-crop every frame to `resolution` like a training
    image ([`prepare_images`]).

    Args:
        frames: The frames of one video (e.g. from [`decode_video`]).
        resolution (`int` or `(height, width)`), channels (`int`): The adapter's input size and channels.
        num_frames (`int`): The frames the pipeline takes (the adapter's `num_frames`).
        source (`str`, *optional*): What the video is, for the error message (e.g. `"the video in column 'video'"`).

    Returns:
        A float32 `(1, num_frames, channels, H, W)` tensor in `[0, 1]`.

    Raises:
        [`ConfigError`]: The video has another number of frames.
    """
    if len(frames) != num_frames:
        raise ConfigError(
            f"{source} has {len(frames)} frame(s), but this pipeline takes videos of exactly {num_frames} frames (its "
            f"adapter's `num_frames`); trim or resample the video to {num_frames} frames."
        )
    return torch.cat([prepare_images(frame, resolution, channels) for frame in frames]).unsqueeze(0)


def _is_numeric(value: Sequence[Any]) -> bool:
    """A nested list of numbers (as a `datasets` column of arrays reads back), not a list of frames."""
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _frames_of(image: PIL.Image.Image) -> list[PIL.Image.Image]:
    """Every frame of an opened (possibly animated) image, each a decoded copy."""
    return [frame.copy() for frame in PIL.ImageSequence.Iterator(image)]


def _animated_frames(source: Any) -> list[PIL.Image.Image]:
    try:
        image = PIL.Image.open(source)
    except PIL.UnidentifiedImageError as err:  # e.g. an mp4: there is no video decoder here
        raise ValueError(
            f"{err}. Videos are read with Pillow only: animated GIF/WebP/PNG files or folders of frame images; "
            "extract the frames of other formats first (e.g. `ffmpeg -i clip.mp4 clip/%04d.png`)"
        ) from err
    with image:
        return _frames_of(image)


def _frame_folder(folder: Path) -> list[PIL.Image.Image]:
    extensions = set(PIL.Image.registered_extensions())
    files = [
        p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions
    ]
    if not files:
        raise ValueError(f"the folder {str(folder)!r} holds no frame images")
    files.sort(key=lambda p: [int(part) if part.isdigit() else part for part in _DIGITS.split(p.name)])
    frames = []
    for path in files:
        with PIL.Image.open(path) as image:
            image.load()
            frames.append(image.copy())
    return frames
