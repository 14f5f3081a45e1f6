"""A model zoo: models gradgraph did not write (Hugging Face transformers, from random configs: nothing
downloads). For each: float64 per-sample gradients equal the torch.func oracle to 1e-9 relative, the summed
gradient equals autograd's, a random symmetry permutes at least one space and keeps the output to 1e-9 (a
broken one does not), the graph transforms like the model (capture(s . model) == s . capture(model)), and
GradMetaNet runs on the graph. transformers is part of the ``zoo`` extra: these tests never skip."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from conftest import assert_tensors_close  # noqa: E402

import gradgraph  # noqa: E402
from gradgraph import oracle  # noqa: E402
from gradgraph.api import model_spec  # noqa: E402
from gradgraph.nn import GradMetaNet  # noqa: E402

transformers.logging.set_verbosity_error()


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def lm_loss(out, y):
    """Per-sample next-token cross entropy, summed over the tokens: [b]."""
    lg = _logits(out)
    return F.cross_entropy(lg.reshape(-1, lg.shape[-1]), y.reshape(-1), reduction="none").view(y.shape).sum(1)


def gpt2(tied: bool, attn: str = "sdpa"):
    cfg = transformers.GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=tied, use_cache=False,
                                  bos_token_id=0, eos_token_id=0, attn_implementation=attn)
    return transformers.GPT2LMHeadModel(cfg).double().eval()


def _batch(vocab, b=3, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(vocab, (b, T), generator=g), torch.randint(vocab, (b, T), generator=g)


def _moving_symmetry(model, x):
    for k in range(20):
        s = gradgraph.random_symmetry(model, generator=torch.Generator().manual_seed(k), example_inputs=x)
        if not s.is_identity():
            return s
    raise AssertionError("no draw moved anything: the model has no permutable space")


def _same_output(a, b, x) -> bool:
    return torch.allclose(_logits(a(x)), _logits(b(x)), rtol=1e-9, atol=1e-10)


def check_model(model, x, y, loss_fn, min_permutable=1, ref=None):
    """The zoo contract; returns the graph. ``ref``: the per-sample gradients when torch.func cannot compute
    them (a per-sample autograd loop for layers without a vmap batching rule)."""
    g = gradgraph.capture(model, x, y, loss_fn)
    ref = oracle.per_sample_grads(model, x, y, loss_fn) if ref is None else ref
    assert set(g.per_sample_grads()) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert_tensors_close(g.per_sample_grads(), ref, rtol=1e-9)
    assert_tensors_close(g.grads(), oracle.grads(model, x, y, loss_fn), rtol=1e-9)
    assert sum(s.permutable for s in g.spec.spaces) >= min_permutable
    s = _moving_symmetry(model, x)
    moved = gradgraph.apply_symmetry(model, s)
    assert _same_output(moved, model, x)
    g2 = gradgraph.capture(moved, x, y, loss_fn)
    torch.testing.assert_close(g2.entry_x, gradgraph.apply_symmetry(g, s).entry_x, rtol=1e-9, atol=1e-12)
    net = GradMetaNet(8, 2, "node", 2).double()
    assert torch.isfinite(net(g)).all() and net(g).shape == (g.num_nodes, 2)
    return g


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hf_gpt2(tied):
    m = gpt2(tied)
    x, y = _batch(13)
    g = check_model(m, x, y, lm_loss)
    spaces = {s.key: s for s in g.spec.spaces}
    names = [p.name for p in g.spec.params]
    assert ("lm_head.weight" in names) != tied  # tied: one parameter, two uses (the embedding and the head)
    uses = [op.name for op in g.spec.ops if op.weight is not None and op.weight.name == "transformer.wte.weight"]
    assert uses == (["transformer.wte", "lm_head"] if tied else ["transformer.wte"])
    assert {op.kind for op in g.spec.ops} >= {"transposed_linear", "embedding", "diag"}
    # the packed q/k/v projection is cut into three pieces; queries and keys share one space, with 2 heads
    packed = spaces["transformer.h.0.attn.c_attn.out"]
    assert packed.permutable and len(packed.parts) == 3
    q, k, v = (g.spec.spaces[i] for i in packed.parts)
    assert q.key == k.key and q.heads == v.heads == 2 and q.heads_permutable and v.permutable


def test_hf_gpt2_broken_symmetry_changes_the_function():
    """Negative: a permutation of the packed projection that moves neurons from the queries to the keys."""
    m = gpt2(True)
    x, _ = _batch(13)
    s = _moving_symmetry(m, x)
    s.perms["transformer.h.0.attn.c_attn.out"] = torch.cat([torch.arange(8, 16), torch.arange(8),
                                                            torch.arange(16, 24)])
    assert not _same_output(gradgraph.apply_symmetry(m, s), m, x)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hf_gpt2_eager_attention(tied):
    """The eager attention path (matmuls with the heads as a batch axis, a dtype cast, the causal mask):
    the zoo contract, with q/k and v split into 2 heads that permute together (through the per-head scores)."""
    m = gpt2(tied, "eager")
    x, y = _batch(13)
    g = check_model(m, x, y, lm_loss)
    q, k, v = (g.spec.spaces[i] for i in {s.key: s for s in g.spec.spaces}["transformer.h.0.attn.c_attn.out"].parts)
    assert q.key == k.key and q.heads == v.heads == 2 and q.heads_permutable and v.heads_permutable


def test_hf_eager_attention_heads_must_move_together():
    """Negative: the heads of q/k moved without the heads of v (eager GPT-2) change the function."""
    m = gpt2(False, "eager")
    x, _ = _batch(13)
    for seed in range(20):
        s = gradgraph.random_symmetry(m, generator=torch.Generator().manual_seed(seed), example_inputs=x)
        if s.perms["transformer.h.0.attn.c_attn.out:split.0"][0] >= 4:  # this draw swaps the two heads of q/k
            break
    s.perms["transformer.h.0.attn.c_attn.out"] = torch.cat([s.perms["transformer.h.0.attn.c_attn.out"][:16],
                                                            torch.arange(16, 24)])  # v left in place
    assert not _same_output(gradgraph.apply_symmetry(m, s), m, x)


def test_position_ids_with_a_leading_one_are_broadcast():
    """HF builds position_ids [1, T] from arange: a constant shared by the samples, not sample mixing. The
    same [1, T] passed by the user as an input is a constant as well."""
    m = gpt2(False)
    x, y = _batch(13)
    pos = torch.arange(5)[None]

    def loss(out, t):
        return lm_loss(out, t)

    g = gradgraph.capture(m, {"input_ids": x, "position_ids": pos}, y, loss)
    assert_tensors_close(g.per_sample_grads(), oracle.per_sample_grads(m, {"input_ids": x, "position_ids": pos},
                                                                        y, loss), rtol=1e-9)
    spec = model_spec(m, {"input_ids": x, "position_ids": pos})
    assert any(s.permutable for s in spec.spaces)


def bert(attn: str = "sdpa"):
    cfg = transformers.BertConfig(vocab_size=13, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=16, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, pad_token_id=0, attn_implementation=attn)
    return transformers.BertForMaskedLM(cfg).double().eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_bert_masked_lm(attn):
    """BERT: separate q/k/v projections, token-type and position ids from [1, max] buffers (broadcast
    constants), the decoder tied to the word embeddings and its bias a parameter of the prediction head; the
    heads permute with either attention implementation."""
    m = bert(attn)
    x, y = _batch(13)
    g = check_model(m, x, y, lm_loss)
    uses = [op.name for op in g.spec.ops if op.weight is not None
            and op.weight.name == "bert.embeddings.word_embeddings.weight"]
    assert uses == ["bert.embeddings.word_embeddings", "cls.predictions.decoder"]
    heads = [s for s in g.spec.spaces if s.heads == 2]
    assert heads and all(s.heads_permutable for s in heads)


def llama(attn: str = "sdpa"):
    cfg = transformers.LlamaConfig(vocab_size=13, hidden_size=8, intermediate_size=12, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8,
                                   use_cache=False, attn_implementation=attn, tie_word_embeddings=False)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).double().eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hf_llama_rotary(attn):
    """Llama: rotary position embeddings, RMSNorm, SwiGLU, no biases. Exact per-sample gradients. Rotary
    multiplies q and k by cos/sin tables that differ across the dims of a head but are the same for every head,
    and rebuilds each head from its two halves (``rotate_half``): the dims of a head keep their order (dim i is
    rotated with i + d/2, each pair at its own frequency) while whole heads still permute, with q, k, v and the
    output projection (sdpa, and eager attention through its per-head scores). The residual
    stream and the SwiGLU hidden units permute freely. The symmetry keeps the output only to float32 rounding
    (~1e-7 relative): LlamaRMSNorm computes in float32 whatever the model's dtype."""
    m = llama(attn)
    x, y = _batch(13)
    g = gradgraph.capture(m, x, y, lm_loss)
    assert_tensors_close(g.per_sample_grads(), oracle.per_sample_grads(m, x, y, lm_loss), rtol=1e-9)
    assert_tensors_close(g.grads(), oracle.grads(m, x, y, lm_loss), rtol=1e-9)
    spaces = {s.key: s for s in g.spec.spaces}
    for k in range(2):
        q = spaces[f"model.layers.{k}.self_attn.q_proj.out"]
        assert q.within_heads is not None and "dims of each head" in q.within_heads  # the rotary tables
        assert q.permutable and q.heads_permutable and q.heads == 2
        assert spaces[f"model.layers.{k}.mlp.gate_proj.out"].permutable
    assert spaces["model.embed_tokens.out"].permutable
    # a drawn symmetry moves whole heads of q and never dims within a head
    perms = [gradgraph.random_symmetry(m, generator=torch.Generator().manual_seed(k), example_inputs=x).perms[
        "model.layers.0.self_attn.q_proj.out"] for k in range(8)]
    assert any(p[0] == 4 for p in perms)
    assert all(torch.equal(p.view(2, 4) - p.view(2, 4)[:, :1], torch.arange(4).expand(2, 4)) for p in perms)
    s = _moving_symmetry(m, x)
    moved = gradgraph.apply_symmetry(m, s)
    torch.testing.assert_close(_logits(moved(x)), _logits(m(x)), rtol=1e-6, atol=1e-7)
    g2 = gradgraph.capture(moved, x, y, lm_loss)
    torch.testing.assert_close(g2.entry_x, gradgraph.apply_symmetry(g, s).entry_x, rtol=1e-5,
                               atol=1e-6 * float(g.entry_x.abs().max()))
    net = GradMetaNet(8, 2, "node", 2).double()
    assert torch.isfinite(net(g)).all()


