"""masa (MASA, arXiv:2508.04581): matrix PCA is truncated SVD and exact at S = L; the rewrite is exact
at S = L on GQA (llama) and fused Conv1D (gpt2) models; the state really shrinks; save → load
reproduces outputs; refinements lower the output error; refusals carry their reason; the gate
rolls back a damaging setting and leaves the model as it was."""
import io

import pytest
import torch
import torch.nn as nn

import rewriter
from rewriter import graph as G
from rewriter import optimize
from rewriter.report import unique_numel as _unique_numel
from rewriter.calibrate import Calibration
from rewriter.patterns import _masa_math as MM
from rewriter.trace import trace

CALIB = {"samples": 16, "seq_len": 32, "batch_size": 8, "heldout": 8}


def _recipe(step, **gate):
    return {"calibration": CALIB, "gate": gate or {"metric": "relative_rms", "max": 10.0}, "steps": [{"masa": step}]}


def _run(loaded, step, **gate):
    return optimize(loaded, _recipe(step, **gate), progress=False, measure_latency=False)


def _applied(opt):
    return [r for r in opt.report.records if r.status == "applied"]


def _dense(loaded, batch):
    """The traced, un-rewritten model as the engine sees it (clean drops what export left unused)."""
    gm = trace(loaded.model, (), batch, io=loaded)
    G.clean(gm)
    return gm


def _state_bytes(m: torch.nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    return buf.tell()


@pytest.fixture(scope="module")
def batch(llama):
    return llama.example_inputs(batch=3, seq_len=11)


# ---- the math -------------------------------------------------------------------------------------

def test_matrix_pca_is_truncated_svd_and_exact_at_S_equals_L():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 7, 6, generator=g, dtype=torch.float64)
    D, C = MM.matrix_pca(W, 5)
    assert torch.allclose(MM.reconstruct(D, C), W, atol=1e-12)
    D, C = MM.matrix_pca(W, 2)
    flat = D.reshape(2, -1)
    assert torch.allclose(flat @ flat.T, torch.eye(2, dtype=W.dtype), atol=1e-12)     # orthonormal atoms
    U, s, Vh = torch.linalg.svd(W.reshape(5, -1), full_matrices=False)
    best = (U[:, :2] * s[:2]) @ Vh[:2]                                                   # Eckart–Young
    assert torch.allclose(MM.reconstruct(D, C).reshape(5, -1), best, atol=1e-10)
    twins = torch.stack([W[0], W[0], W[1]])                                              # rank 2, S = L = 3
    D, C = MM.matrix_pca(twins, 3)
    assert torch.isfinite(D).all() and torch.allclose(MM.reconstruct(D, C), twins, atol=1e-12)
    with pytest.raises(ValueError, match="atoms must be in"):
        MM.matrix_pca(W, 6)


def test_whitened_residual_is_optimal_in_output_error():
    g = torch.Generator().manual_seed(1)
    E = torch.randn(12, 10, generator=g, dtype=torch.float64)
    X = torch.randn(200, 10, generator=g, dtype=torch.float64) * torch.logspace(0, -3, 10, dtype=torch.float64)
    M = X.T @ X / 200                                                     # strongly anisotropic inputs
    U, V = MM.whitened_residual(E, M, 3)
    plain = torch.linalg.svd(E)
    E_plain = (plain.U[:, :3] * plain.S[:3]) @ plain.Vh[:3]
    err = lambda A: torch.trace((E - A) @ M @ (E - A).T).item()           # noqa: E731
    assert err(U @ V) < 0.5 * err(E_plain)
    assert torch.linalg.matrix_norm(U @ V, 2) <= torch.linalg.matrix_norm(E, 2) + 1e-9  # a projection of E


def test_distill_lowers_output_error_and_ridge_stops_blow_up():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(4, 16, 24, generator=g)
    X = torch.randn(4, 300, 24, generator=g)
    X[..., 12:] *= 1e-3                                                   # half the input directions unused
    M = (X.transpose(1, 2) @ X / 300).double()
    D, C = MM.matrix_pca(W, 2)
    fit = {}
    for ridge in (0.05, 0.0):
        t, stats = MM.distill(W, M, D, C, None, None, steps=300, lr=3e-2, ridge=ridge)
        assert stats["loss_after"] < stats["loss_before"]
        fit[ridge] = MM.reconstruct(t["atoms"], t["coef"])
        assert MM.weighted_error(W, fit[ridge], M).mean() < MM.weighted_error(W, MM.reconstruct(D, C), M).mean()
    # plain least squares inflates the weights along the unused inputs; the ridge keeps them anchored
    assert fit[0.0].norm() > 2 * W.norm() and fit[0.05].norm() < W.norm()
    assert (W - fit[0.05])[..., 12:].norm() < 0.5 * (W - fit[0.0])[..., 12:].norm()


