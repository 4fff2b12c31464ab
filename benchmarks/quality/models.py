"""The models the quality benchmarks train on CPU.

1. **The counterfactual digits DDPM** (`DDPMRecipe`, `train_ddpm`): a ~177k-parameter `UNet2DModel` on the 1,797
   scikit-learn digits at their native 8x8, epsilon prediction, cosine schedule. Training is a pure function of
   `(recipe, weights)`: the initial weights come from `recipe.seed`, and the minibatch order, noise and timesteps
   come from one generator that draws over *all* 1,797 indices. Removing samples sets their weight to 0 (each
   batch's loss is the weighted mean over its rows), so a retrain "without S" sees exactly the same random stream
   as the reference run, minus S. This is "retrain from the same initialisation and seed" with the smallest
   possible difference between runs (DESIGN §7, issue 7 item 4).
2. **The tiny Stable-Diffusion-family pipeline** of the detection-rate experiment (`build_sd_pipeline`,
   `train_sd_pipeline`): a `StableDiffusionPipeline` with an offline CLIP tokenizer (one token per caption word), a
   random frozen 2-layer CLIP text encoder, a small `AutoencoderKL` (16x16 RGB -> 8x8x4) trained briefly as an
   autoencoder, and a ~1M-parameter `UNet2DConditionModel` with cross-attention at both levels, trained from
   scratch on latents (10% of the captions dropped for classifier-free guidance).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .common import log


# ---------------------------------------------------------------------------------------------- digits DDPM


@dataclass(frozen=True)
class DDPMRecipe:
    """Everything that decides a digits-DDPM training run (with the sample weights)."""

    image_size: int = 8
    block_out_channels: tuple[int, ...] = (16, 32)
    layers_per_block: int = 1
    attention_head_dim: int = 16
    steps: int = 800
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 40
    max_grad_norm: float = 1.0
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_ddpm_unet(recipe: DDPMRecipe):
    """The UNet2DModel of a recipe, initialised from `recipe.seed` (attention only at the lowest resolution)."""
    from diffusers import UNet2DModel

    levels = len(recipe.block_out_channels)
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed)
        unet = UNet2DModel(
            sample_size=recipe.image_size,
            in_channels=1,
            out_channels=1,
            block_out_channels=tuple(recipe.block_out_channels),
            layers_per_block=recipe.layers_per_block,
            down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
            norm_num_groups=8,
            attention_head_dim=recipe.attention_head_dim,
        )
    return unet


def ddpm_scheduler(recipe: DDPMRecipe):
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=recipe.num_train_timesteps, beta_schedule=recipe.beta_schedule)


def train_ddpm(images: torch.Tensor, recipe: DDPMRecipe, weights: np.ndarray | None = None):
    r"""
    Train the recipe's DDPM on `images` (`(N, 1, s, s)` in `[0, 1]`) and return a `DDIMPipeline` (eval mode).

    `weights` (`(N,)`, default all ones) weight each sample's loss; 0 removes a sample. The random stream (batch
    order, noise, timesteps) does not depend on `weights`, so runs differ only through the removed samples.
    """
    from diffusers import DDIMPipeline, DDIMScheduler
    from diffusers.optimization import get_scheduler

    n = len(images)
    x_all = images * 2.0 - 1.0
    w_all = torch.ones(n) if weights is None else torch.as_tensor(np.asarray(weights), dtype=torch.float32)
    unet = build_ddpm_unet(recipe)
    scheduler = ddpm_scheduler(recipe)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    lr_scheduler = get_scheduler(
        "cosine", optimizer=optimizer, num_warmup_steps=recipe.warmup_steps, num_training_steps=recipe.steps
    )
    generator = torch.Generator().manual_seed(recipe.seed + 1)
    unet.train()
    step = 0
    while step < recipe.steps:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - recipe.batch_size + 1, recipe.batch_size):
            idx = order[start : start + recipe.batch_size]
            x0 = x_all[idx]
            noise = torch.randn(x0.shape, generator=generator)
            t = torch.randint(0, recipe.num_train_timesteps, (len(idx),), generator=generator)
            w = w_all[idx]
            pred = unet(scheduler.add_noise(x0, noise, t), t).sample
            per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
            loss = (per_sample * w).sum() / w.sum().clamp_min(1.0)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), recipe.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step >= recipe.steps:
                break
    unet.eval()
    for p in unet.parameters():
        p.requires_grad_(True)
    pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_ddpm(pipe, num: int, seed: int, steps: int = 25) -> torch.Tensor:
    """`num` samples with DDIM (eta 0) from `seed`: float32 `(num, 1, s, s)` in `[0, 1]`."""
    images = pipe(
        batch_size=num, generator=torch.Generator().manual_seed(seed), num_inference_steps=steps, output_type="np"
    ).images
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def digit_classifier(image_size: int = 8):
    """An RBF-SVM on the 1,797 digits (pixels in [0, 1]); `.predict_proba(images (n, s*s))` labels generated digits."""
    from sklearn.svm import SVC

    from .data import digits

    pixels, labels = digits(image_size)
    return SVC(probability=True, random_state=0).fit(pixels.reshape(len(labels), -1).numpy(), labels)


# ---------------------------------------------------------------------------------------------- tiny SD pipeline


@dataclass(frozen=True)
class SDRecipe:
    """The tiny Stable-Diffusion-family pipeline and its CPU training run."""

    image_size: int = 16
    block_out_channels: tuple[int, ...] = (32, 64)
    cross_attention_dim: int = 32
    attention_head_dim: int = 8
    text_hidden_size: int = 32
    max_length: int = 16
    vae_steps: int = 1500
    vae_batch_size: int = 64
    vae_lr: float = 2e-3
    unet_steps: int = 3000
    unet_batch_size: int = 64
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_sd_pipeline(words: list[str], recipe: SDRecipe):
    """An untrained `StableDiffusionPipeline` of the recipe, with an offline tokenizer for `words`."""
    import transformers
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    from diffusers_dmin.testing import tiny_clip_tokenizer

    tokenizer = tiny_clip_tokenizer(words, model_max_length=recipe.max_length)
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed)
        text_encoder = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=recipe.text_hidden_size,
                intermediate_size=2 * recipe.text_hidden_size,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=recipe.max_length,
                projection_dim=recipe.text_hidden_size,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(16, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=recipe.image_size,
        )
        levels = len(recipe.block_out_channels)
        unet = UNet2DConditionModel(
            sample_size=recipe.image_size // 2,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=tuple(recipe.block_out_channels),
            down_block_types=("CrossAttnDownBlock2D",) * levels,
            up_block_types=("CrossAttnUpBlock2D",) * levels,
            cross_attention_dim=recipe.cross_attention_dim,
            attention_head_dim=recipe.attention_head_dim,
            norm_num_groups=8,
        )
    for module in (text_encoder, vae, unet):
        module.eval()
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def encode_captions(pipe, captions: list[str]) -> torch.Tensor:
    """CLIP hidden states `(n, max_length, hidden)` exactly as the pipeline's `encode_prompt` computes them."""
    out = []
    for start in range(0, len(captions), 256):
        embeds, _ = pipe.encode_prompt(captions[start : start + 256], torch.device("cpu"), 1, False)
        out.append(embeds)
    return torch.cat(out)


