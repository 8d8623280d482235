"""mergekit configs as they are (hf_model_stock.mergekit): translations of configs shaped like the Hub's,
refusals in one line with exit 2 and nothing written, --dry-run YAML that loads back to the same
recipe, merges bit for bit equal to the native recipe's, and re-runs of published merges (a local
directory, and the Hub stand-in fetching only the card or config)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml

from hf_model_stock.cli import main
from hf_model_stock.errors import RecipeError
from hf_model_stock.mergekit.published import config_in_card, load_run_target
from hf_model_stock.mergekit.translate import recipe_yaml, translate
from hf_model_stock.recipe import ModelEntry, load_recipe
from tests import hub_fixtures
from tests.hub_fixtures import CONFIG, set_offline, tiny_llama
from tests.modelgen import finetunes, write_checkpoint

hub = hub_fixtures.hub  # the Hub stand-in, as a fixture of this module

WEIGHTS_WARNING = ("ignored, as mergekit's model_stock ignores them (Model Stock has no weights): "
                   "models[1].parameters.weight, models[1].parameters.density, models[2].parameters.weight")
DTYPE_NOTE = ("dtype bfloat16: mergekit computes in it; hf-model-stock computes in float64 whatever dtype says "
              "(output dtype bfloat16, from dtype)")


@pytest.fixture()
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A base and three fine-tunes (2 layers, float32) in the working directory, as mergekit users have them."""
    base = tiny_llama(0)
    write_checkpoint(tmp_path / "base", base, config=CONFIG)
    for i, ft in enumerate(finetunes(base, 3, seed=1)):
        write_checkpoint(tmp_path / f"ft{i}", ft, config=CONFIG)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


LAZY = """
models:
  - model: base
    # no parameters necessary for base model
  - model: ft0
    parameters: {weight: 0.5, density: 0.5}
  - model: ft1
    parameters: {weight: 0.5}
  - model: ft2
merge_method: model_stock
base_model: base
parameters:
  filter_wise: true
dtype: bfloat16
"""


def test_a_lazymergekit_models_list_translates_with_one_warning(work, caplog):
    recipe = load_run_target(write(work / "config.yml", LAZY))
    assert recipe.base_model == ModelEntry(model=str(work / "base"))
    assert [m.model for m in recipe.models] == [str(work / f"ft{i}") for i in range(3)]  # the base dropped
    assert recipe.method == "model_stock" and recipe.parameters.granularity == "filter"
    assert recipe.parameters.clamp_t is True and recipe.parameters.eps == 1e-8
    assert recipe.dtype == "BF16" and recipe.tokenizer_source == "base" and recipe.chat_template is None
    assert recipe.origin is not None and recipe.origin.mergekit_config == str(work / "config.yml")
    assert recipe.origin.reruns is None
    assert DTYPE_NOTE in recipe.origin.notes and WEIGHTS_WARNING in recipe.origin.notes
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"warning: {work / 'config.yml'}: {WEIGHTS_WARNING}"]


def test_one_full_range_slice_is_the_models_list(work):
    from_models = load_run_target(write(work / "a.yml", LAZY))
    sliced = load_run_target(write(work / "b.yml", """
        slices:
          - sources:
              - model: base
                layer_range: [0, 2]
              - model: ft0
                layer_range: [0, 2]
                parameters: {weight: 0.5, density: 0.5}
              - model: ft1
                layer_range: [0, 2]
                parameters: {weight: 0.5}
              - model: ft2
                layer_range: [0, 2]
        merge_method: model_stock
        base_model: base
        parameters: {filter_wise: true}
        dtype: bfloat16
        """))
    assert sliced.model_dump(exclude={"origin"}) == from_models.model_dump(exclude={"origin"})
    assert [n.replace("slices[0].sources", "models") for n in sliced.origin.notes] == from_models.origin.notes


