"""Grids of a query image next to its most influential training images, with ids, scores and a legend.

A row is the query (the generated or attributed image, captioned and followed by a red line), then the training
samples most influential first, each captioned with its sample id, its score and, when the dataset has one, its
label. [`influence_grid`] stacks one row per result under a legend that says what the score is and its range.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import PIL.ImageOps

from .errors import ConfigError
from .images import to_pil


__all__ = ["to_pil", "make_row", "make_grid", "influence_grid", "influence_legend", "NOT_ATTACHED"]

_PAD = 4
_GREY = (200, 200, 200)
# caption of a training tile whose image is unknown (`None`): the dataset is not attached
NOT_ATTACHED = "dataset not attached"


@functools.cache
def _font() -> PIL.ImageFont.ImageFont:
    try:
        return PIL.ImageFont.load_default(size=11)  # a scalable font (Pillow >= 10.1 with FreeType)
    except (TypeError, OSError, ImportError):
        return PIL.ImageFont.load_default()


def _line_height() -> int:
    left, top, right, bottom = _font().getbbox("Ag#(")
    return bottom - top + 2


def _space() -> float:
    # the default font's space is 2 px wide at size 11: "#63 3.027" would read "#633.027"
    draw = PIL.ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
    return max(draw.textlength(" ", font=_font()), 4.0)


def _textlength(draw: PIL.ImageDraw.ImageDraw, text: str) -> float:
    words = text.split(" ")
    return sum(draw.textlength(word, font=_font()) for word in words) + _space() * (len(words) - 1)


def _text(draw: PIL.ImageDraw.ImageDraw, xy: tuple[float, float], text: str, fill: Any) -> None:
    """Draw `text` word by word with readable spaces."""
    x, y = xy
    for word in text.split(" "):
        if word:
            draw.text((x, y), word, fill=fill, font=_font())
        x += draw.textlength(word, font=_font()) + _space()


def _fit(draw: PIL.ImageDraw.ImageDraw, text: str, width: int) -> str:
    """`text`, cut with an ellipsis to fit in `width` pixels."""
    if _textlength(draw, text) <= width:
        return text
    while text and _textlength(draw, text + "...") > width:
        text = text[:-1]
    return text + "..."


def _wrap(draw: PIL.ImageDraw.ImageDraw, text: str, width: int) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and _textlength(draw, candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(_fit(draw, line, width))
    return lines


def _tile(image: PIL.Image.Image | None, lines: Sequence[str], size: int, num_lines: int) -> PIL.Image.Image:
    """A `size` square thumbnail (grey with "dataset not attached" when `image` is None) above `num_lines` lines."""
    line_height = _line_height()
    tile = PIL.Image.new("RGB", (size, size + num_lines * line_height + 2), "white")
    draw = PIL.ImageDraw.Draw(tile)
    if image is None:
        draw.rectangle([0, 0, size - 1, size - 1], fill=_GREY)
        words = _wrap(draw, NOT_ATTACHED, size - 4)
        top = max(0, (size - len(words) * line_height) // 2)
        for number, word in enumerate(words):
            if top + (number + 1) * line_height <= size:
                _text(draw, (2, top + number * line_height), word, (60, 60, 60))
    else:
        thumb = PIL.ImageOps.contain(
            image, (size, size), method=PIL.Image.NEAREST if max(image.size) < size else PIL.Image.BICUBIC
        )
        tile.paste(thumb, ((size - thumb.width) // 2, (size - thumb.height) // 2))
    for number, line in enumerate(list(lines)[:num_lines]):
        _text(draw, (1, size + 1 + number * line_height), _fit(draw, line, size - 2), "black")
    return tile


def make_row(
    query: Any | None,
    images: Sequence[Any | None],
    scores: Sequence[float],
    sample_ids: Sequence[Any],
    *,
    thumb_size: int = 64,
    query_caption: str = "query",
    labels: Sequence[Any] | None = None,
    title: str | None = None,
) -> PIL.Image.Image:
    r"""
    One row: the query (when given) captioned `query_caption`, a red line, then each training image captioned with
    its sample id (`#12`), its score and, with `labels`, its label.

    Args:
        query (image, *optional*): The generated or attributed image.
        images (`list`): The training images, in rank order; `None` draws a grey box saying "dataset not attached".
        scores (`list[float]`), sample_ids (`list`): Of the training images, same length.
        thumb_size (`int`, *optional*, defaults to 64): Side of each thumbnail in pixels.
        query_caption (`str`, *optional*, defaults to `"query"`): Caption of the query tile, e.g. `"generated"`.
        labels (`list`, *optional*): A label per training image (e.g. the dataset's `label` column).
        title (`str`, *optional*): A line above the row, e.g. the prompt.
    """
    if not (len(images) == len(scores) == len(sample_ids)):
        raise ConfigError(
            f"`images`, `scores` and `sample_ids` must have the same length, but have {len(images)}, {len(scores)} "
            f"and {len(sample_ids)}."
        )
    if labels is not None and len(labels) != len(images):
        raise ConfigError(f"`labels` must have one label per image ({len(images)}), but has {len(labels)}.")
    captions = [[f"#{sample_id}", f"{float(score):.3f}"] for score, sample_id in zip(scores, sample_ids)]
    measure = PIL.ImageDraw.Draw(PIL.Image.new("RGB", (1, 1)))
    if all(_textlength(measure, " ".join(lines)) <= thumb_size - 2 for lines in captions):
        captions = [[" ".join(lines)] for lines in captions]  # "#12 4.567" on one line when every one fits
    if labels is not None:
        captions = [lines + [f"label {label}"] for lines, label in zip(captions, labels)]
    num_lines = max([len(lines) for lines in captions] + [1])
    tiles = [] if query is None else [_tile(to_pil(query), query_caption.split("\n"), thumb_size, num_lines)]
    for image, lines in zip(images, captions):
        tiles.append(_tile(None if image is None else to_pil(image), lines, thumb_size, num_lines))
    if not tiles:
        raise ConfigError("Nothing to draw: give a query or at least one training image.")
    title_height = _line_height() + 2 if title else 0
    width = len(tiles) * (thumb_size + _PAD) + _PAD
    row = PIL.Image.new("RGB", (width, title_height + tiles[0].height + 2 * _PAD), "white")
    draw = PIL.ImageDraw.Draw(row)
    if title:
        _text(draw, (_PAD, _PAD // 2 + 1), _fit(draw, title, width - 2 * _PAD), "black")
    for i, tile in enumerate(tiles):
        row.paste(tile, (_PAD + i * (thumb_size + _PAD), title_height + _PAD))
    if query is not None:  # a separator after the query
        x = _PAD + thumb_size + _PAD // 2
        draw.line([(x, title_height), (x, row.height)], fill=(200, 0, 0), width=1)
    return row


def make_grid(rows: Sequence[PIL.Image.Image], *, legend: str | None = None) -> PIL.Image.Image:
    """Stack rows (e.g. from [`make_row`]) vertically, left-aligned, under an optional `legend` wrapped to the width
    of the widest row."""
    if not rows:
        raise ConfigError("`rows` is empty; there is nothing to draw.")
    width = max(r.width for r in rows)
    lines = _wrap(PIL.ImageDraw.Draw(PIL.Image.new("RGB", (1, 1))), legend, width - 2 * _PAD) if legend else []
    top = len(lines) * _line_height() + _PAD if lines else 0
    grid = PIL.Image.new("RGB", (width, top + sum(r.height for r in rows)), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for number, line in enumerate(lines):
        _text(draw, (_PAD, _PAD // 2 + number * _line_height()), line, (40, 40, 40))
    y = top
    for row in rows:
        grid.paste(row, (0, y))
        y += row.height
    return grid


def influence_legend(
    num_timesteps: int | None, *, query_caption: str = "query", missing: bool = False, video: bool = False
) -> str:
    """The legend of an influence grid: what the first tile is, and what the score is, with its range (`video=True`:
    every tile is the first frame of a video)."""
    t = f"T = {num_timesteps}" if num_timesteps else "T"
    most = f"{num_timesteps}" if num_timesteps else "T"
    first = (
        f"the first frame of the {query_caption} video; then the first frames of the training videos"
        if video
        else f"the {query_caption} image; then the training samples"
    )
    text = (
        f"Left of the red line: {first} that influenced it most, "
        f"with #sample id and score = sum over the {t} timesteps of gradient cosine similarities: at most about "
        f"{most} (a sample with itself), near 0 unrelated."
    )
    if missing:
        text += " Grey boxes: dataset not attached."
    return text


def influence_grid(
    results: Sequence[Any],
    *,
    images: Sequence[Sequence[Any | None] | None] | None = None,
    image_column: str | None = None,
    label_column: str | None = "label",
    thumb_size: int = 64,
    query_caption: str = "query",
    video: bool = False,
) -> PIL.Image.Image:
    r"""
    One row per [`InfluenceResult`] under a legend: the query captioned `query_caption` (and its prompt above the
    row when it has one), then the top-k training images with sample ids, scores and labels.

    Args:
        results (`list[InfluenceResult]`): E.g. `out.influence` of an [`InfluencePipeline`] call.
        images (`list`, *optional*): The training images of each result (a `None` entry, or `None` for a whole
            result, draws grey "dataset not attached" boxes). Defaults to the images of the attached dataset.
        image_column (`str`, *optional*): The column of the samples holding the image (default: the first image).
        label_column (`str`, *optional*, defaults to `"label"`): Shown under each training image when the samples
            have this column.
        thumb_size (`int`, *optional*, defaults to 64): Side of each thumbnail in pixels.
        query_caption (`str`, *optional*, defaults to `"query"`): `"generated"` for generated images.
        video (`bool`, *optional*, defaults to `False`): The query and the training samples are videos, drawn by their
            first frame (as [`to_pil`] does); the legend says so.

    Examples:
    ```py
    >>> out = pipe("a cat", return_influence=True, top_k=6)
    >>> influence_grid(out.influence, query_caption="generated").save("influence.png")
    ```
    """
    if not results:
        raise ConfigError("`results` is empty; there is nothing to draw.")
    if images is not None and len(images) != len(results):
        raise ConfigError(f"`images` must hold one list per result ({len(results)}), but holds {len(images)}.")
    rows, missing = [], False
    for number, result in enumerate(results):
        row_images = images[number] if images is not None else None
        row = result.to_grid(
            images=row_images,
            image_column=image_column,
            label_column=label_column,
            thumb_size=thumb_size,
            query_caption=query_caption,
        )
        missing = (
            missing
            or (row_images is None and not result.samples)
            or (row_images is not None and any(image is None for image in row_images))
        )
        rows.append(row)
    num_timesteps = next((r.num_timesteps for r in results if getattr(r, "num_timesteps", None)), None)
    legend = influence_legend(num_timesteps, query_caption=query_caption, missing=missing, video=video)
    return make_grid(rows, legend=legend)
