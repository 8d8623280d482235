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


def load_peft(base_dir: Path, adapter_dir: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("granularity", ["layer", "filter"])
def test_adapter_output_loads_with_peft_and_equals_the_full_merge(zoo, tmp_path, granularity):
    names = ["a0", "a1", "a2"]
    opts = MergeOptions(params=ModelStockParams(granularity=granularity))
    full = merge_models(zoo["base"], [zoo[n] for n in names], tmp_path / "full", opts)
    adapter = merge_models(zoo["base"], [zoo[n] for n in names], tmp_path / "adapter",
                           MergeOptions(params=ModelStockParams(granularity=granularity), output_format="adapter"))
    files = sorted(p.name for p in adapter.path.iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files and "config.json" not in files
    config = json.loads((adapter.path / "adapter_config.json").read_text())
    assert config["r"] == 4 + 2 + 8 and config["modules_to_save"] == ["lm_head"]  # q_proj: ranks 4, 2 (a1), 8
    assert config["base_model_name_or_path"] == str(zoo["base"])
    merged, want = load_peft(zoo["base"], adapter.path), load_dir(full.path)
    for name, w in want.items():
        assert torch.allclose(merged[name], w, atol=2e-6, rtol=0), name
    assert [t.t for t in adapter.report.tensors] == pytest.approx([t.t for t in full.report.tensors], abs=1e-12)
    card = (adapter.path / "README.md").read_text()
    assert "LoRA adapter" in card and "library_name: peft" in card
    assert json.loads((adapter.path / "merge_report.json").read_text())["output_format"] == "adapter"


def test_adapter_output_refuses_a_full_fine_tune(zoo, tmp_path, capsys):
    code = main(["merge", "--base", str(zoo["base"]), "--model", str(zoo["a0"]), "--model", str(zoo["full"]),
                 "--out", str(tmp_path / "out"), "--output-format", "adapter", "-q", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "every fine-tune must be a LoRA adapter" in err and "full" in err
    assert not (tmp_path / "out").exists()


def _bad_copy(zoo: dict[str, Path], tmp_path: Path, edit=None, drop: str | None = None) -> Path:
    bad = tmp_path / "bad"
    shutil.copytree(zoo["a0"], bad)
    if drop:
        (bad / drop).unlink()
    if edit:
        cfg = json.loads((bad / "adapter_config.json").read_text())
        edit(cfg)
        (bad / "adapter_config.json").write_text(json.dumps(cfg))
    return bad


@pytest.mark.parametrize("case, expected", [
    ("no-weights", "adapter_config.json but no adapter_model.safetensors"),
    ("wrong-base", "adapter trained on 'org/another-model', not on the base"),
    ("loha", "a LOHA adapter: only LoRA adapters"),
    ("dora", "LoRA with DoRA"),
])
def test_bad_adapters_fail_in_one_line(zoo, tmp_path, capsys, case, expected):
    edits = {
        "wrong-base": lambda c: c.update(base_model_name_or_path="org/another-model"),
        "loha": lambda c: c.update(peft_type="LOHA"),
        "dora": lambda c: c.update(use_dora=True),
    }
    bad = _bad_copy(zoo, tmp_path, edits.get(case), "adapter_model.safetensors" if case == "no-weights" else None)
    code = main(["merge", "--base", str(zoo["base"]), "--model", str(zoo["a1"]), "--model", str(bad),
                 "--out", str(tmp_path / "out"), "-q", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert expected in err
    assert not (tmp_path / "out").exists()


def test_wrong_base_merges_with_a_warning_when_asked(zoo, tmp_path):
    bad = _bad_copy(zoo, tmp_path, lambda c: c.update(base_model_name_or_path="org/another-model"))
    code = main(["merge", "--base", str(zoo["base"]), "--model", str(zoo["a1"]), "--model", str(bad),
                 "--out", str(tmp_path / "out"), "-q", "--device", "cpu", "--adapter-base-mismatch", "warn"])
    assert code == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert any("adapter_base_mismatch: warn" in n for n in report["notes"])


def test_adapter_of_another_shape_is_refused_by_the_plan(zoo, tmp_path):
    other = tiny_base(tmp_path / "other", seed=1)
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] = 40
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures",)})).save_pretrained(other)
    bad = make_adapter(other, tmp_path / "bad", seed=5, r=2, lora_alpha=2, target_modules=["up_proj"])
    with pytest.raises(Exception, match="up_proj: LoRA of \\[40, 32\\] for a tensor of shape \\[48, 32\\]"):
        merge_models(zoo["base"], [zoo["a0"], bad], tmp_path / "out",
                     MergeOptions(adapter_base_mismatch="warn"))


def test_recipe_with_adapters_validate_run_and_inspect(zoo, tmp_path, capsys):
    from hf_model_stock.analysis.inspect import inspect_models

    recipe = tmp_path / "lora.yaml"
    recipe.write_text(f"base_model: {zoo['base']}\nmodels: [{zoo['a0']}, {zoo['full']}, {zoo['a2']}]\n"
                      f"compute: {{device: cpu, chunk_size: 4KiB}}\noutput: {{path: {tmp_path / 'out'}}}\n")
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert out.count("peft lora adapter") == 2 and "pre-flight: OK" in out
    assert main(["run", str(recipe), "-q"]) == 0
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    inspected = inspect_models(zoo["base"], [zoo["a0"], zoo["full"], zoo["a2"]], chunk_bytes=4096)
    t_run = {t["name"]: t["t"] for t in report["tensors"] if t["action"] == "merge"}
    assert {r.name: r.t for r in inspected.tensors} == pytest.approx(t_run, abs=1e-12)
    # adapter output in a recipe, with a full fine-tune among the models: refused by pre-flight
    recipe.write_text(recipe.read_text().replace("path:", "format: adapter, path:").replace("/out}", "/out2}"))
    assert main(["validate", str(recipe)]) == 2
    assert "output.format adapter: every fine-tune must be a LoRA adapter" in capsys.readouterr().err


def test_preflight_refuses_a_wrong_base_before_anything_else(zoo, tmp_path, capsys):
    bad = _bad_copy(zoo, tmp_path, lambda c: c.update(base_model_name_or_path="org/another-model"))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base_model: {zoo['base']}\nmodels: [{zoo['a1']}, {bad}]\n")
    assert main(["validate", str(recipe)]) == 2
    assert "adapter trained on 'org/another-model'" in capsys.readouterr().err
    recipe.write_text(recipe.read_text() + "adapter_base_mismatch: warn\n")
    assert main(["validate", str(recipe)]) == 0
    assert "note:" in capsys.readouterr().out


def publish(zoo: dict[str, Path], hub, tmp_path: Path, adapters: tuple[str, ...]) -> None:
    """The base as org/base and each adapter as org/<name>, trained on org/base."""
    hub.add_commit("org/base", zoo["base"])
    for name in adapters:
        copy = tmp_path / name
        shutil.copytree(zoo[name], copy)
        cfg = json.loads((copy / "adapter_config.json").read_text())
        cfg["base_model_name_or_path"] = "org/base"
        (copy / "adapter_config.json").write_text(json.dumps(cfg))
        hub.add_commit(f"org/{name}", copy)


def test_adapters_from_the_hub_merge_into_an_adapter_of_the_base(zoo, tmp_path, capsys, hub):
    publish(zoo, hub, tmp_path, ("a0", "a1"))
    recipe = tmp_path / "hub.yaml"
    recipe.write_text("base_model: org/base\nmodels: [org/a0, org/a1]\n"
                      f"compute: {{device: cpu}}\noutput: {{format: adapter, path: {tmp_path / 'out'}}}\n")
    assert main(["run", str(recipe), "-q", "--dry-run"]) == 0
    assert capsys.readouterr().out.count("peft lora adapter") == 2
    assert main(["run", str(recipe), "-q"]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "base_model: org/base" in card and "base_model_relation: adapter" in card
    report = json.loads((tmp_path / "out" / "merge_report.json").read_text())
    assert [m["repo_id"] for m in report["sources"]["models"]] == ["org/a0", "org/a1"]
    want = merge_models(zoo["base"], [zoo["a0"], zoo["a1"]], tmp_path / "full").path
    merged, full = load_peft(zoo["base"], tmp_path / "out"), load_dir(want)
    for name, w in full.items():
        assert torch.allclose(merged[name], w, atol=2e-6, rtol=0), name


def test_streamed_base_with_adapters_from_the_hub(zoo, tmp_path, hub):
    """--stream with LoRA adapters on the Hub: the adapters (small) are downloaded, the base is streamed."""
    publish(zoo, hub, tmp_path, ("a0", "a2"))
    hub.reset_stats()
    out = tmp_path / "out"
    assert main(["merge", "--base", "org/base", "--model", "org/a0", "--model", "org/a2", "--out", str(out), "-q",
                 "--stream"]) == 0
    cached = {p.name for p in (tmp_path / "hf-cache").rglob("*.safetensors")}
    assert cached == {"adapter_model.safetensors"}  # the base's weights were streamed, not stored
    assert [r for r in hub.requests("GET", "/org/base/resolve/") if r.range and r.path.endswith(".safetensors")]
    want = merge_models(zoo["base"], [zoo["a0"], zoo["a2"]], tmp_path / "local").path
    merged, local = load_dir(out), load_dir(want)
    assert merged.keys() == local.keys()
    for name, w in local.items():
        assert torch.equal(merged[name], w), name


def test_fan_in_fan_out_adapters_of_gpt2_merge_and_stay_an_adapter(tmp_path):
    """GPT-2 stores its projections transposed (Conv1D): LoRA with fan_in_fan_out, delta s·(B·A)ᵀ."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    GPT2LMHeadModel(cfg).save_pretrained(tmp_path / "base")
    names = []
    for i, r in enumerate([2, 3]):
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(tmp_path / "base"),
                               LoraConfig(r=r, lora_alpha=2 * r, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        model.save_pretrained(tmp_path / f"a{i}")
        names.append(tmp_path / f"a{i}")
    base = load_dir(tmp_path / "base")
    fts = []
    for d in names:  # peft's own densification, in float32, as the reference's input
        merged = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), d).merge_and_unload()
        sd = merged.state_dict()
        fts.append({k: sd[k].double() for k in base})
    full = merge_models(tmp_path / "base", names, tmp_path / "full")
    got = load_dir(full.path)
    for name, b in base.items():
        if not b.is_floating_point():
            continue
        ref, _ = reference_merge(b, [f[name] for f in fts])
        assert torch.allclose(got[name].double(), ref, atol=1e-6, rtol=0), name
    adapter = merge_models(tmp_path / "base", names, tmp_path / "adapter", MergeOptions(output_format="adapter"))
    assert json.loads((adapter.path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    loaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tmp_path / "base"), adapter.path)
    sd = loaded.merge_and_unload().state_dict()
    for name, w in got.items():
        assert torch.allclose(sd[name], w, atol=2e-6, rtol=0), name


@pytest.mark.parametrize("granularity", ["layer", "filter"])
def test_bf16_base_with_adapters_and_a_full_fine_tune(tmp_path, granularity):
    base_dir = tiny_base(tmp_path / "base", dtype=torch.bfloat16)
    a = make_adapter(base_dir, tmp_path / "a", seed=4, r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    b = make_adapter(base_dir, tmp_path / "b", seed=5, r=2, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    base = load_dir(base_dir)
    (full,) = finetunes(base, 1, scale=0.05, seed=8)
    write_checkpoint(tmp_path / "full", full)
    shutil.copyfile(base_dir / "config.json", tmp_path / "full" / "config.json")
    fts = [densified(a, base), {k: v.double() for k, v in full.items()}, densified(b, base)]
    out = merge_models(base_dir, [a, tmp_path / "full", b], tmp_path / "out",
                       MergeOptions(params=ModelStockParams(granularity=granularity), chunk_bytes=4000))
    merged = load_dir(out.path)
    for name, w0 in base.items():
        ref, _ = reference_merge(w0, [f[name] for f in fts], filter_wise=granularity == "filter")
        rounded = ref.to(torch.bfloat16)
        assert merged[name].dtype == torch.bfloat16
        diff = (merged[name].double() - rounded.double()).abs()
        assert bool((diff <= ulp(rounded)).all()), f"{name}: max diff {diff.max()}"


def test_convolution_adapters_merge_and_stay_an_adapter(tmp_path):
    """LoRA on a Conv2d (A: a k x k convolution to rank r, B: 1x1 back), on a plain torch module."""
    from peft import LoraConfig, PeftModel, get_peft_model

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 6, 3)
            self.proj = torch.nn.Linear(8, 5)

    def fresh() -> Net:
        net = Net()
        net.load_state_dict(load_dir(tmp_path / "base"))
        return net

    torch.manual_seed(0)
    write_checkpoint(tmp_path / "base", {k: v.detach().clone() for k, v in Net().state_dict().items()})
    names = []
    for i, r in enumerate([2, 3]):
        model = get_peft_model(fresh(), LoraConfig(r=r, lora_alpha=3, target_modules=["conv", "proj"]))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        model.save_pretrained(tmp_path / f"c{i}")
        names.append(tmp_path / f"c{i}")
    base = load_dir(tmp_path / "base")
    fts = [{k: v.double() for k, v in PeftModel.from_pretrained(fresh(), d).merge_and_unload().state_dict().items()}
           for d in names]
    got = load_dir(merge_models(tmp_path / "base", names, tmp_path / "full").path)
    for name, b in base.items():
        ref, _ = reference_merge(b, [f[name] for f in fts])
        assert torch.allclose(got[name].double(), ref, atol=1e-6, rtol=0), name
    adapter = merge_models(tmp_path / "base", names, tmp_path / "adapter", MergeOptions(output_format="adapter"))
    sd = PeftModel.from_pretrained(fresh(), adapter.path).merge_and_unload().state_dict()
    for name, w in got.items():
        assert torch.allclose(sd[name], w, atol=2e-6, rtol=0), name
