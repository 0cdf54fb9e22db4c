// Hopper (sm_90a) building blocks of the wgmma kernels (forward_sm90.cu), as thin PTX wrappers:
//   the 128-byte swizzled shared-memory layout the tensor cores read through descriptors,
//   wgmma.mma_async m64nNk16 (a warpgroup of 4 warps: 64 rows), with A from shared memory or
//   from registers, the fences that order it against ordinary code, and the shared-memory
//   barriers (mbarrier) by which a producer warpgroup hands tiles to the consumer warpgroups.
// Only compiled for compute_90a (the sm90 object library in cuda/CMakeLists.txt).
#pragma once

#include <cstdint>
#include <type_traits>

#include "common.cuh"

namespace dma::cuda::detail::sm90 {

// ---- the swizzled tile layout -------------------------------------------------------------
// A tile of kRows rows of D 16-bit elements is stored as D/64 column blocks of [kRows][64]
// (128 bytes per row). Inside a block, 16-byte chunk c of row r sits at chunk c ^ (r % 8): the
// 8 rows of a core matrix spread over all 32 banks, and it is the pattern the descriptor's
// "128B swizzle" mode undoes (the XOR of address bits 4-6 with bits 7-9, so every block must
// start at a multiple of 1024 bytes).
template <int kRows>
__device__ __forceinline__ uint32_t swizzled_offset(int r, int chunk) {  // bytes; chunk of 8 elems
  return (chunk / 8) * (kRows * 128) + r * 128 + (((chunk % 8) ^ (r % 8)) * 16);
}

// Rows row0 .. row0+15 of such a tile (kRows rows of D columns) into the register A operand of
// a warp in wgmma m64k16, one k16 slice per 16 columns: in slice kk, register x holds row
// row0 + g + 8 (x % 2), columns 16 kk + 8 (x / 2) + 2 t + 0..1 (g = lane / 4, t = lane % 4; the
// layout of the accumulators rounded in pairs, below). Read once, held for many products.
template <int D, int kRows>
__device__ __forceinline__ void load_a_operand(const unsigned char* tile, int row0, uint32_t (&a)[D / 16][4]) {
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  #pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
    #pragma unroll
    for (int x = 0; x < 4; ++x) {
      const int r = row0 + g + (x % 2) * 8, col = kk * 16 + (x / 2) * 8 + 2 * t;
      a[kk][x] = *reinterpret_cast<const uint32_t*>(tile + swizzled_offset<kRows>(r, col / 8) + (col % 8) * 2);
    }
}

// A shared-memory matrix descriptor: start address, leading and stride byte offsets (all in
// units of 16 bytes), 128B swizzle (layout type 1 in bits 62-63).
//   K-major operand (rows of the tile are the M or N index, K runs along the row): SBO = 1024
//   bytes from one group of 8 rows to the next; LBO unused (1). A k16 step inside a 64-wide
//   column block moves the start by 32 bytes; the next block starts kRows * 128 bytes further.
//   MN-major operand (rows of the tile are the K index, N runs along the row, as V in P V):
//   SBO = 1024 bytes from one group of 8 k-rows to the next, LBO = kRows * 128 bytes from one
//   64-wide column block of N to the next; a k16 step moves the start by 16 rows (2048 bytes).
__device__ __forceinline__ uint64_t descriptor(uint32_t smem_address, uint32_t lbo_bytes,
                                               uint32_t sbo_bytes) {
  return static_cast<uint64_t>((smem_address & 0x3FFFF) >> 4) |
         static_cast<uint64_t>(lbo_bytes >> 4) << 16 | static_cast<uint64_t>(sbo_bytes >> 4) << 32 |
         1ull << 62;
}
// desc with its start address moved by `bytes` (a multiple of 16). The start address is the low
// field, in units of 16 bytes, and no offset inside a block's shared memory (below 256 KB) carries
// out of its 14 bits: moving a descriptor is one addition, not a new encoding. (Move by the
// run-time part of an offset and by its constant part separately, so that the compiler keeps
// the first for every k16 step and adds only constants.)
__device__ __forceinline__ uint64_t moved(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

// ---- ordering -----------------------------------------------------------------------------
// Before a batch of wgmma: registers they read or accumulate into were last written by
// ordinary instructions.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
// Waits until at most N committed groups of this warpgroup are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// The accumulators of an asynchronous wgmma may be read only after its wait: this empty asm
// "redefines" them there, so the compiler cannot move a read (or a write) across the wait.
template <int N>
__device__ __forceinline__ void fence_registers(float (&d)[N]) {
  #pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// Shared memory written by the threads (cp.async included) and read next by the tensor cores
// (the async proxy): each writing thread fences after its copies landed, before the barrier.
__device__ __forceinline__ void fence_proxy_async() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

// ---- mbarrier -----------------------------------------------------------------------------
// A 64-bit barrier in shared memory that completes a phase when `count` arrivals have been
// made; waiters poll for the phase of parity 0, 1, 0, ... An arrive releases the arriving
// thread's earlier writes, a completed wait acquires them.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, int parity) {
  asm volatile(
      "{\n.reg .pred done;\nwait_%=:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra wait_%=;\n}\n" ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}

// ---- warpgroup roles -------------------------------------------------------------------------
// Moves this warpgroup's register budget to N per thread (setmaxnreg; the kernel must have a
// register cap at launch, and every warp of the warpgroup executes it).
template <int N, bool kIncrease>
__device__ __forceinline__ void set_max_registers() {
  if constexpr (kIncrease) asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
  else asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
// The registers a block of `threads` threads is launched with under __launch_bounds__(threads,
// blocks_per_sm): the register file's share per thread, rounded down to a multiple of 8, for
// each thread. setmaxnreg only shares these out anew: a split asking for more waits forever.
constexpr int launch_registers(int threads, int blocks_per_sm) {
  return threads * (65536 / blocks_per_sm / threads / 8 * 8);
}
// A barrier among `threads` threads (whole warps) only: id 0 is __syncthreads'.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Counts this warp's arrival at barrier id (of `threads` threads) without waiting.
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// Ping-pong of two consumer warpgroups (FlashAttention-3), as the forward and dq use it: they
// take turns to issue their products, so that one computes its elementwise step while the
// other's products run. Named barrier 2 + w is "warpgroup w's turn": w syncs on it (its 128
// threads and the 128 arrivals of the other) and, after issuing, signals the other's turn.
// Warpgroup 1 opens with warpgroup 0's turn (the constructor) and does not signal after its
// last issue (last_yours), so each barrier gets as many arrivals as syncs.
struct PingPong {
  static constexpr int kThreads = 256;  // the two warpgroups
  int wg;                               // this warpgroup, 0 or 1
  __device__ explicit PingPong(int warpgroup) : wg(warpgroup) { if (wg == 1) yours(); }
  __device__ void mine() const { named_barrier_sync(2 + wg, kThreads); }
  __device__ void yours() const { named_barrier_arrive(2 + (1 - wg), kThreads); }
  __device__ void last_yours() const { if (wg == 0) yours(); }
};

// ---- wgmma --------------------------------------------------------------------------------
// Accumulator layout (fp32, m64nN): warp w of the warpgroup holds rows 16w .. 16w+15; for each
// 8-column block n, d[4n + 0..1] = C[16w + g][8n + 2t .. +1] and d[4n + 2..3] = C[16w + g + 8][..]
// (g = lane / 4, t = lane % 4): per warp, mma.sync's m16n8 C layout repeated N/8 times. The
// register A operand (m64k16) is per warp the m16n8k16 A fragment of its 16 rows, so the
// accumulators of S = Q K^T, rounded in pairs, are the A operand of P V (as in mma.sync).
#define DMA_WGMMA_D32                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "             \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define DMA_WGMMA_D64                                                                   \
  "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "             \
  "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "    \
  "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "    \
  "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
#define DMA_ACC8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), \
                    "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), "+f"(d[i + 7])
#define DMA_ACC32 DMA_ACC8(0), DMA_ACC8(8), DMA_ACC8(16), DMA_ACC8(24)
#define DMA_ACC64 DMA_ACC32, DMA_ACC8(32), DMA_ACC8(40), DMA_ACC8(48), DMA_ACC8(56)

// d (64xN) = A (64x16) B (16xN) + (accumulate ? d : 0); A and B K-major in shared memory.
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b,
                                         bool accumulate) {
  static_assert(N == 64 || N == 128, "S = Q K^T for key blocks of 64 and 128");
#define DMA_WGMMA_SS(NN, TYPE, REGS, ACC, A, B, P)                                         \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #P ", 0;\n"                          \
               "wgmma.mma_async.sync.aligned.m64n" #NN "k16.f32." TYPE "." TYPE " " REGS  \
               ", %" #A ", %" #B ", p, 1, 1, 0, 0;\n}\n"                                  \
               : ACC                                                                       \
               : "l"(desc_a), "l"(desc_b), "r"(static_cast<int>(accumulate)))
  constexpr bool kHalf = std::is_same_v<T, __half>;
  if constexpr (N == 64) {
    if constexpr (kHalf) DMA_WGMMA_SS(64, "f16", DMA_WGMMA_D32, DMA_ACC32, 32, 33, 34);
    else DMA_WGMMA_SS(64, "bf16", DMA_WGMMA_D32, DMA_ACC32, 32, 33, 34);
  } else {
    if constexpr (kHalf) DMA_WGMMA_SS(128, "f16", DMA_WGMMA_D64, DMA_ACC64, 64, 65, 66);
    else DMA_WGMMA_SS(128, "bf16", DMA_WGMMA_D64, DMA_ACC64, 64, 65, 66);
  }
#undef DMA_WGMMA_SS
}

// d (64xN) += A (64x16, registers) B (16xN); B MN-major in shared memory (transposed read).
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b) {
  static_assert(N == 64 || N == 128, "P V for head dims 64 and 128");
  // (scale-d is a predicate operand: p = true, accumulate; trans-b = 1)
#define DMA_WGMMA_RS(NN, TYPE, REGS, ACC, A0, A1, A2, A3, B)                              \
  asm volatile("{\n.reg .pred p;\nsetp.eq.u32 p, 1, 1;\n"                                 \
               "wgmma.mma_async.sync.aligned.m64n" #NN "k16.f32." TYPE "." TYPE " " REGS  \
               ", {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #B ", p, 1, 1, 1;\n}\n"  \
               : ACC                                                                       \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b))
  constexpr bool kHalf = std::is_same_v<T, __half>;
  if constexpr (N == 64) {
    if constexpr (kHalf) DMA_WGMMA_RS(64, "f16", DMA_WGMMA_D32, DMA_ACC32, 32, 33, 34, 35, 36);
    else DMA_WGMMA_RS(64, "bf16", DMA_WGMMA_D32, DMA_ACC32, 32, 33, 34, 35, 36);
  } else {
    if constexpr (kHalf) DMA_WGMMA_RS(128, "f16", DMA_WGMMA_D64, DMA_ACC64, 64, 65, 66, 67, 68);
    else DMA_WGMMA_RS(128, "bf16", DMA_WGMMA_D64, DMA_ACC64, 64, 65, 66, 67, 68);
  }
#undef DMA_WGMMA_RS
}

// d (64xN) = A (64x16, registers) B (16xN) + (accumulate ? d : 0); B K-major in shared memory
// (as in wgmma_ss: S = Q K^T with Q held in registers).
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs_kmajor(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b,
                                                bool accumulate) {
  static_assert(N == 64 || N == 128, "S = Q K^T for key blocks of 64 and 128");
#define DMA_WGMMA_RS_K(NN, TYPE, REGS, ACC, A0, A1, A2, A3, B, P)                           \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" #P ", 0;\n"                           \
               "wgmma.mma_async.sync.aligned.m64n" #NN "k16.f32." TYPE "." TYPE " " REGS  \
               ", {%" #A0 ", %" #A1 ", %" #A2 ", %" #A3 "}, %" #B ", p, 1, 1, 0;\n}\n"  \
               : ACC                                                                       \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b),                 \
                 "r"(static_cast<int>(accumulate)))
  constexpr bool kHalf = std::is_same_v<T, __half>;
  if constexpr (N == 64) {
    if constexpr (kHalf) DMA_WGMMA_RS_K(64, "f16", DMA_WGMMA_D32, DMA_ACC32, 32, 33, 34, 35, 36, 37);
    else DMA_WGMMA_RS_K(64, "bf16", DMA_WGMMA_D32, DMA_ACC32, 32, 33, 34, 35, 36, 37);
  } else {
    if constexpr (kHalf) DMA_WGMMA_RS_K(128, "f16", DMA_WGMMA_D64, DMA_ACC64, 64, 65, 66, 67, 68, 69);
    else DMA_WGMMA_RS_K(128, "bf16", DMA_WGMMA_D64, DMA_ACC64, 64, 65, 66, 67, 68, 69);
  }
#undef DMA_WGMMA_RS_K
}

#undef DMA_ACC64
#undef DMA_ACC32
#undef DMA_ACC8
#undef DMA_WGMMA_D64
#undef DMA_WGMMA_D32

}  // namespace dma::cuda::detail::sm90
