"""A tiny Stable Diffusion 3.5-style pipeline: the SD3.5 transformer's config differences from SD3 (query/key RMS norm,
MMDiT-X dual attention layers, patch size 2) at test size."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import require
from . import _TINY_VAE, DEFAULT_WORDS, _clip_config, _eval, tiny_clip_tokenizer


__all__ = ["tiny_sd35_pipeline"]


def tiny_sd35_pipeline(seed: int = 0, *, words: Iterable[str] = DEFAULT_WORDS):
    """A `StableDiffusion3Pipeline` whose `SD3Transformer2DModel` is configured like SD3.5 Medium (`qk_norm="rms_norm"`,
    `dual_attention_layers` on its first block, `patch_size=2`; SD3.5 Large has `qk_norm` without dual layers), without
    T5 (`text_encoder_3=None`), with the SD3.5 checkpoints' scheduler config (static shift 3.0), 16x16 images."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    transformers = require("transformers", "`tiny_sd35_pipeline`", "pip install transformers")
    tokenizer = tiny_clip_tokenizer(words)
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    vae = AutoencoderKL(
        **_TINY_VAE, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035
    )
    text_encoder = transformers.CLIPTextModelWithProjection(_clip_config(tokenizer))
    text_encoder_2 = transformers.CLIPTextModelWithProjection(_clip_config(tokenizer))
    _eval(transformer, vae, text_encoder, text_encoder_2)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
