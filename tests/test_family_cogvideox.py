"""CogVideoX (text-to-video, 5-D latents) against `examples/cogvideo/train_cogvideox_lora.py`, written out here.

The reference loss follows the script's training step: the video `(F, C, H, W)` permuted to the VAE's
`(C, F, H, W)`, latents `latent_dist * scaling_factor` (the script samples; DMin takes the `mode()`) permuted to
`(F', C, h, w)`, the noise likewise, T5 embeddings of `max_text_seq_length` tokens (the script's own
`_get_t5_prompt_embeds`), a `CogVideoXDPMScheduler` from the pipeline's scheduler config, `add_noise` at the integer
timestep, 3-D rotary embeddings from its `prepare_rotary_positional_embeddings` (480x720 base), and the loss
`mean(w (get_velocity(model_output, noisy, t) - x0)^2)` with `w = 1 / (1 - alphas_cumprod[t])`.
"""

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_dmin import ConfigError, DMinConfig, GradientSketcher, InfluencePipeline
from diffusers_dmin.testing import add_tiny_lora, tiny_cogvideox_pipeline
from family_checks import (
    check_half_precision_agrees,
    check_self_retrieval,
    check_sketch_matches_reference,
    structured_images,
)


PROMPTS = ["a photo of a cat", "a red square", "the digit three", "a blue circle"]
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")  # the script's target modules
SIZE = (32, 32)
FRAMES = 9


def structured_videos(n: int) -> torch.Tensor:
    """`n` distinct `(F, C, H, W)` videos in `[0, 1]`: a rectangle moving from frame to frame, different per video."""
    frames = structured_images(3 * n + FRAMES, SIZE[0])
    return torch.stack([frames[3 * i : 3 * i + FRAMES] for i in range(n)])


def cogvideox_reference_loss():
    from diffusers import CogVideoXDPMScheduler
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from diffusers.pipelines.cogvideo.pipeline_cogvideox import get_resize_crop_region_for_grid

    def prepare_rotary_positional_embeddings(height, width, num_frames, vae_scale_factor_spatial, patch_size, dim):
        base_height, base_width = 480, 720  # the script's defaults
        grid_height = height // (vae_scale_factor_spatial * patch_size)
        grid_width = width // (vae_scale_factor_spatial * patch_size)
        base_size_width = base_width // (vae_scale_factor_spatial * patch_size)
        base_size_height = base_height // (vae_scale_factor_spatial * patch_size)
        crops = get_resize_crop_region_for_grid((grid_height, grid_width), base_size_width, base_size_height)
        return get_3d_rotary_pos_embed(
            embed_dim=dim, crops_coords=crops, grid_size=(grid_height, grid_width), temporal_size=num_frames
        )

    def loss_fn(pipe, pixels, prompt, noise, t):
        vae, transformer, config = pipe.vae, pipe.transformer, pipe.transformer.config
        with torch.no_grad():
            video = pixels.permute(0, 2, 1, 3, 4)  # [B, C, F, H, W]
            model_input = vae.encode(video).latent_dist.mode() * vae.config.scaling_factor
            model_input = model_input.permute(0, 2, 1, 3, 4)  # [B, F, C, H, W]
            ids = pipe.tokenizer(
                [prompt],
                padding="max_length",
                max_length=config.max_text_seq_length,
                truncation=True,
                add_special_tokens=True,
                return_tensors="pt",
            ).input_ids
            prompt_embeds = pipe.text_encoder(ids)[0]
        noise = noise.permute(0, 2, 1, 3, 4)  # the index's noise is in the VAE layout
        scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
        timesteps = torch.tensor([t]).long()
        height, width = pixels.shape[-2:]
        rotary = prepare_rotary_positional_embeddings(
            height=height,
            width=width,
            num_frames=model_input.shape[1],
            vae_scale_factor_spatial=2 ** (len(vae.config.block_out_channels) - 1),
            patch_size=config.patch_size,
            dim=config.attention_head_dim,
        )
        noisy_model_input = scheduler.add_noise(model_input, noise, timesteps)
        model_output = transformer(
            hidden_states=noisy_model_input,
            encoder_hidden_states=prompt_embeds,
            timestep=timesteps,
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]
        model_pred = scheduler.get_velocity(model_output, noisy_model_input, timesteps)
        weights = 1 / (1 - scheduler.alphas_cumprod[timesteps])
        while len(weights.shape) < len(model_pred.shape):
            weights = weights.unsqueeze(-1)
        target = model_input
        return torch.mean((weights * (model_pred - target) ** 2).reshape(1, -1), dim=1)[0]

    return loss_fn


def _lora_pipe(scheduler="ddim"):
    pipe = tiny_cogvideox_pipeline(scheduler=scheduler)
    add_tiny_lora(pipe.transformer, target_modules=LORA_TARGETS)
    return pipe


def test_cogvideox_gradient_is_the_training_scripts_gradient():
    pipe = tiny_cogvideox_pipeline()  # CogVideoX-2b's scheduler: SNR shift 3.0, zero terminal SNR
    sketcher = check_sketch_matches_reference(
        pipe, cogvideox_reference_loss(), structured_videos(2), PROMPTS[:2], resolution=SIZE
    )
    assert sketcher.adapter.family == "cogvideox" and sketcher.objective.target_name == "v_prediction"
    assert sketcher.adapter.latent_shape == (4, 3, 4, 4)


