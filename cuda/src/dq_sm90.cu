// DMA backward on Hopper (sm_90a), the query-major pass: dq, as backward.cu's dq_kernel computes
// it, with its three products on wgmma and the block structure of forward_sm90.cu.
//
// One block = one query tile of kTileQ = 128 queries of one (b, query head): two consumer
// warpgroups of 64 rows (warp w owns rows 16w .. 16w+15) and a producer warpgroup that copies
// Q_i and dO_i, then gathers the tile's candidate keys kBn at a time (gather_sm90.cuh) into
// kStages buffers handed over by mbarrier. Per block of keys K_j, V_j (paper notation):
//   S  = Q K_j^T,  dP = dO V_j^T           wgmma m64n{kBn}k16, Q held in registers (dO too at
//                                          D = 64), the others in shared memory
//   P  = 2^(log2e (scale S + delta_j) - log2e lse_i), 0 where not kept
//   dS = P (dP - D_i)                       (registers; D_i = do_i . o_i from dsum_kernel)
//   dQ += dS K_j                            wgmma m64nDk16, dS from registers, K_j transposed
// and dq = scale * dQ at the end. dQ of block c-1 runs on the tensor cores while the warpgroup
// computes dS of block c, and the two warpgroups take turns to issue (ping-pong). No atomics:
// dq is written once, in the list's order of summation.
#include "gather_sm90.cuh"
#include "kernels.hpp"

namespace dma::cuda::detail {
namespace {

using namespace sm90;

constexpr int kConsumerWarps = kTileQ / 16;  // 8: two warpgroups of 64 rows
constexpr int kConsumers = 32 * kConsumerWarps, kThreads = kConsumers + kProducers;
// Registers per thread after setmaxnreg: the block's 168 per thread at launch, shared out anew.
constexpr int kProducerRegs = 40, kConsumerRegs = 232;
static_assert(kProducers * kProducerRegs + kConsumers * kConsumerRegs <= launch_registers(kThreads, 1),
              "registers");

// kBn keys per block and kStages buffers of K and V: K_{c-1} read by dQ, block c, and blocks
// c+1 .. being copied. S and dP hold 2 x kBn/2 accumulators per thread beside dQ's D/2: with
// 128-key blocks, D = 64 spills (92 bytes), so both head dims take 64.
constexpr int kBn = 64, kStages = 4;

template <int D>
using Smem = QueryTileSmem<D, kBn, kStages, 2>;  // Q and dO, then the K, V buffers (gather_sm90.cuh)
constexpr int kQ = 0, kDout = 1;                 // their row tiles

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) dq_sm90_kernel(Dims d, AttnArgs a) {
  static_assert(kStages >= 3, "the producer hands block c-1 over after starting block c");
  static_assert(Smem<D>::bytes <= 227 * 1024, "a block's shared memory on sm_90");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Smem<D>;
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
  const T* do_bh = static_cast<const T*>(a.dout) + qb.bhq * d.Lq * D;  // (B,Hq,Lq,D) at (b, hq)
  const int n_tiles = max(1, (qb.n_alive + kBn - 1) / kBn);  // (an empty list: dq = 0)

  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::bars);  // block c is in buffer c % kStages
  uint64_t* empty = full + kStages;                               // buffer c % kStages is free
  if (tid == 0) {
    for (int st = 0; st < kStages; ++st) {
      mbarrier_init(full + st, kProducers);  // every producer thread
      mbarrier_init(empty + st, kConsumers);  // every consumer thread
    }
  }
  __syncthreads();  // the barriers are initialized (the only barrier across the block)

  if (warp >= kConsumerWarps) {
    // The producer, as forward_sm90.cu's: Q and dO, then block after block; block c-1 is handed
    // over once its copies (and, with block 0, those of Q and dO) have landed.
    set_max_registers<kProducerRegs, false>();
    const int pt = tid - kConsumers;
    produce_rows<T, D, kTileQ>(smem + L::rows(kQ), qb.q, i0, d.Lq, pt);
    produce_rows<T, D, kTileQ>(smem + L::rows(kDout), do_bh, i0, d.Lq, pt);
    produce_blocks<L, T, D, kBn, kStages>(smem, full, empty, qb, q_tile, n_tiles, pt);
    return;
  }
  set_max_registers<kConsumerRegs, true>();

