"""The one writer of index folders: crash-safe replacement of an index in a folder, manifest last (DESIGN §4).

An index's files are described by [`StoredFile`] (a manifest entry plus the folder, and for a pulled index the Hub
location, holding it); [`Block`] is a run of rows with the shard that stores them, if any. [`write_index_folder`]
writes an index's state into a folder (for `save_pretrained`, and into a temp folder for `push_to_hub`) and returns
what now backs it. Builds write their shards and noise through [`storage`] directly (their own resumable protocol,
see [`build`]) and hand the manifest of their rows, not written yet, to the facade, which reads the folder by it
([`read_index_folder`]`(manifest=...)`) and saves through here: the manifest is written once, last.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import hub
from .calibration import RecallCalibration
from .config import DMinConfig, SketchSpec
from .constants import FAISS_NAME, HNSW_NAME, MANIFEST_NAME, NOISE_NAME, README_NAME, SHARD_GLOB, SHARDS_DIR
from .errors import ConfigError, DMinError, IndexCorruptError, IndexMismatchError, IndexNotFoundError
from .faiss_backend import FaissIVFSearch
from .hnsw_file import validate_hnsw_file
from .logging import get_logger
from .precondition import PRECONDITIONER_NAME, QueryPreconditioner
from .search import HNSWSearch
from .storage import (
    FaissInfo,
    FileInfo,
    HNSWInfo,
    IndexMetadata,
    Manifest,
    ShardInfo,
    atomic_copy,
    commit_temp,
    fsync_dir,
    iter_shards,
    read_manifest,
    remove_temp_files,
    saved_shard_number,
    sha256_file,
    shard_name,
    stage_bytes,
    stage_copy,
    stage_manifest,
    stage_noise,
    temp_path,
    to_ids_array,
    to_storage_array,
    verify_file,
    write_manifest,
    write_shards,
)


logger = get_logger(__name__)

__all__ = [
    "StoredFile",
    "Block",
    "LoadedFolder",
    "WrittenFolder",
    "new_block",
    "read_index_folder",
    "write_index_folder",
]


@dataclass(frozen=True)
class StoredFile:
    """A file of an index: its manifest entry, the folder holding it, and (for a pulled index) the Hub location it can
    be downloaded from when the folder lacks it (files a pull skipped, such as `hnsw.bin`)."""

    info: ShardInfo | FileInfo | HNSWInfo | FaissInfo
    folder: Path
    origin: hub.HubLocation | None = None

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def path(self) -> Path:
        return self.folder / self.info.name

    def local_path(self, *, download: bool) -> Path | None:
        """The file on this machine (downloading it from `origin` with `download`), or None if it is absent."""
        if self.path.is_file():
            return self.path
        if download and self.origin is not None:
            try:
                return Path(self.origin.download_file(self.info.name))
            except IndexNotFoundError as err:
                logger.warning(f"Could not download {self.info.name}: {err}")
        return None

    def verify(self, what: str, path: Path | None = None) -> Path:
        """Check size and sha256 against the manifest entry (of `path`, by default the file in `folder`)."""
        path = self.path if path is None else path
        return verify_file(path.parent, path.name, self.info.sha256, self.info.num_bytes, what)

    def is_in(self, folder: Path) -> bool:
        return same_path(self.folder, folder)


@dataclass
class Block:
    """Consecutive rows: raw storage-dtype sketches `(n, T, K)`, their ids, and the shard file holding them (if any)."""

    sketches: np.ndarray
    ids: np.ndarray
    file: StoredFile | None = None

    @property
    def shard(self) -> ShardInfo | None:
        return None if self.file is None else self.file.info

    @property
    def folder(self) -> Path | None:
        return None if self.file is None else self.file.folder


@dataclass
class WrittenFolder:
    """What [`write_index_folder`] wrote: the manifest, and the stored files that now back the index's state."""

    manifest: Manifest
    blocks: list[Block]
    noise: StoredFile | None
    graph: StoredFile | None
    faiss: StoredFile | None = None
    preconditioner: StoredFile | None = None


@dataclass
class LoadedFolder:
    """What [`read_index_folder`] read: the manifest, the verified shards as blocks with all their ids, and the
    stored noise, graph, FAISS and preconditioner files the manifest lists (verified or loaded on use)."""

    manifest: Manifest
    blocks: list[Block]
    ids: np.ndarray
    noise: StoredFile | None
    graph: StoredFile | None
    faiss: StoredFile | None
    preconditioner: StoredFile | None = None


