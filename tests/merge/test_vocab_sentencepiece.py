"""Tokenizers without tokenizer.json: a sentencepiece ``tokenizer.model`` (trained here on a tiny corpus)
with the fine-tunes' added tokens in ``added_tokens.json`` and ``tokenizer_config.json``, as Llama-2 and
Mistral-era fine-tunes ship them. Embedding rows are matched by token string through each model's own
transformers tokenizer; the reference reads the vocabularies with sentencepiece itself (its pieces, then
added_tokens.json) and applies the rule in float64."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest
import torch

from hf_model_stock.errors import ModelStockError
from hf_model_stock.merge.plan import MergeOptions
from hf_model_stock.methods.model_stock import ModelStockParams
from hf_model_stock.pipeline import merge_models
from hf_model_stock.sources import vocab
from tests.merge.test_merge import load_dir
from tests.merge.test_vocab import VOCAB_TENSORS, assert_rows_match, reference
from tests.modelgen import finetunes, write_checkpoint

spm = pytest.importorskip("sentencepiece")

CORPUS = ["the quick brown fox jumps over the lazy dog", "model stock merges fine tuned models exactly",
          "hello world this is a tiny corpus for a sentencepiece tokenizer", "one two three four five six"]
PIECES = 100
ADDED = {"ft0": (["<tool>", "<b>"], PIECES + 2), "ft1": (["<b>", "<tool>"], PIECES + 2), "ft2": (["<tool>"], PIECES + 8)}


def train_tokenizer_model() -> bytes:
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS * 10), model_writer=out, vocab_size=PIECES,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    return out.getvalue()


def write_tokenizer(directory: Path, model: bytes, added: list[str]) -> None:
    """tokenizer.model, and the added tokens in added_tokens.json and tokenizer_config.json's
    ``added_tokens_decoder`` (no tokenizer.json)."""
    (directory / "tokenizer.model").write_bytes(model)
    specials = {0: "<unk>", 1: "<s>", 2: "</s>"}
    decoder = {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True} for i, t in specials.items()}
    for k, tok in enumerate(added):
        decoder[str(PIECES + k)] = {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                                    "single_word": False, "special": False}
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "add_eos_token": False, "legacy": True, "added_tokens_decoder": decoder}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    if added:
        (directory / "added_tokens.json").write_text(json.dumps({t: PIECES + k for k, t in enumerate(added)}))


def spm_vocab(directory: Path) -> dict[str, int]:
    """The reference's vocabulary: sentencepiece's pieces by id, then added_tokens.json."""
    proc = spm.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))
    out = {proc.id_to_piece(i): i for i in range(proc.get_piece_size())}
    added = directory / "added_tokens.json"
    if added.is_file():
        out.update(json.loads(added.read_text()))
    return out


def build(root: Path, tie: bool) -> dict[str, Path]:
    from transformers import LlamaConfig, LlamaForCausalLM

    model = train_tokenizer_model()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=PIECES, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                      tie_word_embeddings=tie)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    write_tokenizer(root / "base", model, [])
    base = load_dir(root / "base")
    paths = {"base": root / "base"}
    gen = torch.Generator().manual_seed(11)
    for (name, (tokens, rows)), ft in zip(ADDED.items(), finetunes(base, 3, seed=5, scale=0.05)):
        for key in VOCAB_TENSORS:
            if key in ft:  # tokenizer.add_tokens + resize_token_embeddings: new rows after the base's
                ft[key] = torch.cat([ft[key], torch.randn(rows - PIECES, 32, generator=gen)])
        d = write_checkpoint(root / name, ft)
        config = json.loads((root / "base" / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**config, "vocab_size": rows}))
        write_tokenizer(d, model, tokens)
        paths[name] = d
    assert not any((p / "tokenizer.json").exists() for p in paths.values())
    return paths


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def spm_models(request, tmp_path_factory) -> tuple[dict[str, Path], bool]:
    return build(tmp_path_factory.mktemp("spm"), request.param), request.param


def test_the_transformers_vocabulary_is_sentencepieces(spm_models):
    paths, _ = spm_models
    for name, path in paths.items():
        assert vocab.token_ids(path) == spm_vocab(path), name
        assert vocab.tokenizer_digest(path).startswith("vocab:")
    assert vocab.token_ids(paths["ft0"])["<tool>"] == PIECES and vocab.token_ids(paths["ft1"])["<tool>"] == PIECES + 1
    assert vocab.has_vocabulary(["config.json", "tokenizer.model"]) and not vocab.has_vocabulary(["config.json"])


@pytest.mark.parametrize("source", ["ft0", "ft2", "base"])
@pytest.mark.parametrize("granularity", ["layer", "filter"])
def test_rows_follow_the_tokenizer_source(spm_models, tmp_path, source, granularity):
    paths, tie = spm_models
    names = ["ft0", "ft1", "ft2"]
    opts = MergeOptions(params=ModelStockParams(granularity=granularity), chunk_bytes=3000,
                        tokenizer_source="base" if source == "base" else str(paths[source]))
    out = merge_models(paths["base"], [paths[n] for n in names], tmp_path / "out", opts)
    merged = load_dir(out.path)
    expected = reference(paths, names, source, granularity == "filter", vocab_of=spm_vocab)
    rows = {"ft0": PIECES + 2, "ft2": PIECES + 8, "base": PIECES}[source]
    assert_rows_match(merged, expected, rows, tie)
    notes = " ".join(out.report.notes)
    if source == "ft0":
        assert f"2 new token(s): '<tool>' (row {PIECES}: mean of" in notes and f"'<b>' (row {PIECES + 1}: mean of" in notes
    if source == "ft2":
        assert "7 padded row(s) copied from" in notes


def test_a_finetune_with_tokenizer_json_lines_up_with_sentencepiece_ones(spm_models, tmp_path):
    """The base converted to tokenizer.json by transformers, the fine-tunes sentencepiece only: the
    same piece strings, so the same rows as with the sentencepiece base."""
    from transformers import AutoTokenizer

    paths, _ = spm_models
    base = tmp_path / "base"
    shutil.copytree(paths["base"], base)
    AutoTokenizer.from_pretrained(paths["base"]).save_pretrained(base)
    assert (base / "tokenizer.json").is_file() and vocab.token_ids(base) == spm_vocab(paths["base"])
    opts = MergeOptions(tokenizer_source=str(paths["ft0"]))
    names = ["ft0", "ft1", "ft2"]
    a = merge_models(base, [paths[n] for n in names], tmp_path / "a", opts)
    b = merge_models(paths["base"], [paths[n] for n in names], tmp_path / "b", opts)
    merged_a, merged_b = load_dir(a.path), load_dir(b.path)
    for key in merged_b:
        assert torch.equal(merged_a[key], merged_b[key]), key


def test_union_over_a_sentencepiece_base_and_an_unreadable_model_are_one_line(spm_models, tmp_path):
    paths, _ = spm_models
    with pytest.raises(ModelStockError) as exc:
        merge_models(paths["base"], [paths["ft0"], paths["ft1"]], tmp_path / "out", MergeOptions(tokenizer_source="union"))
    assert str(exc.value) == (f"tokenizer_source union: the base ({paths['base']}) has no tokenizer.json to add the "
                              "other models' tokens to (only tokenizer.model); use tokenizer_source base or one of "
                              "the models")
    broken = tmp_path / "broken"
    shutil.copytree(paths["ft1"], broken)
    (broken / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ModelStockError) as exc:
        merge_models(paths["base"], [paths["ft0"], broken], tmp_path / "out", MergeOptions())
    msg = str(exc.value)
    assert msg.startswith(f"{broken.resolve()}: unreadable tokenizer (tokenizer.model) through transformers: ")
    assert "\n" not in msg and not (tmp_path / "out").exists()
