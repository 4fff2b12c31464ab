"""LoRAs loaded the way users load them: `pipe.load_lora_weights(...)` with adapter names, several adapters weighted
with `pipe.set_adapters`, kohya-style files diffusers converts on load, and text-encoder LoRA parameters as an opt-in
part of the gradient (issue 10, item 3).

Ground truth: the gradient of the training loss written out here (or in tests/test_family_sd3.py) through the same
pipeline with plain autograd, on the model as loaded (adapter weights applied by PEFT's scaling).
"""

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.utils import get_peft_model_state_dict

from diffusers_dmin import (
    ConfigError,
    DMinConfig,
    GradientIndex,
    GradientSketcher,
    IndexMismatchError,
    InfluencePipeline,
)
from diffusers_dmin.config import SketchSpec
from diffusers_dmin.testing import add_tiny_lora, tiny_sd3_pipeline, tiny_sd_pipeline, tiny_sdxl_pipeline
from family_checks import check_sketch_matches_reference, structured_images
from test_family_sd3 import sd3_reference_loss


PROMPTS = ["a photo of a cat", "a red square", "the digit three"]
TEXT_TARGETS = ("q_proj", "v_proj")


def sd_reference_loss(pipe, pixels, prompt, noise, t):
    """`train_text_to_image_lora.py`'s step for one sample: latents `mode() * scaling_factor`, DDPM `add_noise`, the
    text encoder's last hidden state of the padded prompt ids (with autograd: its LoRA may be trained), target = the
    noise (`prediction_type="epsilon"`), mean squared error."""
    from diffusers import DDPMScheduler

    vae = pipe.vae
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    tokenizer = pipe.tokenizer
    ids = tokenizer(
        [prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    encoder_hidden_states = pipe.text_encoder(ids, return_dict=False)[0]
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    assert scheduler.config.prediction_type == "epsilon"
    timesteps = torch.tensor([t])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = pipe.unet(noisy, timesteps, encoder_hidden_states, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")


def sdxl_reference_loss(pipe, pixels, prompt, noise, t):
    """`train_text_to_image_lora_sdxl.py`'s step: both text encoders' penultimate hidden states concatenated, the
    second one's pooled output as `text_embeds`, `time_ids` = (original size, crop top-left, target size) of an
    unaugmented image, DDPM `add_noise` with the scheduler's betas, target = the noise."""
    from diffusers import DDPMScheduler

    vae = pipe.vae
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    embeds = []
    for tokenizer, text_encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(
            [prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        out = text_encoder(ids, output_hidden_states=True, return_dict=False)
        pooled = out[0]
        embeds.append(out[-1][-2])
    height, width = pixels.shape[-2:]
    time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    assert scheduler.config.prediction_type == "epsilon"
    timesteps = torch.tensor([t])
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = pipe.unet(
        noisy,
        timesteps,
        torch.cat(embeds, dim=-1),
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
        return_dict=False,
    )[0]
    return torch.nn.functional.mse_loss(pred.float(), noise.float(), reduction="mean")


# ---------------------------------------------------------------------------------------------- making LoRA files

FAMILIES = {
    "sd": (tiny_sd_pipeline, "unet", "unet_lora_layers"),
    "sdxl": (tiny_sdxl_pipeline, "unet", "unet_lora_layers"),
    "sd3": (tiny_sd3_pipeline, "transformer", "transformer_lora_layers"),
}


def _random_text_encoder_lora(text_encoder, seed: int, adapter_name: str = "default", targets=TEXT_TARGETS) -> None:
    inject_adapter_in_model(
        LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=list(targets)),
        text_encoder,
        adapter_name=adapter_name,
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in text_encoder.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def save_random_lora(family: str, directory, seed: int, *, text_encoder: bool = False):
    """A random (non-zero) LoRA saved with the pipeline class's `save_lora_weights`, as a training script does."""
    make, attribute, key = FAMILIES[family]
    pipe = make()
    denoiser = getattr(pipe, attribute)
    add_tiny_lora(denoiser, seed=seed)
    layers = {key: get_peft_model_state_dict(denoiser)}
    metadata = {key.replace("_layers", "_adapter_metadata"): denoiser.peft_config["default"].to_dict()}
    if text_encoder:
        components = ["text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
        for offset, component in enumerate(components, start=100):
            module = getattr(pipe, component)
            _random_text_encoder_lora(module, seed + offset)
            layers[f"{component}_lora_layers"] = get_peft_model_state_dict(module)
            metadata[f"{component}_lora_adapter_metadata"] = module.peft_config["default"].to_dict()
    type(pipe).save_lora_weights(directory, **layers, **metadata)
    return pipe


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("loras")
    dirs = {}
    for family in FAMILIES:
        for seed, name in ((1, "a"), (2, "b")):
            dirs[family, name] = root / f"{family}-{name}"
            save_random_lora(family, dirs[family, name], seed, text_encoder=(family == "sd" and name == "a"))
    return dirs


def _loaded(family: str, lora_dirs, weights=(0.7, 0.3)):
    pipe = FAMILIES[family][0]()
    pipe.load_lora_weights(lora_dirs[family, "a"], adapter_name="a")
    pipe.load_lora_weights(lora_dirs[family, "b"], adapter_name="b")
    pipe.set_adapters(["a", "b"], adapter_weights=list(weights))
    return pipe


# ---------------------------------------------------------------------------------------------- several adapters


@pytest.mark.parametrize("family", list(FAMILIES))
def test_active_adapters_are_selected_and_recorded(family, lora_dirs):
    pipe = _loaded(family, lora_dirs)
    attribute = FAMILIES[family][1]
    sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1, sketch_dim=64))
    names = sketcher.param_names
    assert names and all("lora_" in n for n in names)
    assert {n.split(".lora_")[1].split(".")[1] for n in names} == {"a", "b"}  # lora_A.<adapter>.weight
    assert sketcher.spec.adapters[attribute] == {"a": 0.7, "b": 0.3}
    assert SketchSpec.from_dict(sketcher.spec.to_dict()) == sketcher.spec

    with pytest.raises(ConfigError, match="adapters changed"):  # the selection describes the adapters of its time
        pipe.set_adapters(["b"])
        sketcher(images=structured_images(1), prompts=PROMPTS[:1])
    pipe.set_adapters(["b"])  # only b's parameters now, at weight 1
    only_b = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1, sketch_dim=64))
    assert only_b.param_names and all(".b." in n for n in only_b.param_names)
    assert only_b.spec.adapters[attribute] == {"b": 1.0}

    pipe.disable_lora()
    with pytest.raises(ConfigError, match="no LoRA adapter of the denoiser is active"):
        GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1, sketch_dim=64, params="lora"))
    base = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1, sketch_dim=64))
    assert base.param_names and not any("lora_" in n for n in base.param_names)  # "auto": attention
    assert base.spec.adapters == {}
    pipe.enable_lora()
    pipe.fuse_lora()  # merged into the base weights: the LoRA parameters no longer take part in the forward pass
    fused = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1, sketch_dim=64))
    assert not any("lora_" in n for n in fused.param_names) and fused.spec.adapters == {}
    assert fused.spec.param_fingerprint != base.spec.param_fingerprint  # the fused weights differ from the base's


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_weighted_adapters_gradient_is_the_weighted_models_gradient(family, lora_dirs):
    pipe = _loaded(family, lora_dirs)
    reference = sd_reference_loss if family == "sd" else sd3_reference_loss()
    images, prompts = structured_images(2), PROMPTS[:2]
    sketcher = check_sketch_matches_reference(pipe, reference, images, prompts, params="lora", normalize="none")
    # the weights change the gradient (a check that cannot pass with them ignored)
    weighted = sketcher.full_gradients(images=images, prompts=prompts)
    pipe.set_adapters(["a", "b"], adapter_weights=[1.0, 1.0])
    plain = GradientSketcher.from_pipeline(pipe, sketcher.config).full_gradients(images=images, prompts=prompts)
    cosine = torch.nn.functional.cosine_similarity(weighted.flatten(1), plain.flatten(1))
    assert cosine.max() < 0.999


