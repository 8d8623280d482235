"""Run an untrusted Python program: one subprocess per program, a fresh working directory (a small
tmpfs where the kernel allows), CPU/memory/output/disk/process limits, no network, no other process in
sight, no writes outside that directory, and no reads outside it except the standard library, the
system libraries and a few devices.

The confinement itself happens in the child (``_sandbox_child.py``, which lists the layers); this
side starts it with a clean environment and no inherited descriptors but its channel, enforces the
wall-clock timeout, and decides the verdict. The child's helper reports the layers and how the program
ended on a pipe the program never holds; the program's own answers come on another pipe; stdout and
stderr are logs only. Given ``tests`` (trusted assert lines, e.g. MBPP's), "passed" means each assert
held as decided here (``_sandbox_verdict``) on values the program computed; whatever the program
prints, exits with or fakes, a test it did not answer fails. Where the kernel can confine reads neither
with a mount namespace nor with Landlock, ``run_program`` refuses (``EvalError``) unless
``HF_MODEL_STOCK_UNCONFINED_READS=1`` is set.

>>> run_program("def add(a, b):\\n    return a + b", tests=["assert add(2, 3) == 5"]).status  # doctest: +SKIP
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
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from hf_model_stock.evaluation import _sandbox_verdict, _sandbox_wire
from hf_model_stock.evaluation._sandbox_child import READ_LAYERS
from hf_model_stock.evaluation._sandbox_disk import remove_tree
from hf_model_stock.evaluation.errors import EvalError

CHILD = Path(__file__).with_name("_sandbox_child.py")
Status = Literal["passed", "failed", "timeout", "output_limit"]
# soft, then hard RLIMIT_CPU (getattr: this module imports on Windows too, where run_program refuses)
_CPU_SIGNALS = tuple(getattr(signal, name) for name in ("SIGXCPU", "SIGKILL") if hasattr(signal, name))
UNCONFINED_READS_ENV = "HF_MODEL_STOCK_UNCONFINED_READS"
MAX_ANSWER = 4 << 20  # bytes of one answer of the program's (a leaf's value)


@dataclass(frozen=True)
class Limits:
    """Per-program limits."""

    timeout_s: float = 10.0  # wall clock
    cpu_s: int = 10
    memory_bytes: int = 1 << 30  # address space
    output_bytes: int = 1 << 20  # stdout, stderr and any file the program writes, each
    open_files: int = 64
    work_bytes: int = 32 << 20  # the working directory's tmpfs, all files together
    work_inodes: int = 1024


@dataclass(frozen=True)
class ExecResult:
    """What happened to one program; ``reason`` says why it did not pass."""

    status: Status
    returncode: int | None  # the program process's exit status, -N for signal N, None if cut off
    stdout: str
    stderr: str
    layers: tuple[str, ...]  # isolation layers the child put in place
    reason: str = ""


def run_program(source: str, limits: Limits = Limits(), tests: Sequence[str] = ()) -> ExecResult:
    """Run ``source`` as ``program.py`` in the sandbox, then decide each of ``tests`` (assert lines from
    the benchmark, trusted) on values it computes. "passed": the program ran to its end without an
    exception and every test held. Never raises for anything the program does."""
    allow = unconfined_reads_allowed()
    if not allow and not READ_LAYERS & set(available_layers()):
        raise EvalError(refusal())
    result = _spawn(source, limits, allow_unconfined_reads=allow, tests=tests)
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


def _spawn(source: str | None, limits: Limits, *, allow_unconfined_reads: bool, skip: Sequence[str] = (),
           tests: Sequence[str] = ()) -> ExecResult:
    """Start the child on ``source`` (``None``: confine and report the layers only). ``skip`` names
    layers not to try (tests use it to check each layer on its own)."""
    if not sys.platform.startswith("linux"):
        raise EvalError("mbpp: the code sandbox needs Linux (namespaces, Landlock, seccomp, rlimits)")
    try:
        steps = _sandbox_verdict.plan_tests(tests)
    except SyntaxError as error:
        steps, unparsable = [], f"a test line does not parse: {error.msg}"
    except _sandbox_verdict.UndecidableTest as error:
        raise EvalError(f"mbpp: {error}") from None
    else:
        unparsable = ""
    with _workspace() as tmp:
        work, root = tmp / "work", tmp / "root"
        work.mkdir()
        root.mkdir()
        if source is not None:
            (work / "program.py").write_text(source, encoding="utf-8")
        out_path, err_path = tmp / "stdout", tmp / "stderr"
        with _Channel() as channel, out_path.open("wb") as out, err_path.open("wb") as err:
            config = {"limits": asdict(limits), "root": str(root), "probe": source is None,
                      "unconfined_reads": allow_unconfined_reads, "skip": list(skip), "fds": channel.child_fds}
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-B", str(CHILD), json.dumps(config)],
                cwd=work, stdin=subprocess.DEVNULL, stdout=out, stderr=err, close_fds=True,
                pass_fds=channel.child_fds, start_new_session=True,
                env={"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8"},
            )
            channel.started()
            try:
                session = _Session(channel, time.monotonic() + limits.timeout_s)
                verdict = session.run(steps, unparsable, probe=source is None)
            finally:
                _stop(proc)
        stdout, stderr = _read(out_path), _read(err_path)
        capped = max(out_path.stat().st_size, err_path.stat().st_size) >= limits.output_bytes
    if session.layers is None:
        last = stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
        raise EvalError(f"mbpp: the code sandbox failed before running the program: {last[0]}")
    status, reason = verdict
    if status == "failed" and capped:
        status, reason = "output_limit", f"output past {limits.output_bytes} bytes"
    return ExecResult(status, session.returncode, stdout, stderr, session.layers, reason)


class _Channel:
    """The three pipes: the helper's report, requests to the program, the program's answers."""

    def __init__(self) -> None:
        self.report, report_w = os.pipe()
        request_r, self.request = os.pipe()
        self.answers, answers_w = os.pipe()
        self.child_fds: tuple[int, ...] = (report_w, request_r, answers_w)

    def started(self) -> None:
        """The child holds its ends now: close ours, so that its death reads as end of file."""
        for fd in self.child_fds:
            os.close(fd)
        self.child_fds = ()

    def __enter__(self) -> _Channel:
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in (self.report, self.request, self.answers, *self.child_fds):
            try:
                os.close(fd)
            except OSError:
                pass


class _Session:
    """One conversation with the child: its report, the program's start, each test, the end."""

    def __init__(self, channel: _Channel, deadline: float) -> None:
        self.channel, self.deadline = channel, deadline
        self.report, self.answers = _Lines(channel.report), _Lines(channel.answers)
        self.layers: tuple[str, ...] | None = None
        self.returncode: int | None = None

    def run(self, steps: list[_sandbox_verdict.Step], unparsable: str, probe: bool) -> tuple[Status, str]:
        """(status, reason) of the program; ``layers`` and ``returncode`` as the helper reported them."""
        layers = self._report_line(self.deadline + 1.0)
        if not isinstance(layers, dict) or not isinstance(layers.get("layers"), list):
            return "failed", "the sandbox did not report its layers"
        self.layers = tuple(str(layer) for layer in layers["layers"])
        if probe:
            self._ended()
            return "passed", ""
        verdict = self._tests(steps, unparsable)
        os.close(self.channel.request)  # the program process ends its loop and exits
        self.channel.request = -1
        ended = self._ended()
        if verdict[0] == "passed" or ended is None:
            return verdict
        if ended == "timeout" or (self.returncode is not None and -self.returncode in _CPU_SIGNALS):
            return "timeout", f"the program ran past its time limit ({verdict[1]})"
        return verdict

    def _tests(self, steps: list[_sandbox_verdict.Step], unparsable: str) -> tuple[Status, str]:
        started = self._answer()
        if started is None:
            return "failed", "the program ended before its tests ran"
        if started.get("ran") is not True:
            if isinstance(started.get("error"), str):
                return "failed", f"the program raised {started['error']}"
            return "failed", "the program's channel held something other than its start"
        if unparsable:
            return "failed", unparsable
        for step in steps:
            try:
                if step.statement is not None:
                    self._leaf({"exec": step.statement})
                elif not _sandbox_verdict.decide(step, lambda leaf: self._leaf({"eval": leaf})):
                    return "failed", f"failed: {step.line}"
            except _sandbox_verdict.LeafError as error:
                return "failed", f"{step.line}: {error}"
            except Exception as error:  # the skeleton on the program's values (a TypeError, say)
                return "failed", f"{step.line}: {type(error).__name__}: {error}"
        return "passed", ""

    def _leaf(self, request: dict) -> Any:
        if not _write_all(self.channel.request, json.dumps(request).encode() + b"\n", self.deadline):
            raise _sandbox_verdict.LeafError("the program stopped reading its tests")
        answer = self._answer()
        if answer is None:
            raise _sandbox_verdict.LeafError("the program ended without an answer")
        if isinstance(answer.get("raised"), str):
            raise _sandbox_verdict.LeafError(f"raised {answer['raised']}")
        try:
            return _sandbox_wire.decode(answer["value"])
        except (KeyError, ValueError, RecursionError) as error:
            raise _sandbox_verdict.LeafError("the program's answer was malformed") from error

    def _answer(self) -> dict | None:
        """The program's next message, or None where it sent nothing (in time) or nothing readable."""
        line = self.answers.next(self.deadline, MAX_ANSWER)
        try:
            message = json.loads(line) if line is not None else None
        except (ValueError, RecursionError):
            return None
        return message if isinstance(message, dict) else None

    def _report_line(self, deadline: float) -> Any:
        line = self.report.next(deadline, 1 << 16)
        try:
            return json.loads(line) if line is not None else None
        except ValueError:
            return None

    def _ended(self) -> str | None:
        """How the program process ended, from the helper: "exit", "signal", "timeout" (None: unknown,
        e.g. it had not ended half a second after its verdict; the caller then kills it)."""
        wait = self.deadline + 1.0 if time.monotonic() >= self.deadline else time.monotonic() + 0.5
        ended = self._report_line(wait)
        if not isinstance(ended, dict):
            return None
        if isinstance(ended.get("exit"), int):
            self.returncode = ended["exit"]
            return "exit"
        if isinstance(ended.get("signal"), int):
            self.returncode = -ended["signal"]
            return "signal"
        return "timeout" if ended.get("timeout") else None


