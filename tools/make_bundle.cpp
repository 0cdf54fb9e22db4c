// dma_make_bundle: writes a bundle of random inputs (q k v w_dt a do), e.g. for the README demo.
//
//   dma_make_bundle --out DIR [--B 1 --Hq 4 --Hkv 2 --Hd 2 --Lq 256 --Lk 256 --D 32]
//                   [--seed 1] [--dtype float32|float64] [--no-do]
#include <CLI/CLI.hpp>
#include <cmath>
#include <cstdio>
#include <random>

#include "dma/bundle.hpp"
#include "dma/validate.hpp"

namespace {

template <typename T>
std::vector<T> normal(std::mt19937_64& rng, int64_t n, double stddev) {
  std::normal_distribution<double> dist(0.0, stddev);
  std::vector<T> x(static_cast<size_t>(n));
  for (auto& e : x) e = static_cast<T>(dist(rng));
  return x;
}

template <typename T>
dma::Bundle random_bundle(const dma::Shape& s, uint64_t seed, bool with_do) {
  std::mt19937_64 rng(seed);
  dma::Problem<T> p;
  p.shape = s;
  p.q = normal<T>(rng, s.q_numel(), 1.0);
  p.k = normal<T>(rng, s.kv_numel(), 1.0);
  p.v = normal<T>(rng, s.kv_numel(), 1.0);
  // w_dt ~ 1/sqrt(fan-in) keeps z = vflat . w_dt of order 1, so delta stays moderate.
  p.w_dt = normal<T>(rng, s.w_dt_numel(), 1.0 / std::sqrt(double(s.Hkv * s.D)));
  std::uniform_real_distribution<double> a_dist(0.5, 1.5);
  p.a.resize(static_cast<size_t>(s.Hd));
  for (auto& e : p.a) e = static_cast<T>(a_dist(rng));
  if (with_do) p.dout = normal<T>(rng, s.q_numel(), 1.0);
  return dma::bundle_from_problem(p);
}

}  // namespace

int main(int argc, char** argv) {
  dma::Shape s;
  s.Hq = 4; s.Hkv = 2; s.Hd = 2; s.Lq = 256; s.Lk = 256; s.D = 32;
  std::string out, dtype = "float32";
  uint64_t seed = 1;
  bool no_do = false;
  CLI::App app{"dma_make_bundle: writes a bundle of random DMA inputs"};
  app.add_option("--out", out, "output bundle folder")->required();
  app.add_option("--B", s.B, "batch");
  app.add_option("--Hq", s.Hq, "query heads");
  app.add_option("--Hkv", s.Hkv, "key/value heads");
  app.add_option("--Hd", s.Hd, "heads of the dynamic weights (Hkv or Hq)");
  app.add_option("--Lq", s.Lq, "queries");
  app.add_option("--Lk", s.Lk, "keys");
  app.add_option("--D", s.D, "head dim");
  app.add_option("--seed", seed, "random seed");
  app.add_option("--dtype", dtype, "float type")->check(CLI::IsMember({"float32", "float64"}));
  app.add_flag("--no-do", no_do, "leave out do (forward only)");
  CLI11_PARSE(app, argc, argv);
  try {
    dma::validate_shape(s, false);
    // at most 2^28 elements per tensor (checked factor by factor, so nothing overflows)
    auto too_big = [](std::initializer_list<int64_t> dims) {
      double n = 1;
      for (int64_t d : dims) n *= static_cast<double>(d);
      return n > double(int64_t{1} << 28);
    };
    if (too_big({s.B, s.Hq, s.Lq, s.D}) || too_big({s.B, s.Hkv, s.Lk, s.D}))
      throw dma::Error("shape: more than 2^28 elements in one tensor; too large for an example bundle");
    const dma::Bundle b = dtype == "float64" ? random_bundle<double>(s, seed, !no_do)
                                             : random_bundle<float>(s, seed, !no_do);
    dma::write_bundle(out, b);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dma_make_bundle: %s\n", e.what());
    return 2;
  }
  std::printf("dma_make_bundle: wrote %s\n", out.c_str());
  return 0;
}
