"""rewriter::causal_attention against its fp32 reference: the fused is_causal branch on a plain
causal mask (bool or additive) and the masked branch on causal+padding masks, GQA, odd sizes,
a left-padded row that sees no key (0, not NaN)."""
import pytest
import torch

from rewriter.kernels.causal_attention import causal_attention, causal_attention_ref, plain_causal

# fp32 relative RMS error: only the summation order differs (fused kernel vs one softmax); ≈ 1e-7
TOL = 1e-5


def rel_rms(x, ref):
    return ((x.float() - ref.float()).pow(2).mean().sqrt() / ref.float().pow(2).mean().sqrt()).item()


def _mask(kind: str, B: int, T: int) -> torch.Tensor:
    tril = torch.ones(T, T, dtype=torch.bool).tril()
    if kind.startswith("plain"):
        m = tril.expand(B, 1, T, T)
    else:                                        # sample 1 left-padded: its first 5 rows see no key
        real = torch.ones(B, T, dtype=torch.bool)
        real[1, :5] = False
        m = tril & real[:, None, None, :]
    if kind.endswith("additive"):
        m = torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)
    return m


@pytest.mark.parametrize("kind", ["plain-bool", "plain-additive", "padded-bool", "padded-additive"])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2)], ids=["MHA", "GQA"])
def test_op_matches_reference(kind, H, Hkv):
    B, T, D = 2, 63, 60
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, h, T, D, generator=g) for h in (H, Hkv, Hkv))
    mask = _mask(kind, B, T)
    assert plain_causal(mask) == kind.startswith("plain")
    out = causal_attention(q, k, v, mask, D ** -0.5, Hkv != H)
    ref = causal_attention_ref(q, k, v, mask, D ** -0.5, Hkv != H)
    assert out.shape == (B, H, T, D) and not out.isnan().any()
    assert rel_rms(out, ref) <= TOL
    if kind == "padded-bool":                    # rows that see no key give 0, as SDPA does
        assert (out[1, :, :5] == 0).all() and (ref[1, :, :5] == 0).all()


def test_plain_verdict_follows_the_mask_not_the_cache():
    """The verdict is cached per mask tensor (one check per forward, not per layer): an in-place edit,
    another tensor, an expanded batch and an additive mask are each judged on their own."""
    T = 37
    m = torch.ones(3, 1, T, T, dtype=torch.bool).tril()
    assert plain_causal(m) and plain_causal(m)
    m[2, 0, 4, 30] = True                        # a key after the query: no longer the triangle
    assert not plain_causal(m)
    m[2, 0, 4, 30] = False
    assert plain_causal(m)
    other = m.clone()
    other[1, 0, T - 1, 0] = False                # the last row misses its first key (padding-like)
    assert not plain_causal(other) and plain_causal(m)
    row_swap = m.clone()                         # same count of True per slice, wrong places
    row_swap[0, 0, 0, 1], row_swap[0, 0, 5, 5] = True, False
    assert not plain_causal(row_swap)
    assert plain_causal(torch.ones(1, 1, T, T, dtype=torch.bool).tril().expand(4, 2, T, T))
    add = torch.zeros(1, 1, T, T).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -1e4)
    assert not plain_causal(add)                 # -1e4 masks in key_valid, but is not the dtype's lowest
    assert plain_causal(add.masked_fill(add < 0, torch.finfo(torch.float32).min))
