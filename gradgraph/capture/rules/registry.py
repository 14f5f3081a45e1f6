"""The capture-rule registry: how a module's forward maps onto gradgraph's parameterized ops.

A rule replaces ``module.forward`` while a capture runs. It receives the capture session as ``ctx`` and
computes the module's output with ``ctx.linear``, ``ctx.conv``, ``ctx.diag`` or ``ctx.embedding`` (ordinary
torch code may sit in between; the tracer follows it). Register one for your own module type::

    @gradgraph.register_rule(MyPackedLinear)
    def my_rule(ctx, module, x):
        h = ctx.linear(x, ctx.rows(module.weight, 0, module.d), name="first")
        return ctx.linear(h, ctx.rows(module.weight, module.d, 2 * module.d), name="second")

A subclass of a registered type uses its parent's rule only if it does not override ``forward``. A subclass whose
``forward`` computes its own inputs and then calls ``super().forward(...)`` (Hugging Face's
``OPTLearnedPositionalEmbedding``: position ids from the attention mask, then the parent's lookup) can be registered
with :func:`through_super`: its own forward runs, traced like glue, and the ``super().forward`` call runs the
parent's rule. The built-in rules live one file per layer family beside this one (linear, conv, norm, embedding,
attention), each registered with the same decorator (Opacus's ``register_grad_sampler`` is the model). See
docs/capture.md.
"""
from __future__ import annotations

import sys
from typing import Callable

from torch import nn

from ...errors import UnsupportedModuleError

__all__ = ["register_rule", "find_rule", "supported_modules", "through_super"]

_RULES: dict[type, Callable] = {}
_LAZY: dict[str, Callable[[], None]] = {}  # module name -> registers rules for its types once it is imported


def register_lazy(module_name: str, register: Callable[[], None]) -> None:
    """Call ``register()`` (which registers rules for types defined in ``module_name``) the first time a rule
    is looked up after ``module_name`` was imported: optional libraries (transformers) are never imported by
    gradgraph itself."""
    _LAZY[module_name] = register


def _load_lazy() -> None:
    for name in [n for n in _LAZY if n in sys.modules]:
        _LAZY.pop(name)()


def register_rule(*module_types: type) -> Callable:
    """Decorator registering ``fn(ctx, module, *args, **kwargs) -> output`` as the capture rule of
    ``module_types`` (replacing an existing rule for the same type)."""
    if not module_types or not all(isinstance(t, type) and issubclass(t, nn.Module) for t in module_types):
        raise TypeError("register_rule takes one or more nn.Module subclasses, e.g. @register_rule(nn.Linear)")

    def decorate(fn: Callable) -> Callable:
        for t in module_types:
            _RULES[t] = fn
        return fn

    return decorate


def find_rule(module: nn.Module) -> Callable | None:
    """The rule for ``module``'s type, or for a base type whose ``forward`` it does not override."""
    if _LAZY:
        _load_lazy()
    cls = type(module)
    if cls in _RULES:
        return _RULES[cls]
    for base in cls.__mro__[1:]:
        if base in _RULES:
            return _RULES[base] if cls.forward is base.forward else None
    return None


def overrides_a_rule(module: nn.Module) -> bool:
    """Whether ``module`` has no rule only because it overrides the ``forward`` of a type that has one."""
    return find_rule(module) is None and any(base in _RULES for base in type(module).__mro__[1:])


def supported_modules() -> list[str]:
    """Names of the module types that have a registered rule, sorted."""
    if _LAZY:
        _load_lazy()
    return sorted(t.__name__ for t in _RULES)


def through_super(ctx, module: nn.Module, *args, **kwargs):
    """A rule for a subclass that overrides ``forward`` of a registered type only to compute the parent's inputs
    (or to post-process its output) and calls ``super().forward(...)``: run the module's own ``forward`` (ordinary
    torch code, which the tracer follows and checks like any glue) with that ``super().forward`` call running the
    rule of the nearest registered base instead. Register it per type, ``register_rule(MySubclass)(through_super)``.
    Exact whatever the override does: a use of the module's parameters outside the parent's forward (``F.embedding
    (ids, self.weight)`` written out, ``self.weight * 2``) is a bare use, which the tracer records or refuses."""
    cls = type(module)
    base = next((b for b in cls.__mro__[1:] if b in _RULES and _RULES[b] is not through_super), None)
    if base is None:
        raise UnsupportedModuleError(
            f"module '{ctx.path}' ({cls.__module__}.{cls.__qualname__}) is registered with through_super but no base "
            f"class of it has a capture rule (supported modules: {', '.join(supported_modules())}).")
    parent = _RULES[base]
    # super(cls, module).forward resolves along type(module).__mro__: a class (cls, shim) puts the shim, whose
    # forward is the parent's rule, right after cls and before base (C3 order: cls, shim, base, ...)
    shim = type(f"_{base.__name__}Rule", (base,), {"forward": lambda self, *a, **k: parent(ctx, self, *a, **k)})
    swapped = type(cls.__name__, (cls, shim), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
    module.__class__ = swapped
    try:
        return cls.forward(module, *args, **kwargs)
    finally:
        module.__class__ = cls
