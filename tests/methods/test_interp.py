"""``interp``: the base-to-soup line at one t, and the t at which it is as far from the base as Model
Stock, against an independent float64 reference (whole tensors, the paper's formula, no Gram)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hf_model_stock.merge.plan import MergeOptions
from hf_model_stock.methods.interp import equal_distance_t, fixed_ratio
from hf_model_stock.methods.model_stock import ModelStockParams
from hf_model_stock.pipeline import merge_models
from hf_model_stock.recipe import Recipe
from tests.modelgen import finetunes, write_checkpoint
from tests.reference import reference_ratio

SHAPES = {"a.weight": (64, 32), "b.weight": (48, 48), "c.bias": (40,), "d.weight": (16, 8, 3)}
SHARED = {"a.weight": 0.05, "b.weight": 0.5, "c.bias": 0.9, "d.weight": 0.3}  # so t differs by tensor


def models(n: int) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """A float32 base and ``n`` fine-tunes whose deltas agree by a different amount in each tensor."""
    gen = torch.Generator().manual_seed(0)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    fts: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for k, shared in SHARED.items():
        for ft, made in zip(fts, finetunes({k: base[k]}, n, shared=shared, seed=len(k) + int(10 * shared))):
            ft[k] = made[k]
    return base, fts


def reference_distance(base: dict[str, torch.Tensor], merged: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((merged[k].double() - base[k].double()) ** 2).sum()) for k in base))


def reference_stock_and_soup(base, fts) -> tuple[float, float]:
    """(||stock - base||, ||soup - base||), whole tensors in float64."""
    stock = soup = 0.0
    for k, b in base.items():
        mean_delta = torch.stack([f[k].double() for f in fts]).mean(0) - b.double()
        t = reference_ratio(b, [f[k] for f in fts])
        stock += t * t * float((mean_delta ** 2).sum())
        soup += float((mean_delta ** 2).sum())
    return math.sqrt(stock), math.sqrt(soup)


def grams(base, fts) -> list[np.ndarray]:
    out = []
    for k, b in base.items():
        d = np.stack([(f[k].double() - b.double()).flatten().numpy() for f in fts])
        out.append(d @ d.T)
    return out


@pytest.mark.parametrize("n", [2, 3])
def test_equal_distance_t_matches_the_reference(n: int) -> None:
    base, fts = models(n)
    stock, soup = reference_stock_and_soup(base, fts)
    ts = [reference_ratio(base[k], [f[k] for f in fts]) for k in base]
    assert max(ts) - min(ts) > 0.3  # the tensors' t differ, so one t is a real change
    assert equal_distance_t(grams(base, fts)) == pytest.approx(stock / soup, rel=1e-12)


def test_equal_distance_t_edge_cases() -> None:
    assert equal_distance_t([np.zeros((3, 3))]) == 0.0  # the fine-tunes are the base
    same = 2.0 * np.ones((2, 2))  # identical deltas: t 1 everywhere, so the soup itself
    assert equal_distance_t([same, 3 * same], ModelStockParams(eps=0.0)) == pytest.approx(1.0, rel=1e-15)
    rows = np.stack([np.eye(2), 4 * np.ones((2, 2))])  # filter-wise: one Gram per row
    assert equal_distance_t([rows], ModelStockParams(eps=0.0)) == pytest.approx(math.sqrt(8 / 9), rel=1e-15)


def test_fixed_ratio_needs_t() -> None:
    g = np.array([[1.0, 0.5], [0.5, 1.0]])
    assert float(fixed_ratio(g, ModelStockParams(t=0.25)).t) == 0.25
    with pytest.raises(ValueError, match=r"^parameters\.t: method interp needs"):
        fixed_ratio(g, ModelStockParams())


def test_recipe_takes_t_with_interp_only(tmp_path: Path) -> None:
    for name in ("b", "m1", "m2"):
        (tmp_path / name).mkdir()
    common = {"base_model": str(tmp_path / "b"), "models": [str(tmp_path / "m1"), str(tmp_path / "m2")]}
    assert Recipe.model_validate({**common, "method": "interp", "parameters": {"t": 0.5}}).parameters.t == 0.5
    for bad, message in [({"method": "interp"}, "method interp needs it"),
                         ({"parameters": {"t": 0.5}}, "only method interp takes it (method is model_stock)"),
                         ({"method": "interp", "parameters": {"t": -0.1}}, "parameters.t")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            Recipe.model_validate({**common, **bad})


@pytest.mark.parametrize("n", [2, 3])
def test_interp_merge_is_as_far_from_the_base_as_model_stock(tmp_path: Path, n: int) -> None:
    base, fts = models(n)
    write_checkpoint(tmp_path / "base", base)
    for i, ft in enumerate(fts):
        write_checkpoint(tmp_path / f"ft{i}", ft)
    sources = [tmp_path / f"ft{i}" for i in range(n)]
    t = equal_distance_t(grams(base, fts))
    stock = merge_models(tmp_path / "base", sources, tmp_path / "stock")
    interp = merge_models(tmp_path / "base", sources, tmp_path / "interp",
                          MergeOptions(method="interp", params=ModelStockParams(t=t)))
    got_stock = load_file(str(tmp_path / "stock" / "model.safetensors"))
    got_interp = load_file(str(tmp_path / "interp" / "model.safetensors"))
    ref_stock, ref_soup = reference_stock_and_soup(base, fts)
    assert reference_distance(base, got_stock) == pytest.approx(ref_stock, rel=1e-6)
    assert reference_distance(base, got_interp) == pytest.approx(ref_stock, rel=1e-6)  # same distance
    assert t * ref_soup == pytest.approx(ref_stock, rel=1e-12)
    for k, b in base.items():  # on the base-to-soup line at t, tensor by tensor
        mean = torch.stack([f[k].double() for f in fts]).mean(0)
        expected = b.double() + t * (mean - b.double())
        assert torch.allclose(got_interp[k].double(), expected, rtol=0, atol=4e-7), k
    # the control: the split between tensors differs, so the two merges are different points
    per_tensor = [(reference_distance({k: b}, {k: got_stock[k]}), reference_distance({k: b}, {k: got_interp[k]}))
                  for k, b in base.items()]
    assert max(abs(s - i) / s for s, i in per_tensor) > 0.1
    assert {r.t for r in interp.report.tensors if r.action == "merge"} == {t}
    assert stock.report.method == "model_stock" and interp.report.method == "interp"
