"""Curvature training: it learns, it resumes exactly, and the commands run."""
import json

import pytest
import torch

from gradgraph.cli import main
from gradgraph.data import SirenFisher
from gradgraph.tasks.curvature import MODELS, CurvatureConfig, build_model, train_curvature

DATA = dict(num_models=45, num_points=8, num_fisher_points=64, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return SirenFisher(tmp_path_factory.mktemp("data") / "sf", **DATA)


def _cfg(tmp_path, **kw):
    base = dict(model="gradmetanet", train_size=15, epochs=12, batch_size=5, num_models=45, num_points=8,
                out_dir=str(tmp_path), lr=3e-3)
    base.update(kw)
    return CurvatureConfig(**base)


def test_training_improves_on_the_standard_estimator(tmp_path, dataset):
    metrics = train_curvature(_cfg(tmp_path), dataset, progress=False)
    assert metrics["test_nmse"] < metrics["standard_test_nmse"], (metrics["test_nmse"], metrics["standard_test_nmse"])
    assert metrics["history"][-1]["train_nmse"] < metrics["history"][0]["train_nmse"]
    assert metrics["test_nonpos"] == 0.0  # S * exp(h) is positive by construction
    assert len(metrics["test_per_model"]["nmse"]) == 15 and len(metrics["test_per_model"]["nmse"][0]) == 6
    saved = json.loads((tmp_path / "gradmetanet-n15-s0" / "metrics.json").read_text())
    assert saved["test_nmse"] == metrics["test_nmse"] and (tmp_path / "gradmetanet-n15-s0" / "best.pt").exists()


def test_the_papers_setting_beats_predicting_the_mean(tmp_path, dataset):
    metrics = train_curvature(_cfg(tmp_path, output="z", loss="z", select="mse"), dataset, progress=False)
    sp = dataset.split_indices(15)
    mu, sigma = metrics["target_mean"], metrics["target_std"]
    mean_predictor = float(((dataset.y[sp["test"]] - mu) / sigma).pow(2).mean())
    assert metrics["test_mse"] < 0.5 * mean_predictor, (metrics["test_mse"], mean_predictor)
    assert metrics["history"][-1]["train_mse"] < metrics["history"][0]["train_mse"]


def test_interrupted_run_resumes_to_the_same_result(tmp_path, dataset):
    whole = train_curvature(_cfg(tmp_path / "a", epochs=4), dataset, progress=False)
    part = train_curvature(_cfg(tmp_path / "b", epochs=4), dataset, progress=False, stop_after_epochs=2)
    assert part == {"interrupted": True, "epoch": 2}
    assert (tmp_path / "b" / "gradmetanet-n15-s0" / "checkpoint.pt").exists()
    resumed = train_curvature(_cfg(tmp_path / "b", epochs=4), dataset, progress=False)
    assert resumed["history"] == whole["history"] and resumed["test_mse"] == whole["test_mse"]


@pytest.mark.parametrize("name", MODELS)
def test_every_model_trains_one_epoch(tmp_path, dataset, name):
    m = train_curvature(_cfg(tmp_path, model=name, epochs=1), dataset, progress=False)
    assert torch.isfinite(torch.tensor(m["test_nmse"])) and m["parameters"] > 0 and m["test_nonpos"] == 0.0


def test_models_are_about_15k_parameters():
    from gradgraph.api import capture
    from gradgraph.data.siren_fisher import make_model

    model, _, x, _ = make_model(0, 0, num_points=128, num_fisher_points=1)
    graph = capture(model.float(), x.float())
    for name in ("gradmetanet", "gradmetanet++", "neuron-asym", "batch-asym", "gmn-average", "gmn-concat"):
        net = build_model(name, 128, graph)
        net(graph)
        n = sum(p.numel() for p in net.parameters())
        assert 10_000 <= n <= 25_000, (name, n)


def test_cli_train_and_bench(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GRADGRAPH_DATASETS", str(tmp_path / "datasets"))
    assert main(["train", "curvature", "--train-size", "5", "--epochs", "1", "--num-models", "45",
                 "--num-points", "8", "--out-dir", str(tmp_path / "runs"), "--quiet"]) == 0
    assert '"test_mse"' in capsys.readouterr().out
    bench = ["bench", "curvature", "--preset", "tiny", "--out-dir", str(tmp_path / "grid"), "--results",
             str(tmp_path / "results"), "--quiet"]
    assert main(bench + ["--shard", "1/2"]) == 0  # the second of the preset's two runs
    first = (tmp_path / "results" / "curvature_tiny.md").read_text()
    assert "| gmn-average |" in first and "| gradmetanet | - |" in first and "cpu 1." in first
    assert "s-shrink (calibrated S)" in first and "noise floor" in first
    assert main(bench + ["--shard", "0/2"]) == 0
    table = (tmp_path / "results" / "curvature_tiny.md").read_text()
    assert "standard estimator" in table and "n=5" in table and "cpu 2." in table
    assert "| gradmetanet | - |" not in table
    assert (tmp_path / "results" / "curvature_tiny.png").stat().st_size > 5000


def test_torchrun_two_ranks_match_one_process(tmp_path):
    """Multi-process training with torch.distributed (gloo, loopback) gives the single-process results."""
    import os
    import shutil
    import subprocess
    import sys

    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun ships with torch"
    env = {**os.environ, "GRADGRAPH_DATASETS": str(tmp_path / "datasets"), "OMP_NUM_THREADS": "1"}
    args = ["-m", "gradgraph.cli", "train", "curvature", "--train-size", "12", "--epochs", "3", "--batch-size", "5",
            "--num-models", "45", "--num-points", "8", "--quiet"]
    subprocess.run([sys.executable, *args, "--out-dir", str(tmp_path / "one")], env=env, check=True,
                   capture_output=True)
    # the two ranks also generate their own copy of the dataset together (the chunk store splits the chunks)
    env2 = {**env, "GRADGRAPH_DATASETS": str(tmp_path / "datasets2")}
    subprocess.run([torchrun, "--nproc_per_node=2", "--master_addr=127.0.0.1", "--master_port=29571", *args,
                    "--out-dir", str(tmp_path / "two")], env=env2, check=True, capture_output=True)
    one = json.loads((tmp_path / "one" / "gradmetanet-n12-s0" / "metrics.json").read_text())
    two = json.loads((tmp_path / "two" / "gradmetanet-n12-s0" / "metrics.json").read_text())
    for a, b in zip(one["history"], two["history"]):
        assert a["val_nmse"] == pytest.approx(b["val_nmse"], rel=1e-4)
        assert a["train_nmse"] == pytest.approx(b["train_nmse"], rel=1e-4)
    assert one["test_nmse"] == pytest.approx(two["test_nmse"], rel=1e-4)
    torch.testing.assert_close(torch.tensor(two["test_per_model"]["nmse"]), torch.tensor(one["test_per_model"]["nmse"]),
                               rtol=1e-4, atol=1e-8)  # per test model: the sharded evaluation fills every row


def test_a_trained_estimator_applies_to_other_models(tmp_path, dataset):
    from torch import nn

    from gradgraph.data.siren_fisher import make_model
    from gradgraph.tasks.curvature import load

    cfg = _cfg(tmp_path, epochs=2)
    train_curvature(cfg, dataset, progress=False)
    est = load(cfg.run_dir)
    model, _, x, _ = make_model(3, 0, num_points=8, num_fisher_points=8)
    model, x = model.float(), x.float()
    fisher = est.predict(model, x)
    assert set(fisher) == {n for n, _ in model.named_parameters()}
    assert all(fisher[n].shape == p.shape and bool((fisher[n] > 0).all()) for n, p in model.named_parameters())
    # the same graph through the task's own batch path gives the same estimate
    item = dataset[3]
    task = __import__("gradgraph.tasks.curvature", fromlist=["CurvatureTask"]).CurvatureTask(cfg, dataset, False)
    task.setup()
    ref = task.predict(est.net, task.batch([3]))[0]
    got = item.graph_to_params(ref)
    # (float32 capture here, float64 capture then float32 storage in the dataset: ~2e-4 apart at w0 = 30)
    assert all(torch.allclose(got[n], fisher[n], rtol=1e-3) for n in fisher)
    assert main(["fisher", "--run", str(cfg.run_dir), "--model", "siren", "--out", str(tmp_path / "f.pt")]) == 0
    mlp = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))  # another architecture: still positive
    other = est.predict(mlp, torch.randn(6, 3))
    assert other["0.weight"].shape == (5, 3) and all(bool((v > 0).all()) for v in other.values())


