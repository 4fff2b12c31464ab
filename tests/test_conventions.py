"""Model-family objective conventions: declared per family, overridable in DMinConfig, recorded in the manifest,
and an index whose objective differs from the pipeline's is refused. Formulas written here from the diffusers
training scripts (`compute_loss_weighting_for_sd3`, the flow-matching interpolation and Lumina 2's reversed one)."""

import math

import pytest
import torch

from diffusers_dmin import ConfigError, DMinConfig, GradientIndex, GradientSketcher, IndexMismatchError
from diffusers_dmin.config import SketchSpec
from diffusers_dmin.families import adapter_for_pipeline
from diffusers_dmin.objectives import Objective, ObjectiveConventions
from diffusers_dmin.testing import tiny_ddpm_pipeline, tiny_sd3_pipeline


def _flow_scheduler(**config):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**config)


def _script_sigmas(scheduler_config: dict, shift: float | None, t: torch.Tensor) -> torch.Tensor:
    """sigma of training timestep index t, as `get_sigmas` in the scripts reads it from a scheduler built with
    `from_pretrained(..., shift=...)` with static shifting, written out: s = (t + 1) / N, s' = k s / (1 + (k - 1) s)."""
    n = scheduler_config.get("num_train_timesteps", 1000)
    k = scheduler_config.get("shift", 1.0) if shift is None else shift
    s = (t.double() + 1) / n
    return (k * s / (1 + (k - 1) * s)).float()


def test_flow_matching_noisy_input_target_and_weights_follow_the_conventions():
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([999, 500, 10])
    scheduler = _flow_scheduler(shift=3.0)
    sigma = _script_sigmas({"shift": 3.0}, None, t).view(-1, 1, 1, 1)

    plain = Objective(scheduler)
    noisy, target = plain.noisy_and_target(x0, noise, t)
    torch.testing.assert_close(noisy, (1 - sigma) * x0 + sigma * noise)
    torch.testing.assert_close(target, noise - x0)
    torch.testing.assert_close(plain.model_timesteps(t), sigma.flatten() * 1000, rtol=1e-5, atol=1e-3)

    # Lumina 2: sigma = 1 is the clean image, so DMin's noisiest t takes the script's smallest sigma (index t):
    # s = (N - t) / N before the shift
    lumina = Objective(scheduler, conventions=ObjectiveConventions(interpolation="data_at_one", timestep_scale=1e-3))
    noisy, target = lumina.noisy_and_target(x0, noise, t)
    s_rev = _script_sigmas({"shift": 3.0}, None, 999 - t).view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - s_rev) * noise + s_rev * x0)
    torch.testing.assert_close(target, x0 - noise)
    torch.testing.assert_close(lumina.model_timesteps(t), s_rev.flatten(), rtol=1e-5, atol=1e-6)
    assert lumina._sigmas(torch.tensor([999]))[0] < 0.01  # the noisiest timestep is (almost) pure noise

    s = sigma.flatten()
    cosmap = Objective(scheduler, conventions=ObjectiveConventions(weighting="cosmap"))
    torch.testing.assert_close(cosmap.loss_weights(t), 2 / (math.pi * (1 - 2 * s + 2 * s**2)))
    sqrt = Objective(scheduler, conventions=ObjectiveConventions(weighting="sigma_sqrt"))
    torch.testing.assert_close(sqrt.loss_weights(t), s**-2.0)
    for name in ("none", "logit_normal", "mode"):  # sampling densities only: loss weight 1
        objective = Objective(scheduler, conventions=ObjectiveConventions(weighting=name))
        assert torch.equal(objective.loss_weights(t), torch.ones(3))

    pred = torch.randn(3, 4, 2, 2)
    flipped = Objective(scheduler, conventions=ObjectiveConventions(prediction_sign=-1.0))
    torch.testing.assert_close(flipped.loss(pred, target), (-pred - target).pow(2).mean((1, 2, 3)))
    weight = torch.tensor([1.0, 2.0, 0.5])
    torch.testing.assert_close(plain.loss(pred, target, weight), (pred - target).pow(2).mean((1, 2, 3)) * weight)


