"""Batch leaderboard: scripted models on the local executor (child processes), resume from the cache,
crash isolation, recipes (base, fine-tunes, Model Stock and Model Soup merges), and the output files."""

from __future__ import annotations

import csv
import io
import json
import struct
from pathlib import Path

import pytest
from safetensors.torch import load_file

from hf_model_stock.errors import LeaderboardError
from hf_model_stock.leaderboard.batch import run_leaderboard
from hf_model_stock.leaderboard.spec import parse_leaderboard_spec
from tests.leaderboard.scripted import (
    calls,
    make_model,
    scripted_evaluate,
    write_script,
)

TASKS = ["gsm8k", "mmlu_pro", "harmbench"]


def spec_for(models: list[str], output: Path, tasks: list[str] = TASKS, extra: str = ""):
    listed = "\n".join(f"  - {m}" for m in models)
    return parse_leaderboard_spec(f"title: Test board\nmodels:\n{listed}\nevals: {{tasks: {tasks}}}\n"
                                  f"output: {output}\n{extra}", "spec.yaml")


def run(spec, stream=None, live=False, **kw):
    return run_leaderboard(spec, evaluate=scripted_evaluate, stream=stream or io.StringIO(), live=live, **kw)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture()
def board_models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    make_model(root, "alpha", {"gsm8k": 0.5, "mmlu_pro": 0.325, "harmbench": 0.2}, seed=1)
    make_model(root, "beta", {"gsm8k": 0.75, "mmlu_pro": 0.55, "harmbench": 0.05}, seed=2)
    make_model(root, "gamma", {"gsm8k": 0.1, "mmlu_pro": 0.1, "harmbench": 0.5}, seed=3)
    return root


def test_local_batch_ranks_models_and_writes_every_file(board_models: Path, tmp_path: Path) -> None:
    names = ["alpha", "beta", "gamma"]
    result = run(spec_for([str(board_models / n) for n in names], tmp_path / "lb"))
    assert not result.failed
    ranked = result.board.ranked()
    assert [r.name for r in ranked] == ["beta", "alpha", "gamma"]
    # normalised: gsm8k random 0 -> x100; mmlu_pro random 0.1 -> (v - 0.1) / 0.9 x 100
    assert ranked[0].average(TASKS) == pytest.approx((75.0 + 50.0) / 2)
    assert ranked[1].average(TASKS) == pytest.approx((50.0 + 25.0) / 2)
    assert ranked[2].average(TASKS) == pytest.approx(5.0)  # mmlu_pro at chance -> 0

    with (tmp_path / "lb" / "leaderboard.csv").open(encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["model"] for r in rows] == ["beta", "alpha", "gamma"]
    assert float(rows[1]["gsm8k_raw"]) == 0.5 and float(rows[1]["mmlu_pro_raw"]) == 0.325
    assert float(rows[1]["mmlu_pro_normalised"]) == pytest.approx(25.0)
    assert float(rows[1]["average_normalised"]) == pytest.approx(37.5)
    assert float(rows[0]["harmbench_normalised"]) == pytest.approx(5.0)
    assert rows[0]["identity"].startswith("sha256:") and rows[0]["status"] == "ok"

    md = (tmp_path / "lb" / "leaderboard.md").read_text(encoding="utf-8")
    # each score with its standard error, on the normalised scale (mmlu_pro: 0.01 x 100 / 0.9)
    assert "| 1 | beta | model | 62.50 | 75.00 ± 1.00 | 50.00 ± 1.11 | 5.00 ± 1.00 |" in md
    assert "| alpha | 0.5000 ± 0.0100 (n=100) | 0.3250 ± 0.0100 (n=100) | 0.2000 ± 0.0100 (n=100) |" in md
    assert "![scores per task](leaderboard.png)" in md
    page = (tmp_path / "lb" / "leaderboard.html").read_text(encoding="utf-8")
    assert "<td>62.50</td>" in page and "<td>75.00 ± 1.00</td>" in page and "data:image/png;base64," in page
    width, height = png_size(tmp_path / "lb" / "leaderboard.png")
    assert width >= 600 and height >= 400
    data = json.loads((tmp_path / "lb" / "leaderboard.json").read_text(encoding="utf-8"))
    assert data["rows"][0]["results"]["gsm8k"]["scores"][0]["value"] == 0.75
    assert "scripted evaluation of beta" in (tmp_path / "lb" / "logs" / "beta.log").read_text(encoding="utf-8")


