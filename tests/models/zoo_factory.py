"""Model factories for the ``"module:function"`` form of ``rewriter.models.load_model``.

Imported by name from tests/models/test_zoo.py (the test puts this folder on sys.path)."""
import torch

from rewriter.models import Loaded, minilm_tokenizer


class TwoLayer(torch.nn.Module):
    def __init__(self, width: int = 8):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(),
                                       torch.nn.Linear(width, width))

    def forward(self, x):
        return self.net(x)


def plain_module(width: int = 8) -> torch.nn.Module:
    """An nn.Module without an HF config: kind 'generic'. Returned in train mode and fp64 on
    purpose, so the test can see load_model switch it to eval and fp32."""
    return TwoLayer(width).double().train()


def tiny_bert_module(attn_implementation: str = "sdpa") -> torch.nn.Module:
    """A bare HF BertModel: load_model must infer kind 'encoder' from its config."""
    from transformers import AutoModel, BertConfig
    config = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=64)
    return AutoModel.from_config(config, attn_implementation=attn_implementation)


def wrapped_loaded(width: int = 8) -> Loaded:
    """A full Loaded with an inputs_fn, so example_inputs and calibration work for it."""
    def inputs_fn(batch, seq_len, seed):
        g = torch.Generator().manual_seed(seed)
        return {"x": torch.randn(batch, width, generator=g)}
    return Loaded("wrapped", TwoLayer(width), "generic", None, 1, inputs_fn=inputs_fn)


def tokenizer_only():
    """Returns something that is not a model."""
    return minilm_tokenizer()


not_callable = 42


# ---------------------------------------------------------------------------- Hugging Face families
# Tiny configs with random weights, one per family (tests/byom/): 2 layers, hidden 32, 4 heads where
# the family has those fields; token ids below 128; images 32x32; the kind infer_kind must find.

_H = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_TEXT = dict(vocab_size=128, max_position_embeddings=64)
_IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _family_specs() -> dict:
    import transformers as T

    def dec(cfg, cls, **kw):
        return lambda: cls(cfg(**{**_H, **_TEXT, **_IDS, **kw}))
    seq2seq = dict(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                   decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=128, **_IDS,
                   decoder_start_token_id=2)
    image = dict(**_H, image_size=32, patch_size=8)
    return {   # name: (build, kind)
        "llama": (dec(T.LlamaConfig, T.LlamaForCausalLM, num_key_value_heads=2), "causal_lm"),
        "qwen2": (dec(T.Qwen2Config, T.Qwen2ForCausalLM, num_key_value_heads=2), "causal_lm"),
        "qwen3": (dec(T.Qwen3Config, T.Qwen3ForCausalLM, num_key_value_heads=2, head_dim=8), "causal_lm"),
        "mistral": (dec(T.MistralConfig, T.MistralForCausalLM, num_key_value_heads=2, sliding_window=4),
                    "causal_lm"),
        "phi": (dec(T.PhiConfig, T.PhiForCausalLM), "causal_lm"),
        "phi3": (dec(T.Phi3Config, T.Phi3ForCausalLM), "causal_lm"),
        "gpt_neox": (dec(T.GPTNeoXConfig, T.GPTNeoXForCausalLM), "causal_lm"),
        "opt": (lambda: T.OPTForCausalLM(T.OPTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, word_embed_proj_dim=32,
            **_TEXT, **_IDS)), "causal_lm"),
        "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128,
                                                         n_positions=64, **_IDS)), "causal_lm"),
        "bert": (dec(T.BertConfig, T.BertModel), "encoder"),
        "roberta": (dec(T.RobertaConfig, T.RobertaModel, pad_token_id=1), "encoder"),
        "distilbert": (lambda: T.DistilBertModel(T.DistilBertConfig(
            dim=32, n_layers=2, n_heads=4, hidden_dim=64, **_TEXT, pad_token_id=0)), "encoder"),
        "gemma2": (dec(T.Gemma2Config, T.Gemma2ForCausalLM, num_key_value_heads=2, head_dim=8,
                       attn_logit_softcapping=None, final_logit_softcapping=None), "causal_lm"),
        "gemma3": (dec(T.Gemma3TextConfig, T.Gemma3ForCausalLM, num_key_value_heads=2, head_dim=8),
                   "causal_lm"),
        "olmo2": (dec(T.Olmo2Config, T.Olmo2ForCausalLM, num_key_value_heads=2), "causal_lm"),
        "falcon": (lambda: T.FalconForCausalLM(T.FalconConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, vocab_size=128, **_IDS,
            new_decoder_architecture=False, parallel_attn=True)), "causal_lm"),
        "bloom": (lambda: T.BloomForCausalLM(T.BloomConfig(hidden_size=32, n_layer=2, n_head=4,
                                                           vocab_size=128, **_IDS)), "causal_lm"),
        "mpnet": (dec(T.MPNetConfig, T.MPNetModel, pad_token_id=1), "encoder"),
        "deberta_v2": (dec(T.DebertaV2Config, T.DebertaV2Model), "encoder"),
        "bart": (lambda: T.BartModel(T.BartConfig(**seq2seq, max_position_embeddings=64)), "generic"),
        "t5": (lambda: T.T5Model(T.T5Config(d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2,
                                            num_heads=4, vocab_size=128, pad_token_id=0, eos_token_id=1,
                                            decoder_start_token_id=0)), "generic"),
        "whisper": (lambda: T.WhisperModel(T.WhisperConfig(
            **seq2seq, num_mel_bins=16, max_source_positions=32, max_target_positions=32)), "generic"),
        "vit": (lambda: T.ViTModel(T.ViTConfig(**image)), "vision"),
        "dinov2": (lambda: T.Dinov2Model(T.Dinov2Config(**image)), "vision"),
        "beit": (lambda: T.BeitModel(T.BeitConfig(**image)), "vision"),
        "siglip_vision": (lambda: T.SiglipVisionModel(T.SiglipVisionConfig(**image)), "vision"),
        "swin": (lambda: T.SwinModel(T.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
                                                  num_heads=[2, 4], window_size=4)), "vision"),
        "wav2vec2": (lambda: T.Wav2Vec2Model(T.Wav2Vec2Config(
            **_H, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
            num_conv_pos_embedding_groups=4)), "generic"),
    }


FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi", "phi3", "gpt_neox", "opt", "gpt2", "bert", "roberta",
            "distilbert", "gemma2", "gemma3", "olmo2", "falcon", "bloom", "mpnet", "deberta_v2", "bart", "t5",
            "whisper", "vit", "dinov2", "beit", "siglip_vision", "swin", "wav2vec2")


def family(name: str, seed: int = 0, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The tiny random ``name`` model (see FAMILIES), in eval mode, weights seeded by ``seed``."""
    build, _ = _family_specs()[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build()
    if attn_implementation != "sdpa" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(attn_implementation)
    return model.eval()


def family_kind(name: str) -> str:
    """The kind rewriter.models.infer_kind must find for ``name``."""
    return _family_specs()[name][1]


# ---------------------------------------------------------------------------- offline tokenizers
# The tiny families take ids below 128: a word-level tokenizer trained here on the bundled text
# (nothing downloaded) turns real sentences into such ids, with the special tokens where the
# family's config puts them.

SPECIALS = {   # family convention: special tokens in id order, and the template a sequence gets
    "bart": (("<pad>", "<s>", "</s>", "<unk>"), "<s> $A </s>"),      # pad 0, bos 1, eos 2 (= _IDS)
    "t5": (("<pad>", "</s>", "<unk>"), "$A </s>"),                   # pad 0, eos 1, start = pad
    "gpt": (("<pad>", "<s>", "</s>", "<unk>"), "$A"),                # a decoder's running text
}


def word_tokenizer(convention: str = "bart", vocab_size: int = 512):
    """A ``PreTrainedTokenizerFast`` over a WordLevel model (lower-cased words and punctuation)
    trained on the bundled sentences, ``vocab_size`` ids at most, special tokens first as
    ``convention`` (a key of SPECIALS) orders them; the rest of the words map to ``<unk>``."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from rewriter.models import bundled_sentences
    specials, template = SPECIALS[convention]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(bundled_sentences(), trainers.WordLevelTrainer(
        vocab_size=vocab_size, special_tokens=list(specials)))
    ids = {t: tok.token_to_id(t) for t in specials}
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, ids[t]) for t in template.split() if t in ids])
    named = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    if "<s>" in ids:
        named["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


TEXT_VOCAB = 512     # the text tests' models and tokenizers: most bundled words get their own id


def headless(name: str, vocab_size: int = TEXT_VOCAB, seed: int = 0) -> torch.nn.Module:
    """A causal decoder without its LM head (``LlamaModel`` / ``GPT2Model``, tiny, random weights)."""
    import transformers as T
    text = dict(_TEXT, vocab_size=vocab_size)
    build = {"llama": lambda: T.LlamaModel(T.LlamaConfig(**_H, **text, **_IDS, num_key_value_heads=2)),
             "gpt2": lambda: T.GPT2Model(T.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=vocab_size,
                                                       n_positions=64, **_IDS))}[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()


def seq2seq(name: str, vocab_size: int = TEXT_VOCAB, seed: int = 0) -> torch.nn.Module:
    """The tiny BART / T5 of ``family`` with a vocabulary of ``vocab_size``, whose special ids match
    ``word_tokenizer(name)``."""
    import transformers as T
    build = {"bart": lambda: T.BartModel(T.BartConfig(
                 d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=vocab_size,
                 **_IDS, decoder_start_token_id=2, max_position_embeddings=64)),
             "t5": lambda: T.T5Model(T.T5Config(
                 d_model=32, d_ff=64, d_kv=8, num_layers=2, num_decoder_layers=2, num_heads=4,
                 vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))}[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build().eval()
