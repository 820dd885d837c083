"""rewriter::block_sparse_attention(_lse): Triton kernel (interpreter mode on CPU) and CPU impl vs
the dense-mask reference, exactness with every block listed, lse merge, gradients,
torch.export / torch.compile / ONNX of a routed call. The tables come from the run-time BiFormer
routing (rewriter.kernels.routed_attention.route_blocks), whose own tests are test_routed_attention.py."""
import pytest
import torch
import torch.nn.functional as F

import rewriter.kernels as K
from rewriter.kernels.block_sparse_attention import (
    block_sparse_attention, block_sparse_attention_lse, block_sparse_attention_ref,
)
from rewriter.kernels.block_sparse_attention.triton import block_sparse_attention_triton
from rewriter.kernels.routed_attention import route_blocks

# Relative RMS error bounds. fp32: the kernels only reorder fp32 sums (online softmax over
# blocks vs one dense softmax); observed ≈ 1e-7, bound 1e-5. bf16: the reference gets the same
# bf16 inputs in fp32; the kernel rounds P to bf16 before P·V and rounds the output (2^-9 ≈ 2e-3
# relative each); observed ≈ 4e-3, bound 1e-2.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_rms(x, ref):
    return ((x.float() - ref.float()).pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt().clamp(min=1e-30)).item()


def make_inputs(B, H, Hkv, T, D, dtype=torch.float32, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, T, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, T, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, T, Dv or D, generator=g).to(dtype)
    return q, k, v


