// DMA backward (paper Eqs. 7-10) without atomics: every gradient is written once, by one thread,
// in a fixed order of summation, so two runs give the same bits.
//
// With D_i = do_i . o_i (dsum_kernel) and P recomputed from the saved lse:
//   S  = Q K^T,  P = 2^(log2e*(scale*S + delta_j) - log2e*lse), 0 where not kept
//   dP = dO V^T, dS = P * (dP - D_i)
// the gradients are split in two passes over the candidate tables (tables.cuh):
//
//   dq_kernel    query-major, the forward's walk: one block per query tile (half a tile at
//                D = 256), its list kBk keys at a time; dQ += dS K in registers, dq = scale * dQ
//                written at the end.
//   dkdv_kernel  key-major by slots: one block per 64 slots of a (b, delta head) sweeps the query
//                tiles in order. A key keeps its slot for the whole run of tiles that keeps it
//                (docs/design.md §2), so its K, V rows stay in shared memory and its dK, dV and
//                ddelta in registers while it lives; when it leaves its slot they are written
//                (dK = scale * dS^T Q, dV = P^T dO, ddelta = sum of dS over the queries of all the
//                delta head's query heads). Per tile and query head, in sub-tiles of 32 queries:
//                  S^T = K Q^T, dP^T = V dO^T      (16 keys x 32 queries per warp)
//                  dV += P^T dO,  dK += dS^T Q
//                At D = 256 the accumulators of 16 keys x 256 columns (dK and dV) do not fit in
//                a thread's registers: two blocks share a slot block, each accumulating half the
//                columns (S^T and dP^T, over all of D, are computed by both).
//                With Hd > Hkv (one delta head per query head, GQA) several delta heads share a kv
//                head: the sweep writes per-delta-head dK, dV and reduce_partials_kernel sums
//                them in a fixed order.
// Keys no query keeps are never visited: dk, dv and ddelta are zeroed first.
#include <cstring>

#include "tables.cuh"

