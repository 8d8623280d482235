"""Run an untrusted Python program: one subprocess per program, a fresh temporary working directory,
CPU/memory/output/process limits, no network, no writes outside that directory, and no reads outside
it except the standard library, the system libraries and a few devices.

The confinement itself happens in the child (``_sandbox_child.py``, which lists the layers); this
side starts it with a clean environment and no inherited descriptors, enforces the wall-clock timeout
on its whole process group, and reads back capped output. Where the kernel can confine reads neither
with a mount namespace nor with Landlock, ``run_program`` refuses (``EvalError``) unless
``HF_MODEL_STOCK_UNCONFINED_READS=1`` is set.

>>> run_program("assert sum([1, 2]) == 3").status  # doctest: +SKIP
'passed'
"""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from hf_model_stock.evaluation._sandbox_child import MARKER, READ_LAYERS
from hf_model_stock.evaluation.errors import EvalError

CHILD = Path(__file__).with_name("_sandbox_child.py")
Status = Literal["passed", "failed", "timeout", "output_limit"]
_CPU_SIGNALS = (-signal.SIGXCPU, -signal.SIGKILL)  # soft, then hard RLIMIT_CPU
UNCONFINED_READS_ENV = "HF_MODEL_STOCK_UNCONFINED_READS"


@dataclass(frozen=True)
class Limits:
    """Per-program limits."""

    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10
    memory_bytes: int = 1 << 30  # address space
    output_bytes: int = 1 << 20  # stdout, stderr and any file the program writes, each
    open_files: int = 64


@dataclass(frozen=True)
class ExecResult:
    """What happened to one program."""

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    layers: tuple[str, ...]  # isolation layers the child put in place


def run_program(source: str, limits: Limits = Limits()) -> ExecResult:
    """Run ``source`` as ``program.py`` in the sandbox; "passed" means it exited with status 0."""
    allow = unconfined_reads_allowed()
    if not allow and not READ_LAYERS & set(available_layers()):
        raise EvalError(refusal())
    result = _spawn(source, limits, allow_unconfined_reads=allow)
    if not allow and not READ_LAYERS & set(result.layers):
        raise EvalError(refusal())  # the child found less than the probe did, and did not run it
    return result


def unconfined_reads_allowed() -> bool:
    """Whether the user allowed programs to run where their reads cannot be confined."""
    return os.environ.get(UNCONFINED_READS_ENV) == "1"


def refusal() -> str:
    """The one-line reason ``run_program`` gives where it cannot confine reads."""
    return ("mbpp: the code sandbox cannot confine reads on this machine (the kernel allows neither "
            "Landlock nor user+mount namespaces here), so a generated program could read your files and "
            f"tokens; set {UNCONFINED_READS_ENV}=1 to run it anyway")


@functools.cache
def available_layers() -> tuple[str, ...]:
    """The layers a sandboxed child gets on this machine: one probe child per process, then cached."""
    return _spawn(None, Limits(), allow_unconfined_reads=True).layers


def _spawn(source: str | None, limits: Limits, *, allow_unconfined_reads: bool,
           skip: Sequence[str] = ()) -> ExecResult:
    """Start the child on ``source`` (``None``: confine and report the layers only). ``skip`` names
    layers not to try (tests use it to check each read layer on its own)."""
    if not sys.platform.startswith("linux"):
        raise EvalError("mbpp: the code sandbox needs Linux (namespaces, Landlock, seccomp, rlimits)")
    with tempfile.TemporaryDirectory(prefix="hfms-sandbox-") as tmp:
        work, root = Path(tmp) / "work", Path(tmp) / "root"
        work.mkdir()
        root.mkdir()
        if source is not None:
            (work / "program.py").write_text(source, encoding="utf-8")
        config = {"limits": asdict(limits), "root": str(root), "probe": source is None,
                  "unconfined_reads": allow_unconfined_reads, "skip": list(skip)}
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", str(CHILD), json.dumps(config)],
                cwd=work, stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True, pass_fds=(),
                start_new_session=True, env={"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work),
                                             "LANG": "C.UTF-8"},
            )
            returncode = _wait(proc, limits.timeout_s)
        stdout, stderr = _read(out_path), _read(err_path)
        capped = max(out_path.stat().st_size, err_path.stat().st_size) >= limits.output_bytes
    if not stderr.startswith(MARKER):
        last = stderr.strip().splitlines()[-1:] or [f"exit status {returncode}"]
        raise EvalError(f"mbpp: the code sandbox failed before running the program: {last[0]}")
    first, _, stderr = stderr.partition("\n")
    layers = tuple(first[len(MARKER):].split(","))
    return ExecResult(_status(returncode, capped), returncode, stdout, stderr, layers)


def _wait(proc: subprocess.Popen, timeout_s: float) -> int | None:
    """The exit status, or None after killing the process group at the deadline. A pidfd wakes us the
    moment the child exits (``Popen.wait(timeout)`` polls, up to 50 ms late per program)."""
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):  # before Linux 5.3
        pidfd = None
    try:
        if pidfd is None:
            return proc.wait(timeout=timeout_s)
        if select.select([pidfd], [], [], timeout_s)[0]:
            return proc.wait()
    except subprocess.TimeoutExpired:
        pass
    finally:
        if pidfd is not None:
            os.close(pidfd)
    os.killpg(proc.pid, signal.SIGKILL)  # not yet reaped, so the id is still ours
    proc.wait()
    return None


def _status(returncode: int | None, capped: bool) -> Status:
    if returncode is None or returncode in _CPU_SIGNALS:
        return "timeout"
    if capped:
        return "output_limit"
    return "passed" if returncode == 0 else "failed"


def _read(path: Path, limit: int = 8192) -> str:
    with path.open("rb") as fh:
        return fh.read(limit).decode("utf-8", errors="replace")
