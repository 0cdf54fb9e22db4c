// Decoding with a cache bounded to w entries (docs/design.md §2.10, §4 Decode): every step equals
// the matching row of the full forward, and the cache holds exactly the keys that row keeps.
#include <doctest/doctest.h>

#include <limits>
#include <string>

#include "dma/decode.hpp"
#include "test_util.hpp"

using namespace dma;
using namespace dma_test;

namespace {

// The keys the query at position t keeps, from the full forward's e_j: { j <= t : e_j >= t }.
std::vector<int64_t> kept_at(const Shape& s, const std::vector<int64_t>& evict, int64_t b, int64_t hd,
                             int64_t t) {
  std::vector<int64_t> kept;
  for (int64_t j = 0; j <= t; ++j)
    if (is_kept(j, t, evict[(b * s.Hd + hd) * s.Lk + j])) kept.push_back(j);
  return kept;
}

// evict with every never-kept key's e_j written as j-1, the way decoding reports it (it cannot
// know where the w-th key above such a key sat; any e_j < j means the same: never kept).
std::vector<int64_t> never_kept_as_previous(const Shape& s, std::vector<int64_t> evict) {
  for (int64_t n = 0; n < s.delta_numel(); ++n) {
    const int64_t j = n % s.Lk;
    if (!rule::is_ever_kept(j, evict[n])) evict[n] = j - 1;
  }
  return evict;
}

// Checks, after a step, that every sequence's cache is the kept set of its last position and
// never more than w per delta head.
template <typename T>
void check_cache_is_kept_set(const DecodeCache<T>& cache, const Shape& s,
                             const std::vector<int64_t>& full_evict) {
  for (int64_t b = 0; b < cache.config.B; ++b)
    for (int64_t hd = 0; hd < cache.config.Hd; ++hd) {
      const std::vector<int64_t> got = cache.positions(b, hd);
      REQUIRE(static_cast<int64_t>(got.size()) <= cache.config.window);
      if (cache.length[b] == 0) {
        CHECK(got.empty());
        continue;
      }
      CHECK(got == kept_at(s, full_evict, b, hd, cache.length[b] - 1));
    }
}

// Decodes p with a prompt of P tokens and compares with the full forward: o, lse to 1e-12 in
// float64, delta and evict identical, and the cache after every step.
void check_decode_equals_full(const Problem<double>& p, int64_t P) {
  CAPTURE(p.shape.B); CAPTURE(p.shape.Hq); CAPTURE(p.shape.Hkv); CAPTURE(p.shape.Hd);
  CAPTURE(p.shape.Lk); CAPTURE(p.shape.D); CAPTURE(p.opt.window); CAPTURE(P);
  const std::string form = form_name(p.opt.form);
  CAPTURE(form);
  const Result<double> full = run_pipeline(p, Backend::cpu);
  int64_t steps = 0;
  const Result<double> dec = decode_problem<double>(p, P, /*want_mask=*/true, [&](const DecodeCache<double>& c) {
    ++steps;
    check_cache_is_kept_set(c, p.shape, full.evict);
  });
  CHECK(steps == p.shape.Lk - P);
  CHECK(max_rel_error(dec.fwd.o, full.fwd.o) <= 1e-12);
  CHECK(max_rel_error(dec.fwd.lse, full.fwd.lse) <= 1e-12);
  CHECK(dec.delta == full.delta);
  CHECK(dec.evict == never_kept_as_previous(p.shape, full.evict));
  CHECK(dec.mask == full.mask);
}

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& s, const std::string& part) { return s.find(part) != std::string::npos; }

