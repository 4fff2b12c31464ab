"""Training data for a build: loading a training set ([`load_training_dataset`]), checking its columns and ids
([`DatasetView`]), and reading, decoding and preprocessing batches of rows in a torch `DataLoader` ([`BatchLoader`]).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import DatasetError, DMinError
from .images import decode_image
from .logging import quiet_local_dataset_loading
from .objectives import prepare_images
from .video import decode_video, prepare_video


__all__ = [
    "load_training_dataset",
    "TrainingRows",
    "DatasetView",
    "Batch",
    "BatchLoader",
    "collate_batch",
    "loader_worker_init",
]

_SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")
_DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


class DatasetView:
    """Columns, ids and raw (undecoded) rows of a `datasets.Dataset`."""

    def __init__(self, dataset: Any, image_column: str, prompt_column: str | None, id_column: str | None):
        import datasets

        if isinstance(dataset, (datasets.DatasetDict, datasets.IterableDatasetDict)):
            raise DatasetError(
                f"`dataset` is a {type(dataset).__name__} with the splits {list(dataset)}; pass one split, e.g. "
                f"`dataset[{next(iter(dataset), 'train')!r}]`."
            )
        if isinstance(dataset, datasets.IterableDataset):
            raise DatasetError(
                "`dataset` is a streaming IterableDataset; an index build needs random access to resume and to split "
                "rows across processes. Load it without `streaming=True` (or `Dataset.from_generator(...)`)."
            )
        if not isinstance(dataset, datasets.Dataset):
            raise DatasetError(
                f"`dataset` must be a `datasets.Dataset`, but is {type(dataset).__name__}. Load one with "
                "`datasets.load_dataset(...)`, `load_from_disk(...)` or `Dataset.from_dict(...)`."
            )
        self.column_names = list(dataset.column_names)
        for argument, column in (("image_column", image_column), ("prompt_column", prompt_column)):
            if column is not None and column not in self.column_names:
                raise DatasetError(
                    f"`{argument}={column!r}` is not a column of the dataset; its columns are {self.column_names}. "
                    f"Pass `{argument}=` naming one of them."
                )
        if id_column is not None and id_column not in self.column_names:
            raise DatasetError(
                f"`id_column={id_column!r}` is not a column of the dataset; its columns are {self.column_names}. "
                "Pass the column holding integer sample ids, or `id_column=None` to use row positions."
            )
        if len(dataset) == 0:
            raise DatasetError("`dataset` has no rows; there is nothing to index.")
        self.dataset = dataset
        self.image_column, self.prompt_column, self.id_column = image_column, prompt_column, id_column
        columns = [c for c in (image_column, prompt_column) if c is not None]
        self.rows = dataset.select_columns(columns).with_format("arrow")
        self.ids = self._read_ids()
        order = np.argsort(self.ids, kind="stable")
        self._sorted_ids, self._order = self.ids[order], order

    def __len__(self) -> int:
        return len(self.ids)

    def _read_ids(self) -> np.ndarray:
        if self.id_column is None:
            return np.arange(len(self.dataset), dtype=np.int64)
        import pyarrow as pa

        column = self.dataset.select_columns([self.id_column]).with_format("arrow")[:].column(self.id_column)
        if not pa.types.is_integer(column.type):
            raise DatasetError(
                f"`id_column={self.id_column!r}` holds {column.type} values; sample ids must be integers. Pass an "
                "integer column, or `id_column=None` to use row positions."
            )
        if column.null_count:
            row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
            raise DatasetError(f"`id_column={self.id_column!r}` has no value at row {row}; every row needs an id.")
        ids = column.to_numpy().astype(np.int64, copy=False)
        values, counts = np.unique(ids, return_counts=True)
        if len(values) != len(ids):
            duplicates = values[counts > 1][:10].tolist()
            raise DatasetError(
                f"`id_column={self.id_column!r}` holds the ids {duplicates} more than once; every row needs its own "
                "id.",
                sample_id=duplicates[0],
            )
        return np.ascontiguousarray(ids)

    def positions_of(self, ids: np.ndarray) -> np.ndarray:
        """Dataset positions of `ids`; `len(self)` for ids that are not in the dataset."""
        slots = np.searchsorted(self._sorted_ids, ids)
        slots = np.minimum(slots, len(self._sorted_ids) - 1)
        found = self._sorted_ids[slots] == ids
        return np.where(found, self._order[slots], len(self))

    def pending_positions(self, done: np.ndarray) -> np.ndarray:
        return np.flatnonzero(~np.isin(self.ids, done))


class TrainingRows:
    """The rows of an attached training set by sample id (for search results): through `id_column`, or by position."""

    def __init__(self, dataset: Any, id_column: str | None):
        row_of_id = None
        if id_column is not None:
            names = getattr(dataset, "column_names", None)
            if names is None or id_column not in names:
                raise DatasetError(
                    f"`id_column={id_column!r}` is not a column of the dataset (columns: {names}). Pass the column "
                    "holding the sample ids, or `id_column=None` to use row positions."
                )
            row_of_id = {}
            for row, value in enumerate(dataset[id_column]):
                try:
                    key = int(value)
                except (TypeError, ValueError) as err:
                    raise DatasetError(
                        f"Id column {id_column!r} holds a non-integer value {value!r} at row {row}."
                    ) from err
                if key in row_of_id:
                    raise DatasetError(
                        f"Id column {id_column!r} holds the id {key} twice (rows {row_of_id[key]}, {row})."
                    )
                row_of_id[key] = row
        self.dataset, self._row_of_id = dataset, row_of_id

    def rows(self, sample_ids: np.ndarray) -> list[dict[str, Any]]:
        samples = []
        for sample_id in sample_ids.tolist():
            row = sample_id if self._row_of_id is None else self._row_of_id.get(sample_id)
            if row is None or not 0 <= row < len(self.dataset):
                raise DatasetError(
                    f"Sample id {sample_id} has no row in the attached dataset ({len(self.dataset)} rows"
                    f"{'' if self._row_of_id is None else ', looked up by id column'}). Attach the dataset the index "
                    "was built from.",
                    sample_id=sample_id,
                )
            samples.append(self.dataset[row])
        return samples


@dataclass
class Batch:
    unit: int
    last: bool
    ids: np.ndarray  # (b,) all rows of the batch
    ok: np.ndarray  # (b,) bool: read successfully
    pixels: torch.Tensor | None  # (ok.sum(), C, H, W) in [0, 1]; videos (ok.sum(), F, C, H, W)
    prompts: list[str] | None
    errors: list[tuple[int, str]] = field(default_factory=list)  # (id, reason) of the rows that failed


class BatchLoader(torch.utils.data.Dataset):
    """Item `i` is batch `i` of this process's units (computed on demand, so the plan takes memory per unit, not per
    batch); the rows are read, decoded and preprocessed in the loader (and its workers)."""

    def __init__(
        self,
        table: DatasetView,
        units: list[np.ndarray],
        batch_size: int,
        resolution: tuple[int, int],
        channels: int,
        image_root: str | os.PathLike | None,
        num_frames: int | None = None,
    ):
        self.rows = table.rows
        self.ids = table.ids
        self.image_column, self.prompt_column = table.image_column, table.prompt_column
        self.units, self.batch_size = units, batch_size
        self.ends = np.cumsum([-(-len(positions) // batch_size) for positions in units])  # batches up to each unit
        self.resolution, self.channels = resolution, channels
        self.image_root = None if image_root is None else Path(image_root)
        self.num_frames = num_frames  # a video family: the image column holds a video per row

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def locate(self, item: int) -> tuple[int, bool, np.ndarray]:
        """(unit, last batch of the unit?, dataset positions) of batch `item`."""
        unit = int(np.searchsorted(self.ends, item, side="right"))
        first = item - (int(self.ends[unit - 1]) if unit else 0)
        positions = self.units[unit][first * self.batch_size : (first + 1) * self.batch_size]
        return unit, item == int(self.ends[unit]) - 1, positions

    def __getitem__(self, item: int) -> Batch:
        unit, last, positions = self.locate(item)
        rows = self.rows[positions.tolist()]
        images = rows.column(self.image_column).to_pylist()
        prompts = rows.column(self.prompt_column).to_pylist() if self.prompt_column is not None else None
        ids = self.ids[positions]
        ok = np.ones(len(positions), dtype=bool)
        pixels, kept_prompts, errors = [], [], []
        for i, value in enumerate(images):
            try:
                prompt = _prompt(prompts[i], self.prompt_column) if prompts is not None else None
                if self.num_frames is None:
                    image = prepare_images(decode_image(value, self.image_root), self.resolution, self.channels)
                else:
                    where = f"the video in column {self.image_column!r}"
                    frames = decode_video(value, self.image_root)
                    image = prepare_video(frames, self.resolution, self.channels, self.num_frames, source=where)
            except Exception as err:  # any failure to read one row is reported with its id by the caller
                ok[i] = False
                errors.append((int(ids[i]), f"{type(err).__name__}: {err}"))
                continue
            pixels.append(image)
            kept_prompts.append(prompt)
        return Batch(
            unit=unit,
            last=last,
            ids=ids,
            ok=ok,
            pixels=torch.cat(pixels) if pixels else None,
            prompts=kept_prompts if prompts is not None else None,
            errors=errors,
        )


def _prompt(value: Any, column: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"the prompt column {column!r} holds {type(value).__name__} {value!r}, not a string")
    return value


def collate_batch(batch: Batch) -> Batch:
    return batch


def loader_worker_init(_: int) -> None:
    torch.set_num_threads(1)  # loader workers only resize images; leave the cores to the gradient work


@quiet_local_dataset_loading
def load_training_dataset(
    source: str,
    *,
    split: str = "train",
    config_name: str | None = None,
    revision: str | None = None,
) -> tuple[Any, Path | None]:
    r"""
    Load a training set the way `dmin build` does: a `save_to_disk` folder, an image folder, a data file
    (`.jsonl`, `.json`, `.parquet`, `.csv`) or a Hub dataset id.

    Returns:
        `(datasets.Dataset, image_root)`: the split, and the folder relative image paths are resolved against.
    """
    import datasets

    path = Path(os.path.expanduser(source))
    try:
        if path.is_dir() and any((path / name).is_file() for name in _SAVED_DATASET_FILES):
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise DatasetError(f"{source!r} has the splits {list(dataset)}, not {split!r}; pass `--split`.")
                dataset = dataset[split]
            return dataset, path
        if path.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(path), split=split), path
        if path.is_file():
            builder = _DATA_FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise DatasetError(
                    f"Cannot read {source!r}: expected a folder, or a file ending in {sorted(_DATA_FILE_BUILDERS)}."
                )
            return datasets.load_dataset(builder, data_files={"train": str(path)}, split=split), path.parent
        return datasets.load_dataset(source, name=config_name, split=split, revision=revision), None
    except DMinError:
        raise
    except (OSError, ValueError, KeyError) as err:  # missing files, unknown splits, unreachable Hub
        raise DatasetError(f"Could not load the dataset {source!r} (split {split!r}): {err}") from err
