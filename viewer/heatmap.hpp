// Heatmap helpers: max-downsampling, colouring into an RGBA image, and the mapping between screen
// positions and matrix cells. Pure: no ImGui, no GL, so the tests run them without a context.
//
// A heatmap shows an R x C matrix (queries x keys, or rows x head dim). When there are more cells
// than pixels, blocks of fr x fc cells become one texel holding the block's maximum (for signed
// data: the value of largest magnitude), so a single kept key or a single large gradient is never
// averaged away; or, for 0/1 data (the kept mask), the block's mean over its allowed cells: the
// fraction kept, so a band of w kept keys among 2048 does not turn the whole thumbnail "kept". Cells that carry no value are NaN ("dropped": allowed but not kept); cells beyond
// a row's last allowed column (j > p_i under the causal rule) are "outside" and drawn grey.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "colormap.hpp"

namespace dma::viewer {

// A row-major matrix of floats that someone else owns. NaN = no value at that cell.
struct MatrixView {
  const float* data = nullptr;
  int64_t rows = 0, cols = 0;
  int64_t row_stride = 0;  // elements between rows (>= cols)
  float at(int64_t r, int64_t c) const { return data[r * row_stride + c]; }
};

// last_allowed[r] is the last column row r may see (-1: none); nullptr means every column.
// For queries under the causal rule this is p_i = i + (Lk - Lq) (docs/design.md §1.2).
std::vector<int64_t> causal_limits(int64_t Lq, int64_t Lk, bool causal);

// max: the largest value; max_abs: the value of largest magnitude; mean: the mean of the finite
// allowed values (for a 0/1 mask, the fraction of allowed cells kept).
enum class Reduce { max, max_abs, mean };
const char* reduce_label(Reduce r);  // "max", "max |.|", "mean"


enum class CellState : uint8_t { value, dropped, outside };

struct Downsampled {
  int64_t rows = 0, cols = 0;          // texels
  int64_t factor_r = 1, factor_c = 1;  // source cells per texel along each axis
  std::vector<float> values;           // rows*cols; meaningful where state == value
  std::vector<CellState> state;
};

// The smallest integer factor that fits n cells into `pixels` texels: ceil(n / pixels), >= 1.
// Integer factors keep every texel an exact block, and change only at discrete sizes, so a window
// resize rarely rebuilds a texture.
int64_t downsample_factor(int64_t n, int64_t pixels);

Downsampled downsample(const MatrixView& m, const int64_t* last_allowed, int64_t factor_r,
                       int64_t factor_c, Reduce reduce);

// Lowest and highest finite value over allowed cells (0, 0 when there is none).
struct Range {
  float lo = 0, hi = 0;
};
Range value_range(const MatrixView& m, const int64_t* last_allowed);

struct Image {
  int width = 0, height = 0;
  std::vector<Rgba> pixels;  // row-major, top row first
};

Image colorize(const Downsampled& d, ColorMap map, float lo, float hi);

// Writes an image as PNG (stb_image_write). Returns false and sets *error on failure.
bool write_png(const std::string& path, const Image& img, std::string* error = nullptr);

// Writes a matrix as CSV, one row per line; NaN cells are written as empty fields.
bool write_csv(const std::string& path, const MatrixView& m, std::string* error = nullptr);

// ---- screen <-> cell -------------------------------------------------------------------------

struct Rect {
  float x = 0, y = 0, w = 0, h = 0;
};
struct Cell {
  int64_t row = 0, col = 0;
  bool operator==(const Cell& o) const { return row == o.row && col == o.col; }
};

// The cell under the point (mx, my) when a rows x cols matrix is drawn stretched over `r`;
// nothing when the point is outside. Works in data cells, whatever the texture's resolution.
std::optional<Cell> cell_at(const Rect& r, int64_t rows, int64_t cols, float mx, float my);

// The screen rectangle of rows [r0, r1) x cols [c0, c1).
Rect cells_rect(const Rect& r, int64_t rows, int64_t cols, int64_t r0, int64_t r1, int64_t c0,
                int64_t c1);

// ---- zoom ------------------------------------------------------------------------------------

// The part of a matrix on screen: rows [r0, r1) x cols [c0, c1).
struct Window {
  int64_t r0 = 0, r1 = 0, c0 = 0, c1 = 0;
  int64_t rows() const { return r1 - r0; }
  int64_t cols() const { return c1 - c0; }
  bool operator==(const Window& o) const {
    return r0 == o.r0 && r1 == o.r1 && c0 == o.c0 && c1 == o.c1;
  }
};
inline Window full_window(int64_t rows, int64_t cols) { return {0, rows, 0, cols}; }

// Scales the window by `factor` (< 1 zooms in) on both axes, keeping the data point at fraction
// (u, v) of it (the cursor) where it is; at least min_cells per axis, clamped inside the matrix.
Window zoom_window(const Window& w, int64_t rows, int64_t cols, double factor, double u, double v,
                   int64_t min_cells = 4);
// Moves the window by (dr, dc) cells, clamped inside the matrix.
Window pan_window(const Window& w, int64_t rows, int64_t cols, int64_t dr, int64_t dc);
// The causal limits of the window's rows, relative to its first column (-1: none visible).
std::vector<int64_t> window_limits(const int64_t* last_allowed, const Window& w);

// The largest rectangle of aspect cols:rows (square cells) that fits `avail`, centred across
// and top-aligned.
// A very narrow matrix (rows x D) is widened to at least a quarter of the space.
Rect fit_rect(const Rect& avail, int64_t rows, int64_t cols);

}  // namespace dma::viewer
