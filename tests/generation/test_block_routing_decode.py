"""Block routing at decode (rewriter.kernels.routed_attention.block_decode): a KV cache at kv-heads
width plus per-block key summaries (Quest's min / max, arXiv:2406.10774) kept on append; each step
attends to its sinks, its local block and the top blocks of its kv head within each head's budget.
Budgets that keep every block reproduce the full-sequence logits; the step's selection is the one
computed directly from the cached keys; a block-routed decoder generates a left-padded batch as
each row alone; k-means routing still says why it cannot decode."""
import functools
import math
import sys
from pathlib import Path

import pytest
import torch

from rewriter.generate import GenerationError, lowered
from rewriter.kernels import decode as D
from rewriter.kernels import routed_attention as RA
from rewriter.kernels.routed_attention.block_decode import (block_routing_decode_ref,
                                                            block_routing_prefill_state, block_routing_step,
                                                            block_summaries, decode_selection)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_lowering import HEAD_DIM, KV_HEADS, LAYERS, _optimized, _rel, _stepwise_logits  # noqa: E402

ROUTED = {   # name: (family, block_routing options)
    "every_block_heads": ("llama", {"block_size": 4, "keep": 1.0}),                  # head_rows = 1000 each
    "every_block_topk": ("qwen2", {"block_size": 4, "topk": 99, "budget": "uniform"}),
    "top1": ("llama", {"block_size": 4, "topk": 1, "budget": "uniform"}),            # sinks + local + 1
}


@functools.cache
def _routed(name: str):
    family, opts = ROUTED[name]
    opt = _optimized(family, [{"block_routing": opts}])
    why = [(r.status, r.reason) for r in opt.records]
    assert [r.status for r in opt.records] == ["applied"] * LAYERS, why
    return opt


