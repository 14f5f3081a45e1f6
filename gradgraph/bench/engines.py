"""The engines of ``gradgraph bench capture``: five ways to do one training step's worth of gradient work.

==========  ======================================================================================================
plain       forward + backward of the summed per-sample loss (fills ``.grad``): the cost every ratio is relative to
gradgraph   :func:`gradgraph.capture` to a :class:`~gradgraph.GradientGraph` (per neuron and set element ``a``
            and ``g``; no weight-gradient products, ``.grad`` untouched)
vmap        ``torch.func`` ``vmap(grad(single-sample loss))`` (:mod:`gradgraph.oracle`): per-sample gradients
            ``{name: [b, *shape]}``
opacus      Opacus ``GradSampleModule(loss_reduction="sum")``: forward + backward, ``p.grad_sample`` (and ``.grad``)
backpack    BackPACK ``BatchGrad``: forward + backward inside ``backpack(BatchGrad())``, ``p.grad_batch`` (and
            ``.grad``); skipped, with the reason, for models with a parameterized module it has no extension for
==========  ======================================================================================================

Every engine is an :class:`Engine` in the registry :data:`ENGINES` (in this order). Opacus and BackPACK are
optional: they are imported when their engine is prepared or checked, never at import time.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.metadata
import warnings
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

import gradgraph

from ..oracle import make_per_sample_grads
from ..registry import Registry

__all__ = ["Engine", "ENGINES", "PEERS", "prepare", "engine_grads", "quiet"]

# harmless warnings of the peers on these models (containers holding parameters, SDPA without a vmap rule)
_QUIET = ("Extension saving to grad_batch does not have an extension for Module",
          "There is a performance drop because we have not yet implemented the batching rule",
          "Full backward hook is firing when gradients are computed with respect to module outputs",
          "Using a non-full backward hook when the forward contains multiple autograd Nodes")


@contextlib.contextmanager
def quiet():
    """Silence the peers' known, harmless warnings."""
    with warnings.catch_warnings():
        for msg in _QUIET:
            warnings.filterwarnings("ignore", message=msg)
        yield


Step = Callable[[Tensor, Tensor], object]


@dataclass(frozen=True)
class Engine:
    """``prepare(model, loss_fn) -> step``; ``step(x, y)`` does one step and returns its result (kept alive
    while memory is measured); ``grads(result)`` reads ``{name: [b, *shape]}`` per-sample gradients from it
    (the plain engine: the summed gradient ``{name: [*shape]}``). ``unsupported(model)`` gives the reason an
    engine cannot handle a model, or None."""

    name: str
    title: str
    prepare: Callable[[nn.Module, Callable], Step]
    grads: Callable[[object], dict[str, Tensor]]
    unsupported: Callable[[nn.Module], str | None] = lambda model: None
    per_sample: bool = True  # computes per-sample gradients (a peer)


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _take(params, attr: str) -> dict[str, Tensor]:
    """Move ``p.<attr>`` of every parameter into a dict (the step's result) and clear ``.grad`` too, so that
    nothing of a step outlives its result: dropping the result frees it, and the next step starts from the
    same state (this matters for the memory measurement, whose warm-up step must leave nothing behind)."""
    out = {}
    for n, p in params:
        out[n] = getattr(p, attr)
        p.grad = None
        if attr != "grad":
            setattr(p, attr, None)
    return out


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# -- the engines ---------------------------------------------------------------------------------------------
def _prepare_plain(model, loss_fn) -> Step:
    params = _trainable(model)

    def step(x, y):
        loss_fn(model(x), y).sum().backward()
        return _take(params, "grad")
    return step


def _prepare_gradgraph(model, loss_fn) -> Step:
    return lambda x, y: gradgraph.capture(model, x, y, loss_fn)


def _prepare_vmap(model, loss_fn) -> Step:
    # The oracle binds its inputs when it builds the vmapped function; the benchmark steps on one (x, y)
    # again and again, so build it on the first step of a batch (the untimed warm-up) and reuse it after.
    built: list = [None, None, None]  # x, y, the function

    def step(x, y):
        if built[0] is not x or built[1] is not y:
            # randomness="different": per-sample dropout masks, should a model have dropout
            built[:] = [x, y, make_per_sample_grads(model, x, y, loss_fn, randomness="different")]
        return built[2]()
    return step


def _prepare_opacus(model, loss_fn) -> Step:
    from opacus import GradSampleModule  # optional (the bench extra)

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    params = _trainable(model)

    def step(x, y):
        loss_fn(gsm(x), y).sum().backward()
        return _take(params, "grad_sample")
    return step


def _opacus_unsupported(model: nn.Module) -> str | None:
    try:
        from opacus import GradSampleModule
    except ImportError as e:
        return f"opacus is not installed ({e})"
    errors = GradSampleModule.validate(model, strict=False)
    return "; ".join(str(e) for e in errors) or None


def _prepare_backpack(model, loss_fn) -> Step:
    from backpack import backpack, extend  # optional (the bench extra)
    from backpack.extensions import BatchGrad

    model = extend(model)
    params = _trainable(model)

    def step(x, y):
        with backpack(BatchGrad()):
            loss_fn(model(x), y).sum().backward()
        return _take(params, "grad_batch")
    return step


def _backpack_unsupported(model: nn.Module) -> str | None:
    try:
        from backpack.extensions import BatchGrad
    except ImportError as e:
        return f"backpack-for-pytorch is not installed ({e})"
    known = getattr(BatchGrad(), "_BackpropExtension__module_extensions", None)
    if known is None:
        return None
    missing = sorted({type(m).__name__ for m in model.modules()
                      if any(p.requires_grad for p in m.parameters(recurse=False)) and type(m) not in known})
    if missing:
        return f"BackPACK {_version('backpack-for-pytorch')} BatchGrad has no extension for {', '.join(missing)}"
    return None


ENGINES = Registry("capture engine")
for _engine in (
    Engine("plain", "forward + backward", _prepare_plain, lambda r: r, per_sample=False),
    Engine("gradgraph", "gradgraph.capture", _prepare_gradgraph, lambda g: g.per_sample_grads(), per_sample=False),
    Engine("vmap", "torch.func vmap(grad)", _prepare_vmap, lambda r: r),
    Engine("opacus", "Opacus GradSampleModule", _prepare_opacus, lambda r: r, _opacus_unsupported),
    Engine("backpack", "BackPACK BatchGrad", _prepare_backpack, lambda r: r, _backpack_unsupported),
):
    ENGINES.register(_engine.name, _engine, help=_engine.title)
del _engine

PEERS = tuple(e for e in ENGINES if ENGINES.get(e).per_sample)  # the per-sample-gradient libraries


def prepare(engine: str, model: nn.Module, loss_fn) -> Step:
    """A step function of ``engine`` on its own copy of ``model`` (peers add hooks or wrap the model)."""
    return ENGINES.get(engine).prepare(copy.deepcopy(model), loss_fn)


def engine_grads(engine: str, model: nn.Module, x: Tensor, y: Tensor, loss_fn) -> dict[str, Tensor]:
    """One step of ``engine`` and the gradients it produced (see :attr:`Engine.grads`)."""
    with quiet():
        return ENGINES.get(engine).grads(prepare(engine, model, loss_fn)(x, y))
