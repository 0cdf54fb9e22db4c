// Candidate tables: what the mask phase hands the attention kernels so that no query tile ever
// scans the eviction positions (docs/design.md §2, "Candidate lists" and "Slots").
//
// Queries are cut into tiles of Bq (tile t: queries t*Bq .. min((t+1)*Bq, Lq) - 1, positions
// p_first(t) .. p_last(t)). The candidates of tile t are the keys some query of the tile keeps:
//
//     C_t = { j <= p_last(t) : e_j >= max(j, p_first(t)) },    |C_t| <= w + Bq - 1
//
// (nesting: the w keys query p_first(t) keeps, plus the tile's other Bq - 1 positions; if
// p_first(t) itself is not kept, it is not a candidate either).
//
// Each key is a candidate of one run of consecutive tiles, so keys can be given "slots" for their
// whole life, interval-partitioning style, sweeping the tiles in order:
//
//     tile t: a key of tile t-1 stays in its slot while it is still a candidate (e_j >= p_first(t));
//             the keys that arrive (new positions (p_last(t-1), p_last(t)] that are candidates),
//             in increasing j, take the free slots in increasing slot order.
//
// At most max_t |C_t| <= min(w + Bq - 1, Lk) slots are ever used (the stride keeps w + Bq). Per tile the table holds
//   slot_key[t][s]  the key in slot s, or -1: the backward sweeps a block of slots over the tiles,
//                   keeps the gradients of its keys in registers and writes each key once, when
//                   it leaves its slot (no atomics);
//   list[t][..]     C_t compacted: first the keys every query of the tile keeps (j <= p_first(t)
//                   and e_j >= p_last(t): no element mask needed), then the others, each group in
//                   slot order; -1 past n_alive[t]. The forward walks it Bk keys at a time.
// The GPU builds the same table bitwise (cuda/src/candidates.cu); the tiled CPU code and the
// inspector read this one.
#pragma once

#include <cstdint>
#include <vector>

namespace dma {

struct CandidateTable {
  int64_t tiles = 0;   // T = ceil(Lq / Bq)
  int64_t stride = 0;  // S = min(w + Bq, Lk): slots per tile, also the stride of list
  int64_t Bq = 0;
  std::vector<int32_t> slot_key;  // [T][S] key held by each slot, -1 free
  std::vector<int32_t> list;      // [T][S] C_t: fully kept keys first, then the rest; -1 padding
  std::vector<int32_t> n_alive;   // [T] |C_t|
  std::vector<int32_t> n_full;    // [T] keys kept by every query of tile t (the head of list[t])
  int64_t slots_used = 0;         // 1 + the highest slot any tile uses (<= stride)

  int32_t key(int64_t t, int64_t s) const { return slot_key[t * stride + s]; }
};

// One (b, delta head): evict_bh holds its Lk eviction positions (mask.hpp).
CandidateTable candidate_table(const int64_t* evict_bh, int64_t Lq, int64_t Lk, bool causal,
                               int64_t window, int64_t Bq);

}  // namespace dma
