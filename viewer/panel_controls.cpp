// The controls (left column): every change goes into st.params, and draw_inspector hands the
// params to the worker at the end of the frame, which recomputes off the UI thread.
#include <imgui.h>

#include <algorithm>
#include <cstdio>

#include "panels.hpp"

namespace dma::viewer {
namespace {

// Takes the settings a bundle (or the example) was computed with, so it opens as it was made.
void adopt(Params& p, const BundleData& d) {
  p.window = d.window;
  p.causal = d.causal;
  p.form = d.form;
  p.a = d.a;
}

// The largest divisor of n that is <= want (GQA needs Hq % Hkv == 0).
int divisor_at_most(int n, int want) {
  for (int d = std::min(n, std::max(want, 1)); d > 1; --d)
    if (n % d == 0) return d;
  return 1;
}

bool combo_int(const char* label, int* value, const int* choices, int count) {
  char preview[16];
  std::snprintf(preview, sizeof preview, "%d", *value);
  bool changed = false;
  if (ImGui::BeginCombo(label, preview)) {
    for (int i = 0; i < count; ++i) {
      char item[16];
      std::snprintf(item, sizeof item, "%d", choices[i]);
      if (ImGui::Selectable(item, choices[i] == *value)) {
        *value = choices[i];
        changed = true;
      }
    }
    ImGui::EndCombo();
  }
  return changed;
}

void section(const char* title, const char* help = nullptr) {
  ImGui::Spacing();
  ImGui::TextColored(ImVec4(0.55f, 0.8f, 1.0f, 1.0f), "%s", title);
  if (help) help_marker(help);
  ImGui::Separator();
}

}  // namespace

bool select_layer(InspectorState& st, int layer) {
  if (!st.model || layer < 0 || layer >= static_cast<int>(st.model->layers.size())) return false;
  const ModelLayer& l = st.model->layers[layer];
  if (!l.data) {
    st.message = l.name + ": " + l.error;
    return false;
  }
  st.bundle = l.data;
  st.params.layer = layer;
  if (st.params.source == Source::bundle) {
    adopt(st.params, *l.data);
    st.view.locked_head = std::clamp(st.view.locked_head, 0, static_cast<int>(l.data->shape.Hq) - 1);
  }
  return true;
}

void panel_controls(InspectorState& st) {
  Params& p = st.params;
  const float w = ImGui::GetContentRegionAvail().x * 0.55f;
  ImGui::PushItemWidth(w);

  // ---- inputs ----
  section("Inputs");
  int source = static_cast<int>(p.source);
  ImGui::BeginDisabled(!st.example);
  ImGui::RadioButton("built-in example", &source, static_cast<int>(Source::example));
  ImGui::EndDisabled();
  help_marker("assets/example: B=1, Hq=4, Hkv=2, Hd=4, Lq=Lk=256, D=64, made by\n"
              "assets/make_example.cpp. Some keys carry a strong signal in v, so their\n"
              "delta is high and they stay kept for a long time (vertical stripes).\n"
              "Also built in: --example mqar, a 2-layer model trained with DMA on\n"
              "associative recall (assets/mqar), opened as a model (--in).");
  ImGui::BeginDisabled(!st.bundle);
  ImGui::RadioButton("bundle (--in)", &source, static_cast<int>(Source::bundle));
  ImGui::EndDisabled();
  help_marker("A folder of .npy files in the dma_run layout (q k v w_dt a [do] [delta]),\n"
              "e.g. tensors saved from your own model. Stored outputs (o, lse, dq, ...) are\n"
              "compared with the CPU reference recomputed here. Start with --in DIR.");
  ImGui::RadioButton("random", &source, static_cast<int>(Source::random));
  help_marker("Normal random q, k, v, do; w_dt ~ N(0, 1/(Hkv*D)); from the seed below.");
  if (source != static_cast<int>(p.source)) {
    p.source = static_cast<Source>(source);
    if (p.source == Source::example && st.example) adopt(p, *st.example);
    if (p.source == Source::bundle && st.bundle) adopt(p, *st.bundle);
    if (p.source == Source::random) p.a = default_a(p.Hd());
    st.view.locked_head = 0;
  }
  if (st.model) {  // a model: one bundle per layer
    const auto& layers = st.model->layers;
    const int cur = std::clamp(p.layer, 0, static_cast<int>(layers.size()) - 1);
    if (ImGui::BeginCombo("layer", layers[cur].name.c_str())) {
      for (int i = 0; i < static_cast<int>(layers.size()); ++i) {
        ImGui::BeginDisabled(!layers[i].data);
        const std::string item = layers[i].data ? layers[i].name : layers[i].name + " (unreadable)";
        if (ImGui::Selectable(item.c_str(), i == cur) && i != cur) select_layer(st, i);
        ImGui::EndDisabled();
      }
      ImGui::EndCombo();
    }
    help_marker("The model folder holds one bundle per layer (layer_00/, layer_01/, ...).\n"
                "Choosing a layer opens its bundle; the model view shows them all.");
    for (const ModelLayer& l : layers)
      if (!l.data) {
        ImGui::PushStyleColor(ImGuiCol_Text, IM_COL32(255, 110, 90, 255));
        ImGui::TextWrapped("%s: %s", l.name.c_str(), l.error.c_str());
        ImGui::PopStyleColor();
      }
  }
  const BundleData* data = p.source == Source::example ? st.example.get()
                         : p.source == Source::bundle  ? st.bundle.get()
                                                       : nullptr;
  if (data) {
    ImGui::TextDisabled("%s", data->dir.c_str());
    if (!data->notes.empty()) ImGui::TextWrapped("inferred: %s", data->notes.c_str());
    if (!data->labels.tokens.empty() || !data->labels.roles.empty()) {
      ImGui::PushStyleColor(ImGuiCol_Text, ImGui::GetStyleColorVec4(ImGuiCol_TextDisabled));
      ImGui::TextWrapped("labels: %s%s", data->labels.tokens.empty() ? "" : "tokens.txt ",
                         data->labels.roles.empty() ? "" : "roles.txt (key value query filler)");
      ImGui::PopStyleColor();
    }
    if (!data->labels.error.empty()) {
      ImGui::PushStyleColor(ImGuiCol_Text, IM_COL32(255, 110, 90, 255));
      ImGui::TextWrapped("%s", data->labels.error.c_str());
      ImGui::PopStyleColor();
    }
  }

  // ---- shape ----
  section("Shape");
  if (data) {
    const Shape& s = data->shape;
    ImGui::Text("B=%lld  Hq=%lld  Hkv=%lld  Hd=%lld", (long long)s.B, (long long)s.Hq,
                (long long)s.Hkv, (long long)s.Hd);
    ImGui::Text("Lq=%lld  Lk=%lld  D=%lld", (long long)s.Lq, (long long)s.Lk, (long long)s.D);
    help_marker("Fixed by the data. Choose 'random' to change the shape.");
  } else {
    const ImGuiSliderFlags log = ImGuiSliderFlags_Logarithmic | ImGuiSliderFlags_AlwaysClamp;
    ImGui::SliderInt("Lk keys", &p.Lk, 16, 4096, "%d", log);
    help_marker("Number of keys. The inspector keeps p and ds whole (B*Hq*Lq*Lk <= 2^27).");
    ImGui::SliderInt("Lq queries", &p.Lq, 1, 4096, "%d", log);
    help_marker("Number of queries. Causal queries sit bottom-right: query i is at position\n"
                "i + (Lk - Lq), as in decoding, so causal needs Lq <= Lk.");
    ImGui::SliderInt("Hq", &p.Hq, 1, 16);
    help_marker("Query heads.");
    ImGui::SliderInt("Hkv", &p.Hkv, 1, p.Hq);
    help_marker("Key/value heads (GQA: Hq % Hkv == 0; snapped to a divisor of Hq).");
    int hd = p.hd_is_hq ? 1 : 0;
    ImGui::RadioButton("Hd = Hkv", &hd, 0);
    ImGui::SameLine();
    ImGui::RadioButton("Hd = Hq", &hd, 1);
    help_marker("Heads of the dynamic weights, i.e. how many different masks: one per kv head\n"
                "(shared by its query heads) or one per query head.");
    p.hd_is_hq = hd == 1;
    static const int dims[] = {16, 32, 64, 128};
    combo_int("D head dim", &p.D, dims, 4);
    help_marker("Head dimension; scale = 1/sqrt(D).");
    ImGui::SliderInt("B batch", &p.B, 1, 4);
    help_marker("Batch size; the views show one batch entry (chosen above the heatmap).");
    int seed = static_cast<int>(p.seed);
    if (ImGui::InputInt("seed", &seed)) p.seed = static_cast<uint32_t>(std::max(seed, 0));
    help_marker("Seed of the random inputs.");
    p.Hkv = divisor_at_most(p.Hq, p.Hkv);
    if (p.causal) p.Lq = std::min(p.Lq, p.Lk);
  }

  // ---- mask ----
  section("Dynamic mask");
  const int Lk = data ? static_cast<int>(data->shape.Lk) : p.Lk;
  ImGui::SliderInt("window w", &p.window, 1, std::max(Lk, 2), "%d",
                   ImGuiSliderFlags_Logarithmic | ImGuiSliderFlags_AlwaysClamp);
  help_marker("Keys kept per query: the w allowed keys ranked highest by (delta descending,\n"
              "index descending). A query with at most w allowed keys keeps them all.");
  int form = static_cast<int>(p.form);
  ImGui::RadioButton("exp", &form, 0);
  ImGui::SameLine();
  ImGui::RadioButton("linear", &form, 1);
  help_marker("exp (the paper): delta = exp(a * softplus(z)).\n"
              "linear (flash-dmattn): delta = a * softplus(z).  z = vflat . w_dt[h].");
  p.form = static_cast<Form>(form);
  ImGui::Checkbox("causal", &p.causal);
  help_marker("Causal: query i sees keys j <= i + (Lk - Lq). Non-causal: every query sees\n"
              "every key, so all queries keep the same global top w.");
  if (p.causal && !data) p.Lq = std::min(p.Lq, p.Lk);

  // ---- per-head a ----
  const bool delta_given = data && data->delta_given;
  const int Hd = data ? static_cast<int>(data->shape.Hd) : p.Hd();
  if (!delta_given && static_cast<int>(p.a.size()) != Hd) {
    std::vector<float> a = default_a(Hd);
    for (size_t h = 0; h < a.size() && h < p.a.size(); ++h) a[h] = p.a[h];
    p.a = a;
  }
  section("Per-head a", "a[h] scales softplus(z) per delta head. a = 0 makes every delta equal,\n"
                       "and then causal DMA is exactly sliding-window attention over the w most\n"
                       "recent keys. Larger a spreads delta, so the mask follows the values more.");
  if (delta_given) {
    ImGui::TextWrapped("delta is given by the bundle: a and w_dt are not used.");
  } else {
    for (int h = 0; h < Hd; ++h) {
      ImGui::PushID(h);
      const Rgba hue = head_hue(h, Hd);
      ImGui::PushStyleColor(ImGuiCol_SliderGrab, to_imu32(hue));
      ImGui::SliderFloat("", &p.a[h], -1.0f, 2.0f, "%.2f");
      ImGui::PopStyleColor();
      ImGui::SameLine();
      ImGui::TextColored(ImGui::ColorConvertU32ToFloat4(to_imu32(hue)), "a[%d]", h);
      ImGui::PopID();
    }
    if (ImGui::SmallButton("reset a")) p.a = data ? data->a : default_a(Hd);
  }

  // ---- tiles and backends ----
  section("Tiles and backends");
  static const int sizes[] = {16, 32, 64, 128, 256};
  combo_int("Bq", &p.Bq, sizes, 5);
  help_marker("Queries per tile. A query tile gathers at most w + Bq candidate keys.");
  combo_int("Bk", &p.Bk, sizes, 5);
  help_marker("Keys per tile (gather: keys per chunk of the gathered block).");
  for (int b = 1; b < kBackendCount; ++b) {
    ImGui::Checkbox(backend_label(static_cast<BackendId>(b)), &p.run[b]);
    help_marker(backend_help(static_cast<BackendId>(b)));
  }
  ImGui::PushStyleColor(ImGuiCol_Text, ImGui::GetStyleColorVec4(ImGuiCol_TextDisabled));
  ImGui::TextWrapped("The reference always runs: the heatmaps come from it.");
  if (!st.worker->cuda_available()) ImGui::TextWrapped("CUDA: %s.", st.worker->cuda_note().c_str());
  ImGui::PopStyleColor();
  ImGui::PopItemWidth();
}

}  // namespace dma::viewer
