"""FLOP formulas of `rewriter::block_sparse_attention(_lse)` (kernels/flops.py states the
convention): each query attends exactly to the keys of the blocks its row of the table lists,
W = block_table.shape[-1] blocks of `block_size` keys (the table's width: an upper bound when
rows hold fewer, as cpu.py computes every listed slot), plus the score scale and the mask.
BiFormer, arXiv:2303.08125; Routing Transformer, arXiv:2003.05997."""
from __future__ import annotations

from ..flops import softmax_attention


def block_sparse_attention(q, k, v, block_table, block_size, causal, key_mask, scale, **_):
    B, H, Tq, D = q
    keys = block_table[-1] * block_size
    return softmax_attention(B, H, Tq, keys, D, v[3]) + B * H * Tq * keys * 2


FLOPS = {"block_sparse_attention": block_sparse_attention,
         "block_sparse_attention_lse": block_sparse_attention}
