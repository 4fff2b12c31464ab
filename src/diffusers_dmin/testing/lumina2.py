"""A tiny offline `Lumina2Pipeline`: Gemma 2 text encoder and `GemmaTokenizer` built in memory, 32x32 images."""

from __future__ import annotations

import string
from collections.abc import Iterable

import torch

from ..errors import require
from . import DEFAULT_WORDS, _eval


__all__ = ["tiny_bpe_vocab", "tiny_lumina2_tokenizer", "tiny_lumina2_pipeline"]

# the words of Lumina2Pipeline's default system prompt, so the prompt stays a few dozen tokens long
_SYSTEM_PROMPT_WORDS = (
    "You", "are", "an", "assistant", "designed", "to", "generate", "superior", "images", "with", "degree",
    "image-text", "alignment", "based", "on", "textual", "prompts", "or", "user", "<Prompt", "Start>",
)  # fmt: skip

# a VAE with 4 levels (scale factor 8, as the pipeline hard-codes): 32x32 images <-> 4x4x4 latents
_TINY_VAE_8X = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=32,
)


def tiny_bpe_vocab(
    words: Iterable[str], specials: Iterable[str], space: str = "▁", byte_fallback: bool = True
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A BPE vocabulary over printable ASCII (plus `<0x00>`..`<0xFF>` byte-fallback tokens) with merges that make
    `space + word` one token for each of `words`; `specials` come first (ids 0, 1, ...)."""
    vocab = {token: i for i, token in enumerate(dict.fromkeys(specials))}
    if byte_fallback:
        for byte in range(256):
            vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    for char in [space, *string.ascii_letters, *string.digits, *string.punctuation]:
        vocab.setdefault(char, len(vocab))
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        symbols = [space, *word]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(pair[0] + pair[1], len(vocab))
            symbols = [pair[0] + pair[1], *symbols[2:]]
    return vocab, merges


def tiny_lumina2_tokenizer(words: Iterable[str] = DEFAULT_WORDS):
    """A `GemmaTokenizer` (byte-fallback BPE) built from an in-memory vocabulary in which each of `words` and of the
    words of `Lumina2Pipeline`'s default system prompt is one token; no download."""
    transformers = require("transformers", "`tiny_lumina2_tokenizer`", "pip install transformers")
    vocab, merges = tiny_bpe_vocab([*words, *_SYSTEM_PROMPT_WORDS], ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"])
    return transformers.GemmaTokenizer(vocab=vocab, merges=merges)


def tiny_lumina2_pipeline(seed: int = 0, *, words: Iterable[str] = DEFAULT_WORDS):
    """
    A `Lumina2Pipeline` with a ~24k-parameter `Lumina2Transformer2DModel` (2x2 patches, 2 layers plus 1 refiner layer
    each for the caption and the image), a 2-layer `Gemma2Model` text encoder (hidden size 16), a 4-level VAE (32x32
    images, 4x4x4 latents) and `FlowMatchEulerDiscreteScheduler(shift=6.0)`.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    transformers = require("transformers", "`tiny_lumina2_pipeline`", "pip install transformers")
    tokenizer = tiny_lumina2_tokenizer(words)
    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(
        sample_size=4,
        patch_size=2,
        in_channels=4,
        hidden_size=16,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=1,
        multiple_of=16,
        axes_dim_rope=(4, 2, 2),
        axes_lens=(300, 16, 16),
        cap_feat_dim=16,
    )
    vae = AutoencoderKL(
        **_TINY_VAE_8X, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035
    )
    text_encoder = transformers.Gemma2Model(
        transformers.Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=8,
            query_pre_attn_scalar=8,
            max_position_embeddings=512,
            sliding_window=512,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.bos_token_id,
        )
    )
    _eval(transformer, vae, text_encoder)
    return Lumina2Pipeline(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=6.0),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
