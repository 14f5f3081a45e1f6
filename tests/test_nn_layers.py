"""Layers: the learned op-kind embedding."""
import torch
from torch import nn

from gradgraph.graph.kinds import num_kinds
from gradgraph.nn.layers import kind_embedding


def test_kind_embedding_keeps_the_original_initialization():
    """Rows of the four original kinds are nn.Embedding(4, dim)'s, and later kinds draw nothing from the global
    RNG: registering a kind does not move any model's initialization."""
    torch.manual_seed(3)
    old = nn.Embedding(4, 6)
    after_old = torch.randn(5)
    torch.manual_seed(3)
    new = kind_embedding(6)
    after_new = torch.randn(5)
    assert new.weight.shape == (num_kinds(), 6) and num_kinds() > 4 and new.weight.requires_grad
    assert torch.equal(new.weight[:4], old.weight) and torch.equal(after_new, after_old)
    torch.manual_seed(3)
    assert torch.equal(kind_embedding(6).weight, new.weight)  # a seed gives the same rows
    torch.manual_seed(4)
    assert not torch.equal(kind_embedding(6).weight[4:], new.weight[4:])  # and another seed other rows
