// Step 5 - The backward pass by hand, checked against finite differences
//
// What this proves: the gradients of DMA (paper Eqs. 7-10, plus the chain rule through the dynamic
// weights of Eq. 3) are right, by comparing every one of them with a central finite difference of
// the forward pass. The loss is L = sum(o * do) for a fixed random do, so dL/do = do.
//
// The backward walks the forward in reverse:
//   forward                                   backward
//   z_j = v_j . w_dt                          dw_dt = sum_j dz_j v_j,  dv_j += dz_j w_dt
//   delta_j = exp(a softplus(z_j))            da = sum_j g_j delta_j softplus(z_j)
//                                             dz_j = g_j delta_j a sigmoid(z_j)     (g = ddelta)
//   mask = top-w of delta                     (no gradient: a selection is piecewise constant)
//   s_ij = scale q_i.k_j + delta_j (kept)     dq_i = scale sum_j ds_ij k_j
//                                             dk_j = scale sum_i ds_ij q_i,  ddelta_j = sum_i ds_ij
//   p_i = softmax(s_i)                        D_i = do_i . o_i,  ds_ij = p_ij (dp_ij - D_i)
//   o_i = sum_j p_ij v_j                      dv_j = sum_i p_ij do_i,  dp_ij = do_i . v_j
//
// v gets two gradients: through attention and through delta; the one reported is their sum.
// Finite differences only see the true derivative where no selection flips within +-eps, so the
// check also confirms the mask is the same at every perturbed point.
//
// Shapes (one batch, one head): q, k, v, do (L, D); w_dt (D); a scalar; delta (L); p, ds (L, L).

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

const int L = 6, D = 3, W = 3;  // sequence length, head dim, window
const double SCALE = 1.0 / std::sqrt(static_cast<double>(D));

double softplus(double z) { return std::fmax(z, 0.0) + std::log1p(std::exp(-std::fabs(z))); }
double sigmoid(double z) { return 1.0 / (1.0 + std::exp(-z)); }

struct Params {
  std::vector<double> q, k, v, w_dt;
  double a = 0;
};

// Everything the forward computes that the backward needs again.
struct Forward {
  std::vector<double> z, delta;  // (L)
  std::vector<uint8_t> mask;     // (L, L)
  std::vector<double> p, o;      // (L, L), (L, D)
  double loss = 0;
};

Forward forward(const Params& P, const std::vector<double>& dout) {
  Forward f;
  f.z.resize(L);
  f.delta.resize(L);
  // Eq. 3: dynamic weights from the values (one kv head: vflat_j = v_j), exp form.
  for (int j = 0; j < L; j++) {
    double z = 0;
    for (int d = 0; d < D; d++) z += P.v[j * D + d] * P.w_dt[d];
    f.z[j] = z;
    f.delta[j] = std::exp(P.a * softplus(z));
  }
  // Eq. 4: query i keeps the top W of keys 0..i by (delta desc, index desc).
  f.mask.assign(L * L, 0);
  for (int i = 0; i < L; i++) {
    std::vector<int> allowed;
    for (int j = 0; j <= i; j++) allowed.push_back(j);
    std::sort(allowed.begin(), allowed.end(), [&](int x, int y) {
      return f.delta[x] > f.delta[y] || (f.delta[x] == f.delta[y] && x > y);
    });
    for (int r = 0; r < std::min(W, i + 1); r++) f.mask[i * L + allowed[r]] = 1;
  }
  // Eq. 5: biased, masked softmax attention.
  f.p.assign(L * L, 0.0);
  f.o.assign(L * D, 0.0);
  for (int i = 0; i < L; i++) {
    std::vector<double> s(L, -std::numeric_limits<double>::infinity());
    double m = s[0];
    for (int j = 0; j < L; j++) {
      if (!f.mask[i * L + j]) continue;
      double dot = 0;
      for (int d = 0; d < D; d++) dot += P.q[i * D + d] * P.k[j * D + d];
      s[j] = SCALE * dot + f.delta[j];
      m = std::fmax(m, s[j]);
    }
    double sum = 0;
    for (int j = 0; j < L; j++) sum += std::exp(s[j] - m);
    for (int j = 0; j < L; j++) {
      f.p[i * L + j] = std::exp(s[j] - m) / sum;
      for (int d = 0; d < D; d++) f.o[i * D + d] += f.p[i * L + j] * P.v[j * D + d];
    }
  }
  for (int x = 0; x < L * D; x++) f.loss += f.o[x] * dout[x];
  return f;
}

