"""Stage 4b: tasks on gradient graphs (training loops and metrics)."""
from .curvature import MODELS as CURVATURE_MODELS
from .curvature import CurvatureConfig, build_model, train_curvature

__all__ = ["CurvatureConfig", "train_curvature", "build_model", "CURVATURE_MODELS"]
