// Step 6 - Why skipping is exact
//
// What this proves: leaving masked (query, key) pairs out of the computation changes nothing, not
// even the last bit. The chain of reasons (paper Eq. 5 forward, Eqs. 7-10 backward):
//
//     masked  =>  s_ij = -inf  =>  p_ij = exp(-inf - m) / l = 0 exactly
//             =>  ds_ij = p_ij (dp_ij - D_i) = 0 exactly
//             =>  the pair adds exactly 0 to o_i, l_i, dq_i, dk_j, dv_j and ddelta_j.
//
// Adding an exact 0 to a float sum leaves it bit-for-bit unchanged, so a kernel may skip any
// masked pair. We run the same forward and backward three ways, visiting keys in increasing order:
//   dense-masked  every causal pair j <= p_i; masked ones computed as -inf
//   tile skip     Bq x Bk tiles; a tile that holds no kept pair is never visited
//   gather        each query tile visits only its candidate keys: the keys some query of the tile
//                 keeps, found from the eviction positions e_j of step 3 (j <= p <= e_j). Here each
//                 row takes the candidates up to its own position; a GPU tile computes every row
//                 against all its candidates and lets the element mask zero the rest (step 7
//                 counts that work), which adds the same exact zeros.
// and check the outputs and all gradients are bitwise identical, while the work shrinks.
// Finally the project's tiled implementation (dma::tiled_forward / tiled_backward, skip and gather
// modes) is checked against its scalar reference.
//
// Shapes (one batch, one head): q, k, v, do, o, dq, dk, dv (L, D); delta, ddelta, evict (L).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

#include "dma/mask.hpp"
#include "dma/mask_rule.hpp"
#include "dma/reference.hpp"
#include "dma/tiled.hpp"

namespace {

struct Rng {  // splitmix64: deterministic, so every run prints the same numbers
  uint64_t state;
  double uniform() {  // in [-1, 1)
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return static_cast<double>(z >> 11) * 0x1.0p-52 - 1.0;
  }
};

const int L = 64, D = 8, W = 8, B = 16;  // sequence, head dim, window, tile size (Bq = Bk = B)
const double SCALE = 1.0 / std::sqrt(static_cast<double>(D));
const double NEG_INF = -std::numeric_limits<double>::infinity();

struct Outputs {
  std::vector<double> o, lse, dq, dk, dv, ddelta;
  std::vector<double> ds;  // (L, L): the logit gradient of every visited pair, 0 elsewhere
  long pairs = 0;  // (query, key) pairs the computation touched
};

// Forward and backward of one head, visiting for query i only the keys visit[i] (increasing).
// evict gives the mask: key j is kept by query i exactly when j <= i <= evict[j] (step 3).
Outputs attention(const std::vector<double>& q, const std::vector<double>& k,
                  const std::vector<double>& v, const std::vector<double>& delta,
                  const std::vector<int64_t>& evict, const std::vector<double>& dout,
                  const std::vector<std::vector<int>>& visit) {
  Outputs r;
  r.o.assign(L * D, 0.0);
  r.lse.assign(L, 0.0);
  r.dq.assign(L * D, 0.0);
  r.dk.assign(L * D, 0.0);
  r.dv.assign(L * D, 0.0);
  r.ddelta.assign(L, 0.0);
  r.ds.assign(L * L, 0.0);
  for (int i = 0; i < L; i++) {
    const std::vector<int>& keys = visit[i];
    r.pairs += static_cast<long>(keys.size());
    // Pass a: logits of the visited keys; a masked one is -inf.
    std::vector<double> s(keys.size());
    double m = NEG_INF;
    for (size_t t = 0; t < keys.size(); t++) {
      const int j = keys[t];
      double dot = 0;
      for (int d = 0; d < D; d++) dot += q[i * D + d] * k[j * D + d];
      s[t] = dma::rule::is_kept<int64_t>(j, i, evict[j]) ? SCALE * dot + delta[j] : NEG_INF;
      m = std::fmax(m, s[t]);
    }
    // Pass b: softmax and output. exp(-inf - m) is exactly 0.
    double l = 0;
    for (size_t t = 0; t < keys.size(); t++) l += std::exp(s[t] - m);
    r.lse[i] = m + std::log(l);
    std::vector<double> p(keys.size());
    for (size_t t = 0; t < keys.size(); t++) {
      p[t] = std::exp(s[t] - m) / l;
      for (int d = 0; d < D; d++) r.o[i * D + d] += p[t] * v[keys[t] * D + d];
    }
    // Pass c: backward. D_i = do_i . o_i, ds = p (dp - D_i): 0 wherever p is 0.
    double Di = 0;
    for (int d = 0; d < D; d++) Di += dout[i * D + d] * r.o[i * D + d];
    for (size_t t = 0; t < keys.size(); t++) {
      const int j = keys[t];
      double dp = 0;
      for (int d = 0; d < D; d++) dp += dout[i * D + d] * v[j * D + d];
      const double ds = p[t] * (dp - Di);
      r.ds[i * L + j] = ds;
      for (int d = 0; d < D; d++) {
        r.dv[j * D + d] += p[t] * dout[i * D + d];
        r.dq[i * D + d] += SCALE * ds * k[j * D + d];
        r.dk[j * D + d] += SCALE * ds * q[i * D + d];
      }
      r.ddelta[j] += ds;
    }
  }
  return r;
}

long bitwise_mismatches(const Outputs& x, const Outputs& y) {
  long n = 0;
  const std::vector<double>* xs[] = {&x.o, &x.lse, &x.dq, &x.dk, &x.dv, &x.ddelta};
  const std::vector<double>* ys[] = {&y.o, &y.lse, &y.dq, &y.dk, &y.dv, &y.ddelta};
  for (int t = 0; t < 6; t++)
    for (size_t e = 0; e < xs[t]->size(); e++) n += (*xs[t])[e] != (*ys[t])[e];
  return n;
}

double max_diff(const std::vector<double>& x, const std::vector<double>& y) {
  double m = 0;
  for (size_t e = 0; e < x.size(); e++) m = std::fmax(m, std::fabs(x[e] - y[e]));
  return m;
}

}  // namespace

