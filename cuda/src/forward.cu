// DMA forward: o = softmax(scale * q k^T + delta, masked) v and lse, on the candidate keys of
// each query tile (the list of the candidate tables, tables.cuh), with the element mask
// j <= p_i <= e_j evaluated in registers where the list says it is needed.
//
// One block = one query tile of kTileQ = 128 queries of one (b, query head), 16 per warp.
// Per tile of kBk = 64 listed keys (the FlashAttention-2 loop, paper notation Q_i, K_j, V_j, m, l):
//   S   = Q K_j^T                    mma.sync m16n8k16, fp32 accumulators   (16 x 64 per warp)
//   S2  = log2(e) * (scale * S + delta_j), -inf where not kept (in registers)
//   m'  = max(m, rowmax S2);  P = 2^(S2 - m');  l = 2^(m-m') l + rowsum P;  O = 2^(m-m') O + P V_j
// and at the end o = O / l, lse = ln 2 * (m + log2 l). K_j and V_j are gathered rows, loaded with
// cp.async into two buffers: tile t+1 is copied while tile t is computed. The first n_full keys
// of the list are kept by every query of the tile, so their tiles skip the element test.
#include <cstring>

#include "tables.cuh"
#include "kernels.hpp"

namespace dma::cuda::detail {
namespace {

constexpr int kWarps = kTileQ / 16, kThreads = 32 * kWarps;

template <int D>
constexpr size_t forward_smem_bytes() {
  return sizeof(uint16_t) * (kTileQ + 4 * kBk) * (D + 8) + 2 * sizeof(KeyTile);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) forward_kernel(Dims d, AttnArgs a) {
  constexpr int kStride = D + 8;  // +16 bytes per row: ldmatrix rows land in distinct banks
  constexpr int kBq = kTileQ;
  extern __shared__ __align__(16) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);  // [kBq][D+8]
  T* Ks = Qs + kBq * kStride;          // 2 x [kBk][D+8]  gathered K_j (double buffer)
  T* Vs = Ks + 2 * kBk * kStride;      // 2 x [kBk][D+8]  gathered V_j
  constexpr int kBuf = kBk * kStride;  // elements per buffer
  KeyTile* kts = reinterpret_cast<KeyTile*>(Vs + 2 * kBuf);  // 2 x: keys, e_j, delta_j of K_j

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int q_tile = gridDim.x - 1 - blockIdx.x;  // causal: the longest tiles start first
  const int hq = blockIdx.y, b = blockIdx.z;
  const int i0 = q_tile * kBq;
  auto position = [&](int i) { return rule::query_position(d.Lq, d.Lk, d.causal, i); };  // p_i
  const QueryBlock<T, D> qb(d, a, q_tile, hq, b, i0, kBq);

  // 1. Q_i and the first K_j, V_j. Tiles are double-buffered: while tile c is computed from
  //    buffer c%2, the copies of tile c+1 fill the other buffer.
  load_rows<T, D, kBq, kThreads>(Qs, qb.q, i0, d.Lq);
  load_key_tile(kts[0], qb.tv, q_tile, 0, qb.n_alive, qb.evict, qb.delta);
  gather_rows<T, D, kThreads>(Ks, qb.k, qb.tv, q_tile, 0, qb.n_alive);
  gather_rows<T, D, kThreads>(Vs, qb.v, qb.tv, q_tile, 0, qb.n_alive);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();  // Q_i, K_0 and V_0 are in shared memory for every warp

  // Q fragments (A operand, 16 rows x D) stay in registers for the whole loop; at D = 256 they
  // would not fit beside the 16 x 256 accumulator and are read from shared memory per product.
  constexpr bool kQInRegisters = D <= 128;
  auto q_fragment = [&](uint32_t f[4], int kk) {
    ldmatrix_x4(f, Qs + (warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kStride + kk * 16 +
                       (lane / 16) * 8);
  };
  uint32_t qf[kQInRegisters ? D / 16 : 1][4];
  if constexpr (kQInRegisters) {
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) q_fragment(qf[kk], kk);
  }

