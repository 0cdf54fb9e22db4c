// dma_bwd_lab: the DMA attention backward, one rung of the ladder at a time (as dma_fwd_lab for
// the forward; cuda/dev/README.md).
//
//   dma_bwd_lab N [--L 4096 --w 512 --Hq 16 --Hkv 8 --Hd <Hkv> --D 128 --B 1 --reps 20
//                  --warmup 3 --non-causal --seed 1]
//
// runs backward kernel version N: dq, dk, dv, ddelta from q, k, v, delta, the mask state, o, lse
// (the production forward's) and do.
//   1. validates it on small problems against the float64 reference (docs/design.md §5): inputs
//      from dma::random_problem rounded to bf16, delta and the mask state from the device API,
//      the reference dma::run_pipeline<double> given that delta. The GPU's evict must equal the
//      reference's; the outputs are poisoned with NaN first and every element must be written;
//      dq, dk, dv, ddelta within relative L2 2e-2; the keys no query keeps get exactly zero dk,
//      dv and ddelta;
//   2. times it on the problem of the flags, as TFLOP/s on the kept pairs: 10*D flops per kept
//      pair (q.k and do.v recomputed, dv += p do, dk += ds q, dq += ds k), bench/dma_bench's count.
// Exit status: 0 pass, 1 a failed validation (or a CUDA error), 2 a bad argument, 77 no usable
// CUDA device (or version 3, the Hopper kernels, on another GPU).
//
// ==== MEASURED ON THE H200 ===================================================================
// `dma_bwd_lab N --L 16384` (2026-12-01, NVIDIA H200, driver 580.159.04, commit fd5fc02;
// bench/results/tables_p1/lab_bwd/): B=1, Lq=Lk=16384, w=512, Hq=16, Hkv=8, Hd=8, D=128, causal,
// bf16 inputs, fp32 accumulation; 1.32e8 kept pairs, 169 GFLOP at 10*D per pair.
//   version  what it adds                                          median ms, TFLOP/s (kept pairs)
//   v1       a thread per query row for dq, a thread per key for   3001 ms, 0.056 TFLOP/s
//            dk, dv, ddelta; fp32 on CUDA cores, global loads
//   v2       mma.sync (cuda/src/backward.cu): dq over the tile     2.894 ms, 58 TFLOP/s (1037x v1)
//            lists, dk dv ddelta by alive slots; no atomics (the
//            figure is dma_bench's backward phase on the same
//            shape, bench/results/tables_p1/grid_d128/)
//   v3       wgmma (Hopper), the rungs that built it (commits; bench/results/hopper_bwd/):
//            dk/dv on wgmma, one warpgroup of 64 slots, two      1.878 ms, 90 TFLOP/s (bc37177)
//            blocks per SM (dense 16K: 13.90 ms; v2 17.96)
//            + dq on wgmma (the Hopper forward's blocks)         1.546 ms (dense 9.15)
//            + the sweep split into spans of query tiles when    1.027 ms (dense 9.19; w = 2048
//              its slot blocks are too few for the GPU             2.724, from 3.300)
//            + no mask arithmetic where a step is kept whole     1.011 ms, 167 TFLOP/s (299b435;
//                                                                  dense 8.47, w = 2048 2.625)
//            + descriptors by addition, element masks as query   w = 2048: 2.569 ms, dense 8.58
//              ranges, the slot sweep by departures (4563100)    (2026-12-02, same command as the
//                                                                  next row)
//            + spans last first, Q in dq's registers, 232        w = 2048: 2.548 ms, 253 TFLOP/s,
//              registers for dk/dv (no spill) (94025f5;          dense 8.55
//              bench/results/qregs_spans/)
//            + the producers' copies at one address each, keys   dma_bench's backward at 16K,
//              loaded ahead, dq in ping-pong (3e35608, c3e8d77,   D = 128: w = 2048 2.56 -> 2.13
//              ad8eaa8; bench/results/producer/)                 ms, dense 8.62 -> 7.27 (not
//                                                                  rerun in this lab)
//            + dq's producer as the forward's: implicit lists as  dma_bench: dense 7.29 -> 6.85,
//              rows, keys by shuffle (c97eaeb, a06a009;           w = 2048 2.10 -> 2.01 ms (not
//              bench/results/dense_producer/)                      rerun in this lab)
// ==============================================================================================
//
// Layouts (docs/design.md §1): q, do, o, dq (B,Hq,Lq,D); k, v, dk, dv (B,Hkv,Lk,D); delta,
// evict, ddelta (B,Hd,Lk); lse (B,Hq,Lq). Query head hq reads kv head hq / (Hq/Hkv) and delta head
// hq / (Hq/Hd).
#include <cuda_bf16.h>