def _shrunk_by_hand(S, y_train, S_train, sizes):
    """Independent s-shrink: per tensor, lambda = least squares of (y - m) on (S - m) over the training models
    (m the model's mean of S over the tensor), clipped to [0, 1]; then lambda S + (1 - lambda) m for S."""
    out, lams, start = [], [], 0
    for n in sizes:
        sl = slice(start, start + n)
        start += n
        m_train = S_train[:, sl].mean(1, keepdim=True)
        d, r = S_train[:, sl] - m_train, y_train[:, sl] - m_train
        den = float((d * d).sum())  # 0 for a one-entry tensor (the output bias), where lambda does not matter
        lam = min(max(float((d * r).sum()) / den, 0.0), 1.0) if den > 0 else 0.0
        m = S[:, sl].mean(1, keepdim=True)
        out.append(lam * (S[:, sl] - m) + m)
        lams.append(lam)
    return torch.cat(out, 1), lams


def test_shrink_output_corrects_the_calibrated_baseline(tmp_path, dataset):
    from torch import nn

    from gradgraph.data.siren_fisher import make_model
    from gradgraph.errors import StructureMismatchError
    from gradgraph.tasks.curvature import CurvatureTask, load

    cfg = _cfg(tmp_path, output="shrink", epochs=2)
    metrics = train_curvature(cfg, dataset, progress=False)
    assert metrics["test_nonpos"] == 0.0
    task = CurvatureTask(cfg, dataset, False)
    task.setup()
    train, test = task.split["train"], task.split["test"][:4]
    sizes = metrics["tensor_sizes"]
    S_train, y_train = dataset.std_est[train].double(), dataset.y[train].double()
    ref, lams = _shrunk_by_hand(dataset.std_est[test].double(), y_train, S_train, sizes)
    torch.testing.assert_close(torch.tensor(metrics["shrink"], dtype=torch.float64), torch.tensor(lams,
                               dtype=torch.float64), rtol=1e-5, atol=1e-6)
    # with the correction h switched off (scale = shift = 0) the estimate is s-shrink itself
    est = load(cfg.run_dir)
    est.net.scale.data.zero_()
    est.net.shift.data.zero_()
    got = task.predict(est.net, task.batch(test)).double()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-9)
    # negative: the positive output's h = 0 is raw S, which the shrinkage changes
    task_s = CurvatureTask(_cfg(tmp_path, epochs=2), dataset, False)
    task_s.setup()
    assert not torch.allclose(task_s.predict(est.net, task_s.batch(test)).double(), ref, rtol=1e-3)
    # a loaded shrink run predicts on the SIREN architecture and refuses another one by name
    model, _, x, _ = make_model(3, 0, num_points=8, num_fisher_points=8)
    fisher = est.predict(model.float(), x.float())
    assert all(bool((v > 0).all()) for v in fisher.values())
    with pytest.raises(StructureMismatchError, match="output='shrink'.*--output positive"):
        est.predict(nn.Sequential(nn.Linear(1, 5), nn.Tanh(), nn.Linear(5, 1)), torch.randn(6, 1))
    wider, _, x, _ = make_model(3, 0, hidden=(40, 32), num_points=8, num_fisher_points=8)  # same names, other sizes
    with pytest.raises(StructureMismatchError, match="linears.0.weight': 40"):
        est.predict(wider.float(), x.float())
