// How a configuration becomes what the kernels see: the int32 sizes (Dims), and where each piece
// of the caller's mask state and workspace lies. Both buffers are carved at 256-byte offsets.
//
//   mask state  evict      (B,Hd,Lk) int32   e_j, read by the backward too
//               chunk_max  (B,Hd,Lk/128) int32   per chunk of 128 keys the largest useful e_j
//   workspace   keys       (B,Hd,Lk) u64     rank keys (mask build; only when w < Lk)
//               sorted     (B,Hd,..) u64     sorted chunks (mask build; only when w < Lk)
//               z, dz      (B,Hd,Lk) f32     pre-activation of delta and its gradient
//               delta2     (B,Hd,Lk) f32     delta recomputed with z in the backward (discarded)
//               dsum       (B,Hq,Lq) f32     D_i = do_i . o_i
#pragma once

#include <cstddef>

#include "dma/cuda_device.hpp"
#include "kernels.hpp"

namespace dma::cuda::detail {

// Validates the configuration for the kernels (throws dma::Error) and converts it.
Dims make_dims(const Config& c);

struct MaskStateLayout {
  size_t evict = 0, chunk_max = 0, bytes = 0;
};
MaskStateLayout mask_state_layout(const Dims& d);

struct WorkspaceLayout {
  size_t keys = 0, sorted = 0, z = 0, dz = 0, delta2 = 0, dsum = 0, bytes = 0;
  bool sorts = false;  // keys and sorted exist (w < Lk)
};
WorkspaceLayout workspace_layout(const Dims& d);

// base + offset as a typed pointer
template <typename T, typename Base>
T* at(Base* base, size_t offset) {
  return reinterpret_cast<T*>(reinterpret_cast<char*>(const_cast<void*>(static_cast<const void*>(base))) + offset);
}

}  // namespace dma::cuda::detail
