"""Real checkpoints' dtypes and memory (issue 10, item 4): LoRA gradients on a bfloat16 pipeline against a float32 run,
with gradient checkpointing on the denoiser, and with accelerate's model CPU offloading.

The measured minimum cosines are printed (run with `-s`) and asserted.
"""

import pytest
import torch

from diffusers_dmin import ConfigError, DMinConfig, GradientIndex, GradientSketcher
from diffusers_dmin.testing import add_tiny_lora, tiny_sd_pipeline
from family_checks import check_return_influence, structured_images
from test_lora import FAMILIES, save_random_lora


PROMPTS = ["a photo of a cat", "a red square", "the digit three"]


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    dirs = {}
    for family in FAMILIES:
        for seed, name in ((1, "a"), (2, "b")):
            dirs[family, name] = root / f"{family}-{name}"
            save_random_lora(family, dirs[family, name], seed)
    return dirs


def _with_adapters(family, lora_dirs, dtype=torch.float32):
    """The tiny pipeline in `dtype`, then two LoRAs loaded into it and weighted, as a user does with a bf16 checkpoint
    (`from_pretrained(..., torch_dtype=torch.bfloat16)`, `load_lora_weights`, `set_adapters`)."""
    pipe = FAMILIES[family][0]()
    if dtype != torch.float32:
        for _, module in pipe.components.items():
            if isinstance(module, torch.nn.Module):
                torch.nn.Module.to(module, dtype)
    pipe.load_lora_weights(lora_dirs[family, "a"], adapter_name="a")
    pipe.load_lora_weights(lora_dirs[family, "b"], adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=[0.7, 0.3])
    return pipe


def _min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).min())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bfloat16_lora_gradients_agree_with_float32(family, lora_dirs):
    images, prompts = structured_images(2), PROMPTS[:2]
    config = DMinConfig(num_timesteps=3, sketch_dim=1024, normalize="none")
    reference = GradientSketcher.from_pipeline(_with_adapters(family, lora_dirs), config)
    expected = reference.full_gradients(images=images, prompts=prompts)
    half = _with_adapters(family, lora_dirs, torch.bfloat16)
    attribute = FAMILIES[family][1]
    assert {p.dtype for n, p in getattr(half, attribute).named_parameters() if "lora_" in n} == {torch.bfloat16}
    for mode in ("vmap", "loop"):
        sketcher = GradientSketcher.from_pipeline(half, config, mode=mode)
        assert sketcher.param_names == reference.param_names and sketcher.spec.adapters == reference.spec.adapters
        dense = sketcher.full_gradients(images=images, prompts=prompts)
        assert dense.dtype == torch.float32
        cosine = _min_cosine(dense, expected)
        ratio = dense.norm(dim=-1) / expected.norm(dim=-1)
        print(
            f"{family} bf16 vs fp32 ({mode}): min cosine {cosine:.5f}, norm ratio {ratio.min():.4f}-{ratio.max():.4f}"
        )
        assert cosine > 0.999
        torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=0.02, rtol=0)


