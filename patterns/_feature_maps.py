"""Feature maps for linear attention, and attention transfer: fitting them to a layer's softmax.

Feature maps φ (applied per head to the SDPA's q and k; [B, H, T, d] -> [B, H, T, F]):

  elu1      φ(x) = elu(x) + 1                                   F = d
            Katharopoulos et al., "Transformers are RNNs", ICML 2020, arXiv:2006.16236, §3.2.1.
  hedgehog  φ(x) = [softmax(xW + b), softmax(−(xW + b))]        F = 2f, W ∈ ℝ^{H×d×f}, b ∈ ℝ^{H×f}
            Zhang et al., "The Hedgehog & the Porcupine", ICLR 2024, arXiv:2402.04347, §4.1
            (softmax over the feature dimension of both signs, W initialized to the identity), as
            used by LoLCATs (Zhang et al., arXiv:2410.10254, §3.1). q and k have separate maps.

Attention transfer (Hedgehog §4.2; LoLCATs §3.1, "attention transfer"): the model stays frozen;
for one layer, given its SDPA inputs q, k, v (and key padding) on calibration batches and its
softmax output y = softmax(s·qkᵀ)v, fit the feature maps' W, b (and, with a sliding window, the
per-head mixing weight) with Adam. The loss (`loss`):

  output   L_o = Σ ‖ŷ − y‖² / Σ ‖y‖² over real query rows, ŷ the rewritten attention's output.
           LoLCATs' MSE on the outputs (lr 1e-2); the relative form only rescales it per layer
           so one learning rate suits every layer.
  weights  L_w = mean over real query rows and heads of KL(a_i ‖ â_i), a_i = softmax(s·q_i Kᵀ)
           the true attention weights, â_i the rewritten attention's weights (A_ij = φ(q_i)·φ(k_j)
           normalized by its row sum; with a window, the hybrid's weights, reference.py). Hedgehog
           §4.2 trains φ with this soft-label cross-entropy Σ_j −a_ij log â_ij ("attention
           distillation"); KL differs from it by a's entropy, a constant, so the gradient is the
           same and a perfect fit reads 0.
  both     L_o + L_w (the default): LoLCATs sums the two the same way (a weighted cross-entropy
           plus a weighted MSE, arXiv:2410.10254 §3.1).
           A query row gives T weight targets instead of d output values, and the weights fit the
           pattern itself rather than only its product with this calibration set's v: the fit
           generalizes better. MiniLM, f=64, 1000 steps, embedding cosine on 48 validation
           sentences the fit never sees: output 0.9795, weights 0.9817, both 0.9817
           (benchmarks/bench_linear_models.py).

Minibatches: each sample's real rows are cut out (padding dropped), the sequences sorted by
length and regrouped into batches of about the calibration batches' mean real-token count, so a
step computes on real tokens instead of padding (MiniLM's sentences, padded to the ~100-token
paragraphs of their batches, are 70 % padding). Sequences are independent, so the loss is the
same function of the same rows. One batch per Adam step, in a seeded shuffled order.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rewriter.kernels.linear_attention import reference
from rewriter.kernels.linear_attention.cpu import hybrid_window_attention_torch, linear_attention_torch


# ---- the feature maps (eager; patterns/linear.py emits the same math as aten graph nodes) ---------

def elu1(x: Tensor) -> Tensor:
    """φ(x) = elu(x) + 1 (Katharopoulos et al. 2020): positive, training-free."""
    return F.elu(x) + 1


def hedgehog(x: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """φ(x) = [softmax(xW + b), softmax(−(xW + b))] over features; x [B, H, T, d], w [H, d, f], b [H, 1, f]."""
    z = torch.matmul(x, w) + b                                          # [B, H, T, f]
    return torch.stack([z, -z], -2).softmax(-1).flatten(-2)             # [B, H, T, 2f]: one softmax pass


def hedgehog_init(heads: int, head_dim: int, feature_dim: int, seed: int) -> tuple[Tensor, Tensor]:
    """W = identity ([d, f]; columns beyond d get N(0, 1/d) entries from a seeded generator so tied
    features can separate), b = 0. Deterministic in (shape, seed)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.zeros(heads, head_dim, feature_dim)
    n = min(head_dim, feature_dim)
    w[:, :n, :n] = torch.eye(n)
    if feature_dim > head_dim:
        w[:, :, head_dim:] = torch.randn(heads, head_dim, feature_dim - head_dim, generator=g) / math.sqrt(head_dim)
    return w, torch.zeros(heads, 1, feature_dim)


# ---- attention transfer --------------------------------------------------------------------------

