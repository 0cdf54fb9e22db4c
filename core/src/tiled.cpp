// The tiled CPU implementation: the GPU algorithm, one tile at a time, on the CPU.
//
// For every (b, hq) and every query tile Q_i (Bq rows) the forward walks a list of key blocks K_j
// with the online softmax of FlashAttention (running max m, running sum l, unnormalised acc):
//   S = scale * Q_i K_j^T + delta_j,  element mask j <= p_i <= e_j applied in place (-inf)
//   m_new = max(m, rowmax S),  alpha = exp(m - m_new),  P = exp(S - m_new)
//   l = alpha l + rowsum P,    acc = alpha acc + P V_j
// The three modes differ only in which key blocks a query tile walks (see key_blocks below).
//
// The backward recomputes P from the saved lse (FlashAttention-2). Dense and skip walk the
// forward's blocks and add every block's dK, dV, ddelta into place (scatter_backward: the atomics
// of a GPU kernel). Gather is the atomic-free backward of docs/design.md §2.9 (slot_backward):
// dK, dV, ddelta by a sweep over the slots of the candidate table, each key written once, and dQ
// by a query-major pass over the forward's lists.
#include "dma/tiled.hpp"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>

#include "dma/candidates.hpp"
#include "dma/mask.hpp"

namespace dma {

const char* tile_mode_name(TileMode m) {
  switch (m) {
    case TileMode::dense: return "dense";
    case TileMode::skip: return "skip";
    case TileMode::gather: return "gather";
  }
  return "?";
}

namespace {

template <typename T>
using Mat = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
template <typename T>
using Vec = Eigen::Matrix<T, Eigen::Dynamic, 1>;
template <typename T>
using CMap = Eigen::Map<const Mat<T>>;
template <typename T>
using CVecMap = Eigen::Map<const Vec<T>>;

// One query tile of one (b, hq): its rows and where its mask lives.
struct QueryTile {
  int64_t b, hq, hk, hd;
  int64_t i0, rows;         // queries i0 .. i0+rows-1 (query tile i0 / Bq)
  const int64_t* evict_bh;  // e_j of the (b, delta head), Lk entries
};

// A block of keys a query tile walks (at most Bk of them).
struct KeyBlock {
  std::vector<int64_t> keys;
  bool masked = true;  // false: every query of the tile keeps every key (fully kept keys only)
};

// The candidate table of every (b, delta head) (gather only): what the GPU's mask phase emits.
std::vector<CandidateTable> candidate_tables(const Shape& s, const Options& opt, int64_t Bq,
                                             const std::vector<int64_t>& evict) {
  std::vector<CandidateTable> tables;
  tables.reserve(static_cast<size_t>(s.B * s.Hd));
  for (int64_t bd = 0; bd < s.B * s.Hd; ++bd)
    tables.push_back(candidate_table(&evict[bd * s.Lk], s.Lq, s.Lk, opt.causal, opt.window, Bq));
  return tables;
}

// The key blocks a query tile walks.
//   dense:  every Bk-tile that holds an allowed key (j <= p_last), as a causal kernel would
//   skip:   those of them that hold at least one kept (i, j)
//   gather: the tile's list from the candidate table (fully kept keys first), cut into chunks of
//           Bk; a chunk inside the fully kept head needs no element mask
// Also counts the work against a causal-dense kernel with the same tiles.
std::vector<KeyBlock> key_blocks(const Shape& s, const Options& opt, const TileConfig& tc,
                                 const QueryTile& t, const CandidateTable* table,
                                 TileCounters& c) {
  const int64_t q_last = t.i0 + t.rows - 1;
  const int64_t p_last = query_position(s, opt.causal, q_last);
  std::vector<KeyBlock> blocks;
  auto range = [](int64_t first, int64_t last) {
    KeyBlock blk;
    for (int64_t j = first; j <= last; ++j) blk.keys.push_back(j);
    return blk;
  };
  for (int64_t k0 = 0; k0 <= p_last; k0 += tc.Bk) {  // the causal-dense tiles
    const int64_t k_last = std::min(k0 + tc.Bk, s.Lk) - 1;
    c.tiles_dense += 1;
    c.pairs_dense += t.rows * (k_last - k0 + 1);
    if (tc.mode == TileMode::dense) {
      blocks.push_back(range(k0, k_last));
    } else if (tc.mode == TileMode::skip) {
      if (tile_has_kept_key(s, opt, t.evict_bh, t.i0, q_last, k0, k_last))
        blocks.push_back(range(k0, k_last));
      else
        c.tiles_skipped += 1;
    }
  }
  if (tc.mode == TileMode::gather) {
    const int64_t qt = t.i0 / tc.Bq;
    const int32_t* list = &table->list[qt * table->stride];
    const int64_t n_alive = table->n_alive[qt], n_full = table->n_full[qt];
    c.keys_gathered += n_alive;
    c.keys_full += n_full;
    c.max_candidates = std::max(c.max_candidates, n_alive);
    c.slots_used = std::max(c.slots_used, table->slots_used);
    for (int64_t n0 = 0; n0 < n_alive; n0 += tc.Bk) {
      const int64_t n1 = std::min(n_alive, n0 + tc.Bk);
      KeyBlock blk;
      blk.keys.assign(list + n0, list + n1);
      blk.masked = n1 > n_full;
      (blk.masked ? c.chunks_masked : c.chunks_unmasked) += 1;
      blocks.push_back(std::move(blk));
    }
  }
  for (const auto& blk : blocks) {
    c.tiles_visited += 1;
    c.pairs_computed += t.rows * static_cast<int64_t>(blk.keys.size());
  }
  return blocks;
}

// Copies rows `rows` of a (L, D) matrix into a compact block: the "load into shared memory".
template <typename T>
Mat<T> gather_rows(const T* x_bh, const std::vector<int64_t>& rows, int64_t D) {
  Mat<T> out(static_cast<int64_t>(rows.size()), D);
  for (size_t r = 0; r < rows.size(); ++r)
    for (int64_t d = 0; d < D; ++d) out(static_cast<int64_t>(r), d) = x_bh[rows[r] * D + d];
  return out;
}

// S = scale * Q_i K_blk^T + delta_blk with the element mask applied (-inf where not kept), or
// without the test for a block of fully kept keys; counts the kept pairs.
template <typename T>
Mat<T> masked_logits(const Shape& s, const Options& opt, const QueryTile& t, const Mat<T>& Qi,
                     const Mat<T>& Kb, const KeyBlock& blk, const T* delta_bh, TileCounters& c) {
  const T scale = static_cast<T>(opt.softmax_scale(s));
  Mat<T> S = scale * (Qi * Kb.transpose());
  for (int64_t r = 0; r < t.rows; ++r) {
    const int64_t p = query_position(s, opt.causal, t.i0 + r);
    for (size_t cc = 0; cc < blk.keys.size(); ++cc) {
      const int64_t j = blk.keys[cc];
      const auto col = static_cast<int64_t>(cc);
      if (!blk.masked || is_kept(j, p, t.evict_bh[j])) {
        S(r, col) += delta_bh[j];
        c.pairs_kept += 1;
      } else {
        S(r, col) = -std::numeric_limits<T>::infinity();
      }
    }
  }
  return S;
}

QueryTile make_tile(const Shape& s, int64_t b, int64_t hq, int64_t i0, int64_t Bq,
                    const std::vector<int64_t>& evict) {
  const int64_t hd = s.delta_head(hq);
  return QueryTile{b, hq, s.kv_head(hq), hd, i0, std::min(Bq, s.Lq - i0),
                   &evict[(b * s.Hd + hd) * s.Lk]};
}

void check_tiles(const TileConfig& tc) {
  if (tc.Bq < 1 || tc.Bk < 1)
    throw Error("tiles: Bq = " + std::to_string(tc.Bq) + ", Bk = " + std::to_string(tc.Bk) +
                " (both must be >= 1)");
  if (tc.span_tiles < 0)
    throw Error("tiles: span_tiles = " + std::to_string(tc.span_tiles) + " (0: one span, or >= 1)");
}

// What the backward reads, in one place.
template <typename T>
struct BackwardInputs {
  const Shape& s;
  const Options& opt;
  const std::vector<T>& q;      // (B,Hq,Lq,D)
  const std::vector<T>& k;      // (B,Hkv,Lk,D)
  const std::vector<T>& v;      // (B,Hkv,Lk,D)
  const std::vector<T>& delta;  // (B,Hd,Lk)
  const std::vector<T>& dout;   // (B,Hq,Lq,D)
  const std::vector<int64_t>& evict;  // (B,Hd,Lk)
  const ForwardResult<T>& fwd;
  std::vector<T> D_row;  // (B,Hq,Lq): D_i = do_i . o_i
};

// In the forward pass o_i = sum_j p_ij v_j, so now D_i = do_i . o_i (FlashAttention-2's
// preprocessing), for every (b, hq, i).
template <typename T>
std::vector<T> row_dots(const Shape& s, const std::vector<T>& dout, const std::vector<T>& o) {
  std::vector<T> D_row(static_cast<size_t>(s.lse_numel()));
  for (int64_t row = 0; row < s.lse_numel(); ++row) {
    T acc = 0;
    for (int64_t d = 0; d < s.D; ++d) acc += dout[row * s.D + d] * o[row * s.D + d];
    D_row[row] = acc;
  }
  return D_row;
}

// The query-major pass of the backward: for every query tile and each of its key blocks (the
// forward's blocks, or with `tables` the tile's candidate list), P = exp(S - lse), exactly 0 on
// masked pairs, and dS = P * (dP - D) with dP = dO V_blk^T; dQ is summed here and written once per
// tile. `on_block(kv_off, blk, P, dS, Qi, dOi, ddelta_bh)` receives each block's P and dS for what
// else it makes of them (dense and skip: dK, dV, ddelta; gather: nothing, its slot sweep did that).
template <typename T, typename OnBlock>
void query_tile_backward(const BackwardInputs<T>& in, const TileConfig& tc,
                         const std::vector<CandidateTable>* tables, AttentionGrads<T>& g,
                         TileCounters& c, OnBlock on_block) {
  const Shape& s = in.s;
  const T scale = static_cast<T>(in.opt.softmax_scale(s));
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t hq = 0; hq < s.Hq; ++hq)
      for (int64_t i0 = 0; i0 < s.Lq; i0 += tc.Bq) {
        const QueryTile t = make_tile(s, b, hq, i0, tc.Bq, in.evict);
        const int64_t kv_off = (b * s.Hkv + t.hk) * s.Lk * s.D;
        const int64_t row0 = (b * s.Hq + hq) * s.Lq + i0;
        const T* delta_bh = &in.delta[(b * s.Hd + t.hd) * s.Lk];
        T* ddelta_bh = &g.ddelta[(b * s.Hd + t.hd) * s.Lk];
        const Mat<T> Qi = CMap<T>(&in.q[row0 * s.D], t.rows, s.D);
        const Mat<T> dOi = CMap<T>(&in.dout[row0 * s.D], t.rows, s.D);
        const Vec<T> lse_i = CVecMap<T>(&in.fwd.lse[row0], t.rows);
        const Vec<T> D_i = CVecMap<T>(&in.D_row[row0], t.rows);
        Mat<T> dQi = Mat<T>::Zero(t.rows, s.D);
        const CandidateTable* table = tables ? &(*tables)[b * s.Hd + t.hd] : nullptr;
        for (const auto& blk : key_blocks(s, in.opt, tc, t, table, c)) {
          const Mat<T> Kb = gather_rows(&in.k[kv_off], blk.keys, s.D);
          const Mat<T> Vb = gather_rows(&in.v[kv_off], blk.keys, s.D);
          // P = exp(S - lse): exactly 0 on masked pairs, so their ds and every gradient are 0
          Mat<T> P = masked_logits(s, in.opt, t, Qi, Kb, blk, delta_bh, c);
          for (int64_t r = 0; r < t.rows; ++r)
            for (int64_t cc = 0; cc < P.cols(); ++cc) P(r, cc) = std::exp(P(r, cc) - lse_i(r));
          // o = P V          ->  dP = dO V_blk^T
          const Mat<T> dP = dOi * Vb.transpose();
          // p = softmax(s)   ->  dS = P * (dP - D)
          const Mat<T> dS = (P.array() * (dP.colwise() - D_i).array()).matrix();
          // s = scale q.k + delta -> dQ += scale dS K_blk
          dQi.noalias() += scale * (dS * Kb);
          on_block(kv_off, blk, P, dS, Qi, dOi, ddelta_bh);
        }
        for (int64_t r = 0; r < t.rows; ++r)
          for (int64_t d = 0; d < s.D; ++d) g.dq[(row0 + r) * s.D + d] = dQi(r, d);
      }
}

// dense and skip: the forward's key blocks, dK, dV, ddelta added into place per block.
template <typename T>
void scatter_backward(const BackwardInputs<T>& in, const TileConfig& tc, AttentionGrads<T>& g,
                      TileCounters& c) {
  const Shape& s = in.s;
  const T scale = static_cast<T>(in.opt.softmax_scale(s));
  query_tile_backward(in, tc, nullptr, g, c,
                      [&](int64_t kv_off, const KeyBlock& blk, const Mat<T>& P, const Mat<T>& dS,
                          const Mat<T>& Qi, const Mat<T>& dOi, T* ddelta_bh) {
    // o = P V -> dV_blk = P^T dO;  s = scale q.k + delta -> dK_blk = scale dS^T Q, ddelta += colsum dS
    const Mat<T> dVb = P.transpose() * dOi;
    const Mat<T> dKb = scale * (dS.transpose() * Qi);
    const Vec<T> dS_colsum = dS.colwise().sum().transpose();
    for (size_t cc = 0; cc < blk.keys.size(); ++cc) {  // scatter back ("atomicAdd" on a GPU)
      const int64_t j = blk.keys[cc];
      const auto col = static_cast<int64_t>(cc);
      for (int64_t d = 0; d < s.D; ++d) {
        g.dk[kv_off + j * s.D + d] += dKb(col, d);
        g.dv[kv_off + j * s.D + d] += dVb(col, d);
      }
      ddelta_bh[j] += dS_colsum(col);
    }
  });
}

// gather, step 1 for one (b, delta head): dk_bh, dv_bh (Lk, D) receive the dk, dv that the query
// heads of delta head hd give (all of one kv head), ddelta_bh (Lk) the complete ddelta.
//
// For each block of Bk slots, the query tiles t = 0..T-1 in order. The block holds the
// accumulators dK_blk, dV_blk (n, D) and ddelta_blk (n) of the keys in its slots: the key of a
// slot stays there for its whole run of tiles (docs/design.md §2.9), so when slot_key changes
// between t-1 and t (or after the last tile) the old key has seen every query that keeps it, and
// its gradients are written, once, by assignment.
//
// With span_tiles > 0 the tiles are cut into spans, each swept from empty accumulators (one GPU
// block per slot block and span). A key in its slot at a span's first tile and at the tile before
// was written by an earlier span: this span's sums for it are carried, and added to its rows
// after every block and span is done, in span order.
template <typename T>
void slot_sweep(const BackwardInputs<T>& in, int64_t Bk, int64_t span_tiles, const CandidateTable& table,
                int64_t b, int64_t hd, T* dk_bh, T* dv_bh, T* ddelta_bh, TileCounters& c) {
  const Shape& s = in.s;
  const T scale = static_cast<T>(in.opt.softmax_scale(s));
  const int64_t group = s.Hq / s.Hd;  // query heads hd*group .. (hd+1)*group-1, one kv head
  const int64_t hk = s.kv_head(hd * group);
  const T* k_bh = &in.k[(b * s.Hkv + hk) * s.Lk * s.D];
  const T* v_bh = &in.v[(b * s.Hkv + hk) * s.Lk * s.D];
  const T* delta_bh = &in.delta[(b * s.Hd + hd) * s.Lk];
  const int64_t* evict_bh = &in.evict[(b * s.Hd + hd) * s.Lk];
  std::vector<uint8_t> written(static_cast<size_t>(s.Lk), 0);
  struct Carry {  // a key's sums from a span after the one that wrote its rows
    int32_t j;
    Vec<T> dk, dv;
    T ddelta;
  };
  std::vector<Carry> carries;
  const int64_t span = std::max<int64_t>(1, span_tiles > 0 ? span_tiles : table.tiles);
  // One pass per (slot block, span), a slot block's spans in order (on the GPU: a block each).
  for (int64_t s0 = 0; s0 < table.slots_used; s0 += Bk)
    for (int64_t t_begin = 0; t_begin < table.tiles; t_begin += span) {
      const int64_t n = std::min(Bk, table.slots_used - s0);  // slots s0 .. s0+n-1
      std::vector<int32_t> held(static_cast<size_t>(n), -1);  // the key each slot accumulates
      std::vector<uint8_t> carried(static_cast<size_t>(n), 0);  // ... and it lived before t_begin
      Mat<T> dKb = Mat<T>::Zero(n, s.D), dVb = Mat<T>::Zero(n, s.D);
      Vec<T> dDb = Vec<T>::Zero(n);
      auto write = [&](int64_t cc) {  // the key of slot s0 + cc left: its sums are complete
        const int32_t j = held[cc];
        if (carried[cc]) {
          carries.push_back({j, dKb.row(cc).transpose(), dVb.row(cc).transpose(), dDb(cc)});
        } else {
          if (written[j]) throw std::logic_error("slot sweep: key " + std::to_string(j) + " written twice");
          written[j] = 1;
          for (int64_t d = 0; d < s.D; ++d) {
            dk_bh[j * s.D + d] = dKb(cc, d);
            dv_bh[j * s.D + d] = dVb(cc, d);
          }
          ddelta_bh[j] = dDb(cc);
          c.key_writes += 1;
        }
        dKb.row(cc).setZero();
        dVb.row(cc).setZero();
        dDb(cc) = 0;
      };

      for (int64_t t = t_begin; t < std::min(t_begin + span, table.tiles); ++t) {
        const int32_t* keys = &table.slot_key[t * table.stride + s0];
        bool occupied = false;
        for (int64_t cc = 0; cc < n; ++cc) {
          if (held[cc] >= 0 && keys[cc] != held[cc]) write(cc);
          if (keys[cc] != held[cc])  // a new key; at the span's first tile it may be an old one
            carried[cc] = t == t_begin && t > 0 && keys[cc] >= 0 &&
                          table.slot_key[(t - 1) * table.stride + s0 + cc] == keys[cc];
          held[cc] = keys[cc];
          occupied = occupied || keys[cc] >= 0;
        }
        if (!occupied) {
          c.slot_blocks_skipped += group;
          continue;
        }
        // K_blk, V_blk (n, D) of the slots' keys; an empty slot is a zero row, masked below.
        Mat<T> Kb = Mat<T>::Zero(n, s.D), Vb = Mat<T>::Zero(n, s.D);
        for (int64_t cc = 0; cc < n; ++cc)
          if (keys[cc] >= 0)
            for (int64_t d = 0; d < s.D; ++d) {
              Kb(cc, d) = k_bh[keys[cc] * s.D + d];
              Vb(cc, d) = v_bh[keys[cc] * s.D + d];
            }
        const int64_t i0 = t * table.Bq, rows = std::min(table.Bq, s.Lq - i0);
        for (int64_t hq = hd * group; hq < (hd + 1) * group; ++hq) {
          const int64_t row0 = (b * s.Hq + hq) * s.Lq + i0;
          const Mat<T> Qi = CMap<T>(&in.q[row0 * s.D], rows, s.D);
          const Mat<T> dOi = CMap<T>(&in.dout[row0 * s.D], rows, s.D);
          const Vec<T> D_i = CVecMap<T>(&in.D_row[row0], rows);
          // In the forward pass s = scale q.k + delta and p = exp(s - lse) on kept pairs (0 on the
          // others and on empty slots), so now P again, for this tile's rows and the block's slots:
          Mat<T> P = scale * (Qi * Kb.transpose());
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t p = query_position(s, in.opt.causal, i0 + r);
            for (int64_t cc = 0; cc < n; ++cc) {
              const int64_t j = keys[cc];
              P(r, cc) = j >= 0 && is_kept(j, p, evict_bh[j])
                             ? std::exp(P(r, cc) + delta_bh[j] - in.fwd.lse[row0 + r])
                             : T(0);
            }
          }
          // o = P V          ->  dV_blk += P^T dO,  dP = dO V_blk^T
          dVb.noalias() += P.transpose() * dOi;
          const Mat<T> dP = dOi * Vb.transpose();
          // p = softmax(s)   ->  dS = P * (dP - D)
          const Mat<T> dS = (P.array() * (dP.colwise() - D_i).array()).matrix();
          // s = scale q.k + delta -> dK_blk += scale dS^T Q, ddelta_blk += colsum dS
          dKb.noalias() += scale * (dS.transpose() * Qi);
          dDb += dS.colwise().sum().transpose();
          c.slot_blocks_visited += 1;
          c.pairs_swept += rows * n;
        }
      }
      for (int64_t cc = 0; cc < n; ++cc)  // the keys still alive after the span's last tile
        if (held[cc] >= 0) write(cc);
    }

