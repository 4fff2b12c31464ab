"""The index folder on disk (DESIGN §4): shards, noise and manifest; atomic writes, verified memory-mapped reads.

Building blocks that [`GradientIndex`] and the index builders share:

- [`write_shard`] / [`write_shards`] write `shards/sketches-NNNNN.safetensors` files ("sketches" `(n, T, K)` in the
  storage dtype, "ids" `(n,)` int64) atomically and return their [`ShardInfo`] (name, row count, sha256, size).
- [`write_noise`] writes `noise.safetensors`; [`write_manifest`] writes `dmin_index.json`. A writer writes all binary
  files first and the manifest last, so a folder whose manifest parses always lists complete, checksummed files.
- [`shard_name`] is the one shard naming scheme (numbered for saves, named after the first id for builds) and
  [`default_shard_rows`] the one shard-size policy (saves and builds); each says why its two cases differ.
- [`read_manifest`] parses and validates the manifest; [`open_shard`] checks a shard's size, sha256 and safetensors
  header against the manifest before it memory-maps the data (no copy; no pickle, no `torch.load`).

Every check that fails raises [`IndexCorruptError`] naming the file, what was expected, what was found, and the fix.
Shard names are free (any `shards/*.safetensors`), so parallel writers can each write their own shards and one
process writes the manifest listing them in row order. A builder does::

    # every worker, for each batch of rows it computed (the write is atomic: a present file is complete)
    info = write_shard(folder, f"shards/sketches-r{rank}-{step:05d}.safetensors", sketches, ids, config.dtype)
    # resuming after a crash: describe the shards already on disk instead of recomputing them
    info = describe_shard(folder, "shards/sketches-r0-00003.safetensors")
    # the main process, once every shard exists (ids must be unique across shards)
    manifest = Manifest(config=spec.config, spec=spec, shards=infos_in_row_order,
                        noise=write_noise(folder, sketcher.noise), metadata=IndexMetadata(dataset_id=...))
    write_manifest(folder, manifest)  # last; then GradientIndex.from_pretrained(folder)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .calibration import RecallCalibration
from .config import DTYPES, DMinConfig, SketchSpec
from .constants import (
    BUILD_MAX_SHARD_BYTES,
    BUILD_MAX_SHARD_ROWS,
    BUILD_SHARD_STEM_TEMPLATE,
    DEFAULT_MAX_SHARD_BYTES,
    DUPLICATE_SUFFIX_TEMPLATE,
    FAISS_CODECS,
    FORMAT_VERSION,
    IDS_KEY,
    MANIFEST_NAME,
    MAX_FAISS_COARSE_DIM,
    MAX_FAISS_NLIST,
    NOISE_KEY,
    NOISE_NAME,
    SAVED_SHARD_PATTERN,
    SHARD_NAME_TEMPLATE,
    SHARD_SUFFIX,
    SHARDS_DIR,
    SKETCHES_KEY,
    TEMP_SUFFIX,
)
from .errors import ConfigError, IndexCorruptError, IndexNotFoundError, NonFiniteGradientError, check_int
from .logging import get_logger
from .version import __version__


logger = get_logger(__name__)

__all__ = [
    "ShardInfo",
    "FileInfo",
    "HNSWInfo",
    "FaissInfo",
    "IndexMetadata",
    "Manifest",
    "ShardData",
    "shard_name",
    "saved_shard_number",
    "default_shard_rows",
    "describe_shard",
    "write_shard",
    "write_shards",
    "write_noise",
    "write_manifest",
    "read_manifest",
    "open_shard",
    "read_noise",
    "verify_file",
    "sha256_file",
    "to_storage_array",
    "to_ids_array",
    "atomic_write_bytes",
    "atomic_copy",
    "stage_bytes",
    "stage_copy",
    "stage_noise",
    "stage_manifest",
    "commit_temp",
    "remove_temp_files",
]

# safetensors dtype tag -> (our dtype name, numpy dtype used to hold the raw values)
_SAFETENSORS_DTYPES: dict[str, tuple[str, np.dtype]] = {
    "F16": ("float16", np.dtype(np.float16)),
    "BF16": ("bfloat16", np.dtype(np.uint16)),  # numpy has no bfloat16: raw bits, see `search.rows_as_tensor`
    "F32": ("float32", np.dtype(np.float32)),
    "I64": ("int64", np.dtype(np.int64)),
}
# the one dtype table: storage dtype name -> torch dtype (`config.DTYPES` lists the names)
TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_MAX_HEADER_BYTES = 100 * 2**20
# a manifest lists ~250 bytes per shard: 64 MiB is far beyond any real index, and bounds what parsing may cost
MAX_MANIFEST_BYTES = 64 * 2**20
_SAFETENSORS_ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4, "int64": 8}
_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_SAVED_SHARD = re.compile(SAVED_SHARD_PATTERN)
_HASH_CHUNK = 2**22


# --------------------------------------------------------------------------------------------------- file records


@dataclass(frozen=True)
class ShardInfo:
    r"""
    One shard file as the manifest lists it.

    Args:
        name (`str`): Path of the file relative to the index folder, e.g. `"shards/sketches-00000.safetensors"`.
        num_rows (`int`): Number of rows (training samples) in the shard.
        sha256 (`str`): Hex sha256 of the whole file.
        num_bytes (`int`): Size of the file in bytes.
    """

    name: str
    num_rows: int
    sha256: str
    num_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShardInfo:
        return cls(
            name=_check_relative_name(data["name"], "shards[].name"),
            num_rows=_check_int(data["num_rows"], "shards[].num_rows", minimum=1),
            sha256=_check_sha(data["sha256"], "shards[].sha256"),
            num_bytes=_check_int(data["num_bytes"], "shards[].num_bytes", minimum=8),
        )


@dataclass(frozen=True)
class FileInfo:
    r"""
    A checksummed file of the index other than a shard (the fixed noise).

    Args:
        name (`str`): Path relative to the index folder.
        sha256 (`str`): Hex sha256 of the file.
        num_bytes (`int`): Size in bytes.
        shape (`tuple[int, ...]`, *optional*): Shape of the tensor it holds.
    """

    name: str
    sha256: str
    num_bytes: int
    shape: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = None if self.shape is None else list(self.shape)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FileInfo:
        shape = data.get("shape")
        return cls(
            name=_check_relative_name(data["name"], "noise.name"),
            sha256=_check_sha(data["sha256"], "noise.sha256"),
            num_bytes=_check_int(data["num_bytes"], "noise.num_bytes", minimum=8),
            shape=None if shape is None else tuple(_check_int(s, "noise.shape", minimum=0) for s in shape),
        )


@dataclass(frozen=True)
class HNSWInfo:
    r"""
    The saved hnswlib graph and the parameters it was built with.

    Args:
        name (`str`): Path relative to the index folder (`"hnsw.bin"`).
        sha256 (`str`): Hex sha256 of the file, checked before hnswlib parses it.
        num_bytes (`int`): Size in bytes.
        num_rows (`int`): Rows `0 .. num_rows - 1` of the index are in the graph; later rows are added on load.
        sketch_dim (`int`): K of the vectors in the graph (the stored K, or a divisor of it when built folded).
        M (`int`), ef_construction (`int`), ef (`int`): hnswlib parameters (`ef` is applied after loading).
        space (`str`): hnswlib space, always `"ip"` (inner product).
        calibration (`RecallCalibration`, *optional*): How `ef` was calibrated to a recall target.
    """

    name: str
    sha256: str
    num_bytes: int
    num_rows: int
    sketch_dim: int
    M: int
    ef_construction: int
    ef: int
    space: str = "ip"
    calibration: RecallCalibration | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["calibration"] = None if self.calibration is None else self.calibration.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> HNSWInfo:
        space = data.get("space", "ip")
        if space != "ip":
            raise ValueError(f"hnsw.space must be 'ip', got {space!r}")
        return cls(
            name=_check_relative_name(data["name"], "hnsw.name"),
            sha256=_check_sha(data["sha256"], "hnsw.sha256"),
            num_bytes=_check_int(data["num_bytes"], "hnsw.num_bytes", minimum=1),
            num_rows=_check_int(data["num_rows"], "hnsw.num_rows", minimum=0),
            sketch_dim=_check_int(data["sketch_dim"], "hnsw.sketch_dim", minimum=1),
            M=_check_int(data["M"], "hnsw.M", minimum=2),
            ef_construction=_check_int(data["ef_construction"], "hnsw.ef_construction", minimum=1),
            ef=_check_int(data["ef"], "hnsw.ef", minimum=1),
            calibration=_calibration(data, "hnsw", "ef"),
        )


def _calibration(data: Mapping[str, Any], what: str, parameter: str) -> RecallCalibration | None:
    if data.get("calibration") is None:
        return None
    calibration = RecallCalibration.from_dict(_check_mapping(data["calibration"], f"{what}.calibration"))
    if calibration.parameter != parameter:
        raise ValueError(f"{what}.calibration.parameter must be {parameter!r}, got {calibration.parameter!r}")
    return calibration


@dataclass(frozen=True)
class FaissInfo:
    r"""
    The saved FAISS IVF index (see [`~diffusers_dmin.faiss_backend.FaissIVFSearch`]): a safetensors file of arrays
    written by us, rebuilt into a FAISS index after validation against these values.

    Args:
        name (`str`): Path relative to the index folder (`"faiss_ivf.safetensors"`).
        sha256 (`str`), num_bytes (`int`): Checksum and size, checked before the file is parsed.
        num_rows (`int`): Rows `0 .. num_rows - 1` of the index are in it; later rows are added on load.
        sketch_dim (`int`): Buckets per timestep of the coarse (folded) vectors.
        nlist (`int`): Inverted lists. codec (`str`): `"pq"`, `"sq8"` or `"sq4"`. pq_m (`int`): PQ bytes per row
            (0 for SQ).
        nprobe (`int`), num_candidates (`int`): Search settings (calibrated ones when `calibration` is set).
        calibration (`RecallCalibration`, *optional*): How `nprobe` / `num_candidates` were calibrated.
    """

    name: str
    sha256: str
    num_bytes: int
    num_rows: int
    sketch_dim: int
    nlist: int
    codec: str
    pq_m: int
    nprobe: int
    num_candidates: int
    calibration: RecallCalibration | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["calibration"] = None if self.calibration is None else self.calibration.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FaissInfo:
        codec = data["codec"]
        if codec not in FAISS_CODECS:
            raise ValueError(f"faiss.codec must be one of {FAISS_CODECS}, got {codec!r}")
        info = cls(
            name=_check_relative_name(data["name"], "faiss.name"),
            sha256=_check_sha(data["sha256"], "faiss.sha256"),
            num_bytes=_check_int(data["num_bytes"], "faiss.num_bytes", minimum=8),
            num_rows=_check_int(data["num_rows"], "faiss.num_rows", minimum=1),
            sketch_dim=_check_int(data["sketch_dim"], "faiss.sketch_dim", minimum=1),
            nlist=_check_int(data["nlist"], "faiss.nlist", minimum=1),
            codec=codec,
            pq_m=_check_int(data["pq_m"], "faiss.pq_m", minimum=0),
            nprobe=_check_int(data["nprobe"], "faiss.nprobe", minimum=1),
            num_candidates=_check_int(data["num_candidates"], "faiss.num_candidates", minimum=1),
            calibration=_calibration(data, "faiss", "nprobe"),
        )
        if info.nlist > MAX_FAISS_NLIST or info.nlist > info.num_rows:
            raise ValueError(f"faiss.nlist={info.nlist} exceeds {MAX_FAISS_NLIST} or faiss.num_rows={info.num_rows}")
        if (info.codec == "pq") != (info.pq_m > 0):
            raise ValueError(f"faiss.pq_m={info.pq_m} does not fit faiss.codec={info.codec!r} (0 exactly for SQ)")
        return info


@dataclass
class IndexMetadata:
    r"""
    Where the rows of an index come from; stored in the manifest and shown on the dataset card. All optional.

    Args:
        base_model_id (`str`, *optional*): Hub id or path of the base pipeline/model.
        base_model_revision (`str`, *optional*): Its revision (commit hash when known).
        adapter_id (`str`, *optional*): Hub id or path of the (LoRA) adapter whose parameters were sketched.
        adapter_revision (`str`, *optional*): Its revision.
        dataset_id (`str`, *optional*): Hub id or path of the training dataset.
        dataset_revision (`str`, *optional*): Its revision.
        dataset_split (`str`, *optional*): The split, e.g. `"train"`.
        dataset_fingerprint (`str`, *optional*): `datasets.Dataset._fingerprint` of the rows that were indexed.
        id_column (`str`, *optional*): The dataset column holding the sample ids; row positions when unset.
        extra (`dict`, *optional*): Any other JSON-serialisable information.
    """

    base_model_id: str | None = None
    base_model_revision: str | None = None
    adapter_id: str | None = None
    adapter_revision: str | None = None
    dataset_id: str | None = None
    dataset_revision: str | None = None
    dataset_split: str | None = None
    dataset_fingerprint: str | None = None
    id_column: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _GROUPS = {
        "base_model": {"id": "base_model_id", "revision": "base_model_revision"},
        "adapter": {"id": "adapter_id", "revision": "adapter_revision"},
        "dataset": {
            "id": "dataset_id",
            "revision": "dataset_revision",
            "split": "dataset_split",
            "fingerprint": "dataset_fingerprint",
            "id_column": "id_column",
        },
    }

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "extra":
                if not isinstance(value, Mapping):
                    raise ConfigError(f"`extra` metadata must be a dict, but is {value!r}.")
                try:
                    json.dumps(value)
                except (TypeError, ValueError) as err:
                    raise ConfigError(f"`extra` metadata must be JSON-serialisable ({err}).") from err
                self.extra = dict(value)
            elif value is not None and not isinstance(value, str):
                raise ConfigError(
                    f"Index metadata `{f.name}` must be a string or None, but is {value!r} "
                    f"(type {type(value).__name__}). Example: `{f.name}='org/name'`."
                )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> IndexMetadata:
        """Build from keyword arguments, with a clear error for unknown names."""
        unknown = sorted(set(kwargs) - set(cls.field_names()))
        if unknown:
            raise ConfigError(
                f"Unknown index metadata {unknown}; valid names are {list(cls.field_names())}. "
                "Put anything else in `extra={...}`."
            )
        return cls(**kwargs)

    @classmethod
    def coerce(cls, metadata: IndexMetadata | Mapping[str, Any] | None) -> IndexMetadata:
        """`metadata` as an [`IndexMetadata`] (`None`: empty; a dict: [`from_kwargs`])."""
        if metadata is None:
            return cls()
        if isinstance(metadata, Mapping):
            return cls.from_kwargs(**metadata)
        if not isinstance(metadata, IndexMetadata):
            raise ConfigError(f"`metadata` must be an IndexMetadata or a dict, but is {type(metadata).__name__}.")
        return metadata

    def to_dict(self) -> dict[str, Any]:
        """Grouped JSON form: `{"base_model": {...}, "adapter": {...}, "dataset": {...}, "extra": {...}}`."""
        data: dict[str, Any] = {}
        for group, keys in self._GROUPS.items():
            values = {key: getattr(self, attr) for key, attr in keys.items()}
            data[group] = values if any(v is not None for v in values.values()) else None
        data["extra"] = dict(self.extra)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> IndexMetadata:
        data = data or {}
        kwargs: dict[str, Any] = {"extra": dict(data.get("extra") or {})}
        for group, keys in cls._GROUPS.items():
            values = data.get(group) or {}
            if not isinstance(values, Mapping):
                raise ValueError(f"`{group}` must be an object or null, got {values!r}")
            for key, attr in keys.items():
                kwargs[attr] = values.get(key)
        return cls(**kwargs)


# --------------------------------------------------------------------------------------------------- manifest


@dataclass
class Manifest:
    r"""
    Contents of `dmin_index.json`: what the rows are and where they live.

    The sketches of every shard have shape `(n, T, K)` with `T = config.num_timesteps` and `K = config.sketch_dim`,
    stored in `config.dtype`. `spec` is the full [`SketchSpec`] of the rows (config plus model-dependent identity);
    it is `None` for an index built from a config only, whose queries can then be checked against the config alone.

    Args:
        config (`DMinConfig`): The configuration of the rows.
        spec (`SketchSpec`, *optional*): The full spec of the rows; `spec.config` must equal `config`.
        shards (`list[ShardInfo]`): Shards in row order.
        noise (`FileInfo`, *optional*): The fixed noise file.
        hnsw (`HNSWInfo`, *optional*): The saved HNSW graph.
        faiss (`FaissInfo`, *optional*): The saved FAISS IVF index.
        preconditioner (`FileInfo`, *optional*): The fitted query preconditioner
            ([`~precondition.QueryPreconditioner`], `preconditioner.safetensors`); written to JSON only when present,
            so manifests without it (all written before it existed) are unchanged.
        metadata (`IndexMetadata`): Provenance (base model, adapter, dataset, id column).
        format_version (`int`, *optional*, defaults to `FORMAT_VERSION`): Version of this format.
        library_version (`str`, *optional*): Version of diffusers_dmin that wrote the manifest.
    """

    config: DMinConfig
    spec: SketchSpec | None = None
    shards: list[ShardInfo] = field(default_factory=list)
    noise: FileInfo | None = None
    hnsw: HNSWInfo | None = None
    faiss: FaissInfo | None = None
    preconditioner: FileInfo | None = None
    metadata: IndexMetadata = field(default_factory=IndexMetadata)
    format_version: int = FORMAT_VERSION
    library_version: str | None = None

    @property
    def num_rows(self) -> int:
        return sum(shard.num_rows for shard in self.shards)

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    @property
    def sketch_dim(self) -> int:
        return self.config.sketch_dim

    @property
    def dtype(self) -> str:
        return self.config.dtype

    def validate(self) -> None:
        """Check internal consistency; raises `ValueError` describing the first problem."""
        if self.spec is not None:
            if self.spec.config != self.config:
                raise ValueError("`spec.config` differs from `config`")
            if len(self.spec.timesteps) != self.config.num_timesteps:
                raise ValueError(
                    f"spec has {len(self.spec.timesteps)} timesteps but config.num_timesteps is "
                    f"{self.config.num_timesteps}"
                )
        names = [shard.name for shard in self.shards]
        if len(set(names)) != len(names):
            raise ValueError("a shard is listed twice")
        for name in names:
            if not (name.startswith(SHARDS_DIR + "/") and name.endswith(".safetensors")):
                raise ValueError(f"shard name {name!r} is not of the form '{SHARDS_DIR}/*.safetensors'")
        if self.hnsw is not None:
            if self.hnsw.num_rows > self.num_rows:
                raise ValueError(f"the HNSW graph holds {self.hnsw.num_rows} rows but the index only {self.num_rows}")
            if self.sketch_dim % self.hnsw.sketch_dim:
                raise ValueError(
                    f"hnsw.sketch_dim={self.hnsw.sketch_dim} does not divide sketch_dim={self.sketch_dim}"
                )
        if self.faiss is not None:
            if self.faiss.num_rows > self.num_rows:
                raise ValueError(
                    f"the FAISS index holds {self.faiss.num_rows} rows but the index only {self.num_rows}"
                )
            if self.sketch_dim % self.faiss.sketch_dim:
                raise ValueError(
                    f"faiss.sketch_dim={self.faiss.sketch_dim} does not divide sketch_dim={self.sketch_dim}"
                )
            coarse_dim = self.num_timesteps * self.faiss.sketch_dim
            if coarse_dim > MAX_FAISS_COARSE_DIM:
                raise ValueError(f"the FAISS coarse dimension {coarse_dim} exceeds {MAX_FAISS_COARSE_DIM}")
            if self.faiss.codec == "pq" and coarse_dim % self.faiss.pq_m:
                raise ValueError(f"faiss.pq_m={self.faiss.pq_m} does not divide the coarse dimension {coarse_dim}")
            if self.hnsw is not None and self.faiss.name == self.hnsw.name:
                raise ValueError("the FAISS index and the HNSW graph name the same file")

    def to_dict(self) -> dict[str, Any]:

        self.validate()
        return {
            "format_version": self.format_version,
            "library": "diffusers_dmin",
            "library_version": __version__,
            "num_rows": self.num_rows,
            "num_timesteps": self.num_timesteps,
            "sketch_dim": self.sketch_dim,
            "dtype": self.dtype,
            "config": self.config.to_dict(),
            "spec": None if self.spec is None else self.spec.to_dict(),
            **self.metadata.to_dict(),
            "shards": [shard.to_dict() for shard in self.shards],
            "noise": None if self.noise is None else self.noise.to_dict(),
            "hnsw": None if self.hnsw is None else self.hnsw.to_dict(),
            "faiss": None if self.faiss is None else self.faiss.to_dict(),
            **({} if self.preconditioner is None else {"preconditioner": self.preconditioner.to_dict()}),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Manifest:
        """Parse and validate; raises `ValueError`, `KeyError` or `TypeError` on malformed input."""
        if not isinstance(data, Mapping):
            raise TypeError(f"the manifest must be a JSON object, got {type(data).__name__}")
        version = _check_int(data["format_version"], "format_version", minimum=1)
        if version > FORMAT_VERSION:
            raise _NewerFormat(version)
        config = DMinConfig.from_dict(_check_mapping(data["config"], "config"))
        spec = None if data.get("spec") is None else SketchSpec.from_dict(_check_mapping(data["spec"], "spec"))
        if not isinstance(data["shards"], list):
            raise TypeError(f"`shards` must be a list, got {type(data['shards']).__name__}")
        manifest = cls(
            config=config,
            spec=spec,
            shards=[ShardInfo.from_dict(_check_mapping(s, "shards[]")) for s in data["shards"]],
            noise=None if data.get("noise") is None else FileInfo.from_dict(_check_mapping(data["noise"], "noise")),
            hnsw=None if data.get("hnsw") is None else HNSWInfo.from_dict(_check_mapping(data["hnsw"], "hnsw")),
            faiss=None if data.get("faiss") is None else FaissInfo.from_dict(_check_mapping(data["faiss"], "faiss")),
            preconditioner=None
            if data.get("preconditioner") is None
            else FileInfo.from_dict(_check_mapping(data["preconditioner"], "preconditioner")),
            metadata=IndexMetadata.from_dict(data),
            format_version=version,
            library_version=data.get("library_version"),
        )
        for key, value in (
            ("num_rows", manifest.num_rows),
            ("num_timesteps", manifest.num_timesteps),
            ("sketch_dim", manifest.sketch_dim),
            ("dtype", manifest.dtype),
        ):
            if key in data and data[key] != value:
                raise ValueError(f"`{key}` is {data[key]!r} but the config and shard list give {value!r}")
        manifest.validate()
        return manifest

    @classmethod
    def from_json(cls, text: str) -> Manifest:
        return cls.from_dict(json.loads(text))


class _NewerFormat(Exception):
    def __init__(self, version: int):
        super().__init__(version)
        self.version = version


def _check_mapping(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"`{name}` must be a JSON object, got {type(value).__name__}")
    return value


def _check_int(value: Any, name: str, minimum: int = 0) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return value


def _check_sha(value: Any, name: str) -> str:
    if not isinstance(value, str) or not _SHA256_RE.fullmatch(value):
        raise ValueError(f"`{name}` must be 64 lowercase hex characters, got {value!r}")
    return value


def _check_relative_name(value: Any, name: str) -> str:
    """A POSIX path inside the folder: no absolute paths, no `..`, no backslashes."""
    if (
        not isinstance(value, str)
        or not value
        or value.startswith("/")
        or "\\" in value
        or any(part in ("", ".", "..") for part in value.split("/"))
    ):
        raise ValueError(f"`{name}` must be a relative path inside the index folder, got {value!r}")
    return value


def read_manifest(folder: str | os.PathLike) -> Manifest:
    r"""
    Read and validate `dmin_index.json` of an index folder.

    Args:
        folder (`str` or `os.PathLike`): The index folder.

    Returns:
        [`Manifest`]

    Raises:
        [`IndexNotFoundError`]: The folder or its manifest does not exist.
        [`IndexCorruptError`]: The manifest is not valid JSON, misses keys, or is inconsistent.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise IndexNotFoundError(f"No index folder at {str(folder)!r}: it does not exist or is not a directory.")
    if not path.is_file():
        raise IndexNotFoundError(
            f"{str(folder)!r} is not a DMin index: it has no {MANIFEST_NAME}. Create an index with "
            "`GradientIndex.from_sketches(...)` and `save_pretrained(folder)`."
        )
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise IndexCorruptError(
            f"{path} has {size} bytes, more than the {MAX_MANIFEST_BYTES} a DMin manifest may have; it is not one. "
            "Re-download the index with `force_download=True`, or save it again."
        )
    try:
        text = path.read_text(encoding="utf-8")
        return Manifest.from_json(text)
    except _NewerFormat as err:
        raise IndexCorruptError(
            f"{path} has format_version {err.version}, but this diffusers_dmin reads versions up to {FORMAT_VERSION}. "
            "Upgrade with `pip install -U diffusers-dmin`."
        ) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise IndexCorruptError(
            f"{path} is not valid JSON ({err}); the file is truncated or damaged. Re-download the index with "
            "`force_download=True`, or save it again."
        ) from err
    except RecursionError as err:
        raise IndexCorruptError(
            f"{path} nests JSON too deeply to be a DMin manifest. Re-download the index with `force_download=True`, "
            "or save it again."
        ) from err
    except (KeyError, TypeError, ValueError, AttributeError, ConfigError) as err:
        detail = f"missing key {err}" if isinstance(err, KeyError) else str(err)
        raise IndexCorruptError(
            f"{path} is not a valid DMin manifest ({detail}). Re-download the index with `force_download=True`, "
            "or save it again."
        ) from err


