"""Build a DMin gradient index over a training set with the Python API.

The index holds one `(T, K)` gradient sketch per training sample. Building is resumable (run the same command again
after a crash) and uses every process `accelerate launch` gives it:

    python examples/build_index.py --pipeline path/or/hub-id --dataset path/or/hub-id --output-dir my_index
    accelerate launch --num_processes 2 examples/build_index.py --pipeline ... --dataset ... --output-dir my_index

    # a LoRA fine-tune: the gradients cover the LoRA parameters (params="auto")
    python examples/build_index.py --pipeline stabilityai/stable-diffusion-2-1-base --lora-weights my-org/my-lora \
        --dataset my-org/my-captioned-images --image-column image --prompt-column text --output-dir my_index

`--dataset` is a Hub dataset id, a folder written by `Dataset.save_to_disk`, an image folder (with an optional
`metadata.jsonl` holding captions), or a `.parquet`/`.jsonl`/`.csv` file (image paths relative to the file). The `dmin build` command offers the same with
more options.
"""

from __future__ import annotations

import argparse
from pathlib import Path

# heavy libraries (torch, diffusers, ...) are imported where they are used, so that `--help` answers at once
from diffusers_dmin import DMinConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Build a DMin gradient index over a training set.")
    parser.add_argument("--pipeline", required=True, help="Hub id or local folder of the diffusers pipeline.")
    parser.add_argument("--lora-weights", default=None, help="LoRA weights to load with `load_lora_weights`.")
    parser.add_argument("--dataset", required=True, help="Hub id, save_to_disk folder, image folder, parquet/jsonl.")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--prompt-column", default="text", help="Caption column ('none' for unconditional models).")
    parser.add_argument("--id-column", default=None, help="Integer id column (default: row positions).")
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--num-timesteps", type=int, default=None, help="T (default: DMinConfig's).")
    parser.add_argument("--sketch-dim", type=int, default=4096, help="K.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--overwrite", action="store_true", help="Start over instead of resuming.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None):
    args = parse_args(argv)
    from diffusers import DiffusionPipeline

    from diffusers_dmin import GradientIndex
    from diffusers_dmin.training_data import load_training_dataset

    pipe = DiffusionPipeline.from_pretrained(args.pipeline)
    if args.lora_weights:
        pipe.load_lora_weights(args.lora_weights)
    # relative image paths in jsonl/csv/parquet files are resolved against the file's folder (image_root)
    dataset, image_root = load_training_dataset(args.dataset, split=args.split)
    config = DMinConfig(sketch_dim=args.sketch_dim, seed=args.seed)
    if args.num_timesteps is not None:
        config = config.replace(num_timesteps=args.num_timesteps)
    index = GradientIndex.build(
        pipe,
        dataset,
        config,
        output_dir=args.output_dir,
        image_column=args.image_column,
        prompt_column=None if args.prompt_column.lower() == "none" else args.prompt_column,
        id_column=args.id_column,
        batch_size=args.batch_size,
        resume=not args.overwrite,
        image_root=image_root,
    )
    print(f"{len(index)} training samples indexed in {args.output_dir}: {index}")
    return index


if __name__ == "__main__":
    main()
