"""The HNSW graph of an index, one owner for its lifecycle: in memory, saved in a folder, or still on the Hub; built,
loaded (validated completely before hnswlib reads it) and extended with rows added since."""

from __future__ import annotations

from typing import Any

import torch

from .calibration import RecallCalibration, calibrate_recall
from .constants import DEFAULT_HNSW_EF, DEFAULT_HNSW_EF_CONSTRUCTION, DEFAULT_HNSW_M, HNSW_NAME
from .errors import IndexCorruptError
from .folder import StoredFile
from .logging import get_logger
from .search import ExactSearch, HNSWSearch, rescore, single_threaded_torch
from .sketch import fold_sketch
from .storage import HNSWInfo


logger = get_logger(__name__)

__all__ = ["IndexGraph"]


class IndexGraph:
    """The graph of one index: `graph` (in memory, or None), `file` (the saved `hnsw.bin`, or None), `dirty` (the graph
    in memory differs from `file`), and `params` (`M`, `ef_construction`, `ef`: the saved graph's, or the paper's)."""

    def __init__(self):
        self.graph: HNSWSearch | None = None
        self.file: StoredFile | None = None
        self.dirty = False
        self.params = {"M": DEFAULT_HNSW_M, "ef_construction": DEFAULT_HNSW_EF_CONSTRUCTION, "ef": DEFAULT_HNSW_EF}
        self.calibration: RecallCalibration | None = None  # how `ef` was calibrated (stored in the manifest)

    def describe(self) -> str:
        if self.graph is not None:
            return f"{self.graph.num_rows} rows in memory"
        if self.file is not None:
            return f"saved ({self.file.info.num_rows} rows)"
        return "none"

    def folder_args(self) -> dict[str, Any]:
        """The graph's arguments of [`~folder.write_index_folder`]."""
        return {
            "graph": self.graph,
            "graph_file": self.file,
            "graph_dirty": self.dirty,
            "graph_calibration": self.calibration,
        }

    def use_file(self, file: StoredFile) -> None:
        """A loaded index: its manifest lists this graph file (loaded on first use)."""
        info: HNSWInfo = file.info
        self.file = file
        self.params = {"M": info.M, "ef_construction": info.ef_construction, "ef": info.ef}
        self.calibration = info.calibration

    def saved(self, file: StoredFile | None) -> None:
        """The graph was just written to `file`: it now backs the graph in memory."""
        if self.graph is not None and file is not None and (self.dirty or self.file is None):
            self.file, self.dirty = file, False

    def build(
        self,
        rows: ExactSearch,
        sketch_dim: int,
        *,
        M: int | None,
        ef_construction: int | None,
        ef: int | None,
        num_threads: int,
        seed: int,
        progress: bool,
    ) -> None:
        """Build a new graph over all `rows`, folded to `sketch_dim`, replacing any other (unset parameters: the
        current ones)."""
        params = {
            "M": self.params["M"] if M is None else M,
            "ef_construction": self.params["ef_construction"] if ef_construction is None else ef_construction,
            "ef": self.params["ef"] if ef is None else ef,
        }
        t = rows.num_timesteps
        logger.info(f"Building an HNSW graph over {rows.num_rows} rows of dimension {t}x{sketch_dim} ({params}).")
        graph = HNSWSearch(t * sketch_dim, max_elements=rows.num_rows, num_threads=num_threads, seed=seed, **params)
        graph.add_rows(rows, start=0, progress=progress)
        self.graph, self.dirty, self.file, self.params = graph, True, None, params
        self.calibration = None

    def extend(self, rows: ExactSearch, *, progress: bool) -> None:
        """Add the rows the graph in memory does not hold yet (from its own row count: an interrupted extension is
        completed by the next one)."""
        if self.graph is not None and self.graph.num_rows < rows.num_rows:
            self.graph.add_rows(rows, progress=progress)
            self.dirty = True

    def get(self, rows: ExactSearch, search_dim: int, *, progress: bool) -> HNSWSearch:
        """The graph, ready to search all `rows`: loaded from its file (downloaded if needed), else rebuilt (at the
        file's dimension, or at `search_dim`), then extended with rows added since."""
        if self.graph is None and self.file is not None:
            info = self.file.info
            source = self.file.local_path(download=True)
            if source is None:
                logger.warning(f"{HNSW_NAME} is listed in the manifest but absent; rebuilding the HNSW graph.")
                self.build(rows, info.sketch_dim, **_unset(), progress=progress)
            else:
                self.file.verify("HNSW graph", source)
                # validated completely against the manifest before hnswlib reads a byte of it
                graph = HNSWSearch.load(
                    source,
                    rows.num_timesteps * info.sketch_dim,
                    max_elements=rows.num_rows,
                    ef=info.ef,
                    num_rows=info.num_rows,
                    M=info.M,
                    ef_construction=info.ef_construction,
                )
                if graph.num_rows != info.num_rows:
                    raise IndexCorruptError(
                        f"{source} holds {graph.num_rows} rows, but the manifest expects {info.num_rows}. Delete it "
                        "to rebuild the graph, or re-download the index with `force_download=True`."
                    )
                self.graph, self.dirty = graph, False
        if self.graph is None:
            self.build(rows, search_dim, **_unset(), progress=progress)
        self.extend(rows, progress=progress)
        return self.graph

    def calibrate(
        self, rows: ExactSearch, queries: torch.Tensor, *, top_k: int, progress: bool, **kwargs: Any
    ) -> RecallCalibration:
        """Set `ef` to the smallest value whose recall@`top_k` (candidates re-scored exactly) against exact search on
        `queries` reaches the target ([`~diffusers_dmin.calibration.calibrate_recall`]; `kwargs` go there)."""
        graph = self.get(
            rows, self.file.info.sketch_dim if self.file is not None else rows.sketch_dim, progress=progress
        )
        k = min(int(top_k), rows.num_rows)
        truth, _ = rows.search(queries, k)
        k_graph = graph.dim // rows.num_timesteps
        with single_threaded_torch():
            coarse = fold_sketch(queries.reshape(len(queries), rows.num_timesteps, -1), k_graph)
            coarse = coarse.reshape(len(queries), -1)

        def search_at(ef: int):
            graph.ef = ef
            candidates, _ = graph.search(coarse, max(k, ef))
            return rescore(rows, queries, candidates, k)[0]

        previous = graph.ef
        try:
            calibration = calibrate_recall(search_at, truth, parameter="ef", low=k, high=rows.num_rows, **kwargs)
        finally:
            graph.ef = previous
        graph.ef = calibration.value
        self.params = {**self.params, "ef": calibration.value}
        self.calibration, self.dirty = calibration, True  # the manifest entry changes
        return calibration


def _unset() -> dict:
    return {"M": None, "ef_construction": None, "ef": None, "num_threads": -1, "seed": 0}
