"""Why the block-sparse op has no decode form (kernels/decode.py)."""
NO_DECODE = {
    "block_sparse_attention": "a block-sparse table is computed for the whole sequence",
    "block_sparse_attention_lse": "a block-sparse table is computed for the whole sequence",
}
