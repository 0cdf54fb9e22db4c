#include "view_data.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

#include "dma/mask_rule.hpp"

namespace dma::viewer {

const char* view_label(ViewKind v) {
  switch (v) {
    case ViewKind::probs: return "Probabilities";
    case ViewKind::delta: return "Bias delta";
    case ViewKind::mask: return "Kept mask";
    case ViewKind::ds: return "ds";
    case ViewKind::dq: return "dq";
    case ViewKind::diff: return "|CUDA - CPU|";
  }
  return "?";
}

const char* view_help(ViewKind v) {
  switch (v) {
    case ViewKind::probs:
      return "p[i,j] = softmax over the kept keys of s[i,j] = scale*q_i.k_j + delta_j.\n"
             "Rows are queries, columns keys. Dark cells: allowed but dropped (p = 0 exactly).";
    case ViewKind::delta:
      return "The bias delta_j added to the logits of kept keys. It depends on the key only\n"
             "(and the delta head), so kept cells of one column share one colour.";
    case ViewKind::mask:
      return "Kept (yellow) or dropped (purple): each query keeps the w allowed keys ranked\n"
             "highest by (delta, index). Because delta does not depend on the query, a key that\n"
             "leaves the window never comes back: each column is one vertical run.\n"
             "Downsampled, a texel is the fraction of its allowed cells that is kept.";
    case ViewKind::ds:
      return "ds[i,j] = p[i,j] (dp[i,j] - D_i), the gradient of the logits; exactly 0 where\n"
             "the key is dropped, which is why skipping is exact in the backward too.";
    case ViewKind::dq:
      return "dq = scale * sum_j ds[i,j] k_j, rows are queries, columns the head dim.";
    case ViewKind::diff:
      return "|CUDA - CPU| per element of an output (queries or keys x head dim): the CUDA\n"
             "outputs (bf16 inputs, fp32 accumulation) of this run or of a bundle written by\n"
             "dma_run --backend cuda, against the CPU reference recomputed here.";
  }
  return "";
}

const char* diff_label(DiffTensor t) {
  switch (t) {
    case DiffTensor::o: return "o";
    case DiffTensor::dq: return "dq";
    case DiffTensor::dk: return "dk";
    case DiffTensor::dv: return "dv";
  }
  return "?";
}

void view_dims(const Shape& s, ViewKind kind, DiffTensor diff, int64_t* rows, int64_t* cols) {
  if (kind == ViewKind::dq || kind == ViewKind::diff) {
    const bool key_rows = kind == ViewKind::diff && (diff == DiffTensor::dk || diff == DiffTensor::dv);
    *rows = key_rows ? s.Lk : s.Lq;
    *cols = s.D;
  } else {
    *rows = s.Lq;
    *cols = s.Lk;
  }
}

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// The value below which a fraction q of xs lies (xs is reordered).
float quantile(std::vector<float>& xs, double q) {
  if (xs.empty()) return 0;
  const size_t k = std::min(xs.size() - 1, static_cast<size_t>(q * static_cast<double>(xs.size())));
  std::nth_element(xs.begin(), xs.begin() + static_cast<std::ptrdiff_t>(k), xs.end());
  return xs[k];
}

void finish(HeadMatrix& m) {
  const Range full = value_range(m.view(), m.last_allowed);
  // The percentile from a sample of at most ~64K cells (a strided walk over the allowed ones):
  // exact enough for a colour range, and cheap at 2048 x 2048.
  int64_t allowed = 0;
  for (int64_t r = 0; r < m.rows; ++r)
    allowed += (m.last_allowed ? std::min(m.last_allowed[r], m.cols - 1) : m.cols - 1) + 1;
  const int64_t stride = std::max<int64_t>(1, allowed / 65536);
  std::vector<float> xs;
  int64_t n = 0;
  for (int64_t r = 0; r < m.rows; ++r) {
    const int64_t last = m.last_allowed ? std::min(m.last_allowed[r], m.cols - 1) : m.cols - 1;
    for (int64_t c = 0; c <= last; ++c, ++n) {
      if (n % stride) continue;
      const float v = m.values[r * m.cols + c];
      if (std::isfinite(v)) xs.push_back(m.map == ColorMap::diverging ? std::fabs(v) : v);
    }
  }
  const float top = quantile(xs, 0.99);
  if (m.map == ColorMap::diverging) {
    const float r = top > 0 ? top : std::max(std::fabs(full.lo), std::fabs(full.hi));
    m.range = {-r, r};
    m.clipped = std::max(std::fabs(full.lo), std::fabs(full.hi)) > r;
  } else {
    m.range = {full.lo, top > full.lo ? top : full.hi};
    m.clipped = full.hi > m.range.hi;
  }
  m.valid = true;
}

}  // namespace

