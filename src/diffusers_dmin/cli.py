"""`dmin`: the command line interface, argparse subcommands over the public API (the only module that prints).

    dmin build PIPELINE --dataset DATASET --output-dir DIR [...]   build (resume, extend) an index
    dmin info INDEX                                                summary of an index's manifest
    dmin search INDEX --pipeline PIPELINE --image FILE --prompt T  top-k training samples, and a grid PNG
    dmin push INDEX REPO_ID                                        upload an index to the Hub
    dmin pull REPO_ID --local-dir DIR                              download an index from the Hub

Each command is a [`BaseDMinCommand`]: `register_subcommand(subparsers)` adds its parser (with an example epilog)
and `run()` calls the library and prints the result. Exit codes: 0 success; 2 a usage error or any [`DMinError`]
(a missing column, a mismatched index, a failed checksum, a refused token...), printed as one `dmin CMD: error: ...`
message without a traceback; 1 an operating-system error (disk full, no permission) or an unreachable Hub, printed
the same way; 130 interrupted. Anything else is a bug and keeps its traceback.

Messages speak the command line: library errors that name Python arguments (`on_error='skip'`) are reworded with the
command's flags (`--on-error skip`). A name that can only be a path (it starts with `.`, `/` or `~`) and does not
exist fails at once without asking the Hub; when the Hub cannot be reached (HF_HUB_OFFLINE=1, or no connection within
3 s), Hub names are looked up in the Hub cache only, instead of waiting for huggingface_hub's five retries.
Heavy libraries (torch, diffusers, datasets, huggingface_hub) are imported by the commands, not at start-up, so
`dmin --help` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shlex
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from .constants import DEFAULT_REPO_TYPE, MANIFEST_NAME
from .errors import ConfigError, DatasetError, DMinError
from .version import __version__


__all__ = ["main", "BaseDMinCommand"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
_HUB_DATASET_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")  # org/name, nothing else


class _DeprecatedAlias(argparse.Action):
    """Stores the value; when it was given by one of the `deprecated` option names, warns (FutureWarning) naming the
    option to use instead (the first of `option_strings`)."""

    def __init__(self, option_strings: list[str], dest: str, *, deprecated: tuple[str, ...] = (), **kwargs: Any):
        super().__init__(option_strings, dest, **kwargs)
        self.deprecated = deprecated

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        if option_string in self.deprecated:
            import warnings

            warnings.warn(
                f"`{option_string}` is deprecated and will be removed in a future version; pass "
                f"`{self.option_strings[0]}` instead.",
                FutureWarning,
                stacklevel=1,
            )
        setattr(namespace, self.dest, values)


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
        parser.set_defaults(command_class=cls, command_parser=parser)
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


def _dataset_arguments(parser: argparse.ArgumentParser, *, required: bool, image_column: str | None = "image") -> None:
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
    parser.add_argument(
        "--image-column",
        default=image_column,
        help="Column holding the images, or the videos of a video model (default: "
        + (image_column or "the column the index was built with, else image")
        + ").",
    )
    parser.add_argument("--id-column", default=None, help="Integer column of sample ids (default: row positions).")


def _note(args: argparse.Namespace, message: str) -> None:
    """A one-line notice on stderr (not with `-q`)."""
    if not args.quiet:
        print(f"note: {message}", file=sys.stderr)


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


def _load_pipeline(args: argparse.Namespace, sources: _Sources) -> Any:
    import torch
    from diffusers import DiffusionPipeline

    kwargs: dict[str, Any] = {"revision": args.model_revision}
    if args.torch_dtype != "float32":  # recent diffusers deprecate `torch_dtype` (now `dtype`); pass it only if asked
        kwargs["torch_dtype"] = getattr(torch, args.torch_dtype)
    what = "the pipeline (--pipeline)" if args.command == "search" else "the pipeline"
    with sources.loading(args.pipeline, what) as cache_only:
        if cache_only:
            kwargs["local_files_only"] = True
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
        with sources.loading(args.lora_weights, "the LoRA weights (--lora-weights)", files=True) as cache_only:
            try:
                pipeline.load_lora_weights(
                    args.lora_weights,
                    weight_name=args.lora_weight_name,
                    **({"local_files_only": True} if cache_only else {}),
                )
            except (OSError, ValueError) as err:
                raise ConfigError(f"Could not load the LoRA weights {args.lora_weights!r}: {err}") from err
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(_device(args.device))


def _load_dataset(args: argparse.Namespace, sources: _Sources, source: str, *, split: str, revision: str | None):
    """`load_training_dataset` behind the local-or-Hub checks; a Hub dataset is read from the cache only when the Hub
    cannot be reached."""
    from .training_data import load_training_dataset

    with sources.loading(source, "the training data (--dataset)", files=True) as cache_only:
        with _datasets_offline(cache_only):
            return load_training_dataset(source, split=split, config_name=args.dataset_config, revision=revision)


@contextlib.contextmanager
def _datasets_offline(offline: bool) -> Iterator[None]:
    """`datasets` reads HF_HUB_OFFLINE once, at import; switch it on for one load (without retries) and back."""
    if not offline:
        yield
        return
    import datasets.config

    saved = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE = saved


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


def _summary(manifest: Any, where: str) -> list[str]:
    from .describe import plain_lines

    return [f"DMin index: {where}", *plain_lines(manifest)]


def _is_local(path: str) -> bool:
    return Path(os.path.expanduser(path)).is_dir()


# ---------------------------------------------------------------------------------------------- local or Hub


def _looks_like_path(value: str) -> bool:
    """Whether `value` can only be a local path: it starts with `.`, `/` or `~`, or has more separators than a Hub id
    (`org/name` has one)."""
    if value.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in value):
        return True
    return value.count("/") > 1


class _Sources:
    """Checks names that may be local paths or Hub ids, before anything is loaded.

    A name that can only be a path and does not exist fails at once ("no such folder"), without asking the Hub. A
    name that may be a Hub id, when the Hub cannot be reached, is looked up in the Hub cache only
    (`local_files_only`), and a failure then says both things in one line."""

    def __init__(self, endpoint: str | None):
        self.endpoint = endpoint
        self._reason: str | None = None
        self._asked = False

    @property
    def offline_reason(self) -> str | None:
        if not self._asked:
            from .hub import offline_reason  # imports huggingface_hub: only when a command asks

            self._reason, self._asked = offline_reason(self.endpoint), True
        return self._reason

    def check(self, value: str, what: str, *, files: bool = False) -> bool:
        """Raise for a missing path; return whether `value` must be loaded from the Hub cache only."""
        path = Path(os.path.expanduser(value))
        if path.exists():
            return False
        if _looks_like_path(value):
            kind = "no such file or folder" if files else "no such folder"
            raise ConfigError(f"Could not load {what} {value!r}: {kind} ({path.resolve()}). Check the path.")
        return self.offline_reason is not None

    @contextlib.contextmanager
    def loading(self, value: str, what: str, *, files: bool = False) -> Iterator[bool]:
        """`with sources.loading(name, "--lora-weights") as local_files_only: ...`: a load that fails while the Hub
        cannot be reached is reported as "not a local folder, and the Hub cannot be reached" in one line."""
        cache_only = self.check(value, what, files=files)
        try:
            yield cache_only
        except (DMinError, OSError, ValueError) as err:
            if not cache_only:
                raise
            local = "file or folder" if files else "folder"
            raise ConfigError(
                f"Could not load {what} {value!r}: it is not a local {local}, and the Hub cannot be asked for it "
                f"({self.offline_reason}; the Hub cache has no copy). Check the name, or connect to the Hub and run "
                "again."
            ) from err


# ---------------------------------------------------------------------------------------------- CLI words

# Library errors name Python arguments (`on_error='skip'`); the CLI says the flag (`--on-error skip`).
_API_PHRASES = (
    ("pass `prompts` (one per sample, or one string)", "pass `--prompt` (one, or one per image)"),
    (
        "Compute the queries with the index's spec: a `GradientSketcher` on the same model and adapter, with "
        "`index.config`; or build a new index for this model.",
        "Pass the --pipeline (and --lora-weights) the index was built with (`dmin info INDEX` shows them), or build "
        "an index for this model with `dmin build`.",
    ),
    ("`resume=False` (CLI: `--overwrite`)", "`--overwrite`"),
    ("(`local_files_only=True` or HF_HUB_OFFLINE=1)", "(HF_HUB_OFFLINE=1)"),
    ("`GradientIndex.push_to_hub(...)`", "`dmin push`"),
    ("`index.attach_dataset(dataset)`", "`--dataset`"),
)
_API_NAMES = {"prompts": "prompt", "exact": "hnsw"}  # API argument -> CLI dest, where they differ
_INVERTED = {"exact"}  # `exact=False` is `--hnsw`
_ARGUMENT = re.compile(r"`([a-z][a-z0-9_]*)=([^`]*)`")


def _cli_words(message: str, parser: argparse.ArgumentParser | None) -> str:
    """Rewrite the Python argument names in a library error as the flags of the command that failed."""
    for api, cli in _API_PHRASES:
        message = message.replace(api, cli)
    if parser is None:
        return message
    flags: dict[str, tuple[str, bool]] = {}
    for action in parser._actions:
        option = next((o for o in action.option_strings if o.startswith("--")), None)
        if option is not None:
            flags[action.dest] = (option, action.nargs == 0)  # (flag, takes no value)

    def flag(match: re.Match) -> str:
        name, value = match.group(1), match.group(2).strip()
        option, switch = flags.get(_API_NAMES.get(name, name), (None, False))
        if option is None:
            return match.group(0)
        if switch and value in ("True", "False"):
            return f"`{option}`" if (value == "True") != (name in _INVERTED) else f"no `{option}`"
        if value == "":
            return f"`{option}`"
        if value == "None":
            return f"no `{option}`"
        if switch or value in ("True", "False"):
            return match.group(0)  # no flag says that (e.g. `token=False`)
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        return f"`{option} {value}`"

    message = _ARGUMENT.sub(flag, message)
    # a bare argument name in backticks (`cache_dir`, `top_k`) that is a flag of this command
    return re.sub(
        r"`([a-z][a-z0-9_]*)`",
        lambda m: f"`{flags[m.group(1)][0]}`" if m.group(1) in flags and "_" in m.group(1) else m.group(0),
        message,
    )


def _is_connection_error(err: BaseException) -> bool:
    """A network failure from httpx/requests/urllib3 (the Hub unreachable), which is not an `OSError`."""
    for cls in type(err).__mro__:
        if cls.__module__.split(".")[0] in ("httpx", "httpx2", "httpcore", "requests", "urllib3") and any(
            word in cls.__name__ for word in ("Connect", "Timeout", "Network", "Proxy")
        ):
            return True
    return type(err).__name__ == "OfflineModeIsEnabled"


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
        "dmin build ./ddpm-digits --dataset ./digits.jsonl --output-dir digits-index --faiss pq --calibrate-recall 0.95",
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
        run.add_argument(
            "--max-shard-rows",
            "--shard-rows",  # the old name: still works, with a FutureWarning
            type=int,
            default=None,
            action=_DeprecatedAlias,
            deprecated=("--shard-rows",),
            help="Rows per shard, also a build's unit of work (default: up to 1,024 and 256 MiB). "
            "--shard-rows is a deprecated alias.",
        )
        run.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images (default 0).")
        run.add_argument(
            "--on-error", default="raise", choices=["raise", "skip"], help="Unreadable rows: stop, or skip them."
        )
        run.add_argument("--hnsw", action="store_true", help="Also build the HNSW graph for approximate search.")
        run.add_argument(
            "--faiss",
            choices=("pq", "sq8", "sq4"),
            default=None,
            help='Also build a FAISS IVF index with these codes (needs `pip install "diffusers-dmin[faiss]"`).',
        )
        run.add_argument(
            "--calibrate-recall",
            type=float,
            default=None,
            metavar="TARGET",
            help="Calibrate ef (HNSW) / nprobe (FAISS) of the built backends to this recall@10 on held-out rows "
            "(e.g. 0.95) and store it in the manifest.",
        )
        _threads_argument(run)
        run.add_argument(
            "--overwrite", action="store_true", help="Delete the index files in --output-dir and start over."
        )

    def run(self) -> int:
        from .config import DMinConfig
        from .index import GradientIndex

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
        sources = _Sources(None)
        sources.check(args.pipeline, "the pipeline")  # a mistyped path fails before the dataset is read
        dataset, image_root = _load_dataset(
            args, sources, args.dataset, split=args.split, revision=args.dataset_revision
        )
        if args.limit is not None:
            if args.limit < 1:
                raise ConfigError(f"`--limit` must be a positive number of rows, but is {args.limit}.")
            dataset = dataset.select(range(min(args.limit, len(dataset))))
        pipeline = _load_pipeline(args, sources)
        # a local dataset is recorded relative to the index folder: found again from anywhere, and no absolute path
        # of the user's disk ends up in a manifest that may be pushed
        dataset_id = args.dataset
        if Path(args.dataset).expanduser().exists():
            try:
                dataset_id = os.path.relpath(
                    Path(args.dataset).expanduser().resolve(), Path(args.output_dir).resolve()
                )
            except ValueError:  # another drive (Windows)
                dataset_id = Path(args.dataset).name
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
            max_shard_rows=args.max_shard_rows,
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

        if PartialState().is_main_process and (args.faiss or args.calibrate_recall is not None):
            if args.faiss:
                index.build_faiss(codec=args.faiss)
            if args.calibrate_recall is not None:
                for backend in ("hnsw", "faiss"):
                    if (backend == "hnsw" and args.hnsw) or (backend == "faiss" and index.faiss_params is not None):
                        result = index.calibrate(backend=backend, target=args.calibrate_recall)
                        extra = "" if result.num_candidates is None else f", {result.num_candidates} candidates"
                        print(
                            f"Calibrated {backend}: {result.parameter}={result.value}{extra}, recall@{result.top_k} "
                            f"{result.recall:.3f} (target {result.target:g}"
                            f"{'' if result.reached else ', NOT reached'})."
                        )
            index.save_pretrained(args.output_dir)
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
        sources = _Sources(args.endpoint)
        with sources.loading(args.index, "the index") as cache_only:
            if _is_local(args.index):
                folder = Path(os.path.expanduser(args.index))
            else:
                location = hub.HubLocation(
                    repo_id=args.index,
                    repo_type=args.repo_type,
                    revision=args.revision,
                    token=args.token,
                    endpoint=args.endpoint,
                    local_files_only=cache_only,
                )
                path = location.download_file(MANIFEST_NAME)
                folder = Path(path).parent
        manifest = read_manifest(folder)
        lines = _summary(manifest, args.index)
        if args.verify:
            from .index import GradientIndex

            index = GradientIndex.from_pretrained(
                args.index,
                revision=args.revision,
                token=args.token,
                endpoint=args.endpoint,
                repo_type=args.repo_type,
                local_files_only=cache_only,
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
        "The training images come from --dataset, or with --dataset-from-index from the Hub dataset the index "
        "records (never a local path or URL written in an index); otherwise the grid shows ids and scores only."
    )
    short_example = "dmin search my-index --pipeline ./my-pipeline --image generated.png --prompt 'a cat'"
    examples = (
        "dmin search pokemon-index --pipeline stable-diffusion-v1-5/stable-diffusion-v1-5 \\",
        "    --lora-weights my-org/pokemon-lora --image generated.png --prompt 'a blue dragon' --top-k 8",
        "dmin search digits-index --pipeline ./ddpm-digits --image a.png b.png --output influence.png",
        "dmin search digits-index --pipeline ./ddpm-digits --image a.png --backend faiss",
        "accelerate launch --multi_gpu --num_processes 2 -m diffusers_dmin.cli search digits-index \\",
        "    --pipeline ./ddpm-digits --image a.png --distributed   # shards split between 2 processes",
    )

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("index", help="An index folder or a Hub repo id.")
        _pipeline_arguments(parser, positional=False)
        parser.add_argument(
            "--image",
            nargs="+",
            required=True,
            help="Image file(s) to attribute; for a video model, videos: animated GIFs or folders of frame images.",
        )
        parser.add_argument("--prompt", nargs="+", default=None, help="The prompt (one, or one per image).")
        parser.add_argument("--top-k", type=int, default=10, help="Training samples per image (default 10).")
        parser.add_argument("--output", default="dmin_search.png", help="Grid PNG to write (default dmin_search.png).")
        backend = parser.add_mutually_exclusive_group()
        backend.add_argument("--hnsw", action="store_true", help="Approximate (HNSW) search instead of exact.")
        backend.add_argument(
            "--backend",
            choices=("exact", "hnsw", "faiss"),
            default=None,
            help="Search backend (default exact). faiss: the index's FAISS IVF index, candidates re-scored exactly.",
        )
        _dataset_arguments(parser, required=False, image_column=None)
        parser.add_argument(
            "--caption-column",
            default=None,
            help="Column shown in the table (default: the prompt column the index was built with, else text).",
        )
        parser.add_argument(
            "--no-dataset", action="store_true", help="Do not load training images (the grid shows ids and scores)."
        )
        parser.add_argument(
            "--dataset-from-index",
            action="store_true",
            help="Without --dataset, load the Hub dataset id recorded in the index (local paths and URLs are refused).",
        )
        parser.add_argument("--thumb-size", type=int, default=96, help="Thumbnail size in the grid (default 96).")
        parser.add_argument(
            "--distributed",
            action="store_true",
            help="Split the index's shards between the processes of `accelerate launch` / `torchrun` (on by itself "
            "when WORLD_SIZE > 1): each verifies and maps only its shards; exact search, results equal to one "
            "process; only process 0 computes the query and prints. INDEX must be a local folder.",
        )
        parser.add_argument(
            "--timeout",
            type=float,
            default=1800.0,
            help="With --distributed: seconds a process waits for the others, e.g. for process 0 to load the "
            "pipeline and compute the query (default 1800).",
        )
        _threads_argument(parser)
        _hub_arguments(parser, revision_help="Branch, tag or commit of the index repo.")

    def run(self) -> int:
        from .index import GradientIndex
        from .video import decode_video

        args = self.args
        if args.top_k < 1:
            raise ConfigError(f"`--top-k` must be a positive integer, but is {args.top_k}.")
        images, channels, videos = [], [], []  # videos: every frame (used when the pipeline takes videos)
        for name in args.image:
            try:
                frames = decode_video(name)  # one image, the frames of an animated file, or a folder's images
                first = frames[0]
                if first.mode in ("P", "PA"):  # a palette (GIF): count the bands of the colours it stands for
                    first = first.convert("RGBA" if first.mode == "PA" or "transparency" in first.info else "RGB")
                channels.append(len(first.getbands()))
                images.append(first.convert("RGB"))
                videos.append(frames)
            except (OSError, ValueError) as err:
                raise ConfigError(f"Cannot read the image {name!r}: {err}") from err
        prompts = args.prompt
        if prompts is not None and len(prompts) not in (1, len(images)):
            raise ConfigError(f"Give one --prompt, or one per image ({len(images)}), not {len(prompts)}.")
        if prompts is not None and len(prompts) == 1:
            prompts = prompts * len(images)

        sources = _Sources(args.endpoint)
        if args.distributed or int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
            from .distributed import DistributedSearch

            if args.hnsw or args.backend in ("hnsw", "faiss"):
                flag = "--hnsw" if args.hnsw else f"--backend {args.backend}"
                raise ConfigError(f"`{flag}` cannot be combined with a distributed search, which is exact.")
            index = DistributedSearch(args.index, timeout=args.timeout)
            if index.rank != 0:  # the other processes search their shards for process 0's query, and print nothing
                try:
                    index.search(None)
                finally:
                    index.close()
                return EXIT_OK
        else:
            with sources.loading(args.index, "the index") as cache_only:
                index = GradientIndex.from_pretrained(
                    args.index,
                    revision=args.revision,
                    token=args.token,
                    endpoint=args.endpoint,
                    repo_type=args.repo_type,
                    local_files_only=cache_only,
                )
        try:
            return self._search(index, sources, images, channels, videos, prompts)
        except Exception as err:
            if not isinstance(index, GradientIndex):
                index._abort(err)  # process 0 failed before searching: the others wait for its query
            raise
        finally:
            if not isinstance(index, GradientIndex):
                index.close()

    def _search(self, index: Any, sources: _Sources, images: list, channels: list, videos: list, prompts: Any) -> int:
        from .images import decode_image
        from .objectives import prepare_images
        from .pipeline import InfluencePipeline
        from .video import decode_video, prepare_video
        from .viz import influence_grid

        args = self.args
        top_k = args.top_k
        if top_k > len(index):
            _note(
                args, f"--top-k {top_k} is more than the {len(index):,} rows of the index; showing all {len(index):,}."
            )
            top_k = len(index)
        dataset, image_root, image_column, caption_column = self._training_data(index, sources)
        pipe = InfluencePipeline(_load_pipeline(args, sources), index, num_threads=args.threads)
        pipe.set_progress_bar_config(disable=True)
        adapter = pipe.sketcher.adapter
        height, width = adapter.resolution
        is_video = adapter.num_frames is not None
        if not is_video and any(Path(name).is_dir() for name in args.image):
            raise ConfigError(f"--image takes image files for a {adapter.family} pipeline, not folders: {args.image}.")
        kinds = {1: "grey", 3: "RGB", 4: "RGBA"}
        want = kinds.get(adapter.image_channels, f"{adapter.image_channels}-channel")
        for name, image, bands in zip(args.image, images, channels):
            changes = []
            if image.size != (width, height):
                changes.append(f"resized and center-cropped from {image.width}x{image.height} to {width}x{height}")
            if bands != adapter.image_channels and not (bands == 4 and adapter.image_channels == 3):
                changes.append(f"converted from {kinds.get(bands, f'{bands}-channel')} to {want}")
            if changes:
                _note(
                    args,
                    f"{name} was {' and '.join(changes)}, the index's input ({width}x{height} {want}), as its "
                    "training images were.",
                )
        import torch

        if is_video:
            pixels = torch.cat(
                [
                    prepare_video(
                        frames, (height, width), adapter.image_channels, adapter.num_frames, source=repr(name)
                    )
                    for name, frames in zip(args.image, videos)
                ]
            )
        else:  # one by one: the images may differ in size
            pixels = torch.cat([prepare_images([image], (height, width), adapter.image_channels) for image in images])
        backend = args.backend or ("hnsw" if args.hnsw else None)
        results = pipe.attribute(pixels, prompts=prompts, top_k=top_k, backend=backend)

        thumbs_per_query = []
        for number, (name, result) in enumerate(zip(args.image, results)):
            prompt = f" ({prompts[number]!r})" if prompts is not None else ""
            print(f"query {number}: {name}{prompt}")
            print(f"  {'rank':>4}  {'sample id':>10}  {'score':>9}  caption")
            for rank, (sample_id, score) in enumerate(zip(result.sample_ids.tolist(), result.scores.tolist())):
                caption = ""
                if result.samples is not None:
                    text = result.samples[rank].get(caption_column, "")
                    caption = text if isinstance(text, str) else ""
                print(f"  {rank + 1:>4}  {sample_id:>10}  {score:>9.4f}  {caption}")
            thumbs = None
            if result.samples is not None:
                try:
                    thumbs = [
                        decode_video(row[image_column], image_root)[0]
                        if is_video
                        else decode_image(row[image_column], image_root)
                        for row in result.samples
                    ]
                except (OSError, ValueError, KeyError) as err:
                    print(f"  (training images unavailable: {err})", file=sys.stderr)
            thumbs_per_query.append(thumbs if thumbs is not None else [None] * len(result.sample_ids))
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        influence_grid(results, images=thumbs_per_query, thumb_size=args.thumb_size, video=is_video).save(output)
        print(f"Wrote {output}")
        return EXIT_OK

    def _training_data(self, index: Any, sources: _Sources) -> tuple[Any, Path | None, str, str]:
        """Attach the training dataset when it can be loaded; returns (dataset, image_root, image_column,
        caption_column). The columns default to those the index was built with (recorded in its manifest)."""
        args = self.args
        meta = index.metadata
        columns = meta.extra.get("columns") if isinstance(meta.extra.get("columns"), dict) else {}
        image_column = args.image_column or columns.get("image") or "image"
        caption_column = args.caption_column or columns.get("prompt") or "text"
        if args.no_dataset:
            return None, None, image_column, caption_column
        source = args.dataset
        if source is None:
            # a manifest is someone else's file: never scan a local path or fetch a URL it names without being asked
            recorded = meta.dataset_id
            if recorded is None:
                print(
                    "The index records no dataset and --dataset is not given: the grid shows ids only.",
                    file=sys.stderr,
                )
                return None, None, image_column, caption_column
            if not args.dataset_from_index:
                print(
                    f"The index records the dataset {recorded!r}; pass --dataset (or --dataset-from-index for a Hub "
                    "dataset) to show training images. The grid shows ids only.",
                    file=sys.stderr,
                )
                return None, None, image_column, caption_column
            if not _HUB_DATASET_ID.fullmatch(recorded) or Path(recorded).expanduser().exists():
                raise ConfigError(
                    f"The index records the dataset {recorded!r}, which is not a Hub dataset id (a local path or URL "
                    "is never opened from an index). Pass --dataset explicitly."
                )
            source = recorded
        split = args.split if args.dataset else (meta.dataset_split or args.split)
        revision = args.dataset_revision if args.dataset else meta.dataset_revision
        try:
            dataset, image_root = _load_dataset(args, sources, source, split=split, revision=revision)
            index.attach_dataset(dataset, id_column=args.id_column or meta.id_column)
        except DMinError as err:
            if args.dataset:
                raise
            print(f"Could not load the training data {source!r} ({err}); the grid shows ids only.", file=sys.stderr)
            return None, None, image_column, caption_column
        if image_column not in dataset.column_names:
            raise DatasetError(
                f"`--image-column {image_column}` is not a column of {source!r}; its columns are "
                f"{dataset.column_names}."
            )
        return dataset, image_root, image_column, caption_column


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
        from .constants import DEFAULT_COMMIT_MESSAGE
        from .index import GradientIndex

        args = self.args
        if not _is_local(args.index):
            raise ConfigError(f"`{args.index}` is not a local folder; `dmin push` uploads an index folder.")
        index = GradientIndex.from_pretrained(args.index)
        reason = _Sources(args.endpoint).offline_reason
        if reason is not None:
            raise ConfigError(
                f"Cannot push {args.index} to {args.repo_id}: {reason}. Nothing was uploaded; run the same command "
                "again when the Hub can be reached."
            )
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
        from .index import GradientIndex

        args = self.args
        sources = _Sources(args.endpoint)
        with sources.loading(args.repo_id, "the index") as cache_only:
            if cache_only and args.force_download:
                raise ConfigError(f"`--force-download` needs the Hub, but {sources.offline_reason}.")
            index = GradientIndex.from_pretrained(
                args.repo_id,
                revision=args.revision,
                token=args.token,
                cache_dir=args.cache_dir,
                endpoint=args.endpoint,
                repo_type=args.repo_type,
                force_download=args.force_download,
                local_files_only=cache_only,
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

    from . import logging
    from .hub import progress_bar_switches

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
        "hub": progress_bar_switches(),
        "hub_disabled": progress_bar_switches().are_progress_bars_disabled(),
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
    except DMinError as err:  # the library's words, with its Python argument names turned into this command's flags
        message = _cli_words(str(err), args.command_parser)
        print(f"dmin {args.command}: error: {message}", file=sys.stderr)
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
    except Exception as err:
        if not _is_connection_error(err):
            raise
        print(
            f"dmin {args.command}: error: the Hub could not be reached ({type(err).__name__}: {err}). Check the "
            "network (or --endpoint) and run the command again.",
            file=sys.stderr,
        )
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
