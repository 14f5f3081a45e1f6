"""capture() and GradientRecorder against torch.func and autograd, over random architectures."""
import copy

import pytest
import torch
from cases import ALL_CASES, make
from conftest import assert_tensors_close
from torch import nn

import gradgraph
from gradgraph import oracle
from gradgraph.losses import per_sample_mse


@pytest.mark.parametrize("family,seed", ALL_CASES)
def test_per_sample_grads_match_torch_func(family, seed):
    c = make(family, seed)
    graph = gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn)
    assert_tensors_close(graph.per_sample_grads(), oracle.per_sample_grads(c.model, c.inputs, c.targets, c.loss_fn))


@pytest.mark.parametrize("family,seed", ALL_CASES)
def test_summed_grads_match_autograd(family, seed):
    c = make(family, seed)
    graph = gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn)
    assert_tensors_close(graph.grads(), oracle.grads(c.model, c.inputs, c.targets, c.loss_fn))


def test_loss_fn_none_differentiates_the_output_sum():
    c = make("siren", 0)
    graph = gradgraph.capture(c.model, c.inputs)
    want = oracle.per_sample_grads(c.model, c.inputs)  # loss_fn=None: the sum of the outputs
    assert_tensors_close(graph.per_sample_grads(), want)


def test_capture_leaves_model_and_grad_untouched():
    c = make("gpt", 0)
    p = next(c.model.parameters())
    p.grad = torch.full_like(p, 7.0)
    before = copy.deepcopy(c.model.state_dict())
    gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn)
    assert torch.equal(p.grad, torch.full_like(p, 7.0))
    assert all(q.grad is None for q in list(c.model.parameters())[1:])
    assert all("forward" not in m.__dict__ for m in c.model.modules())
    for k, v in c.model.state_dict().items():
        assert torch.equal(v, before[k])


def test_model_is_restored_after_an_error_in_forward():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)

        def forward(self, x):
            raise RuntimeError("boom")

    m = Bad()
    with pytest.raises(RuntimeError, match="boom"):
        gradgraph.capture(m, torch.randn(2, 2))
    assert all("forward" not in mod.__dict__ for mod in m.modules())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_recorder_in_a_training_loop_matches_capture(reduction):
    c = make("transformer_encoder", 1)
    model = c.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    b = c.inputs.shape[0]
    want = gradgraph.capture(model, c.inputs, c.targets, c.loss_fn)
    with gradgraph.GradientRecorder(model) as rec:
        losses = c.loss_fn(model(c.inputs), c.targets)
        (losses.mean() if reduction == "mean" else losses.sum()).backward()
    graph = rec.graph(grad_scale=b if reduction == "mean" else 1.0)
    # .grad is filled by the user's backward as usual
    ref = oracle.grads(model, c.inputs, c.targets, c.loss_fn)
    scale = 1 / b if reduction == "mean" else 1.0
    assert_tensors_close({k: p.grad for k, p in model.named_parameters()}, {k: v * scale for k, v in ref.items()})
    torch.testing.assert_close(graph.entry_x, want.entry_x, rtol=1e-9, atol=1e-12)
    opt.step()
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_recorder_without_backward_says_so():
    c = make("mlp", 0)
    with gradgraph.GradientRecorder(c.model) as rec:
        c.model(c.inputs)
    with pytest.raises(gradgraph.GradGraphError, match="backward"):
        rec.graph()


def test_recorder_refuses_a_second_forward():
    c = make("mlp", 0)
    with pytest.raises(gradgraph.GradGraphError, match="called twice"):
        with gradgraph.GradientRecorder(c.model):
            c.model(c.inputs)
            c.model(c.inputs)


def test_inputs_as_dict_and_tuple():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 3), nn.Linear(4, 3)

        def forward(self, x, z):
            return self.a(x) * self.b(z)

    m = Two().double()
    x, z, y = torch.randn(3, 2).double(), torch.randn(3, 4).double(), torch.randn(3, 3).double()
    g1 = gradgraph.capture(m, (x, z), y, per_sample_mse)
    g2 = gradgraph.capture(m, {"x": x, "z": z}, y, per_sample_mse)
    torch.testing.assert_close(g1.entry_x, g2.entry_x)
    assert_tensors_close(g1.per_sample_grads(), oracle.per_sample_grads(m, (x, z), y, per_sample_mse))


@pytest.mark.parametrize("family", ["mlp", "cnn", "gpt", "transformer_encoder"])
def test_first_samples_build_the_graph_of_a_capture_on_those_samples(family):
    """CaptureRecords.first_samples(k) -> the graph gradgraph.capture builds on the batch's first k samples."""
    from gradgraph.api import per_sample_losses
    from gradgraph.capture import CaptureSession
    from gradgraph.graph.build import build_graph

    c = make(family, 0)
    k = 2
    assert c.inputs.shape[0] > k
    session = CaptureSession(c.model, use_hooks=False)
    with session:
        out = c.model(c.inputs)
    session.collect_grads(per_sample_losses(out, c.targets, c.loss_fn, session.batch_size).sum())
    records = session.records()
    got = build_graph(records.first_samples(k))
    want = gradgraph.capture(c.model, c.inputs[:k], c.targets[:k] if c.targets is not None else None, c.loss_fn)
    assert got.spec.structure_key() == want.spec.structure_key() and got.spec.groups == want.spec.groups
    torch.testing.assert_close(got.entry_x, want.entry_x, rtol=1e-10, atol=1e-12)
    assert torch.equal(got.entry_node, want.entry_node) and torch.equal(got.entry_mask, want.entry_mask)
    full = build_graph(records)
    assert full.entry_x.shape[0] > got.entry_x.shape[0]  # negative: the full batch is a different graph
    assert records.first_samples(10 ** 6) is records
    with pytest.raises(ValueError, match="positive number"):
        records.first_samples(0)
