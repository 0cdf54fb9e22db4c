#!/usr/bin/env python3
"""Exports a trained DMA model of the MQAR sweep on one test sequence as a model for the inspector.

    PYTHONPATH=<dma_torch build> python3 bench/mqar/export_bundle.py MODEL.pt OUT [--seq-len 512]
        [--batch-index 0] [--row 0] [--mask]

MODEL.pt is what train.py saved for a finished DMA run (RESULTS/models/L0512_dma.pt). OUT is
replaced by a model folder (docs/design.md §4, "Bundles from real models"):

    OUT/layer_00/, layer_01/, ...   one dma_run bundle per layer: the inputs the layer's attention
        q k v (1, H, L, D) float32  saw on this sequence (q and k after the rotary embedding),
        w_dt (Hd, H*D), a (Hd,)     its dynamic-weight parameters, and the outputs
        delta (1, Hd, L) float32, evict (1, Hd, L) int64, o (1, H, L, D), lse (1, H, L);
        mask (1, Hd, L, L) uint8 only with --mask (the inspector infers causal from lse without it)
        tokens.txt, roles.txt       the sequence's tokens (k12, v3, f7) and roles, L lines each
    OUT/model.json                  where it came from: the run, its test accuracy, the sequence
    OUT/README.md                   the same in words

Everything is computed on the CPU in float32 with the model's own parameters: the layer input is
caught by a hook on each attention, q, k, v recomputed from it with the layer's projections, and
delta, evict, o, lse by the op's CPU forward (the C++ code the inspector runs too); evict is checked
against eviction_positions() of that delta (the key's eviction position, docs/design.md §2), and o,
through the layer's output projection, against what the layer itself computed on that input.
L = 512 with d_model 128 and 2 layers is about 2 MB.
"""
import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import generator as gen  # noqa: E402
from models import MQARModel, apply_rope  # noqa: E402


def eviction_positions(delta_row, window):
    """delta_row (Lk,) float -> e (Lk,) int64: key j is kept by exactly the positions p with
    j <= p <= e_j. e_j + 1 is the position of the w-th key ranked above j (by delta descending,
    then index descending), counted in position order; Lk - 1 when fewer than w rank above it.
    O(Lk^2) memory: fine for the few thousand keys of an export."""
    d = np.asarray(delta_row)
    L = d.shape[0]
    idx = np.arange(L)
    # above[j, i]: key i ranks above key j
    above = (d[None, :] > d[:, None]) | ((d[None, :] == d[:, None]) & (idx[None, :] > idx[:, None]))
    count = np.cumsum(above, axis=1)                                   # (L, L)
    reached = count[:, -1] >= window
    first = np.argmax(count >= window, axis=1)                         # position of the w-th above
    return np.where(reached, first - 1, L - 1).astype(np.int64)


def mask_from_evict(evict, Lq):
    """evict (Lk,) -> (Lq, Lk) uint8, causal with Lq = Lk aligned bottom-right."""
    Lk = evict.shape[0]
    p = np.arange(Lq)[:, None] + (Lk - Lq)
    j = np.arange(Lk)[None, :]
    return ((j <= p) & (p <= evict[None, :])).astype(np.uint8)


def dynamic_weights(v, w_dt, a, form):
    """v (B, Hkv, L, D), w_dt (Hd, Hkv*D), a (Hd,) -> delta (B, Hd, L) in the layer's form ("exp":
    exp(a softplus(z)), "linear": a softplus(z)), computed in float64 and rounded to v's dtype."""
    B, Hkv, L, D = v.shape
    vflat = v.double().permute(0, 2, 1, 3).reshape(B, L, Hkv * D)    # (B, L, Hkv*D)
    z = vflat @ w_dt.double().t()                                      # (B, L, Hd)
    delta = a.double() * F.softplus(z)
    if form == "exp":
        delta = torch.exp(delta)
    return delta.permute(0, 2, 1).contiguous().to(v.dtype)


def load_model(path):
    ck = torch.load(path, map_location="cpu")
    cfg = ck["config"]
    if cfg["attention"] != "dma":
        raise SystemExit(f"export: {path} is a {cfg['attention']} model; export a DMA one")
    model = MQARModel(cfg["n_filler"] + cfg["n_keys"] + cfg["n_values"], "dma",
                      d_model=cfg["d_model"], n_layers=cfg["layers"], n_heads=cfg["heads"],
                      window=cfg["window"], form=cfg.get("form", "exp"))
    model.load_state_dict(ck["model"])
    return model.float().eval(), cfg


