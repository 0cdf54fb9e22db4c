"""torch.compile(fullgraph=True) through the custom op (torch >= 2.4; skipped before)."""
import pytest
import torch

import dma_torch
from dma_torch import DynamicMaskAttention, dma_attention

needs_custom_op = pytest.mark.skipif(not dma_torch.HAS_CUSTOM_OP,
                                     reason=f"torch {torch.__version__} < 2.4: no torch.library.custom_op")


def _devices():
    devs = ["cpu"]
    if torch.cuda.is_available() and dma_torch.build_info()["cuda"]:
        devs.append("cuda")
    return devs


@needs_custom_op
@pytest.mark.parametrize("device", _devices())
def test_compile_fullgraph_module(device):
    dtype = torch.float32
    torch.manual_seed(0)
    D = 64 if device == "cuda" else 8
    m = DynamicMaskAttention(4 * D, 4, 2, window=8, rope=True).to(device)
    x = torch.randn(2, 40, 4 * D, device=device, dtype=dtype, requires_grad=True)
    y_eager = m(x)
    g_eager = torch.autograd.grad(y_eager.sum(), [x, m.w_dt.weight, m.a])
    torch._dynamo.reset()
    cm = torch.compile(m, fullgraph=True, backend="aot_eager")
    y = cm(x)
    g = torch.autograd.grad(y.sum(), [x, m.w_dt.weight, m.a])
    tol = 1e-5 if device == "cpu" else 1e-2
    assert (y - y_eager).abs().max() <= tol * y_eager.abs().max()
    for a, b in zip(g, g_eager):
        assert (a - b).abs().max() <= tol * b.abs().max() + 1e-12


@needs_custom_op
def test_opcheck_forward_op():
    """torch.library.opcheck: schema, fake implementation, autograd registration, AOT dispatch."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = (0.3 * torch.randn(1, 8, generator=g, dtype=torch.float64)).requires_grad_()
    a = torch.rand(1, generator=g, dtype=torch.float64).requires_grad_()
    op = torch.ops.dma_torch.attention_forward.default
    torch.library.opcheck(op, (q, k, v, w, a, None, 3, True, "exp", 0.0, True))
    delta = torch.randn(1, 2, 9, generator=g, dtype=torch.float64, requires_grad=True)
    torch.library.opcheck(op, (q, k, v, None, None, delta, 3, False, "linear", 0.5, True))


@needs_custom_op
def test_compile_dynamic_shapes_cpu():
    torch._dynamo.reset()
    f = torch.compile(lambda q, k, v, w, a: dma_attention(q, k, v, w, a, window=4),
                      fullgraph=True, backend="aot_eager", dynamic=True)
    for L in (12, 17):
        q = torch.randn(1, 2, L, 8)
        k, v = torch.randn(1, 2, L, 8), torch.randn(1, 2, L, 8)
        w, a = 0.3 * torch.randn(2, 16), torch.rand(2)
        assert torch.allclose(f(q, k, v, w, a), dma_attention(q, k, v, w, a, window=4))
