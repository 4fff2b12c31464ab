"""Every example runs in-process, offline, on tiny pipelines saved to tmp_path."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from datasets import Dataset

from diffusers_dmin import GradientIndex
from diffusers_dmin.testing import tiny_ddpm_pipeline, tiny_sd_pipeline


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_sd_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-sd")
    tiny_sd_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def captioned_dataset_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("captioned")
    rng = np.random.default_rng(0)
    images = [PIL.Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(10)]
    texts = ["a photo of a cat", "a red square"] * 5
    Dataset.from_dict({"image": images, "text": texts}).save_to_disk(path)
    return path


def test_quickstart(tmp_path):
    summary = _example("quickstart").main(
        [
            "--output-dir", str(tmp_path), "--limit", "60", "--num-images", "2", "--top-k", "3",
            "--num-inference-steps", "4", "--num-timesteps", "2", "--sketch-dim", "256",
        ]
    )  # fmt: skip
    png = PIL.Image.open(summary["png"])
    assert png.width > png.height > 0
    assert summary["num_training_digits"] == 60
    assert 0.0 <= summary["same_class_share_top_k"] <= 1.0
    assert (tmp_path / "index" / "dmin_index.json").exists()


def test_build_then_generate_with_influence(tmp_path, tiny_sd_dir, captioned_dataset_dir):
    index = _example("build_index").main(
        [
            "--pipeline", str(tiny_sd_dir), "--dataset", str(captioned_dataset_dir), "--output-dir",
            str(tmp_path / "index"), "--num-timesteps", "2", "--sketch-dim", "256", "--batch-size", "4",
        ]
    )  # fmt: skip
    assert len(index) == 10
    out = _example("generate_with_influence").main(
        [
            "--pipeline", str(tiny_sd_dir), "--index", str(tmp_path / "index"), "--dataset",
            str(captioned_dataset_dir), "--prompt", "a photo of a cat", "--num-images", "2", "--top-k", "3",
            "--num-inference-steps", "2", "--guidance-scale", "1.0", "--output", str(tmp_path / "grid.png"),
        ]
    )  # fmt: skip
    assert len(out.influence) == 2 and len(out.influence[0].sample_ids) == 3
    assert (tmp_path / "grid.png").exists()


# huggingface_hub's LFS upload passes a file object as `data=`, which httpx deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
def test_push_pull_index(tmp_path, fake_hub):
    pipe = tiny_ddpm_pipeline()
    from diffusers_dmin import DMinConfig, GradientSketcher

    sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=2, sketch_dim=128))
    sketches = sketcher(images=np.random.default_rng(0).random((6, 16, 16, 1)).astype(np.float32))
    GradientIndex.from_sketches(sketches, spec=sketcher.spec, noise=sketcher.noise).save_pretrained(tmp_path / "idx")
    result = _example("push_pull_index").main(
        ["--index", str(tmp_path / "idx"), "--repo-id", "tester/example-index", "--endpoint", fake_hub.endpoint]
    )
    assert result == {"rows": 6, "identical": True}


def test_lora_finetune_and_attribute_tiny(tmp_path):
    result = _example("lora_finetune_and_attribute").main(
        [
            "--tiny", "--output-dir", str(tmp_path), "--max-train-samples", "12", "--max-train-steps", "2",
            "--train-batch-size", "4", "--num-timesteps", "2", "--sketch-dim", "256", "--num-inference-steps", "2",
            "--top-k", "3",
        ]
    )  # fmt: skip
    assert (tmp_path / "lora" / "pytorch_lora_weights.safetensors").exists()
    assert len(result["index"]) == 12
    assert all("lora_" in name for name in result["index"].spec.param_names)
    assert len(result["output"].influence) == 2
    assert result["grid"].exists()


def test_generate_with_influence_reads_an_image_folder_and_draws_a_grid_without_a_dataset(tmp_path, tiny_sd_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(1)
    lines = []
    for i in range(6):
        PIL.Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        lines.append(f'{{"file_name": "{i}.png", "text": "a red square {i}"}}')
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    _example("build_index").main(
        [
            "--pipeline", str(tiny_sd_dir), "--dataset", str(folder), "--output-dir", str(tmp_path / "index"),
            "--num-timesteps", "2", "--sketch-dim", "64", "--batch-size", "3",
        ]
    )  # fmt: skip
    common = [
        "--pipeline", str(tiny_sd_dir), "--index", str(tmp_path / "index"), "--prompt", "a red square",
        "--top-k", "3", "--num-inference-steps", "2", "--guidance-scale", "1.0",
    ]  # fmt: skip
    with_data = _example("generate_with_influence").main(
        [*common, "--dataset", str(folder), "--output", str(tmp_path / "with.png")]
    )
    assert with_data.influence[0].samples[0]["text"].startswith("a red square")
    without = _example("generate_with_influence").main([*common, "--output", str(tmp_path / "without.png")])
    assert without.influence[0].samples is None
    drawn, grey = PIL.Image.open(tmp_path / "with.png"), PIL.Image.open(tmp_path / "without.png")
    assert drawn.width == grey.width == 4 * (64 + 4) + 4
    grey_pixels = np.all(np.asarray(grey.convert("RGB")) == 200, axis=-1).mean()
    assert grey_pixels > 0.2 and np.all(np.asarray(drawn.convert("RGB")) == 200, axis=-1).mean() < 0.05


def test_lora_example_tiny_defaults_are_a_smoke_run():
    args = _example("lora_finetune_and_attribute").parse_args(["--tiny", "--output-dir", "x"])
    assert (args.max_train_samples, args.max_train_steps, args.num_timesteps) == (64, 30, 4)
    assert (args.sketch_dim, args.num_inference_steps, args.num_threads) == (1024, 10, 1)
    full = _example("lora_finetune_and_attribute").parse_args(
        ["--pretrained-model", "m", "--dataset", "d", "--output-dir", "x", "--max-train-steps", "7"]
    )
    assert (full.max_train_steps, full.sketch_dim, full.num_inference_steps, full.num_threads) == (7, 4096, 30, None)
