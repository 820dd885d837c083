"""A model rewritten with linear_attention exports to ONNX (the custom ops' onnxscript translations) and
onnxruntime reproduces its outputs, at the traced length and at another one."""
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
