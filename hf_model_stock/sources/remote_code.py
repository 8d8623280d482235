"""Custom-code models: the Python files a config's ``auto_map`` names (transformers' remote code).

A config such as ``{"auto_map": {"AutoModelForCausalLM": "modeling_x.XForCausalLM"}}`` tells
transformers to import ``modeling_x.py`` from the model's folder, and only with
the trust_remote_code flag. A merge of such a model must carry those files (and the modules they
import relatively, ``from .configuration_x import ...``) into its output; an ``auto_map`` entry of
the form ``org/repo--module.Class`` points at another repo's code and needs no file here.

>>> auto_map_modules({"AutoConfig": "configuration_x.XConfig", "AutoTokenizer": ["tok_x.XTok", None]})
['configuration_x', 'tok_x']
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from hf_model_stock.errors import SourceError

CODE_CONFIGS = ("config.json", "tokenizer_config.json")  # files whose auto_map names code
RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import", flags=re.MULTILINE)  # as transformers finds them


def auto_map_modules(auto_map: Any) -> list[str]:
    """The local module names an ``auto_map`` value refers to (sorted; other repos' code left out)."""
    refs: list[str] = []
    for value in (auto_map or {}).values() if isinstance(auto_map, dict) else []:
        refs += [v for v in (value if isinstance(value, (list, tuple)) else [value]) if isinstance(v, str)]
    return sorted({ref.rsplit(".", 1)[0] for ref in refs if "--" not in ref and "." in ref})


def read_auto_map(path: Path) -> dict[str, Any]:
    """The ``auto_map`` of a JSON config file ({} when the file or the key is absent)."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: unreadable JSON ({exc})") from None
    auto_map = data.get("auto_map") if isinstance(data, dict) else None
    return auto_map if isinstance(auto_map, dict) else {}


def has_custom_code(directory: Path) -> bool:
    """Whether ``directory``'s config.json or tokenizer_config.json maps an Auto class to code."""
    return any(read_auto_map(directory / name) for name in CODE_CONFIGS)


def code_files(directory: Path, configs: tuple[str, ...] = CODE_CONFIGS) -> list[str]:
    """The ``*.py`` files of ``directory`` that ``configs``' auto_map names, with the modules they import
    relatively (recursively). A named module that is missing raises ``SourceError`` naming the key."""
    wanted: list[tuple[str, str]] = []  # (module, where it was named)
    for name in configs:
        wanted += [(m, f"{directory / name}: auto_map") for m in auto_map_modules(read_auto_map(directory / name))]
    found: list[str] = []
    while wanted:
        module, named_by = wanted.pop(0)
        file = f"{module.replace('.', '/')}.py"
        if file in found:
            continue
        if not (directory / file).is_file():
            raise SourceError(f"{named_by} names {module}, but {directory / file} does not exist")
        found.append(file)
        source = (directory / file).read_text(encoding="utf-8", errors="replace")
        wanted += [(m, f"{directory / file}: from .{m} import") for m in RELATIVE_IMPORT.findall(source)]
    return sorted(found)


def copy_code_files(config_dir: Path, tokenizer_dir: Path, dest: Path) -> list[str]:
    """Copy into ``dest`` the code config.json's auto_map needs (from ``config_dir``, the base) and the
    code tokenizer_config.json's needs (from ``tokenizer_dir``); returns the file names copied."""
    copied = []
    for source, configs in ((config_dir, ("config.json",)), (tokenizer_dir, ("tokenizer_config.json",))):
        for file in code_files(source, configs):
            (dest / file).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / file, dest / file)
            copied.append(file)
    return sorted(set(copied))
