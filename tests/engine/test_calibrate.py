"""rewriter.models.make_calibration: shapes, padding, held-out disjointness, text sources."""
import json
import re
import subprocess
import sys
import warnings

import pytest
import torch

from rewriter.calibrate import Calibration
from rewriter.models import Loaded, digit_indices, load_model, make_calibration


@pytest.fixture(scope="module")
def vit():
    return load_model("vit")


def _rows(batches: list[dict]) -> list[tuple]:
    """Each sample's real token ids (padding removed)."""
    out = []
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            out.append(tuple(ids[mask.bool()].tolist()))
    return out


def _word_ngrams(tokenizer, rows, n: int = 8) -> set:
    """Runs of n words in the decoded samples (the decontamination unit of rewriter.models)."""
    out = set()
    for r in rows:
        text = tokenizer.decode(r, skip_special_tokens=True).lower()
        text = re.sub(r"\s*_\s*", "_", text)        # BERT's decode spaces "__enter__" as "_ _ enter _ _"
        words = re.findall(r"\w+", text)
        out |= {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}
    return out


def _labelled_rows(batches, labels) -> list:
    """(label, input_ids row) of every row: a batch's label is one (text, tokens) or one per row."""
    out = []
    for b, lb in zip(batches, labels):
        per_row = [tuple(lb)] * len(b["input_ids"]) if isinstance(lb[0], str) else [tuple(x) for x in lb]
        out += list(zip(per_row, b["input_ids"]))
    return out


def test_encoder_batches_are_padded_text(bert):
    cal = make_calibration(bert, samples=20, seq_len=48, batch_size=8, heldout=5)
    assert isinstance(cal, Calibration) and cal.kind == "encoder" and cal.source == "bundled"
    assert [b["input_ids"].shape[0] for b in cal.batches] == [8, 8, 4]
    assert [b["input_ids"].shape[0] for b in cal.heldout] == [5]
    assert cal.notes == [] and cal.samples == 20 and cal.seq_len == 48
    padded = 0
    for b in cal.batches + cal.heldout:
        assert set(b) == {"input_ids", "attention_mask", "token_type_ids"}
        ids, mask = b["input_ids"], b["attention_mask"]
        assert ids.shape == mask.shape and ids.shape[1] <= 48
        assert bool(mask.sum(1).max() == ids.shape[1]), "padded to the longest in the batch"
        assert bool((ids[mask == 0] == bert.tokenizer.pad_token_id).all())
        padded += int((mask == 0).any())
        with torch.no_grad():
            out = bert.model(**b).last_hidden_state
        assert torch.isfinite(out).all()
    assert padded == len(cal.batches) + len(cal.heldout), "every batch has real padding"


def test_encoder_truncates_to_seq_len(bert):
    cal = make_calibration(bert, text="pydoc", samples=16, seq_len=32, batch_size=16, heldout=0)
    ids = cal.batches[0]["input_ids"]
    assert ids.shape == (16, 32) and cal.heldout == []
    assert bool((ids[:, -1][cal.batches[0]["attention_mask"][:, -1] == 1]
                 == bert.tokenizer.sep_token_id).all())


