// Colour maps for the heatmaps. Pure functions: no ImGui, no GL, testable on their own.
//
//   viridis    sequential, perceptually uniform: probabilities and the kept/dropped mask
//   diverging  blue - white - red, symmetric around 0: the bias delta, ds and the gradients
//
// Both are tables of anchor colours linearly interpolated in sRGB, which is plenty for a
// visual inspector (matplotlib's viridis anchors at 0, 0.1, ..., 1; ColorBrewer RdBu reversed).
#pragma once

#include <cstdint>

namespace dma::viewer {

struct Rgba {
  uint8_t r = 0, g = 0, b = 0, a = 255;
  bool operator==(const Rgba& o) const { return r == o.r && g == o.g && b == o.b && a == o.a; }
};

enum class ColorMap { viridis, diverging };

// t in [0, 1] (clamped; NaN maps to 0).
Rgba viridis(float t);
// t in [-1, 1] (clamped; NaN maps to 0): -1 deep blue, 0 near white, +1 deep red.
Rgba diverging(float t);

// Maps a value into the map's domain: viridis uses [lo, hi] -> [0, 1]; diverging is symmetric,
// value / max(|lo|, |hi|) -> [-1, 1], so 0 is always the neutral colour.
Rgba map_value(ColorMap map, float value, float lo, float hi);

// Colours the heatmaps use for cells that carry no value.
inline constexpr Rgba kCausalGrey{72, 72, 78, 255};  // j > p_i: not even allowed (causal)
inline constexpr Rgba kDroppedDark{18, 18, 22, 255}; // allowed but not kept (views with no value there)

// One distinct hue per head (golden-ratio steps around the hue circle), for borders and labels.
Rgba head_hue(int head, int head_count);

}  // namespace dma::viewer