namespace dma::cuda::detail {
namespace {

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

// ==== dq: query-major ==========================================================================
// Queries per block (Q and dO of a whole tile and four K/V buffers do not fit in shared memory at
// D = 256), and the threads of its warps (16 queries each).
template <int D> constexpr int kDqBlockQ = D > 128 ? kTileQ / 2 : kTileQ;
template <int D> constexpr int kDqThreads = 32 * kDqBlockQ<D> / 16;

template <int D>
constexpr size_t dq_smem_bytes() {
  return sizeof(uint16_t) * (2 * kDqBlockQ<D> + 4 * kBk) * (D + 8) + 2 * sizeof(KeyTile) +
         sizeof(float) * 2 * kDqBlockQ<D>;
}

template <typename T, int D>
__global__ void __launch_bounds__(kDqThreads<D>) dq_kernel(Dims d, AttnArgs a) {
  constexpr int kStride = D + 8, kBq = kDqBlockQ<D>, kBuf = kBk * kStride;
  constexpr int kParts = kTileQ / kBq, kQThreads = kDqThreads<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* Qs = reinterpret_cast<T*>(smem);  // [kBq][D+8]
  T* dOs = Qs + kBq * kStride;         // [kBq][D+8]
  T* Ks = dOs + kBq * kStride;         // 2 x [kBk][D+8]  gathered K_j (double buffer)
  T* Vs = Ks + 2 * kBuf;               // 2 x [kBk][D+8]  gathered V_j
  KeyTile* kts = reinterpret_cast<KeyTile*>(Vs + 2 * kBuf);
  float* lse2_s = reinterpret_cast<float*>(kts + 2);  // [kBq] lse * log2(e), +inf past Lq
  float* dsum_s = lse2_s + kBq;                        // [kBq] D_i

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int part = gridDim.x - 1 - blockIdx.x, q_tile = part / kParts;
  const int hq = blockIdx.y, b = blockIdx.z;
  const int hk = hq / (d.Hq / d.Hkv), hd = hq / (d.Hq / d.Hd);
  const int i0 = q_tile * kTileQ + (part % kParts) * kBq;
  if (kParts > 1 && i0 >= d.Lq) return;  // the second half of a short last tile (block-uniform)
  auto position = [&](int i) { return rule::query_position(d.Lq, d.Lk, d.causal, i); };  // p_i
  const int p_first = position(i0), p_last = position(min(i0 + kBq, d.Lq) - 1);

  const size_t bhq = (size_t)(b * d.Hq + hq), bhk = (size_t)(b * d.Hkv + hk);
  const T* q_bh = static_cast<const T*>(a.q) + bhq * d.Lq * D;
  const T* do_bh = static_cast<const T*>(a.dout) + bhq * d.Lq * D;
  const T* k_bh = static_cast<const T*>(a.k) + bhk * d.Lk * D;
  const T* v_bh = static_cast<const T*>(a.v) + bhk * d.Lk * D;
  const int bhd = b * d.Hd + hd;
  const int* evict_bh = a.evict + (size_t)bhd * d.Lk;
  const float* delta_bh = a.delta + (size_t)bhd * d.Lk;
  const TableView tv(d, a.tables, bhd);
  const int n_alive = tv.alive(q_tile, p_last), n_full = tv.full(q_tile, p_first);

  // 1. Q_i, dO_i, lse, D_i, and the first K_j, V_j.
  load_rows<T, D, kBq, kQThreads>(Qs, q_bh, i0, d.Lq);
  load_rows<T, D, kBq, kQThreads>(dOs, do_bh, i0, d.Lq);
  if (tid < kBq) {
    const int i = i0 + tid;
    // past Lq: lse = +inf makes P exactly 0, so padded rows add nothing
    lse2_s[tid] = i < d.Lq ? a.lse[bhq * d.Lq + i] * kLog2e : INFINITY;
    dsum_s[tid] = i < d.Lq ? a.dsum[bhq * d.Lq + i] : 0.0f;
  }
  load_key_tile(kts[0], tv, q_tile, 0, n_alive, evict_bh, delta_bh);
  gather_rows<T, D, kQThreads>(Ks, k_bh, tv, q_tile, 0, n_alive);
  gather_rows<T, D, kQThreads>(Vs, v_bh, tv, q_tile, 0, n_alive);
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

  for (int r0 = 0, buf = 0; r0 < n_alive; r0 += kBk, buf ^= 1) {
    const int nt = min(kBk, n_alive - r0), r_next = r0 + kBk;
    if (r_next < n_alive) {  // the next tile into the buffers tile c-1 used
      load_key_tile(kts[buf ^ 1], tv, q_tile, r_next, n_alive, evict_bh, delta_bh);
      gather_rows<T, D, kQThreads>(Ks + (buf ^ 1) * kBuf, k_bh, tv, q_tile, r_next, n_alive);
      gather_rows<T, D, kQThreads>(Vs + (buf ^ 1) * kBuf, v_bh, tv, q_tile, r_next, n_alive);
    }
    cp_async_commit();
    cp_async_wait<1>();  // tile c has landed
    __syncthreads();
    const KeyTile& kt = kts[buf];
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

    // 3. P and dS in registers (dp is overwritten by dS), the element test only where needed.
    const bool full = r0 + kBk <= n_full || key_tile_kept_by(kt, warp_p_first, warp_p_last);
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
          const bool kept = full || (valid && rule::is_kept(j, p_row[r], ej));
          const float p = kept ? fast_exp2(fmaf(s[n][2 * r + e], scale2, d2) - lse2[r]) : 0.0f;
          dp[n][2 * r + e] = p * (dp[n][2 * r + e] - dsum[r]);  // dS; exactly 0 where p is 0
        }
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
    __syncthreads();  // every warp is done with this tile's buffers before they are refilled
  }

