// A model (docs/design.md §4): a folder of bundles layer_00/ layer_01/ ..., one per layer, e.g.
// written by dma_run per layer. The inspector opens one layer at a time (Params::layer) and draws
// the whole model as a grid of layers x delta heads from the selections stored in each bundle
// (its evict, as dma_run computed it).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "bundle_data.hpp"
#include "labels.hpp"

namespace dma::viewer {

// The layer_NN sub-folders of dir, ordered by NN (layer_2 before layer_10); empty when it has none.
std::vector<std::string> model_layer_dirs(const std::string& dir);

struct ModelLayer {
  std::string dir, name;                   // name: "layer_03"
  std::shared_ptr<const BundleData> data;  // null when the bundle could not be read
  std::string error;                       // why not
  std::vector<int64_t> evict;              // stored (B, Hd, Lk); empty when the bundle has none
  std::vector<int64_t> last_allowed;       // per query, under the bundle's inferred causal flag
  std::vector<SelectionStats> stats;       // per (b, delta head), from evict
};

struct Model {
  std::string dir;
  std::vector<ModelLayer> layers;
  int first_readable() const;  // the first layer with data, -1: none
  int max_delta_heads() const;
};

// Reads every layer of a model folder; a layer that cannot be read keeps its error (the others
// still open). Null when dir has no layer_NN folders.
std::shared_ptr<const Model> load_model(const std::string& dir);

}  // namespace dma::viewer
