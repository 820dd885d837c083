"""Decode forms of causal linear attention and of the LoLCATs hybrid (kernels/decode.py):
linear_attention keeps (S, z) and adds one token per step (Katharopoulos et al., arXiv:2006.16236,
§3.4); hybrid_window_attention keeps (S, z) plus a ring buffer of the last W keys, values and φ(k),
folding the token that leaves the window into (S, z) (Zhang et al., LoLCATs, arXiv:2410.10254)."""
from __future__ import annotations

import operator

import torch

from ..decode import DecodeForm
from .cpu import hybrid_window_prefill_state, linear_attention_prefill_state

aten, R = torch.ops.aten, torch.ops.rewriter


def _items(call, node, n: int, start: int = 0) -> list:
    return [call(operator.getitem, node, i) for i in range(start, start + n)]


def _linear_prefill(call, a):
    return _items(call, call(linear_attention_prefill_state, a["fk"], a["v"], a["key_mask"]), 2)


def _linear_step(call, a, state, cache_position, token_valid):
    real = call(aten.view.default, token_valid, [-1, 1, 1, 1])
    fk = call(aten.where.ScalarOther, real, a["fk"], 0.0)     # a padded token adds nothing to (S, z)
    out = call(R.linear_attention_step.default, a["fq"], fk, a["v"], *state, a["eps"])
    return call(operator.getitem, out, 0), _items(call, out, 2, 1)


def _linear_refuse(a):
    if not a["causal"]:
        return ("non-causal linear attention sums over every key, future ones included; a decoder needs "
                "causal=True")
    return None


def _hybrid_prefill(call, a):
    st = call(hybrid_window_prefill_state, a["k"], a["v"], a["fk"], a["window"], a["key_mask"])
    return _items(call, st, 6)


def _hybrid_step(call, a, state, cache_position, token_valid):
    out = call(R.hybrid_window_step.default, a["q"], a["k"], a["v"], a["fq"], a["fk"], *state, cache_position,
               float(a["scale"]), a["mix"], token_valid, a["eps"])
    return call(operator.getitem, out, 0), _items(call, out, 6, 1)


DECODE = {
    "linear_attention": DecodeForm("linear", ("S", "z"), "key_mask", _linear_prefill, _linear_step,
                                   _linear_refuse),
    "hybrid_window_attention": DecodeForm("hybrid", ("S", "z", "k_win", "v_win", "fk_win", "win_valid"),
                                          "key_mask", _hybrid_prefill, _hybrid_step),
}