def test_causal_chunks_have_exact_length_and_default_fits(llama):
    cal = make_calibration(llama)          # the recipe default: 64 x 128 tokens of the mix, held-out 16
    assert cal.notes == [], "every kind of text covers the default without repeating"
    assert cal.lengths == [128, 512], "auto lengths: seq_len and 4 x seq_len (within 512 positions)"
    kinds = ("bundled", "pydoc", "python", "legal")
    rows = _labelled_rows(cal.batches, cal.batch_labels)
    assert sorted(set(lb for lb, _ in rows)) == sorted((k, n) for k in kinds for n in (128, 512))
    assert {lb for lb, _ in _labelled_rows(cal.heldout, cal.heldout_labels)} == {lb for lb, _ in rows}
    for lb, r in rows + _labelled_rows(cal.heldout, cal.heldout_labels):
        assert r.shape == (lb[1],), "every row is a chunk of exactly its label's length"
    per_cell = {}
    for lb, r in rows:
        per_cell[lb] = per_cell.get(lb, 0) + r.numel()
    assert set(per_cell.values()) == {64 * 128 // 8}, "the 64 x 128 tokens spread evenly over the 8 cells"
    for b in cal.batches:             # one length per batch, the kinds side by side, ≤ 8 x 128 tokens
        assert b["input_ids"].numel() <= 8 * 128 and bool(b["attention_mask"].all())
    assert len(cal.batches) == 4 * 8 // 8 + 4 * 2 // 2, "full batches: 4 of 8 x 128, 4 of 2 x 512"
    with torch.no_grad():
        logits = llama.model(**cal.batches[0]).logits
    assert logits.shape == (8, 128, llama.model.config.vocab_size)
    # chunks are consecutive slices of one stream per kind: no chunk repeats
    rows = _rows(cal.batches)
    assert len(set(rows)) == len(rows)


def test_one_kind_at_one_length_is_the_plain_draw(llama):
    cal = make_calibration(llama, text="bundled", lengths=[128])
    assert len(cal.batches) == 8 and len(cal.heldout) == 2 and cal.lengths == [128]
    assert set(cal.batch_labels) == {("bundled", 128)}
    for b in cal.batches + cal.heldout:
        assert b["input_ids"].shape == (8, 128)


def test_lengths_beyond_the_position_table_name_the_limit(llama):
    with pytest.raises(ValueError, match="calibration.lengths: 4096 exceeds llama's max_length 512"):
        make_calibration(llama, lengths=[128, 4096])
    assert make_calibration(llama, seq_len=256, samples=8, heldout=0).lengths == [256, 512], "capped at 512"


@pytest.mark.parametrize("kind", ["encoder", "causal_lm"])
@pytest.mark.parametrize("text", ["bundled", "pydoc"])
def test_heldout_text_never_reaches_calibration(bert, llama, kind, text):
    loaded = bert if kind == "encoder" else llama
    held = _rows(make_calibration(loaded, text=text, samples=8, seq_len=64, heldout=24).heldout)
    cal_rows = []
    for seed in range(3):
        cal_rows += _rows(make_calibration(loaded, text=text, samples=48, seq_len=64, heldout=0,
                                           seed=seed).batches)
    # a shared run of 8 words would mean held-out text was used for calibration
    tok = loaded.tokenizer
    assert _word_ngrams(tok, held).isdisjoint(_word_ngrams(tok, cal_rows))
    # positive control: two calibration draws do share runs, so the check can fail
    other = _rows(make_calibration(loaded, text=text, samples=48, seq_len=64, heldout=0,
                                   seed=7).batches)
    assert not _word_ngrams(tok, other).isdisjoint(_word_ngrams(tok, cal_rows))


def test_seed_changes_choice_not_split(bert):
    a = make_calibration(bert, samples=16, seq_len=32, heldout=8, seed=0)
    b = make_calibration(bert, samples=16, seq_len=32, heldout=8, seed=0)
    c = make_calibration(bert, samples=16, seq_len=32, heldout=8, seed=1)
    assert _rows(a.batches) == _rows(b.batches) and _rows(a.heldout) == _rows(b.heldout)
    assert _rows(a.batches) != _rows(c.batches)
    assert set(_rows(c.batches)).isdisjoint(_rows(a.heldout))


def test_vision_digits(vit):
    cal = make_calibration(vit, samples=10, batch_size=4, heldout=3)
    assert cal.source == "digits" and cal.kind == "vision" and cal.seq_len == 65
    assert [b["pixel_values"].shape for b in cal.batches] == \
        [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]
    x = torch.cat([b["pixel_values"] for b in cal.batches])
    assert x.min() >= -1 and x.max() <= 1 and x.std() > 0.3       # (x - 0.5) / 0.5 of [0, 1]
    assert torch.equal(x[:, 0], x[:, 2]), "grey digits repeated over RGB"
    with torch.no_grad():
        assert vit.model(**cal.heldout[0]).last_hidden_state.shape == (3, 65, 64)
    cal_idx, held_idx = digit_indices()
    assert set(cal_idx).isdisjoint(held_idx) and len(held_idx) == 1797 // 5
    with pytest.raises(ValueError, match="'vit' is a vision model; calibration text 'pydoc'"):
        make_calibration(vit, text="pydoc")


def test_too_little_text_repeats_with_a_note(bert, llama, tmp_path):
    f = tmp_path / "tiny.txt"
    f.write_text("\n".join(f"Sample number {i} is a short line of text." for i in range(10)))
    with pytest.warns(UserWarning, match="only 8 calibration samples exist; repeating"):
        cal = make_calibration(bert, text=str(f), samples=20, seq_len=32, heldout=2)
    assert sum(b["input_ids"].shape[0] for b in cal.batches) == 20 and cal.notes
    held = set(_rows(cal.heldout))
    assert len(held) == 2 and held.isdisjoint(_rows(cal.batches))
    with pytest.warns(UserWarning, match="repeating it"):
        cal = make_calibration(llama, text=str(f), samples=8, seq_len=64, heldout=1)
    assert cal.lengths == [64, 256]
    assert all(r.shape == (lb[1],) for lb, r in _labelled_rows(cal.batches, cal.batch_labels))
    with pytest.warns(UserWarning, match="validation samples repeat calibration ones"):
        make_calibration(bert, text=str(f), samples=6, seq_len=32, heldout=2, validation=4)


def test_txt_paragraphs_and_lines(bert, tmp_path):
    para = tmp_path / "para.txt"
    para.write_text("First paragraph, line one\nand line two.\n\nSecond paragraph.\n\n"
                    "Third.\n\nFourth.\n\nFifth one.\n")
    cal = make_calibration(bert, text=str(para), samples=4, seq_len=32, batch_size=4, heldout=1)
    texts = {bert.tokenizer.decode(r[1:-1]) for r in _rows(cal.batches)}
    assert texts == {"first paragraph, line one and line two.", "second paragraph.", "third.",
                     "fourth."}
    assert bert.tokenizer.decode(_rows(cal.heldout)[0][1:-1]) == "fifth one."


def test_jsonl_source_and_errors_name_the_line(bert, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"Record {i} says hello.", "id": i})
                              for i in range(6)) + "\n\n")
    cal = make_calibration(bert, text=str(good), samples=5, seq_len=16, heldout=1)
    assert cal.source == str(good) and len(_rows(cal.batches)) == 5

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r'bad\.jsonl:3: expected a JSON object with a "text"'):
        make_calibration(bert, text=str(bad))
    bad.write_text('{"text": "fine"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not valid JSON"):
        make_calibration(bert, text=str(bad))
    bad.write_text('{"text": "fine"}\n\n{"text": 7}\n')
    with pytest.raises(ValueError, match=r'bad\.jsonl:3: "text" must be a string'):
        make_calibration(bert, text=str(bad))


def test_source_errors(bert, tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match=f"not found: {missing}"):
        make_calibration(bert, text=str(missing))
    with pytest.raises(ValueError, match="unknown calibration text 'wikipedia'"):
        make_calibration(bert, text="wikipedia")
    one = tmp_path / "one.txt"
    one.write_text("Only one sample here.\n")
    with pytest.raises(ValueError, match="holds 1 sample; at least 2"):
        make_calibration(bert, text=str(one))
    with pytest.raises(ValueError, match="seq_len=600 exceeds the model's max_length 512"):
        make_calibration(bert, seq_len=600)
    with pytest.raises(ValueError, match="samples must be an integer >= 1"):
        make_calibration(bert, samples=0)


def test_generic_model_uses_inputs_fn():
    model = torch.nn.Linear(4, 4)
    plain = Loaded("plain", model, "generic", None, 1)
    with pytest.raises(ValueError, match="'plain' is 'generic' with no tokenizer or inputs_fn"):
        make_calibration(plain)

    def inputs_fn(batch, seq_len, seed):
        return {"input": torch.randn(batch, 4, generator=torch.Generator().manual_seed(seed))}
    loaded = Loaded("fn", model, "generic", None, 1, inputs_fn=inputs_fn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cal = make_calibration(loaded, samples=10, batch_size=4, heldout=3)
    assert [b["input"].shape[0] for b in cal.batches] == [4, 4, 2]
    assert [b["input"].shape[0] for b in cal.heldout] == [3]
    flat = torch.cat([b["input"] for b in cal.batches + cal.heldout])
    assert len({tuple(r.tolist()) for r in flat}) == flat.shape[0] == 13


@pytest.mark.parametrize("kind", ["encoder", "causal_lm"])
def test_validation_samples_are_new_and_leave_the_fit_data_alone(bert, llama, kind):
    """validation draws extra calibration-side samples: the fitted batches stay exactly what they
    were without it, the validation rows are different ones, and held-out text stays out."""
    loaded = bert if kind == "encoder" else llama
    plain = make_calibration(loaded, samples=12, seq_len=32, batch_size=4, heldout=4, text="bundled",
                             lengths=[32])
    cal = make_calibration(loaded, samples=12, seq_len=32, batch_size=4, heldout=4, validation=6, text="bundled",
                           lengths=[32])
    assert _rows(cal.batches) == _rows(plain.batches) and _rows(cal.heldout) == _rows(plain.heldout)
    val = _rows(cal.validation)
    assert len(val) == 6 and [len(b["input_ids"]) for b in cal.validation] == [4, 2]
    assert set(val).isdisjoint(_rows(cal.batches)) and set(val).isdisjoint(_rows(cal.heldout))
    assert cal.gate_batches is cal.validation and plain.gate_batches is plain.batches


def test_validation_images_are_disjoint(vit):
    cal = make_calibration(vit, samples=10, batch_size=4, heldout=3, validation=5)
    assert [b["pixel_values"].shape[0] for b in cal.batches] == [4, 4, 2]
    assert [b["pixel_values"].shape[0] for b in cal.validation] == [4, 1]
    fitted = torch.cat([b["pixel_values"] for b in cal.batches]).flatten(1)
    for row in torch.cat([b["pixel_values"] for b in cal.validation]).flatten(1):
        assert not (fitted == row).all(1).any()


def test_the_engine_calibration_type_needs_no_models():
    """rewriter.calibrate is engine core: importing it must not pull in rewriter.models (the sources
    live there, and models imports the engine, never the other way)."""
    code = "import sys, rewriter.calibrate; print('rewriter.models' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
