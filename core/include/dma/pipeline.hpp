// The whole DMA pipeline on the CPU: dynamic weights -> mask -> forward -> backward -> backward
// of the dynamic weights, with phase timings (docs/design.md §1). The one CPU pipeline of the
// project: dma_run, the tests and the inspector all call run_pipeline; the inspector uses its
// hooks to keep p and ds and to show (and cancel) progress.
#pragma once

#include <cstdint>
#include <functional>
#include <stdexcept>
#include <vector>

#include "dma/dynamic_weights.hpp"
#include "dma/mask.hpp"
#include "dma/reference.hpp"
#include "dma/tiled.hpp"
#include "dma/types.hpp"

namespace dma {

template <typename T>
struct Problem {
  Shape shape;
  Options opt;
  std::vector<T> q, k, v;  // (B,Hq,Lq,D), (B,Hkv,Lk,D), (B,Hkv,Lk,D)
  std::vector<T> w_dt, a;  // (Hd,Hkv*D), (Hd); unused when delta is given
  std::vector<T> delta;    // (B,Hd,Lk) if given, else empty: computed from v, w_dt, a
  std::vector<T> dout;     // "do" (B,Hq,Lq,D) if the backward should run, else empty

  bool delta_given() const { return !delta.empty(); }
  bool has_backward() const { return !dout.empty(); }
};

// Checks sizes, options, every tensor's numel and that every value is finite.
template <typename T>
void validate_problem(const Problem<T>& p);

struct PhaseTimes {  // milliseconds of wall-clock time per phase
  double delta = 0, mask = 0, forward = 0, backward = 0;
  double total() const { return delta + mask + forward + backward; }
};

template <typename T>
struct Result {
  std::vector<T> delta;         // (B,Hd,Lk)
  std::vector<int64_t> evict;   // (B,Hd,Lk)
  std::vector<uint8_t> mask;    // (B,Hd,Lq,Lk) (cpu backend always; tiled: only if asked)
  ForwardResult<T> fwd;         // o, lse
  AttentionGrads<T> grads;      // dq, dk, dv (total, incl. through delta when computed), ddelta
  std::vector<T> dw_dt, da;     // only when delta was computed and the backward ran
  TileCounters fwd_counters, bwd_counters;  // tiled backend only
  std::vector<T> probs, ds;     // (B,Hq,Lq,Lk), only when PipelineHooks asked for them
  PhaseTimes times;
};

enum class Backend { cpu, tiled };
const char* backend_name(Backend b);

// What a progress callback answers: go on with the run, or stop it.
enum class Control { proceed, cancel };

// Thrown by run_pipeline when its progress callback answered Control::cancel. Deliberately not a
// dma::Error: nothing is wrong with the input, and `catch (const dma::Error&)` lets it pass.
struct Cancelled : std::runtime_error {
  Cancelled() : std::runtime_error("cancelled") {}
};

// Optional extras of a run; the default (nothing kept, no callback) is the plain pipeline.
struct PipelineHooks {
  // cpu backend only (the tiled one never holds them whole; asking it is a dma::Error):
  //   keep_probs: Result::probs receives p = exp(s - lse) (B,Hq,Lq,Lk), exactly 0 where masked
  //   keep_ds:    Result::ds receives ds = p * (dp - D) (B,Hq,Lq,Lk), the gradient of the logits,
  //               exactly 0 where masked; only when the backward runs (else it stays empty)
  bool keep_probs = false;
  bool keep_ds = false;
  // Called at every phase boundary, before the phase, with the stages in this order (a stage
  // that does not run is left out): "dynamic weights" (unless delta is given), "mask",
  // "forward", "backward" (with do; includes the backward of the dynamic weights), and last
  // "done" with fraction 1. fraction (0..1, non-decreasing, 0 at the first call) is the share
  // of the work done so far, estimated from operation counts. Answering Control::cancel makes
  // run_pipeline throw dma::Cancelled right there, at that boundary (also at "done": the caller
  // asked not to have the result). Runs on the calling thread; a cancel requested from another
  // thread takes effect at the next boundary.
  std::function<Control(const char* stage, double fraction)> progress;
};

// Runs the pipeline. Throws dma::Error on invalid input or a non-finite delta or output, and
// dma::Cancelled when hooks.progress cancels.
// cpu: the scalar reference with the explicit mask. tiled: the tiled implementation with the
// eviction-interval mask; with want_mask it also expands the explicit mask for output.
template <typename T>
Result<T> run_pipeline(const Problem<T>& p, Backend backend, const TileConfig& tc = {},
                       bool want_mask = true, const PipelineHooks& hooks = {});

}  // namespace dma
