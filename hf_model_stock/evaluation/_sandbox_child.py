"""Runs inside the sandbox subprocess (stdlib only): confine this process, then run ./program.py.

Layers, in this order (the first three where the kernel offers them):
  netns     a new, empty network namespace (with the user and mount namespaces below when possible)
  mountns   a minimal root: the standard library, system libraries and a few devices read-only, the
            working directory read-write, nothing else (``_sandbox_fs.py``)
  landlock  the kernel allows reads of those same paths only, writes beneath the working directory
            only, no TCP bind/connect (ABI >= 4), no signals out of the sandbox (ABI >= 6)
  seccomp   the kernel refuses new processes and threads, exec, and the calls that could undo the
            namespaces or reach other processes' memory (x86-64 and arm64)
  rlimits   CPU seconds, address space, file size (caps stdout/stderr too), open files, no processes
            (RLIMIT_NPROC does not bind root; seccomp does)
  audit     a Python audit hook refusing sockets, process creation, ctypes and writes outside the
            working directory (clear errors; also the only guard where the kernel layers are missing)
Reads are confined when mountns or landlock is in force. When neither is, the program is not run
(exit status ``REFUSED``) unless the parent allowed unconfined reads; the layers then end with
``reads-unconfined``. Descriptors other than 0-2 are closed first. The first line written to stderr
names the layers in force.
"""

import ctypes
import json
import os
import platform
import resource
import runpy
import sys
from types import ModuleType

MARKER = "hfms-sandbox-layers:"
READ_LAYERS = frozenset({"mountns", "landlock"})
UNCONFINED = "reads-unconfined"
REFUSED = 97  # exit status of a child that refused to run a program it could not confine
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
# machine -> (AUDIT_ARCH_*, syscall numbers denied: fork, vfork, clone, clone3, execve, execveat;
# mount, umount2, pivot_root, chroot, unshare, setns, open_tree, move_mount, fsopen, fsconfig, fsmount,
# fspick, mount_setattr; ptrace, process_vm_readv, process_vm_writev, open_by_handle_at)
_SECCOMP_ARCHES = {"x86_64": (0xC000003E, (57, 58, 56, 435, 59, 322,
                                           165, 166, 155, 161, 272, 308, 428, 429, 430, 431, 432, 433, 442,
                                           101, 310, 311, 304)),
                   "aarch64": (0xC00000B7, (220, 435, 221, 281,
                                            40, 39, 41, 51, 97, 268, 428, 429, 430, 431, 432, 433, 442,
                                            117, 270, 271, 265))}
_WRITE_OPEN_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_BLOCKED_PREFIXES = ("socket.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
                     "os.system", "os.kill", "os.killpg", "subprocess.", "pty.")
_PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
                "os.utime": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2, "shutil.rmtree": 1}


def main() -> None:
    """argv[1]: JSON with ``limits``, ``root`` (an empty directory for the minimal root), ``probe``
    (confine, report, run nothing), ``unconfined_reads`` (run even so) and ``skip`` (layers not to try)."""
    config = json.loads(sys.argv[1])
    _close_inherited_descriptors()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _sandbox_fs  # a sibling; -I leaves the script's directory off sys.path

    del sys.path[0]
    work, skip, machine = os.path.realpath(os.getcwd()), set(config["skip"]), platform.machine()
    libc = ctypes.CDLL(None, use_errno=True)
    layers = _namespaces(libc, _sandbox_fs, mount="mountns" not in skip and machine in ("x86_64", "aarch64"))
    if "mountns" in layers:
        try:
            _sandbox_fs.minimal_root(libc, config["root"], work, machine)
        except OSError:
            layers.remove("mountns")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "sandbox: prctl(PR_SET_NO_NEW_PRIVS) failed")
    if "landlock" not in skip and _sandbox_fs.landlock(libc, work):
        layers.append("landlock")
    if _seccomp(libc):
        layers.append("seccomp")
    _rlimits(config["limits"])
    layers.append("rlimits")
    hidden = set(_sandbox_fs.site_dirs())
    sys.path[:] = [p for p in sys.path if os.path.realpath(p) not in hidden]  # stdlib only, import errors clear
    sys.addaudithook(_guard(work))
    layers.append("audit")
    confined = bool(READ_LAYERS & set(layers))
    if not confined:
        layers.append(UNCONFINED)
    sys.stderr.write(MARKER + ",".join(layers) + "\n")
    sys.stderr.flush()
    if not confined and not config["unconfined_reads"]:
        sys.exit(REFUSED)
    if config["probe"]:
        return
    sys.argv = ["program.py"]
    runpy.run_path("program.py", run_name="__main__")


