// The dynamic mask: explicit top-w vs eviction intervals, the tie rule, nesting, the union bound.
#include <doctest/doctest.h>

#include <algorithm>

#include "dma/mask.hpp"
#include "dma/mask_rule.hpp"
#include "test_util.hpp"

using namespace dma;
using namespace dma_test;

namespace {

// e_j straight from its definition: one less than the position of the w-th key ranked above j,
// keys taken in order of position; Lk-1 if fewer than w keys rank above j.
std::vector<int64_t> evict_by_definition(const Shape& s, int64_t w, const std::vector<double>& delta) {
  std::vector<int64_t> e(delta.size());
  for (int64_t bh = 0; bh < s.B * s.Hd; ++bh) {
    const double* d = &delta[bh * s.Lk];
    for (int64_t j = 0; j < s.Lk; ++j) {
      int64_t above = 0, at = s.Lk;
      for (int64_t i = 0; i < s.Lk && at == s.Lk; ++i)
        if (ranks_above(d[i], i, d[j], j) && ++above == w) at = i;
      e[bh * s.Lk + j] = at - 1;
    }
  }
  return e;
}

// Delta with many exact ties: a few distinct values only.
std::vector<double> tied_delta(std::mt19937_64& rng, int64_t n, int levels) {
  std::uniform_int_distribution<int> pick(0, levels - 1);
  std::vector<double> d(static_cast<size_t>(n));
  for (auto& x : d) x = 0.5 * pick(rng);
  return d;
}

struct MaskCase {
  Shape s;
  int64_t w;
  bool causal;
  bool ties;
};

}  // namespace

