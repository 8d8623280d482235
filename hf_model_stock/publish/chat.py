"""Chat template, special tokens and generation config that agree with the tokenizer the merge carries.

The tokenizer files come from the tokenizer source (``tokenizer_source``, default the base); so do
``generation_config.json`` and the special-token ids of ``config.json`` (where that source has them;
the architecture keys stay the base's). The chat template is the recipe's ``chat_template``:

- unset: the tokenizer source's own template; if it has none, the first fine-tune that has one
  (a base without a template merged with instruct fine-tunes still chats), said in the report;
- ``base`` or a model of the recipe: that model's template;
- a file: its text; anything else with ``{{`` or ``{%``: inline Jinja.

A template taken from a model brings that model's end-of-turn tokens: its ``eos_token`` becomes the
merged tokenizer's, and its generation config's ``eos_token_id`` (mapped by token string, not id,
through the two tokenizers) joins the merged generation config's, so that generation stops where the
template ends a turn. A token the merged tokenizer lacks is an error naming it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hf_model_stock.errors import ModelStockError
from hf_model_stock.sources.vocab import token_ids as vocabulary

TEMPLATE_FILE = "chat_template.jinja"
LEGACY_TEMPLATE_FILE = "chat_template.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_MAP = "special_tokens_map.json"
GENERATION_CONFIG = "generation_config.json"
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


@dataclass
class ChatSetup:
    """What the merged model's chat and special tokens came from (for the report's notes)."""

    notes: list[str] = field(default_factory=list)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelStockError(f"{path}: unreadable JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    sort = path.name == "config.json"  # as output_dir.write_config writes it
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=sort) + "\n", encoding="utf-8")


def read_template(directory: Path) -> str | None:
    """A model directory's chat template: chat_template.jinja, chat_template.json or tokenizer_config.json
    (the default of a list of named templates)."""
    if (directory / TEMPLATE_FILE).is_file():
        return (directory / TEMPLATE_FILE).read_text(encoding="utf-8")
    for name in (LEGACY_TEMPLATE_FILE, TOKENIZER_CONFIG):
        if (directory / name).is_file():
            found = _json(directory / name).get("chat_template")
            if isinstance(found, list):
                found = next((t.get("template") for t in found if isinstance(t, dict) and t.get("name") == "default"),
                             None)
            if isinstance(found, str) and found:
                return found
    return None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def add_union_tokens(out: Path, entries: Sequence[Mapping[str, Any]]) -> None:
    """``tokenizer_source: union``: append the other models' tokens to the output's tokenizer.json (and
    to tokenizer_config.json's ``added_tokens_decoder`` where it has one)."""
    if not entries:
        return
    path = out / "tokenizer.json"
    data = _json(path)
    data["added_tokens"] = [*(data.get("added_tokens") or []), *entries]
    path.write_text(json.dumps(data, ensure_ascii=False) + "\n", encoding="utf-8")
    if (out / TOKENIZER_CONFIG).is_file():
        config = _json(out / TOKENIZER_CONFIG)
        if isinstance(config.get("added_tokens_decoder"), dict):
            for e in entries:
                config["added_tokens_decoder"][str(e["id"])] = {k: v for k, v in e.items() if k != "id"}
            _write_json(out / TOKENIZER_CONFIG, config)


def _ids(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value] if isinstance(value, list) else []


def template_source(spec: str | None, tokenizer_dir: Path, base: tuple[str, Path],
                    models: Sequence[tuple[str, Path]]) -> tuple[str | None, str, Path | None]:
    """(template text, where it came from, the model directory it came from, if one) for ``spec``."""
    if spec is None:
        own = read_template(tokenizer_dir)
        if own is not None:
            return own, "the tokenizer source", tokenizer_dir
        for label, path in models:
            found = read_template(path)
            if found is not None:
                return found, label, path
        return None, "none (no model has one)", None
    named = {"base": base, **{label: (label, path) for label, path in models}}
    if spec in named:
        label, path = named[spec]
        found = read_template(path)
        if found is None:
            raise ModelStockError(f"chat_template: {spec}: {label} has no chat template")
        return found, label, path
    if "{{" in spec or "{%" in spec:
        return spec, "the recipe (inline)", None
    file = Path(spec).expanduser()
    if file.is_file():
        return file.read_text(encoding="utf-8"), str(file), None
    raise ModelStockError(f"chat_template: {spec!r} is neither 'base', a model of the recipe, a file nor Jinja")


def finish_tokenizer(out: Path, *, base: tuple[str, Path], models: Sequence[tuple[str, Path]], tokenizer_dir: Path,
                     spec: str | None) -> ChatSetup:
    """Make the output's generation config, config.json token ids, chat template and special tokens
    agree with its tokenizer (see the module docstring). Runs after the tokenizer files are copied."""
    setup = ChatSetup()
    base_dir = base[1]
    from_tokenizer = tokenizer_dir.resolve() != base_dir.resolve()
    if from_tokenizer:
        _ids_from_tokenizer_source(out, tokenizer_dir, setup)
    template, origin, template_dir = template_source(spec, tokenizer_dir, base, models)
    if template is None:
        return setup
    own = read_template(tokenizer_dir)
    if own == template and (template_dir is None or template_dir.resolve() == tokenizer_dir.resolve()):
        return setup  # the tokenizer files already carry it
    _write_template(out, template)
    reason = " (the tokenizer source has none)" if spec is None and template_dir is not None else ""
    setup.notes.append(f"chat template from {origin}{reason}")
    if template_dir is not None and template_dir.resolve() != tokenizer_dir.resolve():
        _stop_tokens_from(out, template_dir, origin, setup)
    return setup


def _ids_from_tokenizer_source(out: Path, tokenizer_dir: Path, setup: ChatSetup) -> None:
    """generation_config.json and config.json's special-token ids from the tokenizer source."""
    if (tokenizer_dir / GENERATION_CONFIG).is_file():
        shutil.copyfile(tokenizer_dir / GENERATION_CONFIG, out / GENERATION_CONFIG)
        setup.notes.append(f"{GENERATION_CONFIG} from the tokenizer source")
    source_config = tokenizer_dir / "config.json"
    if (out / "config.json").is_file() and source_config.is_file():
        theirs = _json(source_config)
        config = _json(out / "config.json")
        changed = {k: theirs[k] for k in TOKEN_ID_KEYS if k in theirs and theirs[k] != config.get(k)}
        if changed:
            config.update(changed)
            _write_json(out / "config.json", config)
            setup.notes.append("config.json " + ", ".join(f"{k} {v}" for k, v in changed.items())
                               + " from the tokenizer source")


def _write_template(out: Path, template: str) -> None:
    """The template as chat_template.jinja, the only one the output carries."""
    (out / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    (out / LEGACY_TEMPLATE_FILE).unlink(missing_ok=True)
    if (out / TOKENIZER_CONFIG).is_file():
        config = _json(out / TOKENIZER_CONFIG)
        if config.pop("chat_template", None) is not None:
            _write_json(out / TOKENIZER_CONFIG, config)


def _stop_tokens_from(out: Path, source: Path, origin: str, setup: ChatSetup) -> None:
    """The template source's eos token becomes the output tokenizer's; its generation config's eos ids
    (mapped by token string) join the output's generation config; config.json's eos id follows."""
    ours, theirs = vocabulary(out), vocabulary(source)
    source_cfg = _json(source / TOKENIZER_CONFIG) if (source / TOKENIZER_CONFIG).is_file() else {}
    eos = _token_text(source_cfg.get("eos_token"))
    stops: list[str] = [eos] if eos else []
    if theirs is not None and (source / GENERATION_CONFIG).is_file():
        by_id = {v: k for k, v in theirs.items()}
        for i in _ids(_json(source / GENERATION_CONFIG).get("eos_token_id")):
            if i in by_id and by_id[i] not in stops:
                stops.append(by_id[i])
    if not stops:
        return
    if ours is None:
        setup.notes.append(f"stop tokens of {origin} not checked: the merged tokenizer has no tokenizer.json")
        return
    missing = [s for s in stops if s not in ours]
    if missing:
        raise ModelStockError(f"chat_template from {origin}: its stop token(s) {', '.join(map(repr, missing))} are not "
                              "in the merged tokenizer (pick a tokenizer_source that has them)")
    if eos and (out / TOKENIZER_CONFIG).is_file():
        config = _json(out / TOKENIZER_CONFIG)
        if _token_text(config.get("eos_token")) != eos:
            config["eos_token"] = eos
            _write_json(out / TOKENIZER_CONFIG, config)
            if (out / SPECIAL_MAP).is_file():
                special = _json(out / SPECIAL_MAP)
                special["eos_token"] = eos
                _write_json(out / SPECIAL_MAP, special)
            setup.notes.append(f"eos_token {eos!r} from {origin}")
    gen = _json(out / GENERATION_CONFIG) if (out / GENERATION_CONFIG).is_file() else {}
    ids = [ours[s] for s in stops]
    ids += [i for i in _ids(gen.get("eos_token_id")) if i not in ids]
    gen["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    _write_json(out / GENERATION_CONFIG, gen)
    if (out / "config.json").is_file():
        config = _json(out / "config.json")
        config["eos_token_id"] = ids[0] if len(ids) == 1 else ids
        _write_json(out / "config.json", config)
    setup.notes.append(f"generation stops on {', '.join(f'{s!r} ({ours[s]})' for s in stops)}: the stop tokens of {origin}")
