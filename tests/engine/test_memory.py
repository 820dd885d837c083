"""Memory (issue 16): optimize holds one copy of the weights, not three. The traced graph shares the
user's parameters and buffers (copy-on-write per tensor: a rewrite replaces what it rewrites); the
original's outputs come from the user's own module, run in eval mode and put back in its modes;
no rule writes into a shared tensor (every built-in rule checked after every decision; a rule that
does fails the run naming itself and the tensor); the report states the peak RSS.
SmolLM2's measured numbers: benchmarks/bench_memory.py, benchmarks/results/memory.json."""
import pytest
import torch

import rewriter.graph as G
from rewriter import inspect, optimize
from rewriter.models import load_model
from rewriter.report import Report, storage_bytes
from rewriter.rule import RULES, Rule, StepOptions, all_rules, register
from rewriter.trace import SharedWriteError

# every built-in rule on a two-layer tiny model, each kept by a loose gate (as tests/engine/test_onnx.py)
EVERY_RULE = {
    "drop_attention": ("bert", {"drop_attention": {"max_layers": 1, "compensate": "mean"}}),
    "drop_block": ("llama", {"drop_block": {"max_layers": 1}}),
    "linear_attention": ("bert", {"linear_attention": {"steps": 5, "layers": [1]}}),
    "agent_attention": ("bert", {"agent_attention": {"agents": 4, "calibrate": True, "steps": 2,
                                                     "layers": [1]}}),
    "block_routing": ("llama", {"block_routing": {"block_size": 4, "keep": 0.5, "layers": [1]}}),
    "kmeans_routing": ("llama", {"kmeans_routing": {"layers": [1]}}),
    "masa": ("llama", {"masa": {}}),
    "normlin": ("vit", {"normlin": {"layers": [1]}}),
    "causal_fastpath": ("llama", {"causal_fastpath": {}}),
}


def _recipe(step, metric="relative_rms", bound=10.0):
    return {"calibration": {"samples": 4, "seq_len": 16, "batch_size": 4, "heldout": 4},
            "gate": {"metric": metric, "max": bound}, "steps": [step]}


def _frozen(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _changed(model, before) -> list[str]:
    now = model.state_dict()
    return [k for k in before if now[k].dtype != before[k].dtype or not torch.equal(now[k], before[k])]


def _storages(tensors) -> set:
    return {t.untyped_storage().data_ptr() for t in tensors}


def test_every_built_in_rule_is_checked():
    built_in = {n for n, r in all_rules().items() if r.apply.__module__.startswith("rewriter.patterns")}
    assert built_in == {next(iter(step)) for _, step in EVERY_RULE.values()}


@pytest.mark.parametrize("case", sorted(EVERY_RULE))
def test_rule_shares_what_it_does_not_rewrite_and_never_writes_the_users_tensors(case):
    name, step = EVERY_RULE[case]
    loaded = load_model(name)
    model = loaded.model.train()                 # optimize must give it back in training mode
    before, seen = _frozen(model), []

    def after_each_decision(record):             # independent of the engine's own guard: torch.equal
        assert not _changed(model, before), f"{record.rule} on {record.sites} changed the user's model"
        seen.append(record.status)

    opt = optimize(loaded, _recipe(step), progress=after_each_decision, measure_latency=True)
    assert "applied" in seen, opt.report.records
    assert not _changed(model, before) and all(m.training for m in model.modules())
    user = dict(model.named_parameters()) | dict(model.named_buffers())
    graph = dict(opt.graph_module.named_parameters()) | dict(opt.graph_module.named_buffers())
    kept = [q for q in graph if q in user]
    assert kept, "the rewritten graph reads none of the model's tensors by their names"
    for q in kept:     # a tensor the graph reads under the model's name is the model's, not a copy
        assert graph[q].untyped_storage().data_ptr() == user[q].untyped_storage().data_ptr(), q
        assert graph[q] is not user[q]           # its own handle: own requires_grad, own .grad
    mem = opt.report.to_dict()["memory"]
    theirs = _storages(user.values())
    own = [t for t in graph.values() if t.untyped_storage().data_ptr() not in theirs]
    assert mem["weights_bytes"] == storage_bytes(user.values())
    assert mem["graph_private_bytes"] == storage_bytes(own)
    assert mem["graph_shared_bytes"] == storage_bytes(graph[q] for q in kept) > 0


def test_no_weight_is_copied_and_the_users_modes_come_back(monkeypatch):
    """Before issue 16 optimize deep-copied the model twice (the traced copy, the gate's original):
    each nn.Parameter went through Parameter.__deepcopy__. Now none does; the gate, the held-out
    check and the latency timing run the user's module, in eval mode, and its per-module modes
    (here a mix) are restored."""
    loaded = load_model("llama")
    model = loaded.model.train()
    model.model.layers[0].eval()
    modes = [m.training for m in model.modules()]
    copies = []
    real = torch.nn.Parameter.__deepcopy__
    monkeypatch.setattr(torch.nn.Parameter, "__deepcopy__",
                        lambda self, memo: copies.append(1) or real(self, memo))
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(m.training))
    opt = optimize(loaded, _recipe({"drop_attention": {"max_layers": 1}}), progress=False)
    handle.remove()
    assert copies == [] and [m.training for m in model.modules()] == modes
    assert calls and not any(calls), "the original runs in eval mode"
    mem = opt.report.memory
    assert mem["graph_private_bytes"] == 0          # drop_attention adds nothing: it only removes
    assert 0 < mem["graph_shared_bytes"] < mem["weights_bytes"]   # the dropped layer's weights are gone


