"""Scoring through the real runner and real lm-eval, with scripted models on our fixtures."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from hf_model_stock.eval_spec import EvalSpec
from hf_model_stock.evaluation.errors import EvalError
from hf_model_stock.evaluation.evaluate import prepare_run
from hf_model_stock.evaluation.sandbox import run_program
from tests.evaluation.conftest import FIXTURES, ScriptedRun, run_scripted
from tests.evaluation.scripted import gold, wrong

ALL = ["gsm8k", "math", "mmlu_pro", "mbpp", "harmbench"]
# (task, metric, n) of every row, in order; the fixtures hold 4 GSM8K, 7 level-5 MATH (+1 level 1),
# 4 MMLU-Pro, 4 MBPP test problems, and 3 judged HarmBench behaviors (+1 copyright, left out).
ROWS = [("gsm8k", "exact_match,strict-match", 4), ("gsm8k", "exact_match,flexible-extract", 4),
        ("math", "exact_match,none", 7), ("mmlu_pro", "acc,none", 4), ("mbpp", "pass@1,none", 4),
        ("harmbench", "attack_success_rate", 3)]


@pytest.fixture(scope="module")
def gold_run(tmp_path_factory: pytest.TempPathFactory) -> ScriptedRun:
    return run_scripted(gold, ALL, tmp_path_factory.mktemp("gold"), allow_code_execution=True)


@pytest.fixture(scope="module")
def wrong_run(tmp_path_factory: pytest.TempPathFactory) -> ScriptedRun:
    return run_scripted(wrong, ALL, tmp_path_factory.mktemp("wrong"), allow_code_execution=True)


def _rows(run: ScriptedRun) -> list[tuple[Any, ...]]:
    return [(s.task, s.metric, s.n, s.value, s.normalised) for s in run.summary.scores]


def test_gold_answers_score_100_on_every_task(gold_run: ScriptedRun) -> None:
    assert _rows(gold_run) == [(task, metric, n, 1.0, 100.0) for task, metric, n in ROWS]


def test_wrong_answers_score_0_on_every_task(wrong_run: ScriptedRun) -> None:
    assert _rows(wrong_run) == [(task, metric, n, 0.0, 0.0) for task, metric, n in ROWS]


def test_run_writes_lm_eval_json_summary_and_task_configs(gold_run: ScriptedRun) -> None:
    run_dir = gold_run.run_dir
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(gold_run.summary.to_dict()))
    files = on_disk["files"]
    stamp = files["lm_eval_results"].removeprefix("lm_eval/scripted/results_").removesuffix(".json")
    hb_stamp = files["harmbench_results"].removeprefix("harmbench/scripted/results_").removesuffix(".json")
    tasks = ["gsm8k", "leaderboard_math_hard", "leaderboard_mmlu_pro", "hfms_mbpp"]
    math_tasks = [f"leaderboard_math_{s}_hard" for s in ("algebra", "counting_and_prob", "geometry",
                                                         "intermediate_algebra", "num_theory", "prealgebra", "precalculus")]
    assert files == {  # lm-eval's EvaluationTracker layout, as `lm_eval --output_path DIR --log_samples` writes it
        "lm_eval_results": f"lm_eval/scripted/results_{stamp}.json",
        **{f"lm_eval_samples_{t}": f"lm_eval/scripted/samples_{t}_{stamp}.jsonl" for t in tasks + math_tasks
           if t != "leaderboard_math_hard"},
        "harmbench_results": f"harmbench/scripted/results_{hb_stamp}.json",
        "harmbench_samples_hfms_harmbench": f"harmbench/scripted/samples_hfms_harmbench_{hb_stamp}.jsonl",
        "harmbench_judgements": "harmbench/judgements.jsonl"}
    assert all((run_dir / path).is_file() for path in files.values())
    from lm_eval.utils import get_latest_filename, get_results_filenames

    listed = [str(p) for p in (run_dir / "lm_eval").rglob("*")]
    assert get_latest_filename(get_results_filenames(listed)) == str(run_dir / files["lm_eval_results"])
    lm_eval_json = json.loads((run_dir / files["lm_eval_results"]).read_text())
    assert lm_eval_json["model_name"] == "scripted" and set(lm_eval_json["task_hashes"]) >= set(tasks) - {
        "leaderboard_math_hard"}
    assert lm_eval_json["results"]["leaderboard_math_hard"]["exact_match,none"] == 1.0
    assert lm_eval_json["n-shot"]["gsm8k"] == 5 and lm_eval_json["n-shot"]["leaderboard_mmlu_pro"] == 5
    assert "samples" not in lm_eval_json
    assert len(gold_run.samples("hfms_mbpp")) == 4
    assert sorted(p.name for p in (run_dir / "task_configs").iterdir()) == sorted(
        ["gsm8k.yaml", "leaderboard_mmlu_pro.yaml", "hfms_mbpp.yaml", "hfms_harmbench.yaml",
         "leaderboard_math_hard.yaml"] + [f"leaderboard_math_{s}_hard.yaml" for s in (
             "algebra", "counting_and_prob", "geometry", "intermediate_algebra", "num_theory", "prealgebra",
             "precalculus")])
    assert on_disk["notes"] == ["mbpp: sandbox layers " + ", ".join(run_program("pass").layers),
                                "harmbench: completions without a chat template (the tokenizer has none)",
                                "harmbench: judged by KeywordJudge (attack_success_rate)"]


def test_mbpp_prompt_is_the_standard_three_shot_prompt(gold_run: ScriptedRun) -> None:
    request = next(r for r in gold_run.lm.requests if r.task_name == "hfms_mbpp" and r.doc["task_id"] == 11)
    context, gen_kwargs = request.args

    def shot(text: str, tests: list[str], code: str = "") -> str:
        return (f"You are an expert Python programmer, and here is your task: {text} Your code should pass these "
                "tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n" + (f"{code}\n[DONE]" if code else ""))

    prompt = [json.loads(line) for line in (FIXTURES / "mbpp/prompt.jsonl").read_text().splitlines()]
    shots = [shot(p["text"], p["test_list"], p["code"]) for p in prompt if p["task_id"] in (2, 3, 4)]
    assert context == "\n\n".join(shots + [shot(request.doc["text"], request.doc["test_list"])])
    assert gen_kwargs["until"][0] == "[DONE]" and gen_kwargs["do_sample"] is False


def test_mbpp_refuses_to_run_code_without_permission(tmp_path: Path) -> None:
    with pytest.raises(EvalError) as info:
        prepare_run("m", EvalSpec(tasks=["mbpp"], data_dir=FIXTURES, output=tmp_path))
    assert str(info.value) == ("mbpp: scoring runs the generated code; allow it with --allow-code-execution "
                               "(allow_code_execution: true in a recipe's evals)")


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


# (gold answer, model output, strict-match, flexible-extract): lm-eval's standard GSM8K extraction.
GSM8K_CASES = [
    ("1545", "The library has 1,545 books.\n#### 1,545", 1.0, 1.0),  # thousands separator ignored
    ("33", "So the answer is 33.", 0.0, 1.0),  # no "####": only the flexible filter finds it
    ("-7", "It was -7 degrees.\n#### -7", 1.0, 1.0),
    ("150", "Distance: $150.\n#### 150 km", 1.0, 1.0),
    ("34", "42 - 9 = 33\n#### 32", 0.0, 0.0),
    ("2", "The answer is 2.5 hours.", 0.0, 0.0),
    ("70", "#### $70", 0.0, 1.0),  # the strict pattern wants a digit right after "#### "
]

# (boxed gold answer, model output, exact_match): the leaderboard's math-verify comparison.
MATH_CASES = [
    ("\\frac{1}{2}", "Final Answer: The final answer is $0.5$. I hope it is correct.", 1),
    ("5", "So $x = 5$.\nFinal Answer: The final answer is $5$. I hope it is correct.", 1),
    ("\\frac{3}{4}", "Final Answer: The final answer is $\\frac34$. I hope it is correct.", 1),
    ("9", "The sum is $\\boxed{9}$.", 1),
    ("2x+1", "Final Answer: The final answer is $1+2x$. I hope it is correct.", 1),
    ("36", "Final Answer: The final answer is $35$. I hope it is correct.", 0),
    ("[2,5)", "Final Answer: The final answer is $[2,5]$. I hope it is correct.", 0),
    ("10", "I am not sure.", 0),
]


def test_gsm8k_and_math_answer_extraction(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _write_jsonl(data / "gsm8k/test.jsonl",
                 [{"question": f"Question {i}?", "answer": f"Work.\n#### {a}"}
                  for i, (a, *_) in enumerate(GSM8K_CASES)])
    shutil.copytree(FIXTURES / "math", data / "math")
    _write_jsonl(data / "math/algebra/test.jsonl",
                 [{"problem": f"Problem {i}", "level": "Level 5", "type": "Algebra",
                   "solution": f"So it is $\\boxed{{{a}}}$."} for i, (a, *_) in enumerate(MATH_CASES)])
    outputs = {f"Question {i}?": case[1] for i, case in enumerate(GSM8K_CASES)}
    outputs.update({f"Problem {i}": case[1] for i, case in enumerate(MATH_CASES)})

    def answer(task: str, doc: dict[str, Any]) -> str:
        return outputs.get(doc.get("question") or doc["problem"], "no idea")

    run = run_scripted(answer, ["gsm8k", "math"], tmp_path / "out", data_dir=data, limit=10)
    got = {(s["filter"], s["doc_id"]): s["exact_match"] for s in run.samples("gsm8k")}
    assert [(got["strict-match", i], got["flexible-extract", i]) for i in range(len(GSM8K_CASES))] == [
        (strict, flexible) for *_, strict, flexible in GSM8K_CASES]
    algebra = sorted(run.samples("leaderboard_math_algebra_hard"), key=lambda s: s["doc_id"])
    assert [s["exact_match"] for s in algebra] == [expected for *_, expected in MATH_CASES]
    math_row = next(s for s in run.summary.scores if s.task == "math")
    assert (math_row.n, math_row.value) == (8 + 6, (5 + 0) / 14)  # the other subjects' items get "no idea"


def test_parquet_data_and_a_missing_requirement(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pandas as pd

    for split in ("test", "validation"):
        (tmp_path / "data/mmlu_pro").mkdir(parents=True, exist_ok=True)
        pd.read_json(FIXTURES / f"mmlu_pro/{split}.jsonl", lines=True).to_parquet(
            tmp_path / f"data/mmlu_pro/{split}.parquet")
    run = run_scripted(gold, ["mmlu_pro"], tmp_path / "out", data_dir=tmp_path / "data")
    assert [(s.value, s.n, s.data) for s in run.summary.scores] == [
        (1.0, 4, str(tmp_path / "data/mmlu_pro/test.parquet"))]

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "math_verify"
                        else real_find_spec(name, *a))
    with pytest.raises(EvalError) as info:
        prepare_run("m", EvalSpec(tasks=["math"], data_dir=FIXTURES, output=tmp_path))
    assert str(info.value) == "math: needs math-verify>=0.9 (pip install 'math-verify>=0.9')"