def test_shift_override_builds_static_sigmas_from_any_scheduler_config():
    t = torch.tensor([999, 750, 250, 0])
    dynamic = _flow_scheduler(shift=3.0, use_dynamic_shifting=True)  # Flux-style config: no static shift at init
    unshifted = Objective(dynamic)
    torch.testing.assert_close(unshifted._sigmas(t), _script_sigmas({"shift": 1.0}, None, t))
    shifted = Objective(dynamic, conventions=ObjectiveConventions(shift=2.0))
    torch.testing.assert_close(shifted._sigmas(t), _script_sigmas({}, 2.0, t))


def test_config_overrides_are_validated_and_serialised_only_when_set():
    config = DMinConfig(weighting_scheme="cosmap", guidance_scale=4, flow_shift=3)
    assert config.guidance_scale == 4.0 and isinstance(config.guidance_scale, float)
    assert DMinConfig.from_json(config.to_json()) == config
    assert "flow_shift" not in DMinConfig().to_dict()  # manifests written before the overrides stay identical
    with pytest.raises(ConfigError, match="weighting_scheme"):
        DMinConfig(weighting_scheme="snr")
    with pytest.raises(ConfigError, match="flow_shift"):
        DMinConfig(flow_shift=0)
    with pytest.raises(ConfigError, match="guidance_scale"):
        DMinConfig(guidance_scale=float("nan"))
    with pytest.raises(ConfigError, match="bogus"):
        ObjectiveConventions(interpolation="bogus")


def test_overrides_that_do_not_apply_to_the_model_are_refused():
    with pytest.raises(ConfigError, match="flow_shift.*DDPMScheduler"):
        adapter_for_pipeline(tiny_ddpm_pipeline(), config=DMinConfig(flow_shift=3.0))
    with pytest.raises(ConfigError, match="guidance_scale.*no guidance"):
        adapter_for_pipeline(tiny_sd3_pipeline(), config=DMinConfig(guidance_scale=3.5))
    assert adapter_for_pipeline(tiny_ddpm_pipeline(), config=DMinConfig(weighting_scheme="none"))


def test_the_objective_is_recorded_and_a_different_one_is_refused(tmp_path):
    pipe = tiny_sd3_pipeline()
    base = DMinConfig(num_timesteps=2, sketch_dim=64, normalize="none")
    sketcher = GradientSketcher.from_pipeline(pipe, base)
    assert sketcher.spec.objective["weighting"] == "logit_normal"  # train_dreambooth_lora_sd3.py's default
    assert sketcher.spec.objective["script"] == "dreambooth/train_dreambooth_lora_sd3.py"
    assert SketchSpec.from_dict(sketcher.spec.to_dict()) == sketcher.spec

    images = torch.rand(2, 3, 16, 16)
    prompts = ["a photo of a cat", "a red square"]
    sketches = sketcher(images=images, prompts=prompts)
    index = GradientIndex.from_sketches(sketches, spec=sketcher.spec)
    index.save_pretrained(tmp_path / "idx")
    loaded = GradientIndex.from_pretrained(tmp_path / "idx")
    assert loaded.spec.objective == sketcher.spec.objective

    cosmap = GradientSketcher.from_pipeline(pipe, base.replace(weighting_scheme="cosmap"))
    with pytest.raises(IndexMismatchError, match="weighting"):
        loaded.check_compatible(cosmap.spec)
    # with normalize="none" the weight is the only difference, and it is the script's weight
    weighted = cosmap(images=images, prompts=prompts)
    ratio = (weighted.norm(dim=-1) / sketches.norm(dim=-1)).mean(0)
    sigma = cosmap.objective._sigmas(torch.tensor(cosmap.timesteps))
    torch.testing.assert_close(ratio, 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)), rtol=2e-3, atol=0)


def test_indices_without_a_recorded_objective_still_load_and_match():
    sketcher = GradientSketcher.from_pipeline(tiny_sd3_pipeline(), DMinConfig(num_timesteps=2, sketch_dim=64))
    data = sketcher.spec.to_dict()
    del data["objective"]  # as written before objectives were recorded
    legacy = SketchSpec.from_dict(data)
    assert legacy.objective is None
    assert legacy.differences(sketcher.spec) == {}
