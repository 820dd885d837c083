"""Which keys are real: the one reading of an attention mask that every rule, every kernel and the
mask analyzer share.

An SDPA `attn_mask` (broadcastable to [B, H, Tq, Tk]) says for each (query, key) pair whether the
query may attend to the key, in one of two encodings:

    bool      True = attend (torch's SDPA convention; HF's sdpa masks)
    additive  added to the score: 0 attends, a large negative value masks. Models write −inf,
              torch.finfo(dtype).min (HF's eager masks), −1e9, or −10000 (the older BERT and GPT-2
              code: `(1 − mask) · −10000`).

An additive entry masks the pair iff it is ≤ MASKED = −1e4: softmax then gives the pair the weight
exp(−1e4 + s − max) with s − max the score's gap to the row maximum, and exp(−1e4) is exactly 0 in
every float dtype (the smallest positive float64 is e^−744.4; fp32 e^−103.3; fp16 e^−16.6), so such
a pair has no weight unless its score beats the row's best by 10⁴. The canonicalizer accepts a fill
value as a mask at the same threshold (rewriter.match), and the analyzer tells a padding mask from
a bias with it (rewriter.masks): one constant, so a mask that one of them accepts the rules read
the same way.

A key is real for a sample iff some query row, in some head, may attend to it (`key_valid`).
Padding keys are masked in every row. In a causal mask key j is masked for the rows i < j but
row j attends to it, so it counts as real: reducing over all rows, not reading one row, is what
makes causal+padding masks right for right- and left-padded batches alike, and for masks whose
padded query rows see nothing.
"""
from __future__ import annotations

import torch

MASKED = -1e4           # an additive mask entry at or below this masks its pair: exp(−1e4) underflows to 0


def is_masked(mask: torch.Tensor) -> torch.Tensor:
    """bool, the shape of `mask`: True where the pair gets no attention (bool mask: False; additive
    mask: ≤ MASKED, −inf included). Raises TypeError for other dtypes (SDPA takes none)."""
    if mask.dtype == torch.bool:
        return ~mask
    if not mask.is_floating_point():
        raise TypeError(f"is_masked: an attention mask is bool or floating point, got {mask.dtype}")
    return mask <= MASKED


def allowed(mask: torch.Tensor) -> torch.Tensor:
    """bool, the shape of `mask`: True where the query may attend to the key (`~is_masked`)."""
    if mask.dtype == torch.bool:
        return mask
    return ~is_masked(mask)


def key_valid(mask: torch.Tensor | None, batch=None) -> torch.Tensor | None:
    """bool [B, Tk], True = a real key, from an SDPA attn_mask broadcastable to [B, H, Tq, Tk]
    (fewer dims broadcast from the left, as in SDPA): key j is real for sample b iff some query row
    of some head may attend to it. `batch` (int or SymInt) expands a mask without a batch dim
    ([Tq, Tk], [1, 1, Tq, Tk]) to [batch, Tk]; without it the result is [B | 1, Tk]. None → None.
    Plain tensor code with no data-dependent shapes: a rewritten graph calls it as a node, and
    torch.export, torch.compile and the ONNX exporter trace through it."""
    if mask is None:
        return None
    a = allowed(mask)
    while a.dim() < 4:
        a = a.unsqueeze(0)
    real = a.any(dim=-2).any(dim=1)                                 # [B | 1, Tk]
    return real if batch is None else real.expand(batch, -1)

