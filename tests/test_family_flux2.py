"""FLUX.2 families against `examples/dreambooth/train_dreambooth_lora_flux2.py` and
`train_dreambooth_lora_flux2_klein.py`, written out here.

The reference loss follows the scripts' training step: `vae.encode(...).latent_dist.mode()`,
`Flux2Pipeline._patchify_latents`, normalisation by the VAE's batch-norm running mean and
`sqrt(running_var + batch_norm_eps)`, `_prepare_latent_ids` of the patchified latents, `sigmas` looked up as the
scripts' `get_sigmas` does on a `FlowMatchEulerDiscreteScheduler` built from the pipeline's scheduler config
(`noise_scheduler_copy`), `(1 - s) x0 + s e` with the noise in the patchified layout (`randn_like(model_input)`),
`_pack_latents`, the transformer called with `timestep=timesteps / 1000`, `guidance=--guidance_scale` (3.5; always for
FLUX.2-dev, only with `guidance_embeds` for klein), the prompt from `encode_prompt(max_sequence_length=512,
text_encoder_out_layers=(10, 20, 30))`, the prediction cut to the image tokens and unpacked with
`_unpack_latents_with_ids`, target `noise - model_input`, weights of `compute_loss_weighting_for_sd3`.
"""

import numpy as np
import pytest
import torch

from diffusers_dmin import DMinConfig, GradientIndex, GradientSketcher, InfluencePipeline
from diffusers_dmin.families import Flux2Adapter, Flux2KleinAdapter, adapter_for_pipeline
from diffusers_dmin.testing import add_tiny_lora, tiny_flux2_klein_pipeline, tiny_flux2_pipeline
from family_checks import (
    check_half_precision_agrees,
    check_return_influence,
    check_self_retrieval,
    check_sketch_matches_reference,
    structured_images,
)


PROMPTS = ["a photo of a cat", "a red square", "the digit three"]
# the scripts' default LoRA targets (double-stream attention, fused single-stream projections)
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out")


def flux2_reference_loss(klein=False, weighting_scheme="none", guidance_scale=3.5):
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    prompt_cache = {}  # the scripts encode each prompt once, before training

    def loss_fn(pipe, pixels, prompt, noise, t):
        vae = pipe.vae
        with torch.no_grad():
            model_input = vae.encode(pixels).latent_dist.mode()
            latents_bn_mean = vae.bn.running_mean.view(1, -1, 1, 1)
            latents_bn_std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
            model_input = Flux2Pipeline._patchify_latents(model_input)
            model_input = (model_input - latents_bn_mean) / latents_bn_std
            if (id(pipe), prompt) not in prompt_cache:
                prompt_cache[id(pipe), prompt] = pipe.encode_prompt(
                    prompt=prompt, max_sequence_length=512, text_encoder_out_layers=[10, 20, 30]
                )
            prompt_embeds, text_ids = prompt_cache[id(pipe), prompt]
        model_input_ids = Flux2Pipeline._prepare_latent_ids(model_input)
        noise_scheduler_copy = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        index = noise_scheduler_copy.config.num_train_timesteps - 1 - t  # DMin's t (larger = noisier)
        timesteps = noise_scheduler_copy.timesteps[index : index + 1]
        step_indices = [(noise_scheduler_copy.timesteps == ts).nonzero().item() for ts in timesteps]
        sigmas = noise_scheduler_copy.sigmas[step_indices].flatten().view(-1, 1, 1, 1)
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        packed_noisy_model_input = Flux2Pipeline._pack_latents(noisy_model_input)
        guidance = None
        if not klein or pipe.transformer.config.guidance_embeds:
            guidance = torch.full([1], guidance_scale).expand(model_input.shape[0])
        model_pred = pipe.transformer(
            hidden_states=packed_noisy_model_input,
            timestep=timesteps / 1000,
            guidance=guidance,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=model_input_ids,
            return_dict=False,
        )[0]
        model_pred = model_pred[:, : packed_noisy_model_input.size(1) :]
        model_pred = Flux2Pipeline._unpack_latents_with_ids(model_pred, model_input_ids)
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
        target = noise - model_input
        return torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(1, -1), 1)[0]

    return loss_fn


