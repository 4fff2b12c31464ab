"""Issue 12: one table per model from the runs of `sd_lora_lds.py` and `digits_methods.py` (all seeds found).

Reads `benchmarks/results/quality/methods_{sd,digits}_<mode>_seed*.json` and writes `methods_<mode>.md/.json/.png`:
per method, the LDS (mean over runs of the reported queries' mean; ± the std over runs when there are several
seeds, else the sem over queries), detection top-5/10 (tiny SD), counterfactual Δloss (digits), and cost.

Usage:
    python -m benchmarks.quality.methods_report            # full-size runs
    python -m benchmarks.quality.methods_report --quick
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np

from .common import RESULTS_DIR, markdown_table, pyplot, save_plot, write_json, write_markdown


def _load(pattern: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(RESULTS_DIR.glob(pattern))]


def _spread(values: list[float], sems: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "n/a"
    if len(values) > 1:
        return f"{np.mean(values):.3f} ± {np.std(values, ddof=1):.3f} (n={len(values)} seeds)"
    return f"{values[0]:.3f} ± {sems[0]:.3f}"


def _one_per_seed(runs: list[dict], name: str) -> list[dict]:
    """The runs holding method `name`, at most one per method seed (a rerun of the same seed is not a new seed)."""
    out = {}
    for r in runs:
        if name in r["methods"]:
            out.setdefault(r.get("method_seed", r.get("recipe", {}).get("seed")), r)
    return list(out.values())


def sd_table(runs: list[dict]) -> tuple[str, dict]:
    names = list(dict.fromkeys(name for r in runs for name in r["methods"]))
    rows, data = [], {}
    for name in names:
        per_kind = {}
        for kind in ("generated", "validation"):
            entries = [r["methods"].get(name, {}).get(kind) for r in _one_per_seed(runs, name)]
            entries = [e for e in entries if e and "error" not in e]
            per_kind[kind] = entries
        g, v = per_kind["generated"], per_kind["validation"]
        any_entry = (g or v or [None])[0]
        if any_entry is None:
            continue
        det5 = [e["detection"]["k=5"] for e in g]
        det10 = [e["detection"]["k=10"] for e in g]
        data[name] = {
            "lds_generated": [e["lds"]["mean"] for e in g],
            "lds_validation": [e["lds"]["mean"] for e in v],
            "detection_top5": det5,
            "detection_top10": det10,
            "train_seconds_per_sample": any_entry["train_seconds_per_sample"],
            "bytes_per_sample": any_entry["bytes_per_sample"],
        }
        rows.append(
            [
                name,
                _spread([e["lds"]["mean"] for e in g], [e["lds"]["sem"] for e in g]),
                _spread([e["lds"]["mean"] for e in v], [e["lds"]["sem"] for e in v]),
                np.mean(det5) if det5 else None,
                np.mean(det10) if det10 else None,
                f"{any_entry['train_seconds_per_sample']:.3f}",
                f"{any_entry['bytes_per_sample']:,.0f}",
            ]
        )
    for name, why in runs[0].get("not_available", {}).items():
        if name not in data:  # an older run's "not implemented" row, once another run measured the method
            rows.append([name, "n/a", "n/a", None, None, "-", why])
    header = ["method", "LDS generated", "LDS validation", "det top-5", "det top-10", "train s/sample", "bytes/sample"]
    commands = sorted({r.get("command", "?") for r in runs})
    text = (
        f"**Tiny SD + LoRA** ({runs[0]['num_train']} marked faces, {runs[0]['num_subsets']} random-half LoRA "
        f"fine-tunes, {runs[0]['reported_queries_per_kind']} reported queries per kind; chance detection 0.25). "
        f"Commands: " + "; ".join(f"`{c}`" for c in commands) + "\n\n" + markdown_table(header, rows)
    )
    return text, data


def digits_table(runs: list[dict], extra: list[dict] | None = None) -> tuple[str, dict]:
    """`runs`: one per training seed (`digits_methods`); `extra`: supplementary runs (`digits_methods --extra`) whose
    removal-test rows fill in methods the main runs did not remove for (marked †; their LDS is not used)."""
    extra = extra or []
    names = list(dict.fromkeys(name for r in runs for name in r["methods"]))
    rows, data = [], {}
    supplemented = []
    for name in names:
        entries = [r["methods"][name] for r in runs if name in r["methods"]]
        cfs = [r["counterfactual"][name] for r in runs if name in r.get("counterfactual", {})]
        mark = ""
        if not cfs:
            cfs = [r["counterfactual"][name] for r in extra if name in r.get("counterfactual", {})]
            if cfs:
                mark = " †"
                supplemented.append(name)
        lds_values = [e["lds"]["mean"] for e in entries]
        data[name] = {
            "lds": lds_values,
            "counterfactual": [c["delta_loss"]["mean"] for c in cfs],
            "train_seconds_per_sample": entries[0]["train_seconds_per_sample"],
            "bytes_per_sample": entries[0]["bytes_per_sample"],
        }
        rows.append(
            [
                name,
                _spread(lds_values, [e["lds"]["sem"] for e in entries]),
                f"{cfs[0]['delta_loss']['mean']:+.5f} ± {cfs[0]['delta_loss']['std']:.5f}{mark}" if cfs else "-",
                cfs[0]["share_positive"] if cfs else None,
                f"{entries[0]['train_seconds_per_sample']:.4f}",
                f"{entries[0]['bytes_per_sample']:,.0f}",
            ]
        )
    for name, why in runs[0].get("not_available", {}).items():
        if name not in data:
            rows.append([name, "n/a", "-", None, "-", why])
    header = ["method", "LDS (generated digits)", "counterfactual Δloss (mean ± std over digits)", "Δ>0 share"]
    header += ["train s/sample", "bytes/sample"]
    commands = sorted({r.get("command", "?") for r in runs})
    first = runs[0]
    protocol = first.get("counterfactual", {}).get("_protocol")
    cf = (
        f" Counterfactual: {protocol['queries']} generated digits, top {protocol['k']} removed, {protocol['group']} "
        f"digits per retrain."
        if protocol
        else ""
    )
    if supplemented:
        chosen, used = [], []
        for name in supplemented:
            run = next(r for r in extra if name in r.get("counterfactual", {}))
            used.append(run)
            subsets = run["counterfactual"].get("_protocol", {}).get("damping_chosen_on_subsets", "?")
            label = run["counterfactual"][name].get("chosen", "-")
            chosen.append(name if label == "-" else f"{name} {label}, chosen over the first {subsets} subsets")
        cf += (
            f" † removal rows from a supplementary run of the same protocol (same digits, k and groups; damping "
            f"chosen on the tuning digits only: {'; '.join(chosen)}): "
            + "; ".join(f"`{c}`" for c in sorted({r.get("command", "?") for r in used}))  # the runs rows came from
            + "."
        )
    text = (
        f"**Digits DDPM** ({first['recipe']['steps']} steps; LDS over {first['num_subsets']} random-half retrains, "
        f"{first['reported_queries']} reported generated digits).{cf} Commands: "
        + "; ".join(f"`{c}`" for c in commands)
        + "\n\n"
        + markdown_table(header, rows)
    )
    return text, data


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    mode = "quick" if args.quick else "full"
    sections, payload = [], {}
    sd_runs = _load(f"methods_sd_{mode}_seed*.json")
    # one main run per training seed: `methods_digits_<mode>_seed<N>.json` exactly (a renamed partial run such as
    # `..._seed0_das.json` is not another seed)
    digit_runs = [
        r
        for p, r in zip(
            sorted(RESULTS_DIR.glob(f"methods_digits_{mode}_seed*.json")), _load(f"methods_digits_{mode}_seed*.json")
        )
        if re.fullmatch(rf"methods_digits_{mode}_seed\d+\.json", p.name)
    ]
    if sd_runs:
        text, payload["tiny_sd"] = sd_table(sd_runs)
        sections.append(text)
    if digit_runs:
        text, payload["digits"] = digits_table(digit_runs, _load(f"methods_digits_extra_{mode}_seed*.json"))
        sections.append(text)
    if not sections:
        raise SystemExit(f"No methods_*_{mode}_seed*.json in {RESULTS_DIR}; run sd_lora_lds / digits_methods first.")
    write_markdown(f"methods_{mode}", "# Attribution methods side by side (issue 12)\n\n" + "\n\n".join(sections))
    write_json(f"methods_{mode}", payload)
    plt = pyplot()
    fig, axes = plt.subplots(1, len(payload), figsize=(6 * len(payload), 3.8), squeeze=False)
    for ax, (model, data) in zip(axes[0], payload.items()):
        names = list(data)
        keys = ["lds_generated", "lds_validation"] if model == "tiny_sd" else ["lds"]
        for j, key in enumerate(keys):
            means = [np.mean(data[n][key]) if data[n][key] else 0.0 for n in names]
            ax.bar(np.arange(len(names)) + j * 0.4 - 0.2 * (len(keys) - 1), means, 0.4, label=key)
        ax.axhline(0, color="gray", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=25, fontsize=7)
        ax.set_title(f"{model}: LDS")
        ax.legend(fontsize=7)
    save_plot(fig, f"methods_{mode}")


if __name__ == "__main__":
    main()
