// A shape whose q, do, o and dq hold more than 2^31 elements: 16 query heads of 128 dims over
// Lq = Lk = 1,200,007 tokens (2.46e9 elements; k and v hold half of it, below 2^31). Every offset
// into the query-side tensors must be 64-bit: a signed 32-bit element offset wraps inside head 13
// (at row 1,177,125), and heads 14 and 15 lie wholly past 2^31. (The whole of q stays below 2^32
// elements, so an unsigned 32-bit offset would not be caught here.)
//
// How it is checked without a float64 reference at that length:
//   - replicas: every pair of query heads (2k, 2k+1) gets the same q and do, every kv head the same
//     k and v, every delta head the same delta. The heads are then the same problem at different
//     offsets, so o, lse and dq of heads 14, 15 (past 2^31) equal those of heads 0, 1 bitwise, and
//     dk, dv, ddelta of kv head 7 equal kv head 0's.
//   - a prefix: with a causal mask, row i sees keys j <= i only, and which of them it keeps does not
//     depend on later keys; so rows 0..P-1 of o, lse and dq equal those of the problem cut at P,
//     which the float64 reference computes.
// It needs about 50 GB of device memory; with less it says so and checks nothing else.
#include <doctest/doctest.h>

#include <cstring>
#include <vector>

#include <cuda_runtime_api.h>

#include "dma/cuda.hpp"
#include "dma/numerics.hpp"
#include "test_cuda_util.hpp"
#include "test_util.hpp"

namespace {

namespace dc = dma::cuda;
using dma::Precision;
using dma_test::DeviceMem;
using dma_test::to_host;

// n bf16 values uniform in [lo, hi) from a xorshift stream (fast enough for 300M values).
std::vector<uint16_t> random_bf16(size_t n, uint64_t seed, float lo, float hi) {
  std::vector<uint16_t> out(n);
  uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& e : out) {
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    e = dma::to_bf16_bits(lo + (hi - lo) * float(x >> 40) * (1.0f / 16777216.0f));
  }
  return out;
}

// The first n values of bf16 bits, as doubles.
std::vector<double> first_values(const std::vector<uint16_t>& bits, size_t n) {
  std::vector<double> out(n);
  for (size_t i = 0; i < n; ++i) out[i] = dma::from_bf16_bits(bits[i]);
  return out;
}

// Bytes of one head of a (1, H, L, D) tensor of `elem`-byte values.
size_t head_bytes(int64_t L, int64_t D, size_t elem) { return size_t(L) * size_t(D) * elem; }

// Copies heads 0 .. heads_per_copy-1 of a device tensor of H heads over all the others, in turn.
void replicate(const DeviceMem& t, int64_t H, int64_t heads_per_copy, size_t bytes_per_head) {
  for (int64_t h = heads_per_copy; h < H; h += heads_per_copy)
    REQUIRE(cudaMemcpy(t.as<char>() + h * bytes_per_head, t.ptr, heads_per_copy * bytes_per_head,
                       cudaMemcpyDeviceToDevice) == cudaSuccess);
}

// Head a and head b of a float tensor (1, H, L, row) are bitwise equal.
bool heads_equal(const DeviceMem& t, int64_t a, int64_t b, size_t floats_per_head) {
  const std::vector<float> x = to_host<float>(t.as<float>() + a * floats_per_head, floats_per_head);
  const std::vector<float> y = to_host<float>(t.as<float>() + b * floats_per_head, floats_per_head);
  return std::memcmp(x.data(), y.data(), floats_per_head * sizeof(float)) == 0;
}

}  // namespace

