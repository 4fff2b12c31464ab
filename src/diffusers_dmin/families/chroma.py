"""Chroma (`ChromaTransformer2DModel`: Flux-derived, T5 only, no pooled projection, no guidance embedding).

diffusers ships no Chroma training script (none in `examples/`, 0.42). The objective is therefore the flow matching
of `examples/dreambooth/train_dreambooth_lora_flux.py` (Chroma is a FLUX.1-schnell derivative and trains with the
same rectified-flow loss): `x_t = (1 - s) x0 + s e` packed into 2x2 patches, target `e - x0`, `timestep = s` (the
script's `timesteps / 1000`), weighting `none`, sigmas of the checkpoint's scheduler config; with the conditioning
of `ChromaPipeline`: T5 hidden states computed with the tokenizer's attention mask, and the transformer's
`attention_mask` = that mask with the first padding token kept, extended by ones over the image tokens
(`ChromaPipeline._prepare_attention_mask`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..objectives import ObjectiveConventions
from .flux import FluxAdapter


__all__ = ["ChromaAdapter"]


class ChromaAdapter(FluxAdapter):
    """Chroma (`ChromaTransformer2DModel`): Flux's packing and ids, T5 with its attention mask, no guidance."""

    family = "chroma"
    conventions = ObjectiveConventions(
        script="none in diffusers: the flow matching of dreambooth/train_dreambooth_lora_flux.py, ChromaPipeline's "
        "conditioning",
        timestep_scale=1e-3,
        weighting="none",
    )
    # not ChromaInpaintPipeline: in diffusers 0.42 it reads `transformer.config.guidance_embeds`, which
    # ChromaTransformer2DModel does not have, and fails before denoising
    pipeline_names = ("ChromaPipeline", "ChromaImg2ImgPipeline")
    transformer_name = "ChromaTransformer2DModel"

    @torch.no_grad()
    def encode_prompts(self, prompts):
        embeds, _, mask, *_ = self.pipeline.encode_prompt(
            prompt=list(prompts), device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "prompt_attention_mask": mask}

    def conditioning(self, cond: dict[str, torch.Tensor], batch: int, image_tokens: int) -> dict[str, Any]:
        mask = cond["prompt_attention_mask"]
        return {
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "attention_mask": self.pipeline._prepare_attention_mask(batch, image_tokens, mask.dtype, mask),
        }
