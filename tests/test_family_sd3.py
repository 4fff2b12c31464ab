"""SD3 / SD3.5 family against `examples/dreambooth/train_dreambooth_lora_sd3.py`, written out here.

The reference loss follows the script's training step: VAE latents `(z - shift_factor) * scaling_factor` (the script
samples the latent distribution; DMin takes its deterministic `mode()`, DESIGN §1), `sigmas`/`timesteps` of a
`FlowMatchEulerDiscreteScheduler` built from the pipeline's scheduler config (`noise_scheduler_copy`), the noisy input
`(1 - s) x0 + s e`, the transformer called with `timestep=timesteps[i]`, `--precondition_outputs` (default 1: the
prediction becomes `model_pred * (-s) + x_t` and the target `x0`; without it the target is `e - x0`), and the weighting
of `compute_loss_weighting_for_sd3` (`logit_normal` by default: weight 1; `cosmap` when asked).
"""

import pytest
import torch

from diffusers_dmin.testing import add_tiny_lora, tiny_sd3_pipeline
from family_checks import (
    check_half_precision_agrees,
    check_return_influence,
    check_self_retrieval,
    check_sketch_matches_reference,
    structured_images,
)


PROMPTS = ["a photo of a cat", "a red square", "the digit three"]


def sd3_reference_loss(weighting_scheme="logit_normal", precondition_outputs=True):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    def loss_fn(pipe, pixels, prompt, noise, t):
        vae = pipe.vae
        with torch.no_grad():
            model_input = vae.encode(pixels).latent_dist.mode()
            model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
            prompt_embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=[prompt], prompt_2=None, prompt_3=None, device="cpu", do_classifier_free_guidance=False
            )
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        i = scheduler.config.num_train_timesteps - 1 - t  # DMin's t (larger = noisier) -> the script's index
        sigmas = scheduler.sigmas[i : i + 1].view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * model_input + sigmas * noise
        pred = pipe.transformer(
            hidden_states=noisy,
            timestep=scheduler.timesteps[i : i + 1],
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            return_dict=False,
        )[0]
        if precondition_outputs:
            pred = pred * (-sigmas) + noisy
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
        target = model_input if precondition_outputs else noise - model_input
        return torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(1, -1), 1)[0]

    return loss_fn


def _lora_pipe():
    pipe = tiny_sd3_pipeline()
    add_tiny_lora(pipe.transformer)
    return pipe


def test_sd3_gradient_is_the_training_scripts_gradient():
    pipe = tiny_sd3_pipeline()
    check_sketch_matches_reference(
        pipe, sd3_reference_loss(), structured_images(3), PROMPTS, params=["transformer_blocks.0.*"]
    )


@pytest.mark.parametrize("precondition_outputs", [True, False])
def test_sd3_lora_gradient_with_cosmap_weighting_and_no_normalisation(precondition_outputs):
    pipe = _lora_pipe()
    sketcher = check_sketch_matches_reference(
        pipe,
        sd3_reference_loss("cosmap", precondition_outputs),
        structured_images(2),
        PROMPTS[:2],
        params="lora",
        weighting_scheme="cosmap",
        normalize="none",
        precondition_outputs=None if precondition_outputs else False,  # the script's default: on
    )
    assert sketcher.spec.objective["weighting"] == "cosmap"
    assert sketcher.spec.objective.get("precondition_outputs", False) is precondition_outputs


def test_sd3_self_retrieval_and_return_influence():
    pipe = _lora_pipe()
    images = structured_images(4)
    prompts = PROMPTS + ["a blue circle"]
    index = check_self_retrieval(pipe, images, prompts)
    check_return_influence(pipe, index, "a photo of a cat")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sd3_half_precision_lora_agrees_with_float32(dtype):
    cosine = check_half_precision_agrees(_lora_pipe, structured_images(2), PROMPTS[:2], dtype=dtype)
    assert cosine > 0.98
