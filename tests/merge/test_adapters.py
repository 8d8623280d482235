"""LoRA adapters as fine-tunes: merges against an independent float64 reference that densifies the
adapters (s·B@A read from their files; that densification is itself checked against peft's
``merge_and_unload``), mixed with a full fine-tune, layer- and filter-wise; the adapter output loaded
with peft; bad adapters refused in one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hf_model_stock.cli import main
from hf_model_stock.merge.plan import MergeOptions
from hf_model_stock.methods.model_stock import ModelStockParams
from hf_model_stock.pipeline import merge_models
from tests.adaptergen import densified, make_adapter, peft_merged, tiny_base
from tests.merge.test_merge import load_dir, ulp
from tests.modelgen import finetunes, write_checkpoint
from tests.reference import reference_merge

pytest.importorskip("peft")

ADAPTERS = {
    "a0": dict(seed=1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"]),
    "a1": dict(seed=2, r=2, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "k_proj", "embed_tokens"],
               rank_pattern={"v_proj": 3}, alpha_pattern={"k_proj": 5}, modules_to_save=["lm_head"]),
    "a2": dict(seed=3, r=8, lora_alpha=16, target_modules=["q_proj", "o_proj", "down_proj"]),
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, Path]:
    """A tiny base, three adapters of it (different ranks, alphas, rsLoRA, patterns, an embedding,
    modules_to_save) and one full fine-tune."""
    root = tmp_path_factory.mktemp("zoo")
    paths = {"base": tiny_base(root / "base")}
    for name, kwargs in ADAPTERS.items():
        paths[name] = make_adapter(paths["base"], root / name, **kwargs)
    base = load_dir(paths["base"])
    (full,) = finetunes(base, 1, scale=0.05, seed=7)
    paths["full"] = write_checkpoint(root / "full", full)
    shutil.copyfile(paths["base"] / "config.json", paths["full"] / "config.json")
    return paths


def fine_tunes(zoo: dict[str, Path], names: list[str]) -> list[dict[str, torch.Tensor]]:
    base = load_dir(zoo["base"])
    return [{k: v.double() for k, v in load_dir(zoo[n]).items()} if n == "full" else densified(zoo[n], base)
            for n in names]


def test_reference_densification_agrees_with_peft(zoo):
    base = load_dir(zoo["base"])
    for name in ADAPTERS:
        ours, theirs = densified(zoo[name], base), peft_merged(zoo["base"], zoo[name])
        for k, v in ours.items():
            assert torch.allclose(v, theirs[k].double(), atol=1e-6, rtol=0), (name, k)


@pytest.mark.parametrize("names", [["a0", "a1"], ["a0", "a1", "a2"], ["a0", "full", "a1"]])
@pytest.mark.parametrize("granularity", ["layer", "filter"])
@pytest.mark.parametrize("chunk", [128 * 2**20, 3000])
def test_adapter_merges_match_the_dense_reference(zoo, tmp_path, names, granularity, chunk):
    base = load_dir(zoo["base"])
    fts = fine_tunes(zoo, names)
    opts = MergeOptions(params=ModelStockParams(granularity=granularity), chunk_bytes=chunk)
    out = merge_models(zoo["base"], [zoo[n] for n in names], tmp_path / "out", opts)
    merged = load_dir(out.path)
    assert set(merged) == set(base)
    for name, b in base.items():
        ref, ref_t = reference_merge(b, [f[name] for f in fts], filter_wise=granularity == "filter")
        rounded = ref.to(b.dtype)
        diff = (merged[name].double() - rounded.double()).abs()
        assert bool((diff <= ulp(rounded)).all()), f"{name}: max diff {diff.max()}"
        assert out.report.tensor(name).t == pytest.approx(ref_t.mean().item(), abs=1e-9), name
    # a tensor no adapter touches: zero deltas for the adapters
    norm = out.report.tensor("model.norm.weight")
    assert norm.delta_norms[names.index("full")] > 0 if "full" in names else norm.t == 0.0


def test_plan_notes_and_dry_run(zoo, tmp_path, capsys):
    code = main(["merge", "--base", str(zoo["base"]), "--model", str(zoo["a0"]), "--model", str(zoo["a1"]),
                 "--out", str(tmp_path / "out"), "--dry-run", "--device", "cpu"])
    assert code == 0
    assert "LoRA adapter(s) among the fine-tunes" in capsys.readouterr().out
