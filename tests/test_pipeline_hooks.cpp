// run_pipeline's hooks (dma/pipeline.hpp): p and ds kept by the cpu backend, checked against
// values recomputed here from the run's own outputs (delta, evict, lse, o) by the mask rule of
// dma/mask_rule.hpp, and the progress callback: stages in order, fractions non-decreasing, and a
// cancel that stops the run with dma::Cancelled, which is not a dma::Error.
#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <type_traits>
#include <vector>

#include "dma/mask_rule.hpp"
#include "dma/numerics.hpp"
#include "dma/pipeline.hpp"
#include "test_util.hpp"

namespace {

dma::Shape hooks_shape() {  // GQA, Lq < Lk (causal queries bottom-right), odd sizes
  dma::Shape s;
  s.B = 2; s.Hq = 4; s.Hkv = 2; s.Hd = 2; s.Lq = 19; s.Lk = 33; s.D = 8;
  return s;
}

dma::Options hooks_options(bool causal, dma::Form form) {
  dma::Options o;
  o.window = 6;
  o.causal = causal;
  o.form = form;
  return o;
}

// p and ds of the row (b, hq, i) recomputed from the inputs and the outputs r.delta, r.evict,
// r.fwd.lse and r.fwd.o, the mask from evict through the rule (not the run's explicit mask).
struct Recomputed {
  std::vector<double> p, ds;
  std::vector<uint8_t> kept;
};

Recomputed recompute(const dma::Problem<double>& pr, const dma::Result<double>& r) {
  const dma::Shape& s = pr.shape;
  const double scale = pr.opt.softmax_scale(s);
  Recomputed out;
  const size_t cells = static_cast<size_t>(s.B * s.Hq * s.Lq * s.Lk);
  out.p.assign(cells, 0.0);
  out.ds.assign(cells, 0.0);
  out.kept.assign(cells, 0);
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t h = 0; h < s.Hq; ++h) {
      const int64_t hk = s.kv_head(h), hd = s.delta_head(h);
      for (int64_t i = 0; i < s.Lq; ++i) {
        const int64_t row = (b * s.Hq + h) * s.Lq + i;
        const int64_t pos = dma::rule::query_position<int64_t>(s.Lq, s.Lk, pr.opt.causal, i);
        double D_i = 0;  // do_i . o_i
        for (int64_t d = 0; d < s.D; ++d) D_i += pr.dout[row * s.D + d] * r.fwd.o[row * s.D + d];
        for (int64_t j = 0; j < s.Lk; ++j) {
          const size_t cell = static_cast<size_t>(row * s.Lk + j);
          const int64_t e_j = r.evict[(b * s.Hd + hd) * s.Lk + j];
          if (!dma::rule::is_kept<int64_t>(j, pos, e_j)) continue;
          out.kept[cell] = 1;
          const int64_t kv = (b * s.Hkv + hk) * s.Lk + j;
          double qk = 0, dp = 0;
          for (int64_t d = 0; d < s.D; ++d) {
            qk += pr.q[row * s.D + d] * pr.k[kv * s.D + d];
            dp += pr.dout[row * s.D + d] * pr.v[kv * s.D + d];
          }
          const double logit = scale * qk + r.delta[(b * s.Hd + hd) * s.Lk + j];
          out.p[cell] = std::exp(logit - r.fwd.lse[row]);
          out.ds[cell] = out.p[cell] * (dp - D_i);
        }
      }
    }
  return out;
}

struct Call {
  std::string stage;
  double fraction;
};

// Runs with a callback that records every call and answers cancel at `cancel_at` (if given).
std::vector<Call> record_stages(const dma::Problem<double>& pr, dma::Backend backend,
                                const std::string& cancel_at = "") {
  std::vector<Call> calls;
  dma::PipelineHooks hooks;
  hooks.progress = [&](const char* stage, double fraction) {
    calls.push_back({stage, fraction});
    return calls.back().stage == cancel_at ? dma::Control::cancel : dma::Control::proceed;
  };
  dma::run_pipeline(pr, backend, {}, false, hooks);
  return calls;
}

