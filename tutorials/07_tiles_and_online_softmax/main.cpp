// Step 7 - Tiles and the online softmax; tile skipping vs gathering
//
// What this proves:
//   1. The online softmax (FlashAttention): a row's softmax and output can be built one tile of
//      keys at a time, keeping only a running max m, a running sum l and an unnormalised output
//      acc. When a new tile raises the max, the old sums are rescaled by alpha = exp(m_old - m_new):
//          m_new = max(m, rowmax S)    alpha = exp(m - m_new)    P = exp(S - m_new)
//          l     = alpha l + rowsum P  acc   = alpha acc + P V   ...   o = acc / l, lse = m + log l
//      A row that has seen only masked keys has m = -inf and needs a guard (-inf - -inf is NaN).
//   2. The DMA forward (paper Eq. 5) on Bq x Bk tiles, in three modes that give the same output:
//          dense   every causal tile, the element mask applied inside
//          skip    tiles that hold no kept (query, key) pair are left out
//          gather  each query tile collects its candidate keys (kept by some query of the tile:
//                  j <= p_last and e_j >= max(j, p_first), at most w + Bq of them, step 3) into a
//                  compact block and runs the same tile math on it, Bk keys at a time
//   3. With counters: on random (unstructured) delta, skipping visits nearly every causal tile -
//      the top w keys of a long prefix are spread over all of it, so almost every key tile holds
//      one - while gathering cuts the work to about the true density. On structured delta (a
//      local head) skipping pays too.
//   4. What the GPU's mask phase hands the kernels instead of evict: per query tile a list of its
//      candidates, fully kept keys first (a chunk of them needs no element mask), and a "slot"
//      per key that it keeps for its whole run of query tiles (interval partitioning). Printed
//      as a tile x slot table on a small example.
//   5. The backward by slots, without atomics: for each block of Bk slots, walk the query tiles
//      in order, keep dK, dV, ddelta of the block's keys, write each key's once when it leaves
//      its slot; then dQ by a query-major pass over the lists. Every key is written exactly once,
//      and the work stays near the kept pairs.
// The counters and outputs are checked against the project's dma::tiled_forward, its candidate
// table (dma::candidate_table) and its slot backward (dma::tiled_backward, gather mode).
//
// Shapes (one batch, one head): q, k, v, o, do (L, D); delta, evict, lse (L); a tile S is (Bq, Bk);
// the candidate table is (T, w + Bq) for T = ceil(L / Bq) query tiles.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

#include "dma/candidates.hpp"
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

const double NEG_INF = -std::numeric_limits<double>::infinity();

// ---------------------------------------------------------------------------------------------
// Part 1: the online softmax on one row, printed tile by tile.

bool online_softmax_demo() {
  // One query's 12 logits in 3 tiles of 4 (-inf = masked), and a 1-dimensional value per key.
  const double s[12] = {NEG_INF, NEG_INF, NEG_INF, NEG_INF,  // tile 0: fully masked
                        0.5,     1.0,     -0.3,    0.2,      // tile 1
                        2.5,     0.1,     NEG_INF, 1.7};     // tile 2: raises the max
  const double v[12] = {9, 9, 9, 9, 1, 2, 3, 4, 5, 6, 9, 7};
  std::printf("Part 1: the online softmax on one row of 12 logits, tiles of 4\n");

  // Two passes, the textbook way: max, then sum and weighted sum.
  double m_ref = NEG_INF, l_ref = 0, acc_ref = 0;
  for (double x : s) m_ref = std::fmax(m_ref, x);
  for (int j = 0; j < 12; j++) {
    l_ref += std::exp(s[j] - m_ref);
    acc_ref += std::exp(s[j] - m_ref) * v[j];
  }

  // One pass over the tiles.
  double m = NEG_INF, l = 0, acc = 0;
  bool naive_nan = false;
  for (int t = 0; t < 3; t++) {
    double tile_max = NEG_INF;
    for (int c = 0; c < 4; c++) tile_max = std::fmax(tile_max, s[4 * t + c]);
    const double m_new = std::fmax(m, tile_max);
    naive_nan = naive_nan || std::isnan(std::exp(m - m_new));  // what an unguarded kernel computes
    const double alpha = m_new == NEG_INF ? 1.0 : std::exp(m - m_new);  // the guard
    double tile_sum = 0, tile_acc = 0;
    for (int c = 0; c < 4; c++) {
      const double x = s[4 * t + c];
      const double p = x == NEG_INF ? 0.0 : std::exp(x - m_new);
      tile_sum += p;
      tile_acc += p * v[4 * t + c];
    }
    l = alpha * l + tile_sum;
    acc = alpha * acc + tile_acc;
    m = m_new;
    std::printf("  tile %d: tile max %5.2f  m = %5.2f  alpha = %.4f  l = %.4f  acc = %.4f\n", t,
                tile_max, m, alpha, l, acc);
  }
  const double o = acc / l, o_ref = acc_ref / l_ref;
  const double lse = m + std::log(l), lse_ref = m_ref + std::log(l_ref);
  std::printf("  online  o = %.15f  lse = %.15f\n  2-pass  o = %.15f  lse = %.15f\n", o, lse,
              o_ref, lse_ref);
  std::printf("  without the guard, tile 0 computes alpha = exp(-inf - -inf) = %s\n\n",
              naive_nan ? "nan (and the nan spreads to the output)" : "a number?");
  return naive_nan && std::fabs(o - o_ref) < 1e-14 && std::fabs(lse - lse_ref) < 1e-14;
}

