"""Estimator options of `DMinConfig` (issue 12): sketch-space renormalisation, D-TRAK's output function and noise
draws scored separately. Each against a ground truth computed here with plain autograd, plus the config's JSON
round trip, the meaning of manifests written before the options existed, and the index refusing mixed options."""

import math

import numpy as np
import pytest
import torch

from diffusers_dmin import ConfigError, DMinConfig, GradientIndex
from diffusers_dmin.config import SketchSpec
from diffusers_dmin.errors import IndexMismatchError
from diffusers_dmin.gradients import GradientSketcher
from diffusers_dmin.sketch import OPORPSketch, fold_sketch
from diffusers_dmin.testing import tiny_ddpm_pipeline


@pytest.fixture(scope="module")
def pipe():
    return tiny_ddpm_pipeline()


def _images(n: int = 3) -> torch.Tensor:
    images = torch.full((n, 1, 16, 16), 0.1)
    for i in range(n):
        images[i, :, 2 + 4 * i : 6 + 4 * i, 3 : 3 + 6 + i] = 0.9
    return images


def _manual_gradients(sketcher: GradientSketcher, images: torch.Tensor, function: str) -> torch.Tensor:
    """`(B, T, R, D)` raw gradients, one autograd call per (sample, timestep, draw), written from the definitions:
    `function="loss"`: mean((eps_theta(x_t, t) - eps)^2); `"output_norm"`: mean(eps_theta(x_t, t)^2)."""
    unet = sketcher.adapter.denoiser
    params = [p for _, p in sketcher.parameters]
    scheduler = sketcher.objective.scheduler
    x0 = images * 2.0 - 1.0
    out = torch.empty(len(images), len(sketcher.timesteps), sketcher.noise.shape[0], sketcher.input_dim)
    unet.eval()
    for b in range(len(images)):
        for i, t in enumerate(sketcher.timesteps):
            for r, noise in enumerate(sketcher.noise):
                tt = torch.tensor([t])
                noisy = scheduler.add_noise(x0[b : b + 1], noise[None], tt)
                pred = unet(noisy, tt).sample
                value = (pred - noise[None]).pow(2).mean() if function == "loss" else pred.pow(2).mean()
                grads = torch.autograd.grad(value, params)
                out[b, i, r] = torch.cat([g.reshape(-1) for g in grads])
    return out


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------- config


def test_config_round_trip_validation_and_legacy_meaning():
    config = DMinConfig(
        sketch_normalize=True, output_function="output_norm", num_noise_draws=2, noise_draws="separate"
    )
    assert DMinConfig.from_json(config.to_json()) == config
    assert {"sketch_normalize", "output_function", "noise_draws"} <= set(config.to_dict())

    # an index written before the options existed: keys absent, and they mean what they meant then
    legacy = dict(DMinConfig().to_dict())
    assert not {"sketch_normalize", "output_function", "noise_draws"} & set(legacy)
    old = DMinConfig.from_dict(legacy)
    assert (old.sketch_normalize, old.output_function, old.noise_draws) == (False, "loss", "mean")
    assert old.fingerprint() == DMinConfig().fingerprint()
    assert config.fingerprint() != DMinConfig().fingerprint()
    assert set(DMinConfig().differences(DMinConfig(sketch_normalize=True))) == {"sketch_normalize"}

    with pytest.raises(ConfigError, match="sketch_normalize"):
        DMinConfig(sketch_normalize="yes")
    with pytest.raises(ConfigError, match="output_function.*'trak'"):
        DMinConfig(output_function="trak")
    with pytest.raises(ConfigError, match="noise_draws"):
        DMinConfig(noise_draws="sum")
    with pytest.raises(ConfigError, match="num_noise_draws=3. must divide"):
        DMinConfig(num_noise_draws=3, noise_draws="separate", sketch_dim=1024)


# ---------------------------------------------------------------------------------------------- ground truths


def test_output_norm_gradient_matches_autograd(pipe):
    config = DMinConfig(num_timesteps=3, sketch_dim=256, output_function="output_norm", normalize="timestep")
    sketcher = GradientSketcher.from_pipeline(pipe, config, mode="vmap")
    images = _images()
    expected = _unit(_manual_gradients(sketcher, images, "output_norm")[:, :, 0])
    torch.testing.assert_close(sketcher.full_gradients(images=images), expected, rtol=1e-4, atol=1e-6)
    # and it is not the loss gradient
    loss = _unit(_manual_gradients(sketcher, images, "loss")[:, :, 0])
    assert (expected * loss).sum(-1).max() < 0.9  # cosine of the two gradients
    # the sketch is the sketch of that gradient
    looped = GradientSketcher.from_pipeline(pipe, config, mode="loop")
    sketch = OPORPSketch(sketcher.input_dim, 256, config.seed)
    torch.testing.assert_close(looped(images=images), sketch(expected), rtol=1e-4, atol=1e-5)


