// Decoding on the GPU with a cache of w entries per (sequence, delta head) (dma/cuda_decode.hpp,
// docs/design.md §2.10 and §4 Decode).
//
// A step is two launches:
//
//   1. decode_step_kernel, grid (splits, Hd, B). Every block of (b, hd):
//        a. delta of the new token: vflat (Hkv*D) . w_dt[hd], softplus, exp or linear (or given)
//        b. the eviction decision: when the cache is full, the lowest-ranked of its w entries and
//           the newcomer (the smallest 64-bit rank key, common.cuh's rank_key) leaves
//        c. split-K attention over its share of the survivors (the w slots with the newcomer in
//           the slot it takes), for every query head of hd, as a partial softmax state (m, l, o)
//      The blocks of one (b, hd) repeat a and b: they read the same values in the same order and
//      reach the same decision, so no block has to wait for another. Nothing in the cache is
//      written here, so every block reads it as the previous step left it.
//   2. decode_combine_kernel, grid (Hd, B): merges the splits into o and lse, then writes the
//      newcomer into the cache slot it takes (k, v, delta, position), and advances length.
//
// Prefill (decode_prefill_kernel, grid (Hd, n)) compacts { j < P : e_j >= P-1 } of a prompt
// forward into the slots, in position order.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <string>

#include "common.cuh"
#include "dma/cuda_decode.hpp"
#include "dma/mask_rule.hpp"
#include "dma/validate.hpp"

