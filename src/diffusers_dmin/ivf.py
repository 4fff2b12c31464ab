"""The FAISS IVF index of an index, one owner for its lifecycle (like `graph.py` for HNSW): in memory, saved in a
folder, or still on the Hub; built, loaded (validated completely before FAISS sees the arrays), extended with rows
added since, and calibrated to a recall target."""

from __future__ import annotations

from typing import Any

import torch

from .calibration import RecallCalibration
from .faiss_backend import _MIN_TRAIN_PQ, FaissIVFSearch
from .folder import StoredFile
from .logging import get_logger
from .search import ExactSearch
from .storage import FaissInfo


logger = get_logger(__name__)

__all__ = ["IndexIVF"]


class IndexIVF:
    """The FAISS index of one index: `ivf` (in memory, or None), `file` (the saved `faiss_ivf.safetensors`, or None),
    `dirty` (the index in memory, or its search settings, differ from `file`) and `calibration`."""

    def __init__(self):
        self.ivf: FaissIVFSearch | None = None
        self.file: StoredFile | None = None
        self.dirty = False
        self.calibration: RecallCalibration | None = None
        self.device = "cpu"

    @property
    def params(self) -> dict[str, Any] | None:
        """`codec`, `sketch_dim`, `nlist`, `pq_m`, `nprobe`, `num_candidates` (None when there is no FAISS index)."""
        source = self.ivf if self.ivf is not None else (self.file.info if self.file is not None else None)
        if source is None:
            return None
        return {
            key: getattr(source, key) for key in ("codec", "sketch_dim", "nlist", "pq_m", "nprobe", "num_candidates")
        }

    def describe(self) -> str:
        if self.ivf is not None:
            return f"IVF-{self.ivf.codec}, {self.ivf.num_rows} rows in memory"
        if self.file is not None:
            return f"IVF-{self.file.info.codec}, saved ({self.file.info.num_rows} rows)"
        return "none"

    def folder_args(self) -> dict[str, Any]:
        """The FAISS index's arguments of [`~folder.write_index_folder`]."""
        return {
            "faiss": self.ivf,
            "faiss_file": self.file,
            "faiss_dirty": self.dirty,
            "faiss_calibration": self.calibration,
        }

    def use_file(self, file: StoredFile) -> None:
        """A loaded index: its manifest lists this FAISS file (loaded on first use)."""
        info: FaissInfo = file.info
        self.file, self.calibration = file, info.calibration

    def saved(self, file: StoredFile | None) -> None:
        """The index was just written to `file`: it now backs the index in memory."""
        if self.ivf is not None and file is not None and (self.dirty or self.file is None):
            self.file, self.dirty = file, False

    def build(self, rows: ExactSearch, *, progress: bool, device: str = "cpu", **kwargs: Any) -> None:
        """Train and fill a new IVF index over all `rows` ([`FaissIVFSearch.from_rows`]), replacing any other."""
        self.ivf = FaissIVFSearch.from_rows(rows, progress=progress, device=device, **kwargs)
        self.device = device
        self.dirty, self.file, self.calibration = True, None, None

    def extend(self, rows: ExactSearch, *, progress: bool) -> None:
        """Add the rows the index in memory does not hold yet."""
        if self.ivf is not None and self.ivf.num_rows < rows.num_rows:
            self.ivf.add_rows(rows, progress=progress)
            self.dirty = True

    def get(self, rows: ExactSearch, *, progress: bool) -> FaissIVFSearch:
        """The index, ready to search all `rows`: loaded from its file (downloaded if needed; sha256 and every array
        checked first), rebuilt with the file's parameters when the file is absent, or built with the defaults; then
        extended with rows added since."""
        if self.ivf is None and self.file is not None:
            info: FaissInfo = self.file.info
            source = self.file.local_path(download=True)
            if source is None:
                logger.warning(f"{info.name} is listed in the manifest but absent; rebuilding the FAISS index.")
                calibration = self.calibration
                self.build(
                    rows,
                    progress=progress,
                    sketch_dim=info.sketch_dim,
                    nlist=info.nlist,
                    codec=info.codec,
                    pq_m=info.pq_m or None,
                    nprobe=info.nprobe,
                    num_candidates=info.num_candidates,
                )
                self.calibration = calibration
            else:
                self.ivf = FaissIVFSearch.load_info(source, info, rows.num_timesteps, device=self.device)
                self.dirty = False
        if self.ivf is None:
            # PQ trains 256 centroids per sub-quantizer on at least 39 rows each (FAISS's minimum)
            codec = "pq" if rows.num_rows >= _MIN_TRAIN_PQ else "sq8"
            logger.info(f"The index has no FAISS index yet; building IVF-{codec} with the default parameters.")
            self.build(rows, progress=progress, codec=codec)
        self.extend(rows, progress=progress)
        return self.ivf

    def calibrate(self, rows: ExactSearch, queries: torch.Tensor, **kwargs: Any) -> RecallCalibration:
        """[`FaissIVFSearch.calibrate`] on the index; the result is kept for the manifest."""
        ivf = self.get(rows, progress=False)
        self.calibration = ivf.calibrate(rows, queries, **kwargs)
        self.dirty = True  # the manifest entry changes (nprobe, num_candidates, calibration)
        return self.calibration
