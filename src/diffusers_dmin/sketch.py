"""The seeded, streaming DMin sketch (balanced count-sketch, a.k.a. OPORP).

DMin compresses a D-dimensional vector `g` to K numbers: permute the coordinates with one random permutation, multiply
them by random signs, and sum contiguous blocks of the permuted order into K buckets. Here coordinate `i` goes to
position `p = perm(i)` of the permuted order, gets the sign `sign(p)` and lands in bucket

    bucket(p) = floor(p * K / D)

so bucket `j` holds the contiguous positions `[ceil(j D / K), ceil((j + 1) D / K))`. When K divides D these are
exactly the official code's blocks of D / K positions; otherwise the D positions are spread over K blocks of
`floor(D / K)` or `ceil(D / K)` coordinates, which is the official "pad to a multiple of K" with the padding zeros
spread evenly instead of at random, and keeps every bucket balanced. Because `floor(floor(p K / D) / m) =
floor(p (K / m) / D)`, summing m adjacent buckets of a K-sketch gives the K/m-sketch exactly ([`fold_sketch`]).

Nothing D-sized is ever stored: the permutation is a keyed Feistel network over `[0, 2^n)` (n = ceil(log2 D)) with
cycle walking into `[0, D)`, and the signs are an integer hash of the position, both computed from
`(seed, D)` with integer arithmetic whose intermediate values stay below 2^63, so CPU and CUDA give bit-identical
buckets and signs. Vectors are processed in chunks of coordinates, so the extra memory does not depend on D; a
caller streams a gradient parameter tensor by parameter tensor with [`OPORPSketch.accumulate`]. Per-segment code
tables (bucket and sign packed into one int64 per coordinate) can be cached under a memory budget as a speed-up.
"""

from __future__ import annotations

import math

import torch

from .errors import ConfigError


__all__ = ["OPORPSketch", "fold_sketch"]

_MASK32 = 0xFFFFFFFF
# Odd multipliers below 2**31: with inputs below 2**32 every product stays below 2**63 (no signed overflow).
_MUL1 = 0x7FEB352D
_MUL2 = 0x5BD1E995
_FEISTEL_ROUNDS = 4
_MAX_PRODUCT = 2**62


