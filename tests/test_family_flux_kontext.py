"""FLUX.1 Kontext against `examples/dreambooth/train_dreambooth_lora_flux_kontext.py`.

Text-to-image (no `--cond_image_column`): that branch of the script is, line for line, the training step of
`train_dreambooth_lora_flux.py` (`FluxKontextPipeline._pack_latents`, `_prepare_latent_image_ids`, `_unpack_latents`
are the same functions; `--guidance_scale` defaults to 3.5, `--vae_encode_mode` to `mode`), so the reference loss is
`test_family_flux.flux_reference_loss`, run on a `FluxKontextPipeline`. Image-to-image (`--cond_image_column`): the
reference loss below writes out the script's extra steps (condition latents, their ids with first coordinate 1,
the packed condition tokens appended to the sequence, the prediction cut back to the target's tokens).
"""

import pytest
import torch

from diffusers_dmin import DMinConfig, GradientSketcher, InfluencePipeline
from diffusers_dmin.testing import add_tiny_lora, tiny_flux_kontext_pipeline
from family_checks import (
    check_half_precision_agrees,
    check_return_influence,
    check_self_retrieval,
    check_sketch_matches_reference,
    exact_sketch_config,
    reference_gradients,
    structured_images,
)
from test_family_flux import FLUX_LORA_TARGETS, PROMPTS, flux_reference_loss, script_encode_prompt


