// The built-in trained model, assets/mqar (written by bench/mqar/export_bundle.py): it opens as a
// model of two layers with token and role labels, the settings are inferred from its stored
// outputs (window, causal from lse, the form from delta), and its stored delta and selection are what the
// core computes from its stored inputs (the model view draws the stored evict, the large view the
// recomputed one: they must agree). The window, drawn under xvfb, is tests/viewer.cmake's
// viewer_xvfb_mqar*.
#include <doctest/doctest.h>

#include <filesystem>
#include <string>

#include "dma/dynamic_weights.hpp"
#include "dma/mask.hpp"
#include "dma/numerics.hpp"
#include "model.hpp"

using namespace dma::viewer;

TEST_SUITE("gui") {

TEST_CASE("assets/mqar: a trained 2-layer model - labels - stored selection = the core's") {
  const std::string dir = DMA_ASSETS_DIR "/mqar";
  REQUIRE(std::filesystem::is_directory(dir));
  const std::shared_ptr<const Model> model = load_model(dir);
  REQUIRE(model != nullptr);
  REQUIRE(model->layers.size() == 2);
  CHECK(model->layers[0].name == "layer_00");
  CHECK(model->layers[1].name == "layer_01");
  for (const ModelLayer& l : model->layers) {
    CAPTURE(l.name);
    CAPTURE(l.error);
    REQUIRE(l.data != nullptr);
    const BundleData& d = *l.data;
    const dma::Shape& s = d.shape;
    CHECK(s.B == 1);
    CHECK(s.Lq == s.Lk);
    CHECK(s.Lk >= 128);
    CHECK(d.has_stored_outputs);
    CHECK(!d.delta_given);  // w_dt and a are there: the inspector recomputes delta
    CHECK(d.causal);        // inferred from lse (no mask stored)
    CHECK(d.window == model->layers[0].data->window);
    CHECK(d.window < s.Lk);
    CHECK(d.labels.error.empty());
    CHECK(d.labels.tokens.size() == static_cast<size_t>(s.Lk));
    REQUIRE(d.labels.roles.size() == static_cast<size_t>(s.Lk));
    CHECK(d.labels.roles[0] == Role::key);
    CHECK(d.labels.roles[1] == Role::value);
    CHECK(d.labels.tokens[0][0] == 'k');

    // delta from v, w_dt, a as the inspector computes it, and the selection of that delta.
    dma::Options opt;
    opt.window = d.window;
    const dma::Problem<float> p = bundle_inputs(d, opt);
    const std::vector<float> delta = dma::dynamic_weights(s, d.form, p.v, p.w_dt, p.a);
    const std::vector<float> stored = dma::npy_to_float<float>(d.bundle.arrays.at("delta"), "delta");
    CHECK(dma::max_rel_error(delta, stored) <= 1e-6);
    CHECK(dma::evict_positions(s, d.window, delta) == l.evict);
    CHECK(dma::evict_positions(s, d.window, stored) == l.evict);

    REQUIRE(l.stats.size() == static_cast<size_t>(s.Hd));
    for (const SelectionStats& st : l.stats) {
      CHECK(st.has_roles);
      CHECK(st.kept > 0);
      CHECK(st.mean_distance > 0);
    }
  }
}

}  // TEST_SUITE
