"""rewriter::linear_attention, ::hybrid_window_attention, ::linear_attention_step, ::hybrid_window_step.

Each Triton kernel (interpreter mode on CPU, compiled on a GPU) and the CPU impl against the fp32
references at odd sizes (T=63, D=60, F=40 → padded to 64 inside the kernels), GQA and padded keys;
gradients; torch.export, torch.compile and ONNX export of a module calling the ops. Decode: a
prefill state followed by single-token steps reproduces the full-sequence ops (hybrid with left
padding for several windows, W > T included; linear with a left-padded prefill).

Tolerances are relative RMS error vs the fp32 reference computed from the same (rounded) inputs:
  fp32 1e-5: observed ~2e-7; only the summation order differs (chunked vs expanded), which
       costs a few ulps times log T, far below 1e-5.
  bf16 1e-2: the kernels round the attention weights and the carried state to bf16 before the
       tensor-core products and round the output to bf16; each rounding is ≤ 2⁻⁹ relative
       (RMS ~ 2e-3), a few of them compound to ~5e-3.
"""
import pytest
import torch
import torch.nn.functional as F

import rewriter.kernels
from rewriter.kernels.linear_attention import cpu as CPU
from rewriter.kernels.linear_attention import reference as R

try:
    from rewriter.kernels.linear_attention import triton as TK
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


def nan_like(shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)