@dataclass
class Sample:
    """One calibration batch at one attention site: the SDPA's inputs and its softmax output."""
    q: Tensor                  # [B, H, T, d]
    k: Tensor                  # [B, Hk, T, d]   (Hk = H when k arrives repeated)
    v: Tensor                  # [B, Hk, T, Dv]
    key_mask: Tensor | None    # [B, T] bool: rewriter.kernels.keymask.key_valid of the SDPA mask
    target: Tensor             # [B, H, T, Dv]  softmax attention output

    @property
    def query_valid(self) -> Tensor:
        """[B, T] bool: the real query rows (a self-attention's real keys), or all rows."""
        B, _, T, _ = self.q.shape
        if self.key_mask is not None and self.key_mask.shape[-1] == T:
            return self.key_mask
        return torch.ones(B, T, dtype=torch.bool)


def _features(s: Sample, params: dict[str, Tensor], feature_map: str) -> tuple[Tensor, Tensor]:
    if feature_map == "elu1":
        return elu1(s.q), elu1(s.k)
    return hedgehog(s.q, params["wq"], params["bq"]), hedgehog(s.k, params["wk"], params["bk"])


def predict(s: Sample, params: dict[str, Tensor], *, feature_map: str, causal: bool,
            window: int | None, scale: float, eps: float) -> Tensor:
    """The rewritten attention's output on one sample, with the PyTorch math the custom ops run."""
    fq, fk = _features(s, params, feature_map)
    if window is not None:
        return hybrid_window_attention_torch(s.q, s.k, s.v, fq, fk, window, scale, params["mix"],
                                             s.key_mask, eps)
    return linear_attention_torch(fq, fk, s.v, s.key_mask, causal, eps)


