"""Pre-flight from headers only, over real HTTP against the fake Hub."""

from __future__ import annotations

import json
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants

from hf_model_stock.errors import CompatibilityError, ModelStockError, SourceError
from hf_model_stock.merge.plan import MergeOptions, build_plan
from hf_model_stock.recipe import parse_recipe
from hf_model_stock.sources import preflight as preflight_module
from hf_model_stock.sources.preflight import preflight
from hf_model_stock.sources.resolve import resolve
from tests.hub_fixtures import CONFIG, set_offline, tiny_llama
from tests.modelgen import finetunes, write_checkpoint


def recipe(base: str, *models: str, extra: str = ""):
    return parse_recipe(f"base_model: {base}\nmodels: [{', '.join(models)}]\n{extra}")


def _mismatched(tmp_path: Path) -> dict[str, Path]:
    """bad1: wider MLP in layer 1, one extra tensor, a bigger vocabulary; bad2: another architecture,
    an int tensor where the base has floats, a missing tensor."""
    base = tiny_llama(0)
    ft = finetunes(base, 1, seed=2)[0]
    bad1 = dict(finetunes(base, 1, seed=3)[0])
    bad1["model.layers.1.mlp.up_proj.weight"] = torch.randn(40, 16)
    bad1["model.layers.1.mlp.down_proj.weight"] = torch.randn(16, 40)
    bad1["model.extra.bias"] = torch.zeros(16)
    bad1["model.embed_tokens.weight"] = torch.randn(65, 16)
    bad1["lm_head.weight"] = torch.randn(65, 16)
    bad2 = dict(finetunes(base, 1, seed=4)[0])
    bad2["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(16, 16, dtype=torch.int64)
    del bad2["model.norm.weight"]
    root = tmp_path / "mm"
    return {
        "base": write_checkpoint(root / "base", base, shards=2, config=CONFIG),
        "ok": write_checkpoint(root / "ok", ft, shards=2, config=CONFIG),
        "bad1": write_checkpoint(root / "bad1", bad1, shards=2, config={**CONFIG, "vocab_size": 65}),
        "bad2": write_checkpoint(root / "bad2", bad2, shards=2, config={
            **CONFIG, "model_type": "mistral", "architectures": ["MistralForCausalLM"]}),
    }


EXPECTED = {
    "config model_type: 'mistral' in org/bad2 vs 'llama' in base",
    "config architectures: ['MistralForCausalLM'] in org/bad2 vs ['LlamaForCausalLM'] in base",
    "config vocab_size: 65 in org/bad1 vs 64 in base (a resized vocabulary: embedding rows are matched by token only "
    "when every model has a tokenizer (tokenizer.json or tokenizer.model), and org/base, org/ok, org/bad1, org/bad2 "
    "have none or are LoRA adapters)",
    "tensor 'model.extra.bias': in org/bad1 but not in the base",
    "tensor 'model.layers.1.mlp.up_proj.weight': shape [40, 16] in org/bad1 vs [32, 16] in base",
    "tensor 'model.layers.1.mlp.down_proj.weight': shape [16, 40] in org/bad1 vs [16, 32] in base",
    "tensor 'model.embed_tokens.weight': shape [65, 16] in org/bad1 vs [64, 16] in base",
    "tensor 'lm_head.weight': shape [65, 16] in org/bad1 vs [64, 16] in base",
    "tensor 'model.norm.weight': missing in org/bad2",
    "tensor 'model.layers.0.self_attn.q_proj.weight': dtype I64 in org/bad2 vs F32 in base",
}


def test_preflight_reports_every_mismatch_without_serving_weight_bytes(hub, tmp_path):
    dirs = _mismatched(tmp_path)
    for name, path in dirs.items():
        hub.add_commit(f"org/{name}", path)
    r = recipe("org/base", "org/ok", "org/bad1", "org/bad2")

    report = preflight(r, check=False)
    assert set(report.problems) == EXPECTED
    assert hub.weight_bytes_served == 0  # headers only: not one byte of tensor data left the server
    shard_gets = [g for g in hub.requests("GET") if g.path.endswith(".safetensors")]
    assert len(shard_gets) == 2 * 2 * 4  # two range requests per shard, two shards, four repos
    assert all(g.range for g in shard_gets)
    assert report.header_bytes_fetched == sum(g.body_bytes for g in shard_gets) > 0
    assert not list(Path(constants.HF_HUB_CACHE).rglob("*.safetensors"))  # nothing but configs and indexes
    assert "problem: tensor 'model.norm.weight': missing in org/bad2" in report.describe()

    with pytest.raises(CompatibilityError) as err:
        preflight(r)
    message = str(err.value)
    assert "\n" not in message and message.startswith("10 incompatibilities with base org/base: ")
    assert all(p in message for p in EXPECTED)
    assert hub.weight_bytes_served == 0

    # the same verdict as the merge plan on the downloaded checkpoints (one rule, two places)
    base, *models = [resolve(e) for e in [r.base_model, *r.models]]
    with pytest.raises(CompatibilityError) as plan_err:
        build_plan(base, models, MergeOptions())
    listed = set(str(plan_err.value).split(": ", 1)[1].split("; "))
    assert listed == {p for p in EXPECTED if not p.startswith("config vocab_size")}


def test_preflight_passes_and_adds_up_what_to_download(hub, models, tmp_path, monkeypatch):
    for name, path in models.items():
        hub.add_commit(f"org/{name}", path)
    out = tmp_path / "merged"
    r = recipe("org/base", "org/ft0", "org/ft1", extra=f"output: {{path: {out}}}\n")
    report = preflight(r)
    assert report.ok and hub.weight_bytes_served == 0
    shard_bytes = sum(p.stat().st_size for name in ("base", "ft0", "ft1") for p in models[name].glob("*.safetensors"))
    assert report.download_bytes == shard_bytes  # configs and indexes are already in the cache
    assert report.output_bytes == sum(t.numel() * 4 for t in tiny_llama(0).values())
    (disk,) = report.disk  # HF cache and output on one filesystem: one check, both needs added up
    assert disk.needed == shard_bytes + report.output_bytes

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(preflight_module.shutil, "disk_usage", lambda path: Usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(ModelStockError, match=r"^disk: \d+\.\d KiB needed on the filesystem of .* only 1000 B free"):
        preflight(r)


def test_preflight_offline_reads_cached_headers_only(hub, models, monkeypatch):
    for name in ("base", "ft0", "ft1"):
        hub.add_commit(f"org/{name}", models[name])
        resolve(recipe("org/base", "org/ft0", "org/ft1").base_model.model_copy(update={"model": f"org/{name}"}))
    set_offline(monkeypatch, True)
    hub.reset_stats()
    report = preflight(recipe("org/base", "org/ft0", "org/ft1"))
    assert report.ok and report.download_bytes == 0 and hub.log == []
    with pytest.raises(SourceError, match="org/ft9: not in the local cache"):
        preflight(recipe("org/base", "org/ft0", "org/ft9"))


def test_preflight_of_local_sources_and_a_pickle_repo(hub, models, tmp_path):
    assert preflight(recipe(str(models["base"]), str(models["ft0"]), str(models["ft1"]))).ok

    sd = tiny_llama(7)
    torch.save(sd, tmp_path / "w.bin")
    hub.add_commit("org/pkl", {"pytorch_model.bin": (tmp_path / "w.bin").read_bytes(),
                               "config.json": json.dumps(CONFIG).encode()})
    r = recipe(str(models["base"]), str(models["ft0"]), "org/pkl")
    report = preflight(r, check=False)
    assert len(report.problems) == 1 and "only pickle weights (pytorch_model.bin)" in report.problems[0]
    with pytest.raises(SourceError, match="allow_pickle: true"):
        preflight(r)

    allowed = recipe(str(models["base"]), str(models["ft0"]), "org/pkl", extra="allow_pickle: true\n")
    report = preflight(allowed)
    assert report.ok and any("org/pkl: pickle weights" in n for n in report.notes)
    assert report.models[1].convert_bytes == (tmp_path / "w.bin").stat().st_size
    assert hub.weight_bytes_served == 0
    resolve(allowed.models[1], allow_pickle=True)  # once converted, its headers are checked too
    report = preflight(allowed)
    assert report.models[1].tensors is not None and report.models[1].weight_format == "pickle (converted)"
