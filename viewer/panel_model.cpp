// The model view (centre column, a model opened with --in): one row per layer, one column per
// delta head, each cell the kept mask stored in that layer's bundle (its evict), downsampled to
// the fraction kept. Under each cell, what the head selects: the share of kept keys that are key
// or value tokens (when the bundle has roles.txt) and the mean distance from query to kept key.
// Hover for the numbers, click to open that layer and head in the head view.
#include <imgui.h>

#include <algorithm>
#include <cstdio>

#include "format.hpp"
#include "panels.hpp"

namespace dma::viewer {

void panel_model(InspectorState& st) {
  const Model& model = *st.model;
  const int layers = static_cast<int>(model.layers.size());
  const int heads = std::max(1, model.max_delta_heads());
  ImGui::Text("Model: %d layers x %d delta heads - kept mask per head (fraction kept per texel)",
              layers, heads);
  help_marker("Rows are layers, columns delta heads (one mask each; the query heads of a delta\n"
              "head share it). Each cell is the mask stored in the layer's bundle (its evict, as\n"
              "dma_run computed it), bright where a query keeps most of its allowed keys.\n"
              "Below a cell: kv = share of kept (query, key) pairs whose key is a key or value\n"
              "token (roles.txt), d = mean distance from the query to its kept keys.");

  const float label_w = 70.0f, spacing = ImGui::GetStyle().ItemSpacing.x;
  const float line = ImGui::GetTextLineHeight();
  const ImVec2 avail = ImGui::GetContentRegionAvail();
  const float by_w = (avail.x - label_w - spacing * heads) / heads;
  const float by_h = (avail.y - 2 * line) / layers - (line + 2 * spacing);
  const float size = std::clamp(std::min(by_w, by_h), 28.0f, 160.0f);
  ImDrawList* dl = ImGui::GetWindowDrawList();
  st.view.model_rects.assign(static_cast<size_t>(layers), {});
  const int b = st.view.batch;
  const int open_layer = st.snap ? st.snap->params.layer : -1;

  // Column headers.
  const ImVec2 head_row = ImGui::GetCursorScreenPos();
  for (int hd = 0; hd < heads; ++hd) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "d%d", hd);
    dl->AddText(ImVec2(head_row.x + label_w + hd * (size + spacing) + 2, head_row.y),
                to_imu32(head_hue(hd, heads)), buf);
  }
  ImGui::Dummy(ImVec2(label_w + heads * (size + spacing), line));

  for (int li = 0; li < layers; ++li) {
    const ModelLayer& l = model.layers[li];
    ImGui::PushID(li);
    const ImVec2 row = ImGui::GetCursorScreenPos();
    dl->AddText(ImVec2(row.x, row.y + 0.5f * size - 0.5f * line),
                li == open_layer ? IM_COL32(255, 220, 120, 255) : ImGui::GetColorU32(ImGuiCol_Text),
                l.name.c_str());
    ImGui::Dummy(ImVec2(label_w - spacing, size));
    st.view.model_rects[li].assign(static_cast<size_t>(heads), Rect{});
    const Shape* s = l.data ? &l.data->shape : nullptr;
    for (int hd = 0; hd < heads; ++hd) {
      ImGui::SameLine(label_w + hd * (size + spacing));
      ImGui::PushID(hd);
      const ImVec2 p = ImGui::GetCursorScreenPos();
      ImGui::InvisibleButton("cell", ImVec2(size, size + line + 2));
      const bool hovered = ImGui::IsItemHovered();
      st.view.model_rects[li][hd] = Rect{p.x, p.y, size, size};
      const bool has = s && hd < s->Hd && b < s->B && !l.evict.empty();
      const ImVec2 a(p.x + 1, p.y + 1), e(p.x + size - 1, p.y + size - 1);
      if (has) {
        const int64_t bd = b * s->Hd + hd;
        char slot[32], key[64];
        std::snprintf(slot, sizeof slot, "model%d_%d", li, hd);
        std::snprintf(key, sizeof key, "model %p b%d", static_cast<const void*>(&model), b);
        const TextureSlot& tex = heatmap_texture(st, slot, key, s->Lq, s->Lk, size - 2, size - 2, [&] {
          return mask_from_evict(l.evict.data() + bd * s->Lk, l.last_allowed.data(), s->Lq, s->Lk);
        });
        if (tex.width > 0) dl->AddImage(tex.id, a, e);
        else dl->AddRectFilled(a, e, IM_COL32(40, 40, 46, 255));
        const SelectionStats& ss = l.stats[static_cast<size_t>(bd)];
        char text[48];
        if (ss.has_roles)
          std::snprintf(text, sizeof text, "kv %.0f%% d %.1f", 100.0 * ss.key_value_share(), ss.mean_distance);
        else
          std::snprintf(text, sizeof text, "d %.1f", ss.mean_distance);
        dl->AddText(ImVec2(p.x + 1, p.y + size + 1), ImGui::GetColorU32(ImGuiCol_TextDisabled), text);
        if (hovered) {
          ImGui::BeginTooltip();
          ImGui::Text("%s, delta head %d (w = %d, %s)", l.name.c_str(), hd, l.data->window,
                      l.data->causal ? "causal" : "non-causal");
          ImGui::Text("kept (query, key) pairs: %s", format_count(ss.kept).c_str());
          if (ss.has_roles)
            for (Role r : {Role::key, Role::value, Role::query, Role::filler}) {
              ImGui::TextColored(ImGui::ColorConvertU32ToFloat4(to_imu32(role_colour(r))), "%-6s",
                                 role_name(r));
              ImGui::SameLine();
              ImGui::Text("%s of kept keys", format_percent(ss.share(r)).c_str());
            }
          else
            ImGui::TextDisabled("no roles.txt: no per-role shares");
          ImGui::Text("mean distance query - kept key: %.2f tokens", ss.mean_distance);
          ImGui::TextDisabled("click: open this layer and head");
          ImGui::EndTooltip();
        }
        if (ImGui::IsItemClicked()) {
          st.params.source = Source::bundle;
          if (select_layer(st, li)) {
            for (int hq = 0; hq < s->Hq; ++hq)
              if (s->delta_head(hq) == hd) {
                st.view.locked_head = hq;
                break;
              }
            st.view.kind = ViewKind::mask;
            st.view.model_view = false;
          }
        }
      } else {
        dl->AddRectFilled(a, e, IM_COL32(34, 34, 38, 255));
        const char* why = !l.data ? "unreadable" : !s || hd >= s->Hd ? "" : "no evict";
        dl->AddText(ImVec2(p.x + 3, p.y + 3), ImGui::GetColorU32(ImGuiCol_TextDisabled), why);
        if (hovered && !l.data) ImGui::SetTooltip("%s: %s", l.name.c_str(), l.error.c_str());
      }
      dl->AddRect(ImVec2(p.x, p.y), ImVec2(p.x + size, p.y + size),
                  hovered ? IM_COL32(255, 255, 255, 255)
                          : to_imu32(head_hue(hd, heads), li == open_layer ? 0.9f : 0.45f),
                  0.0f, 0, li == open_layer ? 2.0f : 1.0f);
      ImGui::PopID();
    }
    ImGui::PopID();
  }
}

}  // namespace dma::viewer
