// Decoding with a cache of w entries per (sequence, delta head) (docs/design.md §2.10, §4 Decode).
#include "dma/decode.hpp"

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>

#include "dma/dynamic_weights.hpp"
#include "dma/mask.hpp"
#include "dma/pipeline.hpp"
#include "dma/validate.hpp"

namespace dma {

Shape DecodeConfig::shape(int64_t Lq, int64_t Lk) const {
  Shape s;
  s.B = 1; s.Hq = Hq; s.Hkv = Hkv; s.Hd = Hd; s.Lq = Lq; s.Lk = Lk; s.D = D;
  return s;
}

Options DecodeConfig::options() const {
  Options o;
  o.window = window;
  o.causal = true;
  o.form = form;
  o.scale = scale;
  return o;
}

namespace {

std::string seq_name(int64_t b) { return "sequence " + std::to_string(b); }

void check_sequence_index(const DecodeConfig& c, int64_t b) {
  if (b < 0 || b >= c.B)
    throw Error("decode: " + seq_name(b) + " does not exist (B = " + std::to_string(c.B) + ")");
}

// The entry that ranks lowest among `cached` and `incoming`: by the order of docs/design.md §1.2
// read backwards, smallest delta first and, on a tie, the oldest position. Returns its index in
// `cached`, or cached.size() when it is the incoming token.
template <typename T>
size_t lowest_ranked(const std::vector<CacheEntry<T>>& cached, const CacheEntry<T>& incoming) {
  size_t lowest = cached.size();
  const CacheEntry<T>* low = &incoming;
  for (size_t n = 0; n < cached.size(); ++n)
    if (ranks_above(low->delta, low->position, cached[n].delta, cached[n].position)) {
      lowest = n;
      low = &cached[n];
    }
  return lowest;
}

// n elements of src from offset: one row of a tensor.
template <typename T>
std::vector<T> slice(const std::vector<T>& src, int64_t offset, int64_t n) {
  return std::vector<T>(src.begin() + offset, src.begin() + offset + n);
}

// "No entry leaves": the cache held fewer than w entries before the new token.
constexpr size_t kNothing = static_cast<size_t>(-1);

// One query row over a list of kept entries (docs/design.md §1.3), the three passes of the
// reference in the same order: max, then lse = m + log sum exp(s - m), then o = sum p v.
// `entries` are visited in increasing position, as the reference visits the keys.
template <typename T, typename Visit>
void attend_row(const T* q_hq, int64_t D, T scale, Visit&& for_each_entry, T* o_hq, T* lse_hq) {
  auto logit = [&](const CacheEntry<T>& e) {
    T qk = 0;
    for (int64_t d = 0; d < D; ++d) qk += q_hq[d] * e.k[d];
    return scale * qk + e.delta;
  };
  T m = -std::numeric_limits<T>::infinity();
  for_each_entry([&](const CacheEntry<T>& e) { m = std::max(m, logit(e)); });
  T l = 0;
  for_each_entry([&](const CacheEntry<T>& e) { l += std::exp(logit(e) - m); });
  const T lse = m + std::log(l);
  *lse_hq = lse;
  for (int64_t d = 0; d < D; ++d) o_hq[d] = 0;
  for_each_entry([&](const CacheEntry<T>& e) {
    const T p = std::exp(logit(e) - lse);
    for (int64_t d = 0; d < D; ++d) o_hq[d] += p * e.v[d];
  });
}

}  // namespace

template <typename T>
DecodeCache<T>::DecodeCache(const DecodeConfig& c) : config(c) {
  validate_shape(c.shape(1, 1), /*causal=*/true);
  validate_options(c.shape(1, 1), c.options());
  validate_scale<T>(c.shape(1, 1), c.options());
  if (c.max_length < 0)
    throw Error("max_length: " + std::to_string(c.max_length) + " (must be >= 0; 0 means no limit)");
  length.assign(c.B, 0);
  max_length.assign(c.B, c.max_length);
  entries.assign(c.B * c.Hd, {});
}

template <typename T>
std::vector<int64_t> DecodeCache<T>::positions(int64_t b, int64_t hd) const {
  std::vector<int64_t> out;
  for (const CacheEntry<T>& e : at(b, hd)) out.push_back(e.position);
  return out;
}

template <typename T>
void DecodeCache<T>::reset_sequence(int64_t b) {
  check_sequence_index(config, b);
  length[b] = 0;
  for (int64_t hd = 0; hd < config.Hd; ++hd) entries[b * config.Hd + hd].clear();
}

template <typename T>
PrefillResult<T> prefill(DecodeCache<T>& cache, int64_t b, const Prompt<T>& prompt,
                         const std::vector<T>& w_dt, const std::vector<T>& a) {
  // prompt: q (Hq,P,D) optional, k and v (Hkv,P,D), delta (Hd,P) optional
  const DecodeConfig& c = cache.config;
  check_sequence_index(c, b);
  if (cache.length[b] != 0)
    throw Error("prefill: " + seq_name(b) + " already holds " + std::to_string(cache.length[b]) +
                " tokens (reset_sequence first)");
  const int64_t row = c.Hkv * c.D;
  if (prompt.k.size() % row != 0)
    throw Error("prefill: k has " + std::to_string(prompt.k.size()) +
                " elements, not a multiple of Hkv*D = " + std::to_string(row) + " (expected (Hkv,P,D))");
  const int64_t P = static_cast<int64_t>(prompt.k.size()) / row;
  if (cache.max_length[b] > 0 && P > cache.max_length[b])
    throw Error("prefill: the prompt of " + seq_name(b) + " has " + std::to_string(P) +
                " tokens, more than its declared maximum length " + std::to_string(cache.max_length[b]));
  const Shape s = c.shape(P, P);
  validate_numel(prompt.v, s.kv_numel(), "v");
  if (!prompt.q.empty()) validate_numel(prompt.q, s.q_numel(), "q");
  if (!prompt.delta.empty()) validate_numel(prompt.delta, s.delta_numel(), "delta");
  PrefillResult<T> r;
  if (P == 0) return r;  // nothing to keep: decoding starts at position 0
  if (prompt.delta.empty()) validate_dynamic_weight_params(s, w_dt, a);  // w_dt, a only when used

  // 1. delta and e_j over the prompt's keys (and, with q, the prompt's own forward)
  if (!prompt.q.empty()) {
    Problem<T> p;
    p.shape = s;
    p.opt = c.options();
    p.q = prompt.q;
    p.k = prompt.k;
    p.v = prompt.v;
    p.delta = prompt.delta;
    if (prompt.delta.empty()) { p.w_dt = w_dt; p.a = a; }
    Result<T> full = run_pipeline(p, Backend::tiled, TileConfig{}, /*want_mask=*/false);
    r.delta = std::move(full.delta);
    r.evict = std::move(full.evict);
    r.fwd = std::move(full.fwd);
  } else {
    const std::vector<int64_t> kv_dims{c.Hkv, P, c.D};
    validate_finite(prompt.k, kv_dims, "k");
    validate_finite(prompt.v, kv_dims, "v");
    if (!prompt.delta.empty()) validate_finite(prompt.delta, {c.Hd, P}, "delta");
    r.delta = prompt.delta.empty() ? dynamic_weights(s, c.form, prompt.v, w_dt, a) : prompt.delta;
    r.evict = evict_positions(s, c.window, r.delta);
  }

  // 2. the survivors: the keys the query at the prompt's last position P-1 keeps
  for (int64_t hd = 0; hd < c.Hd; ++hd) {
    const int64_t hk = c.kv_head_of_delta_head(hd);
    std::vector<CacheEntry<T>>& kept = cache.entries[b * c.Hd + hd];
    for (int64_t j = 0; j < P; ++j) {
      if (!is_kept(j, P - 1, r.evict[hd * P + j])) continue;
      CacheEntry<T> e;
      e.position = j;
      e.delta = r.delta[hd * P + j];
      e.k = slice(prompt.k, (hk * P + j) * c.D, c.D);
      e.v = slice(prompt.v, (hk * P + j) * c.D, c.D);
      kept.push_back(std::move(e));
    }
  }
  cache.length[b] = P;
  return r;
}

template <typename T>
DecodeOutput<T> step(DecodeCache<T>& cache, const DecodeTokens<T>& tokens,
                     const std::vector<T>& w_dt, const std::vector<T>& a) {
  // tokens: q (B,Hq,D), k and v (B,Hkv,D), active (B) optional, delta (B,Hd) optional
  const DecodeConfig& c = cache.config;
  const std::vector<int64_t> q_dims{c.B, c.Hq, c.D}, kv_dims{c.B, c.Hkv, c.D};
  validate_numel(tokens.q, c.B * c.Hq * c.D, "q");
  validate_numel(tokens.k, c.B * c.Hkv * c.D, "k");
  validate_numel(tokens.v, c.B * c.Hkv * c.D, "v");
  if (!tokens.active.empty() && static_cast<int64_t>(tokens.active.size()) != c.B)
    throw Error("active: has " + std::to_string(tokens.active.size()) + " elements, expected " +
                std::to_string(c.B));
  if (!tokens.delta.empty()) validate_numel(tokens.delta, c.B * c.Hd, "delta");
  else validate_dynamic_weight_params(c.shape(1, 1), w_dt, a);
  auto steps = [&](int64_t b) { return tokens.active.empty() || tokens.active[b] != 0; };

  // 1. checks that need no arithmetic, for every active sequence, before anything changes
  for (int64_t b = 0; b < c.B; ++b) {
    if (!steps(b)) continue;
    if (cache.finished(b))
      throw Error("step: " + seq_name(b) + " is finished: it reached its declared maximum length " +
                  std::to_string(cache.max_length[b]));
    auto check_row = [&](const std::vector<T>& t, const std::vector<int64_t>& dims, const char* name) {
      const int64_t row = static_cast<int64_t>(t.size()) / c.B;  // sequence b's part of t
      for (int64_t n = b * row; n < (b + 1) * row; ++n)
        if (!std::isfinite(t[n]))
          throw Error(name + format_index(n, dims) + " is " +
                      (std::isnan(t[n]) ? "nan" : t[n] > 0 ? "inf" : "-inf") + " (inputs must be finite)");
    };
    check_row(tokens.q, q_dims, "q");
    check_row(tokens.k, kv_dims, "k");
    check_row(tokens.v, kv_dims, "v");
    if (!tokens.delta.empty()) check_row(tokens.delta, {c.B, c.Hd}, "delta");
  }

  DecodeOutput<T> out;
  out.o.assign(c.B * c.Hq * c.D, T(0));
  out.lse.assign(c.B * c.Hq, T(0));
  out.delta.assign(c.B * c.Hd, T(0));
  out.position.assign(c.B, -1);
  out.evicted.assign(c.B * c.Hd, -1);
  std::vector<CacheEntry<T>> incoming(c.B * c.Hd);  // the new token as an entry, per (b, hd)
  std::vector<size_t> leaving(c.B * c.Hd);          // lowest_ranked's answer, or kNothing
  const Shape one_token = c.shape(1, 1);
  const T scale = static_cast<T>(c.options().softmax_scale(one_token));

  for (int64_t b = 0; b < c.B; ++b) {
    if (!steps(b)) continue;
    const int64_t p = cache.length[b];
    out.position[b] = p;

    // 2. delta_p from the new token's value vectors over all kv heads (v[b] is (1,Hkv,1,D)): the
    //    same arithmetic as the full forward's dynamic weights, so the same bits
    std::vector<T> delta_p;
    if (tokens.delta.empty()) {
      const std::vector<T> v_b = slice(tokens.v, b * c.Hkv * c.D, c.Hkv * c.D);
      try {
        delta_p = dynamic_weights(one_token, c.form, v_b, w_dt, a);  // (Hd)
      } catch (const Error& e) {  // its index is of the one-token shape: say which token it was
        throw Error("step: " + seq_name(b) + ", position " + std::to_string(p) + ": " + e.what());
      }
    } else {
      delta_p = slice(tokens.delta, b * c.Hd, c.Hd);
    }

    // 3. insert, and find the entry that leaves while more than w remain (at most one: the cache
    //    held at most w before this token)
    for (int64_t hd = 0; hd < c.Hd; ++hd) {
      const int64_t hk = c.kv_head_of_delta_head(hd);
      const std::vector<CacheEntry<T>>& kept = cache.at(b, hd);
      CacheEntry<T>& e = incoming[b * c.Hd + hd];
      e.position = p;
      e.delta = delta_p[hd];
      e.k = slice(tokens.k, (b * c.Hkv + hk) * c.D, c.D);
      e.v = slice(tokens.v, (b * c.Hkv + hk) * c.D, c.D);
      out.delta[b * c.Hd + hd] = e.delta;
      size_t& leaves = leaving[b * c.Hd + hd];
      leaves = static_cast<int64_t>(kept.size()) + 1 > c.window ? lowest_ranked(kept, e) : kNothing;
      if (leaves != kNothing)
        out.evicted[b * c.Hd + hd] = leaves < kept.size() ? kept[leaves].position : p;
    }

    // 4. attend over the survivors, in increasing position
    for (int64_t hq = 0; hq < c.Hq; ++hq) {
      const int64_t hd = one_token.delta_head(hq);
      const std::vector<CacheEntry<T>>& kept = cache.at(b, hd);
      const size_t leaves = leaving[b * c.Hd + hd];
      const CacheEntry<T>& e_new = incoming[b * c.Hd + hd];
      auto survivors = [&](auto&& f) {
        for (size_t n = 0; n < kept.size(); ++n)
          if (n != leaves) f(kept[n]);
        if (leaves != kept.size()) f(e_new);  // the new token stays unless it is the one leaving
      };
      attend_row(&tokens.q[(b * c.Hq + hq) * c.D], c.D, scale, survivors,
                 &out.o[(b * c.Hq + hq) * c.D], &out.lse[b * c.Hq + hq]);
    }
  }
  // finite inputs can still overflow float32 (q.k beyond 3e38): an error, never a NaN out
  for (const std::vector<T>* t : {&out.o, &out.lse})
    if (const int64_t n = first_non_finite(*t); n >= 0)
      throw Error(std::string(t == &out.o ? "o" : "lse") +
                  format_index(n, t == &out.o ? q_dims : std::vector<int64_t>{c.B, c.Hq}) +
                  " is not finite: the step overflowed " + (sizeof(T) == 4 ? "float32 (try float64 inputs)" : "float64"));

  // 5. commit: every check has passed
  for (int64_t b = 0; b < c.B; ++b) {
    if (!steps(b)) continue;
    for (int64_t hd = 0; hd < c.Hd; ++hd) {
      std::vector<CacheEntry<T>>& kept = cache.entries[b * c.Hd + hd];
      const size_t leaves = leaving[b * c.Hd + hd];
      const bool new_stays = leaves != kept.size();
      if (leaves < kept.size()) kept.erase(kept.begin() + static_cast<std::ptrdiff_t>(leaves));
      if (new_stays) kept.push_back(std::move(incoming[b * c.Hd + hd]));  // the largest position
    }
    ++cache.length[b];
  }
  return out;
}

DecodeConfig decode_config(const Shape& s, const Options& opt) {
  DecodeConfig c;
  c.B = s.B; c.Hq = s.Hq; c.Hkv = s.Hkv; c.Hd = s.Hd; c.D = s.D;
  c.window = opt.window;
  c.form = opt.form;
  c.scale = opt.scale;
  return c;
}

namespace {

// Rows [t0, t0 + n) of every head h of sequence b of a (B, H, L, row) tensor -> (H, n, row).
template <typename T>
std::vector<T> rows_of(const std::vector<T>& x, int64_t b, int64_t H, int64_t L, int64_t row,
                       int64_t t0, int64_t n) {
  std::vector<T> out;
  out.reserve(H * n * row);
  for (int64_t h = 0; h < H; ++h) {
    const auto from = x.begin() + ((b * H + h) * L + t0) * row;
    out.insert(out.end(), from, from + n * row);
  }
  return out;
}

template <typename T>
void check_decodable(const Problem<T>& p) {
  validate_problem(p);
  if (!p.opt.causal) throw Error("decode: decoding is causal (got the non-causal mode)");
  if (p.shape.Lq != p.shape.Lk)
    throw Error("decode: needs one query per key, Lq == Lk (got Lq = " + std::to_string(p.shape.Lq) +
                ", Lk = " + std::to_string(p.shape.Lk) + ")");
}

}  // namespace

template <typename T>
Prompt<T> prompt_of(const Problem<T>& p, int64_t b, int64_t P) {
  const Shape& s = p.shape;
  Prompt<T> r;
  r.q = rows_of(p.q, b, s.Hq, s.Lq, s.D, 0, P);
  r.k = rows_of(p.k, b, s.Hkv, s.Lk, s.D, 0, P);
  r.v = rows_of(p.v, b, s.Hkv, s.Lk, s.D, 0, P);
  if (p.delta_given()) r.delta = rows_of(p.delta, b, s.Hd, s.Lk, 1, 0, P);
  return r;
}

template <typename T>
DecodeTokens<T> tokens_at(const Problem<T>& p, int64_t position) {
  const Shape& s = p.shape;
  DecodeTokens<T> t;
  for (int64_t b = 0; b < s.B; ++b) {
    auto append = [](std::vector<T>& to, const std::vector<T>& from) { to.insert(to.end(), from.begin(), from.end()); };
    append(t.q, rows_of(p.q, b, s.Hq, s.Lq, s.D, position, 1));
    append(t.k, rows_of(p.k, b, s.Hkv, s.Lk, s.D, position, 1));
    append(t.v, rows_of(p.v, b, s.Hkv, s.Lk, s.D, position, 1));
    if (p.delta_given()) append(t.delta, rows_of(p.delta, b, s.Hd, s.Lk, 1, position, 1));
  }
  return t;
}

template <typename T>
Result<T> decode_problem(const Problem<T>& p, int64_t P, bool want_mask,
                         const std::function<void(const DecodeCache<T>&)>& after_step) {
  check_decodable(p);
  const Shape& s = p.shape;
  const int64_t L = s.Lk;
  if (P < 0 || P > L)
    throw Error("decode: prefill of " + std::to_string(P) + " tokens, expected 0 <= P <= L = " +
                std::to_string(L));
  DecodeCache<T> cache(decode_config(s, p.opt));
  Result<T> r;
  r.delta.assign(s.delta_numel(), T(0));
  r.evict.assign(s.delta_numel(), L - 1);  // a key still cached at the end is kept to the end
  r.fwd.o.assign(s.q_numel(), T(0));
  r.fwd.lse.assign(s.lse_numel(), T(0));

  // 1. prefill: the prompt's rows of o and lse, its delta, and e_j of the keys that left already
  for (int64_t b = 0; b < s.B; ++b) {
    const PrefillResult<T> pre = prefill(cache, b, prompt_of(p, b, P), p.w_dt, p.a);
    for (int64_t hd = 0; hd < s.Hd; ++hd)
      for (int64_t j = 0; j < P; ++j) {
        r.delta[(b * s.Hd + hd) * L + j] = pre.delta[hd * P + j];
        const int64_t e_j = pre.evict[hd * P + j];
        if (e_j < P - 1) r.evict[(b * s.Hd + hd) * L + j] = rule::is_ever_kept(j, e_j) ? e_j : j - 1;
      }
    for (int64_t hq = 0; hq < s.Hq; ++hq) {
      std::copy_n(pre.fwd.o.begin() + hq * P * s.D, P * s.D, r.fwd.o.begin() + (b * s.Hq + hq) * L * s.D);
      std::copy_n(pre.fwd.lse.begin() + hq * P, P, r.fwd.lse.begin() + (b * s.Hq + hq) * L);
    }
  }

  // 2. one step per position: a key that leaves at step t was kept up to t-1 (and one that
  //    leaves as it arrives gets e_t = t-1 < t, "never kept")
  for (int64_t t = P; t < L; ++t) {
    const DecodeOutput<T> out = step(cache, tokens_at(p, t), p.w_dt, p.a);
    for (int64_t b = 0; b < s.B; ++b) {
      for (int64_t hd = 0; hd < s.Hd; ++hd) {
        r.delta[(b * s.Hd + hd) * L + t] = out.delta[b * s.Hd + hd];
        const int64_t left = out.evicted[b * s.Hd + hd];
        if (left >= 0) r.evict[(b * s.Hd + hd) * L + left] = t - 1;
      }
      for (int64_t hq = 0; hq < s.Hq; ++hq) {
        std::copy_n(out.o.begin() + (b * s.Hq + hq) * s.D, s.D,
                    r.fwd.o.begin() + ((b * s.Hq + hq) * L + t) * s.D);
        r.fwd.lse[(b * s.Hq + hq) * L + t] = out.lse[b * s.Hq + hq];
      }
    }
    if (after_step) after_step(cache);
  }
  if (want_mask) r.mask = mask_from_evict(s, p.opt, r.evict);
  return r;
}

#define DMA_INSTANTIATE(T)                                                                    \
  template struct DecodeCache<T>;                                                            \
  template PrefillResult<T> prefill(DecodeCache<T>&, int64_t, const Prompt<T>&,               \
                                    const std::vector<T>&, const std::vector<T>&);            \
  template DecodeOutput<T> step(DecodeCache<T>&, const DecodeTokens<T>&, const std::vector<T>&, \
                                const std::vector<T>&);                                        \
  template Prompt<T> prompt_of(const Problem<T>&, int64_t, int64_t);                          \
  template DecodeTokens<T> tokens_at(const Problem<T>&, int64_t);                             \
  template Result<T> decode_problem(const Problem<T>&, int64_t, bool,                         \
                                    const std::function<void(const DecodeCache<T>&)>&);
DMA_INSTANTIATE(float)
DMA_INSTANTIATE(double)
#undef DMA_INSTANTIATE

}  // namespace dma
