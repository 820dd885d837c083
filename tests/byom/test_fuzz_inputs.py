"""Property: whatever a user hands an OptimizedModel (wrong names, dtypes, ranks, lengths beyond the
position table, batch 1, length 1, padding), it returns what the original model returns or raises
one InputError, on one line, naming an input. The optimized models are exact here (a gate no drop can
pass rolls the drop back, leaving the canonicalized graph), so "correct" means equal to the original."""
import sys
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from rewriter import optimize  # noqa: E402
from rewriter.api import InputError, _resolve  # noqa: E402
from rewriter.models import main_output  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import zoo_factory as Z  # noqa: E402

EXACT = {"calibration": {"samples": 4, "seq_len": 8, "batch_size": 2, "heldout": 0},
         "gate": {"metric": "relative_rms", "max": 1e-6}, "steps": [{"drop_attention": {"layers": [0]}}]}
POSITIONS = 64          # the families' position tables (max_position_embeddings / n_positions)


@pytest.fixture(scope="module", params=["bert", "gpt2"])
def subject(request):
    model = Z.family(request.param)
    loaded = _resolve(model, None)
    opt = optimize(model, EXACT, calibration=[loaded.inputs_fn(2, 8, s) for s in range(3)], progress=False,
                   measure_latency=False)
    assert [r.status for r in opt.records] == ["rolled_back"]
    return model, opt


@st.composite
def calls(draw):
    batch, length = draw(st.integers(1, 3)), draw(st.integers(1, POSITIONS + 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 99)))
    ids = torch.randint(0, 128, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for r in range(batch):
        mask[r, draw(st.integers(1, length)):] = 0
    dtype = draw(st.sampled_from([torch.int64, torch.int64, torch.int32, torch.float32]))
    kwargs = {"input_ids": ids.to(dtype), "attention_mask": mask}
    fault = draw(st.sampled_from(["none", "none", "rename", "drop", "extra", "rank", "short_mask"]))
    if fault == "rename":
        key = draw(st.sampled_from(sorted(kwargs)))
        kwargs[draw(st.sampled_from([key + "s", key[:-1], key.upper()]))] = kwargs.pop(key)
    elif fault == "drop":
        kwargs.pop(draw(st.sampled_from(sorted(kwargs))))
    elif fault == "extra":
        kwargs["pixel_values"] = torch.zeros(batch, 3, 4, 4)
    elif fault == "rank":
        kwargs["input_ids"] = kwargs["input_ids"][0]
    elif fault == "short_mask" and length > 1:
        kwargs["attention_mask"] = mask[:, :-1]
    positional = draw(st.booleans()) and fault == "none"
    return kwargs, positional


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(call=calls())
def test_every_input_gives_the_original_output_or_one_line_naming_an_input(subject, call):
    model, opt = subject
    kwargs, positional = call
    try:
        with torch.no_grad():
            # input_ids is the first parameter of both forwards (GPT-2's second is `cache`, not the mask)
            if positional:
                got = opt(kwargs["input_ids"], attention_mask=kwargs["attention_mask"])
            else:
                got = opt(**kwargs)
    except InputError as e:
        msg = str(e)
        assert "\n" not in msg and msg
        assert any(f"'{k}'" in msg for k in set(kwargs) | {"input_ids", "attention_mask"}), msg
        return
    # accepted: it must be a valid call of the original, and give its output on the real tokens
    assert kwargs["input_ids"].dtype == torch.int64 and kwargs["input_ids"].dim() == 2
    assert kwargs["input_ids"].shape[1] <= POSITIONS
    assert kwargs["attention_mask"].shape == kwargs["input_ids"].shape
    with torch.no_grad():
        want = main_output(model(**kwargs))
    got = main_output(got)
    valid = kwargs["attention_mask"].bool()
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
