"""Decode forms of routed attention (kernels/decode.py): block routing decodes over a KV cache plus
per-block key summaries (block_decode.py: Quest's min/max, arXiv:2406.10774, kept on append; each
step selects its sinks, local block and top blocks per kv head within the calibrated budgets and
attends to those only); k-means routing has none."""
from __future__ import annotations

import operator

from ..decode import DecodeForm
from .block_decode import block_routing_prefill_state, block_routing_step


def _block_prefill(call, a):
    st = call(block_routing_prefill_state, a["k"], a["v"], a["key_mask"], block_size=a["block_size"])
    return [call(operator.getitem, st, i) for i in range(4)]


def _block_step(call, a, state, cache_position, token_valid, *, inplace, key_valid):
    out = call(block_routing_step, a["q"], a["k"], a["v"], *state, cache_position, key_valid, a["head_rows"],
               block_size=a["block_size"], topk=a["topk"], keep_permille=a["keep_permille"],
               sinks=tuple(a["sinks"]), scale=float(a["scale"]), max_row_permille=a["max_row_permille"],
               inplace=inplace)
    return call(operator.getitem, out, 0), [call(operator.getitem, out, i) for i in range(1, 5)]


def _block_refuse(a):
    if not a["causal"]:
        return ("non-causal block routing lets a query block read later blocks; a decoder needs a causal "
                "site")
    return None


DECODE = {
    "block_routed_attention": DecodeForm("block_routed", ("k", "v", "k_min", "k_max"), "key_mask",
                                         _block_prefill, _block_step, _block_refuse,
                                         caches={"k": "k", "v": "v"}),
}

NO_DECODE = {
    "kmeans_routed_attention": "k-means routing sorts all tokens into balanced clusters per call; a new "
                               "token has no cluster without re-sorting the whole prefix",
}
