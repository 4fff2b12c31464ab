"""A tiny offline `SanaPipeline`: Gemma 2 text encoder and Gemma BPE tokenizer built in memory."""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch

from ..errors import require


__all__ = ["tiny_gemma_tokenizer", "tiny_sana_pipeline"]

#: the scheduler the Sana checkpoints ship (`scripts/convert_sana_to_diffusers.py`, 1024px and below)
SANA_SCHEDULER = dict(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")


def tiny_gemma_tokenizer(words: Iterable[str] | None = None):
    """
    A `GemmaTokenizer` (BPE over `▁`-prefixed pieces with byte fallback, `<bos>` prepended) trained in memory so that
    each of `words` is one token at the start of a prompt and after a space; other characters fall back to bytes.
    """
    from ..testing import DEFAULT_WORDS

    transformers = require("transformers", "`tiny_gemma_tokenizer`", "pip install transformers")
    tokenizers = require("tokenizers", "`tiny_gemma_tokenizer`", "pip install tokenizers")
    words = list(DEFAULT_WORDS if words is None else words)
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.normalizer = tokenizers.normalizers.Replace(" ", "▁")
    bpe.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] + [f"<0x{i:02X}>" for i in range(256)]
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=4000, special_tokens=special, show_progress=False)
    bpe.train_from_iterator([" " + " ".join(words)] + words, trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    return transformers.GemmaTokenizer(vocab=trained["vocab"], merges=merges, add_bos_token=True)


def tiny_sana_pipeline(seed: int = 0, *, words: Iterable[str] | None = None):
    """
    A `SanaPipeline` for 32x32 images (the pipeline wants sizes divisible by 32): a 2-layer `SanaTransformer2DModel`
    on 4x4x4 latents, a 4-stage `AutoencoderDC` (8x spatial compression), a 1-layer Gemma 2 text encoder (hidden size 32), an in-memory [`tiny_gemma_tokenizer`]
    and the Sana checkpoints' scheduler (`DPMSolverMultistepScheduler` with flow sigmas, `flow_shift=3.0`).

    Its `sample_size` (4) has no aspect-ratio bin: call it with `use_resolution_binning=False`.
    """
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel

    from ..testing import _eval

    transformers = require("transformers", "`tiny_sana_pipeline`", "pip install transformers")
    tokenizer = tiny_gemma_tokenizer(words)
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=32,
        sample_size=4,
    )
    vae = AutoencoderDC(
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        encoder_qkv_multiscales=((), (), (), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,)),
        encoder_layers_per_block=(1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    config = transformers.Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="eager",
    )
    text_encoder = transformers.Gemma2Model(config)
    _eval(transformer, vae, text_encoder)
    return SanaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(**SANA_SCHEDULER),
    )
