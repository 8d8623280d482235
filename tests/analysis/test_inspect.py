"""``inspect``: statistics against float64 references and analytic values, the warnings on constructed
cases, the outputs (inspect.json, PNGs) and the command line."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import pytest
import torch

import hf_model_stock.analysis
from hf_model_stock.analysis.inspect import (
    InspectReport,
    inspect_models,
    write_inspect_outputs,
)
from hf_model_stock.analysis.inspect_cli import add_inspect_parser
from hf_model_stock.errors import CompatibilityError, ModelStockError
from hf_model_stock.pipeline import merge_models
from tests.modelgen import write_checkpoint

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
NUMEL = 64 * 36


def deltas_with_gram(gram: list[list[float]], shape: tuple[int, ...], seed: int) -> list[torch.Tensor]:
    """N float64 tensors whose Gram matrix is exactly ``gram`` (PSD): D = V sqrt(L) Q, Q orthonormal."""
    g = torch.tensor(gram, dtype=torch.float64)
    vals, vecs = torch.linalg.eigh(g)
    root = vecs * vals.clamp_min(0).sqrt()
    q, _ = torch.linalg.qr(torch.randn(math.prod(shape), len(gram), generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    return [row.reshape(shape) for row in root @ q.T]


def gram_from(norms: list[float], cos: list[list[float]]) -> list[list[float]]:
    return [[norms[i] * norms[j] * cos[i][j] for j in range(len(norms))] for i in range(len(norms))]


def cos3(c01: float, c02: float, c12: float) -> list[list[float]]:
    return [[1, c01, c02], [c01, 1, c12], [c02, c12, 1]]


# Per tensor: the Gram of the three fine-tunes' deltas (norms, pairwise cosines) and the warnings due.
CASES = {
    # healthy: one shared angle (cos 0.5), equal norms -> t = 3*0.5 / (1 + 2*0.5) = 0.75
    "model.layers.0.self_attn.q_proj.weight": (gram_from([1.0, 1.0, 1.0], cos3(0.5, 0.5, 0.5)), set()),
    # fine-tune 2 left this tensor untouched
    "model.layers.0.mlp.up_proj.weight": (gram_from([1.0, 1.2, 0.0], cos3(0.5, 0.0, 0.0)), {("near_zero_delta", 2)}),
    # fine-tunes 0 and 1 pull in opposite directions
    "model.layers.1.self_attn.q_proj.weight": (gram_from([1.0, 1.0, 1.0], cos3(-0.4, 0.1, 0.1)),
                                               {("negative_cos", None), ("cos_spread", None)}),
    # two fine-tunes agree, the third does not: no single angle
    "model.layers.1.mlp.up_proj.weight": (gram_from([1.0, 1.0, 1.0], cos3(0.9, 0.3, 0.3)), {("cos_spread", None)}),
    # fine-tune 1 barely moved (3 % of the others' mean, under the 5 % threshold), angles fine
    "model.norm.weight": (gram_from([2.0, 0.06, 2.0], cos3(0.6, 0.6, 0.6)), {("near_zero_delta", 1)}),
    # 10 % of the others: no warning
    "model.embed_tokens.weight": (gram_from([1.0, 0.1, 1.0], cos3(0.6, 0.6, 0.6)), set()),
}


def expected_t(gram: list[list[float]], eps: float = 1e-8) -> float:
    n = len(gram)
    cos = [gram[i][j] / (math.sqrt(gram[i][i] * gram[j][j]) + eps) for i, j in itertools.combinations(range(n), 2)]
    c = max(-1.0, min(1.0, sum(cos) / len(cos)))
    t = n * c / (1 + (n - 1) * c)
    return min(1.0, max(0.0, t))


@pytest.fixture(scope="module")
def constructed(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A base and three fine-tunes whose deltas have the Gram matrices of CASES (float32, sharded)."""
    root = tmp_path_factory.mktemp("constructed")
    gen = torch.Generator().manual_seed(1)
    base = {name: torch.randn(64, 36, generator=gen) for name in CASES}
    base["model.layers.0.rotary.steps"] = torch.arange(10)
    fts: list[dict[str, torch.Tensor]] = [{"model.layers.0.rotary.steps": torch.arange(10)} for _ in range(3)]
    for k, (name, (gram, _)) in enumerate(CASES.items()):
        for ft, d in zip(fts, deltas_with_gram(gram, (64, 36), seed=k)):
            ft[name] = (base[name].double() + d).float()
    write_checkpoint(root / "base", base, config={"model_type": "llama"})
    for i, ft in enumerate(fts):
        write_checkpoint(root / f"ft{i}", ft, shards=2, config={"model_type": "llama"})
    return root, base, fts


