"""SD3.5 (`StableDiffusion3Pipeline` with an SD3.5-style `SD3Transformer2DModel`: `qk_norm="rms_norm"`, MMDiT-X
`dual_attention_layers`, patch size 2) against `examples/dreambooth/train_dreambooth_lora_sd3.py`, written out here.

The script trains SD3 and SD3.5 alike: VAE latents `(z - shift_factor) * scaling_factor` (DMin takes the deterministic
`mode()`), sigmas/timesteps of a `FlowMatchEulerDiscreteScheduler` built from the checkpoint's scheduler config (static
shift 3.0 in the SD3.5 Large/Medium configs), `x_t = (1 - s) x0 + s e`, the transformer called with
`timestep=timesteps[i]`, `--precondition_outputs` 1 (prediction `model_pred * (-s) + x_t`, target `x0`),
`--weighting_scheme logit_normal` (loss weight 1; `cosmap` when asked).
"""

import pytest
import torch

from diffusers_dmin import DMinConfig, GradientSketcher, InfluencePipeline
from diffusers_dmin.families import SD3Adapter, adapter_for_pipeline
from diffusers_dmin.testing import add_tiny_lora, tiny_sd35_pipeline
from family_checks import (
    check_half_precision_agrees,
    check_return_influence,
    check_self_retrieval,
    check_sketch_matches_reference,
    structured_images,
)
from test_family_sd3 import sd3_reference_loss


PROMPTS = ["a photo of a cat", "a red square", "the digit three"]


# SD3 and SD3.5 are trained by the same script: the reference loss is test_family_sd3's, written out from it
sd35_reference_loss = sd3_reference_loss


def _lora_pipe():
    pipe = tiny_sd35_pipeline()
    add_tiny_lora(pipe.transformer)  # to_q/k/v/out of both the joint attention and the dual (attn2) attention
    return pipe


def test_sd35_transformer_is_the_sd3_family_with_the_scripts_conventions():
    pipe = tiny_sd35_pipeline()
    config = pipe.transformer.config
    assert config.qk_norm == "rms_norm" and tuple(config.dual_attention_layers) == (0,) and config.patch_size == 2
    adapter = adapter_for_pipeline(pipe)
    assert isinstance(adapter, SD3Adapter) and adapter.latent_shape == (4, 8, 8)
    conventions = adapter.conventions
    # train_dreambooth_lora_sd3.py: --weighting_scheme logit_normal, --precondition_outputs 1, sigmas of the
    # checkpoint's scheduler config (shift 3.0), timestep = sigma * 1000, target e - x0 (before preconditioning)
    assert conventions.weighting == "logit_normal" and conventions.precondition_outputs is True
    assert conventions.shift is None and pipe.scheduler.config.shift == 3.0
    assert conventions.timestep_scale == 1.0 and conventions.prediction_sign == 1.0 and conventions.guidance is None
    assert adapter.conventions.interpolation == "noise_at_one"


def test_sd35_gradient_is_the_training_scripts_gradient():
    pipe = tiny_sd35_pipeline()
    # the first block: joint attention, dual attention (attn2) and their RMS norms
    sketcher = check_sketch_matches_reference(
        pipe, sd35_reference_loss(), structured_images(3), PROMPTS, params=["transformer_blocks.0.*"]
    )
    assert any(".attn2." in n for n in sketcher.param_names) and any("norm_q" in n for n in sketcher.param_names)


@pytest.mark.parametrize("precondition_outputs", [True, False])
def test_sd35_lora_gradient_with_preconditioning_and_no_normalisation(precondition_outputs):
    # normalize="none" keeps the per-timestep weights: the preconditioning's s^2 and cosmap's weight
    sketcher = check_sketch_matches_reference(
        _lora_pipe(),
        sd35_reference_loss("cosmap", precondition_outputs),
        structured_images(2),
        PROMPTS[:2],
        params="lora",
        weighting_scheme="cosmap",
        normalize="none",
        precondition_outputs=None if precondition_outputs else False,
    )
    assert any(".attn2." in n for n in sketcher.param_names)


def test_sd35_self_retrieval_and_return_influence():
    pipe = _lora_pipe()
    images = structured_images(4)
    prompts = PROMPTS + ["a blue circle"]
    index = check_self_retrieval(pipe, images, prompts)
    check_return_influence(pipe, index, "a photo of a cat")


def test_sd35_latents_from_the_pipeline_are_its_own_latents():
    pipe = tiny_sd35_pipeline()
    kwargs = dict(prompt="a red square", num_inference_steps=2, height=16, width=16)
    latents = pipe(output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images
    config = DMinConfig(num_timesteps=2, sketch_dim=64)
    wrapped = InfluencePipeline.__new__(InfluencePipeline)  # only the capture: no index needed
    wrapped.pipeline, wrapped.sketcher = pipe, GradientSketcher.from_pipeline(pipe, config)
    wrapped._signature = __import__("inspect").signature(pipe.__call__).parameters
    captured, _ = wrapped._generate(dict(kwargs, generator=torch.Generator().manual_seed(0)), "latent")
    assert captured.shape == (1, *wrapped.sketcher.adapter.latent_shape)
    torch.testing.assert_close(captured, latents)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_sd35_half_precision_lora_agrees_with_float32(dtype):
    cosine = check_half_precision_agrees(_lora_pipe, structured_images(2), PROMPTS[:2], dtype=dtype)
    print(f"SD3.5 LoRA {dtype} vs float32: min cosine {cosine:.5f}")
    assert cosine > 0.99
