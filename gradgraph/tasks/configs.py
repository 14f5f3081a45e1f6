"""The config dataclasses of the built-in tasks. No torch here: ``gradgraph train <task> --help`` reads these
classes without loading torch. Each config names its Task class in ``task`` (loaded when a run starts)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..train.config import TrainConfig, option

__all__ = ["CurvatureConfig", "CURVATURE_MODELS", "TraceConfig", "TRACE_MODELS", "EditingConfig", "EDITING_MODELS"]

class ModelTableConfig:
    """For a config whose ``model`` names an entry of ``model_table`` (name -> (registered metanetwork,
    hyperparameters)): that entry is the run's architecture (part of its identity), and the run folder is named
    after the model, the training size and the seed."""

    model_table: ClassVar[dict[str, tuple[str, dict]]] = {}

    def architecture(self) -> dict:
        name, hyper = self.model_table[self.model]
        return {"metanetwork": name, "hyperparameters": hyper}

    def run_name(self) -> str:
        return f"{self.model}-n{self.train_size}-s{self.seed}"


# curvature model name -> (registered metanetwork, hyperparameters): about 15K parameters each where the input
# layout allows. GradMetaNet and GradMetaNet++ start from the standard estimator (head_init="fisher": their
# parameter head's moment terms begin as the empirical Fisher diagonal of the set) and learn corrections;
# gradmetanet-plain is the ablation without moment terms (the paper's pairwise head only).
CURVATURE_MODELS: dict[str, tuple[str, dict]] = {
    "gradmetanet": ("gradmetanet", dict(hidden_channels=26, num_layers=3, set_layers=2, out_level="param",
                                        bilinear_channels=8, head_init="fisher")),
    "gradmetanet++": ("gradmetanet++", dict(hidden_channels=20, num_layers=2, out_level="param", heads=1,
                                            head_hidden=16, bilinear_channels=8, head_init="fisher")),
    # input = every entry of the graph: its first layer alone exceeds 15K parameters
    "mlp-concat": ("mlp-concat", dict(hidden_channels=8, num_layers=2, out_level="param")),
    "neuron-asym": ("neuron-asym", dict(hidden_channels=12, num_layers=3, out_level="param")),
    "batch-asym": ("batch-asym", dict(hidden_channels=16, num_layers=3, out_level="param")),
    "gmn-average": ("gmn", dict(hidden_channels=22, num_layers=3, out_level="param", mode="average")),
    "gmn-concat": ("gmn", dict(hidden_channels=20, num_layers=3, out_level="param", mode="concat")),
    "gradmetanet-plain": ("gradmetanet", dict(hidden_channels=28, num_layers=3, set_layers=2, out_level="param",
                                              bilinear_channels=0)),
}


@dataclass
class CurvatureConfig(ModelTableConfig, TrainConfig):
    """Predict the Fisher diagonal of a SIREN from a set of its gradients (paper Sec. 5.1). The defaults are a
    run of a few minutes on 2 CPU cores (300 models, 100 of them for training, 20 epochs); ``--preset paper`` is
    the paper's protocol (3,000 models, 2,000 for training, 100 epochs; Adam lr 1e-3, batch 32 and the
    best-validation weights either way), with positive outputs and a metric that sees every layer;
    ``--preset paper --output z --loss z --select mse`` is the paper's setting exactly."""

    model: str = option("gradmetanet", "the metanetwork or baseline", choices=list(CURVATURE_MODELS))
    epochs: int = option(20, "passes over the training split", low=1)
    train_size: int = option(100, "training models (the first N of the training pool)", low=1)
    num_models: int = option(300, "dataset size (test and validation: 500 each, or a third each below 1,500 "
                             "models; the rest the training pool)", low=4)
    num_points: int = option(128, "gradients per graph (the set size)", low=1)
    data_seed: int = option(0, "seed of the generated dataset", low=0)
    output: str = option("positive", "'positive': the model predicts h per parameter and the estimate is "
                         "S * exp(h), S the standard estimator (never <= 0); 'shrink': the estimate is B * exp(h), B "
                         "the calibrated baseline s-shrink (S shrunk per tensor toward the model's mean of S, fitted "
                         "on the training split; the model applies only to the training architecture); 'z': the "
                         "paper's unconstrained output in globally z-scored units",
                         choices=["positive", "shrink", "z"])
    loss: str = option("normalized", "training loss: 'normalized' (each parameter tensor's squared error over the "
                       "mean square of its training targets, averaged over tensors), 'log' (squared log-ratio), "
                       "'z' (the paper's globally z-scored squared error)", choices=["normalized", "log", "z"])
    select: str = option("nmse", "validation metric for early stopping and the best checkpoint: 'nmse' (per-tensor "
                         "normalized), 'logratio' or 'mse' (the paper's z-scored)",
                         choices=["nmse", "logratio", "mse"])
    dataset_root: str | None = option(None, "dataset folder (default $GRADGRAPH_DATASETS/siren_fisher or "
                                      "datasets/siren_fisher)", identity=False)
    out_dir: str = option("runs/curvature", "parent folder of the run folder", identity=False)

    task: ClassVar[str] = "gradgraph.tasks.curvature:CurvatureTask"
    model_table: ClassVar[dict] = CURVATURE_MODELS
    # named sets of defaults (``gradgraph train curvature --preset paper``); options given explicitly win
    presets: ClassVar[dict[str, dict]] = {
        "quick": dict(train_size=100, num_models=300, epochs=20),
        "paper": dict(train_size=2000, num_models=3000, epochs=100),
    }