std::vector<std::string> stage_names(const std::vector<Call>& calls) {
  std::vector<std::string> names;
  for (const Call& c : calls) names.push_back(c.stage);
  return names;
}

}  // namespace

TEST_SUITE("cpu") {

TEST_CASE("pipeline hooks: p and ds of the cpu backend against values recomputed from the outputs") {
  for (const bool causal : {true, false})
    for (const dma::Form form : {dma::Form::exp, dma::Form::linear}) {
      CAPTURE(causal);
      CAPTURE(dma::form_name(form));
      const uint64_t seed = dma_test::test_seed() + (causal ? 0 : 2) + (form == dma::Form::exp ? 0 : 1);
      const dma::Problem<double> pr = dma::random_problem<double>(hooks_shape(), hooks_options(causal, form), seed);
      const dma::Shape& s = pr.shape;
      dma::PipelineHooks hooks;
      hooks.keep_probs = hooks.keep_ds = true;
      const dma::Result<double> r = dma::run_pipeline(pr, dma::Backend::cpu, {}, true, hooks);
      const size_t cells = static_cast<size_t>(s.B * s.Hq * s.Lq * s.Lk);
      REQUIRE(r.probs.size() == cells);
      REQUIRE(r.ds.size() == cells);
      const Recomputed want = recompute(pr, r);

      CHECK(dma::max_rel_error(r.probs, want.p) <= 1e-12);
      CHECK(dma::worst_row_rel_l2(r.probs, want.p, s.Lk) <= 1e-12);
      CHECK(dma::max_rel_error(r.ds, want.ds) <= 1e-10);
      CHECK(dma::rel_l2(r.ds, want.ds) <= 1e-10);

      int64_t masked_nonzero = 0, rows_off = 0, mask_disagrees = 0;
      for (int64_t row = 0; row < s.B * s.Hq * s.Lq; ++row) {
        const int64_t b = row / (s.Hq * s.Lq), h = row / s.Lq % s.Hq, i = row % s.Lq;
        double sum = 0;
        for (int64_t j = 0; j < s.Lk; ++j) {
          const size_t cell = static_cast<size_t>(row * s.Lk + j);
          sum += r.probs[cell];
          if (!want.kept[cell]) masked_nonzero += r.probs[cell] != 0.0 || r.ds[cell] != 0.0;
          const size_t mask_cell = static_cast<size_t>(((b * s.Hd + s.delta_head(h)) * s.Lq + i) * s.Lk + j);
          mask_disagrees += r.mask[mask_cell] != want.kept[cell];
        }
        rows_off += std::abs(sum - 1.0) > 1e-12;
      }
      CHECK(masked_nonzero == 0);  // exactly 0, not merely small
      CHECK(rows_off == 0);        // every row of p is a distribution
      CHECK(mask_disagrees == 0);  // the run's explicit mask is the rule's

      // Keeping p and ds changes nothing else, bit for bit.
      const dma::Result<double> plain = dma::run_pipeline(pr, dma::Backend::cpu);
      CHECK(plain.probs.empty());
      CHECK(plain.ds.empty());
      CHECK(plain.fwd.o == r.fwd.o);
      CHECK(plain.fwd.lse == r.fwd.lse);
      CHECK(plain.grads.dq == r.grads.dq);
      CHECK(plain.grads.dv == r.grads.dv);
      CHECK(plain.grads.ddelta == r.grads.ddelta);
    }
}

TEST_CASE("pipeline hooks: ds needs the backward - the tiled backend keeps neither") {
  dma::Problem<double> pr = dma::random_problem<double>(hooks_shape(), hooks_options(true, dma::Form::exp),
                                                        dma_test::test_seed() + 10, /*with_do=*/false);
  dma::PipelineHooks hooks;
  hooks.keep_probs = hooks.keep_ds = true;
  const dma::Result<double> r = dma::run_pipeline(pr, dma::Backend::cpu, {}, true, hooks);
  CHECK(r.probs.size() == static_cast<size_t>(pr.shape.B * pr.shape.Hq * pr.shape.Lq * pr.shape.Lk));
  CHECK(r.ds.empty());  // no do, no backward, no ds
  CHECK_THROWS_WITH_AS(dma::run_pipeline(pr, dma::Backend::tiled, {}, false, hooks),
                       "hooks: p and ds are kept by the cpu backend only (the tiled one never holds them whole)",
                       dma::Error);
}

TEST_CASE("pipeline hooks: the stages in order - fractions non-decreasing from 0 to 1") {
  const dma::Problem<double> full = dma::random_problem<double>(hooks_shape(), hooks_options(true, dma::Form::exp),
                                                                dma_test::test_seed() + 20);
  dma::Problem<double> given_delta = dma::random_problem<double>(
      hooks_shape(), hooks_options(false, dma::Form::exp), dma_test::test_seed() + 21, /*with_do=*/false);
  given_delta.delta = dma::run_pipeline(full, dma::Backend::tiled, {}, false).delta;
  const dma::Problem<double>& given = given_delta;
  const std::vector<std::string> all{"dynamic weights", "mask", "forward", "backward", "done"};
  const std::vector<std::string> forward_only{"mask", "forward", "done"};
  for (const dma::Backend backend : {dma::Backend::cpu, dma::Backend::tiled}) {
    CAPTURE(dma::backend_name(backend));
    for (const auto& [problem, expected] : {std::pair{&full, all}, std::pair{&given, forward_only}}) {
      const std::vector<Call> calls = record_stages(*problem, backend);
      CHECK(stage_names(calls) == expected);
      REQUIRE(!calls.empty());
      CHECK(calls.front().fraction == 0.0);
      CHECK(calls.back().fraction == 1.0);
      for (size_t n = 1; n < calls.size(); ++n) {
        CAPTURE(calls[n].stage);
        CHECK(calls[n].fraction >= calls[n - 1].fraction);
        CHECK(calls[n].fraction <= 1.0);
      }
      // The forward and the backward are most of the work: the fractions say so.
      if (expected == all) CHECK(calls[3].fraction - calls[2].fraction > 0.2);
    }
  }
}

TEST_CASE("pipeline hooks: cancel stops at that boundary with dma::Cancelled - not a dma::Error") {
  static_assert(!std::is_base_of_v<dma::Error, dma::Cancelled>);
  static_assert(std::is_base_of_v<std::exception, dma::Cancelled>);
  const dma::Problem<double> pr = dma::random_problem<double>(hooks_shape(), hooks_options(true, dma::Form::exp),
                                                              dma_test::test_seed() + 30);
  for (const char* at : {"dynamic weights", "mask", "forward", "backward", "done"}) {
    CAPTURE(at);
    std::vector<std::string> seen;
    dma::PipelineHooks hooks;
    hooks.keep_probs = true;
    hooks.progress = [&](const char* stage, double) {
      seen.push_back(stage);
      return seen.back() == at ? dma::Control::cancel : dma::Control::proceed;
    };
    bool cancelled = false, error = false;
    try {
      dma::run_pipeline(pr, dma::Backend::cpu, {}, true, hooks);
    } catch (const dma::Error&) {
      error = true;  // must not happen: a cancel is no error
    } catch (const dma::Cancelled& c) {
      cancelled = true;
      CHECK(std::string(c.what()) == "cancelled");
    }
    CHECK(cancelled);
    CHECK_FALSE(error);
    CHECK(seen.back() == at);  // nothing ran past the boundary that cancelled
  }
  CHECK_THROWS_AS(record_stages(pr, dma::Backend::tiled, "forward"), dma::Cancelled);
  // Invalid input is still a dma::Error, reported before any stage.
  dma::Problem<double> bad = pr;
  bad.opt.window = 0;
  bool called = false;
  dma::PipelineHooks hooks;
  hooks.progress = [&](const char*, double) {
    called = true;
    return dma::Control::proceed;
  };
  CHECK_THROWS_AS(dma::run_pipeline(bad, dma::Backend::cpu, {}, true, hooks), dma::Error);
  CHECK_FALSE(called);
}

}  // TEST_SUITE
