"""YAML documents validated by a pydantic model, with errors that name the key and its line.

Shared by recipes and leaderboard specs: ``validate_yaml`` parses the text, lets the caller adjust
the raw mapping (e.g. resolve relative paths), validates, and turns the first validation error into
one line such as ``recipe.yaml:5: models[1].revison: unknown key``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from hf_model_stock.errors import ModelStockError

M = TypeVar("M", bound=BaseModel)


def validate_yaml(
    text: str,
    model: type[M],
    source: str,
    *,
    error: type[ModelStockError],
    not_a_mapping: str,
    prepare: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    with_lines: bool = True,
) -> M:
    """``model`` validated from the YAML mapping in ``text``; problems raise ``error`` in one line
    (``not_a_mapping`` when the document is not a mapping). ``prepare`` may rewrite the raw mapping
    before validation; lines are cited unless ``with_lines`` is False (text we generated)."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        raise error(f"{where}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise error(f"{source}: {not_a_mapping}")
    lines = _line_map(root) if root is not None else {}
    if prepare is not None:
        data = prepare(data)
    return validate_mapping(data, model, source, error=error, lines=lines if with_lines else None)


def validate_mapping(data: dict[str, Any], model: type[M], source: str, *, error: type[ModelStockError],
                     lines: dict | None = None) -> M:
    """``model`` validated from ``data``; the first problem raises ``error`` in one line naming the key
    (and its line, given the document's ``lines``)."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(_describe(exc, source, lines)) from None


def _describe(exc: ValidationError, source: str, lines: dict | None) -> str:
    err = exc.errors()[0]
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    key = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in loc).replace(".[", "[")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    elif err["type"] == "missing":
        msg = "required key is missing"
    line = _line_of(lines, loc or _loc_from_message(msg)) if lines is not None else None
    where = f"{source}:{line}" if line else source
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    prefix = f"{key}: " if key and not msg.startswith(key.split("[")[0]) else ""
    return f"{where}: {prefix}{msg}{more}"


def _line_map(node: yaml.Node, path: tuple[Any, ...] = (), out: dict | None = None) -> dict:
    """Map each key path in the YAML document to the (1-based) line it starts on."""
    out = {} if out is None else out
    out[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            out[path + (key.value,)] = key.start_mark.line + 1
            _line_map(value, path + (key.value,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _line_map(item, path + (i,), out)
    return out


def _line_of(lines: dict, loc: tuple[Any, ...]) -> int | None:
    while loc:
        if loc in lines:
            return lines[loc]
        loc = loc[:-1]
    return None


def _loc_from_message(msg: str) -> tuple[Any, ...]:
    """Key path named at the start of a cross-field error such as ``models[1]: ...``."""
    m = re.match(r"^([A-Za-z_][\w.\[\]]*):", msg)
    if not m:
        return ()
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"[.\[\]]+", m.group(1)) if p)
