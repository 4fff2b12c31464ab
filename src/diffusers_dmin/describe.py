"""One renderer of an index manifest as text: the ordered (label, value) facts that `dmin info` prints and that the
dataset card's table shows.

`describe(manifest, style)` decides which facts there are and their order; a [`Style`] only says how each one is
worded (labels and value templates, as data) and how text read from the manifest is escaped. Everything in a manifest
is untrusted: every string taken from it goes through the style's `text`, `code` or `ref` before it reaches a template.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .storage import Manifest


@dataclass(frozen=True)
class Style:
    r"""
    How the facts of a manifest are worded and escaped.

    Args:
        text (`Callable[[Any, int], str]`): Free text from the manifest, cut to a length limit and escaped.
        code (`Callable[[Any], str]`): An identifier or name from the manifest (inline code where the style has it).
        ref (`Callable[[str], str]`): A model or dataset reference (a Hub id or a local path).
        missing (`str`): What an unrecorded reference reads as.
        facts (`Mapping[str, tuple[str, str]]`): Fact key (a fact, or a fact's variant such as `"model/none"`) to
            `(label, template)`; the template is formatted with the fact's fields. A key the style does not list is
            left out of its output.
        calibration (`str`): Template of the calibration note of an HNSW graph or FAISS index (field `calibrated`).
        dataset_details (`tuple[str, ...]`): Which of `"split"`, `"fingerprint"`, `"ids from column"` the dataset
            fact names.
        details_join (`tuple[str, str, str]`): Opening, separator and closing of those details.
    """

    text: Callable[..., str]
    code: Callable[[Any], str]
    ref: Callable[[str], str]
    missing: str
    facts: Mapping[str, tuple[str, str]]
    calibration: str
    dataset_details: tuple[str, ...]
    details_join: tuple[str, str, str]


def format_bytes(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if num < 1024 or unit == "GiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num:.1f} TiB"


def describe(manifest: Manifest, style: Style) -> list[tuple[str, str]]:
    """The facts of `manifest`, in their one order, as `(label, value)` pairs worded and escaped by `style`."""
    rows: list[tuple[str, str]] = []

    def emit(key: str, **fields: Any) -> None:
        if key in style.facts:
            label, template = style.facts[key]
            rows.append((label, template.format(**fields)))

    def ref(ident: str | None, revision: str | None) -> str:
        if not ident:
            return style.missing
        return style.ref(ident) + (f" @ {style.code(revision)}" if revision else "")

    def calibrated(calibration: Any) -> str:
        if calibration is None:
            return ""
        c = calibration
        how = "real queries" if c.noise is None else f"noisy copies (noise {c.noise:g}) of index rows"
        not_reached = "" if c.reached else " NOT reached"
        return style.calibration.format(
            top_k=c.top_k, recall=c.recall, target=c.target, not_reached=not_reached, queries=c.num_queries, how=how
        )

    config, spec, meta = manifest.config, manifest.spec, manifest.metadata
    emit(
        "rows",
        rows=manifest.num_rows,
        shards=len(manifest.shards),
        size=format_bytes(sum(shard.num_bytes for shard in manifest.shards)),
    )
    spacing = config.timestep_spacing if isinstance(config.timestep_spacing, str) else "explicit"
    emit(
        "timesteps" if spec is not None else "timesteps/config-only",
        T=config.num_timesteps,
        timesteps=style.text(list(spec.timesteps) if spec is not None else "?", 1000),
        spacing=style.text(spacing),
    )
    emit("sketch_dim", K=config.sketch_dim)
    emit("dtype", dtype=style.code(config.dtype))
    emit("seed", seed=config.seed)
    emit("normalize", normalize=style.code(config.normalize))
    if spec is not None:
        params = config.params if isinstance(config.params, str) else ",".join(config.params)
        emit("model", family=style.code(spec.family), target=style.code(spec.target), params=style.code(params))
        emit(
            "parameters",
            tensors=len(spec.param_names),
            dim=spec.input_dim,
            latents=style.text(tuple(spec.latent_shape)),
        )
        emit("fingerprint", fingerprint=style.code(spec.param_fingerprint))
    else:
        emit("model/none")
    emit("base_model", ref=ref(meta.base_model_id, meta.base_model_revision))
    emit("adapter", ref=ref(meta.adapter_id, meta.adapter_revision))
    known = {"split": meta.dataset_split, "fingerprint": meta.dataset_fingerprint, "ids from column": meta.id_column}
    details = [f"{name} {style.code(known[name])}" for name in style.dataset_details if known[name] is not None]
    opening, separator, closing = style.details_join
    emit(
        "dataset" if meta.dataset_id else "dataset/none",
        ref=ref(meta.dataset_id, meta.dataset_revision),
        details=opening + separator.join(details) + closing if details else "",
    )
    if meta.id_column is not None:
        emit("ids", column=style.code(meta.id_column))
    else:
        emit("ids/rows")
    skipped = meta.extra.get("skipped") or []
    if skipped:
        first = ", ".join(f"{style.text(r['id'])} ({style.text(r.get('reason', ''))})" for r in skipped[:3])
        emit("skipped", count=len(skipped), first=first, more=", ..." if len(skipped) > 3 else "")
    if manifest.noise is not None:
        emit("noise", name=style.code(manifest.noise.name))
    else:
        emit("noise/none")
    h = manifest.hnsw
    if h is not None:
        emit(
            "hnsw",
            rows=h.num_rows,
            K=h.sketch_dim,
            M=h.M,
            ef_construction=h.ef_construction,
            ef=h.ef,
            calibrated=calibrated(h.calibration),
        )
    else:
        emit("hnsw/none")
    f = manifest.faiss
    if f is not None:
        emit(
            "faiss",
            codec=style.text(f.codec),
            rows=f.num_rows,
            K=f.sketch_dim,
            nlist=f.nlist,
            pq=f", pq_m={f.pq_m}" if f.codec == "pq" else "",
            nprobe=f.nprobe,
            candidates=f.num_candidates,
            calibrated=calibrated(f.calibration),
        )
    else:
        emit("faiss/none")
    p = manifest.preconditioner
    if p is not None:
        emit("preconditioner", name=style.code(p.name), size=format_bytes(p.num_bytes))
    emit("written_by", version=style.text(manifest.library_version or "?"), format=manifest.format_version)
    return rows


def _plain_text(value: Any, limit: int | None = None) -> str:
    """`value` as written, except control characters (ESC, CR, newlines, ...): a crafted manifest must not move the
    cursor, recolour or rewrite the user's terminal, so they are shown as escapes (`\\x1b`)."""
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


PLAIN = Style(
    text=_plain_text,
    code=_plain_text,
    ref=_plain_text,
    missing="-",
    calibration=" (calibrated: recall@{top_k} {recall:.3f}, target {target:g}{not_reached}, {queries} {how})",
    dataset_details=("split", "fingerprint", "ids from column"),
    details_join=(" (", ", ", ")"),
    facts={
        "rows": ("rows", "{rows:,} in {shards} shard(s), {size}"),
        "timesteps": ("timesteps", "T={T} timesteps {timesteps} ({spacing})"),
        "timesteps/config-only": ("timesteps", "T={T} timesteps {timesteps} ({spacing})"),
        "sketch_dim": ("sketch dim", "K={K}"),
        "dtype": ("dtype", "{dtype}"),
        "seed": ("seed", "{seed}"),
        "normalize": ("normalize", "{normalize}"),
        "model": ("model", "{family}, target {target}, params {params}"),
        "model/none": ("model", "unspecified (built from a config only)"),
        "parameters": ("parameters", "{tensors} tensors, D={dim:,}, latents {latents}"),
        "fingerprint": ("fingerprint", "{fingerprint}"),
        "base_model": ("base model", "{ref}"),
        "adapter": ("adapter", "{ref}"),
        "dataset": ("dataset", "{ref}{details}"),
        "dataset/none": ("dataset", "{ref}{details}"),
        "ids/rows": ("ids", "row positions in the dataset"),
        "skipped": ("skipped", "{count} row(s): {first}{more}"),
        "noise": ("noise", "saved"),
        "noise/none": ("noise", "not saved"),
        "hnsw": ("hnsw", "{rows:,} rows at K={K}, M={M}, ef_construction={ef_construction}, ef={ef}{calibrated}"),
        "hnsw/none": ("hnsw", "none"),
        "faiss": (
            "faiss",
            "IVF-{codec}, {rows:,} rows at K={K}, nlist={nlist}{pq}, nprobe={nprobe}, {candidates} re-scored "
            "candidates{calibrated}",
        ),
        "faiss/none": ("faiss", "none"),
        "preconditioner": ("preconditioner", "{name}, {size}"),
        "written_by": ("written by", "diffusers_dmin {version} (format {format})"),
    },
)
"""Plain text for `dmin info`: values as written in the manifest (a terminal renders no markup)."""


def plain_lines(manifest: Manifest) -> list[str]:
    """The facts of `manifest` as indented `label: value` lines (the body of `dmin info`)."""
    return [f"  {label + ':':<12} {value}" for label, value in describe(manifest, PLAIN)]
