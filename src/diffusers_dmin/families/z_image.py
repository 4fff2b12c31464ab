"""Z-Image (`ZImagePipeline`, `ZImageTransformer2DModel`, Qwen3 text encoder).

Training script mirrored: `examples/dreambooth/train_dreambooth_lora_z_image.py`. Per training step it encodes the
image with the Flux VAE (`latent_dist.mode()`, then `(z - shift_factor) * scaling_factor`), draws the noise in that
`(C, h, w)` layout, takes `sigmas` of the checkpoint's scheduler config (Z-Image: static shift 3.0), forms
`(1 - s) x0 + s e`, and calls the transformer with a list of `(C, 1, h, w)` latents, the *reversed* normalised
timestep `(1000 - timesteps) / 1000` (that is `1 - s`) and a list of prompt embeddings (the second-to-last hidden
state of the text encoder at the prompt's non-padding tokens, `encode_prompt(max_sequence_length=512)`). The
prediction is negated (`model_pred = -model_pred`) and regressed onto `noise - model_input` with the
`--weighting_scheme` weights (default `"none"`); the transformer patchifies 2x2 itself, so nothing is packed here.
"""

from __future__ import annotations

from typing import Any

import torch

from ..objectives import ObjectiveConventions
from .base import LatentAdapter


__all__ = ["ZImageAdapter"]


class ZImageAdapter(LatentAdapter):
    """Z-Image (`ZImagePipeline`: `ZImageTransformer2DModel`, flow matching with a negated prediction)."""

    family = "z_image"
    denoiser_attribute = "transformer"
    # the denoiser gets `(1000 - t) / 1000`, computed in `forward` from the unscaled `scheduler.timesteps[i]`
    conventions = ObjectiveConventions(script="dreambooth/train_dreambooth_lora_z_image.py", prediction_sign=-1.0)
    #: `--max_sequence_length` default of the training script
    max_sequence_length: int = 512
    # prompt embeddings have one length per prompt (padding tokens are dropped), which vmap cannot batch
    supports_vmap = False
    # text-to-image and image-to-image (which starts from a noised image but calls the transformer as text-to-image
    # does); not the Omni/edit pipelines, whose reference images enter the transformer as extra conditioning
    pipeline_names: tuple[str, ...] = ("ZImagePipeline", "ZImageImg2ImgPipeline")

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        return (
            type(getattr(pipeline, "transformer", None)).__name__ == "ZImageTransformer2DModel"
            and type(pipeline).__name__ in cls.pipeline_names
        )

    @property
    def patch_size(self) -> int:
        return int(self.denoiser.config.all_patch_size[0])

    def default_resolution(self) -> tuple[int, int]:
        return (1024, 1024)  # `ZImagePipeline`'s default `height`/`width`

    @torch.no_grad()
    def encode_prompts(self, prompts):
        embeds, _ = self.pipeline.encode_prompt(
            prompt=list(prompts),  # a copy: `_encode_prompt` writes the chat-templated text into the list it gets
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length,
        )
        # a list of (L_i, D): padded to one tensor with its lengths, cut back in `forward`
        length = max(e.shape[0] for e in embeds)
        padded = torch.zeros(len(embeds), length, embeds[0].shape[-1], dtype=self.dtype, device=self.device)
        for i, e in enumerate(embeds):
            padded[i, : e.shape[0]] = e.to(self.dtype)
        lengths = torch.tensor([e.shape[0] for e in embeds], device=self.device)
        return {"prompt_embeds": padded, "prompt_lengths": lengths}

    def forward(self, call, noisy, timesteps, cond):
        embeds = [e[: int(n)] for e, n in zip(cond["prompt_embeds"], cond["prompt_lengths"])]
        pred = call(
            list(noisy.unsqueeze(2).unbind(dim=0)),
            (1000 - timesteps) / 1000,
            embeds,
            return_dict=False,
        )[0]
        return torch.stack(pred, dim=0).squeeze(2)
