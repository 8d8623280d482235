"""Recipe parsing: valid recipes, and errors that name the key and its line."""

from pathlib import Path

import pytest

from hf_model_stock.errors import RecipeError
from hf_model_stock.recipe import load_recipe, parse_recipe

REPO = Path(__file__).resolve().parents[1]


def test_full_recipe():
    r = parse_recipe("""
base_model: Qwen/Qwen2.5-7B@main
models:
  - Qwen/Qwen2.5-Math-7B
  - model: Qwen/Qwen2.5-Coder-7B
    revision: v1.0
method: model_stock
parameters: {granularity: filter, clamp_t: false, eps: 0}
dtype: bf16
compute: {device: cpu, chunk_size: 64MiB, prefetch: 3}
output:
  path: /tmp/out
  shard_size: 2GB
  push_to_hub: {repo_id: me/merged, private: true}
evals: {tasks: [gsm8k]}
""")
    assert r.base_model.model == "Qwen/Qwen2.5-7B" and r.base_model.revision == "main"
    assert [m.label for m in r.models] == ["Qwen/Qwen2.5-Math-7B", "Qwen/Qwen2.5-Coder-7B@v1.0"]
    assert r.parameters.granularity == "filter" and r.parameters.clamp_t is False and r.parameters.eps == 0
    assert r.dtype == "BF16" and r.compute.chunk_size == 64 * 2**20 and r.output.shard_size == 2 * 10**9
    assert r.output.push_to_hub.repo_id == "me/merged"


@pytest.mark.parametrize("text, message", [
    ("base_model: a/b\nmodels: [c/d, e/f]\nparamters: {}\n", "<recipe>:3: paramters: unknown key"),
    ("base_model: a/b\nmodels: [c/d, e/f]\nparameters:\n  granularity: row\n",
     "<recipe>:4: parameters.granularity: Input should be 'layer' or 'filter'"),
    ("base_model: a/b\nmodels:\n  - c/d\n  - model: e/f\n    revison: x\n", "<recipe>:5: models[1].revison: unknown key"),
    ("base_model: a/b\nmodels: [c/d]\n", "<recipe>:2: models: Model Stock needs at least 2 fine-tuned models, got 1"),
    ("base_model: a/b\nmodels:\n  - c/d\n  - c/d\n", "<recipe>:4: models[1]: c/d is listed twice"),
    ("base_model: a/b\nmodels:\n  - c/d\n  - a/b\n", "<recipe>:4: models[1]: a/b is the base model; list only fine-tunes"),
    ("models: [c/d, e/f]\n", "<recipe>: base_model: required key is missing"),
    ("base_model: a/b\nmodels: [c/d, e/f]\ncompute: {chunk_size: lots}\n",
     "<recipe>:3: compute.chunk_size: not a size: 'lots' (write e.g. 5GB or 500MiB)"),
    ("base_model: a/b\nmodels: [c/d, e/f]\ndtype: int8\n",
     "<recipe>:3: dtype: unknown dtype 'int8' (use one of: bfloat16, float16, float32, float64)"),
    ("base_model: a/b\nmodels: [c/d, e/f]\nparameters: {eps: -1}\n",
     "<recipe>:3: parameters.eps: Input should be greater than or equal to 0"),
    ("base_model: [a\n", "<recipe>:2: invalid YAML"),
    ("- just a list\n", "<recipe>: a recipe must be a YAML mapping with base_model and models"),
])
def test_errors_name_key_and_line(text, message):
    with pytest.raises(RecipeError) as exc:
        parse_recipe(text)
    assert str(exc.value).startswith(message)


def test_shipped_recipes_are_valid():
    names = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))
    assert {"code.yaml", "demo.yaml", "math.yaml"} <= set(names)
    for name in names:
        recipe = load_recipe(REPO / "recipes" / name)
        assert len(recipe.models) >= 2


def test_demo_recipe_file_is_the_one_the_demo_writes():
    from hf_model_stock.study.demo import demo_recipe

    assert (REPO / "recipes" / "demo.yaml").read_text() == demo_recipe("../hfms-demo/models")


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path):
    for name in ("base", "a", "b"):
        (tmp_path / "m" / name).mkdir(parents=True)
    (tmp_path / "r.yaml").write_text("base_model: m/base\nmodels: [m/a, m/b]\noutput: {path: out}\n")
    r = load_recipe(tmp_path / "r.yaml")
    assert r.base_model.model == str(tmp_path / "m" / "base")
    assert r.output.path == str(tmp_path / "out")
