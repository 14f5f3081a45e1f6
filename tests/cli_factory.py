"""A user model factory for the CLI test: returns (model, inputs)."""
import torch
from torch import nn


def make():
    model = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 2))
    return model, torch.randn(4, 3)
