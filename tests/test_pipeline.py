"""InfluencePipeline on tiny DDPM, SD 1.x, SDXL and SD3 pipelines (random weights, LoRA variants)."""

import numpy as np
import PIL.Image
import pytest
import torch
from datasets import Dataset

from diffusers_dmin import (
    ConfigError,
    DMinConfig,
    GradientIndex,
    GradientSketcher,
    IndexMismatchError,
    InfluencePipeline,
    InfluencePipelineOutput,
    UnsupportedPipelineError,
)
from diffusers_dmin.testing import (
    add_tiny_lora,
    tiny_ddpm_pipeline,
    tiny_sd3_pipeline,
    tiny_sd_pipeline,
    tiny_sdxl_pipeline,
)


# uniform spacing: the cubic set (999, 962, 703 for T=3) sits so close to pure noise that, with the shared fixed
# noise, every sample of an untrained model has almost the same gradient
CONFIG = DMinConfig(num_timesteps=3, timestep_spacing="uniform", sketch_dim=512, seed=0)
PROMPTS = ["a photo of a cat", "a red square", "the digit three", "a blue circle", "a dog face", "a card"]


def _training_images(channels: int, n: int = 6) -> list[PIL.Image.Image]:
    """Distinct images: a bright bar at a different place and length in each."""
    images = []
    for i in range(n):
        array = np.full((16, 16, 3), 20, dtype=np.uint8)
        array[2 * i : 2 * i + 4, 1 + i : 9 + i] = (230, 40 * i, 255 - 40 * i)
        image = PIL.Image.fromarray(array)
        images.append(image.convert("L") if channels == 1 else image)
    return images


def _make(family: str, lora: bool):
    pipe = {"ddpm": tiny_ddpm_pipeline, "sd": tiny_sd_pipeline, "sdxl": tiny_sdxl_pipeline, "sd3": tiny_sd3_pipeline}[
        family
    ]()
    if lora:
        add_tiny_lora(pipe.transformer if family == "sd3" else pipe.unet, seed=1)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _index_for(pipe, family: str, config: DMinConfig = CONFIG) -> tuple[GradientIndex, Dataset]:
    channels = 1 if family == "ddpm" else 3
    images = _training_images(channels)
    prompts = None if family == "ddpm" else PROMPTS
    sketcher = GradientSketcher.from_pipeline(pipe, config)
    sketches = sketcher(images=images, prompts=prompts)
    ids = np.arange(100, 106)
    index = GradientIndex.from_sketches(sketches, ids=ids, spec=sketcher.spec, noise=sketcher.noise, id_column="id")
    dataset = Dataset.from_dict({"id": ids.tolist(), "image": images, "text": PROMPTS})
    return index, dataset


CASES = [("ddpm", False), ("ddpm", True), ("sd", False), ("sd", True), ("sdxl", False), ("sd3", False), ("sd3", True)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}{'-lora' if lora else ''}" for f, lora in CASES])
def wrapped(request):
    family, lora = request.param
    pipe = _make(family, lora)
    index, dataset = _index_for(pipe, family)
    return family, lora, pipe, index, dataset


def _call_kwargs(family: str) -> dict:
    if family == "ddpm":
        return {"batch_size": 2, "num_inference_steps": 2}
    return {"prompt": ["a photo of a cat", "a red square"], "num_inference_steps": 2, "guidance_scale": 1.0}


def test_without_influence_equals_the_plain_pipeline_bit_for_bit(wrapped):
    family, _, pipe, index, _ = wrapped
    influence_pipe = InfluencePipeline(pipe, index)
    kwargs = _call_kwargs(family)
    plain = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images
    ours = influence_pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
    assert type(ours) is type(pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kwargs))
    assert np.array_equal(ours.images, plain)
    # generating with influence does not change the images either
    with_influence = influence_pipe(
        generator=torch.Generator().manual_seed(0), output_type="np", return_influence=True, **kwargs
    )
    assert np.array_equal(with_influence.images, plain)


