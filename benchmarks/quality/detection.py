"""Item 3 (detection rate, the paper's protocol), item 5a (the HNSW ablation of the paper's Table 6) and the
detection-protocol half of the item-1 ablations, on the tiny SD pipeline trained on the mixed set.

Protocol (paper.md §4.3): for test captions of each subset, generate an image with the trained pipeline, rank the
training samples, and report the share of the top-k (k = 5, 10, 50) that come from the caption's subset, per subset
and averaged over the five subsets. DMin runs through the public API: a `GradientIndex` of the training split
built from `GradientSketcher` sketches, and `InfluencePipeline(pipe, index)(prompts, return_influence=True)`, which
generates and attributes in one call (the query gradient uses the final latents of the denoising loop). Baselines
compare the decoded generated image with the training images: random, SSIM (scikit-image), pixel-space cosine.

The pipeline is loaded from `benchmarks/results/quality/checkpoints/tiny-sd-mixed` (trained by
`python -m benchmarks.quality.train_sd_mixed`); `--retrain` trains it first.

Usage:
    python -m benchmarks.quality.detection --quick --threads 1
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from diffusers_dmin import DMinConfig, GradientIndex, GradientSketcher, InfluencePipeline

from .ablations import BASE, ESTIMATOR_ROWS, HIGH_NOISE, LOW_NOISE, make_config, same_as_default
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
from .data import SUBSETS, build_mixed_set
from .metrics import detection_table, top_k
from .models import load_sd_pipeline
from .train_sd_mixed import DEFAULT_DIR


KS = (5, 10, 50)
SD_BASE = BASE  # the library defaults (params "auto" = the UNet's transformer_blocks without a LoRA)
SEARCH_KS = (2**8, 2**10, 2**12, 2**14, 2**16)


def sd_configs(quick: bool) -> dict[str, dict]:
    configs = {
        "timesteps=uniform T=10": {"timestep_spacing": "uniform", "num_timesteps": 10},
        "timesteps=cubic T=10 (official)": {"timestep_spacing": "cubic", "num_timesteps": 10},
        "timesteps=low-noise [0,300)": {"timestep_spacing": LOW_NOISE, "num_timesteps": None},
        "timesteps=high-noise [700,1000)": {"timestep_spacing": HIGH_NOISE, "num_timesteps": None},
        "timesteps=uniform T=5": {"timestep_spacing": "uniform", "num_timesteps": 5},
        "timesteps=cubic T=5": {"timestep_spacing": "cubic", "num_timesteps": 5},
        "params=attention": {"params": "attention"},
        "params=all": {"params": "all"},
        "params=down_blocks": {"params": ["down_blocks.*"]},
        "params=mid_block": {"params": ["mid_block.*"]},
        "params=up_blocks": {"params": ["up_blocks.*"]},
        "normalize=timestep": {"normalize": "timestep"},
        "normalize=layer": {"normalize": "layer"},
        "normalize=none": {"normalize": "none"},
        "noise draws=1": {"num_noise_draws": 1},
        "noise draws=4": {"num_noise_draws": 4},
        "normalize=layer + timesteps=uniform": {"normalize": "layer", "timestep_spacing": "uniform"},
        "normalize=layer + timesteps=cubic": {"normalize": "layer", "timestep_spacing": "cubic"},
        "normalize=timestep + timesteps=uniform": {"normalize": "timestep", "timestep_spacing": "uniform"},
        "normalize=timestep + timesteps=cubic": {"normalize": "timestep", "timestep_spacing": "cubic"},
        "params=mid_block + normalize=layer": {"params": ["mid_block.*"], "normalize": "layer"},
        "params=mid_block + normalize=timestep": {"params": ["mid_block.*"], "normalize": "timestep"},
        "official SD choices: cubic T=10, attention, per-timestep norm": {
            "timestep_spacing": "cubic",
            "num_timesteps": 10,
            "params": "attention",
            "normalize": "timestep",
        },
        **{name: changes for name, changes in ESTIMATOR_ROWS.items() if "sketch_dim" not in changes},
    }
    if quick:
        keep = ("timesteps=uniform T=10", "normalize=timestep")
        configs = {k: v for k, v in configs.items() if k in keep}
    return configs


def sketch_rows(sketcher: GradientSketcher, pixels: torch.Tensor, prompts: list[str], batch: int = 64):
    for start in range(0, len(pixels), batch):
        yield start, sketcher(images=pixels[start : start + batch], prompts=prompts[start : start + batch])


def build_index(pipe, config: DMinConfig, pixels, prompts, ids) -> tuple[GradientIndex, GradientSketcher, float]:
    """Sketch the training rows batch by batch into a GradientIndex (float16 rows, the library default)."""
    sketcher = GradientSketcher.from_pipeline(pipe, config)
    sketcher.set_progress_bar_config(disable=True)
    index = None
    start = time.perf_counter()
    for offset, sketches in sketch_rows(sketcher, pixels, prompts):
        batch_ids = ids[offset : offset + len(sketches)]
        if index is None:
            index = GradientIndex.from_sketches(sketches, ids=batch_ids, spec=sketcher.spec, noise=sketcher.noise)
        else:
            index.add(sketches, ids=batch_ids)
    return index, sketcher, time.perf_counter() - start


def rankings_from_results(results, row_of_id: dict[int, int]) -> np.ndarray:
    return np.asarray([[row_of_id[int(i)] for i in r.sample_ids] for r in results])


@torch.no_grad()
def decode(pipe, latents: torch.Tensor) -> torch.Tensor:
    images = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    return (images / 2 + 0.5).clamp(0, 1)


def select_queries(mixed, per_subset: int, skip: int = 0) -> tuple[list[str], list[str]]:
    """The captions of test rows `skip .. skip + per_subset - 1` of each subset, and their subsets."""
    test = mixed.rows("test")
    prompts, subsets = [], []
    for subset in SUBSETS:
        rows = [i for i in test if mixed.subsets[i] == subset][skip : skip + per_subset]
        prompts += [mixed.captions[i] for i in rows]
        subsets += [subset] * len(rows)
    return prompts, subsets


def generate_and_attribute(pipe, index, prompts, seed, max_k, batch: int = 16):
    """InfluencePipeline: generate (final latents captured) and attribute in one call, batch by batch."""
    influence_pipe = InfluencePipeline(pipe, index)
    latents, results = [], []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = influence_pipe(
            chunk,
            return_influence=True,
            top_k=max_k,
            generator=generators,
            num_inference_steps=25,
            guidance_scale=3.0,
            output_type="latent",
        )
        latents.append(out.images)
        results += out.influence
    return influence_pipe, torch.cat(latents), results


def hnsw_grid(index, queries, row_of_id, exact_rankings, labels, train_labels, quick: bool) -> dict:
    """Detection rate and recall@10 over the paper's Table-6 grid (hnswlib scores, no exact re-scoring)."""
    ms = (4, 16, 48) if quick else (4, 8, 16, 32, 48)
    efcs = (50, 200, 500) if quick else (50, 100, 200, 300, 400, 500)
    efs = (200, 1000)
    graph_k = 2**10 if quick else 2**12
    out = {"graph_sketch_dim": graph_k, "grid": []}
    for m in ms:
        for efc in efcs:
            start = time.perf_counter()
            index.build_hnsw(M=m, ef_construction=efc, sketch_dim=graph_k, num_threads=1)
            build_s = time.perf_counter() - start
            for ef in efs:
                start = time.perf_counter()
                results = index.search(queries, top_k=max(KS), exact=False, sketch_dim=graph_k, rescore=False, ef=ef)
                search_s = (time.perf_counter() - start) / len(queries)
                rankings = rankings_from_results(results, row_of_id)
                det = detection_table(rankings, train_labels, labels, KS, SUBSETS)
                exact_k = exact_rankings[graph_k]
                recall = np.mean([len(set(a[:10]) & set(b[:10])) / 10 for a, b in zip(rankings, exact_k)])
                out["grid"].append(
                    {
                        "M": m,
                        "ef_construction": efc,
                        "ef": ef,
                        "build_s": build_s,
                        "search_s_per_query": search_s,
                        "recall_at_10": float(recall),
                        **{k: v["mean"] for k, v in det.items()},
                    }
                )
            log(f"HNSW M={m} efc={efc}: build {build_s:.1f}s, det@10 {out['grid'][-1]['k=10']:.3f}")
    return out


