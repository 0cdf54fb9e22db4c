// DMA backward on Hopper (sm_90a): backward.cu's key-major pass (dk, dv and ddelta by alive
// slots) with its four products on wgmma. The query-major dq pass is dq_sm90.cu.
//
// One block = kSlots = 64 slots of one (b, delta head): a consumer warpgroup whose 64 wgmma rows
// are the slots (warp w owns slots 16w .. 16w+15, as in backward.cu) and a producer warpgroup.
// The producer walks the query tiles of its span (below) in order: it reads the slots' keys at
// tile t from the tables and, when one of them lives, hands the consumer a record of them (their
// keys, e_j, delta_j and their range), then copies the tile's steps: for every query head of the
// delta head, each half of the tile (kSubQ queries) that a slot key reaches, its rows of q and
// dO and their lse and D_i, into one of two buffers handed over by mbarrier (as in
// forward_sm90.cu).
// Per record the consumer writes out the keys that leave their slots (dK, dV, ddelta in
// registers until then) and fetches the rows of K and V of the new ones; then per step
// (paper notation, rows = the 64 slots' keys j, columns = the step's queries i):
//   S^T  = K Q^T,  dP^T = V dO^T          wgmma m64n64k16, Q, dO in shared memory; K, V
//                                         in shared memory at D = 128, at D = 64 in registers
//                                         (the A operand: each thread reads its own two slots'
//                                         rows, so no consumer waits for another's copies)
//   P^T  = 2^(log2e (scale S^T + delta_j) - log2e lse_i), 0 where not kept
//   dS^T = P^T (dP^T - D_i),  ddelta_j += sum_i dS^T[j, i]
//   dV  += P^T dO,  dK += dS^T Q           wgmma m64nDk16, P^T and dS^T from registers
// and dk = scale * dK when the key leaves. Two blocks share an SM, so that one's elementwise
// work runs while the other's products do. With one span (the whole sweep in one block) every
// gradient is written once; with several, the sums carried across a span's first tile are
// added by sweep_fixup_kernel in span order (kernels.hpp). Either way the order of summation is
// fixed: the pass is deterministic, as backward.cu's is.
#include <climits>

#include "gather_sm90.cuh"
#include "kernels.hpp"

