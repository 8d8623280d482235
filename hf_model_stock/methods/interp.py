"""The line from the base to the uniform average (Model Soup) at one ratio for the whole model, and
the ratio at which that line is as far from the base as a layer-wise Model Stock merge. Pure math
(numpy), no I/O.

For fine-tunes w_1..w_N of w_0, each tensor l has d_{l,i} = w_{l,i} - w_0 and mean delta m_l. ``interp``
merges every tensor as ``w_0 + t m_l`` with the recipe's ``parameters.t``. Model Stock merges it as
``w_0 + t_l m_l``, so over the whole model::

    ||w_stock - w_0||^2 = sum_l t_l^2 ||m_l||^2        ||w_interp - w_0||^2 = t^2 sum_l ||m_l||^2

and the two are equally far from the base at ``t = sqrt(sum_l t_l^2 ||m_l||^2 / sum_l ||m_l||^2)``, with
``||m_l||^2 = 1^T G_l 1 / N^2`` from each tensor's Gram matrix G_l of the deltas. Same distance, same
direction within each tensor: only how the distance is shared between tensors differs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from hf_model_stock.methods.model_stock import ModelStockParams, Ratio, ratio_from_gram


def fixed_ratio(gram: Any, params: ModelStockParams) -> Ratio:
    """``interp``: t = ``params.t`` for every tensor (cosines and norms still reported)."""
    if params.t is None:
        raise ValueError("parameters.t: method interp needs the ratio t of w = w_0 + t * mean_i(d_i)")
    r = ratio_from_gram(gram, params)
    return Ratio(t=np.full_like(r.t, params.t), cos=r.cos, norms=r.norms, clamped=np.zeros_like(r.clamped))


def mean_delta_sq(gram: Any) -> np.ndarray:
    """||mean_i d_i||^2 from the Gram matrix of the deltas, shape (..., N, N), in float64."""
    g = np.asarray(gram, dtype=np.float64)
    return g.sum(axis=(-2, -1)) / g.shape[-1] ** 2


def equal_distance_t(grams: Iterable[Any], params: ModelStockParams = ModelStockParams()) -> float:
    """The one t at which ``w_0 + t * mean_i(d_i)`` is as far from the base (whole model, float64) as
    Model Stock with ``params`` merging tensor by tensor (a Gram per tensor; or per row, shape
    (rows, N, N), for filter-wise). 0 when the fine-tunes do not move the base.

    >>> round(equal_distance_t([np.eye(2), 4 * np.ones((2, 2))], ModelStockParams(eps=0.0)), 6)  # t 0 and 1
    0.942809
    """
    num = den = 0.0
    for gram in grams:
        g = np.asarray(gram, dtype=np.float64)
        t = ratio_from_gram(g, params).t
        s = mean_delta_sq(g)
        num += float(np.sum(t * t * s))
        den += float(np.sum(s))
    return math.sqrt(num / den) if den > 0 else 0.0
