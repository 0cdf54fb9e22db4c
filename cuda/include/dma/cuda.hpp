// The CUDA implementation of DMA behind a plain C++ header: no CUDA types here, so dma_run, the
// inspector, the tutorials and the benchmarks can include it with any C++ compiler.
//
// Two ways in: the device-pointer API of dma/cuda_device.hpp (caller-owned buffers and stream,
// for model code), and run_pipeline() below, a thin host-vector wrapper over it for tools.
#pragma once

#include <string>

#include "dma/cuda_device.hpp"
#include "dma/numerics.hpp"
#include "dma/pipeline.hpp"

namespace dma::cuda {

// True when a CUDA device can be used; otherwise false and, if given, why ("no CUDA device").
bool device_available(std::string* reason = nullptr);

// Throws dma::Error when the kernels cannot run this shape (head dims other than 32, 64, 128 and
// 256, grid limits), with a message listing what is supported. Needs no device.
void check_supported(const Shape& s);

// The whole pipeline on the GPU: inputs are rounded to `precision` (dma::round_to_precision gives
// the same values), delta and every reduction are fp32, outputs are float32. Fills the same fields
// as dma::run_pipeline (delta, evict, o, lse and, with do, dq dk dv ddelta [dw_dt da]; mask is
// left empty) and times per phase (GPU events, ms). Allocates the device buffers, uploads, calls
// the device API phase by phase and downloads. Throws dma::Error on invalid input, unsupported
// head dims (the message lists the supported ones), a non-finite delta, or a CUDA error (with the
// CUDA message).
Result<float> run_pipeline(const Problem<float>& p, Precision precision = Precision::bf16);

}  // namespace dma::cuda