  // 5. dq = scale * dQ (the block owns these rows).
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

// ==== dk, dv, ddelta: key-major by slots ========================================================
constexpr int kSlots = 64;                  // slots per block, 16 per warp
constexpr int kSubQ = 32;                   // queries per step (a quarter of a table tile)
constexpr int kKWarps = kSlots / 16, kKThreads = 32 * kKWarps;
static_assert(kTileQ % kSubQ == 0, "sub-tiles cut the table tiles evenly");

template <int D>
constexpr size_t dkdv_smem_bytes() {
  return sizeof(uint16_t) * (2 * kSlots + 4 * kSubQ) * (D + 8) +
         sizeof(float) * (4 * kSubQ + kSlots) + sizeof(int) * (3 * kSlots);
}

// Columns of dK, dV one block accumulates (blockIdx.z picks which).
template <int D> constexpr int kDkdvCols = D > 128 ? 128 : D;

template <typename T, int D>
__global__ void __launch_bounds__(kKThreads) dkdv_kernel(Dims d, AttnArgs a) {
  constexpr int kStride = D + 8, kVecs = D / 8, kCols = kDkdvCols<D>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* Ks = reinterpret_cast<T*>(smem);   // [kSlots][D+8]  K rows of the slots' keys
  T* Vs = Ks + kSlots * kStride;        // [kSlots][D+8]  V rows
  T* Qs = Vs + kSlots * kStride;        // 2 x [kSubQ][D+8]  the step's queries (double buffer:
  T* dOs = Qs + 2 * kSubQ * kStride;    // 2 x [kSubQ][D+8]  the next step's load while this one
  float* lse_s = reinterpret_cast<float*>(dOs + 2 * kSubQ * kStride);  // 2 x [kSubQ]  computes)
  float* dsum_s = lse_s + 2 * kSubQ;                                   // 2 x [kSubQ]
  float* delta2_s = dsum_s + 2 * kSubQ;                              // [kSlots] delta_j log2(e)
  int* key_s = reinterpret_cast<int*>(delta2_s + kSlots);            // [kSlots] key, -1 empty
  int* evict_s = key_s + kSlots;                                     // [kSlots] its e_j
  int* next_s = evict_s + kSlots;                                    // [kSlots] key at tile t

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t4 = lane % 4;
  const int s0 = blockIdx.x * kSlots, bhd = blockIdx.y;
  const int c0 = kCols < D ? blockIdx.z * kCols : 0;  // this block's first column of dK, dV
  const int b = bhd / d.Hd, hd = bhd % d.Hd;
  const int heads = d.Hq / d.Hd;                 // query heads of this delta head
  const int hq0 = hd * heads, hk = hq0 / (d.Hq / d.Hkv);
  const int S = tables_implicit(d) ? d.Lk : table_stride(d), T_tiles = table_tiles(d);
  auto position = [&](int i) { return rule::query_position(d.Lq, d.Lk, d.causal, i); };
  const TableView tv(d, a.tables, bhd);
  const int* evict_bh = a.evict + (size_t)bhd * d.Lk;
  const float* delta_bh = a.delta + (size_t)bhd * d.Lk;
  const size_t bhk = (size_t)(b * d.Hkv + hk);
  const T* k_bh = static_cast<const T*>(a.k) + bhk * d.Lk * D;
  const T* v_bh = static_cast<const T*>(a.v) + bhk * d.Lk * D;
  const bool partials = backward_partials(d);
  float* dk_out = partials ? a.dk_part + (size_t)bhd * d.Lk * D : a.dk + bhk * d.Lk * D;
  float* dv_out = partials ? a.dv_part + (size_t)bhd * d.Lk * D : a.dv + bhk * d.Lk * D;
  float* ddelta_bh = a.ddelta + (size_t)bhd * d.Lk;
  const float scale2 = d.scale * kLog2e;

  // Empty slots hold zero rows (their P is 0, and 0 * garbage could be NaN).
  for (int c = tid; c < 2 * kSlots * kStride / 8; c += kKThreads)
    reinterpret_cast<uint4*>(Ks)[c] = make_uint4(0, 0, 0, 0);
  if (tid < kSlots) key_s[tid] = -1, evict_s[tid] = -1, delta2_s[tid] = 0.0f;

  // This thread's accumulators: rows (slots) warp*16 + g and + 8, columns c0 + n*8 + 2*t4 (+1).
  const int slot_l[2] = {warp * 16 + g, warp * 16 + g + 8};
  float dk_acc[kCols / 8][4], dv_acc[kCols / 8][4], dd[2] = {0.0f, 0.0f};
  #pragma unroll
  for (int n = 0; n < kCols / 8; ++n)
    #pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[n][e] = dv_acc[n][e] = 0.0f;

  // Writes the gradients of the keys in this thread's rows whose slot changes (next != key) and
  // clears their accumulators. (The condition is the same for the 4 threads of a quad.)
  auto flush = [&](const int next[2]) {
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(dd[r]);  // ddelta: the quad's 4 partial row sums
      const int j = key_s[slot_l[r]];
      if (next[r] == j) continue;
      if (j >= 0) {
        float* dk_row = dk_out + (size_t)j * D + c0;
        float* dv_row = dv_out + (size_t)j * D + c0;
        #pragma unroll
        for (int n = 0; n < kCols / 8; ++n) {
          *reinterpret_cast<float2*>(dk_row + n * 8 + t4 * 2) =
              make_float2(dk_acc[n][2 * r] * d.scale, dk_acc[n][2 * r + 1] * d.scale);
          *reinterpret_cast<float2*>(dv_row + n * 8 + t4 * 2) =
              make_float2(dv_acc[n][2 * r], dv_acc[n][2 * r + 1]);
        }
        if (t4 == 0 && c0 == 0) ddelta_bh[j] = sum;
      }
      #pragma unroll
      for (int n = 0; n < kCols / 8; ++n) {
        dk_acc[n][2 * r] = dk_acc[n][2 * r + 1] = 0.0f;
        dv_acc[n][2 * r] = dv_acc[n][2 * r + 1] = 0.0f;
      }
      dd[r] = 0.0f;
    }
  };

