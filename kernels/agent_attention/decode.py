"""Why agent attention has no decode form (kernels/decode.py)."""
NO_DECODE = {
    "agent_block": "pooled agents average queries from the whole sequence, so no step can be computed from the "
                   "past alone",
    "agent_attention": "agent attention reads agents pooled from the whole sequence",
}
