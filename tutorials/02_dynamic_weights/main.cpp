// Step 2 - Dynamic weights: from the values to one number per key
//
// What this proves: DMA decides which keys matter from the values alone (paper Eq. 3, the
// "zero-order hold"). Every key j gets one weight delta_j per delta head h:
//
//     vflat[j,:]  = v[0,j,:] ++ v[1,j,:] ++ ...      the key's values over all kv heads (Hkv*D)
//     z[j,h]      = vflat[j,:] . w_dt[h,:]           a learned projection, w_dt is (Hd, Hkv*D)
//     delta[h,j]  = exp(a[h] * softplus(z[j,h]))     form "exp"    (the paper)
//                 = a[h] * softplus(z[j,h])          form "linear" (flash-dmattn, tamer numerically)
//
// delta is later used twice: as the ranking that picks each query's keys (step 3) and as a bias
// added to the logits (step 4). This step shows:
//   - the numbers of both forms on a small example;
//   - both forms rank the keys in the same order (exp is increasing), so they pick the same keys;
//     only the size of the bias differs;
//   - a = 0 makes every delta equal (1 in the exp form, 0 in the linear form): no key is preferred;
//   - no query appears anywhere: delta is the same for every query, which is what makes the masks
//     of consecutive queries nest (step 3);
//   - an overflowing exp is reported as an error naming the index, never as a silent inf/NaN.
// Then it checks the numbers against the project's dma::dynamic_weights.
//
// Shapes (one batch): v is (Hkv, Lk, D); w_dt is (Hd, Hkv*D); a is (Hd); delta is (Hd, Lk).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "dma/dynamic_weights.hpp"

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

// softplus(z) = log(1 + e^z), written so that neither large nor very negative z overflows.
double softplus(double z) { return std::fmax(z, 0.0) + std::log1p(std::exp(-std::fabs(z))); }

// Keys sorted from the highest-ranked down: delta descending, ties to the more recent key.
std::vector<int> ranking(const double* delta_h, int Lk) {
  std::vector<int> order(Lk);
  for (int j = 0; j < Lk; j++) order[j] = j;
  std::sort(order.begin(), order.end(), [&](int x, int y) {
    return delta_h[x] > delta_h[y] || (delta_h[x] == delta_h[y] && x > y);
  });
  return order;
}

}  // namespace

