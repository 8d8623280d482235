"""hf-model-stock: merge fine-tuned LLMs with Model Stock, stream by stream, in bounded memory."""

__version__ = "0.1.0"
