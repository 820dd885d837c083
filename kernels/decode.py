"""Decode forms of our run-time ops, for the generation lowering (rewriter/lower.py).

The lowering knows the canonical attention itself (aten SDPA and rewriter::causal_attention become a
KV cache read by rewriter::decode_attention). Every other token-mixing op says here, next to the op,
how it decodes, so that a new op with a decode form needs no change to the engine. An op folder may
have a `decode.py` holding

    DECODE = {"<op>": DecodeForm(...)}       the op's state and its decode step
    NO_DECODE = {"<op or function>": "why"}  a token-mixing op or plain function with no decode form

A DecodeForm's builders add nodes to a step graph through `call(target, *args)` (one call_function
node per call). `a` holds the op node's arguments by name, defaults filled in, already mapped to
the step graph's values:

    prefill(call, a) -> [state nodes]           the state after the prompt, in `state`'s order
    step(call, a, state, cache_position, token_valid) -> (output node, [new state nodes])

`cache_position` is the int [1] slot of the new token and `token_valid` is a [B] bool, False where
a row's step holds padding. `refuse(a)`, if given, says why this one call of the op cannot be
decoded; None means it can.
"""
from __future__ import annotations

from dataclasses import dataclass
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


def form_of(op) -> DecodeForm | None:
    """The decode form of one of our ops (an OpOverload or 'rewriter::name'), or None."""
    name = op_name(op)
    return None if name is None else collect("decode", "DECODE").get(name)


def refusal(name: str) -> str | None:
    """Why the op or function `name` (its short name) has no decode form, or None if none is declared."""
    return collect("decode", "NO_DECODE").get(name)


def arguments(op, args: tuple, kwargs: dict) -> dict:
    """The arguments of one call of `op` by name, in its schema's order, defaults filled in."""
    out = {}
    for i, a in enumerate(op._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def slot(op, name: str) -> tuple[int, str]:
    """(position, keyword) of the argument `name` of `op`."""
    return next(i for i, a in enumerate(op._schema.arguments) if a.name == name), name
