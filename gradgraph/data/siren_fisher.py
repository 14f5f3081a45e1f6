"""SirenFisher: predict the Fisher diagonal of a SIREN from 128 of its gradients (GradMetaNet paper, Sec. 5.1).

Each item is the gradient graph of an untrained SIREN 1 -> 32 -> 32 -> 1 (sine activations ``sin(w0 x)``,
``w0 = 30`` on every layer, every weight and bias drawn from N(0, 1)) on ``num_points`` inputs from a
distribution X_p, with the per-sample quantity ``f(x)`` (the model output), so that ``g`` holds output
gradients. The target is the diagonal of the regression Fisher ``F = E_{x ~ X_p}[grad f(x) grad f(x)^T]``,
estimated on ``num_fisher_points`` further independent inputs.

Input distribution X_p (the paper leaves the family open; this is the choice made here): ``p ~ U[0, 1]`` per
model and ``x = 2 B - 1`` with ``B ~ Beta(0.5 + 4 p, 4.5 - 4 p)``. p = 0 piles the inputs up near -1, p = 1
near +1, p = 0.5 gives a symmetric bump; the family changes smoothly with p.

Item attributes, besides the GradientGraph's own: ``y`` [P] the target diagonal, ``std_est`` [P] the standard
estimator (the diagonal of the empirical Fisher of the same ``num_points`` gradients the graph holds), both in
theta order; ``p`` [1]; ``model_id`` [1]. Splits (``split_indices``): the first 500 models are the test
split, the next 500 validation, the rest the training pool (train subsets of size N are its first N).

Generation is seeded per model (the same seed gives the same dataset, however it is chunked or resumed), shows
a progress bar, writes chunks of models atomically and resumes from the chunks already written.
"""
from __future__ import annotations

import os

import torch

from ..api import capture
from ..graph.gradient_graph import GradientGraph
from ..graph.spec import GraphSpec
from ..models import SIREN
from .common import UniformBatcher, config_tag, default_root, item_seed, load_processed, seeded
from .store import GeneratedDataset

SPLITS = {"test": 500, "val": 500}


def sample_inputs(p: float, n: int) -> torch.Tensor:
    """n inputs from X_p: ``2 * Beta(0.5 + 4p, 4.5 - 4p) - 1``, shape [n, 1] (uses torch's global RNG)."""
    beta = torch.distributions.Beta(torch.tensor(0.5 + 4 * p, dtype=torch.float64),
                                    torch.tensor(4.5 - 4 * p, dtype=torch.float64))
    return beta.sample((n, 1)) * 2 - 1


def fisher_diagonal(graph: GradientGraph) -> torch.Tensor:
    """Diagonal of the empirical Fisher of a graph's per-sample gradients, in theta order: [P]."""
    return graph.params_to_graph({k: v.pow(2).mean(0) for k, v in graph.per_sample_grads().items()})


def make_model(index: int, seed: int, hidden=(32, 32), w0: float = 30.0, num_points: int = 128,
               num_fisher_points: int = 1024):
    """Model ``index`` of the dataset with seed ``seed``: (SIREN in float64, p, inputs [n, 1], Fisher inputs)."""
    with seeded(item_seed(seed, index)):
        model = SIREN(1, tuple(hidden), 1, w0=w0, init="normal").double()
        p = float(torch.rand(()))
        x = sample_inputs(p, num_points)
        x_fisher = sample_inputs(p, num_fisher_points)
    return model, p, x, x_fisher


