#include "format.hpp"

#include <cmath>
#include <cstdio>

namespace dma::viewer {
namespace {

std::string three_digits(double v, const char* unit) {
  char buf[48];
  if (v >= 100) std::snprintf(buf, sizeof buf, "%.0f %s", v, unit);
  else if (v >= 10) std::snprintf(buf, sizeof buf, "%.1f %s", v, unit);
  else std::snprintf(buf, sizeof buf, "%.2f %s", v, unit);
  return buf;
}

}  // namespace

std::string format_duration(double ms) {
  if (!std::isfinite(ms) || ms < 0) return "-";
  // Round first, then pick the unit, so 999.96 us shows as "1.00 ms" and not "1000 us".
  const double ns = ms * 1e6;
  if (ns < 999.5) return three_digits(ns, "ns");
  if (ns < 999.5e3) return three_digits(ns / 1e3, "us");
  if (ns < 999.5e6) return three_digits(ns / 1e6, "ms");
  return three_digits(ns / 1e9, "s");
}

std::string format_count(int64_t n) {
  std::string digits = std::to_string(n < 0 ? -n : n), out;
  for (size_t i = 0; i < digits.size(); ++i) {
    if (i && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return n < 0 ? "-" + out : out;
}

std::string format_percent(double fraction) {
  if (!std::isfinite(fraction)) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f%%", fraction * 100.0);
  return buf;
}

std::string format_speedup(double ratio) {
  if (!std::isfinite(ratio) || ratio <= 0) return "-";
  char buf[32];
  std::snprintf(buf, sizeof buf, ratio >= 10 ? "x%.1f" : "x%.2f", ratio);
  return buf;
}

}  // namespace dma::viewer
