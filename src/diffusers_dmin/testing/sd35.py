"""A tiny Stable Diffusion 3.5-style pipeline: the SD3.5 transformer's config differences from SD3 (query/key RMS norm,
MMDiT-X dual attention layers, patch size 2) at test size."""

from __future__ import annotations

from collections.abc import Iterable

from . import DEFAULT_WORDS, tiny_sd3_pipeline


__all__ = ["tiny_sd35_pipeline"]


def tiny_sd35_pipeline(seed: int = 0, *, words: Iterable[str] = DEFAULT_WORDS):
    """A `StableDiffusion3Pipeline` whose `SD3Transformer2DModel` is configured like SD3.5 Medium (`qk_norm="rms_norm"`,
    `dual_attention_layers` on its first block, `patch_size=2`; SD3.5 Large has `qk_norm` without dual layers), without
    T5 (`text_encoder_3=None`), with the SD3.5 checkpoints' scheduler config (static shift 3.0), 16x16 images."""
    return tiny_sd3_pipeline(seed, words=words, patch_size=2, dual_attention_layers=(0,), qk_norm="rms_norm")
