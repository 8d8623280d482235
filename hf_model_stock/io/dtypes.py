"""The safetensors dtype codes: element sizes, the numpy arrays that hold their bits, torch dtypes.

numpy has no bfloat16 or float8, so those tensors are held as their raw bits (uint16, uint8); torch
is imported only when a torch dtype is asked for.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

# safetensors dtype code -> (floating point, numpy dtype holding its bits, torch dtype name).
# Codes follow the safetensors specification.
_DTYPES: dict[str, tuple[bool, type, str]] = {
    "BOOL": (False, np.bool_, "bool"),
    "U8": (False, np.uint8, "uint8"),
    "I8": (False, np.int8, "int8"),
    "I16": (False, np.int16, "int16"),
    "U16": (False, np.uint16, "uint16"),
    "I32": (False, np.int32, "int32"),
    "U32": (False, np.uint32, "uint32"),
    "I64": (False, np.int64, "int64"),
    "U64": (False, np.uint64, "uint64"),
    "F16": (True, np.float16, "float16"),
    "BF16": (True, np.uint16, "bfloat16"),
    "F32": (True, np.float32, "float32"),
    "F64": (True, np.float64, "float64"),
    "F8_E4M3": (True, np.uint8, "float8_e4m3fn"),
    "F8_E5M2": (True, np.uint8, "float8_e5m2"),
}
SAFETENSORS_DTYPES: frozenset[str] = frozenset(_DTYPES)

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
    return np.dtype(_DTYPES[code][1]).itemsize


def is_floating(code: str) -> bool:
    """Whether tensors of this dtype are merged (floating point) rather than copied from the base."""
    return _DTYPES[code][0]


def storage_dtype(code: str) -> np.dtype:
    """The numpy dtype that holds a tensor's bits: its own, or a same-size integer (BF16, F8)."""
    return np.dtype(_DTYPES[code][1])


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (imports torch)."""
    import torch

    return getattr(torch, _DTYPES[code][2])


def parse_dtype_name(name: str) -> str:
    """Map a user-facing dtype name ("bfloat16", "fp16", "F32", ...) to a safetensors code."""
    key = name.strip()
    if key in _DTYPES and is_floating(key):
        return key
    try:
        return DTYPE_NAMES[key.lower()]
    except KeyError:
        allowed = ", ".join(sorted({"bfloat16", "float16", "float32", "float64"}))
        raise ValueError(f"unknown dtype {name!r} (use one of: {allowed})") from None
