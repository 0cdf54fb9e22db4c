// The dynamic-weights phases of the device API (dma/cuda_device.hpp: dynamic_weights and
// dynamic_weights_backward) on their own, against core's float64 code (dma/dynamic_weights.hpp)
// on the same bf16/fp16-rounded v, and bitwise reproducible: two runs on the same inputs give the
// same bits of delta, dw_dt, da and dv whatever the workspace held before. Shapes cover Hd = Hkv
// and Hd = Hq, both forms, B = 2, odd Lk, kv widths Hkv*D that are not a multiple of the kernels'
// column slices, more than 32 delta heads, Hkv*D = 2048, and enough keys that a block of the
// backward reduces several chunks of keys.
//
// Tolerances: rounding-error bounds computed per element from the magnitudes of the terms
// (u = 2^-24; docs/design.md §5 judges sums against the magnitudes of their terms):
//  - z = vflat . w_dt: the products are exact (bf16 x fp32 inside an FMA); the GPU sums them in
//    chains of at most n_z = 8*ceil(Hkv*D/256) + 5 roundings (a lane's columns, then a 5-level
//    tree), so |err z| <= ez = n_z u sum|v w|.
//  - delta: d(log delta)/dz is a sigmoid(z) <= 1.5 (exp, a < 1.5) or sigmoid/softplus <= 1
//    (linear); softplus and a*softplus round to within 4u relative, which exp turns into
//    4u |a softplus| + 2u. Bound: |ref| (1.5 ez + (4 |a sp| + 8) u).
//  - dz = g delta a sigmoid(z) (exp) or g a sigmoid(z): d(log dz)/dz = a sigmoid + 1 - sigmoid
//    <= 2.5, plus delta's own rounding (exp) and ~14u for the products and the sigmoid:
//    rel(dz) = 2.5 ez + (4 |a sp| + 14) u (exp), 2.5 ez + 14u (linear). Every term t of dw_dt
//    (dz v), dv (dz w_dt) and da (g delta sp) carries that, and each sum adds at most n_sum
//    roundings (the kernels' longest chain is (keys per split)/4 + splits/8 + 10, about 90 on
//    the long case). Bound: sum |t| rel(dz) + n_sum u sum |t|, n_sum = 512. dv = dv0 + t adds
//    Hd roundings in t and one in the sum, counted as a full ulp: 2u (|dv0| + sum |t|).
//  Each is a worst case (every rounding the same way, at its largest): the error must stay within
//  it. A host emulation of the kernels stays below 0.05 of the bounds, except for dv, whose bound
//  its last rounding dominates when Hd is small (up to 0.5).
//  And as rounding errors of different keys are independent, the error of a sum of N terms grows
//  like sqrt(N) as the sum does: relative L2 <= 2e-5 for dw_dt and da (the emulation gives
//  ~3e-7). This catches a key left out (an error of ~1/sqrt(N) >= 7e-3 here), which the
//  per-element bound would miss on the long case.
#include <doctest/doctest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "dma/cuda_device.hpp"
#include "dma/dynamic_weights.hpp"
#include "dma/numerics.hpp"
#include "test_cuda_util.hpp"
#include "test_util.hpp"

namespace {

namespace dc = dma::cuda;
using dma::Form;
using dma::Precision;
using dma_test::DeviceMem;
using dma_test::as_elems;
using dma_test::bitwise_equal;
using dma_test::to_host;

bool all_finite(const std::vector<float>& x) {
  for (float e : x)
    if (!std::isfinite(e)) return false;
  return true;
}

struct DwCase {
  int64_t B, Hq, Hkv, Hd, Lk, D;
  Form form;
  Precision precision;
  int dv_offset;  // floats: 1 makes dv 4 but not 16-byte aligned (the one-column kernel)
};

struct DwOut {
  std::vector<float> delta, dw_dt, da, dv;
};

// The inputs on the device, as a model would own them.
struct DwBuffers {
  dc::Config c;
  DeviceMem v, w_dt, a, delta, status, workspace, ddelta, dw_dt, da, dv;
  int dv_offset;
  DwBuffers(const dc::Config& cfg, const std::vector<float>& v_r, const std::vector<float>& w_dt_h,
            const std::vector<float>& a_h, const std::vector<float>& g, int dv_off)
      : c(cfg), v(as_elems(v_r, cfg.precision)), w_dt(w_dt_h), a(a_h),
        delta(size_t(cfg.shape.delta_numel()) * 4), status(8), workspace(dc::workspace_bytes(cfg)),
        ddelta(g), dw_dt(w_dt_h.size() * 4), da(a_h.size() * 4),
        dv((size_t(cfg.shape.kv_numel()) + dv_off) * 4), dv_offset(dv_off) {}
  float* dv_ptr() const { return dv.as<float>() + dv_offset; }

