"""PES meta-training: convergence to a known gradient on a toy problem, antithetic pairing, reset masking,
checkpoint resume, and the learned-optimizer inner problem."""
import copy

import pytest
import torch

from gradgraph.optim import VARIANTS
from gradgraph.optim.meta import PES, LOptProblem, PESConfig
from gradgraph.optim.tasks import DigitsMLP

C = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)


class Toy:
    """Batched inner runs: s_0 = 0, L_t = |s_t - c|^2 / 3 (before the update), s_{t+1} = 0.5 s_t + 0.5 theta^2
    + z_t with z_t ~ N(0, noise^2) drawn from the run's own generator (so both particles of a pair see it)."""

    def __init__(self, horizon=5, noise=0.3, reset_loss=None):
        self.horizon, self.max_loss, self.noise, self.reset_loss = horizon, 1e9, noise, reset_loss
        self.log = []

    def init(self, runs, starts):
        self.s = torch.zeros(2 * runs.numel(), 3, dtype=torch.float64)
        self.gens = [torch.Generator().manual_seed(int(r)) for r in torch.cat([runs, runs])]

    def reset(self, particles, runs):
        N = runs.numel()
        for p in torch.nonzero(particles).flatten().tolist():
            self.s[p] = 0
            self.gens[p] = torch.Generator().manual_seed(int(runs[p % N]))

    def step(self, thetas, t):
        self.log.append((thetas.clone(), t.clone()))
        loss = (self.s - C).pow(2).mean(1)
        if self.reset_loss is not None:  # a garbage loss at every fresh run's first step
            fresh = torch.cat([t, t]) == 0
            loss = torch.where(fresh, self.reset_loss * torch.rand(loss.shape, dtype=loss.dtype), loss)
        z = torch.stack([torch.randn(3, generator=g, dtype=torch.float64) for g in self.gens]) * self.noise
        self.s = 0.5 * self.s + 0.5 * thetas.pow(2) + z
        return loss

    def state_dict(self):
        return {"s": self.s.clone(), "gens": [g.get_state() for g in self.gens]}

    def load_state_dict(self, sd):
        self.s = sd["s"].clone()
        for g, st in zip(self.gens, sd["gens"]):
            g.set_state(st)


def true_gradient(theta, T):
    """d/dtheta of the mean of L_1..L_{T-1} of a noise-free run (the steps PES does not mask)."""
    theta = theta.clone().requires_grad_()
    s, losses = torch.zeros(3, dtype=torch.float64), []
    for t in range(T):
        if t > 0:
            losses.append((s - C).pow(2).mean())
        s = 0.5 * s + 0.5 * theta.pow(2)
    (g,) = torch.autograd.grad(torch.stack(losses).mean(), theta)
    return g


def test_pes_converges_to_the_true_gradient_through_truncations_and_resets():
    theta = torch.tensor([0.8, 1.1, -0.6], dtype=torch.float64)
    T = 5  # K = 3 does not divide T: runs end inside truncations
    pes = PES(Toy(T), theta, PESConfig(pairs=64, truncation=3, sigma=0.05, seed=0))
    ests = [pes.estimate()[0] for _ in range(200)]
    est, want = torch.stack(ests).mean(0), true_gradient(theta, T)
    assert float((est - want).norm() / want.norm()) < 0.1, (est, want)
    # without the persistent accumulator (plain truncated ES) the estimate is biased: the check can fail
    pes = PES(Toy(T), theta, PESConfig(pairs=64, truncation=3, sigma=0.05, seed=0))
    biased = []
    for _ in range(200):
        pes.accum.zero_()
        biased.append(pes.estimate()[0])
    assert float((torch.stack(biased).mean(0) - want).norm() / want.norm()) > 0.3


