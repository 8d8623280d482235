"""The compute stage: unit layout in the reader's buffer, the fused/torch choice, and a CPU merge
that never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from hf_model_stock.io.buffers import DIRECT_ALIGN, host_buffer
from hf_model_stock.io.reader import Checkpoint, ShardFiles
from hf_model_stock.merge.compute import UnitCompute
from hf_model_stock.merge.plan import MergeOptions, build_plan
from hf_model_stock.merge.units import UNIT_ALIGN, read_unit, unit_buffer_bytes
from hf_model_stock.methods import fused_cpu
from hf_model_stock.methods.model_stock import ModelStockParams, ratio_from_gram
from hf_model_stock.recipe import ModelEntry
from hf_model_stock.sources.resolve import resolve
from tests.modelgen import finetunes, write_checkpoint

REPO = Path(__file__).resolve().parents[1]


def small_models(tmp_path: Path, dtype: torch.dtype, n: int = 3) -> tuple[Path, list[Path]]:
    gen = torch.Generator().manual_seed(7)
    # odd lengths: 1001 bf16 elements are 2002 bytes, so a tight packing would misalign the next input
    base = {"a.weight": torch.randn(1001, generator=gen).to(dtype), "b.weight": torch.randn(33, 17, generator=gen).to(dtype)}
    write_checkpoint(tmp_path / "base", base)
    paths = []
    for i, ft in enumerate(finetunes(base, n, seed=3)):
        paths.append(write_checkpoint(tmp_path / f"ft{i}", ft))
    return tmp_path / "base", paths


def plan_for(base: Path, models: list[Path], **options):
    resolved = [resolve(ModelEntry.model_validate(str(p))) for p in [base, *models]]
    return build_plan(resolved[0], resolved[1:], MergeOptions(**options))


def file_bytes(path: Path, name: str) -> bytes:
    want = Checkpoint.open(path).tensors[name]
    with open(want.path, "rb") as fh:
        fh.seek(want.offset)
        return fh.read(want.nbytes)


def test_read_unit_puts_every_input_on_a_cache_line(tmp_path):
    base, models = small_models(tmp_path, torch.bfloat16)
    plan = plan_for(base, models)
    task = next(t for t in plan.tasks if t.name == "a.weight")
    buf = host_buffer(plan.max_unit_in_bytes + UNIT_ALIGN * (len(models) + 1))
    with ShardFiles() as files:
        views = read_unit(buf, task, 0, task.numel, files)
    assert [v.__array_interface__["data"][0] % UNIT_ALIGN for v in views] == [0] * 4
    assert all(np.shares_memory(v, buf) for v in views)
    for view, path in zip(views, [base, *models]):  # the bits as the safetensors library reads them
        assert view.dtype == np.uint16 and view.tobytes() == file_bytes(path, "a.weight")


def test_read_unit_places_cold_inputs_on_their_file_block_grid(tmp_path):
    """Inputs read with O_DIRECT sit where their address agrees with their file offset modulo 4096
    (whole blocks are read straight into them), within the buffer's slack, with the right bytes."""
    from tests.io.test_reader import evict

    gen = torch.Generator().manual_seed(5)
    base = {"w": torch.randn(3 * 4096 + 77, generator=gen).to(torch.bfloat16)}
    write_checkpoint(tmp_path / "base", base)
    models = [write_checkpoint(tmp_path / f"ft{i}", ft) for i, ft in enumerate(finetunes(base, 3, seed=6))]
    plan = plan_for(tmp_path / "base", models)
    task = plan.tasks[0]
    if any(evict(i.path) > 0.5 for i in task.inputs):
        pytest.skip("this filesystem keeps the files cached")
    buf = host_buffer(unit_buffer_bytes(plan))
    with ShardFiles() as files:
        views = read_unit(buf, task, 5, task.numel, files)
        assert all(files.reads_direct(i.path) for i in task.inputs)
    for view, info, path in zip(views, task.inputs, [tmp_path / "base", *models]):
        assert view.__array_interface__["data"][0] % DIRECT_ALIGN == (info.offset + 10) % DIRECT_ALIGN
        assert np.shares_memory(view, buf) and view.tobytes() == file_bytes(path, "w")[10:]


def test_read_unit_views_cached_shards_where_they_lie_and_releases_them(tmp_path):
    base, models = small_models(tmp_path, torch.bfloat16)
    plan = plan_for(base, models)
    task = next(t for t in plan.tasks if t.name == "b.weight")
    buf = host_buffer(plan.max_unit_in_bytes + UNIT_ALIGN * (len(models) + 1))
    mapped: list = []
    with ShardFiles(map_cached=True) as files:  # the files were just written: they are in the page cache
        views = read_unit(buf, task, 3, 500, files, mapped)
        assert [p for p, _ in mapped] == [i.path for i in task.inputs]
        assert not any(np.shares_memory(v, buf) for v in views)
        for view, path in zip(views, [base, *models]):
            assert view.shape == (497,) and view.tobytes() == file_bytes(path, "b.weight")[6:1000]
        for path, view in mapped:
            files.release(path, view)
        assert views[1].tobytes() == file_bytes(models[0], "b.weight")[6:1000]  # still readable, from the file
        del views, view, mapped
    # a tensor that does not start on its element size is read into the buffer instead
    info = task.inputs[0]
    with ShardFiles(map_cached=True) as files:
        assert files.mapped(info, 0, 10, 2) is not None
        assert files.mapped(info, 1, 10, 2) is None
        assert files.mapped(info, 0, info.nbytes + 1 << 20, 2) is None  # past the end of the file


