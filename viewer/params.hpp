// What the controls set (Params) and the names of the inspector's backends. Equal Params give
// equal results, so the worker starts a job only when they change.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "dma/types.hpp"

namespace dma::viewer {

enum class Source { example, bundle, random };

enum class BackendId { reference, tiled_dense, tiled_skip, tiled_gather, cuda };
inline constexpr int kBackendCount = 5;
const char* backend_label(BackendId b);

struct Params {
  Source source = Source::example;
  // Shape of random inputs (the example and bundles bring their own).
  int B = 1, Lq = 512, Lk = 512, Hq = 8, Hkv = 2, D = 64;  // D = 64: the CUDA kernels support 32, 64, 128, 256
  bool hd_is_hq = false;  // Hd = Hq (one mask per query head), else Hd = Hkv
  int window = 64;
  bool causal = true;
  Form form = Form::exp;
  uint32_t seed = 1;
  std::vector<float> a;  // per delta head; empty: the data's own values
  int Bq = 64, Bk = 64;
  std::array<bool, kBackendCount> run{true, true, true, true, true};
  // Round q, k, v and do to bf16 before the CPU runs, as the CUDA kernels do: then |CUDA - CPU|
  // shows the kernels' own error, not the inputs' rounding (docs/design.md §5).
  bool bf16_inputs = false;
  int layer = 0;  // the layer of a model (--in DIR holding layer_00/ layer_01/ ...), source bundle

  int Hd() const { return hd_is_hq ? Hq : Hkv; }
  bool operator==(const Params& o) const;
  bool operator!=(const Params& o) const { return !(*this == o); }
};

// The default per-head a of random inputs: head 0 gets a = 0 (all delta equal, so causal DMA is
// exactly a sliding window, docs/design.md §1.2) and the others rise to 0.6.
std::vector<float> default_a(int Hd);

}  // namespace dma::viewer
