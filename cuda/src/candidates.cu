// The candidate tables on the GPU: the same tables as core's candidate_table
// (core/include/dma/candidates.hpp), bitwise, so that no attention kernel scans evict.
//
//   slot_sweep_kernel  one block per (b, delta head) sweeps the query tiles in order, as the
//                      definition does: keys whose interval ended leave their slot, the arriving
//                      keys (in increasing j) take the lowest free slots. It records only each
//                      key's slot; a bitmap of the free slots lets one warp hand out the lowest
//                      ones, and a key that takes a slot marks it in the bitmap of the tile where
//                      it will leave, so that no tile scans the S slots. Per tile: one pass over
//                      the bitmap that ors in the tile's frees and takes slots (each lane owns
//                      consecutive words: one prefix sum ranks them all), then the arrivals'
//                      work, 2 barriers per chunk of 128 arriving positions (one chunk per tile
//                      when causal; 4 warps, so that the barriers are cheap).
//   slot_rows_kernel   one thread per key, in parallel: writes the key into its slot's column of
//                      the slot rows of the tiles where it lives (the rest was set to -1).
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

constexpr int kSweepThreads = kTileQ;  // one arriving position per thread: a causal tile's
                                       // new positions (512 threads: 17% slower at 64K)
constexpr int kSweepWarps = kSweepThreads / 32;
constexpr int kListThreads = 256;
constexpr int kListWarps = kListThreads / 32;
// The sweep's bitmaps per (b, delta head), one bit per slot: the free slots, and the slots that
// become free at the next tile (two, by tile parity). In shared memory up to kSweepSmemLimit
// bytes (S up to 109216 slots: with the static arrays, within the 48 KB a block has without
// opting in), else in the global scratch.
__host__ __device__ int bitmap_words(int S) { return (S + 31) / 32; }
__host__ __device__ size_t sweep_state_bytes(int S) { return 3 * sizeof(unsigned) * (size_t)bitmap_words(S); }
constexpr size_t kSweepSmemLimit = 40 * 1024;

struct TilePositions {
  int p_first, p_last;
};
__device__ __forceinline__ TilePositions tile_positions(const Dims& d, int t) {
  const int i_last = min((t + 1) * kTileQ, d.Lq) - 1;
  return {rule::query_position(d.Lq, d.Lk, d.causal, t * kTileQ),
          rule::query_position(d.Lq, d.Lk, d.causal, i_last)};
}

// The tile where key j arrives: the first with p_last >= j (the last tile's p_last is Lk - 1).
__device__ int arrival_tile(const Dims& d, int T, int j) {
  int lo = 0, hi = T - 1;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (tile_positions(d, mid).p_last >= j) hi = mid;
    else lo = mid + 1;
  }
  return lo;
}
// The tile where key j (e_j = e), living at tile t0, leaves its slot: the first t > t0 whose
// first query no longer keeps it, or T if none. Every position after tile t0 is >= j, so the
// queries after it that keep j are a prefix of them (rule::kept_queries), and j leaves with the
// tile after the one that holds the last of them.
__device__ int departure_tile(const Dims& d, int T, int t0, int j, int e) {
  const int i0 = (t0 + 1) * kTileQ;
  if (i0 >= d.Lq) return T;
  int first, last;
  rule::kept_queries(d.Lq, d.Lk, d.causal, j, e, i0, d.Lq, first, last);
  return first > last ? t0 + 1 : last / kTileQ + 1;
}

// Warp 0 only: ors the slots that become free at this tile (`frees`, cleared; null for none)
// into the free bitmap, takes the `count` lowest free slots (clearing their bits) and writes
// them, in increasing order, to slot_of[0 .. count). Lane l owns the consecutive words
// l * per .. l * per + per - 1, so that one prefix sum over the lanes ranks every free slot (with
// the words strided over the lanes it took one per 32 words, each waiting for the last). No other
// thread touches these words meanwhile: plain loads and stores (from L2 when the bitmaps are in
// global memory, where other threads' atomics wrote `frees`).
template <bool kShared>
__device__ __forceinline__ void take_free_slots(unsigned* free_bits, unsigned* frees, int n_words,
                                                int count, int* slot_of) {
  auto load = [](const unsigned* p) { return kShared ? *p : __ldcg(p); };
  const int lane = threadIdx.x % 32, per = (n_words + 31) / 32;
  const int w_begin = min(lane * per, n_words), w_end = min(w_begin + per, n_words);
  int n = 0;  // free slots in this lane's words
  for (int w = w_begin; w < w_end; ++w) {
    unsigned bits = load(free_bits + w);
    if (frees != nullptr) {
      bits |= load(frees + w);
      frees[w] = 0u, free_bits[w] = bits;
    }
    n += __popc(bits);
  }
  if (count == 0) return;  // (uniform)
  int inclusive = n;  // free slots in the words of lanes 0 .. lane
  #pragma unroll
  for (int off = 1; off < 32; off *= 2) {
    const int x = __shfl_up_sync(0xffffffffu, inclusive, off);
    if (lane >= off) inclusive += x;
  }
  int rank = inclusive - n;  // rank of this lane's lowest free slot
  for (int w = w_begin; w < w_end && rank < count; ++w) {
    unsigned bits = load(free_bits + w);  // (as ored in above, by this lane)
    const unsigned before = bits;
    if (bits == ~0u && rank + 32 <= count) {  // a whole word (as while the slots fill up):
      #pragma unroll                          // no chain of bit after bit
      for (int b = 0; b < 32; ++b) slot_of[rank + b] = w * 32 + b;
      rank += 32, bits = 0u;
    }
    while (bits != 0u && rank < count) {
      slot_of[rank++] = w * 32 + __ffs(bits) - 1;
      bits &= bits - 1u;
    }
    if (bits != before) free_bits[w] = bits;
  }
}

