"""Chroma family. diffusers has no Chroma training script, so the reference loss is the flow matching of
`examples/dreambooth/train_dreambooth_lora_flux.py` (written out in `test_family_flux.py`'s terms) with the
conditioning `ChromaPipeline` gives its transformer, written out here from the pipeline's code: T5 hidden states
computed with the tokenizer's attention mask (`--max_sequence_length` 512), a transformer mask that keeps the prompt
tokens and the first padding token and is extended by ones over the image tokens, no pooled projection, no guidance.
"""

import inspect

import pytest
import torch

from diffusers_dmin import DMinConfig, GradientSketcher, InfluencePipeline
from diffusers_dmin.errors import UnsupportedPipelineError
from diffusers_dmin.testing import add_tiny_lora, tiny_chroma_pipeline
from family_checks import (
    check_half_precision_agrees,
    check_return_influence,
    check_self_retrieval,
    check_sketch_matches_reference,
    structured_images,
)
from test_family_flux import FLUX_LORA_TARGETS


PROMPTS = ["a photo of a cat", "a red square", "the digit three"]


def chroma_encode_prompt(pipe, prompt, max_sequence_length=512):
    """T5 with the tokenizer's mask; the transformer's text mask keeps the prompt and its first padding token."""
    tokens = pipe.tokenizer(
        [prompt], padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt"
    )
    prompt_embeds = pipe.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    length = int(tokens.attention_mask.sum())
    text_mask = torch.zeros(1, max_sequence_length)
    text_mask[:, : length + 1] = 1
    return prompt_embeds.to(pipe.text_encoder.dtype), text_mask.to(pipe.text_encoder.dtype)


