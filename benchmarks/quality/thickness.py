"""Item 5b: the stroke-thickness removal experiment (the paper's Section 9 / Figure 5), on the digits.

1. Train the reference DDPM on the 1,797 digits; generate G digits (fixed seeds).
2. Measure each one's stroke thickness (`metrics.stroke_thickness`: ink area / skeleton length).
3. Take the thickest 10% as queries, retrieve each one's top-k training digits with DMin, and remove the union U.
4. Retrain from the same initialisation and seed without U, and regenerate from the same seeds (DDIM, eta 0: the
   same starting noise, so the two sets of generations are paired).
5. Compare the thickness distribution with the reference, with removing |U| random digits, and with removing the
   union of the pixel-cosine top-k (a baseline that looks only at the images).

Usage:
    python -m benchmarks.quality.thickness --quick --threads 1
"""

from __future__ import annotations

import numpy as np

from diffusers_dmin import DMinConfig

from .ablations import BASE
from .baselines import pixel_cosine_scores
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
from .metrics import stroke_thickness, summary, top_k
from .models import generate_ddpm


def run(quick: bool, seed: int = 0, ctx: DigitsContext | None = None, top: int = 10) -> dict:
    ctx = ctx or DigitsContext(recipe_for(quick, seed))
    num_generated = 300 if quick else 1000
    gen_seed = 5000 + seed
    reference = generate_ddpm(ctx.reference, num_generated, gen_seed)
    thickness = stroke_thickness(reference)
    num_queries = max(1, num_generated // 10)
    thick = np.argsort(-thickness)[:num_queries]
    queries = reference[thick]
    threshold = float(np.sort(thickness)[-num_queries])
    log(f"thickness: {num_generated} generated, {num_queries} thickest (>= {threshold:.2f}) as queries")
    train_thickness = stroke_thickness(ctx.images)
    removals = {
        "DMin": np.unique(top_k(ctx.dmin_scores(DMinConfig(**BASE), queries)["scores"], top).ravel()),
        "pixel cosine": np.unique(top_k(pixel_cosine_scores(queries, ctx.images), top).ravel()),
    }
    size = len(removals["DMin"])
    removals["random"] = np.random.default_rng(seed + 77).permutation(ctx.num_train)[:size]
    out = {
        "reference": {"thickness": summary(thickness), "share_thick": float((thickness >= threshold).mean())},
    }
    distributions = {"reference": thickness}
    for name, removed in removals.items():
        pipe = ctx.model(removed)
        generated = generate_ddpm(pipe, num_generated, gen_seed)
        values = stroke_thickness(generated)
        distributions[f"without {name} set"] = values
        out[f"without {name} set"] = {
            "num_removed": int(len(removed)),
            "removed_train_thickness": summary(train_thickness[removed]),
            "thickness": summary(values),
            "share_thick": float((values >= threshold).mean()),
            "paired_change": summary(values - thickness),
            "share_thinner_paired": float((values < thickness).mean()),
        }
        log(f"without {name} ({len(removed)}): mean thickness {values.mean():.3f} (reference {thickness.mean():.3f})")
    return {
        "recipe": ctx.recipe.to_dict(),
        "num_generated": num_generated,
        "num_queries": num_queries,
        "top_k": top,
        "thick_threshold": threshold,
        "train_thickness": summary(train_thickness),
        "results": out,
        "distributions": {k: v.tolist() for k, v in distributions.items()},
    }


def markdown(result: dict, command: str) -> str:
    header = ["generations of", "removed", "thickness of removed (train)", "mean thickness", "Δ paired (mean ± std)"]
    header += ["share ≥ thick threshold", "share thinner (paired)"]
    rows = []
    for name, entry in result["results"].items():
        rows.append(
            [
                name,
                entry.get("num_removed", 0),
                f"{entry['removed_train_thickness']['mean']:.3f}" if "removed_train_thickness" in entry else "-",
                f"{entry['thickness']['mean']:.3f} ± {entry['thickness']['std']:.3f}",
                f"{entry['paired_change']['mean']:+.3f} ± {entry['paired_change']['std']:.3f}"
                if "paired_change" in entry
                else "-",
                entry["share_thick"],
                entry.get("share_thinner_paired"),
            ]
        )
    return (
        f"Digits DDPM ({result['recipe']['steps']} steps): {result['num_generated']} generations; the "
        f"{result['num_queries']} thickest (thickness >= {result['thick_threshold']:.2f} px) are the queries; union of "
        f"their top-{result['top_k']} removed; mean thickness of all training digits "
        f"{result['train_thickness']['mean']:.3f}.\n\nCommand: `{command}`\n\n" + markdown_table(header, rows)
    )


def plot(result: dict, name: str) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    values = result["distributions"]
    bins = np.linspace(min(map(min, values.values())), max(map(max, values.values())), 30)
    for label, data in values.items():
        ax.hist(data, bins=bins, histtype="step", lw=1.5, label=f"{label} (mean {np.mean(data):.2f})")
    ax.axvline(result["thick_threshold"], color="gray", ls=":", label="thick threshold")
    ax.set_xlabel("stroke thickness (pixels of the 8x8 digit)")
    ax.set_ylabel("generated digits")
    ax.legend(fontsize=7)
    save_plot(fig, name)


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    result = run(args.quick, args.seed, ctx=DigitsContext(recipe_for(args.quick, args.seed), args.cache_dir))
    result["command"] = command_line()
    name = f"thickness_{mode_name(args.quick)}"
    write_json(name, result)
    write_markdown(name, markdown(result, result["command"]))
    plot(result, name)
    return result


if __name__ == "__main__":
    main()