def write_manifest(folder: str | os.PathLike, manifest: Manifest, *, staged: str | os.PathLike | None = None) -> Path:
    r"""
    Validate `manifest` and write it atomically as `folder/dmin_index.json`. Call it after every file it lists.

    With `staged` (a temp file from [`stage_manifest`] for this same manifest), only renames it into place: nothing
    is written, so a full disk cannot fail the commit.

    Returns:
        `Path`: The manifest path.
    """
    path = Path(folder) / MANIFEST_NAME
    if staged is not None:
        _commit_temp(Path(staged), path)
        return path
    atomic_write_bytes(path, _manifest_bytes(manifest))
    return path


def stage_manifest(folder: str | os.PathLike, manifest: Manifest) -> Path:
    """Validate `manifest` and write it to a checked temp file; `write_manifest(..., staged=tmp)` renames it."""
    return stage_bytes(Path(folder) / MANIFEST_NAME, _manifest_bytes(manifest))


def _manifest_bytes(manifest: Manifest) -> bytes:
    try:
        return manifest.to_json().encode("utf-8")
    except ValueError as err:
        raise ConfigError(f"Refusing to write an inconsistent manifest: {err}.") from err


# --------------------------------------------------------------------------------------------------- atomic writes


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported on this platform
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


_TEMP_RE = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")  # `.{name}.{mkstemp's 8 characters}.tmp`