// ---------------------------------------------------------------------------------------------
// Part 2: the tiled DMA forward with counters (causal, Lq = Lk = L, so query i sits at p_i = i).

enum class Mode { dense, skip, gather };
const char* mode_name(Mode m) { return m == Mode::dense ? "dense" : m == Mode::skip ? "skip" : "gather"; }

struct Counters {
  long tiles_dense = 0;     // tiles a causal-dense kernel visits
  long tiles_visited = 0;   // tiles (or gathered chunks) that ran tile math
  long pairs_dense = 0;     // (query, key) pairs in the causal-dense tiles
  long pairs_computed = 0;  // pairs the tile math ran on
  long pairs_kept = 0;      // pairs kept by the mask
};

struct Problem {
  int L, D, w;
  std::vector<double> q, k, v, delta;  // (L, D) x3, (L)
  std::vector<int64_t> evict;          // (L): key j is kept by queries j <= i <= evict[j]
};

// Eviction positions by their definition (step 3): walk the keys in order of position counting
// those ranked above j; the w-th one ends j's interval. O(L^2): fine at these sizes (the library
// does it in O(L log w) with a heap).
std::vector<int64_t> eviction_positions(const std::vector<double>& delta, int w) {
  const int L = static_cast<int>(delta.size());
  std::vector<int64_t> evict(L);
  for (int j = 0; j < L; j++) {
    evict[j] = L - 1;
    int above = 0;
    for (int t = 0; t < L; t++) {
      if ((delta[t] > delta[j] || (delta[t] == delta[j] && t > j)) && ++above == w) {
        evict[j] = t - 1;
        break;
      }
    }
  }
  return evict;
}

struct Output {
  std::vector<double> o, lse;
};

