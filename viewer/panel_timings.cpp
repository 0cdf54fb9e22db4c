// The right column, top: timings per phase and backend, the tile counters, and the comparison
// of CUDA (or stored) outputs with the CPU reference.
#include <imgui.h>

#include <algorithm>
#include <cfloat>
#include <cstdio>

#include "format.hpp"
#include "panels.hpp"

namespace dma::viewer {

const char* backend_help(BackendId b) {
  switch (b) {
    case BackendId::reference:
      return "The scalar reference: explicit (Lq x Lk) mask, one query at a time. The heatmaps\n"
             "come from it, because it alone can hand out the probabilities p and ds.\n"
             "Its time includes keeping p and ds.";
    case BackendId::tiled_dense:
      return "Tiled CPU version, every tile a causal kernel visits, the mask applied inside.\n"
             "The baseline the speedups are measured against.";
    case BackendId::tiled_skip:
      return "Tiled, leaving out tiles that hold no kept key (exact: their p is 0).\n"
             "Pays on structured delta; on random delta almost every tile holds a kept key.";
    case BackendId::tiled_gather:
      return "Tiled, each query tile first gathers its candidate keys (at most w + Bq) and runs\n"
             "dense tile math on the compacted set: the work falls to the true density.";
    case BackendId::cuda:
      return "The CUDA kernels (bf16 inputs, fp32 accumulation), when built with CUDA and a GPU\n"
             "is present. Times are GPU events.";
  }
  return "";
}

namespace {

// A duration in adaptive units, the exact value on hover (as Tracy does).
void time_cell(double ms) {
  if (ms <= 0) {  // a phase that did not run (given delta, no do)
    ImGui::TextDisabled("-");
    return;
  }
  ImGui::TextUnformatted(format_duration(ms).c_str());
  if (ImGui::IsItemHovered()) ImGui::SetTooltip("%.6f ms", ms);
}

}  // namespace

void panel_timings(InspectorState& st) {
  ImGui::TextUnformatted("Timings");
  help_marker("Wall-clock time per phase on this machine's CPU (CUDA: GPU events), for the\n"
              "last pass. The sparkline is the total over the passes since the inputs last\n"
              "changed; turn on 'live' to keep re-timing while idle (it uses the CPU then).\n"
              "vs dense: the tiled dense time over this backend's time.");
  if (!st.snap || !st.snap->views) {
    ImGui::TextDisabled("waiting for the first result");
    return;
  }
  bool live = st.worker->live();
  if (ImGui::Checkbox("live", &live)) st.worker->set_live(live);
  ImGui::SameLine();
  if (ImGui::SmallButton("re-run timings")) st.worker->rerun_timings();

  const auto& runs = st.snap->runs;
  const BackendRun& dense = runs[static_cast<int>(BackendId::tiled_dense)];
  const ImGuiTableFlags flags = ImGuiTableFlags_RowBg | ImGuiTableFlags_BordersInnerV |
                                ImGuiTableFlags_SizingFixedFit;
  if (ImGui::BeginTable("times", 7, flags)) {
    ImGui::TableSetupColumn("backend");
    ImGui::TableSetupColumn("delta");
    ImGui::TableSetupColumn("mask");
    ImGui::TableSetupColumn("fwd");
    ImGui::TableSetupColumn("bwd");
    ImGui::TableSetupColumn("total");
    ImGui::TableSetupColumn("vs dense");
    ImGui::TableHeadersRow();
    for (int b = 0; b < kBackendCount; ++b) {
      const BackendRun& r = runs[b];
      ImGui::TableNextRow();
      ImGui::TableNextColumn();
      ImGui::TextUnformatted(backend_label(static_cast<BackendId>(b)));
      if (ImGui::IsItemHovered()) ImGui::SetTooltip("%s", backend_help(static_cast<BackendId>(b)));
      if (!r.ran) {  // the reason goes under the table, so the columns stay narrow
        ImGui::TableNextColumn();
        ImGui::TextDisabled("-");
        continue;
      }
      ImGui::TableNextColumn(); time_cell(r.times.delta);
      ImGui::TableNextColumn(); time_cell(r.times.mask);
      ImGui::TableNextColumn(); time_cell(r.times.forward);
      ImGui::TableNextColumn(); time_cell(r.times.backward);
      ImGui::TableNextColumn(); time_cell(r.times.total());
      ImGui::TableNextColumn();
      if (dense.ran && r.times.total() > 0)
        ImGui::TextUnformatted(format_speedup(dense.times.total() / r.times.total()).c_str());
      else
        ImGui::TextDisabled("-");
    }
    ImGui::EndTable();
  }
  for (int b = 0; b < kBackendCount; ++b)
    if (!runs[b].ran && !runs[b].note.empty())
      ImGui::TextDisabled("%s: %s", backend_label(static_cast<BackendId>(b)), runs[b].note.c_str());

  // Sparklines of the total per pass (one point per pass since the inputs last changed).
  ImGui::Spacing();
  ImGui::TextUnformatted("History (total per pass)");
  help_marker("One point per timing pass since the inputs last changed. Turn on 'live' (or press\n"
              "'re-run timings') to add passes; noise between passes shows how much to trust\n"
              "a single number.");
  for (int b = 0; b < kBackendCount; ++b) {
    const std::vector<float>& h = st.history[b];
    if (h.empty()) continue;
    ImGui::TextUnformatted(backend_label(static_cast<BackendId>(b)));
    ImGui::SameLine(100);
    if (h.size() < 2) {
      ImGui::TextDisabled("%s (1 pass)", format_duration(h.back()).c_str());
      continue;
    }
    const float w = ImGui::GetContentRegionAvail().x - 80;
    ImGui::PlotLines(("##spark" + std::to_string(b)).c_str(), h.data(), static_cast<int>(h.size()),
                     0, nullptr, 0.0f, FLT_MAX, ImVec2(w, 18));
    if (ImGui::IsItemHovered())
      ImGui::SetTooltip("%zu passes, last %.4f ms, min %.4f ms", h.size(), h.back(),
                        *std::min_element(h.begin(), h.end()));
    ImGui::SameLine();
    ImGui::TextUnformatted(format_duration(h.back()).c_str());
  }

  // Work counters of the tiled modes (forward).
  ImGui::Spacing();
  ImGui::TextUnformatted("Tile work (forward)");
  help_marker("Counted by the tiled implementation, summed over batch and query heads. The\n"
              "backward of dense and skip walks the same tiles and key blocks (the same counts);\n"
              "gather's backward sweeps the slots of its lists instead (see the slot view).\n"
              "tiles skipped: causal-dense tiles left out. work: (query, key) pairs the tile\n"
              "math ran on, over the pairs of a causal-dense kernel. kept: pairs the mask keeps\n"
              "(the least any method must do). max cand.: largest gathered set (<= w + Bq).\n"
              "err: max|o - o_ref| / max|o_ref| (and dq), against the reference.");
  if (ImGui::BeginTable("work", 5, flags)) {
    ImGui::TableSetupColumn("mode");
    ImGui::TableSetupColumn("tiles skipped");
    ImGui::TableSetupColumn("work");
    ImGui::TableSetupColumn("max cand.");
    ImGui::TableSetupColumn("err");
    ImGui::TableHeadersRow();
    for (int b = 1; b <= 3; ++b) {
      const BackendRun& r = runs[b];
      if (!r.ran) continue;
      const TileCounters& c = r.fwd;
      ImGui::TableNextRow();
      ImGui::TableNextColumn();
      ImGui::TextUnformatted(backend_label(static_cast<BackendId>(b)));
      ImGui::TableNextColumn();
      ImGui::TextUnformatted(format_percent(c.tiles_dense ? double(c.tiles_skipped) / c.tiles_dense : 0).c_str());
      if (ImGui::IsItemHovered())
        ImGui::SetTooltip("%s of %s tiles skipped, %s visited", format_count(c.tiles_skipped).c_str(),
                          format_count(c.tiles_dense).c_str(), format_count(c.tiles_visited).c_str());
      ImGui::TableNextColumn();
      ImGui::TextUnformatted(format_percent(c.work_fraction()).c_str());
      if (ImGui::IsItemHovered())
        ImGui::SetTooltip("%s pairs computed of %s causal-dense; %s kept (%s)",
                          format_count(c.pairs_computed).c_str(), format_count(c.pairs_dense).c_str(),
                          format_count(c.pairs_kept).c_str(),
                          format_percent(c.pairs_dense ? double(c.pairs_kept) / c.pairs_dense : 0).c_str());
      ImGui::TableNextColumn();
      if (c.max_candidates) ImGui::Text("%lld", (long long)c.max_candidates);
      else ImGui::TextDisabled("-");
      ImGui::TableNextColumn();
      ImGui::Text("%.1e", r.max_err);
    }
    ImGui::EndTable();
  }
}

void panel_compare(InspectorState& st) {
  ImGui::TextUnformatted("|CUDA - CPU|");
  help_marker("CUDA outputs against the CPU reference recomputed here (float32 inputs). CUDA\n"
              "computes in bf16 with fp32 accumulation, so expect relative L2 around 1e-3..1e-2;\n"
              "the selection (evict) should be identical given the same delta. ddelta is the\n"
              "gradient of the dynamic weights, summed over the queries that keep each key.");
  ImGui::Checkbox("CPU on bf16-rounded q k v do", &st.params.bf16_inputs);
  help_marker("The CUDA kernels round q, k, v and do to bf16 (delta and every sum stay fp32).\n"
              "Tick this to give the CPU reference the same rounded inputs: the comparison then\n"
              "shows the kernels' own error. Unticked, it also shows how rounding the inputs\n"
              "moves the result - near-ties in delta can even change which keys are kept.");
  const Comparison* c = st.snap ? st.snap->compare.get() : nullptr;
  if (!c) {
    ImGui::TextDisabled("CUDA: %s.", st.worker->cuda_note().c_str());
    ImGui::TextWrapped("To compare anyway, open a bundle written on a GPU machine by "
                       "dma_run --backend cuda with --in DIR.");
    return;
  }
  ImGui::TextWrapped("%s", c->label.c_str());
  if (ImGui::BeginTable("cmp", 3, ImGuiTableFlags_RowBg | ImGuiTableFlags_SizingFixedFit)) {
    ImGui::TableSetupColumn("tensor");
    ImGui::TableSetupColumn("max rel");
    ImGui::TableSetupColumn("rel L2");
    ImGui::TableHeadersRow();
    for (const auto& row : c->rows) {
      ImGui::TableNextRow();
      ImGui::TableNextColumn();
      ImGui::TextUnformatted(row.tensor.c_str());
      ImGui::TableNextColumn();
      ImGui::Text("%.2e", row.max_rel);
      ImGui::TableNextColumn();
      ImGui::Text("%.2e", row.rel_l2);
    }
    ImGui::EndTable();
  }
  if (c->evict_mismatches >= 0)
    ImGui::Text("evict: %lld keys differ", (long long)c->evict_mismatches);
}

}  // namespace dma::viewer
