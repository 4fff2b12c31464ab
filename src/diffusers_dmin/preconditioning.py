"""The query preconditioner of an index, one owner for its lifecycle (like [`graph`] for the HNSW graph): fitted in
memory, saved in a folder, or still on the Hub (verified against the manifest's sha256 before it is read); fitted over
the index's rows, dropped when rows are added, and applied to a search's folded queries."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .errors import ConfigError, IndexCorruptError, check_int
from .folder import StoredFile
from .logging import get_logger
from .precondition import QueryPreconditioner
from .search import ExactSearch, single_threaded_torch
from .sketch import fold_sketch


logger = get_logger(__name__)

__all__ = ["IndexPreconditioner"]


class IndexPreconditioner:
    """The preconditioner of one index: `preconditioner` (fitted or loaded, or None) and `file` (the saved
    `preconditioner.safetensors` listed in the manifest, or None)."""

    def __init__(self):
        self.preconditioner: QueryPreconditioner | None = None
        self.file: StoredFile | None = None

    def folder_args(self) -> dict[str, Any]:
        """The preconditioner's arguments of [`~folder.write_index_folder`] (a saved file is copied, not rewritten)."""
        return {
            "preconditioner": self.preconditioner if self.file is None else None,
            "preconditioner_file": self.file,
        }

    def use_file(self, file: StoredFile) -> None:
        """A loaded index: its manifest lists this file (read on first use)."""
        self.file = file

    def saved(self, file: StoredFile | None) -> None:
        """The preconditioner was just written to `file`: it now backs the one in memory."""
        if file is not None:
            self.file = file

    def drop(self) -> None:
        """Rows were added: the preconditioner no longer describes the rows."""
        if self.preconditioner is not None or self.file is not None:
            logger.info("New rows: the fitted query preconditioner is dropped; refit it with `fit_preconditioner`.")
            self.preconditioner, self.file = None, None

    def get(self, num_timesteps: int, sketch_dim: int) -> QueryPreconditioner | None:
        """The preconditioner (read from its file, downloaded if needed and verified, on first use), or None."""
        if self.preconditioner is None and self.file is not None:
            path = self.file.local_path(download=True)
            if path is None:
                raise IndexCorruptError(f"The index lists {self.file.name}, but it could not be found or downloaded.")
            self.file.verify("preconditioner file", path)
            self.preconditioner = QueryPreconditioner.load(
                path, num_timesteps=num_timesteps, sketch_dim=self._saved_dim(num_timesteps, sketch_dim)
            )
        return self.preconditioner

    def _saved_dim(self, num_timesteps: int, sketch_dim: int) -> int:
        """The K the saved preconditioner was fitted at: the manifest records its file's shape as `(T, K)`."""
        info = self.file.info
        shape = info.shape
        if shape is None or len(shape) != 2 or shape[0] != num_timesteps or not shape[1] or sketch_dim % shape[1]:
            raise IndexCorruptError(
                f"The manifest records {info.name} with shape {shape}; expected (T={num_timesteps}, a divisor of "
                f"K={sketch_dim})."
            )
        return int(shape[1])

    def fit(
        self, rows: ExactSearch, damping: float, *, center: bool, sketch_dim: int, batch_rows: int
    ) -> QueryPreconditioner:
        """[`QueryPreconditioner.fit`] over all `rows` folded to `sketch_dim`, read `batch_rows` at a time."""
        check_int(batch_rows, "batch_rows")
        num_timesteps, k_rows = rows.num_timesteps, rows.sketch_dim

        def batches():
            for start in range(0, rows.num_rows, batch_rows):
                block = rows.gather(np.arange(start, min(start + batch_rows, rows.num_rows)))
                yield fold_sketch(block.reshape(-1, num_timesteps, k_rows), sketch_dim)

        with single_threaded_torch():
            self.preconditioner = QueryPreconditioner.fit(batches(), damping=damping, center=center)
        self.file = None
        return self.preconditioner

    def apply(self, folded: torch.Tensor, precondition: Any, *, num_timesteps: int, sketch_dim: int) -> torch.Tensor:
        """`folded` queries `(q, T, k)` preconditioned (`precondition=True`), with clear errors when the index has no
        preconditioner or it was fitted at another sketch dimension."""
        if precondition is not True:
            raise ConfigError(f"`precondition` must be True or False, but is {precondition!r}.")
        pre = self.get(num_timesteps, sketch_dim)
        if pre is None:
            raise ConfigError(
                "`precondition=True` needs a fitted preconditioner: call `index.fit_preconditioner(damping=...)` "
                "first (this index has none saved)."
            )
        if pre.sketch_dim != folded.shape[-1]:
            raise ConfigError(
                f"The preconditioner was fitted at sketch_dim={pre.sketch_dim}, but this search runs at "
                f"{folded.shape[-1]}; pass `sketch_dim={pre.sketch_dim}` or refit with "
                f"`fit_preconditioner(..., sketch_dim={folded.shape[-1]})`."
            )
        return pre.apply(folded)
