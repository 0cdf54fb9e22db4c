// Step 9 - Decoding with a cache of w keys, exactly
//
// What this proves (docs/design.md §2.10): when generating one token at a time, DMA needs only w
// keys per head, not the whole prefix, and loses nothing. Step 3 showed that selections nest: the
// query at position p keeps a subset of (what p-1 kept) + {p}. So the keys kept at p are the top w
// of the w keys kept at p-1 plus the newcomer, and a key that falls out never comes back. A cache
// that inserts the new key and evicts its lowest-ranked entry (smallest delta; on a tie the
// oldest, the ranking of step 3 read backwards) holds exactly what the full forward would keep.
//
//   Pass 1: the cache written out here in a few lines, on integer deltas, printed as it evicts;
//           after every step it equals row p of the explicit mask.
//   Pass 2: the project's dma::DecodeCache (prefill + steps) on random q, k, v: every step's o and
//           lse equal row p of the full forward (float64, to rounding).
//   Pass 3: a long sequence (L = 3000, w = 16): the cache never holds more than 16 keys per head,
//           and decoding still equals the full forward.
//
// Shapes: one sequence, one head (pass 3: two kv heads, four query heads). delta is (L).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "dma/decode.hpp"
#include "dma/mask.hpp"
#include "dma/numerics.hpp"

namespace {

struct Entry {
  int position;
  double delta;
};

// The ranking of step 3: higher delta first, on a tie the more recent key.
bool ranks_above(const Entry& x, const Entry& y) {
  return x.delta > y.delta || (x.delta == y.delta && x.position > y.position);
}

void print_cache(const std::vector<Entry>& cache) {
  std::printf("[");
  for (size_t n = 0; n < cache.size(); ++n)
    std::printf("%s%2d:%d", n ? " " : "", cache[n].position, static_cast<int>(cache[n].delta));
  std::printf("]");
}

}  // namespace

int main() {
  bool ok = true;
  std::printf("Step 9: decoding with a cache of w keys (docs/design.md §2.10)\n\n");

  // Pass 1 ---------------------------------------------------------------------------------
  const int L = 14, w = 4;
  const std::vector<double> delta = {3, 7, 1, 5, 5, 8, 2, 6, 5, 9, 1, 4, 7, 3};
  dma::Shape shape;  // one sequence, one head
  shape.Lq = L;
  shape.Lk = L;
  dma::Options opt;
  opt.window = w;
  const std::vector<uint8_t> mask = dma::explicit_mask(shape, opt, delta);  // (L, L)

  std::printf("Pass 1: w = %d, a cache of (position:delta) entries, one token per step\n", w);
  std::vector<Entry> cache;
  int mismatches = 0;
  for (int p = 0; p < L; ++p) {
    const Entry incoming{p, delta[p]};
    cache.push_back(incoming);
    char what[64] = "fits";
    if (static_cast<int>(cache.size()) > w) {  // evict the lowest-ranked entry, maybe the newcomer
      auto lowest = std::min_element(cache.begin(), cache.end(),
                                     [](const Entry& x, const Entry& y) { return ranks_above(y, x); });
      std::snprintf(what, sizeof what, "evicts %2d (delta %d)%s", lowest->position,
                    static_cast<int>(lowest->delta), lowest->position == p ? ", itself" : "");
      cache.erase(lowest);
    }
    std::printf("  p = %2d arrives (delta %d): %-28s -> ", p, static_cast<int>(delta[p]), what);
    print_cache(cache);
    // the full forward's query at p keeps exactly these keys
    std::vector<uint8_t> cached(L, 0);
    for (const Entry& e : cache) cached[e.position] = 1;
    const bool same = std::equal(cached.begin(), cached.end(), mask.begin() + p * L);
    mismatches += !same;
    std::printf("  = row %d of the mask: %s\n", p, same ? "yes" : "NO");
  }
  std::printf("  Ties: at p = 7 keys 3 and 4 both have delta 5 and the older, 3, leaves; at p = 8 key 4\n"
              "  leaves rather than the newcomer 8, whose delta is 5 too.\n\n");
  ok = ok && mismatches == 0;

  // Pass 2 ---------------------------------------------------------------------------------
  // The project's cache on random q, k, v (D = 8) with the same deltas given: a prompt of 6
  // tokens, then one step per token, each compared with row p of the full forward.
  shape.D = 8;
  dma::Problem<double> prob = dma::random_problem<double>(shape, opt, 9, /*with_do=*/false);
  prob.delta = delta;
  prob.w_dt.clear();
  prob.a.clear();
  const dma::Result<double> full = dma::run_pipeline(prob, dma::Backend::cpu);

  std::printf("Pass 2: dma::DecodeCache, prefill of 6 tokens then 8 steps, o and lse against the full forward\n");
  dma::DecodeCache<double> dc(dma::decode_config(shape, opt));
  dma::prefill(dc, 0, dma::prompt_of(prob, 0, 6), {}, {});
  std::printf("  after prefill: positions");
  for (int64_t j : dc.positions(0, 0)) std::printf(" %lld", static_cast<long long>(j));
  std::printf(" (those with e_j >= 5)\n");
  double worst = 0;
  for (int p = 6; p < L; ++p) {
    const dma::DecodeOutput<double> out = dma::step(dc, dma::tokens_at(prob, p), {}, {});
    const std::vector<double> o_p(out.o.begin(), out.o.end());
    const std::vector<double> full_o_p(full.fwd.o.begin() + p * shape.D, full.fwd.o.begin() + (p + 1) * shape.D);
    const double err = std::max(dma::max_rel_error(o_p, full_o_p),
                                std::abs(out.lse[0] - full.fwd.lse[p]) / std::abs(full.fwd.lse[p]));
    worst = std::max(worst, err);
    std::printf("  step p = %2d: evicted %2lld, lse %+.6f (full %+.6f), o[0] %+.6f (full %+.6f), err %.1e\n",
                p, static_cast<long long>(out.evicted[0]), out.lse[0], full.fwd.lse[p], out.o[0],
                full_o_p[0], err);
  }
  std::printf("  worst relative error %.1e: the same keys, summed in the same order as the full forward\n\n", worst);
  ok = ok && worst <= 1e-12;

  // Pass 3 ---------------------------------------------------------------------------------
  dma::Shape big;
  big.Hq = 4; big.Hkv = 2; big.Hd = 2;
  big.Lq = big.Lk = 3000;
  big.D = 16;
  dma::Options big_opt;
  big_opt.window = 16;
  const dma::Problem<double> long_prob = dma::random_problem<double>(big, big_opt, 10, false);
  size_t most = 0;
  const dma::Result<double> dec = dma::decode_problem<double>(long_prob, 100, false, [&](const dma::DecodeCache<double>& c) {
    for (int64_t hd = 0; hd < big.Hd; ++hd) most = std::max(most, c.at(0, hd).size());
  });
  const dma::Result<double> ref = dma::run_pipeline(long_prob, dma::Backend::tiled, {}, false);
  const double err = std::max(dma::max_rel_error(dec.fwd.o, ref.fwd.o), dma::max_rel_error(dec.fwd.lse, ref.fwd.lse));
  std::printf("Pass 3: L = %lld, w = %lld, prefill 100 then %lld steps: at most %zu keys cached per head\n",
              static_cast<long long>(big.Lk), static_cast<long long>(big_opt.window),
              static_cast<long long>(big.Lk - 100), most);
  std::printf("  (the full prefix would be %lld), o and lse vs the full forward: %.1e\n",
              static_cast<long long>(big.Lk), err);
  ok = ok && most == 16 && err <= 1e-12;

  std::printf("\n%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
