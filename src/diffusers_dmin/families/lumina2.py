"""Lumina-Image 2.0 (`Lumina2Transformer2DModel`, flow matching with the reversed interpolation, Gemma 2 captions).

Training script mirrored: `examples/dreambooth/train_dreambooth_lora_lumina2.py`: latents
`(z - shift_factor) * scaling_factor`, the REVERSED interpolation `x_t = (1 - s) e + s x0` (sigma 1 is the clean
image), target `x0 - e`, the transformer called with `timestep = scheduler.timesteps[i] / num_train_timesteps` (that
is `s` itself: "reversal not needed as we used a reverse lerp above already"), the caption encoded by the pipeline's
`encode_prompt` with its default system prompt (`--system_prompt` defaults to None) and `max_sequence_length=256`,
passed with its attention mask; sigmas of the checkpoint's scheduler config as loaded (no shift override), weighting
scheme `none`.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from ..objectives import ObjectiveConventions
from .base import LatentAdapter


__all__ = ["Lumina2Adapter"]


class Lumina2Adapter(LatentAdapter):
    """Lumina-Image 2.0 (`Lumina2Pipeline`): reversed flow matching, timestep `s`, Gemma 2 embeddings with a mask."""

    family = "lumina2"
    denoiser_attribute = "transformer"
    supports_vmap = False  # its rotary embedder reads the caption lengths from the attention mask with `.tolist()`
    conventions = ObjectiveConventions(
        script="dreambooth/train_dreambooth_lora_lumina2.py", interpolation="data_at_one", timestep_scale=1e-3
    )

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        return type(getattr(pipeline, "transformer", None)).__name__ == "Lumina2Transformer2DModel"

    def resolve_conventions(self, config):
        # the script divides by the scheduler's own `num_train_timesteps` (1000 for the released checkpoints)
        conventions = super().resolve_conventions(config)
        return replace(conventions, timestep_scale=1.0 / float(self.scheduler.config.num_train_timesteps))

    @torch.no_grad()
    def encode_prompts(self, prompts):
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            list(prompts), do_classifier_free_guidance=False, device=self.device, max_sequence_length=256
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "encoder_attention_mask": mask}

    def forward(self, call, noisy, timesteps, cond):
        return call(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_attention_mask=cond["encoder_attention_mask"],
            return_dict=False,
        )[0]