def kontext_image_to_image_reference_loss(condition_images: dict, guidance_scale=3.5):
    """The script's loss with `--cond_image_column`; `condition_images` maps each prompt to its `(1, 3, H, W)`
    condition image in `[0, 1]`."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextPipeline

    def loss_fn(pipe, pixels, prompt, noise, t):
        vae, transformer = pipe.vae, pipe.transformer
        weight_dtype = transformer.dtype
        with torch.no_grad():
            prompt_embeds, pooled_prompt_embeds, text_ids = script_encode_prompt(pipe, prompt)
            model_input = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
            cond_model_input = vae.encode((condition_images[prompt] * 2 - 1).to(vae.dtype)).latent_dist.mode()
            model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
            model_input = model_input.to(dtype=weight_dtype)
            cond_model_input = (cond_model_input - vae.config.shift_factor) * vae.config.scaling_factor
            cond_model_input = cond_model_input.to(dtype=weight_dtype)
        vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        latent_image_ids = FluxKontextPipeline._prepare_latent_image_ids(
            model_input.shape[0], model_input.shape[2] // 2, model_input.shape[3] // 2, "cpu", weight_dtype
        )
        cond_latents_ids = FluxKontextPipeline._prepare_latent_image_ids(
            cond_model_input.shape[0], cond_model_input.shape[2] // 2, cond_model_input.shape[3] // 2, "cpu",
            weight_dtype,
        )  # fmt: skip
        cond_latents_ids[..., 0] = 1
        latent_image_ids = torch.cat([latent_image_ids, cond_latents_ids], dim=0)
        noise_scheduler_copy = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        index = noise_scheduler_copy.config.num_train_timesteps - 1 - t
        timesteps = noise_scheduler_copy.timesteps[[index]]
        sigmas = noise_scheduler_copy.sigmas[[index]].view(-1, 1, 1, 1).to(model_input.dtype)
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise.to(model_input.dtype)
        packed_noisy_model_input = FluxKontextPipeline._pack_latents(
            noisy_model_input, model_input.shape[0], model_input.shape[1], model_input.shape[2], model_input.shape[3]
        )
        orig_inp_shape = packed_noisy_model_input.shape
        packed_cond_input = FluxKontextPipeline._pack_latents(
            cond_model_input,
            cond_model_input.shape[0], cond_model_input.shape[1], cond_model_input.shape[2], cond_model_input.shape[3],
        )  # fmt: skip
        packed_noisy_model_input = torch.cat([packed_noisy_model_input, packed_cond_input], dim=1)
        guidance = torch.tensor([guidance_scale]).expand(model_input.shape[0])
        model_pred = transformer(
            hidden_states=packed_noisy_model_input,
            timestep=timesteps / 1000,
            guidance=guidance,
            pooled_projections=pooled_prompt_embeds,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=latent_image_ids,
            return_dict=False,
        )[0]
        model_pred = model_pred[:, : orig_inp_shape[1]]
        model_pred = FluxKontextPipeline._unpack_latents(
            model_pred,
            height=model_input.shape[2] * vae_scale_factor,
            width=model_input.shape[3] * vae_scale_factor,
            vae_scale_factor=vae_scale_factor,
        )
        target = noise - model_input
        return torch.mean(((model_pred.float() - target.float()) ** 2).reshape(1, -1), 1)[0]

    return loss_fn


def _lora_pipe():
    pipe = tiny_flux_kontext_pipeline()
    add_tiny_lora(pipe.transformer, target_modules=FLUX_LORA_TARGETS)
    return pipe


def test_flux_kontext_lora_gradient_is_the_training_scripts_gradient():
    sketcher = check_sketch_matches_reference(
        _lora_pipe(), flux_reference_loss(), structured_images(3), PROMPTS, params="lora"
    )
    assert sketcher.spec.family == "flux_kontext" and sketcher.spec.objective["guidance"] == 3.5
    assert "flux_kontext" in sketcher.spec.objective["script"]


@pytest.mark.parametrize("condition_size", [16, 8], ids=["same-size", "smaller-condition"])
def test_flux_kontext_image_to_image_lora_gradient_is_the_training_scripts_gradient(condition_size):
    pipe = _lora_pipe()
    images, prompts = structured_images(2), PROMPTS[:2]
    conditions = structured_images(4, size=condition_size)[2:]
    reference_loss = kontext_image_to_image_reference_loss({p: conditions[i : i + 1] for i, p in enumerate(prompts)})
    probe = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1, sketch_dim=1, params="lora"))
    sketcher = GradientSketcher.from_pipeline(pipe, exact_sketch_config(probe.input_dim, params="lora"))
    sketches = sketcher(images=images, prompts=prompts, condition_images=conditions).double()
    reference = reference_gradients(pipe, sketcher, reference_loss, images, prompts)
    torch.testing.assert_close(
        torch.einsum("atk,btk->tab", sketches, sketches), torch.einsum("atd,btd->tab", reference, reference),
        atol=2e-4, rtol=0,
    )  # fmt: skip
    dense = sketcher.full_gradients(images=images, prompts=prompts, condition_images=conditions).double()
    assert torch.nn.functional.cosine_similarity(dense, reference, dim=-1).min() > 1 - 1e-6  # measured ~1 - 2e-11
    # the condition image matters: the text-to-image gradient is measurably another one (1 - cosine 2e-4 .. 4e-3 on
    # the tiny model, whose 512 T5 tokens dilute the 4-16 condition tokens)
    text_only = sketcher.full_gradients(images=images, prompts=prompts).double()
    assert torch.nn.functional.cosine_similarity(text_only, reference, dim=-1).max() < 1 - 1e-5


def test_condition_images_are_refused_by_families_without_them():
    from diffusers_dmin.testing import tiny_flux_pipeline

    sketcher = GradientSketcher.from_pipeline(tiny_flux_pipeline(), DMinConfig(num_timesteps=1, sketch_dim=16))
    with pytest.raises(ValueError, match="condition_images"):
        sketcher(images=structured_images(1), prompts=PROMPTS[:1], condition_images=structured_images(1))


def test_flux_kontext_self_retrieval_and_text_to_image_return_influence():
    pipe = _lora_pipe()
    index = check_self_retrieval(pipe, structured_images(4), PROMPTS + ["a blue circle"])
    # InfluencePipeline passes max_area = 16 * 16 (the pipeline rescales to 1024**2 otherwise); so must the plain call
    check_return_influence(pipe, index, "a photo of a cat", max_area=16 * 16)
    with pytest.raises(ValueError, match="`image="):  # image-to-image editing: not the text-to-image objective
        InfluencePipeline(pipe, index)("a cat", return_influence=True, image=structured_images(1))


def test_flux_kontext_latents_from_pipeline():
    pipe = tiny_flux_kontext_pipeline()
    pipe.set_progress_bar_config(disable=True)
    adapter = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1, sketch_dim=16)).adapter
    assert adapter.pipeline_defaults() == {"max_area": 256}
    kwargs = dict(prompt="a photo of a cat", num_inference_steps=2, max_area=256)
    packed = pipe(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    latents = adapter.latents_from_pipeline(packed)
    torch.testing.assert_close(latents, pipe._unpack_latents(packed, 16, 16, pipe.vae_scale_factor), rtol=0, atol=0)
    image = pipe(**kwargs, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), image, rtol=0, atol=1e-5)


def test_flux_kontext_bfloat16_lora_agrees_with_float32():
    # guidance 4.0 is exact in bfloat16 after the transformer's * 1000 (3.5 is not; see test_family_flux)
    cosine = check_half_precision_agrees(
        _lora_pipe, structured_images(2), PROMPTS[:2], dtype=torch.bfloat16, guidance_scale=4.0
    )
    print(f"bfloat16 vs float32 min cosine: {cosine:.4f}")
