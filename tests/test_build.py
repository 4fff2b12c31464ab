"""GradientIndex.build (build.py): datasets, columns, bad rows, resume, overwrite, incremental add, progress."""

from __future__ import annotations

import json
import logging

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_dmin import DMinConfig, GradientIndex, GradientSketcher
from diffusers_dmin.build import BUILD_STATE_NAME, default_shard_rows
from diffusers_dmin.constants import MANIFEST_NAME
from diffusers_dmin.data import load_digits
from diffusers_dmin.errors import (
    ConfigError,
    DatasetError,
    IndexCorruptError,
    IndexMismatchError,
    NonFiniteGradientError,
)
from diffusers_dmin.logging import are_progress_bars_disabled
from diffusers_dmin.objectives import prepare_images
from diffusers_dmin.storage import read_manifest
from diffusers_dmin.testing import add_tiny_lora, tiny_ddpm_pipeline, tiny_sd_pipeline


datasets = pytest.importorskip("datasets")

# Uniform timesteps and K=1024: with T=2 the cubic set (999, 874) sits so close to pure noise, and K=64 sketches are
# so coarse (error ~1/8 per timestep), that the random tiny models give images sketches too alike for the
# self-retrieval checks to mean anything (measured: 3 of 10 right at K=64).
CONFIG = DMinConfig(num_timesteps=2, timestep_spacing="uniform", sketch_dim=1024, dtype="float32")