  float o_acc[D / 8][4];
  #pragma unroll
  for (int n = 0; n < D / 8; ++n) o_acc[n][0] = o_acc[n][1] = o_acc[n][2] = o_acc[n][3] = 0.0f;
  float m_row[2] = {-INFINITY, -INFINITY}, l_row[2] = {0.0f, 0.0f};
  const int row[2] = {i0 + warp * 16 + g, i0 + warp * 16 + g + 8};
  const int p_row[2] = {position(row[0]), position(row[1])};
  const int warp_p_first = position(i0 + warp * 16), warp_p_last = position(i0 + warp * 16 + 15);
  const float scale2 = d.scale * kLog2e;

  for (int r0 = 0, buf = 0; r0 < qb.n_alive; r0 += kBk, buf ^= 1) {
    // Next tile: its copies go to the other buffers, which tile c-1 used: the barrier at the end
    // of the previous iteration means every warp is done with it.
    const int nt = min(kBk, qb.n_alive - r0), r_next = r0 + kBk;
    if (r_next < qb.n_alive) {
      load_key_tile(kts[buf ^ 1], qb.tv, q_tile, r_next, qb.n_alive, qb.evict, qb.delta);
      gather_rows<T, D, kThreads>(Ks + (buf ^ 1) * kBuf, qb.k, qb.tv, q_tile, r_next, qb.n_alive);
      gather_rows<T, D, kThreads>(Vs + (buf ^ 1) * kBuf, qb.v, qb.tv, q_tile, r_next, qb.n_alive);
    }
    cp_async_commit();   // (an empty group when there is no next tile)
    cp_async_wait<1>();  // tile c has landed (tile c+1 may still be in flight)
    __syncthreads();     // ... for every thread's copies
    const KeyTile& kt = kts[buf];

    // 2. S = Q K_j^T (16 x 64 per warp).
    float s[kBk / 8][4];
    #pragma unroll
    for (int n = 0; n < kBk / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const uint32_t* qa = qf[kQInRegisters ? kk : 0];
      if constexpr (!kQInRegisters) q_fragment(qf[0], kk);
      #pragma unroll
      for (int np = 0; np < kBk / 16; ++np) {
        uint32_t kb[4];
        ldmatrix_x4(kb, Ks + buf * kBuf + (np * 16 + (lane % 8) + (lane / 16) * 8) * kStride + kk * 16 +
                            ((lane / 8) % 2) * 8);
        mma_16816<T>(s[2 * np], qa, kb[0], kb[1]);
        mma_16816<T>(s[2 * np + 1], qa, kb[2], kb[3]);
      }
    }

    // 3. Mask in registers and online softmax (base 2). Tiles from the head of the list (kept by
    //    every query of the tile), and tiles every key of which this warp's 16 rows keep, skip
    //    the per-element test.
    float row_max[2] = {-INFINITY, -INFINITY};
    if (r0 + kBk <= qb.n_full || key_tile_kept_by(kt, warp_p_first, warp_p_last)) {
      #pragma unroll
      for (int n = 0; n < kBk / 8; ++n) {
        // columns 2*t4, 2*t4+1 are adjacent: one 8-byte load brings both deltas
        const float2 d2 = *reinterpret_cast<const float2*>(&kt.delta2[n * 8 + t4 * 2]);
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
          s[n][2 * r] = fmaf(s[n][2 * r], scale2, d2.x);
          s[n][2 * r + 1] = fmaf(s[n][2 * r + 1], scale2, d2.y);
          row_max[r] = fmaxf(row_max[r], fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        }
      }
    } else {
      #pragma unroll
      for (int n = 0; n < kBk / 8; ++n) {
        #pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = n * 8 + t4 * 2 + e;
          const int j = kt.key[col], ej = kt.evict[col];
          const float d2 = kt.delta2[col];
          const bool valid = col < nt;
          #pragma unroll
          for (int r = 0; r < 2; ++r) {
            const bool kept = valid && rule::is_kept(j, p_row[r], ej);
            float& x = s[n][2 * r + e];
            x = kept ? fmaf(x, scale2, d2) : -INFINITY;
            row_max[r] = fmaxf(row_max[r], x);
          }
        }
      }
    }
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      row_max[r] = quad_max(row_max[r]);
      const float m_new = fmaxf(m_row[r], row_max[r]);
      const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // row with nothing kept yet
      const float alpha = exp2f(m_row[r] - m_use);            // 0 when m_row was -inf
      float sum = 0.0f;
      #pragma unroll
      for (int n = 0; n < kBk / 8; ++n) {
        s[n][2 * r] = fast_exp2(s[n][2 * r] - m_use);
        s[n][2 * r + 1] = fast_exp2(s[n][2 * r + 1] - m_use);
        sum += s[n][2 * r] + s[n][2 * r + 1];
      }
      l_row[r] = l_row[r] * alpha + sum;  // this thread's part of the row; the quad sums at the end
      m_row[r] = m_new;
      #pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o_acc[n][2 * r] *= alpha;
        o_acc[n][2 * r + 1] *= alpha;
      }
    }
    // P as A fragments: the C layout of two adjacent n8 tiles is the A layout of one k16 slice.
    uint32_t pf[kBk / 16][4];
    #pragma unroll
    for (int kk = 0; kk < kBk / 16; ++kk) {
      pf[kk][0] = Elem<T>::pack(s[2 * kk][0], s[2 * kk][1]);
      pf[kk][1] = Elem<T>::pack(s[2 * kk][2], s[2 * kk][3]);
      pf[kk][2] = Elem<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      pf[kk][3] = Elem<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
    }

    // 4. O += P V_j (16 x D per warp).
    #pragma unroll
    for (int kk = 0; kk < kBk / 16; ++kk) {
      #pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vb[4];
        ldmatrix_x4_trans(vb, Vs + buf * kBuf + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kStride +
                                  dp * 16 + (lane / 16) * 8);
        mma_16816<T>(o_acc[2 * dp], pf[kk], vb[0], vb[1]);
        mma_16816<T>(o_acc[2 * dp + 1], pf[kk], vb[2], vb[3]);
      }
    }
    __syncthreads();  // every warp is done with this tile's buffers before they are refilled
  }

  // 5. o = O / l, lse = ln2 * (m + log2 l). Every query keeps >= 1 key, so l > 0 for real rows.
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    const float l = quad_sum(l_row[r]);
    if (row[r] >= d.Lq) continue;
    const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;
    float* o_row = a.o + ((size_t)(b * d.Hq + hq) * d.Lq + row[r]) * D;
    #pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(o_row + n * 8 + t4 * 2) =
          make_float2(o_acc[n][2 * r] * inv_l, o_acc[n][2 * r + 1] * inv_l);
    if (t4 == 0)
      a.lse[(size_t)(b * d.Hq + hq) * d.Lq + row[r]] =
          l > 0.0f ? (m_row[r] + log2f(l)) * kLn2 : -INFINITY;
  }
}

template <typename T, int D>
void launch(const Dims& d, const AttnArgs& a, cudaStream_t st) {
  constexpr size_t smem = forward_smem_bytes<D>();
  DMA_CUDA_CHECK(cudaFuncSetAttribute(forward_kernel<T, D>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  const dim3 grid(table_tiles(d), d.Hq, d.B);
  forward_kernel<T, D><<<grid, kThreads, smem, st>>>(d, a);
  DMA_CUDA_CHECK_LAUNCH(forward_kernel);
}

}  // namespace

void launch_forward(const Dims& d, const AttnArgs& a, cudaStream_t st) {
  // (a bad DMA_CUDA_FORWARD throws here, whether or not the library has the wgmma kernels)
  [[maybe_unused]] const char* family = forward_kernel_name(d.D);
#if defined(DMA_HAVE_SM90)
  if (std::strcmp(family, "sm90") == 0) return launch_forward_sm90(d, a, st);
#endif
  dispatch<32, 64, 128, 256>(d.precision, d.D, [&](auto elem, auto head_dim) {
    launch<decltype(elem), decltype(head_dim)::value>(d, a, st);
  });
}

}  // namespace dma::cuda::detail