def test_self_retrieval_with_attribute(wrapped):
    family, _, pipe, index, _ = wrapped
    influence_pipe = InfluencePipeline(pipe, index)
    channels = 1 if family == "ddpm" else 3
    results = influence_pipe.attribute(
        _training_images(channels), prompts=None if family == "ddpm" else PROMPTS, top_k=3
    )
    assert [int(r.sample_ids[0]) for r in results] == list(range(100, 106))
    for result in results:
        assert np.all(np.diff(result.scores) <= 0)
        assert abs(float(result.scores[0]) - 3.0) < 0.5  # a sample scores about T with itself
        assert isinstance(result.query, PIL.Image.Image)


@pytest.mark.parametrize("output_type", ["pil", "np", "pt", "latent"])
def test_output_types_and_one_result_per_image(wrapped, output_type):
    family, _, pipe, index, dataset = wrapped
    if family == "ddpm" and output_type in ("pt", "latent"):
        pytest.skip("DDPMPipeline only returns PIL or numpy images")
    index.attach_dataset(dataset)
    influence_pipe = InfluencePipeline(pipe, index)
    kwargs = _call_kwargs(family)
    if family != "ddpm":
        kwargs["num_images_per_prompt"] = 2
    out = influence_pipe(return_influence=True, top_k=4, output_type=output_type, **kwargs)
    assert isinstance(out, InfluencePipelineOutput)
    num_images = 2 if family == "ddpm" else 4
    assert len(out.influence) == num_images
    if output_type == "pil":
        assert all(isinstance(image, PIL.Image.Image) for image in out.images)
    elif output_type == "np":
        assert isinstance(out.images, np.ndarray) and out.images.shape[0] == num_images
    elif output_type == "pt":
        assert isinstance(out.images, torch.Tensor) and out.images.shape[:2] == (num_images, 3)
    else:
        assert isinstance(out.images, torch.Tensor) and out.images.shape[1] == 4
    for result in out.influence:
        assert result.sample_ids.dtype == np.int64 and len(result.sample_ids) == 4
        assert set(result.sample_ids.tolist()) <= set(range(100, 106))
        assert np.all(np.diff(result.scores) <= 0)
        assert [row["id"] for row in result.samples] == result.sample_ids.tolist()
        if output_type != "latent":
            grid = result.to_grid()
            assert isinstance(grid, PIL.Image.Image) and grid.width > grid.height
    images, influence = influence_pipe(return_influence=True, return_dict=False, top_k=2, **_call_kwargs(family))
    assert len(influence) == len(images)
    index.attach_dataset(None)


def test_cfg_and_no_cfg_both_attribute():
    pipe = _make("sd", lora=False)
    index, _ = _index_for(pipe, "sd")
    influence_pipe = InfluencePipeline(pipe, index)
    for guidance_scale in (1.0, 5.0):
        out = influence_pipe(
            "a photo of a cat", guidance_scale=guidance_scale, num_inference_steps=2, return_influence=True, top_k=3
        )
        assert len(out.influence) == 1 and len(out.influence[0].sample_ids) == 3
        assert np.isfinite(out.influence[0].scores).all()
    assert set(influence_pipe.timings) == {"generation", "gradient", "search"}


def test_user_callback_still_runs_and_sees_latents():
    pipe = _make("sd", lora=False)
    index, _ = _index_for(pipe, "sd")
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        seen.append((step, tuple(callback_kwargs["prompt_embeds"].shape)))
        return callback_kwargs

    InfluencePipeline(pipe, index)(
        "a photo of a cat",
        num_inference_steps=3,
        return_influence=True,
        callback_on_step_end=callback,
        callback_on_step_end_tensor_inputs=["prompt_embeds"],
    )
    assert [s for s, _ in seen] == [0, 1, 2]


