"""Integrity of the MBPP sandbox against a hostile program: it cannot forge a pass, break the verdict
channel, touch the evaluating process or any other, read the session keyring, write past the disk
limits or leave something the cleanup cannot remove. Each probe comes with a control that shows it
does its harm where the protection is absent (a plain subprocess scored by its exit status, as before;
or the sandbox with the layer in question skipped)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hf_model_stock.evaluation import mbpp, sandbox
from hf_model_stock.evaluation._sandbox_disk import remove_tree
from hf_model_stock.evaluation.sandbox import Limits, available_layers, run_program

FAST = Limits(timeout_s=4.0, cpu_s=3, memory_bytes=512 << 20, output_bytes=64 << 10)
WRONG = "def add(a, b):\n    return a - b\n"
TESTS = ["assert add(2, 3) == 5", "assert add(0, 0) == 0", "assert add(-1, 1) == 0"]
# Switches the audit hook off (it is not a security boundary: its prefixes live in the child's globals,
# one frame up), so that what a probe meets is the kernel's layers.
NO_AUDIT = "import sys\nsys._getframe(1).f_globals['_BLOCKED_PREFIXES'] = ('-',)\n"

FORGED = {  # name -> (program, whether a plain run's exit status would count it as a pass)
    "sys.exit(0) before the asserts": (WRONG + "import sys\nsys.exit(0)\n", True),
    "raise SystemExit(0)": (WRONG + "raise SystemExit(0)\n", True),
    "os._exit(0) at import": ("import os\n" + WRONG + "os._exit(0)\n", True),
    "os._exit(0) inside the function": ("import os\ndef add(a, b):\n    os._exit(0)\n", True),
    "sys.exit(256) wraps to 0": (WRONG + "import sys\nsys.exit(256)\n", True),
    "excepthook exits 0": ("import sys, os\nsys.excepthook = lambda *a: os._exit(0)\n" + WRONG, True),
    "atexit exits 0": ("import atexit, os\natexit.register(os._exit, 0)\n" + WRONG, True),
    "audit hook exits on sys.excepthook": (
        "import sys, os\nsys.addaudithook(lambda e, a: os._exit(0) if e == 'sys.excepthook' else None)\n" + WRONG, True),
    "settrace turns the AssertionError into an exit": (
        "import sys, os\ndef trace(frame, event, arg):\n    if event == 'exception':\n        os._exit(0)\n"
        "    return trace\nsys.settrace(trace)\nsys._getframe().f_trace = trace\n" + WRONG, True),
    "re-runs program.py without its asserts": (
        WRONG + "import os\nif 'rerun' not in globals():\n    rerun = True\n"
        "    exec('\\n'.join(l for l in open('program.py').read().splitlines() if not l.startswith('assert')))\n"
        "    os._exit(0)\n", True),
    "signal handler exits 0 on SIGALRM": (
        "import signal, os, time\nsignal.signal(signal.SIGALRM, lambda *a: os._exit(0))\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.3)\n" + WRONG + "time.sleep(1)\n", True),
    "finalizer exits 0 at shutdown": ("import os\nclass F:\n    def __del__(self):\n        os._exit(0)\nf = F()\n" + WRONG,
                                      True),
    "AssertionError replaced in builtins": (
        "import builtins\nbuiltins.AssertionError = type('AssertionError', (BaseException,), {})\n" + WRONG, False),
    "writes a start and passing answers on every descriptor": (
        WRONG + "import os\nfor fd in range(3, 64):\n    try:\n"
        "        os.write(fd, b'{\"ran\": true}\\n' + b'{\"value\": [\"bool\", true]}\\n' * 8 + b'{\"exit\": 0}\\n')\n"
        "    except OSError:\n        pass\nos._exit(0)\n", True),
    "answers every request itself": (
        WRONG + "import os, json\nfds = json.loads(open('/proc/self/cmdline').read().split('\\0')[4])['fds'] "
        "if os.path.exists('/proc/self/cmdline') else [3, 4, 5]\n"
        "os.write(fds[2], b'{\"ran\": true}\\n')\nwhile os.read(fds[1], 65536):\n"
        "    os.write(fds[2], b'{\"value\": [\"bool\", true]}\\n')\nos._exit(0)\n", False),
    "math.isclose patched to hold": ("import math\nmath.isclose = lambda *a, **k: True\n" + WRONG, True),
    "__eq__ that always holds": ("class Yes:\n    def __eq__(self, other):\n        return True\n"
                                 "def add(a, b):\n    return Yes()\n", True),
}


def _plain_exit_status(program: str, tmp_path: Path, tests: list[str] = TESTS) -> int:
    """The old rule (and lm-eval's, but for the exits it counts as failures): program + asserts as one
    file in a plain interpreter; 0 counted as a pass."""
    (tmp_path / "program.py").write_text(program + "\n" + "\n".join(tests))
    return subprocess.run([sys.executable, "-I", "program.py"], cwd=tmp_path, capture_output=True,
                          timeout=30).returncode


@pytest.mark.parametrize("name", FORGED)
def test_a_forged_pass_scores_zero(name: str, tmp_path: Path) -> None:
    program, plain_passes = FORGED[name]
    tests = ["assert math.isclose(add(0.5, 0.25), 0.75)"] if "math" in name else TESTS
    result = run_program(program, FAST, tests=tests)
    assert result.status == "failed", result
    assert result.reason
    if plain_passes:  # control: scored by its exit status, the probe passes
        assert _plain_exit_status(program, tmp_path, tests) == 0


HONEST = [  # (program, tests): what a plain run of program + asserts decides, we decide too
    ("def f(x):\n    return x * 2", ["assert f(2) == 4", "assert f('a') == 'aa'", "assert not f(0)"]),
    ("def f(x):\n    return x * 2", ["assert f(2) == 5"]),
    ("def f(x):\n    return map(str, range(x))", ["assert list(f(3)) == ['0', '1', '2']"]),
    ("def f(x):\n    return map(str, range(x))", ["assert f(3) == ['0', '1', '2']"]),
    ("def f():\n    return None", ["assert f() is None", "assert f() == None"]),
    ("def f():\n    return 0.1 + 0.2", ["assert f() == 0.30000000000000004", "assert round(f(), 2) == 0.3"]),
    ("def f():\n    return 0.1 + 0.2", ["assert f() == 0.3"]),
    ("def f():\n    return float('nan')", ["assert f() != f()"]),
    ("from collections import namedtuple, OrderedDict, Counter, deque, defaultdict\nP = namedtuple('P', 'a b')\n"
     "def f():\n    return P(1, 2), OrderedDict(a=1), Counter('aab'), deque([1]), defaultdict(int, a=1)",
     ["assert f()[0] == (1, 2)", "assert f()[1] == {'a': 1}", "assert f()[2] == {'a': 2, 'b': 1}",
      "assert f()[3] != [1]", "assert f()[4] == {'a': 1}"]),
    ("def f(x):\n    return [x, (x,), {x}]", ["assert f(1) == [1, (1,), {1}]", "assert f(1) != [1, [1], {1}]"]),
    ("def f(x):\n    return x > 0", ["assert f(1) == True", "assert f(-1) == False", "assert f(1) is True"]),
    ("def f(x):\n    return 1 // x", ["assert f(1) == 1 or f(0) == 0"]),  # short-circuit: f(0) never runs
    ("def f(x):\n    return 1 // x", ["assert f(0) == 0 or f(1) == 1"]),  # f(0) raises
    ("calls = []\ndef f(x):\n    calls.append(x)\n    return len(calls)", ["assert f(5) == 1", "assert f(5) == 2",
                                                                           "assert calls == [5, 5]"]),
    ("def f(s):\n    return s.upper()", ["assert f('ab') in ('AB', 'ab')", "assert sorted(f('ba')) == ['A', 'B']"]),
    ("def f(n):\n    return 2 ** n", ["assert f(200) == 2 ** 200", "assert -f(3) == -8"]),
    ("def f():\n    return b'\\x00ab', bytearray(b'z'), 1 + 2j", ["assert f() == (b'\\x00ab', bytearray(b'z'), 1 + 2j)"]),
    ("import math\ndef f(x):\n    return math.sqrt(x)", ["assert math.isclose(f(2), 1.41421, rel_tol=1e-4)",
                                                          "assert math.floor(f(17)) == 4"]),
    ("def f(x):\n    return math.sqrt(x)", ["assert f(4) == 2.0"]),  # NameError: math never imported
    ("x = 3\nassert x == 3\ndef f():\n    return x", ["assert f() == 3", "x = 4", "assert f() == 4"]),
]


@pytest.mark.parametrize("index", range(len(HONEST)))
def test_honest_programs_get_the_verdict_of_a_plain_run(index: int, tmp_path: Path) -> None:
    program, tests = HONEST[index]
    plain = _plain_exit_status(program, tmp_path, tests) == 0
    result = run_program(program, FAST, tests=tests)
    assert (result.status == "passed") == plain, result


def test_the_right_answer_still_passes_and_the_wrong_one_fails() -> None:
    assert run_program("def add(a, b):\n    return a + b\nprint('log line')", FAST, tests=TESTS).status == "passed"
    failed = run_program(WRONG, FAST, tests=TESTS)
    assert (failed.status, failed.reason) == ("failed", "failed: assert add(2, 3) == 5")


def test_mbpp_process_results_decides_the_asserts_outside_the_program() -> None:
    doc = {"task_id": 1, "text": "", "test_setup_code": "import math", "test_list": [
        "assert hyp(3, 4) == 5.0", "assert math.isclose(hyp(1, 1), 1.4142, rel_tol=1e-3)",
        "assert set(pair(3)) == {0, 1, 2} and not hyp(0, 0)"]}
    gold = "def hyp(a, b):\n    return math.sqrt(a * a + b * b)\ndef pair(n):\n    return map(int, range(n))"
    assert mbpp.process_results(doc, [gold]) == {"pass@1": 1.0}
    assert mbpp.process_results(doc, [gold + "\nimport os\nos._exit(0)"]) == {"pass@1": 0.0}
    assert mbpp.process_results(doc, [gold.replace("b * b", "b")]) == {"pass@1": 0.0}


# --- the verdict channel -------------------------------------------------------------------------------

CHANNEL = {
    "ftruncate(2, 0) and (1, 0)": "import os\nos.ftruncate(2, 0)\nos.ftruncate(1, 0)\n",
    "a fake confinement report on stderr":
        "import sys\nsys.stderr.write('hfms-sandbox-layers:netns\\n{\"layers\": [\"x\"]}\\n')\n",
    "closes every descriptor": "import os\nos.closerange(0, 1000)\n",
    "dup2 of stdout over every descriptor": "import os\nfor fd in range(3, 64):\n    try:\n        os.dup2(1, fd)\n"
                                            "    except OSError:\n        pass\nprint('{\"ran\": true}')\n",
    "garbage on every descriptor": "import os\nfor fd in range(64):\n    try:\n        os.write(fd, b'\\xff{[' * 1000)\n"
                                   "    except OSError:\n        pass\n",
    "no newline, 8 MiB": "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'x' * (8 << 20))\n"
                         "    except OSError:\n        pass\n",
    "an answer too large": "def add(a, b):\n    return 'x' * (40 << 20)\n",
    "an answer nested too deeply": "def add(a, b):\n    x = []\n    for _ in range(10 ** 5):\n        x = [x]\n    return x\n",
    "an answer that contains itself": "def add(a, b):\n    x = []\n    x.append(x)\n    return x\n",
}


@pytest.mark.parametrize("name", CHANNEL)
def test_the_channel_survives_and_a_broken_one_fails_the_sample(name: str) -> None:
    program = CHANNEL[name] if "def add" in CHANNEL[name] else WRONG + CHANNEL[name]
    result = run_program(program, FAST, tests=TESTS)  # never raises
    assert result.status == "failed" and result.reason
    assert result.layers == available_layers()  # the report is the helper's, not the program's


def test_a_fake_report_on_stderr_is_only_a_log() -> None:
    result = run_program("def add(a, b):\n    return a + b\n" + CHANNEL["a fake confinement report on stderr"], FAST,
                         tests=TESTS)
    assert result.status == "passed"
    assert result.stderr.startswith("hfms-sandbox-layers:netns")  # control: the program did write it
    assert result.layers == available_layers()


def test_a_sample_that_breaks_its_channel_does_not_stop_the_run() -> None:
    doc = {"task_id": 1, "text": "", "test_setup_code": "", "test_list": TESTS}
    scores = [mbpp.process_results(doc, [WRONG + CHANNEL[name]]) for name in ("ftruncate(2, 0) and (1, 0)",
                                                                              "a fake confinement report on stderr")]
    assert scores == [{"pass@1": 0.0}] * 2


# --- other processes --------------------------------------------------------------------------------------

@pytest.fixture
def victim() -> Iterator[int]:
    """Another process of the same user: the evaluator's stand-in."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


IOPRIO = "import ctypes\nlibc = ctypes.CDLL(None, use_errno=True)\n"
HARM = {  # name -> program (VICTIM stands for the pid); each raises if the kernel refuses it
    "prlimit RLIMIT_CPU": "import resource\nresource.prlimit(VICTIM, resource.RLIMIT_CPU, (1, 1))",
    "prlimit RLIMIT_NOFILE": "import resource\nresource.prlimit(VICTIM, resource.RLIMIT_NOFILE, (5, 5))",
    "prlimit RLIMIT_FSIZE": "import resource\nresource.prlimit(VICTIM, resource.RLIMIT_FSIZE, (0, 0))",
    "prlimit RLIMIT_AS": "import resource\nresource.prlimit(VICTIM, resource.RLIMIT_AS, (1 << 26, 1 << 26))",
    "sched_setaffinity": "import os\nos.sched_setaffinity(VICTIM, {0})",
    "setpriority": "import os\nos.setpriority(os.PRIO_PROCESS, VICTIM, 19)",
    "SCHED_IDLE": "import os\nos.sched_setscheduler(VICTIM, os.SCHED_IDLE, os.sched_param(0))",
    "ioprio_set": IOPRIO + "if libc.syscall(251, 1, VICTIM, (3 << 13)) != 0:\n    raise OSError(ctypes.get_errno(), 'ioprio')",
    "SIGKILL": "import os\nos.kill(VICTIM, 9)",
    "pidfd_open": "import os\nos.pidfd_open(VICTIM)",
    "ptrace attach": IOPRIO + "if libc.ptrace(16, VICTIM, 0, 0) != 0:\n    raise OSError(ctypes.get_errno(), 'ptrace')",
}


def _victim_state(pid: int) -> tuple:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    limits = Path(f"/proc/{pid}/limits").read_text()
    return (limits, os.sched_getaffinity(pid), os.getpriority(os.PRIO_PROCESS, pid), os.sched_getscheduler(pid),
            libc.syscall(252, 1, pid), Path(f"/proc/{pid}/status").read_text().split("TracerPid:")[1].split()[0])


def _harm(name: str, pid: int) -> str:
    return NO_AUDIT + HARM[name].replace("VICTIM", str(pid))


@pytest.mark.parametrize("skip", [(), ("pidns",), ("seccomp",)], ids=["all layers", "seccomp alone", "pidns alone"])
@pytest.mark.parametrize("name", HARM)
def test_no_other_process_is_reachable(name: str, skip: tuple[str, ...], victim: int) -> None:
    layer = ({"pidns", "seccomp"} - set(skip)).pop() if skip else "pidns"
    if layer not in available_layers():
        pytest.skip(f"{layer} not available here")
    before = _victim_state(victim)
    result = sandbox._spawn(_harm(name, victim), FAST, allow_unconfined_reads=False, skip=skip)
    assert result.status == "failed", result
    error = "PermissionError" if skip == ("pidns",) else ("ProcessLookupError", "PermissionError", "OSError")
    assert result.stderr.strip().splitlines()[-1].startswith(error), result.stderr
    assert _victim_state(victim) == before


@pytest.mark.parametrize("name", HARM)
def test_control_a_plain_process_does_harm_the_victim(name: str, victim: int, tmp_path: Path) -> None:
    before = _victim_state(victim)
    proc = subprocess.run([sys.executable, "-c", HARM[name].replace("VICTIM", str(victim))], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    if name == "SIGKILL":
        assert not Path(f"/proc/{victim}/limits").exists() or "State:\tZ" in Path(f"/proc/{victim}/status").read_text()
    elif name == "pidfd_open":
        pass  # a handle only: the sandbox refuses the handle itself
    elif name == "ptrace attach":
        pass  # released when the tracer exits; the sandbox refuses the attach itself
    else:
        assert _victim_state(victim) != before


def test_kill_everything_and_the_process_group_reach_nothing_outside(victim: int) -> None:
    program = NO_AUDIT + ("import os\nout = []\nfor target in (-1, 0):\n    try:\n        os.kill(target, 9)\n"
                          "        out.append(0)\n    except OSError as e:\n        out.append(e.errno)\nprint(out)")
    result = run_program(program, FAST)
    # kill(-1): refused (EPERM; and in its PID namespace there is nobody else); kill(0): its own session
    # and group, where it is alone (and, as pid 1 of its namespace, immune to its own SIGKILL)
    assert (result.status, result.stdout) == ("passed", "[1, 0]\n")
    assert "State:\tZ" not in Path(f"/proc/{victim}/status").read_text()
    assert run_program("import os\nprint(os.getpid(), os.getppid())", FAST).stdout == "1 0\n"  # alone in its pidns


def test_user_wide_priority_calls_are_refused() -> None:
    program = NO_AUDIT + IOPRIO + ("import os\nerrors = []\ntry:\n    os.setpriority(os.PRIO_USER, os.getuid(), 19)\n"
                                   "except OSError as e:\n    errors.append(e.errno)\n"
                                   "errors.append(ctypes.get_errno() if libc.syscall(251, 3, os.getuid(), 3 << 13) else 0)\n"
                                   "print(errors)")
    result = run_program(program, FAST)
    assert (result.status, result.stdout) == ("passed", "[1, 1]\n")  # EPERM twice
    assert os.getpriority(os.PRIO_PROCESS, 0) < 19


# --- the keyring -----------------------------------------------------------------------------------------

KEYRING_DRIVER = """
import ctypes, json, sys
from hf_model_stock.evaluation import sandbox
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
assert libc.syscall(250, 1, b"hfms-test") > 0  # join a fresh session keyring of our own
key = libc.syscall(248, b"user", b"hfms-key", b"SECRET", 6, ctypes.c_long(-3))
assert key > 0, ctypes.get_errno()
skip = json.loads(sys.argv[1])
result = sandbox._spawn(sys.argv[2].replace("KEY", str(key)), sandbox.Limits(), allow_unconfined_reads=False, skip=skip)
print(json.dumps([result.status, result.stdout, result.stderr]))
"""
READ_KEY = NO_AUDIT + IOPRIO + ("libc.syscall.restype = ctypes.c_long\nbuf = ctypes.create_string_buffer(64)\n"
                                "n = libc.syscall(250, 11, KEY, buf, 64)\n"
                                "if n < 0:\n    raise OSError(ctypes.get_errno(), 'keyctl read')\nprint(buf.raw[:n])")


@pytest.mark.parametrize("skip", [(), ("seccomp",), ("seccomp", "keyring")], ids=["all layers", "keyring alone", "control"])
def test_the_session_keyring_is_out_of_reach(skip: tuple[str, ...]) -> None:
    proc = subprocess.run([sys.executable, "-c", KEYRING_DRIVER, json.dumps(list(skip)), READ_KEY], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])})
    if proc.returncode != 0 and "AssertionError" in proc.stderr:
        pytest.skip(f"no keyrings here: {proc.stderr.strip().splitlines()[-1]}")
    status, stdout, stderr = json.loads(proc.stdout)
    if skip == ("seccomp", "keyring"):  # control: with neither, the program reads the key
        assert (status, stdout) == ("passed", "b'SECRET'\n"), stderr
    else:
        assert status == "failed" and "SECRET" not in stdout + stderr
        errno = 13 if skip else 1  # EACCES: the fresh keyring does not hold it; EPERM: seccomp refuses keyctl
        assert stderr.strip().splitlines()[-1] == f"PermissionError: [Errno {errno}] keyctl read", stderr


