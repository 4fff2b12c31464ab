"""Lumina-Image 2.0 family against `examples/dreambooth/train_dreambooth_lora_lumina2.py`, written out here.

The reference loss follows the script's training step: VAE latents `(z - shift_factor) * scaling_factor` (the script
samples the latent distribution; DMin takes its deterministic `mode()`), the caption through the pipeline's
`encode_prompt(prompt, max_sequence_length=256, system_prompt=None)` (embeddings and attention mask), `timesteps =
noise_scheduler_copy.timesteps[indices]` of a `FlowMatchEulerDiscreteScheduler` built from the pipeline's scheduler
config, `sigmas` looked up by timestep as the script's `get_sigmas` does, the REVERSED interpolation
`(1 - s) e + s x0`, the transformer called with `timesteps / num_train_timesteps`, target `x0 - e`, and the weighting
of `compute_loss_weighting_for_sd3` (`none` by default).
"""

import pytest
import torch

from diffusers_dmin import DMinConfig, GradientSketcher
from diffusers_dmin.testing import add_tiny_lora, tiny_lumina2_pipeline
from family_checks import (
    check_half_precision_agrees,
    check_return_influence,
    check_self_retrieval,
    check_sketch_matches_reference,
    structured_images,
)


PROMPTS = ["a photo of a cat", "a red square", "the digit three"]
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the script's default `--lora_layers`


def lumina2_reference_loss(weighting_scheme="none"):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    def loss_fn(pipe, pixels, prompt, noise, t):
        vae = pipe.vae
        with torch.no_grad():
            model_input = vae.encode(pixels).latent_dist.mode()
            model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
            prompt_embeds, prompt_attention_mask, _, _ = pipe.encode_prompt(
                [prompt], max_sequence_length=256, system_prompt=None, device="cpu"
            )
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        # DMin's t (larger is noisier) -> the script's `indices`: sigma = 1 is the clean image under Lumina 2's reversed
        # lerp, so the noisiest t takes the smallest sigma, index t itself
        index = t
        timesteps = scheduler.timesteps[[index]]
        step = [(scheduler.timesteps == s).nonzero().item() for s in timesteps]  # the script's get_sigmas
        sigmas = scheduler.sigmas[step].view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * noise + sigmas * model_input  # Lumina2 reverses the lerp
        pred = pipe.transformer(
            hidden_states=noisy,
            encoder_hidden_states=prompt_embeds,
            encoder_attention_mask=prompt_attention_mask,
            timestep=timesteps / scheduler.config.num_train_timesteps,
            return_dict=False,
        )[0]
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
        target = model_input - noise
        return torch.mean((weighting.float() * (pred.float() - target.float()) ** 2).reshape(1, -1), 1)[0]

    return loss_fn


def _lora_pipe():
    pipe = tiny_lumina2_pipeline()
    add_tiny_lora(pipe.transformer, target_modules=LORA_TARGETS)
    return pipe


def test_lumina2_gradient_is_the_training_scripts_gradient():
    pipe = tiny_lumina2_pipeline()
    sketcher = check_sketch_matches_reference(pipe, lumina2_reference_loss(), structured_images(3, 32), PROMPTS)
    assert sketcher.adapter.family == "lumina2"
    assert sketcher.spec.objective["interpolation"] == "data_at_one"
    assert sketcher.spec.objective["timestep_scale"] == 1e-3


def test_lumina2_lora_gradient_with_cosmap_weighting_and_no_normalisation():
    sketcher = check_sketch_matches_reference(
        _lora_pipe(),
        lumina2_reference_loss("cosmap"),
        structured_images(2, 32),
        PROMPTS[:2],
        params="lora",
        weighting_scheme="cosmap",
        normalize="none",
    )
    assert sketcher.spec.objective["weighting"] == "cosmap"


def test_lumina2_self_retrieval_and_return_influence():
    pipe = _lora_pipe()
    images = structured_images(4, 32)
    index = check_self_retrieval(pipe, images, PROMPTS + ["a blue circle"])
    check_return_influence(pipe, index, "a photo of a cat")


def test_lumina2_pipeline_latents_are_the_vae_layout():
    """What `callback_on_step_end` sees is what the VAE decodes (after `/ scaling_factor + shift_factor`), and is what
    the sketcher takes as `latents=`."""
    pipe = tiny_lumina2_pipeline()
    pipe.set_progress_bar_config(disable=True)
    captured = {}

    def callback(pipeline, step, timestep, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    kwargs = dict(prompt="a photo of a cat", num_inference_steps=2, callback_on_step_end=callback)
    images = pipe(output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).images
    sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=2, sketch_dim=64))
    latents = sketcher.adapter.latents_from_pipeline(captured["latents"])
    assert tuple(latents.shape[1:]) == sketcher.adapter.latent_shape == (4, 4, 4)
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), images, atol=1e-5, rtol=0)
    # output_type="latent" returns the same tensor
    plain = pipe(output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(sketcher.adapter.latents_from_pipeline(plain), latents)


def test_lumina2_reloaded_pipeline_with_lora_weights_loaded_like_users_do(tmp_path):
    """`save_pretrained` -> `DiffusionPipeline.from_pretrained` -> `load_lora_weights` (diffusers' PEFT integration,
    as `dmin build --lora-weights` loads them) gives the sketches of the in-memory LoRA pipeline."""
    from diffusers import DiffusionPipeline, Lumina2Pipeline
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_lumina2_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    add_tiny_lora(pipe.transformer, rank=4, alpha=4, seed=1, target_modules=LORA_TARGETS)  # alpha = rank, as loaded
    Lumina2Pipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer)
    )
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    reloaded.load_lora_weights(tmp_path / "lora")
    assert type(reloaded) is Lumina2Pipeline
    config = DMinConfig(num_timesteps=2, sketch_dim=256, params="lora", resolution=(32, 32))
    images = structured_images(2, 32)
    expected = GradientSketcher.from_pipeline(pipe, config)(images=images, prompts=PROMPTS[:2])
    sketches = GradientSketcher.from_pipeline(reloaded, config)(images=images, prompts=PROMPTS[:2])
    torch.testing.assert_close(sketches, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_lumina2_half_precision_lora_agrees_with_float32(dtype):
    cosine = check_half_precision_agrees(_lora_pipe, structured_images(2, 32), PROMPTS[:2], dtype=dtype)
    print(f"lumina2 {dtype} vs float32: min cosine {cosine:.4f}")
    assert cosine > 0.98
