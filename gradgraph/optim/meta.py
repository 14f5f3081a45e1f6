"""PES meta-training (Persistent Evolution Strategies, Vicol et al. 2021), as the reference implementation
(learned_optimization's truncated PES) does it.

N antithetic pairs of inner runs; pair i's two particles (i and N + i) share their data stream, their model
initialisation and every random state, and run with meta-parameters theta + eps_i and theta - eps_i,
eps_i ~ N(0, sigma^2 I), sigma = 0.01. Each meta-step unrolls a truncation of K inner steps (50) of every
particle; inner runs persist across truncations until they reach the horizon T, then restart from a fresh
model (a new run id: new data order and initialisation). Starts are staggered: pair i's first run begins at a
random step in [0, T) (a shorter first run), so resets are spread over meta-steps.

The estimate, with A_i the accumulated perturbation of pair i's current run (the sum of the eps of every
truncation since its run started: PES's correction for the truncation bias)::

    g = sum_{i,k} m_ik (L+_ik - L-_ik) A_ik / (2 sigma^2 sum_{i,k} m_ik)

L the per-step training loss clipped to [0, 1.5 ln classes] (NaN -> the maximum). When a run ends inside a
truncation, A_i restarts from this truncation's eps_i at the reset, and the reset step is masked (m = 0): its
loss is that of a freshly initialised model, which does not depend on theta (pure variance); so is the first
step of every pair's first (staggered) run.

**Meta-objective: the mean training loss over the inner trajectory** (each step's loss on its own batch,
before the update), as UNF's code optimises; the paper's text names the final loss instead. The meta-gradient
has NaNs set to 0 and is clipped to norm 1.0; Adam updates the meta-parameters.

An *inner problem* supplies the particles; :class:`LOptProblem` trains a task's model with a
:class:`~gradgraph.optim.LearnedOptimizer` per particle (any variant);
:class:`~gradgraph.optim.particles.BatchedLOptProblem` runs all particles in stacked tensors (``sgdm``, ``ds``);
the tests use a batched toy problem with a known gradient.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from ..train.distributed import all_sum, all_sum_tensor, world
from .optimizer import LearnedOptimizer
from .tasks import OptTask
from .variants import LearnedRule

__all__ = ["PESConfig", "PES", "LOptProblem", "META_LOSSES", "check_meta_loss"]

# What a step's meta-loss is: "train", the training loss of the step's batch before the update (UNF's code, the
# issue's definition); "val", the loss on the task's validation batch after the update (learned_optimization's
# outer-validation objective: it rewards generalisation, where "train" rewards memorising the training set fast)
META_LOSSES = ("train", "val")


def check_meta_loss(meta_loss: str) -> str:
    if meta_loss not in META_LOSSES:
        raise ValueError(f"meta_loss must be one of {META_LOSSES}, got {meta_loss!r}")
    return meta_loss


@dataclass
class PESConfig:
    pairs: int = 16
    truncation: int = 50
    sigma: float = 0.01
    lr: float = 1e-3
    clip_norm: float = 1.0
    seed: int = 0
    scalar_lr: float | None = None  # learning rate of the problem's scalar step-size parameters (default: lr)


class PES:
    """PES on flat meta-parameters ``theta`` [D] for ``problem`` (see :class:`LOptProblem` for the protocol:
    ``horizon``, ``max_loss``, ``init(runs, starts)``, ``reset(particles, runs)``, ``step(thetas [2n, D], t [n])
    -> losses [2n]``, ``state_dict()``/``load_state_dict()``; n the pairs this process runs).

    Under torch.distributed (``torchrun``) the pairs are sharded over the ranks (pair i on rank i mod world):
    every rank draws the same perturbations from the same generator, runs only its own pairs' particles, and
    the sums that make the estimate are all-reduced, so every rank takes the same meta-step, equal to one
    process's up to the order of float additions (tested with 2 gloo ranks)."""

    def __init__(self, problem, theta: Tensor, cfg: PESConfig | None = None) -> None:
        self.problem, self.cfg = problem, cfg or PESConfig()
        N, T = self.cfg.pairs, problem.horizon
        self.theta = torch.nn.Parameter(theta.detach().clone().double())
        self.adam = torch.optim.Adam([self.theta], lr=self.cfg.lr)
        # Adam's per-coordinate update is proportional to its learning rate, so a coordinate's own rate is the
        # update rescaled: the step sizes (log alpha, logit mu, log beta) are log-scale numbers that need far
        # larger moves than the MLP's weights (at lr 1e-3, alpha takes 2,300 meta-steps to grow 10x)
        self.lr_scale = None
        if self.cfg.scalar_lr is not None:
            mask = problem.scalar_mask() if hasattr(problem, "scalar_mask") else torch.zeros(theta.numel(), dtype=bool)
            self.lr_scale = torch.where(mask, self.cfg.scalar_lr / self.cfg.lr, 1.0).double()
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        self.t = torch.randint(0, T, (N,), generator=self.gen)  # staggered starts
        self.runs = torch.arange(N)
        self.accum = torch.zeros(N, theta.numel(), dtype=torch.float64)
        self.fresh = torch.ones(N, dtype=torch.bool)  # the next step is a run's first (its loss is masked)
        self.meta_step = 0
        self.history: list[float] = []
        self.rank, self.world = world()
        self.own = torch.arange(N)[self.rank::self.world]  # the pairs this process runs
        problem.init(self.runs[self.own].clone(), self.t[self.own].clone())

    def estimate(self) -> tuple[Tensor, float]:
        """One truncation of every particle: the PES meta-gradient [D] and the mean (unmasked) loss."""
        N, D, T, max_loss = self.cfg.pairs, self.theta.numel(), self.problem.horizon, self.problem.max_loss
        eps = torch.randn(N, D, generator=self.gen, dtype=torch.float64) * self.cfg.sigma
        A = self.accum + eps
        theta, own, n = self.theta.detach(), self.own, self.own.numel()
        thetas = torch.cat([theta + eps[own], theta - eps[own]])
        g, count, loss_sum = torch.zeros(D, dtype=torch.float64), 0.0, 0.0
        for _ in range(self.cfg.truncation):
            done = self.t >= T
            if bool(done.any()):
                self.runs[done] += N
                self.t[done] = 0
                A[done] = eps[done]  # the new run has seen only this truncation's perturbation
                if bool(done[own].any()):
                    self.problem.reset(torch.cat([done[own], done[own]]), self.runs[own].clone())
            losses = self.problem.step(thetas, self.t[own].clone()).double()
            losses = torch.nan_to_num(losses, nan=max_loss, posinf=max_loss).clamp(0, max_loss)
            valid = (~(done | self.fresh)).double()[own]  # a fresh model's loss does not depend on theta
            self.fresh[:] = False
            g += ((losses[:n] - losses[n:]) * valid) @ A[own]
            count += float(valid.sum())
            loss_sum += float(((losses[:n] + losses[n:]) / 2 * valid).sum())
            self.t += 1
        self.accum = A
        g = all_sum_tensor(g)
        count, loss_sum = all_sum([count, loss_sum])
        count = max(count, 1.0)
        return g / (2 * self.cfg.sigma ** 2 * count), loss_sum / count

    def step(self) -> float:
        """Estimate, clean (NaN -> 0, norm clipped to ``clip_norm``) and apply one Adam meta-step; the meta-loss."""
        grad, loss = self.estimate()
        grad = torch.nan_to_num(grad, nan=0.0, posinf=0.0, neginf=0.0)
        norm = float(grad.norm())
        if norm > self.cfg.clip_norm:
            grad = grad * (self.cfg.clip_norm / norm)
        self.adam.zero_grad()
        self.theta.grad = grad
        before = self.theta.detach().clone()
        self.adam.step()
        if self.lr_scale is not None:
            with torch.no_grad():
                self.theta.copy_(before + (self.theta - before) * self.lr_scale)
        self.meta_step += 1
        self.history.append(loss)
        return loss

    def state_dict(self) -> dict:
        return {"config": asdict(self.cfg), "theta": self.theta.detach().clone(), "adam": self.adam.state_dict(),
                "gen": self.gen.get_state(), "t": self.t.clone(), "runs": self.runs.clone(),
                "accum": self.accum.clone(), "fresh": self.fresh.clone(), "meta_step": self.meta_step,
                "history": list(self.history), "world": self.world, "problem": self._problem_states()}

    def _problem_states(self):
        """The problem's state; under torch.distributed every rank's, gathered (a collective: call on all ranks)."""
        local = self.problem.state_dict()
        if self.world == 1:
            return local
        shards = [None] * self.world
        torch.distributed.all_gather_object(shards, local)
        return shards

    def load_state_dict(self, sd: dict) -> None:
        if sd["config"] != asdict(self.cfg):
            raise ValueError(f"this checkpoint was written with PES settings {sd['config']}, not {asdict(self.cfg)}: "
                             "resume with the same settings or start a new run folder")
        with torch.no_grad():
            self.theta.copy_(sd["theta"])
        self.adam.load_state_dict(sd["adam"])
        self.gen.set_state(sd["gen"])
        self.t, self.runs, self.accum = sd["t"].clone(), sd["runs"].clone(), sd["accum"].clone()
        self.fresh = sd["fresh"].clone()
        self.meta_step, self.history = int(sd["meta_step"]), list(sd["history"])
        if int(sd.get("world", 1)) != self.world:
            raise ValueError(f"this checkpoint was written by {sd.get('world', 1)} process(es), not {self.world}: "
                             "resume with the same number of torchrun processes")
        self.problem.load_state_dict(sd["problem"] if self.world == 1 else sd["problem"][self.rank])