def _umask() -> int:
    """The process umask, read without changing it where the platform allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_path(path: Path) -> Path:
    """An empty temp file next to `path`, with the permissions a plain `open(path, "w")` would give (not 0600)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    except (AttributeError, OSError):  # no fchmod (Windows)
        pass
    finally:
        os.close(fd)
    return Path(tmp)


def remove_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temp files that interrupted writes left in `folder` and `folder/shards`; return them."""
    removed = []
    for directory in (Path(folder), Path(folder) / SHARDS_DIR):
        if not directory.is_dir():
            continue
        for item in directory.iterdir():
            if _TEMP_RE.match(item.name) and item.is_file() and not item.is_symlink():
                item.unlink(missing_ok=True)
                removed.append(item)
    return removed


def _save_tensors(tensors: dict[str, torch.Tensor], tmp: Path, final: Path) -> None:
    """`safetensors.torch.save_file`, with its write errors (a full disk) as `OSError`s that name the file."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        # one metadata key: safetensors writes several in a per-process hash order, and shard files must be
        # byte-reproducible (the manifest carries the format version)
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    except SafetensorError as err:
        raise OSError(f"Writing {final} failed ({err}). Is the disk full? Nothing was replaced.") from err


def _check_written_tensors(
    tmp: Path, expected: Mapping[str, tuple[str, Sequence[int]]], what: str, final: Path
) -> None:
    """A freshly written safetensors file must hold exactly `expected` and end where its header says (full disk)."""
    try:
        header, data_start, size = _parse_header(tmp, what)
        end = data_start
        for key, (dtype, shape) in expected.items():
            got_dtype, _, got_shape, offset = _tensor_entry(header, key, tmp, data_start, size, what)
            if got_dtype != dtype or got_shape != tuple(shape):
                raise IndexCorruptError(f"{key!r} is {got_dtype} {got_shape}, not {dtype} {tuple(shape)}")
            end = max(end, offset + int(np.prod(got_shape, dtype=np.int64)) * _SAFETENSORS_ITEMSIZE[dtype])
        if size != end:
            raise IndexCorruptError(f"{size} bytes instead of {end}")
    except IndexCorruptError as err:
        raise OSError(
            f"Writing {final} failed: the written file is incomplete or wrong ({err}). Is the disk full? Nothing was "
            "replaced; free space and save again."
        ) from err


