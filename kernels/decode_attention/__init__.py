"""`rewriter::decode_attention`: exact softmax attention of T_q new tokens against a KV cache held
at kv-heads width (the decode / chunked-prefill step of a lowered decoder).

    decode_attention(q               [B, Hq, T_q, D]    the new tokens' queries (T_q ≥ 1; decode: 1)
                     k_cache         [B, Hkv, L, D]     keys of a static-size cache of L slots, the
                     v_cache         [B, Hkv, L, Dv]    new tokens' keys/values ALREADY written
                     cache_position  int [T_q] | [B, T_q]  the slot of each new token (HF's
                                                         `cache_position`; shared over the batch or per row)
                     key_valid       bool [B, L] | None  slots holding real keys: False for left
                                                         padding (None = every slot real)
                     scale           float | None        default D ** -0.5
                     ) -> [B, Hq, T_q, Dv] in q.dtype

Query i of row b at slot p = cache_position[(b,) i] sees slot j iff j ≤ p and key_valid[b, j]:
causality aligned bottom-right whatever L is, so a lowering pass can call the op once per site
with the static cache and the step's `cache_position`, after a functional write of the new k/v
(`k_cache.index_copy(2, cache_position, k_new)`). Slots after p (not yet written) are never
visible. GQA: query head h reads kv head h // (Hq / Hkv) by indexing, never a repeat_kv copy. A
query that sees no slot (a padded position with nothing valid before it) outputs 0, not NaN.
cache_position values must lie in [0, L). Slots the mask hides must hold finite values on the
CPU path (SDPA adds the mask to the scores; allocate caches with zeros); the Triton kernel never
loads them. Exact: every implementation is softmax attention; they differ in fp32 summation order.

Implementations: CPU (and any non-CUDA device) = cpu.py, one SDPA call with the G·T_q rows of a kv
head stacked, over the filled prefix of the cache; CUDA = triton.py, Lean Attention
(arXiv:2405.10480): stream-K split of the KV length over the grid + an exact log-sum-exp merge
(SDPA when a kv head has more than `triton.MAX_ROWS` query rows, a long prefill chunk); fake =
the output shape; ONNX = onnx.py (masked softmax, dynamic batch / length); reference.py = the
fp32 ground truth. No autograd: an inference op.
"""
from __future__ import annotations

import torch
from torch import Tensor

from rewriter.kernels import register_onnx

from .cpu import decode_attention_torch
from .onnx import decode_attention_onnx
from .reference import decode_attention_ref, visible_slots

try:
    from . import triton as _triton
except ImportError:            # triton is an optional dependency; CUDA then uses SDPA
    _triton = None

__all__ = ["decode_attention", "decode_attention_ref", "decode_attention_torch", "visible_slots"]

_OP = "rewriter::decode_attention"


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_position: Tensor,
           key_valid: Tensor | None) -> None:
    """Shapes and dtypes (real and fake impls, so torch.export reports them too)."""
    if q.dim() != 4 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"{_OP}: q, k_cache, v_cache must be 4-D [B, heads, time, head_dim]; got "
                         f"{tuple(q.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    B, H, Tq, D = q.shape
    Hkv, L = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"{_OP}: k_cache {tuple(k_cache.shape)} must be [B={B}, kv_heads, L, D={D}] "
                         f"for q {tuple(q.shape)}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"{_OP}: v_cache {tuple(v_cache.shape)} must match k_cache {tuple(k_cache.shape)} "
                         "in batch, kv heads and slots")
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"{_OP}: q has {H} heads, not a multiple of the {Hkv} kv heads of k_cache")
    if cache_position.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{_OP}: cache_position must be int64 (or int32); got {cache_position.dtype}")
    if cache_position.shape not in ((Tq,), (B, Tq)):
        raise ValueError(f"{_OP}: cache_position must be [T_q={Tq}] or [B={B}, T_q={Tq}]; "
                         f"got {tuple(cache_position.shape)}")
    if key_valid is not None:
        if key_valid.dtype != torch.bool:
            raise ValueError(f"{_OP}: key_valid must be bool (True = slot holds a real key); "
                             f"got {key_valid.dtype}")
        if tuple(key_valid.shape) != (B, L):
            raise ValueError(f"{_OP}: key_valid must be [B={B}, L={L}]; got {tuple(key_valid.shape)}")


def _check_positions(cache_position: Tensor, L: int) -> None:
    lo, hi = (int(x) for x in torch.aminmax(cache_position))
    if lo < 0 or hi >= L:
        raise ValueError(f"{_OP}: cache_position holds slots {lo}..{hi}, outside the cache's {L} slots")


@torch.library.custom_op(_OP, mutates_args=())
def _decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_position: Tensor,
                      key_valid: Tensor | None = None, scale: float | None = None) -> Tensor:
    _check(q, k_cache, v_cache, cache_position, key_valid)
    _check_positions(cache_position, k_cache.shape[2])
    return decode_attention_torch(q, k_cache, v_cache, cache_position, key_valid, scale)


@_decode_attention.register_kernel("cuda")
def _(q, k_cache, v_cache, cache_position, key_valid=None, scale=None):
    _check(q, k_cache, v_cache, cache_position, key_valid)
    if _triton is None or (q.shape[1] // k_cache.shape[1]) * q.shape[2] > _triton.MAX_ROWS:
        return decode_attention_torch(q, k_cache, v_cache, cache_position, key_valid, scale)
    return _triton.decode_attention_triton(q, k_cache, v_cache, cache_position, key_valid, scale)


@_decode_attention.register_fake
def _(q, k_cache, v_cache, cache_position, key_valid=None, scale=None):
    _check(q, k_cache, v_cache, cache_position, key_valid)
    return q.new_empty(q.shape[0], q.shape[1], q.shape[2], v_cache.shape[3])


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_position: Tensor,
                     key_valid: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Calls `rewriter::decode_attention` (module docstring)."""
    return torch.ops.rewriter.decode_attention(q, k_cache, v_cache, cache_position, key_valid,
                                               None if scale is None else float(scale))


register_onnx(torch.ops.rewriter.decode_attention.default, decode_attention_onnx)
