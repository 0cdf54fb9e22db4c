// Step 8 - The CUDA kernel
//
// What this proves: the GPU pipeline computes the same DMA as the reference (paper Eqs. 3, 4, 5
// and 7-10), in bf16 with fp32 accumulation, and how fast; and how a GPU forward kernel for it is
// built, starting from the plainest one that can be written.
//
// The kernel ladder. cuda/dev/dma_fwd_lab.cu holds the forward kernel as a ladder of versions
// (the model is llm.c's dev/cuda), each validated against the float64 reference and timed by one
// program (cuda/dev/README.md; <build> is your CMake build folder):
//     <build>/cuda/dev/dma_fwd_lab 1   v1, the naive port: one thread per query row, fp32 on CUDA
//                                      cores, q k v read from global memory (Part 1 below)
//     <build>/cuda/dev/dma_fwd_lab 2   v2, the production kernel (Part 2): what it adds to v1 is
//                                      query tiles of 128, the tile's candidate keys gathered
//                                      into shared memory, tensor cores (mma.sync), cp.async
//                                      double buffering
//
// Part 1 walks through v1's code. It runs on the CPU, line for line as the kernel is written (this
// tutorial includes no code of cuda/dev; it repeats v1 here to explain it):
//   - one thread per query row: on the GPU, thread t of block n owns row = 128 n + t, where
//     row = (b*Hq + hq)*Lq + i numbers the (batch, query head, query) rows of q, o and lse; here
//     the grid is a loop over rows and v1_thread() is the kernel's body;
//   - the candidate loop: the thread walks j = 0..p_i and asks dma::rule::is_kept(j, p_i, e_j)
//     (core/include/dma/mask_rule.hpp, the rule written once for host and device). A query tile of
//     one row has as candidates exactly the keys its query keeps, so this is the gather mode of
//     step 7 with Bq = 1. A masked key is skipped: its p_ij is exactly 0 (step 6);
//   - the online softmax of step 7 with tiles of one key: m, l and the accumulator live in the
//     thread's registers, a new maximum rescales them by alpha = exp(m_old - m_new);
//   - o_i = acc / l and lse_i = m + log l at the end.
// It checks v1's result against the float64 reference and shows why even v1's memory traffic is
// modest: the 32 threads of a warp (32 consecutive queries) keep nearly the same keys, because
// selections nest (docs/design.md §2.2).
//
// Part 2 is v2's plan for an example problem: the tiles, the gathered keys, the tensor core work.
// What the GPU pipeline does, phase by phase (everything from steps 2-7, made parallel):
//   1. delta   one thread per (b, key, delta head): z = vflat . w_dt, delta = exp(a softplus(z)),
//              in fp32 (step 2).
//   2. mask    the eviction positions e_j (step 3) without the sequential heap: each key counts
//              the keys ranked above it, in order of position, until w, using chunks of keys
//              sorted by (delta, index) packed into one 64-bit number. No Lq x Lk mask exists.
//   3. forward one thread block per query tile of Bq = 128 queries (8 warps x 16 rows) of one
//              (b, query head). The block scans e_j and compacts its candidate keys
//              {j <= p_last : e_j >= max(j, p_first)} (dma::rule::is_candidate) - at most w + Bq
//              of them (docs/design.md §2.4) - into shared memory, Bk = 64 at a time, and gathers
//              those rows of K and V into shared memory (step 7's "gather"). Then FlashAttention-2
//              tile math on them:
//                  S = Q K^T               tensor cores, mma.sync m16n8k16, bf16 in, fp32 acc
//                  S += delta; -inf where not (j <= p_i <= e_j)      (in registers, step 6)
//                  online softmax m, l, O += P V                     (step 7, base-2 exp)
//   4. backward the same tiles in reverse: P recomputed from lse, dS = P (dP - D_i), dQ in
//              registers, dK dV ddelta scattered to the gathered keys with atomics; then the
//              gradient through delta goes to w_dt, a and v (step 5).
//
// Part 3 (with a GPU) checks, on bf16-rounded inputs against the float64 CPU pipeline
// (docs/design.md §5): delta (fp32 vs float64), the selection (identical e_j given the GPU's
// delta), o and lse (relative L2 <= 1e-2), dq dk dv ddelta (<= 2e-2), and keys that no query keeps
// get exactly zero dk and dv. Then timings on a larger problem. Without a GPU (or built without
// CUDA) Parts 1 and 2 run and the program exits 77, which ctest reports as skipped.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "dma/mask_rule.hpp"
#include "dma/numerics.hpp"
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

