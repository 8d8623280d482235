"""Fine-tunes with different vocabularies: embedding rows matched by token string, against an
independent float64 reference of the rule (tokens looked up through transformers' tokenizers)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hf_model_stock.cli import main
from hf_model_stock.merge.plan import MergeOptions
from hf_model_stock.methods.model_stock import ModelStockParams
from hf_model_stock.pipeline import merge_models
from tests.merge.test_merge import load_dir, ulp
from tests.modelgen import finetunes, write_checkpoint
from tests.publish.test_chat import save_tokenizer
from tests.reference import reference_merge, reference_ratio

VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")
# fine-tune -> (tokens it adds, in id order after the base's 64; rows of its embedding)
ADDED = {"ft0": (["<a>", "<b>"], 66), "ft1": (["<b>", "<a>"], 66), "ft2": (["<a>"], 72)}


def build(root: Path, tie: bool) -> dict[str, Path]:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, bos_token_id=0, eos_token_id=0, tie_word_embeddings=tie)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    save_tokenizer(root / "base", eos="<|endoftext|>", template=None)
    base = load_dir(root / "base")
    paths = {"base": root / "base"}
    gen = torch.Generator().manual_seed(11)
    for (name, (tokens, rows)), ft in zip(ADDED.items(), finetunes(base, 3, seed=5, scale=0.05)):
        for key in VOCAB_TENSORS:
            if key in ft:  # the base's rows moved, plus new rows (added tokens, then padding)
                ft[key] = torch.cat([ft[key], torch.randn(rows - 64, 32, generator=gen)])
        d = write_checkpoint(root / name, ft)
        config = json.loads((root / "base" / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
        tok = AutoTokenizer.from_pretrained(root / "base")
        tok.add_tokens(tokens)
        tok.save_pretrained(d)
        paths[name] = d
    return paths


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def vocab_models(request, tmp_path_factory) -> tuple[dict[str, Path], bool]:
    return build(tmp_path_factory.mktemp("vocab"), request.param), request.param


def transformers_vocab(path: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path).get_vocab()


def reference(paths: dict[str, Path], names: list[str], source: str, filter_wise: bool,
              vocab_of: Callable[[Path], dict[str, int]] = transformers_vocab) -> dict[str, torch.Tensor]:
    """The rule in float64: base tokens Model Stock (t from rows every model shares; a model without
    the token a zero delta), new tokens the mean of the fine-tunes that have them, padding copied;
    each model's vocabulary from ``vocab_of``."""
    vocabs = {n: vocab_of(paths[n]) for n in ["base", *names]}
    tensors = {n: load_dir(paths[n]) for n in ["base", *names]}
    if source == "union":  # the base's tokens, then each fine-tune's others in id order
        out_vocab = dict(vocabs["base"])
        for n in names:
            for tok in sorted(vocabs[n], key=vocabs[n].get):
                out_vocab.setdefault(tok, len(out_vocab))
        rows = max(len(out_vocab), tensors["base"]["model.embed_tokens.weight"].shape[0])
        source = "base"
    else:
        out_vocab = vocabs[source] if source in vocabs else vocab_of(paths[source])
        rows = tensors[source]["model.embed_tokens.weight"].shape[0]
    by_id = {i: t for t, i in out_vocab.items()}
    out = {}
    for key in VOCAB_TENSORS:
        if key not in tensors["base"]:
            continue
        base = tensors["base"][key].double()
        fts = [tensors[n][key].double() for n in names]
        shared = [t for t in out_vocab if all(t in vocabs[n] for n in ["base", *names])]
        b_rows = base[[vocabs["base"][t] for t in shared]]
        f_rows = [f[[vocabs[n][t] for t in shared]] for f, n in zip(fts, names)]
        t_layer = reference_ratio(b_rows, f_rows)
        result = torch.zeros(rows, base.shape[1], dtype=torch.float64)
        for r in range(rows):
            tok = by_id.get(r)
            if tok is None:
                result[r] = tensors[source][key][r].double()
            elif tok in vocabs["base"]:
                w0 = base[vocabs["base"][tok]]
                rows_i = [f[vocabs[n][tok]] if tok in vocabs[n] else w0 for f, n in zip(fts, names)]
                t = reference_ratio(w0, rows_i) if filter_wise else t_layer
                result[r] = w0 + t * (torch.stack(rows_i).mean(0) - w0)
            else:
                result[r] = torch.stack([f[vocabs[n][tok]] for f, n in zip(fts, names) if tok in vocabs[n]]).mean(0)
        out[key] = result
    return out


def assert_rows_match(merged: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], rows: int,
                      tie: bool) -> None:
    """The merged vocabulary tensors have ``rows`` rows and equal the float64 reference to float32 rounding."""
    assert set(expected) == ({"model.embed_tokens.weight"} if tie else set(VOCAB_TENSORS))
    for key, ref in expected.items():
        got = merged[key]
        assert got.shape == (rows, 32), key
        rounded = ref.to(torch.float32)
        diff = (got.double() - rounded.double()).abs()
        assert bool((diff <= ulp(rounded)).all()), f"{key}: max diff {diff.max()}"


