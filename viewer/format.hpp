// Small text formatting helpers for the panels. Pure.
#pragma once

#include <cstdint>
#include <string>

namespace dma::viewer {

// A duration given in milliseconds, in the unit that keeps 3 significant digits readable:
// "850 ns", "12.4 us", "3.21 ms", "1.52 s". Tooltips show the exact value next to it.
std::string format_duration(double ms);

// "1,234,567": large counts are easier to read grouped.
std::string format_count(int64_t n);

// "12.5%".
std::string format_percent(double fraction);

// "x3.42" (speedup), "-" when not finite or not positive.
std::string format_speedup(double ratio);

}  // namespace dma::viewer
