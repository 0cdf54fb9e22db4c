// libFuzzer harness: bundle loading and validation, then the pipeline on what passes.
//
// Input layout: one options byte (window, causal, form), then records of
//   [tensor id: 1 byte][length: 2 bytes little-endian][that many bytes of a .npy file]
// for the tensors q k v w_dt a do delta (ids 0-6, taken modulo 7). The shapes, dtypes and sizes
// across tensors are what is being fuzzed; any outcome but a result or a dma::Error is a finding.
#include <cstddef>
#include <cstdint>

#include "dma/bundle.hpp"

namespace {

const char* const kNames[] = {"q", "k", "v", "w_dt", "a", "do", "delta"};

template <typename T>
void run(const dma::Bundle& b, const dma::Options& opt) {
  const dma::Problem<T> p = dma::problem_from_bundle<T>(b, opt);
  const dma::Shape& s = p.shape;
  if (s.B * s.Hq * s.Lq * s.Lk > 4096 || s.D > 64) return;  // keep each input fast
  dma::run_pipeline(p, dma::Backend::cpu);
  dma::TileConfig tc;
  tc.Bq = 1 + opt.window % 5;
  tc.Bk = 1 + opt.window % 3;
  dma::run_pipeline(p, dma::Backend::tiled, tc, false);
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  dma::Options opt;
  opt.window = data[0] % 8;  // 0 is invalid on purpose
  opt.causal = (data[0] & 8) == 0;
  opt.form = (data[0] & 16) ? dma::Form::linear : dma::Form::exp;
  try {
    dma::Bundle b;
    for (size_t at = 1; at + 3 <= size;) {
      const char* name = kNames[data[at] % 7];
      const size_t len = std::min<size_t>(data[at + 1] | (data[at + 2] << 8), size - at - 3);
      b.arrays[name] = dma::parse_npy(data + at + 3, len, name);
      at += 3 + len;
    }
    if (dma::bundle_float_type(b) == dma::DType::f64) run<double>(b, opt);
    else run<float>(b, opt);
  } catch (const dma::Error&) {
  }
  return 0;
}
