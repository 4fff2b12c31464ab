"""FLUX.2 (`Flux2Transformer2DModel`): `Flux2Pipeline` (FLUX.2-dev, Mistral-Small-3 text encoder) and
`Flux2KleinPipeline` (FLUX.2-klein, Qwen3 text encoder).

Training scripts mirrored: `examples/dreambooth/train_dreambooth_lora_flux2.py` and
`train_dreambooth_lora_flux2_klein.py`. Per training step they:

1. encode the image with `AutoencoderKLFlux2` (`latent_dist.mode()`), patchify 2x2 (`Flux2Pipeline._patchify_latents`:
   `(B, C, h, w) -> (B, 4C, h/2, w/2)`) and normalise with the VAE's batch-norm running statistics,
   `(z - bn.running_mean) / sqrt(bn.running_var + batch_norm_eps)`;
2. draw `noise = randn_like(model_input)` in that patchified layout, take `sigmas` of the checkpoint's scheduler config
   (FLUX.2 uses dynamic shifting at inference, so the training sigmas are unshifted) and form
   `(1 - s) x0 + s e`;
3. pack the `(B, 4C, h', w')` grid row-major into `h' w'` tokens (`_pack_latents`), with 4-D position ids
   `(t=0, row, col, l=0)` from `_prepare_latent_ids` and text ids `(0, 0, 0, position)` from `_prepare_text_ids`;
4. call the transformer with `timestep = timesteps / 1000` and `guidance = --guidance_scale` (3.5) for every sample;
   the klein script passes it only when `transformer.config.guidance_embeds` (FLUX.2-klein has none);
5. unpack the prediction to `(B, 4C, h', w')` and regress it onto `noise - model_input` with the
   `--weighting_scheme` weights (default `"none"`).

The prompt embedding is the pipeline's `encode_prompt(prompt, max_sequence_length=512,
text_encoder_out_layers=(10, 20, 30))`, the defaults of both scripts. `Flux2KleinPipeline` itself encodes with layers
`(9, 18, 27)` at inference; the klein training script's default `--text_encoder_out_layers 10 20 30` differs
(diffusers issue #13445, open), and the gradient follows the training script.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import ConfigError
from ..objectives import ObjectiveConventions
from .base import LatentAdapter


__all__ = ["Flux2Adapter", "Flux2KleinAdapter"]


class Flux2Adapter(LatentAdapter):
    r"""
    FLUX.2-dev (`Flux2Pipeline`, `Flux2Transformer2DModel` with a guidance embedding, Mistral-Small-3 text encoder).

    Layout: the index's noise, `x0`, the noisy inputs and the targets are in the **patchified, batch-norm-normalised**
    layout `(4C, H / (2 f), W / (2 f))` (`C` VAE latent channels, `f` the VAE's scale factor; `(128, 64, 64)` for a
    1024x1024 FLUX.2 image), not the VAE's raw `(C, H / f, W / f)`. That is the layout in which the training script
    normalises the latents, draws its noise (`torch.randn_like(model_input)` after `_patchify_latents`) and takes its
    loss, and the layout of the pipeline's own denoising loop (its initial noise is drawn as `(B, 4C, h', w')`
    before packing). The normalisation is a per-channel affine map of the patchified channels, so it can only be
    applied there; and a fixed noise drawn in the VAE layout would reach the model as a permutation of the script's
    draw. `latents_from_pipeline` therefore only unpacks the pipeline's `(B, h' w', 4C)` tokens, without
    de-normalising or unpatchifying, and `GradientSketcher(latents=...)` takes latents in this layout.
    """

    family = "flux2"
    denoiser_attribute = "transformer"
    conventions = ObjectiveConventions(
        script="dreambooth/train_dreambooth_lora_flux2.py", timestep_scale=0.001, guidance=3.5
    )
    #: `--max_sequence_length` and `--text_encoder_out_layers` defaults of the training script
    max_sequence_length: int = 512
    text_encoder_out_layers: tuple[int, ...] = (10, 20, 30)
    _prompt_encoder = "_get_mistral_3_small_prompt_embeds"
    # reference images for editing enter the transformer as extra tokens, which the index's gradient does not see
    conditioning_arguments = ("image",)

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        transformer = getattr(pipeline, "transformer", None)
        return type(transformer).__name__ == "Flux2Transformer2DModel" and hasattr(pipeline, cls._prompt_encoder)

    # ---- shapes

    def vae_scale_factor(self) -> int:
        """Pixels per position of the patchified layout: the VAE's factor times 2 (one token per 2x2 latent patch)."""
        return 2 * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def default_resolution(self) -> tuple[int, int]:
        size = int(self.pipeline.default_sample_size) * int(self.pipeline.vae_scale_factor)
        return (size, size)

    @property
    def uses_guidance(self) -> bool:
        return bool(self.denoiser.config.get("guidance_embeds", False))

    # ---- images

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        return self._normalise(vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode())

    def _normalise(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents `(B, C, h, w)` -> patchified and batch-norm normalised `(B, 4C, h/2, w/2)` (the script's)."""
        bn = self.vae.bn
        latents = self.pipeline._patchify_latents(latents).float()
        mean = bn.running_mean.float().view(1, -1, 1, 1).to(latents.device)
        std = torch.sqrt(bn.running_var.float().view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(latents.device)
        return ((latents - mean) / std).to(self.device, self.dtype)

    def latents_from_pipeline(self, latents: torch.Tensor) -> torch.Tensor:
        """The pipeline's packed `(B, h' w', 4C)` tokens (what `callback_on_step_end` sees, and
        `Flux2Pipeline(output_type="latent")` returns) -> `(B, 4C, h', w')`: the inverse of `_pack_latents`, which is
        what `_unpack_latents_with_ids` does with the row-major ids of `_prepare_latent_ids`.

        Also takes the de-normalised VAE latents `(B, C, 2h', 2w')` that `Flux2KleinPipeline(output_type="latent")`
        returns, and patchifies and normalises them again.
        """
        channels, height, width = self.latent_shape
        if latents.dim() == 4 and tuple(latents.shape[1:]) == (channels // 4, 2 * height, 2 * width):
            return self._normalise(latents)
        if latents.dim() != 3 or tuple(latents.shape[1:]) != (height * width, channels):
            raise ConfigError(
                f"The {type(self.pipeline).__name__} produced latents of shape {tuple(latents.shape)}, but this index "
                f"works at resolution {self.resolution}, that is {height * width} packed tokens of {channels} "
                f"channels; generate at `height={self.resolution[0]}, width={self.resolution[1]}`."
            )
        return latents.permute(0, 2, 1).reshape(latents.shape[0], channels, height, width)

    # ---- prompts and the network call

    @torch.no_grad()
    def encode_prompts(self, prompts):
        embeds, _ = self.pipeline.encode_prompt(
            prompt=list(prompts),
            device=self.device,
            num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length,
            text_encoder_out_layers=self.text_encoder_out_layers,
        )
        return {"encoder_hidden_states": embeds.to(self.dtype)}

    def forward(self, call, noisy, timesteps, cond):
        batch, channels, height, width = noisy.shape
        embeds = cond["encoder_hidden_states"]
        # position ids depend on shapes only (unbatched constants under vmap)
        img_ids = self.pipeline._prepare_latent_ids(noisy).to(noisy.device)
        txt_ids = self.pipeline._prepare_text_ids(embeds).to(noisy.device)
        guidance = self.conventions.guidance
        if guidance is not None:
            guidance = torch.full((batch,), guidance, device=noisy.device, dtype=torch.float32)
        packed = noisy.reshape(batch, channels, height * width).permute(0, 2, 1)  # `_pack_latents`
        pred = call(
            hidden_states=packed,
            timestep=timesteps,
            guidance=guidance,
            encoder_hidden_states=embeds,
            txt_ids=txt_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        pred = pred[:, : height * width]
        # `_unpack_latents_with_ids` with row-major ids, written without its in-place scatter (which vmap refuses)
        return pred.permute(0, 2, 1).reshape(batch, -1, height, width)


class Flux2KleinAdapter(Flux2Adapter):
    """FLUX.2-klein (`Flux2KleinPipeline`, Qwen3 text encoder; guidance only if the transformer embeds it)."""

    family = "flux2_klein"
    conventions = ObjectiveConventions(
        script="dreambooth/train_dreambooth_lora_flux2_klein.py", timestep_scale=0.001, guidance=3.5
    )
    _prompt_encoder = "_get_qwen3_prompt_embeds"