def run_inspect(root: Path, chunk_bytes: int = 4096) -> InspectReport:
    return inspect_models(root / "base", [root / f"ft{i}" for i in range(3)], chunk_bytes=chunk_bytes)


def test_statistics_match_the_constructed_grams(constructed):
    root, _, _ = constructed
    report = run_inspect(root)
    assert report.pairs == [(0, 1), (0, 2), (1, 2)]
    assert {r.name for r in report.tensors} == set(CASES)  # the int64 tensor is not a merged tensor
    for row in report.tensors:
        gram = CASES[row.name][0]
        norms = [math.sqrt(gram[i][i]) for i in range(3)]
        assert row.stats.norms == pytest.approx(norms, rel=1e-5, abs=1e-9)
        for (i, j), c, angle in zip(report.pairs, row.stats.pair_cos, row.stats.angles):
            if norms[i] * norms[j] == 0:
                assert c is None and angle is None
            else:
                want = gram[i][j] / (norms[i] * norms[j])
                assert c == pytest.approx(want, abs=2e-4)
                assert angle == pytest.approx(math.degrees(math.acos(want)), abs=0.02)
        assert row.t == pytest.approx(expected_t(gram), abs=1e-4), row.name
    healthy = next(r for r in report.tensors if r.name == "model.layers.0.self_attn.q_proj.weight")
    assert healthy.t == pytest.approx(0.75, abs=1e-4)
    assert healthy.stats.angles == pytest.approx([60.0] * 3, abs=0.02)


def test_warnings_are_exactly_the_broken_assumptions(constructed):
    root, _, _ = constructed
    report = run_inspect(root)
    got = {(w.tensor, w.kind, w.model) for w in report.warnings}
    want = {(name, kind, model) for name, (_, kinds) in CASES.items() for kind, model in kinds}
    assert got == want
    assert len(report.warnings) == len(want)
    negative = next(w for w in report.warnings if w.kind == "negative_cos")
    assert "0-1: -0.400" in negative.message
    # cos -0.4 with 0.1 and 0.1: mean -0.0667 < 0, so t is clamped to 0
    row = next(r for r in report.tensors if r.name == negative.tensor)
    assert row.t == 0.0 and row.clamped


def test_exact_against_float64_reference_and_chunk_invariant(constructed):
    """Norms and cosines from the streamed Grams equal a float64 computation on the stored tensors,
    whatever the chunk size (Grams of chunks add up)."""
    root, base, fts = constructed
    small, large = run_inspect(root, chunk_bytes=1024), run_inspect(root, chunk_bytes=1 << 30)
    for row_s, row_l in zip(small.tensors, large.tensors):
        d = [ft[row_s.name].double().flatten() - base[row_s.name].double().flatten() for ft in fts]
        norms = [float(x.norm()) for x in d]
        assert row_s.stats.norms == pytest.approx(norms, rel=1e-6, abs=1e-12)
        assert row_l.stats.norms == pytest.approx(norms, rel=1e-6, abs=1e-12)
        for (i, j), cs, cl in zip(small.pairs, row_s.stats.pair_cos, row_l.stats.pair_cos):
            if norms[i] * norms[j] == 0:
                assert cs is None and cl is None
                continue
            ref = float(d[i] @ d[j]) / (norms[i] * norms[j])
            assert cs == pytest.approx(ref, abs=1e-6) and cl == pytest.approx(ref, abs=1e-6)


def test_layer_rows_pool_the_layers_deltas(constructed):
    """A layer's norms and angles are those of its tensors' deltas concatenated; t ranges over tensors."""
    root, base, fts = constructed
    report = run_inspect(root)
    assert [r.layer for r in report.layers] == ["0", "1", "other"]
    for layer in report.layers:
        names = [r.name for r in report.tensors if r.layer == layer.layer]
        d = [torch.cat([ft[n].double().flatten() - base[n].double().flatten() for n in names]) for ft in fts]
        assert layer.tensors == len(names) == 2
        assert layer.stats.norms == pytest.approx([float(x.norm()) for x in d], rel=1e-6)
        for (i, j), c in zip(report.pairs, layer.stats.pair_cos):
            assert c == pytest.approx(float(d[i] @ d[j]) / float(d[i].norm() * d[j].norm()), abs=1e-6)
        ts = [r.t for r in report.tensors if r.layer == layer.layer]
        assert (layer.t_min, layer.t_max, layer.t_mean) == pytest.approx((min(ts), max(ts), sum(ts) / 2))


