"""Push over real HTTP to the fake Hub: repo creation, model card, resumable and idempotent uploads."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_model_stock.publish.card import card_with_evals
from hf_model_stock.publish.hub import (
    PushError,
    add_push_parser,
    push_model,
    push_recipe_output,
)
from hf_model_stock.publish.report import load_report
from hf_model_stock.recipe import ModelEntry, parse_recipe
from hf_model_stock.sources.resolve import resolve
from hf_model_stock.workflow import run_recipe
from tests.fake_hub import FakeHub
from tests.hub_fixtures import set_hub_env

# huggingface_hub passes upload bodies as data=, which httpx2 deprecates: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:Use .content=<...>. to upload raw bytes:DeprecationWarning")


@pytest.fixture
def merged(hub, models, tmp_path) -> tuple[Path, dict[str, str]]:
    """A Model Stock merge of Hub sources (one pinned to an older commit), in several output shards."""
    shas = {name: hub.add_commit(f"org/{name}", path) for name, path in models.items()}
    pinned = shas["ft1"]
    hub.add_commit("org/ft1", models["ft2"])  # a newer commit the pin must not pick up
    out = tmp_path / "merged"
    recipe = parse_recipe(f"base_model: org/base\nmodels: [org/ft0, org/ft1@{pinned}, org/ft2]\n"
                          f"output: {{path: {out}, shard_size: 8KB}}\n")
    run_recipe(recipe, progress=False)
    return out, shas


def shard_paths(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.safetensors"))


def test_merge_report_records_source_commits(merged):
    out, shas = merged
    report = json.loads((out / "merge_report.json").read_text())
    assert report["sources"]["base"]["commit"] == shas["base"]
    assert [m["commit"] for m in report["sources"]["models"]] == [shas["ft0"], shas["ft1"], shas["ft2"]]
    assert report["sources"]["models"][1]["revision"] == shas["ft1"]


def test_push_creates_repo_uploads_card_and_repush_sends_no_shard_again(hub, merged):
    out, shas = merged
    shards = shard_paths(out)
    assert len(shards) >= 3
    hub.reset_stats()
    url = push_model(out, "me/merged")
    sha = url.rsplit("/", 1)[1]
    assert url.endswith(f"/me/merged/commit/{sha}") and hub.repos["me/merged"].branches["main"] == sha
    remote = hub.files("me/merged")
    for p in out.iterdir():
        assert remote[p.name] == p.read_bytes()
    binary = [p for p in out.iterdir() if b"\0" in p.read_bytes()[:512]]  # shards, and the t plot if drawn
    assert set(shards) <= set(binary)
    assert hub.lfs_bytes_received == sum(p.stat().st_size for p in binary)

    card = ModelCard.load("me/merged")  # downloaded from the fake Hub and parsed
    assert card.data.base_model == ["org/base", "org/ft0", "org/ft1", "org/ft2"]
    assert card.data.base_model_relation == "merge"
    assert {"merge", "model-stock"} <= set(card.data.tags)
    assert (card.data.library_name, card.data.pipeline_tag) == ("transformers", "text-generation")
    assert card.text.lstrip().startswith("# me/merged\n")
    for needle in ["Model Stock", "| layer | tensors | mean t |", "## Recipe", "## Reproducibility", "torch",
                   *shas.values(), *(hashlib.sha256(p.read_bytes()).hexdigest() for p in shards)]:
        assert needle in card.text, needle

    hub.reset_stats()
    again = push_model(out, "me/merged")
    assert again == url  # nothing changed: no new commit
    assert hub.lfs_bytes_received == 0 and not hub.requests("PUT")
    shard_oids = {hashlib.sha256(p.read_bytes()).hexdigest() for p in shards}
    assert not shard_oids & set(hub.lfs_offered)  # matched by sha256 with the report: not even offered


def test_interrupted_push_resumes_without_resending(hub, merged):
    out, _ = merged
    shards = shard_paths(out)
    victim = shards[1]
    oid = hashlib.sha256(victim.read_bytes()).hexdigest()
    hub.fail("PUT", f"/lfs-upload/{oid}", mode="status", status=403, times=1)
    with pytest.raises(PushError, match="me/merged: push failed .*run the same push again"):
        push_model(out, "me/merged")
    assert hub.repos["me/merged"].commits[hub.repos["me/merged"].branches["main"]].keys() == {".gitattributes"}
    # The failure cancels uploads not yet started, so which other files arrived depends on thread timing:
    # the resumed push must send exactly the LFS files the Hub does not hold yet, and the victim is one.
    held = set(hub.lfs_store)
    assert oid not in held
    lfs_files = {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in out.iterdir() if b"\0" in p.read_bytes()[:512]}
    missing = {o: p for o, p in lfs_files.items() if o not in held}

    hub.reset_stats()
    push_model(out, "me/merged")
    assert {r.path.rsplit("/", 1)[1] for r in hub.requests("PUT", "/lfs-upload/")} == set(missing)
    assert hub.lfs_bytes_received == sum(p.stat().st_size for p in missing.values())
    assert hub.files("me/merged")[victim.name] == victim.read_bytes()


def test_evaluation_results_go_into_the_card(hub, merged):
    out, _ = merged
    push_model(out, "me/merged")
    card = card_with_evals(ModelCard.load(out / "README.md"),
                           [("gsm8k", "exact_match,strict-match", 0.25), ("mbpp", "pass@1", 0.125)])
    card.save(out / "README.md")
    push_model(out, "me/merged")
    remote = ModelCard.load("me/merged")
    assert remote.data.model_name == "me/merged"
    assert {(e.dataset_type, e.metric_type, e.metric_value) for e in remote.data.eval_results} == {
        ("gsm8k", "exact_match,strict-match", 0.25), ("mbpp", "pass@1", 0.125)}
    assert "| gsm8k | exact_match,strict-match | 0.2500 |" in remote.text
    assert remote.data.base_model_relation == "merge"

    updated = card_with_evals(remote, [("gsm8k", "exact_match,strict-match", 0.5)])
    assert sorted((e.dataset_type, e.metric_value) for e in updated.data.eval_results) == [("gsm8k", 0.5), ("mbpp", 0.125)]
    assert updated.text.count("## Evaluation") == 1 and "0.5000" in updated.text and "0.2500" not in updated.text


def test_push_command_to_a_private_repo_and_branch(hub, merged, capsys):
    out, _ = merged
    parser = argparse.ArgumentParser()
    add_push_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["push", str(out), "--repo", "me/dev", "--private", "--revision", "dev",
                              "--message", "first try"])
    assert args.func(args) == 0
    assert "pushed" in capsys.readouterr().out
    repo = hub.repos["me/dev"]
    assert repo.private and set(hub.files("me/dev", "main")) == {".gitattributes"}
    assert set(hub.files("me/dev", "dev")) >= {p.name for p in out.iterdir()}


def test_recipe_push_to_hub(hub, merged):
    out, _ = merged
    recipe = parse_recipe("base_model: org/base\nmodels: [org/ft0, org/ft2]\n"
                          "output: {push_to_hub: {repo_id: me/from-recipe, commit_message: hello}}\n")
    url = push_recipe_output(recipe, out)
    assert url is not None and "me/from-recipe/commit/" in url
    assert push_recipe_output(parse_recipe("base_model: org/base\nmodels: [org/ft0, org/ft2]\n"), out) is None


def test_push_without_write_token_says_how_to_log_in(tmp_path, monkeypatch, merged):
    out, _ = merged
    with FakeHub(token="hf_write") as fake:
        set_hub_env(monkeypatch, fake.url, tmp_path / "other")
        with pytest.raises(PushError) as info:
            push_model(out, "me/merged")
        assert str(info.value) == ("me/merged: the Hub refused access (HTTP 401, the push) and no token was sent: "
                                   "set HF_TOKEN (or run `hf auth login`) to a token that can write to this namespace")
        monkeypatch.setenv("HF_TOKEN", "hf_read_only")
        with pytest.raises(PushError) as info:
            push_model(out, "me/merged")
        assert str(info.value) == ("me/merged: the Hub refused the token in HF_TOKEN (HTTP 401, the push): set it "
                                   "to a token that can write to this namespace")
        monkeypatch.setenv("HF_TOKEN", "hf_write")
        assert "/me/merged/commit/" in push_model(out, "me/merged")


@pytest.mark.parametrize("pattern", ["/api/repos/create", "/api/models/me/faulty/branch/*",
                                     "/api/models/me/faulty/tree/*"])
def test_a_503_on_the_push_s_repo_calls_is_retried(hub, merged, monkeypatch, pattern):
    """Creating the repo and the branch, and listing what is already there, go through the hub's one
    retry policy like every read."""
    from hf_model_stock.hub import retry

    monkeypatch.setattr(retry, "_backoff", lambda s: None)
    out, _ = merged
    fault = hub.fail("GET" if "tree" in pattern else "POST", pattern, mode="status", status=503, times=1)
    assert "/me/faulty/commit/" in push_model(out, "me/faulty", revision="dev")
    assert fault.times == 0  # the fault was met, and got over


def test_a_merge_of_local_models_pushes_a_valid_card(hub, models, tmp_path):
    out = tmp_path / "local-merge"
    recipe = parse_recipe(f"base_model: {models['base']}\nmodels: [{models['ft0']}, {models['ft1']}]\n"
                          f"output: {{path: {out}}}\n")
    run_recipe(recipe, progress=False)
    push_model(out, "me/local")  # the fake Hub, like the Hub, rejects base_model entries that are not repo ids
    card = ModelCard.load("me/local")
    assert card.data.base_model is None
    assert "| fine-tune | ft0 |  |  |" in card.text and "| base | base |  |  |" in card.text


def test_local_sources_are_named_without_their_paths(hub, models, tmp_path):
    """Neither the card nor merge_report.json (both published by push) holds a local absolute path;
    an HF cache snapshot given as a directory is named, and listed in base_model, as its repo and commit."""
    sha = hub.add_commit("org/ft2", models["ft2"])
    snapshot = resolve(ModelEntry(model="org/ft2")).path  # .../hf-cache/models--org--ft2/snapshots/<sha>
    assert snapshot.name == sha
    out = tmp_path / "local-merge"
    recipe = parse_recipe(f"base_model: {models['base']}\nmodels: [{models['ft0']}, {snapshot}]\n"
                          f"tokenizer_source: {models['ft0']}\noutput: {{path: {out}}}\n")
    run_recipe(recipe, progress=False)
    for name in ("README.md", "merge_report.json"):
        text = (out / name).read_text()
        assert str(tmp_path) not in text and "/src/" not in text, name
    report = load_report(out)  # still a format_version 1 report
    base, ft0, cached = report.sources.base, *report.sources.models
    assert (base.model, base.path, base.repo_id, base.commit) == ("base", "base", None, None)
    assert (ft0.model, ft0.path) == ("ft0", "ft0")
    assert (cached.model, cached.path, cached.repo_id, cached.commit) == ("org/ft2", f"org/ft2@{sha}", "org/ft2", sha)
    assert report.recipe["base_model"] == {"model": "base"} and report.recipe["output"]["path"] == "local-merge"
    assert report.recipe["models"] == [{"model": "ft0"}, {"model": f"org/ft2@{sha}"}]
    assert report.recipe["tokenizer_source"] == "ft0"
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model == ["org/ft2"] and card.data.base_model_relation == "merge"
    assert f"| fine-tune | org/ft2 |  | {sha} |" in card.text


def test_run_evaluates_then_pushes_once_with_the_scores_in_the_card(hub, models, tmp_path, monkeypatch):
    """``run`` with ``evals`` and ``push_to_hub``: the card pushed (in one commit) carries model-index and
    the results table. The model is scripted (answers GSM8K's fixtures correctly) and lm-eval is real."""
    import hf_model_stock.evaluation.loading as loading
    from tests.evaluation.conftest import FIXTURES
    from tests.evaluation.scripted import ScriptedLM, gold

    monkeypatch.setattr(loading, "build_lm", lambda path, spec: ScriptedLM(gold))
    for name in ("base", "ft0", "ft1"):
        hub.add_commit(f"org/{name}", models[name])
    out = tmp_path / "merged"
    recipe = parse_recipe(f"base_model: org/base\nmodels: [org/ft0, org/ft1]\n"
                          f"output: {{path: {out}, push_to_hub: {{repo_id: me/evaluated}}}}\n"
                          f"evals: {{tasks: [gsm8k], limit: 3, data_dir: {FIXTURES}, output: {tmp_path / 'evals'}}}\n")
    run_recipe(recipe, progress=False)
    repo = hub.repos["me/evaluated"]
    assert len(repo.commits) == 2  # the repo's first commit, then one push
    card = ModelCard.load("me/evaluated")
    assert {(e.dataset_type, e.metric_type, e.metric_value) for e in card.data.eval_results} == {
        ("gsm8k", "exact_match,strict-match", 1.0), ("gsm8k", "exact_match,flexible-extract", 1.0)}
    assert card.data.model_name == "me/evaluated" and card.data.base_model == ["org/base", "org/ft0", "org/ft1"]
    assert "| gsm8k | exact_match,strict-match | 1.0000 |" in card.text and card.text.count("## Evaluation") == 1
    summary = json.loads((tmp_path / "evals" / "merged" / "summary.json").read_text())
    assert [s["value"] for s in summary["scores"]] == [1.0, 1.0] and summary["scores"][0]["n"] == 3


def test_eval_update_card_writes_the_results_into_a_local_models_readme(merged, tmp_path, monkeypatch, capsys):
    import hf_model_stock.evaluation.loading as loading
    from hf_model_stock.cli import main
    from tests.evaluation.conftest import FIXTURES
    from tests.evaluation.scripted import ScriptedLM, wrong

    out, _ = merged
    monkeypatch.setattr(loading, "build_lm", lambda path, spec: ScriptedLM(wrong))
    before = ModelCard.load(out / "README.md")
    assert not before.data.eval_results
    assert main(["eval", str(out), "--tasks", "gsm8k", "--limit", "2", "--data-dir", str(FIXTURES),
                 "--output", str(tmp_path / "evals"), "--update-card"]) == 0
    assert f"card: results written to {out / 'README.md'}" in capsys.readouterr().out
    after = ModelCard.load(out / "README.md")
    assert {(e.dataset_type, e.metric_type, e.metric_value) for e in after.data.eval_results} == {
        ("gsm8k", "exact_match,strict-match", 0.0), ("gsm8k", "exact_match,flexible-extract", 0.0)}
    assert after.data.base_model == before.data.base_model and "## Merge" in after.text  # the rest is kept

    assert main(["eval", "org/base", "--tasks", "gsm8k", "--update-card"]) == 2
    assert capsys.readouterr().err.strip() == (
        "error: --update-card: org/base is not a local model directory (a Hub model's card changes only by a push: "
        "evaluate the local copy, then push it)")
