"""Stage 4a: generated, seeded, offline datasets of gradient graphs (they materialize under ``datasets/``)."""
from .common import default_root
from .digit_inrs import DigitINRs, digit_images, dilate
from .siren_fisher import SirenFisher, fisher_diagonal, sample_inputs
from .siren_trace import SirenTrace

__all__ = ["SirenFisher", "SirenTrace", "DigitINRs", "digit_images", "dilate", "fisher_diagonal", "sample_inputs",
           "default_root"]
