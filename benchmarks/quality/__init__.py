"""Attribution-quality benchmarks for diffusers-dmin (issue 7).

Modules:

- `common`: threads, paths, JSON/markdown/PNG output, timers.
- `data`: the digits (8x8 and 16x16) and the mixed conditional set built from data that ships in packages.
- `models`: the small digits DDPM and its seeded, masked retraining; the tiny Stable-Diffusion-family pipeline.
- `baselines`: random, pixel-space cosine, SSIM rankings.
- `metrics`: detection rate, score fidelity (Pearson, Spearman, top-k overlap), LDS, stroke thickness, summaries.
- one module per experiment: `fidelity`, `ablations`, `detection`, `counterfactual`, `thickness`.

`python -m benchmarks.run_all --quick` runs them all at reduced size; see `benchmarks/QUALITY.md`.
"""
