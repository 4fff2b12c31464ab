"""Query-side preconditioning: TRAK's damped kernel inverse at DMin's cost.

An index's training sketches `x_i` (shape `(T, K)`) define per timestep the K x K second moment
`Sigma_t = (1/N) sum_i x_{i,t} x_{i,t}^T`. A [`QueryPreconditioner`] holds `P_t = (Sigma_t + lambda_t I)^-1` with
`lambda_t = damping * tr(Sigma_t) / K` (the damping is relative to the mean eigenvalue, so one value fits every
timestep and sketch size), and optionally the mean training sketch `mu_t`. A query becomes
`q'_t = P_t (q_t - mu_t)`; its score against row i is `sum_t <q'_t, x_{i,t}>`, TRAK's `phi_q^T (Phi^T Phi + lambda)^-1
phi_i` per timestep. Only the query changes, so exact search and HNSW graphs over the stored rows are unchanged.

Centring only the query is enough: subtracting `mu_t` from every training row too would change all scores of one
query by the same constant `<q'_t, mu_t>`, so rankings (and any metric of them) are those of fully centred sketches.
With `center=True` the covariance `Sigma_t - mu_t mu_t^T` is inverted instead of the second moment.

The fitted matrices are stored as a safetensors file (`preconditioner.safetensors`: "inverse" `(T, K, K)` float32,
"mean" `(T, K)` float32 when centred, "lambdas" `(T,)` float64) whose every header field is checked against the
expected shapes before a tensor is read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from .constants import PRECONDITIONER_NAME
from .errors import ConfigError, IndexCorruptError


__all__ = ["QueryPreconditioner", "PRECONDITIONER_NAME"]

_MAX_HEADER = 1 << 20


@dataclass(frozen=True)
class QueryPreconditioner:
    r"""
    Per-timestep damped inverse of an index's sketch second moment (or covariance), applied to query sketches.

    Build it with [`QueryPreconditioner.fit`] (or `GradientIndex.fit_preconditioner`), apply it with
    [`QueryPreconditioner.apply`].

    Attributes:
        inverse (`torch.Tensor` of shape `(T, K, K)`): `(Sigma_t + lambda_t I)^-1`, float32, symmetric.
        mean (`torch.Tensor` of shape `(T, K)`, *optional*): The mean training sketch subtracted from queries
            (`center=True`), else `None`.
        lambdas (`torch.Tensor` of shape `(T,)`): The absolute damping per timestep (float64).
        damping (`float`): The relative damping: `lambda_t = damping * tr(Sigma_t) / K`.
        num_rows (`int`): N, the number of training sketches it was fitted on.
    """

    inverse: torch.Tensor
    mean: torch.Tensor | None
    lambdas: torch.Tensor
    damping: float
    num_rows: int

    @property
    def num_timesteps(self) -> int:
        return int(self.inverse.shape[0])

    @property
    def sketch_dim(self) -> int:
        return int(self.inverse.shape[-1])

    @property
    def centered(self) -> bool:
        return self.mean is not None

    def __repr__(self) -> str:
        return (
            f"QueryPreconditioner(T={self.num_timesteps}, K={self.sketch_dim}, damping={self.damping:g}, "
            f"center={self.centered}, num_rows={self.num_rows})"
        )

    @classmethod
    def fit(cls, batches: Iterable[torch.Tensor], *, damping: float, center: bool = False) -> QueryPreconditioner:
        r"""
        Fit on the training sketches, streamed batch by batch.

        Args:
            batches (iterable of `torch.Tensor` of shape `(n, T, K)`): The index's rows (any float dtype); the
                second moment is accumulated in float64, so memory is `T K^2` numbers whatever N.
            damping (`float`): Relative damping, `> 0`: `lambda_t = damping * tr(Sigma_t) / K`. Small values trust
                the sketches' covariance (TRAK's kernel inverse), large ones tend to the plain inner product.
                Choose it on held-out queries (benchmarks/quality/estimator_options.py measures a grid).
            center (`bool`, *optional*, defaults to `False`): Subtract the mean training sketch from queries and
                invert the covariance instead of the second moment.
        """
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping):
            raise ConfigError(f"`damping` must be a positive finite number, but is {damping!r}.")
        if damping <= 0:
            raise ConfigError(
                f"`damping` must be > 0 (the inverse of a rank-deficient sketch covariance does not exist), but is "
                f"{damping!r}; try 0.1."
            )
        if not isinstance(center, bool):
            raise ConfigError(f"`center` must be True or False, but is {center!r}.")
        second = total = None
        count = 0
        for batch in batches:
            if not isinstance(batch, torch.Tensor) or batch.dim() != 3:
                raise ConfigError(f"Expected (n, T, K) sketch batches, got {type(batch).__name__}.")
            x = batch.to(torch.float64)
            if second is None:
                _, t, k = x.shape
                second = torch.zeros(t, k, k, dtype=torch.float64)
                total = torch.zeros(t, k, dtype=torch.float64)
            elif x.shape[1:] != total.shape:
                raise ConfigError(f"Sketch batches change shape: {tuple(x.shape[1:])} after {tuple(total.shape)}.")
            second += torch.einsum("ntk,ntj->tkj", x, x)
            total += x.sum(0)
            count += x.shape[0]
        if count == 0:
            raise ConfigError("Cannot fit a preconditioner on an empty index.")
        sigma = second / count
        mean = total / count
        if center:
            sigma = sigma - mean[:, :, None] * mean[:, None, :]
        k = sigma.shape[-1]
        trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)
        lambdas = float(damping) * trace.clamp_min(1e-30) / k
        eye = torch.eye(k, dtype=torch.float64)
        inverse = torch.empty_like(sigma)
        for t in range(sigma.shape[0]):
            chol = torch.linalg.cholesky(sigma[t] + lambdas[t] * eye)
            inverse[t] = torch.cholesky_inverse(chol)
        inverse = 0.5 * (inverse + inverse.transpose(-1, -2))
        return cls(
            inverse=inverse.to(torch.float32),
            mean=mean.to(torch.float32) if center else None,
            lambdas=lambdas,
            damping=float(damping),
            num_rows=count,
        )

    def apply(self, queries: torch.Tensor) -> torch.Tensor:
        """`(Q, T, K)` query sketches -> `P_t (q_t - mu_t)`, float32. Scores against the stored rows then are TRAK's
        damped-kernel scores (up to a per-query constant when centred, which no ranking sees)."""
        if not isinstance(queries, torch.Tensor) or queries.dim() != 3:
            raise ConfigError(f"`queries` must be a (Q, T, K) tensor, but is {type(queries).__name__}.")
        if tuple(queries.shape[1:]) != (self.num_timesteps, self.sketch_dim):
            raise ConfigError(
                f"Queries of shape (T, K) = {tuple(queries.shape[1:])} do not match the preconditioner's "
                f"({self.num_timesteps}, {self.sketch_dim}); fit it at the sketch size you search at."
            )
        q = queries.to(torch.float32)
        if self.mean is not None:
            q = q - self.mean
        return torch.einsum("qtk,tkj->qtj", q, self.inverse)

    # ------------------------------------------------------------------ file

    def save(self, path: str | os.PathLike) -> Path:
        """Write the safetensors file (the caller renames it into place and records its sha256)."""
        from safetensors.torch import save_file

        tensors = {"inverse": self.inverse.contiguous(), "lambdas": self.lambdas.to(torch.float64).contiguous()}
        if self.mean is not None:
            tensors["mean"] = self.mean.contiguous()
        metadata = {"damping": repr(self.damping), "num_rows": str(self.num_rows), "center": str(self.centered)}
        save_file(tensors, str(path), metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, num_timesteps: int, sketch_dim: int) -> QueryPreconditioner:
        """Read a file written by [`save`] (its sha256 already checked by the caller), validating the header's
        names, dtypes, shapes and offsets against `(T, K)` before any tensor is read, and the values after."""
        path = Path(path)
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            if len(head) != 8:
                raise IndexCorruptError(f"{path.name}: truncated safetensors header.")
            header_len = struct.unpack("<Q", head)[0]
            if not 2 <= header_len <= min(_MAX_HEADER, size - 8):
                raise IndexCorruptError(f"{path.name}: safetensors header length {header_len} is out of range.")
            try:
                header = json.loads(handle.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise IndexCorruptError(f"{path.name}: the safetensors header is not JSON ({err}).") from err
        if not isinstance(header, dict):
            raise IndexCorruptError(f"{path.name}: the safetensors header is not a mapping.")
        metadata = header.pop("__metadata__", {}) or {}
        t, k = int(num_timesteps), int(sketch_dim)
        expected = {"inverse": ("F32", [t, k, k]), "lambdas": ("F64", [t])}
        if "mean" in header:
            expected["mean"] = ("F32", [t, k])
        if set(header) != set(expected):
            raise IndexCorruptError(
                f"{path.name}: tensors {sorted(header)}, expected {sorted(expected)} (for T={t}, K={k})."
            )
        spans = []
        for name, (dtype, shape) in expected.items():
            entry = header[name]
            if not isinstance(entry, dict) or entry.get("dtype") != dtype or entry.get("shape") != shape:
                raise IndexCorruptError(f"{path.name}: tensor {name!r} is {entry!r}, expected {dtype} {shape}.")
            offsets = entry.get("data_offsets")
            width = 8 if dtype == "F64" else 4
            if (
                not isinstance(offsets, list)
                or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or offsets[1] - offsets[0] != width * math.prod(shape)
                or offsets[0] < 0
                or 8 + header_len + offsets[1] > size
            ):
                raise IndexCorruptError(f"{path.name}: tensor {name!r} has bad data offsets {offsets!r}.")
            spans.append(tuple(offsets))
        spans.sort()
        if any(a[1] > b[0] for a, b in zip(spans, spans[1:])):
            raise IndexCorruptError(f"{path.name}: tensors overlap.")
        try:
            damping = float(metadata.get("damping", "nan"))
            num_rows = int(metadata.get("num_rows", "-1"))
        except (TypeError, ValueError) as err:
            raise IndexCorruptError(f"{path.name}: bad metadata {metadata!r}.") from err
        if not (math.isfinite(damping) and damping > 0 and num_rows > 0):
            raise IndexCorruptError(f"{path.name}: bad metadata {metadata!r}.")

        from safetensors.torch import load_file

        tensors = load_file(str(path))
        for name, tensor in tensors.items():
            if not torch.isfinite(tensor).all():
                raise IndexCorruptError(f"{path.name}: tensor {name!r} holds NaN or inf.")
        if not (tensors["lambdas"] > 0).all():
            raise IndexCorruptError(f"{path.name}: damping values must be positive.")
        return cls(
            inverse=tensors["inverse"],
            mean=tensors.get("mean"),
            lambdas=tensors["lambdas"],
            damping=damping,
            num_rows=num_rows,
        )
