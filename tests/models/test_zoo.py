"""rewriter.models: registry, loaders, example inputs, bundled text, the SmolLM2 cache."""
import json
import os
import re
import time
from pathlib import Path

import pytest
import torch

from rewriter.models import (HELDOUT_EVERY, atomic_dir, bundled_paragraphs, bundled_sentences,
                             bundled_text, decontaminate, load_model, load_source,
                             pydoc_paragraphs, registered, smollm2_cache_dir, split_heldout)
from rewriter.models import zoo

TINY = ["bert", "gpt2", "llama", "vit"]
KIND = {"bert": "encoder", "gpt2": "causal_lm", "llama": "causal_lm", "vit": "vision",
        "minilm": "encoder", "smollm2": "causal_lm"}
HERE = Path(__file__).resolve().parent


def _main_output(out) -> torch.Tensor:
    return out.logits if "logits" in out else out.last_hidden_state


@pytest.fixture(scope="module")
def tiny():
    return {name: load_model(name) for name in TINY}


@pytest.fixture
def factories(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


# ---------------------------------------------------------------------------- registry


def test_registered_names_and_descriptions():
    reg = registered()
    assert set(reg) == {"minilm", "smollm2", "bert", "gpt2", "llama", "vit", "digits_vit", "forecaster"}
    for name, desc in reg.items():
        assert isinstance(desc, str) and len(desc) > 20 and "\n" not in desc, name


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_load_eval_fp32_with_right_kind(tiny, name):
    loaded = tiny[name]
    assert loaded.name == name and loaded.kind == KIND[name]
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.model.config._attn_implementation == "sdpa"
    n_layers = loaded.model.config.num_hidden_layers
    assert 2 <= n_layers <= 4 and loaded.model.config.num_attention_heads == 4
    if loaded.kind == "vision":
        assert loaded.tokenizer is None and loaded.max_length == (32 // 4) ** 2 + 1
    else:
        assert loaded.tokenizer is not None and loaded.max_length == 512
        assert loaded.model.config.vocab_size == len(loaded.tokenizer)


def test_llama_is_gqa(tiny):
    c = tiny["llama"].model.config
    assert (c.num_attention_heads, c.num_key_value_heads) == (4, 2)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("batch,seq_len", [(1, 8), (3, 13)])
def test_example_inputs_run_through_model(tiny, name, batch, seq_len):
    loaded = tiny[name]
    inputs = loaded.example_inputs(batch=batch, seq_len=seq_len)
    with torch.no_grad():
        out = _main_output(loaded.model(**inputs))
    assert out.shape[0] == batch and torch.isfinite(out).all()
    if loaded.kind == "vision":
        assert inputs["pixel_values"].shape == (batch, 3, 32, 32)
        assert out.shape[1] == loaded.max_length
        return
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    assert ids.shape == mask.shape == (batch, seq_len) and ids.dtype == torch.long
    assert out.shape[1] == seq_len
    assert ids.max() < len(loaded.tokenizer)
    if loaded.kind == "causal_lm":
        assert bool(mask.all()), "causal LM example inputs carry no padding"
        assert len(set(ids.flatten().tolist())) > seq_len // 2, "ids come from real text"
    else:
        assert bool(mask[0].all()), "first row fills seq_len"
        assert bool((mask.sum(1)[1:] < seq_len).all()), "every later row ends in padding"
        assert ids[0, 0] == loaded.tokenizer.cls_token_id
        lengths = mask.sum(1)
        assert (ids[torch.arange(batch), lengths - 1] == loaded.tokenizer.sep_token_id).all()


@pytest.mark.parametrize("name", TINY)
def test_sdpa_and_eager_agree(tiny, name):
    sdpa = tiny[name]
    eager = load_model(name, attn_implementation="eager")
    assert eager.model.config._attn_implementation == "eager"
    inputs = sdpa.example_inputs(batch=3, seq_len=12)
    with torch.no_grad():
        a, b = _main_output(sdpa.model(**inputs)), _main_output(eager.model(**inputs))
    if "attention_mask" in inputs:           # compare real tokens; padded rows are don't-care
        keep = inputs["attention_mask"].bool()
        a, b = a[keep], b[keep]
    assert (a - b).abs().max().item() <= 1e-5


def test_tiny_weights_are_seeded_and_leave_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = load_model("llama", seed=3), load_model("llama", seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    c = load_model("llama", seed=4)
    wa, wb, wc = (x.model.model.layers[0].self_attn.q_proj.weight for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_tiny_config_overrides():
    loaded = load_model("bert", num_hidden_layers=2)
    assert loaded.model.config.num_hidden_layers == 2 and len(loaded.model.encoder.layer) == 2
    with pytest.raises(ValueError, match="bert: unknown config field 'no_such_field'"):
        load_model("bert", no_such_field=1)


def test_bad_attn_implementation_is_named():
    with pytest.raises(ValueError, match=r"gpt2: attn_implementation must be one of .*'flash'"):
        load_model("gpt2", attn_implementation="flash")


def test_unknown_name_lists_registered_names_and_forms():
    with pytest.raises(ValueError) as e:
        load_model("minilm-l12")
    msg = str(e.value)
    assert "'minilm-l12'" in msg
    for name in registered():
        assert name in msg
    assert "folder" in msg and "module:function" in msg


def test_missing_folder_and_folder_without_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_model(str(tmp_path / "nope" / "model"))
    with pytest.raises(FileNotFoundError, match=f"{re.escape(str(tmp_path))} has no config.json"):
        load_model(str(tmp_path))


# ---------------------------------------------------------------------------- real MiniLM


def test_minilm_is_the_real_pretrained_encoder(minilm):
    c = minilm.model.config
    assert minilm.kind == "encoder" and minilm.max_length == 512
    assert (c.num_hidden_layers, c.num_attention_heads, c.hidden_size) == (6, 12, 384)
    sentences = ["A man is playing a guitar.", "Someone plays an acoustic guitar.",
                 "The stock market fell sharply today."]
    enc = minilm.tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = minilm.model(**enc).last_hidden_state
    m = enc["attention_mask"].unsqueeze(-1).float()
    emb = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)   # mean pooling
    sim = emb @ emb.T
    # trained sentence embeddings: the paraphrase is far closer than the unrelated sentence
    assert sim[0, 1] > 0.6 and sim[0, 2] < 0.2, sim


def test_minilm_example_inputs_pad_and_run(minilm):
    inputs = minilm.example_inputs(batch=2, seq_len=16)
    assert inputs["attention_mask"][1].eq(0).any()
    with torch.no_grad():
        out = minilm.model(**inputs).last_hidden_state
    assert out.shape == (2, 16, 384)


# ---------------------------------------------------------------------------- other spec forms


def test_hf_folder_path_round_trip(tiny, tmp_path):
    src = tiny["llama"]
    src.model.save_pretrained(tmp_path)
    src.tokenizer.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), attn_implementation="eager")
    assert loaded.kind == "causal_lm" and loaded.name == str(tmp_path)
    assert loaded.tokenizer is not None and loaded.max_length == 512
    assert loaded.model.config._attn_implementation == "eager"
    inputs = src.example_inputs(batch=2, seq_len=10)
    with torch.no_grad():
        assert torch.allclose(loaded.model(**inputs).logits, src.model(**inputs).logits,
                              atol=1e-5, rtol=0)


def test_hf_folder_vision_kind(tiny, tmp_path):
    tiny["vit"].model.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.kind == "vision" and loaded.image_size == 32 and loaded.num_channels == 3
    assert loaded.example_inputs(batch=2)["pixel_values"].shape == (2, 3, 32, 32)


def test_module_function_plain_module(factories):
    loaded = load_model("zoo_factory:plain_module", width=6)
    assert loaded.kind == "generic" and loaded.name == "zoo_factory:plain_module"
    assert not loaded.model.training
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert loaded.model.net[0].in_features == 6
    with pytest.raises(ValueError, match="'generic' model has no known inputs"):
        loaded.example_inputs()


def test_module_function_hf_module_infers_kind(factories):
    loaded = load_model("zoo_factory:tiny_bert_module", attn_implementation="eager")
    assert loaded.kind == "encoder" and loaded.model.config._attn_implementation == "eager"


def test_module_function_returning_loaded(factories):
    loaded = load_model("zoo_factory:wrapped_loaded")
    assert loaded.name == "wrapped" and loaded.kind == "generic"
    out = loaded.model(**loaded.example_inputs(batch=3))
    assert out.shape == (3, 8)


@pytest.mark.parametrize("spec,exc,pattern", [
    ("zoo_factory_missing:make", ValueError, "cannot import module 'zoo_factory_missing'"),
    ("zoo_factory:no_such_function", ValueError, "has no callable 'no_such_function'"),
    ("zoo_factory:not_callable", ValueError, "has no callable 'not_callable'"),
    ("zoo_factory:tokenizer_only", TypeError, r"tokenizer_only\(\) returned \w+, expected"),
])
def test_module_function_errors_name_the_culprit(factories, spec, exc, pattern):
    with pytest.raises(exc, match=pattern):
        load_model(spec)


def test_module_function_rejects_unknown_arguments(factories):
    with pytest.raises(ValueError, match=r"plain_module\(\) does not accept the arguments "
                                         r"\['attn_implementation'\]"):
        load_model("zoo_factory:plain_module", attn_implementation="eager")


# ---------------------------------------------------------------------------- bundled text


def test_bundled_sentences_are_varied_english():
    sents = bundled_sentences()
    assert len(sents) >= 300 and len(set(sents)) == len(sents)
    lengths = [len(s.split()) for s in sents]
    assert min(lengths) >= 5 and max(lengths) <= 40 and max(lengths) >= 30
    assert all(s[0].isupper() and s[-1] in ".?!" for s in sents)


def test_bundled_paragraphs_have_several_sentences():
    paras = bundled_paragraphs()
    assert len(paras) >= 30 and len(set(paras)) == len(paras)
    for p in paras:
        assert len(re.findall(r"[.?!](?:\s|$)", p)) >= 3, p[:60]
    text = bundled_text()
    assert paras[0] in text and bundled_sentences()[-1] in text


def test_pydoc_source_is_prose():
    paras = pydoc_paragraphs()
    assert len(paras) > 300 and sum(len(p) for p in paras) > 100_000
    assert not any(p.startswith(("***", "===")) or ">>>" in p[:4] for p in paras)


def test_heldout_split_is_fixed_and_disjoint():
    items = list(range(23))
    cal, held = split_heldout(items)
    assert held == [i for i in items if i % HELDOUT_EVERY == HELDOUT_EVERY - 1]
    assert set(cal).isdisjoint(held) and sorted(cal + held) == items
    assert split_heldout([1, 2]) == ([1], [2])
    src = load_source("bundled")
    assert set(src.samples).isdisjoint(src.heldout_samples)
    assert set(src.documents).isdisjoint(src.heldout_documents)
    held_sents = set(split_heldout(bundled_sentences())[1])
    assert not any(s in doc for doc in src.documents for s in held_sents)


def test_decontaminate_drops_heldout_sharing_eight_words():
    cal = ["The quick brown fox jumps over the lazy dog near the river bank."]
    held = ["Yesterday the quick brown fox jumps over the lazy dog again.",   # 8-word run shared
            "A quick brown fox jumped over a lazy dog.",                        # only 3-word runs
            "Something else entirely, about tides and harbours."]
    assert decontaminate(cal, held) == held[1:]
    assert decontaminate(cal, held, n=3) == held[2:]


# ---------------------------------------------------------------------------- SmolLM2 cache


def test_atomic_dir_leaves_nothing_when_interrupted(tmp_path):
    final = tmp_path / "cache" / "model"

    def broken(tmp):
        (tmp / "half.bin").write_bytes(b"x" * 10)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_dir(final, broken)
    assert not final.exists() and os.listdir(final.parent) == []

    atomic_dir(final, lambda tmp: (tmp / "ok.txt").write_text("1"))
    assert (final / "ok.txt").read_text() == "1" and os.listdir(final.parent) == ["model"]
    atomic_dir(final, lambda tmp: (tmp / "ok.txt").write_text("2"))   # lost race: first wins
    assert (final / "ok.txt").read_text() == "1" and os.listdir(final.parent) == ["model"]


@pytest.mark.skipif(not zoo._cache_valid(smollm2_cache_dir(), zoo.smollm2_gguf()),
                    reason="SmolLM2 fp32 cache not built yet (the slow test builds one)")
def test_smollm2_from_cache_predicts_english():
    loaded = load_model("smollm2")
    assert loaded.kind == "causal_lm" and loaded.max_length == 8192
    c = loaded.model.config
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (30, 9, 3)
    inputs = loaded.example_inputs(batch=1, seq_len=64)
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
    ids = inputs["input_ids"]
    nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
    assert nll.exp() < 200, f"perplexity {nll.exp():.0f} on bundled English"   # random: ~49152


@pytest.mark.slow
def test_smollm2_first_load_builds_an_exact_fp32_cache(tmp_path):
    from transformers import AutoModelForCausalLM
    cache = tmp_path / "smollm2"
    t0 = time.perf_counter()
    first = load_model("smollm2", cache_dir=cache)
    assert (cache / "rewriter-cache.json").is_file() and (cache / "config.json").is_file()
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2"]     # no temp folder left
    t1 = time.perf_counter()
    second = load_model("smollm2", cache_dir=cache, attn_implementation="eager")
    assert time.perf_counter() - t1 < (t1 - t0) / 3, "second load reads the cache"
    gguf = zoo.smollm2_gguf()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                  dtype=torch.float32).eval()
    inputs = first.example_inputs(batch=2, seq_len=24)
    with torch.no_grad():
        ref = direct(**inputs).logits
        assert torch.equal(first.model(**inputs).logits, ref)
        assert (second.model(**inputs).logits - ref).abs().max() < 1e-4
    # a cache missing its completion marker is rebuilt, not trusted
    (cache / "rewriter-cache.json").unlink()
    load_model("smollm2", cache_dir=cache)
    assert (cache / "rewriter-cache.json").is_file()
