// The slot view of the inspector: the pure helpers that read a candidate table (key runs, the
// picture, the work of the slot sweep, checked against the counters of dma::tiled_forward and
// tiled_backward), and the real panel in a Dear ImGui context with a fake mouse, no window.
#include <doctest/doctest.h>
#include <imgui.h>

#include <algorithm>
#include <random>

#include "dma/candidates.hpp"
#include "dma/mask.hpp"
#include "dma/numerics.hpp"
#include "dma/tiled.hpp"
#include "inspector.hpp"
#include "panels.hpp"
#include "test_util.hpp"
#include "test_viewer_context.hpp"
#include "tiles.hpp"

using namespace dma::viewer;

namespace {

std::vector<float> random_delta(std::mt19937& rng, int64_t n) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> d(static_cast<size_t>(n));
  for (float& x : d) x = normal(rng);
  return d;
}

using Context = dma_test::ImGuiContextForTest;
using dma_test::FakeTextures;
using dma_test::frame;

}  // namespace

TEST_SUITE("gui") {

TEST_CASE("slot view helpers: key runs and the picture follow the table") {
  std::mt19937 rng(7);
  for (const auto& [Lq, Lk, w, Bq, causal] :
       {std::tuple<int64_t, int64_t, int64_t, int64_t, bool>{96, 96, 12, 16, true},
        {40, 100, 9, 8, true}, {33, 33, 1, 4, true}, {20, 50, 7, 8, false}, {64, 64, 100, 16, true}}) {
    const dma::Shape s = dma_test::make_shape(1, 1, 1, 1, Lq, Lk, 1);
    const std::vector<int64_t> evict = dma::evict_positions(s, w, random_delta(rng, Lk));
    const dma::CandidateTable c = dma::candidate_table(evict.data(), Lq, Lk, causal, w, Bq);
    const std::vector<KeyRun> runs = key_runs(c, Lk);
    REQUIRE(runs.size() == static_cast<size_t>(Lk));
    for (int64_t j = 0; j < Lk; ++j) {
      const KeyRun& r = runs[j];
      for (int64_t t = 0; t < c.tiles; ++t) {  // in its slot exactly on its run, nowhere else
        const bool on_run = r.first_tile >= 0 && r.first_tile <= t && t <= r.last_tile;
        for (int64_t sl = 0; sl < c.stride; ++sl)
          CHECK((c.key(t, sl) == j) == (on_run && sl == r.slot));
      }
      if (r.first_tile < 0) {  // no tile has it: no query keeps it
        for (int64_t i = 0; i < Lq; ++i)
          CHECK_FALSE(dma::is_kept(j, dma::query_position(s, causal, i), evict[j]));
      }
    }
    const Image img = slot_image(c, Lk);
    CHECK(img.width == c.slots_used);
    CHECK(img.height == c.tiles);
    for (int64_t t = 0; t < c.tiles; ++t)
      for (int64_t sl = 0; sl < c.slots_used; ++sl) {
        const int64_t j = c.key(t, sl);
        const Rgba want = j < 0 ? kDroppedDark : viridis(static_cast<float>(j) / (Lk - 1));
        CHECK(img.pixels[t * img.width + sl] == want);
      }
  }
}

TEST_CASE("slot view counters equal what dma::tiled_forward and tiled_backward count") {
  std::mt19937 rng(11);
  struct Case { dma::Shape s; int64_t w, Bq, Bk; bool causal; };
  const Case cases[] = {
      {dma_test::make_shape(1, 2, 1, 1, 80, 80, 4), 10, 16, 8, true},   // two query heads on one table
      {dma_test::make_shape(1, 2, 1, 2, 70, 90, 4), 7, 8, 16, true},    // Hd = Hq: a table per head
      {dma_test::make_shape(2, 1, 1, 1, 45, 45, 4), 5, 7, 3, true},     // batches, odd tiles
      {dma_test::make_shape(1, 1, 1, 1, 30, 60, 4), 6, 8, 8, false},    // non-causal
  };
  for (const Case& c : cases) {
    const dma::Shape& s = c.s;
    dma::Options opt;
    opt.window = c.w;
    opt.causal = c.causal;
    const std::vector<float> delta = random_delta(rng, s.delta_numel());
    const std::vector<int64_t> evict = dma::evict_positions(s, c.w, delta);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> q(s.q_numel()), k(s.kv_numel()), v(s.kv_numel()), dout(s.q_numel());
    for (auto* t : {&q, &k, &v, &dout})
      for (float& x : *t) x = normal(rng);
    const dma::TileConfig tc{c.Bq, c.Bk, dma::TileMode::gather};
    dma::TileCounters fc, bc;
    const dma::ForwardResult<float> fwd = dma::tiled_forward(s, opt, tc, q, k, v, delta, evict, &fc);
    dma::tiled_backward(s, opt, tc, q, k, v, delta, evict, fwd, dout, &bc);

    SlotWork sum;
    for (int64_t bd = 0; bd < s.B * s.Hd; ++bd) {
      const int64_t* e = evict.data() + bd * s.Lk;
      const dma::CandidateTable t = dma::candidate_table(e, s.Lq, s.Lk, c.causal, c.w, c.Bq);
      const SlotWork w = slot_work(t, e, s.Lq, s.Lk, c.causal, c.Bk, s.Hq / s.Hd);
      sum.slots_used = std::max(sum.slots_used, w.slots_used);
      sum.max_candidates = std::max(sum.max_candidates, w.max_candidates);
      sum.keys_alive += w.keys_alive;
      sum.slot_blocks_visited += w.slot_blocks_visited;
      sum.slot_blocks_skipped += w.slot_blocks_skipped;
      sum.pairs_swept += w.pairs_swept;
      sum.pairs_kept += w.pairs_kept;
      sum.chunks_unmasked += w.chunks_unmasked;
      sum.chunks_masked += w.chunks_masked;
    }
    CHECK(sum.slots_used == fc.slots_used);
    CHECK(sum.max_candidates == fc.max_candidates);
    CHECK(sum.keys_alive == bc.key_writes);
    CHECK(sum.slot_blocks_visited == bc.slot_blocks_visited);
    CHECK(sum.slot_blocks_skipped == bc.slot_blocks_skipped);
    CHECK(sum.pairs_swept == bc.pairs_swept);
    CHECK(sum.pairs_kept == fc.pairs_kept);
    CHECK(sum.chunks_unmasked == fc.chunks_unmasked);
    CHECK(sum.chunks_masked == fc.chunks_masked);
  }
}

TEST_CASE("panels: the slot view draws the shown head's table and hovers a key") {
  Context ctx;
  FakeTextures textures;
  Worker worker(nullptr);
  InspectorState st;
  st.worker = &worker;
  st.textures = &textures;
  st.params.source = Source::random;
  st.params.Lq = st.params.Lk = 256;
  st.params.Hq = 4;
  st.params.Hkv = 2;
  st.params.window = 24;
  st.params.Bq = st.params.Bk = 32;
  st.params.a = default_a(st.params.Hd());
  st.params.run = {true, false, false, true, false};
  worker.request(st.params);
  REQUIRE(worker.wait_idle(120));
  st.view.slot_view = true;
  st.view.locked_head = 3;
  frame(st, -1000, -1000);
  REQUIRE(st.snap.get() != nullptr);
  REQUIRE(st.snap->views.get() != nullptr);
  const Views& v = *st.snap->views;
  const dma::Shape& s = v.shape;
  const int64_t hd = s.delta_head(3);
  const dma::CandidateTable want =
      dma::candidate_table(v.evict.data() + hd * s.Lk, s.Lq, s.Lk, v.opt.causal, v.opt.window, v.Bq);
  CHECK(st.slot_table.slot_key == want.slot_key);
  CHECK(st.slot_table.list == want.list);
  CHECK(st.slot_work.keys_alive > 0);
  CHECK(st.view.slot_rect.w > 100);
  CHECK(st.view.slot_rect.h > 100);
  const int uploads = textures.uploads;
  frame(st, -1000, -1000);
  CHECK(textures.uploads == uploads);  // an idle frame rebuilds nothing

  // Hover the cell (tile 5, slot 3): the panel reports it; its tooltip reads that key.
  const dma::CandidateTable& tb = st.slot_table;
  const Rect r = cells_rect(st.view.slot_rect, tb.tiles, tb.slots_used, 5, 6, 3, 4);
  frame(st, r.x + 0.5f * r.w, r.y + 0.5f * r.h);
  REQUIRE(st.view.slot_hover.has_value());
  CHECK(*st.view.slot_hover == Cell{5, 3});
  frame(st, -1000, -1000);
  CHECK_FALSE(st.view.slot_hover.has_value());

  // Another delta head: a new table.
  st.view.locked_head = 0;
  frame(st, -1000, -1000);
  const dma::CandidateTable head0 =
      dma::candidate_table(v.evict.data(), s.Lq, s.Lk, v.opt.causal, v.opt.window, v.Bq);
  CHECK(st.slot_table.slot_key == head0.slot_key);
  CHECK(textures.uploads == uploads + 1);
  release_textures(st);
  st.worker = nullptr;
}

}  // TEST_SUITE
