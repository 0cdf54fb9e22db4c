// dma_run: computes a DMA bundle (docs/design.md §4).
//
//   dma_run --in DIR --out DIR --window W [--non-causal] [--form exp|linear] [--scale S]
//           [--backend cpu|tiled|cuda]
//   dma_run --in DIR --out DIR --window W --decode [--prefill P] [--form ...] [--scale S]
//
// Reads q k v w_dt a [do] [delta] from --in, runs the pipeline, and writes the inputs together with
// delta evict [mask] o lse [dq dk dv ddelta [dw_dt da]] to --out, atomically (a sibling temporary
// folder renamed into place). Exit codes: 0 success, 2 invalid data (one line naming the tensor),
// 3 backend unavailable, 1 anything else; bad flags: the parser's message and its exit code.
//
// --decode computes the same o and lse by decoding (docs/design.md §4 Decode, dma/decode.hpp):
// prefill over the first P tokens of every sequence, then one token at a time with a cache of w
// entries per (sequence, delta head). Causal, Lq == Lk, on the CPU; no gradients (do.npy is
// ignored and not copied to --out). evict gives a never-kept key e_j = j-1.
#include <CLI/CLI.hpp>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <string>

#include "dma/bundle.hpp"
#include "dma/decode.hpp"
#ifdef DMA_RUN_HAVE_CUDA
#include "dma/cuda.hpp"
#endif

namespace {

struct Args {
  std::string in, out, form = "exp", backend = "cpu", tiled_mode = "gather";
  int64_t window = 0, tile_q = 64, tile_k = 64;
  bool non_causal = false;
  bool decode = false;
  int64_t prefill = 0;  // --decode: prompt tokens per sequence
  double scale = 0;
};

struct BackendUnavailable : std::runtime_error {
  using std::runtime_error::runtime_error;
};


template <typename T>
void print_summary(const dma::Shape& s, const char* backend, const dma::Result<T>& r) {
  std::printf("dma_run: B=%lld Hq=%lld Hkv=%lld Hd=%lld Lq=%lld Lk=%lld D=%lld backend=%s\n",
              static_cast<long long>(s.B), static_cast<long long>(s.Hq),
              static_cast<long long>(s.Hkv), static_cast<long long>(s.Hd),
              static_cast<long long>(s.Lq), static_cast<long long>(s.Lk),
              static_cast<long long>(s.D), backend);
  std::printf("  time ms: delta %.3f  mask %.3f  forward %.3f  backward %.3f\n", r.times.delta,
              r.times.mask, r.times.forward, r.times.backward);
  if (r.fwd_counters.pairs_dense)
    std::printf("  tiles: %lld visited, %lld skipped of %lld causal-dense; work %.3f of dense\n",
                static_cast<long long>(r.fwd_counters.tiles_visited),
                static_cast<long long>(r.fwd_counters.tiles_skipped),
                static_cast<long long>(r.fwd_counters.tiles_dense), r.fwd_counters.work_fraction());
}

template <typename T>
void run_cpu(const Args& args, const dma::Bundle& in, const dma::Options& opt) {
  const dma::Problem<T> p = dma::problem_from_bundle<T>(in, opt);
  const dma::Backend backend = args.backend == "cpu" ? dma::Backend::cpu : dma::Backend::tiled;
  dma::TileConfig tc;
  tc.Bq = args.tile_q;
  tc.Bk = args.tile_k;
  tc.mode = args.tiled_mode == "dense" ? dma::TileMode::dense
            : args.tiled_mode == "skip" ? dma::TileMode::skip
                                        : dma::TileMode::gather;
  const bool small_mask = p.shape.mask_numel() <= dma::kMaxMaskElements;
  const dma::Result<T> r = dma::run_pipeline(p, backend, tc, small_mask);
  dma::Bundle out = in;  // the inputs travel with the outputs (a re-run takes delta as given)
  dma::add_outputs(out, p.shape, r);
  dma::write_bundle(args.out, out);
  print_summary(p.shape, dma::backend_name(backend), r);
}

void run_cuda([[maybe_unused]] const Args& args, [[maybe_unused]] const dma::Bundle& in,
              [[maybe_unused]] const dma::Options& opt) {
#ifdef DMA_RUN_HAVE_CUDA
  const dma::Problem<float> p = dma::problem_from_bundle<float>(in, opt);  // float64 in: rounded
  dma::cuda::check_supported(p.shape);  // an unsupported head dim is bad data, GPU or not
  std::string why;
  if (!dma::cuda::device_available(&why)) throw BackendUnavailable("--backend cuda: " + why);
  dma::Result<float> r = dma::cuda::run_pipeline(p, dma::cuda::Precision::bf16);
  if (p.shape.mask_numel() <= dma::kMaxMaskElements)  // the kernels keep only evict
    r.mask = dma::mask_from_evict(p.shape, p.opt, r.evict);
  dma::Bundle out = in;  // the inputs travel with the outputs (a re-run takes delta as given)
  dma::add_outputs(out, p.shape, r);
  dma::write_bundle(args.out, out);
  print_summary(p.shape, "cuda", r);
#else
  throw BackendUnavailable("--backend cuda: this dma_run was built without CUDA");
#endif
}

// --decode: prefill over the first args.prefill tokens, then one step per token.
template <typename T>
void run_decode(const Args& args, dma::Bundle in, const dma::Options& opt) {
  if (in.arrays.erase("do"))
    std::printf("dma_run: --decode computes no gradients: do.npy is ignored and not copied to --out\n");
  const auto& q = in.arrays.at("q").shape;
  const auto& k = in.arrays.at("k").shape;
  if (q.size() == 4 && k.size() == 4 && q[2] != k[2])
    throw dma::Error("--decode needs Lq == Lk (the prompt's queries, then one query per step), got Lq = " +
                     std::to_string(q[2]) + ", Lk = " + std::to_string(k[2]));
  const dma::Problem<T> p = dma::problem_from_bundle<T>(in, opt);
  const auto t0 = std::chrono::steady_clock::now();
  const dma::Result<T> r =
      dma::decode_problem(p, args.prefill, p.shape.mask_numel() <= dma::kMaxMaskElements);
  const double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  dma::add_outputs(in, p.shape, r);  // the inputs (less do) travel with the outputs
  dma::write_bundle(args.out, in);
  const dma::Shape& s = p.shape;
  std::printf("dma_run: decode B=%lld Hq=%lld Hkv=%lld Hd=%lld L=%lld D=%lld prefill=%lld steps=%lld\n",
              static_cast<long long>(s.B), static_cast<long long>(s.Hq),
              static_cast<long long>(s.Hkv), static_cast<long long>(s.Hd),
              static_cast<long long>(s.Lk), static_cast<long long>(s.D),
              static_cast<long long>(args.prefill), static_cast<long long>(s.Lk - args.prefill));
  std::printf("  time ms: %.3f (prefill and steps); cache: at most w = %lld entries per (sequence, delta head)\n",
              ms, static_cast<long long>(opt.window));
}

}  // namespace

