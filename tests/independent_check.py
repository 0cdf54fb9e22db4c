#!/usr/bin/env python3
"""An independent float64 implementation of DMA in NumPy, checked against dma_run.

It shares no code with the C++ project: dense [Lq, Lk] matrices, the mask from a global ranking
(np.lexsort), the backward as whole-matrix products. For many shapes (GQA, Hd = Hq, Lq < Lk,
non-causal, w >= Lk, w = 1, heavy ties, odd lengths, D up to 128, both forms, given delta) it
writes a float64 bundle, runs `dma_run --backend cpu` and `--backend tiled`, and requires every
output to agree to 1e-9 relative (max abs difference over max abs value, with an absolute floor of 1e-3;
for the gradients, over the size of the terms they sum, docs/design.md §5, where cancellation leaves a
result far smaller than its terms) and evict
and mask to agree exactly.

usage: independent_check.py PATH/TO/dma_run        (exit 0 pass, 1 fail, 77 no NumPy)
"""
import os
import subprocess
import sys
import tempfile

try:
    import numpy as np
except ImportError:
    print("SKIP: NumPy is not installed (apt-get install python3-numpy)")
    sys.exit(77)

TOL = 1e-9
# Gradients that are zero in exact arithmetic (w = 1: p = 1 so ds = 0) are rounding noise in any
# implementation; they are judged against this absolute floor instead of their own size.
FLOOR = 1e-3


def save(folder, name, array):
    np.save(os.path.join(folder, name + ".npy"), np.ascontiguousarray(array))


def dynamic_weights(v, w_dt, a, form):
    """delta (B,Hd,Lk) and what its backward needs, paper Eq. 3."""
    B, Hkv, Lk, D = v.shape
    vflat = v.transpose(0, 2, 1, 3).reshape(B, Lk, Hkv * D)     # (B,Lk,Hkv*D)
    z = vflat @ w_dt.T                                           # (B,Lk,Hd)
    sp = np.logaddexp(0.0, z)                                    # softplus
    u = a[None, None, :] * sp
    delta = np.exp(u) if form == "exp" else u
    return delta.transpose(0, 2, 1).copy(), (vflat, z, sp, delta)


def dynamic_mask(delta, Lq, window, causal):
    """mask (B,Hd,Lq,Lk) and evict (B,Hd,Lk) from a global ranking of the keys."""
    B, Hd, Lk = delta.shape
    pos = np.arange(Lq) + (Lk - Lq) if causal else np.full(Lq, Lk - 1)
    mask = np.zeros((B, Hd, Lq, Lk), dtype=np.uint8)
    evict = np.zeros((B, Hd, Lk), dtype=np.int64)
    idx = np.arange(Lk)
    for b in range(B):
        for h in range(Hd):
            order = np.lexsort((-idx, -delta[b, h]))  # best first: delta desc, then index desc
            rank = np.empty(Lk, dtype=np.int64)
            rank[order] = idx
            for i in range(Lq):
                allowed = idx[: pos[i] + 1]
                kept = allowed[np.argsort(rank[allowed], kind="stable")[:window]]
                mask[b, h, i, kept] = 1
            for j in range(Lk):
                above = np.nonzero(rank < rank[j])[0]            # positions, increasing
                evict[b, h, j] = above[window - 1] - 1 if len(above) >= window else Lk - 1
    return mask, evict