  // Descriptors (sm90.cuh): dO (this warpgroup's 64 rows) and K_j, V_j K-major for S and dP,
  // K_j MN-major for dQ (k runs over the keys: 16 rows = 2048 bytes a step).
  const uint64_t kmajor0 = descriptor(base, 16, 1024), k_trans0 = descriptor(base + L::k, kBn * 128, 1024);
  auto rows_desc = [&](uint32_t tile, int kk) {
    return moved(moved(kmajor0, tile + wg * 64 * 128), (kk / 4) * (kTileQ * 128) + (kk % 4) * 32);
  };
  auto block_desc = [&](uint32_t tiles, int buf, int kk) {
    return moved(moved(kmajor0, tiles + buf * L::tile_bytes), (kk / 4) * (kBn * 128) + (kk % 4) * 32);
  };
  auto k_trans_desc = [&](int buf, int kk) {
    return moved(moved(k_trans0, buf * L::tile_bytes), kk * 16 * 128);
  };

  const int row_l[2] = {wg * 64 + (warp % 4) * 16 + g, wg * 64 + (warp % 4) * 16 + g + 8};
  const int row[2] = {i0 + row_l[0], i0 + row_l[1]};
  const int p_row[2] = {position(row[0]), position(row[1])};
  const int warp_p_first = position(i0 + warp * 16), warp_p_last = position(i0 + warp * 16 + 15);
  // past Lq: lse = +inf makes P exactly 0, so padded rows add nothing
  float lse2[2], dsum[2];
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    lse2[r] = row[r] < d.Lq ? a.lse[qb.bhq * d.Lq + row[r]] * kLog2e : INFINITY;
    dsum[r] = row[r] < d.Lq ? a.dsum[qb.bhq * d.Lq + row[r]] : 0.0f;
  }
  const float scale2 = d.scale * kLog2e;

  float dq_acc[D / 2];  // dQ, 64 x D per warpgroup (layout in sm90.cuh)
  #pragma unroll
  for (int n = 0; n < D / 2; ++n) dq_acc[n] = 0.0f;

  float s[kBn / 2], dp[kBn / 2];  // S and dP of a block: 64 x kBn per warpgroup
  uint32_t sf[kBn / 16][4];        // dS as the register A operand (k16 slice kk: blocks 2kk, 2kk+1)
  uint32_t qf[D / 16][4];          // this warp's 16 rows of Q as the register A operand of S
  // dO too at D = 64 (at D = 128, with both held ptxas spills 16 bytes)
  constexpr bool kDoutInRegisters = D == 64;
  uint32_t dof[kDoutInRegisters ? D / 16 : 1][4];
  // S = Q K_c^T (Q from registers, so that only K_c is read from shared memory) and
  // dP = dO V_c^T, asynchronous
  auto issue_s_dp = [&](int c) {
    const int buf = c % kStages;
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) wgmma_rs_kmajor<T, kBn>(s, qf[kk], block_desc(L::k, buf, kk), kk > 0);
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      if constexpr (kDoutInRegisters) wgmma_rs_kmajor<T, kBn>(dp, dof[kk], block_desc(L::v, buf, kk), kk > 0);
      else wgmma_ss<T, kBn>(dp, rows_desc(L::rows(kDout), kk), block_desc(L::v, buf, kk), kk > 0);
    wgmma_commit();
  };
  auto issue_dq = [&](int c) {  // dQ += dS_c K_c, asynchronous
    #pragma unroll
    for (int kk = 0; kk < kBn / 16; ++kk) wgmma_rs<T, D>(dq_acc, sf[kk], k_trans_desc(c % kStages, kk));
    wgmma_commit();
  };
  // P and dS of block c from S and dP, dS in place of dP (s[4n + 2r + e]: row row_l[r], key
  // column 8n + 2t4 + e), as backward.cu's dq_kernel.
  auto compute_ds = [&](int c) {
    const KeyBlock<kBn>& kt = kts[c % kStages];
    const int r0 = c * kBn;
    if (r0 + kBn <= qb.n_full || block_kept_by(kt, warp_p_first, warp_p_last)) {  // no element mask
      #pragma unroll
      for (int n = 0; n < kBn / 8; ++n) {
        const float2 d2 = *reinterpret_cast<const float2*>(&kt.delta2[n * 8 + t4 * 2]);
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
          float* x = &s[4 * n + 2 * r];
          float* y = &dp[4 * n + 2 * r];
          y[0] = fast_exp2(fmaf(x[0], scale2, d2.x) - lse2[r]) * (y[0] - dsum[r]);
          y[1] = fast_exp2(fmaf(x[1], scale2, d2.y) - lse2[r]) * (y[1] - dsum[r]);
        }
      }
      return;
    }
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
          const float p =
              kept ? fast_exp2(fmaf(s[4 * n + 2 * r + e], scale2, e == 0 ? d2.x : d2.y) - lse2[r]) : 0.0f;
          dp[4 * n + 2 * r + e] = p * (dp[4 * n + 2 * r + e] - dsum[r]);  // exactly 0 where p is 0
        }
      }
    }
  };
  // dS as the register A operand: k16 slice kk is the accumulators of blocks 2kk, 2kk+1. Packed
  // while no wgmma runs (ptxas serializes them if an in-flight one's operands are redefined).
  auto pack_ds = [&] {
    #pragma unroll
    for (int kk = 0; kk < kBn / 16; ++kk)
      #pragma unroll
      for (int x = 0; x < 4; ++x) sf[kk][x] = Elem<T>::pack(dp[8 * kk + 2 * x], dp[8 * kk + 2 * x + 1]);
  };
  auto wait_for_block = [&](int c) { mbarrier_wait(full + c % kStages, (c / kStages) & 1); };

  // The schedule (as forward_sm90.cu's): iteration c issues S_c, dP_c and then dQ += dS_{c-1}
  // K_{c-1}, computes dS_c while the latter runs, and hands block c-1 back once it is done.
  // Block 0 goes alone, so that no wgmma is in flight across the loop's back edge (ptxas would
  // serialize them). The warpgroups take turns to issue (sm90::PingPong, as in the forward): one
  // computes its dS while the other's products run.
  static_assert(kConsumers == PingPong::kThreads, "two consumer warpgroups");
  const PingPong turns(wg);
  wait_for_block(0);  // (Q and dO landed with block 0)
  load_a_operand<D, kTileQ>(smem + L::rows(kQ), warp * 16, qf);
  if constexpr (kDoutInRegisters) load_a_operand<D, kTileQ>(smem + L::rows(kDout), warp * 16, dof);
  turns.mine();
  wgmma_fence();
  issue_s_dp(0);
  turns.yours();
  wgmma_wait<0>();
  fence_registers(s);
  fence_registers(dp);
  compute_ds(0);
  pack_ds();
  for (int c = 1; c < n_tiles; ++c) {
    wait_for_block(c);
    turns.mine();
    wgmma_fence();
    issue_s_dp(c);
    issue_dq(c - 1);
    turns.yours();
    wgmma_wait<1>();  // S_c and dP_c are in (dQ += dS_{c-1} K_{c-1} may still run)
    fence_registers(s);
    fence_registers(dp);
    compute_ds(c);
    wgmma_wait<0>();
    fence_registers(dq_acc);
    mbarrier_arrive(empty + (c - 1) % kStages);  // this thread is done with block c-1
    pack_ds();
  }
  turns.mine();
  wgmma_fence();
  issue_dq(n_tiles - 1);
  turns.last_yours();
  wgmma_wait<0>();
  fence_registers(dq_acc);

  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row[r] >= d.Lq) continue;
    float* dq_row = a.dq + (qb.bhq * d.Lq + row[r]) * D;
    #pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(dq_row + n * 8 + t4 * 2) =
          make_float2(dq_acc[4 * n + 2 * r] * d.scale, dq_acc[4 * n + 2 * r + 1] * d.scale);
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

template <typename T, int D>
void launch(const Dims& d, const AttnArgs& a, cudaStream_t st) {
  constexpr size_t smem = Smem<D>::bytes;
  DMA_CUDA_CHECK(cudaFuncSetAttribute(dq_sm90_kernel<T, D>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  dq_sm90_kernel<T, D><<<dim3(table_tiles(d), d.Hq, d.B), kThreads, smem, st>>>(d, a);
  DMA_CUDA_CHECK_LAUNCH(dq_sm90_kernel);
}

}  // namespace

void launch_dq_sm90(const Dims& d, const AttnArgs& a, cudaStream_t st) {
  dispatch<64, 128>(d.precision, d.D, [&](auto elem, auto head_dim) {
    launch<decltype(elem), decltype(head_dim)::value>(d, a, st);
  });
}

}  // namespace dma::cuda::detail
