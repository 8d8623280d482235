"""The study (``demo --study``) end to end on a tiny random Llama with a tokenizer trained here: seeded
fine-tunes, soups and stocks built and evaluated by the real leaderboard (child processes, lm-eval),
inspect, README. The leaderboard's NLL for two rows is checked against a plain float64 forward pass,
and its answer accuracy against greedy decoding by hand."""

from __future__ import annotations

import csv
import io
import json
import math
import random
from pathlib import Path

import pytest
import torch

from hf_model_stock.study.data import Item, continuation, prompt, split_items
from hf_model_stock.study.experiment import StudySettings, run_study
from hf_model_stock.study.finetune import TrainSettings, data_order, finetune, usable_items

NAMES = ["base", "ft-1", "ft-2", "ft-3", "soup-2", "soup-3", "stock-2", "stock-3", "interp-2", "interp-3",
         "line-0.25", "line-0.50", "line-1.25"]


def gsm8k_like(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Small problems in GSM8K's format (calculator annotations, ``#### N``)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b, c = rng.randint(2, 40), rng.randint(2, 40), rng.randint(2, 9)
        out.append({"question": f"Tom has {a} apples and buys {b} bags of {c}. How many apples does he have?",
                    "answer": f"The bags hold {b} * {c} = <<{b}*{c}={b * c}>>{b * c} apples.\n"
                              f"He has {a} + {b * c} = <<{a}+{b * c}={a + b * c}>>{a + b * c} apples.\n"
                              f"#### {a + b * c}"})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(base model directory with a byte-level BPE tokenizer, GSM8K-format data file)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny-study")
    records = gsm8k_like(40)
    data = root / "gsm8k.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([prompt(r["question"]) + continuation(r["answer"]) for r in records], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")
    base = root / "base"
    tokenizer.save_pretrained(base)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=None, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(base)  # bf16 base, float32 fine-tunes: as SmolLM2
    return base, data


