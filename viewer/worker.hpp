// The inspector's worker thread: turns the controls (Params) into everything the panels draw (a
// Snapshot), so the UI never waits for the scalar reference.
//
// A job runs, in order, with a progress fraction and a stage name the UI shows (jobs.hpp does
// the work, this file the scheduling):
//   1. inputs: the built-in example, a bundle (--in), or random tensors from the seed
//   2. the scalar reference: dma::run_pipeline's cpu backend, keeping the probabilities p and the
//      logit gradients ds (which only the reference can give); the heatmaps show at once
//   3. the tiled CPU implementation in each mode (dense, skip, gather), timed, with its counters
//      and its largest difference from the reference
//   4. CUDA, when built with it and a device is present
// Snapshots are immutable and shared: the UI keeps drawing the previous one until the next is
// published. A new request cancels the running job at the next phase boundary of the pipeline
// (dma::run_pipeline's progress hook answers cancel; the job ends on dma::Cancelled).
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

#include "bundle_data.hpp"
#include "jobs.hpp"
#include "model.hpp"
#include "params.hpp"

namespace dma::viewer {

struct Snapshot {
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

// Total milliseconds per timing pass, per backend, since the inputs last changed: the sparklines.
using TimingHistory = std::array<std::vector<float>, kBackendCount>;
// Live timing adds a pass every 250 ms or so: only the last kHistoryPasses of each backend stay.
inline constexpr size_t kHistoryPasses = 120;
// Appends a pass of backend b, dropping the oldest beyond kHistoryPasses.
void record_pass(TimingHistory& h, BackendId b, double total_ms);

class Worker {
 public:
  // wake is called from the worker thread whenever there is something new to draw (the platform
  // layer passes glfwPostEmptyEvent, so an idle UI sleeps in glfwWaitEvents until then).
  explicit Worker(std::function<void()> wake);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  void set_data(std::shared_ptr<const BundleData> example, std::shared_ptr<const BundleData> bundle);
  // A model: source bundle then reads the bundle of layer Params::layer (when it is readable).
  void set_model(std::shared_ptr<const Model> model);
  // Starts a job when p differs from the last request (cheap to call every frame).
  void request(const Params& p);
  void rerun_timings();      // one more timing pass on the current inputs
  void set_live(bool live);  // repeat timing passes while idle, for the sparklines
  bool live() const { return live_; }

  WorkerStatus status() const;
  std::shared_ptr<const Snapshot> snapshot() const;
  TimingHistory history() const;
  bool wait_idle(double seconds) const;  // for headless runs: wait until the first job is done

  bool cuda_available() const { return cuda_ok_; }
  const std::string& cuda_note() const { return cuda_note_; }

 private:
  void loop();
  void run_job(const Params& p, uint64_t generation);
  // Times the backends on the current inputs; the first pass of a job also fills the counters and
  // the CUDA comparison, a later one re-times the reference too.
  void timing_pass(const Params& p, uint64_t generation, bool first);
  bool cancelled(uint64_t generation) const { return generation_.load() != generation; }
  // Hooks whose progress shows "<label>: <stage>" at lo..hi of the job and cancels when a newer
  // request came.
  PipelineHooks progress_hooks(const std::string& label, float lo, float hi, uint64_t generation);
  std::shared_ptr<const BundleData> data_for(const Params& p) const;
  void set_stage(const std::string& stage, float progress);
  void record(BackendId b, const PhaseTimes& times);
  void publish(std::shared_ptr<Snapshot> s);

  std::function<void()> wake_;
  mutable std::mutex mu_;
  mutable std::condition_variable cv_;
  std::shared_ptr<const BundleData> example_, bundle_;
  std::shared_ptr<const Model> model_;
  Params requested_;
  bool has_request_ = false, rerun_ = false, stop_ = false, busy_ = false;
  std::atomic<bool> live_{false};
  std::atomic<uint64_t> generation_{0};
  uint64_t next_views_id_ = 1;  // worker thread only
  std::shared_ptr<const Snapshot> snapshot_;
  TimingHistory history_;
  float progress_ = 0;
  std::string stage_;
  bool cuda_ok_ = false;
  std::string cuda_note_;
  std::thread thread_;
};

}  // namespace dma::viewer