@pytest.fixture(autouse=True)
def one_thread():
    """Bit-identical comparisons need a fixed thread count; one thread is also the fastest on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ddpm():
    return tiny_ddpm_pipeline(seed=0)


@pytest.fixture(scope="module")
def sd_lora():
    pipe = tiny_sd_pipeline(seed=0)
    add_tiny_lora(pipe.unet, seed=1)
    return pipe


@pytest.fixture(scope="module")
def digits():
    return load_digits(16, split="train[:40]")


def _build(pipe, dataset, folder, **kwargs):
    options = dict(prompt_column=None, id_column="id", batch_size=4, max_shard_rows=8, progress=False)
    options.update(kwargs)
    config = options.pop("config", CONFIG)
    return GradientIndex.build(pipe, dataset, config, folder, **options)


def _rows(index):
    """id -> float32 sketch, for comparisons that do not depend on row order."""
    sketches = index.get_sketches(index.ids).numpy()
    return dict(zip(index.ids.tolist(), sketches))


def _files(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted((folder / "shards").glob("*.safetensors"))}


# ------------------------------------------------------------------------------------------------ what gets built


def test_build_equals_sketcher_and_from_sketches_on_a_conditional_lora_pipeline(sd_lora, tmp_path):
    rows = load_digits(16, split="train[:10]")
    index = GradientIndex.build(
        sd_lora, rows, CONFIG, tmp_path / "idx", batch_size=4, max_shard_rows=4, progress=False, dataset_id="digits"
    )
    sketcher = GradientSketcher.from_pipeline(sd_lora, CONFIG)
    pixels = torch.cat([prepare_images(image, (16, 16), 3) for image in rows["image"]])
    expected = torch.cat([sketcher(images=pixels[i : i + 4], prompts=rows["text"][i : i + 4]) for i in (0, 4, 8)])
    reference = GradientIndex.from_sketches(expected, spec=sketcher.spec, noise=sketcher.noise)

    assert len(index) == 10 and index.ids.tolist() == list(range(10))  # row positions when id_column is None
    assert index.spec == sketcher.spec
    torch.testing.assert_close(index.get_sketches(index.ids), reference.get_sketches(reference.ids), rtol=0, atol=0)
    torch.testing.assert_close(index.noise, sketcher.noise)
    manifest = read_manifest(tmp_path / "idx")
    assert [s.num_rows for s in manifest.shards] == [4, 4, 2]
    meta = index.metadata
    assert (meta.dataset_id, meta.dataset_split, meta.id_column) == ("digits", "train", None)
    assert meta.dataset_fingerprint == rows._fingerprint
    assert not (tmp_path / "idx" / BUILD_STATE_NAME).exists()  # the manifest now records the build
    top = index.search(expected[3:4], top_k=1, spec=sketcher.spec)[0]
    assert int(top.sample_ids[0]) == 3  # self-retrieval


def test_unconditional_pipeline_ignores_prompts_and_uses_the_id_column(ddpm, tmp_path):
    rows = load_digits(16, split="train[100:112]")  # ids 100..111
    index = GradientIndex.build(
        ddpm,
        rows,
        CONFIG,
        output_dir=tmp_path / "idx",
        image_column="image",
        prompt_column=None,
        id_column="id",
        batch_size=64,
        resume=True,
        progress=False,
    )  # the call examples/quickstart.py makes
    assert index.ids.tolist() == list(range(100, 112))
    again = _build(ddpm, rows, tmp_path / "other", prompt_column="text")  # the default column is simply ignored
    # other batches (4 vs 64 rows) only change the float rounding of the batched gradients
    np.testing.assert_allclose(again.get_sketches(again.ids), index.get_sketches(index.ids), rtol=0, atol=1e-5)


def test_imagefolder_with_mixed_sizes_and_modes_and_loader_workers(ddpm, tmp_path):
    rng = np.random.default_rng(0)
    for i, (size, mode) in enumerate([((20, 24), "RGB"), ((16, 16), "L"), ((30, 18), "RGBA"), ((16, 40), "RGB")]):
        channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
        array = (rng.random((*size, channels)) * 255).astype(np.uint8)
        (tmp_path / "images" / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        PIL.Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(
            tmp_path / "images" / f"class{i % 2}" / f"{i}.png"
        )
    dataset = datasets.load_dataset(
        "imagefolder", data_dir=str(tmp_path / "images"), split="train", cache_dir=str(tmp_path / "cache")
    )
    single = _build(ddpm, dataset, tmp_path / "a", id_column=None, batch_size=2, max_shard_rows=2)
    workers = _build(ddpm, dataset, tmp_path / "b", id_column=None, batch_size=2, max_shard_rows=2, num_workers=2)
    assert len(single) == 4
    np.testing.assert_array_equal(single.get_sketches(single.ids), workers.get_sketches(workers.ids))


def _jsonl(tmp_path, names, prompts=True):
    lines = []
    for i, name in enumerate(names):
        row = {"sample": 10 * i, "file": name}
        if prompts:
            row["caption"] = f"a photo of the digit {i}"
        lines.append(json.dumps(row))
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return datasets.load_dataset("json", data_files=str(path), split="train", cache_dir=str(tmp_path / "cache"))


def _write_digit_files(tmp_path, count):
    names = []
    for i, image in enumerate(load_digits(16, split=f"train[:{count}]")["image"]):
        image.save(tmp_path / f"digit{i}.png")
        names.append(f"digit{i}.png")
    return names


def test_jsonl_with_relative_image_paths(sd_lora, tmp_path):
    dataset = _jsonl(tmp_path, _write_digit_files(tmp_path, 5))
    index = GradientIndex.build(
        sd_lora,
        dataset,
        CONFIG,
        tmp_path / "idx",
        image_column="file",
        prompt_column="caption",
        id_column="sample",
        batch_size=2,
        image_root=tmp_path,
        progress=False,
    )
    assert index.ids.tolist() == [0, 10, 20, 30, 40]


def test_unreadable_image_names_the_row_id_or_is_skipped_and_recorded(ddpm, tmp_path):
    names = _write_digit_files(tmp_path, 6)
    names[2] = "missing.png"
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    names[4] = "corrupt.png"
    dataset = _jsonl(tmp_path, names, prompts=False)
    with pytest.raises(DatasetError, match=r"id 20 .*missing\.png.*on_error='skip'") as info:
        _build(ddpm, dataset, tmp_path / "raise", image_column="file", id_column="sample", image_root=tmp_path)
    assert info.value.sample_id == 20

    index = _build(
        ddpm, dataset, tmp_path / "skip", image_column="file", id_column="sample", image_root=tmp_path, on_error="skip"
    )
    assert index.ids.tolist() == [0, 10, 30, 50]
    skipped = index.metadata.extra["skipped"]
    assert [record["id"] for record in skipped] == [20, 40]
    assert "FileNotFoundError" in skipped[0]["reason"] and "corrupt.png" in skipped[1]["reason"]
    assert not list((tmp_path / "skip" / "shards").glob("*.json"))  # the manifest now holds the records
    # a resumed (or extended) build does not retry them and keeps the record
    again = _build(
        ddpm, dataset, tmp_path / "skip", image_column="file", id_column="sample", image_root=tmp_path, on_error="skip"
    )
    assert len(again) == 4 and [r["id"] for r in again.metadata.extra["skipped"]] == [20, 40]


def test_killed_between_a_skip_record_and_its_shard_resumes_with_every_record(ddpm, tmp_path, monkeypatch):
    import diffusers_dmin.build as build_module

    rng = np.random.default_rng(0)
    images = [rng.random((16, 16)).astype(np.float32).tolist() for _ in range(12)]
    images[1] = images[4] = None  # unreadable rows; the resumed build cuts its units differently
    dataset = datasets.Dataset.from_dict({"image": images, "id": list(range(12))})
    options = dict(batch_size=2, max_shard_rows=4, on_error="skip", config=CONFIG.replace(sketch_dim=64))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    with monkeypatch.context() as patch:
        patch.setattr(build_module, "write_shard", killed)  # after the first unit's record of skipped rows
        with pytest.raises(KeyboardInterrupt):
            _build(ddpm, dataset, tmp_path / "index", **options)
    assert [p.name for p in (tmp_path / "index" / "shards").iterdir()] == ["sketches-from-000000000000.skipped.json"]
    index = _build(ddpm, dataset, tmp_path / "index", **options)
    assert sorted(index.ids.tolist()) == [0, 2, 3, 5, 6, 7, 8, 9, 10, 11]
    assert sorted(record["id"] for record in index.metadata.extra["skipped"]) == [1, 4]


def test_non_finite_gradient_names_the_row_id(ddpm, tmp_path):
    images = np.random.default_rng(0).random((6, 16, 16, 1)).astype(np.float32)
    images[3, 5, 5, 0] = np.nan
    dataset = datasets.Dataset.from_dict({"image": list(images), "uid": [7, 8, 9, 10, 11, 12]})
    with pytest.raises(NonFiniteGradientError, match=r"ids \[10\]") as info:
        _build(ddpm, dataset, tmp_path / "raise", id_column="uid")
    assert info.value.sample_ids == [10]
    index = _build(ddpm, dataset, tmp_path / "skip", id_column="uid", on_error="skip")
    assert index.ids.tolist() == [7, 8, 9, 11, 12]
    assert index.metadata.extra["skipped"] == [{"id": 10, "reason": "non-finite loss or gradient"}]


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_columns_name_the_columns_that_exist(ddpm, sd_lora, digits, tmp_path):
    with pytest.raises(DatasetError, match=r"`image_column='img'`.*\['id', 'image', 'label', 'text'\]"):
        _build(ddpm, digits, tmp_path, image_column="img")
    with pytest.raises(DatasetError, match=r"`id_column='uid'`.*\['id', 'image', 'label', 'text'\]"):
        _build(ddpm, digits, tmp_path, id_column="uid")
    with pytest.raises(DatasetError, match=r"`prompt_column='caption'`.*\['id', 'image', 'label', 'text'\]"):
        _build(sd_lora, digits, tmp_path, prompt_column="caption")
    with pytest.raises(ConfigError, match="conditional: pass `prompt_column=`"):
        _build(sd_lora, digits, tmp_path, prompt_column=None)
    assert not (tmp_path / "shards").exists()


def test_bad_ids_datasets_and_options_are_refused(ddpm, digits, tmp_path):
    with pytest.raises(DatasetError, match="holds the ids \\[1\\] more than once"):
        _build(ddpm, datasets.Dataset.from_dict({"image": list(np.zeros((3, 16, 16, 1))), "id": [1, 2, 1]}), tmp_path)
    with pytest.raises(DatasetError, match="ids must be integers"):
        _build(ddpm, digits, tmp_path, id_column="text")
    with pytest.raises(DatasetError, match=r"splits \['train'\]; pass one split"):
        _build(ddpm, datasets.DatasetDict({"train": digits}), tmp_path)
    with pytest.raises(DatasetError, match="must be a `datasets.Dataset`"):
        _build(ddpm, [{"image": None}], tmp_path)
    with pytest.raises(ConfigError, match="`batch_size` must be a positive integer"):
        _build(ddpm, digits, tmp_path, batch_size=0)
    with pytest.raises(ConfigError, match="`on_error` must be one of"):
        _build(ddpm, digits, tmp_path, on_error="ignore")


# ------------------------------------------------------------------------------------------------ resume


class _Boom(Exception):
    pass


def test_interrupted_build_resumes_without_recomputing_finished_shards(ddpm, digits, tmp_path, monkeypatch):
    import diffusers_dmin.build as build_module

    fresh = _build(ddpm, digits, tmp_path / "fresh")
    folder = tmp_path / "idx"
    real_write = build_module.write_shard
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise _Boom("killed while writing the third shard")
        return real_write(*args, **kwargs)

    monkeypatch.setattr(build_module, "write_shard", failing_write)
    with pytest.raises(_Boom):
        _build(ddpm, digits, folder)
    monkeypatch.setattr(build_module, "write_shard", real_write)
    assert not (folder / MANIFEST_NAME).exists() and (folder / BUILD_STATE_NAME).exists()
    before = _files(folder)
    assert len(before) == 2
    (folder / "shards" / ".sketches-from-000000000016.safetensors.abc.tmp").write_bytes(b"half a shard")

    written = []
    monkeypatch.setattr(build_module, "write_shard", lambda *a, **k: written.append(a[1]) or real_write(*a, **k))
    index = _build(ddpm, digits, folder)
    assert written == [f"shards/sketches-from-{i:012d}.safetensors" for i in (16, 24, 32)]  # only the rest
    after = _files(folder)
    assert {name: after[name] for name in before} == before  # finished shards untouched (bytes and mtime)
    assert not list(folder.rglob("*.tmp"))
    assert index.ids.tolist() == list(range(40))
    assert _files(tmp_path / "fresh").keys() == after.keys()
    np.testing.assert_array_equal(index.get_sketches(index.ids), fresh.get_sketches(fresh.ids))  # same as unbroken


def test_resume_with_another_config_or_id_column_is_refused(ddpm, digits, tmp_path, monkeypatch):
    import diffusers_dmin.build as build_module

    def fail(*args, **kwargs):
        raise _Boom()

    monkeypatch.setattr(build_module, "write_shard", fail)
    with pytest.raises(_Boom):
        _build(ddpm, digits, tmp_path / "unfinished")
    monkeypatch.undo()
    _build(ddpm, digits, tmp_path / "finished")
    for folder in ("unfinished", "finished"):
        with pytest.raises(IndexMismatchError, match=r"config.sketch_dim: index has 1024, new build has 32") as info:
            _build(ddpm, digits, tmp_path / folder, config=CONFIG.replace(sketch_dim=32))
        assert "resume=False" in str(info.value)
        with pytest.raises(IndexMismatchError, match=r"id_column: index has 'id', new build has None"):
            _build(ddpm, digits, tmp_path / folder, id_column=None)
        other = tiny_ddpm_pipeline(seed=1)
        with pytest.raises(IndexMismatchError, match="param_fingerprint"):
            _build(other, digits, tmp_path / folder)


def test_resume_false_starts_over_and_keeps_foreign_files(ddpm, digits, tmp_path):
    folder = tmp_path / "idx"
    _build(ddpm, digits, folder)
    (folder / "notes.txt").write_text("mine")
    index = _build(ddpm, digits.select(range(12)), folder, config=CONFIG.replace(sketch_dim=32), resume=False)
    assert len(index) == 12 and index.sketch_dim == 32
    assert len(list((folder / "shards").glob("*.safetensors"))) == 2
    assert (folder / "notes.txt").read_text() == "mine"


def test_shards_without_a_record_are_refused(ddpm, digits, tmp_path):
    folder = tmp_path / "idx"
    _build(ddpm, digits, folder)
    (folder / MANIFEST_NAME).unlink()
    with pytest.raises(IndexCorruptError, match="origin is unknown.*resume=False"):
        _build(ddpm, digits, folder)


# ------------------------------------------------------------------------------------------------ incremental add


def test_incremental_add_appends_shards_keeps_old_files_and_extends_the_graph(ddpm, tmp_path):
    folder = tmp_path / "idx"
    first = _build(ddpm, load_digits(16, split="train[:20]"), folder, hnsw=True)
    assert first.metadata.dataset_fingerprint is not None
    old = _files(folder)
    old_manifest = read_manifest(folder)
    assert old_manifest.hnsw.num_rows == 20

    grown = load_digits(16, split="train[:36]")
    index = _build(ddpm, grown, folder)
    manifest = read_manifest(folder)
    assert _files(folder).items() >= old.items()  # every old shard byte-identical, same mtime
    assert manifest.shards[: len(old_manifest.shards)] == old_manifest.shards
    assert index.ids.tolist() == list(range(36))
    assert manifest.hnsw.num_rows == 36 and manifest.hnsw.sha256 != old_manifest.hnsw.sha256
    assert index.metadata.dataset_fingerprint == grown._fingerprint
    queries = index.get_sketches([30, 3, 12])
    for approx, exact in zip(index.search(queries, top_k=3, exact=False), index.search(queries, top_k=3)):
        np.testing.assert_array_equal(approx.sample_ids, exact.sample_ids)
    fresh = _build(ddpm, grown, tmp_path / "fresh")
    np.testing.assert_array_equal(index.get_sketches(index.ids), fresh.get_sketches(fresh.ids))


def test_a_complete_index_is_left_alone(ddpm, digits, tmp_path):
    folder = tmp_path / "idx"
    _build(ddpm, digits, folder)
    stamp = (folder / MANIFEST_NAME).stat().st_mtime_ns
    index = _build(ddpm, digits, folder)
    assert len(index) == 40 and (folder / MANIFEST_NAME).stat().st_mtime_ns == stamp


# ------------------------------------------------------------------------------------------------ progress, logging


def test_progress_bar_and_shard_logging(ddpm, digits, tmp_path, capsys):
    handler = _ListHandler()
    logger = logging.getLogger("diffusers_dmin")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        _build(ddpm, digits.select(range(16)), tmp_path / "idx", progress=True)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    messages = "\n".join(handler.messages)
    assert "Wrote shards/sketches-from-000000000008.safetensors: 8 rows" in messages
    assert "16 to compute in 2 shards of up to 8 rows over 1 process(es)" in messages
    assert "samples/s" in messages
    if not are_progress_bars_disabled():
        err = capsys.readouterr().err
        assert "Gradient sketches" in err and "sample/s" in err


class _ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_default_shard_rows_is_a_multiple_of_the_batch_size():
    assert default_shard_rows(64, DMinConfig()) == 1024  # T=10, K=4096 float16: 80 kB per row, capped at 1,024 rows
    assert default_shard_rows(48, DMinConfig(sketch_dim=2**16)) == 192  # 1.25 MiB per row: 204 rows fit 256 MiB
    assert default_shard_rows(8, DMinConfig(sketch_dim=2**24, num_timesteps=20)) == 8  # at least one batch


def test_shard_rows_is_a_deprecated_alias_of_max_shard_rows(ddpm, digits, tmp_path):
    rows = digits.select(range(12))
    options = dict(prompt_column=None, id_column="id", batch_size=4, progress=False)
    new = GradientIndex.build(ddpm, rows, CONFIG, tmp_path / "new", max_shard_rows=4, **options)
    with pytest.warns(FutureWarning, match="`shard_rows` is deprecated.*`max_shard_rows`"):
        old = GradientIndex.build(ddpm, rows, CONFIG, tmp_path / "old", shard_rows=4, **options)
    names = [s.name for s in read_manifest(tmp_path / "new").shards]
    assert names == [f"shards/sketches-from-{i:012d}.safetensors" for i in (0, 4, 8)]
    assert [s.name for s in read_manifest(tmp_path / "old").shards] == names
    assert np.array_equal(old.get_sketches(old.ids).numpy(), new.get_sketches(new.ids).numpy())
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="disagree"):
        GradientIndex.build(ddpm, rows, CONFIG, tmp_path / "both", shard_rows=4, max_shard_rows=8, **options)


def test_a_build_writes_the_manifest_once(ddpm, digits, tmp_path, monkeypatch):
    from diffusers_dmin import storage

    written = []
    serialise = storage._manifest_bytes
    monkeypatch.setattr(storage, "_manifest_bytes", lambda manifest: written.append(1) or serialise(manifest))
    options = dict(prompt_column=None, id_column="id", batch_size=4, max_shard_rows=4, progress=False, hnsw=True)
    index = GradientIndex.build(ddpm, digits.select(range(12)), CONFIG, tmp_path / "idx", **options)
    assert len(written) == 1  # the card and the graph are written with it, by the save that finishes the build
    assert len(index) == 12 and read_manifest(tmp_path / "idx").hnsw.num_rows == 12


def test_a_launched_process_that_believes_it_runs_alone_is_stopped(ddpm, digits, tmp_path, monkeypatch):
    from accelerate import PartialState

    monkeypatch.setenv("WORLD_SIZE", "2")  # e.g. torchrun on a CPU machine with a state created without cpu=True
    with pytest.raises(ConfigError, match=r"one of 2 \(WORLD_SIZE\).*1 process\(es\).*cpu=True"):
        _build(ddpm, digits, tmp_path, accelerator=PartialState())
    with pytest.raises(ConfigError, match="must be an `accelerate.Accelerator`"):
        _build(ddpm, digits, tmp_path, accelerator=object())
    assert not (tmp_path / "shards").exists()
