"""rewriter::decode_attention: the Lean Attention Triton kernels (interpreter mode on CPU, compiled
on a GPU) and the CPU (SDPA) path against the fp32 reference at odd sizes — D = 60 and Dv = 20
(padded inside the kernel), L = 50 not a multiple of the 16-slot tile, Hq/Hkv = 3, ragged
left padding per row, T_q = 1 and 3, shared and per-row cache positions, stream-K grids that
cut segments anywhere; decode steps over a static cache reproduce causal SDPA with padding;
torch.export and ONNX (onnxruntime) at dynamic batch and cache length.

Tolerances (relative RMS error vs the fp32 reference from the same rounded inputs):
  fp32 1e-5: only the summation order differs (tiles, partial merge), ~1e-7 observed.
  bf16 1e-2: the kernel rounds P to bf16 before P·V and rounds the output (2⁻⁹ each).
"""
import pytest
import torch
import torch.nn.functional as F

import rewriter.kernels as K
from rewriter.kernels.decode_attention import decode_attention, decode_attention_ref

try:
    from rewriter.kernels.decode_attention import triton as TK
except ImportError:                       # no triton: the kernel tests skip, the rest run
    TK = None

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]
needs_triton = pytest.mark.skipif(TK is None, reason="triton is not installed")


def rel_rms(x, ref):
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite output (an element the kernel never wrote is NaN)"
    return ((x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-30)).item()


