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
import warnings
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch

from .config import DMinConfig, SketchSpec
from .errors import ConfigError, NonFiniteGradientError
from .logging import ProgressBarMixin, get_logger
from .objectives import DenoiserAdapter, Objective, adapter_for_pipeline, fixed_noise, select_timesteps
from .sketch import OPORPSketch
from .threads import resolve_num_threads, torch_threads


logger = get_logger(__name__)

__all__ = ["GradientSketcher", "select_parameters", "fingerprint_parameters"]

# normalize="layer": tensors whose gradient norm is below this fraction of the largest one count as zero
_LAYER_NORM_FLOOR = 1e-5
_VMAP_WARNING = r".*(performance drop because we have not yet implemented the batching rule|vmap.*fallback).*"


# ---------------------------------------------------------------------------------------------- parameter selection


def _is_lora(name: str) -> bool:
    return "lora_" in name


def _active_lora_names(denoiser: torch.nn.Module) -> set[str]:
    """Names of the LoRA parameters of the adapters that are active in the denoiser's PEFT layers."""
    names: set[str] = set()
    for module_name, module in denoiser.named_modules():
        active = getattr(module, "active_adapters", None)
        if active is None or callable(active) or not hasattr(module, "lora_A"):
            continue
        active = [active] if isinstance(active, str) else list(active)
        for param_name, _ in module.named_parameters(recurse=True):
            parts = param_name.split(".")
            if any(p.startswith("lora_") for p in parts) and any(a in parts for a in active):
                names.add(f"{module_name}.{param_name}" if module_name else param_name)
    return names