// grid (B*Hd), kSweepThreads threads. Writes slot_of_key (B*Hd, Lk): the slot key j takes, -1
// if it never takes one (every key arrives at some tile: the last one's p_last is Lk - 1). leave_bits
// (B*Hd, T, bitmap_words(S)), zero on entry: the slots that become free at tile t. The
// bitmaps (sweep_state_bytes(S) per (b, delta head)) are in dynamic shared memory (kShared), or
// in the global scratch `state`. (Two instantiations, so that the compiler knows where the
// bitmaps are: through a pointer that may be either, every access and atomic is a generic one.)
template <bool kShared>
__global__ void __launch_bounds__(kSweepThreads) slot_sweep_kernel(Dims d, int T, int S,
                                                                    const int* __restrict__ evict,
                                                                    int* __restrict__ slot_of_key,
                                                                    unsigned* leave_bits,
                                                                    unsigned* state) {
  extern __shared__ unsigned smem_bits[];
  __shared__ int warp_count[kSweepWarps];
  __shared__ int slot_of[kSweepThreads];  // the slot of the r-th arrival of a chunk
  const int bh = blockIdx.x, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int n_words = bitmap_words(S);
  unsigned* free_bits = kShared ? smem_bits : state + (size_t)bh * 3 * n_words;
  auto frees_at = [&](int t) { return free_bits + (1 + t % 2) * n_words; };  // by tile parity
  unsigned* leave_bh = leave_bits + (size_t)bh * T * n_words;
  const int* evict_bh = evict + (size_t)bh * d.Lk;
  int* slot_bh = slot_of_key + (size_t)bh * d.Lk;

  for (int w = tid; w < n_words; w += kSweepThreads) {
    const int valid = min(32, S - 32 * w);  // slots of this word
    free_bits[w] = valid == 32 ? ~0u : (1u << valid) - 1u;
    frees_at(0)[w] = frees_at(1)[w] = 0u;
  }
  int p_last_before = -1;  // p_last of the previous tile
  int e_first = tile_positions(d, 0).p_last >= tid ? __ldg(evict_bh + tid) : -1;
  __syncthreads();  // the bitmaps are set
  for (int t = 0; t < T; ++t) {
    const TilePositions tp = tile_positions(d, t);
    // The arrivals: the new positions p_last(t-1)+1 .. p_last(t) that are candidates, in chunks
    // of one position per thread (at least one chunk, so that every tile frees its slots); the
    // r-th arrival takes the r-th lowest free slot.
    bool first_chunk = true;
    for (int c0 = p_last_before + 1; first_chunk || c0 <= tp.p_last; c0 += kSweepThreads) {
      const int j = c0 + tid;
      const bool in_tile = j <= tp.p_last;
      const int e = !in_tile ? -1 : first_chunk ? e_first : __ldg(evict_bh + j);
      const bool arrives = in_tile && rule::is_candidate(j, e, tp.p_first);
      const unsigned ballot = __ballot_sync(0xffffffffu, arrives);
      if (lane == 0) warp_count[warp] = __popc(ballot);
      __syncthreads();  // warp counts visible; the last chunk's slot_of consumed; the frees of
                        // tile t all in frees_at(t)
      // This thread's rank among the chunk's arrivals; warp 0 (which hands out the slots, while
      // the others wait for it) needs only the total.
      int before = __popc(ballot & ((1u << lane) - 1u)), total = 0;
      if (warp == 0) {
        total = __reduce_add_sync(0xffffffffu, lane < kSweepWarps ? warp_count[lane] : 0);
      } else {
        for (int w = 0; w < warp; ++w) before += warp_count[w];
      }
      if (first_chunk && t + 1 < T) {
        // Ahead, for tile t+1: the e_j of its first positions, and (warp 1) the slots that
        // keys which arrived before tile t free there. Keys arriving at tile t that leave at
        // t+1 add theirs below.
        const int jn = max(p_last_before, tp.p_last) + 1 + tid;
        e_first = jn <= tile_positions(d, t + 1).p_last ? __ldg(evict_bh + jn) : -1;
        if (warp == 1) {
          // (4 words per lane loaded before any is used: one wait for L2 instead of 4)
          const unsigned* leave_next = leave_bh + (size_t)(t + 1) * n_words;
          for (int w0 = lane; w0 < n_words; w0 += 4 * 32) {
            unsigned bits[4];
            #pragma unroll
            for (int k = 0; k < 4; ++k) bits[k] = w0 + 32 * k < n_words ? __ldcg(leave_next + w0 + 32 * k) : 0u;
            #pragma unroll
            for (int k = 0; k < 4; ++k)
              if (bits[k] != 0u) atomicOr(frees_at(t + 1) + w0 + 32 * k, bits[k]);
          }
        }
      }
      if (warp == 0)  // (with the first chunk, the keys that leave at tile t free their slots)
        take_free_slots<kShared>(free_bits, first_chunk ? frees_at(t) : nullptr, n_words, total, slot_of);
      __syncthreads();  // slot_of written
      if (in_tile) {
        const int s = arrives ? slot_of[before] : -1;
        slot_bh[j] = s;
        const int t_leave = arrives ? departure_tile(d, T, t, j, e) : T;
        if (t_leave < T) {  // (two branches, so that each atomic knows its memory)
          if (t_leave == t + 1) atomicOr(frees_at(t_leave) + s / 32, 1u << (s % 32));
          else atomicOr(leave_bh + (size_t)t_leave * n_words + s / 32, 1u << (s % 32));
        }
      }
      first_chunk = false;
    }
    p_last_before = max(p_last_before, tp.p_last);
  }
}

