// Sizes and buffer layouts of the device API (layout.hpp).
#include "layout.hpp"

#include <algorithm>
#include <string>

#include "common.cuh"
#include "dma/validate.hpp"

namespace dma::cuda::detail {

namespace {
constexpr size_t kAlign = 256;
size_t align_up(size_t n) { return (n + kAlign - 1) / kAlign * kAlign; }
// Appends a region of `bytes` at the end of a layout of `total` bytes; returns its offset.
size_t append(size_t& total, size_t bytes) {
  const size_t offset = total;
  total += align_up(bytes);
  return offset;
}
}  // namespace

Dims make_dims(const Config& c) {
  const Shape& s = c.shape;
  validate_shape(s, c.opt.causal);
  validate_options(s, c.opt);
  if (!supported_head_dim(static_cast<int>(s.D)))
    throw dma::Error("D = " + std::to_string(s.D) +
                     ": the CUDA backend supports head dims 32, 64, 128 and 256");
  constexpr int64_t kMax = (int64_t{1} << 30);
  // (grid limits: Hq and B*Hd on grid.y, B on grid.z)
  if (s.Lq >= kMax || s.Lk >= kMax || s.Hq > 65535 || s.B * s.Hd > 65535 || s.B > 65535)
    throw dma::Error("shape: too large for the CUDA backend (Lq, Lk < 2^30; Hq, B*Hd, B <= 65535)");
  // Some kernels index rows with 32-bit ints and launch 32 threads per row (B*Hq*Lq query rows,
  // B*Lk key rows), and the dynamic-weights kernels index k and v with 32-bit offsets. Offsets
  // into q, do, o and dq are 64-bit (tests/test_cuda_large.cpp: 2.46e9 elements).
  constexpr int64_t kMaxRows = int64_t{1} << 26, kMaxElems = int64_t{1} << 31;
  if (s.B * s.Hq * s.Lq >= kMaxRows || s.B * s.Lk * std::max(s.Hd, s.Hkv) >= kMaxRows ||
      s.kv_numel() >= kMaxElems)
    throw dma::Error("shape: too large for the CUDA backend's 32-bit indexing (B*Hq*Lq and "
                     "B*Lk*max(Hd,Hkv) < 2^26, k and v < 2^31 elements); split the batch");
  const double scale = c.opt.softmax_scale(s);
  if (!(scale > 0) || !std::isfinite(static_cast<float>(scale)))
    throw dma::Error("scale: " + std::to_string(scale) + " is not a positive float32");
  Dims d{};
  d.B = (int)s.B; d.Hq = (int)s.Hq; d.Hkv = (int)s.Hkv; d.Hd = (int)s.Hd;
  d.Lq = (int)s.Lq; d.Lk = (int)s.Lk; d.D = (int)s.D;
  d.window = (int)std::min<int64_t>(c.opt.window, s.Lk);  // w >= Lk: nothing is ever evicted
  d.causal = c.opt.causal;
  d.scale = static_cast<float>(scale);
  d.precision = c.precision;
  return d;
}

MaskStateLayout mask_state_layout(const Dims& d) {
  const size_t n_bh = (size_t)d.B * d.Hd;
  MaskStateLayout m;
  m.evict = append(m.bytes, n_bh * d.Lk * sizeof(int));  // first: evict_of() relies on it
  if (!tables_implicit(d)) {
    const size_t T = table_tiles(d), S = table_stride(d);
    m.slot_key = append(m.bytes, n_bh * T * S * sizeof(int));
    m.list = append(m.bytes, n_bh * T * S * sizeof(int));
    m.n_alive = append(m.bytes, n_bh * T * sizeof(int));
    m.n_full = append(m.bytes, n_bh * T * sizeof(int));
  }
  return m;
}

Tables tables_in(const Dims& d, void* mask_state) {
  if (tables_implicit(d)) return Tables{nullptr, nullptr, nullptr, nullptr};
  const MaskStateLayout m = mask_state_layout(d);
  return Tables{at<int>(mask_state, m.slot_key), at<int>(mask_state, m.list),
                at<int>(mask_state, m.n_alive), at<int>(mask_state, m.n_full)};
}

WorkspaceLayout workspace_layout(const Dims& d) {
  const size_t n_bh = (size_t)d.B * d.Hd, delta_n = n_bh * d.Lk;
  const size_t n_small = (d.Lk + 127) / 128, n_big = (d.Lk + 1023) / 1024;
  WorkspaceLayout w;
  w.sorts = d.window < d.Lk;
  if (w.sorts) {
    w.keys = append(w.bytes, delta_n * 8);
    w.sorted = append(w.bytes, n_bh * (n_big * 1024 + n_small * 128) * 8);
  }
  w.sweep = append(w.bytes, candidate_scratch_ints(d) * sizeof(int));
  if (backward_partials(d)) {
    w.dk_part = append(w.bytes, delta_n * d.D * 4);
    w.dv_part = append(w.bytes, delta_n * d.D * 4);
  }
  w.carry = append(w.bytes, sweep_carry_floats(d) * 4);
  w.z = append(w.bytes, delta_n * 4);
  w.dz = append(w.bytes, delta_n * 4);
  w.delta2 = append(w.bytes, delta_n * 4);
  w.dsum = append(w.bytes, (size_t)d.B * d.Hq * d.Lq * 4);
  w.dw_partials = append(w.bytes, dynamic_weights_backward_partials(d) * 4);
  return w;
}

}  // namespace dma::cuda::detail
