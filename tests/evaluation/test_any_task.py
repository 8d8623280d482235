"""Any lm-eval task: the user's own task YAMLs (``include_path``) and lm-eval's index, scored with
lm-eval's metric names and stderr, normalised only as the Open LLM Leaderboard v2 does; unknown tasks
and data sets out of reach are one-line errors before any model loads."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from hf_model_stock.eval_spec import EvalSpec
from hf_model_stock.evaluation.errors import EvalError
from hf_model_stock.evaluation.evaluate import prepare_run
from hf_model_stock.evaluation.lm_tasks import leaderboard_baselines
from tests.evaluation.scripted import ScriptedLM

CAPITALS = [("France", ["Paris", "Rome", "Oslo", "Bern"], 0), ("Italy", ["Paris", "Rome", "Oslo", "Bern"], 1),
            ("Norway", ["Paris", "Rome", "Oslo", "Bern"], 2), ("Spain", ["Madrid", "Lima"], 0),
            ("Peru", ["Madrid", "Lima"], 1)]
TASK = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{prompt}: {{{{country}}}}?"
doc_to_choice: {choices}
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def write_tasks(root: Path, prompt: str = "Capital of") -> Path:
    """A user's task directory: ``my_capitals`` (choices per item), and a leaderboard-style group of two
    tasks whose choices are listed in the YAML (4 and 2 options)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"country": c, "choices": ch, "answer": a} for c, ch, a in CAPITALS]
    (root / "capitals.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "capitals4.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    (root / "capitals2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[3:]))
    (root / "my_capitals.yaml").write_text(TASK.format(name="my_capitals", data=root / "capitals.jsonl",
                                                       prompt=prompt, choices='"{{choices}}"'))
    (root / "lb4.yaml").write_text(TASK.format(name="leaderboard_caps_four", data=root / "capitals4.jsonl",
                                               prompt=prompt, choices='["Paris", "Rome", "Oslo", "Bern"]'))
    (root / "lb2.yaml").write_text(TASK.format(name="leaderboard_caps_two", data=root / "capitals2.jsonl",
                                               prompt=prompt, choices='["Madrid", "Lima"]'))
    (root / "group.yaml").write_text("group: leaderboard_caps\ntask: [leaderboard_caps_four, leaderboard_caps_two]\n"
                                     "aggregate_metric_list:\n  - metric: acc\n    weight_by_size: true\n")
    return root


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tasks(tmp_path_factory.mktemp("user_tasks"))


def right_for(countries: set[str]):
    """Prefers the right capital for ``countries``, a wrong one for the others."""
    def answer(task: str, doc: dict[str, Any]) -> str:
        pick = doc["answer"] if doc["country"] in countries else (doc["answer"] + 1) % len(doc["choices"])
        return " " + doc["choices"][pick]
    return answer


def mean_stderr(values: list[float]) -> float:
    m = sum(values) / len(values)
    return math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1) / len(values))


def test_a_users_task_is_scored_with_lm_evals_metric_names(tasks_dir: Path, tmp_path: Path) -> None:
    spec = EvalSpec(tasks=["my_capitals"], include_path=tasks_dir, output=tmp_path)
    run = prepare_run("m", spec)
    summary = run.execute(lambda: ScriptedLM(right_for({"France", "Italy", "Peru"})))
    [score] = summary.scores
    assert (score.task, score.lm_eval_task, score.metric, score.n) == ("my_capitals", "my_capitals", "acc,none", 5)
    assert score.value == pytest.approx(0.6) and score.stderr == pytest.approx(mean_stderr([1, 1, 0, 0, 1]))
    assert score.normalised is None and score.higher_is_better and score.data == "lm-eval"
    assert any(n.startswith("my_capitals: lm-eval's own task config and data (config sha256 ") for n in summary.notes)
    assert (tmp_path / "m" / summary.files["lm_eval_tasks_results"]).is_file()


