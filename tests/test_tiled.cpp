// The tiled CPU implementation against the reference, and what its counters say.
#include <doctest/doctest.h>

#include <set>

#include "dma/candidates.hpp"
#include "dma/mask.hpp"
#include "dma/tiled.hpp"
#include "test_util.hpp"

using namespace dma;
using namespace dma_test;

namespace {

Result<double> tiled(const Problem<double>& p, TileMode mode, int64_t Bq, int64_t Bk) {
  TileConfig tc;
  tc.Bq = Bq;
  tc.Bk = Bk;
  tc.mode = mode;
  return run_pipeline(p, Backend::tiled, tc, false);
}

// Gradients that are zero in exact arithmetic (w = 1: p = 1, so ds = 0) are compared against an
// absolute floor of 1 (the order of the gradients here) instead of their own rounding noise
// (docs/design.md §5).
void check_close(const Result<double>& got, const Result<double>& ref, double tol) {
  auto rel = [](const std::vector<double>& a, const std::vector<double>& b) { return max_rel_error(a, b, 1.0); };
  CHECK(got.evict == ref.evict);
  CHECK(rel(got.fwd.o, ref.fwd.o) <= tol);
  CHECK(rel(got.fwd.lse, ref.fwd.lse) <= tol);
  CHECK(rel(got.grads.dq, ref.grads.dq) <= tol);
  CHECK(rel(got.grads.dk, ref.grads.dk) <= tol);
  // ddelta sums ds over queries and heads, and dw_dt, da sum ddelta over keys and the batch: the
  // signed terms cancel to well below their own size, so reordering the sums moves the result by
  // the rounding of the terms (~1e-16 of them), which is up to ~1e-11 of the result here. dv
  // carries the same error through its part dz . w_dt (dz is made from ddelta; seen: 3.4e-12).
  CHECK(rel(got.grads.dv, ref.grads.dv) <= 100 * tol);
  CHECK(rel(got.grads.ddelta, ref.grads.ddelta) <= 100 * tol);
  CHECK(rel(got.dw_dt, ref.dw_dt) <= 1000 * tol);
  CHECK(rel(got.da, ref.da) <= 1000 * tol);
}

// The (query head, query, key) pairs the reference keeps: its explicit mask, per query head.
int64_t ref_pairs_kept(const Result<double>& ref, const Shape& s) {
  int64_t kept = 0;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t hq = 0; hq < s.Hq; ++hq)
      for (int64_t i = 0; i < s.Lq; ++i)
        for (int64_t j = 0; j < s.Lk; ++j)
          kept += ref.mask[((b * s.Hd + s.delta_head(hq)) * s.Lq + i) * s.Lk + j];
  return kept;
}

// Every output of two runs, bit for bit.
template <typename T>
void check_same_bits(const Result<T>& x, const Result<T>& y) {
  CHECK(x.fwd.o == y.fwd.o);
  CHECK(x.fwd.lse == y.fwd.lse);
  CHECK(x.grads.dq == y.grads.dq);
  CHECK(x.grads.dk == y.grads.dk);
  CHECK(x.grads.dv == y.grads.dv);
  CHECK(x.grads.ddelta == y.grads.ddelta);
  CHECK(x.dw_dt == y.dw_dt);
  CHECK(x.da == y.da);
}

}  // namespace