def read_index_folder(
    folder: Path, *, origin: hub.HubLocation | None = None, manifest: Manifest | None = None
) -> LoadedFolder:
    """Read the index in `folder` (a local folder or a Hub snapshot pulled from `origin`): the manifest, every shard
    (size and sha256 verified before it is memory-mapped), and the noise file (verified). Duplicate ids across shards
    raise [`IndexCorruptError`]. `manifest` (a build's, not written yet) replaces the folder's; it is read back from
    its JSON, so the index gets exactly the values a read of the written file would give."""
    manifest = read_manifest(folder) if manifest is None else Manifest.from_json(manifest.to_json())
    blocks = [
        Block(shard.sketches, shard.ids, StoredFile(shard.info, folder, origin))
        for shard in iter_shards(folder, manifest)
    ]
    ids = np.concatenate([b.ids for b in blocks]) if blocks else np.empty(0, dtype=np.int64)
    if len(np.unique(ids)) != len(ids):
        raise IndexCorruptError(
            f"The shards of {folder} hold duplicate sample ids; the index is damaged. Rebuild it, or re-download "
            "it with `force_download=True`."
        )
    noise = None
    if manifest.noise is not None:
        noise = StoredFile(manifest.noise, folder, origin)
        noise.verify("noise file")
    graph = StoredFile(manifest.hnsw, folder, origin) if manifest.hnsw is not None else None
    faiss = StoredFile(manifest.faiss, folder, origin) if manifest.faiss is not None else None
    # read (and downloaded from the Hub) on first use
    pre = StoredFile(manifest.preconditioner, folder, origin) if manifest.preconditioner is not None else None
    return LoadedFolder(manifest, blocks, ids, noise, graph, faiss, pre)


def new_block(sketches: torch.Tensor | np.ndarray, ids: object, existing_ids: np.ndarray, config: DMinConfig) -> Block:
    """The rows of `GradientIndex.add`: `sketches` in the storage dtype with the index's T and K, and new unique ids
    (`ids`, or consecutive ones after the largest of `existing_ids`). Raises [`IndexMismatchError`] for another T or
    K and [`ConfigError`] for bad shapes or ids."""
    array = to_storage_array(sketches, config.dtype)
    n, t, k = array.shape
    if n == 0:
        raise ConfigError("`sketches` holds no rows; pass a tensor of shape (n, T, K) with n >= 1.")
    if t != config.num_timesteps or k != config.sketch_dim:
        differences = {}
        if t != config.num_timesteps:
            differences["num_timesteps"] = (config.num_timesteps, t)
        if k != config.sketch_dim:
            differences["config.sketch_dim"] = (config.sketch_dim, k)
        fix = "Compute the sketches with the index's config."
        if k != config.sketch_dim and k % config.sketch_dim == 0:
            fix += f" Larger sketches fold exactly: `fold_sketch(sketches, {config.sketch_dim})`."
        raise IndexMismatchError.from_differences(differences, what="new sketches", fix=fix)
    if ids is None:
        start = int(existing_ids.max()) + 1 if len(existing_ids) else 0
        ids_array = np.arange(start, start + n, dtype=np.int64)
    else:
        ids_array = to_ids_array(ids, n)
    clash = np.intersect1d(ids_array, existing_ids)
    if len(clash):
        raise ConfigError(
            f"The ids {clash[:10].tolist()}{'...' if len(clash) > 10 else ''} are already in the index; every "
            "sample needs its own id. Pass other `ids=`, or omit `ids` to continue after the largest id."
        )
    return Block(array, ids_array)


