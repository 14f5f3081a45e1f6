"""Stage 1 of the data flow: record per-op activations and output gradients from one forward and one
backward pass, with the dataflow between ops traced from the real execution."""
from .api import GradientRecorder, capture, model_spec, per_sample_losses
from .rules import find_rule, register_rule, supported_modules
from .session import CaptureSession

__all__ = ["capture", "GradientRecorder", "model_spec", "per_sample_losses", "register_rule", "find_rule",
           "supported_modules", "CaptureSession"]
