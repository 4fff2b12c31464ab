"""Exact search over an index whose shards are split between processes: [`DistributedSearch`].

Each process (rank) of a `torch.distributed` job (started by `accelerate launch` or `torchrun`, on one machine or
several) verifies (size and sha256) and memory-maps only the shards [`assign_shards`] gives it, ranks its rows with
[`~diffusers_dmin.search.ExactSearch`] and contributes its top-k; the merge is the top-k of all rows. The result
equals single-process exact search, `GradientIndex.from_pretrained(folder).search(queries, top_k)`, bit for bit:

- every rank owns whole shards, and a shard is one row block of `ExactSearch` in both cases, so each row is scored by
  the same float32 products of the same shapes (BLAS results depend on the chunk's shape and alignment);
- rows are ranked by score and, for bit-identical scores, by row position ([`~diffusers_dmin.search.ranking_keys`]),
  so a top-k of disjoint row sets merges into exactly the top-k of their union, ties included;
- queries are checked, folded and expanded by the same code as `GradientIndex.search`, on rank 0, and broadcast.

Every step that can fail on one process (reading the manifest, verifying shards, checking sample ids, preparing the
queries, searching) ends with an exchange of statuses: a failure anywhere raises [`DistributedSearchError`] on every
process, naming the rank and its error. Collectives wait at most `timeout` seconds, so a process that died or
stalled stops the others with an error instead of a hang.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import DMinConfig, SketchSpec
from .constants import MANIFEST_NAME
from .errors import ConfigError, DistributedSearchError, IndexCorruptError, IndexNotFoundError, check_int
from .index import GradientIndex
from .logging import ProgressBarMixin, get_logger
from .outputs import InfluenceResult
from .search import (
    ExactSearch,
    expand_queries,
    from_ranking_keys,
    prepare_queries,
    ranking_keys,
    single_threaded_torch,
)
from .storage import IndexMetadata, Manifest, ShardInfo, open_shard, read_manifest
from .training_data import TrainingRows


logger = get_logger(__name__)

__all__ = ["DistributedSearch", "assign_shards"]

DEFAULT_TIMEOUT = 600.0
# Bytes of one process's status message (its error, utf-8, truncated).
_STATUS_BYTES = 4096
# Ranking key of a missing row (a rank with fewer than k rows): below every real key.
_NO_ROW = torch.iinfo(torch.int64).min
_PREPARING = "preparing the queries"


def assign_shards(manifest: Manifest, world_size: int) -> list[list[ShardInfo]]:
    r"""
    Split an index's shards between `world_size` processes: whole shards, balanced by rows.

    Shards are taken largest first and each goes to the process holding the fewest rows so far (then the fewest
    shards, then the lowest rank); each process's shards are listed in index order. The split depends only on the
    manifest's row counts, so every process computes the same one; with fewer shards than processes, the last
    processes get none.

    Args:
        manifest (`Manifest`): The index's manifest ([`~diffusers_dmin.storage.read_manifest`]).
        world_size (`int`): Number of processes.

    Returns:
        `list[list[ShardInfo]]`: The shards of each rank.

    Examples:
    ```py
    >>> from diffusers_dmin.distributed import assign_shards
    >>> from diffusers_dmin.storage import read_manifest
    >>> for rank, shards in enumerate(assign_shards(read_manifest("my_index"), 4)):
    ...     print(rank, [shard.name for shard in shards])  # the files node/process `rank` needs
    ```
    """
    check_int(world_size, "world_size")
    rows = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for number in sorted(range(len(manifest.shards)), key=lambda i: (-manifest.shards[i].num_rows, i)):
        rank = min(range(world_size), key=lambda r: (rows[r], len(owned[r]), r))
        owned[rank].append(number)
        rows[rank] += manifest.shards[number].num_rows
    return [[manifest.shards[i] for i in sorted(numbers)] for numbers in owned]


class DistributedSearch(ProgressBarMixin):
    r"""
    Exact search over an index whose shards are split between the processes of a `torch.distributed` job.

    Create it in every process with the same index folder (a shared file system, or a copy per machine that holds at
    least that machine's shards, see [`assign_shards`]), then call [`search`] in every process. Opening verifies
    (size, sha256) and memory-maps only this process's shards. Results equal
    `GradientIndex.from_pretrained(folder).search(...)` (exact search) bit for bit: sample ids, scores and order.

    The process group is the one given, else the default one if already initialised (e.g. by `accelerate`), else
    one created from the environment that `accelerate launch` and `torchrun` set (`WORLD_SIZE`, `RANK`,
    `MASTER_ADDR`, `MASTER_PORT`) and destroyed by [`close`] (its rendezvous store stays for the life of the process,
    and a later `DistributedSearch` creates its group on it). Without any, the search runs in this process alone.
    Rows are scored on the CPU in every process (the arithmetic of single-process search); only the top-k lists and
    the queries travel between processes.

    Args:
        folder (`str` or `os.PathLike`): A local index folder written by `save_pretrained` or `GradientIndex.build`
            (download a Hub index first, e.g. with `dmin pull`).
        group (`torch.distributed.ProcessGroup`, *optional*): The processes that share the search.
        backend (`str`, *optional*, defaults to `"gloo"`): Backend of the process group created here (`"nccl"` when
            every process has its own GPU; the messages are small, so gloo is enough).
        timeout (`float`, *optional*, defaults to 600): Seconds any collective step may wait for the other processes,
            including ranks other than 0 waiting in [`search`] for rank 0's queries.
        num_threads (`int`, *optional*): Search threads per process (default: `torch.get_num_threads()`).

    Raises:
        [`DistributedSearchError`]: On every process, when any process fails to read the manifest or verify its
            shards (the message names the rank and its error), sees another manifest, or a process stops. In one
            process alone, the original error (e.g. [`IndexCorruptError`]).

    Examples:
    ```py
    >>> # accelerate launch --multi_gpu --num_processes 2 search.py   (or: torchrun --nproc-per-node 2 search.py)
    >>> from diffusers_dmin.distributed import DistributedSearch
    >>> search = DistributedSearch("my_index")
    >>> results = search.search(queries if search.rank == 0 else None, top_k=10)  # on every rank
    >>> if search.rank == 0:
    ...     print(results[0].sample_ids, results[0].scores)
    >>> search.close()
    ```
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        *,
        group: Any = None,
        backend: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        num_threads: int | None = None,
    ):
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise ConfigError(f"`timeout` must be a positive number of seconds, but is {timeout!r}.")
        check_int(num_threads, "num_threads", optional=True)
        self._timeout = timedelta(seconds=float(timeout))
        self._group, self.rank, self.world_size, self._owns_group = _process_group(group, backend, self._timeout)
        self._device = torch.device("cpu")
        if self.world_size > 1:
            import torch.distributed as dist

            if dist.get_backend(self._group) == "nccl":
                self._device = torch.device("cuda", torch.cuda.current_device())
        self.folder = Path(os.path.expanduser(os.fspath(folder)))
        self._searches = 0
        self._rows: TrainingRows | None = None  # the attached training set
        try:
            self._open(num_threads)
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------------------------------------ opening

    def _open(self, num_threads: int | None) -> None:
        manifest, digest, error = None, bytes(32), None
        try:
            if not self.folder.is_dir():
                raise IndexNotFoundError(
                    f"`folder` must be a local index folder, but {str(self.folder)!r} is not a directory. A "
                    "distributed search opens a local copy: download a Hub index first (`dmin pull REPO_ID "
                    "--local-dir DIR`)."
                )
            manifest = read_manifest(self.folder)
            digest = hashlib.sha256((self.folder / MANIFEST_NAME).read_bytes()).digest()
        except Exception as err:
            error = err
        self._agree("reading the manifest", error)
        digests = self._all_gather(torch.frombuffer(bytearray(digest), dtype=torch.uint8), "comparing manifests")
        differing = [rank for rank, other in enumerate(digests) if not torch.equal(other, digests[0])]
        if differing:
            raise DistributedSearchError(
                f"The {MANIFEST_NAME} of process(es) {differing} differs from that of process 0 (sha256 "
                f"{bytes(digests[0].tolist()).hex()[:16]}...): every process must open the same index. Copy the "
                "same index folder to every machine."
            )
        self.manifest = manifest
        # an index without rows that checks a query spec as `GradientIndex.check_compatible` does (same code)
        self._header = GradientIndex(manifest.config, spec=manifest.spec, metadata=manifest.metadata)
        split = assign_shards(manifest, self.world_size)
        self.shards = split[self.rank]
        starts = dict(zip((s.name for s in manifest.shards), np.cumsum([0] + [s.num_rows for s in manifest.shards])))
        self._exact, self._ids, self._positions, error = None, np.empty(0, np.int64), np.empty(0, np.int64), None
        try:
            blocks = [
                open_shard(
                    self.folder,
                    info,
                    num_timesteps=manifest.num_timesteps,
                    sketch_dim=manifest.sketch_dim,
                    dtype=manifest.dtype,
                )
                for info in self.shards
            ]
            if blocks:
                self._exact = ExactSearch([b.sketches for b in blocks], manifest.dtype, num_threads=num_threads)
                self._ids = np.concatenate([b.ids for b in blocks])
                # the position of each local row in the whole index (what single-process search ranks ties by)
                self._positions = np.concatenate(
                    [np.arange(starts[b.info.name], starts[b.info.name] + b.info.num_rows) for b in blocks]
                ).astype(np.int64)
        except Exception as err:
            error = err
        self._agree("verifying this process's shards", error)
        self._check_unique_ids()
        empty = [rank for rank, shards in enumerate(split) if not shards]
        if empty and self.rank == 0:
            logger.warning(
                f"The index has {len(manifest.shards)} shard(s) for {self.world_size} processes: process(es) {empty} "
                "hold none and only take part in the merge. Save the index with more, smaller shards "
                "(`index.save_pretrained(folder, max_shard_rows=...)`) to use every process."
            )
        logger.info(
            f"Process {self.rank} of {self.world_size} holds {len(self.shards)} shard(s), {len(self._ids):,} of "
            f"{manifest.num_rows:,} rows."
        )

    def _check_unique_ids(self) -> None:
        """Sample ids must be unique across the whole index (as `GradientIndex.from_pretrained` checks): each process
        receives the ids `id % world_size == rank` of every process and checks those."""
        error = None
        ids = self._ids
        if self.world_size == 1:
            received = ids
        else:
            import torch.distributed as dist

            owner = np.mod(ids, self.world_size)
            order = np.argsort(owner, kind="stable")
            send = torch.from_numpy(ids[order]).to(self._device)
            send_counts = torch.from_numpy(np.bincount(owner, minlength=self.world_size).astype(np.int64))
            recv_counts = torch.empty(self.world_size, dtype=torch.int64, device=self._device)
            self._wait(
                lambda: dist.all_to_all_single(
                    recv_counts, send_counts.to(self._device), group=self._group, async_op=True
                ),
                "checking sample ids",
            )
            recv = torch.empty(int(recv_counts.sum()), dtype=torch.int64, device=self._device)
            self._wait(
                lambda: dist.all_to_all_single(
                    recv,
                    send,
                    output_split_sizes=recv_counts.tolist(),
                    input_split_sizes=send_counts.tolist(),
                    group=self._group,
                    async_op=True,
                ),
                "checking sample ids",
            )
            received = recv.cpu().numpy()
        unique, counts = np.unique(received, return_counts=True)
        if (counts > 1).any():
            error = IndexCorruptError(
                f"The shards of {self.folder} hold duplicate sample ids (e.g. {unique[counts > 1][:5].tolist()}); the "
                "index is damaged. Rebuild it, or re-download it with `force_download=True`."
            )
        self._agree("checking sample ids", error)

    # ------------------------------------------------------------------------------------------------ properties

    @property
    def config(self) -> DMinConfig:
        """The configuration of the index's rows."""
        return self.manifest.config

    @property
    def spec(self) -> SketchSpec | None:
        """The full spec of the index's rows (`None` for an index created from a config only)."""
        return self.manifest.spec

    @property
    def metadata(self) -> IndexMetadata:
        return self.manifest.metadata

    @property
    def num_timesteps(self) -> int:
        return self.manifest.num_timesteps

    @property
    def sketch_dim(self) -> int:
        return self.manifest.sketch_dim

    @property
    def dtype(self) -> str:
        return self.manifest.dtype

    @property
    def num_local_rows(self) -> int:
        """Rows held by this process."""
        return len(self._ids)

    def __len__(self) -> int:
        """Rows of the whole index."""
        return self.manifest.num_rows

    def __repr__(self) -> str:
        return (
            f"DistributedSearch(folder={str(self.folder)!r}, rank={self.rank}, world_size={self.world_size}, "
            f"shards={len(self.shards)}/{len(self.manifest.shards)}, rows={self.num_local_rows:,}/{len(self):,})"
        )

    def check_compatible(self, spec: SketchSpec | DMinConfig) -> None:
        """Raise [`IndexMismatchError`] naming every field in which `spec` differs from the index (as
        [`GradientIndex.check_compatible`])."""
        self._header.check_compatible(spec)

    def attach_dataset(self, dataset: Any, id_column: str | None = None) -> DistributedSearch:
        """Attach the training dataset so that results carry the training rows (`samples`), in this process (as
        [`GradientIndex.attach_dataset`]; `None` detaches it); returns `self`."""
        self._rows = None if dataset is None else TrainingRows(dataset, id_column or self.metadata.id_column)
        return self

    # ------------------------------------------------------------------------------------------------ search

    def search(
        self,
        queries: torch.Tensor | np.ndarray | None = None,
        top_k: int = 10,
        exact: bool = True,
        *,
        spec: SketchSpec | DMinConfig | None = None,
        largest: bool = True,
        sketch_dim: int | None = None,
    ) -> list[InfluenceResult]:
        r"""
        Exact search over every process's rows; call it in every process of the group.

        Rank 0's `queries`, `top_k`, `largest` and `sketch_dim` are broadcast. Other ranks pass `queries=None` (their
        other arguments are then ignored), or the same queries and arguments (checked). Every process returns the
        same results.

        Args:
            queries (`torch.Tensor` or `np.ndarray` of shape `(num_queries, T, K_q)`, *optional*):
                Query sketches, as for [`GradientIndex.search`]; required on rank 0.
            top_k (`int`, *optional*, defaults to 10): Results per query (fewer when the index has fewer rows).
            exact (`bool`, *optional*, defaults to `True`): Must be `True`: a distributed search is exact.
            spec (`SketchSpec` or `DMinConfig`, *optional*): How the queries were computed; checked first.
            largest (`bool`, *optional*, defaults to `True`): `False` returns the most negative scores first.
            sketch_dim (`int`, *optional*): Search at this divisor of K (both sides folded).

        Returns:
            `list[InfluenceResult]`: One per query: `sample_ids` (int64) and `scores` (float32), best first, equal
            to `GradientIndex.search` on the whole index; `samples` when a dataset is attached in this process.

        Raises:
            [`DistributedSearchError`]: On every process, when the queries are invalid on rank 0 (the message holds
                the `ConfigError` / `IndexMismatchError`), a process's search fails, or a process stops. A search
                in one process alone raises the original error instead.
        """
        self._searches += 1
        error, full, mine = None, None, None
        try:
            if exact is not True:
                raise ConfigError(
                    f"`exact={exact!r}`: a distributed search is exact only. Search with `exact=True`, or load the "
                    "whole index with `GradientIndex.from_pretrained` for HNSW search."
                )
            if not len(self):
                raise ConfigError("The index holds no rows; add sketches with `index.add(...)` first.")
            if self.rank == 0 and queries is None:
                raise ConfigError("`queries` is None on rank 0; rank 0 must pass the query sketches.")
            if queries is not None:
                if spec is not None:
                    self.check_compatible(spec)
                check_int(top_k, "top_k")
                with single_threaded_torch():  # the queries are checked and folded as `GradientIndex.search` does
                    folded = prepare_queries(
                        queries, num_timesteps=self.num_timesteps, sketch_dim=self.sketch_dim, search_dim=sketch_dim
                    )  # (q, T, k_s)
                    full = expand_queries(folded, self.sketch_dim).reshape(len(folded), -1).contiguous()
                mine = (full, int(top_k), bool(largest))
        except Exception as err:
            error = err
        self._agree(_PREPARING, error)

        # rank 0's queries and arguments, to everyone
        header = torch.tensor(
            [0, 0, 0] if full is None else [len(full), int(top_k), int(bool(largest))], dtype=torch.int64
        )
        num_queries, top_k, largest = self._broadcast(header, "receiving the queries from rank 0").tolist()
        largest = bool(largest)
        dim = self.num_timesteps * self.sketch_dim
        received = self._broadcast(
            full if self.rank == 0 else torch.empty((num_queries, dim), dtype=torch.float32),
            "receiving the queries from rank 0",
        )
        error = None
        if (
            mine is not None
            and self.rank != 0
            and not (
                mine[1:] == (top_k, largest) and mine[0].shape == received.shape and torch.equal(mine[0], received)
            )
        ):
            error = ConfigError(
                "This process passed other queries, `top_k` or `largest` than rank 0. Pass the same ones on every "
                "process, or `queries=None` on ranks other than 0."
            )
        self._agree("checking that every process searches the same queries", error)

        k = min(top_k, len(self))
        keys = torch.full((num_queries, k), _NO_ROW, dtype=torch.int64)
        ids = torch.full((num_queries, k), -1, dtype=torch.int64)
        error = None
        try:
            if self._exact is not None:
                local_k = min(k, self.num_local_rows)
                positions, scores = self._exact.search(received, local_k, largest=largest)
                scores = torch.from_numpy(scores if largest else -scores)  # the order the search ranked them in
                keys[:, :local_k] = ranking_keys(scores, torch.from_numpy(self._positions[positions]))
                ids[:, :local_k] = torch.from_numpy(self._ids[positions])
        except Exception as err:
            error = err
        self._agree("searching this process's shards", error)

        all_keys = torch.cat(self._all_gather(keys, "merging the results"), dim=1)
        all_ids = torch.cat(self._all_gather(ids, "merging the results"), dim=1)
        best, order = torch.topk(all_keys, k, dim=1)
        scores, _ = from_ranking_keys(best)
        if not largest:
            scores = -scores
        sample_ids = torch.gather(all_ids, 1, order).numpy()
        scores = scores.numpy()
        results = []
        for row_ids, row_scores in zip(sample_ids, scores):
            samples = self._rows.rows(row_ids) if self._rows is not None else None
            results.append(InfluenceResult(sample_ids=row_ids, scores=row_scores.astype(np.float32), samples=samples))
        return results

    def _abort(self, error: BaseException) -> None:
        """On rank 0, when it fails before its first `search` (e.g. computing the queries): report `error` to the
        other processes, which wait in `search(None)`, so that they stop with it instead of a lost connection."""
        if self.rank == 0 and self._searches == 0 and self.world_size > 1:
            self._searches += 1
            with contextlib.suppress(DistributedSearchError):
                self._agree(_PREPARING, error)

    def close(self) -> None:
        """Destroy the process group if this object created it (call it in every process); idempotent."""
        if getattr(self, "_owns_group", False):
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._owns_group = False

    def __enter__(self) -> DistributedSearch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ collectives

    def _wait(self, start: Callable[[], Any], what: str) -> None:
        """Start a collective (`start()` returns its work) and wait for it: any error of starting or waiting, e.g.
        torch.distributed's `DistError` of a connection that a stopped process closed, raises
        [`DistributedSearchError`]."""
        try:
            start().wait(timeout=self._timeout)
        except Exception as err:
            raise DistributedSearchError(
                f"Process {self.rank} of {self.world_size} stopped waiting while {what}: {err}. Another process of the "
                "search failed (see its error), stopped, or did not reach this step within the timeout "
                f"({self._timeout.total_seconds():g} s). Every process must open the same index and call `search` "
                "together."
            ) from err

    def _all_gather(self, tensor: torch.Tensor, what: str) -> list[torch.Tensor]:
        if self.world_size == 1:
            return [tensor]
        import torch.distributed as dist

        local = tensor.contiguous().to(self._device)
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        self._wait(lambda: dist.all_gather(out, local, group=self._group, async_op=True), what)
        return [t.cpu() for t in out]

    def _broadcast(self, tensor: torch.Tensor, what: str) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        local = tensor.contiguous().to(self._device)
        source = 0 if self._group is None else dist.get_global_rank(self._group, 0)
        self._wait(lambda: dist.broadcast(local, source, group=self._group, async_op=True), what)
        return local.cpu()

    def _agree(self, what: str, error: BaseException | None) -> None:
        """Exchange every process's status; raise on every process if any failed."""
        if self.world_size == 1:
            if error is not None:
                raise error
            return
        status = torch.zeros(_STATUS_BYTES, dtype=torch.uint8)
        if error is not None:
            text = f"{type(error).__name__}: {error}".encode()[: _STATUS_BYTES - 5]
            status[0] = 1
            status[1:5] = torch.tensor(list(len(text).to_bytes(4, "little")), dtype=torch.uint8)
            status[5 : 5 + len(text)] = torch.tensor(list(text), dtype=torch.uint8)
        failures = {}
        for rank, other in enumerate(self._all_gather(status, what)):
            if other[0]:
                length = int.from_bytes(bytes(other[1:5].tolist()), "little")
                failures[rank] = bytes(other[5 : 5 + length].tolist()).decode("utf-8", errors="replace")
        if failures:
            lines = "\n".join(f"  process {rank}: {message}" for rank, message in failures.items())
            raise DistributedSearchError(
                f"The distributed search failed while {what}, on {len(failures)} of {self.world_size} processes:\n"
                f"{lines}",
                failures,
            ) from error


