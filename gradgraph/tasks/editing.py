"""INR editing: turn a SIREN of a digit into a SIREN of the digit's 3x3 dilation (paper Sec. 5.3).

Every model predicts a weight change Delta theta per parameter; the edited INR is theta + Delta theta, rendered on
the 28x28 grid through ``torch.func.functional_call`` (vmapped over the batch), and the loss is the mean squared
error against the dilated image (reported x10^-2 in the benchmark). A model with k edits per parameter (``+oce``)
renders the k edited INRs and averages their outputs.

Reference rows (:func:`reference_metrics`, nothing trained): ``identity`` (Delta theta = 0), ``oracle`` (the
dilation applied in image space to the INR's own rendering: the error left by the INR fit alone) and
``adam-k`` (k Adam steps on the 64-point editing loss from theta, the non-learned use of the same information
as the gradient graph; k and lr chosen on the validation split).

A run lives in ``<out_dir>/<model>-i<images>x<inrs per image>-s<seed>/`` (see :class:`gradgraph.train.RunDir`):
checkpoint after every epoch (a rerun resumes), metrics and best-validation weights when it ends.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..data.digit_inrs import DigitINRs, dilate, grid_coords, make_siren, render, theta_to_params
from ..errors import UnknownNameError
from ..nn import calibrate_scales
from ..nn.registry import METANETWORKS
from ..train.distributed import all_sum, world
from ..train.loop import Task, train
from .configs import EDITING_MODELS, EditingConfig

__all__ = ["EditingTask", "EditingConfig", "train_editing", "edited_render", "reference_metrics", "adam_edit",
           "load_dataset", "build_model"]

CALIBRATION_INRS = 256  # training INRs that set the weight scales and GradMetaNet's input scales
ADAM_GRID = {"k": (1, 3, 10, 30, 100), "lr": (1e-4, 3e-4, 1e-3, 3e-3)}


def load_dataset(cfg: EditingConfig, progress: bool = True) -> DigitINRs:
    """The run's dataset, fitted if needed. Under torch.distributed every rank fits: the chunk store splits the
    chunks between them (gradgraph.data.store)."""
    return DigitINRs(cfg.dataset_root, num_images=cfg.num_images, inrs_per_image=cfg.inrs_per_image,
                     steps=cfg.fit_steps, num_points=cfg.num_points, seed=cfg.data_seed,
                     progress=progress and world()[0] == 0)


def build_model(name: str, example_graph) -> nn.Module:
    """The editing model ``name`` (see :data:`gradgraph.tasks.configs.EDITING_MODELS`)."""
    if name not in EDITING_MODELS:
        raise UnknownNameError(f"unknown editing model {name!r}: choose one of {', '.join(EDITING_MODELS)}")
    metanet, hyper = EDITING_MODELS[name]
    return METANETWORKS.build(metanet, example_graph=example_graph, **hyper)


def edited_render(spec, theta: Tensor, delta: Tensor | None, coords: Tensor, siren: nn.Module) -> Tensor:
    """Renderings [G, n] of the edited INRs theta + delta: ``theta`` [G * P] (a batch's concatenated theta),
    ``delta`` [G * P, k] or None; with k > 1 edits the k edited INRs' outputs are averaged."""
    P = spec.num_params
    theta = theta.reshape(-1, 1, P)
    G = theta.shape[0]
    if delta is not None:
        delta = delta.reshape(G, P, -1).transpose(1, 2)  # [G, k, P]
        theta = theta + delta
    k = theta.shape[1]
    out = render(siren, theta_to_params(spec, theta.reshape(G * k, P)), coords)
    return out.reshape(G, k, -1).mean(1)


def adam_edit(spec, theta: Tensor, coords: Tensor, targets: Tensor, steps: int, lr: float,
              siren: nn.Module) -> Tensor:
    """``steps`` Adam steps from each INR's theta [M, P] on its mean squared error at ``coords`` [n, 2] against
    ``targets`` [M, n]; the INRs are independent. Returns the edited theta [M, P]."""
    theta = theta.detach().clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(steps):
        with torch.enable_grad():
            loss = (render(siren, theta_to_params(spec, theta), coords) - targets).pow(2).mean(1).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
    return theta.detach()


@torch.no_grad()
def reference_metrics(data: DigitINRs, split: dict[str, list[int]], grid: dict = ADAM_GRID) -> dict:
    """Test MSE of the rows that are not trained: identity, oracle, adam-k (k and lr picked on validation)."""
    siren, coords = make_siren(data.config["hidden"], data.config["w0"]), grid_coords()
    points = grid_coords()[data.points]

    def rows(idx):
        return data.theta[idx], data.targets[idx], data.point_target[idx]

    def mse(theta, target):
        return float((render(siren, theta_to_params(data.spec, theta), coords) - target).pow(2).mean())

    th, tg, _ = rows(split["test"])
    out = {"identity": mse(th, tg),
           "oracle": float((dilate(render(siren, theta_to_params(data.spec, th), coords)) - tg).pow(2).mean())}
    vth, vtg, vpt = rows(split["val"])
    best = None
    for steps in grid["k"]:
        for lr in grid["lr"]:
            val = mse(adam_edit(data.spec, vth, points, vpt, steps, lr, siren), vtg)
            if best is None or val < best[0]:
                best = (val, steps, lr)
    _, steps, lr = best
    pt = data.point_target[split["test"]]
    out.update({"adam-k": mse(adam_edit(data.spec, th, points, pt, steps, lr, siren), tg), "adam_k": steps,
                "adam_lr": lr, "adam_val": best[0]})
    return out


class EditingTask(Task):
    """Predict Delta theta; loss: pixel MSE of the edited INR's 28x28 rendering against the dilated image."""

    loss_name = "mse"
    monitor = "mse"

    def setup(self) -> None:
        if self.data is None:
            self.data = load_dataset(self.cfg, self.progress)
        self.split = self.data.split_indices()
        if self.cfg.train_size is not None:
            self.split["train"] = self.split["train"][:self.cfg.train_size]
        self.siren = make_siren(self.data.config["hidden"], self.data.config["w0"]).to(self.cfg.device)
        self.coords = grid_coords().to(self.cfg.device)

    def train_items(self) -> list[int]:
        return self.split["train"]

    def batch(self, items: list[int]):
        return self.data.batch(items).to(self.cfg.device)

    def build_model(self) -> nn.Module:
        return build_model(self.cfg.model, self.data[self.split["train"][0]])

    def initialize(self, model: nn.Module) -> None:
        """Weight scales, then GradMetaNet's input scales, from the first training INRs (no targets used).
        Every rank calibrates on the same batches."""
        calib = self.split["train"][:CALIBRATION_INRS]
        model.calibrate(b.to(self.cfg.device) for b in self.data.batches(calib, self.cfg.batch_size))
        calibrate_scales(model, (b.to(self.cfg.device) for b in self.data.batches(calib, self.cfg.batch_size)))

    def render(self, model: nn.Module | None, batch) -> Tensor:
        delta = None if model is None else model(batch)
        return edited_render(self.data.spec, batch.theta, delta, self.coords, self.siren)

    def loss(self, model: nn.Module, batch) -> tuple[Tensor, int]:
        err = self.render(model, batch) - batch.target.reshape(-1, self.coords.shape[0])
        return err.pow(2).sum(), err.numel()

    @torch.no_grad()
    def evaluate(self, model: nn.Module | None, split: str) -> dict[str, float]:
        """Pixel MSE of the edited INRs of a split (``model=None``: the identity, Delta theta = 0)."""
        rank, size = world()
        if model is not None:
            model.eval()
        sse = n = 0.0
        for batch in self.data.batches(self.split[split][rank::size], self.cfg.batch_size):
            s, c = self.loss(model, batch.to(self.cfg.device)) if model is not None else self._identity(batch)
            sse, n = sse + float(s), n + c
        sse, n = all_sum([sse, n])
        if model is not None:
            model.train()
        return {"mse": sse / max(n, 1)}

    def _identity(self, batch) -> tuple[Tensor, int]:
        err = self.render(None, batch.to(self.cfg.device)) - batch.target.to(self.cfg.device).reshape(
            -1, self.coords.shape[0])
        return err.pow(2).sum(), err.numel()

    def final_metrics(self, model: nn.Module) -> dict:
        test, ident = self.evaluate(model, "test")["mse"], self.evaluate(None, "test")["mse"]
        return {"test_mse": test, "identity_test_mse": ident, "improvement_mse": 1 - test / ident}


def train_editing(cfg: EditingConfig, dataset: DigitINRs | None = None, progress: bool = True,
                  stop_after_epochs: int | None = None) -> dict:
    """Train (or resume, or read back) one editing run; see :func:`gradgraph.train.train`."""
    if cfg.model not in EDITING_MODELS:
        raise UnknownNameError(f"unknown editing model {cfg.model!r}: choose one of {', '.join(EDITING_MODELS)}")
    return train(EditingTask(cfg, dataset, progress), progress, stop_after_epochs)
