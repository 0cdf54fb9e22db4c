// Uses an installed DMA: the tiled and cpu backends on one random float64 problem must agree to
// 1e-12; with dma::cuda, asks whether a device is there (no device needed). Prints PASS, exits 0.
#include <cstdio>
#include <string>
#include <vector>

#include "dma/numerics.hpp"
#include "dma/pipeline.hpp"
#ifdef CONSUMER_HAVE_CUDA
#include "dma/cuda.hpp"
#endif

int main() {
  const dma::Shape s{2, 4, 2, 2, 24, 40, 16};  // B Hq Hkv Hd Lq Lk D
  dma::Options opt;
  opt.window = 9;
  const dma::Problem<double> p = dma::random_problem<double>(s, opt, /*seed=*/7);
  dma::TileConfig tc;
  tc.Bq = 8;
  tc.Bk = 8;
  const dma::Result<double> cpu = dma::run_pipeline(p, dma::Backend::cpu);
  const dma::Result<double> tiled = dma::run_pipeline(p, dma::Backend::tiled, tc);

  const struct { const char* name; const std::vector<double>& got; const std::vector<double>& ref; }
      tensors[] = {{"delta", tiled.delta, cpu.delta},   {"o", tiled.fwd.o, cpu.fwd.o},
                   {"lse", tiled.fwd.lse, cpu.fwd.lse}, {"dq", tiled.grads.dq, cpu.grads.dq},
                   {"dk", tiled.grads.dk, cpu.grads.dk}, {"dv", tiled.grads.dv, cpu.grads.dv},
                   {"ddelta", tiled.grads.ddelta, cpu.grads.ddelta},
                   {"dw_dt", tiled.dw_dt, cpu.dw_dt},    {"da", tiled.da, cpu.da}};
  bool ok = tiled.evict == cpu.evict && !cpu.evict.empty();
  if (!ok) std::printf("evict: tiled and cpu differ\n");
  for (const auto& t : tensors) {
    const double err = dma::max_rel_error(t.got, t.ref);
    const bool good = !t.ref.empty() && err <= 1e-12;
    std::printf("%-7s max rel error %.3g%s\n", t.name, err, good ? "" : "  FAIL");
    ok = ok && good;
  }
#ifdef CONSUMER_HAVE_CUDA
  std::string why;
  const bool device = dma::cuda::device_available(&why);
  std::printf("dma::cuda: device %s\n", device ? "available" : ("not available: " + why).c_str());
#endif
  std::printf("%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
