"""Hub sources over real HTTP against the fake Hub: revisions, offline cache, failed downloads, pickle."""

from __future__ import annotations

import builtins
import json
import os
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file

from hf_model_stock.errors import SourceError
from hf_model_stock.io.reader import Checkpoint
from hf_model_stock.recipe import ModelEntry, parse_recipe
from hf_model_stock.sources.preflight import preflight
from hf_model_stock.sources.resolve import resolve
from tests.fake_hub import FakeHub
from tests.hub_fixtures import CONFIG, set_hub_env, set_offline, tiny_llama

SHARD = "model-00001-of-00002.safetensors"


def entry(text: str) -> ModelEntry:
    return ModelEntry.model_validate(text)


def test_revisions_branch_tag_and_pinned_commit(hub, models):
    old = hub.add_commit("org/m", models["ft0"])
    new = hub.add_commit("org/m", models["ft1"])
    hub.repos["org/m"].tags["v1"] = old

    pinned = resolve(entry(f"org/m@{old}"))
    assert (pinned.repo_id, pinned.commit) == ("org/m", old)
    assert (pinned.path / SHARD).read_bytes() == (models["ft0"] / SHARD).read_bytes()

    latest = resolve(entry("org/m"))
    assert latest.commit == new
    assert (latest.path / SHARD).read_bytes() == (models["ft1"] / SHARD).read_bytes()

    tagged = resolve(entry("org/m@v1"))
    assert tagged.commit == old and tagged.path == pinned.path

    with pytest.raises(SourceError, match=r"org/m@nope: revision 'nope' not found"):
        resolve(entry("org/m@nope"))
    with pytest.raises(SourceError, match="org/missing: repository not found"):
        resolve(entry("org/missing"))


def test_only_the_indexed_shards_are_downloaded(hub, models):
    files = {p.name: p.read_bytes() for p in models["ft0"].iterdir()}
    files["consolidated.safetensors"] = (models["ft0"] / SHARD).read_bytes()  # a second copy, not ours
    files["pytorch_model.bin"] = b"not needed"
    hub.add_commit("org/m", files)
    got = resolve(entry("org/m"))
    assert sorted(p.name for p in got.path.iterdir()) == sorted(
        ["config.json", "model.safetensors.index.json", SHARD, "model-00002-of-00002.safetensors"])
    assert not hub.requests("GET", "consolidated") and not hub.requests("GET", "pytorch_model")


def test_offline_mode_uses_the_cache_and_makes_no_request(hub, models, monkeypatch):
    sha = hub.add_commit("org/m", models["ft0"])
    first = resolve(entry("org/m"))
    set_offline(monkeypatch, True)
    hub.reset_stats()
    again = resolve(entry("org/m"))
    pinned = resolve(entry(f"org/m@{sha}"))
    assert again == first and pinned.path == first.path and again.commit == sha
    assert hub.log == []
    with pytest.raises(SourceError, match="not in the local cache"):
        resolve(entry("org/never-downloaded"))
    assert hub.log == []


def test_dropped_connection_is_retried(hub, models):
    hub.add_commit("org/m", models["ft0"])
    hub.fail("GET", f"*/resolve/*/{SHARD}", mode="drop", after_bytes=1000, times=1)
    got = resolve(entry("org/m"))
    assert (got.path / SHARD).read_bytes() == (models["ft0"] / SHARD).read_bytes()
    gets = hub.requests("GET", SHARD)
    size = (models["ft0"] / SHARD).stat().st_size
    # huggingface_hub retries; it resumes with a Range only from bytes it has written (10 MB chunks),
    # so this small file is fetched again from the start
    assert [g.body_bytes for g in gets] == [1000, size]
    assert gets[1].range in (None, "bytes=1000-")


def test_failed_download_leaves_nothing_a_later_run_would_use(hub, models, monkeypatch):
    hub.add_commit("org/m", models["ft0"])
    hub.fail("GET", f"*/resolve/*/{SHARD}", mode="drop", after_bytes=0, times=100)
    with pytest.raises(SourceError, match=r"org/m: download failed \(.*\); run again to resume"):
        resolve(entry("org/m"))
    cache = Path(constants.HF_HUB_CACHE)
    assert not [p for p in cache.rglob("*") if p.name.endswith(".incomplete")]
    assert not list(cache.rglob(SHARD))  # no pointer to a partial blob
    shard_sha = __import__("hashlib").sha256((models["ft0"] / SHARD).read_bytes()).hexdigest()
    assert not (cache / "models--org--m" / "blobs" / shard_sha).exists()

    set_offline(monkeypatch, True)  # offline, the partial snapshot is refused, not used
    with pytest.raises(SourceError, match=r"cached snapshot \w+ is incomplete \(no model-00001-of-00002.safetensors"):
        resolve(entry("org/m"))

    set_offline(monkeypatch, False)  # back online, with the server healthy: completes
    hub.faults.clear()
    got = resolve(entry("org/m"))
    for p in models["ft0"].iterdir():
        assert (got.path / p.name).read_bytes() == p.read_bytes()