struct Grads {
  std::vector<double> dq, dk, dv, ddelta, dw_dt;
  double da = 0;
};

Grads backward(const Params& P, const Forward& f, const std::vector<double>& dout) {
  Grads g{std::vector<double>(L * D, 0.0), std::vector<double>(L * D, 0.0),
          std::vector<double>(L * D, 0.0), std::vector<double>(L, 0.0), std::vector<double>(D, 0.0),
          0.0};
  for (int i = 0; i < L; i++) {
    // In the forward pass o_i = sum_j p_ij v_j, so now we have dv_j and dp_ij.
    std::vector<double> dp(L, 0.0);
    for (int j = 0; j < L; j++)
      for (int d = 0; d < D; d++) {
        g.dv[j * D + d] += f.p[i * L + j] * dout[i * D + d];
        dp[j] += dout[i * D + d] * P.v[j * D + d];
      }
    // In the forward pass p_i = softmax(s_i); its Jacobian gives ds_ij = p_ij (dp_ij - D_i) with
    // D_i = sum_j p_ij dp_ij = do_i . o_i. A masked p_ij is exactly 0, so its ds_ij is too.
    double Di = 0;
    for (int d = 0; d < D; d++) Di += dout[i * D + d] * f.o[i * D + d];
    for (int j = 0; j < L; j++) {
      const double ds = f.p[i * L + j] * (dp[j] - Di);
      // In the forward pass s_ij = scale q_i.k_j + delta_j, so now we have dq, dk and ddelta.
      for (int d = 0; d < D; d++) {
        g.dq[i * D + d] += SCALE * ds * P.k[j * D + d];
        g.dk[j * D + d] += SCALE * ds * P.q[i * D + d];
      }
      g.ddelta[j] += ds;
    }
  }
  // In the forward pass delta_j = exp(a softplus(z_j)) and z_j = v_j . w_dt; the mask took no
  // part in the arithmetic, so the chain rule goes straight through to a, w_dt and v.
  for (int j = 0; j < L; j++) {
    const double sp = softplus(f.z[j]);
    g.da += g.ddelta[j] * f.delta[j] * sp;
    const double dz = g.ddelta[j] * f.delta[j] * P.a * sigmoid(f.z[j]);
    for (int d = 0; d < D; d++) {
      g.dw_dt[d] += dz * P.v[j * D + d];
      g.dv[j * D + d] += dz * P.w_dt[d];  // v's second path, added to the attention part
    }
  }
  return g;
}

// max|got - ref| / max|ref|, the project's error measure.
double rel_err(const std::vector<double>& got, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (size_t x = 0; x < ref.size(); x++) {
    num = std::fmax(num, std::fabs(got[x] - ref[x]));
    den = std::fmax(den, std::fabs(ref[x]));
  }
  return num / std::fmax(den, 1e-300);
}

}  // namespace

