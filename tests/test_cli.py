"""The gradgraph command."""
import json
import subprocess
import sys

import pytest

from gradgraph.cli import main


@pytest.mark.parametrize("model", ["mlp", "siren", "cnn", "gpt"])
def test_inspect_reference_models(model, capsys):
    assert main(["inspect", "--model", model, "--batch-size", "3"]) == 0
    out = capsys.readouterr().out
    assert "neuron space" in out and "feature bytes" in out and "per-sample gradients rebuilt" in out


def test_inspect_a_user_factory_and_draw(tmp_path, capsys):
    png = tmp_path / "g.png"
    assert main(["inspect", "--model", "cli_factory:make", "--draw", str(png)]) == 0
    assert png.stat().st_size > 1000
    assert "sum of outputs" in capsys.readouterr().out


def test_console_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "gradgraph.cli", "inspect", "--batch-size", "2"],
                         capture_output=True, text=True, check=True).stdout
    assert "GradientGraph" in out


def test_unknown_model_is_a_clear_error(capsys):
    assert main(["inspect", "--model", "resnet9000"]) == 2  # a message, not a traceback
    assert "error: unknown model 'resnet9000'" in capsys.readouterr().err


def test_help_lists_commands_without_importing_torch():
    code = ("import sys; from gradgraph.cli import build_parser; p = build_parser(['--help']); "
            "p.format_help(); print('torch' in sys.modules, sorted(p._subparsers._group_actions[0].choices))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("False") and "'bench'" in out and "'train'" in out


def test_every_subcommand_help_imports_no_torch():
    """``gradgraph X --help`` for every command, task and benchmark prints its options without loading torch
    (which is what keeps it well under a second); a negative control shows the check sees torch being loaded."""
    from gradgraph.bench import BENCHMARKS
    from gradgraph.tasks import TASKS

    commands = [["inspect"], ["fisher"], ["meta-train"]] + [["train", t] for t in TASKS] + \
        [["bench", b] for b in BENCHMARKS]
    code = ("import sys, contextlib, io; from gradgraph.cli import main\n"
            "for argv in {commands!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.suppress(SystemExit):\n"
            "        main(argv + ['--help'])\n"
            "    assert '--threads' in out.getvalue(), argv\n"
            "{extra}print('torch' in sys.modules)")
    run = lambda extra: subprocess.run([sys.executable, "-c", code.format(commands=commands, extra=extra)],  # noqa: E731
                                       capture_output=True, text=True, check=True).stdout.strip()
    assert run("") == "False"
    assert run("import gradgraph.bench.lopt\n") == "True"  # the check sees a benchmark module's torch


def test_train_help_shows_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "curvature", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("--train-size INT", "(default: 100)", "--model {gradmetanet,", "--lr FLOAT", "(default: 0.001)",
                 "--patience INT", "--out-dir STR", "(default: runs/curvature)", "--preset {quick,paper}",
                 "--threads INT"):
        assert text in out, text


def test_a_preset_sets_the_defaults_and_explicit_options_win():
    from gradgraph.cli import build_parser, config_from_args

    def cfg(*argv):
        argv = ["train", "curvature", *argv]
        args = build_parser(argv).parse_args(argv)
        return config_from_args(args.config_cls, args)

    bare, paper = cfg(), cfg("--preset", "paper")
    assert (bare.train_size, bare.num_models, bare.epochs) == (100, 300, 20)  # a few minutes on 2 cores
    assert (paper.train_size, paper.num_models, paper.epochs) == (2000, 3000, 100)
    assert cfg("--preset=paper", "--epochs", "7").epochs == 7 and cfg("--epochs", "7", "--preset", "paper").epochs == 7


def test_thread_policy(monkeypatch):
    """--threads wins, then OMP_NUM_THREADS, then 1; every command records the count it ran with."""
    import torch

    from gradgraph.cli import _apply_thread_policy, build_parser
    from gradgraph.threads import resolve_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert resolve_threads() == 1 and resolve_threads(3) == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        assert resolve_threads() == 2 and resolve_threads(1) == 1
        for argv in (["inspect"], ["fisher", "--run", "x"], ["train", "curvature"], ["meta-train"],
                     ["bench", "curvature"], ["bench", "capture"]):
            args = build_parser(argv).parse_args(argv + ["--threads", "1"])
            _apply_thread_policy(args)
            assert args.threads == 1 and torch.get_num_threads() == 1, argv
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # (set_threads exports its count to child processes)
        args = build_parser(["inspect"]).parse_args(["inspect"])
        _apply_thread_policy(args)
        assert args.threads == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_a_registered_task_gets_its_command_for_free(tmp_path, capsys, monkeypatch):
    from gradgraph.tasks import TASKS

    monkeypatch.setitem(TASKS._entries, "toy", "test_train_loop:ToyConfig")
    assert main(["train", "toy", "--epochs", "2", "--noise", "0.2", "--out-dir", str(tmp_path), "--quiet"]) == 0
    assert '"test_mse"' in capsys.readouterr().out
    saved = json.loads((tmp_path / "seed0" / "metrics.json").read_text())
    assert saved["config"]["noise"] == 0.2 and saved["epochs_run"] == 2
    with pytest.raises(SystemExit):
        main(["train", "toy", "--noise", "much"])  # typed from the annotation
    assert "invalid float value" in capsys.readouterr().err


def test_out_of_range_options_name_the_option(capsys):
    assert main(["train", "curvature", "--train-size", "-3", "--quiet"]) == 2
    assert "error: --train-size = -3 is out of range: it must be >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("target, says", [
    ("os:system", "a builtin_function_or_method, not a model class"),
    ("cli_factory:unannotated", "return annotation does not say it builds a model"),
    ("cli_factory:NOT_CALLABLE", "a int, not a model class"),
    ("json:JSONDecoder", "the class JSONDecoder, not an nn.Module subclass"),
    ("cli_factory:lies", "returned a str, not an nn.Module"),
])
def test_model_targets_must_declare_a_model(target, says, capsys):
    assert main(["inspect", "--model", target]) == 2
    err = capsys.readouterr().err
    assert says in err and target in err


def test_declared_factories_and_module_classes_are_accepted(capsys):
    assert main(["inspect", "--model", "cli_factory:declared"]) == 0
    from gradgraph.models import build_model
    from gradgraph.models.reference import MLP

    assert isinstance(build_model("gradgraph.models.reference:MLP"), MLP)


def test_inspect_prints_coverage_and_explains_a_refusal(capsys):
    assert main(["inspect", "--model", "mlp", "--coverage", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "coverage of mlp" in out and "captured" in out and "neuron spaces:" in out
    assert main(["inspect", "--model", "cli_factory:refused"]) == 2
    out = capsys.readouterr().out
    assert "odd" in out and "refused" in out and "torch.nn.modules.linear.Bilinear" in out
