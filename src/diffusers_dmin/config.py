"""`DMinConfig`: everything that decides what a gradient sketch means.

Two sketches are comparable only when they were computed under the same config (and the same model parameters); the
index manifest stores the config, and [`GradientIndex`] refuses queries computed under another one.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

from .errors import ConfigError, check_choice, check_int
from .logging import get_logger


logger = get_logger(__name__)

TIMESTEP_SPACINGS = ("cubic", "uniform")
PARAM_PRESETS = ("auto", "lora", "attention", "all")
DTYPES = ("float16", "bfloat16", "float32")
TARGETS = ("noise", "sample", "v_prediction", "flow")
NORMALIZATIONS = ("timestep", "layer", "none")
WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "cosmap", "sigma_sqrt")
TEXT_ENCODER_PARAMS = ("lora",)
OUTPUT_FUNCTIONS = ("loss", "output_norm")
NOISE_DRAW_COMBINATIONS = ("mean", "separate")
MAX_SKETCH_DIM = 2**24
DEFAULT_NUM_TIMESTEPS = 10

# Fields that only change how sketches are stored, not what they mean.
_STORAGE_ONLY_FIELDS = ("dtype",)
# Objective overrides: written to JSON only when set.
_OPTIONAL_OVERRIDES = (
    "weighting_scheme",
    "guidance_scale",
    "flow_shift",
    "precondition_outputs",
    "text_encoder_params",
)
# Estimator options added after indices were first written: `{field: value an index written without it meant}`.
# A field is written to JSON only when it differs from that value, and a manifest without it reads as that value, so
# an old index keeps its meaning (and fingerprint) whatever the dataclass default becomes.
_LEGACY_VALUES: dict[str, Any] = {
    "sketch_normalize": False,
    "output_function": "loss",
    "noise_draws": "mean",
}


@dataclass(frozen=True)
class DMinConfig:
    r"""
    How DMin turns one (image, prompt) pair into a gradient sketch of shape `(T, K)`.

    Args:
        num_timesteps (`int`, *optional*):
            Number of diffusion timesteps T at which the loss gradient is taken. Defaults to 10 for the named
            spacings and to the length of the list for an explicit `timestep_spacing`.
        timestep_spacing (`str` or `list[int]`, *optional*, defaults to `"cubic"`):
            `"cubic"` picks `t_k = N - 1 - floor(N (k / T)^3)` for `k = 0..T-1` as in the official DMin code (dense
            near pure noise); `"uniform"` picks the centres of T equal bins of `[0, N)`; a list gives the training
            timesteps (integers in `[0, N)`, larger means noisier) explicitly. Duplicates are removed.
        sketch_dim (`int`, *optional*, defaults to 4096):
            K, the number of buckets of the sketch (the paper's `v`). A sketch folds exactly to any divisor of K.
        seed (`int`, *optional*, defaults to 0):
            Seeds the sketch's permutation and signs and the fixed noise.
        params (`str` or `list[str]`, *optional*, defaults to `"auto"`):
            Which denoiser parameters the gradient covers: `"auto"` (the LoRA parameters when a PEFT adapter is
            loaded, else `"attention"`), `"lora"`, `"attention"` (the `transformer_blocks` of transformers and
            cross-attention UNets, the `attentions` blocks of a `UNet2DModel`, HiDream's `*_stream_blocks`, Lumina 2's
            `layers`), `"all"`, or a list of `fnmatch` patterns matched against full parameter names (e.g.
            `["*.attn1.*", "mid_block.*"]`).
        dtype (`str`, *optional*, defaults to `"float16"`):
            Storage dtype of the sketches in an index: `"float16"`, `"bfloat16"` or `"float32"`. Sketches are always
            computed in float32.
        target (`str`, *optional*):
            Override of the regression target. By default it is the scheduler's training target (epsilon,
            v_prediction, sample, or `noise - x0` for flow matching). `"noise"` regresses onto the noise for every
            family, which reproduces the official DMin code for SD3; `"sample"`, `"v_prediction"` and `"flow"`
            (`noise - x0`) are the other choices.
        normalize (`str`, *optional*, defaults to `"layer"`):
            `"layer"` L2-normalises each parameter tensor's gradient first and then the whole timestep gradient (best
            in benchmarks/QUALITY.md; tensors whose gradient is below 1e-5 of the largest one, such as attention key
            biases whose true gradient is zero, are left out rather than amplified), `"timestep"` L2-normalises each
            timestep's gradient (the paper's DMin), `"none"` keeps raw gradients (the paper's ablation).
        num_noise_draws (`int`, *optional*, defaults to 1):
            Number of fixed noise tensors R. Each (timestep, draw) gradient is normalised on its own (per draw, as
            `normalize` says); `noise_draws` says how the R draws are combined.
        noise_draws (`str`, *optional*, defaults to `"mean"`):
            `"mean"`: a timestep's sketch is the mean of its R per-draw normalised sketches (scores then contain
            cross-draw terms `<q_r, x_s>`). `"separate"`: the K buckets are split into R blocks of K/R, block r holds
            the K/R-sketch of draw r scaled by `1/sqrt(R)`, so the score is the mean over draws of the per-draw scores
            `<q_r, x_r>` (matched noise only, as SNR-LDS scores several draws) at the storage of one K-sketch; needs
            R to divide K, and a search may fold it only to sizes K' that R divides (each block folds on its own).
        sketch_normalize (`bool`, *optional*, defaults to `False`):
            Divide each timestep's final sketch (after combining the noise draws) by its own L2 norm, so a score is a
            sum of cosines of sketches rather than of sketched unit vectors (whose norms the sketch distorts by about
            `1/sqrt(K)`). With `noise_draws="separate"` each draw's block is normalised to `1/sqrt(R)`. Dense
            gradients ([`GradientSketcher.full_gradients`]) are normalised the same way per timestep. A sketch folded
            to fewer buckets ([`fold_sketch`]) is no longer unit-norm; fold with `renormalize=True`.
        output_function (`str`, *optional*, defaults to `"loss"`):
            The function whose gradient is taken: `"loss"` (the training loss, DMin) or `"output_norm"` (D-TRAK's
            `||prediction||^2`, the mean square of the denoiser's output times the family's sign, with no target and
            no loss weighting).
        resolution (`int` or `tuple[int, int]`, *optional*):
            Image resolution `(height, width)` the gradients are taken at; defaults to the model's native size.
        weighting_scheme (`str`, *optional*):
            Override of the model family's loss weighting (`"none"`, `"logit_normal"`, `"mode"`, `"cosmap"`,
            `"sigma_sqrt"`, as the diffusers scripts' `--weighting_scheme`), for flow-matching models trained with
            another trainer. Defaults to the family's training script (see `diffusers_dmin.families`). A per-timestep
            weight cancels under `normalize="timestep"`/`"layer"`; it changes sketches with `normalize="none"`.
        guidance_scale (`float`, *optional*):
            Override of the guidance value given to guidance-distilled denoisers (FLUX.1-dev) in the training loss;
            defaults to the family's script default (3.5 for Flux). Refused for denoisers without a guidance embedding.
        flow_shift (`float`, *optional*):
            Override of the static shift of the flow-matching training sigmas; defaults to the family's script (the
            scheduler config's shift, or the script's explicit one).
        precondition_outputs (`bool`, *optional*):
            Override of the family's `--precondition_outputs` (SD3/3.5's script default is on: the loss regresses
            `x_t - s * output` onto `x0`, which is the flow loss weighted by `s^2`); `False` for models trained
            without it. Like every per-timestep weight it changes sketches only with `normalize="none"`.
        text_encoder_params (`str`, *optional*):
            `"lora"` adds the LoRA parameters of the active adapters of the pipeline's text encoder(s) to the gradient
            (for LoRAs trained with `--train_text_encoder`); their names are prefixed with the component, e.g.
            `text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.default_0.weight`. The prompt is then
            encoded with autograd for the loss (once per prompt and micro-batch in the `"vmap"` engine, whose
            per-pair gradients w.r.t. the prompt embeddings are pulled back through the text encoder; once per pair in
            the `"loop"` engine). Defaults to the denoiser's parameters only.

    Examples:
    ```py
    >>> from diffusers_dmin import DMinConfig
    >>> config = DMinConfig(num_timesteps=5, sketch_dim=1024, seed=0)
    >>> DMinConfig.from_json(config.to_json()) == config
    True
    ```
    """

    num_timesteps: int | None = None
    timestep_spacing: Literal["cubic", "uniform"] | tuple[int, ...] = "cubic"
    sketch_dim: int = 4096
    seed: int = 0
    params: Literal["auto", "lora", "attention", "all"] | tuple[str, ...] = "auto"
    dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    target: Literal["noise", "sample", "v_prediction", "flow"] | None = None
    normalize: Literal["timestep", "layer", "none"] = "layer"
    num_noise_draws: int = 1
    noise_draws: Literal["mean", "separate"] = "mean"
    sketch_normalize: bool = False
    output_function: Literal["loss", "output_norm"] = "loss"
    resolution: tuple[int, int] | None = None
    weighting_scheme: Literal["none", "logit_normal", "mode", "cosmap", "sigma_sqrt"] | None = None
    guidance_scale: float | None = None
    flow_shift: float | None = None
    precondition_outputs: bool | None = None
    text_encoder_params: Literal["lora"] | None = None

    def __post_init__(self):
        set_ = object.__setattr__  # frozen dataclass: canonicalise in place once

        spacing = self.timestep_spacing
        if isinstance(spacing, str):
            if spacing not in TIMESTEP_SPACINGS:
                raise ConfigError(
                    f"`timestep_spacing` must be one of {TIMESTEP_SPACINGS} or a list of integer timesteps, but is "
                    f"{spacing!r}."
                )
            num = DEFAULT_NUM_TIMESTEPS if self.num_timesteps is None else self.num_timesteps
        elif isinstance(spacing, Sequence):
            spacing = tuple(spacing)
            if not spacing or not all(_is_int(t) and t >= 0 for t in spacing):
                raise ConfigError(
                    f"An explicit `timestep_spacing` must be a non-empty list of non-negative integers, but is "
                    f"{list(spacing)!r}. Example: `timestep_spacing=[900, 500, 100]`."
                )
            spacing = tuple(int(t) for t in spacing)
            if len(set(spacing)) != len(spacing):
                duplicates = sorted({t for t in spacing if spacing.count(t) > 1})
                raise ConfigError(
                    f"`timestep_spacing` lists the timesteps {duplicates} more than once; list each timestep once."
                )
            if self.num_timesteps is not None and self.num_timesteps != len(spacing):
                raise ConfigError(
                    f"`num_timesteps={self.num_timesteps!r}` disagrees with the {len(spacing)} timesteps given in "
                    "`timestep_spacing`; leave `num_timesteps` unset when you list the timesteps."
                )
            num = len(spacing)
            set_(self, "timestep_spacing", spacing)
        else:
            raise ConfigError(
                f"`timestep_spacing` must be 'cubic', 'uniform' or a list of integers, but is {spacing!r} "
                f"(type {type(spacing).__name__})."
            )
        if not _is_int(num) or num < 1:
            raise ConfigError(f"`num_timesteps` must be a positive integer, but is {num!r}.")
        set_(self, "num_timesteps", int(num))

        if not _is_int(self.sketch_dim) or not 1 <= self.sketch_dim <= MAX_SKETCH_DIM:
            raise ConfigError(
                f"`sketch_dim` must be an integer in [1, {MAX_SKETCH_DIM}], but is {self.sketch_dim!r}. "
                "The paper uses 4096 (2**12) or 65536 (2**16)."
            )
        if not _is_int(self.seed) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"`seed` must be an integer in [0, 2**63), but is {self.seed!r}.")

        params = self.params
        if isinstance(params, str):
            if params not in PARAM_PRESETS:
                raise ConfigError(
                    f"`params` must be one of {PARAM_PRESETS} or a list of parameter-name patterns, but is {params!r}. "
                    "For a single pattern write `params=['*attn*']`."
                )
        elif isinstance(params, Sequence) and params and all(isinstance(p, str) and p for p in params):
            set_(self, "params", tuple(params))
        else:
            raise ConfigError(
                f"`params` must be one of {PARAM_PRESETS} or a non-empty list of non-empty strings, but is {params!r}."
            )

        if self.dtype not in DTYPES:
            raise ConfigError(f"`dtype` must be one of {DTYPES}, but is {self.dtype!r}.")
        if self.target is not None and self.target not in TARGETS:
            raise ConfigError(
                f"`target` must be None (the scheduler's training target) or one of {TARGETS}, but is {self.target!r}."
            )
        if self.normalize not in NORMALIZATIONS:
            raise ConfigError(f"`normalize` must be one of {NORMALIZATIONS}, but is {self.normalize!r}.")
        if not _is_int(self.num_noise_draws) or self.num_noise_draws < 1:
            raise ConfigError(f"`num_noise_draws` must be a positive integer, but is {self.num_noise_draws!r}.")
        if self.noise_draws not in NOISE_DRAW_COMBINATIONS:
            raise ConfigError(f"`noise_draws` must be one of {NOISE_DRAW_COMBINATIONS}, but is {self.noise_draws!r}.")
        if self.noise_draws == "separate" and self.sketch_dim % self.num_noise_draws:
            raise ConfigError(
                f"`noise_draws='separate'` splits the {self.sketch_dim} buckets into one block per draw, so "
                f"`num_noise_draws={self.num_noise_draws}` must divide `sketch_dim`; use a power of two for both."
            )
        if not isinstance(self.sketch_normalize, bool):
            raise ConfigError(f"`sketch_normalize` must be True or False, but is {self.sketch_normalize!r}.")
        if self.output_function not in OUTPUT_FUNCTIONS:
            raise ConfigError(
                f"`output_function` must be one of {OUTPUT_FUNCTIONS} ('loss': DMin's training loss, 'output_norm': "
                f"D-TRAK's squared output norm), but is {self.output_function!r}."
            )

        if self.weighting_scheme is not None and self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ConfigError(
                f"`weighting_scheme` must be None (the model family's) or one of {WEIGHTING_SCHEMES}, but is "
                f"{self.weighting_scheme!r}."
            )
        if self.precondition_outputs is not None and not isinstance(self.precondition_outputs, bool):
            raise ConfigError(
                f"`precondition_outputs` must be None (the model family's), True or False, but is "
                f"{self.precondition_outputs!r}."
            )
        if self.text_encoder_params is not None and self.text_encoder_params not in TEXT_ENCODER_PARAMS:
            raise ConfigError(
                f"`text_encoder_params` must be None (the denoiser's parameters only) or one of {TEXT_ENCODER_PARAMS}, "
                f"but is {self.text_encoder_params!r}."
            )
        for name in ("guidance_scale", "flow_shift"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"`{name}` must be None or a finite number, but is {value!r}.")
            if value < 0 or (name == "flow_shift" and value == 0):
                raise ConfigError(
                    f"`{name}` must be {'positive' if name == 'flow_shift' else '>= 0'}, but is {value!r}."
                )
            set_(self, name, float(value))

        resolution = self.resolution
        if resolution is not None:
            if _is_int(resolution):
                resolution = (resolution, resolution)
            if (
                not isinstance(resolution, Sequence)
                or len(resolution) != 2
                or not all(_is_int(r) and r > 0 for r in resolution)
            ):
                raise ConfigError(
                    f"`resolution` must be a positive integer or a (height, width) pair, but is {self.resolution!r}."
                )
            set_(self, "resolution", (int(resolution[0]), int(resolution[1])))

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists; objective overrides only when set and estimator options only when
        they differ from what an index written before them meant, so that such configs and manifests stay identical)."""
        data = asdict(self)
        for key in _OPTIONAL_OVERRIDES:
            if data[key] is None:
                del data[key]
        for key, legacy in _LEGACY_VALUES.items():
            if data[key] == legacy:
                del data[key]
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        return data

    def to_json(self) -> str:
        """Canonical JSON (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=2)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DMinConfig:
        """Inverse of [`to_dict`]. Unknown keys are ignored with a warning (an index from a newer version); a missing
        estimator option reads as the value indices written before it meant (`_LEGACY_VALUES`), not as the default."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"`DMinConfig.from_dict` needs a mapping, but got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            logger.warning(
                f"Ignoring unknown DMinConfig keys {unknown}: they were probably written by a newer diffusers_dmin. "
                "Upgrade with `pip install -U diffusers-dmin` if results look wrong."
            )
        return cls(**{**_LEGACY_VALUES, **{k: v for k, v in data.items() if k in known}})

    @classmethod
    def from_json(cls, text: str) -> DMinConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ConfigError(f"`DMinConfig.from_json` got invalid JSON: {err}.") from err
        return cls.from_dict(data)

    # ------------------------------------------------------------------ identity

    def fingerprint(self) -> str:
        """16 hex characters identifying every field that changes what a sketch means (all but `dtype`)."""
        data = {k: v for k, v in self.to_dict().items() if k not in _STORAGE_ONLY_FIELDS}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def differences(self, other: DMinConfig, *, ignore: Sequence[str] = _STORAGE_ONLY_FIELDS) -> dict[str, tuple]:
        """Fields whose values differ, as `{name: (self_value, other_value)}`."""
        mine, theirs = {**_LEGACY_VALUES, **self.to_dict()}, {**_LEGACY_VALUES, **other.to_dict()}
        names = [f.name for f in fields(self)]
        return {k: (mine.get(k), theirs.get(k)) for k in names if k not in ignore and mine.get(k) != theirs.get(k)}

    def replace(self, **changes: Any) -> DMinConfig:
        """A copy with some fields changed (validated again)."""
        data = asdict(self)
        if "timestep_spacing" in changes and "num_timesteps" not in changes:
            data["num_timesteps"] = None
        data.update(changes)
        return DMinConfig(**data)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SketchSpec:
    r"""
    Everything two sketches must share to be comparable: the [`DMinConfig`] plus what it resolves to on a model.

    [`GradientSketcher`] exposes its spec as `sketcher.spec`; the index manifest stores the spec of its rows, and
    [`GradientIndex`] refuses queries whose spec differs ([`IndexMismatchError`] names the fields).

    Args:
        config (`DMinConfig`): The configuration.
        family (`str`): The denoiser family, e.g. `"unet2d"`, `"unet2d_condition"`, `"sdxl"`, `"sd3"`.
        target (`str`): The regression target used: `"epsilon"`/`"noise"`, `"v_prediction"`, `"sample"` or `"flow"`.
        timesteps (`tuple[int, ...]`): The training timesteps, after spacing and de-duplication (length T).
        latent_shape (`tuple[int, ...]`): Shape `(C, H, W)` of one latent (the fixed noise's shape).
        param_names (`tuple[str, ...]`): Names of the selected denoiser parameters, in sketch order.
        input_dim (`int`): D, the number of selected scalar parameters.
        param_fingerprint (`str`): Hash of the selected parameters' names, shapes and values.
        objective (`dict`, *optional*): The model family's training-script conventions the loss used
            (`ObjectiveConventions.to_dict()`, with the config's overrides applied). `None` in indices written before
            it was recorded; then it is not compared.
        model_fingerprint (`str`, *optional*): Hash of every parameter of the denoiser, text encoders and VAE
            ([`~gradients.fingerprint_modules`]); `None` in indices written before it existed (then only the selected
            parameters are compared).
        adapters (`dict`, *optional*): The LoRA adapters active in the pipeline's denoiser and text encoders and their
            `set_adapters` weights, `{component: {adapter_name: weight}}` (e.g. `{"unet": {"a": 0.7, "b": 0.3}}`;
            `{}` without LoRA). They change the model's output, so a query whose adapters differ is refused. `None` in
            indices written before it was recorded; then it is not compared.
    """

    config: DMinConfig
    family: str
    target: str
    timesteps: tuple[int, ...]
    latent_shape: tuple[int, ...]
    param_names: tuple[str, ...]
    input_dim: int
    param_fingerprint: str
    objective: Mapping[str, Any] | None = None
    model_fingerprint: str | None = None
    adapters: Mapping[str, Mapping[str, float | str]] | None = None

    def __post_init__(self):
        for name in ("timesteps", "latent_shape", "param_names"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.adapters is not None:
            object.__setattr__(self, "adapters", _adapters_dict(self.adapters))

    @property
    def num_timesteps(self) -> int:
        """T, the number of rows of one sketch."""
        return len(self.timesteps)

    @property
    def param_names_hash(self) -> str:
        return hashlib.sha256("\n".join(self.param_names).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config.to_dict(),
            "family": self.family,
            "target": self.target,
            "timesteps": list(self.timesteps),
            "latent_shape": list(self.latent_shape),
            "param_names": list(self.param_names),
            "input_dim": self.input_dim,
            "param_fingerprint": self.param_fingerprint,
            **({"objective": dict(self.objective)} if self.objective is not None else {}),
            "model_fingerprint": self.model_fingerprint,
            **({"adapters": {k: dict(v) for k, v in self.adapters.items()}} if self.adapters is not None else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SketchSpec:
        try:
            return cls(
                config=DMinConfig.from_dict(data["config"]),
                family=str(data["family"]),
                target=str(data["target"]),
                timesteps=tuple(int(t) for t in data["timesteps"]),
                latent_shape=tuple(int(s) for s in data["latent_shape"]),
                param_names=tuple(str(n) for n in data["param_names"]),
                input_dim=int(data["input_dim"]),
                param_fingerprint=str(data["param_fingerprint"]),
                objective=_objective_dict(data.get("objective")),
                model_fingerprint=None if data.get("model_fingerprint") is None else str(data["model_fingerprint"]),
                adapters=data.get("adapters"),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(
                f"Malformed sketch spec ({type(err).__name__}: {err}); expected the keys of `SketchSpec.to_dict()`."
            ) from err

    def differences(self, other: SketchSpec, *, ignore: Sequence[str] = ("dtype", "sketch_dim")) -> dict[str, tuple]:
        """Differing fields as `{name: (self_value, other_value)}`; config fields are prefixed `config.`.

        `sketch_dim` is ignored by default because sketches fold ([`fold_sketch`]); callers check divisibility.
        """
        diffs = {f"config.{k}": v for k, v in self.config.differences(other.config, ignore=ignore).items()}
        for name in ("family", "target", "timesteps", "latent_shape", "input_dim", "param_fingerprint"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                diffs[name] = (mine, theirs)
        if self.objective is not None and other.objective is not None:
            mine, theirs = _objective_identity(self.objective), _objective_identity(other.objective)
            for key in sorted(set(mine) | set(theirs)):
                if mine.get(key) != theirs.get(key):
                    diffs[f"objective.{key}"] = (mine.get(key), theirs.get(key))
        # the rest of the model (unselected weights, base under an adapter, text encoders, VAE); not repeated when the
        # selected parameters already differ
        if None not in (self.model_fingerprint, other.model_fingerprint) and "param_fingerprint" not in diffs:
            if self.model_fingerprint != other.model_fingerprint:
                diffs["model_fingerprint"] = (self.model_fingerprint, other.model_fingerprint)
        if self.adapters is not None and other.adapters is not None:
            for component in sorted(set(self.adapters) | set(other.adapters)):
                mine, theirs = self.adapters.get(component, {}), other.adapters.get(component, {})
                if mine != theirs:
                    diffs[f"adapters.{component}"] = (mine or "no LoRA", theirs or "no LoRA")
        if self.param_names != other.param_names:
            diffs["param_names"] = (
                f"{len(self.param_names)} names (hash {self.param_names_hash})",
                f"{len(other.param_names)} names (hash {other.param_names_hash})",
            )
        return diffs


def _objective_dict(value: Any) -> dict[str, Any] | None:
    """A manifest's `objective` entry: `None` (not recorded) or a flat dict of JSON scalars."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool))) for k, v in value.items()
    ):
        raise ValueError(f"`objective` must be a flat mapping of names to numbers/strings, but is {value!r}")
    return dict(value)


def _adapters_dict(value: Any) -> dict[str, dict[str, float | str]]:
    """A manifest's `adapters` entry: `{component: {adapter_name: weight}}`, weights numbers or strings."""
    if not isinstance(value, Mapping) or not all(
        isinstance(component, str)
        and isinstance(weights, Mapping)
        and all(
            isinstance(k, str) and isinstance(v, (int, float, str)) and not isinstance(v, bool)
            for k, v in weights.items()
        )
        for component, weights in value.items()
    ):
        raise ValueError(f"`adapters` must map components to {{adapter name: weight}}, but is {value!r}")
    return {
        component: {k: (float(v) if not isinstance(v, str) else v) for k, v in weights.items()}
        for component, weights in value.items()
    }


def _objective_identity(objective: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a recorded objective that change the gradient (the script name is documentation)."""
    return {k: v for k, v in objective.items() if k != "script"}


@dataclass(frozen=True)
class SketcherOptions:
    r"""
    How a [`GradientSketcher`] runs: options that change speed and memory, never the sketches (so they are not part of
    the [`SketchSpec`], and an index can be extended with other options). One value travels from
    `GradientIndex.build(sketcher_kwargs=...)`, `InfluencePipeline(...)` and the CLI to the sketcher.

    Args:
        mode (`str`, *optional*, defaults to `"auto"`): `"vmap"` (per-sample gradients batched with `torch.func`),
            `"loop"` (one backward pass per sample and timestep) or `"auto"` (vmap where it pays and works).
        max_pairs_per_batch (`int`, *optional*, defaults to 64): (sample, timestep) pairs per vmap micro-batch.
        gradient_memory_bytes (`int`, *optional*, defaults to 1 GiB): Memory for the per-pair gradients of one vmap
            micro-batch (caps `max_pairs_per_batch`).
        table_budget_bytes (`int`, *optional*, defaults to 256 MiB): Memory for cached sketch tables.
        num_threads (`int`, *optional*): Torch intra-op threads while gradients are computed: `None` (default) reads
            `DMIN_NUM_THREADS`, else 1 on the CPU and torch's setting on accelerators; `0` keeps torch's setting (see
            [`threads`]).
    """

    mode: Literal["auto", "vmap", "loop"] = "auto"
    max_pairs_per_batch: int = 64
    gradient_memory_bytes: int = 2**30
    table_budget_bytes: int = 256 * 2**20
    num_threads: int | None = None

    def __post_init__(self):
        check_choice(self.mode, "mode", ("auto", "vmap", "loop"))
        check_int(self.max_pairs_per_batch, "max_pairs_per_batch")
        check_int(self.gradient_memory_bytes, "gradient_memory_bytes")
        check_int(self.table_budget_bytes, "table_budget_bytes", minimum=0)

    @classmethod
    def from_value(cls, value: SketcherOptions | Mapping[str, Any] | None, **overrides: Any) -> SketcherOptions:
        """`value` as options: a `SketcherOptions`, a dict of its fields (e.g. `sketcher_kwargs`), or `None` (the
        defaults); `overrides` replace single fields. Unknown names raise [`ConfigError`] listing the known ones."""
        if isinstance(value, SketcherOptions):
            data = asdict(value)
        elif value is None:
            data = {}
        elif isinstance(value, Mapping):
            data = dict(value)
        else:
            raise ConfigError(
                f"Sketcher options must be a SketcherOptions or a dict of its fields, but are {type(value).__name__}."
            )
        data.update(overrides)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown sketcher option(s) {unknown}; the options are {sorted(known)}.")
        return cls(**data)
