"""Hub sources for ``--stream``: the small files in the HF cache, the weights left on the Hub.

``resolve_streamed`` downloads what a merge reads besides the weights (config, index, tokenizer: the
same small files as ``resolve``), lists the shards with their sizes and LFS sha256 and reads each
shard's header with two range requests (``hub.headers``), so that the plan can be made with every tensor's offset; the
tensor bytes are read during the merge (``hub.stream``). A source whose shards are all in the HF
cache already, a local source, and a LoRA adapter (small, and loaded whole) resolve as usual.

>>> model = resolve_streamed(ModelEntry(model="org/name"))  # doctest: +SKIP
>>> model.checkpoint().tensors["model.norm.weight"].offset  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_model_stock.errors import CheckpointError, ModelStockError, SourceError
from hf_model_stock.hub.headers import remote_header
from hf_model_stock.hub.listing import RepoListing, download_snapshot, list_revision
from hf_model_stock.hub.ranges import RemoteFile
from hf_model_stock.io.index import INDEX_NAME, SINGLE_NAME, read_weight_map
from hf_model_stock.io.reader import Checkpoint, TensorInfo
from hf_model_stock.recipe import ModelEntry
from hf_model_stock.sources import resolve as sources
from hf_model_stock.sources.adapters import ADAPTER_CONFIG
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
    small = download_snapshot(entry.model, entry.revision, SMALL_FILE_PATTERNS, entry.label)
    listing = list_revision(entry.model, small.name, entry.label)  # the snapshot folder is named by the commit
    if ADAPTER_CONFIG in listing:  # a LoRA adapter: small, loaded whole, so downloaded as usual
        return sources.resolve(entry, allow_pickle=allow_pickle)
    shards = _shards(entry, small, listing)
    if all(listing.cached(s) is not None for s in shards):
        return sources.resolve(entry, allow_pickle=allow_pickle)  # all on disk already: read it there
    files: dict[Path, RemoteFile] = {}
    tensors: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for shard in shards:
        path = small / shard
        files[path] = listing.remote_file(shard)
        found, meta, _ = remote_header(files[path], path)
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
    return StreamedModel(entry=entry, path=small, repo_id=entry.model, commit=listing.commit, files=files,
                         tensors=tensors, metadata=metadata)


def _shards(entry: ModelEntry, small: Path, listing: RepoListing) -> list[str]:
    """The safetensors shards a streamed merge reads: those the index names, else ``model.safetensors``."""
    shards = sources.safetensors_shards(small)
    if shards is None:
        if SINGLE_NAME not in listing:
            raise SourceError(f"{entry.label}: --stream reads safetensors weights only, and the repo has no "
                              f"{SINGLE_NAME} or {INDEX_NAME} (run without --stream to convert pickle weights)")
        return [SINGLE_NAME]
    missing = [s for s in shards if s not in listing]
    if missing:
        raise CheckpointError(f"{entry.label}: {INDEX_NAME} names shard(s) not in the repo: {', '.join(missing)}")
    return shards