  // Both phases, with dv starting at dv0 (the attention's part of the gradient). Outputs are
  // poisoned (NaN) first and the workspace filled with `ws_fill`: nothing may depend on it.
  DwOut run(const std::vector<float>& dv0, int ws_fill) {
    const dma::Shape& s = c.shape;
    for (DeviceMem* m : {&delta, &dw_dt, &da})
      REQUIRE(cudaMemset(m->ptr, 0xff, m->bytes) == cudaSuccess);
    if (workspace.bytes) REQUIRE(cudaMemset(workspace.ptr, ws_fill, workspace.bytes) == cudaSuccess);
    REQUIRE(cudaMemcpy(dv_ptr(), dv0.data(), dv0.size() * 4, cudaMemcpyHostToDevice) == cudaSuccess);
    dc::reset_status(status.as<int64_t>(), nullptr);
    dc::dynamic_weights(c, v.ptr, w_dt.as<float>(), a.as<float>(), delta.as<float>(),
                        status.as<int64_t>(), workspace.ptr, workspace.bytes, nullptr);
    dc::dynamic_weights_backward(c, v.ptr, w_dt.as<float>(), a.as<float>(), ddelta.as<float>(),
                                 dw_dt.as<float>(), da.as<float>(), dv_ptr(), workspace.ptr,
                                 workspace.bytes, nullptr);
    REQUIRE(cudaGetLastError() == cudaSuccess);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
    dc::check_status(c, status.as<int64_t>(), nullptr);  // throws on a non-finite delta
    DwOut o;
    o.delta = to_host<float>(delta.ptr, size_t(s.delta_numel()));
    o.dw_dt = to_host<float>(dw_dt.ptr, size_t(s.w_dt_numel()));
    o.da = to_host<float>(da.ptr, size_t(s.Hd));
    o.dv = to_host<float>(dv_ptr(), size_t(s.kv_numel()));
    return o;
  }
};

void check_case(const DwCase& tc, uint64_t seed) {
  dc::Config c;
  c.shape = dma_test::make_shape(tc.B, tc.Hq, tc.Hkv, tc.Hd, std::min<int64_t>(8, tc.Lk), tc.Lk, tc.D);
  c.opt = dma_test::make_options(16, true, tc.form);
  c.precision = tc.precision;
  const dma::Shape& s = c.shape;
  const int64_t HD = s.Hkv * s.D;
  INFO("B ", s.B, " Hq ", s.Hq, " Hkv ", s.Hkv, " Hd ", s.Hd, " Lk ", s.Lk, " D ", s.D, " form ",
       std::string(dma::form_name(tc.form)), " ", std::string(dma::precision_name(tc.precision)),
       " dv offset ", tc.dv_offset, " seed ", seed);

  dma::Problem<float> p = dma::random_problem<float>(s, c.opt, seed, false);
  const std::vector<float> v = dma::round_to_precision(p.v, tc.precision);
  std::mt19937_64 rng(seed + 17);
  const std::vector<float> g = dma_test::randn<float>(rng, s.delta_numel());
  const std::vector<float> dv0 = dma_test::randn<float>(rng, s.kv_numel());

  DwBuffers b(c, v, p.w_dt, p.a, g, tc.dv_offset);
  const DwOut r1 = b.run(dv0, 0xff);
  const DwOut r2 = b.run(dv0, 0x00);
  // Every element written (the poison is NaN) and bitwise the same twice.
  CHECK(all_finite(r1.delta));
  CHECK(all_finite(r1.dw_dt));
  CHECK(all_finite(r1.da));
  CHECK(all_finite(r1.dv));
  CHECK(bitwise_equal(r1.delta, r2.delta));
  CHECK(bitwise_equal(r1.dw_dt, r2.dw_dt));
  CHECK(bitwise_equal(r1.da, r2.da));
  CHECK(bitwise_equal(r1.dv, r2.dv));

  // core in float64 on the same rounded values
  const std::vector<double> v_d(v.begin(), v.end()), w_d(p.w_dt.begin(), p.w_dt.end());
  const std::vector<double> a_d(p.a.begin(), p.a.end()), g_d(g.begin(), g.end());
  const std::vector<double> delta_ref = dma::dynamic_weights<double>(s, tc.form, v_d, w_d, a_d);
  const dma::DynamicWeightGrads<double> ref =
      dma::dynamic_weights_backward<double>(s, tc.form, v_d, w_d, a_d, g_d);

  // The error bounds of every output (see the top of the file).
  constexpr double u = 1.0 / (1 << 24);
  constexpr double n_sum = 512;
  const double n_z = 8.0 * double((HD + 255) / 256) + 5;
  std::vector<double> mag_w(size_t(s.w_dt_numel()), 0.0), bnd_w(mag_w.size(), 0.0);
  std::vector<double> mag_a(size_t(s.Hd), 0.0), bnd_a(mag_a.size(), 0.0);
  std::vector<double> mag_v(dv0.size(), 0.0), bnd_v(dv0.size(), 0.0);
  double worst_delta = 0;  // error / bound
  auto v_at = [&](int64_t b_, int64_t j, int64_t col) {
    return size_t(((b_ * s.Hkv + col / s.D) * s.Lk + j) * s.D + col % s.D);
  };
  for (int64_t b_ = 0; b_ < s.B; ++b_)
    for (int64_t h = 0; h < s.Hd; ++h)
      for (int64_t j = 0; j < s.Lk; ++j) {
        double z = 0, zmag = 0;
        for (int64_t col = 0; col < HD; ++col) {
          const double t = v_d[v_at(b_, j, col)] * w_d[size_t(h * HD + col)];
          z += t;
          zmag += std::abs(t);
        }
        const double ez = n_z * u * zmag;
        const size_t bhj = size_t((b_ * s.Hd + h) * s.Lk + j);
        const double sp = z > 30 ? z : std::log1p(std::exp(z)), sg = 1 / (1 + std::exp(-z));
        const double a_sp = std::abs(a_d[size_t(h)] * sp);
        const double bound_delta = std::abs(delta_ref[bhj]) * (1.5 * ez + (4 * a_sp + 8) * u);
        worst_delta = std::max(worst_delta, std::abs(r1.delta[bhj] - delta_ref[bhj]) / bound_delta);
        const double ddu = tc.form == Form::exp ? delta_ref[bhj] : 1.0;  // d delta / d(a softplus)
        // relative error of dz and of the da term: z's, and in the exp form delta's own rounding
        const double rel_dz = 2.5 * ez + ((tc.form == Form::exp ? 4 * a_sp : 0.0) + 14) * u;
        const double dz = g_d[bhj] * ddu * a_d[size_t(h)] * sg;
        const double t_a = std::abs(g_d[bhj] * ddu * sp);
        mag_a[size_t(h)] += t_a;
        bnd_a[size_t(h)] += t_a * rel_dz;
        for (int64_t col = 0; col < HD; ++col) {
          const size_t vi = v_at(b_, j, col);
          const double t_w = std::abs(dz * v_d[vi]), t_v = std::abs(dz * w_d[size_t(h * HD + col)]);
          mag_w[size_t(h * HD + col)] += t_w;
          bnd_w[size_t(h * HD + col)] += t_w * rel_dz;
          mag_v[vi] += t_v;
          bnd_v[vi] += t_v * rel_dz;
        }
      }
  INFO("delta: worst error / bound ", worst_delta);
  CHECK(worst_delta <= 1);

  // worst over elements of |got - want| / bound
  auto worst = [](const std::vector<float>& got, const std::vector<double>& want,
                  const std::vector<double>& bound) {
    double e = 0;
    for (size_t n = 0; n < want.size(); ++n)
      e = std::max(e, std::abs(got[n] - want[n]) / std::max(bound[n], 1e-300));
    return e;
  };
  for (size_t n = 0; n < mag_w.size(); ++n) bnd_w[n] += n_sum * u * mag_w[n];
  for (size_t n = 0; n < mag_a.size(); ++n) bnd_a[n] += n_sum * u * mag_a[n];
  std::vector<double> dv_want(dv0.size());
  for (size_t n = 0; n < dv0.size(); ++n) {
    dv_want[n] = double(dv0[n]) + ref.dv[n];
    bnd_v[n] += double(s.Hd) * u * mag_v[n] + 2 * u * (std::abs(double(dv0[n])) + mag_v[n]);
  }
  const double e_w = worst(r1.dw_dt, ref.dw_dt, bnd_w), e_a = worst(r1.da, ref.da, bnd_a);
  const double e_v = worst(r1.dv, dv_want, bnd_v);
  const double l2_w = dma::rel_l2(r1.dw_dt, ref.dw_dt), l2_a = dma::rel_l2(r1.da, ref.da);
  INFO("error / bound: dw_dt ", e_w, "  da ", e_a, "  dv ", e_v, ";  relative L2: dw_dt ", l2_w,
       "  da ", l2_a);
  CHECK(e_w <= 1);
  CHECK(e_a <= 1);
  CHECK(e_v <= 1);
  CHECK(l2_w <= 2e-5);
  CHECK(l2_a <= 2e-5);
}

}  // namespace

