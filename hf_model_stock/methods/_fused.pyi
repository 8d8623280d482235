# Type stub of the C extension _fused.c (the fused CPU kernels).
from collections.abc import Sequence

import numpy as np

def gram(rows: Sequence[np.ndarray], bf16: bool, start: int, stop: int, g: np.ndarray | None,
         delta_sum: np.ndarray | None, /) -> None: ...
def finish(base: np.ndarray, delta_sum: np.ndarray, scale: float, out: np.ndarray, bf16: bool, start: int,
           stop: int, /) -> None: ...
