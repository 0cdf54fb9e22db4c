// Step 4 - The DMA forward pass: bias added, mask applied
//
// What this proves (paper Eq. 5): DMA attention is ordinary attention with two changes, both
// driven by the dynamic weights delta of step 2:
//
//     s[i,j] = scale * (q_i . k_j) + delta_j     if key j is kept by query i (step 3's mask)
//            = -inf                              otherwise
//     o_i = softmax(s[i,:]) v,   lse_i = log sum_j exp(s[i,j])
//
// delta is ADDED to the logit (not scaled, not multiplied). On one small example we run three
// attentions side by side with the same q, k, v:
//     dense causal (MHA)     every past key, no bias
//     sliding window         the w most recent keys, no bias
//     DMA                    the top-w keys by delta, plus delta as a bias
// and check two facts: with a = 0 (every delta equal) DMA *is* sliding-window attention, since a
// constant added to every kept logit cancels in the softmax; and with a = 0 and w >= L it is dense
// causal attention. Finally the whole pipeline (delta -> mask -> attention) is checked against
// the project's dma::run_pipeline.
//
// Shapes (one batch, one head): q, k, v (L, D); w_dt (D); delta (L); mask, p (L, L); o (L, D).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

#include "dma/pipeline.hpp"

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

double softplus(double z) { return std::fmax(z, 0.0) + std::log1p(std::exp(-std::fabs(z))); }

// Eq. 3 with one kv head (vflat_j = v_j), exp form: delta_j = exp(a * softplus(v_j . w_dt)).
std::vector<double> dynamic_weights(const std::vector<double>& v, const std::vector<double>& w_dt,
                                    double a, int L, int D) {
  std::vector<double> delta(L);
  for (int j = 0; j < L; j++) {
    double z = 0;
    for (int d = 0; d < D; d++) z += v[j * D + d] * w_dt[d];
    delta[j] = std::exp(a * softplus(z));
  }
  return delta;
}

// Eq. 4: query i (position i, causal) keeps its w keys ranked by (delta desc, index desc).
std::vector<uint8_t> topw_mask(const std::vector<double>& delta, int L, int w) {
  std::vector<uint8_t> mask(L * L, 0);
  for (int i = 0; i < L; i++) {
    std::vector<int> allowed;
    for (int j = 0; j <= i; j++) allowed.push_back(j);
    std::sort(allowed.begin(), allowed.end(), [&](int x, int y) {
      return delta[x] > delta[y] || (delta[x] == delta[y] && x > y);
    });
    for (int r = 0; r < std::min<int>(w, i + 1); r++) mask[i * L + allowed[r]] = 1;
  }
  return mask;
}

// Eq. 5 for one head: attention with an additive per-key bias and a keep-mask.
// q, k, v (L, D); bias (L); keep (L, L). Fills p (L, L), o (L, D), lse (L).
struct Attention {
  std::vector<double> p, o, lse;
};
Attention attend(const std::vector<double>& q, const std::vector<double>& k,
                 const std::vector<double>& v, const std::vector<double>& bias,
                 const std::vector<uint8_t>& keep, int L, int D) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  Attention r{std::vector<double>(L * L), std::vector<double>(L * D, 0.0), std::vector<double>(L)};
  for (int i = 0; i < L; i++) {
    // pass a: logits, -inf where the mask drops the key
    std::vector<double> s(L);
    double m = NEG_INF;
    for (int j = 0; j < L; j++) {
      double dot = 0;
      for (int d = 0; d < D; d++) dot += q[i * D + d] * k[j * D + d];
      s[j] = keep[i * L + j] ? scale * dot + bias[j] : NEG_INF;
      m = std::fmax(m, s[j]);
    }
    // pass b: stable softmax (every row keeps at least key i, so m is finite)
    double sum = 0;
    for (int j = 0; j < L; j++) sum += std::exp(s[j] - m);
    for (int j = 0; j < L; j++) r.p[i * L + j] = std::exp(s[j] - m) / sum;
    r.lse[i] = m + std::log(sum);
    // pass c: weighted sum of the kept values
    for (int j = 0; j < L; j++)
      for (int d = 0; d < D; d++) r.o[i * D + d] += r.p[i * L + j] * v[j * D + d];
  }
  return r;
}

double max_abs_diff(const std::vector<double>& x, const std::vector<double>& y) {
  double m = 0;
  for (size_t t = 0; t < x.size(); t++) m = std::fmax(m, std::fabs(x[t] - y[t]));
  return m;
}

void print_row(const char* name, const double* row, int n) {
  std::printf("  %-16s", name);
  for (int j = 0; j < n; j++) {
    if (row[j] == 0.0) std::printf("    .   ");
    else std::printf(" %7.4f", row[j]);
  }
  std::printf("\n");
}

}  // namespace

