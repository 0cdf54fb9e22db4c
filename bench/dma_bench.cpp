// Benchmark of the CUDA DMA pipeline: per phase (delta, mask build, forward, backward, dynamic-
// weights backward) median times over many runs with CUDA events, L2 flushed between runs, fresh
// random device data. Prints one JSON object per configuration (a JSON array in all); optionally
// dumps delta and evict of each configuration (raw little-endian float32 / int32, (B,Hd,Lk)) so the
// peer script can give FlexAttention the exact same mask.
//
//   dma_bench --N 8192,16384 --w 2048,0 [--B 1 --Hq 16 --Hkv 8 --D 128] [--reps 20]
//             [--no-backward] [--non-causal] [--dump DIR]
// w = 0 means w = N (dense).
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include "dma/cuda.hpp"
#include "dma/cuda_bench.hpp"

namespace {

std::vector<long long> parse_list(const std::string& s) {
  std::vector<long long> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) out.push_back(std::atoll(item.c_str()));
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<long long> Ns = {8192}, ws = {0};
  long long B = 1, Hq = 16, Hkv = 8, D = 128;
  int reps = 20, warmup = 3;
  bool backward = true, causal = true;
  std::string dump;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      if (i + 1 >= argc) { std::fprintf(stderr, "%s needs a value\n", a.c_str()); std::exit(2); }
      return argv[++i];
    };
    if (a == "--N") Ns = parse_list(next());
    else if (a == "--w") ws = parse_list(next());
    else if (a == "--B") B = std::atoll(next().c_str());
    else if (a == "--Hq") Hq = std::atoll(next().c_str());
    else if (a == "--Hkv") Hkv = std::atoll(next().c_str());
    else if (a == "--D") D = std::atoll(next().c_str());
    else if (a == "--reps") reps = std::atoi(next().c_str());
    else if (a == "--warmup") warmup = std::atoi(next().c_str());
    else if (a == "--no-backward") backward = false;
    else if (a == "--non-causal") causal = false;
    else if (a == "--dump") dump = next();
    else { std::fprintf(stderr, "unknown flag %s\n", a.c_str()); return 2; }
  }
  std::string why;
  if (!dma::cuda::device_available(&why)) {
    std::fprintf(stderr, "dma_bench: %s\n", why.c_str());
    return 77;
  }
  std::printf("[\n");
  bool first = true;
  for (long long N : Ns) {
    std::vector<long long> done;  // w = N given twice (e.g. N = 2048 with w = 2048 and w = 0)
    for (long long w0 : ws) {
      const long long w = w0 > 0 ? w0 : N;
      bool seen = false;
      for (long long x : done) seen = seen || x == w;
      if (seen) continue;
      done.push_back(w);
      dma::Shape s{B, Hq, Hkv, Hkv, N, N, D};
      dma::Options opt;
      opt.window = w;
      opt.causal = causal;
      dma::cuda::BenchOptions bo;
      bo.reps = reps;
      bo.warmup = warmup;
      bo.backward = backward;
      bo.dump_dir = dump;
      try {
        const dma::cuda::BenchResult r = dma::cuda::bench_pipeline(s, opt, bo);
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
        first = false;
        std::fflush(stdout);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "dma_bench N=%lld w=%lld: %s\n", N, w, e.what());
        std::printf("%s  {\"N\": %lld, \"w\": %lld, \"D\": %lld, \"error\": \"%s\"}", first ? "" : ",\n",
                    N, w, D, "failed");
        first = false;
      }
    }
  }
  std::printf("\n]\n");
  return 0;
}
