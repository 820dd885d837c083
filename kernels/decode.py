"""Decode forms of our run-time ops, for the generation lowering (rewriter/lower.py).

The lowering knows the canonical attention itself (aten SDPA and rewriter::causal_attention become a
KV cache read by rewriter::decode_attention). Every other token-mixing op says here, next to the op,
how it decodes, so that a new op with a decode form needs no change to the engine. An op folder may
have a `decode.py` holding

    DECODE = {"<op>": DecodeForm(...)}       the op's state and its decode step
    NO_DECODE = {"<op or function>": "why"}  a token-mixing op or plain function with no decode form

The "op" is a `rewriter::` custom op or a plain tensor function of this package that a rewritten
graph calls (block routing's `block_routed_attention`), named by its function name. A DecodeForm's
builders add nodes to a step graph through `call(target, *args)` (one call_function node per call).
`a` holds the op node's arguments by name, defaults filled in, already mapped to the step graph's
values:

    prefill(call, a) -> [state nodes]           the state after the prompt, in `state`'s order
    step(call, a, state, cache_position, token_valid) -> (output node, [new state nodes])

`cache_position` is the int [1] slot of the new token and `token_valid` is a [B] bool, False where
a row's step holds padding. `refuse(a)`, if given, says why this one call of the op cannot be
decoded; None means it can.

`caches` names the state tensors that hold one slot per token on axis 2 ([B, heads, L, D]), as a
KV cache does, each with the op argument [B, heads, T, D] whose tokens it holds. The lowering
zero-pads them to the cache length after the prefill (`Lowered.start`), counts their bytes per
token in the report, and calls `step(..., inplace=, key_valid=)`: `key_valid` [B, L] bool marks
the slots holding real tokens (the KV caches' mask), `inplace` is True in `decode_inplace`, whose
caller owns the state, so the step may write the new token into its caches in place (False: the
functional `decode`, which leaves its inputs as they were).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable

from .flops import op_name
from .tables import collect


@dataclass(frozen=True)
class DecodeForm:
    form: str                         # the state's kind, as the lowering reports it ("linear", "hybrid")
    state: tuple[str, ...]            # the state tensors' names, in the order prefill/step use
    key_mask: str                     # the op's key-mask argument (in the decode graph it is dead)
    prefill: Callable
    step: Callable
    refuse: Callable | None = None
    caches: dict[str, str] = field(default_factory=dict)   # {per-token state tensor: the argument it caches}


def _our_function(op) -> bool:
    """A plain Python function of this package (not an op): a rewritten graph's call_function target."""
    return inspect.isfunction(op) and op.__module__.startswith(__name__.rpartition(".")[0] + ".")


def form_of(op) -> DecodeForm | None:
    """The decode form of one of our ops (an OpOverload or 'rewriter::name') or of a plain tensor
    function of this package (by its name), or None."""
    name = op.__name__ if _our_function(op) else op_name(op)
    return None if name is None else collect("decode", "DECODE").get(name)


def refusal(name: str) -> str | None:
    """Why the op or function `name` (its short name) has no decode form, or None if none is declared."""
    return collect("decode", "NO_DECODE").get(name)


def _parameters(op) -> list[tuple[str, object]]:
    """(name, default or None) of each argument of `op`, in order: its schema's, or for a plain
    function its signature's."""
    if _our_function(op):
        return [(p.name, None if p.default is p.empty else p.default)
                for p in inspect.signature(op).parameters.values()]
    return [(a.name, a.default_value if a.has_default_value() else None) for a in op._schema.arguments]


def arguments(op, args: tuple, kwargs: dict) -> dict:
    """The arguments of one call of `op` by name, in its schema's order, defaults filled in."""
    out = {}
    for i, (name, default) in enumerate(_parameters(op)):
        if i < len(args):
            out[name] = args[i]
        elif name in kwargs:
            out[name] = kwargs[name]
        else:
            out[name] = default
    return out


def slot(op, name: str) -> tuple[int, str]:
    """(position, keyword) of the argument `name` of `op`."""
    return next(i for i, (n, _) in enumerate(_parameters(op)) if n == name), name
