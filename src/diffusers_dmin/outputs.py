"""Output dataclasses: [`InfluenceResult`] (one per query) and [`InfluencePipelineOutput`]."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from .errors import ConfigError
from .viz import make_row


__all__ = ["InfluenceResult", "InfluencePipelineOutput"]


@dataclass
class InfluenceResult(BaseOutput):
    r"""
    The most influential training samples of one query.

    Args:
        sample_ids (`np.ndarray` of shape `(top_k,)`):
            Ids of the training samples (int64), most influential first.
        scores (`np.ndarray` of shape `(top_k,)`):
            Influence scores (float32): inner products of the flattened `(T, K)` normalised sketches, so a sample
            scores at most about T with itself. Descending (ascending for opponents, `largest=False`).
        samples (`list[dict]`, *optional*):
            The training rows of `sample_ids`, when the training dataset is attached to the index.
        query (`PIL.Image.Image`, *optional*):
            The query image, when known (set by [`InfluencePipeline`]).
        prompt (`str`, *optional*):
            The query's prompt, for conditional pipelines (set by [`InfluencePipeline`]).
        num_timesteps (`int`, *optional*):
            T of the index, the bound of the scores (set by [`InfluencePipeline`]).
    """

    sample_ids: np.ndarray
    scores: np.ndarray
    samples: list[dict[str, Any]] | None = None
    query: PIL.Image.Image | None = None
    prompt: str | None = None
    num_timesteps: int | None = None

    def to_grid(
        self,
        images: Sequence[Any] | None = None,
        *,
        image_column: str | None = None,
        label_column: str | None = "label",
        thumb_size: int = 64,
        query_caption: str = "query",
    ) -> PIL.Image.Image:
        r"""
        Draw one row: the query (when known) captioned `query_caption`, then the top-k training images, each with its
        sample id, its score and its label (when the samples have `label_column`). The prompt, when known, is written
        above the row. Without training images (no dataset attached and no `images`), grey boxes say "dataset not
        attached". [`~viz.influence_grid`] stacks rows under a legend that explains the scores.

        Args:
            images (`list`, *optional*):
                The training images of `sample_ids`, in order (`None` entries draw grey boxes). Defaults to the
                images in `samples`.
            image_column (`str`, *optional*):
                The column of `samples` holding the image; defaults to the first column holding an image.
            label_column (`str`, *optional*, defaults to `"label"`):
                Column of `samples` shown under each image when present; `None` shows no labels.
            thumb_size (`int`, *optional*, defaults to 64):
                Side of each thumbnail in pixels.
            query_caption (`str`, *optional*, defaults to `"query"`):
                Caption of the query tile, e.g. `"generated"`.
        """
        if images is None:
            if self.samples:
                images = [_find_image(row, image_column) for row in self.samples]
            else:
                images = [None] * len(self.sample_ids)
        labels = None
        if label_column is not None and self.samples and all(label_column in row for row in self.samples):
            labels = [row[label_column] for row in self.samples]
        return make_row(
            self.query,
            list(images),
            self.scores.tolist(),
            self.sample_ids.tolist(),
            thumb_size=thumb_size,
            query_caption=query_caption,
            labels=labels,
            title=f"prompt: {self.prompt!r}" if self.prompt else None,
        )


def _find_image(row: dict[str, Any], column: str | None) -> Any:
    if column is not None:
        if column not in row:
            raise ConfigError(f"`image_column={column!r}` is not a column of the samples; columns: {sorted(row)}.")
        return row[column]
    for value in row.values():
        if isinstance(value, (PIL.Image.Image, torch.Tensor)) or (isinstance(value, np.ndarray) and value.ndim >= 2):
            return value
    raise ConfigError(f"No image found in the sample columns {sorted(row)}; pass `image_column=`.")


@dataclass
class InfluencePipelineOutput(BaseOutput):
    r"""
    Output of [`InfluencePipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images, as the wrapped pipeline returns them for the requested `output_type`.
        influence (`list[InfluenceResult]`, *optional*):
            One result per image, in the same order; `None` unless `return_influence=True`.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    influence: list[InfluenceResult] | None = None
