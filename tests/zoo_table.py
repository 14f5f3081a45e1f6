"""The "Supported models" table (docs/supported_models.md), generated from the zoo tests: every row is a model
one of those tests checks (exact per-sample gradients, a symmetry that keeps the function, GradMetaNet on the
graph), and its columns are computed from the model's captured structure (op kinds, neuron spaces), so the
table cannot claim what the tests do not check. ``python tests/zoo_table.py`` rewrites the file;
tests/test_supported_models.py fails when it is out of date."""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import cases  # noqa: E402
import test_zoo as zoo  # noqa: E402
import test_zoo_bare as bare  # noqa: E402
import test_zoo_decoder as dec  # noqa: E402
import test_zoo_norms as norms  # noqa: E402
import test_zoo_recurrent as rec  # noqa: E402

from gradgraph.api import model_spec  # noqa: E402

DOC = Path(__file__).resolve().parents[1] / "docs" / "supported_models.md"
D = torch.float64


def _img(size):
    return torch.randn(2, 3, size, size, dtype=D)


def _resnet(layer_type):
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type=layer_type, num_labels=3)
    return transformers.ResNetForImageClassification(cfg).double().eval()


def _mobilenet():
    cfg = transformers.MobileNetV2Config(num_channels=3, image_size=8, depth_multiplier=0.25, min_depth=4,
                                         num_labels=3, initializer_range=0.3, finegrained_output=False)
    return transformers.MobileNetV2ForImageClassification(cfg).double().eval()


def _grouped():
    return nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.Tanh(), nn.Conv2d(6, 6, 3, padding=1, groups=2), nn.Tanh(),
                         nn.Conv2d(6, 2, 1), nn.Flatten(), nn.Linear(32, 3)).double()


def _encoder():
    c = cases.make("transformer_encoder", 0)
    return c.model, c.inputs


# (model, layers or pattern, notes, the test that checks it, build() -> (model, example inputs))
ROWS = [
    ("HF `GPT2LMHeadModel` (tied and untied)", "`Conv1D` (transposed linear), packed q/k/v cut by `split`, "
     "tied `wte`/`lm_head`, `position_ids` [1, T]", "heads permute with q/k/v", "test_zoo.py::test_hf_gpt2",
     lambda: (zoo.gpt2(True), zoo._batch(13)[0])),
    ("HF `GPT2LMHeadModel`, eager attention", "matmuls with heads as a batch axis, causal mask, dtype cast",
     "heads permute through per-head scores", "test_zoo.py::test_hf_gpt2_eager_attention",
     lambda: (zoo.gpt2(True, "eager"), zoo._batch(13)[0])),
    ("HF `LlamaForCausalLM` (sdpa and eager)", "rotary position embeddings, hand-written RMSNorm (computed in "
     "float32), SwiGLU", "whole heads permute, dims within a head keep their order; "
     "symmetries keep the output to float32 rounding", "test_zoo.py::test_hf_llama_rotary",
     lambda: (zoo.llama(), zoo._batch(13)[0])),
    ("HF `BertForMaskedLM` (sdpa and eager)", "separate q/k/v, token types, decoder tied to the word embeddings", "",
     "test_zoo.py::test_hf_bert_masked_lm", lambda: (zoo.bert(), zoo._batch(13)[0])),
    ("HF `OPTForCausalLM` (tied, pre/post norm, projected)", "`OPTLearnedPositionalEmbedding` (ids + 2 through "
     "`super().forward`), MLP on `[b*T, d]` rows, `project_in`/`project_out`, tied `embed_tokens`/`lm_head`",
     "heads permute; attention masks refused (HF's batch-wide mask check)", "test_zoo.py::test_hf_opt",
     lambda: (zoo.opt(proj=6), zoo._batch(13)[0])),
    ("HF `ViTForImageClassification`", "patch conv, bare `cls_token` and `position_embeddings`", "",
     "test_zoo_bare.py::test_hf_vit",
     lambda: (transformers.ViTForImageClassification(bare._vit_config()).double().eval(), _img(8))),
    ("HF `ResNetForImageClassification` (basic)", "Conv2d, eval BatchNorm, residual shortcuts", "",
     "test_zoo_bare.py::test_hf_resnet", lambda: (_resnet("basic"), _img(8))),
    ("HF `ResNetForImageClassification` (bottleneck)", "1x1/3x3 bottlenecks, projection shortcuts", "",
     "test_zoo_bare.py::test_hf_resnet", lambda: (_resnet("bottleneck"), _img(8))),
    ("HF `MobileNetV2ForImageClassification`", "depthwise + pointwise convs, ReLU6, eval BatchNorm",
     "depthwise channels are fixed (one channel per group)",
     "test_zoo_bare.py::test_hf_mobilenet_v2_depthwise_convolutions", lambda: (_mobilenet(), _img(8))),
    ("ViT with bare parameters", "`cat([cls.expand(b, -1, -1), x]) + pos`, layer scales `x * gamma`, "
     "`nn.MultiheadAttention`, a learned temperature", "", "test_zoo_bare.py::test_vit_with_bare_tokens_layer_scales_"
     "and_temperature", lambda: (bare.TinyViT().double().eval(), _img(4))),
    ("`nn.TransformerEncoder`", "encoder layers (pre/post norm), `nn.MultiheadAttention`", "",
     "test_capture_api.py (tests/cases.py transformer_encoder)", _encoder),
    ("`nn.TransformerDecoder` (with an encoder)", "causal self-attention, cross-attention to the encoder's memory "
     "(pre/post norm)", "", "test_zoo_decoder.py::test_transformer_decoder", lambda: dec.decoder()[:2]),
    ("`nn.LSTM` (2 layers)", "unrolled over time: one op per weight and step (weight sharing)",
     "hidden units permute, all gate blocks alike; bidirectional, proj_size, packed sequences refused",
     "test_zoo_recurrent.py", lambda: (rec.Seq(nn.LSTM, num_layers=2).double().eval(), torch.randn(2, 5, 3, dtype=D))),
    ("`nn.GRU` (2 layers)", "unrolled over time", "", "test_zoo_recurrent.py",
     lambda: (rec.Seq(nn.GRU, num_layers=2).double().eval(), torch.randn(2, 5, 3, dtype=D))),
    ("`nn.RNN` (2 layers)", "unrolled over time", "", "test_zoo_recurrent.py",
     lambda: (rec.Seq(nn.RNN, num_layers=2).double().eval(), torch.randn(2, 5, 3, dtype=D))),
    ("SwiGLU blocks with `nn.RMSNorm`", "torch's RMSNorm (a `diag` op)", "", "test_zoo_norms.py::test_rms_norm",
     lambda: (norms.SwiGLUNet(lambda d: nn.RMSNorm(d, eps=1e-6)).double(), torch.randn(2, 4, 3, dtype=D))),
    ("SwiGLU blocks with a hand-written RMSNorm", "Llama-style `weight * x * rsqrt(mean(x^2) + eps)` (bare layer "
     "scale)", "", "test_zoo_norms.py::test_rms_norm",
     lambda: (norms.SwiGLUNet(norms.HFRMSNorm).double(), torch.randn(2, 4, 3, dtype=D))),
    ("Conv net with `nn.GroupNorm`", "GroupNorm(2, 6), GroupNorm(2, 4)", "channels permute within their group",
     "test_zoo_norms.py::test_group_norm",
     lambda: (nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.GroupNorm(2, 6), nn.SiLU(), nn.Conv2d(6, 4, 3),
                            nn.GroupNorm(2, 4), nn.Tanh(), nn.Flatten(), nn.Linear(16, 3)).double(),
              torch.randn(2, 2, 4, 4, dtype=D))),
    ("Grouped `nn.Conv2d` (groups=2)", "one conv op per group", "channels permute within their group",
     "test_zoo_bare.py::test_grouped_conv_symmetry_permutes_within_groups_only",
     lambda: (_grouped(), torch.randn(2, 2, 4, 4, dtype=D))),
]

