// Helpers shared by the core test suites: random problems and error measures (DESIGN.md §5).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

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

// A random problem with moderate values (w_dt ~ 1/sqrt(Hkv*D), a in [0.5, 1.5]).
template <typename T>
dma::Problem<T> random_problem(const dma::Shape& s, const dma::Options& opt, uint64_t seed,
                               bool with_do = true) {
  std::mt19937_64 rng(seed);
  dma::Problem<T> p;
  p.shape = s;
  p.opt = opt;
  p.q = randn<T>(rng, s.q_numel());
  p.k = randn<T>(rng, s.kv_numel());
  p.v = randn<T>(rng, s.kv_numel());
  p.w_dt = randn<T>(rng, s.w_dt_numel(), 1.0 / std::sqrt(double(s.Hkv * s.D)));
  std::uniform_real_distribution<double> a_dist(0.5, 1.5);
  p.a.resize(static_cast<size_t>(s.Hd));
  for (auto& e : p.a) e = static_cast<T>(a_dist(rng));
  if (with_do) p.dout = randn<T>(rng, s.q_numel());
  return p;
}

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

// max|got - ref| / max(max|ref|, floor)
template <typename A, typename B>
double max_rel_error(const std::vector<A>& got, const std::vector<B>& ref, double floor = 1e-30) {
  double diff = 0, mag = floor;
  for (size_t n = 0; n < ref.size(); ++n) {
    diff = std::max(diff, std::abs(double(got[n]) - double(ref[n])));
    mag = std::max(mag, std::abs(double(ref[n])));
  }
  return got.size() == ref.size() ? diff / mag : INFINITY;
}

}  // namespace dma_test
