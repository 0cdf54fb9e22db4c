// Step 3 - The dynamic mask: each query keeps its top-w keys
//
// What this proves (paper Eq. 4): query i sits at position p_i and may see keys j <= p_i. If it
// sees at most w keys it keeps them all; otherwise it keeps the w keys ranked highest by
//
//     (delta_j descending, then j descending)      -- a tie goes to the more recent key
//
// Because delta comes from the values only (step 2), this ranking is one order, the same for every
// query. Three consequences, each shown on a 16 x 16 picture printed as text:
//   1. equal delta (a = 0) is exactly sliding-window attention over the w most recent keys;
//   2. selections nest: query i keeps a subset of (what query i-1 kept) + {its own new key p_i},
//      so a key that leaves the window never comes back;
//   3. hence each key j is kept by one interval of queries, j <= p <= e_j, and ONE integer per key
//      (the eviction position e_j) describes the whole Lq x Lk mask.
// Then the picture is checked against the project's dma::explicit_mask / dma::evict_positions,
// and two variants are shown: fewer queries than keys (decoding) and non-causal attention.
//
// Shapes (one batch, one delta head): delta is (Lk); mask is (Lq, Lk); evict is (Lk).

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "dma/mask.hpp"
#include "dma/mask_rule.hpp"

namespace {

struct Rng {  // splitmix64: deterministic, so every run prints the same picture
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
};

bool ranks_above(const std::vector<double>& delta, int j1, int j2) {
  return delta[j1] > delta[j2] || (delta[j1] == delta[j2] && j1 > j2);
}

// Eq. 4 read literally: for the query at position p, sort its allowed keys and keep the first w.
// Returns mask (Lq, Lk) with queries at positions p_i = i + (Lk - Lq) (aligned bottom-right).
std::vector<uint8_t> topw_mask(const std::vector<double>& delta, int Lq, int w) {
  const int Lk = static_cast<int>(delta.size());
  std::vector<uint8_t> mask(Lq * Lk, 0);
  for (int i = 0; i < Lq; i++) {
    const int p = i + (Lk - Lq);
    std::vector<int> allowed;
    for (int j = 0; j <= p; j++) allowed.push_back(j);
    std::sort(allowed.begin(), allowed.end(),
              [&](int x, int y) { return ranks_above(delta, x, y); });
    const int keep = std::min<int>(w, static_cast<int>(allowed.size()));
    for (int r = 0; r < keep; r++) mask[i * Lk + allowed[r]] = 1;
  }
  return mask;
}

// '#' kept, '.' allowed but not kept, ' ' in the future of the query.
void print_mask(const char* title, const std::vector<uint8_t>& mask, const std::vector<double>& delta,
                int Lq) {
  const int Lk = static_cast<int>(delta.size());
  std::printf("%s\n", title);
  std::printf("             key  ");
  for (int j = 0; j < Lk; j++) std::printf("%d", j % 10);
  std::printf("\n           delta  ");
  for (int j = 0; j < Lk; j++) std::printf("%d", static_cast<int>(delta[j]));
  std::printf("\n");
  for (int i = 0; i < Lq; i++) {
    const int p = i + (Lk - Lq);
    std::printf("  query %2d (p=%2d)  ", i, p);
    for (int j = 0; j < Lk; j++) std::printf("%c", mask[i * Lk + j] ? '#' : (j <= p ? '.' : ' '));
    std::printf("\n");
  }
}

}  // namespace

