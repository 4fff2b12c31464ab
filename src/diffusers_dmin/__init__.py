__version__ = "0.1.0.dev0"

from .config import DMinConfig, SketchSpec
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
from .gradients import GradientSketcher
from .index import GradientIndex
from .outputs import InfluencePipelineOutput, InfluenceResult
from .pipeline import InfluencePipeline


__all__ = [
    "__version__",
    "DMinConfig",
    "SketchSpec",
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
