"""Streaming safetensors writer: each shard's header is computed up front from names, dtypes and
shapes, the file is pre-sized, and tensor bytes are written in place with ``pwrite``.

No shard is ever held in memory. Writes normally arrive in file order, so the sha256 of each shard
is computed on the fly; out-of-order writes fall back to hashing the finished file.

In-order bytes go through a small aligned staging buffer and are written with ``O_DIRECT`` where the
filesystem allows it: filling fresh page-cache pages costs far more system time than direct writes
(figures in tests/benchmarks/README.md). The unaligned tail, out-of-order writes and filesystems
without ``O_DIRECT`` (tmpfs) use ordinary buffered writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from hf_model_stock.errors import ModelStockError
from hf_model_stock.io import platform
from hf_model_stock.io.buffers import DIRECT_ALIGN
from hf_model_stock.io.dtypes import itemsize
from hf_model_stock.io.index import INDEX_NAME, SINGLE_NAME

STAGE_BYTES = 16 << 20  # per buffer (two of them); a multiple of DIRECT_ALIGN


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output: its name, safetensors dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


@dataclass
class ShardLayout:
    """One output file: its name, the tensors in file order, and their byte offsets."""

    filename: str
    tensors: list[OutputTensor]
    header: bytes = b""
    offsets: dict[str, int] = field(default_factory=dict)  # absolute offset of each tensor's data

    def __post_init__(self) -> None:
        entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
        pos = 0
        rel: dict[str, int] = {}
        for t in self.tensors:
            entries[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [pos, pos + t.nbytes]}
            rel[t.name] = pos
            pos += t.nbytes
        text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)  # keep the data section 8-byte aligned, as safetensors does
        self.header = len(text).to_bytes(8, "little") + text
        self.offsets = {name: len(self.header) + off for name, off in rel.items()}

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        return len(self.header) + self.data_bytes


def layout_shards(tensors: list[OutputTensor], max_shard_bytes: int) -> list[ShardLayout]:
    """Pack tensors, in the given order, into shards of at most ``max_shard_bytes`` of data each
    (a tensor larger than that gets a shard of its own). Names follow the transformers convention."""
    groups: list[list[OutputTensor]] = []
    size = 0
    for t in tensors:
        if not groups or (size + t.nbytes > max_shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.nbytes
    if len(groups) <= 1:
        return [ShardLayout(SINGLE_NAME, groups[0] if groups else [])]
    n = len(groups)
    return [ShardLayout(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def write_index(directory: Path, shards: list[ShardLayout]) -> None:
    """Write ``model.safetensors.index.json`` for a multi-shard layout (nothing for a single file)."""
    if len(shards) <= 1:
        return
    weight_map = {t.name: s.filename for s in shards for t in s.tensors}
    index = {"metadata": {"total_size": sum(s.data_bytes for s in shards)}, "weight_map": weight_map}
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


class _DirectStage:
    """Collects a contiguous run of bytes from an aligned file offset and writes it with ``O_DIRECT``
    in whole aligned blocks; ``flush`` hands back what is left (the unaligned tail).

    Two buffers: while one full buffer goes to disk on a helper thread, the next one fills.
    """

    def __init__(self, fd: int):
        self._fd = fd
        self._bufs = [mmap.mmap(-1, STAGE_BYTES) for _ in range(2)]  # page-aligned, as O_DIRECT needs
        self._buf = self._bufs[0]
        self._io = ThreadPoolExecutor(1, "hfms-direct-write")
        self._pending: Future[None] | None = None
        self.start = 0  # file offset of the current buffer's first byte (aligned)
        self.used = 0

    @property
    def end(self) -> int:
        return self.start + self.used

    def add(self, data: memoryview) -> None:
        """Append ``data`` (it lands at file offset ``end``), sending each full buffer to disk."""
        done = 0
        while done < len(data):
            n = min(len(data) - done, STAGE_BYTES - self.used)
            self._buf[self.used : self.used + n] = data[done : done + n]
            self.used += n
            done += n
            if self.used == STAGE_BYTES:
                self._wait()
                self._pending = self._io.submit(self._pwrite, self._buf, STAGE_BYTES, self.start)
                self._buf = self._bufs[1] if self._buf is self._bufs[0] else self._bufs[0]
                self.start += STAGE_BYTES
                self.used = 0

    def _pwrite(self, buf: mmap.mmap, length: int, pos: int) -> None:
        with memoryview(buf) as view:
            done = 0
            while done < length:
                done += platform.pwrite(self._fd, view[done:length], pos + done)

    def _wait(self) -> None:
        """Wait for the write in flight (re-raising its error)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def flush(self) -> tuple[int, bytes]:
        """Write every whole block; return the file offset and bytes of the unaligned remainder."""
        self._wait()
        whole = self.used - self.used % DIRECT_ALIGN
        self._pwrite(self._buf, whole, self.start)
        tail = (self.start + whole, self._buf[whole : self.used])
        self.start, self.used = self.start + self.used, 0
        return tail

    def close(self) -> None:
        self._io.shutdown(wait=True)
        for buf in self._bufs:
            buf.close()
        os.close(self._fd)


