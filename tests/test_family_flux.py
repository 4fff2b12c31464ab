"""FLUX.1 family (dev: guidance-distilled; schnell: no guidance) against
`examples/dreambooth/train_dreambooth_lora_flux.py`, written out here.

The reference loss follows the script's training step: prompts encoded as its `encode_prompt` does (CLIP
`pooler_output` at 77 tokens, T5 hidden states at `--max_sequence_length` 512, `text_ids` zeros), VAE latents
`(z - shift_factor) * scaling_factor` (the script samples the latent distribution; DMin takes its deterministic
`mode()`, DESIGN §1), `latent_image_ids` from `FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2)`, `timesteps`
and `get_sigmas` of a `FlowMatchEulerDiscreteScheduler` built from the pipeline's scheduler config
(`noise_scheduler_copy`), the noisy input `(1 - s) x0 + s e` packed with `FluxPipeline._pack_latents`, the transformer
called with `timestep=timesteps / 1000` and `guidance=torch.tensor([guidance_scale]).expand(b)` when
`guidance_embeds`, the prediction unpacked with `FluxPipeline._unpack_latents`, target `e - x0` and the weighting of
`compute_loss_weighting_for_sd3` (`none` by default).
"""

import inspect

import pytest
import torch

from diffusers_dmin import DMinConfig, GradientSketcher, InfluencePipeline
from diffusers_dmin.errors import UnsupportedPipelineError
from diffusers_dmin.testing import add_tiny_lora, tiny_flux_pipeline
from family_checks import (
    check_half_precision_agrees,
    check_return_influence,
    check_self_retrieval,
    check_sketch_matches_reference,
    structured_images,
)


PROMPTS = ["a photo of a cat", "a red square", "the digit three"]
# the script's default LoRA targets (`--lora_layers` unset), as module-name suffixes
FLUX_LORA_TARGETS = (
    "to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)  # fmt: skip


def script_encode_prompt(pipe, prompt, max_sequence_length=512):
    """The script's `encode_prompt`: CLIP pooled output (77 tokens), T5 last hidden state, zero `text_ids`."""
    clip_ids = pipe.tokenizer(
        [prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output.to(pipe.text_encoder.dtype)
    t5_ids = pipe.tokenizer_2(
        [prompt], padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    ).input_ids
    prompt_embeds = pipe.text_encoder_2(t5_ids)[0].to(pipe.text_encoder_2.dtype)
    text_ids = torch.zeros(prompt_embeds.shape[1], 3).to(dtype=pipe.text_encoder.dtype)
    return prompt_embeds, pooled, text_ids


def flux_reference_loss(guidance_scale=3.5, weighting_scheme="none"):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    def loss_fn(pipe, pixels, prompt, noise, t):
        vae, transformer = pipe.vae, pipe.transformer
        weight_dtype = transformer.dtype
        with torch.no_grad():
            prompt_embeds, pooled_prompt_embeds, text_ids = script_encode_prompt(pipe, prompt)
            model_input = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
            model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
            model_input = model_input.to(dtype=weight_dtype)
        vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        latent_image_ids = FluxPipeline._prepare_latent_image_ids(
            model_input.shape[0], model_input.shape[2] // 2, model_input.shape[3] // 2, "cpu", weight_dtype
        )
        noise_scheduler_copy = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        index = noise_scheduler_copy.config.num_train_timesteps - 1 - t  # DMin's t (larger = noisier) -> the index
        timesteps = noise_scheduler_copy.timesteps[[index]]
        step_indices = [(noise_scheduler_copy.timesteps == ts).nonzero().item() for ts in timesteps]  # get_sigmas
        sigmas = noise_scheduler_copy.sigmas[step_indices].flatten().view(-1, 1, 1, 1).to(model_input.dtype)
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise.to(model_input.dtype)
        packed_noisy_model_input = FluxPipeline._pack_latents(
            noisy_model_input,
            batch_size=model_input.shape[0],
            num_channels_latents=model_input.shape[1],
            height=model_input.shape[2],
            width=model_input.shape[3],
        )
        if transformer.config.guidance_embeds:
            guidance = torch.tensor([guidance_scale]).expand(model_input.shape[0])
        else:
            guidance = None
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
        model_pred = FluxPipeline._unpack_latents(
            model_pred,
            height=model_input.shape[2] * vae_scale_factor,
            width=model_input.shape[3] * vae_scale_factor,
            vae_scale_factor=vae_scale_factor,
        )
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
        target = noise - model_input
        return torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(1, -1), 1)[0]

    return loss_fn


def _lora_pipe(guidance_embeds=True):
    pipe = tiny_flux_pipeline(guidance_embeds=guidance_embeds)
    add_tiny_lora(pipe.transformer, target_modules=FLUX_LORA_TARGETS)
    return pipe


def test_flux_training_sigmas_are_unshifted():
    # FLUX.1-dev's scheduler config has use_dynamic_shifting=True: the script's noise_scheduler_copy applies no shift
    pipe = tiny_flux_pipeline()
    assert pipe.scheduler.config.use_dynamic_shifting and pipe.scheduler.config.shift == 3.0
    sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=4, sketch_dim=16))
    t = torch.tensor(sketcher.timesteps)
    torch.testing.assert_close(sketcher.objective._sigmas(t), (t + 1).float() / 1000)
    torch.testing.assert_close(sketcher.objective.model_timesteps(t), (t + 1).float() / 1000)


