"""Data that ships inside Python packages: the digits, and a mixed conditional set in the paper's image.

- `digits(image_size)`: scikit-learn's 1,797 real handwritten digits via `diffusers_dmin.data`, as a `[0, 1]` tensor
  plus labels.
- `build_mixed_set(...)`: the conditional training set of the detection-rate experiment (the paper's "mixed
  dataset", DESIGN §7), five subsets with captions plus 5% noise images, shuffled and split 80/20:

  | subset    | images                                                              | caption example                  |
  |-----------|---------------------------------------------------------------------|----------------------------------|
  | `digit`   | scikit-learn digits, upscaled                                      | "a handwritten digit seven"      |
  | `face`    | scikit-image `lfw_subset` faces (100) and their mirror images       | "a photo of a face"              |
  | `photo`   | random crops of scikit-image's colour photos (cat, coffee, rocket...) | "a color photo of a rocket"     |
  | `shape`   | synthetic filled shapes, random colours, sizes and positions       | "a red circle on blue"           |
  | `texture` | random crops of scikit-image's grey photos and textures            | "a gray texture of bricks"       |
  | `noise`   | uniform RGB noise (5% of the set)                                   | "random noise"                   |

Everything is a pure function of its arguments (seeded numpy generators), so the set is the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image


DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SUBSETS = ("digit", "face", "photo", "shape", "texture")
NOISE_SUBSET = "noise"
COLOR_PHOTOS = {  # scikit-image loader name -> caption word
    "astronaut": "astronaut",
    "chelsea": "cat",
    "coffee": "coffee",
    "rocket": "rocket",
    "hubble_deep_field": "galaxy",
    "immunohistochemistry": "tissue",
    "retina": "retina",
}
GRAY_PHOTOS = {
    "brick": "bricks",
    "grass": "grass",
    "gravel": "gravel",
    "coins": "coins",
    "moon": "moon",
    "page": "text",
    "camera": "camera",
}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 220, 50),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "purple": (140, 50, 170),
    "orange": (240, 140, 30),
}
SHAPES = ("circle", "square", "triangle", "cross")


# ---------------------------------------------------------------------------------------------- digits


def digits(image_size: int = 8) -> tuple[torch.Tensor, np.ndarray]:
    """`(images, labels)`: the 1,797 digits as a float32 `(N, 1, s, s)` tensor in `[0, 1]` and int64 labels."""
    from diffusers_dmin.data import digits_tensor, load_digits

    images = (digits_tensor(image_size) + 1.0) / 2.0
    labels = np.asarray(load_digits(8)["label"], dtype=np.int64)
    return images.clamp(0, 1), labels


# ---------------------------------------------------------------------------------------------- the mixed set


@dataclass
class MixedSet:
    """The mixed conditional set: `images` `(N, 3, s, s)` uint8, one caption and subset name per row, a split."""

    images: np.ndarray
    captions: list[str]
    subsets: list[str]
    split: np.ndarray  # "train" / "test"
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)

    @property
    def ids(self) -> np.ndarray:
        return np.arange(len(self), dtype=np.int64)

    def rows(self, split: str) -> np.ndarray:
        """Row ids (= sample ids) of one split, in order."""
        return np.flatnonzero(self.split == split)

    def pixels(self, rows: np.ndarray | None = None) -> torch.Tensor:
        """float32 `(n, 3, s, s)` in `[0, 1]`."""
        images = self.images if rows is None else self.images[rows]
        return torch.from_numpy(images.astype(np.float32) / 255.0)

    def words(self) -> list[str]:
        """Every word of every caption: the vocabulary of the offline tokenizer."""
        return sorted({word for caption in self.captions for word in caption.split()})


def _resize(array: np.ndarray, size: int) -> np.ndarray:
    """HxW or HxWx3 uint8 -> size x size x 3 uint8 (Lanczos, antialiased)."""
    image = Image.fromarray(array)
    image = image.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.uint8)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    array = array.astype(np.float64)
    if array.max() <= 1.0:
        array = array * 255.0
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


def _random_crops(sources: dict[str, str], count: int, size: int, rng: np.random.Generator, prefix: str):
    import skimage.data

    loaded = {name: _to_uint8(getattr(skimage.data, name)()) for name in sources}
    images, captions = [], []
    names = list(sources)
    for i in range(count):
        name = names[i % len(names)]
        image = loaded[name]
        if image.ndim == 3 and image.shape[2] == 4:
            image = image[..., :3]
        h, w = image.shape[:2]
        side = int(rng.uniform(0.15, 0.5) * min(h, w))
        top, left = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
        images.append(_resize(np.ascontiguousarray(image[top : top + side, left : left + side]), size))
        captions.append(f"{prefix} {sources[name]}")
    return images, captions


def _shape_image(size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
    names = list(COLORS)
    fg, bg = rng.choice(len(names), size=2, replace=False)
    shape = SHAPES[rng.integers(len(SHAPES))]
    scale = 4  # draw at 4x and downsample (antialiasing)
    big = size * scale
    yy, xx = np.mgrid[0:big, 0:big] + 0.5
    radius = rng.uniform(0.22, 0.42) * big
    cy, cx = rng.uniform(radius, big - radius, size=2)
    dy, dx = (yy - cy) / radius, (xx - cx) / radius
    if shape == "circle":
        mask = dy**2 + dx**2 <= 1.0
    elif shape == "square":
        mask = (np.abs(dy) <= 0.8) & (np.abs(dx) <= 0.8)
    elif shape == "triangle":
        mask = (dy <= 0.8) & (dy >= -1.0 + 1.8 * np.abs(dx))
    else:  # cross
        mask = ((np.abs(dy) <= 0.3) & (np.abs(dx) <= 1.0)) | ((np.abs(dx) <= 0.3) & (np.abs(dy) <= 1.0))
    canvas = np.empty((big, big, 3), dtype=np.uint8)
    canvas[:] = COLORS[names[bg]]
    canvas[mask] = COLORS[names[fg]]
    return _resize(canvas, size), f"a {names[fg]} {shape} on {names[bg]}"


def build_mixed_set(
    image_size: int = 16, per_subset: int = 200, noise_share: float = 0.05, seed: int = 42, test_share: float = 0.2
) -> MixedSet:
    r"""
    Build the mixed conditional set (module docstring): `per_subset` images for each of the five subsets, plus
    noise images making up `noise_share` of the whole, shuffled with `seed` and split `1 - test_share` /
    `test_share` into train and test (as the official code splits the paper's mixed set 80/20 after shuffling).
    """
    import skimage.data

    rng = np.random.default_rng(seed)
    images: list[np.ndarray] = []
    captions: list[str] = []
    subsets: list[str] = []

    def add(subset: str, imgs: list[np.ndarray], caps: list[str]) -> None:
        images.extend(imgs)
        captions.extend(caps)
        subsets.extend([subset] * len(imgs))

    # digits: a class-balanced random choice of the 1,797
    pixels, labels = digits(image_size)
    chosen = rng.permutation(len(labels))[:per_subset]
    add(
        "digit",
        [_resize((pixels[i, 0].numpy() * 255).round().astype(np.uint8), image_size) for i in chosen],
        [f"a handwritten digit {DIGIT_WORDS[labels[i]]}" for i in chosen],
    )
    # faces: the 100 lfw faces and their mirror images (then more mirrored/shifted copies if asked for more)
    faces = _to_uint8(skimage.data.lfw_subset()[:100])
    face_images = []
    for i in range(per_subset):
        face = faces[i % 100]
        if (i // 100) % 2 == 1:
            face = face[:, ::-1]
        if i >= 200:
            shift = rng.integers(-2, 3, size=2)
            face = np.roll(face, tuple(shift), axis=(0, 1))
        face_images.append(_resize(np.ascontiguousarray(face), image_size))
    add("face", face_images, ["a photo of a face"] * per_subset)
    add("photo", *_random_crops(COLOR_PHOTOS, per_subset, image_size, rng, "a color photo of a"))
    shapes = [_shape_image(image_size, rng) for _ in range(per_subset)]
    add("shape", [s[0] for s in shapes], [s[1] for s in shapes])
    add("texture", *_random_crops(GRAY_PHOTOS, per_subset, image_size, rng, "a gray texture of"))
    # noise: share noise_share of the final set
    num_noise = int(round(noise_share * len(images) / (1.0 - noise_share)))
    noise = [rng.integers(0, 256, size=(image_size, image_size, 3), dtype=np.uint8) for _ in range(num_noise)]
    add(NOISE_SUBSET, noise, ["random noise"] * num_noise)

    order = rng.permutation(len(images))
    stacked = np.stack([images[i] for i in order]).transpose(0, 3, 1, 2).copy()  # (N, 3, s, s)
    split = np.full(len(order), "train", dtype=object)
    split[int(round((1.0 - test_share) * len(order))) :] = "test"
    info = dict(
        image_size=image_size, per_subset=per_subset, noise_share=noise_share, seed=seed, test_share=test_share
    )
    return MixedSet(
        images=stacked,
        captions=[captions[i] for i in order],
        subsets=[subsets[i] for i in order],
        split=split.astype(str),
        info=info,
    )
