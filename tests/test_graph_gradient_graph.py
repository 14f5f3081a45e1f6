"""GradientGraph: layout, parameter round trip, edges, batching of mixed architectures, networkx view."""
import pytest
import torch
from cases import make
from torch_geometric.data import Batch
from torch_geometric.loader import DataLoader

import gradgraph
from gradgraph.graph import require_set_size
from gradgraph.graph.gradient_graph import EDGE_KEYS, GradientGraph
from gradgraph.nn import GradMetaNet

FAMILIES = ["mlp", "cnn", "conv1d", "gpt", "transformer_encoder", "residual"]


def _graph(family, seed=0):
    c = make(family, seed)
    return c, gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn)


@pytest.mark.parametrize("family", FAMILIES)
def test_entries_hold_the_recorded_activations(family):
    c, g = _graph(family)
    spec = g.spec
    assert g.entry_x.shape == (spec.num_entries, 2)
    assert int(g.entry_node.max()) < g.num_nodes and int(g.entry_elem.max()) < spec.num_elements
    # features exist exactly where the mask says so; every node except unused vocabulary entries has entries
    dense = torch.cat([torch.tensor(list(lay.nodes)) for lay in spec.layers if lay.a is None or lay.a.kind == "dense"])
    assert torch.isin(dense, g.entry_node).all()
    assert not g.entry_x[~g.entry_mask].any()
    # the first layer's a is the model input (neuron axis last)
    first = g.layer_features(0, "a")
    x = c.inputs
    if x.is_floating_point():
        if family == "conv1d" and c.model.c1.padding_mode == "reflect":  # the conv sees the padded map
            x = torch.nn.functional.pad(x, (1, 1), mode="reflect")
        want = x.movedim(1, -1) if x.ndim > 2 and family in ("cnn", "conv1d") else x
        torch.testing.assert_close(first, want)
    else:
        assert torch.equal(first, x)


@pytest.mark.parametrize("family", FAMILIES)
def test_params_round_trip_is_exact(family):
    c, g = _graph(family)
    params = {n: p.detach() for n, p in c.model.named_parameters()}
    theta = g.params_to_graph(params)
    assert theta.shape == (g.num_params,)
    back = g.graph_to_params(theta)
    assert all(torch.equal(back[k], params[k]) for k in params)
    chan = {k: torch.stack([v, -v, 2 * v], -1) for k, v in params.items()}
    back = g.graph_to_params(g.params_to_graph(chan))
    assert all(torch.equal(back[k], chan[k]) for k in params)
    with pytest.raises(gradgraph.StructureMismatchError):
        g.params_to_graph({k: v for k, v in list(params.items())[1:]})
    with pytest.raises(gradgraph.StructureMismatchError):
        g.graph_to_params(theta[:-1])


def _expected_weight_entries(g, params):
    """Independent reading of every weight entry from the parameter tensors, per op kind."""
    spec = g.spec
    vals = torch.empty(g.wentry_theta.numel(), dtype=torch.float64)
    src, dst = g.edge_index
    for k, op in enumerate(spec.ops):
        if op.weight is None:
            continue
        lin, lout = spec.layers[op.in_layer], spec.layers[op.out_layer]
        W = params[op.weight.name]
        if op.weight.rows:
            W = W[op.weight.rows[0]:op.weight.rows[1]]
        sel = (g.edge_op[g.wentry_edge] == k).nonzero().squeeze(1)
        e = g.wentry_edge[sel]
        i, j, o = src[e] - lin.node_start, dst[e] - lout.node_start, g.wentry_offset[sel]
        if op.kind == "embedding":
            vals[sel] = W[i, j]
        elif op.kind == "diag":
            vals[sel] = W[j]
        else:
            vals[sel] = W.reshape(lout.size, lin.size, -1)[j, i, o]
    return vals


