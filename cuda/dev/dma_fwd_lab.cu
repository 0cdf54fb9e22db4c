// dma_fwd_lab: the DMA forward kernel, one rung of the ladder at a time (the model is llm.c's
// dev/cuda: every version of the kernel in one file, each validated and timed the same way).
//
//   dma_fwd_lab N [--L 4096 --w 512 --Hq 16 --Hkv 8 --Hd <Hkv> --D 128 --B 1 --reps 20
//                  --warmup 3 --non-causal --seed 1]
//
// runs forward kernel version N:
//   1. validates it on small problems against the float64 reference (docs/design.md §5): inputs
//      from dma::random_problem, rounded to bf16; delta and the mask state computed on the GPU with
//      the device API (dma/cuda_device.hpp); the reference dma::run_pipeline<double> given that
//      delta. o and lse are poisoned with NaN before the kernel runs and every element must have
//      been written; o and lse must be within relative L2 1e-2 of the reference;
//   2. times it on the problem of the flags (B = 1, Lq = Lk = L, causal unless --non-causal):
//      CUDA events around each run, the median of --reps runs after --warmup runs, printed as ms
//      and as TFLOP/s counted on the kept pairs: 4*D flops per kept (query, key) pair (2*D for
//      q.k, 2*D for p v), the count bench/dma_bench uses.
// Exit status: 0 pass, 1 a failed validation (or a CUDA error), 2 a bad argument, 77 no usable
// CUDA device (or version 3, the Hopper kernels, on another GPU).
//
// ==== MEASURED ON THE H200 ===================================================================
// From `scripts/gpu_run.sh device lab` (2026-12-01, NVIDIA H200, driver 580.159.04, commit
// 03e1c46; bench/results/device_api_03e1c46/lab_v*.log): median of 20 runs after 3 warm-ups.
//   problem: `dma_fwd_lab N --L 16384` = B=1, Lq=Lk=16384, w=512, Hq=16, Hkv=8, Hd=8, D=128,
//            causal, exp form, bf16 inputs, fp32 accumulation
//   version  what it adds                                          median ms, TFLOP/s (kept pairs)
//   v1       one thread per query row, fp32 on CUDA cores, bf16   18.96 ms, 3.6 TFLOP/s
//            loads from global memory
//   v2       production (cuda/src/forward.cu): gathered candidate  0.682 ms, 99 TFLOP/s (27.8x v1)
//            tiles, mma.sync tensor cores, cp.async double buffer;
//            the tile's candidates found by scanning evict
//   v2 now   the same kernel reading the candidate lists the      0.448 ms, 151 TFLOP/s (42x v1)
//            mask phase writes (cuda/src/candidates.cu): no scan  (2026-12-01, same command)
//   v3       wgmma (cuda/src/forward_sm90.cu), in the steps that built it (same command, commit
//            in brackets; "dense" = the same with --w 16384, 2.15e9 kept pairs):
//            - wgmma from swizzled shared memory, every     0.405 ms, 167 TFLOP/s; dense 4.22 ms
//              thread copying, one barrier per tile [0b88ea0]
//            - P_{c-1} V_{c-1} during the softmax of S_c,   0.362 ms, 187 TFLOP/s; dense 3.60 ms
//              three buffers [2e6d42d]
//            - a producer warpgroup (setmaxnreg) and        0.330 ms, 205 TFLOP/s; dense 2.98 ms
//              mbarriers, four buffers [6c0d07a] (one producer warp instead: 0.534 / 5.78 ms)
//            - ping-pong of the consumer warpgroups,        0.309 ms, 219 TFLOP/s; dense 2.62 ms
//              descriptors by addition [eb23e46]            (420 TFLOP/s)
//            - the rescale of O skipped where no row        0.290 ms, 233 TFLOP/s; dense 2.44 ms
//              maximum moved, Q in registers [94025f5;      (451 TFLOP/s; 0.307 and 2.64 ms
//              bench/results/qregs_spans/]                  before, in the same command)
//            - a fifth buffer [e49920d]                     (0.5-1% at w = 2048 and dense)
//            - the keys of the next blocks loaded ahead     dma_bench's forward at 16K/2048,
//              by the producer [ad8eaa8;                    D = 128: 0.744 -> 0.678 ms (not
//              bench/results/producer/]                     rerun in this lab)
//            - an implicit list's blocks copied as rows;    dma_bench, same shape: dense
//              each producer warp loads the keys it         2.54 -> 2.18 ms (506 TFLOP/s);
//              copies, no producer barrier [c97eaeb,        w = 2048 0.675 -> 0.606 ms (not
//              a06a009; bench/results/dense_producer/]      rerun in this lab)
//            D = 64 takes blocks of 128 keys: dense 1.52 ms (362 TFLOP/s; 1.89 ms with 64).
// The scanning form of v2 is in the git history (cuda/src/gather.cuh before the candidate
// tables); v2 runs whatever cuda/src/forward.cu is, v3 whatever cuda/src/forward_sm90.cu is.
// ==============================================================================================
//
// Layouts (docs/design.md §1): q, o (B,Hq,Lq,D); k, v (B,Hkv,Lk,D); delta, evict (B,Hd,Lk);
// lse (B,Hq,Lq). Query head hq reads kv head hq / (Hq/Hkv) and delta head hq / (Hq/Hd).
#include <cuda_bf16.h>

