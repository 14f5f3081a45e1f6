"""Stage 1 of the data flow: record per-op activations and output gradients from one forward and one
backward pass, with the dataflow between ops traced from the real execution.

Two registries make it extensible (see docs/capture.md): :func:`register_rule` (how a module with
parameters maps onto gradgraph's ops) and :func:`register_glue` (what the tracer does with a torch function
between them). This stage knows nothing of graphs: :mod:`gradgraph.api` composes it with stage 2
(``gradgraph.capture``, the function, lives there)."""
from . import glue  # noqa: F401  (registers the built-in glue handlers)
from .rules import find_rule, register_rule, supported_modules
from .session import CaptureSession
from .tracer import GlueCall, Label, glue_ops, register_glue

__all__ = ["register_rule", "find_rule", "supported_modules", "register_glue", "glue_ops", "GlueCall", "Label",
           "CaptureSession"]
