// What the kernel-ladder programs share (dma_fwd_lab, dma_bwd_lab): CUDA error checks, device
// arrays, bf16 rounding of the inputs, the validation problems and report, the kept-pair count,
// event timing, the command line and the run itself (run_ladder). Each program holds its device
// problem, its versions and how it validates one.
#pragma once

#include <cuda_runtime.h>

#include <CLI/CLI.hpp>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "dma/cuda.hpp"
#include "dma/mask_rule.hpp"
#include "dma/numerics.hpp"
#include "dma/pipeline.hpp"

namespace lab {

constexpr dma::Precision kPrecision = dma::Precision::bf16;

inline void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess)
    throw dma::Error(std::string("CUDA error in ") + what + " (" + file + ":" +
                     std::to_string(line) + "): " + cudaGetErrorString(err));
}
#define LAB_CUDA_CHECK(call) ::lab::cuda_check((call), #call, __FILE__, __LINE__)

template <typename T>
std::vector<T> copy_to_host(const void* dev, size_t n) {
  std::vector<T> host(n);
  LAB_CUDA_CHECK(cudaMemcpy(host.data(), dev, n * sizeof(T), cudaMemcpyDeviceToHost));
  return host;
}

// n elements of T on the device, freed on scope exit.
template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(size_t n) : n_(n) { LAB_CUDA_CHECK(cudaMalloc(&ptr_, std::max<size_t>(n, 1) * sizeof(T))); }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) {
    LAB_CUDA_CHECK(cudaMemcpy(ptr_, host.data(), bytes(), cudaMemcpyHostToDevice));
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(ptr_); }
  T* get() const { return ptr_; }
  size_t size() const { return n_; }
  size_t bytes() const { return n_ * sizeof(T); }
  std::vector<T> download() const { return copy_to_host<T>(ptr_, n_); }
  // Every byte 0xff: as float32 every element is a NaN, so what a kernel leaves unwritten stays
  // NaN (meant for the float outputs).
  void poison() const { LAB_CUDA_CHECK(cudaMemset(ptr_, 0xff, bytes())); }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

// The bits the GPU reads: each value rounded to bf16 (the same values dma::round_to_precision
// gives the reference).
inline std::vector<uint16_t> bf16_bits(const std::vector<float>& x) {
  std::vector<uint16_t> bits(x.size());
  for (size_t n = 0; n < x.size(); ++n) bits[n] = dma::to_bf16_bits(x[n]);
  return bits;
}

inline std::vector<double> widen(const std::vector<float>& x) { return {x.begin(), x.end()}; }

inline std::string shape_string(const dma::Shape& s, const dma::Options& opt) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "B=%lld Hq=%lld Hkv=%lld Hd=%lld Lq=%lld Lk=%lld D=%lld w=%lld %s",
                (long long)s.B, (long long)s.Hq, (long long)s.Hkv, (long long)s.Hd,
                (long long)s.Lq, (long long)s.Lk, (long long)s.D, (long long)opt.window,
                opt.causal ? "causal" : "non-causal");
  return buf;
}

// Elements still holding the NaN poison: not written by the kernel (or computed as NaN).
inline int64_t count_nan(const std::vector<float>& x) {
  return std::count_if(x.begin(), x.end(), [](float e) { return std::isnan(e); });
}

// One output against the reference, llm.c style: a few (got, ref) pairs, the largest difference,
// then the measures that decide: relative L2 over the tensor, over its worst row (of `row`
// elements; worst_bar <= 0: not a criterion, for tensors whose rows are single sums that may
// cancel), and no element left unwritten.
inline bool report(const char* name, const std::vector<float>& got, const std::vector<double>& ref,
                   int64_t row, double rel_bar, double worst_bar) {
  double maxdiff = 0;
  for (size_t n = 0; n < ref.size(); ++n)
    if (!std::isnan(got[n])) maxdiff = std::max(maxdiff, std::abs(double(got[n]) - ref[n]));
  const int64_t unwritten = count_nan(got);
  const double rel = dma::rel_l2(got, ref), worst = dma::worst_row_rel_l2(got, ref, row);
  std::printf("    %-6s (got, ref):", name);
  for (const size_t n : {size_t(0), size_t(1), ref.size() / 2, ref.size() - 1})
    std::printf(" (%.6f, %.6f)", got[n], ref[n]);
  std::printf("\n           rel L2 %.2e (bar %.0e)", rel, rel_bar);
  if (worst_bar > 0) std::printf(", worst row %.2e (bar %.0e)", worst, worst_bar);
  std::printf(", maxdiff %.2e, unwritten %lld\n", maxdiff, (long long)unwritten);
  return unwritten == 0 && rel <= rel_bar && (worst_bar <= 0 || worst <= worst_bar);
}