def _lora_pipe(make=tiny_flux2_pipeline, **kwargs):
    pipe = make(**kwargs)
    add_tiny_lora(pipe.transformer, target_modules=LORA_TARGETS)
    return pipe


def test_flux2_and_klein_pipelines_get_their_adapters_and_conventions():
    dev = adapter_for_pipeline(tiny_flux2_pipeline())
    assert type(dev) is Flux2Adapter
    assert (dev.conventions.guidance, dev.conventions.timestep_scale, dev.conventions.weighting) == (
        3.5,
        0.001,
        "none",
    )
    assert dev.latent_shape == (16, 4, 4)  # patchified: 4 x 4 VAE channels, 16x16 pixels / (2 * VAE factor 2)
    klein = adapter_for_pipeline(tiny_flux2_klein_pipeline())
    assert type(klein) is Flux2KleinAdapter and klein.conventions.guidance is None
    guided = adapter_for_pipeline(tiny_flux2_klein_pipeline(guidance_embeds=True), config=DMinConfig(guidance_scale=2))
    assert guided.conventions.guidance == 2.0


def test_flux2_gradient_is_the_training_scripts_gradient():
    # all parameters: the guidance and timestep embedders are part of the gradient
    check_sketch_matches_reference(tiny_flux2_pipeline(), flux2_reference_loss(), structured_images(3), PROMPTS)


def test_flux2_lora_gradient_with_cosmap_weighting_and_no_normalisation():
    sketcher = check_sketch_matches_reference(
        _lora_pipe(),
        flux2_reference_loss(weighting_scheme="cosmap"),
        structured_images(2),
        PROMPTS[:2],
        params="lora",
        weighting_scheme="cosmap",
        normalize="none",
    )
    assert sketcher.spec.objective["weighting"] == "cosmap" and sketcher.spec.objective["guidance"] == 3.5


@pytest.mark.parametrize("guidance_embeds", [False, True])
def test_flux2_klein_gradient_is_the_training_scripts_gradient(guidance_embeds):
    pipe = tiny_flux2_klein_pipeline(guidance_embeds=guidance_embeds)
    check_sketch_matches_reference(pipe, flux2_reference_loss(klein=True), structured_images(2), PROMPTS[:2])


def test_flux2_latents_from_pipeline_are_the_pipelines_own_unpacking():
    from diffusers import Flux2Pipeline

    pipe = tiny_flux2_pipeline()
    pipe.set_progress_bar_config(disable=True)
    adapter = adapter_for_pipeline(pipe)
    kwargs = dict(prompt=["a photo of a cat", "a red square"], num_inference_steps=2)
    packed = pipe(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert packed.shape == (2, 16, 16)  # (B, tokens, 4C)
    latents = adapter.latents_from_pipeline(packed)
    ids = Flux2Pipeline._prepare_latent_ids(torch.zeros(2, *adapter.latent_shape))
    torch.testing.assert_close(latents, Flux2Pipeline._unpack_latents_with_ids(packed, ids), rtol=0, atol=0)
    # and they are what the pipeline decodes: de-normalise with the batch-norm statistics, unpatchify, decode
    images = pipe(**kwargs, output_type="np", generator=torch.Generator().manual_seed(0)).images
    vae = pipe.vae
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    with torch.no_grad():
        raw = Flux2Pipeline._unpatchify_latents(latents * std + vae.bn.running_mean.view(1, -1, 1, 1))
        decoded = pipe.image_processor.postprocess(vae.decode(raw).sample, output_type="np")
    np.testing.assert_allclose(decoded, images, atol=1e-6)
    # the sketcher takes these latents as `x0` in the layout of its noise
    sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=2, sketch_dim=64))
    assert tuple(sketcher.noise.shape[1:]) == tuple(latents.shape[1:])
    assert sketcher(latents=latents, prompts=kwargs["prompt"]).shape == (2, 2, 64)
    with pytest.raises(ValueError, match="height=16, width=16"):
        adapter.latents_from_pipeline(packed[:, :8])