Output tiled_forward(const Problem& P, int Bq, int Bk, Mode mode, Counters& c) {
  const int L = P.L, D = P.D;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  Output out{std::vector<double>(L * D), std::vector<double>(L)};
  auto kept = [&](int i, int j) { return dma::rule::is_kept<int64_t>(j, i, P.evict[j]); };

  for (int i0 = 0; i0 < L; i0 += Bq) {
    const int rows = std::min(Bq, L - i0), p_first = i0, p_last = i0 + rows - 1;

    // Pass 1: which key blocks this query tile walks.
    std::vector<std::vector<int>> blocks;
    for (int k0 = 0; k0 <= p_last; k0 += Bk) {  // the causal-dense tiles
      const int k_last = std::min(k0 + Bk, L) - 1;
      c.tiles_dense++;
      c.pairs_dense += static_cast<long>(rows) * (k_last - k0 + 1);
      bool has_kept = false;  // does some query of the tile keep some key of this block?
      for (int j = k0; j <= k_last && !has_kept; j++)
        has_kept = dma::rule::kept_positions<int64_t>(j, P.evict[j], p_first, p_last) > 0;
      if (mode == Mode::dense || (mode == Mode::skip && has_kept)) {
        blocks.emplace_back();
        for (int j = k0; j <= k_last; j++) blocks.back().push_back(j);
      }
    }
    if (mode == Mode::gather) {
      // Kept by some query in [p_first, p_last]: j <= p_last and e_j >= max(j, p_first), the
      // project's one rule (dma/mask_rule.hpp), which the kernels call too.
      std::vector<int> candidates;
      for (int j = 0; j <= p_last; j++)
        if (dma::rule::is_candidate<int64_t>(j, P.evict[j], p_first)) candidates.push_back(j);
      for (size_t n = 0; n < candidates.size(); n += Bk)
        blocks.emplace_back(candidates.begin() + n,
                            candidates.begin() + std::min(candidates.size(), n + Bk));
    }

    // Pass 2: the online softmax over those blocks (m, l, acc per row of the query tile).
    std::vector<double> m(rows, NEG_INF), l(rows, 0.0), acc(rows * D, 0.0);
    for (const std::vector<int>& blk : blocks) {
      c.tiles_visited++;
      c.pairs_computed += static_cast<long>(rows) * static_cast<long>(blk.size());
      for (int r = 0; r < rows; r++) {
        const int i = i0 + r;
        // S = scale * Q_i K_blk^T + delta_blk, -inf where not kept
        std::vector<double> S(blk.size());
        double tile_max = NEG_INF;
        for (size_t cc = 0; cc < blk.size(); cc++) {
          const int j = blk[cc];
          double dot = 0;
          for (int d = 0; d < D; d++) dot += P.q[i * D + d] * P.k[j * D + d];
          S[cc] = kept(i, j) ? scale * dot + P.delta[j] : NEG_INF;
          c.pairs_kept += kept(i, j);
          tile_max = std::fmax(tile_max, S[cc]);
        }
        const double m_new = std::fmax(m[r], tile_max);
        const double alpha = m_new == NEG_INF ? 1.0 : std::exp(m[r] - m_new);
        l[r] *= alpha;
        for (int d = 0; d < D; d++) acc[r * D + d] *= alpha;
        for (size_t cc = 0; cc < blk.size(); cc++) {
          if (S[cc] == NEG_INF) continue;  // p = 0 exactly: nothing to add (step 6)
          const double p = std::exp(S[cc] - m_new);
          l[r] += p;
          for (int d = 0; d < D; d++) acc[r * D + d] += p * P.v[blk[cc] * D + d];
        }
        m[r] = m_new;
      }
    }
    // Pass 3: normalise. Every query keeps at least its own key, so l > 0.
    for (int r = 0; r < rows; r++) {
      for (int d = 0; d < D; d++) out.o[(i0 + r) * D + d] = acc[r * D + d] / l[r];
      out.lse[i0 + r] = m[r] + std::log(l[r]);
    }
  }
  return out;
}

// The plain two-pass masked attention, for checking.
Output two_pass(const Problem& P) {
  const int L = P.L, D = P.D;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  Output out{std::vector<double>(L * D, 0.0), std::vector<double>(L)};
  std::vector<double> s(L);
  for (int i = 0; i < L; i++) {
    double m = NEG_INF;
    for (int j = 0; j <= i; j++) {
      double dot = 0;
      for (int d = 0; d < D; d++) dot += P.q[i * D + d] * P.k[j * D + d];
      s[j] = dma::rule::is_kept<int64_t>(j, i, P.evict[j]) ? scale * dot + P.delta[j] : NEG_INF;
      m = std::fmax(m, s[j]);
    }
    double l = 0;
    for (int j = 0; j <= i; j++) l += std::exp(s[j] - m);
    for (int j = 0; j <= i; j++)
      for (int d = 0; d < D; d++) out.o[i * D + d] += std::exp(s[j] - m) / l * P.v[j * D + d];
    out.lse[i] = m + std::log(l);
  }
  return out;
}

double max_diff(const std::vector<double>& x, const std::vector<double>& y) {
  double m = 0;
  for (size_t e = 0; e < x.size(); e++) m = std::fmax(m, std::fabs(x[e] - y[e]));
  return m;
}

