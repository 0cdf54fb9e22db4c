// Dynamic weights (paper Eq. 3) and their backward, on the GPU (docs/design.md §1.1, §1.5).
//
//   vflat[b,j,:]  = concat over hk of v[b,hk,j,:]                    (HD = Hkv*D columns)
//   z[b,h,j]      = vflat[b,j,:] . w_dt[h,:]                          fp32 accumulation
//   delta[b,h,j]  = exp(a[h] * softplus(z))  |  a[h] * softplus(z)
//
// Backward with g = ddelta:
//   exp:    da[h] = sum g*delta*softplus(z),  dz = g*delta*a*sigmoid(z)
//   linear: da[h] = sum g*softplus(z),        dz = g*a*sigmoid(z)
//   dw_dt[h,:] = sum_{b,j} dz[b,h,j] * vflat[b,j,:];   dv[b,hk,j,:] += sum_h dz[b,h,j] * w_dt[h,hk*D:]
//
// Both directions are memory-bound passes over v (and dv), bitwise deterministic: no atomics, and
// every sum is taken in an order fixed by the shape alone. Exact fp32 throughout (no fast-math
// exp/log: delta decides the selection). Offsets into v and dv are 32-bit: make_dims keeps v
// below 2^31 elements.
//
// Forward: a warp takes 4 keys and 8 heads (32 dot products, one per lane in the end). Each lane
// accumulates its own columns (8 per 256-column tile, 16-byte loads, the next tile's loads in
// flight), then the 32 partial sums are reduce-scattered across the lanes: 31 shuffles for all 32
// results, where a shuffle tree per result would take 5 x 32.
//
// Backward: the three products are column-wise once dz is known (dz itself needs only z, delta
// and g of its own key), so a thread owns a few columns c of vflat and walks the keys:
//   dv[key, c]   += sum_h dz[key,h] w_dt[h,c]     (w_dt[:,c] in registers; dv read and written once)
//   acc[h][c]    += dz[key,h] vflat[key,c]        (registers, keys in a fixed order)
// A block covers a slice of columns and a fixed range of keys (a split); per chunk of keys it
// first computes dz for the chunk into shared memory (and its da terms). Its 4 rows of threads
// (different keys, same columns) are summed in shared memory in row order and the block writes
// one partial row of dw_dt (and da) for its split; a second kernel sums the partials of all
// splits in a fixed order. No atomics, no contended addresses, no memset. Up to 32 delta heads
// go in one launch (4, 2 or 1 columns per thread for Hd <= 8, 16, 32); more take one launch per
// 32 heads, each adding its heads' part to dv. A dv that is not 16-byte aligned takes the
// one-column kernel.
#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "kernels.hpp"