class _Opts(StepOptions):
    pass


def _o_weight(gm, c) -> str:
    return c.site.o_weight or c.site.q_weight


def _through_data(gm, c, built, opts):           # .data bumps no version counter: the checksum sees it
    G.fetch_attr(gm, _o_weight(gm, c)).data.mul_(2.0)


def _in_place(gm, c, built, opts):               # an in-place op bumps the shared version counter
    with torch.no_grad():
        G.fetch_attr(gm, _o_weight(gm, c)).mul_(2.0)


def _copy_on_write(gm, c, built, opts):          # the sanctioned way: a private copy, then edit it
    with torch.no_grad():
        G.writable(gm, _o_weight(gm, c)).mul_(2.0)


for _name, _apply in (("_mem_data", _through_data), ("_mem_inplace", _in_place),
                      ("_mem_cow", _copy_on_write)):
    if _name not in RULES:
        register(Rule(_name, paper="test", summary="test rule", exact=False, options=_Opts,
                      check=lambda s, o: None, build=lambda c, s, o: {}, apply=_apply))


@pytest.mark.parametrize("rule", ["_mem_data", "_mem_inplace"])
def test_a_rule_writing_a_shared_weight_in_place_fails_naming_rule_and_tensor(rule):
    loaded = load_model("bert")
    site = inspect(loaded)[0]
    with pytest.raises(SharedWriteError, match=rf"rule {rule} \(site\(s\) \[0\].*{site.o_weight}"):
        optimize(loaded, _recipe({rule: {"layers": [0]}}, bound=1e9), progress=False, measure_latency=False)


def test_copy_on_write_edits_a_private_copy_and_leaves_the_user_model_alone():
    loaded = load_model("bert")
    before = _frozen(loaded.model)
    opt = optimize(loaded, _recipe({"_mem_cow": {"layers": [0]}}, bound=1e9), progress=False,
                   measure_latency=False)
    (r,) = opt.report.records
    assert r.status == "applied" and not _changed(loaded.model, before)
    q = opt.sites[0].o_weight
    mine, theirs = G.fetch_attr(opt.graph_module, q), G.fetch_attr(loaded.model, q)
    assert torch.equal(mine, 2 * theirs)
    assert mine.untyped_storage().data_ptr() != theirs.untyped_storage().data_ptr()
    assert opt.report.memory["graph_private_bytes"] == mine.untyped_storage().nbytes()
    x = loaded.example_inputs(batch=2, seq_len=12)
    with torch.no_grad():
        assert not torch.equal(opt(**x).last_hidden_state, loaded.model.eval()(**x).last_hidden_state)


def test_register_tensor_keeps_a_rules_tensor_and_copies_views_and_shared_storage():
    loaded = load_model("bert")
    opt = optimize(loaded, _recipe({"drop_attention": {"max_layers": 1}}), progress=False,
                   measure_latency=False)
    gm = opt.graph_module
    out = next(n for n in gm.graph.nodes if n.op == "output")
    fresh, big = torch.randn(8), torch.randn(1000)
    weight = next(iter(gm.parameters()))
    for name, t in (("rw_t_fresh", fresh), ("rw_t_view", big[:8]), ("rw_t_shared", weight)):
        G.register_tensor(gm, name, t, before=out)
    assert gm.rw_t_fresh.untyped_storage().data_ptr() == fresh.untyped_storage().data_ptr()   # no copy
    assert gm.rw_t_view.untyped_storage().nbytes() == 8 * 4 and torch.equal(gm.rw_t_view, big[:8])
    assert gm.rw_t_shared.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()


def test_report_states_memory_and_reads_reports_saved_before_it(tmp_path):
    loaded = load_model("bert")
    opt = optimize(loaded, _recipe({"drop_attention": {"max_layers": 1}}), progress=False)
    d = opt.report.to_dict()
    m = d["memory"]
    assert m["peak_rss_bytes"] >= m["start_rss_bytes"] > m["weights_bytes"] > 0
    assert m["method"].startswith(("getrusage", "/proc/self/statm"))
    assert "peak memory" in str(opt.report) and "peak RSS" in str(opt.report)
    assert Report.from_dict(d).memory == m
    old = {k: v for k, v in d.items() if k != "memory"}      # a report.json from before issue 16
    back = Report.from_dict(old)
    assert back.memory == {} and "memory" not in back.to_dict() and "peak memory" not in str(back)
