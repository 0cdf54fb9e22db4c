// Launchers of the DMA kernels (one .cu file each), called by the device API (device_api.cu).
// Device pointers are plain pointers here; `elem` buffers hold bf16 or fp16 as Dims::precision
// says, and dispatch() in common.cuh turns (precision, head dim) into template arguments.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

#include "dma/types.hpp"

namespace dma::cuda::detail {

// Sizes and options as the kernels see them (int32: the kernels index one head in int32).
struct Dims {
  int B, Hq, Hkv, Hd, Lq, Lk, D;
  int window;
  bool causal;
  float scale;  // softmax scale
  Precision precision;  // element type of q, k, v, do
};

// dynamic_weights.cu -----------------------------------------------------------------------
// v (B,Hkv,Lk,D) elem, w_dt (Hd,Hkv*D) f32, a (Hd) f32 -> z, delta (B,Hd,Lk) f32.
void launch_dynamic_weights(const Dims& d, Form form, const void* v, const float* w_dt,
                            const float* a, float* z, float* delta, cudaStream_t st);
// g = ddelta (B,Hd,Lk), with z and delta as launch_dynamic_weights left them -> da (Hd) and
// dw_dt (Hd,Hkv*D) (overwritten) and dv (B,Hkv,Lk,D) += the gradient through delta. No atomics:
// bitwise the same on every run (the summation order depends on the shape only). dz is unused
// (may be null). partials: scratch of dynamic_weights_backward_partials(d) floats.
size_t dynamic_weights_backward_partials(const Dims& d);
void launch_dynamic_weights_backward(const Dims& d, Form form, const void* v, const float* w_dt,
                                     const float* a, const float* z,
                                     const float* delta, const float* ddelta, float* dz, float* da,
                                     float* dw_dt, float* dv, float* partials, cudaStream_t st);

// mask.cu ----------------------------------------------------------------------------------
// delta (B,Hd,Lk) -> evict (B,Hd,Lk) int32, e_j of docs/design.md §2.
// Scratch: keys (B*Hd*Lk) and sorted (B*Hd*(n_big*1024 + n_small*128)) 64-bit; none when w >= Lk.
void launch_mask(const Dims& d, const float* delta, int* evict, uint64_t* keys, uint64_t* sorted,
                 cudaStream_t st);

// candidates.cu -----------------------------------------------------------------------------
// The candidate tables of core/include/dma/candidates.hpp, per (b, delta head), for query tiles
// of kTileQ queries (the forward's block): slot_key and list [T][S] int32, n_alive and n_full [T].
// When w >= Lk they are implicit (every key kept: slot s holds key s, the list is 0, 1, 2, ...)
// and take no memory.
constexpr int kTileQ = 128;
struct Tables {
  int *slot_key, *list, *n_alive, *n_full;
};
__host__ __device__ inline bool tables_implicit(const Dims& d) { return d.window >= d.Lk; }
__host__ __device__ inline int table_tiles(const Dims& d) { return (d.Lq + kTileQ - 1) / kTileQ; }
__host__ __device__ inline int table_stride(const Dims& d) { return d.window + kTileQ < d.Lk ? d.window + kTileQ : d.Lk; }
// Scratch of the slot sweep (candidate_scratch_ints): each key's slot, the slots freed per tile,
// and the free-slot bitmaps when they do not fit in shared memory.
size_t candidate_scratch_ints(const Dims& d);
void launch_candidates(const Dims& d, const int* evict, const Tables& t, int* scratch,
                       cudaStream_t st);

// forward.cu -------------------------------------------------------------------------------
struct AttnArgs {
  const void *q, *k, *v;        // (B,Hq,Lq,D), (B,Hkv,Lk,D) x2, elem
  const float* delta;           // (B,Hd,Lk)
  const int* evict;             // (B,Hd,Lk)
  Tables tables;                // candidate tables (candidates.cu)
  float *o, *lse;               // (B,Hq,Lq,D), (B,Hq,Lq)
  // backward only
  const void* dout;             // (B,Hq,Lq,D) elem
  const float* dsum;            // D_i = do_i . o_i  (B,Hq,Lq)
  float *dq, *dk, *dv, *ddelta; // written: dq (B,Hq,Lq,D), dk, dv (B,Hkv,Lk,D), ddelta (B,Hd,Lk)
  float *dk_part, *dv_part;     // (B,Hd,Lk,D) scratch, only when Hd > Hkv (backward_partials)
  float* carry;                 // sweep_carry_floats scratch (backward_sm90.cu), when spans > 1
};
// Picks the kernel: on a compute capability 9.0 device (H100, H200) the wgmma kernel of
// forward_sm90.cu when the library was built with it (DMA_HAVE_SM90) and D is 64 or 128, else
// the mma.sync kernel of forward.cu (D = 32, 64, 128, 256). DMA_CUDA_FORWARD=sm80 in the
// environment forces the mma.sync kernel (the ladder's lower rung, for comparisons); =sm90
// requires the wgmma kernel.
void launch_forward(const Dims& d, const AttnArgs& a, cudaStream_t st);
void launch_forward_sm90(const Dims& d, const AttnArgs& a, cudaStream_t st);

// kernel_choice.cu -------------------------------------------------------------------------
// The kernel family launch_forward / launch_backward would run on the current device for head
// dim D: "sm90" or "sm80". The variable DMA_CUDA_FORWARD / DMA_CUDA_BACKWARD is read at every
// call (so a CUDA graph keeps the kernels of its capture). Throws dma::Error for a value other
// than sm80, sm90 and auto, or for sm90 without a compute capability 9.0 device and an sm_90a
// build, or with a head dim other than 64 and 128.
const char* forward_kernel_name(int D);
const char* backward_kernel_name(int D);

// backward.cu ------------------------------------------------------------------------------
// Writes every element of dq, dk, dv and ddelta, without atomics and in a fixed order of
// summation (deterministic); the Hopper sweep's fixup adds carried sums after their keys' rows.
// Where backward_kernel_name(D) says "sm90" the two passes run on the wgmma kernels of
// dq_sm90.cu and backward_sm90.cu (dk, dv, ddelta).
__host__ __device__ inline bool backward_partials(const Dims& d) { return d.Hd > d.Hkv; }
// The Hopper dk/dv sweep (backward_sm90.cu) runs one block per 64 slots of a (b, delta head);
// when those are too few blocks for the GPU it also splits the query tiles into spans of
// sweep_span_tiles tiles, one block per (slots, span). A shape's property, not the device's, so
// that the results do not depend on the device. The sums of a key that lives across the first
// tile of a span are carried: that span's block writes them to the workspace (sweep_carry_floats)
// and a fixup adds them to the key's, in span order.
// Once split, spans hold at most kSweepMaxSpanTiles tiles: with a few hundred slot blocks, four
// long spans make a little more than 4 waves of blocks on a GPU of 132 SMs, and the last
// one runs alone (at 64K/2048, under Nsight Compute, the dk/dv kernel ran 7.84 ms with spans of
// 64 tiles against 8.45 with 128; with 32 the backward was slower again).
constexpr int kSweepSlots = 64, kSweepTargetBlocks = 1024, kSweepMaxSpanTiles = 64;
__host__ __device__ inline int sweep_slot_blocks(const Dims& d) {
  return ((tables_implicit(d) ? d.Lk : table_stride(d)) + kSweepSlots - 1) / kSweepSlots;
}
__host__ __device__ inline int sweep_span_tiles(const Dims& d) {
  const int blocks = sweep_slot_blocks(d) * d.B * d.Hd, T = table_tiles(d);
  int spans = (kSweepTargetBlocks + blocks - 1) / blocks;
  if (spans > 1) {
    const int by_length = (T + kSweepMaxSpanTiles - 1) / kSweepMaxSpanTiles;
    spans = spans > by_length ? spans : by_length;
  }
  spans = spans < T / 8 ? spans : (T / 8 > 1 ? T / 8 : 1);  // spans of 8 tiles at least
  return (T + spans - 1) / spans;
}
__host__ __device__ inline int sweep_spans(const Dims& d) {
  return (table_tiles(d) + sweep_span_tiles(d) - 1) / sweep_span_tiles(d);
}
// Carried sums: dK, dV (D floats each) and ddelta of every slot of every (span > 0, b, delta head).
// None for the head dims the Hopper sweep does not take (D = 32, 256 run backward.cu's sweep).
inline size_t sweep_carry_floats(const Dims& d) {
  if (d.D != 64 && d.D != 128) return 0;
  return (size_t)(sweep_spans(d) - 1) * d.B * d.Hd * sweep_slot_blocks(d) * kSweepSlots * (2 * d.D + 1);
}
void launch_backward(const Dims& d, const AttnArgs& a, cudaStream_t st);
void launch_dq_sm90(const Dims& d, const AttnArgs& a, cudaStream_t st);
void launch_dkdv_sm90(const Dims& d, const AttnArgs& a, cudaStream_t st);


}  // namespace dma::cuda::detail
