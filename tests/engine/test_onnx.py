"""Rewritten models export to ONNX (the custom ops' onnxscript translations) and onnxruntime reproduces
their outputs: linear_attention at the traced length and at another one; every rule's result,
calibrated and exported from a batch of one, at other batch sizes and lengths."""
import numpy as np
import pytest
import torch

from rewriter import optimize

ort = pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("name, step", [
    ("bert", {"linear_attention": {"steps": 5}}),                  # non-causal, padding mask
    ("llama", {"linear_attention": {"window": 8, "steps": 5}}),    # causal hybrid, GQA, RoPE
], ids=["bert-linear", "llama-hybrid"])
def test_linear_attention_model_exports_and_matches_onnxruntime(name, step, tmp_path):
    from rewriter.models import load_model
    loaded = load_model(name)
    recipe = {"calibration": {"samples": 8, "seq_len": 24, "batch_size": 8, "heldout": 0},
              "gate": {"metric": "relative_rms", "max": 10.0}, "steps": [step]}
    opt = optimize(loaded, recipe, progress=False, measure_latency=False)
    assert all(r.status == "applied" for r in opt.report.records)
    path = opt.export_onnx(tmp_path / f"{name}.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for batch, seq in ((2, 24), (3, 17)):
        inputs = loaded.example_inputs(batch=batch, seq_len=seq)
        with torch.no_grad():
            out = opt(**inputs)
        ref = (out.logits if hasattr(out, "logits") else out.last_hidden_state).numpy()
        got = sess.run(None, {k: v.numpy() for k, v in inputs.items() if k in names})[0]
        assert got.shape == ref.shape
        torch.testing.assert_close(torch.from_numpy(got), torch.from_numpy(ref), rtol=1e-4, atol=1e-4)


# ---- every rule, calibrated and exported from a batch of one ---------------------------------------
# torch.export specializes dims of size 1 (its 0/1 specialization): before the trace widened such dims
# (rewriter.trace.widen), a recipe calibrated with batch_size: 1 gave a model that took batch 1 only
# ("Guard failed: input_ids.size()[0] == 1"), and ONNX export from batch-1 inputs failed for
# agent_attention and block_routing ("heads and head_dim must be static"). Two-layer tiny models.

EVERY_RULE = {
    "drop_attention": ("bert", {"drop_attention": {"max_layers": 1, "compensate": "mean"}}),
    "drop_block": ("llama", {"drop_block": {"max_layers": 1}}),
    "linear_attention": ("bert", {"linear_attention": {"steps": 5, "layers": [1]}}),
    "linear_attention-hybrid": ("llama", {"linear_attention": {"window": 4, "steps": 5, "layers": [1]}}),
    "agent_attention": ("bert", {"agent_attention": {"agents": 4, "calibrate": True, "steps": 2,
                                                     "layers": [1]}}),
    "block_routing": ("bert", {"block_routing": {"block_size": 4, "topk": 1, "layers": [1]}}),
    "block_routing-causal": ("llama", {"block_routing": {"block_size": 4, "keep": 0.5, "layers": [1]}}),
    "kmeans_routing": ("llama", {"kmeans_routing": {"layers": [1]}}),
    "masa": ("llama", {"masa": {}}),
    "normlin": ("vit", {"normlin": {"layers": [1]}}),
    "causal_fastpath": ("llama", {"causal_fastpath": {}}),
}


def test_every_built_in_rule_has_a_batch_one_export_case():
    from rewriter.rule import all_rules
    built_in = {n for n, r in all_rules().items() if r.apply.__module__.startswith("rewriter.patterns")}
    assert built_in == {next(iter(step)) for _, step in EVERY_RULE.values()}


def _inputs(loaded, batch, seq):
    """Inputs of `batch` rows (`seq` tokens; images have their fixed size), the last row padded
    after its first half when the model takes an attention mask."""
    x = loaded.example_inputs(batch=batch) if loaded.kind == "vision" else \
        loaded.example_inputs(batch=batch, seq_len=seq)
    if "attention_mask" in x and seq > 2:
        x["attention_mask"][-1, seq // 2 + 1:] = 0
    return x


def _real(x, y):
    """The output positions that are real tokens (all of them without a mask)."""
    m = x.get("attention_mask")
    return m.bool().numpy() if m is not None and m.shape == y.shape[:2] else np.ones(y.shape[:2], dtype=bool)


@pytest.mark.parametrize("case", sorted(EVERY_RULE))
def test_every_rule_calibrated_and_exported_at_batch_one_stays_dynamic(case, tmp_path):
    """The rewritten model of a recipe calibrated with batch_size 1 runs at other batch sizes and
    lengths (each row as when run alone), saves and loads with identical outputs at those sizes, and its
    ONNX export from the batch-1 example matches onnxruntime at other batch sizes and lengths."""
    from rewriter import load
    from rewriter.models import load_model, main_output
    name, step = EVERY_RULE[case]
    loaded = load_model(name, num_hidden_layers=2)
    recipe = {"calibration": {"samples": 2, "seq_len": 16, "batch_size": 1, "heldout": 0},
              "gate": {"metric": "relative_rms", "max": 100.0}, "steps": [step]}
    opt = optimize(loaded, recipe, progress=False, measure_latency=False)
    assert any(r.status == "applied" for r in opt.records), [r.reason for r in opt.records]
    assert all(v.shape[0] == 1 for v in opt.example[1].values() if isinstance(v, torch.Tensor))
    sizes = [(1, 0), (3, 0)] if loaded.kind == "vision" else [(1, 16), (3, 11), (2, 1)]
    again = load(opt.save(tmp_path / case), model=loaded)
    with torch.no_grad():
        for B, T in sizes:
            x = _inputs(loaded, B, T)
            y = main_output(opt(**x))
            real = torch.from_numpy(_real(x, y))
            for i in range(B):                 # the batch gives what each of its rows gives alone
                yi = main_output(opt(**{k: v[i:i + 1] for k, v in x.items()}))
                torch.testing.assert_close(y[i:i + 1][real[i:i + 1]], yi[real[i:i + 1]], rtol=1e-5, atol=1e-5)
            assert torch.equal(main_output(again(**x)), y)

    sess = ort.InferenceSession(str(opt.export_onnx(tmp_path / f"{case}.onnx")))
    for B, T in sizes:
        x = _inputs(loaded, B, T)
        with torch.no_grad():
            y = main_output(opt(**x)).numpy()
        got = sess.run(None, {i.name: x[i.name].numpy() for i in sess.get_inputs()})[0]
        assert got.shape == y.shape
        real = _real(x, y)
        assert np.abs(got - y)[real].max() <= 1e-5 * np.abs(y[real]).max(), (B, T)