def test_sketch_normalize_is_the_cosine_of_sketches(pipe):
    images = _images()
    plain = DMinConfig(num_timesteps=3, sketch_dim=64, num_noise_draws=2)
    sketches = GradientSketcher.from_pipeline(pipe, plain)(images=images)
    renormed = GradientSketcher.from_pipeline(pipe, plain.replace(sketch_normalize=True))(images=images)
    torch.testing.assert_close(renormed, _unit(sketches), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(renormed.norm(dim=-1), torch.ones(3, 3))
    # at K = 64 the plain sketches' norms are visibly off 1 (mean of two draws, sketch error), so this is not a no-op
    assert (sketches.norm(dim=-1) - 1).abs().max() > 0.05
    # the dense counterpart: the per-draw normalised gradients' mean, renormalised per timestep
    sketcher = GradientSketcher.from_pipeline(pipe, plain.replace(sketch_normalize=True, normalize="timestep"))
    manual = _unit(_unit(_manual_gradients(sketcher, images, "loss")).mean(2))
    torch.testing.assert_close(sketcher.full_gradients(images=images), manual, rtol=1e-4, atol=1e-6)


def test_separate_noise_draws_score_each_draw_with_its_own_noise(pipe):
    images = _images()
    config = DMinConfig(
        num_timesteps=2, sketch_dim=128, num_noise_draws=2, noise_draws="separate", normalize="timestep"
    )
    sketcher = GradientSketcher.from_pipeline(pipe, config, mode="vmap")
    per_draw = _unit(_manual_gradients(sketcher, images, "loss"))  # (B, T, R, D)

    # dense: the draws side by side, so an inner product is the mean of matched per-draw cosines (no cross terms)
    dense = sketcher.full_gradients(images=images)
    assert dense.shape == (3, 2, 2 * sketcher.input_dim)
    expected_scores = torch.einsum("atrd,btrd->ab", per_draw, per_draw) / 2
    torch.testing.assert_close(torch.einsum("atd,btd->ab", dense, dense), expected_scores, rtol=1e-4, atol=1e-5)

    # sketch: block r is the K/R-sketch (same seed) of draw r's gradient, over 1/sqrt(R)
    sketches = sketcher(images=images)
    assert sketches.shape == (3, 2, 128)
    small = OPORPSketch(sketcher.input_dim, 64, config.seed)
    expected = torch.cat([small(per_draw[:, :, r]) for r in range(2)], dim=-1) / math.sqrt(2)
    torch.testing.assert_close(sketches, expected, rtol=1e-4, atol=1e-5)
    # and with sketch_normalize each block has norm 1/sqrt(R)
    renormed = GradientSketcher.from_pipeline(pipe, config.replace(sketch_normalize=True))(images=images)
    torch.testing.assert_close(renormed.reshape(3, 2, 2, 64).norm(dim=-1), torch.full((3, 2, 2), 2**-0.5))

    # with one draw the option changes nothing
    one = DMinConfig(num_timesteps=2, sketch_dim=128, noise_draws="separate")
    torch.testing.assert_close(
        GradientSketcher.from_pipeline(pipe, one)(images=images),
        GradientSketcher.from_pipeline(pipe, one.replace(noise_draws="mean"))(images=images),
    )


def test_fold_renormalize_and_blocks():
    generator = torch.Generator().manual_seed(0)
    sketches = _unit(torch.randn(4, 3, 64, generator=generator))
    folded = fold_sketch(sketches, 16, renormalize=True)
    torch.testing.assert_close(folded, _unit(fold_sketch(sketches, 16)))
    blocks = (_unit(sketches.reshape(4, 3, 2, 32)) / math.sqrt(2)).reshape(4, 3, 64)  # two draws' blocks
    folded = fold_sketch(blocks, 16, renormalize=True, blocks=2)
    torch.testing.assert_close(folded.reshape(4, 3, 2, 8).norm(dim=-1), torch.full((4, 3, 2), 2**-0.5))
    with pytest.raises(ConfigError, match="mix draws"):
        fold_sketch(sketches, 1, blocks=2)


def test_index_refuses_queries_made_with_another_option(pipe):
    images = _images()
    base = DMinConfig(num_timesteps=2, sketch_dim=64)
    sketcher = GradientSketcher.from_pipeline(pipe, base)
    index = GradientIndex.from_sketches(sketcher(images=images), ids=np.arange(3), spec=sketcher.spec)
    for change in ({"sketch_normalize": True}, {"output_function": "output_norm"}):
        other = GradientSketcher.from_pipeline(pipe, base.replace(**change))
        with pytest.raises(IndexMismatchError, match=next(iter(change))):
            index.search(other(images=images), top_k=2, spec=other.spec)
    # separate draws: a search may not fold the blocks together
    separate = GradientSketcher.from_pipeline(pipe, base.replace(num_noise_draws=2, noise_draws="separate"))
    blocks = GradientIndex.from_sketches(separate(images=images), ids=np.arange(3), spec=separate.spec)
    assert len(blocks.search(separate(images=images), top_k=2, sketch_dim=32)[0].sample_ids) == 2
    with pytest.raises(ConfigError, match="multiples of 2"):
        blocks.search(separate(images=images), top_k=2, sketch_dim=1)
    # the spec round-trips through a manifest's dict with the option
    spec = GradientSketcher.from_pipeline(pipe, base.replace(sketch_normalize=True)).spec
    assert SketchSpec.from_dict(spec.to_dict()) == spec
