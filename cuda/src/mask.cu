// The dynamic mask (paper Eq. 4) in eviction-interval form, built in parallel on the GPU.
//
// Key j is kept by exactly the query positions p with j <= p <= e_j, where e_j is one less than
// the position of the w-th key (in order of position, over all Lk keys) that ranks above j, or
// Lk-1 if fewer than w keys rank above j (docs/design.md §2, core/include/dma/mask.hpp). The CPU
// reference finds every e_j with one min-heap sweep; that is sequential. Here every key finds its
// own e_j independently ("count the keys above me, in order of position, until w"), which is
// parallel but would cost O(Lk) per key if done naively. Sorted chunks make the count cheap:
//
//   pass 1  every (delta, index) pair becomes one sortable 64-bit key (larger = ranks higher);
//           the keys of each chunk of 1024 positions and of each chunk of 128 positions are
//           sorted (bitonic sort in shared memory).
//   pass 2  one thread per key j (a fine chunk's keys in rank order: a warp's keys walk about
//           equally far) walks the 1024-chunks in order of position, counting the keys
//           above its own with a binary search in each sorted chunk (10 steps), until the count
//           would reach w; inside that chunk it walks the 128-chunks the same way, and inside
//           that 128-chunk it walks the positions. Cost per key: Lk/1024 * 10 + 8 * 7 + 128
//           steps at most, instead of Lk. The searches of kGroup = 8 consecutive chunks (and the
//           loads of 8 consecutive positions) do not depend on each other and run side by side:
//           a key waits for Lk/8192 * 11 + 8 + 16 rounds of loads, not for every load in turn.
//
// When w >= Lk nothing is ever evicted: every e_j = Lk-1 and pass 1 is skipped. From evict the
// candidate tables are built next (candidates.cu).
#include "common.cuh"
#include "kernels.hpp"

