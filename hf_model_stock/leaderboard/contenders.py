"""The models a leaderboard compares: spec entries expanded (a recipe gives its base, its fine-tunes and
its merged output), the same model listed twice counted once, each with a display name and roles."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from hf_model_stock.errors import LeaderboardError, ModelStockError
from hf_model_stock.leaderboard.spec import LeaderboardSpec
from hf_model_stock.recipe import ModelEntry, Recipe, load_recipe
from hf_model_stock.sources.resolve import is_local

BASE, FINE_TUNE, MODEL = "base", "fine-tune", "model"


def merge_role(method: str) -> str:
    """The role of a recipe's merged output, e.g. ``merge:model_stock``."""
    return f"merge:{method}"


@dataclass
class Contender:
    """One row of the leaderboard. ``ref`` is what the evaluation loads (a local directory or
    ``org/name[@rev]``); ``recipe`` builds ``ref`` when it is a merge that does not exist yet."""

    name: str
    ref: str
    roles: list[str] = field(default_factory=list)
    recipe: Recipe | None = None
    recipe_path: Path | None = None

    @property
    def is_local(self) -> bool:
        return is_local(ModelEntry.model_validate(self.ref)) or self.recipe is not None


def _key(entry: ModelEntry) -> str:
    if is_local(entry):
        return str(Path(entry.model).expanduser().resolve())
    return entry.label


def _default_name(entry: ModelEntry) -> str:
    return Path(entry.model).expanduser().resolve().name if is_local(entry) else entry.label


def expand(spec: LeaderboardSpec) -> list[Contender]:
    """The spec's contenders in order of first mention; recipes contribute base, fine-tunes, merge."""
    found: dict[str, Contender] = {}

    def add(entry: ModelEntry, role: str, name: str | None = None, recipe: Recipe | None = None,
            recipe_path: Path | None = None) -> None:
        key = _key(entry)
        contender = found.get(key)
        if contender is None:
            contender = found[key] = Contender(name or _default_name(entry), key if is_local(entry) else entry.label)
        if role not in contender.roles:
            contender.roles.append(role)
        if name:
            contender.name = name
        if recipe is not None:
            contender.recipe, contender.recipe_path = recipe, recipe_path

    for i, item in enumerate(spec.models):
        if item.recipe is None:
            add(item.entry(), MODEL, item.name)
            continue
        try:
            recipe = load_recipe(item.recipe)
        except ModelStockError as exc:
            raise LeaderboardError(f"models[{i}].recipe: {exc}") from None
        if not recipe.output.path:
            raise LeaderboardError(f"models[{i}].recipe: {item.recipe} has no output.path; the leaderboard "
                                   "evaluates the merged directory")
        add(recipe.base_model, BASE)
        for model in recipe.models:
            add(model, FINE_TUNE)
        merged = Path(recipe.output.path).expanduser().resolve()
        add(ModelEntry(model=str(merged)), merge_role(recipe.method), merged.name, recipe, item.recipe)
    contenders = list(found.values())
    _unique_names(contenders)
    return contenders


def _unique_names(contenders: list[Contender]) -> None:
    """Suffix ``#2``, ``#3``... to display names that would otherwise repeat."""
    seen: dict[str, int] = {}
    for contender in contenders:
        count = seen.get(contender.name, 0) + 1
        seen[contender.name] = count
        if count > 1:
            contender.name = f"{contender.name} #{count}"


def slug(name: str) -> str:
    """A file-name-safe form of a display name."""
    return re.sub(r"[^\w.@-]+", "_", name).strip("_") or "model"
