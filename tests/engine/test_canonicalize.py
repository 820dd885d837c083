"""Canonicalization raises every written-out attention to one exact SDPA node.

Covers the reference models (every style, pre- and post-norm, padded and causal inputs), HF
BERT / GPT-2 / Llama with attn_implementation="eager" against "sdpa", focused variants
(where + finfo.min on a causal buffer, exp/sum without max, scales on q and k, a symbolic
scale, repeat_interleave GQA, triu masks, an fp32 upcast in bf16), and the refusals with
their reasons (output_attentions=True, live dropout, softmax over the query axis, scores
used elsewhere)."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.export import Dim

from rewriter.canonicalize import canonicalize, explain_unmatched
from rewriter.graph import SDPA, sdpa_args
from rewriter.models.reference import REFERENCE_STYLES, build_reference

transformers = pytest.importorskip("transformers")

TOL = 1e-5  # fp32: max abs diff between the traced module before and after canonicalization
SOFTMAX_OPS = {torch.ops.aten.softmax.int, torch.ops.aten._softmax.default, torch.ops.aten.exp.default}


def trace(model, kwargs):
    dyn = {k: ({0: Dim.AUTO, 1: Dim.AUTO} if isinstance(v, torch.Tensor) and v.dim() == 2 else
               {i: Dim.AUTO for i in (0, 2)} if isinstance(v, torch.Tensor) else None)
           for k, v in kwargs.items()}
    return torch.export.export(model, (), kwargs, strict=False, dynamic_shapes=dyn).module()


def sdpa_nodes(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is SDPA]


def leftover_softmax(gm):
    return [n.name for n in gm.graph.nodes if n.op == "call_function" and n.target in SOFTMAX_OPS]


def first(out):
    if isinstance(out, torch.Tensor):
        return out
    return out["logits"] if "logits" in out else out["last_hidden_state"]


def padded_batch(vocab=97, B=3, T=11, pad=True):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    am = torch.ones(B, T, dtype=torch.long)
    am[1, 7:] = 0   # real right padding
    am[2, 4:] = 0
    return {"input_ids": ids, "attention_mask": am} if pad else {"input_ids": ids}


def canonicalize_and_compare(model, kwargs):
    gm = trace(model, kwargs)
    before = first(gm(**kwargs)).detach()
    records = canonicalize(gm)
    after = first(gm(**kwargs)).detach()
    diff = (after - before).abs().max().item()
    assert diff <= TOL, f"canonicalization changed the outputs by {diff:.3g} (> {TOL})"
    # the graph still runs at another batch and sequence size (dynamic shapes survived)
    other = {k: v[:2, :6] for k, v in kwargs.items()}
    assert first(gm(**other)).shape[:2] == (2, 6)
    return gm, records


# ---------------------------------------------------------------- reference models

FORMS = {
    "matmul_div": "matmul+div(scores)+additive-mask+softmax+dropout(eval)",
    "bmm_folded": "baddbmm+scale(q/k)+additive-mask+softmax+dropout(eval)+bmm(pv)+heads-unfolded",
    "einsum": "einsum+scale(q/k)+additive-mask+softmax+dropout(eval)+einsum(pv)",
    "masked_fill_causal": "matmul+mul(scores)+masked_fill(-inf)+causal-tril+softmax+dropout(eval)",
    "masked_fill_1e9": "matmul+div(scores)+masked_fill(finite)+softmax+dropout(eval)",
    "manual_softmax": "matmul+mul(scores)+additive-mask+manual-softmax+dropout(eval)",
    "fp32_softmax": "matmul+div(scores)+additive-mask+softmax+dropout(eval)",
}


@pytest.mark.parametrize("style", REFERENCE_STYLES)
def test_reference_style_padded(style):
    model = build_reference(style)
    gm, records = canonicalize_and_compare(model, padded_batch())
    n_layer = model.config.n_layer
    assert len(sdpa_nodes(gm)) == n_layer
    assert leftover_softmax(gm) == []
    assert len(records) == (0 if style == "sdpa" else n_layer)
    assert {r["form"] for r in records} == ({FORMS[style]} if records else set())
    for r, n in zip(records, sdpa_nodes(gm)):
        assert r["node"] == n.name and r["module"] == f"blocks.{records.index(r)}.attn"
        assert n.meta["nn_module_stack"] and tuple(n.meta["val"].shape[1:]) == (4, n.meta["val"].shape[2], 16)
        assert sdpa_args(n)["attn_mask"] is not None and sdpa_args(n)["scale"] == pytest.approx(0.25)
    assert explain_unmatched(gm) == []


@pytest.mark.parametrize("style", ["matmul_div", "masked_fill_causal", "masked_fill_1e9", "manual_softmax"])
def test_reference_style_causal_becomes_is_causal(style):
    """A tril/triu causal mask that is the only mask becomes is_causal=True, exactly."""
    model = build_reference(style, causal=True)
    gm, records = canonicalize_and_compare(model, padded_batch(pad=False))
    assert [sdpa_args(n)["is_causal"] for n in sdpa_nodes(gm)] == [True, True]
    assert all(sdpa_args(n)["attn_mask"] is None for n in sdpa_nodes(gm))
    assert all("causal" in r["form"].split("+") for r in records)


@pytest.mark.parametrize("style", ["masked_fill_causal", "bmm_folded"])
def test_reference_causal_with_padding_post_norm(style):
    """Causal + padding stays an attn_mask (not is_causal); post-norm blocks."""
    model = build_reference(style, causal=True, norm="post", n_layer=3)
    gm, records = canonicalize_and_compare(model, padded_batch())
    assert len(records) == 3 and leftover_softmax(gm) == []
    assert not any(sdpa_args(n)["is_causal"] for n in sdpa_nodes(gm))


# ---------------------------------------------------------------- HF models, eager vs sdpa

def hf_model(family, impl, **extra):
    torch.manual_seed(0)
    if family == "bert":
        cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=128, attn_implementation=impl, **extra)
        return transformers.BertModel(cfg).eval()
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, bos_token_id=0,
                                      eos_token_id=0, use_cache=False, attn_implementation=impl, **extra)
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=128, vocab_size=100, use_cache=False,
                                   attn_implementation=impl, **extra)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_hf_eager_matches_sdpa(family):
    batch = padded_batch(vocab=100)
    gm, records = canonicalize_and_compare(hf_model(family, "eager"), batch)
    ref = trace(hf_model(family, "sdpa"), batch)
    assert len(records) == len(sdpa_nodes(gm)) == len(sdpa_nodes(ref)) == 2
    assert leftover_softmax(gm) == [] and explain_unmatched(gm) == []
    for ours, theirs in zip(sdpa_nodes(gm), sdpa_nodes(ref)):
        a, b = sdpa_args(ours), sdpa_args(theirs)
        assert a["scale"] == pytest.approx(b["scale"] if b["scale"] is not None else 16 ** -0.5)
        assert a["is_causal"] == b["is_causal"] and (a["attn_mask"] is None) == (b["attn_mask"] is None)
        assert ours.meta["nn_module_stack"] == theirs.meta["nn_module_stack"]
        assert ours.meta["val"].shape[1:2] == theirs.meta["val"].shape[1:2]
    if family == "llama":   # GQA: the un-repeated K/V (2 kv heads) with enable_gqa=True
        for n in sdpa_nodes(gm):
            assert sdpa_args(n)["enable_gqa"] and sdpa_args(n)["key"].meta["val"].shape[1] == 2


def test_hf_output_attentions_is_refused():
    model = hf_model("bert", "eager")
    batch = dict(padded_batch(vocab=100), output_attentions=True)
    gm = torch.export.export(model, (), batch, strict=False).module()
    assert canonicalize(gm) == []
    reasons = explain_unmatched(gm)
    assert len(reasons) == 2
    assert all("encoder.layer." in r and "returned as a model output (e.g. output_attentions=True)" in r
               for r in reasons), reasons


def test_live_dropout_is_refused():
    model = build_reference("matmul_div", dropout=0.1).train()
    gm = trace(model, padded_batch())
    assert canonicalize(gm) == [] and sdpa_nodes(gm) == []
    reasons = explain_unmatched(gm)
    assert len(reasons) == 2 and all("live (p=0.1, train=True)" in r for r in reasons), reasons


# ---------------------------------------------------------------- focused variants on q, k, v

class Attn(nn.Module):
    """forward(q, k, v) with q, k, v: (B, H, T, D), attention written by `fn`."""

    def __init__(self, fn, T=16):
        super().__init__()
        self.fn = fn
        self.register_buffer("tril", torch.tril(torch.ones(T, T, dtype=torch.bool)).view(1, 1, T, T))
        self.register_buffer("triu", torch.triu(torch.ones(T, T), diagonal=1))
        self.temperature = nn.Parameter(torch.tensor(0.7))

    def forward(self, q, k, v):
        return self.fn(self, q, k, v)


def where_finfo_min_buffer(self, q, k, v):  # GPT-2 legacy: where(bias, w, finfo.min)
    T = q.size(-2)
    w = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], v.size(-1) ** 0.5)
    w = torch.where(self.tril[:, :, :T, :T], w, torch.full([], torch.finfo(w.dtype).min))
    return torch.matmul(nn.functional.softmax(w, dim=-1), v)


def exp_over_sum_no_max(self, q, k, v):
    s = q @ k.transpose(-2, -1) * 0.25
    e = torch.exp(s)
    return (e / e.sum(-1, keepdim=True)) @ v


def scales_on_q_and_k(self, q, k, v):  # whisper-style d^-0.25 on both
    d = q.size(-1)
    return F.softmax((q * d ** -0.25) @ (k.transpose(-1, -2) * d ** -0.25), -1) @ v


def symbolic_scale(self, q, k, v):  # sqrt of the (dynamic) length and a learned temperature
    s = q @ k.transpose(-2, -1) / torch.full([], q.size(-2), dtype=q.dtype).sqrt() * self.temperature
    return s.softmax(-1) @ v


def repeat_interleave_gqa(self, q, k, v):
    k, v = k[:, :2].repeat_interleave(2, dim=1), v[:, :2].repeat_interleave(2, dim=1)
    return F.softmax(q @ k.transpose(-2, -1) * 0.25, dim=-1) @ v


def triu_buffer_masked_fill(self, q, k, v):
    T = q.size(-2)
    s = (q @ k.mT).masked_fill(self.triu[:T, :T].bool(), float("-inf")) * 0.25
    return s.softmax(-1) @ v


def float_mask_masked_fill(self, q, k, v):
    keep = (torch.arange(q.size(-2)) % 3 != 1).float()  # a float 0/1 mask, made bool by == 0
    s = (q @ k.mT * 0.25).masked_fill(keep[None, None, None, :] == 0, torch.finfo(q.dtype).min)
    return s.softmax(-1) @ v


VARIANTS = {  # fn -> (expected is_causal, expected scale)
    where_finfo_min_buffer: (True, 0.25),
    exp_over_sum_no_max: (False, 0.25),
    scales_on_q_and_k: (False, 0.25),
    symbolic_scale: (False, 1.0),
    repeat_interleave_gqa: (False, 0.25),
    triu_buffer_masked_fill: (True, 0.25),
    float_mask_masked_fill: (False, 0.25),
}


@pytest.mark.parametrize("fn", list(VARIANTS), ids=lambda f: f.__name__)
def test_variant(fn):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 16, generator=g) for _ in range(3))
    gm = torch.export.export(Attn(fn), (q, k, v), strict=False,
                             dynamic_shapes=[{0: Dim.AUTO, 2: Dim.AUTO}] * 3).module()
    before = gm(q, k, v)
    records = canonicalize(gm)
    after = gm(q, k, v)
    assert len(records) == 1 and leftover_softmax(gm) == [], explain_unmatched(gm)
    assert (after - before).abs().max().item() <= TOL
    q2, k2, v2 = (t[:1, :, :5] for t in (q, k, v))  # another batch and length: still exact
    assert (gm(q2, k2, v2) - Attn(fn)(q2, k2, v2)).abs().max().item() <= TOL
    (n,) = sdpa_nodes(gm)
    causal, scale = VARIANTS[fn]
    assert sdpa_args(n)["is_causal"] == causal and sdpa_args(n)["scale"] == pytest.approx(scale)
    assert sdpa_args(n)["enable_gqa"] == (fn is repeat_interleave_gqa)


def test_fp32_upcast_in_bf16():
    """softmax(x.float()).to(bf16): the casts are part of the pattern; SDPA runs in bf16."""
    model = build_reference("fp32_softmax").to(torch.bfloat16)
    batch = padded_batch()
    gm = trace(model, batch)
    before = gm(**batch).float()
    records = canonicalize(gm)
    after = gm(**batch).float()
    assert len(records) == 2 and "upcast" in records[0]["form"].split("+")
    fp32 = build_reference("fp32_softmax")(**batch)
    # both bf16 graphs are as far from the fp32 model as bf16 rounding makes them, no further
    assert (after - fp32).abs().max() <= 2 * (before - fp32).abs().max() + 1e-2


def test_refusals_name_the_reason():
    def query_axis(self, q, k, v):
        return F.softmax(q @ k.mT, dim=-2) @ v

    def scores_reused(self, q, k, v):
        s = q @ k.mT * 0.25
        return s.softmax(-1) @ v + s.mean()

    q = torch.randn(2, 4, 9, 16)
    for fn, reason in [(query_axis, "not the key axis"), (scores_reused, "attention scores (mul")]:
        gm = torch.export.export(Attn(fn), (q, q.clone(), q.clone()), strict=False).module()
        assert canonicalize(gm) == []
        (msg,) = explain_unmatched(gm)
        assert reason in msg, msg


class _OddScores(torch.nn.Module):
    """Written-out attention with a 1-D keep mask over the keys, or scores rounded through int32."""

    def __init__(self, mode: str):
        super().__init__()
        self.mode = mode

    def forward(self, q, k, v, keep):
        s = q @ k.transpose(-1, -2) / 4.0
        s = torch.where(~keep, -1e9, s) if self.mode == "1d-mask" else s.to(torch.int32).to(torch.float32)
        return torch.softmax(s, -1) @ v


def test_a_1d_key_mask_is_raised_exactly_and_int_scores_are_refused_with_a_reason():
    """Neither crashes canonicalize: a [Tk] mask broadcasts into SDPA, integer scores are explained."""
    from rewriter.trace import trace as export
    q, keep = torch.randn(2, 3, 5, 8), torch.tensor([True] * 4 + [False])
    m = _OddScores("1d-mask")
    gm = export(m, (q, q, q, keep))
    assert [r["form"] for r in canonicalize(gm)] == ["matmul+div(scores)+where(finite)+softmax"]
    torch.testing.assert_close(gm(q, q, q, keep), m(q, q, q, keep), rtol=1e-5, atol=1e-5)
    gm = export(_OddScores("int"), (q, q, q, keep))
    assert canonicalize(gm) == []
    (why,) = explain_unmatched(gm)
    assert "holds the scores as torch.int32" in why


def test_a_dead_user_of_the_probabilities_blocks_no_match():
    """nn.MultiheadAttention (need_weights=True, eval) also averages its probabilities over heads
    for weights nobody reads; straight from torch.export that dead mean is a second user of the
    softmax. canonicalize removes dead code first, so the attention is still raised, exactly."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.mha(x, x, x)[0]

    torch.manual_seed(0)
    m, x = M().eval(), torch.randn(2, 5, 8)
    gm = torch.export.export(m, (x,)).module()
    recs = canonicalize(gm)
    assert len(recs) == 1 and sum(n.target is torch.ops.aten.scaled_dot_product_attention.default
                                  for n in gm.graph.nodes) == 1
    with torch.no_grad():
        assert torch.allclose(gm(x), m(x), atol=1e-6)
