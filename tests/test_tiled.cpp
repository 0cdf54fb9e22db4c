// The tiled CPU implementation against the reference, and what its counters say.
#include <doctest/doctest.h>

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
  CHECK(rel(got.grads.dv, ref.grads.dv) <= tol);
  // ddelta sums ds over queries and heads, and dw_dt, da sum ddelta over keys and the batch: the
  // signed terms cancel to well below their own size, so reordering the sums moves the result by
  // the rounding of the terms (~1e-16 of them), which is up to ~1e-11 of the result here.
  CHECK(rel(got.grads.ddelta, ref.grads.ddelta) <= 100 * tol);
  CHECK(rel(got.dw_dt, ref.dw_dt) <= 1000 * tol);
  CHECK(rel(got.da, ref.da) <= 1000 * tol);
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
      CHECK(skip.fwd.o == dense.fwd.o);
      CHECK(skip.fwd.lse == dense.fwd.lse);
      CHECK(skip.grads.dq == dense.grads.dq);
      CHECK(skip.grads.dk == dense.grads.dk);
      CHECK(skip.grads.dv == dense.grads.dv);
      CHECK(skip.grads.ddelta == dense.grads.ddelta);
      // The counters: every mode sees the same kept pairs; gather never exceeds w + Bq keys.
      CHECK(skip.fwd_counters.pairs_kept == dense.fwd_counters.pairs_kept);
      CHECK(gather.fwd_counters.pairs_kept == dense.fwd_counters.pairs_kept);
      CHECK(gather.fwd_counters.max_candidates <= c.opt.window + c.Bq);
      CHECK(skip.fwd_counters.tiles_visited + skip.fwd_counters.tiles_skipped ==
            dense.fwd_counters.tiles_dense);
      CHECK(gather.bwd_counters.pairs_computed == gather.fwd_counters.pairs_computed);
    }
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
