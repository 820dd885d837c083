"""What optimize does to the user's own model: nothing, even when interrupted; and a bf16 model comes
back bf16 (issue 14: properties found to hold, kept tested)."""
from __future__ import annotations

import pytest
import torch

from rewriter import optimize
from rewriter.models import load_model

RECIPE = {"calibration": {"samples": 4, "seq_len": 16, "batch_size": 4, "heldout": 0, "text": "bundled",
                          "lengths": [16]},
          "gate": {"metric": "relative_rms", "max": 100.0},
          "steps": [{"drop_attention": {"layers": "0-1"}}, {"linear_attention": {"feature_map": "elu1",
                                                                                 "steps": 2}}]}


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_an_interrupted_optimize_leaves_the_input_model_bit_identical():
    loaded = load_model("llama")
    model = loaded.model.train()                          # in training mode: it must come back so
    before = _state(model)
    seen = []

    def interrupt(record):
        seen.append(record)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        optimize(model, RECIPE, tokenizer=loaded.tokenizer, progress=interrupt, measure_latency=False)
    assert seen, "the interrupt came after the first decision"
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert model.training and all(m.training for m in model.modules())


def test_a_bf16_model_optimizes_and_keeps_its_dtype():
    loaded = load_model("llama")
    model = loaded.model.to(torch.bfloat16)
    opt = optimize(model, RECIPE, tokenizer=loaded.tokenizer, progress=False, measure_latency=False)
    assert [r.status for r in opt.report.records if r.rule == "drop_attention"] == ["applied"] * 2
    assert any(r.status == "applied" for r in opt.report.records if r.rule == "linear_attention")
    ids = torch.randint(0, 100, (2, 12))
    out = opt(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    floats = [p.dtype for p in opt.graph_module.parameters() if p.is_floating_point()]
    floats += [b.dtype for b in opt.graph_module.buffers() if b.is_floating_point()]
    assert floats and set(floats) == {torch.bfloat16}
    assert next(model.parameters()).dtype == torch.bfloat16