def test_hf_llama_permuting_rotated_dimensions_changes_the_function():
    """Negative: the permutation gradgraph refuses (two query and key dimensions of one head swapped alike,
    which would keep q.k without rotary) changes the output beyond the tolerance the symmetry above meets."""
    m = llama()
    x, _ = _batch(13)
    moved = gradgraph.apply_symmetry(m, _moving_symmetry(m, x))
    swap = torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])
    with torch.no_grad():
        for proj in ("q_proj", "k_proj"):
            w = getattr(moved.model.layers[0].self_attn, proj).weight
            w.copy_(w[swap])
    assert not torch.allclose(_logits(moved(x)), _logits(m(x)), rtol=1e-6, atol=1e-7)


class RotaryAttention(torch.nn.Module):
    """Hand-written rotary self-attention (sdpa), ``per_head``: q additionally scaled by a constant that differs
    across heads (then permuting heads would change the function)."""

    def __init__(self, d=8, heads=2, per_head=False):
        super().__init__()
        self.h, self.dh, self.per_head = heads, d // heads, per_head
        self.inp, self.q, self.k, self.v, self.o = (torch.nn.Linear(d if i else 3, d) for i in range(5))
        self.out = torch.nn.Linear(d, 2)

    def forward(self, x):
        b, T, _ = x.shape
        h = self.inp(x)
        q, k, v = (p(h).view(b, T, self.h, self.dh).transpose(1, 2) for p in (self.q, self.k, self.v))
        ang = torch.arange(T, dtype=x.dtype)[:, None] * torch.linspace(0.3, 1.0, self.dh // 2, dtype=x.dtype)
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

        def rotate(t):
            t1, t2 = t[..., :self.dh // 2], t[..., self.dh // 2:]
            return t * cos + torch.cat((-t2, t1), dim=-1) * sin
        q, k = rotate(q), rotate(k)
        if self.per_head:
            q = q * torch.arange(1, self.h + 1, dtype=x.dtype).view(1, self.h, 1, 1)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(self.o(a.transpose(1, 2).reshape(b, T, -1)) + h)


def test_rotary_keeps_head_permutations_and_a_per_head_constant_does_not():
    """Rotary embeddings written by hand: heads permute (the output kept to 1e-9, the graph transforms like
    the model), dims within a head do not. Negative: a constant that differs across heads fixes the heads, and
    moving heads there anyway changes the output."""
    torch.manual_seed(0)
    m = RotaryAttention().double()
    x, y = torch.randn(3, 5, 3, dtype=torch.float64), torch.randn(3, 5, 2, dtype=torch.float64)
    loss = lambda out, t: (out - t).pow(2).flatten(1).sum(1)  # noqa: E731
    g = check_model(m, x, y, loss)
    q = {s.key: s for s in g.spec.spaces}["q.out"]
    assert q.heads_permutable and q.within_heads is not None
    fixed = RotaryAttention(per_head=True).double()
    fixed.load_state_dict(m.state_dict())
    spec = model_spec(fixed, x)
    q = {s.key: s for s in spec.spaces}["q.out"]
    assert not q.heads_permutable
    s = gradgraph.random_symmetry(m, generator=torch.Generator().manual_seed(1), example_inputs=x)
    assert not torch.equal(s.perms["q.out"], torch.arange(8))  # this draw moves the heads of m
    s.spec = spec
    assert not _same_output(gradgraph.apply_symmetry(fixed, s), fixed, x)


def opt(proj: int = 8, before: bool = True, attn: str = "sdpa", tied: bool = True):
    cfg = transformers.OPTConfig(vocab_size=13, hidden_size=8, num_hidden_layers=2, ffn_dim=12, num_attention_heads=2,
                                 max_position_embeddings=16, word_embed_proj_dim=proj, do_layer_norm_before=before,
                                 dropout=0.0, attention_dropout=0.0, use_cache=False, pad_token_id=1,
                                 tie_word_embeddings=tied, attn_implementation=attn)
    torch.manual_seed(0)
    return transformers.OPTForCausalLM(cfg).double().eval()


OPT_CONFIGS = {"tied": {}, "post-norm": {"before": False}, "projected": {"proj": 6},
               "untied-eager": {"tied": False, "attn": "eager"}}


@pytest.mark.parametrize("cfg", list(OPT_CONFIGS), ids=list(OPT_CONFIGS))
def test_hf_opt(cfg):
    """OPT: a learned positional embedding (an nn.Embedding subclass whose forward computes the position ids,
    then looks up ids + 2 with super().forward: its own forward runs, the lookup is the embedding op), an MLP
    run on the activations flattened to [b*T, d] (the ops see [b, T, d], so they still run per sample), pre- or
    post-LayerNorm, project_in/project_out when word_embed_proj_dim != hidden_size, lm_head tied to
    embed_tokens (one parameter, two uses)."""
    kw = OPT_CONFIGS[cfg]
    m = opt(**kw)
    x, y = _batch(13)
    g = check_model(m, x, y, lm_loss)
    ops = {op.name: op for op in g.spec.ops}
    spaces = {s.key: s for s in g.spec.spaces}
    pos = ops["model.decoder.embed_positions"]
    assert pos.kind == "embedding" and spaces["model.decoder.embed_positions.vocab"].size == 16 + 2
    uses = [op.name for op in g.spec.ops
            if op.weight is not None and op.weight.name == "model.decoder.embed_tokens.weight"]
    tied = kw.get("tied", True)
    assert uses == (["model.decoder.embed_tokens", "lm_head"] if tied else ["model.decoder.embed_tokens"])
    assert ("lm_head.weight" in {p.name for p in g.spec.params}) != tied
    assert ("model.decoder.project_in" in ops) == ("model.decoder.project_out" in ops) == ("proj" in kw)
    for k in range(2):
        assert spaces[f"model.decoder.layers.{k}.fc1.out"].permutable  # the MLP behind reshape(-1, d)
        q = spaces[f"model.decoder.layers.{k}.self_attn.q_proj.out"]
        assert q.heads == 2 and q.heads_permutable
    # the position table's output joins the residual stream (project_in's output when projected), which permutes
    first = ops["model.decoder.project_in" if "proj" in kw else "model.decoder.embed_tokens"]
    stream = g.spec.layers[pos.out_layer].space
    assert stream == g.spec.layers[first.out_layer].space and g.spec.spaces[stream].permutable


def test_hf_opt_broken_symmetry_changes_the_function():
    """Negative: a permutation of the query/key space that swaps one dim of head 0 with one of head 1 (the same
    for q and k, so q.k summed over all dims is kept, but not the per-head scores) changes the output; so does
    moving the MLP's hidden units in fc1 without fc2."""
    m = opt(proj=6)
    x, _ = _batch(13)
    s = _moving_symmetry(m, x)
    s.perms["model.decoder.layers.0.self_attn.q_proj.out"] = torch.tensor([4, 1, 2, 3, 0, 5, 6, 7])
    assert not _same_output(gradgraph.apply_symmetry(m, s), m, x)
    moved = gradgraph.apply_symmetry(m, _moving_symmetry(m, x))
    with torch.no_grad():
        fc1 = moved.model.decoder.layers[1].fc1
        fc1.weight.copy_(fc1.weight.roll(1, 0))
        fc1.bias.copy_(fc1.bias.roll(1, 0))
    assert not _same_output(moved, m, x)


def test_hf_opt_attention_mask_is_refused_by_the_batch_wide_mask_check():
    """With an attention mask, OPT computes its position ids per sample (mask.cumsum(1), which the tracer
    follows), but Hugging Face's mask builder then decides whether to drop the mask from ``mask.sum() ==
    mask.numel()`` over the whole batch: data-dependent control flow on all samples, which gradgraph refuses
    (torch.func's vmap refuses it as well)."""
    m = opt()
    x, y = _batch(13)
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[1, :2] = 0
    with pytest.raises(gradgraph.SampleMixingError, match="reduces over the batch axis"):
        gradgraph.capture(m, {"input_ids": x, "attention_mask": mask}, y, lm_loss)