def test_flux2_klein_latent_output_is_converted_back_to_the_denoising_layout():
    # Flux2KleinPipeline(output_type="latent") returns de-normalised, unpatchified VAE latents, not packed tokens
    pipe = tiny_flux2_klein_pipeline()
    pipe.set_progress_bar_config(disable=True)
    adapter = adapter_for_pipeline(pipe)
    seen = {}

    def callback(pipeline, step, timestep, callback_kwargs):
        seen["latents"] = callback_kwargs["latents"]
        return callback_kwargs

    raw = pipe(
        prompt="a red square", num_inference_steps=2, output_type="latent", callback_on_step_end=callback
    ).images
    assert raw.shape == (1, 4, 8, 8)
    torch.testing.assert_close(
        adapter.latents_from_pipeline(raw), adapter.latents_from_pipeline(seen["latents"]), rtol=1e-5, atol=1e-5
    )


def test_flux2_forward_packs_and_unpacks_tokens_as_the_script():
    # The tiny transformer hardly depends on token positions (image-image attention is diluted by 512 text tokens),
    # so the gradient comparison alone would not see a wrong token order: watch what the real transformer is given.
    from diffusers import Flux2Pipeline

    pipe = tiny_flux2_pipeline()
    adapter = adapter_for_pipeline(pipe, resolution=(32, 16))  # non-square: rows and columns differ
    noisy = torch.randn(2, *adapter.latent_shape)
    cond = adapter.encode_prompts(PROMPTS[:2])
    seen = {}

    def call(**kwargs):
        seen.update(kwargs)
        seen["out"] = pipe.transformer(**kwargs)[0]
        return (seen["out"],)

    with torch.no_grad():
        pred = adapter.forward(call, noisy, torch.tensor([0.5, 0.25]), cond)
    ids = Flux2Pipeline._prepare_latent_ids(noisy)
    torch.testing.assert_close(seen["hidden_states"], Flux2Pipeline._pack_latents(noisy), rtol=0, atol=0)
    torch.testing.assert_close(seen["img_ids"], ids, rtol=0, atol=0)
    torch.testing.assert_close(seen["txt_ids"], Flux2Pipeline._prepare_text_ids(cond["encoder_hidden_states"]))
    torch.testing.assert_close(seen["guidance"], torch.full([2], 3.5))
    torch.testing.assert_close(pred, Flux2Pipeline._unpack_latents_with_ids(seen["out"], ids), rtol=0, atol=0)


