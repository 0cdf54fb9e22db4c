// The GPU's candidate tables against core's definition (dma::candidate_table), bitwise, and the
// backward's determinism: every gradient the same bits run after run.
#include <doctest/doctest.h>

#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "dma/candidates.hpp"
#include "dma/cuda.hpp"
#include "dma/numerics.hpp"
#include "test_cuda_util.hpp"
#include "test_util.hpp"

namespace {

namespace dc = dma::cuda;
using dma_test::DeviceMem;
using dma_test::bitwise_equal;
using dma_test::to_host;

struct TableCase {
  int64_t B, Hd, Lq, Lk, w;
  bool causal;
  int order;  // 0: random delta, 1: increasing with position, -1: decreasing, 2: ties (3 levels)
};

std::vector<float> make_delta(const TableCase& tc, std::mt19937_64& rng) {
  std::vector<float> delta(static_cast<size_t>(tc.B * tc.Hd * tc.Lk));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_int_distribution<int> level(0, 2);
  for (size_t n = 0; n < delta.size(); ++n) {
    const float j = static_cast<float>(n % static_cast<size_t>(tc.Lk));
    delta[n] = tc.order == 0   ? normal(rng)
               : tc.order == 2 ? 0.5f * static_cast<float>(level(rng))
                               : static_cast<float>(tc.order) * 1e-3f * j;
  }
  return delta;
}

}  // namespace

