"""``interp-k`` and the base-to-soup line: the t of each such merge, and the measured distance of a
merged model from the base.

``interp-k`` is the base-to-soup-k line at the one t where it is as far from the base (whole model) as
``stock-k`` (``methods.interp.equal_distance_t``). The Gram of each tensor's deltas is rebuilt from
``inspect``'s exact norms and pairwise cosines (G_ii = ||d_i||^2, G_ij = cos_ij ||d_i|| ||d_j||): the
first k fine-tunes' Gram is the top-left k x k block of all N's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hf_model_stock.methods.interp import equal_distance_t

if TYPE_CHECKING:
    from hf_model_stock.analysis.inspect import InspectReport


def tensor_grams(report: InspectReport, k: int) -> list[np.ndarray]:
    """The k x k Gram of the first ``k`` fine-tunes' deltas, per merged tensor, in float64."""
    out = []
    for row in report.tensors:
        norms = np.asarray(row.stats.norms[:k], dtype=np.float64)
        gram = np.diag(norms ** 2)
        for (i, j), cos in zip(report.pairs, row.stats.pair_cos):
            if i < k and j < k and cos is not None:
                gram[i, j] = gram[j, i] = cos * norms[i] * norms[j]
        out.append(gram)
    return out


def interp_t(report: InspectReport, k: int) -> float:
    """The t of ``interp-k``: as far from the base as Model Stock of the first ``k`` fine-tunes with
    the report's parameters."""
    return equal_distance_t(tensor_grams(report, k), report.params)


def distance_from_base(base_dir: Path, model_dir: Path) -> float:
    """||w - w_0|| over every floating tensor of ``model_dir`` (float64), read from the safetensors
    files; a tensor the base lacks counts in full."""
    import torch
    from safetensors import safe_open

    def tensors(directory: Path) -> dict[str, Path]:
        found: dict[str, Path] = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(str(path), "pt") as fh:
                found.update({name: path for name in fh.keys()})
        return found

    base, model = tensors(base_dir), tensors(model_dir)
    total = 0.0
    for name, path in model.items():
        with safe_open(str(path), "pt") as fh:
            w = fh.get_tensor(name)
        if not w.is_floating_point():
            continue
        w = w.double()
        if name in base:
            with safe_open(str(base[name]), "pt") as fh:
                w = w - fh.get_tensor(name).double()
        total += float(torch.sum(w * w))
    return math.sqrt(total)
