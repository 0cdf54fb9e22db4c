// The inspector's pure helpers, without any ImGui context or GL: colour maps, downsampling,
// hover mapping, tile classification (checked against the counters of dma::tiled_forward) and
// the little formatters.
#include <doctest/doctest.h>
#include <stb_image.h>  // the implementation is in libstb

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "colormap.hpp"
#include "dma/mask.hpp"
#include "dma/tiled.hpp"
#include "format.hpp"
#include "heatmap.hpp"
#include "labels.hpp"
#include "tiles.hpp"
#include "view_data.hpp"

using namespace dma::viewer;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

int luminance(const Rgba& c) { return 299 * c.r + 587 * c.g + 114 * c.b; }

std::vector<float> random_delta(std::mt19937& rng, int64_t n, bool ties) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> d(static_cast<size_t>(n));
  for (float& x : d) x = ties ? std::round(normal(rng)) : normal(rng);  // ties: few values
  return d;
}

}  // namespace

TEST_SUITE("gui") {

TEST_CASE("viridis: matplotlibs end points - rising luminance - clamped") {
  CHECK(viridis(0.0f) == Rgba{0x44, 0x01, 0x54, 255});
  CHECK(viridis(0.5f) == Rgba{0x21, 0x91, 0x8c, 255});
  CHECK(viridis(1.0f) == Rgba{0xfd, 0xe7, 0x25, 255});
  CHECK(viridis(-3.0f) == viridis(0.0f));
  CHECK(viridis(7.0f) == viridis(1.0f));
  CHECK(viridis(kNaN) == viridis(0.0f));
  for (int i = 1; i <= 100; ++i)
    CHECK(luminance(viridis(i / 100.0f)) >= luminance(viridis((i - 1) / 100.0f)));
}

TEST_CASE("diverging: white at 0 - blue below - red above - symmetric luminance") {
  const Rgba mid = diverging(0.0f);
  CHECK(mid == Rgba{0xf7, 0xf7, 0xf7, 255});
  CHECK(diverging(-1.0f).b > diverging(-1.0f).r);
  CHECK(diverging(1.0f).r > diverging(1.0f).b);
  CHECK(diverging(kNaN) == mid);
  for (int i = 1; i <= 10; ++i) {  // darker the further from 0, on both sides
    CHECK(luminance(diverging(i / 10.0f)) <= luminance(diverging((i - 1) / 10.0f)));
    CHECK(luminance(diverging(-i / 10.0f)) <= luminance(diverging(-(i - 1) / 10.0f)));
  }
  // map_value: the diverging map is symmetric around 0 whatever lo and hi are.
  CHECK(map_value(ColorMap::diverging, 0.0f, -1.0f, 5.0f) == mid);
  CHECK(map_value(ColorMap::diverging, 5.0f, -1.0f, 5.0f) == diverging(1.0f));
  CHECK(map_value(ColorMap::diverging, -5.0f, -1.0f, 5.0f) == diverging(-1.0f));
  CHECK(map_value(ColorMap::viridis, 3.0f, 2.0f, 4.0f) == viridis(0.5f));
  CHECK(map_value(ColorMap::viridis, 3.0f, 3.0f, 3.0f) == viridis(0.0f));  // empty range
}

TEST_CASE("head hues are distinct") {
  for (int a = 0; a < 16; ++a)
    for (int b = a + 1; b < 16; ++b) {
      const Rgba x = head_hue(a, 16), y = head_hue(b, 16);
      CHECK(std::abs(x.r - y.r) + std::abs(x.g - y.g) + std::abs(x.b - y.b) > 20);
    }
}

TEST_CASE("downsample factor: ceil(n / pixels) - at least 1") {
  CHECK(downsample_factor(256, 512) == 1);
  CHECK(downsample_factor(512, 512) == 1);
  CHECK(downsample_factor(513, 512) == 2);
  CHECK(downsample_factor(2048, 500) == 5);
  CHECK(downsample_factor(10, 0) == 10);
}

TEST_CASE("max-downsampling keeps the block maximum - and the sign of the largest magnitude") {
  // 4 x 6, blocks of 2 x 3.
  const std::vector<float> m = {0, 1, 0, /**/ 0, 0, 0,   //
                                0, 0, 0, /**/ 0, -9, 2,  //
                                5, 0, 0, /**/ 0, 0, 0,   //
                                0, 0, 7, /**/ 3, 0, 0};
  const MatrixView v{m.data(), 4, 6, 6};
  const Downsampled d = downsample(v, nullptr, 2, 3, Reduce::max);
  REQUIRE(d.rows == 2);
  REQUIRE(d.cols == 2);
  CHECK(d.values == std::vector<float>{1, 2, 7, 3});
  const Downsampled a = downsample(v, nullptr, 2, 3, Reduce::max_abs);
  CHECK(a.values == std::vector<float>{1, -9, 7, 3});
  for (CellState s : a.state) CHECK(s == CellState::value);

  // Factor 1 is the identity; sizes that do not divide get a partial last block.
  const Downsampled same = downsample(v, nullptr, 1, 1, Reduce::max);
  CHECK(same.values == m);
  const Downsampled odd = downsample(v, nullptr, 3, 4, Reduce::max);
  CHECK(odd.rows == 2);
  CHECK(odd.cols == 2);
  CHECK(odd.values == std::vector<float>{5, 2, 7, 0});
}

TEST_CASE("downsampling: a single kept cell is never averaged away") {
  std::vector<float> m(1000 * 1000, 0.0f);
  m[617 * 1000 + 421] = 1.0f;
  const Downsampled d = downsample({m.data(), 1000, 1000, 1000}, nullptr, 7, 9, Reduce::max);
  CHECK(d.values[(617 / 7) * d.cols + 421 / 9] == 1.0f);
  int ones = 0;
  for (float x : d.values) ones += x == 1.0f;
  CHECK(ones == 1);
}

TEST_CASE("downsampling a 0/1 mask: the fraction kept per block, not the maximum") {
  // 2048 x 2048, causal, sliding window w = 64 (a = 0): query i keeps keys i-63..i.
  const int64_t L = 2048, w = 64, f = 16;
  const std::vector<int64_t> last = causal_limits(L, L, true);
  std::vector<float> m(static_cast<size_t>(L * L), 0.0f);
  for (int64_t i = 0; i < L; ++i)
    for (int64_t j = std::max<int64_t>(0, i - w + 1); j <= i; ++j) m[i * L + j] = 1.0f;
  const MatrixView v{m.data(), L, L, L};

  // The maximum: every texel that touches the band is "kept", so the thumbnail reads solid.
  const Downsampled mx = downsample(v, last.data(), f, f, Reduce::max);
  const Downsampled mean = downsample(v, last.data(), f, f, Reduce::mean);
  REQUIRE(mean.rows == L / f);
  REQUIRE(mean.cols == L / f);
  CHECK(std::string(reduce_label(Reduce::mean)) == "mean");
  int64_t max_ones = 0, mean_ones = 0;
  for (size_t k = 0; k < mean.values.size(); ++k) {
    if (mean.state[k] != CellState::value) continue;
    max_ones += mx.values[k] == 1.0f;
    mean_ones += mean.values[k] == 1.0f;
    CHECK(mean.values[k] >= 0.0f);
    CHECK(mean.values[k] <= 1.0f);
  }
  CHECK(max_ones > 4 * (L / f));  // the band, 5 texels wide, all at 1
  CHECK(mean_ones <= 4 * (L / f));  // only the texels wholly inside the band

  // Per texel row: the mean weighted by the allowed cells per texel is kept / allowed = w / (i+1)
  // averaged over the block, i.e. about w / allowed, far from 1.
  for (int64_t R : {int64_t{8}, int64_t{40}, int64_t{127}}) {
    double kept = 0, allowed = 0;
    for (int64_t C = 0; C < mean.cols; ++C) {
      int64_t n = 0;  // allowed cells in texel (R, C)
      for (int64_t i = R * f; i < (R + 1) * f; ++i)
        n += std::max<int64_t>(0, std::min(last[i], (C + 1) * f - 1) - C * f + 1);
      if (n == 0) {
        CHECK(mean.state[R * mean.cols + C] == CellState::outside);
        continue;
      }
      kept += mean.values[R * mean.cols + C] * static_cast<double>(n);
      allowed += static_cast<double>(n);
    }
    CHECK(kept == doctest::Approx(static_cast<double>(w * f)).epsilon(1e-5));
    double expect_allowed = 0;
    for (int64_t i = R * f; i < (R + 1) * f; ++i) expect_allowed += static_cast<double>(i + 1);
    CHECK(allowed == doctest::Approx(expect_allowed));
    CHECK(kept / allowed == doctest::Approx(static_cast<double>(w * f) / expect_allowed).epsilon(1e-5));
    CHECK(kept / allowed < 0.5);
  }
  // Far from the diagonal nothing is kept: 0, not 1; on the diagonal everything allowed is kept.
  CHECK(mean.values[100 * mean.cols + 10] == 0.0f);
  CHECK(mean.values[100 * mean.cols + 100] == 1.0f);
  // A texel four blocks left of the diagonal holds part of the band: a fraction strictly between.
  CHECK(mean.values[100 * mean.cols + 96] > 0.0f);
  CHECK(mean.values[100 * mean.cols + 96] < 1.0f);
  CHECK(mx.values[100 * mean.cols + 96] == 1.0f);
}

TEST_CASE("mean-downsampling skips NaN cells and keeps the states") {
  const std::vector<float> m = {1, 0, kNaN, kNaN,  //
                                0, 0, kNaN, 1};
  const Downsampled d = downsample({m.data(), 2, 4, 4}, nullptr, 2, 2, Reduce::mean);
  REQUIRE(d.values.size() == 2);
  CHECK(d.values[0] == doctest::Approx(0.25));
  CHECK(d.values[1] == doctest::Approx(1.0));
  CHECK(d.state[1] == CellState::value);
  const std::vector<float> none = {kNaN, kNaN};
  const Downsampled e = downsample({none.data(), 1, 2, 2}, nullptr, 1, 2, Reduce::mean);
  CHECK(e.state[0] == CellState::dropped);
}

TEST_CASE("downsampling: causal region and dropped cells") {
  // 4 queries x 4 keys, causal: row i sees keys 0..i. NaN = dropped.
  const std::vector<int64_t> last = causal_limits(4, 4, true);
  CHECK(last == std::vector<int64_t>{0, 1, 2, 3});
  CHECK(causal_limits(2, 4, true) == std::vector<int64_t>{2, 3});  // bottom-right aligned
  CHECK(causal_limits(2, 4, false) == std::vector<int64_t>{3, 3});
  const std::vector<float> m = {1,    9, 9, 9,  //
                                kNaN, 2, 9, 9,  //
                                kNaN, kNaN, 3, 9,  //
                                kNaN, kNaN, kNaN, 4};
  const MatrixView v{m.data(), 4, 4, 4};
  const Downsampled d = downsample(v, last.data(), 1, 1, Reduce::max);
  CHECK(d.state[1] == CellState::outside);  // j > p_i: the 9s are never read
  CHECK(d.state[4] == CellState::dropped);
  CHECK(d.state[5] == CellState::value);
  const Downsampled b = downsample(v, last.data(), 2, 2, Reduce::max);
  CHECK(b.state == std::vector<CellState>{CellState::value, CellState::outside, CellState::dropped,
                                          CellState::value});
  CHECK(b.values[0] == 2.0f);
  const Image img = colorize(b, ColorMap::viridis, 0, 4);
  CHECK(img.width == 2);
  CHECK(img.pixels[1] == kCausalGrey);
  CHECK(img.pixels[2] == kDroppedDark);
  CHECK(img.pixels[3] == viridis(1.0f));
  const Range r = value_range(v, last.data());
  CHECK(r.lo == 1.0f);
  CHECK(r.hi == 4.0f);  // the 9s lie outside the causal region
}

TEST_CASE("hover mapping: screen point <-> cell - whatever the drawn size") {
  const Rect r{100, 50, 400, 200};
  CHECK_FALSE(cell_at(r, 10, 20, 99.9f, 60).has_value());
  CHECK_FALSE(cell_at(r, 10, 20, 500.0f, 60).has_value());  // right edge is exclusive
  CHECK_FALSE(cell_at(r, 10, 20, 200, 250.0f).has_value());
  CHECK(*cell_at(r, 10, 20, 100, 50) == Cell{0, 0});
  CHECK(*cell_at(r, 10, 20, 499.9f, 249.9f) == Cell{9, 19});
  CHECK(*cell_at(r, 10, 20, 100 + 20 * 3.5f, 50 + 20 * 7.2f) == Cell{7, 3});
  // Round trip on many sizes, including more cells than pixels.
  std::mt19937 rng(7);
  for (int t = 0; t < 200; ++t) {
    const int64_t rows = 1 + rng() % 3000, cols = 1 + rng() % 3000;
    const Rect box{static_cast<float>(rng() % 50), static_cast<float>(rng() % 50),
                   50.0f + rng() % 900, 50.0f + rng() % 900};
    const Cell c{static_cast<int64_t>(rng() % rows), static_cast<int64_t>(rng() % cols)};
    const Rect cr = cells_rect(box, rows, cols, c.row, c.row + 1, c.col, c.col + 1);
    const auto back = cell_at(box, rows, cols, cr.x + 0.5f * cr.w, cr.y + 0.5f * cr.h);
    REQUIRE(back.has_value());
    CHECK(std::llabs(back->row - c.row) <= (rows > 400 ? 1 : 0));  // float rounding at > 1 cell/px
    CHECK(std::llabs(back->col - c.col) <= (cols > 400 ? 1 : 0));
  }
}

TEST_CASE("zoom windows: around a point - clamped - at least a few cells - limits relative") {
  const Window all = full_window(100, 200);
  const Window in = zoom_window(all, 100, 200, 0.5, 0.5, 0.5);
  CHECK(in == Window{25, 75, 50, 150});  // the centre stays the centre
  const Window corner = zoom_window(all, 100, 200, 0.5, 0.0, 0.0);
  CHECK(corner == Window{0, 50, 0, 100});  // the top-left corner stays put
  const Window edge = zoom_window(in, 100, 200, 0.5, 1.0, 1.0);
  CHECK(edge.r1 == 75);
  CHECK(edge.c1 == 150);
  CHECK(zoom_window(in, 100, 200, 4.0, 0.3, 0.7) == all);  // out past the whole: the whole
  const Window tiny = zoom_window(all, 100, 200, 1e-6, 0.5, 0.5);
  CHECK(tiny.rows() == 4);
  CHECK(tiny.cols() == 4);
  CHECK(pan_window(in, 100, 200, -1000, 7) == Window{0, 50, 57, 157});
  CHECK(pan_window(in, 100, 200, 1000, 1000) == Window{50, 100, 100, 200});
  // Causal limits of rows 2..4, window cols 1..3: p = 0, 3, 9 -> -1 (none), 2, 2.
  const int64_t last[] = {0, 1, 0, 3, 9};
  CHECK(window_limits(last, Window{2, 5, 1, 4}) == std::vector<int64_t>{-1, 2, 2});
}

TEST_CASE("fit_rect: square cells - inside the space - narrow matrices widened") {
  const Rect avail{10, 20, 800, 600};
  const Rect sq = fit_rect(avail, 256, 256);
  CHECK(sq.w == doctest::Approx(600));
  CHECK(sq.h == doctest::Approx(600));
  CHECK(sq.x == doctest::Approx(10 + 100));
  const Rect wide = fit_rect(avail, 100, 400);
  CHECK(wide.w == doctest::Approx(800));
  CHECK(wide.h == doctest::Approx(200));
  const Rect narrow = fit_rect(avail, 2048, 32);  // Lq x D
  CHECK(narrow.w >= 200 - 1e-3);
  CHECK(narrow.h <= 600 + 1e-3);
}

TEST_CASE("tile classification matches the counters of the tiled implementation") {
  std::mt19937 rng(12345);
  struct Case { int64_t Lq, Lk, w, Bq, Bk; bool causal, ties, structured; };
  const Case cases[] = {{64, 64, 8, 16, 16, true, false, false},
                        {50, 77, 5, 16, 8, true, true, false},
                        {77, 77, 100, 32, 32, true, false, false},   // w >= Lk
                        {40, 96, 1, 8, 16, true, false, true},       // w = 1
                        {33, 65, 12, 16, 16, false, false, false},   // non-causal
                        {128, 256, 16, 32, 32, true, false, true}};  // structured: tiles skip
  for (const Case& c : cases) {
    CAPTURE(c.Lq);
    CAPTURE(c.Lk);
    CAPTURE(c.w);
    CAPTURE(c.causal);
    dma::Shape s;
    s.B = 2; s.Hq = 4; s.Hkv = 2; s.Hd = 2; s.Lq = c.Lq; s.Lk = c.Lk; s.D = 4;
    dma::Options opt;
    opt.window = c.w;
    opt.causal = c.causal;
    std::vector<float> delta = random_delta(rng, s.delta_numel(), c.ties);
    if (c.structured)  // a ramp: recent keys rank higher, so old tiles hold no kept key
      for (int64_t n = 0; n < s.delta_numel(); ++n) delta[n] = static_cast<float>(n % s.Lk);
    const std::vector<int64_t> evict = dma::evict_positions(s, c.w, delta);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> q(s.q_numel()), k(s.kv_numel()), v(s.kv_numel());
    for (auto* t : {&q, &k, &v})
      for (float& x : *t) x = normal(rng);

    // What the viewer draws, summed over (b, hq) as the counters are.
    int64_t dense = 0, skipped = 0, gathered = 0, max_cand = 0;
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t hq = 0; hq < s.Hq; ++hq) {
        const int64_t* e = evict.data() + (b * s.Hd + s.delta_head(hq)) * s.Lk;
        const TileGrid g = classify_tiles(e, s.Lq, s.Lk, c.causal, c.Bq, c.Bk);
        dense += g.count(TileClass::visited) + g.count(TileClass::skipped);
        skipped += g.count(TileClass::skipped);
        for (int64_t qt = 0; qt < g.query_tiles; ++qt) {
          gathered += g.candidates[qt];
          max_cand = std::max(max_cand, g.candidates[qt]);
          const int64_t q0 = qt * c.Bq, q1 = std::min(s.Lq, q0 + c.Bq) - 1;
          const std::vector<int64_t> keys = gathered_keys(e, s.Lq, s.Lk, c.causal, q0, q1);
          CHECK(keys == dma::candidate_keys(s, opt, e, q0, q1));
          CHECK(static_cast<int64_t>(keys.size()) == g.candidates[qt]);
          CHECK(static_cast<int64_t>(keys.size()) <= c.w + (q1 - q0 + 1));
          for (int64_t kt = 0; kt < g.key_tiles; ++kt) {
            const int64_t k0 = kt * c.Bk, k1 = std::min(s.Lk, k0 + c.Bk) - 1;
            if (g.at(qt, kt) != TileClass::outside)
              CHECK((g.at(qt, kt) == TileClass::visited) ==
                    dma::tile_has_kept_key(s, opt, e, q0, q1, k0, k1));
          }
        }
      }
    for (dma::TileMode mode : {dma::TileMode::dense, dma::TileMode::skip, dma::TileMode::gather}) {
      dma::TileCounters counters;
      dma::tiled_forward(s, opt, dma::TileConfig{c.Bq, c.Bk, mode}, q, k, v, delta, evict,
                         &counters);
      CHECK(counters.tiles_dense == dense);
      if (mode == dma::TileMode::skip) CHECK(counters.tiles_skipped == skipped);
      if (mode == dma::TileMode::gather) {
        CHECK(counters.keys_gathered == gathered);
        CHECK(counters.max_candidates == max_cand);
      }
    }
    if (c.structured) CHECK(skipped > 0);
  }
}