def _open_direct(path: Path) -> int:
    """A second, ``O_DIRECT`` (macOS: ``F_NOCACHE``) descriptor for ``path``, or -1 where the
    filesystem or the platform refuses it."""
    try:
        return platform.open_uncached(path, write=True)
    except OSError:
        return -1


class ShardWriter:
    """Writes one pre-sized shard in place; ``finish`` returns its sha256."""

    def __init__(self, directory: Path, layout: ShardLayout, fsync: bool = False):
        self.layout = layout
        self._fsync = fsync
        self.path = directory / layout.filename
        self._fd = -1
        self._stage: _DirectStage | None = None
        self._hash = hashlib.sha256()
        self._hashed_upto = 0
        self._in_order = True
        try:
            # not truncated: a resumed merge keeps the tensors already written in a partial shard
            self._fd = platform.open_write(self.path)
            if os.fstat(self._fd).st_size > layout.file_bytes:
                os.ftruncate(self._fd, layout.file_bytes)
            # allocate every block now: a full disk fails here, before any merging, not mid-way
            platform.preallocate(self._fd, layout.file_bytes)
            self._write(self.layout.header, 0)
        except OSError as exc:
            self.abort()
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> ModelStockError:
        return ModelStockError(f"{self.path}: cannot write output ({exc.strerror or exc})")

    def write(self, name: str, start: int, data: memoryview) -> None:
        """Write ``data`` at byte ``start`` within tensor ``name``."""
        try:
            self._write(data, self.layout.offsets[name] + start)
        except OSError as exc:
            raise self._error(exc) from None

    def _write(self, data: memoryview | bytes, pos: int) -> None:
        view = memoryview(data).cast("B")
        if self._in_order and pos == self._hashed_upto:
            # hash and stage one stage-sized piece at a time, so the disk writes the previous piece
            # while this one is hashed
            for off in range(0, len(view), STAGE_BYTES):
                piece = view[off : off + STAGE_BYTES]
                self._hash.update(piece)
                self._hashed_upto += len(piece)
                self._staged(piece, pos + off)
            return
        self._in_order = False
        self._unstage()
        self._pwrite(view, pos)

    def _staged(self, view: memoryview, pos: int) -> None:
        """In-order bytes: through the O_DIRECT stage when there is one, else written directly."""
        if self._stage is None and pos == 0:
            fd = _open_direct(self.path)
            self._stage = _DirectStage(fd) if fd >= 0 else None
        if self._stage is not None and self._stage.end == pos:
            self._stage.add(view)
        else:
            self._pwrite(view, pos)

    def _unstage(self) -> None:
        """Write out what the stage holds and stop staging."""
        if self._stage is not None:
            pos, tail = self._stage.flush()
            self._stage.close()
            self._stage = None
            self._pwrite(memoryview(tail), pos)

    def _pwrite(self, view: memoryview, pos: int) -> None:
        done = 0
        while done < len(view):
            done += platform.pwrite(self._fd, view[done:], pos + done)

    def finish(self) -> str:
        """Close (after flushing to disk if asked to) and return the hex sha256 of the file."""
        try:
            self._unstage()
            if self._fsync:
                os.fsync(self._fd)
        except OSError as exc:
            raise self._error(exc) from None
        finally:
            self.abort()
        if self._in_order and self._hashed_upto == self.layout.file_bytes:
            return self._hash.hexdigest()
        return sha256_file(self.path)

    def abort(self) -> None:
        """Close without finishing (the caller removes the temporary directory, or keeps it for a resume:
        the staged bytes are written out first, as the journal already counts them)."""
        if self._stage is not None:
            try:
                self._unstage()
            except OSError:  # a full disk: the journalled tensors it held fail their CRC and are merged again
                pass
        if self._stage is not None:
            self._stage.close()
            self._stage = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def sha256_file(path: Path, block: int = 16 << 20) -> str:
    """sha256 of a file, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()
