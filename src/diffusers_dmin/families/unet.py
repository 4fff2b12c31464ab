"""UNet families: DDPM/DDIM (`UNet2DModel`), Stable Diffusion 1.x/2.x and SDXL (`UNet2DConditionModel`).

Training scripts mirrored: `examples/unconditional_image_generation/train_unconditional.py`,
`examples/text_to_image/train_text_to_image_lora.py` and `train_text_to_image_lora_sdxl.py` (DDPM `add_noise`, target
from the scheduler's `prediction_type`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..objectives import ObjectiveConventions
from .base import LatentAdapter, ModelFamily


__all__ = ["UNet2DAdapter", "UNet2DConditionAdapter", "SDXLAdapter"]


class UNet2DAdapter(ModelFamily):
    """Unconditional pixel-space UNets: `DDPMPipeline`, `DDIMPipeline` (`UNet2DModel`)."""

    family = "unet2d"
    conditional = False
    conventions = ObjectiveConventions(script="unconditional_image_generation/train_unconditional.py")

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        return type(getattr(pipeline, "unet", None)).__name__ == "UNet2DModel"

    def encode_prompts(self, prompts):
        return {}

    def forward(self, call, noisy, timesteps, cond):
        return call(noisy, timesteps, return_dict=False)[0]


class UNet2DConditionAdapter(LatentAdapter):
    """Stable Diffusion 1.x/2.x (`UNet2DConditionModel` with cross-attention on CLIP text embeddings)."""

    family = "unet2d_condition"
    conventions = ObjectiveConventions(script="text_to_image/train_text_to_image_lora.py")

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        unet = getattr(pipeline, "unet", None)
        return (
            type(unet).__name__ == "UNet2DConditionModel"
            and unet.config.get("addition_embed_type") is None
            and hasattr(pipeline, "encode_prompt")
        )

    @torch.no_grad()
    def encode_prompts(self, prompts):
        embeds, _ = self.pipeline.encode_prompt(list(prompts), self.device, 1, False)
        return {"encoder_hidden_states": embeds.to(self.dtype)}

    def forward(self, call, noisy, timesteps, cond):
        return call(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], return_dict=False)[0]


class SDXLAdapter(LatentAdapter):
    """Stable Diffusion XL: two text encoders, pooled `text_embeds` and `time_ids` as added conditions."""

    family = "sdxl"
    conventions = ObjectiveConventions(script="text_to_image/train_text_to_image_lora_sdxl.py")

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        unet = getattr(pipeline, "unet", None)
        return type(unet).__name__ == "UNet2DConditionModel" and unet.config.get("addition_embed_type") == "text_time"

    @torch.no_grad()
    def encode_prompts(self, prompts):
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        height, width = self.resolution
        # original size, crop top-left, target size: as the SDXL training scripts compute them for unaugmented images
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=self.dtype, device=self.device)
        return {
            "encoder_hidden_states": embeds.to(self.dtype),
            "text_embeds": pooled.to(self.dtype),
            "time_ids": time_ids.repeat(len(prompts), 1),
        }

    def forward(self, call, noisy, timesteps, cond):
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return call(
            noisy,
            timesteps,
            encoder_hidden_states=cond["encoder_hidden_states"],
            added_cond_kwargs=added,
            return_dict=False,
        )[0]
