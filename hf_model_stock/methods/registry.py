"""Merge methods by name: each maps the Gram matrix of the deltas to the ratio t of
``w = w_0 + t * mean_i(d_i)``, so every method runs on the same streaming kernels."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from hf_model_stock.methods.interp import fixed_ratio
from hf_model_stock.methods.model_stock import ModelStockParams, Ratio, ratio_from_gram

RatioFn = Callable[[Any, ModelStockParams], Ratio]


def uniform_ratio(gram: Any, params: ModelStockParams) -> Ratio:
    """Model Soup, the uniform average of the fine-tunes: t = 1, i.e. w = mean_i(w_i).
    Cosines and norms are still reported, for comparison with Model Stock."""
    r = ratio_from_gram(gram, params)
    return Ratio(t=np.ones_like(r.t), cos=r.cos, norms=r.norms, clamped=np.zeros_like(r.clamped))


METHODS: dict[str, RatioFn] = {"model_stock": ratio_from_gram, "linear": uniform_ratio, "interp": fixed_ratio}
