// Step 8 - The CUDA kernel
//
// What this proves: the GPU pipeline computes the same DMA as the reference (paper Eqs. 3, 4, 5
// and 7-10), in bf16 with fp32 accumulation, and how fast. Without a GPU (or built without CUDA)
// it prints the kernel's plan for the example problem - the tiles, the gathered keys, the tensor
// core work - and exits 77, which ctest reports as skipped.
//
// What the GPU does, phase by phase (everything from steps 2-7, made parallel):
//   1. delta   one thread per (b, key, delta head): z = vflat . w_dt, delta = exp(a softplus(z)),
//              in fp32 (step 2).
//   2. mask    the eviction positions e_j (step 3) without the sequential heap: each key counts
//              the keys ranked above it, in order of position, until w, using chunks of keys
//              sorted by (delta, index) packed into one 64-bit number. No Lq x Lk mask exists.
//   3. forward one thread block per query tile of Bq = 128 queries (8 warps x 16 rows) of one
//              (b, query head). The block scans e_j and compacts its candidate keys
//              {j <= p_last : e_j >= max(j, p_first)} - at most w + Bq of them - into shared
//              memory, Bk = 64 at a time, and gathers those rows of K and V into shared memory
//              (step 7's "gather"). Then FlashAttention-2 tile math on them:
//                  S = Q K^T               tensor cores, mma.sync m16n8k16, bf16 in, fp32 acc
//                  S += delta; -inf where not (j <= p_i <= e_j)      (in registers, step 6)
//                  online softmax m, l, O += P V                     (step 7, base-2 exp)
//   4. backward the same tiles in reverse: P recomputed from lse, dS = P (dP - D_i), dQ in
//              registers, dK dV ddelta scattered to the gathered keys with atomics; then the
//              gradient through delta goes to w_dt, a and v (step 5).
//
// Checked here, on bf16-rounded inputs against the float64 CPU pipeline (DESIGN.md §5):
//   delta (fp32 vs float64), the selection (identical e_j given the GPU's delta), o and lse
//   (relative L2 <= 1e-2), dq dk dv ddelta (<= 2e-2), and keys that no query keeps get exactly
//   zero dk and dv. Then timings on a larger problem.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "dma/pipeline.hpp"
#ifdef DMA_TUTORIAL_HAVE_CUDA
#include "dma/cuda.hpp"
#endif

