// Benchmark of the CUDA DMA pipeline: per phase (delta, mask build, forward, backward, dynamic-
// weights backward) median times over many runs with CUDA events, L2 flushed between runs, fresh
// random device data. Prints one JSON object per configuration (a JSON array in all); with --dump
// it writes delta and evict of each configuration's last run as .npy files, (B,Hd,Lk) float32 and
// int32 (delta_N{N}_w{w}.npy, evict_N{N}_w{w}.npy, w as run: 0 becomes N), so the peer script can
// give FlexAttention the exact same mask.
//
//   dma_bench --N 8192,16384 --w 2048,0 [--B 1 --Hq 16 --Hkv 8 --D 128] [--reps 20]
//             [--warmup 3] [--no-backward] [--non-causal] [--dump DIR]
// w = 0 means w = N (dense). Exit codes: 0 success (a configuration that fails is an "error"
// entry of the JSON), 2 invalid values (one line), 77 no CUDA device; bad flags: the parser's
// message and its exit code.
#include <CLI/CLI.hpp>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <filesystem>
#include <string>
#include <vector>

#include "dma/cuda.hpp"
#include "dma/cuda_bench.hpp"
#include "dma/npy.hpp"
#include "dma/validate.hpp"

namespace {

struct Args {
  std::vector<int64_t> Ns = {8192}, ws = {0};
  int64_t B = 1, Hq = 16, Hkv = 8, D = 128;
  int reps = 20, warmup = 3;
  bool no_backward = false, non_causal = false;
  std::string dump;
};

struct Config {
  int64_t N = 0, w = 0;  // w as run (0 given: N)
};

// The (N, w) pairs to run, each once (w = N can be given twice, e.g. N = 2048 with w = 2048 and
// w = 0), after checking every value. Throws dma::Error with a one-line message.
std::vector<Config> configs(const Args& a) {
  // Far beyond anything the kernels take; keeps the shape arithmetic of the checks below exact.
  constexpr int64_t kMaxDim = int64_t{1} << 20;
  const struct { const char* flag; int64_t value; } dims[] = {
      {"--B", a.B}, {"--Hq", a.Hq}, {"--Hkv", a.Hkv}, {"--D", a.D}};
  for (const auto& d : dims)
    if (d.value < 1 || d.value > kMaxDim)
      throw dma::Error(std::string(d.flag) + " " + std::to_string(d.value) + ": must be in [1, " +
                       std::to_string(kMaxDim) + "]");
  if (a.Hq % a.Hkv != 0)
    throw dma::Error("--Hq " + std::to_string(a.Hq) + " is not a multiple of --Hkv " +
                     std::to_string(a.Hkv) + " (GQA needs Hq % Hkv == 0)");
  if (a.reps < 1) throw dma::Error("--reps " + std::to_string(a.reps) + ": must be >= 1");
  if (a.warmup < 0) throw dma::Error("--warmup " + std::to_string(a.warmup) + ": must be >= 0");
  if (a.Ns.empty() || a.ws.empty()) throw dma::Error("--N and --w need at least one value each");
  std::vector<Config> out;
  for (int64_t N : a.Ns) {
    if (N < 1) throw dma::Error("--N " + std::to_string(N) + ": must be >= 1");
    for (int64_t w0 : a.ws) {
      if (w0 < 0) throw dma::Error("--w " + std::to_string(w0) + ": must be >= 0 (0: w = N)");
      const Config c{N, w0 > 0 ? w0 : N};
      bool seen = false;
      for (const Config& x : out) seen = seen || (x.N == c.N && x.w == c.w);
      if (seen) continue;
      const dma::Shape s{a.B, a.Hq, a.Hkv, a.Hkv, N, N, a.D};
      dma::Options opt;
      opt.window = c.w;
      opt.causal = !a.non_causal;
      dma::validate_shape(s, opt.causal);
      dma::validate_options(s, opt);
      dma::cuda::check_supported(s);  // head dim and size limits; needs no device
      out.push_back(c);
    }
  }
  return out;
}

std::string dump_path(const std::string& dir, const char* name, const Config& c) {
  return (std::filesystem::path(dir) /
          (std::string(name) + "_N" + std::to_string(c.N) + "_w" + std::to_string(c.w) + ".npy"))
      .string();
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  CLI::App app{"dma_bench: times the CUDA DMA pipeline per phase; prints a JSON array"};
  app.add_option("--N", a.Ns, "sequence lengths Lq = Lk, comma-separated (>= 1)")->delimiter(',');
  app.add_option("--w", a.ws, "windows, comma-separated (>= 0; 0: w = N, dense)")->delimiter(',');
  app.add_option("--B", a.B, "batch (>= 1)");
  app.add_option("--Hq", a.Hq, "query heads (>= 1, a multiple of --Hkv)");
  app.add_option("--Hkv", a.Hkv, "key/value heads, also the heads of delta (>= 1)");
  app.add_option("--D", a.D, "head dim (32, 64, 128 or 256; the Hopper kernels take 64 and 128)");
  app.add_option("--reps", a.reps, "timed runs per configuration (>= 1; the median is reported)");
  app.add_option("--warmup", a.warmup, "untimed runs first (>= 0)");
  app.add_flag("--no-backward", a.no_backward, "time the forward phases only");
  app.add_flag("--non-causal", a.non_causal, "every query sees every key");
  app.add_option("--dump", a.dump,
                 "write delta_N{N}_w{w}.npy (float32) and evict_N{N}_w{w}.npy (int32) here");
  CLI11_PARSE(app, argc, argv);

  std::vector<Config> todo;
  try {
    todo = configs(a);
    if (!a.dump.empty()) std::filesystem::create_directories(a.dump);
  } catch (const std::exception& e) {  // dma::Error, std::filesystem::filesystem_error
    std::fprintf(stderr, "dma_bench: %s\n", e.what());
    return 2;
  }
  std::string why;
  if (!dma::cuda::device_available(&why)) {
    std::fprintf(stderr, "dma_bench: %s\n", why.c_str());
    return 77;
  }

  const bool backward = !a.no_backward, causal = !a.non_causal;
  std::printf("[\n");
  bool first = true;
  for (const Config& c : todo) {
    const long long N = c.N, w = c.w, B = a.B, Hq = a.Hq, Hkv = a.Hkv, D = a.D;
    const dma::Shape s{a.B, a.Hq, a.Hkv, a.Hkv, c.N, c.N, a.D};
    dma::Options opt;
    opt.window = c.w;
    opt.causal = causal;
    dma::cuda::BenchOptions bo;
    bo.reps = a.reps;
    bo.warmup = a.warmup;
    bo.backward = backward;
    bo.keep_mask = !a.dump.empty();
    try {
      const dma::cuda::BenchResult r = dma::cuda::bench_pipeline(s, opt, bo);
      if (bo.keep_mask) {
        const std::vector<int64_t> dims = {s.B, s.Hd, s.Lk};
        dma::write_npy(dump_path(a.dump, "delta", c), dma::make_npy(r.delta, dims));
        dma::write_npy(dump_path(a.dump, "evict", c), dma::make_npy(r.evict, dims));
      }
      const double fwd_flop = 4.0 * D * r.kept_pairs, bwd_flop = 10.0 * D * r.kept_pairs;
      const double fwd_total_ms = r.delta_ms + r.mask_ms + r.forward_ms;
      std::printf(
          "%s  {\"N\": %lld, \"w\": %lld, \"B\": %lld, \"Hq\": %lld, \"Hkv\": %lld, \"D\": %lld, "
          "\"causal\": %s, \"delta_ms\": %.4f, \"mask_ms\": %.4f, \"forward_ms\": %.4f, "
          "\"backward_ms\": %.4f, \"dw_backward_ms\": %.4f, \"total_ms\": %.4f, "
          "\"kept_pairs\": %.0f, \"computed_pairs\": %.0f, \"dense_causal_pairs\": %.0f, "
          "\"fwd_tflops\": %.2f, \"fwd_with_mask_tflops\": %.2f, \"fwd_bwd_tflops\": %.2f, "
          "\"peak_bytes\": %.0f}",
          first ? "" : ",\n", N, w, B, Hq, Hkv, D, causal ? "true" : "false", r.delta_ms,
          r.mask_ms, r.forward_ms, r.backward_ms, r.dw_backward_ms, r.total_ms, r.kept_pairs,
          r.computed_pairs, r.dense_causal_pairs, fwd_flop / (r.forward_ms * 1e9),
          fwd_flop / (fwd_total_ms * 1e9),
          backward ? (fwd_flop + bwd_flop) / (r.total_ms * 1e9) : 0.0, r.peak_bytes);
    } catch (const std::exception& e) {
      std::fprintf(stderr, "dma_bench N=%lld w=%lld: %s\n", N, w, e.what());
      std::printf("%s  {\"N\": %lld, \"w\": %lld, \"D\": %lld, \"error\": \"%s\"}", first ? "" : ",\n",
                  N, w, D, "failed");
    }
    first = false;
    std::fflush(stdout);
  }
  std::printf("\n]\n");
  return 0;
}
