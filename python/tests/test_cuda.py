"""The CUDA kernels through dma_attention (skipped without a GPU or a CUDA build).

Each case runs the op in bf16/fp16 on the GPU and the float64 CPU op on the same (rounded)
inputs, with the GPU's delta given to the CPU run (so both select the same keys) and chained, by
autograd, to the float64 dynamic weights (so v, w_dt and a get the gradient through delta):
rel L2 <= 1e-2 for the forward, 2e-2 for the gradients.

dw_dt and da sum terms that cancel (a query's softmax gradients sum to zero; exactly, when w = 1),
so a float32 ddelta's small error can be large in them. They are checked in two steps instead:
the GPU's ddelta against the float64 one, and the GPU's dw_dt, da against the float64 chain rule
applied to the GPU's own ddelta.
"""
import math

import pytest
import torch

import dma_torch
from dma_torch import DMAError, DynamicMaskAttention, dma_attention
from _reference import dynamic_weights, rel_l2

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and dma_torch.build_info()["cuda"]),
    reason="no CUDA device, or dma_torch built without CUDA")

FWD_TOL, GRAD_TOL = 1e-2, 2e-2


def gpu_inputs(B, Hq, Hkv, Hd, Lq, Lk, D, dtype, given_delta=False, a_zero=False, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, device="cuda")  # noqa: E731
    t = {"q": r(B, Hq, Lq, D).to(dtype), "k": r(B, Hkv, Lk, D).to(dtype),
         "v": r(B, Hkv, Lk, D).to(dtype)}
    if given_delta:
        t["delta"] = r(B, Hd, Lk)
    else:
        t["w_dt"] = r(Hd, Hkv * D) / math.sqrt(Hkv * D)
        t["a"] = torch.zeros(Hd, device="cuda") if a_zero else \
            0.5 + torch.rand(Hd, generator=g, device="cuda")
    return {n: x.requires_grad_() for n, x in t.items()}


def compare(inputs, window, causal=True, form="exp", scale=None):
    names = list(inputs)
    x = {n: t.detach() for n, t in inputs.items()}
    o, lse = dma_attention(**inputs, window=window, causal=causal, form=form, scale=scale,
                           return_lse=True)
    assert o.dtype == x["q"].dtype and lse.dtype == torch.float32
    # do in q's dtype (the kernels read it so), used in float32 and float64 from there
    do = torch.randn(o.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(9))
    do = do.to(x["q"].dtype).float()
    grads = dict(zip(names, torch.autograd.grad((o.float() * do).sum(), [inputs[n] for n in names])))
    # the GPU's delta (what its selection was made on) and its ddelta
    opts = (window, causal, form, scale or 0.0)
    o32, lse32, delta_gpu, ms = dma_torch._C.forward(x["q"], x["k"], x["v"], x.get("w_dt"), x.get("a"),
                                                     x.get("delta"), *opts, True)
    ddelta_gpu = dma_torch._C.backward(x["q"], x["k"], x["v"], x.get("w_dt"), x.get("a"), delta_gpu,
                                       ms, o32, lse32, do, *opts)[3].double().cpu()

    ref = {n: t.double().cpu().requires_grad_() for n, t in x.items()}
    if "delta" in ref:
        delta = ref["delta"]
    else:
        d64 = dynamic_weights(ref["v"], ref["w_dt"], ref["a"], form)
        delta = delta_gpu.double().cpu() + (d64 - d64.detach())  # GPU values, float64 gradient
    o_ref, lse_ref = dma_attention(ref["q"], ref["k"], ref["v"], delta=delta, window=window,
                                   causal=causal, form=form, scale=scale, return_lse=True)
    attn = [n for n in names if n not in ("w_dt", "a")]
    ref_grads = torch.autograd.grad((o_ref * do.double().cpu()).sum(),
                                    [ref[n] for n in attn] + ([] if "delta" in ref else [delta]),
                                    retain_graph=True)
    errs = {"o": rel_l2(o, o_ref), "lse": rel_l2(lse, lse_ref)}
    errs.update({"d" + n: rel_l2(grads[n], g) for n, g in zip(attn, ref_grads)})
    if "delta" not in ref:
        errs["ddelta"] = rel_l2(ddelta_gpu, ref_grads[-1])
        chain = torch.autograd.grad(d64, [ref["w_dt"], ref["a"]], grad_outputs=ddelta_gpu)
        errs["dw_dt"] = rel_l2(grads["w_dt"], chain[0])
        errs["da"] = rel_l2(grads["a"], chain[1])
    print(" ".join(f"{n}={e:.2e}" for n, e in errs.items()))  # shown with pytest -s
    bad = {n: e for n, e in errs.items() if e > (FWD_TOL if n in ("o", "lse") else GRAD_TOL)}
    assert not bad, f"rel L2 too large: {bad} (all: {errs})"