  // The carried sums, in span order (one key lives in one slot block, whose spans ran in order).
  for (const Carry& cr : carries) {
    if (!written[cr.j])
      throw std::logic_error("slot sweep: key " + std::to_string(cr.j) + " carried, never written");
    for (int64_t d = 0; d < s.D; ++d) {
      dk_bh[cr.j * s.D + d] += cr.dk(d);
      dv_bh[cr.j * s.D + d] += cr.dv(d);
    }
    ddelta_bh[cr.j] += cr.ddelta;
    c.key_carries += 1;
  }
}

// gather: the atomic-free backward (docs/design.md §2.9).
template <typename T>
void slot_backward(const BackwardInputs<T>& in, const TileConfig& tc, AttentionGrads<T>& g,
                   TileCounters& c) {
  const Shape& s = in.s;
  const std::vector<CandidateTable> tables = candidate_tables(s, in.opt, tc.Bq, in.evict);

  // 1. dK, dV, ddelta by the slot sweep, per (b, delta head). With Hd = Hkv a delta head's query
  //    heads are exactly those of its kv head, so the sweep writes dk, dv in place; with
  //    Hd = Hq > Hkv each delta head has slots of its own and writes a partial dk, dv (B,Hd,Lk,D).
  const bool partials = s.Hd != s.Hkv;
  std::vector<T> dk_part, dv_part;
  if (partials) {
    dk_part.assign(static_cast<size_t>(s.B * s.Hd * s.Lk * s.D), T(0));
    dv_part.assign(dk_part.size(), T(0));
  }
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t hd = 0; hd < s.Hd; ++hd) {
      const int64_t off = ((partials ? b * s.Hd : b * s.Hkv) + hd) * s.Lk * s.D;
      T* dk_bh = partials ? &dk_part[off] : &g.dk[off];
      T* dv_bh = partials ? &dv_part[off] : &g.dv[off];
      slot_sweep(in, tc.Bk, tc.span_tiles, tables[b * s.Hd + hd], b, hd, dk_bh, dv_bh,
                 &g.ddelta[(b * s.Hd + hd) * s.Lk], c);
    }

  // 2. dQ, query-major over the forward's lists: S, P, dP, dS recomputed.
  query_tile_backward(in, tc, &tables, g, c,
                      [](int64_t, const KeyBlock&, const Mat<T>&, const Mat<T>&, const Mat<T>&,
                         const Mat<T>&, T*) {});

  // 3. Hd = Hq > Hkv: a kv head's dk, dv sum its delta heads' partials, in increasing hd.
  if (partials)
    for (int64_t b = 0; b < s.B; ++b)
      for (int64_t hd = 0; hd < s.Hd; ++hd) {
        const int64_t hk = s.kv_head(hd);  // Hd = Hq: delta head hd is query head hd
        const int64_t src = (b * s.Hd + hd) * s.Lk * s.D, dst = (b * s.Hkv + hk) * s.Lk * s.D;
        for (int64_t e = 0; e < s.Lk * s.D; ++e) {
          g.dk[dst + e] += dk_part[src + e];
          g.dv[dst + e] += dv_part[src + e];
        }
      }
}

}  // namespace

