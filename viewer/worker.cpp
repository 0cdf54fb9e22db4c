// The worker thread: requests, the job's order, snapshots, live timing.
#include "worker.hpp"

#include <chrono>

namespace dma::viewer {

void record_pass(TimingHistory& h, BackendId b, double total_ms) {
  std::vector<float>& passes = h[static_cast<int>(b)];
  passes.push_back(static_cast<float>(total_ms));
  if (passes.size() > kHistoryPasses)
    passes.erase(passes.begin(), passes.end() - static_cast<std::ptrdiff_t>(kHistoryPasses));
}

Worker::Worker(std::function<void()> wake) : wake_(std::move(wake)) {
  cuda_ok_ = detect_cuda(&cuda_note_);
  thread_ = std::thread([this] { loop(); });
}

Worker::~Worker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    ++generation_;  // the running job stops at its next phase boundary
  }
  cv_.notify_all();
  thread_.join();
}

void Worker::set_data(std::shared_ptr<const BundleData> example,
                      std::shared_ptr<const BundleData> bundle) {
  std::lock_guard<std::mutex> lock(mu_);
  example_ = std::move(example);
  bundle_ = std::move(bundle);
}

void Worker::set_model(std::shared_ptr<const Model> model) {
  std::lock_guard<std::mutex> lock(mu_);
  model_ = std::move(model);
}

void Worker::request(const Params& p) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (has_request_ && p == requested_) return;
    requested_ = p;
    has_request_ = true;
    ++generation_;
    busy_ = true;
    progress_ = 0;
    stage_ = "queued";
  }
  cv_.notify_all();
}

void Worker::rerun_timings() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    rerun_ = true;
  }
  cv_.notify_all();
}

void Worker::set_live(bool live) {
  {
    std::lock_guard<std::mutex> lock(mu_);  // so the worker cannot miss the change while waiting
    live_ = live;
  }
  cv_.notify_all();
}

WorkerStatus Worker::status() const {
  std::lock_guard<std::mutex> lock(mu_);
  return {busy_, progress_, stage_};
}

std::shared_ptr<const Snapshot> Worker::snapshot() const {
  std::lock_guard<std::mutex> lock(mu_);
  return snapshot_;
}

TimingHistory Worker::history() const {
  std::lock_guard<std::mutex> lock(mu_);
  return history_;
}

bool Worker::wait_idle(double seconds) const {
  std::unique_lock<std::mutex> lock(mu_);
  return cv_.wait_for(lock, std::chrono::duration<double>(seconds),
                      [this] { return !busy_ && snapshot_ != nullptr; });
}

void Worker::set_stage(const std::string& stage, float progress) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stage_ = stage;
    progress_ = progress;
  }
  if (wake_) wake_();
}

void Worker::record(BackendId b, const PhaseTimes& times) {
  std::lock_guard<std::mutex> lock(mu_);
  record_pass(history_, b, times.total());
}

void Worker::publish(std::shared_ptr<Snapshot> s) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    snapshot_ = std::move(s);
  }
  if (wake_) wake_();
}

std::shared_ptr<const BundleData> Worker::data_for(const Params& p) const {
  std::lock_guard<std::mutex> lock(mu_);
  if (p.source == Source::bundle && model_ && p.layer >= 0 &&
      p.layer < static_cast<int>(model_->layers.size()) && model_->layers[p.layer].data)
    return model_->layers[p.layer].data;
  return p.source == Source::bundle ? bundle_ : p.source == Source::example ? example_ : nullptr;
}

PipelineHooks Worker::progress_hooks(const std::string& label, float lo, float hi,
                                     uint64_t generation) {
  PipelineHooks hooks;
  hooks.progress = [this, label, lo, hi, generation](const char* stage, double fraction) {
    set_stage(label + ": " + stage, lo + (hi - lo) * static_cast<float>(fraction));
    return cancelled(generation) ? Control::cancel : Control::proceed;
  };
  return hooks;
}

void Worker::loop() {
  uint64_t done_generation = 0;
  for (;;) {
    Params p;
    uint64_t generation = 0;
    bool new_job = false, timing = false;
    {
      std::unique_lock<std::mutex> lock(mu_);
      // Sleep until there is a new request or a timing re-run; while live, at most 250 ms between
      // timing passes. Idle and not live, this thread uses no CPU at all.
      auto news = [&] { return stop_ || (has_request_ && generation_ != done_generation) || rerun_; };
      if (live_) cv_.wait_for(lock, std::chrono::milliseconds(250), news);
      else cv_.wait(lock, [&] { return news() || live_; });
      if (stop_) return;
      generation = generation_;
      p = requested_;
      if (has_request_ && generation != done_generation) new_job = true;
      else if (has_request_ && snapshot_ && (rerun_ || live_)) timing = true;
      rerun_ = false;
      if (new_job) {
        history_ = {};
        busy_ = true;
      }
    }
    if (new_job) {
      run_job(p, generation);
      if (!cancelled(generation)) done_generation = generation;
    } else if (timing) {
      timing_pass(p, generation, false);
    }
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (generation_ == done_generation) {
        busy_ = false;
        stage_.clear();
        progress_ = 1;
      }
    }
    cv_.notify_all();
    if (wake_) wake_();
  }
}