int main() {
  const int L = 8, D = 4, w = 3;
  const double a = 1.0;
  Rng rng{4};
  std::vector<double> q(L * D), k(L * D), v(L * D), w_dt(D);
  for (double& x : q) x = rng.uniform();
  for (double& x : k) x = rng.uniform();
  for (double& x : v) x = rng.uniform();
  for (double& x : w_dt) x = 2.0 * rng.uniform();

  std::printf("Step 4: the DMA forward (paper Eq. 5), L = %d, D = %d, w = %d, exp form, a = %.1f\n\n",
              L, D, w, a);

  // Pass 1: the three ingredients (Eq. 3 delta, Eq. 4 mask), then the three attentions.
  std::vector<double> delta = dynamic_weights(v, w_dt, a, L, D);
  std::vector<uint8_t> dma_mask = topw_mask(delta, L, w);
  std::vector<uint8_t> causal(L * L), window(L * L);
  for (int i = 0; i < L; i++)
    for (int j = 0; j < L; j++) {
      causal[i * L + j] = j <= i;
      window[i * L + j] = j <= i && j > i - w;
    }
  const std::vector<double> no_bias(L, 0.0);
  Attention dense = attend(q, k, v, no_bias, causal, L, D);
  Attention sliding = attend(q, k, v, no_bias, window, L, D);
  Attention dmaa = attend(q, k, v, delta, dma_mask, L, D);

  std::printf("Pass 1: delta per key (exp form, one kv head):\n  %-16s", "key");
  for (int j = 0; j < L; j++) std::printf(" %7d", j);
  std::printf("\n");
  print_row("delta", delta.data(), L);

  // Pass 2: the last query, side by side ('.' = probability exactly 0).
  const int i = L - 1;
  std::printf("\nPass 2: attention probabilities of the last query (i = %d)\n", i);
  print_row("dense causal", &dense.p[i * L], L);
  print_row("sliding window", &sliding.p[i * L], L);
  print_row("DMA", &dmaa.p[i * L], L);
  std::printf("  DMA keeps keys");
  for (int j = 0; j < L; j++)
    if (dma_mask[i * L + j]) std::printf(" %d", j);
  std::printf(" (the %d largest delta), the window keeps %d..%d.\n", w, i - w + 1, i);
  std::printf("  o[%d,0]: dense %.5f, window %.5f, DMA %.5f\n", i, dense.o[i * D], sliding.o[i * D],
              dmaa.o[i * D]);

  // Pass 3: the bias matters: the same mask without delta gives different probabilities.
  Attention mask_only = attend(q, k, v, no_bias, dma_mask, L, D);
  const double bias_effect = max_abs_diff(mask_only.p, dmaa.p);
  std::printf("\nPass 3: DMA's mask without the bias changes p by up to %.4f: the bias is part of "
              "the model\n", bias_effect);
  bool ok = bias_effect > 1e-3;

  // Pass 4: a = 0 -> every delta is exactly 1 -> top-w by recency + a constant bias.
  std::vector<double> flat = dynamic_weights(v, w_dt, 0.0, L, D);
  Attention dma_a0 = attend(q, k, v, flat, topw_mask(flat, L, w), L, D);
  Attention dma_a0_full = attend(q, k, v, flat, topw_mask(flat, L, L), L, D);
  const double d_window = max_abs_diff(dma_a0.o, sliding.o);
  const double d_dense = max_abs_diff(dma_a0_full.o, dense.o);
  std::printf("\nPass 4: with a = 0 (all delta = 1)\n");
  std::printf("  DMA, w = %d   vs sliding window:      maxdiff o = %.3g\n", w, d_window);
  std::printf("  DMA, w = L   vs dense causal (MHA):  maxdiff o = %.3g\n", d_dense);
  std::printf("  (any difference is rounding: adding 1 to every kept logit changes no probability)\n");
  ok = ok && d_window < 1e-14 && d_dense < 1e-14;

  // Pass 5: the project's pipeline on the same inputs: delta -> mask -> forward.
  dma::Problem<double> prob;
  prob.shape.Lq = L;
  prob.shape.Lk = L;
  prob.shape.D = D;
  prob.opt.window = w;
  prob.opt.form = dma::Form::exp;
  prob.q = q;
  prob.k = k;
  prob.v = v;
  prob.w_dt = w_dt;
  prob.a = {a};
  dma::Result<double> res = dma::run_pipeline(prob, dma::Backend::cpu);
  const double d_delta = max_abs_diff(res.delta, delta);
  const bool same_mask = res.mask == dma_mask;
  const double d_o = max_abs_diff(res.fwd.o, dmaa.o), d_lse = max_abs_diff(res.fwd.lse, dmaa.lse);
  std::printf("\nPass 5: dma::run_pipeline (cpu backend) on the same inputs\n");
  std::printf("  maxdiff delta = %.3g, same mask: %s, maxdiff o = %.3g, maxdiff lse = %.3g\n",
              d_delta, same_mask ? "yes" : "NO", d_o, d_lse);
  ok = ok && d_delta < 1e-12 && same_mask && d_o < 1e-12 && d_lse < 1e-12;

  std::printf("\n%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
