"""The corpus of bad inputs, run through the command line: every case exits 2 with one line that
names the file, tensor or key at fault, and leaves nothing at the output path but the untouched
previous output (when there was one and --overwrite was given) and nothing beside it."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from hf_model_stock.cli import main
from tests.modelgen import finetunes, write_checkpoint

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
A = {"dtype": "BF16", "shape": [8, 4], "data_offsets": [0, 64]}
B = {"dtype": "BF16", "shape": [4], "data_offsets": [64, 72]}


def raw(header: object, data: bytes = b"\0" * 72, header_len: int | None = None, text: bytes | None = None) -> bytes:
    body = json.dumps(header).encode() if text is None else text
    return struct.pack("<Q", len(body) if header_len is None else header_len) + body + data


def replace_file(content: bytes) -> Callable[[Path], tuple[Path, str]]:
    """ft1's model.safetensors replaced by ``content``; the error names that file."""
    def make(ft: Path) -> tuple[Path, str]:
        (ft / "model.safetensors").write_bytes(content)
        return ft / "model.safetensors", ""
    return make


def with_fragment(make: Callable[[Path], tuple[Path, str]], fragment: str) -> Callable[[Path], tuple[Path, str]]:
    def wrapped(ft: Path) -> tuple[Path, str]:
        named, _ = make(ft)
        return named, fragment
    return wrapped


def sharded_index(weight_map: object, raw_index: str | None = None) -> Callable[[Path], tuple[Path, str]]:
    """ft1 as two shards, with an index whose weight_map is ``weight_map``."""
    def make(ft: Path) -> tuple[Path, str]:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(ft / "model.safetensors"))
        (ft / "model.safetensors").unlink()
        save_file({"a.weight": tensors["a.weight"]}, str(ft / "s1.safetensors"))
        save_file({"b.weight": tensors["b.weight"]}, str(ft / "s2.safetensors"))
        save_file({"b.weight": tensors["b.weight"]}, str(ft.parent / "outside.safetensors"))
        (ft / "link.safetensors").symlink_to(ft.parent / "outside.safetensors")
        index = ft / "model.safetensors.index.json"
        index.write_text(raw_index if raw_index is not None else json.dumps({"weight_map": weight_map}))
        return index, ""
    return make


def tensors_of(change: Callable[[dict[str, torch.Tensor]], None], fragment: str) -> Callable[[Path], tuple[Path, str]]:
    """ft1's tensors changed by ``change``; the error names the tensor (``fragment``)."""
    def make(ft: Path) -> tuple[Path, str]:
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(ft / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(ft / "model.safetensors"))
        return ft, fragment
    return make


