// Opening a bundle (a folder of .npy files in the dma_run layout, docs/design.md §4) for the
// inspector, and inferring from its stored outputs how they were computed (window, causal, form),
// so that a bundle written by dma_run opens showing what dma_run computed.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "dma/bundle.hpp"
#include "labels.hpp"

namespace dma::viewer {

struct BundleData {
  std::string dir, label;
  Bundle bundle;             // inputs and any stored outputs, as read
  Shape shape;
  bool has_stored_outputs = false;
  // Inferred from stored outputs, or defaults (the example uses w = 32, causal, exp).
  int window = 32;
  bool causal = true;
  Form form = Form::exp;
  std::vector<float> a;      // the bundle's own a (empty when delta is given)
  // A bundle written by dma_run holds delta as an output. With w_dt and a there, delta is
  // recomputed (so the a controls work) and the stored one is only compared; without them, the
  // stored delta is the given input.
  bool delta_given = false;
  std::string notes;         // how the settings were inferred, for the UI
  // tokens.txt and roles.txt, when the folder has them (labels.error: why one was not used).
  TokenLabels labels;
};

// Reads a bundle folder; throws dma::Error (missing tensors, bad shapes, stored outputs whose
// shapes do not match the inputs').
std::shared_ptr<BundleData> load_bundle_data(const std::string& dir, const std::string& label);

// The bundle's inputs only (stored outputs dropped; delta kept only when it is the given input),
// as a problem with these options.
Problem<float> bundle_inputs(const BundleData& d, const Options& opt);

// An int64 or int32 array (a stored evict) as int64; other dtypes are a dma::Error.
std::vector<int64_t> npy_to_i64(const NpyArray& a);

}  // namespace dma::viewer