// The GPU's e_j (B,Hd,Lk) against the reference's: prints how many differ and the first that does
// (given the same delta every one must agree, else the kernels and the reference ran different
// masks), and returns the count.
inline int64_t report_evict(const std::vector<int32_t>& got, const std::vector<int64_t>& ref,
                            const dma::Shape& s) {
  int64_t diff = 0, first = -1;
  for (size_t n = 0; n < got.size(); ++n)
    if (int64_t(got[n]) != ref[n]) {
      if (first < 0) first = int64_t(n);
      ++diff;
    }
  std::printf("    evict: %lld of %zu differ from the reference's", (long long)diff, got.size());
  if (first >= 0)
    std::printf(", the first at b %lld hd %lld j %lld: GPU e_j %d, reference %lld",
                (long long)(first / s.Lk / s.Hd), (long long)(first / s.Lk % s.Hd),
                (long long)(first % s.Lk), got[size_t(first)], (long long)ref[size_t(first)]);
  std::printf("\n");
  return diff;
}

struct Case {
  const char* name;
  dma::Shape s;
  dma::Options opt;
};

// The validation problems: lengths that are multiples of no tile size; GQA, both delta-head
// layouts, causal with Lq = Lk and Lq < Lk (queries aligned bottom-right), non-causal.
inline std::vector<Case> validation_cases(int64_t D) {
  dma::Options causal;
  causal.window = 128;
  dma::Options full = causal;
  full.causal = false;
  //             B  Hq Hkv Hd  Lq    Lk    D
  return {{"causal", {1, 4, 2, 2, 1000, 1000, D}, causal},
          {"non-causal, Hd = Hq", {1, 4, 2, 4, 1000, 1000, D}, full},
          {"causal, Lq < Lk", {1, 4, 2, 2, 257, 1000, D}, causal}};
}

// Kept (query, key) pairs summed over (b, hq): key j is kept by the positions [j, e_j] that are
// query positions. Causal: one query per position p_0..p_{Lq-1}; non-causal: all Lq at Lk - 1.
inline double kept_pairs(const dma::Shape& s, bool causal, const std::vector<int32_t>& evict) {
  const int64_t p_lo = dma::query_position(s, causal, 0);
  const int64_t p_hi = dma::query_position(s, causal, s.Lq - 1);
  double pairs = 0;
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t hq = 0; hq < s.Hq; ++hq) {
      const int32_t* evict_bh = &evict[(b * s.Hd + s.delta_head(hq)) * s.Lk];
      for (int64_t j = 0; j < s.Lk; ++j)
        pairs += double(dma::rule::kept_positions<int64_t>(j, evict_bh[j], p_lo, p_hi));
    }
  return causal ? pairs : pairs * double(s.Lq);
}

struct Timing {
  double median_ms, min_ms, max_ms;
};

// Each of `reps` runs timed alone with CUDA events on the legacy default stream, after `warmup`
// untimed runs.
inline Timing time_runs(const std::function<void()>& run, int warmup, int reps) {
  for (int r = 0; r < warmup; ++r) run();
  cudaEvent_t start, stop;
  LAB_CUDA_CHECK(cudaEventCreate(&start));
  LAB_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<float> ms(static_cast<size_t>(reps));
  for (float& t : ms) {
    LAB_CUDA_CHECK(cudaEventRecord(start));
    run();
    LAB_CUDA_CHECK(cudaEventRecord(stop));
    LAB_CUDA_CHECK(cudaEventSynchronize(stop));
    LAB_CUDA_CHECK(cudaEventElapsedTime(&t, start, stop));
  }
  LAB_CUDA_CHECK(cudaEventDestroy(start));
  LAB_CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(ms.begin(), ms.end());
  const size_t n = ms.size();
  return {0.5 * (double(ms[(n - 1) / 2]) + double(ms[n / 2])), double(ms.front()), double(ms.back())};
}

// The command line of a lab program: the version, the timed problem, the runs.
struct Args {
  int version = 0, reps = 20, warmup = 3;
  int64_t B = 1, L = 4096, w = 512, Hq = 16, Hkv = 8, Hd = 0, D = 128;
  bool non_causal = false;
  uint64_t seed = 1;
  dma::Shape shape() const { return {B, Hq, Hkv, Hd == 0 ? Hkv : Hd, L, L, D}; }
  dma::Options options() const {
    dma::Options opt;
    opt.window = w;
    opt.causal = !non_causal;
    return opt;
  }
};

// Parses argv into `a`. Returns -1 to go on, else the exit status (0 after --help, 2 for a bad
// argument, with CLI11's message).
inline int parse_args(int argc, char** argv, const char* description, const char* version_help,
                      int versions, Args& a) {
  CLI::App app{description};
  app.add_option("N", a.version, version_help)->required()->check(CLI::Range(1, versions));
  app.add_option("--L", a.L, "queries = keys of the timed problem")->check(CLI::PositiveNumber);
  app.add_option("--w", a.w, "window: keys kept per query")->check(CLI::PositiveNumber);
  app.add_option("--Hq", a.Hq, "query heads")->check(CLI::PositiveNumber);
  app.add_option("--Hkv", a.Hkv, "key/value heads (Hq % Hkv == 0)")->check(CLI::PositiveNumber);
  app.add_option("--Hd", a.Hd, "heads of the dynamic weights: Hkv or Hq (default Hkv)");
  app.add_option("--D", a.D, "head dim (64 or 128)")->check(CLI::PositiveNumber);
  app.add_option("--B", a.B, "batch")->check(CLI::PositiveNumber);
  app.add_option("--reps", a.reps, "timed runs (the median is reported)")->check(CLI::PositiveNumber);
  app.add_option("--warmup", a.warmup, "untimed runs before them")->check(CLI::NonNegativeNumber);
  app.add_flag("--non-causal", a.non_causal, "every query sees every key (timed problem)");
  app.add_option("--seed", a.seed, "seed of the random inputs");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;  // --help: 0
  }
  return -1;
}

