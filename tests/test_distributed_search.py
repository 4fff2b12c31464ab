"""DistributedSearch (distributed.py): 2 CPU processes (gloo) give exactly the single-process search.

One `accelerate launch --multi_gpu --num_processes 2` run (torchrun underneath; gloo on a machine without GPUs) holds
every search scenario and the `dmin search --distributed` command; the failure tests start the two processes
themselves with the environment torchrun sets (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), so that each process's
own exit code and error can be read (a launcher would kill the second process when the first one exits).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from diffusers_dmin import DMinConfig, GradientIndex
from diffusers_dmin.distributed import DistributedSearch, assign_shards
from diffusers_dmin.errors import ConfigError, IndexMismatchError, IndexNotFoundError
from diffusers_dmin.storage import read_manifest


SCRIPTS = Path(__file__).resolve().parent / "scripts"
SCRIPT = SCRIPTS / "distributed_search.py"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1] / "src"), env.get("PYTHONPATH", "")])
    return env


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _unit(n, t, k, seed):
    return torch.nn.functional.normalize(torch.randn(n, t, k, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture(scope="module")
def indices(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    # 5 shards of 64, 64, 64, 64, 44 rows: process 0 gets shards 0, 2, 4 (172 rows), process 1 shards 1, 3 (128)
    uneven = _unit(300, 2, 32, seed=0)
    GradientIndex.from_sketches(uneven, config=DMinConfig(num_timesteps=2, sketch_dim=32)).save_pretrained(
        root / "uneven", max_shard_rows=64
    )
    # exact ties: 6 distinct rows of small integers repeated (float32 products and sums are exact), 8 shards
    rng = np.random.default_rng(3)
    distinct = rng.integers(-2, 3, size=(6, 2, 16)).astype(np.float32)
    tied = torch.from_numpy(distinct[rng.integers(0, 6, size=120)])
    GradientIndex.from_sketches(
        tied, ids=np.arange(1000, 1120), config=DMinConfig(num_timesteps=2, sketch_dim=16, dtype="float32")
    ).save_pretrained(root / "tied", max_shard_rows=16)
    # one shard for two processes: process 1 holds none
    GradientIndex.from_sketches(
        _unit(50, 3, 8, seed=4), config=DMinConfig(num_timesteps=3, sketch_dim=8, dtype="bfloat16")
    ).save_pretrained(root / "single", max_shard_rows=64)
    queries = {
        "q5": (_unit(5, 2, 32, seed=1) + 0.3 * uneven[:5]).numpy(),
        "q64": _unit(64, 2, 32, seed=2).numpy(),
        "q1": _unit(1, 2, 32, seed=5).numpy(),
        "bad": _unit(2, 3, 32, seed=6).numpy(),  # T=3 for a T=2 index
        "ties": rng.integers(-2, 3, size=(3, 2, 16)).astype(np.float32),
        "single": _unit(4, 3, 8, seed=7).numpy(),
    }
    for name, array in queries.items():
        np.save(root / f"{name}.npy", array)
    return root, queries


SEARCHES = [
    ("uneven", "q5", {"top_k": 10}, False),
    ("uneven", "q5", {"top_k": 150}, True),  # more than process 1's 128 rows; every rank passes the queries
    ("uneven", "q5", {"top_k": 1000}, False),  # more than the index's 300 rows
    ("uneven", "q5", {"top_k": 7, "largest": False}, False),
    ("uneven", "q5", {"top_k": 5, "sketch_dim": 16}, False),
    ("uneven", "q64", {"top_k": 20}, False),
    ("uneven", "q1", {"top_k": 3}, False),
    ("uneven", "bad", {"top_k": 3}, False),  # fails on rank 0: both processes raise, and go on searching
    ("tied", "ties", {"top_k": 60}, False),
    ("single", "single", {"top_k": 10}, False),
    ("tied", "ties", {"top_k": 5, "largest": False}, False),  # through an explicit `group=`
]


def test_assign_shards_balances_rows_with_whole_shards(indices):
    root, _ = indices
    manifest = read_manifest(root / "uneven")
    split = assign_shards(manifest, 2)
    assert split == [[manifest.shards[i] for i in (0, 2, 4)], [manifest.shards[i] for i in (1, 3)]]
    assert [sum(s.num_rows for s in shards) for shards in split] == [172, 128]
    assert [len(shards) for shards in assign_shards(read_manifest(root / "single"), 3)] == [1, 0, 0]
    assert assign_shards(manifest, 1) == [manifest.shards]
    with pytest.raises(ConfigError, match="world_size"):
        assign_shards(manifest, 0)


def test_one_process_equals_gradient_index_search(indices):
    root, queries = indices
    for name, query, kwargs, _ in SEARCHES:
        search = DistributedSearch(root / name)
        if query == "bad":
            with pytest.raises(IndexMismatchError, match="num_timesteps"):  # alone, the error is the index's own
                search.search(queries[query], **kwargs)
            continue
        expected = GradientIndex.from_pretrained(root / name).search(queries[query], **kwargs)
        got = search.search(queries[query], **kwargs)
        assert [r.sample_ids.tolist() for r in got] == [r.sample_ids.tolist() for r in expected]
        assert [r.scores.tobytes() for r in got] == [r.scores.tobytes() for r in expected]
    with pytest.raises(ConfigError, match="exact only"):
        search.search(queries["single"], exact=False)
    with pytest.raises(IndexNotFoundError, match="dmin pull"):
        DistributedSearch("my-org/an-index-on-the-hub")


def test_two_processes_equal_one_process_and_the_cli_too(indices, tmp_path):
    accelerate = shutil.which("accelerate") or shutil.which("accelerate", path=str(Path(sys.executable).parent))
    if accelerate is None:
        pytest.skip("the accelerate CLI is not installed")
    if torch.cuda.is_available():
        pytest.skip("this test checks the CPU (gloo) path")
    root, queries = indices
    sys.path.insert(0, str(SCRIPTS))
    import build_tiny

    from diffusers_dmin.cli import main as dmin
    from diffusers_dmin.data import load_digits
    from diffusers_dmin.testing import tiny_ddpm_pipeline

    # a real index of the tiny DDPM over 16 digits (6 shards), its pipeline on disk, and a query image
    build_tiny.main(
        ["--output-dir", str(tmp_path / "ddpm"), "--rows", "16", "--shard-rows", "3", "--pipeline", "ddpm"]
    )
    tiny_ddpm_pipeline(seed=0).save_pretrained(tmp_path / "pipe")
    load_digits(16, split="train[20:21]")[0]["image"].save(tmp_path / "query.png")
    cli = ["search", str(tmp_path / "ddpm"), "--pipeline", str(tmp_path / "pipe"), "--image", str(tmp_path / "query.png"),
           "--top-k", "5", "--no-dataset", "--output", str(tmp_path / "grid.png"), "--threads", "1"]  # fmt: skip

    plan = {
        "searches": [
            {
                "index": str(root / name),
                "queries": str(root / f"{query}.npy"),
                "kwargs": kwargs,
                "all_ranks": both,
                "new_group": number == len(SEARCHES) - 1,
            }
            for number, (name, query, kwargs, both) in enumerate(SEARCHES)
        ],
        "cli": [
            [*cli[:-4], "--output", str(tmp_path / "grid-distributed.png"), *cli[-2:], "--distributed"],
            [*cli[:3], str(tmp_path / "no-pipeline"), *cli[4:], "--distributed"],  # process 0 fails before searching
        ],
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    out = tmp_path / "out"
    out.mkdir()
    command = [
        accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1",
        "--main_process_port", str(_free_port()), str(SCRIPT), "--plan", str(tmp_path / "plan.json"), "--out", str(out),
    ]  # fmt: skip
    run = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode != 0  # the script exits 3 after the planned error
    assert "exitcode  : 3" in run.stderr, run.stderr[-4000:]
    assert "The index has 1 shard(s) for 2 processes: process(es) [1] hold none" in run.stderr  # said once, by rank 0
    assert run.stderr.count("hold none and only take part in the merge") == 1

    for number, (name, query, kwargs, _) in enumerate(SEARCHES):
        if query == "bad":
            for rank in (0, 1):
                message = (out / f"{number}-rank{rank}.err").read_text()
                assert "while preparing the queries, on 1 of 2 processes" in message
                assert "process 0: IndexMismatchError" in message and "num_timesteps" in message
            continue
        expected = GradientIndex.from_pretrained(root / name).search(queries[query], **kwargs)
        for rank in (0, 1):  # every process returns the result
            got = np.load(out / f"{number}-rank{rank}.npz")
            np.testing.assert_array_equal(got["ids"], np.stack([r.sample_ids for r in expected]))
            assert got["scores"].tobytes() == np.stack([r.scores for r in expected]).tobytes()  # bit for bit
    ties = np.load(out / f"{SEARCHES.index(('tied', 'ties', {'top_k': 60}, False))}-rank0.npz")
    assert (np.diff(ties["scores"], axis=1) == 0).sum() > 100  # the tie test holds ties

    # the command: process 0 prints what one process prints (but the grid's name), process 1 prints nothing
    assert (out / "cli0-rank0.code").read_text() == "0" and (out / "cli0-rank1.code").read_text() == "0"
    assert (out / "cli0-rank1.out").read_text() == ""
    lines = (out / "cli0-rank0.out").read_text().splitlines()
    expected = _captured(dmin, cli).splitlines()
    assert lines[0] == f"query 0: {tmp_path / 'query.png'}" and len(lines) == 2 + 5 + 1
    assert lines[:-1] == expected[:-1]  # the ranks, sample ids and scores
    assert (tmp_path / "grid-distributed.png").read_bytes() == (tmp_path / "grid.png").read_bytes()
    assert _captured(dmin, [*cli, "--distributed"]).splitlines() == expected  # --distributed in one process
    # process 0 cannot load the pipeline: it says so, and process 1, waiting for the query, stops with its error
    assert (out / "cli1-rank0.code").read_text() == "2" and (out / "cli1-rank1.code").read_text() == "2"
    assert "Could not load the pipeline (--pipeline)" in (out / "cli1-rank0.errout").read_text()
    waiting = (out / "cli1-rank1.errout").read_text()
    assert "failed while preparing the queries, on 1 of 2 processes" in waiting
    assert "process 0: ConfigError: Could not load the pipeline (--pipeline)" in waiting


def _captured(function, argv):
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert function(argv) == 0
    return buffer.getvalue()


def _start_two(plan_path, out, *extra):
    port = _free_port()
    processes = []
    for rank in (0, 1):
        env = _env(
            RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
        )
        processes.append(
            subprocess.Popen(
                [sys.executable, str(SCRIPT), "--plan", str(plan_path), "--out", str(out), *extra],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    return processes


def test_a_failing_shard_or_a_stalled_process_stops_both_processes_with_a_clear_error(indices, tmp_path):
    root, _ = indices
    folder = tmp_path / "uneven"
    shutil.copytree(root / "uneven", folder)
    victim = assign_shards(read_manifest(folder), 2)[1][0]  # a shard of process 1
    data = bytearray((folder / victim.name).read_bytes())
    data[-3] ^= 0xFF
    (folder / victim.name).write_bytes(bytes(data))
    plan = {
        "searches": [
            {"index": str(folder), "queries": str(root / "q5.npy")},  # process 1's shard fails its sha256
            {"index": str(root / "uneven"), "index_of_rank": {"1": str(root / "single")}},  # another index
            {"index": str(root / "uneven"), "queries": str(root / "q5.npy")},  # process 1 stalls 24 s before it
        ]
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    stall = ["--stall-rank", "1", "--stall-seconds", "24", "--stall-search", "2"]
    processes = _start_two(tmp_path / "plan.json", tmp_path, "--timeout", "12", *stall)
    try:
        codes = [p.wait(timeout=180) for p in processes]
    finally:
        for process in processes:
            process.kill()
    errors = [p.stderr.read()[-6000:] for p in processes]
    assert codes == [3, 3], errors
    for rank in (0, 1):  # both processes raise process 1's error, and can go on
        message = (tmp_path / f"0-rank{rank}.err").read_text()
        assert "while verifying this process's shards, on 1 of 2 processes" in message
        assert f"process 1: IndexCorruptError: The shard {folder / victim.name} failed its checksum" in message
    for rank in (0, 1):
        message = (tmp_path / f"1-rank{rank}.err").read_text()
        assert "The dmin_index.json of process(es) [1] differs from that of process 0" in message
    # process 0 waits 12 s for process 1 in the next search, then stops; process 1 then finds process 0 gone
    message = (tmp_path / "2-rank0.err").read_text()
    assert "Process 0 of 2 stopped waiting while preparing the queries" in message
    assert "within the timeout (12 s)" in message
    # (at the same step, or the next one if its share of the first exchange had already arrived)
    assert "Process 1 of 2 stopped waiting while" in (tmp_path / "2-rank1.err").read_text()


def test_a_group_created_again_and_again_connects_every_time(indices, tmp_path):
    # each open fails (the processes see other manifests) and closes the group it created, and the next one creates
    # it again at the same MASTER_PORT: on a fresh rendezvous store each time, a process could reach rank 0's previous
    # store before rank 0 closed it and die of gloo's raw DistNetworkError (seen under load, never idle)
    root, _ = indices
    item = {"index": str(root / "uneven"), "index_of_rank": {"1": str(root / "single")}}
    (tmp_path / "plan.json").write_text(json.dumps({"searches": [item] * 8}))
    processes = _start_two(tmp_path / "plan.json", tmp_path, "--timeout", "30")
    try:
        codes = [p.wait(timeout=240) for p in processes]
    finally:
        for process in processes:
            process.kill()
    assert codes == [3, 3], [p.stderr.read()[-6000:] for p in processes]
    for number in range(8):
        for rank in (0, 1):
            message = (tmp_path / f"{number}-rank{rank}.err").read_text()
            assert "The dmin_index.json of process(es) [1] differs from that of process 0" in message


def test_a_process_that_finds_no_other_raises_a_distributed_search_error(indices, monkeypatch):
    import torch.distributed as dist

    from diffusers_dmin.errors import DistributedSearchError

    root, _ = indices
    port = _free_port()  # nobody serves the rendezvous there: process 1 cannot connect
    for name, value in dict(WORLD_SIZE="2", RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    with pytest.raises(
        DistributedSearchError, match=rf"Process 1 of 2 could not connect .* 127.0.0.1:{port}\) within"
    ):
        DistributedSearch(root / "uneven", timeout=2)
    assert not dist.is_initialized()


def test_the_command_refuses_hnsw_with_a_distributed_search(indices, tmp_path, capsys):
    import PIL.Image

    from diffusers_dmin.cli import main as dmin

    root, _ = indices
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "query.png")
    code = dmin(["search", str(root / "uneven"), "--pipeline", str(tmp_path), "--image", str(tmp_path / "query.png"),
                 "--hnsw", "--distributed"])  # fmt: skip
    assert code == 2
    assert "`--hnsw` cannot be combined with a distributed search" in capsys.readouterr().err
