"""Offline data: find each benchmark's local files (official schemas, as jsonl, json, parquet or csv).

Layout under ``--data-dir``: ``<task>/<split>.<ext>``, and for MATH one directory per subject,
``math/<subject>/test.<ext>`` (the subject names of the official MATH release: algebra, geometry, ...).
Without ``--data-dir`` a benchmark reads real data shipped on PyPI when that package is installed
(GSM8K test, HarmBench behaviors), else lm-eval's own data set from the Hub.
With ``--data-dir`` the Hub is never used: a benchmark missing there must have packaged data.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from hf_model_stock.evaluation.errors import EvalError
from hf_model_stock.evaluation.tasks import Benchmark, Split

LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class TaskData:
    """A benchmark's data: ``files[subset][split]`` (subset ``""`` when there is none), or empty for
    lm-eval's own Hub data set."""

    benchmark: str
    files: dict[str, dict[str, Path]] = field(default_factory=dict)

    @property
    def loader(self) -> str:
        """The ``datasets`` builder for the files (json, parquet or csv)."""
        loaders = {LOADERS[p.suffix] for splits in self.files.values() for p in splits.values()}
        if len(loaders) != 1:
            raise EvalError(f"{self.benchmark}: data files mix formats ({', '.join(sorted(loaders))}); use one")
        return loaders.pop()

    def describe(self) -> str:
        """Where the data comes from, for the summary: the test file(s) or 'hub'."""
        tests = sorted({str(splits["test"].resolve()) for splits in self.files.values()})
        if not tests:
            return "hub"
        return tests[0] if len(tests) == 1 else f"{Path(tests[0]).parent.parent} ({len(tests)} subsets)"


def find_split(directory: Path, split: str) -> Path | None:
    """``directory/<split>.<ext>`` for the one supported extension present, else None."""
    found = [directory / f"{split}{ext}" for ext in LOADERS if (directory / f"{split}{ext}").is_file()]
    if len(found) > 1:
        names = ", ".join(path.name for path in found)
        raise EvalError(f"{directory}: several files for split {split!r} ({names}); keep one")
    return found[0] if found else None


def packaged_file(split: Split) -> Path | None:
    """The split's file inside its installed PyPI package (located without importing it), or None."""
    if split.package is None:
        return None
    package, relative = split.package
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    return path if path.is_file() else None


def resolve_data(benchmark: Benchmark, data_dir: Path | None, subsets: Sequence[str] = ()) -> TaskData:
    """Where ``benchmark`` reads its data from; ``subsets`` are the subject directories of a
    per-subset benchmark (MATH)."""
    if data_dir is not None:
        if not data_dir.is_dir():
            raise EvalError(f"--data-dir {data_dir}: no such directory")
        root = data_dir / benchmark.name
        if root.is_dir():
            return TaskData(benchmark.name, _local_files(benchmark, root, subsets))
    packaged = _packaged_files(benchmark)
    if packaged:
        return TaskData(benchmark.name, {"": packaged})
    if data_dir is not None:
        raise EvalError(f"{benchmark.name}: no data under {data_dir / benchmark.name} "
                        f"(expected {_expected(data_dir / benchmark.name, subsets, 'test')})")
    return TaskData(benchmark.name)


def _local_files(benchmark: Benchmark, root: Path, subsets: Sequence[str]) -> dict[str, dict[str, Path]]:
    files: dict[str, dict[str, Path]] = {}
    for subset in (subsets if benchmark.per_subset else [""]):
        directory = root / subset if subset else root
        splits: dict[str, Path] = {}
        for split in benchmark.splits:
            path = find_split(directory, split.name) or split.fallback
            if path is None:
                raise EvalError(f"{benchmark.name}: missing {_expected(directory, [], split.name)}")
            splits[split.name] = path
        files[subset] = splits
    return files


def _packaged_files(benchmark: Benchmark) -> dict[str, Path]:
    splits: dict[str, Path] = {}
    for split in benchmark.splits:
        path = packaged_file(split) or (split.fallback if split.package is None else None)
        if path is None:
            return {}
        splits[split.name] = path
    return splits


def _expected(directory: Path, subsets: Sequence[str], split: str) -> str:
    where = directory / "<subject>" if subsets else directory
    return f"{where}/{split}.jsonl (or .json, .parquet, .csv)"