def train_sd_pipeline(pipe, pixels: torch.Tensor, captions: list[str], recipe: SDRecipe, time_budget: float | None):
    r"""
    Train the VAE (as an autoencoder, tiny KL weight) and then the UNet (epsilon prediction, SD's scaled-linear
    schedule) of `pipe` in place on `pixels` (`(N, 3, s, s)` in `[0, 1]`) with `captions`. The text encoder stays
    frozen at its random initialisation. `time_budget` (seconds) caps the UNet phase. Returns a training log.
    """
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    generator = torch.Generator().manual_seed(recipe.seed + 1)
    x_all = pixels * 2.0 - 1.0
    n = len(x_all)
    history: dict[str, Any] = {"vae_loss": [], "unet_loss": []}

    # --- VAE
    vae = pipe.vae
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=1e-4)
    lr_sched = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=20, num_training_steps=recipe.vae_steps)
    start = time.perf_counter()
    running = []
    for step in range(recipe.vae_steps):
        idx = torch.randint(0, n, (recipe.vae_batch_size,), generator=generator)
        x = x_all[idx]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        recon = vae.decode(z).sample
        loss = F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())
        if (step + 1) % 100 == 0:
            history["vae_loss"].append(float(np.mean(running)))
            running = []
            log(f"VAE step {step + 1}/{recipe.vae_steps}: loss {history['vae_loss'][-1]:.4f}")
    vae.eval()
    history["vae_seconds"] = time.perf_counter() - start
    with torch.no_grad():
        latents = torch.cat([vae.encode(x_all[i : i + 256]).latent_dist.mode() for i in range(0, n, 256)])
        recon = torch.cat([vae.decode(latents[i : i + 256]).sample for i in range(0, n, 256)])
        history["vae_recon_mse"] = float(F.mse_loss(recon.clamp(-1, 1), x_all))
        scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    latents = latents * scaling
    history["scaling_factor"] = scaling

    # --- UNet
    embeds = encode_captions(pipe, list(captions))
    empty = encode_captions(pipe, [""])[0]
    unet = pipe.unet
    unet.train()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=1e-4)
    lr_sched = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=50, num_training_steps=recipe.unet_steps)
    start = time.perf_counter()
    running = []
    steps_done = 0
    for step in range(recipe.unet_steps):
        idx = torch.randint(0, n, (recipe.unet_batch_size,), generator=generator)
        z0 = latents[idx]
        cond = embeds[idx].clone()
        drop = torch.rand(len(idx), generator=generator) < recipe.caption_dropout
        cond[drop] = empty
        noise = torch.randn(z0.shape, generator=generator)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(idx),), generator=generator)
        pred = unet(noise_scheduler.add_noise(z0, noise, t), t, encoder_hidden_states=cond).sample
        loss = F.mse_loss(pred, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_sched.step()
        optimizer.zero_grad(set_to_none=True)
        running.append(loss.item())
        steps_done = step + 1
        if steps_done % 100 == 0:
            history["unet_loss"].append(float(np.mean(running)))
            running = []
            log(f"UNet step {steps_done}/{recipe.unet_steps}: loss {history['unet_loss'][-1]:.4f}")
        if time_budget is not None and time.perf_counter() - start > time_budget:
            log(f"UNet training stopped by the time budget after {steps_done} steps")
            break
    unet.eval()
    history["unet_seconds"] = time.perf_counter() - start
    history["unet_steps_done"] = steps_done
    return history


def save_sd_pipeline(pipe, folder: Path) -> None:
    """Save in float16 (loads back as float32 with `load_sd_pipeline`)."""
    import copy

    folder.mkdir(parents=True, exist_ok=True)
    half = copy.deepcopy(pipe)
    for name in ("unet", "vae", "text_encoder"):
        torch.nn.Module.to(getattr(half, name), torch.float16)
    half.save_pretrained(folder, safe_serialization=True)


def load_sd_pipeline(folder: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        folder, dtype=torch.float32, safety_checker=None, requires_safety_checker=False, local_files_only=True
    )
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate_sd(pipe, prompts: list[str], seed: int, steps: int = 25, guidance_scale: float = 3.0) -> torch.Tensor:
    """One image per prompt, each from its own seeded generator: float32 `(n, 3, s, s)` in `[0, 1]`."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    images = pipe(
        prompts, generator=generators, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="np"
    ).images
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
