"""Qwen-Image family against `examples/dreambooth/train_dreambooth_lora_qwen_image.py`, written out here.

The reference loss follows the script's training step: 5-D VAE latents of `pixel_values.unsqueeze(2)` normalised as
`(z - latents_mean) * (1 / latents_std)` (the script samples the latent distribution; DMin takes its deterministic
`mode()`, DESIGN §1), prompt embeddings and mask from `encode_prompt(prompt, max_sequence_length=512)`, the
scheduler `FlowMatchEulerDiscreteScheduler.from_config(config, shift=3.0)` (`from_pretrained(..., shift=3.0)` in the
script) and its `sigmas`/`timesteps`, the noisy input `(1 - s) x0 + s e` with the frame axis moved in front of the
channels and packed by `QwenImagePipeline._pack_latents`, `img_shapes = [(1, h // 2, w // 2)]`, the transformer
called with `timestep = timesteps / 1000`, the prediction unpacked by `QwenImagePipeline._unpack_latents`, target
`e - x0` and the weighting of `compute_loss_weighting_for_sd3` (`none` by default; `cosmap` when asked).
"""

import pytest
import torch

from diffusers_dmin import DMinConfig, GradientSketcher, InfluencePipeline
from diffusers_dmin.errors import ConfigError
from diffusers_dmin.testing import add_tiny_lora, tiny_qwenimage_pipeline
from family_checks import (
    check_half_precision_agrees,
    check_return_influence,
    check_self_retrieval,
    check_sketch_matches_reference,
    structured_images,
)


# prompts of different token lengths: batched, the shorter ones are padded and masked
PROMPTS = ["a photo of a cat", "red", "the digit three"]


