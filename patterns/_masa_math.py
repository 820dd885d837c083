"""The tensor math behind the `masa` rule: pure functions, tensors in, tensors out.

Zhussip et al., "Share Your Attention: Transformer Weight Sharing via Matrix-based Dictionary
Learning" (MASA), arXiv:2508.04581. Whitened residual after Wang et al., "SVD-LLM: Truncation-aware
Singular Value Decomposition for Large Language Model Compression", arXiv:2403.07378.

Conventions: a projection's weights over a group of L layers are one tensor W [L, out, in] laid
out so that the projection computes y = x Wₗᵀ (torch.nn.Linear); callers transpose GPT-2 Conv1D
weights first. M [L, in, in] are the second moments E[x xᵀ] of each layer's projection inputs on
calibration tokens, so that mean ‖x (Wₗ − Ŵₗ)ᵀ‖² = tr((Wₗ − Ŵₗ) Mₗ (Wₗ − Ŵₗ)ᵀ).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def matrix_pca(W: Tensor, atoms: int) -> tuple[Tensor, Tensor]:
    """Matrix PCA (MASA §"post-hoc"): W [L, *shape] → atoms D [S, *shape], coefficients C [L, S].

    The columns vec(Wₗ) of the (uncentered) data matrix are compressed onto the top-S eigenvectors
    of W Wᵀ, computed through the small L×L Gram matrix G = Wᵀ W = Q Λ Qᵀ: D = Λ^{-1/2} Qᵀ vec(W)
    (orthonormal atoms), cₗₛ = ⟨D_s, Wₗ⟩. Σₛ cₗₛ D_s is the best rank-S approximation (truncated
    SVD, Eckart–Young) and equals W when S = L. Computed in float64, returned in W's dtype.
    Directions with a zero eigenvalue (e.g. two identical layers) carry no energy: their atom is 0.
    """
    L, shape = W.shape[0], W.shape[1:]
    if not 1 <= atoms <= L:
        raise ValueError(f"matrix_pca: atoms must be in [1, {L}] (the number of layers), got {atoms}")
    X = W.reshape(L, -1).double()                               # [L, P], row l = vec(W_l)
    lam, Q = torch.linalg.eigh(X @ X.T)                         # ascending, [L], [L, L]
    lam, Q = lam.flip(0)[:atoms].clamp_min(0), Q.flip(1)[:, :atoms]
    live = lam > lam[0] * L * torch.finfo(torch.float64).eps
    D = (Q.T @ X) / lam.clamp_min(1e-300).sqrt()[:, None]      # [S, P] orthonormal rows
    D[~live] = 0
    C = X @ D.T                                                 # [L, S]
    return D.reshape(atoms, *shape).to(W.dtype), C.to(W.dtype)


def reconstruct(D: Tensor, C: Tensor, U: Tensor | None = None, V: Tensor | None = None) -> Tensor:
    """Ŵₗ = Σₛ cₗₛ D_s (+ Uₗ Vₗ): D [S, out, in], C [L, S], U [L, out, r], V [L, r, in] → [L, out, in]."""
    W = torch.einsum("ls,soi->loi", C, D)
    return W if U is None or U.shape[-1] == 0 else W + U @ V


def second_moment(xs: list[Tensor], masks: list[Tensor | None]) -> Tensor:
    """E[x xᵀ] [in, in] in float64 over the real tokens of calibration activations x [..., in]."""
    total, count = None, 0
    for x, m in zip(xs, masks):
        x = x.double()
        if m is not None and m.shape == x.shape[:-1]:
            x = x[m.bool()]
        x = x.reshape(-1, x.shape[-1])
        total = x.T @ x if total is None else total + x.T @ x
        count += x.shape[0]
    if not count:
        raise ValueError("second_moment: no calibration tokens")
    return total / count


def _damped(M: Tensor, ridge: float) -> Tensor:
    """M + ridge·mean(diag M)·I: the ridge keeps directions the inputs barely use anchored."""
    eye = torch.eye(M.shape[-1], dtype=M.dtype, device=M.device)
    return M + ridge * M.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None].clamp_min(1e-30) * eye


def whitened_residual(E: Tensor, M: Tensor, rank: int, damp: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Rank-r correction of one layer's residual E = Wₗ − Ŵₗ [out, in] in the whitened input space.

    SVD-LLM: with the Cholesky factor R of the inputs' second moment (R Rᵀ = M + damp), the best
    rank-r Eᵣ for the output error ‖(E − Eᵣ) R‖_F truncates the SVD E R = A Σ Bᵀ:
    Eᵣ = A_r Σ_r B_rᵀ R⁻¹. Since A_rᵀ E R = Σ_r B_rᵀ, that is Eᵣ = A_r (A_rᵀ E) — no R⁻¹ is ever
    formed, so directions the inputs do not use cannot blow up. Returns U = A_r [out, r],
    V = A_rᵀ E [r, in] in E's dtype.
    """
    if rank <= 0:
        return E.new_zeros(E.shape[0], 0), E.new_zeros(0, E.shape[1])
    rank = min(rank, *E.shape)
    R = torch.linalg.cholesky(_damped(M.double(), damp))
    A = torch.linalg.svd(E.double() @ R, full_matrices=False)[0][:, :rank]
    return A.to(E.dtype), (A.T @ E.double()).to(E.dtype)


