"""Model families: one small adapter per denoiser family, mirroring that family's diffusers training script.

Adding a family = one module here with a [`ModelFamily`] subclass (its `conventions` declare the training
script's objective), one entry in `ADAPTERS`, a tiny offline pipeline in `diffusers_dmin.testing`, and its tests
(the gradient against a loss written from the training script, self-retrieval, `return_influence=True`).
"""

from __future__ import annotations

from typing import Any

from ..config import DMinConfig
from ..errors import UnsupportedPipelineError
from .base import DenoiserAdapter, LatentAdapter, ModelFamily
from .chroma import ChromaAdapter
from .cogvideox import CogVideoXAdapter
from .flux import FluxAdapter
from .flux2 import Flux2Adapter, Flux2KleinAdapter
from .flux_kontext import FluxKontextAdapter
from .hidream import HiDreamAdapter
from .lumina2 import Lumina2Adapter
from .qwenimage import QwenImageAdapter
from .sana import SanaAdapter
from .sd3 import SD3Adapter
from .unet import SDXLAdapter, UNet2DAdapter, UNet2DConditionAdapter
from .z_image import ZImageAdapter


__all__ = [
    "ADAPTERS",
    "CogVideoXAdapter",
    "DenoiserAdapter",
    "ModelFamily",
    "HiDreamAdapter",
    "ChromaAdapter",
    "FluxAdapter",
    "FluxKontextAdapter",
    "Flux2Adapter",
    "Flux2KleinAdapter",
    "LatentAdapter",
    "QwenImageAdapter",
    "SanaAdapter",
    "Lumina2Adapter",
    "SD3Adapter",
    "SDXLAdapter",
    "SUPPORTED_PIPELINES",
    "UNet2DAdapter",
    "UNet2DConditionAdapter",
    "ZImageAdapter",
    "adapter_for_pipeline",
]

# First match wins: more specific families (SDXL) before more general ones (SD 1.x/2.x).
ADAPTERS: tuple[type[ModelFamily], ...] = (
    UNet2DAdapter,
    SDXLAdapter,
    UNet2DConditionAdapter,
    SD3Adapter,
    QwenImageAdapter,
    SanaAdapter,
    Lumina2Adapter,
    HiDreamAdapter,
    CogVideoXAdapter,
    FluxAdapter,
    FluxKontextAdapter,
    ChromaAdapter,
    Flux2Adapter,
    Flux2KleinAdapter,
    ZImageAdapter,
)

SUPPORTED_PIPELINES = (
    "DDPMPipeline / DDIMPipeline (UNet2DModel)",
    "StableDiffusionPipeline 1.x/2.x (UNet2DConditionModel)",
    "StableDiffusionXLPipeline (UNet2DConditionModel with text_time embeddings)",
    "StableDiffusion3Pipeline 3/3.5 (SD3Transformer2DModel)",
    "QwenImagePipeline (QwenImageTransformer2DModel)",
    "SanaPipeline (SanaTransformer2DModel)",
    "Lumina2Pipeline (Lumina2Transformer2DModel)",
    "HiDreamImagePipeline (HiDreamImageTransformer2DModel)",
    "CogVideoXPipeline 2b/5b (CogVideoXTransformer3DModel, videos)",
    "FluxPipeline / FluxImg2ImgPipeline / FluxInpaintPipeline: FLUX.1-dev and -schnell (FluxTransformer2DModel)",
    "FluxKontextPipeline (FluxTransformer2DModel; image editing only through GradientSketcher(condition_images=))",
    "ChromaPipeline / ChromaImg2ImgPipeline (ChromaTransformer2DModel)",
    "Flux2Pipeline (FLUX.2-dev: Flux2Transformer2DModel, Mistral-Small-3 text encoder)",
    "Flux2KleinPipeline (FLUX.2-klein: Flux2Transformer2DModel, Qwen3 text encoder)",
    "ZImagePipeline (ZImageTransformer2DModel)",
)


def adapter_for_pipeline(
    pipeline: Any, resolution: tuple[int, int] | None = None, *, config: DMinConfig | None = None
) -> ModelFamily:
    """The adapter of the pipeline's denoiser family, or [`UnsupportedPipelineError`] naming the supported ones.

    Args:
        pipeline (`DiffusionPipeline`): The pipeline.
        resolution (`tuple[int, int]`, *optional*): Image size; defaults to `config.resolution`, then the model's.
        config (`DMinConfig`, *optional*): Supplies the resolution and the objective overrides.
    """
    for adapter_cls in ADAPTERS:
        if adapter_cls.matches(pipeline):
            return adapter_cls(pipeline, resolution, config)
    denoiser = getattr(pipeline, "unet", None) or getattr(pipeline, "transformer", None)
    found = type(pipeline).__name__ + (f" with a {type(denoiser).__name__}" if denoiser is not None else "")
    raise UnsupportedPipelineError(
        f"diffusers_dmin does not support {found} yet. Supported pipelines: " + "; ".join(SUPPORTED_PIPELINES) + "."
    )
