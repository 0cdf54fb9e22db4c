// The panel groups of the inspector, one file each, all free functions over InspectorState.
//
//   panel_controls.cpp  inputs, shape, mask, per-head a, tiles, backends (left column)
//   panel_heads.cpp     head thumbnails, the large view with overlays, the delta bar plot (centre)
//   panel_timings.cpp   timings per phase and backend, counters, |CUDA - CPU| summary (right)
//   panel_export.cpp    PNG at data resolution, window screenshot, CSV (right, below)
//   panel_model.cpp     a model's layers x delta heads as mask thumbnails (centre, model view)
//   panel_slots.cpp     the slot view: a head's candidate table, query tiles x slots (centre)
//   inspector.cpp       the frame: layout, status bar, texture cache shared by the panels
#pragma once

#include <functional>
#include <string>

#include "inspector.hpp"

namespace dma::viewer {

void panel_controls(InspectorState& st);
void panel_model(InspectorState& st);  // panel_model.cpp: layers x delta heads of a model
void panel_head_thumbnails(InspectorState& st);
void panel_head_view(InspectorState& st, float bars_height);
void panel_delta_bars(InspectorState& st);
// The candidate table of the shown head's (b, delta head): which key each slot holds at each
// query tile, hover for the key, its e_j and its run; the work of the slot sweep (panel_slots.cpp).
void panel_slots(InspectorState& st);
void panel_timings(InspectorState& st);
void panel_compare(InspectorState& st);
void panel_export(InspectorState& st);
// What the export buttons do (st.message says what happened): files <prefix>_<view>_b<b>_h<h>.
bool export_heatmap_png(InspectorState& st);
bool export_matrix_csv(InspectorState& st);

// The tooltip's first line for a cell of the large view: `query 180 "the", key 110 "cat"`, with
// the tokens (and roles) of tokens.txt / roles.txt when labels is given (panel_heads.cpp).
std::string cell_label(const HeadMatrix& m, const Cell& c, const Shape& s, const TokenLabels* labels);

// What each backend is (panel_timings.cpp; the controls show it beside the backend checkboxes).
const char* backend_help(BackendId b);

// Shared helpers (inspector.cpp).
void help_marker(const char* text);  // "(?)" with a tooltip, as in the Dear ImGui demo
ImU32 to_imu32(const Rgba& c, float alpha = 1.0f);
// The texture of `slot` for a rows x cols matrix drawn on px_w x px_h pixels, max-downsampled by
// integer factors; rebuilt from make() only when `key` or the factors change. Unless urgent, a
// rebuild waits for a later frame once this frame's build budget is spent.
const TextureSlot& heatmap_texture(InspectorState& st, const std::string& slot,
                                   const std::string& key, int64_t rows, int64_t cols, float px_w,
                                   float px_h, const std::function<HeadMatrix()>& make,
                                   bool urgent = false);
// The same for the window w of a matrix already at hand (the large view's), built at once.
const TextureSlot& matrix_texture(InspectorState& st, const std::string& slot,
                                  const std::string& key, float px_w, float px_h,
                                  const HeadMatrix& m, const Window& w);
std::string matrix_key(const InspectorState& st, ViewKind kind, int head);
// The large view's matrix for head hq, cached in st.large.
const HeadMatrix& large_matrix(InspectorState& st, int hq);

}  // namespace dma::viewer
