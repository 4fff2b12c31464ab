"""Issue 12, part 3: the estimator options, measured with a held-out split, on the digits DDPM and the tiny SD.

Options (each a change from the library default `DMinConfig()`, K = 4,096):

- `sketch_normalize=True`: each timestep's sketch divided by its own norm (cosine of sketches), also at K = 1,024
  and 256 (sketches of one pass folded, which equals sketching at that K with the same seed);
- `output_function="output_norm"`: D-TRAK's output function `||eps_theta(x_t, t)||^2` instead of the loss;
- 4 noise draws, combined as `"mean"` (the library's) or `"separate"` (per-draw blocks: matched-noise scores only),
  with and without `sketch_normalize`; all four come from one pass with `noise_draws="separate"` at K = 4 x 4,096
  (the mean of the blocks is the K = 4,096 sketch of the mean, since the sketch is linear);
- query-side transforms fitted on the index's own training sketches (applied to the query only):
  *centred* (the mean training sketch per timestep subtracted from the query; subtracting it from the training rows
  too would shift every score of a query by the same constant, so rankings and LDS are those of fully centred
  sketches) and *preconditioned* (the query multiplied per timestep by `(Sigma_t + lambda_t I)^-1`, `Sigma_t` the
  K x K second moment of the training sketches, `lambda_t = alpha tr(Sigma_t) / K`: TRAK's damped kernel inverse).

Held-out protocol: the queries are split in two halves (digits: even/odd positions; SD: alternating within each
subset). Everything chosen (the damping alpha, and whether an option becomes the default) is chosen on half A; the
tables report half B next to it. Spread: mean ± sd over sketch seeds (the config seed: sketch and noise).

Digits ground truth: LDS over 32 random-half retrains (ablations.py's protocol; models cached in --cache-dir,
default `~/.cache/diffusers_dmin/benchmarks/digits`; with an explicit --cache-dir the run waits for models trained
there by another run, unless --train-missing) and
class detection@10 on SVM-confident queries. Tiny SD: detection@10 (share of the top-10 from the caption's subset)
on 36 generated queries per subset (the test captions), one generation each.

Usage:
    python -m benchmarks.quality.estimator_options --threads 1 --model digits   # retrains: --cache-dir (default below)
    python -m benchmarks.quality.estimator_options --threads 1 --model sd
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from diffusers_dmin import DMinConfig, GradientSketcher
from diffusers_dmin.sketch import fold_sketch

from .common import base_parser, command_line, log, set_threads, write_json, write_markdown
from .metrics import detection_table, lds, subset_predictions, summary, top_k


K = 4096
ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # damping grid, in units of tr(Sigma_t) / K
DRAWS = 4
RESULTS = Path(__file__).resolve().parents[1] / "results" / "quality"


# ---------------------------------------------------------------------------------------------- sketches


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)


def sketch_all(sketcher: GradientSketcher, inputs: dict, batch: int) -> torch.Tensor:
    """Sketches of all rows of `inputs` ({"images"| "latents", optional "prompts"}), batch by batch."""
    key = "images" if "images" in inputs else "latents"
    n = len(inputs[key])
    out = []
    for start in range(0, n, batch):
        kwargs = {key: inputs[key][start : start + batch]}
        if inputs.get("prompts") is not None:
            kwargs["prompts"] = inputs["prompts"][start : start + batch]
        out.append(sketcher(**kwargs))
    return torch.cat(out)


def variants_of_pass(kind: str, sketches: torch.Tensor) -> dict[str, torch.Tensor]:
    """The variants one sketching pass yields (float32 `(n, T, k)` each)."""
    if kind == "default":
        out = {"default: DMinConfig()": sketches, "sketch_normalize": _unit(sketches)}
        for k in (1024, 256):
            folded = fold_sketch(sketches, k)
            out[f"K={k}"] = folded
            out[f"K={k} + sketch_normalize"] = _unit(folded)
        return out
    if kind == "output_norm":
        return {"output_function=output_norm": sketches, "output_norm + sketch_normalize": _unit(sketches)}
    if kind == "draws":  # noise_draws="separate" at K = 4 x 4096: block r = S_4096(g_r) / 2
        n, t, _ = sketches.shape
        blocks = sketches.reshape(n, t, DRAWS, K)
        mean = blocks.sum(2) / math.sqrt(DRAWS)  # = S_4096(mean_r g_r), the library's noise_draws="mean"
        separate = fold_sketch(blocks, K // DRAWS).flatten(2)  # = noise_draws="separate" at K = 4096
        unit_blocks = (_unit(fold_sketch(blocks, K // DRAWS)) / math.sqrt(DRAWS)).flatten(2)
        return {
            "4 draws, mean": mean,
            "4 draws, mean + sketch_normalize": _unit(mean),
            "4 draws, separate": separate,
            "4 draws, separate + sketch_normalize": unit_blocks,
        }
    raise ValueError(kind)


PASSES = {
    "default": {},
    "output_norm": {"output_function": "output_norm"},
    "draws": {"num_noise_draws": DRAWS, "noise_draws": "separate", "sketch_dim": DRAWS * K},
}
TRANSFORM_VARIANTS = ("default: DMinConfig()", "sketch_normalize", "K=1024", "K=1024 + sketch_normalize")


# ---------------------------------------------------------------------------------------------- query transforms


def transformed_scores(train: torch.Tensor, queries: torch.Tensor, transforms: bool) -> dict[str, np.ndarray]:
    """`{transform name: (Q, N) scores}`. Train rows are cast to float16 first (the index's storage)."""
    x = train.half().double()
    q = queries.double()
    out = {"plain": torch.einsum("qtk,ntk->qn", q, x).numpy()}
    mu = x.mean(0, keepdim=True)
    out["centred"] = torch.einsum("qtk,ntk->qn", q - mu, x).numpy()
    if not transforms:
        return out
    for centred in (False, True):
        xs, qs = (x - mu, q - mu) if centred else (x, q)
        n, t, k = xs.shape
        per_alpha = {a: torch.zeros(q.shape[0], n, dtype=torch.float64) for a in ALPHAS}
        for step in range(t):
            # float32 eigendecompositions of the smaller side (damping >= 1e-3 of the mean eigenvalue keeps them exact
            # enough); the scores are accumulated in float64
            xt, qt = xs[:, step].float(), qs[:, step].float()
            w = (xt @ qt.T).double()  # (N, Q) plain scores
            scale = float(xt.double().pow(2).sum() / n / k)  # tr(Sigma) / K
            if n <= k:  # X = U S V^T from the N x N Gram matrix
                evals, u = torch.linalg.eigh(xt @ xt.T)
                e, u = evals.double().clamp_min(0) / n, u.double()
                uw = u.T @ w
                for alpha in ALPHAS:
                    lam = alpha * scale
                    # X (Sigma + lam I)^-1 q = (1/lam) (W - U diag(e / (e + lam)) U^T W)
                    per_alpha[alpha] += ((w - u @ ((e / (e + lam))[:, None] * uw)) / lam).T
            else:  # Sigma = V diag(e) V^T directly (K x K)
                evals, v = torch.linalg.eigh(xt.T @ xt / n)
                e, v = evals.double().clamp_min(0), v.double()
                xv, vq = xt.double() @ v, v.T @ qt.double().T  # (N, K), (K, Q)
                for alpha in ALPHAS:
                    lam = alpha * scale
                    per_alpha[alpha] += (xv @ (vq / (e + lam)[:, None])).T
        for alpha in ALPHAS:
            out[f"{'centred + ' if centred else ''}preconditioned a={alpha:g}"] = per_alpha[alpha].numpy()
    return out


# ---------------------------------------------------------------------------------------------- digits


def digits_halves(num_queries: int) -> dict[str, np.ndarray]:
    idx = np.arange(num_queries)
    return {"A": idx[idx % 2 == 0], "B": idx[idx % 2 == 1]}


def model_path(ctx, mask) -> Path:
    return ctx.cache_dir / f"ddpm-{ctx._key(np.unique(np.flatnonzero(mask == 0)))}.pt"


def wait_for_models(ctx, masks, poll_s: float = 20.0) -> None:
    """The LDS retrains are trained once into the shared cache (by ablations.py or any run); wait for them rather
    than train a second copy concurrently."""
    for mask in masks:
        path = model_path(ctx, mask)
        while not path.exists():
            time.sleep(poll_s)
        time.sleep(1.0)  # a file that just appeared may still be being written


def evaluate_digits(scores: np.ndarray, ctx, labels, confident, masks, actual, halves) -> dict:
    rankings = top_k(scores, 10)
    per_query_lds = lds(subset_predictions(scores, masks), actual)
    out = {}
    for half, rows in halves.items():
        conf = rows[confident[rows]]
        det = detection_table(rankings[conf], ctx.labels, labels[conf], (10,), groups=list(range(10)))
        out[half] = {"lds": float(np.nanmean(per_query_lds[rows])), "det10": det["k=10"]["mean"]}
    return out


def run_digits(args) -> dict:
    from .digits_context import DigitsContext, recipe_for

    ctx = DigitsContext(recipe_for(False, args.seed), args.cache_dir)
    queries, labels, confidence = ctx.queries(128)
    confident = confidence >= 0.8
    halves = digits_halves(len(queries))
    train_inputs, query_inputs = {"images": ctx.images}, {"images": queries}
    scores = compute_all_scores(ctx.reference, train_inputs, query_inputs, args, batch=256)
    masks = ctx.lds_masks(32)
    if args.cache_dir_given and not args.train_missing:
        if args.available_subsets:  # the longest prefix of the 32 subsets whose retrains are in the cache
            have = [model_path(ctx, mask).exists() for mask in masks] + [False]
            masks = masks[: have.index(False)]
            log(f"LDS over the {len(masks)} retrains available in {args.cache_dir}")
            if len(masks) < 4:
                raise SystemExit(f"only {len(masks)} LDS retrains in {args.cache_dir}; wait for more")
        else:
            wait_for_models(ctx, masks)
    actual = ctx.subset_losses(masks, queries)
    rows = {}
    for (seed, variant, transform), s in scores.items():
        rows.setdefault(variant, {}).setdefault(transform, {})[seed] = evaluate_digits(
            s, ctx, labels, confident, masks, actual, halves
        )
    from .baselines import pixel_cosine_scores, ssim_scores

    baselines = {
        "pixel cosine": evaluate_digits(
            pixel_cosine_scores(queries, ctx.images), ctx, labels, confident, masks, actual, halves
        ),
        "SSIM": evaluate_digits(ssim_scores(queries, ctx.images), ctx, labels, confident, masks, actual, halves),
    }
    return {
        "model": "digits",
        "recipe": ctx.recipe.to_dict(),
        "num_queries": len(queries),
        "num_confident": {h: int(confident[r].sum()) for h, r in halves.items()},
        "num_subsets": len(masks),
        "metrics": ("lds", "det10"),
        "select_metric": "lds",
        "rows": rows,
        "baselines": baselines,
        "seconds_per_sample": TIMES,
    }


# ---------------------------------------------------------------------------------------------- tiny SD


def sd_halves(labels: list[str]) -> dict[str, np.ndarray]:
    a, b = [], []
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):
        (a if seen.get(label, 0) % 2 == 0 else b).append(i)
        seen[label] = seen.get(label, 0) + 1
    return {"A": np.asarray(a), "B": np.asarray(b)}


