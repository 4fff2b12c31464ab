"""The math of the issue-12 attribution baselines (benchmarks/quality/attribution.py) against direct formulas."""

import numpy as np
import pytest
import torch
from benchmarks.quality import attribution

from diffusers_dmin import DMinConfig, GradientSketcher
from diffusers_dmin.testing import tiny_ddpm_pipeline


def test_damped_kernel_scores_match_the_primal_formula():
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(12, 30, generator=gen, dtype=torch.float64)  # N < K: the dual solve must still be exact
    q = torch.randn(4, 30, generator=gen, dtype=torch.float64)
    out = attribution.damped_kernel_scores(phi, q, grid=(0.1, 1.0))
    scale = float((phi * phi).sum(1).mean())
    for rel in (0.1, 1.0):
        primal = q @ torch.linalg.solve(phi.T @ phi + rel * scale * torch.eye(30, dtype=torch.float64), phi.T)
        np.testing.assert_allclose(out[f"lambda={rel:g}"], primal.numpy(), rtol=1e-8, atol=1e-10)


def test_datainf_matches_its_sherman_morrison_sum_per_tensor():
    gen = torch.Generator().manual_seed(1)
    n, num_t, sizes = 6, 2, (3, 5)
    d = sum(sizes)
    g = torch.randn(n, num_t * d, generator=gen, dtype=torch.float64)
    v = torch.randn(3, num_t * d, generator=gen, dtype=torch.float64)
    slices = [("a", slice(0, 3)), ("b", slice(3, 8))]
    out = attribution.datainf_scores(g, v, slices, num_t, const=10.0)
    expected = np.zeros((3, n))
    g3, v3 = g.view(n, num_t, d), v.view(3, num_t, d)
    for _, sl in slices:
        gl = g3[:, :, sl].reshape(n, -1).numpy()
        vl = v3[:, :, sl].reshape(3, -1).numpy()
        lam = (gl**2).mean() / 10.0
        # (1 / (n lam)) sum_i (I - g_i g_i^T / (lam + |g_i|^2)): DataInf's approximation of (H + lam I)^-1
        inverse = sum(np.eye(gl.shape[1]) - np.outer(x, x) / (lam + x @ x) for x in gl) / (n * lam)
        expected += vl @ inverse @ gl.T
    np.testing.assert_allclose(out, expected, rtol=1e-8)


def test_datainf_is_exact_for_one_training_sample():
    # with n = 1, H = g g^T and Sherman-Morrison is exact: v^T (g g^T + lam I)^-1 g
    gen = torch.Generator().manual_seed(2)
    g = torch.randn(1, 7, generator=gen, dtype=torch.float64)
    v = torch.randn(2, 7, generator=gen, dtype=torch.float64)
    out = attribution.datainf_scores(g, v, [("w", slice(0, 7))], 1, const=10.0)
    lam = float(g.pow(2).mean()) / 10.0
    exact = v @ torch.linalg.solve(g.T @ g + lam * torch.eye(7, dtype=torch.float64), g.T)
    np.testing.assert_allclose(out, exact.numpy(), rtol=1e-8)


@pytest.fixture(scope="module")
def ddpm():
    return tiny_ddpm_pipeline(sample_size=8)


def test_engine_gradients_equal_the_sketchers_unnormalised_gradients(ddpm):
    timesteps = (100, 500, 900)
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    engine = attribution.GradientEngine(ddpm, timesteps, sketch_dim=64, seed=0)
    config = DMinConfig(normalize="none", timestep_spacing=timesteps, sketch_dim=64, seed=0)
    sketcher = GradientSketcher.from_pipeline(ddpm, config)
    reference = sketcher.full_gradients(images=images)  # its timesteps are ordered noisiest first
    dense = engine.loss_features(images, None, sketcher.timesteps, project=False, per_timestep=True)
    torch.testing.assert_close(dense, reference, rtol=1e-4, atol=1e-6)
    # and the projection is the library's sketch of those gradients
    sketched = engine.loss_features(images, None, sketcher.timesteps, project=True, per_timestep=True)
    torch.testing.assert_close(sketched, engine.sketcher.sketch(reference), rtol=1e-4, atol=1e-5)


def test_square_output_differentiates_mean_eps_squared(ddpm):
    images = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    engine = attribution.GradientEngine(ddpm, (300,), sketch_dim=64, seed=0)
    got = engine.loss_features(images, None, (300,), output="square", project=False)
    x0, _ = engine.encode(images, None)
    t = torch.full((2,), 300, dtype=torch.long)
    noisy, _ = engine.objective.noisy_and_target(x0, engine.noise[0].expand_as(x0), t)
    params = [p for _, p in engine.sketcher.parameters]
    for i in range(2):
        pred = ddpm.unet(noisy[i : i + 1], t[i : i + 1]).sample
        grads = torch.autograd.grad(pred.pow(2).mean(), params)
        torch.testing.assert_close(got[i], torch.cat([g.reshape(-1) for g in grads]), rtol=1e-4, atol=1e-6)