def qwenimage_reference_loss(weighting_scheme="none"):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    def loss_fn(pipe, pixels, prompt, noise, t):
        vae = pipe.vae
        vae_scale_factor = 2 ** len(vae.temperal_downsample)
        latents_mean = torch.tensor(vae.config.latents_mean).view(1, vae.config.z_dim, 1, 1, 1)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, vae.config.z_dim, 1, 1, 1)
        with torch.no_grad():
            model_input = vae.encode(pixels.unsqueeze(2)).latent_dist.mode()
            model_input = (model_input - latents_mean) * latents_std
            prompt_embeds, prompt_embeds_mask = pipe.encode_prompt(prompt=prompt, max_sequence_length=512)
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.0)
        i = scheduler.config.num_train_timesteps - 1 - t  # DMin's t (larger = noisier) -> the script's index
        timesteps = scheduler.timesteps[i : i + 1]
        sigmas = scheduler.sigmas[i : i + 1].view(-1, 1, 1, 1, 1)
        noisy_model_input = (1.0 - sigmas) * model_input + sigmas * noise
        latent_height, latent_width = model_input.shape[3], model_input.shape[4]
        img_shapes = [(1, latent_height // 2, latent_width // 2)]
        noisy_model_input = noisy_model_input.permute(0, 2, 1, 3, 4)
        packed = QwenImagePipeline._pack_latents(
            noisy_model_input,
            batch_size=model_input.shape[0],
            num_channels_latents=model_input.shape[1],
            height=model_input.shape[3],
            width=model_input.shape[4],
        )
        model_pred = pipe.transformer(
            hidden_states=packed,
            encoder_hidden_states=prompt_embeds,
            encoder_hidden_states_mask=prompt_embeds_mask,
            timestep=timesteps / 1000,
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
        model_pred = QwenImagePipeline._unpack_latents(
            model_pred, latent_height * vae_scale_factor, latent_width * vae_scale_factor, vae_scale_factor
        )
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
        target = noise - model_input
        return torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(1, -1), 1)[0]

    return loss_fn


def _lora_pipe():
    pipe = tiny_qwenimage_pipeline()
    add_tiny_lora(pipe.transformer)
    return pipe


def test_qwenimage_gradient_is_the_training_scripts_gradient():
    pipe = tiny_qwenimage_pipeline()
    sketcher = check_sketch_matches_reference(
        pipe, qwenimage_reference_loss(), structured_images(3), PROMPTS, params=["transformer_blocks.0.*"]
    )
    assert sketcher.adapter.family == "qwenimage"
    assert sketcher.spec.latent_shape == (4, 1, 4, 4)  # the VAE's 5-D layout, one frame


def test_qwenimage_lora_gradient_with_cosmap_weighting_and_no_normalisation():
    pipe = _lora_pipe()
    sketcher = check_sketch_matches_reference(
        pipe,
        qwenimage_reference_loss("cosmap"),
        structured_images(2),
        PROMPTS[:2],
        params="lora",
        weighting_scheme="cosmap",
        normalize="none",
    )
    assert sketcher.spec.objective["weighting"] == "cosmap"


def test_qwenimage_script_shift_is_a_no_op_under_dynamic_shifting():
    """The checkpoints' config shifts dynamically, so the script's `shift=3.0` leaves the training sigmas at t / 1000;
    a static config gets the shift, and the sketches still follow the script."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = tiny_qwenimage_pipeline()
    sigmas = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1)).objective.scheduler.sigmas
    torch.testing.assert_close(sigmas, torch.arange(1000, 0, -1) / 1000.0)

    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0)  # static shifting: the script's 3.0 applies
    sigmas = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1)).objective.scheduler.sigmas
    plain = torch.arange(1000, 0, -1) / 1000.0
    torch.testing.assert_close(sigmas, 3.0 * plain / (1 + 2.0 * plain))
    check_sketch_matches_reference(
        pipe, qwenimage_reference_loss(), structured_images(2), PROMPTS[1:], params=["transformer_blocks.1.attn.*"]
    )


def test_qwenimage_self_retrieval_and_return_influence():
    pipe = _lora_pipe()
    images = structured_images(4)
    prompts = PROMPTS + ["a blue circle"]
    index = check_self_retrieval(pipe, images, prompts)
    check_return_influence(pipe, index, "a photo of a cat")
    # a LoRA scale at generation (`attention_kwargs` in this pipeline) is not the model the index describes
    with pytest.raises(ConfigError, match="attention_kwargs"):
        InfluencePipeline(pipe, index)("a photo of a cat", attention_kwargs={"scale": 0.5}, return_influence=True)


def test_qwenimage_latents_from_pipeline_unpack_like_the_pipeline():
    from diffusers import QwenImagePipeline

    pipe = tiny_qwenimage_pipeline()
    sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1, sketch_dim=64))
    packed = pipe(
        ["a photo of a cat", "red"],
        num_inference_steps=2,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert packed.shape == (2, 4, 16)  # (B, h/2 * w/2, 4 C) tokens
    unpacked = sketcher.adapter.latents_from_pipeline(packed)
    torch.testing.assert_close(unpacked, QwenImagePipeline._unpack_latents(packed, 16, 16, 4), rtol=0, atol=0)
    # and back: the adapter's packing inside `forward` is the pipeline's `_pack_latents` of the (B, 1, C, h, w) view
    repacked = QwenImagePipeline._pack_latents(unpacked.permute(0, 2, 1, 3, 4), 2, 4, 4, 4)
    torch.testing.assert_close(repacked, packed, rtol=0, atol=0)


def test_qwenimage_reloaded_pipeline_with_lora_weights_loaded_like_users_do(tmp_path):
    """`save_pretrained` -> `DiffusionPipeline.from_pretrained` -> `load_lora_weights` (diffusers' PEFT integration,
    as `dmin build --lora-weights` loads them) gives the sketches of the in-memory LoRA pipeline."""
    from diffusers import DiffusionPipeline, QwenImagePipeline
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_qwenimage_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    add_tiny_lora(pipe.transformer, rank=4, alpha=4, seed=1)  # alpha = rank: the scale a weights-only file loads with
    QwenImagePipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer)
    )
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    reloaded.load_lora_weights(tmp_path / "lora")
    config = DMinConfig(num_timesteps=2, sketch_dim=256, params="lora", resolution=(16, 16))
    images = structured_images(2)
    expected = GradientSketcher.from_pipeline(pipe, config)(images=images, prompts=PROMPTS[:2])
    sketches = GradientSketcher.from_pipeline(reloaded, config)(images=images, prompts=PROMPTS[:2])
    torch.testing.assert_close(sketches, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_qwenimage_half_precision_lora_agrees_with_float32(dtype):
    cosine = check_half_precision_agrees(_lora_pipe, structured_images(2), PROMPTS[:2], dtype=dtype)
    assert cosine > 0.98