const int kBq = 128, kBk = 64;  // v2's tile sizes (cuda/src/tables.cuh, kernels.hpp)
const int kV1Threads = 128;     // v1's threads (= query rows) per block
const int kWarp = 32;

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

std::vector<double> to_double(const std::vector<float>& x) { return {x.begin(), x.end()}; }

// The float64 reference's problem: p's values (and do, if any) in float64, with `delta` given, so
// both sides select the same keys (docs/design.md §5).
dma::Problem<double> reference_problem(const dma::Problem<float>& p, const std::vector<float>& delta) {
  dma::Problem<double> ref;
  ref.shape = p.shape;
  ref.opt = p.opt;
  ref.q = to_double(p.q);
  ref.k = to_double(p.k);
  ref.v = to_double(p.v);
  ref.delta = to_double(delta);
  ref.dout = to_double(p.dout);
  return ref;
}

// ---------------------------------------------------------------------------------------------
// Part 1: v1, one thread per query row.

// What the v1 kernel receives (cuda/dev/dma_fwd_lab.cu passes the same as device pointers).
struct RowArgs {
  dma::Shape s;
  bool causal;
  float scale;                      // softmax scale 1/sqrt(D)
  const std::vector<float>& q;      // (B,Hq,Lq,D), bf16 values
  const std::vector<float>& k;      // (B,Hkv,Lk,D), bf16 values
  const std::vector<float>& v;      // (B,Hkv,Lk,D), bf16 values
  const std::vector<float>& delta;  // (B,Hd,Lk)
  const std::vector<int64_t>& evict;  // (B,Hd,Lk): key j is kept by the positions j..e_j
  std::vector<float>& o;            // (B,Hq,Lq,D)
  std::vector<float>& lse;          // (B,Hq,Lq)
};

// What one thread saw, for printing (the kernel keeps none of this).
struct Trace {
  int64_t b = 0, hq = 0, i = 0, hk = 0, hd = 0, p_i = 0;
  int64_t looked_at = 0;  // keys of the prefix 0..p_i the candidate loop tested
  struct Step {
    int64_t j, e_j;
    float s_ij, m, alpha, l;
  };
  std::vector<Step> kept;  // every kept key, in order
};

// The body of the v1 kernel: the work of the thread that owns `row`.
void v1_thread(const RowArgs& a, int64_t row, Trace* trace) {
  const dma::Shape& s = a.s;
  const int64_t D = s.D;
  // 1. Which row: row = (b*Hq + hq)*Lq + i. Its kv head and delta head (GQA), and where query i
  //    sits among the keys (causal: aligned bottom-right).
  const int64_t i = row % s.Lq, hq = row / s.Lq % s.Hq, b = row / s.Lq / s.Hq;
  const int64_t hk = hq / (s.Hq / s.Hkv), hd = hq / (s.Hq / s.Hd);
  const int64_t p_i = dma::rule::query_position(s.Lq, s.Lk, a.causal, i);
  const float* q_bhi = &a.q[row * D];
  const float* k_bh = &a.k[(b * s.Hkv + hk) * s.Lk * D];
  const float* v_bh = &a.v[(b * s.Hkv + hk) * s.Lk * D];
  const float* delta_bh = &a.delta[(b * s.Hd + hd) * s.Lk];
  const int64_t* evict_bh = &a.evict[(b * s.Hd + hd) * s.Lk];
  if (trace) *trace = Trace{b, hq, i, hk, hd, p_i, 0, {}};

  // 2. The candidate loop with the online softmax. The kernel's registers: m (running max),
  //    l (running sum of exp(s - m)), acc (running sum of exp(s - m) v_j, D floats).
  float m = -INFINITY, l = 0.0f;
  std::vector<float> acc(static_cast<size_t>(D), 0.0f);
  for (int64_t j = 0; j <= p_i; ++j) {  // keys after p_i are not allowed
    if (trace) trace->looked_at++;
    // The rule: query p_i keeps key j iff j <= p_i <= e_j. Otherwise p_ij = 0: skip the key.
    if (!dma::rule::is_kept(j, p_i, evict_bh[j])) continue;
    float qk = 0.0f;
    for (int64_t d = 0; d < D; ++d) qk += q_bhi[d] * k_bh[j * D + d];
    const float s_ij = a.scale * qk + delta_bh[j];  // Eq. 5
    const float m_new = std::max(m, s_ij);
    const float alpha = std::exp(m - m_new);  // first kept key: exp(-inf) = 0, no guard needed
    const float p_ij = std::exp(s_ij - m_new);
    l = alpha * l + p_ij;
    for (int64_t d = 0; d < D; ++d) acc[d] = alpha * acc[d] + p_ij * v_bh[j * D + d];
    m = m_new;
    if (trace) trace->kept.push_back({j, evict_bh[j], s_ij, m, alpha, l});
  }

  // 3. The outputs. Every query keeps at least one key (docs/design.md §1.6): l > 0.
  for (int64_t d = 0; d < D; ++d) a.o[row * D + d] = acc[d] / l;
  a.lse[row] = m + std::log(l);
}

