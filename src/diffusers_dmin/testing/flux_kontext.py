"""A tiny offline `FluxKontextPipeline` (the components of [`tiny_flux_pipeline`] in FLUX.1-dev layout)."""

from __future__ import annotations

from collections.abc import Iterable

from . import DEFAULT_WORDS
from .flux import tiny_flux_pipeline


__all__ = ["tiny_flux_kontext_pipeline"]


def tiny_flux_kontext_pipeline(seed: int = 0, *, words: Iterable[str] = DEFAULT_WORDS):
    """
    A `FluxKontextPipeline` with the guidance-distilled transformer, CLIP, T5, VAE and scheduler of
    `tiny_flux_pipeline(seed, guidance_embeds=True)`; 16x16 images by default (`default_sample_size = 8`; the pipeline
    also rescales its output to `max_area`, default 1024**2: pass `max_area=16 * 16` when calling it directly).
    """
    from diffusers import FluxKontextPipeline

    flux = tiny_flux_pipeline(seed, guidance_embeds=True, words=words)
    pipe = FluxKontextPipeline(**flux.components)
    pipe.default_sample_size = flux.default_sample_size
    return pipe
