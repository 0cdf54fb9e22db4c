"""dma_attention: Dynamic Mask Attention as a differentiable PyTorch op.

torch >= 2.4: two custom ops, ``dma_torch::attention_forward`` and ``dma_torch::attention_backward``
(torch.library.custom_op), each with a fake (meta) implementation, the first with its autograd
registered (register_autograd), so torch.compile(fullgraph=True) traces through them. Older torch
(1.13 on Debian 12): the same two kernels behind a torch.autograd.Function.
"""
import math
from typing import List, Optional, Tuple

import torch

from . import _C

DMAError = _C.DMAError  # a ValueError: what the C++ side (dma::Error) reports

_CUDA_HEAD_DIMS = (32, 64, 128, 256)
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.bfloat16, torch.float16)
_check_cuda = True


def set_cuda_checks(enabled: bool) -> None:
    """On CUDA the forward checks, by default, that q, k, v are finite and that delta is finite
    and within the kernels' range (the device status word): two small reductions and one stream
    synchronisation per call. ``set_cuda_checks(False)`` turns that off (the CPU always checks)."""
    global _check_cuda
    _check_cuda = bool(enabled)


def _torch_version() -> Tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


HAS_CUSTOM_OP = _torch_version() >= (2, 4) and hasattr(torch.library, "custom_op")


# ---- argument checks ------------------------------------------------------------------------

