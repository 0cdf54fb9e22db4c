// Bundles: a folder of .npy files named after the tensors (docs/design.md §4).
//   inputs:  q k v w_dt a [do] [delta]
//   outputs: delta evict [mask] o lse [dq dk dv ddelta [dw_dt da]]
#pragma once

#include <map>
#include <string>

#include "dma/npy.hpp"
#include "dma/pipeline.hpp"

namespace dma {

// The .npy files of a folder that name bundle tensors, keyed by tensor name ("do" for do.npy).
struct Bundle {
  std::map<std::string, NpyArray> arrays;
  bool has(const std::string& name) const { return arrays.count(name) != 0; }
};

// Reads the bundle's input tensors from dir (and its outputs, o lse dq ..., when with_outputs);
// a missing required input or a file that is not a readable .npy is a dma::Error.
Bundle read_bundle(const std::string& dir, bool with_outputs = true);

// The float type of the bundle's inputs (all float inputs must share it), f32 or f64.
DType bundle_float_type(const Bundle& b);

// Infers the shape from the tensors, checks they agree, and converts them to T.
template <typename T>
Problem<T> problem_from_bundle(const Bundle& b, const Options& opt);

// Masks larger than this many elements are not written (docs/design.md §4).
constexpr int64_t kMaxMaskElements = int64_t{1} << 26;

// The inverse: a bundle of the problem's input tensors (q k v, w_dt a or delta, do if present).
template <typename T>
Bundle bundle_from_problem(const Problem<T>& p);

// Adds the outputs of a run to a bundle (float outputs in T; mask only when it is small enough).
template <typename T>
void add_outputs(Bundle& b, const Shape& s, const Result<T>& r);

// Writes every array of b into out_dir atomically: the files go into a sibling temporary folder
// that is renamed into place at the end, replacing an old bundle at out_dir. On any failure the
// temporary folder is removed, out_dir is left as it was, and a dma::Error says what failed.
void write_bundle(const std::string& out_dir, const Bundle& b);

}  // namespace dma