namespace {

struct Rng {  // splitmix64: deterministic inputs
  uint64_t state;
  float uniform() {  // in [-1, 1)
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return static_cast<float>(static_cast<double>(z >> 11) * 0x1.0p-52 - 1.0);
  }
};

const int kBq = 128, kBk = 64;  // the kernel's tile sizes (8 warps by default, cuda/src/gather.cuh)

dma::Problem<float> make_problem(int64_t Hq, int64_t Hkv, int64_t L, int64_t D, int64_t w,
                                 uint64_t seed) {
  dma::Problem<float> p;
  p.shape = dma::Shape{1, Hq, Hkv, Hkv, L, L, D};  // B, Hq, Hkv, Hd, Lq, Lk, D
  p.opt.window = w;
  p.opt.form = dma::Form::exp;
  Rng rng{seed};
  auto fill = [&](std::vector<float>& t, int64_t n, float amp) {
    t.resize(static_cast<size_t>(n));
    for (float& x : t) x = amp * rng.uniform();
  };
  fill(p.q, p.shape.q_numel(), 1.0f);
  fill(p.k, p.shape.kv_numel(), 1.0f);
  fill(p.v, p.shape.kv_numel(), 1.0f);
  fill(p.w_dt, p.shape.w_dt_numel(), 1.0f / std::sqrt(static_cast<float>(Hkv * D)));
  fill(p.a, p.shape.Hd, 0.5f);
  fill(p.dout, p.shape.q_numel(), 1.0f);
  return p;
}

// Candidate keys of every query tile of one (b, delta head), from the eviction positions.
std::vector<int64_t> candidates_per_tile(const dma::Shape& s, const int64_t* evict_bh) {
  std::vector<int64_t> n;
  for (int64_t i0 = 0; i0 < s.Lq; i0 += kBq) {
    const int64_t p_first = i0 + (s.Lk - s.Lq), p_last = std::min(i0 + kBq, s.Lq) - 1 + (s.Lk - s.Lq);
    int64_t c = 0;
    for (int64_t j = 0; j <= p_last; j++) c += evict_bh[j] >= std::max(j, p_first);
    n.push_back(c);
  }
  return n;
}

// The phases of the GPU pipeline, in words (the same as the comment at the top of this file).
void print_phases() {
  std::printf(
      "What the GPU pipeline does:\n"
      "  1. delta:    one thread per (key, delta head): z = vflat . w_dt, delta = exp(a softplus(z))"
      ", fp32\n"
      "  2. mask:     e_j per key, in parallel: count the keys ranked above j in order of position\n"
      "               (chunks sorted by the 64-bit key (delta, index)); no Lq x Lk mask anywhere\n"
      "  3. forward:  one block per (query tile of %d, query head): compact the candidate keys\n"
      "               {j <= p_last : e_j >= max(j, p_first)} into shared memory, gather %d rows of\n"
      "               K and V at a time, S = Q K^T on tensor cores (mma.sync m16n8k16, bf16 in,\n"
      "               fp32 accumulate), add delta, -inf where not j <= p_i <= e_j (registers),\n"
      "               online softmax, O += P V\n"
      "  4. backward: the same gathered tiles; P from lse, dS = P (dP - D_i), dQ in registers,\n"
      "               dK dV ddelta added to the gathered keys atomically; then dw_dt, da, dv via "
      "delta\n\n",
      kBq, kBk);
}

// Work of the forward tile math: 2 matmuls (S = Q K^T, O += P V) of 2 flops per multiply-add.
struct Plan {
  double gathered_flops = 0, dense_flops = 0;
};

// Prints what the forward kernel does on problem p (delta and evict computed on the CPU).
Plan print_plan(const dma::Problem<float>& p, const std::vector<int64_t>& evict) {
  const dma::Shape& s = p.shape;
  const int64_t tiles = (s.Lq + kBq - 1) / kBq;
  Plan plan;
  std::printf("The forward kernel on B=%lld, Hq=%lld, Hkv=Hd=%lld, L=%lld, D=%lld, w=%lld:\n",
              (long long)s.B, (long long)s.Hq, (long long)s.Hkv, (long long)s.Lk, (long long)s.D,
              (long long)p.opt.window);
  std::printf("  grid: %lld query tiles x %lld query heads = %lld blocks of 256 threads\n",
              (long long)tiles, (long long)s.Hq, (long long)(tiles * s.Hq));
  std::printf("  shared memory per block: Q tile + double-buffered K and V tiles of %d gathered "
              "rows, bf16, rows padded to D+8: %lld bytes (+ a ring of candidate indices)\n",
              kBk, (long long)(2 * (kBq + 4 * kBk) * (s.D + 8)));
  for (int64_t hd = 0; hd < s.Hd; hd++) {
    const std::vector<int64_t> cand = candidates_per_tile(s, &evict[hd * s.Lk]);
    int64_t most = 0, chunks = 0, dense_tiles = 0;
    double sum = 0;
    for (size_t t = 0; t < cand.size(); t++) {
      most = std::max(most, cand[t]);
      sum += static_cast<double>(cand[t]);
      chunks += (cand[t] + kBk - 1) / kBk;
      const int64_t p_last = std::min<int64_t>((t + 1) * kBq, s.Lq) - 1 + (s.Lk - s.Lq);
      dense_tiles += p_last / kBk + 1;
      // per query head of this delta head (Hq / Hd of them)
      plan.gathered_flops += 4.0 * kBq * static_cast<double>(((cand[t] + kBk - 1) / kBk) * kBk) *
                             static_cast<double>(s.D) * static_cast<double>(s.Hq / s.Hd);
      plan.dense_flops += 4.0 * kBq * static_cast<double>((p_last / kBk + 1) * kBk) *
                          static_cast<double>(s.D) * static_cast<double>(s.Hq / s.Hd);
    }
    if (hd == 0) {  // one query tile as an example
      const int64_t t = static_cast<int64_t>(cand.size()) / 2, i0 = t * kBq;
      const int64_t p_first = i0 + (s.Lk - s.Lq), p_last = p_first + kBq - 1;
      std::vector<int64_t> keys;
      for (int64_t j = 0; j <= p_last; j++)
        if (evict[hd * s.Lk + j] >= std::max(j, p_first)) keys.push_back(j);
      std::printf("  query tile %lld (positions %lld..%lld) gathers %zu keys:", (long long)t,
                  (long long)p_first, (long long)p_last, keys.size());
      for (size_t n = 0; n < keys.size(); n++)
        if (n < 8 || n + 4 >= keys.size()) std::printf(" %lld", (long long)keys[n]);
        else if (n == 8) std::printf(" ...");
      std::printf("\n    spread over the whole prefix (random delta): %zu gathered tiles of %d "
                  "keys instead of %lld causal tiles\n", (keys.size() + kBk - 1) / kBk, kBk,
                  (long long)(p_last / kBk + 1));
    }
    if (hd < 2)
      std::printf("  delta head %lld: candidate keys per query tile: mean %.0f, max %lld (bound "
                  "w + Bq = %lld)\n    -> %lld gathered %dx%d tiles instead of %lld causal tiles "
                  "per query head\n", (long long)hd, sum / static_cast<double>(cand.size()),
                  (long long)most, (long long)(p.opt.window + kBq), (long long)chunks, kBq, kBk,
                  (long long)dense_tiles);
  }
  const double mma_per_tile = 2.0 * (kBq / 16) * (kBk / 8) * (static_cast<double>(s.D) / 16);
  std::printf("  each %dx%d tile: %.0f mma.sync m16n8k16 (S = Q K^T and O += P V)\n", kBq, kBk,
              mma_per_tile);
  std::printf("  forward tensor-core work: %.2f GFLOP gathered vs %.2f GFLOP causal-dense (%.2f)\n",
              plan.gathered_flops * 1e-9, plan.dense_flops * 1e-9,
              plan.gathered_flops / plan.dense_flops);
  return plan;
}

#ifdef DMA_TUTORIAL_HAVE_CUDA

float round_bf16(float x) {  // round to nearest even, as the GPU does when it converts
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  u &= 0xFFFF0000u;
  std::memcpy(&x, &u, 4);
  return x;
}

template <typename A, typename B>
double rel_l2(const std::vector<A>& got, const std::vector<B>& ref) {
  double num = 0, den = 0;
  for (size_t e = 0; e < ref.size(); e++) {
    const double d = static_cast<double>(got[e]) - static_cast<double>(ref[e]);
    num += d * d;
    den += static_cast<double>(ref[e]) * static_cast<double>(ref[e]);
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

std::vector<double> to_double(const std::vector<float>& x) { return {x.begin(), x.end()}; }

bool check_against_reference() {
  dma::Problem<float> p = make_problem(4, 2, 2048, 128, 256, 8);
  for (auto* t : {&p.q, &p.k, &p.v, &p.dout})
    for (float& x : *t) x = round_bf16(x);
  const dma::Shape& s = p.shape;
  bool ok = true;

  // Pass 1: the whole pipeline on the GPU (inputs given as bf16-exact floats).
  const dma::Result<float> gpu = dma::cuda::run_pipeline(p);

  // Pass 2: delta in fp32 vs float64, and the selection given the GPU's delta.
  const std::vector<double> delta64 =
      dma::dynamic_weights(s, p.opt.form, to_double(p.v), to_double(p.w_dt), to_double(p.a));
  const double e_delta = rel_l2(gpu.delta, delta64);
  const bool same_evict = dma::evict_positions(s, p.opt.window, gpu.delta) == gpu.evict;
  std::printf("  delta: rel L2 vs float64 %.1e;  e_j identical to the CPU's on the GPU's delta: %s\n",
              e_delta, same_evict ? "yes" : "NO");
  ok = ok && e_delta < 1e-5 && same_evict;

  // Pass 3: attention and its gradients, both sides on the GPU's delta (so the same selection;
  // then dv is the attention part only). CPU: float64, tiled gather mode.
  dma::Problem<float> p_given = p;
  p_given.delta = gpu.delta;
  const dma::Result<float> g2 = dma::cuda::run_pipeline(p_given);
  dma::Problem<double> cpu_p;
  cpu_p.shape = s;
  cpu_p.opt = p.opt;
  cpu_p.q = to_double(p.q);
  cpu_p.k = to_double(p.k);
  cpu_p.v = to_double(p.v);
  cpu_p.delta = to_double(gpu.delta);
  cpu_p.dout = to_double(p.dout);
  const auto t0 = std::chrono::steady_clock::now();
  const dma::Result<double> cpu = dma::run_pipeline(cpu_p, dma::Backend::tiled, {}, false);
  const double cpu_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  struct Cmp {
    const char* name;
    double err, bound;
  } cmps[] = {{"o", rel_l2(g2.fwd.o, cpu.fwd.o), 1e-2},
              {"lse", rel_l2(g2.fwd.lse, cpu.fwd.lse), 1e-2},
              {"dq", rel_l2(g2.grads.dq, cpu.grads.dq), 2e-2},
              {"dk", rel_l2(g2.grads.dk, cpu.grads.dk), 2e-2},
              {"dv", rel_l2(g2.grads.dv, cpu.grads.dv), 2e-2},
              {"ddelta", rel_l2(g2.grads.ddelta, cpu.grads.ddelta), 2e-2}};
  std::printf("  relative L2 vs float64:");
  for (const Cmp& c : cmps) {
    std::printf(" %s %.1e", c.name, c.err);
    ok = ok && c.err <= c.bound;
  }
  std::printf("\n");

  // Keys no query keeps (e_j < j) get exactly zero dk and dv (here Hd = Hkv: one delta head per
  // kv head). Step 6 says why: their p, hence ds, is exactly 0.
  int64_t never_kept = 0, nonzero = 0;
  for (int64_t hk = 0; hk < s.Hkv; hk++)
    for (int64_t j = 0; j < s.Lk; j++) {
      if (g2.evict[hk * s.Lk + j] >= j) continue;
      never_kept++;
      for (int64_t d = 0; d < s.D; d++) {
        const int64_t x = (hk * s.Lk + j) * s.D + d;
        nonzero += g2.grads.dk[x] != 0.0f || g2.grads.dv[x] != 0.0f;
      }
    }
  std::printf("  %lld keys are kept by no query; non-zero dk/dv entries among them: %lld\n",
              (long long)never_kept, (long long)nonzero);
  ok = ok && nonzero == 0;
  std::printf("  time: GPU %.2f ms (delta %.3f, mask %.3f, forward %.3f, backward %.3f); "
              "CPU float64 tiled %.0f ms\n", gpu.times.total(), gpu.times.delta, gpu.times.mask,
              gpu.times.forward, gpu.times.backward, cpu_ms);
  return ok;
}

void time_large_problem() {
  dma::Problem<float> p = make_problem(16, 4, 16384, 128, 2048, 9);
  dma::cuda::run_pipeline(p);  // warm-up: context, allocations, first launches
  dma::Result<float> best = dma::cuda::run_pipeline(p);
  for (int r = 0; r < 2; r++) {
    dma::Result<float> res = dma::cuda::run_pipeline(p);
    if (res.times.total() < best.times.total()) best = std::move(res);
  }
  std::printf("\n");
  const Plan plan = print_plan(p, best.evict);
  const double f_ms = best.times.forward, b_ms = best.times.backward;
  std::printf("  measured (best of 3, GPU events): delta %.3f ms, mask %.3f ms, forward %.3f ms, "
              "backward %.3f ms\n", best.times.delta, best.times.mask, f_ms, b_ms);
  std::printf("  forward: %.0f TFLOP/s on the gathered tiles; %.0f TFLOP/s causal-dense "
              "equivalent (what a dense kernel would need to match it)\n",
              plan.gathered_flops / (f_ms * 1e-3) * 1e-12, plan.dense_flops / (f_ms * 1e-3) * 1e-12);
}

#endif  // DMA_TUTORIAL_HAVE_CUDA

}  // namespace

int main() {
  std::printf("Step 8: the CUDA kernel\n\n");
  // The plan on the example the check uses: delta and e_j computed on the CPU.
  print_phases();
  const dma::Problem<float> p = make_problem(4, 2, 2048, 128, 256, 8);
  const std::vector<float> delta = dma::dynamic_weights(p.shape, p.opt.form, p.v, p.w_dt, p.a);
  print_plan(p, dma::evict_positions(p.shape, p.opt.window, delta));

#ifndef DMA_TUTORIAL_HAVE_CUDA
  std::printf("\nThis build has no CUDA (dma_cuda was not built): nothing to run. SKIPPED\n");
  return 77;
#else
  std::string why;
  if (!dma::cuda::device_available(&why)) {
    std::printf("\nNo usable GPU (%s): nothing to run. SKIPPED\n", why.c_str());
    return 77;
  }
  bool ok = false;
  try {
    std::printf("\nOn the GPU, bf16 inputs, against the float64 CPU pipeline:\n");
    ok = check_against_reference();
    time_large_problem();
  } catch (const dma::Error& e) {
    std::printf("dma::Error: %s\n", e.what());
    ok = false;
  }
  std::printf("\n%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
#endif
}
