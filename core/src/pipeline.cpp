// The whole DMA pipeline on the CPU, phase by phase (docs/design.md §1).
#include "dma/pipeline.hpp"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "dma/validate.hpp"

namespace dma {

const char* backend_name(Backend b) { return b == Backend::cpu ? "cpu" : "tiled"; }

template <typename T>
void validate_problem(const Problem<T>& p) {
  const Shape& s = p.shape;
  validate_shape(s, p.opt.causal);
  validate_options(s, p.opt);
  validate_scale<T>(s, p.opt);
  const std::vector<int64_t> q_dims{s.B, s.Hq, s.Lq, s.D}, kv_dims{s.B, s.Hkv, s.Lk, s.D};
  validate_numel(p.q, s.q_numel(), "q");
  validate_numel(p.k, s.kv_numel(), "k");
  validate_numel(p.v, s.kv_numel(), "v");
  validate_finite(p.q, q_dims, "q");
  validate_finite(p.k, kv_dims, "k");
  validate_finite(p.v, kv_dims, "v");
  if (p.delta_given()) {
    validate_numel(p.delta, s.delta_numel(), "delta");
    validate_finite(p.delta, {s.B, s.Hd, s.Lk}, "delta");
  } else {
    validate_dynamic_weight_params(s, p.w_dt, p.a);
  }
  if (p.has_backward()) {
    validate_numel(p.dout, s.q_numel(), "do");
    validate_finite(p.dout, q_dims, "do");
  }
}

namespace {

// Checks that an output is finite: finite inputs can still overflow in float32 (q.k beyond
// 3e38, a huge scale, the exp form's backward), and a NaN must never leave silently.
template <typename T>
void check_output(const std::vector<T>& t, const std::vector<int64_t>& dims, const char* name) {
  const int64_t n = first_non_finite(t);
  if (n >= 0)
    throw Error(std::string(name) + format_index(n, dims) + " is not finite: the computation overflowed " +
                (sizeof(T) == 4 ? "float32 (try float64 inputs)" : "float64") + "; the inputs are too large");
}

template <typename T>
void check_outputs(const Shape& s, const Result<T>& r) {
  const std::vector<int64_t> q_dims{s.B, s.Hq, s.Lq, s.D}, kv_dims{s.B, s.Hkv, s.Lk, s.D};
  check_output(r.fwd.o, q_dims, "o");
  check_output(r.fwd.lse, {s.B, s.Hq, s.Lq}, "lse");
  check_output(r.grads.dq, q_dims, "dq");
  check_output(r.grads.dk, kv_dims, "dk");
  check_output(r.grads.dv, kv_dims, "dv");
  check_output(r.grads.ddelta, {s.B, s.Hd, s.Lk}, "ddelta");
  check_output(r.dw_dt, {s.Hd, s.Hkv * s.D}, "dw_dt");
  check_output(r.da, {s.Hd}, "da");
}

// The scalar reference works on the explicit (B,Hd,Lq,Lk) mask; beyond this it is the wrong tool.
constexpr int64_t kMaxReferenceMask = int64_t{1} << 31;

// Runs f and adds its wall-clock time in milliseconds to ms.
template <typename F>
auto timed(double& ms, F&& f) {
  const auto t0 = std::chrono::steady_clock::now();
  auto result = f();
  ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  return result;
}

// Reports the phase boundaries to PipelineHooks::progress: the fraction done is the estimated
// cost of the phases before this one over that of all phases that run.
class ProgressReport {
 public:
  // The rough cost of each phase in multiply-adds of the scalar reference (only ratios matter).
  template <typename T>
  ProgressReport(const PipelineHooks& hooks, const Problem<T>& p, bool explicit_mask) : fn_(hooks.progress) {
    if (!fn_) return;
    const Shape& s = p.shape;
    const auto n = [](int64_t x) { return static_cast<double>(x); };
    const double log_w = std::log2(n(std::min<int64_t>(p.opt.window, s.Lk)) + 2);
    const double weights = p.delta_given() ? 0 : n(s.B * s.Hd * s.Lk) * n(s.Hkv * s.D);
    delta_ = weights;
    mask_ = n(s.B * s.Hd) * (n(s.Lk) + (explicit_mask ? n(s.Lq) * n(s.Lk) : 0)) * log_w;
    forward_ = 2 * n(s.B * s.Hq) * n(s.Lq) * n(s.Lk) * n(s.D);  // q.k and p v
    backward_ = p.has_backward() ? 2 * forward_ + weights : 0;  // four products, then dw
    total_ = std::max(delta_ + mask_ + forward_ + backward_, 1.0);
  }
  void delta() { phase("dynamic weights", delta_); }
  void mask() { phase("mask", mask_); }
  void forward() { phase("forward", forward_); }
  void backward() { phase("backward", backward_); }
  void done() { report("done", 1.0); }

