"""Logging and progress bars for `diffusers_dmin`, mirroring `diffusers.utils.logging`.

Every module does ``logger = logging.get_logger(__name__)``; all loggers hang below the ``"diffusers_dmin"`` logger,
which defaults to WARNING and reads the `DMIN_VERBOSITY` environment variable (``debug``, ``info``, ``warning``,
``error``, ``critical``). Progress bars are tqdm bars that `DMIN_DISABLE_PROGRESS_BARS=1` (or
`HF_HUB_DISABLE_PROGRESS_BARS=1`) or [`disable_progress_bars`] switch off.

Two kinds of third-party noise are silenced because they say nothing to our users: transformers' notice that an image
processor falls back to its PIL backend without torchvision (printed twice on every Stable Diffusion load, though the
pipeline never uses those processors), and the `datasets` "Downloading data" / "Generating split" bars when a local
folder or file is read ([`quiet_local_dataset_loading`]).
"""

from __future__ import annotations

import contextlib
import functools
import logging as _logging
import os
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from tqdm.auto import tqdm as _tqdm


_LIBRARY = "diffusers_dmin"
_F = TypeVar("_F", bound=Callable[..., Any])
_LEVELS = {
    "debug": _logging.DEBUG,
    "info": _logging.INFO,
    "warning": _logging.WARNING,
    "error": _logging.ERROR,
    "critical": _logging.CRITICAL,
}
_lock = threading.Lock()
_handler: _logging.Handler | None = None
_progress_bars_enabled = not any(
    os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}
    for name in ("DMIN_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS")
)


def _default_level() -> int:
    name = os.environ.get("DMIN_VERBOSITY")
    if name is None:
        return _logging.WARNING
    if name.lower() not in _LEVELS:
        _logging.getLogger(_LIBRARY).warning(
            f"Unknown DMIN_VERBOSITY={name!r}; use one of {', '.join(_LEVELS)}. Falling back to 'warning'."
        )
        return _logging.WARNING
    return _LEVELS[name.lower()]


def _configure_library_root() -> None:
    global _handler
    with _lock:
        if _handler is not None:
            return
        _handler = _logging.StreamHandler(sys.stderr)
        _handler.setFormatter(_logging.Formatter("[%(name)s] %(levelname)s: %(message)s"))
        root = _logging.getLogger(_LIBRARY)
        root.addHandler(_handler)
        root.setLevel(_default_level())
        root.propagate = False


def get_logger(name: str | None = None) -> _logging.Logger:
    """Return a logger below the library root (``name`` is usually ``__name__``)."""
    _configure_library_root()
    return _logging.getLogger(name or _LIBRARY)


def get_verbosity() -> int:
    """The level of the library root logger."""
    _configure_library_root()
    return _logging.getLogger(_LIBRARY).getEffectiveLevel()


def set_verbosity(level: int) -> None:
    """Set the level of the library root logger (e.g. `logging.INFO`)."""
    _configure_library_root()
    _logging.getLogger(_LIBRARY).setLevel(level)


def set_verbosity_debug() -> None:
    set_verbosity(_logging.DEBUG)


def set_verbosity_info() -> None:
    set_verbosity(_logging.INFO)


def set_verbosity_warning() -> None:
    set_verbosity(_logging.WARNING)


def set_verbosity_error() -> None:
    set_verbosity(_logging.ERROR)


def enable_progress_bars() -> None:
    global _progress_bars_enabled
    _progress_bars_enabled = True


def disable_progress_bars() -> None:
    global _progress_bars_enabled
    _progress_bars_enabled = False


def are_progress_bars_disabled() -> bool:
    return not _progress_bars_enabled


def tqdm(*args: Any, **kwargs: Any) -> _tqdm:
    """A tqdm bar that respects [`disable_progress_bars`] and the environment switches."""
    if not _progress_bars_enabled:
        kwargs["disable"] = True
    return _tqdm(*args, **kwargs)


class ProgressBarMixin:
    """`set_progress_bar_config(**tqdm_kwargs)`, as on diffusers pipelines: the options of the bars this object shows
    (read back from `_progress_bar_config`, e.g. `disable`)."""

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Set tqdm options for the progress bars this object shows, e.g. ``disable=True`` or ``desc=...``."""
        self._progress_bar_config = dict(kwargs)


# ---------------------------------------------------------------------------------------------- third-party noise


class _TorchvisionFallbackFilter(_logging.Filter):
    """Drops transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to ...Pil" notice:
    diffusers imports these processors with every Stable Diffusion pipeline, and the PIL backend is what runs."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in str(record.msg)


_logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionFallbackFilter())


@contextlib.contextmanager
def datasets_progress_bars_disabled() -> Iterator[None]:
    """Switch off the progress bars of `datasets` for the duration (unless `HF_DATASETS_DISABLE_PROGRESS_BARS` is set:
    the user's choice wins), then restore them."""
    import datasets

    if os.environ.get("HF_DATASETS_DISABLE_PROGRESS_BARS") is not None or datasets.are_progress_bars_disabled():
        yield
        return
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        datasets.enable_progress_bars()


def quiet_local_dataset_loading(load: _F) -> _F:
    """Decorate a loader whose first argument is a dataset source: when it is an existing local path, `datasets`
    shows no "Downloading data" bar (nothing is downloaded) nor "Generating split" bar."""

    @functools.wraps(load)
    def wrapper(source: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(source, (str, os.PathLike)) and Path(os.path.expanduser(source)).exists():
            with datasets_progress_bars_disabled():
                return load(source, *args, **kwargs)
        return load(source, *args, **kwargs)

    return wrapper  # type: ignore[return-value]
