"""Sketches per second: our GradientSketcher vs an official-DMin-style loop, on tiny SD (LoRA and full) and SD3.

The official-style loop does what the official DMin code does per sample: for each timestep one forward and one
`loss.backward()` at batch size 1, concatenate the selected parameters' `.grad` into a D-vector, stack the T
vectors, L2-normalise them and compress. It is run twice: with the official compression (materialised randperm,
gather, signs, reshape-sum) for the timing, and with our sketch applied to its concatenated gradients to check that
both engines give identical scores. Inputs (VAE latents, prompt embeddings, noise, timesteps) are shared.

    python benchmarks/bench_gradients.py           # 16 samples, T = 10, K = 4096
    python benchmarks/bench_gradients.py --quick   # 4 samples, T = 5
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from benchmarks.bench_sketch import official_sketch, official_state
from benchmarks.common import write_results
from diffusers_dmin import DMinConfig
from diffusers_dmin.gradients import GradientSketcher
from diffusers_dmin.testing import add_tiny_lora, tiny_sd3_pipeline, tiny_sd_pipeline


PROMPTS = ["a photo of a cat", "a red square", "the digit three", "a blue circle"]


def official_style(sketcher: GradientSketcher, latents: torch.Tensor, prompts: list[str], compress) -> torch.Tensor:
    """One backward per (sample, timestep), full concatenated gradient, then normalise and compress."""
    adapter, objective = sketcher.adapter, sketcher.objective
    denoiser = adapter.denoiser
    params = [p for _, p in sketcher.parameters]
    flags = [(p, p.requires_grad) for p in denoiser.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    out = []
    try:
        cond = adapter.encode_prompts(prompts) if adapter.conditional else {}
        for i in range(latents.shape[0]):
            rows = []
            for t in sketcher.timesteps:
                ts = torch.tensor([t])
                noisy, target = objective.noisy_and_target(latents[i : i + 1], sketcher.noise[:1], ts)
                c = {k: v[i : i + 1] for k, v in cond.items()}
                pred = adapter.forward(denoiser, noisy, objective.model_timesteps(ts), c)
                F.mse_loss(pred.float(), target.float()).backward()
                rows.append(torch.cat([p.grad.reshape(-1) for p in params]))
                for p in params:
                    p.grad = None
            out.append(compress(F.normalize(torch.stack(rows), dim=-1)))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return torch.stack(out)


def case(name: str, pipe, params: str, num: int, num_timesteps: int, k: int) -> dict:
    # per-timestep normalisation, as the official-style loop does (the comparison is engine against engine)
    config = DMinConfig(num_timesteps=num_timesteps, sketch_dim=k, params=params, normalize="timestep")
    sketcher = GradientSketcher.from_pipeline(pipe, config)
    torch.manual_seed(0)
    latents = torch.randn(num, *sketcher.adapter.latent_shape)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num)]
    perm, signs = official_state(sketcher.input_dim, k)

    sketcher(latents=latents[:1], prompts=prompts[:1])  # warm-up (and sketch tables)
    start = time.perf_counter()
    ours = sketcher(latents=latents, prompts=prompts)
    ours_s = time.perf_counter() - start

    official_style(sketcher, latents[:1], prompts[:1], lambda g: official_sketch(g, perm, signs, k))  # warm-up
    start = time.perf_counter()
    official_style(sketcher, latents, prompts, lambda g: official_sketch(g, perm, signs, k))
    official_s = time.perf_counter() - start
    same_sketch = official_style(sketcher, latents, prompts, sketcher.sketch)

    scores_ours = torch.einsum("atk,btk->ab", ours, ours)
    scores_ref = torch.einsum("atk,btk->ab", same_sketch, same_sketch)
    row = {
        "case": name,
        "D": sketcher.input_dim,
        "num_samples": num,
        "T": len(sketcher.timesteps),
        "K": k,
        "ours_samples_per_s": num / ours_s,
        "official_style_samples_per_s": num / official_s,
        "speedup": official_s / ours_s,
        "max_abs_score_difference_same_sketch": float((scores_ours - scores_ref).abs().max()),
        "max_abs_sketch_difference_same_sketch": float((ours - same_sketch).abs().max()),
    }
    print(
        f"{name}: D={row['D']:,} ours {row['ours_samples_per_s']:.2f}/s, official-style "
        f"{row['official_style_samples_per_s']:.2f}/s, speedup {row['speedup']:.2f}x, "
        f"max score diff {row['max_abs_score_difference_same_sketch']:.2e}",
        flush=True,
    )
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sketch-dim", type=int, default=4096)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    num, num_t = (4, 5) if args.quick else (16, 10)

    sd_lora = tiny_sd_pipeline()
    add_tiny_lora(sd_lora.unet)
    sd3_lora = tiny_sd3_pipeline()
    add_tiny_lora(sd3_lora.transformer)
    rows = [
        case("sd_lora", sd_lora, "auto", num, num_t, args.sketch_dim),
        case("sd_full", tiny_sd_pipeline(), "all", num, num_t, args.sketch_dim),
        case("sd3_lora", sd3_lora, "auto", num, num_t, args.sketch_dim),
        case("sd3_full", tiny_sd3_pipeline(), "all", num, num_t, args.sketch_dim),
    ]
    targets = {
        "at_least_1.5x_faster": all(r["speedup"] >= 1.5 for r in rows),
        "identical_scores_same_sketch": all(r["max_abs_score_difference_same_sketch"] < 1e-3 for r in rows),
    }
    path = write_results(
        "bench_gradients_quick" if args.quick else "bench_gradients", {"rows": rows, "targets": targets}
    )
    print(f"targets: {targets}\nwrote {path}")


if __name__ == "__main__":
    main()
