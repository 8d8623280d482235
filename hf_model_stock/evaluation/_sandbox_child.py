"""Runs as the sandbox subprocess (stdlib only): confine, then run ./program.py in a process of its own.

Two processes. The helper (this script's first process) enters the namespaces, builds the minimal
root, applies Landlock, then forks the program process and reports to the evaluator on a descriptor
only it holds: the layers in force, then how the program process ended. The program process (pid 1 of
its own PID namespace, in a session of its own) adds the remaining layers, reports them to the helper
on a pipe it closes before running any of the program's code, runs the program, and then answers the
evaluator's requests (evaluate this leaf of a test, run this statement) on a pair of pipes. stdout and
stderr are logs only.

Layers, in this order (the first ones where the kernel offers them):
  netns     a new, empty network namespace (with the namespaces below when possible), and IPC
  mountns   a minimal root: the standard library, system libraries and a few devices read-only, the
            working directory a tmpfs of ``work_bytes`` bytes and ``work_inodes`` inodes, nothing else
            (``_sandbox_fs.py``)
  pidns     a new PID namespace: the program sees no other process (and ``kill(-1)`` reaches none)
  landlock  the kernel allows reads of those same paths only, writes beneath the working directory
            only, no TCP bind/connect (ABI >= 4), no signals out of the sandbox (ABI >= 6)
  keyring   a fresh, empty session keyring (and seccomp refuses the key calls)
  nocaps    no capabilities left, not even in the sandbox's own user namespace
  seccomp   the kernel refuses what ``_sandbox_seccomp.py`` lists (x86-64 and arm64)
  rlimits   CPU seconds, address space, file size (caps stdout/stderr too), open files, no processes
  audit     a Python audit hook refusing sockets, process creation, ctypes and writes outside the
            working directory (clear errors; also the only guard where the kernel layers are missing)
Reads are confined when mountns or landlock is in force. When neither is, the program is not run
(exit status ``REFUSED``) unless the evaluator allowed unconfined reads; the layers then end with
``reads-unconfined``. Descriptors other than 0-2 and the channel are closed first.
"""

import ctypes
import importlib
import json
import os
import platform
import select
import signal
import sys
import traceback
import types
from collections.abc import Callable

READ_LAYERS = frozenset({"mountns", "landlock"})
UNCONFINED = "reads-unconfined"
REFUSED = 97  # exit status of a program process that refused to run a program it could not confine
_CLONE_NEWNS, _CLONE_NEWUSER, _CLONE_NEWNET = 0x00020000, 0x10000000, 0x40000000
_CLONE_NEWPID, _CLONE_NEWIPC = 0x20000000, 0x08000000
_PR_SET_NO_NEW_PRIVS, _PR_SET_PDEATHSIG = 38, 1
_KEYCTL_JOIN_SESSION_KEYRING = 1
_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219}
_SYS_CAPSET = {"x86_64": 126, "aarch64": 91}
_WRITE_OPEN_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_BLOCKED_PREFIXES = ("socket.", "ctypes.", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
                     "os.system", "os.kill", "os.killpg", "subprocess.", "pty.")
_PATH_EVENTS = {"os.remove": 1, "os.rmdir": 1, "os.mkdir": 1, "os.chmod": 1, "os.chown": 1, "os.truncate": 1,
                "os.utime": 1, "os.rename": 2, "os.link": 2, "os.symlink": 2, "shutil.rmtree": 1}
_MAX_REQUEST = 1 << 20


