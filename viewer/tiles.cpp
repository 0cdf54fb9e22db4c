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

std::vector<KeyRun> key_runs(const CandidateTable& c, int64_t Lk) {
  std::vector<KeyRun> runs(static_cast<size_t>(Lk));
  for (int64_t t = 0; t < c.tiles; ++t)
    for (int64_t s = 0; s < c.slots_used; ++s) {
      const int64_t j = c.key(t, s);
      if (j < 0) continue;
      KeyRun& r = runs[j];
      if (r.first_tile < 0) {
        r.first_tile = t;
        r.slot = s;
      }
      r.last_tile = t;  // runs are contiguous (docs/design.md §2.9): the last tile seen ends it
    }
  return runs;
}

Image slot_image(const CandidateTable& c, int64_t Lk) {
  Image img;
  img.width = static_cast<int>(std::max<int64_t>(c.slots_used, 1));
  img.height = static_cast<int>(c.tiles);
  img.pixels.assign(static_cast<size_t>(img.width) * img.height, kDroppedDark);
  const float last = static_cast<float>(std::max<int64_t>(Lk - 1, 1));
  for (int64_t t = 0; t < c.tiles; ++t)
    for (int64_t s = 0; s < c.slots_used; ++s)
      if (const int64_t j = c.key(t, s); j >= 0)
        img.pixels[t * img.width + s] = viridis(static_cast<float>(j) / last);
  return img;
}

SlotWork slot_work(const CandidateTable& c, const int64_t* evict_bh, int64_t Lq, int64_t Lk,
                   bool causal, int64_t Bk, int64_t heads) {
  SlotWork w;
  w.tiles = c.tiles;
  w.slots_used = c.slots_used;
  for (const KeyRun& r : key_runs(c, Lk)) w.keys_alive += r.first_tile >= 0;
  for (int64_t t = 0; t < c.tiles; ++t) {
    const int64_t i0 = t * c.Bq, i1 = std::min(Lq, i0 + c.Bq);  // queries i0 .. i1-1
    const int64_t n_alive = c.n_alive[t], n_full = c.n_full[t];
    w.max_candidates = std::max(w.max_candidates, n_alive);
    // The lists, Bk keys at a time: a chunk inside the fully kept head needs no element test.
    for (int64_t n0 = 0; n0 < n_alive; n0 += Bk)
      (std::min(n_alive, n0 + Bk) <= n_full ? w.chunks_unmasked : w.chunks_masked) += heads;
    for (int64_t n = 0; n < n_alive; ++n) {
      const int64_t j = c.list[t * c.stride + n];
      for (int64_t i = i0; i < i1; ++i)
        w.pairs_kept += heads * rule::is_kept(j, position(Lq, Lk, causal, i), evict_bh[j]);
    }
    // The slot sweep: a block of Bk slots runs tile math at tile t when one of them is occupied.
    for (int64_t s0 = 0; s0 < c.slots_used; s0 += Bk) {
      const int64_t s1 = std::min(c.slots_used, s0 + Bk);
      bool occupied = false;
      for (int64_t s = s0; s < s1; ++s) occupied = occupied || c.key(t, s) >= 0;
      if (occupied) {
        w.slot_blocks_visited += heads;
        w.pairs_swept += heads * (i1 - i0) * (s1 - s0);
      } else {
        w.slot_blocks_skipped += heads;
      }
    }
  }
  return w;
}

}  // namespace dma::viewer
