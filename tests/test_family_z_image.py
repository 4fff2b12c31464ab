"""Z-Image family against `examples/dreambooth/train_dreambooth_lora_z_image.py`, written out here.

The reference loss follows the script's training step: `vae.encode(...).latent_dist.mode()`, then
`(z - shift_factor) * scaling_factor`; the prompt from `encode_prompt(prompt, max_sequence_length=512)` (a list of
per-prompt embeddings without padding); `sigmas` looked up as the script's `get_sigmas` does on a
`FlowMatchEulerDiscreteScheduler` built from the pipeline's scheduler config (`noise_scheduler_copy`, static shift 3);
`(1 - s) x0 + s e`; the transformer called with the list of `(C, 1, h, w)` latents and
`timestep_normalized = (1000 - timesteps) / 1000`; the stacked prediction negated; target `noise - model_input`;
weights of `compute_loss_weighting_for_sd3`.
"""

import numpy as np
import torch

from diffusers_dmin.families import ZImageAdapter, adapter_for_pipeline
from diffusers_dmin.testing import add_tiny_lora, tiny_z_image_pipeline
from family_checks import (
    check_half_precision_agrees,
    check_return_influence,
    check_self_retrieval,
    check_sketch_matches_reference,
    structured_images,
)


PROMPTS = ["a photo of a cat", "a red square", "the digit three"]
SIZE = dict(height=16, width=16)  # the pipeline's default is 1024x1024
# every parameter but the 0.3M of the timestep embedder's MLP, so that D stays small for the K >= D comparison
NOT_T_EMBEDDER = ["layers.*", "noise_refiner.*", "context_refiner.*", "all_*", "cap_embedder.*", "*_pad_token"]


def z_image_reference_loss(weighting_scheme="none"):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    prompt_cache = {}  # the script encodes each prompt once, before training

    def loss_fn(pipe, pixels, prompt, noise, t):
        vae = pipe.vae
        with torch.no_grad():
            model_input = vae.encode(pixels).latent_dist.mode()
            model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
            if (id(pipe), prompt) not in prompt_cache:
                prompt_cache[id(pipe), prompt] = pipe.encode_prompt(prompt=prompt, max_sequence_length=512)[0]
            prompt_embeds = prompt_cache[id(pipe), prompt]
        noise_scheduler_copy = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        index = noise_scheduler_copy.config.num_train_timesteps - 1 - t  # DMin's t (larger = noisier)
        timesteps = noise_scheduler_copy.timesteps[index : index + 1]
        step_indices = [(noise_scheduler_copy.timesteps == ts).nonzero().item() for ts in timesteps]
        sigmas = noise_scheduler_copy.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        timestep_normalized = (1000 - timesteps) / 1000
        noisy_model_input_list = list(noisy_model_input.unsqueeze(2).unbind(dim=0))
        model_pred_list = pipe.transformer(
            noisy_model_input_list, timestep_normalized, prompt_embeds, return_dict=False
        )[0]
        model_pred = torch.stack(model_pred_list, dim=0).squeeze(2)
        model_pred = -model_pred
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
        target = noise - model_input
        return torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(1, -1), 1)[0]

    return loss_fn


def _lora_pipe():
    pipe = tiny_z_image_pipeline()
    add_tiny_lora(pipe.transformer, target_modules=("to_k", "to_q", "to_v", "to_out.0"))  # the script's default
    return pipe


def test_z_image_gradient_is_the_training_scripts_gradient():
    pipe = tiny_z_image_pipeline()
    adapter = adapter_for_pipeline(pipe, resolution=(16, 16))
    assert type(adapter) is ZImageAdapter and adapter.latent_shape == (4, 8, 8)
    assert adapter.default_resolution() == (1024, 1024)
    sketcher = check_sketch_matches_reference(
        pipe, z_image_reference_loss(), structured_images(3), PROMPTS, params=NOT_T_EMBEDDER, resolution=16
    )
    assert not sketcher._use_vmap()  # per-prompt embedding lengths: one pair at a time


def test_z_image_lora_gradient_with_cosmap_weighting_and_no_normalisation():
    sketcher = check_sketch_matches_reference(
        _lora_pipe(),
        z_image_reference_loss("cosmap"),
        structured_images(2),
        PROMPTS[:2],
        params="lora",
        weighting_scheme="cosmap",
        normalize="none",
        resolution=16,
    )
    assert sketcher.spec.objective["prediction_sign"] == -1.0


def test_z_image_latents_are_the_pipelines_and_self_retrieval_and_return_influence():
    pipe = _lora_pipe()
    pipe.set_progress_bar_config(disable=True)
    # the pipeline denoises in the VAE layout with `(z - shift) * scale`: decoding its latent output reproduces its images
    kwargs = dict(num_inference_steps=2, **SIZE)  # fresh prompt lists: the pipeline templates them in place
    latents = pipe(PROMPTS[:2], **kwargs, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    images = pipe(PROMPTS[:2], **kwargs, output_type="np", generator=torch.Generator().manual_seed(0)).images
    adapter = adapter_for_pipeline(pipe, resolution=(16, 16))
    assert adapter.latents_from_pipeline(latents) is latents and latents.shape == (2, *adapter.latent_shape)
    with torch.no_grad():
        raw = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        decoded = pipe.image_processor.postprocess(pipe.vae.decode(raw).sample, output_type="np")
    np.testing.assert_allclose(decoded, images, atol=1e-6)

    index = check_self_retrieval(
        pipe, structured_images(4), PROMPTS + ["a blue circle"], num_timesteps=2, resolution=16
    )
    check_return_influence(pipe, index, "a photo of a cat", **SIZE)


def test_z_image_bfloat16_lora_agrees_with_float32():
    cosine = check_half_precision_agrees(_lora_pipe, structured_images(2), PROMPTS[:2], resolution=16)
    assert cosine > 0.98


def test_z_image_omni_pipeline_is_not_matched():
    import diffusers

    from diffusers_dmin import UnsupportedPipelineError

    pipe = tiny_z_image_pipeline()
    assert isinstance(adapter_for_pipeline(pipe), ZImageAdapter)
    img2img = diffusers.ZImageImg2ImgPipeline(**pipe.components)
    assert isinstance(adapter_for_pipeline(img2img), ZImageAdapter)
    omni = diffusers.ZImageOmniPipeline.__new__(diffusers.ZImageOmniPipeline)  # only the class decides
    omni.transformer = pipe.transformer
    try:
        adapter_for_pipeline(omni)
    except UnsupportedPipelineError as err:
        assert "ZImageOmniPipeline" in str(err)
    else:
        raise AssertionError("ZImageOmniPipeline must not be matched: its images condition the transformer")