def main() -> None:
    """argv[1]: JSON with ``limits``, ``root`` (an empty directory for the minimal root), ``fds``
    (report, request, reply), ``probe`` (confine, report, run nothing), ``unconfined_reads`` (run even
    so) and ``skip`` (layers not to try)."""
    config = json.loads(sys.argv[1])
    report, request, reply = config["fds"]
    _close_inherited_descriptors(keep=(report, request, reply))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    # siblings, loaded by name: -I leaves the script's directory off sys.path
    _sandbox_fs, _sandbox_seccomp, _sandbox_wire = (
        importlib.import_module(name) for name in ("_sandbox_fs", "_sandbox_seccomp", "_sandbox_wire"))

    del sys.path[0]
    work, skip, machine = os.path.realpath(os.getcwd()), set(config["skip"]), platform.machine()
    limits = config["limits"]
    source = None if config["probe"] else _read_program()
    libc = ctypes.CDLL(None, use_errno=True)
    layers = _namespaces(libc, _sandbox_fs, mount="mountns" not in skip and machine in ("x86_64", "aarch64"),
                         pid="pidns" not in skip)
    if "mountns" in layers:
        try:
            _sandbox_fs.minimal_root(libc, config["root"], work, machine, limits["work_bytes"], limits["work_inodes"])
        except OSError:
            layers.remove("mountns")
    if source is not None and "mountns" in layers:
        with open("program.py", "w", encoding="utf-8") as fh:  # into the fresh tmpfs
            fh.write(source)
    if libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "sandbox: prctl(PR_SET_NO_NEW_PRIVS) failed")
    if "landlock" not in skip and _sandbox_fs.landlock(libc, work):
        layers.append("landlock")
    inner, outer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the program process
        os.close(inner)
        os.close(report)
        status = 1
        try:
            status = _program_process(libc, config, layers, outer, request, reply, work, source, _sandbox_seccomp,
                                      _sandbox_wire)
        except BaseException:
            traceback.print_exc()
        finally:
            _flush()
            os._exit(status)  # no interpreter shutdown: atexit and finalizers come too late to matter
    os.close(outer)
    os.close(request)
    os.close(reply)
    _helper(pid, inner, report, float(limits["timeout_s"]))


def _read_program() -> str | None:
    try:
        with open("program.py", encoding="utf-8") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _helper(pid: int, inner: int, report: int, timeout_s: float) -> None:
    """Forward the program process's layers, then wait for it (at most ``timeout_s``) and report how it
    ended: ``{"exit": status}``, ``{"signal": number}`` or ``{"timeout": true}``."""
    chunks = []
    while chunk := os.read(inner, 65536):
        chunks.append(chunk)
    os.close(inner)
    layers = b"".join(chunks).decode() or "null"
    os.write(report, b'{"layers": ' + layers.encode() + b"}\n")
    pidfd = os.pidfd_open(pid)
    ended: dict = {"timeout": True}
    if select.select([pidfd], [], [], timeout_s)[0]:
        status = os.waitpid(pid, 0)[1]
        ended = {"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status) else {"exit": os.WEXITSTATUS(status)}
    else:
        os.kill(pid, signal.SIGKILL)  # not yet reaped: still ours
        os.waitpid(pid, 0)
    os.write(report, json.dumps(ended).encode() + b"\n")


def _program_process(libc: ctypes.CDLL, config: dict, layers: list, outer: int, request: int, reply: int,
                     work: str, source: str | None, seccomp: types.ModuleType, wire: types.ModuleType) -> int:
    """Finish confining this process, report the layers to the helper, run the program, serve requests;
    the exit status."""
    os.setsid()  # kill(0, ...) and killpg reach this process only
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # dies with the helper, whoever kills it
    if os.getpid() == 1:
        layers.append("pidns")
    machine = platform.machine()
    libc.syscall.restype = ctypes.c_long
    skip = set(config["skip"])
    keyctl = _SYS_KEYCTL.get(machine)
    if "keyring" not in skip and keyctl and libc.syscall(keyctl, _KEYCTL_JOIN_SESSION_KEYRING, None) >= 0:
        layers.append("keyring")
    if "nocaps" not in skip and machine in _SYS_CAPSET and _drop_capabilities(libc, _SYS_CAPSET[machine]):
        layers.append("nocaps")
    if "seccomp" not in skip and seccomp.install(libc):
        layers.append("seccomp")
    _rlimits(config["limits"])
    layers.append("rlimits")
    hidden = set(sys.modules["_sandbox_fs"].site_dirs())
    sys.path[:] = [p for p in sys.path if os.path.realpath(p) not in hidden]  # stdlib only, import errors clear
    sys.addaudithook(_guard(work))
    layers.append("audit")
    confined = bool(READ_LAYERS & set(layers))
    if not confined:
        layers.append(UNCONFINED)
    os.write(outer, json.dumps(layers).encode())
    os.close(outer)
    if not confined and not config["unconfined_reads"]:
        return REFUSED
    if config["probe"] or source is None:
        return 0
    return _run(source, request, reply, wire)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()  # type: ignore[union-attr]
        except BaseException:
            pass


def _run(source: str, request: int, reply: int, wire: types.ModuleType) -> int:
    """Run the program as ``__main__``; say ``{"ran": true}`` or ``{"error": ...}``; then answer each
    request line (``{"eval": source}`` or ``{"exec": source}``) with ``{"value": ...}`` or
    ``{"raised": ...}`` until the evaluator closes the request pipe; the exit status."""
    module = types.ModuleType("__main__")
    module.__file__ = "program.py"
    sys.modules["__main__"] = module
    sys.argv = ["program.py"]
    try:
        exec(compile(source, "program.py", "exec"), module.__dict__)
    except BaseException as error:  # SystemExit too: a program that exits has not run its tests
        traceback.print_exc()
        _send(reply, {"error": _describe(error)})
        return 1
    _send(reply, {"ran": True})
    buffer = b""
    while True:
        while b"\n" not in buffer and len(buffer) < _MAX_REQUEST:
            chunk = os.read(request, 65536)
            if not chunk:
                return 0
            buffer += chunk
        line, _, buffer = buffer.partition(b"\n")
        message = json.loads(line)
        try:
            if "eval" in message:
                answer = {"value": wire.encode(eval(compile(message["eval"], "<test>", "eval"), module.__dict__))}
            else:
                exec(compile(message["exec"], "<test>", "exec"), module.__dict__)
                answer = {"value": ["none"]}
        except BaseException as error:
            answer = {"raised": _describe(error)}
        _send(reply, answer)


def _describe(error: BaseException) -> str:
    try:
        text = "".join(traceback.format_exception_only(type(error), error)).strip()
    except BaseException:
        text = type(error).__name__
    return text[:500]


def _send(fd: int, message: dict) -> None:
    data = json.dumps(message).encode() + b"\n"
    while data:
        data = data[os.write(fd, data):]


def _close_inherited_descriptors(keep: tuple) -> None:
    """Close every descriptor but stdin, stdout, stderr and ``keep`` (the parent closes them too)."""
    import resource  # here, not at the top: the evaluator imports this module on any platform

    top = max(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 1 << 16)
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, top)