#include "lab.hpp"

namespace {

using bf16 = __nv_bfloat16;
using lab::DeviceArray;
using lab::kPrecision;
constexpr double kRelL2Bar = 2e-2;  // dq, dk, dv, ddelta: bf16 P and dS in the products (§5)

// A problem on the device as every version finds it: the inputs in bf16, delta, the mask state,
// o and lse from the production phases, do; dq, dk, dv, ddelta to be written.
struct DeviceProblem {
  dma::cuda::Config c;
  DeviceArray<uint16_t> q, k, v, dout;  // bf16 bits
  DeviceArray<float> delta;             // (B,Hd,Lk)
  DeviceArray<uint8_t> mask_state;      // starts with evict (B,Hd,Lk) int32: e_j
  DeviceArray<float> o, lse;            // the forward's
  DeviceArray<float> dq, dk, dv, ddelta;
  DeviceArray<uint8_t> workspace;
  DeviceArray<float> dsum;              // (B,Hq,Lq) D_i for v1 (production keeps it in workspace)

  explicit DeviceProblem(const dma::Problem<float>& p)
      : c{p.shape, p.opt, kPrecision},
        q(lab::bf16_bits(p.q)),
        k(lab::bf16_bits(p.k)),
        v(lab::bf16_bits(p.v)),
        dout(lab::bf16_bits(p.dout)),
        delta(static_cast<size_t>(p.shape.delta_numel())),
        mask_state(dma::cuda::mask_state_bytes(c)),
        o(static_cast<size_t>(p.shape.q_numel())),
        lse(static_cast<size_t>(p.shape.lse_numel())),
        dq(static_cast<size_t>(p.shape.q_numel())),
        dk(static_cast<size_t>(p.shape.kv_numel())),
        dv(static_cast<size_t>(p.shape.kv_numel())),
        ddelta(static_cast<size_t>(p.shape.delta_numel())),
        workspace(dma::cuda::workspace_bytes(c)),
        dsum(static_cast<size_t>(p.shape.lse_numel())) {
    const DeviceArray<float> w_dt(p.w_dt), a(p.a);
    const DeviceArray<int64_t> status(1);
    dma::cuda::reset_status(status.get(), nullptr);
    dma::cuda::dynamic_weights(c, v.get(), w_dt.get(), a.get(), delta.get(), status.get(),
                               workspace.get(), workspace.size(), nullptr);
    dma::cuda::check_status(c, status.get(), nullptr);
    dma::cuda::build_mask(c, delta.get(), mask_state.get(), workspace.get(), workspace.size(),
                          nullptr);
    dma::cuda::attention_forward(c, q.get(), k.get(), v.get(), delta.get(), mask_state.get(),
                                 o.get(), lse.get(), nullptr);
    LAB_CUDA_CHECK(cudaDeviceSynchronize());
  }
  const int32_t* evict() const { return dma::cuda::evict_of(mask_state.get()); }
  std::vector<int32_t> download_evict() const {
    return lab::copy_to_host<int32_t>(evict(), static_cast<size_t>(c.shape.delta_numel()));
  }
  void poison_outputs() const {
    dq.poison();
    dk.poison();
    dv.poison();
    ddelta.poison();
  }
  int64_t unwritten() const {  // outputs still holding the NaN poison
    return lab::count_nan(dq.download()) + lab::count_nan(dk.download()) +
           lab::count_nan(dv.download()) + lab::count_nan(ddelta.download());
  }
};

// ==== v1: a thread per query row (dq), a thread per key (dk, dv, ddelta) ======================
// The backward of docs/design.md §1.4 written out pair by pair, as the CPU reference does, with
// the recomputation of FlashAttention: for a kept pair (i, j)
//   p_ij  = exp(scale q_i.k_j + delta_j - lse_i)        (lse from the forward: no max pass)
//   dp_ij = do_i . v_j,   ds_ij = p_ij (dp_ij - D_i),   D_i = do_i . o_i
//   dq_i += ds_ij k_j,    dk_j += ds_ij q_i,   dv_j += p_ij do_i,   ddelta_j += ds_ij
// (dq and dk times scale at the end). Masked pairs are skipped: their p_ij is exactly 0.
//   - dsum_v1: D_i, a thread per row;
//   - dq_v1: a thread per query row walks its keys j <= p_i, as forward v1 does;
//   - dkdv_v1: a thread per (b, kv head, key j) walks every query of every query head of that kv
//     head and keeps the pairs rule::is_kept admits; it owns dk_j, dv_j and the ddelta_j of the
//     delta heads of its kv head, so nothing is summed by two threads (no atomics). Each thread
//     tests all Lq queries: O(Lq Lk) tests, cheap next to the kept pairs' 10 D flops each.
//   - fp32 on CUDA cores, bf16 read from global memory; a thread's D-float rows partly live in
//     local memory at D = 128.

constexpr int kV1Threads = 128;

struct BwdArgs {
  int B, Hq, Hkv, Hd, Lq, Lk;
  bool causal;
  float scale;
  const bf16 *q, *k, *v, *dout;   // (B,Hq,Lq,D), (B,Hkv,Lk,D) x2, (B,Hq,Lq,D)
  const float *delta, *o, *lse;   // (B,Hd,Lk), (B,Hq,Lq,D), (B,Hq,Lq)
  const int32_t* evict;           // (B,Hd,Lk)
  float* dsum;                    // (B,Hq,Lq): D_i
  float *dq, *dk, *dv, *ddelta;
};

template <int D>
__global__ void __launch_bounds__(kV1Threads) dsum_v1_kernel(const BwdArgs a) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= int64_t(a.B) * a.Hq * a.Lq) return;
  float acc = 0.0f;
  for (int d = 0; d < D; ++d) acc += __bfloat162float(a.dout[row * D + d]) * a.o[row * D + d];
  a.dsum[row] = acc;
}

