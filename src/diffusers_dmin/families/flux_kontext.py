"""FLUX.1 Kontext (`FluxKontextPipeline`), text-to-image objective only.

Training script mirrored: `examples/dreambooth/train_dreambooth_lora_flux_kontext.py` without `--cond_image_column`
(its text-to-image mode): the objective of `train_dreambooth_lora_flux.py` (see `families/flux.py`): packed 2x2 latents,
`img_ids` from `_prepare_latent_image_ids(b, h // 2, w // 2)`, `timestep=timesteps / 1000`, `guidance =
--guidance_scale` (default 3.5; FLUX.1-Kontext-dev is guidance-distilled), target `e - x0`, weighting `none`, sigmas of
the checkpoint's scheduler config (`use_dynamic_shifting=True`: unshifted).

Not supported: the script's image-to-image mode (`--cond_image_column`), where the condition image's packed latents
are appended to the token sequence (ids with first coordinate 1) and the prediction cut back to the target's tokens.
The gradient here encodes the prompt alone, so `InfluencePipeline` refuses `image=` with `return_influence=True`.
"""

from __future__ import annotations

from typing import Any

from ..objectives import ObjectiveConventions
from .flux import FluxAdapter


__all__ = ["FluxKontextAdapter"]


class FluxKontextAdapter(FluxAdapter):
    """FLUX.1 Kontext as trained by the Kontext script's text-to-image mode (the Flux objective)."""

    family = "flux_kontext"
    conventions = ObjectiveConventions(
        script="dreambooth/train_dreambooth_lora_flux_kontext.py (text-to-image: no --cond_image_column)",
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