void print_trace(const Trace& t, const RowArgs& a, int64_t row, int64_t w) {
  std::printf("  thread of row %lld = (b %lld, hq %lld, i %lld): block %lld, thread %lld; kv head "
              "%lld, delta head %lld, position p_i = %lld\n", (long long)row, (long long)t.b,
              (long long)t.hq, (long long)t.i, (long long)(row / kV1Threads),
              (long long)(row % kV1Threads), (long long)t.hk, (long long)t.hd, (long long)t.p_i);
  std::printf("  candidate loop: tested is_kept(j, %lld, e_j) for j = 0..%lld (%lld keys), kept "
              "%zu (w = %lld)\n", (long long)t.p_i, (long long)t.p_i, (long long)t.looked_at,
              t.kept.size(), (long long)w);
  std::printf("  online softmax, the first kept keys:\n"
              "       j   e_j      s_ij    m_new     alpha         l\n");
  for (size_t n = 0; n < std::min<size_t>(6, t.kept.size()); ++n) {
    const Trace::Step& st = t.kept[n];
    std::printf("    %4lld  %4lld  %8.4f %8.4f  %8.4f  %8.4f%s\n", (long long)st.j,
                (long long)st.e_j, st.s_ij, st.m, st.alpha, st.l,
                n > 0 && st.alpha < 1.0f ? "   <- new max: old sums rescaled" : "");
  }
  std::printf("    ... %zu kept keys in all\n", t.kept.size());
  const int64_t D = a.s.D;
  std::printf("  o_i = acc / l = (%.5f, %.5f, ..., %.5f), lse_i = m + log l = %.5f\n",
              a.o[row * D], a.o[row * D + 1], a.o[row * D + D - 1], a.lse[row]);
}

// The keys the threads of one warp load: each thread's kept keys, and how many distinct keys that
// is (threads that keep the same key j at the same step of the loop load the same address: one
// load for the warp).
void print_warp_sharing(const RowArgs& a, int64_t row) {
  const int64_t first = row / kWarp * kWarp;
  const int64_t last = std::min(first + kWarp, a.s.B * a.s.Hq * a.s.Lq) - 1;
  std::set<std::pair<int64_t, int64_t>> distinct;  // (kv head of the row's (b, hq), j)
  int64_t pairs = 0;
  for (int64_t r = first; r <= last; ++r) {
    Trace t;
    v1_thread(a, r, &t);
    for (const Trace::Step& st : t.kept) distinct.insert({t.b * a.s.Hkv + t.hk, st.j});
    pairs += static_cast<int64_t>(t.kept.size());
  }
  std::printf("  its warp (rows %lld..%lld): %lld kept (query, key) pairs, but only %zu distinct "
              "keys:\n    consecutive queries keep nearly the same keys (selections nest), so the "
              "warp loads each k_j, v_j about once\n", (long long)first, (long long)last,
              (long long)pairs, distinct.size());
}

