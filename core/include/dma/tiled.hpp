// A tiled CPU implementation that mirrors the GPU algorithm (FlashAttention-style online softmax
// over Bq x Bk tiles), driven by the eviction-interval mask, with counters of the work it did.
//
//   TileMode::dense   every tile a causal kernel would visit; the element mask applied inside
//   TileMode::skip    tiles holding no kept key are skipped (exact: their p is 0)
//   TileMode::gather  each query tile walks its list of candidate keys from the candidate table
//                     (dma/candidates.hpp: at most w + Bq keys, fully kept keys first), Bk keys at
//                     a time; a chunk of fully kept keys needs no element mask
//
// The backward of dense and skip walks the forward's key blocks and adds each block's dK, dV,
// ddelta into place (what a GPU does with atomics). The backward of gather is the atomic-free
// one of docs/design.md §2.9:
//   1. dK, dV, ddelta by a key-slot-major sweep: for each block of Bk slots of a (b, delta head),
//      the query tiles in order (all query heads of the delta head at each tile); the block keeps
//      the accumulators of the keys in its slots and writes a key's dk, dv and its complete
//      ddelta once, when the key leaves its slot (or after the last tile);
//   2. dQ by a separate query-major pass over the same lists as the forward;
//   3. with Hd = Hq > Hkv, the dk, dv of the delta heads of one kv head summed in increasing hd.
// Every sum has a fixed order, so two runs give bitwise equal results.
#pragma once

#include <cstdint>
#include <vector>

#include "dma/reference.hpp"
#include "dma/types.hpp"

namespace dma {

enum class TileMode { dense, skip, gather };
const char* tile_mode_name(TileMode m);

struct TileConfig {
  int64_t Bq = 64;  // queries per tile (gather: also the tiles of the candidate table)
  int64_t Bk = 64;  // keys per tile (gather: keys per list chunk, and slots per slot block)
  TileMode mode = TileMode::gather;
  // gather: the slot sweep runs in spans of span_tiles query tiles (0: one span), as the Hopper
  // kernel splits it when its slot blocks are few (cuda/src/backward_sm90.cu): each span starts
  // with empty accumulators, the sums of a key that lives across a span's first tile are
  // carried, and added to the key's row after the sweep, in span order.
  int64_t span_tiles = 0;
};

// Work counters, summed over (b, hq) and query tiles unless said otherwise. "Causal-dense" is what
// a dense causal kernel with the same tiles would do: every tile that holds at least one allowed
// (i, j). The gather backward's dQ pass walks the forward's chunks, so its tile, pair, key and
// chunk counts equal the forward's; the slot sweep has counters of its own.
struct TileCounters {
  int64_t tiles_dense = 0;    // tiles a causal-dense kernel visits
  int64_t tiles_visited = 0;  // tiles (or list chunks) this mode ran tile math on
  int64_t tiles_skipped = 0;  // dense/skip: causal-dense tiles left out
  int64_t keys_gathered = 0;  // gather: candidate keys (|C_t|), summed over query tiles
  int64_t max_candidates = 0; // gather: the largest candidate set of one query tile (<= w + Bq)
  int64_t pairs_computed = 0; // (query, key) pairs the tile math ran on (gather bwd: the dQ pass)
  int64_t pairs_dense = 0;    // pairs a causal-dense kernel computes
  int64_t pairs_kept = 0;     // pairs actually kept by the mask

  // gather: the lists (forward, and the backward's dQ pass)
  int64_t keys_full = 0;        // keys kept by every query of their tile (the head of each list)
  int64_t chunks_unmasked = 0;  // chunks entirely inside that head: no element mask test
  int64_t chunks_masked = 0;    // the others (chunks_masked + chunks_unmasked = tiles_visited)
  int64_t slots_used = 0;       // the most slots one (b, delta head) uses (<= min(w + Bq, Lk))

  // gather backward: the slot sweep for dK, dV, ddelta. A slot block is Bk consecutive slots of
  // the slots used; it meets every query tile once per query head of its delta head.
  int64_t slot_blocks_visited = 0;  // (slot block, query tile, query head) with an occupied slot
  int64_t slot_blocks_skipped = 0;  // ... with all its slots empty: no tile math
  int64_t pairs_swept = 0;  // pairs the sweep's tile math ran on: rows x slots of the block,
                            // empty slots included (the GPU computes them masked)
  int64_t key_writes = 0;   // keys whose dk, dv, ddelta the sweep wrote, summed over
                            // (b, delta head): each key that is a candidate of some tile, once
  int64_t key_carries = 0;  // sums carried across a span's first tile and added afterwards

  double work_fraction() const {
    return pairs_dense ? static_cast<double>(pairs_computed) / static_cast<double>(pairs_dense) : 0;
  }
  // The slot sweep's work over the least any method must do (~1.1-1.25 on random delta).
  double sweep_overhead() const {
    return pairs_kept ? static_cast<double>(pairs_swept) / static_cast<double>(pairs_kept) : 0;
  }
};

// Same inputs and outputs as reference_forward, but the mask is given as evict (B,Hd,Lk).
template <typename T>
ForwardResult<T> tiled_forward(const Shape& s, const Options& opt, const TileConfig& tc,
                               const std::vector<T>& q, const std::vector<T>& k,
                               const std::vector<T>& v, const std::vector<T>& delta,
                               const std::vector<int64_t>& evict, TileCounters* counters = nullptr);

template <typename T>
AttentionGrads<T> tiled_backward(const Shape& s, const Options& opt, const TileConfig& tc,
                                 const std::vector<T>& q, const std::vector<T>& k,
                                 const std::vector<T>& v, const std::vector<T>& delta,
                                 const std::vector<int64_t>& evict, const ForwardResult<T>& fwd,
                                 const std::vector<T>& dout, TileCounters* counters = nullptr);

}  // namespace dma
