"""Objectives: timesteps, fixed noise, and the per-family training losses against the diffusers training-script
formulas, computed independently here."""

import logging

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F

from diffusers_dmin import ConfigError, DMinConfig, UnsupportedPipelineError
from diffusers_dmin.families import adapter_for_pipeline
from diffusers_dmin.gradients import GradientSketcher
from diffusers_dmin.objectives import (
    Objective,
    fixed_noise,
    images_to_tensor,
    prepare_images,
    select_timesteps,
)
from diffusers_dmin.testing import tiny_ddpm_pipeline, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline


OFFICIAL_CUBIC_10 = (999, 998, 991, 972, 935, 874, 783, 656, 487, 270)


def test_cubic_timesteps_match_the_official_code():
    assert select_timesteps(DMinConfig(num_timesteps=10), 1000) == OFFICIAL_CUBIC_10
    # the official formula, verbatim: x = linspace(0,1,T+1)**3; int(x / x.max() * N)[:-1] into descending timesteps
    x = np.linspace(0, 1, 11) ** 3
    idx = (x / x.max() * 1000).astype(int)[:-1]
    assert tuple(int(t) for t in np.arange(999, -1, -1)[idx]) == OFFICIAL_CUBIC_10


def test_duplicate_timesteps_are_removed_with_a_warning(caplog):
    logging.getLogger("diffusers_dmin").propagate = True
    try:
        with caplog.at_level(logging.WARNING, logger="diffusers_dmin"):
            timesteps = select_timesteps(DMinConfig(num_timesteps=20), 1000)
    finally:
        logging.getLogger("diffusers_dmin").propagate = False
    assert len(timesteps) == len(set(timesteps)) < 20
    assert "repeats" in caplog.text


def test_uniform_and_explicit_timesteps():
    assert select_timesteps(DMinConfig(num_timesteps=4, timestep_spacing="uniform"), 1000) == (875, 625, 375, 125)
    assert select_timesteps(DMinConfig(timestep_spacing=[10, 900, 500]), 1000) == (900, 500, 10)
    with pytest.raises(ConfigError, match="outside"):
        select_timesteps(DMinConfig(timestep_spacing=[1000]), 1000)


def test_fixed_noise_is_seeded_on_cpu_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = fixed_noise(5, (1, 4, 4), 2)
    assert torch.equal(torch.rand(1), expected_next)
    assert a.shape == (2, 1, 4, 4) and a.device.type == "cpu" and a.dtype == torch.float32
    assert torch.equal(a, fixed_noise(5, (1, 4, 4), 2))
    assert not torch.equal(a, fixed_noise(6, (1, 4, 4), 2))


# ---------------------------------------------------------------------------------------------- losses per family


def _sketcher(pipe, **config):
    return GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=3, sketch_dim=64, **config))


@pytest.mark.parametrize(
    "scheduler,prediction_type", [("ddpm", "epsilon"), ("ddim", "v_prediction"), ("ddpm", "sample")]
)
def test_ddpm_family_loss_matches_training_script(scheduler, prediction_type):
    pipe = tiny_ddpm_pipeline(scheduler=scheduler, prediction_type=prediction_type)
    sketcher = _sketcher(pipe)
    images = torch.rand(2, 1, 16, 16)
    losses = sketcher.losses(images=images)
    assert losses.shape == (2, 3)

    # train_unconditional.py, computed by hand: x_t = sqrt(a) x0 + sqrt(1 - a) e, MSE against the target
    x0 = images * 2 - 1
    noise = sketcher.noise[0]
    alphas = pipe.scheduler.alphas_cumprod
    for j, t in enumerate(sketcher.timesteps):
        a = alphas[t]
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        target = {
            "epsilon": noise.expand_as(x0),
            "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0,
            "sample": x0,
        }[prediction_type]
        with torch.no_grad():
            pred = pipe.unet(noisy, torch.full((2,), t)).sample
        expected = ((pred - target) ** 2).flatten(1).mean(1)
        torch.testing.assert_close(losses[:, j], expected, rtol=1e-4, atol=1e-6)


