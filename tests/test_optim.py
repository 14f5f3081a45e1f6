"""gradgraph.optim: the LearnedOptimizer API (closure and record paths, state, errors), its features against
independent references, and equivariance of every variant (with a negative test)."""
import copy

import pytest
import torch
import torch.nn.functional as F

import gradgraph
from gradgraph.models.reference import MLP
from gradgraph.optim import VARIANTS, LearnedOptimizer, RecordError
from gradgraph.optim.features import DECAYS, TIMESCALES, segments, unf_features
from gradgraph.optim.variants import DS, DSGradMetaNet, param_neurons

ALL = VARIANTS.names()


def _batch(n=16, d=8, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randint(k, (n,), generator=g)


def _meta(variant, seed=1):
    """A variant with non-trivial (random) meta-parameters: F != 0 and visible in the update."""
    torch.manual_seed(seed)
    meta = VARIANTS.build(variant)
    with torch.no_grad():
        for name, p in meta.named_parameters():
            if name.startswith("mlp."):
                p.normal_(0, 0.5)
        meta.log_beta.fill_(-1.0)
    return meta


def _run(model, opt, batches, closure=True):
    for x, y in batches:
        if closure:
            def step(x=x, y=y):
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                return loss
            opt.step(step)
        else:
            opt.zero_grad()
            with opt.record():
                F.cross_entropy(model(x), y).backward()
            opt.step()


@pytest.mark.parametrize("variant", ALL)
def test_closure_and_record_paths_agree_and_move(variant):
    torch.manual_seed(0)
    m1 = MLP(8, (16,), 4)
    m2 = copy.deepcopy(m1)
    batches = [_batch(seed=s) for s in range(3)]
    _run(m1, LearnedOptimizer(m1, variant, meta=_meta(variant)), batches, closure=True)
    _run(m2, LearnedOptimizer(m2, variant, meta=_meta(variant)), batches, closure=False)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert not torch.equal(m1.net[0].weight, MLP(8, (16,), 4).net[0].weight)


def test_sgdm_matches_an_independent_ema_momentum_sgd():
    torch.manual_seed(0)
    model = MLP(8, (16,), 4)
    ref = copy.deepcopy(model)
    meta = VARIANTS.build("sgdm", alpha=0.05, mu=0.8)
    opt = LearnedOptimizer(model, "sgdm", meta=meta)
    m = [torch.zeros_like(p) for p in ref.parameters()]
    for s in range(4):
        x, y = _batch(seed=s)
        _run(model, opt, [(x, y)])
        ref.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        with torch.no_grad():
            for p, mm in zip(ref.parameters(), m):
                mm.mul_(0.8).add_(0.2 * p.grad)
                p.sub_(0.05 * mm)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


def test_untrained_ds_is_sgdm():
    """F's output layer starts at zero: every untrained variant steps like SGDM(0.1, 0.9)."""
    runs = []
    for variant in ALL:
        torch.manual_seed(0)
        model = MLP(8, (16,), 4)
        _run(model, LearnedOptimizer(model, variant), [_batch(seed=s) for s in range(2)])
        runs.append([p.detach().clone() for p in model.parameters()])
    for other in runs[1:]:
        for p, q in zip(runs[0], other):
            torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_features_match_a_per_tensor_loop():
    torch.manual_seed(0)
    shapes = [(5, 3), (5,), (2, 5)]
    params = [torch.randn(s) * 3 for s in shapes]
    grads = [torch.randn(s) * 0.2 for s in shapes]
    moms = [torch.randn(*s, len(DECAYS)) for s in shapes]
    seg, counts = segments([p.numel() for p in params])
    flat = lambda ts, c=None: torch.cat([t.reshape(-1) if c is None else t.reshape(-1, c) for t in ts])  # noqa
    got = unf_features(flat(params), flat(grads), flat(moms, len(DECAYS)), 7, seg, counts)
    rows = []
    for p, g, m in zip(params, grads, moms):
        cols = [p.reshape(-1), g.reshape(-1)] + [m.reshape(-1, len(DECAYS))[:, k] for k in range(len(DECAYS))]
        vals = []
        for c in cols:
            c = c.clamp(-1, 1)
            vals.append(c / (c.pow(2).mean().sqrt() + 1e-12))
        t = [torch.full_like(cols[0], float(torch.tanh(torch.tensor(7 / tau - 1.0)))) for tau in TIMESCALES]
        rows.append(torch.stack(vals + t, 1))
    torch.testing.assert_close(got, torch.cat(rows))
    assert got.shape[1] == 19


def test_param_neurons_of_an_mlp():
    model = MLP(3, (4,), 2)
    graph = gradgraph.capture(model, *_batch(5, 3, 2), loss_fn=lambda o, y: F.cross_entropy(o, y, reduction="none"))
    out, inp = param_neurons(graph)
    N = graph.spec.num_nodes  # nodes: 3 inputs, 4 hidden, 2 outputs
    want_out = ([3 + j for j in range(4) for _ in range(3)] + [3, 4, 5, 6]
                + [7 + j for j in range(2) for _ in range(4)] + [7, 8])
    want_in = [i for _ in range(4) for i in range(3)] + [N] * 4 + [3 + i for _ in range(2) for i in range(4)] + [N] * 2
    assert out.tolist() == want_out and inp.tolist() == want_in


def test_state_dict_resume_follows_the_same_trajectory():
    variant = "ds+gradmetanet"
    batches = [_batch(seed=s) for s in range(6)]
    torch.manual_seed(0)
    model = MLP(8, (16,), 4)
    opt = LearnedOptimizer(model, variant, meta=_meta(variant))
    _run(model, opt, batches[:3])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert set(saved_opt["state"]["lopt"]) == {"step", "node_avg"} and saved_opt["state"]["lopt"]["step"] == 3
    _run(model, opt, batches[3:])
    torch.manual_seed(5)
    model2 = MLP(8, (16,), 4)
    model2.load_state_dict(saved_model)
    opt2 = LearnedOptimizer(model2, variant)  # fresh meta: the state dict carries the meta-parameters
    opt2.load_state_dict(saved_opt)
    _run(model2, opt2, batches[3:])
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert torch.equal(opt.state[model.net[0].weight]["momenta"], opt2.state[model2.net[0].weight]["momenta"])


def test_param_groups_lr_multiplies_the_step():
    torch.manual_seed(0)
    model = MLP(8, (16,), 4)
    first = list(model.net[0].parameters())
    rest = list(model.net[2].parameters())
    opt = LearnedOptimizer([{"params": first, "lr": 0.0}, {"params": rest}], "ds", meta=_meta("ds"))
    before = [p.detach().clone() for p in model.parameters()]
    _run(model, opt, [_batch()])
    assert all(torch.equal(p, q) for p, q in zip(first, before[:2]))
    assert not torch.equal(rest[0], before[2])


def test_graph_variant_errors_are_clear():
    model = MLP(8, (16,), 4)
    opt = LearnedOptimizer(model, "ds+gradmetanet")
    x, y = _batch()
    F.cross_entropy(model(x), y).backward()
    with pytest.raises(RecordError, match="nothing was recorded"):
        opt.step()
    _run(model, opt, [(x, y)], closure=False)
    with pytest.raises(RecordError, match="since the last step"):  # the record was used: it is stale now
        opt.step()
    with opt.record():
        model(x)  # no backward
    with pytest.raises(RecordError, match="no gradient was recorded"):
        opt.step()
    with pytest.raises(TypeError, match="needs the model"):
        LearnedOptimizer(model.parameters(), "ds+gradmetanet")
    with pytest.raises(ValueError, match="LearnedRule of variant 'ds'"):
        LearnedOptimizer(model, "ds", meta=VARIANTS.build("sgdm"))
    with pytest.raises(gradgraph.UnknownNameError, match="sgdm"):
        LearnedOptimizer(model, "adam")
    LearnedOptimizer(model.parameters(), "ds").step()  # non-graph variants need no record


class _PositionDependent(DS):
    """Not equivariant: F sees each entry's position in the flat vector."""

    def learned_term(self, features, ctx):
        pos = torch.linspace(-1, 1, features.shape[0])[:, None]
        return super().learned_term(features, ctx) + pos.squeeze(1) * 10


def _equivariance_gap(variant, meta, steps=3):
    torch.manual_seed(0)
    model = MLP(8, (16, 12), 4)
    sym = gradgraph.random_symmetry(model, generator=torch.Generator().manual_seed(3))
    permuted = gradgraph.apply_symmetry(model, sym)
    batches = [_batch(seed=s) for s in range(steps)]
    meta2 = copy.deepcopy(meta)
    _run(model, LearnedOptimizer(model, variant, meta=meta), batches)
    _run(permuted, LearnedOptimizer(permuted, variant, meta=meta2), batches)
    want = gradgraph.apply_symmetry(dict(model.named_parameters()), sym)
    got = dict(permuted.named_parameters())
    return max(float((got[k] - want[k]).abs().max().detach()) for k in want)


@pytest.mark.parametrize("variant", ALL)
def test_every_variant_is_equivariant(variant):
    assert _equivariance_gap(variant, _meta(variant)) < 1e-5


def test_the_equivariance_check_can_fail():
    meta = _PositionDependent()
    meta.load_state_dict(_meta("ds").state_dict())
    assert _equivariance_gap("ds", meta) > 1e-3


class _ReferenceDS(DS):
    """DS through the reference path (learned_term on [P, 19] features): not the chunked fast path."""

    def learned_term(self, features, ctx):
        return super().learned_term(features, ctx)


class _ReferenceDSGradMetaNet(DSGradMetaNet):
    def learned_term(self, features, ctx):
        return super().learned_term(features, ctx)


@pytest.mark.parametrize("variant,ref", [("ds", _ReferenceDS), ("ds+gradmetanet", _ReferenceDSGradMetaNet)])
@pytest.mark.parametrize("chunk", [5, 37, None])
def test_the_chunked_fast_step_matches_the_reference(variant, ref, chunk, monkeypatch):
    """Chunks inside one tensor and across tensor boundaries (chunk 5, 37) give the reference update."""
    import gradgraph.optim.fast as fast
    if chunk:
        monkeypatch.setattr(fast, "CHUNK", chunk)
    torch.manual_seed(0)
    model = MLP(8, (16, 12), 4)
    model2 = copy.deepcopy(model)
    meta = _meta(variant)
    meta2 = ref(**meta.hyper())
    meta2.load_state_dict(meta.state_dict())
    batches = [_batch(seed=s) for s in range(4)]
    opt, opt2 = LearnedOptimizer(model, variant, meta=meta), LearnedOptimizer(model2, variant, meta=meta2)
    _run(model, opt, batches)
    _run(model2, opt2, batches)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)  # float rounding (reassociated sums)
    w = model.net[0].weight
    torch.testing.assert_close(opt.state[w]["momenta"], opt2.state[model2.net[0].weight]["momenta"])


