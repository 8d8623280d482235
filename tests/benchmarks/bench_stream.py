"""Streaming benchmark: merge straight from a Hub (``--stream``) against downloading first.

The Hub is the stand-in of ``tests/fake_hub.py`` (a test double on 127.0.0.1, in its own process,
the four repos in its memory) with a bandwidth cap shared by all connections. Per cap, measured one
after another with a fresh HF cache each:

- (a) ``hf-model-stock merge --stream`` from the four repos;
- (b) ``snapshot_download`` of the four repos (at once, 8 connections each), then our merge of the
  downloaded snapshots (their pages still in the page cache: just written);
- (c) the same download, then mergekit ``model_stock`` (if its venv exists, see README.md).

Each command runs in a wrapper that records, at its end, ``/proc/self/io`` (``write_bytes`` and
``cancelled_write_bytes``: bytes sent to the storage layer, and those truncated before writeback),
through bench_merge's launcher (wall time, peak RSS of the process tree).

    python tests/benchmarks/bench_stream.py --size-gb 0.92 --bandwidth-mb 100 1000 --out stream.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))

MB = 10**6
REPOS = ["org/base", "org/ft1", "org/ft2", "org/ft3"]

# Runs one job in this interpreter and writes /proc/self/io (all threads, finished ones included).
WRAPPER = r"""
import json, os, sys
io_path, mode, args = sys.argv[1], sys.argv[2], sys.argv[3:]
rc = 0
try:
    if mode == "ours":
        from hf_model_stock.cli import main
        rc = main(args)
    elif mode == "download":
        from concurrent.futures import ThreadPoolExecutor
        from huggingface_hub import snapshot_download
        with ThreadPoolExecutor(len(args)) as pool:
            paths = list(pool.map(lambda r: snapshot_download(r, allow_patterns=["*.safetensors", "*.json"]), args))
        print(json.dumps(paths))
    elif mode == "mergekit":
        from mergekit.scripts.run_yaml import main
        try:
            main(args)
        except SystemExit as exc:
            rc = exc.code or 0
finally:
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    with open(io_path, "w") as f:
        json.dump({k: int(v) for k, v in io.items()}, f)
sys.exit(rc)
"""


def serve(args: argparse.Namespace) -> None:
    """Run the Hub stand-in with the models in memory until killed; write its URL to --url-file."""
    from tests.fake_hub import FakeHub

    dirs = [Path(d) for d in args.dirs]
    with FakeHub(max_threads=128, timeout=120.0, bandwidth=args.bandwidth_mb * MB if args.bandwidth_mb else None,
                 cdn=not args.no_cdn, keep_alive=not args.no_keep_alive) as hub:
        for repo, d in zip(REPOS, dirs):
            hub.add_commit(repo, d)
            for blob in hub.repos[repo].commits[hub.repos[repo].branches["main"]].values():
                _ = blob.sha256  # computed now, not during the first run's tree listing
        Path(args.url_file).write_text(hub.url)
        while True:
            time.sleep(3600)


def start_hub(dirs: list[Path], bandwidth_mb: float, work: Path, flags: list[str]) -> tuple[subprocess.Popen, str]:
    url_file = work / "hub-url"
    url_file.unlink(missing_ok=True)
    proc = subprocess.Popen([sys.executable, __file__, "serve", "--url-file", str(url_file),
                             "--bandwidth-mb", str(bandwidth_mb), *flags, *map(str, dirs)], cwd=REPO)
    while not url_file.exists():
        if proc.poll() is not None:
            raise SystemExit("the Hub stand-in did not start")
        time.sleep(0.2)
    return proc, url_file.read_text()


def job(measure, name: str, mode: str, args: list[str], env: dict[str, str], work: Path,
        python: str = sys.executable) -> dict:
    io_path = work / f"{name}.io.json"
    io_path.unlink(missing_ok=True)
    log = work / f"{name}.log"
    result = measure([python, "-c", WRAPPER, str(io_path), mode, *args], log, env, work)
    io = json.loads(io_path.read_text()) if io_path.exists() else {}
    result["write_bytes"] = io.get("write_bytes", 0)
    result["cancelled_write_bytes"] = io.get("cancelled_write_bytes", 0)
    result["net_write_bytes"] = result["write_bytes"] - result["cancelled_write_bytes"]
    if result["rc"] != 0:
        print(f"{name} failed (rc {result['rc']}), see {log}:\n{log.read_text()[-2000:]}", file=sys.stderr)
    return result


def client_env(url: str, root: Path, cache: str) -> dict[str, str]:
    """The environment of a client of the stand-in at ``url``: its own HF cache under ``root``, no token."""
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    e.update({"HF_ENDPOINT": url, "HF_HUB_CACHE": str(root / cache), "HF_HUB_DISABLE_XET": "1",
              "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN_PATH": str(root / "no-token"),
              "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(REPO)})
    return e


def stream_args(out: Path) -> list[str]:
    """Our CLI's arguments for (a): merge the four repos with ``--stream`` into ``out``."""
    models = sum([["--model", r] for r in REPOS[1:]], [])
    return ["merge", "--base", REPOS[0], *models, "--out", str(out), "--stream", "-q", "--device", "cpu"]


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench(args: argparse.Namespace) -> dict:
    from bench_merge import measure
    from synth_checkpoints import ModelSpec, build_models

    work = Path(args.workdir)
    built = build_models(ModelSpec.for_size(args.size_gb), 3, args.cosine, work)
    dirs = [built.base, *built.finetunes]
    input_bytes = sum(dir_bytes(d) for d in dirs)
    mergekit = Path(args.mergekit_venv) / "bin" / "python"
    results: dict = {"size_gb": args.size_gb, "input_bytes": input_bytes, "runs": []}
    for bw in args.bandwidth_mb:
        hub, url = start_hub(dirs, bw, work, [f for f, on in (("--no-cdn", args.no_cdn),
                                                              ("--no-keep-alive", args.no_keep_alive)) if on])
        try:
            if not args.no_warmup:  # untimed: on a VM, the first run after the stand-in fills 4 GB pays for new pages
                warm = work / "warmup"
                shutil.rmtree(warm, ignore_errors=True)
                warm.mkdir(parents=True)
                if job(measure, "warmup", "ours", stream_args(warm / "out"), client_env(url, warm, "cache"), warm)["rc"]:
                    raise SystemExit("the warm-up --stream run failed")
                shutil.rmtree(warm, ignore_errors=True)
            for rep in range(args.repeat):
                runs = {}
                root = work / "stream-runs"
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir(parents=True)

                def env(cache: str, root: Path = root, url: str = url) -> dict[str, str]:
                    return client_env(url, root, cache)

                out_a = root / "out-stream"
                runs["stream"] = job(measure, "stream", "ours", stream_args(out_a), env("cache-a"), root)
                runs["stream"]["output_bytes"] = dir_bytes(out_a) if out_a.exists() else 0
                shutil.rmtree(out_a, ignore_errors=True)
                if args.only_stream:
                    print(json.dumps({k: runs["stream"][k] for k in ("wall_s", "peak_rss_tree_mb", "ru_maxrss_mb",
                                                                     "net_write_bytes", "output_bytes")}), flush=True)
                    continue
                runs["download"] = job(measure, "download", "download", REPOS, env("cache-b"), root)
                snaps = json.loads((root / "download.log").read_text().strip().splitlines()[-1])
                out_b = root / "out-ours"
                local = sum([["--model", s] for s in snaps[1:]], [])
                runs["ours_after_download"] = job(measure, "ours", "ours", ["merge", "--base", snaps[0], *local, "--out",
                                                  str(out_b), "-q", "--device", "cpu"], env("cache-b"), root)
                runs["ours_after_download"]["output_bytes"] = dir_bytes(out_b) if out_b.exists() else 0
                shutil.rmtree(out_b, ignore_errors=True)
                if mergekit.exists():
                    cfg = root / "mergekit.yml"
                    cfg.write_text("merge_method: model_stock\nbase_model: " + snaps[0] + "\nmodels:\n"
                                   + "".join(f"  - model: {s}\n" for s in snaps[1:]) + "dtype: bfloat16\n")
                    out_c = root / "out-mergekit"
                    runs["mergekit_after_download"] = job(
                        measure, "mergekit", "mergekit", [str(cfg), str(out_c), "--no-cuda", "--lazy-unpickle",
                                                          "--quiet", "--no-copy-tokenizer"], env("cache-b"), root, str(mergekit))
                    shutil.rmtree(out_c, ignore_errors=True)
                else:
                    runs["mergekit_after_download"] = {"skipped": f"no {mergekit}"}
                shutil.rmtree(root / "cache-b", ignore_errors=True)
                results["runs"].append({"bandwidth_mb_s": bw, "repeat": rep, **runs})
                print(json.dumps(summary_row(bw, runs)), flush=True)
        finally:
            hub.kill()
            hub.wait()
    return results


