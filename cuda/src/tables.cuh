// Reading the candidate tables (candidates.cu, core/include/dma/candidates.hpp) in the attention
// kernels, and gathering the K/V rows they name.
//
// Query tile t (kTileQ queries, positions p_first .. p_last) has the list of its n_alive
// candidate keys, the first n_full of them kept by every query of the tile. The forward and the
// dq pass walk the list kBk keys at a time; the dk/dv sweep reads the slot rows. When w >= Lk the
// tables are implicit: the candidates of a tile are 0 .. p_last, slot s holds key s, and the keys
// j <= p_first come first (they are kept by every query).
#pragma once

#include "common.cuh"
#include "dma/mask_rule.hpp"
#include "kernels.hpp"

namespace dma::cuda::detail {

// Keys per gathered K/V tile.
constexpr int kBk = 64;

// The tables of one (b, delta head).
struct TableView {
  const int* list = nullptr;      // [T][S], null when implicit
  const int* slot_key = nullptr;  // [T][S], null when implicit
  const int* n_alive = nullptr;   // [T]
  const int* n_full = nullptr;    // [T]
  int S = 0;

  __device__ TableView(const Dims& d, const Tables& tb, int bhd) {
    if (tables_implicit(d)) return;
    const int T = table_tiles(d);
    S = table_stride(d);
    list = tb.list + (size_t)bhd * T * S;
    slot_key = tb.slot_key + (size_t)bhd * T * S;
    n_alive = tb.n_alive + (size_t)bhd * T;
    n_full = tb.n_full + (size_t)bhd * T;
  }
  __device__ bool implicit() const { return list == nullptr; }
  __device__ int alive(int t, int p_last) const { return implicit() ? p_last + 1 : n_alive[t]; }
  __device__ int full(int t, int p_first) const { return implicit() ? p_first + 1 : n_full[t]; }
  // The r-th candidate of tile t (r < alive).
  __device__ int candidate(int t, int r) const {
    return implicit() ? r : list[(size_t)t * S + r];
  }
  // The key in slot s at tile t, or -1 (s < stride; the implicit stride is Lk).
  __device__ int slot(int t, int s, int p_last) const {
    return implicit() ? (s <= p_last ? s : -1) : slot_key[(size_t)t * S + s];
  }
};

// What a block of the query-major kernels (the forward and the dq pass, mma.sync and wgmma)
// works on: rows i0 .. i0 + rows - 1 of query tile q_tile (cut at Lq) of query head hq in batch
// b, its kv head and delta head, the positions of its first and last row, the rows of q of
// (b, hq) and of k and v of (b, hk), the e_j and delta_j of (b, hd), and its candidate list.
template <typename T, int D>
struct QueryBlock {
  int hk, hd;
  int p_first, p_last;
  size_t bhq;                // (b, hq): row bhq * Lq + i of q, do, o, dq, lse and D_i is query i
  const T *q, *k, *v;        // q (B,Hq,Lq,D) at (b, hq); k, v (B,Hkv,Lk,D) at (b, hk)
  int bhd;
  const int* evict;          // (B,Hd,Lk) at (b, hd)
  const float* delta;
  TableView tv;
  int n_alive, n_full;       // the list's length, and its head kept by every query of the tile

  __device__ QueryBlock(const Dims& d, const AttnArgs& a, int q_tile, int hq, int b, int i0, int rows)
      : hk(hq / (d.Hq / d.Hkv)),
        hd(hq / (d.Hq / d.Hd)),
        p_first(rule::query_position(d.Lq, d.Lk, d.causal, i0)),
        p_last(rule::query_position(d.Lq, d.Lk, d.causal, min(i0 + rows, d.Lq) - 1)),
        bhq((size_t)(b * d.Hq + hq)),
        q(static_cast<const T*>(a.q) + bhq * d.Lq * D),
        k(static_cast<const T*>(a.k) + (size_t)(b * d.Hkv + hk) * d.Lk * D),
        v(static_cast<const T*>(a.v) + (size_t)(b * d.Hkv + hk) * d.Lk * D),
        bhd(b * d.Hd + hd),
        evict(a.evict + (size_t)bhd * d.Lk),
        delta(a.delta + (size_t)bhd * d.Lk),
        tv(d, a.tables, bhd),
        n_alive(tv.alive(q_tile, p_last)),
        n_full(tv.full(q_tile, p_first)) {}
};

// Gathers the rows of src (rows of D elements) named by candidates r0 .. r0+kBk of tile t into
// dst [kBk][D+8] with 16-byte asynchronous copies; rows past n_alive are zero-filled. The caller
// commits and waits.
template <typename T, int D, int kThreads>
__device__ __forceinline__ void gather_rows(T* dst, const T* __restrict__ src, const TableView& tv,
                                            int t, int r0, int n_alive) {
  constexpr int kStride = D + 8, kVecs = D / 8;
  for (int c = threadIdx.x; c < kBk * kVecs; c += kThreads) {
    const int r = c / kVecs, col = (c % kVecs) * 8;
    const bool valid = r0 + r < n_alive;
    const int j = valid ? tv.candidate(t, r0 + r) : 0;
    cp_async_16(dst + r * kStride + col, src + (size_t)j * D + col, valid);
  }
}

// Loads rows i0 .. i0+kRows of a (L, D) matrix into dst [kRows][D+8]; rows past L are zero-filled.
template <typename T, int D, int kRows, int kThreads>
__device__ __forceinline__ void load_rows(T* dst, const T* __restrict__ src, int i0, int L) {
  constexpr int kStride = D + 8, kVecs = D / 8;
  for (int c = threadIdx.x; c < kRows * kVecs; c += kThreads) {
    const int r = c / kVecs, col = (c % kVecs) * 8, i = i0 + r;
    cp_async_16(dst + r * kStride + col, src + (size_t)min(i, L - 1) * D + col, i < L);
  }
}

// One gathered key tile of a list walk: the keys, their e_j and delta_j * log2(e).
struct KeyTile {
  int key[kBk];    // -1 past the end of the list
  int evict[kBk];
  float delta2[kBk];
};

// Fills tile with candidates r0 .. r0+kBk of tile t (threads 0 .. kBk-1).
__device__ __forceinline__ void load_key_tile(KeyTile& kt, const TableView& tv, int t, int r0,
                                              int n_alive, const int* __restrict__ evict_bh,
                                              const float* __restrict__ delta_bh) {
  const int r = threadIdx.x;
  if (r < kBk) {
    const int j = r0 + r < n_alive ? tv.candidate(t, r0 + r) : -1;
    kt.key[r] = j;
    kt.evict[r] = j >= 0 ? __ldg(evict_bh + j) : -1;
    kt.delta2[r] = j >= 0 ? __ldg(delta_bh + j) * kLog2e : 0.0f;
  }
}

// True when every key of the tile is kept by every query position in [p_lo, p_hi] (a whole warp
// of rows needs no element mask). Warp-uniform; call from all lanes of a warp.
__device__ __forceinline__ bool key_tile_kept_by(const KeyTile& kt, int p_lo, int p_hi) {
  static_assert(kBk == 64, "two entries per lane");
  const int lane = threadIdx.x % 32;
  const int j0 = kt.key[lane], j1 = kt.key[lane + 32];
  const bool ok = j0 >= 0 && j1 >= 0 && max(j0, j1) <= p_lo && min(kt.evict[lane], kt.evict[lane + 32]) >= p_hi;
  return __all_sync(0xffffffffu, ok);
}

}  // namespace dma::cuda::detail