class _GraphOfFirstSamplesByCapture(DSGradMetaNet):
    """ds+gradmetanet whose GradMetaNet reads an independent capture of the step's first ``k`` samples."""

    k, batch = 5, None  # the test sets (model, x, y) before each step

    def extra_columns(self, ctx, dtype=torch.float32):
        model, x, y = self.batch
        graph = gradgraph.capture(model, x[:self.k], y[:self.k], lambda o, t: F.cross_entropy(o, t, reduction="none"))
        return super().extra_columns({**ctx, "graph": graph}, dtype)


def test_set_size_reads_the_first_samples_of_the_batch():
    torch.manual_seed(0)
    model = MLP(8, (16, 12), 4)
    models = [copy.deepcopy(model) for _ in range(3)]
    meta = _meta("ds+gradmetanet")
    capped = VARIANTS.build("ds+gradmetanet", set_size=5)
    capped.load_state_dict(meta.state_dict())
    ref = _GraphOfFirstSamplesByCapture()
    ref.load_state_dict(meta.state_dict())
    opts = [LearnedOptimizer(m, "ds+gradmetanet", meta=r) for m, r in zip(models, (capped, ref, meta))]
    for s in range(3):
        x, y = _batch(seed=s)
        ref.batch = (models[1], x, y)
        for m, opt in zip(models, opts):
            _run(m, opt, [(x, y)])
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(p, q) for p, q in zip(models[0].parameters(), models[2].parameters()))  # all 16
    assert capped.hyper()["set_size"] == 5 and VARIANTS.build("ds+gradmetanet", **capped.hyper()).set_size == 5
    with pytest.raises(ValueError, match="set_size"):
        VARIANTS.build("ds+gradmetanet", set_size=0)


def test_compiled_metanetwork_follows_the_eager_trajectory():
    import torch._dynamo

    torch.manual_seed(0)
    model = MLP(8, (16, 12), 4)
    model2 = copy.deepcopy(model)
    meta = _meta("ds+gradmetanet")
    meta2 = copy.deepcopy(meta)
    batches = [_batch(seed=s) for s in range(3)]
    _run(model, LearnedOptimizer(model, "ds+gradmetanet", meta=meta), batches)
    opt2 = LearnedOptimizer(model2, "ds+gradmetanet", meta=meta2, compile="aot_eager")
    _run(model2, opt2, batches)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert len(opt2._gnn._warm) == 1  # one structure: one eager call, then the compiled forward
    with pytest.raises(ValueError, match="compile"):
        LearnedOptimizer(model, "ds", compile=True)
    torch._dynamo.reset()
