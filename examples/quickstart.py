"""Quickstart: which training digits made this generated digit?

Everything runs offline on a CPU (measured on 2 CPU cores with the library's default of one torch thread for the
gradients: 103 s idle, 196 s beside two busy-loop processes, 370 s at load average 8-10; see the README's Set up):

1. load a small DDPM trained on scikit-learn's 1,797 real handwritten digits (committed in
   `examples/checkpoints/ddpm-digits`, rebuilt by `examples/train_ddpm_digits.py`);
2. build a DMin index over every training digit: per-sample gradients of the diffusion loss at a few timesteps,
   L2-normalised, sketched to K numbers each, saved as safetensors shards (resumable: a second run reuses it);
3. generate digits with DDIM and attribute each one to its most influential training digits in the same call
   (`InfluencePipeline(..., return_influence=True)`);
4. write `quickstart_influence.png` (each generated digit, then its top-k training digits with ids, scores and
   labels, under a legend) and print a table. A small classifier fitted on the training digits labels the generated
   ones, so the table also shows how many of the retrieved digits share the generated digit's class.

Usage:
    python examples/quickstart.py                       # writes quickstart_output/quickstart_influence.png
    python examples/quickstart.py --num-images 16 --top-k 8 --output-dir my_run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

# heavy libraries (torch, diffusers, ...) are imported where they are used, so that `--help` answers at once
from diffusers_dmin import DMinConfig


CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "ddpm-digits"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Generate handwritten digits and find the training digits that most influenced each one.",
        epilog="example: python examples/quickstart.py --num-images 8 --top-k 6",
    )
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="A DDPMPipeline folder trained on digits.")
    parser.add_argument("--output-dir", type=Path, default=Path("quickstart_output"), help="Index and PNG go here.")
    parser.add_argument("--num-images", type=int, default=8, help="How many digits to generate.")
    parser.add_argument("--top-k", type=int, default=6, help="Training digits shown per generated digit.")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="DDIM steps.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the generation.")
    parser.add_argument("--num-timesteps", type=int, default=None, help="T (default: DMinConfig's).")
    parser.add_argument("--sketch-dim", type=int, default=4096, help="K, the sketch size.")
    parser.add_argument("--batch-size", type=int, default=64, help="Training digits per gradient batch.")
    parser.add_argument("--limit", type=int, default=None, help="Index only the first N digits (for quick tests).")
    parser.add_argument("--overwrite", action="store_true", help="Rebuild the index instead of resuming it.")
    parser.add_argument("--device", default=None, help="Torch device (default: cuda when available, else cpu).")
    return parser.parse_args(argv)


def label_generated(train_images, train_labels, generated):
    """Label generated digits with a logistic regression fitted on the training digits' pixels."""
    from sklearn.linear_model import LogisticRegression

    classifier = LogisticRegression(max_iter=2000).fit(train_images.reshape(len(train_images), -1), train_labels)
    return classifier.predict(generated.reshape(len(generated), -1))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    import numpy as np
    import torch
    from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline

    from diffusers_dmin import GradientIndex, InfluencePipeline
    from diffusers_dmin.data import load_digits
    from diffusers_dmin.viz import influence_grid

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    ddpm = DDPMPipeline.from_pretrained(args.checkpoint)
    # generate with 50 DDIM steps instead of 1,000 DDPM steps: same model, same training objective
    pipe = DDIMPipeline(unet=ddpm.unet, scheduler=DDIMScheduler.from_config(ddpm.scheduler.config)).to(device)
    dataset = load_digits(image_size=ddpm.unet.config.sample_size)
    if args.limit is not None:
        dataset = dataset.select(range(args.limit))

    config = DMinConfig() if args.num_timesteps is None else DMinConfig(num_timesteps=args.num_timesteps)
    config = config.replace(sketch_dim=args.sketch_dim)
    index = GradientIndex.build(
        pipe,
        dataset,
        config,
        output_dir=args.output_dir / "index",
        image_column="image",
        prompt_column=None,
        id_column="id",
        batch_size=args.batch_size,
        resume=not args.overwrite,
    )
    index.attach_dataset(dataset)
    built = time.perf_counter()

    influence_pipe = InfluencePipeline(pipe, index)
    pipe.set_progress_bar_config(desc=f"Generating ({args.num_inference_steps} DDIM steps)")
    out = influence_pipe(
        batch_size=args.num_images,
        generator=torch.Generator().manual_seed(args.seed),
        num_inference_steps=args.num_inference_steps,
        output_type="np",
        return_influence=True,
        top_k=args.top_k,
    )
    generated = time.perf_counter()

    args.output_dir.mkdir(parents=True, exist_ok=True)
    png = args.output_dir / "quickstart_influence.png"
    influence_grid(out.influence, image_column="image", query_caption="generated").save(png)

    train_images = np.stack([np.asarray(image, dtype=np.float32) / 255.0 for image in dataset["image"]])
    train_labels = np.asarray(dataset["label"])
    predicted = label_generated(train_images, train_labels, out.images[..., 0])
    label_of_id = dict(zip(dataset["id"], train_labels.tolist()))
    print(f"\n{'image':>5}  {'looks like':>10}  {'top training digits (id:label score)':<60}  same class")
    shares = []
    for i, (result, label) in enumerate(zip(out.influence, predicted)):
        labels = [label_of_id[int(sid)] for sid in result.sample_ids]
        shares.append(float(np.mean([lab == label for lab in labels])))
        top = "  ".join(
            f"{int(s)}:{lab} {score:.2f}" for s, lab, score in zip(result.sample_ids[:4], labels, result.scores)
        )
        print(f"{i:>5}  {label:>10}  {top:<60}  {shares[-1]:.0%}")
    summary = {
        "png": str(png),
        "num_training_digits": len(index),
        "index_seconds": built - start,
        "generate_and_attribute_seconds": generated - built,
        "total_seconds": time.perf_counter() - start,
        "same_class_share_top_k": float(np.mean(shares)),
        "timings": influence_pipe.timings,
    }
    print(
        f"\n{len(index)} training digits indexed; share of top-{args.top_k} training digits of the generated digit's "
        f"class: {summary['same_class_share_top_k']:.0%} (random: about 10%).\nWrote {png} in "
        f"{summary['total_seconds']:.0f} s."
    )
    return summary


if __name__ == "__main__":
    main()