def test_flux_dev_gradient_is_the_training_scripts_gradient():
    pipe = tiny_flux_pipeline()
    sketcher = check_sketch_matches_reference(pipe, flux_reference_loss(), structured_images(3), PROMPTS)
    assert sketcher.spec.family == "flux"
    assert sketcher.spec.objective["guidance"] == 3.5 and sketcher.spec.objective["timestep_scale"] == 1e-3


def test_flux_dev_lora_gradient_with_another_guidance_value():
    pipe = _lora_pipe()
    sketcher = check_sketch_matches_reference(
        pipe, flux_reference_loss(guidance_scale=1.0), structured_images(2), PROMPTS[:2], params="lora",
        guidance_scale=1.0,
    )  # fmt: skip
    assert sketcher.spec.objective["guidance"] == 1.0


def test_flux_schnell_lora_gradient_with_cosmap_weighting_and_no_normalisation():
    pipe = _lora_pipe(guidance_embeds=False)
    sketcher = check_sketch_matches_reference(
        pipe,
        flux_reference_loss(weighting_scheme="cosmap"),
        structured_images(2),
        PROMPTS[:2],
        params="lora",
        weighting_scheme="cosmap",
        normalize="none",
    )
    assert sketcher.spec.objective["guidance"] is None and sketcher.spec.objective["weighting"] == "cosmap"


@pytest.mark.parametrize("guidance_embeds", [True, False], ids=["dev", "schnell"])
def test_flux_self_retrieval_and_return_influence(guidance_embeds):
    pipe = _lora_pipe(guidance_embeds)
    images = structured_images(4)
    index = check_self_retrieval(pipe, images, PROMPTS + ["a blue circle"])
    check_return_influence(pipe, index, "a photo of a cat")


def test_flux_latents_from_pipeline_are_what_the_vae_decodes():
    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    adapter = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1, sketch_dim=16)).adapter
    kwargs = dict(prompt="a photo of a cat", num_inference_steps=2)
    packed = pipe(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert packed.shape == (1, 16, 16)  # (B, (h/2) (w/2), 4C)
    latents = adapter.latents_from_pipeline(packed)
    torch.testing.assert_close(latents, pipe._unpack_latents(packed, 16, 16, pipe.vae_scale_factor), rtol=0, atol=0)
    # the unpacked layout is the VAE's: decoding it reproduces the pipeline's own image
    image = pipe(**kwargs, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), image, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="packed latents"):
        adapter.latents_from_pipeline(packed[:, :8])


def _same_components(cls, pipe):
    accepted = inspect.signature(cls.__init__).parameters
    other = cls(**{name: module for name, module in pipe.components.items() if name in accepted})
    other.default_sample_size = pipe.default_sample_size  # an instance attribute, as in tiny_flux_pipeline
    return other


