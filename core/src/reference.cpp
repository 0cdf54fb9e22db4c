// The scalar reference of DMA attention: paper Eq. 5 (forward) and Eqs. 7-10 (backward).
// One (batch, query head, query) row at a time, every sum written out. Clarity over speed.
#include "dma/reference.hpp"

#include <cmath>
#include <limits>

namespace dma {

template <typename T>
ForwardResult<T> reference_forward(const Shape& s, const Options& opt, const std::vector<T>& q,
                                   const std::vector<T>& k, const std::vector<T>& v,
                                   const std::vector<T>& delta, const std::vector<uint8_t>& mask,
                                   std::vector<T>* probs) {
  // q is (B,Hq,Lq,D), k and v are (B,Hkv,Lk,D), delta is (B,Hd,Lk), mask is (B,Hd,Lq,Lk)
  // o is (B,Hq,Lq,D), lse is (B,Hq,Lq), probs (optional) is (B,Hq,Lq,Lk)
  const T scale = static_cast<T>(opt.softmax_scale(s));
  const T neg_inf = -std::numeric_limits<T>::infinity();
  ForwardResult<T> out;
  out.o.assign(s.q_numel(), T(0));
  out.lse.assign(s.lse_numel(), T(0));
  if (probs) probs->assign(s.B * s.Hq * s.Lq * s.Lk, T(0));
  std::vector<T> s_row(s.Lk);  // the logits of one query
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t hq = 0; hq < s.Hq; ++hq) {
      const int64_t hk = s.kv_head(hq), hd = s.delta_head(hq);
      const T* delta_bh = &delta[(b * s.Hd + hd) * s.Lk];
      for (int64_t i = 0; i < s.Lq; ++i) {
        const T* q_bhi = &q[((b * s.Hq + hq) * s.Lq + i) * s.D];
        const uint8_t* mask_bhi = &mask[((b * s.Hd + hd) * s.Lq + i) * s.Lk];

        // pass 1: logits s_ij = scale * q_i.k_j + delta_j on kept keys, -inf elsewhere
        T m = neg_inf;  // running max, for a stable softmax
        for (int64_t j = 0; j < s.Lk; ++j) {
          if (!mask_bhi[j]) { s_row[j] = neg_inf; continue; }
          const T* k_bhj = &k[((b * s.Hkv + hk) * s.Lk + j) * s.D];
          T qk = 0;
          for (int64_t d = 0; d < s.D; ++d) qk += q_bhi[d] * k_bhj[d];
          s_row[j] = scale * qk + delta_bh[j];
          if (s_row[j] > m) m = s_row[j];
        }

        // pass 2: lse_i = log sum_j exp(s_ij)  (every query keeps >= 1 key, so m is finite)
        T l = 0;
        for (int64_t j = 0; j < s.Lk; ++j)
          if (mask_bhi[j]) l += std::exp(s_row[j] - m);
        const T lse = m + std::log(l);
        out.lse[(b * s.Hq + hq) * s.Lq + i] = lse;

        // pass 3: p_ij = exp(s_ij - lse_i) and o_i = sum_j p_ij v_j
        T* o_bhi = &out.o[((b * s.Hq + hq) * s.Lq + i) * s.D];
        for (int64_t j = 0; j < s.Lk; ++j) {
          if (!mask_bhi[j]) continue;
          const T p = std::exp(s_row[j] - lse);
          if (probs) (*probs)[((b * s.Hq + hq) * s.Lq + i) * s.Lk + j] = p;
          const T* v_bhj = &v[((b * s.Hkv + hk) * s.Lk + j) * s.D];
          for (int64_t d = 0; d < s.D; ++d) o_bhi[d] += p * v_bhj[d];
        }
      }
    }
  return out;
}