def weighted_error(W: Tensor, What: Tensor, M: Tensor, ridge: float = 0.0) -> Tensor:
    """Per-layer relative output error tr(E A Eᵀ) / tr(W A Wᵀ), A = M + ridge·mean(diag M)·I, E = W − Ŵ."""
    A = _damped(M.double(), ridge) if ridge else M.double()
    E = (W - What).double()
    num = torch.einsum("loi,lij,loj->l", E, A, E)
    den = torch.einsum("loi,lij,loj->l", W.double(), A, W.double())
    return num / den.clamp_min(1e-300)


def distill(W: Tensor, M: Tensor, D: Tensor, C: Tensor, U: Tensor | None, V: Tensor | None, *,
            steps: int, lr: float, ridge: float, energy: float = 0.999,
            rank_mask: Tensor | None = None) -> tuple[dict[str, Tensor], dict]:
    """Train atoms, coefficients (and residual factors) so that every layer's projection outputs on
    the calibration activations match the original ones, ridge-regularized:

        min  Σₗ tr(Eₗ Aₗ Eₗᵀ) / tr(Wₗ Aₗ Wₗᵀ),   Eₗ = Wₗ − Ŵₗ,   Aₗ = Mₗ + ridge·mean(diag Mₗ)·I.

    Plain least squares (ridge = 0) is free to put huge weights in directions the calibration
    inputs barely span, which then fire on new inputs; the ridge term charges every direction at
    least ridge·(average input energy), pulling Ŵ towards W there. Adam on full-batch second moments
    (equal to the MSE over all calibration tokens, at in² instead of tokens·in cost), starting from
    the PCA (+ residual) solution; each tensor is optimized in units of its initial RMS so one `lr`
    fits all; the best iterate is kept, so the loss never ends above where it started.
    """
    # tr(E A Eᵀ) = ‖E Q √Λ‖² + ρ‖E‖² with M = Q Λ Qᵀ; keeping the eigen-directions that hold
    # `energy` of tr(M) makes a step cost out·in·keep instead of out·in² (the dropped tail is < 1 − energy
    # of the input energy and is still charged ρ by the ridge term). energy = 0.999: on MiniLM q/v
    # (S = 4 of 6) the held-out output error equals the full form's (q 0.1300 vs 0.1298, v 0.1767 vs 0.1764)
    lam, Q = torch.linalg.eigh(M.double())                                 # ascending
    lam, Q = lam.flip(-1).clamp_min(0), Q.flip(-1)
    share = lam.cumsum(-1) / lam.sum(-1, keepdim=True).clamp_min(1e-300)
    keep = int((share < energy).sum(-1).max().item()) + 1
    R = (Q[..., :keep] * lam[..., None, :keep].sqrt()).to(torch.float32)        # [L, in, keep]
    rho = (ridge * M.diagonal(dim1=-2, dim2=-1).mean(-1)).to(torch.float32)[:, None, None]   # [L, 1, 1]
    Wf = W.float()
    den = ((Wf @ R).pow(2).sum((1, 2)) + (rho * Wf.pow(2)).sum((1, 2))).clamp_min(1e-30)
    init = {"atoms": D, "coef": C} if D.shape[0] else {}
    if U is not None and U.shape[-1]:
        init.update(left=U, right=V)
    mask = None if rank_mask is None or "left" not in init else rank_mask.to(torch.float32)
    unit = {k: v.float().pow(2).mean().sqrt().clamp_min(1e-12) for k, v in init.items()}
    params = {k: (v.float() / unit[k]).clone().requires_grad_(True) for k, v in init.items()}

    def loss_of(p):
        t = {k: p[k] * unit[k] for k in p}
        if mask is not None:
            t["left"], t["right"] = t["left"] * mask[:, None, :], t["right"] * mask[:, :, None]
        What = reconstruct(t.get("atoms", D.float()), t.get("coef", C.float()), t.get("left"), t.get("right"))
        E = Wf - What
        return (((E @ R).pow(2).sum((1, 2)) + (rho * E.pow(2)).sum((1, 2))) / den).mean()

    opt = torch.optim.Adam(params.values(), lr=lr)
    with torch.no_grad():
        best_loss = first = loss_of(params).item()
    best = {k: v.detach().clone() for k, v in params.items()}
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_of(params)
        loss.backward()
        opt.step()
        if loss.item() < best_loss:       # loss of the iterate before this step
            best_loss = loss.item()
            best = {k: v.detach().clone() for k, v in params.items()}
    with torch.no_grad():
        last = loss_of(params).item()
        if last < best_loss:
            best_loss, best = last, {k: v.detach().clone() for k, v in params.items()}
    out = {k: (best[k] * unit[k]).to(W.dtype) for k in best}
    if mask is not None:
        out["left"], out["right"] = out["left"] * mask[:, None, :], out["right"] * mask[:, :, None]
    if not math.isfinite(best_loss):
        raise FloatingPointError(f"distill: loss became {best_loss}; lower distill.lr (now {lr})")
    return out, {"loss_before": first, "loss_after": best_loss}


