// The GPU decode step (dma/cuda_decode.hpp) against the CPU one (dma/decode.hpp), step after step:
// both caches start from the same prompt forward and see the same rounded tokens and the GPU's
// fp32 delta, so they must hold the same positions after every step, report the same evictions,
// and give o and lse within bf16 tolerance (relative L2 1e-2, docs/design.md §5). Outputs are
// poisoned before every step; rows of inactive sequences must come back as zeros. A cache whose
// memory holds garbage and that only prefill and reset_sequence set up steps bit for bit as one
// that reset_cache set up.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "dma/cuda_decode.hpp"
#include "dma/cuda_device.hpp"
#include "dma/decode.hpp"
#include "dma/numerics.hpp"
#include "test_cuda_util.hpp"
#include "test_util.hpp"

namespace {

namespace dc = dma::cuda;
using dma::Precision;
using dma_test::DeviceMem;
using dma_test::as_elems;
using dma_test::to_host;


struct DecodeCase {
  int64_t B, Hq, Hkv, Hd, D, w, L;
  dma::Form form;
  Precision precision;
  std::vector<int64_t> prompt;  // prompt length per sequence
  bool ties = false;            // a = 0: every delta equal, the cache is a sliding window
};

// Positions held by the device cache for (b, hd), sorted.
std::vector<int64_t> device_positions(const dc::DecodeConfig& c, const dc::DeviceCache& cache, int64_t b,
                                      int64_t hd) {
  const int64_t w = c.layer.window, bh = b * c.layer.Hd + hd;
  const int32_t count = to_host<int32_t>(cache.count + bh, 1)[0];
  REQUIRE(count >= 0);
  REQUIRE(count <= w);
  const std::vector<int32_t> pos = to_host<int32_t>(cache.pos + bh * w, size_t(count));
  std::vector<int64_t> out(pos.begin(), pos.end());
  std::sort(out.begin(), out.end());
  return out;
}

// The GPU forward over prompts (fc: Lq = Lk = P, causal), holding what prefill takes: k, v as the
// device's elements, delta and the mask state (evict_of). q, k, v (B,Hq,P,D), (B,Hkv,P,D) x2,
// rounded to fc.precision.
struct PromptForward {
  DeviceMem k, v, delta, mask_state;
  PromptForward(const dc::Config& fc, const std::vector<float>& q_in, const std::vector<float>& k_in,
                const std::vector<float>& v_in, const DeviceMem& w_dt, const DeviceMem& a)
      : k(as_elems(k_in, fc.precision)), v(as_elems(v_in, fc.precision)),
        delta(size_t(fc.shape.delta_numel()) * 4), mask_state(dc::mask_state_bytes(fc)) {
    DeviceMem q(as_elems(q_in, fc.precision)), o(size_t(fc.shape.q_numel()) * 4),
        lse(size_t(fc.shape.lse_numel()) * 4), status(8), workspace(dc::workspace_bytes(fc));
    dc::ForwardBuffers f;
    f.q = q.ptr, f.k = k.ptr, f.v = v.ptr, f.w_dt = w_dt.as<float>(), f.a = a.as<float>();
    f.delta = delta.as<float>(), f.mask_state = mask_state.ptr, f.o = o.as<float>(), f.lse = lse.as<float>();
    f.status = status.as<int64_t>();
    dc::forward(fc, f, workspace.ptr, workspace.bytes, nullptr);
    dc::check_status(fc, f.status, nullptr);  // waits: the scratch above may be freed
  }
};

// The prompt of sequence b through the GPU forward (B = 1, Lq = Lk = P), then into both caches.
void prefill_both(const DecodeCase& tc, const dma::Problem<float>& p, const dc::DecodeConfig& c,
                  const dc::DeviceCache& cache, dma::DecodeCache<float>& cpu, const DeviceMem& w_dt,
                  const DeviceMem& a, int64_t b) {
  const int64_t P = tc.prompt[b];
  dma::Prompt<float> prompt = dma::prompt_of(p, b, P);
  prompt.q.clear();
  if (P == 0) {
    dc::prefill(c, cache, b, 1, 0, nullptr, nullptr, nullptr, nullptr, nullptr);
    dma::prefill(cpu, b, prompt, p.w_dt, p.a);
    return;
  }
  const dma::Prompt<float> with_q = dma::prompt_of(p, b, P);
  const dc::Config fc{c.layer.shape(P, P), c.layer.options(), tc.precision};
  const PromptForward f(fc, with_q.q, with_q.k, with_q.v, w_dt, a);
  dc::prefill(c, cache, b, 1, P, f.k.ptr, f.v.ptr, f.delta.as<float>(), dc::evict_of(f.mask_state.ptr), nullptr);
  prompt.delta = to_host<float>(f.delta.ptr, size_t(fc.shape.delta_numel()));  // the GPU's delta
  dma::prefill(cpu, b, prompt, {}, {});
}

// Runs one case: prefill, then steps until every sequence has L tokens, some sequences sitting
// out some steps. Returns the worst relative L2 error of o.
double run_case(const DecodeCase& tc, uint64_t seed) {
  const dma::Shape s = dma_test::make_shape(tc.B, tc.Hq, tc.Hkv, tc.Hd, tc.L, tc.L, tc.D);
  const dma::Options opt = dma_test::make_options(tc.w, true, tc.form);
  dma::Problem<float> p = dma::random_problem<float>(s, opt, seed, /*with_do=*/false);
  if (tc.ties) p.a.assign(p.a.size(), 0.0f);
  p.q = dma::round_to_precision(p.q, tc.precision);  // the values the GPU computes with
  p.k = dma::round_to_precision(p.k, tc.precision);
  p.v = dma::round_to_precision(p.v, tc.precision);

  const dc::DecodeConfig c{dma::decode_config(s, opt), tc.precision};
  DeviceMem cache_mem(dc::cache_bytes(c)), workspace(dc::step_workspace_bytes(c)), status(8);
  REQUIRE(cudaMemset(cache_mem.ptr, 0xff, cache_mem.bytes) == cudaSuccess);  // unused slots: NaN
  const dc::DeviceCache cache = dc::cache_in(c, cache_mem.ptr);
  dc::reset_cache(c, cache, nullptr);
  dc::reset_status(status.as<int64_t>(), nullptr);
  DeviceMem w_dt(p.w_dt), a(p.a);
  dma::DecodeCache<float> cpu(c.layer);
  for (int64_t b = 0; b < s.B; ++b) prefill_both(tc, p, c, cache, cpu, w_dt, a, b);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t hd = 0; hd < s.Hd; ++hd) CHECK(device_positions(c, cache, b, hd) == cpu.positions(b, hd));

