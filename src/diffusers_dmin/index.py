"""[`GradientIndex`]: the gradient-sketch index of a training set (exact and HNSW search, save/load, Hub).

The facade keeps state (rows, ids, spec, metadata, noise, graph, attached dataset) and composes the modules that own
each concern: [`backends`] (which backend a search or calibration runs on, query spec checks), [`search`] (query
folding, exact search, candidate re-scoring), [`graph`], [`ivf`] and [`preconditioning`] (the lifecycles of the HNSW
graph, the FAISS index and the query preconditioner), [`folder`] (reading and writing index folders, checking new
rows), [`storage`] (shards and the manifest), [`hub`] (locating, pulling and pushing).

Mixins own the public methods of three concerns, with their documentation: [`~hub_mixin.IndexHubMixin`]
(`save_pretrained`, `from_pretrained`, `push_to_hub`, through the two hooks `_from_folder` and `_written` defined
here), [`~build.IndexBuildMixin`] (`build`, over a dataset, finished through the same hooks) and
[`~backends.ApproximateSearchMixin`] (`build_hnsw`, `build_faiss`, `calibrate` and their parameters, on the graph and
IVF state kept here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .backends import ApproximateSearchMixin, check_query_spec, search_backend
from .build import IndexBuildMixin
from .config import DMinConfig, SketchSpec
from .errors import ConfigError
from .folder import StoredFile, new_block, read_index_folder, write_index_folder
from .graph import IndexGraph
from .hub import HubLocation
from .hub_mixin import IndexHubMixin
from .ivf import IndexIVF
from .logging import ProgressBarMixin, get_logger
from .outputs import InfluenceResult
from .precondition import QueryPreconditioner
from .preconditioning import IndexPreconditioner
from .search import ExactSearch, IdPositions, check_search_dim
from .storage import IndexMetadata, Manifest, read_noise, rows_config
from .training_data import TrainingRows


logger = get_logger(__name__)

__all__ = ["GradientIndex"]


class GradientIndex(ProgressBarMixin, ApproximateSearchMixin, IndexHubMixin, IndexBuildMixin):
    r"""
    The compressed-gradient index of a training set: one `(T, K)` sketch per training sample, searchable by inner
    product (DMin). Rows live in memory until saved, and are memory-mapped from verified shards once loaded.

    An index is identified by its [`SketchSpec`] (config plus model-dependent identity: family, target, timesteps,
    latent shape, selected parameters and their fingerprint). Queries computed under another spec raise
    [`IndexMismatchError`]. An index can also be created from a [`DMinConfig`] alone: its `spec` is then `None`
    ("unspecified") and queries can only be checked against the config and their shape, not against the model.

    Args:
        config (`DMinConfig`, *optional*): The configuration of the rows; taken from `spec` when omitted.
        spec (`SketchSpec`, *optional*): The full spec of the rows (the normal way: `sketcher.spec`).
        noise (`torch.Tensor`, *optional*): The fixed noise the sketches were computed with (`sketcher.noise`);
            saved as `noise.safetensors` for audit.
        metadata (`IndexMetadata` or `dict`, *optional*): Provenance (base model, adapter, dataset, id column).

    Examples:
    ```py
    >>> import torch
    >>> from diffusers_dmin import DMinConfig, GradientIndex
    >>> config = DMinConfig(num_timesteps=2, sketch_dim=64)
    >>> sketches = torch.nn.functional.normalize(torch.randn(100, 2, 64), dim=-1)
    >>> index = GradientIndex.from_sketches(sketches, config=config)
    >>> result = index.search(sketches[:1], top_k=3)[0]
    >>> int(result.sample_ids[0])
    0
    >>> index.save_pretrained("my_index")
    >>> GradientIndex.from_pretrained("my_index").search(sketches[:1], top_k=3)[0].sample_ids.tolist()[0]
    0
    ```
    """

    def __init__(
        self,
        config: DMinConfig | None = None,
        *,
        spec: SketchSpec | None = None,
        noise: torch.Tensor | np.ndarray | None = None,
        metadata: IndexMetadata | Mapping[str, Any] | None = None,
    ):
        config = rows_config(config, spec)
        metadata = IndexMetadata.coerce(metadata)
        self._config = config
        self._spec = spec
        self._metadata = metadata
        self._blocks: list = []  # folder.Block: rows, ids and the shard holding them
        self._ids = np.empty(0, dtype=np.int64)
        self._exact: ExactSearch | None = None
        self._positions: IdPositions | None = None  # row positions of sample ids
        self._noise: torch.Tensor | None = None
        self._noise_file: StoredFile | None = None
        if noise is not None:
            self._noise = _as_noise(noise)
        self._graph = IndexGraph()  # the HNSW graph: in memory, saved, or to download
        self._ivf = IndexIVF()  # the FAISS IVF index: in memory, saved, or to download
        self._pre = IndexPreconditioner()  # the query preconditioner: fitted, saved, or to download
        self._warned: set[str] = set()  # one-time warnings given (backends.warn_once)
        self._source_folder: Path | None = None
        self._rows: TrainingRows | None = None  # the attached training set

    # ------------------------------------------------------------------------------------------------ properties

    @property
    def config(self) -> DMinConfig:
        """The [`DMinConfig`] of the rows."""
        return self._config

    @property
    def spec(self) -> SketchSpec | None:
        """The [`SketchSpec`] of the rows, or `None` for an index created from a config only."""
        return self._spec

    @property
    def metadata(self) -> IndexMetadata:
        """Provenance of the rows (base model, adapter, dataset, id column)."""
        return self._metadata

    @property
    def num_timesteps(self) -> int:
        """T, the number of timesteps of each sketch."""
        return self._config.num_timesteps

    @property
    def sketch_dim(self) -> int:
        """K, the stored sketch dimension (searches can use any divisor of it, see `sketch_dim=` of [`search`])."""
        return self._config.sketch_dim

    @property
    def dtype(self) -> str:
        """Storage dtype of the sketches."""
        return self._config.dtype

    @property
    def ids(self) -> np.ndarray:
        """The sample ids of all rows, in row order (int64, a copy)."""
        return self._ids.copy()

    @property
    def noise(self) -> torch.Tensor | None:
        """The fixed noise saved with the index (float32), or `None`. Verified against its sha256 when loaded."""
        if self._noise is None and self._noise_file is not None:
            self._noise = read_noise(self._noise_file.folder, self._noise_file.info)
        return self._noise

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        hnsw = self._graph.describe()
        return (
            f"GradientIndex(num_rows={len(self)}, num_timesteps={self.num_timesteps}, sketch_dim={self.sketch_dim}, "
            f"dtype={self.dtype!r}, spec={'set' if self._spec is not None else 'unspecified'}, hnsw={hnsw}, "
            f"faiss={self._ivf.describe()})"
        )

    # ------------------------------------------------------------------------------------------------ building

    @classmethod
    def from_sketches(
        cls,
        sketches: torch.Tensor | np.ndarray,
        ids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        config: DMinConfig | None = None,
        *,
        spec: SketchSpec | None = None,
        noise: torch.Tensor | np.ndarray | None = None,
        **metadata: Any,
    ) -> GradientIndex:
        r"""
        Create an index from precomputed sketches.

        Args:
            sketches (`torch.Tensor` or `np.ndarray` of shape `(N, T, K)`): Sketches of the training samples (e.g.
                from [`GradientSketcher`]); stored in `config.dtype`.
            ids (array-like of shape `(N,)`, *optional*): Unique integer sample ids (int64); defaults to `0 .. N-1`.
            config (`DMinConfig`, *optional*): The configuration of the sketches; without `spec` the index is
                "unspecified" (`spec` is `None`) and queries are checked against this config only.
            spec (`SketchSpec`, *optional*): The full spec (`sketcher.spec`); the normal way to build an index.
            noise (`torch.Tensor`, *optional*): The fixed noise (`sketcher.noise`), saved for audit.
            **metadata: Provenance for the manifest and dataset card: the fields of [`IndexMetadata`]
                (`base_model_id`, `adapter_id`, `dataset_id`, `id_column`, ..., `extra`).

        Returns:
            [`GradientIndex`]
        """
        index = cls(config, spec=spec, noise=noise, metadata=IndexMetadata.from_kwargs(**metadata))
        index.add(sketches, ids)
        return index

    def add(
        self,
        sketches: torch.Tensor | np.ndarray,
        ids: Sequence[int] | np.ndarray | torch.Tensor | None = None,
    ) -> None:
        r"""
        Append training samples. Saved shards are never rewritten: the next [`save_pretrained`] to the same folder
        adds new shards, and a loaded HNSW graph is extended with the new rows.

        Args:
            sketches (`torch.Tensor` or `np.ndarray` of shape `(n, T, K)`): Sketches with the index's T and K.
            ids (array-like of shape `(n,)`, *optional*): New unique integer ids. Defaults to consecutive ids after
                the largest existing id (`0 .. n-1` for an empty index).

        Raises:
            [`IndexMismatchError`]: T or K differ from the index's.
            [`ConfigError`]: Bad shapes, non-integer or duplicate ids (also against existing rows).
        """
        block = new_block(sketches, ids, self._ids, self._config)
        self._blocks.append(block)
        self._ids = np.concatenate([self._ids, block.ids])
        self._pre.drop()
        self._exact = None
        self._positions = None
        self._graph.extend(self._exact_search(), progress=self._progress_enabled())
        self._ivf.extend(self._exact_search(), progress=self._progress_enabled())

    # ------------------------------------------------------------------------------------------------ search

    def check_compatible(self, spec: SketchSpec | DMinConfig) -> None:
        r"""
        Raise [`IndexMismatchError`] naming every field in which `spec` differs from the index's rows.

        Storage dtype is ignored, and so is the sketch dimension when one divides the other (sketches fold). For an
        index created from a config only, just the config is compared (a warning says so once).

        Args:
            spec (`SketchSpec` or `DMinConfig`): How the queries were computed (e.g. `sketcher.spec`).
        """
        check_query_spec(
            self._spec,
            self._config,
            spec,
            warned=self._warned,
        )

    def search(
        self,
        queries: torch.Tensor | np.ndarray,
        top_k: int = 10,
        exact: bool = True,
        *,
        spec: SketchSpec | DMinConfig | None = None,
        largest: bool = True,
        sketch_dim: int | None = None,
        rescore: bool = True,
        ef: int | None = None,
        backend: Literal["exact", "hnsw", "faiss"] | None = None,
        nprobe: int | None = None,
        precondition: bool = False,
    ) -> list[InfluenceResult]:
        r"""
        Find the training samples whose sketches have the largest inner products with each query
        ([`~backends.search_backend`] picks and runs the backend).

        Args:
            queries (`torch.Tensor` or `np.ndarray` of shape `(num_queries, T, K_q)`): Query sketches; `K_q` equals
                the index's K, a multiple of it (folded) or `sketch_dim`. For one query pass `queries[None]`.
            top_k (`int`, *optional*, defaults to 10): Results per query (fewer when the index has fewer rows).
            exact (`bool`, *optional*, defaults to `True`): Exact search over all rows; `False` searches with the
                FAISS index when the index has one, else with the HNSW graph (loaded or built on first use).
            spec (`SketchSpec` or `DMinConfig`, *optional*): How the queries were computed; see [`check_compatible`].
            largest (`bool`, *optional*, defaults to `True`): `False` returns the most negative scores first.
            sketch_dim (`int`, *optional*): Search at this divisor of K, both sides folded (for HNSW, the graph must
                have been built at a divisor of it).
            rescore (`bool`, *optional*, defaults to `True`): HNSW only: re-score `max(top_k, ef)` candidates exactly;
                `False` returns hnswlib's scores (the graph dimension must then equal the search dimension).
            ef (`int`, *optional*): HNSW only: candidate list size for this call (default: the graph's `ef`).
            backend (`str`, *optional*): `"exact"`, `"hnsw"` or `"faiss"` (see [`build_faiss`]); overrides `exact`.
            nprobe (`int`, *optional*): FAISS only: lists probed for this call (default: the index's).
            precondition (`bool`, *optional*, defaults to `False`): Multiply each (folded) query by the index's damped
                inverse sketch covariance per timestep before scoring (TRAK's kernel at DMin's cost; see
                [`fit_preconditioner`], which must have been called at the search's sketch dimension, or an index
                saved after it). Only the query changes: exact search, the graph and the FAISS index are the same.

        Returns:
            `list[InfluenceResult]`: One per query: `sample_ids` (int64) and `scores` (float32 inner products),
            best first; `samples` holds the training rows when a dataset is attached ([`attach_dataset`]).

        Raises:
            [`IndexMismatchError`]: The queries' spec, T or K do not match the index.
        """
        if spec is not None:
            self.check_compatible(spec)
        self._check_nonempty()
        positions, scores = search_backend(
            self._exact_search(),
            self._graph,
            self._ivf,
            queries,
            top_k,
            exact=exact,
            backend=backend,
            largest=largest,
            search_dim=sketch_dim,
            rescore=rescore,
            ef=ef,
            nprobe=nprobe,
            progress=self._progress_enabled(),
            config=self._config,
            transform=None if precondition is False else self._preconditioned(precondition),
        )
        results = []
        for row_positions, row_scores in zip(positions, scores):
            sample_ids = self._ids[row_positions]
            samples = self._rows.rows(sample_ids) if self._rows is not None else None
            results.append(
                InfluenceResult(sample_ids=sample_ids, scores=row_scores.astype(np.float32), samples=samples)
            )
        return results

    @property
    def preconditioner(self) -> QueryPreconditioner | None:
        """The fitted (or saved) [`~precondition.QueryPreconditioner`], or `None`. Loaded and verified against the
        manifest's sha256 on first access."""
        return self._pre.get(self.num_timesteps, self.sketch_dim)

    def fit_preconditioner(
        self, damping: float, *, center: bool = False, sketch_dim: int | None = None, batch_rows: int = 4096
    ) -> QueryPreconditioner:
        r"""
        Fit the query preconditioner of [`search`]`(precondition=True)` on this index's own rows
        ([`~preconditioning.IndexPreconditioner.fit`]): per timestep the damped inverse `(Sigma_t + lambda_t I)^-1`
        of the rows' K x K second moment (covariance with `center=True`), `lambda_t = damping * tr(Sigma_t) / K`.
        Saved with the index (`preconditioner.safetensors`; `T K^2` float32 numbers: 640 MiB at T = 10, K = 4,096).

        Args:
            damping (`float`): Relative damping, > 0. Choose it on held-out queries: on our benchmarks
                (benchmarks/quality/estimator_options.py, held-out query halves) the best values were 10 for the tiny
                SD's detection and 0.1 for the digits DDPM's LDS, and preconditioning lowered the digits' class
                detection; it is therefore off by default.
            center (`bool`, *optional*, defaults to `False`): Also subtract the rows' mean sketch from queries
                (rankings are then those of fully centred sketches).
            sketch_dim (`int`, *optional*): Fit at this divisor of K (the rows folded), for searches at that
                `sketch_dim`; defaults to K.
            batch_rows (`int`, *optional*, defaults to 4096): Rows read at once.

        Returns:
            [`~precondition.QueryPreconditioner`]: The fitted preconditioner (also kept by the index).
        """
        self._check_nonempty()
        k = check_search_dim(sketch_dim, self.sketch_dim) if sketch_dim is not None else self.sketch_dim
        return self._pre.fit(self._exact_search(), damping, center=center, sketch_dim=k, batch_rows=batch_rows)

    def _preconditioned(self, precondition: Any):
        return lambda folded: self._pre.apply(
            folded, precondition, num_timesteps=self.num_timesteps, sketch_dim=self.sketch_dim
        )

    def get_sketches(self, sample_ids: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        r"""
        The stored sketches of the given sample ids as a float32 tensor of shape `(n, T, K)`.

        Raises:
            [`ConfigError`]: An id is not in the index.
        """
        if self._positions is None:
            self._positions = IdPositions(self._ids)
        positions = self._positions(sample_ids)
        return self._exact_search().gather(positions).reshape(len(positions), self.num_timesteps, self.sketch_dim)

    # ------------------------------------------------------------------------------------------------ dataset

    def attach_dataset(self, dataset: Any, id_column: str | None = None) -> GradientIndex:
        r"""
        Attach the training dataset so that search results carry the retrieved training rows (`samples`).

        Args:
            dataset (`datasets.Dataset`, or any sequence of dicts): The training set; `None` detaches it.
            id_column (`str`, *optional*): Column holding the sample ids. Defaults to the index's recorded
                `id_column`; without one, an id is the row position in `dataset`.

        Returns:
            [`GradientIndex`]: `self`, for chaining.
        """
        self._rows = None if dataset is None else TrainingRows(dataset, id_column or self._metadata.id_column)
        return self

    # ------------------------------------------------------------------------------------------------ persistence

    @classmethod
    def _from_folder(
        cls,
        folder: Path,
        *,
        origin: HubLocation | None = None,
        manifest: Manifest | None = None,
        load_hnsw: bool = False,
    ) -> GradientIndex:
        """Hook of [`~hub_mixin.IndexHubMixin`] and [`~build.IndexBuildMixin`]: the index in `folder`
        ([`~folder.read_index_folder`]); `load_hnsw` loads (and extends) a saved graph now."""
        loaded = read_index_folder(folder, origin=origin, manifest=manifest)
        index = cls(loaded.manifest.config, spec=loaded.manifest.spec, metadata=loaded.manifest.metadata)
        index._blocks, index._ids, index._noise_file = loaded.blocks, loaded.ids, loaded.noise
        if loaded.graph is not None:
            index._graph.use_file(loaded.graph)
        if loaded.faiss is not None:
            index._ivf.use_file(loaded.faiss)
        if loaded.preconditioner is not None:
            index._pre.use_file(loaded.preconditioner)
        index._source_folder = folder
        logger.info(f"Loaded {index!r} from {folder}.")
        if load_hnsw and index._graph.file is not None:
            index._graph.get(
                index._exact_search(), index._graph.file.info.sketch_dim, progress=index._progress_enabled()
            )
        return index

    def _written(
        self, folder: Path, *, link: bool, repo_id: str | None = None, max_shard_rows: int | None = None
    ) -> Manifest:
        """Hook of [`~hub_mixin.IndexHubMixin`]: write this index into `folder` ([`~folder.write_index_folder`]:
        crash-safe, manifest last). A save (`link=False`) is adopted: the folder's files now back this index."""
        written = write_index_folder(
            folder,
            config=self._config,
            spec=self._spec,
            metadata=self._metadata,
            blocks=self._blocks,
            noise=self._noise,
            noise_file=self._noise_file,
            **self._graph.folder_args(),
            **self._ivf.folder_args(),
            **self._pre.folder_args(),
            source_folder=self._source_folder,
            link=link,
            repo_id=repo_id,
            max_shard_rows=max_shard_rows,
        )
        logger.info(f"Saved {len(self)} rows in {len(written.manifest.shards)} shards to {folder}.")
        if not link:
            self._blocks = written.blocks
            self._exact = None
            if self._noise is not None and self._noise_file is None:
                self._noise_file = written.noise
            self._graph.saved(written.graph)
            self._ivf.saved(written.faiss)
            self._pre.saved(written.preconditioner)
        return written.manifest

    # ------------------------------------------------------------------------------------------------ internals

    def _exact_search(self) -> ExactSearch:
        if self._exact is None:
            self._exact = ExactSearch([b.sketches for b in self._blocks], self.dtype)
        return self._exact

    def _check_nonempty(self) -> None:
        if not len(self):
            raise ConfigError("The index holds no rows; add sketches with `index.add(...)` first.")

    def _progress_enabled(self) -> bool:
        return not getattr(self, "_progress_bar_config", {}).get("disable", False)


def _as_noise(noise: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(noise, np.ndarray):
        noise = torch.from_numpy(np.array(noise))
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise ConfigError(f"`noise` must be a float tensor (e.g. `sketcher.noise`), but is {type(noise).__name__}.")
    return noise.detach().to("cpu", torch.float32).contiguous()