namespace dma::cuda::detail {
namespace {

using namespace sm90;

constexpr int kSlots = kSweepSlots;      // 64: one wgmma row per slot
constexpr int kSubQ = 64;                // queries per step: half a table tile
constexpr int kConsumers = 128, kThreads = kConsumers + kProducers;
constexpr int kBlocksPerSm = 2;
// Registers per thread after setmaxnreg: 65536 / kBlocksPerSm per block, 128 each at launch.
// (With 224 for the consumer ptxas spilled 8 bytes at D = 128; 232 holds it all, and the
// producer's copies fit in 24.)
constexpr int kProducerRegs = 24, kConsumerRegs = 232;
static_assert(kProducers * kProducerRegs + kConsumers * kConsumerRegs ==
                  launch_registers(kThreads, kBlocksPerSm),
              "registers");
static_assert(kTileQ % kSubQ == 0, "steps cut the table tiles evenly");
// K and V as register A operands: 2 x 16 registers a thread at D = 64, which frees the block's
// barrier among the consumers and 16 KB of shared memory. At D = 128 (2 x 32) ptxas spilled
// 288 bytes (and 40 with K alone), so there they stay in shared memory.
template <int D>
constexpr bool kKvInRegisters = D == 64;

// The keys of the block's slots at one query tile, as the producer hands them over.
struct SlotRecord {
  int t;                    // the query tile; -1: the sweep is over
  int lo_key, hi_key;       // the smallest and largest live key (hi_key = -1: none lives)
  int lo_evict, hi_evict;   // the smallest and largest e_j of the live keys
  int all_live;             // every slot holds a key
  int key[kSlots];          // -1: empty
  int evict[kSlots];
  float delta2[kSlots];     // delta_j * log2(e)
};
// Some live key may be kept by a query position in [p_lo, p_hi] (the step has work): with
// lo_key the smallest live key and hi_evict the largest e_j.
__device__ __forceinline__ bool step_active(int lo_key, int hi_evict, int p_lo, int p_hi) {
  return lo_key <= p_hi && hi_evict >= p_lo;
}
// Every slot's key is kept by every position in [p_lo, p_hi] (no element mask needed).
__device__ __forceinline__ bool step_full(const SlotRecord& rc, int p_lo, int p_hi) {
  return rc.all_live && rc.hi_key <= p_lo && rc.lo_evict >= p_hi;
}

// Where the sums of (b, delta head) bhd go: dk, dv (per delta head when Hd > Hkv) and ddelta
// rows of key j, or the carry entry of slot s in span > 0 (kernels.hpp).
struct SweepOut {
  float *dk, *dv, *ddelta;           // rows j
  float *carry_dk, *carry_dv, *carry_dd;  // entries of this (span, bhd): slot s
  __device__ SweepOut(const Dims& d, const AttnArgs& a, int bhd, int span) {
    const int hk = bhd % d.Hd * (d.Hq / d.Hd) / (d.Hq / d.Hkv);  // as the kernel's
    const size_t bhk = (size_t)(bhd / d.Hd * d.Hkv + hk);
    const bool partials = backward_partials(d);
    dk = partials ? a.dk_part + (size_t)bhd * d.Lk * d.D : a.dk + bhk * d.Lk * d.D;
    dv = partials ? a.dv_part + (size_t)bhd * d.Lk * d.D : a.dv + bhk * d.Lk * d.D;
    ddelta = a.ddelta + (size_t)bhd * d.Lk;
    const size_t slots = (size_t)sweep_slot_blocks(d) * kSlots;
    const size_t entries = (size_t)(sweep_spans(d) - 1) * d.B * d.Hd * slots;
    const size_t first = (size_t)(span > 0 ? span - 1 : 0) * d.B * d.Hd * slots + (size_t)bhd * slots;
    carry_dk = a.carry + first * d.D;
    carry_dv = a.carry + (entries + first) * d.D;
    carry_dd = a.carry + 2 * entries * d.D + first;
  }
};

// Key j in slot s at tile t > 0 lived there at tile t-1 too (its sums before t are another span's).
__device__ __forceinline__ bool carried_into(const Dims& d, const TableView& tv, int t, int s, int j) {
  return tv.slot(t - 1, s, rule::query_position(d.Lq, d.Lk, d.causal, t * kTileQ - 1)) == j;
}

template <int D>
struct Smem {  // byte offsets from a 1024-aligned base
  static constexpr uint32_t tile_bytes = 64 * D * 2;  // 64 rows of D elements, swizzled
  static constexpr uint32_t kv_bytes = kKvInRegisters<D> ? 0 : tile_bytes;
  static constexpr uint32_t k = 0, v = k + kv_bytes;  // the slots' K and V rows (D = 128)
  static constexpr uint32_t q = v + kv_bytes;         // 2 buffers: the step's q rows
  static constexpr uint32_t dout = q + 2 * tile_bytes;  // 2 buffers: its dO rows
  static constexpr uint32_t lse = dout + 2 * tile_bytes;        // 2 x [kSubQ] float
  static constexpr uint32_t dsum = lse + 2 * kSubQ * 4;         // 2 x [kSubQ] float
  static constexpr uint32_t records = dsum + 2 * kSubQ * 4;     // 2 x SlotRecord
  static constexpr uint32_t partial = records + 2 * sizeof(SlotRecord);  // 2 x [4 warps][5] int
  static constexpr uint32_t bars = partial + 2 * 4 * 5 * 4;  // full[2] empty[2] rec_full[2] rec_empty[2]
  static constexpr uint32_t bytes = bars + 8 * sizeof(uint64_t) + 1024;  // + alignment slack
};

// The steps of tile t, in the order both warpgroups walk them: query head h of the delta head,
// then the tile's halves; f(h, i0, p_lo, p_hi) for each.
template <typename F>
__device__ __forceinline__ void for_each_step(const Dims& d, int t, int heads, F&& f) {
  const int i_begin = t * kTileQ, i_end = min(i_begin + kTileQ, d.Lq);
  for (int h = 0; h < heads; ++h)
    for (int i0 = i_begin; i0 < i_end; i0 += kSubQ)
      f(h, i0, rule::query_position(d.Lq, d.Lk, d.causal, i0),
        rule::query_position(d.Lq, d.Lk, d.causal, min(i0 + kSubQ, d.Lq) - 1));
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, kBlocksPerSm) dkdv_sm90_kernel(Dims d, AttnArgs a) {
  static_assert(Smem<D>::bytes * kBlocksPerSm <= 228 * 1024, "two blocks' shared memory per SM");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Smem<D>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - smem_addr(smem_raw) % 1024) % 1024);
  const uint32_t base = smem_addr(smem);
  SlotRecord* records = reinterpret_cast<SlotRecord*>(smem + L::records);
  float* lse_s = reinterpret_cast<float*>(smem + L::lse);
  float* dsum_s = reinterpret_cast<float*>(smem + L::dsum);
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::bars);  // step buffer b holds data
  uint64_t* empty = full + 2;                                     // step buffer b is free
  uint64_t* rec_full = full + 4;                                  // record r is written
  uint64_t* rec_empty = full + 6;                                 // record r is free

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int s0 = blockIdx.x * kSlots, bhd = blockIdx.y;
  // The span of query tiles (kernels.hpp), the last first: when causal, the first span's early
  // tiles hold fewer keys, so its blocks are the shortest, and they fill the last wave.
  const int span = gridDim.z - 1 - blockIdx.z;
  const int b = bhd / d.Hd, hd = bhd % d.Hd;
  const int heads = d.Hq / d.Hd;  // query heads of this delta head
  const int hq0 = hd * heads, hk = hq0 / (d.Hq / d.Hkv);
  const size_t bhk = (size_t)(b * d.Hkv + hk);
  const int* evict_bh = a.evict + (size_t)bhd * d.Lk;
  const float* delta_bh = a.delta + (size_t)bhd * d.Lk;

  if (tid == 0) {
    for (int i = 0; i < 2; ++i) {
      mbarrier_init(full + i, kProducers);        // every producer thread
      mbarrier_init(empty + i, kConsumers);  // every consumer thread (each read lse and D_i)
      mbarrier_init(rec_full + i, kProducers);
      mbarrier_init(rec_empty + i, kConsumers);
    }
  }
  __syncthreads();  // the barriers are initialized (the only barrier across the block)

  if (tid >= kConsumers) {
    // ---- The producer: records and steps, in the consumer's order. ----
    set_max_registers<kProducerRegs, false>();
    const int pt = tid - kConsumers, pw = pt / 32;
    const int S = tables_implicit(d) ? d.Lk : table_stride(d);
    const int t_begin = span * sweep_span_tiles(d);
    const int t_end = min(t_begin + sweep_span_tiles(d), table_tiles(d));
    const TableView tv(d, a.tables, bhd);
    int* partial = reinterpret_cast<int*>(smem + L::partial);
    int n_rec = 0, n_step = 0;
    for (int t = t_begin; t < t_end; ++t) {
      const int p_last = rule::query_position(d.Lq, d.Lk, d.causal, min((t + 1) * kTileQ, d.Lq) - 1);
      const int j = pt < kSlots && s0 + pt < S ? tv.slot(t, s0 + pt, p_last) : -1;
      const int e = j >= 0 ? __ldg(evict_bh + j) : -1;
      // The range of the live keys: per warp, then over the 4 warps (partial[t % 2], so that
      // the next tile's writes cannot meet this tile's reads).
      const int mine[5] = {j >= 0 ? j : INT_MAX, j, j >= 0 ? e : INT_MAX, e,
                           pt < kSlots && j < 0 ? 1 : 0};
      int* part = partial + (t % 2) * 20;
      #pragma unroll
      for (int x = 0; x < 5; ++x) {
        const int red = (x == 0 || x == 2) ? __reduce_min_sync(0xffffffffu, mine[x])
                                           : __reduce_max_sync(0xffffffffu, mine[x]);
        if (lane == 0) part[pw * 5 + x] = red;
      }
      named_barrier_sync(1, kProducers);
      int range[5] = {INT_MAX, -1, INT_MAX, -1, 0};
      #pragma unroll
      for (int w = 0; w < 4; ++w) {
        range[0] = min(range[0], part[w * 5 + 0]);
        range[1] = max(range[1], part[w * 5 + 1]);
        range[2] = min(range[2], part[w * 5 + 2]);
        range[3] = max(range[3], part[w * 5 + 3]);
        range[4] = max(range[4], part[w * 5 + 4]);
      }
      if (range[1] < 0) continue;  // no slot lives at tile t (uniform over the producer)

      if (n_rec >= 2) mbarrier_wait(rec_empty + n_rec % 2, (n_rec / 2 - 1) & 1);
      SlotRecord& rc = records[n_rec % 2];
      if (pt < kSlots) {
        rc.key[pt] = j;
        rc.evict[pt] = e;
        rc.delta2[pt] = j >= 0 ? __ldg(delta_bh + j) * kLog2e : 0.0f;
      }
      if (pt == 0) {
        rc.t = t;
        rc.lo_key = range[0], rc.hi_key = range[1];
        rc.lo_evict = range[2], rc.hi_evict = range[3];
        rc.all_live = range[4] == 0;
      }
      mbarrier_arrive(rec_full + n_rec % 2);
      ++n_rec;
      for_each_step(d, t, heads, [&](int h, int i0, int p_lo, int p_hi) {
        if (!step_active(range[0], range[3], p_lo, p_hi)) return;
        const int buf = n_step % 2;
        if (n_step >= 2) mbarrier_wait(empty + buf, (n_step / 2 - 1) & 1);
        const size_t bhq = (size_t)(b * d.Hq + hq0 + h);
        produce_rows<T, D, 64>(smem + L::q + buf * L::tile_bytes,
                        static_cast<const T*>(a.q) + bhq * d.Lq * D, i0, d.Lq, pt);
        produce_rows<T, D, 64>(smem + L::dout + buf * L::tile_bytes,
                        static_cast<const T*>(a.dout) + bhq * d.Lq * D, i0, d.Lq, pt);
        if (pt < kSubQ) {
          const size_t i = bhq * d.Lq + min(i0 + pt, d.Lq - 1);  // (rows past Lq are never kept)
          cp_async_4(lse_s + buf * kSubQ + pt, a.lse + i, true);
          cp_async_4(dsum_s + buf * kSubQ + pt, a.dsum + i, true);
        }
        cp_async_commit();
        cp_async_wait<0>();
        fence_proxy_async();  // the tensor cores read q and dO next
        mbarrier_arrive(full + buf);
        ++n_step;
      });
    }
    if (n_rec >= 2) mbarrier_wait(rec_empty + n_rec % 2, (n_rec / 2 - 1) & 1);
    if (pt == 0) records[n_rec % 2].t = -1;
    mbarrier_arrive(rec_full + n_rec % 2);
    return;
  }

  // ---- The consumer warpgroup. ----
  set_max_registers<kConsumerRegs, true>();
  const int g = lane / 4, t4 = lane % 4;
  const T* k_bh = static_cast<const T*>(a.k) + bhk * d.Lk * D;
  const T* v_bh = static_cast<const T*>(a.v) + bhk * d.Lk * D;
  const float scale2 = d.scale * kLog2e;

  // Descriptors (sm90.cuh). K-major: K, V as A (the slots' rows), q, dO as B of S^T and dP^T;
  // a k16 step of D is 32 bytes inside a 64-wide column block, the next block 64 * 128 bytes on.
  // MN-major: q, dO as B of dK and dV (k runs over the step's queries: 16 rows = 2048 bytes).
  const uint64_t kmajor0 = descriptor(base, 16, 1024), mnmajor0 = descriptor(base, 64 * 128, 1024);
  auto kmajor = [&](uint32_t tile, int kk) {
    return moved(moved(kmajor0, tile), (kk / 4) * (64 * 128) + (kk % 4) * 32);
  };
  auto mnmajor = [&](uint32_t tile, int kk) { return moved(moved(mnmajor0, tile), kk * 16 * 128); };

  float dk_acc[D / 2], dv_acc[D / 2];  // dK, dV of the slots' keys: 64 x D (layout in sm90.cuh)
  #pragma unroll
  for (int n = 0; n < D / 2; ++n) dk_acc[n] = dv_acc[n] = 0.0f;
  float dd[2] = {0.0f, 0.0f};  // ddelta partial sums of this thread's two rows
  const int slot_l[2] = {warp * 16 + g, warp * 16 + g + 8};
  // (The keys of this thread's slots, their e_j and delta_j are read from the record where they
  // are used: held in registers across the steps, they made ptxas spill.)
  // At D = 64 the rows of K and V of this thread's two slots, as the A operand of S^T and dP^T
  // (load_a_operand's layout: slice kk, register 2h + r holds row slot_l[r], columns
  // 16 kk + 8 h + 2 t4 + 0..1, i.e. 32-bit word 8 kk + 4 h + t4 of the row).
  constexpr int kKvSlices = kKvInRegisters<D> ? D / 16 : 1;
  uint32_t kf[kKvSlices][4], vf[kKvSlices][4];
  // Row j of K and V into the registers of slot row r (zeros for an empty slot, j < 0).
  auto load_kv_operands = [&](int r, int j) {
    const uint32_t* k_row = reinterpret_cast<const uint32_t*>(k_bh + (size_t)max(j, 0) * D);
    const uint32_t* v_row = reinterpret_cast<const uint32_t*>(v_bh + (size_t)max(j, 0) * D);
    #pragma unroll
    for (int kk = 0; kk < kKvSlices; ++kk)
      #pragma unroll
      for (int h = 0; h < 2; ++h) {
        kf[kk][2 * h + r] = j >= 0 ? __ldg(k_row + 8 * kk + 4 * h + t4) : 0u;
        vf[kk][2 * h + r] = j >= 0 ? __ldg(v_row + 8 * kk + 4 * h + t4) : 0u;
      }
  };

  // Writes the gradients of this thread's keys that leave their slots (the keys of record prev,
  // where next differs), or their carried sums, and clears their accumulators (by selects, so
  // that the accumulators keep one definition for the wgmma).
  auto flush = [&](const SlotRecord* prev, const int next[2]) {
    #pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float sum = quad_sum(dd[r]);  // ddelta: the quad's 4 partial row sums
      const int j = prev ? prev->key[slot_l[r]] : -1;
      const bool leaves = next[r] != j;  // (the same for the 4 threads of a quad)
      if (leaves && j >= 0) {
        // (computed here, where it is needed: held, these would take registers from the steps)
        const SweepOut out(d, a, bhd, span);
        const bool carried =
            span > 0 && carried_into(d, TableView(d, a.tables, bhd), span * sweep_span_tiles(d), s0 + slot_l[r], j);
        const size_t row = carried ? (size_t)(s0 + slot_l[r]) : (size_t)j;
        float* dk_row = (carried ? out.carry_dk : out.dk) + row * D;
        float* dv_row = (carried ? out.carry_dv : out.dv) + row * D;
        #pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          *reinterpret_cast<float2*>(dk_row + n * 8 + t4 * 2) =
              make_float2(dk_acc[4 * n + 2 * r] * d.scale, dk_acc[4 * n + 2 * r + 1] * d.scale);
          *reinterpret_cast<float2*>(dv_row + n * 8 + t4 * 2) =
              make_float2(dv_acc[4 * n + 2 * r], dv_acc[4 * n + 2 * r + 1]);
        }
        if (t4 == 0) (carried ? out.carry_dd : out.ddelta)[row] = sum;
      }
      #pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        #pragma unroll
        for (int e = 0; e < 2; ++e) {
          dk_acc[4 * n + 2 * r + e] = leaves ? 0.0f : dk_acc[4 * n + 2 * r + e];
          dv_acc[4 * n + 2 * r + e] = leaves ? 0.0f : dv_acc[4 * n + 2 * r + e];
        }
      }
      dd[r] = leaves ? 0.0f : dd[r];
    }
  };

  // At D = 128: the K, V rows of the slots whose key changed since record prev (all of them at
  // the first; empty slots get zero rows) into their shared tiles. A thread overwrites rows
  // other warps' products read: safe because every wgmma of the last step has completed for
  // the whole warpgroup (this thread's wait<0> returned, and dK's product, issued by every warp
  // only after its own products reading K and V were waited for, is one collective operation).
  // The copies shared as the producers' are (gather_sm90.cuh's RowPhase: one swizzle phase per
  // thread).
  auto copy_kv_rows = [&](const SlotRecord& rc, const SlotRecord* prev) {
    using P = RowPhase<D, kSlots>;
    static_assert(kConsumers == kProducers, "a warpgroup's copies");
    const P ph(tid);
    #pragma unroll
    for (int x = 0; x < P::kCopies; ++x) {
      const int r = ph.row0 + x * P::kRowStep, j = rc.key[r];
      if (prev && prev->key[r] == j) continue;
      const size_t src = (size_t)max(j, 0) * D + ph.chunk * 8;
      cp_async_16(smem + L::k + ph.dst0 + x * P::kStepBytes, k_bh + src, j >= 0);
      cp_async_16(smem + L::v + ph.dst0 + x * P::kStepBytes, v_bh + src, j >= 0);
    }
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    named_barrier_sync(2, kConsumers);  // the rows are in, and every thread has read prev
  };

  for (int n_rec = 0, n_step = 0;; ++n_rec) {
    mbarrier_wait(rec_full + n_rec % 2, (n_rec / 2) & 1);
    const SlotRecord& rc = records[n_rec % 2];
    const int t = rc.t;
    const int next[2] = {t >= 0 ? rc.key[slot_l[0]] : -1, t >= 0 ? rc.key[slot_l[1]] : -1};
    const SlotRecord* prev = n_rec > 0 ? &records[(n_rec - 1) % 2] : nullptr;
    // The new keys' rows: at D = 64 into this thread's registers, issued before flush's stores
    // so that their latency overlaps them (no other consumer is waited for); at D = 128 into
    // the shared tiles once flush has stored the departing keys' gradients.
    if constexpr (kKvInRegisters<D>) {
      #pragma unroll
      for (int r = 0; r < 2; ++r)
        if (t >= 0 && !(prev && prev->key[slot_l[r]] == next[r])) load_kv_operands(r, next[r]);
    }
    flush(prev, next);
    if constexpr (!kKvInRegisters<D>) {
      if (t < 0) break;  // (the end record has no rows to copy)
      copy_kv_rows(rc, prev);
    }
    if (prev) mbarrier_arrive(rec_empty + (n_rec - 1) % 2);  // this thread has read prev
    if (t < 0) break;

    for_each_step(d, t, heads, [&](int, int i0, int p_lo, int p_hi) {
      if (!step_active(rc.lo_key, rc.hi_evict, p_lo, p_hi)) return;
      const int buf = n_step % 2;
      mbarrier_wait(full + buf, (n_step / 2) & 1);
      const uint32_t q_tile = L::q + buf * L::tile_bytes, do_tile = L::dout + buf * L::tile_bytes;

      // The order keeps at most dK, dV and one 64 x kSubQ fp32 product in registers, and
      // lets dV's product run during the elementwise dS:
      //   S^T; P^T (rounded: the A operand of dV); dP^T and dV += P^T dO issued together;
      //   dS^T = P^T (dP^T - D_i) once dP^T is in, from the rounded P^T; dK += dS^T Q.
      float acc[kSubQ / 2];  // S^T, then dP^T: 64 slots x kSubQ queries
      uint32_t pf[kSubQ / 16][4], sf[kSubQ / 16][4];  // P^T, dS^T as register A operands
      wgmma_fence();
      #pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        if constexpr (kKvInRegisters<D>) wgmma_rs_kmajor<T, kSubQ>(acc, kf[kk], kmajor(q_tile, kk), kk > 0);
        else wgmma_ss<T, kSubQ>(acc, kmajor(L::k, kk), kmajor(q_tile, kk), kk > 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers(acc);

      // P^T (acc[4n + 2r + e]: slot row slot_l[r], query column 8n + 2t4 + e); k16 slice kk of
      // the queries is the accumulators of column blocks 2kk, 2kk+1 (the A layout, sm90.cuh).
      const float delta2[2] = {rc.delta2[slot_l[0]], rc.delta2[slot_l[1]]};
      const float* lse_t = lse_s + buf * kSubQ;
      const float* dsum_t = dsum_s + buf * kSubQ;
      if (step_full(rc, p_lo, p_hi) && i0 + kSubQ <= d.Lq) {  // (uniform) no element mask
        #pragma unroll
        for (int n = 0; n < kSubQ / 8; ++n) {
          const float2 lse = *reinterpret_cast<const float2*>(lse_t + n * 8 + t4 * 2);
          #pragma unroll
          for (int r = 0; r < 2; ++r) {
            acc[4 * n + 2 * r] = fast_exp2(fmaf(acc[4 * n + 2 * r], scale2, delta2[r]) - lse.x * kLog2e);
            acc[4 * n + 2 * r + 1] = fast_exp2(fmaf(acc[4 * n + 2 * r + 1], scale2, delta2[r]) - lse.y * kLog2e);
          }
        }
      } else {
        // The step's queries that keep row r's key are one range (rule::kept_queries; none for
        // an empty slot, whose e_j is -1), here in columns relative to this thread's first
        // column 2 t4: an element compares its compile-time column n * 8 + e with lo and hi.
        int lo[2], hi[2];
        #pragma unroll
        for (int r = 0; r < 2; ++r) {
          int first, last;
          rule::kept_queries(d.Lq, d.Lk, d.causal, rc.key[slot_l[r]], rc.evict[slot_l[r]], i0,
                             min(i0 + kSubQ, d.Lq), first, last);
          lo[r] = first - i0 - 2 * t4;
          hi[r] = last - i0 - 2 * t4;
        }
        #pragma unroll
        for (int n = 0; n < kSubQ / 8; ++n) {
          const float2 lse = *reinterpret_cast<const float2*>(lse_t + n * 8 + t4 * 2);
          #pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float lse2 = (e == 0 ? lse.x : lse.y) * kLog2e;
            #pragma unroll
            for (int r = 0; r < 2; ++r) {
              const bool kept = n * 8 + e >= lo[r] && n * 8 + e <= hi[r];
              float& x = acc[4 * n + 2 * r + e];
              x = kept ? fast_exp2(fmaf(x, scale2, delta2[r]) - lse2) : 0.0f;
            }
          }
        }
      }
      #pragma unroll
      for (int kk = 0; kk < kSubQ / 16; ++kk)
        #pragma unroll
        for (int x = 0; x < 4; ++x) pf[kk][x] = Elem<T>::pack(acc[8 * kk + 2 * x], acc[8 * kk + 2 * x + 1]);

      wgmma_fence();
      #pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        if constexpr (kKvInRegisters<D>) wgmma_rs_kmajor<T, kSubQ>(acc, vf[kk], kmajor(do_tile, kk), kk > 0);
        else wgmma_ss<T, kSubQ>(acc, kmajor(L::v, kk), kmajor(do_tile, kk), kk > 0);
      }
      wgmma_commit();
      #pragma unroll
      for (int kk = 0; kk < kSubQ / 16; ++kk) wgmma_rs<T, D>(dv_acc, pf[kk], mnmajor(do_tile, kk));
      wgmma_commit();
      wgmma_wait<1>();  // dP^T is in (dV += P^T dO may still run)
      fence_registers(acc);

      #pragma unroll
      for (int kk = 0; kk < kSubQ / 16; ++kk) {
        #pragma unroll
        for (int x = 0; x < 4; ++x) {
          const int col = kk * 16 + (x / 2) * 8 + t4 * 2, r = x % 2;  // acc[8kk + 2x], + 1
          const float2 pv = Elem<T>::unpack(pf[kk][x]);
          const float2 dsum = *reinterpret_cast<const float2*>(dsum_t + col);
          const float ds0 = pv.x * (acc[8 * kk + 2 * x] - dsum.x);  // exactly 0 where P is 0
          const float ds1 = pv.y * (acc[8 * kk + 2 * x + 1] - dsum.y);
          dd[r] += ds0 + ds1;
          sf[kk][x] = Elem<T>::pack(ds0, ds1);
        }
      }
      wgmma_fence();
      #pragma unroll
      for (int kk = 0; kk < kSubQ / 16; ++kk) wgmma_rs<T, D>(dk_acc, sf[kk], mnmajor(q_tile, kk));
      wgmma_commit();
      wgmma_wait<0>();
      fence_registers(dk_acc);
      fence_registers(dv_acc);
      mbarrier_arrive(empty + buf);  // this thread is done with the buffer
      ++n_step;
    });
  }
