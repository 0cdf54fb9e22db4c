#include "dma/validate.hpp"

#include <cmath>

namespace dma {

std::string format_index(int64_t flat, const std::vector<int64_t>& dims) {
  std::vector<int64_t> idx(dims.size(), 0);
  for (size_t d = dims.size(); d-- > 0;) {
    idx[d] = dims[d] > 0 ? flat % dims[d] : 0;
    flat = dims[d] > 0 ? flat / dims[d] : 0;
  }
  std::string out = "[";
  for (size_t d = 0; d < idx.size(); ++d) out += (d ? "," : "") + std::to_string(idx[d]);
  return out + "]";
}

void validate_shape(const Shape& s, bool causal) {
  const struct { const char* name; int64_t value; } dims[] = {
      {"B", s.B}, {"Hq", s.Hq}, {"Hkv", s.Hkv}, {"Hd", s.Hd}, {"Lq", s.Lq}, {"Lk", s.Lk}, {"D", s.D}};
  for (const auto& d : dims)
    if (d.value < 1)
      throw Error(std::string("shape: ") + d.name + " = " + std::to_string(d.value) +
                  " (every dimension must be >= 1)");
  if (s.Hq % s.Hkv != 0)
    throw Error("shape: Hq = " + std::to_string(s.Hq) + " is not a multiple of Hkv = " +
                std::to_string(s.Hkv) + " (GQA needs Hq % Hkv == 0)");
  if (s.Hd != s.Hkv && s.Hd != s.Hq)
    throw Error("shape: Hd = " + std::to_string(s.Hd) + " must equal Hkv = " +
                std::to_string(s.Hkv) + " or Hq = " + std::to_string(s.Hq));
  if (causal && s.Lq > s.Lk)
    throw Error("shape: causal attention needs Lq <= Lk, got Lq = " + std::to_string(s.Lq) +
                ", Lk = " + std::to_string(s.Lk));
}

void validate_options(const Shape&, const Options& opt) {
  if (opt.window < 1)
    throw Error("window: w = " + std::to_string(opt.window) + " (must be >= 1)");
  if (!std::isfinite(opt.scale) || opt.scale < 0)
    throw Error("scale: " + std::to_string(opt.scale) + " (must be finite and > 0; 0 means 1/sqrt(D))");
}

template <typename T>
void validate_scale(const Shape& s, const Options& opt) {
  const T scale = static_cast<T>(opt.softmax_scale(s));
  if (!std::isfinite(scale) || !(scale > 0))
    throw Error("scale: " + std::to_string(opt.softmax_scale(s)) + " is not representable in " +
                (sizeof(T) == 4 ? "float32" : "float64"));
}

template <typename T>
void validate_dynamic_weight_params(const Shape& s, const std::vector<T>& w_dt,
                                    const std::vector<T>& a) {
  validate_numel(w_dt, s.w_dt_numel(), "w_dt");
  validate_numel(a, s.Hd, "a");
  validate_finite(w_dt, {s.Hd, s.Hkv * s.D}, "w_dt");
  validate_finite(a, {s.Hd}, "a");
}

template <typename T>
void validate_numel(const std::vector<T>& t, int64_t expected, const std::string& name) {
  if (static_cast<int64_t>(t.size()) != expected)
    throw Error(name + ": has " + std::to_string(t.size()) + " elements, expected " +
                std::to_string(expected));
}

template <typename T>
int64_t first_non_finite(const std::vector<T>& t) {
  for (size_t n = 0; n < t.size(); ++n)
    if (!std::isfinite(t[n])) return static_cast<int64_t>(n);
  return -1;
}

template <typename T>
void validate_finite(const std::vector<T>& t, const std::vector<int64_t>& dims,
                     const std::string& name) {
  const int64_t n = first_non_finite(t);
  if (n >= 0)
    throw Error(name + format_index(n, dims) + " is " +
                (std::isnan(t[n]) ? "nan" : t[n] > 0 ? "inf" : "-inf") + " (inputs must be finite)");
}

template void validate_numel(const std::vector<float>&, int64_t, const std::string&);
template void validate_numel(const std::vector<double>&, int64_t, const std::string&);
template int64_t first_non_finite(const std::vector<float>&);
template int64_t first_non_finite(const std::vector<double>&);
template void validate_finite(const std::vector<float>&, const std::vector<int64_t>&,
                              const std::string&);
template void validate_finite(const std::vector<double>&, const std::vector<int64_t>&,
                              const std::string&);
template void validate_scale<float>(const Shape&, const Options&);
template void validate_scale<double>(const Shape&, const Options&);
template void validate_dynamic_weight_params(const Shape&, const std::vector<float>&,
                                             const std::vector<float>&);
template void validate_dynamic_weight_params(const Shape&, const std::vector<double>&,
                                             const std::vector<double>&);

}  // namespace dma
