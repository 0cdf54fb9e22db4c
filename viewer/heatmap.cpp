#include "heatmap.hpp"

#include <stb_image_write.h>  // the implementation is in libstb (pkg-config imgui adds -lstb)

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>

namespace dma::viewer {

std::vector<int64_t> causal_limits(int64_t Lq, int64_t Lk, bool causal) {
  std::vector<int64_t> last(static_cast<size_t>(Lq));
  for (int64_t i = 0; i < Lq; ++i) last[i] = std::min(Lk - 1, causal ? i + (Lk - Lq) : Lk - 1);
  return last;
}

int64_t downsample_factor(int64_t n, int64_t pixels) {
  if (pixels <= 0) pixels = 1;
  return std::max<int64_t>(1, (n + pixels - 1) / pixels);
}

Downsampled downsample(const MatrixView& m, const int64_t* last_allowed, int64_t factor_r,
                       int64_t factor_c, Reduce reduce) {
  Downsampled d;
  d.factor_r = std::max<int64_t>(1, factor_r);
  d.factor_c = std::max<int64_t>(1, factor_c);
  d.rows = (m.rows + d.factor_r - 1) / d.factor_r;
  d.cols = (m.cols + d.factor_c - 1) / d.factor_c;
  const size_t n = static_cast<size_t>(d.rows * d.cols);
  d.values.assign(n, 0.0f);
  d.state.assign(n, CellState::outside);

  // One pass over the source: every allowed cell folds into its texel. A texel becomes "dropped"
  // once it has an allowed cell and "value" once it has a finite one. The mean sums in double
  // and divides at the end.
  const bool mean = reduce == Reduce::mean;
  std::vector<double> sum(mean ? n : 0);
  std::vector<int64_t> count(mean ? n : 0);
  for (int64_t r = 0; r < m.rows; ++r) {
    const int64_t last = last_allowed ? std::min(last_allowed[r], m.cols - 1) : m.cols - 1;
    float* out_v = d.values.data() + (r / d.factor_r) * d.cols;
    CellState* out_s = d.state.data() + (r / d.factor_r) * d.cols;
    const float* row = m.data + r * m.row_stride;
    for (int64_t c = 0; c <= last; ++c) {
      const int64_t t = c / d.factor_c;
      const float v = row[c];
      if (std::isnan(v)) {
        if (out_s[t] == CellState::outside) out_s[t] = CellState::dropped;
        continue;
      }
      if (mean) {
        const size_t k = static_cast<size_t>((r / d.factor_r) * d.cols + t);
        sum[k] += v;
        ++count[k];
        out_s[t] = CellState::value;
        continue;
      }
      if (out_s[t] != CellState::value) {
        out_s[t] = CellState::value;
        out_v[t] = v;
      } else if (reduce == Reduce::max ? v > out_v[t] : std::fabs(v) > std::fabs(out_v[t])) {
        out_v[t] = v;
      }
    }
  }
  if (mean)
    for (size_t k = 0; k < n; ++k)
      if (count[k]) d.values[k] = static_cast<float>(sum[k] / static_cast<double>(count[k]));
  return d;
}

const char* reduce_label(Reduce r) {
  switch (r) {
    case Reduce::max: return "max";
    case Reduce::max_abs: return "max |.|";
    case Reduce::mean: return "mean";
  }
  return "?";
}

Range value_range(const MatrixView& m, const int64_t* last_allowed) {
  bool any = false;
  Range range;
  for (int64_t r = 0; r < m.rows; ++r) {
    const int64_t last = last_allowed ? std::min(last_allowed[r], m.cols - 1) : m.cols - 1;
    for (int64_t c = 0; c <= last; ++c) {
      const float v = m.at(r, c);
      if (!std::isfinite(v)) continue;
      if (!any) {
        range.lo = range.hi = v;
        any = true;
      }
      range.lo = std::min(range.lo, v);
      range.hi = std::max(range.hi, v);
    }
  }
  return range;
}

Image colorize(const Downsampled& d, ColorMap map, float lo, float hi) {
  Image img;
  img.width = static_cast<int>(d.cols);
  img.height = static_cast<int>(d.rows);
  img.pixels.resize(d.values.size());
  for (size_t i = 0; i < d.values.size(); ++i) {
    switch (d.state[i]) {
      case CellState::outside: img.pixels[i] = kCausalGrey; break;
      case CellState::dropped: img.pixels[i] = kDroppedDark; break;
      case CellState::value: img.pixels[i] = map_value(map, d.values[i], lo, hi); break;
    }
  }
  return img;
}

bool write_png(const std::string& path, const Image& img, std::string* error) {
  if (img.width <= 0 || img.height <= 0) {
    if (error) *error = "empty image";
    return false;
  }
  const int ok = stbi_write_png(path.c_str(), img.width, img.height, 4, img.pixels.data(),
                                img.width * 4);
  if (!ok && error) *error = "cannot write " + path;
  return ok != 0;
}

bool write_csv(const std::string& path, const MatrixView& m, std::string* error) {
  std::ofstream out(path);
  if (!out) {
    if (error) *error = "cannot open " + path;
    return false;
  }
  char buf[32];
  for (int64_t r = 0; r < m.rows; ++r) {
    for (int64_t c = 0; c < m.cols; ++c) {
      if (c) out << ',';
      const float v = m.at(r, c);
      if (!std::isnan(v)) {
        std::snprintf(buf, sizeof buf, "%.9g", static_cast<double>(v));
        out << buf;
      }
    }
    out << '\n';
  }
  if (!out) {
    if (error) *error = "write failed: " + path;
    return false;
  }
  return true;
}

std::optional<Cell> cell_at(const Rect& r, int64_t rows, int64_t cols, float mx, float my) {
  if (rows <= 0 || cols <= 0 || r.w <= 0 || r.h <= 0) return std::nullopt;
  const float u = (mx - r.x) / r.w, v = (my - r.y) / r.h;
  if (!(u >= 0.0f && u < 1.0f && v >= 0.0f && v < 1.0f)) return std::nullopt;
  Cell c;
  c.row = std::min(rows - 1, static_cast<int64_t>(v * static_cast<float>(rows)));
  c.col = std::min(cols - 1, static_cast<int64_t>(u * static_cast<float>(cols)));
  return c;
}

Rect cells_rect(const Rect& r, int64_t rows, int64_t cols, int64_t r0, int64_t r1, int64_t c0,
                int64_t c1) {
  const float sy = r.h / static_cast<float>(rows), sx = r.w / static_cast<float>(cols);
  return {r.x + sx * static_cast<float>(c0), r.y + sy * static_cast<float>(r0),
          sx * static_cast<float>(c1 - c0), sy * static_cast<float>(r1 - r0)};
}

Window zoom_window(const Window& w, int64_t rows, int64_t cols, double factor, double u, double v,
                   int64_t min_cells) {
  auto axis = [&](int64_t a0, int64_t a1, int64_t n, double at, int64_t* b0, int64_t* b1) {
    const int64_t len = std::clamp<int64_t>(std::llround(static_cast<double>(a1 - a0) * factor),
                                            std::min(min_cells, n), n);
    const double anchor = static_cast<double>(a0) + at * static_cast<double>(a1 - a0);
    *b0 = std::clamp<int64_t>(std::llround(anchor - at * static_cast<double>(len)), 0, n - len);
    *b1 = *b0 + len;
  };
  Window out;
  axis(w.r0, w.r1, rows, v, &out.r0, &out.r1);
  axis(w.c0, w.c1, cols, u, &out.c0, &out.c1);
  return out;
}

Window pan_window(const Window& w, int64_t rows, int64_t cols, int64_t dr, int64_t dc) {
  Window out = w;
  const int64_t r0 = std::clamp<int64_t>(w.r0 + dr, 0, rows - w.rows());
  const int64_t c0 = std::clamp<int64_t>(w.c0 + dc, 0, cols - w.cols());
  out.r0 = r0;
  out.r1 = r0 + w.rows();
  out.c0 = c0;
  out.c1 = c0 + w.cols();
  return out;
}

std::vector<int64_t> window_limits(const int64_t* last_allowed, const Window& w) {
  std::vector<int64_t> out(static_cast<size_t>(w.rows()));
  for (int64_t r = w.r0; r < w.r1; ++r)
    out[r - w.r0] = std::max<int64_t>(-1, std::min(last_allowed[r], w.c1 - 1) - w.c0);
  return out;
}

Rect fit_rect(const Rect& avail, int64_t rows, int64_t cols) {
  if (rows <= 0 || cols <= 0) return {avail.x, avail.y, 0, 0};
  const float aspect = static_cast<float>(cols) / static_cast<float>(rows);
  // A very narrow matrix (e.g. Lq x D with D = 32) would be a sliver at square cells: stretch it
  // to at least a quarter of the space's width instead.
  float w = avail.w, h = avail.w / aspect;
  if (h > avail.h) {
    h = avail.h;
    w = avail.h * aspect;
  }
  w = std::max(w, std::min(avail.w, avail.w * 0.25f));
  // A very wide one (e.g. one query against 2048 keys) would be a line: give every row at least
  // 8 pixels, up to a quarter of the height, so it can still be seen and hovered.
  h = std::max(h, std::min(avail.h * 0.25f, 8.0f * static_cast<float>(rows)));
  h = std::min(h, avail.h);
  return {avail.x + 0.5f * (avail.w - w), avail.y, w, h};  // centred across, top-aligned
}

}  // namespace dma::viewer
