// The pieces of work of one inspector job, without threads: making the inputs, running each
// backend through dma::run_pipeline (the scalar reference keeping p and ds, the tiled modes, CUDA),
// turning the reference's result into what the heatmaps read (Views), and comparing other outputs
// with it. The worker (worker.hpp) calls them in order and publishes what they give.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "bundle_data.hpp"
#include "dma/pipeline.hpp"
#include "params.hpp"
#include "tiles.hpp"

namespace dma::viewer {

// The inspector keeps p and ds whole: B*Hq*Lq*Lk at most this many cells.
inline constexpr int64_t kMaxInspectorCells = int64_t{1} << 27;

// The inputs the params describe: the example or a bundle (data), or random tensors from the
// seed (dma::random_problem, with a from the params or default_a); q, k, v and do rounded to bf16
// when asked (as the CUDA kernels read them). Throws dma::Error on a bad shape or options, or
// beyond kMaxInspectorCells.
Problem<float> make_problem(const Params& prm, const BundleData* data);

// Everything the heatmaps read, from the reference. Layouts as in dma/types.hpp.
struct Views {
  uint64_t id = 0;  // unique per job: texture caches key on it
  Shape shape;
  Options opt;
  int64_t Bq = 64, Bk = 64;
  bool has_backward = false;
  std::vector<float> delta;      // (B,Hd,Lk)
  std::vector<int64_t> evict;    // (B,Hd,Lk)
  std::vector<uint8_t> mask;     // (B,Hd,Lq,Lk)
  std::vector<float> probs, ds;  // (B,Hq,Lq,Lk)
  std::vector<float> o, lse, dq, dk, dv, ddelta;  // dv: total (through delta too)
  std::vector<int64_t> last_allowed;  // per query: p_i clipped to Lk-1
  std::vector<TileGrid> tiles;        // per (b, delta head)
};

// Moves the reference's result (run with p and ds kept) into Views and adds the causal limits
// and the tile grids.
std::shared_ptr<Views> make_views(Result<float>&& ref, const Problem<float>& p, const Params& prm,
                                  uint64_t id);

// One run of backend `id` on p through dma::run_pipeline: the reference is its cpu backend (with
// hooks.keep_probs / keep_ds it hands out p and ds), the tiled modes its tiled backend (a short
// run is repeated and the faster kept: cold caches), CUDA dma::cuda::run_pipeline (which has no
// hooks). hooks.progress reports and cancels. Throws dma::Error (CUDA: e.g. a head dim the
// kernels lack) and dma::Cancelled.
Result<float> run_backend(const Problem<float>& p, const Params& prm, BackendId id,
                          const PipelineHooks& hooks);
// Whether CUDA can run here; when not, *note says why ("built without CUDA", "no CUDA device").
bool detect_cuda(std::string* note);

// One backend's last timing: times per phase, the forward's tile counters, agreement with the
// reference. (The backward's own work, the slot sweep of the gather mode, is what the slot view
// counts: viewer/panel_slots.cpp.)
struct BackendRun {
  bool ran = false;
  std::string note;  // why it did not run ("no CUDA device", "not selected", ...)
  PhaseTimes times;
  TileCounters fwd;
  double max_err = -1;  // max|o - o_ref| / max|o_ref| (and the same for dq), -1: not compared
};
BackendRun backend_run(const Result<float>& r, const Views& ref);

// A second set of outputs shown against the CPU reference (|CUDA - CPU|): CUDA run live, or the
// outputs stored in a bundle (e.g. written by dma_run --backend cuda on a GPU machine).
struct Comparison {
  std::string label;
  std::vector<float> o, lse, dq, dk, dv, ddelta, delta;
  std::vector<int64_t> evict;
  struct Row {
    std::string tensor;
    double max_rel = 0, rel_l2 = 0;  // max|x - ref| / max|ref|, ||x - ref|| / ||ref||
  };
  std::vector<Row> rows;          // o lse delta, and with the backward dq dk dv ddelta
  int64_t evict_mismatches = -1;  // keys whose eviction position differs; -1: not compared
};
std::shared_ptr<Comparison> compare_result(const std::string& label, const Result<float>& r,
                                           const Views& ref);
// The stored outputs of a bundle against the reference; null when it stores none.
std::shared_ptr<Comparison> compare_stored(const BundleData& d, const Views& ref);

}  // namespace dma::viewer
