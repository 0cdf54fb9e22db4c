// Helpers shared by the test suites (docs/design.md §5): the seed of the run, small random
// vectors, shapes and options.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "dma/numerics.hpp"
#include "dma/pipeline.hpp"

namespace dma_test {

// A fresh seed per run unless DMA_TEST_SEED is set, so every run draws new inputs.
uint64_t test_seed();

template <typename T>
std::vector<T> randn(std::mt19937_64& rng, int64_t n, double stddev = 1.0) {
  std::normal_distribution<double> dist(0.0, stddev);
  std::vector<T> x(static_cast<size_t>(n));
  for (auto& e : x) e = static_cast<T>(dist(rng));
  return x;
}

// Random problems and error measures are core's (dma/numerics.hpp), shared with the GPU tests,
// the inspector and the benchmarks.
using dma::max_rel_error;
using dma::random_problem;

inline dma::Shape make_shape(int64_t B, int64_t Hq, int64_t Hkv, int64_t Hd, int64_t Lq,
                             int64_t Lk, int64_t D) {
  dma::Shape s;
  s.B = B; s.Hq = Hq; s.Hkv = Hkv; s.Hd = Hd; s.Lq = Lq; s.Lk = Lk; s.D = D;
  return s;
}

inline dma::Options make_options(int64_t window, bool causal = true, dma::Form form = dma::Form::exp) {
  dma::Options o;
  o.window = window;
  o.causal = causal;
  o.form = form;
  return o;
}

// The same problem in float32 (values rounded).
inline dma::Problem<float> to_float(const dma::Problem<double>& p) {
  auto f = [](const std::vector<double>& x) { return std::vector<float>(x.begin(), x.end()); };
  dma::Problem<float> out;
  out.shape = p.shape;
  out.opt = p.opt;
  out.q = f(p.q); out.k = f(p.k); out.v = f(p.v);
  out.w_dt = f(p.w_dt); out.a = f(p.a); out.delta = f(p.delta); out.dout = f(p.dout);
  return out;
}

}  // namespace dma_test
