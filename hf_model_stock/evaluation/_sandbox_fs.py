"""Filesystem confinement for the sandbox child (stdlib only; ``_sandbox_child.py`` loads it before it
confines itself). Two independent ways to keep a program's reads to what it needs:

  mountns   a new user and mount namespace whose root is an empty tmpfs holding read-only binds of
            the standard library (its site-packages covered by an empty tmpfs), the system library
            directories, /etc/ld.so.cache and /dev/{null,zero,random,urandom}, and at the working
            directory's usual path a fresh tmpfs limited in bytes and inodes (the program's only
            writable place; it vanishes with the namespace): no /proc, /home, /tmp, /etc, HF cache or project
  landlock  the kernel allows reads of those same paths (site-packages left out) and of the working
            directory only, and writes beneath the working directory only; with ABI >= 4 no TCP
            bind/connect, with ABI >= 6 no signals to processes outside the sandbox

Each is an allowlist; either alone keeps a program from reading the user's files.
"""

import ctypes
import os
import site
import sysconfig
from collections.abc import Callable

SYSTEM_LIBRARIES = ("/lib", "/lib64", "/usr/lib", "/usr/lib64")  # what extension modules dlopen
FILES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/etc/ld.so.cache")

_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
# statvfs flag -> mount flag, for the flags a read-only remount must keep (the kernel locks them)
_KEPT_FLAGS = {os.ST_NOSUID: _MS_NOSUID, os.ST_NODEV: _MS_NODEV, os.ST_NOEXEC: 8, os.ST_NOATIME: 1024,
               os.ST_NODIRATIME: 2048, os.ST_RELATIME: 1 << 21}
_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_EXECUTE, _READ_FILE, _READ_DIR = 1 << 0, 1 << 2, 1 << 3
_FILE_RIGHTS = _EXECUTE | 1 << 1 | _READ_FILE | 1 << 14  # the rights a rule on a non-directory may hold


def stdlib_dirs() -> list[str]:
    """The standard library's directories (lib-dynload lies inside them)."""
    paths = {sysconfig.get_path("stdlib"), sysconfig.get_path("platstdlib")}
    return sorted(p for p in paths if p and os.path.isdir(p))


def site_dirs() -> list[str]:
    """The site-packages directories, real paths: not visible to programs (MBPP needs the stdlib only)."""
    paths = set(site.getsitepackages()) | {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    return sorted({os.path.realpath(p) for p in paths if p and os.path.isdir(p)})


# --- mount namespace ----------------------------------------------------------------------------------


def map_own_ids(uid: int, gid: int) -> None:
    """In a fresh user namespace, keep our own uid and gid (else files would show as nobody's)."""
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as fh:
            fh.write(text)


def minimal_root(libc: ctypes.CDLL, new_root: str, work: str, machine: str, work_bytes: int, work_inodes: int) -> None:
    """Make an empty directory ``new_root`` this process's ``/`` holding only what a program needs
    (see the module docstring), then ``chdir(work)``. Needs a private mount namespace in which we hold
    CAP_SYS_ADMIN; raises OSError on any failure, and only a clean return means it is confined."""
    call = _checked(libc)
    call("mount", libc.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None))
    call("mount tmpfs", libc.mount(b"tmpfs", new_root.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV,
                                   b"mode=0755,size=1m"))
    bound: list[str] = []
    for path in [*SYSTEM_LIBRARIES, *stdlib_dirs(), *FILES]:
        if not os.path.exists(path):
            continue
        _recreate_links(new_root, path)
        real = os.path.realpath(path)
        if any(real == b or real.startswith(b.rstrip("/") + "/") for b in bound):
            continue
        _bind(libc, real, new_root + real)
        bound.append(real)
    _recreate_links(new_root, work)
    os.makedirs(new_root + work, exist_ok=True)
    options = f"mode=0700,size={work_bytes},nr_inodes={work_inodes}".encode()
    call("mount the work tmpfs", libc.mount(b"tmpfs", (new_root + work).encode(), b"tmpfs",
                                            _MS_NOSUID | _MS_NODEV, options))
    for hidden in site_dirs():
        if os.path.isdir(new_root + hidden):
            call("mount tmpfs", libc.mount(b"tmpfs", (new_root + hidden).encode(), b"tmpfs",
                                           _MS_RDONLY | _MS_NOSUID | _MS_NODEV, b"size=4k"))
    old = new_root + "/.old"
    os.mkdir(old)
    libc.syscall.restype = ctypes.c_long
    call("pivot_root", libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT[machine]), new_root.encode(), old.encode()))
    os.chdir("/")
    call("umount old root", libc.umount2(b"/.old", 2))  # MNT_DETACH
    os.rmdir("/.old")
    call("remount / read-only", libc.mount(None, b"/", None,
                                          _MS_REMOUNT | _MS_BIND | _MS_RDONLY | _MS_NOSUID | _MS_NODEV, None))
    os.chdir(work)


