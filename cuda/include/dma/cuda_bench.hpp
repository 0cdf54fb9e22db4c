// Benchmark entry point of the CUDA pipeline (used by bench/): random device-side inputs, each
// phase timed with CUDA events, the median of many runs. Plain C++, no CUDA types.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "dma/cuda.hpp"

namespace dma::cuda {

struct BenchOptions {
  int warmup = 3;
  int reps = 10;
  bool backward = true;      // also time the backward (attention + dynamic weights)
  bool flush_l2 = true;      // overwrite a 256 MB buffer before every run (outside the timings)
  Precision precision = Precision::bf16;
  uint64_t seed = 1;
  bool keep_mask = false;    // copy delta and evict of the last run into the result
};

struct BenchResult {
  // medians over the timed runs, milliseconds
  double delta_ms = 0, mask_ms = 0, forward_ms = 0, backward_ms = 0, dw_backward_ms = 0;
  double total_ms = 0;  // median of the per-run sum of all phases
  double kept_pairs = 0;       // (query, key) pairs kept by the mask, summed over (b, hq)
  double computed_pairs = 0;   // pairs the tile math ran on (gathered tiles x Bq x Bk)
  double dense_causal_pairs = 0;  // pairs a dense causal kernel computes, for comparison
  double peak_bytes = 0;       // device memory allocated by the pipeline's buffers
  int tile_q = 0, tile_k = 0;
  std::vector<float> delta;    // (B,Hd,Lk), with keep_mask
  std::vector<int32_t> evict;  // (B,Hd,Lk), with keep_mask
};

// Times the pipeline on fresh random inputs of shape s (q,k,v,do ~ N(0,1), w_dt ~ N(0,1/(Hkv*D)),
// a ~ U(-1,1)); delta is computed, not given. Throws dma::Error on CUDA errors.
BenchResult bench_pipeline(const Shape& s, const Options& opt, const BenchOptions& bo);

}  // namespace dma::cuda
