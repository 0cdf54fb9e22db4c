// DMA forward on Hopper (sm_90a): the algorithm of forward.cu, with its two products on wgmma.
//
// One block = one query tile of kTileQ = 128 queries of one (b, query head): two consumer
// warpgroups of 64 rows each (warp w owns rows 16w .. 16w+15, as in forward.cu) and a producer
// warpgroup that copies the tiles (its registers given to the consumers by setmaxnreg). Per
// block of kBn listed keys (64 or 128, Plan below; paper notation Q_i, K_j, V_j, m, l), in the
// consumers:
//   S   = Q K_j^T      wgmma m64n{kBn}k16, Q from registers (loaded once), K_j from shared memory
//   S2  = log2(e) * (scale * S + delta_j), -inf where not kept      (registers, as forward.cu)
//   m'  = max(m, rowmax S2);  P = 2^(S2 - m');  l = 2^(m-m') l + rowsum P
//   O   = 2^(m-m') O + P V_j   wgmma m64nDk16, P from registers, V_j from shared memory
// Q, K_j and V_j sit in shared memory in the 128-byte swizzled layout of sm90.cuh. The producer
// gathers the rows of K_j and V_j there with 16-byte cp.async (TMA cannot gather rows), kStages
// tiles ahead at most, and hands each tile over through an mbarrier ("full"); the consumers hand
// the buffer back through another ("empty"); no barrier spans the block. The two consumer
// warpgroups take turns to issue their products (ping-pong), so that one's softmax runs while
// the other's products do; within a warpgroup, P_{c-1} V_{c-1} runs on the tensor cores during
// the softmax of S_c (the schedule is written out above the main loop).
//
// What it saves over forward.cu: mma.sync needs every K/V fragment in registers of each of the
// 8 warps (ldmatrix: 8 shared-memory reads of each tile per block); a wgmma of a warpgroup
// reads its B operand once for 64 rows, and the copies are issued by warps that do nothing else.
// Q is copied to shared memory with the first block and then held in registers: a 64 x 64
// product with both operands in shared memory would take all of its bandwidth. The rungs and
// their figures are in cuda/dev/dma_fwd_lab.cu.
#include "gather_sm90.cuh"
#include "kernels.hpp"

namespace dma::cuda::detail {
namespace {

using namespace sm90;

constexpr int kConsumerWarps = kTileQ / 16;  // 8: two warpgroups of 64 rows
constexpr int kThreads = 32 * kConsumerWarps + kProducers;
// Registers per thread after setmaxnreg: the block's 168 per thread at launch, shared out anew.
constexpr int kProducerRegs = 40, kConsumerRegs = 232;
static_assert(kProducers * kProducerRegs + 32 * kConsumerWarps * kConsumerRegs <=
                  launch_registers(kThreads, 1),
              "registers");

// kBn keys per block, kStages buffers of K and V: V_{c-1} read by P V, block c, and blocks
// c+1 .. being copied. Measured on the H200 (cuda/dev/dma_fwd_lab, 16K): D = 64 runs blocks of
// 128 keys (dense 1.52 ms against 1.89 with 64); at D = 128, 128-key blocks leave room for two
// buffers only (3.25 ms against 2.62, with the hand-over that two buffers need), 96 keys in three
// buffers gave 3.13, and separate rings of two K and three V buffers of 128 keys 2.96
// (docs/performance.md §9). With Q in registers (§13), 128-key blocks at D = 128 spill (168
// bytes); a fifth buffer of 64 keys gained 0.5-1% there, six of 128 keys at D = 64 nothing.
template <int D> struct Plan;
template <> struct Plan<64> { static constexpr int kBn = 128, kStages = 4; };
template <> struct Plan<128> { static constexpr int kBn = 64, kStages = 5; };

template <int D, int kBn, int kStages>
using Smem = QueryTileSmem<D, kBn, kStages, 1>;  // Q, then the K, V buffers (gather_sm90.cuh)

template <typename T, int D, int kBn, int kStages>
__global__ void __launch_bounds__(kThreads, 1) forward_sm90_kernel(Dims d, AttnArgs a) {
  // (With two buffers the producer would wait for a buffer that the consumers free only after
  // receiving the block it has not handed over yet.)
  static_assert(kStages >= 3, "the producer hands block c-1 over after starting block c");
  static_assert(Smem<D, kBn, kStages>::bytes <= 227 * 1024, "a block's shared memory on sm_90");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Smem<D, kBn, kStages>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
  const uint32_t base = smem_addr(smem);
  KeyBlock<kBn>* kts = reinterpret_cast<KeyBlock<kBn>*>(smem + L::keys);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int wg = warp / 4;
  const int q_tile = gridDim.x - 1 - blockIdx.x;  // causal: the longest tiles start first
  const int hq = blockIdx.y, b = blockIdx.z;
  const int i0 = q_tile * kTileQ;
  auto position = [&](int i) { return rule::query_position(d.Lq, d.Lk, d.causal, i); };  // p_i
  const QueryBlock<T, D> qb(d, a, q_tile, hq, b, i0, kTileQ);

  // At least one tile: for an empty list (never made by the mask: every query keeps a key) the
  // consumers write o = 0 and lse = -inf, as forward.cu does.
  const int n_tiles = max(1, (qb.n_alive + kBn - 1) / kBn);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::bars);  // tile c is in buffer c % kStages
  uint64_t* empty = full + kStages;                               // buffer c % kStages is free
  if (tid == 0) {
    for (int st = 0; st < kStages; ++st) {
      mbarrier_init(full + st, kProducers);       // every producer thread
      mbarrier_init(empty + st, 32 * kConsumerWarps);  // every consumer thread
    }
  }
  __syncthreads();  // the barriers are initialized (the only barrier across the block)

