// The candidate table of one (b, delta head), by the sequential sweep its header describes.
#include "dma/candidates.hpp"

#include <algorithm>
#include <stdexcept>

#include "dma/mask_rule.hpp"

namespace dma {

CandidateTable candidate_table(const int64_t* evict, int64_t Lq, int64_t Lk, bool causal,
                               int64_t window, int64_t Bq) {
  CandidateTable c;
  c.Bq = Bq;
  c.tiles = (Lq + Bq - 1) / Bq;
  c.stride = std::min(window + Bq, Lk);
  const int64_t T = c.tiles, S = c.stride;
  c.slot_key.assign(T * S, -1);
  c.list.assign(T * S, -1);
  c.n_alive.assign(T, 0);
  c.n_full.assign(T, 0);
  auto position = [&](int64_t i) { return rule::query_position<int64_t>(Lq, Lk, causal, i); };

  std::vector<int32_t> row(S, -1);  // the slots as the sweep goes
  int64_t p_last_before = -1;       // p_last(t-1)
  for (int64_t t = 0; t < T; ++t) {
    const int64_t p_first = position(t * Bq), p_last = position(std::min((t + 1) * Bq, Lq) - 1);
    for (auto& j : row)  // keys no longer kept by any query from p_first on leave their slot
      if (j >= 0 && evict[j] < p_first) j = -1;
    int64_t free_slot = 0;
    for (int64_t j = p_last_before + 1; j <= p_last; ++j) {  // arrivals, in increasing j
      if (!rule::is_candidate<int64_t>(j, evict[j], p_first)) continue;
      while (free_slot < S && row[free_slot] >= 0) ++free_slot;
      if (free_slot == S) throw std::logic_error("candidate_table: more than w + Bq candidates");
      row[free_slot] = static_cast<int32_t>(j);
    }
    p_last_before = std::max(p_last_before, p_last);

    int32_t* keys = &c.slot_key[t * S];
    std::copy(row.begin(), row.end(), keys);
    int32_t* list = &c.list[t * S];
    int32_t n = 0;
    for (int pass = 0; pass < 2; ++pass)  // fully kept first, then the others
      for (int64_t s = 0; s < S; ++s) {
        const int64_t j = keys[s];
        if (j < 0) continue;
        c.slots_used = std::max(c.slots_used, s + 1);
        const bool full = j <= p_first && evict[j] >= p_last;
        if (full == (pass == 0)) list[n++] = static_cast<int32_t>(j);
        if (pass == 0 && full) ++c.n_full[t];
      }
    c.n_alive[t] = n;
  }
  return c;
}

}  // namespace dma
