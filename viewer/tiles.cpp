#include "tiles.hpp"

#include <algorithm>
#include <limits>

#include "dma/mask_rule.hpp"  // the mask rule: inline, no library needed
#include "dma/types.hpp"      // ranks_above: inline

namespace dma::viewer {
namespace {

int64_t position(int64_t Lq, int64_t Lk, bool causal, int64_t i) {
  return rule::query_position<int64_t>(Lq, Lk, causal, i);
}

}  // namespace

int64_t TileGrid::count(TileClass c) const {
  return static_cast<int64_t>(std::count(cls.begin(), cls.end(), c));
}

TileGrid classify_tiles(const int64_t* evict_bh, int64_t Lq, int64_t Lk, bool causal, int64_t Bq,
                        int64_t Bk) {
  TileGrid g;
  g.Bq = Bq;
  g.Bk = Bk;
  g.query_tiles = (Lq + Bq - 1) / Bq;
  g.key_tiles = (Lk + Bk - 1) / Bk;
  g.cls.assign(static_cast<size_t>(g.query_tiles * g.key_tiles), TileClass::outside);
  g.candidates.assign(static_cast<size_t>(g.query_tiles), 0);

  for (int64_t qt = 0; qt < g.query_tiles; ++qt) {
    const int64_t i0 = qt * Bq, i1 = std::min(Lq, i0 + Bq) - 1;
    const int64_t p_first = position(Lq, Lk, causal, i0), p_last = position(Lq, Lk, causal, i1);
    for (int64_t kt = 0; kt < g.key_tiles; ++kt) {
      const int64_t j0 = kt * Bk, j1 = std::min(Lk, j0 + Bk) - 1;
      if (j0 > p_last) continue;  // no query of the tile may see any of its keys
      TileClass c = TileClass::skipped;
      // Key j is kept by some query of the tile when its interval [j, e_j] meets [p_first, p_last].
      for (int64_t j = j0; j <= std::min(j1, p_last); ++j) {
        if (rule::is_candidate(j, evict_bh[j], p_first)) {
          c = TileClass::visited;
          ++g.candidates[qt];
        }
      }
      g.cls[qt * g.key_tiles + kt] = c;
    }
  }
  return g;
}

std::vector<int64_t> gathered_keys(const int64_t* evict_bh, int64_t Lq, int64_t Lk, bool causal,
                                   int64_t q_first, int64_t q_last) {
  const int64_t p_first = position(Lq, Lk, causal, q_first);
  const int64_t p_last = position(Lq, Lk, causal, q_last);
  std::vector<int64_t> keys;
  for (int64_t j = 0; j <= std::min(p_last, Lk - 1); ++j)
    if (rule::is_candidate(j, evict_bh[j], p_first)) keys.push_back(j);
  return keys;
}

KeyFacts key_facts(const float* delta_bh, const int64_t* evict_bh, int64_t Lq, int64_t Lk,
                   bool causal, int64_t query, int64_t key) {
  KeyFacts f;
  const int64_t p = position(Lq, Lk, causal, query);
  f.allowed = key <= p;
  f.kept = f.allowed && rule::is_kept(key, p, evict_bh[key]);
  f.allowed_keys = std::min(p, Lk - 1) + 1;
  f.threshold = std::numeric_limits<float>::infinity();
  int64_t above = 0;
  for (int64_t j = 0; j < f.allowed_keys; ++j) {
    if (rule::is_kept(j, p, evict_bh[j])) {
      ++f.kept_keys;
      f.threshold = std::min(f.threshold, delta_bh[j]);
    }
    if (f.allowed && j != key && ranks_above(delta_bh[j], j, delta_bh[key], key)) ++above;
  }
  if (f.allowed) f.rank = above + 1;
  if (f.kept_keys == 0) f.threshold = 0;
  return f;
}

}  // namespace dma::viewer