# --- disk and cleanup ------------------------------------------------------------------------------------

FALLOCATE = NO_AUDIT + IOPRIO + ("import os\nfd = os.open('big', os.O_CREAT | os.O_WRONLY)\n"
                                 "if libc.fallocate(fd, 1, ctypes.c_long(0), ctypes.c_long(SIZE)) != 0:\n"
                                 "    raise OSError(ctypes.get_errno(), 'fallocate')\n"
                                 "print(os.fstat(fd).st_blocks * 512 >= SIZE)")


def test_fallocate_past_the_file_size_limit_is_refused(tmp_path: Path) -> None:
    result = run_program(FALLOCATE.replace("SIZE", str(20 << 30)), FAST)
    assert result.status == "failed"
    assert result.stderr.strip().splitlines()[-1].startswith("OSError: [Errno 95]"), result.stderr
    # control: RLIMIT_FSIZE alone does not bound a KEEP_SIZE reservation (8 MiB past a 64 KiB limit)
    control = ("import resource\nresource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
               + FALLOCATE.replace(NO_AUDIT, "").replace("SIZE", str(8 << 20)))
    proc = subprocess.run([sys.executable, "-c", control], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout) == (0, "True\n"), proc.stderr


FILL = ("import os\ntotal = 0\ntry:\n    for i in range(10 ** 6):\n        with open(f'f{i}', 'wb') as fh:\n"
        "            fh.write(b'x' * (CHUNK))\n        total += CHUNK\nexcept OSError as e:\n    print(e.errno, total)\n")