// The tokens at positions[b] of every sequence b of p (Lq = Lk); active where positions[b] >= 0.
DecodeTokens<double> tokens_for(const Problem<double>& p, const std::vector<int64_t>& positions) {
  const Shape& s = p.shape;
  DecodeTokens<double> t;
  t.q.assign(s.B * s.Hq * s.D, 0.0);
  t.k.assign(s.B * s.Hkv * s.D, 0.0);
  t.v.assign(s.B * s.Hkv * s.D, 0.0);
  t.active.assign(s.B, 0);
  for (int64_t b = 0; b < s.B; ++b) {
    if (positions[b] < 0) continue;
    t.active[b] = 1;
    const DecodeTokens<double> all = tokens_at(p, positions[b]);
    std::copy_n(all.q.begin() + b * s.Hq * s.D, s.Hq * s.D, t.q.begin() + b * s.Hq * s.D);
    std::copy_n(all.k.begin() + b * s.Hkv * s.D, s.Hkv * s.D, t.k.begin() + b * s.Hkv * s.D);
    std::copy_n(all.v.begin() + b * s.Hkv * s.D, s.Hkv * s.D, t.v.begin() + b * s.Hkv * s.D);
  }
  return t;
}

}  // namespace

TEST_SUITE("cpu") {
  TEST_CASE("decode: every step equals the full forward's row in float64 on many shapes and windows") {
    struct Case { int64_t B, Hq, Hkv, Hd, L, D; };
    const Case cases[] = {
        {1, 1, 1, 1, 17, 8},   // one head
        {2, 4, 2, 2, 23, 8},   // GQA, Hd = Hkv
        {2, 4, 2, 4, 19, 4},   // GQA, Hd = Hq: every query head its own set
        {3, 6, 3, 3, 13, 5},   // odd sizes
        {1, 2, 2, 2, 31, 16},  // Hq = Hkv
    };
    uint64_t seed = test_seed();
    for (const Case& c : cases)
      for (Form form : {Form::exp, Form::linear})
        for (int64_t w : {int64_t{1}, int64_t{2}, int64_t{5}, c.L - 1, c.L, c.L + 7})
          for (int64_t P : {int64_t{0}, int64_t{1}, c.L / 2, c.L - 1, c.L}) {
            const Shape s = make_shape(c.B, c.Hq, c.Hkv, c.Hd, c.L, c.L, c.D);
            check_decode_equals_full(random_problem<double>(s, make_options(w, true, form), ++seed, false), P);
          }
  }

  TEST_CASE("decode: ties (a = 0) make the cache a sliding window of the last w positions") {
    for (Form form : {Form::exp, Form::linear}) {  // exp: every delta 1; linear: every delta 0
      const Shape sl = make_shape(2, 4, 2, 2, 21, 21, 8);
      Problem<double> p = random_problem<double>(sl, make_options(4, true, form), test_seed() + 1, false);
      p.a.assign(p.a.size(), 0.0);
      const Result<double> full = run_pipeline(p, Backend::cpu);
      const Result<double> dec = decode_problem<double>(p, 3, false, [&](const DecodeCache<double>& c) {
        for (int64_t b = 0; b < sl.B; ++b)
          for (int64_t hd = 0; hd < sl.Hd; ++hd) {
            const int64_t t = c.length[b] - 1;
            std::vector<int64_t> window;
            for (int64_t j = std::max<int64_t>(0, t - 3); j <= t; ++j) window.push_back(j);
            CHECK(c.positions(b, hd) == window);
          }
      });
      CHECK(max_rel_error(dec.fwd.o, full.fwd.o) <= 1e-12);
      CHECK(max_rel_error(dec.fwd.lse, full.fwd.lse) <= 1e-12);
      CHECK(dec.evict == never_kept_as_previous(sl, full.evict));
    }
  }

  TEST_CASE("decode: heavily tied given delta with and without a prompt") {
    std::mt19937_64 rng(test_seed() + 2);
    std::uniform_int_distribution<int> level(0, 2);  // three values: ties everywhere
    for (int64_t Hd : {int64_t{2}, int64_t{4}}) {
      const Shape s = make_shape(2, 4, 2, Hd, 29, 29, 4);
      Problem<double> p = random_problem<double>(s, make_options(6), test_seed() + 3, false);
      p.delta.resize(s.delta_numel());
      for (double& d : p.delta) d = level(rng);
      p.w_dt.clear();
      p.a.clear();
      for (int64_t P : {int64_t{0}, int64_t{10}, int64_t{28}}) check_decode_equals_full(p, P);
    }
  }

  TEST_CASE("decode: sequences of one batch with different lengths and prompts") {
    const Shape s = make_shape(3, 4, 2, 2, 24, 24, 8);
    const Problem<double> p = random_problem<double>(s, make_options(5), test_seed() + 4, false);
    const Result<double> full = run_pipeline(p, Backend::cpu);  // row t depends on keys <= t only
    const int64_t prompt_len[] = {0, 7, 12}, total_len[] = {5, 24, 13};
    DecodeConfig config = decode_config(s, p.opt);
    DecodeCache<double> cache(config);
    for (int64_t b = 0; b < s.B; ++b) {
      cache.max_length[b] = total_len[b];
      const PrefillResult<double> pre = prefill(cache, b, prompt_of(p, b, prompt_len[b]), p.w_dt, p.a);
      for (int64_t hq = 0; hq < s.Hq; ++hq)
        for (int64_t t = 0; t < prompt_len[b]; ++t)
          CHECK(std::abs(pre.fwd.lse[hq * prompt_len[b] + t] - full.fwd.lse[(b * s.Hq + hq) * s.Lq + t]) <= 1e-12);
    }
    check_cache_is_kept_set(cache, s, full.evict);
    for (;;) {
      std::vector<int64_t> positions(s.B, -1);
      bool any = false;
      for (int64_t b = 0; b < s.B; ++b)
        if (!cache.finished(b)) { positions[b] = cache.length[b]; any = true; }
      if (!any) break;
      const DecodeOutput<double> out = step(cache, tokens_for(p, positions), p.w_dt, p.a);
      check_cache_is_kept_set(cache, s, full.evict);
      for (int64_t b = 0; b < s.B; ++b) {
        CHECK(out.position[b] == positions[b]);
        for (int64_t hq = 0; hq < s.Hq; ++hq) {
          const double* o = &out.o[(b * s.Hq + hq) * s.D];
          if (positions[b] < 0) {  // inactive: zeros
            CHECK(out.lse[b * s.Hq + hq] == 0.0);
            continue;
          }
          const int64_t row = (b * s.Hq + hq) * s.Lq + positions[b];
          CHECK(std::abs(out.lse[b * s.Hq + hq] - full.fwd.lse[row]) <= 1e-12 * std::abs(full.fwd.lse[row]) + 1e-13);
          for (int64_t d = 0; d < s.D; ++d) CHECK(std::abs(o[d] - full.fwd.o[row * s.D + d]) <= 1e-12);
        }
      }
    }
    for (int64_t b = 0; b < s.B; ++b) CHECK(cache.length[b] == total_len[b]);
    // every sequence is finished now: a step on one is an error
    std::vector<int64_t> positions(s.B, -1);
    positions[1] = 0;
    CHECK(error_of([&] { step(cache, tokens_for(p, positions), p.w_dt, p.a); }) ==
          "step: sequence 1 is finished: it reached its declared maximum length 24");
  }

  TEST_CASE("decode: a step on an empty cache and on a full cache where the new token may leave") {
    const Shape s = make_shape(1, 2, 1, 1, 6, 6, 4);
    Problem<double> p = random_problem<double>(s, make_options(3), test_seed() + 5, false);
    p.delta = {5, 4, 3, 9, 1, 2};  // given: positions 4 and 5 rank below every cached key
    p.w_dt.clear();
    p.a.clear();
    DecodeCache<double> cache(decode_config(s, p.opt));
    // empty cache: one key, so p = 1, o = v_0 and lse = scale q.k + delta
    DecodeOutput<double> out = step(cache, tokens_at(p, 0), {}, {});
    double qk = 0;
    for (int64_t d = 0; d < s.D; ++d) qk += p.q[d] * p.k[d];
    CHECK(out.lse[0] == doctest::Approx(qk / 2 + 5).epsilon(1e-14));
    for (int64_t d = 0; d < s.D; ++d) CHECK(out.o[d] == doctest::Approx(p.v[d]).epsilon(1e-14));
    CHECK(out.evicted[0] == -1);
    for (int64_t t = 1; t < 3; ++t) CHECK(step(cache, tokens_at(p, t), {}, {}).evicted[0] == -1);
    CHECK(cache.positions(0, 0) == std::vector<int64_t>{0, 1, 2});  // full
    out = step(cache, tokens_at(p, 3), {}, {});                         // delta 9 evicts position 2
    CHECK(out.evicted[0] == 2);
    CHECK(cache.positions(0, 0) == std::vector<int64_t>{0, 1, 3});
    out = step(cache, tokens_at(p, 4), {}, {});                         // delta 1: the new token leaves
    CHECK(out.evicted[0] == 4);
    CHECK(cache.positions(0, 0) == std::vector<int64_t>{0, 1, 3});
    const Result<double> full = run_pipeline(p, Backend::cpu);
    for (int64_t hq = 0; hq < s.Hq; ++hq)
      CHECK(std::abs(out.lse[hq] - full.fwd.lse[hq * s.Lq + 4]) <= 1e-12 * std::abs(full.fwd.lse[hq * s.Lq + 4]));
  }

  TEST_CASE("decode: float32 agrees with the float32 full forward") {
    const Shape s = make_shape(2, 4, 2, 4, 40, 40, 16);
    const Problem<float> p = random_problem<float>(s, make_options(9, true, Form::linear), test_seed() + 6, false);
    const Result<float> full = run_pipeline(p, Backend::cpu);
    const Result<float> dec = decode_problem(p, 11);
    CHECK(max_rel_error(dec.fwd.o, full.fwd.o) <= 1e-5);
    CHECK(max_rel_error(dec.fwd.lse, full.fwd.lse) <= 1e-5);
    CHECK(dec.evict == never_kept_as_previous(s, full.evict));
  }

  TEST_CASE("decode: bad inputs are one-line errors and leave the cache as it was") {
    const Shape s = make_shape(2, 4, 2, 2, 6, 6, 4);
    const Problem<double> p = random_problem<double>(s, make_options(3), test_seed() + 7, false);
    DecodeConfig config = decode_config(s, p.opt);

    // the config
    DecodeConfig bad = config;
    bad.Hkv = 3;
    CHECK(contains(error_of([&] { DecodeCache<double> c(bad); }), "Hq = 4 is not a multiple of Hkv = 3"));
    bad = config;
    bad.Hd = 3;
    CHECK(contains(error_of([&] { DecodeCache<double> c(bad); }), "Hd = 3 must equal Hkv = 2 or Hq = 4"));
    bad = config;
    bad.window = 0;
    CHECK(error_of([&] { DecodeCache<double> c(bad); }) == "window: w = 0 (must be >= 1)");
    bad = config;
    bad.max_length = -1;
    CHECK(contains(error_of([&] { DecodeCache<double> c(bad); }), "max_length: -1"));

    // prefill: a prompt longer than the declared maximum, sizes that do not fit, non-finite values
    config.max_length = 4;
    DecodeCache<double> cache(config);
    CHECK(error_of([&] { prefill(cache, 0, prompt_of(p, 0, 5), p.w_dt, p.a); }) ==
          "prefill: the prompt of sequence 0 has 5 tokens, more than its declared maximum length 4");
    Prompt<double> prompt = prompt_of(p, 0, 3);
    prompt.k.pop_back();
    CHECK(contains(error_of([&] { prefill(cache, 0, prompt, p.w_dt, p.a); }), "not a multiple of Hkv*D = 8"));
    prompt = prompt_of(p, 0, 3);
    prompt.v.resize(prompt.v.size() - 8);
    CHECK(error_of([&] { prefill(cache, 0, prompt, p.w_dt, p.a); }) == "v: has 16 elements, expected 24");
    prompt = prompt_of(p, 0, 3);
    prompt.q.resize(8);
    CHECK(error_of([&] { prefill(cache, 0, prompt, p.w_dt, p.a); }) == "q: has 8 elements, expected 48");
    CHECK(error_of([&] { prefill(cache, 0, prompt_of(p, 0, 3), p.w_dt, {1.0}); }) == "a: has 1 elements, expected 2");
    prompt = prompt_of(p, 0, 3);
    prompt.k[5] = std::numeric_limits<double>::infinity();
    CHECK(error_of([&] { prefill(cache, 0, prompt, p.w_dt, p.a); }) == "k[0,0,1,1] is inf (inputs must be finite)");
    prompt.q.clear();  // without q, the same check
    CHECK(error_of([&] { prefill(cache, 0, prompt, p.w_dt, p.a); }) == "k[0,1,1] is inf (inputs must be finite)");
    CHECK(error_of([&] { prefill(cache, 2, prompt_of(p, 0, 3), p.w_dt, p.a); }) ==
          "decode: sequence 2 does not exist (B = 2)");
    for (int64_t b = 0; b < s.B; ++b) CHECK(cache.length[b] == 0);  // nothing changed

    prefill(cache, 0, prompt_of(p, 0, 3), p.w_dt, p.a);
    CHECK(error_of([&] { prefill(cache, 0, prompt_of(p, 0, 3), p.w_dt, p.a); }) ==
          "prefill: sequence 0 already holds 3 tokens (reset_sequence first)");

    // step: sizes, non-finite values, a delta that overflows; the cache is unchanged after each
    const std::vector<int64_t> before = cache.positions(0, 1);
    DecodeTokens<double> tok = tokens_at(p, 3);
    tok.q.pop_back();
    CHECK(error_of([&] { step(cache, tok, p.w_dt, p.a); }) == "q: has 31 elements, expected 32");
    tok = tokens_at(p, 3);
    tok.v[8 + 3] = std::numeric_limits<double>::quiet_NaN();  // sequence 1, kv head 0, d = 3
    CHECK(error_of([&] { step(cache, tok, p.w_dt, p.a); }) == "v[1,0,3] is nan (inputs must be finite)");
    CHECK(cache.length == std::vector<int64_t>{3, 0});
    CHECK(cache.positions(0, 1) == before);
    tok.active = {1, 0};  // only sequence 0 steps: sequence 1's values are not read
    CHECK(error_of([&] { step(cache, tok, p.w_dt, p.a); }) == "");
    CHECK(cache.length == std::vector<int64_t>{4, 0});
    // exp(a * softplus(z)) overflows: z = Hkv*D = 8 with v = w_dt = 1, a = 100
    tok = tokens_at(p, 0);
    for (int64_t n = 8; n < 16; ++n) tok.v[n] = 1.0;
    tok.active = {0, 1};
    const std::vector<double> ones(p.w_dt.size(), 1.0), hot_a(p.a.size(), 100.0);
    const std::string overflow = error_of([&] { step(cache, tok, ones, hot_a); });
    CHECK(contains(overflow, "step: sequence 1, position 0: delta[0,0,0] is not finite"));
    CHECK(contains(overflow, "overflows exp"));
    CHECK(cache.length == std::vector<int64_t>{4, 0});
    CHECK(cache.positions(1, 0).empty());
    tok.active = {1, 0};  // sequence 0 is at 4 = its declared maximum
    CHECK(error_of([&] { step(cache, tok, p.w_dt, p.a); }) ==
          "step: sequence 0 is finished: it reached its declared maximum length 4");

    // finite float32 inputs whose step overflows: a named error, not a NaN
    const Problem<float> pf = random_problem<float>(s, make_options(3), test_seed() + 8, false);
    DecodeCache<float> fcache(decode_config(s, pf.opt));
    DecodeTokens<float> hot = tokens_at(pf, 0);
    for (float& x : hot.q) x = 1e20f;
    for (float& x : hot.k) x = 1e20f;
    CHECK(contains(error_of([&] { step(fcache, hot, pf.w_dt, pf.a); }), "is not finite: the step overflowed float32"));
    CHECK(fcache.length == std::vector<int64_t>{0, 0});

    // a whole problem: decode needs Lq == Lk and the causal mode
    Problem<double> rect = random_problem<double>(make_shape(1, 2, 1, 1, 4, 6, 4), make_options(3), 1, false);
    CHECK(error_of([&] { decode_problem(rect, 2); }) == "decode: needs one query per key, Lq == Lk (got Lq = 4, Lk = 6)");
    Problem<double> nc = random_problem<double>(make_shape(1, 2, 1, 1, 6, 6, 4), make_options(3, false), 1, false);
    CHECK(error_of([&] { decode_problem(nc, 2); }) == "decode: decoding is causal (got the non-causal mode)");
    CHECK(error_of([&] { decode_problem(p, 7); }) == "decode: prefill of 7 tokens, expected 0 <= P <= L = 6");
  }
}
