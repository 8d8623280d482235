"""The executor's shard reader for a plan with streamed Hub sources (``--stream``).

Declares to ``hub.stream_files.RemoteShardFiles`` what the merge will read of each remote shard (every
input of every task still to merge, twice for a tensor merged in two passes), so that each shard is
fetched once, in order, and its bytes kept only while a second read needs them. Plans without a
streamed source get the plain ``ShardFiles``.
"""

from __future__ import annotations

from pathlib import Path

from hf_model_stock.hub.stream_files import RemoteShardFiles
from hf_model_stock.hub.stream_state import STREAM_STATE_NAME
from hf_model_stock.io.reader import ShardFiles
from hf_model_stock.merge.plan import MergePlan
from hf_model_stock.sources.remote import remote_files


def read_regions(plan: MergePlan, paths: set[Path]) -> dict[Path, list[tuple[int, int, int]]]:
    """(offset, nbytes, times read) of every input byte range the plan reads from ``paths``."""
    regions: dict[Path, list[tuple[int, int, int]]] = {}
    for task in plan.tasks:
        reads = 2 if task.two_pass else 1
        for info in task.inputs if task.merge else task.inputs[:1]:
            if info.path in paths:
                regions.setdefault(info.path, []).append((info.offset, info.nbytes, reads))
    return regions


def open_shard_files(plan: MergePlan, directory: Path, *, map_cached: bool, progress: bool = False) -> ShardFiles:
    """The reader for ``plan``'s inputs: streamed shards over HTTP (hash state kept in ``directory``
    for a resume), the others from disk."""
    remote = remote_files([plan.base, *plan.models])
    if not remote:
        return ShardFiles(map_cached=map_cached)
    return RemoteShardFiles(remote, read_regions(plan, set(remote)), state_path=directory / STREAM_STATE_NAME,
                            progress=progress, map_cached=map_cached)
