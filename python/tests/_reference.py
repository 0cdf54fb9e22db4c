"""An independent pure-PyTorch float64 implementation of DMA for the tests (no C++ involved).

Dense (Lq, Lk) matrices, the top-w selection as an explicit mask from pairwise rank comparisons
(key j' ranks above key j: larger delta, or equal delta and larger index), autograd for the
gradients. It is the semantics of dma_attention written the obvious way.
"""
import math

import torch


def dynamic_weights(v, w_dt, a, form):
    """delta (B, Hd, Lk): z = vflat . w_dt[h], vflat[b, j] = concat over kv heads of v[b, :, j]."""
    B, Hkv, Lk, D = v.shape
    vflat = v.permute(0, 2, 1, 3).reshape(B, Lk, Hkv * D)
    z = vflat @ w_dt.t()                                   # (B, Lk, Hd)
    sp = torch.logaddexp(z, torch.zeros_like(z))           # softplus, exact for every z
    u = a * sp
    delta = torch.exp(u) if form == "exp" else u
    return delta.transpose(1, 2)


def query_positions(Lq, Lk, causal):
    return torch.arange(Lq) + (Lk - Lq) if causal else torch.full((Lq,), Lk - 1)


def keep_mask(delta, Lq, window, causal):
    """(B, Hd, Lq, Lk) bool: query i keeps its allowed keys (j <= p_i) if at most w, else the w
    that rank highest. No gradient: the selection is a step function of delta."""
    d = delta.detach()
    Lk = d.shape[-1]
    idx = torch.arange(Lk)
    allowed = idx[None, :] <= query_positions(Lq, Lk, causal)[:, None]       # (Lq, Lk)
    dj_, dj = d[..., :, None], d[..., None, :]
    above = (dj_ > dj) | ((dj_ == dj) & (idx[:, None] > idx[None, :]))       # [.., j', j]
    # rank of key j for query i: how many of the query's allowed keys rank above it
    rank = torch.einsum("ik,bhkj->bhij", allowed.double(), above.double())
    return allowed & (rank < window)


def dma_reference(q, k, v, w_dt=None, a=None, delta=None, *, window, causal=True, form="exp",
                  scale=None, keep=None):
    """o, lse, delta, keep. keep (B, Hd, Lq, Lk) may be given to override the selection."""
    Lq = q.shape[2]
    if delta is None:
        delta = dynamic_weights(v, w_dt, a, form)
    if keep is None:
        keep = keep_mask(delta, Lq, window, causal)
    s = masked_logits(q, k, delta, keep, scale)
    lse = torch.logsumexp(s, dim=-1)
    o = torch.softmax(s, dim=-1) @ k_heads(v, q.shape[1])
    return o, lse, delta, keep


def k_heads(k, Hq):
    """k or v (B, Hkv, L, D) expanded to the Hq query heads: query head hq reads hq // (Hq // Hkv)."""
    return k[:, torch.arange(Hq) // (Hq // k.shape[1])]


def masked_logits(q, k, delta, keep, scale=None):
    """s (B, Hq, Lq, Lk) = scale q.k + delta on kept keys, -inf elsewhere."""
    Hq, D = q.shape[1], q.shape[3]
    dh = torch.arange(Hq) // (Hq // delta.shape[1])
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    s = scale * (q @ k_heads(k, Hq).transpose(-1, -2)) + delta[:, dh][:, :, None, :]
    return s.masked_fill(~keep[:, dh], float("-inf"))


def sliding_window_mask(Lq, Lk, window, causal):
    """(Lq, Lk) bool: the w most recent allowed keys (what DMA keeps when all deltas tie)."""
    idx = torch.arange(Lk)
    p = query_positions(Lq, Lk, causal)[:, None]
    return (idx[None, :] <= p) & (idx[None, :] > p - window)


def rel_l2(got, ref, floor=1e-3):
    """||got - ref|| / max(||ref||, floor * sqrt(n)), in float64."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    den = max(ref.norm().item(), floor * math.sqrt(max(ref.numel(), 1)))
    return (got - ref).norm().item() / den


def max_rel(got, ref, floor=1.0):
    """max |got - ref| / max(max |ref|, floor)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    if ref.numel() == 0:
        return 0.0
    return (got - ref).abs().max().item() / max(ref.abs().max().item(), floor)

