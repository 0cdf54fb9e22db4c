// What the large view and the thumbnails show for one head: a matrix with its colour map, its
// range and its causal limits, taken from a snapshot's Views. Pure (no ImGui, no GL).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "jobs.hpp"
#include "heatmap.hpp"

namespace dma::viewer {

enum class ViewKind { probs, delta, mask, ds, dq, diff };
inline constexpr int kViewKindCount = 6;
const char* view_label(ViewKind v);
const char* view_help(ViewKind v);

// Which output the |CUDA - CPU| view compares.
enum class DiffTensor { o, dq, dk, dv };
const char* diff_label(DiffTensor t);

struct HeadMatrix {
  bool valid = false;
  std::string why_not;            // when not valid: what is missing ("no backward: ...")
  std::string title, row_name, col_name;
  int64_t rows = 0, cols = 0;
  std::vector<float> values;      // rows x cols, NaN where a kept-only quantity has no value
  const int64_t* last_allowed = nullptr;  // causal limits (Lq x Lk views only), else nullptr
  ColorMap map = ColorMap::viridis;
  Reduce reduce = Reduce::max;
  // The colour range: up to the 99th percentile of the finite allowed values (of |value| for the
  // symmetric diverging map), so a handful of extreme cells does not wash out the rest.
  Range range;
  bool clipped = false;           // some values lie beyond the range (drawn at its end colour)
  bool binary = false;            // kept / dropped only (the mask)
  MatrixView view() const { return {values.data(), rows, cols, cols}; }
};

// The size of the matrix head_matrix() returns, without building it.
void view_dims(const Shape& s, ViewKind kind, DiffTensor diff, int64_t* rows, int64_t* cols);

// b: batch index, hq: query head. log_scale applies to probabilities (log10, floor 1e-8).
HeadMatrix head_matrix(const Views& v, const Comparison* cmp, ViewKind kind, DiffTensor diff,
                       int64_t b, int64_t hq, bool log_scale);

// The kept mask of one (batch, delta head) from its eviction positions alone (a stored evict):
// 1 kept, 0 allowed but dropped; last_allowed (Lq entries) must outlive the matrix. Downsampled
// by the mean, as the mask view.
HeadMatrix mask_from_evict(const int64_t* evict_bh, const int64_t* last_allowed, int64_t Lq,
                           int64_t Lk);

}  // namespace dma::viewer
