// Decoding on the GPU with a cache of w entries per (sequence, delta head) (dma/cuda_decode.hpp,
// docs/design.md §2.10 and §4 Decode).
//
// A step is one launch, decode_step_kernel, grid (splits, Hd, B). Every block of (b, hd):
//   a. issues its loads first: the cached k, v, delta of its first slots, the newcomer's k and v,
//      the query rows, and (when the cache is full) the rank keys of all w entries, so that their
//      latencies overlap instead of adding up (B = 1 is a chain of memory latencies, not bandwidth)
//   b. delta of the new token: vflat (Hkv*D) . w_dt[hd], softplus, exp or linear (or given)
//   c. the eviction decision: when the cache is full, the lowest-ranked of its w entries and the
//      newcomer (the smallest 64-bit rank key, common.cuh's rank_key) leaves
//   d. split-K attention over its share of the survivors (the w slots with the newcomer in the slot
//      it takes), for every query head of hd, as a partial softmax state (m, l, o) in the workspace
//   e. the last block of (b, hd) to finish (an arrival counter in the cache) merges the splits in
//      split order into o and lse, writes the newcomer into its slot and resets the counter; the
//      last delta head of b to finish advances length[b] (a second counter).
// The blocks of one (b, hd) repeat b and c: they read the same values in the same order and reach
// the same decision, so no block waits for another. The cache is written only in e, after every
// block of (b, hd) has read it (for length: every block of b), so all read it as the previous step
// left it. The merge order is fixed, so the result does not depend on which block came last.
//
// Prefill (decode_prefill_kernel, grid (Hd, n)) compacts { j < P : e_j >= P-1 } of a prompt
// forward into the slots, in position order, and zeroes the sequences' arrival counters, so that
// a sequence of a new cache (any bytes) that prefill or reset_sequence sets up can step.
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
constexpr int kRound = 8;               // key groups per lane loaded before any is used
constexpr int kMinSlotsPerSplit = 64;
constexpr int kTargetBlocks = 264;      // about 2 per SM of an H100/H200; any value is correct
constexpr int kUnsplitHeads = 132;      // from this many (b, hd) on, one block each: every split
                                        // re-reads the w rank keys (measured on the H200)
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

