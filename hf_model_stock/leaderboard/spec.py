"""The leaderboard spec: which models (or recipes) to compare, on which evaluations, run where.

    title: Math merges
    models:
      - Qwen/Qwen2.5-Math-7B                 # a Hub repo[@revision] or a local directory
      - {model: ./my-merge, name: my merge}   # with a display name
      - recipe: recipes/math.yaml             # its base, its fine-tunes and its merged output
    evals: {tasks: [gsm8k, math], limit: 200} # the ``evals:`` block of a recipe (EvalSpec)
    output: leaderboard                       # results, cache, logs and the tables
    executor: {kind: local, gpus_per_model: 1}
    model_cards: false                        # write each local model's scores into its README.md

Relative paths resolve against the spec's folder. Validation errors name the key and its line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

from hf_model_stock.errors import LeaderboardError
from hf_model_stock.eval_spec import EvalSpec
from hf_model_stock.recipe import ModelEntry, relative_model_ref, split_revision
from hf_model_stock.yaml_schema import validate_yaml


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Item(_Strict):
    """One entry of ``models``: a model (a local directory or a Hub repo[@revision], with an optional
    display ``name``), or a ``recipe`` whose base, fine-tunes and merged output all take part."""

    model: str | None = Field(default=None, min_length=1)
    revision: str | None = None
    name: str | None = Field(default=None, min_length=1)
    recipe: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return split_revision(value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _model_or_recipe(self) -> Item:
        if (self.model is None) == (self.recipe is None):
            raise ValueError("give either model or recipe")
        if self.recipe is not None and (self.revision or self.name):
            raise ValueError("a recipe entry takes no revision or name (its models are named by the recipe)")
        return self

    def entry(self) -> ModelEntry:
        """The model as a recipe would name it (``model`` entries only)."""
        assert self.model is not None
        return ModelEntry(model=self.model, revision=self.revision)


class ExecutorSpec(_Strict):
    """Where evaluations run. ``local``: one child process per model on this machine, ``parallel`` at a
    time (default: one per ``gpus_per_model`` GPUs, else one). ``ray``: one Ray task per model with its
    GPU/CPU request, on the cluster at ``address`` (default: ``RAY_ADDRESS``, else a local Ray)."""

    kind: Literal["local", "ray"] = "local"
    gpus_per_model: NonNegativeFloat | None = None  # default: 1 where GPUs exist, else 0
    cpus_per_model: PositiveFloat = 1.0
    parallel: PositiveInt | None = None
    address: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ExecutorSpec:
        if self.kind == "local" and self.address is not None:
            raise ValueError("executor.address: only the ray executor connects to a cluster")
        if self.kind == "ray" and self.parallel is not None:
            raise ValueError("executor.parallel: Ray schedules by resources; set gpus_per_model/cpus_per_model")
        if self.kind == "local" and self.gpus_per_model not in (None, 0) and self.gpus_per_model % 1:
            raise ValueError("executor.gpus_per_model: a local run gives each model whole GPUs")
        return self


class LeaderboardSpec(_Strict):
    """A validated leaderboard spec (see the module docstring)."""

    title: str = "Leaderboard"
    models: list[Item] = Field(min_length=1)
    evals: EvalSpec = EvalSpec()
    output: Path = Path("leaderboard")
    executor: ExecutorSpec = ExecutorSpec()
    model_cards: bool = False

    @model_validator(mode="after")
    def _no_eval_output(self) -> LeaderboardSpec:
        if self.evals.output is not None:
            raise ValueError("evals.output: a leaderboard keeps each model's results under its own output")
        return self


def _relative_to(base: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Local paths in the spec, resolved against the spec's folder."""

    def fix(item: Any) -> Any:
        if isinstance(item, dict) and isinstance(item.get("recipe"), str) and not Path(item["recipe"]).is_absolute():
            return {**item, "recipe": str(base / item["recipe"])}
        return relative_model_ref(base, item)

    data = dict(data)
    if isinstance(data.get("models"), list):
        data["models"] = [fix(item) for item in data["models"]]
    if isinstance(data.get("output"), str) and not Path(data["output"]).is_absolute():
        data["output"] = str(base / data["output"])
    evals = data.get("evals")
    if isinstance(evals, dict):
        for key in ("data_dir", "include_path"):  # include_path: the user's own task YAMLs
            if isinstance(evals.get(key), str) and not Path(evals[key]).is_absolute():
                evals = {**evals, key: str(base / evals[key])}
        data["evals"] = evals
    return data


def parse_leaderboard_spec(text: str, source: str = "<leaderboard>", base_dir: Path | None = None) -> LeaderboardSpec:
    """Validate spec YAML text; relative paths resolve against ``base_dir`` (default: cwd)."""
    return validate_yaml(
        text, LeaderboardSpec, source, error=LeaderboardError,
        not_a_mapping="a leaderboard spec must be a YAML mapping with models (and evals)",
        prepare=None if base_dir is None else (lambda data: _relative_to(base_dir, data)),
    )


def load_leaderboard_spec(path: Path) -> LeaderboardSpec:
    """Read and validate a spec file; its relative paths resolve against its folder."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise LeaderboardError(f"{path}: cannot read leaderboard spec ({exc.strerror or exc})") from None
    return parse_leaderboard_spec(text, str(path), base_dir=path.resolve().parent)
