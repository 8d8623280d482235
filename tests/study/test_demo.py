"""``hf-model-stock demo`` on the study's tiny model: three same-task fine-tunes, their Model Stock
merge from the demo recipe, t per layer and the held-out NLL of every model, printed from the
leaderboard's own files."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from hf_model_stock.study.demo import FINETUNES, layer_t_lines, run_demo
from tests.study.test_study import tiny  # noqa: F401  (the fixture)


def test_layer_t_lines_are_layer_means_in_order() -> None:
    tensors = [{"name": "model.layers.10.mlp.up_proj.weight", "action": "merge", "t": 0.5},
               {"name": "model.layers.2.self_attn.q_proj.weight", "action": "merge", "t": 0.2},
               {"name": "model.layers.2.mlp.up_proj.weight", "action": "merge", "t": 0.4},
               {"name": "model.embed_tokens.weight", "action": "merge", "t": 0.9},
               {"name": "model.layers.3.rotary.inv_freq", "action": "copy", "t": None}]
    assert layer_t_lines(tensors, per_line=2) == ["  L2 0.300, L10 0.500", "  other 0.900"]


def test_demo_prints_t_per_layer_and_held_out_scores(tiny: tuple[Path, Path], tmp_path: Path,  # noqa: F811
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    base, data = tiny
    merged = run_demo(tmp_path, progress=False, base_dir=base, data_file=data)
    out = capsys.readouterr().out
    report = json.loads((merged / "merge_report.json").read_text())
    assert f"whole model {report['summary']['t_mean']:.3f}" in out and "  L0 " in out and "L1 " in out
    assert "t is how far the merge goes from the base" in out
    with (tmp_path / "leaderboard" / "leaderboard.csv").open(encoding="utf-8") as fh:
        rows = {r["model"]: r for r in csv.DictReader(fh)}
    assert sorted(rows) == sorted(["base", *FINETUNES, "merged"])
    for name, row in rows.items():  # every printed score is the leaderboard's, with its standard error
        line = (f"{name:>6}: NLL/token {float(row['gsm8k_nll_raw']):.4f} ± {float(row['gsm8k_nll_stderr']):.4f} "
                "(lower is better)")
        assert line in out, line
    assert rows["base"]["gsm8k_nll_n"] == "10"  # the held-out part: a quarter of the 40 items
    assert all(float(rows[f]["gsm8k_nll_raw"]) < float(rows["base"]["gsm8k_nll_raw"]) for f in FINETUNES)