TEST_SUITE("cuda") {
  TEST_CASE("cuda candidate tables: bitwise equal to dma::candidate_table") {
    const TableCase cases[] = {
        {2, 2, 1000, 1000, 100, true, 0},
        {1, 3, 700, 1500, 300, true, 0},    // Lq < Lk: the first tile starts at Lk - Lq
        {1, 2, 513, 513, 1, true, 2},       // w = 1, ties; Lq not a multiple of the tile
        {1, 1, 900, 900, 200, true, 1},     // increasing delta: every tile has w + Bq candidates
        {1, 1, 900, 900, 200, true, -1},    // decreasing: the first w keys for ever
        {1, 2, 600, 700, 640, true, 0},     // w + Bq > Lk: S = Lk
        {2, 1, 300, 800, 50, false, 0},     // non-causal: one candidate set for every tile
        {1, 1, 256, 30000, 20000, true, 0}, // 20128 slots: 629 words per bitmap
        {1, 2, 300, 120000, 115000, true, 0},  // 115128 slots: the bitmaps in global memory
    };
    int n = 0;
    for (const TableCase& tc : cases) {
      const uint64_t seed = dma_test::test_seed() + 31 * ++n;
      INFO("case ", n, " (B=", tc.B, " Hd=", tc.Hd, " Lq=", tc.Lq, " Lk=", tc.Lk, " w=", tc.w,
           tc.causal ? " causal" : " non-causal", " order ", tc.order, ") seed ", seed);
      std::mt19937_64 rng(seed);
      dc::Config c;
      c.shape = dma_test::make_shape(tc.B, tc.Hd, tc.Hd, tc.Hd, tc.Lq, tc.Lk, 64);
      c.opt = dma_test::make_options(tc.w, tc.causal);
      const std::vector<float> delta = make_delta(tc, rng);
      DeviceMem d_delta(delta), mask_state(dc::mask_state_bytes(c)), status(8);
      DeviceMem workspace(dc::workspace_bytes(c));
      REQUIRE(cudaMemset(mask_state.ptr, 0x7f, mask_state.bytes) == cudaSuccess);
      REQUIRE(cudaMemset(workspace.ptr, 0x5a, workspace.bytes) == cudaSuccess);  // no zeros given
      dc::reset_status(status.as<int64_t>(), nullptr);
      dc::check_delta(c, d_delta.as<float>(), status.as<int64_t>(), nullptr);
      dc::build_mask(c, d_delta.as<float>(), mask_state.ptr, workspace.ptr, workspace.bytes, nullptr);
      dc::check_status(c, status.as<int64_t>(), nullptr);

      const dc::CandidateTables t = dc::candidate_tables_of(c, mask_state.ptr);
      REQUIRE(t.slot_key != nullptr);
      const size_t n_bh = size_t(tc.B * tc.Hd), T = size_t(t.tiles), S = size_t(t.stride);
      const std::vector<int32_t> evict = to_host<int32_t>(dc::evict_of(mask_state.ptr), n_bh * tc.Lk);
      const std::vector<int32_t> slot_key = to_host<int32_t>(t.slot_key, n_bh * T * S);
      const std::vector<int32_t> list = to_host<int32_t>(t.list, n_bh * T * S);
      const std::vector<int32_t> n_alive = to_host<int32_t>(t.n_alive, n_bh * T);
      const std::vector<int32_t> n_full = to_host<int32_t>(t.n_full, n_bh * T);
      int64_t max_alive = 0;
      for (size_t bh = 0; bh < n_bh; ++bh) {
        const std::vector<int64_t> e(evict.begin() + bh * tc.Lk, evict.begin() + (bh + 1) * tc.Lk);
        const dma::CandidateTable want =
            dma::candidate_table(e.data(), tc.Lq, tc.Lk, tc.causal, tc.w, t.tile_queries);
        REQUIRE(want.tiles == t.tiles);
        REQUIRE(want.stride == t.stride);
        CHECK(std::vector<int32_t>(slot_key.begin() + bh * T * S, slot_key.begin() + (bh + 1) * T * S) ==
              want.slot_key);
        CHECK(std::vector<int32_t>(list.begin() + bh * T * S, list.begin() + (bh + 1) * T * S) == want.list);
        CHECK(std::vector<int32_t>(n_alive.begin() + bh * T, n_alive.begin() + (bh + 1) * T) == want.n_alive);
        CHECK(std::vector<int32_t>(n_full.begin() + bh * T, n_full.begin() + (bh + 1) * T) == want.n_full);
        for (int32_t a : want.n_alive) max_alive = std::max<int64_t>(max_alive, a);
      }
      if (tc.order == 1 && tc.causal)  // the bound is reached: w + Bq - 1 (see candidates.hpp)
        CHECK(max_alive == std::min<int64_t>(tc.w + t.tile_queries - 1, tc.Lk));
    }
  }

  TEST_CASE("cuda backward: every gradient bitwise equal run after run") {
    struct Det {
      dma::Shape shape;
      dma::Options opt;
      bool delta_given;
    };
    const Det cases[] = {
        {dma_test::make_shape(1, 4, 2, 2, 700, 700, 128), dma_test::make_options(150), true},
        {dma_test::make_shape(1, 4, 2, 4, 333, 500, 64), dma_test::make_options(90), true},  // Hd = Hq
        {dma_test::make_shape(2, 2, 1, 1, 300, 300, 64), dma_test::make_options(400), true},  // dense
        {dma_test::make_shape(1, 4, 2, 2, 400, 400, 128), dma_test::make_options(100), false},
    };
    int n = 0;
    for (const Det& dt : cases) {
      const uint64_t seed = dma_test::test_seed() + 17 * ++n;
      INFO("case ", n, " seed ", seed, dt.delta_given ? " (delta given)" : " (dynamic weights)");
      dma::Problem<float> p = dma::random_problem<float>(dt.shape, dt.opt, seed);
      if (dt.delta_given) {
        std::mt19937_64 rng(seed + 3);
        p.delta = dma_test::randn<float>(rng, dt.shape.delta_numel());
        p.w_dt.clear();
        p.a.clear();
      }
      const dma::Result<float> first = dc::run_pipeline(p, dma::Precision::bf16);
      for (int rep = 0; rep < 3; ++rep) {
        const dma::Result<float> again = dc::run_pipeline(p, dma::Precision::bf16);
        CHECK(bitwise_equal(again.grads.dq, first.grads.dq));
        CHECK(bitwise_equal(again.grads.dk, first.grads.dk));
        CHECK(bitwise_equal(again.grads.ddelta, first.grads.ddelta));
        CHECK(bitwise_equal(again.grads.dv, first.grads.dv));
        if (!dt.delta_given) {
          CHECK(bitwise_equal(again.dw_dt, first.dw_dt));
          CHECK(bitwise_equal(again.da, first.da));
        }
      }
    }
  }
}
