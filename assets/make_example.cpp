// dma_make_example: writes the inspector's built-in example bundle, assets/example/.
//
//   dma_make_example [OUT_DIR]        (default: assets/example under the working folder)
//
// B=1, Hq=4, Hkv=2, Hd=4 (one mask per query head), Lq=Lk=256, D=64, float32, inputs q k v w_dt
// a do. Meant to be opened with w = 32, causal, form exp (the inspector's defaults for it).
//
// Random inputs give random-looking masks. To make the mask show what DMA does, some keys carry
// a strong component along a direction u in v, and w_dt of some heads reads along u, so those
// keys get a large delta and stay kept for a long time (vertical stripes), while the other keys
// come and go (a staircase of evictions):
//   u0: an "attention sink" at key 0 and every 37th key       (heads 1 and 3 read along u0)
//   u1: a "paragraph" of keys 96..127                          (head 2 reads along u1)
//   head 0 has a = 0: every delta equal, so causal DMA is exactly a sliding window of w keys.
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "dma/bundle.hpp"

int main(int argc, char** argv) {
  const std::string out = argc > 1 ? argv[1] : "assets/example";
  dma::Shape s;
  s.B = 1; s.Hq = 4; s.Hkv = 2; s.Hd = 4; s.Lq = 256; s.Lk = 256; s.D = 64;
  const int64_t F = s.Hkv * s.D;  // length of vflat and of a row of w_dt

  std::mt19937_64 rng(20250802);  // fixed: the committed files are reproducible
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto noise = [&](int64_t n, float sd) {
    std::vector<float> x(static_cast<size_t>(n));
    for (float& e : x) e = sd * normal(rng);
    return x;
  };

  // Two unit directions in vflat space.
  std::vector<std::vector<float>> u(2, std::vector<float>(static_cast<size_t>(F)));
  for (auto& dir : u) {
    float norm = 0;
    for (float& e : dir) { e = normal(rng); norm += e * e; }
    for (float& e : dir) e /= std::sqrt(norm);
  }

  std::vector<float> q = noise(s.q_numel(), 1.0f), k = noise(s.kv_numel(), 1.0f);
  std::vector<float> v = noise(s.kv_numel(), 0.25f), dout = noise(s.q_numel(), 1.0f);
  // v[0,hk,j,:] is the slice hk of vflat[j]: add the salient components there.
  for (int64_t j = 0; j < s.Lk; ++j) {
    const float along0 = (j == 0 ? 2.6f : j % 37 == 0 ? 2.2f : 0.0f);
    const float along1 = (j >= 96 && j < 128) ? 1.6f + 0.02f * static_cast<float>(j - 96) : 0.0f;
    for (int64_t hk = 0; hk < s.Hkv; ++hk)
      for (int64_t d = 0; d < s.D; ++d)
        v[(hk * s.Lk + j) * s.D + d] += along0 * u[0][hk * s.D + d] + along1 * u[1][hk * s.D + d];
  }

  // w_dt[h] reads along one direction (plus a little noise so the other keys are ranked too).
  std::vector<float> w_dt = noise(s.Hd * F, 0.15f);
  const int reads[4] = {0, 0, 1, 0};
  const float gain[4] = {1.0f, 1.5f, 1.5f, 1.5f};
  for (int64_t h = 0; h < s.Hd; ++h)
    for (int64_t f = 0; f < F; ++f) w_dt[h * F + f] += gain[h] * u[reads[h]][f];
  const std::vector<float> a = {0.0f, 0.25f, 0.4f, 0.55f};

  dma::Bundle b;
  b.arrays["q"] = dma::make_npy(q, {s.B, s.Hq, s.Lq, s.D});
  b.arrays["k"] = dma::make_npy(k, {s.B, s.Hkv, s.Lk, s.D});
  b.arrays["v"] = dma::make_npy(v, {s.B, s.Hkv, s.Lk, s.D});
  b.arrays["w_dt"] = dma::make_npy(w_dt, {s.Hd, F});
  b.arrays["a"] = dma::make_npy(a, {s.Hd});
  b.arrays["do"] = dma::make_npy(dout, {s.B, s.Hq, s.Lq, s.D});
  try {
    dma::write_bundle(out, b);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "dma_make_example: %s\n", e.what());
    return 1;
  }
  std::printf("wrote %s (B=1 Hq=4 Hkv=2 Hd=4 Lq=Lk=256 D=64; open with w=32)\n", out.c_str());
  return 0;
}
