"""block_routing (BiFormer, arXiv:2303.08125) and kmeans_routing (Routing Transformer,
arXiv:2003.05997): exact at their exact settings on real models (padding and causal+GQA),
fire at sparse settings, refuse arbitrary masks with the reason, roll back under a strict
gate with the model bit-identical, and survive save → load."""
import pytest
import torch
import torch.nn as nn

from rewriter import graph as G
from rewriter import inspect, load, optimize
from rewriter.calibrate import Calibration
from rewriter.kernels.block_sparse_attention import dense_block_mask
from rewriter.models import main_output as main_tensor
from rewriter.kernels.routed_attention import block_routing as R

SDPA = torch.ops.aten.scaled_dot_product_attention.default
CAL = {"samples": 16, "seq_len": 32, "batch_size": 8, "heldout": 8}


def _recipe(*steps, **gate):
    return {"calibration": CAL, "gate": gate or {"metric": "relative_rms", "max": 10.0}, "steps": list(steps)}


def _run(model, *steps, **gate):
    return optimize(model, _recipe(*steps, **gate), progress=False, measure_latency=False)


def _applied(opt, rule):
    return [r for r in opt.report.records if r.status == "applied" and r.rule == rule]


def _padded_llama_batch(loaded):
    """Two rows of real text, the second right-padded: exercises causal + padding keys."""
    b = loaded.example_inputs(batch=2, seq_len=29)
    b["attention_mask"][1, 20:] = 0
    return b


@torch.no_grad()
def _assert_same(loaded, opt, batch, atol):
    y0, y = main_tensor(loaded.model(**batch)), main_tensor(opt(**batch))
    m = batch["attention_mask"].bool()
    assert (y0 - y)[m].abs().max().item() <= atol * y0[m].abs().max().item()


# ---- exact settings -----------------------------------------------------------------------------

def test_block_routing_all_blocks_is_sdpa_on_minilm(minilm):
    """top-k ≥ number of blocks lists every block: the rewritten MiniLM equals the original."""
    opt = _run(minilm, {"block_routing": {"block_size": 8, "topk": 1000}})
    assert len(_applied(opt, "block_routing")) == 6
    assert not any(n.target is SDPA for n in opt.graph_module.graph.nodes)
    routed = [n for n in opt.graph_module.graph.nodes if n.target is R.block_routed_attention]
    assert len(routed) == 6 and all(n.meta["rewriter"]["rule"] == "block_routing" for n in routed)
    _assert_same(minilm, opt, minilm.example_inputs(batch=3, seq_len=40), atol=1e-5)


def test_block_routing_all_blocks_exact_causal_gqa_padded():
    from rewriter.models import load_model
    llama = load_model("llama")
    opt = _run(llama, {"block_routing": {"block_size": 4, "topk": 1000}})
    assert len(_applied(opt, "block_routing")) == 4
    _assert_same(llama, opt, _padded_llama_batch(llama), atol=1e-5)


def test_kmeans_one_cluster_is_sdpa(minilm):
    """One cluster holding every token, no local block: exact attention, causal and padded."""
    opt = _run(minilm, {"kmeans_routing": {"clusters": 1, "window": 64, "local": False}})
    assert len(_applied(opt, "kmeans_routing")) == 6
    _assert_same(minilm, opt, minilm.example_inputs(batch=3, seq_len=40), atol=1e-5)


def test_kmeans_one_cluster_exact_causal_gqa_padded():
    from rewriter.models import load_model
    llama = load_model("llama")
    opt = _run(llama, {"kmeans_routing": {"clusters": 1, "window": 64, "local": False}})
    _assert_same(llama, opt, _padded_llama_batch(llama), atol=1e-5)


# ---- sparse settings fire ---------------------------------------------------------------------

