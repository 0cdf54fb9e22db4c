// The DMA kernels on caller-owned device memory: the API for model code (a PyTorch op, a decoder,
// another C++ program). Plain C++: device buffers are `void*`/typed pointers, the stream is an
// opaque handle (a cudaStream_t cast to void*; nullptr is the legacy default stream).
//
// A call only enqueues work on the caller's stream: it allocates nothing, copies nothing to or
// from the host and never waits for the device. What a kernel finds wrong with the data (a delta
// that is not finite, or too large for the kernels' base-2 arithmetic) is written to a status word
// on the device; read it when convenient with check_status(), which synchronizes the stream.
// Shape and argument errors (head dims, grid limits, a missing buffer) throw dma::Error at once.
//
// The phases, in the paper's order (docs/design.md §1):
//
//   dynamic_weights           v, w_dt, a        -> delta                       (skip: delta given)
//   build_mask                delta             -> mask state (evict, per-chunk maxima)
//   attention_forward         q, k, v, delta, mask state -> o, lse
//   attention_backward        ... + o, lse, do  -> dq, dk, dv (attention part), ddelta
//   dynamic_weights_backward  v, w_dt, a, ddelta -> dw_dt, da, and dv += the part through delta
//
// forward() and backward() run them in order. Layouts as in dma/types.hpp (head-major, C order):
//   q, o, do, dq  (B,Hq,Lq,D)      k, v, dk, dv (B,Hkv,Lk,D)      delta, ddelta (B,Hd,Lk)
//   lse (B,Hq,Lq)                  w_dt, dw_dt (Hd,Hkv*D)          a, da (Hd)
// q, k, v and do are bf16 or fp16 (Config::precision); everything else is float32 and every
// reduction accumulates in float32. Buffers must not overlap, except as stated.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dma/types.hpp"

namespace dma::cuda {

using Stream = void*;  // a cudaStream_t
using dma::Precision;  // bf16 or fp16 (dma/types.hpp)

struct Config {
  Shape shape;
  Options opt;
  Precision precision = Precision::bf16;
};

// Throws dma::Error when the kernels cannot run this configuration (invalid shape or options,
// head dims other than 32, 64, 128 and 256, grid or 32-bit index limits), naming what is
// supported.
// Needs no device. Every call below starts with it.
void check_config(const Config& c);

// Bytes of the mask state (evict and the candidate tables of dma/candidates.hpp), caller-owned
// and kept from the forward to the backward. Its first B*Hd*Lk int32 are evict (B,Hd,Lk): e_j.
size_t mask_state_bytes(const Config& c);
inline const int32_t* evict_of(const void* mask_state) {
  return static_cast<const int32_t*>(mask_state);
}

// Where the candidate tables lie in a mask state (device pointers; per (b, delta head) the
// tables of dma::candidate_table for query tiles of `tile_queries`, one after the other).
// When w >= Lk they are implicit (every key kept) and the pointers are null.
struct CandidateTables {
  int64_t tile_queries = 0, tiles = 0, stride = 0;  // Bq, T, S
  const int32_t* slot_key = nullptr;  // (B,Hd,T,S)
  const int32_t* list = nullptr;      // (B,Hd,T,S)
  const int32_t* n_alive = nullptr;   // (B,Hd,T)
  const int32_t* n_full = nullptr;    // (B,Hd,T)
};
CandidateTables candidate_tables_of(const Config& c, const void* mask_state);

// Scratch bytes one call needs at most (any phase, forward or backward). Its contents are not
// kept between calls; one workspace may serve every call on one stream. Aligned to 256 bytes
// (cudaMalloc's alignment) is enough.
size_t workspace_bytes(const Config& c);

// The device status word: int64, -1 when all is well, else the flat index of the first delta
// entry (B,Hd,Lk) found non-finite or beyond float32 range / log2(e). The caller allocates it;
// reset_status() sets it to -1 (enqueued), check_status() synchronizes the stream, reads it and
// throws dma::Error naming the tensor and the index. forward() resets it itself.
void reset_status(int64_t* status, Stream stream);
void check_status(const Config& c, const int64_t* status, Stream stream);

// ---- the phases ----------------------------------------------------------------------------

// delta (B,Hd,Lk) from v, w_dt (Hd,Hkv*D) and a (Hd). Flags a bad delta in status.
void dynamic_weights(const Config& c, const void* v, const float* w_dt, const float* a,
                     float* delta, int64_t* status, void* workspace, size_t workspace_size,
                     Stream stream);

// Checks a delta that was given rather than computed (flags it in status like the above).
void check_delta(const Config& c, const float* delta, int64_t* status, Stream stream);

// The mask state from delta.
void build_mask(const Config& c, const float* delta, void* mask_state, void* workspace,
                size_t workspace_size, Stream stream);

// o (B,Hq,Lq,D) float32 and lse (B,Hq,Lq) float32 (natural log).
void attention_forward(const Config& c, const void* q, const void* k, const void* v,
                       const float* delta, const void* mask_state, float* o, float* lse,
                       Stream stream);

// dq (written), dk, dv and ddelta (overwritten; the kernels accumulate into them after zeroing).
void attention_backward(const Config& c, const void* q, const void* k, const void* v,
                        const float* delta, const void* mask_state, const float* o,
                        const float* lse, const void* dout, float* dq, float* dk, float* dv,
                        float* ddelta, void* workspace, size_t workspace_size, Stream stream);

// With g = ddelta: dw_dt and da (overwritten), and dv += the gradient v receives through delta.
void dynamic_weights_backward(const Config& c, const void* v, const float* w_dt, const float* a,
                              const float* ddelta, float* dw_dt, float* da, float* dv,
                              void* workspace, size_t workspace_size, Stream stream);

// ---- the whole forward and backward --------------------------------------------------------

struct ForwardBuffers {
  const void *q = nullptr, *k = nullptr, *v = nullptr;  // elem
  const float *w_dt = nullptr, *a = nullptr;  // both null: delta is given (read, not written)
  float* delta = nullptr;                     // (B,Hd,Lk)
  void* mask_state = nullptr;                 // mask_state_bytes(c)
  float *o = nullptr, *lse = nullptr;
  int64_t* status = nullptr;                  // 1 int64
  bool delta_given() const { return w_dt == nullptr && a == nullptr; }
};
// reset_status, dynamic_weights (or check_delta), build_mask, attention_forward.
void forward(const Config& c, const ForwardBuffers& f, void* workspace, size_t workspace_size,
             Stream stream);

struct BackwardBuffers {
  const void* dout = nullptr;  // elem (B,Hq,Lq,D)
  float *dq = nullptr, *dk = nullptr, *dv = nullptr, *ddelta = nullptr;
  float *dw_dt = nullptr, *da = nullptr;  // written when the forward computed delta
};
// attention_backward, then (when delta was computed) dynamic_weights_backward: dv is v's total
// gradient. The forward's buffers are read as they were left.
void backward(const Config& c, const ForwardBuffers& f, const BackwardBuffers& g, void* workspace,
              size_t workspace_size, Stream stream);

}  // namespace dma::cuda