TEST_CASE("key facts agree with the explicit mask") {
  std::mt19937 rng(99);
  for (bool causal : {true, false}) {
    dma::Shape s;
    s.Lq = 40; s.Lk = 60; s.Hq = s.Hkv = s.Hd = 1;
    dma::Options opt;
    opt.window = 9;
    opt.causal = causal;
    const std::vector<float> delta = random_delta(rng, s.Lk, true);  // heavy ties
    const std::vector<int64_t> evict = dma::evict_positions(s, opt.window, delta);
    const std::vector<uint8_t> mask = dma::explicit_mask(s, opt, delta);
    for (int64_t i = 0; i < s.Lq; ++i) {
      int64_t kept = 0;
      for (int64_t j = 0; j < s.Lk; ++j) {
        const KeyFacts f = key_facts(delta.data(), evict.data(), s.Lq, s.Lk, causal, i, j);
        CHECK(f.kept == (mask[i * s.Lk + j] != 0));
        if (f.allowed) CHECK((f.rank <= opt.window) == f.kept);  // kept = ranked in the top w
        if (f.kept) CHECK(delta[j] >= f.threshold);
        kept += f.kept;
      }
      const KeyFacts f = key_facts(delta.data(), evict.data(), s.Lq, s.Lk, causal, i, 0);
      CHECK(f.kept_keys == kept);
      CHECK(f.kept_keys == std::min<int64_t>(opt.window, f.allowed_keys));
    }
  }
}