HeadMatrix head_matrix(const Views& v, const Comparison* cmp, ViewKind kind, DiffTensor diff,
                       int64_t b, int64_t hq, bool log_scale) {
  HeadMatrix m;
  const Shape& s = v.shape;
  if (b < 0 || b >= s.B || hq < 0 || hq >= s.Hq) {
    m.why_not = "no such head";
    return m;
  }
  const int64_t hd = s.delta_head(hq), hk = s.kv_head(hq);
  const int64_t bq = b * s.Hq + hq, bd = b * s.Hd + hd, bk = b * s.Hkv + hk;

  if (kind == ViewKind::dq || kind == ViewKind::diff) {
    const std::vector<float>* ref = nullptr;
    const std::vector<float>* other = nullptr;
    bool key_rows = false;
    if (kind == ViewKind::dq) {
      ref = &v.dq;
    } else {
      if (!cmp) {
        m.why_not = "nothing to compare: no CUDA run and no stored outputs (open a bundle written "
                    "by dma_run --backend cuda with --in)";
        return m;
      }
      switch (diff) {
        case DiffTensor::o: ref = &v.o; other = &cmp->o; break;
        case DiffTensor::dq: ref = &v.dq; other = &cmp->dq; break;
        case DiffTensor::dk: ref = &v.dk; other = &cmp->dk; key_rows = true; break;
        case DiffTensor::dv: ref = &v.dv; other = &cmp->dv; key_rows = true; break;
      }
    }
    if (ref->empty()) {  // o always exists; the gradients only with do
      m.why_not = "no backward: the inputs have no do";
      return m;
    }
    if (other && other->size() != ref->size()) {
      m.why_not = std::string("the compared outputs lack ") + diff_label(diff);
      return m;
    }
    m.rows = key_rows ? s.Lk : s.Lq;
    m.cols = s.D;
    const int64_t base = (key_rows ? bk : bq) * m.rows * s.D;
    m.values.resize(static_cast<size_t>(m.rows * m.cols));
    for (int64_t i = 0; i < m.rows * m.cols; ++i)
      m.values[i] = other ? std::fabs((*other)[base + i] - (*ref)[base + i]) : (*ref)[base + i];
    m.map = other ? ColorMap::viridis : ColorMap::diverging;
    m.reduce = other ? Reduce::max : Reduce::max_abs;
    m.row_name = key_rows ? "key" : "query";
    m.col_name = "dim";
    m.title = other ? std::string("|") + cmp->label + " - CPU| of " + diff_label(diff) : "dq";
    finish(m);
    return m;
  }

  if (kind == ViewKind::ds && v.ds.empty()) {
    m.why_not = "no backward: the inputs have no do";
    return m;
  }
  m.rows = s.Lq;
  m.cols = s.Lk;
  m.row_name = "query";
  m.col_name = "key";
  m.last_allowed = v.last_allowed.data();
  m.title = view_label(kind);
  m.values.assign(static_cast<size_t>(m.rows * m.cols), kNaN);
  const uint8_t* kept = v.mask.data() + bd * s.Lq * s.Lk;
  const float* delta = v.delta.data() + bd * s.Lk;
  for (int64_t i = 0; i < s.Lq; ++i) {
    float* row = m.values.data() + i * s.Lk;
    const uint8_t* kept_i = kept + i * s.Lk;
    const int64_t last = v.last_allowed[i];
    switch (kind) {
      case ViewKind::probs: {
        const float* p = v.probs.data() + (bq * s.Lq + i) * s.Lk;
        for (int64_t j = 0; j <= last; ++j)
          if (kept_i[j]) row[j] = log_scale ? std::log10(std::max(p[j], 1e-8f)) : p[j];
        break;
      }
      case ViewKind::delta:
        for (int64_t j = 0; j <= last; ++j)
          if (kept_i[j]) row[j] = delta[j];
        break;
      case ViewKind::mask:
        for (int64_t j = 0; j <= last; ++j) row[j] = kept_i[j] ? 1.0f : 0.0f;
        break;
      case ViewKind::ds: {
        const float* d = v.ds.data() + (bq * s.Lq + i) * s.Lk;
        for (int64_t j = 0; j <= last; ++j)
          if (kept_i[j]) row[j] = d[j];
        break;
      }
      default: break;
    }
  }
  m.map = kind == ViewKind::delta || kind == ViewKind::ds ? ColorMap::diverging : ColorMap::viridis;
  m.reduce = m.map == ColorMap::diverging ? Reduce::max_abs : Reduce::max;
  if (kind == ViewKind::probs && log_scale) m.title = "Probabilities (log10)";
  finish(m);
  if (kind == ViewKind::mask) {
    m.range = {0, 1};
    m.clipped = false;
    m.binary = true;
    m.reduce = Reduce::mean;  // downsampled: the fraction of allowed cells kept, not "any kept"
  }
  if (kind == ViewKind::probs && !log_scale) m.range.lo = 0;
  return m;
}

HeadMatrix mask_from_evict(const int64_t* evict_bh, const int64_t* last_allowed, int64_t Lq,
                           int64_t Lk) {
  HeadMatrix m;
  m.rows = Lq;
  m.cols = Lk;
  m.row_name = "query";
  m.col_name = "key";
  m.title = view_label(ViewKind::mask);
  m.last_allowed = last_allowed;
  m.values.assign(static_cast<size_t>(Lq * Lk), kNaN);
  for (int64_t i = 0; i < Lq; ++i) {
    const int64_t p = std::min(last_allowed[i], Lk - 1);
    for (int64_t j = 0; j <= p; ++j) m.values[i * Lk + j] = rule::is_kept(j, p, evict_bh[j]) ? 1.0f : 0.0f;
  }
  m.map = ColorMap::viridis;
  m.reduce = Reduce::mean;
  m.range = {0, 1};
  m.binary = true;
  m.valid = true;
  return m;
}

}  // namespace dma::viewer
