// DMA backward (paper Eqs. 7-10) on the gathered candidate keys, query-tile major.
//
// Forward gathering bounds the work of a query tile by w + Bq keys; the backward keeps that bound
// by walking the same tiles in the same way (a key-major walk would have to visit every query
// tile that any key of the key tile reaches, which for unstructured delta is most of them).
// So dq is owned by the block and stays in registers, while dk, dv and ddelta of a gathered key
// receive one fp32 atomic add per query tile that reaches it (GQA heads add into the same kv row).
//
// Per tile of kBk gathered keys, for the block's kBq queries (FlashAttention-2 backward):
//   S  = Q K_j^T,  P = 2^(log2e*(scale*S + delta_j) - log2e*lse), 0 where not kept
//   dP = dO V_j^T, dS = P * (dP - D_i)                       D_i = do_i . o_i (preprocess kernel)
//   dQ += dS K_j                                              (registers, 16 rows x D per warp)
//   dV_j += P^T dO,  dK_j += scale * dS^T Q                   (P, dS staged in shared memory as
//                                                              the transposed A operand)
//   ddelta_j += sum_i dS_ij                                    (fp32 column sums, exact zeros
//                                                              where nothing is kept)
// At the end dq = scale * dQ.
#include "gather.cuh"
#include "kernels.hpp"

namespace dma::cuda::detail {
namespace {

constexpr int kPStride = kBk + 8;  // P and dS tiles [kBq][kBk+8]

template <int D, int kWarps>
constexpr size_t backward_smem_bytes() {
  constexpr int kBq = Tiles<kWarps>::kBq;
  return sizeof(uint16_t) * ((2 * kBq + 4 * kBk) * (D + 8) + 2 * kBq * kPStride) +
         sizeof(CandidateRing<kWarps>) + sizeof(float) * (kWarps * kBk + 2 * kBq);
}

// D_i = sum_d do[i,d] * o[i,d]; one warp per row.
template <typename T>
__global__ void dsum_kernel(int rows, int D, const T* __restrict__ dout, const float* __restrict__ o,
                            float* __restrict__ dsum) {
  const int row = (blockIdx.x * blockDim.x + threadIdx.x) / 32, lane = threadIdx.x % 32;
  if (row >= rows) return;
  float acc = 0.0f;
  for (int c = lane; c < D; c += 32)
    acc = fmaf(Elem<T>::to_float(dout[(size_t)row * D + c]), o[(size_t)row * D + c], acc);
  for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) dsum[row] = acc;
}

template <typename T, int D, int kWarps>
__global__ void __launch_bounds__(32 * kWarps) backward_kernel(Dims d, AttnArgs a) {
  constexpr int kStride = D + 8;
  constexpr int kBq = Tiles<kWarps>::kBq, kRing = Tiles<kWarps>::kRing;
  extern __shared__ __align__(16) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);  // [kBq][D+8]
  T* dOs = Qs + kBq * kStride;         // [kBq][D+8]
  T* Ks = dOs + kBq * kStride;         // 2 x [kBk][D+8]  gathered K_j (double buffer)
  T* Vs = Ks + 2 * kBk * kStride;      // 2 x [kBk][D+8]  gathered V_j
  constexpr int kBuf = kBk * kStride;  // elements per buffer
  T* Ps = Vs + 2 * kBuf;               // [kBq][kBk+8]
  T* dSs = Ps + kBq * kPStride;        // [kBq][kBk+8]
  CandidateRing<kWarps>& ring = *reinterpret_cast<CandidateRing<kWarps>*>(dSs + kBq * kPStride);
  float* colsum = reinterpret_cast<float*>(&ring + 1);  // [kWarps][kBk]
  float* lse2_s = colsum + kWarps * kBk;                     // [kBq] lse * log2(e), +inf past Lq
  float* dsum_s = lse2_s + kBq;                          // [kBq] D_i

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int q_tile = gridDim.x - 1 - blockIdx.x;
  const int hq = blockIdx.y, b = blockIdx.z;
  const int hk = hq / (d.Hq / d.Hkv), hd = hq / (d.Hq / d.Hd);
  const int i0 = q_tile * kBq;
  auto position = [&](int i) { return rule::query_position(d.Lq, d.Lk, d.causal, i); };  // p_i
  const int p_first = position(i0), p_last = position(min(i0 + kBq, d.Lq) - 1);

