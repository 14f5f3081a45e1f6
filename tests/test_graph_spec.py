"""GraphSpec: plain-data round trip (to_dict / from_dict) and the kind-dependent edge counts."""
import io

import pytest
import torch
from cases import make

import gradgraph
from gradgraph.graph.spec import GraphSpec, LayerSpec, OpSpec

FAMILIES = ["mlp", "cnn", "conv1d", "gpt", "transformer_encoder", "residual"]
PLAIN = (dict, list, str, int, float, bool, type(None))


def _spec(family, seed=0):
    c = make(family, seed)
    return gradgraph.capture(c.model, c.inputs, c.targets, c.loss_fn).spec


def _only_plain(v, path="spec"):
    assert isinstance(v, PLAIN), (path, type(v))
    if isinstance(v, dict):
        for k, x in v.items():
            assert isinstance(k, str), (path, k)
            _only_plain(x, f"{path}.{k}")
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _only_plain(x, f"{path}[{i}]")


@pytest.mark.parametrize("family", FAMILIES)
def test_to_dict_round_trips_exactly(family):
    spec = _spec(family)
    d = spec.to_dict()
    _only_plain(d)
    back = GraphSpec.from_dict(d)
    assert back == spec and hash(back) == hash(spec) and back is not spec
    assert back.to_dict() == d
    # paired a/g blocks stay one object (layouts test ``layer.a is layer.g``)
    assert [lay.a is lay.g for lay in back.layers] == [lay.a is lay.g for lay in spec.layers]
    assert back.num_edges() == spec.num_edges() and back.num_entries == spec.num_entries
    # and the dict is data torch.load(weights_only=True) reads back
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    assert GraphSpec.from_dict(torch.load(buf, weights_only=True)) == spec


def test_nested_specs_round_trip_and_missing_fields_take_defaults():
    spec = _spec("gpt")
    for obj in (*spec.layers, *spec.ops, *spec.spaces, *spec.params):
        assert type(obj).from_dict(obj.to_dict()) == obj
    op = next(o for o in spec.ops if o.kind == "embedding")
    d = {k: v for k, v in op.to_dict().items() if k not in ("stride", "buffers")}
    assert OpSpec.from_dict(d) == op
    with pytest.raises(TypeError):
        LayerSpec.from_dict({**spec.layers[0].to_dict(), "unknown_field": 1})


def test_edge_counts_come_from_the_kinds():
    spec = _spec("gpt")
    per_op = [spec.op_edges(op) for op in spec.ops]
    for op, n in zip(spec.ops, per_op):
        n_in, n_out = spec.layers[op.in_layer].size, spec.layers[op.out_layer].size
        assert n == (n_out if op.kind == "diag" else n_in * n_out)
    assert spec.num_edges() == sum(per_op)
