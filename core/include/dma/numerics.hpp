// Numerics shared by the tests, the inspector, the CUDA wrapper and the benchmarks
// (docs/design.md §5): how far one tensor is from another, rounding to the GPU's 16-bit element
// types, and random problems. One copy of each, so every part measures the same way.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "dma/pipeline.hpp"

namespace dma {

// ---- errors --------------------------------------------------------------------------------
// max|got - ref| / max(max|ref|, floor). The floor keeps tensors that are zero in exact
// arithmetic (dq when w = 1, say) from turning rounding noise into a huge relative error.
// Sizes that differ give +inf.
template <typename A, typename B>
double max_rel_error(const std::vector<A>& got, const std::vector<B>& ref, double floor = 1e-30) {
  if (got.size() != ref.size()) return INFINITY;
  double diff = 0, mag = floor;
  for (size_t n = 0; n < ref.size(); ++n) {
    const double d = std::abs(double(got[n]) - double(ref[n]));
    diff = std::isnan(d) ? INFINITY : std::max(diff, d);
    mag = std::max(mag, std::abs(double(ref[n])));
  }
  return diff / mag;
}

// ||got - ref|| / max(||ref||, floor * sqrt(n)): relative L2 with the same kind of floor.
template <typename A, typename B>
double rel_l2(const std::vector<A>& got, const std::vector<B>& ref, double floor = 1e-30) {
  if (got.size() != ref.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t n = 0; n < ref.size(); ++n) {
    const double d = double(got[n]) - double(ref[n]);
    num += d * d;
    den += double(ref[n]) * double(ref[n]);
  }
  const double r = std::sqrt(num) / std::max(std::sqrt(den), floor * std::sqrt(double(ref.size())));
  return std::isnan(r) ? INFINITY : r;
}

// The worst row of length `row`: max over rows of the relative L2 within the row, so one wrong
// tile cannot hide inside a tensor-wide norm.
template <typename A, typename B>
double worst_row_rel_l2(const std::vector<A>& got, const std::vector<B>& ref, int64_t row,
                        double floor = 1e-30) {
  if (got.size() != ref.size() || row <= 0) return INFINITY;
  double worst = 0;
  for (size_t r0 = 0; r0 < ref.size(); r0 += static_cast<size_t>(row)) {
    double num = 0, den = 0;
    for (size_t n = r0; n < std::min(ref.size(), r0 + static_cast<size_t>(row)); ++n) {
      const double d = double(got[n]) - double(ref[n]);
      num += d * d;
      den += double(ref[n]) * double(ref[n]);
    }
    const double r = std::sqrt(num) / std::max(std::sqrt(den), floor * std::sqrt(double(row)));
    worst = std::isnan(r) ? INFINITY : std::max(worst, r);
  }
  return worst;
}

// ---- 16-bit element types ------------------------------------------------------------------
// The GPU kernels read q, k, v and do as bf16 or fp16. These give the same bits the CUDA
// conversion intrinsics give (round to nearest, ties to even), without CUDA.
uint16_t to_bf16_bits(float x);
uint16_t to_fp16_bits(float x);  // beyond 65504 (after rounding): inf
float from_bf16_bits(uint16_t h);
float from_fp16_bits(uint16_t h);
inline float round_to_bf16(float x) { return from_bf16_bits(to_bf16_bits(x)); }
inline float round_to_fp16(float x) { return from_fp16_bits(to_fp16_bits(x)); }
// Each element rounded to `precision` and back: the values the GPU computes with.
std::vector<float> round_to_precision(const std::vector<float>& x, Precision precision);
const char* precision_name(Precision p);  // "bf16", "fp16"

// ---- random problems -----------------------------------------------------------------------
// q, k, v, do ~ N(0, 1), w_dt ~ N(0, 1/(Hkv*D)), a ~ U(0.5, 1.5): moderate delta, so the exp
// form neither overflows nor flattens. The same seed gives the same problem everywhere.
template <typename T>
Problem<T> random_problem(const Shape& s, const Options& opt, uint64_t seed, bool with_do = true);

}  // namespace dma
