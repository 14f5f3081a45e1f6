"""gradgraph.models: the reference models by name (a Registry) and ``package.module:function`` factories."""
import pytest
from torch import nn

from gradgraph.errors import UnknownNameError
from gradgraph.models import CNN, GPT, MLP, REFERENCE_MODELS, SIREN, build_model


def test_build_model_by_name_with_arguments():
    assert REFERENCE_MODELS.names() == ["mlp", "siren", "cnn", "gpt"]
    for name, cls in (("mlp", MLP), ("siren", SIREN), ("cnn", CNN), ("gpt", GPT)):
        assert type(build_model(name)) is cls
    m = build_model("mlp", in_features=3, hidden=(5,), out_features=2)
    assert [p.shape for p in m.parameters()] == [(5, 3), (5,), (2, 5), (2,)]


def test_build_model_from_a_factory_path():
    model, inputs = build_model("cli_factory:make")  # tests/cli_factory.py (tests/ is on sys.path)
    assert isinstance(model, nn.Module) and inputs.shape == (4, 3)


@pytest.mark.parametrize("name", ["resnet9000", "cli_factory:nothing", "no_such_module_xyz:make"])
def test_unknown_names_are_a_clear_error(name):
    with pytest.raises(UnknownNameError) as info:
        build_model(name)
    assert isinstance(info.value, ValueError)
    if ":" not in name:
        assert str(info.value) == ("unknown model 'resnet9000': use one of ['cnn', 'gpt', 'mlp', 'siren'] or "
                                   "'package.module:function'")