#include <cstdlib>

#include "lab.hpp"

namespace {

using bf16 = __nv_bfloat16;
using lab::DeviceArray;
using lab::kPrecision;
constexpr double kRelL2Bar = 1e-2;     // o and lse, relative L2 (docs/design.md §5)
constexpr double kWorstRowBar = 5e-2;  // the worst row of o: bf16 P in P V gives ~1e-2 at worst

// A problem on the device as every version finds it: q, k, v in bf16, delta and the mask state
// already built by the device API (the phases before the forward), o and lse to be written.
struct DeviceProblem {
  dma::cuda::Config c;
  DeviceArray<uint16_t> q, k, v;   // bf16 bits: (B,Hq,Lq,D), (B,Hkv,Lk,D), (B,Hkv,Lk,D)
  DeviceArray<float> delta;        // (B,Hd,Lk)
  DeviceArray<uint8_t> mask_state; // starts with evict (B,Hd,Lk) int32: e_j
  DeviceArray<float> o, lse;       // (B,Hq,Lq,D), (B,Hq,Lq)

  explicit DeviceProblem(const dma::Problem<float>& p)
      : c{p.shape, p.opt, kPrecision},
        q(lab::bf16_bits(p.q)),
        k(lab::bf16_bits(p.k)),
        v(lab::bf16_bits(p.v)),
        delta(static_cast<size_t>(p.shape.delta_numel())),
        mask_state(dma::cuda::mask_state_bytes(c)),
        o(static_cast<size_t>(p.shape.q_numel())),
        lse(static_cast<size_t>(p.shape.lse_numel())) {
    // delta = exp(a softplus(vflat . w_dt)) (Eq. 3), then the eviction positions (Eq. 4), as
    // production runs them; check_status waits and throws on a non-finite delta.
    const DeviceArray<float> w_dt(p.w_dt), a(p.a);
    const DeviceArray<uint8_t> workspace(dma::cuda::workspace_bytes(c));
    const DeviceArray<int64_t> status(1);
    dma::cuda::reset_status(status.get(), nullptr);
    dma::cuda::dynamic_weights(c, v.get(), w_dt.get(), a.get(), delta.get(), status.get(),
                               workspace.get(), workspace.size(), nullptr);
    dma::cuda::check_status(c, status.get(), nullptr);
    dma::cuda::build_mask(c, delta.get(), mask_state.get(), workspace.get(), workspace.size(),
                          nullptr);
    LAB_CUDA_CHECK(cudaDeviceSynchronize());
  }
  const int32_t* evict() const { return dma::cuda::evict_of(mask_state.get()); }
  std::vector<int32_t> download_evict() const {
    return lab::copy_to_host<int32_t>(evict(), static_cast<size_t>(c.shape.delta_numel()));
  }
  void poison_outputs() const {
    o.poison();
    lse.poison();
  }
  int64_t unwritten() const {  // outputs still holding the NaN poison
    return lab::count_nan(o.download()) + lab::count_nan(lse.download());
  }
};

// ==== v1: one thread per query row ============================================================
// The direct port of the tiled CPU code's gather mode (core/src/tiled.cpp, tutorial 07) with query
// tiles of one row. The candidates of a one-query tile at position p, {j <= p : e_j >= max(j, p)},
// are exactly the keys that query keeps (rule::is_kept), so each thread walks its prefix
// j = 0..p_i, skips the masked keys (exact: their p_ij is 0, docs/design.md §2.1) and runs the
// online softmax of FlashAttention (tutorial 07) over the kept ones, one key at a time.
//   - fp32 arithmetic on CUDA cores; q_i and the accumulator are 2*D floats per thread (for D=128
//     more than the 255 registers a thread may have: part of them lives in local memory).
//   - q, k, v are read as bf16 straight from global memory, one element at a time. Nothing is
//     staged in shared memory; but the 32 threads of a warp are 32 consecutive queries of one
//     head, which keep nearly the same keys (selections nest, docs/design.md §2.2), so their
//     loads of e_j, k_j and v_j mostly hit the same addresses and are served once per warp.
//   - cost: every thread reads e_j for all p_i + 1 keys of its prefix (one int per key, shared by
//     the warp), and does 4*D flops per kept pair, none of them on the tensor cores.
// H200, L=16384 w=512 Hq=16 Hkv=8 D=128: 18.96 ms, 3.6 TFLOP/s on the kept pairs

constexpr int kV1Threads = 128;  // threads (= query rows) per block

struct RowArgs {
  int B, Hq, Hkv, Hd, Lq, Lk;
  bool causal;
  float scale;              // softmax scale, 1/sqrt(D) unless given
  const bf16 *q, *k, *v;    // (B,Hq,Lq,D), (B,Hkv,Lk,D), (B,Hkv,Lk,D)
  const float* delta;       // (B,Hd,Lk)
  const int32_t* evict;     // (B,Hd,Lk): key j is kept by the positions j..e_j
  float *o, *lse;           // (B,Hq,Lq,D), (B,Hq,Lq)
};

template <int D>
__global__ void __launch_bounds__(kV1Threads) forward_v1_kernel(const RowArgs a) {
  // 1. The row this thread owns: row = (b*Hq + hq)*Lq + i, the flat index into lse.
  const int64_t row = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= int64_t(a.B) * a.Hq * a.Lq) return;
  const int i = int(row % a.Lq), hq = int(row / a.Lq % a.Hq), b = int(row / a.Lq / a.Hq);
  const int hk = hq / (a.Hq / a.Hkv), hd = hq / (a.Hq / a.Hd);  // its kv head and delta head
  const int p_i = dma::rule::query_position(a.Lq, a.Lk, a.causal, i);
  const bf16* q_bhi = a.q + row * D;
  const bf16* k_bh = a.k + (int64_t(b) * a.Hkv + hk) * a.Lk * D;
  const bf16* v_bh = a.v + (int64_t(b) * a.Hkv + hk) * a.Lk * D;
  const float* delta_bh = a.delta + (int64_t(b) * a.Hd + hd) * a.Lk;
  const int32_t* evict_bh = a.evict + (int64_t(b) * a.Hd + hd) * a.Lk;