bool walk_through_v1() {
  std::printf("Part 1: v1 of cuda/dev/dma_fwd_lab.cu, one thread per query row (run here on the "
              "CPU, as written in the kernel)\n");
  dma::Problem<float> p = make_problem(4, 2, 300, 64, 32, 7);
  p.dout.clear();  // the forward only
  for (auto* t : {&p.q, &p.k, &p.v}) *t = dma::round_to_precision(*t, dma::Precision::bf16);
  const dma::Shape& s = p.shape;
  const std::vector<float> delta = dma::dynamic_weights(s, p.opt.form, p.v, p.w_dt, p.a);
  const std::vector<int64_t> evict = dma::evict_positions(s, p.opt.window, delta);
  std::vector<float> o(static_cast<size_t>(s.q_numel())), lse(static_cast<size_t>(s.lse_numel()));
  const RowArgs a{s, p.opt.causal, static_cast<float>(p.opt.softmax_scale(s)), p.q, p.k, p.v,
                  delta, evict, o, lse};
  const int64_t rows = s.B * s.Hq * s.Lq;
  std::printf("  B=%lld Hq=%lld Hkv=Hd=%lld L=%lld D=%lld w=%lld: %lld query rows -> %lld blocks "
              "of %d threads\n", (long long)s.B, (long long)s.Hq, (long long)s.Hkv,
              (long long)s.Lk, (long long)s.D, (long long)p.opt.window, (long long)rows,
              (long long)((rows + kV1Threads - 1) / kV1Threads), kV1Threads);

  // The grid: every row, in any order (threads share nothing).
  for (int64_t row = 0; row < rows; ++row) v1_thread(a, row, nullptr);

  const int64_t traced = 1 * s.Lq + 200;  // (b 0, hq 1, i 200)
  Trace t;
  v1_thread(a, traced, &t);
  print_trace(t, a, traced, p.opt.window);
  print_warp_sharing(a, traced);

  // Against the float64 reference on the same values and delta: v1 is fp32 throughout.
  const dma::Result<double> r =
      dma::run_pipeline(reference_problem(p, delta), dma::Backend::cpu, {}, false);
  const double e_o = dma::rel_l2(o, r.fwd.o), e_lse = dma::rel_l2(lse, r.fwd.lse);
  const bool ok = e_o <= 1e-5 && e_lse <= 1e-5;
  std::printf("  every row vs the float64 reference: rel L2 o %.1e, lse %.1e (fp32 vs float64 "
              "on the same values: <= 1e-5) %s\n\n", e_o, e_lse, ok ? "ok" : "WRONG");
  return ok;
}

// ---------------------------------------------------------------------------------------------
// Part 2: v2, the production kernel's plan.

// The positions p_first..p_last of the query tile that starts at query i0.
std::pair<int64_t, int64_t> tile_positions(const dma::Shape& s, bool causal, int64_t i0) {
  return {dma::query_position(s, causal, i0),
          dma::query_position(s, causal, std::min(i0 + kBq, s.Lq) - 1)};
}

// The candidate keys of the query tile that starts at i0, from the eviction positions of its
// (b, delta head): the keys some query of the tile keeps.
std::vector<int64_t> tile_candidates(const dma::Shape& s, bool causal, const int64_t* evict_bh,
                                     int64_t i0) {
  const auto [p_first, p_last] = tile_positions(s, causal, i0);
  std::vector<int64_t> keys;
  for (int64_t j = 0; j <= p_last; j++)
    if (dma::rule::is_candidate(j, evict_bh[j], p_first)) keys.push_back(j);
  return keys;
}

// The phases of the GPU pipeline, in words (the same as the comment at the top of this file).
void print_phases() {
  std::printf(
      "Part 2: v2, the production kernel (dma::cuda::attention_forward). The GPU pipeline:\n"
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
      "delta\n"
      "  What v2 adds to v1: %d queries share each gathered key (one load into shared memory\n"
      "  instead of one per thread), the dot products run on tensor cores, and the next tile's\n"
      "  copy (cp.async) overlaps this tile's math.\n\n",
      kBq, kBk, kBq);
}

// Work of the forward tile math: 2 matmuls (S = Q K^T, O += P V) of 2 flops per multiply-add.
struct Plan {
  double gathered_flops = 0, dense_flops = 0;
};

