// The candidate tables on the GPU: the same tables as core's candidate_table
// (core/include/dma/candidates.hpp), bitwise, so that no attention kernel scans evict.
//
//   slot_sweep_kernel  one block per (b, delta head) sweeps the query tiles in order, as the
//                      definition does: keys whose interval ended leave their slot, the arriving
//                      keys (in increasing j) take the lowest free slots, and the slot row of the
//                      tile is written out. The slots live in shared memory (in global scratch
//                      when w is too large for it); a bitmap of the free slots lets one warp hand
//                      out the lowest ones. Per tile O(S / threads + arrivals) work, 3 barriers.
//   list_kernel        one block per (tile, b, delta head), in parallel: compacts the slot row
//                      into the list, first the keys every query of the tile keeps (no element
//                      mask needed), then the others, each group in slot order.
//
// Tiles of the tables hold kTileQ queries. Nothing is launched when w >= Lk (implicit tables).
#include "common.cuh"
#include "dma/mask_rule.hpp"
#include "kernels.hpp"

namespace dma::cuda::detail {
namespace {

constexpr int kSweepThreads = 512;
constexpr int kSweepWarps = kSweepThreads / 32;
constexpr int kListThreads = 256;
constexpr int kListWarps = kListThreads / 32;
// Slot state per (b, delta head): key and e_j per slot, one bit per slot for "free".
__host__ __device__ size_t sweep_state_bytes(int S) { return sizeof(int) * (2 * (size_t)S + (S + 31) / 32); }
constexpr size_t kSweepSmemLimit = 160 * 1024;  // beyond this the state goes to global scratch

struct TilePositions {
  int p_first, p_last;
};
__device__ __forceinline__ TilePositions tile_positions(const Dims& d, int t) {
  const int i_last = min((t + 1) * kTileQ, d.Lq) - 1;
  return {rule::query_position(d.Lq, d.Lk, d.causal, t * kTileQ),
          rule::query_position(d.Lq, d.Lk, d.causal, i_last)};
}

// Warp 0 only: takes the `count` lowest free slots of the bitmap (clearing their bits) and
// writes them, in increasing order, to slot_of[0 .. count).
__device__ void take_free_slots(unsigned* free_bits, int n_words, int count, int* slot_of) {
  const int lane = threadIdx.x % 32;
  int taken = 0;
  for (int w0 = 0; taken < count && w0 < n_words; w0 += 32) {
    const int word = w0 + lane;
    unsigned bits = word < n_words ? free_bits[word] : 0u;
    const int n = __popc(bits);
    int inclusive = n;  // free slots in words w0 .. word
    #pragma unroll
    for (int off = 1; off < 32; off *= 2) {
      const int x = __shfl_up_sync(0xffffffffu, inclusive, off);
      if (lane >= off) inclusive += x;
    }
    int rank = taken + inclusive - n;  // rank of this word's lowest free slot
    const unsigned before = bits;
    while (bits != 0u && rank < count) {
      slot_of[rank++] = word * 32 + __ffs(bits) - 1;
      bits &= bits - 1u;
    }
    if (word < n_words && bits != before) free_bits[word] = bits;
    taken += __shfl_sync(0xffffffffu, inclusive, 31);
  }
}

// grid (B*Hd), kSweepThreads threads. slot_key (B*Hd, T, S). state: sweep_state_bytes(S) per
// (b, delta head) in dynamic shared memory, or in global scratch when `scratch` is not null.
__global__ void __launch_bounds__(kSweepThreads) slot_sweep_kernel(Dims d, int T, int S,
                                                                    const int* __restrict__ evict,
                                                                    int* __restrict__ slot_key,
                                                                    int* scratch) {
  extern __shared__ int smem[];
  __shared__ int warp_count[kSweepWarps];
  __shared__ int slot_of[kSweepThreads];  // the slot of the r-th arrival of a chunk
  const int bh = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  int* key = scratch ? scratch + (size_t)bh * (sweep_state_bytes(S) / sizeof(int)) : smem;
  int* ev = key + S;  // e_j of the key in each slot
  unsigned* free_bits = reinterpret_cast<unsigned*>(ev + S);
  const int n_words = (S + 31) / 32;
  const int* evict_bh = evict + (size_t)bh * d.Lk;
  int* out = slot_key + (size_t)bh * T * S;

  for (int s = tid; s < S; s += kSweepThreads) key[s] = -1;
  int p_last_before = -1;  // p_last of the previous tile
  for (int t = 0; t < T; ++t) {
    const TilePositions tp = tile_positions(d, t);
    // (the first arrivals' e_j, loaded now so that the load overlaps step 1)
    const int j_first = p_last_before + 1 + tid;
    const int e_first = j_first <= tp.p_last ? evict_bh[j_first] : -1;
    // 1. Keys no query from p_first on keeps leave their slot; the free slots become the bitmap
    //    (a warp's ballot over 32 consecutive slots is one word).
    for (int base = 0; base < n_words * 32; base += kSweepThreads) {
      const int s = base + tid;
      bool is_free = false;
      if (s < S) {
        if (key[s] >= 0 && ev[s] < tp.p_first) key[s] = -1;
        is_free = key[s] < 0;
      }
      const unsigned ballot = __ballot_sync(0xffffffffu, is_free);
      if (lane == 0 && s / 32 < n_words) free_bits[s / 32] = ballot;
    }
    __syncthreads();  // the bitmap is complete
    // 2. Arrivals: the new positions p_last(t-1)+1 .. p_last(t) that are candidates, in chunks
    //    of one position per thread; the r-th arrival takes the r-th lowest free slot.
    for (int c0 = p_last_before + 1; c0 <= tp.p_last; c0 += kSweepThreads) {
      const int j = c0 + tid;
      int e = -1;
      bool arrives = false;
      if (j <= tp.p_last) {
        e = c0 == p_last_before + 1 ? e_first : evict_bh[j];
        arrives = rule::is_candidate(j, e, tp.p_first);
      }
      const unsigned ballot = __ballot_sync(0xffffffffu, arrives);
      if (lane == 0) warp_count[warp] = __popc(ballot);
      __syncthreads();  // warp counts visible; slot_of of the previous chunk consumed
      int before = __popc(ballot & ((1u << lane) - 1u)), total = 0;
      #pragma unroll
      for (int w = 0; w < kSweepWarps; ++w) {
        before += w < warp ? warp_count[w] : 0;
        total += warp_count[w];
      }
      if (warp == 0) take_free_slots(free_bits, n_words, total, slot_of);
      __syncthreads();  // slot_of written
      if (arrives) {
        const int s = slot_of[before];
        key[s] = j;
        ev[s] = e;
      }
    }
    p_last_before = max(p_last_before, tp.p_last);
    __syncthreads();  // the slots of tile t are final
    // 3. The slot row of tile t. (Thread tid handles the same slots here and in step 1.)
    for (int s = tid; s < S; s += kSweepThreads) out[(size_t)t * S + s] = key[s];
  }
}

// grid (T, B*Hd), kListThreads threads: list, n_alive and n_full of one tile.
__global__ void __launch_bounds__(kListThreads) list_kernel(Dims d, int T, int S,
                                                             const int* __restrict__ evict,
                                                             const int* __restrict__ slot_key,
                                                             int* __restrict__ list,
                                                             int* __restrict__ n_alive,
                                                             int* __restrict__ n_full) {
  __shared__ int warp_count[2][kListWarps];
  const int t = blockIdx.x, bh = blockIdx.y, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const TilePositions tp = tile_positions(d, t);
  const int* evict_bh = evict + (size_t)bh * d.Lk;
  const int* row = slot_key + ((size_t)bh * T + t) * S;
  int* out = list + ((size_t)bh * T + t) * S;
  int n = 0, parity = 0;
  for (int pass = 0; pass < 2; ++pass) {  // 0: kept by every query of the tile; 1: the others
    for (int base = 0; base < S; base += kListThreads) {
      const int s = base + tid;
      const int j = s < S ? row[s] : -1;
      bool take = false;
      if (j >= 0) {
        const bool full = j <= tp.p_first && __ldg(evict_bh + j) >= tp.p_last;
        take = full == (pass == 0);
      }
      const unsigned ballot = __ballot_sync(0xffffffffu, take);
      if (lane == 0) warp_count[parity][warp] = __popc(ballot);
      __syncthreads();  // (rows alternate, so the row written here was last read two steps ago)
      int before = __popc(ballot & ((1u << lane) - 1u)), total = 0;
      #pragma unroll
      for (int w = 0; w < kListWarps; ++w) {
        before += w < warp ? warp_count[parity][w] : 0;
        total += warp_count[parity][w];
      }
      if (take) out[n + before] = j;
      n += total;
      parity ^= 1;
    }
    if (pass == 0 && tid == 0) n_full[(size_t)bh * T + t] = n;
  }
  if (tid == 0) n_alive[(size_t)bh * T + t] = n;
  for (int s = n + tid; s < S; s += kListThreads) out[s] = -1;
}

bool sweep_in_shared(const Dims& d) { return sweep_state_bytes(table_stride(d)) <= kSweepSmemLimit; }

}  // namespace

size_t candidate_scratch_ints(const Dims& d) {
  if (tables_implicit(d) || sweep_in_shared(d)) return 0;
  return (size_t)d.B * d.Hd * (sweep_state_bytes(table_stride(d)) / sizeof(int));
}

void launch_candidates(const Dims& d, const int* evict, const Tables& tb, int* scratch,
                       cudaStream_t st) {
  if (tables_implicit(d)) return;
  const int T = table_tiles(d), S = table_stride(d), n_bh = d.B * d.Hd;
  const bool shared = sweep_in_shared(d);
  const size_t smem = shared ? sweep_state_bytes(S) : 0;
  DMA_CUDA_CHECK(cudaFuncSetAttribute(slot_sweep_kernel,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  slot_sweep_kernel<<<n_bh, kSweepThreads, smem, st>>>(d, T, S, evict, tb.slot_key,
                                                       shared ? nullptr : scratch);
  DMA_CUDA_CHECK_LAUNCH(slot_sweep_kernel);
  list_kernel<<<dim3(T, n_bh), kListThreads, 0, st>>>(d, T, S, evict, tb.slot_key, tb.list,
                                                      tb.n_alive, tb.n_full);
  DMA_CUDA_CHECK_LAUNCH(list_kernel);
}

}  // namespace dma::cuda::detail
