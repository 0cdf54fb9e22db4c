// Decoding with a key/value cache bounded to w entries per (sequence, delta head), exact
// (docs/design.md §2.10 and §4 "Decode").
//
// delta does not depend on the query and the selections of consecutive positions nest, so a key
// that leaves the window never comes back: the keys the query at position p keeps are the top w
// of (the keys kept at p-1) + {p}. A cache that holds those w keys, inserts the new token and
// evicts its lowest-ranked entry reproduces full-prefix DMA exactly, whatever the context length.
//
//   DecodeCache<T> cache(config);               B sequences, all empty
//   prefill(cache, b, prompt, w_dt, a);         sequence b's prompt of P tokens -> the survivors
//   step(cache, tokens, w_dt, a) -> o, lse      one new token for each active sequence
//
// Per (b, hd) the cache holds at most w entries: the position j, delta_j, and k_j, v_j of the kv
// head that delta head hd's query heads read. Sequences of a batch may have different lengths.
// When Hd = Hq > Hkv, every delta head keeps its own set (k and v are then stored once per query
// head rather than once per kv head).
//
// Every call checks its inputs first and changes the cache only when it succeeds: a dma::Error
// (one line, naming the tensor or sequence) leaves the cache as it was.
#pragma once

#include <cstdint>
#include <functional>
#include <vector>

#include "dma/pipeline.hpp"
#include "dma/types.hpp"

namespace dma {

// The sizes of one attention layer and its window. Causal only: decoding is causal.
struct DecodeConfig {
  int64_t B = 1;        // sequences
  int64_t Hq = 1;       // query heads
  int64_t Hkv = 1;      // key/value heads (Hq % Hkv == 0)
  int64_t Hd = 1;       // delta heads: Hkv or Hq
  int64_t D = 1;        // head dim
  int64_t window = 0;   // w: keys kept per query, and entries per (sequence, delta head) (>= 1)
  Form form = Form::exp;
  double scale = 0.0;   // softmax scale; 0 means 1/sqrt(D)
  int64_t max_length = 0;  // tokens a sequence may hold (prompt + generated); 0 = no limit

  // The dma::Shape of a forward over Lk tokens of one sequence (Lq queries, bottom-right aligned).
  Shape shape(int64_t Lq, int64_t Lk) const;
  Options options() const;  // window, form, scale, causal
  int64_t kv_head_of_delta_head(int64_t hd) const { return (hd * (Hq / Hd)) / (Hq / Hkv); }
};

// One cached key: its position, its dynamic weight and the key and value vectors it stands for.
template <typename T>
struct CacheEntry {
  int64_t position = 0;
  T delta = 0;
  std::vector<T> k, v;  // (D) each, of kv head config.kv_head_of_delta_head(hd)
};

template <typename T>
struct DecodeCache {
  explicit DecodeCache(const DecodeConfig& config);  // checks the config (dma::Error)

  DecodeConfig config;
  std::vector<int64_t> length;      // (B) tokens seen so far: the next token's position
  std::vector<int64_t> max_length;  // (B) declared maximum per sequence, 0 = none; starts as
                                    // config.max_length and may be set per sequence
  std::vector<std::vector<CacheEntry<T>>> entries;  // (B*Hd), each sorted by position, <= w