  float q_i[D];  // q_i in fp32, read once
  #pragma unroll
  for (int d = 0; d < D; ++d) q_i[d] = __bfloat162float(q_bhi[d]);

  // 2. One pass over the prefix with the online softmax: m = running max of s_ij, l = running
  //    sum of exp(s_ij - m), acc = running sum of exp(s_ij - m) v_j. A new maximum rescales the
  //    old sums by alpha = exp(m_old - m_new).
  float m = -INFINITY, l = 0.0f, acc[D];
  #pragma unroll
  for (int d = 0; d < D; ++d) acc[d] = 0.0f;
  for (int j = 0; j <= p_i; ++j) {  // keys after p_i are not allowed (causal: j <= p_i)
    // Masked (e_j < p_i: evicted before p_i): contributes exactly nothing, so skip it.
    if (!dma::rule::is_kept(j, p_i, evict_bh[j])) continue;
    const bf16* k_bhj = k_bh + int64_t(j) * D;
    float qk = 0.0f;
    #pragma unroll
    for (int d = 0; d < D; ++d) qk += q_i[d] * __bfloat162float(k_bhj[d]);
    const float s_ij = a.scale * qk + delta_bh[j];  // Eq. 5: the logit plus the key's weight
    const float m_new = fmaxf(m, s_ij);
    // Before the first kept key m = -inf: alpha = exp(-inf) = 0 (s_ij is finite, so no NaN).
    const float alpha = expf(m - m_new), p_ij = expf(s_ij - m_new);
    l = alpha * l + p_ij;
    const bf16* v_bhj = v_bh + int64_t(j) * D;
    #pragma unroll
    for (int d = 0; d < D; ++d) acc[d] = alpha * acc[d] + p_ij * __bfloat162float(v_bhj[d]);
    m = m_new;
  }

