"""Reference base models. Each has ``example_inputs(batch_size, generator)``, ``example_targets(...)`` and
``per_sample_loss(output, targets)`` so that tools (``gradgraph inspect``, ``random_symmetry``) can run them
without extra arguments."""
from .reference import CNN, GPT, MLP, REFERENCE_MODELS, SIREN, build_model, model_factory

__all__ = ["MLP", "SIREN", "CNN", "GPT", "build_model", "model_factory", "REFERENCE_MODELS"]