  const std::vector<CacheEntry<T>>& at(int64_t b, int64_t hd) const { return entries[b * config.Hd + hd]; }
  std::vector<int64_t> positions(int64_t b, int64_t hd) const;  // increasing
  bool finished(int64_t b) const { return max_length[b] > 0 && length[b] >= max_length[b]; }
  void reset_sequence(int64_t b);  // empties sequence b for a new prompt
};

// The prompt of one sequence, P tokens (P may be 0: the cache stays empty and decoding starts at
// position 0).
template <typename T>
struct Prompt {
  std::vector<T> q;      // (Hq,P,D), optional: then prefill also returns the prompt's o and lse
  std::vector<T> k, v;   // (Hkv,P,D)
  std::vector<T> delta;  // (Hd,P), optional: delta given instead of computed from v, w_dt, a
};

template <typename T>
struct PrefillResult {
  std::vector<T> delta;          // (Hd,P) the prompt's dynamic weights
  std::vector<int64_t> evict;    // (Hd,P) e_j over the prompt's P keys; e_j = P-1: still cached
  ForwardResult<T> fwd;          // o (Hq,P,D), lse (Hq,P): the full causal forward over the
                                 // prompt, only when prompt.q was given
};

// Fills the empty sequence b with its prompt: keeps { j < P : e_j >= P-1 } (at most w per delta
// head). w_dt (Hd,Hkv*D) and a (Hd) are unused (and may be empty) when prompt.delta is given.
template <typename T>
PrefillResult<T> prefill(DecodeCache<T>& cache, int64_t b, const Prompt<T>& prompt,
                         const std::vector<T>& w_dt, const std::vector<T>& a);

// One new token for each active sequence.
template <typename T>
struct DecodeTokens {
  std::vector<T> q;             // (B,Hq,D)
  std::vector<T> k, v;          // (B,Hkv,D)
  std::vector<uint8_t> active;  // (B) 1 = this sequence steps; empty = every sequence steps
  std::vector<T> delta;         // (B,Hd), optional: given instead of computed from v, w_dt, a
};

template <typename T>
struct DecodeOutput {
  std::vector<T> o;              // (B,Hq,D)  row p of the full causal forward; 0 where inactive
  std::vector<T> lse;            // (B,Hq)
  std::vector<T> delta;          // (B,Hd)    the new tokens' delta
  std::vector<int64_t> position; // (B)       the new token's position, -1 where inactive
  std::vector<int64_t> evicted;  // (B,Hd)    the position that left the cache, -1 if none (it
                                 //           may be the new token itself)
};

// The step at position p = cache.length[b] of every active sequence b: delta_p from the new
// token's values (all kv heads, docs/design.md §1.1), insert, evict the lowest-ranked entry
// (smallest delta, on a tie the oldest position) while more than w remain, and attend over the
// survivors. A finished sequence (length at its declared maximum) may not step.
template <typename T>
DecodeOutput<T> step(DecodeCache<T>& cache, const DecodeTokens<T>& tokens,
                     const std::vector<T>& w_dt, const std::vector<T>& a);

// ---- a whole problem, decoded ---------------------------------------------------------------

// The cache config of a problem's shape and options (B, heads, D, window, form, scale).
DecodeConfig decode_config(const Shape& s, const Options& opt);

// The first P tokens of sequence b of a problem with Lq = Lk: q (Hq,P,D), k and v (Hkv,P,D), and
// delta (Hd,P) when the problem gives it.
template <typename T>
Prompt<T> prompt_of(const Problem<T>& p, int64_t b, int64_t P);

// The token at `position` of every sequence of a problem with Lq = Lk (all active).
template <typename T>
DecodeTokens<T> tokens_at(const Problem<T>& p, int64_t position);

// Decodes a causal problem with Lq = Lk = L: prefill over the first P tokens of every sequence
// (0 <= P <= L), then one step per position P..L-1. Returns what run_pipeline returns for the
// forward, computed this way: delta; evict, e_j from when each key left the cache (L-1 for the
// keys still cached at the end) and j-1 for a key that is never kept (the full forward gives the
// same intervals, but for such a key any e_j < j: the position before the w-th key above it);
// o and lse, the prompt's rows from prefill's forward and the others from the steps; and mask
// when want_mask (expanded from evict, identical to the full forward's). No gradients: p.dout is
// ignored. after_step, when given, sees the cache after every step.
template <typename T>
Result<T> decode_problem(const Problem<T>& p, int64_t P, bool want_mask = false,
                         const std::function<void(const DecodeCache<T>&)>& after_step = {});

}  // namespace dma
