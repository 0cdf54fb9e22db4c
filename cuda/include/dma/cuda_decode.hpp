// Decoding on the GPU with a cache of w entries per (sequence, delta head) (docs/design.md §2.10,
// §4 Decode): the device form of dma/decode.hpp, in the style of dma/cuda_device.hpp: buffers
// the caller owns, the caller's stream, no allocation, host copy or wait in any call (except
// check_step_status, whose job is to wait). Plain C++: device buffers are typed or void pointers.
//
//   prefill   the kept keys of a prompt forward (dma::cuda::forward over P tokens: its k, v, delta
//             and evict_of(mask_state)) -> the cache: { j < P : e_j >= P-1 }
//   step      one new token per active sequence: delta from its values, eviction of the lowest
//             ranked entry (smallest delta, on a tie the oldest position; maybe the newcomer), and
//             attention over the survivors for every query head -> o, lse. One launch: delta,
//             eviction and a split-K attention over the w slots for all query heads of a delta
//             head; the last block of each delta head to finish merges the splits and writes the
//             new entry into the cache.
//
// Cache layout (one allocation, cache_bytes(), carved by cache_in(); 256-byte aligned pieces):
//   k, v    (B,Hd,w,D)  elem (bf16 or fp16)   slot s of (b,hd) holds the key/value of position
//   delta   (B,Hd,w)    float32               pos[b,hd,s], for s < count[b,hd]; slots are not
//   pos     (B,Hd,w)    int32                 in position order (a new key takes the slot of
//   count   (B,Hd)      int32                 the one it evicts)
//   length  (B)         int32                 tokens seen: the next token's position
//   arrivals (B,Hd)+(B) int32                 the step's block counters; 0 between steps
// With Hd = Hkv, (b,hd) holds kv head hd; with Hd = Hq, each query head has its own set and k, v
// of its kv head are stored once per query head. Every reduction accumulates in float32.
#pragma once

#include <cstddef>
#include <cstdint>

#include "dma/cuda_device.hpp"
#include "dma/decode.hpp"

namespace dma::cuda {

struct DecodeConfig {
  dma::DecodeConfig layer;  // B, Hq, Hkv, Hd, D (64 or 128), window, form, scale; max_length
                            // is the caller's to enforce (the device keeps no limit)
  Precision precision = Precision::bf16;  // of the cache's k, v and of the new tokens' q, k, v
};

// Throws dma::Error when the kernels cannot run this configuration (head dims other than 64 and
// 128, B*Hd or w beyond the grid and 32-bit index limits, an invalid layer). Needs no device.
void check_decode_config(const DecodeConfig& c);

struct DeviceCache {
  void* k = nullptr;         // (B,Hd,w,D) elem, 16-byte aligned (the step loads 16 bytes at a time)
  void* v = nullptr;         // (B,Hd,w,D) elem, 16-byte aligned
  float* delta = nullptr;    // (B,Hd,w)
  int32_t* pos = nullptr;    // (B,Hd,w)
  int32_t* count = nullptr;  // (B,Hd)
  int32_t* length = nullptr; // (B)
  int32_t* arrivals = nullptr;  // (B*Hd + B): zeroed for the sequences that reset_cache,
                                // reset_sequence or prefill set up, left zeroed by every step
};

size_t cache_bytes(const DecodeConfig& c);               // the whole cache, all B sequences
size_t cache_bytes_per_sequence(const DecodeConfig& c);  // what one more sequence costs
// Carves cache_bytes(c) at memory, which must be 16-byte aligned for k and v to be (cudaMalloc's
// memory is); every call that takes the cache checks that they are.
DeviceCache cache_in(const DecodeConfig& c, void* memory);

// Every sequence empty (count = length = 0), or one sequence b; either zeroes the arrival counters
// of what it empties. A sequence of a new cache (memory holding any bytes) steps once reset_cache,
// reset_sequence or prefill has set it up; nothing else needs initializing.
void reset_cache(const DecodeConfig& c, const DeviceCache& cache, Stream stream);
void reset_sequence(const DecodeConfig& c, const DeviceCache& cache, int64_t b, Stream stream);

// Sequences first .. first+n-1 take a prompt of P tokens each (P = 0: empty), from a forward over
// those prompts (a dma::cuda::Config with B = n, Lq = Lk = P, causal, the same layer):
//   k, v (n,Hkv,P,D) elem, delta (n,Hd,P) float32, evict (n,Hd,P) int32 (evict_of(mask_state)).
// Overwrites what those sequences held and zeroes their arrival counters.
void prefill(const DecodeConfig& c, const DeviceCache& cache, int64_t first, int64_t n, int64_t P,
             const void* k, const void* v, const float* delta, const int32_t* evict, Stream stream);

struct StepBuffers {
  // q, k, v and w_dt 16-byte aligned (the kernel loads 16 bytes at a time)
  const void* q = nullptr;           // (B,Hq,D) elem: one new token per sequence
  const void* k = nullptr;           // (B,Hkv,D) elem
  const void* v = nullptr;           // (B,Hkv,D) elem
  const uint8_t* active = nullptr;   // (B) 1 = the sequence steps; null: every sequence
  const float* w_dt = nullptr;       // (Hd,Hkv*D) float32
  const float* a = nullptr;          // (Hd)
  const float* delta_given = nullptr;  // (B,Hd): the new tokens' delta given (w_dt, a unused)
  float* o = nullptr;                // (B,Hq,D) float32; 0 where inactive
  float* lse = nullptr;              // (B,Hq) float32, natural log; 0 where inactive
  float* delta_out = nullptr;        // (B,Hd) optional: the new tokens' delta
  int32_t* evicted = nullptr;        // (B,Hd) optional: the position that left, -1 if none
  int64_t* status = nullptr;         // 1 int64 (reset_status of dma/cuda_device.hpp): the flat
                                     // (B,Hd) index of a new delta that is not finite or beyond
                                     // float32 range / log2(e); kept across steps until reset
};

// Scratch one step needs (the partial softmax states of the split-K attention); not kept.
size_t step_workspace_bytes(const DecodeConfig& c);

// The step at position length[b] of every active sequence b. A (b,hd) whose new delta is flagged
// in status keeps its entries and its query heads get o = 0, lse = 0 (length[b] still advances);
// reset that sequence. An inactive sequence gets o = 0, lse = 0, delta_out = 0, evicted = -1 and
// is not changed. Steps on one cache are ordered on one stream: a step reads what the previous
// one wrote.
void step(const DecodeConfig& c, const DeviceCache& cache, const StepBuffers& s, void* workspace,
          size_t workspace_size, Stream stream);

// Waits for the stream, reads status and throws dma::Error naming the sequence and delta head.
void check_step_status(const DecodeConfig& c, const int64_t* status, Stream stream);

}  // namespace dma::cuda