def make_case(B, H, Hkv, L, D, Dv, Tq, per_row, dtype=torch.float32, seed=0, garbage=0.0):
    """A static cache of L slots, filled up to each query's slot; row b left-padded by pads[b]
    slots (ragged). Slots after the last query hold `garbage` (NaN: the kernel must never read them)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hkv, L, D, generator=g)
    v = torch.randn(B, Hkv, L, Dv, generator=g)
    last = L - 4                                           # the last query's slot: 3 unfilled slots after it
    pos = torch.arange(last - Tq + 1, last + 1)            # [Tq], consecutive like a prefill chunk
    if per_row:                                            # rows at different lengths (continuous batching)
        pos = torch.stack([pos - 5 * b for b in range(B)])
    pads = [0, 13, L - 5, 1][:B]                           # ragged; row 2 sees nothing for some queries
    valid = torch.ones(B, L, dtype=torch.bool)
    for b, p in enumerate(pads):
        valid[b, :p] = False
    unfilled = torch.arange(L)[None, :] > (pos.max(-1).values[:, None] if per_row else pos.max())
    k = k.masked_fill(unfilled[:, None, :, None], garbage)
    v = v.masked_fill(unfilled[:, None, :, None], garbage)
    to = lambda t: t.to(DEVICE, dtype)                    # noqa: E731
    return to(q), to(k), to(v), pos.to(DEVICE), valid.to(DEVICE)


CASES = [  # (B, H, Hkv, L, D, Dv, Tq, per_row)
    pytest.param(1, 4, 4, 50, 60, 60, 1, False, id="B1-H4-L50-D60-Tq1"),
    pytest.param(3, 6, 2, 50, 60, 20, 1, False, id="B3-H6-Hkv2-L50-D60-Dv20-Tq1"),
    pytest.param(3, 6, 2, 50, 60, 20, 3, False, id="B3-H6-Hkv2-L50-Tq3"),
    pytest.param(4, 3, 1, 50, 24, 24, 3, True, id="B4-H3-Hkv1-L50-Tq3-per-row"),
]


# --------------------------------------------------------------------------------------------
# Triton (Lean Attention) vs reference
# --------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_prog", [1, 5, 1000], ids=["grid1", "grid5", "grid-per-tile"])
@pytest.mark.parametrize("B,H,Hkv,L,D,Dv,Tq,per_row", CASES)
def test_triton_matches_reference(B, H, Hkv, L, D, Dv, Tq, per_row, n_prog, dtype):
    """grid1: one program walks every segment; grid5: ranges that end inside segments, so rows
    merge partials of two programs; grid-per-tile: every tile its own program (4 partials per
    segment). NaN in the never-filled slots proves the kernel does not load them."""
    q, k, v, pos, valid = make_case(B, H, Hkv, L, D, Dv, Tq, per_row, dtype)
    _, k_nan, v_nan, _, _ = make_case(B, H, Hkv, L, D, Dv, Tq, per_row, dtype, garbage=float("nan"))
    out = torch.full((B, H, Tq, Dv), float("nan"), dtype=dtype, device=DEVICE)
    got = TK.decode_attention_triton(q, k_nan, v_nan, pos, valid, None, block_n=16, num_programs=n_prog,
                                     out=out)
    ref = decode_attention_ref(q, k, v, pos, valid)
    assert got.dtype == dtype and got.shape == (B, H, Tq, Dv)
    assert rel_rms(got, ref) <= TOL[dtype]


@needs_triton
def test_triton_fully_masked_rows_are_zero_and_scale_is_used():
    """Row 2 is padded up to slot L−6: its first queries see no key and must give exactly 0."""
    q, k, v, pos, valid = make_case(3, 6, 2, 50, 60, 20, 3, False)
    got = TK.decode_attention_triton(q, k, v, pos, valid, 0.05, block_n=16, num_programs=3)
    ref = decode_attention_ref(q, k, v, pos, valid, 0.05)
    empty = ~(valid[:, None, :] & (torch.arange(50, device=DEVICE)[None, None] <= pos[None, :, None])).any(-1)
    assert empty.any() and (got[empty[:, None].expand(-1, 6, -1)] == 0).all()
    assert rel_rms(got, ref) <= TOL[torch.float32]
    assert rel_rms(got, decode_attention_ref(q, k, v, pos, valid)) > 1e-2   # the default scale: another op


@pytest.mark.skipif(TK is None, reason="triton is not installed")
def test_stream_k_bookkeeping_covers_every_tile_once():
    """The partial buffer holds `stream_k_splits` slots per segment and the merge finds a
    program's partial at p − p_first(s): brute-force the deal of tiles for many grids, so a
    split never writes past its segment's slots (out-of-bounds would corrupt other rows)."""
    for n_seg in (1, 3, 8):
        for n_blk in (1, 2, 4, 7):
            total = n_seg * n_blk
            for n_prog in range(1, total + 1):
                splits = TK.stream_k_splits(total, n_blk, n_prog)
                owners = [[] for _ in range(n_seg)]
                for p in range(n_prog):
                    for t in range(p * total // n_prog, (p + 1) * total // n_prog):
                        if p not in owners[t // n_blk]:
                            owners[t // n_blk].append(p)
                for s, ps in enumerate(owners):
                    p_first = ((s * n_blk + 1) * n_prog - 1) // total
                    p_last = ((s + 1) * n_blk * n_prog - 1) // total
                    assert ps == list(range(p_first, p_last + 1)), (n_seg, n_blk, n_prog, s)
                    assert len(ps) <= splits


@needs_triton
def test_triton_wrapper_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v, pos, valid = make_case(1, 2, 2, 8, 4, 4, 1, False)
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="need CUDA tensors"):
            TK.decode_attention_triton(q, k, v, pos, valid)


# --------------------------------------------------------------------------------------------
# the op (SDPA on CPU, Triton on CUDA) vs reference; decode over a cache = causal attention
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,L,D,Dv,Tq,per_row", CASES)
def test_op_matches_reference(B, H, Hkv, L, D, Dv, Tq, per_row, dtype):
    q, k, v, pos, valid = make_case(B, H, Hkv, L, D, Dv, Tq, per_row, dtype)
    got = decode_attention(q, k, v, pos, valid)
    ref = decode_attention_ref(q, k, v, pos, valid)
    assert got.dtype == dtype and got.shape == (B, H, Tq, Dv)
    assert rel_rms(got, ref) <= TOL[dtype]
    empty = ~(valid[:, None, :] & (torch.arange(L, device=DEVICE) <= pos[..., None])).any(-1)   # [B, Tq]
    assert (got.float().permute(0, 2, 1, 3)[empty] == 0).all()                # rows that see nothing: 0


def test_op_without_key_valid_is_plain_causal_over_the_cache():
    q, k, v, pos, _ = make_case(2, 4, 2, 30, 16, 16, 2, False)
    got = decode_attention(q, k, v, pos, None)
    assert rel_rms(got, decode_attention_ref(q, k, v, pos, None)) <= TOL[torch.float32]


def _causal_sdpa(q, k, v, mask):
    """Full-sequence causal attention with a key padding mask, as a traced decoder runs it."""
    T = q.shape[2]
    allowed = torch.ones(T, T, dtype=torch.bool, device=q.device).tril() & mask[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, enable_gqa=True)


@pytest.mark.parametrize("impl", ["op", pytest.param("triton", marks=needs_triton)])
def test_prefill_then_decode_over_static_cache_reproduces_causal_attention(impl):
    """What generation relies on: a prefill chunk of T0 tokens, then one token per step, each
    written into a zero-initialised static cache of L > T slots at its cache_position, gives
    the full-sequence causal(+left padding) attention of every token."""
    B, H, Hkv, T, T0, L, D = 3, 6, 2, 21, 3, 32, 20
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(B, h, T, D, generator=g).to(DEVICE) for h in (H, Hkv, Hkv))
    mask = torch.ones(B, T, dtype=torch.bool, device=DEVICE)
    mask[1, :5] = False                                    # left padding, longer than the prefill chunk
    mask[2, :1] = False
    full = _causal_sdpa(q, k, v, mask)
    run = decode_attention if impl == "op" else (
        lambda *a: TK.decode_attention_triton(*a, block_n=16, num_programs=5))
    k_cache = torch.zeros(B, Hkv, L, D, device=DEVICE)
    v_cache = torch.zeros(B, Hkv, L, D, device=DEVICE)
    key_valid = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    outs, t = [], 0
    for n in [T0] + [1] * (T - T0):
        cache_position = torch.arange(t, t + n, device=DEVICE)
        k_cache = k_cache.index_copy(2, cache_position, k[:, :, t:t + n])
        v_cache = v_cache.index_copy(2, cache_position, v[:, :, t:t + n])
        key_valid = key_valid.index_copy(1, cache_position, mask[:, t:t + n])
        outs.append(run(q[:, :, t:t + n], k_cache, v_cache, cache_position, key_valid))
        t += n
    assert rel_rms(torch.cat(outs, dim=2), full) <= TOL[torch.float32]


@pytest.mark.parametrize("bad,match", [
    (dict(kv_heads=4), "q has 6 heads, not a multiple of the 4 kv heads"),
    (dict(pos=torch.tensor([7, 50])), "cache_position holds slots 7..50, outside the cache's 50 slots"),
    (dict(pos=torch.tensor([[3, 4]])), "cache_position must be \\[T_q=2\\] or \\[B=2, T_q=2\\]"),
    (dict(pos=torch.tensor([3.0, 4.0])), "cache_position must be int64"),
    (dict(valid_dtype=torch.int64), "key_valid must be bool"),
    (dict(v_len=49), "v_cache .* must match k_cache"),
])
def test_errors_name_the_argument(bad, match):
    q = torch.randn(2, 6, 2, 8)
    Hkv = bad.get("kv_heads", 2)
    k = torch.randn(2, Hkv, 50, 8)
    v = torch.randn(2, Hkv, bad.get("v_len", 50), 8)
    valid = torch.ones(2, 50, dtype=bad.get("valid_dtype", torch.bool))
    with pytest.raises(ValueError, match="rewriter::decode_attention: " + match):
        decode_attention(q, k, v, bad.get("pos", torch.tensor([3, 4])), valid)


# --------------------------------------------------------------------------------------------
# graph tooling: torch.export, ONNX
# --------------------------------------------------------------------------------------------
class CachedAttentionStep(torch.nn.Module):
    """A lowered attention site: write the new k/v into the static cache functionally, attend."""

    def forward(self, q, k_new, v_new, k_cache, v_cache, key_valid, cache_position):
        k_cache = k_cache.index_copy(2, cache_position, k_new)
        v_cache = v_cache.index_copy(2, cache_position, v_new)
        o = torch.ops.rewriter.decode_attention(q, k_cache, v_cache, cache_position, key_valid, None)
        return o, k_cache, v_cache


def _step_args(B=2, L=24, Tq=1, start=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, 6, Tq, 16, generator=g)
    k_new, v_new = torch.randn(B, 2, Tq, 16, generator=g), torch.randn(B, 2, Tq, 12, generator=g)
    k_cache, v_cache = torch.randn(B, 2, L, 16, generator=g), torch.randn(B, 2, L, 12, generator=g)
    key_valid = torch.arange(L)[None, :] < start + Tq
    key_valid = key_valid.repeat(B, 1)
    key_valid[0, :4] = False                               # left padding in row 0
    return q, k_new, v_new, k_cache, v_cache, key_valid, torch.arange(start, start + Tq)


A = torch.export.Dim.AUTO
DYN = ({0: A}, {0: A}, {0: A}, {0: A, 2: A}, {0: A, 2: A}, {0: A, 1: A}, None)   # the decode graph: T_q = 1


def test_export_keeps_op_and_matches_at_other_sizes():
    m = CachedAttentionStep()
    ep = torch.export.export(m, _step_args(), strict=False, dynamic_shapes=DYN)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert torch.ops.rewriter.decode_attention.default in targets
    other = _step_args(B=3, L=40, start=30, seed=1)        # dynamic batch and cache length
    for a, b in zip(ep.module()(*other), m(*other)):
        torch.testing.assert_close(a, b)


class PerRowChunk(torch.nn.Module):
    """A prefill chunk of 3 tokens per row, each row at its own cache position."""

    def forward(self, q, k_cache, v_cache, key_valid, cache_position):
        return torch.ops.rewriter.decode_attention(q, k_cache, v_cache, cache_position, key_valid, 0.3)


def _chunk_args(B=2, L=24, seed=0):
    q, _, _, k_cache, v_cache, key_valid, _ = _step_args(B, L, 3, L - 3, seed)   # valid but row 0's first 4
    pos = torch.stack([torch.arange(L - 6, L - 3) - 2 * b for b in range(B)])   # [B, 3]
    return q, k_cache, v_cache, key_valid, pos


@pytest.mark.parametrize("case", ["decode-step", "chunk-per-row-positions"])
def test_onnx_export_matches_op_at_dynamic_batch_and_length(case, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    if case == "decode-step":
        m, make, dyn = CachedAttentionStep().eval(), lambda **kw: _step_args(start=kw["L"] - 11, **kw), DYN
    else:
        dyn = ({0: A}, {0: A, 2: A}, {0: A, 2: A}, {0: A, 1: A}, {0: A})
        m, make = PerRowChunk().eval(), _chunk_args
    onx = torch.onnx.export(m, make(B=2, L=24), dynamo=True, dynamic_shapes=dyn,
                            custom_translation_table=K.ONNX_TRANSLATIONS, verbose=False)
    path = tmp_path / "decode_attention.onnx"
    onx.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for args in (make(B=2, L=24), make(B=3, L=40, seed=1)):     # the traced sizes and others
        got = sess.run(None, {n: t.numpy() for n, t in zip(names, args)})
        want = m(*args)
        want = want if isinstance(want, tuple) else (want,)
        for i, (a, b) in enumerate(zip(got, want)):
            err = (torch.from_numpy(a) - b).abs().max().item()
            assert err <= 1e-5, f"output {i}: max abs error {err:.2e}"