def run_sd(args) -> dict:
    from .data import SUBSETS, build_mixed_set
    from .detection import select_queries
    from .models import load_sd_pipeline
    from .train_sd_mixed import DEFAULT_DIR

    pipe = load_sd_pipeline(DEFAULT_DIR)
    mixed = build_mixed_set()
    train_rows = mixed.rows("train")
    train_labels = np.asarray(mixed.subsets)[train_rows]
    prompts, labels = select_queries(mixed, 36)
    generators = [torch.Generator().manual_seed(args.seed + 500 + i) for i in range(len(prompts))]
    latents = []
    for start in range(0, len(prompts), 16):
        out = pipe(
            prompts[start : start + 16],
            generator=generators[start : start + 16],
            num_inference_steps=25,
            guidance_scale=3.0,
            output_type="latent",
        )
        latents.append(out.images)
    latents = torch.cat(latents)
    halves = sd_halves(labels)
    train_inputs = {"images": mixed.pixels(train_rows), "prompts": [mixed.captions[i] for i in train_rows]}
    query_inputs = {"latents": latents, "prompts": prompts}
    scores = compute_all_scores(pipe, train_inputs, query_inputs, args, batch=64)
    labels_arr = np.asarray(labels)

    def evaluate(s):
        rankings = top_k(s, 10)
        out = {}
        for half, rows in halves.items():
            det = detection_table(rankings[rows], train_labels, labels_arr[rows], (10,), SUBSETS)
            out[half] = {"det10": det["k=10"]["mean"]}
        return out

    rows = {}
    for (seed, variant, transform), s in scores.items():
        rows.setdefault(variant, {}).setdefault(transform, {})[seed] = evaluate(s)
    from .baselines import pixel_cosine_scores, ssim_scores
    from .detection import decode

    images = decode(pipe, latents)
    train_pixels = train_inputs["images"]
    baselines = {
        "pixel cosine": evaluate(pixel_cosine_scores(images, train_pixels)),
        "SSIM": evaluate(ssim_scores(images, train_pixels)),
    }
    return {
        "model": "sd",
        "num_train": len(train_rows),
        "num_queries": {h: len(r) for h, r in halves.items()},
        "metrics": ("det10",),
        "select_metric": "det10",
        "rows": rows,
        "baselines": baselines,
        "seconds_per_sample": TIMES,
    }


