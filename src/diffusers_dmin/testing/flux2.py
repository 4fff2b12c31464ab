"""Tiny offline FLUX.2 pipelines: `Flux2Pipeline` (Mistral3 text encoder) and `Flux2KleinPipeline` (Qwen3).

Both use a 2-block `AutoencoderKLFlux2` (16x16 images -> 8x8x4 latents -> 4x4x16 patchified) whose batch-norm running
statistics are random (as trained ones are; the identity statistics of a fresh `BatchNorm2d` would hide a missing
normalisation), a one-double-block, one-single-block `Flux2Transformer2DModel`, and a 30-layer text encoder of hidden
size 16: the training scripts read its hidden states 10, 20 and 30. The tokenizers are word-level, built in memory,
with a chat template shaped like their model's (Mistral `[SYSTEM_PROMPT]`/`[INST]`, Qwen `<|im_start|>`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..errors import require
from . import _TINY_VAE, DEFAULT_WORDS, _eval


__all__ = ["tiny_word_tokenizer", "tiny_flux2_pipeline", "tiny_flux2_klein_pipeline"]

_TEXT_LAYERS = 30  # `--text_encoder_out_layers 10 20 30` needs hidden state 30
_TEXT_HIDDEN = 16

_MISTRAL_SPECIAL = (
    "<unk>",
    "[IMG]",
    "<s>",
    "</s>",
    "<pad>",
    "[INST]",
    "[/INST]",
    "[SYSTEM_PROMPT]",
    "[/SYSTEM_PROMPT]",
)
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% set text = m['content'] if m['content'] is string else "
    "m['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') %}"
    "{% if m['role'] == 'system' %}[SYSTEM_PROMPT] {{ text }} [/SYSTEM_PROMPT]"
    "{% elif m['role'] == 'user' %}[INST] {{ text }} [/INST]"
    "{% else %} {{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)
_QWEN_SPECIAL = ("<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>")
_QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_word_tokenizer(
    words: Iterable[str] = DEFAULT_WORDS,
    *,
    special_tokens: Sequence[str],
    chat_template: str | None = None,
    model_max_length: int = 512,
    **token_names: str,
):
    """
    A word-level `PreTrainedTokenizerFast` built in memory: `special_tokens` first (ids 0, 1, ...; the first is the
    unknown token), then one id per word of `words`; text is split on whitespace and punctuation.

    Args:
        words (`Iterable[str]`, *optional*): The vocabulary; other words map to the unknown token.
        special_tokens (`Sequence[str]`): Special tokens, unknown token first.
        chat_template (`str`, *optional*): A Jinja chat template for `apply_chat_template`.
        model_max_length (`int`, *optional*, defaults to 512): Maximum sequence length.
        token_names: `bos_token`, `eos_token`, `pad_token`, ... (each one of `special_tokens`).
    """
    transformers = require("transformers", "`tiny_word_tokenizer`", "pip install transformers")
    tokenizers = require("tokenizers", "`tiny_word_tokenizer`", "pip install tokenizers")
    vocab = {token: i for i, token in enumerate(special_tokens)}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token=special_tokens[0]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    named = set(token_names.values())
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=special_tokens[0],
        additional_special_tokens=[t for t in special_tokens[1:] if t not in named],
        chat_template=chat_template,
        model_max_length=model_max_length,
        **token_names,
    )


def _flux2_parts(seed: int, guidance_embeds: bool):
    from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel

    torch.manual_seed(seed)
    transformer = Flux2Transformer2DModel(
        patch_size=1,
        in_channels=4 * _TINY_VAE["latent_channels"],
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=3 * _TEXT_HIDDEN,
        timestep_guidance_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=guidance_embeds,
    )
    vae = AutoencoderKLFlux2(**_TINY_VAE)
    with torch.no_grad():
        vae.bn.running_mean.normal_(0.0, 0.5)
        vae.bn.running_var.uniform_(0.25, 4.0)
    # FLUX.2's scheduler config: dynamic shifting at inference, so the training sigmas are unshifted
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )
    return transformer, vae, scheduler


def tiny_flux2_pipeline(seed: int = 0, *, words: Iterable[str] = DEFAULT_WORDS, guidance_embeds: bool = True):
    """
    A `Flux2Pipeline` (FLUX.2-dev layout: guidance-embedded transformer, Mistral3 text encoder), 16x16 images.

    `default_sample_size` is set to 8 so that calls without `height`/`width` make 16x16 images (a reloaded pipeline
    falls back to FLUX.2's 128, i.e. 1024x1024 images: pass `height=16, width=16`).
    """
    from diffusers import Flux2Pipeline

    transformers = require("transformers", "`tiny_flux2_pipeline`", "pip install transformers")
    tokenizer = tiny_word_tokenizer(
        words,
        special_tokens=_MISTRAL_SPECIAL,
        chat_template=_MISTRAL_TEMPLATE,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    transformer, vae, scheduler = _flux2_parts(seed, guidance_embeds)
    ids = dict(bos_token_id=2, eos_token_id=3, pad_token_id=4)
    config = transformers.Mistral3Config(
        text_config=dict(
            model_type="mistral",
            vocab_size=len(tokenizer),
            hidden_size=_TEXT_HIDDEN,
            intermediate_size=2 * _TEXT_HIDDEN,
            num_hidden_layers=_TEXT_LAYERS,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=4,
            max_position_embeddings=512,
            rms_norm_eps=1e-5,
            sliding_window=None,
            **ids,
        ),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=4,
            head_dim=4,
            intermediate_size=32,
            image_size=32,
            patch_size=8,
            num_channels=3,
        ),
        image_token_index=1,
        vision_feature_layer=-1,
        spatial_merge_size=1,
        **ids,
    )
    text_encoder = transformers.Mistral3ForConditionalGeneration(config)
    _eval(transformer, vae, text_encoder)
    pipe = Flux2Pipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.default_sample_size = 8
    return pipe


def tiny_flux2_klein_pipeline(seed: int = 0, *, words: Iterable[str] = DEFAULT_WORDS, guidance_embeds: bool = False):
    """
    A `Flux2KleinPipeline` (FLUX.2-klein layout: no guidance embedding unless `guidance_embeds=True`, Qwen3 text
    encoder), 16x16 images; `default_sample_size` as in [`tiny_flux2_pipeline`].
    """
    from diffusers import Flux2KleinPipeline

    transformers = require("transformers", "`tiny_flux2_klein_pipeline`", "pip install transformers")
    tokenizer = tiny_word_tokenizer(
        words,
        special_tokens=_QWEN_SPECIAL,
        chat_template=_QWEN_TEMPLATE,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    transformer, vae, scheduler = _flux2_parts(seed, guidance_embeds)
    config = transformers.Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_HIDDEN,
        intermediate_size=2 * _TEXT_HIDDEN,
        num_hidden_layers=_TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=4,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    text_encoder = transformers.Qwen3ForCausalLM(config)
    _eval(transformer, vae, text_encoder)
    pipe = Flux2KleinPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    pipe.default_sample_size = 8
    return pipe
