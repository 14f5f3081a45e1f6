"""The gradgraph command."""
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


def test_unknown_model_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown model"):
        main(["inspect", "--model", "resnet9000"])
