#!/usr/bin/env python3
"""Compares the outputs of two bundles, tensor by tensor (e.g. dma_run --backend cuda vs cpu).

usage: compare_bundles.py REF_DIR GOT_DIR [--tol-fwd 1e-2] [--tol-grad 2e-2]

Prints the relative L2 error ||got - ref|| / ||ref|| of every float output both hold and whether
evict and mask are identical; exits 1 when o/lse exceed --tol-fwd or dq/dk/dv/ddelta exceed
--tol-grad (docs/design.md §5's bf16 tolerances by default).
"""
import argparse
import os
import sys

import numpy as np

FORWARD = ("o", "lse")
GRADS = ("dq", "dk", "dv", "ddelta")
OTHER = ("delta", "dw_dt", "da")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("ref")
    ap.add_argument("got")
    ap.add_argument("--tol-fwd", type=float, default=1e-2)
    ap.add_argument("--tol-grad", type=float, default=2e-2)
    args = ap.parse_args()
    ok = True
    for name in FORWARD + GRADS + OTHER + ("evict", "mask"):
        paths = [os.path.join(d, name + ".npy") for d in (args.ref, args.got)]
        if not all(os.path.exists(p) for p in paths):
            continue
        ref, got = (np.load(p) for p in paths)
        if name in ("evict", "mask"):
            same = ref.shape == got.shape and np.array_equal(ref, got)
            print(f"{name:7s} {'identical' if same else 'DIFFERENT'}")
            continue
        ref, got = ref.astype(np.float64), got.astype(np.float64)
        err = np.linalg.norm(got - ref) / max(np.linalg.norm(ref), 1e-30)
        tol = args.tol_fwd if name in FORWARD else args.tol_grad if name in GRADS else None
        bad = tol is not None and not err <= tol
        ok &= not bad
        print(f"{name:7s} rel L2 {err:.3e}" + (f"  (tol {tol:g}){'  FAIL' if bad else ''}" if tol else ""))
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
