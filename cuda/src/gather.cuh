// Gathering the candidate keys of a query tile (docs/design.md §2), shared by forward and backward.
//
// A query tile covers positions p_first..p_last. By nesting, the keys any of its queries keeps are
// the candidates { j <= p_last : e_j >= max(j, p_first) }, at most w + Bq of them. The block scans
// the keys in chunks of 128 (one key per thread), skips a whole chunk when its largest useful e_j
// (chunk_max, from the mask build) is below p_first, and compacts the candidates, in increasing
// order, into a ring buffer in shared memory. The attention kernels take them Bk at a time,
// gather those rows of K and V into shared memory and run dense tensor-core tile math on them;
// the element mask j <= p_i <= e_j is then applied in registers.
#pragma once

#include "common.cuh"

namespace dma::cuda::detail {

// Blocks have kWarps = 4 or 8 warps, 16 queries each (one m16 row block per warp), so a query
// tile holds Bq = 16 * kWarps queries; gathered key tiles hold kBk keys. A scan step covers one
// key per thread (kThreads = 32 * kWarps keys, kThreads / 128 chunks).
constexpr int kBk = 64;
constexpr int kDefaultWarps = 8;  // measured faster than 4 on the H200 (cuda/README.md)

template <int kWarps>
struct Tiles {
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBq = 16 * kWarps;
  // ring capacity, a power of two: the kBk entries of the tile in hand + those of the prefetched
  // tile + < kBk pending when a scan step starts + kThreads appended by it
  static constexpr int kRing = 512;
  static_assert(3 * kBk + kThreads <= kRing, "ring too small");
};

template <int kWarps>
struct CandidateRing {
  static constexpr int kRing = Tiles<kWarps>::kRing;
  int key[kRing];       // key index j
  int evict[kRing];     // e_j
  float delta2[kRing];  // delta_j * log2(e): logits are kept in base 2
  int warp_count[2][kWarps];
};

// Scan state; every thread holds the same values (all updates are block-uniform).
struct Scan {
  int pos = 0;      // next key position to scan (a multiple of 128)
  int head = 0;     // ring index of the first pending candidate
  int n = 0;        // pending candidates
  int parity = 0;   // which warp_count row the next chunk uses
  bool done = false;
};

// Scans keys until at least `need` candidates are pending or every key <= p_last was seen.
// Must be called by all threads of the block (it contains barriers).
template <int kWarps>
__device__ __forceinline__ void ensure_candidates(Scan& sc, CandidateRing<kWarps>& ring, int need,
                                                  int p_first, int p_last,
                                                  const int* __restrict__ evict_bh,
                                                  const int* __restrict__ chunk_max_bh,
                                                  const float* __restrict__ delta_bh) {
  constexpr int kThreads = Tiles<kWarps>::kThreads, kRing = Tiles<kWarps>::kRing;
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  while (!sc.done && sc.n < need) {
    if (sc.pos > p_last) { sc.done = true; break; }
    // Skip the step when no chunk in it holds a key kept at p_first or later (every thread reads
    // the same chunk maxima, so the decision is block-uniform).
    bool useful = false;
    #pragma unroll
    for (int c = 0; c < kThreads / kKeyChunk; ++c) {
      const int start = sc.pos + c * kKeyChunk;
      useful = useful || (start <= p_last && __ldg(chunk_max_bh + start / kKeyChunk) >= p_first);
    }
    if (useful) {
      const int j = sc.pos + tid;
      int e = -1;
      bool cand = false;
      if (j <= p_last) {
        e = __ldg(evict_bh + j);
        cand = rule::is_candidate(j, e, p_first);
      }
      const unsigned ballot = __ballot_sync(0xffffffffu, cand);
      if (lane == 0) ring.warp_count[sc.parity][warp] = __popc(ballot);
      __syncthreads();  // this step's warp counts are visible. (Rows alternate: the row written
                        // here was last read two steps ago, before the previous barrier.)
      int before = 0, total = 0;
      #pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const int c = ring.warp_count[sc.parity][w];
        before += w < warp ? c : 0;
        total += c;
      }
      if (cand) {
        const int slot =
            (sc.head + sc.n + before + __popc(ballot & ((1u << lane) - 1u))) & (kRing - 1);
        ring.key[slot] = j;
        ring.evict[slot] = e;
        ring.delta2[slot] = __ldg(delta_bh + j) * kLog2e;
      }
      sc.n += total;
      sc.parity ^= 1;
    }
    sc.pos += kThreads;
  }
  __syncthreads();  // the ring entries written above are visible to every thread
}

// Gathers rows ring[head .. head+nt) of src (rows of D elements) into dst [kBk][D+8] with 16-byte
// asynchronous copies; rows nt..kBk-1 are zero-filled. The caller commits and waits.
template <typename T, int D, int kWarps>
__device__ __forceinline__ void gather_rows(T* dst, const T* __restrict__ src,
                                            const CandidateRing<kWarps>& ring, int head, int nt) {
  constexpr int kStride = D + 8, kVecs = D / 8;
  constexpr int kThreads = Tiles<kWarps>::kThreads, kRing = Tiles<kWarps>::kRing;
  for (int c = threadIdx.x; c < kBk * kVecs; c += kThreads) {
    const int r = c / kVecs, col = (c % kVecs) * 8;
    const bool valid = r < nt;
    const int j = valid ? ring.key[(head + r) & (kRing - 1)] : 0;
    cp_async_16(dst + r * kStride + col, src + (size_t)j * D + col, valid);
  }
}

// Loads rows i0 .. i0+Bq of a (L, D) matrix into dst [Bq][D+8]; rows past L are zero-filled.
template <typename T, int D, int kWarps>
__device__ __forceinline__ void load_rows(T* dst, const T* __restrict__ src, int i0, int L) {
  constexpr int kStride = D + 8, kVecs = D / 8;
  constexpr int kThreads = Tiles<kWarps>::kThreads, kBq = Tiles<kWarps>::kBq;
  for (int c = threadIdx.x; c < kBq * kVecs; c += kThreads) {
    const int r = c / kVecs, col = (c % kVecs) * 8, i = i0 + r;
    cp_async_16(dst + r * kStride + col, src + (size_t)min(i, L - 1) * D + col, i < L);
  }
}

// True when all kBk entries of the tile are kept by every query position in [p_lo, p_hi]: the
// keys come in increasing order, so the last is the largest j; the smallest e_j by a warp
// reduction. Warp-uniform; call from all lanes of a warp.
template <int kWarps>
__device__ __forceinline__ bool tile_fully_kept(const CandidateRing<kWarps>& ring, int head, int nt,
                                                int p_lo, int p_hi) {
  constexpr int kMask = Tiles<kWarps>::kRing - 1;
  static_assert(kBk == 64, "two entries per lane");
  const int lane = threadIdx.x % 32;
  const int e_min = __reduce_min_sync(0xffffffffu, min(ring.evict[(head + lane) & kMask],
                                                       ring.evict[(head + lane + 32) & kMask]));
  return nt == kBk && ring.key[(head + kBk - 1) & kMask] <= p_lo && e_min >= p_hi;
}

// Warps per block: 4 or 8, from the environment variable DMA_CUDA_WARPS (default below), so the
// benchmark can compare both from one build.
int block_warps();

}  // namespace dma::cuda::detail
