from typing import TYPE_CHECKING

from .config import DMinConfig, SketcherOptions, SketchSpec
from .errors import (
    ConfigError,
    DatasetError,
    DMinError,
    HubAuthenticationError,
    IndexCorruptError,
    IndexMismatchError,
    IndexNotFoundError,
    MissingDependencyError,
    NonFiniteGradientError,
    UnsupportedPipelineError,
)
from .version import __version__


# Names whose modules import torch, diffusers or huggingface_hub load on first use (PEP 562), so that
# `import diffusers_dmin` and `dmin --help` stay fast; `from diffusers_dmin import GradientIndex` works as before.
_LAZY = {
    "GradientSketcher": ".gradients",
    "GradientIndex": ".index",
    "InfluencePipeline": ".pipeline",
    "InfluenceResult": ".outputs",
    "InfluencePipelineOutput": ".outputs",
}

if TYPE_CHECKING:
    from .gradients import GradientSketcher
    from .index import GradientIndex
    from .outputs import InfluencePipelineOutput, InfluenceResult
    from .pipeline import InfluencePipeline


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "__version__",
    "DMinConfig",
    "SketchSpec",
    "SketcherOptions",
    "GradientSketcher",
    "GradientIndex",
    "InfluencePipeline",
    "InfluenceResult",
    "InfluencePipelineOutput",
    "DMinError",
    "ConfigError",
    "DatasetError",
    "HubAuthenticationError",
    "IndexCorruptError",
    "IndexMismatchError",
    "IndexNotFoundError",
    "MissingDependencyError",
    "NonFiniteGradientError",
    "UnsupportedPipelineError",
]
