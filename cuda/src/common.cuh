// Small device helpers shared by the DMA kernels: error checks, the element types, and thin
// wrappers around the three PTX instructions the attention kernels are built from:
//   cp.async     global -> shared copies of 16 bytes that do not pass through registers,
//   ldmatrix     shared -> registers in the exact fragment layout the tensor cores expect,
//   mma.sync     m16n8k16 matrix multiply-accumulate, bf16/fp16 inputs, fp32 accumulators.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "dma/types.hpp"

namespace dma::cuda::detail {

// Every CUDA call is checked; a failure becomes a dma::Error with CUDA's own message.
[[noreturn]] inline void throw_cuda_error(cudaError_t err, const char* what, const char* file,
                                          int line) {
  throw dma::Error(std::string("CUDA error in ") + what + " (" + file + ":" +
                   std::to_string(line) + "): " + cudaGetErrorString(err));
}
#define DMA_CUDA_CHECK(call)                                                              \
  do {                                                                                     \
    cudaError_t dma_err_ = (call);                                                         \
    if (dma_err_ != cudaSuccess)                                                           \
      ::dma::cuda::detail::throw_cuda_error(dma_err_, #call, __FILE__, __LINE__);          \
  } while (0)
// After every kernel launch: launch errors (bad configuration, too much shared memory) show up
// here; errors inside the kernel show up at the next synchronizing call, which is checked too.
#define DMA_CUDA_CHECK_LAUNCH(name) DMA_CUDA_CHECK(cudaGetLastError())

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---- element types ----------------------------------------------------------------------
template <typename T> struct Elem;
template <> struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);  // lo goes to the low 16 bits
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {  // low half -> .x
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
  }
};
template <> struct Elem<__half> {
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    return __half22float2(*reinterpret_cast<__half2*>(&u));
  }
};

// ---- precision and head-dim dispatch ---------------------------------------------------------
// The one place where the run-time element type and head dim become template arguments:
// dispatch<Ds...>(p, D, f) calls f(T{}, std::integral_constant<int, D>{}) with T = __nv_bfloat16
// or __half and D one of Ds. The mma.sync kernels (forward.cu, backward.cu) are instantiated for
// all four head dims, the wgmma kernels and the decode step for 64 and 128 only.
template <int D> using HeadDim = std::integral_constant<int, D>;
inline bool supported_head_dim(int D) { return D == 32 || D == 64 || D == 128 || D == 256; }
inline bool sm90_head_dim(int D) { return D == 64 || D == 128; }

template <typename F>
void dispatch_elem(Precision p, F&& f) {
  if (p == Precision::fp16) f(__half{});
  else f(__nv_bfloat16{});
}
template <int... kDims, typename F>
void dispatch(Precision p, int D, F&& f) {
  dispatch_elem(p, [&](auto elem) {
    const bool done = ((D == kDims ? (f(elem, HeadDim<kDims>{}), true) : false) || ...);
    if (!done) throw dma::Error("cuda: this kernel has no instance for head dim " + std::to_string(D));
  });
}

// ---- PTX wrappers -------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy; when `valid` is false the destination is filled with zeros.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem_dst)),
               "l"(gmem_src), "r"(src_bytes));
}
// 4-byte asynchronous copy (through L1); zero-filled when `valid` is false.
__device__ __forceinline__ void cp_async_4(void* smem_dst, const void* gmem_src, bool valid) {
  const int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem_dst)),
               "l"(gmem_src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Four 8x8 b16 matrices; thread 8*m + r gives the address of row r of matrix m.
// Without .trans thread t receives row t/4, columns 2*(t%4), 2*(t%4)+1 of each matrix;
// with .trans it receives rows 2*(t%4), 2*(t%4)+1 of column t/4 (the transposed matrix).
__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t r[4], const void* smem_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem_row)));
}

// c (16x8, fp32) += a (16x16) * b (16x8). Fragment layouts (g = lane/4, t = lane%4):
//   a: a0 = A[g][2t..2t+1], a1 = A[g+8][2t..], a2 = A[g][2t+8..], a3 = A[g+8][2t+8..]
//   b: b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g]
//   c: c0,c1 = C[g][2t..2t+1], c2,c3 = C[g+8][2t..2t+1]
template <typename T>
__device__ __forceinline__ void mma_16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float c[4], const uint32_t a[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float c[4], const uint32_t a[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// The sum and the maximum over the 4 threads of a quad (lanes 4g .. 4g+3): in the mma.sync and
// wgmma accumulator layouts they hold one row between them.
__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// 2^x on the special-function unit (ex2.approx.ftz: relative error ~2^-22, results below 2^-126
// flush to 0). Used for the softmax probabilities, which are in [0, 1] and rounded to bf16/fp16
// before the next product anyway; exp2f would add range handling that these values never need.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// (delta, index) as one sortable 64-bit key: a larger key ranks higher (dma::ranks_above).
// Floats map to unsigned integers in order; -0 is folded onto +0 because ranks_above compares
// the values (-0 == +0) and breaks that tie by index.
__device__ __forceinline__ uint64_t rank_key(float delta, int j) {
  uint32_t bits = __float_as_uint(delta == 0.0f ? 0.0f : delta);
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(bits) << 32) | static_cast<uint32_t>(j);
}

}  // namespace dma::cuda::detail
