"""Stage 1 of the data flow: record per-op activations and output gradients from one forward and one
backward pass, with the dataflow between ops traced from the real execution.

This stage knows nothing of graphs: :mod:`gradgraph.api` composes it with stage 2 (``gradgraph.capture``,
the function, lives there)."""
from .rules import find_rule, register_rule, supported_modules
from .session import CaptureSession

__all__ = ["register_rule", "find_rule", "supported_modules", "CaptureSession"]
