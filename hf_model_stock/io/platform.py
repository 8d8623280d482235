"""Portable stand-ins for the Linux-only and POSIX-only calls of the merge's I/O.

Each function uses the fast call where the platform has it and an equivalent portable one where it
does not (macOS, Windows), so the same bytes come out everywhere:

- positional reads and writes: ``os.preadv``/``os.pread``/``os.pwrite``, else a seek and a plain read
  or write under one lock (Windows has no positional I/O on descriptors);
- pre-sizing an output file: ``os.posix_fallocate``, else ``os.ftruncate`` (the blocks are then not
  reserved up front: a full disk shows when the bytes are written);
- reads and writes that bypass the page cache: ``O_DIRECT`` (Linux), ``F_NOCACHE`` (macOS), else none;
- dropping a mapping's pages: ``mmap.madvise(MADV_DONTNEED)``, else nothing (the pages stay mapped
  until the mapping closes; they are clean, so the system can still reclaim them);
- libc (``mincore``) and OpenSSL's libcrypto through ctypes, or None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
import threading
from pathlib import Path
from typing import Any

BINARY = getattr(os, "O_BINARY", 0)  # Windows: no newline translation on descriptors
_SEEK_LOCK = threading.Lock()  # the fallbacks below seek: one positional call at a time


def open_read(path: Path | str) -> int:
    """A read-only descriptor, in binary mode."""
    return os.open(path, os.O_RDONLY | BINARY)


def open_write(path: Path | str, create: bool = True) -> int:
    """A write-only descriptor (created 0o644 with ``create``, never truncated), in binary mode."""
    return os.open(path, os.O_WRONLY | BINARY | (os.O_CREAT if create else 0), 0o644)


def has_uncached_io() -> bool:
    """Whether the platform can read and write around the page cache (``O_DIRECT`` or ``F_NOCACHE``)."""
    return hasattr(os, "O_DIRECT") or _F_NOCACHE is not None


def _nocache_flag() -> int | None:
    if sys.platform != "darwin":
        return None
    try:
        import fcntl
    except ImportError:
        return None
    return int(getattr(fcntl, "F_NOCACHE", 48))  # 48: F_NOCACHE in <sys/fcntl.h> on macOS


_F_NOCACHE = _nocache_flag()


def open_uncached(path: Path | str, write: bool = False) -> int:
    """A descriptor whose reads (or writes) bypass the page cache: ``O_DIRECT`` (offset, length and
    buffer address must then be block-aligned), or ``F_NOCACHE`` on macOS. Raises ``OSError`` where
    the filesystem refuses it or the platform has neither."""
    flags = (os.O_WRONLY if write else os.O_RDONLY) | BINARY
    direct = getattr(os, "O_DIRECT", 0)
    if direct:
        return os.open(path, flags | direct)
    if _F_NOCACHE is None:
        raise OSError(0, "no uncached I/O on this platform")
    import fcntl

    fd = os.open(path, flags)
    try:
        fcntl.fcntl(fd, _F_NOCACHE, 1)
    except OSError:
        os.close(fd)
        raise
    return fd


def pread_into(fd: int, dest: memoryview, offset: int) -> int:
    """Read into ``dest`` from file offset ``offset``; the number of bytes read (0 at the end)."""
    if hasattr(os, "preadv"):
        return os.preadv(fd, [dest], offset)
    if hasattr(os, "pread"):
        data = os.pread(fd, len(dest), offset)
    else:
        with _SEEK_LOCK:
            os.lseek(fd, offset, os.SEEK_SET)
            data = os.read(fd, len(dest))
    dest[: len(data)] = data
    return len(data)


def pread(fd: int, n: int, offset: int) -> bytes:
    """Up to ``n`` bytes from file offset ``offset`` (fewer at the end of the file)."""
    if hasattr(os, "pread"):
        return os.pread(fd, n, offset)
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, n)


def pwrite(fd: int, data: memoryview | bytes, offset: int) -> int:
    """Write ``data`` at file offset ``offset``; the number of bytes written (may be short)."""
    if hasattr(os, "pwrite"):
        return os.pwrite(fd, data, offset)
    with _SEEK_LOCK:
        os.lseek(fd, offset, os.SEEK_SET)
        return os.write(fd, data)


def preallocate(fd: int, size: int) -> None:
    """Make the file ``size`` bytes long with its blocks allocated where the platform can
    (``posix_fallocate``); elsewhere it is extended to ``size`` (``ftruncate``), never shrunk."""
    if hasattr(os, "posix_fallocate"):
        os.posix_fallocate(fd, 0, size)
    elif os.fstat(fd).st_size < size:
        os.ftruncate(fd, size)


def drop_pages(mapping: mmap.mmap, start: int, length: int) -> None:
    """Drop ``length`` bytes of pages from ``start`` (page-aligned) out of a mapping, where the
    platform can (``madvise(MADV_DONTNEED)``); a no-op elsewhere."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is not None and hasattr(mapping, "madvise") and length > 0:
        mapping.madvise(advice, start, length)


def cpu_count() -> int:
    """The CPUs this process may run on (its affinity mask where the platform has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def load_libc() -> Any:
    """The C library through ctypes, or None (Windows, or no such library)."""
    if sys.platform == "win32":
        return None
    try:
        return ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):
        return None


def load_libcrypto() -> Any:
    """OpenSSL's libcrypto through ctypes, or None. On macOS the unversioned system libcrypto is never
    loaded: the system aborts any process that loads it."""
    name = ctypes.util.find_library("crypto")
    if not name or (sys.platform == "darwin" and os.path.basename(name) == "libcrypto.dylib"
                    and name.startswith("/usr/lib")):
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None
