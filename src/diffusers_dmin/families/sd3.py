"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`, flow matching with pooled projections).

Training script mirrored: `examples/dreambooth/train_dreambooth_lora_sd3.py`: `x_t = (1 - s) x0 + s e`, target
`e - x0`, the transformer called with `timestep = scheduler.timesteps[i]` (= `s * 1000`), sigmas of the checkpoint's
scheduler config (static shift 3.0 for SD3 and SD3.5), weighting scheme `logit_normal` (which only changes how the
script samples timesteps: its loss weight is 1), and `--precondition_outputs` (default 1): the prediction becomes
`model_pred * (-s) + x_t`, regressed onto `x0`, i.e. the flow loss weighted by `s^2`. SD3.5's transformer differences
(`qk_norm="rms_norm"`, MMDiT-X `dual_attention_layers`) change nothing in the objective or the call.
"""

from __future__ import annotations

from typing import Any

import torch

from ..objectives import ObjectiveConventions
from .base import LatentAdapter


__all__ = ["SD3Adapter"]


class SD3Adapter(LatentAdapter):
    """Stable Diffusion 3/3.5 (`SD3Transformer2DModel`, flow matching, pooled projections)."""

    family = "sd3"
    denoiser_attribute = "transformer"
    conventions = ObjectiveConventions(
        script="dreambooth/train_dreambooth_lora_sd3.py", weighting="logit_normal", precondition_outputs=True
    )

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        return type(getattr(pipeline, "transformer", None)).__name__ == "SD3Transformer2DModel"

    @torch.no_grad()
    def encode_prompts(self, prompts):
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "pooled_projections": pooled.to(self.dtype)}

    def forward(self, call, noisy, timesteps, cond):
        return call(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"],
            return_dict=False,
        )[0]
