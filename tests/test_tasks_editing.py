"""INR editing: every model is equivariant to the INR's hidden-neuron permutations, training beats Delta theta = 0
on held-out INRs, the reference rows and the command line work."""
import json

import pytest
import torch
from torch import nn

from gradgraph.cli import main
from gradgraph.graph.symmetry import apply_symmetry, random_symmetry
from gradgraph.nn import WeightEditor
from gradgraph.nn.baselines import WeightSpaceGMN
from gradgraph.tasks.configs import EDITING_MODELS, EditingConfig
from gradgraph.tasks.editing import build_model, edited_render, reference_metrics, train_editing

TINY = dict(num_images=40, fit_steps=300, batch_size=8, lr=3e-3)


def _permute_theta(graph, permuted, sym, theta):
    """theta-order values [P] or [P, C] of ``graph``'s network, moved as the neuron permutation ``sym`` moves
    the parameters."""
    return permuted.params_to_graph(apply_symmetry(graph.graph_to_params(theta), sym))


def _equivariance_error(model, graph, seed=0) -> tuple[float, float]:
    """(max |model(sym . graph) - sym . model(graph)|, max |sym . model(graph) - model(graph)|)."""
    sym = random_symmetry(graph, torch.Generator().manual_seed(seed))
    permuted = apply_symmetry(graph, sym)
    permuted.theta = _permute_theta(graph, permuted, sym, graph.theta)
    model.eval()
    with torch.no_grad():
        out, out_p = model(graph), model(permuted)
    moved = _permute_theta(graph, permuted, sym, out)
    return float((out_p - moved.reshape(out_p.shape)).abs().max()), float((moved.reshape(out.shape) - out).abs().max())


@pytest.mark.parametrize("name", list(EDITING_MODELS))
def test_every_model_is_equivariant(editing_data, name):
    torch.manual_seed(0)
    model = build_model(name, editing_data[0])
    model.calibrate([editing_data.batch([0, 1, 2])])
    for lin in (model.ws.edge_out, model.ws.bias_out):  # the zero-initialized output would make this trivial
        nn.init.normal_(lin.weight)
    err, moved = _equivariance_error(model, editing_data[5])
    assert moved > 1e-2  # the permutation really moves the output
    assert err < 1e-5 * max(moved, 1.0), err


class _FlatEditor(nn.Module):
    """Negative control: an MLP on the flat theta vector (not equivariant)."""

    def __init__(self, P: int) -> None:
        super().__init__()
        self.lin = nn.Linear(P, P)

    def forward(self, graph):
        return self.lin(graph.theta.reshape(-1, self.lin.in_features)).reshape(-1, 1)


def test_the_equivariance_check_catches_a_model_that_is_not(editing_data):
    torch.manual_seed(0)
    err, moved = _equivariance_error(_FlatEditor(editing_data.spec.num_params), editing_data[5])
    assert err > 1e-3


def test_the_weight_input_path_checks_its_inputs(editing_data):
    graph = editing_data[0]
    net = WeightSpaceGMN(8, 1, weight_features=2, gradient_input=False)
    assert net(graph, weights=torch.zeros(graph.num_params, 2)).shape == (graph.num_params, 1)
    with pytest.raises(ValueError, match="weights of shape"):
        net(graph)
    with pytest.raises(ValueError, match="grad_net must be"):
        WeightEditor(6, 64, grad_net="dws")


def test_edited_render_averages_the_k_edits(editing_data):
    from gradgraph.data.digit_inrs import grid_coords, make_siren

    batch, siren, coords = editing_data.batch([0, 1]), make_siren(), grid_coords()
    d = torch.randn(batch.theta.numel(), 2) * 1e-2
    both = edited_render(editing_data.spec, batch.theta, d, coords, siren)
    one = [edited_render(editing_data.spec, batch.theta, d[:, c:c + 1], coords, siren) for c in range(2)]
    torch.testing.assert_close(both, (one[0] + one[1]) / 2)
    ident = edited_render(editing_data.spec, batch.theta, None, coords, siren)
    torch.testing.assert_close(ident, batch.image.reshape(2, -1), atol=0.05, rtol=0)


def test_a_short_run_beats_no_edit_on_held_out_inrs(editing_data, tmp_path):
    cfg = EditingConfig(model="ws+gradmetanet", epochs=4, out_dir=str(tmp_path), **TINY)
    first = train_editing(cfg, editing_data, progress=False, stop_after_epochs=2)
    assert first["interrupted"]
    metrics = train_editing(cfg, editing_data, progress=False)  # resumes from the checkpoint
    assert metrics["epochs_run"] == 4 and metrics["parameters"] > 20_000
    assert metrics["test_mse"] < 0.8 * metrics["identity_test_mse"], metrics
    assert 0.015 < metrics["identity_test_mse"] < 0.03


def test_reference_rows(editing_data):
    ref = reference_metrics(editing_data, editing_data.split_indices(), grid={"k": (0, 10), "lr": (1e-3,)})
    assert ref["oracle"] < 1e-3 < ref["identity"]  # the fits are good: dilating their renderings is near exact
    assert ref["adam-k"] < ref["identity"] and ref["adam_k"] == 10


def test_cli_train_editing(editing_data, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "editing", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--model {ws,ws+probe," in out and "(default: runs/editing)" in out
    args = ["train", "editing", "--model", "ws", "--num-images", "40", "--fit-steps", "300", "--epochs", "1",
            "--batch-size", "16", "--dataset-root", str(editing_data.root), "--out-dir", str(tmp_path), "--quiet"]
    assert main(args) == 0
    saved = json.loads((tmp_path / "ws-i40x1-s0" / "metrics.json").read_text())
    assert saved["config"]["model"] == "ws" and "identity_test_mse" in saved


def test_bench_editing_tiny(tmp_path):
    out = tmp_path / "results"
    args = ["bench", "editing", "--preset", "tiny", "--dataset-root", str(tmp_path / "data"), "--out-dir",
            str(tmp_path / "runs"), "--results", str(out), "--quiet"]
    assert main(args) == 0
    table = (out / "editing_tiny.md").read_text()
    assert "| identity (no edit) | 0 |" in table and "| ws+gradmetanet |" in table and "adam-k (k=" in table
    assert (out / "editing_tiny.png").stat().st_size > 1000
    assert main(args + ["--report-only"]) == 0  # reads the finished runs and the cached references back
