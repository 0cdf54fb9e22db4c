#include "compute.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <random>
#include <tuple>

#include "dma/validate.hpp"
#ifdef DMA_INSPECTOR_CUDA
#include "dma/cuda.hpp"
#endif

namespace dma::viewer {

// ---- labels ----------------------------------------------------------------------------------

const char* backend_label(BackendId b) {
  switch (b) {
    case BackendId::reference: return "reference";
    case BackendId::tiled_dense: return "tiled dense";
    case BackendId::tiled_skip: return "tiled skip";
    case BackendId::tiled_gather: return "tiled gather";
    case BackendId::cuda: return "CUDA";
  }
  return "?";
}

const char* backend_help(BackendId b) {
  switch (b) {
    case BackendId::reference:
      return "The scalar reference: explicit (Lq x Lk) mask, one query at a time. The heatmaps\n"
             "come from it, because it alone can hand out the probabilities p and ds.\n"
             "Its time includes keeping p and ds.";
    case BackendId::tiled_dense:
      return "Tiled CPU version, every tile a causal kernel visits, the mask applied inside.\n"
             "The baseline the speedups are measured against.";
    case BackendId::tiled_skip:
      return "Tiled, leaving out tiles that hold no kept key (exact: their p is 0).\n"
             "Pays on structured delta; on random delta almost every tile holds a kept key.";
    case BackendId::tiled_gather:
      return "Tiled, each query tile first gathers its candidate keys (at most w + Bq) and runs\n"
             "dense tile math on the compacted set: the work falls to the true density.";
    case BackendId::cuda:
      return "The CUDA kernels (bf16 inputs, fp32 accumulation), when built with CUDA and a GPU\n"
             "is present. Times are GPU events.";
  }
  return "";
}

// ---- params ----------------------------------------------------------------------------------

bool Params::operator==(const Params& o) const {
  return std::tie(source, B, Lq, Lk, Hq, Hkv, D, hd_is_hq, window, causal, form, seed, a, Bq, Bk,
                  run, bf16_inputs) ==
         std::tie(o.source, o.B, o.Lq, o.Lk, o.Hq, o.Hkv, o.D, o.hd_is_hq, o.window, o.causal,
                  o.form, o.seed, o.a, o.Bq, o.Bk, o.run, o.bf16_inputs);
}

float round_bf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7f800000u) == 0x7f800000u) return x;  // inf and NaN stay as they are
  u += 0x7fffu + ((u >> 16) & 1u);                  // round to nearest, ties to even
  u &= 0xffff0000u;
  std::memcpy(&x, &u, 4);
  return x;
}

std::vector<float> default_a(int Hd) {
  std::vector<float> a(static_cast<size_t>(std::max(Hd, 1)));
  for (int h = 0; h < Hd; ++h) a[h] = Hd > 1 ? 0.6f * static_cast<float>(h) / (Hd - 1) : 0.3f;
  return a;
}

// ---- bundles ---------------------------------------------------------------------------------

namespace {

using Clock = std::chrono::steady_clock;
double ms_since(Clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
}

std::vector<int64_t> npy_to_i64(const NpyArray& a) {
  std::vector<int64_t> out(static_cast<size_t>(a.numel()));
  if (a.dtype == DType::i64) {
    std::copy_n(reinterpret_cast<const int64_t*>(a.data.data()), out.size(), out.data());
  } else if (a.dtype == DType::i32) {
    const auto* p = reinterpret_cast<const int32_t*>(a.data.data());
    for (size_t i = 0; i < out.size(); ++i) out[i] = p[i];
  } else {
    throw Error("evict: expected int64, got " + std::string(dtype_name(a.dtype)));
  }
  return out;
}

double rel_max_diff(const std::vector<float>& x, const std::vector<float>& ref) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < ref.size() && i < x.size(); ++i) {
    diff = std::max(diff, std::fabs(static_cast<double>(x[i]) - ref[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(ref[i])));
  }
  return diff / std::max(scale, 1e-30);
}

double rel_l2(const std::vector<float>& x, const std::vector<float>& ref) {
  double diff = 0, norm = 0;
  for (size_t i = 0; i < ref.size() && i < x.size(); ++i) {
    const double d = static_cast<double>(x[i]) - ref[i];
    diff += d * d;
    norm += static_cast<double>(ref[i]) * ref[i];
  }
  return std::sqrt(diff / std::max(norm, 1e-60));
}

}  // namespace