def test_bf16_models_match_their_float64_reference(tmp_path):
    gen = torch.Generator().manual_seed(3)
    base = {"model.layers.0.w": torch.randn(300, 50, generator=gen).bfloat16()}
    common = torch.randn(300, 50, generator=gen)
    fts = [{"model.layers.0.w": (base["model.layers.0.w"].float()
                                 + 0.05 * (common + torch.randn(300, 50, generator=gen))).bfloat16()} for _ in range(2)]
    write_checkpoint(tmp_path / "base", base)
    for i, ft in enumerate(fts):
        write_checkpoint(tmp_path / f"ft{i}", ft)
    report = inspect_models(tmp_path / "base", [tmp_path / "ft0", tmp_path / "ft1"], chunk_bytes=2000)
    d = [ft["model.layers.0.w"].double().flatten() - base["model.layers.0.w"].double().flatten() for ft in fts]
    cos = float(d[0] @ d[1]) / (float(d[0].norm()) * float(d[1].norm()) + 1e-8)
    [row] = report.tensors
    assert row.cos == pytest.approx(cos, abs=1e-6)
    assert 0.3 < cos < 0.7 and row.t == pytest.approx(2 * cos / (1 + cos), abs=1e-6)
    assert report.warnings == []


def test_incompatible_models_fail_from_headers(constructed, tmp_path):
    root, base, _ = constructed
    write_checkpoint(tmp_path / "bad", {k: v[:10] if v.is_floating_point() else v for k, v in base.items()},
                     config={"model_type": "llama"})
    with pytest.raises(CompatibilityError, match="shape"):
        inspect_models(root / "base", [root / "ft0", tmp_path / "bad"])


def test_outputs_json_and_pngs(constructed, tmp_path):
    root, _, _ = constructed
    report = run_inspect(root)
    paths = write_inspect_outputs(report, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["angle_t.png", "delta_norms.png", "inspect.json"]
    data = json.loads((tmp_path / "out" / "inspect.json").read_text())
    assert data["format"] == "hf-model-stock/inspect"
    assert data["pairs"] == [[0, 1], [0, 2], [1, 2]]
    assert [t["name"] for t in data["tensors"]] == [r.name for r in report.tensors]
    assert [t["t"] for t in data["tensors"]] == [r.t for r in report.tensors]
    assert data["tensors"][1]["stats"]["angles"][1] is None  # fine-tune 2's zero delta has no angle
    assert len(data["warnings"]) == len(report.warnings)
    for p in paths[1:]:
        assert p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000


def test_without_matplotlib_only_the_json_is_written(constructed, tmp_path, monkeypatch, caplog):
    root, _, _ = constructed
    monkeypatch.setitem(sys.modules, "hf_model_stock.analysis.plots", None)  # makes the import fail
    monkeypatch.delattr(hf_model_stock.analysis, "plots", raising=False)
    assert write_inspect_outputs(run_inspect(root), tmp_path) == [tmp_path / "inspect.json"]
    assert "pip install 'hf-model-stock[plots]'" in caplog.text


def test_t_plot_from_a_merge_report(constructed, tmp_path):
    from hf_model_stock.publish.plots import t_plot_png

    root, _, _ = constructed
    outcome = merge_models(root / "base", [root / f"ft{i}" for i in range(3)], tmp_path / "merged")
    path = t_plot_png(outcome.report.tensors, tmp_path / "t.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000


def cli(*argv: object) -> int:
    parser = argparse.ArgumentParser()
    add_inspect_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_cli_with_models_and_with_a_recipe(constructed, tmp_path, capsys):
    root, _, _ = constructed
    models = [x for i in range(3) for x in ("--model", root / f"ft{i}")]
    assert cli("inspect", "--base", root / "base", *models, "--out", tmp_path / "a", "-q", "--max-warnings", "2") == 0
    out = capsys.readouterr().out
    assert "warnings: cos_spread 2, near_zero_delta 2, negative_cos 1" in out
    assert "... and 3 more (see inspect.json)" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert lines["0"][1] == "2"  # layer 0 holds two merged tensors
    assert (tmp_path / "a" / "inspect.json").is_file() and (tmp_path / "a" / "angle_t.png").is_file()

    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base_model: {root / 'base'}\nmodels: [{', '.join(str(root / f'ft{i}') for i in range(3))}]\n"
                      "compute: {chunk_size: 4KiB}\n")
    assert cli("inspect", recipe, "-q", "--chunk-size", "2KiB") == 0
    assert "warnings: cos_spread 2, near_zero_delta 2, negative_cos 1" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "a", "--model", "b"], "either a recipe or --base"),
    (["--base", "b", "--model", "a"], "at least 2 fine-tuned models"),
    (["r.yaml", "--base", "b", "--model", "a", "--model", "c"], "either a recipe or --base"),
    (["r.yaml", "--model", "a"], "--model goes with --base"),
    (["--base", "b", "--model", "a", "--model", "c", "--chunk-size", "lots"], "--chunk-size: not a size"),
])
def test_cli_usage_errors(argv, message):
    with pytest.raises(ModelStockError, match=message):
        cli("inspect", *argv)
