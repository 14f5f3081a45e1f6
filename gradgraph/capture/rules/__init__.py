"""Capture rules, one file per layer family. Importing this package registers the built-in rules.

A rule replaces ``module.forward`` while a capture runs and expresses it with the session's primitives
(``ctx.linear``, ``ctx.conv``, ``ctx.diag``, ``ctx.embedding``, ``ctx.rows``); see :mod:`.registry` and
docs/capture.md for writing one.
"""
from . import attention, conv, embedding, hf, linear, norm, recurrent  # noqa: F401  (registers the built-in rules)
from .registry import find_rule, overrides_a_rule, register_rule, supported_modules

__all__ = ["register_rule", "find_rule", "supported_modules", "overrides_a_rule"]
