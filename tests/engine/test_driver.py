"""The driver's promises: the user's model is never modified; a failed gate or a failing rule
restores the snapshot exactly; decisions are recorded; save → load reproduces outputs."""

from typing import Literal

import pytest
import torch

from rewriter import graph as G
from rewriter import load, optimize
from rewriter.rule import RULES, Built, Refused, Rule, StepOptions, register


class _Opts(StepOptions):
    pass


def _zero_attention(gm, c, built, opts):
    """Damaging edit: the attention output becomes its query scaled by 100."""
    site = c.site
    n = G.node(gm, site.node)
    G.replace_with_op(gm, n, torch.ops.aten.mul.Tensor, (G.sdpa_args(n)["query"], 100.0), rule="_damage", site=site.index)


def _half_edit_then_raise(gm, c, built, opts):
    site = c.site
    n = G.node(gm, site.node)
    G.replace_with_op(gm, n, torch.ops.aten.mul.Tensor, (G.sdpa_args(n)["query"], 0.0), rule="_boom", site=site.index)
    raise RuntimeError("rule failed halfway through its edit")


for _name, _apply in (("_damage", _zero_attention), ("_boom", _half_edit_then_raise)):
    if _name not in RULES:
        register(Rule(_name, paper="test", summary="test rule", exact=False, options=_Opts,
                      check=lambda s, o: None, build=lambda c, s, o: {}, apply=_apply))


def _refuse_odd_sites(ctx, c, opts):
    facts = {"measured": c.site.index}
    if c.site.index % 2:
        raise Refused(f"site {c.site.index} measured unsuitable", facts)
    return Built({}, facts)


if "_refuse" not in RULES:
    register(Rule("_refuse", paper="test", summary="test rule", exact=False, options=_Opts,
                  check=lambda s, o: None, build=_refuse_odd_sites, apply=_zero_attention))


def _recipe(step, metric="embedding_cosine", **bound):
    bound = bound or {"min": 0.97}
    return {"calibration": {"samples": 16, "seq_len": 32, "batch_size": 8, "heldout": 8},
            "gate": {"metric": metric, **bound}, "steps": [step]}


def _outputs(m, batch):
    with torch.no_grad():
        return m(**batch).last_hidden_state


def test_success_leaves_user_model_bit_identical(minilm, frozen_state, state_equal):
    before = frozen_state(minilm.model)
    training = minilm.model.training
    opt = optimize(minilm, _recipe({"drop_attention": {"max_layers": 1}}), measure_latency=False, progress=False)
    assert any(r.status == "applied" for r in opt.report.records)
    assert state_equal(minilm.model, before) and minilm.model.training == training


@pytest.mark.parametrize("rule", ["_damage", "_boom"])
def test_rollback_restores_snapshot_exactly(bert, frozen_state, state_equal, rule):
    before = frozen_state(bert.model)
    batch = bert.example_inputs(batch=3, seq_len=20)
    opt = optimize(bert, _recipe({rule: {"layers": "0-1"}}), measure_latency=False, progress=False)
    statuses = {r.status for r in opt.report.records}
    assert statuses == ({"rolled_back"} if rule == "_damage" else {"error"})
    for r in opt.report.records:
        assert r.reason and (("gate:" in r.reason) if rule == "_damage" else ("halfway" in r.reason))
    # the rewritten graph equals a fresh, unrewritten trace: same nodes, same outputs bit for bit
    base = optimize(bert, _recipe({"drop_attention": {"max_layers": 1, "layers": [99]}}),
                    measure_latency=False, progress=False)
    assert [n.name for n in opt.graph_module.graph.nodes] == [n.name for n in base.graph_module.graph.nodes]
    assert torch.equal(_outputs(opt, batch), _outputs(base, batch))
    assert state_equal(bert.model, before)