def padding_mask(B, T):
    """Sample 0 full, sample 1 right-padded, sample 2 left-padded (its first rows see nothing
    under causal masking)."""
    m = torch.ones(B, T, dtype=torch.bool)
    if B > 1:
        m[1, T * 2 // 3:] = False
    if B > 2:
        m[2, :T // 4] = False
    return m


CASES = [  # (B, H, Hkv, T, D, block_size, causal, masked)
    pytest.param(1, 4, 4, 63, 60, 16, True, False, id="B1-T63-H4-D60-bs16-causal"),
    pytest.param(3, 4, 2, 63, 60, 12, True, True, id="B3-T63-H4-HKV2-D60-bs12-causal-pad"),
    pytest.param(3, 4, 1, 63, 32, 16, False, True, id="B3-T63-H4-HKV1-D32-bs16-pad"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,H,Hkv,T,D,bs,causal,masked", CASES)
def test_triton_kernel_matches_reference(B, H, Hkv, T, D, bs, causal, masked, dtype):
    q, k, v = make_inputs(B, H, Hkv, T, D, dtype)
    key_mask = padding_mask(B, T) if masked else None
    table = route_blocks(q, k, key_mask, block_size=bs, topk=1, causal=causal, sinks=("first",))
    assert (table < 0).any(), "the routing must leave blocks out, or this is not a sparse test"
    out = torch.full((B, H, T, D), float("nan"), dtype=dtype)
    out, lse = block_sparse_attention_triton(q, k, v, table, bs, causal, key_mask, D ** -0.5, out=out)
    ref, ref_lse = block_sparse_attention_ref(q, k, v, table, bs, causal, key_mask, D ** -0.5)
    assert out.dtype == dtype and not out.isnan().any() and not lse.isnan().any()
    assert rel_rms(out, ref) <= TOL[dtype]
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    finite = ~ref_lse.isinf()
    assert rel_rms(lse[finite], ref_lse[finite]) <= TOL[dtype]


@pytest.mark.parametrize("B,H,Hkv,T,D,bs,causal,masked", CASES)
def test_cpu_impl_matches_reference(B, H, Hkv, T, D, bs, causal, masked):
    q, k, v = make_inputs(B, H, Hkv, T, D, Dv=D + 4)
    key_mask = padding_mask(B, T) if masked else None
    table = route_blocks(q, k, key_mask, block_size=bs, topk=2, causal=causal, sinks=())
    out, lse = block_sparse_attention_lse(q, k, v, table, bs, causal=causal, key_mask=key_mask)
    ref, ref_lse = block_sparse_attention_ref(q, k, v, table, bs, causal, key_mask)
    assert rel_rms(out, ref) <= TOL[torch.float32]
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    assert rel_rms(lse[~lse.isinf()], ref_lse[~lse.isinf()]) <= TOL[torch.float32]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_every_block_listed_is_exact_attention(causal):
    B, H, Hkv, T, D, bs = 2, 4, 2, 63, 60, 16
    q, k, v = make_inputs(B, H, Hkv, T, D)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[1, 50:] = False                     # right padding: every query row sees a key
    table = route_blocks(q, k, key_mask, block_size=bs, topk=T, causal=causal, sinks=())
    mask = key_mask[:, None, None, :] & (torch.ones(T, T, dtype=torch.bool).tril() if causal else True)
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out = block_sparse_attention(q, k, v, table, bs, causal=causal, key_mask=key_mask)
    assert rel_rms(out, sdpa) <= TOL[torch.float32]
    out_triton, _ = block_sparse_attention_triton(q, k, v, table, bs, causal, key_mask, D ** -0.5)
    assert rel_rms(out_triton, sdpa) <= TOL[torch.float32]


def test_rows_with_no_visible_key_are_zero():
    B, H, T, D, bs = 3, 2, 40, 16, 8
    q, k, v = make_inputs(B, H, H, T, D)
    key_mask = padding_mask(B, T)                # sample 2: keys 0..9 padded -> rows 0..9 see nothing
    table = route_blocks(q, k, key_mask, block_size=bs, topk=10, causal=True, sinks=())
    for out, lse in (block_sparse_attention_lse(q, k, v, table, bs, causal=True, key_mask=key_mask),
                     block_sparse_attention_triton(q, k, v, table, bs, True, key_mask, D ** -0.5)):
        assert not out.isnan().any()
        assert (out[2, :, :10] == 0).all() and torch.isneginf(lse[2, :, :10]).all()
        assert (out[2, :, 10:].abs().sum(-1) > 0).all() and lse[2, :, 10:].isfinite().all()


def test_lse_merges_disjoint_block_sets_into_full_attention():
    """The k-means routing contract: two calls over disjoint key-block sets, merged by
    log-sum-exp, equal one call over their union."""
    B, H, T, D, bs = 2, 2, 48, 16, 8
    q, k, v = make_inputs(B, H, H, T, D)
    n_blocks = T // bs
    evens = torch.arange(0, n_blocks, 2, dtype=torch.int32).expand(B, H, n_blocks, -1).contiguous()
    odds = evens + 1
    both = torch.arange(n_blocks, dtype=torch.int32).expand(B, H, n_blocks, -1).contiguous()
    o1, l1 = block_sparse_attention_lse(q, k, v, evens, bs)
    o2, l2 = block_sparse_attention_lse(q, k, v, odds, bs)
    lse = torch.logaddexp(l1, l2)
    merged = torch.exp(l1 - lse)[..., None] * o1 + torch.exp(l2 - lse)[..., None] * o2
    full, full_lse = block_sparse_attention_lse(q, k, v, both, bs)
    assert rel_rms(merged, full) <= TOL[torch.float32] and rel_rms(lse, full_lse) <= TOL[torch.float32]


def test_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 9, 4, dtype=torch.double, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 9, 4, dtype=torch.double, generator=g, requires_grad=True)
    v = torch.randn(1, 1, 9, 3, dtype=torch.double, generator=g, requires_grad=True)
    key_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0, 1]], dtype=torch.bool)
    table = torch.tensor([[[[0, -1], [0, 1], [1, 2]], [[0, -1], [0, 1], [0, 2]]]], dtype=torch.int32)
    fn = lambda q, k, v: block_sparse_attention_lse(q, k, v, table, 4, causal=True, key_mask=key_mask)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v))


class _Routed(torch.nn.Module):
    """What a routing rule puts in the graph: table from the block means, then the op."""

    def forward(self, q, k, v, key_mask):
        table = route_blocks(q, k, key_mask, block_size=16, topk=1, sinks=("first",))
        out, lse = block_sparse_attention_lse(q, k, v, table, 16, key_mask=key_mask)
        return out * 2.0, lse


def _routed_inputs(B=2, T=40):
    q, k, v = make_inputs(B, 4, 2, T, 12)
    key_mask = torch.ones(B, T, dtype=torch.bool)
    key_mask[-1, T - 7:] = False
    return q, k, v, key_mask


