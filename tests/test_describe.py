"""describe.py: one renderer of a manifest's facts, worded by a style (dmin info's plain text, the card's Markdown)."""

from __future__ import annotations

import dataclasses

import torch

from diffusers_dmin import DMinConfig, GradientIndex
from diffusers_dmin.describe import PLAIN, describe, plain_lines
from diffusers_dmin.hub import CARD
from diffusers_dmin.storage import FileInfo, read_manifest


def _manifest(tmp_path, **metadata):
    index = GradientIndex.from_sketches(
        torch.randn(4, 2, 16), config=DMinConfig(num_timesteps=2, sketch_dim=16), **metadata
    )
    index.save_pretrained(tmp_path / "idx")
    return read_manifest(tmp_path / "idx")


def test_both_outputs_show_the_shared_facts_in_one_order(tmp_path):
    manifest = _manifest(tmp_path, dataset_id="org/d", adapter_id="org/lora", id_column="id")
    plain = [label for label, _ in describe(manifest, PLAIN)]
    card = [label for label, _ in describe(manifest, CARD)]
    assert plain[:3] == ["rows", "timesteps", "sketch dim"] and plain[-1] == "written by"
    assert card[:3] == ["Training samples (rows)", "Timesteps T", "Sketch dimension K"]
    shared = {"base model": "Base model", "adapter": "Adapter", "dataset": "Training dataset", "hnsw": "HNSW graph"}
    assert [shared[label] for label in plain if label in shared] == [
        label for label in card if label in shared.values()
    ]
    lines = plain_lines(manifest)
    assert "  rows:        4 in 1 shard(s)" in lines[0] and "  adapter:     org/lora" in lines


def test_a_preconditioner_is_a_fact_of_both_and_escaping_follows_the_style(tmp_path):
    manifest = _manifest(tmp_path, dataset_id="evil<script>", dataset_split="a|b")
    manifest = dataclasses.replace(
        manifest, preconditioner=FileInfo(name="preconditioner.safetensors", sha256="0" * 64, num_bytes=2048)
    )
    plain, card = dict(describe(manifest, PLAIN)), dict(describe(manifest, CARD))
    assert plain["preconditioner"] == "preconditioner.safetensors, 2.0 KiB"
    assert card["Query preconditioner"] == "`preconditioner.safetensors`"
    assert plain["dataset"] == "evil<script> (split a|b)"  # a terminal renders no markup: shown as written
    assert "<script>" not in card["Training dataset"] and "\\|" in card["Training dataset"]
    assert "written by" not in card and "noise" not in card  # a style leaves out what it does not list


def test_dmin_info_shows_control_characters_of_a_crafted_manifest_as_escapes(tmp_path):
    manifest = _manifest(tmp_path, base_model_id="org/m\x1b[2J\x1b]0;owned\x07", adapter_id="a\rb\nc")
    plain = dict(describe(manifest, PLAIN))
    assert plain["base model"] == "org/m\\x1b[2J\\x1b]0;owned\\x07"
    assert plain["adapter"] == "a\\rb\\nc"
    assert all(line.isprintable() for line in plain_lines(manifest))