template <int D>
__global__ void __launch_bounds__(kV1Threads) dq_v1_kernel(const BwdArgs a) {
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // (b*Hq + hq)*Lq + i
  if (row >= int64_t(a.B) * a.Hq * a.Lq) return;
  const int i = int(row % a.Lq), hq = int(row / a.Lq % a.Hq), b = int(row / a.Lq / a.Hq);
  const int hk = hq / (a.Hq / a.Hkv), hd = hq / (a.Hq / a.Hd);
  const int p_i = dma::rule::query_position(a.Lq, a.Lk, a.causal, i);
  const bf16* k_bh = a.k + (int64_t(b) * a.Hkv + hk) * a.Lk * D;
  const bf16* v_bh = a.v + (int64_t(b) * a.Hkv + hk) * a.Lk * D;
  const float* delta_bh = a.delta + (int64_t(b) * a.Hd + hd) * a.Lk;
  const int32_t* evict_bh = a.evict + (int64_t(b) * a.Hd + hd) * a.Lk;
  float q_i[D], do_i[D], dq_i[D];
  for (int d = 0; d < D; ++d) {
    q_i[d] = __bfloat162float(a.q[row * D + d]);
    do_i[d] = __bfloat162float(a.dout[row * D + d]);
    dq_i[d] = 0.0f;
  }
  const float lse_i = a.lse[row], dsum_i = a.dsum[row];
  for (int j = 0; j <= p_i; ++j) {
    if (!dma::rule::is_kept(j, p_i, evict_bh[j])) continue;
    float qk = 0.0f, dp = 0.0f;
    for (int d = 0; d < D; ++d) {
      qk += q_i[d] * __bfloat162float(k_bh[int64_t(j) * D + d]);
      dp += do_i[d] * __bfloat162float(v_bh[int64_t(j) * D + d]);
    }
    const float p = expf(a.scale * qk + delta_bh[j] - lse_i), ds = p * (dp - dsum_i);
    for (int d = 0; d < D; ++d) dq_i[d] += ds * __bfloat162float(k_bh[int64_t(j) * D + d]);
  }
  for (int d = 0; d < D; ++d) a.dq[row * D + d] = a.scale * dq_i[d];
}

