"""Shipped learned-optimizer checkpoints: listed, loaded with their meta-parameters, usable on other models,
small, and each with the command that made it; and `gradgraph bench lopt` on a tiny grid."""
import pytest
import torch

from gradgraph.errors import UnknownNameError
from gradgraph.io import load_file, save_file
from gradgraph.models.reference import GPT, MLP
from gradgraph.optim import VARIANTS, LearnedOptimizer, available, load_rule, pretrained


def _ship(directory, name, variant, **hyper):
    rule = VARIANTS.build(variant, **hyper)
    with torch.no_grad():
        rule.log_alpha.fill_(-1.234)
    save_file({"variant": variant, "hyper": rule.hyper(), "state": rule.state_dict(), "task": "digits-mlp",
               "meta_steps": 7, "process_seconds": 1.0, "command": "gradgraph meta-train ..."},
              directory / f"{name}.pt", pretrained.KIND)
    return rule


def test_from_pretrained_loads_the_meta_parameters(tmp_path, monkeypatch):
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", tmp_path)
    _ship(tmp_path, "ds", "ds")
    assert available() == ["ds"]
    model = MLP(5, (7,), 3)
    opt = LearnedOptimizer.from_pretrained("ds", model, lr=0.5)
    assert opt.variant == "ds" and float(opt.meta.log_alpha.detach()) == pytest.approx(-1.234)
    assert opt.param_groups[0]["lr"] == 0.5
    info = pretrained.checkpoint_info("ds")
    assert info["alpha"] == pytest.approx(torch.tensor(-1.234).exp().item()) and info["meta_steps"] == 7
    x, y = torch.randn(8, 5), torch.randint(3, (8,))
    before = [p.detach().clone() for p in model.parameters()]

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss
    opt.step(closure)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    with pytest.raises(UnknownNameError, match="no shipped learned-optimizer checkpoint named 'nope'.*'ds'"):
        LearnedOptimizer.from_pretrained("nope", model)
    _ship(tmp_path, "graph", "ds+gradmetanet")  # a graph variant steps a model of another family
    gpt = GPT(vocab_size=11, block_size=6, d_model=16, n_heads=2, n_layers=1)
    opt = LearnedOptimizer.from_pretrained("graph", gpt)
    tokens = torch.randint(11, (4, 6))

    def gpt_closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(gpt(tokens).flatten(0, 1), tokens.flatten())
        loss.backward()
        return loss
    assert opt.meta.needs_graph and torch.isfinite(opt.step(gpt_closure).detach())


def test_a_run_folders_rule_loads_by_path(tmp_path):
    _ship(tmp_path, "rule", "sgdm")
    assert load_rule(tmp_path / "rule.pt").variant == "sgdm"
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="bad.pt"):
        load_rule(tmp_path / "bad.pt")


@pytest.mark.parametrize("name", available())
def test_every_shipped_checkpoint_is_small_documented_and_transfers(name):
    path = pretrained.PRETRAINED_DIR / f"{name}.pt"
    assert path.stat().st_size < 400_000
    payload = load_file(path, pretrained.KIND)
    assert payload["command"].startswith("gradgraph meta-train") and payload["meta_steps"] > 0
    rule = load_rule(name)
    assert rule.variant == payload["variant"]
    models = [MLP(64, (48, 24), 10)]  # another width and depth than digits-mlp's 64-32-10
    if rule.needs_graph:
        models.append(GPT(vocab_size=11, block_size=6, d_model=16, n_heads=2, n_layers=1))
    for model in models:
        opt = LearnedOptimizer.from_pretrained(name, model)
        x = torch.randint(11, (4, 6)) if isinstance(model, GPT) else torch.randn(16, 64)
        y = torch.randint(10, x.shape if isinstance(model, GPT) else (16,))

        def closure(opt=opt, model=model, x=x, y=y):
            opt.zero_grad()
            out = model(x)
            loss = torch.nn.functional.cross_entropy(out.flatten(0, -2), y.flatten())
            loss.backward()
            return loss
        losses = [float(opt.step(closure).detach()) for _ in range(3)]
        assert all(torch.isfinite(torch.tensor(losses)))


