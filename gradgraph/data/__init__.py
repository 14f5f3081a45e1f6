"""Stage 4a: generated, seeded, offline datasets of gradient graphs (they materialize under ``datasets/``)."""
from .common import default_root
from .siren_fisher import SirenFisher, fisher_diagonal, sample_inputs

__all__ = ["SirenFisher", "fisher_diagonal", "sample_inputs", "default_root"]