std::shared_ptr<BundleData> load_bundle_data(const std::string& dir, const std::string& label) {
  auto d = std::make_shared<BundleData>();
  d->dir = dir;
  d->label = label;
  d->bundle = read_bundle(dir);
  Bundle& b = d->bundle;
  d->has_stored_outputs = b.has("o");

  // A bundle written by dma_run holds delta as an output. Recompute it when w_dt and a are there
  // (so the a controls work) and keep the stored one for the comparison; without them, delta is
  // the given input (DESIGN.md §4).
  d->delta_given = b.has("delta") && !(b.has("w_dt") && b.has("a"));
  Options opt;
  opt.window = 1;
  opt.causal = false;  // only to read the shape: non-causal accepts Lq > Lk too
  Bundle inputs = b;
  if (!d->delta_given) inputs.arrays.erase("delta");
  const Problem<float> p = problem_from_bundle<float>(inputs, opt);
  d->shape = p.shape;
  d->a = p.a;
  const Shape& s = d->shape;

  // Infer how the stored outputs were computed, so that opening a dma_run bundle shows the same.
  d->window = static_cast<int>(std::min<int64_t>(32, s.Lk));
  d->causal = s.Lq <= s.Lk;  // causal needs Lq <= Lk
  // Stored outputs are read by index below: their shapes must be the inputs' (a hostile or mixed-up
  // bundle would otherwise read out of bounds).
  auto expect_shape = [&](const char* name, const std::vector<int64_t>& shape) {
    if (b.has(name) && b.arrays.at(name).shape != shape)
      throw Error(std::string(name) + ": shape does not match the inputs' (expected B, " +
                  (std::string(name) == "mask" ? "Hd, Lq, Lk)" : std::string(name) == "lse" ? "Hq, Lq)" : "Hd, Lk)"));
  };
  expect_shape("evict", {s.B, s.Hd, s.Lk});
  expect_shape("mask", {s.B, s.Hd, s.Lq, s.Lk});
  expect_shape("delta", {s.B, s.Hd, s.Lk});
  expect_shape("lse", {s.B, s.Hq, s.Lq});
  std::vector<int64_t> evict;
  if (b.has("evict")) {
    // The last query sees every key (causal or not), and keeps min(w, Lk) of them: those with
    // e_j = Lk - 1. So the count of such keys is w, unless w >= Lk.
    evict = npy_to_i64(b.arrays.at("evict"));
    int64_t kept_by_last = 0;
    for (int64_t j = 0; j < s.Lk; ++j) kept_by_last += evict[j] >= s.Lk - 1;
    d->window = static_cast<int>(kept_by_last);
    d->notes += "window " + std::to_string(kept_by_last) + " from evict; ";
  }
  if (b.has("mask") && b.arrays.at("mask").dtype == DType::u8) {
    // A kept key beyond p_i of the causal rule means the bundle was computed non-causally.
    const auto& m = b.arrays.at("mask");
    const uint8_t* mk = m.data.data();
    bool beyond = false;
    for (int64_t i = 0; i < s.Lq && !beyond; ++i)
      for (int64_t j = std::max<int64_t>(0, i + (s.Lk - s.Lq) + 1); j < s.Lk; ++j)
        if (mk[i * s.Lk + j]) { beyond = true; break; }
    d->causal = !beyond;
    d->notes += beyond ? "non-causal from mask; " : "causal from mask; ";
  }
  if (b.has("delta") && !d->delta_given) {
    // Which form reproduces the stored delta?
    const std::vector<float> stored = npy_to_float<float>(b.arrays.at("delta"), "delta");
    double best = 1e300;
    for (Form f : {Form::exp, Form::linear}) {
      try {
        const double e = rel_max_diff(dynamic_weights(s, f, p.v, p.w_dt, p.a), stored);
        if (e < best) { best = e; d->form = f; }
      } catch (const Error&) {  // exp may overflow where linear does not
      }
    }
    d->notes += std::string("form ") + form_name(d->form) + " from delta; ";
  }
  if (!b.has("mask") && b.has("lse") && !evict.empty() && s.Lq <= s.Lk) {
    // No mask (too large for dma_run to write, or left out): evict is the same formula causal or
    // not, so ask the stored lse which of the two runs it came from.
    std::vector<float> delta = p.delta;
    if (delta.empty())
      delta = b.has("delta") ? npy_to_float<float>(b.arrays.at("delta"), "delta")
                             : dynamic_weights(s, d->form, p.v, p.w_dt, p.a);
    const std::vector<float> lse = npy_to_float<float>(b.arrays.at("lse"), "lse");
    double best = 1e300;
    for (bool causal : {true, false}) {
      Options o;
      o.window = std::max(d->window, 1);
      o.causal = causal;
      const double e = rel_max_diff(tiled_forward(s, o, TileConfig{}, p.q, p.k, p.v, delta, evict).lse, lse);
      if (e < best) { best = e; d->causal = causal; }
    }
    d->notes += d->causal ? "causal from lse; " : "non-causal from lse; ";
  }
  if (!d->has_stored_outputs) d->notes += "inputs only";
  return d;
}

