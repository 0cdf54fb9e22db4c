#!/usr/bin/env python3
"""Peers of the DMA kernels on the same shapes, timed on the GPU machine (PyTorch, Triton):

  flash   torch SDPA, flash backend (FlashAttention-2), dense causal
  cudnn   torch SDPA, cuDNN backend, dense causal
  flex    compiled FlexAttention with the exact DMA mask (mask_mod reading the eviction positions
          that dma_bench --dump wrote: evict_N{N}_w{w}.npy, delta_N{N}_w{w}.npy, (B,Hd,N)) and
          delta as a score_mod bias with its gradient

Prints one JSON object per (peer, N, w) in a JSON array. FLOPs: 4*D per (query, key) pair
forward, 10*D backward (the FlashAttention convention); pairs are the dense causal ones for
flash/cudnn and the kept ones for flex.

  peers.py --N 8192,16384 --w 2048,0 [--D 128 --Hq 16 --Hkv 8] [--peers flash,cudnn,flex]
           [--dump DIR]   (w = 0: dense)
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench


def ms(fn, warmup=25, rep=100):
    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def dense_inputs(B, Hq, Hkv, N, D, grad=True):
    g = torch.Generator(device="cuda").manual_seed(N * 7 + D)
    q = torch.randn(B, Hq, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    # SDPA's flash and cuDNN backends want equal head counts: expand GQA outside the timing.
    k = k.repeat_interleave(Hq // Hkv, dim=1).contiguous()
    v = v.repeat_interleave(Hq // Hkv, dim=1).contiguous()
    for t in (q, k, v):
        t.requires_grad_(grad)
    do = torch.randn_like(q)
    return q, k, v, do


def time_sdpa(backend, B, Hq, Hkv, N, D):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    q, k, v, do = dense_inputs(B, Hq, Hkv, N, D)
    with sdpa_kernel([be]):
        fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)
        t_fwd = ms(fwd)
        def fwd_bwd():
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            o.backward(do)
        t_fb = ms(fwd_bwd)
    torch.cuda.reset_peak_memory_stats()
    with sdpa_kernel([be]):
        fwd_bwd()
    torch.cuda.synchronize()
    pairs = B * Hq * N * (N + 1) / 2
    return dict(fwd_ms=t_fwd, fwd_bwd_ms=t_fb, pairs=pairs,
                fwd_tflops=4 * D * pairs / (t_fwd * 1e9),
                fwd_bwd_tflops=14 * D * pairs / (t_fb * 1e9),
                peak_bytes=torch.cuda.max_memory_allocated())


_flex = None


def time_flex(B, Hq, Hkv, N, D, w, dump):
    global _flex
    import numpy as np
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if _flex is None:
        _flex = torch.compile(flex_attention, dynamic=False)
    if not dump:
        raise ValueError("flex needs --dump DIR, the folder dma_bench --dump wrote")
    Hd = Hkv  # dma_bench uses Hd = Hkv

    def load(name, dtype):  # dma_bench --dump: delta_N{N}_w{w}.npy float32, evict_... int32
        x = np.load(os.path.join(dump, f"{name}_N{N}_w{w}.npy"))
        if x.shape != (B, Hd, N):
            raise ValueError(f"{name}_N{N}_w{w}.npy has shape {x.shape}, expected {(B, Hd, N)}")
        return torch.from_numpy(x.astype(dtype, copy=False)).cuda()

    delta = load("delta", np.float32)
    evict = load("evict", np.int32)
    group = Hq // Hd

    def mask_mod(b, h, q_idx, kv_idx):  # causal with Lq == Lk: p_i = i; kept iff j <= p_i <= e_j
        return (kv_idx <= q_idx) & (q_idx <= evict[b, h // group, kv_idx])

    bias = delta.clone().requires_grad_(True)

    def score_mod(score, b, h, q_idx, kv_idx):  # s = scale * q.k + delta_j
        return score + bias[b, h // group, kv_idx]

    def make_mask():
        try:
            return create_block_mask(mask_mod, B, Hq, N, N, device="cuda", _compile=True)
        except TypeError:
            return create_block_mask(mask_mod, B, Hq, N, N, device="cuda")

    block_mask = make_mask()
    g = torch.Generator(device="cuda").manual_seed(N * 7 + D)
    q = torch.randn(B, Hq, N, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    v = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    do = torch.randn_like(q)
    fwd = lambda: _flex(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)
    t_fwd = ms(fwd)

    def fwd_bwd():
        o = _flex(q, k, v, score_mod=score_mod, block_mask=block_mask, enable_gqa=True)
        o.backward(do)
    t_fb = ms(fwd_bwd)
    t_mask = ms(make_mask, warmup=1, rep=5)
    # kept pairs of this mask, counted as dma_bench counts them
    pos = torch.arange(N, device="cuda")
    kept = (torch.minimum(evict.long(), torch.tensor(N - 1, device="cuda")) - pos + 1).clamp(min=0)
    pairs = float(kept.sum().item()) * group
    torch.cuda.reset_peak_memory_stats()
    fwd_bwd()
    torch.cuda.synchronize()
    return dict(fwd_ms=t_fwd, fwd_bwd_ms=t_fb, block_mask_ms=t_mask, pairs=pairs,
                fwd_tflops=4 * D * pairs / (t_fwd * 1e9),
                fwd_bwd_tflops=14 * D * pairs / (t_fb * 1e9),
                peak_bytes=torch.cuda.max_memory_allocated())


def ceilings():
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = ms(lambda: a @ b)
    x = torch.empty(2 * 1024**3, dtype=torch.uint8, device="cuda").random_()
    y = torch.empty_like(x)
    tc = ms(lambda: y.copy_(x))
    return dict(matmul_bf16_tflops=2 * 8192**3 / (t * 1e9), copy_tbps=2 * x.numel() / (tc * 1e9))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", default="8192")
    ap.add_argument("--w", default="0")
    ap.add_argument("--B", type=int, default=1)
    ap.add_argument("--Hq", type=int, default=16)
    ap.add_argument("--Hkv", type=int, default=8)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--peers", default="flash,cudnn")
    ap.add_argument("--dump", default="")
    ap.add_argument("--ceilings", action="store_true")
    a = ap.parse_args()
    out = []
    if a.ceilings:
        out.append(dict(peer="ceilings", gpu=torch.cuda.get_device_name(), **ceilings()))
    for N in map(int, a.N.split(",")):
        for peer in a.peers.split(","):
            ws = [0] if peer in ("flash", "cudnn") else [int(x) for x in a.w.split(",")]
            for w in sorted({w0 if w0 > 0 else N for w0 in ws}):
                rec = dict(peer=peer, N=N, w=w, B=a.B, Hq=a.Hq, Hkv=a.Hkv, D=a.D)
                try:
                    if peer in ("flash", "cudnn"):
                        rec.update(time_sdpa(peer, a.B, a.Hq, a.Hkv, N, a.D))
                    else:
                        rec.update(time_flex(a.B, a.Hq, a.Hkv, N, a.D, w, a.dump))
                except Exception as e:  # out of memory, unsupported size: the table says so
                    rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                torch.cuda.empty_cache()
                out.append(rec)
                print(json.dumps(rec), file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