@pytest.mark.parametrize("make", [tiny_flux2_pipeline, tiny_flux2_klein_pipeline], ids=["flux2", "klein"])
def test_flux2_self_retrieval_and_return_influence(make):
    pipe = _lora_pipe(make)
    prompts = PROMPTS + ["a blue circle"]
    index = check_self_retrieval(pipe, structured_images(4), prompts, num_timesteps=2)
    check_return_influence(pipe, index, "a photo of a cat")
    wrapped = InfluencePipeline(pipe, index)
    with pytest.raises(ValueError, match="text_encoder_out_layers"):  # another prompt encoding than the index's
        wrapped(prompt="a red square", return_influence=True, text_encoder_out_layers=(1, 2, 3))
    # the query sketch is the gradient at the latents the denoising loop produced (seen through the callback)
    wrapped.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red square", num_inference_steps=2)
    out = wrapped(**kwargs, return_influence=True, top_k=3, generator=torch.Generator().manual_seed(1))
    latent = pipe(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(1)).images
    latents = wrapped.sketcher.adapter.latents_from_pipeline(latent)
    expected = index.search(wrapped.sketcher(latents=latents, prompts=["a red square"]), top_k=3)[0]
    assert list(out.influence[0].sample_ids) == list(expected.sample_ids)
    np.testing.assert_allclose(out.influence[0].scores, expected.scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "make, dtype",
    [
        (tiny_flux2_pipeline, torch.bfloat16),
        (tiny_flux2_klein_pipeline, torch.bfloat16),
        (tiny_flux2_pipeline, torch.float16),
    ],
    ids=["flux2-bf16", "klein-bf16", "flux2-fp16"],
)
def test_flux2_half_precision_lora_agrees_with_float32(make, dtype):
    # Flux2Transformer2DModel rounds `timestep` and `guidance` to the model dtype *before* multiplying by 1000, so in
    # bfloat16 (8 significant bits) the model itself embeds 832 for 833 and 3504 for guidance 3.5; with random
    # embedders that changes the function (measured min sketch cosine against float32 at uniform timesteps: 0.63
    # for FLUX.2-dev with guidance 3.5, 0.95 for klein; float16 1.0000). Here timesteps (sigma 0.5, 0.25, 0.125) and
    # guidance 4.0 that bfloat16 holds exactly isolate the arithmetic of the gradient itself (measured: 0.9998,
    # 0.9995).
    config = dict(timestep_spacing=(499, 249, 124))
    if make is tiny_flux2_pipeline:
        config["guidance_scale"] = 4.0
    make_pipe = lambda: _lora_pipe(make)  # noqa: E731
    cosine = check_half_precision_agrees(make_pipe, structured_images(2), PROMPTS[:2], dtype=dtype, **config)
    assert cosine > 0.995


def test_flux2_dmin_build_and_search_with_lora_weights_loaded_by_diffusers(tmp_path, capsys):
    from peft.utils import get_peft_model_state_dict

    from diffusers_dmin.cli import main
    from diffusers_dmin.data import load_digits

    pipe = tiny_flux2_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    add_tiny_lora(pipe.transformer, target_modules=LORA_TARGETS, seed=1)
    type(pipe).save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer)
    )
    digits = load_digits(16, split="train[:4]")
    digits.save_to_disk(str(tmp_path / "data"))
    digits[3]["image"].save(tmp_path / "query.png")
    common = ["--lora-weights", tmp_path / "lora", "-q"]
    build = ["build", tmp_path / "pipe", "--dataset", tmp_path / "data", "--num-timesteps", "2", "--sketch-dim", "64"]
    build += ["--resolution", "16", "--output-dir", tmp_path / "index", *common]
    assert main([str(a) for a in build]) == 0, capsys.readouterr().err
    assert "Index of 4 rows (T=2, K=64, float16)" in capsys.readouterr().out
    search = ["search", tmp_path / "index", "--pipeline", tmp_path / "pipe", "--image", tmp_path / "query.png"]
    search += ["--prompt", "a handwritten digit 3", "--top-k", "2", "--output", tmp_path / "grid.png", *common]
    assert main([str(a) for a in search]) == 0, capsys.readouterr().err
    index = GradientIndex.from_pretrained(tmp_path / "index")
    assert index.spec.family == "flux2" and index.spec.objective["guidance"] == 3.5
    assert index.spec.param_names and all("lora_" in name for name in index.spec.param_names)  # params="auto"


def test_flux2_reference_images_are_refused_with_return_influence():
    from diffusers_dmin import ConfigError

    pipe = tiny_flux2_pipeline()
    sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1, sketch_dim=64))
    index = GradientIndex.from_sketches(
        sketcher(images=torch.rand(1, 3, 16, 16), prompts=PROMPTS[:1]), spec=sketcher.spec
    )
    reference = np.zeros((16, 16, 3), dtype=np.float32)
    with pytest.raises(ConfigError, match="image="):
        InfluencePipeline(pipe, index)(PROMPTS[0], image=[reference], return_influence=True, num_inference_steps=1)
