"""FLUX.1 Kontext (`FluxKontextPipeline`).

Training script mirrored: `examples/dreambooth/train_dreambooth_lora_flux_kontext.py`. Without `--cond_image_column`
(text-to-image) its training step is that of `train_dreambooth_lora_flux.py` (see `families/flux.py`): packed 2x2
latents, `img_ids` from `_prepare_latent_image_ids(b, h // 2, w // 2)`, `timestep=timesteps / 1000`, `guidance =
--guidance_scale` (default 3.5; FLUX.1-Kontext-dev is guidance-distilled), target `e - x0`, weighting `none`, sigmas
of the checkpoint's scheduler config (`use_dynamic_shifting=True`: unshifted). With `--cond_image_column`
(image-to-image), the condition image's latents (`--vae_encode_mode` default `mode`, shifted and scaled like the
target's) are packed and appended to the token sequence, their ids made with `_prepare_latent_image_ids` and first
coordinate set to 1, and the prediction cut back to the target's tokens: pass them as
`GradientSketcher(...)(images, prompts, condition_images=...)`.

Not wired yet: `GradientIndex.build` / `dmin build` take no condition-image column, the manifest does not record
whether condition images were used, and `InfluencePipeline` refuses `image=` with `return_influence=True` (it would
have to reproduce the pipeline's resizing of the image to edit); generation attribution is text-to-image only.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ..objectives import ObjectiveConventions
from .flux import FluxAdapter, pack_latents


__all__ = ["FluxKontextAdapter"]


class FluxKontextAdapter(FluxAdapter):
    """FLUX.1 Kontext: the Flux objective, plus the packed tokens of a condition image when one is given."""

    family = "flux_kontext"
    conventions = ObjectiveConventions(
        script="dreambooth/train_dreambooth_lora_flux_kontext.py",
        timestep_scale=1e-3,
        guidance=3.5,
        weighting="none",
    )
    pipeline_names = ("FluxKontextPipeline",)
    conditioning_arguments = FluxAdapter.conditioning_arguments + ("image",)

    def pipeline_defaults(self) -> dict[str, Any]:
        # FluxKontextPipeline rescales height x width to `max_area` (default 1024**2) before generating
        height, width = self.resolution
        return {"max_area": height * width}

    @torch.no_grad()
    def encode_condition_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        step = 2 * self.scale_factor
        if pixels.shape[-2] % step or pixels.shape[-1] % step:
            raise ConfigError(
                f"`condition_images` have size {tuple(pixels.shape[-2:])}; FLUX.1 Kontext needs sides divisible by "
                f"{step} (VAE scale factor {self.scale_factor} times the 2x2 packing). Resize them first."
            )
        return {"condition_latents": self.encode_images(pixels)}

    def image_condition(self, cond: dict[str, torch.Tensor], batch: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        from diffusers import FluxKontextPipeline

        latents = cond.get("condition_latents")
        if latents is None:
            return None
        height, width = latents.shape[-2:]
        ids = FluxKontextPipeline._prepare_latent_image_ids(
            batch, height // 2, width // 2, latents.device, latents.dtype
        )
        ids[..., 0] = 1
        return pack_latents(latents), ids
