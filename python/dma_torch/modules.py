"""DynamicMaskAttention: a multi-head (GQA) attention layer whose attention is dma_attention."""
from typing import Optional, Tuple

import torch
from torch import nn

from .ops import _CUDA_DTYPES, dma_attention


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class DynamicMaskAttention(nn.Module):
    """Self-attention with a dynamic mask: (B, L, d_model) -> (B, L, d_model).

    q/k/v/o projections (Hq = n_heads query heads, Hkv = n_kv_heads kv heads of head_dim D,
    default d_model // n_heads), optional rotary embeddings on q and k (rope=True, half-split
    "rotate_half" form, base rope_base), and dma_attention with the dynamic weights
    delta = f(vflat . w_dt) formed from the values:
      w_dt   nn.Linear(Hkv*D -> Hd, bias=False), Hd = Hq if hd_per_query_head else Hkv
      a      nn.Parameter (Hd,), drawn from U(a_init) so that delta varies across keys from the
             start (a = 0 would make exp-form delta constant: a plain sliding window)
    form "exp" (delta = exp(a*softplus(z)), the paper's) or "linear" (a*softplus(z)).

    On CUDA the kernels take bfloat16/float16: q, k, v in another dtype (float32 parameters, say)
    are cast to cuda_dtype for the attention and the result cast back. The CUDA kernels need
    head_dim 32, 64, 128 or 256; the CPU takes any.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: Optional[int] = None,
                 window: int = 256, head_dim: Optional[int] = None,
                 hd_per_query_head: bool = False, form: str = "exp", rope: bool = False,
                 causal: bool = True, rope_base: float = 10000.0, bias: bool = False,
                 a_init: Tuple[float, float] = (0.1, 0.5), scale: Optional[float] = None,
                 cuda_dtype: torch.dtype = torch.bfloat16, device=None, dtype=None):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads < 1 or n_kv_heads < 1 or n_heads % n_kv_heads != 0:
            raise ValueError(f"n_kv_heads: n_heads = {n_heads} must be a positive multiple of "
                             f"n_kv_heads = {n_kv_heads}")
        head_dim = d_model // n_heads if head_dim is None else head_dim
        if head_dim < 1:
            raise ValueError(f"head_dim: must be >= 1, got {head_dim}")
        if rope and head_dim % 2:
            raise ValueError(f"head_dim: rope needs an even head dim, got {head_dim}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window: must be an int >= 1, got {window!r}")
        if form not in ("exp", "linear"):
            raise ValueError(f"form: expected 'exp' or 'linear', got {form!r}")
        if cuda_dtype not in _CUDA_DTYPES:
            raise ValueError(f"cuda_dtype: expected torch.bfloat16 or torch.float16, got {cuda_dtype}")
        kw = {"device": device, "dtype": dtype}
        self.d_model, self.n_heads, self.n_kv_heads, self.head_dim = d_model, n_heads, n_kv_heads, head_dim
        self.n_dyn_heads = n_heads if hd_per_query_head else n_kv_heads
        self.window, self.form, self.rope, self.causal = window, form, rope, causal
        self.scale, self.cuda_dtype, self.a_init = scale, cuda_dtype, tuple(a_init)
        self.q_proj = nn.Linear(d_model, n_heads * head_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(d_model, n_kv_heads * head_dim, bias=bias, **kw)
        self.o_proj = nn.Linear(n_heads * head_dim, d_model, bias=bias, **kw)
        self.w_dt = nn.Linear(n_kv_heads * head_dim, self.n_dyn_heads, bias=False, **kw)
        self.a = nn.Parameter(torch.empty(self.n_dyn_heads, **kw))
        if rope:
            # Kept as a plain float32 tensor, not a buffer: module.to(torch.bfloat16) would round
            # a buffer, and bf16 frequencies put the phases radians off at long positions.
            self.rope_base = float(rope_base)
        self.reset_dynamic_parameters()

    def reset_dynamic_parameters(self):
        with torch.no_grad():
            self.a.uniform_(*self.a_init)

    def extra_repr(self):
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, "
                f"head_dim={self.head_dim}, Hd={self.n_dyn_heads}, window={self.window}, "
                f"form={self.form!r}, rope={self.rope}, causal={self.causal}")

    def _apply_rope(self, x):  # x (B, H, L, D)
        D = x.shape[-1]
        inv_freq = 1.0 / (self.rope_base ** (torch.arange(0, D, 2, dtype=torch.float32,
                                                          device=x.device) / D))
        pos = torch.arange(x.shape[2], device=x.device, dtype=torch.float32)
        freqs = torch.outer(pos, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected shape (B, L, {self.d_model}), got {tuple(x.shape)}")
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, L, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.rope:
            q, k = self._apply_rope(q), self._apply_rope(k)
        out_dtype = q.dtype
        if q.is_cuda and q.dtype not in _CUDA_DTYPES:
            q, k, v = (t.to(self.cuda_dtype) for t in (q, k, v))
        o = dma_attention(q, k, v, self.w_dt.weight, self.a, window=self.window,
                          causal=self.causal, form=self.form, scale=self.scale)
        o = o.to(out_dtype).transpose(1, 2).reshape(B, L, self.n_heads * self.head_dim)
        return self.o_proj(o)
