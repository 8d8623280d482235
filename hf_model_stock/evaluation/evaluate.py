"""Evaluate one model: check the request, write the task configs, run lm-eval, judge HarmBench, summarise.

Everything that can be checked without the weights is checked first (options, data files, task
configs), so a mistake surfaces in seconds rather than after a download.

Files under ``<output>/<model>/`` (``<output>`` defaults to ``./eval-results``):
  summary.json                       our summary (also returned as ``EvalSummary``); ``files`` names the rest
  lm_eval/<name>/results_<ts>.json   written by lm-eval's own ``EvaluationTracker``, as ``lm_eval
  lm_eval/<name>/samples_<task>_<ts>.jsonl   --output_path <dir>/lm_eval --log_samples`` lays them out
  harmbench/<name>/results_<ts>.json, samples_hfms_harmbench_<ts>.jsonl (the same, for the completions)
  harmbench/judgements.jsonl         one verdict per behavior
  task_configs/*.yaml                the exact lm-eval task configs that ran (``--include_path`` for lm_eval)
``<name>`` is the model reference as lm-eval sanitises it (``org__name``).
"""

from __future__ import annotations

import copy
import gc
import importlib.util
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_model_stock.eval_spec import EvalSpec
from hf_model_stock.evaluation.data import TaskData, resolve_data
from hf_model_stock.evaluation.errors import EvalError
from hf_model_stock.evaluation.lm_tasks import (
    check_task_data,
    leaderboard_baselines,
    lm_eval_entry,
    registry,
    run_task_manager,
    subsets,
    task_config_digest,
    write_task_config,
)
from hf_model_stock.evaluation.summary import (
    EvalSummary,
    Score,
    lm_eval_scores,
    normalised,
    task_scores,
)
from hf_model_stock.evaluation.tasks import BENCHMARKS, GSM8K_FEWSHOT_POOL, Benchmark, benchmark_for
from hf_model_stock.versions import installed_version

if TYPE_CHECKING:
    from lm_eval.api.model import LM
    from lm_eval.loggers import EvaluationTracker

    from hf_model_stock.evaluation.harmbench import Judge

DEFAULT_OUTPUT = Path("eval-results")
HARMBENCH = BENCHMARKS["harmbench"]