template <typename T>
ForwardResult<T> tiled_forward(const Shape& s, const Options& opt, const TileConfig& tc,
                               const std::vector<T>& q, const std::vector<T>& k,
                               const std::vector<T>& v, const std::vector<T>& delta,
                               const std::vector<int64_t>& evict, TileCounters* counters) {
  // q is (B,Hq,Lq,D), k and v are (B,Hkv,Lk,D), delta and evict are (B,Hd,Lk)
  check_tiles(tc);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  TileCounters c;
  ForwardResult<T> out;
  out.o.assign(s.q_numel(), T(0));
  out.lse.assign(s.lse_numel(), T(0));
  const std::vector<CandidateTable> tables =
      tc.mode == TileMode::gather ? candidate_tables(s, opt, tc.Bq, evict) : std::vector<CandidateTable>{};
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t hq = 0; hq < s.Hq; ++hq)
      for (int64_t i0 = 0; i0 < s.Lq; i0 += tc.Bq) {
        const QueryTile t = make_tile(s, b, hq, i0, tc.Bq, evict);
        const T* k_bh = &k[(b * s.Hkv + t.hk) * s.Lk * s.D];
        const T* v_bh = &v[(b * s.Hkv + t.hk) * s.Lk * s.D];
        const T* delta_bh = &delta[(b * s.Hd + t.hd) * s.Lk];
        const CandidateTable* table = tables.empty() ? nullptr : &tables[b * s.Hd + t.hd];
        const Mat<T> Qi = CMap<T>(&q[((b * s.Hq + hq) * s.Lq + i0) * s.D], t.rows, s.D);
        Vec<T> m = Vec<T>::Constant(t.rows, neg_inf);  // running row max
        Vec<T> l = Vec<T>::Zero(t.rows);               // running row sum of exp(S - m)
        Mat<T> acc = Mat<T>::Zero(t.rows, s.D);        // running unnormalised P V

        for (const auto& blk : key_blocks(s, opt, tc, t, table, c)) {
          const Mat<T> Kb = gather_rows(k_bh, blk.keys, s.D);
          const Mat<T> Vb = gather_rows(v_bh, blk.keys, s.D);
          Mat<T> P = masked_logits(s, opt, t, Qi, Kb, blk, delta_bh, c);
          for (int64_t r = 0; r < t.rows; ++r) {
            const T m_new = std::max(m(r), P.row(r).maxCoeff());
            // A row that has seen only masked keys so far has m_new = -inf: it stays empty.
            const T alpha = m_new == neg_inf ? T(1) : std::exp(m(r) - m_new);
            for (int64_t cc = 0; cc < P.cols(); ++cc)
              P(r, cc) = P(r, cc) == neg_inf ? T(0) : std::exp(P(r, cc) - m_new);
            l(r) = alpha * l(r) + P.row(r).sum();
            acc.row(r) *= alpha;
            m(r) = m_new;
          }
          acc.noalias() += P * Vb;
        }
        // Every query keeps at least one key (docs/design.md §1.6), so l > 0 on every row.
        for (int64_t r = 0; r < t.rows; ++r) {
          const int64_t row = (b * s.Hq + hq) * s.Lq + i0 + r;
          for (int64_t d = 0; d < s.D; ++d) out.o[row * s.D + d] = acc(r, d) / l(r);
          out.lse[row] = m(r) + std::log(l(r));
        }
      }
  if (counters) *counters = c;
  return out;
}