def dma(q, k, v, do, window, causal, form, scale, w_dt=None, a=None, delta=None):
    B, Hq, Lq, D = q.shape
    Hkv, Lk = k.shape[1], k.shape[2]
    given = delta is not None
    if not given:
        delta, saved = dynamic_weights(v, w_dt, a, form)
    Hd = delta.shape[1]
    mask, evict = dynamic_mask(delta, Lq, window, causal)
    kk = np.repeat(k, Hq // Hkv, axis=1)
    vv = np.repeat(v, Hq // Hkv, axis=1)
    dd = np.repeat(delta, Hq // Hd, axis=1)
    mm = np.repeat(mask, Hq // Hd, axis=1).astype(bool)
    s = scale * (q @ kk.swapaxes(-1, -2)) + dd[:, :, None, :]
    s = np.where(mm, s, -np.inf)
    m = s.max(-1, keepdims=True)
    e = np.exp(s - m)
    l = e.sum(-1, keepdims=True)
    p = e / l
    out = {"delta": delta, "evict": evict, "mask": mask, "o": p @ vv, "lse": (m + np.log(l))[..., 0]}
    if do is None:
        return out
    o = out["o"]
    group = lambda x, H: x.reshape(B, H, Hq // H, *x.shape[2:]).sum(2)
    dv = group(p.swapaxes(-1, -2) @ do, Hkv)
    dp = do @ vv.swapaxes(-1, -2)
    D_i = (do * o).sum(-1, keepdims=True)
    ds = p * (dp - D_i)
    out["dq"] = scale * ds @ kk
    out["dk"] = group(scale * ds.swapaxes(-1, -2) @ q, Hkv)
    out["ddelta"] = group(ds.sum(2), Hd)
    # The size of the terms each gradient sums (docs/design.md §5): ds = p (dp - D) cancels to ~0 in
    # near-one-hot rows, and ddelta, dw_dt and da sum such ds, so rounding noise is judged against
    # these magnitudes, not against a result that may be far smaller than its terms.
    ds_mag = p * (np.abs(dp) + np.abs(D_i))
    mag = {"dq": scale * ds_mag @ np.abs(kk),
           "dk": group(scale * ds_mag.swapaxes(-1, -2) @ np.abs(q), Hkv),
           "ddelta": group(ds_mag.sum(2), Hd),
           "dv": group(p.swapaxes(-1, -2) @ np.abs(do), Hkv)}
    if not given:
        vflat, z, sp, d_bjh = saved
        g = out["ddelta"].transpose(0, 2, 1)                     # (B,Lk,Hd)
        ddu = d_bjh if form == "exp" else 1.0
        out["da"] = (g * ddu * sp).sum((0, 1))
        dz = g * ddu * a[None, None, :] / (1.0 + np.exp(-z))
        out["dw_dt"] = np.einsum("bjh,bjc->hc", dz, vflat)
        dv = dv + (dz @ w_dt).reshape(B, Lk, Hkv, D).transpose(0, 2, 1, 3)
        g_mag = mag["ddelta"].transpose(0, 2, 1)
        dz_mag = g_mag * np.abs(ddu) * np.abs(a[None, None, :]) / (1.0 + np.exp(-z))
        mag["da"] = (g_mag * np.abs(ddu) * sp).sum((0, 1))
        mag["dw_dt"] = np.einsum("bjh,bjc->hc", dz_mag, np.abs(vflat))
        mag["dv"] = mag["dv"] + (dz_mag @ np.abs(w_dt)).reshape(B, Lk, Hkv, D).transpose(0, 2, 1, 3)
    out["dv"] = dv
    out["magnitudes"] = mag
    return out


CASES = [
    # name, (B, Hq, Hkv, Hd, Lq, Lk, D), window, causal, form, special
    ("mha", (1, 2, 2, 2, 16, 16, 8), 4, True, "exp", None),
    ("gqa", (2, 4, 2, 2, 13, 13, 16), 5, True, "exp", None),
    ("hd=hq", (1, 4, 2, 4, 11, 11, 8), 3, True, "linear", None),
    ("lq<lk", (1, 4, 1, 1, 7, 29, 32), 6, True, "exp", None),
    ("non-causal", (2, 2, 1, 2, 9, 17, 8), 5, False, "linear", None),
    ("w>=lk", (1, 2, 1, 1, 12, 12, 8), 50, True, "exp", None),
    ("w=1", (1, 2, 2, 2, 15, 15, 8), 1, True, "exp", None),
    ("ties a=0", (1, 2, 2, 2, 19, 23, 8), 4, True, "exp", "a0"),
    ("ties given", (1, 4, 2, 2, 21, 21, 8), 5, True, "exp", "tied_delta"),
    ("odd lengths", (1, 3, 1, 3, 31, 37, 5), 7, True, "linear", None),
    ("d=128", (1, 2, 1, 1, 33, 40, 128), 9, True, "exp", None),
    ("d=64 non-causal", (1, 2, 2, 2, 20, 20, 64), 20, False, "exp", "no_do"),
    ("non-causal lq>lk", (1, 2, 1, 1, 24, 9, 8), 4, False, "linear", None),
]


def run_case(dma_run, tmp, rng, case):
    name, (B, Hq, Hkv, Hd, Lq, Lk, D), window, causal, form, special = case
    q = rng.standard_normal((B, Hq, Lq, D))
    k = rng.standard_normal((B, Hkv, Lk, D))
    v = rng.standard_normal((B, Hkv, Lk, D))
    do = None if special == "no_do" else rng.standard_normal((B, Hq, Lq, D))
    w_dt = rng.standard_normal((Hd, Hkv * D)) / np.sqrt(Hkv * D)
    a = rng.uniform(0.5, 1.5, Hd) if special != "a0" else np.zeros(Hd)
    delta = rng.integers(0, 3, (B, Hd, Lk)).astype(np.float64) if special == "tied_delta" else None
    scale = 1.0 / np.sqrt(D)
    folder = os.path.join(tmp, name.replace(" ", "_").replace("=", "").replace("<", "lt").replace(">", "ge"))
    os.makedirs(folder)
    for tensor_name, x in [("q", q), ("k", k), ("v", v), ("do", do)] + (
            [("delta", delta)] if delta is not None else [("w_dt", w_dt), ("a", a)]):
        if x is not None:
            save(folder, tensor_name, x)
    want = dma(q, k, v, do, window, causal, form, scale, w_dt, a, delta)
    failures = []
    for backend in ("cpu", "tiled"):
        out = folder + "_" + backend
        cmd = [dma_run, "--in", folder, "--out", out, "--window", str(window), "--form", form,
               "--backend", backend] + ([] if causal else ["--non-causal"])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            failures.append(f"{backend}: exit {proc.returncode}: {proc.stderr.strip()}")
            continue
        worst = 0.0
        mags = want.get("magnitudes", {})
        for tensor_name, ref in want.items():
            if tensor_name == "magnitudes":
                continue
            got = np.load(os.path.join(out, tensor_name + ".npy"))
            if got.shape != ref.shape:
                failures.append(f"{backend}: {tensor_name} shape {got.shape} != {ref.shape}")
            elif tensor_name in ("evict", "mask"):
                if got.dtype != ref.dtype:
                    failures.append(f"{backend}: {tensor_name} dtype {got.dtype}, expected {ref.dtype}")
                if not np.array_equal(got, ref):
                    failures.append(f"{backend}: {tensor_name} differs")
            else:
                if got.dtype != np.float64:
                    failures.append(f"{backend}: {tensor_name} dtype {got.dtype}")
                scale_of = max(np.abs(ref).max(), mags[tensor_name].max()) if tensor_name in mags else np.abs(ref).max()
                err = np.abs(got - ref).max() / max(scale_of, FLOOR)
                worst = max(worst, err)
                if not err <= TOL:
                    failures.append(f"{backend}: {tensor_name} relative error {err:.3e}")
        for extra in ("dw_dt", "da"):
            if extra not in want and os.path.exists(os.path.join(out, extra + ".npy")):
                failures.append(f"{backend}: {extra} written although delta was given")
        print(f"  {name:16s} {backend:5s} worst relative error {worst:.2e}")
    return failures


def main():
    if len(sys.argv) != 2:
        print(__doc__)
        return 2
    seed = int(os.environ.get("DMA_TEST_SEED", np.random.SeedSequence().entropy % (2**32)))
    print(f"DMA_TEST_SEED={seed}")
    rng = np.random.default_rng(seed)
    failures = []
    with tempfile.TemporaryDirectory(prefix="dma_independent_") as tmp:
        for case in CASES:
            failures += [f"{case[0]}: {f}" for f in run_case(sys.argv[1], tmp, rng, case)]
    for f in failures:
        print("FAIL " + f)
    print("PASS" if not failures else f"FAIL ({len(failures)} problems)")
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
