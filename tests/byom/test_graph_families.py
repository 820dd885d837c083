"""Bring your own model, the graph half (issue 13): Hugging Face families whose attention or residual
the engine did not know, built from tiny configs with random weights (tests/models/zoo_factory.py).

Per family: the sites are found (heads, head_dim, the residual and its form); the traced,
canonicalized graph equals the Hugging Face model at another batch and length with padding; and one
drop_attention applied to the graph equals the Hugging Face model with that attention removed, the
reference computed in eager mode by a forward hook that makes the attention's output projection
return zeros. That is LLM-Drop's "drop the attention" (arXiv:2406.15786) in every form:

    sequential pre-norm (BLOOM, Swin)   h = x + F(n(x))              → x
    sandwich norm (Gemma 2/3, OLMo-2)   h = x + n'(F(n(x)))          → x        (n'(0) = 0: RMSNorm)
    post-norm (MPNet, DeBERTa-v2)       h = LN(x + F(x))             → LN(x)
    parallel (Falcon, GPT-NeoX, Phi)    h = x + (MLP(n(x)) + F(n(x))) → x + MLP(n(x))

A zero output projection is exactly "the attention sublayer contributes nothing" in each, and needs
nothing the analyzer found. Gemma 2 with logit soft-capping (tanh of the scores) stays refused, with
the reason. At the end, the written-out forms themselves on small hand-written modules: in-place
bias adds, scores folded as [B·H, T, T] and viewed as [B, H, T, T], a broadcast single K/V head, and
an in-place write that is left alone because a view aliases it.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewriter import graph as G
from rewriter import inspect, optimize
from rewriter.analyze import analyze
from rewriter.calibrate import Calibration
from rewriter.canonicalize import canonicalize, explain_unmatched, out_of_place
from rewriter.rule import Built, Candidate, get_rule
from rewriter.trace import restore, snapshot, trace

transformers = pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from zoo_factory import family  # noqa: E402

TOL = 1e-5   # fp32, max abs difference (outputs are O(1)-O(10))


@dataclass(frozen=True)
class Spec:
    impl: str              # attention implementation the family is traced with
    heads: tuple           # (heads, kv_heads, head_dim) of every site
    norm: str              # site.norm of every site
    form: str              # "sequential" | "parallel"
    branch_norm: bool      # a norm on the attention branch before the add (sandwich)
    drop: int              # the site dropped
    o_proj: str            # that site's output projection module (the reference zeroes its output)
    tags: frozenset = frozenset()   # tags every canonicalization record of the family carries


SPECS = {
    "gemma2": Spec("eager", (4, 2, 8), "pre", "sequential", True, 1, "model.layers.1.self_attn.o_proj",
                   frozenset({"gqa", "additive-mask"})),
    "gemma3": Spec("sdpa", (4, 2, 8), "pre", "sequential", True, 0, "model.layers.0.self_attn.o_proj"),
    "olmo2": Spec("sdpa", (4, 2, 8), "none", "sequential", True, 1, "model.layers.1.self_attn.o_proj"),
    "falcon": Spec("sdpa", (4, 1, 8), "pre", "parallel", False, 1, "transformer.h.1.self_attention.dense"),
    "falcon-eager": Spec("eager", (4, 1, 8), "pre", "parallel", False, 0,
                         "transformer.h.0.self_attention.dense", frozenset({"mqa", "div(scores)"})),
    # parallel in their default configs (use_parallel_residual / Phi's block): until this analyzer, the
    # drop rewired the block's final add and took the MLP with it
    "gpt_neox": Spec("sdpa", (4, 4, 8), "pre", "parallel", False, 1, "gpt_neox.layers.1.attention.dense"),
    "phi": Spec("sdpa", (4, 4, 8), "pre", "parallel", False, 1, "model.layers.1.self_attn.dense"),
    "swin": Spec("sdpa", (2, 2, 8), "pre", "sequential", False, 1,
                 "encoder.layers.0.blocks.1.attention.o_proj"),
    "mpnet": Spec("eager", (4, 4, 8), "post", "sequential", False, 1, "encoder.layer.1.attention.attn.o",
                  frozenset({"additive-mask"})),
    "bloom": Spec("eager", (4, 4, 8), "pre", "sequential", False, 0, "transformer.h.0.self_attention.dense",
                  frozenset({"baddbmm", "view(scores)", "view(probabilities)", "heads-unfolded"})),
    "deberta_v2": Spec("eager", (4, 4, 8), "post", "sequential", False, 1,
                       "encoder.layer.1.attention.output.dense",
                       frozenset({"bmm", "view(scores)", "view(probabilities)", "additive-mask",
                                  "masked_fill(finite)", "heads-unfolded"})),
}


def build(name: str) -> nn.Module:
    if name == "swin":   # two blocks per stage: stage 0's second block is the shifted (rolled) window
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return transformers.SwinModel(transformers.SwinConfig(
                image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                window_size=4)).eval()
    if name == "deberta_v2":   # with its disentangled biases: content→position and position→content
        cfg = family(name).config.to_dict() | dict(relative_attention=True, pos_att_type=["p2c", "c2p"],
                                                     position_buckets=16, max_relative_positions=-1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = transformers.DebertaV2Model(transformers.DebertaV2Config(**cfg)).eval()
        model.set_attn_implementation("eager")
        return model
    if name == "falcon-eager":   # Falcon reads the implementation from its config at run time
        model = family("falcon")
        model.config._attn_implementation = "eager"
        return model
    return family(name, attn_implementation=SPECS[name].impl)


def inputs(name: str, batch: int, length: int, seed: int = 0) -> dict:
    """Token ids with right padding in every row after the first (rows 1, 2 lose 2 and 4 tokens);
    for Swin, images."""
    g = torch.Generator().manual_seed(seed)
    if name == "swin":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, pad in ((1, 2), (2, 4)):
        if row < batch:
            mask[row, length - pad:] = 0
    return {"input_ids": torch.randint(3, 128, (batch, length), generator=g), "attention_mask": mask}


def main(out) -> torch.Tensor:
    return out["logits"] if "logits" in out else out["last_hidden_state"]


def traced(name: str, model: nn.Module):
    from rewriter.models import wrap_module
    io = wrap_module(model)
    gm = trace(model, (), inputs(name, 2, 8), io=io)
    records = canonicalize(gm)
    G.clean(gm)
    return gm, records, analyze(gm, mask_inputs=io.mask_inputs())


@pytest.fixture(scope="module", params=list(SPECS))
def fam(request):
    name = request.param
    model = build(name)
    gm, records, sites = traced(name, model)
    return name, model, gm, records, sites


def _sdpa_count(gm) -> int:
    return sum(n.target is G.SDPA for n in gm.graph.nodes)


def test_sites_found(fam):
    name, model, gm, records, sites = fam
    spec = SPECS[name]
    n_layers = sum(getattr(model.config, "depths", None) or [model.config.num_hidden_layers])
    assert len(sites) == _sdpa_count(gm) == n_layers and explain_unmatched(gm) == []
    for s in sites:
        heads = spec.heads if name != "swin" else (model.config.num_heads[0 if s.index < 2 else 1], None, 8)
        assert (s.heads, s.head_dim) == (heads[0], heads[2]), s
        assert heads[1] is None or s.kv_heads == heads[1]
        assert s.o_proj and s.q_proj and s.residual_add and s.residual_input, s.extra["notes"]
        assert s.norm == spec.norm, (s.index, s.norm)
        r = s.extra["residual"]
        assert r["form"] == spec.form and bool(r["branch_norm"]) == spec.branch_norm, r
        add = G.node(gm, s.residual_add)
        assert {a.name for a in add.args[:2]} == {s.branch_output, s.residual_input}
        merge = G.node(gm, r["merge"])
        assert {a.name for a in merge.args[:2]} == {r["merge_branch"], r["merge_other"]}
        # the MLP branch a parallel attention merges with is computed from the same input stream
        assert (r["merge"] != s.residual_add) == (spec.form == "parallel")
    assert sites[spec.drop].o_weight == spec.o_proj + ".weight"
    if spec.tags:   # written out in eager mode: every attention raised, each with the family's form
        assert len(records) == len(sites)
        assert all(spec.tags <= set(r["form"].split("+")) for r in records), [r["form"] for r in records]
    if name == "swin":   # the shifted window block: its input is rolled before the window partition
        rolled = G.node(gm, sites[1].extra["proj_input"])
        assert any(G.is_op(n, torch.ops.aten.roll) for n in _ancestors(rolled, 12))


def _ancestors(n, depth):
    out, frontier = [], [n]
    for _ in range(depth):
        frontier = [a for m in frontier for a in m.all_input_nodes]
        out += frontier
    return out


def test_exact_at_another_batch_and_length(fam):
    """Traced at batch 2 × 8 tokens, compared at batch 3 × 11 with two padded rows (Swin: batch 3)."""
    name, model, gm, _, _ = fam
    x = inputs(name, 3, 11, seed=1)
    with torch.no_grad():
        want, got = main(model(**x)), main(gm(**x))
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= TOL


def _zeroed(model: nn.Module, module: str):
    """The model with `module`'s output replaced by zeros: the attention sublayer contributes nothing."""
    return dict(model.named_modules())[module].register_forward_hook(lambda m, i, out: torch.zeros_like(out))