def _process_group(group: Any, backend: str | None, timeout: timedelta) -> tuple[Any, int, int, bool]:
    """(group, rank, world_size, created here) for `group`, the default group, or one created from the
    environment; (None, 0, 1, False) when this process runs alone."""
    import torch.distributed as dist

    if backend is not None and backend not in ("gloo", "nccl"):
        raise ConfigError(f"`backend` must be 'gloo' or 'nccl', but is {backend!r}.")
    if group is not None:
        if not dist.is_available() or not dist.is_initialized():
            raise ConfigError("`group` was given but torch.distributed is not initialised.")
        return group, dist.get_rank(group), dist.get_world_size(group), False
    if dist.is_available() and dist.is_initialized():
        return None, dist.get_rank(), dist.get_world_size(), False
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    except ValueError:
        raise ConfigError(f"The environment variable WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer.")
    if world_size <= 1:
        return None, 0, 1, False
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world_size} but {missing} are not set: start the processes with `accelerate launch` or "
            "`torchrun`, or initialise torch.distributed yourself and pass `group=`."
        )
    if not dist.is_available():
        raise ConfigError("This torch build has no torch.distributed; install a torch build with it.")
    try:
        rank = int(os.environ["RANK"])
    except ValueError:
        raise ConfigError(f"The environment variable RANK={os.environ['RANK']!r} is not an integer.")
    _init_default_group(backend or "gloo", rank, world_size, timeout)
    return None, dist.get_rank(), dist.get_world_size(), True