@pytest.mark.parametrize("family", FAMILIES)
def test_edges_map_each_weight_to_its_neurons(family):
    c, g = _graph(family)
    g.materialize_edges()
    params = {n: p.detach() for n, p in c.model.named_parameters()}
    theta = g.params_to_graph(params)
    assert g.edge_index.shape == (2, g.num_edges) == (2, g.spec.num_edges())
    # every trainable scalar is exactly one weight entry or one bias entry
    assert torch.equal(torch.sort(torch.cat([g.wentry_theta, g.bentry_theta])).values, torch.arange(g.num_params))
    torch.testing.assert_close(theta[g.wentry_theta], _expected_weight_entries(g, params))
    # bias entries sit on the op's output nodes, in order
    for op in g.spec.ops:
        if op.bias is not None:
            b = params[op.bias.name]
            b = b[op.bias.rows[0]:op.bias.rows[1]] if op.bias.rows else b
            nodes = torch.tensor(list(g.spec.layers[op.out_layer].nodes))
            in_range = torch.arange(*g.spec.theta_range(op.bias))
            sel = torch.isin(g.bentry_node, nodes) & torch.isin(g.bentry_theta, in_range)
            torch.testing.assert_close(theta[g.bentry_theta[sel]], b)


def test_mixed_architectures_batch_and_unbatch():
    graphs = [_graph(f, 1)[1] for f in ("mlp", "cnn", "gpt", "transformer_encoder")]
    for gr in graphs[:2]:
        gr.materialize_edges()
    raw = [_graph(f, 1)[1] for f in ("mlp", "cnn", "gpt", "transformer_encoder")]
    batch = next(iter(DataLoader(raw, batch_size=4)))
    assert batch.num_graphs == 4 and batch.num_nodes == sum(gr.num_nodes for gr in raw)
    # indices point into each graph's own block
    assert torch.equal(batch.batch[batch.entry_node], torch.repeat_interleave(
        torch.arange(4), torch.tensor([gr.entry_x.shape[0] for gr in raw])))
    per_sample_graph = torch.repeat_interleave(torch.arange(4), torch.tensor([gr.num_samples for gr in raw]))
    assert torch.equal(per_sample_graph[batch.elem_sample[batch.entry_elem]], batch.batch[batch.entry_node])
    for gr, back in zip(raw, batch.to_data_list()):
        assert torch.equal(gr.entry_x, back.entry_x) and torch.equal(gr.entry_elem, back.entry_elem)
        assert back.spec is gr.spec or back.spec == gr.spec
        assert back.per_sample_grads().keys() == gr.per_sample_grads().keys()
    # edges materialized on the batch equal the per-graph edges batched by PyG
    batch.materialize_edges()
    for gr in raw:
        gr.materialize_edges()
    rebatched = next(iter(DataLoader(raw, batch_size=4)))
    for key in ("edge_index", "edge_op", "wentry_edge", "wentry_theta", "bentry_node", "bentry_theta"):
        assert torch.equal(batch[key], rebatched[key]), key
    # decoding a batch gives one dict per graph
    theta = torch.randn(sum(gr.num_params for gr in raw), dtype=torch.float64)
    dicts = batch.graph_to_params(theta)
    for gr, d, t in zip(raw, dicts, theta.split([gr.num_params for gr in raw])):
        assert all(torch.equal(d[k], v) for k, v in gr.graph_to_params(t).items())


def test_fast_construction_equals_pyg_construction():
    """from_parts fills PyG's store directly; the result must be what the public constructor gives."""
    _, g = _graph("gpt")
    slow = GradientGraph(**{k: v for k, v in g._store.items()})
    assert list(slow.keys()) == list(g.keys()) and slow.num_nodes == g.num_nodes == g.spec.num_nodes
    for k in g.keys():
        assert (torch.equal(g[k], slow[k]) if isinstance(g[k], torch.Tensor) else g[k] == slow[k]), k
    batch = next(iter(DataLoader([g, slow], batch_size=2)))
    assert batch.num_nodes == 2 * g.num_nodes and batch.entry_node.max() == 2 * g.num_nodes - 1


def test_set_size_checks():
    c, a = _graph("mlp", 0)
    b = gradgraph.capture(c.model, c.inputs[:2], c.targets[:2], c.loss_fn)
    assert a.num_samples != b.num_samples
    batch = next(iter(DataLoader([a, b], batch_size=2)))
    with pytest.raises(gradgraph.SetSizeMismatchError):
        require_set_size(batch)
    assert require_set_size(a) == a.num_samples
    with pytest.raises(gradgraph.SetSizeMismatchError, match="sets of 99"):
        require_set_size(a, 99)


