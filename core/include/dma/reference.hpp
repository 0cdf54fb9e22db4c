// The scalar reference of DMA attention (paper Eqs. 5 and 7-10): the ground truth every other
// implementation in the project is checked against. Written to be read, not to be fast.
#pragma once

#include <cstdint>
#include <vector>

#include "dma/types.hpp"

namespace dma {

template <typename T>
struct ForwardResult {
  std::vector<T> o;    // (B,Hq,Lq,D)
  std::vector<T> lse;  // (B,Hq,Lq), natural log of the softmax denominator
};

template <typename T>
struct AttentionGrads {
  std::vector<T> dq;      // (B,Hq,Lq,D)
  std::vector<T> dk;      // (B,Hkv,Lk,D), summed over the query heads of a group
  std::vector<T> dv;      // (B,Hkv,Lk,D), attention part only
  std::vector<T> ddelta;  // (B,Hd,Lk), summed over queries and the query heads of a delta head
};

// q (B,Hq,Lq,D), k and v (B,Hkv,Lk,D), delta (B,Hd,Lk), mask (B,Hd,Lq,Lk) from explicit_mask.
//   s[i,j] = scale * q_i.k_j + delta_j on kept keys, -inf elsewhere
//   o_i = softmax(s_i) v,  lse_i = log sum_j exp(s[i,j])
// If probs is given it receives p (B,Hq,Lq,Lk), exactly 0 at every masked (i,j) (for teaching,
// and for run_pipeline's PipelineHooks::keep_probs); a null probs costs nothing.
template <typename T>
ForwardResult<T> reference_forward(const Shape& s, const Options& opt, const std::vector<T>& q,
                                   const std::vector<T>& k, const std::vector<T>& v,
                                   const std::vector<T>& delta, const std::vector<uint8_t>& mask,
                                   std::vector<T>* probs = nullptr);

// The backward of reference_forward given do (B,Hq,Lq,D). If ds is given it receives
// ds (B,Hq,Lq,Lk), the gradient of the logits; it is exactly 0 at every masked (i,j).
template <typename T>
AttentionGrads<T> reference_backward(const Shape& s, const Options& opt, const std::vector<T>& q,
                                     const std::vector<T>& k, const std::vector<T>& v,
                                     const std::vector<T>& delta,
                                     const std::vector<uint8_t>& mask,
                                     const ForwardResult<T>& fwd, const std::vector<T>& dout,
                                     std::vector<T>* ds = nullptr);

}  // namespace dma