namespace dma::cuda {

using namespace detail;

namespace {

constexpr int kThreads = 128;           // 4 warps per block; D <= 128 dims, one per thread
constexpr int kWarps = kThreads / 32;
constexpr int kMaxHeads = 4;            // query heads attended per pass over the slots
constexpr int kMinSlotsPerSplit = 64;
constexpr int kTargetBlocks = 264;      // about 2 per SM of an H100/H200; any value is correct
constexpr float kMaxDelta = FLT_MAX / kLog2e;  // the base-2 softmax computes delta * log2(e)

// Sizes as the kernels see them.
struct DecodeDims {
  int B, Hq, Hkv, Hd, D, w;
  int splits, slots_per_split;  // split-K: slots [split * slots_per_split, ...) per block
  float scale_log2;             // softmax scale * log2(e)
  bool linear;                  // Form::linear
  __host__ __device__ int heads_per_delta_head() const { return Hq / Hd; }
  __host__ __device__ int kv_head_of_delta_head(int hd) const { return (hd * (Hq / Hd)) / (Hq / Hkv); }
};

// What block split 0 of (b, hd) decided, for the combine.
struct Decision {
  int new_slot;   // the slot the newcomer takes, -1 when it leaves itself
  int evicted;    // the position that left the cache, -1 when none did
  float delta;    // the newcomer's delta
  int position;   // the newcomer's position (length[b] before the step)
  int grows;      // 1 when the cache was not full (count + 1)
  int ok;         // 0 when delta was flagged: nothing is written
  int pad[2];
};

struct StepArgs {
  // the cache (read by kernel 1, written by kernel 2)
  uint16_t *ck, *cv;   // (B,Hd,w,D) elem bits
  float* cdelta;       // (B,Hd,w)
  int *cpos, *ccount, *clength;
  // the new tokens
  const uint16_t *q, *k, *v;  // (B,Hq,D), (B,Hkv,D) x2
  const uint8_t* active;
  const float *w_dt, *a, *delta_given;
  // outputs and scratch
  float *o, *lse, *delta_out;
  int* evicted;
  unsigned long long* status;
  float* part;          // (B,Hq,splits,D+2): o (unnormalized), m (base 2), l
  Decision* decision;   // (B,Hd)
};

__device__ __forceinline__ float softplus(float z) { return z > 20.0f ? z : log1pf(expf(z)); }

// Sum over the block; every thread gets the result. smem holds kWarps floats.
__device__ float block_sum(float x, float* smem) {
  for (int off = 16; off > 0; off /= 2) x += __shfl_xor_sync(0xffffffffu, x, off);
  __syncthreads();  // smem may still be read by a previous call
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = x;
  __syncthreads();  // every warp's sum is in smem
  float total = 0.0f;
  for (int w = 0; w < kWarps; ++w) total += smem[w];
  return total;
}

// Minimum over the block; every thread gets the result. smem holds kWarps values.
__device__ uint64_t block_min(uint64_t x, uint64_t* smem) {
  for (int off = 16; off > 0; off /= 2) {
    const uint64_t y = __shfl_xor_sync(0xffffffffu, x, off);
    x = y < x ? y : x;
  }
  __syncthreads();  // smem may still be read by a previous call
  if (threadIdx.x % 32 == 0) smem[threadIdx.x / 32] = x;
  __syncthreads();  // every warp's minimum is in smem
  uint64_t m = smem[0];
  for (int w = 1; w < kWarps; ++w) m = smem[w] < m ? smem[w] : m;
  return m;
}

// (m, l, acc) += (m2, l2, acc2): two partial softmax states over disjoint keys, base 2.
// Branch-free, so that it can sit between warp shuffles; -inf (no key yet) contributes nothing.
template <int N>
__device__ __forceinline__ void merge_state(float& m, float& l, float (&acc)[N], float m2, float l2,
                                            const float (&acc2)[N]) {
  const float M = fmaxf(m, m2);
  const float f1 = m == -INFINITY ? 0.0f : exp2f(m - M);
  const float f2 = m2 == -INFINITY ? 0.0f : exp2f(m2 - M);
  l = l * f1 + l2 * f2;
  #pragma unroll
  for (int e = 0; e < N; ++e) acc[e] = acc[e] * f1 + acc2[e] * f2;
  m = M;
}

// Eight consecutive elements (16 bytes) as floats.
template <typename T>
__device__ __forceinline__ void load8(const uint16_t* p, float (&x)[8]) {
  const uint4 u = *reinterpret_cast<const uint4*>(p);
  const float2 a = Elem<T>::unpack(u.x), b = Elem<T>::unpack(u.y);
  const float2 c = Elem<T>::unpack(u.z), d = Elem<T>::unpack(u.w);
  x[0] = a.x; x[1] = a.y; x[2] = b.x; x[3] = b.y; x[4] = c.x; x[5] = c.y; x[6] = d.x; x[7] = d.y;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_step_kernel(DecodeDims d, StepArgs s) {
  constexpr int kLanesPerKey = D / 8;            // each lane holds 8 of the D dims of a key
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  constexpr int kGroups = kWarps * kKeysPerWarp;  // keys in flight per block
  const int split = blockIdx.x, hd = blockIdx.y, b = blockIdx.z;
  if (s.active && !s.active[b]) return;  // the combine writes zeros
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int lk = lane % kLanesPerKey;  // this lane's 8 dims: lk*8 .. lk*8+7
  const int bh = b * d.Hd + hd, hk = d.kv_head_of_delta_head(hd);
  const int p = s.clength[b];
  __shared__ float sum_smem[kWarps];
  __shared__ uint64_t min_smem[kWarps];
  __shared__ int leaving_slot;

  // a. delta of the new token from vflat[b] = v[b, 0..Hkv-1, :] and w_dt[hd]
  float delta_new;
  if (s.delta_given) {
    delta_new = s.delta_given[bh];
  } else {
    const int HD = d.Hkv * d.D;
    float z = 0.0f;
    for (int c = threadIdx.x; c < HD; c += kThreads)
      z = fmaf(Elem<T>::to_float(reinterpret_cast<const T*>(s.v)[(size_t)b * HD + c]), s.w_dt[(size_t)hd * HD + c], z);
    z = block_sum(z, sum_smem);
    const float u = s.a[hd] * softplus(z);
    delta_new = d.linear ? u : expf(u);
  }
  const bool ok = fabsf(delta_new) <= kMaxDelta;  // NaN fails too
  if (!ok && split == 0 && threadIdx.x == 0) atomicMin(s.status, (unsigned long long)bh);

  // b. which entry leaves: the smallest rank key among the w cached entries and the newcomer
  const int n = s.ccount[bh];
  int new_slot = n, evicted = -1;  // not full: the newcomer takes the next free slot
  if (n >= d.w) {
    const uint64_t new_key = rank_key(delta_new, p);
    uint64_t my_min = new_key;
    int my_slot = -1;
    for (int slot = threadIdx.x; slot < d.w; slot += kThreads) {
      const uint64_t key = rank_key(s.cdelta[(size_t)bh * d.w + slot], s.cpos[(size_t)bh * d.w + slot]);
      if (key < my_min) { my_min = key; my_slot = slot; }
    }
    const uint64_t lowest = block_min(my_min, min_smem);
    if (threadIdx.x == 0) leaving_slot = -1;
    __syncthreads();  // leaving_slot is reset before the owner of the minimum writes it
    if (my_slot >= 0 && my_min == lowest) leaving_slot = my_slot;  // keys are unique: one writer
    __syncthreads();  // leaving_slot is written
    new_slot = leaving_slot;  // -1: the newcomer ranks lowest and leaves itself
    evicted = new_slot >= 0 ? s.cpos[(size_t)bh * d.w + new_slot] : p;
  }
  if (split == 0 && threadIdx.x == 0) {
    Decision dec{};
    dec.new_slot = new_slot;
    dec.evicted = evicted;
    dec.delta = delta_new;
    dec.position = p;
    dec.grows = n < d.w;
    dec.ok = ok;
    s.decision[bh] = dec;
  }
  const int n_used = n < d.w ? n + 1 : d.w;  // survivors after the step
  const int s0 = split * d.slots_per_split;
  const int s1 = ok ? min(n_used, s0 + d.slots_per_split) : s0;  // a flagged delta: no keys

  // c. split-K attention over slots s0..s1-1 for the query heads of hd, kMaxHeads at a time
  __shared__ float m_smem[kWarps][kMaxHeads], l_smem[kWarps][kMaxHeads];
  __shared__ float acc_smem[kWarps][kMaxHeads][D];
  const int heads = d.heads_per_delta_head();
  for (int h0 = 0; h0 < heads; h0 += kMaxHeads) {
    const int nh = min(kMaxHeads, heads - h0);
    float qf[kMaxHeads][8], m[kMaxHeads], l[kMaxHeads], acc[kMaxHeads][8];
    #pragma unroll
    for (int h = 0; h < kMaxHeads; ++h) {
      m[h] = -INFINITY;
      l[h] = 0.0f;
      #pragma unroll
      for (int e = 0; e < 8; ++e) acc[h][e] = qf[h][e] = 0.0f;
      if (h < nh) {
        const int hq = hd * heads + h0 + h;
        load8<T>(s.q + ((size_t)b * d.Hq + hq) * D + lk * 8, qf[h]);
        #pragma unroll
        for (int e = 0; e < 8; ++e) qf[h][e] *= d.scale_log2;
      }
    }
    // A warp takes kKeysPerWarp consecutive slots at a time; the loop bound is the warp's, so
    // that the dot-product shuffles stay converged, and a lane past the end adds nothing.
    for (int first = s0 + warp * kKeysPerWarp; first < s1; first += kGroups) {
      const int slot = first + lane / kLanesPerKey;
      const bool valid = slot < s1, is_new = slot == new_slot;
      float kf[8] = {0, 0, 0, 0, 0, 0, 0, 0}, vf[8] = {0, 0, 0, 0, 0, 0, 0, 0}, bias = 0.0f;
      if (valid) {
        const size_t cached = ((size_t)bh * d.w + slot) * D, fresh = ((size_t)b * d.Hkv + hk) * D;
        load8<T>((is_new ? s.k + fresh : s.ck + cached) + lk * 8, kf);
        load8<T>((is_new ? s.v + fresh : s.cv + cached) + lk * 8, vf);
        bias = (is_new ? delta_new : s.cdelta[(size_t)bh * d.w + slot]) * kLog2e;
      }
      #pragma unroll
      for (int h = 0; h < kMaxHeads; ++h) {
        if (h >= nh) break;  // uniform across the block: the shuffles below stay converged
        float dot = 0.0f;
        #pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(qf[h][e], kf[e], dot);
        #pragma unroll
        for (int off = kLanesPerKey / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
        if (!valid) continue;
        const float score = dot + bias;  // log2(e) * (scale q.k + delta)
        const float m_new = fmaxf(m[h], score);
        const float corr = fast_exp2(m[h] - m_new), pj = fast_exp2(score - m_new);
        l[h] = l[h] * corr + pj;
        #pragma unroll
        for (int e = 0; e < 8; ++e) acc[h][e] = fmaf(pj, vf[e], acc[h][e] * corr);
        m[h] = m_new;
      }
    }
    // merge the key groups of a warp (lanes kLanesPerKey apart hold the same dims), then warps
    #pragma unroll
    for (int h = 0; h < kMaxHeads; ++h) {
      #pragma unroll
      for (int off = kLanesPerKey; off < 32; off *= 2) {
        float acc2[8];
        #pragma unroll
        for (int e = 0; e < 8; ++e) acc2[e] = __shfl_xor_sync(0xffffffffu, acc[h][e], off);
        const float m2 = __shfl_xor_sync(0xffffffffu, m[h], off), l2 = __shfl_xor_sync(0xffffffffu, l[h], off);
        merge_state(m[h], l[h], acc[h], m2, l2, acc2);
      }
    }
    __syncthreads();  // the previous head chunk has read the shared arrays
    if (lane < kLanesPerKey)
      for (int h = 0; h < nh; ++h) {
        #pragma unroll
        for (int e = 0; e < 8; ++e) acc_smem[warp][h][lk * 8 + e] = acc[h][e];
        if (lane == 0) m_smem[warp][h] = m[h], l_smem[warp][h] = l[h];
      }
    __syncthreads();  // every warp's state is in shared memory
    if (threadIdx.x < D)
      for (int h = 0; h < nh; ++h) {
        float mm = m_smem[0][h], ll = l_smem[0][h], oo[1] = {acc_smem[0][h][threadIdx.x]};
        for (int w = 1; w < kWarps; ++w) {
          const float o2[1] = {acc_smem[w][h][threadIdx.x]};
          merge_state(mm, ll, oo, m_smem[w][h], l_smem[w][h], o2);
        }
        const int hq = hd * heads + h0 + h;
        float* part = s.part + (((size_t)b * d.Hq + hq) * d.splits + split) * (D + 2);
        part[threadIdx.x] = oo[0];
        if (threadIdx.x == 0) part[D] = mm, part[D + 1] = ll;
      }
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_combine_kernel(DecodeDims d, StepArgs s) {
  const int hd = blockIdx.x, b = blockIdx.y, bh = b * d.Hd + hd, tid = threadIdx.x;
  const int heads = d.heads_per_delta_head();
  if (s.active && !s.active[b]) {
    for (int h = 0; h < heads; ++h) {
      const size_t row = (size_t)b * d.Hq + hd * heads + h;
      if (tid < D) s.o[row * D + tid] = 0.0f;
      if (tid == 0) s.lse[row] = 0.0f;
    }
    if (tid == 0 && s.delta_out) s.delta_out[bh] = 0.0f;
    if (tid == 0 && s.evicted) s.evicted[bh] = -1;
    return;
  }
  const Decision dec = s.decision[bh];

  // 1. o and lse from the splits' partial states
  for (int h = 0; h < heads; ++h) {
    const size_t row = (size_t)b * d.Hq + hd * heads + h;
    const float* part = s.part + row * d.splits * (D + 2);
    float M = -INFINITY;
    for (int sp = 0; sp < d.splits; ++sp) M = fmaxf(M, part[sp * (D + 2) + D]);
    float L = 0.0f, acc = 0.0f;
    for (int sp = 0; sp < d.splits; ++sp) {
      const float m_sp = part[sp * (D + 2) + D];
      const float f = m_sp == -INFINITY ? 0.0f : exp2f(m_sp - M);
      L += f * part[sp * (D + 2) + D + 1];
      if (tid < D) acc += f * part[sp * (D + 2) + tid];
    }
    if (tid < D) s.o[row * D + tid] = dec.ok ? acc / L : 0.0f;
    if (tid == 0) s.lse[row] = dec.ok ? (M + log2f(L)) * kLn2 : 0.0f;
  }

  // 2. the newcomer takes its slot (every block of kernel 1 has finished reading the cache)
  if (dec.ok && dec.new_slot >= 0) {
    const int hk = d.kv_head_of_delta_head(hd);
    const size_t slot = (size_t)bh * d.w + dec.new_slot;
    if (tid < D) {
      s.ck[slot * D + tid] = s.k[((size_t)b * d.Hkv + hk) * D + tid];
      s.cv[slot * D + tid] = s.v[((size_t)b * d.Hkv + hk) * D + tid];
    }
    if (tid == 0) {
      s.cdelta[slot] = dec.delta;
      s.cpos[slot] = dec.position;
      if (dec.grows) s.ccount[bh] = dec.new_slot + 1;
    }
  }
  if (tid == 0 && s.delta_out) s.delta_out[bh] = dec.delta;
  if (tid == 0 && s.evicted) s.evicted[bh] = dec.ok ? dec.evicted : -1;
  if (tid == 0 && hd == 0) s.clength[b] = dec.position + 1;  // the other blocks use dec.position
}

// Compacts the kept keys of a prompt of P tokens into the slots of sequence first + blockIdx.y.
template <int D>
__global__ void __launch_bounds__(256) decode_prefill_kernel(DecodeDims d, int first, int P,
                                                             const uint16_t* __restrict__ k,
                                                             const uint16_t* __restrict__ v,
                                                             const float* __restrict__ delta,
                                                             const int* __restrict__ evict,
                                                             uint16_t* ck, uint16_t* cv,
                                                             float* cdelta, int* cpos, int* ccount,
                                                             int* clength) {
  const int hd = blockIdx.x, bi = blockIdx.y, b = first + bi, bh = b * d.Hd + hd;
  const int hk = d.kv_head_of_delta_head(hd), tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int* evict_bh = evict + ((size_t)bi * d.Hd + hd) * P;
  const float* delta_bh = delta + ((size_t)bi * d.Hd + hd) * P;
  __shared__ int warp_count[8];
  int base = 0;  // kept keys before this chunk of 256 positions
  for (int j0 = 0; j0 < P; j0 += 256) {
    const int j = j0 + tid;
    const bool kept = j < P && rule::is_kept(j, P - 1, evict_bh[j]);
    const unsigned ballot = __ballot_sync(0xffffffffu, kept);
    if (lane == 0) warp_count[warp] = __popc(ballot);
    __syncthreads();  // every warp's count is in shared memory
    int before = base + __popc(ballot & ((1u << lane) - 1u)), total = 0;
    for (int w = 0; w < 8; ++w) {
      before += w < warp ? warp_count[w] : 0;
      total += warp_count[w];
    }
    if (kept && before < d.w) {  // e_j >= P-1 holds for at most w keys; the test is a guard
      cpos[(size_t)bh * d.w + before] = j;
      cdelta[(size_t)bh * d.w + before] = delta_bh[j];
    }
    base += total;
    __syncthreads();  // warp_count is read before the next chunk overwrites it
  }
  const int count = base < d.w ? base : d.w;
  if (tid == 0) ccount[bh] = count;
  __syncthreads();  // the positions written above are visible to the whole block
  for (int e = tid; e < count * D; e += 256) {
    const int slot = e / D, dd = e % D;
    const int j = cpos[(size_t)bh * d.w + slot];
    ck[((size_t)bh * d.w + slot) * D + dd] = k[(((size_t)bi * d.Hkv + hk) * P + j) * D + dd];
    cv[((size_t)bh * d.w + slot) * D + dd] = v[(((size_t)bi * d.Hkv + hk) * P + j) * D + dd];
  }
  if (tid == 0 && hd == 0) clength[b] = P;
}

// ---- host side ------------------------------------------------------------------------------

cudaStream_t as_stream(Stream s) { return static_cast<cudaStream_t>(s); }

void require(const void* p, const char* what) {
  if (p == nullptr) throw dma::Error(std::string("cuda decode: ") + what + " is a null pointer");
}

DecodeDims make_decode_dims(const DecodeConfig& c) {
  const dma::DecodeConfig& l = c.layer;
  const Shape s = l.shape(1, 1);
  validate_shape(s, true);
  validate_options(s, l.options());
  if (!supported_head_dim(static_cast<int>(l.D)))
    throw dma::Error("D = " + std::to_string(l.D) + ": the CUDA decode step supports head dims 64 and 128");
  if (l.B > 65535 || l.Hd > 65535 || l.window >= (int64_t{1} << 24) ||
      l.B * l.Hd * l.window * l.D >= (int64_t{1} << 40))
    throw dma::Error("decode: too large for the CUDA decode step (B, Hd <= 65535, w < 2^24)");
  const double scale = l.options().softmax_scale(s);
  if (!(scale > 0) || !std::isfinite(static_cast<float>(scale)))
    throw dma::Error("scale: " + std::to_string(scale) + " is not a positive float32");
  DecodeDims d{};
  d.B = (int)l.B; d.Hq = (int)l.Hq; d.Hkv = (int)l.Hkv; d.Hd = (int)l.Hd; d.D = (int)l.D;
  d.w = (int)l.window;
  const int max_splits = (d.w + kMinSlotsPerSplit - 1) / kMinSlotsPerSplit;
  const int want = (kTargetBlocks + d.B * d.Hd - 1) / (d.B * d.Hd);
  d.splits = std::max(1, std::min(want, max_splits));
  d.slots_per_split = (d.w + d.splits - 1) / d.splits;
  d.scale_log2 = static_cast<float>(scale) * kLog2e;
  d.linear = l.form == Form::linear;
  return d;
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

struct CacheLayout {
  size_t k, v, delta, pos, count, length, bytes;
};
CacheLayout cache_layout(const DecodeDims& d) {
  const size_t slots = (size_t)d.B * d.Hd * d.w;
  CacheLayout m{};
  size_t at = 0;
  auto take = [&](size_t bytes) { const size_t here = at; at += align256(bytes); return here; };
  m.k = take(slots * d.D * 2);
  m.v = take(slots * d.D * 2);
  m.delta = take(slots * sizeof(float));
  m.pos = take(slots * sizeof(int32_t));
  m.count = take((size_t)d.B * d.Hd * sizeof(int32_t));
  m.length = take((size_t)d.B * sizeof(int32_t));
  m.bytes = at;
  return m;
}

struct StepLayout {
  size_t part, decision, bytes;
};
StepLayout step_layout(const DecodeDims& d) {
  StepLayout m{};
  m.part = 0;
  m.decision = align256((size_t)d.B * d.Hq * d.splits * (d.D + 2) * sizeof(float));
  m.bytes = m.decision + align256((size_t)d.B * d.Hd * sizeof(Decision));
  return m;
}

template <typename T>
T* offset(void* base, size_t bytes) { return reinterpret_cast<T*>(static_cast<char*>(base) + bytes); }

void require_cache(const DeviceCache& cache) {
  require(cache.k, "cache.k"), require(cache.v, "cache.v"), require(cache.delta, "cache.delta");
  require(cache.pos, "cache.pos"), require(cache.count, "cache.count"), require(cache.length, "cache.length");
}

}  // namespace

void check_decode_config(const DecodeConfig& c) { make_decode_dims(c); }

size_t cache_bytes(const DecodeConfig& c) { return cache_layout(make_decode_dims(c)).bytes; }

size_t cache_bytes_per_sequence(const DecodeConfig& c) {
  const DecodeDims d = make_decode_dims(c);
  return (size_t)d.Hd * d.w * (2 * d.D * 2 + sizeof(float) + sizeof(int32_t)) +
         (size_t)d.Hd * sizeof(int32_t) + sizeof(int32_t);
}

DeviceCache cache_in(const DecodeConfig& c, void* memory) {
  require(memory, "cache memory");
  const CacheLayout m = cache_layout(make_decode_dims(c));
  DeviceCache cache;
  cache.k = offset<void>(memory, m.k);
  cache.v = offset<void>(memory, m.v);
  cache.delta = offset<float>(memory, m.delta);
  cache.pos = offset<int32_t>(memory, m.pos);
  cache.count = offset<int32_t>(memory, m.count);
  cache.length = offset<int32_t>(memory, m.length);
  return cache;
}

void reset_cache(const DecodeConfig& c, const DeviceCache& cache, Stream stream) {
  const DecodeDims d = make_decode_dims(c);
  require_cache(cache);
  DMA_CUDA_CHECK(cudaMemsetAsync(cache.count, 0, (size_t)d.B * d.Hd * sizeof(int32_t), as_stream(stream)));
  DMA_CUDA_CHECK(cudaMemsetAsync(cache.length, 0, (size_t)d.B * sizeof(int32_t), as_stream(stream)));
}

void reset_sequence(const DecodeConfig& c, const DeviceCache& cache, int64_t b, Stream stream) {
  const DecodeDims d = make_decode_dims(c);
  require_cache(cache);
  if (b < 0 || b >= d.B)
    throw dma::Error("decode: sequence " + std::to_string(b) + " does not exist (B = " + std::to_string(d.B) + ")");
  DMA_CUDA_CHECK(cudaMemsetAsync(cache.count + b * d.Hd, 0, (size_t)d.Hd * sizeof(int32_t), as_stream(stream)));
  DMA_CUDA_CHECK(cudaMemsetAsync(cache.length + b, 0, sizeof(int32_t), as_stream(stream)));
}

void prefill(const DecodeConfig& c, const DeviceCache& cache, int64_t first, int64_t n, int64_t P,
             const void* k, const void* v, const float* delta, const int32_t* evict, Stream stream) {
  const DecodeDims d = make_decode_dims(c);
  require_cache(cache);
  if (first < 0 || n < 1 || first + n > d.B)
    throw dma::Error("prefill: sequences " + std::to_string(first) + ".." + std::to_string(first + n - 1) +
                     " are not within 0.." + std::to_string(d.B - 1));
  if (P < 0 || P >= (int64_t{1} << 30))
    throw dma::Error("prefill: P = " + std::to_string(P) + " (must be 0 <= P < 2^30)");
  if (P == 0) {
    for (int64_t b = first; b < first + n; ++b) reset_sequence(c, cache, b, stream);
    return;
  }
  require(k, "k"), require(v, "v"), require(delta, "delta"), require(evict, "evict");
  const dim3 grid(d.Hd, (unsigned)n);
  dispatch(c.precision, d.D, [&](auto, auto head_dim) {
    constexpr int HD = decltype(head_dim)::value;
    decode_prefill_kernel<HD><<<grid, 256, 0, as_stream(stream)>>>(
        d, (int)first, (int)P, static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v),
        delta, evict, static_cast<uint16_t*>(cache.k), static_cast<uint16_t*>(cache.v), cache.delta,
        cache.pos, cache.count, cache.length);
    DMA_CUDA_CHECK_LAUNCH(decode_prefill_kernel);
  });
}

size_t step_workspace_bytes(const DecodeConfig& c) { return step_layout(make_decode_dims(c)).bytes; }

void step(const DecodeConfig& c, const DeviceCache& cache, const StepBuffers& b, void* workspace,
          size_t workspace_size, Stream stream) {
  const DecodeDims d = make_decode_dims(c);
  require_cache(cache);
  require(b.q, "q"), require(b.k, "k"), require(b.v, "v"), require(b.o, "o"), require(b.lse, "lse");
  require(b.status, "status");
  if (!b.delta_given) require(b.w_dt, "w_dt (or delta_given)"), require(b.a, "a (or delta_given)");
  const StepLayout m = step_layout(d);
  if (workspace_size < m.bytes || workspace == nullptr)
    throw dma::Error("cuda decode: the workspace has " + std::to_string(workspace_size) +
                     " bytes, a step needs " + std::to_string(m.bytes) + " (dma::cuda::step_workspace_bytes)");
  StepArgs a{};
  a.ck = static_cast<uint16_t*>(cache.k);
  a.cv = static_cast<uint16_t*>(cache.v);
  a.cdelta = cache.delta;
  a.cpos = cache.pos;
  a.ccount = cache.count;
  a.clength = cache.length;
  a.q = static_cast<const uint16_t*>(b.q);
  a.k = static_cast<const uint16_t*>(b.k);
  a.v = static_cast<const uint16_t*>(b.v);
  a.active = b.active;
  a.w_dt = b.w_dt;
  a.a = b.a;
  a.delta_given = b.delta_given;
  a.o = b.o;
  a.lse = b.lse;
  a.delta_out = b.delta_out;
  a.evicted = b.evicted;
  a.status = reinterpret_cast<unsigned long long*>(b.status);
  a.part = offset<float>(workspace, m.part);
  a.decision = offset<Decision>(workspace, m.decision);
  dispatch(c.precision, d.D, [&](auto elem, auto head_dim) {
    using T = decltype(elem);
    constexpr int HD = decltype(head_dim)::value;
    decode_step_kernel<T, HD><<<dim3(d.splits, d.Hd, d.B), kThreads, 0, as_stream(stream)>>>(d, a);
    DMA_CUDA_CHECK_LAUNCH(decode_step_kernel);
    decode_combine_kernel<T, HD><<<dim3(d.Hd, d.B), kThreads, 0, as_stream(stream)>>>(d, a);
    DMA_CUDA_CHECK_LAUNCH(decode_combine_kernel);
  });
}

void check_step_status(const DecodeConfig& c, const int64_t* status, Stream stream) {
  const DecodeDims d = make_decode_dims(c);
  require(status, "status");
  int64_t bad = -1;
  DMA_CUDA_CHECK(cudaMemcpyAsync(&bad, status, sizeof bad, cudaMemcpyDeviceToHost, as_stream(stream)));
  DMA_CUDA_CHECK(cudaStreamSynchronize(as_stream(stream)));
  if (bad >= 0)
    throw dma::Error("decode: the new token's delta" + format_index(bad, {d.B, d.Hd}) + " (sequence " +
                     std::to_string(bad / d.Hd) + ", delta head " + std::to_string(bad % d.Hd) +
                     ") is not finite or beyond float32 range / log2(e); reset that sequence");
}

}  // namespace dma::cuda
