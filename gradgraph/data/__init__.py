"""Stage 4a: generated, seeded, offline datasets of gradient graphs (they materialize under ``datasets/``)."""
from ..io import atomic_save
from .common import default_root
from .siren_fisher import SirenFisher, fisher_diagonal, sample_inputs

__all__ = ["SirenFisher", "fisher_diagonal", "sample_inputs", "default_root", "atomic_save"]
