// The tiled CPU implementation: the GPU algorithm, one tile at a time, on the CPU.
//
// For every (b, hq) and every query tile Q_i (Bq rows) the forward walks a list of key blocks K_j
// with the online softmax of FlashAttention (running max m, running sum l, unnormalised acc):
//   S = scale * Q_i K_j^T + delta_j,  element mask j <= p_i <= e_j applied in place (-inf)
//   m_new = max(m, rowmax S),  alpha = exp(m - m_new),  P = exp(S - m_new)
//   l = alpha l + rowsum P,    acc = alpha acc + P V_j
// and the backward walks the same blocks, recomputing P from the saved lse (FlashAttention-2).
// The three modes differ only in which key blocks a query tile walks (see key_blocks below).
#include "dma/tiled.hpp"

#include <Eigen/Dense>
#include <algorithm>
#include <cmath>
#include <limits>

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

// One query tile of one (b, hq): its rows and where its mask lives.
struct QueryTile {
  int64_t b, hq, hk, hd;
  int64_t i0, rows;         // queries i0 .. i0+rows-1
  const int64_t* evict_bh;  // e_j of the (b, delta head), Lk entries
};

// The key blocks a query tile walks, each a list of key indices (at most Bk of them).
//   dense:  every Bk-tile that holds an allowed key (j <= p_last), as a causal kernel would
//   skip:   those of them that hold at least one kept (i, j)
//   gather: the candidate keys of the tile (<= w + Bq), cut into chunks of Bk
// Also counts the work against a causal-dense kernel with the same tiles.
std::vector<std::vector<int64_t>> key_blocks(const Shape& s, const Options& opt,
                                             const TileConfig& tc, const QueryTile& t,
                                             TileCounters& c) {
  const int64_t q_last = t.i0 + t.rows - 1;
  const int64_t p_last = query_position(s, opt.causal, q_last);
  std::vector<std::vector<int64_t>> blocks;
  auto range = [](int64_t first, int64_t last) {
    std::vector<int64_t> keys;
    for (int64_t j = first; j <= last; ++j) keys.push_back(j);
    return keys;
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
    const std::vector<int64_t> cand = candidate_keys(s, opt, t.evict_bh, t.i0, q_last);
    c.keys_gathered += static_cast<int64_t>(cand.size());
    c.max_candidates = std::max(c.max_candidates, static_cast<int64_t>(cand.size()));
    for (size_t n = 0; n < cand.size(); n += static_cast<size_t>(tc.Bk))
      blocks.emplace_back(cand.begin() + n,
                          cand.begin() + std::min(cand.size(), n + static_cast<size_t>(tc.Bk)));
  }
  for (const auto& blk : blocks) {
    c.tiles_visited += 1;
    c.pairs_computed += t.rows * static_cast<int64_t>(blk.size());
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

// S = scale * Q_i K_blk^T + delta_blk with the element mask applied (-inf where not kept);
// counts the kept pairs.
template <typename T>
Mat<T> masked_logits(const Shape& s, const Options& opt, const QueryTile& t, const Mat<T>& Qi,
                     const Mat<T>& Kb, const std::vector<int64_t>& blk, const T* delta_bh,
                     TileCounters& c) {
  const T scale = static_cast<T>(opt.softmax_scale(s));
  Mat<T> S = scale * (Qi * Kb.transpose());
  for (int64_t r = 0; r < t.rows; ++r) {
    const int64_t p = query_position(s, opt.causal, t.i0 + r);
    for (size_t cc = 0; cc < blk.size(); ++cc) {
      const int64_t j = blk[cc];
      const auto col = static_cast<int64_t>(cc);
      if (is_kept(j, p, t.evict_bh[j])) {
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
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t hq = 0; hq < s.Hq; ++hq)
      for (int64_t i0 = 0; i0 < s.Lq; i0 += tc.Bq) {
        const QueryTile t = make_tile(s, b, hq, i0, tc.Bq, evict);
        const T* k_bh = &k[(b * s.Hkv + t.hk) * s.Lk * s.D];
        const T* v_bh = &v[(b * s.Hkv + t.hk) * s.Lk * s.D];
        const T* delta_bh = &delta[(b * s.Hd + t.hd) * s.Lk];
        const Mat<T> Qi = Eigen::Map<const Mat<T>>(&q[((b * s.Hq + hq) * s.Lq + i0) * s.D],
                                                   t.rows, s.D);
        Vec<T> m = Vec<T>::Constant(t.rows, neg_inf);  // running row max
        Vec<T> l = Vec<T>::Zero(t.rows);               // running row sum of exp(S - m)
        Mat<T> acc = Mat<T>::Zero(t.rows, s.D);        // running unnormalised P V

        for (const auto& blk : key_blocks(s, opt, tc, t, c)) {
          const Mat<T> Kb = gather_rows(k_bh, blk, s.D);
          const Mat<T> Vb = gather_rows(v_bh, blk, s.D);
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
  // The forward in reverse, tile by tile: the same query tiles and key blocks, P recomputed
  // from the saved lse instead of the running max and sum.
  check_tiles(tc);
  const T scale = static_cast<T>(opt.softmax_scale(s));
  TileCounters c;
  AttentionGrads<T> g;
  g.dq.assign(s.q_numel(), T(0));
  g.dk.assign(s.kv_numel(), T(0));
  g.dv.assign(s.kv_numel(), T(0));
  g.ddelta.assign(s.delta_numel(), T(0));
  for (int64_t b = 0; b < s.B; ++b)
    for (int64_t hq = 0; hq < s.Hq; ++hq)
      for (int64_t i0 = 0; i0 < s.Lq; i0 += tc.Bq) {
        const QueryTile t = make_tile(s, b, hq, i0, tc.Bq, evict);
        const int64_t kv_off = (b * s.Hkv + t.hk) * s.Lk * s.D;
        const int64_t row0 = (b * s.Hq + hq) * s.Lq + i0;
        const T* delta_bh = &delta[(b * s.Hd + t.hd) * s.Lk];
        T* ddelta_bh = &g.ddelta[(b * s.Hd + t.hd) * s.Lk];
        using CMap = Eigen::Map<const Mat<T>>;
        const Mat<T> Qi = CMap(&q[row0 * s.D], t.rows, s.D);
        const Mat<T> dOi = CMap(&dout[row0 * s.D], t.rows, s.D);
        const Mat<T> Oi = CMap(&fwd.o[row0 * s.D], t.rows, s.D);
        const Vec<T> lse_i = Eigen::Map<const Vec<T>>(&fwd.lse[row0], t.rows);
        // In the forward pass o_i = sum_j p_ij v_j, so now D_i = do_i . o_i (FlashAttention-2).
        const Vec<T> D_i = (dOi.array() * Oi.array()).rowwise().sum();
        Mat<T> dQi = Mat<T>::Zero(t.rows, s.D);

        for (const auto& blk : key_blocks(s, opt, tc, t, c)) {
          const Mat<T> Kb = gather_rows(&k[kv_off], blk, s.D);
          const Mat<T> Vb = gather_rows(&v[kv_off], blk, s.D);
          // P = exp(S - lse): exactly 0 on masked pairs, so their ds and every gradient are 0
          Mat<T> P = masked_logits(s, opt, t, Qi, Kb, blk, delta_bh, c);
          for (int64_t r = 0; r < t.rows; ++r)
            for (int64_t cc = 0; cc < P.cols(); ++cc)
              P(r, cc) = std::exp(P(r, cc) - lse_i(r));
          // o = P V          ->  dV_blk = P^T dO,  dP = dO V_blk^T
          const Mat<T> dVb = P.transpose() * dOi;
          const Mat<T> dP = dOi * Vb.transpose();
          // p = softmax(s)   ->  dS = P * (dP - D)
          const Mat<T> dS = (P.array() * (dP.colwise() - D_i).array()).matrix();
          // s = scale q.k + delta -> dQ += scale dS K_blk, dK_blk = scale dS^T Q, ddelta += colsum dS
          dQi.noalias() += scale * (dS * Kb);
          const Mat<T> dKb = scale * (dS.transpose() * Qi);
          const Vec<T> dS_colsum = dS.colwise().sum().transpose();
          for (size_t cc = 0; cc < blk.size(); ++cc) {  // scatter back ("atomicAdd" on a GPU)
            const int64_t j = blk[cc];
            const auto col = static_cast<int64_t>(cc);
            for (int64_t d = 0; d < s.D; ++d) {
              g.dk[kv_off + j * s.D + d] += dKb(col, d);
              g.dv[kv_off + j * s.D + d] += dVb(col, d);
            }
            ddelta_bh[j] += dS_colsum(col);
          }
        }
        for (int64_t r = 0; r < t.rows; ++r)
          for (int64_t d = 0; d < s.D; ++d) g.dq[(row0 + r) * s.D + d] = dQi(r, d);
      }
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