namespace {

Problem<float> make_inputs(const Params& prm, const BundleData* data);

// The inputs, rounded to bf16 where the CUDA kernels round them (q, k, v, do) if asked.
Problem<float> make_problem(const Params& prm, const BundleData* data) {
  Problem<float> p = make_inputs(prm, data);
  if (prm.bf16_inputs)
    for (std::vector<float>* t : {&p.q, &p.k, &p.v, &p.dout})
      for (float& x : *t) x = round_bf16(x);
  return p;
}

Problem<float> make_inputs(const Params& prm, const BundleData* data) {
  Problem<float> p;
  Options opt;
  opt.window = prm.window;
  opt.causal = prm.causal;
  opt.form = prm.form;
  if (prm.source != Source::random && data) {
    Bundle inputs = data->bundle;
    if (!data->delta_given) inputs.arrays.erase("delta");
    for (const char* out : {"evict", "mask", "o", "lse", "dq", "dk", "dv", "ddelta", "dw_dt", "da"})
      inputs.arrays.erase(out);
    p = problem_from_bundle<float>(inputs, opt);
    p.opt = opt;
    if (!p.delta_given() && prm.a.size() == p.a.size()) p.a = prm.a;
    return p;
  }
  Shape& s = p.shape;
  s.B = prm.B; s.Hq = prm.Hq; s.Hkv = prm.Hkv; s.Hd = prm.Hd();
  s.Lq = prm.Lq; s.Lk = prm.Lk; s.D = prm.D;
  p.opt = opt;
  validate_shape(s, opt.causal);  // before allocating anything
  std::mt19937 rng(prm.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto fill = [&](std::vector<float>& t, int64_t n, float sd) {
    t.resize(static_cast<size_t>(n));
    for (float& x : t) x = sd * normal(rng);
  };
  fill(p.q, s.q_numel(), 1.0f);
  fill(p.k, s.kv_numel(), 1.0f);
  fill(p.v, s.kv_numel(), 1.0f);
  fill(p.w_dt, s.w_dt_numel(), 1.0f / std::sqrt(static_cast<float>(s.Hkv * s.D)));
  fill(p.dout, s.q_numel(), 1.0f);
  p.a = prm.a.size() == static_cast<size_t>(s.Hd) ? prm.a : default_a(static_cast<int>(s.Hd));
  return p;
}

// The scalar reference, phase by phase as dma::run_pipeline's cpu backend does it, but keeping
// p and ds (when asked) and the pieces the views need.
struct ReferenceRun {
  PhaseTimes times;
  std::vector<float> delta;
  std::vector<uint8_t> mask;
  ForwardResult<float> fwd;
  AttentionGrads<float> grads;  // dv and ddelta: total, as the pipeline reports them
};

ReferenceRun run_reference(const Problem<float>& p, std::vector<float>* probs,
                           std::vector<float>* ds,
                           const std::function<void(const char*, float)>& stage) {
  ReferenceRun r;
  const Shape& s = p.shape;
  stage("reference: dynamic weights", 0.0f);
  auto t0 = Clock::now();
  r.delta = p.delta_given() ? p.delta : dynamic_weights(s, p.opt.form, p.v, p.w_dt, p.a);
  r.times.delta = ms_since(t0);
  stage("reference: mask", 0.03f);
  t0 = Clock::now();
  r.mask = explicit_mask(s, p.opt, r.delta);
  r.times.mask = ms_since(t0);
  stage("reference: forward", 0.08f);
  t0 = Clock::now();
  r.fwd = reference_forward(s, p.opt, p.q, p.k, p.v, r.delta, r.mask, probs);
  r.times.forward = ms_since(t0);
  if (p.has_backward()) {
    stage("reference: backward", 0.35f);  // the backward costs about twice the forward
    t0 = Clock::now();
    r.grads = reference_backward(s, p.opt, p.q, p.k, p.v, r.delta, r.mask, r.fwd, p.dout, ds);
    if (!p.delta_given()) {
      const auto dw = dynamic_weights_backward(s, p.opt.form, p.v, p.w_dt, p.a, r.grads.ddelta);
      for (size_t i = 0; i < r.grads.dv.size(); ++i) r.grads.dv[i] += dw.dv[i];
    }
    r.times.backward = ms_since(t0);
  }
  return r;
}

TileConfig tile_config(const Params& prm, BackendId b) {
  TileConfig tc;
  tc.Bq = prm.Bq;
  tc.Bk = prm.Bk;
  tc.mode = b == BackendId::tiled_dense ? TileMode::dense
          : b == BackendId::tiled_skip  ? TileMode::skip
                                        : TileMode::gather;
  return tc;
}

void fill_comparison(Comparison& c, const Views& v) {
  auto row = [&](const char* name, const std::vector<float>& x, const std::vector<float>& ref) {
    if (x.empty() || x.size() != ref.size()) return;
    c.rows.push_back({name, rel_max_diff(x, ref), rel_l2(x, ref)});
  };
  row("o", c.o, v.o);
  row("lse", c.lse, v.lse);
  row("delta", c.delta, v.delta);
  if (v.has_backward) {
    row("dq", c.dq, v.dq);
    row("dk", c.dk, v.dk);
    row("dv", c.dv, v.dv);
  }
  if (c.evict.size() == v.evict.size() && !c.evict.empty()) {
    c.evict_mismatches = 0;
    for (size_t i = 0; i < c.evict.size(); ++i) c.evict_mismatches += c.evict[i] != v.evict[i];
  }
}

std::shared_ptr<Comparison> stored_comparison(const BundleData& d, const Views& v) {
  if (!d.has_stored_outputs) return nullptr;
  auto c = std::make_shared<Comparison>();
  c->label = "stored outputs of " + d.dir;
  const Bundle& b = d.bundle;
  auto get = [&](const char* name, std::vector<float>& out) {
    if (b.has(name)) out = npy_to_float<float>(b.arrays.at(name), name);
  };
  get("o", c->o);
  get("lse", c->lse);
  get("dq", c->dq);
  get("dk", c->dk);
  get("dv", c->dv);
  get("ddelta", c->ddelta);
  if (!d.delta_given) get("delta", c->delta);
  if (b.has("evict")) c->evict = npy_to_i64(b.arrays.at("evict"));
  fill_comparison(*c, v);
  return c;
}

}  // namespace

// ---- the worker ------------------------------------------------------------------------------

Worker::Worker(std::function<void()> wake) : wake_(std::move(wake)) {
#ifdef DMA_INSPECTOR_CUDA
  cuda_ok_ = dma::cuda::device_available(&cuda_note_);
  if (!cuda_ok_ && cuda_note_.empty()) cuda_note_ = "no CUDA device";
#else
  cuda_note_ = "built without CUDA";
#endif
  thread_ = std::thread([this] { loop(); });
}

Worker::~Worker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    ++generation_;  // the running job stops at its next step boundary
  }
  cv_.notify_all();
  thread_.join();
}