template <typename T>
AttentionGrads<T> tiled_backward(const Shape& s, const Options& opt, const TileConfig& tc,
                                 const std::vector<T>& q, const std::vector<T>& k,
                                 const std::vector<T>& v, const std::vector<T>& delta,
                                 const std::vector<int64_t>& evict, const ForwardResult<T>& fwd,
                                 const std::vector<T>& dout, TileCounters* counters) {
  // The forward in reverse, tile by tile, P recomputed from the saved lse instead of the running
  // max and sum. q, do, dq are (B,Hq,Lq,D), k, v, dk, dv (B,Hkv,Lk,D), delta, ddelta (B,Hd,Lk).
  check_tiles(tc);
  const BackwardInputs<T> in{s, opt, q, k, v, delta, dout, evict, fwd, row_dots(s, dout, fwd.o)};
  TileCounters c;
  AttentionGrads<T> g;
  g.dq.assign(s.q_numel(), T(0));
  g.dk.assign(s.kv_numel(), T(0));
  g.dv.assign(s.kv_numel(), T(0));
  g.ddelta.assign(s.delta_numel(), T(0));
  if (tc.mode == TileMode::gather)
    slot_backward(in, tc, g, c);
  else
    scatter_backward(in, tc, g, c);
  if (counters) *counters = c;
  return g;
}

#define DMA_INSTANTIATE(T)                                                                     \
  template ForwardResult<T> tiled_forward(const Shape&, const Options&, const TileConfig&,     \
                                          const std::vector<T>&, const std::vector<T>&,        \
                                          const std::vector<T>&, const std::vector<T>&,        \
                                          const std::vector<int64_t>&, TileCounters*);         \
  template AttentionGrads<T> tiled_backward(                                                   \
      const Shape&, const Options&, const TileConfig&, const std::vector<T>&,                  \
      const std::vector<T>&, const std::vector<T>&, const std::vector<T>&,                     \
      const std::vector<int64_t>&, const ForwardResult<T>&, const std::vector<T>&, TileCounters*);
DMA_INSTANTIATE(float)
DMA_INSTANTIATE(double)
#undef DMA_INSTANTIATE

}  // namespace dma