# ---------------------------------------------------------------------------------------------- shared driver

TIMES: dict[str, float] = {}


def compute_all_scores(pipe, train_inputs, query_inputs, args, batch: int) -> dict:
    """`{(seed, variant, transform): (Q, N) scores}`; each pass's scores are kept in `--score-cache` (npz) so an
    interrupted or extended run does not sketch again."""
    scores = {}
    plan = [(seed, kind) for seed in args.seeds for kind in args.passes if kind != "draws"]
    plan += [(seed, "draws") for seed in args.draw_seeds if "draws" in args.passes]  # the costly pass last
    for seed, kind in plan:
        if True:
            cached = None
            if args.score_cache is not None:
                args.score_cache.mkdir(parents=True, exist_ok=True)
                cached = args.score_cache / f"{args.model}-seed{seed}-{kind}.npz"
                if cached.exists():
                    with np.load(cached, allow_pickle=False) as data:
                        for key in data.files:
                            variant, transform = key.split("||")
                            scores[(seed, variant, transform)] = data[key]
                    TIMES.update(json.loads(cached.with_suffix(".json").read_text()))
                    log(f"seed {seed}, pass {kind}: scores from {cached}")
                    continue
            found_pass = {}
            config = DMinConfig(**{"sketch_dim": K, "seed": seed, **PASSES[kind]})
            sketcher = GradientSketcher.from_pipeline(pipe, config)
            sketcher.set_progress_bar_config(disable=True)
            start = time.perf_counter()
            train = sketch_all(sketcher, train_inputs, batch)
            n = len(train)
            TIMES[f"{kind} (seed {seed})"] = (time.perf_counter() - start) / n
            query = sketch_all(sketcher, query_inputs, batch)
            log(f"seed {seed}, pass {kind}: {n} rows in {TIMES[f'{kind} (seed {seed})'] * n:.0f}s")
            train_v, query_v = variants_of_pass(kind, train), variants_of_pass(kind, query)
            del train, query
            for name in list(train_v):
                transforms = name in TRANSFORM_VARIANTS and seed in args.transform_seeds
                found = transformed_scores(train_v[name], query_v[name], transforms=transforms)
                for transform, s in found.items():
                    scores[(seed, name, transform)] = s
                    found_pass[f"{name}||{transform}"] = s
                del train_v[name], query_v[name]
            if cached is not None:
                np.savez(cached, **found_pass)
                key = f"{kind} (seed {seed})"
                cached.with_suffix(".json").write_text(json.dumps({key: TIMES[key]}))
    return scores