def test_save_load_replays_exactly(minilm, tmp_path):
    opt = optimize(minilm, _recipe({"drop_attention": {"max_layers": 2, "compensate": "mean"}}, min=0.9),
                   measure_latency=False, progress=False)
    assert sum(r.status == "applied" for r in opt.report.records) == 2
    opt.save(tmp_path / "m")
    for f in ("recipe.yaml", "report.json", "records.json", "tensors.safetensors"):
        assert (tmp_path / "m" / f).exists()
    again = load(tmp_path / "m", model=minilm)
    batch = minilm.example_inputs(batch=3, seq_len=24)
    assert torch.equal(_outputs(opt, batch), _outputs(again, batch))
    assert [r.status for r in again.report.records] == [r.status for r in opt.report.records]


def test_budget_stops_with_reason(bert):
    rec = _recipe({"drop_attention": {}})
    rec["budget"] = {"max_sites": 1}
    rec["gate"] = {"metric": "embedding_cosine", "min": 0.0}
    opt = optimize(bert, rec, measure_latency=False, progress=False)
    assert sum(r.status == "applied" for r in opt.report.records) == 1
    assert "max_sites=1" in opt.report.stop_reason


def test_torch_compile_runs_on_result(bert):
    opt = optimize(bert, _recipe({"drop_attention": {"max_layers": 1}}, min=0.0), measure_latency=False, progress=False)
    assert any(r.status == "applied" for r in opt.report.records)
    batch = bert.example_inputs(batch=2, seq_len=16)
    compiled = torch.compile(opt, backend="inductor")
    torch.testing.assert_close(_outputs(compiled, batch), _outputs(opt, batch), rtol=1e-4, atol=1e-4)


def test_gate_judges_on_validation_samples_when_asked(bert):
    """With calibration.validation, each record's gate metric is the one measured on the
    validation batches (never fitted on), and the report says so."""
    from rewriter.models import make_calibration
    from rewriter.gate import Gate
    from rewriter.recipe import GateSpec
    rec = _recipe({"drop_attention": {"max_layers": 1}}, min=0.0)
    rec["calibration"]["validation"] = 8
    calib = make_calibration(bert, **rec["calibration"])
    opt = optimize(bert, rec, calibration=calib, measure_latency=False, progress=False)
    (applied,) = [r for r in opt.report.records if r.status == "applied"]
    spec = GateSpec(metric="embedding_cosine", min=0.0)
    on_val = Gate.from_model(spec, bert.model, calib.validation, bert).measure(opt)
    on_cal = Gate.from_model(spec, bert.model, calib.batches, bert).measure(opt)
    assert applied.metric_after == pytest.approx(on_val.value, abs=1e-6)
    assert on_val.value != pytest.approx(on_cal.value, abs=1e-6)
    assert "gate judged on 1 validation batches" in str(opt.report)


def test_build_can_refuse_a_site_with_a_reason(bert, frozen_state, state_equal):
    """A Refused raised by build is a rejection (with the rule's reason and what it measured),
    not an error, and leaves the graph as it was."""
    opt = optimize(bert, _recipe({"_refuse": {"layers": "0-1"}}, min=0.0), measure_latency=False, progress=False)
    r0, r1 = opt.report.records
    assert (r0.status, r1.status) == ("applied", "rejected")
    assert r1.reason == "site 1 measured unsuitable" and r1.info == {"measured": 1}
    assert sum(n.target is G.SDPA for n in opt.graph_module.graph.nodes) == 3


# ---- patience: a ranked step stops after consecutive gate failures ------------------------------------

class _ListedOpts(StepOptions):
    order: Literal["listed", "plan", "damage"] = "listed"    # the rule ranks its own candidates ("listed")
    bad: list[int] = []                                      # sites whose edit is damaging


