"""Model sources: a local directory or a Hub repo ``org/name[@revision]`` -> a local snapshot.

Hub downloads go through ``huggingface_hub.snapshot_download`` (its cache, ``HF_HUB_OFFLINE``,
``HF_TOKEN``/login and ``HF_ENDPOINT`` all apply) and fetch only what a merge needs: configs,
tokenizer files, the safetensors index and exactly the shards it names (not every ``*.safetensors``
of the repo, which may hold a second copy of the weights such as ``consolidated.safetensors``).

Pickle weights (``pytorch_model.bin``, ``*.pt``) are refused unless the recipe says
``allow_pickle: true``; they are then loaded with ``torch.load(weights_only=True)`` (no code runs)
and rewritten as safetensors in our own cache (``HF_MODEL_STOCK_CACHE``, default
``~/.cache/hf-model-stock``), keyed by repo and commit, so a conversion happens once.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hf_model_stock.errors import SourceError
from hf_model_stock.hub.listing import cache_dir, download_snapshot, is_offline, list_revision
from hf_model_stock.io.index import INDEX_NAME, SINGLE_NAME, read_weight_map
from hf_model_stock.io.reader import Checkpoint
from hf_model_stock.recipe import ModelEntry
from hf_model_stock.sources.adapters import ADAPTER_CONFIG, ADAPTER_FILE_PATTERNS
from hf_model_stock.sources.remote_code import has_custom_code

# Small files a merge reads or carries over: configs, the index, tokenizer files.
SMALL_FILE_PATTERNS = [
    INDEX_NAME,
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template.jinja",
    "chat_template.json",
]
# Everything a merge may need (kept for callers that pass their own patterns).
MERGE_FILE_PATTERNS = ["*.safetensors", *SMALL_FILE_PATTERNS]

# Pickle checkpoints we know how to convert: an index naming shards, or one of these single files.
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
PICKLE_SINGLE_NAMES = ("pytorch_model.bin", "model.bin", "pytorch_model.pt", "model.pt", "model.pth")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
CONVERTED_MARKER = "hfms-converted.json"


@dataclass(frozen=True)
class ResolvedModel:
    """A model available on local disk, with where it came from."""

    entry: ModelEntry
    path: Path
    repo_id: str | None = None
    commit: str | None = None

    @property
    def label(self) -> str:
        return self.entry.label

    @property
    def name(self) -> str:
        """The source without local paths: the Hub repo id (also for an HF cache snapshot given as a
        directory), else the local directory's name."""
        if self.repo_id:
            return self.repo_id
        return Path(self.entry.model).expanduser().resolve().name or str(self.path.name)

    @property
    def display_name(self) -> str:
        """``name``, with ``@commit`` when the commit is known: what cards and reports show."""
        return f"{self.name}@{self.commit}" if self.repo_id and self.commit else self.name

    def config(self) -> dict[str, Any]:
        """The model's ``config.json`` as a dict ({} if it has none)."""
        path = self.path / "config.json"
        return read_json_object(path) if path.is_file() else {}

    def checkpoint(self) -> Checkpoint:
        """The headers of the model's weights (a streamed source builds them from remote headers)."""
        return Checkpoint.open(self.path)


def read_json_object(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object (config.json and the like); ``SourceError`` otherwise."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: unreadable JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: not a JSON object")
    return data


def is_local(entry: ModelEntry) -> bool:
    """A source is local when the path exists (Hub ids never name an existing path)."""
    return Path(entry.model).expanduser().exists()


SNAPSHOT_COMMIT = re.compile(r"[0-9a-f]{40}")


