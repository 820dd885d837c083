"""rewriter::agent_attention: Triton kernels (interpreter mode on CPU) and CPU impl vs the fp32
reference, the exact limit (agents = keys, s₁ → ∞ gives softmax attention), pool_agents,
gradients for every differentiable input, torch.export / torch.compile / ONNX."""
import pytest
import torch
import torch.nn.functional as F

import rewriter.kernels as K
from rewriter.kernels.agent_attention import (agent_attention, agent_attention_ref, agent_bias, agent_windows,
                                              pool_agents)
from rewriter.kernels.agent_attention.triton import agent_attention_triton

# Relative RMS error bounds. fp32: only the order of fp32 sums differs (split-K merge, online
# softmax); observed ≈ 1e-7, bound 1e-5. bf16: the reference gets the same bf16 inputs in fp32;
# the kernels round P and V_A to bf16 before the second GEMM and round the output (2^-9 ≈ 2e-3
# relative each); observed ≈ 4e-3, bound 1e-2.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def rel_rms(x, ref):
    return ((x.float() - ref.float()).pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt()).item()


def make_args(B, H, Hkv, N, D, n, *, dtype=torch.float32, masked=False, bias=False, Dv=None, seed=0):
    """Positional args of the op: q, k, v, agents, key_mask, scale1, scale2, bias1, bias2, shortcut."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, Hkv, N, D, generator=g)
    v = torch.randn(B, Hkv, N, Dv or D, generator=g)
    key_mask = None
    if masked:
        key_mask = torch.ones(B, N, dtype=torch.bool)
        key_mask[-1, N * 2 // 3:] = False        # right padding
        if B > 2:
            key_mask[1, :N // 5] = False          # left padding
    agents = pool_agents(q, n, key_mask)
    scale1 = (0.5 + torch.rand(H, generator=g)) * D ** -0.5      # distinct per-head temperatures
    scale2 = (0.5 + torch.rand(H, generator=g)) * D ** -0.5
    bias1 = 0.5 * torch.randn(H, n, N, generator=g) if bias else None
    bias2 = 0.5 * torch.randn(H, N, n, generator=g) if bias else None
    if bias == "per_sample":    # what the rule passes: [B, H, ...] agent biases, −inf on dead agents
        _, live, dist = agent_windows(key_mask, B, N, n)
        bias1, bias2 = agent_bias(live, dist, torch.rand(H, generator=g), 1 + torch.rand(H, generator=g))
    shortcut = 0.1 * torch.rand(H, generator=g)
    cast = lambda t: t.to(dtype)                  # noqa: E731
    return [cast(q), cast(k), cast(v), cast(agents), key_mask, scale1, scale2, bias1, bias2, shortcut]


CASES = [  # (B, H, Hkv, N, D, n, masked, bias, num_splits, block_n)
    pytest.param(1, 4, 4, 63, 60, 7, False, False, None, 64, id="B1-N63-H4-D60-n7"),
    pytest.param(3, 4, 2, 63, 60, 9, True, True, 3, 16, id="B3-N63-H4-HKV2-D60-n9-pad-bias-split2"),
    pytest.param(3, 2, 1, 13, 16, 12, True, "per_sample", 2, 16, id="B3-N13-n12-short-samples-per-sample-bias"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("B,H,Hkv,N,D,n,masked,bias,num_splits,block_n", CASES)
def test_triton_kernels_match_reference(B, H, Hkv, N, D, n, masked, bias, num_splits, block_n, dtype):
    args = make_args(B, H, Hkv, N, D, n, dtype=dtype, masked=masked, bias=bias)
    out = torch.full((B, H, N, D), float("nan"), dtype=dtype)
    out = agent_attention_triton(*args, num_splits=num_splits, block_n=block_n, out=out)
    assert out.dtype == dtype and not out.isnan().any()
    assert rel_rms(out, agent_attention_ref(*args)) <= TOL[dtype]


def test_triton_many_agents_loop_over_agent_tiles():
    """n > 256: stage 2 leaves the one-tile regime and runs online softmax over agent tiles."""
    args = make_args(1, 2, 1, 300, 16, 260, masked=False, bias=True)
    out = agent_attention_triton(*args, out=torch.full((1, 2, 300, 16), float("nan")))
    assert not out.isnan().any() and rel_rms(out, agent_attention_ref(*args)) <= TOL[torch.float32]


@pytest.mark.parametrize("masked,bias,Dv", [(False, False, 60), (True, True, 48)], ids=["plain", "pad-bias-Dv48"])
def test_cpu_impl_matches_reference(masked, bias, Dv):
    args = make_args(3, 6, 2, 63, 60, 9, masked=masked, bias=bias, Dv=Dv)
    out = torch.ops.rewriter.agent_attention(*args)
    assert out.shape == (3, 6, 63, Dv) and rel_rms(out, agent_attention_ref(*args)) <= TOL[torch.float32]


def test_fully_padded_sample_aggregates_nothing():
    args = make_args(2, 2, 2, 20, 8, 4, masked=True)
    args[4][0] = False                             # sample 0: every key padded
    c = args[9]
    want = c.view(1, 2, 1, 1) * args[2][0:1]       # only the shortcut c·V is left
    for out in (torch.ops.rewriter.agent_attention(*args), agent_attention_triton(*args)):
        assert not out.isnan().any()
        torch.testing.assert_close(out[0:1], want, rtol=1e-6, atol=1e-6)


def test_agents_equal_to_keys_with_sharp_stage1_is_softmax_attention():
    """With agents A = K (n = N, unit-norm distinct keys) and s₁ → ∞, softmax(AKᵀs₁) → I, so
    V_A = V and O = softmax(QKᵀ·s₂)V: the op degenerates to exact attention (a provable limit,
    which checks that the two stages are wired the right way round)."""
    B, H, N, D = 2, 2, 40, 16
    q, k, v = torch.randn(B, H, N, D), F.normalize(torch.randn(B, H, N, D), dim=-1), torch.randn(B, H, N, D)
    sdpa = F.scaled_dot_product_attention(q, k, v)
    out = agent_attention(q, k, v, k, scale1=1e4, scale2=D ** -0.5)
    assert rel_rms(out, sdpa) <= TOL[torch.float32]
    out_triton = agent_attention_triton(q, k, v, k, None, torch.full((H,), 1e4), torch.full((H,), D ** -0.5),
                                        None, None, torch.zeros(H))
    assert rel_rms(out_triton, sdpa) <= TOL[torch.float32]


def test_pool_agents_is_adaptive_average_pooling_over_valid_tokens():
    B, H, N, D, n, prefix = 3, 2, 30, 4, 6, 1
    q = torch.randn(B, H, N, D)

    def pool(x, m):                                 # adaptive_avg_pool1d over the token axis of [..., T, D]
        y = F.adaptive_avg_pool1d(x.flatten(0, -3).transpose(-1, -2), m).transpose(-1, -2)
        return y.reshape(*x.shape[:-2], m, x.shape[-1])

    torch.testing.assert_close(pool_agents(q, n), pool(q, n))
    key_mask = torch.ones(B, N, dtype=torch.bool)
    key_mask[1, 20:] = False                        # right padding
    key_mask[2, :27] = False                        # left padding: 3 valid tokens, 2 after the prefix (< n)
    agents = pool_agents(q, n, key_mask, prefix=prefix)
    assert agents.shape == (B, H, n, D)
    for b in range(B):
        tokens = q[b][:, key_mask[b]][:, prefix:]  # valid tokens, CLS-like prefix left out
        live = min(n, tokens.shape[1])             # L < n: one agent per token, the rest dead (zero)
        torch.testing.assert_close(agents[b, :, :live], pool(tokens, live))
        assert (agents[b, :, live:] == 0).all()
    _, live, dist = agent_windows(key_mask, B, N, n, prefix)
    assert live.tolist() == [[True] * n, [True] * n, [True, True] + [False] * (n - 2)]
    assert (dist[2, 28:, :2] == torch.tensor([[0.0, 1.0], [1.0, 0.0]])).all()   # one token per window
    assert (dist[:, 0] == 0).all()                 # the prefix token is not pooled: no distance
    assert pool_agents(q, 100).shape[2] == N       # n capped at the token count
    assert pool_agents(q, 100, prefix=2).shape[2] == N - 2
    empty = torch.zeros(B, N, dtype=torch.bool)
    assert (pool_agents(q, n, empty) == 0).all()


def test_gradients_match_finite_differences():
    """Every differentiable input, including the per-head temperatures and shortcut that
    calibration fits."""
    args = make_args(2, 2, 1, 7, 3, 3, masked=True, bias=True, Dv=2)
    args = [a.double().requires_grad_() if isinstance(a, torch.Tensor) and a.dtype == torch.float32 else a
            for a in args]
    assert torch.autograd.gradcheck(lambda *xs: torch.ops.rewriter.agent_attention(*xs), tuple(args), fast_mode=True)


class _Agent(torch.nn.Module):
    """What the agent_attention rule puts in the graph: pooled agents, then the op."""

    def __init__(self, heads):
        super().__init__()
        self.scale2 = torch.nn.Parameter(torch.linspace(0.2, 0.4, heads))
        self.shortcut = torch.nn.Parameter(torch.full((heads,), 0.075))

    def forward(self, q, k, v, key_mask):
        agents = pool_agents(q, 8, key_mask, prefix=1)
        return agent_attention(q, k, v, agents, key_mask=key_mask, scale2=self.scale2, shortcut=self.shortcut)


def _agent_inputs(B=2, N=40):
    q, k, v = make_args(B, 4, 2, N, 12, 8)[:3]
    key_mask = torch.ones(B, N, dtype=torch.bool)
    key_mask[-1, N - 9:] = False
    return q, k, v, key_mask


def test_export_keeps_op_with_dynamic_shapes():
    auto = torch.export.Dim.AUTO
    dims = ({0: auto, 2: auto},) * 3 + ({0: auto, 1: auto},)
    model = _Agent(4)
    ep = torch.export.export(model, _agent_inputs(), strict=False, dynamic_shapes=dims)
    assert torch.ops.rewriter.agent_attention.default in [n.target for n in ep.graph.nodes]
    other = _agent_inputs(B=3, N=57)
    torch.testing.assert_close(ep.module()(*other), model(*other), rtol=0, atol=0)


def test_torch_compile_matches_eager():
    model, args = _Agent(4), _agent_inputs()
    compiled = torch.compile(model, backend="inductor", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(*args), model(*args), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("bias", [False, True], ids=["pooled", "bias"])
def test_onnx_export_matches_cpu_impl(bias):
    ort = pytest.importorskip("onnxruntime")

    class WithBias(torch.nn.Module):
        def forward(self, q, k, v, agents, key_mask, scale1, scale2, bias1, bias2, shortcut):
            return torch.ops.rewriter.agent_attention(q, k, v, agents, key_mask, scale1, scale2, bias1, bias2,
                                                      shortcut)

    if bias:
        model, args = WithBias(), make_args(3, 4, 2, 30, 12, 5, masked=True, bias=True)
        args[4][0] = False                          # a fully padded sample through ONNX too
    else:
        model, args = _Agent(4), _agent_inputs()
    prog = torch.onnx.export(model.eval(), tuple(args), dynamo=True, custom_translation_table=K.ONNX_TRANSLATIONS)
    sess = ort.InferenceSession(prog.model_proto.SerializeToString())
    feeds = {i.name: a.detach().numpy() for i, a in zip(sess.get_inputs(), args)}
    (got,) = sess.run(None, feeds)
    assert abs(got - model(*args).detach().numpy()).max() <= 1e-4


def test_bad_inputs_are_rejected_with_a_reason():
    q, k, v, agents, key_mask, s1, s2, _, _, c = make_args(1, 4, 2, 10, 8, 3, masked=True)
    with pytest.raises(ValueError, match="agents must be"):
        agent_attention(q, k, v, agents[:, :2])
    with pytest.raises(ValueError, match="not a multiple of 3 kv heads"):
        agent_attention(q, k[:, :1].expand(1, 3, 10, 8), v[:, :1].expand(1, 3, 10, 8), agents)
    with pytest.raises(ValueError, match=r"scale1 must be a float, a 1-element tensor or a \[H=4\]"):
        agent_attention(q, k, v, agents, scale1=torch.ones(3))
    with pytest.raises(ValueError, match=r"bias1 must be \[H=4, n=3, N=10\]"):
        agent_attention(q, k, v, agents, bias1=torch.zeros(4, 10, 3))
    with pytest.raises(ValueError, match="prefix=10 leaves no token"):
        pool_agents(q, 3, prefix=10)
