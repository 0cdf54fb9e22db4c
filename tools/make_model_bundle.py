#!/usr/bin/python3
"""Writes a small synthetic multi-layer model for the inspector (docs/design.md §4).

    make_model_bundle.py --out DIR --dma-run build/tools/dma_run [--layers 4] [--window 32]

DIR/layer_00/, DIR/layer_01/, ... each a bundle computed by dma_run (inputs q k v w_dt a, and
dma_run's outputs: delta evict mask o lse), with tokens.txt and roles.txt: an MQAR-like sequence
(multi-query associative recall) of Lk tokens: key-value pairs ("cat 7"), then filler, with
queries (a key seen before) spread over the second half.

The tensors are synthetic, not a trained model: the value vectors of key and value tokens carry
a common direction u, and each head's w_dt reads it with its own sign and strength, so delta is
high on key/value tokens for some heads and on filler for another; that signal grows with the
layer against the noise in w_dt, and the last head has a = 0 (exactly a sliding window).
Needs numpy only.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np

KEYS = ["cat", "dog", "owl", "fox", "elk", "bee", "ant", "yak", "emu", "ape", "rat", "cod",
        "eel", "hen", "pig", "cow"]
VALUES = [str(i) for i in range(10)] + ["red", "blue", "gold", "gray", "pink", "teal"]
FILLER = ["the", "and", "of", "a", "to", "in", "is", "it", ",", "."]


def write_npy(path, array):
    np.save(path, np.ascontiguousarray(array))


def sequence(L, pairs, rng):
    """Tokens and roles of an MQAR-like sequence of L tokens."""
    keys = list(rng.permutation(KEYS)[:pairs])
    values = [VALUES[i] for i in rng.integers(0, len(VALUES), size=pairs)]
    tokens, roles = [], []
    for k, v in zip(keys, values):
        tokens += [k, v]
        roles += ["key", "value"]
    # The rest: filler, with queries (keys seen before) in the second half.
    rest = L - len(tokens)
    query_at = set(rng.choice(np.arange(rest // 2, rest), size=min(pairs, rest // 2), replace=False))
    for i in range(rest):
        if i in query_at:
            tokens.append(keys[int(rng.integers(0, pairs))])
            roles.append("query")
        else:
            tokens.append(FILLER[int(rng.integers(0, len(FILLER)))])
            roles.append("filler")
    return tokens, roles


def layer_inputs(rng, layer, layers, roles, Hq, Hkv, D):
    L = len(roles)
    Hd = Hkv
    strength = {"key": 2.0, "value": 2.0, "query": 1.0, "filler": 0.0}
    s = np.array([strength[r] for r in roles], dtype=np.float32)
    u = rng.standard_normal(Hkv * D).astype(np.float32)
    u /= np.linalg.norm(u)
    q = rng.standard_normal((1, Hq, L, D)).astype(np.float32)
    k = rng.standard_normal((1, Hkv, L, D)).astype(np.float32)
    vflat = 0.3 * rng.standard_normal((L, Hkv * D)).astype(np.float32) + s[:, None] * u[None, :]
    v = vflat.reshape(L, Hkv, D).transpose(1, 0, 2)[None].astype(np.float32)
    # Per delta head: how it reads u (sign, strength). The ranking by delta depends on z alone
    # (delta rises with z for any a > 0), so depth is the signal's share against the noise in
    # w_dt: early layers select nearly at random among the allowed keys, deep ones by role.
    read = np.array([1.5, 0.8, -1.5, 0.0][:Hd] + [0.5] * max(0, Hd - 4), dtype=np.float32)
    depth = 0.1 + 0.9 * layer / max(1, layers - 1)
    w_dt = depth * read[:, None] * u[None, :] + 0.2 * rng.standard_normal((Hd, Hkv * D)).astype(np.float32)
    a = np.array([1.0, 1.0, 1.0, 0.0][:Hd] + [0.5] * max(0, Hd - 4), dtype=np.float32)
    return {"q": q, "k": k, "v": np.ascontiguousarray(v), "w_dt": w_dt.astype(np.float32), "a": a}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="model folder to write (replaced)")
    ap.add_argument("--dma-run", required=True, help="the dma_run executable")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lk", type=int, default=256, help="tokens (Lq = Lk)")
    ap.add_argument("--pairs", type=int, default=16, help="key-value pairs")
    ap.add_argument("--hq", type=int, default=4)
    ap.add_argument("--hkv", type=int, default=4)
    ap.add_argument("--d", type=int, default=16)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if args.hq % args.hkv or args.lk < 2 * args.pairs + 2:
        sys.exit("make_model_bundle: need hq % hkv == 0 and lk >= 2 * pairs + 2")

    rng = np.random.default_rng(args.seed)
    tokens, roles = sequence(args.lk, args.pairs, rng)
    if os.path.isdir(args.out):
        shutil.rmtree(args.out)
    os.makedirs(args.out)
    with tempfile.TemporaryDirectory(prefix="dma_model_inputs_") as tmp:
        for layer in range(args.layers):
            name = "layer_%02d" % layer
            inputs = os.path.join(tmp, name)
            os.makedirs(inputs)
            for key, array in layer_inputs(rng, layer, args.layers, roles, args.hq, args.hkv,
                                           args.d).items():
                write_npy(os.path.join(inputs, key + ".npy"), array)
            out = os.path.join(args.out, name)
            subprocess.run([args.dma_run, "--in", inputs, "--out", out, "--window",
                            str(args.window)], check=True, stdout=subprocess.DEVNULL)
            with open(os.path.join(out, "tokens.txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(tokens) + "\n")
            with open(os.path.join(out, "roles.txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(roles) + "\n")
    print("make_model_bundle: %d layers of %d tokens in %s" % (args.layers, args.lk, args.out))


if __name__ == "__main__":
    main()
