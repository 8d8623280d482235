"""hf-model-stock: merge fine-tuned LLMs with Model Stock, stream by stream, in bounded memory.

The library API, imported on first use (the command line starts without torch or the Hub client)::

    from hf_model_stock import load_recipe, run_recipe, merge_models
    run_recipe(load_recipe("recipes/math.yaml"))
    merge_models("base-dir", ["ft-a", "ft-b", "ft-c"], "merged")
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_API = {
    "load_recipe": "hf_model_stock.recipe",
    "Recipe": "hf_model_stock.recipe",
    "run_recipe": "hf_model_stock.workflow",
    "merge_models": "hf_model_stock.pipeline",
    "plan_merge": "hf_model_stock.pipeline",
    "execute_plan": "hf_model_stock.pipeline",
    "MergeOptions": "hf_model_stock.merge.plan",
    "ModelStockParams": "hf_model_stock.methods.model_stock",
    "MergeReport": "hf_model_stock.publish.report",
    "push_model": "hf_model_stock.publish.hub",
    "inspect_models": "hf_model_stock.analysis.inspect",
    "PeriodicModelStock": "hf_model_stock.analysis.training",
    "ModelStockCallback": "hf_model_stock.analysis.training",
    "merge_checkpoints": "hf_model_stock.analysis.training",
    "evaluate_model": "hf_model_stock.evaluation.evaluate",
}
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> Any:
    if name not in _API:
        raise AttributeError(f"module 'hf_model_stock' has no attribute {name!r}")
    return getattr(importlib.import_module(_API[name]), name)
