"""Every refusal is explicit: unsupported modules, sample mixing, non-finite values, bad losses, weight
sharing, unused parameters."""
import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import gradgraph
from gradgraph import oracle
from gradgraph.losses import per_sample_mse


class RawParam(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.inner = nn.Module()
        self.inner.w = nn.Parameter(torch.randn(3, 2))

    def forward(self, x):
        return self.lin(x) @ self.inner.w


def test_unsupported_module_names_path_type_and_alternatives():
    with pytest.raises(gradgraph.UnsupportedModuleError) as e:
        gradgraph.capture(RawParam(), torch.randn(4, 3))
    msg = str(e.value)
    assert "'inner'" in msg and "torch.nn.modules.module.Module" in msg and "['inner.w']" in msg and "'matmul'" in msg
    assert "Linear" in msg and "register_rule" in msg and "requires_grad_(False)" in msg


def test_frozen_unsupported_parameters_are_fine():
    m = RawParam()
    m.inner.w.requires_grad_(False)
    g = gradgraph.capture(m, torch.randn(4, 3))
    assert set(g.per_sample_grads()) == {"lin.weight", "lin.bias"}


def test_subclass_overriding_forward_needs_its_own_rule():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(gradgraph.UnsupportedModuleError, match="Doubled"):
        gradgraph.capture(nn.Sequential(Doubled(2, 2)), torch.randn(3, 2))


def test_custom_rule_with_packed_weights():
    class Packed(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(6, 3, dtype=torch.float64))

        def forward(self, x):
            return torch.tanh(x @ self.weight[:3].T) @ self.weight[3:].T

    @gradgraph.register_rule(Packed)
    def packed_rule(ctx, m, x):
        h = torch.tanh(ctx.linear(x, ctx.rows(m.weight, 0, 3), name="first"))
        return ctx.linear(h, ctx.rows(m.weight, 3, 6), name="second")

    from conftest import assert_tensors_close

    m = Packed()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    g = gradgraph.capture(m, x, y, per_sample_mse)
    assert_tensors_close(g.per_sample_grads(), oracle.per_sample_grads(m, x, y, per_sample_mse))
    assert [op.name for op in g.spec.ops] == ["<root>:first", "<root>:second"]


def test_batchnorm_in_training_mode_is_refused():
    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(8, 1))
    with pytest.raises(gradgraph.SampleMixingError, match="eval"):
        gradgraph.capture(m, torch.randn(3, 1, 4, 4))
    m.eval()
    gradgraph.capture(m, torch.randn(3, 1, 4, 4))


def test_reduction_over_the_batch_is_refused():
    class BatchMean(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(2, 3), nn.Linear(3, 1)

        def forward(self, x):
            h = self.a(x)
            return self.b(h - h.mean(0, keepdim=True))

    with pytest.raises(gradgraph.SampleMixingError, match="batch axis"):
        gradgraph.capture(BatchMean(), torch.randn(4, 2))


def test_op_shared_across_samples_is_refused():
    class SharedPos(nn.Module):
        def __init__(self):
            super().__init__()
            self.tok, self.pos = nn.Embedding(5, 4), nn.Embedding(3, 4)

        def forward(self, idx):
            return self.tok(idx) + self.pos(torch.arange(idx.shape[1]))

    with pytest.raises(gradgraph.SampleMixingError, match="expand"):
        gradgraph.capture(SharedPos(), torch.randint(5, (2, 3)))
    with pytest.raises(gradgraph.SampleMixingError, match="expand"):  # T == b: caught by the broadcast check
        gradgraph.capture(SharedPos(), torch.randint(5, (3, 3)))


def test_non_finite_gradients_are_refused():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    x = torch.randn(3, 2)
    x[1, 0] = float("inf")
    with pytest.raises(gradgraph.NonFiniteGradientError, match="'0'|'1'"):
        gradgraph.capture(m, x)
    with pytest.raises(gradgraph.NonFiniteGradientError):
        gradgraph.capture(m, torch.randn(3, 2), torch.randn(3, 1), lambda o, y: (o - y).sum(1) / 0.0)


def test_loss_must_be_per_sample():
    m = nn.Linear(2, 1)
    x, y = torch.randn(3, 2), torch.randn(3, 1)
    with pytest.raises(gradgraph.LossShapeError, match=r"shape \[3\]"):
        gradgraph.capture(m, x, y, lambda o, t: F.mse_loss(o, t))
    with pytest.raises(gradgraph.LossShapeError):
        gradgraph.capture(m, x, y, lambda o, t: F.mse_loss(o, t, reduction="none"))  # [3, 1]
    with pytest.raises(gradgraph.LossShapeError, match="tensor output"):
        gradgraph.capture(nn.Sequential(nn.Linear(2, 2), _Tuple()), x)


class _Tuple(nn.Module):
    def forward(self, x):
        return x, x


class _Overlap(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 3))


@gradgraph.register_rule(_Overlap)
def _overlap_rule(ctx, m, x):
    return ctx.linear(x, ctx.rows(m.weight, 0, 4)).sum(-1, keepdim=True) + ctx.linear(x, ctx.rows(m.weight, 2, 6),
                                                                                      name="second")


def test_partly_overlapping_uses_of_a_parameter_are_refused():
    """Sharing a whole parameter (or the same rows) is weight sharing; overlapping different blocks is not."""
    with pytest.raises(gradgraph.UnsupportedModuleError, match="overlapping but different blocks"):
        gradgraph.capture(_Overlap(), torch.randn(2, 3))