def test_a_leaderboard_group_is_normalised_task_by_task_then_averaged(tasks_dir: Path, tmp_path: Path) -> None:
    assert leaderboard_baselines("leaderboard_caps", tasks_dir) == {"leaderboard_caps_four": 0.25,
                                                                    "leaderboard_caps_two": 0.5}
    spec = EvalSpec(tasks=["leaderboard_caps"], include_path=tasks_dir, output=tmp_path)
    summary = prepare_run("m", spec).execute(lambda: ScriptedLM(right_for({"France", "Italy", "Spain"})))
    [score] = summary.scores  # the group's aggregate: 3 of 5 right
    assert (score.lm_eval_task, score.metric, score.n, score.value) == ("leaderboard_caps", "acc,none", 5, 0.6)
    four, two = 2 / 3, 1 / 2  # per task: 2 of 3 (random 1/4), 1 of 2 (random 1/2)
    expected = ((four - 0.25) / 0.75 * 100 + max(two - 0.5, 0) / 0.5 * 100) / 2
    assert score.normalised == pytest.approx(expected)


def test_open_llm_leaderboard_baselines_from_lm_evals_yamls() -> None:
    bbh = leaderboard_baselines("leaderboard_bbh")
    assert len(bbh) == 24 and bbh["leaderboard_bbh_boolean_expressions"] == 0.5
    assert bbh["leaderboard_bbh_object_counting"] == pytest.approx(1 / 19)
    assert bbh["leaderboard_bbh_geometric_shapes"] == pytest.approx(1 / 11)
    assert leaderboard_baselines("leaderboard_musr") == pytest.approx(
        {"leaderboard_musr_murder_mysteries": 1 / 2, "leaderboard_musr_object_placements": 1 / 5,
         "leaderboard_musr_team_allocation": 1 / 3})
    assert set(leaderboard_baselines("leaderboard_gpqa").values()) == {0.25}
    assert leaderboard_baselines("leaderboard_ifeval") == {"leaderboard_ifeval": 0.0}
    assert leaderboard_baselines("leaderboard_mmlu_pro") == {"leaderboard_mmlu_pro": 0.1}
    assert leaderboard_baselines("arc_easy") is None and leaderboard_baselines("hellaswag") is None


def test_an_unknown_task_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(EvalError) as info:
        prepare_run("m", EvalSpec(tasks=["gsm8k", "arc_eazy"], output=tmp_path))
    assert str(info.value).startswith("task 'arc_eazy' is not one of ours, nor an lm-eval ")
    assert str(info.value).endswith(" task, group or tag (`lm-eval ls tasks` lists them)")


def test_cache_keys_cover_the_task_config(tasks_dir: Path, tmp_path: Path) -> None:
    from hf_model_stock.leaderboard.keys import task_keys

    other = write_tasks(tmp_path / "other", prompt="What is the capital of")
    same = task_keys(EvalSpec(tasks=["my_capitals", "leaderboard_caps"], include_path=tasks_dir))
    assert same == task_keys(EvalSpec(tasks=["my_capitals", "leaderboard_caps"], include_path=tasks_dir))
    changed = task_keys(EvalSpec(tasks=["my_capitals", "leaderboard_caps"], include_path=other))
    assert changed["my_capitals"] != same["my_capitals"] and changed["leaderboard_caps"] != same["leaderboard_caps"]


def test_a_task_whose_data_is_not_offline_fails_in_seconds(tmp_path: Path) -> None:
    """A real lm-eval task (ARC-Easy) with the Hub off and its data set not in the cache: one line naming
    the task and its data set, before any model is loaded (the model does not even exist)."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "empty-cache"), "PYTHONPATH": str(Path.cwd())}
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "hf_model_stock.cli", "eval", str(tmp_path / "no-model"),
                           "--tasks", "arc_easy", "--output", str(tmp_path / "out"), "-q"],
                          capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - started
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert lines == ["error: arc_easy: task arc_easy reads data set allenai/ai2_arc (ARC-Easy), which is not "
                     "available offline: Couldn't reach 'allenai/ai2_arc' on the Hub (OfflineModeIsEnabled)"]
    assert elapsed < 60, elapsed  # lm-eval's index (10-20 s here), then the data check fails at once
