"""Influence grids (viz.py, InfluenceResult.to_grid) and the dataset card's text (hub.dataset_card)."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
import yaml

from diffusers_dmin import DMinConfig, GradientIndex, GradientSketcher, InfluencePipeline, InfluenceResult
from diffusers_dmin.constants import README_NAME
from diffusers_dmin.data import load_digits
from diffusers_dmin.testing import tiny_sd_pipeline
from diffusers_dmin.viz import NOT_ATTACHED, influence_grid, influence_legend, make_row


def _result(n=3, samples=None, **fields):
    return InfluenceResult(
        sample_ids=np.arange(10, 10 + n, dtype=np.int64),
        scores=np.linspace(2.5, 1.0, n).astype(np.float32),
        samples=samples,
        query=PIL.Image.new("RGB", (16, 16), "white"),
        **fields,
    )


def _grey_share(image: PIL.Image.Image, box) -> float:
    pixels = np.asarray(image.crop(box))
    return float(np.mean(np.all(pixels == 200, axis=-1)))


def test_without_a_dataset_the_grid_draws_grey_boxes_that_say_so():
    row = _result().to_grid(thumb_size=64)  # before: ConfigError "carries no training images"
    assert row.width == 4 * (64 + 4) + 4
    first_training_tile = (4 + 68, 4, 4 + 68 + 64, 4 + 64)
    assert 0.6 < _grey_share(row, first_training_tile) < 1.0  # grey, with dark text on it
    assert "dataset not attached" == NOT_ATTACHED
    grid = influence_grid([_result(), _result()], thumb_size=64)
    assert "Grey boxes" in influence_legend(10, missing=True) and "Grey boxes" not in influence_legend(10)
    assert grid.width == row.width and grid.height > 2 * row.height  # the legend sits on top


def test_legend_states_the_first_tile_and_the_score_range():
    legend = influence_legend(10, query_caption="generated")
    assert "Left of the red line: the generated image" in legend
    assert "sum over the T = 10 timesteps" in legend and "at most about 10" in legend
    assert "T timesteps" in influence_legend(None)


def test_labels_and_prompt_add_lines_and_the_grid_has_a_legend():
    samples = [{"image": PIL.Image.new("L", (8, 8), 255), "label": i} for i in range(3)]
    plain = _result().to_grid(images=[PIL.Image.new("L", (8, 8))] * 3)
    labelled = _result(samples=samples).to_grid()
    with_prompt = _result(samples=samples, prompt="a handwritten digit 3").to_grid()
    assert labelled.width == plain.width and labelled.height > plain.height  # a third caption line: the label
    assert with_prompt.height > labelled.height  # the prompt above the row
    assert _result(samples=samples).to_grid(label_column=None).height == plain.height
    with pytest.raises(Exception, match="one label per image"):
        make_row(None, [None], [1.0], [1], labels=[1, 2])
    grid = influence_grid([_result(samples=samples, num_timesteps=4)], query_caption="generated")
    assert grid.height > labelled.height
    assert np.asarray(grid)[: grid.height - labelled.height].min() < 100  # dark legend text above the row


def test_influence_pipeline_records_prompt_and_timesteps_for_the_grid():
    torch.manual_seed(0)
    pipe = tiny_sd_pipeline(seed=0)
    config = DMinConfig(num_timesteps=2, sketch_dim=64)
    digits = load_digits(16, split="train[:6]")
    sketcher = GradientSketcher.from_pipeline(pipe, config)
    sketches = sketcher(images=list(digits["image"]), prompts=list(digits["text"]))
    index = GradientIndex.from_sketches(sketches, spec=sketcher.spec, noise=sketcher.noise)
    index.attach_dataset(digits)
    influence_pipe = InfluencePipeline(pipe, index)
    influence_pipe.set_progress_bar_config(disable=True)
    results = influence_pipe.attribute(list(digits["image"][:2]), prompts="a digit", top_k=3)
    assert [r.prompt for r in results] == ["a digit", "a digit"] and results[0].num_timesteps == 2
    out = influence_pipe(
        ["a 1", "a 2"], num_inference_steps=2, guidance_scale=1.0, return_influence=True, top_k=3,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert [r.prompt for r in out.influence] == ["a 1", "a 2"] and out.influence[1].num_timesteps == 2
    grid = influence_grid(out.influence, query_caption="generated")
    assert grid.width == 4 * (64 + 4) + 4


# ---------------------------------------------------------------------------------------------- dataset card


def _card(tmp_path, **metadata) -> str:
    index = GradientIndex.from_sketches(
        torch.randn(4, 2, 16), config=DMinConfig(num_timesteps=2, sketch_dim=16), **metadata
    )
    index.save_pretrained(tmp_path / "idx")
    return (tmp_path / "idx" / README_NAME).read_text()


def _front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    header, _ = card[4:].split("\n---\n", 1)
    return yaml.safe_load(header)


def test_card_publishes_no_local_path(tmp_path):
    card = _card(
        tmp_path,
        dataset_id="/home/alice/private/faces-2024",
        base_model_id="/home/alice/models/my-sd",
        adapter_id="../loras/alice-lora",
        dataset_split="train",
    )
    assert "/home/alice" not in card and "../loras" not in card
    assert "faces-2024" in card and "alice-lora" in card and "path not published" in card
    assert "/home/alice" not in _front_matter(card)["pretty_name"]
    hub_card = _card(tmp_path / "hub", dataset_id="org/faces", base_model_id="org/sd")
    assert "`org/faces`" in hub_card and "`org/sd`" in hub_card  # Hub ids stay as they are


def test_card_escapes_text_from_the_manifest(tmp_path):
    card = _card(
        tmp_path,
        dataset_id="evil<script>alert(1)</script>",
        base_model_id="[click](javascript:alert(1))",
        adapter_id="x\n---\npretty_name: pwned\n# Owned",
        dataset_split="train | x\n<img src=x onerror=alert(1)>",
        dataset_revision="`` code `",
    )
    header = _front_matter(card)
    assert set(header) == {"pretty_name", "tags", "size_categories", "viewer"}
    assert "\n" not in header["pretty_name"] and header["pretty_name"] != "pwned"
    assert "<script>" not in card and "<img" not in card and "](javascript:" not in card
    lines = card.splitlines()
    assert "# Owned" not in lines and lines.count("---") == 2  # no new heading, no second YAML block
    table = [line for line in lines if line.startswith("| ")]
    assert all(line.replace("\\|", "").count("|") == 3 for line in table), table  # every row keeps its two cells


def test_card_says_how_to_install_truly(tmp_path):
    card = " ".join(_card(tmp_path, dataset_id="org/d").split())
    assert "pip install diffusers-dmin" not in card
    assert "not published on PyPI" in card and "from a clone of the diffusers-dmin repository" in card
    assert "`pip install -e .`" in card