def test_drop_equals_attention_removed(fam):
    name, model, gm, _, sites = fam
    spec = SPECS[name]
    site = sites[spec.drop]
    rule = get_rule("drop_attention")
    opts = rule.options()
    c = Candidate((site,))
    assert rule.check(c, opts) is None
    before = _sdpa_count(gm)
    snap = snapshot(gm)   # the graph is the module's fixture: put it back afterwards
    try:
        rule.apply(gm, c, Built(), opts)
        params = dict(gm.named_parameters())
        assert _sdpa_count(gm) == before - 1
        assert not any(w in params for w in (site.q_weight, site.k_weight, site.v_weight, site.o_weight))
        if spec.form == "parallel":   # the MLP branch stays
            assert any(".mlp." in p and f".{site.layer}." in p for p in params)
        x = inputs(name, 3, 11, seed=2)
        hook = _zeroed(model, spec.o_proj)
        try:
            with torch.no_grad():
                want = main(model(**x))
        finally:
            hook.remove()
        with torch.no_grad():
            got, full = main(gm(**x)), main(model(**x))
        assert (got - want).abs().max().item() <= TOL
        assert (full - want).abs().max().item() > 100 * TOL     # the attention did matter
    finally:
        restore(gm, snap)


def test_drop_self_then_cross_attention_of_one_block():
    """Whisper's pre-norm decoder: the cross-attention reads the stream at its block's self-attention
    residual add, which dropping the self-attention first erases. Both drops apply, one after the
    other, and equal the model with both output projections returning zeros."""
    from rewriter.models import wrap_module
    model = family("whisper")
    io = wrap_module(model)
    gm = trace(model, (), io.inputs_fn(2, 8, 0), io=io)
    canonicalize(gm)
    G.clean(gm)
    sites = [s for s in analyze(gm, mask_inputs=io.mask_inputs()) if s.module.startswith("decoder.layers.0.")]
    assert [s.module for s in sites] == ["decoder.layers.0.self_attn", "decoder.layers.0.encoder_attn"]
    assert sites[1].residual_input == sites[0].residual_add     # the stale name the second drop meets
    rule = get_rule("drop_attention")
    for s in sites:
        rule.apply(gm, Candidate((s,)), Built(), rule.options())
    x = io.inputs_fn(3, 11, 1)
    hooks = [_zeroed(model, f"decoder.layers.0.{a}.out_proj") for a in ("self_attn", "encoder_attn")]
    try:
        with torch.no_grad():
            want = main(model(**x))
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        assert (main(gm(**x)) - want).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["falcon", "gemma2"])
def test_drop_through_optimize(name):
    """optimize() end to end on a parallel (Falcon) and a sandwich-norm (Gemma 2) family: LLM-Drop's
    importance is measured, the drop of layer 1 is applied, and the result equals the HF model with
    that attention removed."""
    model = build(name)
    batches = [inputs(name, 3, 12, seed=s) for s in range(3)]
    calib = Calibration(batches=batches[:2], heldout=batches[2:], source="random", samples=6, seq_len=12)
    recipe = {"gate": {"metric": "relative_rms", "max": 10.0},
              "steps": [{"drop_attention": {"layers": [1], "max_applied": 1}}]}
    opt = optimize(model, recipe, calibration=calib, example_inputs=inputs(name, 2, 8),
                   progress=False, measure_latency=False)
    (rec,) = [r for r in opt.report.records if r.status == "applied"]
    assert rec.rule == "drop_attention" and 0 < rec.info["importance"] < 1
    x = inputs(name, 3, 11, seed=4)
    hook = _zeroed(model, SPECS[name].o_proj)      # layer 1's
    try:
        with torch.no_grad():
            want = main(model(**x))
    finally:
        hook.remove()
    with torch.no_grad():
        assert (main(opt(**x)) - want).abs().max().item() <= TOL


