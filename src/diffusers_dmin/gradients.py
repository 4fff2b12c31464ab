"""`GradientSketcher`: per-sample, per-timestep loss gradients of a diffusers denoiser, normalised and sketched.

For each sample and each of the T timesteps of the config, the gradient of the training loss (see
[`objectives`]) with respect to the selected denoiser parameters is computed, L2-normalised and compressed by the
seeded [`OPORPSketch`] to K numbers; the result is a `(B, T, K)` tensor. The full D-dimensional gradient of one
(sample, timestep) pair is never concatenated: each parameter tensor's gradient is sketched as it comes and its
squared norm accumulated alongside (the sketch is linear, so normalising after sketching is exact).

Two engines compute the per-pair gradients:

- `"vmap"`: `torch.func.vmap(grad(loss))` over a micro-batch of (sample, timestep) pairs: one batched forward and
  backward; fast when the per-pair gradients of the micro-batch fit the memory budget.
- `"loop"`: one forward and `torch.autograd.grad` per pair; for huge parameter sets, gradient checkpointing, or
  modules without vmap support.

`mode="auto"` picks vmap unless the denoiser uses gradient checkpointing, and falls back to the loop (with a
warning) if vmap fails on the model.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import math
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from .config import DMinConfig, SketcherOptions, SketchSpec
from .errors import ConfigError, NonFiniteGradientError
from .families import ModelFamily, adapter_for_pipeline
from .logging import ProgressBarMixin, get_logger
from .objectives import Objective, fixed_noise, images_to_tensor, select_timesteps
from .sketch import OPORPSketch
from .threads import resolve_num_threads, torch_threads


logger = get_logger(__name__)

__all__ = [
    "GradientSketcher",
    "active_adapters",
    "select_parameters",
    "select_text_encoder_parameters",
    "fingerprint_parameters",
    "fingerprint_modules",
]

# normalize="layer": tensors whose gradient norm is below this fraction of the largest one count as zero
_LAYER_NORM_FLOOR = 1e-5
_VMAP_WARNING = r".*(performance drop because we have not yet implemented the batching rule|vmap.*fallback).*"


# ---------------------------------------------------------------------------------------------- parameter selection


def _is_lora(name: str) -> bool:
    return "lora_" in name


def _lora_layers(module: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """The PEFT LoRA layers of a module (`peft.tuners.lora.LoraLayer`: `lora_A` plus a per-adapter `scaling`)."""
    for name, layer in module.named_modules():
        if hasattr(layer, "lora_A") and isinstance(getattr(layer, "scaling", None), dict):
            yield name, layer


def _layer_active_adapters(layer: torch.nn.Module) -> list[str]:
    """The adapters a PEFT LoRA layer applies in its forward pass: none when adapters are disabled
    (`pipe.disable_lora()`) or merged into the base weights (`pipe.fuse_lora()`: the forward pass then skips them)."""
    if getattr(layer, "disable_adapters", False) or getattr(layer, "merged", False):
        return []
    active = getattr(layer, "active_adapters", None)
    if active is None or callable(active):
        return []
    active = [active] if isinstance(active, str) else list(active)
    return [name for name in active if name in layer.scaling]


def _active_lora_names(module: torch.nn.Module) -> set[str]:
    """Names of the LoRA parameters of the adapters that are active in the module's PEFT layers."""
    names: set[str] = set()
    for module_name, layer in _lora_layers(module):
        active = _layer_active_adapters(layer)
        for param_name, _ in layer.named_parameters(recurse=True):
            parts = param_name.split(".")
            if any(p.startswith("lora_") for p in parts) and any(a in parts for a in active):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def active_adapters(module: torch.nn.Module) -> dict[str, float | str]:
    r"""
    The LoRA adapters active in a module and their weights, as `pipe.set_adapters(names, adapter_weights=...)` set
    them: `{adapter_name: weight}`.

    A weight is read back from PEFT's per-layer scaling (`weight * lora_alpha / r`, or `/ sqrt(r)` for rsLoRA). When
    the layers carry different weights (diffusers' block-wise `set_adapters` weights), the value is the string
    `"per-layer:<hash>"` of all layers' weights. Empty when the module carries no active LoRA.
    """
    weights: dict[str, list[tuple[str, float]]] = {}
    for layer_name, layer in _lora_layers(module):
        for adapter in _layer_active_adapters(layer):
            rank = float(layer.r[adapter])
            rslora = getattr(layer, "use_rslora", {}).get(adapter, False)
            base = float(layer.lora_alpha[adapter]) / (math.sqrt(rank) if rslora else rank)
            weights.setdefault(adapter, []).append((layer_name, float(layer.scaling[adapter]) / base))
    summary: dict[str, float | str] = {}
    for adapter, values in sorted(weights.items()):
        distinct = {round(value, 6) for _, value in values}
        if len(distinct) == 1:
            summary[adapter] = distinct.pop()
        else:
            text = ";".join(f"{name}={value:.6g}" for name, value in values)
            summary[adapter] = "per-layer:" + hashlib.sha256(text.encode()).hexdigest()[:12]
    return summary


