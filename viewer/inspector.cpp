// The frame: reads the worker's latest snapshot, lays out the three columns, draws the status
// bar, and owns the texture cache the panels share.
#include <imgui.h>

#include <chrono>
#include <cstdio>

#include "format.hpp"
#include "panels.hpp"

namespace dma::viewer {

void help_marker(const char* text) {
  ImGui::SameLine();
  ImGui::TextDisabled("(?)");
  if (ImGui::IsItemHovered()) {
    ImGui::BeginTooltip();
    ImGui::PushTextWrapPos(ImGui::GetFontSize() * 40.0f);
    ImGui::TextUnformatted(text);
    ImGui::PopTextWrapPos();
    ImGui::EndTooltip();
  }
}

ImU32 to_imu32(const Rgba& c, float alpha) {
  return IM_COL32(c.r, c.g, c.b, static_cast<int>(c.a * alpha));
}

std::string matrix_key(const InspectorState& st, ViewKind kind, int head) {
  char buf[160];
  std::snprintf(buf, sizeof buf, "v%llu c%p k%d d%d b%d h%d l%d",
                static_cast<unsigned long long>(st.snap && st.snap->views ? st.snap->views->id : 0),
                st.snap ? static_cast<const void*>(st.snap->compare.get()) : nullptr,
                static_cast<int>(kind), static_cast<int>(st.view.diff), st.view.batch, head,
                st.view.log_scale ? 1 : 0);
  return buf;
}

const BundleData* snapshot_data(const InspectorState& st) {
  if (!st.snap) return nullptr;
  const Params& p = st.snap->params;
  if (p.source == Source::example) return st.example.get();
  if (p.source != Source::bundle) return nullptr;
  if (st.model && p.layer >= 0 && p.layer < static_cast<int>(st.model->layers.size()) &&
      st.model->layers[p.layer].data)
    return st.model->layers[p.layer].data.get();
  return st.bundle.get();
}

const HeadMatrix& large_matrix(InspectorState& st, int hq) {
  const std::string key = matrix_key(st, st.view.kind, hq);
  if (key != st.large_key) {
    st.large_key = key;
    st.large = head_matrix(*st.snap->views, st.snap->compare.get(), st.view.kind, st.view.diff,
                           st.view.batch, hq, st.view.log_scale);
  }
  return st.large;
}

namespace {

std::string factor_key(const std::string& key, int64_t fr, int64_t fc) {
  char suffix[48];
  std::snprintf(suffix, sizeof suffix, " f%lldx%lld", static_cast<long long>(fr),
                static_cast<long long>(fc));
  return key + suffix;
}

// Downsamples, colours and uploads a matrix (or a window of it, given as a view and its limits).
void build_texture(InspectorState& st, TextureSlot& t, const std::string& full_key,
                   const HeadMatrix& m, const MatrixView& view, const int64_t* limits, int64_t fr,
                   int64_t fc) {
  t.key = full_key;
  if (!m.valid) {
    t.width = t.height = 0;
    return;
  }
  const Downsampled d = downsample(view, limits, fr, fc, m.reduce);
  const Image img = colorize(d, m.map, m.range.lo, m.range.hi);
  t.id = st.textures->upload(t.id, img);
  t.width = img.width;
  t.height = img.height;
  t.factor_r = fr;
  t.factor_c = fc;
}

double ms_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

const TextureSlot& heatmap_texture(InspectorState& st, const std::string& slot,
                                   const std::string& key, int64_t rows, int64_t cols, float px_w,
                                   float px_h, const std::function<HeadMatrix()>& make,
                                   bool urgent) {
  TextureSlot& t = st.slots[slot];
  const int64_t fr = downsample_factor(rows, static_cast<int64_t>(px_h));
  const int64_t fc = downsample_factor(cols, static_cast<int64_t>(px_w));
  const std::string full_key = factor_key(key, fr, fc);
  if (t.key == full_key) return t;
  if (!urgent && st.build_spent_ms > st.build_budget_ms) {  // ">": one build per frame at least
    st.builds_pending = true;
    return t;  // the old picture (or none yet) for now
  }
  const auto t0 = std::chrono::steady_clock::now();
  const HeadMatrix m = make();
  build_texture(st, t, full_key, m, m.view(), m.last_allowed, fr, fc);
  st.build_spent_ms += ms_since(t0);
  return t;
}

const TextureSlot& matrix_texture(InspectorState& st, const std::string& slot,
                                  const std::string& key, float px_w, float px_h,
                                  const HeadMatrix& m, const Window& w) {
  TextureSlot& t = st.slots[slot];
  const int64_t fr = downsample_factor(w.rows(), static_cast<int64_t>(px_h));
  const int64_t fc = downsample_factor(w.cols(), static_cast<int64_t>(px_w));
  char window[96];
  std::snprintf(window, sizeof window, " w%lld,%lld,%lld,%lld", (long long)w.r0, (long long)w.r1,
                (long long)w.c0, (long long)w.c1);
  const std::string full_key = factor_key(key + window, fr, fc);
  if (t.key != full_key) {
    const auto t0 = std::chrono::steady_clock::now();
    const MatrixView view{m.values.data() + w.r0 * m.cols + w.c0, w.rows(), w.cols(), m.cols};
    const std::vector<int64_t> limits =
        m.last_allowed ? window_limits(m.last_allowed, w) : std::vector<int64_t>{};
    build_texture(st, t, full_key, m, view, m.last_allowed ? limits.data() : nullptr, fr, fc);
    st.build_spent_ms += ms_since(t0);
  }
  return t;
}

void release_textures(InspectorState& st) {
  for (auto& [name, slot] : st.slots)
    if (slot.id) st.textures->destroy(slot.id);
  st.slots.clear();
}

namespace {

void status_bar(InspectorState& st) {
  ImGui::TextUnformatted("DMA inspector");
  ImGui::SameLine();
  ImGui::TextDisabled("| %s", st.snap ? st.snap->source_label.c_str() : "starting");
  if (st.snap && st.snap->views) {
    const Shape& s = st.snap->views->shape;
    const Options& o = st.snap->views->opt;
    ImGui::SameLine();
    ImGui::TextDisabled("| B=%lld Hq=%lld Hkv=%lld Hd=%lld Lq=%lld Lk=%lld D=%lld w=%lld %s %s",
                        (long long)s.B, (long long)s.Hq, (long long)s.Hkv, (long long)s.Hd,
                        (long long)s.Lq, (long long)s.Lk, (long long)s.D, (long long)o.window,
                        o.causal ? "causal" : "non-causal", form_name(o.form));
  }
  // The progress of the worker, or the frame rate when idle.
  const float right = ImGui::GetWindowContentRegionMax().x;
  ImGui::SameLine(right - 330.0f);
  if (st.status.busy || !st.status.stage.empty()) {
    static const char spinner[] = "|/-\\";
    const char spin = spinner[static_cast<int>(ImGui::GetTime() * 8.0) & 3];
    char overlay[96];
    std::snprintf(overlay, sizeof overlay, "%c %s", spin, st.status.stage.c_str());
    ImGui::ProgressBar(st.status.progress, ImVec2(240.0f, 0.0f), overlay);
  } else {
    ImGui::Dummy(ImVec2(240.0f, 0.0f));
  }
  ImGui::SameLine();
  ImGui::TextDisabled("%.0f fps", ImGui::GetIO().Framerate);
}

}  // namespace

void draw_inspector(InspectorState& st) {
  st.snap = st.worker->snapshot();
  st.history = st.worker->history();
  st.status = st.worker->status();
  st.view.preview_head = -1;
  st.view.hover.reset();
  st.build_spent_ms = 0;
  st.builds_pending = false;

  const ImGuiViewport* vp = ImGui::GetMainViewport();
  ImGui::SetNextWindowPos(vp->WorkPos);
  ImGui::SetNextWindowSize(vp->WorkSize);
  const ImGuiWindowFlags host = ImGuiWindowFlags_NoDecoration | ImGuiWindowFlags_NoMove |
                                ImGuiWindowFlags_NoSavedSettings |
                                ImGuiWindowFlags_NoBringToFrontOnFocus;
  ImGui::PushStyleVar(ImGuiStyleVar_WindowRounding, 0.0f);
  ImGui::Begin("DMA inspector", nullptr, host);
  ImGui::PopStyleVar();
  status_bar(st);
  ImGui::Separator();

  const float left_w = 290.0f, right_w = 480.0f;
  ImGui::BeginChild("controls", ImVec2(left_w, 0), true);
  panel_controls(st);
  ImGui::EndChild();
  ImGui::SameLine();

  const float centre_w = ImGui::GetContentRegionAvail().x - right_w - ImGui::GetStyle().ItemSpacing.x;
  ImGui::BeginChild("centre", ImVec2(centre_w, 0), true);
  if (st.snap && !st.snap->error.empty()) {
    ImGui::PushStyleColor(ImGuiCol_Text, IM_COL32(255, 110, 90, 255));
    ImGui::TextWrapped("%s", st.snap->error.c_str());
    ImGui::PopStyleColor();
  }
  if (st.model) {
    ImGui::Checkbox("model view", &st.view.model_view);
    help_marker("All layers x delta heads of the model at once, as thumbnails of the kept mask\n"
                "stored in each layer's bundle (its evict). Click one to open that layer and head.");
    if (!st.view.model_view && st.snap) {
      ImGui::SameLine();
      ImGui::TextDisabled("| layer %d of %d", st.snap->params.layer, static_cast<int>(st.model->layers.size()));
    }
  }
  if (st.model && st.view.model_view) {
    panel_model(st);
  } else if (st.snap && st.snap->views) {
    ImGui::Checkbox("slot view", &st.view.slot_view);
    help_marker("The candidate table of the shown head instead of the large view: for each query\n"
                "tile the keys its queries keep, each in the slot it holds for its whole run of\n"
                "tiles, as the atomic-free backward sweeps them.");
    panel_head_thumbnails(st);
    if (st.view.slot_view) {
      panel_slots(st);
    } else {
      const float bars_h = 150.0f;
      panel_head_view(st, bars_h);
      panel_delta_bars(st);
    }
  } else {
    ImGui::TextDisabled("computing the first result...");
  }
  ImGui::EndChild();
  ImGui::SameLine();

  ImGui::BeginChild("right", ImVec2(0, 0), true);
  panel_timings(st);
  ImGui::Spacing();
  panel_compare(st);
  ImGui::Spacing();
  panel_export(st);
  ImGui::EndChild();

  ImGui::End();

  // Hand the controls to the worker; it starts a job only when they changed.
  st.worker->request(st.params);
}

}  // namespace dma::viewer
