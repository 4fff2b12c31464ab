"""Issue 12, part 4: every attribution method on the digits DDPM: LDS and counterfactual removal.

- **LDS** over the 32 random-half retrains of `DigitsContext.lds_masks(32)` (the full recipe, the same models as the
  ablations' LDS; cached in `--cache-dir`), 64 generated digits (seed 1000, as the ablations draw them). The digits
  have no validation split (all 1,797 train the model), so only generated queries are scored. Queries at even
  positions choose each method's damping; the odd ones are reported.
- **Counterfactual removal** (`counterfactual.py`'s protocol): for Q generated digits (seed 2000 + training seed),
  remove each method's top 5% (90) training digits, retrain from the same initialisation and seed, and measure the
  change of the digit's loss at the fixed probe noise; G queries share one retrain (their union removed). Each
  method's damping is the one its LDS tuning half chose.
- Journey-TRAK uses the DDIM trajectory of each generated digit, re-run step by step (`ddim_trajectory`, checked to
  reproduce `generate_ddpm`'s samples).

Usage:
    python -m benchmarks.quality.digits_methods --threads 1
    python -m benchmarks.quality.digits_methods --quick --threads 1   # 400-step recipe, 8 subsets, 32 queries,
        # removal test on 4 digits (one retrain per method), and only the methods of QUICK_METHODS (Journey-TRAK,
        # LiSSA and DataInf cost 10-25 minutes each on the digits; name them with --methods to include them)

Retrained models and method scores are cached in `--cache-dir` (default: `digits_context.default_cache_dir()`,
`~/.cache/diffusers_dmin/benchmarks/digits`), so a rerun reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .attribution import NOT_AVAILABLE, AttributionTask, Method, MethodResult, parse_dmin_configs, registry
from .common import (
    base_parser,
    command_line,
    log,
    markdown_table,
    mode_name,
    pyplot,
    save_plot,
    set_threads,
    write_json,
    write_markdown,
)
from .digits_context import DigitsContext, default_cache_dir, recipe_for
from .metrics import lds, subset_predictions, summary, top_k


SCORE_CACHE_FORMAT = "dmin-q12-method-scores/1"
QUICK_METHODS = ("DMin (default)", "TRAK", "D-TRAK", "pixel cosine", "SSIM", "random")


@torch.no_grad()
def ddim_trajectory(pipe, num: int, seed: int, steps: int = 25, keep: int = 10):
    """`generate_ddpm`'s samples, re-run step by step: images `(num, 1, s, s)`, denoiser inputs at `keep` evenly
    spaced steps `(num, keep, 1, s, s)` and their timesteps."""
    from diffusers.utils.torch_utils import randn_tensor

    unet, scheduler = pipe.unet, pipe.scheduler
    size = unet.config.sample_size
    generator = torch.Generator().manual_seed(seed)
    image = randn_tensor((num, unet.config.in_channels, size, size), generator=generator, dtype=unet.dtype)
    scheduler.set_timesteps(steps)
    inputs = []
    for t in scheduler.timesteps:
        inputs.append(image.clone())
        output = unet(image, t).sample
        image = scheduler.step(output, t, image, eta=0.0, generator=generator).prev_sample
    chosen = np.linspace(0, steps - 1, keep).round().astype(int)
    images = (image / 2 + 0.5).clamp(0, 1)
    return images, torch.stack([inputs[i] for i in chosen], 1), [int(scheduler.timesteps[i]) for i in chosen]


def _method_file(cache_dir: Path, method: Method) -> Path:
    """One method's cached result: `<cache_dir>/<slug>-<hash of name and kwargs>.{npz,json}` (stem returned)."""
    ident = json.dumps({"name": method.name, "kwargs": method.kwargs}, sort_keys=True, default=str)
    slug = re.sub(r"[^A-Za-z0-9]+", "_", method.name).strip("_").lower() or "method"
    return cache_dir / f"{slug}-{hashlib.sha256(ident.encode()).hexdigest()[:12]}"