def run(quick: bool, seed: int = 0, retrain: bool = False) -> dict:
    if retrain or not (DEFAULT_DIR / "model_index.json").exists():
        from . import train_sd_mixed

        train_sd_mixed.main(["--threads", str(torch.get_num_threads())])
    pipe = load_sd_pipeline(DEFAULT_DIR)
    mixed = build_mixed_set()
    train_rows = mixed.rows("train")
    train_pixels = mixed.pixels(train_rows)
    train_prompts = [mixed.captions[i] for i in train_rows]
    train_labels = np.asarray(mixed.subsets)[train_rows]
    row_of_id = {int(i): r for r, i in enumerate(train_rows)}
    per_subset = 6 if quick else 20
    prompts, labels = select_queries(mixed, per_subset)
    timings: dict[str, float] = {}
    max_k_sketch = 2**14 if quick else 2**16

    # --- DMin: index at the largest K (folds to every smaller K), generate + attribute with InfluencePipeline
    config = make_config({"sketch_dim": max_k_sketch})
    index, sketcher, timings["index_build_s"] = build_index(pipe, config, train_pixels, train_prompts, train_rows)
    log(f"index: {len(index)} rows, D={sketcher.input_dim:,}, built in {timings['index_build_s']:.0f}s")
    start = time.perf_counter()
    influence_pipe, latents, results = generate_and_attribute(pipe, index, prompts, seed + 100, max(KS))
    timings["generate_and_attribute_s"] = time.perf_counter() - start
    query_sketches = influence_pipe.sketcher(latents=latents, prompts=prompts)
    images = decode(pipe, latents)
    methods: dict[str, np.ndarray] = {}
    methods[f"DMin exact (K=2^{int(np.log2(max_k_sketch))}, InfluencePipeline)"] = rankings_from_results(
        results, row_of_id
    )
    exact_rankings = {}
    for k in SEARCH_KS:
        if k > max_k_sketch:
            continue
        found = index.search(query_sketches, top_k=max(KS), sketch_dim=k)
        exact_rankings[k] = rankings_from_results(found, row_of_id)
        methods[f"DMin exact K=2^{int(np.log2(k))}"] = exact_rankings[k]
    # HNSW with the paper's settings (M=16, ef_construction=200, ef=500 at query time), graph at K=2^12
    index.build_hnsw(M=16, ef_construction=200, sketch_dim=2**12, num_threads=1)
    hnsw = index.search(query_sketches, top_k=max(KS), exact=False, sketch_dim=2**12, rescore=False, ef=500)
    methods["DMin HNSW K=2^12 (paper: M=16, efc=200, ef=500)"] = rankings_from_results(hnsw, row_of_id)
    hnsw = index.search(query_sketches, top_k=max(KS), exact=False, sketch_dim=2**12, rescore=True, ef=100)
    methods["DMin HNSW K=2^12 + exact re-scoring (library default ef=100)"] = rankings_from_results(hnsw, row_of_id)
    # baselines on the decoded generated images
    start = time.perf_counter()
    methods["SSIM"] = top_k(ssim_scores(images, train_pixels), max(KS))
    timings["ssim_s"] = time.perf_counter() - start
    methods["pixel cosine"] = top_k(pixel_cosine_scores(images, train_pixels), max(KS))
    methods["random"] = top_k(random_scores(len(prompts), len(train_rows), seed), max(KS))
    table = {name: detection_table(r, train_labels, labels, KS, SUBSETS) for name, r in methods.items()}
    for name, entry in table.items():
        log(f"{name}: " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in entry.items()))

    # --- item 5a: the HNSW grid
    start = time.perf_counter()
    grid = hnsw_grid(index, query_sketches, row_of_id, exact_rankings, labels, train_labels, quick)
    timings["hnsw_grid_s"] = time.perf_counter() - start

    # --- item 1 on the detection protocol: one change at a time from SD_BASE (index at K=2^12), on held-out test
    # captions (disjoint from the ones above), so choosing a default here does not select on the reported queries
    start = time.perf_counter()
    ablation_prompts, ablation_labels = select_queries(mixed, 6 if quick else 16, skip=per_subset)
    _, ablation_latents, found = generate_and_attribute(pipe, index, ablation_prompts, seed + 300, max(KS))
    ablation_sketches = influence_pipe.sketcher(latents=ablation_latents, prompts=ablation_prompts)
    found = index.search(ablation_sketches, top_k=max(KS), sketch_dim=2**12)
    det = detection_table(rankings_from_results(found, row_of_id), train_labels, ablation_labels, KS, SUBSETS)
    ablation = {"default: DMinConfig()": {k: v["mean"] for k, v in det.items()}}
    ablation["default: DMinConfig()"]["per_query_k10"] = det["k=10"]["per_query"]
    ablation_images = decode(pipe, ablation_latents)
    for name, scores in (
        ("baseline: SSIM", ssim_scores(ablation_images, train_pixels)),
        ("baseline: pixel cosine", pixel_cosine_scores(ablation_images, train_pixels)),
    ):
        det = detection_table(top_k(scores, max(KS)), train_labels, ablation_labels, KS, SUBSETS)
        ablation[name] = {k: v["mean"] for k, v in det.items()}
        ablation[name]["per_query_k10"] = det["k=10"]["per_query"]
    del index
    for name, changes in sd_configs(quick).items():
        cfg = make_config({**changes, "sketch_dim": 2**12})
        if same_as_default({**changes, "sketch_dim": 2**12}, make_config({"sketch_dim": 2**12})):
            ablation[name] = {**ablation["default: DMinConfig()"], "same_as_default": True}
            continue
        idx, sk, build_s = build_index(pipe, cfg, train_pixels, train_prompts, train_rows)
        found = idx.search(sk(latents=ablation_latents, prompts=ablation_prompts), top_k=max(KS))
        det = detection_table(rankings_from_results(found, row_of_id), train_labels, ablation_labels, KS, SUBSETS)
        ablation[name] = {k: v["mean"] for k, v in det.items()}
        ablation[name]["per_query_k10"] = det["k=10"]["per_query"]
        ablation[name]["ms_per_sample"] = 1000 * build_s / len(train_rows)
        ablation[name]["input_dim"] = sk.input_dim
        log(f"SD ablation {name}: " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in det.items()))
    if not quick:
        ablation["params=lora (LoRA r=4 fine-tuned 300 steps; its own generations)"] = lora_ablation(
            pipe,
            train_pixels,
            train_prompts,
            train_rows,
            ablation_prompts,
            ablation_labels,
            train_labels,
            row_of_id,
            seed,
        )
    timings["ablation_s"] = time.perf_counter() - start

    return {
        "pipeline": str(DEFAULT_DIR),
        "mixed_set": mixed.info,
        "num_train": len(train_rows),
        "train_subset_shares": {s: float((train_labels == s).mean()) for s in (*SUBSETS, "noise")},
        "queries_per_subset": per_subset,
        "dmin_config": config.to_dict(),
        "input_dim": sketcher.input_dim,
        "timesteps": list(sketcher.timesteps),
        "detection": table,
        "hnsw": grid,
        "ablation_queries_per_subset": len(ablation_prompts) // len(SUBSETS),
        "ablation": ablation,
        "timings": timings,
    }