def stage_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to a temp file next to `path` and check it (size and content); the caller renames it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        tmp.write_bytes(data)
        if tmp.stat().st_size != len(data) or tmp.read_bytes() != data:
            raise OSError(f"Writing {path} failed: the written file differs from the data. Is the disk full?")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def commit_temp(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """fsync a checked temp file and rename it over `path` (then fsync the folder)."""
    _commit_temp(Path(tmp), Path(path))


def _commit_temp(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
        try:  # writers may have replaced the temp file (safetensors does): set the mode here, not only at creation
            os.fchmod(f.fileno(), 0o666 & ~_umask())
        except (AttributeError, OSError):
            pass
    os.replace(tmp, path)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temp file next to `path`, fsync it and rename it over `path`."""
    path = Path(path)
    tmp = stage_bytes(path, data)
    try:
        _commit_temp(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy `src` to `dst` through a temp file and an atomic rename (follows symlinks, e.g. in the Hub cache)."""

    dst = Path(dst)
    tmp = stage_copy(src, dst)
    try:
        _commit_temp(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def stage_copy(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Copy `src` to a temp file next to `dst` and check it (size and sha256); the caller renames it."""
    import shutil

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(dst)
    try:
        shutil.copyfile(src, tmp)
        if tmp.stat().st_size != os.stat(src).st_size or sha256_file(tmp) != sha256_file(src):
            raise OSError(f"Copying {src} to {dst} failed: the copy differs from the source. Is the disk full?")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


# --------------------------------------------------------------------------------------------------- hashing


_hash_cache: dict[tuple[str, int, int, int], str] = {}
_hash_lock = threading.Lock()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, cached per process by (real path, size, mtime_ns, inode)."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns, stat.st_ino)
    with _hash_lock:
        cached = _hash_cache.get(key)
    if cached is not None:
        return cached
    digest = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    value = digest.hexdigest()
    with _hash_lock:
        _hash_cache[key] = value
    return value


def _remember_hash(path: str | os.PathLike, value: str) -> None:
    """Record the sha256 of a file just renamed into place from a hashed temp file (same inode, size, mtime)."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    with _hash_lock:
        _hash_cache[(real, stat.st_size, stat.st_mtime_ns, stat.st_ino)] = value


def verify_file(folder: str | os.PathLike, name: str, sha256: str, num_bytes: int | None, what: str) -> Path:
    r"""
    Check that `folder/name` exists and has the expected size and sha256.

    Returns:
        `Path`: The verified path.

    Raises:
        [`IndexCorruptError`]: The file is missing, or its size or checksum differs, with the fix in the message.
    """
    path = Path(folder) / name
    fix = (
        "Re-download the index with `force_download=True` (Hub) or restore the file; if the index was built "
        "locally, rebuild it."
    )
    if not path.is_file():
        raise IndexCorruptError(f"The {what} {name} listed in {MANIFEST_NAME} is missing from {folder}. {fix}")
    size = path.stat().st_size
    if num_bytes is not None and size != num_bytes:
        raise IndexCorruptError(
            f"The {what} {path} has {size} bytes, but {MANIFEST_NAME} expects {num_bytes}: the file is truncated "
            f"or was replaced. {fix}"
        )
    actual = sha256_file(path)
    if actual != sha256:
        raise IndexCorruptError(
            f"The {what} {path} failed its checksum: expected sha256 {sha256}, got {actual}. The file is "
            f"damaged or does not belong to this index. {fix}"
        )
    return path


# --------------------------------------------------------------------------------------------------- arrays


def rows_config(config: DMinConfig | None, spec: SketchSpec | None) -> DMinConfig:
    """The [`DMinConfig`] of an index's rows given `config=` and/or `spec=` (as `GradientIndex(...)` takes them):
    `spec.config` when a spec is given (`config`, if also given, must equal it). Raises [`ConfigError`]."""
    if spec is not None:
        if not isinstance(spec, SketchSpec):
            raise ConfigError(f"`spec` must be a SketchSpec (e.g. `sketcher.spec`), but is {type(spec).__name__}.")
        if config is not None and config != spec.config:
            differences = spec.config.differences(config, ignore=())
            raise ConfigError(
                f"`config` differs from `spec.config` in {sorted(differences)}; pass only `spec=`, which carries "
                "its config."
            )
        if len(spec.timesteps) != spec.config.num_timesteps:
            raise ConfigError(
                f"`spec` lists {len(spec.timesteps)} timesteps but its config has num_timesteps="
                f"{spec.config.num_timesteps}."
            )
        config = spec.config
    if config is None:
        raise ConfigError(
            "A GradientIndex needs `spec=` (e.g. `sketcher.spec`) or `config=` (a DMinConfig) describing its rows."
        )
    if not isinstance(config, DMinConfig):
        raise ConfigError(f"`config` must be a DMinConfig, but is {type(config).__name__}.")
    return config


def to_storage_array(sketches: Any, dtype: str, *, name: str = "sketches") -> np.ndarray:
    r"""
    Convert `(n, T, K)` float sketches (tensor or array) to a C-contiguous numpy array in the storage dtype.

    float16 and float32 give arrays of that dtype; bfloat16 gives `uint16` holding the raw bfloat16 bits.

    Raises:
        [`ConfigError`]: Not a 3-d float tensor/array, or `dtype` unknown.
        [`NonFiniteGradientError`]: A value is NaN or infinite (also after the cast, e.g. float16 overflow).
    """
    if dtype not in TORCH_DTYPES:
        raise ConfigError(f"`dtype` must be one of {DTYPES}, but is {dtype!r}.")
    tensor = _as_float_tensor(sketches, name)
    if tensor.ndim != 3:
        raise ConfigError(
            f"`{name}` must have shape (num_samples, num_timesteps, sketch_dim), but has shape {tuple(tensor.shape)}."
        )
    # always a copy: the index must not change when the caller later modifies its tensor
    stored = tensor.detach().to("cpu", TORCH_DTYPES[dtype], copy=True).contiguous()
    finite = torch.isfinite(stored.reshape(len(stored), -1)).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        hint = " (values beyond the float16 range?)" if dtype == "float16" else ""
        raise NonFiniteGradientError(
            f"`{name}` holds NaN or infinite values{hint} in rows {bad[:10]}{'...' if len(bad) > 10 else ''}; "
            "recompute those samples, or store with `dtype='float32'`.",
            positions=bad,
        )
    if dtype == "bfloat16":
        return stored.view(torch.int16).numpy().view(np.uint16)
    return stored.numpy()


def _as_float_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value
    elif isinstance(value, np.ndarray):
        tensor = torch.from_numpy(value if value.flags.writeable else np.array(value))
    else:
        raise ConfigError(f"`{name}` must be a torch.Tensor or numpy array, but is {type(value).__name__}.")
    if not tensor.is_floating_point():
        raise ConfigError(f"`{name}` must hold floating-point values, but has dtype {tensor.dtype}.")
    return tensor


def to_ids_array(ids: Any, num_rows: int, *, name: str = "ids") -> np.ndarray:
    """Convert sample ids to a 1-d int64 array of length `num_rows`; raises [`ConfigError`] for bad input."""
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    array = np.asarray(ids)
    if array.ndim != 1 or len(array) != num_rows:
        raise ConfigError(f"`{name}` must be a 1-d sequence of {num_rows} integers, but has shape {array.shape}.")
    if num_rows and (array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer)):
        raise ConfigError(f"`{name}` must hold integers (they are stored as int64), but has dtype {array.dtype}.")
    if array.dtype == np.uint64 and num_rows and array.max() > np.iinfo(np.int64).max:
        raise ConfigError(f"`{name}` holds values beyond the int64 range.")
    array = np.ascontiguousarray(array, dtype=np.int64)
    if len(np.unique(array)) != len(array):
        values, counts = np.unique(array, return_counts=True)
        raise ConfigError(
            f"`{name}` holds duplicates: {values[counts > 1][:10].tolist()}. Every sample needs its own id."
        )
    return array


def _storage_tensor(array: np.ndarray, dtype: str) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


# --------------------------------------------------------------------------------------------------- shards


def shard_name(number: int | None = None, *, first_id: int | None = None, duplicate: int = 0) -> str:
    r"""
    The name of a shard file, relative to the index folder: the one naming scheme, in two forms because the two
    writers need different things. Readers accept any `shards/*.safetensors` name a manifest lists, so indices written
    by other (older) writers load too.

    - `shard_name(number)`, `shards/sketches-{number:05d}.safetensors`: what saves write ([`write_shards`]). A save
      writes all its new shards at once, numbered after the highest number in the folder, so a new name never
      replaces a file that is there ([`saved_shard_number`] reads the number back).
    - `shard_name(first_id=i)`, `shards/sketches-from-{i:012d}.safetensors`: what builds write. A build's shard is one
      unit of work, named after the sample id of its first row: every process of a multi-process build and every
      resume computes the same name for the same unit without coordination (a running number would depend on which
      units were written before, by whom). `duplicate=n` appends `-n` when a foreign file already has the name.

    Examples:
    ```py
    >>> shard_name(3)
    'shards/sketches-00003.safetensors'
    >>> shard_name(first_id=12), shard_name(first_id=12, duplicate=1)
    ('shards/sketches-from-000000000012.safetensors', 'shards/sketches-from-000000000012-1.safetensors')
    ```
    """
    if (number is None) == (first_id is None):
        raise ValueError("Pass exactly one of `number` (a save's shard) and `first_id` (a build's shard).")
    if first_id is None:
        return SHARD_NAME_TEMPLATE.format(int(number))
    stem = BUILD_SHARD_STEM_TEMPLATE.format(int(first_id))
    return stem + (DUPLICATE_SUFFIX_TEMPLATE.format(duplicate) if duplicate else "") + SHARD_SUFFIX


def saved_shard_number(name: str) -> int | None:
    """The number of a shard named by `shard_name(number)` (with or without its folder), else None."""
    match = _SAVED_SHARD.fullmatch(name.rsplit("/", 1)[-1])
    return None if match is None else int(match.group(1))


def write_shard(folder: str | os.PathLike, name: str, sketches: Any, ids: Any, dtype: str = "float16") -> ShardInfo:
    r"""
    Write one shard file atomically and return its record for the manifest.

    Args:
        folder (`str` or `os.PathLike`): The index folder.
        name (`str`): Path relative to `folder`, e.g. `shard_name(0)`; any `shards/*.safetensors` name is allowed.
        sketches (`torch.Tensor` or `np.ndarray` of shape `(n, T, K)`): Float sketches; cast to `dtype`. A uint16
            array is taken as raw bfloat16 bits when `dtype="bfloat16"`.
        ids (array-like of shape `(n,)`): Unique integer sample ids.
        dtype (`str`, *optional*, defaults to `"float16"`): Storage dtype: `"float16"`, `"bfloat16"`, `"float32"`.

    Returns:
        [`ShardInfo`]

    Examples:
    ```py
    >>> import torch
    >>> from diffusers_dmin.storage import shard_name, write_shard
    >>> info = write_shard("my_index", shard_name(0), torch.randn(4, 2, 8), [0, 1, 2, 3])
    >>> info.num_rows
    4
    ```
    """

    _check_relative_name(name, "name")
    if isinstance(sketches, np.ndarray) and dtype == "bfloat16" and sketches.dtype == np.uint16:
        array = np.ascontiguousarray(sketches)
    else:
        array = to_storage_array(sketches, dtype)
    if array.ndim != 3 or len(array) == 0:
        raise ConfigError(f"A shard needs `sketches` of shape (n, T, K) with n >= 1, but got shape {array.shape}.")
    ids_array = to_ids_array(ids, len(array))
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        _save_tensors({SKETCHES_KEY: _storage_tensor(array, dtype), IDS_KEY: torch.from_numpy(ids_array)}, tmp, path)
        _check_written_tensors(
            tmp, {SKETCHES_KEY: (dtype, array.shape), IDS_KEY: ("int64", ids_array.shape)}, "shard", path
        )
        info = ShardInfo(name=name, num_rows=len(array), sha256=sha256_file(tmp), num_bytes=tmp.stat().st_size)
        _commit_temp(tmp, path)
        _remember_hash(path, info.sha256)
    finally:
        tmp.unlink(missing_ok=True)
    logger.debug(f"Wrote {info.num_rows} rows to {path} (sha256 {info.sha256[:12]}...).")
    return info


def write_shards(
    folder: str | os.PathLike,
    sketches: Any,
    ids: Any,
    dtype: str = "float16",
    *,
    start_index: int = 0,
    max_shard_rows: int | None = None,
) -> list[ShardInfo]:
    r"""
    Write rows as consecutive shards `shard_name(start_index)`, `shard_name(start_index + 1)`, ... of at most
    `max_shard_rows` rows each (by default as many rows as fit in 1 GiB).

    Returns:
        `list[ShardInfo]`: In row order.
    """
    if isinstance(sketches, np.ndarray) and dtype == "bfloat16" and sketches.dtype == np.uint16:
        array = np.ascontiguousarray(sketches)
    else:
        array = to_storage_array(sketches, dtype)
    ids_array = to_ids_array(ids, len(array))
    check_int(max_shard_rows, "max_shard_rows", optional=True)
    rows = default_shard_rows(array.shape[1:], dtype) if max_shard_rows is None else int(max_shard_rows)
    infos = []
    for number, start in enumerate(range(0, len(array), rows)):
        infos.append(
            write_shard(
                folder,
                shard_name(start_index + number),
                array[start : start + rows],
                ids_array[start : start + rows],
                dtype,
            )
        )
    return infos


def default_shard_rows(row_shape: Sequence[int], dtype: str, *, batch_size: int | None = None) -> int:
    r"""
    The one shard-size policy: how many rows a shard holds when the caller does not say (`max_shard_rows`).

    - A save or push (`batch_size=None`): as many rows as fit in 1 GiB of stored sketches (`DEFAULT_MAX_SHARD_BYTES`):
      few, large files, so a Hub commit holds few files and exact search reads long runs of rows.
    - A build (`batch_size` given): a shard is also the build's unit of work, the rows one process computes and writes
      as one file, and so what a resume restarts from: a crash loses at most the unit in flight (beyond its flushed
      partial rows), and a multi-process build balances whole units. So builds cap a shard at 256 MiB
      (`BUILD_MAX_SHARD_BYTES`) and 1,024 rows (`BUILD_MAX_SHARD_ROWS`), rounded down to a multiple of the batch size
      (at least one batch), so that every unit is whole batches and a resumed unit computes the same batches an
      uninterrupted build does.

    Args:
        row_shape (`Sequence[int]`): The shape of one row, `(T, K)`.
        dtype (`str`): The storage dtype.
        batch_size (`int`, *optional*): A build's batch size; `None` for a save.
    """
    row_bytes = int(np.prod(row_shape)) * _SAFETENSORS_ITEMSIZE[dtype]
    if batch_size is None:
        return max(1, DEFAULT_MAX_SHARD_BYTES // max(1, row_bytes))
    rows = min(BUILD_MAX_SHARD_ROWS, max(1, BUILD_MAX_SHARD_BYTES // max(1, row_bytes)))
    return max(batch_size, rows // batch_size * batch_size)


def _parse_header(path: Path, what: str) -> tuple[dict[str, Any], int, int]:
    """Return the safetensors header, the offset of the data region and the file size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise IndexCorruptError(f"The {what} {path} is too short to be a safetensors file ({size} bytes).")
        (length,) = struct.unpack("<Q", prefix)
        if length == 0 or length > min(_MAX_HEADER_BYTES, size - 8):
            raise IndexCorruptError(f"The {what} {path} has an invalid safetensors header length {length}.")
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise IndexCorruptError(f"The {what} {path} has an unreadable safetensors header ({err}).") from err
    if not isinstance(header, dict):
        raise IndexCorruptError(f"The {what} {path} has a safetensors header that is not a JSON object.")
    return header, 8 + length, size


def _tensor_entry(
    header: dict[str, Any], key: str, path: Path, data_start: int, size: int, what: str
) -> tuple[str, np.dtype, tuple[int, ...], int]:
    entry = header.get(key)
    if not isinstance(entry, dict):
        raise IndexCorruptError(f"The {what} {path} has no tensor {key!r}; it holds {sorted(header)}.")
    tag, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if tag not in _SAFETENSORS_DTYPES:
        raise IndexCorruptError(f"Tensor {key!r} of {path} has unsupported dtype {tag!r}.")
    if not (
        isinstance(shape, list)
        and all(isinstance(s, int) and s >= 0 for s in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
    ):
        raise IndexCorruptError(f"Tensor {key!r} of {path} has a malformed header entry {entry!r}.")
    name, np_dtype = _SAFETENSORS_DTYPES[tag]
    begin, end = offsets
    expected = int(np.prod(shape, dtype=np.int64)) * np_dtype.itemsize
    if end - begin != expected or begin < 0 or data_start + end > size:
        raise IndexCorruptError(
            f"Tensor {key!r} of {path} claims bytes [{begin}, {end}) for shape {shape} ({expected} bytes) in a data "
            f"region of {size - data_start} bytes."
        )
    return name, np_dtype, tuple(shape), data_start + begin


@dataclass
class ShardData:
    r"""
    A verified shard.

    Args:
        info (`ShardInfo`): Its manifest record.
        sketches (`np.ndarray` of shape `(n, T, K)`): Memory-mapped (copy-on-write, never written) raw values:
            float16, float32, or uint16 bfloat16 bits.
        ids (`np.ndarray` of shape `(n,)`): int64 ids (in memory).
    """

    info: ShardInfo
    sketches: np.ndarray
    ids: np.ndarray


def open_shard(
    folder: str | os.PathLike, info: ShardInfo, *, num_timesteps: int, sketch_dim: int, dtype: str
) -> ShardData:
    r"""
    Verify a shard against its manifest record and the index shape, then memory-map it.

    The file's size and sha256 are checked before its header is parsed; then the header must hold "sketches" of
    shape `(info.num_rows, num_timesteps, sketch_dim)` in `dtype` and "ids" of shape `(info.num_rows,)` int64.

    Raises:
        [`IndexCorruptError`]: Any check fails.
    """
    path = verify_file(folder, info.name, info.sha256, info.num_bytes, "shard")
    header, data_start, size = _parse_header(path, "shard")
    expected_shape = (info.num_rows, num_timesteps, sketch_dim)
    s_dtype, s_np, s_shape, s_offset = _tensor_entry(header, SKETCHES_KEY, path, data_start, size, "shard")
    i_dtype, i_np, i_shape, i_offset = _tensor_entry(header, IDS_KEY, path, data_start, size, "shard")
    if s_shape != expected_shape or s_dtype != dtype:
        raise IndexCorruptError(
            f"The shard {path} holds sketches of shape {s_shape} ({s_dtype}), but {MANIFEST_NAME} expects "
            f"{expected_shape} ({dtype}). Re-download the index with `force_download=True`, or rebuild it."
        )
    if i_shape != (info.num_rows,) or i_dtype != "int64":
        raise IndexCorruptError(
            f"The shard {path} holds ids of shape {i_shape} ({i_dtype}), but {MANIFEST_NAME} expects "
            f"({info.num_rows},) int64."
        )
    sketches = np.memmap(path, dtype=s_np, mode="c", offset=s_offset, shape=s_shape)
    ids = np.array(np.memmap(path, dtype=i_np, mode="r", offset=i_offset, shape=i_shape))
    _check_finite_rows(path, info.sha256, sketches, dtype)
    return ShardData(info=info, sketches=sketches, ids=ids)


_finite_checked: set[tuple[str, str]] = set()


def _check_finite_rows(path: Path, sha256: str, sketches: np.ndarray, dtype: str) -> None:
    """NaN/inf rows would rank first (or last) for every query: refuse the shard (checked once per file content)."""
    key = (os.path.realpath(path), sha256)
    if key in _finite_checked:
        return
    rows_per_chunk = max(1, _HASH_CHUNK // max(1, sketches[0].nbytes if len(sketches) else 1))
    for start in range(0, len(sketches), rows_per_chunk):
        block = sketches[start : start + rows_per_chunk]
        chunk = block.reshape(len(block), -1)
        if dtype == "bfloat16":  # raw bits: exponent all ones is inf or NaN
            finite = ((chunk & 0x7F80) != 0x7F80).all(axis=1)
        else:
            finite = np.isfinite(chunk).all(axis=1)
        if not finite.all():
            bad = (start + np.flatnonzero(~finite)).tolist()
            raise IndexCorruptError(
                f"The shard {path} holds NaN or infinite values in rows {bad[:10]}{'...' if len(bad) > 10 else ''}: "
                "they would rank first for every query. Rebuild those rows (a NaN gradient), or re-download the "
                "index with `force_download=True`."
            )
    with _hash_lock:
        _finite_checked.add(key)


def describe_shard(folder: str | os.PathLike, name: str) -> ShardInfo:
    r"""
    The manifest record of a shard file that already exists (e.g. written before a build was interrupted).

    Reads the row count from the safetensors header and hashes the file; raises [`IndexCorruptError`] when the file
    is missing or is not a shard.
    """
    _check_relative_name(name, "name")
    path = Path(folder) / name
    if not path.is_file():
        raise IndexCorruptError(f"No shard file at {path}.")
    header, data_start, size = _parse_header(path, "shard")
    _, _, shape, _ = _tensor_entry(header, IDS_KEY, path, data_start, size, "shard")
    _tensor_entry(header, SKETCHES_KEY, path, data_start, size, "shard")
    if len(shape) != 1 or shape[0] < 1:
        raise IndexCorruptError(f"The shard {path} holds ids of shape {shape}; expected (n,) with n >= 1.")
    return ShardInfo(name=name, num_rows=shape[0], sha256=sha256_file(path), num_bytes=size)


def read_shard_ids(path: Path, *, num_timesteps: int, sketch_dim: int, dtype: str) -> np.ndarray:
    r"""
    The ids of a shard file that no manifest vouches for yet (a build's own, on resume): header and ids only, no
    hashing. The header must hold "sketches" `(n, num_timesteps, sketch_dim)` in `dtype` and "ids" `(n,)` int64.

    Raises:
        [`IndexCorruptError`]: The file is not such a shard (or is truncated).
    """
    header, data_start, size = _parse_header(path, "shard")
    s_dtype, _, s_shape, _ = _tensor_entry(header, SKETCHES_KEY, path, data_start, size, "shard")
    i_dtype, i_np, i_shape, i_offset = _tensor_entry(header, IDS_KEY, path, data_start, size, "shard")
    if len(s_shape) != 3 or s_shape[1:] != (num_timesteps, sketch_dim) or s_dtype != dtype:
        raise IndexCorruptError(
            f"The shard {path} holds sketches of shape {s_shape} ({s_dtype}), but this build writes (n, "
            f"{num_timesteps}, {sketch_dim}) ({dtype})."
        )
    if i_dtype != "int64" or i_shape != (s_shape[0],):
        raise IndexCorruptError(f"The shard {path} holds ids of shape {i_shape} ({i_dtype}).")
    with open(path, "rb") as f:
        f.seek(i_offset)
        return np.frombuffer(f.read(i_shape[0] * 8), dtype=i_np).copy()


def iter_shards(folder: str | os.PathLike, manifest: Manifest) -> Iterator[ShardData]:
    """Open (verify and memory-map) every shard of `manifest`, in row order."""
    for info in manifest.shards:
        yield open_shard(
            folder, info, num_timesteps=manifest.num_timesteps, sketch_dim=manifest.sketch_dim, dtype=manifest.dtype
        )


# --------------------------------------------------------------------------------------------------- noise


def write_noise(folder: str | os.PathLike, noise: Any, name: str = NOISE_NAME) -> FileInfo:
    """Write the fixed noise tensor (stored as float32) atomically to `folder/name` and return its record."""
    path = Path(folder) / name
    tmp = stage_noise(folder, noise, name)
    try:
        info = FileInfo(name=name, sha256=sha256_file(tmp), num_bytes=tmp.stat().st_size, shape=tuple(noise.shape))
        _commit_temp(tmp, path)
        _remember_hash(path, info.sha256)
    finally:
        tmp.unlink(missing_ok=True)
    return info


def stage_noise(folder: str | os.PathLike, noise: Any, name: str = NOISE_NAME) -> Path:
    """Write the noise to a checked temp file next to `folder/name` (renamed into place by the caller)."""
    tensor = _as_float_tensor(noise, "noise").detach().to("cpu", torch.float32).contiguous()
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        _save_tensors({NOISE_KEY: tensor}, tmp, path)
        _check_written_tensors(tmp, {NOISE_KEY: ("float32", tuple(tensor.shape))}, "noise file", path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def read_noise(folder: str | os.PathLike, info: FileInfo) -> torch.Tensor:
    """Verify and read the fixed noise; raises [`IndexCorruptError`] when a check fails."""
    path = verify_file(folder, info.name, info.sha256, info.num_bytes, "noise file")
    header, data_start, size = _parse_header(path, "noise file")
    dtype, np_dtype, shape, offset = _tensor_entry(header, NOISE_KEY, path, data_start, size, "noise file")
    if dtype != "float32" or (info.shape is not None and shape != tuple(info.shape)):
        raise IndexCorruptError(
            f"The noise file {path} holds {dtype} of shape {shape}, but {MANIFEST_NAME} expects float32 of shape "
            f"{info.shape}."
        )
    count = int(np.prod(shape, dtype=np.int64))
    with open(path, "rb") as f:
        f.seek(offset)
        values = np.frombuffer(f.read(count * 4), dtype=np.float32).reshape(shape)
    return torch.from_numpy(values.copy())