struct StepArgs {
  // the cache (read by every block, written by the last block of each (b, hd))
  uint16_t *ck, *cv;   // (B,Hd,w,D) elem bits
  float* cdelta;       // (B,Hd,w)
  int *cpos, *ccount, *clength;
  int *arrivals, *seq_arrivals;  // (B,Hd), (B): blocks finished in this step, 0 between steps
  // the new tokens
  const uint16_t *q, *k, *v;  // (B,Hq,D), (B,Hkv,D) x2
  const uint8_t* active;
  const float *w_dt, *a, *delta_given;
  // outputs and scratch
  float *o, *lse, *delta_out;
  int* evicted;
  unsigned long long* status;
  float* part_o;        // (B,Hq,splits,D): the splits' unnormalized o
  float* part_ml;       // (B,Hq,splits,2): their m (base 2) and l
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
__device__ __forceinline__ void unpack8(const uint4 u, float (&x)[8]) {
  const float2 a = Elem<T>::unpack(u.x), b = Elem<T>::unpack(u.y);
  const float2 c = Elem<T>::unpack(u.z), d = Elem<T>::unpack(u.w);
  x[0] = a.x; x[1] = a.y; x[2] = b.x; x[3] = b.y; x[4] = c.x; x[5] = c.y; x[6] = d.x; x[7] = d.y;
}
__device__ __forceinline__ uint4 load16(const uint16_t* p) { return *reinterpret_cast<const uint4*>(p); }

// The cached k, v and delta of one round of slots: kRound groups of kWarps * keys_per_warp
// consecutive slots, a warp's keys_per_warp of them per group. Slots at or past `end` (not
// cached, or not this block's) are not read.
struct Round {
  uint4 k[kRound], v[kRound];
  float delta[kRound];
};

// The slot lane `lane` of warp `warp` holds in group r of the round starting at `first`.
template <int D>
__device__ __forceinline__ int round_slot(int first, int r, int warp, int lane) {
  constexpr int kLanesPerKey = D / 8, kKeysPerWarp = 32 / kLanesPerKey;
  return first + (r * kWarps + warp) * kKeysPerWarp + lane / kLanesPerKey;
}

template <int D>
__device__ __forceinline__ void load_round(Round& rd, const StepArgs& s, size_t bh, int w, int first,
                                           int end, int warp, int lane) {
  const int lk = lane % (D / 8);
  #pragma unroll
  for (int r = 0; r < kRound; ++r) {
    const int slot = round_slot<D>(first, r, warp, lane);
    if (slot < end) {
      const size_t row = (bh * w + slot) * D + lk * 8;
      rd.k[r] = load16(s.ck + row);
      rd.v[r] = load16(s.cv + row);
      rd.delta[r] = s.cdelta[bh * w + slot];
    } else {
      rd.k[r] = rd.v[r] = make_uint4(0, 0, 0, 0);
      rd.delta[r] = 0.0f;
    }
  }
}

// The last block of (b, hd): o and lse of every query head of hd from the splits' partial states.
// Every thread takes 4 dims of o and a slice of the splits (split = slice, slice + kSlices, ...):
// it loads their (m, l, o) at once, merges them against its own maximum, and the slices are then
// merged in slice order; one round trip to L2 per kWarps heads. Every sum has a fixed order, so
// the result does not depend on which block came last. Reads what other blocks wrote (visible
// after their arrivals), bypassing L1.
template <int D>
__device__ void combine_splits(const DecodeDims& d, const StepArgs& s, int b, int hd, bool ok) {
  constexpr int kLanesPerRow = D / 4;               // a float4 of o per thread
  constexpr int kSlices = kThreads / kLanesPerRow;  // splits merged side by side
  __shared__ float o_slices[kWarps][kSlices][D];
  __shared__ float m_slices[kWarps][kSlices], l_slices[kWarps][kSlices];
  const int heads = d.heads_per_delta_head(), tid = threadIdx.x;
  const int slice = tid / kLanesPerRow, c = (tid % kLanesPerRow) * 4;
  for (int h0 = 0; h0 < heads; h0 += kWarps) {
    const int nh = min(kWarps, heads - h0);
    const size_t row0 = (size_t)b * d.Hq + hd * heads + h0;  // the first query head of the chunk
    #pragma unroll
    for (int h = 0; h < kWarps; ++h) {
      if (h >= nh) break;
      const float2* ml = reinterpret_cast<const float2*>(s.part_ml) + (row0 + h) * d.splits;
      const float4* po = reinterpret_cast<const float4*>(s.part_o + (row0 + h) * d.splits * D + c);
      float m = -INFINITY, l = 0.0f, acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      #pragma unroll 4
      for (int sp = slice; sp < d.splits; sp += kSlices) {
        const float2 x = __ldcg(ml + sp);
        const float4 y = __ldcg(po + (size_t)sp * (D / 4));
        const float o2[4] = {y.x, y.y, y.z, y.w};
        merge_state(m, l, acc, x.x, x.y, o2);
      }
      #pragma unroll
      for (int e = 0; e < 4; ++e) o_slices[h][slice][c + e] = acc[e];
      if (c == 0) m_slices[h][slice] = m, l_slices[h][slice] = l;
    }
    __syncthreads();  // every slice is in shared memory
    if (tid < D)
      for (int h = 0; h < nh; ++h) {
        float m = m_slices[h][0], l = l_slices[h][0], o[1] = {o_slices[h][0][tid]};
        #pragma unroll
        for (int sl = 1; sl < kSlices; ++sl) {
          const float o2[1] = {o_slices[h][sl][tid]};
          merge_state(m, l, o, m_slices[h][sl], l_slices[h][sl], o2);
        }
        s.o[(row0 + h) * D + tid] = ok ? o[0] / l : 0.0f;
        if (tid == 0) s.lse[row0 + h] = ok ? (m + log2f(l)) * kLn2 : 0.0f;
      }
    __syncthreads();  // the shared arrays are read before the next chunk writes them
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) decode_step_kernel(DecodeDims d, StepArgs s) {
  constexpr int kLanesPerKey = D / 8;            // each lane holds 8 of the D dims of a key
  constexpr int kKeysPerWarp = 32 / kLanesPerKey;
  constexpr int kRoundSlots = kRound * kWarps * kKeysPerWarp;  // slots per round of a block
  const int split = blockIdx.x, hd = blockIdx.y, b = blockIdx.z;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, tid = threadIdx.x;
  const int lk = lane % kLanesPerKey;  // this lane's 8 dims: lk*8 .. lk*8+7
  const int bh = b * d.Hd + hd, hk = d.kv_head_of_delta_head(hd), heads = d.heads_per_delta_head();
  if (s.active && !s.active[b]) {  // not stepping: zeros, the cache untouched
    if (split != 0) return;
    for (int h = 0; h < heads; ++h) {
      const size_t row = (size_t)b * d.Hq + hd * heads + h;
      if (tid < D) s.o[row * D + tid] = 0.0f;
      if (tid == 0) s.lse[row] = 0.0f;
    }
    if (tid == 0 && s.delta_out) s.delta_out[bh] = 0.0f;
    if (tid == 0 && s.evicted) s.evicted[bh] = -1;
    return;
  }
  __shared__ float sum_smem[kWarps];
  __shared__ uint64_t min_smem[kWarps];
  __shared__ int leaving_slot, last_of_head;

  // a. the loads. First what does not depend on the cache: the new token's k, v, its values for
  // delta (the first 8 of Hkv*D per thread) and the query rows of the first kMaxHeads heads.
  const int p = s.clength[b], n = s.ccount[bh];
  const size_t fresh = ((size_t)b * d.Hkv + hk) * D + lk * 8;
  const uint4 k_new = load16(s.k + fresh), v_new = load16(s.v + fresh);
  const int HD = d.Hkv * D;  // a multiple of 8: 8 values (16 bytes) per load
  uint4 v_first = make_uint4(0, 0, 0, 0);
  float4 w_first0 = make_float4(0, 0, 0, 0), w_first1 = w_first0;
  if (!s.delta_given && tid * 8 < HD) {
    v_first = load16(s.v + (size_t)b * HD + tid * 8);
    w_first0 = *reinterpret_cast<const float4*>(s.w_dt + (size_t)hd * HD + tid * 8);
    w_first1 = *reinterpret_cast<const float4*>(s.w_dt + (size_t)hd * HD + tid * 8 + 4);
  }
  float qf[kMaxHeads][8];
  auto load_queries = [&](int h0) {
    #pragma unroll
    for (int h = 0; h < kMaxHeads; ++h) {
      #pragma unroll
      for (int e = 0; e < 8; ++e) qf[h][e] = 0.0f;
      if (h0 + h < heads) {
        unpack8<T>(load16(s.q + ((size_t)b * d.Hq + hd * heads + h0 + h) * D + lk * 8), qf[h]);
        #pragma unroll
        for (int e = 0; e < 8; ++e) qf[h][e] *= d.scale_log2;
      }
    }
  };
  load_queries(0);
  // Then the cache: the first round of this block's slots, and the rank keys of all w entries.
  const int s0 = split * d.slots_per_split, s_end = min(d.w, s0 + d.slots_per_split);
  Round rd;
  load_round<D>(rd, s, bh, d.w, s0, min(n, s_end), warp, lane);
  uint64_t cached_min = ~uint64_t{0};  // the lowest rank key among this thread's cached entries
  int cached_min_slot = -1;
  if (n >= d.w) {
    #pragma unroll 16
    for (int slot = tid; slot < d.w; slot += kThreads) {
      const uint64_t key = rank_key(s.cdelta[(size_t)bh * d.w + slot], s.cpos[(size_t)bh * d.w + slot]);
      if (key < cached_min) cached_min = key, cached_min_slot = slot;
    }
  }

  // b. delta of the new token from vflat[b] = v[b, 0..Hkv-1, :] and w_dt[hd]
  float delta_new;
  if (s.delta_given) {
    delta_new = s.delta_given[bh];
  } else {
    float z = 0.0f;
    for (int c = tid * 8; c < HD; c += kThreads * 8) {
      float4 w0 = w_first0, w1 = w_first1;
      uint4 vu = v_first;
      if (c != tid * 8) {  // past the first 8 (Hkv*D > 8 * kThreads)
        vu = load16(s.v + (size_t)b * HD + c);
        w0 = *reinterpret_cast<const float4*>(s.w_dt + (size_t)hd * HD + c);
        w1 = *reinterpret_cast<const float4*>(s.w_dt + (size_t)hd * HD + c + 4);
      }
      float vf[8];
      unpack8<T>(vu, vf);
      z = fmaf(vf[0], w0.x, z); z = fmaf(vf[1], w0.y, z); z = fmaf(vf[2], w0.z, z); z = fmaf(vf[3], w0.w, z);
      z = fmaf(vf[4], w1.x, z); z = fmaf(vf[5], w1.y, z); z = fmaf(vf[6], w1.z, z); z = fmaf(vf[7], w1.w, z);
    }
    z = block_sum(z, sum_smem);
    const float u = s.a[hd] * softplus(z);
    delta_new = d.linear ? u : expf(u);
  }
  const bool ok = fabsf(delta_new) <= kMaxDelta;  // NaN fails too
  if (!ok && split == 0 && tid == 0) atomicMin(s.status, (unsigned long long)bh);

  // c. which entry leaves: the smallest rank key among the w cached entries and the newcomer
  int new_slot = n;  // not full: the newcomer takes the next free slot
  if (n >= d.w) {
    const uint64_t new_key = rank_key(delta_new, p);
    const uint64_t mine = cached_min < new_key ? cached_min : new_key;
    const uint64_t lowest = block_min(mine, min_smem);
    if (tid == 0) leaving_slot = -1;
    __syncthreads();  // leaving_slot is reset before the owner of the minimum writes it
    if (cached_min_slot >= 0 && cached_min == lowest) leaving_slot = cached_min_slot;  // keys are unique
    __syncthreads();  // leaving_slot is written
    new_slot = leaving_slot;  // -1: the newcomer ranks lowest and leaves itself
  }
  const int n_used = n < d.w ? n + 1 : d.w;  // survivors after the step
  const int s1 = ok ? min(n_used, s_end) : s0;  // a flagged delta: no keys

  // d. split-K attention over slots s0..s1-1 for the query heads of hd, kMaxHeads at a time
  __shared__ float m_smem[kWarps][kMaxHeads], l_smem[kWarps][kMaxHeads];
  __shared__ float acc_smem[kWarps][kMaxHeads][D];
  bool loaded = true;  // the first round is in rd already
  for (int h0 = 0; h0 < heads; h0 += kMaxHeads) {
    const int nh = min(kMaxHeads, heads - h0);
    if (h0 > 0) load_queries(h0);
    float m[kMaxHeads], l[kMaxHeads], acc[kMaxHeads][8];
    #pragma unroll
    for (int h = 0; h < kMaxHeads; ++h) {
      m[h] = -INFINITY;
      l[h] = 0.0f;
      #pragma unroll
      for (int e = 0; e < 8; ++e) acc[h][e] = 0.0f;
    }
    // The loop bounds are the block's, so that the dot-product shuffles stay converged; a lane
    // past the end adds nothing.
    for (int first = s0; first < s1; first += kRoundSlots) {
      if (!loaded) load_round<D>(rd, s, bh, d.w, first, min(n, s1), warp, lane);
      loaded = false;
      // The round's scores first (independent of each other), then one rescale per round: no
      // chain of dependent softmax updates from key to key.
      float score[kRound][kMaxHeads];
      #pragma unroll
      for (int r = 0; r < kRound; ++r) {
        const int slot = round_slot<D>(first, r, warp, lane);
        const bool valid = slot < s1, is_new = slot == new_slot;
        float kf[8];
        unpack8<T>(is_new ? k_new : rd.k[r], kf);
        const float bias = (is_new ? delta_new : rd.delta[r]) * kLog2e;
        #pragma unroll
        for (int h = 0; h < kMaxHeads; ++h) {
          if (h >= nh) break;  // uniform across the block: the shuffles below stay converged
          float dot = 0.0f;
          #pragma unroll
          for (int e = 0; e < 8; ++e) dot = fmaf(qf[h][e], kf[e], dot);
          #pragma unroll
          for (int off = kLanesPerKey / 2; off > 0; off /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, off);
          score[r][h] = valid ? dot + bias : -INFINITY;  // log2(e) * (scale q.k + delta)
        }
      }
      #pragma unroll
      for (int h = 0; h < kMaxHeads; ++h) {
        if (h >= nh) break;
        float m_new = m[h];
        #pragma unroll
        for (int r = 0; r < kRound; ++r) m_new = fmaxf(m_new, score[r][h]);
        if (m_new == -INFINITY) continue;  // no key of this lane in the round
        const float corr = fast_exp2(m[h] - m_new);
        l[h] *= corr;
        #pragma unroll
        for (int e = 0; e < 8; ++e) acc[h][e] *= corr;
        m[h] = m_new;
      }
      #pragma unroll
      for (int r = 0; r < kRound; ++r) {
        const int slot = round_slot<D>(first, r, warp, lane);
        float vf[8];
        unpack8<T>(slot == new_slot ? v_new : rd.v[r], vf);
        #pragma unroll
        for (int h = 0; h < kMaxHeads; ++h) {
          if (h >= nh) break;
          const float pj = score[r][h] == -INFINITY ? 0.0f : fast_exp2(score[r][h] - m[h]);
          l[h] += pj;
          #pragma unroll
          for (int e = 0; e < 8; ++e) acc[h][e] = fmaf(pj, vf[e], acc[h][e]);
        }
      }
    }
    // merge the key groups of a warp (lanes kLanesPerKey apart hold the same dims), then warps
    #pragma unroll
    for (int h = 0; h < kMaxHeads; ++h) {
      if (h >= nh) break;  // uniform across the block
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
    if (tid < D)
      for (int h = 0; h < nh; ++h) {
        float mm = m_smem[0][h], ll = l_smem[0][h], oo[1] = {acc_smem[0][h][tid]};
        for (int w = 1; w < kWarps; ++w) {
          const float o2[1] = {acc_smem[w][h][tid]};
          merge_state(mm, ll, oo, m_smem[w][h], l_smem[w][h], o2);
        }
        const int hq = hd * heads + h0 + h;
        const size_t at = ((size_t)b * d.Hq + hq) * d.splits + split;
        s.part_o[at * D + tid] = oo[0];
        if (tid == 0) s.part_ml[2 * at] = mm, s.part_ml[2 * at + 1] = ll;
      }
  }

  // e. the last block of (b, hd) to arrive merges the splits and writes the cache
  __threadfence();  // this block's partial states are visible on the device before it arrives
  __syncthreads();  // every thread's fence is done
  if (tid == 0) last_of_head = atomicAdd(s.arrivals + bh, 1) == d.splits - 1;
  __syncthreads();  // last_of_head is written
  if (!last_of_head) return;
  __threadfence();  // the other blocks' partial states are read after their arrivals
  combine_splits<D>(d, s, b, hd, ok);
  // the position that leaves: none while the cache fills, else the slot's or the newcomer's own
  const int evicted = n < d.w ? -1 : new_slot >= 0 ? s.cpos[(size_t)bh * d.w + new_slot] : p;
  __syncthreads();  // read before thread 0 overwrites the slot's position
  if (ok && new_slot >= 0) {  // the newcomer takes its slot: every block has read the cache
    const size_t slot = (size_t)bh * d.w + new_slot;
    if (warp == 0 && lane < kLanesPerKey) {  // these lanes hold all D dims of k_new and v_new
      *reinterpret_cast<uint4*>(s.ck + slot * D + lk * 8) = k_new;
      *reinterpret_cast<uint4*>(s.cv + slot * D + lk * 8) = v_new;
    }
    if (tid == 0) {
      s.cdelta[slot] = delta_new;
      s.cpos[slot] = p;
      if (n < d.w) s.ccount[bh] = n + 1;
    }
  }
  __threadfence();  // the new entry is visible on the device before this delta head arrives
  __syncthreads();  // every thread's fence is done
  if (tid == 0) {
    if (s.delta_out) s.delta_out[bh] = delta_new;
    if (s.evicted) s.evicted[bh] = ok ? evicted : -1;
    s.arrivals[bh] = 0;  // ready for the next step
    // length[b] moves when every delta head of b is done: every block of b has read it (a
    // block's reads are complete before its arrival)
    if (atomicAdd(s.seq_arrivals + b, 1) == d.Hd - 1) {
      s.seq_arrivals[b] = 0;
      __threadfence();  // every delta head's new entry is visible before the length that counts it
      s.clength[b] = p + 1;
    }
  }
}

// Compacts the kept keys of a prompt of P tokens into the slots of sequence first + blockIdx.y
// and zeroes its arrival counters (those of a new cache hold whatever the memory held).
template <int D>
__global__ void __launch_bounds__(256) decode_prefill_kernel(DecodeDims d, int first, int P,
                                                             const uint16_t* __restrict__ k,
                                                             const uint16_t* __restrict__ v,
                                                             const float* __restrict__ delta,
                                                             const int* __restrict__ evict,
                                                             uint16_t* ck, uint16_t* cv,
                                                             float* cdelta, int* cpos, int* ccount,
                                                             int* clength, int* arrivals,
                                                             int* seq_arrivals) {
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
  if (tid == 0) ccount[bh] = count, arrivals[bh] = 0;
  __syncthreads();  // the positions written above are visible to the whole block
  for (int e = tid; e < count * D; e += 256) {
    const int slot = e / D, dd = e % D;
    const int j = cpos[(size_t)bh * d.w + slot];
    ck[((size_t)bh * d.w + slot) * D + dd] = k[(((size_t)bi * d.Hkv + hk) * P + j) * D + dd];
    cv[((size_t)bh * d.w + slot) * D + dd] = v[(((size_t)bi * d.Hkv + hk) * P + j) * D + dd];
  }
  if (tid == 0 && hd == 0) clength[b] = P, seq_arrivals[b] = 0;
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
  if (l.D != 64 && l.D != 128)
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
  const int want = d.B * d.Hd >= kUnsplitHeads ? 1 : (kTargetBlocks + d.B * d.Hd - 1) / (d.B * d.Hd);
  d.splits = std::max(1, std::min(want, max_splits));
  d.slots_per_split = (d.w + d.splits - 1) / d.splits;
  d.scale_log2 = static_cast<float>(scale) * kLog2e;
  d.linear = l.form == Form::linear;
  return d;
}

size_t align256(size_t n) { return (n + 255) / 256 * 256; }

struct CacheLayout {
  size_t k, v, delta, pos, count, length, arrivals, bytes;
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
  m.arrivals = take((size_t)d.B * (d.Hd + 1) * sizeof(int32_t));  // (B,Hd) then (B)
  m.bytes = at;
  return m;
}

// The step's workspace: the splits' partial softmax states, o (B,Hq,splits,D) then m, l
// (B,Hq,splits,2), float32.
size_t step_o_bytes(const DecodeDims& d) { return align256((size_t)d.B * d.Hq * d.splits * d.D * sizeof(float)); }
size_t step_bytes(const DecodeDims& d) {
  return step_o_bytes(d) + align256((size_t)d.B * d.Hq * d.splits * 2 * sizeof(float));
}

template <typename T>
T* offset(void* base, size_t bytes) { return reinterpret_cast<T*>(static_cast<char*>(base) + bytes); }

// The step loads 16 bytes at a time from the new tokens, w_dt and the cached k, v.
void require_aligned(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0)
    throw dma::Error(std::string("cuda decode: ") + what + " is not 16-byte aligned");
}

void require_cache(const DeviceCache& cache) {
  require(cache.k, "cache.k"), require(cache.v, "cache.v"), require(cache.delta, "cache.delta");
  require(cache.pos, "cache.pos"), require(cache.count, "cache.count"), require(cache.length, "cache.length");
  require(cache.arrivals, "cache.arrivals");
  require_aligned(cache.k, "cache.k"), require_aligned(cache.v, "cache.v");
}

// Sequences first .. first+n-1 empty (count = length = 0), their arrival counters zeroed.
void empty_sequences(const DecodeDims& d, const DeviceCache& cache, int64_t first, int64_t n,
                     cudaStream_t stream) {
  const size_t head_bytes = (size_t)n * d.Hd * sizeof(int32_t), seq_bytes = (size_t)n * sizeof(int32_t);
  DMA_CUDA_CHECK(cudaMemsetAsync(cache.count + first * d.Hd, 0, head_bytes, stream));
  DMA_CUDA_CHECK(cudaMemsetAsync(cache.length + first, 0, seq_bytes, stream));
  DMA_CUDA_CHECK(cudaMemsetAsync(cache.arrivals + first * d.Hd, 0, head_bytes, stream));
  DMA_CUDA_CHECK(cudaMemsetAsync(cache.arrivals + (size_t)d.B * d.Hd + first, 0, seq_bytes, stream));
}

}  // namespace

void check_decode_config(const DecodeConfig& c) { make_decode_dims(c); }

size_t cache_bytes(const DecodeConfig& c) { return cache_layout(make_decode_dims(c)).bytes; }

size_t cache_bytes_per_sequence(const DecodeConfig& c) {
  const DecodeDims d = make_decode_dims(c);
  return (size_t)d.Hd * d.w * (2 * d.D * 2 + sizeof(float) + sizeof(int32_t)) +
         (size_t)(2 * d.Hd + 2) * sizeof(int32_t);  // count, length, arrivals
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
  cache.arrivals = offset<int32_t>(memory, m.arrivals);
  return cache;
}

void reset_cache(const DecodeConfig& c, const DeviceCache& cache, Stream stream) {
  const DecodeDims d = make_decode_dims(c);
  require_cache(cache);
  empty_sequences(d, cache, 0, d.B, as_stream(stream));
}

void reset_sequence(const DecodeConfig& c, const DeviceCache& cache, int64_t b, Stream stream) {
  const DecodeDims d = make_decode_dims(c);
  require_cache(cache);
  if (b < 0 || b >= d.B)
    throw dma::Error("decode: sequence " + std::to_string(b) + " does not exist (B = " + std::to_string(d.B) + ")");
  empty_sequences(d, cache, b, 1, as_stream(stream));
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
    empty_sequences(d, cache, first, n, as_stream(stream));
    return;
  }
  require(k, "k"), require(v, "v"), require(delta, "delta"), require(evict, "evict");
  const dim3 grid(d.Hd, (unsigned)n);
  dispatch<64, 128>(c.precision, d.D, [&](auto, auto head_dim) {
    constexpr int HD = decltype(head_dim)::value;
    decode_prefill_kernel<HD><<<grid, 256, 0, as_stream(stream)>>>(
        d, (int)first, (int)P, static_cast<const uint16_t*>(k), static_cast<const uint16_t*>(v),
        delta, evict, static_cast<uint16_t*>(cache.k), static_cast<uint16_t*>(cache.v), cache.delta,
        cache.pos, cache.count, cache.length, cache.arrivals, cache.arrivals + (size_t)d.B * d.Hd);
    DMA_CUDA_CHECK_LAUNCH(decode_prefill_kernel);
  });
}

