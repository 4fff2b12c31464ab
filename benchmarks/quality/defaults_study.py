"""Issue 12: should an estimator option, or a combination of them, become `DMinConfig`'s default?

The decision rule is fixed in `benchmarks/results/quality/defaults_decision.md` (committed before any number here).
Candidates: {`output_function` "loss" (default) | "output_norm"} x {`normalize` default | "none"} x {no query
preconditioner | `fit_preconditioner(damping=a, center=False)` | `(damping=a, center=True)`}; the damping `a` from
`ALPHAS`, chosen on the tuning half of the LoRA set only.

**LoRA set** (`--part sd`): `sd_lora_lds.py`'s task, imported from it (marked faces, the reference rank-4 LoRA, 32
random-half LoRA fine-tunes as ground truth, 32 generated + 32 validation queries; even positions tune, odd positions
are held out). The fine-tunes are read from `--cache-dir` (shared with sd_lora_lds runs): a missing one is waited for
(another process may be writing it) and trained here only after `--wait-minutes`. Ground truth: sd_lora_lds's own
cached losses when complete, else computed here with its `query_losses`.

**Digits DDPM** (`--part digits`): `estimator_options.py`'s digits machinery (`DigitsContext`, the full recipe, 128
generated queries, even tune / odd held out, class detection@10 on SVM-confident queries); LDS over the retrains
that exist in `--digits-cache` (the longest prefix of the 32 masks; the cache is only read, never written).

**Scores**: plain scores through the library (`GradientIndex.from_sketches` + `search`). Preconditioned scores for
the whole damping grid by the exact dual (Woodbury) form of the library's preconditioner, over the float16-stored
rows: `x_i^T (Sigma_t + lambda_t I)^-1 (q_t - mu_t)`, `Sigma_t` the rows' second moment (covariance when centred),
`lambda_t = a tr(Sigma_t) / K`, which needs N x N eigendecompositions instead of T Cholesky factorisations of K x K
(139 s per fit at K = 4,096 on this machine). `--verify` checks it against `index.fit_preconditioner(...)` +
`index.search(..., precondition=True)` for the chosen dampings (recorded in the JSON).

Usage:
    python -m benchmarks.quality.defaults_study --part sd --threads 1 --cache-dir /work/cache/quality12 --seeds 0 1
    python -m benchmarks.quality.defaults_study --part digits --threads 1 --digits-cache /work/cache/digits --seeds 0 1
    python -m benchmarks.quality.defaults_study --decide      # apply the rule to both JSONs, write the tables
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffusers_dmin import DMinConfig, GradientIndex, GradientSketcher

from . import sd_lora_lds as sdl
from .common import RESULTS_DIR, base_parser, command_line, log, set_threads, write_json
from .metrics import detection_table, lds, subset_predictions, top_k


ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
PASSES = {
    "loss": {},
    "output_norm": {"output_function": "output_norm"},
    "loss, normalize=none": {"normalize": "none"},
    "output_norm, normalize=none": {"output_function": "output_norm", "normalize": "none"},
}
TRANSFORMS = ("none", "precond", "precond+center")
DEFAULT = ("loss", "none")
WORK_CACHE = Path("/work/cache/defaults12")


# ---------------------------------------------------------------------------------------------- scores


def sketch_rows(sketcher: GradientSketcher, images, prompts, batch: int) -> torch.Tensor:
    rows = []
    for i in range(0, len(images), batch):
        rows.append(
            sketcher(images=images[i : i + batch], prompts=None if prompts is None else prompts[i : i + batch])
        )
    return torch.cat(rows)


def library_scores(train: torch.Tensor, queries: torch.Tensor, spec, precondition: tuple | None = None) -> np.ndarray:
    """`(Q, N)` scores through the public API: an exact index over `train`, optionally with the fitted preconditioner
    `precondition = (damping, center)`."""
    n = len(train)
    index = GradientIndex.from_sketches(train, ids=np.arange(n), spec=spec)
    if precondition is not None:
        index.fit_preconditioner(precondition[0], center=precondition[1])
    results = index.search(queries, top_k=n, spec=spec, precondition=precondition is not None)
    scores = np.empty((len(queries), n))
    for row, result in zip(scores, results):
        row[result.sample_ids] = result.scores
    return scores


def preconditioned_grid(train: torch.Tensor, queries: torch.Tensor, center: bool, alphas=ALPHAS) -> dict:
    r"""
    `{a: (Q, N)}`: `sum_t x_{i,t}^T (Sigma_t + lambda_t I)^-1 (q_t - mu_t)` (mu = 0 unless `center`), the library's
    preconditioned score, by Woodbury: with `Xc` the (centred) rows, `Sigma = Xc^T Xc / N` and
    `(Sigma + lam I)^-1 v = (v - Xc^T (Xc Xc^T + N lam I)^-1 Xc v) / lam`. Rows are rounded to float16 first (the
    index's storage); float64 throughout.
    """
    x = train.half().double()
    q = queries.double()
    n, t, k = x.shape
    out = {a: np.zeros((len(q), n)) for a in alphas}
    for s in range(t):
        xt, qt = x[:, s], q[:, s]
        mu = xt.mean(0, keepdim=True) if center else torch.zeros(1, k, dtype=torch.float64)
        xc, qc = xt - mu, qt - mu
        trace = float(xc.pow(2).sum()) / n
        evals, u = torch.linalg.eigh(xc @ xc.T)
        evals = evals.clamp_min(0)
        v = u.T @ (xc @ qc.T)  # (N, Q)
        plain = xt @ qc.T  # (N, Q): x_i . (q - mu)
        cross = xt @ xc.T @ u  # (N, N)
        for a in alphas:
            lam = a * trace / k
            out[a] += ((plain - cross @ (v / (evals + n * lam)[:, None])) / lam).T.numpy()
    return out


def all_scores(train: torch.Tensor, queries: torch.Tensor, spec) -> dict:
    """`{(transform, alpha label): (Q, N)}` for every transform and damping."""
    out = {("none", "-"): library_scores(train, queries, spec)}
    for transform, center in (("precond", False), ("precond+center", True)):
        for a, s in preconditioned_grid(train, queries, center).items():
            out[(transform, f"{a:g}")] = s
    return out


def cached_sketches(path: Path, compute):
    """`compute()` -> dict of tensors, kept as safetensors at `path` (written atomically)."""
    from safetensors.torch import load_file, save_file

    if path.exists():
        return load_file(str(path))
    found = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in found.items()}, str(tmp))
    tmp.replace(path)
    return found


# ---------------------------------------------------------------------------------------------- LoRA set


def lora_path(cache: sdl.LoraCache, mask: np.ndarray) -> Path:
    """The file `sd_lora_lds.LoraCache.get` reads and writes for `mask` (same key)."""
    payload = json.dumps({"recipe": cache.recipe, "mask": [int(v) for v in mask]}).encode()
    return cache.folder / f"lora-{hashlib.sha256(payload).hexdigest()[:20]}.safetensors"


def shared_lora(cache, pipe, init, pixels, captions, mask, wait_s: float, poll_s: float = 10.0) -> dict:
    """A fine-tune from the shared cache, waiting for another process to finish writing it (`save_file` is not
    atomic: a partial file fails to load or has the wrong keys); trained here (and cached) after `wait_s`."""
    from safetensors.torch import load_file

    path = lora_path(cache, mask)
    deadline = time.time() + wait_s
    while True:
        if path.exists():
            try:
                state = load_file(str(path))
                if set(state) == set(init) and all(state[k].shape == init[k].shape for k in init):
                    return state
            except Exception:  # being written
                pass
        if time.time() > deadline:
            log(f"{path.name} did not appear within {wait_s:.0f} s: training it here")
            return cache.get(pipe, init, pixels, captions, mask)
        time.sleep(poll_s)


def lora_task(args) -> dict:
    """sd_lora_lds.run's task, step for step (same recipe, queries, masks and ground truth)."""
    seed = args.seed
    recipe = {"rank": 4, "steps": 100, "batch": 16, "lr": 1e-2, "seed": seed, "targets": sdl.LORA_TARGETS}
    train_px, train_cap, train_grp, val_px, val_cap, val_grp = sdl.marked_faces()
    pipe = sdl.base_pipeline()
    init = sdl.add_lora(pipe, recipe["rank"], seed)
    init = {k: v.detach().clone() for k, v in init.items()}
    cache = sdl.LoraCache(args.cache_dir, recipe)
    n = len(train_px)
    wait_s = 60.0 * args.wait_minutes
    reference = shared_lora(cache, pipe, init, train_px, train_cap, np.ones(n), wait_s)
    sdl.set_lora_state(pipe, reference)
    per_group = 8
    colors = list(sdl.MARK_COLORS)
    gen_prompts = [f"a photo of a face on {colors[i % 4]}" for i in range(4 * per_group)]
    gen_groups = np.asarray([colors[i % 4] for i in range(4 * per_group)])
    gen_px, _, _ = sdl.generate_with_trajectory(pipe, gen_prompts, seed=5000 + 100 * seed)
    rows = np.arange(4 * per_group)
    val_px, val_cap, val_grp = val_px[rows], [val_cap[i] for i in rows], val_grp[rows]
    kinds = {"generated": (gen_px, gen_prompts), "validation": (val_px, val_cap)}
    masks = np.zeros((32, n))
    rng = np.random.default_rng(1000 + seed)
    for m in range(32):
        masks[m, rng.permutation(n)[: n // 2]] = 1.0
    digest = hashlib.sha256(json.dumps({"recipe": recipe, "masks": masks.tolist()}).encode())
    for px, _ in kinds.values():
        digest.update(px.numpy().tobytes())

    def ground_truth() -> tuple[dict, str]:
        """sd_lora_lds's cached losses when complete, else computed here from the (shared) fine-tunes."""
        shared_truth = args.cache_dir / f"truth-{digest.hexdigest()[:20]}.npz"
        own_truth = WORK_CACHE / f"sd-truth-{digest.hexdigest()[:20]}.npz"
        for path in (own_truth, shared_truth):
            try:
                with np.load(path) as stored:
                    found = {kind: stored[kind] for kind in kinds}
                if all(np.isfinite(v).all() for v in found.values()):
                    return found, str(path)
            except Exception:  # missing, or being written
                continue
        actual = {kind: np.full((len(v[0]), 32), np.nan) for kind, v in kinds.items()}
        for m, mask in enumerate(masks):
            sdl.set_lora_state(pipe, shared_lora(cache, pipe, init, train_px, train_cap, mask, wait_s))
            for kind, (px, prompts) in kinds.items():
                actual[kind][:, m] = sdl.query_losses(pipe, px, prompts)
            log(f"ground truth: subset {m + 1}/32")
        own_truth.parent.mkdir(parents=True, exist_ok=True)
        np.savez(own_truth, **actual)
        sdl.set_lora_state(pipe, reference)
        return actual, f"computed here from the cached fine-tunes ({own_truth})"

    return {
        "pipe": pipe,
        "train": (train_px, train_cap),
        "train_groups": train_grp,
        "gen_groups": gen_groups,
        "kinds": kinds,
        "masks": masks,
        "ground_truth": ground_truth,
        "trained_here": cache.stats,
        "generated_mark_accuracy": float(np.mean(sdl.mark_color_of(gen_px) == gen_groups)),
    }


def run_sd(args) -> dict:
    task = lora_task(args)
    pipe, (train_px, train_cap) = task["pipe"], task["train"]
    colors = list(sdl.MARK_COLORS)
    all_found: dict = {}
    seconds: dict = {}
    for seed in args.seeds:  # sketches and scores first: they need only the reference fine-tune
        for name, kwargs in PASSES.items():
            config = DMinConfig(seed=seed, **kwargs)
            sketcher = GradientSketcher.from_pipeline(pipe, config)
            sketcher.set_progress_bar_config(disable=True)
            tag = hashlib.sha256(json.dumps([config.to_json(), "sd_lora", args.seed]).encode()).hexdigest()[:12]

            def compute():
                start = time.perf_counter()
                found = {"train": sketch_rows(sketcher, train_px, train_cap, 64)}
                seconds[f"{name} (seed {seed})"] = (time.perf_counter() - start) / len(train_px)
                for kind, (px, prompts) in task["kinds"].items():
                    found[kind] = sketch_rows(sketcher, px, prompts, 64)
                return found

            sk = cached_sketches(WORK_CACHE / f"sd-{tag}-seed{seed}.safetensors", compute)
            for kind in task["kinds"]:
                all_found[(seed, name, kind)] = all_scores(sk["train"], sk[kind], sketcher.spec)
            log(f"LoRA set: seed {seed}, pass {name} sketched and scored")
    actual, truth_source = task["ground_truth"]()
    log(f"LoRA-set ground truth: {truth_source}; {task['trained_here']['trainings']} fine-tunes trained here")
    records: dict = {}
    for (seed, name, kind), found in all_found.items():
        for (transform, alpha), scores in found.items():
            rec = (
                records.setdefault(name, {}).setdefault(transform, {}).setdefault(alpha, {}).setdefault(str(seed), {})
            )
            rec[f"lds_{kind}"] = lds(subset_predictions(scores, task["masks"]), actual[kind])
            if kind == "generated":
                det = detection_table(top_k(scores, 10), task["train_groups"], task["gen_groups"], (5, 10), colors)
                rec["det5"] = det["k=5"]["per_query"]
                rec["det10"] = det["k=10"]["per_query"]
    task["actual"] = actual
    result = {
        "model": "sd_lora",
        "seeds": list(args.seeds),
        "alphas": list(ALPHAS),
        "num_subsets": 32,
        "queries_per_kind": 32,
        "truth_source": truth_source,
        "fine_tunes_trained_here": task["trained_here"],
        "generated_mark_accuracy": task["generated_mark_accuracy"],
        "sketch_seconds_per_sample": seconds,
        "records": records,
    }
    if args.verify:
        result["verify"] = verify(result, task, args)
    return result


def verify(result: dict, task: dict, args) -> list:
    """The dual-form scores against the library's `fit_preconditioner` + `search(precondition=True)` at the
    dampings chosen on the tuning half (seed `args.seeds[0]`, generated queries)."""
    pipe = task["pipe"]
    chosen = choose_dampings(result)
    seed = args.seeds[0]
    out = []
    for name in args.verify_passes:
        config = DMinConfig(seed=seed, **PASSES[name])
        sketcher = GradientSketcher.from_pipeline(pipe, config)
        tag = hashlib.sha256(json.dumps([config.to_json(), "sd_lora", args.seed]).encode()).hexdigest()[:12]
        sk = cached_sketches(WORK_CACHE / f"sd-{tag}-seed{seed}.safetensors", None)
        for transform, center in (("precond", False), ("precond+center", True)):
            a = float(chosen[(name, transform)])
            start = time.perf_counter()
            lib = library_scores(sk["train"], sk["generated"], sketcher.spec, (a, center))
            fit_s = time.perf_counter() - start
            dual = preconditioned_grid(sk["train"], sk["generated"], center, (a,))[a]
            rel = float(np.abs(lib - dual).max() / np.abs(dual).max())
            same_top5 = float(np.mean([set(x) == set(y) for x, y in zip(top_k(lib, 5), top_k(dual, 5))]))
            lds_lib = lds(subset_predictions(lib, task["masks"]), task["actual"]["generated"])
            lds_dual = lds(subset_predictions(dual, task["masks"]), task["actual"]["generated"])
            row = {
                "pass": name,
                "transform": transform,
                "damping": a,
                "max_rel_diff": rel,
                "same_top5_share": same_top5,
                "max_abs_lds_diff": float(np.nanmax(np.abs(lds_lib - lds_dual))),
                "library_seconds": fit_s,
            }
            log(f"verify {row}")
            out.append(row)
    return out


# ---------------------------------------------------------------------------------------------- digits


def run_digits(args) -> dict:
    from .digits_context import DigitsContext, recipe_for
    from .estimator_options import model_path

    ctx = DigitsContext(recipe_for(False, args.seed), args.digits_cache)
    reference_path = args.digits_cache / f"ddpm-{ctx._key(np.zeros(0, dtype=np.int64))}.pt"
    while not reference_path.exists():  # never trained here: the cache is another helper's
        log(f"waiting for the digits reference model {reference_path}")
        time.sleep(30)
    time.sleep(2)
    queries, labels, confidence = ctx.queries(128)
    confident = confidence >= 0.8
    found: dict = {}
    seconds: dict = {}
    passes = args.digits_passes or list(PASSES)
    for seed in args.seeds:  # sketches and scores first: the retrains may still be arriving
        for name in passes:
            config = DMinConfig(seed=seed, **PASSES[name])
            sketcher = GradientSketcher.from_pipeline(ctx.reference, config)
            sketcher.set_progress_bar_config(disable=True)
            tag = hashlib.sha256(json.dumps([config.to_json(), ctx.recipe.to_dict()]).encode()).hexdigest()[:12]

            def compute():
                start = time.perf_counter()
                train = sketch_rows(sketcher, ctx.images, None, 256)
                seconds[f"{name} (seed {seed})"] = (time.perf_counter() - start) / len(train)
                return {"train": train, "queries": sketcher(images=queries)}

            sk = cached_sketches(WORK_CACHE / f"digits-{tag}-seed{seed}.safetensors", compute)
            found[(seed, name)] = all_scores(sk["train"], sk["queries"], sketcher.spec)
            log(f"digits: seed {seed}, pass {name} sketched and scored")
    if args.sketch_only:
        raise SystemExit("digits sketches cached (--sketch-only)")
    masks = ctx.lds_masks(32)
    have = [model_path(ctx, mask).exists() for mask in masks] + [False]
    masks = masks[: have.index(False)]
    if len(masks) < 4:
        raise SystemExit(f"only {len(masks)} LDS retrains in {args.digits_cache}; wait for more")
    log(f"digits: LDS over the {len(masks)} retrains available in {args.digits_cache}")
    actual = np.empty((len(queries), len(masks)))
    for m, mask in enumerate(masks):  # each retrain's probe losses cached on their own, so later runs add columns
        path = WORK_CACHE / f"digits-loss-q128-{model_path(ctx, mask).stem}.npy"  # queries: fixed by the recipe
        if not path.exists():
            np.save(path, ctx.query_losses(ctx.model(np.flatnonzero(mask == 0)), queries))
        actual[:, m] = np.load(path)
    log("digits: ground truth done")
    records: dict = {}
    for (seed, name), per_transform in found.items():
        for (transform, alpha), scores in per_transform.items():
            rec = records.setdefault(name, {}).setdefault(transform, {}).setdefault(alpha, {})
            rec = rec.setdefault(str(seed), {})
            rec["lds"] = lds(subset_predictions(scores, masks), actual)
            det = detection_table(top_k(scores, 10), ctx.labels, labels, (10,), groups=list(range(10)))
            rec["det10"] = [v if c else None for v, c in zip(det["k=10"]["per_query"], confident)]
    return {
        "model": "digits",
        "recipe": ctx.recipe.to_dict(),
        "seeds": list(args.seeds),
        "alphas": list(ALPHAS),
        "num_subsets": len(masks),
        "num_queries": len(queries),
        "num_confident": int(confident.sum()),
        "sketch_seconds_per_sample": seconds,
        "records": records,
    }


# ---------------------------------------------------------------------------------------------- decision


def halves(num: int) -> tuple[np.ndarray, np.ndarray]:
    idx = np.arange(num)
    return idx[idx % 2 == 0], idx[idx % 2 == 1]


def seed_mean(per_seed: dict, key: str) -> np.ndarray:
    """Per-query values averaged over seeds (None/NaN kept as NaN)."""
    stack = np.asarray([[np.nan if v is None else v for v in s[key]] for s in per_seed.values()], dtype=np.float64)
    return np.nanmean(stack, axis=0) if np.isfinite(stack).any() else stack[0]


def choose_dampings(sd: dict) -> dict:
    """`{(pass, transform): alpha label}`: the damping with the best mean tuning-half LDS (generated and
    validation averaged, over seeds) on the LoRA set."""
    tune, _ = halves(sd["queries_per_kind"])
    chosen = {}
    for name, transforms in sd["records"].items():
        for transform, per_alpha in transforms.items():
            if transform == "none":
                chosen[(name, transform)] = "-"
                continue

            def tune_score(alpha):
                per_seed = per_alpha[alpha]
                return np.mean(
                    [np.nanmean(seed_mean(per_seed, f"lds_{k}")[tune]) for k in ("generated", "validation")]
                )

            chosen[(name, transform)] = max(per_alpha, key=tune_score)
    return chosen


def paired(cand: np.ndarray, base: np.ndarray, rows: np.ndarray) -> dict:
    d = (cand - base)[rows]
    d = d[np.isfinite(d)]
    sem = float(d.std(ddof=1) / np.sqrt(d.size)) if d.size > 1 else float("nan")
    return {"delta": float(d.mean()), "sem": sem, "n": int(d.size)}


def summarise(result: dict, chosen: dict, metrics: dict) -> dict:
    """Per candidate: held-out and tuning means (seed-averaged per query), seed sd of the held-out mean, and the
    paired held-out difference to the default, for each metric (`{label: record key}`)."""
    first = next(iter(metrics.values()))
    num = len(next(iter(next(iter(result["records"].values()))["none"]["-"].values()))[first])
    tune, report = halves(num)
    out = {}
    for (name, transform), alpha in chosen.items():
        if name not in result["records"] or transform not in result["records"][name]:
            continue
        per_seed = result["records"][name][transform][alpha]
        base_seed = result["records"][DEFAULT[0]][DEFAULT[1]]["-"]
        entry = {"damping": alpha}
        for label, key in metrics.items():
            values, base = seed_mean(per_seed, key), seed_mean(base_seed, key)
            seed_means = [
                float(np.nanmean(np.asarray([np.nan if v is None else v for v in s[key]], dtype=float)[report]))
                for s in per_seed.values()
            ]
            entry[label] = {
                "report": float(np.nanmean(values[report])),
                "tune": float(np.nanmean(values[tune])),
                "seed_sd": float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else None,
                "vs_default": paired(values, base, report),
            }
        out[f"{name} | {transform}"] = entry
    return out


SD_METRICS = {"LDS generated": "lds_generated", "LDS validation": "lds_validation", "top-5": "det5", "top-10": "det10"}
DIGITS_METRICS = {"digits LDS": "lds", "digits det@10": "det10"}


def decide(sd: dict, digits: dict | None) -> dict:
    chosen = choose_dampings(sd)
    table = summarise(sd, chosen, SD_METRICS)
    if digits is not None:
        for key, entry in summarise(digits, chosen, DIGITS_METRICS).items():
            table.setdefault(key, {}).update({k: v for k, v in entry.items() if k != "damping"})
        digits_own = {}
        for name, transforms in digits["records"].items():
            for transform, per_alpha in transforms.items():
                if transform == "none":
                    continue
                tune, _ = halves(digits["num_queries"])
                digits_own[f"{name} | {transform}"] = max(
                    per_alpha, key=lambda a: float(np.nanmean(seed_mean(per_alpha[a], "lds")[tune]))
                )
    criteria = [
        ("LDS generated", "gt", 2.0),
        ("LDS validation", "gt", 2.0),
        ("digits LDS", "gt", 2.0),
        ("top-5", "ge", -1.0),
        ("digits det@10", "ge", -1.0),
    ]
    verdicts = {}
    for key, entry in table.items():
        if key == " | ".join(DEFAULT):
            continue
        checks = {}
        for label, kind, k in criteria:
            if label not in entry:
                checks[label] = {"pass": None, "why": "not run (an earlier criterion failed)"}
                continue
            d = entry[label]["vs_default"]
            bound = k * d["sem"]
            ok = d["delta"] > bound if kind == "gt" else d["delta"] >= bound
            checks[label] = {"pass": bool(ok), "delta": d["delta"], "bound": bound, "margin": d["delta"] - bound}
        decided = [c["pass"] for c in checks.values()]
        wins = all(c is True for c in decided)
        verdicts[key] = {
            "checks": checks,
            "wins": wins,
            "fails": [label for label, c in checks.items() if c["pass"] is False],
            "may_be_default": wins and "normalize=none" not in key,
        }
    return {
        "chosen_damping": {" | ".join(k): v for k, v in chosen.items()},
        "digits_own_choice": digits_own if digits is not None else None,
        "table": table,
        "verdicts": verdicts,
    }


def fmt_cell(entry: dict | None, label: str) -> str:
    if entry is None or label not in entry:
        return "not run"
    e = entry[label]
    sd = f" ± {e['seed_sd']:.3f}" if e["seed_sd"] is not None else ""
    return f"{e['report']:.3f}{sd} ({e['tune']:.3f})"


def fmt_delta(entry: dict | None, label: str) -> str:
    if entry is None or label not in entry:
        return "-"
    d = entry[label]["vs_default"]
    return f"{d['delta']:+.3f} ± {d['sem']:.3f}"


PASS_LABELS = {
    "loss": "`DMinConfig()`",
    "output_norm": '`output_function="output_norm"`',
    "loss, normalize=none": '`normalize="none"`',
    "output_norm, normalize=none": '`output_norm` + `normalize="none"`',
}
TRANSFORM_LABELS = {"none": "-", "precond": "preconditioned", "precond+center": "preconditioned, centred"}


def row_label(key: str) -> str:
    name, transform = key.split(" | ")
    return f"{PASS_LABELS[name]} | {TRANSFORM_LABELS[transform]}"


def verdict_text(verdict: dict | None) -> str:
    if verdict is None:
        return "default"
    if verdict["fails"]:
        return "fails: " + ", ".join(verdict["fails"])
    if not verdict["wins"]:
        return "passes the LoRA criteria; digits not run"
    return "**wins**" + ("" if verdict["may_be_default"] else " (normalize=none: option only)")


def decision_markdown(sd: dict, digits: dict | None, decision: dict) -> str:
    table, verdicts = decision["table"], decision["verdicts"]
    labels = ["LDS generated", "LDS validation", "top-5", "digits LDS", "digits det@10"]
    header = ["estimator", "query transform", "damping", *labels, "verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, entry in table.items():
        cells = " | ".join(fmt_cell(entry, x) for x in labels)
        lines.append(
            f"| {row_label(key)} | {entry.get('damping', '-')} | {cells} | {verdict_text(verdicts.get(key))} |"
        )
    delta_lines = [
        "| estimator | query transform | " + " | ".join(f"Δ {x}" for x in labels) + " |",
        "|" + "---|" * (len(labels) + 2),
    ]
    for key, entry in table.items():
        if key == " | ".join(DEFAULT):
            continue
        delta_lines.append(f"| {row_label(key)} | " + " | ".join(fmt_delta(entry, x) for x in labels) + " |")
    tune, _ = halves(sd["queries_per_kind"])
    grid_lines = []
    for name, transforms in sd["records"].items():
        for transform, per_alpha in transforms.items():
            if transform == "none":
                continue
            values = []
            for alpha, per_seed in per_alpha.items():
                gen = np.nanmean(seed_mean(per_seed, "lds_generated")[tune])
                val = np.nanmean(seed_mean(per_seed, "lds_validation")[tune])
                values.append(f"{alpha}: {gen:.3f} / {val:.3f}")
            own = (decision.get("digits_own_choice") or {}).get(f"{name} | {transform}")
            own_text = f"; the digits' own tuning-half choice would be {own}" if own else ""
            grid_lines.append(f"- {row_label(f'{name} | {transform}')}: " + ", ".join(values) + own_text)
    spread = (
        f"LoRA set: {sd['num_subsets']} random-half fine-tunes, 16 held-out queries per kind (tuning half in brackets), "
        f"sketch/noise seeds {sd['seeds']}; mean ± sd over seeds of the held-out mean. Ground truth: {sd['truth_source']}."
    )
    if digits is not None:
        spread += (
            f" Digits: LDS over {digits['num_subsets']} retrains, 64 held-out of {digits['num_queries']} queries, "
            f"det@10 on the SVM-confident ones ({digits['num_confident']} of {digits['num_queries']}), seeds "
            f"{digits['seeds']}, damping as chosen on the LoRA set's tuning half."
        )
    return (
        spread
        + "\n\n"
        + "\n".join(lines)
        + "\n\nPaired held-out differences to the default (mean ± sem over held-out queries, per-query values averaged "
        "over seeds first; the rule needs Δ > 2 sem for LDS and Δ ≥ −1 sem for detection):\n\n"
        + "\n".join(delta_lines)
        + "\n\nDamping grid on the LoRA set's tuning half (LDS generated / validation, mean over seeds):\n\n"
        + "\n".join(grid_lines)
        + "\n"
    )


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    parser.set_defaults(cache_dir=sdl.DEFAULT_CACHE)
    parser.add_argument("--part", choices=("sd", "digits"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--wait-minutes", type=float, default=10.0, help="wait this long for a shared fine-tune")
    parser.add_argument("--digits-cache", type=Path, default=Path("/work/cache/digits"))
    parser.add_argument("--digits-passes", nargs="*", default=None, choices=list(PASSES))
    parser.add_argument("--sketch-only", action="store_true", help="digits: only fill the sketch cache, then stop")
    parser.add_argument("--verify", action="store_true", help="check the dual form against the library's path")
    parser.add_argument("--verify-passes", nargs="*", default=["loss"], choices=list(PASSES))
    parser.add_argument("--decide", action="store_true", help="apply the rule to the JSONs and write the tables")
    args = parser.parse_args(argv)
    if args.decide:
        sd = json.loads((RESULTS_DIR / "defaults_sd_lora.json").read_text())
        digits_path = RESULTS_DIR / "defaults_digits.json"
        digits = json.loads(digits_path.read_text()) if digits_path.exists() else None
        decision = decide(sd, digits)
        write_json("defaults_decision", decision)
        text = decision_markdown(sd, digits, decision)
        path = RESULTS_DIR / "defaults_decision.md"
        rule = path.read_text().split("\n## Results (written by")[0].rstrip()
        command = "python -m benchmarks.quality.defaults_study --decide"
        path.write_text(f"{rule}\n\n## Results (written by `{command}`)\n\n{text}")
        print(text)
        return decision
    set_threads(args.threads)
    result = run_sd(args) if args.part == "sd" else run_digits(args)
    result["command"] = command_line()
    write_json(f"defaults_{'sd_lora' if args.part == 'sd' else 'digits'}", result)
    return result


if __name__ == "__main__":
    main()
