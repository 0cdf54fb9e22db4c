// How a configuration becomes what the kernels see: the int32 sizes (Dims), and where each piece
// of the caller's mask state and workspace lies. Both buffers are carved at 256-byte offsets.
//
//   mask state  evict      (B,Hd,Lk) int32   e_j, read by the backward too
//               slot_key   (B,Hd,T,S) int32  candidate tables (candidates.cu; T = ceil(Lq/128),
//               list       (B,Hd,T,S) int32  S = min(w + 128, Lk); none when w >= Lk)
//               n_alive    (B,Hd,T) int32
//               n_full     (B,Hd,T) int32
//   workspace   keys       (B,Hd,Lk) u64     rank keys (mask build; only when w < Lk)
//               sorted     (B,Hd,..) u64     sorted chunks (mask build; only when w < Lk)
//               sweep      int32             slot sweep: each key's slot, the slots freed per
//                                            tile (and its bitmaps when too large for shared memory)
//               dk_part,   (B,Hd,Lk,D) f32   per-delta-head dK, dV when Hd > Hkv
//               dv_part
//               carry      f32               dk/dv sweep sums carried across spans (Hopper)
//               z, dz      (B,Hd,Lk) f32     pre-activation of delta and its gradient
//               delta2     (B,Hd,Lk) f32     delta recomputed with z in the backward (discarded)
//               dsum       (B,Hq,Lq) f32     D_i = do_i . o_i
//               dw_partials f32              split-K partial sums of dw_dt and da
#pragma once

#include <cstddef>

#include "dma/cuda_device.hpp"
#include "kernels.hpp"

namespace dma::cuda::detail {

// Validates the configuration for the kernels (throws dma::Error) and converts it.
Dims make_dims(const Config& c);

struct MaskStateLayout {
  size_t evict = 0, slot_key = 0, list = 0, n_alive = 0, n_full = 0, bytes = 0;
};
MaskStateLayout mask_state_layout(const Dims& d);

struct WorkspaceLayout {
  size_t keys = 0, sorted = 0, sweep = 0, dk_part = 0, dv_part = 0, carry = 0, z = 0, dz = 0, delta2 = 0,
         dsum = 0, dw_partials = 0, bytes = 0;
  bool sorts = false;  // keys and sorted exist (w < Lk)
};
WorkspaceLayout workspace_layout(const Dims& d);

// The candidate tables inside a mask state.
Tables tables_in(const Dims& d, void* mask_state);

// base + offset as a typed pointer
template <typename T, typename Base>
T* at(Base* base, size_t offset) {
  return reinterpret_cast<T*>(reinterpret_cast<char*>(const_cast<void*>(static_cast<const void*>(base))) + offset);
}

}  // namespace dma::cuda::detail
