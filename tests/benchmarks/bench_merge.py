#!/usr/bin/env python
"""Merge benchmark: our Model Stock merge vs reading the same bytes vs mergekit.

Builds (or reuses) synthetic Llama-shaped checkpoints, then measures in one run, ``--repeat``
times each, warm and cold page cache:

- ``cat``: ``cat <all input files> > /dev/null`` (the I/O floor),
- ``ours``: ``hf-model-stock merge --base B --model M1 ... --out DIR -q`` on CPU
  (``--device cuda`` as ``ours-cuda`` too when ``torch.cuda.is_available()``),
- ``mergekit``: ``mergekit-yaml`` with ``merge_method: model_stock`` from its own venv,

recording wall time, peak RSS of the child process tree (polled every ~20 ms) and the kernel's
``ru_maxrss`` (``getrusage(RUSAGE_CHILDREN)`` in a tiny launcher process: the largest single
process), then checks a sample of output tensors against an independent float64 Model Stock
reference (``merge_reference.py``). Models come from ``synth_checkpoints.py``.

Cold = inputs evicted from the page cache (``/proc/sys/vm/drop_caches``, else
``posix_fadvise(DONTNEED)`` per input file), then the tool's interpreter and libraries
re-warmed by an untimed import, so "cold" measures reading the weights, not importing torch.
Warm = an untimed ``cat`` of the inputs right before the run.

Example::

    python tests/benchmarks/bench_merge.py --size-gb 0.92 --models 3 --repeat 3 --out bench.json
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge_reference import compare_models  # noqa: E402
from synth_checkpoints import BuiltModels, ModelSpec, build_models  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[2]
MB = 1e6


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- page cache


class PageCache:
    """Drop or warm the page cache for a set of files, with the best method available.

    ``drop_caches`` alone is not always enough: under concurrent load some pages survive it
    (folios held in per-CPU LRU batches), so every drop also calls ``posix_fadvise(DONTNEED)``
    on each input (which drains those batches and retries), then checks with ``fincore`` and
    repeats a few times if inputs are still resident.
    """

    def __init__(self) -> None:
        self.method = self._detect()

    @staticmethod
    def _detect() -> str:
        try:
            os.sync()
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
            return "proc_drop_caches+posix_fadvise_dontneed"
        except OSError:
            return "posix_fadvise_dontneed"

    def _drop_once(self, files: list[Path]) -> None:
        os.sync()
        if self.method.startswith("proc_drop_caches"):
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("3\n")
        for path in files:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)

    def drop(self, files: list[Path], tries: int = 5) -> int:
        """Evict ``files`` (with drop_caches: everything clean) from the page cache; returns
        the number of attempts used."""
        for attempt in range(1, tries + 1):
            self._drop_once(files)
            resident = self.resident_bytes(files)
            if resident is None or resident < 2**20:
                return attempt
            time.sleep(0.5)
        return tries

    @staticmethod
    def warm(files: list[Path]) -> None:
        subprocess.run(["cat", *map(str, files)], stdout=subprocess.DEVNULL, check=True)

    @staticmethod
    def resident_bytes(files: list[Path]) -> int | None:
        """Bytes of ``files`` in the page cache, via util-linux ``fincore`` (None if absent)."""
        if not shutil.which("fincore"):
            return None
        out = subprocess.run(
            ["fincore", "--bytes", "--noheadings", "--output", "RES", *map(str, files)],
            capture_output=True, text=True,
        )
        try:
            return sum(int(x) for x in out.stdout.split())
        except ValueError:
            return None


# --------------------------------------------------------------------------- measurement


def _busy_cpu_s() -> float:
    """CPU seconds spent busy by the whole machine since boot (all cores, from /proc/stat)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_wait_s: float, threshold_cores: float = 0.3,
                  window_s: float = 2.0) -> tuple[float, float]:
    """Wait (up to ``max_wait_s``) until the machine's busy CPU over ``window_s`` is below
    ``threshold_cores``. Returns (seconds waited, last measured busy cores)."""
    t0 = time.perf_counter()
    while True:
        b0 = _busy_cpu_s()
        time.sleep(window_s)
        busy = (_busy_cpu_s() - b0) / window_s
        waited = time.perf_counter() - t0
        if busy < threshold_cores or waited >= max_wait_s:
            return waited, busy


