// Launchers of the DMA kernels (one .cu file each), called by the device API (device_api.cu).
// Device pointers are plain pointers here; `elem` buffers hold bf16 or fp16 as Dims::precision
// says, and dispatch() in common.cuh turns (precision, head dim) into template arguments.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "dma/types.hpp"

namespace dma::cuda::detail {

// Sizes and options as the kernels see them (int32: the kernels index one head in int32).
struct Dims {
  int B, Hq, Hkv, Hd, Lq, Lk, D;
  int window;
  bool causal;
  float scale;  // softmax scale
  Precision precision;  // element type of q, k, v, do
  __host__ __device__ int n_chunks() const { return (Lk + 127) / 128; }
};

// dynamic_weights.cu -----------------------------------------------------------------------
// v (B,Hkv,Lk,D) elem, w_dt (Hd,Hkv*D) f32, a (Hd) f32 -> z, delta (B,Hd,Lk) f32.
void launch_dynamic_weights(const Dims& d, Form form, const void* v, const float* w_dt,
                            const float* a, float* z, float* delta, cudaStream_t st);
// g = ddelta (B,Hd,Lk) -> da (Hd), dw_dt (Hd,Hkv*D) (both zeroed here) and dv (B,Hkv,Lk,D) +=
// the gradient through delta. dz (B,Hd,Lk) is scratch.
void launch_dynamic_weights_backward(const Dims& d, Form form, const void* v, const float* w_dt,
                                     const float* a, const float* z,
                                     const float* delta, const float* ddelta, float* dz, float* da,
                                     float* dw_dt, float* dv, cudaStream_t st);

// mask.cu ----------------------------------------------------------------------------------
// delta (B,Hd,Lk) -> evict (B,Hd,Lk) int32 and chunk_max (B,Hd,n_chunks): per chunk of 128 keys
// the largest e_j among its keys that are kept by some position (e_j >= j), else -1.
// Scratch: keys (B*Hd*Lk) and sorted (B*Hd*n_chunks*128) 64-bit.
void launch_mask(const Dims& d, const float* delta, int* evict, int* chunk_max, uint64_t* keys,
                 uint64_t* sorted, cudaStream_t st);

// forward.cu -------------------------------------------------------------------------------
struct AttnArgs {
  const void *q, *k, *v;        // (B,Hq,Lq,D), (B,Hkv,Lk,D) x2, elem
  const float* delta;           // (B,Hd,Lk)
  const int *evict, *chunk_max;
  float *o, *lse;               // (B,Hq,Lq,D), (B,Hq,Lq)
  // backward only
  const void* dout;             // (B,Hq,Lq,D) elem
  const float* dsum;            // D_i = do_i . o_i  (B,Hq,Lq)
  float *dq, *dk, *dv, *ddelta; // dq written; dk, dv (B,Hkv,Lk,D) and ddelta accumulated (zeroed)
};
void launch_forward(const Dims& d, const AttnArgs& a, cudaStream_t st);

// backward.cu ------------------------------------------------------------------------------
void launch_backward(const Dims& d, const AttnArgs& a, cudaStream_t st);


}  // namespace dma::cuda::detail
