"""The tracer's glue registry: user-registered handlers, split/chunk/unbind, matmul/einsum, unknown ops.

Every symmetry claim is checked against the function (``apply_symmetry(model, s)(x) == model(x)``) with a
draw that moves something, and every claim has a negative twin (a wrong handler or a forced permutation of a
space the tracer fixed changes the function). Per-sample gradients are checked against the torch.func oracle.
"""
from dataclasses import replace

import pytest
import torch
from conftest import assert_tensors_close
from torch import nn

import gradgraph
from gradgraph.api import model_spec
from gradgraph.capture import Label, glue_ops, register_glue, tracer
from gradgraph.losses import per_sample_mse
from gradgraph.oracle import per_sample_grads

D = torch.float64


@pytest.fixture(autouse=True)
def _restore_glue_registry():
    """Handlers registered by a test are removed again (the registry is global)."""
    saved = dict(tracer._GLUE)
    yield
    tracer._GLUE.clear()
    tracer._GLUE.update(saved)


def _spaces(model, x):
    return {s.key: s for s in model_spec(model, x).spaces}


def _moving_symmetry(model, x, seed=0):
    for k in range(50):
        s = gradgraph.random_symmetry(model, generator=torch.Generator().manual_seed(seed + k), example_inputs=x)
        if not s.is_identity():
            return s
    raise AssertionError("no draw moved anything: the model has no permutable space")


def _preserves(model, s, x) -> bool:
    return torch.allclose(gradgraph.apply_symmetry(model, s)(x), model(x), rtol=1e-9, atol=1e-10)


def _check_grads(model, x, y):
    g = gradgraph.capture(model, x, y, per_sample_mse)
    assert_tensors_close(g.per_sample_grads(), per_sample_grads(model, x, y, per_sample_mse))


# -- a user-registered glue op ----------------------------------------------------------------------------
class RunningSum(nn.Module):
    """cumsum over the tokens acts on every neuron alike (equivariant), but the tracer has no handler."""

    def __init__(self, dim=1):
        super().__init__()
        self.dim = dim
        self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(4, 2)

    def forward(self, x):  # [b, T, 3]
        return self.c(torch.relu(self.b(torch.tanh(torch.cumsum(self.a(x), self.dim)))).mean(1))


def _cumsum_handler(check_axis=True):
    def cumsum(tracer, call):
        t, lab = tracer.single(call)
        dims = tracer.dims(call, 1, t.ndim) if t is not None else None
        if t is None or dims is None or lab.batch_axis in dims or (check_axis and set(dims) & set(lab.axes)):
            return tracer.unknown(call)
        return replace(lab, origin=None)  # the values changed: not the op output itself any more
    return cumsum


def test_unknown_op_fixes_its_spaces_and_names_register_glue():
    m, x = RunningSum().double(), torch.randn(3, 4, 3, dtype=D)
    spaces = _spaces(m, x)
    assert not spaces["a.out"].permutable
    reason = spaces["a.out"].reason
    assert "'cumsum'" in reason and "from gradgraph.capture import register_glue" in reason
    assert "@register_glue('cumsum')" in reason
    assert spaces["b.out"].permutable
    assert "cumsum" not in glue_ops()


def test_a_registered_glue_op_changes_the_symmetry_found():
    m, x, y = RunningSum().double(), torch.randn(3, 4, 3, dtype=D), torch.randn(3, 2, dtype=D)
    register_glue("cumsum")(_cumsum_handler())
    assert "cumsum" in glue_ops() and _spaces(m, x)["a.out"].permutable
    s = _moving_symmetry(m, x)
    assert not torch.equal(s.perms["a.out"], torch.arange(5))
    assert _preserves(m, s, x)
    _check_grads(m, x, y)


def test_a_wrong_glue_handler_is_caught_by_the_function_check():
    """Negative: a handler claiming cumsum over the neurons is equivariant makes a symmetry that is not one."""
    m, x = RunningSum(dim=-1).double(), torch.randn(3, 4, 3, dtype=D)
    assert not _spaces(m, x)["a.out"].permutable  # the correct handler refuses the neuron axis
    register_glue("cumsum")(_cumsum_handler())
    assert not _spaces(m, x)["a.out"].permutable
    register_glue("cumsum")(_cumsum_handler(check_axis=False))
    s = _moving_symmetry(m, x)
    assert not torch.equal(s.perms["a.out"], torch.arange(5))
    assert not _preserves(m, s, x)