@pytest.mark.parametrize("source", ["ft0", "ft2", "base", "union"])
@pytest.mark.parametrize("granularity", ["layer", "filter"])
def test_rows_follow_the_tokenizer_source(vocab_models, tmp_path, source, granularity):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths, tie = vocab_models
    names = ["ft0", "ft1", "ft2"]
    opts = MergeOptions(params=ModelStockParams(granularity=granularity), chunk_bytes=3000,
                        tokenizer_source=source if source in ("base", "union") else str(paths[source]))
    out = merge_models(paths["base"], [paths[n] for n in names], tmp_path / "out", opts)
    merged = load_dir(out.path)
    expected = reference(paths, names, source, granularity == "filter")
    rows = {"ft0": 66, "ft1": 66, "ft2": 72, "base": 64, "union": 66}[source]
    assert_rows_match(merged, expected, rows, tie)
    base = load_dir(paths["base"])
    fts = [load_dir(paths[n]) for n in names]
    for name, b in base.items():  # the other tensors: Model Stock as ever
        if name not in VOCAB_TENSORS:
            ref, _ = reference_merge(b, [f[name] for f in fts], filter_wise=granularity == "filter")
            assert torch.allclose(merged[name].double(), ref, atol=2e-6, rtol=0), name
    # the merged model and the tokenizer source's tokenizer load and agree
    config = json.loads((out.path / "config.json").read_text())
    assert config["vocab_size"] == rows and config["tie_word_embeddings"] == tie
    if source != "base":
        from hf_model_stock.publish.output_dir import copy_tokenizer

        if source != "union":  # merge_models carries the base's tokenizer (the union: extended)
            copy_tokenizer(paths[source], out.path)
        tok = AutoTokenizer.from_pretrained(out.path)
        ids = tok("hello <a> world", add_special_tokens=False)["input_ids"]
        assert ids[1] == tok.convert_tokens_to_ids("<a>") == 64
        model = AutoModelForCausalLM.from_pretrained(out.path)
        assert model(torch.tensor([ids])).logits.shape == (1, 3, rows)
    notes = " ".join(out.report.notes)
    if source == "ft0":
        assert "2 new token(s): '<a>' (row 64: mean of" in notes and "'<b>' (row 65: mean of" in notes
    if source == "ft2":
        assert "7 padded row(s) copied from" in notes
    if source == "union":
        tok = AutoTokenizer.from_pretrained(out.path)
        assert tok.convert_tokens_to_ids(["<a>", "<b>"]) == [64, 65] and len(tok) == 66
        assert "the union of the models' vocabularies" in notes


def test_recipe_tokenizer_source_and_no_tokenizer_is_an_error(vocab_models, tmp_path, capsys):
    paths, _ = vocab_models
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base_model: {paths['base']}\nmodels: [{paths['ft0']}, {paths['ft1']}]\n"
                      f"tokenizer_source: {paths['ft1']}\ncompute: {{device: cpu}}\noutput: {{path: {tmp_path / 'out'}}}\n")
    assert main(["run", str(recipe), "-q"]) == 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.convert_tokens_to_ids(["<b>", "<a>"]) == [64, 65]
    # without a tokenizer to match rows by, a resized embedding is refused, in one line, before any merge
    (tmp_path / "bare").mkdir()
    for f in paths["ft0"].iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens")):
            (tmp_path / "bare" / f.name).write_bytes(f.read_bytes())
    recipe.write_text(f"base_model: {paths['base']}\nmodels: [{paths['ft1']}, {tmp_path / 'bare'}]\n"
                      f"output: {{path: {tmp_path / 'out2'}}}\n")
    assert main(["run", str(recipe), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert f"tokenizer (tokenizer.json or tokenizer.model), and {tmp_path / 'bare'} has none" in err


def test_tokenizers_that_differ_but_agree_on_every_row_merge_as_ever(tmp_path):
    from hf_model_stock.pipeline import plan_merge
    from hf_model_stock.recipe import ModelEntry
    from hf_model_stock.sources.resolve import resolve

    paths = build(tmp_path, tie=False)
    base = load_dir(paths["base"])
    for i, ft in enumerate(finetunes(base, 2, seed=9)):
        d = write_checkpoint(tmp_path / f"same{i}", ft)
        (d / "config.json").write_bytes((paths["base"] / "config.json").read_bytes())
        data = json.loads((paths["base"] / "tokenizer.json").read_text())
        data["truncation"] = {"direction": "Right", "max_length": 100 + i, "strategy": "LongestFirst", "stride": 0}
        (d / "tokenizer.json").write_text(json.dumps(data))
    plan = plan_merge(resolve(ModelEntry(model=str(paths["base"]))),
                      [resolve(ModelEntry(model=str(tmp_path / f"same{i}"))) for i in range(2)], MergeOptions())
    assert plan.vocab is None and all(t.vocab is None for t in plan.tasks)