  // 3. o_i = acc / l and lse_i = m + log l (natural log). Every query keeps at least one key
  //    (docs/design.md §1.6), so l > 0.
  float* o_bhi = a.o + row * D;
  #pragma unroll
  for (int d = 0; d < D; ++d) o_bhi[d] = acc[d] / l;
  a.lse[row] = m + logf(l);
}

void forward_v1(const DeviceProblem& dp) {
  const dma::Shape& s = dp.c.shape;
  const RowArgs a{int(s.B), int(s.Hq), int(s.Hkv), int(s.Hd), int(s.Lq), int(s.Lk),
                  dp.c.opt.causal, float(dp.c.opt.softmax_scale(s)),
                  reinterpret_cast<const bf16*>(dp.q.get()),
                  reinterpret_cast<const bf16*>(dp.k.get()),
                  reinterpret_cast<const bf16*>(dp.v.get()), dp.delta.get(), dp.evict(),
                  dp.o.get(), dp.lse.get()};
  const int64_t rows = s.B * s.Hq * s.Lq;
  const unsigned blocks = unsigned((rows + kV1Threads - 1) / kV1Threads);
  if (s.D == 64)
    forward_v1_kernel<64><<<blocks, kV1Threads>>>(a);
  else if (s.D == 128)
    forward_v1_kernel<128><<<blocks, kV1Threads>>>(a);
  else
    throw dma::Error("v1: D = " + std::to_string(s.D) + " (v1 is built for D = 64 and 128)");
  LAB_CUDA_CHECK(cudaGetLastError());
}

// ==== v2: the mma.sync kernel ================================================================
// dma::cuda::attention_forward with DMA_CUDA_FORWARD=sm80 (cuda/src/forward.cu,
// cuda/src/tables.cuh): the production kernel on GPUs other than Hopper. What it adds to v1:
//   - query tiles: one block of 8 warps = 128 queries of one (b, hq), 16 rows per warp;
//   - the tile's candidate keys {j <= p_last : e_j >= max(j, p_first)}, at most w + Bq - 1 of
//     them (docs/design.md §2.4), read from the list the mask phase wrote (§2.8), the keys every
//     query keeps first; the rows of K and V gathered 64 at a time;
//   - cp.async double buffering: the next gathered tile is copied while this one is computed;
//   - S = Q K^T and O += P V on the tensor cores (mma.sync m16n8k16, bf16 in, fp32 accumulate),
//     Q in registers, ldmatrix from padded shared rows;
//   - the mask j <= p_i <= e_j in registers; the head of the list, and tiles kept whole for a
//     warp's 16 rows, skip the test;
//   - the online softmax in base 2 (exp2 on the special-function unit), one rescale per tile.
// H200, L=16384 w=512 Hq=16 Hkv=8 D=128: 0.448 ms, 151 TFLOP/s on the kept pairs (42x v1;
// 0.682 ms while it scanned evict)

void run_forward(const DeviceProblem& dp, const char* kernel) {
  setenv("DMA_CUDA_FORWARD", kernel, 1);  // read by every attention_forward call
  dma::cuda::attention_forward(dp.c, dp.q.get(), dp.k.get(), dp.v.get(), dp.delta.get(),
                               dp.mask_state.get(), dp.o.get(), dp.lse.get(), nullptr);
  LAB_CUDA_CHECK(cudaGetLastError());
}
void forward_v2(const DeviceProblem& dp) { run_forward(dp, "sm80"); }