@pytest.mark.parametrize("name", ["every_block_heads", "every_block_topk"])
def test_budgets_that_keep_every_block_reproduce_the_full_sequence_logits(name):
    """Prefill of 6 tokens then 7 steps (blocks of 4: the step fills and starts blocks) equals the
    rewritten model's full-sequence logits, with a left-padded row; the state is a KV cache at
    kv-heads width plus one min and one max key per block; the step is functional and the in-place
    step computes the same."""
    opt = _routed(name)
    low = lowered(opt)
    assert [s.form for s in low.sites] == ["block_routed"] * LAYERS
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(3, 128, (2, 13), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        full = opt(input_ids=ids, attention_mask=mask).logits
        steps, state = _stepwise_logits(low, ids, mask, T=6)
    assert _rel(steps[0, 3:], full[0, 3:]) <= 1e-4 and _rel(steps[1], full[1]) <= 1e-4, _rel(steps, full)
    targets = {n.target for n in low.decode.graph.nodes if n.op == "call_function"}
    assert RA.block_routed_attention not in targets
    assert torch.ops.rewriter.block_sparse_attention.default not in targets
    assert len(state) == 4 * LAYERS
    for k, v, lo, hi in zip(*[iter(state)] * 4):            # GQA: 2 of the 4 heads, no repeat_kv copy
        assert tuple(k.shape) == tuple(v.shape) == (2, KV_HEADS, 13, HEAD_DIM)
        assert tuple(lo.shape) == tuple(hi.shape) == (2, KV_HEADS, 4, HEAD_DIM)
        want_lo, want_hi = block_summaries(k, mask.bool(), 4)
        assert torch.equal(lo, want_lo) and torch.equal(hi, want_hi)   # kept on append = recomputed
    # functional: a step leaves its inputs as they were; decode_inplace writes them and agrees
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    kv = mask.bool()
    with torch.no_grad():
        out = low.prefill(ids[:, :11], mask[:, :11], pos[:, :11])
        st = low.start(list(out[low.n_outputs:]), 13)                   # slot 11: the summaries grow to 4
        st = list(low.decode(ids[:, 11:12], mask[:, 11:12], pos[:, 11:12], torch.tensor([11]), kv, *st))[1:]
        before = [t.clone() for t in st]
        a = low.decode(ids[:, 12:], mask[:, 12:], pos[:, 12:], torch.tensor([12]), kv, *st)
        assert all(torch.equal(x, y) for x, y in zip(st, before))
        b = low.decode_inplace(ids[:, 12:], mask[:, 12:], pos[:, 12:], torch.tensor([12]), kv, *st)
    assert torch.allclose(a[0], b[0], rtol=0, atol=1e-6)
    assert torch.allclose(a[0], full[:, 12:], rtol=0, atol=1e-4)
    assert all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
    assert all(x is y for x, y in zip(b[1:], st))                       # written where generate holds them


# ---------------------------------------------------------------------------- the step's selection

def _brute_selection(q, k_cache, key_valid, p, *, bs, sinks, budget, scale, head_rows=None):
    """Per (row, query head), the set of blocks the step must attend to, from the cached keys by
    loops: blocks of bs slots counted from the row's first real slot; forced = the current block,
    the first block and the previous (or the last real key's) block; per block min / max of its
    real keys ≤ p, Quest's bound per head, softmax over the head's blocks, summed over the kv
    head's query heads; the head's budget, then the best-ranked blocks of its kv head."""
    B, H, D = q.shape
    h_kv = k_cache.shape[1]
    g = H // h_kv
    out = {}
    for b in range(B):
        real = [s for s in range(p + 1) if key_valid[b, s]]
        if not real:
            for h in range(H):
                out[b, h] = set()
            continue
        first = real[0]
        cur = (p - first) // bs
        by_block: dict[int, list[int]] = {}
        for s in real:
            by_block.setdefault((s - first) // bs, []).append(s)
        allowed = set(by_block)
        forced = {cur} & allowed
        if "first" in sinks:
            forced |= {0} & allowed
        if "previous" in sinks:
            forced |= {cur - 1} & allowed
        if "last" in sinks:
            forced |= {(real[-1] - first) // bs}
        n = len(allowed)
        for kh in range(h_kv):
            mass = dict.fromkeys(by_block, 0.0)
            for h in range(kh * g, (kh + 1) * g):
                u = {}
                for j, slots in by_block.items():
                    keys = k_cache[b, kh, slots].double()
                    lo, hi = keys.min(0).values, keys.max(0).values
                    u[j] = scale * float(torch.maximum(q[b, h].double() * lo, q[b, h].double() * hi).sum())
                total = sum(math.exp(x) for x in u.values())
                for j in u:
                    mass[j] += math.exp(u[j]) / total
            ranked = sorted(allowed - forced, key=lambda j: -mass[j])
            for h in range(kh * g, (kh + 1) * g):
                if budget == "heads":
                    count = max(len(forced), max(1, (n * int(head_rows[h]) + 500) // 1000))
                elif budget[0] == "topk":
                    count = len(forced) + budget[1]
                else:
                    per_row = RA.causal_row_permille(budget[1])
                    count = max(len(forced), max(1, -(-n * per_row // 1000)))
                out[b, h] = forced | set(ranked[:min(count, n) - len(forced)])
    return out


@pytest.mark.parametrize("budget,sinks", [("heads", ("first", "previous")),
                                          (("topk", 2), ("first", "previous")),
                                          (("keep", 400), ("first", "last"))],
                         ids=["head_rows", "topk2", "keep0.4-last"])
def test_step_selection_equals_a_direct_computation_from_the_cached_keys(budget, sinks):
    """Prefill of 9 slots then 23 steps on random GQA q/k/v (4 heads, 2 kv heads, blocks of 4),
    three rows: one left-padded by 5, one with a padded step in the middle, one unpadded. After
    every step the summaries the step kept equal those recomputed from the cache, the blocks it
    selects are the brute-force ones (sinks, local, top blocks per kv head within each head's
    budget), the budget does leave blocks out, and its output is the fp32 reference's."""
    torch.manual_seed(0)
    B, H, Hkv, D, bs, T0, L = 3, 4, 2, 8, 4, 9, 32
    head_rows = torch.tensor([100, 300, 600, 900])
    kw = dict(block_size=bs, sinks=sinks, topk=budget[1] if budget[0] == "topk" else None,
              keep_permille=budget[1] if budget[0] == "keep" else None)
    rows = dict(head_rows=head_rows, max_row_permille=900) if budget == "heads" else {}
    q, k, v = torch.randn(B, H, L, D), torch.randn(B, Hkv, L, D), torch.randn(B, Hkv, L, D)
    key_valid = torch.ones(B, L, dtype=torch.bool)
    key_valid[0, :5] = False
    key_valid[1, 17] = False                                   # a padded step mid-sequence
    km = key_valid[:, :T0]
    kc, vc, lo, hi = block_routing_prefill_state(k[:, :, :T0], v[:, :, :T0], km, block_size=bs)
    pad = lambda x: torch.cat([x, x.new_zeros(B, Hkv, L - T0, x.shape[-1])], 2)   # noqa: E731 (Lowered.start)
    state = [pad(kc), pad(vc), lo, hi]
    fewer = False
    for p in range(T0, L):
        seen = key_valid & (torch.arange(L) < p + 1)
        new = slice(p, p + 1)
        step = block_routing_step(q[:, :, new], k[:, :, new], v[:, :, new], *state, torch.tensor([p]), seen,
                                  rows.get("head_rows"), scale=D ** -0.5, inplace=p % 2 == 0,
                                  max_row_permille=rows.get("max_row_permille"), **kw)
        out, state = step[0], list(step[1:])
        want_lo, want_hi = block_summaries(state[0], seen, bs)
        assert torch.equal(state[2], want_lo) and torch.equal(state[3], want_hi), p
        blocks, count = decode_selection(q[:, :, p], state[2], state[3], seen, torch.tensor([p]),
                                         rows.get("head_rows"), max_row_permille=rows.get("max_row_permille"),
                                         scale=D ** -0.5, **kw)
        brute = _brute_selection(q[:, :, p], state[0], seen, p, bs=bs, sinks=sinks, budget=budget,
                                 scale=D ** -0.5, head_rows=head_rows)
        for (b, h), want in brute.items():
            got = blocks[b, h // (H // Hkv), :count[b, h]].tolist()
            assert sorted(got) == sorted(want) and -1 not in got, (p, b, h, got, want)
            fewer |= len(want) < (p - int(seen[b].int().argmax())) // bs + 1
        ref, _, _ = block_routing_decode_ref(q[:, :, new], state[0], state[1], seen, p, rows.get("head_rows"),
                                             scale=D ** -0.5, max_row_permille=rows.get("max_row_permille"),
                                             **kw)
        assert (out - ref).abs().max() <= 1e-5, p
    assert fewer                                                 # the budgets route, not attend densely


def test_block_summaries_count_blocks_from_the_first_real_key():
    """Quest's per-block min / max of the real keys, blocks counted from each row's first real
    key (the full-sequence op's left alignment), +inf / −inf for a block with no real key."""
    k = torch.arange(2 * 1 * 7 * 1, dtype=torch.float32).view(2, 1, 7, 1)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1, 1]], dtype=torch.bool)
    lo, hi = block_summaries(k, mask, 3)
    assert lo[0, 0, :, 0].tolist() == [2, 5, float("inf")]
    assert hi[0, 0, :, 0].tolist() == [4, 6, float("-inf")]
    assert lo[1, 0, :, 0].tolist() == [7, 11, 13] and hi[1, 0, :, 0].tolist() == [9, 12, 13]


# ---------------------------------------------------------------------------- generate, report, refusals

def test_a_block_routed_decoder_generates_a_left_padded_batch_as_each_row_alone():
    """Greedy generate, each step attending to its first, previous and own blocks plus the one best
    other (of up to 9): row 0 (a 5-token prompt left-padded to 9) generates what it generates
    alone, row 1 too; the report and the lowering name the form; the state stays at kv-heads
    width; the cache per token is the original's (block routing reads less of it per step, it does
    not shrink it)."""
    opt = _routed("top1")
    g = torch.Generator().manual_seed(4)
    long, short = torch.randint(3, 128, (1, 9), generator=g), torch.randint(3, 128, (1, 5), generator=g)
    ids = torch.cat([torch.cat([torch.zeros(1, 4, dtype=torch.long), short], 1), long])
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    stats: dict = {}
    batch = opt.generate(ids, mask, max_new_tokens=24, eos_token_id=[], stats=stats)
    assert batch.shape == (2, 33) and stats["decode_steps"] == 23
    assert torch.equal(batch[0, 4:], opt.generate(short, max_new_tokens=24, eos_token_id=[])[0])
    assert torch.equal(batch[1], opt.generate(long, max_new_tokens=24, eos_token_id=[])[0])
    low = lowered(opt)
    assert [(s["form"], s["op"], s["state"][2:]) for s in low.summary()] == [
        ("block_routed", "block_routed_attention", [f"s{i}_k_min", f"s{i}_k_max"]) for i in range(LAYERS)]
    per_site = 2 * KV_HEADS * HEAD_DIM * 4
    summaries = 2 * 2 * KV_HEADS * 9 * HEAD_DIM * 4           # 2 rows, min + max, ⌈33/4⌉ blocks
    assert stats["state_bytes"] == LAYERS * (2 * 33 * per_site + summaries)
    gen = opt.report.generation
    assert gen["forms"] == {"block_routed": LAYERS}
    assert gen["kv_bytes_per_token_after"] == gen["kv_bytes_per_token_before"] == LAYERS * per_site


def test_compiled_block_routing_steps_generate_the_eager_tokens():
    """The step has no host sync, so torch.compile takes it whole (one recompile, when the
    summaries grow to the cache's block count after the first step); same tokens as eager."""
    opt = _routed("top1")
    ids = torch.randint(3, 128, (2, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    eager = opt.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(opt.generate(ids, mask, max_new_tokens=6, eos_token_id=[], compile=True), eager)


def test_block_routing_has_a_decode_form_and_kmeans_routing_says_why_not():
    form = D.form_of(RA.block_routed_attention)
    assert form is not None and form.form == "block_routed" and D.refusal("block_routed_attention") is None
    assert "non-causal block routing" in form.refuse({"causal": False})
    assert form.refuse({"causal": True}) is None
    kmeans = _optimized("llama", [{"kmeans_routing": {}}])
    why = r"site 0 \(model\.layers\.0\.self_attn\): kmeans_routed_attention has no decode form: k-means"
    with pytest.raises(GenerationError, match=why) as e:
        lowered(kmeans)
    assert "\n" not in str(e.value)
