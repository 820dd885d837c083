"""Text models that are neither an encoder nor a causal LM with a head, handed over bare with a
tokenizer trained offline on the bundled text (tests/models/zoo_factory.py `word_tokenizer`):

- a causal decoder without an LM head (LlamaModel, GPT2Model): its kind comes from what it computes
  (`is_causal`: earlier positions do not depend on later tokens; no logits), it is gated on its
  hidden states (relative RMS) and calibrated on contiguous chunks of running text;
- an encoder-decoder (BART, T5): calibrated on real sentences through the user's tokenizer, the
  decoder reading the same tokens shifted right after its start token (as BART's forward and
  generate build them), padding judged where the decoder's own tokens are padding."""
import sys
import warnings
from pathlib import Path

import pytest
import torch

from rewriter import inspect, optimize
from rewriter.api import _prepare, _resolve
from rewriter.models import calibration_from, infer_kind, load_source, main_output, wrap_module
from rewriter.models.signature import is_causal, text_inputs
from rewriter.models.zoo import encode_documents

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
import zoo_factory as Z  # noqa: E402

OPEN_GATE = {"metric": "relative_rms", "max": 100.0}
SMALL = {"samples": 4, "seq_len": 16, "batch_size": 2, "heldout": 2}


def _pieces(row: list[int], sep: int) -> list[list[int]]:
    out, cur = [], []
    for t in row:
        if t == sep:
            out.append(cur)
            cur = []
        else:
            cur.append(t)
    return [p for p in out + [cur] if p]


def _within(piece: list[int], docs: list[list[int]]) -> bool:
    n = len(piece)
    return any(d[i:i + n] == piece for d in docs for i in range(len(d) - n + 1))


def _example(model, tok, batch=3, seq_len=11):
    """Running text at another batch and length than the trace's."""
    return wrap_module(model, tokenizer=tok).example_inputs(batch, seq_len)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_headless_decoder_is_found_causal_and_calibrated_on_running_text(name):
    model = Z.headless(name).train()          # in train mode: the probe must put every mode back
    tok = Z.word_tokenizer("gpt")
    assert not hasattr(model, "lm_head") and not model.can_generate()
    assert is_causal(model) and infer_kind(model) == "generic" and text_inputs(model, "generic") == "stream"
    assert all(m.training for m in model.modules())
    model.eval()
    loaded = wrap_module(model, tokenizer=tok)
    calib = calibration_from(loaded, None, text="bundled", **SMALL)
    assert calib.source == "bundled" and calib.lengths == [16, 64]        # seq_len and 4 x seq_len
    src = load_source("bundled")
    docs = encode_documents(tok, src.documents + src.heldout_documents)
    for b in calib.batches + calib.heldout:
        assert torch.equal(b["attention_mask"], torch.ones_like(b["input_ids"]))     # no padding
        assert b["input_ids"].shape[1] in (16, 64)
        for row in b["input_ids"].tolist():        # contiguous runs of the documents, EOS between them
            assert all(_within(p, docs) for p in _pieces(row, tok.eos_token_id)), row


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_headless_decoder_gate_judges_its_hidden_states(name):
    model, tok = Z.headless(name), Z.word_tokenizer("gpt")
    recipe = {"calibration": SMALL, "steps": [{"drop_attention": {"layers": [0]}}]}
    gated = optimize(model, recipe, tokenizer=tok, progress=False, measure_latency=False)
    assert gated.report.kind == "generic" and gated.report.gate["metric"] == "relative_rms"
    assert gated.report.calibration["source"] == "mix"                    # running text, four kinds
    (r,) = gated.records          # layer 0 of a random 2-layer decoder matters: well over 5 % RMS
    assert r.status == "rolled_back" and "relative_rms" in r.reason, r.reason
    opt = optimize(model, {**recipe, "gate": OPEN_GATE}, tokenizer=tok, progress=False, measure_latency=False)
    assert [r.status for r in opt.records] == ["applied"]
    x = _example(model, tok)
    with torch.no_grad():
        want, got = model(**x), opt(**x)
    assert type(got) is type(want) and got.last_hidden_state.shape == want.last_hidden_state.shape
    assert not torch.allclose(got.last_hidden_state, want.last_hidden_state, atol=1e-4)


