"""rewriter.models.Loaded as the engine's rewriter.io.ModelIO: main output, real tokens, labels,
mask inputs, dynamic dims and trace preparation, on registered tiny models and bare modules."""
import copy
import logging

import pytest
import torch
from torch.export import Dim

from rewriter.io import ModelIO
from rewriter.models import Loaded, load_model, main_output, wrap_module


class Bare(torch.nn.Module):
    """A user's own module: positional input, an optional padding mask, a tuple output."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x, attention_mask=None):
        y = self.proj(x)
        if attention_mask is not None:
            y = y * attention_mask[..., None]
        return y, y.mean(1)


class Kwargs(torch.nn.Module):
    """A forward that takes **kwargs: its inputs are known only from its example inputs."""

    def forward(self, **inputs):
        return inputs["x"] * inputs["key_padding_mask"][..., None]


@pytest.fixture(scope="module")
def vit():
    return load_model("vit")


@pytest.fixture(scope="module")
def bare():
    torch.manual_seed(0)
    return wrap_module(Bare())


def test_every_loaded_is_a_model_io(bert, llama, vit, bare):
    for loaded in (bert, llama, vit, bare, wrap_module(llama.model)):
        assert isinstance(loaded, ModelIO), loaded.name
    assert (bert.kind, llama.kind, vit.kind, bare.kind) == ("encoder", "causal_lm", "vision", "generic")


def test_main_output_is_logits_then_hidden_states_then_first_tensor(bert, llama, vit, bare):
    batch = bert.example_inputs(batch=2, seq_len=8)
    with torch.no_grad():
        out = bert.model(**batch)
        assert bert.main_output(out) is out.last_hidden_state
        assert bert.main_output(bert.model(**batch, return_dict=False)).shape == out.last_hidden_state.shape
        out = llama.model(**llama.example_inputs(batch=2, seq_len=8))
        assert llama.main_output(out) is out.logits and main_output(out) is out.logits
        out = vit.model(**vit.example_inputs(batch=2))
        assert vit.main_output(out) is out.last_hidden_state and out.last_hidden_state.shape == (2, 65, 64)
        y, pooled = bare.model(torch.randn(2, 5, 8))
    a, b, c = torch.zeros(1), torch.ones(2), torch.full((3,), 2.0)
    assert bare.main_output((y, pooled)) is y
    assert bert.main_output({"loss": a, "hidden_states": b, "logits": c}) is c, "logits wherever they stand"
    assert bert.main_output({"pooler_output": a, "last_hidden_state": b}) is b
    assert bert.main_output({"logits": None, "x": [b, c]}) is b
    with pytest.raises(TypeError, match="cannot find a tensor"):
        bare.main_output({"a": 1})


def test_valid_tokens_read_the_padding_mask(bert, llama, vit, bare):
    batch = bert.example_inputs(batch=3, seq_len=10)
    assert not batch["attention_mask"].all(), "the example has padding"
    with torch.no_grad():
        out = bert.model(**batch)
    v = bert.valid_tokens(batch, out.last_hidden_state)
    assert v.dtype == torch.bool and torch.equal(v, batch["attention_mask"].bool())
    pooled = bert.valid_tokens(batch, out.pooler_output)                    # [B, C]: one per sample
    assert pooled.shape == (3,) and pooled.all()
    short = {"attention_mask": batch["attention_mask"][:, :4]}               # not this output's mask
    assert bert.valid_tokens(short, out.last_hidden_state).all()

    ids = llama.example_inputs(batch=2, seq_len=6)
    ids["attention_mask"][0, :2] = 0                                        # left padding
    logits = torch.zeros(2, 6, 11)
    assert torch.equal(llama.valid_tokens(ids, logits), ids["attention_mask"].bool())

    pixels = vit.example_inputs(batch=2)
    assert vit.valid_tokens(pixels, torch.zeros(2, 65, 64)).shape == (2, 65)
    assert vit.valid_tokens(pixels, torch.zeros(2, 65, 64)).all()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5])
    with torch.no_grad():
        y, _ = bare.model(torch.randn(2, 5, 8), mask)
    assert torch.equal(bare.valid_tokens({"x": None, "attention_mask": mask}, y), mask.bool())
    assert bare.valid_tokens({"x": None}, y).all()


def test_labels_only_for_causal_lms(bert, llama, vit, bare):
    batch = llama.example_inputs(batch=2, seq_len=8)
    assert llama.labels(batch) is batch["input_ids"]
    assert wrap_module(llama.model).labels(batch) is batch["input_ids"]
    assert llama.labels({"inputs_embeds": torch.zeros(2, 8, 64)}) is None
    assert bert.labels(bert.example_inputs(batch=2, seq_len=8)) is None
    assert vit.labels(vit.example_inputs(batch=2)) is None
    assert bare.labels({"input_ids": batch["input_ids"]}) is None


def test_mask_inputs_are_the_forward_mask_parameters(bert, llama, vit, bare):
    assert {"attention_mask", "encoder_attention_mask"} <= bert.mask_inputs()
    assert not bert.mask_inputs() & {"input_ids", "token_type_ids", "position_ids"}
    assert "attention_mask" in llama.mask_inputs() and "input_ids" not in llama.mask_inputs()
    assert "bool_masked_pos" not in vit.mask_inputs(), "masked positions are not an attention mask"
    assert bare.mask_inputs() == frozenset({"attention_mask"})
    assert wrap_module(torch.nn.Linear(4, 4)).mask_inputs() == frozenset()


def test_mask_inputs_of_a_kwargs_forward_come_from_its_example_inputs(caplog):
    def inputs_fn(batch, seq_len, seed):
        return {"x": torch.randn(batch, seq_len, 4), "key_padding_mask": torch.ones(batch, seq_len)}
    loaded = Loaded("kw", Kwargs(), "generic", None, 16, inputs_fn=inputs_fn)
    assert loaded.mask_inputs() == frozenset({"key_padding_mask"})

    def broken(batch, seq_len, seed):
        raise RuntimeError("no data here")
    with caplog.at_level(logging.WARNING, logger="rewriter.models"):
        assert Loaded("kw", Kwargs(), "generic", None, 16, inputs_fn=broken).mask_inputs() == frozenset()
    assert "kw: forward() takes **kwargs" in caplog.text and "no data here" in caplog.text


def test_dynamic_dims_per_tensor(bert, vit, bare):
    auto = Dim.AUTO
    for loaded in (bert, vit, bare):
        assert loaded.dynamic_dims(torch.zeros(2, 7, dtype=torch.long)) == {0: auto, 1: auto}
        assert loaded.dynamic_dims(torch.zeros(2, 7, 8)) == {0: auto, 1: auto}
        assert loaded.dynamic_dims(torch.zeros(2, 3, 32, 32)) == {0: auto}, "images keep H, W"
        assert loaded.dynamic_dims(torch.zeros(2)) == {0: auto}
        assert loaded.dynamic_dims(torch.tensor(1.0)) is None
        assert loaded.dynamic_dims(None) is None


def test_prepared_copy_exports_with_dynamic_batch_and_length():
    """What trace does with the protocol: prepare a copy (no KV cache: it cannot be exported), export
    it with the dynamic dims, and run it at another batch size and length: same logits as the model."""
    loaded = load_model("llama", use_cache=True, num_hidden_layers=1)
    subject = copy.deepcopy(loaded.model)
    loaded.prepare_trace(subject)
    assert subject.config.use_cache is False and loaded.model.config.use_cache is True, "only the copy"
    example = loaded.example_inputs(batch=2, seq_len=8)
    with torch.no_grad():
        ep = torch.export.export(subject, (), example, strict=False,
                                 dynamic_shapes={k: loaded.dynamic_dims(v) for k, v in example.items()})
        other = loaded.example_inputs(batch=3, seq_len=13)
        got = loaded.main_output(ep.module()(**other))
        want = loaded.main_output(loaded.model(**other))
    assert got.shape == (3, 13, loaded.config.vocab_size)
    torch.testing.assert_close(got, want)
    wrap_module(Bare()).prepare_trace(Bare())                              # no config: nothing to do
