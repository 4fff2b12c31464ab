"""What the digits experiments (ablations, counterfactual removal, LDS, stroke thickness) share.

A `DigitsContext` holds the 1,797 8x8 digits, the reference DDPM trained on all of them (`DDPMRecipe`, seeded),
generated query digits with classifier labels, the query-loss probe, and a cache of retrained models keyed by
(recipe, removed samples), so experiments run in one process (`run_all`) never train the same model twice.

The query-loss probe is the ground-truth quantity of the counterfactual experiments: the generated sample's
diffusion loss at fixed noise and timesteps, `GradientSketcher.losses` under `LOSS_CONFIG` (50 uniformly spaced
timesteps x 4 noise draws, from a seed unrelated to the attribution configs' noise, so no method gets to see the
probe's noise).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffusers_dmin import DMinConfig, GradientIndex, GradientSketcher

from .common import log
from .data import digits
from .models import DDPMRecipe, digit_classifier, generate_ddpm, train_ddpm


LOSS_CONFIG = DMinConfig(timestep_spacing="uniform", num_timesteps=50, num_noise_draws=4, seed=2024, sketch_dim=8)
QUICK_RECIPE = DDPMRecipe(steps=400, warmup_steps=20)
FULL_RECIPE = DDPMRecipe(steps=800, warmup_steps=40)


def default_cache_dir() -> Path:
    """Where the digits runners keep retrained models and method scores unless `--cache-dir` says otherwise:
    `$XDG_CACHE_HOME/diffusers_dmin/benchmarks/digits` (`~/.cache/...` when XDG_CACHE_HOME is unset)."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "diffusers_dmin" / "benchmarks" / "digits"


def recipe_for(quick: bool, seed: int = 0) -> DDPMRecipe:
    base = QUICK_RECIPE if quick else FULL_RECIPE
    return DDPMRecipe(**{**base.to_dict(), "seed": seed})


def save_atomic(state_dict: dict, path: Path) -> None:
    """`torch.save` to a temporary file in `path`'s folder, then `os.replace`: a reader (another process sharing the
    cache) sees either no file or the whole model, never a partly written one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state_dict, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; other readers of a shared cache need to read it
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class DigitsContext:
    recipe: DDPMRecipe
    cache_dir: Path | None = None
    images: torch.Tensor = field(init=False)
    labels: np.ndarray = field(init=False)
    _models: dict = field(default_factory=dict, init=False)
    stats: dict = field(default_factory=lambda: {"trainings": 0, "train_seconds": 0.0}, init=False)

    def __post_init__(self):
        self.images, self.labels = digits(self.recipe.image_size)
        self._classifier = None

    @property
    def num_train(self) -> int:
        return len(self.labels)

    # ------------------------------------------------------------------ models

    def _key(self, removed: np.ndarray) -> str:
        payload = json.dumps({"recipe": self.recipe.to_dict(), "removed": sorted(int(i) for i in removed)})
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    def model(self, removed: np.ndarray | None = None):
        """The DDIM pipeline trained without the `removed` training rows (None: the reference model)."""
        import time

        removed = np.zeros(0, dtype=np.int64) if removed is None else np.unique(np.asarray(removed, dtype=np.int64))
        key = self._key(removed)
        if key in self._models:
            return self._models[key]
        path = self.cache_dir / f"ddpm-{key}.pt" if self.cache_dir is not None else None
        weights = np.ones(self.num_train)
        weights[removed] = 0.0
        if path is not None and path.exists():
            from diffusers import DDIMPipeline, DDIMScheduler

            from .models import build_ddpm_unet, ddpm_scheduler

            unet = build_ddpm_unet(self.recipe)
            unet.load_state_dict(torch.load(path, weights_only=True))
            unet.eval()
            pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_config(ddpm_scheduler(self.recipe).config))
            pipe.set_progress_bar_config(disable=True)
        else:
            start = time.perf_counter()
            pipe = train_ddpm(self.images, self.recipe, weights)
            self.stats["trainings"] += 1
            self.stats["train_seconds"] += time.perf_counter() - start
            if path is not None:
                save_atomic(pipe.unet.state_dict(), path)
        if len(self._models) > 64:  # keep memory bounded in long runs
            self._models.pop(next(iter(self._models)))
        self._models[key] = pipe
        return pipe

    @property
    def reference(self):
        return self.model(None)

    # ------------------------------------------------------------------ queries

    def classifier(self):
        if self._classifier is None:
            self._classifier = digit_classifier(self.recipe.image_size)
        return self._classifier

    def queries(self, num: int, seed: int = 1000) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """`num` digits generated by the reference model from `seed`, their classifier labels and confidences."""
        images = generate_ddpm(self.reference, num, seed)
        proba = self.classifier().predict_proba(images.reshape(num, -1).numpy())
        return images, proba.argmax(1), proba.max(1)

    def query_losses(self, pipe, queries: torch.Tensor) -> np.ndarray:
        """The probe: mean diffusion loss of each query under `pipe` at LOSS_CONFIG's fixed noise and timesteps."""
        sketcher = GradientSketcher.from_pipeline(pipe, LOSS_CONFIG, mode="loop")
        losses = [sketcher.losses(images=queries[i : i + 16]) for i in range(0, len(queries), 16)]
        return torch.cat(losses).mean(1).double().numpy()

    # ------------------------------------------------------------------ DMin through the public API

    def dmin_scores(self, config: DMinConfig, queries: torch.Tensor, pipe=None, batch: int = 256) -> dict:
        """DMin scores `(Q, N)` of `queries` against every training digit, via GradientSketcher + GradientIndex."""
        import time

        pipe = self.reference if pipe is None else pipe
        sketcher = GradientSketcher.from_pipeline(pipe, config)
        sketcher.set_progress_bar_config(disable=True)
        start = time.perf_counter()
        train = torch.cat([sketcher(images=self.images[i : i + batch]) for i in range(0, self.num_train, batch)])
        build_s = time.perf_counter() - start
        index = GradientIndex.from_sketches(train, ids=np.arange(self.num_train), spec=sketcher.spec)
        start = time.perf_counter()
        query_sketches = sketcher(images=queries)
        results = index.search(query_sketches, top_k=self.num_train, spec=sketcher.spec)
        query_s = time.perf_counter() - start
        scores = np.empty((len(queries), self.num_train))
        for row, result in zip(scores, results):
            row[result.sample_ids] = result.scores
        return {
            "scores": scores,
            "sketch_seconds_per_sample": build_s / self.num_train,
            "query_seconds": query_s,
            "input_dim": sketcher.input_dim,
            "timesteps": list(sketcher.timesteps),
        }

    # ------------------------------------------------------------------ LDS

    def lds_masks(self, num_subsets: int, seed: int = 7, fraction: float = 0.5) -> np.ndarray:
        """`(M, N)` 0/1 masks of random subsets holding `fraction` of the training rows."""
        rng = np.random.default_rng(seed)
        keep = int(round(fraction * self.num_train))
        masks = np.zeros((num_subsets, self.num_train))
        for m in range(num_subsets):
            masks[m, rng.permutation(self.num_train)[:keep]] = 1.0
        return masks

    def subset_losses(self, masks: np.ndarray, queries: torch.Tensor) -> np.ndarray:
        """`(Q, M)` probe losses of the queries under models retrained on each subset (same init and seed)."""
        out = np.empty((len(queries), len(masks)))
        for m, mask in enumerate(masks):
            pipe = self.model(np.flatnonzero(mask == 0))
            out[:, m] = self.query_losses(pipe, queries)
            log(f"LDS subset {m + 1}/{len(masks)} retrained")
        return out
