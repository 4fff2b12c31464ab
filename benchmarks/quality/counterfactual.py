"""Item 4: counterfactual removal on the digits DDPM (the paper's MNIST experiment, smaller), plus LDS.

For each training seed: train the reference DDPM on all 1,797 digits, generate Q digits, and for each generated
digit q and each method, remove the method's top-k training digits (k = 5% of the set), retrain from the same
initialisation and seed (`models.train_ddpm`: identical random stream, removed rows weighted 0), and measure the
change of q's diffusion loss at fixed noise and timesteps (`digits_context.LOSS_CONFIG`). Methods: DMin with our
defaults, DMin with the official code's DDPM choices (full mode), pixel cosine, SSIM, and k random digits.

Grouping (`--group`): one retrain may remove the top-k sets of G queries at once (their union) and measure each of
them; random removals are grouped the same way, so every method removes the same number of digits per retrain.
The quick mode groups G=2 queries (half the retrains); the full mode does not group (G=1).

Usage:
    python -m benchmarks.quality.counterfactual --quick --threads 1       # 1 seed, 10 queries, G=2
    python -m benchmarks.quality.counterfactual --threads 1               # 3 seeds, 10 queries, G=1
"""

from __future__ import annotations

import time

import numpy as np

from diffusers_dmin import DMinConfig

from .ablations import BASE, OFFICIAL_DDPM
from .baselines import pixel_cosine_scores, random_scores, ssim_scores
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
from .digits_context import DigitsContext, recipe_for
from .metrics import lds, subset_predictions, summary, top_k


OFFICIAL = {**BASE, **OFFICIAL_DDPM}


UNIFORM = {**BASE, "timestep_spacing": "uniform"}


def method_scores(ctx: DigitsContext, queries, include_official: bool, seed: int) -> dict[str, np.ndarray]:
    scores = {"DMin (defaults)": ctx.dmin_scores(DMinConfig(**BASE), queries)["scores"]}
    if include_official:
        scores["DMin (timesteps=uniform)"] = ctx.dmin_scores(DMinConfig(**UNIFORM), queries)["scores"]
        scores["DMin (official DDPM choices)"] = ctx.dmin_scores(DMinConfig(**OFFICIAL), queries)["scores"]
    scores["pixel cosine"] = pixel_cosine_scores(queries, ctx.images)
    scores["SSIM"] = ssim_scores(queries, ctx.images)
    scores["random"] = random_scores(len(queries), ctx.num_train, seed=10_000 + seed)
    return scores


