"""Run an untrusted Python program: one subprocess per program, a fresh temporary working directory,
CPU/memory/output/process limits, no network, no writes outside that directory.

The confinement itself happens in the child (``_sandbox_child.py``, which lists the layers); this
side starts it with a clean environment, enforces the wall-clock timeout on its whole process group,
and reads back capped output.

>>> run_program("assert sum([1, 2]) == 3").status  # doctest: +SKIP
'passed'
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from hf_model_stock.evaluation._sandbox_child import MARKER
from hf_model_stock.evaluation.errors import EvalError

CHILD = Path(__file__).with_name("_sandbox_child.py")
Status = Literal["passed", "failed", "timeout", "output_limit"]
_CPU_SIGNALS = (-signal.SIGXCPU, -signal.SIGKILL)  # soft, then hard RLIMIT_CPU


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
    if not sys.platform.startswith("linux"):
        raise EvalError("mbpp: the code sandbox needs Linux (namespaces, Landlock, seccomp, rlimits)")
    with tempfile.TemporaryDirectory(prefix="hfms-sandbox-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        (work / "program.py").write_text(source, encoding="utf-8")
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with out_path.open("wb") as out, err_path.open("wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-B", str(CHILD), json.dumps(asdict(limits))],
                cwd=work, stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                start_new_session=True, env={"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work),
                                             "LANG": "C.UTF-8"},
            )
            try:
                returncode: int | None = proc.wait(timeout=limits.timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # not yet reaped, so the id is still ours
                proc.wait()
                returncode = None
        stdout, stderr = _read(out_path), _read(err_path)
        capped = max(out_path.stat().st_size, err_path.stat().st_size) >= limits.output_bytes
    layers: tuple[str, ...] = ()
    if stderr.startswith(MARKER):
        first, _, stderr = stderr.partition("\n")
        layers = tuple(first[len(MARKER):].split(","))
    return ExecResult(_status(returncode, capped), returncode, stdout, stderr, layers)


def _status(returncode: int | None, capped: bool) -> Status:
    if returncode is None or returncode in _CPU_SIGNALS:
        return "timeout"
    if capped:
        return "output_limit"
    return "passed" if returncode == 0 else "failed"


def _read(path: Path, limit: int = 8192) -> str:
    with path.open("rb") as fh:
        return fh.read(limit).decode("utf-8", errors="replace")
