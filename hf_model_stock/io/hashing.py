"""A sha256 (or git blob sha1) of a file fed in order, whose sha256 state can be saved and restored
(OpenSSL's ``SHA256_CTX`` through ctypes), so that a resumed stream goes on hashing where it was.
Without libcrypto it is hashlib's sha256, whose state cannot be saved (a resume then re-reads the file).
"""

from __future__ import annotations

import ctypes
import hashlib
from typing import Any

import numpy as np

from hf_model_stock.io import platform


def _load_libcrypto() -> Any:
    lib = platform.load_libcrypto()
    if lib is None or not all(hasattr(lib, f) for f in ("SHA256_Init", "SHA256_Update", "SHA256_Final")):
        return None
    lib.SHA256_Update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
    lib.SHA256_Init.argtypes = [ctypes.c_void_p]
    lib.SHA256_Final.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    return lib


_crypto = _load_libcrypto()
STATE_BYTES = 112  # sizeof(SHA256_CTX): h[8], Nl, Nh, data[16], num, md_len (32-bit each)


class Hasher:
    """sha256 (or a git blob sha1) of a file fed in order; ``state`` saves a sha256 (None where it
    cannot: no libcrypto, or a sha1), ``Hasher(kind, state)`` restores it."""

    def __init__(self, kind: str = "sha256", size: int = 0, state: bytes | None = None):
        self.kind = kind
        self._ctx: ctypes.Array | None = None
        self._py: Any = None
        if kind == "sha256" and _crypto is not None:
            self._ctx = ctypes.create_string_buffer(STATE_BYTES)
            if state is not None:
                ctypes.memmove(self._ctx, state, STATE_BYTES)
            else:
                _crypto.SHA256_Init(self._ctx)
        elif kind == "sha256":
            if state is not None:
                raise ValueError("no libcrypto: a sha256 state cannot be restored")
            self._py = hashlib.sha256()
        else:  # git blob id: sha1 of "blob SIZE\0" + data
            if state is not None:
                raise ValueError("a git blob sha1 state cannot be restored")
            self._py = hashlib.sha1(b"blob %d\0" % size)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._ctx is None:
            self._py.update(data)
            return
        n = len(data) if not isinstance(data, memoryview) else data.nbytes
        if n:
            address = np.frombuffer(data, np.uint8).ctypes.data
            _crypto.SHA256_Update(self._ctx, ctypes.c_void_p(address), n)  # ctypes lets go of the GIL

    def state(self) -> bytes | None:
        return None if self._ctx is None else self._ctx.raw

    def hexdigest(self) -> str:
        if self._ctx is None:
            return self._py.hexdigest()
        out = ctypes.create_string_buffer(32)
        ctx = ctypes.create_string_buffer(self._ctx.raw, STATE_BYTES)  # Final on a copy: the state stays usable
        _crypto.SHA256_Final(out, ctx)
        return out.raw.hex()


def can_save_hash_state() -> bool:
    """Whether ``Hasher.state`` can save a sha256 here (libcrypto was found)."""
    return _crypto is not None