TEST_CASE("head matrices: dropped cells carry no value - ranges are robust") {
  dma::viewer::Views v;
  dma::Shape& s = v.shape;
  s.Lq = 3; s.Lk = 4; s.Hq = s.Hkv = s.Hd = 1; s.D = 2;
  v.opt.window = 2;
  v.delta = {1, 5, 3, 4};
  v.evict = dma::evict_positions(s, 2, v.delta);
  v.mask = dma::explicit_mask(s, v.opt, v.delta);
  v.last_allowed = causal_limits(3, 4, true);  // p = 1, 2, 3
  v.probs.assign(12, 0.0f);
  v.o = {1, 2, 3, 4, 5, 6};
  const HeadMatrix m = head_matrix(v, nullptr, ViewKind::delta, DiffTensor::o, 0, 0, false);
  REQUIRE(m.valid);
  CHECK(m.map == ColorMap::diverging);
  CHECK(m.range.lo == -m.range.hi);
  // Query 0 (p = 1) keeps keys 0 and 1; query 2 (p = 3) keeps keys 1 and 3 (delta 5 and 4).
  CHECK(m.values[0] == 1.0f);
  CHECK(std::isnan(m.values[2 * 4 + 0]));
  CHECK(m.values[2 * 4 + 3] == 4.0f);
  const HeadMatrix mask = head_matrix(v, nullptr, ViewKind::mask, DiffTensor::o, 0, 0, false);
  CHECK(mask.values[2 * 4 + 2] == 0.0f);
  CHECK(mask.range.hi == 1.0f);
  const HeadMatrix ds = head_matrix(v, nullptr, ViewKind::ds, DiffTensor::o, 0, 0, false);
  CHECK_FALSE(ds.valid);  // no backward
  const HeadMatrix diff = head_matrix(v, nullptr, ViewKind::diff, DiffTensor::o, 0, 0, false);
  CHECK_FALSE(diff.valid);  // nothing to compare
  dma::viewer::Comparison cmp;
  cmp.label = "test";
  cmp.o = {1, 2, 3, 4.5f, 5, 6};
  const HeadMatrix d2 = head_matrix(v, &cmp, ViewKind::diff, DiffTensor::o, 0, 0, false);
  REQUIRE(d2.valid);
  CHECK(d2.rows == 3);
  CHECK(d2.cols == 2);
  CHECK(d2.values[3] == doctest::Approx(0.5f));
  int64_t rows = 0, cols = 0;
  view_dims(s, ViewKind::diff, DiffTensor::dk, &rows, &cols);
  CHECK(rows == 4);
  CHECK(cols == 2);
}

