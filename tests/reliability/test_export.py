"""Batch and length stay dynamic whatever the example's sizes, 1 included. torch.export specializes
every dim whose example size is 0 or 1, so before the trace widened such dims
(`rewriter.trace.widen`) a model traced on one row took one row only (`Guard failed:
input_ids.size()[0] == 1`). Here: the traced graph from batch-1 and length-1 examples is exact at
other sizes, a recipe calibrated at batch_size 1 (examples/recipes/smollm2-routing.yaml) serves other
batch sizes, and a size-1 dim that cannot be widened falls back and says so. Every rule's result
calibrated, saved, loaded and exported from batch 1: tests/engine/test_onnx.py."""
import logging
from pathlib import Path

import pytest
import torch

from rewriter import optimize
from rewriter.models import load_model, main_output, wrap_module
from rewriter.recipe import load_recipe
from rewriter.trace import trace, widen

ROOT = Path(__file__).parents[2]


def _padded(loaded, batch, seq):
    x = loaded.example_inputs(batch=batch, seq_len=seq)
    if seq > 2:
        x["attention_mask"][-1, seq // 2 + 1:] = 0
    return x


@pytest.mark.parametrize("name", ["bert", "gpt2", "llama"])
@pytest.mark.parametrize("traced_len", [1, 16])
def test_a_graph_traced_on_one_row_is_exact_at_other_batch_sizes_and_lengths(name, traced_len):
    loaded = load_model(name, num_hidden_layers=2)
    gm = trace(loaded.model, (), loaded.example_inputs(batch=1, seq_len=traced_len), io=loaded)
    with torch.no_grad():
        for B, T in ((3, 11), (1, 1), (2, 1), (1, 16), (4, 5)):
            x = _padded(loaded, B, T)
            real = x["attention_mask"].bool()
            torch.testing.assert_close(main_output(gm(**x))[real], main_output(loaded.model(**x))[real],
                                       rtol=1e-5, atol=1e-5)


def test_a_vision_graph_traced_on_one_image_takes_a_batch():
    loaded = load_model("vit", num_hidden_layers=2)
    gm = trace(loaded.model, (), loaded.example_inputs(batch=1), io=loaded)
    x = loaded.example_inputs(batch=3)
    with torch.no_grad():
        torch.testing.assert_close(main_output(gm(**x)), main_output(loaded.model(**x)), rtol=1e-5, atol=1e-5)


def test_widen_repeats_only_the_dynamic_dims_of_size_one():
    loaded = load_model("bert", num_hidden_layers=2)
    x = loaded.example_inputs(batch=1, seq_len=1)
    args, kw, widened = widen(loaded, (), x)
    assert sorted(widened) == sorted(f"{k}.shape[{d}]" for k in x for d in (0, 1))
    assert all(v.shape == (2, 2) and (v == x[k]).all() for k, v in kw.items())
    assert widen(loaded, (), loaded.example_inputs(batch=2, seq_len=5))[2] == []
    images = load_model("vit", num_hidden_layers=2).example_inputs(batch=1)["pixel_values"]
    _, kw, widened = widen(load_model("vit", num_hidden_layers=2), (), {"pixel_values": images})
    assert widened == ["pixel_values.shape[0]"] and kw["pixel_values"].shape[1:] == images.shape[1:]


def test_the_routing_example_recipe_calibrated_at_batch_one_serves_other_batch_sizes():
    """examples/recipes/smollm2-routing.yaml calibrates with batch_size 1; its steps and calibration
    batch size on a tiny Llama (shorter chunks, a loose gate) give a model that takes three rows,
    each as it gives alone."""
    r = load_recipe(ROOT / "examples" / "recipes" / "smollm2-routing.yaml")
    assert r.calibration.batch_size == 1
    loaded = load_model("llama", num_hidden_layers=2)
    calib = r.calibration.model_dump() | {"samples": 2, "seq_len": 128, "lengths": [128], "heldout": 0,
                                          "validation": 0}
    recipe = {"calibration": calib, "gate": {"metric": "relative_rms", "max": 100.0},
              "steps": [{s.rule: s.options.model_dump(exclude_unset=True)} for s in r.steps]}
    opt = optimize(loaded, recipe, progress=False, measure_latency=False)
    assert [x.status for x in opt.records] == ["applied", "applied"]
    x = _padded(loaded, 3, 100)
    real = x["attention_mask"].bool()
    with torch.no_grad():
        y = main_output(opt(**x))
        for i in range(3):
            yi = main_output(opt(**{k: v[i:i + 1] for k, v in x.items()}))
            torch.testing.assert_close(y[i][real[i]], yi[0][real[i]], rtol=1e-5, atol=1e-5)


class Flatten(torch.nn.Module):
    """Reads x [B, T, D] as [B, T·D]: works only at the T it was built for (here 1), so widening the
    length cannot trace, while the batch can still be widened."""

    def __init__(self, d=4):
        super().__init__()
        self.w = torch.nn.Linear(d, 3)

    def forward(self, x):
        return self.w(x.reshape(x.shape[0], -1))


def test_a_dim_that_cannot_be_widened_stays_fixed_the_batch_still_dynamic_and_a_warning_says_so(caplog):
    m = Flatten().eval()
    with caplog.at_level(logging.WARNING, logger="rewriter.trace"):
        gm = trace(m, (torch.randn(1, 1, 4),), io=wrap_module(m))      # dims 0 and 1 dynamic
    assert any("x.shape[1]" in rec.getMessage() and "fixed at size 1" in rec.getMessage()
               for rec in caplog.records), [rec.getMessage() for rec in caplog.records]
    x = torch.randn(3, 1, 4)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)