Problem make_problem(int L, int D, int w, uint64_t seed, bool local_head) {
  Rng rng{seed};
  Problem P{L, D, w, std::vector<double>(L * D), std::vector<double>(L * D),
            std::vector<double>(L * D), std::vector<double>(L), {}};
  for (double& x : P.q) x = rng.uniform();
  for (double& x : P.k) x = rng.uniform();
  for (double& x : P.v) x = rng.uniform();
  for (int j = 0; j < L; j++)  // random delta, or a local head: recent keys ranked higher
    P.delta[j] = local_head ? 0.05 * j + rng.uniform() : rng.uniform();
  P.evict = eviction_positions(P.delta, w);
  return P;
}

// Runs the three modes, prints the counters, checks the outputs against the two-pass version.
// Returns the work fractions (pairs computed / causal-dense pairs) of skip and gather.
bool run_modes(const Problem& P, int Bq, int Bk, double* skip_tiles, double* gather_work,
               Counters* gather_counters) {
  const Output ref = two_pass(P);
  bool ok = true;
  std::printf("  mode    tiles visited / causal    pairs computed / causal-dense    maxdiff o\n");
  for (Mode mode : {Mode::dense, Mode::skip, Mode::gather}) {
    Counters c;
    const Output out = tiled_forward(P, Bq, Bk, mode, c);
    const double err = std::max(max_diff(out.o, ref.o), max_diff(out.lse, ref.lse));
    const double tiles = static_cast<double>(c.tiles_visited) / c.tiles_dense;
    const double work = static_cast<double>(c.pairs_computed) / c.pairs_dense;
    std::printf("  %-6s  %6ld / %-6ld = %.3f    %9ld / %-9ld = %.3f     %.1e\n", mode_name(mode),
                c.tiles_visited, c.tiles_dense, tiles, c.pairs_computed, c.pairs_dense, work, err);
    if (mode == Mode::skip) *skip_tiles = tiles;
    if (mode == Mode::gather) {
      *gather_work = work;
      *gather_counters = c;
    }
    ok = ok && err < 1e-12;
  }
  return ok;
}


// ---------------------------------------------------------------------------------------------
// Part 5: candidate lists and slots (docs/design.md §2.8, §2.9).

struct Table {
  int T = 0, S = 0;       // query tiles, slots per tile (w + Bq: the bound of step 2.4)
  std::vector<int> slot;  // (T, S): the key in each slot, -1 empty
  std::vector<int> list;  // (T, S): the tile's candidates, fully kept first, then the others
  std::vector<int> n_alive, n_full;
  int key(int t, int s) const { return slot[t * S + s]; }
};

// Sweeps the query tiles in order: a key whose interval [j, e_j] ends before the tile frees its
// slot; the tile's own keys that are kept at all take the lowest free slots. By nesting, no key
// comes back later, so each key keeps one slot for its whole (contiguous) run of tiles.
Table build_table(const Problem& P, int Bq) {
  const int L = P.L;
  Table tb;
  tb.T = (L + Bq - 1) / Bq;
  tb.S = std::min(P.w + Bq, L);
  tb.slot.assign(tb.T * tb.S, -1);
  tb.list.assign(tb.T * tb.S, -1);
  tb.n_alive.assign(tb.T, 0);
  tb.n_full.assign(tb.T, 0);
  std::vector<int> row(tb.S, -1);
  for (int t = 0; t < tb.T; t++) {
    const int p_first = t * Bq, p_last = std::min(L, p_first + Bq) - 1;
    for (int& j : row)
      if (j >= 0 && P.evict[j] < p_first) j = -1;  // no query from here on keeps it
    for (int j = p_first; j <= p_last; j++)
      if (dma::rule::is_ever_kept<int64_t>(j, P.evict[j]))
        *std::find(row.begin(), row.end(), -1) = j;  // at most w + Bq candidates: a slot is free
    std::copy(row.begin(), row.end(), tb.slot.begin() + t * tb.S);
    int n = 0;
    for (int pass = 0; pass < 2; pass++)  // kept by every query of the tile first
      for (int j : row) {
        if (j < 0) continue;
        const bool full = j <= p_first && P.evict[j] >= p_last;
        if (full != (pass == 0)) continue;
        tb.list[t * tb.S + n++] = j;
        tb.n_full[t] += full;
      }
    tb.n_alive[t] = n;
  }
  return tb;
}

