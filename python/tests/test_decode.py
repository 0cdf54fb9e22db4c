"""DMACache: decoding token by token equals the rows of the full causal dma_attention.

On the CPU (float64) to summation order; on CUDA (bf16, fp16) within bf16 tolerance, skipped
without a GPU or a CUDA build (the CUDA cases are at the end of the file)."""
import math

import pytest
import torch

import dma_torch
from dma_torch import DMACache, DMAError, dma_attention
from _reference import dynamic_weights, keep_mask, max_rel, rel_l2
from test_ops import make_inputs

F64 = torch.float64
BF16 = torch.bfloat16


def problem(L, a_zero=False, **shape):
    """q, k, v (B, H, L, D) and w_dt, a (or delta (B, Hd, L)) of a random problem, detached;
    a = 0 with a_zero."""
    t = make_inputs(Lq=L, a_scale=0.0 if a_zero else 1.0, **shape)
    return {n: x.detach() for n, x in t.items()}


def dyn(p, b, pos):
    """The dynamic-weight arguments of sequence b at pos (a slice of positions, or one per
    sequence when b is None): (w_dt, a), or delta."""
    if "delta" not in p:
        return (p["w_dt"], p["a"]), {}
    if b is None:
        return (), {"delta": torch.stack([p["delta"][i, :, j] for i, j in enumerate(pos)])}
    return (), {"delta": p["delta"][b, :, pos]}


def decode(p, prompt, total, window, form="exp", after_step=None):
    """Prefills sequence b with its first prompt[b] tokens, then steps until it holds total[b]
    (a sequence that is done stays inactive). Returns o (B, Hq, L, D) and lse (B, Hq, L) of the
    decoded rows (NaN elsewhere), and the cache."""
    B, Hq, L, D = p["q"].shape
    Hkv = p["k"].shape[1]
    Hd = p["delta"].shape[1] if "delta" in p else p["w_dt"].shape[0]
    dt, dev = p["q"].dtype, p["q"].device
    cache = DMACache(B, Hq, Hkv, D, window, n_dyn_heads=Hd, form=form, dtype=dt)
    o = torch.full((B, Hq, L, D), float("nan"), dtype=dt, device=dev)
    lse = torch.full((B, Hq, L), float("nan"), device=dev,
                     dtype=torch.float32 if dev.type == "cuda" else dt)  # CUDA: lse is float32
    for b, P in enumerate(prompt):
        args, kw = dyn(p, b, slice(0, P))
        o[b, :, :P], lse[b, :, :P] = cache.prefill(b, p["k"][b, :, :P], p["v"][b, :, :P], *args,
                                                   q=p["q"][b, :, :P], **kw)
    assert cache.length == list(prompt)
    while True:
        pos = cache.length
        active = [pos[b] < total[b] for b in range(B)]
        if not any(active):
            break
        at = [min(pos[b], L - 1) for b in range(B)]  # inactive rows: any token
        tok = [torch.stack([p[n][b, :, at[b]] for b in range(B)]) for n in ("q", "k", "v")]
        args, kw = dyn(p, None, at)
        ob, lb = cache.step(*tok, *args, active=active, **kw)
        for b in range(B):
            if active[b]:
                o[b, :, pos[b]], lse[b, :, pos[b]] = ob[b], lb[b]
            else:
                assert not ob[b].any() and not lb[b].any()
        if after_step:
            after_step(cache)
    assert cache.length == list(total)
    return o, lse, cache


def full(p, window, form="exp"):
    args, kw = ((p["w_dt"], p["a"]), {}) if "delta" not in p else ((), {"delta": p["delta"]})
    return dma_attention(p["q"], p["k"], p["v"], *args, **kw, window=window, causal=True,
                         form=form, return_lse=True)