def inputs(B, H, Hkv, T, F, D, Dk=None, dtype=torch.float32, masked=False, seed=0):
    """Positive features (as φ = softmax/elu+1 produce), random q/k/v, optional padded keys."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    x = dict(fq=r(B, H, T, F).exp() / F, fk=r(B, Hkv, T, F).exp() / F, v=r(B, Hkv, T, D))
    if Dk is not None:
        x.update(q=r(B, H, T, Dk), k=r(B, Hkv, T, Dk), mix=torch.rand(H, generator=g) + 0.1)
    x = {n: t.to(DEVICE, dtype if n != "mix" else torch.float32) for n, t in x.items()}
    mask = None
    if masked:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[-1, :max(1, T // 9)] = False                 # left padding in the last sample
        mask[0, T // 2: T // 2 + max(1, T // 12)] = False  # and a hole in the first
        mask = mask.to(DEVICE)
    return x, mask


CASES = [  # (id, B, H, Hkv, T, F, D)
    pytest.param(1, 4, 4, 63, 40, 60, id="B1-T63-H4-F40-D60"),
    pytest.param(3, 4, 2, 63, 40, 60, id="B3-T63-H4-Hkv2-F40-D60"),
]


# --------------------------------------------------------------------------------------------
# Triton kernels vs reference
# --------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B,H,Hkv,T,Fd,D", CASES)
def test_linear_attention_triton(B, H, Hkv, T, Fd, D, causal, dtype):
    x, mask = inputs(B, H, Hkv, T, Fd, D, dtype=dtype, masked=B > 1)
    out = TK.linear_attention(x["fq"], x["fk"], x["v"], mask, causal, 1e-6, out=nan_like((B, H, T, D), dtype))
    ref = R.linear_attention(x["fq"], x["fk"], x["v"], mask, causal, 1e-6)
    assert out.dtype == dtype
    assert rel_rms(out, ref) <= TOL[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [1, 5, 40])
@pytest.mark.parametrize("B,H,Hkv,T,Fd,D", CASES)
def test_hybrid_window_attention_triton(B, H, Hkv, T, Fd, D, window, dtype):
    Dk = 20
    x, mask = inputs(B, H, Hkv, T, Fd, D, Dk, dtype=dtype, masked=B > 1)
    args = (x["q"], x["k"], x["v"], x["fq"], x["fk"], window, Dk ** -0.5, x["mix"], mask, 1e-6)
    out = TK.hybrid_window_attention(*args, out=nan_like((B, H, T, D), dtype))
    assert rel_rms(out, R.hybrid_window_attention(*args)) <= TOL[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,H,Hkv,T,Fd,D", CASES)
def test_linear_attention_step_triton(B, H, Hkv, T, Fd, D, dtype):
    x, _ = inputs(B, H, Hkv, 1, Fd, D, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    S = (torch.randn(B, Hkv, Fd, D, generator=g)).to(DEVICE)
    z = (torch.rand(B, Hkv, Fd, generator=g) + 1).to(DEVICE)
    out = (nan_like((B, H, 1, D), dtype), nan_like((B, Hkv, Fd, D), torch.float32), nan_like((B, Hkv, Fd), torch.float32))
    got = TK.linear_attention_step(x["fq"], x["fk"], x["v"], S, z, 1e-6, out=out)
    ref = R.linear_attention_step(x["fq"], x["fk"], x["v"], S, z, 1e-6)
    for name, a, b in zip(["o_t", "S_new", "z_new"], got, ref):
        assert rel_rms(a, b) <= TOL[dtype], name


@needs_triton
def test_triton_wrapper_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x, _ = inputs(1, 2, 2, 8, 4, 4)
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="need CUDA tensors"):
            TK.linear_attention(x["fq"], x["fk"], x["v"])


# --------------------------------------------------------------------------------------------
# the custom ops (CPU impl on CPU, Triton on CUDA) vs reference, and exact settings
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk", [16, 64], ids=["chunk16", "chunk64"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("T", [63, 150])
def test_linear_attention_op(T, causal, chunk, monkeypatch):
    monkeypatch.setattr(CPU, "CHUNK", chunk)           # T=150 with chunk 16: ten chunks carried
    x, mask = inputs(3, 6, 2, T, 40, 60, masked=True)
    out = torch.ops.rewriter.linear_attention(x["fq"], x["fk"], x["v"], mask, causal, 1e-6)
    ref = R.linear_attention(x["fq"], x["fk"], x["v"], mask, causal, 1e-6)
    assert rel_rms(out, ref) <= TOL[torch.float32]


def test_linear_attention_cross_lengths():
    """Non-causal with fewer queries than keys (cross-attention shapes)."""
    x, _ = inputs(2, 4, 2, 37, 8, 12, seed=3)
    fq = x["fq"][:, :, :11]
    out = torch.ops.rewriter.linear_attention(fq, x["fk"], x["v"], None, False, 1e-6)
    assert out.shape == (2, 4, 11, 12)
    assert rel_rms(out, R.linear_attention(fq, x["fk"], x["v"])) <= TOL[torch.float32]


@pytest.mark.parametrize("window", [1, 5, 64, 100])
@pytest.mark.parametrize("T", [63, 150])
def test_hybrid_window_attention_op(T, window):
    x, mask = inputs(3, 4, 2, T, 40, 60, Dk=20, masked=True)
    args = (x["q"], x["k"], x["v"], x["fq"], x["fk"], window, 0.3, x["mix"], mask, 1e-6)
    out = torch.ops.rewriter.hybrid_window_attention(*args)
    assert rel_rms(out, R.hybrid_window_attention(*args)) <= TOL[torch.float32]


@pytest.mark.parametrize("masked", [False, True], ids=["no-padding", "padding"])
def test_inference_and_autograd_paths_compute_the_same_function(masked, monkeypatch):
    """The CPU impl runs without autograd on a running [F, D] state per chunk and in-place softmax
    temporaries, and under autograd on stacked per-chunk states (what the backward ops and attention
    transfer differentiate): both equal the reference, at several chunks and a ragged tail, with and
    without padding; an all-real key mask is the same call as None."""
    monkeypatch.setattr(CPU, "CHUNK", 16)                # T=150: ten chunks, the last ragged
    x, mask = inputs(2, 6, 2, 150, 24, 20, Dk=12, masked=masked, seed=5)
    mask = torch.ones(2, 150, dtype=torch.bool) if mask is None else mask
    lin = (x["fq"], x["fk"], x["v"], mask, True, 1e-6)
    hyb = (x["q"], x["k"], x["v"], x["fq"], x["fk"], 20, 0.3, x["mix"], mask, 1e-6)
    for fn, args, ref in ((CPU.linear_attention_torch, lin, R.linear_attention(*lin)),
                          (CPU.hybrid_window_attention_torch, hyb, R.hybrid_window_attention(*hyb))):
        with torch.no_grad():
            fast = fn(*args)
        grad_args = [a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point()
                     else a for a in args]
        slow = fn(*grad_args)
        slow.sum().backward()                           # the autograd path really records a graph
        assert rel_rms(fast, ref) <= TOL[torch.float32] and rel_rms(slow.detach(), ref) <= TOL[torch.float32]
        assert rel_rms(fast, slow.detach()) <= 1e-6
        if not masked:
            with torch.no_grad():
                none = fn(*[None if a is mask else a for a in args])
            assert torch.equal(none, fast)


def test_hybrid_with_window_covering_sequence_is_causal_softmax_attention():
    """window ≥ T leaves no linear terms: exact causal softmax attention (SDPA)."""
    x, _ = inputs(2, 4, 2, 63, 40, 60, Dk=20)
    out = torch.ops.rewriter.hybrid_window_attention(
        x["q"], x["k"], x["v"], x["fq"], x["fk"], 63, 20 ** -0.5, x["mix"], None, 0.0)
    sdpa = F.scaled_dot_product_attention(x["q"], x["k"], x["v"], is_causal=True, enable_gqa=True)
    assert rel_rms(out, sdpa) <= TOL[torch.float32]


def test_hybrid_follows_lolcats_max_convention():
    """The op is LoLCATs' hybrid_attention_quadratic, written per query as a loop.

    m_i is the max over the window scores and divides only the softmax terms; the linear terms
    are added unscaled. (A global max, or dividing both parts by e^{m_i}, would give a
    different function; this test tells them apart because the scores are O(1), not ~0.)
    """
    x, _ = inputs(1, 2, 2, 40, 8, 8, Dk=8, seed=5)
    T, w = 40, 4
    args = lambda q, mix: (q, x["k"], x["v"], x["fq"], x["fk"], w, 1.0, mix, None, 0.0)
    out = torch.ops.rewriter.hybrid_window_attention(*args(x["q"], x["mix"]))
    # explicit per-query formula with m_i over the window only
    q, k, v, fq, fk, mix = x["q"][0], x["k"][0], x["v"][0], x["fq"][0], x["fk"][0], x["mix"]
    expect = torch.empty_like(out[0])
    for h in range(2):
        for i in range(T):
            win = list(range(max(0, i - w + 1), i + 1))
            lin = list(range(0, max(0, i - w + 1)))
            s = q[h, i] @ k[h, win].T
            e = torch.exp(s - s.max())
            a = mix[h] * (fq[h, i] @ fk[h, lin].T)
            expect[h, i] = (e @ v[h, win] + a @ v[h, lin]) / (e.sum() + a.sum())
    assert rel_rms(out[0], expect) <= TOL[torch.float32]


def test_step_recurrence_equals_causal_linear_attention():
    """Katharopoulos' RNN view: T decode steps reproduce the causal (parallel) op."""
    B, H, Hkv, T, Fd, D = 2, 4, 2, 19, 12, 10
    x, _ = inputs(B, H, Hkv, T, Fd, D, seed=7)
    S, z = torch.zeros(B, Hkv, Fd, D, device=DEVICE), torch.zeros(B, Hkv, Fd, device=DEVICE)
    outs = []
    for t in range(T):
        o, S, z = torch.ops.rewriter.linear_attention_step(
            x["fq"][:, :, t:t + 1], x["fk"][:, :, t:t + 1], x["v"][:, :, t:t + 1], S, z, 1e-6)
        outs.append(o)
    par = torch.ops.rewriter.linear_attention(x["fq"], x["fk"], x["v"], None, True, 1e-6)
    assert rel_rms(torch.cat(outs, dim=2), par) <= TOL[torch.float32]


