"""The training loop on a toy task: it learns, resumes exactly, stops early or after a step budget, keeps the
best-validation weights, and writes versioned files that load with weights_only=True."""
import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from torch import nn

from gradgraph.errors import ConfigError, FileFormatError, RunDirConflictError
from gradgraph.io import load_file
from gradgraph.train import RunDir, Task, TrainConfig, epoch_order, option, train


@dataclass
class ToyConfig(TrainConfig):
    """Linear regression on 40 seeded points."""

    noise: float = option(0.1, "label noise")
    out_dir: str = option("runs/toy", "parent folder", identity=False)
    task: ClassVar[str] = "test_train_loop:ToyTask"


class ToyTask(Task):
    loss_name = "mse"
    monitor = "mse"

    def setup(self):
        g = torch.Generator().manual_seed(123)
        self.x = torch.randn(40, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + self.cfg.noise * torch.randn(40, generator=g)
        self.split = {"train": list(range(24)), "val": list(range(24, 32)), "test": list(range(32, 40))}

    def train_items(self):
        return self.split["train"]

    def batch(self, items):
        return self.x[items], self.y[items]

    def build_model(self):
        return nn.Linear(3, 1)

    def loss(self, model, batch):
        x, y = batch
        sq = (model(x).squeeze(-1) - y).pow(2)
        return sq.sum(), sq.numel()

    def evaluate(self, model, split):
        with torch.no_grad():
            x, y = self.batch(self.split[split])
            return {"mse": float((model(x).squeeze(-1) - y).pow(2).mean())}


def _cfg(tmp_path, **kw):
    return ToyConfig(**{"epochs": 30, "batch_size": 8, "lr": 0.05, "out_dir": str(tmp_path), **kw})


def test_it_learns_and_keeps_the_best_validation_weights(tmp_path):
    m = train(ToyTask(_cfg(tmp_path)), progress=False)
    vals = [h["val_mse"] for h in m["history"]]
    assert m["test_mse"] < 0.1 * m["history"][0]["train_mse"]
    assert m["val_mse"] == min(vals) and m["best_epoch"] == vals.index(min(vals)) + 1
    best = RunDir(tmp_path / "seed0", _cfg(tmp_path).identity()).load_best()
    model = nn.Linear(3, 1)
    model.load_state_dict(best["model"])
    task = ToyTask(_cfg(tmp_path))
    task.setup()
    assert task.evaluate(model, "val")["mse"] == pytest.approx(m["val_mse"], rel=1e-6)
    assert m["steps_run"] == 30 * 3 and not (tmp_path / "seed0" / "checkpoint.pt").exists()
    assert train(ToyTask(_cfg(tmp_path)), progress=False) == m  # finished: read back, not retrained


def test_an_interrupted_run_resumes_to_the_same_numbers(tmp_path):
    whole = train(ToyTask(_cfg(tmp_path / "a", epochs=6)), progress=False)
    part = train(ToyTask(_cfg(tmp_path / "b", epochs=6)), progress=False, stop_after_epochs=4)
    assert part == {"interrupted": True, "epoch": 4}
    ckpt = load_file(tmp_path / "b" / "seed0" / "checkpoint.pt", "checkpoint")  # weights_only=True inside
    assert ckpt["state"]["epoch"] == 4 and ckpt["identity"]["noise"] == 0.1
    resumed = train(ToyTask(_cfg(tmp_path / "b", epochs=6, device="cpu")), progress=False)
    assert resumed["history"] == whole["history"] and resumed["test_mse"] == whole["test_mse"]


def test_a_run_folder_belongs_to_one_set_of_settings(tmp_path):
    train(ToyTask(_cfg(tmp_path, epochs=6)), progress=False, stop_after_epochs=2)  # unfinished
    with pytest.raises(RunDirConflictError, match=r"seed0 holds a run with other settings \(noise: 0.1 there, 0.5 now"):
        train(ToyTask(_cfg(tmp_path, epochs=6, noise=0.5)), progress=False)
    assert (tmp_path / "seed0" / "checkpoint.pt").exists()  # nothing was discarded
    done = train(ToyTask(_cfg(tmp_path, epochs=6)), progress=False)  # the same settings: resumed and finished
    with pytest.raises(RunDirConflictError, match="epochs: 6 there, 3 now"):
        train(ToyTask(_cfg(tmp_path, epochs=3)), progress=False)
    assert json.loads((tmp_path / "seed0" / "metrics.json").read_text())["test_mse"] == done["test_mse"]
    other = train(ToyTask(_cfg(tmp_path, epochs=6, noise=0.5, overwrite=True)), progress=False)
    assert len(other["history"]) == 6 and other["history"][0]["epoch"] == 1  # replaced, on request


@pytest.mark.parametrize("bad,match", [(dict(epochs=0), "epochs = 0 is out of range: it must be >= 1"),
                                       (dict(batch_size=-1), "batch_size = -1 is out of range"),
                                       (dict(lr=0.0), "lr = 0.0 is out of range: it must be > 0"),
                                       (dict(seed="1"), "seed must be int, got str"),
                                       (dict(patience=0), "patience = 0 is out of range")])
def test_bad_settings_are_refused_when_the_config_is_built(tmp_path, bad, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(tmp_path, **bad)


def test_early_stopping_and_step_budget(tmp_path):
    m = train(ToyTask(_cfg(tmp_path / "p", epochs=200, lr=0.5, patience=3)), progress=False)
    assert m["epochs_run"] == m["best_epoch"] + 3 < 200
    s = train(ToyTask(_cfg(tmp_path / "s", max_steps=7)), progress=False)
    assert s["steps_run"] == 7 and s["epochs_run"] == 3  # 3 steps per epoch: stops inside the third


def test_epoch_order_depends_only_on_seed_and_epoch():
    assert epoch_order(10, 1, 2) == epoch_order(10, 1, 2) != epoch_order(10, 1, 3)
    assert sorted(epoch_order(10, 0, 0)) == list(range(10))


def test_an_old_pickled_checkpoint_gets_a_clear_error(tmp_path):
    run = tmp_path / "seed0"
    run.mkdir()
    torch.save({"identity": _cfg(tmp_path).identity(), "state": object()}, run / "checkpoint.pt")  # not plain
    with pytest.raises(FileFormatError, match="checkpoint.pt.*delete it to start the run again"):
        train(ToyTask(_cfg(tmp_path)), progress=False)


def test_a_changed_model_table_entry_does_not_reuse_old_runs(tmp_path, monkeypatch):
    import json

    from gradgraph.errors import RunDirConflictError
    from gradgraph.tasks import configs
    from gradgraph.train.checkpoint import RunDir

    cfg = configs.EditingConfig(model="ws", out_dir=str(tmp_path))
    before = cfg.identity()
    assert before["architecture"] == {"metanetwork": "weight-editor",
                                      "hyperparameters": {"hidden_channels": 33, "num_layers": 3}}
    run = RunDir(cfg.run_dir, before)
    run.path.mkdir(parents=True)
    run.metrics_path.write_text(json.dumps({"config": {"identity": before}}))
    assert RunDir(cfg.run_dir, cfg.identity()).finished() is not None  # the stored identity compares equal
    name, hyper = configs.EDITING_MODELS["ws"]
    monkeypatch.setitem(configs.EDITING_MODELS, "ws", (name, {**hyper, "hidden_channels": 40}))
    after = RunDir(cfg.run_dir, cfg.identity())
    assert after.finished() is None
    with pytest.raises(RunDirConflictError, match="architecture"):
        after.claim()
    assert configs.CurvatureConfig(model="gmn-average").identity()["architecture"]["hyperparameters"]["mode"] == \
        "average"