  for (int t = 0; t < T_tiles; ++t) {
    const int p_first_t = position(t * kTileQ), p_last_t = position(min((t + 1) * kTileQ, d.Lq) - 1);
    // 1. The slots' keys at tile t; the keys that leave are written out, the new ones loaded.
    int next_key = -1;
    if (tid < kSlots && s0 + tid < S) next_key = tv.slot(t, s0 + tid, p_last_t);
    if (tid < kSlots) next_s[tid] = next_key;
    const int any = __syncthreads_or(next_key >= 0 || (tid < kSlots && key_s[tid] >= 0));
    if (!any) continue;  // (block-uniform) nothing lives in these slots now
    const int next[2] = {next_s[slot_l[0]], next_s[slot_l[1]]};
    flush(next);
    for (int c = tid; c < kSlots * kVecs; c += kKThreads) {  // changed slots: new K, V rows
      const int r = c / kVecs, col = (c % kVecs) * 8, j = next_s[r];
      if (j == key_s[r]) continue;
      cp_async_16(Ks + r * kStride + col, k_bh + (size_t)max(j, 0) * D + col, j >= 0);
      cp_async_16(Vs + r * kStride + col, v_bh + (size_t)max(j, 0) * D + col, j >= 0);
    }
    __syncthreads();  // every thread has compared key_s with next_s
    if (tid < kSlots && next_key != key_s[tid]) {
      key_s[tid] = next_key;
      evict_s[tid] = next_key >= 0 ? __ldg(evict_bh + next_key) : -1;
      delta2_s[tid] = next_key >= 0 ? __ldg(delta_bh + next_key) * kLog2e : 0.0f;
    }

    // 2. Steps: every query head of the delta head, sub-tiles of kSubQ queries of tile t; step
    //    k + 1's Q, dO, lse and D_i are copied while step k computes.
    const int i_begin = t * kTileQ, i_end = min((t + 1) * kTileQ, d.Lq);
    const int subs = (i_end - i_begin + kSubQ - 1) / kSubQ, steps = heads * subs;
    auto load_step = [&](int k, int buf) {
      const int i0 = i_begin + (k % subs) * kSubQ;
      const size_t bhq = (size_t)(b * d.Hq + hq0 + k / subs);
      load_rows<T, D, kSubQ, kKThreads>(Qs + buf * kSubQ * kStride,
                                        static_cast<const T*>(a.q) + bhq * d.Lq * D, i0, d.Lq);
      load_rows<T, D, kSubQ, kKThreads>(dOs + buf * kSubQ * kStride,
                                        static_cast<const T*>(a.dout) + bhq * d.Lq * D, i0, d.Lq);
      if (tid < kSubQ) {
        const int i = min(i0 + tid, d.Lq - 1);  // (rows past Lq are never kept)
        cp_async_4(lse_s + buf * kSubQ + tid, a.lse + bhq * d.Lq + i, true);
        cp_async_4(dsum_s + buf * kSubQ + tid, a.dsum + bhq * d.Lq + i, true);
      }
      cp_async_commit();
    };
    load_step(0, 0);  // (in one group with the new K, V rows above)
    for (int k = 0; k < steps; ++k) {
      const int buf = k & 1, i0 = i_begin + (k % subs) * kSubQ;
      cp_async_wait<0>();
      __syncthreads();  // step k's data (and the slot update) visible; step k-1 done everywhere
      if (k + 1 < steps) load_step(k + 1, buf ^ 1);
      const T* Qt = Qs + buf * kSubQ * kStride;
      const T* dOt = dOs + buf * kSubQ * kStride;
      const float* lse_t = lse_s + buf * kSubQ;
      const float* dsum_t = dsum_s + buf * kSubQ;
      {
        const int sp_first = position(i0), sp_last = position(min(i0 + kSubQ, d.Lq) - 1);
        // Does any of this warp's keys meet the sub-tile; do all keep all of it? (warp-uniform)
        const int jw = key_s[warp * 16 + lane % 16], ew = evict_s[warp * 16 + lane % 16];
        const bool warp_active = __any_sync(0xffffffffu, jw >= 0 && jw <= sp_last &&
                                                          ew >= max(jw, sp_first));
        const bool warp_full = __all_sync(0xffffffffu, jw >= 0 && jw <= sp_first && ew >= sp_last);
        if (!warp_active) continue;

        // S^T = K Q^T and dP^T = V dO^T: this warp's 16 keys x kSubQ queries.
        float s[kSubQ / 8][4], dp[kSubQ / 8][4];
        #pragma unroll
        for (int n = 0; n < kSubQ / 8; ++n)
          #pragma unroll
          for (int e = 0; e < 4; ++e) s[n][e] = dp[n][e] = 0.0f;
        #pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t kf[4], vf[4];
          const int a_off = (warp * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kStride + kk * 16 +
                            (lane / 16) * 8;
          ldmatrix_x4(kf, Ks + a_off);
          ldmatrix_x4(vf, Vs + a_off);
          #pragma unroll
          for (int np = 0; np < kSubQ / 16; ++np) {
            const int b_off =
                (np * 16 + (lane % 8) + (lane / 16) * 8) * kStride + kk * 16 + ((lane / 8) % 2) * 8;
            uint32_t qb[4], ob[4];
            ldmatrix_x4(qb, Qt + b_off);
            ldmatrix_x4(ob, dOt + b_off);
            mma_16816<T>(s[2 * np], kf, qb[0], qb[1]);
            mma_16816<T>(s[2 * np + 1], kf, qb[2], qb[3]);
            mma_16816<T>(dp[2 * np], vf, ob[0], ob[1]);
            mma_16816<T>(dp[2 * np + 1], vf, ob[2], ob[3]);
          }
        }

        // P^T and dS^T in registers (rows: keys, columns: queries); ddelta row sums.
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int j = key_s[slot_l[r]], ej = evict_s[slot_l[r]];
          const float d2 = delta2_s[slot_l[r]];
          #pragma unroll
          for (int n = 0; n < kSubQ / 8; ++n) {
            #pragma unroll
            for (int e = 0; e < 2; ++e) {
              const int col = n * 8 + t4 * 2 + e, i = i0 + col;
              const bool kept =
                  i < d.Lq && (warp_full || (j >= 0 && rule::is_kept(j, position(i), ej)));
              float& x = s[n][2 * r + e];
              const float p =
                  kept ? fast_exp2(fmaf(x, scale2, d2) - lse_t[col] * kLog2e) : 0.0f;
              x = p;
              float& y = dp[n][2 * r + e];
              y = p * (y - dsum_t[col]);  // dS; exactly 0 where p is 0
              dd[r] += y;
            }
          }
        }

        // dV += P^T dO and dK += dS^T Q (A from registers: the C layout of two adjacent n8
        // tiles is the A layout of one k16 slice; B = dO, Q rows read transposed).
        #pragma unroll
        for (int kk = 0; kk < kSubQ / 16; ++kk) {
          uint32_t pf[4], sf[4];
          pf[0] = Elem<T>::pack(s[2 * kk][0], s[2 * kk][1]);
          pf[1] = Elem<T>::pack(s[2 * kk][2], s[2 * kk][3]);
          pf[2] = Elem<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]);
          pf[3] = Elem<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3]);
          sf[0] = Elem<T>::pack(dp[2 * kk][0], dp[2 * kk][1]);
          sf[1] = Elem<T>::pack(dp[2 * kk][2], dp[2 * kk][3]);
          sf[2] = Elem<T>::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]);
          sf[3] = Elem<T>::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3]);
          #pragma unroll
          for (int dc = 0; dc < kCols / 16; ++dc) {
            const int off = (kk * 16 + (lane % 8) + ((lane / 8) % 2) * 8) * kStride + c0 + dc * 16 +
                            (lane / 16) * 8;
            uint32_t ob[4], qb[4];
            ldmatrix_x4_trans(ob, dOt + off);
            ldmatrix_x4_trans(qb, Qt + off);
            mma_16816<T>(dv_acc[2 * dc], pf, ob[0], ob[1]);
            mma_16816<T>(dv_acc[2 * dc + 1], pf, ob[2], ob[3]);
            mma_16816<T>(dk_acc[2 * dc], sf, qb[0], qb[1]);
            mma_16816<T>(dk_acc[2 * dc + 1], sf, qb[2], qb[3]);
          }
        }
      }
    }
    __syncthreads();  // every step is done with the buffers and key_s before the next tile
  }
  // 3. After the last tile every remaining key leaves its slot.
  const int none[2] = {-1, -1};
  flush(none);
}