@pytest.mark.parametrize("dtype, granularity, fused", [
    ("BF16", "layer", True), ("F32", "layer", True), ("F16", "layer", False), ("BF16", "filter", False),
])
def test_fused_kernels_are_chosen_only_where_they_apply(tmp_path, dtype, granularity, fused):
    torch_dtype = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}[dtype]
    base, models = small_models(tmp_path, torch_dtype)
    plan = plan_for(base, models, params=ModelStockParams(granularity=granularity))
    compute = UnitCompute(3, 2, "cpu", plan.max_single_unit_elems)
    try:
        # filter-wise applies to tensors of 2 or more dimensions: "b.weight" here, not "a.weight"
        assert {t.name: compute.fused(t) for t in plan.tasks} == {
            "a.weight": dtype != "F16" and fused_cpu.available(),
            "b.weight": fused and fused_cpu.available(),
        }
        converted = plan_for(base, models, dtype="F32" if dtype != "F32" else "BF16")
        assert not any(compute.fused(t) for t in converted.tasks)  # another output dtype: torch
    finally:
        compute.close()


@pytest.mark.skipif(not fused_cpu.available(), reason="the C extension was not built")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_and_torch_paths_of_one_unit_give_the_same_bytes(tmp_path, monkeypatch, dtype):
    base, models = small_models(tmp_path, dtype)
    plan = plan_for(base, models)
    task = next(t for t in plan.tasks if t.name == "b.weight")
    buf = host_buffer(plan.max_unit_in_bytes + UNIT_ALIGN * 4)
    with ShardFiles() as files:
        views = read_unit(buf, task, 0, task.numel, files)
    compute = UnitCompute(3, 2, "cpu", plan.max_single_unit_elems)
    outs, ratios = [], []
    try:
        for force_torch in (False, True):
            if force_torch:
                monkeypatch.setattr(compute, "fused", lambda task: False)
            out = np.empty(task.numel, views[0].dtype)
            ratios.append(compute.merge(task, views, out, ratio_from_gram, ModelStockParams()))
            outs.append(out)
    finally:
        compute.close()
    assert outs[0].tobytes() == outs[1].tobytes()
    assert float(ratios[0].t) == pytest.approx(float(ratios[1].t), rel=1e-6)


def test_without_the_c_extension_the_torch_kernels_give_the_same_shards(tmp_path, monkeypatch):
    """An install without a C compiler has no fused kernels: every tensor takes the torch kernels."""
    from hf_model_stock.pipeline import merge_models

    base, models = small_models(tmp_path, torch.bfloat16)
    with_c = merge_models(base, models, tmp_path / "with_c")
    monkeypatch.setattr(fused_cpu, "_fused", None)
    assert not fused_cpu.available()
    without = merge_models(base, models, tmp_path / "without")
    assert (with_c.path / "model.safetensors").read_bytes() == (without.path / "model.safetensors").read_bytes()


def test_a_cpu_merge_never_imports_torch(tmp_path):
    base, models = small_models(tmp_path, torch.bfloat16)
    args = ["merge", "--base", str(base), *[a for m in models for a in ("--model", str(m))],
            "--out", str(tmp_path / "out"), "-q"]
    code = ("import sys\nfrom hf_model_stock.cli import main\n"
            f"rc = main({args!r})\n"
            "assert rc == 0, rc\n"
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "assert not loaded, loaded[:5]\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("granularity", ["layer", "filter"])
def test_cuda_merge_agrees_with_the_cpu_merge(tmp_path, granularity):
    from safetensors.torch import load_file

    from hf_model_stock.pipeline import merge_models

    base, models = small_models(tmp_path, torch.bfloat16)
    merged = {}
    for device in ("cpu", "cuda"):
        opts = MergeOptions(params=ModelStockParams(granularity=granularity), device=device)
        out = merge_models(base, models, tmp_path / device, opts)
        merged[device] = (load_file(out.path / "model.safetensors"), {t.name: t for t in out.report.tensors})
    (cpu, cpu_stats), (gpu, gpu_stats) = merged["cpu"], merged["cuda"]
    for name, want in cpu.items():
        # the GPU sums its Gram blocks in float64, the CPU in float32 blocks: t may differ in its last
        # bits, which moves an output element by at most one bf16 step
        step = torch.ldexp(torch.ones_like(want.float()), torch.frexp(want.float())[1] - 8)  # one bf16 step
        assert bool(((gpu[name].float() - want.float()).abs() <= step).all()), name
        assert gpu_stats[name].t == pytest.approx(cpu_stats[name].t, abs=1e-6)
