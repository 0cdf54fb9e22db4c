#!/usr/bin/env python3
"""Plot of the decode benchmark: step time against context length, DMA's bounded cache against
the peers reading the full cache, one panel per batch size.

    python3 bench/decode_plot.py DMA_JSON PEERS_JSON OUT_PNG

DMA_JSON is what decode_bench writes (via decode_peers.py --dma-bench), PEERS_JSON what
decode_peers.py writes; entries with an error or skipped are left out.
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    dma = json.load(open(sys.argv[1]))
    peers = json.load(open(sys.argv[2]))
    batches = sorted({r["B"] for r in dma})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.2), squeeze=False)
    for ax, B in zip(axes[0], batches):
        for w in sorted({r["w"] for r in dma}):
            rows = sorted((r for r in dma if r["B"] == B and r["w"] == w), key=lambda r: r["N"])
            ax.plot([r["N"] for r in rows], [r["step_us_cold"] for r in rows], "o-",
                    label=f"DMA, cache of w = {w}")
        for peer in sorted({r["peer"] for r in peers}):
            rows = sorted((r for r in peers if r["peer"] == peer and r["B"] == B
                           and isinstance(r.get("step_us"), (int, float))), key=lambda r: r["N"])
            if rows:
                ax.plot([r["N"] for r in rows], [r["step_us"] for r in rows], "s--",
                        label=f"{peer}, full cache")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length N (tokens)")
        ax.set_ylabel("µs per decode step (one layer)")
        ax.set_title(f"B = {B}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    r0 = dma[0]
    fig.suptitle(f"Decode step, Hq={r0['Hq']}, Hkv={r0['Hkv']}, D={r0['D']}, {r0['precision']}")
    fig.tight_layout()
    fig.savefig(sys.argv[3], dpi=110)


if __name__ == "__main__":
    main()
