"""DMACache: decoding token by token equals the rows of the full causal dma_attention."""
import math

import pytest
import torch

from dma_torch import DMACache, DMAError, dma_attention
from _reference import dynamic_weights, keep_mask, max_rel
from test_ops import make_inputs

F64 = torch.float64


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
    dt = p["q"].dtype
    cache = DMACache(B, Hq, Hkv, D, window, n_dyn_heads=Hd, form=form, dtype=dt)
    o = torch.full((B, Hq, L, D), float("nan"), dtype=dt)
    lse = torch.full((B, Hq, L), float("nan"), dtype=dt)
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
    (dict(dtype=torch.float16), TypeError, "dtype:"),
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
    with pytest.raises(ValueError, match=f"{name}: is a CUDA tensor; the PyTorch decode step "
                                         "runs on the CPU"):
        cache.step(**args)
    assert cache.length == [0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_tensors_rejected():
    cache = make_cache()
    args = {n: t.cuda() for n, t in step_args().items()}
    with pytest.raises(ValueError, match="q: is a CUDA tensor; the PyTorch decode step runs on "
                                         "the CPU"):
        cache.step(**args)
    p = {n: t.cuda() for n, t in prompt_args().items()}
    with pytest.raises(ValueError, match="k: is a CUDA tensor"):
        cache.prefill(0, p["k"], p["v"], p["w_dt"], p["a"])