# trace model name -> (registered metanetwork, hyperparameters): graph-level heads (one number per model). No
# edge messages: a 1024 x 1024 layer has a million edges, and the set layers already see every neuron's (a, g).
# "gradmetanet" pools per layer before the head, so that the one input neuron (whose activations are the inputs
# x, which carry the distribution X_p) weighs as much as a hidden layer; "gradmetanet-meanpool" is the paper's
# mean over all 2,050 nodes, where the input neuron counts 1/2050.
TRACE_MODELS: dict[str, tuple[str, dict]] = {
    "gradmetanet": ("gradmetanet", dict(hidden_channels=32, num_layers=3, set_layers=2, out_level="graph",
                                        graph_pool="layer")),
    "gradmetanet-meanpool": ("gradmetanet", dict(hidden_channels=32, num_layers=3, set_layers=2, out_level="graph")),
    # its graph embedding joined with the pooled set statistics of the pooled-mlp baseline (stats=True)
    "gradmetanet+stats": ("gradmetanet", dict(hidden_channels=32, num_layers=3, set_layers=2, out_level="graph",
                                              graph_pool="layer", out_channels=16, stats=True)),
    # the layers' log scales standardized across the training models (EntryEncoder(standardize_scales=True))
    "gradmetanet-std": ("gradmetanet", dict(hidden_channels=32, num_layers=3, set_layers=2, out_level="graph",
                                            graph_pool="layer", standardize_scales=True)),
}


