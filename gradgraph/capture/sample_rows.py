"""Where a capture session meets tensors whose first axis is not one row per sample: constants with a leading
1 (broadcast to the batch) and ``[b*T, ...]`` views of ``[b, T, ...]`` activations (``Label.rows``), on which the
parameterized ops run through their ``[b, T, ...]`` view so that they still run per sample."""
from __future__ import annotations

from dataclasses import replace

from torch import Tensor

__all__ = ["per_sample", "rows_per_sample", "run_by_rows"]


def per_sample(session, x: Tensor) -> Tensor:
    """A constant with a leading 1 (HF's ``position_ids`` [1, T], built from ``arange``) that reaches an op
    becomes one copy per sample, so that the op's output and its gradient are per sample (exact: each
    copy feeds its own sample only). Tensors derived from the inputs keep the batch checks."""
    if x.ndim == 0 or x.shape[0] != 1 or session.batch_size == 1 or session.tracer.get_label(x) is not None:
        return x
    return x.expand(session.batch_size, *x.shape[1:])


def rows_per_sample(session, x: Tensor) -> int:
    """How many rows of each sample the first axis of ``x`` holds (``Label.rows``: [b*T, d] from
    ``h.reshape(-1, d)``); 1 for a plain batch axis."""
    lab = session.tracer.get_label(x)
    if lab is None or lab.batch_axis != 0 or lab.rows == 1 or x.shape[0] != session.batch_size * lab.rows:
        return 1
    return lab.rows


def run_by_rows(session, k: int, x: Tensor, primitive) -> Tensor:
    """Run ``primitive`` on the [b, k, ...] view of ``x`` ([b*k, ...], k rows per sample, sample-major) and
    return its output as [b*k, ...] again: the op runs per sample (its a and g are [b, k, ...]) and the
    forward is unchanged. The view of one tensor is made once, so the ops that share ``x`` share its input
    nodes, and an in-place change of ``x`` still saves the recorded activations."""
    v = session._row_views.get(id(x))
    if v is None:
        lab = session.tracer.get_label(x)
        with session.tracer.suspend():
            v = x.unflatten(0, (session.batch_size, k))
        session.tracer.set_label(v, replace(lab, axes=tuple(a + 1 for a in lab.axes), rows=1))
        session._row_views[id(x)] = v
        session._alive.append(x)
        session._insite_by_tensor[id(v)] = session._insite_by_tensor.setdefault(id(x), [])
    out = primitive(v)
    with session.tracer.suspend():
        merged = out.flatten(0, 1)
    lab = session.tracer.get_label(out)
    session.tracer.set_label(merged, replace(lab, axes=tuple(a - 1 for a in lab.axes), rows=k))
    return merged