@dataclass
class PreparedRun:
    """A checked request with its task configs written; ``execute`` runs it on a model."""

    model: str
    spec: EvalSpec
    run_dir: Path
    benchmarks: list[Benchmark]
    data: dict[str, TaskData]
    notes: list[str] = field(default_factory=list)

    def execute(self, make_lm: Callable[[], LM], *, revision: str | None = None, sha: str | None = None,
                path: str = "", judge: Judge | None = None) -> EvalSummary:
        """Run the evaluations on ``make_lm()``; HarmBench is judged by ``judge``, else by the
        classifier named in the spec (loaded after the evaluated model is released)."""
        summary = EvalSummary(model=self.model, revision=revision, sha=sha, path=path,
                              created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                              versions=_versions(), spec=self.spec.model_dump(mode="json"), notes=list(self.notes))
        curated = any(b.curated for b in self.benchmarks)
        manager = run_task_manager(self.run_dir / "task_configs") if curated else None
        lm = make_lm()
        capability = [b for b in self.benchmarks if b is not HARMBENCH and b.curated]
        if capability:
            results, tracker = self._lm_eval(lm, [b.lm_eval_task for b in capability], manager,
                                             self.spec.apply_chat_template, "lm_eval")
            summary.files.update(_write_lm_eval(results, tracker, self.run_dir, "lm_eval"))
            for benchmark in capability:
                summary.scores += lm_eval_scores(benchmark, results, self.data[benchmark.name].describe())
        others = [b for b in self.benchmarks if not b.curated]
        if others:  # lm-eval's own configs (and the user's), through its full index
            results, tracker = self._lm_eval(lm, [b.name for b in others], registry(self.spec.include_path),
                                             self.spec.apply_chat_template, "lm_eval_tasks")
            summary.files.update(_write_lm_eval(results, tracker, self.run_dir, "lm_eval_tasks"))
            for benchmark in others:
                summary.scores += task_scores(benchmark.name, results, "lm-eval",
                                              leaderboard_baselines(benchmark.name, self.spec.include_path))
        if HARMBENCH in self.benchmarks:
            chat = bool(getattr(getattr(lm, "tokenizer", None), "chat_template", None))
            summary.notes.append("harmbench: completions " + ("with the model's chat template" if chat else
                                 "without a chat template (the tokenizer has none)"))
            results, tracker = self._lm_eval(lm, [HARMBENCH.lm_eval_task], manager, chat, "harmbench")
            summary.files.update(_write_lm_eval(results, tracker, self.run_dir, "harmbench"))
            del lm
            _release_memory()
            summary.scores.append(self._judge(results["samples"][HARMBENCH.lm_eval_task], judge, summary))
        summary.write(self.run_dir / "summary.json")
        return summary

    def _lm_eval(self, lm: LM, tasks: list[str], manager: Any, chat_template: bool,
                 group: str) -> tuple[dict[str, Any], EvaluationTracker]:
        import lm_eval
        from lm_eval.loggers import EvaluationTracker
        from lm_eval.utils import sanitize_model_name

        tracker = EvaluationTracker(output_path=str(self.run_dir / group))
        results = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=self.spec.limit, log_samples=True,
            apply_chat_template=chat_template, confirm_run_unsafe_code=self.spec.allow_code_execution,
            gen_kwargs={"max_gen_toks": self.spec.max_gen_toks} if self.spec.max_gen_toks else None,
            evaluation_tracker=tracker,
        )
        if results is None:
            raise EvalError(f"lm-eval returned no results for {', '.join(tasks)} (not the main process?)")
        config = tracker.general_config_tracker  # our model object is "CUSTOM" to lm-eval: name it
        config.model_source, config.model_name = self.spec.backend, self.model
        config.model_name_sanitized = sanitize_model_name(self.model)
        return results, tracker

    def _judge(self, samples: list[dict[str, Any]], judge: Judge | None, summary: EvalSummary) -> Score:
        from hf_model_stock.evaluation.harmbench import (
            REFUSAL_METRIC,
            attack_success_rate,
            judge_metric,
            judge_name,
            judge_samples,
            write_judgements,
        )

        if judge is None:
            judge = make_judge(self.spec)
        name, metric = judge_name(judge), judge_metric(judge)
        judgements = judge_samples(samples, judge)
        write_judgements(judgements, self.run_dir / "harmbench" / "judgements.jsonl")
        summary.files["harmbench_judgements"] = "harmbench/judgements.jsonl"
        asr = attack_success_rate([j.label for j in judgements])
        summary.notes.append(f"harmbench: judged by {name} ({metric})" + (
            ": a refusal-string match, which counts completions that do not refuse, harmful or not"
            if metric == REFUSAL_METRIC else ""))
        if asr.unparsed:
            summary.notes.append(f"harmbench: {asr.unparsed} of {asr.n} verdicts were neither yes nor no "
                                 "(counted as not harmful, as HarmBench does)")
        return Score(task="harmbench", lm_eval_task=HARMBENCH.lm_eval_task, metric=metric,
                     value=asr.rate, stderr=asr.stderr, n=asr.n,
                     normalised=normalised(asr.rate, HARMBENCH.random_baseline),
                     higher_is_better=False, data=self.data["harmbench"].describe(), judge=name)


def check_request(spec: EvalSpec) -> list[Benchmark]:
    """The benchmarks ``spec`` runs, once the options and the libraries they need are checked."""
    benchmarks = [benchmark_for(name) for name in spec.task_names()]
    if BENCHMARKS["mbpp"] in benchmarks and not spec.allow_code_execution:
        raise EvalError("mbpp: scoring runs the generated code; allow it with --allow-code-execution "
                        "(allow_code_execution: true in a recipe's evals)")
    for benchmark in benchmarks:
        for module, requirement in benchmark.requires:
            if importlib.util.find_spec(module) is None:
                raise EvalError(f"{benchmark.name}: needs {requirement} (pip install '{requirement}')")
    for benchmark in benchmarks:
        if not benchmark.curated:  # known to lm-eval, and its data within reach: before any model loads
            lm_eval_entry(benchmark.name, spec.include_path)
            check_task_data(benchmark.name, spec.include_path)
    return benchmarks


def prepare_run(model: str, spec: EvalSpec, output_dir: Path | None = None) -> PreparedRun:
    """Check ``spec`` for ``model`` and write the task configs; touches no weights."""
    benchmarks = check_request(spec)
    run_dir = (output_dir or spec.output or DEFAULT_OUTPUT) / _slug(model)
    config_dir = run_dir / "task_configs"
    shutil.rmtree(config_dir, ignore_errors=True)
    data: dict[str, TaskData] = {}
    notes = []
    for benchmark in benchmarks:
        if not benchmark.curated:
            notes.append(f"{benchmark.name}: lm-eval's own task config and data (config sha256 "
                         f"{task_config_digest(benchmark.name, spec.include_path)[:16]})")
            continue
        data[benchmark.name] = resolve_data(benchmark, spec.data_dir, [name for _, name in subsets(benchmark)])
        write_task_config(benchmark, data[benchmark.name], config_dir)
    return PreparedRun(model, spec, run_dir, benchmarks, data, _notes(spec, data) + notes)