def _proc_mem(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of one process in bytes, from /proc/<pid>/status."""
    rss = anon = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon = int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return rss, anon


def _descendants(pid: int) -> list[int]:
    """All descendants of ``pid``, from /proc/<pid>/task/<tid>/children (~0.1 ms a call;
    psutil's ``children(recursive=True)`` scans all of /proc: ~3.5 ms here, 15% of a core at a
    20 ms poll). Falls back to psutil when the kernel lacks the children files."""
    if not os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children"):
        try:
            return [c.pid for c in psutil.Process(pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []
    out: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
                out += kids
                todo += kids
        except (FileNotFoundError, ProcessLookupError):
            continue
    return out


class TreeRssPoller(threading.Thread):
    """Polls the summed RSS (and anonymous RSS) of a process and all its descendants."""

    def __init__(self, pid: int, interval: float = 0.02, include_root: bool = True):
        super().__init__(daemon=True)
        self.pid, self.interval, self.include_root = pid, interval, include_root
        self.peak_rss = self.peak_anon = 0
        self.samples = 0
        self.cpu_s = 0.0  # CPU time of this polling thread
        self._stop_evt = threading.Event()

    def run(self) -> None:
        while not self._stop_evt.is_set():
            pids = _descendants(self.pid) + ([self.pid] if self.include_root else [])
            mems = [_proc_mem(p) for p in pids]
            if not any(m[0] for m in mems):
                self._stop_evt.wait(0.002)  # the launcher has not forked yet
                continue
            self.peak_rss = max(self.peak_rss, sum(m[0] for m in mems))
            self.peak_anon = max(self.peak_anon, sum(m[1] for m in mems))
            self.samples += 1
            self._stop_evt.wait(self.interval)
        self.cpu_s = time.thread_time()

    def stop(self) -> None:
        self._stop_evt.set()
        self.join()


# A tiny launcher (fresh interpreter, ~10 MB) forks and execs the measured command and reports
# its rusage. Forking the command straight from this benchmark would not do: on Linux a child's
# ru_maxrss starts from the RSS of the process it was forked from (this one holds torch and more),
# so `cat` would show ~900 MB. The launcher also times the command without interpreter start-up.
LAUNCHER = r"""
import json, os, resource, sys, time
report, cmd = sys.argv[1], sys.argv[2:]
t0 = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status = os.waitpid(pid, 0)
wall = time.perf_counter() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(report, "w") as f:
    json.dump({"wall_s": wall, "rc": os.waitstatus_to_exitcode(status),
               "ru_maxrss_kib": ru.ru_maxrss, "user_s": ru.ru_utime, "sys_s": ru.ru_stime}, f)
"""


def measure(cmd: list[str], log_path: Path, env: dict[str, str] | None, cwd: Path,
            devnull_stdout: bool = False) -> dict:
    """Run ``cmd`` once through the launcher: wall time, peak tree RSS (polled, launcher
    excluded), ``ru_maxrss`` from the launcher's ``getrusage(RUSAGE_CHILDREN)`` and CPU times."""
    report = log_path.with_suffix(".rusage.json")
    report.unlink(missing_ok=True)
    with open(log_path, "wb") as logf:
        stdout = subprocess.DEVNULL if devnull_stdout else logf
        busy0 = _busy_cpu_s()
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", LAUNCHER, str(report), *cmd],
                                stdout=stdout, stderr=logf, env=env, cwd=cwd)
        poller = TreeRssPoller(proc.pid, include_root=False)
        poller.start()
        proc.wait()
        outer_wall = time.perf_counter() - t0
        poller.stop()
        busy = _busy_cpu_s() - busy0
    try:
        ru = json.loads(report.read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # launcher itself failed
        ru = {"wall_s": outer_wall, "rc": proc.returncode or 1, "ru_maxrss_kib": 0,
              "user_s": 0.0, "sys_s": 0.0}
    return {
        "rc": ru["rc"],
        "wall_s": ru["wall_s"],
        "outer_wall_s": outer_wall,
        "peak_rss_tree_mb": poller.peak_rss / MB,
        "peak_anon_rss_tree_mb": poller.peak_anon / MB,
        "rss_samples": poller.samples,
        "ru_maxrss_mb": ru["ru_maxrss_kib"] * 1024 / MB,  # largest single process of the tree
        "user_s": ru["user_s"],
        "sys_s": ru["sys_s"],
        # CPU used by everything else on the machine meanwhile (other jobs, kernel threads,
        # the launcher): a contamination indicator, in cores on average
        "other_cpu_cores": max(0.0, busy - ru["user_s"] - ru["sys_s"] - poller.cpu_s)
        / outer_wall,
        "poller_cpu_s": poller.cpu_s,
        "loadavg_1m_after": os.getloadavg()[0],
        "log": str(log_path),
    }


# --------------------------------------------------------------------------- tools


@dataclass
class Tool:
    """One measured command: how to run it, where it writes, how to pre-warm its code."""

    name: str
    cmd: list[str]
    out_dir: Path | None = None
    prewarm: list[str] | None = None
    env: dict[str, str] | None = None
    devnull_stdout: bool = False
    notes: list[str] = field(default_factory=list)
    config_text: str | None = None  # a config file the command reads (recorded in the JSON)


def _ours_prefix(ours_cmd: str | None) -> tuple[list[str] | None, str]:
    if ours_cmd:
        return shlex.split(ours_cmd), "from --ours-cmd"
    beside = Path(sys.executable).parent / "hf-model-stock"  # not a version manager's shim on PATH
    if beside.is_file():
        return [str(beside)], "hf-model-stock beside the benchmark's python"
    exe = shutil.which("hf-model-stock")
    if exe:
        return [exe], "hf-model-stock on PATH"
    if (REPO_ROOT / "hf_model_stock" / "cli.py").exists():
        return [sys.executable, "-m", "hf_model_stock.cli"], "python -m hf_model_stock.cli"
    return None, "no hf-model-stock on PATH and no hf_model_stock/cli.py in the repo"


def ours_tool(args: argparse.Namespace, models: BuiltModels, device: str) -> Tool | str:
    """Our CLI as a Tool, or the reason it cannot run."""
    prefix, how = _ours_prefix(args.ours_cmd)
    if prefix is None:
        return how
    name = "ours" if device == "cpu" else f"ours-{device}"
    out = args.workdir / "out" / name
    cmd = [*prefix, "merge", "--base", str(models.base)]
    for m in models.finetunes:
        cmd += ["--model", str(m)]
    cmd += ["--out", str(out), "-q", "--device", device, *shlex.split(args.ours_extra_args)]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    # "cold" means cold inputs: our code and its libraries are read once here
    prewarm = [sys.executable, "-c", "try:\n import hf_model_stock.cli, hf_model_stock.workflow\n"
               " from hf_model_stock.methods import fused_cpu\n"
               "except Exception:\n pass"]
    return Tool(name, cmd, out, prewarm, env, notes=[how])


MERGEKIT_FLAGS = ["--no-cuda", "--lazy-unpickle", "--quiet", "--no-copy-tokenizer"]


def mergekit_tool(args: argparse.Namespace, models: BuiltModels) -> Tool | str:
    """mergekit ``model_stock`` from its venv as a Tool, or the reason it cannot run."""
    if args.skip_mergekit:
        return "--skip-mergekit"
    venv = Path(args.mergekit_venv)
    exe = venv / "bin" / "mergekit-yaml"
    if not exe.exists():
        return f"{exe} not found"
    cfg = args.workdir / "mergekit_model_stock.yml"
    lines = [
        "merge_method: model_stock",
        f"base_model: {json.dumps(str(models.base))}",
        "models:",
        *[f"  - model: {json.dumps(str(m))}" for m in models.finetunes],
        f"dtype: {args.mergekit_dtype}",
    ]
    if args.mergekit_dtype != "bfloat16":
        lines.append("out_dtype: bfloat16")
    cfg.write_text("\n".join(lines) + "\n")
    out = args.workdir / "out" / "mergekit"
    cmd = [str(exe), str(cfg), str(out), *MERGEKIT_FLAGS, *shlex.split(args.mergekit_extra_args)]
    prewarm = [str(venv / "bin" / "python"), "-c", "import torch, safetensors, mergekit.merge"]
    return Tool("mergekit", cmd, out, prewarm, notes=[f"config file: {cfg}"],
                config_text=cfg.read_text())


def cat_tool(files: list[Path]) -> Tool:
    return Tool("cat", ["cat", *map(str, files)], devnull_stdout=True)


# --------------------------------------------------------------------------- running


def run_one(tool: Tool, mode: str, rep: int, files: list[Path], cache: PageCache,
            workdir: Path, input_bytes: int, wait_idle_s: float = 0.0) -> dict:
    """Prepare the cache for ``mode`` ('warm'/'cold'), run ``tool`` once and describe it."""
    if tool.out_dir is not None and tool.out_dir.exists():
        shutil.rmtree(tool.out_dir)
    resident, drop_attempts = None, 0
    if mode == "warm":
        cache.warm(files)
    else:
        drop_attempts = cache.drop(files)
        if tool.prewarm:
            subprocess.run(tool.prewarm, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           env=tool.env)
        resident = cache.resident_bytes(files)
    os.sync()
    waited, busy_before = wait_for_idle(wait_idle_s) if wait_idle_s > 0 else (0.0, None)
    log_path = workdir / "logs" / f"{tool.name}-{mode}-{rep}.log"
    res = measure(tool.cmd, log_path, tool.env, workdir, tool.devnull_stdout)
    t0 = time.perf_counter()
    os.sync()  # flush the outputs now so the next run does not pay for them
    res.update(
        tool=tool.name, mode=mode, rep=rep,
        sync_after_s=time.perf_counter() - t0,
        idle_wait_s=waited, busy_cores_before=busy_before,
        input_resident_before_mb=None if resident is None else resident / MB,
        drop_attempts=drop_attempts,
        input_mb_per_s=input_bytes / MB / res["wall_s"],
    )
    if res["rc"] != 0:
        tail = log_path.read_text(errors="replace")[-1500:]
        log(f"{tool.name} {mode} rep {rep} FAILED rc={res['rc']}:\n{tail}")
        res["stderr_tail"] = tail
    else:
        log(f"{tool.name:10s} {mode} rep {rep}: {res['wall_s']:7.2f} s  "
            f"{res['input_mb_per_s']:7.1f} MB/s  peak tree RSS {res['peak_rss_tree_mb']:8.1f} MB  "
            f"other load {res['other_cpu_cores']:.2f} cores (waited {waited:.0f} s)")
    return res


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Median/min wall time, MB/s and peak memory per (tool, mode), successful runs only."""
    summary: dict[str, dict] = {}
    for key in sorted({(r["tool"], r["mode"]) for r in runs}):
        ok = [r for r in runs if (r["tool"], r["mode"]) == key and r["rc"] == 0]
        failed = sum(1 for r in runs if (r["tool"], r["mode"]) == key and r["rc"] != 0)
        if not ok:
            summary["/".join(key)] = {"tool": key[0], "mode": key[1], "ok": 0, "failed": failed}
            continue
        walls = [r["wall_s"] for r in ok]
        summary["/".join(key)] = {
            "tool": key[0], "mode": key[1], "ok": len(ok), "failed": failed,
            "wall_median_s": statistics.median(walls),
            "wall_min_s": min(walls),
            "mb_per_s_median": statistics.median(r["input_mb_per_s"] for r in ok),
            "peak_rss_tree_mb_max": max(r["peak_rss_tree_mb"] for r in ok),
            "peak_rss_tree_mb_median": statistics.median(r["peak_rss_tree_mb"] for r in ok),
            "peak_anon_rss_tree_mb_max": max(r["peak_anon_rss_tree_mb"] for r in ok),
            "ru_maxrss_mb_max": max(r["ru_maxrss_mb"] for r in ok),
            "cpu_s_median": statistics.median(r["user_s"] + r["sys_s"] for r in ok),
            "other_cpu_cores_max": max(r["other_cpu_cores"] for r in ok),
            # cold runs only: input bytes still cached when the run started (should be ~0)
            "input_resident_before_mb_max": max(
                (r["input_resident_before_mb"] or 0.0 for r in ok), default=0.0),
        }
    return summary


def _last_run_ok(runs: list[dict], tool: str) -> bool:
    """True when the latest run of ``tool`` (whose output is on disk) succeeded."""
    mine = [r for r in runs if r["tool"] == tool]
    return bool(mine) and mine[-1]["rc"] == 0


def ratios(summary: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Ratios of wall times measured in this run (e.g. ours/cat warm), of the medians and of the
    minima (the minimum is the estimate least disturbed by other load on a shared machine)."""
    pairs = [("ours", "cat"), ("mergekit", "ours"), ("mergekit", "cat"), ("ours-cuda", "ours")]
    out: dict[str, dict[str, float]] = {}
    for a, b in pairs:
        for mode in ("warm", "cold"):
            sa, sb = summary.get(f"{a}/{mode}", {}), summary.get(f"{b}/{mode}", {})
            if "wall_median_s" in sa and "wall_median_s" in sb:
                out[f"{a}/{b} {mode}"] = {
                    "median": sa["wall_median_s"] / sb["wall_median_s"],
                    "min": sa["wall_min_s"] / sb["wall_min_s"],
                }
    return out


# --------------------------------------------------------------------------- reporting


def fault_in_gib_per_s(gib: float = 1.0) -> float:
    """Allocate-and-touch bandwidth of fresh anonymous memory (slow in some VMs; it bounds how
    fast any tool can fill new buffers)."""
    t0 = time.perf_counter()
    x = torch.ones(int(gib * 2**30) // 4)
    dt = time.perf_counter() - t0
    del x
    return gib / dt


def machine_info(cache_method: str, mergekit_venv: Path) -> dict:
    def version(pkg: str) -> str | None:
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    cpu_model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), platform.processor())
    info = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "ram_gib": psutil.virtual_memory().total / 2**30,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "safetensors": version("safetensors"),
        "transformers": version("transformers"),
        "psutil": psutil.__version__,
        "hf_model_stock": version("hf-model-stock"),
        "drop_cache_method": cache_method,
        "fault_in_gib_per_s": fault_in_gib_per_s(),
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    py = mergekit_venv / "bin" / "python"
    if py.exists():
        code = ("import importlib.metadata as m, torch; "
                "print(m.version('mergekit'), torch.__version__)")
        out = subprocess.run([str(py), "-c", code], capture_output=True, text=True)
        if out.returncode == 0:
            info["mergekit"], info["mergekit_torch"] = out.stdout.split()
    return info


