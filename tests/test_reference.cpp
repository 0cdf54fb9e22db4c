// The scalar reference against independent formulations of the same attention.
#include <doctest/doctest.h>

#include <limits>

#include "dma/mask.hpp"
#include "dma/reference.hpp"
#include "test_util.hpp"

using namespace dma;
using namespace dma_test;

namespace {

// Plain softmax attention of one head where query i sees keys lo(i)..hi(i), written independently.
std::vector<double> windowed_attention(int64_t Lq, int64_t D, const double* q,
                                       const double* k, const double* v, double scale,
                                       int64_t window, int64_t shift) {
  std::vector<double> o(static_cast<size_t>(Lq * D), 0.0);
  for (int64_t i = 0; i < Lq; ++i) {
    const int64_t hi = i + shift, lo = std::max<int64_t>(0, hi - window + 1);
    std::vector<double> w;
    double mx = -std::numeric_limits<double>::infinity(), sum = 0;
    for (int64_t j = lo; j <= hi; ++j) {
      double dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += q[i * D + d] * k[j * D + d];
      w.push_back(scale * dot);
      mx = std::max(mx, w.back());
    }
    for (double& x : w) sum += (x = std::exp(x - mx));
    for (int64_t j = lo; j <= hi; ++j)
      for (int64_t d = 0; d < D; ++d) o[i * D + d] += w[j - lo] / sum * v[j * D + d];
  }
  return o;
}

}  // namespace

