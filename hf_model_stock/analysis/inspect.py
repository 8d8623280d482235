"""``inspect``: how well a set of fine-tunes fits Model Stock's assumptions, per tensor and per layer.

Streams every floating tensor like the merger (headers -> plan -> units ``pread`` into one reusable
buffer) and keeps only the float64 Gram matrix G = D D^T of the deltas of each tensor: delta norms
(sqrt diag G), pairwise cosines and t all follow from it. Grams of a tensor's chunks add up, and so do
the Grams of a layer's tensors (the layer's deltas concatenated), so memory stays bounded by the
chunk size whatever the model.

>>> report = inspect_models("base-dir", ["ft-a", "ft-b", "ft-c"])  # doctest: +SKIP
>>> write_inspect_outputs(report, Path("inspect-out"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hf_model_stock.merge.stats import layer_key, layer_sort_key

if TYPE_CHECKING:  # the merger loads on first use: the command line starts fast
    import numpy as np

    from hf_model_stock.methods.model_stock import ModelStockParams
    from hf_model_stock.recipe import Recipe
    from hf_model_stock.sources.resolve import ResolvedModel

log = logging.getLogger(__name__)

INSPECT_NAME = "inspect.json"


@dataclass(frozen=True)
class Thresholds:
    """When ``inspect`` warns that the paper's assumptions break."""

    cos_spread: float = 0.2  # max - min of the pairwise cosines within one tensor
    min_norm_ratio: float = 0.05  # a delta norm below this fraction of the mean of the others'


@dataclass(frozen=True)
class InspectWarning:
    """One broken assumption on one tensor (``model`` indexes ``InspectReport.models``)."""

    kind: str  # "cos_spread" | "negative_cos" | "near_zero_delta"
    tensor: str
    message: str
    model: int | None = None


@dataclass(frozen=True)
class PairStats:
    """Delta norms and exact pairwise cosines / angles (degrees) from one Gram matrix; a pair with a
    zero delta has no angle (None)."""

    norms: list[float]
    pair_cos: list[float | None]
    angles: list[float | None]


@dataclass(frozen=True)
class TensorRow:
    """One merged (floating) tensor: its pair statistics and the merge's t and mean cosine."""

    name: str
    layer: str
    numel: int
    t: float
    cos: float  # mean pairwise cosine as the merge computes it (eps added, clamped to [-1, 1])
    clamped: bool
    stats: PairStats


@dataclass(frozen=True)
class InspectLayer:
    """One layer: pair statistics of its concatenated deltas and the range of its tensors' t."""

    layer: str
    tensors: int
    stats: PairStats
    t_mean: float
    t_min: float
    t_max: float


