"""The `dmin` CLI end to end (cli.py): build -> info -> search -> push -> pull against the local Hub server."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_dmin import GradientIndex
from diffusers_dmin.cli import COMMANDS, main
from diffusers_dmin.data import load_digits
from diffusers_dmin.logging import are_progress_bars_disabled
from diffusers_dmin.testing import add_tiny_lora, tiny_sd_pipeline


# huggingface_hub's LFS upload passes a file object as `data=`, which httpx deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")

REPO = "tester/cli-dmin-index"


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """A tiny SD pipeline folder, LoRA weights for it, and 12 captioned digits saved with `save_to_disk`."""
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    root = tmp_path_factory.mktemp("cli")
    pipe = tiny_sd_pipeline(seed=0)
    pipe.save_pretrained(root / "pipe")
    add_tiny_lora(pipe.unet, seed=1)
    StableDiffusionPipeline.save_lora_weights(root / "lora", unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    digits = load_digits(16, split="train[:12]")
    digits.save_to_disk(str(root / "data"))
    digits[3]["image"].save(root / "query.png")
    return root


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_build_info_search_push_pull(artifacts, tmp_path, capsys, fake_hub):
    index_dir = tmp_path / "index"
    build = [
        "build", artifacts / "pipe", "--lora-weights", artifacts / "lora", "--dataset", artifacts / "data",
        "--id-column", "id", "--num-timesteps", "2", "--sketch-dim", "64", "--batch-size", "4", "--shard-rows", "4",
        "--output-dir", index_dir, "--hnsw", "-q",
    ]  # fmt: skip
    code, out, err = _run(capsys, *build)
    assert code == 0, err
    assert f"Index of 12 rows (T=2, K=64, float16) in {index_dir}" in out

    code, out, err = _run(capsys, "build", *build[1:])  # again: complete, nothing to compute
    assert code == 0, err

    code, out, err = _run(capsys, "info", index_dir)
    assert code == 0, err
    assert "rows:        12 in 3 shard(s)" in out
    assert "unet2d_condition, target epsilon, params auto" in out
    assert f"adapter:     {artifacts / 'lora'}" in out
    assert "ids from column id" in out and "hnsw:        12 rows" in out

    grid = tmp_path / "grid.png"
    search = ["search", index_dir, "--pipeline", artifacts / "pipe", "--lora-weights", artifacts / "lora"]
    code, out, err = _run(
        capsys, *search, "--image", artifacts / "query.png", "--prompt", "a handwritten digit 3", "--top-k", "3",
        "--output", grid, "--thumb-size", "32", "--dataset", artifacts / "data",
    )  # fmt: skip
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"query 0: {artifacts / 'query.png'} ('a handwritten digit 3')"
    table = [line.split() for line in lines[2:5]]
    assert [row[0] for row in table] == ["1", "2", "3"]
    assert all(row[3:6] == ["a", "handwritten", "digit"] for row in table)  # captions from the attached dataset
    scores = [float(row[2]) for row in table]
    assert scores == sorted(scores, reverse=True)
    assert PIL.Image.open(grid).size[0] == 4 * (32 + 4) + 4  # query + 3 training images

    code, out, err = _run(capsys, "push", index_dir, REPO, "--private")
    assert code == 0, err
    assert f"Pushed 12 rows from {index_dir} to {REPO}" in out

    code, out, err = _run(capsys, "info", REPO)
    assert code == 0, err
    assert out.startswith(f"DMin index: {REPO}") and "rows:        12 in 3 shard(s)" in out

    pulled = tmp_path / "pulled"
    code, out, err = _run(capsys, "pull", REPO, "--local-dir", pulled)
    assert code == 0, err
    local, remote = GradientIndex.from_pretrained(index_dir), GradientIndex.from_pretrained(pulled)
    assert remote.ids.tolist() == local.ids.tolist()
    np.testing.assert_array_equal(remote.get_sketches(remote.ids), local.get_sketches(local.ids))
    assert (pulled / "hnsw.bin").is_file()


def test_user_errors_print_one_line_and_exit_2(artifacts, tmp_path, capsys, fake_hub):
    code, out, err = _run(
        capsys, "build", artifacts / "pipe", "--dataset", artifacts / "data", "--image-column", "img",
        "--output-dir", tmp_path / "index", "-q",
    )  # fmt: skip
    assert code == 2 and out == ""
    assert err.startswith("dmin build: error: `image_column='img'` is not a column of the dataset; its columns are")
    assert "['id', 'image', 'label', 'text']" in err and "Traceback" not in err

    code, _, err = _run(capsys, "info", "tester/no-such-index")
    assert code == 2 and err.startswith("dmin info: error:") and "Traceback" not in err
    assert "no local folder 'tester/no-such-index'" in err  # it may be a mistyped path

    code, _, err = _run(capsys, "build", artifacts / "no-pipe", "--dataset", artifacts / "data", "--output-dir", "x")
    assert code == 2 and "Could not load the pipeline" in err

    (tmp_path / "a-file").write_text("")  # an output folder that cannot be created: the system's error, exit 1
    code, out, err = _run(
        capsys, "build", artifacts / "pipe", "--dataset", artifacts / "data", "--output-dir", tmp_path / "a-file" / "x",
        "-q",
    )  # fmt: skip
    assert code == 1 and err.startswith("dmin build: error: [Errno") and "Traceback" not in err


def test_resume_and_overwrite_from_the_cli(artifacts, tmp_path, capsys):
    common = [
        "build", artifacts / "pipe", "--dataset", artifacts / "data", "--num-timesteps", "2", "--batch-size", "4",
        "--output-dir", tmp_path / "index", "-q", "--limit", "8",
    ]  # fmt: skip
    bars_disabled_before = are_progress_bars_disabled()  # CI disables them through DMIN_DISABLE_PROGRESS_BARS
    assert _run(capsys, *common, "--sketch-dim", "64")[0] == 0
    code, _, err = _run(capsys, *common, "--sketch-dim", "32")
    assert code == 2 and "config.sketch_dim: index has 64, new build has 32" in err and "--overwrite" in err
    code, out, err = _run(capsys, *common, "--sketch-dim", "32", "--overwrite")
    assert code == 0, err
    assert "Index of 8 rows (T=2, K=32" in out
    assert are_progress_bars_disabled() == bars_disabled_before  # `-q` does not leak into the calling program


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_help_of_every_command_shows_examples(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"dmin {command} " in out.split("examples:")[1]


def test_console_script_is_installed():
    dmin = shutil.which("dmin")
    if dmin is None:
        pytest.skip("`dmin` is not on PATH (reinstall with `pip install -e .`)")
    out = subprocess.run([dmin, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "dmin build" in out.stdout
    out = subprocess.run([dmin], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "usage: dmin" in out.stderr


def test_search_never_opens_a_dataset_location_written_in_the_index(artifacts, tmp_path, capsys):
    """Issue 11, finding 6: the manifest's dataset path is someone else's word; only --dataset opens data."""
    index_dir = tmp_path / "index"
    build = [
        "build", artifacts / "pipe", "--dataset", artifacts / "data", "--num-timesteps", "1", "--sketch-dim", "16",
        "--batch-size", "6", "--output-dir", index_dir, "-q",
    ]  # fmt: skip
    code, _, err = _run(capsys, *build)
    assert code == 0, err
    search = ["search", index_dir, "--pipeline", artifacts / "pipe", "--image", artifacts / "query.png"]
    search += ["--prompt", "a digit", "--top-k", "2", "--output", tmp_path / "g.png"]
    code, out, err = _run(capsys, *search)
    assert code == 0, err
    assert "pass --dataset" in err and "handwritten" not in out  # ids only: the recorded local folder is not read
    code, out, err = _run(capsys, *search, "--dataset-from-index")
    assert code == 2 and err.count("\n") == 1 and "not a Hub dataset id" in err


def test_full_disk_while_writing_a_shard_is_one_line(artifacts, tmp_path, capsys, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    build = [
        "build", artifacts / "pipe", "--dataset", artifacts / "data", "--num-timesteps", "1", "--sketch-dim", "16",
        "--batch-size", "6", "--output-dir", tmp_path / "index", "-q",
    ]  # fmt: skip
    code, _, err = _run(capsys, *build)
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("dmin build: error: Writing") and "Is the disk full?" in err
