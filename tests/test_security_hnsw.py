"""Crafted `hnsw.bin` files never reach hnswlib (issue 11, findings 1 and 2).

Each case rewrites one field of a saved graph the way an attacker who also writes the manifest would (the manifest's
sha256 and size are recomputed), then loads the index with `load_hnsw=True`, searches with `exact=False` and extends
the graph with `add()` in a CHILD process, so that a segmentation fault shows up as a signal (and fails the test)
instead of killing pytest. The file layout is parsed here independently of `diffusers_dmin.hnsw_file`.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusers_dmin.config import DMinConfig
from diffusers_dmin.constants import HNSW_NAME, MANIFEST_NAME
from diffusers_dmin.index import GradientIndex


T, K, ROWS, M = 2, 8, 240, 4
HEADER = struct.Struct("<QQQQQQiIQQQdQ")
FIELDS = (
    "offsetLevel0_ max_elements_ cur_element_count size_data_per_element_ label_offset_ offsetData_ maxlevel_ "
    "enterpoint_node_ maxM_ maxM0_ M_ mult_ ef_construction_"
).split()
OFFSETS = dict(zip(FIELDS, (0, 8, 16, 24, 32, 40, 48, 52, 56, 64, 72, 80, 88)))
FORMATS = dict.fromkeys(FIELDS, "<Q") | {"maxlevel_": "<i", "enterpoint_node_": "<I", "mult_": "<d"}

CHILD = r"""
import json, sys, numpy as np, torch
from diffusers_dmin.errors import IndexCorruptError
from diffusers_dmin.index import GradientIndex
results = {}
for case, folder in json.loads(sys.argv[1]).items():
    print("case", case, flush=True)
    try:
        index = GradientIndex.from_pretrained(folder, load_hnsw=True)
        index.search(torch.ones(1, @T@, @K@), top_k=5, exact=False, rescore=False)
        extra = torch.randn(40, @T@, @K@, generator=torch.Generator().manual_seed(1))
        index.add(extra, ids=np.arange(10**6, 10**6 + 40))  # extends the loaded graph (hnswlib add_items)
        index.search(torch.ones(1, @T@, @K@), top_k=5, exact=False, rescore=False)
        results[case] = ["ok", ""]
    except IndexCorruptError as err:
        results[case] = ["IndexCorruptError", str(err)]
    except Exception as err:
        results[case] = [type(err).__name__, str(err)]