int main(int argc, char** argv) {
  Args args;
  CLI::App app{"dma_run: computes Dynamic Mask Attention on a bundle of .npy tensors"};
  app.add_option("--in", args.in, "input bundle folder (q k v w_dt a [do] [delta])")->required();
  app.add_option("--out", args.out, "output bundle folder (created or replaced)")->required();
  app.add_option("--window", args.window, "w: keys kept per query (>= 1)")->required();
  app.add_flag("--non-causal", args.non_causal, "every query sees every key");
  app.add_option("--form", args.form, "dynamic weight form")->check(CLI::IsMember({"exp", "linear"}));
  app.add_option("--scale", args.scale, "softmax scale (default 1/sqrt(D))");
  app.add_option("--backend", args.backend, "implementation")
      ->check(CLI::IsMember({"cpu", "tiled", "cuda"}));
  app.add_option("--tile-q", args.tile_q, "tiled backend: queries per tile (Bq)")->check(CLI::PositiveNumber);
  app.add_option("--tile-k", args.tile_k, "tiled backend: keys per tile (Bk)")->check(CLI::PositiveNumber);
  app.add_option("--tiled-mode", args.tiled_mode, "tiled backend: which key blocks to visit")
      ->check(CLI::IsMember({"dense", "skip", "gather"}));
  CLI::Option* decode = app.add_flag("--decode", args.decode,
                                     "decode with a cache of w keys per head (causal, Lq == Lk; no gradients)");
  app.add_option("--prefill", args.prefill, "--decode: prompt tokens per sequence, 0..L (default 0)")
      ->check(CLI::NonNegativeNumber)
      ->needs(decode);
  CLI11_PARSE(app, argc, argv);

  try {
    dma::Options opt;
    opt.window = args.window;
    opt.causal = !args.non_causal;
    opt.form = dma::parse_form(args.form);
    if (args.scale != 0 && !(args.scale > 0))  // NaN and negatives; 0 would silently mean default
      throw dma::Error("--scale: " + std::to_string(args.scale) + " (must be > 0)");
    if (args.scale == 0 && app.count("--scale"))
      throw dma::Error("--scale: 0 (must be > 0)");
    opt.scale = args.scale;
    const dma::Bundle in = dma::read_bundle(args.in, /*with_outputs=*/false);
    if (in.has("delta") && (in.has("w_dt") || in.has("a")))  // e.g. re-running an output bundle
      std::printf("dma_run: delta.npy is given, so w_dt and a are ignored and dw_dt, da are not written\n");
    if (args.decode && args.backend == "cuda")
      throw BackendUnavailable("--decode runs on the CPU; the GPU decode step is the device API of dma/cuda_decode.hpp");
    if (args.decode && dma::bundle_float_type(in) == dma::DType::f64)
      run_decode<double>(args, in, opt);
    else if (args.decode)
      run_decode<float>(args, in, opt);
    else if (args.backend == "cuda")
      run_cuda(args, in, opt);
    else if (dma::bundle_float_type(in) == dma::DType::f64)
      run_cpu<double>(args, in, opt);
    else
      run_cpu<float>(args, in, opt);
  } catch (const dma::Error& e) {
    std::fprintf(stderr, "dma_run: %s\n", e.what());
    return 2;
  } catch (const BackendUnavailable& e) {
    std::fprintf(stderr, "dma_run: %s\n", e.what());
    return 3;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dma_run: error: %s\n", e.what());
    return 1;
  }
  return 0;
}
