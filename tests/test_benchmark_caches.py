"""The digits benchmarks' on-disk caches: method scores without pickle, models written atomically, a user cache dir."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmarks.quality import digits_context, digits_methods
from benchmarks.quality.attribution import Method, MethodResult, method_random


def _result() -> MethodResult:
    gen = np.random.default_rng(0)
    scores = {"lambda=1": gen.normal(size=(3, 5)), "lambda=10": gen.normal(size=(3, 5))}
    return MethodResult(scores, 1.5, 2.5, 4096.0, "K=4096")


def _stem(tmp_path: Path) -> Path:
    return digits_methods._method_file(tmp_path, Method("D-TRAK", method_random, {"output": "square"}))


def test_method_scores_round_trip_through_npz_and_json(tmp_path):
    stem, result = _stem(tmp_path), _result()
    digits_methods.save_method_result(stem, "D-TRAK", result, 7.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [stem.name + ".json", stem.name + ".npz"]
    loaded, wall = digits_methods.load_method_result(stem, "D-TRAK", (3, 5))
    assert wall == 7.0 and list(loaded.scores) == ["lambda=1", "lambda=10"]
    for label, scores in result.scores.items():
        np.testing.assert_array_equal(loaded.scores[label], scores)
    assert (loaded.train_seconds, loaded.query_seconds, loaded.bytes_per_sample, loaded.notes) == (
        1.5,
        2.5,
        4096.0,
        "K=4096",
    )


def test_another_method_or_shape_is_not_read_as_this_one(tmp_path):
    stem = _stem(tmp_path)
    digits_methods.save_method_result(stem, "D-TRAK", _result(), 7.0)
    assert digits_methods.load_method_result(stem, "TRAK", (3, 5)) is None
    assert digits_methods.load_method_result(stem, "D-TRAK", (3, 6)) is None
    other = digits_methods._method_file(tmp_path, Method("D-TRAK", method_random, {"output": "loss"}))
    assert other != stem  # the file names the kwargs too


def test_a_pickled_array_is_refused_not_executed(tmp_path):
    stem = _stem(tmp_path)
    digits_methods.save_method_result(stem, "D-TRAK", _result(), 7.0)
    marker = tmp_path / "executed"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    # an object array in the npz can only be read with allow_pickle=True
    np.savez(stem.with_suffix(".npz"), s0=np.array([Payload()], dtype=object), s1=np.zeros((3, 5)))
    assert digits_methods.load_method_result(stem, "D-TRAK", (3, 5)) is None
    assert not marker.exists()
    stem.with_suffix(".npz").write_bytes(pickle.dumps(Payload()))  # the old cache format
    assert digits_methods.load_method_result(stem, "D-TRAK", (3, 5)) is None
    assert not marker.exists()


@pytest.mark.parametrize(
    "change",
    [
        {"labels": ["lambda=1"]},  # fewer labels than arrays
        {"labels": ["a", "a"]},
        {"train_seconds": "1.5"},
        {"format": "something else"},
        {"notes": None},
    ],
)
def test_tampered_metadata_is_refused(tmp_path, change):
    stem = _stem(tmp_path)
    digits_methods.save_method_result(stem, "D-TRAK", _result(), 7.0)
    meta = json.loads(stem.with_suffix(".json").read_text())
    stem.with_suffix(".json").write_text(json.dumps({**meta, **change}))
    assert digits_methods.load_method_result(stem, "D-TRAK", (3, 5)) is None


def test_model_cache_writes_are_atomic_and_readable(tmp_path, monkeypatch):
    state = {"w": torch.arange(6.0)}
    path = tmp_path / "sub" / "ddpm-x.pt"
    digits_context.save_atomic(state, path)
    assert [p.name for p in path.parent.iterdir()] == ["ddpm-x.pt"]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o644
    torch.testing.assert_close(torch.load(path, weights_only=True), state)

    def failing_save(obj, f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(digits_context.torch, "save", failing_save)
    with pytest.raises(RuntimeError):
        digits_context.save_atomic(state, path)
    assert [p.name for p in path.parent.iterdir()] == ["ddpm-x.pt"]  # the old file is intact, no temporary left
    torch.testing.assert_close(torch.load(path, weights_only=True), state)


def test_default_cache_dir_is_the_users(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert digits_context.default_cache_dir() == tmp_path / "diffusers_dmin" / "benchmarks" / "digits"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert digits_context.default_cache_dir() == Path.home() / ".cache" / "diffusers_dmin" / "benchmarks" / "digits"
