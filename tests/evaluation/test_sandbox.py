"""The MBPP sandbox: each case runs a real subprocess and checks what actually happened."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

import pytest

from hf_model_stock.evaluation.sandbox import Limits, _spawn, available_layers, run_program

FAST = Limits(timeout_s=3.0, cpu_s=2, memory_bytes=512 << 20, output_bytes=64 << 10)


def test_passing_program() -> None:
    result = run_program("def add(a, b):\n    return a + b\nassert add(2, 3) == 5\nprint('ok')", FAST)
    assert (result.status, result.returncode, result.stdout, result.stderr) == ("passed", 0, "ok\n", "")
    assert {"rlimits", "audit"} <= set(result.layers)


def test_standard_library_and_own_files_are_usable_site_packages_are_not() -> None:
    program = ("import bisect, collections, decimal, fractions, hashlib, heapq, itertools, json, math, re, sqlite3\n"
               "import zlib\n"
               "assert hashlib.sha256(zlib.compress(b'x')).hexdigest() and math.comb(5, 2) == 10\n"
               "open('notes.txt', 'w').write('mine')\n"
               "print(open('notes.txt').read(), sorted(__import__('os').listdir('.')))\n"
               "try:\n    import pytest\nexcept ModuleNotFoundError as e:\n    print(e)")
    result = run_program(program, FAST)
    assert (result.status, result.stderr) == ("passed", "")
    assert result.stdout == "mine ['notes.txt', 'program.py']\nNo module named 'pytest'\n"


def test_failing_assertion() -> None:
    result = run_program("assert 1 + 1 == 3", FAST)
    assert (result.status, result.returncode) == ("failed", 1)
    assert result.stderr.rstrip().endswith("AssertionError")


def test_infinite_loop_is_stopped_by_the_cpu_limit() -> None:
    start = time.monotonic()
    result = run_program("while True:\n    pass", FAST)
    assert result.status == "timeout"
    assert time.monotonic() - start < FAST.timeout_s + 2


def test_sleeping_forever_is_stopped_by_the_wall_clock() -> None:
    start = time.monotonic()
    result = run_program("import time\ntime.sleep(60)", Limits(timeout_s=1.0))
    assert (result.status, result.returncode) == ("timeout", None)
    assert time.monotonic() - start < 5


def test_memory_hog_gets_memory_error() -> None:
    result = run_program("block = bytearray(4 * 1024 ** 3)", FAST)
    assert result.status == "failed"
    assert result.stderr.rstrip().endswith("MemoryError")


def test_network_attempt_never_reaches_the_listener() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(0.2)
        port = server.getsockname()[1]
        result = run_program(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)", FAST)
        with pytest.raises(socket.timeout):
            server.accept()
    assert result.status == "failed"
    assert "PermissionError: sandbox: socket." in result.stderr


def test_writing_outside_its_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "escaped.txt"
    program = (f"open('inside.txt', 'w').write('fine')\n"
               f"open({str(target)!r}, 'w').write('escaped')")
    result = run_program(program, FAST)
    assert result.status == "failed"
    assert f"PermissionError: sandbox: writing {str(target)!r} outside the working directory" in result.stderr
    assert not target.exists()


def test_deleting_outside_its_directory_is_refused(tmp_path: Path) -> None:
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    result = run_program(f"import os\nos.remove({str(victim)!r})", FAST)
    assert result.status == "failed"
    assert victim.read_text() == "precious"


def test_fork_bomb_cannot_fork() -> None:
    start = time.monotonic()
    result = run_program("import os\nwhile True:\n    os.fork()", FAST)
    assert result.status == "failed"
    assert "PermissionError: sandbox: os.fork is not allowed" in result.stderr
    assert time.monotonic() - start < 3


def test_huge_output_is_capped() -> None:
    result = run_program("print('x' * 10 ** 8)", FAST)
    assert result.status == "output_limit"
    assert len(result.stdout) <= 8192


def test_kernel_refuses_new_processes_and_threads_even_past_the_audit_hook() -> None:
    result = run_program("import threading\nthreading.Thread(target=print).start()", FAST)
    if "seccomp" not in result.layers:
        pytest.skip(f"seccomp not available here (layers: {result.layers})")
    assert result.status == "failed"
    assert result.stderr.rstrip().endswith("RuntimeError: can't start new thread")


@pytest.mark.parametrize(("layer", "error"), [("landlock", "PermissionError: [Errno 13] Permission denied"),
                                              ("mountns", "OSError: [Errno 30] Read-only file system")])
def test_kernel_refuses_writes_outside_even_past_the_audit_hook(layer: str, error: str) -> None:
    if layer not in available_layers():
        pytest.skip(f"{layer} not available here (layers: {available_layers()})")
    # os.mkfifo raises no audit event: only the kernel stands in the way. The standard library is one
    # of the few directories the mount namespace shows, read-only.
    fifo = Path(sysconfig.get_path("stdlib")) / f"hfms-test-fifo-{uuid.uuid4().hex}"
    other = ({"landlock", "mountns"} - {layer}).pop()
    try:
        result = _spawn(f"import os\nos.mkfifo({str(fifo)!r})", FAST, allow_unconfined_reads=False, skip=(other,))
        assert layer in result.layers and other not in result.layers
        assert result.status == "failed"
        assert error in result.stderr
        assert not os.path.lexists(fifo)
    finally:
        if os.path.lexists(fifo):
            os.remove(fifo)


WINDOWS_LIKE = """
import signal, sys
sys.modules["resource"] = None  # as on Windows: `import resource` fails
sys.modules["fcntl"] = None
for name in ("SIGXCPU", "SIGKILL"):
    delattr(signal, name)
from hf_model_stock.evaluation import mbpp
from hf_model_stock.evaluation.errors import EvalError
sys.platform = "win32"
try:
    mbpp.process_results({"test_list": ["assert f() == 1"]}, ["def f():\\n    return 1"])
except EvalError as error:
    print(error)
"""


def test_off_linux_mbpp_imports_and_refuses_in_one_line() -> None:
    """Where ``resource`` and the POSIX signals are missing (Windows), the MBPP hooks import (lm-eval
    loads them with the task) and scoring refuses in one line, running nothing."""
    proc = subprocess.run([sys.executable, "-c", WINDOWS_LIKE], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "mbpp: the code sandbox needs Linux (namespaces, Landlock, seccomp, rlimits)\n"