namespace dma::cuda::detail {
namespace {

constexpr int kBig = 1024;           // positions per coarse chunk
constexpr int kSmall = 128;          // positions per fine chunk

// keys (B*Hd, Lk) <- rank_key(delta, j); sorted (B*Hd, n_chunks*C) <- each chunk sorted ascending
// (padding past Lk is 0, which ranks below every real key). grid (n_chunks, B*Hd), C threads.
template <int C>
__global__ void __launch_bounds__(C) sort_chunks_kernel(int Lk, const float* __restrict__ delta,
                                                        uint64_t* __restrict__ keys,
                                                        uint64_t* __restrict__ sorted) {
  __shared__ uint64_t s[C];
  const int bh = blockIdx.y, tid = threadIdx.x, j = blockIdx.x * C + tid;
  const uint64_t key = j < Lk ? rank_key(delta[(size_t)bh * Lk + j], j) : 0ull;
  if (keys != nullptr && j < Lk) keys[(size_t)bh * Lk + j] = key;
  s[tid] = key;
  __syncthreads();  // the whole chunk is in shared memory before the sort network starts
  for (int k = 2; k <= C; k <<= 1) {
    for (int step = k >> 1; step > 0; step >>= 1) {
      const int other = tid ^ step;
      if (other > tid) {
        const bool ascending = (tid & k) == 0;
        const uint64_t x = s[tid], y = s[other];
        if ((x > y) == ascending) { s[tid] = y; s[other] = x; }
      }
      __syncthreads();  // each compare-exchange stage reads what the previous stage wrote
    }
  }
  const size_t n_chunks = gridDim.x;
  sorted[((size_t)bh * n_chunks + blockIdx.x) * C + tid] = s[tid];
}

constexpr int kGroup = 8;  // chunks (and positions) examined side by side

// above[g] = the number of entries larger than `key` in chunk c0 + g, for g < kGroup: ascending
// arrays of C keys, chunk c at s + c * C (chunks past `last` are read as chunk `last`: the
// caller ignores them). The kGroup binary searches advance together, one load each per step.
template <int C>
__device__ __forceinline__ void count_above(const uint64_t* __restrict__ s, int c0, int last,
                                            uint64_t key, int above[kGroup]) {
  const uint64_t* chunk[kGroup];
  int lo[kGroup];  // first index with chunk[g][index] > key, by binary search
  #pragma unroll
  for (int g = 0; g < kGroup; ++g) chunk[g] = s + (size_t)min(c0 + g, last) * C, lo[g] = 0;
  #pragma unroll
  for (int step = C / 2; step > 0; step /= 2)  // lo = min(#entries <= key, C-1)
    #pragma unroll
    for (int g = 0; g < kGroup; ++g)
      if (__ldg(chunk[g] + lo[g] + step - 1) <= key) lo[g] += step;
  #pragma unroll
  for (int g = 0; g < kGroup; ++g) {
    lo[g] += __ldg(chunk[g] + lo[g]) <= key;  // only when lo == C-1: all C entries are <= key
    above[g] = C - lo[g];
  }
}

// grid (n_small_chunks, B*Hd), 128 threads: one key of the fine chunk per thread, in the chunk's
// sorted order. How far a key walks grows with its rank (the highest walk to the end), and a warp
// takes as long as its longest walk: with the keys in rank order the highest ranks of a chunk
// share a warp, and the other warps stop early (in position order, most warps held one of the few
// long walks).
__global__ void __launch_bounds__(kSmall) evict_kernel(int Lk, int window,
                                                        const uint64_t* __restrict__ keys,
                                                        const uint64_t* __restrict__ sorted_big,
                                                        const uint64_t* __restrict__ sorted_small,
                                                        int* __restrict__ evict) {
  const int bh = blockIdx.y;
  const int n_big = (Lk + kBig - 1) / kBig, n_small = (Lk + kSmall - 1) / kSmall;
  const uint64_t* keys_bh = keys + (size_t)bh * Lk;
  const uint64_t key = sorted_small[((size_t)bh * n_small + blockIdx.x) * kSmall + threadIdx.x];
  if (key != 0ull) {  // (0: the padding past Lk, which sorts first)
    const int j = static_cast<int>(static_cast<uint32_t>(key));  // rank_key's low word
    int need = window;  // keys above j still to meet before j is evicted
    int e = Lk - 1;     // unless we meet w of them
    static_assert(kBig / kSmall == kGroup, "one group of fine chunks spans a coarse chunk");
    const uint64_t* big_bh = sorted_big + (size_t)bh * n_big * kBig;
    const uint64_t* small_bh = sorted_small + (size_t)bh * n_small * kSmall;
    int cb = -1;  // the coarse chunk that holds the w-th key above j
    for (int c0 = 0; c0 < n_big && cb < 0; c0 += kGroup) {
      int above[kGroup];
      count_above<kBig>(big_bh, c0, n_big - 1, key, above);
      #pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        if (cb >= 0 || c0 + g >= n_big) continue;
        if (above[g] < need) need -= above[g];
        else cb = c0 + g;
      }
    }
    if (cb >= 0) {
      // Refine over its fine chunks (all eight in one group) ...
      int above[kGroup], cs = -1;
      count_above<kSmall>(small_bh, cb * kGroup, n_small - 1, key, above);
      #pragma unroll
      for (int g = 0; g < kGroup; ++g) {
        if (cs >= 0) continue;
        if (above[g] < need) need -= above[g];
        else cs = cb * kGroup + g;
      }
      // ... and over the positions of that fine chunk, kGroup at a time, in order. (The chunk
      // holds the key sought, so the walk ends inside it and inside 0 .. Lk-1.)
      for (int m0 = max(cs, 0) * kSmall; e == Lk - 1 && m0 < Lk; m0 += kGroup) {
        uint64_t k8[kGroup];
        #pragma unroll
        for (int g = 0; g < kGroup; ++g) k8[g] = __ldg(keys_bh + min(m0 + g, Lk - 1));
        #pragma unroll
        for (int g = 0; g < kGroup; ++g)
          if (e == Lk - 1 && k8[g] > key && --need == 0) e = m0 + g - 1;
      }
    }
    evict[(size_t)bh * Lk + j] = e;
  }
}

// w >= Lk: no key is ever evicted.
__global__ void no_eviction_kernel(int Lk, int n_bh, int* __restrict__ evict) {
  const size_t n = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (n < (size_t)n_bh * Lk) evict[n] = Lk - 1;
}

}  // namespace

// Scratch sizes: keys B*Hd*Lk, sorted B*Hd*(n_big*1024 + n_small*128) 64-bit words.
void launch_mask(const Dims& d, const float* delta, int* evict, uint64_t* keys, uint64_t* sorted,
                 cudaStream_t st) {
  const int n_bh = d.B * d.Hd, n_small = (d.Lk + kSmall - 1) / kSmall, n_big = (d.Lk + kBig - 1) / kBig;
  if (d.window >= d.Lk) {
    const size_t n = (size_t)n_bh * d.Lk;
    no_eviction_kernel<<<(unsigned)((n + 255) / 256), 256, 0, st>>>(d.Lk, n_bh, evict);
    DMA_CUDA_CHECK_LAUNCH(no_eviction_kernel);
    return;
  }
  uint64_t* sorted_big = sorted;
  uint64_t* sorted_small = sorted + (size_t)n_bh * n_big * kBig;
  sort_chunks_kernel<kBig><<<dim3(n_big, n_bh), kBig, 0, st>>>(d.Lk, delta, nullptr, sorted_big);
  DMA_CUDA_CHECK_LAUNCH(sort_chunks_kernel);
  sort_chunks_kernel<kSmall><<<dim3(n_small, n_bh), kSmall, 0, st>>>(d.Lk, delta, keys,
                                                                     sorted_small);
  DMA_CUDA_CHECK_LAUNCH(sort_chunks_kernel);
  evict_kernel<<<dim3(n_small, n_bh), kSmall, 0, st>>>(d.Lk, d.window, keys, sorted_big,
                                                       sorted_small, evict);
  DMA_CUDA_CHECK_LAUNCH(evict_kernel);
}

}  // namespace dma::cuda::detail
