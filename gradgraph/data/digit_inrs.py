"""DigitINRs: SIRENs of scikit-learn's digits, with dilation as the edit (GradMetaNet paper, Sec. 5.3).

Images: scikit-learn's bundled 8x8 digits (1,797, offline), divided by 16, upsampled bilinearly to 28x28 and
clamped to [0, 1]. Each INR is a SIREN 2 -> 32 -> 32 -> 1 (``sin(30 x)`` after each hidden layer, the SIREN
initialization) whose output plus 0.5 is the grey value at a coordinate of the 28x28 grid in [-1, 1]^2 (row,
column). The INRs are fitted by one vectorized fit over a chunk of INRs at once (``torch.func.vmap`` over
``functional_call``; Adam per INR, the INRs independent), each INR's initialization seeded by its index.

Edit target: the 3x3 grey dilation (3x3 max filter) of the 28x28 image. GradMetaNet input per INR: the
gradient graph of the editing loss ``(f(x) - target(x))^2`` at ``num_points`` (64) grid coordinates fixed for
every INR (drawn once from the dataset seed). These gradients see the target at those 64 points; a probe
baseline that gets only activations there does not (``ws+probe+target`` gets the same 64 target values).

Item attributes, besides the GradientGraph's own: ``theta`` [P] the INR's weights in theta order, ``image``
[784] and ``target`` [784] the original and dilated images (row-major), ``probe_out`` [b] the INR's values
and ``point_target`` [b] the target at the b gradient coordinates, ``fit_mse`` [1], ``label`` [1], ``image_id``
[1]. With ``inrs_per_image = k``, item ``i`` is INR ``i // n`` of image ``i % n``. Splits
(``split_indices``): per digit class, a seeded shuffle of its images, the first 20% test, the next 10%
validation, the rest training; every INR of an image shares its split.

Generation is seeded, shows a progress bar, writes chunks atomically and resumes from the chunks written; the
same settings give the same files (``chunk_size`` is a setting: it is the vectorized fit's batch).
"""
from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from ..api import capture
from ..graph.gradient_graph import GradientGraph
from ..graph.spec import GraphSpec
from ..losses import per_sample_mse
from ..models import SIREN
from .common import UniformBatcher, config_tag, default_root, item_seed, load_processed, seeded
from .store import GeneratedDataset

SIDE = 28
SPLIT_FRACTIONS = {"test": 0.2, "val": 0.1}
OUTPUT_SHIFT = 0.5  # the INR's value is SIREN(x) + 0.5


