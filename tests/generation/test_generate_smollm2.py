"""Generation on the real SmolLM2-135M (slow): greedy generate with no rule gives transformers'
tokens for three prompts and for a left-padded batch, and again after save → load; prefill + steps
reproduce the full-sequence logits of a model rewritten by every exact-lowering rule at once."""
import pytest
import torch

from rewriter import load, optimize
from rewriter.generate import lowered

pytestmark = pytest.mark.slow

OPEN_GATE = {"metric": "relative_rms", "max": 100.0}
CAL = {"samples": 2, "seq_len": 32, "batch_size": 2, "heldout": 0}
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def plain(smollm2):
    """SmolLM2 through optimize with a step that selects no site: the traced, canonicalized graph."""
    none = [{"drop_attention": {"layers": [99]}}]
    return optimize(smollm2, {"calibration": CAL, "gate": OPEN_GATE, "steps": none}, progress=False,
                    measure_latency=False)


def _ids(tok, text):
    return tok(text, return_tensors="pt").input_ids


def test_greedy_tokens_match_transformers(smollm2, plain):
    for text in PROMPTS:
        ids = _ids(smollm2.tokenizer, text)
        want = smollm2.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32,
                                      do_sample=False)
        got = plain.generate(ids, max_new_tokens=32)
        assert torch.equal(got, want), (text, got, want)


def test_left_padded_batch_matches_transformers_and_survives_save_load(smollm2, plain, tmp_path):
    tok = smollm2.tokenizer
    side, tok.padding_side = tok.padding_side, "left"
    try:
        b = tok([PROMPTS[0], PROMPTS[2]], return_tensors="pt", padding=True)
    finally:
        tok.padding_side = side
    assert not b.attention_mask.bool().all(), "the batch must hold padding"
    want = smollm2.model.generate(**b, max_new_tokens=32, do_sample=False)
    got = plain.generate(b.input_ids, b.attention_mask, max_new_tokens=32)
    assert torch.equal(got, want)
    plain.save(tmp_path / "m")
    again = load(tmp_path / "m")
    assert torch.equal(again.generate(b.input_ids, b.attention_mask, max_new_tokens=32), want)


def test_every_exact_lowering_reproduces_full_sequence_logits(smollm2):
    """One model with a dropped attention, a dropped block, a MASA group, linear attention with and
    without a window and the fused causal path on the rest: 12 prefill tokens then 8 steps."""
    steps = [{"drop_attention": {"layers": [3]}}, {"drop_block": {"layers": [20]}},
             {"masa": {"layers": "5-8", "atoms": 0.5}}, {"linear_attention": {"layers": [0, 1], "steps": 0}},
             {"linear_attention": {"layers": [10, 11], "window": 4, "steps": 0}}, {"causal_fastpath": {}}]
    opt = optimize(smollm2, {"calibration": CAL, "gate": OPEN_GATE, "steps": steps}, progress=False,
                   measure_latency=False)
    applied = {r.rule for r in opt.records if r.status == "applied"}
    assert applied == {"drop_attention", "drop_block", "masa", "linear_attention", "causal_fastpath"}, \
        [(r.rule, r.status, r.reason) for r in opt.records]
    low = lowered(opt)
    forms = {s.site: s.form for s in low.sites}
    assert forms[3] == forms[20] == "dropped" and forms[0] == forms[1] == "linear"
    assert forms[10] == forms[11] == "hybrid" and forms[5] == forms[29] == "kv"
    ids = smollm2.tokenizer(" ".join(PROMPTS), return_tensors="pt").input_ids[:, :20]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = opt(input_ids=ids, attention_mask=mask).logits
        out = low.prefill(ids[:, :12], mask[:, :12], torch.arange(12)[None])
        logits, state = [out[0]], low.start(list(out[low.n_outputs:]), 20)
        key_valid = torch.ones(1, 20, dtype=torch.bool)
        for s in range(12, 20):
            out = low.decode(ids[:, s:s + 1], mask[:, s:s + 1], torch.tensor([[s]]), torch.tensor([s]),
                             key_valid, *state)
            logits.append(out[0])
            state = list(out[low.n_outputs:])
    steps_logits = torch.cat(logits, 1)
    assert ((steps_logits - full).abs().max() / full.abs().max()).item() <= 1e-4
