__version__ = "0.1.0.dev0"

from .config import DMinConfig, SketchSpec
from .errors import (
    ConfigError,
    DatasetError,
    DMinError,
    IndexCorruptError,
    IndexMismatchError,
    IndexNotFoundError,
    MissingDependencyError,
    NonFiniteGradientError,
    UnsupportedPipelineError,
)
from .outputs import InfluencePipelineOutput, InfluenceResult


__all__ = [
    "__version__",
    "DMinConfig",
    "SketchSpec",
    "InfluenceResult",
    "InfluencePipelineOutput",
    "DMinError",
    "ConfigError",
    "DatasetError",
    "IndexCorruptError",
    "IndexMismatchError",
    "IndexNotFoundError",
    "MissingDependencyError",
    "NonFiniteGradientError",
    "UnsupportedPipelineError",
]