TEST_CASE("durations in adaptive units") {
  CHECK(format_duration(0.00085) == "850 ns");
  CHECK(format_duration(0.0124) == "12.4 us");
  CHECK(format_duration(3.214) == "3.21 ms");
  CHECK(format_duration(1520.0) == "1.52 s");
  CHECK(format_duration(0.99996) == "1.00 ms");  // rounds up into the next unit
  CHECK(format_duration(-1) == "-");
  CHECK(format_count(1234567) == "1,234,567");
  CHECK(format_count(12) == "12");
  CHECK(format_percent(0.125) == "12.5%");
  CHECK(format_speedup(3.4217) == "x3.42");
  CHECK(format_speedup(0) == "-");
}

TEST_CASE("export: PNG at data resolution and CSV") {
  const auto dir = std::filesystem::temp_directory_path() / "dma_test_viewer_export";
  std::filesystem::create_directories(dir);
  const std::vector<float> m = {0, 0.5f, kNaN, 1, 2, 3};
  const MatrixView v{m.data(), 2, 3, 3};
  const Image img = colorize(downsample(v, nullptr, 1, 1, Reduce::max), ColorMap::viridis, 0, 3);
  const std::string png = (dir / "m.png").string();
  REQUIRE(write_png(png, img));
  int w = 0, h = 0, n = 0;
  unsigned char* px = stbi_load(png.c_str(), &w, &h, &n, 4);
  REQUIRE(px);
  CHECK(w == 3);
  CHECK(h == 2);
  CHECK(px[0] == 0x44);  // viridis(0)
  CHECK(px[2 * 4 + 0] == kDroppedDark.r);
  stbi_image_free(px);

  const std::string csv = (dir / "m.csv").string();
  REQUIRE(write_csv(csv, v));
  std::ifstream in(csv);
  std::stringstream text;
  text << in.rdbuf();
  CHECK(text.str() == "0,0.5,\n1,2,3\n");
  std::string err;
  CHECK_FALSE(write_csv((dir / "no" / "such" / "dir.csv").string(), v, &err));
  CHECK(!err.empty());
  std::filesystem::remove_all(dir);
}

