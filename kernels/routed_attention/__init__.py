"""Routed attention: the run-time routing of the block_routing and kmeans_routing rules, in
front of `rewriter::block_sparse_attention(_lse)`.

No custom op of its own. These are plain tensor functions with static Python hyperparameters,
so they sit in a rewritten graph as `call_function` nodes: fx runs them eagerly, and
torch.export, torch.compile and the ONNX exporter trace straight through them to aten ops plus
the `rewriter::` custom ops. Routing tables are therefore computed IN the graph, from the
site's own q/k at run time; the rules' `build` returns only calibrated constants. The attention
itself, and its reference, Triton kernel and ONNX translation, is block_sparse_attention's.

    masks.py           key_mask_from_attn_mask (the real keys, rewriter.kernels.keymask) and the left
                       alignment that keeps a padded sample's blocks where they are when it runs alone
    block_routing.py   BiFormer block routing: block scores, budgets, the table, block_routed_attention
    block_decode.py    its decode step: a KV cache + per-block min/max keys (Quest), the step's selection
                       (sinks, local block, top blocks per kv head within the budgets), gather + SDPA
    decode.py          the decode forms for generation (rewriter.kernels.decode; rewriter/lower.py)
    kmeans_routing.py  Routing Transformer: routing vectors, balanced clusters, kmeans_routed_attention
"""
from .block_routing import (block_means, block_routed_attention, block_scores, causal_row_permille,
                            default_sinks, pick_sample_rows, real_blocks, route_blocks, sample_positions,
                            select_blocks, uniform_rows)
from .block_decode import (block_routing_decode_ref, block_routing_prefill_state, block_routing_step,
                           block_summaries, decode_selection, gathered_attention, quest_bound)
from .kmeans_routing import kmeans_routed_attention, routing_vectors
from .masks import NEG_INF, alignment, along_tokens, key_mask_from_attn_mask

__all__ = ["NEG_INF", "alignment", "along_tokens", "block_means", "block_routed_attention",
           "block_routing_decode_ref", "block_routing_prefill_state", "block_routing_step", "block_scores",
           "block_summaries", "causal_row_permille", "decode_selection", "default_sinks",
           "gathered_attention", "key_mask_from_attn_mask", "kmeans_routed_attention", "pick_sample_rows",
           "quest_bound", "real_blocks", "route_blocks", "routing_vectors", "sample_positions",
           "select_blocks", "uniform_rows"]