void Worker::set_data(std::shared_ptr<const BundleData> example,
                      std::shared_ptr<const BundleData> bundle) {
  std::lock_guard<std::mutex> lock(mu_);
  example_ = std::move(example);
  bundle_ = std::move(bundle);
}

void Worker::request(const Params& p) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (has_request_ && p == requested_) return;
    requested_ = p;
    has_request_ = true;
    ++generation_;
    busy_ = true;
    progress_ = 0;
    stage_ = "queued";
  }
  cv_.notify_all();
}

void Worker::rerun_timings() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    rerun_ = true;
  }
  cv_.notify_all();
}

void Worker::set_live(bool live) {
  {
    std::lock_guard<std::mutex> lock(mu_);  // so the worker cannot miss the change while waiting
    live_ = live;
  }
  cv_.notify_all();
}

WorkerStatus Worker::status() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {busy_, progress_, stage_};
}

std::shared_ptr<const Snapshot> Worker::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  return snapshot_;
}

std::array<std::vector<float>, kBackendCount> Worker::history() const {
  std::lock_guard<std::mutex> lock(mu_);
  return history_;
}

bool Worker::wait_idle(double seconds) const {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, std::chrono::duration<double>(seconds),
                      [this] { return !busy_ && snapshot_ != nullptr; });
}