  DeviceMem q(size_t(s.B * s.Hq * s.D) * 2), k(size_t(s.B * s.Hkv * s.D) * 2), v(size_t(s.B * s.Hkv * s.D) * 2);
  DeviceMem active(size_t(s.B)), o(size_t(s.B * s.Hq * s.D) * 4), lse(size_t(s.B * s.Hq) * 4);
  DeviceMem delta_out(size_t(s.B * s.Hd) * 4), evicted(size_t(s.B * s.Hd) * 4);
  dc::StepBuffers sb;
  sb.q = q.ptr, sb.k = k.ptr, sb.v = v.ptr, sb.active = active.as<uint8_t>();
  sb.w_dt = w_dt.as<float>(), sb.a = a.as<float>();
  sb.o = o.as<float>(), sb.lse = lse.as<float>(), sb.delta_out = delta_out.as<float>();
  sb.evicted = evicted.as<int32_t>(), sb.status = status.as<int64_t>();
  double worst = 0;
  for (int64_t n_step = 0;; ++n_step) {
    // the tokens: sequence b at its own position; one sequence sits out every third step
    dma::DecodeTokens<float> tok;
    tok.q.assign(s.B * s.Hq * s.D, 0.0f);
    tok.k.assign(s.B * s.Hkv * s.D, 0.0f);
    tok.v.assign(s.B * s.Hkv * s.D, 0.0f);
    tok.active.assign(s.B, 0);
    bool any = false;
    for (int64_t b = 0; b < s.B; ++b) {
      const int64_t t = cpu.length[b];
      if (t >= s.Lk || (s.B > 1 && n_step % 3 == 2 && b == n_step % s.B)) continue;
      any = true;
      tok.active[b] = 1;
      const dma::DecodeTokens<float> all = dma::tokens_at(p, t);
      std::copy_n(all.q.begin() + b * s.Hq * s.D, s.Hq * s.D, tok.q.begin() + b * s.Hq * s.D);
      std::copy_n(all.k.begin() + b * s.Hkv * s.D, s.Hkv * s.D, tok.k.begin() + b * s.Hkv * s.D);
      std::copy_n(all.v.begin() + b * s.Hkv * s.D, s.Hkv * s.D, tok.v.begin() + b * s.Hkv * s.D);
    }
    if (!any) break;
    q.upload(as_elems(tok.q, tc.precision));
    k.upload(as_elems(tok.k, tc.precision));
    v.upload(as_elems(tok.v, tc.precision));
    active.upload(tok.active);
    REQUIRE(cudaMemset(o.ptr, 0xff, o.bytes) == cudaSuccess);  // NaN: every element must be written
    REQUIRE(cudaMemset(lse.ptr, 0xff, lse.bytes) == cudaSuccess);
    dc::step(c, cache, sb, workspace.ptr, workspace.bytes, nullptr);
    REQUIRE(cudaDeviceSynchronize() == cudaSuccess);

    // the CPU step on the same values and the GPU's delta
    tok.delta = to_host<float>(delta_out.ptr, size_t(s.B * s.Hd));
    for (int64_t b = 0; b < s.B; ++b)
      if (!tok.active[b])
        for (int64_t hd = 0; hd < s.Hd; ++hd) tok.delta[b * s.Hd + hd] = 0.0f;
    // the fused delta equals the standalone computation (fp32 sums in another order)
    for (int64_t b = 0; b < s.B; ++b) {
      if (!tok.active[b]) continue;
      dma::Shape one = c.layer.shape(1, 1);
      const std::vector<float> v_b(tok.v.begin() + b * s.Hkv * s.D, tok.v.begin() + (b + 1) * s.Hkv * s.D);
      const std::vector<float> want = dma::dynamic_weights(one, tc.form, v_b, p.w_dt, p.a);
      const std::vector<float> got(tok.delta.begin() + b * s.Hd, tok.delta.begin() + (b + 1) * s.Hd);
      CHECK(dma::max_rel_error(got, want) <= 1e-4);
    }
    const dma::DecodeOutput<float> want = dma::step(cpu, tok, {}, {});
    const std::vector<float> got_o = to_host<float>(o.ptr, want.o.size());
    const std::vector<float> got_lse = to_host<float>(lse.ptr, want.lse.size());
    const std::vector<int32_t> got_evicted = to_host<int32_t>(evicted.ptr, want.evicted.size());
    const double err = dma::rel_l2(got_o, want.o);
    worst = std::max(worst, err);
    CHECK(err <= 1e-2);
    CHECK(dma::worst_row_rel_l2(got_o, want.o, s.D) <= 1e-2);
    CHECK(dma::max_rel_error(got_lse, want.lse) <= 1e-3);
    CHECK(std::vector<int64_t>(got_evicted.begin(), got_evicted.end()) == want.evicted);
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t hd = 0; hd < s.Hd; ++hd) {
        const std::vector<int64_t> got_pos = device_positions(c, cache, b, hd);
        CHECK(got_pos == cpu.positions(b, hd));
        if (tc.ties && cpu.length[b] > 0) {  // a sliding window of the last w positions
          const int64_t t = cpu.length[b] - 1;
          CHECK(got_pos.front() == std::max<int64_t>(0, t - tc.w + 1));
          CHECK(got_pos.back() == t);
        }
      }
    const std::vector<int32_t> lengths = to_host<int32_t>(cache.length, size_t(s.B));
    CHECK(std::vector<int64_t>(lengths.begin(), lengths.end()) == cpu.length);
  }
  dc::check_step_status(c, status.as<int64_t>(), nullptr);
  // every step leaves its arrival counters at zero for the next one
  CHECK(to_host<int32_t>(cache.arrivals, size_t(s.B * (s.Hd + 1))) == std::vector<int32_t>(size_t(s.B * (s.Hd + 1)), 0));
  return worst;
}

}  // namespace

