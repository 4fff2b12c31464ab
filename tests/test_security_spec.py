"""The spec's fingerprint covers the whole model, not only the sketched parameters (issue 11, finding 5)."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from diffusers_dmin import DMinConfig, GradientIndex, GradientSketcher
from diffusers_dmin.constants import MANIFEST_NAME
from diffusers_dmin.errors import IndexMismatchError
from diffusers_dmin.testing import add_tiny_lora, tiny_ddpm_pipeline, tiny_sd_pipeline


CONFIG = DMinConfig(num_timesteps=2, sketch_dim=16)


def _index_for(sketcher, n=4):
    return GradientIndex.from_sketches(torch.randn(n, 2, 16), spec=sketcher.spec)


def test_changed_unsketched_weight_of_the_denoiser_is_a_mismatch():
    pipe = tiny_ddpm_pipeline()
    index = _index_for(GradientSketcher.from_pipeline(pipe, CONFIG))  # params="auto": attention parameters only
    with torch.no_grad():
        pipe.unet.conv_in.weight.mul_(1.5)  # not sketched, but it changes every gradient
    changed = GradientSketcher.from_pipeline(pipe, CONFIG)
    assert changed.spec.param_fingerprint == index.spec.param_fingerprint  # the old check could not see it
    with pytest.raises(IndexMismatchError, match="model_fingerprint"):
        index.check_compatible(changed.spec)


def test_same_lora_on_another_base_model_is_a_mismatch():
    base_a, base_b = tiny_sd_pipeline(seed=0), tiny_sd_pipeline(seed=1)
    for pipe in (base_a, base_b):
        add_tiny_lora(pipe.unet, seed=7)
    lora = {n: p for n, p in base_a.unet.named_parameters() if "lora_" in n}
    with torch.no_grad():  # identical adapter weights on both bases
        for name, param in base_b.unet.named_parameters():
            if "lora_" in name:
                param.copy_(lora[name])
    index = _index_for(GradientSketcher.from_pipeline(base_a, CONFIG))
    other = GradientSketcher.from_pipeline(base_b, CONFIG)
    assert other.spec.param_fingerprint == index.spec.param_fingerprint  # the old check could not see it
    with pytest.raises(IndexMismatchError, match="model_fingerprint"):
        index.check_compatible(other.spec)
    index.check_compatible(GradientSketcher.from_pipeline(base_a, CONFIG).spec)  # same model: fine


def test_changed_text_encoder_is_a_mismatch():
    pipe = tiny_sd_pipeline(seed=0)
    index = _index_for(GradientSketcher.from_pipeline(pipe, CONFIG))
    with torch.no_grad():
        next(pipe.text_encoder.parameters()).add_(0.01)
    with pytest.raises(IndexMismatchError, match="model_fingerprint"):
        index.check_compatible(GradientSketcher.from_pipeline(pipe, CONFIG).spec)


def test_old_index_without_model_fingerprint_still_loads_with_a_warning(tmp_path, caplog):
    pipe = tiny_ddpm_pipeline()
    sketcher = GradientSketcher.from_pipeline(pipe, CONFIG)
    _index_for(sketcher).save_pretrained(tmp_path / "idx")
    manifest = json.loads((tmp_path / "idx" / MANIFEST_NAME).read_text())
    assert manifest["spec"]["model_fingerprint"] == sketcher.spec.model_fingerprint  # recorded in the manifest
    del manifest["spec"]["model_fingerprint"]  # as written by earlier versions
    (tmp_path / "idx" / MANIFEST_NAME).write_text(json.dumps(manifest))
    old = GradientIndex.from_pretrained(tmp_path / "idx")
    assert old.spec.model_fingerprint is None
    with caplog.at_level(logging.WARNING, logger="diffusers_dmin"):
        old.check_compatible(sketcher.spec)
    assert "fingerprint of the whole model" in caplog.text
