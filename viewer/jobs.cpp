// The pieces of one inspector job: inputs, runs of each backend, views, comparisons.
#include "jobs.hpp"

#include <algorithm>

#include "dma/mask_rule.hpp"
#include "dma/numerics.hpp"
#include "dma/validate.hpp"
#ifdef DMA_INSPECTOR_CUDA
#include "dma/cuda.hpp"
#endif

namespace dma::viewer {

namespace {

void check_inspector_limit(const Shape& s) {
  if (s.B * s.Hq * s.Lq * s.Lk > kMaxInspectorCells)
    throw Error("B*Hq*Lq*Lk = " + std::to_string(s.B * s.Hq * s.Lq * s.Lk) +
                " is too large for the inspector, which keeps p and ds whole (limit 2^27)");
}

Problem<float> make_inputs(const Params& prm, const BundleData* data) {
  Options opt;
  opt.window = prm.window;
  opt.causal = prm.causal;
  opt.form = prm.form;
  if (prm.source != Source::random && data) {
    Problem<float> p = bundle_inputs(*data, opt);
    if (!p.delta_given() && prm.a.size() == p.a.size()) p.a = prm.a;
    return p;
  }
  Shape s;
  s.B = prm.B; s.Hq = prm.Hq; s.Hkv = prm.Hkv; s.Hd = prm.Hd();
  s.Lq = prm.Lq; s.Lk = prm.Lk; s.D = prm.D;
  validate_shape(s, opt.causal);  // before allocating anything
  check_inspector_limit(s);
  Problem<float> p = random_problem<float>(s, opt, prm.seed, /*with_do=*/true);
  p.a = prm.a.size() == static_cast<size_t>(s.Hd) ? prm.a : default_a(static_cast<int>(s.Hd));
  return p;
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

void fill_rows(Comparison& c, const Views& v) {
  auto row = [&](const char* name, const std::vector<float>& x, const std::vector<float>& ref) {
    if (x.empty() || x.size() != ref.size()) return;
    c.rows.push_back({name, max_rel_error(x, ref), rel_l2(x, ref)});
  };
  row("o", c.o, v.o);
  row("lse", c.lse, v.lse);
  row("delta", c.delta, v.delta);
  if (v.has_backward) {
    row("dq", c.dq, v.dq);
    row("dk", c.dk, v.dk);
    row("dv", c.dv, v.dv);
    row("ddelta", c.ddelta, v.ddelta);
  }
  if (c.evict.size() == v.evict.size() && !c.evict.empty()) {
    c.evict_mismatches = 0;
    for (size_t i = 0; i < c.evict.size(); ++i) c.evict_mismatches += c.evict[i] != v.evict[i];
  }
}

}  // namespace

Problem<float> make_problem(const Params& prm, const BundleData* data) {
  Problem<float> p = make_inputs(prm, data);
  check_inspector_limit(p.shape);
  if (prm.bf16_inputs)
    for (std::vector<float>* t : {&p.q, &p.k, &p.v, &p.dout}) *t = round_to_precision(*t, Precision::bf16);
  validate_problem(p);
  return p;
}

std::shared_ptr<Views> make_views(Result<float>&& ref, const Problem<float>& p, const Params& prm,
                                  uint64_t id) {
  const Shape& s = p.shape;
  auto v = std::make_shared<Views>();
  v->id = id;
  v->shape = s;
  v->opt = p.opt;
  v->Bq = prm.Bq;
  v->Bk = prm.Bk;
  v->has_backward = p.has_backward();
  v->delta = std::move(ref.delta);
  v->evict = std::move(ref.evict);
  v->mask = std::move(ref.mask);
  v->probs = std::move(ref.probs);
  v->ds = std::move(ref.ds);
  v->o = std::move(ref.fwd.o);
  v->lse = std::move(ref.fwd.lse);
  v->dq = std::move(ref.grads.dq);
  v->dk = std::move(ref.grads.dk);
  v->dv = std::move(ref.grads.dv);
  v->ddelta = std::move(ref.grads.ddelta);
  v->last_allowed.resize(static_cast<size_t>(s.Lq));
  for (int64_t i = 0; i < s.Lq; ++i)
    v->last_allowed[i] = std::min(s.Lk - 1, rule::query_position<int64_t>(s.Lq, s.Lk, p.opt.causal, i));
  for (int64_t bh = 0; bh < s.B * s.Hd; ++bh)
    v->tiles.push_back(classify_tiles(v->evict.data() + bh * s.Lk, s.Lq, s.Lk, p.opt.causal,
                                      prm.Bq, prm.Bk));
  return v;
}

Result<float> run_backend(const Problem<float>& p, const Params& prm, BackendId id,
                          const PipelineHooks& hooks) {
  if (id == BackendId::reference) return run_pipeline(p, Backend::cpu, {}, true, hooks);
  if (id == BackendId::cuda) {
#ifdef DMA_INSPECTOR_CUDA
    return dma::cuda::run_pipeline(p);
#else
    throw Error("built without CUDA");
#endif
  }
  const TileConfig tc = tile_config(prm, id);
  Result<float> r = run_pipeline(p, Backend::tiled, tc, false, hooks);
  // A short run is mostly cold caches and first-touch page faults: run it again and keep the
  // faster (the UI thread drawing beside it adds noise too).
  if (r.times.total() < 200.0) {
    Result<float> again = run_pipeline(p, Backend::tiled, tc, false, hooks);
    if (again.times.total() < r.times.total()) r = std::move(again);
  }
  return r;
}

bool detect_cuda(std::string* note) {
#ifdef DMA_INSPECTOR_CUDA
  const bool ok = dma::cuda::device_available(note);
  if (!ok && note->empty()) *note = "no CUDA device";
  return ok;
#else
  *note = "built without CUDA";
  return false;
#endif
}

BackendRun backend_run(const Result<float>& r, const Views& ref) {
  BackendRun run;
  run.ran = true;
  run.times = r.times;
  run.fwd = r.fwd_counters;
  run.max_err = max_rel_error(r.fwd.o, ref.o);
  if (ref.has_backward) run.max_err = std::max(run.max_err, max_rel_error(r.grads.dq, ref.dq));
  return run;
}

std::shared_ptr<Comparison> compare_result(const std::string& label, const Result<float>& r,
                                           const Views& ref) {
  auto c = std::make_shared<Comparison>();
  c->label = label;
  c->o = r.fwd.o;
  c->lse = r.fwd.lse;
  c->dq = r.grads.dq;
  c->dk = r.grads.dk;
  c->dv = r.grads.dv;
  c->ddelta = r.grads.ddelta;
  c->delta = r.delta;
  c->evict = r.evict;
  fill_rows(*c, ref);
  return c;
}

std::shared_ptr<Comparison> compare_stored(const BundleData& d, const Views& ref) {
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
  fill_rows(*c, ref);
  return c;
}

}  // namespace dma::viewer
