"""A tiny offline `ChromaPipeline` (Flux-derived: T5 only, no pooled projection, no guidance embedding)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from . import DEFAULT_WORDS, _eval
from .flux import _FLUX_VAE, tiny_t5_encoder, tiny_t5_tokenizer


__all__ = ["tiny_chroma_pipeline"]


def tiny_chroma_pipeline(seed: int = 0, *, words: Iterable[str] = DEFAULT_WORDS):
    """
    A `ChromaPipeline`: 16x16 images, 8x8x4 latents packed into 16 tokens, a 1-layer T5 and a 1+1-block
    `ChromaTransformer2DModel` (no pooled projection, no guidance embedding, the prompt's attention mask).
    `default_sample_size` is 8 as in [`tiny_flux_pipeline`].
    """
    from diffusers import AutoencoderKL, ChromaPipeline, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler

    tokenizer = tiny_t5_tokenizer(words)
    torch.manual_seed(seed)
    transformer = ChromaTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=(4, 6, 6),
        approximator_num_channels=16,
        approximator_hidden_dim=32,
        approximator_layers=1,
    )
    vae = AutoencoderKL(**_FLUX_VAE)
    text_encoder = tiny_t5_encoder(tokenizer)
    _eval(transformer, vae)
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
        ),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.default_sample_size = 8
    return pipe