print("RESULTS " + json.dumps(results), flush=True)
""".replace("@T@", str(T)).replace("@K@", str(K))


def _parse(data: bytes) -> dict:
    """Header fields, per-element levels and the byte offsets of their upper-level lists."""
    header = dict(zip(FIELDS, HEADER.unpack_from(data, 0)))
    n, record = header["cur_element_count"], header["size_data_per_element_"]
    position = HEADER.size + n * record
    levels, upper = [], []
    for _ in range(n):
        (length,) = struct.unpack_from("<I", data, position)
        levels.append(length // (4 * (header["maxM_"] + 1)))
        upper.append(position + 4)
        position += 4 + length
    assert position == len(data)
    return {"header": header, "levels": levels, "upper": upper}


def _set(data: bytearray, offset: int, fmt: str, value) -> None:
    struct.pack_into(fmt, data, offset, value)


def _mutations(data: bytes) -> dict:
    info = _parse(data)
    h, levels = info["header"], info["levels"]
    record = h["size_data_per_element_"]
    n = h["cur_element_count"]
    cases = {}

    def field(name, value):
        out = bytearray(data)
        _set(out, OFFSETS[name], FORMATS[name], value)
        return bytes(out)

    cases["label_offset_"] = field("label_offset_", 2**40)
    cases["offsetLevel0_"] = field("offsetLevel0_", 4096)
    cases["offsetData_"] = field("offsetData_", h["offsetData_"] + 64)  # used to write past the buffer on add()
    cases["enterpoint_node_"] = field("enterpoint_node_", n + 1000)
    cases["max_elements_"] = field("max_elements_", 30_000_000)  # used to allocate GBs before any check
    cases["cur_element_count"] = field("cur_element_count", n - 1)
    cases["size_data_per_element_"] = field("size_data_per_element_", record + 4)
    cases["maxlevel_"] = field("maxlevel_", 40)
    cases["maxM0_"] = field("maxM0_", 1000)
    cases["mult_"] = field("mult_", 50.0)
    # element 0's first level-0 neighbour, and its link count
    out = bytearray(data)
    _set(out, HEADER.size + h["offsetLevel0_"] + 4, "<I", n + 12345)
    cases["neighbour_id"] = bytes(out)
    out = bytearray(data)
    _set(out, HEADER.size + h["offsetLevel0_"], "<I", 2 * M + 1)
    cases["link_count_over_M0"] = bytes(out)
    # an upper-level neighbour of an element that has no such level (hnswlib follows it into unallocated lists)
    top = max(range(n), key=lambda i: levels[i])
    low = next(i for i in range(n) if levels[i] == 0)
    out = bytearray(data)
    offset = info["upper"][top]
    _set(out, offset, "<I", max(1, struct.unpack_from("<I", data, offset)[0] & 0xFFFF))
    _set(out, offset + 4, "<I", low)
    cases["upper_neighbour_level"] = bytes(out)
    out = bytearray(data)
    _set(out, HEADER.size + h["label_offset_"], "<Q", 2**62)
    cases["label_range"] = bytes(out)
    cases["truncated"] = data[:-4]
    cases["extended"] = data + b"\0" * 8
    return cases


def _write_case(source: Path, target: Path, graph: bytes) -> None:
    target.mkdir(parents=True)
    for item in source.rglob("*"):
        if item.is_file():
            dest = target / item.relative_to(source)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(item.read_bytes())
    (target / HNSW_NAME).write_bytes(graph)
    manifest = json.loads((target / MANIFEST_NAME).read_text())
    manifest["hnsw"]["sha256"] = hashlib.sha256(graph).hexdigest()  # the attacker writes the manifest too
    manifest["hnsw"]["num_bytes"] = len(graph)
    (target / MANIFEST_NAME).write_text(json.dumps(manifest))


def _run_child(cases: dict[str, str]) -> tuple[subprocess.CompletedProcess, dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DMIN_DISABLE_PROGRESS_BARS="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(cases)], env=env, capture_output=True, text=True, timeout=600
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULTS "):
            results = json.loads(line[len("RESULTS ") :])
    return proc, results


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    base = tmp_path_factory.mktemp("hnsw-security")
    sketches = torch.randn(ROWS, T, K, generator=torch.Generator().manual_seed(0))
    index = GradientIndex.from_sketches(sketches, config=DMinConfig(num_timesteps=T, sketch_dim=K))
    index.build_hnsw(M=M, ef_construction=20, num_threads=1)
    index.save_pretrained(base / "honest")
    data = (base / "honest" / HNSW_NAME).read_bytes()
    cases = {"honest": str(base / "honest")}
    for name, graph in _mutations(data).items():
        _write_case(base / "honest", base / name, graph)
        cases[name] = str(base / name)
    proc, results = _run_child(cases)
    return proc, results


def _check_child(proc):
    if proc.returncode < 0:
        last = [line for line in proc.stdout.splitlines() if line.startswith("case ")][-1:]
        pytest.fail(f"the child died by {signal.Signals(-proc.returncode).name} at {last}:\n{proc.stderr[-2000:]}")
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_honest_graph_loads_searches_and_extends(crafted):
    proc, results = crafted
    _check_child(proc)
    assert results["honest"] == ["ok", ""]


@pytest.mark.parametrize(
    "case, field",
    [
        ("label_offset_", "label_offset_"),
        ("offsetLevel0_", "offsetLevel0_"),
        ("offsetData_", "offsetData_"),
        ("enterpoint_node_", "enterpoint_node_"),
        ("max_elements_", "max_elements_"),
        ("cur_element_count", "cur_element_count"),
        ("size_data_per_element_", "size_data_per_element_"),
        ("maxlevel_", "maxlevel_"),
        ("maxM0_", "maxM0_"),
        ("mult_", "mult_"),
        ("neighbour_id", "level-0 neighbour 0 of element 0"),
        ("link_count_over_M0", "level-0 link count of element 0"),
        ("upper_neighbour_level", "level-"),
        ("label_range", "label of element 0"),
        ("truncated", "file size"),
        ("extended", "file size"),
    ],
)
def test_crafted_graph_is_refused_before_hnswlib_reads_it(crafted, case, field):
    proc, results = crafted
    _check_child(proc)
    kind, message = results[case]
    assert kind == "IndexCorruptError", (kind, message)
    assert f"`{field}" in message and HNSW_NAME in message, message


def test_validator_never_allocates_what_a_header_claims(tmp_path):
    """A 6 KB graph claiming 3e7 elements is refused by reading 96 bytes, without hnswlib allocating anything."""
    from diffusers_dmin.errors import IndexCorruptError
    from diffusers_dmin.hnsw_file import validate_hnsw_file

    sketches = torch.randn(20, T, K, generator=torch.Generator().manual_seed(0))
    index = GradientIndex.from_sketches(sketches, config=DMinConfig(num_timesteps=T, sketch_dim=K))
    index.build_hnsw(M=M, ef_construction=20, num_threads=1)
    index.save_pretrained(tmp_path / "idx")
    path = tmp_path / "idx" / HNSW_NAME
    data = bytearray(path.read_bytes())
    for value in (30_000_000, 2**63):
        _set(data, OFFSETS["cur_element_count"], "<Q", value)
        path.write_bytes(bytes(data))
        with pytest.raises(IndexCorruptError, match="cur_element_count"):
            validate_hnsw_file(path, dim=T * K, num_rows=20, M=M, ef_construction=20)
    # without a manifest to compare with, the claimed count must still fit in the file
    _set(data, OFFSETS["max_elements_"], "<Q", 2**63)
    path.write_bytes(bytes(data))
    with pytest.raises(IndexCorruptError, match="file size"):
        validate_hnsw_file(path, dim=T * K)


def test_fuzzed_graphs_never_crash_hnswlib():
    """A few hundred random header/body mutations (benchmarks/fuzz_hnsw.py; run `--cases 20000` for more): the
    validator raises only IndexCorruptError, and hnswlib loads, searches and extends every file it accepts without
    ending by a signal."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "fuzz_hnsw.py"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), "--cases", "300", "--seed", "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert (
        result["cases"] == 300
        and result["accepted_and_loaded_by_hnswlib"] > 20
        and result["rejected_by_validator"] > 150
    )
    assert (
        result["children_ended_by_signal_or_hung"] == []
        and result["validator_exceptions_other_than_IndexCorruptError"] == []
    )


if __name__ == "__main__":  # one child per case: `PYTHONPATH=src python tests/test_security_hnsw.py` prints the table
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        sketches = torch.randn(ROWS, T, K, generator=torch.Generator().manual_seed(0))
        index = GradientIndex.from_sketches(sketches, config=DMinConfig(num_timesteps=T, sketch_dim=K))
        index.build_hnsw(M=M, ef_construction=20, num_threads=1)
        index.save_pretrained(base / "honest")
        cases = {"honest": bytes((base / "honest" / HNSW_NAME).read_bytes())}
        cases.update(_mutations(cases["honest"]))
        for name, graph in cases.items():
            if name != "honest":
                _write_case(base / "honest", base / name, graph)
            proc, results = _run_child({name: str(base / name)})
            if proc.returncode < 0:
                outcome = f"killed by {signal.Signals(-proc.returncode).name}"
            else:
                kind, message = results.get(name, ["?", proc.stderr[-200:]])
                outcome = kind if kind == "ok" else f"{kind}: {message[:110]}"
            print(f"| {name} | {outcome} |", flush=True)