// The tile x slot table: a key is printed in every tile it is a candidate of, "*" on its last
// tile (the slot sweep writes its gradients when it moves past it), "." for an empty slot.
void print_table(const Table& tb, int Bq, int L) {
  std::printf("  tile  queries  |");
  for (int s = 0; s < tb.S; s++) std::printf("%4d", s);
  std::printf("   | list: fully kept | the rest\n");
  for (int t = 0; t < tb.T; t++) {
    std::printf("  %4d  %3d-%-3d  |", t, t * Bq, std::min(L, (t + 1) * Bq) - 1);
    for (int s = 0; s < tb.S; s++) {
      const int j = tb.key(t, s);
      const bool last = j >= 0 && (t + 1 == tb.T || tb.key(t + 1, s) != j);
      if (j < 0) std::printf("   .");
      else std::printf("%3d%c", j, last ? '*' : ' ');
    }
    std::printf("   |");
    for (int n = 0; n < tb.n_alive[t]; n++)
      std::printf("%s%d", n == tb.n_full[t] ? " | " : " ", tb.list[t * tb.S + n]);
    std::printf("\n");
  }
}

// ---------------------------------------------------------------------------------------------
// Part 6: the backward by slots (no atomics), and dQ by the lists.

struct Grads {
  std::vector<double> dq, dk, dv, ddelta;  // (L, D) x3, (L)
};

struct SweepCount {
  long pairs_swept = 0;   // (query, slot) pairs of the visited slot blocks, empty slots included
  long pairs_kept = 0;
  long blocks_visited = 0, blocks_skipped = 0;
  std::vector<int> writes;  // per key: how often its dk, dv, ddelta were written
};

Grads slot_backward(const Problem& P, const Output& fwd, const std::vector<double>& dout,
                    const Table& tb, int Bq, int Bk, SweepCount& n, bool print_block_0) {
  const int L = P.L, D = P.D;
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  Grads g{std::vector<double>(L * D, 0.0), std::vector<double>(L * D, 0.0),
          std::vector<double>(L * D, 0.0), std::vector<double>(L, 0.0)};
  n.writes.assign(L, 0);
  // In the forward pass o_i = sum_j p_ij v_j, so now D_i = do_i . o_i.
  std::vector<double> Drow(L, 0.0);
  for (int i = 0; i < L; i++)
    for (int d = 0; d < D; d++) Drow[i] += dout[i * D + d] * fwd.o[i * D + d];
  auto kept = [&](int i, int j) { return dma::rule::is_kept<int64_t>(j, i, P.evict[j]); };
  // p_ij recomputed from the saved lse, and ds_ij = p_ij (dp_ij - D_i), dp_ij = do_i . v_j
  auto p_and_ds = [&](int i, int j, double* p, double* ds) {
    double qk = 0, dp = 0;
    for (int d = 0; d < D; d++) {
      qk += P.q[i * D + d] * P.k[j * D + d];
      dp += dout[i * D + d] * P.v[j * D + d];
    }
    *p = std::exp(scale * qk + P.delta[j] - fwd.lse[i]);
    *ds = *p * (dp - Drow[i]);
  };

  // 1. dK, dV, ddelta, slot-major: the block's accumulators live across the query tiles. Only
  //    the slots some tile uses are swept (the largest list: fewer than w + Bq).
  int used = 0;
  for (int t = 0; t < tb.T; t++)
    for (int s = 0; s < tb.S; s++)
      if (tb.key(t, s) >= 0) used = std::max(used, s + 1);
  for (int s0 = 0; s0 < used; s0 += Bk) {
    const int width = std::min(Bk, used - s0);
    std::vector<int> held(width, -1);
    std::vector<double> dk(width * D, 0.0), dv(width * D, 0.0), dd(width, 0.0);
    std::vector<int> written_now;
    auto write = [&](int c) {  // key held[c] left its slot: every query that keeps it was seen
      const int j = held[c];
      for (int d = 0; d < D; d++) {
        g.dk[j * D + d] = dk[c * D + d];  // an assignment, not an addition: the only write
        g.dv[j * D + d] = dv[c * D + d];
        dk[c * D + d] = dv[c * D + d] = 0;
      }
      g.ddelta[j] = dd[c];
      dd[c] = 0;
      n.writes[j]++;
      written_now.push_back(j);
    };
    for (int t = 0; t <= tb.T; t++) {  // t = T: after the last tile, the survivors are written
      written_now.clear();
      bool occupied = false;
      for (int c = 0; c < width; c++) {
        const int j = t < tb.T ? tb.key(t, s0 + c) : -1;
        if (held[c] >= 0 && held[c] != j) write(c);
        held[c] = j;
        occupied = occupied || j >= 0;
      }
      if (print_block_0 && s0 == 0 && !written_now.empty()) {
        if (t < tb.T) std::printf("    slot block 0 (slots 0-%d), before tile %d: their last tile is over,"
                                  " it writes keys", width - 1, t);
        else std::printf("    slot block 0, after the last tile: it writes keys");
        for (int j : written_now) std::printf(" %d", j);
        std::printf("\n");
      }
      if (t == tb.T) break;
      if (!occupied) {
        n.blocks_skipped++;
        continue;
      }
      n.blocks_visited++;
      const int i0 = t * Bq, i1 = std::min(L, i0 + Bq);
      n.pairs_swept += static_cast<long>(i1 - i0) * width;
      for (int c = 0; c < width; c++) {
        const int j = held[c];
        if (j < 0) continue;
        for (int i = i0; i < i1; i++) {
          if (!kept(i, j)) continue;  // p = 0 exactly: no contribution (step 6)
          n.pairs_kept++;
          double p, ds;
          p_and_ds(i, j, &p, &ds);
          for (int d = 0; d < D; d++) {
            dv[c * D + d] += p * dout[i * D + d];
            dk[c * D + d] += scale * ds * P.q[i * D + d];
          }
          dd[c] += ds;
        }
      }
    }
  }

  // 2. dQ, query-major over the lists: each query tile reduces over its own candidates.
  for (int t = 0; t < tb.T; t++)
    for (int i = t * Bq; i < std::min(L, (t + 1) * Bq); i++)
      for (int n_ = 0; n_ < tb.n_alive[t]; n_++) {
        const int j = tb.list[t * tb.S + n_];
        // The head of the list (n_ < n_full) is kept by every query of the tile: no test there.
        if (n_ >= tb.n_full[t] && !kept(i, j)) continue;
        double p, ds;
        p_and_ds(i, j, &p, &ds);
        for (int d = 0; d < D; d++) g.dq[i * D + d] += scale * ds * P.k[j * D + d];
      }
  return g;
}

