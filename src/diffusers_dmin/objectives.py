"""Training objectives: which timesteps, which noise, which target, and one adapter per denoiser family.

The gradient DMin takes is the gradient of the model's own training loss, so everything here mirrors the diffusers
training scripts (DESIGN §3):

| scheduler family                               | noisy input                      | target                        |
|------------------------------------------------|----------------------------------|-------------------------------|
| DDPM/DDIM/PNDM/Euler..., `epsilon`             | `scheduler.add_noise(x0, e, t)`  | `e`                           |
| same, `v_prediction`                           | `scheduler.add_noise(x0, e, t)`  | `scheduler.get_velocity(...)` |
| same, `sample`                                 | `scheduler.add_noise(x0, e, t)`  | `x0`                          |
| `FlowMatchEulerDiscreteScheduler` (SD3, Flux)  | `(1 - s) x0 + s e`               | `e - x0`                      |

An adapter knows, for one denoiser family, how to turn images into the denoiser's clean input `x0` (identity for
pixel-space UNets, the VAE's deterministic `mode()` for latent models), how to encode prompts (no classifier-free
guidance), and how to call the denoiser. Adding a family means adding one adapter class to `ADAPTERS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import torch

from .config import DMinConfig
from .errors import ConfigError, UnsupportedPipelineError
from .logging import get_logger


logger = get_logger(__name__)

__all__ = [
    "select_timesteps",
    "fixed_noise",
    "Objective",
    "DenoiserAdapter",
    "UNet2DAdapter",
    "UNet2DConditionAdapter",
    "SDXLAdapter",
    "SD3Adapter",
    "ADAPTERS",
    "adapter_for_pipeline",
    "SUPPORTED_PIPELINES",
    "images_to_tensor",
    "prepare_images",
]

SUPPORTED_PIPELINES = (
    "DDPMPipeline / DDIMPipeline (UNet2DModel)",
    "StableDiffusionPipeline 1.x/2.x (UNet2DConditionModel)",
    "StableDiffusionXLPipeline (UNet2DConditionModel with text_time embeddings)",
    "StableDiffusion3Pipeline (SD3Transformer2DModel)",
)


# ---------------------------------------------------------------------------------------------- timesteps and noise


def select_timesteps(config: DMinConfig, num_train_timesteps: int) -> tuple[int, ...]:
    r"""
    The training timesteps (integers in `[0, N)`, larger is noisier) at which gradients are taken, noisiest first.

    `"cubic"` reproduces the official DMin code: `t_k = N - 1 - floor(N (k / T)^3)`, `k = 0..T-1` (for T = 10 and
    N = 1000: 999, 998, 991, 972, 935, 874, 783, 656, 487, 270). `"uniform"` takes the centres of T equal bins.
    Duplicates (cubic spacing with T >= 20) are removed with a warning; explicit lists must lie in `[0, N)`.
    """
    n, num = num_train_timesteps, config.num_timesteps
    spacing = config.timestep_spacing
    if isinstance(spacing, tuple):
        outside = [t for t in spacing if t >= n]
        if outside:
            raise ConfigError(
                f"`timestep_spacing` lists {outside}, outside this scheduler's training range [0, {n}); "
                f"use timesteps below {n}."
            )
        return tuple(sorted(spacing, reverse=True))
    if spacing == "cubic":
        raw = [n - 1 - (n * k**3) // num**3 for k in range(num)]  # exact integers, no float rounding
    else:  # uniform
        raw = [((2 * k + 1) * n) // (2 * num) for k in range(num)]
        raw = sorted(raw, reverse=True)
    timesteps = tuple(dict.fromkeys(raw))
    if len(timesteps) < len(raw):
        logger.warning(
            f"The {spacing} spacing of {num} timesteps over {n} training steps repeats some timesteps; using the "
            f"{len(timesteps)} distinct ones. Use fewer timesteps or `timestep_spacing='uniform'` to avoid this."
        )
    return timesteps


def fixed_noise(seed: int, shape: Sequence[int], num_draws: int = 1) -> torch.Tensor:
    """The index's fixed noise: `(num_draws, *shape)` float32 standard normal, drawn on the CPU from `seed`.

    Always drawn on the CPU with its own generator, so it is identical on every device and does not touch the
    global RNG; move it with `.to(device)` afterwards.
    """
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randn((num_draws, *shape), generator=generator, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------- objectives


class Objective:
    r"""
    The noisy input and regression target of a scheduler's training objective at given training timesteps.

    Args:
        scheduler: The pipeline's scheduler. The objective is built from its config alone, so inference-time
            `set_timesteps` calls on it do not matter. A DDPM-family scheduler (DDPM, DDIM, PNDM, Euler, DPM-Solver,
            UniPC, ...) is read as the `DDPMScheduler` with the same betas and `prediction_type`: that is how the
            diffusers training scripts noise images whatever scheduler samples later, and the index must not change
            when a user swaps the sampler (Euler-style `add_noise` works in sigma space, DPM-Solver-style reverses
            the timestep order).
        target (`str`, *optional*): A [`DMinConfig`] `target` override.
    """

    def __init__(self, scheduler: Any, target: str | None = None):
        from diffusers import DDPMScheduler

        self.flow_matching = "FlowMatch" in type(scheduler).__name__
        if self.flow_matching:
            self.scheduler = scheduler.__class__.from_config(scheduler.config)
            default = "flow"
        elif hasattr(scheduler, "add_noise") and hasattr(scheduler, "alphas_cumprod"):
            self.scheduler = DDPMScheduler.from_config(scheduler.config)
            default = self.scheduler.config.get("prediction_type", "epsilon")
            if default not in ("epsilon", "v_prediction", "sample"):
                raise UnsupportedPipelineError(
                    f"The scheduler {type(scheduler).__name__} predicts {default!r}; DMin supports 'epsilon', "
                    "'v_prediction' and 'sample'."
                )
        else:
            raise UnsupportedPipelineError(
                f"The scheduler {type(scheduler).__name__} has neither `add_noise`/`alphas_cumprod` (DDPM family) nor "
                "flow-matching sigmas. Supported: DDPM/DDIM/PNDM/Euler-style schedulers and "
                "FlowMatchEulerDiscreteScheduler."
            )
        if target == "v_prediction" and self.flow_matching:
            raise ConfigError(
                "`target='v_prediction'` needs a DDPM-family scheduler, but this pipeline uses flow matching; use "
                "`target=None` (flow: noise - x0) or `target='noise'`."
            )
        if target == "flow" and not self.flow_matching:
            raise ConfigError(
                f"`target='flow'` needs a flow-matching scheduler, but this pipeline uses {type(scheduler).__name__}; "
                "use `target=None` (the scheduler's prediction_type), 'noise', 'v_prediction' or 'sample'."
            )
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        # resolved name: "epsilon" (the noise), "v_prediction", "sample" or "flow" (noise - x0)
        self.target_name = default if target is None else {"noise": "epsilon"}.get(target, target)

    def _sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        index = self.num_train_timesteps - 1 - timesteps.cpu().long()
        return self.scheduler.sigmas[index].to(torch.float32)

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The timestep values the denoiser is called with (the integer t, or `sigma * N` for flow matching)."""
        if self.flow_matching:
            index = self.num_train_timesteps - 1 - timesteps.cpu().long()
            return self.scheduler.timesteps[index].to(torch.float32)
        return timesteps.long()

    def noisy_and_target(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy inputs and targets for a batch: `x0`, `noise` of shape `(P, C, H, W)`, `timesteps` of shape `(P,)`."""
        x0, noise = x0.float(), noise.float()
        if self.flow_matching:
            sigma = self._sigmas(timesteps).to(x0.device).view(-1, *([1] * (x0.dim() - 1)))
            noisy = (1.0 - sigma) * x0 + sigma * noise
        else:
            noisy = self.scheduler.add_noise(x0, noise, timesteps.to(x0.device))
        name = self.target_name
        if name == "epsilon":
            target = noise
        elif name == "sample":
            target = x0
        elif name == "flow":
            target = noise - x0
        else:  # v_prediction
            target = self.scheduler.get_velocity(x0, noise, timesteps.to(x0.device))
        return noisy, target

    @staticmethod
    def loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-sample mean squared error in float32; a learned-variance output (2C channels) uses its first C."""
        if prediction.shape[1] == 2 * target.shape[1]:
            prediction = prediction[:, : target.shape[1]]
        return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


# ---------------------------------------------------------------------------------------------- adapters


class DenoiserAdapter:
    r"""
    How to feed one denoiser family. Subclasses set `family`, `denoiser_attribute` and implement `matches`,
    `encode_prompts` and `forward`; latent models also override `encode_images`.

    Attributes:
        denoiser (`torch.nn.Module`): The network whose parameters the gradient covers.
        scheduler: The pipeline's scheduler (its config defines the objective).
        resolution (`tuple[int, int]`): Image `(height, width)` gradients are taken at.
        latent_shape (`tuple[int, int, int]`): Shape of one clean denoiser input `x0`.
    """

    family: ClassVar[str]
    denoiser_attribute: ClassVar[str] = "unet"
    conditional: ClassVar[bool] = True

    def __init__(self, pipeline: Any, resolution: tuple[int, int] | None = None):
        self.pipeline = pipeline
        self.denoiser: torch.nn.Module = getattr(pipeline, self.denoiser_attribute)
        self.scheduler = pipeline.scheduler
        self.vae = getattr(pipeline, "vae", None)
        self.scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 1
        self.resolution = tuple(resolution) if resolution is not None else self.default_resolution()
        height, width = self.resolution
        if height % self.scale_factor or width % self.scale_factor:
            raise ConfigError(
                f"`resolution={self.resolution}` must be divisible by the VAE scale factor {self.scale_factor}."
            )
        self.latent_shape = (self.in_channels, height // self.scale_factor, width // self.scale_factor)

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        raise NotImplementedError

    @property
    def in_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def default_resolution(self) -> tuple[int, int]:
        size = self.denoiser.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (size[0] * self.scale_factor, size[1] * self.scale_factor)

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

    # ---- prompts and the network call

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Conditioning tensors, each with a leading batch dimension of `len(prompts)`."""
        raise NotImplementedError

    def forward(
        self, call: Callable[..., Any], noisy: torch.Tensor, timesteps: torch.Tensor, cond: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """The denoiser's prediction; `call` is the denoiser or a functional wrapper of it."""
        raise NotImplementedError


class UNet2DAdapter(DenoiserAdapter):
    """Unconditional pixel-space UNets: `DDPMPipeline`, `DDIMPipeline` (`UNet2DModel`)."""

    family = "unet2d"
    conditional = False

    @classmethod
    def matches(cls, pipeline: Any) -> bool:
        return type(getattr(pipeline, "unet", None)).__name__ == "UNet2DModel"

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {}

    def forward(self, call, noisy, timesteps, cond):
        return call(noisy, timesteps, return_dict=False)[0]


class _LatentAdapter(DenoiserAdapter):
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


class UNet2DConditionAdapter(_LatentAdapter):
    """Stable Diffusion 1.x/2.x (`UNet2DConditionModel` with cross-attention on CLIP text embeddings)."""

    family = "unet2d_condition"

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


class SDXLAdapter(_LatentAdapter):
    """Stable Diffusion XL: two text encoders, pooled `text_embeds` and `time_ids` as added conditions."""

    family = "sdxl"

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


class SD3Adapter(_LatentAdapter):
    """Stable Diffusion 3/3.5 (`SD3Transformer2DModel`, flow matching, pooled projections)."""

    family = "sd3"
    denoiser_attribute = "transformer"

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


ADAPTERS: tuple[type[DenoiserAdapter], ...] = (UNet2DAdapter, SDXLAdapter, UNet2DConditionAdapter, SD3Adapter)


def adapter_for_pipeline(pipeline: Any, resolution: tuple[int, int] | None = None) -> DenoiserAdapter:
    """The adapter of the pipeline's denoiser family, or [`UnsupportedPipelineError`] naming the supported ones."""
    for adapter_cls in ADAPTERS:
        if adapter_cls.matches(pipeline):
            return adapter_cls(pipeline, resolution)
    denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    found = type(pipeline).__name__ + (f" with a {type(denoiser).__name__}" if denoiser is not None else "")
    raise UnsupportedPipelineError(
        f"diffusers_dmin does not support {found} yet. Supported pipelines: " + "; ".join(SUPPORTED_PIPELINES) + "."
    )


# ---------------------------------------------------------------------------------------------- image helpers


def images_to_tensor(images: Any, channels: int) -> torch.Tensor:
    """PIL images, a `(B, H, W, C)`/`(H, W, C)` array or a `(B, C, H, W)`/`(C, H, W)` tensor in `[0, 1]` ->
    a float32 `(B, channels, H, W)` tensor in `[0, 1]` (grayscale <-> RGB converted as needed)."""
    if isinstance(images, PIL.Image.Image):
        images = [images]
    if isinstance(images, (list, tuple)) and images and isinstance(images[0], PIL.Image.Image):
        mode = "L" if channels == 1 else "RGB"
        sizes = {im.size for im in images}
        if len(sizes) > 1:
            raise ConfigError(f"`images` have different sizes {sorted(sizes)}; resize them to one size first.")
        array = np.stack([np.asarray(im.convert(mode), dtype=np.float32) / 255.0 for im in images])
        tensor = torch.from_numpy(array.reshape(len(images), *array.shape[1:3], -1)).permute(0, 3, 1, 2)
    elif isinstance(images, (list, tuple)) and images and isinstance(images[0], (np.ndarray, torch.Tensor)):
        return torch.cat([images_to_tensor(im, channels) for im in images])
    elif isinstance(images, np.ndarray):
        array = images.astype(np.float32)
        if array.ndim == 2:
            array = array[None, ..., None]
        elif array.ndim == 3:
            array = array[None] if array.shape[-1] in (1, 3, 4) else array[..., None]
        if array.ndim != 4:
            raise ConfigError(f"A numpy `images` array must be (B, H, W, C), but has shape {images.shape}.")
        tensor = torch.from_numpy(array).permute(0, 3, 1, 2)
    elif isinstance(images, torch.Tensor):
        tensor = images.detach().float().cpu()
        if tensor.dim() == 3:
            tensor = tensor[None]
        if tensor.dim() != 4:
            raise ConfigError(f"A tensor `images` must be (B, C, H, W), but has shape {tuple(images.shape)}.")
    else:
        raise ConfigError(
            f"`images` must be PIL images, a numpy array (B, H, W, C) or a tensor (B, C, H, W) in [0, 1], but is "
            f"{type(images).__name__}."
        )
    if tensor.numel() and (tensor.min() < -1e-3 or tensor.max() > 1 + 1e-3):
        raise ConfigError(
            f"`images` must hold values in [0, 1] (as pipelines return with output_type='np'/'pt'), but range over "
            f"[{tensor.min():.3g}, {tensor.max():.3g}]. Divide uint8 images by 255."
        )
    have = tensor.shape[1]
    if have == 4:  # RGBA -> RGB
        tensor, have = tensor[:, :3], 3
    if have == channels:
        return tensor.contiguous()
    if have == 3 and channels == 1:
        weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (tensor * weights).sum(1, keepdim=True)
    if have == 1 and channels == 3:
        return tensor.repeat(1, 3, 1, 1)
    raise ConfigError(f"`images` have {have} channels but the model takes {channels}.")


def prepare_images(images: Any, resolution: tuple[int, int] | int, channels: int = 3) -> torch.Tensor:
    """Resize (shorter side) and center-crop images to `resolution`, as the diffusers training scripts do.

    Returns a float32 `(B, channels, H, W)` tensor in `[0, 1]`.
    """
    height, width = (resolution, resolution) if isinstance(resolution, int) else resolution
    pixels = images_to_tensor(images, channels)
    h, w = pixels.shape[-2:]
    if (h, w) == (height, width):
        return pixels
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    pixels = torch.nn.functional.interpolate(
        pixels, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
    )
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return pixels[:, :, top : top + height, left : left + width].clamp(0, 1).contiguous()