template <int D>
__global__ void __launch_bounds__(kV1Threads) dkdv_v1_kernel(const BwdArgs a) {
  const int64_t krow = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;  // (b*Hkv + hk)*Lk + j
  if (krow >= int64_t(a.B) * a.Hkv * a.Lk) return;
  const int j = int(krow % a.Lk), hk = int(krow / a.Lk % a.Hkv), b = int(krow / a.Lk / a.Hkv);
  float k_j[D], v_j[D], dk_j[D], dv_j[D];
  for (int d = 0; d < D; ++d) {
    k_j[d] = __bfloat162float(a.k[krow * D + d]);
    v_j[d] = __bfloat162float(a.v[krow * D + d]);
    dk_j[d] = dv_j[d] = 0.0f;
  }
  // The delta heads of kv head hk (Hd = Hkv: hk itself; Hd = Hq: its query heads), and the query
  // heads of each.
  const int hd_per_kv = a.Hd / a.Hkv, hq_per_hd = a.Hq / a.Hd;
  for (int hd = hk * hd_per_kv; hd < (hk + 1) * hd_per_kv; ++hd) {
    const int64_t dj = (int64_t(b) * a.Hd + hd) * a.Lk + j;
    const int e_j = a.evict[dj];
    const float delta_j = a.delta[dj];
    float dd = 0.0f;
    for (int hq = hd * hq_per_hd; hq < (hd + 1) * hq_per_hd; ++hq)
      for (int i = 0; i < a.Lq; ++i) {
        if (!dma::rule::is_kept(j, dma::rule::query_position(a.Lq, a.Lk, a.causal, i), e_j)) continue;
        const int64_t row = (int64_t(b) * a.Hq + hq) * a.Lq + i;
        float qk = 0.0f, dp = 0.0f;
        for (int d = 0; d < D; ++d) {
          qk += __bfloat162float(a.q[row * D + d]) * k_j[d];
          dp += __bfloat162float(a.dout[row * D + d]) * v_j[d];
        }
        const float p = expf(a.scale * qk + delta_j - a.lse[row]), ds = p * (dp - a.dsum[row]);
        for (int d = 0; d < D; ++d) {
          dv_j[d] += p * __bfloat162float(a.dout[row * D + d]);
          dk_j[d] += ds * __bfloat162float(a.q[row * D + d]);
        }
        dd += ds;
      }
    a.ddelta[dj] = dd;
  }
  for (int d = 0; d < D; ++d) {
    a.dk[krow * D + d] = a.scale * dk_j[d];
    a.dv[krow * D + d] = dv_j[d];
  }
}

void backward_v1(const DeviceProblem& dp) {
  const dma::Shape& s = dp.c.shape;
  const BwdArgs a{int(s.B), int(s.Hq), int(s.Hkv), int(s.Hd), int(s.Lq), int(s.Lk),
                  dp.c.opt.causal, float(dp.c.opt.softmax_scale(s)),
                  reinterpret_cast<const bf16*>(dp.q.get()), reinterpret_cast<const bf16*>(dp.k.get()),
                  reinterpret_cast<const bf16*>(dp.v.get()), reinterpret_cast<const bf16*>(dp.dout.get()),
                  dp.delta.get(), dp.o.get(), dp.lse.get(), dp.evict(), dp.dsum.get(),
                  dp.dq.get(), dp.dk.get(), dp.dv.get(), dp.ddelta.get()};
  const unsigned q_blocks = unsigned((s.B * s.Hq * s.Lq + kV1Threads - 1) / kV1Threads);
  const unsigned k_blocks = unsigned((s.B * s.Hkv * s.Lk + kV1Threads - 1) / kV1Threads);
  if (s.D == 64) {
    dsum_v1_kernel<64><<<q_blocks, kV1Threads>>>(a);
    dq_v1_kernel<64><<<q_blocks, kV1Threads>>>(a);
    dkdv_v1_kernel<64><<<k_blocks, kV1Threads>>>(a);
  } else if (s.D == 128) {
    dsum_v1_kernel<128><<<q_blocks, kV1Threads>>>(a);
    dq_v1_kernel<128><<<q_blocks, kV1Threads>>>(a);
    dkdv_v1_kernel<128><<<k_blocks, kV1Threads>>>(a);
  } else {
    throw dma::Error("v1: D = " + std::to_string(s.D) + " (v1 is built for D = 64 and 128)");
  }
  LAB_CUDA_CHECK(cudaGetLastError());
}

