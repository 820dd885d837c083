"""The latency entry's cost rule (rewriter.report.latency, issue 15): a time budget, a warm-up pair and
one timed pair per row, more pairs only while a row's speed-up is unstable and the budget lasts, the
main entry's batch cut to the rows one call can afford, and only the recipe's length when no rewrite
was kept. The rule is checked on a simulated clock (models that advance it by a stated time per
call), so every decision it takes is exact and no test depends on this machine's speed; one test runs
it for real through optimize on the tiny BERT."""
from __future__ import annotations

import pytest
import torch

from rewriter import optimize
from rewriter.report import (MAIN_MAX_FLOPS, MIN_PAIRS, NOT_KEPT, STABLE_SPREAD, Report, head_rows, latency,
                             main_rows)


class Clock:
    """A clock that only moves when a simulated model is called."""

    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class Model:
    """Calling it takes `seconds(rows, length, i)` on the clock (i: its earlier calls at that shape);
    it logs the input shapes."""

    def __init__(self, clock: Clock, seconds):
        self.clock, self.seconds, self.calls = clock, seconds, []

    def __call__(self, input_ids, attention_mask=None):
        rows, n = input_ids.shape
        self.clock.t += self.seconds(rows, n, self.calls.count((rows, n)))
        self.calls.append((rows, n))


def _batch(rows=8, n=256) -> dict:
    ids = torch.arange(rows * n).reshape(rows, n) % 97
    return {"input_ids": ids, "attention_mask": torch.ones(rows, n, dtype=torch.long)}