// dk[b,hk] = sum over the delta heads hd of kv head hk of dk_part[b,hd], in order of hd (and dv).
__global__ void reduce_partials_kernel(Dims d, const float* __restrict__ dk_part,
                                       const float* __restrict__ dv_part, float* __restrict__ dk,
                                       float* __restrict__ dv) {
  const int per_kv = d.Hd / d.Hkv;
  const size_t row_elems = (size_t)d.Lk * d.D, n = (size_t)d.B * d.Hkv * row_elems;
  for (size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x; x < n;
       x += (size_t)gridDim.x * blockDim.x) {
    const size_t bhk = x / row_elems, rest = x % row_elems;
    const size_t b = bhk / d.Hkv, hk = bhk % d.Hkv;
    float sk = 0.0f, sv = 0.0f;
    for (int h = 0; h < per_kv; ++h) {
      const size_t src = (b * d.Hd + hk * per_kv + h) * row_elems + rest;
      sk += dk_part[src];
      sv += dv_part[src];
    }
    dk[x] = sk;
    dv[x] = sv;
  }
}

template <typename T>
void launch_dsum(const Dims& d, const AttnArgs& a, cudaStream_t st) {
  const int rows = d.B * d.Hq * d.Lq;
  dsum_kernel<T><<<(rows * 32 + 255) / 256, 256, 0, st>>>(rows, d.D, static_cast<const T*>(a.dout),
                                                          a.o, const_cast<float*>(a.dsum));
  DMA_CUDA_CHECK_LAUNCH(dsum_kernel);
}

