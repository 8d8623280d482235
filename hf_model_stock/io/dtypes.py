"""The safetensors dtype codes and their torch equivalents."""

from __future__ import annotations

import torch

# safetensors dtype code -> torch dtype. Codes follow the safetensors specification.
SAFETENSORS_TO_TORCH: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_SAFETENSORS: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_TO_TORCH.items()}

# Names users may write in recipes and on the command line.
DTYPE_NAMES: dict[str, str] = {
    "bfloat16": "BF16", "bf16": "BF16",
    "float16": "F16", "fp16": "F16", "half": "F16",
    "float32": "F32", "fp32": "F32", "float": "F32",
    "float64": "F64", "fp64": "F64",
}
# safetensors code -> the name transformers writes in config.json ("dtype" / "torch_dtype").
CONFIG_DTYPE_NAMES: dict[str, str] = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def itemsize(code: str) -> int:
    """Bytes per element of a safetensors dtype code."""
    return SAFETENSORS_TO_TORCH[code].itemsize


def is_floating(code: str) -> bool:
    """Whether tensors of this dtype are merged (floating point) rather than copied from the base."""
    return SAFETENSORS_TO_TORCH[code].is_floating_point


def parse_dtype_name(name: str) -> str:
    """Map a user-facing dtype name ("bfloat16", "fp16", "F32", ...) to a safetensors code."""
    key = name.strip()
    if key in SAFETENSORS_TO_TORCH and is_floating(key):
        return key
    try:
        return DTYPE_NAMES[key.lower()]
    except KeyError:
        allowed = ", ".join(sorted({"bfloat16", "float16", "float32", "float64"}))
        raise ValueError(f"unknown dtype {name!r} (use one of: {allowed})") from None
