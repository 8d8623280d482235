"""The real SmolLM2 checkpoint fixture of the evaluation tests."""

from tests.evaluation.conftest import one_torch_thread, smollm2_dir  # noqa: F401
