"""Item 1: ablations of the gradient's design (parameters, timesteps, normalisation, noise draws).

Two ground truths, one model each:

- **Digits DDPM** (counterfactual ground truth): the linear datamodeling score (LDS) of each configuration over M
  models retrained from the same initialisation and seed on random halves of the 1,797 digits, plus the class
  detection rate (share of the top-k retrieved digits of the generated digit's class, as labelled by an SVM).
- **Tiny SD on the mixed set** (the paper's detection protocol): the share of the top-k retrieved training samples
  from the prompt's subset (run by `detection.py`, which imports `SD_CONFIGS` from here).

Each configuration changes one thing from the base configuration `BASE` (the defaults we chose; see QUALITY.md),
and one row reproduces the official code's DDPM choices (cubic timesteps, all parameters).

Usage:
    python -m benchmarks.quality.ablations --quick --threads 1
"""

from __future__ import annotations

import copy
import time

import numpy as np

from diffusers_dmin import DMinConfig

from .baselines import pixel_cosine_scores, random_scores, ssim_scores
from .common import (
    base_parser,
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
from .metrics import detection_table, lds, subset_predictions, summary, top_k


BASE: dict = {}  # the library's DMinConfig() defaults (params "auto" = the attention parameters without a LoRA)
LOW_NOISE = tuple(range(15, 300, 30))  # 10 timesteps in [0, 300)
HIGH_NOISE = tuple(range(715, 1000, 30))  # 10 timesteps in [700, 1000)
# the official code's DDPM settings: cubic timesteps, every parameter, per-timestep normalisation
OFFICIAL_DDPM = {"timestep_spacing": "cubic", "num_timesteps": 10, "params": "all", "normalize": "timestep"}
QUICK_DIGITS = (
    "default: DMinConfig()",
    "timesteps=uniform T=10",
    "params=all",
    "normalize=timestep",
    "official DDPM choices: cubic T=10, all params, per-timestep norm",
)


# issue 12's estimator options, shared by digits_configs and detection.sd_configs
ESTIMATOR_ROWS = {
    "sketch_normalize (cosine of sketches)": {"sketch_normalize": True},
    "sketch_normalize, K=1024": {"sketch_normalize": True, "sketch_dim": 1024},
    "K=1024": {"sketch_dim": 1024},
    "output_function=output_norm (D-TRAK)": {"output_function": "output_norm"},
    "noise draws=4, separate (per-draw blocks)": {"num_noise_draws": 4, "noise_draws": "separate"},
    "noise draws=4 + sketch_normalize": {"num_noise_draws": 4, "sketch_normalize": True},
}


def digits_configs(quick: bool) -> dict[str, dict]:
    """name -> config changes from BASE for the digits DDPM (keys starting with `_` are not config fields)."""
    configs = {
        "default: DMinConfig()": {},
        "timesteps=uniform T=10": {"timestep_spacing": "uniform", "num_timesteps": 10},
        "timesteps=cubic T=10 (official)": {"timestep_spacing": "cubic", "num_timesteps": 10},
        "timesteps=low-noise [0,300)": {"timestep_spacing": LOW_NOISE, "num_timesteps": None},
        "timesteps=high-noise [700,1000)": {"timestep_spacing": HIGH_NOISE, "num_timesteps": None},
        "timesteps=uniform T=5": {"timestep_spacing": "uniform", "num_timesteps": 5},
        "timesteps=cubic T=5": {"timestep_spacing": "cubic", "num_timesteps": 5},
        "timesteps=uniform T=20": {"timestep_spacing": "uniform", "num_timesteps": 20},
        "params=attention": {"params": "attention"},
        "params=all": {"params": "all"},
        "params=down_blocks": {"params": ["down_blocks.*"]},
        "params=mid_block": {"params": ["mid_block.*"]},
        "params=up_blocks": {"params": ["up_blocks.*"]},
        "params=lora (untrained r=4 adapter, B=0)": {"params": "lora", "_lora": True},
        "normalize=timestep": {"normalize": "timestep"},
        "normalize=layer": {"normalize": "layer"},
        "normalize=none": {"normalize": "none"},
        "noise draws=1": {"num_noise_draws": 1},
        "noise draws=4": {"num_noise_draws": 4},
        "noise draws=4, matched (4 indices with seeds 0-3, scores summed)": {"_matched_draws": 4},
        "normalize=layer + timesteps=uniform": {"normalize": "layer", "timestep_spacing": "uniform"},
        "normalize=layer + timesteps=cubic": {"normalize": "layer", "timestep_spacing": "cubic"},
        "normalize=timestep + timesteps=uniform": {"normalize": "timestep", "timestep_spacing": "uniform"},
        "normalize=timestep + timesteps=cubic": {"normalize": "timestep", "timestep_spacing": "cubic"},
        "official DDPM choices: cubic T=10, all params, per-timestep norm": dict(OFFICIAL_DDPM),
        # issue 12's estimator options (estimator_options.py measures them with a held-out split and seeds)
        **ESTIMATOR_ROWS,
    }
    if quick:
        configs = {k: v for k, v in configs.items() if k in QUICK_DIGITS}
    return configs


def make_config(changes: dict) -> DMinConfig:
    changes = {k: v for k, v in changes.items() if not k.startswith("_")}
    return DMinConfig(**{**BASE, **changes})


def same_as_default(changes: dict, default: DMinConfig) -> bool:
    """Whether a row's config is the default's (then it is not computed twice)."""
    return not any(k.startswith("_") for k in changes) and make_config(changes) == default and bool(changes)


def with_untrained_lora(pipe):
    """A copy of a DDIM pipeline whose UNet carries a PEFT LoRA (r=4, gaussian A, B=0: the function is unchanged)."""
    from peft import LoraConfig, inject_adapter_in_model

    pipe = copy.deepcopy(pipe)
    config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v"])
    inject_adapter_in_model(config, pipe.unet)
    for name, param in pipe.unet.named_parameters():
        param.requires_grad_("lora_" in name)
    return pipe


def evaluate_scores(scores: np.ndarray, ctx: DigitsContext, labels, confident, masks, actual, ks=(5, 10)) -> dict:
    rankings = top_k(scores, max(ks))
    det = detection_table(rankings[confident], ctx.labels, labels[confident], ks, groups=list(range(10)))
    per_query_lds = lds(subset_predictions(scores, masks), actual)
    return {
        "detection": {k: v["mean"] for k, v in det.items()},
        "detection_micro": {k: float(np.mean(v["per_query"])) for k, v in det.items()},
        "lds": summary(per_query_lds),
        "lds_per_query": per_query_lds,
    }


def run_digits(quick: bool, seed: int = 0, ctx: DigitsContext | None = None) -> dict:
    ctx = ctx or DigitsContext(recipe_for(quick, seed))
    num_queries = 64 if quick else 128
    num_subsets = 8 if quick else 32
    timings: dict[str, float] = {}
    start = time.perf_counter()
    ctx.reference
    timings["reference_training_s"] = time.perf_counter() - start
    queries, labels, confidence = ctx.queries(num_queries)
    confident = confidence >= 0.8
    log(f"{num_queries} queries, {confident.sum()} classified with confidence >= 0.8")
    masks = ctx.lds_masks(num_subsets)
    start = time.perf_counter()
    actual = ctx.subset_losses(masks, queries)
    timings["lds_retraining_s"] = time.perf_counter() - start

    rows = {}
    default = make_config({})
    for name, changes in digits_configs(quick).items():
        config = make_config(changes)
        if same_as_default(changes, default):
            rows[name] = {**rows["default: DMinConfig()"], "same_as_default": True}
            continue
        pipe = with_untrained_lora(ctx.reference) if changes.get("_lora") else None
        out = ctx.dmin_scores(config, queries, pipe=pipe)
        for extra_seed in range(1, changes.get("_matched_draws", 1)):  # the same config with another noise seed
            more = ctx.dmin_scores(config.replace(seed=extra_seed), queries, pipe=pipe)
            out["scores"] = out["scores"] + more["scores"]
            out["sketch_seconds_per_sample"] += more["sketch_seconds_per_sample"]
        rows[name] = {
            "config": config.to_dict(),
            "input_dim": out["input_dim"],
            "timesteps": out["timesteps"],
            "ms_per_sample": 1000 * out["sketch_seconds_per_sample"],
            **evaluate_scores(out["scores"], ctx, labels, confident, masks, actual),
        }
        log(f"{name}: LDS {rows[name]['lds']['mean']:.3f}, det@10 {rows[name]['detection']['k=10']:.3f}")
    baselines = {
        "pixel cosine": pixel_cosine_scores(queries, ctx.images),
        "SSIM": ssim_scores(queries, ctx.images),
        "random": random_scores(len(queries), ctx.num_train, seed=seed),
    }
    for name, scores in baselines.items():
        rows[f"baseline: {name}"] = evaluate_scores(scores, ctx, labels, confident, masks, actual)
    return {
        "recipe": ctx.recipe.to_dict(),
        "num_queries": num_queries,
        "num_confident_queries": int(confident.sum()),
        "num_subsets": num_subsets,
        "default_config": default.to_dict(),
        "rows": rows,
        "timings": timings,
        "training_stats": dict(ctx.stats),
    }


def digits_markdown(result: dict, command: str) -> str:
    header = ["configuration", "D", "T", "LDS (mean ± sem)", "ΔLDS vs default (paired)", "det@5", "det@10"]
    header.append("ms/sample")
    rows = []
    default = np.asarray(result["rows"]["default: DMinConfig()"]["lds_per_query"], dtype=float)
    for name, row in result["rows"].items():
        diff = np.asarray(row["lds_per_query"], dtype=float) - default
        diff = diff[np.isfinite(diff)]
        paired = f"{diff.mean():+.3f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.3f}" if len(diff) > 1 else "-"
        if row.get("same_as_default"):
            name = f"{name} (= default)"
        lds_text = f"{row['lds']['mean']:.3f} ± {row['lds']['sem']:.3f}" if row["lds"]["mean"] is not None else "-"
        rows.append(
            [
                name,
                row.get("input_dim", "-"),
                len(row["timesteps"]) if "timesteps" in row else "-",
                lds_text,
                paired,
                row["detection"]["k=5"],
                row["detection"]["k=10"],
                row.get("ms_per_sample"),
            ]
        )
    return (
        f"Digits DDPM ({result['recipe']['steps']} steps, 1,797 digits at 8x8): LDS over {result['num_subsets']} "
        f"random-half retrains, {result['num_queries']} generated queries; class detection rate on the "
        f"{result['num_confident_queries']} queries the SVM labels with confidence >= 0.8.\n\n"
        f"Command: `{command}`\n\n" + markdown_table(header, rows, digits=3)
    )


def plot_digits(result: dict, name: str) -> None:
    plt = pyplot()
    names = list(result["rows"])
    lds_means = [result["rows"][n]["lds"]["mean"] or 0 for n in names]
    lds_sems = [result["rows"][n]["lds"]["sem"] or 0 for n in names]
    det = [result["rows"][n]["detection"]["k=10"] for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(names) + 1.5), sharey=True)
    y = np.arange(len(names))
    axes[0].barh(y, lds_means, xerr=lds_sems, color="tab:blue")
    axes[0].set_xlabel("LDS (Spearman, mean ± sem over queries)")
    axes[1].barh(y, det, color="tab:orange")
    axes[1].set_xlabel("class detection rate @10")
    axes[0].set_yticks(y, names, fontsize=8)
    axes[0].invert_yaxis()
    fig.suptitle("Ablations on the digits DDPM")
    save_plot(fig, name)


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    from .common import command_line

    result = run_digits(args.quick, args.seed, ctx=DigitsContext(recipe_for(args.quick, args.seed), args.cache_dir))
    name = f"ablations_digits_{mode_name(args.quick)}"
    result["command"] = command_line()
    write_json(name, result)
    write_markdown(name, digits_markdown(result, result["command"]))
    plot_digits(result, name)
    return result


if __name__ == "__main__":
    main()