def _pickle_repo(tmp_path: Path, *, tied: bool = True) -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    sd = tiny_llama(5)
    if tied:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # shared storage, as tied models save
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    return {"pytorch_model.bin": path.read_bytes(), "config.json": json.dumps(CONFIG).encode()}, sd


def test_pickle_only_repo_is_refused_then_converted_with_allow_pickle(hub, tmp_path):
    files, sd = _pickle_repo(tmp_path)
    sha = hub.add_commit("org/pkl", files)
    with pytest.raises(SourceError, match=r"org/pkl: only pickle weights \(pytorch_model.bin\).*allow_pickle: true"):
        resolve(entry("org/pkl"))
    assert hub.weight_bytes_served == 0  # refused before downloading the pickle

    got = resolve(entry("org/pkl"), allow_pickle=True)
    assert (got.repo_id, got.commit) == ("org/pkl", sha)
    assert got.path.is_relative_to(tmp_path / "hfms-cache")
    converted = load_file(str(got.path / "model.safetensors"))
    assert converted.keys() == sd.keys()
    for name, tensor in sd.items():
        assert torch.equal(converted[name], tensor)
    assert json.loads((got.path / "config.json").read_text()) == CONFIG
    assert Checkpoint.open(got.path).tensors["lm_head.weight"].shape == (64, 16)

    hub.reset_stats()  # a second run uses the converted copy: nothing downloaded again
    again = resolve(entry("org/pkl"), allow_pickle=True)
    assert again.path == got.path and hub.weight_bytes_served == 0


