"""Fitting a NormLin mixing matrix to an attention site: row-stochastic least squares.

Given calibration values V and the site's attention outputs O (per batch b and head h, both
N×d), find a row-stochastic A (A ≥ 0, A·1 = 1) minimizing the distillation loss

    f(A) = Σ_{b,h} ‖O_bh − A·V_bh‖²_F = tr(A G Aᵀ) − 2 tr(A Cᵀ) + Σ‖O‖²,
    G = Σ V Vᵀ (N×N),  C = Σ O Vᵀ (N×N)

(summed over heads for one shared A, or per head for one A per head). G and C are sufficient
statistics, so every step below costs O(N³), whatever the calibration size.

1. least squares: A₀ = C G⁺ (the unconstrained optimum);
2. projection of each row onto the probability simplex (Duchi, Shalev-Shwartz, Singer & Chandra,
   "Efficient Projections onto the l1-Ball for Learning in High Dimensions", ICML 2008);
3. distillation: projected accelerated gradient (FISTA; Beck & Teboulle, SIAM J. Imaging Sci.
   2009) on f over the simplex rows, step 1/L with L = 2 λ_max(G). f is convex, so this moves
   toward the constrained optimum; the best iterate is kept, so it never makes the fit worse.

If the site's attention matrix is input-independent (every O_bh = A*·V_bh, A* row-stochastic)
and G is full rank, step 1 returns A* and steps 2–3 leave it in place: the exact case.
"""
from __future__ import annotations

import torch

# Entries the simplex projection sets to 0 become this before inverting softplus (W = log(floor)
# ≈ −13.8): softplus(W) > 0 always, and 1e-6 per entry is below fp32 resolution of a row sum of 1.
FLOOR = 1e-6


def gram_stats(values: list[torch.Tensor], outputs: list[torch.Tensor], per_head: bool) -> tuple:
    """(G, C, ‖O‖²) in float64 from per-batch V, O of shape (B, H, N, d); G, C are (H|1, N, N)."""
    G = C = None
    o2 = 0.0
    for v, o in zip(values, outputs):
        v, o = v.double(), o.double()
        if v.shape[-3] != o.shape[-3]:                       # GQA value heads: repeat to the query heads
            v = v.repeat_interleave(o.shape[-3] // v.shape[-3], dim=-3)
        g = (v @ v.transpose(-1, -2)).sum(0)                 # (H, N, N)
        c = (o @ v.transpose(-1, -2)).sum(0)                 # (H, N, N)
        if not per_head:
            g, c = g.sum(0, keepdim=True), c.sum(0, keepdim=True)
        G, C = (g, c) if G is None else (G + g, C + c)
        o2 += o.pow(2).sum().item()
    return G, C, o2


def loss(A: torch.Tensor, G: torch.Tensor, C: torch.Tensor, o2: float) -> float:
    """f(A) / Σ‖O‖²: the relative squared error of A·V against O over the calibration set."""
    f = (A @ G * A).sum() - 2 * (A * C).sum() + o2
    return max(f.item(), 0.0) / max(o2, 1e-300)


def least_squares(G: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """A = C G⁺ per head: the minimum-norm least-squares solution, also when G is rank-deficient
    (fewer calibration values than tokens); pinv of a symmetric G works on every device."""
    return C @ torch.linalg.pinv(G, hermitian=True)


def project_rows_to_simplex(A: torch.Tensor) -> torch.Tensor:
    """Euclidean projection of every row onto {a ≥ 0, Σa = 1} (Duchi et al. 2008, Fig. 1)."""
    u, _ = A.sort(dim=-1, descending=True)
    css = u.cumsum(-1) - 1
    k = torch.arange(1, A.shape[-1] + 1, dtype=A.dtype, device=A.device)
    rho = ((u - css / k) > 0).sum(-1, keepdim=True)            # ≥ 1 always
    theta = css.gather(-1, rho - 1) / rho
    return (A - theta).clamp_min(0)


def distill(A: torch.Tensor, G: torch.Tensor, C: torch.Tensor, o2: float, steps: int) -> torch.Tensor:
    """FISTA on f over row-stochastic A, from A; returns the best iterate seen (A itself if none is better)."""
    L = 2 * torch.linalg.eigvalsh(G)[..., -1:].unsqueeze(-1).clamp_min(1e-300)   # (H|1, 1, 1)
    best, best_f = A, loss(A, G, C, o2)
    x, y, t = A, A, 1.0
    for _ in range(steps):
        x_next = project_rows_to_simplex(y - 2 * (y @ G - C) / L)
        t_next = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = x_next + (t - 1) / t_next * (x_next - x)
        x, t = x_next, t_next
        f = loss(x, G, C, o2)
        if f < best_f:
            best, best_f = x, f
    return best


def softplus_inverse(A: torch.Tensor) -> torch.Tensor:
    """W with softplus(W) = max(A, FLOOR): W = y + log(−expm1(−y)), stable for small and large y."""
    y = A.clamp_min(FLOOR)
    return y + torch.log(-torch.expm1(-y))


def row_normalize_softplus(W: torch.Tensor) -> torch.Tensor:
    """NormLin's mixing matrix: A = softplus(W) / Σ_j softplus(W)_ij (OLinear, arXiv:2505.08550)."""
    s = torch.nn.functional.softplus(W)
    return s / s.sum(-1, keepdim=True)