TEST_SUITE("cuda") {
  TEST_CASE("cuda dynamic weights: bitwise reproducible and equal to core's float64, small shapes") {
    const DwCase cases[] = {
        {2, 4, 2, 2, 301, 128, Form::exp, Precision::bf16, 0},     // Hd = Hkv
        {2, 4, 2, 4, 301, 64, Form::linear, Precision::bf16, 0},   // Hd = Hq
        {2, 6, 3, 6, 157, 64, Form::exp, Precision::fp16, 0},      // Hkv*D = 192: a partial slice
        {2, 1, 1, 1, 77, 64, Form::linear, Precision::bf16, 0},    // Hkv*D = 64
        {2, 12, 4, 12, 211, 64, Form::exp, Precision::bf16, 0},    // 8 < Hd <= 16
        {2, 20, 4, 20, 131, 64, Form::linear, Precision::fp16, 0}, // 16 < Hd <= 32
        {2, 40, 8, 40, 97, 64, Form::exp, Precision::bf16, 0},     // Hd > 32: two head groups
        {2, 16, 16, 16, 65, 128, Form::linear, Precision::bf16, 0},// Hkv*D = 2048
        {2, 4, 2, 4, 301, 64, Form::exp, Precision::bf16, 1},      // dv not 16-byte aligned
        {2, 2, 2, 2, 3, 64, Form::exp, Precision::bf16, 0},        // fewer keys than a warp's 4
    };
    int n = 0;
    for (const DwCase& tc : cases) check_case(tc, dma_test::test_seed() + 31 * ++n);
  }

  TEST_CASE("cuda dynamic weights: bitwise reproducible and equal to core's float64, long") {
    // 2 x 9001 keys at Hkv*D = 1024: each block of the backward reduces 273 keys in 3 chunks.
    const DwCase cases[] = {
        {2, 16, 8, 8, 9001, 128, Form::exp, Precision::bf16, 0},
        {2, 16, 8, 8, 9001, 128, Form::linear, Precision::bf16, 0},
    };
    int n = 0;
    for (const DwCase& tc : cases) check_case(tc, dma_test::test_seed() + 977 * ++n);
  }
}
