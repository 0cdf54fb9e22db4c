// The device-pointer API (dma/cuda_device.hpp) as model code uses it: caller-owned buffers, the
// caller's stream, one workspace. Run twice on the same buffers it allocates nothing, it can be
// captured into a CUDA graph (which refuses allocations, host copies and synchronization), and it
// gives what the host wrapper dma::cuda::run_pipeline gives, bitwise: no output is summed with
// atomics, so every run adds in the same order.
#include <doctest/doctest.h>

#include <cstring>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "dma/cuda.hpp"
#include "dma/numerics.hpp"
#include "test_cuda_util.hpp"
#include "test_util.hpp"

namespace {

using dma::Precision;
namespace dc = dma::cuda;

using dma_test::DeviceMem;
using dma_test::as_elems;
using dma_test::bitwise_equal;
using dma_test::to_host;


// All buffers of one problem, owned by the test as a model would own them.
struct Buffers {
  DeviceMem q, k, v, dout, w_dt, a, delta, mask_state, o, lse, status, workspace;
  DeviceMem dq, dk, dv, ddelta, dw_dt, da;
  dc::ForwardBuffers f;
  dc::BackwardBuffers g;

  Buffers(const dc::Config& c, const dma::Problem<float>& p)
      : q(p.q.size() * 2), k(p.k.size() * 2), v(p.v.size() * 2), dout(p.dout.size() * 2),
        w_dt(p.w_dt.size() * 4), a(p.a.size() * 4), delta(size_t(c.shape.delta_numel()) * 4),
        mask_state(dc::mask_state_bytes(c)), o(size_t(c.shape.q_numel()) * 4),
        lse(size_t(c.shape.lse_numel()) * 4), status(8), workspace(dc::workspace_bytes(c)),
        dq(size_t(c.shape.q_numel()) * 4), dk(size_t(c.shape.kv_numel()) * 4),
        dv(size_t(c.shape.kv_numel()) * 4), ddelta(size_t(c.shape.delta_numel()) * 4),
        dw_dt(p.w_dt.size() * 4), da(p.a.size() * 4) {
    q.upload(as_elems(p.q, c.precision));
    k.upload(as_elems(p.k, c.precision));
    v.upload(as_elems(p.v, c.precision));
    dout.upload(as_elems(p.dout, c.precision));
    if (p.delta_given()) {
      delta.upload(p.delta);
    } else {
      w_dt.upload(p.w_dt);
      a.upload(p.a);
    }
    f.q = q.ptr, f.k = k.ptr, f.v = v.ptr;
    f.w_dt = w_dt.as<float>(), f.a = a.as<float>();
    f.delta = delta.as<float>(), f.mask_state = mask_state.ptr;
    f.o = o.as<float>(), f.lse = lse.as<float>(), f.status = status.as<int64_t>();
    g.dout = dout.ptr;
    g.dq = dq.as<float>(), g.dk = dk.as<float>(), g.dv = dv.as<float>();
    g.ddelta = ddelta.as<float>(), g.dw_dt = dw_dt.as<float>(), g.da = da.as<float>();
  }
  // NaN in every float output (and delta when it is computed), 0x7f in the mask state.
  void poison(bool delta_given) {
    for (DeviceMem* m : {&o, &lse, &dq, &dk, &dv, &ddelta, &dw_dt, &da})
      if (m->bytes) REQUIRE(cudaMemset(m->ptr, 0xff, m->bytes) == cudaSuccess);
    if (!delta_given) REQUIRE(cudaMemset(delta.ptr, 0xff, delta.bytes) == cudaSuccess);
    REQUIRE(cudaMemset(mask_state.ptr, 0x7f, mask_state.bytes) == cudaSuccess);
  }
};

// What the wrapper returned against what the buffers hold now.
void check_against(const dc::Config& c, const Buffers& b, const dma::Result<float>& r,
                   bool delta_given) {
  const dma::Shape& s = c.shape;
  const size_t delta_n = size_t(s.delta_numel()), q_n = size_t(s.q_numel()), kv_n = size_t(s.kv_numel());
  CHECK(bitwise_equal(to_host<float>(b.delta.ptr, delta_n), r.delta));
  const std::vector<int32_t> evict = to_host<int32_t>(dc::evict_of(b.mask_state.ptr), delta_n);
  CHECK(std::vector<int64_t>(evict.begin(), evict.end()) == r.evict);
  CHECK(bitwise_equal(to_host<float>(b.o.ptr, q_n), r.fwd.o));
  CHECK(bitwise_equal(to_host<float>(b.lse.ptr, size_t(s.lse_numel())), r.fwd.lse));
  CHECK(bitwise_equal(to_host<float>(b.dq.ptr, q_n), r.grads.dq));
  CHECK(bitwise_equal(to_host<float>(b.dk.ptr, kv_n), r.grads.dk));
  CHECK(bitwise_equal(to_host<float>(b.dv.ptr, kv_n), r.grads.dv));
  CHECK(bitwise_equal(to_host<float>(b.ddelta.ptr, delta_n), r.grads.ddelta));
  if (!delta_given) {
    CHECK(bitwise_equal(to_host<float>(b.dw_dt.ptr, r.dw_dt.size()), r.dw_dt));
    CHECK(bitwise_equal(to_host<float>(b.da.ptr, r.da.size()), r.da));
  }
}

struct ApiCase {
  dma::Shape shape;
  dma::Options opt;
  Precision precision;
  bool delta_given;
};

}  // namespace

