"""A pure-Python validator of hnswlib's saved graph format (`HierarchicalNSW::saveIndex`, hnswlib 0.8).

hnswlib's loader trusts its input: the offsets and sizes in the header are used as they are to copy vectors, read
labels and follow links, so a crafted `hnsw.bin` reads or writes outside hnswlib's buffers (also later, when the
graph is extended with new rows). An index pulled from the Hub is untrusted, and whoever wrote `hnsw.bin` also wrote
the manifest and its sha256, so [`validate_hnsw_file`] checks the whole file against what the manifest implies
*before* any byte of it reaches hnswlib, without allocating anything proportional to what the file claims (the file
is memory-mapped; checks run on bounded chunks).

The layout (native byte order; little-endian on every platform hnswlib ships wheels for)::

    header (96 bytes)
        offsetLevel0_ u64 | max_elements_ u64 | cur_element_count u64 | size_data_per_element_ u64
        label_offset_ u64 | offsetData_ u64 | maxlevel_ i32 | enterpoint_node_ u32
        maxM_ u64 | maxM0_ u64 | M_ u64 | mult_ f64 | ef_construction_ u64
    level 0: cur_element_count records of size_data_per_element_ bytes
        [count u16, flags u8, 0 u8][maxM0_ x u32 neighbour ids][dim x f32 vector][label u64]
    upper levels, for each element in order:
        linkListSize u32, then linkListSize bytes = level x [count u16, 0, 0][maxM_ x u32 neighbour ids]

What a valid file must satisfy, with `n` the row count, `M` and `ef_construction` from the manifest and `dim` the
length of a flattened row (hnswlib's constructor computes the same values from `M` and `dim`):

- `offsetLevel0_ == 0`, `max_elements_ == cur_element_count == n`, `maxM_ == M_ == M`, `maxM0_ == 2 M`,
  `offsetData_ == 4 (2 M + 1)`, `label_offset_ == offsetData_ + 4 dim`, `size_data_per_element_ == label_offset_ + 8`,
  `mult_ == 1 / ln(M)`, `ef_construction_ == max(ef_construction, M)`;
- the file size is exactly what the header and the per-element level sizes imply;
- every list count is within `maxM0_` (level 0) or `maxM_` (upper levels), with no deletion mark, and every
  neighbour id is below `n` and (on an upper level) names an element that has that level;
- every element's level list is a whole number of levels; `maxlevel_` is the highest level, and the entry point is
  an element of that level;
- the labels are a permutation of `0 .. n - 1` (they are row positions), and every vector is finite.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import IndexCorruptError


__all__ = ["HNSWHeader", "HEADER_BYTES", "MAX_M", "read_hnsw_header", "validate_hnsw_file"]

_HEADER = struct.Struct("<QQQQQQiIQQQdQ")
HEADER_BYTES = _HEADER.size  # 96
# hnswlib stores list counts as 16-bit integers, so maxM0_ = 2 M must stay below 65536; graphs far smaller than that
# already have every property worth having, and a cap bounds what a crafted M can make hnswlib allocate per row.
MAX_M = 4096
# rows whose level-0 records are checked at once (bounds the temporary arrays)
_CHUNK_ROWS = 8192
_CHUNK_BYTES = 2**25
_NO_ENTRY_POINT = 0xFFFFFFFF
_FIX = (
    "The file is damaged or was crafted. Delete it to rebuild the graph from the shards, or re-download the index "
    "with `force_download=True`; do not load graphs from sources you do not trust."
)


@dataclass(frozen=True)
class HNSWHeader:
    """The 13 header fields of an hnswlib graph file, named as in hnswlib's `HierarchicalNSW`."""

    offsetLevel0_: int
    max_elements_: int
    cur_element_count: int
    size_data_per_element_: int
    label_offset_: int
    offsetData_: int
    maxlevel_: int
    enterpoint_node_: int
    maxM_: int
    maxM0_: int
    M_: int
    mult_: float
    ef_construction_: int