TEST_CASE("labels: lines, tokens.txt and roles.txt of the right length - or a clear error") {
  CHECK(split_lines("a\nb\n") == std::vector<std::string>{"a", "b"});
  CHECK(split_lines("a\r\nb") == std::vector<std::string>{"a", "b"});
  CHECK(split_lines("a\n\nc\n") == std::vector<std::string>{"a", "", "c"});
  CHECK(split_lines("").empty());

  const std::string tokens = "the\ncat\n\xc3\xa9t\xc3\xa9\nsat\n", roles = "filler\nkey\nvalue\nquery\n";
  const TokenLabels ok = parse_labels(&tokens, &roles, 4);
  CHECK(ok.error.empty());
  REQUIRE(ok.tokens.size() == 4);
  CHECK(ok.tokens[2] == "\xc3\xa9t\xc3\xa9");  // UTF-8 kept as is
  CHECK(ok.roles == std::vector<Role>{Role::filler, Role::key, Role::value, Role::query});

  const TokenLabels few = parse_labels(&tokens, nullptr, 5);
  CHECK(few.tokens.empty());
  CHECK(few.error == "tokens.txt has 4 lines, expected Lk = 5 (one per key); not used.");
  const std::string bad_roles = "filler\nkey\nvalu\nquery";
  const TokenLabels bad = parse_labels(&tokens, &bad_roles, 4);
  CHECK(bad.tokens.size() == 4);  // the tokens still label the axes
  CHECK(bad.roles.empty());
  CHECK(bad.error.find("roles.txt line 3: \"valu\" is not key, value, query or filler") == 0);
  CHECK(parse_labels(nullptr, nullptr, 4).error.empty());

  // Axis labels: the token at the position, quoted, with its role.
  CHECK(axis_label("query", 180, nullptr, 180) == "query 180");
  CHECK(axis_label("key", 1, &ok, 1) == "key 1 \"cat\" (key)");
  CHECK(axis_label("query", 0, &ok, 3) == "query 0 \"sat\" (query)");
  CHECK(axis_label("key", 9, &ok, 9) == "key 9");  // beyond the labels: the index only
  CHECK(printable_token("a\tb\"\x01") == "a\\tb\\\"\\x01");
  const std::string long_token(30, 'x');
  const std::string cut = printable_token(long_token + "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9");
  CHECK(cut == long_token + "\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9\xc3\xa9...");  // never mid-character
}

