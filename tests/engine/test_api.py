"""inspect() on models handed over bare, with no example inputs: the engine builds inputs from the
config, and the sites come out right."""
import pytest
import torch
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM, ViTConfig, ViTModel

from rewriter import inspect
from rewriter.trace import TraceError, trace

SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)


@pytest.mark.parametrize("make, mask, kv", [
    (lambda: BertModel(BertConfig(**SMALL)), "padding", 4),
    (lambda: LlamaForCausalLM(LlamaConfig(**SMALL, num_key_value_heads=2, vocab_size=100)), "causal+padding", 2),
    (lambda: ViTModel(ViTConfig(**SMALL, image_size=32, patch_size=8)), "none", 4),
], ids=["bert", "llama", "vit"])
def test_inspect_builds_inputs_from_config(make, mask, kv):
    torch.manual_seed(0)
    sites = inspect(make().eval())
    assert len(sites) == 2 and {s.mask for s in sites} == {mask} and {s.kv_heads for s in sites} == {kv}


class DataDependent(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:          # Python control flow on a tensor value: torch.export cannot trace it
            return x * 2
        return x


def test_trace_error_names_model_and_hints():
    with pytest.raises(TraceError) as e:
        trace(DataDependent(), (torch.randn(2, 3),), name="my-model")
    msg = str(e.value)
    assert "my-model" in msg and "torch.export" in msg and "hint:" in msg and "control flow" in msg
