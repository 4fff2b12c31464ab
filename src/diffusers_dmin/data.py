"""The bundled handwritten digits: real training data that ships inside a Python package (scikit-learn), so examples,
tests and benchmarks never download anything. (Loading a user's training set is [`training_data`].)

scikit-learn's bundled handwritten digits (the UCI "Optical Recognition of Handwritten Digits" test
set: 1,797 grey-scale 8x8 images of the digits 0-9, about 180 per class). scikit-learn is an optional dependency
(extras `examples` and `test`); it is imported only when a function here is called.

Every row keeps its position in scikit-learn's order as `id` (0..1796), whatever `split` slice is loaded, so the
ids an influence index stores point back at the same digit everywhere.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import ConfigError, require
from .logging import get_logger


if TYPE_CHECKING:
    import datasets

logger = get_logger(__name__)

__all__ = ["load_digits", "digits_tensor"]

_NUM_DIGITS = 1797
_CAPTION = "a handwritten digit {label}"
_SPLIT_PATTERN = re.compile(r"^train(?:\[(-?\d*)(%?):(-?\d*)(%?)\])?$")
_DESCRIPTION = (
    "scikit-learn's bundled handwritten digits (UCI Optical Recognition of Handwritten Digits, test set): "
    "1,797 8x8 grey-scale digits, upscaled bilinearly, white strokes on black."
)
_CITATION = (
    "Alpaydin, E. and Kaynak, C. (1998). Optical Recognition of Handwritten Digits. UCI Machine Learning "
    "Repository. https://doi.org/10.24432/C50P49"
)


def load_digits(image_size: int = 16, *, split: str | None = None) -> datasets.Dataset:
    r"""
    Load scikit-learn's 1,797 real handwritten digits as a 🤗 Datasets table of grey-scale images with captions.

    The 8x8 digits (intensities 0-16) are scaled to [0, 1], upscaled bilinearly to `image_size` (half-pixel
    centres, no antialiasing, as `torch.nn.functional.interpolate(mode="bilinear")`), so strokes stay thick and
    soft, and stored as 8-bit images: white strokes on a black background. Nothing is downloaded: the data ships
    inside the scikit-learn wheel.

    Args:
        image_size (`int`, *optional*, defaults to 16):
            Height and width of the returned images, at least 8 (8 returns the original pixels).
        split (`str`, *optional*):
            Rows to return, in 🤗 Datasets slice syntax on the single split `"train"`: `"train"` (all rows, the
            same as leaving it unset), `"train[:100]"`, `"train[100:200]"`, `"train[-10%:]"`. Slices keep the
            original `id`s.

    Returns:
        `datasets.Dataset`: One row per digit, in scikit-learn's order, with the columns

        - `id` (`int64`): position in scikit-learn's order, 0..1796.
        - `image` (`PIL.Image.Image`): grey-scale (mode `"L"`) image of size `(image_size, image_size)`.
        - `label` (`int`, a `ClassLabel` named `"0"`..`"9"`): the digit.
        - `text` (`str`): the caption `"a handwritten digit {label}"`, e.g. `"a handwritten digit 3"`.

    Raises:
        [`MissingDependencyError`]: scikit-learn is not installed.
        [`ConfigError`]: `image_size` or `split` has a value we cannot use.

    Examples:
    ```py
    >>> from diffusers_dmin.data import load_digits

    >>> dataset = load_digits(image_size=16)
    >>> dataset
    Dataset({
        features: ['id', 'image', 'label', 'text'],
        num_rows: 1797
    })
    >>> row = dataset[3]
    >>> row["id"], row["label"], row["text"], row["image"].size, row["image"].mode
    (3, 3, 'a handwritten digit 3', (16, 16), 'L')
    >>> load_digits(split="train[:10%]").num_rows
    180

    ```
    """
    import datasets

    pixels, labels = _digits_uint8(_check_image_size(image_size))
    start, stop = _resolve_split(split)
    from PIL import Image

    features = datasets.Features(
        {
            "id": datasets.Value("int64"),
            "image": datasets.Image(),
            "label": datasets.ClassLabel(names=[str(digit) for digit in range(10)]),
            "text": datasets.Value("string"),
        }
    )
    rows = range(start, stop)
    data = {
        "id": list(rows),
        "image": [Image.fromarray(pixels[i]) for i in rows],
        "label": [int(labels[i]) for i in rows],
        "text": [_CAPTION.format(label=int(labels[i])) for i in rows],
    }
    info = datasets.DatasetInfo(
        features=features,
        description=_DESCRIPTION,
        citation=_CITATION,
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        license="BSD-3-Clause (scikit-learn); the UCI data is CC BY 4.0",
    )
    dataset = datasets.Dataset.from_dict(data, info=info, split=datasets.Split.TRAIN)
    logger.debug(f"Loaded {dataset.num_rows} digits (ids {start}..{stop - 1}) at {image_size}x{image_size}.")
    return dataset


def digits_tensor(image_size: int = 16, *, split: str | None = None) -> torch.Tensor:
    r"""
    The digits of [`load_digits`] as one float tensor, ready to train a diffusion model on.

    Row `i` holds the digit whose `id` is `i + start` (`start` is 0 unless `split` slices the rows), with exactly
    the pixel values of the `image` column (8-bit, then scaled), so a model trained on this tensor sees the
    same inputs as code that reads the dataset's images.

    Args:
        image_size (`int`, *optional*, defaults to 16):
            Height and width, at least 8.
        split (`str`, *optional*):
            Rows to return, as in [`load_digits`], e.g. `"train[:100]"`.

    Returns:
        `torch.Tensor` of shape `(num_rows, 1, image_size, image_size)`: `float32` values in [-1, 1] (`-1` is the
        black background).

    Examples:
    ```py
    >>> from diffusers_dmin.data import digits_tensor

    >>> images = digits_tensor(16)
    >>> images.shape, images.dtype, float(images.min()), float(images.max())
    (torch.Size([1797, 1, 16, 16]), torch.float32, -1.0, 1.0)

    ```
    """
    pixels, _ = _digits_uint8(_check_image_size(image_size))
    start, stop = _resolve_split(split)
    images = torch.from_numpy(pixels[start:stop].copy()).unsqueeze(1).float()
    return images / 127.5 - 1.0


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ConfigError(
            f"`image_size` must be an integer of at least 8 (the digits are 8x8), but is {image_size!r}. "
            "Pass e.g. `image_size=16`."
        )
    return int(image_size)


def _resolve_split(split: str | None) -> tuple[int, int]:
    """Turn `None`, `"train"` or a slice such as `"train[10:20%]"` into absolute `(start, stop)` row bounds."""
    if split is None:
        return 0, _NUM_DIGITS
    match = _SPLIT_PATTERN.match(split.replace(" ", "")) if isinstance(split, str) else None
    if match is None:
        raise ConfigError(
            f"`split` must be None, 'train' or a slice of it such as 'train[:100]' or 'train[-10%:]', but is "
            f"{split!r}. scikit-learn's digits come as one split of {_NUM_DIGITS} rows."
        )
    from_, from_pct, to, to_pct = match.groups()
    start = _bound(from_, from_pct, default=0)
    stop = _bound(to, to_pct, default=_NUM_DIGITS)
    if stop <= start:
        raise ConfigError(f"`split={split!r}` selects no rows (rows {start} to {stop}); widen the slice.")
    return start, stop


def _bound(value: str, percent: str, default: int) -> int:
    if not value:
        return default
    index = int(value)
    if percent:
        index = round(_NUM_DIGITS * index / 100)
    if index < 0:
        index += _NUM_DIGITS
    return min(max(index, 0), _NUM_DIGITS)


@functools.lru_cache(maxsize=4)
def _digits_uint8(image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """`(pixels, labels)`: read-only uint8 arrays of shape `(1797, image_size, image_size)` and `(1797,)`."""
    require("sklearn", "`load_digits`", "pip install scikit-learn")
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    if image_size != 8:
        images = torch.nn.functional.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=False
        )
    pixels = (images.squeeze(1).clamp(0.0, 1.0) * 255.0).round().to(torch.uint8).numpy()
    labels = bunch.target.astype(np.int64)
    pixels.flags.writeable = False
    labels.flags.writeable = False
    return pixels, labels
