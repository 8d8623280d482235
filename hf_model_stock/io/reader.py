"""Lazy, header-driven access to tensors spread over safetensors shards.

Only headers are parsed up front; parsing fails closed: any header that is not exactly what the
safetensors specification allows raises ``CheckpointError`` naming the file. Tensor bytes are
reached later in one of three ways, chosen per file when it is first read:

- a shard mostly in the page cache is mapped (``map_cached``), and the merge reads its pages where
  they are: no copy at all (copying cached pages into buffers costs far more CPU than touching them
  through a mapping). The pages a unit used are dropped from the mapping (``release``) once it is
  merged, so resident memory stays bounded by the units in flight, as with buffers;
- a shard mostly not in the cache is read with ``O_DIRECT`` (macOS: ``F_NOCACHE``) into
  caller-owned buffers, bypassing the cache: a merge reads each input once, so caching it only costs memory and the system time of
  filling the page cache;
- otherwise (tmpfs, no ``O_DIRECT``), ``pread`` into those buffers (``io.platform`` gives the
  portable equivalents of these calls on macOS and Windows).

A mapped shard must not be truncated while it is read (the process would get SIGBUS); shards in
the Hugging Face cache are immutable blobs.
"""

from __future__ import annotations

import ctypes
import errno
import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hf_model_stock.errors import CheckpointError
from hf_model_stock.io import platform
from hf_model_stock.io.buffers import DIRECT_ALIGN
from hf_model_stock.io.dtypes import SAFETENSORS_DTYPES, itemsize
from hf_model_stock.io.index import INDEX_NAME, SINGLE_NAME, read_weight_map, shard_name

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library's own limit
DIRECT_PIECE = 16 << 20  # bytes per direct read (the bounce buffer)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, dtype code and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    offset: int
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def check_header_length(where: str, header_len: int, file_size: int | None) -> None:
    """Refuse a header length over the limit or past the end of the file (when its size is known)."""
    if header_len > MAX_HEADER_BYTES:
        raise CheckpointError(f"{where}: header claims {header_len} bytes, more than the {MAX_HEADER_BYTES} allowed")
    if file_size is not None and 8 + header_len > file_size:
        raise CheckpointError(f"{where}: header length {header_len} runs past the end of the file ({file_size} bytes)")


