"""Neuron-permutation symmetries of a model, acting on modules, parameter dicts and gradient graphs.

A :class:`Symmetry` holds one permutation per neuron space (gather convention: new neuron ``j`` is old
neuron ``p[j]``). Hidden spaces get a random permutation; attention spaces permute whole heads (the same
head permutation for q, k, v and the attention output) and the dims within each head (queries and keys
together); model inputs, outputs and spaces the tracer could not follow keep the identity.

The defining property, tested for every architecture family::

    capture(apply_symmetry(model, s), x, y) == apply_symmetry(capture(model, x, y), s)
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import StructureMismatchError
from .gradient_graph import GradientGraph, shallow_copy
from .kinds import kind_of
from .spec import GraphSpec


@dataclass
class Symmetry:
    """``perms[space key]``: a permutation of that space's neurons; ``spec``: the structure it belongs to."""

    perms: dict[str, Tensor]
    spec: GraphSpec

    def perm_of_layer(self, layer: int) -> Tensor:
        return self.perms[self.spec.spaces[self.spec.layers[layer].space].key]

    def inverse(self) -> "Symmetry":
        return Symmetry({k: torch.argsort(p) for k, p in self.perms.items()}, self.spec)

    def is_identity(self) -> bool:
        return all(torch.equal(p, torch.arange(p.numel())) for p in self.perms.values())


def _spec_of(obj) -> GraphSpec:
    if isinstance(obj, GradientGraph):
        obj._single("random_symmetry")
        return obj.spec
    if isinstance(obj, GraphSpec):
        return obj
    if isinstance(obj, nn.Module):  # tracing a module is capture's job: gradgraph.api composes the two
        raise TypeError(f"gradgraph.graph.symmetry.random_symmetry takes a GradientGraph or a GraphSpec, got the "
                        f"module {type(obj).__name__}; use gradgraph.random_symmetry(model, example_inputs=...), "
                        "which traces the module first")
    raise TypeError(f"random_symmetry takes a GradientGraph or a GraphSpec (or, through gradgraph.random_symmetry, "
                    f"an nn.Module), got {type(obj).__name__}")


def random_symmetry(obj, generator: torch.Generator | None = None) -> Symmetry:
    """Draw a uniformly random element of the neuron-permutation group of a GradientGraph's model or of a
    GraphSpec (for an ``nn.Module`` use :func:`gradgraph.random_symmetry`, which traces it)."""
    spec = _spec_of(obj)
    perms: dict[str, Tensor] = {}
    head_perm: dict[int, Tensor] = {}
    for s in spec.spaces:
        if not s.permutable:
            perms[s.key] = torch.arange(s.size)
            continue
        if s.heads > 1 and not s.parts:
            dh = s.size // s.heads
            if s.head_group not in head_perm:
                head_perm[s.head_group] = (torch.randperm(s.heads, generator=generator) if s.heads_permutable
                                           else torch.arange(s.heads))
            pi = head_perm[s.head_group]
            perms[s.key] = torch.cat([pi[h] * dh + (torch.arange(dh) if s.within_heads else
                                                    torch.randperm(dh, generator=generator)) for h in range(s.heads)])
        elif not s.parts:
            perms[s.key] = torch.randperm(s.size, generator=generator)
    for s in reversed(spec.spaces):  # a space cut into pieces (created after it) permutes piece by piece
        if s.permutable and s.parts:
            offsets = [0]
            for i in s.parts:
                offsets.append(offsets[-1] + spec.spaces[i].size)
            perms[s.key] = torch.cat([perms[spec.spaces[i].key] + o for i, o in zip(s.parts, offsets)])
    return Symmetry(perms, spec)


def apply_symmetry(obj, sym: Symmetry, batch_dims: int = 0):
    """Act with ``sym`` on an ``nn.Module`` (returns a permuted, function-preserving copy), on a dict
    ``{name: tensor}`` of parameter-shaped tensors (``batch_dims`` leading dims are skipped, e.g. 1 for
    per-sample gradients; trailing channel dims are allowed; buffers may be included), or on a
    :class:`GradientGraph` (returns a graph with its node features permuted)."""
    if isinstance(obj, GradientGraph):
        return _apply_graph(obj, sym)
    if isinstance(obj, nn.Module):
        return _apply_module(obj, sym)
    if isinstance(obj, Mapping):
        return _apply_params(obj, sym, batch_dims)
    raise TypeError(f"apply_symmetry acts on an nn.Module, a dict of tensors or a GradientGraph, "
                    f"got {type(obj).__name__}")


