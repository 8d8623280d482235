"""Model sources: a local directory or a Hub repo ``org/name[@revision]`` -> a local snapshot.

Hub downloads go through ``huggingface_hub.snapshot_download`` (its cache, ``HF_HUB_OFFLINE``,
``HF_TOKEN``/login and ``HF_ENDPOINT`` all apply) and fetch only what a merge needs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from hf_model_stock.errors import SourceError
from hf_model_stock.recipe import ModelEntry

# What a merge reads or carries over: weights, their index, configs and tokenizer files.
MERGE_FILE_PATTERNS = [
    "*.safetensors",
    "model.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "*.model",
    "chat_template.jinja",
    "chat_template.json",
]


@dataclass(frozen=True)
class ResolvedModel:
    """A model available on local disk, with where it came from."""

    entry: ModelEntry
    path: Path
    repo_id: Optional[str] = None
    commit: Optional[str] = None

    @property
    def label(self) -> str:
        return self.entry.label

    def config(self) -> dict[str, Any]:
        """The model's ``config.json`` as a dict ({} if it has none)."""
        path = self.path / "config.json"
        if not path.is_file():
            return {}
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise SourceError(f"{path}: unreadable config.json ({exc})") from None
        if not isinstance(data, dict):
            raise SourceError(f"{path}: config.json is not a JSON object")
        return data


def is_local(entry: ModelEntry) -> bool:
    """A source is local when the path exists (Hub ids never name an existing path)."""
    return Path(entry.model).expanduser().exists()


def resolve(entry: ModelEntry, *, allow_patterns: Optional[list[str]] = None) -> ResolvedModel:
    """Return a local snapshot of ``entry``, downloading from the Hub if it is not a local path.

    >>> resolve(ModelEntry(model="Qwen/Qwen2.5-0.5B", revision="main"))  # doctest: +SKIP
    """
    if is_local(entry):
        path = Path(entry.model).expanduser().resolve()
        if entry.revision:
            raise SourceError(f"{entry.model}: a local path cannot take a revision ({entry.revision!r})")
        return ResolvedModel(entry=entry, path=path)
    if entry.model.count("/") != 1 or entry.model.startswith((".", "/", "~")):
        raise SourceError(f"{entry.model}: no such local directory, and not a Hub repo id (org/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        path = Path(
            snapshot_download(
                entry.model,
                revision=entry.revision,
                allow_patterns=allow_patterns or MERGE_FILE_PATTERNS,
            )
        )
    except RepositoryNotFoundError:
        raise SourceError(f"{entry.label}: repository not found on the Hub (or it is private: log in)") from None
    except LocalEntryNotFoundError:
        raise SourceError(f"{entry.label}: not in the local cache and the Hub is offline (HF_HUB_OFFLINE)") from None
    except (HfHubHTTPError, OSError) as exc:
        raise SourceError(f"{entry.label}: download failed ({str(exc).splitlines()[0]})") from None
    return ResolvedModel(entry=entry, path=path, repo_id=entry.model, commit=path.name)
