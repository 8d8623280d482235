"""Removing what a sandboxed program left behind, however deep or odd, without recursion and without
raising (where the mount namespace gives the program a tmpfs, it leaves nothing here: this is for the
Landlock-only case and the sandbox's own files)."""

from __future__ import annotations

import os
import stat

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_tree(path: str) -> bool:
    """Remove the directory ``path`` and all beneath it; whether it is gone. A depth-first walk that
    holds one directory open at a time and climbs back through ``..`` of its descriptor, remembering
    names only: no recursion, no long paths, so a 3000-deep tree is no harder than a flat one."""
    try:
        here = os.open(path, _DIR_FLAGS)
    except OSError:
        return not os.path.lexists(path)
    below: list[str] = []  # the names from path down to here
    try:
        while True:
            sub = _clear_files(here)
            if sub is not None:
                os.chmod(sub, stat.S_IRWXU, dir_fd=here, follow_symlinks=False)  # a program may have made it 000
                deeper = os.open(sub, _DIR_FLAGS, dir_fd=here)
                os.close(here)
                here = deeper
                below.append(sub)
                continue
            if not below:
                break
            parent = os.open("..", _DIR_FLAGS, dir_fd=here)
            os.close(here)
            here = parent
            os.rmdir(below.pop(), dir_fd=here)
    except OSError:
        pass
    finally:
        os.close(here)
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


def _clear_files(fd: int) -> str | None:
    """Unlink every non-directory in ``fd``; the name of one subdirectory left, if any."""
    sub = None
    with os.scandir(fd) as entries:
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                sub = entry.name
            else:
                os.unlink(entry.name, dir_fd=fd)
    return sub