template <typename T, int D>
void launch_dq(const Dims& d, const AttnArgs& a, cudaStream_t st) {
  constexpr size_t q_smem = dq_smem_bytes<D>();
  DMA_CUDA_CHECK(cudaFuncSetAttribute(dq_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      (int)q_smem));
  dq_kernel<T, D><<<dim3(table_tiles(d) * (kTileQ / kDqBlockQ<D>), d.Hq, d.B), kDqThreads<D>, q_smem,
                    st>>>(d, a);
  DMA_CUDA_CHECK_LAUNCH(dq_kernel);
}

template <typename T, int D>
void launch_dkdv(const Dims& d, const AttnArgs& a, cudaStream_t st) {
  constexpr size_t k_smem = dkdv_smem_bytes<D>();
  DMA_CUDA_CHECK(cudaFuncSetAttribute(dkdv_kernel<T, D>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)k_smem));
  const int S = tables_implicit(d) ? d.Lk : table_stride(d);
  const dim3 grid((S + kSlots - 1) / kSlots, d.B * d.Hd, D / kDkdvCols<D>);
  dkdv_kernel<T, D><<<grid, kKThreads, k_smem, st>>>(d, a);
  DMA_CUDA_CHECK_LAUNCH(dkdv_kernel);
}

}  // namespace

// dk, dv (or dk_part, dv_part) and ddelta must be zeroed; writes dsum (scratch, B*Hq*Lq) and dq.
void launch_backward(const Dims& d, const AttnArgs& a, cudaStream_t st) {
  dispatch_elem(d.precision, [&](auto elem) { launch_dsum<decltype(elem)>(d, a, st); });
  // (a bad DMA_CUDA_BACKWARD throws here, whether or not the library has the wgmma kernels)
  [[maybe_unused]] const char* family = backward_kernel_name(d.D);
#if defined(DMA_HAVE_SM90)
  if (std::strcmp(family, "sm90") == 0) {
    launch_dq_sm90(d, a, st);  // dq_sm90.cu
    launch_dkdv_sm90(d, a, st);  // backward_sm90.cu
  } else
#endif
  {
    dispatch<32, 64, 128, 256>(d.precision, d.D, [&](auto elem, auto head_dim) {
      launch_dq<decltype(elem), decltype(head_dim)::value>(d, a, st);
      launch_dkdv<decltype(elem), decltype(head_dim)::value>(d, a, st);
    });
  }
  if (backward_partials(d)) {
    reduce_partials_kernel<<<1024, 256, 0, st>>>(d, a.dk_part, a.dv_part, a.dk, a.dv);
    DMA_CUDA_CHECK_LAUNCH(reduce_partials_kernel);
  }
}

}  // namespace dma::cuda::detail