TEST_SUITE("cuda") {
  TEST_CASE("cuda decode: the GPU step equals the CPU step with the same cache after every step") {
    using dma::Form;
    const DecodeCase cases[] = {
        {3, 4, 2, 2, 128, 64, 300, Form::exp, Precision::bf16, {0, 100, 250}},      // GQA, Hd = Hkv
        {2, 8, 2, 8, 64, 7, 120, Form::linear, Precision::fp16, {30, 0}},          // Hd = Hq
        {1, 16, 8, 8, 128, 1, 50, Form::exp, Precision::bf16, {10}},               // w = 1
        {2, 2, 2, 2, 64, 300, 200, Form::exp, Precision::bf16, {150, 1}},          // w > L
        {2, 4, 2, 2, 128, 16, 90, Form::exp, Precision::bf16, {20, 0}, true},      // ties
        {1, 12, 1, 1, 64, 40, 90, Form::linear, Precision::bf16, {45}},            // 12 heads per set
        {2, 16, 8, 8, 128, 512, 700, Form::exp, Precision::bf16, {600, 520}},      // the benchmark's heads
        {17, 16, 1, 16, 64, 300, 330, Form::exp, Precision::bf16, {310, 305, 300, 310, 0, 301, 310, 290, 310, 309, 310, 299, 310, 250, 310, 310, 302}},
        // B*Hd = 272: one block per (b, hd), three rounds of loads per block
        {17, 20, 4, 4, 128, 512, 150, Form::exp, Precision::bf16, {140, 127, 128, 120, 149, 135, 110, 121, 130, 146, 129, 137, 126, 144, 133, 138, 131}},
        // B*Hd = 68: 4 splits of 128 slots, the first walked in two rounds of loads, the second
        // filling (some caches cross slot 128 while stepping), the others empty; 5 query heads per
        // delta head: two chunks of heads in the attention and in combine_splits
    };
    uint64_t seed = dma_test::test_seed();
    for (const DecodeCase& tc : cases) {
      CAPTURE(tc.B); CAPTURE(tc.Hq); CAPTURE(tc.Hkv); CAPTURE(tc.Hd); CAPTURE(tc.D); CAPTURE(tc.w);
      CAPTURE(tc.L);
      const double worst = run_case(tc, ++seed);
      std::fprintf(stderr, "cuda decode B=%lld Hq=%lld Hkv=%lld Hd=%lld D=%lld w=%lld L=%lld: worst rel L2 of o %.2e\n",
                   (long long)tc.B, (long long)tc.Hq, (long long)tc.Hkv, (long long)tc.Hd, (long long)tc.D,
                   (long long)tc.w, (long long)tc.L, worst);
    }
  }

  TEST_CASE("cuda decode: a bad delta is flagged and named and unsupported configs are refused") {
    dma::DecodeConfig layer;
    layer.B = 2; layer.Hq = 2; layer.Hkv = 1; layer.Hd = 1; layer.D = 32; layer.window = 8;
    dc::DecodeConfig c{layer, Precision::bf16};
    std::string err;
    try { dc::check_decode_config(c); } catch (const dma::Error& e) { err = e.what(); }
    CHECK(err == "D = 32: the CUDA decode step supports head dims 64 and 128");
    c.layer.D = 64;
    DeviceMem cache_mem(dc::cache_bytes(c)), workspace(dc::step_workspace_bytes(c)), status(8);
    const dc::DeviceCache cache = dc::cache_in(c, cache_mem.ptr);
    dc::reset_cache(c, cache, nullptr);
    dc::reset_status(status.as<int64_t>(), nullptr);
    DeviceMem q(std::vector<uint16_t>(2 * 2 * 64, dma::to_bf16_bits(0.5f)));
    DeviceMem kv(std::vector<uint16_t>(2 * 64, dma::to_bf16_bits(0.25f)));
    DeviceMem delta(std::vector<float>{1.0f, std::numeric_limits<float>::quiet_NaN()});  // sequence 1
    DeviceMem o(2 * 2 * 64 * 4), lse(2 * 2 * 4);
    dc::StepBuffers sb;
    sb.q = q.ptr, sb.k = kv.ptr, sb.v = kv.ptr, sb.delta_given = delta.as<float>();
    sb.o = o.as<float>(), sb.lse = lse.as<float>(), sb.status = status.as<int64_t>();
    dc::step(c, cache, sb, workspace.ptr, workspace.bytes, nullptr);
    err.clear();
    try { dc::check_step_status(c, status.as<int64_t>(), nullptr); } catch (const dma::Error& e) { err = e.what(); }
    CHECK(err.find("decode: the new token's delta[1,0] (sequence 1, delta head 0) is not finite") == 0);
    const std::vector<float> lse_h = to_host<float>(lse.ptr, 4);
    CHECK(lse_h[2] == 0.0f);  // the flagged sequence's heads
    CHECK(lse_h[3] == 0.0f);
    CHECK(std::isfinite(lse_h[0]));
    CHECK(to_host<int32_t>(cache.count, 2) == std::vector<int32_t>{1, 0});  // nothing written for it
    err.clear();
    try { dc::step(c, cache, sb, workspace.ptr, 16, nullptr); } catch (const dma::Error& e) { err = e.what(); }
    CHECK(err.find("the workspace has 16 bytes") != std::string::npos);
    const dc::DeviceCache unaligned = dc::cache_in(c, static_cast<char*>(cache_mem.ptr) + 8);
    err.clear();
    try { dc::reset_cache(c, unaligned, nullptr); } catch (const dma::Error& e) { err = e.what(); }
    CHECK(err == "cuda decode: cache.k is not 16-byte aligned");  // the step loads k, v 16 bytes at a time
  }

  TEST_CASE("cuda decode: sequences that only prefill or reset_sequence set up step as after reset_cache") {
    // Two caches take the same prompts and tokens: one set up as run_case does (reset_cache, then
    // prefill), one whose memory holds 0x01 in every byte (every arrival counter 0x01010101) that
    // only prefill (sequences 1 and 2, one call) and reset_sequence (sequence 0) set up. A counter
    // left non-zero keeps the last block of a (b, hd) from merging (o stays NaN) or length[b] from
    // advancing; the kernels are deterministic, so the two caches must agree bit for bit.
    const int64_t P = 150, steps = 4;  // w = 128: the prompts fill their caches; 2 splits per (b, hd)
    const dma::Shape prompt_shape = dma_test::make_shape(2, 4, 2, 2, P, P, 128);
    const dma::Options opt = dma_test::make_options(128);
    dma::Problem<float> p = dma::random_problem<float>(prompt_shape, opt, dma_test::test_seed() + 11, false);
    for (std::vector<float>* x : {&p.q, &p.k, &p.v}) *x = dma::round_to_precision(*x, Precision::bf16);
    DeviceMem w_dt(p.w_dt), a(p.a);
    const PromptForward f(dc::Config{prompt_shape, opt, Precision::bf16}, p.q, p.k, p.v, w_dt, a);

    dma::Shape s = prompt_shape;
    s.B = 3;
    const dc::DecodeConfig c{dma::decode_config(s, opt), Precision::bf16};
    DeviceMem mem_want(dc::cache_bytes(c)), mem_got(dc::cache_bytes(c));
    DeviceMem workspace(dc::step_workspace_bytes(c)), status(8);
    REQUIRE(cudaMemset(mem_want.ptr, 0xff, mem_want.bytes) == cudaSuccess);  // unused slots: NaN
    REQUIRE(cudaMemset(mem_got.ptr, 0x01, mem_got.bytes) == cudaSuccess);
    const dc::DeviceCache want_cache = dc::cache_in(c, mem_want.ptr);
    const dc::DeviceCache got_cache = dc::cache_in(c, mem_got.ptr);
    dc::reset_cache(c, want_cache, nullptr);
    dc::reset_sequence(c, got_cache, 0, nullptr);
    for (const dc::DeviceCache& cache : {want_cache, got_cache})
      dc::prefill(c, cache, 1, 2, P, f.k.ptr, f.v.ptr, f.delta.as<float>(), dc::evict_of(f.mask_state.ptr),
                  nullptr);
    dc::reset_status(status.as<int64_t>(), nullptr);

    DeviceMem q(size_t(s.B * s.Hq * s.D) * 2), k(size_t(s.B * s.Hkv * s.D) * 2), v(size_t(s.B * s.Hkv * s.D) * 2);
    DeviceMem o(size_t(s.B * s.Hq * s.D) * 4), lse(size_t(s.B * s.Hq) * 4);
    DeviceMem delta_out(size_t(s.B * s.Hd) * 4), evicted(size_t(s.B * s.Hd) * 4);
    dc::StepBuffers sb;
    sb.q = q.ptr, sb.k = k.ptr, sb.v = v.ptr, sb.w_dt = w_dt.as<float>(), sb.a = a.as<float>();
    sb.o = o.as<float>(), sb.lse = lse.as<float>(), sb.delta_out = delta_out.as<float>();
    sb.evicted = evicted.as<int32_t>(), sb.status = status.as<int64_t>();
    // What a step of one cache gives and leaves: its outputs, then count, length and the counters.
    struct Seen {
      std::vector<float> o, lse, delta;
      std::vector<int32_t> evicted, count, length, arrivals;
    };
    auto run_step = [&](const dc::DeviceCache& cache) {
      REQUIRE(cudaMemset(o.ptr, 0xff, o.bytes) == cudaSuccess);  // NaN: every element must be written
      REQUIRE(cudaMemset(lse.ptr, 0xff, lse.bytes) == cudaSuccess);
      dc::step(c, cache, sb, workspace.ptr, workspace.bytes, nullptr);
      REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
      const size_t heads = size_t(s.B * s.Hd);
      return Seen{to_host<float>(o.ptr, size_t(s.B * s.Hq * s.D)), to_host<float>(lse.ptr, size_t(s.B * s.Hq)),
                  to_host<float>(delta_out.ptr, heads), to_host<int32_t>(evicted.ptr, heads),
                  to_host<int32_t>(cache.count, heads), to_host<int32_t>(cache.length, size_t(s.B)),
                  to_host<int32_t>(cache.arrivals, heads + size_t(s.B))};
    };
    std::mt19937_64 rng(dma_test::test_seed() + 12);
    for (int64_t t = 0; t < steps; ++t) {
      CAPTURE(t);
      q.upload(as_elems(dma_test::randn<float>(rng, s.B * s.Hq * s.D), Precision::bf16));
      k.upload(as_elems(dma_test::randn<float>(rng, s.B * s.Hkv * s.D), Precision::bf16));
      v.upload(as_elems(dma_test::randn<float>(rng, s.B * s.Hkv * s.D), Precision::bf16));
      const Seen want = run_step(want_cache), got = run_step(got_cache);
      CHECK(std::none_of(want.o.begin(), want.o.end(), [](float x) { return std::isnan(x); }));
      CHECK(dma_test::bitwise_equal(got.o, want.o));
      CHECK(dma_test::bitwise_equal(got.lse, want.lse));
      CHECK(dma_test::bitwise_equal(got.delta, want.delta));
      CHECK(got.evicted == want.evicted);
      CHECK(got.count == want.count);
      CHECK(got.length == std::vector<int32_t>{int32_t(t + 1), int32_t(P + t + 1), int32_t(P + t + 1)});
      CHECK(got.arrivals == std::vector<int32_t>(size_t(s.B * (s.Hd + 1)), 0));
      for (int64_t b = 0; b < s.B; ++b)
        for (int64_t hd = 0; hd < s.Hd; ++hd)
          CHECK(device_positions(c, got_cache, b, hd) == device_positions(c, want_cache, b, hd));
    }
    dc::check_step_status(c, status.as<int64_t>(), nullptr);
  }

  TEST_CASE("cuda decode: a step captured in a CUDA graph replays as plain steps do") {
    const dma::Shape s = dma_test::make_shape(2, 4, 2, 2, 40, 40, 128);
    const dma::Options opt = dma_test::make_options(8);
    dma::Problem<float> p = dma::random_problem<float>(s, opt, dma_test::test_seed() + 7, false);
    p.k = dma::round_to_precision(p.k, Precision::bf16);
    p.v = dma::round_to_precision(p.v, Precision::bf16);
    p.q = dma::round_to_precision(p.q, Precision::bf16);
    const dc::DecodeConfig c{dma::decode_config(s, opt), Precision::bf16};
    DeviceMem cache_mem(dc::cache_bytes(c)), workspace(dc::step_workspace_bytes(c)), status(8);
    const dc::DeviceCache cache = dc::cache_in(c, cache_mem.ptr);
    dc::reset_cache(c, cache, nullptr);
    dc::reset_status(status.as<int64_t>(), nullptr);
    DeviceMem w_dt(p.w_dt), a(p.a), q(size_t(s.B * s.Hq * s.D) * 2), k(size_t(s.B * s.Hkv * s.D) * 2),
        v(size_t(s.B * s.Hkv * s.D) * 2), o(size_t(s.B * s.Hq * s.D) * 4), lse(size_t(s.B * s.Hq) * 4),
        delta_out(size_t(s.B * s.Hd) * 4);
    dc::StepBuffers sb;
    sb.q = q.ptr, sb.k = k.ptr, sb.v = v.ptr, sb.w_dt = w_dt.as<float>(), sb.a = a.as<float>();
    sb.o = o.as<float>(), sb.lse = lse.as<float>(), sb.delta_out = delta_out.as<float>();
    sb.status = status.as<int64_t>();
    cudaStream_t st;
    REQUIRE(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) == cudaSuccess);
    cudaGraph_t graph;
    REQUIRE(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal) == cudaSuccess);
    dc::step(c, cache, sb, workspace.ptr, workspace.bytes, st);  // reads the position on the device
    REQUIRE(cudaStreamEndCapture(st, &graph) == cudaSuccess);
    cudaGraphExec_t exec;
    REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
    dma::DecodeCache<float> cpu(c.layer);
    double worst = 0;
    for (int64_t t = 0; t < s.Lk; ++t) {  // from an empty cache, each replay one position further
      dma::DecodeTokens<float> tok = dma::tokens_at(p, t);
      q.upload(as_elems(tok.q, Precision::bf16));
      k.upload(as_elems(tok.k, Precision::bf16));
      v.upload(as_elems(tok.v, Precision::bf16));
      REQUIRE(cudaGraphLaunch(exec, st) == cudaSuccess);
      REQUIRE(cudaStreamSynchronize(st) == cudaSuccess);
      tok.delta = to_host<float>(delta_out.ptr, size_t(s.B * s.Hd));
      const dma::DecodeOutput<float> want = dma::step(cpu, tok, {}, {});
      worst = std::max(worst, dma::rel_l2(to_host<float>(o.ptr, want.o.size()), want.o));
      for (int64_t b = 0; b < s.B; ++b)
        for (int64_t hd = 0; hd < s.Hd; ++hd) CHECK(device_positions(c, cache, b, hd) == cpu.positions(b, hd));
    }
    CHECK(worst <= 1e-2);
    dc::check_step_status(c, status.as<int64_t>(), st);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
    cudaStreamDestroy(st);
  }
}