int main() {
  Rng rng{6};
  std::vector<double> q(L * D), k(L * D), v(L * D), dout(L * D), delta(L);
  for (double& x : q) x = rng.uniform();
  for (double& x : k) x = rng.uniform();
  for (double& x : v) x = rng.uniform();
  for (double& x : dout) x = rng.uniform();
  // A "mostly local" head: delta grows with position (recent keys preferred) plus noise, and one
  // heavy-hitter key (20) that stays in the window to the end. Old tiles empty out: skippable.
  for (int j = 0; j < L; j++) delta[j] = 0.3 * j + 0.5 * rng.uniform() + (j == 20 ? 30.0 : 0.0);

  std::printf("Step 6: why skipping is exact. L = %d, D = %d, w = %d, tiles %d x %d, causal\n\n", L,
              D, W, B, B);

  // Pass 1: eviction positions by their definition (step 3): walk the keys in order of
  // position; once w keys ranked above j have arrived, j is gone for good.
  std::vector<int64_t> evict(L);
  for (int j = 0; j < L; j++) {
    evict[j] = L - 1;
    int above = 0;
    for (int t = 0; t < L; t++) {
      const bool t_above = delta[t] > delta[j] || (delta[t] == delta[j] && t > j);
      if (t_above && ++above == W) {
        evict[j] = t - 1;
        break;
      }
    }
  }
  auto kept = [&](int i, int j) { return dma::rule::is_kept<int64_t>(j, i, evict[j]); };
  int never_kept = 0;
  for (int j = 0; j < L; j++) never_kept += evict[j] < j;
  std::printf("Pass 1: eviction positions e_j; %d of %d keys are never kept (e_j < j)\n\n",
              never_kept, L);

  // Pass 2: the three visiting orders.
  std::vector<std::vector<int>> dense(L), skip(L), gather(L);
  const int T = L / B;
  std::vector<int> kept_in_tile(T * T, 0);
  for (int i = 0; i < L; i++)
    for (int j = 0; j <= i; j++) kept_in_tile[(i / B) * T + j / B] += kept(i, j);
  for (int i = 0; i < L; i++) {
    for (int j = 0; j <= i; j++) dense[i].push_back(j);
    for (int j = 0; j <= i; j++)
      if (kept_in_tile[(i / B) * T + j / B] > 0) skip[i].push_back(j);
    // Candidates of i's query tile: keys kept by some query in [q_first, q_last], i.e. j <= q_last
    // and e_j >= max(j, q_first) (dma::rule::is_candidate, the rule the kernels call too). At most
    // w + B of them (step 3: selections nest).
    const int q_first = (i / B) * B, q_last = q_first + B - 1;
    for (int j = 0; j <= std::min(q_last, i); j++)
      if (dma::rule::is_candidate<int64_t>(j, evict[j], q_first)) gather[i].push_back(j);
  }
  std::printf("Pass 2: kept pairs per causal tile ('-' = no kept pair: tile skipping leaves it out)\n");
  std::printf("                 key tile");
  for (int kt = 0; kt < T; kt++) std::printf(" %5d", kt);
  std::printf("\n");
  int tiles_causal = 0, tiles_skipped = 0;
  for (int qt = 0; qt < T; qt++) {
    std::printf("  query tile %d (queries %2d..%2d)", qt, qt * B, qt * B + B - 1);
    for (int kt = 0; kt <= qt; kt++) {
      const int n = kept_in_tile[qt * T + kt];
      tiles_causal++;
      tiles_skipped += n == 0;
      if (n) std::printf(" %5d", n);
      else std::printf("     -");
    }
    std::printf("\n");
  }
  std::printf("  %d of %d causal tiles are skipped\n", tiles_skipped, tiles_causal);

  // Pass 3: the three computations.
  const Outputs a = attention(q, k, v, delta, evict, dout, dense);
  const Outputs b = attention(q, k, v, delta, evict, dout, skip);
  const Outputs c = attention(q, k, v, delta, evict, dout, gather);
  // The dense run computed ds on every causal pair, masked ones included: look at them.
  long kept_pairs = 0, masked_pairs = 0, nonzero_ds_masked = 0;
  for (int i = 0; i < L; i++)
    for (int j = 0; j <= i; j++) {
      if (kept(i, j)) {
        kept_pairs++;
      } else {
        masked_pairs++;
        nonzero_ds_masked += a.ds[i * L + j] != 0.0;
      }
    }
  std::printf("\nPass 3: %ld causal pairs, %ld kept, %ld masked; ds != 0 at %ld masked pairs\n",
              a.pairs, kept_pairs, masked_pairs, nonzero_ds_masked);
  const long diff_skip = bitwise_mismatches(a, b), diff_gather = bitwise_mismatches(a, c);
  std::printf("  %-13s pairs computed %5ld (%.2f of dense)   o, lse, dq, dk, dv, ddelta: reference\n",
              "dense-masked", a.pairs, 1.0);
  std::printf("  %-13s pairs computed %5ld (%.2f of dense)   values differing from dense: %ld\n",
              "tile skip", b.pairs, static_cast<double>(b.pairs) / a.pairs, diff_skip);
  std::printf("  %-13s pairs computed %5ld (%.2f of dense)   values differing from dense: %ld\n",
              "gather", c.pairs, static_cast<double>(c.pairs) / a.pairs, diff_gather);
  size_t most_candidates = 0;
  for (int i = 0; i < L; i += B) most_candidates = std::max(most_candidates, gather[i + B - 1].size());
  std::printf("  the largest candidate set of a query tile: %zu keys (bound w + Bq = %d)\n",
              most_candidates, W + B);
  bool ok = nonzero_ds_masked == 0 && diff_skip == 0 && diff_gather == 0 && tiles_skipped > 0 &&
            c.pairs < b.pairs && b.pairs < a.pairs && static_cast<int>(most_candidates) <= W + B;

  // Pass 4: the project's tiled implementation (online softmax, so its rounding differs from the
  // two-pass reference; equal to the last bits, not bitwise) in both modes.
  dma::Shape shape;
  shape.Lq = L;
  shape.Lk = L;
  shape.D = D;
  dma::Options opt;
  opt.window = W;
  const std::vector<int64_t> lib_evict = dma::evict_positions(shape, W, delta);
  const std::vector<uint8_t> mask = dma::explicit_mask(shape, opt, delta);
  const dma::ForwardResult<double> ref = dma::reference_forward(shape, opt, q, k, v, delta, mask);
  const dma::AttentionGrads<double> ref_g =
      dma::reference_backward(shape, opt, q, k, v, delta, mask, ref, dout);
  std::printf("\nPass 4: the project's code. dma::evict_positions equals pass 1: %s\n",
              lib_evict == evict ? "yes" : "NO");
  ok = ok && lib_evict == evict;
  for (dma::TileMode mode : {dma::TileMode::dense, dma::TileMode::skip, dma::TileMode::gather}) {
    dma::TileConfig tc;
    tc.Bq = B;
    tc.Bk = B;
    tc.mode = mode;
    dma::TileCounters fc;
    const dma::ForwardResult<double> t = dma::tiled_forward(shape, opt, tc, q, k, v, delta, evict, &fc);
    const dma::AttentionGrads<double> tg =
        dma::tiled_backward(shape, opt, tc, q, k, v, delta, evict, t, dout);
    const double err = std::max({max_diff(t.o, ref.o), max_diff(t.lse, ref.lse),
                                 max_diff(tg.dq, ref_g.dq), max_diff(tg.dk, ref_g.dk),
                                 max_diff(tg.dv, ref_g.dv), max_diff(tg.ddelta, ref_g.ddelta)});
    std::printf("  dma::tiled %-6s  tiles visited %2lld of %2lld, pairs %5lld, "
                "maxdiff vs dma::reference (o, lse, all gradients) %.2g\n",
                dma::tile_mode_name(mode), static_cast<long long>(fc.tiles_visited),
                static_cast<long long>(fc.tiles_dense), static_cast<long long>(fc.pairs_computed),
                err);
    ok = ok && err < 1e-13;
  }
  std::printf("  (the library counts whole tiles: a diagonal tile costs Bq*Bk pairs)\n");
  const double ref_vs_here = std::max(max_diff(ref.o, a.o), max_diff(ref_g.ddelta, a.ddelta));
  std::printf("  dma::reference vs pass 3: maxdiff %.2g\n", ref_vs_here);
  ok = ok && ref_vs_here < 1e-13;

  std::printf("\n%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
