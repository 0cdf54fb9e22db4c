// The device sees the same rule and the same numbers as the host: the mask rule of
// dma/mask_rule.hpp evaluated in a kernel (int) against the host (int64_t) on random and
// adversarial eviction positions, and the host's bf16/fp16 rounding (dma/numerics.hpp, used to
// upload inputs and to build the tests' references) against CUDA's own conversion instructions.
#include <doctest/doctest.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cfloat>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "dma/mask_rule.hpp"
#include "dma/numerics.hpp"
#include "test_cuda_util.hpp"
#include "test_util.hpp"

namespace {

// One question to the rule: key j with eviction position e, a query of Lq at index i over Lk
// keys, and a tile [p_first, p_last].
struct Query {
  int Lq, Lk, i, j, e, p_first, p_last;
  bool causal;
};
struct Answer {
  int position, kept, ever_kept, candidate, span, first, last;  // first..last: queries i..min(i+100, Lq)-1 keeping j
};

Answer ask(const Query& x) {  // host, in int64_t
  using I = int64_t;
  const I p = dma::rule::query_position<I>(x.Lq, x.Lk, x.causal, x.i);
  I first = 0, last = 0;
  const I i_end = x.i + 100 < x.Lq ? x.i + 100 : x.Lq;
  dma::rule::kept_queries<I>(x.Lq, x.Lk, x.causal, x.j, x.e, x.i, i_end, first, last);
  return {int(p), dma::rule::is_kept<I>(x.j, p, x.e), dma::rule::is_ever_kept<I>(x.j, x.e),
          dma::rule::is_candidate<I>(x.j, x.e, x.p_first),
          int(dma::rule::kept_positions<I>(x.j, x.e, x.p_first, x.p_last)), int(first), int(last)};
}

__global__ void ask_kernel(const Query* qs, Answer* as, int n) {  // device, in int
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n) return;
  const Query x = qs[t];
  const int p = dma::rule::query_position(x.Lq, x.Lk, x.causal, x.i);
  int first = 0, last = 0;
  const int i_end = x.i + 100 < x.Lq ? x.i + 100 : x.Lq;
  dma::rule::kept_queries(x.Lq, x.Lk, x.causal, x.j, x.e, x.i, i_end, first, last);
  as[t] = {p, dma::rule::is_kept(x.j, p, x.e), dma::rule::is_ever_kept(x.j, x.e),
           dma::rule::is_candidate(x.j, x.e, x.p_first),
           dma::rule::kept_positions(x.j, x.e, x.p_first, x.p_last), first, last};
}

__global__ void round_kernel(const float* x, uint16_t* bf, uint16_t* hf, int n) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= n) return;
  const __nv_bfloat16 b = __float2bfloat16_rn(x[t]);
  const __half h = __float2half_rn(x[t]);
  bf[t] = *reinterpret_cast<const uint16_t*>(&b);
  hf[t] = *reinterpret_cast<const uint16_t*>(&h);
}

bool is_nan_bf16(uint16_t h) { return (h & 0x7f80u) == 0x7f80u && (h & 0x7fu); }
bool is_nan_fp16(uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu); }

}  // namespace

