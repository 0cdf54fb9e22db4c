// Step 1 - Dense causal attention, by hand
//
// What this proves: the attention every later step starts from, on numbers small enough to read.
// For each query i (one batch, one head):
//
//     s[i,j] = scale * (q_i . k_j)      for j <= i (causal),  -inf for j > i     scale = 1/sqrt(D)
//     p[i,:] = softmax(s[i,:])          each row sums to 1; p is exactly 0 above the diagonal
//     o_i    = sum_j p[i,j] v_j         lse_i = log sum_j exp(s[i,j])   (natural log)
//
// This is the paper's Eq. 5 with the two DMA ingredients switched off: no dynamic bias (delta = 0)
// and no dynamic mask (every allowed key kept, i.e. window w >= L). The last pass checks exactly
// that: the project's DMA reference with delta = 0 and w = L gives the same o and lse.
//
// Shapes: q, k, v are (L, D); s and p are (L, L); o is (L, D); lse is (L).

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <vector>

#include "dma/mask.hpp"
#include "dma/reference.hpp"

namespace {

// A tiny deterministic random source (splitmix64), so every run prints the same numbers.
struct Rng {
  uint64_t state;
  double uniform() {  // in [-1, 1)
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return static_cast<double>(z >> 11) * 0x1.0p-52 - 1.0;
  }
};

void print_matrix(const char* name, const std::vector<double>& m, int rows, int cols) {
  std::printf("%s (%d x %d):\n", name, rows, cols);
  for (int r = 0; r < rows; r++) {
    std::printf("  ");
    for (int c = 0; c < cols; c++) {
      double x = m[r * cols + c];
      if (std::isinf(x)) std::printf("   -inf ");
      else std::printf("%7.4f ", x);
    }
    std::printf("\n");
  }
}

}  // namespace

int main() {
  const int L = 5;  // queries = keys (self-attention)
  const int D = 4;  // head dim
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  const double NEG_INF = -std::numeric_limits<double>::infinity();

  Rng rng{1};
  std::vector<double> q(L * D), k(L * D), v(L * D);
  for (double& x : q) x = rng.uniform();
  for (double& x : k) x = rng.uniform();
  for (double& x : v) x = rng.uniform();
  std::printf("Step 1: dense causal attention (paper Eq. 5 with delta = 0, no dynamic mask)\n");
  std::printf("L = %d queries and keys, D = %d, scale = 1/sqrt(D) = %.4f\n\n", L, D, scale);
  print_matrix("q", q, L, D);
  print_matrix("k", k, L, D);
  print_matrix("v", v, L, D);

  // Pass 1: the logits. Query i may only look at keys j <= i (the past and itself); the future
  // gets -inf, which softmax turns into a probability of exactly 0.
  std::vector<double> s(L * L);
  for (int i = 0; i < L; i++) {
    const double* q_i = &q[i * D];
    for (int j = 0; j < L; j++) {
      const double* k_j = &k[j * D];
      double dot = 0;
      for (int d = 0; d < D; d++) dot += q_i[d] * k_j[d];
      s[i * L + j] = j <= i ? scale * dot : NEG_INF;
    }
  }
  std::printf("\nPass 1: s = scale * q k^T, -inf above the diagonal (the future)\n");
  print_matrix("s", s, L, L);

  // Pass 2: a row-wise softmax. Subtracting the row maximum m first changes nothing
  // (exp(s - m) / sum exp(s - m) = exp(s) / sum exp(s)) but keeps exp from overflowing; the same
  // m gives the log-sum-exp cheaply: lse = m + log(sum exp(s - m)). exp(-inf - m) is exactly 0.
  std::vector<double> p(L * L), lse(L);
  for (int i = 0; i < L; i++) {
    double m = NEG_INF;
    for (int j = 0; j < L; j++) m = std::fmax(m, s[i * L + j]);
    double sum = 0;
    for (int j = 0; j < L; j++) sum += std::exp(s[i * L + j] - m);
    for (int j = 0; j < L; j++) p[i * L + j] = std::exp(s[i * L + j] - m) / sum;
    lse[i] = m + std::log(sum);
  }
  std::printf("\nPass 2: p = softmax(s) row by row\n");
  print_matrix("p", p, L, L);

  // Pass 3: each output row is a convex combination of the value rows it may see.
  std::vector<double> o(L * D, 0.0);
  for (int i = 0; i < L; i++)
    for (int j = 0; j <= i; j++)
      for (int d = 0; d < D; d++) o[i * D + d] += p[i * L + j] * v[j * D + d];
  std::printf("\nPass 3: o = p v, lse = log sum exp(s)\n");
  print_matrix("o", o, L, D);
  print_matrix("lse", lse, 1, L);
  std::printf("Query 0 sees only key 0, so p[0,0] = 1 and o_0 = v_0 exactly: o_0[0] = %.4f, "
              "v_0[0] = %.4f\n", o[0], v[0]);

  // Pass 4: check the properties, then cross-check against the project's DMA reference.
  bool ok = true;
  double worst_row_sum = 0, worst_future_p = 0;
  for (int i = 0; i < L; i++) {
    double row = 0;
    for (int j = 0; j < L; j++) {
      row += p[i * L + j];
      if (j > i) worst_future_p = std::fmax(worst_future_p, std::fabs(p[i * L + j]));
    }
    worst_row_sum = std::fmax(worst_row_sum, std::fabs(row - 1.0));
  }
  std::printf("\nPass 4: checks\n");
  std::printf("  max |sum_j p[i,j] - 1|        = %.3g\n", worst_row_sum);
  std::printf("  max p[i,j] over the future     = %.3g (must be exactly 0)\n", worst_future_p);
  ok = ok && worst_row_sum < 1e-12 && worst_future_p == 0.0 && o[0] == v[0];

  // DMA with every delta equal to 0 and a window as long as the sequence is exactly this.
  dma::Shape shape;
  shape.Lq = L;
  shape.Lk = L;
  shape.D = D;
  dma::Options opt;
  opt.window = L;
  opt.causal = true;
  std::vector<double> delta(L, 0.0);
  std::vector<uint8_t> mask = dma::explicit_mask(shape, opt, delta);
  dma::ForwardResult<double> ref = dma::reference_forward(shape, opt, q, k, v, delta, mask);
  double o_diff = 0, lse_diff = 0;
  for (int x = 0; x < L * D; x++) o_diff = std::fmax(o_diff, std::fabs(o[x] - ref.o[x]));
  for (int i = 0; i < L; i++) lse_diff = std::fmax(lse_diff, std::fabs(lse[i] - ref.lse[i]));
  int mask_errors = 0;
  for (int i = 0; i < L; i++)
    for (int j = 0; j < L; j++) mask_errors += mask[i * L + j] != (j <= i ? 1 : 0);
  std::printf("  dma::reference_forward (delta = 0, w = L):\n");
  std::printf("    its mask is the causal lower triangle: %s\n", mask_errors == 0 ? "yes" : "NO");
  const int last = (L - 1) * D;  // the last query's output row
  std::printf("    o[%d,:] here ", L - 1);
  for (int d = 0; d < D; d++) std::printf(" %8.5f", o[last + d]);
  std::printf("\n    o[%d,:] dma  ", L - 1);
  for (int d = 0; d < D; d++) std::printf(" %8.5f", ref.o[last + d]);
  std::printf("\n");
  std::printf("    maxdiff o = %.3g, maxdiff lse = %.3g\n", o_diff, lse_diff);
  ok = ok && mask_errors == 0 && o_diff < 1e-12 && lse_diff < 1e-12;

  std::printf("\n%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