def test_padded_keys_contribute_nothing():
    """Garbage (even NaN) in padded key/value slots does not reach any output."""
    x, mask = inputs(3, 4, 2, 30, 8, 8, Dk=8, masked=True)
    dirty = {n: t.clone() for n, t in x.items()}
    for n in ("fk", "v", "k"):
        dirty[n].masked_fill_(~mask[:, None, :, None], float("nan"))
    for causal in (False, True):
        a = torch.ops.rewriter.linear_attention(dirty["fq"], dirty["fk"], dirty["v"], mask, causal, 1e-6)
        b = torch.ops.rewriter.linear_attention(x["fq"], x["fk"], x["v"], mask, causal, 1e-6)
        torch.testing.assert_close(a, b)
    a = torch.ops.rewriter.hybrid_window_attention(dirty["q"], dirty["k"], dirty["v"], dirty["fq"], dirty["fk"],
                                                   5, 0.3, x["mix"], mask, 1e-6)
    b = torch.ops.rewriter.hybrid_window_attention(x["q"], x["k"], x["v"], x["fq"], x["fk"], 5, 0.3, x["mix"], mask, 1e-6)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("bad,match", [
    (dict(fk_heads=3), "fq has 4 heads, not a multiple of the 3 heads of fk"),
    (dict(mask_dtype=torch.int64), "key_mask must be bool"),
    (dict(v_len=5), "v .* must be \\[batch, kv_heads, key_len, D\\]"),
])
def test_linear_attention_errors_name_the_argument(bad, match):
    fq = torch.rand(1, 4, 8, 6)
    fk = torch.rand(1, bad.get("fk_heads", 2), 8, 6)
    v = torch.rand(1, fk.shape[1], bad.get("v_len", 8), 5)
    mask = torch.ones(1, 8, dtype=bad.get("mask_dtype", torch.bool))
    with pytest.raises(ValueError, match="rewriter::linear_attention: .*" + match):
        torch.ops.rewriter.linear_attention(fq, fk, v, mask, False, 1e-6)


