"""The activation cache (rewriter/cache.py): every measurement resumed from cached activations
equals the full forward bit for bit, for every rule; the cuts it finds are the residual stream at
layer boundaries; its memory stays under the stated cap (off at 0); a kept rewrite drops the
values it changed and later runs record them again."""
import pytest
import torch

from rewriter import graph as G
from rewriter import optimize
from rewriter.api import _prepare
from rewriter.cache import ActivationCache, find_cuts
from rewriter.gate import run as full_run
from rewriter.models import calibration_from
from rewriter.rule import Built, Candidate, get_rule
from rewriter.trace import restore, snapshot

CAL = {"samples": 16, "seq_len": 32, "batch_size": 8, "heldout": 0}


def _setup(loaded, **cal):
    calib = calibration_from(loaded, None, **{**CAL, **cal})
    gm, sites, _, _ = _prepare(loaded, calib.batches[0])
    return gm, sites, calib.batches


def _equal(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def _drop(gm, site):
    rule = get_rule("drop_attention")
    opts, c = rule.options(), Candidate((site,))
    rule.apply(gm, c, Built.of(rule.build(None, c, opts)), opts)
    G.clean(gm)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_cuts_are_the_residual_stream_before_each_later_layer(request, name):
    """Pre-norm Llama and post-norm BERT: one cut before each site but the first, whose live set is
    that site's residual input plus what every layer reads (mask, RoPE cos/sin, sizes)."""
    gm, sites, _ = _setup(request.getfixturevalue(name))
    cuts = find_cuts(gm, [s.node for s in sites])
    assert len(cuts) == len(sites)                 # the first: the embedding's output, before layer 0
    for site, cut in zip(sites[1:], cuts[1:]):
        assert site.residual_input in cut.names
        assert len(cut.names) <= 6
        assert cut.position < [n.name for n in gm.graph.nodes].index(site.node)


def test_resumed_runs_equal_full_runs_and_skip_the_unchanged_layers(llama):
    gm, sites, batches = _setup(llama)
    cache = ActivationCache(gm, batches, llama, [s.node for s in sites])
    assert cache.why_off is None
    assert _equal(cache.run(gm), full_run(gm, batches, llama))         # the first run records the cuts
    assert cache.bytes() > 0 and all(cache._ready(c) for c in cache.active)
    skipped = []
    for s in sites:
        snap = snapshot(gm)
        _drop(gm, s)
        before = cache.stats["nodes_skipped"]
        assert _equal(cache.run(gm), full_run(gm, batches, llama)), f"site {s.index}"
        skipped.append(cache.stats["nodes_skipped"] - before)
        restore(gm, snap)
    # site 0 resumes after the embedding; each later site resumes later in the graph
    assert skipped[0] < skipped[1] < skipped[2] < skipped[3]
    assert cache.stats["resumed"] == len(sites)


def test_accept_drops_changed_values_and_later_runs_record_them_again(llama):
    gm, sites, batches = _setup(llama)
    cache = ActivationCache(gm, batches, llama, [s.node for s in sites])
    cache.run(gm)
    _drop(gm, sites[1])                        # kept: the cuts after layer 1 now hold other values
    cache.accept(gm)
    assert [cache._ready(c) for c in cache.active] == [True, True, False, False]   # layer 1 kept: its boundary
    snap = snapshot(gm)
    _drop(gm, sites[3])
    assert _equal(cache.run(gm), full_run(gm, batches, llama))     # resumed at layer 1, refilled layer 3
    assert all(cache._ready(c) for c in cache.active)
    restore(gm, snap)
    _drop(gm, sites[3])
    before = cache.stats["nodes_skipped"]
    assert _equal(cache.run(gm), full_run(gm, batches, llama))
    assert cache.stats["nodes_skipped"] - before > 0
    restore(gm, snap)


def test_a_kept_graph_hands_its_own_values_on(llama):
    """Graph order, every rewrite kept: the values a trial computed at the cuts it changed become the
    reference's, so the next site's trial resumes at its own layer."""
    gm, sites, batches = _setup(llama)
    cache = ActivationCache(gm, batches, llama, [s.node for s in sites])
    cache.run(gm)
    for s in sites[1:]:
        resumed = cache.stats["resumed"]
        _drop(gm, s)
        assert _equal(cache.run(gm), full_run(gm, batches, llama))
        assert cache.stats["resumed"] == resumed + 1, f"site {s.index} did not resume"
        cache.accept(gm)
        assert all(cache._ready(c) for c in cache.active)
    # a graph edited after its run is not the graph that ran: its values are not taken
    snap = snapshot(gm)
    cache.run(gm)
    _drop(gm, sites[0])
    cache.accept(gm)
    # only a cut the edit left unchanged may stay ready: the embedding's, unless the edit removed a
    # node of it (dropping the last site takes the size nodes its mask read with it)
    embedding_cut = [c for c in cache.active if "embedding" in c.names]
    assert not any(cache._ready(c) for c in cache.active if c not in embedding_cut)
    assert all(cache._ready(c) for c in embedding_cut)
    restore(gm, snap)


def test_memory_cap_keeps_fewer_cuts_evenly_and_zero_turns_it_off(llama):
    gm, sites, batches = _setup(llama)
    anchors = [s.node for s in sites]
    full = ActivationCache(gm, batches, llama, anchors)
    full.run(gm)
    assert len(full.active) == 4
    cap = full.bytes() * 2 // 3                # room for some of the four cuts, not all
    small = ActivationCache(gm, batches, llama, anchors, cap_bytes=cap)
    assert _equal(small.run(gm), full_run(gm, batches, llama))
    assert 0 < small.bytes() <= cap and len(small.active) < 4 and small.stats["cuts_dropped"] >= 1
    assert small.active[-1] == full.active[-1]                   # the deepest cut is kept first
    snap = snapshot(gm)
    _drop(gm, sites[3])
    assert _equal(small.run(gm), full_run(gm, batches, llama)) and small.stats["resumed"] == 1
    restore(gm, snap)
    off = ActivationCache(gm, batches, llama, anchors, cap_bytes=0)
    assert off.why_off == "cap_bytes=0"
    assert _equal(off.run(gm), full_run(gm, batches, llama)) and off.bytes() == 0 and off.stats["runs"] == 0


def test_graphs_with_random_ops_run_in_full(llama):
    gm, sites, batches = _setup(llama)
    n = G.node(gm, sites[0].node)
    with gm.graph.inserting_after(n):
        d = gm.graph.call_function(torch.ops.aten.dropout.default, (n, 0.1, True))
    n.replace_all_uses_with(d)
    d.args = (n, 0.1, True)
    gm.recompile()
    cache = ActivationCache(gm, batches, llama, [s.node for s in sites])
    assert cache.why_off and "random" in cache.why_off and "dropout" in cache.why_off


# every rule, on a tiny model: each measurement the driver makes through the cache (the gate's and the
# damage ranking's) is checked against the full forward of the same graph, bit for bit
RULE_CASES = [
    ("llama", {"drop_attention": {"max_layers": 2, "layers": "1-3"}},
     {"metric": "relative_rms", "max": 10.0}),
    ("llama", {"drop_block": {"max_layers": 2, "order": "damage"}}, {"metric": "relative_rms", "max": 10.0}),
    ("llama", {"masa": {"atoms": 1, "groups": 2}}, {"metric": "relative_rms", "max": 10.0}),
    ("bert", {"linear_attention": {"layers": "auto", "steps": 2}}, {"metric": "relative_rms", "max": 10.0}),
    ("bert", {"agent_attention": {"agents": 8}}, {"metric": "relative_rms", "max": 10.0}),
    ("llama", {"block_routing": {"block_size": 4}}, {"metric": "relative_rms", "max": 10.0}),
    ("bert", {"kmeans_routing": {"layers": "1-3"}}, {"metric": "relative_rms", "max": 10.0}),
    ("llama", {"causal_fastpath": {}}, {"metric": "relative_rms", "max": 1e-5}),
    ("digits_vit", {"normlin": {"layers": "1-3"}}, {"metric": "top1_agreement", "min": 0.0}),
]


@pytest.mark.parametrize("name,step,gate", RULE_CASES, ids=[next(iter(s)) for _, s, _ in RULE_CASES])
def test_every_rule_measures_bit_identically_from_the_cache(request, monkeypatch, name, step, gate):
    from rewriter.models import load_model
    loaded = load_model(name) if name == "digits_vit" else request.getfixturevalue(name)
    checked, resumed = [], []
    run = ActivationCache.run

    def run_and_check(self, gm, batches=None, io=None, **kw):
        before = self.stats["resumed"]
        got = run(self, gm, batches, io, **kw)
        want = full_run(gm, self.batches, self.io)
        assert _equal(got, want), f"{next(iter(step))}: the cached run differs from the full forward"
        checked.append(True)
        resumed.append(self.stats["resumed"] - before)
        return got

    monkeypatch.setattr(ActivationCache, "run", run_and_check)
    cal = {"samples": 64, "batch_size": 32, "heldout": 0} if name == "digits_vit" else CAL
    opt = optimize(loaded, {"calibration": cal, "gate": gate, "steps": [step]}, progress=False,
                   measure_latency=False)
    decided = [r for r in opt.report.records if r.status in ("applied", "rolled_back")]
    assert decided, [(r.status, r.reason) for r in opt.report.records]
    assert len(checked) >= 1 + len(decided)
    assert sum(resumed) >= 1, "no measurement resumed from a cut"