int main() {
  const int Lk = 16, w = 4;
  bool ok = true;

  // Small integer deltas so the picture can print them, with ties on purpose.
  Rng rng{3};
  std::vector<double> delta(Lk);
  for (double& d : delta) d = static_cast<double>(rng.next() % 10);

  std::printf("Step 3: the dynamic mask (paper Eq. 4), Lq = Lk = %d, w = %d, causal\n\n", Lk, w);

  // Pass 1: the definition, query by query.
  std::vector<uint8_t> mask = topw_mask(delta, Lk, w);
  print_mask("Pass 1: per-query top-w ('#' kept, '.' allowed but dropped)", mask, delta, Lk);
  std::printf("  The first %d queries see at most %d keys and keep them all; after that each row "
              "has exactly %d.\n\n", w, w, w);

  // Pass 2: all deltas equal -> every comparison is a tie -> recency decides -> the w most recent.
  std::vector<double> flat(Lk, 1.0);
  std::vector<uint8_t> window_mask = topw_mask(flat, Lk, w);
  print_mask("Pass 2: all delta equal (a = 0): a sliding window", window_mask, flat, Lk);
  int window_errors = 0;
  for (int p = 0; p < Lk; p++)
    for (int j = 0; j < Lk; j++) window_errors += window_mask[p * Lk + j] != (j <= p && j > p - w);
  std::printf("  equals 'keep j in (p - w, p]' everywhere: %s\n\n", window_errors ? "NO" : "yes");
  ok = ok && window_errors == 0;

  // Pass 3: nesting. Query p's candidates are query p-1's kept keys plus the newcomer p: the
  // ranking did not change, so anything p-1 dropped is still outranked by w keys.
  int nest_violations = 0;
  for (int p = 1; p < Lk; p++)
    for (int j = 0; j < p; j++) nest_violations += mask[p * Lk + j] && !mask[(p - 1) * Lk + j];
  std::printf("Pass 3: nesting. Keys kept by query p but not by p-1 (other than p itself): %d\n",
              nest_violations);
  for (int p = w; p < w + 4; p++) {
    std::printf("  query %2d: key %2d arrives (delta %d); ", p, p, static_cast<int>(delta[p]));
    int evicted = -1;
    for (int j = 0; j < p; j++)
      if (mask[(p - 1) * Lk + j] && !mask[p * Lk + j]) evicted = j;
    if (evicted >= 0) std::printf("key %2d leaves (delta %d)\n", evicted,
                                  static_cast<int>(delta[evicted]));
    else std::printf("it is outranked by all %d kept keys and is never kept\n", w);
  }
  ok = ok && nest_violations == 0;

  // Pass 4: eviction positions. Walk the keys in order of position, counting those ranked above j;
  // once w of them have arrived, j can never be in a top-w again. e_j is the position just before
  // the w-th one (or Lk-1 if that never happens); if it arrived before j, e_j < j: never kept.
  std::vector<int64_t> evict(Lk);
  for (int j = 0; j < Lk; j++) {
    evict[j] = Lk - 1;
    int above = 0;
    for (int t = 0; t < Lk; t++)
      if (t != j && ranks_above(delta, t, j) && ++above == w) {
        evict[j] = t - 1;
        break;
      }
  }
  std::printf("\nPass 4: one eviction position per key (key j is kept by queries j <= p <= e_j)\n");
  for (int j = 0; j < Lk; j++) {
    std::printf("  key %2d  delta %d  e_j = %2d  ", j, static_cast<int>(delta[j]),
                static_cast<int>(evict[j]));
    if (evict[j] < j) std::printf("never kept\n");
    else std::printf("kept by queries %2d..%2d\n", j, static_cast<int>(evict[j]));
  }
  int interval_errors = 0;
  for (int p = 0; p < Lk; p++)
    for (int j = 0; j < Lk; j++)
      interval_errors += mask[p * Lk + j] != dma::rule::is_kept<int64_t>(j, p, evict[j]);
  std::printf("  the %d x %d mask rebuilt from these %d integers matches pass 1: %s\n", Lk, Lk, Lk,
              interval_errors ? "NO" : "yes");
  ok = ok && interval_errors == 0;

  // Pass 5: the project's implementations (explicit top-w, and a heap sweep for e_j).
  dma::Shape shape;
  shape.Lq = Lk;
  shape.Lk = Lk;
  dma::Options opt;
  opt.window = w;
  std::vector<uint8_t> ref_mask = dma::explicit_mask(shape, opt, delta);
  std::vector<int64_t> ref_evict = dma::evict_positions(shape, w, delta);
  std::vector<uint8_t> ref_from_evict = dma::mask_from_evict(shape, opt, ref_evict);
  const bool same_mask = ref_mask == mask, same_evict = ref_evict == evict,
             same_expand = ref_from_evict == mask;
  std::printf("\nPass 5: the project's dma::explicit_mask equals pass 1: %s; dma::evict_positions "
              "equals pass 4: %s;\n        dma::mask_from_evict expands it back to the same mask: %s\n",
              same_mask ? "yes" : "NO", same_evict ? "yes" : "NO", same_expand ? "yes" : "NO");
  ok = ok && same_mask && same_evict && same_expand;

  // Pass 6: fewer queries than keys. Causal queries are aligned bottom-right (as when decoding the
  // last Lq tokens of a sequence), so Lq = 4 gives exactly the last 4 rows of the picture.
  dma::Shape tail = shape;
  tail.Lq = 4;
  std::vector<uint8_t> tail_mask = dma::explicit_mask(tail, opt, delta);
  const bool tail_ok = std::equal(tail_mask.begin(), tail_mask.end(), mask.end() - 4 * Lk);
  print_mask("\nPass 6: Lq = 4 < Lk (decoding): the last 4 rows of pass 1", tail_mask, delta, 4);
  std::printf("  same as rows 12..15 of pass 1: %s\n", tail_ok ? "yes" : "NO");
  ok = ok && tail_ok;

  // Pass 7: non-causal: every query sees all Lk keys, so every row is the global top w.
  dma::Options nc = opt;
  nc.causal = false;
  std::vector<uint8_t> nc_mask = dma::explicit_mask(shape, nc, delta);
  const bool nc_ok = std::equal(nc_mask.begin(), nc_mask.begin() + Lk, mask.end() - Lk);
  bool rows_equal = true;
  for (int i = 1; i < Lk; i++)
    rows_equal = rows_equal && std::equal(nc_mask.begin(), nc_mask.begin() + Lk,
                                          nc_mask.begin() + i * Lk);
  std::printf("\nPass 7: non-causal: every row keeps the global top %d (= the last causal row): %s\n",
              w, nc_ok && rows_equal ? "yes" : "NO");
  ok = ok && nc_ok && rows_equal;

  std::printf("\n%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