def test_hybrid_rejects_empty_window():
    x, _ = inputs(1, 2, 2, 8, 4, 4, Dk=4)
    with pytest.raises(ValueError, match="window must be >= 1"):
        torch.ops.rewriter.hybrid_window_attention(x["q"], x["k"], x["v"], x["fq"], x["fk"], 0, 1.0, x["mix"], None, 1e-6)


# --------------------------------------------------------------------------------------------
# gradients (attention-transfer calibration trains through the ops)
# --------------------------------------------------------------------------------------------
def _double(x):
    return {n: t.double().requires_grad_() for n, t in x.items()}


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_linear_attention_gradcheck(causal, monkeypatch):
    monkeypatch.setattr(CPU, "CHUNK", 4)                 # T=9: three chunks, carried state in the graph
    x, mask = inputs(2, 4, 2, 9, 3, 2, masked=True)
    x = _double(x)
    fn = lambda fq, fk, v: torch.ops.rewriter.linear_attention(fq, fk, v, mask, causal, 1e-6)
    assert torch.autograd.gradcheck(fn, (x["fq"], x["fk"], x["v"]), fast_mode=True)


def test_hybrid_gradcheck_including_mix():
    x, mask = inputs(2, 4, 2, 9, 3, 2, Dk=3, masked=True)
    x = _double(x)
    fn = lambda q, k, v, fq, fk, mix: torch.ops.rewriter.hybrid_window_attention(q, k, v, fq, fk, 3, 0.7, mix, mask, 1e-6)
    assert torch.autograd.gradcheck(fn, (x["q"], x["k"], x["v"], x["fq"], x["fk"], x["mix"]), fast_mode=True)


