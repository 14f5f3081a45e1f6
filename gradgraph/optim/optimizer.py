"""``LearnedOptimizer``: a learned optimizer as an ordinary ``torch.optim.Optimizer``.

    opt = gradgraph.optim.LearnedOptimizer(model, variant="ds+gradmetanet")
    for x, y in loader:
        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)        # mean over the batch (loss_reduction="mean")
            loss.backward()
            return loss
        opt.step(closure)                              # records the step's per-sample (a, g) itself

    # or, without a closure:
    with opt.record():
        loss = F.cross_entropy(model(x), y); loss.backward()
    opt.step()

**Loss reduction and gradient scale.** Momenta and the update use ``p.grad`` exactly as your backward left it
(like SGD: a sum-reduced loss takes b-times larger steps). The gradient graph holds each sample's own
gradient: with ``loss_reduction="mean"`` (default) every recorded ``g`` is multiplied by the batch size b
(``GradientRecorder``'s ``grad_scale``), with ``"sum"`` by 1. GradMetaNet's inputs are normalised per layer,
so only the relative scale across samples matters, but a wrong reduction changes the pooled-neuron averages.

**State.** Per parameter: ``momenta`` [*shape, 6] (the feature EMAs) and ``momentum`` [*shape] (the update's
m_mu); optimizer-wide under the key ``"lopt"``: ``step`` and ``node_avg`` (the pooled-neuron averages of
``ds+gradmetanet``). ``state_dict()`` also holds the meta-parameters (``"meta"``), so model + optimizer state
resume a run exactly. ``sgdm`` (F = 0) steps along ``momentum`` with foreach ops and leaves ``momenta`` at zero
(nothing reads them); the other variants compute F with the chunked fast path of :mod:`gradgraph.optim.fast`
(equal to the reference ``learned_term`` on [P, 19] features up to float rounding), or through
``learned_term`` itself for a rule class that overrides it. Param groups take ``lr``, a multiplier of the
learned alpha (default 1.0; schedulers work on it). Parameters whose ``.grad`` is None are stepped with a zero gradient.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from ..capture import CaptureSession
from ..errors import GradGraphError
from ..graph.build import build_graph
from ..nn.compiled import compiled_forward
from .fast import FlatPlan, ds_term
from .features import DECAYS, segments, unf_features
from .pretrained import load_rule
from .variants import DS, NODE_DECAYS, VARIANTS, DSGradMetaNet, LearnedRule, param_neurons

__all__ = ["LearnedOptimizer", "RecordError"]

_FAST = (DS.learned_term, DSGradMetaNet.learned_term)  # rules whose F the chunked path computes

REDUCTIONS = ("mean", "sum")


class RecordError(GradGraphError):
    """A graph variant stepped without this step's recorded per-sample gradients."""


