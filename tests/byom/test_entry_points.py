"""The three ways in: a registered name, your Hugging Face model (+ its tokenizer, from its folder or
passed) or SentenceTransformer, and your own module with your own data; and an OptimizedModel that
binds its inputs the way the original forward does."""
import copy

import pytest
import torch
from transformers import AutoModel, BertConfig, BertModel

from rewriter import optimize
from rewriter.api import InputError
from rewriter.models import minilm_path, minilm_tokenizer

OPEN_GATE = {"metric": "relative_rms", "max": 100.0}
SMALL = {"samples": 8, "seq_len": 16, "batch_size": 4, "heldout": 4}
DROP0 = [{"drop_attention": {"layers": [0]}}]


def _tiny_bert(vocab=30522):
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, max_position_embeddings=64)).eval()


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    """A tiny BERT saved with the MiniLM tokenizer, as a user's fine-tuned folder would be."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    _tiny_bert().save_pretrained(folder)
    minilm_tokenizer().save_pretrained(folder)
    return folder


# ---- a registered name ----------------------------------------------------------------------------

def test_registered_name():
    opt = optimize("bert", {"calibration": SMALL, "gate": OPEN_GATE, "steps": DROP0}, progress=False,
                   measure_latency=False)
    assert opt.report.model == "bert" and opt.report.calibration["source"] == "bundled"
    assert [r.status for r in opt.records] == ["applied"]


# ---- your Hugging Face model + tokenizer ----------------------------------------------------------

def test_hf_model_from_a_folder_finds_its_tokenizer_and_says_so(bert_folder, frozen_state, state_equal):
    model = AutoModel.from_pretrained(bert_folder).eval()
    before = frozen_state(model)
    opt = optimize(model, {"calibration": SMALL, "gate": OPEN_GATE, "steps": DROP0}, progress=False,
                   measure_latency=False)
    assert opt.report.calibration["source"] == "bundled" and opt.report.kind == "encoder"
    assert any(f"tokenizer loaded from the model's folder {bert_folder}" in n for n in opt.report.notes)
    assert state_equal(model, before), "the user's model is untouched"
    enc = minilm_tokenizer()(["a short one", "and a somewhat longer sentence"], padding=True,
                             return_tensors="pt")
    with torch.no_grad():
        assert opt(**enc).last_hidden_state.shape == model(**enc).last_hidden_state.shape


def test_hf_model_without_tokenizer_says_what_to_pass():
    with pytest.raises(ValueError, match=r"needs a tokenizer.*optimize\(\.\.\., tokenizer=\.\.\.\)"):
        optimize(_tiny_bert(), {"calibration": SMALL, "gate": OPEN_GATE, "steps": DROP0}, progress=False)


def test_tokenizer_and_a_list_of_strings():
    """tokenizer= turns the user's strings into batches; every fifth string is held out."""
    texts = [f"Sentence number {i} talks about {w} and nothing else at all."
             for i, w in enumerate(["rivers", "trains", "bread", "snow", "music", "glass", "maps", "tea",
                                    "ships", "paper"])]
    opt = optimize(_tiny_bert(), {"calibration": {**SMALL, "samples": 6, "heldout": 2}, "gate": OPEN_GATE,
                                  "steps": DROP0},
                   tokenizer=minilm_tokenizer(), calibration=texts, progress=False, measure_latency=False)
    cal = opt.report.calibration
    assert cal["source"] == "10 strings" and cal["samples"] == 6 and cal["heldout_batches"] == 1
    assert opt.report.heldout["metric"] == "relative_rms"
    with pytest.raises(ValueError, match="no tokenizer to turn the 3 strings into inputs"):
        optimize(_tiny_bert(), {"gate": OPEN_GATE, "steps": DROP0}, calibration=["a", "b", "c"],
                 progress=False)


