"""gradgraph.oracle against an independent reference: a Python loop over the samples, each a plain autograd
backward on a batch of one (no torch.func), in float64."""
import copy

import pytest
import torch
from conftest import assert_tensors_close
from torch import nn

from gradgraph import oracle
from gradgraph.losses import per_sample_mse

D = torch.float64
B = 3  # batch size; the broadcast input below has a first dimension != B on purpose


class Multi(nn.Module):
    """Two batched inputs, an optional broadcast (non-batched) input and a non-tensor keyword, a frozen layer
    and a buffer: [b, 2], [b, 5] -> [b, 4]."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(2, 4), nn.Linear(5, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.register_buffer("scale", torch.randn(4))

    def forward(self, x, z, shift=None, gain=1.0):
        h = torch.tanh(self.a(x) + self.b(z)) * self.scale
        if shift is not None:
            h = h + shift  # [4]: the same for every sample
        return self.frozen(h) * gain


def _batch(gen):
    x = torch.randn(B, 2, dtype=D, generator=gen)
    z = torch.randn(B, 5, dtype=D, generator=gen)
    shift = torch.randn(4, dtype=D, generator=gen)
    y = torch.randn(B, 4, dtype=D, generator=gen)
    return x, z, shift, y


def loop_per_sample_grads(model, args, kwargs, targets, loss_fn, batched):
    """The independent reference: for every sample i, ``autograd.grad`` of sample i's quantity on a batch of
    one. ``batched`` names the positional indices / keyword names that carry the batch axis; the rest is passed
    unchanged. Returns ``{name: [b, *shape]}`` for the trainable parameters."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    out = {n: [] for n, _ in params}
    for i in range(targets.shape[0] if targets is not None else args[0].shape[0]):
        a = [t[i:i + 1] if j in batched else t for j, t in enumerate(args)]
        k = {n: t[i:i + 1] if n in batched else t for n, t in kwargs.items()}
        output = model(*a, **k)
        q = output.sum() if loss_fn is None else loss_fn(output, targets[i:i + 1]).sum()
        gs = torch.autograd.grad(q, [p for _, p in params], allow_unused=True)
        for (n, p), g in zip(params, gs):
            out[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.fixture
def setup():
    torch.manual_seed(0)
    return Multi().double(), _batch(torch.Generator().manual_seed(1))


TRAINABLE = {"a.weight", "a.bias", "b.weight", "b.bias"}


def test_tuple_inputs_with_a_broadcast_input_and_targets(setup):
    model, (x, z, shift, y) = setup
    got = oracle.per_sample_grads(model, (x, z, shift), y, per_sample_mse)
    want = loop_per_sample_grads(model, (x, z, shift), {}, y, per_sample_mse, batched={0, 1})
    assert set(got) == TRAINABLE  # the frozen layer is held fixed, not differentiated
    assert got["a.weight"].shape == (B, 4, 2)
    assert_tensors_close(got, want)


def test_dict_inputs_with_a_non_tensor_keyword(setup):
    model, (x, z, shift, y) = setup
    inputs = {"x": x, "z": z, "shift": shift, "gain": 0.5}
    got = oracle.per_sample_grads(model, inputs, y, per_sample_mse)
    want = loop_per_sample_grads(model, (), inputs, y, per_sample_mse, batched={"x", "z"})
    assert_tensors_close(got, want)
    assert_tensors_close(got, oracle.per_sample_grads(model, (x, z, shift, 0.5), y, per_sample_mse))


def test_loss_fn_none_differentiates_the_sum_of_outputs(setup):
    model, (x, z, shift, _) = setup
    got = oracle.per_sample_grads(model, (x, z, shift))
    assert_tensors_close(got, loop_per_sample_grads(model, (x, z, shift), {}, None, None, batched={0, 1}))


def test_single_tensor_input():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D)
    got = oracle.per_sample_grads(model, x, y, per_sample_mse)
    assert_tensors_close(got, loop_per_sample_grads(model, (x,), {}, y, per_sample_mse, batched={0}))


def test_buffers_and_frozen_parameters_are_held_fixed(setup):
    """They are used at their values (the gradients depend on them), never differentiated or changed."""
    model, (x, z, shift, y) = setup
    before = copy.deepcopy(model.state_dict())
    got = oracle.per_sample_grads(model, (x, z, shift), y, per_sample_mse)
    assert "scale" not in got and not any(k.startswith("frozen.") for k in got)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    other = copy.deepcopy(model)
    other.scale.mul_(2.0)
    changed = oracle.per_sample_grads(other, (x, z, shift), y, per_sample_mse)
    assert not torch.allclose(changed["a.weight"], got["a.weight"])
    assert_tensors_close(changed, loop_per_sample_grads(other, (x, z, shift), {}, y, per_sample_mse, {0, 1}))


def test_grads_is_autograd_of_the_summed_loss(setup):
    model, (x, z, shift, y) = setup
    ref = copy.deepcopy(model)
    per_sample_mse(ref(x, z, shift), y).sum().backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    got = oracle.grads(model, (x, z, shift), y, per_sample_mse)
    assert_tensors_close(got, want)
    assert all(p.grad is None for p in model.parameters())  # the model's .grad is untouched
    # and the summed gradient is the sum of the per-sample ones
    psg = oracle.per_sample_grads(model, (x, z, shift), y, per_sample_mse)
    assert_tensors_close({n: g.sum(0) for n, g in psg.items()}, got)


def test_grads_with_loss_fn_none(setup):
    model, (x, z, shift, _) = setup
    ref = copy.deepcopy(model)
    ref(x, z, shift).sum().backward()
    assert_tensors_close(oracle.grads(model, (x, z, shift)),
                         {n: p.grad for n, p in ref.named_parameters() if p.requires_grad})


def test_fisher_diagonal_is_the_mean_of_squared_per_sample_grads(setup):
    model, (x, z, shift, y) = setup
    psg = loop_per_sample_grads(model, (x, z, shift), {}, y, per_sample_mse, batched={0, 1})
    assert_tensors_close(oracle.fisher_diagonal(model, (x, z, shift), y, per_sample_mse),
                         {n: g.pow(2).mean(0) for n, g in psg.items()})


def test_make_per_sample_grads_builds_once_and_repeats(setup):
    model, (x, z, shift, y) = setup
    step = oracle.make_per_sample_grads(model, (x, z, shift), y, per_sample_mse)
    first, second = step(), step()
    assert_tensors_close(first, oracle.per_sample_grads(model, (x, z, shift), y, per_sample_mse))
    assert_tensors_close(second, first)


def test_no_batched_input_is_an_error():
    with pytest.raises(ValueError, match="batch axis"):
        oracle.per_sample_grads(nn.Linear(2, 2), (torch.tensor(1.0),))


def test_a_wrong_reference_is_detected(setup):
    """The comparisons above can fail: a reference with the loss scaled by 2, or with the samples' targets
    shuffled, disagrees with the oracle."""
    model, (x, z, shift, y) = setup
    got = oracle.per_sample_grads(model, (x, z, shift), y, per_sample_mse)
    scaled = loop_per_sample_grads(model, (x, z, shift), {}, y, lambda o, t: 2 * per_sample_mse(o, t), {0, 1})
    with pytest.raises(AssertionError):
        assert_tensors_close(got, scaled)
    shuffled = loop_per_sample_grads(model, (x, z, shift), {}, y.roll(1, 0), per_sample_mse, {0, 1})
    with pytest.raises(AssertionError):
        assert_tensors_close(got, shuffled)