void Worker::run_job(const Params& prm, uint64_t generation) {
  auto snap = std::make_shared<Snapshot>();
  snap->params = prm;
  const std::shared_ptr<const BundleData> data = data_for(prm);
  snap->source_label = data ? data->label : "random inputs, seed " + std::to_string(prm.seed);
  try {
    set_stage("preparing inputs", 0.02f);
    const Problem<float> p = make_problem(prm, data.get());

    // 2. The reference, keeping p and ds: the heatmaps can show as soon as it is done.
    PipelineHooks hooks = progress_hooks("reference", 0.02f, 0.55f, generation);
    hooks.keep_probs = hooks.keep_ds = true;
    Result<float> ref = run_backend(p, prm, BackendId::reference, hooks);
    BackendRun& rr = snap->runs[static_cast<int>(BackendId::reference)];
    rr.ran = true;
    rr.times = ref.times;
    rr.max_err = 0;
    record(BackendId::reference, ref.times);
    snap->views = make_views(std::move(ref), p, prm, next_views_id_++);
    if (data) snap->compare = compare_stored(*data, *snap->views);
    for (int b = 1; b < kBackendCount; ++b)
      snap->runs[b].note = prm.run[b] ? "queued" : "not selected";
    publish(std::make_shared<Snapshot>(*snap));

    // 3-4. The timed backends.
    timing_pass(prm, generation, true);
  } catch (const Cancelled&) {
    // A newer request came: its job publishes.
  } catch (const std::exception& e) {
    snap->error = e.what();
    publish(snap);
  }
}

void Worker::timing_pass(const Params& prm, uint64_t generation, bool first) {
  std::shared_ptr<const Snapshot> base = snapshot();
  if (!base || !base->views || base->params != prm) return;
  try {
    const Problem<float> p = make_problem(prm, data_for(prm).get());
    const Views& v = *base->views;
    auto snap = std::make_shared<Snapshot>(*base);
    // The first pass follows the job's reference run; a repeated one re-times the reference too
    // (without keeping p and ds).
    for (int b = first ? 1 : 0; b < kBackendCount; ++b) {
      if (cancelled(generation)) return;
      const auto id = static_cast<BackendId>(b);
      BackendRun& run = snap->runs[b];
      if (!prm.run[b] || (id == BackendId::cuda && !cuda_ok_)) {
        if (id == BackendId::reference) continue;  // keeps the job's run
        run = BackendRun{};
        run.note = prm.run[b] ? cuda_note_ : "not selected";
        continue;
      }
      const float lo = first ? 0.55f + 0.45f * static_cast<float>(b - 1) / (kBackendCount - 1)
                             : static_cast<float>(b) / kBackendCount;
      const float hi = first ? lo + 0.45f / (kBackendCount - 1) : lo + 1.0f / kBackendCount;
      const PipelineHooks hooks =
          progress_hooks(std::string("timing: ") + backend_label(id), lo, hi, generation);
      Result<float> r;
      if (id == BackendId::cuda) {
        set_stage("timing: CUDA", lo);
        try {
          r = run_backend(p, prm, id, hooks);
        } catch (const std::exception& e) {  // e.g. a head dim the kernels do not support
          run = BackendRun{};
          run.note = e.what();
          continue;
        }
        // The live CUDA outputs against the CPU reference.
        if (first) snap->compare = compare_result("CUDA (bf16, this run)", r, v);
      } else {
        r = run_backend(p, prm, id, hooks);
      }
      if (cancelled(generation)) return;
      run = backend_run(r, v);
      record(id, r.times);
      publish(std::make_shared<Snapshot>(*snap));
    }
    publish(snap);  // also carries the notes of backends that did not run
  } catch (const Cancelled&) {
    // A newer request came: its job publishes.
  } catch (const std::exception& e) {
    auto snap = std::make_shared<Snapshot>(*base);
    snap->error = std::string("timing: ") + e.what();
    publish(snap);
  }
}

}  // namespace dma::viewer
