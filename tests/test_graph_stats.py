"""Per-sample gradient norms and Gram matrices from (a, g), against torch.func's per-sample gradients."""
import pytest
import torch
from cases import ALL_CASES, make
from torch import nn

import gradgraph
from gradgraph import oracle
from gradgraph.graph import stats


def _reference(model, inputs, targets, loss_fn):
    psg = oracle.per_sample_grads(model, inputs, targets, loss_fn)
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in psg.values()], 1)
    return flat @ flat.T


@pytest.mark.parametrize("family,seed", ALL_CASES)
def test_gram_and_norms_match_torch_func(family, seed):
    c = make(family, seed)
    graph = gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn)
    K = _reference(c.model, c.inputs, c.targets, c.loss_fn)
    torch.testing.assert_close(graph.per_sample_gram(), K, rtol=1e-9, atol=1e-12 * float(K.abs().max()))
    torch.testing.assert_close(graph.per_sample_grad_norms(), K.diagonal().sqrt(), rtol=1e-9, atol=1e-12)


class Tied(nn.Module):
    """A module called twice and an embedding tied to the output layer: gradients are sums over uses."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(torch.tanh(self.mid(self.emb(ids))))))


def test_shared_parameters_and_token_sets():
    torch.manual_seed(0)
    model = Tied().double()
    ids = torch.randint(7, (5, 3))
    targets = torch.randint(7, (5, 3))
    from gradgraph.losses import per_sample_cross_entropy

    graph = gradgraph.capture(model, ids, targets, per_sample_cross_entropy)
    K = _reference(model, ids, targets, per_sample_cross_entropy)
    torch.testing.assert_close(graph.per_sample_gram(), K, rtol=1e-9, atol=1e-12 * float(K.abs().max()))


def test_both_paths_of_the_rank_one_gram_agree_and_a_wrong_pairing_is_caught():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 3, 5, generator=g, dtype=torch.float64)
    G = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
    W = torch.einsum("beo,bei->boi", G, A).reshape(4, -1)
    torch.testing.assert_close(stats._rank_one(A, G, False), W @ W.T)
    torch.testing.assert_close(stats._rank_one(A, G, True), (W * W).sum(1))
    wrong = stats._rank_one(A, G.flip(1), False)  # elements paired with the wrong partner
    assert not torch.allclose(wrong, W @ W.T)
