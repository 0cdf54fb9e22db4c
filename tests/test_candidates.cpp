// The candidate table (dma/candidates.hpp) against its definition: the lists are the candidate
// sets of mask.hpp, fully kept keys come first, and the slots follow each key over its one run of
// query tiles (docs/design.md §2.8, §2.9). Fresh random delta every run (the seed is printed).
#include <doctest/doctest.h>

#include <algorithm>
#include <map>
#include <random>
#include <set>

#include "dma/candidates.hpp"
#include "dma/mask.hpp"
#include "test_util.hpp"

using namespace dma;
using namespace dma_test;

namespace {

struct TableCase {
  int64_t Lq, Lk, window, Bq;
  bool causal;
};

// Every property of one table, checked against the eviction positions by brute force. Returns
// the table for the caller's own checks.
CandidateTable check_table(const std::vector<int64_t>& evict, const TableCase& tc) {
  CAPTURE(tc.Lq);
  CAPTURE(tc.Lk);
  CAPTURE(tc.window);
  CAPTURE(tc.Bq);
  CAPTURE(tc.causal);
  Shape s = make_shape(1, 1, 1, 1, tc.Lq, tc.Lk, 1);
  const Options opt = make_options(tc.window, tc.causal);
  const CandidateTable c = candidate_table(evict.data(), tc.Lq, tc.Lk, tc.causal, tc.window, tc.Bq);
  const int64_t T = (tc.Lq + tc.Bq - 1) / tc.Bq, S = std::min(tc.window + tc.Bq, tc.Lk);
  REQUIRE(c.tiles == T);
  REQUIRE(c.stride == S);
  REQUIRE(c.Bq == tc.Bq);
  REQUIRE(c.slot_key.size() == static_cast<size_t>(T * S));
  REQUIRE(c.list.size() == static_cast<size_t>(T * S));

  std::map<int64_t, std::vector<int64_t>> tiles_of, slots_of;  // key -> its tiles, its slots
  int64_t max_alive = 0, highest_slot = -1;
  for (int64_t t = 0; t < T; ++t) {
    CAPTURE(t);
    const int64_t q_first = t * tc.Bq, q_last = std::min(tc.Lq, q_first + tc.Bq) - 1;
    const int64_t p_first = query_position(s, tc.causal, q_first);
    const int64_t p_last = query_position(s, tc.causal, q_last);
    const int64_t n_alive = c.n_alive[t], n_full = c.n_full[t];
    max_alive = std::max(max_alive, n_alive);

    // The list holds exactly C_t, the union of the keys the tile's queries keep (mask.hpp).
    std::vector<int64_t> listed(c.list.begin() + t * S, c.list.begin() + t * S + n_alive);
    CHECK(std::all_of(c.list.begin() + t * S + n_alive, c.list.begin() + (t + 1) * S,
                      [](int32_t j) { return j == -1; }));
    std::vector<int64_t> sorted = listed;
    std::sort(sorted.begin(), sorted.end());
    CHECK(sorted == candidate_keys(s, opt, evict.data(), q_first, q_last));
    CHECK(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end());

    // The slots hold the same keys, each in one slot.
    std::map<int64_t, int64_t> slot_of;
    for (int64_t sl = 0; sl < S; ++sl) {
      const int64_t j = c.key(t, sl);
      if (j < 0) continue;
      CHECK(slot_of.count(j) == 0);
      slot_of[j] = sl;
      highest_slot = std::max(highest_slot, sl);
      tiles_of[j].push_back(t);
      slots_of[j].push_back(sl);
    }
    CHECK(static_cast<int64_t>(slot_of.size()) == n_alive);
    for (int64_t j : listed) CHECK(slot_of.count(j) == 1);

    // n_full counts exactly the keys every query of the tile keeps, and they come first; each
    // group is in slot order.
    for (int64_t n = 0; n < n_alive; ++n) {
      const int64_t j = listed[n];
      bool every = true, some = false;
      for (int64_t i = q_first; i <= q_last; ++i) {
        const bool kept = is_kept(j, query_position(s, tc.causal, i), evict[j]);
        every = every && kept;
        some = some || kept;
      }
      CHECK(some);
      CHECK(every == (n < n_full));
      CHECK(every == (j <= p_first && evict[j] >= p_last));
      if (n > 0 && n != n_full) CHECK(slot_of[listed[n - 1]] < slot_of[j]);
    }

    // A key of tile t-1 that is still a candidate keeps its slot.
    if (t > 0)
      for (int64_t sl = 0; sl < S; ++sl) {
        const int64_t j = c.key(t - 1, sl);
        if (j >= 0 && slot_of.count(j)) CHECK(slot_of[j] == sl);
      }
  }

  // Each key occupies one contiguous run of tiles, in one slot.
  for (const auto& [j, tiles] : tiles_of) {
    CAPTURE(j);
    CHECK(tiles.back() - tiles.front() + 1 == static_cast<int64_t>(tiles.size()));
    const std::vector<int64_t>& sl = slots_of[j];
    CHECK(std::all_of(sl.begin(), sl.end(), [&](int64_t x) { return x == sl.front(); }));
  }
  // Interval partitioning is optimal: a key that takes slot k finds slots 0..k-1 occupied, so the
  // slots used are exactly the largest candidate set; by nesting it is at most w + Bq - 1
  // (|S_t| <= w - 1 when the tile's first key is kept, else |N_t| <= Bq - 1) and at most Lk.
  CHECK(c.slots_used == highest_slot + 1);
  CHECK(c.slots_used == max_alive);
  CHECK(c.slots_used <= std::min(tc.window + tc.Bq - 1, tc.Lk));
  CHECK(c.slots_used <= S);
  if (!tc.causal) CHECK(c.slots_used <= std::min(tc.window, tc.Lk));
  return c;
}

std::vector<int64_t> evict_of(const std::vector<double>& delta, int64_t Lk, int64_t window) {
  const Shape s = make_shape(1, 1, 1, 1, 1, Lk, 1);
  return evict_positions(s, window, delta);
}

}  // namespace