TEST_SUITE("cpu") {
  TEST_CASE("equal delta gives sliding-window attention and w >= Lk gives causal attention") {
    const Shape s = make_shape(1, 1, 1, 1, 13, 21, 8);
    for (int64_t w : {int64_t{4}, int64_t{100}}) {
      Problem<double> p = random_problem<double>(s, make_options(w), test_seed());
      const std::vector<double> delta(s.delta_numel(), 0.75);  // a constant bias cancels
      const auto fwd = reference_forward(s, p.opt, p.q, p.k, p.v, delta, explicit_mask(s, p.opt, delta));
      const auto want = windowed_attention(s.Lq, s.D, p.q.data(), p.k.data(), p.v.data(),
                                           1.0 / std::sqrt(double(s.D)), w, s.Lk - s.Lq);
      CHECK(max_rel_error(fwd.o, want) < 1e-13);
    }
  }

  TEST_CASE("GQA equals each query head on its own copy of its kv head") {
    const Shape s = make_shape(2, 4, 2, 2, 6, 9, 4);
    Problem<double> p = random_problem<double>(s, make_options(3), test_seed() + 3);
    std::mt19937_64 rng(test_seed());
    const std::vector<double> delta = randn<double>(rng, s.delta_numel());
    const auto mask = explicit_mask(s, p.opt, delta);
    const auto fwd = reference_forward(s, p.opt, p.q, p.k, p.v, delta, mask);
    const auto g = reference_backward(s, p.opt, p.q, p.k, p.v, delta, mask, fwd, p.dout);
    // Expand: Hkv = Hd = Hq with kv and delta heads repeated.
    Shape e = s;
    e.Hkv = e.Hd = s.Hq;
    std::vector<double> k(e.kv_numel()), v(e.kv_numel()), de(e.delta_numel());
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t h = 0; h < s.Hq; ++h) {
        for (int64_t n = 0; n < s.Lk * s.D; ++n) {
          k[(b * e.Hkv + h) * s.Lk * s.D + n] = p.k[(b * s.Hkv + s.kv_head(h)) * s.Lk * s.D + n];
          v[(b * e.Hkv + h) * s.Lk * s.D + n] = p.v[(b * s.Hkv + s.kv_head(h)) * s.Lk * s.D + n];
        }
        for (int64_t j = 0; j < s.Lk; ++j)
          de[(b * e.Hd + h) * s.Lk + j] = delta[(b * s.Hd + s.delta_head(h)) * s.Lk + j];
      }
    const auto emask = explicit_mask(e, p.opt, de);
    const auto efwd = reference_forward(e, p.opt, p.q, k, v, de, emask);
    const auto eg = reference_backward(e, p.opt, p.q, k, v, de, emask, efwd, p.dout);
    CHECK(max_rel_error(fwd.o, efwd.o) < 1e-14);
    CHECK(max_rel_error(g.dq, eg.dq) < 1e-14);
    // dk, dv and ddelta of a shared head are the sums over the query heads of its group
    std::vector<double> dk(s.kv_numel(), 0.0), dd(s.delta_numel(), 0.0);
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t h = 0; h < s.Hq; ++h) {
        for (int64_t n = 0; n < s.Lk * s.D; ++n)
          dk[(b * s.Hkv + s.kv_head(h)) * s.Lk * s.D + n] += eg.dk[(b * e.Hkv + h) * s.Lk * s.D + n];
        for (int64_t j = 0; j < s.Lk; ++j)
          dd[(b * s.Hd + s.delta_head(h)) * s.Lk + j] += eg.ddelta[(b * e.Hd + h) * s.Lk + j];
      }
    CHECK(max_rel_error(g.dk, dk) < 1e-13);
    CHECK(max_rel_error(g.ddelta, dd) < 1e-13);
  }

  TEST_CASE("masked positions get exactly zero gradient") {
    const Shape s = make_shape(1, 2, 1, 2, 24, 40, 8);
    Problem<double> p = random_problem<double>(s, make_options(5), test_seed() + 4);
    std::mt19937_64 rng(test_seed() + 5);
    const std::vector<double> delta = randn<double>(rng, s.delta_numel(), 2.0);
    const auto mask = explicit_mask(s, p.opt, delta);
    std::vector<double> probs, ds;
    const auto fwd = reference_forward(s, p.opt, p.q, p.k, p.v, delta, mask, &probs);
    const auto g = reference_backward(s, p.opt, p.q, p.k, p.v, delta, mask, fwd, p.dout, &ds);
    int64_t masked = 0, never_kept = 0;
    for (int64_t h = 0; h < s.Hq; ++h) {
      const int64_t hd = s.delta_head(h);
      for (int64_t i = 0; i < s.Lq; ++i)
        for (int64_t j = 0; j < s.Lk; ++j)
          if (!mask[(hd * s.Lq + i) * s.Lk + j]) {
            ++masked;
            CHECK(ds[(h * s.Lq + i) * s.Lk + j] == 0.0);
            CHECK(probs[(h * s.Lq + i) * s.Lk + j] == 0.0);
          }
    }
    // Keys kept by no query of any head sharing them: zero dk, dv and ddelta, exactly.
    for (int64_t j = 0; j < s.Lk; ++j) {
      bool kept = false;
      for (int64_t hd = 0; hd < s.Hd; ++hd)
        for (int64_t i = 0; i < s.Lq; ++i) kept |= mask[(hd * s.Lq + i) * s.Lk + j] != 0;
      if (kept) continue;
      ++never_kept;
      for (int64_t d = 0; d < s.D; ++d) {
        CHECK(g.dk[j * s.D + d] == 0.0);
        CHECK(g.dv[j * s.D + d] == 0.0);
      }
      for (int64_t hd = 0; hd < s.Hd; ++hd) CHECK(g.ddelta[hd * s.Lk + j] == 0.0);
    }
    CHECK(masked > 0);
    CHECK(never_kept > 0);  // with w = 5 of 40 keys and spread-out delta some keys never make it
  }

  TEST_CASE("float and double references agree") {
    const Shape s = make_shape(1, 2, 2, 2, 16, 16, 16);
    const Options opt = make_options(6);
    Problem<double> pd = random_problem<double>(s, opt, test_seed() + 6);
    const Problem<float> pf = to_float(pd);
    const auto rd = run_pipeline(pd, Backend::cpu);
    const auto rf = run_pipeline(pf, Backend::cpu);
    REQUIRE(rf.evict == rd.evict);  // no near-ties at these sizes
    CHECK(max_rel_error(rf.fwd.o, rd.fwd.o) < 1e-5);
    CHECK(max_rel_error(rf.grads.dq, rd.grads.dq) < 1e-4);
    CHECK(max_rel_error(rf.dw_dt, rd.dw_dt) < 1e-4);
  }
}
