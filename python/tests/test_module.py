"""DynamicMaskAttention as the attention of a small transformer."""
import pytest
import torch
from torch import nn

from dma_torch import DynamicMaskAttention
from _reference import dma_reference, max_rel


class Block(nn.Module):
    def __init__(self, d, **attn):
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = DynamicMaskAttention(d, **attn)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab=16, d=32, layers=2, **attn):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*(Block(d, **attn) for _ in range(layers)))
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        return self.head(self.blocks(self.emb(tokens)))


def copy_task(batch, length, vocab, period, gen):
    """Sequences that repeat with a period: token t equals token t - period."""
    first = torch.randint(0, vocab, (batch, period), generator=gen)
    return first.repeat(1, length // period + 1)[:, :length]


def train(model, steps, device="cpu", length=24, period=5, lr=3e-3, batch=8):
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        x = copy_task(batch, length, 16, period, gen).to(device)
        logits = model(x[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, 16).float(), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_toy_lm_trains():
    model = TinyLM(n_heads=4, n_kv_heads=2, window=8, rope=True)
    losses = train(model, 120, lr=1e-2)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, losses
    for p in model.parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all()
    attn = model.blocks[0].attn
    assert attn.w_dt.weight.grad.abs().sum() > 0 and attn.a.grad.abs().sum() > 0


@pytest.mark.parametrize("kw", [dict(n_heads=4, n_kv_heads=2, window=6),
                                dict(n_heads=4, n_kv_heads=1, window=3, hd_per_query_head=True,
                                     form="linear"),
                                dict(n_heads=2, n_kv_heads=2, window=50, rope=True, causal=False,
                                     head_dim=12)])
def test_module_matches_reference(kw):
    """The layer is the projections + dma_attention: recompute it with the float64 reference."""
    torch.manual_seed(1)
    m = DynamicMaskAttention(24, **kw).double()
    x = torch.randn(2, 19, 24, dtype=torch.float64, requires_grad=True)
    y = m(x)
    assert y.shape == x.shape

    H, Hkv, D = m.n_heads, m.n_kv_heads, m.head_dim
    q = m.q_proj(x).view(2, 19, H, D).transpose(1, 2)
    k = m.k_proj(x).view(2, 19, Hkv, D).transpose(1, 2)
    v = m.v_proj(x).view(2, 19, Hkv, D).transpose(1, 2)
    if m.rope:
        q, k = m._apply_rope(q), m._apply_rope(k)
    o, _, _, _ = dma_reference(q, k, v, m.w_dt.weight, m.a, window=m.window, causal=m.causal,
                               form=m.form)
    y_ref = m.o_proj(o.transpose(1, 2).reshape(2, 19, H * D))
    assert max_rel(y, y_ref) < 1e-9
    g = torch.autograd.grad(y.sum(), [x, m.w_dt.weight, m.a])
    g_ref = torch.autograd.grad(y_ref.sum(), [x, m.w_dt.weight, m.a])
    for a, b in zip(g, g_ref):
        assert max_rel(a, b) < 1e-9


def test_delta_not_flat_at_init():
    m = DynamicMaskAttention(32, 4, 2, window=4)
    x = torch.randn(1, 16, 32)
    v = m.v_proj(x).view(1, 16, 2, 8).transpose(1, 2)
    from _reference import dynamic_weights
    d = dynamic_weights(v.double(), m.w_dt.weight.double(), m.a.double(), "exp")
    assert (d.std(dim=-1) > 1e-3).all()


def test_module_rejects_bad_config():
    with pytest.raises(ValueError, match="n_kv_heads"):
        DynamicMaskAttention(32, 4, 3, window=4)
    with pytest.raises(ValueError, match="window"):
        DynamicMaskAttention(32, 4, 2, window=0)
    with pytest.raises(ValueError, match="x: expected shape"):
        DynamicMaskAttention(32, 4, 2, window=4)(torch.randn(2, 5, 31))


def test_rope_frequencies_survive_a_dtype_cast():
    # module.to(bf16) must not round the rotary frequencies (bf16 would put the phases radians
    # off at long positions): they are made in float32 at every call.
    torch.manual_seed(0)
    m = DynamicMaskAttention(64, 2, 1, window=8, rope=True)
    x = torch.randn(1, 2, 4096, 32, dtype=torch.float64)
    want = m._apply_rope(x)
    m.to(torch.bfloat16)
    assert torch.equal(m._apply_rope(x), want)
