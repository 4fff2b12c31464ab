"""`dmin`: the command line interface, argparse subcommands over the public API (the only module that prints).

    dmin build PIPELINE --dataset DATASET --output-dir DIR [...]   build (resume, extend) an index
    dmin info INDEX                                                summary of an index's manifest
    dmin search INDEX --pipeline PIPELINE --image FILE --prompt T  top-k training samples, and a grid PNG
    dmin push INDEX REPO_ID                                        upload an index to the Hub
    dmin pull REPO_ID --local-dir DIR                              download an index from the Hub

Each command is a [`BaseDMinCommand`]: `register_subcommand(subparsers)` adds its parser (with an example epilog)
and `run()` calls the library and prints the result. Exit codes: 0 success; 2 a usage error or any [`DMinError`]
(a missing column, a mismatched index, a failed checksum, a refused token...), printed as one `dmin CMD: error: ...`
message without a traceback; 1 an operating-system error (disk full, no permission), printed the same way; 130
interrupted. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from . import __version__
from .build import load_training_dataset
from .constants import DEFAULT_REPO_TYPE, MANIFEST_NAME
from .errors import ConfigError, DatasetError, DMinError


__all__ = ["main", "BaseDMinCommand"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


# ---------------------------------------------------------------------------------------------- base class


class BaseDMinCommand(ABC):
    """One `dmin` subcommand: `register_subcommand` builds its parser, `run` executes it and returns an exit code."""

    name: ClassVar[str]
    help: ClassVar[str]
    description: ClassVar[str]
    examples: ClassVar[tuple[str, ...]]
    short_example: ClassVar[str]

    def __init__(self, args: argparse.Namespace):
        self.args = args

    @classmethod
    def register_subcommand(cls, subparsers: Any) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(
            cls.name,
            help=cls.help,
            description=cls.description,
            epilog="examples:\n" + "\n".join(f"  {line}" for line in cls.examples),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        cls.add_arguments(parser)
        verbosity = parser.add_mutually_exclusive_group()
        verbosity.add_argument("-v", "--verbose", action="store_true", help="Log progress details (INFO).")
        verbosity.add_argument("-q", "--quiet", action="store_true", help="Only errors; no progress bars.")
        parser.set_defaults(command_class=cls)
        return parser

    @classmethod
    @abstractmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None: ...

    @abstractmethod
    def run(self) -> int: ...


# ---------------------------------------------------------------------------------------------- shared helpers


def _hub_arguments(parser: argparse.ArgumentParser, *, revision_help: str) -> None:
    parser.add_argument("--revision", default=None, help=revision_help)
    parser.add_argument("--token", default=None, help="Hub token (default: the saved login or HF_TOKEN).")
    parser.add_argument("--endpoint", default=None, help="Hub endpoint, e.g. a private Hub (default: HF_ENDPOINT).")
    parser.add_argument(
        "--repo-type", default=DEFAULT_REPO_TYPE, choices=["dataset", "model"], help="Repo type (default: dataset)."
    )


def _pipeline_arguments(parser: argparse.ArgumentParser, *, positional: bool) -> None:
    if positional:
        parser.add_argument("pipeline", help="Hub id or local folder of the diffusers pipeline (the base model).")
    else:
        parser.add_argument("--pipeline", required=True, help="Hub id or local folder of the diffusers pipeline.")
    parser.add_argument("--model-revision", default=None, help="Revision of the pipeline on the Hub.")
    parser.add_argument("--lora-weights", default=None, help="Hub id or path of LoRA weights to load into it.")
    parser.add_argument("--lora-weight-name", default=None, help="File name of the LoRA weights in that repo/folder.")
    parser.add_argument(
        "--torch-dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="Model weights dtype."
    )
    parser.add_argument(
        "--device", default="auto", help="Torch device for the model (default: cuda when available, else cpu)."
    )


def _dataset_arguments(parser: argparse.ArgumentParser, *, required: bool) -> None:
    parser.add_argument(
        "--dataset",
        required=required,
        default=None,
        help="Training data: a Hub dataset id, a folder saved with `save_to_disk`, an image folder, or a "
        ".jsonl/.json/.parquet/.csv file (image paths in it are relative to the file's folder).",
    )
    parser.add_argument("--split", default="train", help="Split or slice, e.g. 'train' or 'train[:1000]'.")
    parser.add_argument("--dataset-config", default=None, help="Configuration name of a Hub dataset.")
    parser.add_argument("--dataset-revision", default=None, help="Revision of a Hub dataset.")
    parser.add_argument("--image-column", default="image", help="Column holding the images (default: image).")
    parser.add_argument("--id-column", default=None, help="Integer column of sample ids (default: row positions).")


def _threads_argument(parser: Any) -> None:
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="Torch threads for the gradients (default: DMIN_NUM_THREADS, else 1 on the CPU; 0: torch's setting).",
    )


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_pipeline(args: argparse.Namespace) -> Any:
    import torch
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"revision": args.model_revision}
    if args.torch_dtype != "float32":  # recent diffusers deprecate `torch_dtype` (now `dtype`); pass it only if asked
        kwargs["torch_dtype"] = getattr(torch, args.torch_dtype)
    try:
        try:
            pipeline = DiffusionPipeline.from_pretrained(args.pipeline, **kwargs)
        except ValueError as err:
            if "text_encoder_3" not in str(err):
                raise
            # an SD3 pipeline saved without its T5 encoder
            pipeline = DiffusionPipeline.from_pretrained(
                args.pipeline, text_encoder_3=None, tokenizer_3=None, **kwargs
            )
    except (OSError, ValueError) as err:
        raise ConfigError(f"Could not load the pipeline {args.pipeline!r}: {err}") from err
    if args.lora_weights:
        if not hasattr(pipeline, "load_lora_weights"):
            raise ConfigError(f"{type(pipeline).__name__} cannot load LoRA weights (`--lora-weights`).")
        try:
            pipeline.load_lora_weights(args.lora_weights, weight_name=args.lora_weight_name)
        except (OSError, ValueError) as err:
            raise ConfigError(f"Could not load the LoRA weights {args.lora_weights!r}: {err}") from err
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(_device(args.device))


def _parse_spacing(value: str | None) -> str | tuple[int, ...] | None:
    if value is None or value in ("cubic", "uniform"):
        return value
    try:
        return tuple(int(t) for t in value.split(","))
    except ValueError:
        raise ConfigError(
            f"`--timestep-spacing` must be 'cubic', 'uniform' or a comma-separated list of timesteps such as "
            f"'999,500,100', but is {value!r}."
        ) from None


def _parse_resolution(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    parts = value.lower().replace("x", ",").split(",")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2):
        raise ConfigError(
            f"`--resolution` must be 'SIZE' or 'HEIGHTxWIDTH' such as '512' or '512x768', not {value!r}."
        )
    return (sizes[0], sizes[-1])


def _format_bytes(num: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num < 1024 or unit == "GiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} TiB"


def _summary(manifest: Any, where: str) -> list[str]:
    config, spec, meta = manifest.config, manifest.spec, manifest.metadata
    size = sum(shard.num_bytes for shard in manifest.shards)
    lines = [
        f"DMin index: {where}",
        f"  rows:        {manifest.num_rows:,} in {len(manifest.shards)} shard(s), {_format_bytes(size)} ({config.dtype})",
    ]
    timesteps = list(spec.timesteps) if spec is not None else "?"
    spacing = config.timestep_spacing if isinstance(config.timestep_spacing, str) else "explicit"
    lines.append(
        f"  sketch:      T={config.num_timesteps} timesteps {timesteps} ({spacing}), K={config.sketch_dim}, "
        f"seed {config.seed}, normalize {config.normalize}"
    )
    if spec is not None:
        params = config.params if isinstance(config.params, str) else ",".join(config.params)
        lines.append(
            f"  model:       {spec.family}, target {spec.target}, params {params}: {len(spec.param_names)} tensors, "
            f"D={spec.input_dim:,}, fingerprint {spec.param_fingerprint}, latents {tuple(spec.latent_shape)}"
        )
    else:
        lines.append("  model:       unspecified (built from a config only)")

    def ref(ident: str | None, revision: str | None) -> str:
        return "-" if ident is None else ident + (f" @ {revision}" if revision else "")

    lines.append(f"  base model:  {ref(meta.base_model_id, meta.base_model_revision)}")
    lines.append(f"  adapter:     {ref(meta.adapter_id, meta.adapter_revision)}")
    dataset = ref(meta.dataset_id, meta.dataset_revision)
    details = [
        f"{key} {value}"
        for key, value in (
            ("split", meta.dataset_split),
            ("fingerprint", meta.dataset_fingerprint),
            ("ids from column", meta.id_column),
        )
        if value is not None
    ]
    lines.append(f"  dataset:     {dataset}" + (f" ({', '.join(details)})" if details else ""))
    if meta.id_column is None:
        lines.append("  ids:         row positions in the dataset")
    skipped = meta.extra.get("skipped") or []
    if skipped:
        first = ", ".join(f"{r['id']} ({r.get('reason', '')})" for r in skipped[:3])
        lines.append(f"  skipped:     {len(skipped)} row(s): {first}{', ...' if len(skipped) > 3 else ''}")
    hnsw = manifest.hnsw
    lines.append(
        "  hnsw:        none"
        if hnsw is None
        else f"  hnsw:        {hnsw.num_rows:,} rows at K={hnsw.sketch_dim}, M={hnsw.M}, "
        f"ef_construction={hnsw.ef_construction}, ef={hnsw.ef}"
    )
    lines.append(f"  noise:       {'saved' if manifest.noise is not None else 'not saved'}")
    lines.append(f"  written by:  diffusers_dmin {manifest.library_version or '?'} (format {manifest.format_version})")
    return lines


def _is_local(path: str) -> bool:
    return Path(os.path.expanduser(path)).is_dir()


# ---------------------------------------------------------------------------------------------- build


class BuildCommand(BaseDMinCommand):
    name = "build"
    help = "Build (or resume, or extend) the gradient index of a training set."
    description = (
        "Compute DMin gradient sketches of every training sample and write them as an index folder. A build that was "
        "interrupted resumes where it stopped; run it again on a grown dataset to add only the new rows. Under "
        "`accelerate launch` the rows are split across the processes."
    )
    short_example = "dmin build ./my-pipeline --lora-weights ./my-lora --dataset ./train.jsonl --output-dir my-index"
    examples = (
        "dmin build stable-diffusion-v1-5/stable-diffusion-v1-5 --lora-weights my-org/pokemon-lora \\",
        "    --dataset my-org/pokemon-captions --prompt-column text --output-dir pokemon-index",
        "dmin build ./ddpm-digits --dataset ./digits.jsonl --image-column file --id-column id \\",
        "    --num-timesteps 10 --sketch-dim 4096 --batch-size 64 --output-dir digits-index",
        "accelerate launch --multi_gpu --num_processes 4 -m diffusers_dmin.cli build ... --output-dir big-index",
    )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        _pipeline_arguments(parser, positional=True)
        _dataset_arguments(parser, required=True)
        parser.add_argument(
            "--prompt-column", default="text", help="Caption column (default: text; ignored by unconditional models)."
        )
        parser.add_argument("--limit", type=int, default=None, help="Index only the first N rows of the split.")
        parser.add_argument("--output-dir", required=True, help="The index folder (created if needed).")
        config = parser.add_argument_group("sketch configuration (see DMinConfig)")
        config.add_argument("--num-timesteps", type=int, default=None, help="T (default 10).")
        config.add_argument(
            "--timestep-spacing", default="cubic", help="'cubic' (default), 'uniform' or a list such as '999,500,100'."
        )
        config.add_argument("--sketch-dim", type=int, default=4096, help="K, numbers per timestep (default 4096).")
        config.add_argument("--seed", type=int, default=0, help="Seed of the sketch and the fixed noise (default 0).")
        config.add_argument(
            "--params", default="auto", help="'auto', 'lora', 'attention', 'all' or comma-separated name patterns."
        )
        config.add_argument(
            "--dtype", default="float16", choices=["float16", "bfloat16", "float32"], help="Storage dtype."
        )
        config.add_argument(
            "--target", default=None, choices=["noise", "sample", "v_prediction", "flow"], help="Target override."
        )
        config.add_argument("--resolution", default=None, help="'512' or '512x768' (default: the model's size).")
        run = parser.add_argument_group("running")
        run.add_argument("--batch-size", type=int, default=8, help="Rows per gradient batch (default 8).")
        run.add_argument("--shard-rows", type=int, default=None, help="Rows per shard (default: up to 1,024).")
        run.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images (default 0).")
        run.add_argument(
            "--on-error", default="raise", choices=["raise", "skip"], help="Unreadable rows: stop, or skip them."
        )
        run.add_argument("--hnsw", action="store_true", help="Also build the HNSW graph for approximate search.")
        _threads_argument(run)
        run.add_argument(
            "--overwrite", action="store_true", help="Delete the index files in --output-dir and start over."
        )

    def run(self) -> int:
        from . import DMinConfig, GradientIndex

        args = self.args
        params = args.params if args.params in ("auto", "lora", "attention", "all") else tuple(args.params.split(","))
        config = DMinConfig(
            num_timesteps=args.num_timesteps,
            timestep_spacing=_parse_spacing(args.timestep_spacing),
            sketch_dim=args.sketch_dim,
            seed=args.seed,
            params=params,
            dtype=args.dtype,
            target=args.target,
            resolution=_parse_resolution(args.resolution),
        )
        dataset, image_root = load_training_dataset(
            args.dataset, split=args.split, config_name=args.dataset_config, revision=args.dataset_revision
        )
        if args.limit is not None:
            if args.limit < 1:
                raise ConfigError(f"`--limit` must be a positive number of rows, but is {args.limit}.")
            dataset = dataset.select(range(min(args.limit, len(dataset))))
        pipeline = _load_pipeline(args)
        dataset_id = str(Path(args.dataset).expanduser().resolve()) if Path(args.dataset).exists() else args.dataset
        index = GradientIndex.build(
            pipeline,
            dataset,
            config,
            args.output_dir,
            image_column=args.image_column,
            prompt_column=args.prompt_column or None,
            id_column=args.id_column,
            batch_size=args.batch_size,
            resume=not args.overwrite,
            on_error=args.on_error,
            shard_rows=args.shard_rows,
            num_workers=args.num_workers,
            image_root=image_root,
            hnsw=args.hnsw,
            progress=not args.quiet,
            sketcher_kwargs={"num_threads": args.threads},
            base_model_id=args.pipeline,
            base_model_revision=args.model_revision,
            adapter_id=args.lora_weights,
            dataset_id=dataset_id,
            dataset_revision=args.dataset_revision,
            dataset_split=args.split,
        )
        from accelerate import PartialState

        if PartialState().is_main_process:
            skipped = len(index.metadata.extra.get("skipped") or [])
            print(
                f"Index of {len(index):,} rows (T={index.num_timesteps}, K={index.sketch_dim}, {index.dtype}) in "
                f"{args.output_dir}" + (f"; {skipped} unreadable row(s) skipped" if skipped else "") + "."
            )
        return EXIT_OK


# ---------------------------------------------------------------------------------------------- info


class InfoCommand(BaseDMinCommand):
    name = "info"
    help = "Show the summary of an index (local folder or Hub repo)."
    description = (
        "Print what an index holds and how it was built, from its manifest (only the manifest is downloaded from the "
        "Hub). With --verify, every file is also checked against its sha256."
    )
    short_example = "dmin info my-index"
    examples = (
        "dmin info pokemon-index",
        "dmin info my-org/pokemon-lora-dmin-index --revision main",
        "dmin info pokemon-index --verify",
    )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("index", help="An index folder or a Hub repo id.")
        _hub_arguments(parser, revision_help="Branch, tag or commit of the Hub repo.")
        parser.add_argument("--verify", action="store_true", help="Check every file against the manifest's sha256.")

    def run(self) -> int:
        from . import hub
        from .storage import read_manifest

        args = self.args
        if _is_local(args.index):
            folder = Path(os.path.expanduser(args.index))
        else:
            path = hub.download_file(
                args.index,
                MANIFEST_NAME,
                repo_type=args.repo_type,
                revision=args.revision,
                token=args.token,
                endpoint=args.endpoint,
            )
            folder = Path(path).parent
        manifest = read_manifest(folder)
        lines = _summary(manifest, args.index)
        if args.verify:
            from . import GradientIndex

            index = GradientIndex.from_pretrained(
                args.index, revision=args.revision, token=args.token, endpoint=args.endpoint, repo_type=args.repo_type
            )
            lines.append(f"  verified:    {len(index):,} rows, every shard and the noise match their sha256")
        print("\n".join(lines))
        return EXIT_OK


# ---------------------------------------------------------------------------------------------- search


class SearchCommand(BaseDMinCommand):
    name = "search"
    help = "Find the training samples that most influenced an image; print them and draw a grid."
    description = (
        "Compute the gradient sketch of an image (with its prompt for text-to-image models), search the index, print "
        "the top-k training samples and write a grid PNG: the query, then the training images with ids and scores. "
        "The training images come from --dataset, or from the dataset recorded in the index when it can be loaded; "
        "otherwise the grid shows ids and scores only."
    )
    short_example = "dmin search my-index --pipeline ./my-pipeline --image generated.png --prompt 'a cat'"
    examples = (
        "dmin search pokemon-index --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 \\",
        "    --lora-weights my-org/pokemon-lora --image generated.png --prompt 'a blue dragon' --top-k 8",
        "dmin search digits-index --pipeline ./ddpm-digits --image a.png b.png --output influence.png",
    )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("index", help="An index folder or a Hub repo id.")
        _pipeline_arguments(parser, positional=False)
        parser.add_argument("--image", nargs="+", required=True, help="Image file(s) to attribute.")
        parser.add_argument("--prompt", nargs="+", default=None, help="The prompt (one, or one per image).")
        parser.add_argument("--top-k", type=int, default=10, help="Training samples per image (default 10).")
        parser.add_argument("--output", default="dmin_search.png", help="Grid PNG to write (default dmin_search.png).")
        parser.add_argument("--hnsw", action="store_true", help="Approximate (HNSW) search instead of exact.")
        _dataset_arguments(parser, required=False)
        parser.add_argument("--caption-column", default="text", help="Column shown in the table (default: text).")
        parser.add_argument(
            "--no-dataset", action="store_true", help="Do not load training images (the grid shows ids and scores)."
        )
        parser.add_argument("--thumb-size", type=int, default=96, help="Thumbnail size in the grid (default 96).")
        _threads_argument(parser)
        _hub_arguments(parser, revision_help="Branch, tag or commit of the index repo.")

    def run(self) -> int:
        import PIL.Image

        from . import GradientIndex, InfluencePipeline
        from .build import decode_image
        from .viz import make_grid

        args = self.args
        if args.top_k < 1:
            raise ConfigError(f"`--top-k` must be a positive integer, but is {args.top_k}.")
        images = []
        for name in args.image:
            try:
                with PIL.Image.open(name) as image:
                    images.append(image.convert("RGB"))
            except OSError as err:
                raise ConfigError(f"Cannot read the image {name!r}: {err}") from err
        prompts = args.prompt
        if prompts is not None and len(prompts) not in (1, len(images)):
            raise ConfigError(f"Give one --prompt, or one per image ({len(images)}), not {len(prompts)}.")
        if prompts is not None and len(prompts) == 1:
            prompts = prompts * len(images)

        index = GradientIndex.from_pretrained(
            args.index, revision=args.revision, token=args.token, endpoint=args.endpoint, repo_type=args.repo_type
        )
        dataset, image_root, image_column = self._training_data(index)
        pipe = InfluencePipeline(_load_pipeline(args), index, num_threads=args.threads)
        pipe.set_progress_bar_config(disable=True)
        results = pipe.attribute(images, prompts=prompts, top_k=args.top_k, exact=not args.hnsw)

        rows = []
        for number, (name, result) in enumerate(zip(args.image, results)):
            prompt = f" ({prompts[number]!r})" if prompts is not None else ""
            print(f"query {number}: {name}{prompt}")
            print(f"  {'rank':>4}  {'sample id':>10}  {'score':>9}  caption")
            for rank, (sample_id, score) in enumerate(zip(result.sample_ids.tolist(), result.scores.tolist())):
                caption = ""
                if result.samples is not None:
                    text = result.samples[rank].get(args.caption_column, "")
                    caption = text if isinstance(text, str) else ""
                print(f"  {rank + 1:>4}  {sample_id:>10}  {score:>9.4f}  {caption}")
            thumbs = None
            if result.samples is not None:
                try:
                    thumbs = [decode_image(row[image_column], image_root) for row in result.samples]
                except (OSError, ValueError, KeyError) as err:
                    print(f"  (training images unavailable: {err})", file=sys.stderr)
            if thumbs is None:
                thumbs = [PIL.Image.new("RGB", (8, 8), (220, 220, 220))] * len(result.sample_ids)
            rows.append(result.to_grid(images=thumbs, thumb_size=args.thumb_size))
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        make_grid(rows).save(output)
        print(f"Wrote {output}")
        return EXIT_OK

    def _training_data(self, index: Any) -> tuple[Any, Path | None, str]:
        """Attach the training dataset when it can be loaded; returns (dataset, image_root, image_column)."""
        args = self.args
        meta = index.metadata
        if args.no_dataset:
            return None, None, args.image_column
        source = args.dataset or meta.dataset_id
        if source is None:
            print("The index records no dataset and --dataset is not given: the grid shows ids only.", file=sys.stderr)
            return None, None, args.image_column
        split = args.split if args.dataset else (meta.dataset_split or args.split)
        revision = args.dataset_revision if args.dataset else meta.dataset_revision
        try:
            dataset, image_root = load_training_dataset(
                source, split=split, config_name=args.dataset_config, revision=revision
            )
            index.attach_dataset(dataset, id_column=args.id_column or meta.id_column)
        except DMinError as err:
            if args.dataset:
                raise
            print(f"Could not load the training data {source!r} ({err}); the grid shows ids only.", file=sys.stderr)
            return None, None, args.image_column
        if args.image_column not in dataset.column_names:
            raise DatasetError(
                f"`--image-column {args.image_column}` is not a column of {source!r}; its columns are "
                f"{dataset.column_names}."
            )
        return dataset, image_root, args.image_column


# ---------------------------------------------------------------------------------------------- push / pull


class PushCommand(BaseDMinCommand):
    name = "push"
    help = "Upload an index folder to a Hub repo (one commit, with a dataset card)."
    description = (
        "Verify the index in a folder and upload it to a Hub repository (a dataset repo by default, created if "
        "needed) in one commit, with a generated dataset card."
    )
    short_example = "dmin push my-index my-org/my-dmin-index --private"
    examples = (
        "dmin push pokemon-index my-org/pokemon-lora-dmin-index --private",
        "dmin push pokemon-index my-org/pokemon-lora-dmin-index --revision dev --commit-message 'Add 10k rows'",
    )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("index", help="The local index folder.")
        parser.add_argument("repo_id", help="The Hub repo, e.g. my-org/pokemon-lora-dmin-index.")
        parser.add_argument("--private", action="store_true", default=None, help="Create the repo as private.")
        parser.add_argument("--commit-message", default=None, help="The commit message.")
        parser.add_argument("--create-pr", action="store_true", help="Open a pull request instead of committing.")
        _hub_arguments(parser, revision_help="Branch to push to (must exist).")

    def run(self) -> int:
        from . import GradientIndex
        from .constants import DEFAULT_COMMIT_MESSAGE

        args = self.args
        if not _is_local(args.index):
            raise ConfigError(f"`{args.index}` is not a local folder; `dmin push` uploads an index folder.")
        index = GradientIndex.from_pretrained(args.index)
        commit = index.push_to_hub(
            args.repo_id,
            private=args.private,
            token=args.token,
            commit_message=args.commit_message or DEFAULT_COMMIT_MESSAGE,
            revision=args.revision,
            endpoint=args.endpoint,
            repo_type=args.repo_type,
            create_pr=args.create_pr,
        )
        print(f"Pushed {len(index):,} rows from {args.index} to {args.repo_id}: {commit}")
        return EXIT_OK


class PullCommand(BaseDMinCommand):
    name = "pull"
    help = "Download an index from a Hub repo into a local folder."
    description = (
        "Download an index (manifest, shards, noise, card and HNSW graph when it has one), verify every file against "
        "its sha256, and write a complete copy to --local-dir."
    )
    short_example = "dmin pull my-org/my-dmin-index --local-dir my-index"
    examples = (
        "dmin pull my-org/pokemon-lora-dmin-index --local-dir pokemon-index",
        "dmin pull my-org/pokemon-lora-dmin-index --revision v1.0 --local-dir pokemon-index-v1",
    )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("repo_id", help="The Hub repo, e.g. my-org/pokemon-lora-dmin-index.")
        parser.add_argument("--local-dir", required=True, help="Folder to write the index to.")
        parser.add_argument("--cache-dir", default=None, help="Hub cache folder.")
        parser.add_argument("--force-download", action="store_true", help="Download again even when cached.")
        _hub_arguments(parser, revision_help="Branch, tag or commit to download.")

    def run(self) -> int:
        from . import GradientIndex

        args = self.args
        index = GradientIndex.from_pretrained(
            args.repo_id,
            revision=args.revision,
            token=args.token,
            cache_dir=args.cache_dir,
            endpoint=args.endpoint,
            repo_type=args.repo_type,
            force_download=args.force_download,
        )
        index.save_pretrained(args.local_dir)
        print(f"Pulled {args.repo_id} ({len(index):,} rows) into {args.local_dir}")
        return EXIT_OK


COMMANDS: tuple[type[BaseDMinCommand], ...] = (BuildCommand, InfoCommand, SearchCommand, PushCommand, PullCommand)


# ---------------------------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dmin",
        description="DMin training-data influence for diffusers pipelines: build, inspect, search and share indexes.",
        epilog="examples:\n"
        + "\n".join(f"  {command.short_example}" for command in COMMANDS)
        + "\n\nRun `dmin COMMAND --help` for the options and more examples of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"diffusers_dmin {__version__}")
    subparsers = parser.add_subparsers(title="commands", dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register_subcommand(subparsers)
    return parser


@contextlib.contextmanager
def _verbosity(args: argparse.Namespace) -> Iterator[None]:
    """`-v` logs INFO; `-q` only errors, without progress bars (also those of diffusers, transformers and
    huggingface_hub). The previous settings come back afterwards (`main` may run inside another program)."""
    from . import logging

    if not (args.quiet or args.verbose):
        yield
        return
    saved = _logging_state()
    if args.quiet:
        logging.set_verbosity_error()
        logging.disable_progress_bars()
        for module in saved["modules"]:
            module.set_verbosity_error()
            module.disable_progress_bar()
        saved["hub"].disable_progress_bars()
    else:
        logging.set_verbosity_info()
    try:
        yield
    finally:
        logging.set_verbosity(saved["level"])
        (logging.disable_progress_bars if saved["disabled"] else logging.enable_progress_bars)()
        for module, (level, enabled) in saved["modules"].items():
            module.set_verbosity(level)
            (module.enable_progress_bar if enabled else module.disable_progress_bar)()
        (saved["hub"].disable_progress_bars if saved["hub_disabled"] else saved["hub"].enable_progress_bars)()


def _logging_state() -> dict[str, Any]:
    import diffusers.utils.logging
    import huggingface_hub.utils

    from . import logging

    modules = [diffusers.utils.logging]
    try:
        import transformers.utils.logging

        modules.append(transformers.utils.logging)
    except ImportError:
        pass
    return {
        "level": logging.get_verbosity(),
        "disabled": logging.are_progress_bars_disabled(),
        "modules": {m: (m.get_verbosity(), m.is_progress_bar_enabled()) for m in modules},
        "hub": huggingface_hub.utils,
        "hub_disabled": huggingface_hub.utils.are_progress_bars_disabled(),
    }


def main(argv: list[str] | None = None) -> int:
    r"""
    Run `dmin` with `argv` (default: `sys.argv[1:]`) and return the exit code.

    Examples:
    ```py
    >>> from diffusers_dmin.cli import main
    >>> main(["info", "pokemon-index"])
    0
    ```
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        with _verbosity(args):
            return args.command_class(args).run()
    except DMinError as err:
        print(f"dmin {args.command}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as err:  # disk full, permissions, a vanished file: the system's words, without a traceback
        print(f"dmin {args.command}: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt as err:
        print(f"dmin {args.command}: interrupted", file=sys.stderr)
        if getattr(err, "resumable", False):  # a build kept what it computed; the same command resumes it
            again = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--overwrite"]
            print(f"dmin build: to resume, run: {shlex.join(['dmin', *again])}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