def _anisotropic_moments(L, n, g):
    """Per-layer input second moments with a few strong directions (shared) and a layer-specific tilt."""
    base = torch.logspace(0, -3, n, dtype=torch.float64)
    Ms = []
    for _ in range(L):
        X = torch.randn(400, n, generator=g, dtype=torch.float64) * base * (1 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64))
        Ms.append(X.T @ X / 400)
    return torch.stack(Ms)


def test_whitened_pca_beats_plain_pca_in_output_error_and_is_exact_at_S_equals_L():
    g = torch.Generator().manual_seed(3)
    # layers mix 4 shared matrices: 2 read the inputs that carry the signal, 2 (10x larger) read inputs
    # that are nearly silent. Plain PCA spends its atoms on the large pair; the whitened fit on the used pair.
    B = torch.randn(4, 12, 10, generator=g, dtype=torch.float64)
    B[:2, :, 5:] = 0
    B[2:, :, :5] = 0
    B[2:] *= 10
    W = torch.einsum("lk,koi->loi", torch.randn(5, 4, generator=g, dtype=torch.float64), B)
    W += 0.01 * torch.randn(W.shape, generator=g, dtype=torch.float64)
    M = _anisotropic_moments(5, 10, g)
    for S in (1, 2):
        plain = MM.reconstruct(*MM.matrix_pca(W, S))
        white = MM.reconstruct(*MM.whitened_pca(W, M, S))
        assert MM.weighted_error(W, white, M).mean() < 0.8 * MM.weighted_error(W, plain, M).mean()
        # the coefficients are the per-layer least-squares optimum for these atoms
        D, C = MM.whitened_pca(W, M, S)
        assert torch.allclose(MM.fit_coefficients(W, M, D), C, atol=1e-9)
    D, C = MM.whitened_pca(W, M, 5)
    assert torch.allclose(MM.reconstruct(D, C), W, atol=1e-8)


def test_allocate_ranks_greedy_within_budget_and_cap():
    gains = {"a": torch.tensor([[8.0, 4.0, 2.0, 1.0], [3.0, 0.5, 0.1, 0.0]]),
             "b": torch.tensor([[30.0, 1.0, 0.5, 0.1], [2.0, 1.5, 1.0, 0.5]])}
    costs, caps = {"a": 1, "b": 2}, {"a": 3, "b": 4}
    # gain per parameter: a0 8, 4, 3 (cap 3: 2 + 1 left); a1 3, 0.5, 0.1; b0 15, 0.5, 0.25, 0.05;
    # b1 1, 0.75, 0.5, 0.25 → b0 (7 → 5), a0, a0, a0 (cap), a1 (→ 1), b1 costs 2: skipped, a1 (→ 0)
    ranks = MM.allocate_ranks(gains, costs, caps, budget=7)
    assert ranks == {"a": [3, 2], "b": [1, 0]}
    assert MM.allocate_ranks(gains, costs, caps, budget=0) == {"a": [0, 0], "b": [0, 0]}
    # the step that reaches the cap removes the whole tail (the layer is then stored dense)
    gains = {"a": torch.tensor([[2.0, 0.6, 0.6, 0.6]]), "b": torch.tensor([[1.5, 1.0]])}
    ranks = MM.allocate_ranks(gains, {"a": 1, "b": 1}, {"a": 2, "b": 2}, budget=3)
    assert ranks == {"a": [2], "b": [1]}          # a's 2nd rank is worth 1.8, more than b's 1.0


# ---- the rule ------------------------------------------------------------------------------------

def test_exact_at_S_equals_L_on_gqa_llama(llama, batch):
    site = rewriter.inspect(llama)[0]
    assert site.kv_heads < site.heads                                     # k, v narrower than q
    opt = _run(llama, {"atoms": 1.0}, metric="relative_rms", max=1e-5)
    (r,) = _applied(opt)
    assert r.info["layers"] == [0, 1, 2, 3] and r.info["atoms"] == 4
    assert {k for k in r.built if k.endswith(".atoms")} == {"q.atoms", "k.atoms", "v.atoms", "o.atoms"}
    assert r.built["k.atoms"].shape[1] < r.built["q.atoms"].shape[1]
    with torch.no_grad():
        ref, out = llama.model(**batch).logits, opt(**batch).logits
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    names = [n for n, _ in opt.graph_module.named_buffers()]
    assert not any(n.endswith("q_proj.weight") for n, _ in opt.graph_module.named_parameters())
    assert sum("rw_masa" in n for n in names) == 4 + 4 * 4                # 4 dictionaries, 16 coefficient rows


