// Central finite differences in float64 of the whole pipeline (delta -> mask -> attention), on
// every parameter: q, k, v, w_dt, a. The loss is L = sum(o * do), so dL/do = do.
// The top-w selection is piecewise constant and has no derivative, so each perturbation must
// leave the selection unchanged; the test checks that instead of assuming it.
#include <doctest/doctest.h>

#include <algorithm>

#include "dma/mask.hpp"
#include "test_util.hpp"

using namespace dma;
using namespace dma_test;

namespace {

double loss(const Problem<double>& p, std::vector<int64_t>* evict = nullptr) {
  Problem<double> fwd_only = p;
  fwd_only.dout.clear();
  const Result<double> r = run_pipeline(fwd_only, Backend::cpu);
  if (evict) *evict = r.evict;
  double l = 0;
  for (size_t n = 0; n < r.fwd.o.size(); ++n) l += r.fwd.o[n] * p.dout[n];
  return l;
}

// Relative error of the analytic gradient of one parameter against central differences of
// fourth order, (-L(x+2h) + 8 L(x+h) - 8 L(x-h) + L(x-2h)) / 12h: with h = 1e-4 the truncation
// error (~h^4) and the rounding error (~1e-16 |L| / h) both stay far below 1e-6 of the gradient.
double check_param(Problem<double> p, std::vector<double> Problem<double>::*param,
                   const std::vector<double>& analytic, const std::vector<int64_t>& evict0) {
  const double h = 1e-4;
  std::vector<double> numeric(analytic.size());
  for (size_t n = 0; n < analytic.size(); ++n) {
    const double x = (p.*param)[n];
    double l[4];
    const double steps[4] = {2 * h, h, -h, -2 * h};
    for (int s = 0; s < 4; ++s) {
      std::vector<int64_t> evict;
      (p.*param)[n] = x + steps[s];
      l[s] = loss(p, &evict);
      REQUIRE_MESSAGE(evict == evict0, "a perturbation changed the selection; pick inputs without near-ties");
    }
    (p.*param)[n] = x;
    numeric[n] = (-l[0] + 8 * l[1] - 8 * l[2] + l[3]) / (12 * h);
  }
  // A floor of 1e-3 (gradients here are of order 1): when one key dominates every row, p is
  // one-hot and a gradient can be ~1e-23, where only the differences' rounding (~1e-12) is left.
  return max_rel_error(analytic, numeric, 1e-3);
}

struct Case {
  std::string name;
  Shape s;
  Options opt;
};

}  // namespace

TEST_SUITE("gradcheck") {
  TEST_CASE("finite differences of the whole pipeline on every parameter in both forms") {
    const Case cases[] = {
        {"exp, GQA", make_shape(1, 4, 2, 2, 6, 6, 4), make_options(3, true, Form::exp)},
        {"linear, GQA", make_shape(1, 4, 2, 2, 6, 6, 4), make_options(3, true, Form::linear)},
        {"exp, Hd = Hq, Lq < Lk", make_shape(2, 2, 1, 2, 4, 9, 3), make_options(4, true, Form::exp)},
        {"linear, non-causal", make_shape(1, 2, 2, 2, 5, 8, 4), make_options(3, false, Form::linear)},
        {"exp, w >= Lk", make_shape(1, 2, 1, 1, 5, 5, 4), make_options(8, true, Form::exp)},
    };
    uint64_t seed = test_seed();
    for (const Case& c : cases) {
      CAPTURE(c.name);
      // Draw inputs until the selection has no near-tie (almost always the first draw).
      Problem<double> p;
      std::vector<int64_t> evict0;
      for (int attempt = 0;; ++attempt) {
        p = random_problem<double>(c.s, c.opt, seed++);
        const Result<double> r = run_pipeline(p, Backend::cpu);
        double gap = INFINITY;  // the smallest distance between two deltas of one head
        for (int64_t bh = 0; bh < c.s.B * c.s.Hd; ++bh)
          for (int64_t i = 0; i < c.s.Lk; ++i)
            for (int64_t j = i + 1; j < c.s.Lk; ++j)
              gap = std::min(gap, std::abs(r.delta[bh * c.s.Lk + i] - r.delta[bh * c.s.Lk + j]));
        evict0 = r.evict;
        if (gap > 1e-2 || attempt == 50) break;
      }
      const Result<double> r = run_pipeline(p, Backend::cpu);
      CHECK(check_param(p, &Problem<double>::q, r.grads.dq, evict0) <= 1e-6);
      CHECK(check_param(p, &Problem<double>::k, r.grads.dk, evict0) <= 1e-6);
      CHECK(check_param(p, &Problem<double>::v, r.grads.dv, evict0) <= 1e-6);
      CHECK(check_param(p, &Problem<double>::w_dt, r.dw_dt, evict0) <= 1e-6);
      CHECK(check_param(p, &Problem<double>::a, r.da, evict0) <= 1e-6);
    }
  }

  TEST_CASE("finite differences of ddelta in the given-delta mode") {
    const Shape s = make_shape(1, 2, 1, 1, 5, 7, 4);
    Problem<double> p = random_problem<double>(s, make_options(3), test_seed() + 11);
    std::mt19937_64 rng(test_seed() + 12);
    // delta values spaced at least 0.05 apart (a shuffled ladder), so no +-2h step reorders them
    p.delta.resize(s.delta_numel());
    for (int64_t j = 0; j < s.Lk; ++j) p.delta[j] = 0.05 * j + 0.01 * std::generate_canonical<double, 53>(rng);
    std::shuffle(p.delta.begin(), p.delta.end(), rng);
    const Result<double> r = run_pipeline(p, Backend::cpu);
    CHECK(r.dw_dt.empty());
    CHECK(check_param(p, &Problem<double>::delta, r.grads.ddelta, r.evict) <= 1e-6);
    CHECK(check_param(p, &Problem<double>::v, r.grads.dv, r.evict) <= 1e-6);
  }
}
