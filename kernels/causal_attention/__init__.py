"""`rewriter::causal_attention`: SDPA with the model's causal(+padding) mask, taking the fused
is_causal path whenever that mask turns out to be the plain causal triangle.

A traced decoder (HF Llama and friends) builds its mask from the `attention_mask` input as a
[B, 1, T, T] tensor and hands it to SDPA, so the traced graph always runs masked attention —
while eager HF, seeing no padding, calls SDPA with is_causal=True, which on the CPU is about
2× faster at 2048 tokens (one SmolLM2 layer: 211 → 101 ms, benchmarks/results/
routed_models_smollm2.json). This op keeps the mask as an input and decides per call (cpu.py).
It is exact: both branches compute the same function on a plain causal mask.

    causal_attention(q [B,H,T,D], k [B,Hkv,T,D], v [B,Hkv,T,Dv], attn_mask [B|1,1|H,T,T] bool | float,
                     scale: float, enable_gqa: bool) -> [B,H,T,Dv] in q.dtype

Implementations: CPU and CUDA = cpu.py (PyTorch's fused SDPA kernels: FlashAttention on CUDA,
the flash CPU kernel on CPU; no Triton kernel of ours); fake = the output shape and layout (cpu.py); ONNX = onnx.py
(softmax attention with the mask; rows with no visible key give 0, as PyTorch's SDPA does);
reference.py = the fp32 ground truth.
"""
from __future__ import annotations

import torch

from rewriter.kernels import register_onnx

from .cpu import causal_attention_torch, plain_causal
from .onnx import causal_attention_onnx
from .reference import causal_attention_ref

__all__ = ["causal_attention", "causal_attention_ref", "causal_attention_torch", "plain_causal"]

_OP = "rewriter::causal_attention"


@torch.library.custom_op(_OP, mutates_args=())
def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor,
                     scale: float, enable_gqa: bool) -> torch.Tensor:
    return causal_attention_torch(q, k, v, attn_mask, scale, enable_gqa)


@causal_attention.register_fake
def _(q, k, v, attn_mask, scale, enable_gqa):
    b, h, t = q.shape[:3]
    return q.new_empty(b, t, h, v.shape[-1]).transpose(1, 2)      # cpu.py: the fused kernels' layout


register_onnx(torch.ops.rewriter.causal_attention.default, causal_attention_onnx)
