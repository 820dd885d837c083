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


@pytest.mark.parametrize("model, step", [
    ("bert", {"linear_attention": {"steps": 5}}),
    ("bert", {"agent_attention": {"agents": 4}}),
    ("llama", {"block_routing": {"block_size": 4, "keep": 0.5}}),
])
def test_materialize_is_exact_with_input_dependent_rewrites(model, step, request):
    """Folding constants must leave everything that reads the inputs (routing tables, agent pooling,
    feature maps of q/k) computed per call: outputs stay bit-identical at a new shape."""
    from rewriter import optimize
    loaded = request.getfixturevalue(model)
    opt = optimize(loaded, {"calibration": {"samples": 8, "seq_len": 16, "batch_size": 4, "heldout": 0},
                            "gate": {"metric": "relative_rms", "max": 100.0}, "steps": [step]},
                   progress=False, measure_latency=False)
    assert [r.status for r in opt.report.records if r.status == "applied"]
    batch = loaded.example_inputs(batch=2, seq_len=23)
    main = (lambda o: o.logits) if model == "llama" else (lambda o: o.last_hidden_state)
    with torch.no_grad():
        before = main(opt(**batch))
        after = main(opt.materialize()(**batch))
    assert torch.equal(before, after)
