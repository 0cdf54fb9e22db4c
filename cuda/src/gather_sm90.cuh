// The producer warpgroup's copies in the Hopper kernels (forward_sm90.cu, backward_sm90.cu):
// rows of a (L, D) matrix and gathered key blocks of the candidate lists (tables.cuh), with
// 16-byte cp.async into the 128-byte swizzled layout of sm90.cuh that wgmma reads. The caller
// commits, waits and fences (fence_proxy_async) before handing a buffer to the tensor cores.
#pragma once

#include "tables.cuh"
#include "sm90.cuh"

namespace dma::cuda::detail::sm90 {

constexpr int kProducers = 128;  // the producer warpgroup; named barrier 1 is its own

// The keys of one block of kBn candidates: the keys (-1 past the end of the list), their e_j and
// delta_j * log2(e).
template <int kBn>
struct KeyBlock {
  int key[kBn];
  int evict[kBn];
  float delta2[kBn];
};
// True when every key of the block is kept by every query position in [p_lo, p_hi] (a warp's
// 16 rows need no element mask). Warp-uniform; call from all lanes of a warp.
template <int kBn>
__device__ __forceinline__ bool block_kept_by(const KeyBlock<kBn>& kb, int p_lo, int p_hi) {
  bool ok = true;
  #pragma unroll
  for (int e = threadIdx.x % 32; e < kBn; e += 32)
    ok = ok && kb.key[e] >= 0 && kb.key[e] <= p_lo && kb.evict[e] >= p_hi;
  return __all_sync(0xffffffffu, ok);
}

// The shared memory of a block that owns one query tile and gathers its candidate keys kBn at a
// time (forward_sm90.cu, dq_sm90.cu): kRowTiles swizzled tiles of the query tile's rows (Q; Q and
// dO), kStages buffers of K, of V and of their KeyBlock, then the full[kStages] and
// empty[kStages] mbarriers. Byte offsets from a 1024-aligned base.
template <int D, int kBn, int kStages, int kRowTiles>
struct QueryTileSmem {
  static constexpr uint32_t rows_bytes = kTileQ * D * 2;  // one tile of the query tile's rows
  static constexpr uint32_t tile_bytes = kBn * D * 2;     // one K or V block
  static constexpr uint32_t rows(int r) { return r * rows_bytes; }  // row tile r
  static constexpr uint32_t k = kRowTiles * rows_bytes;
  static constexpr uint32_t v = k + kStages * tile_bytes;
  static constexpr uint32_t keys = v + kStages * tile_bytes;
  static constexpr uint32_t bars = keys + kStages * sizeof(KeyBlock<kBn>);
  static constexpr uint32_t bytes = bars + 2 * kStages * sizeof(uint64_t) + 1024;  // + alignment slack
};

// Rows i0 .. i0+kRows of a (L, D) matrix (clamped; rows past L zero-filled) into a swizzled
// tile of kRows rows, by producer thread pt of kProducers. Thread pt copies chunk pt % kChunks of
// rows pt / kChunks, + kRowStep, ...: the rows step by a multiple of 8, so the swizzle is the
// same for all of them and every copy is one address plus a constant on each side (a copy
// with its own row, chunk and swizzle cost 15 integer instructions, in the dk/dv kernel more
// than its consumer's whole step).
template <typename T, int D, int kRows>
__device__ __forceinline__ void produce_rows(unsigned char* dst, const T* __restrict__ src, int i0,
                                             int L, int pt) {
  constexpr int kChunks = D / 8, kRowStep = kProducers / kChunks;
  static_assert(kProducers % kChunks == 0 && kRowStep % 8 == 0 && kRows % kRowStep == 0,
                "one swizzle phase per thread");
  const int chunk = pt % kChunks, row0 = pt / kChunks;
  unsigned char* dst0 = dst + swizzled_offset<kRows>(row0, chunk);
  if (i0 + kRows <= L) {  // (uniform) every row exists
    const T* src0 = src + (size_t)(i0 + row0) * D + chunk * 8;
    #pragma unroll
    for (int x = 0; x < kRows / kRowStep; ++x)
      cp_async_16(dst0 + x * kRowStep * 128, src0 + x * kRowStep * D, true);
  } else {
    #pragma unroll 2  // (the dk/dv producer runs on 24 registers)
    for (int x = 0; x < kRows / kRowStep; ++x) {
      const int i = i0 + row0 + x * kRowStep;
      cp_async_16(dst0 + x * kRowStep * 128, src + (size_t)min(i, L - 1) * D + chunk * 8, i < L);
    }
  }
}

// Candidates r0 .. r0+kBn of tile t: their keys, e_j and delta_j * log2(e) into kt, then their
// rows of k and v into the swizzled K and V tiles (rows past the list zero-filled).
template <typename T, int D, int kBn>
__device__ __forceinline__ void produce_tile(KeyBlock<kBn>& kt, unsigned char* k_dst, unsigned char* v_dst,
                                             const T* __restrict__ k_bh, const T* __restrict__ v_bh,
                                             const int* __restrict__ evict_bh,
                                             const float* __restrict__ delta_bh, const TableView& tv,
                                             int t, int r0, int n_alive, int pt) {
  static_assert(kBn <= kProducers, "one producer thread per key of a block");
  if (pt < kBn) {
    const int j = r0 + pt < n_alive ? tv.candidate(t, r0 + pt) : -1;
    kt.key[pt] = j;
    kt.evict[pt] = j >= 0 ? __ldg(evict_bh + j) : -1;
    kt.delta2[pt] = j >= 0 ? __ldg(delta_bh + j) * kLog2e : 0.0f;
  }
  named_barrier_sync(1, kProducers);  // every producer thread reads the keys of every row
  // Thread pt copies chunk pt % kChunks of rows pt / kChunks, + kRowStep, ...: the chunk, and with
  // it the swizzle (rows step by a multiple of 8), is the same for all of them.
  constexpr int kChunks = D / 8, kRowStep = kProducers / kChunks;
  static_assert(kProducers % kChunks == 0 && kRowStep % 8 == 0, "one swizzle phase per thread");
  const int chunk = pt % kChunks, row0 = pt / kChunks;
  const uint32_t dst0 = swizzled_offset<kBn>(row0, chunk);
  #pragma unroll
  for (int r = row0, i = 0; r < kBn; r += kRowStep, ++i) {
    const int j = kt.key[r];
    const size_t src = (size_t)max(j, 0) * D + chunk * 8;
    cp_async_16(k_dst + dst0 + i * kRowStep * 128, k_bh + src, j >= 0);
    cp_async_16(v_dst + dst0 + i * kRowStep * 128, v_bh + src, j >= 0);
  }
}

}  // namespace dma::cuda::detail::sm90
