"""Removing what a sandboxed program left behind, however deep or odd, without recursion and without
raising (where the mount namespace gives the program a tmpfs, it leaves nothing here: this is for the
Landlock-only case and the sandbox's own files)."""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Iterator

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str) -> bool:
    """Remove the directory ``path`` and all beneath it; whether it is gone. Each subdirectory's entries
    are moved up into ``path`` before the subdirectory is removed, so that at most two directories are
    open at once and no path grows long: a 3000-deep tree is flattened, not walked."""
    try:
        top = os.open(path, _DIR_FLAGS)
    except OSError:
        return not os.path.lexists(path)
    names = (f".hfms-{i}" for i in itertools.count())
    try:
        while _flatten_once(top, names):
            pass
    except OSError:
        pass
    finally:
        os.close(top)
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


def _flatten_once(top: int, names: Iterator[str]) -> bool:
    """One pass over ``top``: files unlinked, each subdirectory emptied into ``top`` and removed.
    Whether anything was there."""
    entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in os.scandir(top)]
    for name, is_dir in entries:
        if not is_dir:
            os.unlink(name, dir_fd=top)
            continue
        os.chmod(name, stat.S_IRWXU, dir_fd=top, follow_symlinks=False)  # a program may have chmod-ed it 000
        sub = os.open(name, _DIR_FLAGS, dir_fd=top)
        try:
            for inner in [e.name for e in os.scandir(sub)]:
                _move_up(sub, inner, top, names)
        finally:
            os.close(sub)
        os.rmdir(name, dir_fd=top)
    return bool(entries)


def _move_up(sub: int, name: str, top: int, names: Iterator[str]) -> None:
    while True:
        target = next(names)
        try:
            os.stat(target, dir_fd=top, follow_symlinks=False)
        except FileNotFoundError:
            os.rename(name, target, src_dir_fd=sub, dst_dir_fd=top)
            return