def test_export_keeps_op_with_dynamic_shapes():
    auto = torch.export.Dim.AUTO
    dims = ({0: auto, 2: auto},) * 3 + ({0: auto, 1: auto},)
    ep = torch.export.export(_Routed(), _routed_inputs(), strict=False, dynamic_shapes=dims)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.rewriter.block_sparse_attention_lse.default in targets
    other = _routed_inputs(B=3, T=77)            # another batch and length through the same graph
    for got, want in zip(ep.module()(*other), _Routed()(*other)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_torch_compile_matches_eager():
    args = _routed_inputs()
    compiled = torch.compile(_Routed(), backend="inductor", fullgraph=True)
    for got, want in zip(compiled(*args), _Routed()(*args)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_onnx_export_matches_cpu_impl():
    ort = pytest.importorskip("onnxruntime")
    args = _routed_inputs()
    prog = torch.onnx.export(_Routed().eval(), args, dynamo=True, custom_translation_table=K.ONNX_TRANSLATIONS)
    sess = ort.InferenceSession(prog.model_proto.SerializeToString())
    feeds = {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)}
    got_out, got_lse = sess.run(None, feeds)
    want_out, want_lse = _Routed()(*args)
    assert abs(got_out - want_out.numpy()).max() <= 1e-4
    assert abs(got_lse - want_lse.numpy()).max() <= 1e-4


def test_onnx_rows_with_no_visible_key():
    ort = pytest.importorskip("onnxruntime")

    class Causal(torch.nn.Module):
        def forward(self, q, k, v, table, key_mask):
            return block_sparse_attention_lse(q, k, v, table, 8, causal=True, key_mask=key_mask)

    q, k, v = make_inputs(2, 2, 1, 24, 8)
    key_mask = torch.ones(2, 24, dtype=torch.bool)
    key_mask[1, :5] = False
    table = torch.tensor([[0, -1, -1], [0, 1, -1], [1, 2, -1]], dtype=torch.int32).expand(2, 2, 3, 3).contiguous()
    args = (q, k, v, table, key_mask)
    prog = torch.onnx.export(Causal().eval(), args, dynamo=True, custom_translation_table=K.ONNX_TRANSLATIONS)
    sess = ort.InferenceSession(prog.model_proto.SerializeToString())
    got_out, got_lse = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
    want_out, want_lse = Causal()(*args)
    assert abs(got_out - want_out.numpy()).max() <= 1e-4
    assert (got_lse[1, :, :5] == float("-inf")).all() and (got_out[1, :, :5] == 0).all()
    assert abs(got_lse[1, :, 5:] - want_lse[1, :, 5:].numpy()).max() <= 1e-4


def test_bad_tables_are_rejected_with_a_reason():
    q, k, v = make_inputs(1, 2, 2, 20, 8)
    dup = torch.tensor([0, 0, -1], dtype=torch.int32).expand(1, 2, 3, 3).contiguous()
    with pytest.raises(ValueError, match="lists a key block twice"):
        block_sparse_attention(q, k, v, dup, 8)
    out_of_range = torch.full((1, 2, 3, 1), 3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"entries must lie in \[-1, 3\)"):
        block_sparse_attention(q, k, v, out_of_range, 8)
    with pytest.raises(ValueError, match="block_table must be"):
        block_sparse_attention(q, k, v, torch.zeros(1, 2, 2, 1, dtype=torch.int32), 8)
    with pytest.raises(ValueError, match="causal needs equal query and key lengths"):
        block_sparse_attention(q[:, :, :10], k, v, torch.zeros(1, 2, 2, 1, dtype=torch.int32), 8, causal=True)


@pytest.mark.parametrize("B,H,Hkv,T,D,bs,causal,masked", CASES)
def test_cpu_impl_with_per_head_row_counts_matches_reference(B, H, Hkv, T, D, bs, causal, masked):
    """Per-head budgets give heads tables of different used widths, with unused slots (-1)
    anywhere in a row: the CPU path groups heads by width and must still equal the reference."""
    q, k, v = make_inputs(B, H, Hkv, T, D, Dv=D + 4, seed=3)
    key_mask = padding_mask(B, T) if masked else None
    table = route_blocks(q, k, key_mask, block_size=bs, topk=3, causal=causal, sinks=()).clone()
    table[:, 0, :, 1:] = -1                               # head 0: one block per row
    table[:, 1, :, 0] = -1                                # head 1: -1 first, then its blocks
    assert len({int((table[:, h] >= 0).sum(-1).max()) for h in range(H)}) > 1
    out, lse = block_sparse_attention_lse(q, k, v, table, bs, causal=causal, key_mask=key_mask)
    ref, ref_lse = block_sparse_attention_ref(q, k, v, table, bs, causal, key_mask)
    assert rel_rms(out, ref) <= TOL[torch.float32]
    assert torch.equal(lse.isinf(), ref_lse.isinf())
    assert rel_rms(lse[~lse.isinf()], ref_lse[~lse.isinf()]) <= TOL[torch.float32]
