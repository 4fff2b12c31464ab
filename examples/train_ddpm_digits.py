"""Train a small DDPM on scikit-learn's 1,797 real handwritten digits, on CPU, and save it as a `DDPMPipeline`.

This script rebuilds the checkpoint in `examples/checkpoints/ddpm-digits/` that the DMin quickstart loads (see
`TRAINING.md` there for the exact command, its wall time and its loss). It is a simplified version of diffusers'
`examples/unconditional_image_generation/train_unconditional.py`: a `UNet2DModel` learns to predict the noise
that `DDPMScheduler.add_noise` mixed into a training image (epsilon prediction, mean squared error), with AdamW,
a warm-up + cosine learning-rate schedule, gradient clipping and an exponential moving average (EMA) of the
weights. Differences: no accelerate, no random flips (a mirrored 3 is not a 3), and the data is
`diffusers_dmin.data.load_digits` (shipped inside scikit-learn, so nothing is downloaded).

The defaults are the committed checkpoint: a 989k-parameter UNet (channels 16/32/64, two ResNet layers per
block) that keeps attention only at its lowest resolution (4x4 tokens for 16x16 images: the `AttnDownBlock2D` /
`AttnUpBlock2D` pair plus the mid block, 100,608 parameters). DMin computes per-sample gradients with respect to
these attention parameters by default, so they must exist, and keeping them at low resolution keeps those
gradients cheap (about 1.5 ms per (digit, timestep) pair on one CPU core).

Runs are deterministic for a given `--seed` and `--num-threads` on CPU (the number of threads changes the order
of floating-point sums). `--time-budget` only caps a run: a run it stops early depends on the machine's speed.

Usage:
    pip install -e ".[examples]"
    python examples/train_ddpm_digits.py --output-dir ddpm-digits --epochs 100 --num-threads 1

    # then, anywhere:
    from diffusers import DDPMPipeline
    pipe = DDPMPipeline.from_pretrained("ddpm-digits")  # float32 on CPU, whatever --save-dtype was
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import time
from pathlib import Path

# heavy libraries (torch, diffusers, ...) are imported where they are used, so that `--help` answers at once
import diffusers_dmin  # noqa: F401  (light; silences third-party notices before diffusers loads)


logger = logging.getLogger("train_ddpm_digits")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Train a small DDPM (UNet2DModel + DDPMScheduler) on scikit-learn's handwritten digits on CPU.",
        epilog="example: python examples/train_ddpm_digits.py --output-dir ddpm-digits --epochs 100 --num-threads 1",
    )
    parser.add_argument("--output-dir", type=Path, required=True, help="Where the DDPMPipeline folder is saved.")
    parser.add_argument("--image-size", type=int, default=16, help="Resolution the 8x8 digits are upscaled to.")
    parser.add_argument("--epochs", type=int, default=100, help="Passes over the 1,797 digits.")
    parser.add_argument(
        "--max-train-steps", type=int, default=None, help="Stop after this many optimiser steps (overrides --epochs)."
    )
    parser.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="Stop after this many seconds of training (a cap; the learning-rate schedule still follows --epochs).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed for the weights, the shuffling and the noise.")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="Peak AdamW learning rate.")
    parser.add_argument("--lr-warmup-steps", type=int, default=100)
    parser.add_argument("--weight-decay", type=float, default=1e-4)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument(
        "--ema-decay", type=float, default=0.999, help="Largest EMA decay (warmed up); 0 turns the EMA off."
    )
    parser.add_argument("--num-threads", type=int, default=None, help="torch.set_num_threads (default: torch's).")
    parser.add_argument("--block-out-channels", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--layers-per-block", type=int, default=2)
    parser.add_argument("--norm-num-groups", type=int, default=8)
    parser.add_argument("--attention-head-dim", type=int, default=16)
    parser.add_argument("--num-train-timesteps", type=int, default=1000)
    parser.add_argument("--beta-schedule", default="squaredcos_cap_v2")
    parser.add_argument(
        "--save-dtype",
        choices=["float32", "float16"],
        default="float16",
        help="dtype of the saved weights (float16 halves the file); `DDPMPipeline.from_pretrained` loads float32.",
    )
    parser.add_argument("--num-samples", type=int, default=64, help="Digits drawn for `samples.png` (0: none).")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="DDIM steps for `samples.png`.")
    parser.add_argument("--disable-progress-bar", action="store_true")
    args = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "image_size", "layers_per_block", "num_train_timesteps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, but is {getattr(args, name)}.")
    if args.image_size < 8:
        parser.error(f"--image-size must be at least 8 (the digits are 8x8), but is {args.image_size}.")
    downsampling = 2 ** (len(args.block_out_channels) - 1)
    if args.image_size % downsampling:
        parser.error(
            f"--image-size {args.image_size} must be divisible by {downsampling}, since the UNet halves it "
            f"{len(args.block_out_channels) - 1} times; change --image-size or --block-out-channels."
        )
    if not 0.0 <= args.ema_decay < 1.0:
        parser.error(f"--ema-decay must be in [0, 1), but is {args.ema_decay}.")
    return args


def build_unet(args: argparse.Namespace) -> UNet2DModel:  # noqa: F821
    """A UNet2DModel with attention only at its lowest resolution (and in its mid block)."""
    from diffusers import UNet2DModel

    num_levels = len(args.block_out_channels)
    return UNet2DModel(
        sample_size=args.image_size,
        in_channels=1,
        out_channels=1,
        block_out_channels=tuple(args.block_out_channels),
        layers_per_block=args.layers_per_block,
        down_block_types=("DownBlock2D",) * (num_levels - 1) + ("AttnDownBlock2D",),
        up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (num_levels - 1),
        norm_num_groups=args.norm_num_groups,
        attention_head_dim=args.attention_head_dim,
    )


def save_samples(pipeline_dir: Path, path: Path, num_samples: int, num_inference_steps: int, seed: int) -> None:
    """Reload the saved pipeline, draw digits with DDIM (eta=0) and save them as one grey grid, upscaled 2x."""
    import numpy as np
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline
    from PIL import Image

    ddpm = DDPMPipeline.from_pretrained(pipeline_dir)
    pipeline = DDIMPipeline(unet=ddpm.unet, scheduler=DDIMScheduler.from_config(ddpm.scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    images = pipeline(
        batch_size=num_samples,
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=num_inference_steps,
        eta=0.0,
        output_type="np",
    ).images  # (num_samples, size, size, 1) in [0, 1]
    size, gap = images.shape[1], 2
    cols = math.ceil(math.sqrt(num_samples))
    rows = math.ceil(num_samples / cols)
    grid = np.full((rows * (size + gap) + gap, cols * (size + gap) + gap), 64, dtype=np.uint8)
    for i, image in enumerate(images):
        top, left = gap + (i // cols) * (size + gap), gap + (i % cols) * (size + gap)
        grid[top : top + size, left : left + size] = (image[..., 0] * 255).round().astype(np.uint8)
    grid = Image.fromarray(grid)
    grid.resize((grid.width * 2, grid.height * 2), resample=Image.Resampling.NEAREST).save(path)


def main(argv: list[str] | None = None) -> dict:
    """Train, save the pipeline (and `samples.png`, `training_log.json`) into `--output-dir`; return the log."""
    args = parse_args(argv)
    import torch

    previous_num_threads = torch.get_num_threads()
    if args.num_threads is not None:
        # One thread is often faster on a busy machine: idle OpenMP threads spin while others hold the cores.
        torch.set_num_threads(args.num_threads)
    try:
        return train(args)
    finally:
        torch.set_num_threads(previous_num_threads)  # main() may run inside another process (tests)


def train(args: argparse.Namespace) -> dict:
    """The training loop of [`main`], for already parsed arguments; returns the training log."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMPipeline, DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    from diffusers_dmin.data import digits_tensor

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    images = digits_tensor(args.image_size)
    unet = build_unet(args)
    noise_scheduler = DDPMScheduler(num_train_timesteps=args.num_train_timesteps, beta_schedule=args.beta_schedule)
    num_params = sum(p.numel() for p in unet.parameters())
    num_attention_params = sum(p.numel() for name, p in unet.named_parameters() if ".attentions." in name)
    logger.info(
        f"{len(images)} digits at {args.image_size}x{args.image_size}; UNet with {num_params:,} parameters "
        f"({num_attention_params:,} in attention modules)."
    )

    steps_per_epoch = math.ceil(len(images) / args.batch_size)
    total_steps = args.max_train_steps or args.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    lr_scheduler = get_scheduler(
        "cosine",
        optimizer=optimizer,
        num_warmup_steps=min(args.lr_warmup_steps, total_steps // 10),
        num_training_steps=total_steps,
    )
    ema = None
    if args.ema_decay:
        ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True, power=0.75)

    log = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, "epoch_loss": []}
    log.update(num_params=num_params, num_attention_params=num_attention_params, torch_threads=torch.get_num_threads())
    unet.train()
    step, start = 0, time.perf_counter()
    progress = tqdm(total=total_steps, desc="Training", disable=args.disable_progress_bar)
    while step < total_steps:
        permutation = torch.randperm(len(images), generator=generator)
        epoch_losses = []
        for batch_ids in permutation.split(args.batch_size):
            clean = images[batch_ids]
            noise = torch.randn(clean.shape, generator=generator)
            timesteps = torch.randint(0, args.num_train_timesteps, (len(clean),), generator=generator)
            noisy = noise_scheduler.add_noise(clean, noise, timesteps)
            loss = F.mse_loss(unet(noisy, timesteps).sample, noise)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(unet.parameters())
            step += 1
            epoch_losses.append(loss.item())
            progress.update(1)
            progress.set_postfix(epoch=len(log["epoch_loss"]) + 1, loss=f"{loss.item():.4f}")
            out_of_time = args.time_budget is not None and time.perf_counter() - start > args.time_budget
            if step >= total_steps or out_of_time:
                break
        log["epoch_loss"].append(sum(epoch_losses) / len(epoch_losses))
        logger.info(f"epoch {len(log['epoch_loss'])}: mean loss {log['epoch_loss'][-1]:.4f}")
        if out_of_time and step < total_steps:
            logger.warning(f"Stopped by --time-budget {args.time_budget}s after {step}/{total_steps} steps.")
            break
    progress.close()
    log.update(steps=step, epochs_run=len(log["epoch_loss"]), train_seconds=round(time.perf_counter() - start, 1))
    log["final_epoch_loss"] = log["epoch_loss"][-1]

    if ema is not None:
        ema.copy_to(unet.parameters())
    unet.eval()
    # nn.Module.to: ModelMixin.to warns about casting, but this model has no modules that must stay float32.
    to_save = torch.nn.Module.to(copy.deepcopy(unet), getattr(torch, args.save_dtype))
    args.output_dir.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=to_save, scheduler=noise_scheduler).save_pretrained(args.output_dir, safe_serialization=True)
    if args.num_samples > 0:
        save_samples(
            args.output_dir, args.output_dir / "samples.png", args.num_samples, args.num_inference_steps, args.seed
        )
    (args.output_dir / "training_log.json").write_text(json.dumps(log, indent=2) + "\n")
    logger.info(f"Saved the pipeline to {args.output_dir} after {log['train_seconds']}s of training.")
    return log


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    main()