#endif  // __CUDA_ARCH_FEAT_SM90_ALL
}

// Adds the carried sums to their keys' rows (kernels.hpp): one warp per (b, delta head, slot),
// its lanes over the columns, the spans in order, so that a key carried across several spans is
// summed in order. A key keeps its slot while it lives (docs/design.md §2.9), so no two warps add
// to one row. (With a thread per column, each of the D threads of a slot repeated its lookups.)
__global__ void sweep_fixup_kernel(Dims d, AttnArgs a) {
  const int spans = sweep_spans(d), span_tiles = sweep_span_tiles(d);
  const int S = tables_implicit(d) ? d.Lk : table_stride(d), slots = sweep_slot_blocks(d) * kSlots;
  const int lane = threadIdx.x % 32;
  const size_t n = (size_t)d.B * d.Hd * slots, warps = (size_t)gridDim.x * blockDim.x / 32;
  for (size_t x = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) / 32; x < n; x += warps) {
    const int s = (int)(x % slots), bhd = (int)(x / slots);  // (uniform over the warp)
    if (s >= S) continue;
    const TableView tv(d, a.tables, bhd);
    for (int span = 1; span < spans; ++span) {
      const int t = span * span_tiles;
      const int j = tv.slot(t, s, rule::query_position(d.Lq, d.Lk, d.causal, min((t + 1) * kTileQ, d.Lq) - 1));
      if (j < 0 || !carried_into(d, tv, t, s, j)) continue;
      const SweepOut out(d, a, bhd, span);
      for (int col = lane; col < d.D; col += 32) {
        out.dk[(size_t)j * d.D + col] += out.carry_dk[(size_t)s * d.D + col];
        out.dv[(size_t)j * d.D + col] += out.carry_dv[(size_t)s * d.D + col];
      }
      if (lane == 0) out.ddelta[j] += out.carry_dd[s];
    }
  }
}

template <typename T, int D>
void launch(const Dims& d, const AttnArgs& a, cudaStream_t st) {
  constexpr size_t smem = Smem<D>::bytes;
  DMA_CUDA_CHECK(cudaFuncSetAttribute(dkdv_sm90_kernel<T, D>,
                                      cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
  const dim3 grid(sweep_slot_blocks(d), d.B * d.Hd, sweep_spans(d));
  dkdv_sm90_kernel<T, D><<<grid, kThreads, smem, st>>>(d, a);
  DMA_CUDA_CHECK_LAUNCH(dkdv_sm90_kernel);
  if (sweep_spans(d) > 1) {
    sweep_fixup_kernel<<<1024, 256, 0, st>>>(d, a);
    DMA_CUDA_CHECK_LAUNCH(sweep_fixup_kernel);
  }
}

}  // namespace

void launch_dkdv_sm90(const Dims& d, const AttnArgs& a, cudaStream_t st) {
  dispatch<64, 128>(d.precision, d.D, [&](auto elem, auto head_dim) {
    launch<decltype(elem), decltype(head_dim)::value>(d, a, st);
  });
}

}  // namespace dma::cuda::detail