def _close_inherited_descriptors() -> None:
    """Close every descriptor but stdin, stdout and stderr (the parent closes them too: belt and braces)."""
    os.closerange(3, max(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 16))  # close_range(2) where it exists


def _namespaces(libc: ctypes.CDLL, fs: ModuleType, mount: bool) -> list:
    """Enter new namespaces: user + mount + network (keeping our ids) when ``mount`` and the kernel
    allow, else network alone (root) or user + network; the layers gained ("mountns" still to build)."""
    uid, gid = os.getuid(), os.getgid()
    if mount and libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS | _CLONE_NEWNET) == 0:
        try:
            fs.map_own_ids(uid, gid)
        except OSError:
            return ["netns"]  # ids unmapped: files made in the working directory would fail anyway
        return ["netns", "mountns"]
    if libc.unshare(_CLONE_NEWNET if uid == 0 else _CLONE_NEWUSER | _CLONE_NEWNET) == 0:
        return ["netns"]
    return []


def _rlimits(limits: dict) -> None:
    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["output_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def _seccomp(libc: ctypes.CDLL) -> bool:
    """Make the calls in ``_SECCOMP_ARCHES`` (new processes and threads, exec, mounts and namespaces,
    other processes' memory) fail with EPERM."""
    arch, numbers = _SECCOMP_ARCHES.get(platform.machine(), (None, ()))
    if arch is None:
        return False

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Filter))]

    ld, jeq, jge, ret = 0x20, 0x15, 0x35, 0x06  # BPF_LD|W|ABS, BPF_JMP|JEQ|K, BPF_JMP|JGE|K, BPF_RET|K
    deny, allow = 0x00050000 | 1, 0x7FFF0000  # SECCOMP_RET_ERRNO|EPERM, SECCOMP_RET_ALLOW
    n = len(numbers)
    code = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, deny),  # seccomp_data.arch: other ABIs denied
            (ld, 0, 0, 0), (jge, n + 1, 0, 0x40000000)]  # seccomp_data.nr; x32 numbers denied
    code += [(jeq, n - i, 0, number) for i, number in enumerate(numbers)]
    code += [(ret, 0, 0, allow), (ret, 0, 0, deny)]
    filters = (Filter * len(code))(*[Filter(*op) for op in code])
    program = Program(len(code), filters)
    return libc.prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.byref(program), 0, 0) == 0


def _guard(work: str):
    prefix = work.rstrip(os.sep) + os.sep

    def inside(path: object) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor
        return os.path.realpath(os.fsdecode(path)).startswith(prefix)

    def hook(event: str, args: tuple) -> None:
        if event.startswith(_BLOCKED_PREFIXES):
            raise PermissionError(f"sandbox: {event} is not allowed")
        if event == "open" and (args[2] or 0) & _WRITE_OPEN_FLAGS and not inside(args[0]):
            raise PermissionError(f"sandbox: writing {args[0]!r} outside the working directory is not allowed")
        count = _PATH_EVENTS.get(event)
        if count and not all(inside(path) for path in args[:count]):
            raise PermissionError(f"sandbox: {event} outside the working directory is not allowed")

    return hook


if __name__ == "__main__":
    main()