@dataclass
class TraceConfig(ModelTableConfig, TrainConfig):
    """The paper's scaled curvature variant: predict the Fisher trace tr(F) of a SIREN 1 -> 1024 -> 1024 -> 1
    (1.05 M parameters) from the gradient graph of 32 inputs (:class:`gradgraph.data.SirenTrace`). The estimate
    is ``S * exp(h)``, S the standard estimator (the mean squared per-sample gradient norm of the 32 inputs) and
    h the metanetwork's graph-level output, trained on the squared log-ratio. The defaults fit a 2-core CPU:
    500 training models, batch 8, 15 epochs (about 45 min for GradMetaNet)."""

    model: str = option("gradmetanet", "the metanetwork", choices=list(TRACE_MODELS))
    epochs: int = option(15, "passes over the training split", low=1)
    batch_size: int = option(8, "graphs per optimizer step", low=1)
    train_size: int = option(500, "training models (the first N of the training pool)", low=1)
    num_models: int = option(1000, "dataset size (test 200 and validation 100 models, or a third each of a "
                             "smaller dataset; the rest the training pool)", low=4)
    num_points: int = option(32, "gradients per graph (the set size)", low=1)
    width: int = option(1024, "hidden width of the SIREN whose trace is predicted (two hidden layers)", low=1)
    data_seed: int = option(0, "seed of the generated dataset", low=0)
    dataset_root: str | None = option(None, "dataset folder (default $GRADGRAPH_DATASETS/siren_trace or "
                                      "datasets/siren_trace)", identity=False)
    out_dir: str = option("runs/curvature-trace", "parent folder of the run folder", identity=False)

    task: ClassVar[str] = "gradgraph.tasks.trace:TraceTask"
    model_table: ClassVar[dict] = TRACE_MODELS



# editing model name -> (registered metanetwork, hyperparameters). Every learned row is a WeightEditor (see
# gradgraph.nn.editing): the same weight-space network on theta, with probe / target node features or
# GradMetaNet(++) channels added; the widths keep every model at about 29-30K parameters (measured counts in
# the benchmark table). "+oce" emits 8 edits and averages the 8 edited INRs' renderings.
EDITING_MODELS: dict[str, tuple[str, dict]] = {
    "ws": ("weight-editor", dict(hidden_channels=33, num_layers=3)),
    "ws+probe": ("weight-editor", dict(hidden_channels=32, num_layers=3, probe=True)),
    "ws+probe+target": ("weight-editor", dict(hidden_channels=31, num_layers=3, probe=True, target=True)),
    "ws+gradmetanet": ("weight-editor", dict(hidden_channels=30, num_layers=3, grad_net="gradmetanet",
                                             grad_hidden=16, grad_layers=2, grad_channels=4)),
    "ws+gradmetanet++": ("weight-editor", dict(hidden_channels=28, num_layers=3, grad_net="gradmetanet++",
                                               grad_hidden=16, grad_layers=2, grad_channels=4)),
    "ws+gradmetanet+oce": ("weight-editor", dict(hidden_channels=30, num_layers=3, grad_net="gradmetanet",
                                                 grad_hidden=16, grad_layers=2, grad_channels=4, edits=8)),
}


@dataclass
class EditingConfig(ModelTableConfig, TrainConfig):
    """Edit INRs of digits into their dilation: predict a weight change from the weights (and probe, target or
    GradMetaNet features of the editing-loss gradients) (paper Sec. 5.3)."""

    model: str = option("ws+gradmetanet", "the editing model", choices=list(EDITING_MODELS))
    num_images: int = option(1797, "digits in the dataset (the first N of scikit-learn's 1,797)")
    inrs_per_image: int = option(1, "INRs per image (other initialization seeds)")
    fit_steps: int = option(500, "Adam steps of each INR's fit")
    num_points: int = option(64, "coordinates of the editing-loss gradient graph (the set size)")
    data_seed: int = option(0, "seed of the dataset (INR initializations, gradient coordinates, splits)")
    train_size: int | None = option(None, "training INRs (the first N of the training split; default all)")
    dataset_root: str | None = option(None, "dataset folder (default $GRADGRAPH_DATASETS/digit_inrs or "
                                      "datasets/digit_inrs)", identity=False)
    out_dir: str = option("runs/editing", "parent folder of the run folder", identity=False)

    task: ClassVar[str] = "gradgraph.tasks.editing:EditingTask"
    model_table: ClassVar[dict] = EDITING_MODELS

    def run_name(self) -> str:
        size = "" if self.train_size is None else f"-n{self.train_size}"
        return f"{self.model}-i{self.num_images}x{self.inrs_per_image}{size}-s{self.seed}"
