"""``ShardFiles`` whose Hub shards are streamed (``--stream``): each declared remote shard is a
``RemoteShard`` on one shared pool of fetch threads, with a draining thread that keeps the connections
busy while the merge reads from the spill, and a progress bar of the bytes fetched."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from hf_model_stock.hub import stream
from hf_model_stock.hub.ranges import RemoteFile
from hf_model_stock.hub.stream import PieceBuffers, RemoteShard
from hf_model_stock.hub.stream_state import StreamState
from hf_model_stock.io.reader import ShardFiles, TensorInfo


class RemoteShardFiles(ShardFiles):
    """``ShardFiles`` where the shards in ``remote`` (local path standing for the file -> the file)
    are streamed over HTTP; every other path is read from disk as usual. ``regions`` declares what the
    merge will read of each remote file: (offset, nbytes, times read)."""

    def __init__(self, remote: dict[Path, RemoteFile], regions: dict[Path, list[tuple[int, int, int]]], *,
                 state_path: Path | None = None, spill_dir: Path | None = None, progress: bool = False,
                 direct: bool = True, map_cached: bool = False):
        super().__init__(direct=direct, map_cached=map_cached)
        self._remote = remote
        self._regions = regions
        self._shards: dict[Path, RemoteShard] = {}
        self._state = StreamState(state_path)
        self._spill_dir = spill_dir
        active = sum(1 for p in remote if regions.get(p))
        self._pool = ThreadPoolExecutor(max(2, min(32, stream.WINDOW * max(1, active))), thread_name_prefix="hfms-fetch")
        self._fetched = 0
        self._count_lock = threading.Lock()
        self._buffers = PieceBuffers(keep=stream.WINDOW * max(1, active) + 2)
        self._stop = threading.Event()
        self._drainer = threading.Thread(target=self._drain, name="hfms-drain", daemon=True)
        self._drainer.start()
        self._bar: Any = None
        if progress:
            from tqdm.auto import tqdm

            total = sum(remote[p].size for p in remote if regions.get(p))
            self._bar = tqdm(total=total, unit="B", unit_scale=True, desc="fetched", position=1, leave=False)

    @property
    def fetched_bytes(self) -> int:
        return self._fetched

    def _count(self, n: int) -> None:
        with self._count_lock:
            self._fetched += n
        if self._bar is not None:
            self._bar.update(n)

    def _drain(self) -> None:
        """Keep the connections busy while the reads pause (``RemoteShard.drain``)."""
        while not self._stop.wait(0.01):
            try:
                while any([s.drain() for s in list(self._shards.values())]):
                    if self._stop.is_set():
                        return
            except Exception:  # noqa: BLE001 - a read that needs the failed piece raises it
                pass

    def _shard(self, path: Path) -> RemoteShard:
        shard = self._shards.get(path)
        if shard is None:
            shard = self._shards[path] = RemoteShard(self._remote[path], self._pool, self._regions.get(path, []),
                                                     state=self._state, spill_dir=self._spill_dir, count=self._count,
                                                     buffers=self._buffers)
        return shard

    def mapped(self, info: TensorInfo, start: int, nbytes: int, align: int) -> np.ndarray | None:
        return None if info.path in self._remote else super().mapped(info, start, nbytes, align)

    def reads_direct(self, path: Path) -> bool:
        return False if path in self._remote else super().reads_direct(path)

    def read_into(self, info: TensorInfo, start: int, dest: memoryview, keep_cached: bool = False) -> None:
        if info.path in self._remote:
            self._shard(info.path).read(info.offset + start, dest)
        else:
            super().read_into(info, start, dest, keep_cached)

    def interrupt(self) -> None:
        """The merge stopped: reads waiting for the network give up, fetches stop (any thread)."""
        self._stop.set()
        for shard in list(self._shards.values()):
            shard.cancel()

    @property
    def complete(self) -> bool:
        """Every remote file the merge reads from has been read, hashed and checked."""
        return all(p in self._shards and self._shards[p].finished for p in self._remote if self._regions.get(p))

    def close(self) -> None:
        self._stop.set()
        self._drainer.join()
        for shard in self._shards.values():
            shard.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._state.close(remove=self.complete)
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        super().close()