def test_stable_diffusion_loss_matches_training_script():
    pipe = tiny_sd_pipeline()
    sketcher = _sketcher(pipe)
    images = torch.rand(2, 3, 16, 16)
    prompts = ["a photo of a cat", "a red square"]
    losses = sketcher.losses(images=images, prompts=prompts)

    # train_text_to_image.py: latents = vae.encode(x).latent_dist (mode here) * scaling_factor; text from CLIP
    with torch.no_grad():
        latents = pipe.vae.encode(images * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        text = pipe.text_encoder(ids.input_ids)[0]
        noise = sketcher.noise[0].expand_as(latents)
        for j, t in enumerate(sketcher.timesteps):
            timesteps = torch.full((2,), t)
            a = pipe.scheduler.alphas_cumprod[t]
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # DDPMScheduler.add_noise, as the script noises
            pred = pipe.unet(noisy, timesteps, encoder_hidden_states=text).sample
            expected = F.mse_loss(pred, noise, reduction="none").flatten(1).mean(1)
            torch.testing.assert_close(losses[:, j], expected, rtol=1e-4, atol=1e-6)


def test_sdxl_loss_uses_added_text_embeddings_and_time_ids():
    pipe = tiny_sdxl_pipeline()
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"  # its add_noise works in sigma space
    sketcher = _sketcher(pipe)
    images = torch.rand(1, 3, 16, 16)
    losses = sketcher.losses(images=images, prompts=["a photo of a dog"])
    with torch.no_grad():
        latents = pipe.vae.encode(images * 2 - 1).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt("a photo of a dog", do_classifier_free_guidance=False)
        time_ids = torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]])  # original size, crop top-left, target size
        noise = sketcher.noise[0][None]
        for j, t in enumerate(sketcher.timesteps):
            timesteps = torch.tensor([t])
            # train_text_to_image_sdxl.py noises with DDPMScheduler whatever scheduler the pipeline samples with
            a = pipe.scheduler.alphas_cumprod[t]
            noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
            pred = pipe.unet(
                noisy,
                timesteps,
                encoder_hidden_states=embeds,
                added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
            ).sample
            torch.testing.assert_close(losses[0, j], F.mse_loss(pred, noise), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("target,precondition", [(None, True), (None, False), ("noise", None)])
def test_sd3_flow_matching_loss_matches_training_script(target, precondition):
    pipe = tiny_sd3_pipeline()
    sketcher = _sketcher(pipe, target=target, **({} if precondition else {"precondition_outputs": precondition}))
    assert sketcher.spec.target == ("flow" if target is None else "epsilon")
    latents = torch.randn(2, 4, 8, 8)
    prompts = ["a photo of a cat", "a blue circle"]
    losses = sketcher.losses(latents=latents, prompts=prompts)

    # train_dreambooth_lora_sd3.py: sigma from the shifted training schedule, x_t = (1 - s) x0 + s e,
    # target = e - x0 (the official DMin code regresses onto e instead: target="noise"); with --precondition_outputs
    # (the script's default) the prediction is pred * (-s) + x_t and the target x0
    shift, n = pipe.scheduler.config.shift, 1000
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, do_classifier_free_guidance=False)
        noise = sketcher.noise[0].expand_as(latents)
        for j, t in enumerate(sketcher.timesteps):
            s = (t + 1) / n
            sigma = shift * s / (1 + (shift - 1) * s)
            noisy = (1 - sigma) * latents + sigma * noise
            pred = pipe.transformer(
                hidden_states=noisy,
                timestep=torch.full((2,), sigma * n),
                encoder_hidden_states=embeds,
                pooled_projections=pooled,
            ).sample
            wanted = noise - latents if target is None else noise
            if precondition:
                pred, wanted = pred * (-sigma) + noisy, latents
            expected = ((pred - wanted) ** 2).flatten(1).mean(1)
            torch.testing.assert_close(losses[:, j], expected, rtol=1e-4, atol=1e-5)


def test_vae_encoding_is_deterministic_mode():
    pipe = tiny_sd_pipeline()
    adapter = adapter_for_pipeline(pipe)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    a, b = adapter.encode_images(pixels), adapter.encode_images(pixels)
    assert torch.equal(a, b)
    with torch.no_grad():
        torch.testing.assert_close(a, pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor)


