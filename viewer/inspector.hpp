// The inspector's state and its one entry point, draw_inspector(), called once per frame by the
// platform layer (main.cpp) or by a test that drives it with a fake mouse.
//
// Everything the panels read or change lives in InspectorState (one struct, as in the Dear ImGui
// demo): the controls (Params, handed to the Worker), what is drawn (ViewState), the textures,
// and requests to the platform (a screenshot). Panels are free functions over it (panels.hpp).
#pragma once

#include <imgui.h>

#include <array>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "heatmap.hpp"
#include "tiles.hpp"
#include "view_data.hpp"
#include "worker.hpp"

namespace dma::viewer {

// Makes GPU textures from images. The platform layer implements it with OpenGL; the tests with a
// fake that only counts. Keeping GL out of the panels is what lets them run without a window.
struct TextureUploader {
  virtual ~TextureUploader() = default;
  // Uploads img into `existing` (resized as needed) or a new texture; returns its id.
  virtual ImTextureID upload(ImTextureID existing, const Image& img) = 0;
  virtual void destroy(ImTextureID id) = 0;
};

// One texture the panels reuse frame after frame; rebuilt only when its key changes.
struct TextureSlot {
  ImTextureID id = nullptr;
  std::string key;
  int width = 0, height = 0;        // texels
  int64_t factor_r = 1, factor_c = 1;  // data cells per texel
};

struct ViewState {
  ViewKind kind = ViewKind::probs;
  DiffTensor diff = DiffTensor::o;
  bool log_scale = false;
  bool show_grid = true, show_skipped = true, show_gathered = true;
  bool bars_log = true;  // the delta bar plot on a log axis (when every delta is positive)
  int batch = 0;
  int locked_head = 0;
  int preview_head = -1;  // the thumbnail under the mouse this frame, -1: none
  std::optional<Cell> hover;   // the large view's cell under the mouse this frame
  std::optional<Cell> pinned;  // clicked cell: keeps the bar plot's query when the mouse leaves
  Rect image_rect;             // where the large view was drawn (the bar plot aligns to it)
  // Zoom of the large view: the window of its matrix on screen (the mouse wheel zooms around the
  // cursor, a right-drag pans). It refers to a zoom_rows x zoom_cols matrix; a matrix of another
  // size (another view kind or shape) resets it.
  Window zoom;
  int64_t zoom_rows = 0, zoom_cols = 0;
  std::optional<Window> pan_anchor;  // the window when the right-drag began
  std::vector<Rect> thumb_rects;  // where each head's thumbnail was drawn (tests, scripting)
  // The model view (a model opened with --in): layers x delta heads, instead of the head view.
  bool model_view = false;
  std::vector<std::vector<Rect>> model_rects;  // [layer][delta head], as drawn (tests)
  // The slot view (panel_slots.cpp): the shown head's candidate table, instead of the large view.
  bool slot_view = false;
  Rect slot_rect;                   // where the table was drawn (tests, scripting)
  std::optional<Cell> slot_hover;   // (query tile, slot) under the mouse this frame
  int shown_head() const { return preview_head >= 0 ? preview_head : locked_head; }
};

struct InspectorState {
  Params params;
  Worker* worker = nullptr;
  TextureUploader* textures = nullptr;
  std::shared_ptr<const BundleData> example;  // assets/example, if it could be read
  std::shared_ptr<const BundleData> bundle;   // --in DIR, if given and readable
  std::shared_ptr<const Model> model;         // --in DIR holding layer_00/ ...: bundle is a layer

  // Read once at the start of each frame, so every panel draws the same data.
  std::shared_ptr<const Snapshot> snap;
  TimingHistory history;
  WorkerStatus status;

  ViewState view;
  std::map<std::string, TextureSlot> slots;
  // Rebuilding textures costs tens of ms per head at Lk = 2048, so a frame spends at most this
  // much on thumbnails; the rest wait for the next frames (showing their old picture meanwhile).
  double build_budget_ms = 20.0, build_spent_ms = 0.0;
  bool builds_pending = false;  // some texture waits: the platform keeps drawing frames
  std::string large_key;  // the large view's matrix, kept for tooltips, export and the bar plot
  HeadMatrix large;
  // The slot view's candidate table of one (b, delta head), rebuilt when slot_key changes.
  std::string slot_key;
  CandidateTable slot_table;
  std::vector<KeyRun> slot_runs;
  SlotWork slot_work;

  // Export.
  std::string export_prefix = "dma";
  std::string message;        // the last export's outcome, shown in the export panel
  std::string screenshot_request;  // set by a panel, done by the platform after rendering

  // Headless runs: hover this cell of the large view (the platform moves the mouse there).
  std::optional<Cell> script_hover;
  std::optional<ImVec2> script_mouse;  // screen position of script_hover, from the last frame
  std::optional<Window> script_zoom;   // zoom the large view to this window once it is drawn
};

// The data the current snapshot was computed from (the example, the bundle or the model's layer),
// null for random inputs or before the first snapshot.
const BundleData* snapshot_data(const InspectorState& st);
// Opens layer `layer` of the model: st.bundle and st.params follow (window, causal, form, a).
// False (st.message says why) when the layer could not be read.
bool select_layer(InspectorState& st, int layer);

// Draws one frame of the whole inspector into the current ImGui context.
void draw_inspector(InspectorState& st);

// Frees every texture (before the GL context goes away).
void release_textures(InspectorState& st);

}  // namespace dma::viewer
