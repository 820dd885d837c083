"""Models rewritten with agent_attention, block_routing and kmeans_routing export to ONNX with
dynamic batch and length (the routing tables and agents are computed inside the exported graph),
exported from a batch of one, and match onnxruntime at other batch sizes and lengths; torch.compile
(inductor) runs them and matches eager. Tiny seeded models: an encoder with padding, and a
causal GQA decoder with padding."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from rewriter import optimize
from rewriter.models import load_model
from rewriter.models import main_output as main_tensor

CASES = {
    "bert": [{"block_routing": {"block_size": 4, "topk": 1, "layers": "0-1"}},
             {"kmeans_routing": {"layers": [2]}},
             {"agent_attention": {"agents": 4, "calibrate": True, "steps": 5, "layers": [3]}}],
    "llama": [{"block_routing": {"block_size": 4, "keep": 0.5, "layers": "0-1"}},
              {"kmeans_routing": {"layers": "2-3"}}],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_onnx_and_compile_match(name, tmp_path):
    loaded = load_model(name)
    opt = optimize(loaded, {"calibration": {"samples": 8, "seq_len": 32, "batch_size": 4, "heldout": 4},
                            "gate": {"metric": "relative_rms", "max": 10.0}, "steps": CASES[name]},
                   progress=False, measure_latency=False)
    assert sum(r.status == "applied" for r in opt.report.records) == 4
    b = loaded.example_inputs(batch=2, seq_len=23)
    b["attention_mask"][1, 14:] = 0
    real = b["attention_mask"].bool().numpy()
    with torch.no_grad():
        y = main_tensor(opt(**b)).numpy()

    # batch and length stay dynamic: the routing tables and the agent count are computed in the ONNX
    # graph from T, so one export serves other lengths — including one shorter than a block / n agents.
    # Exported from a batch of one (its padded row), the usual way to export for deployment: torch.export
    # specializes size-1 dims, which fixed batch 1 (or failed: "heads and head_dim must be static")
    # before export_onnx widened the example
    path = opt.export_onnx(tmp_path / f"{name}.onnx", {k: v[1:] for k, v in b.items()})
    sess = ort.InferenceSession(str(path))
    y_ort = sess.run(None, {i.name: b[i.name].numpy() for i in sess.get_inputs()})[0]
    assert y_ort.shape == y.shape
    assert np.abs(y_ort - y)[real].max() <= 1e-5 * np.abs(y[real]).max()
    for B, T in ((3, 11), (1, 3)):
        x = loaded.example_inputs(batch=B, seq_len=T)
        x["attention_mask"][-1, T // 2 + 1:] = 0
        x_real = x["attention_mask"].bool().numpy()
        with torch.no_grad():
            y_x = main_tensor(opt(**x)).numpy()
        y_ort = sess.run(None, {i.name: x[i.name].numpy() for i in sess.get_inputs()})[0]
        assert np.abs(y_ort - y_x)[x_real].max() <= 1e-5 * np.abs(y_x[x_real]).max()

    compiled = torch.compile(opt.graph_module)
    with torch.no_grad():
        y_c = main_tensor(compiled(**b)).numpy()
    assert np.abs(y_c - y)[real].max() <= 1e-5 * np.abs(y[real]).max()