size_t step_workspace_bytes(const DecodeConfig& c) { return step_bytes(make_decode_dims(c)); }

void step(const DecodeConfig& c, const DeviceCache& cache, const StepBuffers& b, void* workspace,
          size_t workspace_size, Stream stream) {
  const DecodeDims d = make_decode_dims(c);
  require_cache(cache);
  require(b.q, "q"), require(b.k, "k"), require(b.v, "v"), require(b.o, "o"), require(b.lse, "lse");
  require(b.status, "status");
  if (!b.delta_given) require(b.w_dt, "w_dt (or delta_given)"), require(b.a, "a (or delta_given)");
  require_aligned(b.q, "q"), require_aligned(b.k, "k"), require_aligned(b.v, "v");
  if (!b.delta_given) require_aligned(b.w_dt, "w_dt");
  const size_t bytes = step_bytes(d);
  if (workspace_size < bytes || workspace == nullptr)
    throw dma::Error("cuda decode: the workspace has " + std::to_string(workspace_size) +
                     " bytes, a step needs " + std::to_string(bytes) + " (dma::cuda::step_workspace_bytes)");
  StepArgs a{};
  a.ck = static_cast<uint16_t*>(cache.k);
  a.cv = static_cast<uint16_t*>(cache.v);
  a.cdelta = cache.delta;
  a.cpos = cache.pos;
  a.ccount = cache.count;
  a.clength = cache.length;
  a.arrivals = cache.arrivals;
  a.seq_arrivals = cache.arrivals + (size_t)d.B * d.Hd;
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
  a.part_o = static_cast<float*>(workspace);
  a.part_ml = offset<float>(workspace, step_o_bytes(d));
  dispatch<64, 128>(c.precision, d.D, [&](auto elem, auto head_dim) {
    using T = decltype(elem);
    constexpr int HD = decltype(head_dim)::value;
    decode_step_kernel<T, HD><<<dim3(d.splits, d.Hd, d.B), kThreads, 0, as_stream(stream)>>>(d, a);
    DMA_CUDA_CHECK_LAUNCH(decode_step_kernel);
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
