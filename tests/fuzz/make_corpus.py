#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz harnesses (run once; the files are committed).

corpus/npy:    small .npy files of every supported dtype and version, plus hostile ones
corpus/bundle: small bundles in fuzz_bundle.cpp's record layout (options byte, then
               [id][u16 length][.npy bytes] per tensor)
"""
import io
import os
import struct

import numpy as np
from numpy.lib import format as npf

here = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(7)


def npy_bytes(array, version=(1, 0)):
    buf = io.BytesIO()
    npf.write_array(buf, array, version=version)
    return buf.getvalue()


def write(folder, name, data):
    os.makedirs(os.path.join(here, folder), exist_ok=True)
    with open(os.path.join(here, folder, name), "wb") as f:
        f.write(data)


# --- npy ---------------------------------------------------------------------------------------
write("corpus/npy", "f32_v1", npy_bytes(rng.standard_normal((2, 3)).astype(np.float32)))
write("corpus/npy", "f64_v2", npy_bytes(rng.standard_normal((3,)), (2, 0)))
write("corpus/npy", "u8_v3", npy_bytes(np.array([[1, 0], [0, 1]], dtype=np.uint8), (3, 0)))
write("corpus/npy", "i32_scalar", npy_bytes(np.array(7, dtype=np.int32)))
write("corpus/npy", "i64_empty", npy_bytes(np.zeros((0, 4), dtype=np.int64)))
write("corpus/npy", "f32_4d", npy_bytes(rng.standard_normal((1, 2, 3, 4)).astype(np.float32)))
write("corpus/npy", "big_endian", npy_bytes(np.arange(4, dtype=">f4")))
write("corpus/npy", "fortran", npy_bytes(np.asfortranarray(np.ones((2, 3)))))
write("corpus/npy", "bool", npy_bytes(np.array([True, False])))
write("corpus/npy", "truncated", npy_bytes(np.ones((4, 4)))[:-9])

# --- bundles -----------------------------------------------------------------------------------
IDS = {"q": 0, "k": 1, "v": 2, "w_dt": 3, "a": 4, "do": 5, "delta": 6}


def bundle(options, tensors, dtype=np.float32):
    out = bytes([options])
    for name, array in tensors.items():
        data = npy_bytes(np.ascontiguousarray(array, dtype=dtype))
        out += bytes([IDS[name]]) + struct.pack("<H", len(data)) + data
    return out


def tensors(B, Hq, Hkv, Hd, Lq, Lk, D, do=True, delta=False):
    t = dict(q=rng.standard_normal((B, Hq, Lq, D)), k=rng.standard_normal((B, Hkv, Lk, D)),
             v=rng.standard_normal((B, Hkv, Lk, D)))
    if delta:
        t["delta"] = rng.standard_normal((B, Hd, Lk))
    else:
        t["w_dt"] = rng.standard_normal((Hd, Hkv * D)) * 0.3
        t["a"] = rng.uniform(0.5, 1.5, Hd)
    if do:
        t["do"] = rng.standard_normal((B, Hq, Lq, D))
    return t


write("corpus/bundle", "gqa_exp", bundle(3, tensors(1, 4, 2, 2, 5, 7, 4)))
write("corpus/bundle", "hd_hq_linear", bundle(2 | 16, tensors(1, 2, 1, 2, 6, 6, 3)))
write("corpus/bundle", "noncausal_f64", bundle(4 | 8, tensors(2, 2, 2, 2, 4, 5, 2), np.float64))
write("corpus/bundle", "given_delta", bundle(5, tensors(1, 2, 1, 1, 3, 8, 4, delta=True)))
write("corpus/bundle", "forward_only", bundle(1, tensors(1, 1, 1, 1, 4, 4, 2, do=False)))
write("corpus/bundle", "window0", bundle(0, tensors(1, 1, 1, 1, 2, 2, 2)))