def lora_ablation(pipe, train_pixels, train_prompts, train_rows, prompts, labels, train_labels, row_of_id, seed):
    """Fine-tune a rank-4 LoRA on the training split, then DMin with `params="lora"` vs `"attention"` on it."""
    from peft import LoraConfig

    from .models import encode_captions

    lora_pipe = copy.deepcopy(pipe)
    unet = lora_pipe.unet
    unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_k", "to_v", "to_out.0"]
        )
    )
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(lora_pipe.scheduler.config)
    with torch.no_grad():
        latents = lora_pipe.vae.encode(train_pixels * 2 - 1).latent_dist.mode() * lora_pipe.vae.config.scaling_factor
    embeds = encode_captions(lora_pipe, train_prompts)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    generator = torch.Generator().manual_seed(seed + 3)
    unet.train()
    for _ in range(300):
        idx = torch.randint(0, len(latents), (64,), generator=generator)
        noise = torch.randn(latents[idx].shape, generator=generator)
        t = torch.randint(0, 1000, (64,), generator=generator)
        pred = unet(noise_scheduler.add_noise(latents[idx], noise, t), t, encoder_hidden_states=embeds[idx]).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    unet.eval()
    out = {}
    for params_name in ("lora", "attention"):
        cfg = make_config({"params": params_name, "sketch_dim": 2**12})
        index, _, _ = build_index(lora_pipe, cfg, train_pixels, train_prompts, train_rows)
        _, _, results = generate_and_attribute(lora_pipe, index, prompts, seed + 100, max(KS))
        det = detection_table(rankings_from_results(results, row_of_id), train_labels, labels, KS, SUBSETS)
        out[params_name] = {k: v["mean"] for k, v in det.items()}
    return out