def _splitmix64(x: int) -> int:
    """A 64-bit mixing step on Python ints (exact, platform independent); used to derive round keys."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _hash32(x: torch.Tensor, key: int) -> torch.Tensor:
    """A 32-bit integer hash of an int64 tensor holding values in [0, 2**32); returns values in [0, 2**32)."""
    x = x ^ key
    x ^= x >> 16
    x.mul_(_MUL1).bitwise_and_(_MASK32)
    x ^= x >> 15
    x.mul_(_MUL2).bitwise_and_(_MASK32)
    x ^= x >> 16
    return x


class OPORPSketch:
    r"""
    The DMin sketch of `input_dim`-dimensional vectors to `sketch_dim` buckets, computed from `seed` alone.

    Args:
        input_dim (`int`):
            D, the dimension of the vectors (e.g. the number of selected model parameters).
        sketch_dim (`int`):
            K, the number of buckets.
        seed (`int`, *optional*, defaults to 0):
            Keys the permutation and the signs.
        table_budget_bytes (`int`, *optional*, defaults to 256 MiB):
            Memory allowed for cached per-segment code tables (8 bytes per coordinate). Segments that do not fit are
            recomputed on the fly at each call. `0` disables the cache.
        chunk_size (`int`, *optional*, defaults to 65536):
            Coordinates processed at once when codes are computed on the fly; bounds the extra memory.

    Examples:
    ```py
    >>> import torch
    >>> from diffusers_dmin.sketch import OPORPSketch
    >>> sketch = OPORPSketch(input_dim=10_000, sketch_dim=256, seed=0)
    >>> x, y = torch.randn(2, 10_000).unbind()
    >>> x, y = x / x.norm(), y / y.norm()
    >>> abs(float(sketch(x) @ sketch(y) - x @ y)) < 4 / 256**0.5
    True
    ```
    """

    def __init__(
        self,
        input_dim: int,
        sketch_dim: int,
        seed: int = 0,
        *,
        table_budget_bytes: int = 256 * 2**20,
        chunk_size: int = 2**16,
    ):
        if not isinstance(input_dim, int) or input_dim < 1:
            raise ConfigError(f"`input_dim` must be a positive integer, but is {input_dim!r}.")
        if not isinstance(sketch_dim, int) or sketch_dim < 1:
            raise ConfigError(f"`sketch_dim` must be a positive integer, but is {sketch_dim!r}.")
        if input_dim * sketch_dim >= _MAX_PRODUCT or input_dim >= 2**48:
            raise ConfigError(
                f"`input_dim * sketch_dim` must stay below 2**62 (and `input_dim` below 2**48), but "
                f"input_dim={input_dim} and sketch_dim={sketch_dim}. Use a smaller `sketch_dim`."
            )
        if not isinstance(seed, int) or seed < 0:
            raise ConfigError(f"`seed` must be a non-negative integer, but is {seed!r}.")
        if chunk_size < 1:
            raise ConfigError(f"`chunk_size` must be a positive integer, but is {chunk_size!r}.")
        self.input_dim = input_dim
        self.sketch_dim = sketch_dim
        self.seed = seed
        self.table_budget_bytes = int(table_budget_bytes)
        self.chunk_size = int(chunk_size)

        # Feistel domain [0, a * b) with a = 2^low_bits (right half) and b = ceil(D / a) (left half, modular), so
        # that fewer than a ~ sqrt(D) of its a * b >= D points fall outside [0, D) and need cycle walking.
        n_bits = max(2, math.ceil(math.log2(input_dim)))
        self._low_bits = n_bits // 2
        self._left_size = -(-input_dim // (1 << self._low_bits))
        keys, state = [], _splitmix64(seed ^ (input_dim * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF))
        for _ in range(_FEISTEL_ROUNDS + 2):
            state = _splitmix64(state)
            keys.append(state & _MASK32)
        self._round_keys = keys[:_FEISTEL_ROUNDS]
        self._sign_keys = keys[_FEISTEL_ROUNDS:]
        self._tables: dict[tuple[int, int, str], torch.Tensor] = {}
        self._table_bytes = 0

    def __repr__(self) -> str:
        return f"OPORPSketch(input_dim={self.input_dim}, sketch_dim={self.sketch_dim}, seed={self.seed})"

    # ------------------------------------------------------------------ integer maps

    def _feistel(self, x: torch.Tensor) -> torch.Tensor:
        """One pass of the keyed Feistel permutation of `[0, a * b)` (a = 2^low_bits, b = left size)."""
        low_bits, b = self._low_bits, self._left_size
        right = x & ((1 << low_bits) - 1)
        left = x >> low_bits
        for r, key in enumerate(self._round_keys):
            if r % 2 == 0:  # left <- (left + h(right) mod b) mod b, with h mod b by Lemire's multiply-shift
                left += _hash32(right, key).mul_(b) >> 32
                left -= (left >= b).to(torch.int64).mul_(b)
            else:  # right <- right xor h(left), on low_bits bits
                right ^= _hash32(left, key) >> (32 - low_bits)
        return left.mul_(1 << low_bits).bitwise_or_(right)

    def permutation(self, start: int, length: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Positions `perm(i)` in the permuted order of the coordinates `i = start .. start + length - 1` (int64)."""
        self._check_range(start, length)
        x = torch.arange(start, start + length, dtype=torch.int64, device=device)
        if self.input_dim == 1:
            return x
        y = self._feistel(x)
        todo = (y >= self.input_dim).nonzero().squeeze(1)
        while todo.numel():  # cycle walking: a permutation of [0, 2^n) restricted to [0, D)
            walked = self._feistel(y[todo])
            y[todo] = walked
            todo = todo[walked >= self.input_dim]
        return y

    def _negative(self, positions: torch.Tensor) -> torch.Tensor:
        """1 where the sign of a position is -1, else 0 (int64)."""
        h = _hash32(positions & _MASK32, self._sign_keys[0])
        if self.input_dim > 2**32:
            h = _hash32(h ^ (positions >> 32), self._sign_keys[1])
        return h >> 31

    def buckets_and_signs(
        self, start: int, length: int, device: torch.device | str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Bucket (int64 in `[0, K)`) and sign (float32, +-1) of coordinates `start .. start + length - 1`."""
        positions = self.permutation(start, length, device)
        signs = 1.0 - 2.0 * self._negative(positions).to(torch.float32)
        return positions * self.sketch_dim // self.input_dim, signs

    def _codes(self, start: int, length: int, device: torch.device | str | None) -> torch.Tensor:
        """`bucket + K * (sign < 0)` for the coordinates `start .. start + length - 1` (int32)."""
        positions = self.permutation(start, length, device)
        codes = self._negative(positions).mul_(self.sketch_dim)
        codes += positions.mul_(self.sketch_dim).div_(self.input_dim, rounding_mode="floor")
        return codes

    def codes(self, start: int, length: int, device: torch.device | str | None = None) -> torch.Tensor:
        """Packed codes of a segment, from the table cache when it is there or fits the budget."""
        device = torch.device(device) if device is not None else torch.device("cpu")
        key = (start, length, str(device))
        table = self._tables.get(key)
        if table is not None:
            return table
        if self._table_bytes + 8 * length > self.table_budget_bytes:
            return self._codes(start, length, device)
        codes = torch.empty(length, dtype=torch.int64, device=device)
        for offset in range(0, length, self.chunk_size):  # chunk by chunk: no temporaries of the table's size
            size = min(self.chunk_size, length - offset)
            codes[offset : offset + size] = self._codes(start + offset, size, device)
        self._tables[key] = codes
        self._table_bytes += 8 * length
        return codes

    @property
    def table_bytes(self) -> int:
        """Bytes currently held by cached code tables."""
        return self._table_bytes

    # ------------------------------------------------------------------ sketching

    def new_accumulator(self, rows: int, device: torch.device | str | None = None) -> torch.Tensor:
        """A zeroed `(rows, 2K)` float32 accumulator for [`accumulate`]; [`finalize`] turns it into `(rows, K)`."""
        return torch.zeros(rows, 2 * self.sketch_dim, dtype=torch.float32, device=device)

    def accumulate(self, accumulator: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """
        Add the sketch of the coordinates `start .. start + values.shape[-1] - 1` of `rows` vectors.

        Args:
            accumulator (`torch.Tensor` of shape `(rows, 2 * sketch_dim)`): From [`new_accumulator`].
            values (`torch.Tensor` of shape `(rows, length)`): The vectors' values at those coordinates.
            start (`int`): Global index of the first coordinate.
        """
        if values.dim() != 2 or values.shape[0] != accumulator.shape[0]:
            raise ConfigError(
                f"`values` must have shape (rows, length) with rows={accumulator.shape[0]}, but has shape "
                f"{tuple(values.shape)}."
            )
        length = values.shape[1]
        values = values.to(accumulator.dtype)
        device = accumulator.device
        cached = (
            start,
            length,
            str(device),
        ) in self._tables or self._table_bytes + 8 * length <= self.table_budget_bytes
        step = length if cached else self.chunk_size
        for offset in range(0, length, step):
            size = min(step, length - offset)
            codes = self.codes(start + offset, size, device) if cached else self._codes(start + offset, size, device)
            accumulator.index_add_(1, codes, values[:, offset : offset + size])

    def finalize(self, accumulator: torch.Tensor) -> torch.Tensor:
        """`(rows, 2K)` accumulator -> `(rows, K)` sketches (positive minus negative halves)."""
        k = self.sketch_dim
        return accumulator[:, :k] - accumulator[:, k:]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Sketch whole vectors: `(..., input_dim)` -> `(..., sketch_dim)` float32."""
        if x.shape[-1] != self.input_dim:
            raise ConfigError(f"Expected vectors of dimension {self.input_dim}, but got shape {tuple(x.shape)}.")
        rows = x.reshape(-1, self.input_dim)
        accumulator = self.new_accumulator(rows.shape[0], rows.device)
        self.accumulate(accumulator, rows, 0)
        return self.finalize(accumulator).reshape(*x.shape[:-1], self.sketch_dim)

    def _check_range(self, start: int, length: int) -> None:
        if start < 0 or length < 0 or start + length > self.input_dim:
            raise ConfigError(f"Coordinates [{start}, {start + length}) fall outside [0, input_dim={self.input_dim}).")


def fold_sketch(
    sketches: torch.Tensor, sketch_dim: int, *, renormalize: bool = False, blocks: int = 1
) -> torch.Tensor:
    """
    Fold `(..., K)` sketches to `(..., sketch_dim)` by summing groups of adjacent buckets.

    The result equals sketching at `sketch_dim` directly with the same seed and input dimension. `sketch_dim` must
    divide K.

    Args:
        renormalize (`bool`, *optional*, defaults to `False`):
            Give each folded row (each of its `blocks` blocks) the norm the row (block) had before folding, as
            sketches made with `DMinConfig(sketch_normalize=True)` need: folding changes a sketch's norm.
        blocks (`int`, *optional*, defaults to 1):
            Number of independent blocks per row (`num_noise_draws` for `noise_draws="separate"`); it must divide
            `sketch_dim` so that no folded bucket mixes two blocks.
    """
    k = sketches.shape[-1]
    if not isinstance(blocks, int) or blocks < 1 or k % blocks:
        raise ConfigError(f"`blocks={blocks!r}` must be a positive divisor of the sketch dimension {k}.")
    if not isinstance(sketch_dim, int) or sketch_dim < 1 or k % sketch_dim:
        raise ConfigError(
            f"`sketch_dim={sketch_dim!r}` must be a positive divisor of the stored sketch dimension {k}, e.g. "
            f"{k // 2 if k % 2 == 0 else 1}."
        )
    if sketch_dim % blocks:
        raise ConfigError(
            f"`sketch_dim={sketch_dim}` must be a multiple of the {blocks} blocks per row (one per noise draw with "
            "`noise_draws='separate'`), or folded buckets would mix draws."
        )
    if sketch_dim == k:
        return sketches
    folded = sketches.reshape(*sketches.shape[:-1], sketch_dim, k // sketch_dim).sum(-1)
    if renormalize:
        shape = (*sketches.shape[:-1], blocks, -1)
        before = sketches.reshape(shape).norm(dim=-1, keepdim=True)
        after = folded.reshape(shape).norm(dim=-1, keepdim=True)
        folded = (folded.reshape(shape) * (before / after.clamp_min(1e-30))).reshape(folded.shape)
    return folded
