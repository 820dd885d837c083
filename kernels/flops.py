"""FLOP formulas of our run-time ops, for the whole-model cost model (`rewriter.cost`).

Each op folder that registers a `rewriter::<op>` custom op has a `flops.py` next to it with
`FLOPS = {"<op>": formula}`; `formula(op)` finds it by the op's name. A formula is called with
the op's own arguments, in the op's own order and names, where every tensor is replaced by its
shape (a tuple of sympy expressions: the graph's symbolic sizes) and every other argument is
passed as it is (SymInts as sympy expressions). It returns the op's FLOPs, an int or a sympy
expression: one multiply-add counts 2, one softmax score 5 (max, subtract, exp, sum, divide), an
elementwise step 1 per element. Data movement (gathers, pads, copies) counts 0.

Plain tensor functions of this package that a rewritten graph calls (`routed_attention`'s
`block_routed_attention`, `agent_block`, `keymask.key_valid`) need no formula: the cost model
runs them on symbolic fake tensors and counts the aten ops and custom ops they call.
"""
from __future__ import annotations

from typing import Callable

from .tables import collect

SOFTMAX = 5          # FLOPs per softmax score: max, subtract, exp, sum, divide


def softmax_attention(B, H, Tq, Tk, D, Dv, pairs=None):
    """Exact softmax attention over `pairs` (query, key) pairs per head (default Tq·Tk): QKᵀ
    (2·D per pair), the softmax (5 per pair) and PV (2·Dv per pair)."""
    pairs = Tq * Tk if pairs is None else pairs
    return B * H * pairs * (2 * D + 2 * Dv + SOFTMAX)


def causal_pairs(Tq, Tk):
    """(query, key) pairs a causal mask keeps, bottom-right aligned: Tq·Tk − Tq·(Tq − 1)/2."""
    return Tq * Tk - Tq * (Tq - 1) / 2


def formulas() -> dict[str, Callable]:
    """{op name: formula} from every op folder's flops.py."""
    return collect("flops", "FLOPS")


def op_name(op) -> str | None:
    """'linear_attention' for torch.ops.rewriter.linear_attention(.default) or 'rewriter::linear_attention';
    None for anything outside the `rewriter` namespace."""
    if isinstance(op, str):
        ns, _, name = op.partition("::")
        return name.split(".")[0] if ns == "rewriter" and name else None
    schema = getattr(op, "_schema", None)
    if schema is None:
        return None
    ns, _, name = schema.name.partition("::")
    return name if ns == "rewriter" else None


def formula(op) -> Callable | None:
    """The FLOP formula of one of our ops (an OpOverload, packet or 'rewriter::name'), or None."""
    name = op_name(op)
    return None if name is None else formulas().get(name)