  const size_t bhq = (size_t)(b * d.Hq + hq), bhk = (size_t)(b * d.Hkv + hk);
  const T* q_bh = static_cast<const T*>(a.q) + bhq * d.Lq * D;
  const T* do_bh = static_cast<const T*>(a.dout) + bhq * d.Lq * D;
  const T* k_bh = static_cast<const T*>(a.k) + bhk * d.Lk * D;
  const T* v_bh = static_cast<const T*>(a.v) + bhk * d.Lk * D;
  float* dk_bh = a.dk + bhk * d.Lk * D;
  float* dv_bh = a.dv + bhk * d.Lk * D;
  const int bhd = b * d.Hd + hd;
  const int* evict_bh = a.evict + (size_t)bhd * d.Lk;
  const int* chunk_max_bh = a.chunk_max + (size_t)bhd * d.n_chunks();
  const float* delta_bh = a.delta + (size_t)bhd * d.Lk;
  float* ddelta_bh = a.ddelta + (size_t)bhd * d.Lk;

  // 1. Q_i, dO_i, lse, D_i, and the first K_j, V_j.
  load_rows<T, D, kWarps>(Qs, q_bh, i0, d.Lq);
  load_rows<T, D, kWarps>(dOs, do_bh, i0, d.Lq);
  cp_async_commit();
  if (tid < kBq) {
    const int i = i0 + tid;
    // past Lq: lse = +inf makes P exactly 0, so padded rows add nothing anywhere
    lse2_s[tid] = i < d.Lq ? a.lse[bhq * d.Lq + i] * kLog2e : INFINITY;
    dsum_s[tid] = i < d.Lq ? a.dsum[bhq * d.Lq + i] : 0.0f;
  }
  Scan sc;
  ensure_candidates(sc, ring, kBk, p_first, p_last, evict_bh, chunk_max_bh, delta_bh);
  int nt = min(kBk, sc.n), tile_head = sc.head;  // the tile in hand: ring[tile_head, +nt)
  sc.head = (sc.head + nt) & (kRing - 1);
  sc.n -= nt;
  gather_rows<T, D, kWarps>(Ks, k_bh, ring, tile_head, nt);
  gather_rows<T, D, kWarps>(Vs, v_bh, ring, tile_head, nt);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();  // Q, dO, lse, D_i, K_0, V_0 visible to every warp

  const int row_l[2] = {warp * 16 + g, warp * 16 + g + 8};  // this thread's rows in the tile
  const int p_row[2] = {position(i0 + row_l[0]), position(i0 + row_l[1])};
  const float lse2[2] = {lse2_s[row_l[0]], lse2_s[row_l[1]]};
  const float dsum[2] = {dsum_s[row_l[0]], dsum_s[row_l[1]]};
  const int warp_p_first = position(i0 + warp * 16), warp_p_last = position(i0 + warp * 16 + 15);
  const float scale2 = d.scale * kLog2e;

  float dq_acc[D / 8][4];
  #pragma unroll
  for (int n = 0; n < D / 8; ++n) dq_acc[n][0] = dq_acc[n][1] = dq_acc[n][2] = dq_acc[n][3] = 0.0f;