def relative_error(s: Sample, y: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ ‖ŷ − y‖², Σ ‖y‖²) over the real query rows of one sample."""
    rows = s.query_valid[:, None, :].expand(-1, y.shape[1], -1)     # [B, H, T]
    return (y - s.target).pow(2).sum(-1)[rows].sum(), s.target.pow(2).sum(-1)[rows].sum()


def _allowed(s: Sample, causal: bool) -> Tensor:
    """[B, 1, T, Tk] bool: the (query, key) pairs the softmax attends to."""
    T, Tk = s.q.shape[2], s.k.shape[2]
    allowed = torch.ones(1, 1, T, Tk, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    if s.key_mask is not None:
        allowed = allowed & s.key_mask[:, None, None, :]
    return allowed


def weights_and_output(s: Sample, params: dict[str, Tensor], *, feature_map: str, causal: bool,
                       window: int | None, scale: float, eps: float) -> tuple[Tensor, Tensor]:
    """(Σ over real rows of KL(a_i ‖ â_i), the rewritten output ŷ = Â v) on one sample, in the
    quadratic form of kernels/linear_attention/reference.py, whose weights it uses (cheap at
    calibration lengths)."""
    fq, fk = _features(s, params, feature_map)
    H = s.q.shape[1]
    allowed = _allowed(s, causal)                                                       # [B, 1, T, Tk]
    logits = (scale * (s.q @ reference.repeat_kv(s.k, H).transpose(-1, -2))).masked_fill(~allowed, float("-inf"))   # [B, H, T, Tk]
    log_a = logits.log_softmax(-1)
    if window is None:
        a_hat = reference.linear_attention_weights(fq, fk, s.key_mask, causal, eps)
    else:
        a_hat = reference.hybrid_window_weights(s.q, s.k, fq, fk, window, scale, params["mix"], s.key_mask, eps)
    a = log_a.exp()
    kl = (a * (log_a - a_hat.clamp_min(1e-30).log())).masked_fill(~allowed, 0.0).sum(-1)  # [B, H, T]
    rows = s.query_valid[:, None, :].expand_as(kl)
    return kl[rows].sum(), a_hat @ reference.repeat_kv(s.v, H)


def transfer_loss(s: Sample, params: dict[str, Tensor], loss: str, **how) -> Tensor:
    """The loss `loss` (module docstring) on one sample."""
    if loss == "output":
        num, den = relative_error(s, predict(s, params, **how))
        return num / den.clamp_min(1e-30)
    kl, y = weights_and_output(s, params, **how)
    L_w = kl / (s.query_valid.sum() * s.q.shape[1]).clamp_min(1)
    if loss == "weights":
        return L_w
    num, den = relative_error(s, y)
    return L_w + num / den.clamp_min(1e-30)


def minibatches(samples: list[Sample], seed: int) -> list[Sample]:
    """Length-bucketed minibatches of the samples' real rows (module docstring), in a seeded order.

    Samples without padding (key_mask None or all real) or with other keys than queries come back
    unchanged, in their order."""
    if any(s.key_mask is None or s.key_mask.shape[-1] != s.q.shape[2] for s in samples) or all(
            bool(s.key_mask.all()) for s in samples):
        return samples
    seqs = []
    for s in samples:
        for b in range(s.q.shape[0]):
            real = s.key_mask[b]
            seqs.append((s.q[b][:, real], s.k[b][:, real], s.v[b][:, real], s.target[b][:, real]))
    seqs.sort(key=lambda t: t[0].shape[1])
    budget = sum(t[0].shape[1] for t in seqs) / len(samples)         # mean real tokens per batch
    groups, cur = [], []
    for t in seqs:                    # sorted: the newest sequence is the longest of its group
        if cur and t[0].shape[1] * (len(cur) + 1) > budget:
            groups.append(cur)
            cur = []
        cur.append(t)
    groups.append(cur)
    out = []
    for g in groups:
        T = g[-1][0].shape[1]
        pad = lambda x: torch.nn.functional.pad(x, (0, 0, 0, T - x.shape[1]))        # [H, L, d] -> [H, T, d]
        q, k, v, y = (torch.stack([pad(t[i]) for t in g]) for i in range(4))
        key_mask = torch.arange(T)[None, :] < torch.tensor([t[0].shape[1] for t in g])[:, None]
        out.append(Sample(q, k, v, key_mask, y))
    order = torch.randperm(len(out), generator=torch.Generator().manual_seed(seed)).tolist()
    return [out[i] for i in order]


def evaluate(samples: list[Sample], params: dict[str, Tensor], **how) -> float:
    num = den = 0.0
    with torch.no_grad():
        for s in samples:
            n, d = relative_error(s, predict(s, params, **how))
            num, den = num + n.item(), den + d.item()
    return num / max(den, 1e-30)


def transfer(samples: list[Sample], *, feature_map: str, feature_dim: int, causal: bool,
             window: int | None, scale: float, eps: float, steps: int, lr: float, seed: int,
             loss: str = "output", label: str = "attention transfer") -> tuple[dict[str, Tensor], dict]:
    """Fit the feature maps (and the window's mixing weights) of one site; returns (params, info).

    params (fp32): hedgehog → wq [H, d, f], bq [H, 1, f], wk [Hk, d, f], bk [Hk, 1, f]; with a
    window → mix [H] (= exp θ, kept positive; θ = 0 at the start: both parts weighted equally).
    info: the output's relative error before and after (on the samples as given), steps, seconds."""
    if loss not in ("output", "weights", "both"):
        raise ValueError(f"{label}: loss must be 'output', 'weights' or 'both', got {loss!r}")
    if not samples:
        raise ValueError(f"{label}: no calibration samples to fit on")
    H, d = samples[0].q.shape[1], samples[0].q.shape[3]
    Hk = samples[0].k.shape[1]
    leaves: dict[str, Tensor] = {}
    if feature_map == "hedgehog":
        leaves["wq"], leaves["bq"] = hedgehog_init(H, d, feature_dim, seed)
        leaves["wk"], leaves["bk"] = hedgehog_init(Hk, d, feature_dim, seed + 1)
    if window is not None:
        leaves["theta"] = torch.zeros(H)
    how = dict(feature_map=feature_map, causal=causal, window=window, scale=scale, eps=eps)

    def params() -> dict[str, Tensor]:
        p = {k: v for k, v in leaves.items() if k != "theta"}
        if "theta" in leaves:
            p["mix"] = leaves["theta"].exp()
        return p

    t0 = time.perf_counter()
    before = evaluate(samples, params(), **how)
    if leaves and steps > 0:
        for v in leaves.values():
            v.requires_grad_(True)
        opt = torch.optim.Adam(list(leaves.values()), lr=lr)
        batches = minibatches(samples, seed)
        with _bar(label, steps) as advance:
            for i in range(steps):
                objective = transfer_loss(batches[i % len(batches)], params(), loss, **how)
                opt.zero_grad(set_to_none=True)
                objective.backward()
                opt.step()
                advance()
        for v in leaves.values():
            v.requires_grad_(False)
    out = {k: v.detach() for k, v in params().items()}
    after = evaluate(samples, out, **how) if leaves and steps > 0 else before
    return out, {"transfer_error_before": round(before, 5), "transfer_error_after": round(after, 5),
                 "steps": steps if leaves else 0, "transfer_seconds": round(time.perf_counter() - t0, 2)}


class _bar:
    """A transient rich progress bar (drawn only on a terminal; nests under optimize's own bar)."""

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total

    def __enter__(self):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                          TimeElapsedColumn(), transient=True)
        self.p.start()
        task = self.p.add_task(self.label, total=self.total)
        return lambda: self.p.advance(task)

    def __exit__(self, *exc):
        self.p.stop()
        return False