def layer_tensors(attn, x):
    """The attention layer `attn` (a DynamicMaskAttention) on its input x (1, L, d_model):
    its bundle's tensors as numpy arrays, and o through the output projection (1, L, d_model)."""
    from dma_torch import dma_attention
    B, L, _ = x.shape
    H, Hkv, D = attn.n_heads, attn.n_kv_heads, attn.head_dim
    q = attn.q_proj(x).view(B, L, H, D).transpose(1, 2)               # (1, H, L, D)
    k = attn.k_proj(x).view(B, L, Hkv, D).transpose(1, 2)             # (1, Hkv, L, D)
    v = attn.v_proj(x).view(B, L, Hkv, D).transpose(1, 2)             # (1, Hkv, L, D)
    if attn.rope:
        q, k = apply_rope(q, attn.rope_base), apply_rope(k, attn.rope_base)
    q, k, v = (t.contiguous() for t in (q, k, v))
    w_dt, a = attn.w_dt.weight.detach(), attn.a.detach()                # (Hd, Hkv*D), (Hd,)
    try:
        # The op's own CPU forward (what dma_attention runs): its delta and evict bit for bit,
        # so near-ties of delta (layer 0 sees few distinct token vectors) rank as in the layer and
        # as in the inspector, which recomputes delta with the same C++ code.
        from dma_torch import _C
        o, lse, delta, evict = _C.forward(q, k, v, w_dt, a, None, attn.window, True, attn.form, 0.0,
                                          True)
        evict = evict.numpy()
    except (ImportError, TypeError, RuntimeError, ValueError) as e:
        print(f"export: dma_torch._C.forward not usable ({e}); delta in float64 instead, so a "
              f"near-tie may rank differently than in the layer")
        delta = dynamic_weights(v, w_dt, a, attn.form)                  # (1, Hd, L)
        o, lse = dma_attention(q, k, v, delta=delta, window=attn.window, causal=True, return_lse=True)
        evict = None
    mine = np.stack([eviction_positions(delta[0, h].numpy(), attn.window)
                     for h in range(delta.shape[1])])[None]             # (1, Hd, L)
    if evict is not None and not np.array_equal(mine, evict):
        raise SystemExit("export: the op's evict differs from eviction_positions of its delta")
    evict = mine
    projected = attn.o_proj(o.transpose(1, 2).reshape(B, L, H * D))
    arrays = {"q": q, "k": k, "v": v, "w_dt": w_dt, "a": a, "delta": delta, "o": o, "lse": lse}
    arrays = {n: t.detach().float().numpy() for n, t in arrays.items()}
    arrays["evict"] = evict
    return arrays, projected