# ---- data-aware (whitened) fit: ours, after MASA's PCA and SVD-LLM's whitening --------------------

def _layer_weights(W: Tensor, M: Tensor) -> Tensor:
    """wₗ = 1 / tr(Wₗ Mₗ Wₗᵀ): each layer's output error counts relative to its output energy."""
    den = torch.einsum("loi,lij,loj->l", W.double(), M.double(), W.double())
    return 1.0 / den.clamp_min(1e-300)


def fit_coefficients(W: Tensor, M: Tensor, D: Tensor, damp: float = 1e-4) -> Tensor:
    """Per-layer least squares for the coefficients with the atoms fixed, in each layer's own output
    error: cₗ = argmin tr(Eₗ Aₗ Eₗᵀ), Eₗ = Wₗ − Σₛ cₗₛ D_s, Aₗ = Mₗ + damp. One S×S solve per layer
    (Gₗ cₗ = bₗ, G_st = tr(D_s Aₗ D_tᵀ), b_s = tr(D_s Aₗ Wₗᵀ)); pseudo-inverse when atoms are 0."""
    A = _damped(M.double(), damp)
    Dd, Wd = D.double(), W.double()
    DA = torch.einsum("soi,lij->lsoj", Dd, A)                                     # [L, S, out, in]
    G = torch.einsum("lsoj,toj->lst", DA, Dd)
    b = torch.einsum("lsoj,loj->ls", DA, Wd)
    return torch.linalg.lstsq(G, b[..., None], driver="gelsd").solution[..., 0].to(W.dtype) \
        if G.device.type == "cpu" else (torch.linalg.pinv(G) @ b[..., None])[..., 0].to(W.dtype)