def test_to_networkx():
    _, g = _graph("cnn", 2)
    nxg = g.to_networkx()
    assert nxg.number_of_nodes() == g.num_nodes and nxg.number_of_edges() == g.num_edges
    roles = {d["role"] for _, d in nxg.nodes(data=True)}
    assert roles == {"input", "hidden", "output"}
    kinds = {d["kind"] for _, _, d in nxg.edges(data=True)}
    assert "conv" in kinds


def test_feature_bytes_are_linear_in_neurons():
    """For a wide MLP the features cost (d_in + d_out)/(d_in d_out) of per-sample gradients per layer."""
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
    g = gradgraph.capture(m, torch.randn(8, 256))
    ratio = g.feature_bytes() / g.per_sample_grad_bytes()
    assert ratio < 0.03  # 2 floats per neuron and sample vs ~65k weights per sample
    assert "feature bytes" in g.summary()


@pytest.mark.parametrize("family", ["mlp", "gpt"])
def test_graphs_of_one_structure_share_index_tensors_but_not_features(family):
    """Captures of the same model and batch shape share their spec and its cached index tensors; each keeps
    its own features, and a vocabulary's token ids stay with their own graph."""
    c = make(family, 0)
    first = gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn)
    want = {k: v.clone() for k, v in first.per_sample_grads().items()}
    if family == "gpt":
        other = torch.randint(c.model.vocab_size, c.inputs.shape)
    else:
        other = torch.randn_like(c.inputs)
    second = gradgraph.capture(c.model, other, c.targets, c.loss_fn)
    assert second.spec is first.spec
    assert second.entry_elem is first.entry_elem and second.entry_mask is first.entry_mask
    assert second.entry_x.data_ptr() != first.entry_x.data_ptr()
    assert (second.entry_node is first.entry_node) == (family == "mlp")
    for k, v in first.per_sample_grads().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)


def _other_inputs(c):
    if c.name == "gpt":
        return torch.randint(c.model.vocab_size, c.inputs.shape, generator=torch.Generator().manual_seed(7))
    return torch.randn(c.inputs.shape, generator=torch.Generator().manual_seed(7), dtype=c.inputs.dtype)


@pytest.mark.parametrize("family", ["mlp", "gpt"])
def test_a_dropped_graphs_buffers_are_reused_and_a_live_ones_never(family):
    """The feature buffers of a graph nobody holds any more are written again by the next capture (no fresh
    pages to fault in), with the same values a fresh buffer gets; a graph that is alive, or whose entry_x or
    entry_node survives as a view or a numpy array, keeps its own values."""
    c = make(family, 0)
    other = _other_inputs(c)
    fresh = gradgraph.capture(c.model, other, c.targets, c.loss_fn)
    want_x, want_node = fresh.entry_x.clone(), fresh.entry_node.clone()
    ptr = fresh.entry_x.data_ptr()
    del fresh
    again = gradgraph.capture(c.model, other, c.targets, c.loss_fn)
    assert again.entry_x.data_ptr() == ptr  # reused
    torch.testing.assert_close(again.entry_x, want_x, rtol=0, atol=0)
    torch.testing.assert_close(again.entry_node, want_node, rtol=0, atol=0)
    # alive: the graph itself, a slice of its features, a numpy view of its token nodes
    kept_x, kept_node = again.entry_x.clone(), again.entry_node.clone()
    for hold in ("graph", "slice", "numpy"):
        held = {"graph": lambda g: g, "slice": lambda g: (g.entry_x[:, 1], g.entry_node[1:]),
                "numpy": lambda g: (g.entry_x.numpy(), g.entry_node.numpy())}[hold](again)
        del again
        new = gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn)
        assert new.entry_x.data_ptr() != ptr, hold
        x_now, node_now = ((held.entry_x, held.entry_node) if hold == "graph" else
                           (torch.as_tensor(held[0]), torch.as_tensor(held[1])))
        torch.testing.assert_close(x_now, kept_x[:, 1] if hold == "slice" else kept_x, rtol=0, atol=0)
        torch.testing.assert_close(node_now, kept_node[1:] if hold == "slice" else kept_node, rtol=0, atol=0)
        del new
        again = gradgraph.capture(c.model, other, c.targets, c.loss_fn)
        ptr = again.entry_x.data_ptr()
        del held


