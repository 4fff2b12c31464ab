"""Tiny, randomly initialised diffusers pipelines built from configs, for tests, examples and benchmarks.

Nothing here downloads anything: models are built from small configs under a fixed seed and the CLIP tokenizer is
built from an in-memory byte-level vocabulary. The pipelines run in well under a second on a CPU, save with
`save_pretrained` and reload with `from_pretrained`. They need `transformers` for the text encoders (conditional
pipelines only).

Examples:
```py
>>> from diffusers_dmin.testing import tiny_sd_pipeline
>>> pipe = tiny_sd_pipeline(seed=0)
>>> pipe("a photo of a cat", num_inference_steps=2, output_type="np").images.shape
(1, 16, 16, 3)
```
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from ..errors import require


__all__ = [
    "tiny_clip_tokenizer",
    "tiny_ddpm_pipeline",
    "tiny_sd_pipeline",
    "tiny_sdxl_pipeline",
    "tiny_sd3_pipeline",
    "tiny_sd35_pipeline",
    "add_tiny_lora",
    "tiny_qwen2_tokenizer",
    "tiny_qwenimage_pipeline",
    "tiny_gemma_tokenizer",
    "tiny_sana_pipeline",
    "tiny_lumina2_pipeline",
    "tiny_hidream_pipeline",
    "tiny_cogvideox_pipeline",
    "tiny_t5_tokenizer",
    "tiny_t5_encoder",
    "tiny_flux_pipeline",
    "tiny_flux_kontext_pipeline",
    "tiny_chroma_pipeline",
    "tiny_word_tokenizer",
    "tiny_flux2_pipeline",
    "tiny_flux2_klein_pipeline",
    "tiny_z_image_pipeline",
]

DEFAULT_WORDS = (
    "a", "photo", "of", "the", "digit", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight",
    "nine", "cat", "dog", "face", "card", "shape", "circle", "square", "red", "blue", "noise", "handwritten",
)  # fmt: skip

_TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2/CLIP reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, codes)))


def tiny_clip_tokenizer(words: Iterable[str] = DEFAULT_WORDS, model_max_length: int = 77):
    """
    A `CLIPTokenizer` built offline: all 256 byte-level characters plus merges that make each of `words` one token.

    Args:
        words (`Iterable[str]`, *optional*): Words that get a single token each; other text is split into bytes.
        model_max_length (`int`, *optional*, defaults to 77): Maximum sequence length.
    """
    transformers = require("transformers", "`tiny_clip_tokenizer`", "pip install transformers")
    chars = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(words):
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            symbols = [merged] + symbols[2:]
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return transformers.CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def _clip_config(tokenizer, hidden_size: int = 32, projection_dim: int = 32):
    transformers = require("transformers", "tiny text encoders", "pip install transformers")
    return transformers.CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=projection_dim,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _eval(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.eval()


def tiny_ddpm_pipeline(
    seed: int = 0,
    *,
    scheduler: str = "ddpm",
    prediction_type: str = "epsilon",
    sample_size: int = 16,
    in_channels: int = 1,
):
    """
    A `DDPMPipeline` (or `DDIMPipeline` with `scheduler="ddim"`) around a ~0.7M-parameter `UNet2DModel` with
    attention blocks, at `sample_size` pixels and `in_channels` channels.
    """
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=8,
    )
    _eval(unet)
    if scheduler == "ddim":
        return DDIMPipeline(
            unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000, prediction_type=prediction_type)
        )
    if scheduler != "ddpm":
        raise ValueError(f"`scheduler` must be 'ddpm' or 'ddim', but is {scheduler!r}.")
    return DDPMPipeline(unet=unet, scheduler=DDPMScheduler(num_train_timesteps=1000, prediction_type=prediction_type))


def tiny_sd_pipeline(seed: int = 0, *, prediction_type: str = "epsilon", words: Iterable[str] = DEFAULT_WORDS):
    """A `StableDiffusionPipeline` (SD 1.x/2.x layout): 16x16 images, 8x8x4 latents, a 2-layer CLIP text encoder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    transformers = require("transformers", "`tiny_sd_pipeline`", "pip install transformers")
    tokenizer = tiny_clip_tokenizer(words)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(**_TINY_VAE)
    text_encoder = transformers.CLIPTextModel(_clip_config(tokenizer))
    _eval(unet, vae, text_encoder)
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def tiny_sdxl_pipeline(seed: int = 0, *, words: Iterable[str] = DEFAULT_WORDS):
    """A `StableDiffusionXLPipeline`: two CLIP text encoders, added text embeddings and time ids, 16x16 images."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    transformers = require("transformers", "`tiny_sdxl_pipeline`", "pip install transformers")
    tokenizer = tiny_clip_tokenizer(words)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(**_TINY_VAE)
    text_encoder = transformers.CLIPTextModel(_clip_config(tokenizer))
    text_encoder_2 = transformers.CLIPTextModelWithProjection(_clip_config(tokenizer))
    _eval(unet, vae, text_encoder, text_encoder_2)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1
    )
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


def tiny_sd3_pipeline(seed: int = 0, *, words: Iterable[str] = DEFAULT_WORDS, **transformer_config):
    """A `StableDiffusion3Pipeline` without T5 (`text_encoder_3=None`), flow matching, 16x16 images.

    `transformer_config` overrides entries of the `SD3Transformer2DModel` config (see [`tiny_sd35_pipeline`]).
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    transformers = require("transformers", "`tiny_sd3_pipeline`", "pip install transformers")
    tokenizer = tiny_clip_tokenizer(words)
    torch.manual_seed(seed)
    config = dict(
        sample_size=8,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    transformer = SD3Transformer2DModel(**{**config, **transformer_config})
    vae = AutoencoderKL(
        **_TINY_VAE, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035
    )
    text_encoder = transformers.CLIPTextModelWithProjection(_clip_config(tokenizer))
    text_encoder_2 = transformers.CLIPTextModelWithProjection(_clip_config(tokenizer))
    _eval(transformer, vae, text_encoder, text_encoder_2)
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )


def add_tiny_lora(
    denoiser: torch.nn.Module,
    *,
    rank: int = 4,
    alpha: int = 8,
    target_modules: Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
    seed: int = 0,
    adapter_name: str = "default",
) -> torch.nn.Module:
    """
    Add a LoRA adapter whose A *and* B matrices are random, so every LoRA gradient is non-zero.

    With PEFT's default initialisation `lora_B = 0`, the gradients with respect to every `lora_A` are exactly zero;
    a trained adapter does not have that problem, a fresh one in a test does. Uses `add_adapter` when the denoiser
    has it (diffusers' PEFT integration) and `peft.inject_adapter_in_model` otherwise (`UNet2DModel`); only the LoRA
    parameters keep `requires_grad=True`.
    """
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(target_modules))
    if hasattr(denoiser, "add_adapter"):
        denoiser.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, denoiser, adapter_name=adapter_name)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            param.requires_grad_("lora_" in name)
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    return denoiser


from .chroma import tiny_chroma_pipeline  # noqa: E402
from .cogvideox import tiny_cogvideox_pipeline  # noqa: E402
from .flux import tiny_flux_pipeline, tiny_t5_encoder, tiny_t5_tokenizer  # noqa: E402
from .flux2 import tiny_flux2_klein_pipeline, tiny_flux2_pipeline, tiny_word_tokenizer  # noqa: E402
from .flux_kontext import tiny_flux_kontext_pipeline  # noqa: E402
from .hidream import tiny_hidream_pipeline  # noqa: E402
from .lumina2 import tiny_lumina2_pipeline  # noqa: E402
from .qwenimage import tiny_qwen2_tokenizer, tiny_qwenimage_pipeline  # noqa: E402
from .sana import tiny_gemma_tokenizer, tiny_sana_pipeline  # noqa: E402
from .sd35 import tiny_sd35_pipeline  # noqa: E402
from .z_image import tiny_z_image_pipeline  # noqa: E402
