// What the tiled kernels do with each Bq x Bk tile, recomputed from the eviction positions alone.
// Pure (only the inline rules of dma/mask_rule.hpp and dma/types.hpp): the inspector draws it, the tests check that it
// agrees with the counters dma::tiled_forward reports.
//
//   outside  no allowed (i, j) in the tile: a causal kernel never visits it
//   skipped  allowed pairs but no kept key: TileMode::skip leaves it out (exact, its p is 0)
//   visited  at least one kept (i, j): tile math runs on it
//
// And per query tile, the candidate keys TileMode::gather collects: the union of the keys its
// queries keep, {j <= p_last : rule::is_candidate(j, e_j, p_first)}, at most w + Bq of them
// (docs/design.md §2).
#pragma once

#include <cstdint>
#include <vector>

namespace dma::viewer {

enum class TileClass : uint8_t { outside, skipped, visited };

struct TileGrid {
  int64_t Bq = 0, Bk = 0;
  int64_t query_tiles = 0, key_tiles = 0;
  std::vector<TileClass> cls;         // query_tiles x key_tiles, row-major
  std::vector<int64_t> candidates;    // per query tile: how many keys gather collects
  TileClass at(int64_t qt, int64_t kt) const { return cls[qt * key_tiles + kt]; }
  int64_t count(TileClass c) const;
};

// evict_bh: the Lk eviction positions of one (batch, delta head).
TileGrid classify_tiles(const int64_t* evict_bh, int64_t Lq, int64_t Lk, bool causal, int64_t Bq,
                        int64_t Bk);

// The candidate keys of queries q_first..q_last, in increasing order.
std::vector<int64_t> gathered_keys(const int64_t* evict_bh, int64_t Lq, int64_t Lk, bool causal,
                                   int64_t q_first, int64_t q_last);

// Facts about one (query, key) cell that the tooltips show, from delta and evict of one
// (batch, delta head). rank is 1 for the top-ranked allowed key of that query, 0 if j is not
// allowed. threshold is the smallest delta the query keeps (the bar plot's line).
struct KeyFacts {
  bool allowed = false, kept = false;
  int64_t rank = 0;
  int64_t allowed_keys = 0;  // keys j <= p_i
  int64_t kept_keys = 0;
  float threshold = 0;
};
KeyFacts key_facts(const float* delta_bh, const int64_t* evict_bh, int64_t Lq, int64_t Lk,
                   bool causal, int64_t query, int64_t key);

}  // namespace dma::viewer