@pytest.mark.parametrize("fail, message", [
    ("raise", "RuntimeError: scripted failure of broken (see "),
    ("segfault", "crashed (killed by SIGSEGV); see "),
    ("exit", "crashed (killed by SIGKILL); see "),
])
def test_a_failing_model_is_isolated(board_models: Path, tmp_path: Path, fail: str, message: str) -> None:
    make_model(board_models, "broken", {}, fail=fail, seed=9)
    spec = spec_for([str(board_models / n) for n in ("alpha", "broken", "beta")], tmp_path / "lb")
    log = io.StringIO()
    result = run(spec, stream=log)
    assert [r.name for r in result.failed] == ["broken"]
    events = [line for line in log.getvalue().splitlines() if "| running" in line]
    assert events[-1].endswith("done 2 (0 cached) | running 0 | failed 1 | queued 0")
    assert any(e.startswith("leaderboard: FAILED broken: ") and e.endswith("| running 0 | failed 1 | queued 1")
               for e in events)
    assert message in (result.failed[0].error or "") and "\n" not in (result.failed[0].error or "")
    assert {r.name for r in result.board.rows if r.results} == {"alpha", "beta"}
    md = (tmp_path / "lb" / "leaderboard.md").read_text(encoding="utf-8")
    assert "## Failed" in md and "**broken**" in md
    with (tmp_path / "lb" / "leaderboard.csv").open(encoding="utf-8") as fh:
        broken = [r for r in csv.DictReader(fh) if r["model"] == "broken"][0]
    assert broken["status"] == "failed" and broken["gsm8k_raw"] == "" and broken["rank"] == "3"


def test_resume_skips_finished_work_and_redoes_what_changed(board_models: Path, tmp_path: Path) -> None:
    models = [str(board_models / n) for n in ("alpha", "beta")]
    out = tmp_path / "lb"
    run(spec_for(models, out, tasks=["gsm8k"]))
    assert sorted(c["model"] for c in calls(board_models)) == ["alpha", "beta"]

    again = run(spec_for(models, out, tasks=["gsm8k", "mmlu_pro"]), resume=True)
    new = calls(board_models)[2:]
    assert sorted((c["model"], tuple(c["tasks"])) for c in new) == [("alpha", ("mmlu_pro",)), ("beta", ("mmlu_pro",))]
    assert {r.name: r.cached for r in again.board.rows} == {"alpha": ["gsm8k"], "beta": ["gsm8k"]}

    make_model(board_models, "beta", {"gsm8k": 0.9, "mmlu_pro": 0.55}, seed=22)  # new weights: new identity
    third = run(spec_for(models, out, tasks=["gsm8k", "mmlu_pro"]), resume=True)
    assert [(c["model"], c["tasks"]) for c in calls(board_models)[4:]] == [("beta", ["gsm8k", "mmlu_pro"])]
    assert {r.name: r.score("gsm8k")["value"] for r in third.board.rows} == {"alpha": 0.5, "beta": 0.9}

    run(spec_for(models, out, tasks=["gsm8k", "mmlu_pro"]), resume=True)
    assert len(calls(board_models)) == 5  # everything cached: nothing ran

    run(spec_for(models, out, tasks=["gsm8k"]), resume=False)
    assert len(calls(board_models)) == 7  # without --resume everything is evaluated again


def test_a_changed_setting_is_a_different_cache_entry(board_models: Path, tmp_path: Path) -> None:
    spec = spec_for([str(board_models / "alpha")], tmp_path / "lb", tasks=["gsm8k"])
    run(spec)
    limited = spec.model_copy(update={"evals": spec.evals.model_copy(update={"limit": 5})})
    run(limited, resume=True)
    assert len(calls(board_models)) == 2


def test_the_same_model_listed_twice_is_one_row(board_models: Path, tmp_path: Path) -> None:
    spec = spec_for([str(board_models / "alpha"), f"{{model: {board_models / 'alpha'}, name: Alpha}}"],
                    tmp_path / "lb", tasks=["gsm8k"])
    result = run(spec)
    assert [r.name for r in result.board.rows] == ["Alpha"] and len(calls(board_models)) == 1


def test_model_cards_get_the_scores(board_models: Path, tmp_path: Path) -> None:
    (board_models / "alpha" / "README.md").write_text("---\nlicense: mit\n---\n\n# alpha\n\nMy model.\n")
    spec = spec_for([str(board_models / "alpha")], tmp_path / "lb", tasks=["gsm8k", "mmlu_pro"],
                    extra="model_cards: true\n")
    first = run(spec)
    card = (board_models / "alpha" / "README.md").read_text(encoding="utf-8")
    assert "license: mit" in card and "My model." in card
    assert "| gsm8k | exact_match,strict-match | 0.5000 |" in card and "| mmlu_pro | acc,none | 0.3250 |" in card
    second = run(spec, resume=True)  # the card is not part of the model's identity: still cached
    assert second.board.rows[0].identity == first.board.rows[0].identity and len(calls(board_models)) == 1