def test_register_glue_takes_names():
    with pytest.raises(TypeError, match="register_glue"):
        register_glue(torch.cumsum)
    assert {"add", "relu", "split", "chunk", "unbind", "matmul", "__matmul__", "einsum"} <= set(glue_ops())


# -- split / chunk / tensor_split / unbind ----------------------------------------------------------------
class SplitTokens(nn.Module):
    """Cuts along the token axis: every piece keeps the neurons of a.out."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b, self.c, self.d = nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(5, 4), nn.Linear(4, 2)

    def forward(self, x):  # [b, 4, 3]
        h = torch.tanh(self.a(x))
        if self.how == "split":
            p, q = h.split([1, 3], dim=1)
        elif self.how == "chunk":
            p, q = torch.chunk(h, 2, dim=-2)
        elif self.how == "tensor_split":
            p, q = torch.tensor_split(h, [3], dim=1)
        else:
            p, q = h.unbind(1)[0], h.unbind(1)[-1]
        bp, cq = self.b(p), self.c(q)
        bp, cq = (bp.sum(1) if bp.ndim == 3 else bp), (cq.mean(1) if cq.ndim == 3 else cq)
        return self.d(torch.relu(bp + cq))


@pytest.mark.parametrize("how", ["split", "chunk", "tensor_split", "unbind"])
def test_split_along_tokens_keeps_the_symmetry(how):
    torch.manual_seed(0)
    m, x, y = SplitTokens(how).double(), torch.randn(3, 4, 3, dtype=D), torch.randn(3, 2, dtype=D)
    spaces = _spaces(m, x)
    assert spaces["a.out"].permutable and spaces["b.out"].permutable
    s = _moving_symmetry(m, x)
    assert not torch.equal(s.perms["a.out"], torch.arange(5))
    assert _preserves(m, s, x)
    _check_grads(m, x, y)


class SplitNeurons(nn.Module):
    """Cuts a.out's neurons into pieces of 2 and 4 (nanoGPT's ``q, k, v = c_attn(x).split(d, 2)`` pattern)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.a, self.b, self.c, self.d = nn.Linear(3, 6), nn.Linear(2, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):  # [b, 3]
        h = torch.tanh(self.a(x))
        if self.how == "split":
            p, q = h.split([2, 4], dim=-1)
        elif self.how == "chunk":
            p, q = h.chunk(3, dim=1)[0], torch.cat(h.chunk(3, dim=1)[1:], 1)
        else:
            p, q = torch.tensor_split(h, [2], dim=1)
        return self.d(torch.relu(self.b(p) + self.c(q)))


@pytest.mark.parametrize("how", ["split", "chunk", "tensor_split"])
def test_split_along_neurons_permutes_piece_by_piece(how):
    """A space cut along its neurons (a packed projection) is the concatenation of its pieces: each piece is a
    space of its own and the cut space permutes block by block."""
    torch.manual_seed(1)
    m, x, y = SplitNeurons(how).double(), torch.randn(4, 3, dtype=D), torch.randn(4, 2, dtype=D)
    spec = model_spec(m, x)
    spaces = {s.key: s for s in spec.spaces}
    whole = spaces["a.out"]
    assert whole.permutable and whole.parts and sum(spec.spaces[i].size for i in whole.parts) == 6
    assert spaces["b.out"].permutable  # b and c are added: one space, still free
    s = _moving_symmetry(m, x)
    p = s.perms["a.out"]
    assert set(p[:2].tolist()) == {0, 1}  # block by block: the first piece stays the first piece
    assert _preserves(m, s, x)
    _check_grads(m, x, y)
    # negative: a permutation that moves neurons between the pieces changes the function
    s.perms["a.out"] = torch.tensor([2, 1, 0, 3, 4, 5])
    assert not _preserves(m, s, x)


def test_a_space_cut_twice_or_fixed_fixes_its_pieces():
    class CutTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c, self.d = nn.Linear(3, 4), nn.Linear(2, 2), nn.Linear(1, 2), nn.Linear(2, 2)

        def forward(self, x):
            h = torch.tanh(self.a(x))
            p, q = h.split(2, -1)
            r, t = h.split([1, 3], -1)
            return self.b(p) + self.c(r) + self.d(q[:, :2] * t[:, :2]) + h[:, :2]

    m, x = CutTwice().double(), torch.randn(3, 3, dtype=D)
    spaces = _spaces(m, x)
    assert not spaces["a.out"].permutable
    assert not any(s.permutable for k, s in spaces.items() if k.startswith("a.out:"))
    s = gradgraph.random_symmetry(m, example_inputs=x)
    assert _preserves(m, s, x)