def test_antithetic_pairs_share_data_and_cancel_theta_independent_noise():
    class Noise(Toy):  # a loss that ignores theta and is pure per-run noise
        def step(self, thetas, t):
            super().step(thetas, t)
            return torch.stack([torch.randn((), generator=g, dtype=torch.float64) for g in self.gens])

    toy = Noise(horizon=4, noise=1.0)
    pes = PES(toy, torch.zeros(3, dtype=torch.float64), PESConfig(pairs=8, truncation=6, seed=1))
    grad, _ = pes.estimate()
    assert torch.equal(grad, torch.zeros(3, dtype=torch.float64))  # pairs saw the same noise: it cancels
    thetas, _ = toy.log[0]
    torch.testing.assert_close(thetas[:8] + thetas[8:], torch.zeros(8, 3, dtype=torch.float64))
    assert float((thetas[:8] - thetas[8:]).abs().min()) > 0


def test_reset_step_is_masked_and_the_accumulator_restarts():
    theta = torch.tensor([0.8, 1.1, -0.6], dtype=torch.float64)
    clean = PES(Toy(5), theta, PESConfig(pairs=16, truncation=3, seed=2))
    noisy = PES(Toy(5, reset_loss=1e6), theta, PESConfig(pairs=16, truncation=3, seed=2))
    for _ in range(4):
        g1, l1 = clean.estimate()
        g2, l2 = noisy.estimate()
        torch.testing.assert_close(g1, g2)  # the garbage first-step losses never enter
        assert l1 == pytest.approx(l2)
    # a pair whose run restarted in the last truncation carries only that truncation's eps
    pes = PES(Toy(5), theta, PESConfig(pairs=4, truncation=3, seed=3))
    pes.t[:] = torch.tensor([4, 1, 2, 3])  # pair 0 resets at the first step, pair 1 does not reset
    gen = copy.deepcopy(pes.gen)
    before = pes.accum.clone()
    pes.estimate()
    eps = torch.randn(4, 3, generator=gen, dtype=torch.float64) * 0.01
    torch.testing.assert_close(pes.accum[0], eps[0])
    torch.testing.assert_close(pes.accum[1], before[1] + eps[1])


def test_meta_step_clips_and_resume_is_exact():
    theta = torch.tensor([0.8, 1.1, -0.6], dtype=torch.float64)
    cfg = PESConfig(pairs=8, truncation=3, sigma=0.05, lr=0.05, seed=4)
    a = PES(Toy(5), theta, cfg)
    for _ in range(3):
        a.step()
    saved = copy.deepcopy(a.state_dict())
    for _ in range(3):
        a.step()
    b = PES(Toy(5), torch.zeros(3, dtype=torch.float64), cfg)
    b.load_state_dict(saved)
    for _ in range(3):
        b.step()
    assert torch.equal(a.theta, b.theta) and a.history == b.history
    with pytest.raises(ValueError, match="same settings"):
        PES(Toy(5), theta, PESConfig(pairs=4)).load_state_dict(saved)


def test_pes_decreases_the_toy_meta_loss():
    pes = PES(Toy(5, noise=0.0), torch.tensor([0.3, 0.3, 0.3], dtype=torch.float64),
              PESConfig(pairs=16, truncation=3, sigma=0.05, lr=0.05, seed=5))
    losses = [pes.step() for _ in range(60)]
    assert sum(losses[-10:]) < 0.85 * sum(losses[:10])  # theta^2 >= 0: the optimum is ~1.36


@pytest.mark.parametrize("variant", ["ds", "ds+gradmetanet"])
def test_lopt_problem_runs_and_resumes(variant):
    task = DigitsMLP(batch_size=32)
    rule = VARIANTS.build(variant)
    cfg = PESConfig(pairs=2, truncation=3, seed=0)
    pes = PES(LOptProblem(task, rule, horizon=4), LOptProblem(task, rule).theta0(), cfg)
    loss = pes.step()
    assert 0 < loss < task.max_loss
    saved = copy.deepcopy(pes.state_dict())
    pes.step()
    other = PES(LOptProblem(task, rule, horizon=4), LOptProblem(task, rule).theta0(), cfg)
    other.load_state_dict(saved)
    other.step()
    assert torch.equal(pes.theta, other.theta) and pes.history == other.history