namespace dma::cuda::detail {
namespace {

__device__ __forceinline__ float softplus(float z) { return z > 20.0f ? z : log1pf(expf(z)); }
__device__ __forceinline__ float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

// ---- forward ------------------------------------------------------------------------------
constexpr int kFwThreads = 256;
constexpr int kFwKeys = 4, kFwHeads = 8;  // per warp task: 4 keys x 8 heads = 32 sums
constexpr int kFwTile = 256;              // columns per tile: 32 lanes x 8 (one 16-byte load)
static_assert(kFwKeys * kFwHeads == 32, "one result per lane");

// One step of the reduce-scatter: the lanes pair up across bit OFF; each keeps the half of its
// 2*OFF values whose index has that bit equal to its own and adds the partner's copy of it. After
// the steps 16, 8, 4, 2, 1, x[0] of lane l is the sum over all lanes of their value number l.
template <int OFF>
__device__ __forceinline__ void reduce_scatter_step(float (&x)[32], int lane) {
  const bool upper = (lane & OFF) != 0;
  #pragma unroll
  for (int i = 0; i < OFF; ++i) {
    const float send = upper ? x[i] : x[i + OFF];
    const float keep = upper ? x[i + OFF] : x[i];
    x[i] = keep + __shfl_xor_sync(0xffffffffu, send, OFF);
  }
}

// The 16-byte vector of vflat columns c0..c0+7 of each of the warp's keys (zeros when absent).
// c0 is a multiple of 8 and D of 64, so a vector never spans two kv heads.
template <typename T>
__device__ __forceinline__ void load_tile(uint4 (&x)[kFwKeys], const T* __restrict__ v,
                                          const uint32_t (&row)[kFwKeys], int n0, int n_keys,
                                          int c0, int HD, const Dims& d) {
  const uint32_t col = (uint32_t)(c0 / d.D) * d.Lk * d.D + c0 % d.D;
  #pragma unroll
  for (int k = 0; k < kFwKeys; ++k) {
    x[k] = make_uint4(0, 0, 0, 0);
    if (n0 + k < n_keys && c0 < HD) x[k] = *reinterpret_cast<const uint4*>(v + row[k] + col);
  }
}

template <typename T>
__global__ void __launch_bounds__(kFwThreads, 2) dynamic_weights_kernel(
    Dims d, bool linear, const T* __restrict__ v, const float* __restrict__ w_dt,
    const float* __restrict__ a, float* __restrict__ z_out, float* __restrict__ delta_out) {
  const int lane = threadIdx.x % 32;
  const int task = (blockIdx.x * kFwThreads + threadIdx.x) / 32;
  const int HD = d.Hkv * d.D, n_keys = d.B * d.Lk, n0 = task * kFwKeys;
  if (n0 >= n_keys) return;  // whole warps only: every shuffle below has all 32 lanes
  uint32_t row[kFwKeys];     // v offset of (b, hk = 0, j, dd = 0) of each key
  #pragma unroll
  for (int k = 0; k < kFwKeys; ++k) {
    const int n = min(n0 + k, n_keys - 1), b = n / d.Lk, j = n - b * d.Lk;
    row[k] = ((uint32_t)b * d.Hkv * d.Lk + j) * d.D;
  }
  const int n_tiles = (HD + kFwTile - 1) / kFwTile;
  for (int h0 = 0; h0 < d.Hd; h0 += kFwHeads) {  // heads in groups of 8 (v re-read from cache)
    float acc[32];  // acc[k * 8 + h]: this lane's part of z for key n0+k, head h0+h
    #pragma unroll
    for (int i = 0; i < 32; ++i) acc[i] = 0.0f;
    uint4 x[kFwKeys];
    load_tile(x, v, row, n0, n_keys, lane * 8, HD, d);
    for (int t = 0; t < n_tiles; ++t) {
      const int c0 = (t * 32 + lane) * 8;
      uint4 next[kFwKeys];  // the next tile's vectors (zeros after the last tile: c0 >= HD)
      load_tile(next, v, row, n0, n_keys, c0 + kFwTile, HD, d);
      if (c0 < HD) {
        float xf[kFwKeys][8];
        #pragma unroll
        for (int k = 0; k < kFwKeys; ++k) {
          const float2 p0 = Elem<T>::unpack(x[k].x), p1 = Elem<T>::unpack(x[k].y);
          const float2 p2 = Elem<T>::unpack(x[k].z), p3 = Elem<T>::unpack(x[k].w);
          xf[k][0] = p0.x, xf[k][1] = p0.y, xf[k][2] = p1.x, xf[k][3] = p1.y;
          xf[k][4] = p2.x, xf[k][5] = p2.y, xf[k][6] = p3.x, xf[k][7] = p3.y;
        }
        #pragma unroll
        for (int h = 0; h < kFwHeads; ++h) {
          if (h0 + h >= d.Hd) break;
          const float* w_row = w_dt + (size_t)(h0 + h) * HD + c0;
          const float4 w0 = __ldg(reinterpret_cast<const float4*>(w_row));
          const float4 w1 = __ldg(reinterpret_cast<const float4*>(w_row + 4));
          #pragma unroll
          for (int k = 0; k < kFwKeys; ++k) {
            float s = acc[k * kFwHeads + h];
            s = fmaf(xf[k][0], w0.x, s);
            s = fmaf(xf[k][1], w0.y, s);
            s = fmaf(xf[k][2], w0.z, s);
            s = fmaf(xf[k][3], w0.w, s);
            s = fmaf(xf[k][4], w1.x, s);
            s = fmaf(xf[k][5], w1.y, s);
            s = fmaf(xf[k][6], w1.z, s);
            s = fmaf(xf[k][7], w1.w, s);
            acc[k * kFwHeads + h] = s;
          }
        }
      }
      #pragma unroll
      for (int k = 0; k < kFwKeys; ++k) x[k] = next[k];
    }
    reduce_scatter_step<16>(acc, lane);
    reduce_scatter_step<8>(acc, lane);
    reduce_scatter_step<4>(acc, lane);
    reduce_scatter_step<2>(acc, lane);
    reduce_scatter_step<1>(acc, lane);
    const int n = n0 + lane / kFwHeads, h = h0 + lane % kFwHeads;  // acc[0] = z of (n, h)
    if (n < n_keys && h < d.Hd) {
      const int b = n / d.Lk, j = n - b * d.Lk;
      const size_t bhj = (size_t)(b * d.Hd + h) * d.Lk + j;
      const float zz = acc[0], sp = softplus(zz);
      z_out[bhj] = zz;
      delta_out[bhj] = linear ? a[h] * sp : expf(a[h] * sp);
    }
  }
}

// ---- backward -----------------------------------------------------------------------------
// A block: 64 column threads x 4 rows of keys. HMAX heads per launch (dz and w_dt padded with
// zeros above Hd), CPT consecutive columns per thread; HMAX * CPT = 32 keeps w_dt[:,c] and the
// dw_dt accumulators at 64 registers.
constexpr int kBwThreads = 256, kBwTx = 64, kBwRows = kBwThreads / kBwTx;
constexpr int kBwChunk = 128;   // keys whose dz sit in shared memory at a time
constexpr int kBwMinKeysPerSplit = 64;
// Splits x column slices ~ two blocks on each of the 132 SMs of an H200. A function of the shape
// only, never of the device: the summation order (and so the bits) depends on it.
constexpr int kBwTargetBlocks = 264;

template <typename T, int CPT>
__device__ __forceinline__ void load_cols(const T* p, float (&x)[CPT]) {
  if constexpr (CPT == 4) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    const float2 lo = Elem<T>::unpack(u.x), hi = Elem<T>::unpack(u.y);
    x[0] = lo.x, x[1] = lo.y, x[2] = hi.x, x[3] = hi.y;
  } else if constexpr (CPT == 2) {
    const float2 f = Elem<T>::unpack(*reinterpret_cast<const uint32_t*>(p));
    x[0] = f.x, x[1] = f.y;
  } else {
    x[0] = Elem<T>::to_float(*p);
  }
}
template <int CPT>
__device__ __forceinline__ void load_cols(const float* p, float (&x)[CPT]) {
  if constexpr (CPT == 4) {
    const float4 f = *reinterpret_cast<const float4*>(p);
    x[0] = f.x, x[1] = f.y, x[2] = f.z, x[3] = f.w;
  } else if constexpr (CPT == 2) {
    const float2 f = *reinterpret_cast<const float2*>(p);
    x[0] = f.x, x[1] = f.y;
  } else {
    x[0] = *p;
  }
}
template <int CPT>
__device__ __forceinline__ void store_cols(float* p, const float (&x)[CPT]) {
  if constexpr (CPT == 4) *reinterpret_cast<float4*>(p) = make_float4(x[0], x[1], x[2], x[3]);
  else if constexpr (CPT == 2) *reinterpret_cast<float2*>(p) = make_float2(x[0], x[1]);
  else *p = x[0];
}

struct BwArgs {
  const float *w_dt, *a, *z, *delta, *g;
  float *dv, *partials;  // partials: splits rows of Hd*HD (dw_dt) + Hd (da) floats
  int h0;                // first head of this launch (heads h0 .. h0 + HMAX - 1)
  int splits;
  bool linear;
};

template <typename T, int HMAX, int CPT>
__global__ void __launch_bounds__(kBwThreads, 2)
    dynamic_weights_backward_kernel(Dims d, BwArgs p, const T* __restrict__ v) {
  static_assert(HMAX % 8 == 0 && HMAX * CPT == 32, "register budget");
  constexpr int kSliceCols = kBwTx * CPT;
  const int HD = d.Hkv * d.D, n_keys = d.B * d.Lk;
  const int hn = min(HMAX, d.Hd - p.h0);  // heads of this launch
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int tx = tid % kBwTx, ky = tid / kBwTx;
  const int c0 = blockIdx.x * kSliceCols + tx * CPT;  // this thread's columns c0 .. c0+CPT-1
  const bool col_ok = c0 < HD;                        // HD and c0 are multiples of CPT
  const int split = blockIdx.y;
  const int per = (n_keys + p.splits - 1) / p.splits;  // split * per < n_keys + splits: no overflow
  const int n_begin = min(n_keys, split * per), n_end = min(n_keys, n_begin + per);
  const size_t M = (size_t)d.Hd * HD + d.Hd;  // floats per partial row

  __shared__ __align__(16) float dz_s[kBwChunk][HMAX];
  __shared__ uint32_t row_s[kBwChunk];                     // v offset of (b, 0, j, 0)
  __shared__ float red_s[kBwRows - 1][HMAX][kSliceCols];   // rows 1..3 for the row sum

  // w_dt[h0+h, c] for this thread's columns; zero for absent heads and columns.
  float w[HMAX][CPT], acc[HMAX][CPT];
  #pragma unroll
  for (int h = 0; h < HMAX; ++h)
    #pragma unroll
    for (int c = 0; c < CPT; ++c) {
      w[h][c] = (col_ok && h < hn) ? p.w_dt[(size_t)(p.h0 + h) * HD + c0 + c] : 0.0f;
      acc[h][c] = 0.0f;
    }
  const uint32_t col_off = col_ok ? (uint32_t)(c0 / d.D) * d.Lk * d.D + c0 % d.D : 0;

  // da: warp w computes dz of heads w, w+8, ... for lane + 32*i of each chunk's keys.
  constexpr int kWarps = kBwThreads / 32, kHeadsPerWarp = HMAX / kWarps;
  float da_part[kHeadsPerWarp];
  #pragma unroll
  for (int i = 0; i < kHeadsPerWarp; ++i) da_part[i] = 0.0f;

  for (int nc = n_begin; nc < n_end; nc += kBwChunk) {  // block-uniform loop
    const int kc = min(kBwChunk, n_end - nc);
    __syncthreads();  // the previous chunk's dz_s and row_s are no longer read
    // (1) dz (and the da terms) of the chunk's keys, into shared memory.
    if (tid < kBwChunk && tid < kc) {
      const int n = nc + tid, b = n / d.Lk, j = n - b * d.Lk;
      row_s[tid] = ((uint32_t)b * d.Hkv * d.Lk + j) * d.D;
    }
    #pragma unroll
    for (int kk = 0; kk < kBwChunk / 32; ++kk) {
      const int k = lane + 32 * kk, n = nc + k;
      const int b = n / d.Lk, j = n - b * d.Lk;  // used only when k < kc
      #pragma unroll
      for (int i = 0; i < kHeadsPerWarp; ++i) {
        const int h = warp + kWarps * i;
        float dz = 0.0f;
        if (k < kc && h < hn) {
          const int hg = p.h0 + h;
          const size_t bhj = (size_t)(b * d.Hd + hg) * d.Lk + j;
          const float zz = p.z[bhj], gg = p.g[bhj], sp = softplus(zz), sg = sigmoid(zz);
          if (p.linear) {
            da_part[i] += gg * sp;
            dz = gg * p.a[hg] * sg;
          } else {
            const float dl = p.delta[bhj];
            da_part[i] += gg * dl * sp;
            dz = gg * dl * p.a[hg] * sg;
          }
        }
        dz_s[k][h] = dz;
      }
    }
    __syncthreads();  // dz_s and row_s of the chunk are complete
    // (2) the keys of the chunk: row ky takes keys ky, ky+4, ... in increasing order.
    // Keys per row in flight (their loads issued before the arithmetic): 4 x 24 bytes per
    // thread with 4 columns, 8 x 12 or 8 x 6 bytes with fewer.
    constexpr int kBwUnroll = CPT == 4 ? 4 : 8;
    for (int k = ky; k < kc; k += kBwRows * kBwUnroll) {
      float vx[kBwUnroll][CPT], dvx[kBwUnroll][CPT];
      #pragma unroll
      for (int u = 0; u < kBwUnroll; ++u) {
        const int kk = k + u * kBwRows;
        if (kk < kc && col_ok) {
          const uint32_t off = row_s[kk] + col_off;
          load_cols<T, CPT>(v + off, vx[u]);
          load_cols<CPT>(p.dv + off, dvx[u]);
        }
      }
      #pragma unroll
      for (int u = 0; u < kBwUnroll; ++u) {
        const int kk = k + u * kBwRows;
        if (kk < kc && col_ok) {
          float dz[HMAX];
          #pragma unroll
          for (int h = 0; h < HMAX; h += 4) {
            const float4 q = *reinterpret_cast<const float4*>(&dz_s[kk][h]);
            dz[h] = q.x, dz[h + 1] = q.y, dz[h + 2] = q.z, dz[h + 3] = q.w;
          }
          #pragma unroll
          for (int c = 0; c < CPT; ++c) {
            float t = 0.0f;  // sum over the heads in order, then one add into dv
            #pragma unroll
            for (int h = 0; h < HMAX; ++h) t = fmaf(dz[h], w[h][c], t);
            dvx[u][c] += t;
          }
          #pragma unroll
          for (int h = 0; h < HMAX; ++h)
            #pragma unroll
            for (int c = 0; c < CPT; ++c) acc[h][c] = fmaf(dz[h], vx[u][c], acc[h][c]);
          store_cols<CPT>(p.dv + row_s[kk] + col_off, dvx[u]);
        }
      }
    }
  }

  // (3) rows 1..3 into shared memory, row 0 adds them in order and writes the partial row.
  if (ky > 0) {
    #pragma unroll
    for (int h = 0; h < HMAX; ++h)
      #pragma unroll
      for (int c = 0; c < CPT; ++c) red_s[ky - 1][h][tx * CPT + c] = acc[h][c];
  }
  __syncthreads();  // red_s complete
  float* part = p.partials + (size_t)split * M;
  if (ky == 0 && col_ok) {
    #pragma unroll
    for (int h = 0; h < HMAX; ++h) {
      if (h >= hn) break;
      #pragma unroll
      for (int c = 0; c < CPT; ++c) {
        float s = acc[h][c];
        #pragma unroll
        for (int r = 0; r < kBwRows - 1; ++r) s += red_s[r][h][tx * CPT + c];
        part[(size_t)(p.h0 + h) * HD + c0 + c] = s;
      }
    }
  }
  // da of the block: one warp per head, a fixed shuffle tree; written by the first slice only.
  #pragma unroll
  for (int i = 0; i < kHeadsPerWarp; ++i) {
    float s = da_part[i];
    #pragma unroll
    for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
    const int h = warp + kWarps * i;
    if (lane == 0 && blockIdx.x == 0 && h < hn) part[(size_t)d.Hd * HD + p.h0 + h] = s;
  }
}

// out[m] = sum over splits s of partials[s][m], s in a fixed order: 8 groups of threads take
// s = g, g+8, ... and the group sums are added in group order. m < Hd*HD is dw_dt, the rest da.
constexpr int kSumGroups = 8;
__global__ void __launch_bounds__(32 * kSumGroups) sum_partials_kernel(
    int splits, int M, int n_dw, const float* __restrict__ partials, float* __restrict__ dw_dt,
    float* __restrict__ da) {
  __shared__ float red[kSumGroups][32];
  const int lane = threadIdx.x % 32, grp = threadIdx.x / 32;
  const int m = blockIdx.x * 32 + lane;
  float s = 0.0f;
  if (m < M) {
    #pragma unroll 4
    for (int sp = grp; sp < splits; sp += kSumGroups) s += partials[(size_t)sp * M + m];
  }
  red[grp][lane] = s;
  __syncthreads();  // every group's sum is in shared memory
  if (grp == 0 && m < M) {
    float t = red[0][lane];
    #pragma unroll
    for (int g = 1; g < kSumGroups; ++g) t += red[g][lane];
    if (m < n_dw) dw_dt[m] = t;
    else da[m - n_dw] = t;
  }
}

// Which kernel the backward runs: HMAX heads per launch, CPT columns per thread, the grid.
struct BwPlan {
  int hmax, cpt, slices, splits;
};
BwPlan bw_plan(const Dims& d, int hmax) {
  BwPlan p;
  p.hmax = hmax;
  p.cpt = 32 / hmax;
  const int HD = d.Hkv * d.D, n_keys = d.B * d.Lk;
  p.slices = (HD + kBwTx * p.cpt - 1) / (kBwTx * p.cpt);
  const int by_keys = (n_keys + kBwMinKeysPerSplit - 1) / kBwMinKeysPerSplit;
  const int by_blocks = (kBwTargetBlocks + p.slices - 1) / p.slices;
  p.splits = std::max(1, std::min(by_keys, by_blocks));
  return p;
}
int bw_hmax(const Dims& d) { return d.Hd <= 8 ? 8 : d.Hd <= 16 ? 16 : 32; }

template <typename T, int HMAX>
void launch_bw(const Dims& d, const BwPlan& plan, BwArgs args, const T* v, cudaStream_t st) {
  constexpr int CPT = 32 / HMAX;
  const dim3 grid(plan.slices, plan.splits);
  // Heads in groups of HMAX, one launch each, in order on the stream: each launch adds its
  // heads' part to dv (one read and write of dv per launch; one launch when Hd <= 32).
  for (int h0 = 0; h0 < d.Hd; h0 += HMAX) {
    args.h0 = h0;
    dynamic_weights_backward_kernel<T, HMAX, CPT><<<grid, kBwThreads, 0, st>>>(d, args, v);
    DMA_CUDA_CHECK_LAUNCH(dynamic_weights_backward_kernel);
  }
}

}  // namespace

