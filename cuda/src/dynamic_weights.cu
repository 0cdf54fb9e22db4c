// Dynamic weights (paper Eq. 3) and their backward, on the GPU.
//
//   vflat[b,j,:]  = concat over hk of v[b,hk,j,:]                    (Hkv*D)
//   z[b,h,j]      = vflat[b,j,:] . w_dt[h,:]                          fp32 accumulation
//   delta[b,h,j]  = exp(a[h] * softplus(z))  |  a[h] * softplus(z)
//
// Backward with g = ddelta:
//   exp:    da[h] = sum g*delta*softplus(z),  dz = g*delta*a*sigmoid(z)
//   linear: da[h] = sum g*softplus(z),        dz = g*a*sigmoid(z)
//   dw_dt[h,:] = sum_{b,j} dz[b,h,j] * vflat[b,j,:];   dv[b,hk,j,:] += sum_h dz[b,h,j] * w_dt[h,hk*D:]
//
// These are small next to the attention (O(B*Lk*Hd*Hkv*D)); the kernels are plain and exact in
// fp32 (no fast-math exp/log: delta decides the selection).
#include "common.cuh"
#include "kernels.hpp"

namespace dma::cuda::detail {
namespace {

__device__ __forceinline__ float softplus(float z) { return z > 20.0f ? z : log1pf(expf(z)); }
__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// One warp per (b, j): the lanes stride over vflat, then reduce one dot product per head.
template <typename T>
__global__ void dynamic_weights_kernel(Dims d, bool linear, const T* __restrict__ v,
                                       const float* __restrict__ w_dt, const float* __restrict__ a,
                                       float* __restrict__ z_out, float* __restrict__ delta_out) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (warp >= d.B * d.Lk) return;
  const int b = warp / d.Lk, j = warp % d.Lk;
  const int HD = d.Hkv * d.D;
  for (int h = 0; h < d.Hd; ++h) {
    float acc = 0.0f;
    for (int c = lane; c < HD; c += 32) {
      const int hk = c / d.D, dd = c % d.D;
      const float v_bjc = Elem<T>::to_float(v[((size_t)(b * d.Hkv + hk) * d.Lk + j) * d.D + dd]);
      acc = fmaf(v_bjc, w_dt[(size_t)h * HD + c], acc);
    }
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) {
      const size_t bhj = (size_t)(b * d.Hd + h) * d.Lk + j;
      const float sp = softplus(acc);
      z_out[bhj] = acc;
      delta_out[bhj] = linear ? a[h] * sp : expf(a[h] * sp);
    }
  }
}

// The same, faster, when Hkv*D <= 1024: a warp takes 4 keys and holds their vflat rows in
// registers (16-byte loads, v read once from memory), then for each head streams that head's w_dt
// row once for all 4 keys. (The kernel above re-reads v for every head and w_dt for every key,
// one element per lane: latency-bound, 0.9 ms at 64K keys against ~0.03 ms for reading v once.)
constexpr int kDwKeys = 4, kDwVecs = 4;  // keys per warp; 16-byte vectors per lane (x 256 columns)
template <typename T>
__global__ void __launch_bounds__(256) dynamic_weights_rows_kernel(
    Dims d, bool linear, const T* __restrict__ v, const float* __restrict__ w_dt,
    const float* __restrict__ a, float* __restrict__ z_out, float* __restrict__ delta_out) {
  const int warp = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  const int HD = d.Hkv * d.D, n_keys = d.B * d.Lk, n0 = warp * kDwKeys;
  if (n0 >= n_keys) return;
  uint4 vr[kDwKeys][kDwVecs];  // 8 elements each; lane owns columns (q*32 + lane)*8 .. +8
  #pragma unroll
  for (int k = 0; k < kDwKeys; ++k) {
    const int n = n0 + k, b = n / d.Lk, j = n % d.Lk;
    #pragma unroll
    for (int q = 0; q < kDwVecs; ++q) {
      const int c0 = (q * 32 + lane) * 8;  // D is a multiple of 8: a vector never spans two heads
      vr[k][q] = make_uint4(0, 0, 0, 0);
      if (n < n_keys && c0 < HD)
        vr[k][q] = *reinterpret_cast<const uint4*>(
            v + ((size_t)(b * d.Hkv + c0 / d.D) * d.Lk + j) * d.D + c0 % d.D);
    }
  }
  for (int h = 0; h < d.Hd; ++h) {
    float acc[kDwKeys] = {0.0f, 0.0f, 0.0f, 0.0f};
    #pragma unroll
    for (int q = 0; q < kDwVecs; ++q) {
      const int c0 = (q * 32 + lane) * 8;
      if (c0 >= HD) break;
      const float4 w0 = *reinterpret_cast<const float4*>(w_dt + (size_t)h * HD + c0);
      const float4 w1 = *reinterpret_cast<const float4*>(w_dt + (size_t)h * HD + c0 + 4);
      #pragma unroll
      for (int k = 0; k < kDwKeys; ++k) {
        const float2 x0 = Elem<T>::unpack(vr[k][q].x), x1 = Elem<T>::unpack(vr[k][q].y);
        const float2 x2 = Elem<T>::unpack(vr[k][q].z), x3 = Elem<T>::unpack(vr[k][q].w);
        acc[k] = fmaf(x0.x, w0.x, fmaf(x0.y, w0.y, fmaf(x1.x, w0.z, fmaf(x1.y, w0.w, acc[k]))));
        acc[k] = fmaf(x2.x, w1.x, fmaf(x2.y, w1.y, fmaf(x3.x, w1.z, fmaf(x3.y, w1.w, acc[k]))));
      }
    }
    #pragma unroll
    for (int k = 0; k < kDwKeys; ++k)
      for (int off = 16; off > 0; off /= 2) acc[k] += __shfl_xor_sync(0xffffffffu, acc[k], off);
    if (lane < kDwKeys) {
      float zz = acc[0];
      #pragma unroll
      for (int k = 1; k < kDwKeys; ++k) zz = lane == k ? acc[k] : zz;
      const int n = n0 + lane;
      if (n < n_keys) {
        const size_t bhj = (size_t)((n / d.Lk) * d.Hd + h) * d.Lk + n % d.Lk;
        const float sp = softplus(zz);
        z_out[bhj] = zz;
        delta_out[bhj] = linear ? a[h] * sp : expf(a[h] * sp);
      }
    }
  }
}

