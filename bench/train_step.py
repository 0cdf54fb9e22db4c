#!/usr/bin/env python3
"""Training-step benchmark: a small transformer with DynamicMaskAttention against the same model
with dense causal attention through SDPA (flash backend) and FlexAttention (compiled, causal).

    PYTHONPATH=<dma_torch build> python3 bench/train_step.py [--N 16384] [--window 2048] [--layers 2] [--d-model 1024]
                                  [--heads 16] [--kv-heads 8] [--steps 10] [--peers flash,flex]

One step = forward, loss, backward and an AdamW update, weights and activations in bf16; timed
by CUDA events, the median of --steps after 3 warm-up steps; tokens/s = B*N / step time. Prints a
markdown table and JSON (one object per attention). Needs a CUDA device and dma_torch built with
CUDA.
"""
import argparse
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from dma_torch import DynamicMaskAttention


class DenseAttention(nn.Module):
    """The same projections as DynamicMaskAttention, dense causal attention in the middle."""

    def __init__(self, d_model, n_heads, n_kv_heads, kind):
        super().__init__()
        self.h, self.hkv, self.dh = n_heads, n_kv_heads, d_model // n_heads
        self.q = nn.Linear(d_model, n_heads * self.dh, bias=False)
        self.k = nn.Linear(d_model, n_kv_heads * self.dh, bias=False)
        self.v = nn.Linear(d_model, n_kv_heads * self.dh, bias=False)
        self.o = nn.Linear(n_heads * self.dh, d_model, bias=False)
        self.kind = kind
        if kind == "flex":
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            self.flex = torch.compile(flex_attention)
            self.create_block_mask = create_block_mask
            self.block_mask = None

    def forward(self, x):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.h, self.dh).transpose(1, 2)
        k = self.k(x).view(B, L, self.hkv, self.dh).transpose(1, 2)
        v = self.v(x).view(B, L, self.hkv, self.dh).transpose(1, 2)
        if self.kind == "flash":
            rep = self.h // self.hkv
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            if self.block_mask is None:
                self.block_mask = self.create_block_mask(lambda b, h, i, j: j <= i, None, None, L, L)
            o = self.flex(q, k, v, block_mask=self.block_mask, enable_gqa=True)
        return self.o(o.transpose(1, 2).reshape(B, L, -1))


class Block(nn.Module):
    def __init__(self, attn, d_model):
        super().__init__()
        self.n1, self.n2, self.attn = nn.LayerNorm(d_model), nn.LayerNorm(d_model), attn
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(),
                                 nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        x = x + self.attn(self.n1(x))
        return x + self.mlp(self.n2(x))


def model(kind, a):
    def attn():
        if kind == "dma":
            return DynamicMaskAttention(a.d_model, a.heads, a.kv_heads, window=a.window)
        return DenseAttention(a.d_model, a.heads, a.kv_heads, kind)
    return nn.Sequential(nn.Embedding(a.vocab, a.d_model),
                         *[Block(attn(), a.d_model) for _ in range(a.layers)],
                         nn.LayerNorm(a.d_model), nn.Linear(a.d_model, a.vocab))


def time_steps(kind, a):
    torch.manual_seed(0)
    m = model(kind, a).cuda().to(torch.bfloat16)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4)
    tokens = torch.randint(0, a.vocab, (a.B, a.N + 1), device="cuda")
    x, y = tokens[:, :-1], tokens[:, 1:]
    times, loss = [], None
    torch.cuda.reset_peak_memory_stats()
    for step in range(3 + a.steps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        loss = F.cross_entropy(m(x).float().view(-1, a.vocab), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        e1.record()
        torch.cuda.synchronize()
        if step >= 3:
            times.append(e0.elapsed_time(e1))
    ms = sorted(times)[len(times) // 2]
    return {"attention": kind, "N": a.N, "B": a.B, "window": a.window if kind == "dma" else a.N,
            "layers": a.layers, "d_model": a.d_model, "heads": a.heads, "kv_heads": a.kv_heads,
            "step_ms": ms, "tokens_per_s": a.B * a.N / (ms / 1e3),
            "peak_gb": torch.cuda.max_memory_allocated() / 1e9, "loss": loss.item()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--N", type=int, default=16384)
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--window", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--d-model", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peers", default="flash,flex")
    a = ap.parse_args()
    rows = []
    for kind in ["dma"] + [p for p in a.peers.split(",") if p]:
        t0 = time.time()
        try:
            rows.append(time_steps(kind, a))
        except Exception as e:  # a peer that cannot run here is reported, not fatal
            rows.append({"attention": kind, "error": f"{type(e).__name__}: {str(e)[:200]}"})
        rows[-1]["wall_s"] = round(time.time() - t0, 1)
        torch.cuda.empty_cache()
    print(json.dumps(rows, indent=1))
    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}; {a.layers} layers, d_model "
          f"{a.d_model}, {a.heads}/{a.kv_heads} heads (head dim {a.d_model // a.heads}), B={a.B}, "
          f"N={a.N}, bf16, AdamW\n")
    print("| attention | step ms | tokens/s | step time / DMA's | peak GB |\n|---|---|---|---|---|")
    dma_ms = rows[0].get("step_ms")
    for r in rows:
        if "error" in r:
            print(f"| {r['attention']} | error: {r['error']} | | | |")
            continue
        print(f"| {r['attention']}{' w=' + str(r['window']) if r['attention'] == 'dma' else ''} | "
              f"{r['step_ms']:.2f} | {r['tokens_per_s']:.0f} | "
              f"{r['step_ms'] / dma_ms:.2f}x | {r['peak_gb']:.2f} |")


if __name__ == "__main__":
    main()