CASES = {
    "bf16_gqa_d64": dict(shape=(2, 4, 2, 2, 300, 300, 64), dtype=torch.bfloat16, window=64),
    "fp16_hd_eq_hq_d128_linear": dict(shape=(1, 4, 2, 4, 200, 200, 128), dtype=torch.float16,
                                      window=32, form="linear"),
    "bf16_non_causal": dict(shape=(1, 2, 1, 1, 257, 257, 64), dtype=torch.bfloat16, window=40,
                            causal=False),
    "bf16_window_ge_L": dict(shape=(1, 2, 2, 2, 100, 100, 64), dtype=torch.bfloat16, window=128),
    "bf16_window_1": dict(shape=(1, 2, 1, 2, 130, 130, 128), dtype=torch.bfloat16, window=1),
    "bf16_causal_lq_lt_lk": dict(shape=(1, 2, 2, 2, 70, 190, 64), dtype=torch.bfloat16, window=50),
    "bf16_ties_a0": dict(shape=(1, 2, 1, 1, 160, 160, 64), dtype=torch.bfloat16, window=24,
                         a_zero=True),
    "bf16_given_delta": dict(shape=(2, 4, 2, 4, 150, 150, 64), dtype=torch.bfloat16, window=20,
                             given_delta=True),
    "fp16_scale": dict(shape=(1, 2, 2, 2, 96, 96, 64), dtype=torch.float16, window=16, scale=0.1),
    # head dims 32 and 256 run the mma.sync kernels also on Hopper
    "bf16_d32": dict(shape=(1, 4, 2, 2, 300, 300, 32), dtype=torch.bfloat16, window=64),
    "fp16_d256_gqa": dict(shape=(1, 4, 2, 4, 200, 200, 256), dtype=torch.float16, window=48),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cuda_matches_cpu_float64(name):
    c = dict(CASES[name])
    inputs = gpu_inputs(*c.pop("shape"), c.pop("dtype"), given_delta=c.pop("given_delta", False),
                        a_zero=c.pop("a_zero", False))
    compare(inputs, **c)


def test_cuda_current_stream_and_non_contiguous():
    inputs = {n: t.detach() for n, t in gpu_inputs(1, 4, 2, 2, 128, 128, 64, torch.bfloat16).items()}
    o_ref = dma_attention(**inputs, window=16)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        q = inputs["q"].transpose(1, 2).contiguous().transpose(1, 2)
        o = dma_attention(q, inputs["k"], inputs["v"], inputs["w_dt"], inputs["a"], window=16)
    torch.cuda.current_stream().wait_stream(s)
    assert not q.is_contiguous()
    assert torch.equal(o, o_ref)


def test_cuda_errors():
    x = {n: t.detach() for n, t in gpu_inputs(1, 2, 2, 2, 32, 32, 64, torch.bfloat16).items()}
    with pytest.raises(ValueError, match="q: head dim 48"):
        dma_attention(x["q"][..., :48], x["k"][..., :48], x["v"][..., :48],
                      torch.zeros(2, 96, device="cuda"), x["a"], window=4)
    with pytest.raises(TypeError, match="q: dtype torch.float32"):
        dma_attention(x["q"].float(), x["k"].float(), x["v"].float(), x["w_dt"], x["a"], window=4)
    with pytest.raises(ValueError, match="k: is on cpu"):
        dma_attention(x["q"], x["k"].cpu(), x["v"], x["w_dt"], x["a"], window=4)
    delta = torch.randn(1, 2, 32, device="cuda")
    delta[0, 1, 5] = float("nan")
    with pytest.raises(DMAError, match="delta"):
        dma_attention(x["q"], x["k"], x["v"], delta=delta, window=4)
    q = x["q"].clone()
    q[0, 0, 3, 1] = float("inf")
    with pytest.raises(DMAError, match="q"):
        dma_attention(q, x["k"], x["v"], x["w_dt"], x["a"], window=4)
    # the device is still usable afterwards
    assert torch.isfinite(dma_attention(**x, window=4)).all()


def test_cuda_module_trains():
    torch.manual_seed(0)
    m = DynamicMaskAttention(256, 4, 2, window=16, rope=True).cuda()
    head = torch.nn.Linear(256, 256).cuda()
    opt = torch.optim.Adam(list(m.parameters()) + list(head.parameters()), lr=1e-3)
    x = torch.randn(4, 96, 256, device="cuda")
    target = torch.roll(x, shifts=3, dims=1)  # copy the token three back
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.mse_loss(head(m(x)), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses
    assert m.a.grad is not None and torch.isfinite(m.a.grad).all()


def test_cuda_graph_capture_forward_backward():
    # With the checks off, a forward + backward enqueues kernels only (no allocation outside
    # torch's allocator, no synchronisation), so it can be captured into a CUDA graph and
    # replayed; the replay gives what eager mode gives.
    x = {n: t.detach().requires_grad_() for n, t in
         gpu_inputs(1, 4, 2, 2, 256, 256, 128, torch.bfloat16, seed=3).items()}
    leaves = [x[n] for n in ("q", "k", "v", "w_dt", "a")]
    g_o = torch.randn_like(x["q"])

    def step():
        o = dma_attention(**x, window=32)
        return [o] + list(torch.autograd.grad(o, leaves, g_o))

    eager = step()
    # Fresh leaves for the capture: autograd nodes first used on the default (legacy) stream must
    # not take part in a capture on another stream.
    x = {n: t.detach().clone().requires_grad_() for n, t in x.items()}
    leaves = [x[n] for n in ("q", "k", "v", "w_dt", "a")]
    dma_torch.set_cuda_checks(False)
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):  # warm-up on a side stream, as torch.cuda.graphs asks
                step()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
        for _ in range(2):
            graph.replay()
            torch.cuda.synchronize()
            names = ["o", "dq", "dk", "dv", "dw_dt", "da"]
            for name, got, want in zip(names, captured, eager):
                # o and dq have no atomics: bitwise; the rest within float32 summation order
                if name in ("o", "dq"):
                    assert torch.equal(got, want), name
                else:
                    assert rel_l2(got.double(), want.double()) < 1e-4, name
    finally:
        dma_torch.set_cuda_checks(True)


def test_cuda_memory_is_linear_in_length():
    # N = 64K: an N^2 mask of one head alone would be 4.3 GB in bytes (a float32 bias for the 8
    # query heads 137 GB); the op's peak, forward and backward, is what its O(N) tensors take.
    B, Hq, Hkv, L, D = 1, 8, 4, 65536, 128
    q = torch.randn(B, Hq, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, L, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w_dt = (torch.randn(Hkv, Hkv * D, device="cuda") / math.sqrt(Hkv * D)).requires_grad_()
    a = torch.rand(Hkv, device="cuda").requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    o = dma_attention(q, k, v, w_dt, a, window=512)
    o.backward(torch.randn_like(o))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    qkv_bytes = (q.numel() + 2 * k.numel()) * 2
    assert peak < 12 * qkv_bytes, (peak, qkv_bytes)  # float32 o, dq, dk, dv, workspace
    assert peak < L * L, peak  # less than one head's N x N byte mask (4.3 GB; measured 1.6 GB)
