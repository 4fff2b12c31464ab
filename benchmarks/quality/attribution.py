"""Issue 12: attribution methods side by side, behind one interface.

Every method maps (a pipeline, its training set, queries) to a `(Q, N)` score matrix (larger = the training sample
helped the query more: training on it lowers the query's loss), plus its measured cost (seconds of computation per
training sample, and the bytes a method keeps per training sample to answer new queries). Methods with a damping or
scale hyper-parameter return one matrix per grid value; the caller chooses the value on held-out queries only.

Gradients come from the library's machinery: a `GradientSketcher` with `DMinConfig(normalize="none")` gives the
unnormalised per-sample loss gradients at fixed timesteps and noise (its `_vmap_gradients` engine), and its OPORP
sketch is the projection of every TRAK-family method, so all methods differentiate the same parameters (the LoRA
on the tiny SD, the attention parameters of the digits DDPM: `params="auto"`).

| method | definition used here |
|---|---|
| DMin | the library: `GradientSketcher` + `GradientIndex.search`, any `DMinConfig` kwargs |
| TRAK | phi = sketch of the timestep-averaged unnormalised loss gradient (T = 10 uniform timesteps, one noise draw);
|      | score = phi_q^T (Phi^T Phi + lambda I)^-1 phi_i (single checkpoint, no ensembling) |
| D-TRAK | as TRAK, but both train and query features differentiate the output function mean(eps_theta(x_t, t)^2)
|        | (sail-sg/D-TRAK `--f mean-squared-l2-norm`) |
| Journey-TRAK | per sampling step s of a generated query: the query feature is the loss gradient at the step's
|              | predicted x0_hat(x_s) with fresh noise at timestep t_s; train features at the same t_s; one TRAK kernel
|              | per step; the score is the sum over the steps (MadryLab/journey-TRAK `_get_output_scoring`) |
| LiSSA | h_q ~= (G + lambda I)^-1 g_q by the LiSSA recursion with exact Gauss-Newton-vector products of the training
|       | diffusion loss (minibatches of training samples, random timesteps and noise), in the selected parameters;
|       | score = h_q^T g_i (g: unprojected, timestep-averaged loss gradients) |
| DataInf | per parameter tensor l, the Sherman-Morrison closed form
|         | v^T (H_l + lambda_l I)^-1 g_k ~= (1 / (n lambda_l)) sum_i [v.g_k - (v.g_i)(g_i.g_k) / (lambda_l + |g_i|^2)],
|         | lambda_l = mean(g_l^2) / c (c = 10 in ykwon0407/DataInf), per-timestep gradients concatenated |
| DAS | Lin et al. (ICLR 2025): phi = sketch of the timestep average of per-timestep L2-normalised gradients of
|     | mean(eps_theta(x_t, t)) (the output Jacobian reduced to its mean row); r_i = a scalar residual weight;
|     | score = phi_q^T (Phi^T Phi + lambda I)^-1 phi_i r_i [/ (1 - h_i)] [squared] (see `method_das`) |
| pixel cosine, SSIM, random | `baselines.py` |
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffusers_dmin import DMinConfig, GradientIndex, GradientSketcher

from .baselines import pixel_cosine_scores, random_scores, ssim_scores


TRAK_TIMESTEPS = 10
TRAK_SKETCH_DIM = 4096
DAMPING_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # relative to the mean eigenvalue of the kernel (trace / N)
DATAINF_TIMESTEPS = (25, 225, 425, 525, 725, 925)  # the DataInf stable-diffusion notebook's timesteps


# ---------------------------------------------------------------------------------------------- task


@dataclass
class AttributionTask:
    r"""
    What every method sees.

    Attributes:
        pipe: the pipeline to attribute (its denoiser's `params="auto"` parameters are differentiated).
        train_images: `(N, C, H, W)` float in `[0, 1]`.
        train_prompts: one caption per training sample, or None (unconditional).
        query_images: `(Q, C, H, W)` float in `[0, 1]`.
        query_prompts: one caption per query, or None.
        trajectories: for generated queries, `(Q, S, *latent_shape)` denoiser inputs x_s at sampling steps with
            timesteps `trajectory_timesteps` (S,), else None (Journey-TRAK then does not apply).
        train_pixels / query_pixels: what the pixel baselines compare (default: the images).
    """

    pipe: Any
    train_images: torch.Tensor
    train_prompts: list[str] | None
    query_images: torch.Tensor
    query_prompts: list[str] | None
    trajectories: torch.Tensor | None = None
    trajectory_timesteps: Sequence[int] | None = None
    seed: int = 0
    cache: dict = field(default_factory=dict)

    @property
    def num_train(self) -> int:
        return len(self.train_images)

    @property
    def num_queries(self) -> int:
        return len(self.query_images)


@dataclass
class MethodResult:
    scores: dict[str, np.ndarray]  # hyper-parameter label -> (Q, N); a single entry "-" when there is none
    train_seconds: float  # computation that depends only on the training set (features, kernel)
    query_seconds: float  # computation per query batch
    bytes_per_sample: float  # what is kept per training sample to answer new queries
    notes: str = ""


# ---------------------------------------------------------------------------------------------- gradients


class GradientEngine:
    r"""
    Per-pair unnormalised loss gradients (or their OPORP sketches) at arbitrary noisy inputs, timesteps and targets,
    through the library's `GradientSketcher` engine (`normalize="none"`, `params="auto"`).
    """

    def __init__(self, pipe, timesteps: Sequence[int], sketch_dim: int = TRAK_SKETCH_DIM, seed: int = 0):
        config = DMinConfig(
            normalize="none", timestep_spacing=tuple(int(t) for t in timesteps), sketch_dim=sketch_dim, seed=seed
        )
        self.sketcher = GradientSketcher.from_pipeline(pipe, config, mode="vmap")
        self.sketcher.set_progress_bar_config(disable=True)
        self.objective = self.sketcher.objective
        self.noise = self.sketcher.noise  # (1, *latent_shape), drawn from `seed`
        self.input_dim = self.sketcher.input_dim
        self.sketch_dim = sketch_dim

    def encode(self, images: torch.Tensor, prompts: list[str] | None):
        """Clean denoiser inputs and conditioning, exactly as the sketcher prepares them."""
        with torch.no_grad():
            x0, cond, _ = self.sketcher._inputs(images, prompts, None)
        return x0, cond

    @contextlib.contextmanager
    def _grad_mode(self):
        s = self.sketcher
        with contextlib.ExitStack() as stack:
            for ctx in (s._threads(), torch.enable_grad(), s._eval_mode(), s._selected_requires_grad()):
                stack.enter_context(ctx)
            yield

    def rows(self, noisy, t, target, cond, project: bool, chunk: int = 64) -> torch.Tensor:
        """`(P, K)` sketches (project) or `(P, D)` dense gradients of mean((eps_theta(noisy, t) - target)^2)."""
        out = []
        s = self.sketcher
        for start in range(0, len(noisy), chunk):
            sl = slice(start, start + chunk)
            p = len(noisy[sl])
            pairs = {
                "noisy": noisy[sl],
                "t": self.objective.model_timesteps(t[sl]),
                "target": target[sl],
                "weight": self.objective.loss_weights(t[sl]),
                "cond": {k: v[sl] for k, v in cond.items()},
                "full_cond": cond,
                "samples": torch.arange(p),
                "pairs": torch.arange(p),
            }
            with self._grad_mode():
                grads, _ = s._vmap_gradients(pairs)
            flat = [g.reshape(p, -1).float() for g in grads]
            if project:
                acc = s.sketch.new_accumulator(p, "cpu")
                for offset, values in zip(s._offsets, flat):
                    s.sketch.accumulate(acc, values, offset)
                out.append(s.sketch.finalize(acc))
            else:
                out.append(torch.cat(flat, 1))
        return torch.cat(out)

    def loss_features(
        self,
        images,
        prompts,
        timesteps: Sequence[int],
        output: str = "loss",
        project: bool = True,
        per_timestep: bool = False,
        batch: int = 32,
    ) -> torch.Tensor:
        r"""
        Features of samples: the gradient of the loss (`output="loss"`) or of mean(eps_theta^2) (`"square"`, D-TRAK)
        at each of `timesteps` with the engine's fixed noise; `(B, T, F)` if `per_timestep` else averaged `(B, F)`.
        """
        if output not in ("loss", "square"):
            raise ValueError(f"`output` must be 'loss' or 'square', but is {output!r}.")
        outs = []
        for start in range(0, len(images), batch):
            x0, cond = self.encode(
                images[start : start + batch], None if prompts is None else prompts[start : start + batch]
            )
            b = len(x0)
            per_t = []
            for t_value in timesteps:
                t = torch.full((b,), int(t_value), dtype=torch.long)
                noisy, target = self.objective.noisy_and_target(x0, self.noise[0].expand_as(x0), t)
                if output == "square":
                    target = torch.zeros_like(target)
                per_t.append(self.rows(noisy, t, target, cond, project))
            stacked = torch.stack(per_t, 1)
            outs.append(stacked if per_timestep else stacked.mean(1))
        return torch.cat(outs)

    def journey_query_features(self, trajectories, timesteps, prompts, project: bool = True) -> torch.Tensor:
        r"""
        `(Q, S, F)`: per sampling step s, the loss gradient at x0_hat(x_s) (the model's predicted clean sample at that
        step, epsilon parameterisation) with the engine's fresh noise at timestep t_s (journey-TRAK's scoring output).
        """
        q = trajectories.shape[0]
        adapter = self.sketcher.adapter
        with torch.no_grad():
            cond = adapter.encode_prompts(list(prompts)) if adapter.conditional else {}
        alphas = self.objective.scheduler.alphas_cumprod
        feats = []
        for s, t_value in enumerate(timesteps):
            x_s = trajectories[:, s]
            t = torch.full((q,), int(t_value), dtype=torch.long)
            with torch.no_grad():
                pred = self.sketcher.adapter.forward(
                    self.sketcher.adapter.denoiser, x_s, self.objective.model_timesteps(t), cond
                )
                a = alphas[int(t_value)]
                x0_hat = (x_s - (1 - a).sqrt() * pred) / a.sqrt()
            noisy, target = self.objective.noisy_and_target(x0_hat, self.noise[0].expand_as(x0_hat), t)
            feats.append(self.rows(noisy, t, target, cond, project))
        return torch.stack(feats, 1)

    def _prediction(self, noisy, t, cond, target) -> torch.Tensor:
        """eps_theta(x_t, t) as the objective's loss sees it (first C channels of a learned-variance output, times the
        family's prediction sign), without gradients."""
        s = self.sketcher
        with torch.no_grad(), s._threads(), s._eval_mode():
            pred = s.adapter.forward(s.adapter.denoiser, noisy, self.objective.model_timesteps(t), cond).float()
        if pred.shape[1] == 2 * target.shape[1]:
            pred = pred[:, : target.shape[1]]
        sign = self.objective.conventions.prediction_sign
        return pred * sign if sign != 1.0 else pred

    def das_features(self, images, prompts, timesteps: Sequence[int], project: bool = True, batch: int = 32):
        r"""
        DAS features (`method_das`): for each sample, the average over `timesteps` of the per-timestep L2-normalised
        gradient of mean(eps_theta(x_t, t)) (the engine's fixed noise), then sketched (`project`) or dense `(B, F)`.

        The gradient of the mean output comes from the engine's loss rows: with the target set to the (detached)
        prediction minus 1/2, d/dtheta mean((eps_theta - target)^2) = (2 / m) sum_o (1/2) d eps_theta_o / dtheta =
        d mean(eps_theta) / dtheta at the evaluated point (loss weights are constants and cancel in the normalisation).
        """
        outs = []
        for start in range(0, len(images), batch):
            x0, cond = self.encode(
                images[start : start + batch], None if prompts is None else prompts[start : start + batch]
            )
            b = len(x0)
            total = None
            for t_value in timesteps:
                t = torch.full((b,), int(t_value), dtype=torch.long)
                noisy, target = self.objective.noisy_and_target(x0, self.noise[0].expand_as(x0), t)
                shifted = self._prediction(noisy, t, cond, target) - 0.5
                rows = self.rows(noisy, t, shifted, cond, project=False)
                rows = rows / (rows.norm(dim=1, keepdim=True) + 1e-8)
                total = rows if total is None else total + rows
            outs.append(total / len(timesteps))
        dense = torch.cat(outs)
        return self.sketcher.sketch(dense) if project else dense

    def das_residual_weights(
        self, images, prompts, timesteps: Sequence[int], seed: int, batch: int = 64
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        DAS's scalar residual weight of each training sample: rho_it = RMS(eps_theta(x^i_t, t) - eps) at each of
        `timesteps` (fresh noise per timestep from `seed`), r_i = mean_t rho_it / ||rho_i.||_2. Returns `(r, rho)`.
        """
        rms = torch.zeros(len(images), len(timesteps), dtype=torch.float64)
        encoded = [
            self.encode(images[s : s + batch], None if prompts is None else prompts[s : s + batch])
            for s in range(0, len(images), batch)
        ]
        for j, t_value in enumerate(timesteps):
            gen = torch.Generator().manual_seed(1000 * seed + int(t_value))
            row = 0
            for x0, cond in encoded:
                b = len(x0)
                t = torch.full((b,), int(t_value), dtype=torch.long)
                noise = torch.randn(x0.shape, generator=gen)
                noisy, target = self.objective.noisy_and_target(x0, noise, t)
                pred = self._prediction(noisy, t, cond, target)
                rms[row : row + b, j] = (pred - target.float()).pow(2).flatten(1).mean(1).sqrt().double()
                row += b
        weights = (rms / (rms.norm(dim=1, keepdim=True) + 1e-8)).mean(1)
        return weights, rms

    def parameter_slices(self) -> list[tuple[str, slice]]:
        s = self.sketcher
        return [
            (name, slice(offset, offset + param.numel())) for (name, param), offset in zip(s.parameters, s._offsets)
        ]


def uniform_timesteps(num: int, total: int = 1000) -> list[int]:
    """D-TRAK's `uniform` strategy: range(0, total, total // num)."""
    return list(range(0, total, total // num))[:num]


# ---------------------------------------------------------------------------------------------- kernels


def damped_kernel_scores(train: torch.Tensor, queries: torch.Tensor, grid=DAMPING_GRID) -> dict[str, np.ndarray]:
    r"""
    TRAK's scores phi_q^T (Phi^T Phi + lambda I)^-1 phi_i for every lambda in `grid` (relative to trace(Phi Phi^T)/N),
    computed in the dual: Phi (Phi^T Phi + lambda I)^-1 = (Phi Phi^T + lambda I)^-1 Phi, so the solve is N x N.
    """
    return {
        f"lambda={rel:g}": (cross @ inverse).numpy() for rel, _, cross, inverse in _dual_kernels(train, queries, grid)
    }


def _dual_kernels(train: torch.Tensor, queries: torch.Tensor, grid):
    """For each relative damping in `grid`: `(rel, lam, cross, inverse)` with `cross = Q Phi^T` and
    `inverse = (Phi Phi^T + lam I)^-1` (float64; one eigendecomposition of the N x N Gram matrix for all of them), so
    that `cross @ inverse = Q (Phi^T Phi + lam I)^-1 Phi^T` (push-through identity)."""
    phi = train.double()
    gram = phi @ phi.T  # (N, N)
    cross = queries.double() @ phi.T  # (Q, N)
    scale = float(torch.diagonal(gram).mean())
    eigvals, eigvecs = torch.linalg.eigh(gram)
    eigvals = eigvals.clamp_min(0)
    for rel in grid:
        lam = rel * scale
        yield rel, lam, cross, eigvecs @ torch.diag(1.0 / (eigvals + lam)) @ eigvecs.T


def datainf_scores(
    train: torch.Tensor, queries: torch.Tensor, slices: Sequence[tuple[str, slice]], num_t: int, const: float = 10.0
) -> np.ndarray:
    r"""
    DataInf (Kwon et al. 2024) per parameter tensor, with `(N, T * D)` / `(Q, T * D)` gradients whose blocks of D are
    timesteps (concatenated as in the DataInf SD notebook). Returns `+ v^T (H + lambda)^-1 g_k` summed over tensors
    (DataInf's influence is the negative of it; we keep "larger = helped the query more").
    """
    n, total = train.shape
    d = total // num_t
    g3 = train.double().view(n, num_t, d)
    v3 = queries.double().view(len(queries), num_t, d)
    out = torch.zeros(len(queries), n, dtype=torch.float64)
    for _, sl in slices:
        g = g3[:, :, sl].reshape(n, -1)
        v = v3[:, :, sl].reshape(len(queries), -1)
        lam = float(g.pow(2).mean()) / const
        if lam <= 0:
            continue
        norms = g.pow(2).sum(1)  # (N,)
        vg = v @ g.T  # (Q, N): v . g_i
        gg = g @ g.T  # (N, N): g_i . g_k
        correction = (vg / (lam + norms)) @ gg  # sum_i (v.g_i)(g_i.g_k) / (lam + |g_i|^2)
        out += (n * vg - correction) / (n * lam)
    return out.numpy()


DAS_VARIANTS = ("plain", "loo")  # without / with the Sherman-Morrison leave-one-out factor 1 / (1 - h_i)
DAS_FORMS = ("signed", "squared")  # the official code's DAS1 / DAS1squ


def das_scores(
    train: torch.Tensor, queries: torch.Tensor, weights: torch.Tensor, grid=DAMPING_GRID
) -> dict[str, np.ndarray]:
    r"""
    DAS scores for every (lambda, variant, form): with the damped kernel A = (Phi^T Phi + lambda I)^-1 (lambda relative
    to trace(Phi Phi^T) / N, as in `damped_kernel_scores`),

        s_qi = phi_q^T A phi_i * r_i                      ("plain": the official code's DAS1)
        s_qi = phi_q^T A phi_i * r_i / (1 - h_i)          ("loo": h_i = phi_i^T A phi_i, the leverage; the
                                                            Sherman-Morrison step to the leave-one-out parameters)

    and "squared" = s_qi^2 (the paper's squared norm of the predicted output change, for one reduced output).
    Dual form: Phi A = (G + lambda)^-1 Phi with G = Phi Phi^T, and 1 - h_i = lambda [(G + lambda)^-1]_ii.
    """
    r = weights.double()
    out = {}
    for rel, lam, cross, inverse in _dual_kernels(train, queries, grid):
        base = cross @ inverse * r[None, :]
        one_minus_h = lam * torch.diagonal(inverse)
        for variant in DAS_VARIANTS:
            signed = base if variant == "plain" else base / one_minus_h[None, :]
            for form in DAS_FORMS:
                value = signed if form == "signed" else signed.pow(2)
                out[f"lambda={rel:g},{variant},{form}"] = value.numpy()
    return out


# ---------------------------------------------------------------------------------------------- LiSSA


class GaussNewton:
    r"""Exact Gauss-Newton-vector products of the training diffusion loss mean((eps_theta - eps)^2) on a minibatch,
    in the engine's selected parameters (`torch.func.jvp` then `vjp`), for a block of vectors at once."""

    def __init__(self, engine: GradientEngine, chunk: int = 16):
        self.engine = engine
        self.chunk = chunk
        s = engine.sketcher
        self.denoiser = s.adapter.denoiser
        self.names = [name for name, _ in s.parameters]
        self.shapes = [p.shape for _, p in s.parameters]
        self.sizes = [p.numel() for _, p in s.parameters]
        self.selected = {name: p.detach() for name, p in s.parameters}
        self.others = {n: p.detach() for n, p in self.denoiser.named_parameters() if n not in self.selected}
        self.buffers = dict(self.denoiser.named_buffers())

    def _unflatten(self, flat: torch.Tensor) -> dict:
        parts = torch.split(flat, self.sizes)
        return {n: part.view(shape) for n, part, shape in zip(self.names, parts, self.shapes)}

    def products(self, vectors: torch.Tensor, noisy, t_model, cond) -> torch.Tensor:
        """`(V, D)` -> `(V, D)`: G v with G = (2 / (B m)) J^T J, J the Jacobian of the minibatch's outputs."""
        from torch.func import functional_call, vjp, vmap
        from torch.nn.attention import SDPBackend, sdpa_kernel

        adapter = self.engine.sketcher.adapter

        def f(params):
            def call(*args, **kwargs):
                return functional_call(self.denoiser, (params, self.others, self.buffers), args, kwargs)

            return adapter.forward(call, noisy, t_model, cond)

        out = []
        # J v by the double-vjp trick (the vjp u -> J^T u is linear in u; its own vjp at v is J v): the CPU attention
        # kernels have no forward-mode derivative, but the math kernel has a double backward
        with self.engine._grad_mode(), sdpa_kernel(SDPBackend.MATH):
            primal, vjp_fn = vjp(f, self.selected)
            m = primal.numel()
            _, transpose_vjp = vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(primal))
            for start in range(0, len(vectors), self.chunk):
                block = vectors[start : start + self.chunk]
                tangents = {
                    n: part.reshape(len(block), *shape)
                    for n, part, shape in zip(self.names, torch.split(block, self.sizes, 1), self.shapes)
                }
                (jv,) = vmap(transpose_vjp)(tangents)
                (gv,) = vmap(vjp_fn)(jv.detach())
                out.append(torch.cat([gv[n].reshape(len(block), -1) for n in self.names], 1).detach() * (2.0 / m))
        return torch.cat(out)


def lissa(
    engine: GradientEngine,
    x0_train: torch.Tensor,
    cond_train: dict,
    query_grads: torch.Tensor,
    damping: float,
    depth: int,
    batch: int,
    seed: int,
    scale: float | None = None,
) -> tuple[torch.Tensor, float]:
    r"""
    h ~= (G + damping I)^-1 v for each row v of `query_grads` by the LiSSA recursion
    h_{j+1} = v + (1 - damping / s) h_j - G_j h_j / s, returning h / s (the series' limit is s (G + damping)^-1 v).
    `G_j`: Gauss-Newton on a fresh minibatch (training samples, uniform timesteps, fresh noise). `s` (scale) defaults
    to 2x the largest eigenvalue estimated by power iteration.
    """
    gen = torch.Generator().manual_seed(seed)
    n = len(x0_train)
    gn = GaussNewton(engine)

    def minibatch():
        idx = torch.randint(0, n, (batch,), generator=gen)
        t = torch.randint(0, engine.objective.num_train_timesteps, (batch,), generator=gen)
        noise = torch.randn(x0_train[idx].shape, generator=gen)
        noisy, _ = engine.objective.noisy_and_target(x0_train[idx], noise, t)
        return noisy, engine.objective.model_timesteps(t), {k: v[idx] for k, v in cond_train.items()}

    if scale is None:
        v = torch.randn(1, query_grads.shape[1], generator=gen)
        top = 0.0
        for _ in range(8):
            v = v / v.norm()
            gv = gn.products(v, *minibatch())
            top = max(top, float((v * gv).sum()))
            v = gv
        scale = 2.0 * top + damping
    v = query_grads.float()
    h = v.clone()
    for _ in range(depth):
        h = v + (1.0 - damping / scale) * h - gn.products(h, *minibatch()) / scale
    return h / scale, scale


# ---------------------------------------------------------------------------------------------- methods


def _timed(fn: Callable):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def method_dmin(task: AttributionTask, **config_kwargs) -> MethodResult:
    """The library end to end: sketches of both sides, an exact `GradientIndex` search over every training sample."""
    config = DMinConfig(**{"seed": task.seed, **config_kwargs})  # the task's seed unless the row sets one
    sketcher = GradientSketcher.from_pipeline(task.pipe, config)
    sketcher.set_progress_bar_config(disable=True)

    def sketch(images, prompts, batch=64):
        rows = []
        for i in range(0, len(images), batch):
            rows.append(
                sketcher(images=images[i : i + batch], prompts=None if prompts is None else prompts[i : i + batch])
            )
        return torch.cat(rows)

    train, train_s = _timed(lambda: sketch(task.train_images, task.train_prompts))
    index = GradientIndex.from_sketches(train, ids=np.arange(task.num_train), spec=sketcher.spec)

    def query():
        q = sketch(task.query_images, task.query_prompts)
        return index.search(q, top_k=task.num_train, spec=sketcher.spec)

    results, query_s = _timed(query)
    scores = np.empty((task.num_queries, task.num_train))
    for row, result in zip(scores, results):
        row[result.sample_ids] = result.scores
    t, k = train.shape[1], train.shape[2]
    return MethodResult({"-": scores}, train_s, query_s, bytes_per_sample=4.0 * t * k, notes=f"T={t}, K={k}")


def method_trak(task: AttributionTask, output: str = "loss") -> MethodResult:
    """TRAK (`output="loss"`) or D-TRAK (`output="square"`): sketched timestep-averaged gradients, damped kernel."""
    engine = GradientEngine(task.pipe, uniform_timesteps(TRAK_TIMESTEPS), seed=task.seed)
    ts = uniform_timesteps(TRAK_TIMESTEPS)
    train, train_s = _timed(lambda: engine.loss_features(task.train_images, task.train_prompts, ts, output))
    queries, query_s = _timed(lambda: engine.loss_features(task.query_images, task.query_prompts, ts, output))
    scores, solve_s = _timed(lambda: damped_kernel_scores(train, queries))
    k = train.shape[1]
    return MethodResult(
        scores,
        train_s + solve_s,
        query_s,
        bytes_per_sample=4.0 * k + 4.0 * k * k / task.num_train,  # features + the K x K inverse, amortised
        notes=f"T={TRAK_TIMESTEPS} uniform, K={k}, output={'mean eps^2' if output == 'square' else 'loss'}",
    )


def method_journey_trak(task: AttributionTask) -> MethodResult:
    """Journey-TRAK: one damped kernel per sampling step, scores summed over the steps (generated queries only)."""
    if task.trajectories is None:
        raise ValueError("Journey-TRAK needs the sampling trajectories of generated queries (task.trajectories).")
    ts = [int(t) for t in task.trajectory_timesteps]
    engine = GradientEngine(task.pipe, ts, seed=task.seed)
    train, train_s = _timed(
        lambda: engine.loss_features(task.train_images, task.train_prompts, ts, "loss", per_timestep=True)
    )
    queries, query_s = _timed(lambda: engine.journey_query_features(task.trajectories, ts, task.query_prompts))
    start = time.perf_counter()
    total: dict[str, np.ndarray] = {}
    for s in range(len(ts)):
        for key, value in damped_kernel_scores(train[:, s], queries[:, s]).items():
            total[key] = total.get(key, 0.0) + value
    solve_s = time.perf_counter() - start
    k = train.shape[2]
    return MethodResult(
        total,
        train_s + solve_s,
        query_s,
        bytes_per_sample=4.0 * k * len(ts) + 4.0 * k * k * len(ts) / task.num_train,
        notes=f"{len(ts)} sampling steps, K={k}",
    )


def method_datainf(task: AttributionTask, consts=(1.0, 10.0, 100.0)) -> MethodResult:
    """DataInf's closed form per parameter tensor (unprojected gradients at DATAINF_TIMESTEPS, concatenated)."""
    ts = list(DATAINF_TIMESTEPS)
    engine = GradientEngine(task.pipe, ts, seed=task.seed)

    def features(images, prompts):
        f = engine.loss_features(images, prompts, ts, "loss", project=False, per_timestep=True)
        return f.reshape(len(f), -1)

    train, train_s = _timed(lambda: features(task.train_images, task.train_prompts))
    queries, query_s = _timed(lambda: features(task.query_images, task.query_prompts))
    start = time.perf_counter()
    scores = {f"c={c:g}": datainf_scores(train, queries, engine.parameter_slices(), len(ts), c) for c in consts}
    solve_s = time.perf_counter() - start
    return MethodResult(
        scores,
        train_s,
        query_s + solve_s,
        bytes_per_sample=4.0 * train.shape[1],
        notes=f"D={engine.input_dim} x {len(ts)} timesteps, unprojected",
    )


def method_lissa(task: AttributionTask, dampings=(1e-3, 1e-2, 1e-1), depth: int = 50, batch: int = 16) -> MethodResult:
    """LiSSA with exact Gauss-Newton-vector products in the selected parameters (unprojected)."""
    ts = uniform_timesteps(TRAK_TIMESTEPS)
    engine = GradientEngine(task.pipe, ts, seed=task.seed)
    train, train_s = _timed(lambda: engine.loss_features(task.train_images, task.train_prompts, ts, project=False))
    queries, query_s = _timed(lambda: engine.loss_features(task.query_images, task.query_prompts, ts, project=False))
    x0, cond = engine.encode(task.train_images, task.train_prompts)
    scores = {}
    start = time.perf_counter()
    scale = None
    for damping in dampings:
        h, scale = lissa(engine, x0, cond, queries, damping, depth, batch, task.seed, scale)
        scores[f"damping={damping:g}"] = (h.double() @ train.double().T).numpy()
    solve_s = time.perf_counter() - start
    return MethodResult(
        scores,
        train_s,
        query_s + solve_s,
        bytes_per_sample=4.0 * train.shape[1],
        notes=f"GGN, depth {depth}, minibatch {batch}, scale {scale:.3g}, D={engine.input_dim}",
    )


DAS_TIMESTEPS = 10  # the official README's `03_grad.sh ... mean uniform 10 4096`
DAS_RESIDUAL_TIMESTEPS = 1000  # the official `04_eval.sh` / `load_error` default (`--error_num_timesteps 1000`)


def method_das(
    task: AttributionTask,
    num_timesteps: int = DAS_TIMESTEPS,
    residual_timesteps: int = DAS_RESIDUAL_TIMESTEPS,
    sketch_dim: int = TRAK_SKETCH_DIM,
    grid=DAMPING_GRID,
) -> MethodResult:
    r"""
    DAS, the Diffusion Attribution Score (Lin, Tao, Dong, Xu, ICLR 2025, arXiv:2410.18639; official code
    github.com/Jinxu-Lin/DAS, `CIFAR2/03_grad.py`, `CIFAR10/04_eval.py`, `CIFAR10/07_score.py`).

    **Definition.** DAS scores a training sample z_i by how much removing it changes the model's predicted
    distribution for the query z, i.e. the KL divergence between the two models' Gaussian reverse steps, which is
    E_{t, eps} ||eps_theta*(x_t, t) - eps_theta_{-i}(x_t, t)||^2 (the paper's Eq. 9). Linearising eps_theta in theta
    and taking one Newton step of the linearised least-squares fit (Sherman-Morrison for the leave-one-out
    parameters, as TRAK does for the loss) gives the computable score (the paper's Eq. 16):

        DAS(z, z_i) = || phi(z)^T (Phi^T Phi)^-1 phi(z_i) r_i / (1 - h_i) ||^2,

    with phi(z) = P^T d eps_theta(x_t, t) / d theta the *projected output Jacobian* (K x outputs, not a loss
    gradient), Phi the stacked Jacobians of the training set, r_i = eps_theta(x^i_t, t) - eps the training residual,
    h_i the leverage. The equation numbers and the derivation chain (KL -> linearisation -> one Newton step ->
    Sherman-Morrison) are as a review of the paper describes them; the paper's body was not readable offline, so the
    typeset formula above is reconstructed from that description and from the official code.

    **Reduction used here** (the official code's practical one, not the full Jacobian, which would cost
    N x outputs x K numbers):
    - output Jacobian -> its mean row: phi_i = P (1/T sum_t g_it / ||g_it||), g_it = d mean(eps_theta(x^i_t, t)) /
      d theta (the official `--loss_function_type mean`), T = `num_timesteps` uniform timesteps, one fixed noise draw,
      per-timestep L2 normalisation before averaging (as `03_grad.py`), P the library's OPORP sketch (K =
      `sketch_dim`; the official code uses TRAK's Gaussian projector);
    - residual vector -> one scalar per training sample: r_i = mean_t rho_it / ||rho_i.||_2, rho_it the RMS residual
      at `residual_timesteps` uniform timesteps with fresh noise (the official `load_error`, 1000 timesteps);
    - score forms: "plain,signed" = phi_q^T A phi_i r_i (the official DAS1, A = (Phi^T Phi + lambda I)^-1),
      "squared" = its square (DAS1squ, the paper's squared norm for one reduced output), "loo" = with the
      Sherman-Morrison factor 1 / (1 - h_i), h_i = phi_i^T A phi_i (the official DAS0 takes the diagonal of the
      query-by-training score matrix as the leverage and divides by its square; here it is each training sample's
      own leverage).
    lambda (relative to trace(Phi Phi^T) / N), variant and form are hyper-parameters; the caller chooses them on
    held-out queries (the official `07_score.py` picks lambda on the reported LDS itself).
    """
    ts = uniform_timesteps(num_timesteps)
    engine = GradientEngine(task.pipe, ts, sketch_dim=sketch_dim, seed=task.seed)
    train, feature_s = _timed(lambda: engine.das_features(task.train_images, task.train_prompts, ts))
    (weights, _), residual_s = _timed(
        lambda: engine.das_residual_weights(
            task.train_images, task.train_prompts, uniform_timesteps(residual_timesteps), seed=task.seed
        )
    )
    queries, query_s = _timed(lambda: engine.das_features(task.query_images, task.query_prompts, ts))
    scores, solve_s = _timed(lambda: das_scores(train, queries, weights, grid))
    k = train.shape[1]
    return MethodResult(
        scores,
        feature_s + residual_s + solve_s,
        query_s,
        bytes_per_sample=4.0 * k + 8.0 + 4.0 * k * k / task.num_train,  # features, r_i, the K x K inverse amortised
        notes=(
            f"T={num_timesteps} uniform, K={k}, output mean(eps), per-t normalised; residual over "
            f"{residual_timesteps} t ({residual_s:.1f} s)"
        ),
    )


def method_pixel(task: AttributionTask) -> MethodResult:
    scores, s = _timed(lambda: pixel_cosine_scores(task.query_images, task.train_images))
    return MethodResult({"-": scores}, 0.0, s, bytes_per_sample=float(task.train_images[0].numel()))


def method_ssim(task: AttributionTask) -> MethodResult:
    scores, s = _timed(lambda: ssim_scores(task.query_images, task.train_images))
    return MethodResult({"-": scores}, 0.0, s, bytes_per_sample=float(task.train_images[0].numel()))


def method_random(task: AttributionTask) -> MethodResult:
    return MethodResult({"-": random_scores(task.num_queries, task.num_train, seed=10_000 + task.seed)}, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., MethodResult]
    kwargs: dict = field(default_factory=dict)
    needs_trajectories: bool = False


def registry(dmin_configs: dict[str, dict] | None = None, lissa_depth: int = 50) -> list[Method]:
    r"""
    Every method of the tables. `dmin_configs`: row name -> `DMinConfig` kwargs (default: only the library default);
    add rows for new library options by listing their kwargs here.
    """
    dmin_configs = dmin_configs if dmin_configs is not None else {"DMin (default)": {}}
    methods = [Method(name, method_dmin, dict(kwargs)) for name, kwargs in dmin_configs.items()]
    methods += [
        Method("TRAK", method_trak, {"output": "loss"}),
        Method("D-TRAK", method_trak, {"output": "square"}),
        Method("Journey-TRAK", method_journey_trak, needs_trajectories=True),
        Method("LiSSA", method_lissa, {"depth": lissa_depth}),
        Method("DataInf", method_datainf),
        # residual over 100 uniform timesteps (an official `--error_num_timesteps` choice) instead of the default 1000:
        # 1000 costs ~10 min per query kind on the tiny SD on this machine, for one scalar per training sample
        Method("DAS", method_das, {"residual_timesteps": 100}),
        Method("pixel cosine", method_pixel),
        Method("SSIM", method_ssim),
        Method("random", method_random),
    ]
    return methods


def parse_dmin_configs(text: str | None) -> dict[str, dict]:
    """`--dmin-configs` JSON (row name -> DMinConfig kwargs), added after the default row; each is validated now."""
    configs = {"DMin (default)": {}}
    if text:
        extra = json.loads(text)
        if not isinstance(extra, dict) or not all(isinstance(v, dict) for v in extra.values()):
            raise ValueError(
                f"--dmin-configs must be a JSON object of row name -> DMinConfig kwargs, e.g. "
                f'\'{{"DMin (normalize=none)": {{"normalize": "none"}}}}\', but is {text!r}.'
            )
        for name, kwargs in extra.items():
            DMinConfig(**kwargs)  # a bad option fails before any computation
            configs[name] = kwargs
    return configs


NOT_AVAILABLE = {
    "CLIP similarity": "no CLIP image-encoder weights offline (no installed package ships them; the Hub is unreachable)",
}