def run_seed(ctx: DigitsContext, num_queries: int, group: int, fraction: float, include_official: bool, seed: int):
    queries, labels, confidence = ctx.queries(num_queries, seed=2000 + seed)
    base_loss = ctx.query_losses(ctx.reference, queries)
    k = int(round(fraction * ctx.num_train))
    scores = method_scores(ctx, queries, include_official, seed)
    # groups: query i with i + Q/G, ... (generated digits are independent draws)
    groups = [list(range(g, num_queries, num_queries // group)) for g in range(num_queries // group)]
    out = {}
    for method, matrix in scores.items():
        removed_sets = top_k(matrix, k)
        delta = np.full(num_queries, np.nan)
        for members in groups:
            removed = np.unique(np.concatenate([removed_sets[q] for q in members]))
            pipe = ctx.model(removed)
            losses = ctx.query_losses(pipe, queries[members])
            delta[members] = losses - base_loss[members]
        out[method] = {
            "delta_loss": delta,
            "relative_delta": delta / base_loss,
            "mean_delta": float(delta.mean()),
            "removed_share_same_class": float(
                np.mean([(ctx.labels[removed_sets[q]] == labels[q]).mean() for q in range(num_queries)])
            ),
        }
        log(f"seed {seed} {method}: mean Δloss {delta.mean():+.5f} (base loss {base_loss.mean():.4f})")
    return {
        "base_loss": base_loss,
        "query_labels": labels,
        "query_confidence": confidence,
        "k": k,
        "groups": groups,
        "methods": out,
        "scores": scores,
        "queries": queries,
    }


def run(
    quick: bool,
    seeds=None,
    num_queries: int = 10,
    group: int | None = None,
    fraction: float = 0.05,
    contexts: dict | None = None,
    lds_subsets: int | None = None,
) -> dict:
    seeds = seeds if seeds is not None else ([0] if quick else [0, 1, 2])
    group = group or (2 if quick else 1)
    lds_subsets = lds_subsets if lds_subsets is not None else (0 if quick else 24)  # 8 quick subsets: noise only
    include_official = not quick
    per_seed = {}
    lds_rows: dict[str, list] = {}
    start = time.perf_counter()
    for seed in seeds:
        ctx = (contexts or {}).get(seed) or DigitsContext(recipe_for(quick, seed))
        result = run_seed(ctx, num_queries, group, fraction, include_official, seed)
        if lds_subsets and seed == seeds[0]:
            masks = ctx.lds_masks(lds_subsets)
            actual = ctx.subset_losses(masks, result["queries"])
            for method, matrix in result["scores"].items():
                lds_rows[method] = lds(subset_predictions(matrix, masks), actual).tolist()
        result.pop("scores")
        result.pop("queries")
        result["training_stats"] = dict(ctx.stats)
        per_seed[str(seed)] = result
    methods = list(next(iter(per_seed.values()))["methods"])
    aggregate = {}
    for method in methods:
        deltas = np.concatenate([per_seed[s]["methods"][method]["delta_loss"] for s in per_seed])
        seed_means = [per_seed[s]["methods"][method]["mean_delta"] for s in per_seed]
        rel = np.concatenate([per_seed[s]["methods"][method]["relative_delta"] for s in per_seed])
        aggregate[method] = {
            "delta_loss": summary(deltas),
            "relative_delta": summary(rel),
            "seed_means": summary(seed_means),
            "share_positive": float((deltas > 0).mean()),
            "removed_share_same_class": float(
                np.mean([per_seed[s]["methods"][method]["removed_share_same_class"] for s in per_seed])
            ),
            "lds": summary(lds_rows[method]) if method in lds_rows else None,
        }
    random_mean = aggregate["random"]["delta_loss"]["mean"]
    for method in methods:
        mean = aggregate[method]["delta_loss"]["mean"]
        aggregate[method]["ratio_to_random"] = mean / random_mean if random_mean else None
        aggregate[method]["excess_over_random"] = mean - random_mean
    return {
        "recipe": recipe_for(quick, seeds[0]).to_dict(),
        "seeds": seeds,
        "num_queries": num_queries,
        "group_size": group,
        "removed_fraction": fraction,
        "lds_subsets": lds_subsets,
        "dmin_config": DMinConfig(**BASE).to_dict(),
        "official_config": DMinConfig(**OFFICIAL).to_dict(),
        "aggregate": aggregate,
        "per_seed": per_seed,
        "seconds": time.perf_counter() - start,
    }


def markdown(result: dict, command: str) -> str:
    header = ["method", "Δloss mean ± std (over queries)", "relative Δ", "seed means (mean ± std)", "Δ>0 share"]
    header += ["ratio to random", "same-class share of removed", "LDS (mean ± sem)"]
    rows = []
    for method, agg in result["aggregate"].items():
        d, r, s = agg["delta_loss"], agg["relative_delta"], agg["seed_means"]
        lds_text = f"{agg['lds']['mean']:.3f} ± {agg['lds']['sem']:.3f}" if agg.get("lds") else "-"
        rows.append(
            [
                method,
                f"{d['mean']:+.5f} ± {d['std']:.5f}",
                f"{100 * r['mean']:+.2f}%",
                f"{s['mean']:+.5f} ± {s['std']:.5f} (n={s['n']})",
                agg["share_positive"],
                f"{agg['ratio_to_random']:.1f}" if agg["ratio_to_random"] is not None else "-",
                agg["removed_share_same_class"],
                lds_text,
            ]
        )
    base_loss = np.mean([np.mean(v["base_loss"]) for v in result["per_seed"].values()])
    k = next(iter(result["per_seed"].values()))["k"]
    return (
        f"Digits DDPM ({result['recipe']['steps']} steps), {result['num_queries']} generated digits x "
        f"{len(result['seeds'])} seed(s), k = {k} removed ({100 * result['removed_fraction']:.0f}%), "
        f"retrains grouping G = {result['group_size']} queries; mean reference loss {base_loss:.4f}. LDS over "
        f"{result['lds_subsets']} random-half retrains (first seed; none in quick mode).\n\n"
        f"Command: `{command}`\n\n" + markdown_table(header, rows)
    )


def plot(result: dict, name: str) -> None:
    plt = pyplot()
    methods = list(result["aggregate"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, method in enumerate(methods):
        values = np.concatenate([v["methods"][method]["delta_loss"] for v in result["per_seed"].values()])
        ax.scatter(np.full(len(values), i) + np.random.default_rng(i).uniform(-0.15, 0.15, len(values)), values, s=8)
        ax.errorbar(i, values.mean(), yerr=values.std(ddof=1) if len(values) > 1 else 0, fmt="k_", ms=20, capsize=4)
    ax.axhline(0, color="gray", lw=0.8)
    ax.set_xticks(range(len(methods)), methods, rotation=15, fontsize=8)
    ax.set_ylabel("Δ diffusion loss of the generated digit")
    ax.set_title(f"Removing the top {100 * result['removed_fraction']:.0f}% and retraining")
    save_plot(fig, name)


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--num-queries", type=int, default=10)
    parser.add_argument("--group", type=int, default=None)
    parser.add_argument("--lds-subsets", type=int, default=None)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    seeds = args.seeds if args.seeds is not None else ([0] if args.quick else [0, 1, 2])
    contexts = {seed: DigitsContext(recipe_for(args.quick, seed), args.cache_dir) for seed in seeds}
    result = run(args.quick, seeds, args.num_queries, args.group, contexts=contexts, lds_subsets=args.lds_subsets)
    result["command"] = command_line()
    name = f"counterfactual_{mode_name(args.quick)}"
    write_json(name, result)
    write_markdown(name, markdown(result, result["command"]))
    plot(result, name)
    return result


if __name__ == "__main__":
    main()