def read_hnsw_header(path: str | os.PathLike) -> HNSWHeader:
    """Read the header of an hnswlib graph file (no checks beyond its length)."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
    if len(raw) < HEADER_BYTES:
        raise IndexCorruptError(
            f"The HNSW graph {path} has {len(raw)} bytes, fewer than hnswlib's {HEADER_BYTES}-byte header. {_FIX}"
        )
    return HNSWHeader(*_HEADER.unpack(raw))


def validate_hnsw_file(
    path: str | os.PathLike,
    *,
    dim: int,
    num_rows: int | None = None,
    M: int | None = None,
    ef_construction: int | None = None,
) -> HNSWHeader:
    r"""
    Check a saved hnswlib graph completely (header, size, links, levels, labels, vectors) before hnswlib reads it.

    Args:
        path (`str` or `os.PathLike`): The `hnsw.bin` file.
        dim (`int`): Length of a flattened row in the graph (`T * k`).
        num_rows (`int`, *optional*): Rows the graph must hold (the manifest's `hnsw.num_rows`); when `None`, the
            header's count is taken and every other check still applies.
        M (`int`, *optional*): The manifest's graph degree; when `None`, the header's `M_` is taken (within
            `2 .. MAX_M`) and every field derived from it is still checked.
        ef_construction (`int`, *optional*): The manifest's `ef_construction` (hnswlib stores `max(ef_construction,
            M)`); unchecked when `None`.

    Returns:
        [`HNSWHeader`]: The validated header.

    Raises:
        [`IndexCorruptError`]: Naming the file and the first field or record that differs from what it must be.
    """
    path = Path(path)
    header = read_hnsw_header(path)
    size = path.stat().st_size

    def fail(field: str, found, expected) -> IndexCorruptError:
        return IndexCorruptError(f"The HNSW graph {path} is invalid: `{field}` is {found!r}, but {expected}. {_FIX}")

    if not isinstance(dim, int) or dim < 1:
        raise ValueError(f"`dim` must be a positive integer, got {dim!r}")
    m = header.M_ if M is None else M
    if not 2 <= m <= MAX_M:
        raise fail("M_" if M is None else "M", m, f"it must be within 2 .. {MAX_M}")
    n = header.cur_element_count if num_rows is None else num_rows
    links0 = 4 * (2 * m + 1)
    expected = {
        "offsetLevel0_": (0, "0"),
        "cur_element_count": (n, f"the manifest lists {n} rows in the graph"),
        "M_": (m, f"the manifest's M is {m}"),
        "maxM_": (m, f"M is {m}"),
        "maxM0_": (2 * m, f"2 M = {2 * m}"),
        "offsetData_": (links0, f"4 (2 M + 1) = {links0} for M = {m}"),
        "label_offset_": (links0 + 4 * dim, f"offsetData_ + 4 dim = {links0 + 4 * dim} for dim = {dim}"),
        "size_data_per_element_": (links0 + 4 * dim + 8, f"label_offset_ + 8 = {links0 + 4 * dim + 8}"),
    }
    if ef_construction is not None:
        expected["ef_construction_"] = (
            max(ef_construction, m),
            f"max(ef_construction, M) = {max(ef_construction, m)} from the manifest",
        )
    for name, (value, why) in expected.items():
        found = getattr(header, name)
        if found != value:
            raise fail(name, found, why)
    if header.max_elements_ != n and not (n == 0 and header.max_elements_ == 1):
        raise fail("max_elements_", header.max_elements_, f"it must equal the row count {n}")
    if not math.isclose(header.mult_, 1.0 / math.log(m), rel_tol=1e-9):
        raise fail("mult_", header.mult_, f"1 / ln(M) = {1.0 / math.log(m)!r}")

    record = header.size_data_per_element_
    level0_end = HEADER_BYTES + n * record
    if size < level0_end + 4 * n:
        raise fail("file size", size, f"{n} rows of {record} bytes need at least {level0_end + 4 * n} bytes")
    if n == 0:
        if size != HEADER_BYTES:
            raise fail("file size", size, f"an empty graph has exactly {HEADER_BYTES} bytes")
        if header.maxlevel_ != -1 or header.enterpoint_node_ != _NO_ENTRY_POINT:
            raise fail("maxlevel_/enterpoint_node_", (header.maxlevel_, header.enterpoint_node_), "(-1, 2**32-1)")
        return header

    # memory-mapped: nothing proportional to the file is allocated. The map is closed by the garbage collector once
    # the last numpy view of it is gone (closing it explicitly fails while an exception still holds a view).
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    levels, upper_starts = _walk_levels(mapped, n, m, level0_end, size, fail)
    _check_level0(mapped, header, n, m, dim, fail)
    _check_upper(mapped, levels, upper_starts, n, m, fail)
    max_level = int(levels.max())
    if header.maxlevel_ != max_level:
        raise fail("maxlevel_", header.maxlevel_, f"the highest element level is {max_level}")
    if header.enterpoint_node_ >= n:
        raise fail("enterpoint_node_", header.enterpoint_node_, f"it must be below the row count {n}")
    if levels[header.enterpoint_node_] != max_level:
        raise fail(
            "enterpoint_node_",
            header.enterpoint_node_,
            f"the entry point must have the top level {max_level} (it has {int(levels[header.enterpoint_node_])})",
        )
    return header


def _walk_levels(mapped, n: int, m: int, start: int, size: int, fail):
    """Per-element levels and the byte offsets of their upper-level lists; checks the exact file size."""
    block = 4 * (m + 1)  # size_links_per_element_
    levels = np.zeros(n, dtype=np.int64)
    upper_starts = np.zeros(n, dtype=np.int64)
    position = 0
    limit = size - start
    unpack = struct.Struct("<I").unpack_from
    for i in range(n):
        if position + 4 > limit:
            raise fail("file size", size, f"the level list of element {i} lies beyond the end of the file")
        (length,) = unpack(mapped, start + position)
        position += 4
        if length:
            level, rest = divmod(length, block)
            if rest or level > 64:  # levels are ~ln(n)/ln(M): far below 64 for any graph that fits in memory
                raise fail(
                    f"linkListSize of element {i}",
                    length,
                    f"it must be a multiple of size_links_per_element_ = {block} of at most 64 levels",
                )
            if position + length > limit:
                raise fail("file size", size, f"the level lists of element {i} run past the end of the file")
            levels[i] = level
            upper_starts[i] = start + position
            position += length
    if position != limit:
        raise fail("file size", size, f"the header and level lists imply exactly {start + position} bytes")
    return levels, upper_starts


def _check_level0(mapped, header: HNSWHeader, n: int, m: int, dim: int, fail) -> None:
    record = header.size_data_per_element_
    max_m0 = 2 * m
    seen = np.zeros(n, dtype=bool)
    chunk_rows = max(1, min(_CHUNK_ROWS, _CHUNK_BYTES // record))
    for begin in range(0, n, chunk_rows):
        rows = min(chunk_rows, n - begin)
        offset = HEADER_BYTES + begin * record
        links = np.ndarray((rows, max_m0 + 1), dtype="<u4", buffer=mapped, offset=offset, strides=(record, 4))
        counts = links[:, 0]
        bad = np.flatnonzero(counts > max_m0)  # also catches a deletion mark or other bits in the upper half
        if len(bad):
            raise fail(
                f"level-0 link count of element {begin + int(bad[0])}",
                int(counts[bad[0]]),
                f"it must be at most maxM0_ = {max_m0} with no deletion mark",
            )
        used = np.arange(max_m0)[None, :] < counts[:, None].astype(np.int64)
        out = used & (links[:, 1:] >= n)
        if out.any():
            row, col = np.argwhere(out)[0]
            raise fail(
                f"level-0 neighbour {int(col)} of element {begin + int(row)}",
                int(links[row, col + 1]),
                f"neighbour ids must be below the row count {n}",
            )
        labels = np.ndarray(
            (rows,), dtype="<u8", buffer=mapped, offset=offset + header.label_offset_, strides=(record,)
        )
        bad = np.flatnonzero(labels >= n)
        if len(bad):
            raise fail(f"label of element {begin + int(bad[0])}", int(labels[bad[0]]), f"labels must be below {n}")
        index = labels.astype(np.int64)
        if seen[index].any() or len(np.unique(index)) != len(index):
            raise fail("labels", "a repeated label", f"the labels must be the row positions 0 .. {n - 1}, once each")
        seen[index] = True
        vectors = np.ndarray(
            (rows, dim), dtype="<f4", buffer=mapped, offset=offset + header.offsetData_, strides=(record, 4)
        )
        finite = np.isfinite(vectors).all(axis=1)
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            raise fail(f"vector of element {begin + row}", "NaN or infinite values", "vectors must be finite")
        del links, labels, vectors


def _check_upper(mapped, levels: np.ndarray, upper_starts: np.ndarray, n: int, m: int, fail) -> None:
    block_words = m + 1
    elements = np.flatnonzero(levels > 0)
    if not len(elements):
        return
    counts_per = levels[elements]
    owner = np.repeat(elements, counts_per)
    level = _ranges(counts_per)
    starts = np.repeat(upper_starts[elements], counts_per) + (level - 1) * 4 * block_words
    for begin in range(0, len(starts), _CHUNK_ROWS):
        chunk = starts[begin : begin + _CHUNK_ROWS]
        words = np.frombuffer(mapped, dtype="<u4")  # view, no copy; offsets are 4-byte aligned
        blocks = words[(chunk // 4)[:, None] + np.arange(block_words)[None, :]]
        del words
        counts = blocks[:, 0]
        bad = np.flatnonzero(counts > m)
        if len(bad):
            j = begin + int(bad[0])
            raise fail(
                f"level-{int(level[j])} link count of element {int(owner[j])}",
                int(counts[bad[0]]),
                f"it must be at most maxM_ = {m} with no other bits set",
            )
        used = np.arange(m)[None, :] < counts[:, None].astype(np.int64)
        ids = blocks[:, 1:].astype(np.int64)
        out = used & (ids >= n)
        if out.any():
            row, col = np.argwhere(out)[0]
            j = begin + int(row)
            raise fail(
                f"level-{int(level[j])} neighbour {int(col)} of element {int(owner[j])}",
                int(ids[row, col]),
                f"neighbour ids must be below the row count {n}",
            )
        need = level[begin : begin + len(chunk)][:, None]
        low = used & (levels[np.where(used, ids, 0)] < need)
        if low.any():
            row, col = np.argwhere(low)[0]
            j = begin + int(row)
            raise fail(
                f"level-{int(level[j])} neighbour {int(col)} of element {int(owner[j])}",
                int(ids[row, col]),
                f"a neighbour on level {int(level[j])} must have that level (it has {int(levels[ids[row, col]])})",
            )


def _ranges(counts: np.ndarray) -> np.ndarray:
    """`concatenate([arange(1, c + 1) for c in counts])` without a Python loop."""
    total = int(counts.sum())
    ends = np.cumsum(counts)
    result = np.ones(total, dtype=np.int64)
    result[ends[:-1]] = 1 - counts[:-1]
    return np.cumsum(result)