// One lab program. Problem: the device problem every version runs on, built from a
// dma::Problem<float>, with poison_outputs(), unwritten() (outputs still NaN) and
// download_evict(). Version: `what` and `run(const Problem&)`.
template <typename Problem, typename Version>
struct Ladder {
  const char* name;            // the program, for its messages
  const char* description;     // --help
  const char* version_help;    // what N selects
  const Version* versions;
  int n_versions;
  double flops_per_pair_dim;   // flops counted per kept pair and head dim: 4 forward, 10 backward
  bool with_do;                // the problems carry do (the backward)
  bool (*validate)(const Version&, const Case&, uint64_t seed);
};

// Times version v on the problem of the flags and prints ms and TFLOP/s on the kept pairs; false
// when an output was left unwritten.
template <typename Problem, typename Version>
bool time_problem(const Ladder<Problem, Version>& l, const Args& a, const Version& v) {
  const dma::Shape s = a.shape();
  const dma::Options opt = a.options();
  std::printf("timing: %s, %d runs after %d warm-up runs\n", shape_string(s, opt).c_str(), a.reps,
              a.warmup);
  const Problem dp(dma::random_problem<float>(s, opt, a.seed, l.with_do));
  dp.poison_outputs();
  const Timing t = time_runs([&] { v.run(dp); }, a.warmup, a.reps);
  const int64_t unwritten = dp.unwritten();
  const double pairs = kept_pairs(s, opt.causal, dp.download_evict());
  const double flops = l.flops_per_pair_dim * double(s.D) * pairs;
  std::printf("  kept pairs %.4g (%.1f per query), %.4g GFLOP at %g*D per pair\n", pairs,
              pairs / double(s.B * s.Hq * s.Lq), flops * 1e-9, l.flops_per_pair_dim);
  std::printf("  v%d: %.3f ms median (min %.3f, max %.3f), %.1f TFLOP/s; unwritten outputs %lld\n",
              a.version, t.median_ms, t.min_ms, t.max_ms, flops / (t.median_ms * 1e-3) * 1e-12,
              (long long)unwritten);
  return unwritten == 0;
}

// The program: parse, refuse what the kernels cannot run (exit 2, no device needed), skip without
// a device or without the one version N needs (77), validate version N on the validation problems, then time it. 0 PASS, 1 FAIL.
template <typename Problem, typename Version>
int run_ladder(int argc, char** argv, const Ladder<Problem, Version>& l) {
  Args a;
  const int status = parse_args(argc, argv, l.description, l.version_help, l.n_versions, a);
  if (status >= 0) return status;
  try {
    dma::cuda::check_config({a.shape(), a.options(), kPrecision});
    for (const Case& cs : validation_cases(a.D)) dma::cuda::check_config({cs.s, cs.opt, kPrecision});
  } catch (const dma::Error& e) {
    std::fprintf(stderr, "%s: %s\n", l.name, e.what());
    return 2;
  }
  std::string why;
  if (!dma::cuda::device_available(&why)) {
    std::printf("%s: %s: nothing to run. SKIPPED\n", l.name, why.c_str());
    return 77;
  }
  const Version& v = l.versions[a.version - 1];
  try {
    cudaDeviceProp prop;
    LAB_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    if (v.needs_sm90 && !(prop.major == 9 && prop.minor == 0)) {
      std::printf("%s v%d: needs a compute capability 9.0 GPU, this is %s (sm_%d%d). SKIPPED\n",
                  l.name, a.version, prop.name, prop.major, prop.minor);
      return 77;
    }
    std::printf("%s v%d: %s\ndevice: %s (sm_%d%d), seed %llu\n", l.name, a.version, v.what,
                prop.name, prop.major, prop.minor, (unsigned long long)a.seed);
    std::printf("validation against the float64 reference (bf16 inputs, the GPU's delta):\n");
    bool ok = true;
    for (const Case& cs : validation_cases(a.D)) ok = l.validate(v, cs, a.seed) && ok;
    if (!ok) {
      std::printf("FAIL: v%d does not match the reference\n", a.version);
      return 1;
    }
    if (!time_problem(l, a, v)) {
      std::printf("FAIL: v%d left outputs of the timed problem unwritten\n", a.version);
      return 1;
    }
  } catch (const dma::Error& e) {
    std::printf("%s: %s\nFAIL\n", l.name, e.what());
    return 1;
  }
  std::printf("PASS\n");
  return 0;
}

}  // namespace lab
