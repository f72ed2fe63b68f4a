// launch_ortho_penalty_grad cases against ortho.cpp's formulas in long double:
//   Â = A / max(|A_i|, eps), G = Â Âᵀ with same-expert blocks zeroed, penalty = sum(G²) / denom,
//   grad_A += weight * d penalty / dA  (eps = 1e-6, denom = K (K-1) r²).
#include <algorithm>
#include <numeric>
#include <set>
#include <sstream>

#include "reference.h"

namespace cu = soslora::cuda;

namespace {

constexpr ld kEps = 1e-6L;

struct Spec {
  int64_t experts, rows_per_expert, in;
  double weight;
  int zero_rows = 0, tiny_rows = 0, small_rows = 0;  // |A_i| = 0, < eps, a little above eps
};

template <class T> void penalty_case(const Spec& s, bool deterministic) {
  using A = Acc<T>;
  const int64_t K = s.experts, rt = K * s.rows_per_expert, in = s.in;
  Buffer<T> a(rt * in), grad(rt * in);
  Buffer<A> weight(1), workspace(2 * rt * rt);
  weight[0] = A(s.weight);
  std::vector<int64_t> rows(rt);
  std::iota(rows.begin(), rows.end(), 0);
  std::shuffle(rows.begin(), rows.end(), rng());
  for (int64_t i = 0; i < rt; ++i) {
    const int64_t special = std::find(rows.begin(), rows.end(), i) - rows.begin();
    const double scale = std::pow(10.0, uniform(-1, 1));
    for (int64_t k = 0; k < in; ++k) {
      double v = uniform() * scale;
      if (special < s.zero_rows) v = 0;
      else if (special < s.zero_rows + s.tiny_rows) v = k < 3 ? 3e-7 * uniform() : 0;
      else if (special < s.zero_rows + s.tiny_rows + s.small_rows) v = k < 3 ? 4e-6 * uniform() : 0;
      a[i * in + k] = round_to<T>(v);
    }
  }
  // The reference gradient (weight 1), as ortho.cpp computes it.
  const ld denom = ld(K) * (K - 1) * s.rows_per_expert * s.rows_per_expert;
  const auto cross = [&](int64_t i, int64_t j) {
    return i / s.rows_per_expert != j / s.rows_per_expert;
  };
  std::vector<ld> n(rt), np(rt), hat(rt * in), g(rt * in, 0);
  for (int64_t i = 0; i < rt; ++i) {
    ld sq = 0;
    for (int64_t k = 0; k < in; ++k) sq += to_ld(a[i * in + k]) * to_ld(a[i * in + k]);
    n[i] = std::sqrt(sq), np[i] = std::max(n[i], kEps);
    for (int64_t k = 0; k < in; ++k) hat[i * in + k] = to_ld(a[i * in + k]) / np[i];
  }
  for (int64_t i = 0; i < rt; ++i) {
    std::vector<ld> gh(in, 0);
    for (int64_t j = 0; j < rt; ++j) {
      if (!cross(i, j)) continue;
      ld gij = 0;
      for (int64_t k = 0; k < in; ++k) gij += hat[i * in + k] * hat[j * in + k];
      for (int64_t k = 0; k < in; ++k) gh[k] += 4 * gij * hat[j * in + k] / denom;
    }
    ld radial = 0;
    for (int64_t k = 0; k < in; ++k) radial += hat[i * in + k] * gh[k];
    for (int64_t k = 0; k < in; ++k)
      g[i * in + k] = n[i] > kEps ? (gh[k] - hat[i * in + k] * radial) / n[i] : gh[k] / kEps;
  }
  ld rms = 0;
  for (ld v : g) rms += v * v;
  rms = std::sqrt(rms / std::max<int64_t>(1, rt * in));
  for (int64_t i = 0; i < rt * in; ++i)  // a gradient of the same size to add to (or none)
    grad[i] = round_to<T>(s.zero_rows % 2 ? 0.0 : double(rms) * uniform());
  const auto grad0 = grad.contents();

  std::ostringstream desc;
  desc << "K=" << K << " r=" << s.rows_per_expert << " in=" << in << " weight=" << s.weight
       << (deterministic ? " deterministic" : "") << " zero/tiny/small rows=" << s.zero_rows
       << "/" << s.tiny_rows << "/" << s.small_rows;
  const auto check = [&] {
    Check c;
    if (!grad.guards_intact() || !workspace.guards_intact()) c.fail("write outside a buffer");
    if (s.weight == 0) {
      if (grad.contents() != grad0) c.fail("grad_A changed with weight 0");
      return c;
    }
    const ld w = ld(weight[0]), sw = 4 * std::fabs(w) / denom;
    const ld gamma = 4 * (in + rt + 16) * unit_roundoff<A>();
    for (int64_t i = 0; i < rt; ++i) {
      // Bound: gamma times the size of the terms summed for row i (|Ĝ_ij| <= n_i n_j / (n'_i
      // n'_j)), plus one rounding to T of every element.
      ld terms = 0, err = 0, ref_norm = 0, g0_norm = 0;
      for (int64_t j = 0; j < rt; ++j)
        if (cross(i, j)) {
          const ld cj = n[j] / np[j], gij = n[i] * n[j] / (np[i] * np[j]);
          terms += cj * cj + gij * gij;
        }
      terms *= sw * n[i] / (np[i] * np[i]);
      for (int64_t k = 0; k < in; ++k) {
        T g0;
        std::memcpy((void*)&g0, grad0.data() + (i * in + k) * sizeof(T), sizeof(T));
        const ld ref = to_ld(g0) + w * g[i * in + k], got = to_ld(grad[i * in + k]);
        err += (got - ref) * (got - ref), ref_norm += ref * ref, g0_norm += to_ld(g0) * to_ld(g0);
      }
      const ld bound = gamma * (terms + std::sqrt(g0_norm)) +
                       unit_roundoff<T>() * std::sqrt(ref_norm) + std::sqrt(ld(in)) * ulp<T>(0);
      c.element(std::sqrt(err), 0, bound, "row " + std::to_string(i) + " (error norm)");
      c.ref_sq += ref_norm;
    }
    return c;
  };
  const bool reproducible = deterministic || in / 256 < 2;  // else the Gram matrix is split
  run_case("launch_ortho_penalty_grad", Type<T>::name, desc.str(), reproducible,
           [&] {
             grad.restore(grad0);
             for (int64_t i = 0; i < rt * rt; ++i) workspace[i] = 0, workspace[rt * rt + i] = NAN;
           },
           [&] { return cu::launch_ortho_penalty_grad(Type<T>::dtype, grad.data(), a.data(), rt,
                                                      in, K, weight.data(), workspace.data(),
                                                      deterministic, nullptr); },
           check, [&] { return grad.contents(); });
}

template <class T> void penalty_dtype() {
  const Spec specs[] = {
      {2, 1, 1, 0.7},          {2, 4, 40, 0.7},          {3, 5, 7, -1.3},
      {8, 12, 40, 0.5},        {2, 33, 70, 0.9, 2, 2, 1}, {3, 4, 20, -0.6, 1, 2, 2},
      {8, 1, 3, 0.8, 1, 1, 0}, {2, 4, 40, 0.0},          {5, 3, 64, 2.0, 0, 1, 1},
      {2, 2, 0, 0.5}};
  for (const Spec& s : specs) penalty_case<T>(s, false);
  for (bool det : {false, true}) {  // the Gram matrix split over K (unless deterministic)
    penalty_case<T>({4, 8, 600, 0.7}, det);
    penalty_case<T>({8, 2, 1100, 1.1, 1, 1, 1}, det);
  }
  using A = Acc<T>;
  Buffer<T> a(12), grad(12);
  Buffer<A> weight(1), workspace(2 * 36);
  weight[0] = 1;
  const auto refuse = [&](const char* what, int64_t rt, int64_t experts) {
    expect_error("launch_ortho_penalty_grad", std::string(Type<T>::name) + " " + what,
                 cudaErrorInvalidValue, [&] {
                   return cu::launch_ortho_penalty_grad(Type<T>::dtype, grad.data(), a.data(), rt,
                                                        2, experts, weight.data(),
                                                        workspace.data(), false, nullptr);
                 });
  };
  refuse("one expert", 6, 1);
  refuse("r_tot not a multiple of the experts", 5, 2);
  refuse("r_tot = 0", 0, 2);
}

}  // namespace

void penalty_cases(const std::set<std::string>& dtypes) {
  if (dtypes.count("fp32")) penalty_dtype<float>();
  if (dtypes.count("fp64")) penalty_dtype<double>();
  if (dtypes.count("fp16")) penalty_dtype<__half>();
  if (dtypes.count("bf16")) penalty_dtype<__nv_bfloat16>();
}