def test_the_work_dir_is_limited_in_bytes_and_inodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if "mountns" not in available_layers():
        pytest.skip("no mount namespace here: the work dir is not a tmpfs")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    limits = Limits(timeout_s=10, cpu_s=8, work_bytes=4 << 20, work_inodes=200)
    full = run_program(FILL.replace("CHUNK", str(60 << 10)), limits)
    errno, total = map(int, full.stdout.split())
    assert errno == 28 and total <= 4 << 20  # ENOSPC at the size limit
    inodes = run_program(FILL.replace("CHUNK", "1"), limits)
    errno, total = map(int, inodes.stdout.split())
    assert errno == 28 and total < 200
    # control: without the mount namespace the same program writes past the limit into the host's /tmp
    control = sandbox._spawn(FILL.replace("CHUNK", str(60 << 10)).replace("10 ** 6", "100"), limits,
                             allow_unconfined_reads=False, skip=("mountns",))
    assert control.stdout == "" and control.status == "passed"
    assert list(tmp_path.iterdir()) == []  # and the cleanup removed it all


DEEP = ("import os\nhere = os.open('.', os.O_RDONLY)\nfor _ in range(3000):\n    os.mkdir('d', dir_fd=here)\n"
        "    deeper = os.open('d', os.O_RDONLY, dir_fd=here)\n    os.close(here)\n    here = deeper\n"
        "os.close(os.open('leaf', os.O_CREAT | os.O_WRONLY, dir_fd=here))\nprint('deep')")


@pytest.mark.parametrize("skip", [(), ("mountns",)], ids=["tmpfs", "Landlock alone, on the host"])
def test_a_3000_deep_tree_is_cleaned_up(skip: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    result = sandbox._spawn(DEEP, Limits(work_inodes=5000), allow_unconfined_reads=False, skip=skip)
    assert (result.status, result.stdout) == ("passed", "deep\n"), result.stderr
    assert list(tmp_path.iterdir()) == []


def test_control_rmtree_cannot_remove_a_3000_deep_tree(tmp_path: Path) -> None:
    here = os.open(tmp_path, os.O_RDONLY)
    for _ in range(3000):
        os.mkdir("d", dir_fd=here)
        deeper = os.open("d", os.O_RDONLY, dir_fd=here)
        os.close(here)
        here = deeper
    os.close(here)
    if sys.version_info < (3, 12):  # 3.12 made rmtree iterative
        with pytest.raises(RecursionError):
            shutil.rmtree(tmp_path / "d")
    assert remove_tree(str(tmp_path / "d")) and not (tmp_path / "d").exists()