def test_index_refuses_other_adapters_or_weights(lora_dirs):
    pipe = _loaded("sd", lora_dirs)
    config = DMinConfig(num_timesteps=2, sketch_dim=256)
    sketcher = GradientSketcher.from_pipeline(pipe, config)
    images, prompts = structured_images(3), PROMPTS
    index = GradientIndex.from_sketches(sketcher(images=images, prompts=prompts), spec=sketcher.spec)
    InfluencePipeline(pipe, index)  # same adapters and weights: accepted

    pipe.set_adapters(["a", "b"], adapter_weights=[0.5, 0.5])
    spec = GradientSketcher.from_pipeline(pipe, config).spec
    with pytest.raises(IndexMismatchError, match=r"adapters\.unet: index has \{'a': 0\.7, 'b': 0\.3\}") as info:
        index.check_compatible(spec)
    # same parameters and values: only the weights differ (set_adapters also weights the text encoder's LoRA)
    assert set(info.value.differences) == {"adapters.unet", "adapters.text_encoder"}
    with pytest.raises(IndexMismatchError, match="0.5"):
        InfluencePipeline(pipe, index)

    pipe.set_adapters(["a"], adapter_weights=[0.7])
    with pytest.raises(IndexMismatchError) as info:
        index.check_compatible(GradientSketcher.from_pipeline(pipe, config).spec)
    assert info.value.differences["adapters.unet"] == ({"a": 0.7, "b": 0.3}, {"a": 0.7})