TEST_SUITE("cpu") {
  TEST_CASE("tiled dense and skip and gather equal the dense-masked reference in float64") {
    struct Case { Shape s; Options opt; int64_t Bq, Bk; };
    const Case cases[] = {
        {make_shape(1, 4, 2, 2, 37, 37, 8), make_options(5), 8, 8},
        {make_shape(2, 2, 1, 2, 19, 50, 5), make_options(7), 4, 16},          // Lq < Lk, Hd = Hq
        {make_shape(1, 2, 2, 2, 30, 30, 4), make_options(1), 16, 8},          // w = 1
        {make_shape(1, 2, 1, 1, 21, 21, 4), make_options(64), 8, 8},          // w >= Lk
        {make_shape(1, 2, 2, 2, 17, 33, 6), make_options(6, false), 8, 8},    // non-causal
        {make_shape(1, 1, 1, 1, 40, 40, 4), make_options(6, true, Form::linear), 7, 9},
        {make_shape(1, 2, 1, 1, 25, 10, 4), make_options(4, false), 8, 4},   // non-causal, Lq > Lk
    };
    uint64_t seed = test_seed();
    for (const Case& c : cases) {
      CAPTURE(c.opt.window);
      CAPTURE(c.s.Lk);
      const Problem<double> p = random_problem<double>(c.s, c.opt, seed++);
      const Result<double> ref = run_pipeline(p, Backend::cpu);
      const Result<double> dense = tiled(p, TileMode::dense, c.Bq, c.Bk);
      const Result<double> skip = tiled(p, TileMode::skip, c.Bq, c.Bk);
      const Result<double> gather = tiled(p, TileMode::gather, c.Bq, c.Bk);
      check_close(dense, ref, 1e-12);
      check_close(gather, ref, 1e-12);
      // Skipping leaves out tiles whose every p is exactly 0, with the order of summation of the
      // remaining tiles unchanged: the result is bitwise that of the dense tiled run.
      check_same_bits(skip, dense);
      // The counters: every mode sees the same kept pairs; gather never exceeds w + Bq keys.
      CHECK(skip.fwd_counters.pairs_kept == dense.fwd_counters.pairs_kept);
      CHECK(gather.fwd_counters.pairs_kept == dense.fwd_counters.pairs_kept);
      CHECK(gather.fwd_counters.max_candidates <= c.opt.window + c.Bq);
      CHECK(skip.fwd_counters.tiles_visited + skip.fwd_counters.tiles_skipped ==
            dense.fwd_counters.tiles_dense);
      CHECK(gather.bwd_counters.pairs_computed == gather.fwd_counters.pairs_computed);
    }
  }

  TEST_CASE("the gather forward over the lists and the slot backward equal the reference") {
    // GQA with Hd = Hkv (the query heads of a kv head share one table) and Hd = Hq > Hkv (each
    // query head its own, dk and dv summed afterwards), batches, ties, odd tiles.
    struct Case { Shape s; Options opt; int64_t Bq, Bk; bool ties; };
    const Case cases[] = {
        {make_shape(2, 4, 2, 2, 45, 45, 8), make_options(9), 8, 8, false},    // Hd = Hkv, GQA
        {make_shape(1, 6, 2, 6, 38, 38, 4), make_options(7), 16, 4, false},   // Hd = Hq > Hkv
        {make_shape(2, 4, 1, 4, 23, 61, 5), make_options(11), 8, 16, false},  // Lq < Lk, Hd = Hq
        {make_shape(1, 4, 4, 4, 50, 50, 4), make_options(6), 7, 5, false},    // Hq = Hkv = Hd
        {make_shape(1, 2, 1, 1, 40, 40, 4), make_options(10), 8, 8, true},    // all delta equal
        {make_shape(1, 4, 2, 4, 33, 33, 4), make_options(5), 1, 1, false},    // Bq = Bk = 1
        {make_shape(1, 2, 2, 2, 30, 30, 4), make_options(1), 16, 8, false},   // w = 1
        {make_shape(1, 2, 1, 2, 26, 26, 4), make_options(100), 8, 64, false}, // w >= Lk, Bk > slots
        {make_shape(1, 4, 2, 2, 29, 47, 6), make_options(8, false), 8, 8, false},  // non-causal
        {make_shape(1, 2, 1, 2, 60, 20, 4), make_options(4, false), 16, 3, false}, // non-causal, Lq > Lk
        {make_shape(1, 2, 2, 2, 70, 70, 4), make_options(12, true, Form::linear), 64, 16, false},
    };
    uint64_t seed = test_seed() + 40;
    for (const Case& c : cases) {
      CAPTURE(c.s.Hq);
      CAPTURE(c.s.Hkv);
      CAPTURE(c.s.Hd);
      CAPTURE(c.s.Lq);
      CAPTURE(c.s.Lk);
      CAPTURE(c.opt.window);
      CAPTURE(c.Bq);
      CAPTURE(c.Bk);
      Problem<double> p = random_problem<double>(c.s, c.opt, seed++);
      if (c.ties) std::fill(p.a.begin(), p.a.end(), 0.0);  // delta = 1 everywhere: sliding window
      const Result<double> ref = run_pipeline(p, Backend::cpu);
      const Result<double> gather = tiled(p, TileMode::gather, c.Bq, c.Bk);
      check_close(gather, ref, 1e-12);
      // Keys no query keeps get exact zeros (docs/design.md §2.1): the sweep never touches them.
      const Shape& s = c.s;
      for (int64_t b = 0; b < s.B; ++b)
        for (int64_t hq = 0; hq < s.Hq; ++hq)
          for (int64_t j = 0; j < s.Lk; ++j) {
            bool kept = false;  // by some query of a query head of hq's kv head
            for (int64_t h2 = 0; h2 < s.Hq; ++h2)
              for (int64_t i = 0; i < s.Lq && s.kv_head(h2) == s.kv_head(hq); ++i)
                kept = kept || ref.mask[((b * s.Hd + s.delta_head(h2)) * s.Lq + i) * s.Lk + j];
            if (kept) continue;
            CHECK(gather.grads.ddelta[(b * s.Hd + s.delta_head(hq)) * s.Lk + j] == 0.0);
            for (int64_t d = 0; d < s.D; ++d)
              CHECK(gather.grads.dk[((b * s.Hkv + s.kv_head(hq)) * s.Lk + j) * s.D + d] == 0.0);
          }

      // The counters against the tables themselves.
      const TileCounters& f = gather.fwd_counters;
      const TileCounters& g = gather.bwd_counters;
      int64_t alive_keys = 0, blocks = 0, full = 0, listed = 0, slots = 0;
      for (int64_t bd = 0; bd < s.B * s.Hd; ++bd) {
        const CandidateTable t = candidate_table(&gather.evict[bd * s.Lk], s.Lq, s.Lk,
                                                 c.opt.causal, c.opt.window, c.Bq);
        std::set<int32_t> keys(t.slot_key.begin(), t.slot_key.end());
        keys.erase(-1);
        alive_keys += static_cast<int64_t>(keys.size());
        blocks += (s.Hq / s.Hd) * t.tiles * ((t.slots_used + c.Bk - 1) / c.Bk);
        for (int64_t q = 0; q < t.tiles; ++q) {
          full += (s.Hq / s.Hd) * t.n_full[q];
          listed += (s.Hq / s.Hd) * t.n_alive[q];
        }
        slots = std::max(slots, t.slots_used);
      }
      CHECK(g.key_writes == alive_keys);  // each key written once (the sweep throws on a second)
      CHECK(g.slot_blocks_visited + g.slot_blocks_skipped == blocks);
      CHECK(f.keys_gathered == listed);
      CHECK(f.keys_full == full);
      CHECK(f.slots_used == slots);
      CHECK(f.slots_used <= std::min(c.opt.window + c.Bq - 1, s.Lk));
      CHECK(f.chunks_masked + f.chunks_unmasked == f.tiles_visited);
      CHECK(f.pairs_kept == ref_pairs_kept(ref, s));
      CHECK(g.pairs_computed == f.pairs_computed);  // the dQ pass walks the forward's chunks
      CHECK(g.pairs_kept == f.pairs_kept);
      CHECK(g.chunks_unmasked == f.chunks_unmasked);
      CHECK(g.pairs_swept >= f.pairs_kept);
      CHECK(f.pairs_swept == 0);
      CHECK(f.key_writes == 0);
    }
  }

  TEST_CASE("the slot sweep cut into spans of query tiles equals the reference, each sum carried once") {
    // The Hopper kernel's split (cuda/src/backward_sm90.cu): every span starts from empty
    // accumulators; a key living across a span's first tile is written by the span it arrived in
    // and its later spans' sums are added afterwards. Causal and not, Lq < Lk and Lq > Lk,
    // w >= Lk (every key lives to the end: carried across every boundary), w = 1, Hd = Hq.
    struct Case { Shape s; Options opt; int64_t Bq, Bk; };
    const Case cases[] = {
        {make_shape(2, 4, 2, 2, 45, 45, 8), make_options(9), 8, 8},
        {make_shape(1, 6, 2, 6, 38, 38, 4), make_options(7), 4, 4},
        {make_shape(2, 4, 1, 4, 23, 61, 5), make_options(11), 4, 16},
        {make_shape(1, 2, 1, 2, 26, 26, 4), make_options(100), 4, 64},
        {make_shape(1, 2, 2, 2, 30, 30, 4), make_options(1), 4, 8},
        {make_shape(1, 4, 2, 2, 29, 47, 6), make_options(8, false), 4, 8},
        {make_shape(1, 2, 1, 2, 60, 20, 4), make_options(4, false), 8, 3},
    };
    uint64_t seed = test_seed() + 60;
    int64_t carried_somewhere = 0;
    for (const Case& c : cases) {
      const Problem<double> p = random_problem<double>(c.s, c.opt, seed++);
      const Result<double> ref = run_pipeline(p, Backend::cpu);
      const Result<double> whole = tiled(p, TileMode::gather, c.Bq, c.Bk);
      for (int64_t span_tiles : {1, 2, 3, 5}) {
        CAPTURE(c.s.Lq);
        CAPTURE(c.s.Lk);
        CAPTURE(c.opt.window);
        CAPTURE(span_tiles);
        TileConfig tc;
        tc.Bq = c.Bq;
        tc.Bk = c.Bk;
        tc.span_tiles = span_tiles;
        const Result<double> spans = run_pipeline(p, Backend::tiled, tc, false);
        check_close(spans, ref, 1e-12);
        CHECK(spans.grads.dq == whole.grads.dq);  // the dQ pass does not use the spans
        // Each live key written once, and one carry per (key, span start) it lives across,
        // counted here from the tables alone.
        int64_t carries = 0;
        for (int64_t bd = 0; bd < c.s.B * c.s.Hd; ++bd) {
          const CandidateTable t = candidate_table(&spans.evict[bd * c.s.Lk], c.s.Lq, c.s.Lk,
                                                   c.opt.causal, c.opt.window, c.Bq);
          for (int64_t tb = span_tiles; tb < t.tiles; tb += span_tiles)
            for (int64_t sl = 0; sl < t.slots_used; ++sl) {
              const int32_t j = t.slot_key[tb * t.stride + sl];
              carries += j >= 0 && t.slot_key[(tb - 1) * t.stride + sl] == j;
            }
        }
        CHECK(spans.bwd_counters.key_writes == whole.bwd_counters.key_writes);
        CHECK(spans.bwd_counters.key_carries == carries);
        CHECK(spans.bwd_counters.pairs_swept == whole.bwd_counters.pairs_swept);
        carried_somewhere += carries;
      }
    }
    CHECK(carried_somewhere > 0);  // (the cases do carry sums)
  }

  TEST_CASE("a negative span length is refused") {
    const Problem<double> p = random_problem<double>(make_shape(1, 1, 1, 1, 8, 8, 4), make_options(2), 1);
    TileConfig tc;
    tc.span_tiles = -1;
    CHECK_THROWS_WITH_AS(run_pipeline(p, Backend::tiled, tc, false),
                         "tiles: span_tiles = -1 (0: one span, or >= 1)", Error);
  }

  TEST_CASE("the gather forward and the slot backward are deterministic: two runs, the same bits") {
    const Shape s = make_shape(2, 4, 2, 4, 77, 77, 8);
    const Problem<double> p = random_problem<double>(s, make_options(13), test_seed() + 50);
    for (int run = 0; run < 2; ++run) {  // float64, then float32
      TileConfig tc;
      tc.Bq = 16;
      tc.Bk = 8;
      if (run == 0) {
        check_same_bits(run_pipeline(p, Backend::tiled, tc, false),
                        run_pipeline(p, Backend::tiled, tc, false));
      } else {
        const Problem<float> pf = to_float(p);
        check_same_bits(run_pipeline(pf, Backend::tiled, tc, false),
                        run_pipeline(pf, Backend::tiled, tc, false));
      }
    }
  }

  TEST_CASE("the slot sweep's work on random delta stays near the kept pairs") {
    // docs/design.md §2.9: about 1.1-1.25x the kept pairs (the empty slots of partly filled slot
    // blocks), against several times that for a key-major sweep over consecutive key tiles.
    const Shape s = make_shape(1, 1, 1, 1, 4096, 4096, 4);
    const Problem<double> p = random_problem<double>(s, make_options(512), test_seed() + 60);
    const Result<double> r = tiled(p, TileMode::gather, 64, 64);
    const TileCounters& f = r.fwd_counters;
    const TileCounters& g = r.bwd_counters;
    MESSAGE("N = 4096, w = 512, Bq = Bk = 64: kept pairs " << f.pairs_kept << ", forward computes "
            << f.pairs_computed << " (" << f.work_fraction() << " of causal-dense), slot sweep "
            << g.pairs_swept << " = " << g.sweep_overhead() << "x kept; slots used " << f.slots_used
            << ", max candidates " << f.max_candidates << ", chunks without the element test "
            << f.chunks_unmasked << " of " << f.tiles_visited << ", slot blocks visited "
            << g.slot_blocks_visited << " (skipped " << g.slot_blocks_skipped << "), key writes "
            << g.key_writes);
    CHECK(g.sweep_overhead() > 1.0);
    CHECK(g.sweep_overhead() < 1.3);
    CHECK(f.max_candidates <= 512 + 64 - 1);
    CHECK(f.chunks_unmasked > 0);
    CHECK(g.key_writes <= s.Lk);
  }

  TEST_CASE("skipping alone does nothing on random delta while gathering follows the true density") {
    const Shape s = make_shape(1, 1, 1, 1, 1024, 1024, 8);
    Problem<double> p = random_problem<double>(s, make_options(64), test_seed() + 20, false);
    const Result<double> skip = tiled(p, TileMode::skip, 64, 64);
    const Result<double> gather = tiled(p, TileMode::gather, 64, 64);
    const TileCounters& cs = skip.fwd_counters;
    const TileCounters& cg = gather.fwd_counters;
    MESSAGE("skip visits " << cs.tiles_visited << " of " << cs.tiles_dense << " tiles; gather does "
                           << cg.work_fraction() << " of the dense work");
    CHECK(cs.tiles_skipped * 10 < cs.tiles_dense);  // fewer than 10% skipped
    CHECK(cg.work_fraction() < 0.3);                // w/N = 1/16 kept, plus the Bq arrivals
    // Structured delta (more recent keys weigh more: a sliding window) lets skipping pay.
    for (int64_t j = 0; j < s.Lk; ++j) p.delta.push_back(double(j) / s.Lk);
    const Result<double> local = tiled(p, TileMode::skip, 64, 64);
    CHECK(local.fwd_counters.tiles_skipped * 2 > local.fwd_counters.tiles_dense);
  }
}