def test_step_gradcheck():
    x, _ = inputs(2, 4, 2, 1, 3, 2, seed=2)
    x = _double(x)
    S = torch.randn(2, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    z = (torch.rand(2, 2, 3, dtype=torch.float64) + 1).requires_grad_()
    fn = lambda fq, fk, v, S, z: torch.ops.rewriter.linear_attention_step(fq, fk, v, S, z, 1e-6)
    assert torch.autograd.gradcheck(fn, (x["fq"], x["fk"], x["v"], S, z), fast_mode=True)


def test_gradients_match_reference_autograd():
    x, mask = inputs(3, 4, 2, 63, 40, 60, Dk=20, masked=True)
    g = torch.randn(3, 4, 63, 60, generator=torch.Generator().manual_seed(9))
    for causal in (False, True):
        a, b = _leaf(x), _leaf(x)
        (torch.ops.rewriter.linear_attention(a["fq"], a["fk"], a["v"], mask, causal, 1e-6) * g).sum().backward()
        (R.linear_attention(b["fq"], b["fk"], b["v"], mask, causal, 1e-6) * g).sum().backward()
        for n in ("fq", "fk", "v"):
            assert rel_rms(a[n].grad, b[n].grad) <= 1e-5, (causal, n)
    a, b = _leaf(x), _leaf(x)
    hy = lambda f, t: f(t["q"], t["k"], t["v"], t["fq"], t["fk"], 5, 0.3, t["mix"], mask, 1e-6)
    (hy(torch.ops.rewriter.hybrid_window_attention, a) * g).sum().backward()
    (hy(R.hybrid_window_attention, b) * g).sum().backward()
    for n in a:
        assert rel_rms(a[n].grad, b[n].grad) <= 1e-5, n


def _leaf(x):
    return {n: t.detach().clone().requires_grad_() for n, t in x.items()}


# --------------------------------------------------------------------------------------------
# graph tooling: torch.export, torch.compile, ONNX
# --------------------------------------------------------------------------------------------
class LinearAttentionBlock(torch.nn.Module):
    """What a rewritten attention site looks like: feature maps as torch ops, then the ops."""

    def __init__(self, heads=4, dk=8, window=5):
        super().__init__()
        self.fmap = torch.nn.Linear(dk, dk)             # Hedgehog-style: [softmax(xW), softmax(-xW)]
        self.mix = torch.nn.Parameter(torch.full((heads,), 0.5))
        self.window, self.scale = window, dk ** -0.5

    def phi(self, x):
        y = self.fmap(x)
        return torch.cat([y.softmax(-1), (-y).softmax(-1)], dim=-1)

    def forward(self, q, k, v, key_mask, S, z):
        fq, fk = self.phi(q), self.phi(k)
        full = torch.ops.rewriter.linear_attention(fq, fk, v, key_mask, False, 1e-6)
        causal = torch.ops.rewriter.linear_attention(fq, fk, v, key_mask, True, 1e-6)
        hybrid = torch.ops.rewriter.hybrid_window_attention(q, k, v, fq, fk, self.window, self.scale,
                                                            self.mix, key_mask, 1e-6)
        o, S2, z2 = torch.ops.rewriter.linear_attention_step(fq[:, :, -1:], fk[:, :, -1:], v[:, :, -1:], S, z, 1e-6)
        return full, causal, hybrid, o, S2, z2


def _block_args(B=2, T=21, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = torch.randn(B, 4, T, 8, generator=g), torch.randn(B, 2, T, 8, generator=g), torch.randn(B, 2, T, 6, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :3] = False
    S, z = torch.randn(B, 2, 16, 6, generator=g), torch.rand(B, 2, 16, generator=g) + 1
    return q, k, v, mask, S, z


A = torch.export.Dim.AUTO
DYN = ({0: A, 2: A}, {0: A, 2: A}, {0: A, 2: A}, {0: A, 1: A}, {0: A}, {0: A})


def test_export_keeps_ops_and_matches():
    m = LinearAttentionBlock().eval()
    args = _block_args()
    ep = torch.export.export(m, args, strict=False, dynamic_shapes=DYN)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.rewriter.linear_attention.default) == 2
    assert torch.ops.rewriter.hybrid_window_attention.default in targets
    assert torch.ops.rewriter.linear_attention_step.default in targets
    other = _block_args(B=3, T=33, seed=1)                  # dynamic batch and sequence
    for a, b in zip(ep.module()(*other), m(*other)):
        torch.testing.assert_close(a, b)


def test_compile_inductor_forward_and_backward():
    m = LinearAttentionBlock()
    cm = torch.compile(m, backend="inductor", fullgraph=True)
    args = _block_args()
    got, want = cm(*args), m(*args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    sum(t.sum() for t in got[:3]).backward()               # calibration trains through the ops
    grads = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    sum(t.sum() for t in want[:3]).backward()
    for a, b in zip(grads, (p.grad for p in m.parameters())):
        torch.testing.assert_close(a, b)


def test_onnx_export_matches_cpu_impl(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    m = LinearAttentionBlock().eval()
    args = _block_args()
    onx = torch.onnx.export(m, args, dynamo=True, dynamic_shapes=DYN,
                            custom_translation_table=rewriter.kernels.ONNX_TRANSLATIONS, verbose=False)
    path = tmp_path / "linear_attention.onnx"
    onx.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for a in (args, _block_args(B=3, T=33, seed=1)):          # the traced size and another one
        got = sess.run(None, {n: t.numpy() for n, t in zip(names, a)})
        with torch.no_grad():
            want = m(*a)
        for name, g, w in zip(["full", "causal", "hybrid", "o_t", "S_new", "z_new"], got, want):
            err = (torch.from_numpy(g) - w).abs().max().item()
            assert err <= 1e-4, f"{name}: max abs error {err:.2e}"


# --------------------------------------------------------------------------------------------
# decode: hybrid_window_step (LoLCATs ring buffer + state) and the prefill states
# --------------------------------------------------------------------------------------------
from rewriter.kernels.linear_attention import (  # noqa: E402
    hybrid_window_prefill_state, linear_attention_prefill_state)

STATE = ["o_t", "S", "z", "k_win", "v_win", "fk_win", "win_valid"]


def left_padded(B, T, pads):
    mask = torch.ones(B, T, dtype=torch.bool)
    for b, p in enumerate(pads[:B]):
        mask[b, :p] = False
    return mask.to(DEVICE)


def step_args(x, t, mask, state, scale=0.4):
    """The hybrid_window_step arguments for token t of the sequence x (state = the 6 tensors)."""
    one = lambda n: x[n][:, :, t:t + 1]                          # noqa: E731
    token_valid = None if mask is None else mask[:, t].contiguous()
    return (one("q"), one("k"), one("v"), one("fq"), one("fk"), *state,
            torch.tensor([t], device=DEVICE), scale, x["mix"], token_valid, 1e-6)


def assert_step_close(got, ref, tol):
    for name, a, b in zip(STATE, got, ref):
        if name == "win_valid":
            assert torch.equal(a, b), name
        elif b.abs().max() > 0:
            assert rel_rms(a, b) <= tol, name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("window", [5, 70], ids=["W5", "W70-two-tiles"])
@pytest.mark.parametrize("B,H,Hkv,T,Fd,D", CASES)
@pytest.mark.parametrize("impl", ["op", pytest.param("triton", marks=needs_triton)])
def test_hybrid_window_step_matches_reference(impl, B, H, Hkv, T, Fd, D, window, dtype):
    """One step from a state with wrapped-around ring slots (position 67 ≥ W), padded slots in the
    window and, for B > 1, a padded new token; every output and new state tensor checked."""
    x, _ = inputs(B, H, Hkv, 68, Fd, D, Dk=20, dtype=dtype)
    mask = left_padded(B, 68, [0, 64, 3]) if B > 1 else None
    if B > 1:
        mask[1, 67] = False                                          # the new token itself is padding
    state = hybrid_window_prefill_state(x["k"][:, :, :67], x["v"][:, :, :67], x["fk"][:, :, :67], window,
                                        None if mask is None else mask[:, :67])
    args = step_args(x, 67, mask, state)
    if impl == "op":
        got = torch.ops.rewriter.hybrid_window_step(*args)
    else:
        shapes = [(B, H, 1, D)] + [tuple(s.shape) for s in state]
        out = tuple(nan_like(s, t.dtype) if t.dtype != torch.bool else torch.zeros(s, dtype=torch.bool)
                    for s, t in zip(shapes, (x["v"], *state)))
        got = TK.hybrid_window_step(*args, out=out)
    ref = R.hybrid_window_step(*args)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32 and got[3].dtype == dtype
    assert_step_close(got, ref, TOL[dtype])


# (impl, window): the interpreter is slow, so Triton runs the windows that differ in kind
PREFILL_CASES = [("op", w) for w in (1, 5, 16, 40)] + [
    pytest.param("triton", w, marks=needs_triton) for w in (1, 5, 40)]


@pytest.mark.parametrize("T0", [0, 9, 29], ids=["T0=0", "T0=9", "T0=T-1"])
@pytest.mark.parametrize("impl,window", PREFILL_CASES)
def test_prefill_then_hybrid_steps_equal_full_sequence(impl, window, T0):
    """What LoLCATs generation relies on: hybrid_window_attention over T tokens equals a prefill
    state of the first T0 followed by T − T0 single-token steps, with left padding (row 1's 11
    padded tokens outlast a 9-token prefill, so padded tokens are stepped too), GQA, and a window
    longer than the sequence (W40: nothing ever leaves it)."""
    B, H, Hkv, T, Fd, D, Dk = 3, 4, 2, 30, 12, 10, 8
    x, _ = inputs(B, H, Hkv, T, Fd, D, Dk=Dk, seed=11)
    mask = left_padded(B, T, [0, 11, 1])
    full = torch.ops.rewriter.hybrid_window_attention(x["q"], x["k"], x["v"], x["fq"], x["fk"], window, 0.4,
                                                      x["mix"], mask, 1e-6)
    state = hybrid_window_prefill_state(x["k"][:, :, :T0], x["v"][:, :, :T0], x["fk"][:, :, :T0], window,
                                        mask[:, :T0])
    step = torch.ops.rewriter.hybrid_window_step if impl == "op" else TK.hybrid_window_step
    outs = []
    for t in range(T0, T):
        o, *state = step(*step_args(x, t, mask, state))
        outs.append(o)
    assert rel_rms(torch.cat(outs, dim=2), full[:, :, T0:]) <= TOL[torch.float32]


@pytest.mark.parametrize("T0", [11, 18])
def test_prefill_then_linear_steps_equal_causal_linear_attention(T0):
    """Katharopoulos' RNN view after a left-padded prefill: linear_attention_prefill_state of the
    first T0 tokens (row 1 padded for 11 of them) then single-token steps give the causal op."""
    B, H, Hkv, T, Fd, D = 3, 4, 2, 25, 12, 10
    x, _ = inputs(B, H, Hkv, T, Fd, D, seed=12)
    mask = left_padded(B, T, [0, 11, 1])
    full = torch.ops.rewriter.linear_attention(x["fq"], x["fk"], x["v"], mask, True, 1e-6)
    S, z = linear_attention_prefill_state(x["fk"][:, :, :T0], x["v"][:, :, :T0], mask[:, :T0])
    outs = []
    for t in range(T0, T):
        o, S, z = torch.ops.rewriter.linear_attention_step(
            x["fq"][:, :, t:t + 1], x["fk"][:, :, t:t + 1], x["v"][:, :, t:t + 1], S, z, 1e-6)
        outs.append(o)
    assert S.dtype == torch.float32
    assert rel_rms(torch.cat(outs, dim=2), full[:, :, T0:]) <= TOL[torch.float32]


@pytest.mark.parametrize("impl", ["op", pytest.param("triton", marks=needs_triton)])
def test_hybrid_step_is_functional_and_never_reads_unused_slots(impl):
    """The inputs are left as they were, and NaN in the slots win_valid marks unused (never filled,
    padding) changes nothing: those slots are neither attended to nor folded into the state."""
    x, _ = inputs(3, 4, 2, 12, 8, 6, Dk=8, seed=13)
    mask = left_padded(3, 12, [0, 6, 2])
    pre = [x[n][:, :, :9] for n in ("k", "v", "fk")]
    state = hybrid_window_prefill_state(*pre, 10, mask[:, :9])
    assert not state[5].all(), "the window must hold unused slots for this test"
    dirty = list(state)
    for i in (2, 3, 4):                                       # k_win, v_win, fk_win
        dirty[i] = state[i].masked_fill(~state[5][:, None, :, None], float("nan"))
    before = [t.clone() for t in dirty]
    step = torch.ops.rewriter.hybrid_window_step if impl == "op" else TK.hybrid_window_step
    clean_out = step(*step_args(x, 9, mask, state))
    dirty_out = step(*step_args(x, 9, mask, dirty))
    for a, b in zip(dirty, before):
        torch.testing.assert_close(a, b, equal_nan=True)
    for name, a, b in zip(STATE[:3], dirty_out, clean_out):
        torch.testing.assert_close(a, b, msg=name)


@pytest.mark.parametrize("bad,match", [
    (dict(win_valid_dtype=torch.uint8), "win_valid must be bool"),
    (dict(position=torch.tensor([3, 4])), "position must be one int64"),
    (dict(k_win_heads=4), "k_win must be \\[2, 2, 5, 8\\]"),
    (dict(token_valid=torch.ones(3, dtype=torch.bool)), "token_valid must be bool \\[batch=2\\]"),
])
def test_hybrid_step_errors_name_the_argument(bad, match):
    x, _ = inputs(2, 4, 2, 1, 6, 5, Dk=8)
    S, z = torch.zeros(2, 2, 6, 5), torch.zeros(2, 2, 6)
    k_win = torch.zeros(2, bad.get("k_win_heads", 2), 5, 8)
    v_win, fk_win = torch.zeros(2, 2, 5, 5), torch.zeros(2, 2, 5, 6)
    win_valid = torch.zeros(2, 5, dtype=bad.get("win_valid_dtype", torch.bool))
    with pytest.raises(ValueError, match="rewriter::hybrid_window_step: " + match):
        torch.ops.rewriter.hybrid_window_step(
            x["q"], x["k"], x["v"], x["fq"], x["fk"], S, z, k_win, v_win, fk_win, win_valid,
            bad.get("position", torch.tensor([3])), 0.3, x["mix"], bad.get("token_valid"), 1e-6)


class HybridDecodeBlock(torch.nn.Module):
    """A lowered LoLCATs site: prefill state from the prompt's k/v/φk, then one decode step."""

    def __init__(self, heads=4, window=5):
        super().__init__()
        self.mix = torch.nn.Parameter(torch.full((heads,), 0.5))
        self.window = window

    def forward(self, k, v, fk, key_mask, q_t, k_t, v_t, fq_t, fk_t, token_valid):
        state = hybrid_window_prefill_state(k, v, fk, self.window, key_mask)
        position = torch.full((1,), k.shape[2], dtype=torch.int64)
        return torch.ops.rewriter.hybrid_window_step(q_t, k_t, v_t, fq_t, fk_t, *state, position, 0.35,
                                                     self.mix, token_valid, 1e-6)


def _decode_args(B=2, T0=9, seed=0):
    x, _ = inputs(B, 4, 2, T0 + 1, 6, 5, Dk=8, seed=seed)
    mask = left_padded(B, T0 + 1, [0, 3, 1])
    one = lambda n: x[n][:, :, T0:].contiguous()             # noqa: E731
    pre = lambda n: x[n][:, :, :T0]                            # noqa: E731
    return (pre("k"), pre("v"), pre("fk"), mask[:, :T0], one("q"), one("k"), one("v"), one("fq"), one("fk"),
            mask[:, T0].contiguous())


_DEC_DYN = ({0: A, 2: A}, {0: A, 2: A}, {0: A, 2: A}, {0: A, 1: A}) + ({0: A},) * 6   # batch; prompt length


def test_hybrid_decode_export_with_dynamic_batch_and_prompt_length():
    """The prefill state traces without host syncs (prompt length dynamic, shorter and longer than
    the window) and the step op stays one node."""
    m = HybridDecodeBlock().eval()
    ep = torch.export.export(m, _decode_args(), strict=False, dynamic_shapes=_DEC_DYN)
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.rewriter.hybrid_window_step.default) == 1
    for args in (_decode_args(B=3, T0=3, seed=1), _decode_args(B=2, T0=17, seed=2)):
        for name, a, b in zip(STATE, ep.module()(*args), m(*args)):
            torch.testing.assert_close(a, b, msg=name)


def test_hybrid_decode_onnx_matches_op(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    m = HybridDecodeBlock().eval()
    onx = torch.onnx.export(m, _decode_args(), dynamo=True, dynamic_shapes=_DEC_DYN,
                            custom_translation_table=rewriter.kernels.ONNX_TRANSLATIONS, verbose=False)
    path = tmp_path / "hybrid_window_step.onnx"
    onx.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    for args in (_decode_args(), _decode_args(B=3, T0=3, seed=1), _decode_args(B=3, T0=17, seed=2)):
        got = sess.run(None, {n: t.numpy() for n, t in zip(names, args)})
        with torch.no_grad():
            want = m(*args)
        for name, g, w in zip(STATE, got, want):
            if name == "win_valid":
                assert torch.equal(torch.from_numpy(g), w), name
                continue
            err = (torch.from_numpy(g) - w).abs().max().item()
            assert err <= 1e-5, f"{name}: max abs error {err:.2e}"
