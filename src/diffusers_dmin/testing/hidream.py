"""A tiny offline `HiDreamImagePipeline`: two CLIPs, T5 and Llama built from configs, tokenizers made in memory."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from ..errors import require
from . import _TINY_VAE, DEFAULT_WORDS, _clip_config, _eval, tiny_clip_tokenizer
from .flux import tiny_t5_encoder, tiny_t5_tokenizer
from .lumina2 import tiny_bpe_vocab


__all__ = ["tiny_llama_tokenizer", "tiny_hidream_pipeline"]


def tiny_llama_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 128):
    """A `LlamaTokenizer` (byte-fallback BPE with one token per word) built in memory."""
    transformers = require("transformers", "`tiny_llama_tokenizer`", "pip install transformers")
    vocab, merges = tiny_bpe_vocab(words, ["<unk>", "<s>", "</s>"])
    return transformers.LlamaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def tiny_hidream_pipeline(seed: int = 0, *, scheduler=None, words: Iterable[str] = DEFAULT_WORDS):
    """
    A `HiDreamImagePipeline` with a ~150k-parameter `HiDreamImageTransformer2DModel` (one double-stream and one
    single-stream block, 4 routed experts with 2 active, 2x2 patches), two CLIP text encoders with projections, a
    1-layer T5 encoder and a 2-layer Llama (hidden size 16 each), the 2-level VAE (16x16 images, 8x8x4 latents) and
    `FlowMatchEulerDiscreteScheduler()` unless `scheduler` is given (shift 1.0, so the script's shift 3.0 has to come
    from the family's conventions).

    The pipeline generates at the area of `default_sample_size * vae_scale_factor` squared whatever `height`/`width`
    ask for; its `default_sample_size` (128 in `__init__`) is set to 8 here for 16x16 images (an attribute, not part of
    the saved config).
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        HiDreamImagePipeline,
        HiDreamImageTransformer2DModel,
    )

    transformers = require("transformers", "`tiny_hidream_pipeline`", "pip install transformers")
    clip_tokenizer = tiny_clip_tokenizer(words, model_max_length=128)
    t5_tokenizer = tiny_t5_tokenizer(words)
    llama_tokenizer = tiny_llama_tokenizer(words)
    torch.manual_seed(seed)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=[16, 16],
        text_emb_dim=64,
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(16, 16),
        llama_layers=(0, 1),
    )
    vae = AutoencoderKL(**_TINY_VAE, scaling_factor=0.3611, shift_factor=0.1159)
    text_encoder = transformers.CLIPTextModelWithProjection(_clip_config(clip_tokenizer))
    text_encoder_2 = transformers.CLIPTextModelWithProjection(_clip_config(clip_tokenizer))
    text_encoder_3 = tiny_t5_encoder(t5_tokenizer, d_model=16)
    text_encoder_4 = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(llama_tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=256,
            bos_token_id=llama_tokenizer.bos_token_id,
            eos_token_id=llama_tokenizer.eos_token_id,
            pad_token_id=llama_tokenizer.eos_token_id,
        )
    )
    _eval(transformer, vae, text_encoder, text_encoder_2, text_encoder_3, text_encoder_4)
    pipe = HiDreamImagePipeline(
        scheduler=scheduler if scheduler is not None else FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=clip_tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
        text_encoder_4=text_encoder_4,
        tokenizer_4=llama_tokenizer,
        transformer=transformer,
    )
    pipe.default_sample_size = 8
    return pipe
