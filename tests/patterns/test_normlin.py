"""normlin (OLinear's NormLin, arXiv:2505.08550): refuses text and dynamic-length sites with the
reason; recovers an input-independent attention matrix exactly; fires on the digits ViT and the
forecaster under the gate; a damaging rewrite is rolled back bit-identically; save → load replays."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from rewriter import load, optimize
from rewriter.calibrate import Calibration
from rewriter.models import load_model
from rewriter.patterns import _normlin_fit as fit


SDPA = torch.ops.aten.scaled_dot_product_attention.default


def _count(gm, target=SDPA):
    return sum(n.target == target for n in gm.graph.nodes)


def _run(model, steps, gate, calibration=None, **calib):
    recipe = {"gate": gate, "steps": steps}
    if calib:
        recipe["calibration"] = calib
    return optimize(model, recipe, calibration=calibration, progress=False, measure_latency=False)


class PositionalMix(nn.Module):
    """Attention whose q and k come from a learned position table only, so its attention matrix
    softmax(q kᵀ/√d) is the same for every input (NormLin's exact case). With tied_heads every head
    has the same matrix (one shared A suffices); otherwise each head has its own."""

    def __init__(self, n=9, dim=24, heads=3, tied_heads=False):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.pos = nn.Parameter(torch.randn(n, dim))
        qk_out = self.hd if tied_heads else dim
        self.q, self.k = nn.Linear(dim, qk_out), nn.Linear(dim, qk_out)
        self.v, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.tied = tied_heads

    def qk(self):
        n = self.pos.shape[0]
        q, k = self.q(self.pos), self.k(self.pos)
        if self.tied:
            q, k = q.repeat(1, self.heads), k.repeat(1, self.heads)
        return (t.view(n, self.heads, self.hd).transpose(0, 1) for t in (q, k))      # (H, N, hd)

    def attention_matrix(self):
        q, k = self.qk()
        return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.hd), -1)      # (H, N, N)

    def forward(self, x):
        B, N, D = x.shape
        q, k = (t.unsqueeze(0).expand(B, -1, -1, -1) for t in self.qk())
        v = self.v(x).view(B, N, self.heads, self.hd).transpose(1, 2)                # (B, H, N, hd)
        y = F.scaled_dot_product_attention(q, k, v)
        return x + self.o(y.transpose(1, 2).reshape(B, N, D))


def _random_calibration(n=9, dim=24, batches=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [{"x": torch.randn(4, n, dim, generator=g)} for _ in range(batches + 1)]
    return Calibration(batches=xs[:-1], heldout=xs[-1:], source="random", samples=4 * batches, seq_len=n)


@pytest.mark.parametrize("heads,tied", [("shared", True), ("per_head", False)])
def test_exact_case_recovers_input_independent_attention(heads, tied):
    torch.manual_seed(1)
    m = PositionalMix(tied_heads=tied).eval()
    calib = _random_calibration()
    opt = _run(m, [{"normlin": {"heads": heads}}], {"metric": "relative_rms", "max": 1e-5}, calibration=calib)
    (r,) = opt.report.records
    assert r.status == "applied", r.reason
    assert r.info == {"tokens": 9, "kind": "generic"}
    A = fit.row_normalize_softplus(r.built["weight"])
    want = m.attention_matrix()
    want = want[0] if heads == "shared" else want
    assert A.shape == want.shape
    torch.testing.assert_close(A, want, atol=2e-6, rtol=0)
    assert _count(opt.graph_module) == 0
    x = torch.randn(5, 9, 24)
    torch.testing.assert_close(opt(x=x), m(x=x), atol=1e-5, rtol=1e-5)


def test_shared_matrix_cannot_express_distinct_heads_and_gate_restores_bit_identically(frozen_state, state_equal):
    torch.manual_seed(1)
    m = PositionalMix(tied_heads=False).eval()
    before = frozen_state(m)
    calib = _random_calibration()
    opt = _run(m, [{"normlin": {"heads": "shared"}}], {"metric": "relative_rms", "max": 1e-5}, calibration=calib)
    (r,) = opt.report.records
    assert r.status == "rolled_back" and r.reason.startswith("gate: relative_rms") and r.metric_after > 1e-3
    assert _count(opt.graph_module) == 1
    x = torch.randn(5, 9, 24)
    assert torch.equal(opt(x=x), m(x=x))
    assert state_equal(m, before)


def test_refuses_text_models_with_reason():
    bert = load_model("bert", num_hidden_layers=2)
    opt = _run(bert, [{"normlin": {}}], {"metric": "embedding_cosine", "min": 0.9},
               samples=8, seq_len=16, batch_size=8, heldout=0)
    assert len(opt.report.records) == 2
    for r in opt.report.records:
        assert r.status == "rejected"
        assert r.reason.startswith("text model (kind 'encoder'")
        assert "fixed tokens" in r.reason
    assert _count(opt.graph_module) == 2


class DynamicLength(nn.Module):
    """Plain self-attention over however many tokens come in: the traced length stays symbolic."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.qkv, self.o = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        return x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, D))


def test_refuses_dynamic_token_count_with_reason():
    m = DynamicLength().eval()
    xs = [{"x": torch.randn(2, 10, 16)} for _ in range(2)]
    calib = Calibration(batches=xs, heldout=xs[:1], source="random", samples=4, seq_len=10)
    opt = _run(m, [{"normlin": {}}], {"metric": "relative_rms", "max": 1.0}, calibration=calib)
    (r,) = opt.report.records
    assert r.status == "rejected"
    assert "sequence length at this attention is symbolic" in r.reason and "fixed token count" in r.reason


@pytest.fixture(scope="module")
def digits_vit():
    return load_model("digits_vit")


def test_fires_on_digits_vit_and_held_out_accuracy_holds(digits_vit):
    from rewriter.models.digits_vit import accuracy, digits_split
    opt = _run(digits_vit, [{"normlin": {"layers": "1-3"}}], {"metric": "top1_agreement", "min": 0.95},
               samples=64, batch_size=32, heldout=64)
    applied = [r for r in opt.report.records if r.status == "applied"]
    assert applied and all(r.info["tokens"] == 17 and r.built["weight"].shape == (17, 17) for r in applied)
    assert _count(opt.graph_module) == 4 - len(applied)
    assert opt.report.params_after < opt.report.params_before
    assert opt.report.heldout["metric"] == "top1_agreement" and opt.report.heldout["value"] >= 0.9
    _, (x, y) = digits_split()
    assert accuracy(opt, x, y) >= accuracy(digits_vit.model, x, y) - 0.05
    assert str(opt.report.flops_after) != str(opt.report.flops_before)


@pytest.fixture(scope="module")
def forecaster():
    return load_model("forecaster")


def test_forecaster_all_layers_save_load_replays(forecaster, tmp_path):
    from rewriter.models.forecaster import forecast_error, forecaster_calibration, windows
    opt = _run(forecaster, [{"normlin": {}}], {"metric": "relative_rms", "max": 0.5},
               calibration=forecaster_calibration(samples=64, heldout=32))
    assert [r.status for r in opt.report.records] == ["applied", "applied"], [r.reason for r in opt.report.records]
    assert _count(opt.graph_module) == 0
    # the forecast error moves by less than the gate allows, measured on months it never saw
    before, after = forecast_error(forecaster.model)["mse"], forecast_error(opt)["mse"]
    assert after < 2 * before
    back = load(opt.save(tmp_path / "fc"))
    past, _ = windows("test")
    assert torch.equal(back(past_values=past), opt(past_values=past))


def test_fit_helpers():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 6, 6, dtype=torch.float64, generator=g)
    P = fit.project_rows_to_simplex(A)
    assert (P >= 0).all() and torch.allclose(P.sum(-1), torch.ones(3, 6, dtype=torch.float64))
    torch.testing.assert_close(fit.project_rows_to_simplex(P), P)        # a projection is idempotent
    # nearest point: no random point of the simplex is closer to A than P
    Z = torch.distributions.Dirichlet(torch.ones(6, dtype=torch.float64)).sample((500, 3, 6))
    assert ((Z - A).pow(2).sum(-1) >= (P - A).pow(2).sum(-1) - 1e-12).all()
    # distillation only improves the projected least-squares start, and beats random feasible points
    V = [torch.randn(4, 3, 6, 5, dtype=torch.float64, generator=g) for _ in range(3)]
    O = [torch.randn(3, 6, 6, dtype=torch.float64, generator=g).softmax(-1) @ v + 0.3 * torch.randn_like(v) for v in V]
    Gm, C, o2 = fit.gram_stats(V, O, per_head=True)
    start = fit.project_rows_to_simplex(fit.least_squares(Gm, C))
    best = fit.distill(start, Gm, C, o2, 300)
    assert fit.loss(best, Gm, C, o2) < fit.loss(start, Gm, C, o2)
    assert all(fit.loss(best, Gm, C, o2) <= fit.loss(z, Gm, C, o2) for z in Z[:50])
    torch.testing.assert_close(fit.row_normalize_softplus(fit.softplus_inverse(best)), best, atol=1e-5, rtol=0)
