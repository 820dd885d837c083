"""A gate that judges generation (issue 12): `gate.decode` measures each candidate by a
teacher-forced decode of the lowered graph (prefill of a share of each gate batch, then one step
per token), perplexity ratio against the original on the decoded tokens only. Exact decode forms
measure what the full forward measures; block routing's step is approximate and is measured as it
decodes, so a bound the full-sequence rewrite meets can fail at decode."""
import sys
from pathlib import Path

import pytest
import torch

from rewriter import optimize
from rewriter.models import calibration_from
from rewriter.gate import Gate, decoded_only, prefill_length, run
from rewriter.generate import decoded_runner, lowered, teacher_forced
from rewriter.recipe import GateSpec, RecipeError, load_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import zoo_factory as Z  # noqa: E402

CAL = {"samples": 4, "seq_len": 96, "batch_size": 4, "heldout": 0}
ROUTE = [{"block_routing": {"block_size": 4, "keep": 0.25}}]


def _batches(seed=1, n=2, T=96):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(3, 128, (4, T), generator=g),
             "attention_mask": torch.ones(4, T, dtype=torch.long)} for _ in range(n)]


def _optimized(steps, gate):
    return optimize(Z.family("llama"), {"calibration": CAL, "gate": gate, "steps": steps},
                    calibration=_batches(), progress=False, measure_latency=False)


def test_prefill_share_and_judged_positions():
    assert [prefill_length(T, 0.5) for T in (1, 2, 3, 32)] == [1, 1, 2, 16]
    assert prefill_length(10, 0.99) == 9 and prefill_length(10, 0.01) == 1
    nll = torch.arange(12.0).reshape(2, 6)            # 7 tokens: the prefill holds 4 (round(3.5))
    kept = decoded_only(nll, 0.5)
    assert kept[:, :4].isnan().all() and torch.equal(kept[:, 4:], nll[:, 4:])


def test_recipe_decode_key():
    g = load_recipe({"gate": {"metric": "perplexity_ratio", "max": 1.05, "decode": True},
                     "steps": [{"drop_attention": {}}]}).gate
    assert g.decode_share == 0.5 and GateSpec(metric="perplexity_ratio", max=1.1).decode_share is None
    assert GateSpec(metric="perplexity_ratio", max=1.1, decode=0.25).decode_share == 0.25
    with pytest.raises(RecipeError, match=r"gate\.decode: .*metric kl cannot"):
        load_recipe({"gate": {"metric": "kl", "max": 0.1, "decode": True}, "steps": [{"drop_attention": {}}]})
    with pytest.raises(RecipeError, match=r"gate\.decode: decode 1\.5.*\(0, 1\)"):
        load_recipe({"gate": {"metric": "perplexity_ratio", "max": 1.1, "decode": 1.5},
                     "steps": [{"drop_attention": {}}]})


def test_exact_forms_measure_what_the_full_forward_measures():
    """drop + a KV site: the teacher-forced outputs equal the full forward's, so the decode gate's
    value is the full-forward gate's on the same (decoded) tokens."""
    opt = _optimized([{"drop_attention": {"layers": [0]}}], {"metric": "relative_rms", "max": 100.0})
    batches = _batches(seed=5)
    spec = GateSpec(metric="perplexity_ratio", max=1.5, decode=True)
    original = Z.family("llama").eval()
    gate = Gate.from_model(spec, original, batches, opt.io)
    gm = opt.graph_module
    low = lowered(opt)
    y = teacher_forced(low, opt.io, batches[0], 48)
    with torch.no_grad():
        full = gm(**batches[0]).logits
    assert ((y - full).abs().max() / full.abs().max()).item() <= 1e-4
    decoded = gate.measure(gm, decoded_runner(opt.sites, 0.5))
    forward = gate.measure(gm, run)
    assert decoded.value == pytest.approx(forward.value, rel=1e-5)
    assert decoded.value != 1.0                       # the drop changes something: a real measurement


def test_block_routing_is_judged_as_it_decodes():
    """Block routing at keep 0.25: the decode gate measures the decode step's own block choice,
    which is not the full-sequence one; the record's value (which the bound decides on) is that
    teacher-forced measurement, not the full forward's."""
    gate = {"metric": "perplexity_ratio", "max": 100.0, "decode": True}
    cal = {**CAL, "heldout": 4}
    opt = optimize(Z.family("llama"), {"calibration": cal, "gate": gate, "steps": ROUTE},
                   calibration=_batches(n=3), progress=False, measure_latency=False)
    applied = [r for r in opt.records if r.status == "applied"]
    assert applied, [(r.status, r.reason) for r in opt.records]
    spec = GateSpec(**gate)
    rec = load_recipe({"calibration": cal, "gate": gate, "steps": ROUTE})
    calib = calibration_from(opt.io, _batches(n=3), **rec.calibration.resolved(rec.steps))
    ref = Gate.from_model(spec, Z.family("llama").eval(), calib.gate_batches, opt.io)
    dec = ref.measure(opt.graph_module, decoded_runner(opt.sites, 0.5)).value
    full = ref.measure(opt.graph_module, run).value
    assert applied[-1].measurement.value == pytest.approx(dec, rel=1e-9)
    assert abs(dec - full) > 1e-4 * full              # decoding is measured, not the full forward
    # the held-out text is judged teacher-forced too
    assert calib.heldout
    held = Gate.from_model(spec, Z.family("llama").eval(), calib.heldout, opt.io)
    assert opt.report.heldout["value"] == pytest.approx(
        held.measure(opt.graph_module, decoded_runner(opt.sites, 0.5)).value, rel=1e-9)