def test_headless_decoder_without_tokenizer_says_to_pass_one():
    loaded = wrap_module(Z.headless("llama"))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        calib = calibration_from(loaded, None, **SMALL)
    assert calib.source == "inputs_fn"
    assert any("it takes text, but no tokenizer is known: pass optimize(..., tokenizer=...)" in str(x.message)
               for x in w)


def test_an_encoder_is_not_causal():
    assert not is_causal(Z.family("bert")) and infer_kind(Z.family("bert")) == "encoder"


# ---- encoder-decoders ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bart", "t5"])
def test_encoder_decoder_calibrates_on_real_text_with_shifted_decoder_inputs(name):
    model, tok = Z.seq2seq(name), Z.word_tokenizer(name)
    loaded = wrap_module(model, tokenizer=tok)
    assert (loaded.kind, loaded.text_inputs) == ("generic", "seq2seq")
    calib = calibration_from(loaded, None, **SMALL)
    assert calib.source == "bundled" and calib.heldout
    start, pad = model.config.decoder_start_token_id, tok.pad_token_id
    src = load_source("bundled")
    special = set(tok.all_special_ids) - {tok.unk_token_id}
    sentences = tok(src.samples + src.heldout_samples, add_special_tokens=False)["input_ids"]
    for b in calib.batches + calib.heldout:
        ids, mask, dec = b["input_ids"], b["attention_mask"], b["decoder_input_ids"]
        assert dec.shape == ids.shape and (dec[:, 0] == start).all()
        real = mask[:, :-1].bool()
        assert torch.equal(dec[:, 1:][real], ids[:, :-1][real]) and (dec[:, 1:][~real] == pad).all()
        assert not mask.all() or len(ids) == 1, "rows of different lengths: some padding"
        for row in ids.tolist():          # each row is one bundled sentence, tokenized (truncated at 16)
            words = [t for t in row if t not in special]
            assert any(s[:len(words)] == words for s in sentences), row


@pytest.mark.parametrize("name", ["bart", "t5"])
def test_encoder_decoder_on_text_traces_exactly_and_drops_a_decoder_block(name):
    model, tok = Z.seq2seq(name, seed=1), Z.word_tokenizer(name)
    loaded = _resolve(model, None, tok)
    gm, sites, _, _ = _prepare(loaded, None)
    assert len(sites) == 6
    x = loaded.example_inputs(3, 11)                 # real sentences, padded rows, another size
    with torch.no_grad():
        want, got = main_output(model(**x)), main_output(gm(**x))
    valid = loaded.valid_tokens(x, want)
    assert not valid.all(), "the check must cover decoder padding"
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)

    opt = optimize(model, {"calibration": SMALL, "gate": OPEN_GATE,
                           "steps": [{"drop_attention": {"layers": [2]}}]},     # decoder block 0
                   tokenizer=tok, progress=False, measure_latency=False)
    assert opt.report.calibration["source"] == "bundled" and opt.report.heldout["metric"] == "relative_rms"
    dropped = [opt.sites[i].module for r in opt.records if r.status == "applied" for i in r.sites]
    assert len(dropped) == 2 and all(m.startswith(("decoder.layers.0.", "decoder.block.0.")) for m in dropped)
    with torch.no_grad():
        out = main_output(opt(**x))
    assert out.shape == want.shape and torch.isfinite(out[valid]).all()
    assert not torch.allclose(out[valid], want[valid], atol=1e-4)


def test_encoder_decoder_from_a_folder_calibrates_on_its_tokenizer(tmp_path):
    from transformers import AutoModel
    Z.seq2seq("bart").save_pretrained(tmp_path)
    Z.word_tokenizer("bart").save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path)
    assert len(inspect(model)) == 6
    recipe = {"calibration": SMALL, "gate": OPEN_GATE, "steps": [{"drop_attention": {"layers": [0]}}]}
    opt = optimize(model, recipe, progress=False, measure_latency=False)
    assert any(str(tmp_path) in n and "tokenizer loaded" in n for n in opt.report.notes)
    assert opt.report.calibration["source"] == "bundled" and [r.status for r in opt.records] == ["applied"]