def test_block_routing_sparse_fires_and_mass_picks_topk(minilm):
    opt = _run(minilm, {"block_routing": {"block_size": 4, "mass": 0.9, "layers": "0-1"}},
               metric="embedding_cosine", min=0.95)
    recs = _applied(opt, "block_routing")
    assert len(recs) == 2
    for r in recs:
        curve = r.built["mass_curve"]
        k = int(r.built["topk"])
        assert torch.all(curve[1:] >= curve[:-1] - 1e-6)          # more blocks hold more mass
        assert abs(float(curve[-1]) - 1.0) < 1e-4                  # all blocks hold all of it
        assert curve[k] >= 0.9 and (k == 0 or curve[k - 1] < 0.9)  # the smallest k reaching the target
    assert opt.report.heldout["value"] > 0.95
    assert str(opt.report.flops_after) != str(opt.report.flops_before)


def test_route_blocks_sinks_follow_padding():
    """Sinks are per sample: the first real token's block and the last real token's block (SEP)."""
    q, k = torch.randn(2, 1, 16, 8), torch.randn(2, 1, 16, 8)
    km = torch.ones(2, 16, dtype=torch.bool)
    km[0, 11:] = False                       # right padding: last real token in block 2 (of 4-token blocks)
    km[1, :5] = False                        # left padding: first real token in block 1
    table = R.route_blocks(q, k, km, block_size=4, topk=0, sinks=("first", "last"))
    rows = [[set(r.tolist()) - {-1} for r in table[b, 0]] for b in range(2)]
    assert rows[0] == [{0, 2}, {0, 1, 2}, {0, 2}, {0, 2}]   # block 3 is all padding: never listed
    assert rows[1] == [{1, 3}, {1, 3}, {1, 2, 3}, {1, 3}]   # block 0 is all padding: never listed


def test_route_blocks_causal_previous_block():
    """Causal rows list only blocks ≤ the query block; "previous" adds the block just before."""
    q, k = torch.randn(1, 2, 20, 8), torch.randn(1, 2, 20, 8)
    table = R.route_blocks(q, k, None, block_size=4, topk=0, causal=True, sinks=("first", "previous"))
    for h in range(2):
        rows = [set(r.tolist()) - {-1} for r in table[0, h]]
        assert rows == [{0}, {0, 1}, {0, 1, 2}, {0, 2, 3}, {0, 3, 4}]
    full = R.route_blocks(q, k, None, block_size=4, topk=2, causal=True, sinks=())
    assert all(max(set(r.tolist()) - {-1}) == i for i, r in enumerate(full[0, 0]))   # never a future block


def test_kmeans_fires_with_fitted_unit_centroids(minilm):
    opt = _run(minilm, {"kmeans_routing": {"layers": [0]}}, metric="embedding_cosine", min=0.9)
    (r,) = _applied(opt, "kmeans_routing")
    c = r.built["centroids"]
    assert c.shape == (12, 6, 32)            # ≈ √32 clusters per head at the 32-token calibration length
    assert torch.allclose(c.norm(dim=-1), torch.ones(12, 6), atol=1e-5)
    assert int(r.built["window"]) == 6 and int(r.built["local_block"]) == 6


# ---- refusals, rollback, save/load --------------------------------------------------------------