def _checked(libc: ctypes.CDLL) -> Callable[[str, int], None]:
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]

    def call(what: str, result: int) -> None:
        if result != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"sandbox: {what}: {os.strerror(errno)}")

    return call


def _recreate_links(new_root: str, path: str) -> None:
    """Recreate under ``new_root`` each symlink met while resolving ``path`` (e.g. /lib -> usr/lib),
    so that the path resolves inside the new root as it does outside."""
    done = "/"
    for part in path.strip("/").split("/"):
        here = os.path.join(done, part)
        if not os.path.islink(here):
            done = here
            continue
        os.makedirs(new_root + done, exist_ok=True)
        if not os.path.lexists(new_root + here):
            os.symlink(os.readlink(here), new_root + here)
        done = os.path.realpath(here)
        _recreate_links(new_root, done)


def _bind(libc: ctypes.CDLL, source: str, target: str) -> None:
    """Bind ``source`` read-only at ``target``."""
    call = _checked(libc)
    if os.path.isdir(source):
        os.makedirs(target, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()
    call(f"bind {source}", libc.mount(source.encode(), target.encode(), None, _MS_BIND | _MS_REC, None))
    flags = os.statvfs(source).f_flag
    kept = sum(ms for st, ms in _KEPT_FLAGS.items() if flags & st)
    call(f"remount {source} read-only",
         libc.mount(None, target.encode(), None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | kept, None))


# --- Landlock -----------------------------------------------------------------------------------------


def landlock(libc: ctypes.CDLL, work: str) -> bool:
    """Restrict this process (and the program) with Landlock as the module docstring says; False where
    the kernel has no Landlock or refuses the ruleset."""
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return False
    read = _EXECUTE | _READ_FILE | _READ_DIR
    write = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write file, remove, make *
    write |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # refer, truncate
    net = 0b11 if abi >= 4 else 0  # bind TCP, connect TCP
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets, signals
    attr = (ctypes.c_uint64 * 3)(read | write, net, scoped)
    size = 24 if scoped else 16 if net else 8
    ruleset = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), ctypes.c_size_t(size),
                           ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    try:
        rules = [(work, read | write), *_read_rules(read)]
        return (all(_add_rule(libc, ruleset, path, access) for path, access in rules)
                and libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0)
    finally:
        os.close(ruleset)


def _read_rules(read: int) -> list[tuple[str, int]]:
    """(path, access) read rules: system libraries and files whole; of each stdlib directory, a listing
    right on the directory and full read on each entry except site-packages."""
    rules = [(path, read) for path in (*SYSTEM_LIBRARIES, *FILES) if os.path.exists(path)]
    hidden = set(site_dirs())
    for stdlib in stdlib_dirs():
        rules.append((stdlib, _READ_DIR))
        with os.scandir(stdlib) as entries:
            rules += [(entry.path, read) for entry in entries if os.path.realpath(entry.path) not in hidden]
    return rules


def _add_rule(libc: ctypes.CDLL, ruleset: int, path: str, access: int) -> bool:
    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return True  # gone since it was listed (a dangling symlink, say): nothing to allow
    try:
        if not os.path.isdir(path):
            access &= _FILE_RIGHTS
        rule = PathBeneath(access, fd)
        return libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule),
                            ctypes.c_uint32(0)) == 0
    finally:
        os.close(fd)
