"""Fine-tune a LoRA on an image+caption dataset, index its training set with DMin, and attribute generations.

The fine-tuning follows diffusers' `examples/text_to_image/train_text_to_image_lora.py` (Stable Diffusion 1.x/2.x,
PEFT LoRA on the UNet's attention projections, accelerate for devices and processes), with the defaults of the
DMin paper's Table 7 for LoRA: rank 4, alpha 8, targets to_k/to_q/to_v/to_out.0, learning rate 1e-3, float32.
Then the same process builds the DMin index of the training set (gradients with respect to the LoRA parameters,
`params="auto"`), generates images for a few prompts and writes a grid of each image next to its most influential
training images.

Usage:
    # offline smoke run of every step on a tiny randomly initialised Stable Diffusion pipeline and 64 bundled digits
    # (30 LoRA steps, T=4, K=1024, 10 inference steps, one torch thread): about 1 minute on 2 busy CPU cores
    python examples/lora_finetune_and_attribute.py --tiny --output-dir lora_run

    # a real checkpoint and dataset (needs the Hub), the same code
    accelerate launch examples/lora_finetune_and_attribute.py \
        --pretrained-model stable-diffusion-v1-5/stable-diffusion-v1-5 --dataset lambdalabs/naruto-blip-captions \
        --resolution 512 --max-train-steps 1500 --prompts "a man with blue hair" --output-dir naruto_lora
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

# heavy libraries (torch, diffusers, ...) are imported where they are used, so that `--help` answers at once
from diffusers_dmin import DMinConfig


TINY_DEFAULTS = {
    "num_threads": 1,
    "max_train_samples": 64,
    "max_train_steps": 30,
    "num_timesteps": 4,
    "sketch_dim": 1024,
    "num_inference_steps": 10,
}
FULL_DEFAULTS = {"max_train_steps": 200, "sketch_dim": 4096, "num_inference_steps": 30}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fine-tune a LoRA, index its training set with DMin, attribute.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tiny", action="store_true", help="Offline: a tiny random SD pipeline and bundled digits.")
    source.add_argument("--pretrained-model", help="Hub id or folder of a Stable Diffusion 1.x/2.x pipeline.")
    parser.add_argument("--dataset", default=None, help="Hub id or folder of an image+caption dataset.")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--caption-column", default="text")
    parser.add_argument(
        "--max-train-samples", type=int, default=None, help="Use only the first N training rows (--tiny: 64)."
    )
    parser.add_argument("--resolution", type=int, default=None, help="Default: the pipeline's native resolution.")
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=int, default=8)
    parser.add_argument("--target-modules", nargs="+", default=["to_k", "to_q", "to_v", "to_out.0"])
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument("--max-train-steps", type=int, default=None, help="Default 200 (--tiny: 30).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-timesteps", type=int, default=None, help="DMin T (default: DMinConfig's; --tiny: 4).")
    parser.add_argument("--sketch-dim", type=int, default=None, help="DMin K (default 4096; --tiny: 1024).")
    parser.add_argument("--index-batch-size", type=int, default=16)
    parser.add_argument("--prompts", nargs="+", default=None, help="Prompts to generate and attribute.")
    parser.add_argument("--num-inference-steps", type=int, default=None, help="Default 30 (--tiny: 10).")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--top-k", type=int, default=6)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument(
        "--num-threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: 1 with --tiny, where more threads only wait for each other on a busy "
        "machine; else torch's default).",
    )
    args = parser.parse_args(argv)
    if args.pretrained_model and not args.dataset:
        parser.error("--dataset is required with --pretrained-model")
    # --tiny is a smoke run of every step (53 s measured on 2 busy CPU cores), not a meaningful fine-tune
    defaults = TINY_DEFAULTS if args.tiny else FULL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def load_pipeline_and_data(args: argparse.Namespace):
    import torch
    from datasets import load_dataset
    from diffusers import StableDiffusionPipeline

    if args.tiny:
        from diffusers_dmin.data import load_digits
        from diffusers_dmin.testing import tiny_sd_pipeline

        pipe = tiny_sd_pipeline(seed=args.seed)
        dataset = load_digits(image_size=16)  # grey-scale digits; converted to RGB for the SD VAE
        prompts = args.prompts or ["a handwritten digit 3", "a handwritten digit 7"]
        args.guidance_scale = 1.0 if args.guidance_scale == 7.5 else args.guidance_scale
    else:
        pipe = StableDiffusionPipeline.from_pretrained(args.pretrained_model, torch_dtype=torch.float32)
        dataset = load_dataset(args.dataset, split="train")
        prompts = args.prompts or dataset[:2][args.caption_column]
    if args.max_train_samples is not None:
        dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    return pipe, dataset, prompts


def train_lora(args: argparse.Namespace, pipe, dataset, resolution: int) -> None:
    """LoRA fine-tuning of the UNet, as in diffusers' train_text_to_image_lora.py (simplified)."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from tqdm.auto import tqdm

    from diffusers_dmin.objectives import prepare_images

    accelerator = Accelerator(mixed_precision="no")
    set_seed(args.seed)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    for module in (unet, vae, text_encoder):
        module.requires_grad_(False)
    unet.add_adapter(
        LoraConfig(
            r=args.rank, lora_alpha=args.alpha, init_lora_weights="gaussian", target_modules=args.target_modules
        )
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate)

    def collate(rows):
        pixels = prepare_images([row[args.image_column] for row in rows], resolution, 3) * 2 - 1
        ids = tokenizer(
            [row[args.caption_column] for row in rows],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        return pixels, ids

    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=collate,
        generator=torch.Generator().manual_seed(args.seed),
    )
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    unet.train()
    epochs = math.ceil(args.max_train_steps / len(loader))
    bar = tqdm(total=args.max_train_steps, desc="LoRA fine-tuning", disable=not accelerator.is_local_main_process)
    step = 0
    for _ in range(epochs):
        for pixels, ids in loader:
            with accelerator.accumulate(unet):
                latents = vae.encode(pixels).latent_dist.sample() * vae.config.scaling_factor
                noise = torch.randn_like(latents)
                timesteps = torch.randint(
                    0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device
                )
                noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                hidden = text_encoder(ids, return_dict=False)[0]
                pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
                if noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(latents, noise, timesteps)
                else:
                    target = noise
                loss = F.mse_loss(pred.float(), target.float())
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            if step >= args.max_train_steps:
                break
        if step >= args.max_train_steps:
            break
    bar.close()
    unet = accelerator.unwrap_model(unet)
    unet.eval()
    if accelerator.is_main_process:
        lora_state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
        StableDiffusionPipeline.save_lora_weights(args.output_dir / "lora", unet_lora_layers=lora_state)
    accelerator.wait_for_everyone()


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch

    from diffusers_dmin import GradientIndex, InfluencePipeline
    from diffusers_dmin.viz import influence_grid

    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    pipe, dataset, prompts = load_pipeline_and_data(args)
    resolution = args.resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
    train_lora(args, pipe, dataset, resolution)

    config = DMinConfig(sketch_dim=args.sketch_dim, seed=args.seed, resolution=resolution)
    if args.num_timesteps is not None:
        config = config.replace(num_timesteps=args.num_timesteps)
    index = GradientIndex.build(
        pipe,
        dataset,
        config,
        output_dir=args.output_dir / "index",
        image_column=args.image_column,
        prompt_column=args.caption_column,
        batch_size=args.index_batch_size,
    )
    index.attach_dataset(dataset)
    influence_pipe = InfluencePipeline(pipe, index)
    pipe.set_progress_bar_config(desc=f"Generating ({args.num_inference_steps} denoising steps)")
    out = influence_pipe(
        prompts,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        generator=torch.Generator().manual_seed(args.seed),
        return_influence=True,
        top_k=args.top_k,
    )
    grid = args.output_dir / "influence.png"
    influence_grid(out.influence, image_column=args.image_column, query_caption="generated").save(grid)
    for prompt, result in zip(prompts, out.influence):
        print(f"{prompt!r}: most influential training rows {result.sample_ids.tolist()}")
    print(f"LoRA weights in {args.output_dir / 'lora'}, index in {args.output_dir / 'index'}, grid in {grid}")
    return {"index": index, "output": out, "grid": grid, "lora": args.output_dir / "lora"}


if __name__ == "__main__":
    main()