# The rendezvous store (TCPStore at MASTER_ADDR:MASTER_PORT, served by rank 0) of the groups created here, per
# (address, port, rank, world size): [store, groups created on it]. It lives as long as the process, and each group
# gets its own key prefix on it. A fresh store per group (what `init_process_group()` from the environment does)
# raced when the group was created again in the same processes (a `DistributedSearch` after `close()`, or after an
# open that failed on some process): a process could reach rank 0's previous store server, at the same port, before
# rank 0 had closed it, and then died of a raw `DistNetworkError` ("Failed to recv ... Connection was likely
# closed") or connected to the previous group's stale addresses, while rank 0 timed out waiting for it.
_STORES: dict[tuple[str, str, int, int], list[Any]] = {}


def _init_default_group(backend: str, rank: int, world_size: int, timeout: timedelta) -> None:
    """Create the default process group from the environment on this module's rendezvous store; a failure to
    connect (a process that did not come, or died) raises [`DistributedSearchError`]."""
    import torch.distributed as dist

    address, port = os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]
    key = (address, port, rank, world_size)
    try:
        if key not in _STORES:
            store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size, timeout=timeout))
            _STORES[key] = [store, 0]
        entry = _STORES[key]
        entry[0].set_timeout(timeout)
        entry[1] += 1  # every process creates its groups in the same order, so the prefixes agree
        # (a store of torchelastic's agent outlives restarted workers: their keys differ by the restart count)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        store = dist.PrefixStore(f"diffusers_dmin/{restart}/group{entry[1]}", entry[0])
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    except RuntimeError as err:  # torch.distributed.DistError (store), or gloo's RuntimeError (connecting)
        reason = f"{type(err).__name__}: {str(err).rstrip('.')}"
        raise DistributedSearchError(
            f"Process {rank} of {world_size} could not connect to the other processes (rendezvous at "
            f"{address}:{port}) within the timeout ({timeout.total_seconds():g} s): {reason}. Another process of the "
            "search failed (see its error), stopped, or did not start. Start every process with the same "
            "MASTER_ADDR, MASTER_PORT and WORLD_SIZE."
        ) from err