def whitened_pca(W: Tensor, M: Tensor, atoms: int, damp: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Atoms for the output error instead of ‖W − Ŵ‖_F: min Σₗ wₗ tr(Eₗ Mₗ Eₗᵀ) (wₗ as in
    `_layer_weights`). Atoms cannot depend on the layer, so they are the matrix PCA of the layers
    in one shared whitened space: M̄ = Σ wₗ Mₗ / Σ wₗ (+ damp), R Rᵀ = M̄ (Cholesky), D̃ = PCA of
    √wₗ Wₗ R, D = D̃ R⁻¹; then each layer's coefficients are re-solved in its own Mₗ
    (`fit_coefficients`). D̃ lies in the span of the Wₗ R, so D lies in the span of the Wₗ: R⁻¹
    never amplifies an unused input direction, and S = L is still exact."""
    w = _layer_weights(W, M)
    Mbar = _damped((w[:, None, None] * M.double()).sum(0) / w.sum(), damp)
    R = torch.linalg.cholesky(Mbar)
    Wt = (W.double() @ R) * w.sqrt()[:, None, None] / w.sqrt().mean()
    Dt, _ = matrix_pca(Wt, atoms)
    D = torch.linalg.solve_triangular(R, Dt, upper=False, left=False)            # D R = D̃
    return D.to(W.dtype), fit_coefficients(W.double(), M, D, damp).to(W.dtype)


def whitened_spectrum(E: Tensor, M: Tensor, damp: float = 1e-4) -> tuple[Tensor, Tensor]:
    """Per layer, the SVD of the whitened residual Eₗ R (R Rᵀ = Mₗ + damp): left singular vectors
    A [L, out, k] and the squared singular values σ² [L, k] (descending): keeping rank r removes
    σ₁² + … + σ_r² of tr(Eₗ Aₗ Eₗᵀ) (SVD-LLM). Used to spend a parameter budget on ranks."""
    R = torch.linalg.cholesky(_damped(M.double(), damp))
    A, s, _ = torch.linalg.svd(E.double() @ R, full_matrices=False)
    return A, s.pow(2)


def allocate_ranks(gains: dict[str, Tensor], costs: dict[str, int], caps: dict[str, int],
                   budget: int, dense: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Spend `budget` parameters on residual ranks where they remove the most weighted output error
    per parameter (ours). gains[label] [L, k]: the error each further rank of each layer removes,
    descending along k (`whitened_spectrum`'s σ², scaled by the layer's and the label's weight);
    costs[label]: parameters per rank (out + in); caps[label]: the largest useful rank (beyond
    out·in / (out + in) a factorization stores more than the dense matrix, so a layer that reaches
    its cap keeps its dense weight: that last step removes all the layer's remaining error). Greedy
    over the merged list sorted by gain / cost; each layer's list is made non-increasing (the cap step
    is clamped to the step before it), and a layer's ranks all cost the same, so its ranks are taken
    in order. dense[label]: parameters of the dense matrix (out·in; default caps·costs): reaching the
    cap costs dense − (cap − 1)·cost, so the budget holds exactly. Returns the rank per layer for each
    label (rank == cap: keep dense)."""
    dense = dense or {label: caps[label] * costs[label] for label in gains}
    cands = []
    for label, g in gains.items():
        k = min(caps[label], g.shape[1])
        if k == 0:
            continue
        step = g[:, :k].double().clone()
        step[:, k - 1] = g[:, k - 1:].double().sum(1)                   # at the cap: all that is left
        cost = torch.full((k,), float(costs[label]), dtype=torch.float64)
        if k == caps[label]:
            cost[k - 1] = dense[label] - (k - 1) * costs[label]
        step = (step / cost).cummin(1).values
        for layer in range(g.shape[0]):
            for j in range(k):
                if step[layer, j] > 0:
                    cands.append((step[layer, j].item(), label, layer, int(cost[j].item())))
    cands.sort(key=lambda c: -c[0])
    ranks = {label: [0] * g.shape[0] for label, g in gains.items()}
    for _, label, layer, cost in cands:
        if budget >= cost:
            ranks[label][layer] += 1
            budget -= cost
    return ranks
