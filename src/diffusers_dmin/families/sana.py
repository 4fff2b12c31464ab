"""Sana (`SanaPipeline`: `SanaTransformer2DModel`, `AutoencoderDC`, Gemma 2 text encoder).

Training script mirrored: `examples/dreambooth/train_dreambooth_lora_sana.py`:

- latents: the deep-compression VAE's deterministic `vae.encode(pixels).latent` times `scaling_factor` (no shift);
- prompts: `encode_prompt(prompt, max_sequence_length=300, complex_human_instruction=None)` (the script's defaults:
  its `--complex_human_instruction` is unset, unlike the pipeline's `__call__`, which prepends the complex human
  instruction at generation), with the Gemma attention mask passed as `encoder_attention_mask`;
- scheduler: `FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")`. The Sana checkpoints
  ship a `DPMSolverMultistepScheduler` config (`flow_shift=3.0`, `use_flow_sigmas=True`); read as a flow-matching
  Euler config it has no `shift` key, so the script trains with unshifted sigmas `t / 1000`
  ([`SanaAdapter.training_scheduler`] builds the same scheduler). Set `DMinConfig(flow_shift=...)` for a LoRA trained
  with a shifted schedule elsewhere;
- noisy input `(1 - s) x0 + s e`, the transformer called with `timestep = timesteps` (`s * 1000`, without the
  config's `timestep_scale`, which the script does not apply), target `e - x0`, weighting `none` (the default).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ..objectives import ObjectiveConventions
from .base import LatentAdapter


__all__ = ["SanaAdapter"]


class SanaAdapter(LatentAdapter):
    """Sana text-to-image (`SanaPipeline`), flow matching in the latent space of a 32x deep-compression VAE."""

    family = "sana"
    denoiser_attribute = "transformer"
    conventions = ObjectiveConventions(script="dreambooth/train_dreambooth_lora_sana.py")
    #: the script's `--max_sequence_length` default
    max_sequence_length = 300

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        transformer = getattr(pipeline, "transformer", None)
        return type(pipeline).__name__ == "SanaPipeline" and type(transformer).__name__ == "SanaTransformer2DModel"

    def training_scheduler(self, scheduler):
        from diffusers import FlowMatchEulerDiscreteScheduler

        # what `FlowMatchEulerDiscreteScheduler.from_pretrained` keeps of a DPM-Solver config (the rest it ignores,
        # with a warning about the config file that would only alarm users here)
        accepted = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__).parameters
        return FlowMatchEulerDiscreteScheduler.from_config(
            {k: v for k, v in scheduler.config.items() if k in accepted}
        )

    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent
        return (latents * vae.config.scaling_factor).to(self.device, self.dtype)

    @torch.no_grad()
    def encode_prompts(self, prompts):
        embeds, mask, _, _ = self.pipeline.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            device=self.device,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=None,
        )
        return {"encoder_hidden_states": embeds.to(self.dtype), "encoder_attention_mask": mask}

    def forward(self, call, noisy, timesteps, cond):
        return call(
            hidden_states=noisy,
            encoder_hidden_states=cond["encoder_hidden_states"],
            encoder_attention_mask=cond["encoder_attention_mask"],
            timestep=timesteps,
            return_dict=False,
        )[0]
