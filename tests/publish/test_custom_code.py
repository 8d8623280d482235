"""Custom-code models (config ``auto_map``): their modules travel with the merge, from a local base or a
Hub base, and evaluation refuses to run their code without --trust-remote-code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hf_model_stock.errors import SourceError
from hf_model_stock.eval_spec import EvalSpec
from hf_model_stock.evaluation.errors import EvalError
from hf_model_stock.evaluation.evaluate import evaluate_model
from hf_model_stock.recipe import parse_recipe
from hf_model_stock.sources.remote_code import code_files
from hf_model_stock.workflow import run_recipe
from tests.evaluation.test_remote_code import evil_repo

CODE = {
    "configuration_tiny.py": "class TinyConfig:\n    pass\n",
    "modeling_tiny.py": "from .configuration_tiny import TinyConfig\nfrom .layers_tiny import Block\n",
    "layers_tiny.py": "class Block:\n    pass\n",
    "tokenization_tiny.py": "class TinyTokenizer:\n    pass\n",
    "train.py": "print('not part of the model')\n",  # named by nothing: stays behind
}
NEEDED = ["configuration_tiny.py", "layers_tiny.py", "modeling_tiny.py", "tokenization_tiny.py"]


def add_custom_code(directory: Path) -> Path:
    config = json.loads((directory / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_tiny.TinyConfig",
                          "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM",
                          "AutoModel": "other/repo--modeling_other.OtherModel"}  # another repo's code: no file
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["tokenization_tiny.TinyTokenizer", None]}}))
    for name, text in CODE.items():
        (directory / name).write_text(text)
    return directory


def test_code_files_follow_auto_map_and_relative_imports(models):
    base = add_custom_code(models["base"])
    assert code_files(base) == NEEDED
    (base / "layers_tiny.py").unlink()
    with pytest.raises(SourceError, match=r"modeling_tiny.py: from .layers_tiny import names layers_tiny, but "
                                          r".*layers_tiny.py does not exist"):
        code_files(base)


@pytest.mark.parametrize("where", ["local", "hub"])
def test_merge_output_carries_the_code_its_config_names(hub, models, tmp_path, where):
    add_custom_code(models["base"])
    if where == "hub":
        for name in ("base", "ft0", "ft1"):
            hub.add_commit(f"org/{name}", models[name])
        refs = ["org/base", "org/ft0", "org/ft1"]
    else:
        refs = [str(models[name]) for name in ("base", "ft0", "ft1")]
    out = tmp_path / "merged"
    run_recipe(parse_recipe(f"base_model: {refs[0]}\nmodels: [{refs[1]}, {refs[2]}]\noutput: {{path: {out}}}\n"),
               progress=False)
    assert sorted(p.name for p in out.glob("*.py")) == NEEDED
    for name in NEEDED:
        assert (out / name).read_text() == CODE[name]
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoConfig"] == "configuration_tiny.TinyConfig"


def test_a_custom_code_model_is_not_evaluated_without_trust_remote_code(tmp_path):
    marker = tmp_path / "ran.txt"
    repo = evil_repo(tmp_path / "evil", marker)
    spec = EvalSpec(tasks=["gsm8k"], limit=1, output=tmp_path / "results")
    with pytest.raises(EvalError) as caught:
        evaluate_model(str(repo), spec)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{repo / 'config.json'}: auto_map runs the model's own code")
    assert "evil.py" in message and "--trust-remote-code" in message
    assert not marker.exists()
