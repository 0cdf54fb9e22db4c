// The slot view (centre column, instead of the large view): the candidate table of the shown
// head's (b, delta head), as dma::candidate_table builds it for the GPU's mask phase and the tiled
// CPU code (docs/design.md §2.8, §2.9). Query tiles down, slots across; a cell is the key that
// slot holds at that tile, coloured by its position. Every key keeps one slot for its whole run of
// tiles, so a key is a vertical bar; the atomic-free backward sweeps a block of Bk slots down the
// tiles and writes each key's dk, dv, ddelta once, at the end of its bar.
#include <imgui.h>

#include <algorithm>
#include <cstdio>

#include "dma/candidates.hpp"
#include "dma/mask_rule.hpp"
#include "format.hpp"
#include "panels.hpp"
#include "tiles.hpp"

namespace dma::viewer {
namespace {

ImVec2 vec(float x, float y) { return ImVec2(x, y); }

// The table of the shown (b, delta head), rebuilt when the result, the batch or the head changes.
void update_table(InspectorState& st, int64_t b, int64_t hd) {
  const Views& v = *st.snap->views;
  const Shape& s = v.shape;
  char key[96];
  std::snprintf(key, sizeof key, "v%llu b%lld d%lld", static_cast<unsigned long long>(v.id),
                static_cast<long long>(b), static_cast<long long>(hd));
  if (st.slot_key == key) return;
  const int64_t* evict_bh = v.evict.data() + (b * s.Hd + hd) * s.Lk;
  st.slot_table = candidate_table(evict_bh, s.Lq, s.Lk, v.opt.causal, v.opt.window, v.Bq);
  st.slot_runs = key_runs(st.slot_table, s.Lk);
  st.slot_work = slot_work(st.slot_table, evict_bh, s.Lq, s.Lk, v.opt.causal, v.Bk, s.Hq / s.Hd);
  st.slot_key = key;
  TextureSlot& tex = st.slots["slot_table"];
  const Image img = slot_image(st.slot_table, s.Lk);
  tex.id = st.textures->upload(tex.id, img);
  tex.width = img.width;
  tex.height = img.height;
  tex.key = key;
}

void counters(const InspectorState& st, const Views& v) {
  const SlotWork& w = st.slot_work;
  const Shape& s = v.shape;
  const int64_t bound = std::min(v.opt.window + v.Bq, s.Lk);
  ImGui::Text("%lld query tiles x %lld slots used (stride min(w + Bq, Lk) = %lld); largest list %lld",
              (long long)w.tiles, (long long)w.slots_used, (long long)bound, (long long)w.max_candidates);
  ImGui::Text("slot sweep: %s slot blocks of Bk = %lld visited, %s skipped (all empty); "
              "%s keys written once",
              format_count(w.slot_blocks_visited).c_str(), (long long)v.Bk,
              format_count(w.slot_blocks_skipped).c_str(), format_count(w.keys_alive).c_str());
  ImGui::Text("pairs swept %s = %.3fx the %s kept; list chunks without the element test %s of %s",
              format_count(w.pairs_swept).c_str(), w.sweep_overhead(),
              format_count(w.pairs_kept).c_str(), format_count(w.chunks_unmasked).c_str(),
              format_count(w.chunks_unmasked + w.chunks_masked).c_str());
  help_marker("Counted from this table for the query heads of this delta head, as the tiled gather\n"
              "mode counts them. A slot block is Bk consecutive slots; at a tile where all its\n"
              "slots are empty the sweep skips it. Pairs swept: tile rows x slots of the visited\n"
              "blocks (empty slots included: the GPU computes them masked) - the slot backward's\n"
              "work, against the kept pairs, the least any method must do. A list chunk of Bk\n"
              "keys inside the fully kept head of a tile's list needs no element mask.");
}

void tooltip(const InspectorState& st, const Views& v, int64_t b, int64_t hd, const Cell& c) {
  const Shape& s = v.shape;
  const CandidateTable& tb = st.slot_table;
  const int64_t t = c.row, slot = c.col;
  const int64_t i0 = t * tb.Bq, i1 = std::min(s.Lq, i0 + tb.Bq) - 1;
  const int64_t p_first = rule::query_position<int64_t>(s.Lq, s.Lk, v.opt.causal, i0);
  const int64_t p_last = rule::query_position<int64_t>(s.Lq, s.Lk, v.opt.causal, i1);
  ImGui::BeginTooltip();
  ImGui::Text("query tile %lld: queries %lld-%lld (positions %lld-%lld), %d candidates, %d fully kept",
              (long long)t, (long long)i0, (long long)i1, (long long)p_first, (long long)p_last,
              tb.n_alive[t], tb.n_full[t]);
  const int64_t j = tb.key(t, slot);
  if (j < 0) {
    ImGui::Text("slot %lld: empty at this tile", (long long)slot);
  } else {
    const int64_t e = v.evict[(b * s.Hd + hd) * s.Lk + j];
    const KeyRun& r = st.slot_runs[j];
    ImGui::Text("slot %lld: key j = %lld, delta_j = %.6g", (long long)slot, (long long)j,
                static_cast<double>(v.delta[(b * s.Hd + hd) * s.Lk + j]));
    ImGui::Text("eviction position e_j = %lld: kept by the query positions %lld-%lld", (long long)e,
                (long long)j, (long long)e);
    const int64_t run = r.last_tile - r.first_tile + 1;
    ImGui::Text("run: query tiles %lld-%lld (%lld tile%s), in slot %lld the whole time",
                (long long)r.first_tile, (long long)r.last_tile, (long long)run, run == 1 ? "" : "s",
                (long long)r.slot);
    const bool full = j <= p_first && e >= p_last;
    int64_t rows_keeping = 0;
    for (int64_t i = i0; i <= i1; ++i)
      rows_keeping += rule::is_kept(j, rule::query_position<int64_t>(s.Lq, s.Lk, v.opt.causal, i), e);
    if (full)
      ImGui::Text("at this tile: kept by all %lld queries (the list's head: no element mask)",
                  (long long)(i1 - i0 + 1));
    else
      ImGui::Text("at this tile: kept by %lld of its %lld queries (element mask)",
                  (long long)rows_keeping, (long long)(i1 - i0 + 1));
    ImGui::TextDisabled("the slot sweep writes its dk, dv and ddelta once, after tile %lld",
                        (long long)r.last_tile);
  }
  ImGui::EndTooltip();
}

}  // namespace

void panel_slots(InspectorState& st) {
  const Views& v = *st.snap->views;
  const Shape& s = v.shape;
  ViewState& vs = st.view;
  const int hq = vs.shown_head();
  const int64_t b = vs.batch, hd = s.delta_head(hq);
  update_table(st, b, hd);
  const CandidateTable& tb = st.slot_table;

  const Rgba hue = head_hue(hq, static_cast<int>(s.Hq));
  ImGui::TextColored(ImGui::ColorConvertU32ToFloat4(to_imu32(hue)), "head %d", hq);
  ImGui::SameLine();
  ImGui::TextDisabled("delta head %lld, batch %lld%s - candidate lists and slots (Bq = %lld)",
                      (long long)hd, (long long)b, vs.preview_head >= 0 ? " (preview)" : "",
                      (long long)v.Bq);
  counters(st, v);

  // The table: tile labels on the left, slot labels above, a legend below.
  const float label_w = 96.0f, line = ImGui::GetTextLineHeightWithSpacing();
  const ImVec2 origin = ImGui::GetCursorScreenPos();
  const ImVec2 avail = ImGui::GetContentRegionAvail();
  const Rect img{origin.x + label_w, origin.y + line, avail.x - label_w - 8,
                 std::max(avail.y - 3 * line, 8.0f)};
  vs.slot_rect = img;
  vs.slot_hover.reset();
  const int64_t rows = tb.tiles, cols = std::max<int64_t>(tb.slots_used, 1);
  if (img.w < 8 || img.h < 8 || rows == 0) return;
  ImDrawList* dl = ImGui::GetWindowDrawList();
  const ImU32 text = ImGui::GetColorU32(ImGuiCol_Text);
  dl->AddText(vec(origin.x, origin.y), text, "tile \\ slot");
  ImGui::SetCursorScreenPos(vec(img.x, img.y));
  ImGui::InvisibleButton("slots", vec(img.w, img.h));
  const bool hovered = ImGui::IsItemHovered();
  dl->AddImage(st.slots["slot_table"].id, vec(img.x, img.y), vec(img.x + img.w, img.y + img.h));

  // Slot blocks of the sweep: a line every Bk slots, labelled; tiles: a line per tile if roomy.
  const float cell_w = img.w / cols, cell_h = img.h / rows;
  char buf[64];
  for (int64_t s0 = 0; s0 < cols; s0 += v.Bk) {
    const float x = img.x + s0 * cell_w;
    if (s0 > 0) dl->AddLine(vec(x, img.y), vec(x, img.y + img.h), IM_COL32(255, 255, 255, 110));
    std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(s0));
    dl->AddText(vec(x + 2, origin.y), text, buf);
  }
  const int64_t label_every = std::max<int64_t>(1, static_cast<int64_t>(line / std::max(cell_h, 1.0f)) + 1);
  for (int64_t t = 0; t < rows; ++t) {
    const float y = img.y + t * cell_h;
    if (t > 0 && cell_h >= 6) dl->AddLine(vec(img.x, y), vec(img.x + img.w, y), IM_COL32(0, 0, 0, 90));
    if (t % label_every == 0) {
      std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(t));
      dl->AddText(vec(origin.x + 4, y + 0.5f * cell_h - 0.5f * ImGui::GetTextLineHeight()), text, buf);
    }
  }

  std::optional<Cell> cell;
  if (hovered) cell = cell_at(img, rows, cols, ImGui::GetIO().MousePos.x, ImGui::GetIO().MousePos.y);
  if (st.script_hover) {  // headless: (query tile, slot); the platform moves the mouse there
    const Cell c{std::min(st.script_hover->row, rows - 1), std::min(st.script_hover->col, cols - 1)};
    const Rect r = cells_rect(img, rows, cols, c.row, c.row + 1, c.col, c.col + 1);
    st.script_mouse = vec(r.x + 0.5f * r.w, r.y + 0.5f * r.h);
  }
  if (cell && cell->col < tb.slots_used) {
    vs.slot_hover = cell;
    // The hovered tile's row, and the hovered key's run (its bar) in its slot.
    const Rect row = cells_rect(img, rows, cols, cell->row, cell->row + 1, 0, cols);
    dl->AddRect(vec(row.x, row.y), vec(row.x + row.w, row.y + row.h), to_imu32(hue), 0, 0, 2);
    const int64_t j = tb.key(cell->row, cell->col);
    if (j >= 0) {
      const KeyRun& r = st.slot_runs[j];
      const Rect bar = cells_rect(img, rows, cols, r.first_tile, r.last_tile + 1, r.slot, r.slot + 1);
      dl->AddRect(vec(bar.x - 1, bar.y - 1), vec(bar.x + bar.w + 1, bar.y + bar.h + 1),
                  IM_COL32(255, 255, 255, 255), 0, 0, 2);
    }
    tooltip(st, v, b, hd, *cell);
  }
  dl->AddRect(vec(img.x - 1, img.y - 1), vec(img.x + img.w + 1, img.y + img.h + 1), to_imu32(hue, 0.8f));

  // Legend: the key position colours.
  const float ly = img.y + img.h + 6, lw = std::min(240.0f, img.w * 0.4f);
  const int steps = 32;
  for (int n = 0; n < steps; ++n) {
    const ImU32 c0 = to_imu32(viridis(static_cast<float>(n) / steps));
    const ImU32 c1 = to_imu32(viridis(static_cast<float>(n + 1) / steps));
    dl->AddRectFilledMultiColor(vec(img.x + lw * n / steps, ly), vec(img.x + lw * (n + 1) / steps, ly + 12),
                                c0, c1, c1, c0);
  }
  std::snprintf(buf, sizeof buf, "key position 0 .. %lld", static_cast<long long>(s.Lk - 1));
  dl->AddText(vec(img.x + lw + 8, ly - 1), text, buf);
  dl->AddRectFilled(vec(img.x + lw + 190, ly), vec(img.x + lw + 202, ly + 12), to_imu32(kDroppedDark));
  dl->AddRect(vec(img.x + lw + 190, ly), vec(img.x + lw + 202, ly + 12), IM_COL32(200, 200, 200, 120));
  dl->AddText(vec(img.x + lw + 208, ly - 1), text, "empty slot");
  ImGui::SetCursorScreenPos(vec(origin.x, ly + line));
}

}  // namespace dma::viewer