def test_meta_train_cli_writes_and_resumes(tmp_path, capsys):
    from gradgraph.cli import main
    from gradgraph.io import load_file

    argv = ["meta-train", "--pairs", "1", "--truncation", "2", "--horizon", "3", "--out", str(tmp_path), "--quiet"]
    assert main(argv + ["--steps", "1"]) == 0
    assert main(argv + ["--steps", "2"]) == 0
    assert "resumed" in capsys.readouterr().out
    assert load_file(tmp_path / "checkpoint.pt", "pes-checkpoint")["pes"]["meta_step"] == 2
    assert load_file(tmp_path / "rule.pt", "lopt-rule")["variant"] == "ds"
    assert (tmp_path / "curve.png").stat().st_size > 0


def test_scalar_lr_is_adam_at_that_rate_on_the_masked_coordinates():
    class Masked(Toy):
        def scalar_mask(self):
            return torch.tensor([True, False, False])

    theta = torch.tensor([0.8, 1.1, -0.6], dtype=torch.float64)
    fast = PES(Masked(5), theta, PESConfig(pairs=8, truncation=3, sigma=0.05, lr=0.01, scalar_lr=0.1, seed=6))
    slow = PES(Masked(5), theta, PESConfig(pairs=8, truncation=3, sigma=0.05, lr=0.01, seed=6))
    ref = PES(Masked(5), theta, PESConfig(pairs=8, truncation=3, sigma=0.05, lr=0.1, seed=6))
    for pes in (fast, slow, ref):  # the first estimate is the same for all three (same theta and seed)
        pes.step()
    torch.testing.assert_close(fast.theta[0], ref.theta[0])  # coordinate 0 moves at scalar_lr
    torch.testing.assert_close(fast.theta[1:], slow.theta[1:])  # the others at lr
    assert float((fast.theta[0] - slow.theta[0]).detach().abs()) > 0


def test_lopt_problem_marks_the_scalar_step_sizes():
    rule = VARIANTS.build("ds")
    mask = LOptProblem(DigitsMLP(), rule).scalar_mask()
    assert mask.shape == LOptProblem(DigitsMLP(), rule).theta0().shape
    assert int(mask.sum()) == 3 and bool(mask[:3].all())  # log alpha, logit mu, log beta come first


