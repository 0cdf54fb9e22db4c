// A tiled CPU implementation that mirrors the GPU algorithm (FlashAttention-style online softmax
// over Bq x Bk tiles), driven by the eviction-interval mask, with counters of the work it did.
//
//   TileMode::dense   every tile a causal kernel would visit; the element mask applied inside
//   TileMode::skip    tiles holding no kept key are skipped (exact: their p is 0)
//   TileMode::gather  each query tile gathers its candidate keys (at most w + Bq, docs/design.md §2)
//                     into a compact block and runs dense tile math on it, Bk keys at a time
#pragma once

#include <cstdint>
#include <vector>

#include "dma/reference.hpp"
#include "dma/types.hpp"

namespace dma {

enum class TileMode { dense, skip, gather };
const char* tile_mode_name(TileMode m);

struct TileConfig {
  int64_t Bq = 64;  // queries per tile
  int64_t Bk = 64;  // keys per tile (gather: keys per chunk of the gathered block)
  TileMode mode = TileMode::gather;
};

// Work counters, summed over (b, hq) and query tiles. "Causal-dense" is what a dense causal
// kernel with the same tiles would do: every tile that holds at least one allowed (i, j).
struct TileCounters {
  int64_t tiles_dense = 0;    // tiles a causal-dense kernel visits
  int64_t tiles_visited = 0;  // tiles (or gathered chunks) this mode ran tile math on
  int64_t tiles_skipped = 0;  // dense/skip: causal-dense tiles left out
  int64_t keys_gathered = 0;  // gather: candidate keys, summed over query tiles
  int64_t max_candidates = 0; // gather: the largest candidate set of one query tile (<= w + Bq)
  int64_t pairs_computed = 0; // (query, key) pairs the tile math ran on
  int64_t pairs_dense = 0;    // pairs a causal-dense kernel computes
  int64_t pairs_kept = 0;     // pairs actually kept by the mask

  double work_fraction() const {
    return pairs_dense ? static_cast<double>(pairs_computed) / static_cast<double>(pairs_dense) : 0;
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