// Prints what the forward kernel does on problem p (delta and evict computed on the CPU).
Plan print_plan(const dma::Problem<float>& p, const std::vector<int64_t>& evict) {
  const dma::Shape& s = p.shape;
  const bool causal = p.opt.causal;
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
  const double heads_per_delta = static_cast<double>(s.Hq / s.Hd);
  for (int64_t hd = 0; hd < s.Hd; hd++) {
    int64_t most = 0, chunks = 0, dense_tiles = 0;
    double sum = 0;
    for (int64_t t = 0; t < tiles; t++) {
      const int64_t n = static_cast<int64_t>(tile_candidates(s, causal, &evict[hd * s.Lk], t * kBq).size());
      const int64_t p_last = tile_positions(s, causal, t * kBq).second;
      most = std::max(most, n);
      sum += static_cast<double>(n);
      chunks += (n + kBk - 1) / kBk;
      dense_tiles += p_last / kBk + 1;
      // per query head of this delta head (Hq / Hd of them)
      plan.gathered_flops += 4.0 * kBq * static_cast<double>(((n + kBk - 1) / kBk) * kBk) *
                             static_cast<double>(s.D) * heads_per_delta;
      plan.dense_flops += 4.0 * kBq * static_cast<double>((p_last / kBk + 1) * kBk) *
                          static_cast<double>(s.D) * heads_per_delta;
    }
    if (hd == 0) {  // one query tile as an example
      const int64_t t = tiles / 2;
      const auto [p_first, p_last] = tile_positions(s, causal, t * kBq);
      const std::vector<int64_t> keys = tile_candidates(s, causal, &evict[hd * s.Lk], t * kBq);
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
                  "per query head\n", (long long)hd, sum / static_cast<double>(tiles),
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

void print_ladder() {
  std::printf(
      "\nThe ladder, each rung validated against the float64 reference and timed (cuda/dev/):\n"
      "  <build>/cuda/dev/dma_fwd_lab 1   v1: one thread per query row (Part 1), fp32 on CUDA cores\n"
      "  <build>/cuda/dev/dma_fwd_lab 2   v2: + query tiles, gathered candidate keys in shared\n"
      "                                   memory, tensor cores, cp.async double buffering (Part 2)\n");
}

#ifdef DMA_TUTORIAL_HAVE_CUDA

// ---------------------------------------------------------------------------------------------
// Part 3: the GPU pipeline against the float64 reference, then timings.

bool check_against_reference() {
  dma::Problem<float> p = make_problem(4, 2, 2048, 128, 256, 8);
  for (auto* t : {&p.q, &p.k, &p.v, &p.dout}) *t = dma::round_to_precision(*t, dma::Precision::bf16);
  const dma::Shape& s = p.shape;
  bool ok = true;

  // Pass 1: the whole pipeline on the GPU (inputs given as bf16-exact floats).
  const dma::Result<float> gpu = dma::cuda::run_pipeline(p);

  // Pass 2: delta in fp32 vs float64, and the selection given the GPU's delta.
  const std::vector<double> delta64 =
      dma::dynamic_weights(s, p.opt.form, to_double(p.v), to_double(p.w_dt), to_double(p.a));
  const double e_delta = dma::rel_l2(gpu.delta, delta64);
  const bool same_evict = dma::evict_positions(s, p.opt.window, gpu.delta) == gpu.evict;
  std::printf("  delta: rel L2 vs float64 %.1e;  e_j identical to the CPU's on the GPU's delta: %s\n",
              e_delta, same_evict ? "yes" : "NO");
  ok = ok && e_delta < 1e-5 && same_evict;

  // Pass 3: attention and its gradients, both sides on the GPU's delta (so the same selection;
  // then dv is the attention part only). CPU: float64, tiled gather mode.
  dma::Problem<float> p_given = p;
  p_given.delta = gpu.delta;
  const dma::Result<float> g2 = dma::cuda::run_pipeline(p_given);
  const auto t0 = std::chrono::steady_clock::now();
  const dma::Result<double> cpu =
      dma::run_pipeline(reference_problem(p, gpu.delta), dma::Backend::tiled, {}, false);
  const double cpu_ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  struct Cmp {
    const char* name;
    double err, bound;
  } cmps[] = {{"o", dma::rel_l2(g2.fwd.o, cpu.fwd.o), 1e-2},
              {"lse", dma::rel_l2(g2.fwd.lse, cpu.fwd.lse), 1e-2},
              {"dq", dma::rel_l2(g2.grads.dq, cpu.grads.dq), 2e-2},
              {"dk", dma::rel_l2(g2.grads.dk, cpu.grads.dk), 2e-2},
              {"dv", dma::rel_l2(g2.grads.dv, cpu.grads.dv), 2e-2},
              {"ddelta", dma::rel_l2(g2.grads.ddelta, cpu.grads.ddelta), 2e-2}};
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
  const bool v1_ok = walk_through_v1();

  // v2's plan on the example the GPU check uses: delta and e_j computed on the CPU.
  print_phases();
  const dma::Problem<float> p = make_problem(4, 2, 2048, 128, 256, 8);
  const std::vector<float> delta = dma::dynamic_weights(p.shape, p.opt.form, p.v, p.w_dt, p.a);
  print_plan(p, dma::evict_positions(p.shape, p.opt.window, delta));
  print_ladder();
  if (!v1_ok) {
    std::printf("\nFAIL\n");
    return 1;
  }

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
    std::printf("\nPart 3: on the GPU, bf16 inputs, against the float64 CPU pipeline:\n");
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