def _check_args(q, k, v, w_dt, a, delta, window, causal, form, scale):
    """Raises TypeError/ValueError naming the argument. Returns Hd."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dimensions (B, H, L, D), got shape {tuple(t.shape)}")
    for name, t in (("w_dt", w_dt), ("a", a), ("delta", delta)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor or None, got {type(t).__name__}")
    if isinstance(window, bool) or not isinstance(window, int):
        raise TypeError(f"window: expected an int, got {type(window).__name__}")
    if window < 1:
        raise ValueError(f"window: must be >= 1, got {window}")
    if not isinstance(form, str) or form not in ("exp", "linear"):
        raise ValueError(f"form: expected 'exp' or 'linear', got {form!r}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale: must be finite and > 0, got {scale}")

    dev = q.device
    for name, t in (("k", k), ("v", v), ("w_dt", w_dt), ("a", a), ("delta", delta)):
        if t is not None and t.device != dev:
            raise ValueError(f"{name}: is on {t.device}, but q is on {dev} (all tensors on one device)")
    cuda = dev.type == "cuda"
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"q: device {dev} is not supported (cpu or cuda)")
    allowed = _CUDA_DTYPES if cuda else _CPU_DTYPES
    if q.dtype not in allowed:
        raise TypeError(f"q: dtype {q.dtype} is not supported on {dev.type} (expected one of "
                        f"{', '.join(str(d) for d in allowed)})")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}")
    for name, t in (("w_dt", w_dt), ("a", a), ("delta", delta)):
        if t is None:
            continue
        if cuda and not t.dtype.is_floating_point:
            raise TypeError(f"{name}: dtype {t.dtype} is not a floating type")
        if not cuda and t.dtype != q.dtype:
            raise TypeError(f"{name}: dtype {t.dtype} differs from q's {q.dtype} (on the CPU all "
                            "tensors have one dtype)")

    B, Hq, Lq, D = q.shape
    Bk, Hkv, Lk, Dk = k.shape
    if Bk != B:
        raise ValueError(f"k: batch {Bk} differs from q's {B}")
    if Dk != D:
        raise ValueError(f"k: head dim {Dk} differs from q's {D}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: shape {tuple(v.shape)} differs from k's {tuple(k.shape)}")
    if Hq % Hkv != 0:
        raise ValueError(f"k: Hq = {Hq} query heads is not a multiple of Hkv = {Hkv} kv heads")
    if causal and Lq > Lk:
        raise ValueError(f"q: causal attention needs Lq <= Lk, got Lq = {Lq}, Lk = {Lk}")
    if cuda and D not in _CUDA_HEAD_DIMS:
        raise ValueError(f"q: head dim {D} is not supported by the CUDA kernels (32, 64, 128 or 256)")

    if delta is not None:
        if w_dt is not None or a is not None:
            raise ValueError("delta: given together with w_dt/a; pass either w_dt and a, or delta")
        if delta.dim() != 3 or delta.shape[0] != B or delta.shape[2] != Lk:
            raise ValueError(f"delta: expected shape (B, Hd, Lk) = ({B}, Hd, {Lk}), got "
                             f"{tuple(delta.shape)}")
        Hd = delta.shape[1]
        name = "delta"
    else:
        if w_dt is None or a is None:
            raise ValueError(f"{'w_dt' if w_dt is None else 'a'}: missing; pass w_dt and a, or delta")
        if w_dt.dim() != 2 or w_dt.shape[1] != Hkv * D:
            raise ValueError(f"w_dt: expected shape (Hd, Hkv*D) = (Hd, {Hkv * D}), got "
                             f"{tuple(w_dt.shape)}")
        Hd = w_dt.shape[0]
        if tuple(a.shape) != (Hd,):
            raise ValueError(f"a: expected shape (Hd,) = ({Hd},), got {tuple(a.shape)}")
        name = "w_dt"
    if Hd != Hkv and Hd != Hq:
        raise ValueError(f"{name}: Hd = {Hd} heads of the dynamic weights; must be Hkv = {Hkv} "
                         f"or Hq = {Hq}")
    return Hd


# ---- the two kernels and their fake implementations -----------------------------------------

def _forward_impl(q, k, v, w_dt, a, delta, window, causal, form, scale, check):
    o, lse, d, ms = _C.forward(q.contiguous(), k.contiguous(), v.contiguous(), w_dt, a, delta,
                               window, causal, form, scale, check)
    return o, lse, d, ms


def _backward_impl(q, k, v, w_dt, a, delta, mask_state, o, lse, dout, window, causal, form, scale):
    return tuple(_C.backward(q, k, v, w_dt, a, delta, mask_state, o, lse, dout.contiguous(),
                             window, causal, form, scale))


def _out_dtype(q):
    return torch.float32 if q.device.type == "cuda" else q.dtype


def _forward_fake(q, k, v, w_dt, a, delta, window, causal, form, scale, check):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    Hd = w_dt.shape[0] if delta is None else delta.shape[1]
    dt = _out_dtype(q)
    o = q.new_empty((B, Hq, Lq, D), dtype=dt)
    lse = q.new_empty((B, Hq, Lq), dtype=dt)
    d = q.new_empty((B, Hd, Lk), dtype=dt)
    if q.device.type == "cuda":
        n = _C.cuda_mask_state_bytes(int(B), int(Hq), int(Hkv), int(Hd), int(Lq), int(Lk), int(D),
                                     window, causal, form, q.dtype == torch.float16)
        ms = q.new_empty((n,), dtype=torch.uint8)
    else:
        ms = q.new_empty((B, Hd, Lk), dtype=torch.int64)
    return o, lse, d, ms


def _backward_fake(q, k, v, w_dt, a, delta, mask_state, o, lse, dout, window, causal, form, scale):
    dt = _out_dtype(q)
    Hd, HkvD = delta.shape[1], k.shape[1] * k.shape[3]
    given = w_dt is None
    return (q.new_empty(q.shape, dtype=dt), q.new_empty(k.shape, dtype=dt),
            q.new_empty(v.shape, dtype=dt), q.new_empty(delta.shape, dtype=dt),
            q.new_empty((0,) if given else (Hd, HkvD), dtype=dt),
            q.new_empty((0 if given else Hd,), dtype=dt))


def _grads(saved, args, delta_dtype, grad_o, backward_fn):
    """The gradients of (q, k, v, w_dt, a, delta) from the saved tensors, in their dtypes."""
    q, k, v, w_dt, a, delta, ms, o, lse = saved
    if grad_o is None:
        grad_o = torch.zeros_like(o)
    dq, dk, dv, ddelta, dw_dt, da = backward_fn(q, k, v, w_dt, a, delta, ms, o, lse, grad_o, *args)
    given = w_dt is None
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            None if given else dw_dt.to(w_dt.dtype), None if given else da.to(a.dtype),
            ddelta.to(delta_dtype) if given else None)


if HAS_CUSTOM_OP:
    @torch.library.custom_op("dma_torch::attention_forward", mutates_args=())
    def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           w_dt: Optional[torch.Tensor], a: Optional[torch.Tensor],
                           delta: Optional[torch.Tensor], window: int, causal: bool, form: str,
                           scale: float, check: bool
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        o, lse, d, ms = _forward_impl(q, k, v, w_dt, a, delta, window, causal, form, scale, check)
        return o, lse, d, ms

    @torch.library.custom_op("dma_torch::attention_backward", mutates_args=())
    def _attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            w_dt: Optional[torch.Tensor], a: Optional[torch.Tensor],
                            delta: torch.Tensor, mask_state: torch.Tensor, o: torch.Tensor,
                            lse: torch.Tensor, dout: torch.Tensor, window: int, causal: bool,
                            form: str, scale: float) -> List[torch.Tensor]:
        return list(_backward_impl(q, k, v, w_dt, a, delta, mask_state, o, lse, dout, window,
                                   causal, form, scale))

    _attention_forward.register_fake(_forward_fake)
    @_attention_backward.register_fake
    def _(q, k, v, w_dt, a, delta, mask_state, o, lse, dout, window, causal, form, scale):
        return list(_backward_fake(q, k, v, w_dt, a, delta, mask_state, o, lse, dout, window,
                                   causal, form, scale))

    def _setup_context(ctx, inputs, output):
        q, k, v, w_dt, a, delta_in, window, causal, form, scale, _check = inputs
        o, lse, delta, ms = output
        ctx.save_for_backward(q, k, v, w_dt, a, delta, ms, o, lse)
        ctx.args = (window, causal, form, scale)
        ctx.delta_dtype = delta_in.dtype if delta_in is not None else None
        ctx.mark_non_differentiable(lse, delta, ms)

    def _autograd_backward(ctx, grad_o, grad_lse, grad_delta, grad_ms):
        # lse, delta and the mask state carry no gradient (see dma_attention).
        g = _grads(ctx.saved_tensors, ctx.args, ctx.delta_dtype, grad_o, _attention_backward)
        return g + (None,) * 5

    _attention_forward.register_autograd(_autograd_backward, setup_context=_setup_context)

    def _apply(*args):
        return _attention_forward(*args)
else:
    class _DMAFunction(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, w_dt, a, delta_in, window, causal, form, scale, check):
            o, lse, delta, ms = _forward_impl(q, k, v, w_dt, a, delta_in, window, causal, form,
                                              scale, check)
            ctx.save_for_backward(q, k, v, w_dt, a, delta, ms, o, lse)
            ctx.args = (window, causal, form, scale)
            ctx.delta_dtype = delta_in.dtype if delta_in is not None else None
            ctx.mark_non_differentiable(lse, delta, ms)
            return o, lse, delta, ms

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, grad_o, grad_lse, grad_delta, grad_ms):
            g = _grads(ctx.saved_tensors, ctx.args, ctx.delta_dtype, grad_o, _backward_impl)
            return g + (None,) * 5

    def _apply(*args):
        return _DMAFunction.apply(*args)


# ---- the public op ----------------------------------------------------------------------------

def dma_attention(q, k, v, w_dt=None, a=None, *, delta=None, window, causal=True, form="exp",
                  scale=None, return_lse=False):
    """Dynamic Mask Attention (Shi et al. 2025): each query attends to at most `window` keys, the
    ones with the largest dynamic weight delta, and delta is added to their logits.

    Args:
        q: (B, Hq, Lq, D) queries, head-major as torch's scaled_dot_product_attention takes them.
        k, v: (B, Hkv, Lk, D) keys and values; Hq % Hkv == 0 (GQA/MQA). Lq <= Lk when causal
            (queries aligned bottom-right, as in decoding); usually Lq == Lk.
        w_dt: (Hd, Hkv*D) weight of the dynamic weights, Hd = Hkv or Hq; with `a`, (Hd,):
            z = vflat . w_dt[h] where vflat[b, j] concatenates v[b, :, j, :] over the kv heads;
            delta = exp(a[h] * softplus(z)) (form "exp") or a[h] * softplus(z) (form "linear").
        delta: (B, Hd, Lk) the dynamic weights themselves, instead of w_dt and a.
        window: w >= 1, keys kept per query. Query i at position p_i (causal: i + Lk - Lq, else
            Lk - 1) keeps every key j <= p_i if there are at most w of them, else the w that rank
            highest by (delta descending, then index descending: on ties the most recent).
        causal: see window. form: "exp" or "linear". scale: softmax scale, default 1/sqrt(D).
        return_lse: also return lse (B, Hq, Lq), the natural-log softmax denominator.

    s_ij = scale * q_i . k_j + delta_j on kept keys, -inf elsewhere; o = softmax(s) v.
    Query head hq reads kv head hq // (Hq // Hkv) and delta head hq // (Hq // Hd).

    Devices: CPU tensors in float32 or float64 run the tiled CPU implementation; CUDA tensors in
    bfloat16 or float16 (head dim 32, 64, 128 or 256) run the CUDA kernels on the current stream (w_dt, a,
    delta in any floating dtype, used in float32). All tensors on one device; q, k, v (and on the
    CPU also w_dt, a, delta) of one dtype.

    Returns o (B, Hq, Lq, D) in q's dtype; with return_lse, (o, lse), lse float32 on CUDA and q's
    dtype on the CPU. Gradients flow to q, k, v (v's including the part through delta), w_dt and
    a, or to delta when it is given. The selection of the kept keys carries no gradient, and lse
    is returned without one (it is not differentiable here).

    Non-contiguous inputs are accepted (they are made contiguous, which copies them). The
    backward keeps the forward's delta and mask state (and, on CUDA, o in float32).

    Raises TypeError/ValueError naming the argument for bad input; DMAError (a ValueError) for
    what the C++ side finds, non-finite values included.
    """
    _check_args(q, k, v, w_dt, a, delta, window, causal, form, scale)
    check = _check_cuda if q.device.type == "cuda" else True
    o, lse, _, _ = _apply(q, k, v, w_dt, a, delta, int(window), bool(causal), form,
                          float(scale) if scale is not None else 0.0, check)
    o = o.to(q.dtype)
    return (o, lse) if return_lse else o