def test_recipes_bring_base_fine_tunes_and_both_merge_methods(tmp_path: Path) -> None:
    import torch

    from hf_model_stock.leaderboard.spec import load_leaderboard_spec
    from tests.modelgen import write_checkpoint

    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(8, 8, generator=gen)
    root = tmp_path / "models"
    write_checkpoint(root / "base", {"layer.weight": w0}, config={"model_type": "llama"})
    for i in (1, 2):
        write_checkpoint(root / f"ft{i}", {"layer.weight": w0 + 0.1 * torch.randn(8, 8, generator=gen)},
                         config={"model_type": "llama"})
    for name, score in {"base": 0.2, "ft1": 0.4, "ft2": 0.3, "stock": 0.5, "soup": 0.45}.items():
        write_script(root, name, {"gsm8k": score})
    for name, method in (("stock", "model_stock"), ("soup", "linear")):
        (tmp_path / f"{name}.yaml").write_text(f"base_model: models/base\nmodels: [models/ft1, models/ft2]\n"
                                                f"method: {method}\noutput: {{path: models/{name}}}\n")
    (tmp_path / "board.yaml").write_text("models:\n  - recipe: stock.yaml\n  - recipe: soup.yaml\n"
                                         "evals: {tasks: [gsm8k]}\noutput: lb\n")
    result = run(load_leaderboard_spec(tmp_path / "board.yaml"))

    roles = {r.name: r.roles for r in result.board.rows}
    assert roles == {"base": ["base"], "ft1": ["fine-tune"], "ft2": ["fine-tune"], "stock": ["merge:model_stock"],
                     "soup": ["merge:linear"]}
    assert [r.name for r in result.board.ranked()] == ["stock", "soup", "ft1", "ft2", "base"]
    merged = {name: load_file(root / name / "model.safetensors")["layer.weight"] for name in ("stock", "soup")}
    fts = [load_file(root / f"ft{i}" / "model.safetensors")["layer.weight"] for i in (1, 2)]
    torch.testing.assert_close(merged["soup"], (fts[0] + fts[1]) / 2, rtol=0, atol=1e-6)  # the uniform average
    assert not torch.equal(merged["stock"], merged["soup"])
    md = (tmp_path / "lb" / "leaderboard.md").read_text(encoding="utf-8")
    assert "| 1 | stock | merge:model_stock | 50.00 | 50.00" in md and "| 2 | soup | merge:linear | 45.00 |" in md


