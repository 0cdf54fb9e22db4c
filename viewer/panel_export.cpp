// The right column, bottom: saving what is on screen.
//   heatmap PNG   the large view's matrix at data resolution (one pixel per cell, no downsampling)
//   screenshot    the whole window (done by the platform layer after the frame is rendered)
//   CSV           the large view's matrix as numbers (NaN cells = dropped, left empty)
#include <imgui.h>
#include <imgui_stdlib.h>

#include "panels.hpp"

namespace dma::viewer {
namespace {

std::string export_stem(const InspectorState& st) {
  static const char* names[] = {"probs", "delta", "mask", "ds", "dq", "diff"};
  return st.export_prefix + "_" + names[static_cast<int>(st.view.kind)] + "_b" +
         std::to_string(st.view.batch) + "_h" + std::to_string(st.view.locked_head);
}

}  // namespace

bool export_heatmap_png(InspectorState& st) {
  const HeadMatrix& m = large_matrix(st, st.view.locked_head);
  if (!m.valid) {
    st.message = m.why_not;
    return false;
  }
  // Factor 1: one pixel per cell, whatever the zoom and the window size.
  const Image img = colorize(downsample(m.view(), m.last_allowed, 1, 1, m.reduce), m.map,
                             m.range.lo, m.range.hi);
  const std::string path = export_stem(st) + ".png";
  std::string err;
  const bool ok = write_png(path, img, &err);
  st.message = ok ? "wrote " + path : err;
  return ok;
}

bool export_matrix_csv(InspectorState& st) {
  const HeadMatrix& m = large_matrix(st, st.view.locked_head);
  if (!m.valid) {
    st.message = m.why_not;
    return false;
  }
  const std::string path = export_stem(st) + ".csv";
  std::string err;
  const bool ok = write_csv(path, m.view(), &err);
  st.message = ok ? "wrote " + path : err;
  return ok;
}

void panel_export(InspectorState& st) {
  ImGui::TextUnformatted("Export");
  help_marker("Files go to the path prefix (relative to the working folder). The heatmap (one\n"
              "pixel per cell) and the CSV hold the whole matrix of the locked head in the\n"
              "current view; the screenshot is the window as it is.");
  ImGui::SetNextItemWidth(ImGui::GetContentRegionAvail().x * 0.6f);
  ImGui::InputText("prefix", &st.export_prefix);
  const bool have = st.snap && st.snap->views;
  ImGui::BeginDisabled(!have);
  if (ImGui::Button("heatmap PNG")) export_heatmap_png(st);
  ImGui::SameLine();
  if (ImGui::Button("matrix CSV")) export_matrix_csv(st);
  ImGui::EndDisabled();
  ImGui::SameLine();
  if (ImGui::Button("screenshot")) st.screenshot_request = st.export_prefix + "_window.png";
  if (!st.message.empty()) ImGui::TextWrapped("%s", st.message.c_str());
}

}  // namespace dma::viewer