// ==== v2: the mma.sync kernels ===============================================================
// dma::cuda::attention_backward with DMA_CUDA_BACKWARD=sm80 (cuda/src/backward.cu): the
// production backward on GPUs other than Hopper. What it adds to v1:
//   - dq_kernel: query tiles of 128 rows (8 warps x 16), the tile's candidate list from the mask
//     phase, gathered K/V tiles with cp.async double buffering, S, dP and dQ on the tensor cores
//     (mma.sync m16n8k16), the mask in registers;
//   - dkdv_kernel: key-major over the alive slots of the candidate tables (docs/design.md §2.9): a
//     block owns 64 slots; while a key lives in a slot its K, V rows stay in shared memory and its
//     dK, dV (and ddelta) in registers, summed over every query tile and every query head of the
//     delta head that keep it, written once when the key leaves. Q and dO come in sub-tiles of 32
//     queries, double-buffered; S^T, dP^T, dV and dK on the tensor cores;
//   - no atomics anywhere: every output bitwise reproducible; Hd > Hkv sums per-delta-head
//     partials in head order.

void run_backward(const DeviceProblem& dp, const char* kernel) {
  setenv("DMA_CUDA_BACKWARD", kernel, 1);  // read by every attention_backward call
  dma::cuda::attention_backward(dp.c, dp.q.get(), dp.k.get(), dp.v.get(), dp.delta.get(),
                                dp.mask_state.get(), dp.o.get(), dp.lse.get(), dp.dout.get(),
                                dp.dq.get(), dp.dk.get(), dp.dv.get(), dp.ddelta.get(),
                                dp.workspace.get(), dp.workspace.size(), nullptr);
  LAB_CUDA_CHECK(cudaGetLastError());
}
void backward_v2(const DeviceProblem& dp) { run_backward(dp, "sm80"); }

// ==== v3: wgmma (sm_90a) =======================================================================
// DMA_CUDA_BACKWARD=sm90 (cuda/src/dq_sm90.cu, cuda/src/backward_sm90.cu), the production
// backward on Hopper. What it adds to v2:
//   - dq: forward_sm90.cu's block (two consumer warpgroups of 64 rows, a producer warpgroup
//     gathering the list's K/V blocks into four buffers); S = Q K^T and dP = dO V^T by wgmma
//     from swizzled shared memory, dQ += dS K by wgmma with dS from registers, running while
//     the next block's dS is computed;
//   - dk, dv, ddelta: one consumer warpgroup of 64 slots (the wgmma rows) and a producer
//     warpgroup, two blocks per SM (setmaxnreg 224 / 32); S^T = K Q^T, dP^T = V dO^T by wgmma
//     m64n64k16, dV += P^T dO and dK += dS^T Q with P^T, dS^T from registers; the producer
//     walks the query tiles, hands the slots' keys over as a record per tile where one lives,
//     and copies the steps (64 queries of one query head) that reach them into two buffers;
//     dV's product runs during the elementwise dS.
// H200: see MEASURED above.
void backward_v3(const DeviceProblem& dp) { run_backward(dp, "sm90"); }

// ==== the ladder =============================================================================

struct Version {
  const char* what;
  void (*run)(const DeviceProblem&);  // enqueues the backward on the legacy default stream
  bool needs_sm90 = false;            // runs only on a compute capability 9.0 GPU (else 77)
};
const Version kVersions[] = {
    {"a thread per query row (dq) and per key (dk, dv, ddelta), fp32 on CUDA cores", backward_v1},
    {"dq over the tile lists, dk dv ddelta by alive slots, mma.sync, no atomics", backward_v2},
    {"wgmma (sm_90a): dq as the Hopper forward's blocks, dk dv ddelta by slots, producer warpgroups",
     backward_v3, true},
};
constexpr int kNumVersions = int(sizeof(kVersions) / sizeof(kVersions[0]));

// ---- validation ------------------------------------------------------------------------------

