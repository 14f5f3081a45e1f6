"""Rules for Hugging Face layers, registered only once ``transformers`` is imported (gradgraph never imports
it: a model built from transformers has loaded it already). ``transformers.pytorch_utils.Conv1D`` is a linear
layer whose weight is stored ``[in, out]``: one ``transposed_linear`` op."""
from __future__ import annotations

import sys

from .registry import register_lazy, register_rule, through_super


def conv1d_rule(ctx, m, x):
    return ctx.linear(x, m.weight, m.bias, transposed=True)


def _register_pytorch_utils() -> None:
    register_rule(sys.modules["transformers.pytorch_utils"].Conv1D)(conv1d_rule)


register_lazy("transformers.pytorch_utils", _register_pytorch_utils)


def _register_opt() -> None:
    register_rule(sys.modules["transformers.models.opt.modeling_opt"].OPTLearnedPositionalEmbedding)(through_super)


register_lazy("transformers.models.opt.modeling_opt", _register_opt)