def save_method_result(stem: Path, name: str, result: MethodResult, wall: float) -> None:
    """The scores as plain arrays (`np.savez`, no pickle) and the rest as a JSON sidecar, each written atomically;
    the JSON is written last, so a reader that finds it finds the whole result."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    labels = list(result.scores)
    arrays = {f"s{i}": np.asarray(result.scores[label], dtype=np.float64) for i, label in enumerate(labels)}
    meta = {
        "format": SCORE_CACHE_FORMAT,
        "name": name,
        "labels": labels,
        "train_seconds": float(result.train_seconds),
        "query_seconds": float(result.query_seconds),
        "bytes_per_sample": float(result.bytes_per_sample),
        "notes": str(result.notes),
        "wall_seconds": float(wall),
    }
    for suffix, write in (
        (".npz", lambda f: np.savez(f, **arrays)),
        (".json", lambda f: f.write(json.dumps(meta, indent=1).encode())),
    ):
        fd, tmp = tempfile.mkstemp(prefix=f".{stem.name}.", suffix=".tmp", dir=stem.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, stem.with_suffix(suffix))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def load_method_result(stem: Path, name: str, shape: tuple[int, int]) -> tuple[MethodResult, float] | None:
    """A result saved by `save_method_result`, read as untrusted data: JSON and `np.load(allow_pickle=False)` only,
    every field type-checked and every score array of `shape` and finite dtype; None when absent or invalid."""
    meta_path, npz_path = stem.with_suffix(".json"), stem.with_suffix(".npz")
    if not (meta_path.is_file() and npz_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        labels = meta["labels"]
        numbers = [meta[k] for k in ("train_seconds", "query_seconds", "bytes_per_sample", "wall_seconds")]
        ok = (
            meta.get("format") == SCORE_CACHE_FORMAT
            and meta.get("name") == name
            and isinstance(labels, list)
            and labels
            and all(isinstance(label, str) for label in labels)
            and len(set(labels)) == len(labels)
            and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers)
            and isinstance(meta.get("notes"), str)
        )
        if not ok:
            raise ValueError("unexpected metadata")
        scores = {}
        with np.load(npz_path, allow_pickle=False) as data:
            if sorted(data.files) != sorted(f"s{i}" for i in range(len(labels))):
                raise ValueError("arrays do not match the labels")
            for i, label in enumerate(labels):
                array = data[f"s{i}"]
                if array.dtype != np.float64 or array.shape != tuple(shape):
                    raise ValueError(f"array {label!r} is {array.dtype} {array.shape}, expected float64 {shape}")
                scores[label] = array
    except (OSError, ValueError, KeyError, TypeError) as error:  # json.JSONDecodeError is a ValueError
        log(f"ignoring the cached result {stem} of {name}: {error}")
        return None
    train_s, query_s, bytes_per_sample, wall = (float(x) for x in numbers)
    return MethodResult(scores, train_s, query_s, bytes_per_sample, meta["notes"]), wall


def method_scores(
    ctx: DigitsContext, queries, trajectories, traj_t, seed: int, only=None, cache_dir=None, dmin_configs=None
) -> dict:
    """name -> (MethodResult, wall seconds); each kept in `cache_dir` (`save_method_result`) so later runs reuse it."""
    out = {}
    for method in registry(dmin_configs):
        if only and method.name not in only:
            continue
        stem = _method_file(cache_dir, method) if cache_dir is not None else None
        if stem is not None:
            cached = load_method_result(stem, method.name, (len(queries), ctx.num_train))
            if cached is not None:
                out[method.name] = cached
                log(f"{method.name}: cached in {stem}")
                continue
        task = AttributionTask(
            pipe=ctx.reference,
            train_images=ctx.images,
            train_prompts=None,
            query_images=queries,
            query_prompts=None,
            trajectories=trajectories,
            trajectory_timesteps=traj_t,
            seed=seed,
        )
        start = time.perf_counter()
        result = method.fn(task, **method.kwargs)
        out[method.name] = (result, time.perf_counter() - start)
        log(f"{method.name}: {time.perf_counter() - start:.1f} s")
        if stem is not None:
            save_method_result(stem, method.name, result, out[method.name][1])
    return out


def cached_masks(ctx: DigitsContext, masks: np.ndarray) -> np.ndarray:
    """Which masks' retrained models are already in the context's cache."""
    if ctx.cache_dir is None:
        return np.zeros(len(masks), dtype=bool)
    return np.asarray([(ctx.cache_dir / f"ddpm-{ctx._key(np.flatnonzero(mask == 0))}.pt").exists() for mask in masks])


def run(
    quick,
    seed,
    cache_dir,
    num_queries,
    cf_queries,
    cf_group,
    only=None,
    available_only=False,
    cf_methods=None,
    dmin_configs=None,
    cf_choice_subsets=None,
    scores_only=False,
):
    start_all = time.perf_counter()
    ctx = DigitsContext(recipe_for(quick, seed), cache_dir)
    num_subsets = 8 if quick else 32
    num_queries = num_queries or (32 if quick else 64)
    if quick and only is None:
        only = list(QUICK_METHODS) + [name for name in (dmin_configs or {}) if name != "DMin (default)"]
    n = ctx.num_train

    # ---- queries: the LDS digits (seed 1000, as the ablations) and the counterfactual digits (seed 2000 + seed)
    queries, labels, _ = ctx.queries(num_queries)
    images, trajectories, traj_t = ddim_trajectory(ctx.reference, num_queries, 1000)
    mismatch = float((images - queries).abs().max())
    if mismatch > 1e-4:
        raise RuntimeError(f"ddim_trajectory does not reproduce generate_ddpm (max |diff| {mismatch:.2e}).")
    if cf_queries:
        cf_q, _, _ = ctx.queries(cf_queries, seed=2000 + seed)
        _, cf_traj, _ = ddim_trajectory(ctx.reference, cf_queries, 2000 + seed)
        all_q, all_traj = torch.cat([queries, cf_q]), torch.cat([trajectories, cf_traj])
    else:
        all_q, all_traj = queries, trajectories
    scores_dir = None
    if cache_dir is not None:
        scores_dir = cache_dir / f"q12-scores-{ctx._key(np.zeros(0))}-{num_queries}-{cf_queries}"
    scored = method_scores(ctx, all_q, all_traj, traj_t, seed, only, scores_dir, dmin_configs)
    if scores_only:
        return None

    # ---- LDS (over the subsets whose retrained models exist, with --available-only)
    masks = ctx.lds_masks(num_subsets)
    used = cached_masks(ctx, masks) if available_only else np.ones(len(masks), dtype=bool)
    masks = masks[used]
    start = time.perf_counter()
    actual = ctx.subset_losses(masks, queries) if len(masks) else np.zeros((num_queries, 0))
    gt_seconds = time.perf_counter() - start
    tune = np.arange(num_queries) % 2 == 0
    rows = {}
    chosen_label = {}
    for name, (result, wall) in scored.items():
        per_hp = {}
        for label, scores in result.scores.items():
            per_hp[label] = (
                lds(subset_predictions(scores[:num_queries], masks), actual)
                if len(masks) > 2
                else np.full(num_queries, np.nan)
            )
        chosen = max(per_hp, key=lambda k: np.nan_to_num(np.nanmean(per_hp[k][tune]), nan=-1.0))
        chosen_label[name] = chosen
        rows[name] = {
            "chosen": chosen,
            "tune_lds": {k: float(np.nanmean(v[tune])) for k, v in per_hp.items()},
            "lds": summary(per_hp[chosen][~tune]),
            "lds_per_query": per_hp[chosen][~tune],
            "train_seconds_per_sample": result.train_seconds / n,
            "query_seconds_per_query": result.query_seconds / len(all_q),
            "bytes_per_sample": result.bytes_per_sample,
            "wall_seconds": wall,
            "notes": result.notes,
        }
        log(f"LDS {name}: {rows[name]['lds']['mean']} ({chosen})")
    cf_chosen = dict(chosen_label)
    if cf_choice_subsets and len(masks) > cf_choice_subsets:
        # the removal test's damping from the tuning queries over the first subsets only (what existed when its
        # retrains were made); still never from the reported queries
        first = masks[:cf_choice_subsets]
        for name, (result, _) in scored.items():
            tune_lds = {
                label: np.nanmean(
                    lds(subset_predictions(sc[:num_queries], first), actual[:, :cf_choice_subsets])[tune]
                )
                for label, sc in result.scores.items()
            }
            cf_chosen[name] = max(tune_lds, key=lambda k: np.nan_to_num(tune_lds[k], nan=-1.0))

    # ---- counterfactual removal
    counterfactual = {}
    if cf_queries:
        base_loss = ctx.query_losses(ctx.reference, cf_q)
        k = int(round(0.05 * n))
        groups = [list(range(g, cf_queries, cf_queries // cf_group)) for g in range(cf_queries // cf_group)]
        for name, (result, _) in scored.items():
            if cf_methods is not None and name not in cf_methods:
                continue
            scores = result.scores[cf_chosen[name]][num_queries:]
            removed_sets = top_k(scores, k)
            delta = np.full(cf_queries, np.nan)
            for members in groups:
                removed = np.unique(np.concatenate([removed_sets[q] for q in members]))
                pipe = ctx.model(removed)
                delta[members] = ctx.query_losses(pipe, cf_q[members]) - base_loss[members]
            counterfactual[name] = {
                "chosen": cf_chosen[name],
                "delta_loss": summary(delta),
                "per_query": delta,
                "share_positive": float((delta > 0).mean()),
            }
            log(f"counterfactual {name}: {np.mean(delta):+.5f}")
        counterfactual["_protocol"] = {
            "queries": cf_queries,
            "group": cf_group,
            "k": k,
            "base_loss": base_loss,
            "damping_chosen_on_subsets": min(cf_choice_subsets or len(masks), int(len(masks))),
        }
    return {
        "recipe": ctx.recipe.to_dict(),
        "num_subsets": int(len(masks)),
        "subsets_of": num_subsets,
        "num_queries": num_queries,
        "reported_queries": int((~tune).sum()),
        "ground_truth_seconds": gt_seconds,
        "methods": rows,
        "counterfactual": counterfactual,
        "training_stats": dict(ctx.stats),
        "not_available": NOT_AVAILABLE,
        "not_run": [m.name for m in registry(dmin_configs) if m.name not in scored],
        "seconds": time.perf_counter() - start_all,
    }


def markdown(result: dict, command: str) -> str:
    cf = result["counterfactual"]
    header = ["method", "LDS (generated)", "chosen", "counterfactual Δloss (mean ± std)", "Δ>0 share"]
    header += ["train s/sample", "query s/query", "bytes/sample"]
    rows = []
    for name, r in result["methods"].items():
        c = cf.get(name)
        rows.append(
            [
                name,
                f"{r['lds']['mean']:.3f} ± {r['lds']['sem']:.3f}" if r["lds"]["mean"] is not None else "-",
                r["chosen"],
                f"{c['delta_loss']['mean']:+.5f} ± {c['delta_loss']['std']:.5f}" if c else "-",
                c["share_positive"] if c else None,
                f"{r['train_seconds_per_sample']:.4f}",
                f"{r['query_seconds_per_query']:.4f}",
                f"{r['bytes_per_sample']:,.0f}",
            ]
        )
    for name, why in result["not_available"].items():
        rows.append([name, "n/a", why, "-", None, "-", "-", "-"])
    p = cf.get("_protocol")
    cf_text = (
        f" Counterfactual: {p['queries']} generated digits, top {p['k']} removed, {p['group']} queries per retrain "
        f"(their union removed), damping chosen on the LDS tuning queries over the first "
        f"{p.get('damping_chosen_on_subsets', '?')} subsets."
        if p
        else ""
    )
    return (
        f"Digits DDPM ({result['recipe']['steps']} steps): LDS over {result['num_subsets']} random-half retrains "
        + (
            f"(all of `lds_masks({result['subsets_of']})`), "
            if result["num_subsets"] == result["subsets_of"]
            else f"(those of `lds_masks({result['subsets_of']})` whose retrained models were cached), "
        )
        + f"{result['num_queries']} generated digits, damping chosen on the even half, reported on the other "
        f"{result['reported_queries']} (mean ± sem).{cf_text} Total {result['seconds']:.0f} s."
        + (f" Not run here: {', '.join(result['not_run'])}." if result.get("not_run") else "")
        + f"\n\nCommand: `{command}`\n\n"
        + markdown_table(header, rows)
    )


def plot(result: dict, name: str) -> None:
    plt = pyplot()
    names = list(result["methods"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    means = [result["methods"][m]["lds"]["mean"] or 0 for m in names]
    sems = [result["methods"][m]["lds"]["sem"] or 0 for m in names]
    axes[0].bar(range(len(names)), means, yerr=sems)
    axes[0].set_title("Digits DDPM: LDS")
    cf = result["counterfactual"]
    axes[1].bar(range(len(names)), [cf.get(m, {}).get("delta_loss", {}).get("mean") or 0 for m in names])
    axes[1].set_title("Counterfactual Δloss (top 5% removed)")
    for ax in axes:
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=25, fontsize=7)
    save_plot(fig, name)


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--num-queries", type=int, default=None)
    parser.add_argument("--cf-queries", type=int, default=None, help="removal-test digits (default 10; quick 4)")
    parser.add_argument("--cf-group", type=int, default=None, help="digits per removal retrain (default 5; quick 4)")
    parser.add_argument("--methods", nargs="*", default=None)
    parser.add_argument(
        "--dmin-configs", default=None, help='extra DMin rows, JSON: {"row name": {DMinConfig kwargs}, ...}'
    )
    parser.add_argument(
        "--cf-methods", nargs="*", default=None, help="methods of the removal test (default: all; none: skip it)"
    )
    parser.add_argument(
        "--available-only", action="store_true", help="LDS over the subsets whose retrains are already cached"
    )
    parser.add_argument(
        "--cf-choice-subsets", type=int, default=None, help="choose the removal test's damping on the first M subsets"
    )
    parser.add_argument(
        "--extra",
        action="store_true",
        help="a supplementary run (e.g. removal-test rows for some methods): results go to "
        "methods_digits_extra_<mode>_seed<seed>, which methods_report adds to the main run's table, marked",
    )
    parser.add_argument(
        "--scores-only",
        action="store_true",
        help="compute and cache every method's scores in --cache-dir, then stop (no retrains, no result files)",
    )
    parser.set_defaults(cache_dir=default_cache_dir())
    args = parser.parse_args(argv)
    args.cf_queries = args.cf_queries if args.cf_queries is not None else (4 if args.quick else 10)
    args.cf_group = args.cf_group if args.cf_group is not None else (4 if args.quick else 5)
    set_threads(args.threads)
    result = run(
        args.quick,
        args.seed,
        args.cache_dir,
        args.num_queries,
        args.cf_queries,
        args.cf_group,
        args.methods,
        args.available_only,
        args.cf_methods,
        parse_dmin_configs(args.dmin_configs),
        args.cf_choice_subsets,
        args.scores_only,
    )
    if result is None:
        return {}
    result["command"] = command_line()
    name = f"methods_digits_{'extra_' if args.extra else ''}{mode_name(args.quick)}_seed{args.seed}"
    write_json(name, result)
    write_markdown(name, markdown(result, result["command"]))
    plot(result, name)
    return result


if __name__ == "__main__":
    main()