TEST_SUITE("cpu") {
  TEST_CASE("candidate tables on random delta: lists, fully kept keys, slots, runs") {
    std::mt19937_64 rng(test_seed() + 300);
    auto pick = [&](int64_t lo, int64_t hi) {
      return std::uniform_int_distribution<int64_t>(lo, hi)(rng);
    };
    int checked = 0;
    for (int n = 0; n < 300; ++n) {
      TableCase tc;
      tc.causal = n % 4 != 3;
      tc.Lk = pick(1, 160);
      tc.Lq = tc.causal ? pick(1, tc.Lk) : pick(1, 160);  // Lq < Lk, = Lk, non-causal Lq > Lk
      const int64_t windows[] = {1, 2, pick(1, 8), pick(1, tc.Lk), tc.Lk / 4 + 1, tc.Lk, tc.Lk + 5};
      tc.window = windows[n % 7];
      const int64_t tiles[] = {1, 3, 8, 16, pick(1, 70), 64};
      tc.Bq = tiles[(n / 7) % 6];
      // Random delta, with heavy ties now and then (few distinct values).
      const bool ties = n % 5 == 0;
      std::vector<double> delta = randn<double>(rng, tc.Lk);
      if (ties)
        for (double& d : delta) d = std::round(d);
      check_table(evict_of(delta, tc.Lk, tc.window), tc);
      ++checked;
    }
    CHECK(checked == 300);
  }

  TEST_CASE("candidate tables at their bound: delta rising with position keeps the w most recent") {
    // delta_j = j: every query keeps its w most recent keys, e_j = j + w - 1, so the candidates of
    // a tile are [p_first - w + 1, p_last]: w + Bq - 1 keys, one short of the stride w + Bq.
    for (const auto& [L, w, Bq] : {std::tuple<int64_t, int64_t, int64_t>{256, 32, 16},
                                   {200, 17, 8}, {300, 64, 64}, {97, 5, 1}, {128, 1, 32}}) {
      std::vector<double> delta(static_cast<size_t>(L));
      for (int64_t j = 0; j < L; ++j) delta[j] = static_cast<double>(j);
      const std::vector<int64_t> evict = evict_of(delta, L, w);
      for (int64_t j = 0; j < L; ++j) CHECK(evict[j] == std::min(j + w - 1, L - 1));
      const CandidateTable c = check_table(evict, {L, L, w, Bq, true});
      CHECK(c.slots_used == std::min(w + Bq - 1, L));
      for (int64_t t = 0; t < c.tiles; ++t) {
        const int64_t p_first = t * Bq, p_last = std::min(L, p_first + Bq) - 1;
        CHECK(c.n_alive[t] == p_last - std::max<int64_t>(0, p_first - w + 1) + 1);
        // fully kept: j <= p_first and j + w - 1 >= p_last
        CHECK(c.n_full[t] == std::max<int64_t>(0, p_first - std::max<int64_t>(0, p_last - w + 1) + 1));
      }
    }
  }

  TEST_CASE("candidate tables: all delta equal (a = 0) is the sliding window, also in float") {
    for (const auto& [Lq, Lk, w, Bq] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{64, 64, 8, 8},
                                        {50, 90, 13, 16}, {33, 33, 1, 4}, {70, 70, 200, 16}}) {
      const Shape s = make_shape(1, 1, 1, 1, Lq, Lk, 1);
      const std::vector<float> delta(static_cast<size_t>(Lk), 1.0f);  // exp(0 * softplus(z))
      const std::vector<int64_t> evict = evict_positions(s, w, delta);
      for (int64_t j = 0; j < Lk; ++j) CHECK(evict[j] == std::min(j + w - 1, Lk - 1));
      const CandidateTable c = check_table(evict, {Lq, Lk, w, Bq, true});
      for (int64_t t = 0; t < c.tiles; ++t) {
        const int64_t p_first = t * Bq + Lk - Lq, p_last = std::min(Lq, (t + 1) * Bq) - 1 + Lk - Lq;
        std::vector<int64_t> listed(c.list.begin() + t * c.stride,
                                    c.list.begin() + t * c.stride + c.n_alive[t]);
        std::sort(listed.begin(), listed.end());
        std::vector<int64_t> window;
        for (int64_t j = std::max<int64_t>(0, p_first - w + 1); j <= p_last; ++j) window.push_back(j);
        CHECK(listed == window);
      }
    }
  }

  TEST_CASE("candidate tables in the dense limit w >= Lk: every key in the slot of its index") {
    std::mt19937_64 rng(test_seed() + 301);
    for (const auto& [Lq, Lk, Bq] : {std::tuple<int64_t, int64_t, int64_t>{40, 40, 8},
                                     {21, 60, 16}, {17, 17, 64}, {45, 45, 7}}) {
      const std::vector<int64_t> evict = evict_of(randn<double>(rng, Lk), Lk, Lk);
      const CandidateTable c = check_table(evict, {Lq, Lk, Lk, Bq, true});
      CHECK(c.stride == Lk);
      CHECK(c.slots_used == Lk);
      for (int64_t t = 0; t < c.tiles; ++t) {
        const int64_t p_first = t * Bq + Lk - Lq, p_last = std::min(Lq, (t + 1) * Bq) - 1 + Lk - Lq;
        for (int64_t sl = 0; sl < Lk; ++sl) CHECK(c.key(t, sl) == (sl <= p_last ? sl : -1));
        CHECK(c.n_alive[t] == p_last + 1);
        CHECK(c.n_full[t] == p_first + 1);
      }
    }
  }

  TEST_CASE("candidate tables, non-causal: one set, the global top w, fully kept in every tile") {
    std::mt19937_64 rng(test_seed() + 302);
    for (const auto& [Lq, Lk, w, Bq] : {std::tuple<int64_t, int64_t, int64_t, int64_t>{50, 30, 7, 8},
                                        {10, 80, 20, 3}, {64, 64, 64, 16}, {9, 9, 1, 2}}) {
      const std::vector<int64_t> evict = evict_of(randn<double>(rng, Lk), Lk, w);
      const CandidateTable c = check_table(evict, {Lq, Lk, w, Bq, false});
      CHECK(c.slots_used == std::min(w, Lk));
      for (int64_t t = 0; t < c.tiles; ++t) {
        CHECK(c.n_alive[t] == std::min(w, Lk));
        CHECK(c.n_full[t] == c.n_alive[t]);
        for (int64_t sl = 0; sl < c.stride; ++sl) CHECK(c.key(t, sl) == c.key(0, sl));
      }
    }
  }

  TEST_CASE("candidate tables: Lq not a multiple of Bq, Bq > Lq, Bq = 1, w = 1") {
    std::mt19937_64 rng(test_seed() + 303);
    for (const TableCase& tc : {TableCase{37, 37, 5, 8, true}, TableCase{5, 40, 9, 64, true},
                                TableCase{30, 30, 4, 1, true}, TableCase{61, 61, 1, 16, true},
                                TableCase{61, 100, 1, 1, true}, TableCase{1, 50, 6, 4, true}}) {
      const CandidateTable c = check_table(evict_of(randn<double>(rng, tc.Lk), tc.Lk, tc.window), tc);
      if (tc.window == 1) CHECK(c.slots_used <= tc.Bq);  // each query keeps one key
      if (tc.Bq == 1) CHECK(c.slots_used <= tc.window);  // one query: its w keys
    }
  }
}
