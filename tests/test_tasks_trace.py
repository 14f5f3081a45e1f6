"""The scaled curvature variant: SirenTrace's targets are tr(F) by torch.func, and the trace task trains,
resumes, reports its baselines with intervals and runs from the command line."""
import json

import pytest
import torch

from gradgraph import oracle
from gradgraph.api import capture
from gradgraph.cli import main
from gradgraph.data import SirenTrace
from gradgraph.data.siren_fisher import make_model
from gradgraph.tasks.trace import TraceConfig, pooled_statistics, train_trace

DATA = dict(num_models=30, num_points=6, num_fisher_points=48, hidden=(8, 8), chunk_size=10, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return SirenTrace(tmp_path_factory.mktemp("data") / "st", **DATA)


def _squared_norms(model, x):
    """Squared per-sample gradient norms by torch.func (vmap over grad): [n]."""
    return sum(g.pow(2).flatten(1).sum(1) for g in oracle.per_sample_grads(model, x).values())


def test_targets_are_the_fisher_trace_by_torch_func(dataset):
    for i in (0, 17):
        model, p, x, x_fisher = make_model(i, 0, DATA["hidden"], 30.0, DATA["num_points"], DATA["num_fisher_points"])
        sq = _squared_norms(model, x)
        torch.testing.assert_close(dataset.y[i].double(), _squared_norms(model, x_fisher).mean().view(1), rtol=1e-6,
                                   atol=0)
        torch.testing.assert_close(dataset.std_est[i].double(), sq.mean().view(1), rtol=1e-6, atol=0)
        torch.testing.assert_close(dataset.sq_norms[i].double(), sq, rtol=1e-6, atol=0)
        assert float(dataset.p[i]) == pytest.approx(p, rel=1e-6)
    assert not torch.equal(dataset.y[0], dataset.y[17])  # models differ
    assert "edge_index" not in dataset[0]._store  # a million edges per model at full size: not stored


def test_pooled_statistics_match_the_captured_graph(dataset):
    model, _, x, _ = make_model(3, 0, DATA["hidden"], 30.0, DATA["num_points"], DATA["num_fisher_points"])
    graph = capture(model, x)
    got = pooled_statistics(dataset, [3])[0]
    a1, g1 = graph.layer_features(1, "a"), graph.layer_features(1, "g")
    # features: the input layer's a, then (a, g) of each hidden layer, then the output's g
    torch.testing.assert_close(got[1], torch.log(a1.pow(2).sum(-1).mean()), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[2], torch.log(g1.pow(2).sum(-1).mean()), rtol=1e-4, atol=1e-6)
    sq = _squared_norms(model, x)
    torch.testing.assert_close(got[-4:], torch.stack([sq.mean().log(), sq.std() / sq.mean(), x.mean(), x.std()]),
                               rtol=1e-4, atol=1e-6)
    shuffled = pooled_statistics(dataset, [4])[0]
    assert not torch.allclose(got, shuffled)  # another model: other statistics


def _cfg(tmp_path, **kw):
    base = dict(train_size=10, epochs=3, batch_size=5, num_models=30, num_points=6, width=8, lr=3e-3,
                out_dir=str(tmp_path))
    base.update(kw)
    return TraceConfig(**base)


def test_training_reports_baselines_with_intervals(tmp_path, dataset):
    m = train_trace(_cfg(tmp_path), dataset, progress=False)
    assert m["history"][-1]["train_logsq"] < m["history"][0]["train_logsq"]
    assert set(m["rows"]) == {"gradmetanet", "standard", "s-calibrated", "pooled-mlp"}
    per = m["test_per_model"]
    assert len(per["gradmetanet"]["logratio"]) == 10 and all(v >= 0 for v in per["gradmetanet"]["logratio"])
    # the standard row is S itself: its log-ratios are recomputed here from the stored S and targets
    test = dataset.split_indices(10)["test"]
    ref = torch.log(dataset.std_est[test].double() / dataset.y[test].double()).abs().reshape(-1)
    torch.testing.assert_close(torch.tensor(per["standard"]["logratio"], dtype=torch.float64), ref)
    for name, imp in m["improvement"].items():
        for v in imp.values():
            assert v["lo"] <= v["improvement"] <= v["hi"], (name, v)
    assert m["noise_logratio"] > 0
    saved = json.loads((tmp_path / "gradmetanet-n10-s0" / "metrics.json").read_text())
    assert saved["test_logratio"] == m["test_logratio"]


def test_interrupted_trace_run_resumes_to_the_same_result(tmp_path, dataset):
    whole = train_trace(_cfg(tmp_path / "a"), dataset, progress=False)
    assert train_trace(_cfg(tmp_path / "b"), dataset, progress=False, stop_after_epochs=1)["interrupted"]
    resumed = train_trace(_cfg(tmp_path / "b"), dataset, progress=False)
    assert resumed["history"] == whole["history"] and resumed["test_logratio"] == whole["test_logratio"]


def test_cli_trains_the_trace_task(tmp_path, dataset, monkeypatch):
    monkeypatch.setenv("GRADGRAPH_DATASETS", str(tmp_path / "datasets"))
    args = ["train", "curvature-trace", "--width", "8", "--num-models", "12", "--num-points", "4", "--train-size",
            "4", "--epochs", "1", "--batch-size", "4", "--out-dir", str(tmp_path / "runs"), "--threads", "1"]
    assert main(args) == 0
    assert (tmp_path / "runs" / "gradmetanet-n4-s0" / "metrics.json").exists()


def test_bench_writes_the_table_and_plot(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADGRAPH_DATASETS", str(tmp_path / "datasets"))
    args = ["bench", "curvature-trace", "--preset", "tiny", "--out-dir", str(tmp_path / "runs"), "--results",
            str(tmp_path / "results"), "--quiet", "--threads", "1"]
    assert main(args) == 0
    table = (tmp_path / "results" / "curvature_trace_tiny_w8.md").read_text()
    for row in ("| standard |", "| s-calibrated |", "| pooled-mlp |", "| gradmetanet | 1 |", "noise of the targets"):
        assert row in table
    assert (tmp_path / "results" / "curvature_trace_tiny_w8.png").stat().st_size > 1000
    assert main([*args, "--report-only"]) == 0  # reads the finished run back


@pytest.mark.parametrize("name", list(__import__("gradgraph.tasks.configs", fromlist=["TRACE_MODELS"]).TRACE_MODELS))
def test_every_trace_model_trains_one_epoch(tmp_path, dataset, name):
    m = train_trace(_cfg(tmp_path, model=name, epochs=1), dataset, progress=False)
    assert all(v > 0 for v in m["test_per_model"][name]["relerr"]) and m["parameters"] > 0


def test_set_statistics_are_invariant_to_sample_order_and_neuron_permutations(dataset):
    import gradgraph
    from gradgraph.tasks.trace import set_statistics

    model, _, x, _ = make_model(5, 0, DATA["hidden"], 30.0, DATA["num_points"], DATA["num_fisher_points"])

    def stats(m, inputs):
        g = capture(m, inputs)
        g.sq_norms = g.per_sample_grad_norms().pow(2)
        return set_statistics(g)

    ref = stats(model, x)
    torch.testing.assert_close(stats(model, x.flip(0)), ref)
    s = gradgraph.random_symmetry(capture(model, x), generator=torch.Generator().manual_seed(0))
    assert not s.is_identity()
    torch.testing.assert_close(stats(gradgraph.apply_symmetry(model, s), x), ref)
    assert not torch.allclose(stats(model, x * 0.5), ref)  # other inputs: other statistics
