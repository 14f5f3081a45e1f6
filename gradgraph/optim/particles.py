"""PES particles in stacked tensors: every inner run of a meta-step advanced by one batched step.

:class:`BatchedLOptProblem` is :class:`~gradgraph.optim.meta.LOptProblem` (same protocol, same results up to
float rounding: tested) for the variants whose update does not read the gradient graph (``sgdm``, ``ds``).
The 2n particles' model parameters are one [2n, P] tensor, their optimizer state [2n, 6, P] and [2n, P]; per
inner step there is one ``torch.func.vmap`` of the task's loss and gradient over the particles (through
``functional_call`` on one template model), one batched feature computation and one batched MLP (``baddbmm``
with every particle's own meta-parameters), instead of 2n Python-level optimizer steps.

Measured on digits-mlp, 16 pairs: ``python benchmarks/lopt_meta_step.py`` (``benchmarks/results/lopt_meta_step.md``).
Graph variants keep the loop of :class:`LOptProblem`: the metanetwork forward on a graph of a few hundred nodes
is dominated by per-op overhead, and ``vmap`` over it measured slower than the loop (80 ms against 69 ms for 8
particles).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap
from torch.nn.utils import parameters_to_vector

from .features import DECAYS, TIMESCALES
from .meta import LOptProblem
from .tasks import OptTask
from .variants import DS, LearnedRule

__all__ = ["BatchedLOptProblem", "batchable"]

EPS = 1e-12  # as tensor_rms_normalize
CHUNK = 256  # entries per MLP chunk: 2n x 256 x 32 activations, ~1 MB at 32 particles


def batchable(rule: LearnedRule) -> bool:
    """Whether :class:`BatchedLOptProblem` computes ``rule``'s update (sgdm or a DS MLP, no graph)."""
    return not rule.needs_graph and type(rule).learned_term in (LearnedRule.learned_term, DS.learned_term)


