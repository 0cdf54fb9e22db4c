"""Bad input raises a Python exception naming the argument (never a crash)."""
import pytest
import torch

import dma_torch
from dma_torch import DMAError, dma_attention

F64 = torch.float64


def base(B=1, Hq=4, Hkv=2, L=8, D=4, dtype=F64):
    return dict(q=torch.randn(B, Hq, L, D, dtype=dtype), k=torch.randn(B, Hkv, L, D, dtype=dtype),
                v=torch.randn(B, Hkv, L, D, dtype=dtype),
                w_dt=torch.randn(Hkv, Hkv * D, dtype=dtype) * 0.1,
                a=torch.full((Hkv,), 0.5, dtype=dtype))


def call(window=3, **over):
    args = base()
    args.update(over)
    return dma_attention(**{n: t for n, t in args.items() if t is not None}, window=window)


BAD = [
    ("q_not_tensor", dict(q=[1.0]), TypeError, "q:"),
    ("q_3d", dict(q=torch.randn(4, 8, 4, dtype=F64)), ValueError, "q: expected 4 dimensions"),
    ("k_dtype", dict(k=torch.randn(1, 2, 8, 4, dtype=torch.float32)), TypeError, "k: dtype"),
    ("cpu_half", dict(q=torch.randn(1, 4, 8, 4).half()), TypeError, "q: dtype"),
    ("w_dt_dtype", dict(w_dt=torch.randn(2, 8)), TypeError, "w_dt: dtype"),
    ("k_device", dict(k=torch.empty(1, 2, 8, 4, dtype=F64, device="meta")), ValueError, "k: is on meta"),
    ("k_batch", dict(k=torch.randn(2, 2, 8, 4, dtype=F64)), ValueError, "k: batch"),
    ("k_head_dim", dict(k=torch.randn(1, 2, 8, 5, dtype=F64)), ValueError, "k: head dim"),
    ("v_shape", dict(v=torch.randn(1, 2, 9, 4, dtype=F64)), ValueError, "v: shape"),
    ("gqa_divisibility", dict(k=torch.randn(1, 3, 8, 4, dtype=F64), v=torch.randn(1, 3, 8, 4, dtype=F64),
                              w_dt=torch.randn(3, 12, dtype=F64), a=torch.ones(3, dtype=F64)),
     ValueError, "not a multiple of Hkv"),
    ("hd_not_hkv_or_hq", dict(w_dt=torch.randn(3, 8, dtype=F64), a=torch.ones(3, dtype=F64)),
     ValueError, "w_dt: Hd = 3"),
    ("w_dt_width", dict(w_dt=torch.randn(2, 7, dtype=F64)), ValueError, "w_dt: expected shape"),
    ("a_shape", dict(a=torch.ones(4, dtype=F64)), ValueError, "a: expected shape"),
    ("a_missing", dict(a=None), ValueError, "a: missing"),
    ("delta_and_w_dt", dict(delta=torch.randn(1, 2, 8, dtype=F64)), ValueError, "delta: given together"),
    ("delta_shape", dict(w_dt=None, a=None, delta=torch.randn(1, 2, 7, dtype=F64)), ValueError,
     "delta: expected shape"),
    ("delta_hd", dict(w_dt=None, a=None, delta=torch.randn(1, 3, 8, dtype=F64)), ValueError,
     "delta: Hd = 3"),
    ("causal_lq_gt_lk", dict(q=torch.randn(1, 4, 9, 4, dtype=F64)), ValueError, "q: causal"),
]


@pytest.mark.parametrize("name,over,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_argument(name, over, exc, match):
    with pytest.raises(exc, match=match):
        call(**over)


@pytest.mark.parametrize("window,exc", [(0, ValueError), (-2, ValueError), (2.5, TypeError),
                                        (True, TypeError)])
def test_bad_window(window, exc):
    with pytest.raises(exc, match="window"):
        call(window=window)


def test_bad_form_and_scale():
    args = base()
    with pytest.raises(ValueError, match="form"):
        dma_attention(**args, window=2, form="cubic")
    with pytest.raises(ValueError, match="scale"):
        dma_attention(**args, window=2, scale=-1.0)
    with pytest.raises(ValueError, match="scale"):
        dma_attention(**args, window=2, scale=float("nan"))


@pytest.mark.parametrize("name", ["q", "k", "v", "w_dt", "a"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_input(name, bad):
    args = base()
    args[name] = args[name].clone()
    args[name].view(-1)[1] = bad
    with pytest.raises(DMAError, match=rf"^{name}\[") as e:
        dma_attention(**args, window=3)
    assert isinstance(e.value, ValueError)


def test_non_finite_given_delta_and_do():
    args = base()
    delta = torch.randn(1, 2, 8, dtype=F64)
    delta[0, 1, 3] = float("nan")
    with pytest.raises(DMAError, match=r"delta\[0,1,3\] is nan"):
        dma_attention(args["q"], args["k"], args["v"], delta=delta, window=3)
    q = args["q"].requires_grad_()
    o = dma_attention(q, args["k"], args["v"], args["w_dt"], args["a"], window=3)
    with pytest.raises(DMAError, match="do"):
        o.backward(torch.full_like(o, float("inf")))


def test_exp_overflow_is_reported():
    args = base()
    args["a"] = torch.full((2,), 1e4, dtype=F64)
    with pytest.raises(DMAError, match="delta.*not finite"):
        dma_attention(**args, window=3)


def test_cpp_side_rejects_misuse():
    """The extension checks again when called directly."""
    args = base()
    with pytest.raises(DMAError, match="delta"):
        dma_torch._C.forward(args["q"], args["k"], args["v"], args["w_dt"], args["a"],
                             torch.zeros(1, 2, 8, dtype=F64), 3, True, "exp", 0.0, True)
    with pytest.raises(DMAError, match="window"):
        dma_torch._C.forward(args["q"], args["k"], args["v"], args["w_dt"], args["a"], None,
                             0, True, "exp", 0.0, True)
    with pytest.raises(DMAError, match="form"):
        dma_torch._C.forward(args["q"], args["k"], args["v"], args["w_dt"], args["a"], None,
                             2, True, "cubic", 0.0, True)
    with pytest.raises(DMAError, match="q: expected 4"):
        dma_torch._C.forward(args["q"][0], args["k"], args["v"], args["w_dt"], args["a"], None,
                             2, True, "exp", 0.0, True)
