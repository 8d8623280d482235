"""The evaluation subsystem's error: one line naming the task, file or option at fault."""

from hf_model_stock.errors import ModelStockError


class EvalError(ModelStockError):
    """An evaluation cannot run as asked (the CLI prints it and exits with code 2)."""