int main() {
  const int Hkv = 2, D = 2, Lk = 6, Hd = 2;
  const int F = Hkv * D;  // length of vflat

  Rng rng{2};
  std::vector<double> v(Hkv * Lk * D), w_dt(Hd * F);
  for (double& x : v) x = 1.5 * rng.uniform();
  for (double& x : w_dt) x = rng.uniform();
  const std::vector<double> a = {0.8, -0.5};  // head 0 prefers large z, head 1 small z

  std::printf("Step 2: dynamic weights (paper Eq. 3)\n");
  std::printf("Hkv = %d kv heads, D = %d, Lk = %d keys, Hd = %d delta heads, a = {%.1f, %.1f}\n\n",
              Hkv, D, Lk, Hd, a[0], a[1]);

  // Pass 1: flatten each key's values over the kv heads. v is head-major (Hkv, Lk, D), so the
  // pieces of one key sit Lk*D apart.
  std::vector<double> vflat(Lk * F);
  for (int j = 0; j < Lk; j++)
    for (int hk = 0; hk < Hkv; hk++)
      for (int d = 0; d < D; d++) vflat[j * F + hk * D + d] = v[(hk * Lk + j) * D + d];

  // Pass 2: project onto each delta head's row of w_dt.
  std::vector<double> z(Lk * Hd);
  for (int j = 0; j < Lk; j++)
    for (int h = 0; h < Hd; h++) {
      double dot = 0;
      for (int f = 0; f < F; f++) dot += vflat[j * F + f] * w_dt[h * F + f];
      z[j * Hd + h] = dot;
    }

  // Pass 3: both forms.
  std::vector<double> delta_exp(Hd * Lk), delta_lin(Hd * Lk);
  for (int h = 0; h < Hd; h++)
    for (int j = 0; j < Lk; j++) {
      double sp = softplus(z[j * Hd + h]);
      delta_exp[h * Lk + j] = std::exp(a[h] * sp);
      delta_lin[h * Lk + j] = a[h] * sp;
    }

  std::printf("Passes 1-3: vflat, z = vflat . w_dt[h], and delta in both forms\n");
  std::printf(" key |            vflat             |  head |     z   softplus |  delta exp  delta lin\n");
  for (int j = 0; j < Lk; j++)
    for (int h = 0; h < Hd; h++) {
      if (h == 0) {
        std::printf("  %2d | ", j);
        for (int f = 0; f < F; f++) std::printf("%6.3f ", vflat[j * F + f]);
        std::printf("|");
      } else {
        std::printf("     | %28s |", "");
      }
      std::printf("  h=%d  | %6.3f  %7.4f  | %9.4f  %9.4f\n", h, z[j * Hd + h],
                  softplus(z[j * Hd + h]), delta_exp[h * Lk + j], delta_lin[h * Lk + j]);
    }

  // Pass 4: the ranking. exp is increasing, so exp(a*sp) and a*sp order the keys identically;
  // the forms pick the same keys and differ only in how large a bias they add.
  bool ok = true;
  std::printf("\nPass 4: keys ranked highest first (delta descending, ties to the newer key)\n");
  for (int h = 0; h < Hd; h++) {
    std::vector<int> r_exp = ranking(&delta_exp[h * Lk], Lk);
    std::vector<int> r_lin = ranking(&delta_lin[h * Lk], Lk);
    std::printf("  head %d (a = %+.1f)  exp form:", h, a[h]);
    for (int j : r_exp) std::printf(" %d", j);
    std::printf("   linear form:");
    for (int j : r_lin) std::printf(" %d", j);
    std::printf("   %s\n", r_exp == r_lin ? "same order" : "DIFFERENT");
    ok = ok && r_exp == r_lin;
  }
  std::printf("  a > 0 ranks keys by z descending, a < 0 by z ascending: the head learns which.\n");

  // The project's shape struct, fields B, Hq, Hkv, Hd, Lq, Lk, D. Hq and Lq do not matter for
  // delta: there is no query in Eq. 3.
  const dma::Shape shape{1, Hd, Hkv, Hd, 1, Lk, D};

  // Pass 5: a = 0 switches the preference off. exp(0 * softplus) = 1 for every key, exactly.
  std::vector<double> zero_a(Hd, 0.0);
  std::vector<double> flat_exp = dma::dynamic_weights(shape, dma::Form::exp, v, w_dt, zero_a);
  bool all_one = std::all_of(flat_exp.begin(), flat_exp.end(), [](double x) { return x == 1.0; });
  std::printf("\nPass 5: with a = 0 every exp-form delta is exactly 1: %s\n", all_one ? "yes" : "NO");
  std::printf("  (all keys tie, so the ranking falls back to recency: step 3 shows this is a sliding"
              " window)\n");
  ok = ok && all_one;

  // Pass 6: the project's implementation, both forms.
  std::vector<double> ref_exp = dma::dynamic_weights(shape, dma::Form::exp, v, w_dt, a);
  std::vector<double> ref_lin = dma::dynamic_weights(shape, dma::Form::linear, v, w_dt, a);
  double diff_exp = 0, diff_lin = 0;
  for (int x = 0; x < Hd * Lk; x++) {
    diff_exp = std::fmax(diff_exp, std::fabs(ref_exp[x] - delta_exp[x]) / std::fabs(delta_exp[x]));
    diff_lin = std::fmax(diff_lin, std::fabs(ref_lin[x] - delta_lin[x]));
  }
  std::printf("\nPass 6: dma::dynamic_weights vs the inline numbers\n");
  std::printf("  exp form:    delta[0,0] here %.6f, dma %.6f; max rel diff %.3g\n", delta_exp[0],
              ref_exp[0], diff_exp);
  std::printf("  linear form: delta[1,0] here %.6f, dma %.6f; max abs diff %.3g\n",
              delta_lin[Lk], ref_lin[Lk], diff_lin);
  ok = ok && diff_exp < 1e-12 && diff_lin < 1e-12;

  // Pass 7: a large a makes exp overflow. The library refuses with a message naming the index
  // instead of letting an inf reach the softmax (where it would become NaN).
  std::vector<double> huge_a(Hd, 1e4);
  bool threw = false;
  try {
    dma::dynamic_weights(shape, dma::Form::exp, v, w_dt, huge_a);
  } catch (const dma::Error& e) {
    threw = true;
    std::printf("\nPass 7: a = 1e4 overflows exp; dma::dynamic_weights says:\n  \"%s\"\n", e.what());
  }
  if (!threw) std::printf("\nPass 7: a = 1e4 should overflow exp, but no error was raised\n");
  ok = ok && threw;

  std::printf("\n%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