def _apply_params(params: Mapping[str, Tensor], sym: Symmetry, batch_dims: int) -> dict[str, Tensor]:
    spec = sym.spec
    known = {p.name for p in spec.params} | {name for name, _ in spec.buffers}
    unknown = sorted(set(params) - known)
    if unknown:
        raise StructureMismatchError(f"apply_symmetry: {unknown} are not parameters or buffers of the model this "
                                     "symmetry was drawn for")
    shapes = {p.name: p.shape for p in spec.params} | {name: tuple(shape) for name, shape in spec.buffers}
    for name, t in params.items():  # names alone would let a same-named tensor of another model through
        want = shapes[name]
        got = tuple(t.shape[batch_dims:batch_dims + len(want)])
        if got != tuple(want):
            raise StructureMismatchError(
                f"apply_symmetry: '{name}' has shape {tuple(t.shape)} (after {batch_dims} batch dims: {got}), but the "
                f"model this symmetry was drawn for has {tuple(want)}; draw the symmetry from this model "
                "(gradgraph.random_symmetry(model, example_inputs=...))")
    out = {k: v.clone() for k, v in params.items()}
    shapes = {p.name: p.shape for p in spec.params}
    d = batch_dims
    for op in spec.ops:
        p_in, p_out = sym.perm_of_layer(op.in_layer), sym.perm_of_layer(op.out_layer)
        kind = kind_of(op)
        for use, is_weight in ((op.weight, True), (op.bias, False)):
            if use is None or use.name not in params:
                continue
            src = params[use.name]
            if use.rows is not None:
                src = src.narrow(d, use.rows[0], use.rows[1] - use.rows[0])
            if is_weight:
                shape = tuple(src.shape[d:d + len(shapes[use.name])])
                layout = kind.weight_layout(shape)
                w = src if layout == shape else src.reshape(src.shape[:d] + layout + src.shape[d + len(shape):])
                moved = kind.permute_weight(op, w, p_in.to(src.device), p_out.to(src.device), d).reshape(src.shape)
            else:
                moved = src.index_select(d, p_out.to(src.device))
            if use.rows is None:
                out[use.name] = moved
            else:
                out[use.name].narrow(d, use.rows[0], use.rows[1] - use.rows[0]).copy_(moved)
        for name in op.buffers:
            if name in params:
                out[name] = params[name].index_select(d, p_out.to(params[name].device))
    return out


def _apply_module(model: nn.Module, sym: Symmetry) -> nn.Module:
    have = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    want = [(p.name, tuple(p.shape)) for p in sym.spec.params]
    if have != want:
        diff = [f"{a} vs {b}" for a, b in zip(have, want) if a != b][:3] or [f"{len(have)} vs {len(want)} tensors"]
        raise StructureMismatchError(
            f"apply_symmetry: the parameters of this {type(model).__name__} do not match the model this symmetry was "
            f"drawn for ({'; '.join(diff)}); draw the symmetry from this model "
            "(gradgraph.random_symmetry(model, example_inputs=...))")
    new = copy.deepcopy(model)
    state = {n: t.detach() for n, t in new.named_parameters()}
    state.update({n: b for n, b in new.named_buffers() if n in dict(sym.spec.buffers)})
    moved = _apply_params(state, sym, 0)
    with torch.no_grad():
        for name, t in moved.items():
            target = new.get_parameter(name) if name in dict(new.named_parameters()) else new.get_buffer(name)
            target.copy_(t)
    return new


def node_permutation(spec: GraphSpec, sym: Symmetry) -> Tensor:
    """Node gather index: node ``i`` of the permuted graph is node ``perm[i]`` of the original."""
    parts = [layer.node_start + sym.perm_of_layer(li) for li, layer in enumerate(spec.layers)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def _apply_graph(graph: GradientGraph, sym: Symmetry) -> GradientGraph:
    graph._single("apply_symmetry")
    spec = graph.spec
    if spec.structure_key() != sym.spec.structure_key():
        raise StructureMismatchError("apply_symmetry: the graph comes from a different architecture than the "
                                     "symmetry (its neuron spaces or parameters differ)")
    x = graph.entry_x.clone()
    for li, layer in enumerate(spec.layers):
        p = sym.perm_of_layer(li).to(x.device)
        for blk in {layer.a, layer.g} - {None}:
            if blk.kind != "dense":
                continue  # vocabulary nodes are inputs: never permuted
            block = graph.entry_x[blk.start:blk.start + blk.count].view(-1, layer.size, 2)
            x[blk.start:blk.start + blk.count] = block[:, p].reshape(-1, 2)
    out = shallow_copy(graph)
    out.entry_x = x
    return out
