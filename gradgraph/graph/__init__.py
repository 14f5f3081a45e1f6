"""Stage 2: the GradientGraph (a PyG Data of neurons with set-valued (a, g) features), its structure
(GraphSpec) and its symmetries."""
from .gradient_graph import GradientGraph, require_set_size
from .spec import GraphSpec, LayerSpec, OpSpec, ParamSpec, SpaceSpec
from .symmetry import Symmetry, apply_symmetry, node_permutation, random_symmetry

__all__ = ["GradientGraph", "GraphSpec", "LayerSpec", "OpSpec", "ParamSpec", "SpaceSpec", "Symmetry",
           "apply_symmetry", "random_symmetry", "node_permutation", "require_set_size"]