def test_dataloader_of_dicts_is_split_by_the_recipe():
    """A DataLoader's batches: its extra keys (labels) are not inputs; every fifth batch is held out,
    validation comes from the end of the rest, calibration stops at `samples`."""
    from torch.utils.data import DataLoader
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(1000, 2000, (12,), generator=g),
             "attention_mask": torch.ones(12, dtype=torch.long), "labels": torch.tensor(i % 2)}
            for i in range(40)]
    loader = DataLoader(rows, batch_size=4)                          # 10 batches of 4
    opt = optimize(_tiny_bert(), {"calibration": {"samples": 12, "heldout": 4, "validation": 4},
                                  "gate": OPEN_GATE, "steps": DROP0},
                   calibration=loader, progress=False, measure_latency=False)
    cal = opt.report.calibration
    got = (cal["source"], cal["samples"], cal["heldout_batches"], cal["validation_batches"])
    assert got == ("batches", 12, 1, 1)
    assert any("10 batches given: 3 for calibration (12 samples), 1 for validation (4), 1 held out" in n
               for n in opt.report.notes)
    with pytest.raises(ValueError, match=r"calibration batch 0: 10 positional inputs, but BertModel\.forward "
                                         r"takes 9 \(input_ids, attention_mask, "):
        optimize(_tiny_bert(), {"gate": OPEN_GATE, "steps": DROP0},
                 calibration=[(torch.ones(2, 4, dtype=torch.long),) * 10], progress=False)
    with pytest.raises(TypeError, match="name a text file under the recipe's calibration.text instead"):
        optimize(_tiny_bert(), {"gate": OPEN_GATE, "steps": DROP0}, calibration="my.txt", progress=False)


# ---- a SentenceTransformer ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_st():
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(minilm_path()), device="cpu")


TEXTS = ["The river froze near the old bridge.", "Trains were late because of the snow, again and again.",
         "She opened the window."]


def test_sentence_transformer_in_and_out_exact(minilm_st, frozen_state, state_equal):
    """A gate no drop can pass rolls every drop back: the result is the canonicalized graph, and
    .encode() gives the original embeddings."""
    from sentence_transformers import SentenceTransformer
    before = frozen_state(minilm_st)
    strict = {"calibration": {**SMALL, "heldout": 0}, "gate": {"metric": "relative_rms", "max": 1e-6},
              "steps": DROP0}
    out = optimize(minilm_st, strict, progress=False, measure_latency=False)
    assert isinstance(out, SentenceTransformer) and out is not minilm_st
    assert [r.status for r in out.report.records] == ["rolled_back"]
    assert out.report.kind == "encoder" and out.report.calibration["source"] == "bundled"
    want, got = minilm_st.encode(TEXTS, convert_to_tensor=True), out.encode(TEXTS, convert_to_tensor=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert state_equal(minilm_st, before) and type(minilm_st[0].auto_model).__name__ == "BertModel"


def test_sentence_transformer_keeps_its_pooling_and_normalization(minilm_st):
    """With a drop applied, the SentenceTransformer's embeddings are its own mean pooling and
    normalization of the optimized model's token states."""
    out = optimize(minilm_st, {"calibration": {**SMALL, "heldout": 0}, "gate": OPEN_GATE, "steps": DROP0},
                   progress=False, measure_latency=False)
    assert [r.status for r in out.report.records] == ["applied"]
    got = out.encode(TEXTS, convert_to_tensor=True)
    enc = minilm_st.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = out[0].auto_model.optimized(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    want = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - minilm_st.encode(TEXTS, convert_to_tensor=True)).abs().max() > 1e-3, "the drop is in effect"
    with pytest.raises(NotImplementedError, match=r"auto_model\.optimized\.save"):
        out[0].auto_model.save_pretrained("nowhere")


# ---- your module + your data ----------------------------------------------------------------------

class Block(torch.nn.Module):
    def __init__(self, d=32, h=4):
        super().__init__()
        self.h, self.qkv, self.o = h, torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.n1, self.n2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.GELU(), torch.nn.Linear(64, d))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.n1(x)).view(B, T, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.n2(x))


