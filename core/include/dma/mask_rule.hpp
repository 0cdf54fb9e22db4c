// The rule the whole algorithm rests on, written once for the host and the device
// (docs/design.md §2). Everything that asks "where does query i sit", "does query p keep key j"
// or "is key j a candidate of this query tile" calls these functions: the reference, the tiled
// CPU code, the CUDA kernels, the pair counts of the benchmark and the inspector's overlays.
//
// They are templates on the index type (int64_t on the host, int in the kernels) and compile as
// __host__ __device__ under nvcc. No library, no includes beyond <cstdint>.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DMA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define DMA_HOST_DEVICE inline
#endif

namespace dma::rule {

// Absolute position p_i of query i (of Lq) over Lk keys: its allowed keys are j <= p_i.
// Causal queries are aligned bottom-right, as in decoding; non-causal ones see all Lk keys.
template <typename I>
DMA_HOST_DEVICE I query_position(I Lq, I Lk, bool causal, I i) {
  return causal ? i + (Lk - Lq) : Lk - 1;
}

// Key j (eviction position e_j) is kept by the query at position p exactly when j <= p <= e_j.
template <typename I>
DMA_HOST_DEVICE bool is_kept(I j, I p, I evict_j) {
  return j <= p && p <= evict_j;
}

// Key j is kept by some query position at all: e_j < j means it was outranked w times before it
// arrived (its interval [j, e_j] is empty).
template <typename I>
DMA_HOST_DEVICE bool is_ever_kept(I j, I evict_j) {
  return evict_j >= j;
}

// Key j is a candidate of the query tile whose first query sits at p_first when some query of
// the tile keeps it: its interval [j, e_j] reaches p_first and it is kept at all (e_j >= j).
// With j <= p_last (the caller's loop bound) these are at most w + Bq keys (nesting).
template <typename I>
DMA_HOST_DEVICE bool is_candidate(I j, I evict_j, I p_first) {
  return is_ever_kept(j, evict_j) && evict_j >= p_first;
}

// How many of the query positions p_lo..p_hi keep key j: the length of [j, e_j] ∩ [p_lo, p_hi].
template <typename I>
DMA_HOST_DEVICE I kept_positions(I j, I evict_j, I p_lo, I p_hi) {
  const I lo = j > p_lo ? j : p_lo, hi = evict_j < p_hi ? evict_j : p_hi;
  return hi >= lo ? hi - lo + 1 : I(0);
}

// The queries i0 <= i < i_end (of Lq, over Lk keys) that keep key j, as the range first..last
// (first > last: none). Positions do not decrease with i and key j is kept by one interval of
// them, so the queries that keep it are one interval too: a kernel tests an element against it
// with two compares, without computing the element's position.
template <typename I>
DMA_HOST_DEVICE void kept_queries(I Lq, I Lk, bool causal, I j, I evict_j, I i0, I i_end, I& first,
                                  I& last) {
  if (causal) {  // p_i = i + shift: j <= p_i <= e_j exactly for j - shift <= i <= e_j - shift
    const I shift = query_position(Lq, Lk, true, I(0));
    first = j - shift > i0 ? j - shift : i0;
    last = evict_j - shift < i_end - 1 ? evict_j - shift : i_end - 1;
  } else {  // every query sits at Lk - 1
    first = i0;
    last = is_kept(j, query_position(Lq, Lk, false, i0), evict_j) ? i_end - 1 : i0 - 1;
  }
}

}  // namespace dma::rule
