#include "colormap.hpp"

#include <algorithm>
#include <cmath>

namespace dma::viewer {
namespace {

struct Anchor { uint8_t r, g, b; };

// matplotlib viridis sampled at 0, 0.1, ..., 1.
constexpr Anchor kViridis[] = {
    {0x44, 0x01, 0x54}, {0x48, 0x24, 0x75}, {0x41, 0x44, 0x87}, {0x35, 0x5f, 0x8d},
    {0x2a, 0x78, 0x8e}, {0x21, 0x91, 0x8c}, {0x22, 0xa8, 0x84}, {0x44, 0xbf, 0x70},
    {0x7a, 0xd1, 0x51}, {0xbd, 0xdf, 0x26}, {0xfd, 0xe7, 0x25}};

// ColorBrewer RdBu (9 classes), reversed so negative is blue and positive is red.
constexpr Anchor kDiverging[] = {
    {0x21, 0x66, 0xac}, {0x43, 0x93, 0xc3}, {0x92, 0xc5, 0xde}, {0xd1, 0xe5, 0xf0},
    {0xf7, 0xf7, 0xf7}, {0xfd, 0xdb, 0xc7}, {0xf4, 0xa5, 0x82}, {0xd6, 0x60, 0x4d},
    {0xb2, 0x18, 0x2b}};

template <size_t N>
Rgba interpolate(const Anchor (&table)[N], float t) {
  if (!(t >= 0.0f)) t = 0.0f;  // also catches NaN
  if (t > 1.0f) t = 1.0f;
  const float x = t * static_cast<float>(N - 1);
  const size_t i = std::min(static_cast<size_t>(x), N - 2);
  const float f = x - static_cast<float>(i);
  auto mix = [f](uint8_t a, uint8_t b) {
    return static_cast<uint8_t>(std::lround(a + (static_cast<float>(b) - a) * f));
  };
  return {mix(table[i].r, table[i + 1].r), mix(table[i].g, table[i + 1].g),
          mix(table[i].b, table[i + 1].b), 255};
}

}  // namespace

Rgba viridis(float t) { return interpolate(kViridis, t); }

Rgba diverging(float t) {
  if (!(t == t)) t = 0.0f;  // NaN -> neutral
  return interpolate(kDiverging, 0.5f * (t + 1.0f));
}

Rgba map_value(ColorMap map, float value, float lo, float hi) {
  if (map == ColorMap::viridis) {
    const float span = hi - lo;
    return viridis(span > 0 ? (value - lo) / span : 0.0f);
  }
  const float m = std::max(std::fabs(lo), std::fabs(hi));
  return diverging(m > 0 ? value / m : 0.0f);
}

Rgba head_hue(int head, int head_count) {
  (void)head_count;
  // HSV with s = 0.65, v = 0.95 and hue stepping by the golden ratio: neighbours differ clearly
  // for any number of heads.
  const float h = std::fmod(0.08f + 0.618034f * static_cast<float>(head), 1.0f) * 6.0f;
  const float s = 0.65f, v = 0.95f;
  const int sector = static_cast<int>(h) % 6;
  const float f = h - std::floor(h);
  const float p = v * (1 - s), q = v * (1 - s * f), u = v * (1 - s * (1 - f));
  float r = v, g = u, b = p;
  switch (sector) {
    case 0: r = v; g = u; b = p; break;
    case 1: r = q; g = v; b = p; break;
    case 2: r = p; g = v; b = u; break;
    case 3: r = p; g = q; b = v; break;
    case 4: r = u; g = p; b = v; break;
    default: r = v; g = p; b = q; break;
  }
  auto byte = [](float c) { return static_cast<uint8_t>(std::lround(c * 255.0f)); };
  return {byte(r), byte(g), byte(b), 255};
}

}  // namespace dma::viewer