class WindowMasked(nn.Module):
    """Attention with a fixed sliding-window mask buffer: an 'arbitrary' mask."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(32, 96), nn.Linear(32, 32)
        i = torch.arange(12)
        self.register_buffer("window", (i[:, None] - i[None, :]).abs() <= 2)

    def forward(self, x):
        q, k, v = self.qkv(x).view(x.shape[0], x.shape[1], 3, 4, 8).permute(2, 0, 3, 1, 4)
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.window)
        return x + self.out(y.transpose(1, 2).reshape(x.shape))


@pytest.mark.parametrize("rule", ["block_routing", "kmeans_routing"])
def test_refuses_arbitrary_mask_with_reason(rule):
    m = WindowMasked().eval()
    xs = [{"x": torch.randn(2, 12, 32)} for _ in range(2)]
    assert inspect(m, xs[0])[0].mask == "arbitrary"
    calib = Calibration(batches=xs, heldout=xs[:1], source="random", samples=4, seq_len=12)
    opt = optimize(m, {"gate": {"metric": "relative_rms", "max": 1.0}, "steps": [{rule: {}}]},
                   calibration=calib, progress=False, measure_latency=False)
    (r,) = opt.report.records
    assert r.status == "rejected" and "neither causal nor padding-only" in r.reason


def test_gate_rolls_back_and_model_is_bit_identical(minilm):
    opt = _run(minilm, {"block_routing": {"block_size": 2, "topk": 0, "sinks": []}},
               metric="embedding_cosine", min=0.99999)
    assert [r.status for r in opt.report.records] == ["rolled_back"] * 6
    assert all(r.reason.startswith("gate: embedding_cosine") for r in opt.report.records)
    assert sum(n.target is SDPA for n in opt.graph_module.graph.nodes) == 6
    b = minilm.example_inputs(batch=2, seq_len=24)
    with torch.no_grad():
        assert torch.equal(main_tensor(opt(**b)), main_tensor(minilm.model(**b)))


def test_save_load_reproduces(minilm, tmp_path):
    opt = _run(minilm, {"block_routing": {"block_size": 4, "mass": 0.8, "layers": "0-2"}},
               {"kmeans_routing": {"layers": "3-5"}}, metric="embedding_cosine", min=0.8)
    assert len(_applied(opt, "block_routing")) == 3 and len(_applied(opt, "kmeans_routing")) == 3
    again = load(opt.save(tmp_path / "routed"), minilm)
    b = minilm.example_inputs(batch=3, seq_len=30)
    with torch.no_grad():
        assert torch.equal(main_tensor(opt(**b)), main_tensor(again(**b)))


# ---- causal defaults: pooled affinity, first + previous sinks, keep = fraction of causal pairs ----

def _causal_pairs_listed(table, bs, t):
    nb = table.shape[2]
    qb = torch.arange(nb).view(1, 1, nb, 1)
    pairs = torch.where(table == qb, bs * (bs + 1) / 2, float(bs * bs))
    return float((pairs * (table >= 0) * (table <= qb)).sum()) / (table.shape[0] * table.shape[1] * t * (t + 1) / 2)


def test_causal_keep_lists_own_previous_first_and_respects_budget():
    """On a causal site the default (keep 0.25) lists, in every query block, its own block, the previous
    one and the first (attention sink), each row the same count, and about 25 % of the causal pairs."""
    torch.manual_seed(0)
    bs, nb = 16, 32
    q, k = torch.randn(1, 3, bs * nb, 8), torch.randn(1, 3, bs * nb, 8)
    table = R.route_blocks(q, k, None, block_size=bs, keep_permille=250, causal=True,
                           sinks=R.default_sinks(True), affinity="pooled", scale=8 ** -0.5)
    per_row = -(-nb * R.causal_row_permille(250) // 1000)
    assert per_row == 5
    for h in range(3):
        for i, r in enumerate(table[0, h]):
            listed = set(r.tolist()) - {-1}
            assert {0, max(i - 1, 0), i} <= listed and max(listed) == i
            assert len(listed) == min(i + 1, per_row)
    assert abs(_causal_pairs_listed(table, bs, bs * nb) - 0.25) < 0.02
    for keep in (400, 600):                         # the budget follows keep (the 3 forced blocks are a floor)
        t = R.route_blocks(q, k, None, block_size=bs, keep_permille=keep, causal=True,
                           sinks=R.default_sinks(True), affinity="pooled")
        assert abs(_causal_pairs_listed(t, bs, bs * nb) - keep / 1000) < 0.04


def test_pooled_affinity_finds_a_single_strong_key():
    """One key aligned with the queries, in a block of otherwise opposing keys: the block's mean key
    hides it (BiFormer means rank it last), the pooled estimate ranks it first."""
    torch.manual_seed(0)
    bs, D = 8, 16
    u = torch.nn.functional.normalize(torch.randn(D), dim=0)
    q = (u * 3 + 0.1 * torch.randn(1, 1, 4 * bs, D))
    k = 0.1 * torch.randn(1, 1, 4 * bs, D)
    k[0, 0, bs:2 * bs] -= u                          # block 1: all keys point away ...
    k[0, 0, bs + 3] = 4 * u                          # ... but one, which every query attends to
    args = dict(block_size=bs, topk=1, causal=True, sinks=())
    pooled = R.route_blocks(q, k, None, affinity="pooled", scale=1.0, **args)
    means = R.route_blocks(q, k, None, affinity="means", **args)
    assert set(pooled[0, 0, 3].tolist()) == {1, 3}
    assert 1 not in set(means[0, 0, 3].tolist())


@pytest.mark.parametrize("affinity", ["pooled", "means"])
def test_keep_one_is_sdpa_causal_gqa_padded(affinity):
    """keep = 1 lists every allowed block: the routed op equals SDPA (causal, GQA, right padding)."""
    torch.manual_seed(0)
    B, H, Hkv, T, D = 2, 4, 2, 37, 8
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    km = torch.ones(B, T, dtype=torch.bool)
    km[1, 29:] = False
    out = R.block_routed_attention(q, k, v, km, block_size=4, topk=None, keep_permille=1000, causal=True,
                                   sinks=R.default_sinks(True), route_by="own", scale=D ** -0.5, affinity=affinity)
    mask = torch.ones(T, T, dtype=torch.bool).tril() & km[:, None, None, :]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                                           attn_mask=mask)
    real = km[:, None, :, None].expand_as(ref)
    torch.testing.assert_close(out[real], ref[real], atol=1e-5, rtol=1e-5)


def test_block_routing_causal_default_fires_on_llama():
    """The rule's defaults on a causal GQA model: sampled value-aware routing with first + previous
    sinks, keep 0.25 split across heads by calibrated per-head budgets (a buffer per site)."""
    from rewriter.models import load_model
    llama = load_model("llama")
    opt = _run(llama, {"block_routing": {"block_size": 4}})
    assert len(_applied(opt, "block_routing")) == 4
    routed = [n for n in opt.graph_module.graph.nodes if n.target is R.block_routed_attention]
    assert routed and all(n.kwargs["affinity"] == "sampled" and n.kwargs["sinks"] == ("first", "previous")
                          for n in routed)
    for n in routed:
        rows = G.fetch_attr(opt.graph_module, n.args[4].target)
        assert rows.shape == (llama.model.config.num_attention_heads,)
        assert n.kwargs["max_row_permille"] == int(rows.max())


def test_sampled_scores_are_the_exact_output_shares_of_the_sampled_rows():
    """affinity "sampled": with every query of a block sampled, a key block's score is the largest
    (over the block's queries) norm of that block's share Σ_{j∈block} p_j v_j of the exact
    causal attention output (GQA, ragged last block)."""
    torch.manual_seed(0)
    B, H, Hkv, T, D, bs = 1, 4, 2, 11, 8, 4
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    got = R._sampled_contribution(q, k, v, None, block_size=bs, samples=bs, causal=True, scale=0.5)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    p = ((q @ kk.transpose(-1, -2)) * 0.5).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    p = p.softmax(-1)
    nb = -(-T // bs)
    want = torch.zeros(B, H, nb, nb)
    for i in range(T):
        for j in range(nb):
            share = (p[:, :, i, j * bs:(j + 1) * bs, None] * vv[:, :, j * bs:(j + 1) * bs]).sum(2).norm(dim=-1)
            want[:, :, i // bs, j] = torch.maximum(want[:, :, i // bs, j], share)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert R.sample_positions(T, bs, 2, "cpu").tolist() == [1, 3, 5, 7, 9, 10]     # last of each half, clamped


def test_sample_rows_mixed_takes_strided_rows_then_each_heads_largest_queries():
    """sample_rows "mixed": half the block's rows strided (the same for every head), half the other
    REAL queries of largest ‖q‖ in that head — never a strided row twice, never a padded query
    (a pick on padding reads the sample's last real query, as a pick beyond the end does when the
    sample runs alone: the same rows either way); "largest_q" only the latter."""
    torch.manual_seed(0)
    B, H, T, D, bs = 2, 2, 13, 4, 8                       # blocks [0, 8) and a ragged [8, 13)
    q = torch.randn(B, H, T, D)
    q[:, 0, 2] *= 50.0                                    # head 0's largest query in block 0: row 2
    q[:, 1, 5] *= 50.0                                    # head 1's: row 5
    q[:, :, 7] *= 100.0                                   # a strided row (last of the block): not picked again
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[1, 10:] = False
    q[1, :, 10] *= 100.0                                  # a padded query with a huge norm: skipped
    pos = R.pick_sample_rows(q, key_mask, block_size=bs, samples=4, how="mixed").view(B, H, 2, 4)
    assert pos[0, 0, 0, :2].tolist() == [3, 7]            # strided: last of each half
    assert pos[0, 0, 0, 2] == 2 and pos[0, 1, 0, 2] == 5  # each head's own largest
    assert len(set(pos[0, 0, 0].tolist())) == 4
    assert pos[1, :, 1, :2].tolist() == [[9, 9], [9, 9]]  # strided rows 11, 12 are padding: the last real row
    assert (pos[1, :, 1, 2:] < 10).all()                  # then only real queries (8, 9 in sample 1)
    alone = R.pick_sample_rows(q[1:, :, :10], None, block_size=bs, samples=4, how="mixed").view(1, H, 2, 4)
    assert [set(b) for h in pos[1].tolist() for b in h] == [set(b) for h in alone[0].tolist() for b in h]
    only = R.pick_sample_rows(q, key_mask, block_size=bs, samples=2, how="largest_q").view(B, H, 2, 2)
    assert only[0, 0, 0].tolist() == [7, 2] and only[0, 1, 0].tolist() == [7, 5]
    every = R.pick_sample_rows(q, None, block_size=bs, samples=bs, how="mixed")
    assert every[0, 0, :bs].tolist() == list(range(bs))   # samples ≥ block_size: every row


def test_sampled_scores_of_largest_q_rows_are_their_exact_output_shares():
    """The scores read the rows pick_sample_rows chose, per head (GQA, causal, padding)."""
    torch.manual_seed(2)
    B, H, Hkv, T, D, bs, S = 2, 4, 2, 12, 8, 4, 2
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, Hkv, T, D), torch.randn(B, Hkv, T, D)
    km = torch.ones(B, T, dtype=torch.bool)
    km[1, 9:] = False
    got = R._sampled_contribution(q, k, v, km, block_size=bs, samples=S, causal=True, scale=0.5,
                                  sample_rows="largest_q")
    pos = R.pick_sample_rows(q, km, block_size=bs, samples=S, how="largest_q")
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    vis = torch.ones(T, T, dtype=torch.bool).tril() & km[:, None, None, :]
    p = ((q @ kk.transpose(-1, -2)) * 0.5).masked_fill(~vis, float("-inf")).softmax(-1)
    nb = T // bs
    want = torch.zeros(B, H, nb, nb)
    for b in range(B):
        for h in range(H):
            for n, i in enumerate(pos[b, h].tolist()):
                for j in range(nb):
                    share = (p[b, h, i, j * bs:(j + 1) * bs, None] * vv[b, h, j * bs:(j + 1) * bs]).sum(0).norm()
                    want[b, h, n // S, j] = torch.maximum(want[b, h, n // S, j], share)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_head_budgets_give_diffuse_heads_more_blocks_at_the_same_total():
    """budget "heads": a head that attends only to its sink and its own block needs nothing else,
    so the blocks it would list go to a head that attends evenly to everything; the total
    listed (query block, key block) pairs stays the uniform budget's."""
    from rewriter.patterns.routing import BlockRoutingOptions, _head_rows
    torch.manual_seed(0)
    T, D, bs = 64, 16, 4
    nb = T // bs
    k = torch.randn(1, 2, T, D)
    q = torch.zeros(1, 2, T, D)
    q[0, 0] = k[0, 0, 0] * 20.0                          # head 0: all mass on token 0 (the first block)
    v = torch.randn(1, 2, T, D)                           # head 1: q = 0, uniform attention
    opts = BlockRoutingOptions(block_size=bs, keep=0.5)
    rows = _head_rows(q, k, v, None, True, 1.0, opts)
    assert rows[1] > rows[0] and rows[0] * nb <= 3       # head 0 keeps little beyond first + previous + own
    listed = lambda K: sum(min(max(K, min(i + 1, 3)), i + 1) for i in range(nb))   # noqa: E731
    uniform = int(R.uniform_rows(nb, torch.tensor([3]), topk=None, keep_permille=500, causal=True, n_sinks=2)[1])
    total = listed(round(float(rows[0]) * nb)) + listed(round(float(rows[1]) * nb))
    assert abs(total - 2 * listed(uniform)) <= nb        # same budget, up to rounding one row count


def test_route_blocks_honours_per_head_row_counts():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 3, 32, 8), torch.randn(1, 3, 32, 8), torch.randn(1, 3, 32, 8)
    rows = torch.tensor([125, 500, 1000])                # 1, 4 and 8 of 8 blocks per query block
    table = R.route_blocks(q, k, None, block_size=4, causal=True, sinks=("first",), affinity="sampled",
                           v=v, head_rows=rows, max_row_permille=1000)
    listed = (table >= 0).sum(-1)[0]                     # [H, nb]
    allowed = torch.arange(1, 9)
    assert listed[2].tolist() == allowed.tolist()        # every allowed block
    assert listed[1].tolist() == torch.minimum(allowed, torch.tensor(4)).tolist()
    assert listed[0].tolist() == torch.minimum(allowed, torch.tensor(2)).tolist()   # own + first are forced


