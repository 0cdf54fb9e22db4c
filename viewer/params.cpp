#include "params.hpp"

#include <algorithm>
#include <tuple>

namespace dma::viewer {

const char* backend_label(BackendId b) {
  switch (b) {
    case BackendId::reference: return "reference";
    case BackendId::tiled_dense: return "tiled dense";
    case BackendId::tiled_skip: return "tiled skip";
    case BackendId::tiled_gather: return "tiled gather";
    case BackendId::cuda: return "CUDA";
  }
  return "?";
}

bool Params::operator==(const Params& o) const {
  return std::tie(source, B, Lq, Lk, Hq, Hkv, D, hd_is_hq, window, causal, form, seed, a, Bq, Bk,
                  run, bf16_inputs, layer) ==
         std::tie(o.source, o.B, o.Lq, o.Lk, o.Hq, o.Hkv, o.D, o.hd_is_hq, o.window, o.causal,
                  o.form, o.seed, o.a, o.Bq, o.Bk, o.run, o.bf16_inputs, o.layer);
}

std::vector<float> default_a(int Hd) {
  std::vector<float> a(static_cast<size_t>(std::max(Hd, 1)));
  for (int h = 0; h < Hd; ++h) a[h] = Hd > 1 ? 0.6f * static_cast<float>(h) / (Hd - 1) : 0.3f;
  return a;
}

}  // namespace dma::viewer