  if (warp >= kConsumerWarps) {
    // The producer: Q, then the list's key blocks (gather_sm90.cuh).
    set_max_registers<kProducerRegs, false>();
    const int pt = tid - 32 * kConsumerWarps;
    produce_rows<T, D, kTileQ>(smem + L::rows(0), qb.q, i0, d.Lq, pt);
    produce_blocks<L, T, D, kBn, kStages>(smem, full, empty, qb, q_tile, n_tiles, pt);
    return;
  }
  set_max_registers<kConsumerRegs, true>();

  // The consumers. Descriptors (sm90.cuh) of K_j and V_j in buffer 0; a k16 step or another
  // buffer is a constant added to the start address field (units of 16 bytes), so the loops
  // below add instead of re-encoding.
  const uint64_t k_desc0 = descriptor(base + L::k, 16, 1024);
  const uint64_t v_desc0 = descriptor(base + L::v, kBn * 128, 1024);
  auto k_desc = [&](int buf, int kk) {
    return k_desc0 + ((buf * L::tile_bytes + (kk / 4) * (kBn * 128) + (kk % 4) * 32) >> 4);
  };
  auto v_desc = [&](int buf, int kk) {  // k16 step kk of the kBn keys: 16 rows
    return v_desc0 + ((buf * L::tile_bytes + kk * 16 * 128) >> 4);
  };
  auto wait_for_tile = [&](int c) { mbarrier_wait(full + c % kStages, (c / kStages) & 1); };
  // This thread is done with the buffers of tile c (its products, and its reads of the keys).
  // Every thread arrives: one lane per warp after __syncwarp would do, but compute-sanitizer's
  // racecheck does not see the other lanes' reads ordered before it.
  auto hand_back = [&](int c) { mbarrier_arrive(empty + c % kStages); };