HEADER = """# Supported models

Generated by `tests/zoo_table.py` from the zoo tests (do not edit by hand: `python tests/zoo_table.py` rewrites
it, and `tests/test_supported_models.py` fails when it is out of date). Every row is checked by the test it
names: float64 per-sample gradients equal `torch.func` (a per-sample autograd loop for recurrent layers) to
1e-9 relative, the summed gradient equals autograd's, a random symmetry that moves at least one space keeps
the output to 1e-9, `capture(s . model) == s . capture(model)`, and GradMetaNet runs on the graph. The op
kinds and neuron spaces are computed from the captured structure of the model as the test builds it (small
random configs; nothing downloads); a space is movable when a random symmetry can permute its neurons (spaces
cut into pieces, such as packed q/k/v, count once). torchvision models are covered through the same layers in
Hugging Face's vision models (torchvision's registry wheels do not import against the CPU build of torch).

| model | layers / pattern | op kinds | ops | neuron spaces (movable / all) | symmetry notes | test |
|---|---|---|---|---|---|---|
"""


def _moves(spec, sp) -> bool:
    """Whether a random symmetry can move neurons of space ``sp`` (a space cut into pieces: through a piece)."""
    if not sp.permutable:
        return False
    if sp.parts:
        return any(_moves(spec, spec.spaces[i]) for i in sp.parts)
    return sp.size > 1 and (sp.heads <= 1 or sp.heads_permutable or (sp.size // sp.heads > 1 and not sp.within_heads))


def table() -> str:
    lines = []
    for name, pattern, notes, test, build in ROWS:
        torch.manual_seed(0)
        model, x = build()
        spec = model_spec(model, x)
        kinds = ", ".join(sorted({op.kind for op in spec.ops}))
        pieces = {i for sp in spec.spaces for i in sp.parts}
        # spaces of neurons: not the pieces of a cut one, nor glue's intermediate spaces that no layer holds
        # (the halves of each head in rotary embeddings)
        used = {layer.space for layer in spec.layers} | {i for i, sp in enumerate(spec.spaces) if sp.parts}
        whole = [sp for i, sp in enumerate(spec.spaces) if i not in pieces and i in used]
        perm = sum(_moves(spec, sp) for sp in whole)
        lines.append(f"| {name} | {pattern} | {kinds} | {len(spec.ops)} | {perm} / {len(whole)} | "
                     f"{notes} | `tests/{test}` |")
    return HEADER + "\n".join(lines) + "\n"


if __name__ == "__main__":
    DOC.write_text(table())
    print(f"wrote {DOC}")
