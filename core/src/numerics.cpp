// Rounding to bf16/fp16 and random problems (dma/numerics.hpp).
#include "dma/numerics.hpp"

#include <cstring>
#include <random>

namespace dma {

namespace {
uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}
float bits_float(uint32_t u) {
  float x;
  std::memcpy(&x, &u, 4);
  return x;
}
}  // namespace

uint16_t to_bf16_bits(float x) {
  uint32_t u = float_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even on the 16 dropped bits
  return static_cast<uint16_t>(u >> 16);
}

float from_bf16_bits(uint16_t h) { return bits_float(static_cast<uint32_t>(h) << 16); }

uint16_t to_fp16_bits(float x) {
  const uint32_t u = float_bits(x);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t mag = u & 0x7fffffffu;
  if (mag > 0x7f800000u) return sign | 0x7e00u;       // NaN
  if (mag >= 0x477ff000u) return sign | 0x7c00u;      // rounds to 65520 or more: inf
  if (mag < 0x38800000u) {                            // below 2^-14: a subnormal half
    // The half's unit there is 2^-24; scaling by 2^24 is exact, nearbyint rounds to even.
    const float units = std::nearbyint(std::abs(x) * 16777216.0f);
    return sign | static_cast<uint16_t>(units);       // 1024 units is the smallest normal: right
  }
  const uint32_t exp = (mag >> 23) - 127 + 15, mant = mag & 0x7fffffu;
  uint32_t h = (exp << 10) | (mant >> 13);
  const uint32_t rest = mant & 0x1fffu;
  if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) ++h;  // a carry moves into the exponent
  return sign | static_cast<uint16_t>(h);
}

float from_fp16_bits(uint16_t h) {
  const float sign = (h & 0x8000u) ? -1.0f : 1.0f;
  const int exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
  if (exp == 0) return sign * std::ldexp(static_cast<float>(mant), -24);
  if (exp == 31) return mant ? NAN : sign * INFINITY;
  return sign * std::ldexp(static_cast<float>(mant + 1024), exp - 25);
}

std::vector<float> round_to_precision(const std::vector<float>& x, Precision precision) {
  std::vector<float> out(x.size());
  for (size_t n = 0; n < x.size(); ++n)
    out[n] = precision == Precision::fp16 ? round_to_fp16(x[n]) : round_to_bf16(x[n]);
  return out;
}

const char* precision_name(Precision p) { return p == Precision::fp16 ? "fp16" : "bf16"; }

template <typename T>
Problem<T> random_problem(const Shape& s, const Options& opt, uint64_t seed, bool with_do) {
  std::mt19937_64 rng(seed);
  auto randn = [&](int64_t n, double sd) {
    std::normal_distribution<double> dist(0.0, sd);
    std::vector<T> x(static_cast<size_t>(n));
    for (auto& e : x) e = static_cast<T>(dist(rng));
    return x;
  };
  Problem<T> p;
  p.shape = s;
  p.opt = opt;
  p.q = randn(s.q_numel(), 1.0);
  p.k = randn(s.kv_numel(), 1.0);
  p.v = randn(s.kv_numel(), 1.0);
  p.w_dt = randn(s.w_dt_numel(), 1.0 / std::sqrt(double(s.Hkv * s.D)));
  std::uniform_real_distribution<double> a_dist(0.5, 1.5);
  p.a.resize(static_cast<size_t>(s.Hd));
  for (auto& e : p.a) e = static_cast<T>(a_dist(rng));
  if (with_do) p.dout = randn(s.q_numel(), 1.0);
  return p;
}

template Problem<float> random_problem(const Shape&, const Options&, uint64_t, bool);
template Problem<double> random_problem(const Shape&, const Options&, uint64_t, bool);

}  // namespace dma
