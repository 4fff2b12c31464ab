"""The base of every model family: how to feed one denoiser with the inputs of its diffusers training script."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch

from ..config import DMinConfig
from ..errors import ConfigError
from ..objectives import ObjectiveConventions, images_to_tensor


__all__ = ["ModelFamily", "LatentAdapter", "DenoiserAdapter"]


class ModelFamily:
    r"""
    A model family of diffusers: how to feed its denoiser with the inputs of its training script. Subclasses set `family`, `denoiser_attribute`
    and `conventions`, and implement `matches`, `encode_prompts` and `forward`; latent models also override
    `encode_images` (see [`LatentAdapter`]).

    Every tensor that crosses this interface is in the VAE latent layout `(B, C, h, w)` (or `(B, C, F, h, w)` for
    video): the index's fixed noise, the clean inputs `x0`, the noisy inputs and the targets. A family whose denoiser
    takes another layout (Flux packs 2x2 patches into tokens) packs inside `forward` and unpacks the prediction, and
    converts the latents its pipeline produces in `latents_from_pipeline`.

    Attributes:
        denoiser (`torch.nn.Module`): The network whose parameters the gradient covers.
        scheduler: The scheduler the training script builds its objective from ([`training_scheduler`]: the
            pipeline's own unless the script builds another one from its config).
        conventions (`ObjectiveConventions`): The family's training-script conventions, with the [`DMinConfig`]
            overrides applied (recorded in the index manifest).
        resolution (`tuple[int, int]`): Image `(height, width)` gradients are taken at.
        latent_shape (`tuple[int, ...]`): Shape of one clean denoiser input `x0`, e.g. `(C, h, w)`.
    """

    family: ClassVar[str]
    denoiser_attribute: ClassVar[str] = "unet"
    conditional: ClassVar[bool] = True
    # video families: pixel frames per sample (their `latent_shape` is `(C, F, h, w)`); None for images
    num_frames: int | None = None
    # False for denoisers whose forward leaves torch.func.vmap (data-dependent Python control flow such as `.tolist()`
    # on a mask, or NumPy calls): `mode="auto"` then goes straight to one backward pass per pair
    supports_vmap: ClassVar[bool] = True
    conventions: ObjectiveConventions = ObjectiveConventions()
    # arguments of the family's pipelines that condition the denoiser beyond the prompt (an IP-adapter image, an image
    # to edit): `InfluencePipeline` refuses them with `return_influence=True`, since the gradient encodes the prompt only
    conditioning_arguments: ClassVar[tuple[str, ...]] = ()

    def __init__(self, pipeline: Any, resolution: tuple[int, int] | None = None, config: DMinConfig | None = None):
        self.pipeline = pipeline
        self.denoiser: torch.nn.Module = getattr(pipeline, self.denoiser_attribute)
        self.scheduler = self.training_scheduler(pipeline.scheduler)
        self.vae = getattr(pipeline, "vae", None)
        self.scale_factor = self.vae_scale_factor()
        if resolution is None and config is not None:
            resolution = config.resolution
        self.resolution = tuple(resolution) if resolution is not None else self.default_resolution()
        height, width = self.resolution
        step = self.scale_factor * self.patch_size
        if height % step or width % step:
            raise ConfigError(
                f"`resolution={self.resolution}` must be divisible by {step} (VAE scale factor {self.scale_factor}"
                + (f" times patch size {self.patch_size}" if self.patch_size > 1 else "")
                + f") for this {self.family} pipeline."
            )
        self.latent_shape = (self.latent_channels, height // self.scale_factor, width // self.scale_factor)
        self.conventions = self.resolve_conventions(config)

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        raise NotImplementedError

    def training_scheduler(self, scheduler: Any) -> Any:
        """The scheduler whose config defines the training objective: the pipeline's own by default. Families whose
        script builds another one from the checkpoint's scheduler config (Sana's script trains with a
        `FlowMatchEulerDiscreteScheduler` while its checkpoints ship a DPM-Solver) return that one here."""
        return scheduler

    # ---- shapes

    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel: `2 ** (len(vae.config.block_out_channels) - 1)`, 1 without a VAE."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1

    @property
    def patch_size(self) -> int:
        """Latent pixels per token side that the layout needs (Flux packs 2x2 patches); 1 for UNets."""
        return 1

    @property
    def in_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def latent_channels(self) -> int:
        """Channels of one latent in the VAE layout (the denoiser's `in_channels` unless it packs patches)."""
        return self.in_channels

    @property
    def device(self) -> torch.device:
        """Where the denoiser runs: its parameters' device, or with accelerate offloading
        (`pipe.enable_model_cpu_offload()`) the hooks' execution device, not where the offloaded weights wait."""
        if hasattr(self.denoiser, "_hf_hook") and hasattr(self.pipeline, "_execution_device"):
            return torch.device(self.pipeline._execution_device)
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def default_resolution(self) -> tuple[int, int]:
        size = self.denoiser.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (size[0] * self.scale_factor, size[1] * self.scale_factor)

    def pipeline_defaults(self) -> dict[str, Any]:
        """Arguments `InfluencePipeline` passes to the wrapped pipeline (unless given) so that it generates at
        `resolution`, besides `height` and `width`."""
        return {}

    # ---- conventions

    @property
    def uses_guidance(self) -> bool:
        """Whether the denoiser takes a guidance embedding (guidance-distilled models such as FLUX.1-dev)."""
        return False

    def resolve_conventions(self, config: DMinConfig | None) -> ObjectiveConventions:
        """The class's conventions with the config's overrides (`weighting_scheme`, `guidance_scale`, `flow_shift`,
        `precondition_outputs`)."""
        conventions = type(self).conventions
        if not self.uses_guidance:
            conventions = replace(conventions, guidance=None)
        if config is None:
            return conventions
        if config.guidance_scale is not None:
            if not self.uses_guidance:
                raise ConfigError(
                    f"`guidance_scale={config.guidance_scale}` is set, but this {self.family} denoiser has no guidance "
                    "embedding (only guidance-distilled models such as FLUX.1-dev take one); leave it unset."
                )
            conventions = replace(conventions, guidance=float(config.guidance_scale))
        flow = "FlowMatch" in type(self.scheduler).__name__
        for name, field, value in (
            ("weighting_scheme", "weighting", config.weighting_scheme),
            ("flow_shift", "shift", config.flow_shift),
        ):
            if value is None:
                continue
            if not flow and not (name == "weighting_scheme" and value == "none"):
                raise ConfigError(
                    f"`{name}={value!r}` only applies to flow-matching models, but this {self.family} pipeline uses "
                    f"{type(self.scheduler).__name__}; leave `{name}` unset."
                )
            conventions = replace(conventions, **{field: float(value) if field == "shift" else value})
        if config.precondition_outputs is not None and config.precondition_outputs != conventions.precondition_outputs:
            if not flow or conventions.interpolation != "noise_at_one":
                raise ConfigError(
                    f"`precondition_outputs={config.precondition_outputs}` only applies to flow-matching models with "
                    f"x_t = (1 - s) x0 + s e, but this {self.family} pipeline uses {type(self.scheduler).__name__}"
                    f"{'' if not flow else ' with the reversed interpolation'}; leave `precondition_outputs` unset."
                )
            conventions = replace(conventions, precondition_outputs=config.precondition_outputs)
        return conventions

    # ---- images

    @property
    def image_channels(self) -> int:
        return int(self.vae.config.in_channels) if self.vae is not None else self.in_channels

    def preprocess(self, images: Any) -> torch.Tensor:
        """PIL images, `(B, H, W, C)` arrays or `(B, C, H, W)` tensors in `[0, 1]` -> `(B, C, H, W)` in `[-1, 1]`.

        Images must already be at `resolution`; [`prepare_images`] resizes and center-crops.
        """
        pixels = images_to_tensor(images, self.image_channels)
        if tuple(pixels.shape[-2:]) != tuple(self.resolution):
            raise ConfigError(
                f"`images` have size {tuple(pixels.shape[-2:])} but the gradients are taken at resolution "
                f"{self.resolution}; resize them first (`diffusers_dmin.objectives.prepare_images(images, "
                f"{self.resolution})`) or set `DMinConfig(resolution=...)`."
            )
        return pixels * 2.0 - 1.0

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """`(B, C, H, W)` pixels in `[-1, 1]` -> clean denoiser inputs `x0` (identity for pixel-space models)."""
        return pixels.to(self.device, self.dtype)

    def encode_condition_images(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """`(B, C, H, W)` condition images in `[-1, 1]` (an image to edit) -> conditioning tensors merged with the
        prompt's; only families whose training script conditions on an image take them."""
        raise ConfigError(
            f"This {self.family} pipeline is not trained with condition images; leave `condition_images` unset."
        )

    def latents_from_pipeline(self, latents: torch.Tensor) -> torch.Tensor:
        """The final latents of the pipeline's denoising loop (as its `callback_on_step_end` sees them) -> `x0` in the
        VAE layout. Identity unless the pipeline denoises in another layout (packed tokens)."""
        return latents

    # ---- prompts and the network call

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Conditioning tensors, each with a leading batch dimension of `len(prompts)`."""
        raise NotImplementedError

    def encode_prompts_with_grad(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """[`encode_prompts`] with autograd on, for gradients with respect to text-encoder parameters
        ([`DMinConfig`] `text_encoder_params`); a `@torch.no_grad()` decorator on a family's `encode_prompts` is
        bypassed (the pipelines' own `encode_prompt` methods carry none)."""
        encode = inspect.unwrap(type(self).encode_prompts)
        with torch.enable_grad():
            return encode(self, prompts)

    def forward(
        self, call: Callable[..., Any], noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The denoiser's prediction in the layout of `noisy`; `call` is the denoiser or a functional wrapper of it.

        `timesteps` are what the training script passes to the denoiser ([`Objective.model_timesteps`]).
        """
        raise NotImplementedError


class LatentAdapter(ModelFamily):
    """A latent-diffusion family: `x0` is the VAE's deterministic `mode()`, shifted and scaled as in training."""

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae = self.vae
        # a half-precision VAE marked `force_upcast` (SDXL's) overflows to NaN; encode in float32 as its pipeline does
        # (nn.Module.to: diffusers' ModelMixin.to would log a warning about direct casts on every batch)
        upcast = vae.dtype == torch.float16 and bool(vae.config.get("force_upcast", False))
        if upcast:
            torch.nn.Module.to(vae, torch.float32)
        try:
            latents = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode()
        finally:
            if upcast:
                torch.nn.Module.to(vae, torch.float16)
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return (latents * vae.config.scaling_factor).to(self.device, self.dtype)


# The former name of `ModelFamily` (it read like a LoRA adapter next to `adapter_id`); kept for code written against
# it, to be removed in a later release.
DenoiserAdapter = ModelFamily
