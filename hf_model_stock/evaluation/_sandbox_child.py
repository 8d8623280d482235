"""Runs inside the sandbox subprocess (stdlib only): confine this process, then run ./program.py.

Layers, each best effort except the last two, in this order:
  netns     a new, empty network namespace (unshare; user namespace too when not root)
  landlock  the kernel refuses writes outside the working directory, and TCP bind/connect (ABI >= 4)
  seccomp   the kernel refuses fork, vfork, clone (threads too) and exec (x86-64 and arm64)
  rlimits   CPU seconds, address space, file size (caps stdout/stderr too), open files, no processes
            (RLIMIT_NPROC does not bind root; seccomp does)
  audit     a Python audit hook refusing sockets, process creation, ctypes and writes outside the
            working directory (clear errors; also the only guard where the kernel layers are missing)
The first line written to stderr names the layers in force.
"""

import ctypes
import json
import os
import platform
import resource
import runpy
import sys

MARKER = "hfms-sandbox-layers:"
_CLONE_NEWUSER, _CLONE_NEWNET = 0x10000000, 0x40000000
_PR_SET_NO_NEW_PRIVS = 38
_SYS_LANDLOCK_CREATE_RULESET, _SYS_LANDLOCK_ADD_RULE, _SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER = 22, 2
# machine -> (AUDIT_ARCH_*, syscall numbers of fork, vfork, clone, clone3, execve, execveat)
_SECCOMP_ARCHES = {"x86_64": (0xC000003E, (57, 58, 56, 435, 59, 322)),
                   "aarch64": (0xC00000B7, (220, 435, 221, 281))}
_WRITE_OPEN_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_BLOCKED_PREFIXES = ("socket.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
                     "os.system", "os.kill", "os.killpg", "subprocess.", "pty.")
_PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
                "os.utime": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2, "shutil.rmtree": 1}


def main() -> None:
    limits = json.loads(sys.argv[1])
    work = os.path.realpath(os.getcwd())
    libc = ctypes.CDLL(None, use_errno=True)
    layers = []
    if libc.unshare(_CLONE_NEWNET if os.getuid() == 0 else _CLONE_NEWUSER | _CLONE_NEWNET) == 0:
        layers.append("netns")
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "sandbox: prctl(PR_SET_NO_NEW_PRIVS) failed")
    if _landlock(libc, work):
        layers.append("landlock")
    if _seccomp(libc):
        layers.append("seccomp")
    _rlimits(limits)
    layers.append("rlimits")
    sys.addaudithook(_guard(work))
    layers.append("audit")
    sys.stderr.write(MARKER + ",".join(layers) + "\n")
    sys.stderr.flush()
    sys.argv = ["program.py"]
    runpy.run_path("program.py", run_name="__main__")


def _rlimits(limits: dict) -> None:
    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["output_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def _landlock(libc: ctypes.CDLL, work: str) -> bool:
    """Allow filesystem writes only beneath ``work`` (and no TCP where the kernel supports it)."""
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi < 1:
        return False
    write = sum(1 << bit for bit in (1, 4, 5, 6, 7, 8, 9, 10, 11, 12))  # write file, remove, make *
    write |= (1 << 13 if abi >= 2 else 0) | (1 << 14 if abi >= 3 else 0)  # refer, truncate
    net = 0b11 if abi >= 4 else 0  # bind TCP, connect TCP
    attr = (ctypes.c_uint64 * 2)(write, net)
    ruleset = libc.syscall(_SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr),
                           ctypes.c_size_t(16 if net else 8), ctypes.c_uint32(0))
    if ruleset < 0:
        return False

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    directory = os.open(work, os.O_PATH | os.O_CLOEXEC)
    rule = PathBeneath(write, directory)
    try:
        ok = (libc.syscall(_SYS_LANDLOCK_ADD_RULE, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.byref(rule),
                           ctypes.c_uint32(0)) == 0
              and libc.syscall(_SYS_LANDLOCK_RESTRICT_SELF, ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0)
    finally:
        os.close(directory)
        os.close(ruleset)
    return ok


def _seccomp(libc: ctypes.CDLL) -> bool:
    """Make fork, vfork, clone, clone3, execve and execveat fail with EPERM."""
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