  float o_acc[D / 2];  // O, 64 x D per warpgroup (layout in sm90.cuh)
  #pragma unroll
  for (int n = 0; n < D / 2; ++n) o_acc[n] = 0.0f;
  uint32_t qf[D / 16][4];  // Q of this warp's 16 rows as the register A operand of S (k16 slices)
  float s[kBn / 2] = {};   // S, then P, of the current block (64 x kBn per warpgroup)
  uint32_t pf[kBn / 16][4];  // P of the previous tile as the register A operand of P V
  float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.0f, 0.0f}, alpha[2] = {1.0f, 1.0f};
  const int row[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
  const int p_row[2] = {position(row[0]), position(row[1])};
  const int warp_p_first = position(i0 + warp * 16), warp_p_last = position(i0 + warp * 16 + 15);
  const float scale2 = d.scale * kLog2e;

  // S (the 64 x kBn accumulators) -> P of block c in place: mask, online softmax (base 2), as in
  // forward.cu (s[4n + e] is forward.cu's s[n][e]); alpha = 2^(m - m') for the rescale of O.
  auto softmax = [&](int c) {
    const KeyBlock<kBn>& kt = kts[c % kStages];
    const int r0 = c * kBn;
    float row_max[2] = {-INFINITY, -INFINITY};
    if (r0 + kBn <= qb.n_full || block_kept_by(kt, warp_p_first, warp_p_last)) {
      #pragma unroll
      for (int n = 0; n < kBn / 8; ++n) {
        const float2 d2 = *reinterpret_cast<const float2*>(&kt.delta2[n * 8 + t4 * 2]);
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
          s[4 * n + 2 * r] = fmaf(s[4 * n + 2 * r], scale2, d2.x);
          s[4 * n + 2 * r + 1] = fmaf(s[4 * n + 2 * r + 1], scale2, d2.y);
          row_max[r] = fmaxf(row_max[r], fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
        }
      }
    } else {
      // (the entries past the list hold key -1 and e_j -1, which no query keeps)
      #pragma unroll
      for (int n = 0; n < kBn / 8; ++n) {
        const int2 j2 = *reinterpret_cast<const int2*>(&kt.key[n * 8 + t4 * 2]);
        const int2 e2 = *reinterpret_cast<const int2*>(&kt.evict[n * 8 + t4 * 2]);
        const float2 d2 = *reinterpret_cast<const float2*>(&kt.delta2[n * 8 + t4 * 2]);
        #pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = e == 0 ? j2.x : j2.y, ej = e == 0 ? e2.x : e2.y;
          #pragma unroll
          for (int r = 0; r < 2; ++r) {
            const bool kept = rule::is_kept(j, p_row[r], ej);
            float& x = s[4 * n + 2 * r + e];
            x = kept ? fmaf(x, scale2, e == 0 ? d2.x : d2.y) : -INFINITY;
            row_max[r] = fmaxf(row_max[r], x);
          }
        }
      }
    }
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[r] = quad_max(row_max[r]);
      const float m_new = fmaxf(m_row[r], row_max[r]);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // row with nothing kept yet
      alpha[r] = exp2f(m_row[r] - m_use);                     // 0 when m_row was -inf
      float sum = 0.0f;
      #pragma unroll
      for (int n = 0; n < kBn / 8; ++n) {
        s[4 * n + 2 * r] = fast_exp2(s[4 * n + 2 * r] - m_use);
        s[4 * n + 2 * r + 1] = fast_exp2(s[4 * n + 2 * r + 1] - m_use);
        sum += s[4 * n + 2 * r] + s[4 * n + 2 * r + 1];
      }
      l_row[r] = l_row[r] * alpha[r] + sum;
      m_row[r] = m_new;
    }
  };
  // O *= alpha. alpha is exactly 1 in a row whose maximum did not move, which after the first
  // blocks is most rows: the warp skips the 64 multiplies when that holds for all its rows
  // (a branch around registers no wgmma has in flight; ptxas keeps the wgmma pipelined).
  auto rescale_o = [&] {
    if (!__any_sync(0xffffffffu, alpha[0] != 1.0f || alpha[1] != 1.0f)) return;
    #pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      #pragma unroll
      for (int r = 0; r < 2; ++r) {
        o_acc[4 * n + 2 * r] *= alpha[r];
        o_acc[4 * n + 2 * r + 1] *= alpha[r];
      }
    }
  };
  // P as register A operand: k16 slice kk is the accumulators of column blocks 2kk, 2kk+1.
  auto pack_p = [&] {
    #pragma unroll
    for (int kk = 0; kk < kBn / 16; ++kk) {
      pf[kk][0] = Elem<T>::pack(s[8 * kk + 0], s[8 * kk + 1]);
      pf[kk][1] = Elem<T>::pack(s[8 * kk + 2], s[8 * kk + 3]);
      pf[kk][2] = Elem<T>::pack(s[8 * kk + 4], s[8 * kk + 5]);
      pf[kk][3] = Elem<T>::pack(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };
  // S = Q K_c^T, asynchronous. Q comes from registers: only K_c is read from shared memory, whose
  // bandwidth a product of 64 x 64 with both operands there would use whole.
  auto issue_s = [&](int c) {
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_rs_kmajor<T, kBn>(s, qf[kk], k_desc(c % kStages, kk), kk > 0);
    wgmma_commit();
  };
  auto issue_pv = [&](int c) {  // O += P_c V_c, asynchronous
    #pragma unroll
    for (int kk = 0; kk < kBn / 16; ++kk) wgmma_rs<T, D>(o_acc, pf[kk], v_desc(c % kStages, kk));
    wgmma_commit();
  };

  // The schedule (FlashAttention-3's intra-warpgroup pipelining): while the tensor cores add
  // P_{c-1} V_{c-1} into O, the warpgroup computes the softmax of S_c.
  //   iteration c:  wait for tile c; issue S_c = Q K_c^T; issue O += P_{c-1} V_{c-1}
  //                 wait for S_c; softmax -> P_c, alpha_c; wait for O; hand back tile c-1;
  //                 O *= alpha_c; pack P_c
  // Tile 0 goes alone (no P V to overlap yet), so that the loop issues its wgmma without
  // branches: accumulators merged from two paths would be copied while a wgmma writes them, and
  // the compiler would then serialize every wgmma.
  // The warpgroups take turns to issue their products (sm90::PingPong), so that one computes its
  // softmax while the other's products run.
  static_assert(32 * kConsumerWarps == PingPong::kThreads, "two consumer warpgroups");
  const PingPong turns(wg);
  wait_for_tile(0);  // (Q landed with tile 0)
  load_a_operand<D, kTileQ>(smem + L::rows(0), warp * 16, qf);
  turns.mine();
  wgmma_fence();
  issue_s(0);
  turns.yours();
  wgmma_wait<0>();
  fence_registers(s);
  softmax(0);
  pack_p();
  for (int c = 1; c < n_tiles; ++c) {
    wait_for_tile(c);
    turns.mine();
    wgmma_fence();
    issue_s(c);
    issue_pv(c - 1);
    turns.yours();
    wgmma_wait<1>();  // S_c is done (P_{c-1} V_{c-1} may still run)
    fence_registers(s);
    softmax(c);
    wgmma_wait<0>();
    fence_registers(o_acc);
    hand_back(c - 1);
    rescale_o();
    pack_p();
  }
  turns.mine();
  wgmma_fence();  // the last tile's P V
  issue_pv(n_tiles - 1);
  turns.last_yours();
  wgmma_wait<0>();
  fence_registers(o_acc);

  // 5. o = O / l, lse = ln2 * (m + log2 l).
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_row[r]);
    if (row[r] >= d.Lq) continue;
    const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
    float* o_row = a.o + ((size_t)(b * d.Hq + hq) * d.Lq + row[r]) * D;
    #pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(o_row + n * 8 + t4 * 2) =
          make_float2(o_acc[4 * n + 2 * r] * inv_l, o_acc[4 * n + 2 * r + 1] * inv_l);
    if (t4 == 0)
      a.lse[(size_t)(b * d.Hq + hq) * d.Lq + row[r]] =
          l > 0.0f ? (m_row[r] + log2f(l)) * kLn2 : -INFINITY;
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

template <typename T, int D>
void launch(const Dims& d, const AttnArgs& a, cudaStream_t st) {
  constexpr int kBn = Plan<D>::kBn, kStages = Plan<D>::kStages;
  constexpr size_t smem = Smem<D, kBn, kStages>::bytes;
  DMA_CUDA_CHECK(cudaFuncSetAttribute(forward_sm90_kernel<T, D, kBn, kStages>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  const dim3 grid(table_tiles(d), d.Hq, d.B);
  forward_sm90_kernel<T, D, kBn, kStages><<<grid, kThreads, smem, st>>>(d, a);
  DMA_CUDA_CHECK_LAUNCH(forward_sm90_kernel);
}

}  // namespace

void launch_forward_sm90(const Dims& d, const AttnArgs& a, cudaStream_t st) {
  dispatch<64, 128>(d.precision, d.D, [&](auto elem, auto head_dim) {
    launch<decltype(elem), decltype(head_dim)::value>(d, a, st);
  });
}

}  // namespace dma::cuda::detail