  for (int buf = 0;; buf ^= 1) {
    // Next tile: scan (its closing barrier: every warp is done with tile t-1, its K/V buffers,
    // P, dS and column sums) and start its copies into the other buffers.
    ensure_candidates(sc, ring, kBk, p_first, p_last, evict_bh, chunk_max_bh, delta_bh);
    const int next_nt = min(kBk, sc.n), next_head = sc.head;
    if (next_nt > 0) {
      gather_rows<T, D, kWarps>(Ks + (buf ^ 1) * kBuf, k_bh, ring, next_head, next_nt);
      gather_rows<T, D, kWarps>(Vs + (buf ^ 1) * kBuf, v_bh, ring, next_head, next_nt);
    }
    cp_async_commit();   // (an empty group when there is no next tile)
    cp_async_wait<1>();  // tile t has landed
    __syncthreads();     // ... for every thread's copies
    const T* Kt = Ks + buf * kBuf;
    const T* Vt = Vs + buf * kBuf;
    // 2. S = Q K_j^T and dP = dO V_j^T (16 x 64 per warp each).
    float s[kBk / 8][4], dp[kBk / 8][4];
    #pragma unroll
    for (int n = 0; n < kBk / 8; ++n)
      #pragma unroll
      for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
    #pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t qf[4], dof[4];
      const int a_off = (warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kStride + kk * 16 +
                        (lane / 16) * 8;
      ldmatrix_x4(qf, Qs + a_off);
      ldmatrix_x4(dof, dOs + a_off);
      #pragma unroll
      for (int np = 0; np < kBk / 16; ++np) {
        const int b_off =
            (np * 16 + (lane % 8) + (lane / 16) * 8) * kStride + kk * 16 + ((lane / 8) % 2) * 8;
        uint32_t kb[4], vb[4];
        ldmatrix_x4(kb, Kt + b_off);
        ldmatrix_x4(vb, Vt + b_off);
        mma_16816<T>(s[2 * np], qf, kb[0], kb[1]);
        mma_16816<T>(s[2 * np + 1], qf, kb[2], kb[3]);
        mma_16816<T>(dp[2 * np], dof, vb[0], vb[1]);
        mma_16816<T>(dp[2 * np + 1], dof, vb[2], vb[3]);
      }
    }

    // 3. P and dS in registers (s and dp are overwritten by them); P, dS to shared memory.
    //    (Tiles kept whole for this warp's rows skip the per-element test, as in the forward.)
    const bool full = tile_fully_kept(ring, tile_head, nt, warp_p_first, warp_p_last);
    #pragma unroll
    for (int n = 0; n < kBk / 8; ++n) {
      #pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int col = n * 8 + t4 * 2 + e, slot = (tile_head + col) & (kRing - 1);
        const int j = ring.key[slot], ej = ring.evict[slot];
        const float d2 = ring.delta2[slot];
        const bool valid = col < nt;
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
          const bool kept = full || (valid && rule::is_kept(j, p_row[r], ej));
          const float p = kept ? fast_exp2(fmaf(s[n][2 * r + e], scale2, d2) - lse2[r]) : 0.0f;
          s[n][2 * r + e] = p;
          dp[n][2 * r + e] = p * (dp[n][2 * r + e] - dsum[r]);  // dS; exactly 0 where p is 0
        }
      }
      #pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int off = row_l[r] * kPStride + n * 8 + t4 * 2;
        *reinterpret_cast<uint32_t*>(Ps + off) = Elem<T>::pack(s[n][2 * r], s[n][2 * r + 1]);
        *reinterpret_cast<uint32_t*>(dSs + off) = Elem<T>::pack(dp[n][2 * r], dp[n][2 * r + 1]);
      }
      // ddelta: column sums of dS in fp32 over this warp's 16 rows (rows g and g+8, then the
      // 8 row groups of the warp by shuffles)
      float c0 = dp[n][0] + dp[n][2], c1 = dp[n][1] + dp[n][3];
      #pragma unroll
      for (int off = 4; off < 32; off *= 2) {
        c0 += __shfl_xor_sync(0xffffffffu, c0, off);
        c1 += __shfl_xor_sync(0xffffffffu, c1, off);
      }
      if (g == 0) {
        colsum[warp * kBk + n * 8 + t4 * 2] = c0;
        colsum[warp * kBk + n * 8 + t4 * 2 + 1] = c1;
      }
    }

    // 4. dQ += dS K_j (A = dS from registers, B = K_j rows read transposed).
    #pragma unroll
    for (int kk = 0; kk < kBk / 16; ++kk) {
      uint32_t af[4];
      af[0] = Elem<T>::pack(dp[2 * kk][0], dp[2 * kk][1]);
      af[1] = Elem<T>::pack(dp[2 * kk][2], dp[2 * kk][3]);
      af[2] = Elem<T>::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
      af[3] = Elem<T>::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
      #pragma unroll
      for (int dd = 0; dd < D / 16; ++dd) {
        uint32_t kb[4];
        ldmatrix_x4_trans(kb, Kt + (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kStride +
                                  dd * 16 + (lane / 16) * 8);
        mma_16816<T>(dq_acc[2 * dd], af, kb[0], kb[1]);
        mma_16816<T>(dq_acc[2 * dd + 1], af, kb[2], kb[3]);
      }
    }
    __syncthreads();  // P, dS and the column sums of all warps are in shared memory

    // 5. ddelta_j += sum over the tile's queries (one atomic per key and tile).
    if (tid < nt) {
      float sum = 0.0f;
      #pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += colsum[w * kBk + tid];
      atomicAdd(ddelta_bh + ring.key[(tile_head + tid) & (kRing - 1)], sum);
    }

    // 6. dV_j = P^T dO and dK_j = scale * dS^T Q, summed over all kBq queries (A = P^T / dS^T
    //    read transposed from shared memory). A warp owns 16 keys of the tile: with 4 warps each
    //    warp does both products for its keys; with 8, warps 0-3 do dV and warps 4-7 dK.
    const int key_block = warp % 4;
    const int key_l[2] = {key_block * 16 + g, key_block * 16 + g + 8};
    int key_j[2];
    #pragma unroll
    for (int r = 0; r < 2; ++r) key_j[r] = key_l[r] < nt ? ring.key[(tile_head + key_l[r]) & (kRing - 1)] : -1;
    constexpr int kPasses = kWarps == 4 ? 2 : 1;
    #pragma unroll
    for (int pp = 0; pp < kPasses; ++pp) {
      const int pass = kWarps == 4 ? pp : warp / 4;
      const T* As = pass == 0 ? Ps : dSs;    // P^T for dV, dS^T for dK
      const T* Bs = pass == 0 ? dOs : Qs;    // dO for dV, Q for dK
      float* out_bh = pass == 0 ? dv_bh : dk_bh;
      const float mult = pass == 0 ? 1.0f : d.scale;
      float acc[D / 8][4];
      #pragma unroll
      for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;
      #pragma unroll
      for (int kq = 0; kq < kBq / 16; ++kq) {
        uint32_t af[4];
        ldmatrix_x4_trans(af, As + (kq * 16 + (lane % 8) + (lane / 16) * 8) * kPStride +
                                  key_block * 16 + ((lane / 8) % 2) * 8);
        #pragma unroll
        for (int dd = 0; dd < D / 16; ++dd) {
          uint32_t bb[4];
          ldmatrix_x4_trans(bb, Bs + (kq * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kStride +
                                    dd * 16 + (lane / 16) * 8);
          mma_16816<T>(acc[2 * dd], af, bb[0], bb[1]);
          mma_16816<T>(acc[2 * dd + 1], af, bb[2], bb[3]);
        }
      }
      #pragma unroll
      for (int r = 0; r < 2; ++r) {
        if (key_j[r] < 0) continue;
        float* out_row = out_bh + (size_t)key_j[r] * D;
        #pragma unroll
        for (int n = 0; n < D / 8; ++n)
          atomicAdd(reinterpret_cast<float2*>(out_row + n * 8 + t4 * 2),
                    make_float2(acc[n][2 * r] * mult, acc[n][2 * r + 1] * mult));
      }
    }
    if (next_nt == 0) break;
    tile_head = next_head;
    nt = next_nt;
    sc.head = (sc.head + nt) & (kRing - 1);
    sc.n -= nt;
  }

  // 7. dq = scale * dQ (the block owns these rows: plain stores).
  #pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int i = i0 + row_l[r];
    if (i >= d.Lq) continue;
    float* dq_row = a.dq + (bhq * d.Lq + i) * D;
    #pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(dq_row + n * 8 + t4 * 2) =
          make_float2(dq_acc[n][2 * r] * d.scale, dq_acc[n][2 * r + 1] * d.scale);
  }
}

