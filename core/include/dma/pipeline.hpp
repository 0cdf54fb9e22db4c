// The whole DMA pipeline on the CPU: dynamic weights -> mask -> forward -> backward -> backward
// of the dynamic weights, with phase timings. This is what dma_run and the inspector call.
#pragma once

#include <cstdint>
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
  PhaseTimes times;
};

enum class Backend { cpu, tiled };
const char* backend_name(Backend b);

// Runs the pipeline. Throws dma::Error on invalid input or a non-finite delta.
// cpu: the scalar reference with the explicit mask. tiled: the tiled implementation with the
// eviction-interval mask; with want_mask it also expands the explicit mask for output.
template <typename T>
Result<T> run_pipeline(const Problem<T>& p, Backend backend, const TileConfig& tc = {},
                       bool want_mask = true);

}  // namespace dma
