"""DMACache: token-by-token decoding with the bounded, exact key/value cache.

The keys a query keeps nest from one position to the next and an evicted key never returns, so a
cache of ``window`` entries per (sequence, delta head) that inserts each new token and evicts its
lowest-ranked entry (smallest delta; on a tie the oldest) gives exactly the rows of the full
causal forward, whatever the context length (docs/design.md §2.10 and §4 "Decode").

Two implementations behind one class, picked by the cache's dtype:

- float32 / float64: CPU tensors, the cache of core/ (core/include/dma/decode.hpp), computed in
  that dtype;
- bfloat16 / float16: CUDA tensors, the GPU cache and step of cuda/ (cuda/include/dma/
  cuda_decode.hpp) on torch's current stream, with memory from torch's allocator; the cache lives
  on the device of the first tensors it is given (or ``device=``). Every reduction accumulates in
  float32; o comes back in the cache's dtype and lse in float32, as dma_attention's on CUDA.

Decoding is inference: inputs are detached, outputs carry no gradient.
"""
import math
import operator
import threading

import torch

from . import _C
from . import ops

DMAError = _C.DMAError
_CPU_DTYPES = (torch.float32, torch.float64)
_CUDA_DTYPES = (torch.bfloat16, torch.float16)
_CUDA_HEAD_DIMS = (64, 128)


def _as_int(name, x, lowest):
    if isinstance(x, bool):
        raise TypeError(f"{name}: expected an int, got bool")
    try:
        x = operator.index(x)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}") from None
    if x < lowest:
        raise ValueError(f"{name}: must be >= {lowest}, got {x}")
    return x


class _UnboundCudaCache:
    """A CUDA cache before its memory exists (it is allocated on the device of the first tensors
    given to prefill or step): every sequence empty, only the declared maxima to remember."""

    def __init__(self, batch, max_length):
        self._max = [max_length] * batch

    def length(self):
        return [0] * len(self._max)

    def max_length(self):
        return list(self._max)

    def positions(self, b, hd):
        return []

    def deltas(self, b, hd):
        return []

    def reset(self, b, max_length):
        if max_length >= 0:
            self._max[b] = max_length


