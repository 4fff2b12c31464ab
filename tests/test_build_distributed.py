"""GradientIndex.build across processes: a 2-process `accelerate launch` run; SIGKILL (between and inside shards) and
SIGTERM followed by resume; a second writer into a folder that a build holds."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_dmin import GradientIndex
from diffusers_dmin.build import BUILD_STATE_NAME, PARTIAL_DIR
from diffusers_dmin.constants import MANIFEST_NAME
from diffusers_dmin.storage import read_manifest


SCRIPT = Path(__file__).resolve().parent / "scripts" / "build_tiny.py"
sys.path.insert(0, str(SCRIPT.parent))

import build_tiny  # noqa: E402


def _env():
    # one thread per process: two processes with two OpenMP threads each on a shared machine crawl
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "DMIN_VERBOSITY": "info"}
    env.pop("DMIN_DISABLE_PROGRESS_BARS", None)
    return env


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _shards(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((folder / "shards").glob("*.safetensors"))}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_two_process_accelerate_build_equals_a_single_process_build(tmp_path, one_thread):
    accelerate = shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed")
    if torch.cuda.is_available():
        pytest.skip("this test checks the CPU (gloo) path; a GPU machine would run it on two GPUs")
    args = ["--rows", "24", "--pipeline", "sd-lora", "--batch-size", "2", "--shard-rows", "4"]
    # accelerate 1.x runs `--cpu --num_processes 2` as ONE process unless an MPI hostfile is given; `--multi_gpu`
    # starts the processes with torchrun, and on a machine without GPUs the build uses the gloo (CPU) backend
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "--main_process_port", str(_free_port()),
        str(SCRIPT), "--output-dir", str(tmp_path / "two"), "--result", str(tmp_path / "two.json"), *args,
    ]  # fmt: skip
    out = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "over 2 process(es) (process 0 computes 3 shards)" in out.stderr
    assert "over 2 process(es) (process 1 computes 3 shards)" in out.stderr

    build_tiny.main(["--output-dir", str(tmp_path / "one"), *args])
    two = GradientIndex.from_pretrained(tmp_path / "two")
    one = GradientIndex.from_pretrained(tmp_path / "one")
    assert two.ids.tolist() == one.ids.tolist() == list(range(24))
    np.testing.assert_array_equal(two.get_sketches(two.ids), one.get_sketches(one.ids))  # bit-identical
    # the same shards in the same order, byte for byte
    shards = [(s.name, s.num_rows, s.num_bytes, s.sha256) for s in read_manifest(tmp_path / "two").shards]
    assert shards == [(s.name, s.num_rows, s.num_bytes, s.sha256) for s in read_manifest(tmp_path / "one").shards]


def test_sigkill_then_resume_finishes_every_id_exactly_once(tmp_path, one_thread):
    folder = tmp_path / "idx"
    args = ["--rows", "32", "--batch-size", "2", "--shard-rows", "4"]
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--output-dir", str(folder), "--slow", "0.5", *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    while not list((folder / "shards").glob("*.safetensors")):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no shard appeared in time"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (folder / MANIFEST_NAME).exists() and (folder / BUILD_STATE_NAME).exists()
    finished = _shards(folder)
    assert 1 <= len(finished) < 8

    build_tiny.main(["--output-dir", str(folder), *args])  # resume, in this process
    index = GradientIndex.from_pretrained(folder)
    assert sorted(index.ids.tolist()) == list(range(32))  # every id exactly once (load checks duplicates)
    after = _shards(folder)
    assert {name: after[name] for name in finished} == finished  # no finished shard recomputed or rewritten
    assert len(after) == 8 and not list(folder.rglob("*.tmp")) and not (folder / BUILD_STATE_NAME).exists()

    build_tiny.main(["--output-dir", str(tmp_path / "unbroken"), *args])
    unbroken = GradientIndex.from_pretrained(tmp_path / "unbroken")
    assert index.ids.tolist() == unbroken.ids.tolist()
    np.testing.assert_array_equal(index.get_sketches(index.ids), unbroken.get_sketches(unbroken.ids))


# ------------------------------------------------------------------------------------------------ partial shards


def _durable_ids(folder):
    """Ids a killed build left on disk: in finished shards and in partial files of unfinished ones."""
    from safetensors import safe_open

    ids = []
    for path in [*(folder / "shards").glob("*.safetensors"), *(folder / PARTIAL_DIR).glob("*.safetensors")]:
        with safe_open(str(path), framework="np") as f:
            ids += f.get_tensor("ids").tolist()
    return ids


def _progress(path):
    return sum(int(line) for line in path.read_text().split()) if path.exists() else 0


def _wait_for_rows(process, progress, rows, timeout=180):
    deadline = time.monotonic() + timeout
    while _progress(progress) < rows:
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "the build did not get far enough in time"
        time.sleep(0.02)


def test_sigkill_mid_shard_loses_at_most_the_flush_bound_and_resume_equals_unbroken(tmp_path, one_thread):
    folder, progress = tmp_path / "idx", tmp_path / "progress.txt"
    # two shards of 16 rows; rows of the unfinished shard are flushed every 4 rows (the bound under test)
    args = ["--rows", "32", "--batch-size", "2", "--shard-rows", "16", "--flush-rows", "4"]
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--output-dir", str(folder), "--slow-batch", "0.25"]
        + ["--progress", str(progress), *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _wait_for_rows(process, progress, 10)  # well inside the first shard (rows 0-15)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    computed = _progress(progress)
    durable = _durable_ids(folder)
    assert len(set(durable)) == len(durable)
    assert computed - len(durable) <= 4, f"computed {computed} rows before the kill but only {len(durable)} were kept"
    assert computed < 16 and not (folder / MANIFEST_NAME).exists()  # killed inside the first shard

    again = tmp_path / "progress-resume.txt"
    build_tiny.main(["--output-dir", str(folder), "--progress", str(again), *args])  # resume, in this process
    assert _progress(again) == 32 - len(durable)  # no kept row computed again
    assert not (folder / PARTIAL_DIR).exists() and not list(folder.rglob("*.tmp"))
    index = GradientIndex.from_pretrained(folder)
    build_tiny.main(["--output-dir", str(tmp_path / "unbroken"), *args])
    unbroken = GradientIndex.from_pretrained(tmp_path / "unbroken")
    assert index.ids.tolist() == unbroken.ids.tolist() == list(range(32))
    np.testing.assert_array_equal(index.get_sketches(index.ids), unbroken.get_sketches(unbroken.ids))
    # the same shard files, byte for byte
    shards = [(s.name, s.num_rows, s.sha256) for s in read_manifest(folder).shards]
    assert shards == [(s.name, s.num_rows, s.sha256) for s in read_manifest(tmp_path / "unbroken").shards]


def test_sigterm_stops_the_cli_build_cleanly_says_what_was_kept_and_how_to_resume(tmp_path, one_thread, monkeypatch):
    import shlex

    import diffusers_dmin.build as build_module
    from diffusers_dmin.cli import EXIT_INTERRUPTED, main
    from diffusers_dmin.data import load_digits
    from diffusers_dmin.testing import tiny_ddpm_pipeline

    tiny_ddpm_pipeline(seed=0).save_pretrained(tmp_path / "pipe")
    load_digits(16, split="train[:32]").save_to_disk(str(tmp_path / "data"))
    folder, progress = tmp_path / "idx", tmp_path / "progress.txt"
    command = ["build", str(tmp_path / "pipe"), "--dataset", str(tmp_path / "data"), "--id-column", "id"]
    command += ["--output-dir", str(folder), "--batch-size", "2", "--shard-rows", "16", "--num-timesteps", "2"]
    command += ["--sketch-dim", "64", "--dtype", "float32", "--overwrite"]
    child = (
        "import sys, time\n"
        "import diffusers_dmin.build as b\n"
        "real = b._sketch_batch\n"
        "def watched(sketcher, batch, on_error):\n"
        "    time.sleep(0.25)\n"
        "    out = real(sketcher, batch, on_error)\n"
        f"    open({str(progress)!r}, 'a').write(f'{{len(batch.ids)}}\\n')\n"
        "    return out\n"
        "b._sketch_batch = watched\n"
        "from diffusers_dmin.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", child, *command], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    _wait_for_rows(process, progress, 6)
    os.kill(process.pid, signal.SIGTERM)
    out, err = process.communicate(timeout=120)
    err = err.decode()
    assert process.returncode == EXIT_INTERRUPTED, err[-3000:]
    computed = _progress(progress)
    assert 6 <= computed < 16
    assert f"Index build interrupted by SIGTERM: {computed} rows are kept in {folder}" in err, err[-3000:]
    assert f"0 in finished shards, {computed} in partial shards" in err
    assert "Every row this process had computed was saved" in err
    assert "dmin build: interrupted" in err
    resume = re.search(r"dmin build: to resume, run: (.*)", err).group(1)
    expected = shlex.join(["dmin", *[a for a in command if a != "--overwrite"]])
    assert resume == expected  # the exact command, without --overwrite (which would delete what was kept)
    assert sorted(_durable_ids(folder)) == list(range(computed))  # nothing computed was lost

    rows = []
    real = build_module._sketch_batch
    monkeypatch.setattr(build_module, "_sketch_batch", lambda s, b, e: rows.append(len(b.ids)) or real(s, b, e))
    assert main(shlex.split(resume)[1:]) == 0
    assert sum(rows) == 32 - computed  # the resume computes only the rest
    assert GradientIndex.from_pretrained(folder).ids.tolist() == list(range(32))


# ------------------------------------------------------------------------------------------------ folder lock


def test_a_second_writer_is_refused_while_a_build_runs_and_a_killed_build_never_blocks(tmp_path, one_thread):
    from diffusers_dmin import DMinConfig
    from diffusers_dmin.folderlock import LOCK_NAME, IndexLockedError

    folder = tmp_path / "idx"
    args = ["--rows", "24", "--batch-size", "2", "--shard-rows", "4"]
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--output-dir", str(folder), "--slow", "0.5", *args],
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 180
    while not list((folder / "shards").glob("*.safetensors")):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no shard appeared in time"
        time.sleep(0.02)
    holder = rf"process {process.pid} on host {re.escape(socket.gethostname())}"
    # the case: another build with another shard size into the same folder
    with pytest.raises(IndexLockedError, match=rf"{re.escape(str(folder))} is in use: a build by {holder}"):
        build_tiny.main(["--output-dir", str(folder), "--rows", "24", "--batch-size", "2", "--shard-rows", "8"])
    index = GradientIndex.from_sketches(
        torch.randn(3, 2, 64), [100, 101, 102], DMinConfig(num_timesteps=2, sketch_dim=64)
    )
    with pytest.raises(IndexLockedError, match=rf"a build by {holder}"):
        index.save_pretrained(folder)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    process.stderr.close()
    assert (folder / LOCK_NAME).exists()  # left behind by the killed build: it must not block

    build_tiny.main(["--output-dir", str(folder), *args])
    assert GradientIndex.from_pretrained(folder).ids.tolist() == list(range(24))
    assert not (folder / LOCK_NAME).exists()
    index.save_pretrained(tmp_path / "other")  # a free folder: saving works, and leaves no lock file
    assert not (tmp_path / "other" / LOCK_NAME).exists()
