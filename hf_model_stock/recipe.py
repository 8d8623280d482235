"""Recipes: YAML -> validated ``Recipe``. Errors name the key and the line it is on.

A recipe names a base model, N >= 2 fine-tunes of it, the method's parameters, compute options, the
output and the evaluations to run afterwards. See ``recipes/`` for examples.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from hf_model_stock.errors import RecipeError
from hf_model_stock.eval_spec import EvalSpec
from hf_model_stock.io.dtypes import parse_dtype_name
from hf_model_stock.methods.model_stock import ModelStockParams
from hf_model_stock.methods.registry import METHODS
from hf_model_stock.yaml_schema import validate_mapping, validate_yaml

Device = Literal["auto", "cpu", "cuda", "mps"]
OnNonfinite = Literal["error", "warn"]  # NaN/Inf in a merged tensor's inputs: stop, or merge and report
OutputFormat = Literal["model", "adapter"]  # full weights, or a PEFT LoRA (every fine-tune an adapter)
BaseMismatch = Literal["error", "warn"]  # a LoRA adapter trained on another base: stop, or merge and note it
OnInterrupt = Literal["keep", "remove"]  # what Ctrl-C/SIGTERM do with the partial output

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"``, ``"500MiB"`` or ``"1024"``."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise ValueError(f"not a size: {value!r} (write e.g. 5GB or 500MiB)")
        size = int(float(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    """A model: a local path or a Hub repo ``org/name``, optionally pinned to a revision."""

    model: str = Field(min_length=1)
    revision: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return split_revision(value)
        return value

    @property
    def label(self) -> str:
        return f"{self.model}@{self.revision}" if self.revision else self.model


def split_revision(text: str) -> dict[str, str | None]:
    """``"org/name@rev"`` -> model and revision; local paths are never split."""
    text = text.strip()
    if "@" in text and not Path(text).exists():
        model, rev = text.rsplit("@", 1)
        if model and rev:
            return {"model": model, "revision": rev}
    return {"model": text, "revision": None}


class Compute(_Strict):
    """Where and in what memory the merge runs."""

    device: Device = "auto"
    chunk_size: int = Field(default=128 * 2**20, description="bytes of input (all models) per unit of work")
    prefetch: int = Field(default=2, ge=1, le=16)
    stream: bool = Field(default=False, description="read Hub sources' weights over HTTP during the merge, not into the cache")

    @field_validator("chunk_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)


class PushToHub(_Strict):
    """Where to upload the merged model once it is written."""

    repo_id: str = Field(min_length=3, pattern=r"^[\w.-]+/[\w.-]+$")
    private: bool = False
    revision: str | None = None
    commit_message: str | None = None


class Output(_Strict):
    """Where the merged model goes."""

    path: str | None = None
    shard_size: int = 5 * 10**9
    overwrite: bool = False
    fsync: bool = False
    on_interrupt: OnInterrupt = "keep"  # keep: Ctrl-C/SIGTERM leave the partial output for --resume
    format: OutputFormat = "model"  # adapter: a PEFT LoRA (when every fine-tune is a LoRA adapter)
    push_to_hub: PushToHub | None = None

    @field_validator("shard_size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> int:
        return parse_size(value)


class Origin(_Strict):
    """Where a translated recipe came from (``hf_model_stock.mergekit``): merge_report.json and the card
    name it, with the notes on what the translation means for the numbers."""

    mergekit_config: str = Field(min_length=1)  # the mergekit config it was translated from
    reruns: str | None = None  # the published merge it re-runs: org/name@commit, or a directory
    notes: list[str] = Field(default_factory=list)


class Recipe(_Strict):
    """A validated merge recipe."""

    base_model: ModelEntry
    models: list[ModelEntry]
    method: str = "model_stock"  # a name in methods.registry.METHODS; linear: uniform average (Model Soup)
    parameters: ModelStockParams = ModelStockParams()
    dtype: str | None = None
    compute: Compute = Compute()
    output: Output = Output()
    tokenizer_source: str = "base"
    chat_template: str | None = None  # base, a model of the recipe, a file or inline Jinja; unset: see publish.chat
    allow_pickle: bool = False
    on_nonfinite: OnNonfinite = "error"
    adapter_base_mismatch: BaseMismatch = "error"  # a LoRA adapter trained on another base
    evals: EvalSpec | None = None
    origin: Origin | None = None  # set when translated from a mergekit config

    @field_validator("method")
    @classmethod
    def _method(cls, value: str) -> str:
        if value not in METHODS:
            raise ValueError(f"unknown method {value!r} (one of {', '.join(METHODS)})")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        return None if value is None else parse_dtype_name(value)

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if len(self.models) < 2:
            raise ValueError(f"models: Model Stock needs at least 2 fine-tuned models, got {len(self.models)}")
        if (self.method == "interp") != (self.parameters.t is not None):
            raise ValueError("parameters.t: method interp needs it (its one ratio)" if self.method == "interp"
                             else f"parameters.t: only method interp takes it (method is {self.method})")
        seen: set[tuple[str, str | None]] = set()
        base_key = _identity(self.base_model)
        for i, entry in enumerate(self.models):
            key = _identity(entry)
            if key == base_key:
                raise ValueError(f"models[{i}]: {entry.label} is the base model; list only fine-tunes")
            if key in seen:
                raise ValueError(f"models[{i}]: {entry.label} is listed twice")
            seen.add(key)
        if self.output.path is not None:
            out = Path(self.output.path).expanduser().resolve()
            for entry in [self.base_model, *self.models]:
                if _is_local(entry) and Path(entry.model).expanduser().resolve() == out:
                    raise ValueError(f"output.path: {self.output.path} is also an input model")
        if self.tokenizer_source not in ("base", "union", *(m.model for m in self.models)) and not Path(
            self.tokenizer_source
        ).expanduser().is_dir():
            raise ValueError(
                f"tokenizer_source: {self.tokenizer_source!r} is neither 'base', 'union', one of the models, nor a directory"
            )
        if self.chat_template is not None and not (
            self.chat_template in ("base", *(m.model for m in self.models))
            or "{{" in self.chat_template or "{%" in self.chat_template
            or Path(self.chat_template).expanduser().is_file()
        ):
            raise ValueError(f"chat_template: {self.chat_template!r} is neither 'base', one of the models, a file "
                             "nor inline Jinja")
        return self


def _is_local(entry: ModelEntry) -> bool:
    return Path(entry.model).expanduser().exists()


def _identity(entry: ModelEntry) -> tuple[str, str | None]:
    if _is_local(entry):
        return (str(Path(entry.model).expanduser().resolve()), None)
    return (entry.model, entry.revision)


def relative_model_ref(base: Path, value: Any) -> Any:
    """A model reference as written in a YAML file (``"path"``, ``"org/name@rev"`` or a mapping with
    ``model``), with a relative local path resolved against the file's folder ``base``."""
    if isinstance(value, str):
        entry = split_revision(value)
        candidate = base / str(entry["model"])
        return str(candidate) if not Path(value).is_absolute() and candidate.exists() else value
    if isinstance(value, dict) and isinstance(value.get("model"), str) and "@" not in value["model"]:
        return {**value, "model": relative_model_ref(base, value["model"])}
    return value