def test_references_revisions_lora_tokenizer_template_dtypes():
    layers = {"org/base": 28}
    t = translate({
        "merge_method": "model_stock",
        "base_model": "org/base@v1",
        "slices": [{"sources": [
            {"model": "org/base@v1", "layer_range": [0, 28]},
            {"model": "org/ft-a@abc", "layer_range": [0, 28]},
            {"model": "org/base@v1+org/lora-b", "layer_range": [0, 28]},
            {"model": {"model": {"path": "org/base", "revision": "v1"}, "lora": {"path": "org/lora-c", "revision": "r2"}},
             "layer_range": [0, 28]},
        ]}],
        "parameters": {"filter_wise": {"value": False}},
        "dtype": "float32",
        "out_dtype": "torch.bfloat16",
        "tokenizer": {"source": "org/base@v1+org/lora-b"},
        "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    }, "config.yml", layers=lambda e: layers[e.model] if e.model == "org/base" else 28)
    r = t.recipe
    assert r.base_model.label == "org/base@v1"
    assert [m.label for m in r.models] == ["org/ft-a@abc", "org/lora-b", "org/lora-c@r2"]  # adapter entries
    assert r.parameters.granularity == "layer" and r.dtype == "BF16"  # out_dtype wins
    assert r.tokenizer_source == "org/lora-b" and r.chat_template.startswith("{% for m in")
    assert t.warnings == [] and ("dtype float32: mergekit computes in it; hf-model-stock computes in float64 whatever "
                                 "dtype says (output dtype bfloat16, from out_dtype)") in r.origin.notes


@pytest.mark.parametrize("given, expected", [
    ({"tokenizer_source": "base"}, "base"),
    ({"tokenizer_source": "union"}, "union"),
    ({"tokenizer_source": "org/b"}, "base"),
    ({"tokenizer_source": "org/y"}, "org/y"),
    ({"tokenizer": {}}, "union"),  # mergekit's tokenizer.source defaults to union
    ({"tokenizer": {"source": "base", "pad_to_multiple_of": None}}, "base"),
    ({}, "base"),
])
def test_tokenizer_sources(given, expected):
    data = {"merge_method": "model_stock", "base_model": "org/b", "models": [{"model": "org/x"}, {"model": "org/y"}],
            **given}
    assert translate(data, "c.yml", layers=lambda e: 2).recipe.tokenizer_source == expected


def test_linear_with_equal_weights_is_our_uniform_average():
    data = {"merge_method": "linear", "base_model": "org/b",
            "models": [{"model": "org/x", "parameters": {"weight": 0.3}}, {"model": "org/y", "parameters": {"weight": 0.3}}]}
    t = translate(data, "c.yml", layers=lambda e: 2)
    assert t.recipe.method == "linear" and [m.model for m in t.recipe.models] == ["org/x", "org/y"] and t.warnings == []
    no_weights = translate({**data, "models": [{"model": "org/x"}, {"model": "org/y"}]}, "c.yml", layers=lambda e: 2)
    assert no_weights.recipe.method == "linear"
    with pytest.raises(RecipeError, match=r"^c\.yml: merge_method: linear with unequal weights \[0\.3, 0\.7\] is not "):
        translate({**data, "models": [{"model": "org/x", "parameters": {"weight": 0.3}},
                                      {"model": "org/y", "parameters": {"weight": 0.7}}]}, "c.yml", layers=lambda e: 2)
    with pytest.raises(RecipeError, match=r"^c\.yml: parameters\.normalize: false with weights summing to 0\.6 is not"):
        translate({**data, "parameters": {"normalize": False}}, "c.yml", layers=lambda e: 2)


BASE = "merge_method: model_stock\nbase_model: base\n"
MODELS = "models:\n  - model: base\n  - model: ft0\n  - model: ft1\n"


@pytest.mark.parametrize("text, message", [
    ("merge_method: ties\nbase_model: base\n" + MODELS,
     "merge_method: 'ties' is not supported (only model_stock and linear)"),
    (BASE + "slices:\n  - sources:\n      - {model: base, layer_range: [0, 2]}\n      - {model: ft0, layer_range: [0, 1]}\n"
            "      - {model: ft1, layer_range: [0, 2]}\n",
     "slices[0].sources[1].layer_range: [0, 1] is not the whole model (FT0 has 2 layers: [0, 2]); "
     "hf-model-stock merges whole models (no layer slicing)"),
    (BASE + "slices:\n  - sources: [{model: ft0, layer_range: [0, 1]}]\n  - sources: [{model: ft0, layer_range: [1, 2]}]\n",
     "slices: 2 slices: only one slice whose sources span every layer of their model is supported "
     "(hf-model-stock merges whole models)"),
    (BASE + "modules:\n  text_decoder:\n    models: [{model: ft0}]\n",
     "modules: per-module merges are not supported (hf-model-stock merges whole models: use models, or one "
     "slice over every layer)"),
    (BASE + MODELS + "  - model: ft0+org/lora\n",
     "models[3].model: FT0+org/lora: a LoRA on FT0, which is not the base (BASE): only LoRA adapters of the "
     "base are fine-tunes here"),
    (BASE + MODELS + "parameters:\n  filter_wise:\n    - filter: mlp\n      value: true\n    - value: false\n",
     "parameters.filter_wise: a per-tensor conditional value is not supported (one value for every tensor only)"),
    (BASE + MODELS + "merge_methd: model_stock\n", "merge_methd: unknown key (not in mergekit's configuration schema)"),
    (BASE + MODELS + "tokenizer:\n  source: union\n  tokens:\n    <|im_start|>: {source: ft0}\n",
     "tokenizer.tokens: per-token embedding sources are not supported (hf-model-stock takes each token's row "
     "from the models that have the token)"),
    (BASE + MODELS + "tokenizer: {source: base, pad_to_multiple_of: 64}\n",
     "tokenizer.pad_to_multiple_of: not supported (the output keeps the tokenizer source's rows, its padding included)"),
    (BASE + MODELS + "chat_template: exaone\n",
     "chat_template: 'exaone' is one of mergekit's built-in templates that hf-model-stock does not ship (chatml, "
     "llama3, mistral, alpaca are; or give the Jinja text, a file, 'base' or a model)"),
    ("merge_method: model_stock\n" + MODELS, "base_model: required (Model Stock merges fine-tunes of a base model)"),
    (BASE + "models:\n  - model: ft0\n", "models: Model Stock needs at least 2 fine-tuned models, got 1"),
])
def test_refusals_are_one_line_exit_2_and_nothing_written(work, capsys, text, message):
    config = write(work / "config.yml", text)
    code = main(["run", "config.yml", "--out", str(work / "out")])
    err = capsys.readouterr().err.strip()
    expected = message.replace("FT0", str(work / "ft0")).replace("BASE", str(work / "base"))
    assert (code, err) == (2, f"error: config.yml: {expected}")
    assert not (work / "out").exists() and not [p for p in work.iterdir() if ".hfms-" in p.name]
    assert config.is_file()


def test_dry_run_prints_our_recipe_which_loads_back_to_the_same_recipe(work, capsys):
    write(work / "config.yml", LAZY + "tokenizer_source: ft1\nchat_template: \"{{ messages[0]['content'] }}\"\n")
    assert main(["run", "config.yml", "--dry-run", "--out", "merged"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# translated from config.yml by hf-model-stock\nbase_model: ")
    assert not (work / "merged").exists()
    saved = work / "elsewhere" / "recipe.yaml"
    saved.parent.mkdir()
    saved.write_text(printed, encoding="utf-8")
    loaded = load_recipe(saved)
    translated = load_run_target("config.yml")
    translated = translated.model_copy(update={"output": translated.output.model_copy(
        update={"path": str(work / "merged")})})
    assert loaded == translated
    assert loaded.tokenizer_source == str(work / "ft1") and loaded.parameters.granularity == "filter"
    assert recipe_yaml(loaded) == printed


def shards(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.glob("*.safetensors"))}


def native_run(work: Path, out: str, granularity: str = "filter") -> Path:
    write(work / "native.yaml", f"""
        base_model: base
        models: [ft0, ft1, ft2]
        parameters: {{granularity: {granularity}}}
        dtype: bfloat16
        """)
    assert main(["run", "native.yaml", "--out", out, "-q"]) == 0
    return work / out


def test_run_config_equals_the_native_recipe_bit_for_bit(work):
    write(work / "config.yml", LAZY)
    assert main(["run", "config.yml", "--out", "from-mergekit", "-q"]) == 0
    native = native_run(work, "native-out")
    got = work / "from-mergekit"
    assert shards(got) == shards(native) and len(shards(got)) == 1
    assert json.loads((got / "config.json").read_text()) == json.loads((native / "config.json").read_text())
    report = json.loads((got / "merge_report.json").read_text())
    assert DTYPE_NOTE in report["notes"] and WEIGHTS_WARNING in report["notes"]
    assert report["recipe"]["origin"]["mergekit_config"] == "config.yml"
    card = (got / "README.md").read_text()
    assert "## From mergekit" in card and f"- {DTYPE_NOTE}" in card
    assert "This merge was translated from the mergekit configuration `config.yml`" in card
    assert str(work) not in card and str(work) not in (got / "merge_report.json").read_text()


MERGEKIT_CARD = """---
base_model: []
library_name: transformers
tags: [mergekit, merge]
---
# published

This is a merge of pre-trained language models created using [mergekit](https://github.com/cg123/mergekit).

## Merge Details
### Merge Method

This model was merged using the [Model Stock](https://arxiv.org/abs/2403.19522) merge method using base as a base.

### Configuration

The following YAML configuration was used to produce this model:

```yaml
{config}
```
"""
LAZY_CARD = """# published

published is a merge of the following models using [LazyMergekit](https://colab.research.google.com):
* [ft0](https://huggingface.co/ft0)

## 🧩 Configuration

```yaml
{config}
```

## 💻 Usage

```python
print("not the config")
```
"""


@pytest.mark.parametrize("layout", [MERGEKIT_CARD, LAZY_CARD])
def test_the_config_is_found_in_both_card_layouts(layout):
    card = layout.replace("{config}", LAZY.strip())
    assert config_in_card(card) == yaml.safe_load(LAZY)
    assert config_in_card("# x\n\n## Configuration\n\n```python\nx = 1\n```\n") is None


def published_dir(work: Path, name: str, config: str, *, card_only: bool) -> Path:
    d = work / name
    d.mkdir()
    (d / "README.md").write_text(MERGEKIT_CARD.replace("{config}", config.strip()), encoding="utf-8")
    if not card_only:
        (d / "mergekit_config.yml").write_text(config, encoding="utf-8")
    (d / "config.json").write_text(json.dumps(CONFIG))
    (d / "model.safetensors").write_bytes(b"weights of the published merge, never read")
    return d


@pytest.mark.parametrize("card_only", [True, False])
def test_rerun_a_published_merge_from_a_local_directory(work, card_only):
    published_dir(work, "published", LAZY, card_only=card_only)
    assert main(["run", "published", "--out", "rerun", "-q"]) == 0
    native = native_run(work, "native-out")
    assert shards(work / "rerun") == shards(native)
    origin = json.loads((work / "rerun" / "merge_report.json").read_text())["recipe"]["origin"]
    source = "README.md" if card_only else "mergekit_config.yml"
    assert origin["reruns"] == "published" and origin["mergekit_config"] == f"published/{source}"
    assert origin["notes"][-1].startswith("the sources are read at the revisions the config names")
    card = (work / "rerun" / "README.md").read_text()
    assert f"This merge re-runs the merge `published` from its mergekit configuration `published/{source}`" in card


def test_rerun_a_published_merge_from_the_hub_fetches_only_its_card(work, hub, monkeypatch):
    for name in ("base", "ft0", "ft1", "ft2"):
        hub.add_commit(f"org/{name}", work / name)
    config = LAZY.replace("model: ft", "model: org/ft").replace("model: base", "model: org/base").replace(
        "base_model: base", "base_model: org/base")
    published = published_dir(work, "published", config, card_only=True)
    sha = hub.add_commit("org/published", {p.name: p.read_bytes() for p in published.iterdir()})
    hub.reset_stats()
    assert main(["run", "org/published", "--out", "rerun", "-q"]) == 0
    asked = [r.path for r in hub.requests() if "org/published" in r.path]
    assert asked and all(p.endswith(("/mergekit_config.yml", "/README.md")) for p in asked)
    assert not [r for r in hub.requests() if "org/published" in r.path and r.path.endswith(".safetensors")]
    assert hub.weight_bytes_served > 0  # the sources' weights were read
    assert shards(work / "rerun") == shards(native_run(work, "native-out"))
    card = (work / "rerun" / "README.md").read_text()
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["reruns"] == f"org/published@{sha}"
    assert set(meta["base_model"]) == {"org/base", "org/ft0", "org/ft1", "org/ft2"}
    assert (f"This merge re-runs the published merge [org/published](https://huggingface.co/org/published/tree/{sha}) "
            f"(commit `{sha}`) from its mergekit configuration `org/published@{sha}/README.md`") in card

    set_offline(monkeypatch, True)  # everything it read is cached: the re-run repeats offline, asking nothing
    hub.reset_stats()
    assert main(["run", "org/published", "--out", "offline", "-q"]) == 0
    assert hub.log == [] and shards(work / "offline") == shards(work / "rerun")


def test_a_missing_published_repo_is_one_line(work, hub, capsys):
    assert main(["run", "org/nothing", "--out", "rerun"]) == 2
    assert capsys.readouterr().err.strip() == ("error: org/nothing: repository not found on the Hub (or it is "
                                               "private: log in with `hf auth login`, or set HF_TOKEN, with a token "
                                               "that can read it)")
    assert not (work / "rerun").exists()


def test_a_published_merge_of_another_method_is_refused_naming_its_card(work, hub, capsys):
    card = MERGEKIT_CARD.replace("{config}", "merge_method: slerp\nbase_model: org/a\nmodels: [{model: org/a}, {model: org/b}]")
    sha = hub.add_commit("org/slerped", {"README.md": card.encode()})
    assert main(["run", "org/slerped", "--out", "rerun"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: org/slerped@{sha}/README.md: merge_method: 'slerp' is not "
                                               "supported (only model_stock and linear)")
    assert not (work / "rerun").exists()


def test_out_overrides_output_path_of_our_own_recipes(work):
    write(work / "native.yaml", """
        base_model: base
        models: [ft0, ft1]
        output: {path: elsewhere}
        """)
    assert main(["run", "native.yaml", "--out", "chosen", "-q"]) == 0
    assert (work / "chosen" / "model.safetensors").is_file() and not (work / "elsewhere").exists()
    report = json.loads((work / "chosen" / "merge_report.json").read_text())
    assert report["recipe"]["output"]["path"] == "chosen" and "origin" not in report["recipe"]


def test_base_plus_lora_references_merge_as_adapter_fine_tunes(tmp_path, monkeypatch):
    from tests.adaptergen import make_adapter, tiny_base

    monkeypatch.chdir(tmp_path)
    base = tiny_base(tmp_path / "lbase")
    for i in (1, 2):
        make_adapter(base, tmp_path / f"lora{i}", seed=i, r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"])
    write(tmp_path / "config.yml", """
        merge_method: model_stock
        base_model: lbase
        models:
          - model: lbase
          - model: lbase+lora1
          - model: lbase+lora2
        """)
    write(tmp_path / "native.yaml", "base_model: lbase\nmodels: [lora1, lora2]\n")
    assert main(["run", "config.yml", "--out", "from-mergekit", "-q"]) == 0
    assert main(["run", "native.yaml", "--out", "native-out", "-q"]) == 0
    assert shards(tmp_path / "from-mergekit") == shards(tmp_path / "native-out")
    assert shards(tmp_path / "native-out") != shards(base)  # the adapters moved the weights


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
RENDERED = {  # each format's published layout, for CONVERSATION with the generation prompt
    "chatml": ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
               "Hello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"),
    "llama3": ("<s><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|><|start_header_id|>user"
               "<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|><|start_header_id|>assistant"
               "<|end_header_id|>\n\n"),
    "mistral": "<s>[INST] Be brief.\n\nHi [/INST]Hello.</s>[INST] 2+2? [/INST]",
    "alpaca": ("Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello.</s>\n\n### Instruction:\n2+2?\n\n"
               "### Response:\n"),
}


@pytest.mark.parametrize("name", RENDERED)
def test_mergekit_template_names_become_our_jinja(name):
    from transformers.utils.chat_template_utils import render_jinja_template

    data = {"merge_method": "model_stock", "base_model": "org/b", "models": [{"model": "org/x"}, {"model": "org/y"}],
            "chat_template": name}
    recipe = translate(data, "c.yml", layers=lambda e: 2).recipe
    assert f"chat_template {name}: hf-model-stock's own Jinja for the {name} format" in recipe.origin.notes
    rendered, _ = render_jinja_template(conversations=[CONVERSATION], chat_template=recipe.chat_template,
                                        add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert rendered[0] == RENDERED[name]


def test_chat_template_auto_is_our_default_and_exaone_is_refused():
    data = {"merge_method": "model_stock", "base_model": "org/b", "models": [{"model": "org/x"}, {"model": "org/y"}]}
    auto = translate({**data, "chat_template": "auto"}, "c.yml", layers=lambda e: 2).recipe
    assert auto.chat_template is None and any(n.startswith("chat_template auto:") for n in auto.origin.notes)
    with pytest.raises(RecipeError, match=r"^c.yml: chat_template: 'exaone' is one of mergekit's built-in"):
        translate({**data, "chat_template": "exaone"}, "c.yml", layers=lambda e: 2)