def summary_row(bw: float, runs: dict) -> dict:
    s, d, o = runs["stream"], runs["download"], runs["ours_after_download"]
    m = runs.get("mergekit_after_download", {})
    row = {"bandwidth_mb_s": bw, "stream_s": s["wall_s"], "download_s": d["wall_s"], "ours_after_s": o["wall_s"],
           "download_then_ours_s": d["wall_s"] + o["wall_s"], "stream_over_download": s["wall_s"] / d["wall_s"],
           "stream_peak_rss_mb": s["peak_rss_tree_mb"], "stream_net_write_mb": s["net_write_bytes"] / MB,
           "stream_write_mb": s["write_bytes"] / MB, "output_mb": s.get("output_bytes", 0) / MB,
           "download_then_ours_write_mb": (d["net_write_bytes"] + o["net_write_bytes"]) / MB,
           "ours_peak_rss_mb": o["peak_rss_tree_mb"]}
    if "wall_s" in m:
        row.update({"mergekit_after_s": m["wall_s"], "download_then_mergekit_s": d["wall_s"] + m["wall_s"],
                    "mergekit_peak_rss_mb": m["peak_rss_tree_mb"]})
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd")
    s = sub.add_parser("serve")
    s.add_argument("--url-file", required=True)
    s.add_argument("--bandwidth-mb", type=float, default=0)
    s.add_argument("dirs", nargs=4)
    for q in (s, p):
        q.add_argument("--no-cdn", action="store_true", help="serve LFS files from the Hub's URL, not by a redirect "
                       "to signed URLs on a storage origin (as the Hub does)")
        q.add_argument("--no-keep-alive", action="store_true", help="one request per connection")
    p.add_argument("--size-gb", type=float, default=0.92)
    p.add_argument("--cosine", type=float, default=0.5)
    p.add_argument("--bandwidth-mb", type=float, nargs="+", default=[100.0, 1000.0], help="caps in MB/s (10^6)")
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--workdir", default="/tmp/hfms-bench")
    p.add_argument("--mergekit-venv", default="/work/mergekit-venv")
    p.add_argument("--out", type=Path)
    p.add_argument("--only-stream", action="store_true", help="run (a) alone (a quick check)")
    p.add_argument("--no-warmup", action="store_true", help="no untimed --stream run before the first timed one")
    args = p.parse_args()
    if args.cmd == "serve":
        serve(args)
        return
    results = bench(args)
    results["summary"] = [summary_row(r["bandwidth_mb_s"], r) for r in results["runs"] if "download" in r]
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