def test_block_wise_weights_are_recorded_per_layer(lora_dirs):
    pipe = _loaded("sd", lora_dirs)
    pipe.set_adapters(["a"], adapter_weights=[{"unet": {"down": 0.5, "mid": 1.0, "up": 1.0}}])
    weights = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1, sketch_dim=64)).spec.adapters
    assert weights["unet"]["a"].startswith("per-layer:")


# ---------------------------------------------------------------------------------------------- kohya-style files


def _to_kohya(state_dict: dict, alpha: float) -> dict:
    """diffusers LoRA keys (`unet.<module>.lora_A.weight`, `text_encoder.<module>...`) -> kohya-ss keys for SD 1.x
    (`lora_unet_<module with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`; text encoder modules as
    `lora_te_text_model_encoder_layers_0_self_attn_q_proj`, the CLIPTextModel names of transformers 4)."""
    kohya = {}
    for key, value in state_dict.items():
        component, rest = key.split(".", 1)
        module, kind = rest.rsplit(".lora_", 1)
        if component == "text_encoder" and not module.startswith("text_model."):
            module = "text_model." + module  # transformers 5 dropped the `text_model` level of CLIPTextModel
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[component]
        name = prefix + module.replace(".", "_")
        kohya[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value
        kohya[f"{name}.alpha"] = torch.tensor(alpha)
    return kohya


def test_kohya_lora_converted_on_load_matches_the_source_adapter():
    from diffusers import StableDiffusionPipeline

    source = tiny_sd_pipeline()
    add_tiny_lora(source.unet, rank=4, alpha=8, seed=3)
    # kohya text-encoder LoRAs cover q/k/v/out_proj (diffusers recognises the converted keys by `to_out_lora`)
    _random_text_encoder_lora(source.text_encoder, 4, targets=("q_proj", "k_proj", "v_proj", "out_proj"))
    state = StableDiffusionPipeline.lora_state_dict(
        {f"unet.{k}": v for k, v in get_peft_model_state_dict(source.unet).items()}
        | {f"text_encoder.{k}": v for k, v in get_peft_model_state_dict(source.text_encoder).items()}
    )[0]
    kohya = _to_kohya(state, alpha=8.0)
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in kohya)
    assert any(k.endswith(".alpha") for k in kohya)

    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(kohya, adapter_name="kohya")
    config = DMinConfig(num_timesteps=2, sketch_dim=1024, normalize="none", text_encoder_params="lora")
    sketcher = GradientSketcher.from_pipeline(pipe, config)
    assert sketcher.spec.adapters == {"unet": {"kohya": 1.0}, "text_encoder": {"kohya": 1.0}}
    assert all(".kohya." in n for n in sketcher.param_names)
    assert any(n.startswith("text_encoder.") for n in sketcher.param_names)
    expected = GradientSketcher.from_pipeline(source, config)
    assert sketcher.input_dim == expected.input_dim
    images, prompts = structured_images(2), PROMPTS[:2]
    # the alpha (8 for rank 4: scale 2) is honoured: the converted adapter is the source adapter, gradients included
    torch.testing.assert_close(
        sketcher(images=images, prompts=prompts), expected(images=images, prompts=prompts), rtol=1e-4, atol=1e-6
    )


# ---------------------------------------------------------------------------------------------- text encoders


