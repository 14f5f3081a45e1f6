"""A user model factory for the CLI test: returns (model, inputs)."""
import torch
from torch import nn

from gradgraph.models import model_factory


def make() -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(nn.Linear(3, 5), nn.GELU(), nn.Linear(5, 2))
    return model, torch.randn(4, 3)


def unannotated():
    return nn.Linear(2, 2)


@model_factory
def declared():
    return nn.Linear(2, 2), torch.randn(3, 2)


def lies() -> nn.Module:
    return "not a model"


NOT_CALLABLE = 3


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 3)
        self.odd = nn.Bilinear(3, 3, 2)

    def forward(self, x):
        h = self.fc(x)
        return self.odd(h, h)


def refused() -> tuple[nn.Module, torch.Tensor]:
    return Unsupported(), torch.randn(4, 3)