def test_cogvideox_lora_gradient_with_the_5b_scheduler_and_no_normalisation():
    check_sketch_matches_reference(
        _lora_pipe("dpm"),
        cogvideox_reference_loss(),
        structured_videos(2),
        PROMPTS[:2],
        params="lora",
        normalize="none",
        resolution=SIZE,
    )


def test_cogvideox_videos_enter_as_tensors_arrays_or_pil_frames():
    pipe = tiny_cogvideox_pipeline()
    sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=2, sketch_dim=256, resolution=SIZE))
    videos = structured_videos(2)
    reference = sketcher(images=videos, prompts=PROMPTS[:2])
    array = videos.permute(0, 1, 3, 4, 2).numpy()  # (B, F, H, W, C) as output_type="np" returns
    torch.testing.assert_close(sketcher(images=array, prompts=PROMPTS[:2]), reference)
    frames = [[PIL.Image.fromarray((f * 255).round().astype(np.uint8)) for f in video] for video in array]
    assert (
        torch.nn.functional.cosine_similarity(sketcher(images=frames, prompts=PROMPTS[:2]), reference, -1).min() > 0.99
    )
    with pytest.raises(ConfigError, match="frames"):
        sketcher(images=videos[:, :5], prompts=PROMPTS[:2])
    with pytest.raises(ConfigError, match="videos"):
        sketcher(images=videos[:, 0], prompts=PROMPTS[:2])


def test_cogvideox_self_retrieval_and_return_influence():
    pipe = _lora_pipe()
    index = check_self_retrieval(pipe, structured_videos(4), PROMPTS, resolution=SIZE)
    wrapped = InfluencePipeline(pipe, index)
    wrapped.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a photo of a cat", num_inference_steps=2, output_type="np")
    out = wrapped(return_influence=True, top_k=2, generator=torch.Generator().manual_seed(0), **kwargs)
    assert out.images.shape == (1, FRAMES, *SIZE, 3)  # the pipeline's frames, at the index's resolution
    result = out.influence[0]
    assert len(result.sample_ids) == 2 and result.scores[0] >= result.scores[1]
    assert result.query.size == SIZE  # the first frame
    plain = pipe(height=SIZE[0], width=SIZE[1], generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert abs(plain - out.images).max() < 1e-5  # the wrapped pipeline ran unchanged
    with pytest.raises(ConfigError, match="num_frames"):  # refused before generating
        wrapped(return_influence=True, num_frames=5, **kwargs)
    # existing videos (here training videos 1 and 2, as (B, F, H, W, C) arrays) are attributed to themselves
    videos = structured_videos(4)[1:3].permute(0, 1, 3, 4, 2).numpy()
    attributed = wrapped.attribute(videos, prompts=PROMPTS[1:3], top_k=1)
    assert [int(r.sample_ids[0]) for r in attributed] == [1, 2]
    assert attributed[0].query.size == SIZE  # the first frame


def test_cogvideox_pipeline_latents_are_the_vae_layout():
    """The pipeline denoises `(B, F, C, h, w)`; `latents_from_pipeline` gives the VAE's `(B, C, F, h, w)`, which the VAE
    decodes (after `/ scaling_factor`) to the pipeline's own frames."""
    pipe = tiny_cogvideox_pipeline()
    pipe.set_progress_bar_config(disable=True)
    captured = {}

    def callback(pipeline, step, timestep, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    kwargs = dict(prompt="a photo of a cat", height=32, width=32, num_inference_steps=2, callback_on_step_end=callback)
    frames = pipe(output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).frames
    sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=2, sketch_dim=64, resolution=SIZE))
    latents = sketcher.adapter.latents_from_pipeline(captured["latents"])
    assert tuple(latents.shape[1:]) == sketcher.adapter.latent_shape == (4, 3, 4, 4)
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample  # (B, C, F, H, W)
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4), frames, atol=1e-5, rtol=0)


def test_cogvideox_reloaded_pipeline_with_lora_weights_loaded_like_users_do(tmp_path):
    """`save_pretrained` -> `DiffusionPipeline.from_pretrained` -> `load_lora_weights` (diffusers' PEFT integration,
    as `dmin build --lora-weights` loads them) gives the sketches of the in-memory LoRA pipeline."""
    from diffusers import CogVideoXPipeline, DiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_cogvideox_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    add_tiny_lora(pipe.transformer, rank=4, alpha=4, seed=1, target_modules=LORA_TARGETS)  # alpha = rank, as loaded
    CogVideoXPipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer)
    )
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    reloaded.load_lora_weights(tmp_path / "lora")
    assert type(reloaded) is CogVideoXPipeline
    config = DMinConfig(num_timesteps=2, sketch_dim=256, params="lora", resolution=SIZE)
    images = structured_videos(2)
    expected = GradientSketcher.from_pipeline(pipe, config)(images=images, prompts=PROMPTS[:2])
    sketches = GradientSketcher.from_pipeline(reloaded, config)(images=images, prompts=PROMPTS[:2])
    torch.testing.assert_close(sketches, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_cogvideox_half_precision_lora_agrees_with_float32(dtype):
    cosine = check_half_precision_agrees(_lora_pipe, structured_videos(2), PROMPTS[:2], dtype=dtype, resolution=SIZE)
    print(f"cogvideox {dtype} vs float32: min cosine {cosine:.4f}")
    assert cosine > 0.98
