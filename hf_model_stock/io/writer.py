"""Streaming safetensors writer: each shard's header is computed up front from names, dtypes and
shapes, the file is pre-sized, and tensor bytes are written in place with ``pwrite``.

No shard is ever held in memory. Writes normally arrive in file order, so the sha256 of each shard
is computed on the fly; out-of-order writes fall back to hashing the finished file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from hf_model_stock.errors import ModelStockError
from hf_model_stock.io.dtypes import itemsize
from hf_model_stock.io.reader import INDEX_NAME, SINGLE_NAME


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


class ShardWriter:
    """Writes one pre-sized shard in place; ``finish`` returns its sha256."""

    def __init__(self, directory: Path, layout: ShardLayout, fsync: bool = False):
        self.layout = layout
        self._fsync = fsync
        self.path = directory / layout.filename
        self._fd = -1
        self._hash = hashlib.sha256()
        self._hashed_upto = 0
        self._in_order = True
        try:
            # not truncated: a resumed merge keeps the tensors already written in a partial shard
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o644)
            if os.fstat(self._fd).st_size > layout.file_bytes:
                os.ftruncate(self._fd, layout.file_bytes)
            self._pwrite(self.layout.header, 0)
            # allocate every block now: a full disk fails here, before any merging, not mid-way
            os.posix_fallocate(self._fd, 0, layout.file_bytes)
        except OSError as exc:
            self.abort()
            raise self._error(exc) from None

    def _error(self, exc: OSError) -> ModelStockError:
        return ModelStockError(f"{self.path}: cannot write output ({exc.strerror or exc})")

    def write(self, name: str, start: int, data: memoryview) -> None:
        """Write ``data`` at byte ``start`` within tensor ``name``."""
        try:
            self._pwrite(data, self.layout.offsets[name] + start)
        except OSError as exc:
            raise self._error(exc) from None

    def _pwrite(self, data: memoryview | bytes, pos: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], pos + done)
        if self._in_order and pos == self._hashed_upto:
            self._hash.update(view)
            self._hashed_upto += len(view)
        else:
            self._in_order = False

    def finish(self) -> str:
        """Close (after flushing to disk if asked to) and return the hex sha256 of the file."""
        try:
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
        """Close without finishing (the caller removes the temporary directory)."""
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
