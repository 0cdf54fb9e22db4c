// Bundles for the inspector: reading, and inferring the settings of stored outputs.
#include "bundle_data.hpp"

#include <algorithm>

#include "dma/dynamic_weights.hpp"
#include "dma/mask_rule.hpp"
#include "dma/numerics.hpp"
#include "dma/tiled.hpp"

namespace dma::viewer {

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

Problem<float> bundle_inputs(const BundleData& d, const Options& opt) {
  Bundle inputs;
  for (const char* name : {"q", "k", "v", "w_dt", "a", "do", "delta"}) {
    if (!d.bundle.has(name) || (std::string(name) == "delta" && !d.delta_given)) continue;
    inputs.arrays.emplace(name, d.bundle.arrays.at(name));
  }
  Problem<float> p = problem_from_bundle<float>(inputs, opt);
  p.opt = opt;
  return p;
}

namespace {

// Stored outputs are read by index: their shapes must be the inputs' (a hostile or mixed-up
// bundle would otherwise read out of bounds).
void check_stored_shapes(const Bundle& b, const Shape& s) {
  auto expect = [&](const char* name, const std::vector<int64_t>& shape, const char* layout) {
    if (b.has(name) && b.arrays.at(name).shape != shape)
      throw Error(std::string(name) + ": shape does not match the inputs' (expected " + layout + ")");
  };
  expect("evict", {s.B, s.Hd, s.Lk}, "B, Hd, Lk)");
  expect("mask", {s.B, s.Hd, s.Lq, s.Lk}, "B, Hd, Lq, Lk)");
  expect("delta", {s.B, s.Hd, s.Lk}, "B, Hd, Lk)");
  expect("lse", {s.B, s.Hq, s.Lq}, "B, Hq, Lq)");
}

// The last query sees every key (causal or not), and keeps min(w, Lk) of them: those with
// e_j = Lk - 1. So the count of such keys is w, unless w >= Lk.
int window_from_evict(const std::vector<int64_t>& evict, const Shape& s) {
  int64_t kept_by_last = 0;
  for (int64_t j = 0; j < s.Lk; ++j) kept_by_last += evict[j] >= s.Lk - 1;
  return static_cast<int>(kept_by_last);
}

// A kept key beyond the causal position of its query means the bundle was computed non-causally.
bool causal_from_mask(const NpyArray& m, const Shape& s) {
  const uint8_t* mk = m.data.data();
  for (int64_t i = 0; i < s.Lq; ++i)
    for (int64_t j = std::max<int64_t>(0, rule::query_position<int64_t>(s.Lq, s.Lk, true, i) + 1);
         j < s.Lk; ++j)
      if (mk[i * s.Lk + j]) return false;
  return true;
}

// The form whose delta is closest to the stored one.
Form form_from_delta(const Problem<float>& p, const std::vector<float>& stored) {
  Form best_form = Form::exp;
  double best = 1e300;
  for (Form f : {Form::exp, Form::linear}) {
    try {
      const double e = max_rel_error(dynamic_weights(p.shape, f, p.v, p.w_dt, p.a), stored);
      if (e < best) { best = e; best_form = f; }
    } catch (const Error&) {  // exp may overflow where linear does not
    }
  }
  return best_form;
}

// Without a mask (too large for dma_run to write, or left out): evict is the same formula causal
// or not, so ask the stored lse which of the two runs it came from.
bool causal_from_lse(const Problem<float>& p, const std::vector<float>& delta,
                     const std::vector<int64_t>& evict, const std::vector<float>& lse, int window) {
  bool causal = true;
  double best = 1e300;
  for (bool c : {true, false}) {
    Options o;
    o.window = std::max(window, 1);
    o.causal = c;
    const double e =
        max_rel_error(tiled_forward(p.shape, o, TileConfig{}, p.q, p.k, p.v, delta, evict).lse, lse);
    if (e < best) { best = e; causal = c; }
  }
  return causal;
}

}  // namespace

std::shared_ptr<BundleData> load_bundle_data(const std::string& dir, const std::string& label) {
  auto d = std::make_shared<BundleData>();
  d->dir = dir;
  d->label = label;
  d->bundle = read_bundle(dir);
  const Bundle& b = d->bundle;
  d->has_stored_outputs = b.has("o");
  d->delta_given = b.has("delta") && !(b.has("w_dt") && b.has("a"));
  Options opt;
  opt.window = 1;
  opt.causal = false;  // only to read the shape: non-causal accepts Lq > Lk too
  const Problem<float> p = bundle_inputs(*d, opt);
  d->shape = p.shape;
  d->a = p.a;
  const Shape& s = d->shape;
  check_stored_shapes(b, s);

  // Infer how the stored outputs were computed, so that opening a dma_run bundle shows the same.
  d->window = static_cast<int>(std::min<int64_t>(32, s.Lk));
  d->causal = s.Lq <= s.Lk;  // causal needs Lq <= Lk
  std::vector<int64_t> evict;
  if (b.has("evict")) {
    evict = npy_to_i64(b.arrays.at("evict"));
    d->window = window_from_evict(evict, s);
    d->notes += "window " + std::to_string(d->window) + " from evict; ";
  }
  if (b.has("mask") && b.arrays.at("mask").dtype == DType::u8) {
    d->causal = causal_from_mask(b.arrays.at("mask"), s);
    d->notes += d->causal ? "causal from mask; " : "non-causal from mask; ";
  }
  if (b.has("delta") && !d->delta_given) {
    d->form = form_from_delta(p, npy_to_float<float>(b.arrays.at("delta"), "delta"));
    d->notes += std::string("form ") + form_name(d->form) + " from delta; ";
  }
  if (!b.has("mask") && b.has("lse") && !evict.empty() && s.Lq <= s.Lk) {
    std::vector<float> delta = p.delta;
    if (delta.empty())
      delta = b.has("delta") ? npy_to_float<float>(b.arrays.at("delta"), "delta")
                             : dynamic_weights(s, d->form, p.v, p.w_dt, p.a);
    d->causal = causal_from_lse(p, delta, evict, npy_to_float<float>(b.arrays.at("lse"), "lse"),
                                d->window);
    d->notes += d->causal ? "causal from lse; " : "non-causal from lse; ";
  }
  if (!d->has_stored_outputs) d->notes += "inputs only";
  d->labels = read_labels(dir, s.Lk);
  return d;
}

}  // namespace dma::viewer