void Worker::set_stage(const std::string& stage, float progress) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stage_ = stage;
    progress_ = progress;
  }
  if (wake_) wake_();
}

void Worker::publish(std::shared_ptr<Snapshot> s) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    s->id = next_id_++;
    snapshot_ = std::move(s);
  }
  if (wake_) wake_();
}

void Worker::loop() {
  uint64_t done_generation = 0;
  for (;;) {
    Params p;
    uint64_t generation = 0;
    bool new_job = false, timing = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Sleep until there is a new request or a timing re-run; while live, at most 250 ms between
      // timing passes. Idle and not live, this thread uses no CPU at all.
      auto news = [&] { return stop_ || (has_request_ && generation_ != done_generation) || rerun_; };
      if (live_) cv_.wait_for(lock, std::chrono::milliseconds(250), news);
      else cv_.wait(lock, [&] { return news() || live_; });
      if (stop_) return;
      generation = generation_;
      p = requested_;
      if (has_request_ && generation != done_generation) new_job = true;
      else if (has_request_ && snapshot_ && (rerun_ || live_)) timing = true;
      rerun_ = false;
      if (new_job) {
        history_ = {};
        busy_ = true;
      }
    }
    if (new_job) {
      run_job(p, generation);
      if (!cancelled(generation)) done_generation = generation;
    } else if (timing) {
      timing_pass(p, generation, false);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (generation_ == done_generation) {
        busy_ = false;
        stage_.clear();
        progress_ = 1;
      }
    }
    cv_.notify_all();
    if (wake_) wake_();
  }
}

void Worker::run_job(const Params& prm, uint64_t generation) {
  auto snap = std::make_shared<Snapshot>();
  snap->params = prm;
  std::shared_ptr<const BundleData> data;
  {
    std::lock_guard<std::mutex> lock(mu_);
    data = prm.source == Source::bundle ? bundle_ : prm.source == Source::example ? example_
                                                                                   : nullptr;
  }
  snap->source_label = data && prm.source != Source::random
                           ? data->label
                           : "random inputs, seed " + std::to_string(prm.seed);
  try {
    set_stage("preparing inputs", 0.02f);
    const Problem<float> p = make_problem(prm, data.get());
    validate_problem(p);
    const Shape& s = p.shape;
    if (s.B * s.Hq * s.Lq * s.Lk > (int64_t{1} << 27))
      throw Error("B*Hq*Lq*Lk = " + std::to_string(s.B * s.Hq * s.Lq * s.Lk) +
                  " is too large for the inspector, which keeps p and ds whole (limit 2^27)");

    // 2. The reference, keeping p and ds.
    auto views = std::make_shared<Views>();
    {
      std::lock_guard<std::mutex> lock(mu_);
      views->id = next_id_++;
    }
    views->shape = s;
    views->opt = p.opt;
    views->Bq = prm.Bq;
    views->Bk = prm.Bk;
    views->has_backward = p.has_backward();
    auto stage = [&](const char* name, float done) { set_stage(name, 0.55f * done); };
    ReferenceRun ref = run_reference(p, &views->probs, p.has_backward() ? &views->ds : nullptr, stage);
    if (cancelled(generation)) return;
    views->delta = std::move(ref.delta);
    views->mask = std::move(ref.mask);
    views->o = std::move(ref.fwd.o);
    views->lse = std::move(ref.fwd.lse);
    views->dq = std::move(ref.grads.dq);
    views->dk = std::move(ref.grads.dk);
    views->dv = std::move(ref.grads.dv);
    views->evict = evict_positions(s, p.opt.window, views->delta);
    views->last_allowed.resize(static_cast<size_t>(s.Lq));
    for (int64_t i = 0; i < s.Lq; ++i)
      views->last_allowed[i] = std::min(s.Lk - 1, query_position(s, p.opt.causal, i));
    for (int64_t bh = 0; bh < s.B * s.Hd; ++bh)
      views->tiles.push_back(classify_tiles(views->evict.data() + bh * s.Lk, s.Lq, s.Lk,
                                            p.opt.causal, prm.Bq, prm.Bk));
    snap->views = views;
    BackendRun& rr = snap->runs[static_cast<int>(BackendId::reference)];
    rr.ran = true;
    rr.times = ref.times;
    rr.max_err = 0;
    if (data && prm.source != Source::random) snap->compare = stored_comparison(*data, *views);
    {
      std::lock_guard<std::mutex> lock(mu_);
      history_[0].push_back(static_cast<float>(ref.times.total()));
    }
    for (int b = 1; b < kBackendCount; ++b)
      snap->runs[b].note = prm.run[b] ? "queued" : "not selected";
    publish(std::make_shared<Snapshot>(*snap));  // the heatmaps can show now

    // 3-4. The timed backends.
    timing_pass(prm, generation, true);
  } catch (const std::exception& e) {
    snap->error = e.what();
    publish(snap);
  }
}

