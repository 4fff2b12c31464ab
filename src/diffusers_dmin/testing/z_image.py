"""A tiny offline `ZImagePipeline`: a 2-layer Qwen3 text encoder of hidden size 16 with an in-memory word-level
tokenizer (Qwen chat template), a 2-block `AutoencoderKL` with Z-Image's shift and scaling factors, and a
`ZImageTransformer2DModel` of width 32 (2x2 patches)."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import require
from . import _TINY_VAE, DEFAULT_WORDS, _eval
from .flux2 import _QWEN_SPECIAL, _QWEN_TEMPLATE, tiny_word_tokenizer


__all__ = ["tiny_z_image_pipeline"]


def tiny_z_image_pipeline(seed: int = 0, *, words: Iterable[str] = DEFAULT_WORDS):
    """
    A `ZImagePipeline` with 4 latent channels. The pipeline's default size is 1024x1024: pass `height=16, width=16`
    to its calls and `DMinConfig(resolution=16)` to the sketcher.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel

    transformers = require("transformers", "`tiny_z_image_pipeline`", "pip install transformers")
    tokenizer = tiny_word_tokenizer(
        words,
        special_tokens=_QWEN_SPECIAL,
        chat_template=_QWEN_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=_TINY_VAE["latent_channels"],
        dim=32,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        norm_eps=1e-5,
        qk_norm=True,
        cap_feat_dim=16,
        rope_theta=256.0,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # created with torch.empty
        transformer.x_pad_token.copy_(torch.ones_like(transformer.x_pad_token))
        transformer.cap_pad_token.copy_(torch.ones_like(transformer.cap_pad_token))
    vae = AutoencoderKL(**_TINY_VAE, shift_factor=0.1159, scaling_factor=0.3611)
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text_encoder = transformers.Qwen3Model(config)
    _eval(transformer, vae, text_encoder)
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),  # Z-Image's scheduler config: static shift 3
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