def test_objective_ignores_inference_timesteps_of_the_pipeline_scheduler():
    pipe = tiny_ddpm_pipeline()
    pipe.scheduler.set_timesteps(10)
    objective = Objective(pipe.scheduler)
    assert objective.num_train_timesteps == 1000
    assert objective.target_name == "epsilon"
    with pytest.raises(ConfigError, match="v_prediction"):
        Objective(tiny_sd3_pipeline().scheduler, target="v_prediction")


def test_unsupported_pipeline_names_the_supported_ones():
    class FluxLikePipeline:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(UnsupportedPipelineError) as info:
        adapter_for_pipeline(FluxLikePipeline())
    message = str(info.value)
    assert "FluxLikePipeline with a Linear" in message
    for name in ("DDPMPipeline", "StableDiffusionPipeline", "StableDiffusionXLPipeline", "StableDiffusion3Pipeline"):
        assert name in message
    assert isinstance(info.value, TypeError)


def test_image_conversions_and_errors():
    pil = [PIL.Image.new("RGB", (16, 16), (255, 0, 0))] * 2
    rgb = images_to_tensor(pil, 3)
    assert rgb.shape == (2, 3, 16, 16) and rgb[:, 0].min() == 1 and rgb[:, 1].max() == 0
    gray = images_to_tensor(pil, 1)
    assert gray.shape == (2, 1, 16, 16)
    assert images_to_tensor(np.ones((2, 16, 16, 1), np.float32), 3).shape == (2, 3, 16, 16)
    with pytest.raises(ConfigError, match=r"\[0, 1\]"):
        images_to_tensor(np.full((1, 4, 4, 3), 255.0), 3)
    with pytest.raises(ConfigError, match="PIL images"):
        images_to_tensor("cat.png", 3)
    resized = prepare_images(torch.rand(1, 3, 20, 40), 16)
    assert resized.shape == (1, 3, 16, 16)
    adapter = adapter_for_pipeline(tiny_ddpm_pipeline())
    with pytest.raises(ConfigError, match="resolution"):
        adapter.preprocess(torch.rand(1, 1, 8, 8))


@pytest.mark.parametrize("sampler", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "PNDMScheduler"])
def test_swapping_the_sampler_does_not_change_the_sketches(sampler):
    import diffusers

    pipe = tiny_sd_pipeline()
    images, prompts = torch.rand(2, 3, 16, 16), ["a photo of a cat", "a red square"]
    before = _sketcher(pipe)(images=images, prompts=prompts)
    pipe.scheduler = getattr(diffusers, sampler).from_config(pipe.scheduler.config)
    after = _sketcher(pipe)(images=images, prompts=prompts)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


def test_v_prediction_with_a_sampler_that_has_no_get_velocity():
    import diffusers

    pipe = tiny_sd_pipeline()
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(
        pipe.scheduler.config, prediction_type="v_prediction"
    )
    sketcher = _sketcher(pipe)
    assert sketcher(images=torch.rand(1, 3, 16, 16), prompts=["a cat"]).shape == (1, 3, 64)
    with pytest.raises(ConfigError, match="target='flow'"):
        _sketcher(pipe, target="flow")


def test_half_precision_vae_marked_force_upcast_encodes_in_float32():
    from diffusers_dmin.families import adapter_for_pipeline

    pipe = tiny_sdxl_pipeline()
    assert pipe.vae.config.force_upcast
    adapter = adapter_for_pipeline(pipe)
    pixels = torch.rand(2, 3, 16, 16) * 2 - 1
    reference = adapter.encode_images(pixels)
    torch.nn.Module.to(pipe.vae, torch.float16)
    seen = []
    hook = pipe.vae.encoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    latents = adapter.encode_images(pixels)
    hook.remove()
    assert seen == [torch.float32]  # SDXL's VAE overflows in float16 at real sizes
    assert pipe.vae.dtype == torch.float16  # restored
    torch.testing.assert_close(latents, reference, rtol=0, atol=1e-3)  # only the weights' rounding to float16