 private:
  void phase(const char* stage, double cost) {
    const double fraction = std::min(done_ / total_, 1.0);
    done_ += cost;
    report(stage, fraction);
  }
  void report(const char* stage, double fraction) {
    if (fn_ && fn_(stage, fraction) == Control::cancel) throw Cancelled();
  }
  const std::function<Control(const char*, double)>& fn_;
  double delta_ = 0, mask_ = 0, forward_ = 0, backward_ = 0, total_ = 1, done_ = 0;
};

}  // namespace

template <typename T>
Result<T> run_pipeline(const Problem<T>& p, Backend backend, const TileConfig& tc, bool want_mask,
                       const PipelineHooks& hooks) {
  validate_problem(p);
  const Shape& s = p.shape;
  if (backend == Backend::cpu && s.mask_numel() > kMaxReferenceMask)
    throw Error("shape: the cpu backend's explicit mask would hold " + std::to_string(s.mask_numel()) +
                " entries (B*Hd*Lq*Lk > 2^31); use the tiled backend");
  if (backend != Backend::cpu && (hooks.keep_probs || hooks.keep_ds))
    throw Error("hooks: p and ds are kept by the cpu backend only (the tiled one never holds them whole)");
  const bool explicit_mask_needed = backend == Backend::cpu || want_mask;
  ProgressReport progress(hooks, p, explicit_mask_needed);
  Result<T> r;

  // 1. dynamic weights delta (B,Hd,Lk), unless given
  if (p.delta_given()) {
    r.delta = p.delta;
  } else {
    progress.delta();
    r.delta = timed(r.times.delta, [&] { return dynamic_weights(s, p.opt.form, p.v, p.w_dt, p.a); });
  }

  // 2. the mask: eviction positions always (the output `evict`), the explicit mask for the
  //    reference (which is written the obvious way) or when asked for
  progress.mask();
  r.evict = timed(r.times.mask, [&] { return evict_positions(s, p.opt.window, r.delta); });
  if (explicit_mask_needed)
    r.mask = timed(r.times.mask, [&] { return explicit_mask(s, p.opt, r.delta); });

  // 3. forward; the reference hands out p when asked (a null pointer costs it nothing)
  progress.forward();
  r.fwd = timed(r.times.forward, [&] {
    return backend == Backend::cpu
               ? reference_forward(s, p.opt, p.q, p.k, p.v, r.delta, r.mask,
                                   hooks.keep_probs ? &r.probs : nullptr)
               : tiled_forward(s, p.opt, tc, p.q, p.k, p.v, r.delta, r.evict, &r.fwd_counters);
  });

  // 4. backward of the attention (the reference hands out ds when asked), then of the weights
  if (p.has_backward()) {
    progress.backward();
    r.grads = timed(r.times.backward, [&] {
      return backend == Backend::cpu
                 ? reference_backward(s, p.opt, p.q, p.k, p.v, r.delta, r.mask, r.fwd, p.dout,
                                      hooks.keep_ds ? &r.ds : nullptr)
                 : tiled_backward(s, p.opt, tc, p.q, p.k, p.v, r.delta, r.evict, r.fwd, p.dout,
                                  &r.bwd_counters);
    });
    if (!p.delta_given()) {
      DynamicWeightGrads<T> dw = timed(r.times.backward, [&] {
        return dynamic_weights_backward(s, p.opt.form, p.v, p.w_dt, p.a, r.grads.ddelta);
      });
      for (size_t n = 0; n < dw.dv.size(); ++n) r.grads.dv[n] += dw.dv[n];  // v's total gradient
      r.dw_dt = std::move(dw.dw_dt);
      r.da = std::move(dw.da);
    }
  }
  check_outputs(s, r);
  progress.done();
  return r;
}

template void validate_problem(const Problem<float>&);
template void validate_problem(const Problem<double>&);
template Result<float> run_pipeline(const Problem<float>&, Backend, const TileConfig&, bool,
                                    const PipelineHooks&);
template Result<double> run_pipeline(const Problem<double>&, Backend, const TileConfig&, bool,
                                     const PipelineHooks&);

}  // namespace dma
