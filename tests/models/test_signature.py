"""What rewriter.models reads from a model itself (models/signature.py) and the user's inputs it turns
into batches: folders load with the head they were saved with, inputs built from the config run
through the model at the asked length, tokenizers without a padding token still pad, and evaluation
text is used whole and never repeated."""
import sys
from pathlib import Path

import pytest
import torch

from rewriter.models import (bind_batch, config_inputs, evaluation_batches, infer_kind, load_model,
                             minilm_tokenizer, padding_tokenizer)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import zoo_factory as Z  # noqa: E402


def test_a_folder_loads_with_the_head_it_was_saved_with(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=3)
    model = BertForSequenceClassification(config)
    model.save_pretrained(tmp_path)
    minilm_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded.model).__name__ == "BertForSequenceClassification" and loaded.kind == "encoder"
    x = loaded.example_inputs(batch=2, seq_len=8)
    with torch.no_grad():
        torch.testing.assert_close(loaded.main_output(loaded.model(**x)), model.eval()(**x).logits)


@pytest.mark.parametrize("name, frames", [("wav2vec2", 9), ("whisper", None), ("t5", None)])
def test_config_inputs_run_at_the_asked_length(name, frames):
    model = Z.family(name)
    make = config_inputs(model, infer_kind(model))
    x = make(3, 9, 0)
    with torch.no_grad():
        out = model(**x).last_hidden_state
    assert out.shape[0] == 3
    if frames:                                          # audio: 9 frames after the feature convolutions
        assert out.shape[1] == frames
    else:                                               # encoder-decoders: the decoder's length
        assert out.shape[1] == x["decoder_input_ids"].shape[1] == 9
        assert (x["decoder_input_ids"][:, 0] == model.config.decoder_start_token_id).all()
    assert torch.equal(make(3, 9, 0)[next(iter(x))], x[next(iter(x))]), "seeded"


def test_bind_batch_names_positional_inputs():
    model = Z.family("bert")
    ids = torch.ones(2, 4, dtype=torch.long)
    assert list(bind_batch(model, (ids, ids))) == ["input_ids", "attention_mask"]
    assert list(bind_batch(model, ids)) == ["input_ids"]
    with pytest.raises(ValueError, match="calibration batch: expected a dict of named inputs"):
        bind_batch(model, 3)
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(ValueError, match=r"'x' is not an input of Linear\.forward \(it takes input\)"):
        bind_batch(lin, {"x": torch.zeros(1, 4)})


def test_a_tokenizer_without_padding_token_pads_with_another():
    tok = minilm_tokenizer()
    tok.pad_token = None
    padded = padding_tokenizer(tok)
    assert padded.pad_token == tok.unk_token and tok.pad_token is None, "a copy; the user's is unchanged"
    enc = padded(["one", "one two three"], padding="longest", return_tensors="pt")
    assert enc["attention_mask"].tolist()[0].count(0) == 2


def test_evaluation_batches_use_the_whole_text_once(tmp_path):
    words = ["boats", "birds", "cliffs", "waves", "sand", "wind", "salt"]
    text = [f"Line {i} is about the {w} by the sea." for i, w in enumerate(words)]
    bert = load_model("bert")
    batches = evaluation_batches(bert, text, samples=100, seq_len=16, batch_size=3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 1], "every line, held-out ones too"
    llama = load_model("llama")
    chunks = evaluation_batches(llama, text, samples=100, seq_len=16, batch_size=4)
    ids = torch.cat([b["input_ids"] for b in chunks])
    total = sum(len(x) + 1 for x in llama.tokenizer(text, add_special_tokens=False)["input_ids"])
    assert ids.shape == (total // 16, 16), "as many chunks as the text holds, none repeated"
    with pytest.raises(ValueError, match="'vision' model: it takes no text"):
        evaluation_batches(load_model("vit"), text)
