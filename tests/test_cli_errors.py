"""Every user error is one clear line naming the file, tensor or key, a non-zero exit, no output."""

from pathlib import Path

import pytest
import torch

from hf_model_stock.cli import main
from tests.modelgen import finetunes, write_checkpoint


@pytest.fixture()
def models(tmp_path: Path) -> Path:
    gen = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(8, 4, generator=gen).bfloat16(), "b.weight": torch.randn(4, generator=gen).bfloat16()}
    write_checkpoint(tmp_path / "base", base, config={"model_type": "llama"})
    for i, ft in enumerate(finetunes(base, 3)):
        write_checkpoint(tmp_path / f"ft{i}", ft, config={"model_type": "llama"})
    return tmp_path


def run(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if ".hfms-" in p.name or p.name == "out")


def test_one_finetune_is_refused(models, capsys):
    code, err = run(capsys, "merge", "--base", models / "base", "--model", models / "ft0", "--out", models / "out")
    assert code == 2
    assert err == "error: command line: models: Model Stock needs at least 2 fine-tuned models, got 1"
    assert leftovers(models) == []


def test_base_among_finetunes_is_refused(models, capsys):
    code, err = run(capsys, "merge", "--base", models / "base", "--model", models / "ft0", "--model",
                    models / "base", "--out", models / "out")
    assert code == 2 and err.startswith("error: command line:")
    assert f"models[1]: {models / 'base'} is the base model; list only fine-tunes" in err
    assert leftovers(models) == []


def test_shape_and_name_mismatches_are_all_listed_before_reading_weights(models, capsys):
    gen = torch.Generator().manual_seed(1)
    write_checkpoint(models / "bad", {"a.weight": torch.randn(9, 4, generator=gen).bfloat16(),
                                      "c.weight": torch.randn(4, generator=gen).bfloat16()})
    code, err = run(capsys, "merge", "--base", models / "base", "--model", models / "ft0", "--model",
                    models / "bad", "--out", models / "out")
    assert code == 2
    assert err.startswith("error: 3 incompatibilities with base")
    assert "tensor 'b.weight': missing in" in err and "tensor 'c.weight': in" in err
    assert "tensor 'a.weight': shape [9, 4] in" in err and "vs [8, 4] in base" in err
    assert leftovers(models) == []


def test_architecture_mismatch(models, capsys):
    (models / "ft1" / "config.json").write_text('{"model_type": "qwen2"}')
    code, err = run(capsys, "merge", "--base", models / "base", "--model", models / "ft0", "--model",
                    models / "ft1", "--out", models / "out")
    assert code == 2 and "config model_type: 'qwen2' in" in err and "vs 'llama' in base" in err
    assert leftovers(models) == []


def test_existing_output_needs_overwrite(models, capsys):
    (models / "out").mkdir()
    (models / "out" / "keep.txt").write_text("old")
    args = ["merge", "--base", models / "base", "--model", models / "ft0", "--model", models / "ft1",
            "--out", models / "out", "-q"]
    code, err = run(capsys, *args)
    assert code == 2 and err == f"error: {models / 'out'}: output directory exists (pass --overwrite to replace it)"
    assert (models / "out" / "keep.txt").read_text() == "old"
    assert run(capsys, *args, "--overwrite")[0] == 0
    assert not (models / "out" / "keep.txt").exists() and (models / "out" / "model.safetensors").is_file()
    assert [p.name for p in models.iterdir() if ".hfms-" in p.name] == []


def test_output_equal_to_an_input_is_refused(models, capsys):
    code, err = run(capsys, "merge", "--base", models / "base", "--model", models / "ft0", "--model",
                    models / "ft1", "--out", models / "ft1", "--overwrite")
    assert code == 2 and "output.path" in err and "is also an input model" in err
    assert leftovers(models) == [] and sorted(p.name for p in (models / "ft1").iterdir()) == [
        "config.json", "model.safetensors"]


def test_missing_model_directory(models, capsys):
    code, err = run(capsys, "merge", "--base", models / "base", "--model", models / "ft0", "--model",
                    models / "nope", "--out", models / "out")
    assert code == 2
    assert err == f"error: {models / 'nope'}: no such local directory, and not a Hub repo id (org/name)"
    assert leftovers(models) == []


def test_cuda_requested_without_gpu(models, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, err = run(capsys, "merge", "--base", models / "base", "--model", models / "ft0", "--model",
                    models / "ft1", "--out", models / "out", "--device", "cuda")
    assert code == 2 and err == "error: device 'cuda' requested but no CUDA GPU is available (use --device cpu)"
    assert leftovers(models) == []


def test_dry_run_prints_the_plan_and_writes_nothing(models, capsys):
    code = main(["merge", "--base", str(models / "base"), "--model", str(models / "ft0"), "--model",
                 str(models / "ft1"), "--out", str(models / "out"), "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert "tensors: 2 (2 merged, 0 copied from the base, 0 in two passes)" in out
    assert "shard:  model.safetensors  2 tensors" in out and "expected peak memory" in out
    assert leftovers(models) == []


def test_pickle_only_model_is_named(models, capsys):
    (models / "pk").mkdir()
    (models / "pk" / "pytorch_model.bin").write_bytes(b"x")
    code, err = run(capsys, "merge", "--base", models / "base", "--model", models / "ft0", "--model",
                    models / "pk", "--out", models / "out")
    assert code == 2
    assert err == (f"error: {models / 'pk'}: only pickle weights (pytorch_model.bin); loading pickle can run "
                   "code, so they are refused. Set `allow_pickle: true` in the recipe (--allow-pickle on the "
                   "command line) to convert them to safetensors with torch.load(weights_only=True)")
    assert leftovers(models) == []
