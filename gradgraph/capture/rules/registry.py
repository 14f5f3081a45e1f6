"""The capture-rule registry: how a module's forward maps onto gradgraph's parameterized ops.

A rule replaces ``module.forward`` while a capture runs. It receives the capture session as ``ctx`` and
computes the module's output with ``ctx.linear``, ``ctx.conv``, ``ctx.diag`` or ``ctx.embedding`` (ordinary
torch code may sit in between; the tracer follows it). Register one for your own module type::

    @gradgraph.register_rule(MyPackedLinear)
    def my_rule(ctx, module, x):
        h = ctx.linear(x, ctx.rows(module.weight, 0, module.d), name="first")
        return ctx.linear(h, ctx.rows(module.weight, module.d, 2 * module.d), name="second")

A subclass of a registered type uses its parent's rule only if it does not override ``forward``. The built-in
rules live one file per layer family beside this one (linear, conv, norm, embedding, attention), each
registered with the same decorator (Opacus's ``register_grad_sampler`` is the model). See docs/capture.md.
"""
from __future__ import annotations

import sys
from typing import Callable

from torch import nn

__all__ = ["register_rule", "find_rule", "supported_modules"]

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
