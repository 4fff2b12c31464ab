"""Tests for `diffusers_dmin.data` and a smoke test of `examples/train_ddpm_digits.py`."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_dmin import ConfigError, MissingDependencyError
from diffusers_dmin import data as data_module
from diffusers_dmin.data import digits_tensor, load_digits


pytest.importorskip("sklearn")

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def digits16():
    return load_digits(16)


def test_columns_ids_labels_and_captions(digits16):
    from sklearn.datasets import load_digits as sklearn_load_digits

    assert digits16.num_rows == 1797
    assert digits16.column_names == ["id", "image", "label", "text"]
    assert digits16.features["id"].dtype == "int64"
    assert digits16.features["label"].names == [str(d) for d in range(10)]
    assert digits16["id"] == list(range(1797))
    np.testing.assert_array_equal(digits16["label"], sklearn_load_digits().target)
    assert np.bincount(digits16["label"]).min() >= 170
    assert digits16[3]["text"] == "a handwritten digit 3"
    assert all(text == f"a handwritten digit {label}" for text, label in zip(digits16["text"], digits16["label"]))


def test_images_are_grey_scale_upscaled_digits(digits16):
    from sklearn.datasets import load_digits as sklearn_load_digits

    image = digits16[0]["image"]
    assert image.mode == "L" and image.size == (16, 16)
    pixels = np.asarray(image).astype(np.float32) / 255.0
    assert pixels.min() == 0.0 and pixels.max() > 0.8  # black background, white strokes
    # Averaging 2x2 blocks of the bilinear upscale gives back the 8x8 original closely.
    original = sklearn_load_digits().images[0] / 16.0
    pooled = pixels.reshape(8, 2, 8, 2).mean(axis=(1, 3))
    assert np.abs(pooled - original).mean() < 0.08


def test_native_resolution_keeps_the_original_pixels():
    from sklearn.datasets import load_digits as sklearn_load_digits

    dataset = load_digits(8, split="train[:5]")
    expected = np.round(sklearn_load_digits().images[:5] / 16.0 * 255.0)
    np.testing.assert_array_equal(np.stack([np.asarray(im) for im in dataset["image"]]), expected)


def test_tensor_matches_the_image_column(digits16):
    images = digits_tensor(16)
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.float32
    assert images.min() == -1.0 and images.max() == 1.0
    from_column = torch.from_numpy(np.stack([np.asarray(im) for im in digits16[:20]["image"]])).float()
    torch.testing.assert_close(images[:20, 0], from_column / 127.5 - 1.0)


def test_deterministic(digits16):
    again = load_digits(16)
    assert again._fingerprint == digits16._fingerprint
    assert np.array_equal(np.asarray(again[100]["image"]), np.asarray(digits16[100]["image"]))
    torch.testing.assert_close(digits_tensor(16), digits_tensor(16), rtol=0, atol=0)
    digits_tensor(16)[0] += 5  # the returned tensor is the caller's copy
    assert digits_tensor(16).max() == 1.0


@pytest.mark.parametrize(
    "split, ids",
    [
        (None, (0, 1797)),
        ("train", (0, 1797)),
        ("train[:100]", (0, 100)),
        ("train[100:110]", (100, 110)),
        ("train[-5:]", (1792, 1797)),
        ("train[:10%]", (0, 180)),
        ("train[-10%:]", (1617, 1797)),
    ],
)
def test_split_slices_keep_original_ids(split, ids):
    dataset = load_digits(8, split=split)
    assert dataset["id"] == list(range(*ids))
    assert len(digits_tensor(8, split=split)) == ids[1] - ids[0]


def test_split_matches_datasets_slicing_rules():
    from datasets import ReadInstruction

    for split in ["train[:10%]", "train[33%:66%]", "train[-10%:]", "train[10:-10]"]:
        (absolute,) = ReadInstruction.from_spec(split).to_absolute({"train": 1797})
        assert data_module._resolve_split(split) == (absolute.from_, absolute.to)


@pytest.mark.parametrize("split", ["test", "validation", "train[5:5]", "train[::2]", 3])
def test_bad_split_names_the_argument(split):
    with pytest.raises(ConfigError, match="split"):
        load_digits(split=split)


@pytest.mark.parametrize("image_size", [4, 0, 16.0, True, "16"])
def test_bad_image_size_names_the_argument(image_size):
    with pytest.raises(ConfigError, match="image_size"):
        digits_tensor(image_size)


def test_missing_scikit_learn_says_how_to_install(monkeypatch):
    data_module._digits_uint8.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn` raise ImportError
    try:
        with pytest.raises(MissingDependencyError, match="pip install scikit-learn") as error:
            load_digits(16)
        assert isinstance(error.value, ImportError)
        assert "`load_digits`" in str(error.value)
    finally:
        data_module._digits_uint8.cache_clear()


def test_docstring_examples_run():
    import doctest

    results = doctest.testmod(data_module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted >= 5 and results.failed == 0


def _import_training_script():
    spec = importlib.util.spec_from_file_location("train_ddpm_digits", EXAMPLES_DIR / "train_ddpm_digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _public_config(model) -> dict:
    return {k: v for k, v in json.loads(model.to_json_string()).items() if not k.startswith("_")}


def test_training_script_smoke(tmp_path):
    from diffusers import DDPMPipeline

    script = _import_training_script()
    output_dir = tmp_path / "ddpm"
    num_threads = torch.get_num_threads()
    # fmt: off
    log = script.main([
        "--output-dir", str(output_dir), "--image-size", "8", "--block-out-channels", "8", "16",
        "--layers-per-block", "1", "--norm-num-groups", "4", "--attention-head-dim", "8", "--batch-size", "16",
        "--max-train-steps", "2", "--num-samples", "4", "--num-inference-steps", "2", "--save-dtype", "float16",
        "--num-threads", "1", "--disable-progress-bar",
    ])
    # fmt: on
    assert torch.get_num_threads() == num_threads  # restored
    assert log["steps"] == 2 and np.isfinite(log["final_epoch_loss"])
    assert log["num_attention_params"] > 0
    assert json.loads((output_dir / "training_log.json").read_text())["steps"] == 2
    assert (output_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (output_dir / "samples.png").is_file()

    pipe = DDPMPipeline.from_pretrained(output_dir)
    assert pipe.unet.dtype == torch.float32  # saved as float16, loaded as float32 by default
    assert any(".attentions." in name for name, _ in pipe.unet.named_parameters())
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (2, 8, 8, 1) and np.isfinite(images.images).all()


def test_training_script_rejects_bad_arguments(tmp_path):
    script = _import_training_script()
    with pytest.raises(SystemExit):
        script.parse_args(["--output-dir", str(tmp_path), "--image-size", "10"])  # not divisible by 4


def test_committed_checkpoint_loads_and_matches_the_script_defaults(tmp_path):
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    checkpoint = EXAMPLES_DIR / "checkpoints" / "ddpm-digits"
    pipe = DDPMPipeline.from_pretrained(checkpoint)
    assert pipe.unet.dtype == torch.float32
    assert sum(p.numel() for n, p in pipe.unet.named_parameters() if ".attentions." in n) > 0

    script = _import_training_script()
    rebuilt = script.build_unet(script.parse_args(["--output-dir", str(tmp_path)]))
    assert _public_config(rebuilt) == _public_config(pipe.unet)

    ddim = DDIMPipeline(unet=pipe.unet, scheduler=DDIMScheduler.from_config(pipe.scheduler.config))
    ddim.set_progress_bar_config(disable=True)
    images = ddim(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np")
    assert images.images.shape == (2, 16, 16, 1) and np.isfinite(images.images).all()