class DMACache:
    """The decode cache of B sequences for one DMA attention layer.

    Args:
        batch: B, the sequences (each has its own length).
        n_heads, n_kv_heads, head_dim: Hq, Hkv (Hq % Hkv == 0), D (64 or 128 on CUDA).
        window: w >= 1, the keys each query keeps and the entries held per (sequence, delta head).
        n_dyn_heads: Hd, the heads of the dynamic weights, Hkv (default) or Hq.
        form: "exp" or "linear"; scale: softmax scale, default 1/sqrt(D).
        max_length: the tokens a sequence may hold (prompt + generated), 0 = no limit.
        dtype: of the entries and of q, k, v: torch.float32 or torch.float64 (a CPU cache, CPU
            tensors), torch.bfloat16 or torch.float16 (a CUDA cache, CUDA tensors).
        device: a CUDA cache's device; None: that of the first tensors it is given (its memory
            is allocated then). A CPU cache takes None or "cpu".

    Use: ``prefill(b, k, v, w_dt, a)`` once per sequence (its prompt), then ``step(q, k, v,
    w_dt, a)`` for one new token of every (active) sequence; w_dt (Hd, Hkv*D) and a (Hd,) as in
    dma_attention, or ``delta=`` given instead. Row p of the outputs equals row p of
    ``dma_attention(..., causal=True)`` over positions 0..p. On the CPU, w_dt, a and delta have
    the cache's dtype; on CUDA any floating dtype (used in float32).

    Bad arguments raise TypeError/ValueError naming the argument; what the C++ side finds
    (non-finite values, an overflow) raises DMAError, a ValueError. A call that raises leaves
    the cache as it was, except on CUDA when the delta a step computes is not finite (or too
    large): the kernels have run by then, so every sequence of that step must be reset.
    On CUDA the checks of non-finite values cost two synchronisations per call;
    ``dma_torch.set_cuda_checks(False)`` turns them off (a bad delta then gives o = lse = 0).
    """

    def __init__(self, batch, n_heads, n_kv_heads, head_dim, window, *, n_dyn_heads=None,
                 form="exp", scale=None, max_length=0, dtype=torch.float32, device=None):
        self.batch = _as_int("batch", batch, 1)
        self.n_heads = _as_int("n_heads", n_heads, 1)
        self.n_kv_heads = _as_int("n_kv_heads", n_kv_heads, 1)
        self.head_dim = _as_int("head_dim", head_dim, 1)
        self.window = _as_int("window", window, 1)
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"n_kv_heads: n_heads = {self.n_heads} is not a multiple of "
                             f"n_kv_heads = {self.n_kv_heads}")
        hd = self.n_kv_heads if n_dyn_heads is None else _as_int("n_dyn_heads", n_dyn_heads, 1)
        if hd not in (self.n_kv_heads, self.n_heads):
            raise ValueError(f"n_dyn_heads: {hd}; must be n_kv_heads = {self.n_kv_heads} or "
                             f"n_heads = {self.n_heads}")
        self.n_dyn_heads = hd
        if form not in ("exp", "linear"):
            raise ValueError(f"form: expected 'exp' or 'linear', got {form!r}")
        self.form = form
        if scale is not None:
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
            if not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"scale: must be finite and > 0, got {scale}")
        self.scale = 1.0 / math.sqrt(self.head_dim) if scale is None else float(scale)
        max_length = _as_int("max_length", max_length, 0)
        if dtype not in _CPU_DTYPES + _CUDA_DTYPES:
            raise TypeError(f"dtype: {dtype} is not supported (a CPU cache: torch.float32 or "
                            "torch.float64; a CUDA cache: torch.bfloat16 or torch.float16)")
        self.dtype = dtype
        self._cuda = dtype in _CUDA_DTYPES
        if device is not None:
            try:
                device = torch.device(device)
            except (TypeError, RuntimeError):
                raise TypeError(f"device: expected a torch.device or a device string, got "
                                f"{device!r}") from None
        if not self._cuda:
            if device is not None and device.type != "cpu":
                raise ValueError(f"device: {device}; a {dtype} cache is a CPU cache (a CUDA "
                                 "cache: dtype torch.bfloat16 or torch.float16)")
            self._device = torch.device("cpu")
            self._c = _C.DecodeCache(self.batch, self.n_heads, self.n_kv_heads, hd,
                                     self.head_dim, self.window, form, self.scale, max_length,
                                     dtype == torch.float64)
            return
        if self.head_dim not in _CUDA_HEAD_DIMS:
            raise ValueError(f"head_dim: {self.head_dim} is not supported by the CUDA decode "
                             f"step (64 or 128)")
        if device is not None and device.type != "cuda":
            raise ValueError(f"device: {device}; a {dtype} cache is a CUDA cache (a CPU cache: "
                             "dtype torch.float32 or torch.float64)")
        self._device = None  # bound by _bind, on the first prefill or step (or now)
        self._bind_lock = threading.Lock()
        self._c = _UnboundCudaCache(self.batch, max_length)
        if device is not None:
            self._bind(device, f"device: {device}")

    # ---- state ----------------------------------------------------------------------------

    @property
    def device(self):
        """Where the cache lives: cpu, a cuda device, or None (a CUDA cache not yet used)."""
        return self._device

    @property
    def length(self):
        """Tokens seen so far per sequence: the position of each one's next token."""
        return self._c.length()

    @property
    def max_length(self):
        """The declared maximum per sequence (0 = none)."""
        return self._c.max_length()

    def positions(self, b, h):
        """The positions cached for sequence b and delta head h, increasing (at most window)."""
        return self._c.positions(self._sequence("b", b), self._head(h))

    def deltas(self, b, h):
        """The dynamic weights of those entries, in the same order."""
        return self._c.deltas(self._sequence("b", b), self._head(h))

    def reset(self, b, *, max_length=None):
        """Empties sequence b for a new prompt; max_length, when given, is its new maximum."""
        m = -1 if max_length is None else _as_int("max_length", max_length, 0)
        self._c.reset(self._sequence("b", b), m)

    def __repr__(self):
        return (f"DMACache(batch={self.batch}, n_heads={self.n_heads}, n_kv_heads="
                f"{self.n_kv_heads}, head_dim={self.head_dim}, window={self.window}, "
                f"n_dyn_heads={self.n_dyn_heads}, form={self.form!r}, scale={self.scale:g}, "
                f"dtype={self.dtype}, device={self._device}, length={self.length})")

    # ---- prefill and step -----------------------------------------------------------------

    def prefill(self, b, k, v, w_dt=None, a=None, *, q=None, delta=None):
        """Fills the empty sequence b with its prompt of P tokens (P may be 0).

        k, v: (Hkv, P, D); q: (Hq, P, D), optional; delta: (Hd, P) instead of w_dt and a.
        Keeps the keys the prompt's last query keeps. Returns (o (Hq, P, D), lse (Hq, P)), the
        prompt's full causal forward, when q is given, else None.
        """
        b = self._sequence("b", b)
        dev = self._call_device(k)
        k = self._tensor("k", k, 3, dev)
        P = k.shape[1]
        H, Hkv, Hd, D = self.n_heads, self.n_kv_heads, self.n_dyn_heads, self.head_dim
        self._shape("k", k, (Hkv, P, D))
        v = self._shape("v", self._tensor("v", v, 3, dev), (Hkv, P, D))
        if q is not None:
            q = self._shape("q", self._tensor("q", q, 3, dev), (H, P, D))
        w_dt, a, delta = self._weights(w_dt, a, delta, (Hd, P), dev)
        held = self._c.length()[b]
        if held != 0:
            raise ValueError(f"b: sequence {b} already holds {held} tokens; reset({b}) first")
        limit = self._c.max_length()[b]
        if 0 < limit < P:
            raise ValueError(f"k: the prompt of sequence {b} has {P} tokens, more than its "
                             f"max_length = {limit}")
        if not self._cuda:
            _, _, o, lse = self._c.prefill(b, k, v, w_dt, a, q, delta)
            return None if q is None else (o, lse)
        self._bind(dev, "k: is a CUDA tensor")
        _, _, o, lse = self._c.prefill(b, k, v, w_dt, a, q, delta, ops._check_cuda)
        return None if q is None else (o.to(self.dtype), lse)

    def step(self, q, k, v, w_dt=None, a=None, *, active=None, delta=None):
        """One new token for every active sequence, each at its own next position.

        q: (B, Hq, D); k, v: (B, Hkv, D); delta: (B, Hd) instead of w_dt and a; active: B bools
        (a bool/int tensor or a sequence), default all. Rows of inactive sequences are not read
        (they may hold anything) and come back as 0. Returns (o (B, Hq, D), lse (B, Hq)): in the
        cache's dtype on the CPU; on CUDA o in the cache's dtype and lse in float32.
        """
        B, H, Hkv, D = self.batch, self.n_heads, self.n_kv_heads, self.head_dim
        dev = self._call_device(q)
        q = self._shape("q", self._tensor("q", q, 3, dev), (B, H, D))
        k = self._shape("k", self._tensor("k", k, 3, dev), (B, Hkv, D))
        v = self._shape("v", self._tensor("v", v, 3, dev), (B, Hkv, D))
        w_dt, a, delta = self._weights(w_dt, a, delta, (B, self.n_dyn_heads), dev)
        act = self._active(active)
        length, limit = self._c.length(), self._c.max_length()
        for b in range(B):
            if (act is None or act[b]) and 0 < limit[b] <= length[b]:
                raise ValueError(f"active: sequence {b} is finished (it holds its max_length = "
                                 f"{limit[b]} tokens); leave it out of active or reset({b})")
        if not self._cuda:
            o, lse, _, _, _ = self._c.step(q, k, v, w_dt, a, act, delta)
            return o, lse
        self._bind(dev, "q: is a CUDA tensor")
        o, lse, _, _, _ = self._c.step(q, k, v, w_dt, a, act, delta, ops._check_cuda)
        return o.to(self.dtype), lse

    # ---- the CUDA cache's memory ----------------------------------------------------------

    def _call_device(self, first):
        """The device a call's tensors must be on: the cache's; for a CUDA cache not yet bound,
        that of the call's first tensor when it is a CUDA tensor (else None: _tensor says why)."""
        if self._device is not None:
            return self._device
        if isinstance(first, torch.Tensor) and first.device.type == "cuda":
            return first.device
        return None

    def _bind(self, device, what):
        """Allocates a CUDA cache's memory on device, once. what: why CUDA, for the error."""
        with self._bind_lock:
            if self._device is not None:
                return
            if not _C.build_info()["cuda"]:
                raise DMAError(f"{what}, but dma_torch was built without CUDA (rebuild with "
                               "nvcc and a CUDA build of torch present)")
            index = device.index if device.index is not None else torch.cuda.current_device()
            pending = self._c.max_length()
            c = _C.CudaDecodeCache(self.batch, self.n_heads, self.n_kv_heads, self.n_dyn_heads,
                                   self.head_dim, self.window, self.form, self.scale, 0,
                                   self.dtype == torch.float16, index)
            for b, m in enumerate(pending):
                c.reset(b, m)
            self._c = c
            self._device = torch.device("cuda", index)

    # ---- argument checks ------------------------------------------------------------------

    def _sequence(self, name, b):
        b = _as_int(name, b, 0)
        if b >= self.batch:
            raise ValueError(f"{name}: sequence {b} does not exist (batch = {self.batch})")
        return b

    def _head(self, h):
        h = _as_int("h", h, 0)
        if h >= self.n_dyn_heads:
            raise ValueError(f"h: delta head {h} does not exist (n_dyn_heads = {self.n_dyn_heads})")
        return h

    def _tensor(self, name, t, dim, device, floating=False):
        """t detached, after its type, device, dtype and number of dimensions. device: where it
        must be (None: a CUDA cache not yet bound, and the call's first tensor is not on CUDA).
        floating: w_dt, a or delta, which on CUDA may have any floating dtype."""
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if self._cuda:
            if t.device.type != "cuda":
                raise ValueError(f"{name}: is on {t.device}; this {self.dtype} cache takes CUDA "
                                 "tensors (a CPU cache: dtype torch.float32 or torch.float64)")
            if device is not None and t.device != device:
                raise ValueError(f"{name}: is on {t.device}, but the cache is on {device} (all "
                                 "tensors on one device)")
            if floating:
                if not t.dtype.is_floating_point:
                    raise TypeError(f"{name}: dtype {t.dtype} is not a floating type")
            elif t.dtype != self.dtype:
                raise TypeError(f"{name}: dtype {t.dtype} differs from the cache's {self.dtype}")
        else:
            if t.device.type == "cuda":
                raise ValueError(f"{name}: is a CUDA tensor; this {self.dtype} cache is a CPU "
                                 "cache (for CUDA tensors: dtype torch.bfloat16 or torch.float16)")
            if t.device.type != "cpu":
                raise ValueError(f"{name}: is on {t.device}; the cache takes CPU tensors")
            if t.dtype != self.dtype:
                raise TypeError(f"{name}: dtype {t.dtype} differs from the cache's {self.dtype}")
        if t.dim() != dim:
            raise ValueError(f"{name}: expected {dim} dimensions, got shape {tuple(t.shape)}")
        return t.detach()

    @staticmethod
    def _shape(name, t, shape):
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name}: expected shape {tuple(shape)}, got {tuple(t.shape)}")
        return t

    def _weights(self, w_dt, a, delta, delta_shape, device):
        """(w_dt, a, delta) checked: either w_dt (Hd, Hkv*D) and a (Hd,), or delta."""
        if delta is not None:
            if w_dt is not None or a is not None:
                raise ValueError("delta: given together with w_dt/a; pass either w_dt and a, "
                                 "or delta")
            return None, None, self._shape("delta", self._tensor("delta", delta, 2, device, True),
                                           delta_shape)
        if w_dt is None or a is None:
            raise ValueError(f"{'w_dt' if w_dt is None else 'a'}: missing; pass w_dt and a, or "
                             "delta")
        Hd = self.n_dyn_heads
        w_dt = self._shape("w_dt", self._tensor("w_dt", w_dt, 2, device, True),
                           (Hd, self.n_kv_heads * self.head_dim))
        return w_dt, self._shape("a", self._tensor("a", a, 1, device, True), (Hd,)), None

    def _active(self, active):
        """None, or B ints (0/1) from a bool/int tensor or sequence."""
        if active is None:
            return None
        if isinstance(active, torch.Tensor):
            t = active.detach()
        else:
            try:
                t = torch.as_tensor(active)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"active: expected {self.batch} bools, got "
                                f"{type(active).__name__}") from None
        if t.dtype.is_floating_point or t.dtype.is_complex:
            raise TypeError(f"active: expected bools or ints, got dtype {t.dtype}")
        if tuple(t.shape) != (self.batch,):
            raise ValueError(f"active: expected shape ({self.batch},), got {tuple(t.shape)}")
        return [int(x != 0) for x in t.cpu().tolist()]