TEST_SUITE("cuda") {
  TEST_CASE("cuda device API: twice on the same buffers, in a graph, equal to the host wrapper") {
    const ApiCase cases[] = {
        {dma_test::make_shape(2, 4, 2, 2, 300, 300, 128), dma_test::make_options(64), Precision::bf16, false},
        {dma_test::make_shape(1, 4, 2, 4, 200, 450, 64), dma_test::make_options(500, true, dma::Form::linear),
         Precision::fp16, false},
        {dma_test::make_shape(1, 2, 1, 1, 150, 260, 64), dma_test::make_options(40, false), Precision::bf16, true},
    };
    int n = 0;
    for (const ApiCase& ac : cases) {
      const uint64_t seed = dma_test::test_seed() + 101 * ++n;
      INFO("case ", n, " seed ", seed);
      dma::Problem<float> p = dma::random_problem<float>(ac.shape, ac.opt, seed);
      for (auto* t : {&p.q, &p.k, &p.v, &p.dout}) *t = dma::round_to_precision(*t, ac.precision);
      if (ac.delta_given) {
        std::mt19937_64 rng(seed + 7);
        p.delta = dma_test::randn<float>(rng, ac.shape.delta_numel());
        p.w_dt.clear();
        p.a.clear();
      }
      const dma::Result<float> want = dc::run_pipeline(p, ac.precision);

      dc::Config c;
      c.shape = ac.shape;
      c.opt = ac.opt;
      c.precision = ac.precision;
      Buffers b(c, p);
      if (ac.delta_given) b.f.w_dt = nullptr, b.f.a = nullptr;
      cudaStream_t st{};
      REQUIRE(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking) == cudaSuccess);
      const dc::Stream stream = st;
      REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
      size_t free_before = 0, free_after = 0, total = 0;

      // Twice on the same buffers: every output rewritten from the poison, nothing allocated.
      for (int rep = 0; rep < 2; ++rep) {
        b.poison(ac.delta_given);
        if (rep == 1) REQUIRE(cudaMemGetInfo(&free_before, &total) == cudaSuccess);
        dc::forward(c, b.f, b.workspace.ptr, b.workspace.bytes, stream);
        dc::backward(c, b.f, b.g, b.workspace.ptr, b.workspace.bytes, stream);
        dc::check_status(c, b.f.status, stream);
        if (rep == 1) REQUIRE(cudaMemGetInfo(&free_after, &total) == cudaSuccess);
        check_against(c, b, want, ac.delta_given);
      }
      CHECK(free_after == free_before);

      // Captured into a graph (global capture mode: any allocation, synchronous copy or stream
      // synchronization inside the calls would fail the capture) and replayed twice.
      cudaGraph_t graph{};
      cudaGraphExec_t exec{};
      b.poison(ac.delta_given);
      REQUIRE(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal) == cudaSuccess);
      dc::forward(c, b.f, b.workspace.ptr, b.workspace.bytes, stream);
      dc::backward(c, b.f, b.g, b.workspace.ptr, b.workspace.bytes, stream);
      REQUIRE(cudaStreamEndCapture(st, &graph) == cudaSuccess);
      REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
      for (int rep = 0; rep < 2; ++rep) {
        REQUIRE(cudaGraphLaunch(exec, st) == cudaSuccess);
        dc::check_status(c, b.f.status, stream);
        check_against(c, b, want, ac.delta_given);
        b.poison(ac.delta_given);
      }
      cudaGraphExecDestroy(exec);
      cudaGraphDestroy(graph);
      cudaStreamDestroy(st);
    }
  }

  TEST_CASE("cuda device API: a bad delta is reported through the status word, with its index") {
    dc::Config c;
    c.shape = dma_test::make_shape(1, 2, 1, 2, 64, 64, 64);
    c.opt = dma_test::make_options(8);
    dma::Problem<float> p = dma::random_problem<float>(c.shape, c.opt, dma_test::test_seed());
    std::mt19937_64 rng(dma_test::test_seed() + 1);
    p.delta = dma_test::randn<float>(rng, c.shape.delta_numel());
    Buffers b(c, p);
    b.f.w_dt = nullptr, b.f.a = nullptr;
    for (const float bad : {NAN, INFINITY, 3e38f}) {
      std::vector<float> delta = p.delta;
      delta[64 + 5] = bad;  // (b, h, j) = (0, 1, 5)
      delta[64 + 9] = bad;  // a later one: the first is named
      b.delta.upload(delta);
      dc::forward(c, b.f, b.workspace.ptr, b.workspace.bytes, nullptr);
      CHECK_THROWS_WITH_AS(dc::check_status(c, b.f.status, nullptr),
                           doctest::Contains("delta[0,1,5] is not finite or beyond float32 range"),
                           dma::Error);
    }
    b.delta.upload(p.delta);  // all good again: forward() reset the status
    dc::forward(c, b.f, b.workspace.ptr, b.workspace.bytes, nullptr);
    CHECK_NOTHROW(dc::check_status(c, b.f.status, nullptr));
  }

  TEST_CASE("cuda device API: argument errors are dma::Error before anything runs") {
    dc::Config c;
    c.shape = dma_test::make_shape(1, 2, 1, 1, 32, 32, 64);
    c.opt = dma_test::make_options(8);
    const size_t ws = dc::workspace_bytes(c);
    DeviceMem delta(size_t(c.shape.delta_numel()) * 4), mask(dc::mask_state_bytes(c)), work(ws);
    CHECK_THROWS_WITH_AS(dc::build_mask(c, delta.as<float>(), mask.ptr, work.ptr, ws - 1, nullptr),
                         doctest::Contains("the workspace has"), dma::Error);
    CHECK_THROWS_WITH_AS(dc::build_mask(c, nullptr, mask.ptr, work.ptr, ws, nullptr),
                         "cuda: delta is a null pointer", dma::Error);
    dc::Config bad = c;
    bad.shape.D = 96;
    CHECK_THROWS_WITH_AS(dc::workspace_bytes(bad), "D = 96: the CUDA backend supports head dims 32, 64, 128 and 256",
                         dma::Error);
    bad = c;
    bad.opt.window = 0;
    CHECK_THROWS_AS(dc::check_config(bad), dma::Error);
  }
}
