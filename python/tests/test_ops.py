"""dma_attention on the CPU against the independent float64 implementation in _reference.py."""
import math

import pytest
import torch

from dma_torch import dma_attention
from _reference import (dma_reference, dynamic_weights, keep_mask, max_rel, sliding_window_mask)

F64 = torch.float64


def make_inputs(B=1, Hq=2, Hkv=1, Hd=None, Lq=16, Lk=None, D=8, dtype=F64, a_scale=1.0,
                given_delta=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    Lk = Lq if Lk is None else Lk
    Hd = Hkv if Hd is None else Hd
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    t = {"q": r(B, Hq, Lq, D), "k": r(B, Hkv, Lk, D), "v": r(B, Hkv, Lk, D)}
    if given_delta:
        t["delta"] = r(B, Hd, Lk)
    else:
        t["w_dt"] = r(Hd, Hkv * D) / math.sqrt(Hkv * D)
        t["a"] = a_scale * (0.5 + torch.rand(Hd, generator=g, dtype=F64))
    return {n: x.to(dtype).requires_grad_() for n, x in t.items()}


def run_both(inputs, do_seed=1, **opts):
    """(outputs, grads) of the op and of the reference, for loss = sum(o * do)."""
    names = list(inputs)
    o, lse = dma_attention(**inputs, **opts, return_lse=True)
    do = torch.randn(o.shape, generator=torch.Generator().manual_seed(do_seed), dtype=F64)
    grads = torch.autograd.grad((o.double() * do).sum(), [inputs[n] for n in names])
    ref_in = {n: x.detach().double().requires_grad_() for n, x in inputs.items()}
    o_ref, lse_ref, _, _ = dma_reference(**ref_in, **opts)
    ref_grads = torch.autograd.grad((o_ref * do).sum(), [ref_in[n] for n in names])
    got = {"o": o, "lse": lse, **{"d" + n: g for n, g in zip(names, grads)}}
    ref = {"o": o_ref, "lse": lse_ref, **{"d" + n: g for n, g in zip(names, ref_grads)}}
    return got, ref


def assert_agree(got, ref, tol):
    for name in ref:
        assert got[name].shape == ref[name].shape, name
        err = max_rel(got[name], ref[name])
        assert err <= tol, f"{name}: max rel error {err:.3g} > {tol}"


CASES = {
    "gqa": dict(shape=dict(B=2, Hq=4, Hkv=2, Lq=37, D=16), window=8),
    "hd_eq_hq_linear": dict(shape=dict(B=1, Hq=4, Hkv=2, Hd=4, Lq=50, D=8), window=5, form="linear"),
    "mqa_hd_eq_hq": dict(shape=dict(B=1, Hq=3, Hkv=1, Hd=3, Lq=29, D=8), window=6),
    "multi_tile": dict(shape=dict(B=1, Hq=2, Hkv=2, Lq=150, D=32), window=20),
    "window_ge_L": dict(shape=dict(B=1, Hq=2, Hkv=1, Lq=40, D=8), window=64),
    "window_1": dict(shape=dict(B=2, Hq=2, Hkv=1, Lq=23, D=8), window=1),
    "non_causal": dict(shape=dict(B=1, Hq=4, Hkv=2, Lq=45, D=8), window=7, causal=False),
    "causal_lq_lt_lk": dict(shape=dict(B=1, Hq=2, Hkv=2, Lq=20, Lk=50, D=8), window=9),
    "non_causal_lq_lt_lk": dict(shape=dict(B=1, Hq=2, Hkv=1, Lq=13, Lk=41, D=8), window=10,
                                causal=False),
    "scale": dict(shape=dict(B=1, Hq=2, Hkv=1, Lq=30, D=8), window=6, scale=0.7),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_float64(name):
    case = dict(CASES[name])
    got, ref = run_both(make_inputs(**case.pop("shape")), **case)
    assert_agree(got, ref, 1e-9)


@pytest.mark.parametrize("name", ["gqa", "non_causal", "hd_eq_hq_linear"])
def test_matches_reference_float32(name):
    case = dict(CASES[name])
    got, ref = run_both(make_inputs(**case.pop("shape"), dtype=torch.float32), **case)
    for n in got:
        assert got[n].dtype == torch.float32, n
    # float32 accumulation (sums over keys, queries and heads: da and dw_dt sum the most terms)
    assert_agree(got, ref, 1e-3)


@pytest.mark.parametrize("given", [False, True])
def test_given_delta(given):
    """delta given: its gradient is returned; equals the computed-delta run on the same delta."""
    inputs = make_inputs(B=2, Hq=4, Hkv=2, Hd=4, Lq=33, D=8, given_delta=given)
    got, ref = run_both(inputs, window=6, causal=True)
    assert_agree(got, ref, 1e-9)
    if given:
        assert "ddelta" in got and got["ddelta"].abs().sum() > 0


def test_ties_exp_form_a_zero_is_sliding_window():
    """a = 0 in the exp form: delta = 1 everywhere, every comparison a tie; the most recent keys
    win, so DMA is sliding-window attention (plus a constant logit shift)."""
    inputs = make_inputs(B=1, Hq=2, Hkv=1, Lq=40, D=8)
    with torch.no_grad():
        inputs["a"].zero_()
    for causal in (True, False):
        got, ref = run_both(inputs, window=7, causal=causal)
        assert_agree(got, ref, 1e-9)
        x = {n: t.detach() for n, t in inputs.items()}
        keep = sliding_window_mask(40, 40, 7, causal)
        assert torch.equal(keep_mask(dynamic_weights(x["v"], x["w_dt"], x["a"], "exp"), 40, 7,
                                     causal)[0, 0], keep)
        s = (x["q"] @ x["k"].transpose(-1, -2)) / math.sqrt(8)
        o_sw = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ x["v"]
        assert max_rel(got["o"], o_sw) < 1e-12


def test_ties_given_delta():
    """Heavy ties in a given delta (three distinct values): index breaks them, most recent first."""
    inputs = make_inputs(B=1, Hq=2, Hkv=2, Lq=48, D=8, given_delta=True)
    with torch.no_grad():
        inputs["delta"].copy_(torch.randint(0, 3, inputs["delta"].shape).double())
    got, ref = run_both(inputs, window=5)
    assert_agree(got, ref, 1e-9)


def test_non_contiguous_inputs():
    inputs = make_inputs(B=2, Hq=4, Hkv=2, Lq=21, D=8)
    q = inputs["q"].detach().transpose(1, 2).contiguous().transpose(1, 2)  # (B,H,L,D) view
    assert not q.is_contiguous()
    w_t = inputs["w_dt"].detach().t().contiguous().t()
    o1 = dma_attention(q, inputs["k"].detach(), inputs["v"].detach(), w_t, inputs["a"].detach(),
                       window=5)
    o2 = dma_attention(*(inputs[n].detach().contiguous() for n in ("q", "k", "v", "w_dt", "a")),
                       window=5)
    assert torch.equal(o1, o2)


def test_gradcheck_no_selection_flip():
    """torch.autograd.gradcheck in float64, on a case whose deltas are far apart compared with the
    finite-difference step (so no perturbation flips the selection)."""
    inputs = make_inputs(B=1, Hq=2, Hkv=1, Lq=7, D=4, seed=3)
    x = {n: t.detach() for n, t in inputs.items()}
    d = dynamic_weights(x["v"], x["w_dt"], x["a"], "exp").sort(dim=-1).values
    assert (d[..., 1:] - d[..., :-1]).min() > 1e-3, "pick another seed: deltas too close"
    for causal in (True, False):
        f = lambda q, k, v, w, a: dma_attention(q, k, v, w, a, window=3, causal=causal)  # noqa
        assert torch.autograd.gradcheck(f, tuple(inputs[n] for n in ("q", "k", "v", "w_dt", "a")),
                                        eps=1e-6, atol=1e-6, rtol=1e-5)
    given = make_inputs(B=1, Hq=2, Hkv=2, Hd=2, Lq=6, D=4, given_delta=True, seed=4)
    d = given["delta"].detach().sort(dim=-1).values
    assert (d[..., 1:] - d[..., :-1]).min() > 1e-3, "pick another seed: deltas too close"
    f = lambda q, k, v, delta: dma_attention(q, k, v, delta=delta, window=2, form="linear")  # noqa
    assert torch.autograd.gradcheck(f, tuple(given[n] for n in ("q", "k", "v", "delta")),
                                    eps=1e-6, atol=1e-6, rtol=1e-5)


def test_lse_and_selection_carry_no_gradient():
    inputs = make_inputs(B=1, Hq=2, Hkv=1, Lq=10, D=8)
    o, lse = dma_attention(**inputs, window=4, return_lse=True)
    assert o.requires_grad and not lse.requires_grad


def test_outputs_without_grad():
    inputs = {n: t.detach() for n, t in make_inputs(B=1, Hq=2, Hkv=1, Lq=10, D=8).items()}
    o = dma_attention(**inputs, window=4)
    assert o.shape == (1, 2, 10, 8) and not o.requires_grad
    with torch.no_grad():
        o2, lse = dma_attention(**inputs, window=4, return_lse=True)
    assert torch.equal(o, o2) and lse.shape == (1, 2, 10)
