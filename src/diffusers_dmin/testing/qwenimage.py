"""A tiny offline `QwenImagePipeline`: Qwen2.5-VL text encoder and byte-level BPE tokenizer built in memory."""

from __future__ import annotations

import json
from collections.abc import Iterable

import torch

from ..errors import require


__all__ = ["tiny_qwen2_tokenizer", "tiny_qwenimage_pipeline"]

QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)

#: the scheduler config of the Qwen-Image checkpoints (dynamic shifting: the training sigmas are unshifted)
QWEN_IMAGE_SCHEDULER = dict(
    base_image_seq_len=256,
    base_shift=0.5,
    max_image_seq_len=8192,
    max_shift=0.9,
    num_train_timesteps=1000,
    shift=1.0,
    shift_terminal=0.02,
    time_shift_type="exponential",
    use_dynamic_shifting=True,
)


def tiny_qwen2_tokenizer(words: Iterable[str] | None = None):
    """
    A `Qwen2Tokenizer` (byte-level BPE with Qwen's pre-tokenizer) trained in memory on Qwen-Image's prompt template
    and `words`, so that each of them is one token. Like the real tokenizer, it splits the template's system prefix
    into exactly the 34 tokens `QwenImagePipeline` drops (`prompt_template_encode_start_idx`).
    """
    from ..testing import DEFAULT_WORDS

    transformers = require("transformers", "`tiny_qwen2_tokenizer`", "pip install transformers")
    tokenizers = require("tokenizers", "`tiny_qwen2_tokenizer`", "pip install tokenizers")
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    words = " ".join(DEFAULT_WORDS if words is None else words)
    pre = tokenizers.pre_tokenizers
    bpe = tokenizers.Tokenizer(tokenizers.models.BPE())
    bpe.pre_tokenizer = pre.Sequence(
        [
            pre.Split(tokenizers.Regex(PRETOKENIZE_REGEX), behavior="isolated"),
            pre.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=2000,
        initial_alphabet=pre.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        show_progress=False,
    )
    bpe.train_from_iterator([QWEN_IMAGE_TEMPLATE.format(f"{words} {words}")], trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tokenizer = transformers.Qwen2Tokenizer(vocab=trained["vocab"], merges=merges)
    tokenizer.add_tokens([transformers.AddedToken(t, special=True) for t in ("<|im_start|>", "<|im_end|>")])
    return tokenizer


def tiny_qwenimage_pipeline(seed: int = 0, *, words: Iterable[str] | None = None):
    """
    A `QwenImagePipeline` for 16x16 images: a 2-layer `QwenImageTransformer2DModel` (2x2 patches of 4-channel
    latents), an `AutoencoderKLQwenImage` (4x spatial compression, non-trivial `latents_mean`/`latents_std`), a 1-layer
    Qwen2.5-VL text encoder (hidden size 32, with a 1-block vision tower the pipeline never calls), an in-memory
    [`tiny_qwen2_tokenizer`] and the Qwen-Image checkpoints' scheduler config (dynamic shifting).

    `default_sample_size` is set to 4 latent pixels, so that the pipeline's default size is 16x16 (the real
    pipeline's 128 is not saved in its config: a reloaded copy defaults to 512x512 again).
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )

    from ..testing import _eval

    transformers = require("transformers", "`tiny_qwenimage_pipeline`", "pip install transformers")
    tokenizer = tiny_qwen2_tokenizer(words)
    vocab = len(tokenizer)
    pad = tokenizer.pad_token_id
    torch.manual_seed(seed)
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            vocab_size=vocab,
            max_position_embeddings=2048,
            rope_scaling={"mrope_section": [2, 3, 3], "rope_type": "default", "type": "default"},
            rope_theta=1e6,
            bos_token_id=pad,
            eos_token_id=pad,
            pad_token_id=pad,
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
        hidden_size=32,
        vocab_size=vocab,
        # no image tokens in a text-only vocabulary: point them at the padding token, never used for text prompts
        image_token_id=pad,
        video_token_id=pad,
        vision_start_token_id=pad,
        vision_end_token_id=pad,
    )
    text_encoder = transformers.Qwen2_5_VLForConditionalGeneration(config)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    vae = AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.1, -0.2, 0.05, 0.3],
        latents_std=[1.5, 0.8, 1.2, 2.0],
    )
    _eval(text_encoder, transformer, vae)
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    pipe.default_sample_size = 4
    return pipe
