"""Read confinement of the MBPP sandbox: secrets planted where a user keeps them, and programs that try
to read them from inside, by every route we know. A probe program prints what it manages to read; the
secret must appear nowhere in its stdout or stderr.

The programs are run by a driver process started the way a user starts an evaluation: from the home
directory, with HF_TOKEN=<secret> in its environment. Each probe runs under the full sandbox
(``run_program``), under each read layer alone (the mount namespace, Landlock), and, as a control that
proves the probe is real, with neither: there every probe that only the read layers stop does print
its secret.
"""

from __future__ import annotations

import functools
import json
import os
import pwd
import subprocess
import sys
import sysconfig
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from hf_model_stock.evaluation import sandbox
from hf_model_stock.evaluation._sandbox_child import READ_LAYERS
from hf_model_stock.evaluation.errors import EvalError
from hf_model_stock.evaluation.sandbox import ExecResult, Limits, run_program

FAST = Limits(timeout_s=5.0, cpu_s=3, memory_bytes=512 << 20, output_bytes=64 << 10)
SECRET = f"hfms-planted-{uuid.uuid4().hex}"
# the evaluating process: the parent of the sandbox's helper, itself the program's parent
GRANDPARENT = "import os\nevaluator = open(f'/proc/{os.getppid()}/stat').read().rsplit(')', 1)[1].split()[1]\n"
READ_ERRORS = ("PermissionError", "FileNotFoundError", "OSError", "NotADirectoryError")


@dataclass(frozen=True)
class Probe:
    """A program reading one secret; ``needles`` must not reach its output. ``leaks_unconfined``: with
    no read layer the program does read them (only Landlock or the mount namespace stands in the way)."""

    name: str
    program: str
    needles: tuple[str, ...]
    leaks_unconfined: bool = True
    raises: bool = True  # the program raises when it reads nothing