class LearnedOptimizer(torch.optim.Optimizer):
    """A learned optimizer (see the module docstring for the update, the state and the loss reduction).

    Args:
        model_or_params: an ``nn.Module`` (needed by graph variants: its trainable parameters are optimised and
            its forward is recorded) or an iterable of parameters / param-group dicts (non-graph variants).
        variant: a name in :data:`gradgraph.optim.VARIANTS` (``sgdm``, ``ds``, ``ds+gradmetanet``).
        meta: the meta-parameters: a :class:`LearnedRule` of that variant (shared, not copied: meta-training
            perturbs it), or None for the variant's fresh initialisation (an untrained variant is SGDM with
            alpha = 0.1, mu = 0.9).
        lr: default multiplier of alpha for every param group.
        loss_reduction: ``"mean"`` or ``"sum"``, how your loss reduces over the batch (sets the graph's scale).
        compile: graph variants: run the metanetwork's forward through torch.compile (True: the inductor
            backend, or a backend name; see :class:`gradgraph.nn.compiled.CompiledForward`; one per
            metanetwork module, shared by the optimizers that use it). The first steps
            pay the compilation (seconds); False (default) stays eager.
        **variant_kwargs: passed to the variant's constructor when ``meta`` is None.
    """

    def __init__(self, model_or_params, variant: str = "ds", meta: LearnedRule | None = None, lr: float = 1.0,
                 loss_reduction: str = "mean", compile: bool | str = False, **variant_kwargs) -> None:
        if loss_reduction not in REDUCTIONS:
            raise ValueError(f"loss_reduction must be one of {REDUCTIONS}, got {loss_reduction!r}")
        self.model = model_or_params if isinstance(model_or_params, nn.Module) else None
        params = ([p for p in self.model.parameters() if p.requires_grad] if self.model is not None
                  else model_or_params)
        super().__init__(params, {"lr": lr})
        if meta is None:
            meta = VARIANTS.build(variant, **variant_kwargs)
        elif variant_kwargs:
            raise ValueError(f"pass either meta= or variant keyword arguments {sorted(variant_kwargs)}, not both")
        if not isinstance(meta, LearnedRule) or meta.variant != variant:
            raise ValueError(f"meta must be a LearnedRule of variant '{variant}', got "
                             f"{getattr(meta, 'variant', type(meta).__name__)!r}")
        if meta.needs_graph and self.model is None:
            raise TypeError(f"variant '{variant}' reads the step's gradient graph, so it needs the model: "
                            "LearnedOptimizer(model, ...) rather than LearnedOptimizer(model.parameters(), ...)")
        self.meta, self.variant, self.loss_reduction = meta, variant, loss_reduction
        if compile and not meta.needs_graph:
            raise ValueError(f"compile= compiles the metanetwork of a graph variant; '{variant}' has none")
        self._gnn = compiled_forward(meta.gnn, "inductor" if compile is True else compile) if compile else None
        self.state["lopt"] = {"step": 0, "node_avg": None}
        self._layout_key = None
        self._pending: CaptureSession | None = None
        self._structure: tuple | None = None  # (spec, param_neurons, theta_of_flat) of the last graph

    @classmethod
    def from_pretrained(cls, name: str, model_or_params, **kwargs) -> "LearnedOptimizer":
        """The optimizer of a shipped checkpoint (``gradgraph.optim.available()`` lists the names; a path to a
        ``rule.pt`` written by ``gradgraph meta-train`` works too) on ``model_or_params``; ``kwargs`` as for the
        constructor (``lr``, ``loss_reduction``). The meta-parameters are this optimizer's own copy."""
        rule = load_rule(name)
        return cls(model_or_params, variant=rule.variant, meta=rule, **kwargs)

    # -- recording -------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def record(self):
        """Record the per-sample (a, g) of one forward and backward of the model inside the block; the next
        ``step()`` uses them (once). A no-op for variants that do not read the graph."""
        if not self.meta.needs_graph:
            yield self
            return
        session = CaptureSession(self.model, use_hooks=True)
        with session:
            yield self
        self._pending = session

    def _take_graph(self):
        session, self._pending = self._pending, None
        if session is None:
            raise RecordError(
                f"variant '{self.variant}' needs this step's per-sample gradients, and nothing was recorded since "
                "the last step: call opt.step(closure), or run the forward and loss.backward() inside "
                "`with opt.record():` before every opt.step()")
        try:
            scale = float(session.batch_size) if self.loss_reduction == "mean" else 1.0
            records = session.records(grad_scale=scale)
            set_size = getattr(self.meta, "set_size", None)
            return build_graph(records if set_size is None else records.first_samples(set_size))
        except GradGraphError as e:
            raise RecordError(f"the recorded step of variant '{self.variant}' is unusable: {e}") from e

    # -- flat layout --------------------------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _layout(self):
        """Segments and flat state of the current param groups (rebuilt when the groups change)."""
        params = self._params()
        key = tuple(id(p) for p in params)
        if key != self._layout_key:
            self._layout_key = key
            sizes = [p.numel() for p in params]
            self._sizes = sizes
            self._seg, self._counts = segments(sizes, params[0].device)
            self._plan = FlatPlan(sizes, params[0].dtype, params[0].device)
            self._flat = None
            self._structure = None
        if self._flat is None:  # first step, new groups, or after load_state_dict: (re)gather the state
            like = params[0]
            P, D = sum(self._sizes), len(DECAYS)
            moms = torch.zeros(D, P, dtype=like.dtype, device=like.device)  # decays x entries (see fast.py)
            mom = torch.zeros(P, dtype=like.dtype, device=like.device)
            off = 0
            for p, n in zip(params, self._sizes):
                st = self.state[p]
                if "momenta" in st:
                    moms[:, off:off + n] = st["momenta"].reshape(n, D).t()
                    mom[off:off + n] = st["momentum"].reshape(n)
                st["momenta"] = moms[:, off:off + n].t().view(*p.shape, D)
                st["momentum"] = mom[off:off + n].view(p.shape)
                off += n
            self._flat = (moms, mom)
        return params

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        meta = state_dict.pop("meta", None)
        super().load_state_dict(state_dict)
        if meta is not None:
            self.meta.load_state_dict(meta)
        self.state["lopt"] = dict(self.state.get("lopt") or {"step": 0, "node_avg": None})
        self._flat = None  # the loaded per-parameter tensors become the flat state at the next step

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["meta"] = {k: v.detach().clone() for k, v in self.meta.state_dict().items()}
        return sd

    # -- the step -------------------------------------------------------------------------------------
    def _graph_context(self, params: list[Tensor]) -> dict:
        graph = self._take_graph()
        if self._structure is None or self._structure[0] is not graph.spec:
            names = {id(p): n for n, p in self.model.named_parameters()}
            theta = {}
            off = 0
            for n, p in self.model.named_parameters():
                if p.requires_grad:
                    theta[n] = (off, p.numel())
                    off += p.numel()
            missing = [i for i, p in enumerate(params) if names.get(id(p)) not in theta]
            if missing or off != graph.spec.num_params:
                raise TypeError(f"variant '{self.variant}' optimises the model's trainable parameters, but "
                                f"{len(missing)} optimised tensors are not among them; build the optimizer as "
                                "LearnedOptimizer(model, ...) (or param groups holding exactly those tensors)")
            starts = [theta[names[id(p)]][0] for p in params]
            identity = len(params) == len(theta) and starts == sorted(starts) and \
                [names[id(p)] for p in params] == list(theta)
            theta_of_flat = None if identity else torch.cat(
                [torch.arange(s, s + p.numel(), device=p.device) for s, p in zip(starts, params)])
            self._structure = (graph.spec, param_neurons(graph), theta_of_flat)
        st = self.state["lopt"]
        N = graph.spec.num_nodes
        first = st["node_avg"] is None or st["node_avg"].shape[0] != N + 2
        if first:
            st["node_avg"] = torch.zeros(N + 2, 2 * len(NODE_DECAYS), dtype=params[0].dtype)
        ctx = {"graph": graph, "neurons": self._structure[1], "theta_of_flat": self._structure[2],
               "node_avg": st["node_avg"], "first": first, "seg": self._seg, "counts": self._counts}
        if self._gnn is not None:
            ctx["gnn"] = self._gnn
        return ctx

    @torch.no_grad()
    def step(self, closure=None):
        """One update; with ``closure`` (zero_grad, forward, loss, backward, return loss) the forward and backward
        are recorded and the loss is returned."""
        loss = None
        if closure is not None:
            with torch.enable_grad(), self.record():
                loss = closure()
        params = self._layout()
        ctx = self._graph_context(params) if self.meta.needs_graph else {}
        if not self.meta.needs_graph:
            self._pending = None
        meta, st = self.meta, self.state["lopt"]
        momenta, momentum = self._flat
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        mu = float(meta.mu)
        moms = [self.state[p]["momentum"] for p in params]
        torch._foreach_mul_(moms, mu)  # m <- mu m + (1 - mu) grad, per tensor (no flat copy of the gradient)
        torch._foreach_add_(moms, grads, alpha=1 - mu)
        if type(meta).learned_term is LearnedRule.learned_term:  # F = 0: step along the momentum
            update = moms
        else:
            plan = self._plan
            plan.gather(grads, plan.flat_g)
            plan.gather(params, plan.flat_p)
            if type(meta).learned_term in _FAST:  # chunked; updates the feature EMAs too
                extra = meta.extra_columns(ctx, plan.dtype) if meta.needs_graph else None
                F_ = ds_term(plan, meta.mlp, momenta, st["step"], extra, plan.update)
            else:  # the reference path, through learned_term on [P, 19] features
                momenta.mul_(plan.decays).addcmul_(plan.flat_g[None], plan.one_minus)
                feats = unf_features(plan.flat_p, plan.flat_g, momenta.t(), st["step"], self._seg, self._counts)
                F_ = meta.learned_term(feats, ctx).to(plan.dtype)
            torch.add(momentum, F_, alpha=float(meta.beta), out=plan.update)
            update = [u.view_as(p) for u, p in zip(plan.update.split(self._sizes), params)]
        alpha = float(meta.alpha)
        off = 0
        for group in self.param_groups:  # theta <- theta - lr alpha (m + beta F)
            n = len(group["params"])
            torch._foreach_add_([p.data for p in params[off:off + n]], update[off:off + n],
                                alpha=-alpha * float(group["lr"]))
            off += n
        st["step"] += 1
        return loss
