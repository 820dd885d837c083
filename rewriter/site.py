"""AttentionSite: what the analyzer learned about one canonical SDPA node.

Sites refer to graph nodes by *name*, never by object, so a site stays valid across graph
snapshots and restores (node names are kept by `Graph.graph_copy`). A site is frozen: what a rule
learns about it travels in its Candidate's facts, never back into the site.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

MASK_KINDS = ("none", "padding", "causal", "causal+padding", "arbitrary")


@dataclass(frozen=True)
class AttentionSite:
    index: int                      # position among the model's attention sites, in graph order
    node: str                       # name of the aten.scaled_dot_product_attention node
    module: str                     # module path from nn_module_stack, e.g. "encoder.layer.0.attention.self"
    layer: int | None               # its block's position among the model's blocks (rewriter.analyze); None: in none
    heads: int
    kv_heads: int                   # < heads for GQA / MQA
    head_dim: int
    scale: float                    # softmax scale actually used (default 1/sqrt(head_dim))
    mask: str                       # one of MASK_KINDS
    positional: str | None = None   # "rope" when a rotary embedding sits between projection and SDPA
    q_proj: str | None = None       # linear node names (the same node for a fused qkv projection)
    k_proj: str | None = None
    v_proj: str | None = None
    o_proj: str | None = None
    q_weight: str | None = None     # parameter qualified names in the traced module
    k_weight: str | None = None
    v_weight: str | None = None
    o_weight: str | None = None
    fused_qkv: bool = False
    residual_add: str | None = None  # the add that merges the attention branch into the residual stream
    residual_input: str | None = None  # the residual stream operand of that add (the branch's "x")
    norm: str = "none"              # "pre" | "post" | "none"
    norm_node: str | None = None    # the pre-norm feeding q/k/v, or the post-norm after the residual add
    branch_output: str | None = None  # the residual add's operand that carries the attention branch
    extra: dict = field(default_factory=dict, hash=False)   # notes, proj_input, gqa_repeat

    def summary(self) -> dict:
        """The stable keys the report publishes."""
        return {"index": self.index, "module": self.module, "heads": self.heads,
                "kv_heads": self.kv_heads, "head_dim": self.head_dim, "mask": self.mask,
                "norm": self.norm, "positional": self.positional, "layer": self.layer}

    def to_dict(self) -> dict:
        return asdict(self)