template <typename T, int D, int kWarps>
void launch_warps(const Dims& d, const AttnArgs& a, cudaStream_t st) {
  constexpr size_t smem = backward_smem_bytes<D, kWarps>();
  constexpr int kBq = Tiles<kWarps>::kBq;
  DMA_CUDA_CHECK(cudaFuncSetAttribute(backward_kernel<T, D, kWarps>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  const dim3 grid((d.Lq + kBq - 1) / kBq, d.Hq, d.B);
  backward_kernel<T, D, kWarps><<<grid, 32 * kWarps, smem, st>>>(d, a);
  DMA_CUDA_CHECK_LAUNCH(backward_kernel);
}
template <typename T, int D>
void launch(const Dims& d, const AttnArgs& a, cudaStream_t st) {
  const int rows = d.B * d.Hq * d.Lq;
  dsum_kernel<T><<<(rows * 32 + 255) / 256, 256, 0, st>>>(rows, D, static_cast<const T*>(a.dout),
                                                          a.o, const_cast<float*>(a.dsum));
  DMA_CUDA_CHECK_LAUNCH(dsum_kernel);
  if (block_warps() == 8) launch_warps<T, D, 8>(d, a, st);
  else launch_warps<T, D, 4>(d, a, st);
}

}  // namespace

// Needs dk, dv, ddelta zeroed; writes dsum (scratch, B*Hq*Lq) and dq.
void launch_backward(const Dims& d, const AttnArgs& a, cudaStream_t st) {
  dispatch(d.precision, d.D, [&](auto elem, auto head_dim) {
    launch<decltype(elem), decltype(head_dim)::value>(d, a, st);
  });
}

}  // namespace dma::cuda::detail
