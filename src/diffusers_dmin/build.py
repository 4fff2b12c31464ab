"""Building a [`GradientIndex`] over a whole training set: data loading, shards, processes, resume, incremental add.

[`GradientIndex.build`] is defined here ([`IndexBuildMixin`]) and forwards to [`build_index`]. A build streams the dataset through a torch `DataLoader`
(images decoded, resized, center-cropped and converted to the model's channels in the loader, optionally in worker
processes that overlap with the gradient work), sketches each batch with a [`GradientSketcher`], and writes the
sketches in shards of `max_shard_rows` rows. It never holds more than one shard of sketches in memory.

**Work units.** The rows still to compute (dataset order, minus the ids found in the folder's shards) are cut into
consecutive units of `max_shard_rows` rows ([`~storage.default_shard_rows`] by default); unit `u` is computed by
process `u % num_processes` and written as one shard, `shards/sketches-from-<first id>.safetensors`
([`~storage.shard_name`]: a name every process and every resume computes alike), atomically (a shard file that exists is complete). Because the units
that were finished are whole units, resuming cuts the remaining rows into exactly the units an uninterrupted build
would have computed, so a resumed build equals an uninterrupted one shard for shard.

**Resume.** The folder itself is the progress record: on start, temp files of interrupted writes are removed, every
shard file is opened (header and ids only) and its ids count as done. The build's [`SketchSpec`] is stored first (in
`dmin_build.json`, and later in the manifest); a resumed build whose spec differs raises [`IndexMismatchError`].
`resume=False` deletes the index files of the folder first (only those) and starts over.

**Partial shards.** While a unit is computed, its rows are flushed to a partial file
(`.dmin-partial/sketches-from-<first id>.part-<n>.safetensors`, atomically, holding the rows since the previous flush
and how many of the unit's rows they cover) at the first batch boundary after 256 rows or 30 seconds since the last
durable write. So a killed build (SIGKILL, power loss) loses at most that much work plus the batch in flight, not a
whole shard of up to 1,024 rows. The next run reads a unit's partial files back, checks them against the unit's rows
(a file that does not continue them is deleted and its rows recomputed), computes only the rest in the same batches,
and writes the same shard an uninterrupted build writes; the partial files are deleted once their shard exists.
Ctrl-C (SIGINT) and SIGTERM flush the current unit at once and raise [`BuildInterrupted`] (a `KeyboardInterrupt`),
after logging how many rows are kept where and how to resume (run the same build again).

**One writer.** The main process holds an operating-system lock on the folder ([`folderlock`]) for the whole build: a
second build or a `save_pretrained` into it from another process raises [`IndexLockedError`] naming the holder. The
lock of a killed build is released by the operating system, so it never blocks a resume.

**Threads.** The gradients run on one torch intra-op thread on the CPU unless told otherwise
(`sketcher_kwargs={"num_threads": n}`, i.e. [`SketcherOptions`], `DMIN_NUM_THREADS`, CLI `--threads`); see [`threads`] for why and the
measurements.

**Multi-process.** Under `accelerate launch` (or `torchrun`), every process runs the same call: checks are repeated
identically in every process, the main process prepares the folder, all processes scan it between two barriers (so
they agree on the units), each writes only its own shards, and after a barrier the main process writes the noise
and hands the manifest of the rows (shards in dataset order) to the caller's `finish` step.

**Finishing, and one manifest write.** [`GradientIndex.build`]'s `finish` reads the folder by that manifest (not
written yet; [`~folder.read_index_folder`]`(manifest=...)`), loads and extends a saved HNSW graph or builds one when
asked, and saves through [`~folder.write_index_folder`]: the dataset card, the graph when it changed, and the manifest
last, written once. (Until this was split, the build wrote the manifest and the facade wrote it again; the final bytes
are the same, since the facade read its values back from that file and the manifest handed over is read back from its
JSON in the same way.) One case still writes a manifest before the final one, inside `write_index_folder`'s
crash-safe replacement: extending an index whose manifest lists `hnsw.bin` (a manifest without the graph goes first,
so a crash never leaves a manifest naming a replaced graph). A crash before the final
write leaves no new manifest (the old one, if any, still lists only the old shards): the next run finds every shard
and finishes again. Without `finish` (calling [`build_index`] alone) the manifest is written here, without a card.
One difference in bytes from the double write: extending an index whose manifest lists a FAISS index or a query
preconditioner. A build drops both from its manifest (the new rows are not in them), and the save now replaces that
manifest directly, so it deletes their files like any file the old manifest listed and the new one does not; before,
the intermediate manifest had already forgotten them and the files stayed behind, unlisted.

**Layering.** This module writes shards and the noise through [`storage`] and never imports [`GradientIndex`]: the
facade's entry point is the mixin [`IndexBuildMixin`], which reaches the index through `cls`. Reading the training
data is [`training_data`].

**Incremental add.** Run the build again on the grown dataset with the same config, model and id column: only new
ids are computed, new shards are appended after the old ones (old files are not touched) and a saved HNSW graph is
extended with the new rows.

**Bad rows.** A row whose image cannot be read raises [`DatasetError`] naming its id, or with `on_error="skip"` is
left out and recorded in the manifest (`metadata.extra["skipped"]`: id and reason). A non-finite loss or gradient
raises [`NonFiniteGradientError`] naming the row ids (or is skipped and recorded likewise).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch

from .config import DMinConfig, SketcherOptions, SketchSpec
from .constants import (
    BUILD_STATE_NAME,
    HNSW_NAME,
    MANIFEST_NAME,
    NOISE_NAME,
    PARTIAL_DIR,
    PARTIAL_SUFFIX_TEMPLATE,
    README_NAME,
    SHARD_GLOB,
    SHARD_SUFFIX,
    SHARDS_DIR,
    SKIPPED_SUFFIX,
    TEMP_SUFFIX,
)
from .errors import (
    ConfigError,
    DatasetError,
    IndexCorruptError,
    IndexMismatchError,
    NonFiniteGradientError,
    check_choice,
    check_int,
)
from .folderlock import folder_lock
from .logging import get_logger, tqdm
from .storage import (
    IndexMetadata,
    Manifest,
    ShardInfo,
    atomic_write_bytes,
    describe_shard,
    read_manifest,
    read_shard_ids,
    shard_name,
    to_storage_array,
    write_manifest,
    write_noise,
    write_shard,
)
from .storage import default_shard_rows as storage_shard_rows
from .training_data import (  # noqa: F401  (load_training_dataset, decode_image: their old import path)
    Batch,
    BatchLoader,
    DatasetView,
    collate_batch,
    decode_image,
    load_training_dataset,
    loader_worker_init,
)
from .version import __version__


logger = get_logger(__name__)


__all__ = [
    "IndexBuildMixin",
    "build_index",
    "load_training_dataset",
    "decode_image",
    "default_shard_rows",
    "BuildInterrupted",
    "BUILD_STATE_NAME",
    "PARTIAL_DIR",
]

_STATE_VERSION = 1
# An unfinished shard's rows are flushed to a partial file at the first batch boundary after this many rows or seconds
# since the last durable write: a killed build loses at most that much work (plus the batch in flight).
_FLUSH_ROWS = 256
_FLUSH_SECONDS = 30.0
_ON_ERROR = ("raise", "skip")
T = TypeVar("T", bound="IndexBuildMixin")


# ---------------------------------------------------------------------------------------------- the facade's entry


class IndexBuildMixin:
    """[`GradientIndex.build`]: build an index over a dataset ([`build_index`]) and finish it through the class's own
    API, so this module never imports [`GradientIndex`]. The class provides `_from_folder(folder, *, manifest,
    load_hnsw)` (the hook of [`~hub_mixin.IndexHubMixin`]), `from_pretrained`, `save_pretrained`, `build_hnsw` and
    `set_progress_bar_config`."""

    @classmethod
    def build(
        cls: type[T],
        pipeline: Any,
        dataset: Any,
        config: DMinConfig | None,
        output_dir: str | os.PathLike,
        *,
        image_column: str = "image",
        prompt_column: str | None = "text",
        id_column: str | None = None,
        batch_size: int = 8,
        resume: bool = True,
        on_error: Literal["raise", "skip"] = "raise",
        max_shard_rows: int | None = None,
        num_workers: int = 0,
        image_root: str | os.PathLike | None = None,
        hnsw: bool = False,
        progress: bool = True,
        accelerator: Any = None,
        sketcher_kwargs: SketcherOptions | Mapping[str, Any] | None = None,
        shard_rows: int | None = None,
        **metadata: Any,
    ) -> T:
        r"""
        Build the index of a training set in `output_dir` ([`~build.build_index`]; its module doc describes resume,
        incremental add, multi-process builds, crash safety and bad rows): resumable (even after SIGKILL), incremental
        (only new ids are computed, a saved HNSW graph is extended) and split across processes under `accelerate
        launch` or `torchrun` (equal to a single-process build row for row). Sketches are written in shards as they
        are computed, so memory does not grow with the dataset.

        Args:
            pipeline (`DiffusionPipeline`): A supported pipeline (with its LoRA loaded, if any).
            dataset (`datasets.Dataset`): The training set. Image cells may be `datasets.Image` values, PIL images,
                paths (relative ones resolved against `image_root`) or arrays; a video family takes one video per row
                (frames, an `(F, H, W, C)` array, a GIF or a folder of frames; see [`~video.decode_video`]).
            config (`DMinConfig`, *optional*): How the sketches are computed; `None` for the defaults.
            output_dir (`str` or `os.PathLike`): The index folder (created if needed).
            image_column (`str`, *optional*, defaults to `"image"`): The column of images (videos, for a video family).
            prompt_column (`str`, *optional*, defaults to `"text"`): Captions; may be `None` for unconditional models.
            id_column (`str`, *optional*): An integer column of unique sample ids (default: the row position).
            batch_size (`int`, *optional*, defaults to 8): Rows per gradient batch.
            resume (`bool`, *optional*, defaults to `True`): Continue or extend the index in `output_dir`; `False`
                deletes its index files (only those) first. Another spec or id column raises [`IndexMismatchError`].
            on_error (`str`, *optional*, defaults to `"raise"`): `"raise"` ([`DatasetError`] for an unreadable
                image, [`NonFiniteGradientError`], naming the row id) or `"skip"` (left out, listed in
                `index.metadata.extra["skipped"]` with the reason).
            max_shard_rows (`int`, *optional*): Rows per shard (a shard is also a unit of work: what one process
                computes and a resume redoes at worst); by default up to 1,024 rows and 256 MiB, rounded to a multiple
                of `batch_size` ([`~storage.default_shard_rows`]).
            num_workers (`int`, *optional*, defaults to 0): `DataLoader` worker processes reading images.
            image_root (`str` or `os.PathLike`, *optional*): Folder relative image paths are resolved against.
            hnsw (`bool`, *optional*, defaults to `False`): Also build the HNSW graph (a saved one is always extended).
            progress (`bool`, *optional*, defaults to `True`): Show a progress bar on the main process.
            accelerator (`accelerate.Accelerator` or `accelerate.PartialState`, *optional*): The distributed state
                (default: `accelerate.PartialState()`).
            sketcher_kwargs ([`SketcherOptions`] or `dict`, *optional*): How the sketcher runs (`mode`,
                `max_pairs_per_batch`, `num_threads`, ...).
            shard_rows (`int`, *optional*): Deprecated alias of `max_shard_rows` (the name `save_pretrained` and
                `push_to_hub` use); it still works and emits a `FutureWarning`.
            **metadata: Provenance for the manifest and card ([`IndexMetadata`] fields: `dataset_id`, `adapter_id`,
                `base_model_revision`, `extra`, ...); base model id, dataset split, fingerprint and `id_column` are
                filled in.

        Returns:
            [`GradientIndex`]: The finished index, loaded from `output_dir` (in every process).

        Raises:
            [`DatasetError`]: A missing column (the message lists the columns), bad ids, or an unreadable image.
            [`IndexMismatchError`]: `output_dir` holds an index or unfinished build with another spec or id column.
            [`NonFiniteGradientError`]: A row's loss or gradient is NaN or infinite (its id is named).

        Examples:
        ```py
        >>> from diffusers_dmin.data import load_digits
        >>> from diffusers_dmin.testing import tiny_ddpm_pipeline
        >>> index = GradientIndex.build(tiny_ddpm_pipeline(), load_digits(16, split="train[:32]"),
        ...                             DMinConfig(num_timesteps=2, sketch_dim=64), "digits-index",
        ...                             prompt_column=None, id_column="id")
        ```
        """
        max_shard_rows = _deprecated_shard_rows(shard_rows, max_shard_rows)

        def finish(folder: Path, manifest: Manifest) -> None:
            # main process, folder still locked, `manifest` not written yet: load the rows by it (a saved graph is
            # loaded and extended with the rows it does not hold yet), then save: card, graph, the manifest once
            index = cls._from_folder(folder, manifest=manifest, load_hnsw=manifest.hnsw is not None)
            if not progress:
                index.set_progress_bar_config(disable=True)
            if manifest.hnsw is None and hnsw:
                index.build_hnsw()
            index.save_pretrained(folder)

        folder = build_index(
            pipeline,
            dataset,
            config,
            output_dir,
            image_column=image_column,
            prompt_column=prompt_column,
            id_column=id_column,
            batch_size=batch_size,
            resume=resume,
            on_error=on_error,
            max_shard_rows=max_shard_rows,
            num_workers=num_workers,
            image_root=image_root,
            hnsw=hnsw,
            progress=progress,
            accelerator=accelerator,
            options=SketcherOptions.from_value(sketcher_kwargs),
            finish=finish,
            **metadata,
        )
        index = cls.from_pretrained(folder)
        if not progress:
            index.set_progress_bar_config(disable=True)
        return index


def _deprecated_shard_rows(shard_rows: int | None, max_shard_rows: int | None) -> int | None:
    """`shard_rows=` is the old name of `max_shard_rows=`: it still works, with a `FutureWarning`."""
    if shard_rows is None:
        return max_shard_rows
    warnings.warn(
        "`shard_rows` is deprecated and will be removed in a future version; pass `max_shard_rows` instead (the name "
        "`save_pretrained` and `push_to_hub` use).",
        FutureWarning,
        stacklevel=3,
    )
    if max_shard_rows is not None and max_shard_rows != shard_rows:
        raise ConfigError(
            f"`shard_rows={shard_rows!r}` and `max_shard_rows={max_shard_rows!r}` disagree; pass only `max_shard_rows`."
        )
    return shard_rows


# ---------------------------------------------------------------------------------------------- public entry point


def build_index(
    pipeline: Any,
    dataset: Any,
    config: DMinConfig | None,
    output_dir: str | os.PathLike,
    *,
    image_column: str = "image",
    prompt_column: str | None = "text",
    id_column: str | None = None,
    batch_size: int = 8,
    resume: bool = True,
    on_error: Literal["raise", "skip"] = "raise",
    max_shard_rows: int | None = None,
    num_workers: int = 0,
    image_root: str | os.PathLike | None = None,
    hnsw: bool = False,
    progress: bool = True,
    accelerator: Any = None,
    options: SketcherOptions | None = None,
    finish: Callable[[Path, Manifest], None] | None = None,
    **metadata: Any,
) -> Path:
    r"""
    Build (or resume, or extend) the index of `dataset` in `output_dir`; see [`GradientIndex.build`] for the
    arguments. Writes the shards and the noise; then `finish(folder, manifest)` runs in the main process while the
    folder is still locked and writes the index with that manifest (the facade passes one that loads the rows by it,
    extends or builds the HNSW graph, and saves the card, graph and manifest); without `finish` the manifest alone is
    written. Nothing is written when the folder already held every row and nothing was asked of it. Returns the index
    folder, in every process, once every process is done.
    """
    from .gradients import GradientSketcher

    start_time = time.perf_counter()
    config = DMinConfig() if config is None else config
    if not isinstance(config, DMinConfig):
        raise ConfigError(f"`config` must be a DMinConfig or None, but is {type(config).__name__}.")
    _check_options(batch_size, max_shard_rows, num_workers, on_error, resume)
    IndexMetadata.from_kwargs(**metadata)  # unknown names or bad values fail now, not after the build
    folder = Path(os.path.expanduser(os.fspath(output_dir)))
    state = _distributed_state(accelerator)
    rank, world = state.process_index, state.num_processes
    is_main = state.is_main_process
    with contextlib.ExitStack() as stack:
        if is_main:  # one build (or save) at a time per folder; other processes of this build follow the main one
            stack.enter_context(folder_lock(folder, "build"))
        stack.enter_context(_sigterm_raises())
        _move_pipeline(pipeline, state)

        sketcher = GradientSketcher.from_pipeline(pipeline, config, options=options)
        if progress is False:
            sketcher.set_progress_bar_config(disable=True)
        spec = sketcher.spec
        adapter = sketcher.adapter
        table = DatasetView(dataset, image_column, prompt_column if adapter.conditional else None, id_column)
        if prompt_column is not None and not adapter.conditional:
            logger.info(
                f"`prompt_column={prompt_column!r}` is ignored: the {adapter.family} pipeline is unconditional."
            )
        if adapter.conditional and prompt_column is None:
            raise ConfigError(
                f"This {adapter.family} pipeline is conditional: pass `prompt_column=` naming the caption column (the "
                f"dataset has {table.column_names})."
            )

        # 1. what is already in the folder, and is it compatible? (every process decides the same way)
        existing = None if not resume else _read_existing(folder)
        if existing is not None:
            existing.check(spec, id_column, folder)
        state.wait_for_everyone()  # nobody may delete or write before every process has read the folder
        if is_main:
            if resume:
                _remove_temp_files(folder)
            else:
                _remove_index_files(folder)
            if existing is None or existing.manifest is None:
                _write_state(folder, spec, id_column)
        state.wait_for_everyone()

        # 2. which rows are done; cut the rest into units (identical in every process)
        scan = _scan(folder, spec, existing.manifest if existing is not None else None)
        state.wait_for_everyone()  # every process has scanned before anyone writes a new shard
        pending = table.pending_positions(scan.done_ids())
        rows_per_unit = _shard_rows(max_shard_rows, batch_size, spec)
        units = [pending[i : i + rows_per_unit] for i in range(0, len(pending), rows_per_unit)]
        names = _unit_names(units, table.ids, scan.names())
        mine = [u for u in range(len(units)) if u % world == rank]
        logger.info(
            f"Index build in {folder}: {len(table)} rows, {len(table) - len(pending)} already done or skipped, "
            f"{len(pending)} to compute in {len(units)} shards of up to {rows_per_unit} rows over {world} process(es) "
            f"(process {rank} computes {len(mine)} shards)."
        )

        # 3. compute this process's units
        try:
            computed = _compute_units(
                sketcher,
                table,
                [(names[u], units[u]) for u in mine],
                folder=folder,
                batch_size=batch_size,
                num_workers=num_workers,
                image_root=image_root,
                on_error=on_error,
                progress=progress and is_main,
                desc=f"Gradient sketches (process {rank + 1}/{world})" if world > 1 else "Gradient sketches",
                pin_memory=adapter.device.type == "cuda",
            )
        except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (`_sigterm_raises`): say what was kept, how to resume
            message = _interrupted_message(err, folder, spec, len(table))
            logger.warning(message)
            raise BuildInterrupted(message, getattr(err, "signal_name", "SIGINT"), resumable=True) from err
        state.wait_for_everyone()

        # 4. the main process writes the noise; the caller's `finish` writes graph, card and manifest
        if is_main:
            _finish(
                folder,
                sketcher,
                table,
                existing.manifest if existing is not None else None,
                pipeline=pipeline,
                id_column=id_column,
                hnsw=hnsw,
                finish=finish,
                metadata=metadata,
                changed=bool(units) or scan.has_unlisted(),
            )
        state.wait_for_everyone()
        seconds = time.perf_counter() - start_time
        if is_main:
            logger.info(
                f"Index build finished: {read_manifest(folder).num_rows} rows in {folder}; this run computed "
                f"{len(pending)} rows in "
                f"{seconds:.1f} s ({len(pending) / max(seconds, 1e-9):.2f} samples/s over {world} process(es); this "
                f"process: {computed} rows)."
            )
        return folder


def default_shard_rows(batch_size: int, spec: SketchSpec | DMinConfig) -> int:
    """Rows per shard of a build when `max_shard_rows` is not given: [`~storage.default_shard_rows`] (the one policy,
    which says why builds cap rows) for the rows of `spec` and this batch size: at most 256 MiB of stored sketches and
    1,024 rows, rounded down to a multiple of `batch_size` (at least one batch)."""
    config = spec.config if isinstance(spec, SketchSpec) else spec
    return storage_shard_rows((config.num_timesteps, config.sketch_dim), config.dtype, batch_size=batch_size)


class BuildInterrupted(KeyboardInterrupt):
    """A build stopped by Ctrl-C (SIGINT) or SIGTERM. What was computed is kept in the folder; running the same build
    again resumes it. A `KeyboardInterrupt`, so that code which stops on Ctrl-C stops on it too.

    Attributes:
        signal_name (`str`): `"SIGINT"` or `"SIGTERM"`.
        resumable (`bool`): The build had prepared its folder (a resume continues it), and the message says what was
            kept.
    """

    def __init__(self, message: str = "", signal_name: str = "SIGINT", *, resumable: bool = False):
        super().__init__(message)
        self.signal_name = signal_name
        self.resumable = resumable


@contextlib.contextmanager
def _sigterm_raises():
    """While a build runs, SIGTERM (e.g. `kill`, a scheduler's stop) raises [`BuildInterrupted`] in the main thread
    like Ctrl-C does, so the build saves what it computed and says how to resume. Installed only from the main thread
    and only over the default handler (a program's own handler is left alone); restored afterwards."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise BuildInterrupted("SIGTERM", signal_name="SIGTERM")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted_message(err: BaseException, folder: Path, spec: SketchSpec, total: int) -> str:
    from safetensors import safe_open

    cause = "SIGTERM" if getattr(err, "signal_name", None) == "SIGTERM" else "Ctrl-C (SIGINT)"
    try:
        in_shards = sum(len(_shard_ids(folder, f"{SHARDS_DIR}/{p.name}", spec)) for p in _shard_files(folder))
        in_partial = 0
        for path in sorted((folder / PARTIAL_DIR).glob(SHARD_GLOB)) if (folder / PARTIAL_DIR).is_dir() else []:
            with safe_open(str(path), framework="np") as f:
                in_partial += int(f.get_slice("ids").get_shape()[0])
        kept = (
            f"{in_shards + in_partial:,} rows are kept in {folder} ({in_shards:,} in finished shards, {in_partial:,} "
            f"in partial shards under {PARTIAL_DIR}/); the dataset has {total:,} rows"
        )
    except Exception as problem:  # the message must not hide the interrupt
        kept = f"the rows computed so far are kept in {folder} (could not count them: {problem})"
    return (
        f"Index build interrupted by {cause}: {kept}. "
        + ("Every row this process had computed was saved. " if not getattr(err, "dmin_unsaved", False) else "")
        + "To resume, run "
        f"the same build again with the same pipeline, dataset, config and output_dir={str(folder)!r} (resume=True, "
        "the default): only the missing rows are computed. On the command line: the same `dmin build ... "
        f"--output-dir {folder}` command, without --overwrite."
    )


def _shard_files(folder: Path) -> list[Path]:
    shards = folder / SHARDS_DIR
    return sorted(shards.glob(SHARD_GLOB)) if shards.is_dir() else []


# ---------------------------------------------------------------------------------------------- checks and setup


def _check_options(batch_size: Any, max_shard_rows: Any, num_workers: Any, on_error: Any, resume: Any) -> None:
    check_int(batch_size, "batch_size", hint="Example: `batch_size=8`.")
    check_int(max_shard_rows, "max_shard_rows", optional=True, hint="Ideally a multiple of `batch_size`.")
    check_int(num_workers, "num_workers", minimum=0)
    check_choice(on_error, "on_error", _ON_ERROR)
    if not isinstance(resume, bool):
        raise ConfigError(f"`resume` must be True or False, but is {resume!r}.")


def _shard_rows(max_shard_rows: int | None, batch_size: int, spec: SketchSpec) -> int:
    return int(max_shard_rows) if max_shard_rows is not None else default_shard_rows(batch_size, spec)


def _distributed_state(accelerator: Any):
    """The `accelerate` state: the given `Accelerator`/`PartialState`, or a `PartialState` (one process when the
    script was not started by `accelerate launch` / `torchrun`)."""
    from accelerate import PartialState

    if accelerator is not None:
        state = getattr(accelerator, "state", accelerator)
        for name in ("process_index", "num_processes", "is_main_process", "wait_for_everyone"):
            if not hasattr(state, name):
                raise ConfigError(
                    f"`accelerator` must be an `accelerate.Accelerator` or `accelerate.PartialState`, but is "
                    f"{type(accelerator).__name__}."
                )
    else:
        # accelerate only picks the gloo (CPU) backend when asked for a CPU state; without any accelerator a launched
        # process would otherwise believe it runs alone
        cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes") or not _has_accelerator()
        state = PartialState(cpu=cpu)
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if state.num_processes != launched and launched > 1:
        # every process would compute every row and write the same shards
        raise ConfigError(
            f"This process was launched as one of {launched} (WORLD_SIZE), but its accelerate state has "
            f"{state.num_processes} process(es). On a machine without GPUs create the state with "
            "`PartialState(cpu=True)` / `Accelerator(cpu=True)` before anything else does, or pass no `accelerator`."
        )
    return state


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def _move_pipeline(pipeline: Any, state: Any) -> None:
    """In a multi-process run, put each process's pipeline on that process's device (e.g. `cuda:1`)."""
    device = getattr(state, "device", None)
    if state.num_processes <= 1 or device is None or device.type == "cpu":
        return
    current = getattr(pipeline, "device", None)
    if current is None or torch.device(current) != torch.device(device):
        logger.info(f"Process {state.process_index}: moving the pipeline to {device}.")
        pipeline.to(device)


# ---------------------------------------------------------------------------------------------- the compute loop


@dataclass
class _Done:
    """What one batch (or a partial shard file) contributed to its unit; appended to a list in one step, so that an
    interrupt never leaves half of it recorded."""

    covered: int  # unit positions processed (computed, skipped or failed)
    sketches: np.ndarray | None  # (n, T, K) storage dtype
    ids: np.ndarray  # (n,)
    skipped: list[dict[str, Any]]


@dataclass
class _Unit:
    name: str
    positions: np.ndarray  # dataset positions of the whole unit
    saved: list[_Done] = field(default_factory=list)  # durable: in partial files (read back on resume, or flushed)
    fresh: list[_Done] = field(default_factory=list)  # computed since the last flush
    pieces: int = 0  # partial files written for this unit

    def covered(self) -> int:
        return sum(d.covered for d in self.saved) + sum(d.covered for d in self.fresh)

    def rows(self, parts: list[_Done]) -> int:
        return sum(len(d.ids) for d in parts)


def _compute_units(
    sketcher: Any,
    table: DatasetView,
    units: list[tuple[str, np.ndarray]],
    *,
    folder: Path,
    batch_size: int,
    num_workers: int,
    image_root: str | os.PathLike | None,
    on_error: str,
    progress: bool,
    desc: str,
    pin_memory: bool,
) -> int:
    """Compute and write this process's units; returns the number of rows written.

    Rows of an unfinished unit are flushed to a partial file (`.dmin-partial/`) at the first batch boundary after
    `_FLUSH_ROWS` rows or `_FLUSH_SECONDS` seconds since the last durable write, and on an interrupt; a later run reads
    them back instead of recomputing those rows, and the unit's shard is the same file an uninterrupted build writes.
    """
    if not units:
        return 0
    adapter = sketcher.adapter
    spec = sketcher.spec
    dtype = sketcher.config.dtype
    state = [_Unit(name, positions) for name, positions in units]
    for unit in state:
        unit.saved, unit.pieces = _read_partial(folder, unit, table.ids, spec)
    written = 0
    for unit in state:  # every row already in partial files (interrupted just before the shard was written)
        if unit.saved and unit.covered() == len(unit.positions):
            written += _write_unit(folder, unit, dtype)
    work = [unit for unit in state if unit.covered() < len(unit.positions)]
    reused = sum(unit.rows(unit.saved) for unit in work)
    if reused:
        logger.info(f"Reusing {reused} rows from partial shards of an interrupted build in {folder / PARTIAL_DIR}.")
    loader = torch.utils.data.DataLoader(
        BatchLoader(
            table,
            [unit.positions[unit.covered() :] for unit in work],
            batch_size,
            adapter.resolution,
            adapter.image_channels,
            image_root,
            adapter.num_frames,
        ),
        batch_size=None,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_batch,
        worker_init_fn=loader_worker_init if num_workers else None,
        pin_memory=pin_memory,
    )
    total = sum(len(unit.positions) for unit in state)
    current: _Unit | None = None
    last_durable = time.monotonic()
    with tqdm(total=total, desc=desc, unit="sample", disable=not progress, dynamic_ncols=True) as bar:
        bar.update(total - sum(len(unit.positions) - unit.covered() for unit in work))
        try:
            for batch in loader:
                current = work[batch.unit]
                skipped: list[dict[str, Any]] = []
                for sample_id, reason in batch.errors:
                    if on_error == "raise":
                        raise DatasetError(
                            f"The training row with id {sample_id} could not be read ({reason}). Fix or remove that "
                            "row, or pass `on_error='skip'` to leave unreadable rows out (they are listed in the "
                            "manifest).",
                            sample_id=sample_id,
                        )
                    skipped.append({"id": sample_id, "reason": reason})
                rows, row_ids = None, np.empty(0, dtype=np.int64)
                if batch.pixels is not None:
                    rows, row_ids, failed = _sketch_batch(sketcher, batch, on_error)
                    skipped += failed
                    if not len(row_ids):
                        rows = None
                current.fresh.append(_Done(len(batch.ids), rows, row_ids, skipped))
                bar.update(len(batch.ids))
                if batch.last:
                    written += _write_unit(folder, current, dtype)
                    bar.set_postfix(shards=f"{state.index(current) + 1}/{len(state)}", refresh=False)
                    current, last_durable = None, time.monotonic()
                elif (
                    sum(d.covered for d in current.fresh) >= _FLUSH_ROWS
                    or time.monotonic() - last_durable >= _FLUSH_SECONDS
                ):
                    _flush(folder, current)
                    last_durable = time.monotonic()
        except KeyboardInterrupt as interrupt:
            # Ctrl-C or SIGTERM (see `_sigterm_raises`): keep what this process computed of the current unit
            if current is not None and current.fresh:
                try:
                    _flush(folder, current)
                except BaseException as err:  # a second interrupt, a full disk: the earlier files stay consistent
                    interrupt.dmin_unsaved = True
                    logger.warning(f"Could not save the last {len(current.fresh)} batch(es) while stopping: {err!r}")
            raise
    return written


def _flush(folder: Path, unit: _Unit) -> None:
    """Write the unit's rows computed since the last flush to a partial file (atomically) and mark them durable."""
    from safetensors.numpy import save

    fresh = list(unit.fresh)
    start = sum(d.covered for d in unit.saved)
    stop = start + sum(d.covered for d in fresh)
    arrays = [d.sketches for d in fresh if d.sketches is not None]
    ids = np.concatenate([d.ids for d in fresh]).astype(np.int64) if fresh else np.empty(0, dtype=np.int64)
    skipped = [record for d in fresh for record in d.skipped]
    sketches = np.ascontiguousarray(np.concatenate(arrays)) if arrays else None
    path = _partial_path(folder, unit.name, unit.pieces)
    tensors = {"ids": ids} if sketches is None else {"sketches": sketches, "ids": ids}
    metadata = {"unit": unit.name, "start": str(start), "stop": str(stop), "skipped": json.dumps(skipped)}
    atomic_write_bytes(path, save(tensors, metadata=metadata))
    # `fresh` first: an interrupt between these lines must not flush the same rows again under another start
    unit.fresh = unit.fresh[len(fresh) :]
    unit.saved.append(_Done(stop - start, sketches, ids, skipped))
    unit.pieces += 1
    logger.debug(f"Flushed {len(ids)} rows of {unit.name} to {path.name} (rows {start}-{stop} of the unit).")


def _partial_path(folder: Path, shard: str, number: int) -> Path:
    stem = Path(shard).name[: -len(SHARD_SUFFIX)]
    return folder / PARTIAL_DIR / (stem + PARTIAL_SUFFIX_TEMPLATE.format(number))


def _partial_files(folder: Path, shard: str) -> list[Path]:
    stem = Path(shard).name[: -len(SHARD_SUFFIX)]
    return sorted((folder / PARTIAL_DIR).glob(stem + PARTIAL_SUFFIX_TEMPLATE.replace("{:05d}", "[0-9]" * 5)))


def _read_partial(folder: Path, unit: _Unit, ids: np.ndarray, spec: SketchSpec) -> tuple[list[_Done], int]:
    """The partial files of a unit, checked against the unit's rows; files that do not continue a valid prefix of the
    unit (another batch plan, another dataset) are deleted and their rows recomputed."""
    from safetensors import SafetensorError, safe_open

    files = _partial_files(folder, unit.name)
    done: list[_Done] = []
    covered = 0
    expected = (spec.config.num_timesteps, spec.config.sketch_dim)
    storage = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}[spec.config.dtype]
    for number, path in enumerate(files):
        problem = None
        try:
            if path != _partial_path(folder, unit.name, number):
                raise ValueError("the files are not numbered 0, 1, 2, ...")
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                part_ids = f.get_tensor("ids")
                sketches = f.get_tensor("sketches") if "sketches" in f.keys() else None
            start, stop = int(meta["start"]), int(meta["stop"])
            skipped = json.loads(meta["skipped"])
            if meta.get("unit") != unit.name or start != covered or not start < stop <= len(unit.positions):
                raise ValueError(
                    f"it covers rows {start}-{stop} of {meta.get('unit')}, not what follows row {covered}"
                )
            expect_ids = ids[unit.positions[start:stop]]
            skipped_ids = {int(r["id"]) for r in skipped}
            if part_ids.dtype != np.int64 or not np.array_equal(
                part_ids, expect_ids[~np.isin(expect_ids, list(skipped_ids))]
            ):
                raise ValueError("its ids are not the unit's rows")
            if not skipped_ids <= set(expect_ids.tolist()):
                raise ValueError("its skipped rows are not the unit's rows")
            if len(part_ids) and (
                sketches is None or sketches.shape != (len(part_ids), *expected) or sketches.dtype != storage
            ):
                raise ValueError("its sketches have another shape or dtype than this build writes")
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            problem = err
        if problem is not None:
            stale = files[number:]
            logger.warning(
                f"Ignoring {len(stale)} partial file(s) of {unit.name} from {path.name} on ({problem}); their rows "
                "are computed again."
            )
            for old in stale:
                old.unlink(missing_ok=True)
            break
        done.append(_Done(stop - start, sketches if len(part_ids) else None, part_ids, skipped))
        covered = stop
    return done, len(done)


def _sketch_batch(sketcher: Any, batch: Batch, on_error: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Sketches (storage dtype) and ids of the readable rows of a batch; non-finite rows raise or are dropped."""
    ids = batch.ids[batch.ok]
    pixels, prompts = batch.pixels, batch.prompts
    failed: list[dict[str, Any]] = []
    while True:
        try:
            sketches = sketcher(images=pixels, prompts=prompts)
            return to_storage_array(sketches, sketcher.config.dtype), ids, failed
        except NonFiniteGradientError as err:
            bad = sorted(set(err.positions))
            bad_ids = [int(ids[p]) for p in bad]
            if on_error == "raise" or not bad:
                raise NonFiniteGradientError(
                    f"The training rows with ids {bad_ids} have a non-finite loss or gradient ({err}). Check those "
                    "images and the model weights, or pass `on_error='skip'` to leave such rows out.",
                    positions=bad,
                    sample_ids=bad_ids,
                ) from err
            logger.warning(f"Skipping the rows with ids {bad_ids}: non-finite loss or gradient.")
            failed += [{"id": i, "reason": "non-finite loss or gradient"} for i in bad_ids]
            keep = np.ones(len(ids), dtype=bool)
            keep[bad] = False
            if not keep.any():
                return np.empty((0,)), ids[keep], failed
            ids, pixels = ids[keep], pixels[torch.from_numpy(keep)]
            prompts = None if prompts is None else [p for p, k in zip(prompts, keep) if k]


def _write_unit(folder: Path, unit: _Unit, dtype: str) -> int:
    """Write a finished unit as one shard (the same file an uninterrupted build writes), then drop its partial files."""
    parts = unit.saved + unit.fresh
    name = unit.name
    skipped = [record for d in parts for record in d.skipped]
    # the skipped rows are recorded first: a shard that exists always has its record of skipped rows
    if skipped:
        atomic_write_bytes(folder / _skipped_name(name), json.dumps(skipped, indent=1).encode("utf-8"))
    arrays = [d.sketches for d in parts if d.sketches is not None]
    if not arrays:
        logger.info(f"Shard {name}: every row was skipped ({len(skipped)} rows); nothing to write.")
        rows = 0
    else:
        info = write_shard(folder, name, np.concatenate(arrays), np.concatenate([d.ids for d in parts]), dtype)
        logger.info(
            f"Wrote {info.name}: {info.num_rows} rows, {info.num_bytes / 2**20:.1f} MiB"
            + (f" ({len(skipped)} rows skipped)" if skipped else "")
            + "."
        )
        rows = info.num_rows
    for path in _partial_files(folder, name):  # after the shard: a crash in between only leaves orphans
        path.unlink(missing_ok=True)
    return rows


# ---------------------------------------------------------------------------------------------- folder state


@dataclass
class _Existing:
    """What a previous build left: the manifest of a finished index and/or the spec of an unfinished build."""

    manifest: Manifest | None
    spec: SketchSpec | None
    id_column: str | None
    source: str

    def check(self, spec: SketchSpec, id_column: str | None, folder: Path) -> None:
        fix = (
            f"Build with the same config, model, adapter and id column as the index in {folder}, pass "
            "`resume=False` (CLI: `--overwrite`) to delete it and start over, or choose another `output_dir`."
        )
        if self.spec is None:
            raise IndexMismatchError(
                f"The index in {folder} ({self.source}) records no sketch spec (it was created from a config only), "
                f"so new rows cannot be checked against it. {fix}"
            )
        differences = self.spec.differences(spec, ignore=())
        if self.id_column != id_column:
            differences["id_column"] = (self.id_column, id_column)
        if differences:
            raise IndexMismatchError.from_differences(differences, what="new build", fix=fix)


def _read_existing(folder: Path) -> _Existing | None:
    if (folder / MANIFEST_NAME).is_file():
        manifest = read_manifest(folder)
        return _Existing(manifest, manifest.spec, manifest.metadata.id_column, MANIFEST_NAME)
    path = folder / BUILD_STATE_NAME
    if path.is_file():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            spec = SketchSpec.from_dict(data["spec"])
            id_column = data.get("id_column")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise IndexCorruptError(
                f"{path} (the record of an unfinished build) is unreadable ({err}). Delete the folder's index files "
                "with `resume=False` (CLI: `--overwrite`) to start over."
            ) from err
        return _Existing(None, spec, id_column, BUILD_STATE_NAME)
    if any((folder / SHARDS_DIR).glob(SHARD_GLOB)):
        raise IndexCorruptError(
            f"{folder / SHARDS_DIR} holds shard files but {folder} has neither {MANIFEST_NAME} nor {BUILD_STATE_NAME}, "
            "so their origin is unknown. Pass `resume=False` (CLI: `--overwrite`) to delete them and start over, or "
            "choose another `output_dir`."
        )
    return None


def _write_state(folder: Path, spec: SketchSpec, id_column: str | None) -> None:
    data = {
        "format_version": _STATE_VERSION,
        "library_version": __version__,
        "spec": spec.to_dict(),
        "id_column": id_column,
    }
    atomic_write_bytes(folder / BUILD_STATE_NAME, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def _remove_temp_files(folder: Path) -> None:
    """Temp files of writes that a killed build left behind (storage writes `.<name>.<random>.tmp` next to files)."""
    removed = 0
    for directory in (folder, folder / SHARDS_DIR, folder / PARTIAL_DIR):
        if directory.is_dir():
            for path in directory.glob(".*" + TEMP_SUFFIX):
                path.unlink(missing_ok=True)
                removed += 1
    if removed:
        logger.info(f"Removed {removed} temp file(s) of an interrupted build from {folder}.")


def _remove_index_files(folder: Path) -> None:
    """`resume=False`: delete the index files of `folder` (and nothing else)."""
    from .hub import is_generated_card

    paths = [folder / name for name in (MANIFEST_NAME, BUILD_STATE_NAME, NOISE_NAME, HNSW_NAME)]
    if (folder / README_NAME).is_file() and is_generated_card(folder / README_NAME):
        paths.append(folder / README_NAME)
    shards = folder / SHARDS_DIR
    if shards.is_dir():
        paths += [*shards.glob(SHARD_GLOB), *shards.glob("*" + SKIPPED_SUFFIX), *shards.glob(".*" + TEMP_SUFFIX)]
    paths += list(folder.glob(".*" + TEMP_SUFFIX)) if folder.is_dir() else []
    paths += list((folder / PARTIAL_DIR).glob("*")) if (folder / PARTIAL_DIR).is_dir() else []
    removed = [p for p in paths if p.is_file()]
    for path in removed:
        path.unlink()
    if removed:
        logger.info(f"`resume=False`: deleted {len(removed)} index file(s) from {folder}; building from scratch.")


def _remove_partial_files(folder: Path) -> None:
    """Partial files left over once every unit has its shard (a crash between a shard and the cleanup of its parts)."""
    partial = folder / PARTIAL_DIR
    if partial.is_dir():
        for path in partial.iterdir():
            if path.is_file():
                path.unlink(missing_ok=True)
        try:
            partial.rmdir()
        except OSError:  # something else lives there; leave it
            pass


@dataclass
class _Scan:
    listed: list[tuple[ShardInfo, np.ndarray]]  # shards of the manifest, in its order, with their ids
    unlisted: dict[str, np.ndarray]  # other shard files -> ids
    skipped: dict[int, str]  # id -> reason
    recorded: set[str] = field(default_factory=set)  # shard names with a record of skipped rows (shard or not)

    def done_ids(self) -> np.ndarray:
        parts = [ids for _, ids in self.listed] + list(self.unlisted.values())
        parts.append(np.fromiter(self.skipped, dtype=np.int64, count=len(self.skipped)))
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def names(self) -> set[str]:
        # a record without its shard (killed in between) keeps its name: a new unit must not overwrite the record
        return {info.name for info, _ in self.listed} | set(self.unlisted) | self.recorded

    def has_unlisted(self) -> bool:
        return bool(self.unlisted)


def _skipped_name(shard: str) -> str:
    return shard[: -len(SHARD_SUFFIX)] + SKIPPED_SUFFIX


def _scan(folder: Path, spec: SketchSpec, manifest: Manifest | None) -> _Scan:
    """Read the ids of every shard file (header and ids only; no hashing) and the records of skipped rows."""
    listed = []
    listed_names = set()
    skipped: dict[int, str] = {}
    recorded: set[str] = set()
    if manifest is not None:
        for info in manifest.shards:
            listed.append((info, _shard_ids(folder, info.name, spec)))
            listed_names.add(info.name)
        for record in manifest.metadata.extra.get("skipped", []) or []:
            skipped[int(record["id"])] = str(record.get("reason", ""))
    unlisted = {}
    shards = folder / SHARDS_DIR
    if shards.is_dir():
        for path in sorted(shards.glob(SHARD_GLOB)):
            name = f"{SHARDS_DIR}/{path.name}"
            if name not in listed_names:
                unlisted[name] = _shard_ids(folder, name, spec)
        for path in sorted(shards.glob("*" + SKIPPED_SUFFIX)):
            try:
                records = json.loads(path.read_text(encoding="utf-8"))
                skipped.update({int(r["id"]): str(r.get("reason", "")) for r in records})
                recorded.add(f"{SHARDS_DIR}/{path.name[: -len(SKIPPED_SUFFIX)]}{SHARD_SUFFIX}")
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise IndexCorruptError(
                    f"{path} (the record of skipped rows) is unreadable ({err}). Delete it and the shard of the same "
                    "name to recompute those rows."
                ) from err
    scan = _Scan(listed, unlisted, skipped, recorded)
    all_ids = [ids for _, ids in listed] + list(unlisted.values())
    if all_ids:
        merged = np.concatenate(all_ids)
        values, counts = np.unique(merged, return_counts=True)
        if len(values) != len(merged):
            raise IndexCorruptError(
                f"The shards of {folder} hold the ids {values[counts > 1][:10].tolist()} more than once (two builds "
                "wrote to this folder at the same time?). Pass `resume=False` (CLI: `--overwrite`) to start over."
            )
    return scan


def _shard_ids(folder: Path, name: str, spec: SketchSpec) -> np.ndarray:
    path = folder / name
    fix = "Delete the file to recompute its rows (it was not written by this build), or start over with resume=False."
    if not path.is_file():
        raise IndexCorruptError(f"The shard {name} listed in {MANIFEST_NAME} is missing from {folder}. {fix}")
    config = spec.config
    try:
        return read_shard_ids(
            path, num_timesteps=config.num_timesteps, sketch_dim=config.sketch_dim, dtype=config.dtype
        )
    except IndexCorruptError as err:
        raise IndexCorruptError(f"{err} {fix}") from err


def _unit_names(units: Sequence[np.ndarray], ids: np.ndarray, taken: set[str]) -> list[str]:
    """`shards/sketches-from-<first id>.safetensors`: the first id of a pending unit was never written, so the name is
    new; a suffix keeps names unique should a foreign file use it."""
    names = []
    for positions in units:
        first_id = int(ids[positions[0]])
        name, suffix = shard_name(first_id=first_id), 1
        while name in taken:
            name, suffix = shard_name(first_id=first_id, duplicate=suffix), suffix + 1
        taken.add(name)
        names.append(name)
    return names


# ---------------------------------------------------------------------------------------------- finishing


def _finish(
    folder: Path,
    sketcher: Any,
    table: DatasetView,
    old: Manifest | None,
    *,
    pipeline: Any,
    id_column: str | None,
    hnsw: bool,
    finish: Callable[[Path, Manifest], None] | None,
    metadata: Mapping[str, Any],
    changed: bool,
) -> None:
    """Main process, after every shard exists: the noise, and the manifest (shards in dataset order), which `finish`
    writes with the card and the graph (or, without `finish`, which is written here)."""
    spec = sketcher.spec
    scan = _scan(folder, spec, old)
    missing = table.pending_positions(scan.done_ids())
    if len(missing):
        raise IndexCorruptError(
            f"{len(missing)} rows (ids {table.ids[missing[:10]].tolist()}...) have no shard after every process "
            "finished; run the build again to compute them (it resumes)."
        )
    _remove_partial_files(folder)
    if old is not None and not changed and not hnsw:
        logger.info(f"The index in {folder} already holds every row of the dataset; nothing to do.")
        return
    # old shards keep their place; new ones follow in dataset order of their first row
    new = sorted(scan.unlisted.items(), key=lambda item: (int(table.positions_of(item[1][:1])[0]), item[0]))
    shards = [info for info, _ in scan.listed] + [describe_shard(folder, name) for name, _ in new]
    if not shards:
        raise DatasetError(
            f"No row of the dataset could be used ({len(scan.skipped)} skipped, e.g. "
            f"{next(iter(scan.skipped.items()), None)}); there is nothing to index."
        )
    if old is not None and old.noise is not None and (folder / old.noise.name).is_file():
        noise = old.noise
    else:
        noise = write_noise(folder, sketcher.noise)
    manifest = Manifest(
        config=spec.config,
        spec=spec,
        shards=shards,
        noise=noise,
        hnsw=old.hnsw if old is not None else None,
        metadata=_metadata(old, pipeline, table, id_column, scan.skipped, metadata),
    )
    if finish is None:
        write_manifest(folder, manifest)
    else:  # the facade: loads the rows by `manifest`, then saves the card, the graph when it changed, the manifest
        finish(folder, manifest)
    for path in [folder / BUILD_STATE_NAME, *(folder / SHARDS_DIR).glob("*" + SKIPPED_SUFFIX)]:
        path.unlink(missing_ok=True)  # the manifest now records the spec and the skipped rows
    logger.info(f"Wrote {MANIFEST_NAME}: {manifest.num_rows} rows in {len(shards)} shards ({len(new)} new).")


def _metadata(
    old: Manifest | None,
    pipeline: Any,
    table: DatasetView,
    id_column: str | None,
    skipped: Mapping[int, str],
    given: Mapping[str, Any],
) -> IndexMetadata:
    dataset = table.dataset
    base = old.metadata.to_dict() if old is not None else {}
    values = IndexMetadata.from_dict(base)
    name_or_path = getattr(pipeline, "name_or_path", None) or getattr(
        getattr(pipeline, "config", None), "_name_or_path", None
    )
    split = getattr(dataset, "split", None)
    defaults = {
        "base_model_id": str(name_or_path) if name_or_path else None,
        "dataset_split": str(split) if split is not None else None,
        "dataset_fingerprint": getattr(dataset, "_fingerprint", None),
        "id_column": id_column,
    }
    for key, value in {**defaults, **given}.items():
        if key == "extra":
            values.extra.update(value or {})
        elif value is not None:
            setattr(values, key, value)
    if skipped:
        values.extra["skipped"] = [{"id": i, "reason": skipped[i]} for i in sorted(skipped)]
    values.extra["columns"] = {"image": table.image_column, "prompt": table.prompt_column}  # for `dmin search`
    return IndexMetadata(**{name: getattr(values, name) for name in IndexMetadata.field_names()})