@dataclass(frozen=True)
class Planted:
    home: Path
    token: Path
    ssh_key: Path
    cache_file: Path
    fd: int  # the token, opened by this process and inheritable


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Planted]:
    home, hf_home = tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("hf_home")
    token = home / ".cache/huggingface/token"
    ssh_key = home / ".ssh/id_rsa"
    cache_file = hf_home / "hub/models--org--private/snapshots/abc/secret.txt"
    for path, text in ((token, "token"), (ssh_key, "ssh"), (cache_file, "cache")):
        path.parent.mkdir(parents=True)
        path.write_text(f"{SECRET}-{text}\n")
    (home / f"{SECRET}-name").touch()  # a name that only a listing of the home reveals
    fd = os.open(token, os.O_RDONLY)
    os.set_inheritable(fd, True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_TOKEN", f"{SECRET}-env")
        mp.setenv("HF_HOME", str(hf_home))
        mp.setenv("HOME", str(home))
        yield Planted(home, token, ssh_key, cache_file, fd)
    os.close(fd)


def _probes(p: Planted) -> list[Probe]:
    real_home = Path(pwd.getpwuid(os.getuid()).pw_dir)
    on_path = {Path(d).relative_to(real_home).parts[0] for d in {sysconfig.get_path("stdlib")}
               if Path(d).is_relative_to(real_home)}  # the mount namespace shows the way to the stdlib
    home_names = tuple(json.dumps(n) for n in os.listdir(real_home) if n not in on_path) if real_home.is_dir() else ()
    passwd = Path("/etc/passwd").read_text().splitlines()[0]
    project_source = Path(sandbox.__file__)
    token, ssh, cache = str(p.token), str(p.ssh_key), str(p.cache_file)
    secret = (f"{SECRET}-token",)
    return [
        Probe("hf token by path", f"print(open({token!r}).read())", secret),
        Probe("ssh key by path", f"print(open({ssh!r}).read())", (f"{SECRET}-ssh",)),
        Probe("HF cache file by path", f"print(open({cache!r}).read())", (f"{SECRET}-cache",)),
        Probe("/etc/passwd", "print(open('/etc/passwd').read())", (passwd,)),
        Probe("project source", f"print(open({str(project_source)!r}).read())", ("def run_program(",)),
        Probe("listing of the planted home", f"import os\nprint(os.listdir({str(p.home)!r}))", (f"{SECRET}-name",)),
        Probe("listing of the real home", f"import json, os\nprint(json.dumps(os.listdir({str(real_home)!r})))",
              home_names, raises=False),  # the mount namespace lists the way to the stdlib if it is in there
        Probe("relative path up from the working directory",
              f"import os\nprint(open('../' * os.getcwd().count('/') + {token.lstrip('/')!r}).read())", secret),
        Probe("evaluator's environment via /proc/<ppid of ppid>/environ",
              f"{GRANDPARENT}print([e for e in open(f'/proc/{{evaluator}}/environ', 'rb').read().split(b'\\0') "
              f"if b'{SECRET}' in e])", (f"{SECRET}-env",)),
        Probe("evaluator's working directory via /proc/<ppid of ppid>/cwd",
              f"{GRANDPARENT}print(os.listdir(f'/proc/{{evaluator}}/cwd'))", (f"{SECRET}-name",)),
        Probe("pid 1's environment", "print(len(open('/proc/1/environ', 'rb').read()))", (), leaks_unconfined=False),
        Probe("every process's environment via /proc/*/environ",
              "import glob\nfound = []\n"
              "for path in glob.glob('/proc/[0-9]*/environ'):\n"
              f"    try:\n        found += [e for e in open(path, 'rb').read().split(b'\\0') if b'{SECRET}' in e]\n"
              "    except OSError:\n        pass\n"
              "if not found:\n    raise PermissionError('no environ readable')\nprint(found)", (f"{SECRET}-env",)),
        Probe("/proc/self/root", f"print(open('/proc/self/root' + {token!r}).read())", secret),
        Probe("/proc/self/cwd", f"import os\nprint(open('/proc/self/cwd/' + '../' * os.getcwd().count('/') "
              f"+ {token.lstrip('/')!r}).read())", secret),
        Probe("symlink to the secret in the working directory",
              f"import os\nos.symlink({token!r}, 'link')\nprint(open('link').read())", secret,
              leaks_unconfined=False),  # the audit hook refuses the symlink already
        Probe("relative symlink made past the audit hook",  # made from deep down, so the hook sees a path inside
              "import os\nwork = os.getcwd()\nup = work.count('/')\ndeep = os.path.join(work, *['d'] * (up + 1))\n"
              f"os.makedirs(deep)\nos.chdir(deep)\nos.symlink('../' * up + {token.lstrip('/')!r}, work + '/link')\n"
              "os.chdir(work)\nprint(open('link').read())", secret),
        Probe("hard link made past the audit hook (src_dir_fd)",
              f"import os\nd = os.open({str(p.token.parent)!r}, os.O_PATH)\n"
              f"os.link({p.token.name!r}, 'hard', src_dir_fd=d)\nprint(open('hard').read())", secret),
        Probe("openat on an O_PATH descriptor of the directory",
              f"import os\nd = os.open({str(p.token.parent)!r}, os.O_PATH)\n"
              f"print(open({p.token.name!r}, opener=lambda path, flags: os.open(path, flags, dir_fd=d)).read())",
              secret),
        Probe("reopening an O_PATH descriptor through /proc/self/fd",
              f"import os\nd = os.open({token!r}, os.O_PATH)\nprint(open(f'/proc/self/fd/{{d}}').read())", secret),
        Probe("inherited descriptor number, os.pread", f"import os\nprint(os.pread({p.fd}, 4096, 0))", secret,
              leaks_unconfined=False),  # closed by the parent and the child, whatever the read layers
        Probe("inherited descriptor number, open()", f"f = open({p.fd})\nf.seek(0)\nprint(f.read())", secret,
              leaks_unconfined=False),
        Probe("inherited descriptor via /proc/self/fd", f"print(open('/proc/self/fd/{p.fd}').read())", secret,
              leaks_unconfined=False),
        Probe("own environment", "import os\nprint(dict(os.environ))", (f"{SECRET}-env",), leaks_unconfined=False,
              raises=False),
    ]


CONFIGS = {"all layers": None, "mount namespace alone": ("landlock",), "Landlock alone": ("mountns",),
           "no read layer (control)": ("mountns", "landlock", "pidns", "nocaps")}
PROBE_NAMES = [probe.name for probe in _probes(Planted(Path("/h"), Path("/h/t"), Path("/h/s"), Path("/c"), 3))]
DRIVER = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from hf_model_stock.evaluation import sandbox
from hf_model_stock.evaluation._sandbox_child import READ_LAYERS
request = json.load(sys.stdin)
limits, skip = sandbox.Limits(**request["limits"]), request["skip"]
def run(program):
    if skip is None:
        return sandbox.run_program(program, limits)
    return sandbox._spawn(program, limits, allow_unconfined_reads=True, skip=skip)
with ThreadPoolExecutor(max_workers=4) as pool:
    print(json.dumps([asdict(result) for result in pool.map(run, request["programs"])]))
"""


@functools.cache
def _results(config: str, planted: Planted) -> dict[str, tuple[Probe, ExecResult]]:
    """Every probe run under ``config`` by a driver process started from the home with HF_TOKEN set."""
    probes = _probes(planted)
    request = {"limits": asdict(FAST), "skip": CONFIGS[config], "programs": [probe.program for probe in probes]}
    driver = subprocess.run([sys.executable, "-c", DRIVER], input=json.dumps(request), capture_output=True,
                            text=True, cwd=planted.home, env={**os.environ, "HF_TOKEN": f"{SECRET}-env"},
                            pass_fds=(planted.fd,))
    assert driver.returncode == 0, driver.stderr
    results = [ExecResult(**{**r, "layers": tuple(r["layers"])}) for r in json.loads(driver.stdout)]
    return {probe.name: (probe, result) for probe, result in zip(probes, results, strict=True)}


@pytest.mark.parametrize("name", PROBE_NAMES)
@pytest.mark.parametrize("config", [c for c in CONFIGS if "control" not in c])
def test_probe_cannot_read_the_secret(config: str, name: str, planted: Planted) -> None:
    layer = {"mount namespace alone": "mountns", "Landlock alone": "landlock"}.get(config)
    if layer and layer not in sandbox.available_layers():
        pytest.skip(f"{layer} not available here (layers: {sandbox.available_layers()})")
    if not READ_LAYERS & set(sandbox.available_layers()):
        pytest.skip("no read layer here: run_program refuses (tested below)")
    probe, result = _results(config, planted)[name]
    for needle in probe.needles:
        assert needle not in result.stdout + result.stderr
    if probe.raises:
        assert result.status == "failed", result.stdout
        assert result.stderr.strip().splitlines()[-1].startswith(READ_ERRORS), result.stderr
    if layer:
        assert layer in result.layers and ({"mountns", "landlock"} - {layer}).isdisjoint(result.layers)


@pytest.mark.parametrize("name", PROBE_NAMES)
def test_control_without_read_layers_the_probe_reads_its_secret(name: str, planted: Planted) -> None:
    probe, result = _results("no read layer (control)", planted)[name]
    if not probe.leaks_unconfined or not probe.needles:
        pytest.skip("stopped by something other than the read layers (or nothing to find here)")
    assert "reads-unconfined" in result.layers
    assert result.status == "passed", result.stderr
    assert any(needle in result.stdout for needle in probe.needles)


def test_refuses_with_one_line_where_reads_cannot_be_confined(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_MODEL_STOCK_UNCONFINED_READS", raising=False)
    monkeypatch.setattr(sandbox, "available_layers", lambda: ("netns", "seccomp", "rlimits", "audit",
                                                              "reads-unconfined"))
    with pytest.raises(EvalError) as info:
        run_program("print('ran')", FAST)
    assert str(info.value) == (
        "mbpp: the code sandbox cannot confine reads on this machine (the kernel allows neither Landlock nor "
        "user+mount namespaces here), so a generated program could read your files and tokens; "
        "set HF_MODEL_STOCK_UNCONFINED_READS=1 to run it anyway")


def test_child_refuses_to_run_a_program_it_cannot_confine() -> None:
    result = sandbox._spawn("print('ran')", FAST, allow_unconfined_reads=False, skip=("mountns", "landlock"))
    assert (result.returncode, result.stdout, result.stderr) == (97, "", "")
    assert result.layers[-1] == "reads-unconfined"


def test_run_program_raises_when_the_child_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_MODEL_STOCK_UNCONFINED_READS", raising=False)
    monkeypatch.setattr(sandbox, "available_layers", lambda: ("netns", "mountns", "landlock", "audit"))
    monkeypatch.setattr(sandbox, "_spawn", functools.partial(sandbox._spawn, skip=("mountns", "landlock")))
    with pytest.raises(EvalError, match="cannot confine reads"):
        run_program("print('ran')", FAST)


def test_override_runs_unconfined_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_MODEL_STOCK_UNCONFINED_READS", "1")
    monkeypatch.setattr(sandbox, "available_layers", lambda: ("netns", "audit", "reads-unconfined"))
    monkeypatch.setattr(sandbox, "_spawn", functools.partial(sandbox._spawn, skip=("mountns", "landlock")))
    result = run_program("print('ran')", FAST)
    assert (result.status, result.stdout) == ("passed", "ran\n")
    assert result.layers[-1] == "reads-unconfined"


def test_a_child_that_dies_before_confining_is_an_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    broken = tmp_path / "child.py"
    broken.write_text("raise SystemExit('sandbox: cannot start')")
    monkeypatch.setattr(sandbox, "CHILD", broken)
    with pytest.raises(EvalError) as info:
        sandbox._spawn("pass", FAST, allow_unconfined_reads=False)
    assert str(info.value) == "mbpp: the code sandbox failed before running the program: sandbox: cannot start"
