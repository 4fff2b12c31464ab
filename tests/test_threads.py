"""The thread policy of the gradient work (threads.py): one intra-op thread on the CPU by default, overridable by
argument, DMIN_NUM_THREADS and `--threads`, and the caller's setting restored afterwards."""

from __future__ import annotations

import pytest
import torch

from diffusers_dmin import DMinConfig, GradientIndex, GradientSketcher
from diffusers_dmin.cli import build_parser
from diffusers_dmin.data import load_digits
from diffusers_dmin.errors import ConfigError
from diffusers_dmin.testing import tiny_ddpm_pipeline


CONFIG = DMinConfig(num_timesteps=2, sketch_dim=64, dtype="float32")


@pytest.fixture(scope="module")
def ddpm():
    return tiny_ddpm_pipeline(seed=0)


@pytest.fixture
def caller_threads(monkeypatch):
    """The caller runs torch with 2 threads (torch's default on a 2-core machine); restored after the test."""
    monkeypatch.delenv("DMIN_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


def _seen_threads(sketcher, monkeypatch, **call):
    """Torch's thread count inside the gradient engine during one call, and the caller's count after it."""
    seen = []
    real = type(sketcher)._gradient_rows
    monkeypatch.setattr(
        type(sketcher), "_gradient_rows", lambda self, *a: seen.append(torch.get_num_threads()) or real(self, *a)
    )
    images = torch.rand(2, 1, 16, 16)
    sketches = call.pop("method", sketcher)(images=images)
    assert torch.isfinite(sketches).all()
    return sorted(set(seen)), torch.get_num_threads()


def test_the_gradients_run_on_one_thread_on_the_cpu_and_the_callers_setting_comes_back(
    ddpm, caller_threads, monkeypatch
):
    sketcher = GradientSketcher.from_pipeline(ddpm, CONFIG)
    assert _seen_threads(sketcher, monkeypatch) == ([1], 2)
    assert _seen_threads(sketcher, monkeypatch, method=sketcher.full_gradients) == ([1], 2)


def test_argument_beats_environment_beats_default_and_zero_keeps_torchs_setting(ddpm, caller_threads, monkeypatch):
    monkeypatch.setenv("DMIN_NUM_THREADS", "3")
    assert _seen_threads(GradientSketcher.from_pipeline(ddpm, CONFIG), monkeypatch) == ([3], 2)
    assert _seen_threads(GradientSketcher.from_pipeline(ddpm, CONFIG, num_threads=1), monkeypatch) == ([1], 2)
    monkeypatch.setenv("DMIN_NUM_THREADS", "torch")
    assert _seen_threads(GradientSketcher.from_pipeline(ddpm, CONFIG), monkeypatch) == ([2], 2)
    monkeypatch.delenv("DMIN_NUM_THREADS")
    assert _seen_threads(GradientSketcher.from_pipeline(ddpm, CONFIG, num_threads=0), monkeypatch) == ([2], 2)


def test_the_callers_setting_comes_back_after_an_error(ddpm, caller_threads, monkeypatch):
    sketcher = GradientSketcher.from_pipeline(ddpm, CONFIG)

    def broken(self, *args):
        raise RuntimeError("boom")

    monkeypatch.setattr(GradientSketcher, "_gradient_rows", broken)
    with pytest.raises(RuntimeError, match="boom"):
        sketcher(images=torch.rand(1, 1, 16, 16))
    assert torch.get_num_threads() == 2


def test_bad_thread_counts_are_refused(ddpm, caller_threads, monkeypatch):
    with pytest.raises(ConfigError, match=r"`num_threads` must be a positive integer.*but is -1"):
        GradientSketcher.from_pipeline(ddpm, CONFIG, num_threads=-1)
    sketcher = GradientSketcher.from_pipeline(ddpm, CONFIG)
    monkeypatch.setenv("DMIN_NUM_THREADS", "many")
    with pytest.raises(ConfigError, match=r"DMIN_NUM_THREADS='many' is not a number of threads"):
        GradientSketcher.from_pipeline(ddpm, CONFIG)
    with pytest.raises(ConfigError, match=r"DMIN_NUM_THREADS='many' is not a number of threads"):
        sketcher(images=torch.rand(1, 1, 16, 16))  # read at each call: set after the sketcher was made
    assert torch.get_num_threads() == 2


def test_build_and_cli_pass_the_thread_count_on(ddpm, caller_threads, monkeypatch, tmp_path):
    seen = []
    real = GradientSketcher._gradient_rows
    monkeypatch.setattr(
        GradientSketcher, "_gradient_rows", lambda self, *a: seen.append(torch.get_num_threads()) or real(self, *a)
    )
    dataset = load_digits(16, split="train[:4]")
    options = dict(prompt_column=None, id_column="id", batch_size=2, progress=False)
    GradientIndex.build(ddpm, dataset, CONFIG, tmp_path / "default", **options)
    assert set(seen) == {1} and torch.get_num_threads() == 2
    seen.clear()
    GradientIndex.build(ddpm, dataset, CONFIG, tmp_path / "three", sketcher_kwargs={"num_threads": 3}, **options)
    assert set(seen) == {3} and torch.get_num_threads() == 2
    for command in (
        ["build", "pipe", "--dataset", "data", "--output-dir", "idx"],
        ["search", "idx", "--pipeline", "p", "--image", "x"],
    ):
        assert build_parser().parse_args(command).threads is None
        assert build_parser().parse_args([*command, "--threads", "2"]).threads == 2
