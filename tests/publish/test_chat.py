"""Chat template, special tokens and generation config of a merge agree with its tokenizer: a base
without a template merged with instruct fine-tunes that have one chats and stops on their EOS."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from hf_model_stock.cli import main
from tests.merge.test_merge import load_dir
from tests.modelgen import finetunes, write_checkpoint

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ["user", "assistant", "system", "hello", "world", "how", "are", "you", "fine", "thanks"]


def save_tokenizer(directory: Path, *, eos: str, template: str | None) -> None:
    """A 64-token word-level tokenizer (ChatML specials at ids 0-2), saved with transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = WORDS + [f"w{i}" for i in range(64 - len(SPECIALS) - len(WORDS) - 1)] + ["<unk>"]
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, bos_token="<|endoftext|>",
                                  unk_token="<unk>", additional_special_tokens=SPECIALS)
    if template is not None:
        tok.chat_template = template
    tok.save_pretrained(directory)


@pytest.fixture(scope="module")
def chat_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny base with a tokenizer and no template (EOS <|endoftext|>), and two instruct fine-tunes
    with a ChatML template, EOS <|im_end|> and generation stopping on [<|im_end|>, <|endoftext|>]."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("chat")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    save_tokenizer(root / "base", eos="<|endoftext|>", template=None)
    (root / "base" / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 0}))
    base = load_dir(root / "base")
    paths = {"base": root / "base"}
    for i, ft in enumerate(finetunes(base, 2, seed=3)):
        d = write_checkpoint(root / f"it{i}", ft)
        config = json.loads((root / "base" / "config.json").read_text())
        config["eos_token_id"] = 2
        (d / "config.json").write_text(json.dumps(config))
        save_tokenizer(d, eos="<|im_end|>", template=CHATML)
        (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": [2, 0]}))
        paths[f"it{i}"] = d
    return paths


def merge(chat_models, out: Path, *extra: str) -> int:
    return main(["merge", "--base", str(chat_models["base"]), "--model", str(chat_models["it0"]),
                 "--model", str(chat_models["it1"]), "--out", str(out), "-q", "--device", "cpu", *extra])


def test_base_without_template_and_instruct_fine_tunes_chat_and_stop_on_their_eos(chat_models, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    assert merge(chat_models, tmp_path / "out") == 0
    out = tmp_path / "out"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    assert ids == tok.convert_tokens_to_ids(["<|im_start|>", "user", "hello", "<|im_end|>", "<|im_start|>", "assistant"])
    gen = GenerationConfig.from_pretrained(out)
    assert gen.eos_token_id == [2, 0]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == [2, 0]
    model = AutoModelForCausalLM.from_pretrained(out)
    prompt = torch.tensor([ids])
    # push the model towards <|im_end|> after two tokens: generation must stop there, on the template's EOS
    done = model.generate(prompt, max_new_tokens=8, do_sample=False, sequence_bias={(2,): 30.0})
    assert done[0, -1].item() == 2 and done.shape[1] <= prompt.shape[1] + 8
    assert done.shape[1] == prompt.shape[1] + 1  # stopped at once
    report = json.loads((out / "merge_report.json").read_text())
    # local sources are named by their directory in the report (no paths are published)
    assert any(n.startswith(f"chat template from {chat_models['it0'].name}") for n in report["notes"])
    assert "chat_template.jinja" in report["tokenizer_files"]


def test_chat_template_options(chat_models, tmp_path, capsys):
    from transformers import AutoTokenizer

    assert merge(chat_models, tmp_path / "a", "--chat-template", "base") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chat_template: base: base has no chat template" in err
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert merge(chat_models, tmp_path / "b", "--chat-template", inline) == 0
    tok = AutoTokenizer.from_pretrained(tmp_path / "b")
    assert tok.chat_template == inline and tok.eos_token == "<|endoftext|>"  # no model's stop tokens come with it
    file = tmp_path / "t.jinja"
    file.write_text(CHATML)
    assert merge(chat_models, tmp_path / "c", "--chat-template", str(file)) == 0
    assert AutoTokenizer.from_pretrained(tmp_path / "c").chat_template == CHATML
    assert merge(chat_models, tmp_path / "d", "--chat-template", "nonsense") == 2
    assert "chat_template: 'nonsense' is neither" in capsys.readouterr().err


def test_tokenizer_source_brings_its_generation_config_and_token_ids(chat_models, tmp_path):
    from transformers import AutoTokenizer

    assert merge(chat_models, tmp_path / "out", "--tokenizer-source", str(chat_models["it1"])) == 0
    out = tmp_path / "out"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 0]
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == 2
    assert AutoTokenizer.from_pretrained(out).chat_template == CHATML


def test_template_stop_token_missing_from_the_tokenizer_is_an_error(chat_models, tmp_path, capsys):
    odd = tmp_path / "odd"
    shutil.copytree(chat_models["it0"], odd)
    cfg = json.loads((odd / "tokenizer_config.json").read_text())
    cfg["eos_token"] = "<|eot|>"
    (odd / "tokenizer_config.json").write_text(json.dumps(cfg))
    code = main(["merge", "--base", str(chat_models["base"]), "--model", str(odd), "--model", str(chat_models["it1"]),
                 "--out", str(tmp_path / "out"), "-q", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "'<|eot|>' are not in the merged tokenizer" in err
    assert not (tmp_path / "out").exists()
