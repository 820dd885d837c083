"""causal_fastpath (exact kernel swap): rewriter::causal_attention equals masked SDPA on every mask
kind it can meet, takes the fused path only on a plain causal mask, and a rewritten decoder gives
the original's outputs with and without padding, reading GQA's k/v before repeat_kv, saves/loads,
compiles and exports to ONNX."""
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F

from rewriter import load, optimize
from rewriter.kernels.causal_attention import plain_causal
from rewriter.models import main_output as main_tensor

RECIPE = {"calibration": {"samples": 8, "seq_len": 32, "batch_size": 4, "heldout": 4},
          "gate": {"metric": "relative_rms", "max": 1e-5}, "steps": [{"causal_fastpath": {}}]}


def _masks(B=2, T=9):
    tril = torch.ones(T, T, dtype=torch.bool).tril()
    pad = torch.ones(B, T, dtype=torch.bool)
    pad[1, :3] = False                                            # left padding in sample 1
    padded = tril & pad[:, None, None, :]
    additive = lambda m: torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)   # noqa: E731
    return {"bool_plain": tril.expand(B, 1, T, T), "bool_padded": padded,
            "float_plain": additive(tril.expand(B, 1, T, T)), "float_padded": additive(padded),
            "float_biased": additive(tril.expand(B, 1, T, T)) + 0.5 * tril}   # not a pure mask: a bias


@pytest.mark.parametrize("kind", list(_masks()))
def test_op_equals_masked_sdpa(kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 9, 8, generator=g) for _ in range(3))
    mask = _masks()[kind]
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
    got = torch.ops.rewriter.causal_attention(q, k, v, mask, 0.3, False)
    rows = mask.bool() if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min
    rows = rows.any(-1, keepdim=True).expand_as(want)                 # fully masked rows are undefined
    torch.testing.assert_close(got[rows], want[rows], rtol=1e-5, atol=1e-6)
    assert plain_causal(mask) == kind.endswith("plain")


def test_plain_needs_a_square_triangle():
    assert not plain_causal(torch.ones(3, 5, dtype=torch.bool).tril(2))


def test_decoder_outputs_unchanged_with_and_without_padding(llama, tmp_path):
    opt = optimize(llama, RECIPE, progress=False, measure_latency=False)
    assert [r.status for r in opt.report.records] == ["applied"] * 4
    assert str(opt.report.flops_after) == str(opt.report.flops_before)
    ops = [n for n in opt.graph_module.graph.nodes if n.target is torch.ops.rewriter.causal_attention.default]
    # GQA 4/2: the op reads k/v before repeat_kv (enable_gqa), so the repeated copies are never made
    assert len(ops) == 4 and all(n.args[1].meta["val"].shape[1] == 2 and n.args[5] is True for n in ops)
    assert not any(n.target is torch.ops.aten.expand.default and n.meta["val"].dim() == 5    # repeat_kv's
                   for n in opt.graph_module.graph.nodes)
    b = llama.example_inputs(batch=2, seq_len=24)
    with torch.no_grad():
        torch.testing.assert_close(main_tensor(opt(**b)), main_tensor(llama.model(**b)), rtol=1e-5, atol=1e-5)
        b["attention_mask"][1, :5] = 0                            # left padding: the masked branch
        torch.testing.assert_close(main_tensor(opt(**b))[1, 5:], main_tensor(llama.model(**b))[1, 5:],
                                   rtol=1e-5, atol=1e-5)
        opt.save(tmp_path / "m")
        again = load(tmp_path / "m", model=llama)
        assert torch.equal(main_tensor(again(**b)), main_tensor(opt(**b)))
        compiled = torch.compile(opt, backend="inductor")
        torch.testing.assert_close(main_tensor(compiled(**b)), main_tensor(opt(**b)), rtol=1e-4, atol=1e-4)
    path = opt.export_onnx(tmp_path / "m.onnx", b)
    sess = ort.InferenceSession(str(path))
    b2 = llama.example_inputs(batch=3, seq_len=17)               # another batch and length: dynamic axes
    b2["attention_mask"][0, :4] = 0
    for batch in (b, b2):
        y_ort = sess.run(None, {i.name: batch[i.name].numpy() for i in sess.get_inputs()})[0]
        with torch.no_grad():
            y = main_tensor(opt(**batch)).numpy()
        real = batch["attention_mask"].bool().numpy()
        assert np.abs(y_ort - y)[real].max() < 1e-4


def test_refuses_non_causal_sites_with_the_reason(bert):
    opt = optimize(bert, {**RECIPE, "gate": {"metric": "relative_rms", "max": 1e-5}}, progress=False,
                   measure_latency=False)
    assert {r.status for r in opt.report.records} == {"rejected"}
    assert all("not causal" in r.reason for r in opt.report.records)


def test_op_exports_to_onnx_with_gqa_and_padding():
    """The op alone, 4 query heads on 2 kv heads (enable_gqa) with a left-padded boolean mask."""
    import rewriter.kernels as K

    class Op(torch.nn.Module):
        def forward(self, q, k, v, mask):
            return torch.ops.rewriter.causal_attention(q, k, v, mask, 0.3, True)

    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    mask = _masks()["bool_padded"]
    prog = torch.onnx.export(Op(), (q, k, v, mask), dynamo=True, custom_translation_table=K.ONNX_TRANSLATIONS)
    sess = ort.InferenceSession(prog.model_proto.SerializeToString())
    (got,) = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), (q, k, v, mask))})
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=True).numpy()
    real = np.broadcast_to(mask.any(-1, keepdim=True).numpy(), want.shape)
    assert np.abs(got - want)[real].max() < 1e-5
    assert (got[~real] == 0).all()                  # rows with no visible key: 0, not NaN