def _relative_to(base: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Resolve local paths written in a recipe relative to the recipe's folder."""
    data = dict(data)
    if "base_model" in data:
        data["base_model"] = relative_model_ref(base, data["base_model"])
    if isinstance(data.get("models"), list):
        data["models"] = [relative_model_ref(base, m) for m in data["models"]]
    if isinstance(data.get("tokenizer_source"), str) and data["tokenizer_source"] not in ("base", "union"):
        data["tokenizer_source"] = relative_model_ref(base, data["tokenizer_source"])
    chat = data.get("chat_template")
    if isinstance(chat, str) and chat != "base" and "{{" not in chat and "{%" not in chat:
        data["chat_template"] = relative_model_ref(base, chat)
    out = data.get("output")
    if isinstance(out, dict) and isinstance(out.get("path"), str) and not Path(out["path"]).is_absolute():
        data["output"] = {**out, "path": str(base / out["path"])}
    return data


def parse_recipe(
    text: str, source: str = "<recipe>", base_dir: Path | None = None, with_lines: bool = True
) -> Recipe:
    """Validate recipe YAML text. Relative local paths resolve against ``base_dir`` (default: cwd).
    Errors cite the line of the key unless ``with_lines`` is False (text we generated ourselves)."""
    return validate_yaml(
        text, Recipe, source, error=RecipeError,
        not_a_mapping="a recipe must be a YAML mapping with base_model and models",
        prepare=None if base_dir is None else (lambda data: _relative_to(base_dir, data)),
        with_lines=with_lines,
    )


def recipe_from_mapping(data: dict[str, Any], source: str = "command line") -> Recipe:
    """A ``Recipe`` from a mapping built in code (the ``merge`` command's flags): the same validation and
    one-line errors as a recipe file, without YAML in between."""
    return validate_mapping(data, Recipe, source, error=RecipeError)


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate a recipe file; relative local model paths resolve against its folder.

    >>> recipe = load_recipe("recipes/demo.yaml")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{path}: cannot read recipe ({exc.strerror or exc})") from None
    return parse_recipe(text, str(path), base_dir=path.resolve().parent)