def test_unused_parameters_are_named():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(2, 2), nn.Linear(2, 2)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(gradgraph.UnsupportedModuleError, match="spare.weight"):
        gradgraph.capture(Unused(), torch.randn(3, 2))


def test_unsupported_configurations_explain_themselves():
    with pytest.raises(gradgraph.UnsupportedModuleError, match="'<root>' \\(torch.nn.modules.conv.Conv3d\\)"):
        gradgraph.capture(nn.Conv3d(4, 4, 3), torch.randn(2, 4, 5, 5, 5))  # grouped convs: tests/test_zoo_bare.py
    with pytest.raises(gradgraph.UnsupportedModuleError, match="batch_first"):
        mha = nn.MultiheadAttention(4, 2)
        gradgraph.capture(_SelfAttn(mha), torch.randn(3, 2, 4))
    with pytest.raises(gradgraph.UnsupportedModuleError, match="max_norm"):
        gradgraph.capture(nn.Embedding(5, 3, max_norm=1.0), torch.randint(5, (2, 3)))


class _SelfAttn(nn.Module):
    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, x):
        return self.mha(x, x, x)[0]


def test_a_parameter_used_by_the_models_own_code_is_refused_not_half_differentiated():
    class GlueUse(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)

        def forward(self, ids):
            return self.emb(ids) @ self.emb.weight.T  # the second use is plain torch code, not a module

    with pytest.raises(gradgraph.UnsupportedModuleError, match=r"\['emb.weight'\] are used by the torch function 'T'"):
        gradgraph.capture(GlueUse(), torch.randint(7, (3, 2)))
    frozen = GlueUse()
    frozen.emb.weight.requires_grad_(False)  # a frozen parameter is a constant: captured, nothing to refuse
    assert gradgraph.capture(frozen, torch.randint(7, (3, 2))).num_params == 0


def _mlp():
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


@pytest.mark.parametrize("call,error,match", [
    (lambda m: gradgraph.capture(m, torch.randn(5, 3), torch.randn(5, 1)), "LossShapeError", "without a loss_fn"),
    (lambda m: gradgraph.capture(m, torch.randn(0, 3)), "GradGraphError", "the batch is empty"),
    (lambda m: gradgraph.capture(m, torch.randn(5, 3), torch.randn(4, 1), per_sample_mse), "LossShapeError",
     r"targets have \[4\] rows but the batch has 5"),
    (lambda m: gradgraph.capture(m, torch.randn(5, 3), torch.randn(5, 1), lambda o, y: torch.zeros(5)),
     "LossShapeError", "do not depend on the model"),
    (lambda m: gradgraph.capture(m, torch.randn(5, 3), torch.randn(5), per_sample_mse), "LossShapeError",
     "same shape"),
])
def test_bad_capture_inputs_name_the_culprit(call, error, match):
    with pytest.raises(getattr(gradgraph, error), match=match):
        call(_mlp())


def test_capture_modes_and_constant_arguments():
    m = _mlp()
    with torch.inference_mode(), pytest.raises(gradgraph.GradGraphError, match="inference_mode"):
        gradgraph.capture(m, torch.randn(5, 3))
    with torch.no_grad():  # capture turns autograd on for its own pass
        assert gradgraph.capture(m, torch.randn(5, 3)).num_samples == 5

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, k, x):
            return self.lin(x) * k

    x = torch.randn(5, 3, dtype=torch.float64)
    model = Scaled().double()
    graph = gradgraph.capture(model, (torch.tensor(2.0, dtype=torch.float64), x))  # a 0-d constant first
    assert graph.num_samples == 5
    ref = oracle.per_sample_grads(model, (torch.tensor(2.0, dtype=torch.float64), x))
    torch.testing.assert_close(graph.per_sample_grads()["lin.weight"], ref["lin.weight"])


class _Checkpointed(torch.nn.Module):
    def __init__(self, use_checkpoint=True):
        super().__init__()
        self.a, self.b, self.use_checkpoint = torch.nn.Linear(4, 5), torch.nn.Linear(5, 3), use_checkpoint

    def forward(self, x):
        def inner(z):
            return torch.relu(self.a(z))
        h = torch.utils.checkpoint.checkpoint(inner, x, use_reentrant=False) if self.use_checkpoint else inner(x)
        return self.b(h)


def test_activation_checkpointing_recomputation_is_named_not_called_weight_sharing():
    torch.manual_seed(0)
    m, x, y = _Checkpointed(), torch.randn(6, 4), torch.randint(3, (6,))
    with pytest.raises(gradgraph.GradGraphError, match="module 'a' ran again during the backward pass: activation "
                                                       "checkpointing"):
        with gradgraph.GradientRecorder(m):
            F.cross_entropy(m(x), y, reduction="sum").backward()
    # capture() records the forward once and differentiates its outputs: checkpointing does not matter there
    g = gradgraph.capture(m, x, y, lambda o, t: F.cross_entropy(o, t, reduction="none"))
    assert [op.name for op in g.spec.ops] == ["a", "b"]
    m.use_checkpoint = False
    ref = oracle.per_sample_grads(m, x, y, lambda o, t: F.cross_entropy(o, t, reduction="none"))
    for name, value in g.per_sample_grads().items():
        torch.testing.assert_close(value, ref[name])
