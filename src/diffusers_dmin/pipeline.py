"""`InfluencePipeline`: generate with any supported diffusers pipeline and attribute each image in the same call."""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import PIL.Image
import torch

from .config import DMinConfig, SketcherOptions
from .errors import ConfigError, check_choice, check_int
from .gradients import GradientSketcher
from .index import GradientIndex
from .logging import get_logger
from .objectives import prepare_images
from .outputs import InfluencePipelineOutput, InfluenceResult
from .viz import to_pil


logger = get_logger(__name__)

__all__ = ["InfluencePipeline"]

_OUTPUT_TYPES = ("pil", "np", "pt", "latent")


# Arguments of the wrapped pipelines that change the conditioning the gradient would have to reproduce.
_CONDITIONING_ARGUMENTS = (
    "prompt_2",
    "prompt_3",
    "clip_skip",
    "max_sequence_length",
    "text_encoder_out_layers",
    "original_size",
    "crops_coords_top_left",
    "target_size",
    "cross_attention_kwargs",
    "joint_attention_kwargs",
    "attention_kwargs",  # Qwen-Image, Sana, ...: the LoRA `scale` lives here
)


class InfluencePipeline:
    r"""
    A diffusers pipeline plus a DMin [`GradientIndex`] of its training set: `pipe(prompt, return_influence=True)`
    returns the generated images and, for each, its most influential training samples.

    The wrapped pipeline is kept as `self.pipeline` and runs unchanged: the final latents of the denoising loop are
    captured through `callback_on_step_end` (or by observing the scheduler's `step` for pipelines without callbacks,
    such as `DDPMPipeline`), so no decode/re-encode round trip happens, and with `return_influence=False` the call is
    exactly the wrapped pipeline's call. The gradient of a generated image uses its conditional prompt embedding only,
    also when it was generated with classifier-free guidance.

    The index must have been built from this pipeline's denoiser (same parameters, adapter and config); this is
    checked once, in the constructor, before anything is generated.

    Args:
        pipeline (`DiffusionPipeline`):
            A `DDPMPipeline`/`DDIMPipeline`, `StableDiffusionPipeline`, `StableDiffusionXLPipeline` or
            `StableDiffusion3Pipeline`, with or without a LoRA loaded.
        index (`GradientIndex`):
            The index of the training set.
        sketcher_options ([`SketcherOptions`], *optional*):
            How the sketcher runs (`mode`, `max_pairs_per_batch`, `gradient_memory_bytes`, `num_threads`, ...).
        sketcher_kwargs:
            Single fields of [`SketcherOptions`] (they override `sketcher_options`).

    Examples:
    ```py
    >>> from diffusers_dmin import InfluencePipeline
    >>> pipe = InfluencePipeline.from_pretrained(base_pipeline, "org/my-lora-dmin-index")
    >>> out = pipe("a pokemon with blue wings", return_influence=True, top_k=8)
    >>> out.images[0], out.influence[0].sample_ids, out.influence[0].scores
    >>> out.influence[0].to_grid()
    ```
    """

    def __init__(
        self,
        pipeline: Any,
        index: GradientIndex,
        *,
        sketcher_options: SketcherOptions | None = None,
        **sketcher_kwargs: Any,
    ):
        if not isinstance(index, GradientIndex):
            raise ConfigError(
                f"`index` must be a GradientIndex, but is {type(index).__name__}; load one with "
                "`GradientIndex.from_pretrained(...)`."
            )
        self.pipeline = pipeline
        self.index = index
        options = SketcherOptions.from_value(sketcher_options, **sketcher_kwargs)
        self.sketcher = GradientSketcher.from_pipeline(pipeline, index.config, options=options)
        index.check_compatible(self.sketcher.spec)  # up front, before anything is generated
        self._signature = inspect.signature(pipeline.__call__).parameters
        self.timings: dict[str, float] = {}

    @classmethod
    def from_pretrained(
        cls,
        pipeline: Any,
        repo_id_or_path: str | os.PathLike,
        *,
        sketcher_kwargs: SketcherOptions | dict[str, Any] | None = None,
        **hub_kwargs: Any,
    ) -> InfluencePipeline:
        r"""
        Wrap `pipeline` with the index stored in a local folder or a Hub repository.

        Args:
            pipeline (`DiffusionPipeline`): The pipeline the index was built for.
            repo_id_or_path (`str` or `os.PathLike`): Passed to [`GradientIndex.from_pretrained`].
            sketcher_kwargs ([`SketcherOptions`] or `dict`, *optional*): How the sketcher runs.
            hub_kwargs: `revision`, `token`, `cache_dir`, `local_files_only`, `endpoint`, ... (see
                [`GradientIndex.from_pretrained`]).
        """
        index = GradientIndex.from_pretrained(repo_id_or_path, **hub_kwargs)
        return cls(pipeline, index, sketcher_options=SketcherOptions.from_value(sketcher_kwargs))

    # ------------------------------------------------------------------ forwarded to the pipeline

    def to(self, *args: Any, **kwargs: Any) -> InfluencePipeline:
        """Move the wrapped pipeline (as `DiffusionPipeline.to`); returns `self`."""
        self.pipeline = self.pipeline.to(*args, **kwargs)
        return self

    @property
    def device(self) -> torch.device:
        """The wrapped pipeline's device."""
        return self.pipeline.device

    @property
    def config(self) -> DMinConfig:
        """The index's [`DMinConfig`]."""
        return self.index.config

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """tqdm options for the wrapped pipeline's denoising bar and for ours, e.g. `disable=True`."""
        self.pipeline.set_progress_bar_config(**kwargs)
        self.sketcher.set_progress_bar_config(**kwargs)
        self.index.set_progress_bar_config(**kwargs)

    def __repr__(self) -> str:
        return f"InfluencePipeline(pipeline={type(self.pipeline).__name__}, index={self.index!r})"

    # ------------------------------------------------------------------ generate and attribute

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        return_influence: bool = False,
        top_k: int = 10,
        exact: bool = True,
        return_dict: bool = True,
        output_type: str = "pil",
        **pipeline_kwargs: Any,
    ):
        r"""
        Generate images and, with `return_influence=True`, attribute each one to its most influential training samples.

        Args:
            prompt (`str` or `list[str]`, *optional*):
                The prompt(s); leave unset for unconditional pipelines (`DDPMPipeline`).
            return_influence (`bool`, *optional*, defaults to `False`):
                Also compute each image's gradient sketch and search the index. When `False`, the call and its
                output are exactly the wrapped pipeline's.
            top_k (`int`, *optional*, defaults to 10):
                Training samples returned per image.
            exact (`bool`, *optional*, defaults to `True`):
                Exact search; `False` uses the index's HNSW graph.
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`InfluencePipelineOutput`] rather than an `(images, influence)` tuple.
            output_type (`str`, *optional*, defaults to `"pil"`):
                `"pil"`, `"np"`, `"pt"` or `"latent"`, as for the wrapped pipeline.
            pipeline_kwargs:
                Every other argument of the wrapped pipeline (`generator`, `num_inference_steps`, `guidance_scale`,
                `negative_prompt`, `num_images_per_prompt`, `height`, `width`, `callback_on_step_end`, ...).

        Returns:
            [`InfluencePipelineOutput`] with `images` and `influence` (one [`InfluenceResult`] per image), or a
            tuple. Without `return_influence` the wrapped pipeline's own output.
        """
        if prompt is not None:
            pipeline_kwargs["prompt"] = prompt
        if not return_influence:
            return self.pipeline(output_type=output_type, return_dict=return_dict, **pipeline_kwargs)

        prompts = self._check_call(pipeline_kwargs, output_type, top_k)
        start = time.perf_counter()
        latents, output = self._generate(pipeline_kwargs, output_type)
        generated = time.perf_counter()
        if prompts is not None:
            per_image = len(latents) // len(prompts)
            prompts = [p for p in prompts for _ in range(per_image)]
        sketches = self.sketcher(latents=latents, prompts=prompts)
        sketched = time.perf_counter()
        influence = self.index.search(sketches, top_k=top_k, exact=exact)
        searched = time.perf_counter()
        self._record_timings(generation=generated - start, gradient=sketched - generated, search=searched - sketched)

        images = output.images if hasattr(output, "images") else output[0]
        for number, (result, image) in enumerate(zip(influence, _as_image_list(images, output_type))):
            result.query, result.num_timesteps = image, self.index.num_timesteps
            result.prompt = prompts[number] if prompts is not None else None
        if not return_dict:
            return images, influence
        return InfluencePipelineOutput(images=images, influence=influence)

    def attribute(
        self,
        images: Any,
        prompts: str | Sequence[str] | None = None,
        *,
        top_k: int = 10,
        exact: bool = True,
    ) -> list[InfluenceResult]:
        r"""
        Attribute existing images (e.g. generated earlier, or found in the wild) to training samples.

        Images are resized and center-cropped to the index's resolution, like training images. Videos (video
        families such as CogVideoX) are taken as they are: at the index's resolution and frame count.

        Args:
            images (PIL images, `np.ndarray` of shape `(B, H, W, C)` or `torch.Tensor` of shape `(B, C, H, W)`):
                Images with values in `[0, 1]` (PIL images as usual); for video families, videos as the family's
                adapter takes them (e.g. `(B, F, C, H, W)` tensors or `(B, F, H, W, C)` arrays).
            prompts (`str` or `list[str]`, *optional*):
                The prompt of each image (conditional pipelines).
            top_k (`int`, *optional*, defaults to 10): Training samples returned per image.
            exact (`bool`, *optional*, defaults to `True`): Exact search; `False` uses HNSW.

        Returns:
            `list[InfluenceResult]`: One per image, with `query` set to the image.
        """
        _check_top_k(top_k)
        adapter = self.sketcher.adapter
        if adapter.num_frames is None:
            pixels = prepare_images(images, adapter.resolution, adapter.image_channels)
        else:  # videos: the adapter checks their size and length
            pixels = images
        start = time.perf_counter()
        sketches = self.sketcher(images=pixels, prompts=prompts)
        sketched = time.perf_counter()
        influence = self.index.search(sketches, top_k=top_k, exact=exact)
        self._record_timings(gradient=sketched - start, search=time.perf_counter() - sketched)
        texts = [prompts] * len(influence) if prompts is None or isinstance(prompts, str) else list(prompts)
        for number, (result, image) in enumerate(zip(influence, pixels)):
            result.query, result.num_timesteps = to_pil(_first_frame(image)), self.index.num_timesteps
            result.prompt = texts[number] if len(texts) == len(influence) else texts[0]
        return influence

    # ------------------------------------------------------------------ internals

    def _record_timings(self, **timings: float) -> None:
        self.timings = timings
        logger.info("Influence timings: " + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in timings.items()))

    def _check_call(self, kwargs: dict[str, Any], output_type: str, top_k: int) -> list[str] | None:
        """Validate everything that can be validated before generating; return the prompts (or None)."""
        _check_top_k(top_k)
        check_choice(output_type, "output_type", _OUTPUT_TYPES)
        adapter = self.sketcher.adapter
        prompts = None
        if adapter.conditional:
            prompt = kwargs.get("prompt")
            if prompt is None or kwargs.get("prompt_embeds") is not None:
                raise ConfigError(
                    "`return_influence=True` needs the prompt text (`prompt=`), not `prompt_embeds`: the gradient is "
                    "taken with the pipeline's own prompt encoding."
                )
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        for name in _CONDITIONING_ARGUMENTS + adapter.conditioning_arguments:
            value = kwargs.get(name)
            default = self._signature[name].default if name in self._signature else None
            if value is not None and (default is None or value != default):  # arrays: no elementwise ==
                raise ConfigError(
                    f"`{name}={value!r}` changes how the images are conditioned, but the influence gradient encodes "
                    "`prompt` alone with the pipeline's defaults (as the index was built), so its scores would not "
                    f"describe these images. Leave `{name}` unset with `return_influence=True`."
                )
        height, width = adapter.resolution
        if "height" in self._signature:
            kwargs.setdefault("height", height)
            kwargs.setdefault("width", width)
            if (kwargs["height"], kwargs["width"]) != (height, width):
                raise ConfigError(
                    f"The index was built at resolution {(height, width)}, but `height={kwargs['height']}, "
                    f"width={kwargs['width']}` were requested; gradients are only comparable at the index's "
                    "resolution. Leave height/width unset."
                )
        if adapter.num_frames is not None and "num_frames" in self._signature:
            if kwargs.get("num_frames") is None:
                kwargs["num_frames"] = adapter.num_frames
            if kwargs["num_frames"] != adapter.num_frames:
                raise ConfigError(
                    f"The index was built on videos of {adapter.num_frames} frames, but `num_frames="
                    f"{kwargs['num_frames']}` was requested; gradients are only comparable at the index's length. "
                    "Leave num_frames unset."
                )
        for name, value in adapter.pipeline_defaults().items():
            if name in self._signature:
                kwargs.setdefault(name, value)
        return prompts

    def _generate(self, kwargs: dict[str, Any], output_type: str) -> tuple[torch.Tensor, Any]:
        """Run the wrapped pipeline, capturing the final latents of its denoising loop."""
        captured: dict[str, torch.Tensor] = {}
        if "callback_on_step_end" in self._signature:
            user_callback = kwargs.pop("callback_on_step_end", None)
            inputs = list(kwargs.pop("callback_on_step_end_tensor_inputs", None) or ["latents"])
            if user_callback is not None and hasattr(user_callback, "tensor_inputs"):
                inputs = list(user_callback.tensor_inputs)
            if "latents" not in inputs:
                inputs.append("latents")
            kwargs["callback_on_step_end"] = _capturing_callback(user_callback, captured)
            kwargs["callback_on_step_end_tensor_inputs"] = inputs
            output = self.pipeline(output_type=output_type, return_dict=True, **kwargs)
        else:
            scheduler = self.pipeline.scheduler
            step = scheduler.step
            patched_before = "step" in vars(scheduler)  # someone else's patch of this instance: put it back after
            previous = vars(scheduler).get("step")

            def observed_step(*args: Any, **step_kwargs: Any):
                out = step(*args, **step_kwargs)
                captured["latents"] = out.prev_sample if hasattr(out, "prev_sample") else out[0]
                return out

            scheduler.step = observed_step
            try:
                output = self.pipeline(output_type=output_type, return_dict=True, **kwargs)
            finally:
                if patched_before:
                    scheduler.step = previous
                else:
                    del scheduler.step  # back to the class method
        if "latents" not in captured:
            raise ConfigError(
                f"{type(self.pipeline).__name__} finished without a denoising step to capture (num_inference_steps=0?)."
            )
        return self.sketcher.adapter.latents_from_pipeline(captured["latents"].detach()), output


def _capturing_callback(user_callback: Callable | None, captured: dict[str, torch.Tensor]) -> Callable:
    def callback(pipeline: Any, step: int, timestep: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
        if user_callback is not None:
            callback_kwargs = user_callback(pipeline, step, timestep, callback_kwargs) or callback_kwargs
        captured["latents"] = callback_kwargs["latents"]
        return callback_kwargs

    return callback


def _check_top_k(top_k: Any) -> None:
    check_int(top_k, "top_k")


def _as_image_list(images: Any, output_type: str) -> list[PIL.Image.Image | None]:
    """PIL versions of the output images for result grids (None for latents; a video's first frame)."""
    if output_type == "latent":
        return [None] * len(images)
    frames = [_first_frame(image) for image in images]
    return [frame if isinstance(frame, PIL.Image.Image) else to_pil(frame) for frame in frames]


def _first_frame(image: Any) -> Any:
    """A video pipeline's output (a list of PIL frames, an `(F, H, W, C)` array or an `(F, C, H, W)` tensor) -> its
    first frame; images pass through."""
    if isinstance(image, (list, tuple)) or getattr(image, "ndim", 0) == 4:
        return image[0]
    return image
