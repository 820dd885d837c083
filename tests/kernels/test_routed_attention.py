"""Run-time routing (rewriter.kernels.routed_attention): BiFormer block means and routing tables,
and that a model rewritten by the routed rules calls only kernel code and torch ops — so a
rewritten, saved or exported graph never reaches into rewriter.patterns."""
import operator

import pytest
import torch

from rewriter.kernels.routed_attention import block_means, route_blocks


def test_block_means_exclude_padding_and_ragged_tail():
    x = torch.randn(2, 3, 10, 4)
    key_mask = torch.tensor([[1] * 10, [1] * 5 + [0] * 5], dtype=torch.bool)
    m = block_means(x, 4, key_mask)              # blocks [0,4) [4,8) [8,10)
    assert m.shape == (2, 3, 3, 4)
    torch.testing.assert_close(m[0, :, 2], x[0, :, 8:10].mean(1))
    torch.testing.assert_close(m[1, :, 1], x[1, :, 4:5].mean(1))
    assert (m[1, :, 2] == 0).all()               # no valid token in the block


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_route_blocks_is_biformer_routing(causal):
    """Each query block lists, ascending and -1 padded, its own block and the sinks (the blocks of
    each sample's first and last real token) plus the `topk` other allowed key blocks of highest
    region affinity (block means of q and k, padding excluded); allowed = holds a real key and,
    causal, ≤ the query block."""
    B, H, Hkv, T, D, bs, topk = 2, 4, 2, 70, 8, 8, 2
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(B, H, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[1, 60:] = False                     # sample 1: key block 8 (64..69) is all padding
    table = route_blocks(q, k, key_mask, block_size=bs, topk=topk, causal=causal, sinks=("first", "last"))
    n_blocks = -(-T // bs)
    assert table.dtype == torch.int32 and table.shape == (B, H, n_blocks, topk + 3)
    q_r, k_r = block_means(q, bs, key_mask), block_means(k, bs, key_mask).repeat_interleave(H // Hkv, 1)
    affinity = q_r @ k_r.transpose(-1, -2)                                      # [B, H, nb, nb]
    for b in range(B):
        real = key_mask[b].nonzero().view(-1)
        sinks = [int(real[0]) // bs, int(real[-1]) // bs]
        for h in range(H):
            for i in range(n_blocks):
                row = table[b, h, i].tolist()
                listed = [j for j in row if j >= 0]
                assert listed == sorted(listed) and row[len(listed):] == [-1] * (len(row) - len(listed))
                allowed = [j for j in range(n_blocks) if (not causal or j <= i)
                           and key_mask[b, j * bs:(j + 1) * bs].any()]
                forced = {j for j in [i, *sinks] if j in allowed}
                others = [j for j in allowed if j not in forced]
                chosen = set(listed) - forced
                assert forced <= set(listed) and chosen <= set(others), (b, h, i)
                assert len(chosen) == min(topk, len(others)), (b, h, i)
                left_out = [affinity[b, h, i, j] for j in others if j not in chosen]
                if chosen and left_out:              # the highest-affinity others (ties either way)
                    assert min(affinity[b, h, i, j] for j in chosen) >= max(left_out), (b, h, i)


ROUTED = {
    "bert": [{"block_routing": {"block_size": 8, "topk": 1, "layers": [0]}},
             {"kmeans_routing": {"clusters": 3, "layers": [1]}},
             {"agent_attention": {"agents": 4, "layers": [2]}}],
    "llama": [{"block_routing": {"block_size": 4, "layers": [0]}},
              {"kmeans_routing": {"clusters": 4, "layers": [1]}}],
}


@pytest.mark.parametrize("model", ROUTED)
def test_rewritten_graph_calls_only_kernels_and_torch_ops(model):
    """After block_routing, kmeans_routing and agent_attention, every call_function node (the
    routed attention, and the key mask the rules read from the SDPA mask) is a torch op or a
    function of rewriter.kernels."""
    from rewriter import optimize
    from rewriter.models import load_model

    recipe = {"model": model, "calibration": {"samples": 8, "seq_len": 32, "batch_size": 4, "heldout": 0},
              "gate": {"metric": "relative_rms", "max": 100.0}, "steps": ROUTED[model]}
    opt = optimize(load_model(model), recipe, measure_latency=False, progress=False)
    applied = {r.rule for r in opt.report.records if r.status == "applied"}
    assert applied == {rule for step in ROUTED[model] for rule in step}
    ours = set()
    for n in opt.graph_module.graph.nodes:
        if n.op != "call_function" or isinstance(n.target, (torch._ops.OpOverload, torch._ops.HigherOrderOperator)):
            continue
        if n.target is operator.getitem:         # fx's projection of a multi-output op
            continue
        assert getattr(n.target, "__module__", "").startswith("rewriter.kernels"), (n.name, n.target)
        ours.add(n.target.__name__)
    expected = {"key_valid", "block_routed_attention", "kmeans_routed_attention"}
    assert ours == (expected | {"agent_block"} if "agent_attention" in applied else expected)


def _padded(x: torch.Tensor, t: int, left: bool, g) -> torch.Tensor:
    """x [1, H, L, D] inside t positions, the rest filled with noise (padding may hold anything)."""
    noise = torch.randn(1, x.shape[1], t - x.shape[2], x.shape[3], generator=g)
    return torch.cat([noise, x] if left else [x, noise], 2)


BUDGETS = {"topk": dict(topk=1, keep_permille=None), "keep": dict(topk=None, keep_permille=400),
           "head_rows": dict(topk=None, keep_permille=None, head_rows=torch.tensor([250, 600]),
                             max_row_permille=600)}


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("affinity", ["means", "pooled", "sampled"])
def test_routed_attention_of_a_padded_sample_is_the_sample_alone(left, causal, affinity):
    """A sample padded to 32 positions (right or left, noise in the padding) gives, on its 19 real
    rows, what it gives alone, for every budget and ranking: blocks are counted from its first real
    token, `keep` and per-head budgets resolve on its real length, sampled rows never read padding.
    Before: `keep` was resolved on the padded length, and left padding moved every block boundary."""
    from rewriter.kernels.routed_attention import block_routed_attention
    g = torch.Generator().manual_seed(4)
    H, D, t, L = 2, 8, 32, 19
    q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
    key_mask = torch.zeros(1, t, dtype=torch.bool)
    real = slice(t - L, t) if left else slice(0, L)
    key_mask[:, real] = True
    padded = [_padded(x, t, left, g) for x in (q, k, v)]
    for name, budget in BUDGETS.items():
        kw = dict(block_size=4, causal=causal, sinks=("first", "previous") if causal else ("first", "last"),
                  route_by="own", scale=D ** -0.5, affinity=affinity, samples=3, sample_rows="mixed",
                  **budget)
        together = block_routed_attention(*padded, key_mask, **kw)[:, :, real]
        alone = block_routed_attention(q, k, v, torch.ones(1, L, dtype=torch.bool), **kw)
        torch.testing.assert_close(together, alone, rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("left", [False, True], ids=["right_padded", "left_padded"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kmeans_routed_attention_of_a_padded_sample_is_the_sample_alone(left, causal):
    """The same for the Routing Transformer: clusters take real tokens first, local blocks count from
    the first real token (before, left padding moved them)."""
    import torch.nn.functional as F

    from rewriter.kernels.routed_attention import kmeans_routed_attention
    g = torch.Generator().manual_seed(5)
    H, D, t, L = 2, 8, 32, 19
    q, k, v = (torch.randn(1, H, L, D, generator=g) for _ in range(3))
    key_mask = torch.zeros(1, t, dtype=torch.bool)
    real = slice(t - L, t) if left else slice(0, L)
    key_mask[:, real] = True
    centroids = F.normalize(torch.randn(H, 3, D, generator=g), dim=-1)
    kw = dict(window=8, causal=causal, scale=D ** -0.5, local_block=4)
    padded = [_padded(x, t, left, g) for x in (q, k, v)]
    together = kmeans_routed_attention(*padded, key_mask, centroids, **kw)
    alone = kmeans_routed_attention(q, k, v, torch.ones(1, L, dtype=torch.bool), centroids, **kw)
    torch.testing.assert_close(together[:, :, real], alone, rtol=0, atol=1e-5)


def test_alignment_rotates_each_sample_to_its_first_real_token_and_back():
    from rewriter.kernels.routed_attention import alignment, along_tokens
    key_mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    to, back = alignment(key_mask)
    x = torch.arange(15.0).view(3, 1, 5, 1)
    aligned = along_tokens(x, to)
    assert aligned[:, 0, :, 0].tolist() == [[2, 3, 4, 0, 1], [5, 6, 7, 8, 9], [10, 11, 12, 13, 14]]
    assert along_tokens(key_mask, to).tolist()[0] == [True, True, True, False, False]
    assert torch.equal(along_tokens(aligned, back), x)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("padded", [False, True], ids=["no-padding", "padding"])
def test_streamed_sampled_scores_equal_the_one_shot_form(causal, padded, monkeypatch):
    """Eager block scoring streams the sampled rows over key chunks (online log-sum-exp per row,
    log shares per key block; causal chunks skip the query blocks before them) instead of forming
    the [H, nb·S, T] scores: the same scores as the one-shot form traced graphs record, over several
    key chunks and row tiles, GQA, a ragged last block, padded keys and a row with no real key."""
    from rewriter.kernels.routed_attention import block_routing as BR
    monkeypatch.setattr(BR, "_ROW_TILE", 3000)          # several row tiles per key chunk
    g = torch.Generator().manual_seed(4)
    B, H, Hkv, T, D, bs = 2, 6, 2, 23 * 8 + 5, 16, 8    # 24 blocks: 6 key chunks, the last block ragged
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv))
    km = None
    if padded:
        km = torch.ones(B, T, dtype=torch.bool)
        km[1, 150:] = False
        km[0, 9:30] = False
    kw = dict(block_size=bs, samples=4, causal=causal, scale=0.4, sample_rows="mixed")
    dense = BR._sampled_contribution_dense(q, k, v, km, **kw)
    streamed = BR._sampled_contribution(q, k, v, km, **kw)     # eager: the streamed form
    torch.testing.assert_close(streamed, dense, rtol=1e-5, atol=1e-6)
    assert dense.abs().sum() > 0 and (streamed >= 0).all()
