"""Generate images with a diffusers pipeline and show, for each, its most influential training samples.

The pipeline must be the one the index was built for (same weights, same LoRA); `InfluencePipeline` checks this
before generating anything. The grid (`--output`) shows each generated image, then its top-k training samples with
their ids and scores under a legend; without `--dataset` the training images are grey boxes labelled "dataset not
attached".

Usage:
    python examples/generate_with_influence.py --pipeline path/or/hub-id --index path/or/hub-repo \
        --prompt "a pokemon with blue wings" --num-images 2 --top-k 8 --output influence.png

    # with a LoRA loaded on top of the base pipeline, and the training set attached for the grid:
    python examples/generate_with_influence.py --pipeline stabilityai/stable-diffusion-2-1-base \
        --lora-weights my-org/my-lora --index my-org/my-lora-dmin-index --dataset my-org/my-dataset \
        --prompt "a cat in a hat"

`--dataset` is read like `dmin build --dataset`: a Hub dataset id, a `save_to_disk` folder, an image folder (with
an optional `metadata.jsonl`), or a `.jsonl`/`.json`/`.parquet`/`.csv` file (image paths relative to the file).
"""

from __future__ import annotations

import argparse
from pathlib import Path

# heavy libraries (torch, diffusers, ...) are imported where they are used, so that `--help` answers at once
import diffusers_dmin  # noqa: F401  (light; silences third-party notices before diffusers loads)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate images and attribute them to training samples with DMin.")
    parser.add_argument("--pipeline", required=True, help="Hub id or local folder of the diffusers pipeline.")
    parser.add_argument("--lora-weights", default=None, help="LoRA weights to load with `load_lora_weights`.")
    parser.add_argument("--index", required=True, help="Hub repo id or local folder of the DMin index.")
    parser.add_argument(
        "--dataset",
        default=None,
        help="The training set, to draw its images: a Hub id, a save_to_disk folder, an image folder or a "
        ".jsonl/.parquet/.csv file (as `dmin build --dataset`).",
    )
    parser.add_argument("--split", default="train", help="Split of `--dataset`.")
    parser.add_argument(
        "--image-column", default=None, help="Image column of `--dataset` (default: the one the index was built with)."
    )
    parser.add_argument("--id-column", default=None, help="Sample id column (default: the one the index records).")
    parser.add_argument("--prompt", default=None, help="Prompt (omit for unconditional pipelines).")
    parser.add_argument("--num-images", type=int, default=1, help="Images per prompt (batch size for DDPM).")
    parser.add_argument("--num-inference-steps", type=int, default=30)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("influence.png"), help="Grid PNG to write.")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    import torch
    from diffusers import DiffusionPipeline

    from diffusers_dmin import InfluencePipeline
    from diffusers_dmin.images import decode_image
    from diffusers_dmin.training_data import load_training_dataset
    from diffusers_dmin.viz import influence_grid

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    if args.lora_weights:
        pipe.load_lora_weights(args.lora_weights)
    pipe.set_progress_bar_config(desc=f"Generating ({args.num_inference_steps} denoising steps)")
    influence_pipe = InfluencePipeline.from_pretrained(pipe, args.index).to(device)
    index = influence_pipe.index
    columns = index.metadata.extra.get("columns") or {}
    image_column = args.image_column or columns.get("image") or "image"
    image_root = None
    if args.dataset:
        # the same loader as `dmin build`: Hub ids, save_to_disk folders, image folders, jsonl/parquet/csv files
        dataset, image_root = load_training_dataset(args.dataset, split=args.split)
        index.attach_dataset(dataset, id_column=args.id_column or index.metadata.id_column)

    kwargs = {"num_inference_steps": args.num_inference_steps, "generator": torch.Generator().manual_seed(args.seed)}
    if args.prompt is None:
        kwargs["batch_size"] = args.num_images
    else:
        kwargs.update(prompt=args.prompt, num_images_per_prompt=args.num_images)
    if args.guidance_scale is not None:
        kwargs["guidance_scale"] = args.guidance_scale
    out = influence_pipe(return_influence=True, top_k=args.top_k, **kwargs)

    for i, result in enumerate(out.influence):
        pairs = ", ".join(f"{int(s)} ({score:.3f})" for s, score in zip(result.sample_ids, result.scores))
        print(f"image {i}: {pairs}")
    images = None
    if args.dataset:  # image columns may hold paths (jsonl/csv): decode them the way the build did
        images = [[decode_image(row[image_column], image_root) for row in result.samples] for result in out.influence]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    influence_grid(out.influence, images=images, query_caption="generated").save(args.output)
    note = "" if args.dataset else " (grey boxes: pass --dataset to draw the training images)"
    print(f"wrote {args.output}{note}")
    return out


if __name__ == "__main__":
    main()