void launch_dynamic_weights(const Dims& d, Form form, const void* v, const float* w_dt,
                            const float* a, float* z, float* delta, cudaStream_t st) {
  const bool linear = form == Form::linear;
  const int tasks = (d.B * d.Lk + kFwKeys - 1) / kFwKeys;  // one warp each
  const int blocks = (tasks + kFwThreads / 32 - 1) / (kFwThreads / 32);
  dispatch_elem(d.precision, [&](auto elem) {
    using T = decltype(elem);
    dynamic_weights_kernel<T><<<blocks, kFwThreads, 0, st>>>(d, linear, static_cast<const T*>(v),
                                                             w_dt, a, z, delta);
    DMA_CUDA_CHECK_LAUNCH(dynamic_weights_kernel);
  });
}

size_t dynamic_weights_backward_partials(const Dims& d) {
  // The plan for this Hd, or the one-column fallback (unaligned dv), whichever has more splits.
  const int splits = std::max(bw_plan(d, bw_hmax(d)).splits, bw_plan(d, 32).splits);
  return (size_t)splits * ((size_t)d.Hd * d.Hkv * d.D + d.Hd);
}

void launch_dynamic_weights_backward(const Dims& d, Form form, const void* v, const float* w_dt,
                                     const float* a, const float* z, const float* delta,
                                     const float* ddelta, float* /*dz: unused*/, float* da,
                                     float* dw_dt, float* dv, float* partials, cudaStream_t st) {
  int hmax = bw_hmax(d);
  // Vector access of CPT columns needs v aligned to 2*CPT bytes and dv to 4*CPT; otherwise the
  // one-column kernel (any alignment).
  const int cpt = 32 / hmax;
  const uintptr_t v_addr = reinterpret_cast<uintptr_t>(v), dv_addr = reinterpret_cast<uintptr_t>(dv);
  if (v_addr % (2 * cpt) != 0 || dv_addr % (4 * cpt) != 0) hmax = 32;
  const BwPlan plan = bw_plan(d, hmax);
  BwArgs args{};
  args.w_dt = w_dt, args.a = a, args.z = z, args.delta = delta, args.g = ddelta;
  args.dv = dv, args.partials = partials;
  args.splits = plan.splits;
  args.linear = form == Form::linear;
  dispatch_elem(d.precision, [&](auto elem) {
    using T = decltype(elem);
    const T* v_t = static_cast<const T*>(v);
    if (hmax == 8) launch_bw<T, 8>(d, plan, args, v_t, st);
    else if (hmax == 16) launch_bw<T, 16>(d, plan, args, v_t, st);
    else launch_bw<T, 32>(d, plan, args, v_t, st);
  });
  const int n_dw = d.Hd * d.Hkv * d.D, M = n_dw + d.Hd;
  sum_partials_kernel<<<(M + 31) / 32, 32 * kSumGroups, 0, st>>>(plan.splits, M, n_dw, partials,
                                                                 dw_dt, da);
  DMA_CUDA_CHECK_LAUNCH(sum_partials_kernel);
}

}  // namespace dma::cuda::detail
