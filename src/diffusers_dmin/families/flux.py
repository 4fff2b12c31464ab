"""FLUX.1 (`FluxTransformer2DModel`: FLUX.1-dev, guidance-distilled, and FLUX.1-schnell).

Training script mirrored: `examples/dreambooth/train_dreambooth_lora_flux.py`:

- clean latents `(z - vae.config.shift_factor) * vae.config.scaling_factor`;
- `x_t = (1 - s) x0 + s e` in the VAE layout `(B, C, h, w)`, then `FluxPipeline._pack_latents` into `(B, h/2 * w/2,
  4C)` tokens of 2x2 patches; `img_ids = FluxPipeline._prepare_latent_image_ids(B, h // 2, w // 2)`, `txt_ids` zeros;
- the transformer called with `timestep=timesteps / 1000` (`scheduler.timesteps[i] / 1000`, i.e. `s`),
  `pooled_projections` (CLIP) and `encoder_hidden_states` (T5), and `guidance = --guidance_scale` (default 3.5) as a
  float tensor when `transformer.config.guidance_embeds` (FLUX.1-dev), else `None` (FLUX.1-schnell);
- the prediction unpacked with `FluxPipeline._unpack_latents`, target `e - x0`, `--weighting_scheme` default `none`;
- sigmas of `FlowMatchEulerDiscreteScheduler.from_pretrained(<model>, subfolder="scheduler")`: FLUX.1-dev's config has
  `use_dynamic_shifting=True`, so its constructor applies no shift and the training sigmas are `s = t / 1000` (the
  resolution-dependent shift `mu` exists only at inference); FLUX.1-schnell's has a static `shift=1.0`: the same.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ..objectives import ObjectiveConventions
from .base import LatentAdapter


__all__ = ["FluxAdapter"]


def _pipeline_classes(*names: str) -> tuple[type, ...]:
    import diffusers

    return tuple(getattr(diffusers, name) for name in names if hasattr(diffusers, name))


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """`(B, C, h, w)` -> `(B, h/2 * w/2, 4C)` tokens of 2x2 patches (`FluxPipeline._pack_latents`)."""
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def unpack_latents(tokens: torch.Tensor, latent_size: tuple[int, int]) -> torch.Tensor:
    """`(B, h/2 * w/2, 4C)` tokens -> `(B, C, h, w)` (`FluxPipeline._unpack_latents` at VAE scale factor 1)."""
    from diffusers import FluxPipeline

    return FluxPipeline._unpack_latents(tokens, latent_size[0], latent_size[1], 1)


class FluxAdapter(LatentAdapter):
    """FLUX.1-dev / -schnell (`FluxTransformer2DModel`: packed 2x2 latent patches, position ids, guidance embedding)."""

    family = "flux"
    denoiser_attribute = "transformer"
    conventions = ObjectiveConventions(
        script="dreambooth/train_dreambooth_lora_flux.py", timestep_scale=1e-3, guidance=3.5, weighting="none"
    )
    # Pipelines whose denoiser sees only the packed noisy latents and the text (image-to-image and inpainting start
    # from or blend in an image, but call the transformer exactly as text-to-image does). Kontext is its own family
    # (flux_kontext.py); not matched: Fill and Control (image channels concatenated), ControlNet (residuals).
    pipeline_names: tuple[str, ...] = ("FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline")
    transformer_name = "FluxTransformer2DModel"
    conditioning_arguments = ("ip_adapter_image", "ip_adapter_image_embeds")

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        transformer = getattr(pipeline, "transformer", None)
        if type(transformer).__name__ != cls.transformer_name:
            return False
        return isinstance(pipeline, _pipeline_classes(*cls.pipeline_names))

    # ---- shapes

    @property
    def patch_size(self) -> int:
        return 2

    @property
    def latent_channels(self) -> int:
        return self.in_channels // 4

    def default_resolution(self) -> tuple[int, int]:
        # what the pipeline generates without height/width: default_sample_size * vae_scale_factor (1024 for FLUX.1)
        size = int(getattr(self.pipeline, "default_sample_size", 128)) * self.scale_factor
        return (size, size)

    @property
    def uses_guidance(self) -> bool:
        return bool(self.denoiser.config.get("guidance_embeds", False))

    def latents_from_pipeline(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's packed `(B, h/2 * w/2, 4C)` latents -> `(B, C, h, w)`."""
        channels, height, width = self.latent_shape
        expected = ((height // 2) * (width // 2), 4 * channels)
        if latents.dim() != 3 or tuple(latents.shape[1:]) != expected:
            raise ConfigError(
                f"Expected packed latents of shape (B, {expected[0]}, {expected[1]}) from {type(self.pipeline).__name__} "
                f"at resolution {self.resolution}, but got {tuple(latents.shape)}; generate at the index's resolution."
            )
        return unpack_latents(latents, (height, width))

    # ---- prompts and the network call

    @torch.no_grad()
    def encode_prompts(self, prompts):
        # the pipeline's own encoding: CLIP pooled output and T5 hidden states at the default max_sequence_length (512,
        # also the script's default); no classifier-free guidance in FLUX.1
        embeds, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), prompt_2=None, device=self.device, num_images_per_prompt=1
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def conditioning(self, cond: dict[str, torch.Tensor], batch: int, image_tokens: int) -> dict[str, Any]:
        """Keyword arguments of the transformer call besides the latents, timestep and position ids."""
        guidance = None
        if self.uses_guidance:
            guidance = torch.tensor([self.conventions.guidance], device=self.device).expand(batch)
        return {
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "pooled_projections": cond["pooled_projections"],
            "guidance": guidance,
        }

    def image_condition(self, cond: dict[str, torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Packed tokens of a condition image appended to the latent tokens, and their position ids (Kontext's image
        to edit); `None` for text-only conditioning."""
        return None

    def forward(self, call, noisy, timesteps, cond):
        from diffusers import FluxPipeline

        batch, _, height, width = noisy.shape
        tokens = pack_latents(noisy)
        num_tokens = tokens.shape[1]
        img_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, noisy.device, noisy.dtype)
        extra = self.image_condition(cond, batch)
        if extra is not None:
            tokens, img_ids = torch.cat([tokens, extra[0]], dim=1), torch.cat([img_ids, extra[1]], dim=0)
        txt_ids = torch.zeros(cond["encoder_hidden_states"].shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        pred = call(
            hidden_states=tokens,
            timestep=timesteps,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
            **self.conditioning(cond, batch, tokens.shape[1]),
        )[0]
        return unpack_latents(pred[:, :num_tokens], (height, width))