def markdown(result: dict, command: str) -> str:
    shares = ", ".join(f"{k} {v:.2f}" for k, v in result["train_subset_shares"].items())
    parts = [
        f"Tiny SD (UNet D_attention = {result['input_dim']:,}), {result['num_train']} training samples (shares: "
        f"{shares}), {result['queries_per_subset']} test captions per subset, one generation each; T = "
        f"{len(result['timesteps'])} {result['dmin_config']['timestep_spacing']} timesteps, params "
        f"`{result['dmin_config']['params']}`.\n\nCommand: `{command}`\n",
        "### Detection rate (share of top-k from the prompt's subset; mean over the five subsets)\n",
    ]
    header = ["method"] + [f"top-{k}" for k in KS] + [f"{s} @10" for s in SUBSETS]
    rows = []
    for name, entry in result["detection"].items():
        rows.append([name] + [entry[f"k={k}"]["mean"] for k in KS] + [entry["k=10"]["per_group"][s] for s in SUBSETS])
    parts.append(markdown_table(header, rows))
    parts.append(
        f"\n### HNSW ablation (paper Table 6 shape): graph over sketches folded to K = "
        f"{result['hnsw']['graph_sketch_dim']}, hnswlib scores, no re-scoring\n"
    )
    header = ["M", "ef_construction", "ef", "top-5", "top-10", "top-50", "recall@10 vs exact", "build s", "ms/query"]
    rows = [
        [g["M"], g["ef_construction"], g["ef"], g["k=5"], g["k=10"], g["k=50"], g["recall_at_10"], g["build_s"]]
        + [1000 * g["search_s_per_query"]]
        for g in result["hnsw"]["grid"]
    ]
    parts.append(markdown_table(header, rows))
    parts.append(
        f"\n### Ablations on the detection protocol (index at K = 2^12; {result['ablation_queries_per_subset']} other "
        "test captions per subset, disjoint from the ones above)\n"
    )
    header = ["configuration"] + [f"top-{k}" for k in KS] + ["Δtop-10 vs default (paired)", "ms/sample"]
    rows = []
    default = np.asarray(result["ablation"]["default: DMinConfig()"]["per_query_k10"])
    for name, entry in result["ablation"].items():
        if "lora" in entry:
            for sub, values in entry.items():
                rows.append([f"{name}: params={sub}"] + [values[f"k={k}"] for k in KS] + [None, None])
        else:
            label = f"{name} (= default)" if entry.get("same_as_default") else name
            diff = np.asarray(entry["per_query_k10"]) - default
            paired = f"{diff.mean():+.3f} ± {diff.std(ddof=1) / np.sqrt(len(diff)):.3f}"
            rows.append([label] + [entry[f"k={k}"] for k in KS] + [paired, entry.get("ms_per_sample")])
    parts.append(markdown_table(header, rows))
    return "\n".join(parts)


