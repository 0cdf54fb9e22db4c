// Dynamic weights (paper Eq. 3, "zero-order hold"): one weight per key and head, from the values.
//
//   vflat[b,j,:]  = concat over hk of v[b,hk,j,:]              (Hkv*D)
//   z[b,j,h]      = vflat[b,j,:] . w_dt[h,:]
//   delta[b,h,j]  = exp(a[h] * softplus(z))   (Form::exp)
//                 = a[h] * softplus(z)        (Form::linear)
#pragma once

#include <vector>

#include "dma/types.hpp"

namespace dma {

// v is (B,Hkv,Lk,D), w_dt is (Hd,Hkv*D), a is (Hd). Returns delta (B,Hd,Lk).
// Throws dma::Error naming the index if a delta is not finite (e.g. exp overflow).
template <typename T>
std::vector<T> dynamic_weights(const Shape& s, Form form, const std::vector<T>& v,
                               const std::vector<T>& w_dt, const std::vector<T>& a);

// Gradients of the dynamic weights given g = ddelta (B,Hd,Lk).
template <typename T>
struct DynamicWeightGrads {
  std::vector<T> dw_dt;  // (Hd, Hkv*D)
  std::vector<T> da;     // (Hd)
  std::vector<T> dv;     // (B,Hkv,Lk,D): the extra gradient v receives through delta
};

template <typename T>
DynamicWeightGrads<T> dynamic_weights_backward(const Shape& s, Form form, const std::vector<T>& v,
                                               const std::vector<T>& w_dt,
                                               const std::vector<T>& a,
                                               const std::vector<T>& ddelta);

}  // namespace dma