@dataclass
class InspectReport:
    """Everything ``inspect`` measured; ``pairs[k]`` names the models of ``pair_cos[k]`` / ``angles[k]``."""

    base: str
    models: list[str]
    params: ModelStockParams
    thresholds: Thresholds
    pairs: list[tuple[int, int]]
    tensors: list[TensorRow]
    layers: list[InspectLayer]
    warnings: list[InspectWarning]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The content of inspect.json."""
        return {"format": "hf-model-stock/inspect", "format_version": 1, **asdict(self)}


def pair_stats(gram: np.ndarray) -> PairStats:
    """Norms and exact (eps 0) pairwise cosines and angles of the deltas behind a float64 Gram."""
    n = gram.shape[0]
    norms = [math.sqrt(max(float(gram[i, i]), 0.0)) for i in range(n)]
    cos: list[float | None] = []
    for i in range(n):
        for j in range(i + 1, n):
            denom = norms[i] * norms[j]
            cos.append(max(-1.0, min(1.0, float(gram[i, j]) / denom)) if denom > 0 else None)
    angles = [None if c is None else math.degrees(math.acos(c)) for c in cos]
    return PairStats(norms=norms, pair_cos=cos, angles=angles)


def check_tensor(row: TensorRow, pairs: list[tuple[int, int]], th: Thresholds) -> list[InspectWarning]:
    """The paper assumes one shared angle between fine-tunes, positive and of comparable size deltas."""
    out = []
    defined = [(p, c) for p, c in zip(pairs, row.stats.pair_cos) if c is not None]
    if len(defined) >= 2:
        lo, hi = min(c for _, c in defined), max(c for _, c in defined)
        if hi - lo > th.cos_spread:
            out.append(InspectWarning("cos_spread", row.name,
                                      f"{row.name}: pairwise cosines range from {lo:.3f} to {hi:.3f} (spread "
                                      f"{hi - lo:.3f} > {th.cos_spread}): no single angle between the fine-tunes"))
    negative = [(p, c) for p, c in defined if c < 0]
    if negative:
        listed = ", ".join(f"{a}-{b}: {c:.3f}" for (a, b), c in negative)
        out.append(InspectWarning("negative_cos", row.name,
                                  f"{row.name}: negative cosine between deltas ({listed}); t = {row.t:.3f}"))
    norms = row.stats.norms
    for i, norm in enumerate(norms):
        others = (sum(norms) - norm) / (len(norms) - 1)
        if others > 0 and norm < th.min_norm_ratio * others:
            out.append(InspectWarning("near_zero_delta", row.name,
                                      f"{row.name}: model {i} moved {norm:.3g}, {norm / others:.3g} of the others' "
                                      f"mean {others:.3g}", model=i))
    return out


def _layer_rows(rows: list[TensorRow], grams: list[np.ndarray]) -> list[InspectLayer]:
    groups: dict[str, list[int]] = {}
    for k, row in enumerate(rows):
        groups.setdefault(row.layer, []).append(k)
    out = []
    for key in sorted(groups, key=layer_sort_key):
        ts = [rows[k].t for k in groups[key]]
        first, *rest = groups[key]
        gram = grams[first].copy()  # the Gram of the layer's concatenated deltas
        for k in rest:
            gram += grams[k]
        out.append(InspectLayer(key, len(ts), pair_stats(gram), sum(ts) / len(ts), min(ts), max(ts)))
    return out


def inspect_resolved(
    base: ResolvedModel,
    models: Sequence[ResolvedModel],
    *,
    params: ModelStockParams | None = None,
    chunk_bytes: int = 128 << 20,
    thresholds: Thresholds = Thresholds(),
    progress: bool = False,
) -> InspectReport:
    """Inspect local snapshots: one streaming pass over every floating tensor, Grams only
    (``params``: the merge's eps and clamping, default the package's)."""
    import numpy as np
    from tqdm.auto import tqdm

    from hf_model_stock.io.buffers import host_buffer
    from hf_model_stock.io.reader import ShardFiles
    from hf_model_stock.merge.compute import UnitCompute
    from hf_model_stock.merge.lowrank import LowRankCompute
    from hf_model_stock.merge.plan import MergeOptions
    from hf_model_stock.merge.units import read_unit, unit_buffer_bytes
    from hf_model_stock.merge.vocab import VocabCompute, read_vocab_unit
    from hf_model_stock.methods.model_stock import ModelStockParams, ratio_from_gram
    from hf_model_stock.pipeline import plan_merge

    params = params or ModelStockParams()
    plan = plan_merge(base, models, MergeOptions(params=params, chunk_bytes=chunk_bytes))
    n = len(models)
    tasks = [t for t in plan.tasks if t.merge]
    compute = UnitCompute(n, 0, "cpu", 0)  # one worker per core, as the merger
    lowrank = LowRankCompute()  # tensors where some fine-tunes are LoRA adapters
    vocab = VocabCompute()  # embedding rows matched by token
    buf = host_buffer(unit_buffer_bytes(plan))
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    rows: list[TensorRow] = []
    grams: list[np.ndarray] = []
    bar = tqdm(total=sum(i.nbytes for t in tasks for i in t.inputs), unit="B", unit_scale=True,
               desc="inspecting", disable=not progress)
    try:
        with ShardFiles() as files:
            for task in tasks:
                gram = np.zeros((n, n))
                for start, stop in task.units():
                    if task.vocab is not None:
                        gram += vocab.gram(task, read_vocab_unit(buf, task, start, stop, files), start, stop)
                        continue
                    views = read_unit(buf, task, start, stop, files)
                    gram += lowrank.gram(task, views, start, stop) if task.deltas else compute.gram(task, views)
                    bar.update((stop - start) * task.in_bytes_per_elem)
                ratio = ratio_from_gram(gram, params)
                rows.append(TensorRow(task.name, layer_key(task.name), task.numel, float(ratio.t), float(ratio.cos),
                                      bool(ratio.clamped), pair_stats(gram)))
                grams.append(gram)
    finally:
        compute.close()
        bar.close()
    notes = list(plan.notes)
    if params.granularity == "filter":
        notes.append("the recipe merges filter-wise; inspect reports layer-wise (per tensor) t")
    return InspectReport(
        base=base.label,
        models=[m.label for m in models],
        params=params,
        thresholds=thresholds,
        pairs=pairs,
        tensors=rows,
        layers=_layer_rows(rows, grams),
        warnings=[w for row in rows for w in check_tensor(row, pairs, thresholds)],
        notes=notes,
    )


def inspect_models(
    base: str | Path,
    models: Sequence[str | Path],
    *,
    chunk_bytes: int = 128 << 20,
    params: ModelStockParams | None = None,
    thresholds: Thresholds = Thresholds(),
    progress: bool = False,
) -> InspectReport:
    """Inspect fine-tunes of ``base`` (local directories or Hub ids ``org/name[@rev]``)."""
    from hf_model_stock.recipe import ModelEntry
    from hf_model_stock.sources.resolve import resolve

    return inspect_resolved(
        resolve(ModelEntry.model_validate(str(base))),
        [resolve(ModelEntry.model_validate(str(m))) for m in models],
        params=params, chunk_bytes=chunk_bytes, thresholds=thresholds, progress=progress,
    )


def inspect_recipe(recipe: Recipe, *, thresholds: Thresholds = Thresholds(), progress: bool = False) -> InspectReport:
    """Inspect the models of a recipe, with its parameters and chunk size."""
    from hf_model_stock.sources.resolve import resolve

    return inspect_resolved(
        resolve(recipe.base_model, allow_pickle=recipe.allow_pickle),
        [resolve(m, allow_pickle=recipe.allow_pickle) for m in recipe.models],
        params=recipe.parameters,
        chunk_bytes=recipe.compute.chunk_size,
        thresholds=thresholds,
        progress=progress,
    )


def write_inspect_outputs(report: InspectReport, out_dir: Path) -> list[Path]:
    """Write inspect.json and, when matplotlib is installed, angle_t.png and delta_norms.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / INSPECT_NAME
    path.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    written = [path]
    try:
        from hf_model_stock.analysis import plots
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'hf-model-stock[plots]')")
        return written
    written.append(plots.angle_t_png(report, out_dir / "angle_t.png"))
    written.append(plots.norms_png(report, out_dir / "delta_norms.png"))
    return written
