"""Small reference transformers whose attention is written out in the styles real code uses.

nanoGPT-style (one file, a dataclass config, a shape comment on every reshape). Each model is a
full tiny transformer — token + position embeddings, N blocks (attention and MLP, each with a
residual add and a LayerNorm, pre- or post-norm), a final norm and an LM head — so the engine
can trace, canonicalize and analyze it like a real model. The attention itself is written in one
of REFERENCE_STYLES; every style computes the same function, softmax(q·kᵀ/√d + mask)·v
(Vaswani et al., "Attention Is All You Need", 2017), so canonicalization must turn each into
the same aten.scaled_dot_product_attention node.

    style               scores                          scale        mask
    matmul_div          q @ k.transpose(-2, -1)         / sqrt(d)    additive (finfo.min); causal: full(-inf).triu(1)
    bmm_folded          baddbmm / bmm on [B·H, T, D]    q * d^-0.5   additive via baddbmm's input
    einsum              einsum("bhqd,bhkd->bhqk")       k * d^-0.5   additive
    masked_fill_causal  q @ k.mT                        * d^-0.5     tril buffer, masked_fill(-inf)
    masked_fill_1e9     q @ k.permute(0, 1, 3, 2)       / sqrt(d)    masked_fill(-1e9); causal: tril computed
    manual_softmax      q @ k.transpose(-2, -1)         * d^-0.5     additive; exp(x - max) / sum
    fp32_softmax        q @ k.transpose(-2, -1)         in-graph √d  additive; .float() softmax .to(dtype)
    sdpa                F.scaled_dot_product_attention               bool keep-mask / is_causal
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

REFERENCE_STYLES = ("matmul_div", "bmm_folded", "einsum", "masked_fill_causal", "masked_fill_1e9",
                    "manual_softmax", "fp32_softmax", "sdpa")
_CAUSAL_BY_DEFAULT = {"masked_fill_causal"}


@dataclass
class ReferenceConfig:
    style: str = "matmul_div"
    causal: bool = False
    norm: str = "pre"          # "pre": x + f(norm(x)); "post": norm(x + f(x))
    vocab_size: int = 97
    block_size: int = 64       # longest sequence (size of the tril buffer)
    n_layer: int = 2
    n_head: int = 4
    n_embd: int = 64
    mlp_ratio: int = 4
    dropout: float = 0.0       # on the attention probabilities and the residual branches
    bias: bool = True

    def __post_init__(self):
        if self.style not in REFERENCE_STYLES:
            raise ValueError(f"ReferenceConfig.style must be one of {REFERENCE_STYLES}; got {self.style!r}")
        if self.norm not in ("pre", "post"):
            raise ValueError(f"ReferenceConfig.norm must be 'pre' or 'post'; got {self.norm!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"ReferenceConfig.n_embd={self.n_embd} is not divisible by n_head={self.n_head}")


class Attention(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.cfg = cfg
        self.n_head, self.head_dim = cfg.n_head, cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = nn.Dropout(cfg.dropout)
        if cfg.style == "masked_fill_causal":
            tril = torch.tril(torch.ones(cfg.block_size, cfg.block_size))
            self.register_buffer("bias", tril.view(1, 1, cfg.block_size, cfg.block_size), persistent=False)

    def forward(self, x: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
        """x: (B, T, C); pad: (B, T) with 1 = keep, 0 = padding, or None."""
        B, T, C = x.shape
        H, D = self.n_head, self.head_dim
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        v = self.v_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        y = getattr(self, "_" + self.cfg.style)(q, k, v, pad)  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)     # (B, T, C)
        return self.o_proj(y)

    # ---- the mask, in the two forms the styles use
    def _additive(self, pad, T, dtype):
        """(B|1, 1, T|1, T) float mask: 0 keep, finfo.min padding, -inf above the diagonal if causal."""
        m = None
        if pad is not None:
            m = (1.0 - pad[:, None, None, :].to(dtype)) * torch.finfo(dtype).min  # (B, 1, 1, T)
        if self.cfg.causal:
            c = torch.full((T, T), float("-inf"), dtype=dtype, device=pad.device if pad is not None else None)
            c = c.triu(1)                                                        # (T, T)
            m = c if m is None else m + c
        return m

    # ---- the styles
    def _matmul_div(self, q, k, v, pad):
        att = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)  # (B, H, T, T)
        m = self._additive(pad, q.size(-2), q.dtype)
        if m is not None:
            att = att + m
        att = self.attn_dropout(F.softmax(att, dim=-1))
        return att @ v

    def _bmm_folded(self, q, k, v, pad):
        B, H, T, D = q.shape
        q3 = (q * D ** -0.5).reshape(B * H, T, D)             # (B·H, T, D)
        k3 = k.reshape(B * H, T, D)                          # (B·H, T, D)
        v3 = v.reshape(B * H, T, D)                          # (B·H, T, D)
        m = self._additive(pad, T, q.dtype)
        if m is None:
            att = torch.bmm(q3, k3.transpose(1, 2))          # (B·H, T, T)
        else:
            m = m.expand(B, H, T, T).reshape(B * H, T, T)    # (B·H, T, T)
            att = torch.baddbmm(m, q3, k3.transpose(1, 2))   # (B·H, T, T)
        att = self.attn_dropout(att.softmax(dim=-1))
        return torch.bmm(att, v3).view(B, H, T, D)

    def _einsum(self, q, k, v, pad):
        att = torch.einsum("bhqd,bhkd->bhqk", q, k * self.head_dim ** -0.5)  # (B, H, T, T)
        m = self._additive(pad, q.size(-2), q.dtype)
        if m is not None:
            att = att + m
        att = self.attn_dropout(att.softmax(-1))
        return torch.einsum("bhqk,bhkd->bhqd", att, v)

    def _masked_fill_causal(self, q, k, v, pad):
        T = q.size(-2)
        att = (q @ k.mT) * (1.0 / math.sqrt(self.head_dim))  # (B, H, T, T)
        if self.cfg.causal:
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        if pad is not None:
            att = att.masked_fill(pad[:, None, None, :] == 0, float("-inf"))
        att = self.attn_dropout(F.softmax(att, dim=-1))
        return att @ v

    def _masked_fill_1e9(self, q, k, v, pad):
        T = q.size(-2)
        att = torch.matmul(q, k.permute(0, 1, 3, 2)) / math.sqrt(self.head_dim)  # (B, H, T, T)
        if pad is not None:
            att = att.masked_fill(pad[:, None, None, :] == 0, -1e9)
        if self.cfg.causal:
            keep = torch.tril(torch.ones(T, T, dtype=torch.bool, device=q.device))  # (T, T)
            att = att.masked_fill(~keep, -1e9)
        att = self.attn_dropout(torch.softmax(att, dim=-1))
        return torch.matmul(att, v)

    def _manual_softmax(self, q, k, v, pad):
        att = torch.matmul(q, k.transpose(-2, -1)) * self.head_dim ** -0.5  # (B, H, T, T)
        m = self._additive(pad, q.size(-2), q.dtype)
        if m is not None:
            att = att + m
        e = torch.exp(att - att.amax(dim=-1, keepdim=True))  # (B, H, T, T)
        att = self.attn_dropout(e / e.sum(dim=-1, keepdim=True))
        return att @ v

    def _fp32_softmax(self, q, k, v, pad):
        scale = torch.sqrt(torch.tensor(q.size(-1), dtype=torch.float32))
        att = (q @ k.transpose(-2, -1)) / scale.to(q.dtype)  # (B, H, T, T)
        m = self._additive(pad, q.size(-2), q.dtype)
        if m is not None:
            att = att + m
        att = F.softmax(att.float(), dim=-1).to(q.dtype)
        att = self.attn_dropout(att)
        return att @ v

    def _sdpa(self, q, k, v, pad):
        keep = None
        if pad is not None:
            keep = pad[:, None, None, :].bool()  # (B, 1, 1, T)
            if self.cfg.causal:
                T = q.size(-2)
                keep = keep & torch.ones(T, T, dtype=torch.bool, device=q.device).tril()  # (B, 1, T, T)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, is_causal=self.cfg.causal and keep is None,
                                              dropout_p=self.cfg.dropout if self.training else 0.0)


class MLP(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.n_embd, cfg.mlp_ratio * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.n_embd, cfg.n_embd, bias=cfg.bias)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.pre = cfg.norm == "pre"
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, pad):
        if self.pre:
            x = x + self.drop(self.attn(self.ln_1(x), pad))
            return x + self.drop(self.mlp(self.ln_2(x)))
        x = self.ln_1(x + self.drop(self.attn(x, pad)))
        return self.ln_2(x + self.drop(self.mlp(x)))


class ReferenceTransformer(nn.Module):
    """forward(input_ids (B, T), attention_mask (B, T) | None) -> logits (B, T, vocab)."""

    def __init__(self, cfg: ReferenceConfig):
        super().__init__()
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T = input_ids.shape
        pos = torch.arange(T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos)[None]  # (B, T, C)
        for block in self.blocks:
            x = block(x, attention_mask)
        return self.lm_head(self.ln_f(x))              # (B, T, vocab)


def build_reference(style: str, causal: bool | None = None, seed: int = 0, **overrides) -> ReferenceTransformer:
    """A reference model in eval mode with deterministic weights. `causal=None` takes the
    style's default (causal for "masked_fill_causal"); `overrides` set other config fields."""
    if style not in REFERENCE_STYLES:
        raise ValueError(f"unknown reference style {style!r}; choose one of {REFERENCE_STYLES}")
    cfg = ReferenceConfig(style=style, causal=style in _CAUSAL_BY_DEFAULT if causal is None else causal)
    cfg = replace(cfg, **overrides)
    torch.manual_seed(seed)
    return ReferenceTransformer(cfg).eval()