template <typename T>
AttentionGrads<T> reference_backward(const Shape& s, const Options& opt, const std::vector<T>& q,
                                     const std::vector<T>& k, const std::vector<T>& v,
                                     const std::vector<T>& delta,
                                     const std::vector<uint8_t>& mask,
                                     const ForwardResult<T>& fwd, const std::vector<T>& dout,
                                     std::vector<T>* ds) {
  // q, do are (B,Hq,Lq,D); k, v are (B,Hkv,Lk,D); delta is (B,Hd,Lk); mask is (B,Hd,Lq,Lk)
  // dq is (B,Hq,Lq,D); dk, dv are (B,Hkv,Lk,D); ddelta is (B,Hd,Lk); ds (optional) (B,Hq,Lq,Lk)
  const T scale = static_cast<T>(opt.softmax_scale(s));
  const T neg_inf = -std::numeric_limits<T>::infinity();
  AttentionGrads<T> g;
  g.dq.assign(s.q_numel(), T(0));
  g.dk.assign(s.kv_numel(), T(0));
  g.dv.assign(s.kv_numel(), T(0));
  g.ddelta.assign(s.delta_numel(), T(0));
  if (ds) ds->assign(s.B * s.Hq * s.Lq * s.Lk, T(0));
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t hq = 0; hq < s.Hq; ++hq) {
      const int64_t hk = s.kv_head(hq), hd = s.delta_head(hq);
      const T* delta_bh = &delta[(b * s.Hd + hd) * s.Lk];
      for (int64_t i = 0; i < s.Lq; ++i) {
        const int64_t row = (b * s.Hq + hq) * s.Lq + i;
        const T* q_bhi = &q[row * s.D];
        const T* do_bhi = &dout[row * s.D];
        const T* o_bhi = &fwd.o[row * s.D];
        T* dq_bhi = &g.dq[row * s.D];
        const uint8_t* mask_bhi = &mask[((b * s.Hd + hd) * s.Lq + i) * s.Lk];

        // In the forward pass o_i = sum_j p_ij v_j with p_i = softmax(s_i), so now we have
        // D_i = do_i . o_i, the term the softmax's Jacobian subtracts from every dp_ij.
        T D_i = 0;
        for (int64_t d = 0; d < s.D; ++d) D_i += do_bhi[d] * o_bhi[d];

        for (int64_t j = 0; j < s.Lk; ++j) {
          // Masked pairs are computed too, on purpose: their logit is -inf, so p_ij = 0 and
          // ds_ij = 0 exactly, and all they add below is +0. That is why skipping them is exact.
          const T* k_bhj = &k[((b * s.Hkv + hk) * s.Lk + j) * s.D];
          const T* v_bhj = &v[((b * s.Hkv + hk) * s.Lk + j) * s.D];
          T* dk_bhj = &g.dk[((b * s.Hkv + hk) * s.Lk + j) * s.D];
          T* dv_bhj = &g.dv[((b * s.Hkv + hk) * s.Lk + j) * s.D];

          // recompute the forward's p_ij = exp(s_ij - lse_i) from the saved lse
          T qk = 0;
          for (int64_t d = 0; d < s.D; ++d) qk += q_bhi[d] * k_bhj[d];
          const T s_ij = mask_bhi[j] ? scale * qk + delta_bh[j] : neg_inf;
          const T p = std::exp(s_ij - fwd.lse[row]);

          // o_i = sum_j p_ij v_j            ->  dv_j += p_ij do_i,  dp_ij = do_i . v_j
          T dp = 0;
          for (int64_t d = 0; d < s.D; ++d) {
            dv_bhj[d] += p * do_bhi[d];
            dp += do_bhi[d] * v_bhj[d];
          }
          // p_i = softmax(s_i)              ->  ds_ij = p_ij (dp_ij - D_i)
          const T ds_ij = p * (dp - D_i);
          if (ds) (*ds)[row * s.Lk + j] = ds_ij;
          // s_ij = scale q_i.k_j + delta_j  ->  dq_i += scale ds_ij k_j, dk_j += scale ds_ij q_i,
          //                                     ddelta_j += ds_ij
          for (int64_t d = 0; d < s.D; ++d) {
            dq_bhi[d] += scale * ds_ij * k_bhj[d];
            dk_bhj[d] += scale * ds_ij * q_bhi[d];
          }
          g.ddelta[(b * s.Hd + hd) * s.Lk + j] += ds_ij;
        }
      }
    }
  return g;
}

#define DMA_INSTANTIATE(T)                                                                      \
  template ForwardResult<T> reference_forward(const Shape&, const Options&, const std::vector<T>&, \
                                              const std::vector<T>&, const std::vector<T>&,       \
                                              const std::vector<T>&, const std::vector<uint8_t>&, \
                                              std::vector<T>*);                                   \
  template AttentionGrads<T> reference_backward(                                                \
      const Shape&, const Options&, const std::vector<T>&, const std::vector<T>&,               \
      const std::vector<T>&, const std::vector<T>&, const std::vector<uint8_t>&,                \
      const ForwardResult<T>&, const std::vector<T>&, std::vector<T>*);
DMA_INSTANTIATE(float)
DMA_INSTANTIATE(double)
#undef DMA_INSTANTIATE

}  // namespace dma
