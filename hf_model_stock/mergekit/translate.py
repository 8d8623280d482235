"""A mergekit configuration (the YAML of ``mergekit-yaml``, as it stands in ``mergekit_config.yml`` and
in merged models' cards) -> our ``Recipe``, or one line saying what cannot be translated and why.

What maps (see docs/mergekit.md): ``merge_method: model_stock`` (``filter_wise`` -> granularity) and
``linear`` with equal weights (our uniform average); ``base_model``; ``models`` (the base listed there
is dropped, as mergekit does) or one ``slices`` block whose sources each span every layer of their
model; ``base+lora`` references (a LoRA adapter of the base is a fine-tune here); ``dtype`` and
``out_dtype`` (the output dtype; our arithmetic is float64 whatever ``dtype`` says);
``tokenizer_source``, ``tokenizer.source`` and ``chat_template`` as far as our vocabulary and template
rules go. Everything else is refused, naming the file and key.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hf_model_stock.errors import RecipeError
from hf_model_stock.io.dtypes import CONFIG_DTYPE_NAMES, parse_dtype_name
from hf_model_stock.mergekit.chat_templates import BUILTIN
from hf_model_stock.recipe import ModelEntry, Recipe, parse_recipe

logger = logging.getLogger(__name__)

METHODS = ("model_stock", "linear")
TOP_KEYS = ("merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
            "tokenizer_source", "tokenizer", "chat_template")
MODEL_KEYS = ("model", "parameters")
SLICE_KEYS = ("sources", "base_model", "parameters")  # residual_weight: not ours
SOURCE_KEYS = ("model", "layer_range", "parameters")
TOKENIZER_KEYS = ("source", "tokens", "pad_to_multiple_of")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")  # config.json spellings of the layer count

LayerCount = Callable[[ModelEntry], int]  # a model's number of layers, from its config.json


def is_mergekit_config(data: Any) -> bool:
    """A mergekit config is a mapping with ``merge_method`` (our recipes never have that key)."""
    return isinstance(data, Mapping) and "merge_method" in data


@dataclass(frozen=True)
class Translation:
    """The recipe a mergekit config stands for, and the warnings to show once (also in its notes)."""

    recipe: Recipe
    warnings: list[str]


@dataclass(frozen=True)
class _Ref:
    """A mergekit model reference: ``path[@revision][+lora_path[@revision]]``."""

    model: str
    revision: str | None = None
    lora: str | None = None
    lora_revision: str | None = None

    @property
    def target(self) -> tuple[str, str | None]:
        return (self.model, self.revision)

    def label(self) -> str:
        text = f"{self.model}@{self.revision}" if self.revision else self.model
        if self.lora:
            text += f"+{self.lora}@{self.lora_revision}" if self.lora_revision else f"+{self.lora}"
        return text


class _Translator:
    """One config's translation: each method reads a part and raises ``RecipeError`` naming the key."""

    def __init__(self, data: Mapping[str, Any], source: str, base_dir: Path | None, layers: LayerCount):
        self.data = data
        self.source = source
        self.base_dir = base_dir
        self.layers = layers
        self.notes: list[str] = []
        self.warnings: list[str] = []

    def fail(self, key: str, message: str) -> RecipeError:
        return RecipeError(f"{self.source}: {key}: {message}")

    # -- references ---------------------------------------------------------------------------------

    def existing(self, path: str) -> str | None:
        """The absolute path of a local model (a relative path: against the config's folder, else the
        working directory, where mergekit looks), or None for a Hub id."""
        p = Path(path).expanduser()
        for candidate in [p] if p.is_absolute() else [*([self.base_dir / p] if self.base_dir else []), p]:
            if candidate.exists():
                return str(candidate.resolve())
        return None

    def local(self, path: str) -> str:
        """A local path as an absolute one; a Hub id as it is."""
        return self.existing(path) or path

    def path_rev(self, key: str, value: Any) -> tuple[str, str | None]:
        if isinstance(value, Mapping):
            extra = sorted(set(value) - {"path", "revision"})
            if extra:
                raise self.fail(f"{key}.{extra[0]}", "unknown key")
            path, rev = value.get("path"), value.get("revision")
        elif isinstance(value, str):
            local = self.existing(value)
            if local:  # a local path is never split at '@'
                return local, None
            if value.count("@") > 1:
                raise self.fail(key, f"{value!r}: more than one '@'")
            path, _, rev = value.partition("@")
            rev = rev or None
        else:
            raise self.fail(key, f"not a model reference: {value!r}")
        if not isinstance(path, str) or not path.strip() or not (rev is None or isinstance(rev, str)):
            raise self.fail(key, f"not a model reference: {value!r}")
        return self.local(path.strip()), rev

    def ref(self, key: str, value: Any) -> _Ref:
        """Parse a reference as mergekit writes one: a string ``model[+lora]`` or a mapping."""
        if isinstance(value, Mapping):
            extra = [k for k in value if k not in ("model", "lora")]
            if extra:
                reason = "not supported" if extra[0] == "override_architecture" else "unknown key"
                raise self.fail(f"{key}.{extra[0]}", reason)
            model, rev = self.path_rev(f"{key}.model", value.get("model"))
            lora = value.get("lora")
            lora_path, lora_rev = (None, None) if lora is None else self.path_rev(f"{key}.lora", lora)
            return _Ref(model, rev, lora_path, lora_rev)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"not a model reference: {value!r}")
        if self.existing(value) or "+" not in value:
            return _Ref(*self.path_rev(key, value))
        parts = value.split("+")
        if len(parts) != 2:
            raise self.fail(key, f"{value!r}: more than one '+' (write model+lora)")
        return _Ref(*self.path_rev(key, parts[0]), *self.path_rev(key, parts[1]))

    # -- the pieces ---------------------------------------------------------------------------------

    def check_keys(self, key: str, value: Any, allowed: tuple[str, ...], what: str) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(key, f"must be a mapping ({what})")
        for k in value:
            if k not in allowed:
                reason = "not supported (hf-model-stock merges whole models)" if k == "residual_weight" else "unknown key"
                raise self.fail(f"{key}.{k}" if key else str(k), reason)
        return value

    def inputs(self) -> tuple[list[tuple[str, _Ref, Mapping[str, Any]]], Mapping[str, Any], Any]:
        """(key, reference, per-model parameters) of every listed model, the slice's parameters and the
        slice's base_model."""
        if self.data.get("modules") is not None:
            raise self.fail("modules", "per-module merges are not supported (hf-model-stock merges whole models: "
                                       "use models, or one slice over every layer)")
        models, slices = self.data.get("models"), self.data.get("slices")
        if models and slices:
            raise self.fail("slices", "give models or slices, not both")
        if models:
            if not isinstance(models, list):
                raise self.fail("models", "must be a list")
            out = []
            for i, m in enumerate(models):
                key = f"models[{i}]"
                if isinstance(m, str):
                    m = {"model": m}
                self.check_keys(key, m, MODEL_KEYS, "model and parameters")
                out.append((key, self.ref(f"{key}.model", m.get("model")), m.get("parameters") or {}))
            return out, {}, None
        if not slices:
            raise self.fail("models", "required (the models to merge, or one slices block)")
        if not isinstance(slices, list):
            raise self.fail("slices", "must be a list")
        if len(slices) != 1:
            raise self.fail("slices", f"{len(slices)} slices: only one slice whose sources span every layer of "
                                      "their model is supported (hf-model-stock merges whole models)")
        block = self.check_keys("slices[0]", slices[0], SLICE_KEYS, "sources, base_model, parameters")
        sources = block.get("sources")
        if not isinstance(sources, list) or not sources:
            raise self.fail("slices[0].sources", "required (a list of model and layer_range)")
        out = []
        for j, s in enumerate(sources):
            key = f"slices[0].sources[{j}]"
            self.check_keys(key, s, SOURCE_KEYS, "model, layer_range, parameters")
            ref = self.ref(f"{key}.model", s.get("model"))
            self.check_range(f"{key}.layer_range", ref, s.get("layer_range"))
            out.append((key, ref, s.get("parameters") or {}))
        return out, block.get("parameters") or {}, block.get("base_model")

    def check_range(self, key: str, ref: _Ref, value: Any) -> None:
        if value is None:
            raise self.fail(key, "required")
        if (not isinstance(value, (list, tuple)) or len(value) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
            raise self.fail(key, f"must be [start, end], got {value!r}")
        n = self.layers(ModelEntry(model=ref.model, revision=ref.revision))
        if list(value) != [0, n]:
            raise self.fail(key, f"{list(value)} is not the whole model ({ref.model} has {n} layers: [0, {n}]); "
                                 "hf-model-stock merges whole models (no layer slicing)")

    def base(self, slice_base: Any) -> _Ref:
        value = self.data.get("base_model")
        key = "base_model"
        if slice_base is not None:
            sref = self.ref("slices[0].base_model", slice_base)
            if value is not None and self.ref(key, value) != sref:
                raise self.fail("slices[0].base_model", "differs from base_model")
            value, key = slice_base, "slices[0].base_model"
        if value is None:
            what = "Model Stock" if self.data["merge_method"] == "model_stock" else "hf-model-stock's linear"
            raise self.fail("base_model", f"required ({what} merges fine-tunes of a base model)")
        ref = self.ref(key, value)
        if ref.lora:
            raise self.fail(key, f"{ref.label()}: a LoRA as the base is not supported (name the base model)")
        return ref

    def parameters(self, slice_params: Mapping[str, Any]) -> dict[str, Any]:
        """Method parameters (top level, the slice's over it)."""
        merged: dict[str, Any] = {}
        for key, params in (("parameters", self.data.get("parameters") or {}), ("slices[0].parameters", slice_params)):
            if not isinstance(params, Mapping):
                raise self.fail(key, "must be a mapping")
            merged.update({k: (f"{key}.{k}", v) for k, v in params.items()})
        return merged

    def scalar(self, key: str, value: Any) -> Any:
        """A setting that is one value for every tensor (a bare value, or {value} without a filter)."""
        if isinstance(value, Mapping) and set(value) <= {"value", "filter"} and value.get("filter") in (None, "*"):
            value = value.get("value")
        if isinstance(value, (list, Mapping)):
            shape = "a per-tensor conditional" if isinstance(value, Mapping) or any(
                isinstance(v, Mapping) for v in value) else "a per-layer gradient"
            raise self.fail(key, f"{shape} value is not supported (one value for every tensor only)")
        return value

    def method_params(self, params: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """Our ``parameters`` and the mergekit parameter keys that do nothing for the method."""
        ours: dict[str, Any] = {}
        ignored = []
        for name, (key, value) in params.items():
            if self.data["merge_method"] == "model_stock" and name == "filter_wise":
                flag = self.scalar(key, value)
                if flag not in (True, False, 0, 1):
                    raise self.fail(key, f"must be true or false, got {flag!r}")
                ours["granularity"] = "filter" if flag else "layer"
            elif self.data["merge_method"] == "linear" and name in ("normalize", "weight"):
                continue  # read by linear_weights
            else:
                ignored.append(key)
        return ours, ignored

    def linear_weights(self, params: dict[str, Any], finetunes: list[tuple[str, Mapping[str, Any]]]) -> None:
        """mergekit's linear is sum(w_i x_i) (/ sum(w_i) with normalize, the default): ours, the uniform
        average of the fine-tunes, only when every weight is the same (and they sum to 1 unnormalised)."""
        default = params.get("weight")
        weights = []
        for key, p in finetunes:
            if "weight" in p:
                weights.append(float(self.scalar(f"{key}.parameters.weight", p["weight"])))
            elif default is not None:
                weights.append(float(self.scalar(default[0], default[1])))
            else:
                weights.append(1.0)
        if len(set(weights)) > 1:
            raise self.fail("merge_method", f"linear with unequal weights {weights} is not supported (hf-model-stock's "
                                            "linear is the uniform average; Model Stock has no weights)")
        normalize = self.scalar(params["normalize"][0], params["normalize"][1]) if "normalize" in params else True
        if not normalize and weights and abs(sum(weights) - 1.0) > 1e-9:
            raise self.fail(params["normalize"][0], f"false with weights summing to {sum(weights):g} is not an "
                                                    "average (hf-model-stock's linear is the uniform average)")

    def dtype(self) -> str | None:
        out_key = "out_dtype" if self.data.get("out_dtype") is not None else "dtype"
        name = self.data.get(out_key)
        if name is None:
            return None
        try:
            code = parse_dtype_name(str(name).removeprefix("torch."))
        except ValueError as exc:
            raise self.fail(out_key, str(exc)) from None
        compute = self.data.get("dtype")
        if compute is not None:
            self.notes.append(f"dtype {compute}: mergekit computes in it; hf-model-stock computes in float64 "
                              f"whatever dtype says (output dtype {CONFIG_DTYPE_NAMES[code]}, from {out_key})")
        return CONFIG_DTYPE_NAMES[code]

    def tokenizer(self, base: _Ref, finetunes: list[tuple[_Ref, str]]) -> str | None:
        source, tok = self.data.get("tokenizer_source"), self.data.get("tokenizer")
        key = "tokenizer_source"
        if source is not None and tok is not None:
            raise self.fail("tokenizer", "give tokenizer_source or tokenizer, not both")
        if tok is not None:
            self.check_keys("tokenizer", tok, TOKENIZER_KEYS, "source, tokens, pad_to_multiple_of")
            if tok.get("tokens"):
                raise self.fail("tokenizer.tokens", "per-token embedding sources are not supported (hf-model-stock takes "
                                                    "each token's row from the models that have the token)")
            if tok.get("pad_to_multiple_of") is not None:
                raise self.fail("tokenizer.pad_to_multiple_of", "not supported (the output keeps the tokenizer "
                                                                "source's rows, its padding included)")
            source, key = tok.get("source", "union"), "tokenizer.source"  # mergekit's default source: union
        if source is None or source in ("base", "union"):
            return source
        ref = self.ref(key, source)
        if ref.target == base.target and not ref.lora:
            return "base"
        for fine, model in finetunes:
            if ref == fine:
                return model
        raise self.fail(key, f"{ref.label()} is not one of the models merged (hf-model-stock takes the tokenizer "
                             "of the base, of a model of the merge, or the union)")

    def chat_template(self) -> str | None:
        value = self.data.get("chat_template")
        if value is None or (isinstance(value, str) and ("{{" in value or "{%" in value)):
            return value
        if value == "auto":
            self.notes.append("chat_template auto: the tokenizer source's template, else a fine-tune's (mergekit "
                              "takes the one most of the models have)")
            return None
        if isinstance(value, str) and value in BUILTIN:
            self.notes.append(f"chat_template {value}: hf-model-stock's own Jinja for the {value} format")
            return BUILTIN[value]
        if value == "exaone":
            raise self.fail("chat_template", "'exaone' is one of mergekit's built-in templates that hf-model-stock "
                                             f"does not ship ({', '.join(BUILTIN)} are; or give the Jinja text, a "
                                             "file, 'base' or a model)")
        if not isinstance(value, str):
            raise self.fail("chat_template", f"must be a string, got {value!r}")
        return self.local(value)

    # -- the whole ----------------------------------------------------------------------------------

    def translate(self) -> tuple[dict[str, Any], list[str]]:
        for key in self.data:
            if key not in TOP_KEYS:
                raise self.fail(str(key), "unknown key (not in mergekit's configuration schema)")
        method = self.data["merge_method"]
        if method not in METHODS:
            raise self.fail("merge_method", f"{method!r} is not supported (only model_stock and linear)")
        listed, slice_params, slice_base = self.inputs()
        base = self.base(slice_base)
        params = self.parameters(slice_params)
        finetunes: list[tuple[_Ref, str]] = []
        per_model: list[tuple[str, Mapping[str, Any]]] = []
        ignored: list[str] = []
        seen: dict[_Ref, str] = {}
        for key, ref, p in listed:
            if not isinstance(p, Mapping):
                raise self.fail(f"{key}.parameters", "must be a mapping")
            if ref.lora and ref.target != base.target:
                raise self.fail(f"{key}.model", f"{ref.label()}: a LoRA on {ref.label().split('+')[0]}, which is not the "
                                                f"base ({base.label()}): only LoRA adapters of the base are fine-tunes here")
            if ref in seen:
                raise self.fail(f"{key}.model", f"{ref.label()} is listed twice ({seen[ref]})")
            seen[ref] = key
            if not ref.lora and ref.target == base.target:
                if method == "linear" and "weight" in p:
                    self.warnings.append(f"{self.source}: {key}: the base {base.label()} is not averaged in (mergekit's "
                                         "linear weighs it in; hf-model-stock's linear averages the fine-tunes)")
                continue  # the base, listed among the models as mergekit configs do
            entry = ModelEntry(model=ref.lora, revision=ref.lora_revision) if ref.lora else ModelEntry(
                model=ref.model, revision=ref.revision)
            finetunes.append((ref, entry.model))
            per_model.append((key, p))
            ignored += [f"{key}.parameters.{k}" for k in p if method == "model_stock" or k != "weight"]
        if method == "linear":
            self.linear_weights(params, per_model)
        ours, ignored_params = self.method_params(params)
        ignored = ignored_params + ignored
        if ignored:
            why = "Model Stock has no weights" if method == "model_stock" else "not parameters of linear"
            self.warnings.append(f"{self.source}: ignored, as mergekit's {method} ignores them ({why}): "
                                 + ", ".join(ignored))
        if method == "model_stock":
            self.notes.append("Model Stock as its authors wrote it: eps 1e-8 added to the product of the delta norms "
                              "(mergekit clamps that product at 1e-6) and t clamped to [0, 1] (mergekit does not "
                              "clamp; parameters.clamp_t: false does not either)")
        recipe: dict[str, Any] = {
            "base_model": _entry_dict(base.model, base.revision),
            "models": [_entry_dict(m.lora or m.model, m.lora_revision if m.lora else m.revision) for m, _ in finetunes],
            "method": method,
        }
        if ours:
            recipe["parameters"] = ours
        dtype = self.dtype()
        if dtype:
            recipe["dtype"] = dtype
        tokenizer = self.tokenizer(base, finetunes)
        if tokenizer is not None:
            recipe["tokenizer_source"] = tokenizer
        template = self.chat_template()
        if template is not None:
            recipe["chat_template"] = template
        self.notes += [w.removeprefix(f"{self.source}: ") for w in self.warnings]
        return recipe, self.warnings


def _entry_dict(model: str, revision: str | None) -> dict[str, str]:
    return {"model": model, **({"revision": revision} if revision else {})}


def translate(
    data: Mapping[str, Any],
    source: str,
    *,
    layers: LayerCount,
    base_dir: Path | None = None,
    reruns: str | None = None,
) -> Translation:
    """The recipe of the mergekit config ``data`` read from ``source`` (the file named in errors and in
    the recipe's ``origin``). ``layers`` gives a model's layer count (to check a slice's layer_range);
    relative local paths resolve against ``base_dir``, then the working directory; ``reruns`` names the
    published merge this re-runs. Raises ``RecipeError`` naming the file and key."""
    translator = _Translator(data, source, base_dir, layers)
    recipe, warnings = translator.translate()
    if reruns:
        translator.notes.append("the sources are read at the revisions the config names (mergekit records no source "
                                "commits): the commits read are those under Sources")
    recipe["origin"] = {"mergekit_config": source, **({"reruns": reruns} if reruns else {}), "notes": translator.notes}
    text = yaml.safe_dump(recipe, sort_keys=False)
    return Translation(parse_recipe(text, source, with_lines=False), warnings)


def recipe_yaml(recipe: Recipe) -> str:
    """``recipe`` in our YAML (what ``run --dry-run`` prints for a mergekit config: save it, edit it,
    run it); ``load_recipe`` reads it back to an equal ``Recipe``."""
    data = recipe.model_dump(mode="json", exclude_defaults=True)
    data["method"] = recipe.method
    data["parameters"] = recipe.model_dump(mode="json")["parameters"]  # the method's knobs, to edit
    if recipe.dtype:
        data["dtype"] = CONFIG_DTYPE_NAMES[recipe.dtype]
    data["base_model"] = recipe.base_model.label
    data["models"] = [m.label for m in recipe.models]
    order = [k for k in Recipe.model_fields if k in data]
    body = yaml.safe_dump({k: data[k] for k in order}, sort_keys=False, allow_unicode=True, width=120)
    origin = recipe.origin
    head = f"# translated from {origin.mergekit_config} by hf-model-stock\n" if origin else ""
    return head + body