def test_unbind_along_neurons_fixes_the_space():
    class Unbind(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

        def forward(self, x):
            u, v = self.a(x).unbind(-1)
            return self.b(x) * u[:, None] - v[:, None]

    m, x = Unbind().double(), torch.randn(3, 3, dtype=D)
    spaces = _spaces(m, x)
    assert not spaces["a.out"].permutable and "unbind" in spaces["a.out"].reason
    s = gradgraph.random_symmetry(m, example_inputs=x)
    assert _preserves(m, s, x)
    s.perms["a.out"] = torch.tensor([1, 0])  # negative: u and v play different roles
    assert not _preserves(m, s, x)


# -- matmul / @ / bmm / einsum ----------------------------------------------------------------------------
class SingleHeadAttention(nn.Module):
    """softmax(q k^T) v from plain linears, with ``@`` or einsum or bmm."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.q, self.k, self.v, self.o = nn.Linear(3, 4), nn.Linear(3, 4), nn.Linear(3, 5), nn.Linear(5, 2)

    def forward(self, x):  # [b, T, 3]
        q, k, v = self.q(x), self.k(x), self.v(x)
        if self.how == "@":
            w = (q @ k.transpose(-2, -1) / 2).softmax(-1)
            y = w @ v
        elif self.how == "einsum":
            w = torch.einsum("btd,bsd->bts", q, k).softmax(-1)
            y = torch.einsum("b...s,bsd->b...d", w, v)
        else:
            w = torch.bmm(q, k.transpose(1, 2)).softmax(-1)
            y = torch.matmul(w, v)
        return self.o(torch.relu(y))


@pytest.mark.parametrize("how", ["@", "einsum", "bmm"])
def test_query_key_products_tie_the_spaces(how):
    torch.manual_seed(2)
    m, x, y = SingleHeadAttention(how).double(), torch.randn(3, 4, 3, dtype=D), torch.randn(3, 4, 2, dtype=D)
    spaces = _spaces(m, x)
    assert "k.out" not in spaces  # tied to q.out
    assert spaces["q.out"].permutable and spaces["v.out"].permutable
    s = _moving_symmetry(m, x)
    assert not torch.equal(s.perms["q.out"], torch.arange(4))
    assert _preserves(m, s, x)
    _check_grads(m, x, y)


def test_an_untied_query_key_product_is_caught_by_the_function_check():
    """Negative: a matmul handler that forgets the tie lets q and k permute independently: not a symmetry."""
    m, x = SingleHeadAttention("@").double(), torch.randn(3, 4, 3, dtype=D)
    register_glue("matmul")(lambda tracer, call: Label(None, (), 0))
    spaces = _spaces(m, x)
    assert spaces["q.out"].permutable and spaces["k.out"].permutable
    s = _moving_symmetry(m, x)
    assert not torch.equal(s.perms["q.out"], s.perms["k.out"])
    assert not _preserves(m, s, x)


class ConstantProducts(nn.Module):
    """A constant mixing the tokens (keeps a.out free), and a constant contracted with b.out's neurons."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(3, 5), nn.Linear(5, 4), nn.Linear(6, 2)
        self.register_buffer("mix", torch.randn(4, 4, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("proj", torch.randn(4, 6, generator=torch.Generator().manual_seed(1)))

    def forward(self, x):  # [b, 4, 3]
        h = torch.tanh(self.mix @ self.a(x))  # [T, T] @ [b, T, 5]: over tokens
        return self.c(torch.tanh(self.b(h)) @ self.proj)  # [b, T, 4] @ [4, 6]: over b.out's neurons


def test_products_with_constants():
    torch.manual_seed(3)
    m, x, y = ConstantProducts().double(), torch.randn(3, 4, 3, dtype=D), torch.randn(3, 4, 2, dtype=D)
    spaces = _spaces(m, x)
    assert spaces["a.out"].permutable
    assert not spaces["b.out"].permutable and "contracted with a constant" in spaces["b.out"].reason
    s = _moving_symmetry(m, x)
    assert not torch.equal(s.perms["a.out"], torch.arange(5))
    assert _preserves(m, s, x)
    _check_grads(m, x, y)
    s.perms["b.out"] = torch.tensor([1, 0, 2, 3])  # negative: b.out is fixed for a reason
    assert not _preserves(m, s, x)


def test_a_product_over_the_batch_mixes_samples():
    class Gram(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 4)

        def forward(self, x):
            h = self.a(x)
            return h @ h.T  # [b, b]: sample i's output depends on sample j

    with pytest.raises(gradgraph.SampleMixingError, match="batch"):
        gradgraph.capture(Gram(), torch.randn(3, 3))


class RowMLP(nn.Module):
    """An MLP run on [b*T, d] rows (``h.reshape(-1, d)``, as Hugging Face's OPT does), with a LayerNorm and a
    residual addition on the rows; ``order``: 'batch' merges (b, T) sample-major, 'time' merges (T, b) (then a
    row of the [b*T, d] view is not one sample's), 'sum' adds up all rows (mixes samples)."""

    def __init__(self, order="batch"):
        super().__init__()
        self.order = order
        self.inp, self.norm, self.fc1, self.fc2 = nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 6), nn.Linear(6, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        h = self.inp(x)
        shape = h.shape
        rows = (h if self.order != "time" else h.transpose(0, 1)).reshape(-1, h.shape[-1])
        r = rows + self.fc2(torch.relu(self.fc1(self.norm(rows))))
        if self.order == "sum":
            r = r + r.sum(0)
        if self.order == "time":
            return self.out(r.view(shape[1], shape[0], -1).transpose(0, 1))
        return self.out(r.view(shape))


def test_ops_on_rows_of_merged_batch_and_time_run_per_sample():
    """[b, T, d] -> [b*T, d] (sample-major) -> linear/LayerNorm -> view back: exact per-sample gradients, the
    ops' activations are [b, T, ...] per sample, the hidden units and the stream permute. Negatives: the rows
    merged time-major, or summed over, are refused, and moving fc1's units without fc2 changes the function."""
    torch.manual_seed(4)
    m, x, y = RowMLP().double(), torch.randn(3, 5, 3, dtype=D), torch.randn(3, 5, 2, dtype=D)
    _check_grads(m, x, y)
    g = gradgraph.capture(m, x, y, per_sample_mse)
    assert all(g.spec.layers[op.in_layer].space is not None for op in g.spec.ops)
    spaces = _spaces(m, x)
    assert spaces["fc1.out"].permutable and spaces["inp.out"].permutable
    s = _moving_symmetry(m, x)
    assert _preserves(m, s, x)
    broken = gradgraph.apply_symmetry(m, s)
    with torch.no_grad():
        broken.fc1.weight.copy_(broken.fc1.weight.roll(1, 0))
        broken.fc1.bias.copy_(broken.fc1.bias.roll(1, 0))
    assert not torch.allclose(broken(x), m(x))
    for order in ("time", "sum"):
        with pytest.raises(gradgraph.SampleMixingError):
            gradgraph.capture(RowMLP(order).double(), x, y, per_sample_mse)


class CumsumPositions(nn.Module):
    """Position ids from a per-sample mask, ``mask.cumsum(1) * mask - 1`` (OPT's), looked up in a table."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos, self.out = nn.Embedding(7, 4), nn.Embedding(8, 4), nn.Linear(4, 2)

    def forward(self, ids, mask):
        pos = (mask.cumsum(1) * mask - 1).long() + 2
        return self.out(self.tok(ids) + self.pos(pos))


def test_position_ids_from_a_cumsum_over_a_padded_mask():
    """The ids are input data (cumsum has no glue handler: it only keeps its input's spaces from moving, and a
    mask has none), so the lookups are exact per sample with padding, and the token stream still permutes."""
    torch.manual_seed(5)
    m = CumsumPositions().double()
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, :2] = 0
    inputs, y = {"ids": torch.randint(7, (3, 5)), "mask": mask}, torch.randn(3, 5, 2, dtype=D)
    g = gradgraph.capture(m, inputs, y, per_sample_mse)
    assert_tensors_close(g.per_sample_grads(), per_sample_grads(m, inputs, y, per_sample_mse), rtol=1e-9)
    spaces = _spaces(m, inputs)
    assert spaces["tok.out"].permutable
    s = _moving_symmetry(m, inputs)
    assert torch.allclose(gradgraph.apply_symmetry(m, s)(**inputs), m(**inputs), rtol=1e-9, atol=1e-10)