def hf_cache_snapshot(path: Path) -> tuple[str, str] | None:
    """``(repo_id, commit)`` when ``path`` is a model snapshot folder of an HF cache
    (``.../models--org--name/snapshots/<commit>``), else None.

    >>> hf_cache_snapshot(Path("/c/hub/models--org--name/snapshots/" + "0" * 40))
    ('org/name', '0000000000000000000000000000000000000000')
    """
    parts = path.parts
    if len(parts) < 3 or parts[-2] != "snapshots" or not SNAPSHOT_COMMIT.fullmatch(parts[-1]):
        return None
    folder = parts[-3]
    if not folder.startswith("models--") or len(folder) <= len("models--"):
        return None
    return folder[len("models--"):].replace("--", "/", 1), parts[-1]


def check_repo_id(entry: ModelEntry) -> None:
    """Refuse a source that is neither an existing path nor a Hub id ``org/name``."""
    if entry.model.count("/") != 1 or entry.model.startswith((".", "/", "~")):
        raise SourceError(f"{entry.model}: no such local directory, and not a Hub repo id (org/name)")


def cache_root() -> Path:
    """Where converted pickle checkpoints go: ``$HF_MODEL_STOCK_CACHE`` or ``~/.cache/hf-model-stock``."""
    env = os.environ.get("HF_MODEL_STOCK_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "hf-model-stock"


def resolve(
    entry: ModelEntry,
    *,
    allow_patterns: list[str] | None = None,
    allow_pickle: bool = False,
) -> ResolvedModel:
    """Return a local snapshot of ``entry``, downloading from the Hub if it is not a local path.

    Hub sources record the commit sha their revision resolved to (``ResolvedModel.commit``). Sources
    with only pickle weights raise ``SourceError`` unless ``allow_pickle``, which converts them to
    safetensors in our cache (``torch.load(weights_only=True)``: tensors only, no code is run).

    >>> resolve(ModelEntry(model="Qwen/Qwen2.5-0.5B", revision="main"))  # doctest: +SKIP
    """
    if is_local(entry):
        path = Path(entry.model).expanduser().resolve()
        if entry.revision:
            raise SourceError(f"{entry.model}: a local path cannot take a revision ({entry.revision!r})")
        if path.is_dir() and not _has_safetensors(path):
            pickles = local_pickle_weights(path)
            if pickles:
                if not allow_pickle:
                    raise SourceError(pickle_refusal(entry, pickles))
                path = convert_local_pickle(path, pickles)
        snapshot = hf_cache_snapshot(Path(entry.model).expanduser().resolve())
        if snapshot is not None:  # an HF cache snapshot given as a directory is still that Hub commit
            return ResolvedModel(entry=entry, path=path, repo_id=snapshot[0], commit=snapshot[1])
        return ResolvedModel(entry=entry, path=path)
    check_repo_id(entry)
    if allow_patterns is not None:
        folder = download_snapshot(entry.model, entry.revision, allow_patterns, entry.label)
        return ResolvedModel(entry=entry, path=folder, repo_id=entry.model, commit=folder.name)

    small = download_snapshot(entry.model, entry.revision, SMALL_FILE_PATTERNS, entry.label)
    commit = small.name  # snapshot folders are named by the commit sha
    shards = safetensors_shards(small)
    if shards is None:
        names = repo_file_names(entry, commit)
        if SINGLE_NAME in names:
            shards = [SINGLE_NAME]
        elif ADAPTER_CONFIG in names:  # a PEFT LoRA adapter: its config and weights (sources.adapters)
            path = download_snapshot(entry.model, commit, SMALL_FILE_PATTERNS + ADAPTER_FILE_PATTERNS, entry.label)
            return ResolvedModel(entry=entry, path=path, repo_id=entry.model, commit=commit)
        else:
            return _resolve_pickle(entry, commit, small, names, allow_pickle)
    code = ["*.py"] if has_custom_code(small) else []  # auto_map: the repo's modules go with it
    try:
        path = download_snapshot(entry.model, commit, SMALL_FILE_PATTERNS + shards + code, entry.label)
    except SourceError:
        _refuse_missing_offline(entry, commit, small, shards)
        raise
    # Offline, without the tree listing snapshot_download keeps online (a cache filled file by file by
    # hf_hub_download or transformers, or by an older huggingface_hub), the snapshot folder is returned as
    # it is: check that it holds every shard.
    _refuse_missing_offline(entry, commit, path, shards)
    return ResolvedModel(entry=entry, path=path, repo_id=entry.model, commit=commit)


def _refuse_missing_offline(entry: ModelEntry, commit: str, snapshot: Path, names: list[str]) -> None:
    """Offline, raise ``SourceError`` naming the files of ``names`` that ``snapshot`` lacks."""
    missing = [name for name in names if not (snapshot / name).is_file()]  # a dangling link is no file
    if missing and is_offline():
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise SourceError(
            f"{entry.label}: the cached snapshot {commit[:12]} is incomplete (no {shown} in the local cache) and "
            "the Hub cannot be reached (HF_HUB_OFFLINE): unset HF_HUB_OFFLINE to download the rest"
        ) from None


def converted_dir(repo_id: str, commit: str) -> Path:
    """Where a Hub repo's pickle weights at ``commit`` are kept once converted to safetensors."""
    return cache_root() / "converted" / cache_dir(repo_id).name / commit


def _has_safetensors(directory: Path) -> bool:
    return (directory / INDEX_NAME).is_file() or (directory / SINGLE_NAME).is_file()


def safetensors_shards(directory: Path) -> list[str] | None:
    """The shard files named by ``directory``'s safetensors index, or None when it has no index."""
    index_path = directory / INDEX_NAME
    if not index_path.is_file():
        return None
    return sorted(set(read_weight_map(index_path).values()))


def repo_file_names(entry: ModelEntry, commit: str) -> set[str]:
    """The files of a Hub repo at ``commit`` (offline without a cached listing: the cached snapshot's)."""
    return set(list_revision(entry.model, commit, entry.label).files)


# ----------------------------------------------------------------------------------------------
# Pickle checkpoints


def pickle_weight_files(names: Iterable[str]) -> list[str] | None:
    """Which of ``names`` form a convertible pickle checkpoint: [index] or [single file]; None if none."""
    names = set(names)
    if PICKLE_INDEX_NAME in names:
        return [PICKLE_INDEX_NAME]
    for single in PICKLE_SINGLE_NAMES:
        if single in names:
            return [single]
    return None


def pickle_listing(names: Iterable[str]) -> list[str]:
    """The pickle-looking files at the top of a repo (for messages)."""
    return sorted(n for n in names if "/" not in n and n.endswith(PICKLE_SUFFIXES))


def pickle_refusal(entry: ModelEntry, files: list[str]) -> str:
    shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
    return (f"{entry.label}: only pickle weights ({shown}); loading pickle can run code, so they are refused. "
            "Set `allow_pickle: true` in the recipe (--allow-pickle on the command line) to convert them to "
            "safetensors with torch.load(weights_only=True)")


def local_pickle_weights(directory: Path) -> list[str]:
    """Pickle weight files at the top of a local model directory (no safetensors there)."""
    names = [p.name for p in directory.iterdir() if p.is_file()]
    chosen = pickle_weight_files(names)
    if chosen is None:
        return []
    if chosen == [PICKLE_INDEX_NAME]:
        return [PICKLE_INDEX_NAME, *sorted(set(read_weight_map(directory / PICKLE_INDEX_NAME).values()))]
    return chosen


def _resolve_pickle(
    entry: ModelEntry, commit: str, small: Path, names: set[str], allow_pickle: bool
) -> ResolvedModel:
    chosen = pickle_weight_files(names)
    if chosen is None:
        found = pickle_listing(names)
        hint = f" (found {', '.join(found)}, none of them a known weights file)" if found else ""
        raise SourceError(f"{entry.label}: no {SINGLE_NAME} or {INDEX_NAME} in the repo{hint}")
    if not allow_pickle:
        raise SourceError(pickle_refusal(entry, pickle_listing(names) or chosen))
    dest = converted_dir(entry.model, commit)
    if (dest / CONVERTED_MARKER).is_file():
        return ResolvedModel(entry=entry, path=dest, repo_id=entry.model, commit=commit)
    path = download_snapshot(entry.model, commit, chosen, entry.label)
    if chosen == [PICKLE_INDEX_NAME]:
        shards = sorted(set(read_weight_map(path / PICKLE_INDEX_NAME).values()))
        path = download_snapshot(entry.model, commit, [PICKLE_INDEX_NAME, *shards], entry.label)
        files = [PICKLE_INDEX_NAME, *shards]
    else:
        files = chosen
    convert_pickle(path, files, dest, small_files_from=small)
    return ResolvedModel(entry=entry, path=dest, repo_id=entry.model, commit=commit)


def convert_local_pickle(directory: Path, files: list[str]) -> Path:
    """Convert a local pickle checkpoint into our cache (once per path, sizes and mtimes)."""
    stamp = [str(directory)] + [
        f"{name}:{(directory / name).stat().st_size}:{(directory / name).stat().st_mtime_ns}" for name in files
    ]
    key = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    dest = cache_root() / "converted" / "local" / f"{directory.name}-{key}"
    if not (dest / CONVERTED_MARKER).is_file():
        convert_pickle(directory, files, dest, small_files_from=directory)
    return dest


def convert_pickle(src: Path, files: list[str], dest: Path, *, small_files_from: Path) -> Path:
    """Rewrite pickle weights from ``src`` as safetensors in ``dest`` (atomically: temp dir + rename).

    ``files`` is ``[PICKLE_INDEX_NAME, shard...]`` or ``[single_file]``. Shards are converted one at
    a time (peak memory: one shard). Config and tokenizer files are copied from ``small_files_from``.
    """
    import torch
    from safetensors.torch import save_file

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if files[0] == PICKLE_INDEX_NAME:
            weight_map = read_weight_map(src / PICKLE_INDEX_NAME)
            shards = sorted(set(weight_map.values()))
            out_name = {s: f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i, s in enumerate(shards)}
            if len(shards) == 1:
                out_name = {shards[0]: SINGLE_NAME}
        else:
            shards = files
            out_name = {files[0]: SINGLE_NAME}
        new_map: dict[str, str] = {}
        total = 0
        for shard in shards:
            tensors = _load_pickle_tensors(src / shard, torch)
            save_file(tensors, str(tmp / out_name[shard]), metadata={"format": "pt"})
            new_map.update({name: out_name[shard] for name in tensors})
            total += sum(t.numel() * t.element_size() for t in tensors.values())
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}
            (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        for pattern in SMALL_FILE_PATTERNS:
            for p in small_files_from.glob(pattern):
                if p.is_file() and p.name != INDEX_NAME and not (tmp / p.name).exists():
                    shutil.copyfile(p, tmp / p.name)
        marker = {"source": str(src), "files": files, "converted_with": f"torch {torch.__version__} "
                  "torch.load(weights_only=True) -> safetensors"}
        (tmp / CONVERTED_MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / CONVERTED_MARKER).is_file():  # not a concurrent conversion that won the race
                shutil.rmtree(dest, ignore_errors=True)
                os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _load_pickle_tensors(path: Path, torch: Any) -> dict[str, Any]:
    """``torch.load(weights_only=True)`` a state dict; shared or strided tensors are copied for safetensors."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # an UnpicklingError names the forbidden global: say so in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SourceError(f"{path}: cannot load as tensors with torch.load(weights_only=True) ({first})") from None
    if not isinstance(obj, dict) or not obj or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise SourceError(f"{path}: not a state dict (a mapping of tensor names to tensors)")
    seen: set[int] = set()
    out = {}
    for name, tensor in obj.items():
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        whole = tensor.is_contiguous() and tensor.storage_offset() == 0 and (
            tensor.numel() * tensor.element_size() == storage.nbytes()
        )
        if ptr in seen or not whole:
            tensor = tensor.contiguous().clone()
        seen.add(ptr)
        out[name] = tensor
    return out
