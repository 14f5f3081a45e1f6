"""Small value types and geometry helpers of the capture primitives."""
from __future__ import annotations

from torch import Tensor


class Rows:
    """Rows ``start:stop`` of a parameter, for modules with packed weights (``ctx.rows(p, 0, d)``)."""

    def __init__(self, param: Tensor, start: int, stop: int) -> None:
        self.param, self.start, self.stop = param, int(start), int(stop)


def expand_tuple(v, d: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * d


def conv_padding(padding, kernel, dilation) -> tuple[tuple[int, int], ...]:
    """Per-side padding ``((lo, hi), ...)`` for every spatial dim, from an int, tuple, 'same' or 'valid'."""
    d = len(kernel)
    if padding == "valid":
        return ((0, 0),) * d
    if padding == "same":
        out = []
        for k, dil in zip(kernel, dilation):
            total = dil * (k - 1)
            out.append((total // 2, total - total // 2))
        return tuple(out)
    return tuple((p, p) for p in expand_tuple(padding, d))