class _Lines:
    """Newline-terminated messages from a pipe, read against a deadline and a size cap."""

    def __init__(self, fd: int) -> None:
        self.fd, self.buffer, self.closed = fd, b"", False

    def next(self, deadline: float, cap: int) -> bytes | None:
        """The next line; None at end of file, past ``deadline`` or past ``cap`` bytes."""
        while b"\n" not in self.buffer:
            left = deadline - time.monotonic()
            if self.closed or len(self.buffer) > cap or left <= 0 or not _ready(self.fd, select.POLLIN, left):
                return None
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                self.closed = True
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line if len(line) <= cap else None


def _write_all(fd: int, data: bytes, deadline: float) -> bool:
    try:
        while data:
            left = deadline - time.monotonic()
            if left <= 0 or not _ready(fd, select.POLLOUT, left):
                return False
            data = data[os.write(fd, data[:select.PIPE_BUF]):]
    except BrokenPipeError:
        return False
    return True


def _ready(fd: int, event: int, timeout_s: float) -> bool:
    """Whether ``fd`` is ready for ``event`` (or closed) within ``timeout_s``; poll, not select, so
    that an evaluator holding over 1024 descriptors works too."""
    poller = select.poll()
    poller.register(fd, event)
    return bool(poller.poll(max(1, int(timeout_s * 1000) + 1)))


def _stop(proc: subprocess.Popen) -> None:
    """Kill the child's process group (the helper; the program process dies with it) and reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # not yet reaped, so the id is still ours
        except ProcessLookupError:
            pass
    proc.wait()


@contextmanager
def _workspace() -> Iterator[Path]:
    """A fresh temporary directory, removed afterwards by ``remove_tree`` (which neither recurses nor
    raises, whatever the program left there)."""
    path = tempfile.mkdtemp(prefix="hfms-sandbox-")
    try:
        yield Path(path)
    finally:
        remove_tree(path)


def _read(path: Path, limit: int = 8192) -> str:
    with path.open("rb") as fh:
        return fh.read(limit).decode("utf-8", errors="replace")
