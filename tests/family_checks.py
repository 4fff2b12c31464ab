"""Checks every model family must pass, shared by the `tests/test_family_*.py` files.

A family's test file supplies what is specific to it: a tiny offline pipeline and a *reference loss written from the
family's diffusers training script* (not by calling the library's adapter), with the signature

    reference_loss(pipe, pixels, prompt, noise, t) -> scalar tensor

where `pixels` is one `(1, C, H, W)` image in `[-1, 1]`, `prompt` its caption (or None), `noise` one `(1, *latent)`
tensor in the VAE latent layout (unpacked) and `t` the integer training timestep index as DMin uses it (larger is
noisier; for flow matching the script's `sigmas[i]` with `i = N - 1 - t`, or `i = t` under Lumina 2's reversed
interpolation, where sigma = 1 is the clean image). The checks then compare the library's
sketches with the reference at K >= D, where the sketch is a signed permutation and inner products are exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from diffusers_dmin import DMinConfig, GradientIndex, GradientSketcher, InfluencePipeline


ReferenceLoss = Callable[[object, torch.Tensor, "str | None", torch.Tensor, int], torch.Tensor]


def structured_images(n: int, size: int = 16, channels: int = 3) -> torch.Tensor:
    """`n` distinct images in `[0, 1]`: a bright rectangle at a different place in each, on a soft gradient."""
    images = torch.linspace(0.05, 0.3, size).view(1, 1, 1, size).repeat(n, channels, size, 1).clone()
    for i in range(n):
        top, left = (3 * i) % (size - 5), (5 * i + 2) % (size - 6)
        images[i, :, top : top + 5, left : left + 6] = 0.9 - 0.05 * (i % 3)
    return images


def exact_sketch_config(sketcher_dim: int, **overrides) -> DMinConfig:
    """A config whose sketch has K >= D buckets (every bucket one signed coordinate: exact inner products)."""
    sketch_dim = 1 << max(0, (sketcher_dim - 1).bit_length())
    settings = dict(num_timesteps=3, timestep_spacing="uniform", sketch_dim=sketch_dim, normalize="timestep")
    settings.update(overrides)
    return DMinConfig(**settings)


def reference_gradients(
    pipe, sketcher: GradientSketcher, reference_loss: ReferenceLoss, images: torch.Tensor, prompts
) -> torch.Tensor:
    """`(B, T, D)` gradients of `reference_loss` w.r.t. the sketcher's parameters, in its order; L2-normalised per
    timestep unless the sketcher's config says `normalize="none"`."""
    normalise = sketcher.config.normalize != "none"
    params = [param for _, param in sketcher.parameters]
    flags = [(p, p.requires_grad) for p in sketcher.adapter.denoiser.parameters()]
    rows = []
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        for b in range(images.shape[0]):
            pixels = images[b : b + 1] * 2 - 1
            prompt = None if prompts is None else prompts[b]
            per_t = []
            for t in sketcher.timesteps:
                noise = sketcher.noise[:1].clone()
                loss = reference_loss(pipe, pixels, prompt, noise, int(t))
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                flat = torch.cat(
                    [(torch.zeros_like(p) if g is None else g).reshape(-1).double() for p, g in zip(params, grads)]
                )
                per_t.append(flat / flat.norm() if normalise else flat)
            rows.append(torch.stack(per_t))
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
    return torch.stack(rows)