class BatchedLOptProblem(LOptProblem):
    """The inner runs of ``task`` under ``rule``'s variant, all particles stacked (see the module docstring);
    the settings, ``theta0`` and ``scalar_mask`` are :class:`LOptProblem`'s."""

    def __init__(self, task: OptTask, rule: LearnedRule, horizon: int | None = None, meta_loss: str = "train") -> None:
        if not batchable(rule):
            raise TypeError(f"variant '{rule.variant}' reads the gradient graph or has its own learned_term: use "
                            "LOptProblem (one optimizer per particle)")
        super().__init__(task, rule, horizon, meta_loss)
        self.template = task.model(seed=0)
        self.names = [n for n, p in self.template.named_parameters() if p.requires_grad]
        shapes = dict(self.template.named_parameters())
        self.shapes = [shapes[n].shape for n in self.names]
        self.sizes = [s.numel() for s in self.shapes]
        # the rule's meta-parameters in theta order: (name, shape, offset)
        self.meta_layout, off = [], 0
        for n, p in rule.named_parameters():
            self.meta_layout.append((n, p.shape, off))
            off += p.numel()
        self.linears = [f"mlp.{i}" for i, m in enumerate(getattr(rule, "mlp", [])) if isinstance(m, nn.Linear)]
        dtype = shapes[self.names[0]].dtype
        self.decays = torch.tensor(DECAYS, dtype=dtype)[None, :, None]
        self.timescales = torch.tensor(TIMESCALES, dtype=dtype)

    # -- inner runs ---------------------------------------------------------------------------------------
    def _fresh_params(self, run: int) -> Tensor:
        model = self.task.model(seed=run)
        return parameters_to_vector([p for p in model.parameters() if p.requires_grad]).detach()

    def init(self, runs: Tensor, starts: Tensor) -> None:
        n = runs.numel()
        self.runs, self.starts, self.used = runs.tolist(), starts.tolist(), [0] * n
        self.data = [self.task.batches(seed=r) for r in self.runs]
        fresh = torch.stack([self._fresh_params(r) for r in self.runs])
        self.params = torch.cat([fresh, fresh])  # [2n, P]: particle p and n + p start from the same model
        self.momenta = self.params.new_zeros(2 * n, len(DECAYS), self.params.shape[1])
        self.momentum = torch.zeros_like(self.params)
        self.steps = torch.zeros(2 * n, dtype=torch.long)

    def reset(self, particles: Tensor, runs: Tensor) -> None:
        n = runs.numel()
        for p in torch.nonzero(particles).flatten().tolist():
            pair = p % n
            if self.runs[pair] != int(runs[pair]) or self.used[pair] > 0:  # both particles of a pair restart together
                self.runs[pair], self.used[pair] = int(runs[pair]), 0
                self.data[pair] = self.task.batches(seed=self.runs[pair])
            self.params[p] = self._fresh_params(self.runs[pair])
            self.momenta[p], self.momentum[p], self.steps[p] = 0, 0, 0

    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        return {n: t.view(flat.shape[0], *s) for n, s, t in zip(self.names, self.shapes, flat.split(self.sizes, 1))}

    def _meta(self, thetas: Tensor) -> dict[str, Tensor]:
        thetas = thetas.to(self.params.dtype)
        return {n: thetas[:, off:off + s.numel()].reshape(thetas.shape[0], *s) for n, s, off in self.meta_layout}

    def _loss(self, params, x, y):
        return self.task.loss(lambda inp: functional_call(self.template, params, (inp,)), (x, y))

    def _loss_and_grads(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        grads, losses = vmap(grad_and_value(self._loss))(self._unflatten(self.params), x, y)
        return losses.detach(), torch.cat([grads[n].flatten(1) for n in self.names], 1).detach()

    def _learned_term(self, meta: dict[str, Tensor], g: Tensor) -> Tensor:
        """F [2n, P] of the DS MLP, every particle with its own MLP weights (features as unf_features)."""
        d = self.decays
        self.momenta.mul_(d).add_(g[:, None] * (1 - d))
        values = torch.cat([self.params[:, None], g[:, None], self.momenta], 1).clamp(-1.0, 1.0)  # [2n, 8, P]
        parts = []
        for v in values.split(self.sizes, 2):  # per parameter tensor and channel: divide by the RMS
            parts.append(v / (v.square().mean(2, keepdim=True).sqrt() + EPS))
        values = torch.cat(parts, 2).transpose(1, 2)  # [2n, P, 8]
        nv = values.shape[2]
        tf = torch.tanh(self.steps.to(g.dtype)[:, None] / self.timescales - 1)  # [2n, 11], as time_features
        ws = [meta[f"{name}.weight"].transpose(1, 2) for name in self.linears]  # [2n, in, out]
        bs = [meta[f"{name}.bias"][:, None, :] for name in self.linears]
        # the 11 time channels are the same for every entry of a particle: fold them into the first bias
        bs[0] = bs[0] + torch.bmm(tf[:, None, :], ws[0][:, nv:])
        ws[0] = ws[0][:, :nv]
        out = g.new_empty(g.shape)
        for s in range(0, values.shape[1], CHUNK):  # chunks of entries: the activations stay in cache
            h = values[:, s:s + CHUNK]
            for i, (w, b) in enumerate(zip(ws, bs)):
                h = torch.baddbmm(b, h, w)
                if i < len(ws) - 1:
                    h.relu_()
            out[:, s:s + CHUNK] = h[..., 0]
        return out

    @torch.no_grad()
    def step(self, thetas: Tensor, t: Tensor) -> Tensor:
        batches = [next(d) for d in self.data]
        self.used = [u + 1 for u in self.used]
        x, y = (torch.stack([b[k] for b in batches]) for k in (0, 1))
        with torch.enable_grad():
            losses, g = self._loss_and_grads(torch.cat([x, x]), torch.cat([y, y]))
        meta = self._meta(thetas)
        mu = torch.sigmoid(meta["logit_mu"])[:, None]
        self.momentum.mul_(mu).add_(g * (1 - mu))
        update = self.momentum
        if self.linears:
            update = self.momentum + meta["log_beta"].exp()[:, None] * self._learned_term(meta, g)
        self.params.sub_(meta["log_alpha"].exp()[:, None] * update)
        self.steps += 1
        if self.meta_loss == "val":  # every particle's loss on the validation batch, after its update
            xv, yv = self.task.eval_batch("val")
            losses = vmap(self._loss, in_dims=(0, None, None))(self._unflatten(self.params), xv, yv)
        return losses

    def state_dict(self) -> dict:
        return {"runs": list(self.runs), "starts": list(self.starts), "used": list(self.used),
                "params": self.params.clone(), "momenta": self.momenta.clone(), "momentum": self.momentum.clone(),
                "steps": self.steps.clone()}

    def load_state_dict(self, sd: dict) -> None:
        self.runs, self.starts, self.used = list(sd["runs"]), list(sd["starts"]), list(sd["used"])
        self.data = []
        for run, used in zip(self.runs, self.used):
            data = self.task.batches(seed=run)
            for _ in range(used):  # the data stream resumes where it stopped
                next(data)
            self.data.append(data)
        self.params, self.momenta = sd["params"].clone(), sd["momenta"].clone()
        self.momentum, self.steps = sd["momentum"].clone(), sd["steps"].clone()
