"""Hub sources for ``--stream``: the small files in the HF cache, the weights left on the Hub.

``resolve_streamed`` downloads what a merge reads besides the weights (config, index, tokenizer: the
same small files as ``resolve``), lists the shards with their sizes and LFS sha256 and reads each
shard's header with two range requests, so that the plan can be made with every tensor's offset; the
tensor bytes are read during the merge (``io.remote``). A source whose shards are all in the HF
cache already, a local source, and a LoRA adapter (small, and loaded whole) resolve as usual.

>>> model = resolve_streamed(ModelEntry(model="org/name"))  # doctest: +SKIP
>>> model.checkpoint().tensors["model.norm.weight"].offset  # doctest: +SKIP
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_model_stock.errors import CheckpointError, ModelStockError, SourceError
from hf_model_stock.io.index import INDEX_NAME, SINGLE_NAME, read_weight_map
from hf_model_stock.io.reader import Checkpoint, TensorInfo, check_header_length, parse_header
from hf_model_stock.io.remote import RemoteFile, hub_refused
from hf_model_stock.recipe import ModelEntry
from hf_model_stock.sources import resolve as sources
from hf_model_stock.sources.adapters import ADAPTER_CONFIG
from hf_model_stock.sources.preflight import HEADER_TIMEOUT_S, _read_range
from hf_model_stock.sources.resolve import SMALL_FILE_PATTERNS, ResolvedModel


@dataclass(frozen=True)
class StreamedModel(ResolvedModel):
    """A Hub model whose shards stay on the Hub: ``path`` holds its small files only; ``files`` maps
    the local path each shard would have (the one its ``TensorInfo``s carry) to the remote file."""

    files: dict[Path, RemoteFile] = field(default_factory=dict, compare=False, hash=False)
    tensors: dict[str, TensorInfo] = field(default_factory=dict, compare=False, hash=False)
    metadata: dict[str, str] = field(default_factory=dict, compare=False, hash=False)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(self.path, dict(self.tensors), dict(self.metadata))


def remote_files(plan_models: list[Any]) -> dict[Path, RemoteFile]:
    """Every streamed shard of the given resolved models, by the path their tensors name."""
    out: dict[Path, RemoteFile] = {}
    for m in plan_models:
        if isinstance(m, StreamedModel):
            out.update(m.files)
    return out


def resolve_all_streamed(entries: list[ModelEntry], *, allow_pickle: bool = False) -> list[ResolvedModel]:
    """``resolve_streamed`` for every source at once (a thread each: the calls wait on the network);
    every source that fails is named, in one line."""
    from concurrent.futures import ThreadPoolExecutor

    def one(entry: ModelEntry) -> ResolvedModel | str:
        try:
            return resolve_streamed(entry, allow_pickle=allow_pickle)
        except ModelStockError as exc:
            return str(exc)

    with ThreadPoolExecutor(max(1, min(8, len(entries))), thread_name_prefix="hfms-resolve") as pool:
        done = list(pool.map(one, entries))
    failed = [d for d in done if isinstance(d, str)]
    if failed:
        raise SourceError("; ".join(failed))
    return done  # type: ignore[return-value]


def resolve_streamed(entry: ModelEntry, *, allow_pickle: bool = False) -> ResolvedModel:
    """Resolve ``entry`` for a streamed merge: a ``StreamedModel`` for a Hub source whose shards are not
    all cached, else what ``resolve`` gives (a local directory or a complete cached snapshot)."""
    if sources.is_local(entry):
        return sources.resolve(entry, allow_pickle=allow_pickle)
    sources.check_repo_id(entry)
    from huggingface_hub import HfApi, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.hf_api import RepoFile

    small = sources._snapshot(entry, entry.revision, SMALL_FILE_PATTERNS)
    commit = small.name
    try:
        listing = {f.path: f for f in HfApi().list_repo_tree(entry.model, revision=commit, recursive=True)
                   if isinstance(f, RepoFile)}
    except sources.transport_errors() as exc:
        raise SourceError(sources.hub_error_message(entry, exc)) from None
    if ADAPTER_CONFIG in listing:  # a LoRA adapter: small, loaded whole, so downloaded as usual
        return sources.resolve(entry, allow_pickle=allow_pickle)
    shards = sources.safetensors_shards(small)
    if shards is None:
        if SINGLE_NAME not in listing:
            raise SourceError(f"{entry.label}: --stream reads safetensors weights only, and the repo has no "
                              f"{SINGLE_NAME} or {INDEX_NAME} (run without --stream to convert pickle weights)")
        shards = [SINGLE_NAME]
    missing = [s for s in shards if s not in listing]
    if missing:
        raise CheckpointError(f"{entry.label}: {INDEX_NAME} names shard(s) not in the repo: {', '.join(missing)}")
    if all(isinstance(try_to_load_from_cache(entry.model, s, revision=commit), str) for s in shards):
        return sources.resolve(entry, allow_pickle=allow_pickle)  # all on disk already: read it there

    files: dict[Path, RemoteFile] = {}
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard in shards:
        f = listing[shard]
        lfs = getattr(f, "lfs", None)
        remote = RemoteFile(url=hf_hub_url(entry.model, shard, revision=commit), size=int(f.size),
                            repo_id=entry.model, filename=shard, revision=commit,
                            sha256=lfs.sha256 if lfs else None, git_oid=None if lfs else f.blob_id)
        path = small / shard
        files[path] = remote
        found, meta = _remote_tensors(remote, path)
        metadata.update(meta)
        for name, info in found.items():
            if name in tensors:
                raise CheckpointError(f"{entry.label}: tensor {name!r} is stored in more than one shard")
            tensors[name] = info
    if (small / INDEX_NAME).is_file():
        weight_map = read_weight_map(small / INDEX_NAME)
        for name, shard in weight_map.items():
            if name not in tensors or tensors[name].path.name != shard:
                raise CheckpointError(f"{small / INDEX_NAME}: tensor {name!r} is not in shard {shard}")
        tensors = {k: v for k, v in tensors.items() if k in weight_map}
    return StreamedModel(entry=entry, path=small, repo_id=entry.model, commit=commit, files=files,
                         tensors=tensors, metadata=metadata)


def _remote_tensors(remote: RemoteFile, path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """A remote shard's header (two range requests) as TensorInfos at their absolute offsets."""
    where = remote.where
    try:
        (header_len,) = struct.unpack("<Q", _read_range(remote.url, 0, 8, where, HEADER_TIMEOUT_S))
        check_header_length(where, header_len, remote.size)
        raw = _read_range(remote.url, 8, header_len, where, HEADER_TIMEOUT_S)
    except sources.transport_errors() as exc:
        raise SourceError(_http_message(remote, exc)) from None
    data_start = 8 + header_len
    entries, metadata = parse_header(where, raw, remote.size - data_start)
    tensors = {name: TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
               for name, (begin, end, dtype, shape) in entries.items()}
    return tensors, metadata


def _http_message(remote: RemoteFile, exc: BaseException) -> str:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status in (401, 403):
        return str(hub_refused(remote, status))
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"{remote.where}: cannot read the safetensors header ({type(exc).__name__}: {first})"
