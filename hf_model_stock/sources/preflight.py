"""Pre-flight: check every model of a recipe against the base before any weight is downloaded.

Reads only what is small: the repo listing (sizes, LFS sha256), ``config.json``, the safetensors
index and each shard's header. Remote headers are read with two HTTP range requests per shard
(the 8-byte length, then exactly the header), so no byte of tensor data is transferred;
``huggingface_hub.get_safetensors_metadata`` would do the job in one request but always asks for the
first 100,000 bytes of every shard, i.e. up to ~98 KB of weights per shard (all of a small model).
Files already in the HF cache, and local sources, are read from disk. Then, like the merge plan, it
compares names, shapes, dtypes, architecture and vocabulary, adds up the bytes to download (and to
convert, and to write) per filesystem, and reports every problem at once.

>>> report = preflight(load_recipe("recipes/math.yaml"), check=False)  # doctest: +SKIP
>>> print(report.describe())  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_model_stock.errors import (
    CheckpointError,
    CompatibilityError,
    ModelStockError,
    SourceError,
)
from hf_model_stock.hub.errors import hub_error_message, transport_errors
from hf_model_stock.hub.headers import remote_header
from hf_model_stock.hub.listing import RepoListing, download, is_offline, list_revision
from hf_model_stock.io.dtypes import is_floating, itemsize
from hf_model_stock.io.index import INDEX_NAME, SINGLE_NAME, read_weight_map
from hf_model_stock.io.reader import Checkpoint, read_header
from hf_model_stock.recipe import ModelEntry, Recipe
from hf_model_stock.sources import adapters
from hf_model_stock.sources import resolve as sources
from hf_model_stock.sources.compat import check_tensors, config_problems, headers_of, listed_problems
from hf_model_stock.sources.resolve import (
    CONVERTED_MARKER,
    PICKLE_INDEX_NAME,
    SMALL_FILE_PATTERNS,
    read_json_object,
)
from hf_model_stock.sources.vocab import has_vocabulary, vocab_tensor_names

Shape = tuple[int, ...]


@dataclass
class SourceInfo:
    """What pre-flight learned about one source, from headers only."""

    role: str  # "base" or "model"
    entry: ModelEntry
    kind: str = "hub"  # "hub" or "local"
    repo_id: str | None = None
    commit: str | None = None
    path: Path | None = None  # local directory (local sources, converted pickle checkpoints)
    config_data: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, tuple[str, Shape]] | None = None  # None: not known from headers (pickle)
    weight_format: str = "safetensors"
    weight_files: list[str] = field(default_factory=list)
    weight_bytes: int = 0
    download_bytes: int = 0  # not yet in the HF cache
    convert_bytes: int = 0  # pickle weights to rewrite as safetensors in our cache
    header_bytes_fetched: int = 0  # bytes read over HTTP to get the safetensors headers
    error: str | None = None
    adapter_config: dict[str, Any] | None = None  # a PEFT LoRA adapter's adapter_config.json
    has_tokenizer: bool = False  # a vocabulary to match embedding rows by token (sources.vocab.has_vocabulary)

    @property
    def label(self) -> str:
        return self.entry.label


@dataclass(frozen=True)
class DiskCheck:
    """Bytes one filesystem must take, against its free space."""

    where: Path
    needed: int
    free: int
    parts: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.needed <= self.free


@dataclass
class PreflightReport:
    """The outcome of :func:`preflight`: sources, problems (all of them), notes, disk space."""

    base: SourceInfo
    models: list[SourceInfo]
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    disk: list[DiskCheck] = field(default_factory=list)
    output_bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def sources(self) -> list[SourceInfo]:
        return [self.base, *self.models]

    @property
    def header_bytes_fetched(self) -> int:
        return sum(s.header_bytes_fetched for s in self.sources)

    @property
    def download_bytes(self) -> int:
        return sum(s.download_bytes for s in self.sources)

    def describe(self) -> str:
        """Human-readable summary, as ``validate`` and ``run --dry-run`` print it."""
        lines = []
        for s in self.sources:
            where = f"{s.repo_id} @ {s.commit}" if s.kind == "hub" else str(s.path)
            if s.error:
                lines.append(f"{s.role + ':':7} {s.label}  ({where if s.commit or s.path else 'unresolved'})  ERROR")
                continue
            count = "?" if s.tensors is None else str(len(s.tensors))
            lines.append(
                f"{s.role + ':':7} {s.label}  ({where})  {s.weight_format}, {len(s.weight_files)} file(s), "
                f"{count} tensors, {_size(s.weight_bytes)}"
                + (f", {_size(s.download_bytes)} to download" if s.kind == "hub" else "")
            )
        cfg = self.base.config_data
        arch = ", ".join(cfg.get("architectures") or []) or "?"
        lines.append(f"config:  model_type {cfg.get('model_type', '?')}, {arch}, vocab_size {cfg.get('vocab_size', '?')}")
        lines.append(
            f"fetched: {self.header_bytes_fetched} bytes of safetensors headers over HTTP; "
            f"to download: {_size(self.download_bytes)}; output: about {_size(self.output_bytes)}"
        )
        for d in self.disk:
            lines.append(f"disk:    {d.where}: {_size(d.needed)} needed ({', '.join(d.parts)}), {_size(d.free)} free"
                         + ("" if d.ok else "  NOT ENOUGH"))
        lines += [f"note:    {n}" for n in self.notes]
        lines += [f"problem: {p}" for p in self.problems]
        lines.append("pre-flight: OK" if self.ok else f"pre-flight: {len(self.problems)} problem(s)")
        return "\n".join(lines)

    def raise_for_problems(self) -> None:
        """Raise one error listing every problem on one line, in the merge plan's words.

        ``SourceError`` when a source could not be read (a single one: its message as is),
        ``CompatibilityError`` (``N incompatibilities with base B: ...``) for mismatches, and
        ``ModelStockError`` when only disk space is short.
        """
        if not self.problems:
            return
        failed = [s.error for s in self.sources if s.error]
        disk = [p for p in self.problems if p.startswith("disk: ")]
        compat = [p for p in self.problems if p not in failed and p not in disk]
        if failed:
            raise SourceError(listed_problems(failed + compat + disk))
        if compat:
            raise CompatibilityError(f"{len(compat)} incompatibilities with base {self.base.label}: "
                                     + listed_problems(compat + disk))
        raise ModelStockError(listed_problems(disk))


def _size(n: int) -> str:
    """Bytes in the largest binary unit that keeps them at or above 1 (GiB with 3 decimals)."""
    if n >= 2**30:
        return f"{n / 2**30:.3f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{n} B"


# ----------------------------------------------------------------------------------------------


def preflight(recipe: Recipe, *, check: bool = True, output: Path | None = None) -> PreflightReport:
    """Check the recipe's models against its base from headers only, before any weight is downloaded.

    Collects every problem (unreachable sources, pickle-only repos without ``allow_pickle``, tensor
    names, shapes, dtypes, architecture, vocabulary size, disk space) and, with ``check``, raises
    ``CompatibilityError`` (``SourceError`` if a source could not be read) listing them all.
    ``output`` overrides ``output.path`` for the disk-space check (``run --out``).

    >>> preflight(load_recipe("recipes/math.yaml"))  # doctest: +SKIP
    """
    infos = [inspect_source(recipe.base_model, "base", allow_pickle=recipe.allow_pickle)]
    infos += [inspect_source(m, "model", allow_pickle=recipe.allow_pickle) for m in recipe.models]
    base, models = infos[0], infos[1:]
    report = PreflightReport(base=base, models=models)
    report.problems += [s.error for s in infos if s.error]
    if not base.error:
        compare(report)
        _check_adapters(report, recipe)
        report.output_bytes = _output_bytes(base, recipe.dtype)
    for s in infos:
        if not s.error and s.tensors is None and s.adapter_config is None:
            report.notes.append(f"{s.label}: pickle weights, converted to safetensors before the merge; their "
                                "tensors are checked then, not now")
    report.disk = disk_checks(report, output or (Path(recipe.output.path) if recipe.output.path else None))
    report.problems += [
        f"disk: {_size(d.needed)} needed on the filesystem of {d.where} ({', '.join(d.parts)}) but only "
        f"{_size(d.free)} free"
        for d in report.disk if not d.ok
    ]
    if check:
        report.raise_for_problems()
    return report


def inspect_source(entry: ModelEntry, role: str, *, allow_pickle: bool = False) -> SourceInfo:
    """Headers, config and sizes of one source; errors are recorded in ``SourceInfo.error``, not raised."""
    info = SourceInfo(role=role, entry=entry)
    try:
        if sources.is_local(entry):
            _inspect_local(info, allow_pickle)
        else:
            sources.check_repo_id(entry)
            _inspect_hub(info, allow_pickle)
    except ModelStockError as exc:
        info.error = str(exc)
    except transport_errors() as exc:
        info.error = hub_error_message(entry.label, entry.model, entry.revision, exc)
    return info


def _inspect_local(info: SourceInfo, allow_pickle: bool) -> None:
    info.kind = "local"
    path = Path(info.entry.model).expanduser().resolve()
    info.path = path
    if info.entry.revision:
        raise SourceError(f"{info.entry.model}: a local path cannot take a revision ({info.entry.revision!r})")
    directory = path if path.is_dir() else path.parent
    info.has_tokenizer = directory.is_dir() and has_vocabulary(p.name for p in directory.iterdir())
    if (directory / "config.json").is_file():
        info.config_data = read_json_object(directory / "config.json")
    if path.is_dir() and adapters.is_adapter(path) and not (path / SINGLE_NAME).is_file():
        _adapter_info(info, adapters.read_adapter_config(path, info.label), [adapters.ADAPTER_WEIGHTS])
        weights = adapters.check_weights_file(path, info.label)
        info.weight_bytes = weights.stat().st_size
        return
    if path.is_dir() and not ((path / INDEX_NAME).is_file() or (path / SINGLE_NAME).is_file()):
        pickles = sources.local_pickle_weights(path)
        if not pickles:
            raise CheckpointError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME}")
        if not allow_pickle:
            raise SourceError(sources.pickle_refusal(info.entry, pickles))
        info.weight_format = "pickle"
        info.weight_files = [p for p in pickles if p != PICKLE_INDEX_NAME]
        info.weight_bytes = sum((path / p).stat().st_size for p in info.weight_files)
        info.convert_bytes = info.weight_bytes
        return
    ckpt = Checkpoint.open(path)
    info.tensors = headers_of(ckpt)
    info.weight_files = [p.name for p in ckpt.files]
    info.weight_bytes = sum(p.stat().st_size for p in ckpt.files)


def _inspect_hub(info: SourceInfo, allow_pickle: bool) -> None:
    entry = info.entry
    listing = list_revision(entry.model, entry.revision, entry.label)
    info.repo_id, info.commit = listing.repo_id, listing.commit
    info.has_tokenizer = has_vocabulary(listing.files)
    if "config.json" in listing:
        info.config_data = read_json_object(_fetch(listing, "config.json", entry))
    shards = _hub_shards(info, listing, allow_pickle)
    if shards is None:
        return  # an adapter or pickle weights: recorded by _hub_shards
    info.weight_files = shards
    info.weight_bytes = sum(listing.files[s].size for s in shards)
    info.tensors = _hub_tensors(info, listing, shards)
    info.download_bytes = _bytes_to_download(listing, [*_small_files(listing), *shards])


def _fetch(listing: RepoListing, name: str, entry: ModelEntry) -> Path:
    return download(listing.repo_id, name, listing.commit, entry.label)


def _offline_missing(entry: ModelEntry, commit: str, what: str) -> SourceError:
    return SourceError(f"{entry.label}: {what} in the local cache (snapshot {commit[:12]}) and the Hub is "
                       "offline (HF_HUB_OFFLINE)")


def _hub_shards(info: SourceInfo, listing: RepoListing, allow_pickle: bool) -> list[str] | None:
    """The safetensors shards of a Hub source; None for an adapter or pickle weights, whose
    ``SourceInfo`` is filled in here."""
    entry, files = info.entry, listing.files
    if INDEX_NAME in files:
        shards = sorted(set(read_weight_map(_fetch(listing, INDEX_NAME, entry)).values()))
        missing = [s for s in shards if s not in files]
        if missing and not listing.complete:
            raise _offline_missing(entry, listing.commit, ", ".join(missing) + " not")
        if missing:
            raise CheckpointError(f"{entry.label}: {INDEX_NAME} names shard(s) not in the repo: {', '.join(missing)}")
        return shards
    if SINGLE_NAME in files:
        return [SINGLE_NAME]
    if adapters.ADAPTER_CONFIG in files:
        config = adapters.read_adapter_config(_fetch(listing, adapters.ADAPTER_CONFIG, entry), info.label)
        _adapter_info(info, config, [adapters.ADAPTER_WEIGHTS])
        if adapters.ADAPTER_WEIGHTS not in files:
            raise SourceError(adapters.missing_weights_message(info.label, adapters.ADAPTER_PICKLE in files))
        info.weight_bytes = files[adapters.ADAPTER_WEIGHTS].size
        info.download_bytes = _bytes_to_download(listing, [*_small_files(listing), *adapters.ADAPTER_FILE_PATTERNS])
        return None
    if not listing.complete and sources.pickle_weight_files(files) is None:
        raise _offline_missing(entry, listing.commit, f"neither {SINGLE_NAME} nor {INDEX_NAME}")
    _inspect_hub_pickle(info, listing, allow_pickle)
    return None


def _hub_tensors(info: SourceInfo, listing: RepoListing, shards: list[str]) -> dict[str, tuple[str, Shape]]:
    """Every tensor's (dtype, shape) from the shards' headers: cached ones read from disk, the others with
    two range requests each (``hub.headers``)."""
    entry = info.entry
    tensors: dict[str, tuple[str, Shape]] = {}
    for shard in shards:
        local = listing.cached(shard)
        if local is not None:
            found, _ = read_header(local)
        elif is_offline():
            raise SourceError(f"{entry.label}: {shard} is not in the local cache and the Hub is offline (HF_HUB_OFFLINE)")
        else:
            found, _, fetched = remote_header(listing.remote_file(shard), Path(shard))
            info.header_bytes_fetched += fetched
        for name, t in found.items():
            if name in tensors:
                raise CheckpointError(f"{entry.label}: tensor {name!r} is stored in more than one shard")
            tensors[name] = (t.dtype, t.shape)
    if INDEX_NAME in listing:
        index_names = set(read_weight_map(_fetch(listing, INDEX_NAME, entry)))
        absent = sorted(index_names - set(tensors))
        if absent:
            raise CheckpointError(f"{entry.label}: {INDEX_NAME} names tensors its shards lack: {', '.join(absent[:5])}")
        tensors = {k: v for k, v in tensors.items() if k in index_names}
    return tensors


def _adapter_info(info: SourceInfo, config: dict[str, Any], weight_files: list[str]) -> None:
    info.adapter_config = config
    info.weight_format = "peft lora adapter"
    info.weight_files = weight_files


def _check_adapters(report: PreflightReport, recipe: Recipe) -> None:
    """Each adapter's declared base against the recipe's (from adapter_config.json, before any download)."""
    base = report.base
    names = [base.entry.model, base.entry.label, base.repo_id or "", str(base.config_data.get("_name_or_path") or "")]
    for m in report.models:
        if m.error or m.adapter_config is None:
            continue
        try:
            note = adapters.check_base(m.adapter_config.get("base_model_name_or_path"), names, base.path, m.label,
                                       base.label, recipe.adapter_base_mismatch)
        except CompatibilityError as exc:
            report.problems.append(str(exc))
            continue
        if note:
            report.notes.append(note)
    if recipe.output.format == "adapter":
        full = [m.label for m in report.models if not m.error and m.adapter_config is None]
        if full:
            report.problems.append(f"output.format adapter: every fine-tune must be a LoRA adapter; "
                                   f"{', '.join(full)} {'is a full model' if len(full) == 1 else 'are full models'}")


def _small_files(listing: RepoListing) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    return list(filter_repo_objects(list(listing.files), allow_patterns=SMALL_FILE_PATTERNS))


def _bytes_to_download(listing: RepoListing, names: list[str]) -> int:
    return sum(listing.files[n].size for n in set(names) if n in listing and listing.cached(n) is None)


def _inspect_hub_pickle(info: SourceInfo, listing: RepoListing, allow_pickle: bool) -> None:
    entry, files = info.entry, listing.files
    chosen = sources.pickle_weight_files(files)
    if chosen is None:
        raise SourceError(f"{entry.label}: no {SINGLE_NAME} or {INDEX_NAME} in the repo")
    if not allow_pickle:
        raise SourceError(sources.pickle_refusal(entry, sources.pickle_listing(files) or chosen))
    info.weight_format = "pickle"
    if chosen == [PICKLE_INDEX_NAME]:
        shards = sorted(set(read_weight_map(_fetch(listing, PICKLE_INDEX_NAME, entry)).values()))
    else:
        shards = chosen
    info.weight_files = shards
    info.weight_bytes = sum(files[s].size for s in shards if s in files)
    converted = sources.converted_dir(listing.repo_id, listing.commit)
    if (converted / CONVERTED_MARKER).is_file():
        info.path = converted
        info.weight_format = "pickle (converted)"
        info.tensors = headers_of(Checkpoint.open(converted))
        info.download_bytes = _bytes_to_download(listing, _small_files(listing))
        return
    info.convert_bytes = info.weight_bytes
    info.download_bytes = _bytes_to_download(listing, [*_small_files(listing), *chosen, *shards])


# ----------------------------------------------------------------------------------------------


def compare(report: PreflightReport) -> None:
    """Append to ``report`` every mismatch between a model and the base (configs, names, shapes, dtypes)."""
    base = report.base
    ok_models = [m for m in report.models if not m.error]
    report.problems += config_problems(base.config_data, [(m.label, m.config_data) for m in ok_models])
    vocab = base.config_data.get("vocab_size")
    untokenized = [s.label for s in [base, *ok_models] if not s.has_tokenizer or s.adapter_config is not None]
    tokenized = not untokenized
    for m in ok_models:
        theirs = m.config_data.get("vocab_size")
        if vocab is not None and theirs is not None and theirs != vocab and not tokenized:
            one = len(untokenized) == 1
            report.problems.append(f"config vocab_size: {theirs} in {m.label} vs {vocab} in base (a resized "
                                   "vocabulary: embedding rows are matched by token only when every model has a "
                                   "tokenizer (tokenizer.json or tokenizer.model), and "
                                   f"{', '.join(untokenized)} {'has' if one else 'have'} none "
                                   f"or {'is' if one else 'are'} LoRA adapters)")
        elif vocab is not None and theirs is not None and theirs != vocab:
            report.notes.append(f"config vocab_size: {theirs} in {m.label} vs {vocab} in base: embedding rows are "
                                "matched by token through the tokenizers (the output has the tokenizer source's)")
    if base.tensors is None:
        return
    known = [(m.label, m.tensors) for m in ok_models if m.tensors is not None]
    check = check_tensors(base.config_data, base.tensors, known,
                          resizable=vocab_tensor_names(base.tensors) if tokenized else ())
    report.problems += check.problems
    report.notes += check.notes


def _output_bytes(base: SourceInfo, out_dtype: str | None) -> int:
    if base.tensors is None:
        return base.weight_bytes
    total = 0
    for dtype, shape in base.tensors.values():
        code = (out_dtype or dtype) if is_floating(dtype) else dtype
        total += math.prod(shape) * itemsize(code)
    return total


def _existing(path: Path) -> Path:
    path = path.expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def disk_checks(report: PreflightReport, output: Path | None) -> list[DiskCheck]:
    """Bytes each filesystem must take (HF cache downloads, pickle conversions, the output) vs free space."""
    from huggingface_hub import constants

    needs: list[tuple[Path, int, str]] = []
    download = sum(s.download_bytes for s in report.sources if not s.error)
    if download:
        needs.append((Path(constants.HF_HUB_CACHE), download, f"HF cache {_size(download)}"))
    convert = sum(s.convert_bytes for s in report.sources if not s.error)
    if convert:
        needs.append((sources.cache_root(), convert, f"pickle conversion {_size(convert)}"))
    if output is not None and report.output_bytes:
        needs.append((output, report.output_bytes, f"output {_size(report.output_bytes)}"))
    by_device: dict[int, tuple[Path, int, list[str]]] = {}
    for path, n, what in needs:
        anchor = _existing(path)
        dev = os.stat(anchor).st_dev
        where, total, parts = by_device.get(dev, (anchor, 0, []))
        by_device[dev] = (where, total + n, parts + [what])
    return [
        DiskCheck(where=where, needed=total, free=shutil.disk_usage(where).free, parts=tuple(parts))
        for where, total, parts in by_device.values()
    ]
