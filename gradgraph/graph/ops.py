"""Deprecated alias of :mod:`gradgraph.graph.kinds` (the op-kind protocol), kept only until
tests/test_graph_symmetry.py imports ``gradgraph.graph.kinds``; new code imports kinds."""
from .kinds import KINDS, kind_of  # noqa: F401