def test_bench_lopt_tiny(tmp_path, monkeypatch, capsys):
    from gradgraph.cli import main

    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", tmp_path / "none")
    _ship(tmp_path, "rule", "ds")
    argv = ["bench", "lopt", "--preset", "tiny", "--rules", f"mine={tmp_path / 'rule.pt'}", "--out-dir",
            str(tmp_path / "runs"), "--results", str(tmp_path / "res"), "--quiet"]
    assert main(argv) == 0
    table = (tmp_path / "res" / "lopt_tiny.md").read_text()
    assert "| digits-mlp | adam (lr" in table and "| digits-mlp | mine |" in table
    assert (tmp_path / "res" / "lopt_tiny.png").stat().st_size > 0
    cached = sorted((tmp_path / "runs").rglob("*.json"))
    assert len(cached) == 2 * 1 + 2 + 2  # tuning (2 rates x 1 seed), Adam and mine (2 seeds each)
    assert main(argv) == 0  # a rerun reads every run back
    assert sorted((tmp_path / "runs").rglob("*.json")) == cached
    with pytest.raises(SystemExit, match="NAME=PATH"):
        main(argv[:4] + ["--rules", "broken"])


def _steps(opt, model, x, y, n=3):
    for _ in range(n):
        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    return [p.detach().clone() for p in model.parameters()]


def test_warm_started_graph_variant_steps_exactly_like_the_rule_it_started_from():
    ds = VARIANTS.build("ds")
    with torch.no_grad():  # a "trained" ds rule: nonzero output layer, other step sizes
        for p in ds.parameters():
            p.add_(0.3 * torch.randn_like(p))
    warm = VARIANTS.build("ds+gradmetanet")
    warm.warm_start(ds)
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randint(3, (16,))
    base = MLP(5, (7, 6), 3)
    after = {}
    for name, rule in (("ds", ds), ("warm", warm), ("cold", VARIANTS.build("ds+gradmetanet"))):
        model = MLP(5, (7, 6), 3)
        model.load_state_dict(base.state_dict())
        after[name] = _steps(LearnedOptimizer(model, variant=rule.variant, meta=rule), model, x, y)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(after["ds"], after["warm"]))
    # negative: without the warm start the graph variant is an untrained rule, another update
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(after["ds"], after["cold"]))
    with pytest.raises(ValueError, match="mlp.0 is 27->16 here and 19->32 there"):
        VARIANTS.build("ds+gradmetanet", hidden=(16, 16, 16)).warm_start(ds)
    with pytest.raises(ValueError, match="another depth"):
        VARIANTS.build("ds+gradmetanet", hidden=(32, 32)).warm_start(ds)


def test_meta_train_init_from_records_the_warm_start(tmp_path, monkeypatch):
    from gradgraph.cli import main
    monkeypatch.setattr(pretrained, "PRETRAINED_DIR", tmp_path / "shipped")
    (tmp_path / "shipped").mkdir()
    trained = _ship(tmp_path / "shipped", "ds", "ds")
    argv = ["meta-train", "--variant", "ds+gradmetanet", "--init-from", "ds", "--pairs", "1", "--truncation", "2",
            "--horizon", "3", "--steps", "0", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    payload = load_file(tmp_path / "run" / "rule.pt", pretrained.KIND)
    assert payload["init_from"]["variant"] == "ds" and payload["command"].endswith("--init-from ds")
    rule = pretrained.rule_from_payload(payload)
    assert float(rule.log_alpha.detach()) == pytest.approx(float(trained.log_alpha.detach()))
    cold = [a for a in argv if a not in ("--init-from", "ds")]
    with pytest.raises(ValueError, match="init from ds"):  # the run folder belongs to the warm-started run
        main(cold)