def select_parameters(
    denoiser: torch.nn.Module, params: str | Sequence[str] = "auto"
) -> list[tuple[str, torch.nn.Parameter]]:
    r"""
    The `(name, parameter)` pairs a gradient covers, in `named_parameters()` order.

    Args:
        denoiser (`torch.nn.Module`): The UNet or transformer.
        params (`str` or `list[str]`, *optional*, defaults to `"auto"`): See [`DMinConfig`] `params`. `"auto"` and
            `"lora"` take the LoRA parameters of the *active* adapters only (those `pipe.set_adapters(...)` activated;
            disabled or fused adapters do not count).
    """
    named = list(denoiser.named_parameters())
    active = _active_lora_names(denoiser)
    if params == "auto":
        params = "lora" if active else "attention"
        if not active and any(_is_lora(n) for n, _ in named):
            logger.warning(
                f"{type(denoiser).__name__} carries LoRA adapters but none is active (disabled with `disable_lora()` or "
                "fused with `fuse_lora()`), so `params='auto'` takes the attention parameters; call `enable_lora()` / "
                "`unfuse_lora()` first to take the LoRA's."
            )
    if params == "lora":
        selected = [(n, p) for n, p in named if n in active]
        if not selected:
            if any(_is_lora(n) for n, _ in named):
                raise ConfigError(
                    "`params='lora'` but no LoRA adapter of the denoiser is active (adapters disabled with "
                    "`pipe.disable_lora()` or fused with `pipe.fuse_lora()` do not count); activate them with "
                    "`pipe.enable_lora()` / `pipe.set_adapters([...])`, or use `params='attention'`."
                )
            raise ConfigError(
                "`params='lora'` but the denoiser carries no LoRA adapter; load one (`pipe.load_lora_weights(...)` or "
                "`denoiser.add_adapter(LoraConfig(...))`) or use `params='attention'`."
            )
        return selected
    if params == "attention":
        base = [(n, p) for n, p in named if not _is_lora(n)]
        # the first suffix that names blocks wins: SD3/Flux/CogVideoX `transformer_blocks`, UNet `attentions`, HiDream
        # `double_stream_blocks` + `single_stream_blocks`, Lumina 2 `layers` (its joint blocks, not the refiners)
        for block in ("transformer_blocks", "attentions", "stream_blocks", "layers"):
            selected = [(n, p) for n, p in base if any(part.endswith(block) for part in n.split("."))]
            if selected:
                return selected
        raise ConfigError(
            f"`params='attention'` found no `transformer_blocks`, `attentions`, `*stream_blocks` or `layers` "
            f"parameters in {type(denoiser).__name__}; use `params='all'` or a list of name patterns."
        )
    if params == "all":
        return named
    patterns = list(params)
    selected = [(n, p) for n, p in named if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
    if not selected:
        examples = ", ".join(n for n, _ in named[:3])
        raise ConfigError(
            f"`params={patterns!r}` matches no parameter of {type(denoiser).__name__}. Patterns are fnmatch "
            f"patterns over full names such as {examples}; e.g. `['*attn1*']`."
        )
    return selected


def text_encoders(pipeline: Any) -> list[tuple[str, torch.nn.Module]]:
    """The pipeline's text encoders as `(component name, module)`: `text_encoder`, `text_encoder_2`, ..."""
    components = getattr(pipeline, "components", None) or {}
    return [
        (name, module)
        for name, module in components.items()
        if name.startswith("text_encoder") and isinstance(module, torch.nn.Module)
    ]


def select_text_encoder_parameters(
    pipeline: Any, text_encoder_params: str | None
) -> list[tuple[str, torch.nn.Parameter]]:
    r"""
    The text-encoder parameters a gradient covers ([`DMinConfig`] `text_encoder_params`), named
    `<component>.<parameter name>` (e.g. `text_encoder_2.text_model...lora_A.default_0.weight`).

    Args:
        pipeline (`DiffusionPipeline`): The pipeline whose `text_encoder*` components are searched.
        text_encoder_params (`str`, *optional*): `None` (none) or `"lora"` (the active adapters' LoRA parameters).
    """
    if text_encoder_params is None:
        return []
    selected = []
    for component, module in text_encoders(pipeline):
        active = _active_lora_names(module)
        selected += [(f"{component}.{name}", param) for name, param in module.named_parameters() if name in active]
    if not selected:
        found = ", ".join(name for name, _ in text_encoders(pipeline)) or "none"
        raise ConfigError(
            f"`text_encoder_params='lora'` but no text encoder of this {type(pipeline).__name__} (text encoders: "
            f"{found}) carries an active LoRA adapter; load a LoRA trained with `--train_text_encoder` "
            "(`pipe.load_lora_weights(...)`) or leave `text_encoder_params` unset."
        )
    return selected


def pipeline_adapters(pipeline: Any, denoiser_attribute: str) -> dict[str, dict[str, float | str]]:
    """`{component: {adapter_name: weight}}` for the denoiser and text encoders that carry active LoRA adapters."""
    modules = [(denoiser_attribute, getattr(pipeline, denoiser_attribute))] + text_encoders(pipeline)
    record = {}
    for component, module in modules:
        weights = active_adapters(module)
        if weights:
            record[component] = weights
    return record


def fingerprint_parameters(named: Sequence[tuple[str, torch.Tensor]]) -> str:
    """16 hex characters identifying the names, shapes, dtypes and values of parameters.

    Values enter through their float64 sum, sum of squares and up to 256 evenly spaced entries per tensor, so the
    fingerprint is cheap for billions of parameters yet changes with any training step or a different adapter.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, param in named:
            flat = param.detach().reshape(-1)
            stride = max(1, flat.numel() // 256)
            sample = flat[::stride][:256].to(torch.float64).cpu()
            stats = torch.stack([flat.to(torch.float64).sum(), flat.to(torch.float64).pow(2).sum()]).cpu()
            digest.update(f"{name}|{tuple(param.shape)}|{param.dtype}|".encode())
            digest.update(sample.numpy().tobytes())
            digest.update(stats.numpy().tobytes())
    return digest.hexdigest()[:16]


def fingerprint_modules(modules: Mapping[str, torch.nn.Module], samples: int = 64) -> str:
    """16 hex characters identifying EVERY parameter of the given modules (names, shapes, dtypes and `samples` evenly
    spaced values per tensor): the whole denoiser, text encoders and VAE, i.e. everything that conditions the
    gradient, not only the sketched parameters. Costs one small gather per tensor (no pass over all values), so it is
    cheap for billions of parameters; a different base model, a merged adapter or any training step changes it.
    Parameters on the `meta` device (sequential offloading) enter by name and shape only.
    """
    digest = hashlib.sha256()
    with torch.no_grad():
        for key in sorted(modules):
            picked = []
            for name, param in modules[key].named_parameters():
                digest.update(f"{key}.{name}|{tuple(param.shape)}|{param.dtype}\n".encode())
                flat = param.detach().reshape(-1)
                if flat.numel() and flat.device.type != "meta":
                    stride = max(1, flat.numel() // samples)
                    picked.append(flat[::stride][:samples].to(torch.float64))
            if picked:
                digest.update(torch.cat([p.cpu() for p in picked]).numpy().tobytes())
    return digest.hexdigest()[:16]


def _conditioning_modules(adapter: ModelFamily) -> dict[str, torch.nn.Module]:
    """The pipeline's modules that shape a gradient: the denoiser (with any adapter), text encoders, VAE."""
    modules = {"denoiser": adapter.denoiser}
    components = getattr(getattr(adapter, "pipeline", None), "components", None) or {}
    for name, module in components.items():
        if isinstance(module, torch.nn.Module) and module is not adapter.denoiser:
            modules[name] = module
    vae = getattr(adapter, "vae", None)
    if isinstance(vae, torch.nn.Module) and all(m is not vae for m in modules.values()):
        modules["vae"] = vae
    return modules


# ---------------------------------------------------------------------------------------------- the sketcher


class GradientSketcher(ProgressBarMixin):
    r"""
    Computes DMin gradient sketches of (image, prompt) pairs for a diffusers pipeline.

    Build it with [`GradientSketcher.from_pipeline`]. Calling it returns a float32 CPU tensor of shape `(B, T, K)`:
    for each sample, the L2-normalised loss gradient (or D-TRAK's output-norm gradient, `output_function`) at each
    of the T timesteps, sketched to K numbers (see [`DMinConfig`] for `noise_draws` and `sketch_normalize`).

    Attributes:
        config (`DMinConfig`): The configuration.
        adapter (`ModelFamily`): How the pipeline's denoiser is fed.
        timesteps (`tuple[int, ...]`): The T training timesteps, noisiest first.
        noise (`torch.Tensor` of shape `(num_noise_draws, C, H, W)`): The fixed noise, drawn on the CPU from the seed.
        param_names (`tuple[str, ...]`): The selected denoiser parameters, then any selected text-encoder parameters
            (prefixed with their component, e.g. `text_encoder.`).
        input_dim (`int`): D, their total number of scalars.
        spec (`SketchSpec`): What an index must share with these sketches.
        sketch (`OPORPSketch`): The compression.
        options (`SketcherOptions`): How it runs (mode, batch and memory limits, threads).
        num_threads (`int`, *optional*): Torch intra-op threads while gradients are computed; `None` (default): the
            `DMIN_NUM_THREADS` environment variable, else 1 on the CPU (many small backward passes: more threads
            collapse on a busy machine, see [`threads`]) and torch's setting on accelerators; `0`: torch's setting.
            The caller's `torch.get_num_threads()` is restored after each call.

    Examples:
    ```py
    >>> from diffusers_dmin import DMinConfig, GradientSketcher
    >>> from diffusers_dmin.testing import tiny_sd_pipeline
    >>> pipe = tiny_sd_pipeline()
    >>> sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=4, sketch_dim=256))
    >>> images = pipe(["a photo of a cat"], num_inference_steps=2, output_type="pt").images
    >>> sketcher(images=images, prompts=["a photo of a cat"]).shape
    torch.Size([1, 4, 256])
    ```
    """

    def __init__(
        self,
        adapter: ModelFamily,
        config: DMinConfig | None = None,
        *,
        options: SketcherOptions | None = None,
        **option_fields: Any,
    ):
        config = config if config is not None else DMinConfig()
        if not isinstance(config, DMinConfig):
            raise ConfigError(f"`config` must be a DMinConfig, but is {type(config).__name__}.")
        # runtime options (speed, memory; never the sketches): one `SketcherOptions`, or its fields as keywords
        options = SketcherOptions.from_value(options, **option_fields)
        self.options = options
        self.config = config
        self.adapter = adapter
        self.objective = Objective(adapter.scheduler, config.target, adapter.conventions)
        self.timesteps = select_timesteps(config, self.objective.num_train_timesteps)
        self.noise = fixed_noise(config.seed, adapter.latent_shape, config.num_noise_draws)
        text_encoder_parameters = select_text_encoder_parameters(adapter.pipeline, config.text_encoder_params)
        self._text_encoder_parameters = text_encoder_parameters
        self.parameters = select_parameters(adapter.denoiser, config.params) + text_encoder_parameters
        self.param_names = tuple(name for name, _ in self.parameters)
        selected_components = {name.split(".", 1)[0] for name, _ in text_encoder_parameters}
        self._text_encoders = [m for name, m in text_encoders(adapter.pipeline) if name in selected_components]
        self._check_parameters_in_place()
        self._offsets = []
        offset = 0
        for _, param in self.parameters:
            self._offsets.append(offset)
            offset += param.numel()
        self.input_dim = offset
        self._output_function = self.objective.attribution_function(config.output_function)
        # noise_draws="separate": each draw gets its own block of K / R buckets (the K/R-sketch with the same seed)
        self._separate_draws = config.noise_draws == "separate" and config.num_noise_draws > 1
        draw_dim = config.sketch_dim // config.num_noise_draws if self._separate_draws else config.sketch_dim
        self.sketch = OPORPSketch(self.input_dim, draw_dim, config.seed, table_budget_bytes=options.table_budget_bytes)
        self.spec = SketchSpec(
            config=config,
            family=adapter.family,
            target=self.objective.target_name,
            timesteps=self.timesteps,
            latent_shape=adapter.latent_shape,
            param_names=self.param_names,
            input_dim=self.input_dim,
            param_fingerprint=fingerprint_parameters(self.parameters),
            objective=adapter.conventions.to_dict(),
            model_fingerprint=fingerprint_modules(_conditioning_modules(adapter)),
            adapters=pipeline_adapters(adapter.pipeline, adapter.denoiser_attribute),
        )
        self.mode = options.mode
        self.max_pairs_per_batch = options.max_pairs_per_batch
        self.gradient_memory_bytes = options.gradient_memory_bytes
        resolve_num_threads(options.num_threads, None)  # a bad value fails now
        self.num_threads = options.num_threads
        self._vmap_failed = False
        logger.info(
            f"GradientSketcher: {adapter.family} denoiser, {len(self.param_names)} parameter tensors "
            f"(D={self.input_dim:,}), T={len(self.timesteps)} timesteps {list(self.timesteps)}, "
            f"target={self.objective.target_name}, K={config.sketch_dim}."
        )

    @classmethod
    def from_pipeline(
        cls, pipeline: Any, config: DMinConfig | None = None, *, options: SketcherOptions | None = None, **kwargs: Any
    ) -> GradientSketcher:
        r"""
        Build a sketcher for a diffusers pipeline.

        Args:
            pipeline (`DiffusionPipeline`):
                A pipeline of a supported family, optionally with LoRAs loaded (`load_lora_weights`, weighted with
                `set_adapters`), in float32, float16 or bfloat16, with gradient checkpointing enabled on its denoiser
                (the `"loop"` engine is used) or with `enable_model_cpu_offload()` (the denoiser is moved to the
                execution device for the gradients). `enable_sequential_cpu_offload()` is refused.
            config (`DMinConfig`, *optional*):
                Defaults to `DMinConfig()`.
            options (`SketcherOptions`, *optional*):
                How the sketcher runs (speed and memory; never the sketches): `mode`, `max_pairs_per_batch`,
                `gradient_memory_bytes`, `table_budget_bytes`, `num_threads`.
            kwargs:
                Single fields of [`SketcherOptions`] (they override `options`).
        """
        config = config if config is not None else DMinConfig()
        adapter = adapter_for_pipeline(pipeline, config=config)
        return cls(adapter, config, options=options, **kwargs)

    def __repr__(self) -> str:
        return (
            f"GradientSketcher(family={self.adapter.family!r}, D={self.input_dim}, T={len(self.timesteps)}, "
            f"K={self.config.sketch_dim}, params={self.config.params!r})"
        )

    # ------------------------------------------------------------------ public entry points

    def __call__(
        self,
        images: Any = None,
        prompts: str | Sequence[str] | None = None,
        *,
        latents: torch.Tensor | None = None,
        condition_images: Any = None,
    ) -> torch.Tensor:
        r"""
        Sketch the gradients of a batch.

        Args:
            images (PIL images, `np.ndarray` of shape `(B, H, W, C)` or `torch.Tensor` of shape `(B, C, H, W)`):
                Images in `[0, 1]` at the sketcher's resolution (video families: videos, e.g. `(B, F, C, H, W)`
                tensors, see the family's adapter). Give either `images` or `latents`.
            prompts (`str` or `list[str]`, *optional*):
                One prompt per sample (a single string is used for every sample); ignored by unconditional models.
            latents (`torch.Tensor` of shape `(B, C, h, w)` or `(B, C, F, h, w)` for videos, *optional*):
                Clean denoiser inputs `x0` (for latent models: VAE latents times the scaling factor, as the pipeline's
                denoising loop produces them).
            condition_images (PIL images, `np.ndarray` or `torch.Tensor`, *optional*):
                One image per sample that conditions the denoiser besides the prompt, for families trained with one
                (FLUX.1 Kontext's image to edit, `--cond_image_column`); values in `[0, 1]`.

        Returns:
            `torch.Tensor` of shape `(B, T, K)`: float32 sketches on the CPU.
        """
        with self._threads():
            x0, cond, prompts = self._inputs(images, prompts, latents, condition_images)
            return self._run(x0, cond, sink="sketch", prompts=prompts)

    def losses(
        self,
        images: Any = None,
        prompts: str | Sequence[str] | None = None,
        *,
        latents: torch.Tensor | None = None,
        condition_images: Any = None,
    ) -> torch.Tensor:
        """Per-sample training losses at the sketcher's timesteps and noise: `(B, T)` float32 (mean over draws)."""
        with self._threads():
            x0, cond, _ = self._inputs(images, prompts, latents, condition_images)
        batch = x0.shape[0]
        losses = []
        with torch.no_grad(), self._eval_mode(), self._threads():
            for pairs in self._pair_batches(x0, cond):
                pred = self.adapter.forward(self.adapter.denoiser, pairs["noisy"], pairs["t"], pairs["cond"])
                losses.append(self.objective.loss(pred, pairs["target"], pairs["weight"]).cpu())
        return torch.cat(losses).view(batch, len(self.timesteps), -1).mean(-1)

    def full_gradients(
        self,
        images: Any = None,
        prompts: str | Sequence[str] | None = None,
        *,
        latents: torch.Tensor | None = None,
        condition_images: Any = None,
    ) -> torch.Tensor:
        """The uncompressed per-timestep gradients `(B, T, D)` (float32, CPU), normalised as the config says.

        Meant for evaluation and tests on small models: it materialises B * T * D numbers.
        """
        with self._threads():
            x0, cond, prompts = self._inputs(images, prompts, latents, condition_images)
            return self._run(x0, cond, sink="dense", prompts=prompts)

    # ------------------------------------------------------------------ inputs

    def _inputs(
        self, images, prompts, latents, condition_images=None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[str] | None]:
        if (images is None) == (latents is None):
            raise ConfigError("Pass exactly one of `images` (pixels in [0, 1]) and `latents` (clean denoiser inputs).")
        adapter = self.adapter
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or latents.dim() != len(adapter.latent_shape) + 1:
                layout = "(B, C, h, w)" if len(adapter.latent_shape) == 3 else "(B, C, F, h, w)"
                raise ConfigError(
                    f"`latents` must be a {layout} tensor, but is {type(latents).__name__} of shape "
                    f"{tuple(getattr(latents, 'shape', ()))}."
                )
            if tuple(latents.shape[1:]) != tuple(adapter.latent_shape):
                raise ConfigError(
                    f"`latents` have shape {tuple(latents.shape[1:])} per sample but this sketcher works at "
                    f"{tuple(adapter.latent_shape)} (resolution {adapter.resolution}); generate at that size or "
                    "set `DMinConfig(resolution=...)`."
                )
            x0 = latents.detach().to(adapter.device, adapter.dtype)
        else:
            x0 = adapter.encode_images(adapter.preprocess(images))
        batch = x0.shape[0]
        if not adapter.conditional:
            if condition_images is not None:
                adapter.encode_condition_images(condition_images)  # raises: no family without prompts takes them
            return x0, {}, None
        if prompts is None:
            raise ConfigError(
                f"This {adapter.family} pipeline is conditional: pass `prompts` (one per sample, or one string)."
            )
        prompts = [prompts] * batch if isinstance(prompts, str) else list(prompts)
        if len(prompts) != batch:
            raise ConfigError(f"Got {len(prompts)} prompts for {batch} samples; pass one prompt per sample.")
        cond = adapter.encode_prompts(prompts)
        if condition_images is not None:
            pixels = images_to_tensor(condition_images, adapter.image_channels)
            if pixels.shape[0] != batch:
                raise ConfigError(
                    f"Got {pixels.shape[0]} `condition_images` for {batch} samples; pass one condition image per sample."
                )
            cond.update(adapter.encode_condition_images(pixels * 2.0 - 1.0))
        return x0, cond, prompts

    def _pair_batches(
        self, x0: torch.Tensor, cond: dict[str, torch.Tensor], size: int | None = None
    ) -> Iterator[dict]:
        """Micro-batches of (sample, timestep, noise draw) pairs, in that order, with inputs and targets."""
        device = x0.device
        batch, num_t, num_draws = x0.shape[0], len(self.timesteps), self.noise.shape[0]
        total = batch * num_t * num_draws
        size = size or total
        timesteps = torch.tensor(self.timesteps, dtype=torch.long)
        noise = self.noise.to(device)
        for start in range(0, total, size):
            pair = torch.arange(start, min(start + size, total))
            sample = pair // (num_t * num_draws)
            t = timesteps[(pair // num_draws) % num_t]
            draw = pair % num_draws
            clean = x0[sample.to(device)]
            noisy, target = self.objective.noisy_and_target(clean, noise[draw.to(device)], t)
            yield {
                "pairs": pair,
                "samples": sample,
                "noisy": noisy.to(self.adapter.dtype),
                "t": self.objective.model_timesteps(t).to(device),
                "target": target,
                "weight": self.objective.loss_weights(t).to(device),
                "cond": {k: v[sample.to(v.device)] for k, v in cond.items()},
                "full_cond": cond,
            }

    # ------------------------------------------------------------------ the engine

    def _modules(self) -> list[torch.nn.Module]:
        """The modules whose parameters the gradient covers: the denoiser and any selected text encoders."""
        return [self.adapter.denoiser, *self._text_encoders]

    def _threads(self) -> contextlib.AbstractContextManager:
        """Torch intra-op threads while gradients are computed (see [`threads`]); the caller's setting comes back."""
        return torch_threads(resolve_num_threads(self.num_threads, self.adapter.device))

    @contextlib.contextmanager
    def _eval_mode(self):
        modules = self._modules()
        was_training = [module.training for module in modules]
        for module in modules:
            module.eval()
        try:
            yield
        finally:
            for module, mode in zip(modules, was_training):
                module.train(mode)

    def _check_adapters_unchanged(self) -> None:
        """The parameter selection and the spec describe the adapters active when the sketcher was built; refuse to
        compute gradients after `set_adapters` / `disable_lora` / `load_lora_weights` changed them."""
        now = pipeline_adapters(self.adapter.pipeline, self.adapter.denoiser_attribute)
        if now != self.spec.adapters:
            raise ConfigError(
                f"The pipeline's active LoRA adapters changed since this GradientSketcher was built (from "
                f"{self.spec.adapters} to {now}); build a new GradientSketcher (or InfluencePipeline, which checks them "
                "against its index) after `set_adapters(...)`."
            )

    def _check_parameters_in_place(self) -> None:
        """Refuse parameters that live on the `meta` device (accelerate's sequential CPU offload or a device map with
        disk/CPU offloading swap the weights in per submodule call, so autograd cannot reach the parameters)."""
        meta = [name for name, param in self.parameters if param.device.type == "meta"]
        if meta:
            raise ConfigError(
                f"{len(meta)} selected parameters (e.g. {meta[0]}) are on the 'meta' device: the pipeline uses "
                "`enable_sequential_cpu_offload()` or a device map with offloading, which loads each weight only "
                "for the duration of its submodule's call, so gradients cannot be taken. Use "
                "`pipe.enable_model_cpu_offload()` (whole models move to the accelerator) or `pipe.to(device)`."
            )

    @contextlib.contextmanager
    def _onloaded(self):
        """Models offloaded by `pipe.enable_model_cpu_offload()` are moved to the execution device first, as their
        own forward call would (its accelerate hook also offloads the model that ran before it), and their hook is
        bypassed while the gradients are computed: it would move the module again inside `functional_call` (which
        torch.func forbids). They stay on the device until the next model of the pipeline runs, as after any forward
        call under model offloading."""
        hooked = [m for m in self._modules() if getattr(getattr(m, "_hf_hook", None), "execution_device", None)]
        if hooked and self._text_encoders:
            raise ConfigError(
                "`text_encoder_params` with `enable_model_cpu_offload()` is not supported: the offloading hooks move a "
                "text encoder back to the CPU when the denoiser runs, between its forward and backward pass. Move the "
                "pipeline to the device (`pipe.to('cuda')`) or leave `text_encoder_params` unset."
            )
        bypassed = []
        try:
            for module in hooked:
                module._hf_hook.pre_forward(module)
                if "forward" in vars(module) and hasattr(module, "_old_forward"):
                    bypassed.append((module, vars(module)["forward"]))
                    module.forward = module._old_forward
            yield
        finally:
            for module, hooked_forward in bypassed:
                module.forward = hooked_forward

    def _pairs_per_batch(self) -> int:
        by_memory = max(1, self.gradient_memory_bytes // max(1, 8 * self.input_dim))
        return int(min(self.max_pairs_per_batch, by_memory))

    def _use_vmap(self) -> bool:
        if self.mode != "auto":
            return self.mode == "vmap"
        if self._vmap_failed or not self.adapter.supports_vmap:
            return False
        return not getattr(self.adapter.denoiser, "is_gradient_checkpointing", False)

    def _run(
        self, x0: torch.Tensor, cond: dict[str, torch.Tensor], sink: str, prompts: Sequence[str] | None = None
    ) -> torch.Tensor:
        if torch.is_inference_mode_enabled():
            raise ConfigError(
                "Gradient sketches cannot be computed under `torch.inference_mode()`; call the sketcher outside it."
            )
        self._check_adapters_unchanged()
        batch, num_t, num_draws = x0.shape[0], len(self.timesteps), self.noise.shape[0]
        width = self.sketch.sketch_dim if sink == "sketch" else self.input_dim
        out = torch.empty(batch * num_t * num_draws, width, dtype=torch.float32)
        size = self._pairs_per_batch() if self._use_vmap() else 1
        with contextlib.ExitStack() as stack:
            for context in (torch.enable_grad(), self._eval_mode(), self._onloaded(), self._selected_requires_grad()):
                stack.enter_context(context)
            if self._text_encoders:
                # text-encoder parameters: the prompts are encoded once more, with autograd, exactly as the conditioning
                # was encoded (same batch, so the same padding); every pair's backward pass goes through this graph
                cond = {**cond, **self.adapter.encode_prompts_with_grad(prompts)}
            for pairs in self._pair_batches(x0, cond, size):
                rows = self._gradient_rows(pairs, sink)
                out[pairs["pairs"]] = rows.cpu()
        return self._combine_draws(out.view(batch, num_t, num_draws, width))

    def _combine_draws(self, rows: torch.Tensor) -> torch.Tensor:
        """`(B, T, R, W)` per-draw rows -> `(B, T, W)` (`noise_draws="mean"`) or `(B, T, R * W)` (`"separate"`: the
        draws side by side, each scaled by `1/sqrt(R)`, so an inner product is the mean of the per-draw ones), then
        per-timestep (per-block) unit norm under `sketch_normalize`."""
        num_draws = rows.shape[2]
        if self._separate_draws:
            if self.config.sketch_normalize:
                rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-30)
            return (rows / math.sqrt(num_draws)).flatten(2)
        out = rows.mean(2)
        if self.config.sketch_normalize:
            out = out / out.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        return out

    def _gradient_rows(self, pairs: dict, sink: str) -> torch.Tensor:
        """Sketches (or dense gradients) of one micro-batch of pairs, normalised per the config."""
        use_vmap = self._use_vmap()
        try:
            grads, losses = self._vmap_gradients(pairs) if use_vmap else self._loop_gradients(pairs)
        except (RuntimeError, NotImplementedError) as err:
            if not (use_vmap and self.mode == "auto"):
                raise
            logger.warning(
                f"torch.func.vmap failed on this {type(self.adapter.denoiser).__name__} ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200]}); falling back to one backward pass per (sample, timestep). "
                "Pass `mode='loop'` to skip this attempt."
            )
            self._vmap_failed = True
            grads, losses = self._loop_gradients(pairs)
        self._check_finite(losses, pairs, "loss")

        rows = losses.shape[0]
        device = losses.device
        normalize = self.config.normalize
        sq_norm = torch.zeros(rows, dtype=torch.float64, device=device)
        if sink == "sketch":
            acc = self.sketch.new_accumulator(rows, device)
        else:
            acc = torch.empty(rows, self.input_dim, dtype=torch.float32, device=device)
        if normalize == "layer":
            layer_scales = self._layer_scales(grads, rows)
        # the half-precision loss scale cancels in every normalisation; without one it is divided out here
        unscale = 1.0 / self._loss_scale(pairs) if normalize == "none" else 1.0
        for i, ((name, _), offset, grad) in enumerate(zip(self.parameters, self._offsets, grads)):
            flat = grad.reshape(rows, -1).float()
            if unscale != 1.0:
                flat = flat * unscale
            if normalize == "layer":
                flat = flat * layer_scales[:, i : i + 1]
            sq_norm += flat.pow(2).sum(1, dtype=torch.float64)
            if sink == "sketch":
                self.sketch.accumulate(acc, flat, offset)
            else:
                acc[:, offset : offset + flat.shape[1]] = flat
        self._check_finite(sq_norm, pairs, "gradient")
        out = self.sketch.finalize(acc) if sink == "sketch" else acc
        if normalize == "none":
            return out
        norm = sq_norm.sqrt().to(torch.float32)
        if (norm == 0).any():
            zero = sorted({int(s) for s in pairs["samples"][(norm == 0).cpu()]})
            logger.warning(
                f"The gradient of samples at batch positions {zero} is exactly zero at some timestep (e.g. an untrained "
                "LoRA with lora_B = 0 and params='lora' covering only lora_A); their sketches stay zero."
            )
        return out / norm.clamp_min(1e-30).unsqueeze(1)

    @staticmethod
    def _layer_scales(grads: list[torch.Tensor], rows: int) -> torch.Tensor:
        """`(rows, num_tensors)` factors that scale each parameter tensor's gradient to unit norm.

        Tensors whose gradient is below `_LAYER_NORM_FLOOR` times the row's largest tensor gradient get 0: their true
        gradient is zero (e.g. attention key biases: softmax ignores a shift shared by all logits) and what is there
        is float rounding, which per-tensor normalisation would otherwise blow up into a unit vector of noise.
        """
        norms = torch.stack([g.reshape(rows, -1).float().norm(dim=1) for g in grads], dim=1)
        floor = norms.amax(dim=1, keepdim=True) * _LAYER_NORM_FLOOR
        return torch.where(norms > floor, 1.0 / norms.clamp_min(1e-30), torch.zeros_like(norms))

    def _check_finite(self, values: torch.Tensor, pairs: dict, what: str) -> None:
        bad = ~torch.isfinite(values)
        if bad.any():
            positions = sorted({int(s) for s in pairs["samples"][bad.cpu()]})
            raise NonFiniteGradientError(
                f"The {what} of the samples at batch positions {positions} is not finite (NaN or inf). Check those "
                "inputs (values in [0, 1], no NaNs) and the model weights; a half-precision pipeline can overflow: "
                "load it with `torch_dtype=torch.float32` to compute the sketches.",
                positions=positions,
            )

    @contextlib.contextmanager
    def _selected_requires_grad(self):
        """Only the selected parameters require grad (autograd then builds no graph for the others); restored after."""
        selected = {id(param) for _, param in self.parameters}
        flags = [(p, p.requires_grad) for module in self._modules() for p in module.parameters()]
        try:
            for p, _ in flags:
                p.requires_grad_(id(p) in selected)
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)

    def _vmap_gradients(self, pairs: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per-pair gradients with one batched forward and backward of the denoiser (`torch.func`).

        With text-encoder parameters, the vmapped loss also returns its gradient with respect to the (floating-point)
        conditioning tensors, which is pulled back through the text encoders' graph of the prompt encoding for all
        pairs of one sample at once (`is_grads_batched`): per pair, exactly the chain rule
        `dL/dtheta_text = (dL/dcond) (dcond/dtheta_text)`.
        """
        from torch.func import functional_call, grad_and_value, vmap

        denoiser = self.adapter.denoiser
        text_names = {name for name, _ in self._text_encoder_parameters}
        selected = {name: param.detach() for name, param in self.parameters if name not in text_names}
        others = {name: param.detach() for name, param in denoiser.named_parameters() if name not in selected}
        buffers = dict(denoiser.named_buffers())
        adapter, output_function = self.adapter, self._output_function
        scale = self._loss_scale(pairs)

        def pair_loss(params, noisy, t, target, weight, cond, fixed):
            def call(*args, **kwargs):
                return functional_call(denoiser, (params, others, buffers), args, kwargs)

            inputs = {k: v[None] for k, v in {**fixed, **cond}.items()}
            pred = adapter.forward(call, noisy[None], t[None], inputs)
            return output_function(pred, target[None], weight[None])[0] * scale

        # with text-encoder parameters, also differentiate w.r.t. the conditioning tensors that carry the text encoders'
        # graph (masks, ids and conditioning that does not come from the prompt are passed along as they are)
        cond = pairs["cond"]
        differentiable = {k: v.detach() for k, v in cond.items() if text_names and v.requires_grad}
        fixed = {k: v.detach() for k, v in cond.items() if k not in differentiable}
        argnums = (0, 5) if text_names else 0
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_VMAP_WARNING)
            grads, losses = vmap(grad_and_value(pair_loss, argnums=argnums), in_dims=(None, 0, 0, 0, 0, 0, 0))(
                selected, pairs["noisy"], pairs["t"], pairs["target"], pairs["weight"], differentiable, fixed
            )
        if text_names:
            grads, cond_grads = grads
            grads = {**grads, **self._text_encoder_gradients(pairs["full_cond"], cond_grads, pairs["samples"])}
        return [grads[name] for name in self.param_names], losses.detach() / scale

    def _text_encoder_gradients(
        self, encoded: dict[str, torch.Tensor], cond_grads: dict[str, torch.Tensor], samples: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Pull the per-pair gradients w.r.t. the conditioning back through the prompt encoding's graph (`encoded`:
        the whole call's conditioning, row = sample), one batched backward pass per sample of the micro-batch."""
        params = self._text_encoder_parameters
        rows = samples.shape[0]
        out = {name: torch.zeros(rows, *p.shape, dtype=p.dtype, device=p.device) for name, p in params}
        keys = list(cond_grads)
        for sample in samples.unique().tolist():
            index = (samples == sample).nonzero().flatten()
            grads = torch.autograd.grad(
                [encoded[k][sample : sample + 1] for k in keys],
                [p for _, p in params],
                grad_outputs=[cond_grads[k][index.to(cond_grads[k].device)].unsqueeze(1) for k in keys],
                is_grads_batched=True,
                retain_graph=True,
                allow_unused=True,
            )
            for (name, _), grad in zip(params, grads):
                if grad is not None:
                    out[name][index.to(grad.device)] = grad.detach()
        return out

    def _loop_gradients(self, pairs: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        denoiser = self.adapter.denoiser
        params = [param for _, param in self.parameters]
        rows = pairs["noisy"].shape[0]
        scale = self._loss_scale(pairs)
        grads: list[list[torch.Tensor]] = [[] for _ in params]
        losses = []
        retain = bool(self._text_encoders)  # the prompt encoding's graph serves every pair
        for i in range(rows):
            cond = {k: v[i : i + 1] for k, v in pairs["cond"].items()}
            pred = self.adapter.forward(denoiser, pairs["noisy"][i : i + 1], pairs["t"][i : i + 1], cond)
            loss = self._output_function(pred, pairs["target"][i : i + 1], pairs["weight"][i : i + 1])[0]
            row = torch.autograd.grad(loss * scale, params, allow_unused=True, retain_graph=retain)
            for j, (param, g) in enumerate(zip(params, row)):
                grads[j].append(torch.zeros_like(param) if g is None else g.detach())
            losses.append(loss.detach())
        return [torch.stack(g) for g in grads], torch.stack(losses)

    def _loss_scale(self, pairs: dict) -> float:
        """Factor on the loss for the backward pass: the number of target elements in half precision, else 1.

        The loss is a mean over C*H*W elements, so half-precision backward passes carry gradients of about
        1/(C*H*W), which underflow for latents of real sizes; the factor is divided out in float32 afterwards.
        """
        if self.adapter.dtype not in (torch.float16, torch.bfloat16):
            return 1.0
        return float(pairs["target"][0].numel())