double max_rel(const std::vector<double>& x, const std::vector<double>& ref) {
  double m = 0, r = 1e-300;
  for (size_t e = 0; e < x.size(); e++) {
    m = std::fmax(m, std::fabs(x[e] - ref[e]));
    r = std::fmax(r, std::fabs(ref[e]));
  }
  return m / r;
}

// Runs Parts 5 and 6 on one problem; prints the table when asked. True when everything agrees.
bool lists_and_slots(const Problem& P, int Bq, int Bk, bool verbose) {
  const int L = P.L, D = P.D;
  const Table tb = build_table(P, Bq);
  if (verbose) print_table(tb, Bq, L);

  // The project's table must be the same, bit for bit (the GPU builds it too).
  const dma::CandidateTable lib = dma::candidate_table(P.evict.data(), L, L, true, P.w, Bq);
  const bool same_table = std::equal(tb.slot.begin(), tb.slot.end(), lib.slot_key.begin()) &&
                          std::equal(tb.list.begin(), tb.list.end(), lib.list.begin()) &&
                          std::equal(tb.n_full.begin(), tb.n_full.end(), lib.n_full.begin()) &&
                          std::equal(tb.n_alive.begin(), tb.n_alive.end(), lib.n_alive.begin());
  const int max_alive = *std::max_element(tb.n_alive.begin(), tb.n_alive.end());
  std::printf("  slots used %lld = the largest list %d (bound w + Bq = %d); "
              "dma::candidate_table identical: %s\n",
              static_cast<long long>(lib.slots_used), max_alive, P.w + Bq, same_table ? "yes" : "NO");

  // The backward, three ways: the scalar reference, the slot sweep above, the library's.
  if (verbose) std::printf("Part 6: the backward by slots, blocks of Bk = %d slots\n", Bk);
  Rng rng{99};
  std::vector<double> dout(L * D);
  for (double& x : dout) x = rng.uniform();
  const Output fwd = two_pass(P);
  SweepCount n;
  const Grads mine = slot_backward(P, fwd, dout, tb, Bq, Bk, n, verbose);

  dma::Shape shape;
  shape.Lq = shape.Lk = L;
  shape.D = D;
  dma::Options opt;
  opt.window = P.w;
  const dma::ForwardResult<double> ref_fwd{fwd.o, fwd.lse};
  const dma::AttentionGrads<double> ref = dma::reference_backward(
      shape, opt, P.q, P.k, P.v, P.delta, dma::mask_from_evict(shape, opt, P.evict), ref_fwd, dout);
  dma::TileConfig tc;
  tc.Bq = Bq;
  tc.Bk = Bk;
  tc.mode = dma::TileMode::gather;
  dma::TileCounters fc, bc;
  const dma::ForwardResult<double> t_fwd =
      dma::tiled_forward(shape, opt, tc, P.q, P.k, P.v, P.delta, P.evict, &fc);
  const dma::AttentionGrads<double> lib_g =
      dma::tiled_backward(shape, opt, tc, P.q, P.k, P.v, P.delta, P.evict, t_fwd, dout, &bc);

  using Vec = std::vector<double>;
  const Vec* here[] = {&mine.dq, &mine.dk, &mine.dv, &mine.ddelta};
  const Vec* lib_of[] = {&lib_g.dq, &lib_g.dk, &lib_g.dv, &lib_g.ddelta};
  const Vec* ref_of[] = {&ref.dq, &ref.dk, &ref.dv, &ref.ddelta};
  double err_mine = 0, err_lib = 0;
  for (int e = 0; e < 4; e++) {
    err_mine = std::fmax(err_mine, max_rel(*here[e], *ref_of[e]));
    err_lib = std::fmax(err_lib, max_rel(*lib_of[e], *ref_of[e]));
  }
  // Every key that is a candidate of some tile is written exactly once, every other key never.
  long alive = 0, once = 0, twice = 0;
  std::vector<bool> candidate(L, false);
  for (int j : tb.slot)
    if (j >= 0) candidate[j] = true;
  for (int j = 0; j < L; j++) {
    alive += candidate[j];
    once += candidate[j] && n.writes[j] == 1;
    twice += n.writes[j] > 1 || (!candidate[j] && n.writes[j] > 0);
  }
  std::printf("  keys alive %ld, written exactly once %ld, wrongly %ld; library key writes %lld\n",
              alive, once, twice, static_cast<long long>(bc.key_writes));
  std::printf("  slot sweep: %ld slot blocks visited, %ld skipped (all slots empty); pairs swept %ld"
              " = %.3f x the %ld kept\n", n.blocks_visited, n.blocks_skipped, n.pairs_swept,
              static_cast<double>(n.pairs_swept) / n.pairs_kept, n.pairs_kept);
  std::printf("  library: swept %lld, kept %lld, list chunks without the element test %lld of %lld\n",
              static_cast<long long>(bc.pairs_swept), static_cast<long long>(bc.pairs_kept),
              static_cast<long long>(fc.chunks_unmasked), static_cast<long long>(fc.tiles_visited));
  std::printf("  max rel error vs the reference backward: here %.1e, dma::tiled_backward %.1e\n",
              err_mine, err_lib);
  return same_table && once == alive && twice == 0 && bc.key_writes == alive &&
         bc.pairs_swept == n.pairs_swept && bc.pairs_kept == n.pairs_kept &&
         bc.slot_blocks_visited == n.blocks_visited && lib.slots_used == max_alive &&
         max_alive <= P.w + Bq && err_mine < 1e-12 && err_lib < 1e-12;
}
}  // namespace