int main() {
  Rng rng{5};
  Params P;
  P.q.resize(L * D);
  P.k.resize(L * D);
  P.v.resize(L * D);
  P.w_dt.resize(D);
  std::vector<double> dout(L * D);
  for (double& x : P.q) x = rng.uniform();
  for (double& x : P.k) x = rng.uniform();
  for (double& x : P.v) x = rng.uniform();
  for (double& x : P.w_dt) x = rng.uniform();
  for (double& x : dout) x = rng.uniform();
  P.a = 0.7;

  std::printf("Step 5: the backward by hand (paper Eqs. 7-10 and the chain rule through Eq. 3)\n");
  std::printf("L = %d, D = %d, w = %d, exp form, a = %.1f, loss = sum(o * do)\n\n", L, D, W, P.a);

  // Pass 1: forward and backward.
  const Forward f = forward(P, dout);
  const Grads g = backward(P, f, dout);
  std::printf("Pass 1: forward loss = %.10f; analytic gradients computed\n", f.loss);

  // Pass 2: central differences, one parameter at a time: (L(x + eps) - L(x - eps)) / (2 eps).
  // Error ~ eps^2 (truncation) + 1e-16 / eps (rounding): eps = 1e-5 balances them near 1e-10.
  const double eps = 1e-5;
  int mask_flips = 0;
  auto central = [&](double& x) {
    const double saved = x;
    x = saved + eps;
    Forward plus = forward(P, dout);
    x = saved - eps;
    Forward minus = forward(P, dout);
    x = saved;
    mask_flips += (plus.mask != f.mask) + (minus.mask != f.mask);
    return (plus.loss - minus.loss) / (2 * eps);
  };
  auto numeric = [&](std::vector<double>& t) {
    std::vector<double> out(t.size());
    for (size_t x = 0; x < t.size(); x++) out[x] = central(t[x]);
    return out;
  };
  const std::vector<double> fd_q = numeric(P.q), fd_k = numeric(P.k), fd_v = numeric(P.v),
                            fd_w = numeric(P.w_dt);
  const std::vector<double> fd_a = {central(P.a)};

  std::printf("\nPass 2: analytic/finite difference (eps = %g); row 3 of q, k, v\n", eps);
  struct Row {
    const char* name;
    const std::vector<double>& got;
    const std::vector<double>& fd;
  };
  const std::vector<double> da_vec = {g.da};
  const Row rows[] = {{"dq", g.dq, fd_q},        {"dk", g.dk, fd_k}, {"dv", g.dv, fd_v},
                      {"dw_dt", g.dw_dt, fd_w}, {"da", da_vec, fd_a}};
  bool ok = true;
  for (const Row& r : rows) {
    std::printf("  %-6s", r.name);
    const size_t first = r.got.size() == static_cast<size_t>(L * D) ? 3 * D : 0;
    for (size_t x = first; x < std::min(first + 3, r.got.size()); x++)
      std::printf("  %+.8f/%+.8f", r.got[x], r.fd[x]);
    const double e = rel_err(r.got, r.fd);
    std::printf("   rel err %.2e\n", e);
    ok = ok && e < 1e-6;
  }
  std::printf("  dq of query 0 is exactly 0 (%g): it sees one key, so p = 1 whatever q_0 is\n",
              std::fabs(g.dq[0]) + std::fabs(g.dq[1]) + std::fabs(g.dq[2]));
  ok = ok && g.dq[0] == 0.0 && g.dq[1] == 0.0 && g.dq[2] == 0.0;
  for (int j = 0; j < L; j++) {
    bool kept = false;
    for (int i = 0; i < L; i++) kept = kept || f.mask[i * L + j];
    if (kept) continue;
    double worst = 0;
    for (int d = 0; d < D; d++)
      worst = std::fmax(worst, std::fabs(g.dk[j * D + d]) + std::fabs(g.dv[j * D + d]));
    std::printf("  key %d is kept by no query: its dk and dv are exactly 0 (%g); step 6 builds on "
                "this\n", j, worst);
    ok = ok && worst == 0.0;
  }
  std::printf("  the mask changed at %d of the perturbed points (must be 0 for the check to mean "
              "anything)\n", mask_flips);
  ok = ok && mask_flips == 0;

  // Pass 3: the project's reference backward on the same inputs.
  dma::Problem<double> prob;
  prob.shape.Lq = L;
  prob.shape.Lk = L;
  prob.shape.D = D;
  prob.opt.window = W;
  prob.q = P.q;
  prob.k = P.k;
  prob.v = P.v;
  prob.w_dt = P.w_dt;
  prob.a = {P.a};
  prob.dout = dout;
  const dma::Result<double> res = dma::run_pipeline(prob, dma::Backend::cpu);
  const Row lib[] = {{"dq", res.grads.dq, g.dq},         {"dk", res.grads.dk, g.dk},
                     {"dv", res.grads.dv, g.dv},         {"ddelta", res.grads.ddelta, g.ddelta},
                     {"dw_dt", res.dw_dt, g.dw_dt},      {"da", res.da, da_vec}};
  std::printf("\nPass 3: dma::run_pipeline (cpu backend) vs the gradients above\n ");
  for (const Row& r : lib) {
    const double e = rel_err(r.got, r.fd);
    std::printf(" %s %.1e", r.name, e);
    ok = ok && e < 1e-12;
  }
  std::printf("\n");

  std::printf("\n%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
