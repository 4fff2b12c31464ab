"""Train the tiny Stable-Diffusion-family pipeline of the detection-rate experiment on the mixed set, on CPU.

The pipeline (see `models.build_sd_pipeline`) is trained from scratch on the *train* split of
`data.build_mixed_set()`: first its VAE as an autoencoder, then its UNet on the VAE latents with the frozen random
CLIP text encoder. The result is saved in float16 (about 2.5 MB) with `training_log.json` and `samples.png`
(one generated image per test caption of each subset, next to the real test images).

Usage (about 15 minutes with one thread on a shared 2-core machine):

    python -m benchmarks.quality.train_sd_mixed --threads 1
    python -m benchmarks.quality.train_sd_mixed --unet-steps 300 --vae-steps 200 --output-dir /tmp/sd  # smoke test
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from .common import CHECKPOINT_DIR, base_parser, command_line, log, set_threads
from .data import NOISE_SUBSET, SUBSETS, build_mixed_set
from .models import SDRecipe, build_sd_pipeline, generate_sd, load_sd_pipeline, save_sd_pipeline, train_sd_pipeline


DEFAULT_DIR = CHECKPOINT_DIR / "tiny-sd-mixed"


def save_samples(pipe, mixed, path: Path, per_subset: int = 8, seed: int = 0) -> None:
    """A grid: for each subset one row of real test images and one row of images generated from their captions."""
    from PIL import Image

    test = mixed.rows("test")
    rows = []
    for subset in (*SUBSETS, NOISE_SUBSET):
        chosen = [i for i in test if mixed.subsets[i] == subset][:per_subset]
        real = mixed.pixels(np.asarray(chosen))
        fake = generate_sd(pipe, [mixed.captions[i] for i in chosen], seed=seed)
        rows += [real, fake]
    size = rows[0].shape[-1]
    grid = np.zeros((len(rows) * (size + 1), per_subset * (size + 1), 3), dtype=np.uint8)
    for r, images in enumerate(rows):
        for c, image in enumerate(images):
            tile = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            grid[r * (size + 1) : r * (size + 1) + size, c * (size + 1) : c * (size + 1) + size] = tile
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.Resampling.NEAREST).save(path)


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--output-dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--vae-steps", type=int, default=SDRecipe.vae_steps)
    parser.add_argument("--unet-steps", type=int, default=SDRecipe.unet_steps)
    parser.add_argument("--time-budget", type=float, default=None, help="cap of the UNet phase, seconds")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    recipe = SDRecipe(vae_steps=args.vae_steps, unet_steps=args.unet_steps, seed=args.seed)
    mixed = build_mixed_set()
    train = mixed.rows("train")
    pipe = build_sd_pipeline(mixed.words(), recipe)
    log(
        f"training on {len(train)} images; UNet {sum(p.numel() for p in pipe.unet.parameters()):,} params, "
        f"VAE {sum(p.numel() for p in pipe.vae.parameters()):,}"
    )
    start = time.perf_counter()
    history = train_sd_pipeline(
        pipe, mixed.pixels(train), [mixed.captions[i] for i in train], recipe, args.time_budget
    )
    history["total_seconds"] = time.perf_counter() - start
    save_sd_pipeline(pipe, args.output_dir)
    pipe = load_sd_pipeline(args.output_dir)  # what every experiment uses: the saved float16 weights
    save_samples(pipe, mixed, args.output_dir / "samples.png")
    training_log = {
        "command": command_line(),
        "recipe": recipe.to_dict(),
        "mixed_set": mixed.info,
        "num_train": len(train),
        "torch_threads": torch.get_num_threads(),
        **history,
    }
    (args.output_dir / "training_log.json").write_text(json.dumps(training_log, indent=2) + "\n")
    log(f"saved to {args.output_dir} after {history['total_seconds']:.0f} s")
    return training_log


if __name__ == "__main__":
    main()
