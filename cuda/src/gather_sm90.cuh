// The producer warpgroup's copies in the Hopper kernels (forward_sm90.cu, dq_sm90.cu,
// backward_sm90.cu): rows of a (L, D) matrix and gathered key blocks of the candidate lists
// (tables.cuh), with 16-byte cp.async into the 128-byte swizzled layout of sm90.cuh that wgmma
// reads; the caller commits, waits and fences (fence_proxy_async) before handing a buffer to the
// tensor cores. Then the producer loop of the forward and dq (produce_blocks), which does that
// for the key blocks of a query tile's list.
#pragma once

#include "tables.cuh"
#include "sm90.cuh"

namespace dma::cuda::detail::sm90 {

constexpr int kProducers = 128;  // the producer warpgroup; named barrier 1 is its own

// The keys of one block of kBn candidates: the keys (-1 past the end of the list), their e_j and
// delta_j * log2(e).
template <int kBn>
struct KeyBlock {
  int key[kBn];
  int evict[kBn];
  float delta2[kBn];
};
// True when every key of the block is kept by every query position in [p_lo, p_hi] (a warp's
// 16 rows need no element mask). Warp-uniform; call from all lanes of a warp.
template <int kBn>
__device__ __forceinline__ bool block_kept_by(const KeyBlock<kBn>& kb, int p_lo, int p_hi) {
  bool ok = true;
  #pragma unroll
  for (int e = threadIdx.x % 32; e < kBn; e += 32)
    ok = ok && kb.key[e] >= 0 && kb.key[e] <= p_lo && kb.evict[e] >= p_hi;
  return __all_sync(0xffffffffu, ok);
}

// The shared memory of a block that owns one query tile and gathers its candidate keys kBn at a
// time (forward_sm90.cu, dq_sm90.cu): kRowTiles swizzled tiles of the query tile's rows (Q; Q and
// dO), kStages buffers of K, of V and of their KeyBlock, then the full[kStages] and
// empty[kStages] mbarriers. Byte offsets from a 1024-aligned base.
template <int D, int kBn, int kStages, int kRowTiles>
struct QueryTileSmem {
  static constexpr uint32_t rows_bytes = kTileQ * D * 2;  // one tile of the query tile's rows
  static constexpr uint32_t tile_bytes = kBn * D * 2;     // one K or V block
  static constexpr uint32_t rows(int r) { return r * rows_bytes; }  // row tile r
  static constexpr uint32_t k = kRowTiles * rows_bytes;
  static constexpr uint32_t v = k + kStages * tile_bytes;
  static constexpr uint32_t keys = v + kStages * tile_bytes;
  static constexpr uint32_t bars = keys + kStages * sizeof(KeyBlock<kBn>);
  static constexpr uint32_t bytes = bars + 2 * kStages * sizeof(uint64_t) + 1024;  // + alignment slack
};

// How a warpgroup's 128 threads share the copies of a swizzled tile of kRows rows of D elements
// (the producers' here, the dk/dv consumer's K/V rows): thread x copies chunk x % kChunks of rows
// x / kChunks, + kRowStep, ...: the rows step by a multiple of 8, so the swizzle is the same for
// all of them and every copy is one address plus a constant on each side (a copy with its own
// row, chunk and swizzle cost 15 integer instructions, in the dk/dv kernel more than its
// consumer's whole step). Copy i of thread x goes to dst0 + i * kStepBytes.
template <int D, int kRows>
struct RowPhase {
  static constexpr int kChunks = D / 8, kRowStep = kProducers / kChunks, kCopies = kRows / kRowStep;
  static constexpr uint32_t kStepBytes = kRowStep * 128;
  static_assert(kProducers % kChunks == 0 && kRowStep % 8 == 0 && kRows % kRowStep == 0,
                "one swizzle phase per thread");
  int chunk, row0;
  uint32_t dst0;  // bytes into the tile
  __device__ explicit RowPhase(int x)
      : chunk(x % kChunks), row0(x / kChunks), dst0(swizzled_offset<kRows>(row0, chunk)) {}
};

// Rows i0 .. i0+kRows of a (L, D) matrix (clamped; rows past L zero-filled) into a swizzled
// tile of kRows rows, by producer thread pt of kProducers (RowPhase).
template <typename T, int D, int kRows>
__device__ __forceinline__ void produce_rows(unsigned char* dst, const T* __restrict__ src, int i0,
                                             int L, int pt) {
  using P = RowPhase<D, kRows>;
  const P ph(pt);
  unsigned char* dst0 = dst + ph.dst0;
  if (i0 + kRows <= L) {  // (uniform) every row exists
    const T* src0 = src + (size_t)(i0 + ph.row0) * D + ph.chunk * 8;
    #pragma unroll
    for (int x = 0; x < P::kCopies; ++x)
      cp_async_16(dst0 + x * P::kStepBytes, src0 + x * P::kRowStep * D, true);
  } else {
    #pragma unroll 2  // (the dk/dv producer runs on 24 registers)
    for (int x = 0; x < P::kCopies; ++x) {
      const int i = i0 + ph.row0 + x * P::kRowStep;
      cp_async_16(dst0 + x * P::kStepBytes, src + (size_t)min(i, L - 1) * D + ph.chunk * 8, i < L);
    }
  }
}

// How the producer threads share the keys of a block of kBn keys whose rows they copy as
// RowPhase<D, kBn> does. The rows a warp copies are a quarter of the block's (four producer
// warps); its lane l < kKeyLanes loads the key of the l-th of them (block_row), and a copy takes
// its row's key from that lane by a shuffle (key_lane): no thread needs another warp's keys, so
// there is no barrier between loading the keys and copying their rows.
template <int D, int kBn>
struct BlockCopy {
  static constexpr int kChunks = RowPhase<D, kBn>::kChunks, kRowStep = RowPhase<D, kBn>::kRowStep;
  static constexpr int kRowsPerWarp = 32 / kChunks;  // consecutive rows pt / kChunks in one warp
  static constexpr int kKeyLanes = kBn / (kProducers / 32);  // the block rows a warp copies
  static_assert(32 % kChunks == 0 && kKeyLanes <= 32, "a warp's rows");
  // The block row whose key producer thread pt loads (-1: none).
  static __device__ __forceinline__ int block_row(int pt) {
    const int warp = pt / 32, lane = pt % 32;
    if (lane >= kKeyLanes) return -1;
    return warp * kRowsPerWarp + lane % kRowsPerWarp + kRowStep * (lane / kRowsPerWarp);
  }
  // The lane holding the key of copy i of producer thread pt (row pt / kChunks + i * kRowStep).
  static __device__ __forceinline__ int key_lane(int pt, int i) { return (pt % 32) / kChunks + kRowsPerWarp * i; }
};

// One block of kBn candidates, whose keys the producer threads loaded (BlockCopy::block_row:
// key j, e_j, delta_j * log2(e); -1, -1, 0 past the list): the keys into kt, then their rows of k
// and v into the swizzled K and V tiles (rows past the list zero-filled). Block c of an implicit
// list (w >= Lk: candidate r is key r) is rows c * kBn .. of k and v, copied as contiguous rows
// (produce_rows), with no key per copy at all.
template <typename T, int D, int kBn>
__device__ __forceinline__ void produce_block(KeyBlock<kBn>& kt, unsigned char* k_dst, unsigned char* v_dst,
                                              const T* __restrict__ k_bh, const T* __restrict__ v_bh,
                                              int j, int e, float delta2, int pt, int contiguous_from,
                                              int n_alive) {
  using C = BlockCopy<D, kBn>;
  const int row = C::block_row(pt);
  if (row >= 0) {
    kt.key[row] = j;
    kt.evict[row] = e;
    kt.delta2[row] = delta2;
  }
  if (contiguous_from >= 0) {  // (uniform) keys contiguous_from .. : rows past n_alive zero-filled
    produce_rows<T, D, kBn>(k_dst, k_bh, contiguous_from, n_alive, pt);
    produce_rows<T, D, kBn>(v_dst, v_bh, contiguous_from, n_alive, pt);
    return;
  }
  using P = RowPhase<D, kBn>;
  const P ph(pt);
  #pragma unroll
  for (int i = 0; i < P::kCopies; ++i) {
    const int jr = __shfl_sync(0xffffffffu, j, C::key_lane(pt, i));
    const size_t src = (size_t)max(jr, 0) * D + ph.chunk * 8;
    cp_async_16(k_dst + ph.dst0 + i * P::kStepBytes, k_bh + src, jr >= 0);
    cp_async_16(v_dst + ph.dst0 + i * P::kStepBytes, v_bh + src, jr >= 0);
  }
}

// The producer's loop of a block that owns a query tile (forward_sm90.cu, dq_sm90.cu), over the
// n_blocks key blocks of its list into kStages buffers (L: QueryTileSmem): block c waits for its
// buffer (the consumers finished block c - kStages); block c-1 is handed over once its copies
// (and, with block 0, those the caller issued before) have landed, waited here so that this
// thread can fence them for the tensor cores before the arrive releases them. The keys come
// ahead of the copies: a key is one load from L2 and its e_j and delta_j a second that depends
// on it, so while block c is copied the candidate of block c+2 and the e_j, delta_j of block
// c+1 are in flight (loaded where the block is copied, they made the consumers wait for it).
template <typename L, typename T, int D, int kBn, int kStages>
__device__ __forceinline__ void produce_blocks(unsigned char* smem, uint64_t* full, uint64_t* empty,
                                               const QueryBlock<T, D>& qb, int q_tile, int n_blocks,
                                               int pt) {
  KeyBlock<kBn>* kts = reinterpret_cast<KeyBlock<kBn>*>(smem + L::keys);
  const int row = BlockCopy<D, kBn>::block_row(pt);  // the row of each block whose key pt loads
  auto candidate = [&](int c) {
    const int r = c * kBn + row;
    return row >= 0 && r < qb.n_alive ? qb.tv.candidate(q_tile, r) : -1;
  };
  auto evict_of = [&](int j) { return j >= 0 ? __ldg(qb.evict + j) : -1; };
  auto delta2_of = [&](int j) { return j >= 0 ? __ldg(qb.delta + j) * kLog2e : 0.0f; };
  int j1 = candidate(0), j2 = candidate(1);  // the keys of blocks c and c+1
  int e1 = evict_of(j1);
  float d1 = delta2_of(j1);
  for (int c = 0; c < n_blocks; ++c) {
    const int j = j1, e = e1, st = c % kStages;
    const float delta2 = d1;
    j1 = j2;
    e1 = evict_of(j1);
    d1 = delta2_of(j1);
    j2 = candidate(c + 2);
    if (c >= kStages) mbarrier_wait(empty + st, (c / kStages - 1) & 1);
    produce_block<T, D, kBn>(kts[st], smem + L::k + st * L::tile_bytes, smem + L::v + st * L::tile_bytes,
                             qb.k, qb.v, j, e, delta2, pt, qb.tv.implicit() ? c * kBn : -1, qb.n_alive);
    cp_async_commit();
    if (c > 0) {
      cp_async_wait<1>();  // block c-1 landed
      fence_proxy_async();
      mbarrier_arrive(full + (c - 1) % kStages);
    }
  }
  cp_async_wait<0>();
  fence_proxy_async();
  mbarrier_arrive(full + (n_blocks - 1) % kStages);
}

}  // namespace dma::cuda::detail::sm90
