// libFuzzer harness: the .npy parser on arbitrary bytes. Any outcome but a parsed array or a
// dma::Error (a crash, a sanitizer report, another exception, a huge allocation) is a finding.
#include <cstddef>
#include <cstdint>

#include "dma/npy.hpp"
#include "dma/types.hpp"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const dma::NpyArray a = dma::parse_npy(data, size, "fuzz.npy");
    if (a.dtype == dma::DType::f32 || a.dtype == dma::DType::f64)
      (void)dma::npy_to_float<double>(a, "fuzz");
  } catch (const dma::Error&) {
  }
  return 0;
}
