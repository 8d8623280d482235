"""trust_remote_code is never enabled implicitly: a model repo's own Python is not imported unless
--trust-remote-code is given."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hf_model_stock.evaluation.cli import add_eval_parser
from hf_model_stock.evaluation.loading import load_causal_lm

PACKAGE = Path(__file__).resolve().parents[2] / "hf_model_stock"


def evil_repo(path: Path, marker: Path) -> Path:
    """A model directory whose config maps the Auto classes to its own module, which leaves
    ``marker`` behind when imported."""
    path.mkdir()
    (path / "config.json").write_text(json.dumps({
        "model_type": "evil-arch", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM",
                     "AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (path / "tokenizer_config.json").write_text(json.dumps({"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    (path / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return path


def test_loading_a_model_with_its_own_code_does_not_run_it(tmp_path: Path) -> None:
    marker = tmp_path / "ran.txt"
    repo = evil_repo(tmp_path / "evil", marker)
    with pytest.raises(Exception, match="trust_remote_code"):
        load_causal_lm(repo, device="cpu", dtype="float32", trust_remote_code=False)
    assert not marker.exists()


def test_eval_command_does_not_trust_remote_code_unless_told() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    add_eval_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["eval", "some/model"]).trust_remote_code is False
    assert parser.parse_args(["eval", "some/model", "--trust-remote-code"]).trust_remote_code is True


def test_no_code_path_sets_trust_remote_code_itself() -> None:
    """Every trust_remote_code= in the package passes False or the user's explicit choice through."""
    for path in PACKAGE.rglob("*.py"):
        for value in re.findall(r"trust_remote_code\s*=\s*([\w.]+)", path.read_text()):
            assert value in {"False", "trust_remote_code", "spec.trust_remote_code", "args.trust_remote_code"}, (
                f"{path}: trust_remote_code={value}")