class SirenFisher(GeneratedDataset):
    """The curvature-estimation dataset (see the module docstring).

    Args:
        root: folder (default ``$GRADGRAPH_DATASETS/siren_fisher`` or ``datasets/siren_fisher``). Datasets
            with other settings live beside each other (files are tagged with a hash of the settings).
        num_models: 3000 in the paper (500 test, 500 validation, up to 2000 training).
        num_points: gradients per graph (the set size b).
        num_fisher_points: inputs per model for the target.
        seed: dataset seed.
        chunk_size: models per chunk file (the unit of resumption).
    """

    def __init__(self, root: str | None = None, num_models: int = 3000, num_points: int = 128,
                 num_fisher_points: int = 1024, hidden: tuple[int, ...] = (32, 32), w0: float = 30.0,
                 seed: int = 0, chunk_size: int = 100, transform=None, progress: bool = True) -> None:
        if num_models < 1 or num_points < 1 or num_fisher_points < 1:
            raise ValueError("num_models, num_points and num_fisher_points must be positive")
        self.config = {"num_models": num_models, "num_points": num_points, "num_fisher_points": num_fisher_points,
                       "hidden": list(hidden), "w0": w0, "seed": seed}
        self.chunk_size, self.progress = chunk_size, progress
        self.tag = config_tag(self.config)
        super().__init__(root or default_root(self.name), transform)
        stored = load_processed(self.processed_paths[0], self.config)
        self.spec = GraphSpec.from_dict(stored["spec"])
        for key in self.item_keys:
            setattr(self, key, stored[key])
        self._structure = None

    # what a subclass with another target changes (see SirenTrace): its folder name, the per-item tensors it
    # stores beside the graph, its split sizes and its README
    name = "siren_fisher"
    item_keys = ("entry_x", "y", "std_est", "p")
    splits = SPLITS
    readme = ""  # set below
    edges = True  # items carry materialized edges (models with edge messages need them; they cost O(weights))

    def targets(self, graph: GradientGraph, fisher_graph: GradientGraph) -> dict[str, torch.Tensor]:
        """The per-item tensors besides ``entry_x`` and ``p``, from the graph of the item's ``num_points``
        inputs and that of its ``num_fisher_points`` further inputs (both float64)."""
        return {"y": fisher_diagonal(fisher_graph).float(), "std_est": fisher_diagonal(graph).float()}

    # -- generation (gradgraph.data.store) ------------------------------------------------------------------

    @property
    def raw_dir(self) -> str:
        # the chunk layout is part of the chunks' fingerprint: resuming with another chunk_size starts new chunks
        return os.path.join(self.root, "raw", f"{self.tag}-c{self.chunk_size}")

    @property
    def num_items(self) -> int:
        return self.config["num_models"]

    def bar_spec(self) -> tuple[dict, int]:
        return {"desc": f"generating {type(self).__name__}", "unit": "model"}, 1

    def generate_chunk(self, indices, bar) -> dict:
        cfg = self.config
        items, spec = [], None
        for i in indices:
            model, p, x, x_fisher = make_model(i, cfg["seed"], cfg["hidden"], cfg["w0"], cfg["num_points"],
                                               cfg["num_fisher_points"])
            graph = capture(model, x)
            items.append({"entry_x": graph.entry_x.float(), "p": torch.tensor(p),
                          **self.targets(graph, capture(model, x_fisher))})
            spec = graph.spec
            bar.update(1)
        return {"spec": spec.to_dict(), **{k: torch.stack([it[k] for it in items]) for k in self.item_keys}}

    def merge(self, chunks: list[dict]) -> tuple[dict, str]:
        data = {"config": self.config, "spec": chunks[0]["spec"]}
        for key in self.item_keys:
            data[key] = torch.cat([c[key] for c in chunks])
        return data, self.readme

    def len(self) -> int:
        return self.config["num_models"]

    @property
    def structure(self) -> dict:
        """The index tensors every item shares (one architecture, one set size), edges materialized if
        ``edges``."""
        if self._structure is None:
            ref = capture(make_model(0, self.config["seed"], self.config["hidden"], self.config["w0"],
                                     self.config["num_points"], 1)[0].float(),
                          torch.zeros(self.config["num_points"], 1))
            if self.edges:
                ref.materialize_edges()
            self._structure = {k: v for k, v in ref._store.items() if k not in ("entry_x", "spec")}
        return self._structure

    def _item_tensors(self) -> dict:
        out = {k: getattr(self, k) for k in self.item_keys}
        return {**out, "p": self.p.view(-1, 1), "model_id": torch.arange(len(self.p)).view(-1, 1)}

    def get(self, idx: int) -> GradientGraph:
        graph = GradientGraph(**self.structure)
        graph.spec = self.spec
        for key, t in self._item_tensors().items():
            graph[key] = t[idx]
        return graph

    def batches(self, indices: list[int], batch_size: int):
        """Batches of the items ``indices`` in order, equal to what torch_geometric's DataLoader returns for
        ``dataset[indices]`` but collated once per batch size (see UniformBatcher)."""
        if getattr(self, "_batcher", None) is None:
            template = GradientGraph(**self.structure)
            template.spec = self.spec
            self._batcher = UniformBatcher(template, self._item_tensors())
        return self._batcher.batches(indices, batch_size)

    # -- splits -------------------------------------------------------------------------------------------
    def split_indices(self, train_size: int | None = None) -> dict[str, list[int]]:
        """Indices of the test, validation and training splits (the first ``train_size`` of the pool)."""
        n = self.config["num_models"]
        n_test, n_val = min(self.splits["test"], n // 3), min(self.splits["val"], n // 3)
        pool = list(range(n_test + n_val, n))
        if train_size is not None:
            if train_size > len(pool):
                raise ValueError(f"train_size={train_size} exceeds the training pool of {len(pool)} models "
                                 f"(num_models={n} minus {n_test} test and {n_val} validation)")
            pool = pool[:train_size]
        return {"test": list(range(n_test)), "val": list(range(n_test, n_test + n_val)), "train": pool}


README = """# siren_fisher

Generated by `gradgraph.data.SirenFisher` (nothing is downloaded). Each item: the gradient graph of an untrained
SIREN 1 -> 32 -> 32 -> 1 (sin(30 x) activations, all weights and biases ~ N(0, 1)) on 128 inputs from X_p, holding
the gradients of the model output; target: the diagonal of the regression Fisher E_{x ~ X_p}[grad f grad f^T]
estimated on 1024 further inputs.

X_p: p ~ U[0, 1] per model, x = 2 B - 1 with B ~ Beta(0.5 + 4p, 4.5 - 4p).

Splits: models 0-499 test, 500-999 validation, 1000-2999 training pool (train size N = its first N).

Files: `raw/<tag>-c<chunk size>/chunk_*.pt` (100 models each by default, written atomically; generation resumes
from them, a damaged chunk is generated again, processes generating at once split the chunks by claim files,
and they are deleted once `processed/siren_fisher_<tag>.pt` holds everything), where `<tag>` hashes the generation
settings. Every file carries a hash of its content, checked on load. The same seed gives the same files.
"""

SirenFisher.readme = README
