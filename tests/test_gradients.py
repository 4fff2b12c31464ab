"""GradientSketcher: batched == looped, dense gradients against autograd, self-similarity, parameter selection,
state restoration and errors."""

import pytest
import torch

from diffusers_dmin import ConfigError, DMinConfig, NonFiniteGradientError
from diffusers_dmin.gradients import GradientSketcher, fingerprint_parameters, select_parameters
from diffusers_dmin.sketch import OPORPSketch
from diffusers_dmin.testing import (
    add_tiny_lora,
    tiny_ddpm_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)


PROMPTS = ["a photo of a cat", "a red square", "the digit three"]


def _images(channels: int, n: int = 3) -> torch.Tensor:
    """Distinct structured images: a bright square at a different place in each."""
    images = torch.full((n, channels, 16, 16), 0.1)
    for i in range(n):
        images[i, :, 2 + 4 * i : 6 + 4 * i, 3 : 3 + 6 + i] = 0.9
    return images


FAMILIES = {
    "ddpm": (lambda: tiny_ddpm_pipeline(), 1),
    "sd": (lambda: tiny_sd_pipeline(), 3),
    "sdxl": (lambda: tiny_sdxl_pipeline(), 3),
    "sd3": (lambda: tiny_sd3_pipeline(), 3),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    make, channels = FAMILIES[request.param]
    return request.param, make(), channels


def test_batched_equals_looped_and_self_similarity(family):
    name, pipe, channels = family
    config = DMinConfig(num_timesteps=4, sketch_dim=2048)
    images = _images(channels)
    prompts = PROMPTS if name != "ddpm" else None
    batched = GradientSketcher.from_pipeline(pipe, config, mode="vmap")(images=images, prompts=prompts)
    looped = GradientSketcher.from_pipeline(pipe, config, mode="loop")(images=images, prompts=prompts)
    assert batched.shape == (3, 4, 2048) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, looped, rtol=1e-4, atol=1e-5)

    scores = torch.einsum("atk,btk->ab", batched, batched)
    num_t = 4
    assert torch.allclose(scores.diagonal(), torch.full((3,), float(num_t)), atol=0.1 * num_t)
    for i in range(3):  # each sample scores highest with itself
        assert scores[i, i] == scores[i].max()


def test_sketches_are_the_sketch_of_the_normalised_dense_gradients(family):
    name, pipe, channels = family
    config = DMinConfig(num_timesteps=2, sketch_dim=512, seed=3)
    sketcher = GradientSketcher.from_pipeline(pipe, config)
    images = _images(channels, 2)
    prompts = PROMPTS[:2] if name != "ddpm" else None
    dense = sketcher.full_gradients(images=images, prompts=prompts)
    assert dense.shape == (2, 2, sketcher.input_dim)
    torch.testing.assert_close(dense.norm(dim=-1), torch.ones(2, 2), rtol=1e-5, atol=1e-5)
    reference = OPORPSketch(sketcher.input_dim, 512, seed=3)(dense)
    torch.testing.assert_close(sketcher(images=images, prompts=prompts), reference, rtol=1e-4, atol=1e-5)


def test_dense_gradient_matches_plain_autograd():
    pipe = tiny_ddpm_pipeline()
    sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(timestep_spacing=[700], normalize="none"))
    image = _images(1, 1)
    dense = sketcher.full_gradients(images=image)[0, 0]

    unet = pipe.unet
    params = [p for n, p in unet.named_parameters() if n in set(sketcher.param_names)]
    x0 = image * 2 - 1
    noise = sketcher.noise[0][None]
    t = torch.tensor([700])
    noisy = pipe.scheduler.add_noise(x0, noise, t)
    loss = torch.nn.functional.mse_loss(unet(noisy, t).sample, noise)
    expected = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    torch.testing.assert_close(dense, expected, rtol=1e-4, atol=1e-7)


