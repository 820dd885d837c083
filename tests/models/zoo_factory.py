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
