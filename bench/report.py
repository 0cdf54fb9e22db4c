#!/usr/bin/env python3
"""Markdown table of one GPU run: dma_bench.json (ours) beside peers.json (SDPA flash / cuDNN /
FlexAttention). Usage: report.py dma_bench.json peers.json [--plot out.png]"""
import json
import sys


def main():
    ours = json.load(open(sys.argv[1]))
    peers = json.load(open(sys.argv[2]))
    plot = sys.argv[sys.argv.index("--plot") + 1] if "--plot" in sys.argv else None
    ceil = next((p for p in peers if p.get("peer") == "ceilings"), None)
    if ceil:
        print(f"GPU: {ceil['gpu']}; measured ceilings: bf16 matmul {ceil['matmul_bf16_tflops']:.0f} "
              f"TFLOP/s, device copy {ceil['copy_tbps']:.2f} TB/s\n")
    peer = {(p["peer"], p["N"], p.get("w")): p for p in peers if p.get("peer") != "ceilings"}
    cols = ["N", "w", "D", "DMA delta+mask", "DMA fwd", "DMA fwd TFLOP/s", "DMA fwd+bwd (all phases)",
            "FA2 fwd", "FA2 fwd+bwd", "cuDNN fwd", "cuDNN fwd+bwd", "Flex block mask", "Flex fwd",
            "Flex fwd+bwd", "fwd (delta+mask incl.) vs FA2", "fwd+bwd vs FA2", "fwd+bwd vs Flex",
            "work / causal dense", "DMA mem GB", "FA2 mem GB", "Flex mem GB"]
    print("Times in ms (medians).\n")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    rows = []
    for r in ours:
        if "error" in r:
            print(f"| {r['N']} | {r['w']} | {r['D']} | failed: {r['error']} |" + " |" * (len(cols) - 4))
            continue
        N, w = r["N"], r["w"]
        fa = peer.get(("flash", N, N), {})
        cu = peer.get(("cudnn", N, N), {})
        fx = peer.get(("flex", N, w), {})
        f = lambda d, k: (f"{d[k]:.3f}" if k in d else ("n/a" if "error" not in d else "fails"))
        gb = lambda d: f"{d['peak_bytes'] / 1e9:.2f}" if "peak_bytes" in d else "n/a"
        ratio = lambda d, k, ours_ms: f"{d[k] / ours_ms:.2f}x" if k in d and ours_ms > 0 else "-"
        fwd_mask = r["delta_ms"] + r["mask_ms"] + r["forward_ms"]
        cells = [N, w, r["D"], f"{r['delta_ms'] + r['mask_ms']:.3f}", f"{r['forward_ms']:.3f}",
                 f"{r['fwd_tflops']:.0f}", f"{r['total_ms']:.3f}", f(fa, "fwd_ms"), f(fa, "fwd_bwd_ms"),
                 f(cu, "fwd_ms"), f(cu, "fwd_bwd_ms"), f(fx, "block_mask_ms"), f(fx, "fwd_ms"),
                 f(fx, "fwd_bwd_ms"), ratio(fa, "fwd_ms", fwd_mask), ratio(fa, "fwd_bwd_ms", r["total_ms"]),
                 ratio(fx, "fwd_bwd_ms", r["total_ms"]), f"{r['computed_pairs'] / r['dense_causal_pairs']:.2f}",
                 f"{r['peak_bytes'] / 1e9:.2f}", gb(fa), gb(fx)]
        print("| " + " | ".join(str(c) for c in cells) + " |")
        rows.append((N, w, r, fa, cu, fx))
    print("\nTFLOP/s count 4*D FLOPs per kept (query, key) pair forward and 10*D backward; the"
          " dense peers count every causal pair. Ratios > 1 mean DMA is faster (time of the peer /"
          " time of DMA). DMA times include the dynamic weights and the mask build; Flex's block"
          " mask build (its 'Flex block mask' column) is not in its fwd and fwd+bwd times. DMA mem"
          " is the sum of its device buffers; the peers' is torch.cuda.max_memory_allocated.")
    for p in peers:
        if "error" in p:
            print(f"\n- {p['peer']} N={p['N']} w={p.get('w')}: {p['error']}")
    if plot and rows:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 5))
        for w_kind in sorted({(w == N, w if w != N else 0) for N, w, *_ in rows}):
            pts = [(N, r["total_ms"]) for N, w, r, *_ in rows if (w == N, w if w != N else 0) == w_kind]
            label = "DMA dense (w=N)" if w_kind[0] else f"DMA w={w_kind[1]}"
            ax.plot(*zip(*sorted(pts)), "o-", label=label + " fwd+bwd")
        fa_pts = sorted({(N, fa["fwd_bwd_ms"]) for N, w, r, fa, cu, fx in rows if "fwd_bwd_ms" in fa})
        if fa_pts:
            ax.plot(*zip(*fa_pts), "k--", label="FlashAttention-2 (SDPA) dense causal fwd+bwd")
        cu_pts = sorted({(N, cu["fwd_bwd_ms"]) for N, w, r, fa, cu, fx in rows if "fwd_bwd_ms" in cu})
        if cu_pts:
            ax.plot(*zip(*cu_pts), "k:", label="cuDNN (SDPA) dense causal fwd+bwd")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("N (B=1, Hq=16, Hkv=8, bf16, causal)")
        ax.set_ylabel("ms (median)")
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
        fig.tight_layout()
        fig.savefig(plot, dpi=120)


if __name__ == "__main__":
    main()
