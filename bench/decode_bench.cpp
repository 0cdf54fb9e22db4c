// Benchmark of the GPU decode step (dma/cuda_decode.hpp): latency of one step and memory per
// sequence against the context length, for a cache bounded to w keys per (sequence, delta head).
//
// For each (B, w) one cache is allocated and filled with random keys and values; for each context
// length N it is set to the state after N tokens (min(w, N) entries per head at distinct positions
// below N, length N) and then stepped: the new tokens take positions N, N+1, ... and evict as a
// real decode does. A step reads the same w entries whatever N is: that is what the bounded cache
// buys, and the benchmark measures it rather than assuming it. Two times per configuration:
//   step_us_cold  median over --reps single steps, a 256 MB buffer overwritten before each (L2
//                 flushed, outside the timing), CUDA events around the step
//   step_us_hot   mean of --reps back-to-back steps between two events (launches pipelined,
//                 cache in L2 when it fits: the best case)
// Memory: cache_bytes_per_sequence (what the bounded cache holds per sequence) beside
// full_kv_bytes_per_sequence (N*Hkv*D k and v in bf16: what a full KV cache holds).
//
//   decode_bench --N 1024,4096,... --B 1,32 --w 512,2048 [--Hq 16 --Hkv 8 --D 128]
//                [--reps 50] [--warmup 10] [--fp16]
// Prints a JSON array, one object per (B, w, N). Exit codes: 0 success, 2 invalid values (one
// line), 77 no CUDA device; bad flags: the parser's message and its exit code.
#include <CLI/CLI.hpp>
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "dma/cuda.hpp"
#include "dma/cuda_decode.hpp"
#include "dma/numerics.hpp"

namespace {

namespace dc = dma::cuda;

struct Args {
  std::vector<int64_t> Ns = {1024, 4096, 16384, 65536, 262144, 1048576};
  std::vector<int64_t> Bs = {1, 32}, ws = {512, 2048};
  int64_t Hq = 16, Hkv = 8, D = 128;
  int reps = 50, warmup = 10;
  bool fp16 = false;
};

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw dma::Error(std::string(what) + ": " + cudaGetErrorString(err));
}

// One cudaMalloc, freed on scope exit.
struct Mem {
  void* ptr = nullptr;
  explicit Mem(size_t bytes) { check(cudaMalloc(&ptr, std::max<size_t>(bytes, 1)), "cudaMalloc"); }
  ~Mem() { cudaFree(ptr); }
  Mem(const Mem&) = delete;
  Mem& operator=(const Mem&) = delete;
  template <typename T> T* as() const { return static_cast<T*>(ptr); }
};

