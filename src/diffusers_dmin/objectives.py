"""Training objectives: which timesteps, which noise, which noisy input, target and loss weight.

The gradient DMin takes is the gradient of the model's own training loss, so everything here mirrors the diffusers
training scripts (DESIGN §3):

| scheduler family                                  | noisy input                      | target                        |
|---------------------------------------------------|----------------------------------|-------------------------------|
| DDPM/DDIM/PNDM/Euler..., `epsilon`                | `scheduler.add_noise(x0, e, t)`  | `e`                           |
| same, `v_prediction`                              | `scheduler.add_noise(x0, e, t)`  | `scheduler.get_velocity(...)` |
| same, `sample`                                    | `scheduler.add_noise(x0, e, t)`  | `x0`                          |
| `FlowMatchEulerDiscreteScheduler` (SD3, Flux, ...) | `(1 - s) x0 + s e`              | `e - x0`                      |
| same, reversed (Lumina 2)                         | `(1 - s) e + s x0`               | `x0 - e`                      |

What differs between the flow-matching families (the sign of the prediction, how the timestep is scaled for the
denoiser, the guidance value of guidance-distilled models, the scheduler shift, the loss weighting) is declared once
per family as [`ObjectiveConventions`] (see `diffusers_dmin.families`), recorded in the index manifest and
overridable through [`DMinConfig`].
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch

from .config import WEIGHTING_SCHEMES, DMinConfig
from .errors import ConfigError, UnsupportedPipelineError
from .logging import get_logger


logger = get_logger(__name__)

__all__ = [
    "select_timesteps",
    "fixed_noise",
    "ObjectiveConventions",
    "Objective",
    "images_to_tensor",
    "prepare_images",
]

INTERPOLATIONS = ("noise_at_one", "data_at_one")


@dataclass(frozen=True)
class ObjectiveConventions:
    r"""
    One model family's training-script conventions, declared once per family and recorded in the index manifest.

    Only the flow-matching fields matter for flow-matching schedulers; DDPM-family objectives are defined by the
    scheduler's config (betas, `prediction_type`) alone.

    Args:
        script (`str`, *optional*): The diffusers example script whose loss this mirrors (documentation).
        interpolation (`str`, *optional*, defaults to `"noise_at_one"`):
            `"noise_at_one"`: `x_t = (1 - s) x0 + s e`, target `e - x0` (SD3, Flux, Qwen-Image, Sana, ...);
            `"data_at_one"`: `x_t = (1 - s) e + s x0`, target `x0 - e` (Lumina 2).
        prediction_sign (`float`, *optional*, defaults to 1.0):
            Factor on the denoiser's output before the loss (HiDream's script negates it: -1.0).
        timestep_scale (`float`, *optional*, defaults to 1.0):
            The denoiser is called with `scheduler.timesteps[i] * timestep_scale` (that is `s * 1000 * scale`); Flux's
            scripts pass `timesteps / 1000` (0.001).
        guidance (`float`, *optional*):
            The guidance value given to a guidance-distilled denoiser during training (the script's
            `--guidance_scale` default, 3.5 for Flux); ignored for denoisers without a guidance embedding.
        shift (`float`, *optional*):
            Static shift of the training sigmas, `s' = shift s / (1 + (shift - 1) s)`. `None` uses the sigmas of the
            scheduler's config as the scripts load it (its static `shift` unless `use_dynamic_shifting` is on).
        weighting (`str`, *optional*, defaults to `"none"`):
            The script's `--weighting_scheme`: `"none"`, `"logit_normal"` and `"mode"` (which only change how the script
            samples timesteps: loss weight 1), `"sigma_sqrt"` (weight `s^-2`) or `"cosmap"` (weight
            `2 / (pi (1 - 2 s + 2 s^2))`). A weight is a positive scalar per timestep, so it cancels under
            `normalize="timestep"` or `"layer"` and changes sketches only with `normalize="none"`.
        precondition_outputs (`bool`, *optional*, defaults to `False`):
            The script's `--precondition_outputs` (on by default in `train_dreambooth_lora_sd3.py`): the output `v` is
            turned into an x0-prediction `x_t - s v` ("EDM preconditioning") and regressed onto `x0`. As
            `x_t - s v - x0 = s (e - x0 - v)`, that loss is the flow loss times `s^2`, and it is applied as that
            per-timestep weight (exact, without the cancellation `x_t - x0` suffers in half precision). Only for the
            flow target of `"noise_at_one"`; like every weight it changes sketches only with `normalize="none"`.
    """

    script: str | None = None
    interpolation: Literal["noise_at_one", "data_at_one"] = "noise_at_one"
    prediction_sign: float = 1.0
    timestep_scale: float = 1.0
    guidance: float | None = None
    shift: float | None = None
    weighting: Literal["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"] = "none"
    precondition_outputs: bool = False

    def __post_init__(self):
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"`interpolation` must be one of {INTERPOLATIONS}, but is {self.interpolation!r}.")
        if self.weighting not in WEIGHTING_SCHEMES:
            raise ConfigError(f"`weighting` must be one of {WEIGHTING_SCHEMES}, but is {self.weighting!r}.")
        if self.prediction_sign not in (1.0, -1.0):
            raise ConfigError(f"`prediction_sign` must be 1.0 or -1.0, but is {self.prediction_sign!r}.")
        if not self.timestep_scale > 0:
            raise ConfigError(f"`timestep_scale` must be positive, but is {self.timestep_scale!r}.")
        if self.shift is not None and not self.shift > 0:
            raise ConfigError(f"`shift` must be positive, but is {self.shift!r}.")
        if not isinstance(self.precondition_outputs, bool):
            raise ConfigError(f"`precondition_outputs` must be True or False, but is {self.precondition_outputs!r}.")
        if self.precondition_outputs and self.interpolation != "noise_at_one":
            raise ConfigError(
                "`precondition_outputs=True` is defined for `interpolation='noise_at_one'` (x_t = (1 - s) x0 + s e) only."
            )

    def to_dict(self) -> dict[str, Any]:
        """What the manifest records (`script` is documentation and left out of comparisons by the caller);
        `precondition_outputs` only when on, so that the records of the families without it stay as before."""
        data = asdict(self)
        if not data["precondition_outputs"]:
            del data["precondition_outputs"]
        return data

    def identity(self) -> dict[str, Any]:
        """The fields that change the gradient (all but `script`)."""
        data = self.to_dict()
        data.pop("script")
        return data


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
        conventions (`ObjectiveConventions`, *optional*): The model family's training-script conventions (already
            resolved with the config's overrides); defaults to plain flow matching / the DDPM objective.
    """

    def __init__(self, scheduler: Any, target: str | None = None, conventions: ObjectiveConventions | None = None):
        from diffusers import DDPMScheduler

        self.conventions = conventions if conventions is not None else ObjectiveConventions()
        self.flow_matching = "FlowMatch" in type(scheduler).__name__
        if self.flow_matching:
            shift = self.conventions.shift
            overrides = {} if shift is None else {"shift": shift, "use_dynamic_shifting": False}
            self.scheduler = scheduler.__class__.from_config(scheduler.config, **overrides)
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

    def _schedule_index(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Index into the flow-matching scheduler's `sigmas`/`timesteps` of DMin's training timesteps t (larger is
        noisier): `N - 1 - t`, so that t = N - 1 is sigma = 1, pure noise. Under the reversed interpolation (Lumina 2,
        where sigma = 1 is the clean image) the index is t itself, so that larger t is noisier there too."""
        timesteps = timesteps.cpu().long()
        if self.conventions.interpolation == "data_at_one":
            return timesteps
        return self.num_train_timesteps - 1 - timesteps

    def _sigmas(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.sigmas[self._schedule_index(timesteps)].to(torch.float32)

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The timestep values the denoiser is called with: the integer t, or for flow matching
        `scheduler.timesteps` (`sigma * N`) times the family's `timestep_scale`."""
        if self.flow_matching:
            values = self.scheduler.timesteps[self._schedule_index(timesteps)].to(torch.float32)
            scale = self.conventions.timestep_scale
            return values * scale if scale != 1.0 else values
        return timesteps.long()

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-pair loss weights `(P,)`: the family's weighting scheme (`compute_loss_weighting_for_sd3`), times `s^2`
        for preconditioned outputs (`--precondition_outputs`, see [`ObjectiveConventions`])."""
        weights = torch.ones(timesteps.shape[0], dtype=torch.float32)
        if not self.flow_matching:
            return weights
        sigma = self._sigmas(timesteps)
        weighting = self.conventions.weighting
        if weighting == "sigma_sqrt":
            weights = sigma.pow(-2.0)
        elif weighting == "cosmap":
            weights = 2.0 / (math.pi * (1.0 - 2.0 * sigma + 2.0 * sigma**2))
        if self.conventions.precondition_outputs and self.target_name == "flow":
            weights = weights * sigma.pow(2.0)
        return weights

    def noisy_and_target(
        self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Noisy inputs and targets for a batch: `x0`, `noise` of shape `(P, C, ...)`, `timesteps` of shape `(P,)`."""
        x0, noise = x0.float(), noise.float()
        if self.flow_matching:
            sigma = self._sigmas(timesteps).to(x0.device).view(-1, *([1] * (x0.dim() - 1)))
            if self.conventions.interpolation == "data_at_one":  # Lumina 2: the reversed interpolation
                noisy = (1.0 - sigma) * noise + sigma * x0
            else:
                noisy = (1.0 - sigma) * x0 + sigma * noise
        else:
            noisy = self.scheduler.add_noise(x0, noise, timesteps.to(x0.device))
        name = self.target_name
        if name == "epsilon":
            target = noise
        elif name == "sample":
            target = x0
        elif name == "flow":
            target = x0 - noise if self.conventions.interpolation == "data_at_one" else noise - x0
        else:  # v_prediction
            target = self.scheduler.get_velocity(x0, noise, timesteps.to(x0.device))
        return noisy, target

    def loss(self, prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample (weighted) mean squared error in float32, the prediction times the family's sign; a
        learned-variance output (2C channels) uses its first C."""
        if prediction.shape[1] == 2 * target.shape[1]:
            prediction = prediction[:, : target.shape[1]]
        prediction = prediction.float()
        if self.conventions.prediction_sign != 1.0:
            prediction = prediction * self.conventions.prediction_sign
        loss = (prediction - target.float()).pow(2).flatten(1).mean(1)
        return loss if weight is None else loss * weight

    def output_norm(
        self, prediction: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """D-TRAK's output function: per-sample mean square of the denoiser's output `||eps_theta(x_t, t)||^2 / n`
        in float32 (a learned-variance output uses its first C channels). The target and the loss weight are not used:
        the function measures the model's output, not its error (`DMinConfig(output_function="output_norm")`)."""
        if prediction.shape[1] == 2 * target.shape[1]:
            prediction = prediction[:, : target.shape[1]]
        return prediction.float().pow(2).flatten(1).mean(1)

    def attribution_function(self, name: str):
        """The function whose gradient a sketch holds: [`loss`] for `"loss"`, [`output_norm`] for `"output_norm"`."""
        if name == "loss":
            return self.loss
        if name == "output_norm":
            return self.output_norm
        raise ConfigError(f"`output_function` must be 'loss' or 'output_norm', but is {name!r}.")


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
