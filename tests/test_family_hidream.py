"""HiDream-I1 family against `examples/dreambooth/train_dreambooth_lora_hidream.py`, written out here.

The reference loss follows the script's training step: VAE latents `(z - shift_factor) * scaling_factor` (the script
samples the latent distribution; DMin takes its deterministic `mode()`), prompts through the pipeline's
`encode_prompt(prompt=..., max_sequence_length=128)`, a `FlowMatchEulerDiscreteScheduler` built from the pipeline's
scheduler config with `shift=3.0` (`from_pretrained(..., shift=3.0)`), `sigmas` looked up by timestep as its
`get_sigmas` does, `(1 - s) x0 + s e`, the transformer as the script loads it (`force_inference_output=True`, in
`train()` mode) called with `timesteps` unscaled, `model_pred * -1`, target `e - x0`, the weighting of
`compute_loss_weighting_for_sd3` (`none` by default).
"""

import contextlib

import pytest
import torch

from diffusers_dmin import DMinConfig, GradientSketcher
from diffusers_dmin.testing import add_tiny_lora, tiny_hidream_pipeline
from family_checks import (
    check_half_precision_agrees,
    check_return_influence,
    check_self_retrieval,
    check_sketch_matches_reference,
    structured_images,
)


PROMPTS = ["a photo of a cat", "a red square", "the digit three"]
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out")  # the script's default `--lora_layers`


@contextlib.contextmanager
def script_transformer(transformer):
    """The transformer as the script runs it: loaded with `force_inference_output=True`, in `train()` mode."""
    flagged = [m for m in transformer.modules() if hasattr(m, "_force_inference_output")]
    was_training = transformer.training
    transformer.register_to_config(force_inference_output=True)
    for module in flagged:
        module._force_inference_output = True
    transformer.train()
    try:
        yield transformer
    finally:
        transformer.train(was_training)
        for module in flagged:
            module._force_inference_output = False
        transformer.register_to_config(force_inference_output=False)


def hidream_reference_loss(weighting_scheme="none"):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    def loss_fn(pipe, pixels, prompt, noise, t):
        vae = pipe.vae
        with torch.no_grad():
            model_input = vae.encode(pixels).latent_dist.mode()
            model_input = (model_input - vae.config.shift_factor) * vae.config.scaling_factor
            t5_embeds, _, llama3_embeds, _, pooled_embeds, _ = pipe.encode_prompt(
                prompt=[prompt], max_sequence_length=128, device="cpu"
            )
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=3.0)
        index = scheduler.config.num_train_timesteps - 1 - t  # DMin's t -> the script's `indices`
        timesteps = scheduler.timesteps[[index]]
        step = [(scheduler.timesteps == s).nonzero().item() for s in timesteps]  # the script's get_sigmas
        sigmas = scheduler.sigmas[step].view(-1, 1, 1, 1)
        noisy = (1.0 - sigmas) * model_input + sigmas * noise
        with script_transformer(pipe.transformer) as transformer:
            model_pred = transformer(
                hidden_states=noisy,
                encoder_hidden_states_t5=t5_embeds,
                encoder_hidden_states_llama3=llama3_embeds,
                pooled_embeds=pooled_embeds,
                timesteps=timesteps,
                return_dict=False,
            )[0]
        model_pred = model_pred * -1
        weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas)
        target = noise - model_input
        return torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(1, -1), 1)[0]

    return loss_fn


def _lora_pipe():
    pipe = tiny_hidream_pipeline()
    add_tiny_lora(pipe.transformer, target_modules=LORA_TARGETS)
    return pipe


def test_hidream_gradient_is_the_training_scripts_gradient():
    pipe = tiny_hidream_pipeline()
    sketcher = check_sketch_matches_reference(
        pipe, hidream_reference_loss(), structured_images(3), PROMPTS, params=["double_stream_blocks.*"]
    )
    assert sketcher.adapter.family == "hidream"
    assert sketcher.spec.objective["prediction_sign"] == -1.0 and sketcher.spec.objective["shift"] == 3.0


def test_hidream_lora_gradient_with_cosmap_weighting_and_no_normalisation():
    sketcher = check_sketch_matches_reference(
        _lora_pipe(),
        hidream_reference_loss("cosmap"),
        structured_images(2),
        PROMPTS[:2],
        params="lora",
        weighting_scheme="cosmap",
        normalize="none",
    )
    assert sketcher.spec.objective["weighting"] == "cosmap"