// ==== v3: wgmma (sm_90a) =======================================================================
// DMA_CUDA_FORWARD=sm90 (cuda/src/forward_sm90.cu, cuda/src/sm90.cuh), the production kernel on
// Hopper. What it adds to v2:
//   - two warpgroups of 64 rows; S = Q K^T by wgmma m64n64k16 with Q and K read by descriptor
//     from shared memory, O += P V by wgmma m64nDk16 with P from registers;
//   - Q, K and V in the 128-byte swizzled layout (chunk c of row r at c ^ (r % 8)) instead of
//     padded rows, fenced for the tensor cores (fence.proxy.async) after the cp.async copies.
//   - a producer warpgroup gathers the tiles and hands them over by mbarrier, its registers
//     given to the two consumer warpgroups (setmaxnreg); the consumers take turns (ping-pong)
//     and overlap P_{c-1} V_{c-1} with the softmax of S_c.
// H200: see MEASURED above.
void forward_v3(const DeviceProblem& dp) { run_forward(dp, "sm90"); }

// ==== the ladder =============================================================================

struct Version {
  const char* what;
  void (*run)(const DeviceProblem&);  // enqueues the forward on the legacy default stream
  bool needs_sm90 = false;            // runs only on a compute capability 9.0 GPU (else 77)
};
const Version kVersions[] = {
    {"one thread per query row, fp32 on CUDA cores, bf16 loads from global memory", forward_v1},
    {"candidate lists, gathered tiles, mma.sync, cp.async double buffering", forward_v2},
    {"wgmma (sm_90a) from 128-byte swizzled shared memory, P from registers", forward_v3, true},
};
constexpr int kNumVersions = int(sizeof(kVersions) / sizeof(kVersions[0]));

// ---- validation ------------------------------------------------------------------------------

bool validate_case(const Version& v, const lab::Case& cs, uint64_t seed) {
  std::printf("  %s: %s\n", cs.name, lab::shape_string(cs.s, cs.opt).c_str());
  const dma::Problem<float> p = dma::random_problem<float>(cs.s, cs.opt, seed, false);
  const DeviceProblem dp(p);
  dp.poison_outputs();
  v.run(dp);
  LAB_CUDA_CHECK(cudaDeviceSynchronize());
  const std::vector<float> o = dp.o.download(), lse = dp.lse.download(), delta = dp.delta.download();
  const std::vector<int32_t> evict = dp.download_evict();

  // The float64 reference on the same bf16 values, given the GPU's delta (docs/design.md §5:
  // near a tie a different delta may rightly select differently).
  dma::Problem<double> ref;
  ref.shape = cs.s;
  ref.opt = cs.opt;
  ref.q = lab::widen(dma::round_to_precision(p.q, kPrecision));
  ref.k = lab::widen(dma::round_to_precision(p.k, kPrecision));
  ref.v = lab::widen(dma::round_to_precision(p.v, kPrecision));
  ref.delta = lab::widen(delta);
  const dma::Result<double> r = dma::run_pipeline(ref, dma::Backend::cpu, {}, false);

  const int64_t evict_diff = lab::report_evict(evict, r.evict, cs.s);
  const bool ok_o = lab::report("o", o, r.fwd.o, cs.s.D, kRelL2Bar, kWorstRowBar);
  const bool ok_lse = lab::report("lse", lse, r.fwd.lse, cs.s.Lq, kRelL2Bar, kRelL2Bar);
  const bool ok = evict_diff == 0 && ok_o && ok_lse;
  std::printf("    %s\n", ok ? "OK" : "MISMATCH");
  return ok;
}

}  // namespace

int main(int argc, char** argv) {
  const lab::Ladder<DeviceProblem, Version> ladder{
      "dma_fwd_lab",
      "Runs DMA forward kernel version N, validates it against the float64 reference and times "
      "it (cuda/dev/README.md).",
      "kernel version: 1 = one thread per query row, 2 = mma.sync, 3 = wgmma (Hopper)",
      kVersions, kNumVersions, /*flops_per_pair_dim=*/4, /*with_do=*/false, validate_case};
  return lab::run_ladder(argc, argv, ladder);
}
