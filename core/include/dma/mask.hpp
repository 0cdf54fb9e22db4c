// The dynamic mask (paper Eq. 4) in its two forms.
//
// Query i (at position p_i) may see keys j <= p_i. If it sees at most w keys it keeps them all;
// otherwise it keeps the w keys that rank highest by (delta descending, index descending).
//
// 1. explicit_mask: the obvious per-row top-w, (B,Hd,Lq,Lk) bytes. The readable definition.
// 2. evict_positions: one integer e_j per key, (B,Hd,Lk). Key j is kept by exactly the queries
//    with j <= p_i <= e_j. Because delta does not depend on the query, selections nest and a key
//    that leaves the window never comes back, so one interval per key describes the whole mask.
//    e_j is one less than the position of the w-th key ranked above j (keys taken in order of
//    position), or Lk-1 if fewer than w keys rank above j; e_j < j means "never kept".
#pragma once

#include <cstdint>
#include <vector>

#include "dma/types.hpp"

namespace dma {

// delta is (B,Hd,Lk). Returns mask (B,Hd,Lq,Lk), 1 = kept.
template <typename T>
std::vector<uint8_t> explicit_mask(const Shape& s, const Options& opt, const std::vector<T>& delta);

// delta is (B,Hd,Lk). Returns evict (B,Hd,Lk), by a min-heap sweep over the keys in O(Lk log w).
template <typename T>
std::vector<int64_t> evict_positions(const Shape& s, int64_t window, const std::vector<T>& delta);

// Expands the eviction-interval form into the explicit mask (B,Hd,Lq,Lk).
std::vector<uint8_t> mask_from_evict(const Shape& s, const Options& opt,
                                     const std::vector<int64_t>& evict);

// The candidate keys of a query tile (queries q_first..q_last of one (b, delta head)): the union of
// the keys they keep, at most w + (q_last - q_first + 1) of them (docs/design.md §2). evict_bh points
// at the Lk eviction positions of that (b, delta head). Keys come out in increasing order.
std::vector<int64_t> candidate_keys(const Shape& s, const Options& opt, const int64_t* evict_bh,
                                    int64_t q_first, int64_t q_last);

// True when some query in q_first..q_last keeps some key in k_first..k_last.
bool tile_has_kept_key(const Shape& s, const Options& opt, const int64_t* evict_bh,
                       int64_t q_first, int64_t q_last, int64_t k_first, int64_t k_last);

}  // namespace dma