def test_gauss_newton_products_equal_j_transpose_j(ddpm):
    engine = attribution.GradientEngine(ddpm, (300,), sketch_dim=64, seed=0)
    gn = attribution.GaussNewton(engine)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([200, 700])
    v = torch.randn(2, engine.input_dim, generator=torch.Generator().manual_seed(6))
    got = gn.products(v, x, t, {})
    params = [p for _, p in engine.sketcher.parameters]
    out = ddpm.unet(x, t).sample.reshape(-1)
    rows = []
    for j in range(out.numel()):
        grads = torch.autograd.grad(out[j], params, retain_graph=True, allow_unused=True)
        rows.append(
            torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
        )
    jac = torch.stack(rows)
    expected = (2.0 / out.numel()) * (jac.T @ (jac @ v.T)).T
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)


def _explicit_das_features(ddpm, engine, images, timesteps):
    """DAS features from the explicit output Jacobian (torch.autograd.functional.jacobian), independently of the
    engine's loss rows: per timestep, the Jacobian's mean row, L2-normalised; averaged over the timesteps."""
    from torch.func import functional_call

    names = [name for name, _ in engine.sketcher.parameters]
    values = tuple(p.detach().clone() for _, p in engine.sketcher.parameters)
    x0, _ = engine.encode(images, None)
    feats = torch.zeros(len(images), engine.input_dim, dtype=torch.float64)
    for i in range(len(images)):
        for t_value in timesteps:
            t = torch.tensor([int(t_value)])
            noisy, _ = engine.objective.noisy_and_target(x0[i : i + 1], engine.noise[0][None], t)

            def output(*params):
                return functional_call(ddpm.unet, dict(zip(names, params)), (noisy, t)).sample.reshape(-1)

            jac = torch.autograd.functional.jacobian(output, values)  # per tensor: (outputs, *shape)
            full = torch.cat([j.reshape(j.shape[0], -1) for j in jac], 1).double()  # (outputs, D)
            row = full.mean(0)
            feats[i] += row / row.norm() / len(timesteps)
    return feats


def test_das_equals_explicit_jacobian_and_primal_formula(ddpm):
    # ground truth: explicit output Jacobians -> reduced features -> the library sketch -> the primal DAS formula
    timesteps = attribution.uniform_timesteps(2)
    train = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    queries = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    engine = attribution.GradientEngine(ddpm, timesteps, sketch_dim=32, seed=0)

    dense = engine.das_features(train, None, timesteps, project=False)
    explicit = _explicit_das_features(ddpm, engine, train, timesteps)
    torch.testing.assert_close(dense.double(), explicit, rtol=1e-4, atol=1e-6)

    # residual weights against a direct loop (fresh noise per timestep from the seed, RMS residual, per-sample norm)
    res_t = [0, 500]
    weights, rms = engine.das_residual_weights(train, None, res_t, seed=0)
    x0, _ = engine.encode(train, None)
    direct = torch.zeros(3, 2, dtype=torch.float64)
    for j, t_value in enumerate(res_t):
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(t_value))
        t = torch.full((3,), t_value)
        noisy = engine.objective.scheduler.add_noise(x0, noise, t)
        with torch.no_grad():
            pred = ddpm.unet(noisy, t).sample
        direct[:, j] = (pred - noise).pow(2).mean(dim=(1, 2, 3)).sqrt().double()
    torch.testing.assert_close(rms, direct, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(weights, (direct / direct.norm(dim=1, keepdim=True)).mean(1), rtol=1e-5, atol=1e-7)

    # the whole method against the primal formula on sketches of the explicit features
    task = attribution.AttributionTask(
        pipe=ddpm, train_images=train, train_prompts=None, query_images=queries, query_prompts=None, seed=0
    )
    out = attribution.method_das(task, num_timesteps=2, residual_timesteps=2, sketch_dim=32, grid=(0.1, 1.0))
    phi = engine.sketcher.sketch(explicit.float()).double()
    q = engine.sketcher.sketch(_explicit_das_features(ddpm, engine, queries, timesteps).float()).double()
    r, _ = engine.das_residual_weights(train, None, attribution.uniform_timesteps(2), seed=0)
    k = phi.shape[1]
    scale = float((phi * phi).sum(1).mean())
    for rel in (0.1, 1.0):
        a = torch.linalg.inv(phi.T @ phi + rel * scale * torch.eye(k, dtype=torch.float64))  # primal, K x K
        plain = (q @ a @ phi.T) * r[None, :]
        leverage = torch.einsum("ik,kl,il->i", phi, a, phi)
        loo = plain / (1 - leverage)[None, :]
        for variant, signed in (("plain", plain), ("loo", loo)):
            for form, value in (("signed", signed), ("squared", signed**2)):
                np.testing.assert_allclose(
                    out.scores[f"lambda={rel:g},{variant},{form}"], value.numpy(), rtol=2e-3, atol=1e-9
                )
    assert len(out.scores) == 2 * 2 * 2
