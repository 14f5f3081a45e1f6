"""``nn.TransformerDecoder`` (self-attention with a causal mask, cross-attention to an encoder's memory) in the
zoo contract of tests/test_zoo.py: exact float64 per-sample gradients against torch.func, the summed gradient,
a random symmetry that keeps the output and transforms the graph like the model, GradMetaNet on the graph; and
a negative test."""
from __future__ import annotations

import pytest
import torch
from test_zoo import _moving_symmetry, _same_output, check_model
from torch import nn

import gradgraph
from gradgraph.losses import per_sample_mse


class DecoderNet(nn.Module):
    """An encoder-decoder: the first ``src_len`` positions of ``x`` [b, T, d_in] are the source (encoded by a
    ``nn.TransformerEncoder``), the rest the target sequence decoded by a ``nn.TransformerDecoder`` (causal
    self-attention, cross-attention to the memory); output [b, T - src_len, 2]."""

    def __init__(self, d_in=3, d=4, heads=2, d_ff=6, layers=2, norm_first=False, src_len=4) -> None:
        super().__init__()
        self.src, self.tgt, self.src_len = nn.Linear(d_in, d), nn.Linear(d_in, d), src_len
        enc = nn.TransformerEncoderLayer(d, heads, d_ff, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(enc, 1, enable_nested_tensor=False)
        dec = nn.TransformerDecoderLayer(d, heads, d_ff, dropout=0.0, batch_first=True, norm_first=norm_first)
        self.dec = nn.TransformerDecoder(dec, layers)
        self.out = nn.Linear(d, 2)

    def forward(self, x):
        memory = self.enc(self.src(x[:, :self.src_len]))
        tgt = self.tgt(x[:, self.src_len:])
        mask = nn.Transformer.generate_square_subsequent_mask(tgt.shape[1], dtype=x.dtype)
        return self.out(self.dec(tgt, memory, tgt_mask=mask, tgt_is_causal=True))


def decoder(norm_first: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    m = DecoderNet(norm_first=norm_first).double().eval()
    g = torch.Generator().manual_seed(seed)
    return m, torch.randn(3, 7, 3, generator=g, dtype=torch.float64), torch.randn(3, 3, 2, generator=g,
                                                                                  dtype=torch.float64)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
def test_transformer_decoder(norm_first):
    m, x, y = decoder(norm_first)
    g = check_model(m, x, y, per_sample_mse, min_permutable=6)
    names = [op.name for op in g.spec.ops]
    for k in range(2):  # each decoder layer: self-attention, cross-attention and the feed-forward block
        assert any(n.startswith(f"dec.layers.{k}.self_attn") for n in names)
        assert any(n.startswith(f"dec.layers.{k}.multihead_attn") for n in names)
        assert any(n.startswith(f"dec.layers.{k}.linear2") for n in names)


def test_transformer_decoder_broken_symmetry_changes_the_function():
    """Negative: the cross-attention's value projection permuted without its output projection."""
    m, x, _ = decoder()
    s = _moving_symmetry(m, x)
    moved = gradgraph.apply_symmetry(m, s)
    with torch.no_grad():
        w = moved.dec.layers[0].multihead_attn.in_proj_weight
        d = w.shape[1]
        w[2 * d:] = w[2 * d:][torch.tensor([1, 0, 2, 3])]  # swap two value neurons only
    assert not _same_output(moved, m, x)