def readme(meta, note):
    """OUT/README.md: what the folder holds and where it came from, from model.json's facts."""
    c, run, seq = meta["config"], meta["run"] or {}, meta["sequence"]
    env = run.get("env") or {}

    def pct(d, k):
        return "-" if not d or d.get(k) is None else f"{100 * d[k]:.1f}%"

    lines = [
        "# A DMA model trained on multi-query associative recall (MQAR)", "",
        "Written by `bench/mqar/export_bundle.py` (do not edit: rerun it). Open it with "
        "`dma_inspector --example mqar` (this is `assets/mqar`) or `dma_inspector --in <this folder>`.", "",
        f"- Model: {c['layers']} layers, d_model {c['d_model']}, {c['heads']} heads of "
        f"{c['d_model'] // c['heads']}, `dma_torch.DynamicMaskAttention` with w = {c['window']} "
        f"({meta.get('form', 'exp')} form, causal, rotary embeddings), trained by `bench/mqar/train.py` at L = {c['seq_len']} "
        f"for {run.get('steps_done', '?')} steps of {c['batch']} sequences on "
        f"{env.get('device_name', '?')} (torch {env.get('torch', '?')}, commit "
        f"{str(env.get('commit', '?'))[:12]}, {env.get('date', '?')}).",
        f"- Its test accuracy ({c['eval_sequences']} held-out sequences): {pct(run.get('test'), 'all')} "
        f"at L ({pct(run.get('test'), 'far')} on the far queries, more than layers x (w - 1) "
        f"= {c['layers'] * (c['window'] - 1)} back), "
        f"{pct(run.get('test_2x'), 'all')} at 2L ({pct(run.get('test_2x'), 'far')}).",
        f"- The sequence: test split, batch {seq['batch_index']} row {seq['row']}, {seq['seq_len']} "
        f"tokens: {seq['pairs']} key-value pairs, then {seq['queries']} queries among filler; the "
        f"model answers {meta['queries_right']} of its {meta['queries']} queries.",
        "- `layer_NN/`: one `dma_run` bundle per layer: the inputs its attention saw (`q` and `k` "
        "after the rotary embedding, `v`, `w_dt`, `a`) and the op's outputs on the CPU in float32 "
        "(`delta`, `evict`, `o`, `lse`; `mask` only when exported with `--mask`: without it the "
        "inspector infers causal from `lse`), with `tokens.txt` (`k12` a key, `v3` a value, `f7` "
        "filler; a query reads as its key) and `roles.txt` (key, value, query, filler).",
        "- `model.json`: the same facts, and the run's whole configuration.",
    ]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def export_run(model_path, out, seq_len=512, batch_index=0, row=0, with_mask=False, note=None):
    """Writes the model folder OUT (replaced); returns the path of its model.json."""
    model, cfg = load_model(model_path)
    t = gen.TaskConfig(seq_len=seq_len, n_pairs=cfg["pairs"], n_queries=cfg["queries"],
                       n_keys=cfg["n_keys"], n_values=cfg["n_values"],
                       n_filler=cfg["n_filler"]).check()
    b = gen.batch(t, "test", cfg["seed"], batch_index, row + 1)
    tokens = torch.from_numpy(b.tokens[row:row + 1])                  # (1, L)

    inputs, outputs = [], []  # per layer: the attention's input and output, (1, L, d_model)

    def catch(module, args, output):
        inputs.append(args[0].detach())
        outputs.append(output.detach())

    hooks = [block.attn.register_forward_hook(catch) for block in model.blocks]
    with torch.no_grad():
        pred = model(tokens).argmax(-1)[0].numpy()                     # (L,)
    for h in hooks:
        h.remove()
    scored = b.targets[row] != gen.IGNORE
    hits = int((pred[scored] == b.targets[row][scored]).sum())

    names, roles = gen.describe(t, b, row)
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".mqar_export_", dir=parent)
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the folder is an asset
    try:
        for n, block in enumerate(model.blocks):
            with torch.no_grad():
                arrays, projected = layer_tensors(block.attn, inputs[n])
            err = float((projected - outputs[n]).abs().max() / outputs[n].abs().max())
            if err > 1e-4:
                raise SystemExit(f"export: layer {n}: the exported attention differs from the "
                                 f"layer's own output (max rel. {err:.2e})")
            d = os.path.join(tmp, f"layer_{n:02d}")
            os.makedirs(d)
            if with_mask:
                arrays["mask"] = np.stack([mask_from_evict(e, seq_len) for e in arrays["evict"][0]])[None]
            for name, arr in arrays.items():
                np.save(os.path.join(d, name + ".npy"), np.ascontiguousarray(arr))
            with open(os.path.join(d, "tokens.txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(names) + "\n")
            with open(os.path.join(d, "roles.txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(roles) + "\n")
        record = None
        run_json = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(model_path))),
                                "runs", os.path.splitext(os.path.basename(model_path))[0] + ".json")
        if os.path.exists(run_json):
            with open(run_json) as f:
                record = json.load(f)
        meta = {
            "what": "a 2-layer MQAR model trained with DMA (bench/mqar/train.py), on one test sequence",
            "exported": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "model": os.path.basename(model_path),
            "config": cfg,
            "sequence": {"split": "test", "seed": cfg["seed"], "batch_index": batch_index, "row": row,
                         "seq_len": seq_len, "pairs": t.n_pairs, "queries": t.n_queries},
            "queries_right": hits, "queries": int(scored.sum()),
            "layers": len(model.blocks), "window": cfg["window"], "form": model.blocks[0].attn.form, "causal": True,
            "run": None if record is None else {k: record.get(k) for k in
                                                ("status", "steps_done", "test", "test_2x",
                                                 "ms_per_step", "env")},
        }
        with open(os.path.join(tmp, "model.json"), "w") as f:
            json.dump(meta, f, indent=1)
            f.write("\n")
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(readme(meta, note))
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
    print(f"export: {len(model.blocks)} layers of {seq_len} tokens in {out} ({size / 1e6:.2f} MB); "
          f"{hits} of {int(scored.sum())} queries right on this sequence")
    return os.path.join(out, "model.json")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="RESULTS/models/L0512_dma.pt (written by train.py)")
    ap.add_argument("out", help="model folder to write (replaced)")
    ap.add_argument("--seq-len", type=int, default=512, help="length of the test sequence")
    ap.add_argument("--batch-index", type=int, default=0, help="test batch to take it from")
    ap.add_argument("--row", type=int, default=0, help="row of that batch")
    ap.add_argument("--mask", action="store_true", help="also write mask.npy (L*L bytes per head)")
    ap.add_argument("--note", help="a paragraph to add to OUT/README.md")
    a = ap.parse_args(argv)
    export_run(a.model, a.out, a.seq_len, a.batch_index, a.row, a.mask, a.note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