def parse_header(
    where: str, raw: bytes, data_size: int | None
) -> tuple[dict[str, tuple[int, int, str, tuple[int, ...]]], dict[str, str]]:
    """Validate a safetensors header (the JSON after the length prefix): every tensor's
    (begin, end, dtype, shape) relative to the data section, and ``__metadata__``. Offsets must lie
    within ``data_size`` (when known) and must not overlap."""
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_reject_duplicate_keys)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{where}: malformed safetensors header JSON ({exc})") from None
    except RecursionError:
        raise CheckpointError(f"{where}: malformed safetensors header JSON (nested too deeply)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{where}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise CheckpointError(f"{where}: __metadata__ must map strings to strings")
    entries = {}
    for name, entry in header.items():
        begin, end, dtype, shape = _validate_entry(where, name, entry)
        if data_size is not None and end > data_size:
            raise CheckpointError(
                f"{where}: tensor {name!r} data_offsets [{begin}, {end}] lie beyond the data section "
                f"({data_size} bytes)"
            )
        entries[name] = (begin, end, dtype, shape)
    spans = sorted((b, e, n) for n, (b, e, _, _) in entries.items() if e > b)
    for (_, prev_end, prev_name), (begin, _, name) in zip(spans, spans[1:]):
        if begin < prev_end:
            raise CheckpointError(f"{where}: tensors {prev_name!r} and {name!r} overlap")
    return entries, metadata


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate the header of one ``.safetensors`` file.

    Returns the tensors (with absolute offsets) and the ``__metadata__`` dict.

    >>> tensors, metadata = read_header(Path("model.safetensors"))  # doctest: +SKIP
    """
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({file_size} bytes, no header)")
            (header_len,) = struct.unpack("<Q", prefix)
            check_header_length(str(path), header_len, file_size)
            raw = fh.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    data_start = 8 + header_len
    entries, metadata = parse_header(str(path), raw, file_size - data_start)
    tensors = {
        name: TensorInfo(name, dtype, shape, path, data_start + begin, end - begin)
        for name, (begin, end, dtype, shape) in entries.items()
    }
    return tensors, metadata


def _validate_entry(where: str, name: str, entry: Any) -> tuple[int, int, str, tuple[int, ...]]:
    where = f"{where}: tensor {name!r}"
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise CheckpointError(f"{where}: header entry must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, got {offsets!r}")
    expected = math.prod(shape) * itemsize(dtype)
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"{where}: data_offsets span {offsets[1] - offsets[0]} bytes but dtype {dtype} and shape "
            f"{shape} need {expected}"
        )
    return offsets[0], offsets[1], dtype, tuple(shape)


def _shard_path(root: Path, index_path: Path, name: Any) -> Path:
    """Resolve a shard named by an index, refusing anything that escapes the model directory."""
    path = root / shard_name(index_path, name)
    if not path.is_file():
        raise CheckpointError(f"{index_path}: shard {name!r} is missing")
    resolved, real_root = path.resolve(), root.resolve()
    # A Hugging Face cache snapshot links its files to ../../blobs of the same repo: that is allowed.
    allowed = [real_root, (root / ".." / ".." / "blobs").resolve()]
    if not any(resolved.is_relative_to(a) for a in allowed):
        raise CheckpointError(f"{index_path}: shard {name!r} is a link that escapes the model directory")
    return path


class Checkpoint:
    """All tensors of one model directory (single file or sharded with an index), headers only.

    >>> ckpt = Checkpoint.open(Path("my-model"))  # doctest: +SKIP
    >>> ckpt.tensors["model.embed_tokens.weight"].shape  # doctest: +SKIP
    (32000, 4096)
    """

    def __init__(self, root: Path, tensors: dict[str, TensorInfo], metadata: dict[str, str]):
        self.root = root
        self.tensors = tensors
        self.metadata = metadata

    @property
    def files(self) -> list[Path]:
        return sorted({t.path for t in self.tensors.values()})

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @classmethod
    def open(cls, root: Path) -> Checkpoint:
        """Read the headers of a model directory or a single ``.safetensors`` file."""
        root = Path(root)
        if root.is_file():
            tensors, metadata = read_header(root)
            return cls(root.parent, tensors, metadata)
        if not root.is_dir():
            raise CheckpointError(f"{root}: no such model directory")
        index_path = root / INDEX_NAME
        if index_path.is_file():
            return cls._open_indexed(root, index_path)
        single = root / SINGLE_NAME
        if single.is_file():
            tensors, metadata = read_header(single)
            return cls(root, tensors, metadata)
        found = sorted(p.name for p in root.iterdir() if p.suffix in {".bin", ".pt", ".pth"})
        hint = f" (found pickle weights {', '.join(found)}; they are not read)" if found else ""
        raise CheckpointError(f"{root}: no {SINGLE_NAME} or {INDEX_NAME}{hint}")

    @classmethod
    def _open_indexed(cls, root: Path, index_path: Path) -> Checkpoint:
        weight_map = read_weight_map(index_path)
        by_file: dict[Path, list[str]] = {}
        paths: dict[str, Path] = {}  # each shard is resolved once, not once per tensor
        for name, shard in weight_map.items():
            path = paths.get(shard) if isinstance(shard, str) else None
            if path is None:
                path = paths[shard] = _shard_path(root, index_path, shard)  # raises for a non-string
            by_file.setdefault(path, []).append(name)
        tensors: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        for path, names in by_file.items():
            found, meta = read_header(path)
            metadata.update(meta)
            for name in names:
                if name not in found:
                    raise CheckpointError(f"{index_path}: tensor {name!r} is not in shard {path.name}")
                tensors[name] = found[name]
        return cls(root, tensors, metadata)


def _load_mincore() -> Any:
    libc = platform.load_libc()
    return libc if libc is not None and hasattr(libc, "mincore") and hasattr(mmap, "PROT_READ") else None


_libc = _load_mincore()


def cached_fraction(fd: int) -> float:
    """The fraction of a file's pages in the page cache (``mincore`` on a mapping that is never
    touched); 1.0 where that cannot be told, so that the file is read through the cache."""
    size = os.fstat(fd).st_size
    if size == 0 or _libc is None:
        return 1.0
    resident = np.zeros(-(-size // mmap.PAGESIZE), np.uint8)
    try:
        mapped = mmap.mmap(fd, size, prot=mmap.PROT_READ)
    except (OSError, ValueError):
        return 1.0
    try:
        address = np.frombuffer(mapped, np.uint8).ctypes.data
        rc = _libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), ctypes.c_void_p(resident.ctypes.data))
    finally:
        mapped.close()
    return float(np.count_nonzero(resident & 1)) / resident.size if rc == 0 else 1.0


class ShardFiles:
    """Reads tensor bytes from shard files, keeping one descriptor (and mapping) per file until ``close``.

    With ``map_cached``, ``mapped`` gives a view of a tensor's bytes in a private, read-only-in-practice
    mapping of a file that is mostly in the page cache (``mincore``, checked when the file is first
    read); ``release`` drops a view's pages from the mapping. With ``direct``, a file that is mostly
    not in the cache is read (``read_into``) with ``O_DIRECT``: straight into a destination on the
    file's block grid, else in aligned pieces through a bounce buffer; other files, and filesystems
    without ``O_DIRECT`` (tmpfs), get ordinary reads. One reader thread per instance (one bounce
    buffer); ``release`` may be called from any thread.
    """

    def __init__(self, direct: bool = True, map_cached: bool = False) -> None:
        self._fds: dict[Path, int] = {}
        self._direct_fds: dict[Path, int] = {}  # -1: read this file through the page cache
        self._direct = direct and platform.has_uncached_io()
        self._map_cached = map_cached
        self._maps: dict[Path, mmap.mmap | None] = {}  # None: this file is read, not mapped
        self._bounce: mmap.mmap | None = None

    def mapped(self, info: TensorInfo, start: int, nbytes: int, align: int) -> np.ndarray | None:
        """``nbytes`` of ``info`` from ``start`` bytes into the tensor, as a uint8 view of the file's
        mapping; None where the file is not mapped or the bytes do not start on ``align`` (the caller
        reads them instead). The view must not be written to."""
        mapping = self._mapping(info.path)
        pos = info.offset + start
        if mapping is None or nbytes == 0 or pos % align or pos + nbytes > len(mapping):
            return None
        return np.frombuffer(mapping, np.uint8, nbytes, pos)

    def release(self, path: Path, view: np.ndarray) -> None:
        """Drop the pages of a view from ``mapped`` (of the file at ``path``) out of the mapping; they
        stay in the page cache, and the view stays readable (from the file) should anything read it."""
        mapping = self._maps.get(path)
        if mapping is None or view.nbytes == 0:
            return
        offset = view.ctypes.data - np.frombuffer(mapping, np.uint8, 1).ctypes.data
        first = offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(len(mapping), -(-(offset + view.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
        platform.drop_pages(mapping, first, end - first)

    def _mapping(self, path: Path) -> mmap.mmap | None:
        if path not in self._maps:
            mapping = None
            if self._map_cached and self._direct_fd(path) < 0:
                try:
                    mapping = mmap.mmap(self._fd(path), 0, access=mmap.ACCESS_COPY)
                except (OSError, ValueError):  # an empty file, or a filesystem that cannot map
                    pass
            self._maps[path] = mapping
        return self._maps[path]

    def read_into(self, info: TensorInfo, start: int, dest: memoryview, keep_cached: bool = False) -> None:
        """Read ``len(dest)`` bytes of ``info`` starting ``start`` bytes into the tensor; through the page
        cache, whatever the file, with ``keep_cached`` (bytes that will be read again soon)."""
        pos, done = info.offset + start, 0
        if not keep_cached and self._direct_fd(info.path) >= 0:
            done = self._read_direct(info, pos, dest)
        self._read_buffered(info, pos + done, dest[done:])

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = platform.open_read(path)
        return fd

    def _direct_fd(self, path: Path) -> int:
        fd = self._direct_fds.get(path)
        if fd is None:
            fd = -1
            if self._direct and cached_fraction(self._fd(path)) < 0.5:
                try:
                    fd = platform.open_uncached(path)
                except OSError:
                    pass
            self._direct_fds[path] = fd
        return fd

    def reads_direct(self, path: Path) -> bool:
        """Whether ``read_into`` reads this file with ``O_DIRECT`` (it is mostly not in the page cache)."""
        return self._direct_fd(path) >= 0

    def _read_direct(self, info: TensorInfo, pos: int, dest: memoryview) -> int:
        """Read the range with O_DIRECT; the number of bytes read (short where the file ends early or
        refuses the alignment: the caller goes on). Where ``dest`` lies on the file's block grid (its
        address and the file offset agree modulo the block), whole blocks go straight into it in one
        request; the rest goes through the bounce buffer."""
        head = -pos % DIRECT_ALIGN
        middle = (len(dest) - head) // DIRECT_ALIGN * DIRECT_ALIGN if len(dest) > head else 0
        if not middle or (np.frombuffer(dest, np.uint8).ctypes.data + head) % DIRECT_ALIGN:
            return self._read_bounced(info, pos, dest)
        done = self._read_bounced(info, pos, dest[:head]) if head else 0
        while head <= done < head + middle:
            n = self._pread_direct(info, dest[done : head + middle], pos + done)
            if not n:
                return done
            done += n
        return done + self._read_bounced(info, pos + done, dest[done:])

    def _pread_direct(self, info: TensorInfo, dest: memoryview, offset: int) -> int:
        """One aligned O_DIRECT ``preadv``; 0 at the end of the file, or where the device refuses the
        alignment (the file is read through the page cache from then on)."""
        try:
            return platform.pread_into(self._direct_fds[info.path], dest, offset)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            os.close(self._direct_fds[info.path])
            self._direct_fds[info.path] = -1
            return 0

    def _read_bounced(self, info: TensorInfo, pos: int, dest: memoryview) -> int:
        """``_read_direct`` through the bounce buffer, in aligned pieces."""
        if self._bounce is None:
            self._bounce = mmap.mmap(-1, DIRECT_PIECE)  # page-aligned
        done = 0
        with memoryview(self._bounce) as bounce:
            while done < len(dest) and self._direct_fds[info.path] >= 0:
                head = (pos + done) % DIRECT_ALIGN
                span = min(DIRECT_PIECE, -(-(head + len(dest) - done) // DIRECT_ALIGN) * DIRECT_ALIGN)
                got = min(self._pread_direct(info, bounce[:span], pos + done - head) - head, len(dest) - done)
                if got <= 0:
                    break
                dest[done : done + got] = bounce[head : head + got]
                done += got
        return done

    def _read_buffered(self, info: TensorInfo, pos: int, dest: memoryview) -> None:
        fd, done = self._fd(info.path), 0
        while done < len(dest):
            n = platform.pread_into(fd, dest[done:], pos + done)
            if n <= 0:
                raise CheckpointError(f"{info.path}: unexpected end of file reading tensor {info.name!r}")
            done += n

    def close(self) -> None:
        for mapping in self._maps.values():
            if mapping is not None:
                try:
                    mapping.close()
                except BufferError:  # views still alive (an interrupted merge): unmapped when they go
                    pass
        self._maps.clear()
        for fd in [*self._fds.values(), *self._direct_fds.values()]:
            if fd >= 0:
                os.close(fd)
        self._fds.clear()
        self._direct_fds.clear()
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None

    def __enter__(self) -> ShardFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
