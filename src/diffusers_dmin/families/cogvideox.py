"""CogVideoX 1.0 (`CogVideoXTransformer3DModel`: text-to-video, 5-D latents, v-prediction on an SNR-shifted schedule).

Training script mirrored: `examples/cogvideo/train_cogvideox_lora.py`: videos `(B, C, F, H, W)` in `[-1, 1]` through
the VAE, latents `z * scaling_factor` (no shift), permuted to the transformer's `(B, F, C, h, w)`; a
`CogVideoXDPMScheduler` loaded from the checkpoint's scheduler config (whatever scheduler samples): its
`alphas_cumprod` are SNR-shifted (`snr_shift_scale`) and rescaled to zero terminal SNR; `x_t = add_noise(x0, e, t)`,
the transformer called with the integer `t`, the T5 prompt embeddings (`max_text_seq_length` tokens) and 3-D rotary
embeddings over a 480x720 base grid; the loss `mean(w (get_velocity(out, x_t, t) - x0)^2)` with
`w = 1 / (1 - alphas_cumprod[t])`.

That loss equals the plain v-prediction loss `mean((out - v)^2)`, `v = sqrt(a) e - sqrt(1 - a) x0`: the script's
`get_velocity(out, x_t, t) = sqrt(a) x_t - sqrt(1 - a) out` is the x0 the output implies, whose error is
`sqrt(1 - a) (v - out)`, and `w` cancels its square. So the objective here is DDPM `v_prediction` with weight 1 over
the script scheduler's `alphas_cumprod` (handed to the objective as a `DDPMScheduler` with the equivalent betas).

Videos enter [`GradientSketcher`] as `images=` of shape `(B, F, C, H, W)` in `[0, 1]` (tensors, as the pipeline's
`output_type="pt"` returns them), `(B, F, H, W, C)` arrays (`output_type="np"`) or lists of PIL frames, with
`F = transformer.config.sample_frames` frames (the pipeline's default `num_frames`; 49 for CogVideoX-2b/5b, the
script's `--max_num_frames` default); or as `latents=` of shape `(B, C, F', h, w)` in the VAE layout. In a dataset
(`GradientIndex.build`, `dmin build --image-column video`) each row holds one video; see [`~video.decode_video`].
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import torch

from ..errors import ConfigError
from ..objectives import ObjectiveConventions, images_to_tensor
from .base import LatentAdapter


__all__ = ["CogVideoXAdapter"]


class CogVideoXAdapter(LatentAdapter):
    """CogVideoX 1.0 (`CogVideoXPipeline`, 2b/5b): v-prediction over 5-D video latents."""

    family = "cogvideox"
    denoiser_attribute = "transformer"
    conventions = ObjectiveConventions(script="cogvideo/train_cogvideox_lora.py")

    def __init__(self, pipeline: Any, resolution: tuple[int, int] | None = None, config=None):
        super().__init__(pipeline, resolution, config)
        self.num_frames = int(self.denoiser.config.sample_frames)
        temporal = int(self.vae.config.temporal_compression_ratio)
        channels, height, width = self.latent_shape
        self.latent_shape = (channels, (self.num_frames - 1) // temporal + 1, height, width)
        self._rotary: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        transformer = getattr(pipeline, "transformer", None)
        return (
            type(transformer).__name__ == "CogVideoXTransformer3DModel"
            and transformer.config.get("patch_size_t") is None  # CogVideoX 1.5 packs frames; its script differs
            and type(pipeline).__name__ == "CogVideoXPipeline"
        )

    def training_scheduler(self, scheduler):
        from diffusers import CogVideoXDPMScheduler, DDPMScheduler

        script = CogVideoXDPMScheduler.from_config(scheduler.config)
        alphas_cumprod = script.alphas_cumprod.double()
        betas = 1.0 - alphas_cumprod / torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        return DDPMScheduler(
            num_train_timesteps=script.config.num_train_timesteps,
            trained_betas=betas.tolist(),
            prediction_type=script.config.prediction_type,
        )

    @property
    def patch_size(self) -> int:
        return int(self.denoiser.config.patch_size)

    def default_resolution(self) -> tuple[int, int]:
        config = self.denoiser.config
        return (config.sample_height * self.scale_factor, config.sample_width * self.scale_factor)

    # ---- videos

    def preprocess(self, images: Any) -> torch.Tensor:
        """Videos `(B, F, C, H, W)` tensors, `(B, F, H, W, C)` arrays or lists of PIL frames in `[0, 1]` ->
        `(B, C, F, H, W)` in `[-1, 1]`, the VAE's layout."""
        if isinstance(images, np.ndarray) or isinstance(images, torch.Tensor):
            if images.ndim != 5:
                raise ConfigError(
                    f"CogVideoX takes videos: `images` must be a (B, F, C, H, W) tensor or (B, F, H, W, C) array, but "
                    f"has shape {tuple(images.shape)}."
                )
            videos = list(images)
        elif isinstance(images, (list, tuple)) and images and isinstance(images[0], (list, tuple)):
            videos = list(images)
        else:
            raise ConfigError(
                "CogVideoX takes videos: pass `images` as a (B, F, C, H, W) tensor, a (B, F, H, W, C) array or a "
                f"list of lists of PIL frames, not {type(images).__name__}."
            )
        frames = []
        for video in videos:
            video = (
                list(video) if isinstance(video, (list, tuple)) and isinstance(video[0], PIL.Image.Image) else video
            )
            frames.append(images_to_tensor(video, self.image_channels))
        if any(f.shape[0] != self.num_frames for f in frames):
            raise ConfigError(
                f"Videos have {sorted({f.shape[0] for f in frames})} frames, but this CogVideoX pipeline takes "
                f"{self.num_frames} (`transformer.config.sample_frames`); trim or sample them to that length."
            )
        pixels = torch.stack(frames).permute(0, 2, 1, 3, 4)
        if tuple(pixels.shape[-2:]) != tuple(self.resolution):
            raise ConfigError(
                f"Video frames have size {tuple(pixels.shape[-2:])} but the gradients are taken at resolution "
                f"{self.resolution}; resize them first or set `DMinConfig(resolution=...)`."
            )
        return pixels * 2.0 - 1.0

    def latents_from_pipeline(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.permute(0, 2, 1, 3, 4)  # the pipeline denoises (B, F, C, h, w)

    # ---- prompts and the network call

    @torch.no_grad()
    def encode_prompts(self, prompts):
        embeds, _ = self.pipeline.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            max_sequence_length=int(self.denoiser.config.max_text_seq_length),
            device=self.device,
        )
        return {"encoder_hidden_states": embeds.to(self.dtype)}

    def rotary_embeddings(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The script's `prepare_rotary_positional_embeddings` (3-D RoPE, crop region of a 480x720 base grid)."""
        config = self.denoiser.config
        if not config.use_rotary_positional_embeddings:
            return None
        if self._rotary is None or self._rotary[0].device != self.device:
            from diffusers.models.embeddings import get_3d_rotary_pos_embed
            from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

            step = self.scale_factor * config.patch_size
            grid = (self.resolution[0] // step, self.resolution[1] // step)
            crops = get_resize_crop_region_for_grid(grid, 720 // step, 480 // step)
            self._rotary = get_3d_rotary_pos_embed(
                embed_dim=config.attention_head_dim,
                crops_coords=crops,
                grid_size=grid,
                temporal_size=self.latent_shape[1],
                device=self.device,
            )
        return self._rotary

    def forward(self, call, noisy, timesteps, cond):
        prediction = call(
            hidden_states=noisy.permute(0, 2, 1, 3, 4),
            encoder_hidden_states=cond["encoder_hidden_states"],
            timestep=timesteps,
            image_rotary_emb=self.rotary_embeddings(),
            return_dict=False,
        )[0]
        return prediction.permute(0, 2, 1, 3, 4)