template <typename T>
void upload(void* dst, const std::vector<T>& src) {
  check(cudaMemcpy(dst, src.data(), src.size() * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy");
}

// Uniform values in [lo, hi), cheaply (the benchmark fills hundreds of MB).
struct Rng {
  uint64_t state;
  float uniform(float lo, float hi) {
    state ^= state << 13, state ^= state >> 7, state ^= state << 17;
    return lo + (hi - lo) * static_cast<float>(state >> 40) / static_cast<float>(1 << 24);
  }
};

std::vector<uint16_t> random_elems(size_t n, bool fp16, Rng& rng) {
  std::vector<uint16_t> x(n);
  for (auto& e : x) {
    const float f = rng.uniform(-1.0f, 1.0f);
    e = fp16 ? dma::to_fp16_bits(f) : dma::to_bf16_bits(f);
  }
  return x;
}

float median(std::vector<float> x) {
  std::sort(x.begin(), x.end());
  return x[x.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  Args a;
  CLI::App app{"decode_bench: times the GPU decode step against the context length; prints a JSON array"};
  app.add_option("--N", a.Ns, "context lengths, comma-separated (>= 1)")->delimiter(',');
  app.add_option("--B", a.Bs, "batch sizes, comma-separated (>= 1)")->delimiter(',');
  app.add_option("--w", a.ws, "windows, comma-separated (>= 1)")->delimiter(',');
  app.add_option("--Hq", a.Hq, "query heads");
  app.add_option("--Hkv", a.Hkv, "key/value heads, also the heads of delta");
  app.add_option("--D", a.D, "head dim (64 or 128)");
  app.add_option("--reps", a.reps, "timed steps per configuration (>= 1)");
  app.add_option("--warmup", a.warmup, "untimed steps first (>= 0)");
  app.add_flag("--fp16", a.fp16, "fp16 k, v (default bf16)");
  CLI11_PARSE(app, argc, argv);

  try {
    if (a.reps < 1) throw dma::Error("--reps " + std::to_string(a.reps) + ": must be >= 1");
    if (a.warmup < 0) throw dma::Error("--warmup " + std::to_string(a.warmup) + ": must be >= 0");
    for (int64_t N : a.Ns)
      if (N < 1 || N >= (int64_t{1} << 30)) throw dma::Error("--N " + std::to_string(N) + ": must be in [1, 2^30)");
    for (int64_t B : a.Bs)
      for (int64_t w : a.ws) {
        dma::DecodeConfig layer;
        layer.B = B; layer.Hq = a.Hq; layer.Hkv = a.Hkv; layer.Hd = a.Hkv; layer.D = a.D; layer.window = w;
        dc::check_decode_config(dc::DecodeConfig{layer, a.fp16 ? dma::Precision::fp16 : dma::Precision::bf16});
      }
  } catch (const dma::Error& e) {
    std::fprintf(stderr, "decode_bench: %s\n", e.what());
    return 2;
  }
  std::string why;
  if (!dc::device_available(&why)) {
    std::fprintf(stderr, "decode_bench: %s\n", why.c_str());
    return 77;
  }

  std::printf("[\n");
  bool first = true;
  Rng rng{0x9E3779B97F4A7C15ull};
  Mem flush(256u << 20);
  for (int64_t B : a.Bs)
    for (int64_t w : a.ws) {
      dma::DecodeConfig layer;
      layer.B = B; layer.Hq = a.Hq; layer.Hkv = a.Hkv; layer.Hd = a.Hkv; layer.D = a.D; layer.window = w;
      const dc::DecodeConfig c{layer, a.fp16 ? dma::Precision::fp16 : dma::Precision::bf16};
      const int64_t Hd = layer.Hd, D = a.D;
      try {
        Mem cache_mem(dc::cache_bytes(c)), workspace(dc::step_workspace_bytes(c)), status(8);
        const dc::DeviceCache cache = dc::cache_in(c, cache_mem.ptr);
        dc::reset_cache(c, cache, nullptr);  // then count, length and the entries are set below
        upload(cache.k, random_elems(size_t(B * Hd * w * D), a.fp16, rng));
        upload(cache.v, random_elems(size_t(B * Hd * w * D), a.fp16, rng));
        std::vector<float> cached_delta(size_t(B * Hd * w));
        for (auto& x : cached_delta) x = rng.uniform(1.0f, 3.0f);
        upload(cache.delta, cached_delta);
        // the new tokens (the same every step) and the layer's dynamic weights
        Mem q(size_t(B * a.Hq * D) * 2), k(size_t(B * a.Hkv * D) * 2), v(size_t(B * a.Hkv * D) * 2);
        upload(q.ptr, random_elems(size_t(B * a.Hq * D), a.fp16, rng));
        upload(k.ptr, random_elems(size_t(B * a.Hkv * D), a.fp16, rng));
        upload(v.ptr, random_elems(size_t(B * a.Hkv * D), a.fp16, rng));
        std::vector<float> w_dt(static_cast<size_t>(Hd * a.Hkv * D)), a_h(static_cast<size_t>(Hd));
        for (auto& x : w_dt) x = rng.uniform(-0.05f, 0.05f);
        for (auto& x : a_h) x = rng.uniform(0.5f, 1.5f);
        Mem w_dt_d(w_dt.size() * 4), a_d(a_h.size() * 4), o(size_t(B * a.Hq * D) * 4), lse(size_t(B * a.Hq) * 4);
        upload(w_dt_d.ptr, w_dt);
        upload(a_d.ptr, a_h);
        dc::StepBuffers sb;
        sb.q = q.ptr, sb.k = k.ptr, sb.v = v.ptr, sb.w_dt = w_dt_d.as<float>(), sb.a = a_d.as<float>();
        sb.o = o.as<float>(), sb.lse = lse.as<float>(), sb.status = status.as<int64_t>();
        cudaStream_t st;
        check(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "cudaStreamCreate");
        cudaEvent_t e0, e1;
        check(cudaEventCreate(&e0), "cudaEventCreate");
        check(cudaEventCreate(&e1), "cudaEventCreate");
        for (int64_t N : a.Ns) {
          // the state after N tokens: min(w, N) entries per head at distinct positions below N
          const int64_t count = std::min(w, N);
          std::vector<int32_t> pos(size_t(B * Hd * w), 0);
          for (int64_t bh = 0; bh < B * Hd; ++bh)
            for (int64_t s = 0; s < count; ++s) pos[size_t(bh * w + s)] = int32_t(s * N / count);
          upload(cache.pos, pos);
          upload(cache.count, std::vector<int32_t>(size_t(B * Hd), int32_t(count)));
          upload(cache.length, std::vector<int32_t>(size_t(B), int32_t(N)));
          dc::reset_status(sb.status, st);
          for (int r = 0; r < a.warmup; ++r) dc::step(c, cache, sb, workspace.ptr, dc::step_workspace_bytes(c), st);
          std::vector<float> cold;
          for (int r = 0; r < a.reps; ++r) {
            check(cudaMemsetAsync(flush.ptr, r & 0xff, 256u << 20, st), "cudaMemsetAsync");
            check(cudaEventRecord(e0, st), "cudaEventRecord");
            dc::step(c, cache, sb, workspace.ptr, dc::step_workspace_bytes(c), st);
            check(cudaEventRecord(e1, st), "cudaEventRecord");
            check(cudaEventSynchronize(e1), "cudaEventSynchronize");
            float ms = 0;
            check(cudaEventElapsedTime(&ms, e0, e1), "cudaEventElapsedTime");
            cold.push_back(ms);
          }
          check(cudaEventRecord(e0, st), "cudaEventRecord");
          for (int r = 0; r < a.reps; ++r) dc::step(c, cache, sb, workspace.ptr, dc::step_workspace_bytes(c), st);
          check(cudaEventRecord(e1, st), "cudaEventRecord");
          check(cudaEventSynchronize(e1), "cudaEventSynchronize");
          float hot_ms = 0;
          check(cudaEventElapsedTime(&hot_ms, e0, e1), "cudaEventElapsedTime");
          dc::check_step_status(c, sb.status, st);
          const double full_kv = double(N) * a.Hkv * D * 2 * 2;
          std::printf("%s  {\"B\": %lld, \"N\": %lld, \"w\": %lld, \"Hq\": %lld, \"Hkv\": %lld, \"D\": %lld, "
                      "\"precision\": \"%s\", \"step_us_cold\": %.2f, \"step_us_hot\": %.2f, "
                      "\"cache_bytes_per_sequence\": %zu, \"full_kv_bytes_per_sequence\": %.0f, "
                      "\"cache_bytes\": %zu}",
                      first ? "" : ",\n", (long long)B, (long long)N, (long long)w, (long long)a.Hq,
                      (long long)a.Hkv, (long long)D, a.fp16 ? "fp16" : "bf16", 1e3 * median(cold),
                      1e3 * hot_ms / a.reps, dc::cache_bytes_per_sequence(c), full_kv, dc::cache_bytes(c));
          first = false;
          std::fflush(stdout);
        }
        cudaEventDestroy(e0);
        cudaEventDestroy(e1);
        cudaStreamDestroy(st);
      } catch (const std::exception& e) {
        std::fprintf(stderr, "decode_bench B=%lld w=%lld: %s\n", (long long)B, (long long)w, e.what());
        std::printf("%s  {\"B\": %lld, \"w\": %lld, \"error\": \"failed\"}", first ? "" : ",\n",
                    (long long)B, (long long)w);
        first = false;
      }
    }
  std::printf("\n]\n");
  return 0;
}
