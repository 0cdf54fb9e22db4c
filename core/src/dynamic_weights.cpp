// Dynamic weights and their backward, paper Eq. 3 (docs/design.md §1.1 and §1.5).
#include "dma/dynamic_weights.hpp"

#include <cmath>

#include "dma/validate.hpp"

namespace dma {
namespace {

// softplus(z) = log(1 + e^z), written so that neither branch overflows.
template <typename T>
T softplus(T z) {
  return z > 0 ? z + std::log1p(std::exp(-z)) : std::log1p(std::exp(z));
}

template <typename T>
T sigmoid(T z) {
  return z >= 0 ? T(1) / (T(1) + std::exp(-z)) : std::exp(z) / (T(1) + std::exp(z));
}

// z[b,j,h] = vflat[b,j,:] . w_dt[h,:], where vflat[b,j,:] is v[b,hk,j,:] concatenated over hk.
template <typename T>
T dot_vflat_wdt(const Shape& s, const std::vector<T>& v, const std::vector<T>& w_dt, int64_t b,
                int64_t j, int64_t h) {
  const T* w_h = &w_dt[h * s.Hkv * s.D];
  T z = 0;
  for (int64_t hk = 0; hk < s.Hkv; ++hk) {
    const T* v_bhj = &v[((b * s.Hkv + hk) * s.Lk + j) * s.D];
    for (int64_t d = 0; d < s.D; ++d) z += v_bhj[d] * w_h[hk * s.D + d];
  }
  return z;
}

}  // namespace

template <typename T>
std::vector<T> dynamic_weights(const Shape& s, Form form, const std::vector<T>& v,
                               const std::vector<T>& w_dt, const std::vector<T>& a) {
  // v is (B,Hkv,Lk,D), w_dt is (Hd,Hkv*D), a is (Hd); delta is (B,Hd,Lk)
  std::vector<T> delta(s.delta_numel());
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.Hd; ++h)
      for (int64_t j = 0; j < s.Lk; ++j) {
        const T z = dot_vflat_wdt(s, v, w_dt, b, j, h);
        const T a_sp = a[h] * softplus(z);
        const T d = form == Form::exp ? std::exp(a_sp) : a_sp;
        if (!std::isfinite(d))
          throw Error("delta" + format_index((b * s.Hd + h) * s.Lk + j, {s.B, s.Hd, s.Lk}) +
                      " is not finite (a*softplus(z) = " + std::to_string(static_cast<double>(a_sp)) +
                      (form == Form::exp ? " overflows exp; try --form linear or a smaller a)"
                                         : ")"));
        delta[(b * s.Hd + h) * s.Lk + j] = d;
      }
  return delta;
}

template <typename T>
DynamicWeightGrads<T> dynamic_weights_backward(const Shape& s, Form form, const std::vector<T>& v,
                                               const std::vector<T>& w_dt,
                                               const std::vector<T>& a,
                                               const std::vector<T>& ddelta) {
  // g = ddelta is (B,Hd,Lk). In the forward pass delta = f(a * softplus(z)) with
  // z = vflat . w_dt[h], so now, with u = a * softplus(z):
  //   exp form:    d delta / du = delta        linear form: d delta / du = 1
  //   da[h]  += g * (d delta/du) * softplus(z)
  //   dz      = g * (d delta/du) * a * sigmoid(z)
  //   dw_dt[h,:] += dz * vflat[b,j,:]   and   dvflat[b,j,:] += dz * w_dt[h,:]
  DynamicWeightGrads<T> g;
  g.dw_dt.assign(s.w_dt_numel(), T(0));
  g.da.assign(s.Hd, T(0));
  g.dv.assign(s.kv_numel(), T(0));
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.Hd; ++h)
      for (int64_t j = 0; j < s.Lk; ++j) {
        const T z = dot_vflat_wdt(s, v, w_dt, b, j, h);
        const T sp = softplus(z);
        const T gd = ddelta[(b * s.Hd + h) * s.Lk + j];
        const T ddelta_du = form == Form::exp ? std::exp(a[h] * sp) : T(1);
        g.da[h] += gd * ddelta_du * sp;
        const T dz = gd * ddelta_du * a[h] * sigmoid(z);
        for (int64_t hk = 0; hk < s.Hkv; ++hk) {
          const T* v_bhj = &v[((b * s.Hkv + hk) * s.Lk + j) * s.D];
          T* dv_bhj = &g.dv[((b * s.Hkv + hk) * s.Lk + j) * s.D];
          const T* w_h = &w_dt[h * s.Hkv * s.D + hk * s.D];
          T* dw_h = &g.dw_dt[h * s.Hkv * s.D + hk * s.D];
          for (int64_t d = 0; d < s.D; ++d) {
            dw_h[d] += dz * v_bhj[d];
            dv_bhj[d] += dz * w_h[d];
          }
        }
      }
  return g;
}

#define DMA_INSTANTIATE(T)                                                                   \
  template std::vector<T> dynamic_weights(const Shape&, Form, const std::vector<T>&,        \
                                          const std::vector<T>&, const std::vector<T>&);    \
  template DynamicWeightGrads<T> dynamic_weights_backward(                                  \
      const Shape&, Form, const std::vector<T>&, const std::vector<T>&, const std::vector<T>&, \
      const std::vector<T>&);
DMA_INSTANTIATE(float)
DMA_INSTANTIATE(double)
#undef DMA_INSTANTIATE

}  // namespace dma