class LOptProblem:
    """Inner runs of ``task`` trained by a :class:`LearnedOptimizer` of ``rule``'s variant, one per particle.

    Particle p (pair p mod N) trains ``task.model(seed=run)`` on ``task.batches(seed=run)``; its meta-parameters
    are the flat ``thetas[p]``, loaded into one working copy of ``rule`` before its step (particles run one after
    another, and the rule holds no per-run state: that lives in each particle's optimizer; one copy also lets
    ``compile=True`` compile the metanetwork once for all particles). For sgdm and ds,
    :class:`~gradgraph.optim.particles.BatchedLOptProblem` stacks the particles instead."""

    def __init__(self, task: OptTask, rule: LearnedRule, horizon: int | None = None, meta_loss: str = "train",
                 compile: bool | str = False) -> None:
        self.task, self.rule = task, rule
        self.horizon = horizon or task.horizon
        self.max_loss = task.max_loss
        self.meta_loss = check_meta_loss(meta_loss)
        self.particles: list[dict] = []
        self.working = type(rule)(**rule.hyper())
        self.working.load_state_dict(rule.state_dict())
        self.compile = compile if rule.needs_graph else False

    def theta0(self) -> Tensor:
        return parameters_to_vector(self.rule.parameters()).detach()

    def scalar_mask(self) -> Tensor:
        """[D] True on the rule's scalar step sizes (log alpha, logit mu, log beta), in theta0's order."""
        return torch.cat([torch.full((p.numel(),), p.dim() == 0) for p in self.rule.parameters()])

    def _fresh(self, run: int, start: int = 0) -> dict:
        model = self.task.model(seed=run)
        opt = LearnedOptimizer(model, self.rule.variant, meta=self.working, compile=self.compile)
        return {"run": run, "model": model, "opt": opt, "data": self.task.batches(seed=run), "used": 0, "start": start}

    def init(self, runs: Tensor, starts: Tensor) -> None:
        self.particles = [self._fresh(int(r), int(s)) for r, s in zip(torch.cat([runs, runs]), torch.cat([starts] * 2))]

    def reset(self, particles: Tensor, runs: Tensor) -> None:
        N = runs.numel()
        for p in torch.nonzero(particles).flatten().tolist():
            self.particles[p] = self._fresh(int(runs[p % N]))

    def step(self, thetas: Tensor, t: Tensor) -> Tensor:
        losses = torch.empty(len(self.particles))
        for p, part in enumerate(self.particles):
            vector_to_parameters(thetas[p].to(torch.float32), self.working.parameters())
            model, opt, batch = part["model"], part["opt"], next(part["data"])
            part["used"] += 1

            def closure(opt=opt, model=model, batch=batch):
                opt.zero_grad()
                loss = self.task.loss(model, batch)
                loss.backward()
                return loss
            loss = float(opt.step(closure).detach())
            losses[p] = loss if self.meta_loss == "train" else self.task.evaluate(model, "val")
        return losses

    def state_dict(self) -> dict:
        return {"particles": [{"run": p["run"], "used": p["used"], "start": p["start"],
                               "model": p["model"].state_dict(), "opt": p["opt"].state_dict()}
                              for p in self.particles]}

    def load_state_dict(self, sd: dict) -> None:
        self.particles = []
        for saved in sd["particles"]:
            part = self._fresh(int(saved["run"]), int(saved["start"]))
            part["model"].load_state_dict(saved["model"])
            part["opt"].load_state_dict(saved["opt"])
            for _ in range(int(saved["used"])):  # the data stream resumes where it stopped
                next(part["data"])
            part["used"] = int(saved["used"])
            self.particles.append(part)
