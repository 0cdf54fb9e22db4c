"""The small language model of the MQAR benchmark, with one of three attentions.

    embedding -> n_layers x [x + attn(LN(x)); x + MLP(LN(x))] -> LN -> linear to the vocabulary

The attentions share everything but the attention itself: q/k/v/o projections without bias,
rotary embeddings on q and k (half-split, base 10000), n_heads heads of d_model // n_heads.

    dense  causal softmax attention: torch's scaled_dot_product_attention (is_causal=True)
    swa    sliding window: the same op with a banded boolean mask, each query attends to its w
           most recent keys (itself included): j <= i and i - j < w. Dense work, exact result.
    dma    the project's layer, dma_torch.DynamicMaskAttention (rope=True): each query keeps the w
           keys of largest delta among its prefix, delta = exp(a * softplus(v . w_dt)) (form
           "exp", the paper's) or a * softplus(v . w_dt) (form "linear"), and delta is added to
           the kept logits. With a = 0 it is exactly the swa layer in either form (docs/design.md
           §1.2, "all delta equal"), which test_mqar.py checks weight for weight.

swa and dma get the same w. On CUDA the model runs under bf16 autocast (the dma layer's kernels
take bf16 q, k, v; w_dt and a stay float32); on the CPU everything is float32.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

ATTENTIONS = ("dense", "swa", "dma")


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, base=10000.0):
    """x (B, H, L, D) -> the same, rotated by position; the dma layer's formula exactly."""
    D, L = x.shape[-1], x.shape[2]
    inv_freq = 1.0 / (base ** (torch.arange(0, D, 2, dtype=torch.float32, device=x.device) / D))
    freqs = torch.outer(torch.arange(L, dtype=torch.float32, device=x.device), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)                       # (L, D)
    return x * emb.cos().to(x.dtype) + rotate_half(x) * emb.sin().to(x.dtype)


def band_mask(L, window, device):
    """(L, L) bool, True where query i may attend to key j: j <= i and i - j < window."""
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    return (j <= i) & (i - j < window)


def softmax_attention(q, k, v, allowed):
    """q, k, v (B, H, L, D), allowed (L, L) bool -> (B, H, L, D). For torch without SDPA (< 2.0)."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])        # (B, H, L, L)
    s = s.masked_fill(~allowed, float("-inf"))
    if s.dtype in (torch.float16, torch.bfloat16):
        s = s.float()
    return torch.softmax(s, dim=-1).to(v.dtype) @ v


class SDPAAttention(nn.Module):
    """Causal self-attention, (B, L, d_model) -> (B, L, d_model): dense, or a sliding window of
    `window` keys (window=None: dense). Projections and rotary embeddings as in DynamicMaskAttention."""

    def __init__(self, d_model, n_heads, window=None):
        super().__init__()
        self.n_heads, self.head_dim, self.window = n_heads, d_model // n_heads, window
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, d_model, bias=False)
        self.v_proj = nn.Linear(d_model, d_model, bias=False)
        self.o_proj = nn.Linear(d_model, d_model, bias=False)
        self._mask = None  # the band, cached per (L, device)

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, L, D) each
        q, k = apply_rope(q), apply_rope(k)
        sdpa = getattr(F, "scaled_dot_product_attention", None)
        if self.window is None or self.window >= L:
            if sdpa is not None:
                o = sdpa(q, k, v, is_causal=True)
            else:
                o = softmax_attention(q, k, v, band_mask(L, L, x.device))
        else:
            if self._mask is None or self._mask.shape[0] != L or self._mask.device != x.device:
                self._mask = band_mask(L, self.window, x.device)
            o = sdpa(q, k, v, attn_mask=self._mask) if sdpa is not None else \
                softmax_attention(q, k, v, self._mask)
        return self.o_proj(o.transpose(1, 2).reshape(B, L, -1))


def make_attention(kind, d_model, n_heads, window, form="exp"):
    if kind == "dense":
        return SDPAAttention(d_model, n_heads)
    if kind == "swa":
        return SDPAAttention(d_model, n_heads, window)
    if kind == "dma":
        from dma_torch import DynamicMaskAttention  # the project's layer (needs the built package)
        return DynamicMaskAttention(d_model, n_heads, n_heads, window=window, rope=True, form=form)
    raise ValueError(f"attention: expected one of {ATTENTIONS}, got {kind!r}")


class Block(nn.Module):
    def __init__(self, attn, d_model, mlp_ratio):
        super().__init__()
        self.norm1, self.norm2, self.attn = nn.LayerNorm(d_model), nn.LayerNorm(d_model), attn
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, x):                  # x (B, L, d_model)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MQARModel(nn.Module):
    """tokens (B, L) int64 -> logits (B, L, vocab)."""

    def __init__(self, vocab_size, kind, d_model=64, n_layers=2, n_heads=1, window=32, mlp_ratio=4,
                 form="exp"):
        super().__init__()
        self.kind = kind
        self.embed = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(Block(make_attention(kind, d_model, n_heads, window, form),
                                          d_model, mlp_ratio) for _ in range(n_layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, tokens):
        x = self.embed(tokens)             # (B, L, d_model)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))     # (B, L, vocab)
