"""Merged checkpoints against the independent float64 reference, over N, dtypes, granularities,
chunk sizes, shard layouts and edge cases."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hf_model_stock.merge.plan import MergeOptions
from hf_model_stock.methods.model_stock import ModelStockParams
from hf_model_stock.pipeline import merge_models
from tests.modelgen import finetunes, write_checkpoint
from tests.reference import reference_merge

# Allowed distance from the float64 reference rounded to the output dtype, in that dtype's ulps:
# 16-bit outputs are rounded once from float32 math; float32 outputs carry float32 arithmetic error.
MAX_ULPS = {torch.bfloat16: 1, torch.float16: 1, torch.float32: 2}


def ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of the dtype at each |x| (float64 result)."""
    a = x.abs()
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()


def load_dir(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def base_tensors(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(97, 48, generator=gen).to(dtype),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(48, 48, generator=gen).to(dtype),
        "model.layers.0.mlp.up_proj.weight": torch.randn(130, 48, generator=gen).to(dtype),
        "model.layers.0.input_layernorm.weight": (1 + 0.1 * torch.randn(48, generator=gen)).to(dtype),
        "model.layers.1.self_attn.o_proj.bias": torch.randn(48, generator=gen).to(dtype),
        "model.layers.1.conv.weight": torch.randn(6, 4, 3, generator=gen).to(dtype),
        "model.rotary.inv_freq_steps": torch.arange(24, dtype=torch.int64),
        "model.mask": torch.tensor([True, False, True]),
    }


def assert_matches_reference(merged, base, fts, *, eps=1e-8, clamp_t=True, filter_wise=False):
    """Every floating tensor within one output ulp of the float64 reference, and nearly all exact."""
    for name, b in base.items():
        got = merged[name]
        assert got.dtype == b.dtype and got.shape == b.shape, name
        if not b.is_floating_point():
            assert torch.equal(got, b), f"{name}: non-floating tensor not copied from the base"
            continue
        ref, _ = reference_merge(b, [f[name] for f in fts], eps=eps, clamp_t=clamp_t, filter_wise=filter_wise)
        rounded = ref.to(b.dtype)
        diff = (got.double() - rounded.double()).abs()
        # float32 arithmetic also errs by ~1 float32 ulp of the inputs' magnitude, which matters
        # where the result is much smaller than the weights it is computed from (cancellation)
        scale = torch.stack([b.abs().float(), *[f[name].abs().float() for f in fts]]).amax(0)
        allowed = MAX_ULPS[b.dtype] * ulp(rounded) + 2 * ulp(scale)
        assert bool((diff <= allowed).all()), f"{name}: off by more than {MAX_ULPS[b.dtype]} ulp (max {diff.max()})"
        if b.dtype != torch.float32:  # one rounding of float32 math: nearly always the exact rounding
            assert (diff > 0).float().mean().item() < 0.01, f"{name}: too many elements not exactly rounded"


@pytest.mark.parametrize("n", [2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("granularity", ["layer", "filter"])
def test_merge_matches_reference(tmp_path, n, dtype, granularity):
    base = base_tensors(dtype)
    fts = finetunes(base, n, seed=n)
    write_checkpoint(tmp_path / "base", base, shards=2)
    for i, ft in enumerate(fts):
        write_checkpoint(tmp_path / f"ft{i}", ft, shards=1 + i % 3)  # shard layouts differ from the base's
    opts = MergeOptions(params=ModelStockParams(granularity=granularity))
    out = merge_models(tmp_path / "base", [tmp_path / f"ft{i}" for i in range(n)], tmp_path / "out", opts)
    merged = load_dir(out.path)
    assert set(merged) == set(base)
    assert_matches_reference(merged, base, fts, filter_wise=granularity == "filter")
    ref_t = reference_merge(base["model.layers.0.self_attn.q_proj.weight"],
                            [f["model.layers.0.self_attn.q_proj.weight"] for f in fts],
                            filter_wise=granularity == "filter")[1]
    entry = out.report.tensor("model.layers.0.self_attn.q_proj.weight")
    assert entry.t == pytest.approx(ref_t.mean().item(), abs=1e-6)  # float32 block dots


@pytest.mark.parametrize("granularity", ["layer", "filter"])
def test_chunked_and_parallel_merges_equal_the_whole_tensor_merge(tmp_path, granularity):
    base = base_tensors(torch.bfloat16)
    fts = finetunes(base, 3)
    write_checkpoint(tmp_path / "base", base)
    for i, ft in enumerate(fts):
        write_checkpoint(tmp_path / f"ft{i}", ft)
    models = [tmp_path / f"ft{i}" for i in range(3)]
    params = ModelStockParams(granularity=granularity)
    whole = load_dir(merge_models(tmp_path / "base", models, tmp_path / "whole",
                                  MergeOptions(params=params, workers=1)).path)
    # 3000 bytes of input per unit: every matrix is split, layer-wise ones in two passes
    chunked = load_dir(merge_models(tmp_path / "base", models, tmp_path / "chunked",
                                    MergeOptions(params=params, chunk_bytes=3000, workers=2, prefetch=1)).path)
    for name in base:
        assert torch.equal(whole[name], chunked[name]), name
    assert_matches_reference(chunked, base, fts, filter_wise=granularity == "filter")


def test_tiny_deltas_are_merged_with_the_authors_formula(tmp_path):
    gen = torch.Generator().manual_seed(3)
    base = {"w": torch.randn(256, 256, generator=gen, dtype=torch.float64).to(torch.float32)}
    common = torch.randn(256, 256, generator=gen)
    fts = []
    for _ in range(3):
        d = common + torch.randn(256, 256, generator=gen)
        fts.append({"w": base["w"] + d / d.norm() * 1e-4})  # delta norms ~1e-4
    write_checkpoint(tmp_path / "base", base)
    for i, ft in enumerate(fts):
        write_checkpoint(tmp_path / f"ft{i}", ft)
    models = [tmp_path / f"ft{i}" for i in range(3)]
    out = merge_models(tmp_path / "base", models, tmp_path / "out")
    assert_matches_reference(load_dir(out.path), base, fts)
    t_default = out.report.tensors[0].t
    exact = merge_models(tmp_path / "base", models, tmp_path / "exact",
                         MergeOptions(params=ModelStockParams(eps=0.0)))
    t_exact = exact.report.tensors[0].t
    _, ref_t = reference_merge(base["w"], [f["w"] for f in fts], eps=0.0)
    assert t_exact == pytest.approx(ref_t.item(), abs=1e-6)
    assert t_exact - t_default > 0.1  # the epsilon matters at these norms, as the design notes say


def test_all_zero_deltas_return_the_base_exactly(tmp_path):
    base = base_tensors(torch.bfloat16)
    write_checkpoint(tmp_path / "base", base)
    for i in range(3):
        write_checkpoint(tmp_path / f"ft{i}", base)
    out = merge_models(tmp_path / "base", [tmp_path / f"ft{i}" for i in range(3)], tmp_path / "out")
    merged = load_dir(out.path)
    for name in base:
        assert torch.equal(merged[name], base[name])
    assert all(t.t == 0.0 for t in out.report.tensors if t.action == "merge")


def test_negatively_correlated_deltas_clamp_on_and_off(tmp_path):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(64, 64, generator=gen)
    d = torch.randn(64, 64, generator=gen) * 0.01
    e = torch.randn(64, 64, generator=gen) * 0.01
    base, fts = {"w": w}, [{"w": w + d}, {"w": w - 0.5 * d + e}]  # cos ~ -0.45, t ~ -1.6 unclamped
    write_checkpoint(tmp_path / "base", base)
    for i, ft in enumerate(fts):
        write_checkpoint(tmp_path / f"ft{i}", ft)
    models = [tmp_path / "ft0", tmp_path / "ft1"]
    on = merge_models(tmp_path / "base", models, tmp_path / "on")
    assert on.report.tensors[0].t == 0.0 and on.report.tensors[0].clamped
    assert on.report.summary.clamped == 1
    assert torch.equal(load_dir(on.path)["w"], w)
    off = merge_models(tmp_path / "base", models, tmp_path / "off",
                       MergeOptions(params=ModelStockParams(clamp_t=False)))
    ref, ref_t = reference_merge(w, [f["w"] for f in fts], clamp_t=False)
    assert -2.5 < ref_t.item() < -1.0
    assert off.report.tensors[0].t == pytest.approx(ref_t.item(), rel=1e-6)
    assert_matches_reference(load_dir(off.path), base, fts, clamp_t=False)


def test_output_dtype_conversion_and_config(tmp_path):
    base = base_tensors(torch.float32)
    fts = finetunes(base, 2)
    write_checkpoint(tmp_path / "base", base, config={"model_type": "llama", "torch_dtype": "float32"})
    for i, ft in enumerate(fts):
        write_checkpoint(tmp_path / f"ft{i}", ft, config={"model_type": "llama"})
    out = merge_models(tmp_path / "base", [tmp_path / "ft0", tmp_path / "ft1"], tmp_path / "out",
                       MergeOptions(dtype="BF16"))
    merged = load_dir(out.path)
    for name, b in base.items():
        if b.is_floating_point():
            ref, _ = reference_merge(b, [f[name] for f in fts])
            assert merged[name].dtype == torch.bfloat16
            rounded = ref.to(torch.bfloat16)
            assert bool(((merged[name].double() - rounded.double()).abs() <= ulp(rounded)).all())
        else:
            assert torch.equal(merged[name], b)
    assert json.loads((out.path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_report_checksums_and_layout(tmp_path):
    base = base_tensors(torch.bfloat16)
    fts = finetunes(base, 2)
    write_checkpoint(tmp_path / "base", base)
    for i, ft in enumerate(fts):
        write_checkpoint(tmp_path / f"ft{i}", ft)
    out = merge_models(tmp_path / "base", [tmp_path / "ft0", tmp_path / "ft1"], tmp_path / "out",
                       MergeOptions(shard_bytes=20_000))
    shards = sorted(p.name for p in out.path.glob("*.safetensors"))
    assert len(shards) > 1
    index = json.loads((out.path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(base) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in base.values())
    report = json.loads((out.path / "merge_report.json").read_text())
    for name in shards:
        assert report["shards"][name] == hashlib.sha256((out.path / name).read_bytes()).hexdigest()
    assert report["summary"]["merged"] == 6 and report["summary"]["copied"] == 2
    assert report["sources"]["models"][1]["path"] == "ft1"  # the directory's name: the report is published
    assert str(tmp_path) not in (out.path / "merge_report.json").read_text()
    assert [p.name for p in tmp_path.iterdir() if ".hfms-" in p.name] == []


def test_tied_lm_head_stored_by_only_some_models_is_left_out(tmp_path):
    base = base_tensors(torch.bfloat16)
    fts = finetunes(base, 2)
    fts[1]["lm_head.weight"] = fts[1]["model.embed_tokens.weight"].clone()
    cfg = {"model_type": "llama", "tie_word_embeddings": True}
    write_checkpoint(tmp_path / "base", base, config=cfg)
    for i, ft in enumerate(fts):
        write_checkpoint(tmp_path / f"ft{i}", ft, config=cfg)
    out = merge_models(tmp_path / "base", [tmp_path / "ft0", tmp_path / "ft1"], tmp_path / "out")
    assert "lm_head.weight" not in load_dir(out.path)
    assert any("lm_head.weight" in n for n in out.report.notes)


@pytest.mark.parametrize("granularity", ["layer", "filter"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_method_is_the_uniform_average(tmp_path, granularity, dtype):
    base = base_tensors(dtype)
    fts = finetunes(base, 3)
    write_checkpoint(tmp_path / "base", base)
    for i, ft in enumerate(fts):
        write_checkpoint(tmp_path / f"ft{i}", ft)
    out = merge_models(tmp_path / "base", [tmp_path / f"ft{i}" for i in range(3)], tmp_path / "out",
                       MergeOptions(method="linear", params=ModelStockParams(granularity=granularity)))
    merged = load_dir(out.path)
    for name, b in base.items():
        if not b.is_floating_point():
            assert torch.equal(merged[name], b)
            continue
        mean = torch.stack([f[name].double() for f in fts]).mean(0).to(dtype)
        diff = (merged[name].double() - mean.double()).abs()
        assert bool((diff <= ulp(mean)).all()), name
        assert (diff > 0).float().mean().item() < 0.01, name
    assert out.report.method == "linear"
    assert all(t.t == 1.0 and not t.clamped for t in out.report.tensors if t.action == "merge")