// Pass 1 of the backward: dz per (b,h,j) and da[h] (block sums, then one atomic per block).
__global__ void dz_kernel(Dims d, bool linear, const float* __restrict__ a,
                          const float* __restrict__ z, const float* __restrict__ delta,
                          const float* __restrict__ g, float* __restrict__ dz,
                          float* __restrict__ da) {
  // blockIdx.y = h; threads walk (b, j)
  const int h = blockIdx.y;
  float da_part = 0.0f;
  for (int n = blockIdx.x * blockDim.x + threadIdx.x; n < d.B * d.Lk; n += gridDim.x * blockDim.x) {
    const int b = n / d.Lk, j = n % d.Lk;
    const size_t bhj = (size_t)(b * d.Hd + h) * d.Lk + j;
    const float zz = z[bhj], gg = g[bhj], sp = softplus(zz), sg = sigmoid(zz);
    if (linear) {
      da_part += gg * sp;
      dz[bhj] = gg * a[h] * sg;
    } else {
      da_part += gg * delta[bhj] * sp;
      dz[bhj] = gg * delta[bhj] * a[h] * sg;
    }
  }
  __shared__ float warp_sums[32];
  for (int off = 16; off > 0; off /= 2) da_part += __shfl_xor_sync(0xffffffffu, da_part, off);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = da_part;
  __syncthreads();  // every warp's partial sum is in shared memory
  if (threadIdx.x == 0) {
    float s = 0.0f;
    for (int w = 0; w < (int)(blockDim.x / 32); ++w) s += warp_sums[w];
    atomicAdd(&da[h], s);
  }
}

// Pass 2: dw_dt[h,c] = sum_{b,j} dz[b,h,j] vflat[b,j,c]. Thread per column c, the (b,j) range
// split over blockIdx.z so there is enough parallelism; partial sums meet in an atomic.
template <typename T>
__global__ void dw_dt_kernel(Dims d, const T* __restrict__ v, const float* __restrict__ dz,
                             float* __restrict__ dw_dt) {
  const int HD = d.Hkv * d.D;
  const int c = blockIdx.x * blockDim.x + threadIdx.x, h = blockIdx.y;
  if (c >= HD) return;
  const int hk = c / d.D, dd = c % d.D;
  const int n_total = d.B * d.Lk, per = (n_total + gridDim.z - 1) / gridDim.z;
  const int n0 = blockIdx.z * per, n1 = min(n_total, n0 + per);
  float acc = 0.0f;
  for (int n = n0; n < n1; ++n) {
    const int b = n / d.Lk, j = n % d.Lk;
    acc = fmaf(dz[(size_t)(b * d.Hd + h) * d.Lk + j],
               Elem<T>::to_float(v[((size_t)(b * d.Hkv + hk) * d.Lk + j) * d.D + dd]), acc);
  }
  if (n1 > n0) atomicAdd(&dw_dt[(size_t)h * HD + c], acc);
}

// Pass 2, for Hd <= 16: every head at once, so each element of v is read once (the kernel above
// reads v once per head).
constexpr int kMaxHd = 16;
template <typename T>
__global__ void dw_dt_all_heads_kernel(Dims d, const T* __restrict__ v,
                                       const float* __restrict__ dz, float* __restrict__ dw_dt) {
  const int HD = d.Hkv * d.D;
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= HD) return;
  const int hk = c / d.D, dd = c % d.D;
  const int n_total = d.B * d.Lk, per = (n_total + gridDim.y - 1) / gridDim.y;
  const int n0 = blockIdx.y * per, n1 = min(n_total, n0 + per);
  float acc[kMaxHd];
  #pragma unroll
  for (int h = 0; h < kMaxHd; ++h) acc[h] = 0.0f;
  #pragma unroll 4
  for (int n = n0; n < n1; ++n) {
    const int b = n / d.Lk, j = n % d.Lk;
    const float x = Elem<T>::to_float(v[((size_t)(b * d.Hkv + hk) * d.Lk + j) * d.D + dd]);
    const float* dz_bj = dz + (size_t)b * d.Hd * d.Lk + j;  // dz[b,h,j] = dz_bj[h * Lk]
    #pragma unroll
    for (int h = 0; h < kMaxHd; ++h)
      if (h < d.Hd) acc[h] = fmaf(dz_bj[(size_t)h * d.Lk], x, acc[h]);
  }
  if (n1 <= n0) return;
  #pragma unroll
  for (int h = 0; h < kMaxHd; ++h)
    if (h < d.Hd) atomicAdd(&dw_dt[(size_t)h * HD + c], acc[h]);
}