TEST_SUITE("cuda") {
  TEST_CASE("cuda mask rule: device answers equal the host's on random and adversarial evict") {
    std::mt19937_64 rng(dma_test::test_seed());
    std::vector<Query> qs;
    for (int n = 0; n < 200000; ++n) {
      const int Lk = 1 + int(rng() % 3000), Lq = 1 + int(rng() % Lk);
      const bool causal = rng() % 4 != 0;
      const int i = int(rng() % Lq), j = int(rng() % Lk);
      // e_j from the places where off-by-one errors live: never kept (j - 1, -1), kept only at
      // its own position (j), to the end (Lk - 1), next to the query, or anywhere.
      const int p = causal ? i + (Lk - Lq) : Lk - 1;
      const int choices[] = {-1, j - 1, j, j + 1, Lk - 1, p - 1, p, p + 1, int(rng() % Lk)};
      const int e = choices[rng() % 9];
      const int p_first = int(rng() % Lk), p_last = p_first + int(rng() % 300);
      qs.push_back({Lq, Lk, i, j, e, p_first, p_last, causal});
    }
    const dma_test::DeviceMem d_q(qs), d_a(qs.size() * sizeof(Answer));
    ask_kernel<<<unsigned((qs.size() + 255) / 256), 256>>>(d_q.as<Query>(), d_a.as<Answer>(),
                                                          int(qs.size()));
    REQUIRE(cudaGetLastError() == cudaSuccess);
    const std::vector<Answer> got = dma_test::to_host<Answer>(d_a.ptr, qs.size());
    int64_t mismatches = 0, kept = 0, candidates = 0;
    for (size_t n = 0; n < qs.size(); ++n) {
      const Answer want = ask(qs[n]);
      mismatches += std::memcmp(&want, &got[n], sizeof(Answer)) != 0;
      kept += want.kept;
      candidates += want.candidate;
    }
    INFO("kept ", kept, " candidates ", candidates, " of ", qs.size());
    CHECK(mismatches == 0);
    CHECK(kept > 10000);  // the draw reaches both answers of each question
    CHECK(kept < int64_t(qs.size()) - 10000);
    CHECK(candidates > 10000);
  }

  TEST_CASE("cuda rounding: host bf16/fp16 bits equal CUDA's conversions, edge cases included") {
    std::mt19937_64 rng(dma_test::test_seed());
    std::vector<float> x = {0.0f, -0.0f, 1.0f, -1.0f, 65504.0f, 65519.99f, 65520.0f, -65520.0f,
                            1e5f, FLT_MAX, -FLT_MAX, INFINITY, -INFINITY, NAN, FLT_MIN,
                            1e-40f, -1e-45f, 5.96e-8f, 2.98e-8f, 2.9802322e-8f, 6.1035156e-5f,
                            6.097555e-5f, 3.3895314e38f, 1.00390625f, 1.01171875f, 1.0009765625f};
    for (int n = 0; n < 200000; ++n) {  // random bit patterns: every exponent, every tie
      const uint32_t u = uint32_t(rng());
      float f;
      std::memcpy(&f, &u, 4);
      x.push_back(f);
      const uint32_t tie = (u & 0xffff0000u) | 0x8000u, half_tie = (u & 0xffffe000u) | 0x1000u;
      std::memcpy(&f, &tie, 4);
      x.push_back(f);
      std::memcpy(&f, &half_tie, 4);
      x.push_back(f);
    }
    const dma_test::DeviceMem d_x(x), d_bf(x.size() * 2), d_hf(x.size() * 2);
    round_kernel<<<unsigned((x.size() + 255) / 256), 256>>>(d_x.as<float>(), d_bf.as<uint16_t>(),
                                                           d_hf.as<uint16_t>(), int(x.size()));
    REQUIRE(cudaGetLastError() == cudaSuccess);
    const std::vector<uint16_t> bf = dma_test::to_host<uint16_t>(d_bf.ptr, x.size());
    const std::vector<uint16_t> hf = dma_test::to_host<uint16_t>(d_hf.ptr, x.size());
    int64_t bad_bf = 0, bad_hf = 0, bad_back = 0;
    for (size_t n = 0; n < x.size(); ++n) {
      const uint16_t b = dma::to_bf16_bits(x[n]), h = dma::to_fp16_bits(x[n]);
      const bool ok_b = std::isnan(x[n]) ? is_nan_bf16(b) && is_nan_bf16(bf[n]) : b == bf[n];
      const bool ok_h = std::isnan(x[n]) ? is_nan_fp16(h) && is_nan_fp16(hf[n]) : h == hf[n];
      if (!ok_b && bad_bf++ < 5) MESSAGE("bf16 of ", x[n], ": host ", b, " device ", bf[n]);
      if (!ok_h && bad_hf++ < 5) MESSAGE("fp16 of ", x[n], ": host ", h, " device ", hf[n]);
      // and back: the float each bit pattern stands for
      if (!std::isnan(x[n]) &&
          (dma::from_bf16_bits(b) != __bfloat162float(*reinterpret_cast<const __nv_bfloat16*>(&b)) ||
           dma::from_fp16_bits(h) != __half2float(*reinterpret_cast<const __half*>(&h))))
        ++bad_back;
    }
    CHECK(bad_bf == 0);
    CHECK(bad_hf == 0);
    CHECK(bad_back == 0);
  }
}
