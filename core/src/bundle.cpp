// Bundles: folders of .npy tensors (docs/design.md §4), read whole and written atomically.
#include "dma/bundle.hpp"

#include "dma/validate.hpp"

#include <filesystem>
#include <system_error>
#include <unistd.h>

namespace dma {
namespace fs = std::filesystem;

namespace {

const char* const kInputNames[] = {"q", "k", "v", "w_dt", "a", "do", "delta"};
const char* const kOutputNames[] = {"evict", "mask", "o", "lse", "dq", "dk", "dv", "ddelta", "dw_dt", "da"};

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string out = "(";
  for (size_t d = 0; d < shape.size(); ++d) out += (d ? ", " : "") + std::to_string(shape[d]);
  return out + ")";
}

const NpyArray& get(const Bundle& b, const std::string& name) {
  auto it = b.arrays.find(name);
  if (it == b.arrays.end()) throw Error(name + ": missing from the bundle (" + name + ".npy)");
  return it->second;
}

void expect_rank(const NpyArray& a, size_t rank, const std::string& name, const char* layout) {
  if (a.shape.size() != rank)
    throw Error(name + ": shape " + shape_string(a.shape) + " has rank " +
                std::to_string(a.shape.size()) + ", expected " + layout);
}

void expect_shape(const NpyArray& a, const std::vector<int64_t>& shape, const std::string& name,
                  const char* layout) {
  if (a.shape != shape)
    throw Error(name + ": shape " + shape_string(a.shape) + " does not match the other tensors, expected " +
                shape_string(shape) + " " + layout);
}

}  // namespace

bool is_bundle_file(const fs::path& file) {
  if (file.extension() != ".npy") return false;
  const std::string stem = file.stem().string();
  for (const char* name : kInputNames)
    if (stem == name) return true;
  for (const char* name : kOutputNames)
    if (stem == name) return true;
  return false;
}

Bundle read_bundle(const std::string& dir, bool with_outputs) {
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) throw Error(dir + ": not a bundle folder (does not exist or is not a directory)");
  Bundle b;
  auto read_if_there = [&](const char* name) {
    const fs::path file = fs::path(dir) / (std::string(name) + ".npy");
    // symlink_status: a dangling link or an unreadable entry is reported, not taken as missing
    if (fs::symlink_status(file, ec).type() != fs::file_type::not_found)
      b.arrays.emplace(name, read_npy(file.string()));
  };
  for (const char* name : kInputNames) read_if_there(name);
  if (with_outputs)
    for (const char* name : kOutputNames) read_if_there(name);
  for (const char* name : {"q", "k", "v"}) get(b, name);
  if (!b.has("delta")) {
    get(b, "w_dt");
    get(b, "a");
  }
  return b;
}

DType bundle_float_type(const Bundle& b) {
  const DType t = get(b, "q").dtype;
  if (t != DType::f32 && t != DType::f64)
    throw Error(std::string("q: dtype ") + dtype_name(t) + " (expected float32 or float64)");
  for (const char* name : kInputNames)
    if (b.has(name) && b.arrays.at(name).dtype != t)
      throw Error(std::string(name) + ": dtype " + dtype_name(b.arrays.at(name).dtype) +
                  " differs from q's " + dtype_name(t) + " (all float inputs must share one type)");
  return t;
}

template <typename T>
Problem<T> problem_from_bundle(const Bundle& b, const Options& opt) {
  bundle_float_type(b);
  const NpyArray& q = get(b, "q");
  const NpyArray& k = get(b, "k");
  expect_rank(q, 4, "q", "(B, Hq, Lq, D)");
  expect_rank(k, 4, "k", "(B, Hkv, Lk, D)");
  Problem<T> p;
  Shape& s = p.shape;
  s.B = q.shape[0]; s.Hq = q.shape[1]; s.Lq = q.shape[2]; s.D = q.shape[3];
  s.Hkv = k.shape[1]; s.Lk = k.shape[2];
  s.Hd = s.Hkv;  // checked again below, once Hd is known
  validate_shape(s, opt.causal);  // every dimension >= 1 before any product of them is formed
  expect_shape(k, {s.B, s.Hkv, s.Lk, s.D}, "k", "(B, Hkv, Lk, D)");
  expect_shape(get(b, "v"), {s.B, s.Hkv, s.Lk, s.D}, "v", "(B, Hkv, Lk, D)");
  if (b.has("delta")) {
    const NpyArray& delta = get(b, "delta");
    expect_rank(delta, 3, "delta", "(B, Hd, Lk)");
    s.Hd = delta.shape[1];
    expect_shape(delta, {s.B, s.Hd, s.Lk}, "delta", "(B, Hd, Lk)");
  } else {
    const NpyArray& w_dt = get(b, "w_dt");
    expect_rank(w_dt, 2, "w_dt", "(Hd, Hkv*D)");
    s.Hd = w_dt.shape[0];
    expect_shape(w_dt, {s.Hd, s.Hkv * s.D}, "w_dt", "(Hd, Hkv*D)");
    expect_shape(get(b, "a"), {s.Hd}, "a", "(Hd)");
  }
  if (b.has("do")) expect_shape(get(b, "do"), q.shape, "do", "(B, Hq, Lq, D), like q");
  p.opt = opt;

  p.q = npy_to_float<T>(q, "q");
  p.k = npy_to_float<T>(k, "k");
  p.v = npy_to_float<T>(get(b, "v"), "v");
  if (b.has("delta")) {
    p.delta = npy_to_float<T>(get(b, "delta"), "delta");
  } else {
    p.w_dt = npy_to_float<T>(get(b, "w_dt"), "w_dt");
    p.a = npy_to_float<T>(get(b, "a"), "a");
  }
  if (b.has("do")) p.dout = npy_to_float<T>(get(b, "do"), "do");
  validate_problem(p);
  return p;
}

