"""Why routed attention has no decode form (kernels/decode.py)."""
NO_DECODE = {
    "block_routed_attention": "block routing selects key blocks from block summaries of the whole sequence per "
                              "query block; its decode form (per-block key summaries kept on append, a per-step "
                              "selection) is not built",
    "kmeans_routed_attention": "k-means routing sorts all tokens into balanced clusters per call; a new token has "
                               "no cluster without re-sorting the whole prefix",
}