def test_normalisation_options():
    pipe = tiny_ddpm_pipeline()
    images = _images(1, 2)
    raw = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=2, normalize="none")).full_gradients(
        images=images
    )
    by_layer = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=2, normalize="layer"))
    layered = by_layer.full_gradients(images=images)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2, 2))
    torch.testing.assert_close(layered.norm(dim=-1), torch.ones(2, 2), rtol=1e-5, atol=1e-5)
    # every parameter tensor with a real gradient contributes the same share of the norm; the attention key biases,
    # whose true gradient is zero (softmax ignores a shift shared by all logits), contribute nothing rather than
    # their float rounding blown up to a unit vector
    shares, offset = [], 0
    for name, param in by_layer.parameters:
        shares.append(layered[..., offset : offset + param.numel()].norm(dim=-1) ** 2)
        offset += param.numel()
    shares = torch.stack(shares, dim=-1)  # (2, 2, num_tensors)
    zero = [i for i, (name, _) in enumerate(by_layer.parameters) if name.endswith("to_k.bias")]
    assert zero and torch.all(shares[..., zero] == 0)
    live = [i for i in range(len(by_layer.param_names)) if i not in zero]
    torch.testing.assert_close(shares[..., live], torch.full((2, 2, len(live)), 1 / len(live)), rtol=1e-4, atol=1e-6)
    # and the batched and looped engines agree, rounding noise and all
    looped = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=2, normalize="layer"), mode="loop")
    torch.testing.assert_close(looped.full_gradients(images=images), layered, rtol=1e-4, atol=1e-6)


def test_several_noise_draws_average_normalised_sketches():
    pipe = tiny_ddpm_pipeline()
    sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=2, sketch_dim=256, num_noise_draws=3))
    assert sketcher.noise.shape == (3, 1, 16, 16)
    out = sketcher(images=_images(1, 2))
    assert out.shape == (2, 2, 256)
    assert (out.norm(dim=-1) < 1.0).all()  # a mean of unit vectors pointing in different directions


def test_parameter_selection_presets_and_lora():
    pipe = tiny_sd_pipeline()
    unet = pipe.unet
    attention = select_parameters(unet, "attention")
    assert attention and all("transformer_blocks" in n for n, _ in attention)
    assert len(select_parameters(unet, "all")) == len(list(unet.parameters()))
    assert select_parameters(unet, "auto") == attention
    patterns = select_parameters(unet, ["*attn1.to_q*"])
    assert patterns and all("attn1.to_q" in n for n, _ in patterns)
    with pytest.raises(ConfigError, match="matches no parameter"):
        select_parameters(unet, ["*nothing*"])
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        select_parameters(unet, "lora")

    ddpm_attention = select_parameters(tiny_ddpm_pipeline().unet, "attention")
    assert ddpm_attention and all(".attentions." in n for n, _ in ddpm_attention)

    add_tiny_lora(unet)
    lora = select_parameters(unet, "auto")
    assert lora and all("lora_" in n for n, _ in lora)
    sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=2, sketch_dim=128))
    assert sketcher.input_dim == sum(p.numel() for _, p in lora)
    out = sketcher(images=_images(3, 2), prompts=PROMPTS[:2])
    assert torch.isfinite(out).all() and (out.norm(dim=-1) > 0.5).all()
    # both halves of every LoRA pair carry gradient (a random, non-zero adapter)
    dense = sketcher.full_gradients(images=_images(3, 1), prompts=PROMPTS[:1])[0, 0]
    offset = 0
    for name, param in sketcher.parameters:
        assert dense[offset : offset + param.numel()].abs().sum() > 0, name
        offset += param.numel()


def test_lora_on_pixel_unet_and_active_adapter_only():
    pipe = tiny_ddpm_pipeline()
    add_tiny_lora(pipe.unet, target_modules=("to_q", "to_v"))
    names = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1)).param_names
    assert names and all("lora_" in n and ".default." in n for n in names)


def test_model_state_is_restored_and_works_under_no_grad():
    pipe = tiny_sd_pipeline()
    unet = pipe.unet
    unet.train()
    flags = {n: p.requires_grad for n, p in unet.named_parameters()}
    some = next(unet.parameters())
    some.requires_grad_(False)
    flags[next(n for n, _ in unet.named_parameters())] = False
    marker = next(p for n, p in unet.named_parameters() if "transformer_blocks" in n)
    marker.grad = torch.full_like(marker, 7.0)
    for mode in ("vmap", "loop"):
        sketcher = GradientSketcher.from_pipeline(
            pipe, DMinConfig(num_timesteps=2, sketch_dim=64, params="all"), mode=mode
        )
        with torch.no_grad():  # diffusers pipelines call everything under no_grad
            out = sketcher(images=_images(3, 1), prompts=PROMPTS[:1])
        assert torch.isfinite(out).all()
        assert unet.training
        assert {n: p.requires_grad for n, p in unet.named_parameters()} == flags
        assert torch.equal(marker.grad, torch.full_like(marker, 7.0))


