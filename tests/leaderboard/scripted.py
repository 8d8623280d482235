"""A scripted evaluation for leaderboard tests: ``<models>/scripts/<model>.json`` says what a model
scores (or how it dies), so a merge the leaderboard builds can have a script before it exists; every
call is appended to ``<models>/calls.jsonl``, so tests can count what was (re)evaluated.

    {"scores": {"gsm8k": 0.5, "mmlu_pro": 0.325}, "fail": null | "raise" | "segfault" | "exit"}
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
from pathlib import Path
from typing import Any

from hf_model_stock.evaluation.summary import normalised
from hf_model_stock.evaluation.tasks import BENCHMARKS
from hf_model_stock.leaderboard.executors import Job

CALLS = "calls.jsonl"


def write_script(root: Path, name: str, scores: dict[str, float], fail: str | None = None) -> None:
    """What the model ``root/name`` will score (or how it will fail)."""
    (root / "scripts").mkdir(parents=True, exist_ok=True)
    (root / "scripts" / f"{name}.json").write_text(json.dumps({"scores": scores, "fail": fail}), encoding="utf-8")


def make_model(root: Path, name: str, scores: dict[str, float], fail: str | None = None, seed: int = 0) -> Path:
    """A model directory with a tiny weight file (``seed`` sets its content, hence its identity) and
    its script."""
    import torch
    from safetensors.torch import save_file

    directory = root / name
    directory.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((4, 4), float(seed))}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    write_script(root, name, scores, fail)
    return directory


def calls(root: Path) -> list[dict[str, Any]]:
    """Every evaluation the scripted evaluator ran under ``root``: {"model", "tasks"}."""
    path = root / CALLS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def scripted_evaluate(job: Job) -> dict[str, Any]:
    """The model's scripted scores as an ``EvalSummary`` dict (or the failure it asks for)."""
    model = Path(job.ref)
    script = json.loads((model.parent / "scripts" / f"{model.name}.json").read_text(encoding="utf-8"))
    with (model.parent / CALLS).open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"model": model.name, "tasks": job.spec["tasks"]}) + "\n")
    print(f"scripted evaluation of {model.name}: {job.spec['tasks']}")  # goes to the job's log
    fail = script.get("fail")
    if fail == "raise":
        raise RuntimeError(f"scripted failure of {model.name}\nsecond line of the message")
    if fail == "segfault":
        ctypes.string_at(0)  # a real SIGSEGV in the evaluating process
    if fail == "exit":
        os.kill(os.getpid(), signal.SIGKILL)
    scores = []
    for task in job.spec["tasks"]:
        benchmark = BENCHMARKS[task]
        value = script["scores"][task]
        scores.append({"task": task, "lm_eval_task": benchmark.lm_eval_task, "metric": benchmark.metrics[0],
                       "value": value, "stderr": 0.01, "n": 100,
                       "normalised": normalised(value, benchmark.random_baseline),
                       "higher_is_better": benchmark.higher_is_better, "data": "scripted"})
    return {"model": job.ref, "created": "2026-01-01T00:00:00+00:00", "scores": scores, "notes": []}