def plot(result: dict, name: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(13, 4))
    names = list(result["detection"])
    y = np.arange(len(names))
    for i, k in enumerate(KS):
        axes[0].barh(
            y + (i - 1) * 0.27, [result["detection"][n][f"k={k}"]["mean"] for n in names], 0.27, label=f"top-{k}"
        )
    axes[0].set_yticks(y, names, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("detection rate (mean over subsets)")
    axes[0].legend(fontsize=8)
    grid = result["hnsw"]["grid"]
    for ef in sorted({g["ef"] for g in grid}):
        for m in sorted({g["M"] for g in grid}):
            pts = [(g["ef_construction"], g["k=10"]) for g in grid if g["M"] == m and g["ef"] == ef]
            axes[1].plot(*zip(*pts), "o-" if ef == 200 else "s--", label=f"M={m}, ef={ef}", ms=4)
    exact = result["detection"][f"DMin exact K=2^{int(np.log2(result['hnsw']['graph_sketch_dim']))}"]["k=10"]["mean"]
    axes[1].axhline(exact, color="k", ls=":", label="exact")
    axes[1].set_xlabel("ef_construction")
    axes[1].set_ylabel("detection rate top-10")
    axes[1].legend(fontsize=6, ncol=2)
    save_plot(fig, name)


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__)
    parser.add_argument("--retrain", action="store_true", help="train the SD pipeline first (about 15 minutes)")
    args = parser.parse_args(argv)
    set_threads(args.threads)
    result = run(args.quick, args.seed, args.retrain)
    result["command"] = command_line()
    name = f"detection_{mode_name(args.quick)}"
    write_json(name, result)
    write_markdown(name, markdown(result, result["command"]))
    plot(result, name)
    return result


if __name__ == "__main__":
    main()