def digit_images(side: int = SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's digits as [1797, side * side] grey values in [0, 1] (÷16, bilinear, clamped), and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    img = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16
    img = F.interpolate(img, size=(side, side), mode="bilinear", align_corners=False).clamp(0, 1)
    return img.reshape(len(img), -1), torch.tensor(digits.target, dtype=torch.long)


def dilate(images: torch.Tensor, side: int = SIDE) -> torch.Tensor:
    """3x3 grey dilation (max filter, the border handled as -inf) of [M, side * side] images."""
    x = images.reshape(-1, 1, side, side)
    return F.max_pool2d(x, 3, stride=1, padding=1).reshape(images.shape)


def grid_coords(side: int = SIDE) -> torch.Tensor:
    """[side * side, 2] (row, column) coordinates in [-1, 1]^2, row-major like the flattened images."""
    t = torch.linspace(-1, 1, side)
    return torch.stack(torch.meshgrid(t, t, indexing="ij"), -1).reshape(-1, 2)


def edit_points(seed: int, num_points: int, side: int = SIDE) -> torch.Tensor:
    """The ``num_points`` grid pixels (sorted indices) where every INR's editing-loss gradients are taken."""
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    return torch.randperm(side * side, generator=g)[:num_points].sort().values


def make_siren(hidden=(32, 32), w0: float = 30.0) -> SIREN:
    return SIREN(2, tuple(hidden), 1, w0=w0, init="siren")


def render(siren: SIREN, params: dict[str, torch.Tensor], coords: torch.Tensor) -> torch.Tensor:
    """Values of a stack of INRs ``params`` ({name: [M, *shape]}) at ``coords`` [n, 2]: [M, n] (output + 0.5)."""
    out = vmap(lambda p: functional_call(siren, p, (coords,)))(params)
    return out.squeeze(-1) + OUTPUT_SHIFT


def theta_to_params(spec: GraphSpec, theta: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stacked theta-order vectors [M, P] -> {name: [M, *shape]} (every trainable parameter of ``spec``)."""
    return {p.name: theta[:, p.offset:p.offset + p.numel].reshape(-1, *p.shape) for p in spec.trainable}


def init_params(indices, seed: int, hidden=(32, 32), w0: float = 30.0) -> dict[str, torch.Tensor]:
    """Stacked initial parameters of the INRs ``indices`` (each seeded by its own index)."""
    inits = []
    for i in indices:
        with seeded(item_seed(seed, i)):
            inits.append({k: v.detach() for k, v in make_siren(hidden, w0).named_parameters()})
    return {k: torch.stack([p[k] for p in inits]) for k in inits[0]}


def fit_inrs(images: torch.Tensor, params: dict[str, torch.Tensor], steps: int = 500, lr: float = 1e-3,
             hidden=(32, 32), w0: float = 30.0, bar=None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Fit a stack of INRs (initial ``params``) to ``images`` [M, 784] with Adam on the pixel MSE; every INR
    is independent (the summed loss gives each its own Adam update). Returns (params, final MSE per INR)."""
    siren, coords = make_siren(hidden, w0), grid_coords()
    params = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.Adam(params.values(), lr=lr)
    for _ in range(steps):
        loss = (render(siren, params, coords) - images).pow(2).mean(1).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if bar is not None:
            bar.update(len(images))
    with torch.no_grad():
        mse = (render(siren, params, coords) - images).pow(2).mean(1)
    return {k: v.detach() for k, v in params.items()}, mse


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [0, 1]."""
    return 10 * torch.log10(1 / mse.clamp_min(1e-12))


class DigitINRs(GeneratedDataset):
    """The INR-editing dataset (see the module docstring).

    Args:
        root: folder (default ``$GRADGRAPH_DATASETS/digit_inrs`` or ``datasets/digit_inrs``); datasets with other
            settings live beside each other.
        num_images: the first N digits (default all 1,797).
        inrs_per_image: INRs per image (other initialization seeds).
        steps, lr: the fit (Adam).
        num_points: coordinates of the editing-loss gradient graph (the set size).
        seed: dataset seed (initializations, the gradient coordinates, the splits).
        chunk_size: INRs per vectorized fit and chunk file (the unit of resumption).
    """

    def __init__(self, root: str | None = None, num_images: int | None = None, inrs_per_image: int = 1,
                 steps: int = 500, lr: float = 1e-3, num_points: int = 64, hidden: tuple[int, ...] = (32, 32),
                 w0: float = 30.0, seed: int = 0, chunk_size: int = 256, transform=None,
                 progress: bool = True) -> None:
        num_images = 1797 if num_images is None else num_images
        if not 0 < num_images <= 1797 or inrs_per_image < 1 or steps < 0 or num_points < 1:
            raise ValueError("need 0 < num_images <= 1797, inrs_per_image >= 1, steps >= 0, num_points >= 1")
        self.config = {"num_images": num_images, "inrs_per_image": inrs_per_image, "steps": steps, "lr": lr,
                       "num_points": num_points, "hidden": list(hidden), "w0": w0, "seed": seed,
                       "chunk_size": chunk_size}
        self.chunk_size, self.progress = chunk_size, progress
        self.tag = config_tag(self.config)
        super().__init__(root or default_root("digit_inrs"), transform)
        stored = load_processed(self.processed_paths[0], self.config)
        self.spec = GraphSpec.from_dict(stored["spec"])
        for key in ("entry_x", "theta", "fit_mse", "image_id", "points", "fit_time_s"):
            setattr(self, key, stored[key])
        images, labels = digit_images()
        self.images, self.labels = images[self.image_id], labels[self.image_id]
        self.targets = dilate(self.images)
        self.point_target = self.targets[:, self.points]  # the target where the gradients see it: [M, b]
        with torch.no_grad():  # the INR's outputs there (the probe of the output neuron): [M, b]
            self.probe_out = render(make_siren(hidden, w0), theta_to_params(self.spec, self.theta),
                                    grid_coords()[self.points])
        self._structure = self._batcher = None

    # -- generation (gradgraph.data.store) ------------------------------------------------------------------
    name = "digit_inrs"

    @property
    def num_inrs(self) -> int:
        return self.config["num_images"] * self.config["inrs_per_image"]

    num_items = num_inrs

    @property
    def raw_dir(self) -> str:
        return os.path.join(self.root, "raw", self.tag)

    def bar_spec(self) -> tuple[dict, int]:
        return {"desc": "fitting DigitINRs", "unit": "INR-step", "unit_scale": True}, max(self.config["steps"], 1)

    def generate_chunk(self, indices, bar) -> dict:
        cfg = self.config
        t0 = time.perf_counter()
        images, _ = digit_images()
        image_id = torch.tensor([i % cfg["num_images"] for i in indices])
        params, mse = fit_inrs(images[image_id], init_params(indices, cfg["seed"], cfg["hidden"], cfg["w0"]),
                               cfg["steps"], cfg["lr"], cfg["hidden"], cfg["w0"], bar)
        fit_time = time.perf_counter() - t0
        points = edit_points(cfg["seed"], cfg["num_points"])
        coords, targets = grid_coords()[points], dilate(images[image_id])[:, points]
        siren = make_siren(cfg["hidden"], cfg["w0"])
        entry_x, theta, spec = [], [], None
        for m in range(len(image_id)):
            siren.load_state_dict({k: v[m] for k, v in params.items()})
            graph = capture(siren, coords, (targets[m] - OUTPUT_SHIFT).unsqueeze(-1), per_sample_mse)
            entry_x.append(graph.entry_x)
            theta.append(graph.params_to_graph(dict(siren.named_parameters())).detach())
            spec = graph.spec
        if bar is not None and cfg["steps"] == 0:
            bar.update(len(image_id))
        return {"spec": spec.to_dict(), "entry_x": torch.stack(entry_x), "theta": torch.stack(theta),
                "fit_mse": mse, "image_id": image_id, "points": points, "fit_time_s": fit_time}

    def merge(self, chunks: list[dict]) -> tuple[dict, str]:
        data = {"config": self.config, "spec": chunks[0]["spec"], "points": chunks[0]["points"],
                "fit_time_s": sum(c["fit_time_s"] for c in chunks)}
        for key in ("entry_x", "theta", "fit_mse", "image_id"):
            data[key] = torch.cat([c[key] for c in chunks])
        return data, readme(self.config, data["fit_mse"], data["fit_time_s"])

    def len(self) -> int:
        return self.num_inrs

    # -- items --------------------------------------------------------------------------------------------
    @property
    def structure(self) -> dict:
        """The index tensors every item shares (one architecture, one set size), edges materialized."""
        if self._structure is None:
            n = self.config["num_points"]
            ref = capture(make_siren(self.config["hidden"], self.config["w0"]), torch.zeros(n, 2),
                          torch.zeros(n, 1), per_sample_mse)
            ref.materialize_edges()
            self._structure = {k: v for k, v in ref._store.items() if k not in ("entry_x", "spec")}
        return self._structure

    def _item_tensors(self) -> dict:
        return {"entry_x": self.entry_x, "theta": self.theta, "image": self.images, "target": self.targets,
                "probe_out": self.probe_out, "point_target": self.point_target,
                "fit_mse": self.fit_mse.view(-1, 1), "label": self.labels.view(-1, 1),
                "image_id": self.image_id.view(-1, 1)}

    def get(self, idx: int) -> GradientGraph:
        graph = GradientGraph(**self.structure)
        graph.spec = self.spec
        for key, t in self._item_tensors().items():
            graph[key] = t[idx]
        return graph

    def batch(self, indices: list[int]):
        """The PyG batch of ``indices`` (as DataLoader would collate it, collated once per batch size)."""
        if self._batcher is None:
            template = GradientGraph(**self.structure)
            template.spec = self.spec
            self._batcher = UniformBatcher(template, self._item_tensors())
        return self._batcher.batch(indices)

    def batches(self, indices: list[int], batch_size: int):
        for i in range(0, len(indices), batch_size):
            yield self.batch(indices[i:i + batch_size])

    def split_indices(self) -> dict[str, list[int]]:
        """Fixed stratified splits of the INRs: test, val, train (see the module docstring)."""
        n_img = self.config["num_images"]
        labels = digit_images()[1][:n_img]
        g = torch.Generator().manual_seed(self.config["seed"] + 101)
        where = {}
        for c in range(10):
            members = torch.nonzero(labels == c).flatten()
            members = members[torch.randperm(len(members), generator=g)].tolist()
            k = len(members)  # at least one test and one validation image per class where there are 3
            n_test = round(SPLIT_FRACTIONS["test"] * k) or int(k >= 2)
            n_val = round(SPLIT_FRACTIONS["val"] * k) or int(k >= 3)
            for j, img in enumerate(members):
                where[img] = "test" if j < n_test else "val" if j < n_test + n_val else "train"
        out = {"test": [], "val": [], "train": []}
        for i in range(self.num_inrs):
            out[where[i % n_img]].append(i)
        return out


def readme(config: dict, fit_mse: torch.Tensor, fit_time: float) -> str:
    p = psnr(fit_mse)
    return f"""# digit_inrs

Generated by `gradgraph.data.DigitINRs` (nothing is downloaded: scikit-learn ships the digits). One SIREN
2 -> 32 -> 32 -> 1 (sin(30 x) on the hidden layers, output + 0.5, coordinates in [-1, 1]^2) per image of
scikit-learn's 8x8 digits (÷16, bilinear to 28x28, clamped to [0, 1]); {config['inrs_per_image']} INR(s) per
image, {config['num_images']} images. Edit target: the 3x3 max-filter dilation of the 28x28 image. Graph: the
gradients of (f(x) - target(x))^2 at {config['num_points']} fixed grid coordinates (they see the target there).

Fit: {config['steps']} Adam steps at lr {config['lr']} per INR, one vectorized fit per chunk of
{config['chunk_size']} INRs (torch.func vmap + functional_call), seed {config['seed']}.
PSNR of the fits: mean {float(p.mean()):.2f} dB, median {float(p.median()):.2f} dB, min {float(p.min()):.2f} dB
(pixel MSE mean {float(fit_mse.mean()):.2e}); fit time {fit_time:.0f} s in all ({1e3 * fit_time / max(len(p), 1) /
max(config['steps'], 1):.2f} ms per INR-step).

Splits: per digit class, a seeded shuffle of its images: 20% test, 10% validation, the rest training.
Files: `raw/<tag>/chunk_*.pt` (written atomically; the fit resumes from them; deleted once
`processed/digit_inrs_<tag>.pt` holds everything), where `<tag>` hashes the settings.
"""
