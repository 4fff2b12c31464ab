"""HiDream-I1 (`HiDreamImageTransformer2DModel`: sparse-MoE DiT on CLIP-L/G pooled, T5 and Llama-3.1 layer embeddings).

Training script mirrored: `examples/dreambooth/train_dreambooth_lora_hidream.py`: latents
`(z - shift_factor) * scaling_factor`, a `FlowMatchEulerDiscreteScheduler` loaded from the checkpoint's scheduler
config with `shift=3.0` (static; whatever scheduler class the pipeline samples with, e.g. HiDream-I1-Full's
flow-sigma `UniPCMultistepScheduler`), `x_t = (1 - s) x0 + s e`, the transformer called with
`timesteps = scheduler.timesteps[i]` (`s * 1000`, unscaled) on the `(B, C, h, w)` latents (it patchifies 2x2
itself), its prediction NEGATED (`model_pred * -1`) against target `e - x0`, weighting scheme `none`; prompts through
the pipeline's `encode_prompt(prompt, max_sequence_length=128)`.

The script loads the transformer with `force_inference_output=True`, so even in `train()` mode its MoE layers take
the inference path (`moe_infer`, which runs under `torch.no_grad()`: routed experts pass no gradient) and no
auxiliary load-balancing loss; that is exactly the `eval()` forward DMin uses.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..objectives import ObjectiveConventions
from .base import LatentAdapter


__all__ = ["HiDreamAdapter"]


class HiDreamAdapter(LatentAdapter):
    """HiDream-I1 (`HiDreamImagePipeline`): flow matching with static shift 3.0 and a sign-flipped prediction."""

    family = "hidream"
    denoiser_attribute = "transformer"
    supports_vmap = False  # the MoE inference path routes tokens with `bincount().cpu().numpy()`
    conventions = ObjectiveConventions(
        script="dreambooth/train_dreambooth_lora_hidream.py", prediction_sign=-1.0, shift=3.0
    )

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        return type(getattr(pipeline, "transformer", None)).__name__ == "HiDreamImageTransformer2DModel"

    def training_scheduler(self, scheduler):
        from diffusers import FlowMatchEulerDiscreteScheduler

        # the keys of another class's config (UniPC's `flow_shift`, ...) are ignored, as `from_pretrained` does
        accepted = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
        config = {k: v for k, v in scheduler.config.items() if k in accepted}
        return FlowMatchEulerDiscreteScheduler.from_config(config)

    @property
    def patch_size(self) -> int:
        return int(self.denoiser.config.patch_size)

    def default_resolution(self) -> tuple[int, int]:
        # the pipeline generates at the area of `default_sample_size * vae_scale_factor` squared, whatever is asked
        size = int(getattr(self.pipeline, "default_sample_size", 128)) * self.scale_factor
        return (size, size)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        t5, _, llama, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=list(prompts), device=self.device, do_classifier_free_guidance=False, max_sequence_length=128
        )
        # the Llama embeddings are (layers, B, S, D); the batch goes first here and back in `forward`
        return {
            "encoder_hidden_states_t5": t5.to(self.dtype),
            "encoder_hidden_states_llama3": llama.transpose(0, 1).to(self.dtype),
            "pooled_embeds": pooled.to(self.dtype),
        }

    def forward(self, call, noisy, timesteps, cond):
        return call(
            hidden_states=noisy,
            timesteps=timesteps,
            encoder_hidden_states_t5=cond["encoder_hidden_states_t5"],
            encoder_hidden_states_llama3=cond["encoder_hidden_states_llama3"].transpose(0, 1),
            pooled_embeds=cond["pooled_embeds"],
            return_dict=False,
        )[0]
