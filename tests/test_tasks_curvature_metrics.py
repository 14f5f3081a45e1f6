"""Curvature metrics and calibrated baselines against hand-computed references, with negative checks."""
import pytest
import torch

from gradgraph.tasks.curvature_baselines import (
    StatsMLP,
    apply_affine,
    apply_shrink,
    fit_affine,
    fit_shrink,
)
from gradgraph.tasks.curvature_metrics import CurvatureMetrics, paired_bootstrap

SIZES = [("w", 3), ("b", 2)]  # two tensors: entries 0-2 and 3-4


def _metrics(y_train):
    return CurvatureMetrics(SIZES, y_train, mu=float(y_train.mean()), sigma=float(y_train.std()))


def test_nmse_weighs_every_tensor_equally():
    y_train = torch.tensor([[1e6, 2e6, 1e6, 1.0, 2.0], [3e6, 1e6, 1e6, 2.0, 1.0]])
    m = _metrics(y_train)
    y = torch.tensor([[2e6, 1e6, 1e6, 1.0, 1.0]])
    pred = y.clone()
    pred[0, 0] *= 1.1  # 10% off on one big entry ...
    pred[0, 3] *= 1.1  # ... and on one small entry
    ms_w = (y_train[:, :3] ** 2).mean()
    ms_b = (y_train[:, 3:] ** 2).mean()
    want_w = ((pred[0, :3] - y[0, :3]) ** 2).mean() / ms_w
    want_b = ((pred[0, 3:] - y[0, 3:]) ** 2).mean() / ms_b
    got = m.per_model(pred, y)
    torch.testing.assert_close(got["nmse"][0], torch.stack([want_w, want_b]).double())
    # the same relative error weighs about the same in nmse, while in squared error the small tensor vanishes
    assert got["nmse"][0, 1] > 0.2 * got["nmse"][0, 0]
    assert ((pred - y) ** 2)[0, 3:].sum() < 1e-10 * ((pred - y) ** 2).sum()
    assert float(got["mse"][0]) == pytest.approx(float(((pred - y) ** 2).mean() / m.sigma ** 2))


def test_log_ratio_and_non_positive_share():
    m = _metrics(torch.ones(2, 5))
    y = torch.ones(1, 5)
    pred = torch.tensor([[torch.e, 1.0, 1.0, -1.0, 1.0]])
    got = m.per_model(pred, y)
    assert got["nonpos"][0].tolist() == [0.0, 0.5]
    assert float(got["logratio"][0, 0]) == pytest.approx(1 / 3)
    assert float(got["logratio"][0, 1]) > 10  # a negative prediction counts as a huge log-ratio, not as 0


def test_losses_are_the_metrics():
    y_train = torch.rand(4, 5) + 0.5
    m = _metrics(y_train)
    y, pred = torch.rand(3, 5) + 0.5, torch.rand(3, 5) + 0.5
    assert float(m.loss(pred, y, "normalized")) == pytest.approx(float(m.per_model(pred, y)["nmse"].mean(1).sum()))
    assert float(m.loss(pred, y, "z")) == pytest.approx(float(m.per_model(pred, y)["mse"].sum()))
    with pytest.raises(ValueError, match="unknown curvature loss"):
        m.loss(pred, y, "l1")


def test_paired_bootstrap_interval():
    g = torch.Generator().manual_seed(0)
    b = torch.rand(200, generator=g) + 1
    a = b * 0.8 + 0.01 * torch.randn(200, generator=g)
    r = paired_bootstrap(a, b)
    assert r["lo"] < r["improvement"] < r["hi"] and r["lo"] > 0.18 and r["hi"] < 0.22
    same = paired_bootstrap(b, b)
    assert same["improvement"] == same["lo"] == same["hi"] == 0.0  # no difference: a zero-width interval at 0
    noisy = paired_bootstrap(b + 0.3 * torch.randn(200, generator=g), b)
    assert noisy["lo"] < 0 < noisy["hi"]  # noise alone: the interval covers 0
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap(a, b[:10])


def test_calibrated_fits_recover_known_relations():
    g = torch.Generator().manual_seed(1)
    S = torch.rand(50, 5, generator=g).double() + 0.1
    m = _metrics(S)
    y = S.clone()
    y[:, :3] = 2 * S[:, :3] + 3
    y[:, 3:] = 0.5 * S[:, 3:] - 0.01
    coef = fit_affine(m, S, y)
    torch.testing.assert_close(coef, torch.tensor([[2.0, 3.0], [0.5, -0.01]], dtype=torch.float64))
    torch.testing.assert_close(apply_affine(m, coef, S), y)
    assert torch.allclose(fit_shrink(m, S, S), torch.ones(2, dtype=torch.float64))  # S exact: no shrinkage
    mean = m._per_tensor_mean(S)[:, m.tensor_of]
    torch.testing.assert_close(apply_shrink(m, torch.zeros(2, dtype=torch.float64), S), mean)  # full shrinkage


def test_stats_mlp_starts_at_the_standard_estimator_and_is_positive():
    m = _metrics(torch.rand(4, 5) + 0.5)
    S, var = torch.rand(3, 5) + 0.1, torch.rand(3, 5)
    mlp = StatsMLP(2)
    torch.testing.assert_close(mlp(StatsMLP.features(m, S, var), S), S)
    with torch.no_grad():
        mlp.net[-1].bias.fill_(-50.0)  # a wild output is clamped, never <= 0 or inf
    out = mlp(StatsMLP.features(m, S, var), S)
    assert bool((out > 0).all()) and bool(torch.isfinite(out).all())