def same_path(a: Path | None, b: Path | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def write_index_folder(
    folder: Path,
    *,
    config: DMinConfig,
    spec: SketchSpec | None,
    metadata: IndexMetadata,
    blocks: list[Block],
    noise: torch.Tensor | None,
    noise_file: StoredFile | None,
    graph: HNSWSearch | None,
    graph_file: StoredFile | None,
    graph_dirty: bool,
    source_folder: Path | None,
    graph_calibration: RecallCalibration | None = None,
    faiss: FaissIVFSearch | None = None,
    faiss_file: StoredFile | None = None,
    faiss_dirty: bool = False,
    faiss_calibration: RecallCalibration | None = None,
    preconditioner: QueryPreconditioner | None = None,
    preconditioner_file: StoredFile | None = None,
    link: bool,
    repo_id: str | None = None,
    max_shard_rows: int | None = None,
) -> WrittenFolder:
    """Write an index to `folder`; `link` symlinks files (for a temp folder to upload) instead of copying them.

    Two phases. First every file is written under a name the folder's current manifest does not use (new shards
    get new numbers; noise, graph, card and manifest go to temp files), and each is checked after writing (size
    and contents or structure; hnswlib does not report write errors). A full disk or a crash in this phase
    leaves the folder's index as it was. Then only renames: when they replace a file the current manifest
    lists, that manifest is first replaced by one without the graph (when the noise is unchanged) or removed,
    so a crash there leaves a loadable index or no manifest, never a manifest listing replaced files. Temp files
    and unlisted `sketches-NNNNN` shards of interrupted saves are removed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    dtype = config.dtype
    num_timesteps = config.num_timesteps
    current = _current_manifest(folder)
    listed = {} if current is None else {info.name: info for info in current.shards}
    mine = {b.file.name for b in blocks if b.file is not None and b.file.is_in(folder)}
    # an unreadable manifest (damaged, or a newer format) may still list shards: then only temp files go
    unreadable = current is None and (folder / MANIFEST_NAME).exists()
    _remove_orphans(folder, set(listed) | mine, shards=not unreadable)
    used = [b.file.name for b in blocks if b.file is not None]
    on_disk = [p.name for p in (folder / SHARDS_DIR).glob(SHARD_GLOB)] if (folder / SHARDS_DIR).is_dir() else []
    numbers = [n for name in used + on_disk + list(listed) if (n := saved_shard_number(name)) is not None]
    next_number = max(numbers, default=-1) + 1  # new shards never overwrite a file that is already there
    staged: dict[str, Path] = {}  # final name -> checked temp file, renamed in the commit phase
    written: list[str] = []  # shards this call added: removed again when it fails before the commit
    committed = False
    try:
        shards: list[ShardInfo] = []
        new_blocks: list[Block] = []
        for block in blocks:
            if block.file is not None:
                info = block.file.info
                if not block.file.is_in(folder):
                    source = block.file.verify("shard")
                    other = listed.get(info.name)
                    if other is not None and other.sha256 != info.sha256:  # the current index's shard
                        info = dataclasses.replace(info, name=shard_name(next_number))
                        next_number += 1
                    if not (folder / info.name).exists():
                        written.append(info.name)
                    _place(source, folder / info.name, link)
                shards.append(info)
                new_blocks.append(block)
                continue
            infos = write_shards(
                folder, block.sketches, block.ids, dtype, start_index=next_number, max_shard_rows=max_shard_rows
            )
            next_number += len(infos)
            written += [info.name for info in infos]
            shards += infos
            start = 0
            for info in infos:
                end = start + info.num_rows
                new_blocks.append(Block(block.sketches[start:end], block.ids[start:end], StoredFile(info, folder)))
                start = end
        noise_info = _stage_noise(folder, noise, noise_file, link, staged)
        hnsw_info = _stage_graph(
            folder, graph, graph_file, graph_dirty, num_timesteps, link, staged, calibration=graph_calibration
        )
        faiss_info = _stage_faiss(folder, faiss, faiss_file, faiss_dirty, faiss_calibration, link, staged)
        pre_info = _stage_preconditioner(folder, preconditioner, preconditioner_file, link, staged)
        manifest = Manifest(
            config=config,
            spec=spec,
            shards=shards,
            noise=noise_info,
            hnsw=hnsw_info,
            faiss=faiss_info,
            preconditioner=pre_info,
            metadata=metadata,
        )
        card = folder / README_NAME
        source_card = None if source_folder is None else source_folder / README_NAME
        if hub.is_generated_card(card):
            if source_card is not None and not hub.is_generated_card(source_card) and not card.exists():
                _place(source_card, card, link)  # keep a card the user wrote
            else:
                text = hub.dataset_card(manifest, repo_id=repo_id).encode("utf-8")
                staged[README_NAME] = stage_bytes(card, text)
        else:
            logger.info(f"Keeping the existing {card} (it has no diffusers_dmin marker).")
        staged_manifest = stage_manifest(folder, manifest)
        staged[MANIFEST_NAME] = staged_manifest

        # commit: renames only (plus, at most, one small manifest without the graph)
        replaced = [name for name in staged if name not in (MANIFEST_NAME, README_NAME) and _lists(current, name)]
        committed = True  # from here on the folder's old manifest may be gone: keep what this call wrote
        if replaced:
            if manifest.noise is None or (manifest.noise.name not in staged):
                # loadable while the graph, the FAISS index and the preconditioner move (all optional)
                write_manifest(folder, dataclasses.replace(manifest, hnsw=None, faiss=None, preconditioner=None))
            else:
                (folder / MANIFEST_NAME).unlink(missing_ok=True)
                fsync_dir(folder)
        for name in [n for n in staged if n != MANIFEST_NAME]:
            commit_temp(staged.pop(name), folder / name)
        write_manifest(folder, manifest, staged=staged_manifest)
        staged.pop(MANIFEST_NAME)
    finally:
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
        if not committed:
            for name in written:
                (folder / name).unlink(missing_ok=True)
    if current is not None:  # files of the index this one replaced
        kept = {info.name for info in shards} | {f.name for f in _extra_files(manifest)}
        for name in [info.name for info in current.shards] + [f.name for f in _extra_files(current)]:
            if name not in kept and name not in mine:
                (folder / name).unlink(missing_ok=True)
    return WrittenFolder(
        manifest=manifest,
        blocks=new_blocks,
        noise=None if noise_info is None else StoredFile(noise_info, folder),
        graph=None if hnsw_info is None else StoredFile(hnsw_info, folder),
        faiss=None if faiss_info is None else StoredFile(faiss_info, folder),
        preconditioner=None if pre_info is None else StoredFile(pre_info, folder),
    )


def _extra_files(manifest: Manifest) -> list:
    """The files a manifest lists besides its shards."""
    return [f for f in (manifest.noise, manifest.hnsw, manifest.faiss, manifest.preconditioner) if f is not None]


def _stage_preconditioner(
    folder: Path,
    preconditioner: QueryPreconditioner | None,
    stored: StoredFile | None,
    link: bool,
    staged: dict[str, Path],
) -> FileInfo | None:
    """The fitted preconditioner's file: copied (linked) from the file it was loaded from, else written anew."""
    if stored is not None:
        info = stored.info
        if not stored.is_in(folder):
            source = stored.local_path(download=True)
            if source is None:
                raise IndexNotFoundError(f"The index's {info.name} could not be found or downloaded.")
            source = stored.verify("preconditioner file", source)
            if link:
                _place(source, folder / info.name, link)
            elif not _same_file(folder / info.name, info):
                staged[info.name] = stage_copy(source, folder / info.name)
        return info
    if preconditioner is None:
        return None
    tmp = temp_path(folder / PRECONDITIONER_NAME)
    preconditioner.save(tmp)
    QueryPreconditioner.load(tmp, num_timesteps=preconditioner.num_timesteps, sketch_dim=preconditioner.sketch_dim)
    staged[PRECONDITIONER_NAME] = tmp
    info = FileInfo(
        name=PRECONDITIONER_NAME,
        sha256=sha256_file(tmp),
        num_bytes=tmp.stat().st_size,
        shape=(preconditioner.num_timesteps, preconditioner.sketch_dim),
    )
    if _same_file(folder / PRECONDITIONER_NAME, info):
        staged.pop(PRECONDITIONER_NAME).unlink(missing_ok=True)
    return info


def _stage_noise(
    folder: Path, noise: torch.Tensor | None, stored: StoredFile | None, link: bool, staged: dict[str, Path]
) -> FileInfo | None:
    if stored is not None:
        info = stored.info
        if not stored.is_in(folder):
            source = stored.verify("noise file")
            if link:
                _place(source, folder / info.name, link)
            elif not _same_file(folder / info.name, info):
                staged[info.name] = stage_copy(source, folder / info.name)
        return info
    if noise is None:
        return None
    tmp = stage_noise(folder, noise)
    staged[NOISE_NAME] = tmp
    info = FileInfo(name=NOISE_NAME, sha256=sha256_file(tmp), num_bytes=tmp.stat().st_size, shape=tuple(noise.shape))
    if _same_file(folder / NOISE_NAME, info):
        staged.pop(NOISE_NAME).unlink(missing_ok=True)
    return info


def _stage_graph(
    folder: Path,
    graph: HNSWSearch | None,
    stored: StoredFile | None,
    dirty: bool,
    num_timesteps: int,
    link: bool,
    staged: dict[str, Path],
    *,
    calibration: RecallCalibration | None = None,
) -> HNSWInfo | None:
    if graph is not None and (dirty or stored is None):
        tmp = temp_path(folder / HNSW_NAME)
        staged[HNSW_NAME] = tmp
        graph.save(tmp, atomic=False)
        try:  # hnswlib reports no write error: a full disk gives a truncated file
            validate_hnsw_file(
                tmp, dim=graph.dim, num_rows=graph.num_rows, M=graph.M, ef_construction=graph.ef_construction
            )
        except IndexCorruptError as err:
            raise OSError(
                f"Writing {folder / HNSW_NAME} failed: the written graph is incomplete ({err}). Is the disk full? "
                "Nothing was replaced; free space and save again."
            ) from err
        return HNSWInfo(
            name=HNSW_NAME,
            sha256=sha256_file(tmp),
            num_bytes=tmp.stat().st_size,
            num_rows=graph.num_rows,
            sketch_dim=graph.dim // num_timesteps,
            M=graph.M,
            ef_construction=graph.ef_construction,
            ef=graph.ef,
            calibration=calibration,
        )
    if stored is None:
        return None
    info = stored.info
    if stored.is_in(folder):
        return info
    source = stored.local_path(download=True)
    if source is None:
        logger.warning(
            f"The HNSW graph of this index is not available locally; {folder} gets no {HNSW_NAME} (it will be "
            "rebuilt on the first approximate search)."
        )
        return None
    stored.verify("HNSW graph", source)
    if link:
        _place(source, folder / HNSW_NAME, link)
    elif not _same_file(folder / HNSW_NAME, info):
        staged[HNSW_NAME] = stage_copy(source, folder / HNSW_NAME)
    return info


def _stage_faiss(
    folder: Path,
    ivf: FaissIVFSearch | None,
    stored: StoredFile | None,
    dirty: bool,
    calibration: RecallCalibration | None,
    link: bool,
    staged: dict[str, Path],
) -> FaissInfo | None:
    if ivf is not None and (dirty or stored is None):
        tmp = ivf.stage(folder / FAISS_NAME)  # checked against the bytes written (a full disk fails here)
        staged[FAISS_NAME] = tmp
        return ivf.info(FAISS_NAME, sha256_file(tmp), tmp.stat().st_size, calibration)
    if stored is None:
        return None
    info = stored.info
    if stored.is_in(folder):
        return info
    source = stored.local_path(download=True)
    if source is None:
        logger.warning(
            f"The FAISS index of this index is not available locally; {folder} gets no {FAISS_NAME} (it will be "
            "rebuilt on the first FAISS search)."
        )
        return None
    stored.verify("FAISS index", source)
    info = dataclasses.replace(info, name=FAISS_NAME)
    if link:
        _place(source, folder / FAISS_NAME, link)
    elif not _same_file(folder / FAISS_NAME, info):
        staged[FAISS_NAME] = stage_copy(source, folder / FAISS_NAME)
    return info


def _place(source: Path, target: Path, link: bool) -> None:
    if target.exists() and same_path(source, target):
        return
    if link:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.unlink(missing_ok=True)
        os.symlink(os.path.realpath(source), target)
    else:
        atomic_copy(source, target)


def _current_manifest(folder: Path) -> Manifest | None:
    """The manifest of the index in `folder`, or None when there is none (or it is unreadable)."""
    if not (folder / MANIFEST_NAME).is_file():
        return None
    try:
        return read_manifest(folder)
    except DMinError:
        logger.warning(f"Replacing the unreadable {folder / MANIFEST_NAME}.")
        return None


def _lists(manifest: Manifest | None, name: str) -> bool:
    if manifest is None:
        return False
    return name in {f.name for f in _extra_files(manifest)} | {s.name for s in manifest.shards}


def _same_file(path: Path, info: FileInfo | HNSWInfo) -> bool:
    """Whether `path` already holds exactly the file `info` describes."""
    try:
        return path.is_file() and path.stat().st_size == info.num_bytes and sha256_file(path) == info.sha256
    except OSError:
        return False


def _remove_orphans(folder: Path, keep: set[str], *, shards: bool = True) -> None:
    """Remove temp files and (with `shards`) unlisted `shards/sketches-NNNNN.safetensors` of interrupted saves."""
    for path in remove_temp_files(folder):
        logger.info(f"Removed {path}, left by an interrupted write.")
    if not shards:
        return
    directory = folder / SHARDS_DIR
    if not directory.is_dir():
        return
    for path in directory.glob(SHARD_GLOB):
        name = f"{SHARDS_DIR}/{path.name}"
        if saved_shard_number(name) is not None and name not in keep:
            path.unlink(missing_ok=True)
            logger.info(f"Removed {path}, a shard no manifest lists (left by an interrupted save).")
