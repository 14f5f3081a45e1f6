import os
import sys
import warnings

# One intra-op thread for the suite and the notebooks and subprocesses it starts: the tests run small ops, and
# on a machine with other work, OpenMP threads that spin-wait for a descheduled partner made the suite 7x slower
# (392 s against 54 s on 2 busy cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.func import functional_call, grad, vmap  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # in case torch was imported first
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("MPLBACKEND", "Agg")
# torch.func has no batching rule for CPU flash attention: a slow fallback, results are exact
warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")


def reference_per_sample_grads(model, inputs, targets, loss_fn):
    """Per-sample gradients by torch.func: vmap over samples of grad of the single-sample loss."""
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}

    def one(p, x, y):
        out = functional_call(model, p, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0)).sum()

    return vmap(grad(one), in_dims=(None, 0, 0))(params, inputs, targets)


def autograd_grads(model, inputs, targets, loss_fn):
    """Gradient of the summed loss by plain autograd (on parameter copies, .grad of the model untouched)."""
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters() if v.requires_grad}
    out = functional_call(model, params, (inputs,))
    gs = torch.autograd.grad(loss_fn(out, targets).sum(), list(params.values()))
    return dict(zip(params, gs))


def assert_tensors_close(got: dict, want: dict, rtol=1e-6):
    """Relative agreement with an absolute floor at rtol x the largest reference magnitude (some gradients,
    like the key bias of attention, are analytically zero)."""
    assert set(got) == set(want), (sorted(got), sorted(want))
    scale = max(float(v.abs().max()) for v in want.values()) if want else 1.0
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=rtol, atol=rtol * scale, msg=lambda m, k=k: f"{k}: {m}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
