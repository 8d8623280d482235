"""The output directory: written under a partial name beside its destination and renamed into
place only once complete, so a half-written merge never looks like a valid model."""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from filelock import FileLock, Timeout

from hf_model_stock.errors import ModelStockError
from hf_model_stock.io.dtypes import CONFIG_DTYPE_NAMES

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
TEMP_MARKER = ".hfms-tmp-"
PARTIAL_MARKER = ".hfms-partial-"

logger = logging.getLogger(__name__)


def check_destination(out_dir: Path, overwrite: bool) -> None:
    """Fail early if the output exists (without ``overwrite``) or its parent is not writable."""
    if out_dir.exists() and not overwrite:
        raise ModelStockError(f"{out_dir}: output directory exists (pass --overwrite to replace it)")
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelStockError(f"{out_dir}: output path exists and is not a directory")
    parent = out_dir.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise ModelStockError(f"{parent}: cannot create output parent ({exc.strerror or exc})") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ModelStockError(f"{parent}: output location is not writable")


def partial_dir(out_dir: Path) -> Path:
    """Where the output is written before the final rename: beside ``out_dir`` (same filesystem, so
    the rename is atomic), under a fixed name so that ``--resume`` finds it after an interruption."""
    return out_dir.parent / f"{PARTIAL_MARKER}{out_dir.name}"


class OutputLock:
    """The lock of one output's partial directory, held by the merge writing it: a lock file beside
    it (``filelock``: ``flock`` on POSIX, ``msvcrt.locking`` on Windows), removed on ``release``."""

    def __init__(self, partial: Path):
        self.path = partial.parent / f"{partial.name}.lock"
        self._lock = FileLock(self.path, timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            raise ModelStockError(f"{partial}: another merge is writing this output") from None
        except OSError as exc:
            raise ModelStockError(f"{partial.parent}: cannot create output ({exc.strerror or exc})") from None

    def release(self) -> None:
        """Let go of the lock and remove its file (removed while still held, so that no other merge
        ever locks a file that is no longer the lock's path; Windows removes it on release)."""
        if self._lock.is_locked:
            try:
                self.path.unlink()
            except OSError:
                pass
            self._lock.release()


def claim_partial(out_dir: Path, resume: bool) -> tuple[Path, OutputLock, bool]:
    """The partial output directory of ``out_dir``, locked by this process while it lives: returns
    its path, the lock (``release`` it when done) and whether it holds an interrupted merge to
    resume. Without ``resume`` a leftover partial output is removed, and said so."""
    path = partial_dir(out_dir)
    lock = OutputLock(path)
    try:
        if path.is_dir():
            if resume:
                return path, lock, True
            logger.warning("removed the partial output of an interrupted merge, %s (--resume would continue it)",
                           path)
            shutil.rmtree(path, ignore_errors=True)
        elif resume:
            logger.warning("--resume: no partial output at %s; merging from the start", path)
        try:
            path.mkdir()
        except FileExistsError:
            raise ModelStockError(f"{path}: another merge is writing this output") from None
        except OSError as exc:
            raise ModelStockError(f"{out_dir.parent}: cannot create output ({exc.strerror or exc})") from None
    except BaseException:
        lock.release()
        raise
    return path, lock, False


def commit_dir(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Move the finished ``tmp`` to ``out_dir``; an existing output is replaced only with ``overwrite``."""
    if out_dir.exists():
        if not overwrite:
            raise ModelStockError(f"{out_dir}: output directory exists (pass --overwrite to replace it)")
        old = out_dir.parent / f"{TEMP_MARKER}old-{out_dir.name}-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
        os.rename(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def remove_dir(path: Path | None) -> None:
    if path is not None:
        shutil.rmtree(path, ignore_errors=True)


def write_config(base_dir: Path, dest: Path, out_dtype: str | None) -> None:
    """Copy config.json (dtype updated to the output's) and generation_config.json from the base."""
    config_path = base_dir / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if out_dtype in CONFIG_DTYPE_NAMES:
            name = CONFIG_DTYPE_NAMES[out_dtype]
            keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["torch_dtype"]
            for key in keys:
                config[key] = name
        (dest / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    gen = base_dir / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, dest / "generation_config.json")


def copy_tokenizer(source_dir: Path, dest: Path) -> list[str]:
    """Copy the tokenizer files present in ``source_dir``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (source_dir / name).is_file():
            shutil.copyfile(source_dir / name, dest / name)
            copied.append(name)
    return copied