@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_gradient_checkpointing_on_the_denoiser_agrees(family, lora_dirs):
    images, prompts = structured_images(2), PROMPTS[:2]
    config = DMinConfig(num_timesteps=2, sketch_dim=1024)
    pipe = _with_adapters(family, lora_dirs)
    expected = GradientSketcher.from_pipeline(pipe, config)(images=images, prompts=prompts)
    denoiser = getattr(pipe, FAMILIES[family][1])
    denoiser.enable_gradient_checkpointing()
    calls = []
    for module in denoiser.modules():  # count the checkpointed blocks: the test must exercise checkpointing
        if getattr(module, "gradient_checkpointing", False):
            checkpoint = module._gradient_checkpointing_func
            module._gradient_checkpointing_func = lambda *a, _f=checkpoint, **k: calls.append(1) or _f(*a, **k)
    sketcher = GradientSketcher.from_pipeline(pipe, config)
    assert not sketcher._use_vmap()  # the loop engine: torch.utils.checkpoint does not run under torch.func
    out = sketcher(images=images, prompts=prompts)
    assert calls
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)

    half = _with_adapters(family, lora_dirs, torch.bfloat16)
    getattr(half, FAMILIES[family][1]).enable_gradient_checkpointing()
    cosine = _min_cosine(GradientSketcher.from_pipeline(half, config)(images=images, prompts=prompts), expected)
    print(f"{family} bf16 + gradient checkpointing vs fp32: min cosine {cosine:.5f}")
    assert cosine > 0.999


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_model_cpu_offload_hooks(family, lora_dirs):
    # a CPU-only machine has no accelerator to offload to, but accelerate's hooks run with device="cpu": the same
    # code path (onload through the hook, hook bypassed inside torch.func, execution device from the hooks)
    images, prompts = structured_images(3), PROMPTS
    config = DMinConfig(num_timesteps=2, sketch_dim=512)
    expected = GradientSketcher.from_pipeline(_with_adapters(family, lora_dirs), config)(
        images=images, prompts=prompts
    )
    pipe = _with_adapters(family, lora_dirs)
    pipe.enable_model_cpu_offload(device="cpu")
    denoiser = getattr(pipe, FAMILIES[family][1])
    hooked_forward = vars(denoiser)["forward"]
    for mode in ("vmap", "loop"):
        sketcher = GradientSketcher.from_pipeline(pipe, config, mode=mode)
        assert sketcher.adapter.device == pipe._execution_device
        torch.testing.assert_close(sketcher(images=images, prompts=prompts), expected, rtol=1e-4, atol=1e-5)
        assert vars(denoiser)["forward"] is hooked_forward  # the offloading hook is back in place
    index = GradientIndex.from_sketches(expected, spec=sketcher.spec)
    check_return_influence(pipe, index, PROMPTS[0])


def test_sequential_offload_and_text_encoder_offload_are_refused(lora_dirs):
    pipe = _with_adapters("sd", lora_dirs)
    pipe.enable_sequential_cpu_offload(device="cpu")
    with pytest.raises(ConfigError, match="enable_model_cpu_offload"):
        GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1, sketch_dim=64))

    pipe = tiny_sd_pipeline()
    add_tiny_lora(pipe.unet)
    pipe.load_lora_weights(_text_encoder_lora(lora_dirs), adapter_name="te")
    pipe.enable_model_cpu_offload(device="cpu")
    sketcher = GradientSketcher.from_pipeline(
        pipe, DMinConfig(num_timesteps=1, sketch_dim=64, text_encoder_params="lora")
    )
    with pytest.raises(ConfigError, match="text_encoder_params"):
        sketcher(images=structured_images(1), prompts=PROMPTS[:1])


def _text_encoder_lora(lora_dirs):
    directory = lora_dirs["sd", "a"].parent / "sd-text-encoder"
    if not directory.exists():
        save_random_lora("sd", directory, seed=5, text_encoder=True)
    return directory


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["sdxl", "sd3"])
def test_model_cpu_offload_on_cuda_bfloat16(family, lora_dirs):
    images, prompts = structured_images(2), PROMPTS[:2]
    config = DMinConfig(num_timesteps=3, sketch_dim=1024)
    expected = GradientSketcher.from_pipeline(_with_adapters(family, lora_dirs), config)(
        images=images, prompts=prompts
    )
    pipe = _with_adapters(family, lora_dirs, torch.bfloat16)
    pipe.enable_model_cpu_offload()
    for mode in ("vmap", "loop"):
        sketcher = GradientSketcher.from_pipeline(pipe, config, mode=mode)
        assert sketcher.adapter.device.type == "cuda"
        out = sketcher(images=images, prompts=prompts)
        assert getattr(pipe, FAMILIES[family][1]).device.type == "cuda"  # onloaded for the gradient
        cosine = _min_cosine(out, expected)
        print(f"{family} bf16 on cuda with model offload ({mode}) vs fp32 CPU: min cosine {cosine:.5f}")
        assert cosine > 0.999