def _stretch(batch: dict, n: int) -> dict:
    """Row 0 at length n (as rewriter.report.stretch does for a causal LM)."""
    return {k: v[:1].repeat(1, -(-n // v.shape[1]))[:, :n] for k, v in batch.items()}


def _linear(per_token_s: float):
    return lambda rows, n, i: rows * n * per_token_s


FLOPS_PER_TOKEN = 3e8            # SmolLM2-like: 1 row of 256 tokens = 7.7e10 FLOPs, over the main cap / 2


def _cost(n: int) -> float:
    return FLOPS_PER_TOKEN * n


def test_main_rows_cut_the_calibration_batch_to_what_one_call_can_afford():
    assert main_rows(8, 7.4e10) == 1                       # SmolLM2 at 256 tokens: one row
    assert main_rows(8, 2.9e9) == 8                        # MiniLM at 128 tokens: the whole batch
    assert main_rows(8, MAIN_MAX_FLOPS / 3) == 3           # as many as fit
    assert main_rows(8, MAIN_MAX_FLOPS * 5) == 1           # at least one
    assert main_rows(8, None) == 8 and main_rows(None, 1e12) is None     # no count: as it was
    b = head_rows(_batch(8), 3)
    assert b["input_ids"].shape == (3, 256) and torch.equal(b["input_ids"], _batch(8)["input_ids"][:3])


def test_no_rewrite_kept_times_only_the_recipes_length_once():
    clock = Clock()
    orig, new = Model(clock, _linear(1e-3)), Model(clock, _linear(1e-3))
    L = latency(orig, new, _batch(8), lengths=[256, 1024, 4096], stretch=_stretch, predict=lambda n: 1.0,
                cost=_cost, kept=False, clock=clock)
    # the main entry is one row (7.7e10 FLOPs per row > MAIN_MAX_FLOPS / 2) and by_length's only row
    # is that very measurement; no call at another length or batch was made
    assert L["batch"] == 1 and L["input_shape"] == [1, 256]
    assert L["sweep"]["main_batch"]["rows"] == 1 and L["sweep"]["main_batch"]["of"] == 8
    assert [r["seq_len"] for r in L["by_length"]] == [256]
    assert {k: L["by_length"][0][k] for k in ("before_ms", "after_ms", "pairs")} == \
           {k: L[k] for k in ("before_ms", "after_ms", "pairs")}
    assert set(orig.calls) == set(new.calls) == {(1, 256)}
    assert len(orig.calls) == 1 + L["pairs"] and L["pairs"] == MIN_PAIRS      # warm-up + pairs; stable
    assert L["sweep"]["skipped"] == [{"seq_len": 1024, "why": NOT_KEPT}, {"seq_len": 4096, "why": NOT_KEPT}]
    assert L["crossover"] == {"seq_len": None, "why": NOT_KEPT} and L["sweep"]["note"] == NOT_KEPT
    text = str(Report("m", "causal_lm", [], [], 1, 1, 0, 0, latency=L))
    assert "latency across lengths" in text and "no rewrite was kept" in text
    assert "latency not timed at 1024, 4096 tokens" in text


def test_the_budget_skips_the_lengths_it_cannot_afford_and_says_why():
    clock = Clock()
    # 1 ms per token and row: 256 tokens 0.256 s, 1024 1.02 s, 4096 4.1 s per call
    orig, new = Model(clock, _linear(1e-3)), Model(clock, _linear(1e-3))
    L = latency(orig, new, _batch(8), lengths=[256, 1024, 4096], stretch=_stretch, cost=_cost,
                budget_s=6.0, clock=clock)
    # 256 (the main entry, one row, and by_length's first): warm-up + MIN_PAIRS pairs (1.5 s); 1024:
    # predicted 2 pairs × 0.51 s × 4 = 4.1 s, fits (ends at 5.6 s); 4096: predicted 16.4 s, does not:
    # skipped, with why; 256 is stable, and one more pair at 1024 (2 s) would pass the budget
    assert [r["seq_len"] for r in L["by_length"]] == [256, 1024]
    (skip,) = L["sweep"]["skipped"]
    assert skip["seq_len"] == 4096 and "latency budget (6 s) would run out" in skip["why"]
    assert (1, 4096) not in orig.calls
    assert [r["pairs"] for r in L["by_length"]] == [2, 1]
    assert L["sweep"]["seconds"] <= 6.0 and L["sweep"]["pairs"] == 3
    assert L["by_length"][1]["spread"] is None


def test_unstable_rows_take_more_pairs_up_to_their_maximum_stable_ones_stop():
    clock = Clock()
    # the rewritten model is 10 % faster on every other call at a shape: its speed-up never settles
    noisy = lambda rows, n, i: rows * n * 1e-3 * (0.9 if i % 2 else 1.0)  # noqa: E731
    orig, new = Model(clock, _linear(1e-3)), Model(clock, noisy)
    L = latency(orig, new, _batch(8), lengths=[256, 1024], stretch=_stretch, cost=_cost,
                repeats=5, long_repeats=3, budget_s=1e6, clock=clock)
    assert L["pairs"] == 5 and L["by_length"][1]["pairs"] == 3                # the maxima
    assert L["spread"] > STABLE_SPREAD
    clock = Clock()
    orig, new = Model(clock, _linear(1e-3)), Model(clock, _linear(0.5e-3))   # 2× faster, steadily
    L = latency(orig, new, _batch(8), lengths=[256, 1024], stretch=_stretch, cost=_cost, budget_s=1e6,
                clock=clock)
    assert [r["pairs"] for r in L["by_length"]] == [MIN_PAIRS, MIN_PAIRS]
    assert L["speedup"] == pytest.approx(2.0) and L["crossover"]["seq_len"] == 256


def test_the_recipes_length_is_timed_even_with_no_budget_left():
    clock = Clock()
    orig, new = Model(clock, _linear(1e-3)), Model(clock, _linear(1e-3))
    L = latency(orig, new, _batch(8), lengths=[256, 1024], stretch=_stretch, cost=_cost, budget_s=0.0,
                clock=clock)
    assert L["pairs"] == MIN_PAIRS and [r["seq_len"] for r in L["by_length"]] == [256]
    assert [x["seq_len"] for x in L["sweep"]["skipped"]] == [1024]


def test_a_cheap_model_keeps_its_whole_batch_and_times_every_length():
    clock = Clock()
    orig, new = Model(clock, _linear(1e-6)), Model(clock, _linear(1e-6))
    L = latency(orig, new, _batch(8, 128), lengths=[128, 512, 2048], stretch=_stretch,
                cost=lambda n: 2e7 * n, clock=clock)
    assert L["batch"] == 8 and "main_batch" not in L["sweep"] and not L["sweep"]["skipped"]
    assert [r["seq_len"] for r in L["by_length"]] == [128, 512, 2048]
    assert (8, 128) in orig.calls and (1, 128) in orig.calls        # the main entry and its row differ


def test_a_length_the_inputs_cannot_be_built_at_is_named_and_the_rest_kept():
    clock = Clock()
    orig, new = Model(clock, _linear(1e-3)), Model(clock, _linear(1e-3))

    def stretch(batch, n):
        if n > 1024:
            raise ValueError("input_ids takes at most 1024")
        return _stretch(batch, n)
    L = latency(orig, new, _batch(8), lengths=[256, 1024, 4096], stretch=stretch, cost=_cost,
                budget_s=1e6, clock=clock)
    assert [r["seq_len"] for r in L["by_length"]] == [256, 1024]
    assert L["by_length_error"].startswith("at 4096 tokens: ValueError: input_ids takes at most 1024")


def test_optimize_reports_the_sweep_and_times_one_length_when_nothing_was_kept(bert):
    """Through optimize (tiny BERT, a gate nothing passes): the report still has latency across lengths,
    one row at the recipe's length, the others named as skipped, and the budget it kept to."""
    opt = optimize(bert, {"steps": [{"drop_attention": {"layers": [0]}}],
                          "gate": {"metric": "relative_rms", "max": 1e-12},
                          "calibration": {"samples": 2, "seq_len": 16, "batch_size": 2, "heldout": 0}},
                   progress=False)
    assert [r.status for r in opt.report.records] == ["rolled_back"]
    L = opt.report.to_dict()["latency"]
    # the recipe's length is 16; the main entry's calibration batch holds 15 tokens of text
    assert [r["seq_len"] for r in L["by_length"]] == [16] and L["by_length"][0]["pairs"] >= 1
    assert L["sweep"]["note"] == NOT_KEPT and {x["seq_len"] for x in L["sweep"]["skipped"]} == {64, 256}
    assert L["sweep"]["budget_s"] > 0 and L["sweep"]["seconds"] > 0
    assert L["batch"] == 2                                     # a tiny model keeps its whole batch


def test_the_slower_warning_names_the_traced_original_when_nothing_was_kept():
    from rewriter.report import latency_warning
    lat = {"seq_len": 256, "batch": 1, "before_ms": 700.0, "after_ms": 724.0, "speedup": 0.967,
           "sweep": {"note": NOT_KEPT}}
    assert latency_warning(lat).startswith("the result (no rewrite was kept: the original through its traced")
    assert latency_warning({**lat, "sweep": {}}).startswith("the rewritten model is SLOWER")