def _namespaces(libc: ctypes.CDLL, fs: types.ModuleType, mount: bool, pid: bool) -> list:
    """Enter new namespaces: user + mount + network + PID + IPC (keeping our ids) when ``mount`` and the
    kernel allow, else network + PID + IPC (root) or those with a user namespace; the layers gained
    ("mountns" still to build; "pidns" is reported by the program process, pid 1 of the new one)."""
    uid, gid = os.getuid(), os.getgid()
    rest = _CLONE_NEWNET | _CLONE_NEWIPC | (_CLONE_NEWPID if pid else 0)
    if mount and libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS | rest) == 0:
        try:
            fs.map_own_ids(uid, gid)
        except OSError:
            return ["netns"]  # ids unmapped: files made in the working directory would fail anyway
        return ["netns", "mountns"]
    for flags in (rest if uid == 0 else _CLONE_NEWUSER | rest, _CLONE_NEWNET if uid == 0 else _CLONE_NEWUSER | _CLONE_NEWNET):
        if libc.unshare(flags) == 0:
            return ["netns"]
    return []


def _drop_capabilities(libc: ctypes.CDLL, number: int) -> bool:
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable: all empty, twice (64 bits)
    return libc.syscall(ctypes.c_long(number), ctypes.byref(header), ctypes.byref(data)) == 0


def _rlimits(limits: dict) -> None:
    import resource

    cpu = int(limits["cpu_s"])
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_AS, (limits["memory_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limits["output_bytes"],) * 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (limits["open_files"],) * 2)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def _guard(work: str) -> Callable[[str, tuple], None]:
    prefix = work.rstrip(os.sep) + os.sep

    def inside(path: object) -> bool:
        if isinstance(path, int):
            return True  # an already-open descriptor
        return os.path.realpath(os.fsdecode(path)).startswith(prefix)  # type: ignore[arg-type]

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
