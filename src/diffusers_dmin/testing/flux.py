"""A tiny offline `FluxPipeline` (FLUX.1-dev or -schnell layout), and the tiny T5 text encoder and in-memory tokenizer
that the Flux-derived families share."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import require
from . import _TINY_VAE, DEFAULT_WORDS, _clip_config, _eval, tiny_clip_tokenizer


__all__ = ["tiny_t5_tokenizer", "tiny_t5_encoder", "tiny_flux_pipeline"]

# the latent normalisation of the FLUX.1 VAE (Chroma uses the same VAE)
_FLUX_VAE = dict(
    _TINY_VAE, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.1159, scaling_factor=0.3611
)


def tiny_t5_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 512):
    """
    A T5-style fast tokenizer built offline: a `tokenizers` Unigram model over `<pad>` (id 0), `</s>` (id 1), `<unk>`
    (id 2), one piece per word of `words` and the printable ASCII characters, with a `Metaspace` pre-tokenizer and
    `</s>` appended, wrapped in `PreTrainedTokenizerFast` (what `T5TokenizerFast` is built on).

    Args:
        words (`Iterable[str]`, *optional*): Words that get one token each; other text is split into characters.
        model_max_length (`int`, *optional*, defaults to 512): Maximum sequence length.
    """
    transformers = require("transformers", "`tiny_t5_tokenizer`", "pip install transformers")
    tokenizers = require("tokenizers", "`tiny_t5_tokenizer`", "pip install tokenizers")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + word, -1.0) for word in dict.fromkeys(words)]
    vocab += [("\u2581", -2.0)] + [(chr(c), -3.0) for c in range(ord("!"), ord("~") + 1)]
    tokenizer = tokenizers.Tokenizer(tokenizers.models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.decoder = tokenizers.decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def tiny_t5_encoder(tokenizer, d_model: int = 32):
    """A 1-layer `T5EncoderModel` (T5 v1.1 layout: gated-GELU feed-forward) of width `d_model`, without dropout."""
    transformers = require("transformers", "`tiny_t5_encoder`", "pip install transformers")
    config = transformers.T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    encoder = transformers.T5EncoderModel(config)
    _eval(encoder)
    return encoder


def tiny_flux_pipeline(seed: int = 0, *, guidance_embeds: bool = True, words: Iterable[str] = DEFAULT_WORDS):
    """
    A `FluxPipeline`: 16x16 images, 8x8x4 latents packed into 16 tokens of 16 channels, a 2-layer CLIP (pooled
    projections) and a 1-layer T5 (`encoder_hidden_states`), and a 1+1-block `FluxTransformer2DModel`.

    `guidance_embeds=True` is FLUX.1-dev's layout (a guidance-distilled transformer with its scheduler config:
    `use_dynamic_shifting=True`), `False` FLUX.1-schnell's (static `shift=1.0`). The pipeline's `default_sample_size`
    is set to 8 so that it generates 16x16 images by default (the attribute is not saved: pass `height`/`width` to a
    reloaded copy).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    transformers = require("transformers", "`tiny_flux_pipeline`", "pip install transformers")
    clip_tokenizer = tiny_clip_tokenizer(words)
    t5_tokenizer = tiny_t5_tokenizer(words)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    vae = AutoencoderKL(**_FLUX_VAE)
    text_encoder = transformers.CLIPTextModel(_clip_config(clip_tokenizer))
    text_encoder_2 = tiny_t5_encoder(t5_tokenizer)
    _eval(transformer, vae, text_encoder)
    if guidance_embeds:  # FLUX.1-dev's scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(
            shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15
        )
    else:  # FLUX.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer,
        transformer=transformer,
    )
    pipe.default_sample_size = 8
    return pipe
