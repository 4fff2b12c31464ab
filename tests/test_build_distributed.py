"""GradientIndex.build across processes: a 2-process `accelerate launch` run, and SIGKILL followed by resume."""

from __future__ import annotations

import os
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
from diffusers_dmin.build import BUILD_STATE_NAME
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