bool validate_case(const Version& v, const lab::Case& cs, uint64_t seed) {
  std::printf("  %s: %s\n", cs.name, lab::shape_string(cs.s, cs.opt).c_str());
  const dma::Problem<float> p = dma::random_problem<float>(cs.s, cs.opt, seed, true);
  const DeviceProblem dp(p);
  dp.poison_outputs();
  v.run(dp);
  LAB_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> dq = dp.dq.download(), dk = dp.dk.download(), dv = dp.dv.download(),
                           ddelta = dp.ddelta.download(), delta = dp.delta.download();
  const std::vector<int32_t> evict = dp.download_evict();

  // The float64 reference on the same bf16 values, given the GPU's delta (so dv is attention's
  // only: no gradient through delta's formula).
  dma::Problem<double> ref;
  ref.shape = cs.s;
  ref.opt = cs.opt;
  ref.q = lab::widen(dma::round_to_precision(p.q, kPrecision));
  ref.k = lab::widen(dma::round_to_precision(p.k, kPrecision));
  ref.v = lab::widen(dma::round_to_precision(p.v, kPrecision));
  ref.dout = lab::widen(dma::round_to_precision(p.dout, kPrecision));
  ref.delta = lab::widen(delta);
  const dma::Result<double> r = dma::run_pipeline(ref, dma::Backend::cpu, {}, false);

  // The kernels ran on the GPU's mask state, the reference on its own: the gradients (and the
  // zero check below, which reads the reference's) compare the same mask only if they agree.
  const int64_t evict_diff = lab::report_evict(evict, r.evict, cs.s);

  // Keys no query keeps (by the reference's evict and the mask rule) get exactly zero gradients:
  // ddelta per delta head; dk and dv where no delta head of their kv head keeps them. (Not "where
  // the reference is 0": a kept key's ddelta can cancel to exactly 0 in float64, e.g. when p = 1.)
  const dma::Shape& s = cs.s;
  const int64_t D = s.D;
  int64_t unkept = 0, not_zero = 0;
  const int64_t q_lo = dma::query_position(s, cs.opt.causal, 0), q_hi = dma::query_position(s, cs.opt.causal, s.Lq - 1);
  auto kept_by_any = [&](int64_t b, int64_t hd, int64_t j) {
    return dma::rule::kept_positions<int64_t>(j, r.evict[size_t((b * s.Hd + hd) * s.Lk + j)], q_lo, q_hi) > 0;
  };
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t hk = 0; hk < s.Hkv; ++hk)
      for (int64_t j = 0; j < s.Lk; ++j) {
        bool any = false;
        for (int64_t hd = hk * (s.Hd / s.Hkv); hd < (hk + 1) * (s.Hd / s.Hkv); ++hd) {
          const bool kept = kept_by_any(b, hd, j);
          any = any || kept;
          if (!kept) not_zero += ddelta[size_t((b * s.Hd + hd) * s.Lk + j)] != 0.0f;
        }
        if (any) continue;
        ++unkept;
        const size_t row = size_t((b * s.Hkv + hk) * s.Lk + j) * size_t(D);
        for (int64_t d = 0; d < D; ++d) not_zero += dk[row + d] != 0.0f || dv[row + d] != 0.0f;
      }
  std::printf("    kv rows no query keeps: %lld; nonzero gradients there: %lld\n", (long long)unkept,
              (long long)not_zero);
  const bool ok_dq = lab::report("dq", dq, r.grads.dq, D, kRelL2Bar, 0);
  const bool ok_dk = lab::report("dk", dk, r.grads.dk, D, kRelL2Bar, 0);
  const bool ok_dv = lab::report("dv", dv, r.grads.dv, D, kRelL2Bar, 0);
  const bool ok_dd = lab::report("ddelta", ddelta, r.grads.ddelta, cs.s.Lk, kRelL2Bar, 0);
  const bool ok = evict_diff == 0 && not_zero == 0 && ok_dq && ok_dk && ok_dv && ok_dd;
  std::printf("    %s\n", ok ? "OK" : "MISMATCH");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const lab::Ladder<DeviceProblem, Version> ladder{
      "dma_bwd_lab",
      "Runs DMA backward kernel version N, validates it against the float64 reference and times "
      "it (cuda/dev/README.md).",
      "kernel version: 1 = a thread per row and per key, 2 = mma.sync, 3 = wgmma (Hopper)",
      kVersions, kNumVersions, /*flops_per_pair_dim=*/10, /*with_do=*/true, validate_case};
  return lab::run_ladder(argc, argv, ladder);
}