// grid (ceil(Lk / 256), B*Hd), 256 threads: slot_key[t][slot of j] = j for the tiles t where key
// j lives (slot_key is -1 elsewhere on entry).
__global__ void slot_rows_kernel(Dims d, int T, int S, const int* __restrict__ evict,
                                 const int* __restrict__ slot_of_key, int* __restrict__ slot_key) {
  const int bh = blockIdx.y, j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= d.Lk) return;
  const int s = slot_of_key[(size_t)bh * d.Lk + j];
  if (s < 0) return;
  const int t_arrive = arrival_tile(d, T, j);
  const int t_leave = departure_tile(d, T, t_arrive, j, evict[(size_t)bh * d.Lk + j]);
  int* out = slot_key + (size_t)bh * T * S + s;
  for (int t = t_arrive; t < t_leave; ++t) out[(size_t)t * S] = j;
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

// The sweep's scratch per (b, delta head): slot_of_key (Lk), leave_bits (T x bitmap words), and
// the bitmaps when they do not fit in shared memory.
struct SweepScratch {
  size_t slot_of_key, leave_bits, state, total;  // offsets and total, in ints
};
SweepScratch sweep_scratch(const Dims& d) {
  const size_t n_bh = (size_t)d.B * d.Hd, words = bitmap_words(table_stride(d));
  SweepScratch x;
  x.slot_of_key = 0;
  x.leave_bits = n_bh * d.Lk;
  x.state = x.leave_bits + n_bh * table_tiles(d) * words;
  x.total = x.state + (sweep_in_shared(d) ? 0 : n_bh * 3 * words);
  return x;
}

}  // namespace

size_t candidate_scratch_ints(const Dims& d) { return tables_implicit(d) ? 0 : sweep_scratch(d).total; }

void launch_candidates(const Dims& d, const int* evict, const Tables& tb, int* scratch,
                       cudaStream_t st) {
  if (tables_implicit(d)) return;
  const int T = table_tiles(d), S = table_stride(d), n_bh = d.B * d.Hd;
  const SweepScratch x = sweep_scratch(d);
  int* slot_of_key = scratch + x.slot_of_key;
  unsigned* leave_bits = reinterpret_cast<unsigned*>(scratch + x.leave_bits);
  const bool shared = sweep_in_shared(d);
  DMA_CUDA_CHECK(cudaMemsetAsync(leave_bits, 0, (x.state - x.leave_bits) * sizeof(int), st));
  DMA_CUDA_CHECK(cudaMemsetAsync(tb.slot_key, 0xff, (size_t)n_bh * T * S * sizeof(int), st));  // -1
  if (shared)
    slot_sweep_kernel<true><<<n_bh, kSweepThreads, sweep_state_bytes(S), st>>>(
        d, T, S, evict, slot_of_key, leave_bits, nullptr);
  else
    slot_sweep_kernel<false><<<n_bh, kSweepThreads, 0, st>>>(
        d, T, S, evict, slot_of_key, leave_bits, reinterpret_cast<unsigned*>(scratch + x.state));
  DMA_CUDA_CHECK_LAUNCH(slot_sweep_kernel);
  slot_rows_kernel<<<dim3((d.Lk + 255) / 256, n_bh), 256, 0, st>>>(d, T, S, evict, slot_of_key,
                                                                   tb.slot_key);
  DMA_CUDA_CHECK_LAUNCH(slot_rows_kernel);
  list_kernel<<<dim3(T, n_bh), kListThreads, 0, st>>>(d, T, S, evict, tb.slot_key, tb.list,
                                                      tb.n_alive, tb.n_full);
  DMA_CUDA_CHECK_LAUNCH(list_kernel);
}

}  // namespace dma::cuda::detail