def reference(model_dir: Path, tokenizer_dir: Path, items: list[dict],
              prose: list[dict]) -> tuple[float, float, float, float]:
    """(NLL per token of the gold solutions, teacher-forced answer accuracy, NLL per token of the
    prose paragraphs given their titles, its standard error) with a float64 forward pass; the
    continuation's tokens are those whose text starts at or after the context's end."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()

    def score(context: str, target: str) -> tuple[float, int, bool]:
        enc = tok(context + target, add_special_tokens=False, return_offsets_mapping=True)
        ids = enc["input_ids"]
        first = next(k for k, (start, _) in enumerate(enc["offset_mapping"]) if start >= len(context))
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].double()
        logp = torch.log_softmax(logits[first - 1:len(ids) - 1], dim=-1)
        target_ids = torch.tensor(ids[first:])
        ll = float(logp.gather(1, target_ids[:, None]).sum())
        return ll, len(target_ids), bool((logp.argmax(-1) == target_ids).all())

    total_ll, total_n, correct = 0.0, 0, 0
    for item in items:
        ll, n, _ = score(prompt(item["question"]), continuation(item["answer"]))
        total_ll, total_n = total_ll + ll, total_n + n
        body, final = item["answer"].split("####")
        _, _, greedy = score(prompt(item["question"]) + " " + body + "####", " " + final.strip())
        correct += greedy
    pairs = [score(p["title"] + ":", " " + p["text"])[:2] for p in prose]
    ratio = -sum(ll for ll, _ in pairs) / sum(n for _, n in pairs)
    m = len(pairs)  # the ratio estimator's standard error, written out
    se = math.sqrt(m / (m - 1) * sum((-ll - ratio * n) ** 2 for ll, n in pairs)) / sum(n for _, n in pairs)
    return -total_ll / total_n, correct / len(items), ratio, se


def test_study_end_to_end_on_a_tiny_model(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = tiny
    settings = StudySettings(train=TrainSettings(steps=3, batch_size=4, max_length=512, learning_rate=3e-3,
                                                 warmup_steps=0),
                             items=5, max_item_tokens=512, device="cpu", parallel=2,
                             tasks=("gsm8k_nll", "pydoc_nll", "gsm8k_answer"))
    log = io.StringIO()
    result = run_study(tmp_path, settings, base_dir=base, data_file=data, stream=log)
    root = tmp_path / "study"
    board = root / "leaderboard"
    for ext in ("md", "csv", "html", "png", "json"):
        assert (board / f"leaderboard.{ext}").is_file()
    with (board / "leaderboard.csv").open(encoding="utf-8") as fh:
        rows = {r["model"]: r for r in csv.DictReader(fh)}
    assert sorted(rows) == sorted(NAMES) and all(r["status"] == "ok" for r in rows.values())
    assert [r.name for r in result.board.rows] == NAMES

    heldout = [json.loads(line) for line in (root / "data" / "gsm8k_nll" / "test.jsonl").read_text().splitlines()]
    assert len(heldout) == 5 and all(r["gsm8k_nll_n"] == "5" for r in rows.values())
    trained = {(i.question, i.answer) for i in split_items([Item(**r) for r in gsm8k_like(40)], 10).train}
    assert not trained & {(r["question"], r["answer"]) for r in heldout}  # never trained on

    prose = [json.loads(line) for line in (root / "data" / "pydoc_nll" / "test.jsonl").read_text().splitlines()]
    assert len(prose) == 5 and all(r["pydoc_nll_n"] == "5" for r in rows.values())
    assert not {p["text"] for p in prose} & {i for r in gsm8k_like(40) for i in r.values()}
    for name, model_dir in [("base", base), ("stock-3", root / "models" / "stock-3"),
                            ("interp-3", root / "models" / "interp-3")]:
        nll, acc, ood, ood_se = reference(model_dir, base, heldout, prose)
        assert float(rows[name]["gsm8k_nll_raw"]) == pytest.approx(nll, rel=2e-6, abs=0), name
        assert float(rows[name]["gsm8k_answer_raw"]) == acc, name
        assert float(rows[name]["pydoc_nll_raw"]) == pytest.approx(ood, rel=2e-6, abs=0), name
        assert float(rows[name]["pydoc_nll_stderr"]) == pytest.approx(ood_se, rel=1e-4), name
    assert all(float(r["gsm8k_nll_stderr"]) > 0 for r in rows.values())

    # interp-k: on the base-to-soup-k line, as far from the base as stock-k (measured on the files)
    from safetensors.torch import load_file

    from tests.methods.test_interp import reference_distance

    def weights(name: str) -> dict[str, torch.Tensor]:
        return load_file(str((base if name == "base" else root / "models" / name) / "model.safetensors"))

    w0 = weights("base")
    for k in (2, 3):
        stock, interp = reference_distance(w0, weights(f"stock-{k}")), reference_distance(w0, weights(f"interp-{k}"))
        assert stock == pytest.approx(interp, rel=1e-5) and result.distances[f"interp-{k}"] == pytest.approx(interp)
        soup = reference_distance(w0, weights(f"soup-{k}"))
        assert result.merge_t[f"interp-{k}"] * soup == pytest.approx(interp, rel=1e-5)
    assert result.merge_t["line-1.25"] == 1.25 and (root / "id_ood.png").is_file()
    from hf_model_stock.study.compare import compare_table

    table = compare_table([root])  # the longer run's table, read back from the files
    assert len(table) == 4 and table[2].startswith("| 3 | gsm8k_nll | ") and table[3].startswith("| 3 | pydoc_nll | ")
    ids = [float(rows[name]["gsm8k_nll_raw"]) for name in ("soup-3", "stock-3", "interp-3")]
    assert "| " + " | ".join(f"{v:.4f}" for v in ids) + " |" in table[2]
    nlls = {n: float(r["gsm8k_nll_raw"]) for n, r in rows.items()}
    assert all(nlls[f"ft-{i}"] < nlls["base"] for i in (1, 2, 3))  # the fine-tunes learned something
    assert len({nlls["ft-1"], nlls["ft-2"], nlls["ft-3"]}) == 3  # and different things

    t = json.loads((root / "models" / "stock-3" / "merge_report.json").read_text())["summary"]["t_mean"]
    assert result.merge_t["stock-3"] == t and 0 < t < 1
    assert {p.name for p in result.inspect_files} == {"inspect.json", "angle_t.png", "delta_norms.png"}
    readme = (root / "README.md").read_text(encoding="utf-8")
    assert "never trained on" in readme and f"GSM8K-format solutions from {data}" in readme
    for name in NAMES:
        assert f"| {name} |" in readme
    assert f"{nlls['stock-3']:.4f}" in readme and "What the numbers show" in readme
    assert "held out" in log.getvalue()


def test_seeds_change_only_the_data_order(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    base, data = tiny
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from hf_model_stock.study.data import load_items

    items, _ = load_items(data)
    examples = usable_items(AutoTokenizer.from_pretrained(base), items, 512)
    settings = TrainSettings(steps=2, batch_size=2, max_length=512, learning_rate=1e-3, warmup_steps=0)
    assert data_order(len(examples), 1, 4) == data_order(len(examples), 1, 4) != data_order(len(examples), 2, 4)
    runs = [finetune(base, tmp_path / name, examples, seed, settings) for name, seed in
            [("a", 1), ("b", 1), ("c", 2)]]
    weights = [load_file(str(r.path / "model.safetensors")) for r in runs]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # reproducible
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
    assert weights[0]["model.norm.weight"].dtype == torch.float32
    again = finetune(base, tmp_path / "a", examples, 1, settings)
    assert again.reused and again.losses == runs[0].losses


def test_split_and_eval_files(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from hf_model_stock.study.data import EXACT_MATCH_TASKS, token_ids, write_eval_data
    from hf_model_stock.study.experiment import with_overrides

    items = [Item(**r) for r in gsm8k_like(40)]
    split = split_items(items, 10)
    assert len(split.heldout) == 10 and len(split.train) == 30
    assert set(split.heldout).isdisjoint(split.train) and set(split.heldout) | set(split.train) == set(items)
    assert split_items(items, 10) == split  # fixed
    tok = AutoTokenizer.from_pretrained(tiny[0])
    files = write_eval_data(split.heldout[:3], tok, tmp_path, ("gsm8k_nll", "gsm8k"), fewshot=split.train[:8])
    records = [json.loads(line) for line in files["gsm8k_nll"].read_text().splitlines()]
    assert [r["answer_tokens"] for r in records] == [len(token_ids(tok, i)[1]) for i in split.heldout[:3]]
    assert len((tmp_path / "gsm8k" / "train.jsonl").read_text().splitlines()) == 8
    assert with_overrides(StudySettings(), steps=9, exact_match=True).tasks == ("gsm8k_nll", "pydoc_nll",
                                                                            *EXACT_MATCH_TASKS)
