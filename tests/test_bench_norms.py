"""gradgraph.bench.norms on tiny sizes: every engine computes the same per-sample gradient norms (float64,
against torch.func computed independently here), a disagreeing engine is marked wrong, the command runs. No
timing assertions."""
import torch
from torch.func import functional_call, grad, vmap

from gradgraph.bench import norms
from gradgraph.bench.capture import Config
from gradgraph.cli import main


def _reference_norms(model, x, y, loss_fn):
    params = {n: p.detach() for n, p in model.named_parameters()}

    def one(p, xi, yi):
        return loss_fn(functional_call(model, p, (xi[None],)), yi[None]).sum()
    g = vmap(grad(one), in_dims=(None, 0, 0))(params, x, y)
    return torch.stack([v.flatten(1).pow(2).sum(1) for v in g.values()]).sum(0).sqrt()


def test_every_engine_computes_the_per_sample_gradient_norms():
    model, x, y, loss_fn = Config("mlp", 5, width=6, depth=2).build(dtype=torch.float64)
    want = _reference_norms(model, x, y, loss_fn)
    for engine in ("gradgraph", "opacus-ghost", "vmap"):
        got = norms.prepare(engine, norms._copy(model), loss_fn)(x, y)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=0)
    diff = norms.agreement(Config("mlp", 5, width=6, depth=2), ["plain", "gradgraph", "opacus-ghost", "vmap"])
    assert set(diff) == {"gradgraph", "opacus-ghost", "vmap"} and all(v < 1e-12 for v in diff.values())


def test_a_disagreeing_engine_is_marked_wrong():
    row = dict(model="m", batch=2, params=3, ms={"plain": 1.0, "gradgraph": 2.0, "vmap": 3.0},
               diff={"gradgraph": 0.0, "vmap": 1e-3})
    text = norms.report([row], ["plain", "gradgraph", "vmap"], "test machine", 1.0)
    lines = {ln.split(" | ")[3]: ln for ln in text.splitlines() if ln.startswith("| m |")}
    assert "**wrong**" in lines["vmap"] and "**wrong**" not in lines["gradgraph"]
    assert "| 2.00 |" in lines["gradgraph"]  # the ratio to plain


def test_cli_runs_a_tiny_grid(tmp_path):
    out = tmp_path / "norms.md"
    assert main(["bench", "norms", "--tiny", "--repeats", "1", "--warmup", "0", "--output", str(out)]) == 0
    text = out.read_text()
    assert "| MLP 16x2 | 4 |" in text and "opacus-ghost" in text
