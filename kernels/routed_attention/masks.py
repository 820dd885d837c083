"""Padding in routed attention: the real keys of a site's SDPA attn_mask, and the left alignment
that keeps block boundaries where they are when a sample runs alone.

Real keys: `key_mask_from_attn_mask` is rewriter.kernels.keymask.key_valid (the one definition:
bool masks True = attend, additive masks ≤ −1e4 = masked; key j is real iff some query row may
attend to it) at the batch size of the site's queries.

Alignment. Routing cuts the sequence into blocks of b tokens counted from position 0. A left-padded
sample (decoders pad on the left) would then have its tokens cut at other places than when it runs
alone, and be routed differently: its output would depend on what it was batched with. `alignment`
gives, per sample, the rotation of the token axis that puts its first real token at position 0;
the routed attention runs on the rotated tensors (`along_tokens`) and its output is rotated back.
The tokens a rotation wraps round to the end are the ones before the first real token, padding, so
the real tokens keep their order: the causal mask on real (query, key) pairs, and with it the
attention of every real row, is unchanged. Right-padded and unpadded samples rotate by 0.
"""
from __future__ import annotations

import torch

from ..keymask import key_valid

NEG_INF = float("-inf")


def key_mask_from_attn_mask(mask: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """bool [B, Tk] of real keys from an SDPA mask ([B|1, H|1, Tq|1, Tk], bool or additive), at
    q's batch size: `rewriter.kernels.keymask.key_valid`."""
    return key_valid(mask, q.shape[0])


def alignment(key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(to, back), int64 [B, T]: `along_tokens(x, to)` rotates sample b's tokens left by s_b, the
    position of its first real key (0 when it has none), so that token comes first;
    `along_tokens(y, back)` rotates the result back. to[b, i] = (i + s_b) mod T."""
    t = key_mask.shape[-1]
    pos = torch.arange(t, device=key_mask.device)
    first = torch.where(key_mask.bool(), pos, t).amin(-1, keepdim=True)                 # [B, 1]; t: none
    s = torch.where(first == t, 0, first)
    to, back = pos + s, pos - s
    return torch.where(to >= t, to - t, to), torch.where(back < 0, back + t, back)


def along_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, T] or [B, H, T, D] with its token axis reordered by index [B, T] (a gather)."""
    if x.dim() == 2:
        return x.gather(1, index)
    B, H, t, D = x.shape
    return x.gather(2, index[:, None, :, None].expand(B, H, t, D))