CASES = {
    # name: problem(...) args, window, prompt lengths, total lengths
    "gqa_two_lengths": (dict(B=2, Hq=4, Hkv=2, L=30), 6, (7, 0), (30, 19)),
    "mha": (dict(B=1, Hq=2, Hkv=2, L=25), 5, (10,), (25,)),
    "mqa_hd_eq_hq": (dict(B=2, Hq=3, Hkv=1, Hd=3, L=26), 4, (3, 12), (20, 26)),
    "hd_eq_hq_gqa_linear": (dict(B=2, Hq=4, Hkv=2, Hd=4, L=28, form="linear"), 5, (9, 1),
                            (28, 24)),
    "window_1": (dict(B=2, Hq=2, Hkv=1, L=18), 1, (4, 0), (18, 11)),
    "window_ge_L": (dict(B=1, Hq=2, Hkv=1, L=20), 32, (5,), (20,)),
    "prompt_only": (dict(B=1, Hq=2, Hkv=1, L=16), 4, (16,), (16,)),
    "given_delta": (dict(B=2, Hq=4, Hkv=2, Hd=4, L=22, given_delta=True), 5, (6, 2), (22, 17)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_decode_matches_full_forward(name):
    shape, window, prompt, total = CASES[name]
    shape = dict(shape)
    form = shape.pop("form", "exp")
    p = problem(**shape)
    o_ref, lse_ref = full(p, window, form)
    o, lse, cache = decode(p, prompt, total, window, form)
    for b in range(len(prompt)):
        n = total[b]
        assert max_rel(o[b, :, :n], o_ref[b, :, :n]) <= 1e-10, (b, "o")
        assert max_rel(lse[b, :, :n], lse_ref[b, :, :n]) <= 1e-10, (b, "lse")


@pytest.mark.parametrize("Hd", [2, 4])
def test_cache_holds_what_the_last_query_keeps(Hd):
    """After every step the cached positions are exactly the keys the current query keeps in the
    full forward (the reference's explicit top-w mask), never more than w."""
    window, L = 5, 26
    p = problem(B=2, Hq=4, Hkv=2, Hd=Hd, L=L)
    delta = dynamic_weights(p["v"], p["w_dt"], p["a"], "exp")
    keep = keep_mask(delta, L, window, True)
    seen = []

    def check(cache):
        for b in range(2):
            p_last = cache.length[b] - 1
            for h in range(Hd):
                got = cache.positions(b, h)
                assert len(got) <= window
                assert got == keep[b, h, p_last].nonzero().flatten().tolist(), (b, h, p_last)
                d = torch.tensor(cache.deltas(b, h), dtype=F64)
                assert max_rel(d, delta[b, h, got]) <= 1e-12
        seen.append(1)

    decode(p, (3, 8), (L, L), window, after_step=check)
    assert len(seen) == L - 3


def test_a_zero_keeps_the_last_w_positions():
    """a = 0 in the exp form: every delta is 1, each eviction a tie lost by the oldest entry, so
    the cache is a sliding window of the last w positions."""
    window, L = 4, 20
    p = problem(B=1, Hq=2, Hkv=1, L=L, a_zero=True)

    def check(cache):
        n = cache.length[0]
        assert cache.positions(0, 0) == list(range(max(0, n - window), n))
        assert cache.deltas(0, 0) == [1.0] * min(n, window)

    o, _, cache = decode(p, (2,), (L,), window, after_step=check)
    assert max_rel(o, full(p, window)[0]) <= 1e-10


def test_float32_and_no_autograd():
    p = problem(B=2, Hq=4, Hkv=2, L=20, dtype=torch.float32)
    p = {n: t.requires_grad_() for n, t in p.items()}
    o_ref, lse_ref = full(p, 5)
    o, lse, cache = decode(p, (4, 9), (20, 20), 5)
    assert o.dtype == torch.float32 and not o.requires_grad
    assert max_rel(o, o_ref) <= 1e-5 and max_rel(lse, lse_ref) <= 1e-5
    ob, lb = cache.step(*(torch.zeros(2, h, 8, requires_grad=True) for h in (4, 2, 2)),
                        p["w_dt"], p["a"], active=[False, False])
    assert not ob.requires_grad and not lb.requires_grad and cache.length == [20, 20]


def test_reset_and_max_length():
    p = problem(B=2, Hq=2, Hkv=1, L=12)
    cache = DMACache(2, 2, 1, 8, 3, max_length=6, dtype=F64)
    assert cache.max_length == [6, 6]
    assert cache.prefill(0, p["k"][0, :, :5], p["v"][0, :, :5], p["w_dt"], p["a"]) is None
    tok = [p[n][:, :, 5] for n in ("q", "k", "v")]
    cache.step(*tok, p["w_dt"], p["a"], active=torch.tensor([True, False]))
    assert cache.length == [6, 0]
    with pytest.raises(ValueError, match="active: sequence 0 is finished"):
        cache.step(*tok, p["w_dt"], p["a"])
    with pytest.raises(ValueError, match="b: sequence 0 already holds 6 tokens"):
        cache.prefill(0, p["k"][0, :, :2], p["v"][0, :, :2], p["w_dt"], p["a"])
    cache.reset(0, max_length=0)
    assert cache.length == [0, 0] and cache.positions(0, 0) == [] and cache.max_length == [0, 6]
    cache.prefill(0, p["k"][0, :, :0], p["v"][0, :, :0], p["w_dt"], p["a"])  # P = 0
    for _ in range(6):
        cache.step(*tok, p["w_dt"], p["a"])
    assert cache.length == [6, 6]  # sequence 1 reached its max_length = 6, sequence 0 has none
    with pytest.raises(ValueError, match="active: sequence 1 is finished"):
        cache.step(*tok, p["w_dt"], p["a"])
    cache.step(*tok, p["w_dt"], p["a"], active=[1, 0])
    assert cache.length == [7, 6] and len(cache.positions(0, 0)) == 3
    assert repr(cache).startswith("DMACache(batch=2")


# ---- bad input ---------------------------------------------------------------------------------

def make_cache(**over):
    args = dict(batch=2, n_heads=4, n_kv_heads=2, head_dim=4, window=3, dtype=F64)
    args.update(over)
    return DMACache(**args)


BAD_CONFIG = [
    (dict(window=0), ValueError, "window: must be >= 1"),
    (dict(window=2.0), TypeError, "window: expected an int"),
    (dict(batch=0), ValueError, "batch: must be >= 1"),
    (dict(n_kv_heads=3), ValueError, "n_kv_heads: n_heads = 4 is not a multiple"),
    (dict(n_dyn_heads=3), ValueError, "n_dyn_heads: 3"),
    (dict(form="tanh"), ValueError, "form:"),
    (dict(scale=-1.0), ValueError, "scale:"),
    (dict(max_length=-1), ValueError, "max_length:"),
    (dict(dtype=torch.int32), TypeError, "dtype:"),
    (dict(dtype=torch.bfloat16), ValueError,
     "head_dim: 4 is not supported by the CUDA decode step"),
    (dict(device="cuda"), ValueError, "device: cuda; a torch.float64 cache is a CPU cache"),
    (dict(head_dim=64, dtype=torch.float16, device="cpu"), ValueError,
     "device: cpu; a torch.float16 cache is a CUDA cache"),
    (dict(device=2.5), TypeError, "device: expected a torch.device"),
]


@pytest.mark.parametrize("over,exc,match", BAD_CONFIG,
                         ids=[f"{i}_{m.split(':')[0]}" for i, (_, _, m) in enumerate(BAD_CONFIG)])
def test_bad_config(over, exc, match):
    with pytest.raises(exc, match=match):
        make_cache(**over)


def prompt_args(P=5, dtype=F64):
    return dict(k=torch.randn(2, P, 4, dtype=dtype), v=torch.randn(2, P, 4, dtype=dtype),
                w_dt=torch.randn(2, 8, dtype=dtype) * 0.1, a=torch.full((2,), 0.5, dtype=dtype))


def step_args(dtype=F64):
    return dict(q=torch.randn(2, 4, 4, dtype=dtype), k=torch.randn(2, 2, 4, dtype=dtype),
                v=torch.randn(2, 2, 4, dtype=dtype), w_dt=torch.randn(2, 8, dtype=dtype) * 0.1,
                a=torch.full((2,), 0.5, dtype=dtype))


nan = float("nan")
BAD_PREFILL = [
    (dict(b=2), ValueError, "b: sequence 2 does not exist"),
    (dict(b=-1), ValueError, "b: must be >= 0"),
    (dict(k=[1.0]), TypeError, "k: expected a torch.Tensor"),
    (dict(k=torch.randn(2, 5, 4)), TypeError, "k: dtype torch.float32 differs"),
    (dict(k=torch.randn(2, 5, 4, 1, dtype=F64)), ValueError, "k: expected 3 dimensions"),
    (dict(k=torch.randn(1, 5, 4, dtype=F64)), ValueError, r"k: expected shape \(2, 5, 4\)"),
    (dict(v=torch.randn(2, 6, 4, dtype=F64)), ValueError, r"v: expected shape \(2, 5, 4\)"),
    (dict(q=torch.randn(4, 4, 4, dtype=F64)), ValueError, r"q: expected shape \(4, 5, 4\)"),
    (dict(w_dt=torch.randn(2, 7, dtype=F64)), ValueError, "w_dt: expected shape"),
    (dict(a=None), ValueError, "a: missing"),
    (dict(delta=torch.randn(2, 5, dtype=F64)), ValueError, "delta: given together"),
    (dict(w_dt=None, a=None, delta=torch.randn(2, 4, dtype=F64)), ValueError,
     r"delta: expected shape \(2, 5\)"),
    (dict(k=torch.randn(2, 9, 4, dtype=F64), v=torch.randn(2, 9, 4, dtype=F64)), ValueError,
     "k: the prompt of sequence 0 has 9 tokens, more than its max_length = 8"),
    (dict(k=torch.randn(2, 5, 4, dtype=F64).index_put_((torch.tensor(1),) * 3,
                                                       torch.tensor(nan, dtype=F64))),
     DMAError, r"k\[1,1,1\] is nan"),
    (dict(q=torch.full((4, 5, 4), math.inf, dtype=F64)), DMAError, r"q\[0,0,0\] is inf"),
    (dict(q=torch.randn(4, 5, 4, dtype=F64), v=torch.randn(2, 5, 4, dtype=F64).index_put_(
        (torch.tensor(1), torch.tensor(3), torch.tensor(2)), torch.tensor(-math.inf, dtype=F64))),
     DMAError, r"v\[1,3,2\] is -inf"),
    (dict(a=torch.full((2,), 1e6, dtype=F64)), DMAError, "delta"),
]


@pytest.mark.parametrize("over,exc,match", BAD_PREFILL,
                         ids=[f"{i}_{m.split(':')[0]}" for i, (_, _, m) in enumerate(BAD_PREFILL)])
def test_bad_prefill(over, exc, match):
    cache = make_cache(max_length=8)
    args = dict(b=0, **prompt_args())
    args.update(over)
    b, k, v = args.pop("b"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=match):
        cache.prefill(b, k, v, **args)
    assert cache.length == [0, 0] and cache.positions(0, 0) == []  # unchanged


BAD_STEP = [
    (dict(q=torch.randn(2, 4, 5, dtype=F64)), ValueError, r"q: expected shape \(2, 4, 4\)"),
    (dict(q=torch.randn(2, 4, 1, 4, dtype=F64)), ValueError, "q: expected 3 dimensions"),
    (dict(k=torch.randn(2, 1, 4, dtype=F64)), ValueError, r"k: expected shape \(2, 2, 4\)"),
    (dict(v=torch.randn(2, 2, 4)), TypeError, "v: dtype"),
    (dict(v=torch.empty(2, 2, 4, dtype=F64, device="meta")), ValueError, "v: is on meta"),
    (dict(w_dt=None), ValueError, "w_dt: missing"),
    (dict(a=torch.ones(3, dtype=F64)), ValueError, r"a: expected shape \(2,\)"),
    (dict(w_dt=None, a=None, delta=torch.randn(2, 3, dtype=F64)), ValueError,
     r"delta: expected shape \(2, 2\)"),
    (dict(active=[True]), ValueError, r"active: expected shape \(2,\)"),
    (dict(active=[0.5, 1.0]), TypeError, "active: expected bools or ints"),
    (dict(active=object()), TypeError, "active:"),
    (dict(q=torch.full((2, 4, 4), nan, dtype=F64)), DMAError, r"q\[0,0,0\] is nan"),
    (dict(w_dt=None, a=None, delta=torch.tensor([[1.0, 2.0], [math.inf, 0.0]], dtype=F64)),
     DMAError, r"delta\[1,0\] is inf"),
]


@pytest.mark.parametrize("over,exc,match", BAD_STEP,
                         ids=[f"{i}_{m.split(':')[0]}" for i, (_, _, m) in enumerate(BAD_STEP)])
def test_bad_step(over, exc, match):
    cache = make_cache()
    p = prompt_args()
    cache.prefill(1, p["k"], p["v"], p["w_dt"], p["a"])
    before = [cache.positions(1, h) for h in range(2)]
    args = step_args()
    args.update(over)
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=match):
        cache.step(q, k, v, **args)
    assert cache.length == [0, 5] and [cache.positions(1, h) for h in range(2)] == before


def test_nan_in_an_inactive_row_is_not_read():
    cache = make_cache()
    args = step_args()
    args["q"][1] = nan
    o, lse = cache.step(**args, active=[True, False])
    assert torch.isfinite(o).all() and cache.length == [1, 0]


def test_bad_state_queries():
    cache = make_cache()
    with pytest.raises(ValueError, match="h: delta head 2 does not exist"):
        cache.positions(0, 2)
    with pytest.raises(ValueError, match="b: sequence 5 does not exist"):
        cache.deltas(5, 0)
    with pytest.raises(TypeError, match="b: expected an int"):
        cache.reset("0")
    with pytest.raises(ValueError, match="max_length: must be >= 0"):
        cache.reset(0, max_length=-3)


def test_direct_binding_checks_too():
    """_C.DecodeCache, called without the Python checks, still raises DMAError naming the
    tensor (and never reads out of bounds)."""
    from dma_torch import _C
    c = _C.DecodeCache(2, 4, 2, 2, 4, 3, "exp", 0.0, 0, True)
    a = step_args()
    with pytest.raises(DMAError, match=r"q: shape \[2, 4, 5\], expected \[2, 4, 4\]"):
        c.step(torch.randn(2, 4, 5, dtype=F64), a["k"], a["v"], a["w_dt"], a["a"], None, None)
    with pytest.raises(DMAError, match="k: a Float tensor on cpu; the cache takes Double tensors"):
        c.step(a["q"], a["k"].float(), a["v"], a["w_dt"], a["a"], None, None)
    with pytest.raises(DMAError, match="active: has 1 elements"):
        c.step(a["q"], a["k"], a["v"], a["w_dt"], a["a"], [1], None)
    with pytest.raises(DMAError, match="w_dt, a: both are needed"):
        c.step(a["q"], a["k"], a["v"], None, None, None, None)
    with pytest.raises(DMAError, match="h: delta head 2 does not exist"):
        c.positions(0, 2)
    with pytest.raises(DMAError, match="window"):
        _C.DecodeCache(2, 4, 2, 2, 4, 0, "exp", 0.0, 0, True)


class _ReportsCuda(torch.Tensor):
    """A CPU tensor that says it is on cuda:0: the device check without a GPU."""

    @property
    def device(self):
        return torch.device("cuda", 0)


@pytest.mark.parametrize("name", ["q", "k", "v", "w_dt", "a"])
def test_cuda_device_rejected_by_the_check(name):
    cache = make_cache()
    args = step_args()
    args[name] = torch.Tensor._make_subclass(_ReportsCuda, args[name])
    with pytest.raises(ValueError, match=f"{name}: is a CUDA tensor; this torch.float64 cache "
                                         "is a CPU cache"):
        cache.step(**args)
    assert cache.length == [0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_rejected_by_a_cpu_cache():
    cache = make_cache()
    args = {n: t.cuda() for n, t in step_args().items()}
    with pytest.raises(ValueError, match="q: is a CUDA tensor; this torch.float64 cache is a CPU "
                                         "cache"):
        cache.step(**args)
    p = {n: t.cuda() for n, t in prompt_args().items()}
    with pytest.raises(ValueError, match="k: is a CUDA tensor"):
        cache.prefill(0, p["k"], p["v"], p["w_dt"], p["a"])


# ---- a CUDA cache, as far as it goes without a GPU -----------------------------------------------

def test_cuda_cache_before_its_first_tensors():
    """A bf16/fp16 cache is a CUDA cache; its memory is allocated on the device of the first
    tensors it is given, so until then it is empty and CPU tensors are refused."""
    cache = DMACache(2, 4, 2, 64, 3, dtype=BF16, max_length=5)
    assert cache.device is None and cache.length == [0, 0] and cache.max_length == [5, 5]
    assert cache.positions(1, 1) == [] and cache.deltas(0, 0) == []
    cache.reset(1, max_length=7)
    assert cache.max_length == [5, 7] and "dtype=torch.bfloat16, device=None" in repr(cache)
    k = torch.randn(2, 3, 64, dtype=BF16)
    w_dt, a = torch.randn(2, 128), torch.ones(2)
    with pytest.raises(ValueError, match="k: is on cpu; this torch.bfloat16 cache takes CUDA "
                                         "tensors"):
        cache.prefill(0, k, k, w_dt, a)
    with pytest.raises(ValueError, match="q: is on cpu"):
        cache.step(torch.randn(2, 4, 64, dtype=BF16), k[:, 0], k[:, 0], w_dt, a)
    with pytest.raises(ValueError, match="h: delta head 2 does not exist"):
        cache.positions(0, 2)
    assert cache.device is None and cache.length == [0, 0]


@pytest.mark.skipif(dma_torch.build_info()["cuda"], reason="this build has CUDA")
def test_cuda_cache_without_a_cuda_build():
    cache = DMACache(2, 4, 2, 64, 3, dtype=torch.float16)
    args = dict(q=torch.randn(2, 4, 64), k=torch.randn(2, 2, 64), v=torch.randn(2, 2, 64))
    args = {n: torch.Tensor._make_subclass(_ReportsCuda, t.half()) for n, t in args.items()}
    w_dt, a = (torch.Tensor._make_subclass(_ReportsCuda, t) for t in (torch.randn(2, 128),
                                                                        torch.ones(2)))
    with pytest.raises(DMAError, match="q: is a CUDA tensor, but dma_torch was built without "
                                       "CUDA"):
        cache.step(**args, w_dt=w_dt, a=a)
    assert cache.device is None
    with pytest.raises(DMAError, match="device: cuda:0, but dma_torch was built without CUDA"):
        DMACache(2, 4, 2, 64, 3, dtype=torch.float16, device="cuda:0")


# ---- CUDA: the GPU cache and step (dma::cuda decode) ---------------------------------------------
#
# The reference is the full forward on the GPU, dma_attention (o in q's dtype, lse float32), and
# its eviction positions (the mask state of _C.forward). The decode step computes delta in its own
# kernel, in another summation order than the forward's dynamic weights; two keys whose deltas
# differ by less than that rounding could then be ranked differently. So the inputs are chosen
# (exact_z) with v a multiple of 1/8 in [-4, 4] and w_dt of 1/64: every partial sum of
# z = vflat . w_dt is exact in float32, both kernels get the same z bits, the same softplus and exp
# give the same delta, and the cache must hold exactly the keys the full forward keeps. One case
# (generic) keeps unrounded inputs and checks o and lse only.

HAS_CUDA = torch.cuda.is_available() and dma_torch.build_info()["cuda"]
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device, or dma_torch built "
                                                    "without CUDA")


def gpu_problem(L, dtype=BF16, a_zero=False, exact_z=True, D=64, **shape):
    """problem() on the GPU: q, k, v in dtype, w_dt, a (or delta) in float32; see exact_z above."""
    p = problem(L, a_zero=a_zero, D=D, **shape)
    if exact_z:
        p["v"] = (p["v"] * 8).round().clamp(-32, 32) / 8
        if "w_dt" in p:
            p["w_dt"] = (p["w_dt"] * 64).round() / 64
    return {n: t.to("cuda", dtype if n in ("q", "k", "v") else torch.float32)
            for n, t in p.items()}


def gpu_full(p, window, form):
    """The full causal forward on the GPU: o, lse (dma_attention), delta (B, Hd, L) float64 and
    evict (B, Hd, L) int64 on the CPU (the forward's own, from its mask state)."""
    o, lse = full(p, window, form)
    _, _, delta, ms = dma_torch._C.forward(p["q"], p["k"], p["v"], p.get("w_dt"), p.get("a"),
                                           p.get("delta"), window, True, form, 0.0, True)
    B, Hd, L = delta.shape
    evict = ms[:B * Hd * L * 4].view(torch.int32).view(B, Hd, L)
    return o, lse, delta.double().cpu(), evict.long().cpu()


def assert_rows_close(o, lse, o_ref, lse_ref, what):
    """o (.., n, D), lse (.., n): every row within bf16 tolerance (relative L2 2e-2 per row,
    1e-2 over all), lse to 1e-3 (both are float32 from the same rounded inputs)."""
    got, ref = o.double().cpu(), o_ref.double().cpu()
    row = (got - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-3)
    assert row.max().item() <= 2e-2, (what, "o row", row.max().item(),
                                      (row == row.max()).nonzero()[0].tolist())
    assert rel_l2(got, ref) <= 1e-2, (what, "o", rel_l2(got, ref))
    dl = (lse.double().cpu() - lse_ref.double().cpu()).abs()
    lim = 1e-3 + 1e-3 * lse_ref.double().cpu().abs()
    assert (dl <= lim).all(), (what, "lse", dl.max().item())


CUDA_CASES = {
    # name: gpu_problem(...) args, window, prompt lengths, total lengths
    "gqa_hd_eq_hkv": (dict(B=2, Hq=8, Hkv=2, L=70), 16, (20, 0), (70, 45)),
    "gqa_8_heads_per_kv": (dict(B=2, Hq=16, Hkv=2, L=40), 8, (5, 13), (40, 29)),
    "mha_window_gt_L": (dict(B=2, Hq=2, Hkv=2, L=40), 64, (10, 1), (40, 33)),
    "gqa_hd_eq_hq": (dict(B=2, Hq=4, Hkv=2, Hd=4, L=60), 8, (1, 30), (60, 50)),
    "mqa_hd_eq_hq_d128": (dict(B=3, Hq=4, Hkv=1, Hd=4, L=50, D=128), 5, (0, 7, 50), (50, 33, 50)),
    "window_1": (dict(B=2, Hq=2, Hkv=1, L=30), 1, (5, 0), (30, 17)),
    "linear": (dict(B=2, Hq=4, Hkv=2, L=48, form="linear"), 12, (3, 16), (48, 40)),
    "split_k_w200_d128": (dict(B=2, Hq=8, Hkv=4, L=320, D=128), 200, (150, 10), (320, 260)),
    "given_delta": (dict(B=2, Hq=4, Hkv=2, Hd=4, L=40, given_delta=True), 6, (9, 2), (40, 31)),
    "ties_a0": (dict(B=2, Hq=4, Hkv=2, L=40, a_zero=True), 8, (12, 3), (40, 36)),
    "ties_a0_linear_hd_eq_hq": (dict(B=1, Hq=4, Hkv=1, Hd=4, L=30, a_zero=True, form="linear"),
                                5, (4,), (30,)),
    "generic": (dict(B=2, Hq=8, Hkv=2, L=64, exact_z=False), 16, (16, 3), (64, 50)),
}


@cuda_only
@pytest.mark.parametrize("dtype", [BF16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(CUDA_CASES))
def test_cuda_decode_matches_full_forward(name, dtype):
    shape, window, prompt, total = CUDA_CASES[name]
    shape = dict(shape)
    form = shape.pop("form", "exp")
    exact = shape.get("exact_z", True)
    p = gpu_problem(dtype=dtype, **shape)
    o_ref, lse_ref, delta_ref, evict = gpu_full(p, window, form)
    Hd = delta_ref.shape[1]

    def check(cache):
        """After every step: never more than w entries (w once the sequence has w tokens), and
        with exact_z exactly the keys the full forward's query at the last position keeps."""
        for b in range(len(prompt)):
            n = cache.length[b]
            for h in range(Hd):
                got = cache.positions(b, h)
                assert len(got) == min(n, window), (b, h, n, got)
                d = torch.tensor(cache.deltas(b, h), dtype=F64)
                if exact:
                    kept = (evict[b, h, :n] >= n - 1).nonzero().flatten().tolist()
                    assert got == kept, (b, h, n, got, kept)
                    assert torch.equal(d, delta_ref[b, h, got]), (b, h, n)
                else:
                    assert ((d - delta_ref[b, h, got]).abs() <=
                            1e-4 * delta_ref[b, h, got].abs() + 1e-6).all(), (b, h, n)

    o, lse, cache = decode(p, prompt, total, window, form, after_step=check)
    assert cache.device == p["q"].device and o.dtype == dtype and lse.dtype == torch.float32
    # memory O(B Hd w), whatever the context: k, v, delta, position per slot, 256-byte pieces
    B, D = len(prompt), p["q"].shape[3]
    assert cache._c.nbytes() <= B * Hd * window * (4 * D + 8) + B * Hd * 4 + B * 4 + 6 * 256
    for b in range(len(prompt)):
        n = total[b]
        assert_rows_close(o[b, :, :n], lse[b, :, :n], o_ref[b, :, :n], lse_ref[b, :, :n],
                          (name, b))


@cuda_only
def test_cuda_decode_on_a_side_stream():
    """Every call enqueues on torch's current stream: decoding inside torch.cuda.stream(s)."""
    shape, window, prompt, total = CUDA_CASES["gqa_hd_eq_hkv"]
    p = gpu_problem(**shape)
    o_ref, lse_ref, _, _ = gpu_full(p, window, "exp")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        o, lse, cache = decode(p, prompt, total, window)
    torch.cuda.current_stream().wait_stream(s)
    for b in range(2):
        n = total[b]
        assert_rows_close(o[b, :, :n], lse[b, :, :n], o_ref[b, :, :n], lse_ref[b, :, :n], b)


@cuda_only
def test_cuda_device_chosen_by_the_tensors():
    cache = DMACache(1, 2, 1, 64, 4, dtype=BF16)
    assert cache.device is None
    k = torch.randn(1, 6, 64, device="cuda", dtype=BF16)
    cache.prefill(0, k, k, torch.randn(1, 64, device="cuda"), torch.ones(1, device="cuda"))
    assert cache.device == torch.device("cuda", torch.cuda.current_device())
    assert cache.length == [6] and len(cache.positions(0, 0)) == 4
    bound = DMACache(1, 2, 1, 64, 4, dtype=torch.float16, device="cuda")
    assert bound.device == torch.device("cuda", torch.cuda.current_device())
    if torch.cuda.device_count() > 1 and cache.device.index == 0:
        tok = k[:, :1]  # (B, Hkv, D) = (1, 1, 64)
        with pytest.raises(ValueError, match="k: is on cuda:1, but the cache is on cuda:0"):
            cache.step(torch.randn(1, 2, 64, device="cuda", dtype=BF16), tok.to("cuda:1"), tok,
                       torch.randn(1, 64, device="cuda"), torch.ones(1, device="cuda"))
        assert cache.length == [6]


def _gpu(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def cuda_cache(**over):
    args = dict(batch=2, n_heads=4, n_kv_heads=2, head_dim=64, window=3, dtype=BF16)
    args.update(over)
    return DMACache(**args)


def cuda_prompt_args(P=5):
    return dict(k=_gpu(2, P, 64, dtype=BF16), v=_gpu(2, P, 64, dtype=BF16),
                w_dt=_gpu(2, 128, scale=0.1), a=torch.full((2,), 0.5, device="cuda"))


def cuda_step_args():
    return dict(q=_gpu(2, 4, 64, dtype=BF16), k=_gpu(2, 2, 64, dtype=BF16),
                v=_gpu(2, 2, 64, dtype=BF16), w_dt=_gpu(2, 128, scale=0.1),
                a=torch.full((2,), 0.5, device="cuda"))


def _with(t, index, value):
    t = t.clone()
    t[index] = value
    return t


# (over: a function of the default arguments, so that nothing touches CUDA at import), exc, match
CUDA_BAD_PREFILL = [
    (lambda d: dict(b=2), ValueError, "b: sequence 2 does not exist"),
    (lambda d: dict(k=d["k"].float()), TypeError,
     "k: dtype torch.float32 differs from the cache's torch.bfloat16"),
    (lambda d: dict(k=d["k"].cpu()), ValueError, "k: is on cpu; this torch.bfloat16 cache takes "
                                                 "CUDA tensors"),
    (lambda d: dict(k=_gpu(3, 5, 64, dtype=BF16)), ValueError, r"k: expected shape \(2, 5, 64\)"),
    (lambda d: dict(v=_gpu(2, 5, 32, dtype=BF16)), ValueError, r"v: expected shape \(2, 5, 64\)"),
    (lambda d: dict(q=_gpu(2, 5, 64, dtype=BF16)), ValueError, r"q: expected shape \(4, 5, 64\)"),
    (lambda d: dict(w_dt=_gpu(2, 127)), ValueError, "w_dt: expected shape"),
    (lambda d: dict(w_dt=torch.ones(2, 128, dtype=torch.int64, device="cuda")), TypeError,
     "w_dt: dtype torch.int64 is not a floating type"),
    (lambda d: dict(a=None), ValueError, "a: missing"),
    (lambda d: dict(k=_gpu(2, 9, 64, dtype=BF16), v=_gpu(2, 9, 64, dtype=BF16)), ValueError,
     "k: the prompt of sequence 0 has 9 tokens, more than its max_length = 8"),
    (lambda d: dict(k=_with(d["k"], (1, 1, 1), float("nan"))), DMAError, r"k\[1,1,1\] is nan"),
    (lambda d: dict(q=torch.full((4, 5, 64), math.inf, device="cuda", dtype=BF16)), DMAError,
     r"q\[0,0,0\] is inf"),
    (lambda d: dict(w_dt=_with(d["w_dt"], (1, 3), -math.inf)), DMAError, r"w_dt\[1,3\] is -inf"),
    (lambda d: dict(a=torch.full((2,), 1e6, device="cuda")), DMAError, "delta"),
    (lambda d: dict(w_dt=None, a=None, delta=_with(_gpu(2, 5), (0, 3), math.inf)), DMAError,
     r"delta\[0,3\] is inf"),
    (lambda d: dict(w_dt=None, a=None, delta=torch.full((2, 5), 3e38, device="cuda")), DMAError,
     r"delta\[0,0\] = .* is beyond float32 range"),
]


@cuda_only
@pytest.mark.parametrize("over,exc,match", CUDA_BAD_PREFILL,
                         ids=[f"{i}_{m.split(':')[0]}" for i, (_, _, m)
                              in enumerate(CUDA_BAD_PREFILL)])
def test_cuda_bad_prefill(over, exc, match):
    cache = cuda_cache(max_length=8)
    args = dict(b=0, **cuda_prompt_args())
    args.update(over(args))
    b, k, v = args.pop("b"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=match):
        cache.prefill(b, k, v, **args)
    assert cache.length == [0, 0] and cache.positions(0, 0) == []  # unchanged


CUDA_BAD_STEP = [
    (lambda d: dict(q=_gpu(2, 4, 32, dtype=BF16)), ValueError, r"q: expected shape \(2, 4, 64\)"),
    (lambda d: dict(q=_gpu(2, 2, 64, dtype=BF16)), ValueError, r"q: expected shape \(2, 4, 64\)"),
    (lambda d: dict(k=_gpu(2, 1, 64, dtype=BF16)), ValueError, r"k: expected shape \(2, 2, 64\)"),
    (lambda d: dict(v=d["v"].half()), TypeError, "v: dtype torch.float16 differs"),
    (lambda d: dict(v=d["v"].cpu()), ValueError, "v: is on cpu"),
    (lambda d: dict(a=torch.ones(3, device="cuda")), ValueError, r"a: expected shape \(2,\)"),
    (lambda d: dict(w_dt=None, a=None, delta=_gpu(2, 3)), ValueError,
     r"delta: expected shape \(2, 2\)"),
    (lambda d: dict(active=[True]), ValueError, r"active: expected shape \(2,\)"),
    (lambda d: dict(q=_with(d["q"], (1, 2, 3), float("nan"))), DMAError, r"q\[1,2,3\] is nan"),
    (lambda d: dict(v=_with(d["v"], (0, 1, 0), math.inf)), DMAError, r"v\[0,1,0\] is inf"),
    (lambda d: dict(w_dt=_with(d["w_dt"], (0, 0), float("nan"))), DMAError, r"w_dt\[0,0\] is nan"),
    (lambda d: dict(w_dt=None, a=None, delta=torch.tensor([[1.0, 2.0], [math.inf, 0.0]],
                                                          device="cuda")), DMAError,
     r"delta\[1,0\] is inf"),
    (lambda d: dict(w_dt=None, a=None, delta=torch.tensor([[1.0, 3e38], [0.0, 0.0]],
                                                          device="cuda")), DMAError,
     r"delta\[0,1\] = .* is beyond float32 range"),
]


@cuda_only
@pytest.mark.parametrize("over,exc,match", CUDA_BAD_STEP,
                         ids=[f"{i}_{m.split(':')[0]}" for i, (_, _, m)
                              in enumerate(CUDA_BAD_STEP)])
def test_cuda_bad_step(over, exc, match):
    cache = cuda_cache()
    p = cuda_prompt_args()
    cache.prefill(1, p["k"], p["v"], p["w_dt"], p["a"])
    before = [cache.positions(1, h) for h in range(2)]
    args = cuda_step_args()
    args.update(over(args))
    q, k, v = args.pop("q"), args.pop("k"), args.pop("v")
    with pytest.raises(exc, match=match):
        cache.step(q, k, v, **args)
    assert cache.length == [0, 5] and [cache.positions(1, h) for h in range(2)] == before


@cuda_only
def test_cuda_empty_full_and_finished_sequences():
    """A step on an empty cache (P = 0) and on a full one, a finished sequence, reset."""
    cache = cuda_cache(max_length=6)
    p = cuda_prompt_args()
    cache.prefill(0, p["k"][:, :0], p["v"][:, :0], p["w_dt"], p["a"])  # P = 0: empty
    assert cache.prefill(1, p["k"], p["v"], p["w_dt"], p["a"]) is None
    assert cache.length == [0, 5] and [len(cache.positions(b, 0)) for b in (0, 1)] == [0, 3]
    args = cuda_step_args()
    o, lse = cache.step(**args)
    assert cache.length == [1, 6] and cache.positions(0, 0) == [0] and cache.positions(0, 1) == [0]
    assert [len(cache.positions(1, h)) for h in (0, 1)] == [3, 3]  # full: one entry left
    # sequence 0 attends to its first token only: o is its v, lse = q.k / sqrt(D) + delta
    kv = [0, 0, 1, 1]  # query head -> kv head (= delta head: Hd = Hkv)
    assert (o[0].float() - args["v"][0, kv].float()).abs().max().item() <= 1e-2
    want = (args["q"][0].double() * args["k"][0, kv].double()).sum(-1) / 8 + \
        torch.tensor([cache.deltas(0, h)[0] for h in kv], dtype=F64, device="cuda")
    assert ((lse[0].double() - want).abs() <= 1e-3 * (1 + want.abs())).all()
    with pytest.raises(ValueError, match="active: sequence 1 is finished"):
        cache.step(**cuda_step_args())
    o, lse = cache.step(**cuda_step_args(), active=torch.tensor([True, False], device="cuda"))
    assert cache.length == [2, 6] and not o[1].any() and not lse[1].any()
    with pytest.raises(ValueError, match="b: sequence 0 already holds 2 tokens"):
        cache.prefill(0, p["k"], p["v"], p["w_dt"], p["a"])
    cache.reset(1, max_length=0)
    assert cache.length == [2, 0] and cache.positions(1, 1) == [] and cache.max_length == [6, 0]
    for _ in range(4):
        cache.step(**cuda_step_args())
    assert cache.length == [6, 4] and cache.positions(0, 1) != []
    with pytest.raises(ValueError, match="active: sequence 0 is finished"):
        cache.step(**cuda_step_args())
    cache.step(**cuda_step_args(), active=[0, 1])
    assert cache.length == [6, 5]


@cuda_only
def test_cuda_nan_in_an_inactive_row_is_not_read():
    cache = cuda_cache()
    args = cuda_step_args()
    args["q"][1] = float("nan")
    args["k"][1, 0, 5] = math.inf
    o, lse = cache.step(**args, active=[True, False])
    assert torch.isfinite(o).all() and torch.isfinite(lse).all() and cache.length == [1, 0]
    assert not o[1].any() and not lse[1].any()


@cuda_only
def test_cuda_delta_overflow_in_a_step():
    """The step computes delta in its kernel: a delta that overflows is found after the kernels
    ran, so the sequences of that step must be reset. Without the checks, their rows are 0."""
    cache = cuda_cache()
    p = cuda_prompt_args()
    for b in range(2):
        cache.prefill(b, p["k"], p["v"], p["w_dt"], p["a"])
    huge = torch.full((2,), 1e6, device="cuda")
    args = cuda_step_args()
    with pytest.raises(DMAError, match=r"delta\[0,0\].*reset every sequence it stepped: 0, 1"):
        cache.step(args["q"], args["k"], args["v"], args["w_dt"], huge)
    with pytest.raises(DMAError, match="step: sequence 0 failed in an earlier step"):
        cache.step(**args)
    with pytest.raises(DMAError, match="step: sequence 1 failed"):
        cache.step(**args, active=[False, True])
    cache.reset(0)
    cache.reset(1)
    cache.step(**args)
    assert cache.length == [1, 1]
    dma_torch.set_cuda_checks(False)
    try:
        o, lse = cache.step(args["q"], args["k"], args["v"], args["w_dt"], huge)
    finally:
        dma_torch.set_cuda_checks(True)
    torch.cuda.synchronize()
    assert not o.any() and not lse.any()
    assert cache.length == [2, 2] and cache.positions(0, 0) == [0]  # the bad token left nothing


@cuda_only
def test_cuda_direct_binding_checks_too():
    """_C.CudaDecodeCache, called without the Python checks, still raises DMAError naming the
    tensor (and never reads out of bounds)."""
    from dma_torch import _C
    dev = torch.cuda.current_device()
    c = _C.CudaDecodeCache(2, 4, 2, 2, 64, 3, "exp", 0.0, 0, False, dev)
    a = cuda_step_args()
    d = f"cuda:{dev}"
    with pytest.raises(DMAError, match=r"q: shape \[2, 4, 5\], expected \[2, 4, 64\]"):
        c.step(_gpu(2, 4, 5, dtype=BF16), a["k"], a["v"], a["w_dt"], a["a"], None, None, True)
    with pytest.raises(DMAError, match=f"k: a Float tensor on {d}; the cache takes BFloat16 "
                                       f"tensors on {d}"):
        c.step(a["q"], a["k"].float(), a["v"], a["w_dt"], a["a"], None, None, True)
    with pytest.raises(DMAError, match="w_dt: a Long tensor"):
        c.step(a["q"], a["k"], a["v"], a["w_dt"].long(), a["a"], None, None, True)
    with pytest.raises(DMAError, match="active: has 1 elements"):
        c.step(a["q"], a["k"], a["v"], a["w_dt"], a["a"], [1], None, True)
    with pytest.raises(DMAError, match="w_dt, a: both are needed"):
        c.step(a["q"], a["k"], a["v"], None, None, None, None, True)
    with pytest.raises(DMAError, match="h: delta head 2 does not exist"):
        c.positions(0, 2)
    p = cuda_prompt_args()
    c.prefill(0, p["k"], p["v"], p["w_dt"], p["a"], None, None, True)
    with pytest.raises(DMAError, match="prefill: sequence 0 already holds 5 tokens"):
        c.prefill(0, p["k"], p["v"], p["w_dt"], p["a"], None, None, True)
    assert c.length() == [5, 0] and len(c.positions(0, 1)) == 3
    assert c.nbytes() >= 2 * 2 * 3 * 64 * 2 * 2  # k and v of (B, Hd, w, D) in bf16, at least
    with pytest.raises(DMAError, match="D = 32"):
        _C.CudaDecodeCache(2, 4, 2, 2, 32, 3, "exp", 0.0, 0, False, dev)
    with pytest.raises(DMAError, match="window"):
        _C.CudaDecodeCache(2, 4, 2, 2, 64, 0, "exp", 0.0, 0, False, dev)
    with pytest.raises(DMAError, match="device: cuda:99 does not exist"):
        _C.CudaDecodeCache(2, 4, 2, 2, 64, 3, "exp", 0.0, 0, False, 99)