def aggregate(result: dict) -> dict:
    """Per (variant, transform): mean/sd over seeds of each metric on halves A and B; the damping chosen on A."""
    table = {}
    for variant, transforms in result["rows"].items():
        for transform, per_seed in transforms.items():
            entry = {}
            for half in ("A", "B"):
                for metric in result["metrics"]:
                    values = [per_seed[s][half][metric] for s in per_seed]
                    entry[f"{metric}_{half}"] = summary(values)
            table[(variant, transform)] = entry
    chosen = {}
    select = result["select_metric"]
    for variant, transforms in result["rows"].items():
        for prefix in ("preconditioned", "centred + preconditioned"):
            cands = [t for t in transforms if t.startswith(prefix + " a=")]
            if cands:
                best = max(cands, key=lambda t: table[(variant, t)][f"{select}_A"]["mean"])
                chosen[(variant, prefix)] = best
    return {"table": table, "chosen": chosen}


def markdown(result: dict, command: str) -> str:
    agg = aggregate(result)
    table, chosen = agg["table"], agg["chosen"]
    metrics = result["metrics"]
    names = {"lds": "LDS", "det10": "det@10"}
    header = ["variant", "query transform"]
    for metric in metrics:
        header += [f"{names[metric]} A (selection)", f"{names[metric]} B (held out)", f"Δ{names[metric]} B vs default"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    base = table[("default: DMinConfig()", "plain")]

    def fmt(s):
        return f"{s['mean']:.3f} ± {s['std']:.3f}" if s["n"] > 1 and s["std"] is not None else f"{s['mean']:.3f}"

    for (variant, transform), entry in table.items():
        if transform.startswith(("preconditioned", "centred + preconditioned")) and transform not in chosen.values():
            continue
        if transform.startswith(("preconditioned", "centred + preconditioned")):
            prefix = transform.rsplit(" a=", 1)[0]
            if chosen.get((variant, prefix)) != transform:
                continue
            transform = f"{transform} (a chosen on A)"
        cells = [variant, transform]
        for metric in metrics:
            cells += [fmt(entry[f"{metric}_A"]), fmt(entry[f"{metric}_B"])]
            cells.append(f"{entry[f'{metric}_B']['mean'] - base[f'{metric}_B']['mean']:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    for name, entry in result["baselines"].items():
        cells = [f"baseline: {name}", "-"]
        for metric in metrics:
            cells += [f"{entry['A'][metric]:.3f}", f"{entry['B'][metric]:.3f}"]
            cells.append(f"{entry['B'][metric] - base[f'{metric}_B']['mean']:+.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({s for t in result["rows"].values() for p in t.values() for s in p})
    grid = "\n\nDamping grid (all A-half values, mean over seeds):\n\n"
    for (variant, prefix), best in chosen.items():
        values = ", ".join(
            f"a={t.rsplit('=', 1)[1]}: {table[(variant, t)][result['select_metric'] + '_A']['mean']:.3f}"
            for t in result["rows"][variant]
            if t.startswith(prefix + " a=")
        )
        grid += f"- {variant}, {prefix}: {values}\n"
    costs = "\n\nSketching cost (s per training sample, this run, busy shared 2-core machine):\n\n" + "\n".join(
        f"- {k}: {v * 1000:.1f} ms" for k, v in result["seconds_per_sample"].items()
    )
    return (
        (
            f"Digits DDPM: LDS over {result['num_subsets']} random-half retrains; det@10 on the SVM-confident queries "
            f"({result['num_confident']} per half) of {result['num_queries']}.\n\n"
            if result["model"] == "digits"
            else f"Tiny SD: det@10 over {result['num_queries']} generated queries per half, {result['num_train']} training "
            "samples.\n\n"
        )
        + f"Model: {result['model']}; sketch seeds {seeds} (mean ± sd over seeds where more than one). Halves: A selects "
        "(damping, defaults), B is held out.\n\n"
        f"Command: `{command}`\n\n" + "\n".join(lines) + grid + costs + "\n"
    )


def combined_table(digits: dict, sd: dict) -> str:
    """One markdown table over both models' results: held-out half B (half A in brackets), mean ± sd over seeds."""

    def cell(result, key, metric):
        entry = result["summary"].get(key)
        if entry is None:
            return "not run"
        b, a = entry[f"{metric}_B"], entry[f"{metric}_A"]
        spread = f" ± {b['std']:.3f}" if b["n"] > 1 and b["std"] is not None else ""
        return f"{b['mean']:.3f}{spread} ({a['mean']:.3f})"

    keys = list(dict.fromkeys([*digits["summary"], *sd["summary"]]))
    lines = [
        "| variant | query transform | digits LDS | digits det@10 | tiny-SD det@10 |",
        "|---|---|---|---|---|",
    ]
    for key in keys:
        variant, transform = key.split(" | ")
        if " a=" in transform:
            prefix = transform.rsplit(" a=", 1)[0]
            picks = {
                name: result.get("chosen_damping", {}).get(f"{variant} | {prefix}")
                for name, result in (("digits", digits), ("sd", sd))
            }
            if transform not in picks.values():
                continue
            transform += " (chosen on A for " + " and ".join(n for n, t in picks.items() if t == transform) + ")"
        lines.append(
            f"| {variant} | {transform} | {cell(digits, key, 'lds')} | {cell(digits, key, 'det10')} | "
            f"{cell(sd, key, 'det10')} |"
        )
    for name in ("pixel cosine", "SSIM"):
        d, s_ = digits["baselines"][name], sd["baselines"][name]
        lines.append(
            f"| baseline: {name} | - | {d['B']['lds']:.3f} ({d['A']['lds']:.3f}) | {d['B']['det10']:.3f} "
            f"({d['A']['det10']:.3f}) | {s_['B']['det10']:.3f} ({s_['A']['det10']:.3f}) |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--model", choices=("digits", "sd"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--draw-seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--transform-seeds", type=int, nargs="+", default=[0], help="seeds whose scores are also preconditioned"
    )
    parser.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
    parser.add_argument("--train-missing", action="store_true", help="train missing LDS models instead of waiting")
    parser.add_argument("--tag", default="")
    parser.add_argument("--score-cache", type=Path, default=None, help="keep each pass's scores here (npz)")
    parser.add_argument(
        "--available-subsets", action="store_true", help="digits: LDS over the retrains already cached (a prefix)"
    )
    parser.add_argument("--summarize", action="store_true", help="only print the table over both models' results")
    args = parser.parse_args(argv)
    from .digits_context import default_cache_dir

    args.cache_dir_given = args.cache_dir is not None  # only a named cache is one another run may be filling
    args.cache_dir = args.cache_dir if args.cache_dir is not None else default_cache_dir()
    if args.summarize:
        digits = json.loads((RESULTS / "ablations_estimator_digits.json").read_text())
        sd = json.loads((RESULTS / "ablations_estimator_sd.json").read_text())
        print(combined_table(digits, sd))
        return {}
    set_threads(args.threads)
    result = run_digits(args) if args.model == "digits" else run_sd(args)
    result["command"] = command_line()
    name = f"ablations_estimator_{args.model}{args.tag}"
    agg = aggregate(result)
    result["summary"] = {f"{v} | {t}": e for (v, t), e in agg["table"].items()}
    result["chosen_damping"] = {f"{v} | {p}": t for (v, p), t in agg["chosen"].items()}
    write_json(name, result)
    write_markdown(name, markdown(result, result["command"]))
    return result


if __name__ == "__main__":
    main()