def test_hidream_objective_ignores_the_sampling_scheduler():
    """HiDream-I1-Full samples with a flow-sigma UniPC scheduler; the script still trains with a flow-matching Euler
    scheduler built from that config with shift 3.0, and so does DMin: same sketches as with the Euler pipeline."""
    from diffusers import UniPCMultistepScheduler

    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    config = DMinConfig(num_timesteps=3, sketch_dim=256, params=["double_stream_blocks.*"])
    images = structured_images(2)
    euler = GradientSketcher.from_pipeline(tiny_hidream_pipeline(), config)(images=images, prompts=PROMPTS[:2])
    sketcher = GradientSketcher.from_pipeline(tiny_hidream_pipeline(scheduler=unipc), config)
    assert sketcher.objective.flow_matching and sketcher.objective.target_name == "flow"
    torch.testing.assert_close(sketcher(images=images, prompts=PROMPTS[:2]), euler)


def test_hidream_self_retrieval_and_return_influence():
    pipe = _lora_pipe()
    images = structured_images(4)
    index = check_self_retrieval(pipe, images, PROMPTS + ["a blue circle"])
    check_return_influence(pipe, index, "a photo of a cat")


def test_hidream_pipeline_latents_are_the_vae_layout():
    """What `callback_on_step_end` sees is what the VAE decodes (after `/ scaling_factor + shift_factor`), and the
    sketcher's latent shape; `output_type="latent"` returns the same tensor."""
    pipe = tiny_hidream_pipeline()
    pipe.set_progress_bar_config(disable=True)
    captured = {}

    def callback(pipeline, step, timestep, kwargs):
        captured["latents"] = kwargs["latents"]
        return kwargs

    kwargs = dict(prompt="a photo of a cat", num_inference_steps=2, callback_on_step_end=callback)
    images = pipe(output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs).images
    sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=2, sketch_dim=64))
    latents = sketcher.adapter.latents_from_pipeline(captured["latents"])
    assert tuple(latents.shape[1:]) == sketcher.adapter.latent_shape == (4, 8, 8)
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
    torch.testing.assert_close((decoded / 2 + 0.5).clamp(0, 1), images, atol=1e-5, rtol=0)
    plain = pipe(output_type="latent", generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.testing.assert_close(sketcher.adapter.latents_from_pipeline(plain), latents)


def test_hidream_reloaded_pipeline_with_lora_weights_loaded_like_users_do(tmp_path):
    """`save_pretrained` -> `DiffusionPipeline.from_pretrained` -> `load_lora_weights` (diffusers' PEFT integration,
    as `dmin build --lora-weights` loads them) gives the sketches of the in-memory LoRA pipeline."""
    from diffusers import DiffusionPipeline, HiDreamImagePipeline
    from peft.utils import get_peft_model_state_dict

    pipe = tiny_hidream_pipeline()
    pipe.save_pretrained(tmp_path / "pipe")
    add_tiny_lora(pipe.transformer, rank=4, alpha=4, seed=1, target_modules=LORA_TARGETS)  # alpha = rank, as loaded
    HiDreamImagePipeline.save_lora_weights(
        tmp_path / "lora", transformer_lora_layers=get_peft_model_state_dict(pipe.transformer)
    )
    reloaded = DiffusionPipeline.from_pretrained(tmp_path / "pipe")
    reloaded.load_lora_weights(tmp_path / "lora")
    assert type(reloaded) is HiDreamImagePipeline
    config = DMinConfig(num_timesteps=2, sketch_dim=256, params="lora", resolution=(16, 16))
    images = structured_images(2)
    expected = GradientSketcher.from_pipeline(pipe, config)(images=images, prompts=PROMPTS[:2])
    sketches = GradientSketcher.from_pipeline(reloaded, config)(images=images, prompts=PROMPTS[:2])
    torch.testing.assert_close(sketches, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_hidream_half_precision_lora_agrees_with_float32(dtype):
    cosine = check_half_precision_agrees(_lora_pipe, structured_images(2), PROMPTS[:2], dtype=dtype)
    print(f"hidream {dtype} vs float32: min cosine {cosine:.4f}")
    assert cosine > 0.98
