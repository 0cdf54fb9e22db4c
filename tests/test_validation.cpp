// Bad inputs through the library: each is a dma::Error with a message naming the problem.
#include <doctest/doctest.h>

#include <limits>

#include "dma/validate.hpp"
#include "test_util.hpp"

using namespace dma;
using namespace dma_test;

namespace {

// Runs the pipeline and returns the error message ("" if it did not throw dma::Error).
std::string error_of(const Problem<double>& p) {
  try {
    run_pipeline(p, Backend::cpu);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

Problem<double> good() { return random_problem<double>(make_shape(1, 4, 2, 2, 6, 8, 4), make_options(3), test_seed()); }

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

}  // namespace

TEST_SUITE("validation") {
  TEST_CASE("a good problem runs") { CHECK(error_of(good()) == ""); }

  TEST_CASE("shape errors name the dimension") {
    Problem<double> p = good();
    p.shape.Hkv = 3;
    CHECK(contains(error_of(p), "Hq = 4 is not a multiple of Hkv = 3"));
    p = good();
    p.shape.Hd = 3;
    CHECK(contains(error_of(p), "Hd = 3 must equal Hkv = 2 or Hq = 4"));
    p = good();
    p.shape.D = 0;
    CHECK(contains(error_of(p), "D = 0"));
    p = good();
    p.shape.Lq = 9;  // causal needs Lq <= Lk
    CHECK(contains(error_of(p), "Lq <= Lk"));
    p = good();
    p.k.pop_back();
    CHECK(contains(error_of(p), "k: has"));
    p = good();
    p.dout.resize(3);
    CHECK(contains(error_of(p), "do: has 3 elements"));
  }

  TEST_CASE("window and scale") {
    Problem<double> p = good();
    for (int64_t w : {int64_t{0}, int64_t{-2}}) {
      p.opt.window = w;
      CHECK(contains(error_of(p), "window: w = " + std::to_string(w)));
    }
    p = good();
    p.opt.scale = std::numeric_limits<double>::quiet_NaN();
    CHECK(contains(error_of(p), "scale"));
  }

  TEST_CASE("non-finite inputs name the tensor and the index") {
    Problem<double> p = good();
    p.q[1 * 6 * 4 + 2 * 4 + 3] = std::numeric_limits<double>::quiet_NaN();  // q[0,1,2,3]
    CHECK(error_of(p) == "q[0,1,2,3] is nan (inputs must be finite)");
    p = good();
    p.w_dt[5] = std::numeric_limits<double>::infinity();
    CHECK(error_of(p) == "w_dt[0,5] is inf (inputs must be finite)");
    p = good();
    p.a[1] = -std::numeric_limits<double>::infinity();
    CHECK(contains(error_of(p), "a[1] is -inf"));
    p = good();
    p.dout[0] = std::numeric_limits<double>::quiet_NaN();
    CHECK(contains(error_of(p), "do[0,0,0,0] is nan"));
    p = good();
    p.delta.assign(p.shape.delta_numel(), 1.0);
    p.delta[3] = std::numeric_limits<double>::quiet_NaN();
    CHECK(contains(error_of(p), "delta[0,0,3] is nan"));
  }

  TEST_CASE("a delta that overflows in the exp form is an error and not an inf") {
    Problem<double> p = good();
    p.a.assign(p.a.size(), 1000.0);
    p.w_dt.assign(p.w_dt.size(), 1.0);
    p.v.assign(p.v.size(), 1.0);  // z = 16, a * softplus(z) = 16000: exp overflows
    const std::string msg = error_of(p);
    CHECK(contains(msg, "delta[0,0,0] is not finite"));
    CHECK(contains(msg, "overflows exp"));
    p.opt.form = Form::linear;  // the linear form has no exp to overflow
    CHECK(error_of(p) == "");
  }

  TEST_CASE("tiles must be positive") {
    Problem<double> p = good();
    TileConfig tc;
    tc.Bq = 0;
    CHECK_THROWS_WITH_AS(run_pipeline(p, Backend::tiled, tc), "tiles: Bq = 0, Bk = 64 (both must be >= 1)", Error);
  }
}