def check_sketch_matches_reference(
    pipe,
    reference_loss: ReferenceLoss,
    images: torch.Tensor,
    prompts: Sequence[str] | None,
    *,
    params="all",
    atol: float = 2e-4,
    **config,
) -> GradientSketcher:
    """Sketch inner products at K >= D equal the exact inner products of the reference gradients (per timestep and
    summed over timesteps, for every pair of samples), and each sketch row has unit norm."""
    probe = GradientSketcher.from_pipeline(pipe, exact_sketch_config(1, params=params, **config))  # D only
    sketcher = GradientSketcher.from_pipeline(pipe, exact_sketch_config(probe.input_dim, params=params, **config))
    assert sketcher.config.sketch_dim >= sketcher.input_dim
    sketches = sketcher(images=images, prompts=prompts).double()
    reference = reference_gradients(pipe, sketcher, reference_loss, images, prompts)
    per_t_sketch = torch.einsum("atk,btk->tab", sketches, sketches)
    per_t_exact = torch.einsum("atd,btd->tab", reference, reference)
    if sketcher.config.normalize == "none":  # raw gradients: compare relative to their scale
        scale = per_t_exact.abs().amax()
        per_t_sketch, per_t_exact = per_t_sketch / scale, per_t_exact / scale
    else:
        ones = torch.ones(sketches.shape[:2], dtype=torch.float64)
        torch.testing.assert_close(sketches.norm(dim=-1), ones, atol=1e-4, rtol=0)
    torch.testing.assert_close(per_t_sketch, per_t_exact, atol=atol, rtol=0)
    # not only the Gram matrix: the sketch is the signed permutation of this very gradient
    dense = sketcher.full_gradients(images=images, prompts=prompts).double()
    cosine = torch.nn.functional.cosine_similarity(dense, reference, dim=-1)
    assert cosine.min() > 1 - 1e-4, f"library gradient vs reference: cosine {cosine.min().item():.6f}"
    return sketcher


def check_self_retrieval(pipe, images: torch.Tensor, prompts: Sequence[str] | None, **config) -> GradientIndex:
    """Index every image; querying each with its own image (and prompt) ranks it first."""
    settings = dict(num_timesteps=4, sketch_dim=1024)
    settings.update(config)
    sketcher = GradientSketcher.from_pipeline(pipe, DMinConfig(**settings))
    sketches = sketcher(images=images, prompts=prompts)
    index = GradientIndex.from_sketches(sketches, spec=sketcher.spec)
    results = index.search(sketches, top_k=1)
    assert [int(r.sample_ids[0]) for r in results] == list(range(images.shape[0]))
    return index


def check_return_influence(pipe, index: GradientIndex, prompt: str | None, **call_kwargs) -> None:
    """`return_influence=True` generates and attributes; the query sketch is the gradient of the generated latents."""
    wrapped = InfluencePipeline(pipe, index)
    wrapped.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, generator=torch.Generator().manual_seed(0), top_k=2)
    kwargs.update(call_kwargs)
    if prompt is not None:
        kwargs["prompt"] = prompt
    out = wrapped(return_influence=True, output_type="np", **kwargs)
    assert len(out.influence) == len(out.images) >= 1
    result = out.influence[0]
    assert len(result.sample_ids) == 2 and torch.isfinite(torch.as_tensor(result.scores)).all()
    assert result.scores[0] >= result.scores[1]
    plain = pipe(
        output_type="np",
        **{k: v for k, v in kwargs.items() if k != "top_k"} | {"generator": torch.Generator().manual_seed(0)},
    )
    assert abs(plain.images - out.images).max() < 1e-5  # the wrapped pipeline ran unchanged


def check_half_precision_agrees(
    make_pipe: Callable[[], object],
    images: torch.Tensor,
    prompts: Sequence[str] | None,
    *,
    dtype: torch.dtype = torch.bfloat16,
    min_cosine: float = 0.98,
    **config,
) -> float:
    """Sketches of the same pipeline in `dtype` agree with its float32 sketches (cosine per sample and timestep).

    Returns the smallest cosine measured, which the family tests report.
    """
    settings = dict(num_timesteps=3, sketch_dim=1024)
    settings.update(config)
    config = DMinConfig(**settings)
    pipe32 = make_pipe()
    reference = GradientSketcher.from_pipeline(pipe32, config)(images=images, prompts=prompts)
    pipe_half = make_pipe().to(dtype=dtype)
    half = GradientSketcher.from_pipeline(pipe_half, config)(images=images, prompts=prompts)
    cosine = torch.nn.functional.cosine_similarity(half.double(), reference.double(), dim=-1)
    assert cosine.min() >= min_cosine, f"{dtype} vs float32 sketch cosine {cosine.min().item():.4f} < {min_cosine}"
    return float(cosine.min())
