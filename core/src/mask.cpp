// The dynamic mask, paper Eq. 4, in its explicit and its eviction-interval form (docs/design.md §1.2, §2).
#include "dma/mask.hpp"

#include <algorithm>
#include <queue>

namespace dma {

template <typename T>
std::vector<uint8_t> explicit_mask(const Shape& s, const Options& opt, const std::vector<T>& delta) {
  // delta is (B,Hd,Lk); mask is (B,Hd,Lq,Lk). For every query, the obvious way: list the keys it
  // may see, and if there are more than w of them keep the w that rank highest.
  std::vector<uint8_t> mask(s.mask_numel(), 0);
  std::vector<int64_t> allowed;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.Hd; ++h) {
      const T* delta_bh = &delta[(b * s.Hd + h) * s.Lk];
      for (int64_t i = 0; i < s.Lq; ++i) {
        const int64_t p_i = query_position(s, opt.causal, i);
        allowed.clear();
        for (int64_t j = 0; j <= p_i; ++j) allowed.push_back(j);
        const int64_t keep = std::min<int64_t>(opt.window, static_cast<int64_t>(allowed.size()));
        std::partial_sort(allowed.begin(), allowed.begin() + keep, allowed.end(),
                          [&](int64_t j1, int64_t j2) {
                            return ranks_above(delta_bh[j1], j1, delta_bh[j2], j2);
                          });
        uint8_t* mask_bhi = &mask[((b * s.Hd + h) * s.Lq + i) * s.Lk];
        for (int64_t n = 0; n < keep; ++n) mask_bhi[allowed[n]] = 1;
      }
    }
  return mask;
}

template <typename T>
std::vector<int64_t> evict_positions(const Shape& s, int64_t window, const std::vector<T>& delta) {
  // delta is (B,Hd,Lk); evict is (B,Hd,Lk).
  // Let t(p) be the w-th highest-ranked key among positions <= p. Key j is outranked by at least
  // w keys of the prefix [0..p] exactly when t(p) ranks above j, and t(p) only rises with p, so
  //   e_j = (the first p at which t(p) ranks above j) - 1,   or Lk-1 if there is none.
  // This is the "one less than the position of the w-th key ranked above j" of docs/design.md §2,
  // and it is < j for a key outranked w times before it even arrives (never kept).
  std::vector<int64_t> evict(s.delta_numel(), s.Lk - 1);
  std::vector<int64_t> threshold(s.Lk, -1);  // t(p); -1 while the prefix holds fewer than w keys
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.Hd; ++h) {
      const T* delta_bh = &delta[(b * s.Hd + h) * s.Lk];
      auto outranks = [&](int64_t j1, int64_t j2) {
        return ranks_above(delta_bh[j1], j1, delta_bh[j2], j2);
      };
      // Pass 1: sweep the keys in order, keeping the current top w in a heap whose top is the
      // lowest-ranked of them: that top is t(p). O(Lk log w).
      std::priority_queue<int64_t, std::vector<int64_t>, decltype(outranks)> top_w(
          outranks);
      for (int64_t p = 0; p < s.Lk; ++p) {
        if (static_cast<int64_t>(top_w.size()) < window) {
          top_w.push(p);
        } else if (outranks(p, top_w.top())) {
          top_w.pop();  // the lowest-ranked key leaves the window for good
          top_w.push(p);
        }
        threshold[p] = static_cast<int64_t>(top_w.size()) == window ? top_w.top() : -1;
      }
      // Pass 2: for every key, binary search the first p where t(p) ranks above it. O(Lk log Lk).
      int64_t* evict_bh = &evict[(b * s.Hd + h) * s.Lk];
      const int64_t p_full = std::min(window, s.Lk) - 1;  // first p with a full window
      for (int64_t j = 0; j < s.Lk; ++j) {
        int64_t lo = p_full, hi = s.Lk;  // answer in [lo, hi]; hi means "never outranked w times"
        while (lo < hi) {
          const int64_t mid = lo + (hi - lo) / 2;
          if (threshold[mid] >= 0 && outranks(threshold[mid], j)) hi = mid;
          else lo = mid + 1;
        }
        evict_bh[j] = lo - 1;  // lo == Lk gives Lk-1
      }
    }
  return evict;
}

std::vector<uint8_t> mask_from_evict(const Shape& s, const Options& opt,
                                     const std::vector<int64_t>& evict) {
  std::vector<uint8_t> mask(s.mask_numel(), 0);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.Hd; ++h) {
      const int64_t* evict_bh = &evict[(b * s.Hd + h) * s.Lk];
      for (int64_t i = 0; i < s.Lq; ++i) {
        const int64_t p_i = query_position(s, opt.causal, i);
        uint8_t* mask_bhi = &mask[((b * s.Hd + h) * s.Lq + i) * s.Lk];
        for (int64_t j = 0; j < s.Lk; ++j) mask_bhi[j] = is_kept(j, p_i, evict_bh[j]);
      }
    }
  return mask;
}

std::vector<int64_t> candidate_keys(const Shape& s, const Options& opt, const int64_t* evict_bh,
                                    int64_t q_first, int64_t q_last) {
  // Key j is kept by some query of the tile when its interval [j, e_j] meets [p_first, p_last].
  const int64_t p_first = query_position(s, opt.causal, q_first);
  const int64_t p_last = query_position(s, opt.causal, q_last);
  std::vector<int64_t> keys;
  for (int64_t j = 0; j <= p_last; ++j)
    if (rule::is_candidate(j, evict_bh[j], p_first)) keys.push_back(j);
  return keys;
}

bool tile_has_kept_key(const Shape& s, const Options& opt, const int64_t* evict_bh,
                       int64_t q_first, int64_t q_last, int64_t k_first, int64_t k_last) {
  const int64_t p_first = query_position(s, opt.causal, q_first);
  const int64_t p_last = query_position(s, opt.causal, q_last);
  for (int64_t j = k_first; j <= std::min(k_last, p_last); ++j)
    if (rule::is_candidate(j, evict_bh[j], p_first)) return true;
  return false;
}

template std::vector<uint8_t> explicit_mask(const Shape&, const Options&, const std::vector<float>&);
template std::vector<uint8_t> explicit_mask(const Shape&, const Options&, const std::vector<double>&);
template std::vector<int64_t> evict_positions(const Shape&, int64_t, const std::vector<float>&);
template std::vector<int64_t> evict_positions(const Shape&, int64_t, const std::vector<double>&);

}  // namespace dma