def chroma_reference_loss(weighting_scheme="none"):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    def loss_fn(pipe, pixels, prompt, noise, t):
        vae, transformer = pipe.vae, pipe.transformer
        weight_dtype = transformer.dtype
        with torch.no_grad():
            prompt_embeds, text_mask = chroma_encode_prompt(pipe, prompt)
            model_input = vae.encode(pixels.to(vae.dtype)).latent_dist.mode()
            model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
            model_input = model_input.to(dtype=weight_dtype)
        batch, channels, height, width = model_input.shape
        text_ids = torch.zeros(prompt_embeds.shape[1], 3, dtype=weight_dtype)
        latent_image_ids = FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, "cpu", weight_dtype)
        attention_mask = torch.cat([text_mask, torch.ones(batch, (height // 2) * (width // 2))], dim=1)
        noise_scheduler_copy = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
        index = noise_scheduler_copy.config.num_train_timesteps - 1 - t
        timesteps = noise_scheduler_copy.timesteps[[index]]
        sigmas = noise_scheduler_copy.sigmas[[index]].view(-1, 1, 1, 1).to(model_input.dtype)
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise.to(model_input.dtype)
        packed = FluxPipeline._pack_latents(noisy_model_input, batch, channels, height, width)
        model_pred = transformer(
            hidden_states=packed,
            timestep=timesteps / 1000,
            encoder_hidden_states=prompt_embeds,
            txt_ids=text_ids,
            img_ids=latent_image_ids,
            attention_mask=attention_mask.to(text_mask.dtype),
            return_dict=False,
        )[0]
        vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        model_pred = FluxPipeline._unpack_latents(
            model_pred,
            height=height * vae_scale_factor,
            width=width * vae_scale_factor,
            vae_scale_factor=vae_scale_factor,
        )
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
        target = noise - model_input
        return torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(1, -1), 1)[0]

    return loss_fn


def _lora_pipe():
    pipe = tiny_chroma_pipeline()
    add_tiny_lora(pipe.transformer, target_modules=FLUX_LORA_TARGETS)
    return pipe


def test_chroma_gradient_is_the_flux_scripts_gradient_with_chromas_conditioning():
    pipe = tiny_chroma_pipeline()
    sketcher = check_sketch_matches_reference(pipe, chroma_reference_loss(), structured_images(3), PROMPTS)
    assert sketcher.spec.family == "chroma" and sketcher.spec.objective["guidance"] is None


def test_chroma_lora_gradient_with_cosmap_weighting_and_no_normalisation():
    check_sketch_matches_reference(
        _lora_pipe(),
        chroma_reference_loss("cosmap"),
        structured_images(2),
        PROMPTS[:2],
        params="lora",
        weighting_scheme="cosmap",
        normalize="none",
    )


def test_chroma_has_no_guidance_to_override():
    with pytest.raises(ValueError, match="guidance_scale"):
        GradientSketcher.from_pipeline(tiny_chroma_pipeline(), DMinConfig(guidance_scale=3.5))


def test_chroma_self_retrieval_and_return_influence():
    pipe = _lora_pipe()
    index = check_self_retrieval(pipe, structured_images(4), PROMPTS + ["a blue circle"])
    check_return_influence(pipe, index, "a photo of a cat")
    # image-to-image calls the transformer as text-to-image does (ChromaInpaintPipeline is not matched: in diffusers
    # 0.42 it reads `transformer.config.guidance_embeds`, which ChromaTransformer2DModel lacks, and cannot run)
    from diffusers import ChromaImg2ImgPipeline, ChromaInpaintPipeline

    def same_components(cls):
        accepted = inspect.signature(cls.__init__).parameters
        other = cls(**{k: v for k, v in pipe.components.items() if k in accepted})
        other.default_sample_size = pipe.default_sample_size
        return other

    check_return_influence(
        same_components(ChromaImg2ImgPipeline), index, "a cat", image=structured_images(1), strength=0.9
    )
    with pytest.raises(UnsupportedPipelineError, match="ChromaPipeline"):
        InfluencePipeline(same_components(ChromaInpaintPipeline), index)


def test_chroma_latents_from_pipeline_are_what_the_vae_decodes():
    pipe = tiny_chroma_pipeline()
    pipe.set_progress_bar_config(disable=True)
    adapter = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1, sketch_dim=16)).adapter
    kwargs = dict(prompt="a photo of a cat", num_inference_steps=2)
    packed = pipe(**kwargs, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    latents = adapter.latents_from_pipeline(packed)
    assert latents.shape == (1, 4, 8, 8)
    image = pipe(**kwargs, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), image, rtol=0, atol=1e-5)


# Timestep indices whose s = (t + 1) / 1000 is exact in bfloat16 (1, 1/2, 1/4, 1/8).
BF16_EXACT_TIMESTEPS = (999, 499, 249, 124)


@pytest.mark.parametrize(
    "config, min_cosine",
    [({"timestep_spacing": BF16_EXACT_TIMESTEPS, "num_timesteps": 4}, 0.98), ({}, 0.8)],
    ids=["bf16-exact-timesteps", "default-timesteps"],
)
def test_chroma_bfloat16_lora_agrees_with_float32(config, min_cosine):
    # ChromaTransformer2DModel (like Flux) casts the timestep s to the model dtype before multiplying by 1000; in
    # bfloat16 s = 0.985 becomes 0.984375, so a bfloat16 model is called at another timestep than in float32 (in
    # training as here). The tiny Chroma's time approximator is sensitive to that: at timesteps exact in bfloat16 the
    # sketches agree to ~0.9996, at the default ones to ~0.86.
    cosine = check_half_precision_agrees(
        _lora_pipe, structured_images(2), PROMPTS[:2], dtype=torch.bfloat16, min_cosine=min_cosine, **config
    )
    print(f"bfloat16 vs float32 min cosine: {cosine:.4f}")


def test_chroma_lora_dmin_build_and_search(tmp_path, capsys):
    """`dmin build` / `dmin search` on a saved ChromaPipeline with a LoRA loaded by `load_lora_weights`."""
    from diffusers import ChromaPipeline
    from peft.utils import get_peft_model_state_dict

    from diffusers_dmin.cli import main
    from diffusers_dmin.data import load_digits

    pipe = tiny_chroma_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    add_tiny_lora(pipe.transformer, target_modules=FLUX_LORA_TARGETS, seed=1)
    ChromaPipeline.save_lora_weights(
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