template <typename T>
Bundle bundle_from_problem(const Problem<T>& p) {
  const Shape& s = p.shape;
  Bundle b;
  b.arrays["q"] = make_npy(p.q, {s.B, s.Hq, s.Lq, s.D});
  b.arrays["k"] = make_npy(p.k, {s.B, s.Hkv, s.Lk, s.D});
  b.arrays["v"] = make_npy(p.v, {s.B, s.Hkv, s.Lk, s.D});
  if (p.delta_given()) {
    b.arrays["delta"] = make_npy(p.delta, {s.B, s.Hd, s.Lk});
  } else {
    b.arrays["w_dt"] = make_npy(p.w_dt, {s.Hd, s.Hkv * s.D});
    b.arrays["a"] = make_npy(p.a, {s.Hd});
  }
  if (p.has_backward()) b.arrays["do"] = make_npy(p.dout, {s.B, s.Hq, s.Lq, s.D});
  return b;
}

template <typename T>
void add_outputs(Bundle& b, const Shape& s, const Result<T>& r) {
  const std::vector<int64_t> q_dims{s.B, s.Hq, s.Lq, s.D}, kv_dims{s.B, s.Hkv, s.Lk, s.D};
  b.arrays["delta"] = make_npy(r.delta, {s.B, s.Hd, s.Lk});
  b.arrays["evict"] = make_npy(r.evict, {s.B, s.Hd, s.Lk});
  if (!r.mask.empty() && s.mask_numel() <= kMaxMaskElements)
    b.arrays["mask"] = make_npy(r.mask, {s.B, s.Hd, s.Lq, s.Lk});
  b.arrays["o"] = make_npy(r.fwd.o, q_dims);
  b.arrays["lse"] = make_npy(r.fwd.lse, {s.B, s.Hq, s.Lq});
  if (!r.grads.dq.empty()) {
    b.arrays["dq"] = make_npy(r.grads.dq, q_dims);
    b.arrays["dk"] = make_npy(r.grads.dk, kv_dims);
    b.arrays["dv"] = make_npy(r.grads.dv, kv_dims);
    b.arrays["ddelta"] = make_npy(r.grads.ddelta, {s.B, s.Hd, s.Lk});
  }
  if (!r.dw_dt.empty()) {
    b.arrays["dw_dt"] = make_npy(r.dw_dt, {s.Hd, s.Hkv * s.D});
    b.arrays["da"] = make_npy(r.da, {s.Hd});
  }
}

void write_bundle(const std::string& out_dir, const Bundle& b) {
  std::error_code ec;
  const fs::path out = fs::path(out_dir).lexically_normal();
  const fs::path target = out.filename().empty() ? out.parent_path() : out;
  if (fs::exists(target, ec)) {
    if (!fs::is_directory(target, ec))
      throw Error(out_dir + ": exists and is not a folder; refusing to replace it");
    // Replace only what is recognisably an old bundle: every entry one of its tensor files.
    for (const auto& entry : fs::directory_iterator(target, ec))
      if (!is_bundle_file(entry.path()))
        throw Error(out_dir + ": is not empty and not a bundle (holds '" +
                    entry.path().filename().string() + "'); refusing to replace it");
  }
  const fs::path parent = target.has_parent_path() ? target.parent_path() : fs::path(".");
  if (!fs::is_directory(parent, ec))
    throw Error(out_dir + ": parent folder " + parent.string() + " does not exist");
  const std::string tag = "." + target.filename().string() + ".tmp-" + std::to_string(getpid());
  const fs::path tmp = parent / tag;
  const fs::path old = parent / (tag + "-old");
  fs::remove_all(tmp, ec);
  try {
    if (!fs::create_directory(tmp, ec) || ec)
      throw Error(out_dir + ": cannot create " + tmp.string() + " (" + ec.message() + ")");
    for (const auto& [name, array] : b.arrays) write_npy((tmp / (name + ".npy")).string(), array);
    const bool had_old = fs::exists(target, ec);
    if (had_old) {
      fs::rename(target, old, ec);
      if (ec) throw Error(out_dir + ": cannot move the old bundle aside (" + ec.message() + ")");
    }
    fs::rename(tmp, target, ec);
    if (ec) {
      const std::string why = ec.message();
      if (had_old) fs::rename(old, target, ec);
      throw Error(out_dir + ": cannot rename the new bundle into place (" + why + ")");
    }
    if (had_old) fs::remove_all(old, ec);
  } catch (...) {
    fs::remove_all(tmp, ec);
    throw;
  }
}

template Problem<float> problem_from_bundle(const Bundle&, const Options&);
template Problem<double> problem_from_bundle(const Bundle&, const Options&);
template Bundle bundle_from_problem(const Problem<float>&);
template Bundle bundle_from_problem(const Problem<double>&);
template void add_outputs(Bundle&, const Shape&, const Result<float>&);
template void add_outputs(Bundle&, const Shape&, const Result<double>&);

}  // namespace dma