def poke(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(t: dict[str, torch.Tensor]) -> None:
        t["a.weight"][2, 3] = value
    return change


def config_of(cfg: dict) -> Callable[[Path], tuple[Path, str]]:
    def make(ft: Path) -> tuple[Path, str]:
        (ft / "config.json").write_text(json.dumps(cfg))
        return ft, "config model_type: 'qwen2'"
    return make


def pickle_only(ft: Path) -> tuple[Path, str]:
    (ft / "model.safetensors").unlink()
    (ft / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    return ft, "only pickle weights (pytorch_model.bin)"


def no_weights(ft: Path) -> tuple[Path, str]:
    (ft / "model.safetensors").unlink()
    return ft, "no model.safetensors or model.safetensors.index.json"


def vanished(ft: Path) -> tuple[Path, str]:
    shutil.rmtree(ft)
    return ft, "no such local directory"


CASES: dict[str, Callable[[Path], tuple[Path, str]]] = {
    # safetensors files
    "empty file": with_fragment(replace_file(b""), "truncated safetensors file"),
    "truncated in the length": with_fragment(replace_file(b"\x05\x00"), "truncated safetensors file"),
    "header length beyond the file": with_fragment(replace_file(raw({"a.weight": A, "b.weight": B}, header_len=4096)),
                                                   "runs past the end of the file"),
    "6 GiB header claimed": with_fragment(replace_file(raw({}, header_len=6 << 30)), "more than the 104857600 allowed"),
    "2^64-1 header claimed": with_fragment(replace_file(raw({}, header_len=2**64 - 1)), "allowed"),
    "malformed JSON": with_fragment(replace_file(raw(None, text=b'{"a.weight": {')), "malformed safetensors header JSON"),
    "not UTF-8": with_fragment(replace_file(raw(None, text=b"\xff\xfe{}")), "malformed safetensors header JSON"),
    "JSON nested too deeply": with_fragment(replace_file(raw(None, text=b"[" * 100_000)), "nested too deeply"),
    "header not an object": with_fragment(replace_file(raw([1, 2])), "header is not a JSON object"),
    "duplicate tensor name": with_fragment(
        replace_file(raw(None, text=b'{"a.weight": ' + json.dumps(A).encode() + b', "a.weight": '
                         + json.dumps(A).encode() + b"}")), "duplicate key 'a.weight'"),
    "overlapping offsets": with_fragment(replace_file(raw({"a.weight": A, "b.weight": {**B, "data_offsets": [60, 68]}})),
                                         "tensors 'a.weight' and 'b.weight' overlap"),
    "offsets beyond the data": with_fragment(replace_file(raw({"a.weight": A, "b.weight": B}, data=b"\0" * 70)),
                                             "tensor 'b.weight' data_offsets [64, 72] lie beyond the data section"),
    "offsets reversed": with_fragment(replace_file(raw({"a.weight": {**A, "data_offsets": [64, 0]}, "b.weight": B})),
                                      "tensor 'a.weight': data_offsets must be [begin, end]"),
    "negative offset": with_fragment(replace_file(raw({"a.weight": {**A, "data_offsets": [-8, 56]}, "b.weight": B})),
                                     "tensor 'a.weight': data_offsets must be [begin, end]"),
    "unknown dtype": with_fragment(replace_file(raw({"a.weight": {**A, "dtype": "Q4_K"}, "b.weight": B})),
                                   "tensor 'a.weight': unknown dtype 'Q4_K'"),
    "dtype not a string": with_fragment(replace_file(raw({"a.weight": {**A, "dtype": ["BF16"]}, "b.weight": B})),
                                        "tensor 'a.weight': unknown dtype ['BF16']"),
    "span does not fit the shape": with_fragment(replace_file(raw({"a.weight": {**A, "shape": [8, 5]}, "b.weight": B})),
                                                 "tensor 'a.weight': data_offsets span 64 bytes but"),
    "negative dimension": with_fragment(replace_file(raw({"a.weight": {**A, "shape": [-8, -4]}, "b.weight": B})),
                                        "tensor 'a.weight': shape must be a list of non-negative integers"),
    "extra field in an entry": with_fragment(replace_file(raw({"a.weight": {**A, "eval": "x"}, "b.weight": B})),
                                             "tensor 'a.weight': header entry must have exactly"),
    "metadata not strings": with_fragment(replace_file(raw({"__metadata__": {"n": 1}, "a.weight": A, "b.weight": B})),
                                          "__metadata__ must map strings to strings"),
    # sharded checkpoints and their index
    "index names ../": with_fragment(sharded_index({"a.weight": "s1.safetensors", "b.weight": "../outside.safetensors"}),
                                     "shard '../outside.safetensors' is outside the model directory"),
    "index names an absolute path": with_fragment(sharded_index({"a.weight": "s1.safetensors", "b.weight": "/etc/hostname"}),
                                                  "shard '/etc/hostname' is outside the model directory"),
    "index names a symlink that escapes": with_fragment(
        sharded_index({"a.weight": "s1.safetensors", "b.weight": "link.safetensors"}),
        "shard 'link.safetensors' is a link that escapes the model directory"),
    "index names a missing shard": with_fragment(sharded_index({"a.weight": "s1.safetensors", "b.weight": "s9.safetensors"}),
                                                 "shard 's9.safetensors' is missing"),
    "index names a tensor its shard lacks": with_fragment(
        sharded_index({"a.weight": "s1.safetensors", "b.weight": "s1.safetensors"}),
        "tensor 'b.weight' is not in shard s1.safetensors"),
    "index weight_map value not a name": with_fragment(sharded_index({"a.weight": "s1.safetensors", "b.weight": 7}),
                                                       "weight_map values must be file names, got 7"),
    "index without weight_map": with_fragment(sharded_index(None, raw_index='{"metadata": {}}'), "no weight_map"),
    "index not JSON": with_fragment(sharded_index(None, raw_index="{weight_map"), "unreadable index"),
    # models that do not fit together
    "missing tensor": tensors_of(lambda t: t.pop("b.weight"), "tensor 'b.weight': missing in"),
    "extra tensor": tensors_of(lambda t: t.update(c=torch.zeros(2)), "tensor 'c': in"),
    "shape mismatch": tensors_of(lambda t: t.update({"a.weight": torch.zeros(4, 8, dtype=torch.bfloat16)}),
                                 "tensor 'a.weight': shape [4, 8] in"),
    "dtype mismatch (int for float)": tensors_of(lambda t: t.update({"b.weight": torch.zeros(4, dtype=torch.int16)}),
                                                 "tensor 'b.weight': dtype I16 in"),
    "architecture mismatch": config_of({"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}),
    "NaN in a weight": tensors_of(poke(float("nan")), "tensor 'a.weight': NaN or Inf in the weights of"),
    "+Inf in a weight": tensors_of(poke(float("inf")), "tensor 'a.weight': NaN or Inf in the weights of"),
    "-Inf in a weight": tensors_of(poke(float("-inf")), "tensor 'a.weight': NaN or Inf in the weights of"),
    # repos
    "pickle weights only": pickle_only,
    "no weights at all": no_weights,
    "model directory missing": vanished,
}


def build(root: Path) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    base = {"a.weight": torch.randn(8, 4, generator=gen).bfloat16(), "b.weight": torch.randn(4, generator=gen).bfloat16()}
    write_checkpoint(root / "base", base, config=CONFIG)
    for i, ft in enumerate(finetunes(base, 2)):
        write_checkpoint(root / f"ft{i}", ft, config=CONFIG)
    return ["merge", "--base", str(root / "base"), "--model", str(root / "ft0"), "--model", str(root / "ft1"),
            "--out", str(root / "out"), "-q"]


def beside(root: Path) -> list[str]:
    """What the tool may have left beside the output: partial or temporary directories."""
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".hfms-"))


@pytest.mark.parametrize("previous", [False, True], ids=["no previous output", "previous output, --overwrite"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_leaves_no_output(tmp_path, capfd, case, previous):
    args = build(tmp_path)
    named, fragment = CASES[case](tmp_path / "ft1")
    if previous:
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("old")
        args.append("--overwrite")
    code = main(args)
    err = capfd.readouterr().err  # fd-level: whichever sys.stderr object was current
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert str(named) in err and fragment in err, err
    assert beside(tmp_path) == []
    if previous:
        assert sorted(os.listdir(tmp_path / "out")) == ["keep.txt"] and (tmp_path / "out" / "keep.txt").read_text() == "old"
    else:
        assert not (tmp_path / "out").exists()


RECIPES: dict[str, tuple[str, str]] = {  # recipe text -> what the error says after "error: RECIPE"
    "unknown key": ("base_model: base\nmodels: [ft0, ft1]\nparamters: {}\n", ":3: paramters: unknown key"),
    "unknown nested key": ("base_model: base\nmodels: [ft0, ft1]\noutput: {path: out, shard: 1GB}\n",
                           ":3: output.shard: unknown key"),
    "models not a list": ("base_model: base\nmodels: 5\n", ":2: models: Input should be a valid list"),
    "prefetch not an integer": ("base_model: base\nmodels: [ft0, ft1]\ncompute: {prefetch: many}\n",
                                ":3: compute.prefetch: Input should be a valid integer"),
    "clamp_t not a boolean": ("base_model: base\nmodels: [ft0, ft1]\nparameters: {clamp_t: maybe}\n",
                              ":3: parameters.clamp_t: Input should be a valid boolean"),
    "unknown on_nonfinite policy": ("base_model: base\nmodels: [ft0, ft1]\non_nonfinite: ignore\n",
                                    ":3: on_nonfinite: Input should be 'error' or 'warn'"),
    "base_model a list": ("base_model: [base]\nmodels: [ft0, ft1]\n", ":1: base_model: Input should be"),
    "one fine-tune": ("base_model: base\nmodels: [ft0]\n", ":2: models: Model Stock needs at least 2 fine-tuned models"),
    "duplicate fine-tune": ("base_model: base\nmodels:\n  - ft0\n  - ./ft0/\n", ":4: models[1]: {root}/ft0 is listed twice"),
    "duplicate through a symlink": ("base_model: base\nmodels:\n  - ft0\n  - ftlink\n",
                                    ":4: models[1]: {root}/ftlink is listed twice"),
    "base listed as a fine-tune": ("base_model: base\nmodels:\n  - ft0\n  - base\n",
                                   ":4: models[1]: {root}/base is the base model; list only fine-tunes"),
    "output is a fine-tune": ("base_model: base\nmodels: [ft0, ft1]\noutput: {path: ft1, overwrite: true}\n",
                              ":3: output.path: {root}/ft1 is also an input model"),
    "output is the base": ("base_model: base\nmodels: [ft0, ft1]\noutput: {path: base, overwrite: true}\n",
                           ":3: output.path: {root}/base is also an input model"),
    "output exists": ("base_model: base\nmodels: [ft0, ft1]\noutput: {path: out}\n",
                      "{root}/out: output directory exists (pass --overwrite to replace it)"),
    "empty file": ("", ": a recipe must be a YAML mapping with base_model and models"),
    "not a mapping": ("- base\n", ": a recipe must be a YAML mapping with base_model and models"),
    "invalid YAML": ("base_model: [base\n", ":2: invalid YAML"),
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_bad_recipe_is_one_line_naming_file_and_key(tmp_path, capfd, case):
    build(tmp_path)
    (tmp_path / "ftlink").symlink_to(tmp_path / "ft0")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    inputs = {p: sorted(os.listdir(tmp_path / p)) for p in ("base", "ft0", "ft1")}
    text, says = RECIPES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text)
    code = main(["run", str(recipe), "-q"])
    err = capfd.readouterr().err  # fd-level: whichever sys.stderr object was current
    assert code == 2 and err.count("\n") == 1, err
    expected = says.format(root=tmp_path)
    assert err.startswith(f"error: {recipe}{expected}") or err.startswith(f"error: {expected}"), err
    assert beside(tmp_path) == [] and os.listdir(tmp_path / "out") == ["keep.txt"]
    assert {p: sorted(os.listdir(tmp_path / p)) for p in ("base", "ft0", "ft1")} == inputs