def test_a_failed_merge_fails_its_row_only(tmp_path: Path) -> None:
    root = tmp_path / "models"
    for name in ("base", "ft1", "ft2"):
        make_model(root, name, {"gsm8k": 0.3})
    (root / "ft2" / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")  # not a model
    (tmp_path / "r.yaml").write_text("base_model: models/base\nmodels: [models/ft1, models/ft2]\n"
                                     "output: {path: models/merged}\n")
    (tmp_path / "board.yaml").write_text("models: [{recipe: r.yaml}]\nevals: {tasks: [gsm8k]}\noutput: lb\n")
    from hf_model_stock.leaderboard.spec import load_leaderboard_spec

    result = run(load_leaderboard_spec(tmp_path / "board.yaml"))
    assert [r.name for r in result.failed] == ["merged"]
    assert (result.failed[0].error or "").startswith(f"merge of {tmp_path / 'r.yaml'} failed: ")
    assert not (root / "merged").exists()
    assert {r.name for r in result.board.rows if r.results} == {"base", "ft1", "ft2"}


@pytest.mark.parametrize("text, message", [
    ("models: []", "spec.yaml:1: models: List should have at least 1 item"),
    ("models: [{model: a, recipe: b}]", "spec.yaml:1: models[0]: give either model or recipe"),
    ("models: [a]\nevals: {tasks: ['gsm 9k']}", "spec.yaml:2: evals.tasks: not a task name: 'gsm 9k'"),
    ("models: [a]\nevals: {include_path: nowhere}", "spec.yaml:2: evals.include_path: "),
    ("models: [a]\nexecutor: {kind: slurm}", "spec.yaml:2: executor.kind: Input should be 'local' or 'ray'"),
    ("models: [a]\nexecutor: {kind: local, address: 'ray://x:10001'}",
     "spec.yaml:2: executor.address: only the ray executor connects to a cluster"),
    ("models: [a]\nevals: {tasks: [gsm8k], output: x}", "spec.yaml:2: evals.output: a leaderboard keeps"),
    ("models: [a]\nmodel_card: true", "spec.yaml:2: model_card: unknown key"),
    ("- a", "spec.yaml: a leaderboard spec must be a YAML mapping"),
])
def test_spec_errors_name_the_key_and_line(text: str, message: str) -> None:
    with pytest.raises(LeaderboardError) as info:
        parse_leaderboard_spec(text, "spec.yaml")
    assert str(info.value).startswith(message)


def test_ray_executor_gives_the_same_board_and_isolates_a_crash(board_models: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray")
    make_model(board_models, "broken", {}, fail="segfault", seed=9)
    models = [str(board_models / n) for n in ("alpha", "broken", "beta", "gamma")]
    local = run(spec_for(models, tmp_path / "local"))
    remote = run(spec_for(models, tmp_path / "ray", extra="executor: {kind: ray, cpus_per_model: 1}\n"),
                 ray_init={"num_cpus": 2})
    assert [r.name for r in remote.failed] == ["broken"]
    assert (remote.failed[0].error or "").startswith("crashed (")
    for a, b in zip(local.board.ranked(), remote.board.ranked()):
        assert (a.name, a.identity, a.average(TASKS)) == (b.name, b.identity, b.average(TASKS))
        assert {t: r.scores for t, r in a.results.items()} == {t: r.scores for t, r in b.results.items()}
    import ray

    assert not ray.is_initialized()  # the executor shut down the instance it started
    again = run(spec_for(models, tmp_path / "ray", extra="executor: {kind: ray}\n"), resume=True,
                ray_init={"num_cpus": 2})
    assert {r.name: r.cached for r in again.board.rows if r.cached} == {n: TASKS for n in ("alpha", "beta", "gamma")}


def test_cli_reports_failed_models_with_exit_code_1(tmp_path: Path, monkeypatch, capsys) -> None:
    from hf_model_stock.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    (tmp_path / "board.yaml").write_text("models: [nobody/no-such-model]\nevals: {tasks: [gsm8k]}\noutput: lb\n")
    assert main(["leaderboard", str(tmp_path / "board.yaml")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: 1 of 1 models failed: nobody/no-such-model: ") and err.count("\n") == 1
    assert "**nobody/no-such-model**" in (tmp_path / "lb" / "leaderboard.md").read_text(encoding="utf-8")


def test_cli_rejects_a_bad_spec_with_exit_code_2(tmp_path: Path, capsys) -> None:
    from hf_model_stock.cli import main

    (tmp_path / "board.yaml").write_text("models: [a]\nexecutor: {gpus: 1}\n")
    assert main(["leaderboard", str(tmp_path / "board.yaml")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'board.yaml'}:2: executor.gpus: unknown key\n"
    assert not (tmp_path / "leaderboard").exists()


def test_shipped_leaderboard_compares_both_merge_methods() -> None:
    from hf_model_stock.leaderboard.contenders import expand
    from hf_model_stock.leaderboard.spec import load_leaderboard_spec

    repo = Path(__file__).resolve().parents[2]
    contenders = expand(load_leaderboard_spec(repo / "recipes" / "leaderboards" / "math.yaml"))
    assert [(c.name, c.roles) for c in contenders] == [
        ("Qwen/Qwen2.5-Math-7B", ["base"]), ("Qwen/Qwen2.5-Math-7B-Instruct", ["fine-tune"]),
        ("TIGER-Lab/Qwen2.5-Math-7B-CFT", ["fine-tune"]), ("qnguyen3/Quan-Mathy-7B", ["fine-tune"]),
        ("qwen2.5-math-7b-model-stock", ["merge:model_stock"]), ("qwen2.5-math-7b-soup", ["merge:linear"])]
    assert contenders[4].ref == str(repo / "recipes" / "merged" / "qwen2.5-math-7b-model-stock")


def test_live_view_on_a_terminal_shows_every_state(board_models: Path, tmp_path: Path) -> None:
    make_model(board_models, "broken", {}, fail="raise", seed=9)
    screen = io.StringIO()
    run(spec_for([str(board_models / n) for n in ("alpha", "broken")], tmp_path / "lb", tasks=["gsm8k"]),
        stream=screen, live=True)
    final = screen.getvalue()
    assert "done 1 (0 cached) | running 0 | failed 1 | queued 0" in final
    assert "alpha" in final and "RuntimeError: scripted failure of broken" in final
