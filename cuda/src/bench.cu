// The benchmark driver (dma/cuda_bench.hpp): random inputs made on the device, the phases of the
// device API timed with events, medians over many runs, and the pair counts of the mask built.
#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <vector>

#include "common.cuh"
#include "device_memory.hpp"
#include "dma/cuda_bench.hpp"
#include "dma/mask_rule.hpp"
#include "tables.cuh"

namespace dma::cuda {

namespace {

using detail::DeviceBuffer;
using detail::download;

__device__ __forceinline__ uint32_t hash32(uint64_t x) {
  x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull; x ^= x >> 33;
  return static_cast<uint32_t>(x);
}
// Fills with N(0, sd^2) (Box-Muller on a counter hash) or U(-sd, sd), as elem or float.
template <typename T>
__global__ void random_kernel(T* out, size_t n, uint64_t seed, float sd, bool uniform) {
  const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const float u1 = (hash32(seed * 0x9E3779B97F4A7C15ull + 2 * i) + 1.0f) * 2.3283064e-10f;
  const float u2 = hash32(seed * 0x9E3779B97F4A7C15ull + 2 * i + 1) * 2.3283064e-10f;
  const float x = uniform ? sd * (2.0f * u2 - 1.0f)
                          : sd * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
  out[i] = static_cast<T>(x);
}
template <typename T>
DeviceBuffer random_buffer(size_t n, uint64_t seed, float sd, bool uniform, cudaStream_t st) {
  DeviceBuffer b(n * sizeof(T));
  random_kernel<T><<<(unsigned)((n + 255) / 256), 256, 0, st>>>(b.as<T>(), n, seed, sd, uniform);
  DMA_CUDA_CHECK_LAUNCH(random_kernel);
  return b;
}
DeviceBuffer random_elem(size_t n, Precision precision, uint64_t seed, cudaStream_t st) {
  DeviceBuffer b;
  detail::dispatch_elem(precision, [&](auto elem) {
    b = random_buffer<decltype(elem)>(n, seed, 1.0f, false, st);
  });
  return b;
}

double median(std::vector<double> x) {
  std::sort(x.begin(), x.end());
  const size_t n = x.size();
  return n == 0 ? 0.0 : (n % 2 ? x[n / 2] : 0.5 * (x[n / 2 - 1] + x[n / 2]));
}

// Kept pairs (summed over query heads) and the pairs the gathered tile math runs on, from the
// mask that was built: O(B*Hd*Lk) for the first, O(tiles * Lk) for the second.
void count_pairs(const Shape& s, const Options& opt, const std::vector<int32_t>& evict, int tile_q,
                 int tile_k, BenchResult& res) {
  const int64_t heads_per_delta = s.Hq / s.Hd;
  const int64_t p_lo = query_position(s, opt.causal, 0), p_hi = query_position(s, opt.causal, s.Lq - 1);
  for (int64_t bh = 0; bh < s.B * s.Hd; ++bh) {
    const int32_t* e_bh = &evict[bh * s.Lk];
    double kept = 0;
    for (int64_t j = 0; j < s.Lk; ++j) {
      // Non-causal: all queries share p = Lk-1, so the span counts a key once; it counts Lq times.
      const int64_t span = rule::kept_positions<int64_t>(j, e_bh[j], p_lo, p_hi);
      kept += opt.causal ? (double)span : (double)span * (double)s.Lq;
    }
    res.kept_pairs += kept * heads_per_delta;
    for (int64_t i0 = 0; i0 < s.Lq; i0 += tile_q) {
      const int64_t i1 = std::min<int64_t>(i0 + tile_q, s.Lq) - 1;
      const int64_t p_first = query_position(s, opt.causal, i0), p_last = query_position(s, opt.causal, i1);
      int64_t n = 0;
      for (int64_t j = 0; j <= p_last; ++j) n += rule::is_candidate<int64_t>(j, e_bh[j], p_first);
      res.computed_pairs += (double)((n + tile_k - 1) / tile_k) * tile_k * tile_q * heads_per_delta;
    }
  }
  const double Lq = (double)s.Lq, Lk = (double)s.Lk;
  res.dense_causal_pairs = (double)(s.B * s.Hq) *
                           (opt.causal ? Lq * (Lk - Lq) + Lq * (Lq + 1) / 2 : Lq * Lk);
}

}  // namespace

BenchResult bench_pipeline(const Shape& s, const Options& opt, const BenchOptions& bo) {
  const Config c = detail::device_config(s, opt, bo.precision);
  detail::StreamGuard sg;
  const cudaStream_t st = sg.st;
  const Stream stream = st;
  const size_t q_n = (size_t)s.q_numel(), kv_n = (size_t)s.kv_numel();
  const size_t delta_n = (size_t)s.delta_numel(), lse_n = (size_t)s.lse_numel();

  const DeviceBuffer q = random_elem(q_n, bo.precision, bo.seed * 16 + 1, st);
  const DeviceBuffer k = random_elem(kv_n, bo.precision, bo.seed * 16 + 2, st);
  const DeviceBuffer v = random_elem(kv_n, bo.precision, bo.seed * 16 + 3, st);
  const DeviceBuffer dout = bo.backward ? random_elem(q_n, bo.precision, bo.seed * 16 + 4, st)
                                        : DeviceBuffer();
  const DeviceBuffer w_dt = random_buffer<float>((size_t)s.w_dt_numel(), bo.seed * 16 + 5,
                                                 1.0f / std::sqrt(float(s.Hkv * s.D)), false, st);
  const DeviceBuffer a = random_buffer<float>((size_t)s.Hd, bo.seed * 16 + 6, 1.0f, true, st);
  DeviceBuffer delta(delta_n * 4), mask_state(mask_state_bytes(c)), status(8);
  DeviceBuffer o(q_n * 4), lse(lse_n * 4);
  const size_t ws_bytes = workspace_bytes(c);
  DeviceBuffer workspace(ws_bytes);
  DeviceBuffer dq, dk, dv, ddelta, dw_dt, da;
  if (bo.backward) {
    dq = DeviceBuffer(q_n * 4), dk = DeviceBuffer(kv_n * 4), dv = DeviceBuffer(kv_n * 4);
    ddelta = DeviceBuffer(delta_n * 4);
    dw_dt = DeviceBuffer((size_t)s.w_dt_numel() * 4), da = DeviceBuffer((size_t)s.Hd * 4);
  }
  DeviceBuffer flush(bo.flush_l2 ? (size_t)256 << 20 : 0);

  BenchResult res;
  for (const DeviceBuffer* b : std::initializer_list<const DeviceBuffer*>{&q, &k, &v, &dout, &w_dt, &a, &delta, &mask_state, &status, &o,
        &lse, &workspace, &dq, &dk, &dv, &ddelta, &dw_dt, &da})
    res.peak_bytes += (double)b->bytes();
  res.tile_q = detail::kTileQ;
  res.tile_k = detail::kBk;

  void* ws = workspace.as<void>();
  std::vector<double> t_delta, t_mask, t_fwd, t_bwd, t_dw, t_total;
  detail::Event e[6];
  for (int rep = 0; rep < bo.warmup + bo.reps; ++rep) {
    if (bo.flush_l2) DMA_CUDA_CHECK(cudaMemsetAsync(flush.as<void>(), rep & 0xff, flush.bytes(), st));
    e[0].record(st);
    dynamic_weights(c, v.as<void>(), w_dt.as<float>(), a.as<float>(), delta.as<float>(),
                    status.as<int64_t>(), ws, ws_bytes, stream);
    e[1].record(st);
    build_mask(c, delta.as<float>(), mask_state.as<void>(), ws, ws_bytes, stream);
    e[2].record(st);
    attention_forward(c, q.as<void>(), k.as<void>(), v.as<void>(), delta.as<float>(),
                      mask_state.as<void>(), o.as<float>(), lse.as<float>(), stream);
    e[3].record(st);
    if (bo.backward)
      attention_backward(c, q.as<void>(), k.as<void>(), v.as<void>(), delta.as<float>(),
                         mask_state.as<void>(), o.as<float>(), lse.as<float>(), dout.as<void>(),
                         dq.as<float>(), dk.as<float>(), dv.as<float>(), ddelta.as<float>(), ws,
                         ws_bytes, stream);
    e[4].record(st);
    if (bo.backward)
      dynamic_weights_backward(c, v.as<void>(), w_dt.as<float>(), a.as<float>(),
                               ddelta.as<float>(), dw_dt.as<float>(), da.as<float>(),
                               dv.as<float>(), ws, ws_bytes, stream);
    e[5].record(st);
    DMA_CUDA_CHECK(cudaStreamSynchronize(st));
    if (rep < bo.warmup) continue;
    t_delta.push_back(e[1].ms_since(e[0]));
    t_mask.push_back(e[2].ms_since(e[1]));
    t_fwd.push_back(e[3].ms_since(e[2]));
    t_bwd.push_back(e[4].ms_since(e[3]));
    t_dw.push_back(e[5].ms_since(e[4]));
    t_total.push_back(e[5].ms_since(e[0]));
  }
  DMA_CUDA_CHECK(cudaGetLastError());
  res.delta_ms = median(t_delta);
  res.mask_ms = median(t_mask);
  res.forward_ms = median(t_fwd);
  res.backward_ms = median(t_bwd);
  res.dw_backward_ms = median(t_dw);
  res.total_ms = median(t_total);

  std::vector<int32_t> evict = download<int32_t>(evict_of(mask_state.as<void>()), delta_n, st);
  count_pairs(s, opt, evict, res.tile_q, res.tile_k, res);
  if (bo.keep_mask) {
    res.delta = download<float>(delta.as<void>(), delta_n, st);
    res.evict = std::move(evict);
  }
  return res;
}

}  // namespace dma::cuda