// Pass 3: dv[b,hk,j,dd] += sum_h dz[b,h,j] * w_dt[h, hk*D+dd]. Thread per element of v.
__global__ void dv_extra_kernel(Dims d, const float* __restrict__ w_dt,
                                const float* __restrict__ dz, float* __restrict__ dv) {
  const size_t n = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  const size_t total = (size_t)d.B * d.Hkv * d.Lk * d.D;
  if (n >= total) return;
  const int dd = n % d.D;
  const int j = (n / d.D) % d.Lk;
  const int hk = (n / ((size_t)d.D * d.Lk)) % d.Hkv;
  const int b = n / ((size_t)d.D * d.Lk * d.Hkv);
  const int HD = d.Hkv * d.D;
  float acc = 0.0f;
  for (int h = 0; h < d.Hd; ++h)
    acc = fmaf(dz[(size_t)(b * d.Hd + h) * d.Lk + j], w_dt[(size_t)h * HD + hk * d.D + dd], acc);
  dv[n] += acc;
}

}  // namespace

void launch_dynamic_weights(const Dims& d, Form form, const void* v, const float* w_dt,
                            const float* a, float* z, float* delta, cudaStream_t st) {
  const bool linear = form == Form::linear;
  dispatch_elem(d.precision, [&](auto elem) {
    using T = decltype(elem);
    const T* v_t = static_cast<const T*>(v);
    if (d.Hkv * d.D <= 32 * 8 * kDwVecs) {
      const int warps = (d.B * d.Lk + kDwKeys - 1) / kDwKeys;
      const int blocks = (warps + 7) / 8;
      dynamic_weights_rows_kernel<T><<<blocks, 256, 0, st>>>(d, linear, v_t, w_dt, a, z, delta);
      DMA_CUDA_CHECK_LAUNCH(dynamic_weights_rows_kernel);
      return;
    }
    const int warps = d.B * d.Lk, threads = 256;
    const int blocks = (warps * 32 + threads - 1) / threads;
    dynamic_weights_kernel<T><<<blocks, threads, 0, st>>>(d, linear, v_t, w_dt, a, z, delta);
    DMA_CUDA_CHECK_LAUNCH(dynamic_weights_kernel);
  });
}

void launch_dynamic_weights_backward(const Dims& d, Form form, const void* v, const float* w_dt,
                                     const float* a, const float* z, const float* delta,
                                     const float* ddelta, float* dz, float* da, float* dw_dt,
                                     float* dv, cudaStream_t st) {
  const int HD = d.Hkv * d.D;
  DMA_CUDA_CHECK(cudaMemsetAsync(da, 0, sizeof(float) * d.Hd, st));
  DMA_CUDA_CHECK(cudaMemsetAsync(dw_dt, 0, sizeof(float) * d.Hd * HD, st));
  const int n = d.B * d.Lk;
  dz_kernel<<<dim3(std::min((n + 255) / 256, 256), d.Hd), 256, 0, st>>>(
      d, form == Form::linear, a, z, delta, ddelta, dz, da);
  DMA_CUDA_CHECK_LAUNCH(dz_kernel);
  const int splits = std::max(1, std::min(256, n / 64));
  dispatch_elem(d.precision, [&](auto elem) {
    using T = decltype(elem);
    const T* v_t = static_cast<const T*>(v);
    if (d.Hd <= kMaxHd) {
      const dim3 grid_a((HD + 127) / 128, splits);
      dw_dt_all_heads_kernel<T><<<grid_a, 128, 0, st>>>(d, v_t, dz, dw_dt);
      DMA_CUDA_CHECK_LAUNCH(dw_dt_all_heads_kernel);
    } else {
      const dim3 grid_w((HD + 127) / 128, d.Hd, splits);
      dw_dt_kernel<T><<<grid_w, 128, 0, st>>>(d, v_t, dz, dw_dt);
      DMA_CUDA_CHECK_LAUNCH(dw_dt_kernel);
    }
  });
  const size_t total = (size_t)d.B * d.Hkv * d.Lk * d.D;
  dv_extra_kernel<<<(unsigned)((total + 255) / 256), 256, 0, st>>>(d, w_dt, dz, dv);
  DMA_CUDA_CHECK_LAUNCH(dv_extra_kernel);
}

}  // namespace dma::cuda::detail