class MyLM(torch.nn.Module):
    """A user's own causal LM: positional input_ids, a 64-row position table, logits out."""

    def __init__(self, vocab=100, d=32, layers=2):
        super().__init__()
        self.emb, self.pos = torch.nn.Embedding(vocab, d), torch.nn.Embedding(64, d)
        self.blocks = torch.nn.ModuleList(Block(d) for _ in range(layers))
        self.head = torch.nn.Linear(d, vocab)

    def forward(self, input_ids):
        x = self.emb(input_ids) + self.pos(torch.arange(input_ids.shape[1]))
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.fixture(scope="module")
def my_lm():
    torch.manual_seed(0)
    model = MyLM().eval()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 100, (4, 16), generator=g) for _ in range(10)]
    opt = optimize(model, {"gate": OPEN_GATE, "steps": [{"drop_attention": {"layers": [1]}}]},
                   example_inputs=(batches[0],), calibration=[(b,) for b in batches], progress=False,
                   measure_latency=False)
    return model, opt


def test_custom_module_with_example_inputs_and_batches(my_lm):
    model, opt = my_lm
    assert [r.status for r in opt.records] == ["applied"] and opt.report.kind == "generic"
    cal = opt.report.calibration
    assert (cal["source"], cal["samples"], cal["heldout_batches"]) == ("batches", 32, 2)
    assert opt.report.heldout["ok"] is True
    # the dropped layer's attention is gone: the same as running the blocks with that attention zeroed
    ref = copy.deepcopy(model)
    ref.blocks[1].o.weight.data.zero_()
    ref.blocks[1].o.bias.data.zero_()
    ids = torch.randint(0, 100, (3, 21))
    with torch.no_grad():
        torch.testing.assert_close(opt(ids), ref(ids), atol=1e-5, rtol=1e-5)


def test_positional_and_keyword_inputs_bind_like_the_forward(my_lm):
    _, opt = my_lm
    ids = torch.randint(0, 100, (2, 9))
    with torch.no_grad():
        assert torch.equal(opt(ids), opt(input_ids=ids))
    cases = [((ids, ids), {}, r"2 positional inputs given, but MyLM\.forward takes 1 \(input_ids\)"),
             ((), {"input_id": ids}, r"unknown input 'input_id': did you mean 'input_ids'\?"),
             ((ids,), {"input_ids": ids}, r"input 'input_ids' given twice"),
             ((), {}, r"missing input 'input_ids' \(torch\.int64, shape \[\*, \*\]\)"),
             ((ids.float(),), {}, r"input 'input_ids': expected dtype torch\.int64, got torch\.float32"),
             ((ids[0],), {}, r"input 'input_ids': expected 2 dims"),
             ((torch.randint(0, 100, (2, 70)),), {},
              r"index beyond a table.*'input_ids' \(shape \[2, 70\]\)")]
    for args, kwargs, message in cases:
        with pytest.raises(InputError, match=message) as e:
            opt(*args, **kwargs)
        assert "\n" not in str(e.value)


def test_hf_inputs_are_checked_against_the_trace():
    from rewriter.models import load_model
    loaded = load_model("bert", num_hidden_layers=1)
    opt = optimize(loaded, {"calibration": {**SMALL, "heldout": 0}, "gate": OPEN_GATE, "steps": DROP0},
                   progress=False, measure_latency=False)
    x = loaded.example_inputs(batch=3, seq_len=10)
    with torch.no_grad():
        positional = opt(x["input_ids"], x["attention_mask"], x["token_type_ids"])
        assert positional.last_hidden_state.shape == (3, 10, 64)
        assert opt(**x, output_attentions=False, return_dict=None).last_hidden_state.shape == (3, 10, 64)
    long = {k: v.repeat(1, 60) for k, v in x.items()}
    cases = [({**x, "attention_mask": x["attention_mask"][:, :4]},
              r"input 'attention_mask': dim 1 is 4, but dim 1 of 'input_ids' is 10; the two must match"),
             (long, r"input '\w+': dim 1 is 600, more than the 512 the model takes \(its position table\)"),
             ({**x, "position_ids": x["token_type_ids"]},
              r"input 'position_ids' was not given when the model was traced"),
             ({**x, "output_attentions": True},
              r"input 'output_attentions'=True: the optimized graph was traced without it"),
             ({**x, "input_ids": x["input_ids"].tolist()}, r"input 'input_ids': expected a tensor")]
    for kwargs, message in cases:
        with pytest.raises(InputError, match=message):
            opt(**kwargs)
    assert opt.eval() is opt
    with pytest.raises(NotImplementedError, match="no training mode"):
        opt.train()