def _pes_worker(rank, port, out):
    import datetime

    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    try:
        theta = torch.tensor([0.8, 1.1, -0.6], dtype=torch.float64)
        pes = PES(Toy(5), theta, PESConfig(pairs=5, truncation=3, sigma=0.05, lr=0.05, seed=7))
        grads = [pes.estimate()[0] for _ in range(2)]
        for _ in range(3):
            pes.step()
        state = pes.state_dict()  # gathers both ranks' inner runs
        if rank == 0:
            torch.save({"grads": grads, "theta": pes.theta.detach(), "history": pes.history,
                        "own": pes.own, "shards": len(state["problem"])}, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_give_the_meta_gradient_of_one_process(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "rank0.pt"
    mp.spawn(_pes_worker, args=(port, str(out)), nprocs=2, join=True)
    got = torch.load(out)
    theta = torch.tensor([0.8, 1.1, -0.6], dtype=torch.float64)
    pes = PES(Toy(5), theta, PESConfig(pairs=5, truncation=3, sigma=0.05, lr=0.05, seed=7))
    grads = [pes.estimate()[0] for _ in range(2)]
    for _ in range(3):
        pes.step()
    assert got["own"].tolist() == [0, 2, 4] and got["shards"] == 2  # rank 0 ran pairs 0, 2, 4 only
    for a, b in zip(got["grads"], grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        assert float(b.norm()) > 0
    torch.testing.assert_close(got["theta"], pes.theta.detach(), rtol=1e-12, atol=1e-12)
    assert got["history"] == pytest.approx(pes.history, rel=1e-12)


@pytest.mark.parametrize("variant, meta_loss", [("sgdm", "train"), ("ds", "train"), ("ds", "val")])
def test_batched_particles_match_one_optimizer_per_particle(variant, meta_loss):
    from gradgraph.optim.particles import BatchedLOptProblem

    task = DigitsMLP(batch_size=32)
    torch.manual_seed(0)
    rule = VARIANTS.build(variant)
    if variant == "ds":  # a rule whose F is not zero, so the MLP path is compared too
        with torch.no_grad():
            for p in rule.mlp.parameters():
                p.normal_(0, 0.5)
    cfg = PESConfig(pairs=3, truncation=4, sigma=0.05, seed=1)
    loop = PES(LOptProblem(task, rule, horizon=5, meta_loss=meta_loss), LOptProblem(task, rule).theta0(), cfg)
    batched = PES(BatchedLOptProblem(task, rule, horizon=5, meta_loss=meta_loss), LOptProblem(task, rule).theta0(),
                  cfg)
    for _ in range(3):  # 12 inner steps over a horizon of 5: every pair resets inside a truncation
        ga, la = loop.estimate()
        gb, lb = batched.estimate()
        torch.testing.assert_close(gb, ga, rtol=1e-3, atol=1e-4)
        assert lb == pytest.approx(la, rel=1e-5)
    assert float(ga.norm()) > 0
    saved = copy.deepcopy(batched.state_dict())
    ref = batched.estimate()[0]
    other = PES(BatchedLOptProblem(task, rule, horizon=5, meta_loss=meta_loss), LOptProblem(task, rule).theta0(),
                cfg)
    other.load_state_dict(saved)
    assert torch.equal(other.estimate()[0], ref)


def test_the_validation_meta_loss_is_the_validation_loss_after_each_update():
    task = DigitsMLP(batch_size=32)
    rule = VARIANTS.build("sgdm")
    train_pb, val_pb = (LOptProblem(task, rule, horizon=9, meta_loss=m) for m in ("train", "val"))
    for pb in (train_pb, val_pb):
        pb.init(torch.tensor([0]), torch.tensor([0]))
    thetas = LOptProblem(task, rule).theta0()[None].repeat(2, 1).double()
    train_losses, val_losses = train_pb.step(thetas, torch.tensor([0])), val_pb.step(thetas, torch.tensor([0]))
    model = val_pb.particles[0]["model"]
    assert float(val_losses[0]) == pytest.approx(task.evaluate(model, "val"))
    assert float(val_losses[0]) != pytest.approx(float(train_losses[0]))
    with pytest.raises(ValueError, match="meta_loss must be one of"):
        LOptProblem(task, rule, meta_loss="test")


def test_a_compiled_metanetwork_gives_the_eager_pes_estimate():
    """All particles share one working rule, so compile=... traces GradMetaNet once for all of them."""
    import torch._dynamo

    task = DigitsMLP(batch_size=32)
    torch.manual_seed(0)
    rule = VARIANTS.build("ds+gradmetanet", set_size=8)
    with torch.no_grad():
        for p in rule.mlp.parameters():
            p.normal_(0, 0.5)
    cfg = PESConfig(pairs=2, truncation=3, sigma=0.05, seed=1)
    eager = PES(LOptProblem(task, rule, horizon=5), LOptProblem(task, rule).theta0(), cfg)
    compiled_problem = LOptProblem(task, rule, horizon=5, compile="aot_eager")
    compiled = PES(compiled_problem, LOptProblem(task, rule).theta0(), cfg)
    for _ in range(2):
        ga, la = eager.estimate()
        gb, lb = compiled.estimate()
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)
        assert lb == pytest.approx(la, rel=1e-5)
    opts = [p["opt"] for p in compiled_problem.particles]
    assert len({id(o._gnn) for o in opts}) == 1 and opts[0]._gnn.module is compiled_problem.working.gnn
    torch._dynamo.reset()