def test_gemma2_softcap_stays_refused_with_reason():
    """Logit soft-capping (cap·tanh(s/cap)) is not scaling or masking: SDPA cannot express it."""
    cfg = family("gemma2").config.to_dict() | {"attn_logit_softcapping": 50.0}   # Gemma 2's default
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**cfg)).eval()
    assert model.config._attn_implementation == "eager"
    x = inputs("gemma2", 2, 8)
    sites = inspect(model, x)
    assert len(sites) == 0 and len(sites.notes) == 2
    assert all("aten.tanh" in n and "soft-capping" in n and "model.layers." in n
               for n in sites.notes), sites.notes
    with pytest.raises(ValueError, match="soft-capping"):
        optimize(model, {"steps": [{"drop_attention": {}}]}, example_inputs=x,
                 calibration=Calibration(batches=[x], heldout=[x], source="random", samples=2, seq_len=8),
                 progress=False, measure_latency=False)


# ---- the forms, hand-written ---------------------------------------------------------------------

def _export(module, *args):
    return torch.export.export(module.eval(), args, strict=False).module()


def _raised(module, *args):
    gm = _export(module, *args)
    want = gm(*args)
    records = canonicalize(gm)
    assert (gm(*args) - want).abs().max().item() <= TOL
    return gm, records