def evaluate_model(model: str, spec: EvalSpec, *, output_dir: Path | None = None) -> EvalSummary:
    """Evaluate ``model`` (a local directory or a Hub repo ``org/name[@revision]``) as ``spec`` says;
    write lm-eval's JSON and ``summary.json`` under ``<output>/<model>/`` and return the summary.
    ``<output>`` is ``output_dir``, else ``spec.output``, else ``./eval-results``.

    >>> evaluate_model("HuggingFaceTB/SmolLM2-135M-Instruct", EvalSpec(tasks=["gsm8k"], limit=20))  # doctest: +SKIP
    """
    from hf_model_stock.evaluation.loading import build_lm, check_custom_code, resolve_model

    run = prepare_run(model, spec, output_dir)
    resolved = resolve_model(model)
    check_custom_code(resolved.path, spec.trust_remote_code)
    return run.execute(lambda: build_lm(resolved.path, spec), revision=resolved.entry.revision,
                       sha=resolved.commit, path=str(resolved.path))


def make_judge(spec: EvalSpec) -> Judge:
    """The HarmBench judge ``spec.judge.model`` names: ``refusal`` (no model), or a classifier (repo or directory)."""
    from hf_model_stock.evaluation.harmbench import REFUSAL_JUDGE, ClassifierJudge, RefusalJudge
    from hf_model_stock.evaluation.loading import default_device, resolve_model

    judge = spec.judge
    if judge.model == REFUSAL_JUDGE:
        return RefusalJudge()
    return ClassifierJudge(resolve_model(judge.model).path, device=default_device(judge.device or spec.device),
                           dtype=judge.dtype, batch_size=judge.batch_size,
                           max_completion_tokens=judge.max_completion_tokens, name=judge.model)


def _notes(spec: EvalSpec, data: dict[str, TaskData]) -> list[str]:
    notes = []
    if spec.limit:
        notes.append(f"limit {spec.limit} items per task: a smoke test, not comparable with full runs")
    if spec.max_gen_toks:
        notes.append(f"generations capped at {spec.max_gen_toks} tokens: not the standard setting")
    gsm8k = data.get("gsm8k")
    if gsm8k and gsm8k.files and gsm8k.files[""]["train"] == GSM8K_FEWSHOT_POOL:
        notes.append("gsm8k: few-shot exemplars drawn from evals/data/gsm8k_fewshot.jsonl (our own), "
                     "not the official train split")
    if "mbpp" in data:
        from hf_model_stock.evaluation.sandbox import run_program

        notes.append("mbpp: sandbox layers " + ", ".join(run_program("pass").layers))
    return notes


def _write_lm_eval(results: dict[str, Any], tracker: EvaluationTracker, run_dir: Path, name: str) -> dict[str, str]:
    """lm-eval's results and per-sample records, written by its ``EvaluationTracker`` as its CLI does
    (``<name>/<model>/results_<ts>.json``, ``samples_<task>_<ts>.jsonl``); returns their paths relative
    to ``run_dir``. A previous run's files in ``<name>/`` are removed first. ``results`` is left as it was."""
    directory = run_dir / name
    shutil.rmtree(directory, ignore_errors=True)
    samples = copy.deepcopy(results.get("samples", {}))  # the tracker rewrites the records it saves
    body = {key: value for key, value in results.items() if key != "samples"}
    tracker.save_results_aggregated(results=body, samples=samples)
    for task in results.get("configs", {}):
        if task in samples:
            tracker.save_results_samples(task_name=task, samples=samples[task])
    written = directory / tracker.general_config_tracker.model_name_sanitized
    stamp = tracker.date_id
    if not (written / f"results_{stamp}.json").is_file():  # the tracker logs write errors instead of raising
        raise EvalError(f"{written}: lm-eval's EvaluationTracker wrote no results_{stamp}.json (see its log)")
    files = {f"{name}_results": (written / f"results_{stamp}.json").relative_to(run_dir).as_posix()}
    for task in sorted(samples):
        files[f"{name}_samples_{task}"] = (written / f"samples_{task}_{stamp}.jsonl").relative_to(run_dir).as_posix()
    return files


def _slug(model: str) -> str:
    """A directory name for ``model``: a local directory's name, or ``org__name[@rev]``."""
    path = Path(model).expanduser()
    name = path.resolve().name if path.exists() else model.replace("/", "__")
    return re.sub(r"[^\w.@-]+", "_", name) or "model"


def _versions() -> dict[str, str]:
    packages = ("hf-model-stock", "lm_eval", "transformers", "torch")
    return {package: installed_version(package) or "not installed" for package in packages}


def _release_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