void Worker::timing_pass(const Params& prm, uint64_t generation, bool first) {
  std::shared_ptr<const Snapshot> base = snapshot();
  if (!base || !base->views || base->params != prm) return;
  std::shared_ptr<const BundleData> data;
  {
    std::lock_guard<std::mutex> lock(mu_);
    data = prm.source == Source::bundle ? bundle_ : prm.source == Source::example ? example_
                                                                                   : nullptr;
  }
  try {
    const Problem<float> p = make_problem(prm, data.get());
    const Views& v = *base->views;
    auto snap = std::make_shared<Snapshot>(*base);
    if (!first && prm.run[0]) {  // a repeated pass re-times the reference too (without p and ds)
      set_stage("timing: reference", 0.05f);
      ReferenceRun ref = run_reference(p, nullptr, nullptr, [](const char*, float) {});
      if (cancelled(generation)) return;
      snap->runs[0].times = ref.times;
      std::lock_guard<std::mutex> lock(mu_);
      history_[0].push_back(static_cast<float>(ref.times.total()));
    }
    for (int b = 1; b < kBackendCount; ++b) {
      if (cancelled(generation)) return;
      const auto id = static_cast<BackendId>(b);
      BackendRun& run = snap->runs[b];
      if (!prm.run[b]) {
        run = BackendRun{};
        run.note = "not selected";
        continue;
      }
      const float progress = first ? 0.55f + 0.45f * static_cast<float>(b - 1) / (kBackendCount - 1)
                                   : static_cast<float>(b) / kBackendCount;
      set_stage(std::string("timing: ") + backend_label(id), progress);
      Result<float> r;
      if (id == BackendId::cuda) {
#ifdef DMA_INSPECTOR_CUDA
        if (!cuda_ok_) {
          run.note = cuda_note_;
          continue;
        }
        try {
          r = dma::cuda::run_pipeline(p);
        } catch (const std::exception& e) {  // e.g. a head dim the kernels do not support
          run = BackendRun{};
          run.note = e.what();
          continue;
        }
        if (first) {  // the live CUDA outputs against the CPU reference
          auto c = std::make_shared<Comparison>();
          c->label = "CUDA (bf16, this run)";
          c->o = r.fwd.o; c->lse = r.fwd.lse; c->dq = r.grads.dq; c->dk = r.grads.dk;
          c->dv = r.grads.dv; c->ddelta = r.grads.ddelta; c->delta = r.delta; c->evict = r.evict;
          fill_comparison(*c, v);
          snap->compare = c;
        }
#else
        run.note = cuda_note_;
        continue;
#endif
      } else {
        r = run_pipeline(p, Backend::tiled, tile_config(prm, id), false);
        // A short run is mostly cold caches and first-touch page faults: run it again and keep
        // the faster (the UI thread drawing beside it adds noise too).
        if (r.times.total() < 200.0 && !cancelled(generation)) {
          Result<float> again = run_pipeline(p, Backend::tiled, tile_config(prm, id), false);
          if (again.times.total() < r.times.total()) r = std::move(again);
        }
      }
      if (cancelled(generation)) return;
      run.ran = true;
      run.note.clear();
      run.times = r.times;
      run.fwd = r.fwd_counters;
      run.bwd = r.bwd_counters;
      run.max_err = rel_max_diff(r.fwd.o, v.o);
      if (v.has_backward) run.max_err = std::max(run.max_err, rel_max_diff(r.grads.dq, v.dq));
      {
        std::lock_guard<std::mutex> lock(mu_);
        history_[b].push_back(static_cast<float>(r.times.total()));
        if (history_[b].size() > 120) history_[b].erase(history_[b].begin());
      }
      publish(std::make_shared<Snapshot>(*snap));
    }
    publish(snap);  // also carries the notes of backends that did not run
  } catch (const std::exception& e) {
    auto snap = std::make_shared<Snapshot>(*base);
    snap->error = std::string("timing: ") + e.what();
    publish(snap);
  }
}

}  // namespace dma::viewer