def select_parameters(
    denoiser: torch.nn.Module, params: str | Sequence[str] = "auto"
) -> list[tuple[str, torch.nn.Parameter]]:
    r"""
    The `(name, parameter)` pairs a gradient covers, in `named_parameters()` order.

    Args:
        denoiser (`torch.nn.Module`): The UNet or transformer.
        params (`str` or `list[str]`, *optional*, defaults to `"auto"`): See [`DMinConfig`] `params`.
    """
    named = list(denoiser.named_parameters())
    if params == "auto":
        params = "lora" if any(_is_lora(n) for n, _ in named) else "attention"
    if params == "lora":
        active = _active_lora_names(denoiser)
        selected = [(n, p) for n, p in named if n in active] or [(n, p) for n, p in named if _is_lora(n)]
        if not selected:
            raise ConfigError(
                "`params='lora'` but the denoiser carries no LoRA adapter; load one (`pipe.load_lora_weights(...)` or "
                "`denoiser.add_adapter(LoraConfig(...))`) or use `params='attention'`."
            )
        return selected
    if params == "attention":
        base = [(n, p) for n, p in named if not _is_lora(n)]
        for block in ("transformer_blocks", "attentions"):
            selected = [(n, p) for n, p in base if any(part.endswith(block) for part in n.split("."))]
            if selected:
                return selected
        raise ConfigError(
            f"`params='attention'` found no `transformer_blocks` or `attentions` parameters in "
            f"{type(denoiser).__name__}; use `params='all'` or a list of name patterns."
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


# ---------------------------------------------------------------------------------------------- the sketcher


class GradientSketcher(ProgressBarMixin):
    r"""
    Computes DMin gradient sketches of (image, prompt) pairs for a diffusers pipeline.

    Build it with [`GradientSketcher.from_pipeline`]. Calling it returns a float32 CPU tensor of shape `(B, T, K)`:
    for each sample, the L2-normalised loss gradient at each of the T timesteps, sketched to K numbers.

    Attributes:
        config (`DMinConfig`): The configuration.
        adapter (`DenoiserAdapter`): How the pipeline's denoiser is fed.
        timesteps (`tuple[int, ...]`): The T training timesteps, noisiest first.
        noise (`torch.Tensor` of shape `(num_noise_draws, C, H, W)`): The fixed noise, drawn on the CPU from the seed.
        param_names (`tuple[str, ...]`): The selected denoiser parameters.
        input_dim (`int`): D, their total number of scalars.
        spec (`SketchSpec`): What an index must share with these sketches.
        sketch (`OPORPSketch`): The compression.
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
        adapter: DenoiserAdapter,
        config: DMinConfig | None = None,
        *,
        mode: Literal["auto", "vmap", "loop"] = "auto",
        max_pairs_per_batch: int = 64,
        gradient_memory_bytes: int = 2**30,
        table_budget_bytes: int = 256 * 2**20,
        num_threads: int | None = None,
    ):
        config = config if config is not None else DMinConfig()
        if not isinstance(config, DMinConfig):
            raise ConfigError(f"`config` must be a DMinConfig, but is {type(config).__name__}.")
        if mode not in ("auto", "vmap", "loop"):
            raise ConfigError(f"`mode` must be 'auto', 'vmap' or 'loop', but is {mode!r}.")
        if max_pairs_per_batch < 1:
            raise ConfigError(f"`max_pairs_per_batch` must be a positive integer, but is {max_pairs_per_batch!r}.")
        self.config = config
        self.adapter = adapter
        self.objective = Objective(adapter.scheduler, config.target)
        self.timesteps = select_timesteps(config, self.objective.num_train_timesteps)
        self.noise = fixed_noise(config.seed, adapter.latent_shape, config.num_noise_draws)
        self.parameters = select_parameters(adapter.denoiser, config.params)
        self.param_names = tuple(name for name, _ in self.parameters)
        self._offsets = []
        offset = 0
        for _, param in self.parameters:
            self._offsets.append(offset)
            offset += param.numel()
        self.input_dim = offset
        self.sketch = OPORPSketch(
            self.input_dim, config.sketch_dim, config.seed, table_budget_bytes=table_budget_bytes
        )
        self.spec = SketchSpec(
            config=config,
            family=adapter.family,
            target=self.objective.target_name,
            timesteps=self.timesteps,
            latent_shape=adapter.latent_shape,
            param_names=self.param_names,
            input_dim=self.input_dim,
            param_fingerprint=fingerprint_parameters(self.parameters),
        )
        self.mode = mode
        self.max_pairs_per_batch = max_pairs_per_batch
        self.gradient_memory_bytes = gradient_memory_bytes
        resolve_num_threads(num_threads, None)  # a bad value fails now
        self.num_threads = num_threads
        self._vmap_failed = False
        logger.info(
            f"GradientSketcher: {adapter.family} denoiser, {len(self.param_names)} parameter tensors "
            f"(D={self.input_dim:,}), T={len(self.timesteps)} timesteps {list(self.timesteps)}, "
            f"target={self.objective.target_name}, K={config.sketch_dim}."
        )

    @classmethod
    def from_pipeline(cls, pipeline: Any, config: DMinConfig | None = None, **kwargs: Any) -> GradientSketcher:
        r"""
        Build a sketcher for a diffusers pipeline.

        Args:
            pipeline (`DiffusionPipeline`):
                A DDPM/DDIM, Stable Diffusion 1.x/2.x, SDXL or SD3 pipeline, optionally with a LoRA loaded.
            config (`DMinConfig`, *optional*):
                Defaults to `DMinConfig()`.
            kwargs:
                `mode` (`"auto"`, `"vmap"`, `"loop"`), `max_pairs_per_batch` (default 64),
                `gradient_memory_bytes` (memory for the per-pair gradients of one vmap micro-batch, default 1 GiB),
                `table_budget_bytes` (cached sketch tables, default 256 MiB), `num_threads` (torch intra-op threads
                while gradients are computed: default 1 on the CPU, overridable by `DMIN_NUM_THREADS`; `0` keeps
                torch's setting; see [`threads`]).
        """
        config = config if config is not None else DMinConfig()
        adapter = adapter_for_pipeline(pipeline, config.resolution)
        return cls(adapter, config, **kwargs)

    def __repr__(self) -> str:
        return (
            f"GradientSketcher(family={self.adapter.family!r}, D={self.input_dim}, T={len(self.timesteps)}, "
            f"K={self.config.sketch_dim}, params={self.config.params!r})"
        )

    # ------------------------------------------------------------------ public entry points

    def __call__(
        self, images: Any = None, prompts: str | Sequence[str] | None = None, *, latents: torch.Tensor | None = None
    ) -> torch.Tensor:
        r"""
        Sketch the gradients of a batch.

        Args:
            images (PIL images, `np.ndarray` of shape `(B, H, W, C)` or `torch.Tensor` of shape `(B, C, H, W)`):
                Images in `[0, 1]` at the sketcher's resolution. Give either `images` or `latents`.
            prompts (`str` or `list[str]`, *optional*):
                One prompt per sample (a single string is used for every sample); ignored by unconditional models.
            latents (`torch.Tensor` of shape `(B, C, h, w)`, *optional*):
                Clean denoiser inputs `x0` (for latent models: VAE latents times the scaling factor, as the pipeline's
                denoising loop produces them).

        Returns:
            `torch.Tensor` of shape `(B, T, K)`: float32 sketches on the CPU.
        """
        with self._threads():
            x0, cond = self._inputs(images, prompts, latents)
            return self._run(x0, cond, sink="sketch")

    def losses(
        self, images: Any = None, prompts: str | Sequence[str] | None = None, *, latents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Per-sample training losses at the sketcher's timesteps and noise: `(B, T)` float32 (mean over draws)."""
        with self._threads():
            x0, cond = self._inputs(images, prompts, latents)
        batch = x0.shape[0]
        losses = []
        with torch.no_grad(), self._eval_mode(), self._threads():
            for pairs in self._pair_batches(x0, cond):
                pred = self.adapter.forward(self.adapter.denoiser, pairs["noisy"], pairs["t"], pairs["cond"])
                losses.append(self.objective.loss(pred, pairs["target"]).cpu())
        return torch.cat(losses).view(batch, len(self.timesteps), -1).mean(-1)

    def full_gradients(
        self, images: Any = None, prompts: str | Sequence[str] | None = None, *, latents: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The uncompressed per-timestep gradients `(B, T, D)` (float32, CPU), normalised as the config says.

        Meant for evaluation and tests on small models: it materialises B * T * D numbers.
        """
        with self._threads():
            x0, cond = self._inputs(images, prompts, latents)
            return self._run(x0, cond, sink="dense")

    # ------------------------------------------------------------------ inputs

    def _inputs(self, images, prompts, latents) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if (images is None) == (latents is None):
            raise ConfigError("Pass exactly one of `images` (pixels in [0, 1]) and `latents` (clean denoiser inputs).")
        adapter = self.adapter
        if latents is not None:
            if not isinstance(latents, torch.Tensor) or latents.dim() != 4:
                raise ConfigError(
                    f"`latents` must be a (B, C, h, w) tensor, but is {type(latents).__name__} of shape "
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
            return x0, {}
        if prompts is None:
            raise ConfigError(
                f"This {adapter.family} pipeline is conditional: pass `prompts` (one per sample, or one string)."
            )
        prompts = [prompts] * batch if isinstance(prompts, str) else list(prompts)
        if len(prompts) != batch:
            raise ConfigError(f"Got {len(prompts)} prompts for {batch} samples; pass one prompt per sample.")
        return x0, adapter.encode_prompts(prompts)

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
                "cond": {k: v[sample.to(v.device)] for k, v in cond.items()},
            }

    # ------------------------------------------------------------------ the engine

    def _threads(self) -> contextlib.AbstractContextManager:
        """Torch intra-op threads while gradients are computed (see [`threads`]); the caller's setting comes back."""
        return torch_threads(resolve_num_threads(self.num_threads, self.adapter.device))

    @contextlib.contextmanager
    def _eval_mode(self):
        denoiser = self.adapter.denoiser
        was_training = denoiser.training
        denoiser.eval()
        try:
            yield
        finally:
            denoiser.train(was_training)

    def _pairs_per_batch(self) -> int:
        by_memory = max(1, self.gradient_memory_bytes // max(1, 8 * self.input_dim))
        return int(min(self.max_pairs_per_batch, by_memory))

    def _use_vmap(self) -> bool:
        if self.mode != "auto":
            return self.mode == "vmap"
        return not self._vmap_failed and not getattr(self.adapter.denoiser, "is_gradient_checkpointing", False)

    def _run(self, x0: torch.Tensor, cond: dict[str, torch.Tensor], sink: str) -> torch.Tensor:
        if torch.is_inference_mode_enabled():
            raise ConfigError(
                "Gradient sketches cannot be computed under `torch.inference_mode()`; call the sketcher outside it."
            )
        batch, num_t, num_draws = x0.shape[0], len(self.timesteps), self.noise.shape[0]
        width = self.config.sketch_dim if sink == "sketch" else self.input_dim
        out = torch.empty(batch * num_t * num_draws, width, dtype=torch.float32)
        size = self._pairs_per_batch() if self._use_vmap() else 1
        with torch.enable_grad(), self._eval_mode():
            for pairs in self._pair_batches(x0, cond, size):
                rows = self._gradient_rows(pairs, sink)
                out[pairs["pairs"]] = rows.cpu()
        return out.view(batch, num_t, num_draws, width).mean(2)

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

    def _vmap_gradients(self, pairs: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        from torch.func import functional_call, grad_and_value, vmap

        denoiser = self.adapter.denoiser
        selected = {name: param.detach() for name, param in self.parameters}
        others = {name: param.detach() for name, param in denoiser.named_parameters() if name not in selected}
        buffers = dict(denoiser.named_buffers())
        adapter, objective = self.adapter, self.objective
        scale = self._loss_scale(pairs)

        def pair_loss(params, noisy, t, target, cond):
            def call(*args, **kwargs):
                return functional_call(denoiser, (params, others, buffers), args, kwargs)

            pred = adapter.forward(call, noisy[None], t[None], {k: v[None] for k, v in cond.items()})
            return objective.loss(pred, target[None])[0] * scale

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_VMAP_WARNING)
            grads, losses = vmap(grad_and_value(pair_loss), in_dims=(None, 0, 0, 0, 0))(
                selected, pairs["noisy"], pairs["t"], pairs["target"], pairs["cond"]
            )
        return [grads[name] for name in self.param_names], losses.detach() / scale

    def _loop_gradients(self, pairs: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        denoiser = self.adapter.denoiser
        params = [param for _, param in self.parameters]
        selected = {id(p) for p in params}
        flags = [(p, p.requires_grad) for p in denoiser.parameters()]
        rows = pairs["noisy"].shape[0]
        scale = self._loss_scale(pairs)
        grads: list[list[torch.Tensor]] = [[] for _ in params]
        losses = []
        try:
            for p, _ in flags:
                p.requires_grad_(id(p) in selected)
            for i in range(rows):
                cond = {k: v[i : i + 1] for k, v in pairs["cond"].items()}
                pred = self.adapter.forward(denoiser, pairs["noisy"][i : i + 1], pairs["t"][i : i + 1], cond)
                loss = self.objective.loss(pred, pairs["target"][i : i + 1])[0]
                row = torch.autograd.grad(loss * scale, params, allow_unused=True)
                for j, (param, g) in enumerate(zip(params, row)):
                    grads[j].append(torch.zeros_like(param) if g is None else g.detach())
                losses.append(loss.detach())
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
        return [torch.stack(g) for g in grads], torch.stack(losses)

    def _loss_scale(self, pairs: dict) -> float:
        """Factor on the loss for the backward pass: the number of target elements in half precision, else 1.

        The loss is a mean over C*H*W elements, so half-precision backward passes carry gradients of about
        1/(C*H*W), which underflow for latents of real sizes; the factor is divided out in float32 afterwards.
        """
        if self.adapter.dtype not in (torch.float16, torch.bfloat16):
            return 1.0
        return float(pairs["target"][0].numel())
