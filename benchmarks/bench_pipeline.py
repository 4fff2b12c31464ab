"""End-to-end overhead of `return_influence=True` on the tiny Stable Diffusion pipeline with a 1,000-row index.

Measured side by side in one run: `pipe(prompt)` (the wrapped pipeline), `pipe(prompt, return_influence=True)` with
its breakdown (generation, gradient, search), and the reference cost of T forward+backward passes of the UNet at
batch size 1 (one per timestep, what an official-style implementation would pay). Target: the influence overhead
(total minus generation) is at most that reference plus 10%.

The index rows are random unit-norm sketches under the pipeline's real spec: search cost depends on the number of
rows, not on their values, and this keeps the benchmark from spending minutes building a real index.

    python benchmarks/bench_pipeline.py
    python benchmarks/bench_pipeline.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import timeit, write_results
from diffusers_dmin import DMinConfig, GradientIndex, GradientSketcher, InfluencePipeline
from diffusers_dmin.testing import tiny_sd_pipeline


def forward_backward_reference(sketcher: GradientSketcher, latents: torch.Tensor, prompt: str) -> float:
    """Seconds for T forward+backward passes of the denoiser at batch size 1 (one per timestep)."""
    adapter, objective = sketcher.adapter, sketcher.objective
    cond = adapter.encode_prompts([prompt])
    params = [p for _, p in sketcher.parameters]
    start = time.perf_counter()
    for t in sketcher.timesteps:
        ts = torch.tensor([t])
        noisy, target = objective.noisy_and_target(latents, sketcher.noise[:1], ts)
        with torch.enable_grad():
            pred = adapter.forward(adapter.denoiser, noisy, objective.model_timesteps(ts), cond)
            torch.autograd.grad(F.mse_loss(pred.float(), target), params)
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--num-inference-steps", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    repeat = 3 if args.quick else 7

    pipe = tiny_sd_pipeline()
    pipe.set_progress_bar_config(disable=True)
    config = DMinConfig(num_timesteps=10, sketch_dim=4096)
    sketcher = GradientSketcher.from_pipeline(pipe, config)
    generator = torch.Generator().manual_seed(0)
    rows = F.normalize(torch.randn(args.rows, len(sketcher.timesteps), config.sketch_dim, generator=generator), dim=-1)
    index = GradientIndex.from_sketches(rows, spec=sketcher.spec, noise=sketcher.noise)
    influence_pipe = InfluencePipeline(pipe, index)
    prompt = "a photo of a cat"
    steps = args.num_inference_steps

    plain = timeit(lambda: pipe(prompt, num_inference_steps=steps, output_type="np"), repeat=repeat)
    breakdowns = []

    def with_influence():
        influence_pipe(prompt, num_inference_steps=steps, output_type="np", return_influence=True, top_k=10)
        breakdowns.append(dict(influence_pipe.timings))

    total = timeit(with_influence, repeat=repeat)
    breakdowns = breakdowns[1:]  # drop the warm-up call
    latents = torch.randn(1, *sketcher.adapter.latent_shape)
    forward_backward_reference(sketcher, latents, prompt)  # warm-up
    reference = statistics.median(forward_backward_reference(sketcher, latents, prompt) for _ in range(repeat))

    breakdown = {k: statistics.median(b[k] for b in breakdowns) for k in breakdowns[0]}
    overhead = breakdown["gradient"] + breakdown["search"]
    result = {
        "pipeline": "tiny StableDiffusionPipeline (UNet 0.8M params, 16x16 images)",
        "num_inference_steps": steps,
        "index_rows": args.rows,
        "T": len(sketcher.timesteps),
        "K": config.sketch_dim,
        "D": sketcher.input_dim,
        "plain_call_s": plain,
        "influence_call_s": total,
        "influence_breakdown_median_s": breakdown,
        "influence_overhead_s": overhead,
        "T_forward_backward_reference_s": reference,
        "overhead_over_reference": overhead / reference,
        "targets": {"overhead_at_most_reference_plus_10_percent": overhead <= 1.1 * reference},
    }
    path = write_results("bench_pipeline_quick" if args.quick else "bench_pipeline", result)
    print(
        f"plain {plain['median_s']:.3f}s, with influence {total['median_s']:.3f}s "
        f"(generation {breakdown['generation']:.3f}s, gradient {breakdown['gradient']:.3f}s, search "
        f"{breakdown['search']:.4f}s); T fwd+bwd reference {reference:.3f}s; overhead/reference "
        f"{overhead / reference:.2f}\nwrote {path}"
    )


if __name__ == "__main__":
    main()
