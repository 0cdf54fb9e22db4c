#!/usr/bin/env python3
"""Decode-step peers: one new query per sequence against a full KV cache of N tokens, PyTorch
(bf16), beside DMA's decode step with a cache bounded to w keys (bench/decode_bench.cpp).

  flash   torch SDPA, flash backend (FlashAttention-2): q (B,Hq,1,D) against k, v (B,Hkv,N,D);
          GQA through enable_gqa, or K/V expanded to Hq heads outside the timing if the backend
          refuses it (the record says which)
  flex    torch.compile'd FlexAttention on the same tensors (enable_gqa=True, no mask): the whole
          cache, as a model without a bounded cache reads it

Times are triton.testing.do_bench medians (it clears the L2 cache before every run), in
microseconds. A configuration whose cache does not fit in device memory is recorded as skipped.

  decode_peers.py [--N 1024,...] [--B 1,32] [--Hq 16 --Hkv 8 --D 128] [--peers flash,flex]
                  [--dma-bench PATH --w 512,2048] [--out DIR] [--budget-s 240]

With --dma-bench (the decode_bench binary) it runs that first, on the same N and B, so DMA and the
peers are measured in one command on the same machine; with --out it writes decode_dma.json,
decode_peers.json and decode_summary.md there (else the peers' JSON goes to stdout). --budget-s
bounds the wall time: configurations left when it runs out (compiling FlexAttention for every
shape is the slow part) are recorded as skipped.
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench


def us(fn, warmup=10, rep=50):
    return 1e3 * do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def cache_bytes(B, Hkv, N, D):  # k and v, bf16
    return 2 * B * Hkv * N * D * 2


def inputs(B, Hq, Hkv, N, D):
    g = torch.Generator(device="cuda").manual_seed(N * 7 + B)
    q = torch.randn(B, Hq, 1, D, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, N, D, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


def time_flash(B, Hq, Hkv, N, D):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = inputs(B, Hq, Hkv, N, D)
    rec = {}
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        # one query that sees every key: not causal (SDPA's causal mask is top-left aligned)
        try:
            fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            fn()
            rec["gqa"] = "enable_gqa"
        except RuntimeError:
            free, _ = torch.cuda.mem_get_info()
            if 2 * cache_bytes(B, Hq, N, D) > 0.9 * free:
                raise
            k = k.repeat_interleave(Hq // Hkv, dim=1).contiguous()
            v = v.repeat_interleave(Hq // Hkv, dim=1).contiguous()
            fn = lambda: F.scaled_dot_product_attention(q, k, v)
            rec["gqa"] = "expanded"
        rec["step_us"] = us(fn)
    return rec


_flex = None


def time_flex(B, Hq, Hkv, N, D):
    global _flex
    from torch.nn.attention.flex_attention import flex_attention
    if _flex is None:
        for limit in ("cache_size_limit", "recompile_limit"):  # one compile per shape, no fallback
            if hasattr(torch._dynamo.config, limit):
                setattr(torch._dynamo.config, limit, 64)
        _flex = torch.compile(flex_attention, dynamic=False)
    q, k, v = inputs(B, Hq, Hkv, N, D)
    fn = lambda: _flex(q, k, v, enable_gqa=True)
    t0 = time.time()
    fn()
    torch.cuda.synchronize()
    return {"compile_s": round(time.time() - t0, 1), "step_us": us(fn)}


def run_peers(a, deadline):
    out = []
    for peer in a.peers:  # every flash point first: flex compiles per shape and may hit the budget
        for B in a.B:
            for N in a.N:
                rec = dict(peer=peer, B=B, N=N, Hq=a.Hq, Hkv=a.Hkv, D=a.D, precision="bf16",
                           full_kv_bytes_per_sequence=cache_bytes(1, a.Hkv, N, a.D))
                free, _ = torch.cuda.mem_get_info()
                if time.time() > deadline:
                    rec["skipped"] = "time budget (--budget-s) spent"
                elif cache_bytes(B, a.Hkv, N, a.D) > 0.9 * free:
                    rec["skipped"] = (f"the full cache needs {cache_bytes(B, a.Hkv, N, a.D) / 1e9:.1f} GB, "
                                      f"{free / 1e9:.1f} GB free")
                else:
                    try:
                        rec.update(time_flash(B, a.Hq, a.Hkv, N, a.D) if peer == "flash"
                                   else time_flex(B, a.Hq, a.Hkv, N, a.D))
                    except Exception as e:  # out of memory, unsupported size: the table says so
                        rec["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
                torch.cuda.empty_cache()
                out.append(rec)
                print(json.dumps(rec), file=sys.stderr, flush=True)
    return out


def summary(dma, peers, a):
    def cell(x, key="step_us"):
        if x is None:
            return "-"
        if key in x:
            return f"{x[key]:.1f}"
        return "skipped" if "skipped" in x else "error"
    lines = [f"Decode step, {torch.cuda.get_device_name()}, {datetime.date.today()}: Hq={a.Hq}, "
             f"Hkv={a.Hkv} (Hd = Hkv), D={a.D}, bf16. Microseconds per step (DMA: L2 flushed, median; "
             f"peers: do_bench median). Memory per sequence and layer in MB.", ""]
    ws = sorted({r["w"] for r in dma if "w" in r and "error" not in r})
    head = ["B", "N"] + [f"DMA w={w}" for w in ws] + [f"DMA w={w} hot" for w in ws] + \
           [p for p in a.peers] + [f"DMA w={w} MB" for w in ws] + ["full KV MB"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for B in a.B:
        for N in a.N:
            d = {r["w"]: r for r in dma if r.get("B") == B and r.get("N") == N}
            p = {r["peer"]: r for r in peers if r["B"] == B and r["N"] == N}
            row = [str(B), str(N)]
            row += [cell(d.get(w), "step_us_cold") for w in ws]
            row += [cell(d.get(w), "step_us_hot") for w in ws]
            row += [cell(p.get(peer)) for peer in a.peers]
            row += [f"{d[w]['cache_bytes_per_sequence'] / 1e6:.1f}" if w in d else "-" for w in ws]
            row.append(f"{cache_bytes(1, a.Hkv, N, a.D) / 1e6:.1f}")
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main():
    ints = lambda s: [int(x) for x in s.split(",")]
    ap = argparse.ArgumentParser()
    ap.add_argument("--N", type=ints, default=ints("1024,4096,16384,65536,262144,1048576"))
    ap.add_argument("--B", type=ints, default=ints("1,32"))
    ap.add_argument("--w", default="512,2048")
    ap.add_argument("--Hq", type=int, default=16)
    ap.add_argument("--Hkv", type=int, default=8)
    ap.add_argument("--D", type=int, default=128)
    ap.add_argument("--peers", type=lambda s: s.split(","), default=["flash", "flex"])
    ap.add_argument("--dma-bench", default="")
    ap.add_argument("--out", default="")
    ap.add_argument("--budget-s", type=float, default=240)
    a = ap.parse_args()
    deadline = time.time() + a.budget_s
    dma = []
    if a.dma_bench:
        cmd = [a.dma_bench, "--N", ",".join(map(str, a.N)), "--B", ",".join(map(str, a.B)),
               "--w", a.w, "--Hq", str(a.Hq), "--Hkv", str(a.Hkv), "--D", str(a.D)]
        print(" ".join(cmd), file=sys.stderr, flush=True)
        run = subprocess.run(cmd, capture_output=True, text=True)
        sys.stderr.write(run.stderr)
        if run.returncode == 0:
            dma = json.loads(run.stdout)
        else:
            print(f"decode_bench exited {run.returncode}; timing the peers only", file=sys.stderr)
    peers = run_peers(a, deadline)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "decode_peers.json"), "w") as f:
            json.dump(peers, f, indent=1)
        if dma:
            with open(os.path.join(a.out, "decode_dma.json"), "w") as f:
                json.dump(dma, f, indent=1)
            with open(os.path.join(a.out, "decode_summary.md"), "w") as f:
                f.write(summary(dma, peers, a))
            print(summary(dma, peers, a))
    else:
        print(json.dumps(peers, indent=1))


if __name__ == "__main__":
    main()
