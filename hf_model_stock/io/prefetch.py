"""Ask the kernel to start reading the input shards before anything else is ready.

A cold merge otherwise spends its first seconds importing torch with the disk idle. Called with the
command line's model directories before the heavy imports; it imports nothing but the standard
library and gives hints only (``posix_fadvise(WILLNEED)``), so it can never change a result.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Iterable

STEP = 64 << 20  # bytes of each file per hint, taking the files in turn as the merge reads them


def _available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 where unknown)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def shard_files(dirs: Iterable[str | Path]) -> list[Path]:
    """The ``.safetensors`` files of those arguments that are local directories or files."""
    files: list[Path] = []
    for d in map(Path, dirs):
        if d.is_file() and d.suffix == ".safetensors":
            files.append(d)
        elif d.is_dir():
            files.extend(sorted(d.glob("*.safetensors")))
    return files


def _advise(files: list[Path], budget: int) -> None:
    fds = []
    try:
        for f in files:
            fds.append((os.open(f, os.O_RDONLY), os.stat(f).st_size))
        longest = max((size for _, size in fds), default=0)
        for offset in range(0, longest, STEP):
            for fd, size in fds:
                if offset < size and budget > 0:
                    os.posix_fadvise(fd, offset, STEP, os.POSIX_FADV_WILLNEED)
                    budget -= min(STEP, size - offset)
    except OSError:
        pass  # only a hint
    finally:
        for fd, _ in fds:
            os.close(fd)


def start(dirs: Iterable[str | Path]) -> None:
    """Hint the kernel to read the shards of ``dirs`` (interleaved, up to half the available memory)
    from a background thread; does nothing where ``posix_fadvise`` is missing."""
    if not hasattr(os, "posix_fadvise"):
        return
    files = shard_files(dirs)
    if files:
        threading.Thread(target=_advise, args=(files, _available_memory() // 2), name="hfms-prefetch",
                         daemon=True).start()
