"""Qwen-Image (`QwenImagePipeline`: `QwenImageTransformer2DModel`, `AutoencoderKLQwenImage`, Qwen2.5-VL text encoder).

Training script mirrored: `examples/dreambooth/train_dreambooth_lora_qwen_image.py`:

- latents: the VAE's 5-D latents `(B, C, 1, h, w)` normalised per channel, `(z - latents_mean) * (1 / latents_std)`;
- scheduler: `FlowMatchEulerDiscreteScheduler.from_pretrained(..., shift=3.0)` and its `timesteps`/`sigmas`. The
  Qwen-Image checkpoints' scheduler config has `use_dynamic_shifting=True`, under which the constructor does not shift
  the training sigmas, so `shift=3.0` is a no-op there and the training sigmas are `t / 1000`; it shifts them only for
  a config with `use_dynamic_shifting=False`. [`QwenImageAdapter.training_scheduler`] builds the scheduler the same way,
  so both cases follow the script;
- noisy input `(1 - s) x0 + s e`, packed into 2x2 patches (`QwenImagePipeline._pack_latents` after moving the frame
  axis in front of the channels), `img_shapes = [(1, h // 2, w // 2)]`, the prompt's `encoder_hidden_states_mask`
  (`None` when no token is padding), `timestep = timesteps / 1000`, no guidance (the script passes none);
- prediction unpacked to `(B, C, 1, h, w)`, target `e - x0`, weighting `none` (the script's default).
"""

from __future__ import annotations

from typing import Any

import torch

from ..objectives import ObjectiveConventions
from .base import LatentAdapter


__all__ = ["QwenImageAdapter"]


class QwenImageAdapter(LatentAdapter):
    r"""
    Qwen-Image text-to-image (`QwenImagePipeline`).

    The index's noise is stored in the VAE latent layout `(C, 1, h, w)`, keeping the single frame axis, not squeezed
    to `(C, h, w)`: `AutoencoderKLQwenImage` is a video VAE whose `encode` returns and whose `decode` takes 5-D latents,
    the training script's `model_input`, noise and target are `(B, C, 1, h, w)`, and `QwenImagePipeline._unpack_latents`
    returns that layout. So `latents=` inputs, [`latents_from_pipeline`] and the VAE agree without reshaping, and the
    family stays open to the multi-frame members of the same VAE (Qwen-Image-Layered). The fixed noise holds the same
    numbers in the same order as a `(C, h, w)` draw from the same seed would; only the recorded shape differs.
    """

    family = "qwenimage"
    denoiser_attribute = "transformer"
    conventions = ObjectiveConventions(script="dreambooth/train_dreambooth_lora_qwen_image.py", timestep_scale=1e-3)
    #: the script's `--max_sequence_length` default (text tokens after the prompt template's system prefix)
    max_sequence_length = 512
    #: the `shift` the script passes to `FlowMatchEulerDiscreteScheduler.from_pretrained`
    script_shift = 3.0

    def __init__(self, pipeline: Any, resolution: tuple[int, int] | None = None, config=None):
        super().__init__(pipeline, resolution, config)
        channels, height, width = self.latent_shape
        self.latent_shape = (channels, 1, height, width)

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        transformer = getattr(pipeline, "transformer", None)
        return (
            type(pipeline).__name__ == "QwenImagePipeline"
            and type(transformer).__name__ == "QwenImageTransformer2DModel"
        )

    def training_scheduler(self, scheduler):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config, shift=self.script_shift)

    # ---- shapes

    def vae_scale_factor(self) -> int:
        return 2 ** len(self.vae.temperal_downsample)

    @property
    def patch_size(self) -> int:
        return 2

    @property
    def latent_channels(self) -> int:
        return self.in_channels // 4

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.input_channels)

    def default_resolution(self) -> tuple[int, int]:
        size = int(self.pipeline.default_sample_size) * self.scale_factor
        return (size, size)

    # ---- images and latents

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        latents = vae.encode(pixels.unsqueeze(2).to(vae.device, vae.dtype)).latent_dist.mode()
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, latents.dtype)
        inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(shape).to(latents.device, latents.dtype)
        return ((latents - mean) * inv_std).to(self.device, self.dtype)

    def latents_from_pipeline(self, latents: torch.Tensor) -> torch.Tensor:
        """Packed `(B, h/2 * w/2, 4 C)` tokens of the denoising loop -> `(B, C, 1, h, w)`."""
        channels, _, height, width = self.latent_shape
        return _unpack(latents, channels, height, width)

    # ---- prompts and the network call

    @torch.no_grad()
    def encode_prompts(self, prompts):
        embeds, mask = self.pipeline.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
        )
        cond = {"encoder_hidden_states": embeds.to(self.dtype)}
        if mask is not None:  # the pipeline drops an all-ones mask, as the script's batching does
            cond["encoder_hidden_states_mask"] = mask
        return cond

    def forward(self, call, noisy, timesteps, cond):
        batch, channels, _, height, width = noisy.shape  # one frame
        packed = (
            noisy.reshape(batch, channels, height // 2, 2, width // 2, 2)
            .permute(0, 2, 4, 1, 3, 5)
            .reshape(batch, (height // 2) * (width // 2), channels * 4)
        )
        prediction = call(
            hidden_states=packed,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_hidden_states_mask=cond.get("encoder_hidden_states_mask"),
            timestep=timesteps,
            img_shapes=[(1, height // 2, width // 2)] * batch,
            return_dict=False,
        )[0]
        return _unpack(prediction, prediction.shape[-1] // 4, height, width)


def _unpack(tokens: torch.Tensor, channels: int, height: int, width: int) -> torch.Tensor:
    """`(B, h/2 * w/2, 4 C)` 2x2-patch tokens -> `(B, C, 1, h, w)` latents."""
    batch = tokens.shape[0]
    return (
        tokens.reshape(batch, height // 2, width // 2, channels, 2, 2)
        .permute(0, 3, 1, 4, 2, 5)
        .reshape(batch, channels, 1, height, width)
    )