TEST_CASE("labels: read from a bundle folder, missing files are fine") {
  const auto dir = std::filesystem::temp_directory_path() / "dma_test_viewer_labels";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  CHECK(read_labels(dir.string(), 3).error.empty());
  std::ofstream(dir / "tokens.txt") << "x\ny\n";
  const TokenLabels l = read_labels(dir.string(), 3);
  CHECK(l.tokens.empty());
  CHECK(l.error.find("tokens.txt has 2 lines, expected Lk = 3") == 0);
  std::ofstream(dir / "tokens.txt") << "x\ny\nz\n";
  CHECK(read_labels(dir.string(), 3).tokens.size() == 3);
  std::filesystem::remove_all(dir);
}

TEST_CASE("selection statistics: role shares and mean distance from the eviction positions") {
  // A causal sliding window of w = 2 over 8 tokens: key j is kept by positions j and j + 1.
  std::vector<int64_t> evict(8);
  for (int64_t j = 0; j < 8; ++j) evict[j] = j + 1;
  const std::vector<Role> roles = {Role::key,    Role::value,  Role::filler, Role::filler,
                                   Role::filler, Role::filler, Role::query,  Role::filler};
  const SelectionStats s = selection_stats(evict.data(), 8, 8, true, &roles);
  CHECK(s.kept == 15);  // 1 + 2 * 7
  CHECK(s.mean_distance == doctest::Approx(7.0 / 15.0));
  CHECK(s.has_roles);
  CHECK(s.per_role[static_cast<int>(Role::key)] == 2);    // by queries 0 and 1
  CHECK(s.per_role[static_cast<int>(Role::value)] == 2);  // by 1 and 2
  CHECK(s.per_role[static_cast<int>(Role::query)] == 2);
  CHECK(s.per_role[static_cast<int>(Role::filler)] == 9);
  CHECK(s.key_value_share() == doctest::Approx(4.0 / 15.0));
  // Without roles: only counts and distances; roles of the wrong length are ignored.
  const std::vector<Role> short_roles(3, Role::key);
  const SelectionStats n = selection_stats(evict.data(), 8, 8, true, &short_roles);
  CHECK_FALSE(n.has_roles);
  CHECK(n.kept == 15);
  CHECK(n.share(Role::key) == 0);
  // Fewer queries than keys: query i sits at position i + Lk - Lq.
  const SelectionStats q = selection_stats(evict.data(), 2, 8, true, nullptr);
  CHECK(q.kept == 4);
  CHECK(q.mean_distance == doctest::Approx(0.5));
}

TEST_CASE("mask_from_evict: the kept mask of a stored evict, downsampled by the mean") {
  std::vector<int64_t> evict(8);
  for (int64_t j = 0; j < 8; ++j) evict[j] = j + 1;
  const std::vector<int64_t> last = causal_limits(8, 8, true);
  const HeadMatrix m = mask_from_evict(evict.data(), last.data(), 8, 8);
  REQUIRE(m.valid);
  CHECK(m.binary);
  CHECK(m.reduce == Reduce::mean);
  CHECK(m.values[3 * 8 + 3] == 1.0f);
  CHECK(m.values[3 * 8 + 2] == 1.0f);
  CHECK(m.values[3 * 8 + 1] == 0.0f);
  CHECK(std::isnan(m.values[3 * 8 + 4]));  // after the query's position
}

}  // TEST_SUITE
