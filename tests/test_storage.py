"""Storage: shard files, the manifest, atomic writes, and verification on read (storage.py)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffusers_dmin.config import DMinConfig, SketchSpec
from diffusers_dmin.constants import MANIFEST_NAME
from diffusers_dmin.errors import (
    ConfigError,
    DMinError,
    IndexCorruptError,
    IndexNotFoundError,
    NonFiniteGradientError,
)
from diffusers_dmin.storage import (
    HNSWInfo,
    IndexMetadata,
    Manifest,
    describe_shard,
    open_shard,
    read_manifest,
    read_noise,
    sha256_file,
    shard_name,
    to_ids_array,
    to_storage_array,
    verify_file,
    write_manifest,
    write_noise,
    write_shard,
    write_shards,
)


def _sketches(n=16, t=3, k=32, seed=0):
    return torch.randn(n, t, k, generator=torch.Generator().manual_seed(seed))


def _spec(config):
    return SketchSpec(
        config=config,
        family="unet2d",
        target="epsilon",
        timesteps=tuple(range(999, 0, -999 // config.num_timesteps))[: config.num_timesteps],
        latent_shape=(1, 8, 8),
        param_names=("down.attn.to_q.weight", "down.attn.to_k.weight"),
        input_dim=512,
        param_fingerprint="0123456789abcdef",
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_shard_is_a_standard_safetensors_file_and_memory_maps(tmp_path, dtype):
    sketches = _sketches()
    ids = np.arange(100, 116)
    info = write_shard(tmp_path, shard_name(0), sketches, ids, dtype)
    assert info.name == "shards/sketches-00000.safetensors" and info.num_rows == 16
    path = tmp_path / info.name
    assert info.sha256 == sha256_file(path) and info.num_bytes == path.stat().st_size

    torch_dtype = getattr(torch, dtype)
    with safe_open(str(path), framework="pt") as f:  # the real safetensors reader
        torch.testing.assert_close(f.get_tensor("sketches"), sketches.to(torch_dtype), rtol=0, atol=0)
        assert f.get_tensor("ids").tolist() == ids.tolist()

    shard = open_shard(tmp_path, info, num_timesteps=3, sketch_dim=32, dtype=dtype)
    assert isinstance(shard.sketches, np.memmap)  # not a copy
    assert shard.ids.dtype == np.int64 and shard.ids.tolist() == ids.tolist()
    raw = torch.from_numpy(np.array(shard.sketches))
    values = raw.view(torch.bfloat16) if dtype == "bfloat16" else raw
    torch.testing.assert_close(values, sketches.to(torch_dtype), rtol=0, atol=0)
    assert not list(tmp_path.rglob("*.tmp")), "temp files must not survive an atomic write"


def test_write_shards_splits_rows(tmp_path):
    infos = write_shards(tmp_path, _sketches(10), np.arange(10), "float16", start_index=3, max_shard_rows=4)
    assert [i.name for i in infos] == [shard_name(3), shard_name(4), shard_name(5)]
    assert [i.num_rows for i in infos] == [4, 4, 2]


def test_manifest_round_trip(tmp_path):
    config = DMinConfig(num_timesteps=3, sketch_dim=32, dtype="bfloat16")
    spec = _spec(config)
    shards = write_shards(tmp_path, _sketches(), np.arange(16), "bfloat16", max_shard_rows=10)
    noise = write_noise(tmp_path, torch.randn(1, 8, 8))
    hnsw = HNSWInfo("hnsw.bin", "a" * 64, 123, num_rows=16, sketch_dim=16, M=16, ef_construction=200, ef=100)
    metadata = IndexMetadata(base_model_id="org/base", dataset_id="org/data", id_column="id", extra={"note": 1})
    manifest = Manifest(config=config, spec=spec, shards=shards, noise=noise, hnsw=hnsw, metadata=metadata)
    write_manifest(tmp_path, manifest)

    data = json.loads((tmp_path / MANIFEST_NAME).read_text())
    assert data["num_rows"] == 16 and data["sketch_dim"] == 32 and data["dtype"] == "bfloat16"
    assert data["dataset"] == {
        "id": "org/data",
        "revision": None,
        "split": None,
        "fingerprint": None,
        "id_column": "id",
    }
    assert data["base_model"]["id"] == "org/base" and data["adapter"] is None
    loaded = read_manifest(tmp_path)
    assert loaded.spec == spec and loaded.config == config and loaded.shards == shards and loaded.hnsw == hnsw
    assert loaded.noise == noise and loaded.metadata == metadata and loaded.library_version
    torch.testing.assert_close(read_noise(tmp_path, loaded.noise).shape, torch.Size([1, 8, 8]))


def _write_valid_manifest(folder):
    config = DMinConfig(num_timesteps=3, sketch_dim=32)
    shards = write_shards(folder, _sketches(), np.arange(16), "float16")
    write_manifest(folder, Manifest(config=config, shards=shards))
    return json.loads((folder / MANIFEST_NAME).read_text())


@pytest.mark.parametrize(
    "corrupt",
    [
        pytest.param(lambda text, data: text[: len(text) // 2], id="truncated"),
        pytest.param(lambda text, data: "", id="empty"),
        pytest.param(lambda text, data: json.dumps({**data, "num_rows": 17}), id="row-count"),
        pytest.param(lambda text, data: json.dumps({k: v for k, v in data.items() if k != "shards"}), id="no-shards"),
        pytest.param(
            lambda text, data: json.dumps({**data, "shards": [{**data["shards"][0], "name": "../../etc/passwd"}]}),
            id="path-escape",
        ),
        pytest.param(
            lambda text, data: json.dumps({**data, "shards": [{**data["shards"][0], "sha256": "xyz"}]}), id="bad-sha"
        ),
        pytest.param(lambda text, data: json.dumps({**data, "config": {"sketch_dim": -1}}), id="bad-config"),
        pytest.param(lambda text, data: "[1, 2]", id="not-an-object"),
    ],
)
def test_invalid_manifest_raises_index_corrupt(tmp_path, corrupt):
    data = _write_valid_manifest(tmp_path)
    path = tmp_path / MANIFEST_NAME
    path.write_text(corrupt(path.read_text(), data))
    with pytest.raises(IndexCorruptError, match=MANIFEST_NAME):
        read_manifest(tmp_path)


def test_newer_format_version_asks_to_upgrade(tmp_path):
    data = _write_valid_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(IndexCorruptError, match="Upgrade"):
        read_manifest(tmp_path)


def test_missing_folder_or_manifest_raises_not_found(tmp_path):
    with pytest.raises(IndexNotFoundError, match="does not exist"):
        read_manifest(tmp_path / "nope")
    with pytest.raises(IndexNotFoundError, match=MANIFEST_NAME):
        read_manifest(tmp_path)


def test_flipped_byte_and_truncation_are_detected(tmp_path):
    info = write_shard(tmp_path, shard_name(0), _sketches(), np.arange(16), "float16")
    path = tmp_path / info.name
    verify_file(tmp_path, info.name, info.sha256, info.num_bytes, "shard")  # caches the hash

    data = bytearray(path.read_bytes())
    data[-7] ^= 0x01  # one bit in the sketch data; same size
    path.write_bytes(bytes(data))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    with pytest.raises(IndexCorruptError) as err:
        open_shard(tmp_path, info, num_timesteps=3, sketch_dim=32, dtype="float16")
    message = str(err.value)
    assert info.sha256 in message and sha256_file(path) in message and "force_download=True" in message

    path.write_bytes(bytes(data[:-100]))
    with pytest.raises(IndexCorruptError, match="truncated"):
        open_shard(tmp_path, info, num_timesteps=3, sketch_dim=32, dtype="float16")
    path.unlink()
    with pytest.raises(IndexCorruptError, match="missing"):
        open_shard(tmp_path, info, num_timesteps=3, sketch_dim=32, dtype="float16")


def test_header_must_match_the_manifest_shape(tmp_path):
    info = write_shard(tmp_path, shard_name(0), _sketches(), np.arange(16), "float16")
    with pytest.raises(IndexCorruptError, match=r"\(16, 4, 32\)"):
        open_shard(tmp_path, info, num_timesteps=4, sketch_dim=32, dtype="float16")
    with pytest.raises(IndexCorruptError, match="float32"):
        open_shard(tmp_path, info, num_timesteps=3, sketch_dim=32, dtype="float32")


def test_garbage_with_matching_checksum_is_still_rejected(tmp_path):
    """A file whose sha256 matches but whose header is nonsense (a manifest written for it) fails cleanly."""
    path = tmp_path / "shards" / "sketches-00000.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"\xff" * 64)
    from diffusers_dmin.storage import ShardInfo

    info = ShardInfo(path.relative_to(tmp_path).as_posix(), 1, sha256_file(path), 64)
    with pytest.raises(IndexCorruptError, match="header"):
        open_shard(tmp_path, info, num_timesteps=1, sketch_dim=4, dtype="float16")


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    write_shard(tmp_path, shard_name(0), _sketches(seed=1), np.arange(16), "float32")
    second = write_shard(tmp_path, shard_name(0), _sketches(seed=2), np.arange(16), "float32")
    assert sha256_file(tmp_path / second.name) == second.sha256
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["sketches-00000.safetensors"]


def test_input_validation():
    with pytest.raises(NonFiniteGradientError) as err:
        to_storage_array(torch.tensor([[[1.0, float("nan")]], [[0.0, 1.0]]]), "float32")
    assert err.value.positions == [0]
    with pytest.raises(NonFiniteGradientError, match="float16"):
        to_storage_array(torch.full((1, 1, 2), 1e6), "float16")  # overflows float16
    with pytest.raises(ConfigError, match="shape"):
        to_storage_array(torch.zeros(4, 8), "float16")
    with pytest.raises(ConfigError, match="floating"):
        to_storage_array(torch.zeros(4, 1, 8, dtype=torch.int64), "float16")
    with pytest.raises(ConfigError, match="duplicates"):
        to_ids_array([1, 2, 2], 3)
    with pytest.raises(ConfigError, match="integers"):
        to_ids_array([1.0, 2.0], 2)
    with pytest.raises(ConfigError, match="3 integers"):
        to_ids_array([1, 2], 3)
    with pytest.raises(ConfigError, match="valid names"):
        IndexMetadata.from_kwargs(dataset="org/x")
    with pytest.raises(ConfigError, match="string"):
        IndexMetadata(base_model_id=3)
    assert issubclass(IndexCorruptError, DMinError) and issubclass(IndexCorruptError, OSError)


def test_describe_shard_rebuilds_the_record_of_an_existing_file(tmp_path):
    info = write_shard(tmp_path, "shards/sketches-r1-00007.safetensors", _sketches(5), np.arange(5), "bfloat16")
    assert describe_shard(tmp_path, info.name) == info
    with pytest.raises(IndexCorruptError, match="No shard"):
        describe_shard(tmp_path, "shards/missing.safetensors")


def test_shard_name_has_a_form_for_saves_and_one_for_builds():
    from diffusers_dmin.storage import saved_shard_number

    assert shard_name(3) == "shards/sketches-00003.safetensors"
    assert shard_name(first_id=12) == "shards/sketches-from-000000000012.safetensors"
    assert shard_name(first_id=12, duplicate=2) == "shards/sketches-from-000000000012-2.safetensors"
    assert [saved_shard_number(shard_name(n)) for n in (0, 7, 123456)] == [0, 7, 123456]
    for other in (shard_name(first_id=12), "shards/sketches-7.safetensors", "shards/sketches-r0-00001.safetensors"):
        assert saved_shard_number(other) is None  # not a name a save writes: never renumbered or removed as ours
    with pytest.raises(ValueError, match="exactly one"):
        shard_name(1, first_id=2)


def test_default_shard_rows_saves_fill_a_gib_and_builds_cap_their_units():
    from diffusers_dmin.storage import default_shard_rows

    assert default_shard_rows((10, 4096), "float16") == 2**30 // (10 * 4096 * 2)  # 13,107 rows of 80 kB
    assert default_shard_rows((10, 4096), "float16", batch_size=64) == 1024  # a build's unit: at most 1,024 rows
    assert default_shard_rows((10, 4096), "float16", batch_size=48) == 1008  # ... whole batches
    assert default_shard_rows((20, 2**24), "float32") == 1  # a save writes at least one row per shard