TEST_SUITE("cpu") {
  TEST_CASE("explicit mask and eviction intervals agree on every query-key pair") {
    std::mt19937_64 rng(test_seed());
    const MaskCase cases[] = {
        {make_shape(2, 4, 2, 2, 17, 17, 4), 5, true, false},
        {make_shape(1, 4, 2, 4, 9, 23, 4), 4, true, false},   // Lq < Lk, Hd = Hq
        {make_shape(1, 2, 1, 1, 13, 31, 4), 7, true, true},   // heavy ties
        {make_shape(1, 2, 2, 2, 40, 40, 4), 1, true, true},   // w = 1 with ties
        {make_shape(1, 2, 2, 2, 12, 12, 4), 64, true, false}, // w >= Lk
        {make_shape(2, 2, 1, 1, 7, 19, 4), 6, false, false},  // non-causal
        {make_shape(1, 1, 1, 1, 11, 29, 4), 3, false, true},  // non-causal with ties
        {make_shape(1, 2, 1, 2, 30, 12, 4), 5, false, false}, // non-causal with Lq > Lk
        {make_shape(1, 1, 1, 1, 1, 1, 4), 1, true, false},    // a single key
    };
    for (const MaskCase& c : cases) {
      const std::vector<double> delta =
          c.ties ? tied_delta(rng, c.s.delta_numel(), 3) : randn<double>(rng, c.s.delta_numel());
      const Options opt = make_options(c.w, c.causal);
      const std::vector<int64_t> evict = evict_positions(c.s, c.w, delta);
      CHECK(mask_from_evict(c.s, opt, evict) == explicit_mask(c.s, opt, delta));
      CHECK(evict == evict_by_definition(c.s, c.w, delta));
      // Every query keeps exactly min(w, allowed keys).
      const std::vector<uint8_t> mask = explicit_mask(c.s, opt, delta);
      for (int64_t bh = 0; bh < c.s.B * c.s.Hd; ++bh)
        for (int64_t i = 0; i < c.s.Lq; ++i) {
          const int64_t allowed = query_position(c.s, c.causal, i) + 1;
          const auto row = mask.begin() + (bh * c.s.Lq + i) * c.s.Lk;
          CHECK(std::count(row, row + c.s.Lk, 1) == std::min(c.w, allowed));
        }
    }
  }

  TEST_CASE("tie rule: all-equal delta is sliding-window attention over the w most recent keys") {
    const Shape s = make_shape(1, 1, 1, 1, 20, 25, 4);
    const std::vector<double> delta(s.delta_numel(), 1.0);  // e.g. a = 0 in the exp form
    for (bool causal : {true, false}) {
      const Options opt = make_options(6, causal);
      const std::vector<uint8_t> mask = explicit_mask(s, opt, delta);
      for (int64_t i = 0; i < s.Lq; ++i) {
        const int64_t p = query_position(s, causal, i);
        for (int64_t j = 0; j < s.Lk; ++j)
          CHECK(mask[i * s.Lk + j] == (j <= p && j > p - 6));
      }
      CHECK(mask_from_evict(s, opt, evict_positions(s, 6, delta)) == mask);
    }
  }

  TEST_CASE("selections nest and a query tile needs at most w + Bq candidate keys") {
    std::mt19937_64 rng(test_seed() + 1);
    const Shape s = make_shape(1, 1, 1, 1, 200, 200, 4);
    const int64_t w = 16, Bq = 32;
    // random, all-equal, increasing, decreasing and sawtooth delta (the adversarial ones)
    std::vector<std::vector<double>> deltas = {randn<double>(rng, s.Lk), tied_delta(rng, s.Lk, 2),
                                               std::vector<double>(s.Lk, 0.0)};
    std::vector<double> inc(s.Lk), dec(s.Lk), saw(s.Lk);
    for (int64_t j = 0; j < s.Lk; ++j) {
      inc[j] = double(j);
      dec[j] = -double(j);
      saw[j] = double(j % 37) - 0.01 * j;
    }
    deltas.push_back(inc);
    deltas.push_back(dec);
    deltas.push_back(saw);
    const Options opt = make_options(w);
    for (const auto& delta : deltas) {
      const std::vector<uint8_t> mask = explicit_mask(s, opt, delta);
      // nesting: kept(i) is a subset of kept(i-1) + {p_i}
      for (int64_t i = 1; i < s.Lq; ++i)
        for (int64_t j = 0; j < s.Lk; ++j)
          if (mask[i * s.Lk + j] && j != query_position(s, true, i))
            CHECK(mask[(i - 1) * s.Lk + j]);
      const std::vector<int64_t> evict = evict_positions(s, w, delta);
      for (int64_t i0 = 0; i0 < s.Lq; i0 += Bq) {
        const int64_t i1 = std::min(i0 + Bq, s.Lq) - 1;
        const std::vector<int64_t> cand = candidate_keys(s, opt, evict.data(), i0, i1);
        CHECK(static_cast<int64_t>(cand.size()) <= w + (i1 - i0 + 1));
        // the candidates are exactly the union of the kept keys of the tile's queries
        std::vector<int64_t> uni;
        for (int64_t j = 0; j < s.Lk; ++j)
          for (int64_t i = i0; i <= i1; ++i)
            if (mask[i * s.Lk + j]) { uni.push_back(j); break; }
        CHECK(cand == uni);
      }
    }
  }

  TEST_CASE("tile_has_kept_key matches the explicit mask") {
    std::mt19937_64 rng(test_seed() + 2);
    const Shape s = make_shape(1, 1, 1, 1, 45, 60, 4);
    for (bool causal : {true, false}) {
      const Options opt = make_options(9, causal);
      const std::vector<double> delta = randn<double>(rng, s.Lk);
      const std::vector<uint8_t> mask = explicit_mask(s, opt, delta);
      const std::vector<int64_t> evict = evict_positions(s, 9, delta);
      for (int64_t i0 = 0; i0 < s.Lq; i0 += 8)
        for (int64_t k0 = 0; k0 < s.Lk; k0 += 8) {
          const int64_t i1 = std::min(i0 + 8, s.Lq) - 1, k1 = std::min(k0 + 8, s.Lk) - 1;
          bool any = false;
          for (int64_t i = i0; i <= i1; ++i)
            for (int64_t j = k0; j <= k1; ++j) any |= mask[i * s.Lk + j] != 0;
          CHECK(tile_has_kept_key(s, opt, evict.data(), i0, i1, k0, k1) == any);
        }
    }
  }

  TEST_CASE("rule::kept_queries is exactly the queries whose position keeps the key") {
    std::mt19937_64 rng(test_seed() + 3);
    int64_t ranges = 0, empty = 0;
    for (int n = 0; n < 20000; ++n) {
      const int64_t Lk = 1 + int64_t(rng() % 400), Lq = 1 + int64_t(rng() % Lk);
      const bool causal = rng() % 4 != 0;
      const int64_t i0 = int64_t(rng() % Lq), i_end = i0 + 1 + int64_t(rng() % (Lq - i0));
      const int64_t p0 = rule::query_position(Lq, Lk, causal, i0);
      const bool empty_slot = rng() % 10 == 0;  // key -1, e_j -1: the kernels' empty slots
      const int64_t j = empty_slot ? -1 : int64_t(rng() % Lk);
      const int64_t choices[] = {-1, j - 1, j, j + 1, Lk - 1, p0 - 1, p0, p0 + 1, int64_t(rng() % Lk)};
      const int64_t e = empty_slot ? -1 : choices[rng() % 9];
      int64_t first = 0, last = 0;
      rule::kept_queries(Lq, Lk, causal, j, e, i0, i_end, first, last);
      for (int64_t i = i0; i < i_end; ++i) {
        const bool kept = rule::is_kept(j, rule::query_position(Lq, Lk, causal, i), e);
        if (kept != (first <= i && i <= last)) FAIL("query ", i, " of ", i0, "..", i_end - 1, ": ", kept);
      }
      CHECK(first >= i0);
      CHECK(last < i_end);
      (first <= last ? ranges : empty) += 1;
    }
    CHECK(ranges > 5000);  // the draw reaches both answers
    CHECK(empty > 5000);
  }
}