def test_captures_in_threads_never_share_a_buffer():
    """Threads capturing copies of one model at once (copies share one spec, and so its cached buffers) each
    get a graph with its own, correct features."""
    import copy
    from concurrent.futures import ThreadPoolExecutor

    c = make("gpt", 0)
    inputs = [_other_inputs(c) if k % 2 else c.inputs for k in range(8)]
    want = [gradgraph.capture(c.model, x, c.targets, c.loss_fn).entry_x.clone() for x in inputs[:2]]
    models = [copy.deepcopy(c.model) for _ in inputs]
    with ThreadPoolExecutor(4) as pool:
        graphs = list(pool.map(lambda mx: gradgraph.capture(mx[0], mx[1], c.targets, c.loss_fn), zip(models, inputs)))
    assert len({id(g.spec) for g in graphs}) == 1
    assert len({g.entry_x.data_ptr() for g in graphs}) == len(graphs)
    for k, g in enumerate(graphs):
        torch.testing.assert_close(g.entry_x, want[k % 2], rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mlp", "cnn", "gpt"])
def test_to_dict_round_trips(family, tmp_path):
    """Plain data: the features and spec.to_dict() (no gradgraph classes), read back with weights_only=True."""
    c, g = _graph(family)
    g.materialize_edges()
    g.y = torch.arange(3)  # attributes beside the features (a dataset's targets) travel too
    d = g.to_dict()
    path = tmp_path / "g.pt"
    torch.save(d, path)
    for back in (GradientGraph.from_dict(torch.load(path, weights_only=True)), GradientGraph.from_dict(d)):
        assert back.spec == g.spec and back.summary() == g.summary() and torch.equal(back.y, g.y)
        assert set(back.keys()) == set(g.keys())
        for k in g.keys():
            assert (torch.equal(back[k], g[k]) if isinstance(g[k], torch.Tensor) else back[k] == g[k]), k
        want = g.per_sample_grads()
        assert all(torch.equal(v, want[k]) for k, v in back.per_sample_grads().items())
    g.save(tmp_path / "graph.pt")
    back = GradientGraph.load(tmp_path / "graph.pt")
    assert back.spec == g.spec and torch.equal(back.entry_x, g.entry_x) and "edge_index" in back
    with pytest.raises(gradgraph.errors.FileFormatError):
        GradientGraph.load(path)  # a bare dict is not a gradgraph graph file


@pytest.mark.parametrize("family", ["mlp", "gpt"])
def test_torch_save_loads_with_the_safe_default(family, tmp_path):
    g = _graph(family)[1]
    g.materialize_edges()
    torch.save(g, tmp_path / "g.pt")
    h = torch.load(tmp_path / "g.pt")  # weights_only=True, torch's default: only allow-listed classes
    assert isinstance(h, GradientGraph) and h.spec == g.spec
    for key in ("entry_x", "entry_node", "edge_index", "wentry_theta"):
        assert torch.equal(h[key], g[key])
    net = GradMetaNet(hidden_channels=8, num_layers=1, out_level="param").eval()
    assert torch.equal(net(h), net(g))
    torch.save({"graph": g, "fn": print}, tmp_path / "unsafe.pt")  # the allow-list still refuses code
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(tmp_path / "unsafe.pt")


def test_a_materialized_graph_batches_with_fresh_ones_in_either_order():
    (_, a), (_, b) = _graph("mlp"), _graph("cnn")

    def fresh():
        return [gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn) for c in (make("mlp", 0), make("cnn", 0))]

    want = Batch.from_data_list([g.materialize_edges() for g in fresh()])
    a.materialize_edges()
    first = Batch.from_data_list([a, b])  # PyG reads b's edge tensors: they appear
    assert "edge_index" in b._store
    second = Batch.from_data_list([fresh()[1], a])  # the batch follows its first graph: edges implicit until asked
    assert "edge_index" in first._store and "edge_index" not in second._store
    second.materialize_edges()
    second_want = Batch.from_data_list([g.materialize_edges() for g in fresh()[::-1]])
    for key in EDGE_KEYS:
        assert torch.equal(first[key], want[key]) and torch.equal(second[key], second_want[key])
