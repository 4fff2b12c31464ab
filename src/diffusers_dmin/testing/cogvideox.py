"""A tiny offline `CogVideoXPipeline`: a 1-layer T5 with an in-memory tokenizer, 9-frame 32x32 videos."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import require
from . import DEFAULT_WORDS, _eval
from .flux import tiny_t5_encoder, tiny_t5_tokenizer


__all__ = ["tiny_cogvideox_pipeline"]


def tiny_cogvideox_pipeline(seed: int = 0, *, scheduler: str = "ddim", words: Iterable[str] = DEFAULT_WORDS):
    """
    A `CogVideoXPipeline` with a ~40k-parameter `CogVideoXTransformer3DModel` (one block, 2x2 patches, 3-D rotary
    embeddings as CogVideoX-5b), a 4-level `AutoencoderKLCogVideoX` (scale 8 in space, 4 in time: 9 frames of 32x32
    <-> 3x4x4x4 latents), a 1-layer T5 encoder and the scheduler of CogVideoX-2b (`CogVideoXDDIMScheduler`, SNR shift
    3.0, zero terminal SNR, v-prediction), or that of CogVideoX-5b (`CogVideoXDPMScheduler`, no SNR shift) with
    `scheduler="dpm"`.

    Its transformer's sample size is the released 60x90 latents (480x720 pixels, the base grid of the rotary
    embeddings): call it with `height=32, width=32` and use `DMinConfig(resolution=(32, 32))`.
    """
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXDPMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    require("transformers", "`tiny_cogvideox_pipeline`", "pip install transformers")
    tokenizer = tiny_t5_tokenizer(words, model_max_length=226)
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=16,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=16,
        num_layers=1,
        sample_width=90,
        sample_height=60,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=226,
        use_rotary_positional_embeddings=True,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    text_encoder = tiny_t5_encoder(tokenizer, d_model=16)
    _eval(transformer, vae, text_encoder)
    common = dict(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        timestep_spacing="trailing",
    )
    if scheduler == "ddim":
        sampler = CogVideoXDDIMScheduler(**common, snr_shift_scale=3.0)
    elif scheduler == "dpm":
        sampler = CogVideoXDPMScheduler(**common, snr_shift_scale=1.0)
    else:
        raise ValueError(f"`scheduler` must be 'ddim' or 'dpm', but is {scheduler!r}.")
    return CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=sampler
    )
