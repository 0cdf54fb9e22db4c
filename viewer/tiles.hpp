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
//
// The slot view (panel_slots.cpp) reads a candidate table (dma/candidates.hpp: query tiles x
// slots, the key each slot holds) built by dma::candidate_table; the helpers here only read it.
#pragma once

#include <cstdint>
#include <vector>

#include "dma/candidates.hpp"  // the CandidateTable struct only: no library call here
#include "heatmap.hpp"

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

// ---- the slot table (docs/design.md §2.9) ------------------------------------------------------

// The run of query tiles key j is a candidate of, and the slot it holds over the whole run;
// first_tile = -1 for a key no tile has (never kept, or evicted before the first query).
struct KeyRun {
  int64_t first_tile = -1, last_tile = -1, slot = -1;
};
std::vector<KeyRun> key_runs(const CandidateTable& c, int64_t Lk);  // Lk entries

// The table as a picture: one row per query tile, one column per slot used (c.slots_used); a
// slot holding key j in viridis at j / (Lk - 1) (old keys dark blue, recent ones yellow), an
// empty slot kDroppedDark.
Image slot_image(const CandidateTable& c, int64_t Lk);

// The work of the gather backward and forward on one (b, delta head), from its table alone:
// what dma::tiled_forward / tiled_backward count for it with `heads` query heads (Hq / Hd).
struct SlotWork {
  int64_t tiles = 0, slots_used = 0, max_candidates = 0;
  int64_t keys_alive = 0;  // keys written once by the sweep
  int64_t slot_blocks_visited = 0, slot_blocks_skipped = 0;
  int64_t pairs_swept = 0, pairs_kept = 0;
  int64_t chunks_unmasked = 0, chunks_masked = 0;  // list chunks of Bk keys (forward, dQ)
  double sweep_overhead() const { return pairs_kept ? double(pairs_swept) / double(pairs_kept) : 0; }
};
SlotWork slot_work(const CandidateTable& c, const int64_t* evict_bh, int64_t Lq, int64_t Lk,
                   bool causal, int64_t Bk, int64_t heads);

}  // namespace dma::viewer
