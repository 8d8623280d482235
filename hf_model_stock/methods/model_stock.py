"""Model Stock (Jang, Yun, Han 2024), generalised to N fine-tunes. Pure math (numpy), no I/O.

For fine-tunes w_1..w_N of a pre-trained w_0 and one tensor (layer-wise) or one output row
(filter-wise)::

    d_i = w_i - w_0
    cos = mean over pairs i<j of <d_i, d_j> / (||d_i|| ||d_j|| + eps), clamped to [-1, 1]
    t   = N cos / (1 + (N - 1) cos)
    w_H = t mean_i(w_i) + (1 - t) w_0  =  w_0 + t mean_i(d_i)

Everything here works from the Gram matrix of the deltas, which the kernels (``fused_cpu``,
``torch_kernels``) accumulate block by block in float64. The merged values are written as
``w_0 + t/N * sum_i d_i`` (the deltas are small next to w_0, so this loses far less precision than
averaging the raw weights).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from annotated_types import Ge

DEFAULT_EPS = 1e-8  # the authors' reference code adds this to the product of norms
DEFAULT_BLOCK = 1 << 18  # elements per block of the torch kernels: the inputs and float32 scratch stay in L2

Granularity = Literal["layer", "filter"]


@dataclass(frozen=True)
class ModelStockParams:
    """Options of the method: the recipe's ``parameters`` (validated there as they are declared here)."""

    __pydantic_config__ = {"extra": "forbid"}  # a recipe's unknown key under parameters is an error

    granularity: Granularity = "layer"
    clamp_t: bool = True
    eps: Annotated[float, Ge(0.0)] = DEFAULT_EPS  # Ge: the recipe's error names parameters.eps
    t: Annotated[float, Ge(0.0)] | None = None  # method interp only: its one ratio (methods.interp)

    def __post_init__(self) -> None:
        if not self.eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {self.eps}")
        if self.t is not None and not (self.t >= 0.0 and math.isfinite(self.t)):
            raise ValueError(f"t must be finite and >= 0, got {self.t}")


@dataclass(frozen=True)
class Ratio:
    """Interpolation ratio(s) derived from a Gram matrix: one value, or one per row (filter-wise)."""

    t: np.ndarray  # float64, shape (...)
    cos: np.ndarray  # float64, mean pairwise cosine after clamping to [-1, 1]
    norms: np.ndarray  # float64, shape (..., N): ||d_i||
    clamped: np.ndarray  # bool: t fell outside [0, 1] (and was clamped if clamp_t)


def ratio_from_gram(gram: Any, params: ModelStockParams) -> Ratio:
    """Model Stock's t from the Gram matrix of the deltas, shape (..., N, N) (any array that numpy
    can read: a numpy array, a CPU torch tensor), computed in float64.

    >>> g = np.array([[1.0, 0.5], [0.5, 1.0]])
    >>> round(float(ratio_from_gram(g, ModelStockParams(eps=0.0)).t), 6)  # cos 0.5, N 2
    0.666667
    """
    g = np.asarray(gram, dtype=np.float64)
    n = g.shape[-1]
    if n < 2:
        raise ValueError(f"Model Stock needs at least 2 fine-tuned models, got {n}")
    norms = np.sqrt(np.maximum(np.diagonal(g, axis1=-2, axis2=-1), 0.0))
    i, j = np.triu_indices(n, k=1)
    denom = norms[..., i] * norms[..., j] + params.eps
    with np.errstate(divide="ignore", invalid="ignore"):
        pair_cos = np.where(denom > 0, g[..., i, j] / np.where(denom > 0, denom, 1.0), 0.0)
        cos = np.clip(pair_cos.mean(-1), -1.0, 1.0)
        t = n * cos / (1 + (n - 1) * cos)  # cos >= -1/(N-1) in exact arithmetic; at equality t = -inf
    clamped = ~((t >= 0) & (t <= 1))
    if params.clamp_t:
        t = np.clip(np.nan_to_num(t, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
    return Ratio(t=np.asarray(t), cos=np.asarray(cos), norms=norms, clamped=np.asarray(clamped))


def concat_ratios(ratios: Sequence[Ratio]) -> Ratio:
    """Join per-row ratios of consecutive row ranges."""
    return Ratio(
        t=np.concatenate([r.t for r in ratios]),
        cos=np.concatenate([r.cos for r in ratios]),
        norms=np.concatenate([r.norms for r in ratios]),
        clamped=np.concatenate([r.clamped for r in ratios]),
    )
