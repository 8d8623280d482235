"""What ``hf-model-stock run`` is given -> a ``Recipe``: our recipe file, a mergekit config, or a
published merge (a model directory or a Hub repo ``org/name[@rev]``) whose ``mergekit_config.yml`` or
model card holds its mergekit config.

From the Hub only the config, or failing that the card, is fetched (``hub.listing.download_if_present`` of
that one file: no weights of the published merge); the sources it names are resolved by the run like any
recipe's. Cards are read in mergekit's layout (a ```yaml block after "The following YAML configuration
was used to produce this model") and LazyMergekit's (a ```yaml block under a "Configuration" heading).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import yaml

from hf_model_stock.errors import RecipeError, SourceError
from hf_model_stock.hub.listing import download_if_present, is_offline
from hf_model_stock.mergekit.translate import LAYER_KEYS, is_mergekit_config, translate
from hf_model_stock.recipe import ModelEntry, Recipe, load_recipe, split_revision
from hf_model_stock.sources.resolve import (
    SNAPSHOT_COMMIT,
    check_repo_id,
    hf_cache_snapshot,
    is_local,
    read_json_object,
)

logger = logging.getLogger(__name__)

CONFIG_NAMES = ("mergekit_config.yml",)  # what mergekit writes beside a merge
CARD_NAME = "README.md"
CARD_MARKER = "The following YAML configuration was used to produce this model"
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s.*\bconfiguration\b", re.IGNORECASE)
_FENCE = re.compile(r"^\s{0,3}(```|~~~)\s*([\w-]*)\s*$")


def config_in_card(text: str) -> dict[str, Any] | None:
    """The mergekit config in a model card: the first ```yaml block after mergekit's sentence or under a
    "Configuration" heading that holds a mapping with ``merge_method``; None if there is none."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if CARD_MARKER in line or _HEADING.match(line)]
    for start in starts:
        block = _next_block(lines, start + 1)
        if block is None:
            continue
        try:
            data = yaml.safe_load(block)
        except yaml.YAMLError:
            continue
        if is_mergekit_config(data):
            return data
    return None


def _next_block(lines: list[str], start: int) -> str | None:
    """The text of the first fenced yaml (or unlabelled) code block at or after line ``start``."""
    for i in range(start, len(lines)):
        m = _FENCE.match(lines[i])
        if m is None:
            continue
        if m.group(2).lower() not in ("", "yaml", "yml"):
            return None
        for j in range(i + 1, len(lines)):
            if lines[j].strip().startswith(m.group(1)):
                return "\n".join(lines[i + 1:j])
        return None
    return None


def _read_config(path: Path, label: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise RecipeError(f"{label}: cannot read ({exc.strerror or exc})") from None
    if path.name == CARD_NAME:
        data = config_in_card(text)
        if data is None:
            raise RecipeError(f"{label}: no mergekit configuration in the card (a ```yaml block after "
                              f"'{CARD_MARKER}' or under a 'Configuration' heading)")
        return data
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{label}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not is_mergekit_config(data):
        raise RecipeError(f"{label}: not a mergekit configuration (no merge_method)")
    return data


def config_file_in(directory: Path) -> Path:
    """The file of a model directory that holds its mergekit config: mergekit_config.yml, else README.md."""
    for name in (*CONFIG_NAMES, CARD_NAME):
        if (directory / name).is_file():
            return directory / name
    raise RecipeError(f"{directory}: not a recipe, and no mergekit_config.yml or README.md (a published merge's "
                      "mergekit configuration) in it")


def fetch_published(repo_id: str, revision: str | None) -> tuple[Path, str | None]:
    """Download the published merge's mergekit_config.yml, or its README.md when it has none (that one
    file; never its weights). Returns the local file and the commit it came from."""
    entry = ModelEntry(model=repo_id, revision=revision)
    check_repo_id(entry)
    for name in (*CONFIG_NAMES, CARD_NAME):
        path = download_if_present(repo_id, name, revision, entry.label)
        if path is not None:
            commit = path.parent.name if SNAPSHOT_COMMIT.fullmatch(path.parent.name) else None
            return path, commit
    if is_offline():
        raise SourceError(f"{entry.label}: not in the local cache and the Hub is offline (HF_HUB_OFFLINE)")
    raise SourceError(f"{entry.label}: neither {CONFIG_NAMES[0]} nor {CARD_NAME} in the repo (no mergekit configuration)")


def layer_count(entry: ModelEntry) -> int:
    """A model's number of layers from its config.json (``num_hidden_layers``; a multimodal model's
    ``text_config``), downloaded alone for a Hub model."""
    if is_local(entry):
        path: Path | None = Path(entry.model).expanduser() / "config.json"
        if path is None or not path.is_file():
            raise SourceError(f"{entry.label}: no config.json (to check a slice's layer_range against)")
    else:
        check_repo_id(entry)
        path = download_if_present(entry.model, "config.json", entry.revision, entry.label)
        if path is None:
            raise SourceError(f"{entry.label}: no config.json in the repo (to check a slice's layer_range against)")
    config = read_json_object(path)
    for scope in (config, config.get("text_config") or {}):
        for key in LAYER_KEYS:
            if isinstance(scope.get(key), int):
                return int(scope[key])
    raise SourceError(f"{entry.label}: config.json has no num_hidden_layers (to check a slice's layer_range against)")


def load_run_target(target: Path | str) -> Recipe:
    """What ``run`` was given, as a recipe: our recipe file, a mergekit config (a YAML file with
    ``merge_method``), a published merge's directory, or a Hub repo ``org/name[@rev]`` of one.
    Translation warnings are logged once (they are also the recipe's ``origin.notes``)."""
    path = Path(target).expanduser()
    reruns: str | None = None
    if path.is_file():
        if not _looks_like_mergekit(path):
            return load_recipe(path)
        file, label = path, str(target)
    elif path.is_dir():
        file = config_file_in(path)
        snapshot = hf_cache_snapshot(path.resolve())
        reruns = f"{snapshot[0]}@{snapshot[1]}" if snapshot else str(path.resolve())
        label = f"{reruns if snapshot else path}/{file.name}"
    else:
        ref = split_revision(str(target))
        if str(target).count("/") != 1 or str(target).startswith((".", "/", "~")):
            return load_recipe(path)  # neither a file nor a Hub id: the recipe loader's "cannot read" line
        file, commit = fetch_published(str(ref["model"]), ref["revision"])
        reruns = f"{ref['model']}@{commit or ref['revision'] or 'main'}"
        label = f"{reruns}/{file.name}"
    result = translate(_read_config(file, label), label, layers=layer_count,
                       base_dir=None if reruns and not path.exists() else file.resolve().parent, reruns=reruns)
    for warning in result.warnings:
        logger.warning("warning: %s", warning)
    return result.recipe


def _looks_like_mergekit(path: Path) -> bool:
    """Whether a YAML file is a mergekit config (unreadable or invalid files go to the recipe loader,
    which reports them)."""
    try:
        return is_mergekit_config(yaml.safe_load(path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
