// The centre column: head thumbnails (hover to preview, click to lock), the large view of one
// head with its overlays and colour bar, and the bar plot of delta per key.
#include <imgui.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "dma/mask_rule.hpp"
#include "format.hpp"
#include "panels.hpp"
#include "tiles.hpp"

namespace dma::viewer {
namespace {

ImVec2 vec(float x, float y) { return ImVec2(x, y); }

bool is_key_view(const HeadMatrix& m) { return m.last_allowed != nullptr; }  // queries x keys

// Hatches rectangle r with 45-degree lines `gap` pixels apart, clipped analytically (one clip
// rect per tile would cost a draw call each).
void hatch(ImDrawList* dl, const Rect& r, float gap, ImU32 col) {
  const float x0 = r.x, y0 = r.y, x1 = r.x + r.w, y1 = r.y + r.h;
  // Lines x - y = c for c from x0 - y1 to x1 - y0.
  const float c0 = std::ceil((x0 - y1) / gap) * gap;
  for (float c = c0; c <= x1 - y0; c += gap) {
    const float ya = std::max(y0, x0 - c), yb = std::min(y1, x1 - c);
    if (ya >= yb) continue;
    dl->AddLine(vec(ya + c, ya), vec(yb + c, yb), col);
  }
}

void colour_bar(ImDrawList* dl, const HeadMatrix& m, float x, float y, float h) {
  const float bar_w = 14.0f;
  // The mask is 0/1 per cell, but a downsampled texel holds the fraction kept: a gradient too.
  const int steps = 48;
  for (int i = 0; i < steps; ++i) {
    // Top is the high end.
    const float t0 = 1.0f - static_cast<float>(i) / steps, t1 = 1.0f - static_cast<float>(i + 1) / steps;
    const float v0 = m.range.lo + (m.range.hi - m.range.lo) * t0;
    const float v1 = m.range.lo + (m.range.hi - m.range.lo) * t1;
    const ImU32 c0 = to_imu32(map_value(m.map, v0, m.range.lo, m.range.hi));
    const ImU32 c1 = to_imu32(map_value(m.map, v1, m.range.lo, m.range.hi));
    const float ya = y + h * i / steps, yb = y + h * (i + 1) / steps;
    dl->AddRectFilledMultiColor(vec(x, ya), vec(x + bar_w, yb + 0.5f), c0, c0, c1, c1);
  }
  dl->AddRect(vec(x, y), vec(x + bar_w, y + h), IM_COL32(200, 200, 200, 120));
  char buf[32];
  const ImU32 text = ImGui::GetColorU32(ImGuiCol_Text);
  auto label = [&](const char* prefix, float value, float ly) {
    std::snprintf(buf, sizeof buf, "%s%.3g", prefix, static_cast<double>(value));
    dl->AddText(vec(x + bar_w + 4, ly - 6), text, buf);
  };
  if (m.binary) {
    dl->AddText(vec(x + bar_w + 4, y), text, "kept");
    dl->AddText(vec(x + bar_w + 4, y + h * 0.5f - 6), text, "50%");
    dl->AddText(vec(x + bar_w + 4, y + h - 12), text, "dropped");
  } else {
    // A clipped range says so: the end colours stand for everything beyond.
    const bool sym = m.map == ColorMap::diverging;
    label(m.clipped ? ">=" : "", m.range.hi, y + 6);
    label("", 0.5f * (m.range.lo + m.range.hi), y + h * 0.5f);
    label(m.clipped && sym ? "<=" : "", m.range.lo, y + h - 6);
  }
  if (is_key_view(m)) {  // the two colours that carry no value
    const float ly = y + h + 8;
    dl->AddRectFilled(vec(x, ly), vec(x + 10, ly + 10), to_imu32(kCausalGrey));
    dl->AddText(vec(x + 14, ly - 2), text, "causal");
    if (m.binary) return;  // the mask shows dropped cells with a colour of its own
    dl->AddRectFilled(vec(x, ly + 16), vec(x + 10, ly + 26), to_imu32(kDroppedDark));
    dl->AddRect(vec(x, ly + 16), vec(x + 10, ly + 26), IM_COL32(120, 120, 120, 255));
    dl->AddText(vec(x + 14, ly + 14), text, "dropped");
  }
}

// The role of the tokens at positions [p0, p1): key or value wins over query, query over filler,
// so a pixel that holds a key-value pair among filler shows it.
Role strongest_role(const std::vector<Role>& roles, int64_t p0, int64_t p1) {
  Role best = Role::filler;
  for (int64_t p = std::max<int64_t>(p0, 0); p < p1 && p < static_cast<int64_t>(roles.size()); ++p) {
    const Role r = roles[static_cast<size_t>(p)];
    if (r == Role::key || r == Role::value) return r;
    if (r == Role::query) best = r;
  }
  return best;
}

// One strip per axis, a pixel per column (keys, under the image) and per row (queries, left).
void role_strips(ImDrawList* dl, const std::vector<Role>& roles, const Shape& s, const Window& w,
                 const Rect& img) {
  const int cols = std::max(1, static_cast<int>(std::min<float>(img.w, static_cast<float>(w.cols()))));
  for (int c = 0; c < cols; ++c) {
    const int64_t j0 = w.c0 + w.cols() * c / cols, j1 = std::max(j0 + 1, w.c0 + w.cols() * (c + 1) / cols);
    const float x0 = img.x + img.w * c / cols, x1 = img.x + img.w * (c + 1) / cols;
    dl->AddRectFilled(vec(x0, img.y + img.h + 2), vec(std::max(x1, x0 + 1), img.y + img.h + 6),
                      to_imu32(role_colour(strongest_role(roles, j0, j1))));
  }
  const int rows = std::max(1, static_cast<int>(std::min<float>(img.h, static_cast<float>(w.rows()))));
  const int64_t shift = s.Lk - s.Lq;  // query i sits at token position i + Lk - Lq
  for (int r = 0; r < rows; ++r) {
    const int64_t i0 = w.r0 + w.rows() * r / rows, i1 = std::max(i0 + 1, w.r0 + w.rows() * (r + 1) / rows);
    const float y0 = img.y + img.h * r / rows, y1 = img.y + img.h * (r + 1) / rows;
    dl->AddRectFilled(vec(img.x - 7, y0), vec(img.x - 3, std::max(y1, y0 + 1)),
                      to_imu32(role_colour(strongest_role(roles, i0 + shift, i1 + shift))));
  }
}

}  // namespace

std::string cell_label(const HeadMatrix& m, const Cell& c, const Shape& s, const TokenLabels* labels) {
  // Rows are queries (at token position i + Lk - Lq) or keys; columns keys or the head dim.
  const int64_t row_pos = m.row_name == "query" ? c.row + (s.Lk - s.Lq) : c.row;
  const bool col_tokens = m.col_name == "key";
  return axis_label(m.row_name.c_str(), c.row, labels, row_pos) + ", " +
         axis_label(m.col_name.c_str(), c.col, col_tokens ? labels : nullptr, c.col);
}

namespace {

const char* tile_class_name(TileClass c) {
  switch (c) {
    case TileClass::outside: return "outside the causal region (never visited)";
    case TileClass::skipped: return "skipped (no kept key)";
    case TileClass::visited: return "visited";
  }
  return "?";
}

}  // namespace

// ---- thumbnails ------------------------------------------------------------------------------

void panel_head_thumbnails(InspectorState& st) {
  const Views& v = *st.snap->views;
  const Shape& s = v.shape;
  ImGui::TextUnformatted("Heads");
  help_marker("One thumbnail per query head, in the view chosen below. Hover to preview a head\n"
              "in the large view, click to lock it. Heads of one delta head share a mask.");
  if (s.B > 1) {
    ImGui::SameLine();
    ImGui::SetNextItemWidth(120);
    ImGui::SliderInt("batch", &st.view.batch, 0, static_cast<int>(s.B) - 1);
  }
  st.view.batch = std::clamp(st.view.batch, 0, static_cast<int>(s.B) - 1);
  st.view.locked_head = std::clamp(st.view.locked_head, 0, static_cast<int>(s.Hq) - 1);

  const int n = static_cast<int>(s.Hq);
  const float spacing = ImGui::GetStyle().ItemSpacing.x;
  const float avail = ImGui::GetContentRegionAvail().x;
  const float size = std::clamp((avail - spacing * (n - 1)) / n, 56.0f, 128.0f);
  const int per_row = std::max(1, static_cast<int>((avail + spacing) / (size + spacing)));
  int64_t rows = 0, cols = 0;
  view_dims(s, st.view.kind, st.view.diff, &rows, &cols);
  ImDrawList* dl = ImGui::GetWindowDrawList();
  st.view.thumb_rects.assign(static_cast<size_t>(n), Rect{});

  for (int hq = 0; hq < n; ++hq) {
    if (hq % per_row) ImGui::SameLine();
    ImGui::PushID(hq);
    const ImVec2 p = ImGui::GetCursorScreenPos();
    const float label_h = ImGui::GetTextLineHeight();
    ImGui::InvisibleButton("thumb", vec(size, size + label_h + 2));
    const bool hovered = ImGui::IsItemHovered();
    if (ImGui::IsItemClicked()) st.view.locked_head = hq;
    if (hovered) st.view.preview_head = hq;

    st.view.thumb_rects[hq] = Rect{p.x, p.y, size, size};
    const float inner = size - 4;
    char slot[16];
    std::snprintf(slot, sizeof slot, "thumb%d", hq);
    const TextureSlot& tex =
        heatmap_texture(st, slot, matrix_key(st, st.view.kind, hq), rows, cols, inner, inner, [&] {
          return head_matrix(v, st.snap->compare.get(), st.view.kind, st.view.diff,
                             st.view.batch, hq, st.view.log_scale);
        });
    const ImVec2 a = vec(p.x + 2, p.y + 2), b = vec(p.x + 2 + inner, p.y + 2 + inner);
    if (tex.width > 0) dl->AddImage(tex.id, a, b);
    else dl->AddRectFilled(a, b, IM_COL32(40, 40, 46, 255));
    const Rgba hue = head_hue(hq, n);
    const bool locked = hq == st.view.locked_head;
    dl->AddRect(vec(p.x, p.y), vec(p.x + size, p.y + size),
                hovered ? IM_COL32(255, 255, 255, 255) : to_imu32(hue, locked ? 1.0f : 0.55f), 0.0f,
                0, locked ? 3.0f : 1.5f);
    char label[48];
    std::snprintf(label, sizeof label, "h%d%s", hq, locked ? " (locked)" : "");
    dl->AddText(vec(p.x + 2, p.y + size + 1), to_imu32(hue), label);
    if (hovered) {
      ImGui::BeginTooltip();
      ImGui::Text("query head %d: kv head %lld, delta head %lld", hq, (long long)s.kv_head(hq),
                  (long long)s.delta_head(hq));
      // What this head selects, over all its queries (the current result's mask).
      const BundleData* data = snapshot_data(st);
      const std::vector<Role>* roles =
          data && static_cast<int64_t>(data->labels.roles.size()) == s.Lk ? &data->labels.roles : nullptr;
      const SelectionStats ss = selection_stats(v.evict.data() + (st.view.batch * s.Hd + s.delta_head(hq)) * s.Lk,
                                                s.Lq, s.Lk, v.opt.causal, roles);
      ImGui::Text("kept (query, key) pairs: %s, mean distance query - key %.2f",
                  format_count(ss.kept).c_str(), ss.mean_distance);
      if (ss.has_roles)
        ImGui::Text("kept keys: key %s, value %s, query %s, filler %s",
                    format_percent(ss.share(Role::key)).c_str(), format_percent(ss.share(Role::value)).c_str(),
                    format_percent(ss.share(Role::query)).c_str(), format_percent(ss.share(Role::filler)).c_str());
      ImGui::TextDisabled(locked ? "locked" : "click to lock");
      ImGui::EndTooltip();
    }
    ImGui::PopID();
  }
}

// ---- the large view --------------------------------------------------------------------------

void panel_head_view(InspectorState& st, float bars_height) {
  const Views& v = *st.snap->views;
  const Shape& s = v.shape;
  ViewState& vs = st.view;

  // Toolbar: which quantity, and the overlays.
  int kind = static_cast<int>(vs.kind);
  for (int k = 0; k < kViewKindCount; ++k) {
    if (k) ImGui::SameLine();
    ImGui::RadioButton(view_label(static_cast<ViewKind>(k)), &kind, k);
  }
  vs.kind = static_cast<ViewKind>(kind);
  help_marker(view_help(vs.kind));
  if (vs.kind == ViewKind::diff) {
    ImGui::SameLine();
    int t = static_cast<int>(vs.diff);
    ImGui::SetNextItemWidth(70);
    ImGui::Combo("tensor", &t, "o\0dq\0dk\0dv\0");
    vs.diff = static_cast<DiffTensor>(t);
  }
  ImGui::Checkbox("tile grid", &vs.show_grid);
  help_marker("The Bq x Bk tiles of the tiled kernels.");
  ImGui::SameLine();
  ImGui::Checkbox("skipped tiles", &vs.show_skipped);
  help_marker("Hatched: tiles in the causal region that hold no kept key. The skip mode leaves\n"
              "them out, exactly (their p is 0).");
  ImGui::SameLine();
  ImGui::Checkbox("gathered keys", &vs.show_gathered);
  help_marker("For the query tile under the mouse: the candidate keys gather mode collects (the\n"
              "union of the keys its queries keep), at most w + Bq of them.");
  ImGui::SameLine();
  ImGui::Checkbox("log10", &vs.log_scale);
  help_marker("Probabilities on a log10 scale (floor 1e-8).");

  const int hq = vs.shown_head();
  const HeadMatrix& m = large_matrix(st, hq);
  const Rgba hue = head_hue(hq, static_cast<int>(s.Hq));
  ImGui::TextColored(ImGui::ColorConvertU32ToFloat4(to_imu32(hue)), "head %d", hq);
  ImGui::SameLine();
  ImGui::TextDisabled("kv head %lld, delta head %lld%s - %s", (long long)s.kv_head(hq),
                      (long long)s.delta_head(hq), vs.preview_head >= 0 ? " (preview)" : "",
                      m.valid ? m.title.c_str() : "");
  if (!m.valid) {
    ImGui::TextWrapped("%s", m.why_not.c_str());
    ImGui::Dummy(vec(0, std::max(0.0f, ImGui::GetContentRegionAvail().y - bars_height)));
    return;
  }

  const float line = ImGui::GetTextLineHeightWithSpacing();
  const ImVec2 origin = ImGui::GetCursorScreenPos();
  const ImVec2 avail = ImGui::GetContentRegionAvail();
  const float bar_col = 84.0f;
  const Rect area{origin.x, origin.y, avail.x - bar_col, avail.y - bars_height - 2 * line};
  const Rect img = fit_rect(area, m.rows, m.cols);
  vs.image_rect = img;
  if (img.w < 8 || img.h < 8) return;

  // The zoom window (all of the matrix unless zoomed); another matrix size resets it.
  if (vs.zoom_rows != m.rows || vs.zoom_cols != m.cols || vs.zoom.rows() <= 0) {
    vs.zoom = full_window(m.rows, m.cols);
    vs.zoom_rows = m.rows;
    vs.zoom_cols = m.cols;
    vs.pan_anchor.reset();
  }
  if (st.script_zoom) {  // --zoom: clamped into the matrix, at least one cell
    Window z = *st.script_zoom;
    z.r0 = std::clamp<int64_t>(z.r0, 0, m.rows - 1);
    z.r1 = std::clamp<int64_t>(z.r1, z.r0 + 1, m.rows);
    z.c0 = std::clamp<int64_t>(z.c0, 0, m.cols - 1);
    z.c1 = std::clamp<int64_t>(z.c1, z.c0 + 1, m.cols);
    vs.zoom = z;
    st.script_zoom.reset();
  }
  const Window w = vs.zoom;
  const bool zoomed = !(w == full_window(m.rows, m.cols));
  // Screen rectangle of data rows [ra, rb) x cols [ca, cb), cut to the window.
  auto rect_of = [&](int64_t ra, int64_t rb, int64_t ca, int64_t cb) {
    ra = std::max(ra, w.r0);
    rb = std::min(rb, w.r1);
    ca = std::max(ca, w.c0);
    cb = std::min(cb, w.c1);
    if (ra >= rb || ca >= cb) return Rect{img.x, img.y, 0, 0};
    return cells_rect(img, w.rows(), w.cols(), ra - w.r0, rb - w.r0, ca - w.c0, cb - w.c0);
  };

  const TextureSlot& tex = matrix_texture(st, "large", st.large_key, img.w, img.h, m, w);
  ImDrawList* dl = ImGui::GetWindowDrawList();
  ImGui::SetCursorScreenPos(vec(img.x, img.y));
  ImGui::InvisibleButton("heatmap", vec(img.w, img.h),
                         ImGuiButtonFlags_MouseButtonLeft | ImGuiButtonFlags_MouseButtonRight);
  const bool hovered = ImGui::IsItemHovered();
  dl->AddImage(tex.id, vec(img.x, img.y), vec(img.x + img.w, img.y + img.h));
  dl->PushClipRect(vec(img.x, img.y), vec(img.x + img.w, img.y + img.h), true);

  const ImGuiIO& io = ImGui::GetIO();
  std::optional<Cell> cell;
  if (hovered) {
    if (const auto c = cell_at(img, w.rows(), w.cols(), io.MousePos.x, io.MousePos.y))
      cell = Cell{c->row + w.r0, c->col + w.c0};
  }
  // Zoom: the wheel scales the window around the cursor; a right-drag pans it.
  if (hovered && io.MouseWheel != 0.0f) {
    const double u = (io.MousePos.x - img.x) / img.w, v = (io.MousePos.y - img.y) / img.h;
    vs.zoom = zoom_window(w, m.rows, m.cols, std::pow(1.25, -io.MouseWheel), u, v);
  }
  if (ImGui::IsItemActive() && ImGui::IsMouseDown(ImGuiMouseButton_Right)) {
    if (!vs.pan_anchor) vs.pan_anchor = w;
    const ImVec2 drag = ImGui::GetMouseDragDelta(ImGuiMouseButton_Right, 0.0f);
    const auto dr = static_cast<int64_t>(std::lround(-drag.y / img.h * vs.pan_anchor->rows()));
    const auto dc = static_cast<int64_t>(std::lround(-drag.x / img.w * vs.pan_anchor->cols()));
    vs.zoom = pan_window(*vs.pan_anchor, m.rows, m.cols, dr, dc);
  } else {
    vs.pan_anchor.reset();
  }
  if (st.script_hover) {  // headless: the platform moves the mouse to this cell next frame
    const Cell c{std::min(st.script_hover->row, m.rows - 1), std::min(st.script_hover->col, m.cols - 1)};
    const Rect r = rect_of(c.row, c.row + 1, c.col, c.col + 1);
    if (r.w > 0) st.script_mouse = vec(r.x + 0.5f * r.w, r.y + 0.5f * r.h);
  }
  if (cell && ImGui::IsItemClicked(ImGuiMouseButton_Left))
    vs.pinned = vs.pinned && *vs.pinned == *cell ? std::nullopt : cell;
  vs.hover = cell;

  const int64_t hd = s.delta_head(hq);
  const int64_t bd = vs.batch * s.Hd + hd;
  const TileGrid* grid = is_key_view(m) ? &v.tiles[bd] : nullptr;
  if (grid) {
    const float tile_w = img.w * grid->Bk / static_cast<float>(w.cols());
    const float tile_h = img.h * grid->Bq / static_cast<float>(w.rows());
    if (vs.show_skipped && tile_w >= 4 && tile_h >= 4) {  // only the tiles inside the window
      // (tiles under 4 pixels are not hatched: thousands of them would cost whole frames)
      for (int64_t qt = w.r0 / grid->Bq; qt * grid->Bq < w.r1; ++qt)
        for (int64_t kt = w.c0 / grid->Bk; kt * grid->Bk < w.c1; ++kt)
          if (grid->at(qt, kt) == TileClass::skipped)
            hatch(dl, rect_of(qt * grid->Bq, (qt + 1) * grid->Bq, kt * grid->Bk, (kt + 1) * grid->Bk),
                  std::max(4.0f, std::min(tile_w, tile_h) / 4), IM_COL32(255, 255, 255, 70));
    }
    if (vs.show_grid && tile_w >= 4 && tile_h >= 4) {
      const ImU32 col = IM_COL32(255, 255, 255, 45);
      for (int64_t k = (w.c0 / grid->Bk + 1) * grid->Bk; k < w.c1; k += grid->Bk) {
        const float x = img.x + img.w * (k - w.c0) / static_cast<float>(w.cols());
        dl->AddLine(vec(x, img.y), vec(x, img.y + img.h), col);
      }
      for (int64_t q = (w.r0 / grid->Bq + 1) * grid->Bq; q < w.r1; q += grid->Bq) {
        const float y = img.y + img.h * (q - w.r0) / static_cast<float>(w.rows());
        dl->AddLine(vec(img.x, y), vec(img.x + img.w, y), col);
      }
    }
  }

  // The hovered query tile and the keys gather mode collects for it.
  std::string gather_line;
  if (grid && cell) {
    const int64_t qt = cell->row / grid->Bq;
    const int64_t q0 = qt * grid->Bq, q1 = std::min(s.Lq, q0 + grid->Bq);
    const std::vector<int64_t> keys = gathered_keys(v.evict.data() + bd * s.Lk, s.Lq, s.Lk,
                                                    v.opt.causal, q0, q1 - 1);
    if (vs.show_gathered) {  // runs of consecutive keys as translucent columns over the band
      for (size_t a = 0; a < keys.size();) {
        size_t b = a + 1;
        while (b < keys.size() && keys[b] == keys[b - 1] + 1) ++b;
        const Rect c = rect_of(q0, q1, keys[a], keys[b - 1] + 1);
        if (c.w > 0)
          dl->AddRectFilled(vec(c.x, c.y), vec(c.x + std::max(c.w, 1.0f), c.y + c.h), to_imu32(hue, 0.35f));
        a = b;
      }
    }
    const Rect band = rect_of(q0, q1, w.c0, w.c1);
    dl->AddRect(vec(band.x, band.y), vec(band.x + band.w, band.y + band.h), to_imu32(hue), 0, 0, 2);
    char buf[160];
    std::snprintf(buf, sizeof buf, "query tile %lld (queries %lld-%lld): %lld gathered keys, bound w + Bq = %lld",
                  (long long)qt, (long long)q0, (long long)(q1 - 1), (long long)keys.size(),
                  (long long)(v.opt.window + (q1 - q0)));
    gather_line = buf;
  }
  if (cell) {  // crosshair
    const Rect r = rect_of(cell->row, cell->row + 1, cell->col, cell->col + 1);
    const ImU32 col = IM_COL32(255, 255, 255, 110);
    dl->AddLine(vec(img.x, r.y + r.h * 0.5f), vec(img.x + img.w, r.y + r.h * 0.5f), col);
    dl->AddLine(vec(r.x + r.w * 0.5f, img.y), vec(r.x + r.w * 0.5f, img.y + img.h), col);
  }
  if (vs.pinned && vs.pinned->row < m.rows && vs.pinned->col < m.cols) {
    const Rect r = rect_of(vs.pinned->row, vs.pinned->row + 1, w.c0, w.c1);
    if (r.w > 0) dl->AddRect(vec(r.x, r.y - 1), vec(r.x + r.w, r.y + r.h + 1), IM_COL32(255, 170, 40, 200));
  }
  dl->PopClipRect();
  dl->AddRect(vec(img.x - 1, img.y - 1), vec(img.x + img.w + 1, img.y + img.h + 1), to_imu32(hue, 0.8f));
  float strip_h = 0;  // roles.txt: the keys' roles under the image, the queries' on its left
  if (is_key_view(m)) {
    const BundleData* data = snapshot_data(st);
    if (data && static_cast<int64_t>(data->labels.roles.size()) == s.Lk) {
      role_strips(dl, data->labels.roles, s, w, img);
      strip_h = 6;
    }
  }
  colour_bar(dl, m, img.x + img.w + 10, img.y, std::min(img.h, std::max(img.h - 40, 60.0f)));

  // Tooltip: everything known about the cell.
  if (cell && !vs.pan_anchor) {
    ImGui::BeginTooltip();
    const float value = m.values[cell->row * m.cols + cell->col];
    const BundleData* data = snapshot_data(st);
    const TokenLabels* labels = data && static_cast<int64_t>(data->labels.tokens.size()) == s.Lk
                                    ? &data->labels : nullptr;
    ImGui::TextUnformatted(cell_label(m, *cell, s, labels).c_str());
    if (std::isnan(value)) ImGui::TextUnformatted("value: - (not kept)");
    else ImGui::Text("value: %.6g", static_cast<double>(value));
    if (grid) {
      const KeyFacts f = key_facts(v.delta.data() + bd * s.Lk, v.evict.data() + bd * s.Lk, s.Lq,
                                   s.Lk, v.opt.causal, cell->row, cell->col);
      if (!f.allowed) {
        ImGui::TextUnformatted("not allowed: key after the query's position (causal)");
      } else {
        ImGui::Text("%s, rank %lld of %lld allowed keys (w = %lld)", f.kept ? "kept" : "dropped",
                    (long long)f.rank, (long long)f.allowed_keys, (long long)v.opt.window);
        ImGui::Text("delta %.5g, query's threshold %.5g",
                    static_cast<double>(v.delta[bd * s.Lk + cell->col]), static_cast<double>(f.threshold));
      }
      const int64_t qt = cell->row / grid->Bq, kt = cell->col / grid->Bk;
      ImGui::Text("tile (%lld, %lld): %s", (long long)qt, (long long)kt,
                  tile_class_name(grid->at(qt, kt)));
      const int64_t p_first = rule::query_position<int64_t>(s.Lq, s.Lk, v.opt.causal, qt * grid->Bq);
      const int64_t e = v.evict[bd * s.Lk + cell->col];
      const bool gathered = cell->col <= v.last_allowed[std::min(s.Lq, (qt + 1) * grid->Bq) - 1] &&
                            rule::is_candidate(cell->col, e, p_first);
      ImGui::Text("key %s by its query tile (gather)", gathered ? "gathered" : "not gathered");
      if (e >= cell->col)
        ImGui::TextDisabled("key %lld is kept by the queries at positions %lld..%lld",
                            (long long)cell->col, (long long)cell->col, (long long)e);
      else
        ImGui::TextDisabled("key %lld is never kept: w keys above it arrived before it",
                            (long long)cell->col);
    }
    ImGui::TextDisabled("click: pin this query for the bar plot; wheel: zoom; right-drag: pan");
    ImGui::EndTooltip();
  }

  // Under the image: what is shown (zoom, downsampling) and the gather line.
  ImGui::SetCursorScreenPos(vec(area.x, img.y + img.h + 3 + strip_h));
  char shown[160];
  if (zoomed)
    std::snprintf(shown, sizeof shown, "%s %lld-%lld, %s %lld-%lld of %lld x %lld", m.row_name.c_str(),
                  (long long)w.r0, (long long)(w.r1 - 1), m.col_name.c_str(), (long long)w.c0,
                  (long long)(w.c1 - 1), (long long)m.rows, (long long)m.cols);
  else
    std::snprintf(shown, sizeof shown, "%lld x %lld", (long long)m.rows, (long long)m.cols);
  if (tex.factor_r > 1 || tex.factor_c > 1)
    ImGui::TextDisabled("%s shown at %d x %d: %s over %lld x %lld blocks", shown, tex.width,
                        tex.height, m.binary ? "fraction kept" : reduce_label(m.reduce),
                        (long long)tex.factor_r, (long long)tex.factor_c);
  else
    ImGui::TextDisabled("%s, one texel per cell", shown);
  if (zoomed) {
    ImGui::SameLine();
    if (ImGui::SmallButton("reset zoom")) vs.zoom = full_window(m.rows, m.cols);
  }
  if (!gather_line.empty()) ImGui::TextUnformatted(gather_line.c_str());
  // The bar plot follows right under the image (a wide matrix leaves the space below free).
  ImGui::SetCursorScreenPos(vec(origin.x, img.y + img.h + 3 + strip_h + 2 * line));
}

// ---- delta per key ---------------------------------------------------------------------------

void panel_delta_bars(InspectorState& st) {
  const Views& v = *st.snap->views;
  const Shape& s = v.shape;
  ViewState& vs = st.view;
  const int hq = vs.shown_head();
  const int64_t bd = vs.batch * s.Hd + s.delta_head(hq);
  const float* delta = v.delta.data() + bd * s.Lk;
  const int64_t* evict = v.evict.data() + bd * s.Lk;
  const bool key_view = vs.kind != ViewKind::dq && vs.kind != ViewKind::diff;

  // The query whose selection is drawn: under the mouse, else pinned, else the last one.
  int64_t query = s.Lq - 1;
  if (key_view && vs.hover) query = vs.hover->row;
  else if (vs.pinned && vs.pinned->row < s.Lq) query = vs.pinned->row;
  const KeyFacts f = key_facts(delta, evict, s.Lq, s.Lk, v.opt.causal, query, 0);

  ImGui::Text("delta per key (delta head %lld) - query %lld keeps %lld of %lld allowed keys, delta >= %.4g",
              (long long)s.delta_head(hq), (long long)query, (long long)f.kept_keys,
              (long long)f.allowed_keys, static_cast<double>(f.threshold));
  help_marker("Bars: delta_j per key (max over the keys of one pixel column). Coloured: kept\n"
              "by the query (hover a row of the large view, or click to pin one). Grey: allowed\n"
              "but dropped. Dark: after the query's position. The orange line is the query's\n"
              "threshold, the smallest delta it keeps (ties go to the more recent key).");
  ImGui::SameLine();
  ImGui::Checkbox("log axis", &vs.bars_log);

  // The keys on screen: those of the large view's zoom window when it shows keys, else all.
  int64_t k0 = 0, k1 = s.Lk;
  if (key_view && vs.zoom_cols == s.Lk && vs.zoom.cols() > 0) {
    k0 = vs.zoom.c0;
    k1 = vs.zoom.c1;
  }
  const int64_t nk = k1 - k0;
  const ImVec2 p = ImGui::GetCursorScreenPos();
  const ImVec2 avail = ImGui::GetContentRegionAvail();
  Rect plot{p.x, p.y, avail.x - 84.0f, std::clamp(avail.y - 4, 40.0f, 260.0f)};
  if (key_view && vs.image_rect.w > 0) {  // align the bars under the heatmap's key columns
    plot.x = vs.image_rect.x;
    plot.w = vs.image_rect.w;
  }
  ImGui::InvisibleButton("bars", vec(std::max(1.0f, avail.x), plot.h));
  const bool hovered = ImGui::IsItemHovered();
  ImDrawList* dl = ImGui::GetWindowDrawList();
  dl->AddRectFilled(vec(plot.x, plot.y), vec(plot.x + plot.w, plot.y + plot.h), IM_COL32(24, 24, 28, 255));

  float lo = delta[0], hi = delta[0];
  for (int64_t j = 0; j < s.Lk; ++j) {
    lo = std::min(lo, delta[j]);
    hi = std::max(hi, delta[j]);
  }
  // The exp form makes delta positive and often spread over decades: a log axis shows them all.
  const bool log_axis = vs.bars_log && lo > 0;
  auto axis = [&](float d) { return log_axis ? std::log(d) : d; };
  const float base = log_axis ? std::log(lo) - 0.05f * (std::log(hi) - std::log(lo) + 1e-3f) : std::min(lo, 0.0f);
  const float top_v = axis(hi) > base ? axis(hi) : base + 1;
  auto y_of = [&](float d) {
    return plot.y + plot.h - (axis(d) - base) / (top_v - base) * (plot.h - 2);
  };

  const int64_t p_i = std::min(s.Lk - 1, rule::query_position<int64_t>(s.Lq, s.Lk, v.opt.causal, query));
  const int columns = std::max(1, static_cast<int>(std::min<float>(plot.w, static_cast<float>(nk))));
  const ImU32 kept_col = to_imu32(head_hue(hq, static_cast<int>(s.Hq)));
  for (int c = 0; c < columns; ++c) {
    const int64_t j0 = k0 + nk * c / columns, j1 = std::max(j0 + 1, k0 + nk * (c + 1) / columns);
    float top = -INFINITY;
    bool kept = false, allowed = false;
    for (int64_t j = j0; j < j1; ++j) {
      top = std::max(top, delta[j]);
      allowed |= j <= p_i;
      kept |= rule::is_kept(j, p_i, evict[j]);
    }
    const float x0 = plot.x + plot.w * c / columns, x1 = plot.x + plot.w * (c + 1) / columns;
    const ImU32 col = kept ? kept_col : allowed ? IM_COL32(120, 120, 128, 255) : IM_COL32(60, 60, 66, 255);
    dl->AddRectFilled(vec(x0, y_of(top)), vec(std::max(x1 - (columns < plot.w / 3 ? 1.0f : 0.0f), x0 + 1), plot.y + plot.h), col);
  }
  if (f.kept_keys > 0) {
    const float y = y_of(f.threshold);
    dl->AddLine(vec(plot.x, y), vec(plot.x + plot.w, y), IM_COL32(255, 170, 40, 255), 1.5f);
  }
  if (hovered) {
    const ImVec2 mouse = ImGui::GetIO().MousePos;
    if (const auto c = cell_at(plot, 1, nk, mouse.x, mouse.y)) {
      const int64_t j = k0 + c->col;
      const KeyFacts k = key_facts(delta, evict, s.Lq, s.Lk, v.opt.causal, query, j);
      ImGui::BeginTooltip();
      ImGui::Text("key %lld: delta %.6g", (long long)j, static_cast<double>(delta[j]));
      if (k.allowed)
        ImGui::Text("%s by query %lld, rank %lld", k.kept ? "kept" : "dropped", (long long)query,
                    (long long)k.rank);
      else
        ImGui::Text("after query %lld's position", (long long)query);
      ImGui::EndTooltip();
    }
  }
}

}  // namespace dma::viewer