def markdown(summary: dict[str, dict], rat: dict[str, dict[str, float]], accuracy: list[dict],
             header: str) -> str:
    lines = [header, "",
             "| tool | cache | median s | min s | MB/s (median) | peak tree RSS MB (max) "
             "| peak anon RSS MB (max) | ru_maxrss MB (max) | CPU s (median) "
             "| other load, cores (max) | runs ok/failed |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for s in summary.values():
        if not s["ok"]:
            lines.append(f"| {s['tool']} | {s['mode']} |" + " - |" * 8 + f" 0/{s['failed']} |")
            continue
        lines.append(
            f"| {s['tool']} | {s['mode']} | {s['wall_median_s']:.2f} | {s['wall_min_s']:.2f} "
            f"| {s['mb_per_s_median']:.0f} | {s['peak_rss_tree_mb_max']:.0f} "
            f"| {s['peak_anon_rss_tree_mb_max']:.0f} | {s['ru_maxrss_mb_max']:.0f} "
            f"| {s['cpu_s_median']:.1f} | {s['other_cpu_cores_max']:.2f} "
            f"| {s['ok']}/{s['failed']} |")
    leaky = [f"{s['tool']}: {s['input_resident_before_mb_max']:.0f} MB" for s in summary.values()
             if s["mode"] == "cold" and s.get("input_resident_before_mb_max", 0) > 1]
    if leaky:
        lines += ["", "WARNING: inputs still cached at the start of a cold run: " + ", ".join(leaky)]
    if rat:
        lines += ["", "| ratio of wall times | of medians | of minima |", "|---|---:|---:|"]
        lines += [f"| {k} | {v['median']:.2f} | {v['min']:.2f} |" for k, v in rat.items()]
    if accuracy:
        lines += ["", "Accuracy vs float64 Model Stock reference (authors' formula, eps 1e-8, "
                  "t clamped to [0, 1]):", "",
                  "| tensor | numel | t ref | output | implied t | max abs err | rms err "
                  "| != bf16(ref) | > 1 ulp |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
        for rep in accuracy:
            numel = 1
            for d in rep["shape"]:
                numel *= d
            for name, o in rep["outputs"].items():
                it = "-" if o["implied_t"] is None else f"{o['implied_t']:.4f}"
                lines.append(
                    f"| {rep['name']} | {numel} | {rep['t_ref']:.4f} | {name} | {it} "
                    f"| {o['max_abs_err']:.2e} | {o['rms_err']:.2e} "
                    f"| {100 * o['frac_mismatch_vs_ref_bf16']:.2f}% "
                    f"| {100 * o['frac_over_1ulp']:.2f}% |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size-gb", type=float, default=0.92,
                   help="GiB per checkpoint (bf16); sets the layer count")
    p.add_argument("--models", type=int, default=3, help="number of fine-tunes N")
    p.add_argument("--cosine", type=float, default=0.3, help="target pairwise delta cosine")
    p.add_argument("--delta-rel", type=float, default=0.01, help="||delta|| / ||w0||")
    p.add_argument("--embedding-gb", type=float, default=None,
                   help="grow the vocabulary so embed_tokens (and the untied lm_head) is this "
                        "many GiB: the 'tensor larger than the chunk budget' case")
    p.add_argument("--hidden-size", type=int, default=2048,
                   help="halved (with --intermediate-size) until 2 layers fit a small --size-gb")
    p.add_argument("--intermediate-size", type=int, default=5632)
    p.add_argument("--shard-mb", type=int, default=500, help="max input shard size (MB)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (part of the cache key)")
    p.add_argument("--repeat", type=int, default=3, help="runs per tool and cache mode")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/hfms-bench"),
                   help="models (cached by parameters), outputs and logs")
    p.add_argument("--skip-mergekit", action="store_true", help="do not run mergekit")
    p.add_argument("--skip-cold", action="store_true", help="warm page cache only")
    p.add_argument("--skip-ours", action="store_true", help="do not run our CLI")
    p.add_argument("--skip-accuracy", action="store_true", help="no float64 reference check")
    p.add_argument("--mergekit-venv", type=Path, default=Path("/work/mergekit-venv"),
                   help="venv with mergekit installed (skipped if absent)")
    p.add_argument("--mergekit-dtype", default="bfloat16",
                   help="mergekit 'dtype' (compute dtype); output stays bfloat16")
    p.add_argument("--mergekit-extra-args", default="", help="appended to mergekit-yaml")
    p.add_argument("--ours-cmd", default=None,
                   help="command prefix for our CLI (default: hf-model-stock, else "
                        "python -m hf_model_stock.cli); 'merge --base ...' is appended")
    p.add_argument("--ours-extra-args", default="", help="appended to our merge command")
    p.add_argument("--wait-idle", type=float, default=120.0,
                   help="before each run wait up to this many seconds for the machine to be "
                        "idle (< 0.3 busy cores); 0 disables. Other load is recorded per run")
    p.add_argument("--out", type=Path, default=Path("bench.json"), help="JSON results")
    args = p.parse_args(argv)
    if args.models < 2:
        p.error("--models must be >= 2 (Model Stock needs at least two fine-tunes)")
    args.workdir = args.workdir.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    (args.workdir / "logs").mkdir(parents=True, exist_ok=True)
    spec = ModelSpec.for_size(args.size_gb, args.embedding_gb, args.hidden_size,
                              args.intermediate_size)
    models = build_models(spec, args.models, args.cosine, args.workdir, args.delta_rel,
                          args.shard_mb, args.seed, log=log)
    files = models.input_files()
    input_bytes = models.input_bytes()
    cache = PageCache()
    log(f"inputs: {len(files)} files, {input_bytes / 2**30:.2f} GiB; cache method {cache.method}")

    tools: list[Tool] = [cat_tool(files)]
    skipped: dict[str, str] = {}
    candidates: list[tuple[str, Tool | str]] = []
    if not args.skip_ours:
        candidates.append(("ours", ours_tool(args, models, "cpu")))
        if torch.cuda.is_available():
            candidates.append(("ours-cuda", ours_tool(args, models, "cuda")))
        else:
            skipped["ours-cuda"] = "torch.cuda.is_available() is False"
    else:
        skipped["ours"] = "--skip-ours"
    candidates.append(("mergekit", mergekit_tool(args, models)))
    for name, t in candidates:
        if isinstance(t, Tool):
            tools.append(t)
        else:
            skipped[name] = t
            log(f"skipping {name}: {t}")

    modes = ["warm"] if args.skip_cold else ["warm", "cold"]
    runs: list[dict] = []
    for rep in range(args.repeat):  # round-robin so drift hits every tool alike
        for tool in tools:
            for mode in (modes if rep % 2 == 0 else modes[::-1]):  # alternate warm/cold order
                runs.append(run_one(tool, mode, rep, files, cache, args.workdir, input_bytes,
                                    args.wait_idle))

    summary = summarize(runs)
    rat = ratios(summary)
    accuracy: list[dict] = []
    if not args.skip_accuracy:
        outs = {t.name: t.out_dir for t in tools
                if t.out_dir is not None and _last_run_ok(runs, t.name) and t.out_dir.exists()}
        if outs:
            log(f"accuracy check of {sorted(outs)} against the float64 reference")
            reports = compare_models(models.base, models.finetunes, outs, log=log)
            accuracy = [r.as_dict() for r in reports]

    header = (f"Model Stock merge benchmark: base + {args.models} x {spec.num_params() * 2 / 2**30:.2f}"
              f" GiB bf16 ({spec.num_hidden_layers} layers, vocab {spec.vocab_size}), "
              f"{input_bytes / 2**30:.2f} GiB read, {args.repeat} repeats, "
              f"{os.cpu_count()} CPUs, cache drop: {cache.method}")
    table = markdown(summary, rat, accuracy, header)
    print(table)
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": machine_info(cache.method, args.mergekit_venv),
        "models": {
            "root": str(models.root), "spec": asdict(spec),
            "num_params": spec.num_params(), "input_files": [str(f) for f in files],
            "input_bytes": input_bytes, "build_seconds": models.build_seconds,
            "cosine_target": args.cosine, "delta_rel": args.delta_rel,
        },
        "definitions": {
            "cold": "inputs evicted from page cache (drop_cache_method), then the tool's "
                    "interpreter/libraries re-warmed by an untimed import",
            "warm": "untimed cat of all inputs right before the run",
            "peak_rss_tree_mb": "max over ~20 ms polls of summed VmRSS of the process tree "
                                "(includes mmapped file pages)",
            "peak_anon_rss_tree_mb": "same for RssAnon (heap, no file pages)",
            "ru_maxrss_mb": "getrusage(RUSAGE_CHILDREN) in a tiny launcher that forks the "
                            "command: max RSS of a single process of the tree",
            "wall_s": "timed inside the launcher (fork to exit), without its start-up",
            "input_mb_per_s": "input bytes (all shards of base + fine-tunes) / wall time",
            "other_cpu_cores": "machine-wide busy CPU minus the command's own and the RSS "
                               "poller's, per second of wall time; well above ~0.05 means "
                               "other jobs competed",
        },
        "commands": {t.name: t.cmd for t in tools},
        "tool_notes": {t.name: t.notes for t in tools},
        "tool_configs": {t.name: t.config_text for t in tools if t.config_text},
        "skipped": skipped,
        "runs": runs,
        "summary": summary,
        "ratios": rat,
        "accuracy": accuracy,
        "markdown": table,
    }
    args.out.write_text(json.dumps(result, indent=2))
    log(f"wrote {args.out}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