def test_gradient_checkpointing_uses_the_loop_and_agrees():
    pipe = tiny_sd_pipeline()
    config = DMinConfig(num_timesteps=2, sketch_dim=256)
    expected = GradientSketcher.from_pipeline(pipe, config)(images=_images(3, 2), prompts=PROMPTS[:2])
    pipe.unet.enable_gradient_checkpointing()
    sketcher = GradientSketcher.from_pipeline(pipe, config)
    assert not sketcher._use_vmap()
    torch.testing.assert_close(sketcher(images=_images(3, 2), prompts=PROMPTS[:2]), expected, rtol=1e-4, atol=1e-5)


def test_spec_and_fingerprint_follow_the_weights():
    pipe = tiny_ddpm_pipeline()
    config = DMinConfig(num_timesteps=3, sketch_dim=128)
    spec = GradientSketcher.from_pipeline(pipe, config).spec
    assert spec.family == "unet2d" and spec.target == "epsilon"
    assert spec.timesteps == (999, 962, 703) and spec.latent_shape == (1, 16, 16)
    assert spec.input_dim == sum(p.numel() for n, p in pipe.unet.named_parameters() if n in spec.param_names)
    same = GradientSketcher.from_pipeline(tiny_ddpm_pipeline(), config).spec
    assert same == spec
    with torch.no_grad():
        dict(pipe.unet.named_parameters())[spec.param_names[-1]].add_(1e-3)
    changed = GradientSketcher.from_pipeline(pipe, config).spec
    assert set(spec.differences(changed)) == {"param_fingerprint"}
    assert fingerprint_parameters([("w", torch.ones(3))]) != fingerprint_parameters([("w", torch.ones(3) * 2)])


def test_input_errors():
    pipe = tiny_sd_pipeline()
    sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1, sketch_dim=64))
    with pytest.raises(ConfigError, match="exactly one"):
        sketcher(prompts=PROMPTS[:1])
    with pytest.raises(ConfigError, match="prompts"):
        sketcher(images=_images(3, 1))
    with pytest.raises(ConfigError, match="2 prompts for 1 samples"):
        sketcher(images=_images(3, 1), prompts=PROMPTS[:2])
    with pytest.raises(ConfigError, match="resolution"):
        sketcher(latents=torch.randn(1, 4, 16, 16), prompts="a cat")
    with torch.inference_mode(), pytest.raises(ConfigError, match="inference_mode"):
        sketcher(latents=torch.randn(1, 4, 8, 8), prompts="a cat")
    with pytest.raises(ConfigError, match="mode"):
        GradientSketcher.from_pipeline(pipe, mode="fast")


def test_non_finite_gradients_name_the_sample():
    pipe = tiny_ddpm_pipeline()
    sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=2, sketch_dim=64))
    latents = torch.zeros(3, 1, 16, 16)
    latents[1, 0, 3, 3] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"positions \[1\]") as info:
        sketcher(latents=latents)
    assert info.value.positions == [1]
    assert isinstance(info.value, FloatingPointError)


@pytest.mark.parametrize("normalize", ["timestep", "none"])
@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_half_precision_pipeline_agrees_with_float32(normalize, mode):
    # the backward pass runs on a loss scaled by C*H*W (a mean's gradient underflows in float16 at real sizes); the
    # scale must cancel: same directions, and for normalize="none" the same magnitudes
    images, prompts = _images(3, 2), PROMPTS[:2]
    config = DMinConfig(num_timesteps=3, sketch_dim=64, normalize=normalize, params="all")
    reference = GradientSketcher.from_pipeline(tiny_sd_pipeline(), config)(images=images, prompts=prompts)
    half = tiny_sd_pipeline()
    for module in (half.unet, half.vae, half.text_encoder):
        torch.nn.Module.to(module, torch.float16)
    sketches = GradientSketcher.from_pipeline(half, config, mode=mode)(images=images, prompts=prompts)
    cosine = torch.nn.functional.cosine_similarity(sketches.flatten(1), reference.flatten(1))
    assert cosine.min() > 0.999
    torch.testing.assert_close(sketches.norm(dim=-1), reference.norm(dim=-1), rtol=0.01, atol=0)