def test_head_budgets_list_as_many_pairs_as_the_uniform_budget():
    """The per-head split moves blocks between heads; the tables it produces list (about) as many
    causal (query, key) pairs as the uniform keep 0.5 tables — checked on the tables route_blocks
    builds, not on the calibration's own bookkeeping."""
    from rewriter.patterns.routing import BlockRoutingOptions, _head_rows
    torch.manual_seed(1)
    H, T, D, bs = 4, 128, 16, 8
    q, k, v = torch.randn(1, H, T, D), torch.randn(1, 2, T, D), torch.randn(1, 2, T, D)
    q[:, 0] *= 4.0                                        # one sharp head, three diffuse ones
    rows = (1000 * _head_rows(q, k, v, None, True, D ** -0.5, BlockRoutingOptions(block_size=bs, keep=0.5))).round().long()
    args = dict(block_size=bs, causal=True, sinks=("first", "previous"), affinity="sampled", v=v, scale=D ** -0.5)
    uniform = R.route_blocks(q, k, None, keep_permille=500, **args)
    split = R.route_blocks(q, k, None, head_rows=rows, max_row_permille=int(rows.max()), **args)
    tri = torch.ones(T, T, dtype=torch.bool).tril()
    pairs = lambda t: int((dense_block_mask(t, bs, T, T) & tri).sum())        # noqa: E731
    assert len(set(rows.tolist())) > 1                   # the heads did get different budgets
    assert abs(pairs(split) - pairs(uniform)) <= 0.05 * pairs(uniform)


def test_block_routing_options_refuse_contradictions_by_name():
    from pydantic import ValidationError
    from rewriter.patterns.routing import BlockRoutingOptions
    with pytest.raises(ValidationError, match='route_by "previous"'):
        BlockRoutingOptions(affinity="sampled", route_by="previous")
    with pytest.raises(ValidationError, match='budget "heads"'):
        BlockRoutingOptions(mass=0.9, budget="heads")
