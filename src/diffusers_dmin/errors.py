"""Errors raised on purpose by `diffusers_dmin`.

Every error is a [`DMinError`] and also subclasses the builtin exception a caller would naturally catch, so both
`except DMinError` and `except ValueError` work::

    DMinError
    ├── ConfigError                 (ValueError)          a bad `DMinConfig` value or argument
    ├── UnsupportedPipelineError    (TypeError)           a pipeline/denoiser family we do not handle yet
    ├── NonFiniteGradientError      (FloatingPointError)  a NaN/inf loss or gradient, with the sample's position
    ├── IndexMismatchError          (ValueError)          queries/rows computed under another config or model
    ├── IndexNotFoundError          (FileNotFoundError)   no index at a path or repo
    ├── IndexCorruptError           (OSError)             a checksum, shape or manifest check failed on read
    ├── DatasetError                (ValueError)          a missing column, an unreadable image
    ├── HubAuthenticationError      (PermissionError)     the Hub refused the token
    └── MissingDependencyError      (ImportError)         an optional dependency is not installed

Messages name the argument, the value and the fix. Nothing here logs: callers raise, users read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


__all__ = [
    "DMinError",
    "ConfigError",
    "UnsupportedPipelineError",
    "NonFiniteGradientError",
    "IndexMismatchError",
    "IndexNotFoundError",
    "IndexCorruptError",
    "DatasetError",
    "HubAuthenticationError",
    "MissingDependencyError",
    "check_int",
    "check_choice",
]


class DMinError(Exception):
    """Base class for every error `diffusers_dmin` raises on purpose."""


class ConfigError(DMinError, ValueError):
    """A [`DMinConfig`] field or a function argument has a value we cannot use."""


class UnsupportedPipelineError(DMinError, TypeError):
    """The pipeline or its denoiser belongs to a family without an adapter yet."""


class NonFiniteGradientError(DMinError, FloatingPointError):
    """A loss or a gradient is NaN or infinite.

    Attributes:
        positions (`list[int]`): Positions in the batch of the offending samples.
        sample_ids (`list`, *optional*): Their ids, when the caller knows them.
    """

    def __init__(self, message: str, positions: list[int] | None = None, sample_ids: list | None = None):
        super().__init__(message)
        self.positions = positions or []
        self.sample_ids = sample_ids


class IndexMismatchError(DMinError, ValueError):
    """Sketches computed under one configuration meet an index built under another.

    Attributes:
        differences (`dict[str, tuple[Any, Any]]`): field name -> (value in the index, value of the query).
    """

    def __init__(self, message: str, differences: Mapping[str, tuple[Any, Any]] | None = None):
        super().__init__(message)
        self.differences = dict(differences or {})

    @classmethod
    def from_differences(cls, differences: Mapping[str, tuple[Any, Any]], what: str, fix: str) -> IndexMismatchError:
        """Build the error with a message that lists every differing field."""
        lines = "\n".join(
            f"  - {name}: index has {_short(expected)!s}, {what} has {_short(got)!s}"
            for name, (expected, got) in differences.items()
        )
        return cls(f"The index and the {what} were computed differently:\n{lines}\n{fix}", differences)


class IndexNotFoundError(DMinError, FileNotFoundError):
    """No DMin index at the given local path or Hub repository."""


class IndexCorruptError(DMinError, OSError):
    """An index file failed verification (sha256, shape, dtype or manifest structure)."""


class DatasetError(DMinError, ValueError):
    """A dataset column is missing or a row cannot be read.

    Attributes:
        sample_id (*optional*): Id of the offending row, when known.
    """

    def __init__(self, message: str, sample_id: Any = None):
        super().__init__(message)
        self.sample_id = sample_id


class HubAuthenticationError(DMinError, PermissionError):
    """The Hub refused the token (401/403): it is invalid, expired, or lacks access to the repository."""


class MissingDependencyError(DMinError, ImportError):
    """An optional dependency needed by the requested feature is not installed."""


def check_int(value: Any, name: str, *, minimum: int = 1, optional: bool = False, hint: str = "") -> int | None:
    """The one check of an integer argument: `value` must be an int (numpy integers too, never a bool) `>= minimum`
    (`None` passes with `optional`). Raises [`ConfigError`] naming the argument and the value, plus `hint`."""
    if value is None and optional:
        return None
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, f"an integer >= {minimum}")
        raise ConfigError(
            f"`{name}` must be {what}{' or None' if optional else ''}, but is {value!r}."
            + (f" {hint}" if hint else "")
        )
    return int(value)


def check_choice(value: Any, name: str, choices: tuple[Any, ...], *, hint: str = "") -> Any:
    """The one check of an argument with a fixed set of values; raises [`ConfigError`] naming them, plus `hint`."""
    if value not in choices:
        raise ConfigError(f"`{name}` must be one of {choices}, but is {value!r}." + (f" {hint}" if hint else ""))
    return value


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def require(module: str, feature: str, install: str | None = None):
    """Import `module` or raise [`MissingDependencyError`] naming the feature and the install command."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        install = install or f"pip install {module}"
        raise MissingDependencyError(
            f"{feature} needs `{module}`, which is not installed. Install it with `{install}`."
        ) from err