def _scale_attention(gm, c, built, opts):
    """Scales the attention output by 1 (harmless, exact) or, on the `bad` sites, its query by 100."""
    n = G.node(gm, c.site.node)
    if c.site.index in opts.bad:
        G.replace_with_op(gm, n, torch.ops.aten.mul.Tensor, (G.sdpa_args(n)["query"], 100.0),
                          rule="_listed", site=c.site.index)
    else:
        with gm.graph.inserting_after(n):
            m = gm.graph.call_function(torch.ops.aten.mul.Tensor, (n, 1.0))
        n.replace_all_uses_with(m)
        m.args = (n, 1.0)


if "_listed" not in RULES:
    register(Rule("_listed", paper="test", summary="test rule", exact=False, options=_ListedOpts,
                  check=lambda s, o: None, build=lambda c, s, o: {}, apply=_scale_attention))


def _statuses(opt):
    return [(r.sites, r.status) for r in opt.report.records]


def test_patience_stops_a_ranked_step_with_the_reason(bert):
    """Two gate failures in a row end a ranked step: the untried candidates are skipped, each naming
    the rule; a success in between resets the count; patience: null and unranked steps try all."""
    def run(**o):
        return optimize(bert, _recipe({"_listed": {"patience": 2, **o}}), measure_latency=False,
                        progress=False)

    opt = run(bad=[1, 2])
    assert _statuses(opt) == [((0,), "applied"), ((1,), "rolled_back"), ((2,), "rolled_back"),
                              ((3,), "skipped")]
    assert opt.report.records[-1].reason == ("patience=2: 2 ranked candidates in a row failed the gate; the "
                                             "remaining ones rank as more damaging")
    assert [s for _, s in _statuses(run(bad=[1, 3]))] == ["applied", "rolled_back", "applied", "rolled_back"]
    assert [s for _, s in _statuses(run(bad=[1, 2], patience=3))][-1] == "applied"
    assert [s for _, s in _statuses(run(bad=[0, 1], patience=1))] == ["rolled_back"] + ["skipped"] * 3
    assert [s for _, s in _statuses(run(bad=[1, 2], patience=None))][-1] == "applied"
    assert [s for _, s in _statuses(run(bad=[1, 2], order="plan"))][-1] == "applied"   # not ranked


def test_patience_ends_the_damage_ranking_too(bert):
    """order: damage puts the least damaging first; with every candidate damaging, two are tried."""
    opt = optimize(bert, _recipe({"_damage": {"order": "damage", "patience": 2}}), measure_latency=False,
                   progress=False)
    assert [r.status for r in opt.report.records] == ["rolled_back"] * 2 + ["skipped"] * 2
    assert all("damage_alone" in r.info for r in opt.report.records)
    assert all(r.reason.startswith("patience=2") for r in opt.report.records[2:])


def test_a_first_capture_rides_on_the_first_measurement(llama, monkeypatch):
    """Drop's importance capture over the calibration batches is taken during the gate's measurement
    of the unrewritten graph (one forward pass instead of two): no separate capture pass runs, and
    the scores, order and decisions are those of the separate pass, to the last digit."""
    import torch.fx as fx

    from rewriter.driver import Driver
    recipe = {"calibration": {"samples": 8, "seq_len": 32, "batch_size": 4, "heldout": 0},
              "gate": {"metric": "perplexity_ratio", "max": 1.5}, "steps": [{"drop_attention": {"max_layers": 2}}]}
    runs = []
    real = fx.Interpreter.run
    monkeypatch.setattr(fx.Interpreter, "run", lambda self, *a, **k: runs.append(1) or real(self, *a, **k))

    def decisions():
        opt = optimize(llama, recipe, progress=False, measure_latency=False)
        return [(r.sites, r.status, r.metric_before, r.metric_after, r.info.get("importance"))
                for r in opt.report.records]
    shared = decisions()
    assert runs == [] and len(shared) == 4 and shared[0][4] is not None
    monkeypatch.setattr(Driver, "_first_pass", lambda self, names, reduce: None)
    assert decisions() == shared and runs          # the separate capture pass: the same numbers