def test_text_encoder_lora_parameters_are_an_opt_in_part_of_the_gradient(lora_dirs):
    pipe = tiny_sd_pipeline()
    pipe.load_lora_weights(lora_dirs["sd", "a"], adapter_name="a")
    assert any("lora_" in n for n, _ in pipe.text_encoder.named_parameters())

    denoiser_only = GradientSketcher.from_pipeline(pipe, DMinConfig(num_timesteps=1, sketch_dim=64))
    assert not any(n.startswith("text_encoder.") for n in denoiser_only.param_names)
    assert denoiser_only.spec.adapters == {"unet": {"a": 1.0}, "text_encoder": {"a": 1.0}}

    images, prompts = structured_images(2), PROMPTS[:2]
    sketcher = check_sketch_matches_reference(
        pipe, sd_reference_loss, images, prompts, params="lora", text_encoder_params="lora"
    )
    text = [i for i, n in enumerate(sketcher.param_names) if n.startswith("text_encoder.")]
    assert text and all("lora_" in sketcher.param_names[i] for i in text)
    assert sketcher._use_vmap() and not sketcher._vmap_failed  # batched: the text-encoder part pulled back per prompt
    # the loop engine encodes the prompt inside every per-pair loss: the same gradients
    looped = GradientSketcher.from_pipeline(pipe, sketcher.config, mode="loop")
    torch.testing.assert_close(
        looped(images=images, prompts=prompts), sketcher(images=images, prompts=prompts), rtol=1e-4, atol=1e-6
    )
    dense = sketcher.full_gradients(images=images[:1], prompts=prompts[:1])[0, 0]
    offsets = torch.tensor([0] + [p.numel() for _, p in sketcher.parameters]).cumsum(0)
    text_part = torch.cat([dense[offsets[i] : offsets[i + 1]] for i in text])
    assert text_part.abs().sum() > 0 and text_part.norm() < dense.norm()
    assert not any(p.grad is not None for p in pipe.text_encoder.parameters())
    # the prompt encoding with autograd is the conditioning of the denoiser-only gradient: its part is that gradient
    raw = DMinConfig(num_timesteps=2, sketch_dim=64, normalize="none")
    with_text = GradientSketcher.from_pipeline(pipe, raw.replace(text_encoder_params="lora"))
    both = with_text.full_gradients(images=images, prompts=prompts)
    alone = GradientSketcher.from_pipeline(pipe, raw).full_gradients(images=images, prompts=prompts)
    torch.testing.assert_close(both[..., : alone.shape[-1]], alone, rtol=1e-4, atol=1e-7)

    with pytest.raises(ConfigError, match="no text encoder"):
        GradientSketcher.from_pipeline(tiny_sd_pipeline(), DMinConfig(text_encoder_params="lora"))
    with pytest.raises(ConfigError, match="text_encoder_params"):
        DMinConfig(text_encoder_params="all")


def test_sdxl_lora_of_both_text_encoders(tmp_path):
    save_random_lora("sdxl", tmp_path / "lora", seed=4, text_encoder=True)
    pipe = tiny_sdxl_pipeline()
    pipe.load_lora_weights(tmp_path / "lora", adapter_name="te")
    images, prompts = structured_images(2), PROMPTS[:2]
    sketcher = check_sketch_matches_reference(
        pipe, sdxl_reference_loss, images, prompts, params="lora", text_encoder_params="lora"
    )
    assert {n.split(".", 1)[0] for n in sketcher.param_names} >= {"text_encoder", "text_encoder_2"}
    assert sketcher.spec.adapters == {"unet": {"te": 1.0}, "text_encoder": {"te": 1.0}, "text_encoder_2": {"te": 1.0}}
    looped = GradientSketcher.from_pipeline(pipe, sketcher.config, mode="loop")
    torch.testing.assert_close(
        looped(images=images, prompts=prompts), sketcher(images=images, prompts=prompts), rtol=1e-4, atol=1e-6
    )


def test_indices_without_recorded_adapters_still_match(lora_dirs):
    sketcher = GradientSketcher.from_pipeline(_loaded("sd", lora_dirs), DMinConfig(num_timesteps=1, sketch_dim=64))
    data = sketcher.spec.to_dict()
    del data["adapters"]  # as written before adapters were recorded
    legacy = SketchSpec.from_dict(data)
    assert legacy.adapters is None and legacy.differences(sketcher.spec) == {}
    no_lora = GradientSketcher.from_pipeline(tiny_sd_pipeline(), DMinConfig(num_timesteps=1, sketch_dim=64)).spec
    assert no_lora.adapters == {} and no_lora.to_dict()["adapters"] == {}