def test_sharded_local_pickle_is_converted(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODEL_STOCK_CACHE", str(tmp_path / "cache"))
    sd = tiny_llama(6)
    names = list(sd)
    src = tmp_path / "pkl"
    src.mkdir()
    weight_map = {}
    for i, group in enumerate([names[::2], names[1::2]]):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({k: sd[k] for k in group}, src / fname)
        weight_map.update({k: fname for k in group})
    (src / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(SourceError, match="only pickle weights"):
        resolve(entry(str(src)))
    got = resolve(entry(str(src)), allow_pickle=True)
    ckpt = Checkpoint.open(got.path)
    assert len(ckpt.files) == 2 and set(ckpt.tensors) == set(sd)
    assert resolve(entry(str(src)), allow_pickle=True).path == got.path


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what a malicious checkpoint does: run code when unpickled
        return (builtins.exec, (f"open({str(self.marker)!r}, 'w').close()",))


def test_pickle_with_code_is_rejected_and_never_run(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODEL_STOCK_CACHE", str(tmp_path / "cache"))
    marker = tmp_path / "pwned"
    src = tmp_path / "evil"
    src.mkdir()
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "x": _Payload(marker)}, src / "pytorch_model.bin")
    with pytest.raises(SourceError, match=r"cannot load as tensors with torch.load\(weights_only=True\)"):
        resolve(entry(str(src)), allow_pickle=True)
    assert not marker.exists()
    assert not list((tmp_path / "cache").rglob("*.safetensors"))


def test_private_repo_needs_the_token(tmp_path, monkeypatch, models):
    with FakeHub(token="hf_test_secret") as fake:
        set_hub_env(monkeypatch, fake.url, tmp_path)
        fake.add_commit("org/private", models["ft0"], private=True)
        with pytest.raises(SourceError, match="repository not found on the Hub \\(or it is private: log in"):
            resolve(entry("org/private"))
        monkeypatch.setenv("HF_TOKEN", "hf_test_secret")
        got = resolve(entry("org/private"))
        assert (got.path / SHARD).read_bytes() == (models["ft0"] / SHARD).read_bytes()

        fake.add_commit("org/private2", models["ft1"], private=True)  # pre-flight's range reads carry the token
        fake.reset_stats()
        report = preflight(parse_recipe(f"base_model: {models['base']}\nmodels: [org/private, org/private2]\n"))
        assert report.ok and report.models[1].header_bytes_fetched > 0 and fake.weight_bytes_served == 0


def test_quiet_merge_prints_no_progress_bar_from_any_library(hub, models, tmp_path, monkeypatch, capfd):
    """``-q``: huggingface_hub's "Fetching N files" and download bars are silenced as well as ours."""
    import tqdm.std

    from hf_model_stock.cli import QUIET_ENV, main

    monkeypatch.setattr(tqdm.std.tqdm, "__init__", tqdm.std.tqdm.__init__)  # restored after the test
    for name in QUIET_ENV:
        monkeypatch.setenv(name, "0")  # recorded, so that the "1" -q sets is undone after the test
    for name in ("base", "ft0", "ft1"):
        hub.add_commit(f"org/{name}", models[name])
    out = tmp_path / "merged"
    args = ["merge", "--base", "org/base", "--model", "org/ft0", "--model", "org/ft1", "--out", str(out)]
    assert main([*args, "-q"]) == 0
    captured = capfd.readouterr()
    assert (captured.out, captured.err) == ("", "")
    assert (out / "merge_report.json").is_file()
    assert all(os.environ[name] == "1" for name in QUIET_ENV)  # for worker processes too

    bar = tqdm.std.tqdm(total=3, disable=False)  # any library's bar, even one that asks to be shown
    assert bar.disable
    bar.close()


def fill_cache_file_by_file(repo_id: str, names: list[str]) -> Path:
    """Fill the HF cache as transformers' from_pretrained (or an older huggingface_hub) does: one
    hf_hub_download per file, which caches no tree listing. Returns the snapshot folder."""
    from huggingface_hub import hf_hub_download

    paths = [Path(hf_hub_download(repo_id, name)) for name in names]
    repo_cache = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    assert not (repo_cache / "trees").exists() and not list(repo_cache.rglob("*.json.tmp"))
    return paths[0].parent


@pytest.mark.parametrize("how", ["snapshot_download", "file by file"])
def test_offline_merge_from_an_ordinary_hf_cache(hub, models, tmp_path, monkeypatch, how):
    """Offline, sources in the cache are pre-flighted, resolved and merged however they got there; a
    shard missing from the snapshot is named."""
    from hf_model_stock.workflow import run_recipe

    shas = {name: hub.add_commit(f"org/{name}", models[name]) for name in ("base", "ft0", "ft1")}
    for name in shas:
        if how == "file by file":
            fill_cache_file_by_file(f"org/{name}", ["config.json", "model.safetensors.index.json", SHARD,
                                                    "model-00002-of-00002.safetensors"])
        else:
            resolve(entry(f"org/{name}"))
    set_offline(monkeypatch, True)
    hub.reset_stats()
    text = "base_model: org/base\nmodels: [org/ft0, org/ft1]\noutput: {path: %s}\n"
    report = preflight(parse_recipe(text % (tmp_path / "out")))
    assert report.ok and report.download_bytes == 0 and report.base.commit == shas["base"]
    assert report.base.weight_bytes == sum((models["base"] / n).stat().st_size
                                           for n in (SHARD, "model-00002-of-00002.safetensors"))
    outcome = run_recipe(parse_recipe(text % (tmp_path / "out")), progress=False)
    assert [m.commit for m in outcome.report.sources.models] == [shas["ft0"], shas["ft1"]]
    assert hub.log == []  # no request at all

    snapshot = Path(constants.HF_HUB_CACHE) / "models--org--ft1" / "snapshots" / shas["ft1"]
    (snapshot / "model-00002-of-00002.safetensors").unlink()  # a shard never downloaded
    with pytest.raises(SourceError, match=r"^org/ft1: model-00002-of-00002.safetensors not in the local cache "
                                          rf"\(snapshot {shas['ft1'][:12]}\)" if how == "file by file" else
                       r"^org/ft1: model-00002-of-00002.safetensors is not in the local cache"):
        preflight(parse_recipe(text % (tmp_path / "out2")))
    with pytest.raises(SourceError, match=rf"^org/ft1: the cached snapshot {shas['ft1'][:12]} is incomplete "
                                          r"\(no model-00002-of-00002.safetensors in the local cache\)"):
        resolve(entry("org/ft1"))
    assert hub.log == []


def test_offline_single_file_model_cached_file_by_file(hub, models, tmp_path, monkeypatch):
    """A model with one model.safetensors (no index), fetched by hf_hub_download: resolve and preflight
    find it offline; without its weights file they say which file the cache lacks."""
    from safetensors.torch import save_file

    folder = tmp_path / "single"
    folder.mkdir()
    save_file(tiny_llama(3), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    sha = hub.add_commit("org/single", folder)
    fill_cache_file_by_file("org/single", ["config.json", "model.safetensors"])
    set_offline(monkeypatch, True)
    got = resolve(entry("org/single"))
    assert got.commit == sha and (got.path / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    info = preflight(parse_recipe("base_model: org/single\nmodels: [org/a, org/b]\n"), check=False).base
    assert info.error is None and len(info.tensors) == len(tiny_llama(3))
    (got.path / "model.safetensors").unlink()
    with pytest.raises(SourceError, match=r"^org/single: neither model.safetensors nor model.safetensors.index.json "
                                          rf"in the local cache \(snapshot {sha[:12]}\)"):
        preflight(parse_recipe("base_model: org/single\nmodels: [org/a, org/b]\n"))
