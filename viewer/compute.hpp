// The inspector's compute side: turns the controls (Params) into everything the panels draw
// (a Snapshot), on a worker thread so the UI never waits for the scalar reference.
//
// A job runs, in order, with a progress fraction and a stage name the UI shows:
//   1. inputs: the built-in example, a bundle (--in), or random tensors from the seed
//   2. the scalar reference step by step (delta -> mask -> forward -> backward), keeping the
//      probabilities p and the logit gradients ds, which only the reference can give
//   3. the tiled CPU implementation in each mode (dense, skip, gather), timed, with its counters
//      and its largest difference from the reference
//   4. CUDA, when built with it and a device is present
// Snapshots are immutable and shared: the UI keeps drawing the previous one until the next is
// published. A new request cancels the running job at the next step boundary.
#pragma once

#include <array>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "dma/bundle.hpp"
#include "dma/pipeline.hpp"
#include "tiles.hpp"

namespace dma::viewer {

enum class Source { example, bundle, random };

enum class BackendId { reference, tiled_dense, tiled_skip, tiled_gather, cuda };
inline constexpr int kBackendCount = 5;
const char* backend_label(BackendId b);
const char* backend_help(BackendId b);

// Everything the controls set. Equal Params give equal results, so a job runs only on a change.
struct Params {
  Source source = Source::example;
  // Shape of random inputs (the example and bundles bring their own).
  int B = 1, Lq = 512, Lk = 512, Hq = 8, Hkv = 2, D = 64;  // D = 64: the CUDA kernels support 64 and 128
  bool hd_is_hq = false;  // Hd = Hq (one mask per query head), else Hd = Hkv
  int window = 64;
  bool causal = true;
  Form form = Form::exp;
  uint32_t seed = 1;
  std::vector<float> a;  // per delta head; empty: the data's own values
  int Bq = 64, Bk = 64;
  std::array<bool, kBackendCount> run{true, true, true, true, true};
  // Round q, k, v and do to bf16 before the CPU runs, as the CUDA kernels do: then |CUDA - CPU|
  // shows the kernels' own error, not the inputs' rounding (DESIGN.md §5).
  bool bf16_inputs = false;

  int Hd() const { return hd_is_hq ? Hq : Hkv; }
  bool operator==(const Params& o) const;
  bool operator!=(const Params& o) const { return !(*this == o); }
};

// x rounded to the nearest bfloat16 (ties to even), as a float.
float round_bf16(float x);

// The default per-head a of random inputs: head 0 gets a = 0 (all delta equal, so causal DMA is
// exactly a sliding window, DESIGN.md §1.2) and the others rise to 0.6.
std::vector<float> default_a(int Hd);

// A bundle read from disk, with what can be inferred about how it was computed.
struct BundleData {
  std::string dir, label;
  Bundle bundle;             // inputs only: a stored output delta is moved to stored_delta
  Shape shape;
  bool has_stored_outputs = false;
  // Inferred from stored outputs, or defaults (the example uses w = 32, causal, exp).
  int window = 32;
  bool causal = true;
  Form form = Form::exp;
  std::vector<float> a;      // the bundle's own a (empty when delta is given)
  bool delta_given = false;
  std::string notes;         // how the settings were inferred, for the UI
};
// Reads a bundle folder; throws dma::Error (missing tensors, bad shapes).
std::shared_ptr<BundleData> load_bundle_data(const std::string& dir, const std::string& label);

// Runs of one backend: times per phase, tile counters, and agreement with the reference.
struct BackendRun {
  bool ran = false;
  std::string note;  // why it did not run ("no CUDA device", "not selected", ...)
  PhaseTimes times;
  TileCounters fwd, bwd;
  double max_err = -1;  // max|o - o_ref| / max|o_ref| (and the same for dq), -1: not compared
};

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
  std::vector<Row> rows;
  int64_t evict_mismatches = -1;  // keys whose eviction position differs; -1: not compared
};

// Everything the heatmaps read. Layouts as in dma/types.hpp.
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
  std::vector<float> o, lse, dq, dk, dv;
  std::vector<int64_t> last_allowed;  // per query: p_i clipped to Lk-1
  std::vector<TileGrid> tiles;        // per (b, delta head)
};

struct Snapshot {
  uint64_t id = 0;  // changes with every publish
  Params params;
  std::string source_label, error;
  std::shared_ptr<const Views> views;
  std::shared_ptr<const Comparison> compare;
  std::array<BackendRun, kBackendCount> runs;
};

struct WorkerStatus {
  bool busy = false;
  float progress = 0;  // 0..1 within the current job
  std::string stage;
};

class Worker {
 public:
  // wake is called from the worker thread whenever there is something new to draw (the platform
  // layer passes glfwPostEmptyEvent, so an idle UI sleeps in glfwWaitEvents until then).
  explicit Worker(std::function<void()> wake);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  void set_data(std::shared_ptr<const BundleData> example, std::shared_ptr<const BundleData> bundle);
  // Starts a job when p differs from the last request (cheap to call every frame).
  void request(const Params& p);
  void rerun_timings();      // one more timing pass on the current inputs
  void set_live(bool live);  // repeat timing passes while idle, for the sparklines
  bool live() const { return live_; }

  WorkerStatus status() const;
  std::shared_ptr<const Snapshot> snapshot() const;
  std::array<std::vector<float>, kBackendCount> history() const;  // total ms per timing pass
  bool wait_idle(double seconds) const;  // for headless runs: wait until the first job is done

  bool cuda_available() const { return cuda_ok_; }
  const std::string& cuda_note() const { return cuda_note_; }

 private:
  void loop();
  void run_job(const Params& p, uint64_t generation);
  // Times the backends on the current inputs; the first pass of a job also fills the counters and
  // the CUDA comparison.
  void timing_pass(const Params& p, uint64_t generation, bool first);
  bool cancelled(uint64_t generation) const { return generation_.load() != generation; }
  void set_stage(const std::string& stage, float progress);
  void publish(std::shared_ptr<Snapshot> s);

  std::function<void()> wake_;
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::shared_ptr<const BundleData> example_, bundle_;
  Params requested_;
  bool has_request_ = false, rerun_ = false, stop_ = false, busy_ = false;
  std::atomic<bool> live_{false};
  std::atomic<uint64_t> generation_{0};
  uint64_t next_id_ = 1;
  std::shared_ptr<const Snapshot> snapshot_;
  std::array<std::vector<float>, kBackendCount> history_;
  float progress_ = 0;
  std::string stage_;
  bool cuda_ok_ = false;
  std::string cuda_note_;
  std::thread thread_;
};

}  // namespace dma::viewer
