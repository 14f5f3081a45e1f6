"""Metanetworks by name: every registered constructor takes the data's example graph and set size (for the
models that flatten a fixed layout; others ignore them) and its hyperparameters as keyword arguments.

    net = METANETWORKS.build("gradmetanet", example_graph=graph, hidden_channels=32)

Register your own with ``@METANETWORKS.register("name")``; tasks refer to metanetworks by these names."""
from __future__ import annotations

from ..registry import Registry
from .baselines import BatchAsymmetric, MLPConcat, NeuronAsymmetric, WeightSpaceGMN
from .editing import WeightEditor
from .models import GradMetaNet, GradMetaNetPlusPlus

__all__ = ["METANETWORKS"]

METANETWORKS = Registry("metanetwork")


@METANETWORKS.register("gradmetanet")
def gradmetanet(example_graph=None, set_size=None, **hyper) -> GradMetaNet:
    """GradMetaNet (set x neuron layers, set pooling, neuron layers, parameter head with moment terms)."""
    return GradMetaNet(**hyper)


@METANETWORKS.register("gradmetanet++")
def gradmetanet_plus_plus(example_graph=None, set_size=None, **hyper) -> GradMetaNetPlusPlus:
    """GradMetaNet++ (attention across the set and across neurons, per-element pairwise head)."""
    return GradMetaNetPlusPlus(**hyper)


@METANETWORKS.register("mlp-concat")
def mlp_concat(example_graph=None, set_size=None, **hyper) -> MLPConcat:
    """An MLP on the whole flattened graph (no symmetry)."""
    return MLPConcat(example_graph=example_graph, **hyper)


@METANETWORKS.register("neuron-asym")
def neuron_asymmetric(example_graph=None, set_size=None, **hyper) -> NeuronAsymmetric:
    """DeepSets over the samples, each the concatenation of all neurons (no neuron symmetry)."""
    return NeuronAsymmetric(example_graph=example_graph, **hyper)


@METANETWORKS.register("batch-asym")
def batch_asymmetric(example_graph=None, set_size=None, **hyper) -> BatchAsymmetric:
    """GradMetaNet with the set flattened into features (no sample symmetry)."""
    return BatchAsymmetric(example_graph=example_graph, **hyper)


@METANETWORKS.register("gmn")
def weight_space_gmn(example_graph=None, set_size=None, **hyper) -> WeightSpaceGMN:
    """A weight-space graph metanetwork on averaged (mode="average") or per-sample (mode="concat") gradients."""
    if hyper.get("mode") == "concat" and "set_size" not in hyper:
        hyper["set_size"] = set_size if set_size is not None else example_graph.set_size
    return WeightSpaceGMN(**hyper)


@METANETWORKS.register("weight-editor")
def weight_editor(example_graph=None, set_size=None, **hyper) -> WeightEditor:
    """Predict a weight change from theta (+ probe, target or GradMetaNet channels); see gradgraph.nn.editing."""
    if example_graph is None:
        raise ValueError("the weight-editor metanetwork needs example_graph= (its architecture's parameter tensors)")
    return WeightEditor(len(example_graph.spec.trainable), set_size or example_graph.set_size, **hyper)