def test_inplace_bias_add_is_raised():
    """scores += bias (MPNet's relative position bias), scores /= sqrt(d) (Falcon): raised exactly."""
    bias = torch.randn(1, 2, 6, 6)

    class M(nn.Module):
        def forward(self, q, k, v):
            s = q @ k.transpose(-1, -2)
            s /= 8 ** 0.5
            s += bias
            return torch.softmax(s, -1) @ v

    q, k, v = (torch.randn(3, 2, 6, 8) for _ in range(3))
    gm, (rec,) = _raised(M(), q, k, v)
    assert "additive-mask" in rec["form"] and rec["scale"] == pytest.approx(8 ** -0.5)
    assert not any(G.is_op(n, torch.ops.aten.add_, torch.ops.aten.div_) for n in gm.graph.nodes)


def test_inplace_write_through_a_view_is_left_alone():
    """A view taken before the write sees it: rewriting the write out of place would change that
    view's value, so the pass leaves it (and the model's output stays what it was)."""
    class M(nn.Module):
        def forward(self, x):
            y = x * 2
            alias = y.view(-1)
            y.add_(1)
            return alias.sum() + y.sum()

    x = torch.randn(4, 3)
    gm = _export(M(), x)
    want = gm(x)
    assert out_of_place(gm) == 0 and gm(x) == want


class _FoldedHeads(nn.Module):
    """BLOOM's layout: [B·H, T, D] products through baddbmm with an ALiBi-style bias, scores viewed
    as [B, H, T, T] for a padding mask, fp32 softmax cast back, probabilities folded again."""

    def __init__(self, h=4, d=8):
        super().__init__()
        self.h, self.d = h, d

    def forward(self, q, k, v, alibi, mask):
        b = mask.shape[0]
        s = alibi.baddbmm(q, k.transpose(-1, -2), beta=1.0, alpha=self.d ** -0.5)
        s = s.view(b, self.h, q.shape[1], -1) + mask
        p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.bmm(p.view(b * self.h, q.shape[1], -1), v)


def test_folded_scores_viewed_per_head_are_raised():
    b, h, t = 2, 4, 6
    q, k, v = (torch.randn(b * h, t, 8) for _ in range(3))
    alibi = torch.randn(b * h, 1, t)
    mask = torch.zeros(b, 1, t, t)
    mask[1, ..., -2:] = float("-inf")
    gm, (rec,) = _raised(_FoldedHeads(), q, k, v, alibi, mask)
    assert {"baddbmm", "view(scores)", "view(probabilities)", "heads-unfolded"} <= set(rec["form"].split("+"))
    (sd,) = [n for n in gm.graph.nodes if n.target is G.SDPA]
    assert len(G.shape(sd)) == 4 and G.shape(sd)[1] == h


def test_folded_probabilities_without_unfolded_scores_are_refused():
    class M(nn.Module):
        def forward(self, q, k, v):
            s = q @ k.transpose(-1, -2)                       # [B, H, T, T] throughout
            return torch.bmm(torch.softmax(s, -1).view(-1, 6, 6), v)

    q, k = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    gm = _export(M(), q, k, torch.randn(8, 6, 8))
    assert canonicalize(gm) == []
    (why,) = explain_unmatched(gm)
    assert "folded from 4 heads" in why


def test_one_broadcast_kv_head_is_multi_query():
    """[B, H, T, D] queries against one K/V head that the products broadcast (Falcon's multi-query
    attention in eager mode) become SDPA with enable_gqa and one kv head."""
    class M(nn.Module):
        def forward(self, q, k, v):
            return torch.softmax(q @ k.transpose(-1, -2) * 0.3, -1) @ v

    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 1, 6, 8), torch.randn(2, 1, 6, 8)
    gm, (rec,) = _raised(M(), q, k, v)
    assert rec["enable_gqa"] and "mqa" in rec["form"].split("+")