def test_flux_img2img_and_inpaint_share_the_family_fill_control_and_ip_adapters_are_refused():
    from diffusers import FluxControlPipeline, FluxFillPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline

    pipe = _lora_pipe()
    index = check_self_retrieval(pipe, structured_images(2), PROMPTS[:2])
    image = structured_images(1)
    check_return_influence(_same_components(FluxImg2ImgPipeline, pipe), index, "a cat", image=image, strength=0.9)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    inpaint = _same_components(FluxInpaintPipeline, pipe)
    check_return_influence(inpaint, index, "a cat", image=image, mask_image=mask, strength=0.9)
    for cls in (FluxFillPipeline, FluxControlPipeline):  # image channels concatenated to the latents
        with pytest.raises(UnsupportedPipelineError, match="FluxPipeline"):
            InfluencePipeline(_same_components(cls, pipe), index)
    with pytest.raises(ValueError, match="ip_adapter_image"):  # conditions the transformer beyond the prompt
        InfluencePipeline(pipe, index)("a cat", return_influence=True, ip_adapter_image=image.numpy())


@pytest.mark.parametrize(
    "guidance_embeds, config, min_cosine",
    [(False, {}, 0.98), (True, {"guidance_scale": 4.0}, 0.98), (True, {}, 0.9)],
    ids=["schnell", "dev-guidance-4", "dev-guidance-3.5"],
)
def test_flux_bfloat16_lora_agrees_with_float32(guidance_embeds, config, min_cosine):
    # FluxTransformer2DModel casts `guidance` to the model dtype before multiplying by 1000: in bfloat16 the script's
    # 3.5 becomes 3504 (4.0 stays 4000), so a bfloat16 FLUX.1-dev embeds another guidance value than in float32 (in
    # training as here); on the tiny model that alone lowers the agreement from ~0.999 to ~0.93
    cosine = check_half_precision_agrees(
        lambda: _lora_pipe(guidance_embeds), structured_images(2), PROMPTS[:2], dtype=torch.bfloat16,
        min_cosine=min_cosine, **config,
    )  # fmt: skip
    print(f"bfloat16 vs float32 min cosine: {cosine:.4f}")


def test_flux_lora_dmin_build_and_search(tmp_path, capsys):
    """`dmin build` / `dmin search` on a saved FLUX.1-dev pipeline with a LoRA loaded by `load_lora_weights`."""
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    from diffusers_dmin.cli import main
    from diffusers_dmin.data import load_digits

    pipe = tiny_flux_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    add_tiny_lora(pipe.transformer, target_modules=FLUX_LORA_TARGETS, seed=1)
    FluxPipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer)
    )
    digits = load_digits(16, split="train[:6]")
    digits.save_to_disk(str(tmp_path / "data"))
    digits[2]["image"].save(tmp_path / "query.png")
    common = ["--lora-weights", tmp_path / "lora"]
    build = [
        "build", tmp_path / "pipe", *common, "--dataset", tmp_path / "data", "--num-timesteps", "2",
        "--sketch-dim", "256", "--resolution", "16", "--output-dir", tmp_path / "index", "-q",
    ]  # fmt: skip
    code, captured = main([str(a) for a in build]), capsys.readouterr()
    assert code == 0, captured.err
    search = [
        "search", tmp_path / "index", "--pipeline", tmp_path / "pipe", *common, "--image", tmp_path / "query.png",
        "--prompt", digits[2]["text"], "--top-k", "2", "--output", tmp_path / "grid.png",
    ]  # fmt: skip
    code, captured = main([str(a) for a in search]), capsys.readouterr()
    assert code == 0, captured.err
    table = [line.split() for line in captured.out.splitlines()[2:4]]
    assert table[0][:2] == ["1", "2"]  # the query is training row 2: it ranks itself first


def test_flux_lora_sketches_with_gradient_checkpointing():
    # what a 12B FLUX.1 needs in memory; the sketcher then takes one backward pass per (sample, timestep)
    images, prompts = structured_images(2), PROMPTS[:2]
    config = DMinConfig(num_timesteps=2, sketch_dim=512)
    plain = GradientSketcher.from_pipeline(_lora_pipe(), config)(images=images, prompts=prompts)
    pipe = _lora_pipe()
    pipe.transformer.enable_gradient_checkpointing()
    sketcher = GradientSketcher.from_pipeline(pipe, config)
    assert not sketcher._use_vmap()
    torch.testing.assert_close(sketcher(images=images, prompts=prompts), plain, rtol=0, atol=1e-5)