def test_exact_at_S_equals_L_on_gpt2_fused_conv1d():
    from rewriter.models import load_model
    gpt2 = load_model("gpt2")
    opt = _run(gpt2, {"atoms": 1.0, "projections": ["q", "o"]}, metric="relative_rms", max=1e-5)
    (r,) = _applied(opt)
    assert {k for k in r.built if k.endswith(".atoms")} == {"qkv.atoms", "o.atoms"}   # c_attn is one weight
    b = gpt2.example_inputs(batch=2, seq_len=9)
    with torch.no_grad():
        torch.testing.assert_close(opt(**b).logits, gpt2.model(**b).logits, rtol=1e-5, atol=1e-5)


def test_storage_shrinks_refinements_help_and_save_load_reproduces(llama, batch, tmp_path):
    step = {"atoms": 2, "residual_rank": 2, "distill": {"steps": 30}}
    opt = _run(llama, step)
    (r,) = _applied(opt)
    info = r.info
    err = info["relative_output_error"]
    for p in "qkvo":
        assert err[f"{p}.residual"] < err[f"{p}.pca"] and err[f"{p}.distill"] <= err[f"{p}.residual"]
    # attention projections: 4 layers x (q 64x64, k 32x64, v 32x64, o 64x64) → 2 atoms + 4x2 coefficients
    # + 4 x rank-2 residual factors per type
    assert info["attn_proj_params_before"] == 4 * (2 * 64 * 64 + 2 * 32 * 64)
    expect = sum(2 * o * i + 4 * 2 + 4 * 2 * (o + i) for o, i in [(64, 64), (32, 64), (32, 64), (64, 64)])
    assert info["attn_proj_params_after"] == expect
    dense = _dense(llama, batch)
    saved = info["attn_proj_params_before"] - info["attn_proj_params_after"]
    assert _unique_numel(dense) - _unique_numel(opt.graph_module) == saved
    # bytes on disk (torch.save): 4 bytes per saved float, less < 512 bytes of zip/pickle entry per new buffer
    new = sum("rw_masa" in n for n, _ in opt.graph_module.named_buffers())
    assert _state_bytes(dense) - _state_bytes(opt.graph_module) >= 4 * saved - 512 * new
    path = opt.save(tmp_path / "masa")
    assert (path / "tensors.safetensors").stat().st_size < 4 * info["attn_proj_params_before"]
    back = rewriter.load(path, model=llama)
    with torch.no_grad():
        assert torch.equal(back(**batch).logits, opt(**batch).logits)
    assert _unique_numel(back.graph_module) == _unique_numel(opt.graph_module)


def test_materialize_folds_the_factors_into_dense_weights_exactly(llama, batch, tmp_path):
    opt = _run(llama, {"atoms": 2, "residual_rank": 2})
    with torch.no_grad():
        before = opt(**batch).logits
    compact = _unique_numel(opt.graph_module)
    nodes = len(opt.graph_module.graph.nodes)
    path = opt.save(tmp_path / "masa")
    opt.materialize()
    assert not [n for n, _ in opt.graph_module.named_buffers() if "rw_masa" in n]     # factors gone
    assert _unique_numel(opt.graph_module) > compact                                 # dense weights back
    assert len(opt.graph_module.graph.nodes) < nodes                                  # no per-call rebuild
    with torch.no_grad():
        assert torch.equal(opt(**batch).logits, before)
    back = rewriter.load(path, model=llama, materialize=True)                       # the saved form stays compact
    with torch.no_grad():
        assert torch.equal(back(**batch).logits, before)


def test_fixed_size_groups_and_one_layer_group_refused(llama):
    opt = _run(llama, {"atoms": 1, "groups": 3, "projections": ["v"]})
    recs = opt.report.records
    assert [r.status for r in recs] == ["applied", "error"]
    assert recs[0].info["layers"] == [0, 1, 2]
    assert recs[1].info["layers"] == [3] and "nothing to share" in recs[1].reason


def test_auto_groups_follow_drift_on_minilm(minilm):
    opt = optimize(minilm, _recipe({"atoms": 0.67, "groups": "auto", "drift": 0.3}, metric="embedding_cosine",
                                   min=0.0), progress=False, measure_latency=False)
    groups = [r.info["layers"] for r in opt.report.records]
    assert sorted(sum(groups, [])) == list(range(6)) and len(groups) >= 2
    assert all(g == list(range(g[0], g[-1] + 1)) for g in groups)         # consecutive layers
    assert all(r.status == "applied" for r in opt.report.records)
    assert opt.report.params_after < opt.report.params_before


