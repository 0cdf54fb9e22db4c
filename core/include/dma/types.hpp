// Shapes, options and small helpers shared by every part of DMA.
//
// Layouts are head-major, C order (docs/design.md §1):
//   q     (B, Hq,  Lq, D)        k, v (B, Hkv, Lk, D)
//   w_dt  (Hd, Hkv*D)            a    (Hd)
//   delta (B, Hd, Lk)            evict (B, Hd, Lk)     mask (B, Hd, Lq, Lk)
//   o     (B, Hq, Lq, D)         lse  (B, Hq, Lq)
#pragma once

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "dma/mask_rule.hpp"

namespace dma {

// Every problem DMA detects is reported as this exception, with a one-line message that names the
// tensor (and index, where there is one) and what is wrong with it.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// How the dynamic weight is formed from z = vflat . w_dt (paper Eq. 3):
//   exp    delta = exp(a * softplus(z))     (the paper's form, the default)
//   linear delta = a * softplus(z)          (flash-dmattn's form, numerically tamer)
enum class Form { exp, linear };

// The 16-bit element type the GPU kernels read q, k, v and do in (fp32 accumulation always).
enum class Precision { bf16, fp16 };

const char* form_name(Form f);
Form parse_form(const std::string& name);  // "exp" or "linear", else dma::Error

// Sizes of one DMA problem, in the notation of docs/design.md §1.
struct Shape {
  int64_t B = 1;    // batch
  int64_t Hq = 1;   // query heads
  int64_t Hkv = 1;  // key/value heads; Hq % Hkv == 0 (GQA)
  int64_t Hd = 1;   // heads of the dynamic weights; Hkv or Hq
  int64_t Lq = 1;   // queries
  int64_t Lk = 1;   // keys
  int64_t D = 1;    // head dim

  // Query head hq reads kv head kv_head(hq) and delta head delta_head(hq).
  int64_t kv_head(int64_t hq) const { return hq / (Hq / Hkv); }
  int64_t delta_head(int64_t hq) const { return hq / (Hq / Hd); }

  int64_t q_numel() const { return B * Hq * Lq * D; }
  int64_t kv_numel() const { return B * Hkv * Lk * D; }
  int64_t w_dt_numel() const { return Hd * Hkv * D; }
  int64_t delta_numel() const { return B * Hd * Lk; }
  int64_t lse_numel() const { return B * Hq * Lq; }
  int64_t mask_numel() const { return B * Hd * Lq * Lk; }
};

struct Options {
  int64_t window = 0;    // w: keys kept per query (>= 1)
  bool causal = true;    // causal: bottom-right aligned; else every query sees every key
  Form form = Form::exp;
  double scale = 0.0;    // softmax scale; 0 means 1/sqrt(D)

  double softmax_scale(const Shape& s) const {
    return scale != 0.0 ? scale : 1.0 / std::sqrt(static_cast<double>(s.D));
  }
};

// Absolute position p_i of query i (the rule itself is in dma/mask_rule.hpp).
inline int64_t query_position(const Shape& s, bool causal, int64_t i) {
  return rule::query_position<int64_t>(s.Lq, s.Lk, causal, i);
}

// The ranking of the dynamic mask: key j1 ranks above key j2 when its delta is larger, and on a
// tie when it is more recent. One total order, the same for every query: this is what makes the
// selections of consecutive queries nest (docs/design.md §2).
template <typename T>
inline bool ranks_above(T delta_j1, int64_t j1, T delta_j2, int64_t j2) {
  return delta_j1 > delta_j2 || (delta_j1 == delta_j2 && j1 > j2);
}

// Key j is kept by the query at position p exactly when j <= p <= e_j (e_j = evict position).
inline bool is_kept(int64_t j, int64_t p, int64_t evict_j) { return rule::is_kept(j, p, evict_j); }

}  // namespace dma