def test_mismatched_index_raises_before_generating():
    pipe = _make("sd", lora=False)
    index, _ = _index_for(pipe, "sd")
    other = _make("sd", lora=True)  # a LoRA changes which parameters are sketched
    with pytest.raises(IndexMismatchError, match="param_names"):
        InfluencePipeline(other, index)
    with torch.no_grad():
        pipe.unet.conv_in.weight.add_(0.0)  # same weights: still fine
    InfluencePipeline(pipe, index)
    changed = _make("sd", lora=False)
    with torch.no_grad():
        next(p for n, p in changed.unet.named_parameters() if "transformer_blocks" in n).add_(1e-2)
    with pytest.raises(IndexMismatchError, match="param_fingerprint"):
        InfluencePipeline(changed, index)
    v_prediction = tiny_sd_pipeline(prediction_type="v_prediction")  # same weights, another training target
    with pytest.raises(IndexMismatchError, match="target"):
        InfluencePipeline(v_prediction, index)

    influence_pipe = InfluencePipeline(pipe, index)
    calls = []
    pipe.scheduler.set_timesteps = lambda *a, **k: calls.append(a)  # would run at the start of generation
    try:
        with pytest.raises(ConfigError, match="resolution"):
            influence_pipe("a cat", height=32, width=32, return_influence=True)
        with pytest.raises(ConfigError, match="prompt"):
            influence_pipe(prompt_embeds=torch.zeros(1, 77, 32), return_influence=True)
        with pytest.raises(ConfigError, match="top_k"):
            influence_pipe("a cat", return_influence=True, top_k=0)
        with pytest.raises(ConfigError, match="clip_skip=2"):  # conditioning the gradient would not reproduce
            influence_pipe("a cat", clip_skip=2, return_influence=True)
        with pytest.raises(ConfigError, match="cross_attention_kwargs"):
            influence_pipe("a cat", cross_attention_kwargs={"scale": 0.5}, return_influence=True)
    finally:
        del pipe.scheduler.set_timesteps
    assert calls == []


def test_unsupported_pipeline_raises_naming_the_supported_ones():
    class OtherPipeline:
        transformer = torch.nn.Linear(2, 2)

    index = GradientIndex.from_sketches(torch.randn(2, 3, 512), config=CONFIG)
    with pytest.raises(UnsupportedPipelineError, match="StableDiffusion3Pipeline"):
        InfluencePipeline(OtherPipeline(), index)
    with pytest.raises(ConfigError, match="GradientIndex"):
        InfluencePipeline(tiny_ddpm_pipeline(), "not an index")


def test_from_pretrained_and_forwarded_methods(tmp_path):
    pipe = _make("ddpm", lora=False)
    index, _ = _index_for(pipe, "ddpm")
    index.save_pretrained(tmp_path / "index")
    influence_pipe = InfluencePipeline.from_pretrained(pipe, tmp_path / "index")
    assert influence_pipe.to("cpu") is influence_pipe
    assert influence_pipe.device.type == "cpu"
    influence_pipe.set_progress_bar_config(disable=True)
    results = influence_pipe.attribute(_training_images(1)[:2], top_k=2)
    assert [int(r.sample_ids[0]) for r in results] == [100, 101]
    assert not hasattr(influence_pipe, "unet")  # no blanket attribute forwarding


def test_lora_loaded_with_load_lora_weights(tmp_path):
    from diffusers import StableDiffusionPipeline
    from peft.utils import get_peft_model_state_dict

    trained = _make("sd", lora=True)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=get_peft_model_state_dict(trained.unet), safe_serialization=True
    )
    index, _ = _index_for(trained, "sd")

    fresh = _make("sd", lora=False)
    fresh.load_lora_weights(tmp_path / "lora", adapter_name="default")
    influence_pipe = InfluencePipeline(fresh, index)
    assert all("lora_" in name for name in influence_pipe.sketcher.param_names)
    results = influence_pipe.attribute(_training_images(3), prompts=PROMPTS, top_k=1)
    assert [int(r.sample_ids[0]) for r in results] == list(range(100, 106))


def test_an_instance_patch_of_scheduler_step_is_put_back():
    """DDPM has no step callback, so the wrapper observes `scheduler.step`; a patch that was there before (another
    tool's) must be there after, not deleted."""
    pipe = _make("ddpm", lora=False)
    index, _ = _index_for(pipe, "ddpm")
    calls = []
    original = pipe.scheduler.step

    def patched(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    pipe.scheduler.step = patched
    out = InfluencePipeline(pipe, index)(
        generator=torch.Generator().manual_seed(0), return_influence=True, top_k=2, **_call_kwargs("ddpm")
    )
    assert len(out.influence) == 2
    assert pipe.scheduler.step is patched and len(calls) == 2  # the patch ran under the observer, and stays
    del pipe.scheduler.step
    InfluencePipeline(pipe, index)(
        generator=torch.Generator().manual_seed(0), return_influence=True, top_k=2, **_call_kwargs("ddpm")
    )
    assert "step" not in vars(pipe.scheduler)  # no patch before: none after