TEST_SUITE("cuda") {
  TEST_CASE("cuda large: q, o and dq beyond 2^31 elements (16 heads x 1.2M tokens x 128)") {
    constexpr int64_t Hq = 16, Hkv = 8, L = 1200007, D = 128, w = 64, P = 300;
    const dma::Shape s = dma_test::make_shape(1, Hq, Hkv, Hkv, L, L, D);
    const dma::Options opt = dma_test::make_options(w);
    const dc::Config c{s, opt, Precision::bf16};
    REQUIRE(s.q_numel() > (int64_t{1} << 31));
    const size_t q_head = head_bytes(L, D, 2), f_head = head_bytes(L, D, 4);
    const size_t need = 2 * Hq * q_head + 2 * Hq * f_head + 2 * Hkv * q_head + 2 * Hkv * f_head +
                        dc::mask_state_bytes(c) + dc::workspace_bytes(c) + 4 * size_t(Hkv * L) * 4;
    size_t free_bytes = 0, total_bytes = 0;
    REQUIRE(cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess);
    if (free_bytes < need + (size_t(2) << 30)) {
      MESSAGE("not run: needs ", need >> 30, " GiB of device memory, ", free_bytes >> 30, " free");
      return;
    }
    const uint64_t seed = dma_test::test_seed();
    const std::vector<uint16_t> q2 = random_bf16(size_t(2 * L * D), seed + 1, -1.0f, 1.0f);  // heads 0, 1
    const std::vector<uint16_t> do2 = random_bf16(size_t(2 * L * D), seed + 2, -1.0f, 1.0f);
    const std::vector<uint16_t> k1 = random_bf16(size_t(L * D), seed + 3, -1.0f, 1.0f);     // kv head 0
    const std::vector<uint16_t> v1 = random_bf16(size_t(L * D), seed + 4, -1.0f, 1.0f);
    std::vector<float> delta1(static_cast<size_t>(L));
    {
      const std::vector<uint16_t> r = random_bf16(size_t(L), seed + 5, 0.0f, 4.0f);
      for (int64_t j = 0; j < L; ++j) delta1[size_t(j)] = dma::from_bf16_bits(r[size_t(j)]);
    }

    DeviceMem q(Hq * q_head), dout(Hq * q_head), k(Hkv * q_head), v(Hkv * q_head);
    DeviceMem delta(size_t(Hkv * L) * 4), mask_state(dc::mask_state_bytes(c)), o(Hq * f_head),
        lse(size_t(Hq * L) * 4), status(8), workspace(dc::workspace_bytes(c));
    DeviceMem dq(Hq * f_head), dk(Hkv * f_head), dv(Hkv * f_head), ddelta(size_t(Hkv * L) * 4);
    REQUIRE(cudaMemcpy(q.ptr, q2.data(), 2 * q_head, cudaMemcpyHostToDevice) == cudaSuccess);
    REQUIRE(cudaMemcpy(dout.ptr, do2.data(), 2 * q_head, cudaMemcpyHostToDevice) == cudaSuccess);
    REQUIRE(cudaMemcpy(k.ptr, k1.data(), q_head, cudaMemcpyHostToDevice) == cudaSuccess);
    REQUIRE(cudaMemcpy(v.ptr, v1.data(), q_head, cudaMemcpyHostToDevice) == cudaSuccess);
    REQUIRE(cudaMemcpy(delta.ptr, delta1.data(), size_t(L) * 4, cudaMemcpyHostToDevice) == cudaSuccess);
    replicate(q, Hq, 2, q_head);
    replicate(dout, Hq, 2, q_head);
    replicate(k, Hkv, 1, q_head);
    replicate(v, Hkv, 1, q_head);
    replicate(delta, Hkv, 1, size_t(L) * 4);

    dc::ForwardBuffers f;  // delta given: w_dt and a stay null
    f.q = q.ptr, f.k = k.ptr, f.v = v.ptr, f.delta = delta.as<float>(), f.mask_state = mask_state.ptr;
    f.o = o.as<float>(), f.lse = lse.as<float>(), f.status = status.as<int64_t>();
    dc::BackwardBuffers g;
    g.dout = dout.ptr, g.dq = dq.as<float>(), g.dk = dk.as<float>(), g.dv = dv.as<float>();
    g.ddelta = ddelta.as<float>();
    dc::forward(c, f, workspace.ptr, workspace.bytes, nullptr);
    dc::check_status(c, f.status, nullptr);
    dc::backward(c, f, g, workspace.ptr, workspace.bytes, nullptr);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);

    // Replicas: the heads past 2^31 elements equal the first ones, bitwise.
    const size_t row_floats = size_t(L * D);
    CHECK(heads_equal(o, 0, 14, row_floats));
    CHECK(heads_equal(o, 1, 15, row_floats));
    CHECK(heads_equal(dq, 0, 14, row_floats));
    CHECK(heads_equal(dq, 1, 15, row_floats));
    CHECK(heads_equal(lse, 0, 14, size_t(L)));
    CHECK(heads_equal(lse, 1, 15, size_t(L)));
    CHECK(heads_equal(dk, 0, 7, row_floats));
    CHECK(heads_equal(dv, 0, 7, row_floats));
    CHECK(heads_equal(ddelta, 0, 7, size_t(L)));

    // The prefix: rows 0..P-1 of heads 0 and 1 against the float64 reference of the problem cut at P.
    dma::Problem<double> pd;
    pd.shape = dma_test::make_shape(1, 2, 1, 1, P, P, D);
    pd.opt = opt;
    pd.k = first_values(k1, size_t(P * D));
    pd.v = first_values(v1, size_t(P * D));
    pd.delta.assign(delta1.begin(), delta1.begin() + P);
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t i = 0; i < P * D; ++i) {
        pd.q.push_back(dma::from_bf16_bits(q2[size_t(h * L * D + i)]));
        pd.dout.push_back(dma::from_bf16_bits(do2[size_t(h * L * D + i)]));
      }
    const dma::Result<double> ref = dma::run_pipeline<double>(pd, dma::Backend::cpu);
    std::vector<float> o_p, dq_p, lse_p;
    for (int64_t h = 0; h < 2; ++h) {
      const std::vector<float> oh = to_host<float>(o.as<float>() + h * row_floats, size_t(P * D));
      const std::vector<float> dqh = to_host<float>(dq.as<float>() + h * row_floats, size_t(P * D));
      const std::vector<float> lh = to_host<float>(lse.as<float>() + h * L, size_t(P));
      o_p.insert(o_p.end(), oh.begin(), oh.end());
      dq_p.insert(dq_p.end(), dqh.begin(), dqh.end());
      lse_p.insert(lse_p.end(), lh.begin(), lh.end());
    }
    const double e_o = dma::rel_l2(o_p, ref.fwd.o), e_lse = dma::rel_l2(lse_p, ref.fwd.lse),
                 e_dq = dma::rel_l2(dq_p, ref.grads.dq);
    INFO("prefix rel L2: o ", e_o, " lse ", e_lse, " dq ", e_dq);
    CHECK(e_o <= 1e-2);
    CHECK(e_lse <= 1e-4);
    CHECK(e_dq <= 2e-2);
  }
}