class NoProjection(nn.Module):
    """Self-attention over the raw input (q = k = v = x): no projection weights to share."""

    def __init__(self):
        super().__init__()
        self.out = nn.Linear(32, 32)

    def forward(self, x):
        h = x.view(x.shape[0], x.shape[1], 4, 8).transpose(1, 2)           # (B, nh, T, hs)
        y = nn.functional.scaled_dot_product_attention(h, h, h)
        return x + self.out(y.transpose(1, 2).reshape(x.shape))


def test_refuses_without_projection_weights_with_reason():
    m = NoProjection().eval()
    x = [{"x": torch.randn(2, 10, 32)} for _ in range(2)]
    calib = Calibration(batches=x, heldout=x[:1], source="random", samples=4, seq_len=10)
    opt = optimize(m, _recipe({"atoms": 1.0}), calibration=calib, progress=False, measure_latency=False)
    (r,) = opt.report.records
    assert r.status == "rejected" and "no q/k/v projection weight" in r.reason


def test_gate_rolls_back_damaging_setting_bit_identically(llama, batch, frozen_state):
    before = frozen_state(llama.model)
    opt = _run(llama, {"atoms": 1}, metric="relative_rms", max=1e-3)
    (r,) = opt.report.records
    assert r.status == "rolled_back" and r.reason.startswith("gate: relative_rms")
    dense = _dense(llama, batch)
    assert opt.graph_module.state_dict().keys() == dense.state_dict().keys()
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in opt.graph_module.state_dict().items())
    with torch.no_grad():
        assert torch.equal(opt(**batch).logits, dense(**batch).logits)
    after = llama.model.state_dict()                                      # the user's model is untouched
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_reduction_allocates_ranks_to_the_budget_and_save_load_reproduces(llama, batch, tmp_path):
    step = {"atoms": {"q": 2, "k": 2, "v": 3, "o": 3}, "reduction": 0.3, "distill": {"steps": 20}}
    opt = _run(llama, step)
    (r,) = _applied(opt)
    info = r.info
    before, after = info["attn_proj_params_before"], info["attn_proj_params_after"]
    assert before == 4 * (2 * 64 * 64 + 2 * 32 * 64)
    assert after <= 0.7 * before and after > 0.7 * before - (64 + 64)     # the budget is spent, to one rank
    assert set(info["ranks"]) == set("qkvo") and max(sum(v) for v in info["ranks"].values()) > 0
    dense = _dense(llama, batch)
    assert _unique_numel(dense) - _unique_numel(opt.graph_module) == before - after
    err = info["relative_output_error"]
    for p in "qkvo":
        assert err[f"{p}.residual"] < err[f"{p}.pca"] and err[f"{p}.distill"] <= err[f"{p}.residual"]
    for p in "qkvo":          # stored factors have exactly the allocated rank per layer (0: none stored)
        for layer, rank in enumerate(info["ranks"][p]):
            left = [v for k, v in r.built.items() if k.startswith(f"{p}.left.") and f"layers.{layer}." in k]
            assert (left[0].shape[-1] if left else 0) == (0 if layer in info["dense_layers"][p] else rank)
    path = opt.save(tmp_path / "masa")
    back = rewriter.load(path, model=llama)
    with torch.no_grad():
        assert torch.equal(back(**batch).logits, opt(**batch).logits)


def test_reduction_without_atoms_keeps_full_rank_layers_dense(llama, batch):
    opt = _run(llama, {"atoms": {"q": 0, "k": 0, "v": 0, "o": 0}, "reduction": 0.05})
    (r,) = _applied(opt)
    dense_layers = r.info["dense_layers"]
    assert any(dense_layers.values())
    kept = {n for n, _ in opt.graph_module.named_parameters()}
    site = {s.layer: s for s in rewriter.inspect(llama)}
    for p, layers in dense_layers.items():
        for layer in layers:                  # untouched: still the model's own weight
            assert getattr(site[layer], f"{p}_weight") in kept
    assert not any(k.endswith(".atoms") for k in r.built)
    assert r.info["attn_proj_params_after"] <= 0.95 * r.info["attn_proj_params_before"]


def test_option_conflicts_are_refused():
    from rewriter.patterns.masa import MasaOptions
    with pytest.raises(ValueError, match="not both"):
        MasaOptions(atoms=2, residual_rank=4, reduction=0.2)
    with pytest.raises(ValueError, match="needs `reduction`"):
        MasaOptions(atoms={"q": 0, "k": 2, "v": 2, "o": 2})
    with pytest.raises(ValueError, match="missing"):
        MasaOptions(atoms={"q": 2}, reduction=0.2)