int main() {
  std::printf("Step 7: tiles, the online softmax, and tile skipping vs gathering\n\n");
  bool ok = online_softmax_demo();

  // Part 2: random delta, the case the fast paths have to face.
  const int L = 2048, D = 16, w = 128, Bq = 64, Bk = 64;
  std::printf("Part 2: random delta, L = %d, D = %d, w = %d, tiles Bq = Bk = %d\n", L, D, w, Bq);
  const Problem random = make_problem(L, D, w, 7, false);
  double skip_tiles = 0, gather_work = 0;
  Counters gc;
  ok = run_modes(random, Bq, Bk, &skip_tiles, &gather_work, &gc) && ok;
  const double density = static_cast<double>(gc.pairs_kept) / gc.pairs_dense;
  std::printf("  true density (kept pairs / causal-dense pairs) = %.3f\n", density);
  std::printf("  Why skip does nothing here: the last query tile keeps the top %d of %d keys, spread\n"
              "  evenly, so each of its %d key tiles holds about w * Bk / L = %.0f kept keys: none is "
              "empty.\n  Gathering touches at most w + Bq = %d keys per query tile instead.\n",
              w, L, L / Bk, static_cast<double>(w) * Bk / L, w + Bq);
  // "Nearly every causal tile" and "about the true density" (candidates add at most Bq keys per
  // query tile to the w each query keeps, and the first tiles are dense anyway).
  ok = ok && skip_tiles > 0.9 && gather_work < 2.0 * density && gather_work < 0.3;

  // Part 3: a local head (delta rises with position): old tiles empty out, skipping pays.
  std::printf("\nPart 3: structured delta (a local head: delta = 0.05 j + noise), same sizes\n");
  const Problem local = make_problem(L, D, w, 8, true);
  double local_skip = 0, local_gather = 0;
  Counters lc;
  ok = run_modes(local, Bq, Bk, &local_skip, &local_gather, &lc) && ok;
  ok = ok && local_skip < 0.3;

  // Part 4: the project's tiled implementation must do exactly the same work and give the same o.
  dma::Shape shape;
  shape.Lq = L;
  shape.Lk = L;
  shape.D = D;
  dma::Options opt;
  opt.window = w;
  const std::vector<int64_t> lib_evict = dma::evict_positions(shape, w, random.delta);
  std::printf("\nPart 4: the project's dma::tiled_forward on the random-delta problem\n");
  std::printf("  dma::evict_positions equals the definition: %s\n",
              lib_evict == random.evict ? "yes" : "NO");
  ok = ok && lib_evict == random.evict;
  const Output ref = two_pass(random);
  for (dma::TileMode mode : {dma::TileMode::dense, dma::TileMode::skip, dma::TileMode::gather}) {
    dma::TileConfig tc;
    tc.Bq = Bq;
    tc.Bk = Bk;
    tc.mode = mode;
    dma::TileCounters lib;
    const dma::ForwardResult<double> res =
        dma::tiled_forward(shape, opt, tc, random.q, random.k, random.v, random.delta,
                           random.evict, &lib);
    Counters mine;
    const Mode same_mode = mode == dma::TileMode::dense  ? Mode::dense
                           : mode == dma::TileMode::skip ? Mode::skip
                                                         : Mode::gather;
    tiled_forward(random, Bq, Bk, same_mode, mine);
    const bool same = lib.tiles_dense == mine.tiles_dense &&
                      lib.tiles_visited == mine.tiles_visited &&
                      lib.pairs_computed == mine.pairs_computed &&
                      lib.pairs_dense == mine.pairs_dense && lib.pairs_kept == mine.pairs_kept;
    const double err = std::max(max_diff(res.o, ref.o), max_diff(res.lse, ref.lse));
    std::printf("  %-6s work fraction %.3f (here %.3f), counters identical: %s, maxdiff o %.1e\n",
                dma::tile_mode_name(mode), lib.work_fraction(),
                static_cast<double>(mine.pairs_computed) / mine.pairs_dense, same ? "yes" : "NO",
                err);
    if (mode == dma::TileMode::gather)
      std::printf("  gather: largest candidate set %lld keys (bound w + Bq = %d)\n",
                  static_cast<long long>(lib.max_candidates), w + Bq);
    ok = ok && same && err < 1e-12 && lib.max_candidates <= w + Bq;
  }

  // Part 5 and 6: the lists and slots of a small problem, printed, then the large one's counters.
  const int Ls = 48, ws = 6, Bqs = 8, Bks = 4;
  std::printf("\nPart 5: candidate lists and slots, L = %d, w = %d, Bq = %d (random delta)\n", Ls, ws, Bqs);
  std::printf("  Each key stays in one slot for its run of tiles; * marks its last tile.\n");
  const Problem small = make_problem(Ls, 4, ws, 11, false);
  ok = lists_and_slots(small, Bqs, Bks, true) && ok;
  std::printf("\nParts 5 and 6 on the random-delta problem of Part 2 (L = %d, w = %d, Bq = Bk = %d)\n",
              L, w, Bq);
  ok = lists_and_slots(random, Bq, Bk, false) && ok;

  std::printf("\n%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
